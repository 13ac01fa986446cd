//! The outcome of an authorization decision (SPEC section 3) and its pure steps. The one place
//! that strings the steps together, with the store, the cache and argon2, is
//! `crate::auth::authorizer::Authorizer::decide`.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::model::KeyStatus;

/// Why a request was denied. The numbering is the wire enum's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    MissingCredentials,
    MalformedCredentials,
    InvalidCredentials,
    KeyExpired,
    KeyDisabled,
    RateLimited,
}

impl DenyReason {
    pub const ALL: [DenyReason; 6] = [
        Self::MissingCredentials,
        Self::MalformedCredentials,
        Self::InvalidCredentials,
        Self::KeyExpired,
        Self::KeyDisabled,
        Self::RateLimited,
    ];

    /// The SPEC's name, used in logs, metrics labels and Envoy dynamic metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingCredentials => "MISSING_CREDENTIALS",
            Self::MalformedCredentials => "MALFORMED_CREDENTIALS",
            Self::InvalidCredentials => "INVALID_CREDENTIALS",
            Self::KeyExpired => "KEY_EXPIRED",
            Self::KeyDisabled => "KEY_DISABLED",
            Self::RateLimited => "RATE_LIMITED",
        }
    }
}

/// Who was let in. A key's name is shared with the cache's copy, not copied per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Key { id: i64, name: Arc<str> },
    User { username: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Principal),
    Deny {
        reason: DenyReason,
        /// For `RateLimited`: when the client may try again.
        retry_after_secs: Option<u64>,
    },
}

impl Decision {
    pub fn deny(reason: DenyReason) -> Self {
        Self::Deny {
            reason,
            retry_after_secs: None,
        }
    }

    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allow(_))
    }

    /// `None` when allowed.
    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            Self::Allow(_) => None,
            Self::Deny { reason, .. } => Some(*reason),
        }
    }
}

/// Step 4's state check, decided before the secret is compared: expired first, then disabled.
pub fn check_key_state(
    expires_at: Option<DateTime<Utc>>,
    enabled: bool,
    now: DateTime<Utc>,
) -> Result<(), DenyReason> {
    match KeyStatus::derive(expires_at, enabled, now) {
        KeyStatus::Expired => Err(DenyReason::KeyExpired),
        KeyStatus::Disabled => Err(DenyReason::KeyDisabled),
        KeyStatus::Active => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn expired_wins_over_disabled_and_the_boundary_is_inclusive() {
        let now = Utc::now();
        assert_eq!(
            check_key_state(Some(now), false, now),
            Err(DenyReason::KeyExpired)
        );
        assert_eq!(
            check_key_state(Some(now), true, now),
            Err(DenyReason::KeyExpired)
        );
        assert_eq!(
            check_key_state(Some(now + Duration::microseconds(1)), true, now),
            Ok(())
        );
        assert_eq!(
            check_key_state(None, false, now),
            Err(DenyReason::KeyDisabled)
        );
        assert_eq!(check_key_state(None, true, now), Ok(()));
    }
}
