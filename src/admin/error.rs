//! What an admin call (KeyAdmin, `keygate user`) can fail with. `crate::grpc::status` maps each
//! variant to one gRPC code; messages say what is wrong and never carry SQL, hashes or secrets.

use crate::{
    auth::passwords::PasswordCheckError, domain::validation::InvalidArgument, store::StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("no API key with id {0}")]
    KeyNotFound(i64),
    #[error("user {0:?} already exists")]
    UserExists(String),
    #[error("no user named {0:?}")]
    UserNotFound(String),
    /// No valid operator credentials.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The caller's address spent its budget of failed sign-ins (still `UNAUTHENTICATED`).
    #[error("too many failed sign-ins from this address: retry in {0} s")]
    TooManyFailures(u64),
    #[error("the key store is unavailable")]
    Unavailable(#[source] StoreError),
    /// More argon2 work is queued than the pool accepts.
    #[error("argon2 is overloaded; try again later")]
    Overloaded,
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl From<InvalidArgument> for AdminError {
    fn from(error: InvalidArgument) -> Self {
        Self::InvalidArgument(error.0)
    }
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(_) => Self::Unavailable(error),
            other => Self::Internal(other),
        }
    }
}

impl From<PasswordCheckError> for AdminError {
    fn from(error: PasswordCheckError) -> Self {
        match error {
            PasswordCheckError::Store(error) => error.into(),
            PasswordCheckError::Overloaded => Self::Overloaded,
        }
    }
}
