//! The single place where errors become gRPC statuses. Messages say what is wrong, and never
//! carry SQL, hashes or secrets: store details are logged here and replaced by a generic text.

use tonic::Status;

use crate::{authorizer::DecideError, keys::AdminError, operators::OperatorAuthError};

impl From<AdminError> for Status {
    fn from(error: AdminError) -> Self {
        match error {
            AdminError::InvalidArgument(message) => Status::invalid_argument(message),
            AdminError::NotFound(_) => Status::not_found(error.to_string()),
            AdminError::Unavailable(source) => {
                tracing::warn!(error = %source, "KeyAdmin call failed: store unavailable");
                Status::unavailable("the key store is unavailable; try again later")
            }
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

impl From<OperatorAuthError> for Status {
    fn from(error: OperatorAuthError) -> Self {
        match error {
            OperatorAuthError::Unauthenticated(message) => Status::unauthenticated(message),
            OperatorAuthError::TooManyFailures(_) => Status::unauthenticated(error.to_string()),
            OperatorAuthError::Unavailable(source) => {
                Status::from(crate::authorizer::DecideError::from(source))
            }
        }
    }
}
