//! Operators (users): the accounts that authenticate KeyAdmin calls, created at start-up from
//! `KEYGATE_ADMIN_USER`/`KEYGATE_ADMIN_PASSWORD` or by `keygate user add`.

use std::{net::IpAddr, sync::Arc};

use secrecy::{ExposeSecret, SecretString};

use crate::{
    domain::{
        credentials::parse_authorization,
        validation::{check_password, parse_username},
    },
    passwords::{PasswordCheck, PasswordCheckError, Passwords},
    rate_limit::FailureLimiter,
    store::{DynStore, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum OperatorAuthError {
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The caller's address spent its budget of failed sign-ins (still `UNAUTHENTICATED`).
    #[error("too many failed sign-ins from this address: retry in {0} s")]
    TooManyFailures(u64),
    #[error("the key store is unavailable")]
    Unavailable(#[source] PasswordCheckError),
}

#[derive(Debug, thiserror::Error)]
pub enum UserAdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("user {0:?} already exists")]
    Exists(String),
    #[error("no user named {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("argon2 is overloaded")]
    Overloaded,
}

pub struct Operators {
    store: DynStore,
    passwords: Arc<Passwords>,
    /// Failed sign-ins per address, apart from the budget of Authorize's callers.
    sign_ins: FailureLimiter,
}

impl Operators {
    pub fn new(store: DynStore, passwords: Arc<Passwords>, sign_ins: FailureLimiter) -> Self {
        Self {
            store,
            passwords,
            sign_ins,
        }
    }

    /// Authenticates a KeyAdmin call from its `authorization` metadata and returns the
    /// operator's username. API keys never authenticate here, whatever their shape: only an
    /// active user's Basic username/password does.
    /// Failures spend `peer`'s sign-in budget; once it is spent, no password is checked.
    pub async fn authenticate(
        &self,
        header: Option<&[u8]>,
        peer: Option<IpAddr>,
    ) -> Result<String, OperatorAuthError> {
        let credentials = parse_authorization(header).map_err(|_| {
            OperatorAuthError::Unauthenticated(
                "KeyAdmin requires `authorization: Basic base64(user:password)` metadata of an active user",
            )
        })?;
        let Some(username) = credentials.username() else {
            return Err(OperatorAuthError::Unauthenticated(
                "KeyAdmin accepts only Basic username/password credentials, not bearer tokens",
            ));
        };
        match self
            .passwords
            .check(username, credentials.secret(), Some((&self.sign_ins, peer)))
            .await
            .map_err(OperatorAuthError::Unavailable)?
        {
            PasswordCheck::Valid => Ok(username.to_owned()),
            PasswordCheck::Invalid => Err(OperatorAuthError::Unauthenticated(
                "invalid username or password",
            )),
            PasswordCheck::RateLimited(wait) => Err(OperatorAuthError::TooManyFailures(
                wait.as_secs_f64().ceil() as u64,
            )),
        }
    }

    pub async fn add_user(
        &self,
        username: &str,
        password: &SecretString,
    ) -> Result<(), UserAdminError> {
        let username = parse_username(username).map_err(|e| UserAdminError::Invalid(e.0))?;
        let hash = self.hash_new_password(password).await?;
        match self.store.create_user(&username, &hash).await {
            Ok(()) => Ok(()),
            Err(StoreError::UserExists) => Err(UserAdminError::Exists(username)),
            Err(error) => Err(error.into()),
        }
    }

    /// Checks a new password's length and hashes it with the configured parameters.
    async fn hash_new_password(&self, password: &SecretString) -> Result<String, UserAdminError> {
        check_password(password.expose_secret()).map_err(|e| UserAdminError::Invalid(e.0))?;
        self.passwords
            .hash(password.clone())
            .await
            .map_err(|_| UserAdminError::Overloaded)
    }

    pub async fn set_password(
        &self,
        username: &str,
        password: &SecretString,
    ) -> Result<(), UserAdminError> {
        let hash = self.hash_new_password(password).await?;
        if !self.store.set_user_password(username, &hash).await? {
            return Err(UserAdminError::NotFound(username.to_owned()));
        }
        self.passwords.invalidate_users();
        Ok(())
    }

    /// Creates the bootstrap user when the store has no user at all. Returns whether it did.
    pub async fn bootstrap(
        &self,
        username: &str,
        password: &SecretString,
    ) -> Result<bool, UserAdminError> {
        if self.store.count_users().await? > 0 {
            return Ok(false);
        }
        match self.add_user(username, password).await {
            Ok(()) => Ok(true),
            // Another replica bootstrapped the same user at the same moment.
            Err(UserAdminError::Exists(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }
}
