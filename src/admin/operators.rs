//! Operators (users): the accounts that authenticate KeyAdmin calls, created at start-up from
//! `KEYGATE_ADMIN_USER`/`KEYGATE_ADMIN_PASSWORD` or by `keygate user add`.

use std::{net::IpAddr, sync::Arc};

use secrecy::{ExposeSecret, SecretString};

use crate::{
    admin::AdminError,
    auth::{
        passwords::{PasswordCheck, Passwords},
        rate_limit::FailureLimiter,
    },
    domain::{
        credentials::parse_authorization,
        validation::{check_password, parse_username},
    },
    store::{DynStore, StoreError},
};

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
    ) -> Result<String, AdminError> {
        let credentials = parse_authorization(header).map_err(|_| {
            AdminError::Unauthenticated(
                "KeyAdmin requires `authorization: Basic base64(user:password)` metadata of an active user",
            )
        })?;
        let Some(username) = credentials.username() else {
            return Err(AdminError::Unauthenticated(
                "KeyAdmin accepts only Basic username/password credentials, not bearer tokens",
            ));
        };
        match self
            .passwords
            .check(username, credentials.secret(), Some((&self.sign_ins, peer)))
            .await
            .map_err(AdminError::from)?
        {
            PasswordCheck::Valid => Ok(username.to_owned()),
            PasswordCheck::Invalid => {
                Err(AdminError::Unauthenticated("invalid username or password"))
            }
            PasswordCheck::RateLimited(wait) => {
                Err(AdminError::TooManyFailures(wait.as_secs_f64().ceil() as u64))
            }
        }
    }

    pub async fn add_user(
        &self,
        username: &str,
        password: &SecretString,
    ) -> Result<(), AdminError> {
        let username = parse_username(username).map_err(|e| AdminError::InvalidArgument(e.0))?;
        let hash = self.hash_new_password(password).await?;
        match self.store.create_user(&username, &hash).await {
            Ok(()) => Ok(()),
            Err(StoreError::UserExists) => Err(AdminError::UserExists(username)),
            Err(error) => Err(error.into()),
        }
    }

    /// Checks a new password's length and hashes it with the configured parameters.
    async fn hash_new_password(&self, password: &SecretString) -> Result<String, AdminError> {
        check_password(password.expose_secret()).map_err(|e| AdminError::InvalidArgument(e.0))?;
        self.passwords
            .hash(password.clone())
            .await
            .map_err(|_| AdminError::Overloaded)
    }

    pub async fn set_password(
        &self,
        username: &str,
        password: &SecretString,
    ) -> Result<(), AdminError> {
        let hash = self.hash_new_password(password).await?;
        if !self.store.set_user_password(username, &hash).await? {
            return Err(AdminError::UserNotFound(username.to_owned()));
        }
        self.passwords.invalidate_users();
        Ok(())
    }

    /// Creates the bootstrap user when the store has no user at all. Returns whether it did.
    pub async fn bootstrap(
        &self,
        username: &str,
        password: &SecretString,
    ) -> Result<bool, AdminError> {
        if self.store.count_users().await? > 0 {
            return Ok(false);
        }
        match self.add_user(username, password).await {
            Ok(()) => Ok(true),
            // Another replica bootstrapped the same user at the same moment.
            Err(AdminError::UserExists(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }
}
