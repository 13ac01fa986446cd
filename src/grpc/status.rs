//! The single place where errors become gRPC statuses. Messages say what is wrong, and never
//! carry SQL, hashes or secrets: store details are logged here and replaced by a generic text.

use tonic::Status;

use crate::{admin::AdminError, auth::authorizer::DecideError};

impl From<AdminError> for Status {
    fn from(error: AdminError) -> Self {
        match error {
            AdminError::InvalidArgument(message) => Status::invalid_argument(message),
            AdminError::KeyNotFound(_) | AdminError::UserNotFound(_) => {
                Status::not_found(error.to_string())
            }
            AdminError::UserExists(_) => Status::already_exists(error.to_string()),
            AdminError::Unauthenticated(message) => Status::unauthenticated(message),
            AdminError::TooManyFailures(_) => Status::unauthenticated(error.to_string()),
            AdminError::Unavailable(source) => {
                tracing::warn!(error = %source, "KeyAdmin call failed: store unavailable");
                Status::unavailable("the key store is unavailable; try again later")
            }
            AdminError::Overloaded => Status::unavailable(error.to_string()),
            AdminError::Internal(source) => {
                tracing::error!(error = %source, "KeyAdmin call failed");
                Status::internal("internal database error")
            }
        }
    }
}

impl From<DecideError> for Status {
    fn from(error: DecideError) -> Self {
        match error {
            DecideError::StoreUnavailable(_) => {
                Status::unavailable("the key store is unavailable and the answer is not cached")
            }
            DecideError::Overloaded => Status::unavailable(error.to_string()),
        }
    }
}
