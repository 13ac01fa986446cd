//! The domain's records and the derived key status (SPEC section 1).

use std::fmt;

use chrono::{DateTime, Utc};

use super::digest::SecretDigest;

/// How the store knows a key's secret.
#[derive(Clone, PartialEq, Eq)]
pub enum StoredSecret {
    /// SHA-256 of the whole clear key: every key made by this version.
    Digest(SecretDigest),
    /// The argon2id PHC string of the key's 34 random characters, as version 1 stored it. Kept
    /// only until the key's first successful use, which replaces it with the digest.
    Argon2(String),
}

impl fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Digest(_) => "Digest([REDACTED])",
            Self::Argon2(_) => "Argon2([REDACTED])",
        })
    }
}

/// An API key as stored, secret included. `Debug` omits the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: i64,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub enabled: bool,
    pub last_used_at: Option<DateTime<Utc>>,
    pub created_by: String,
    pub secret: StoredSecret,
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("enabled", &self.enabled)
            .field("last_used_at", &self.last_used_at)
            .field("created_by", &self.created_by)
            .field("secret", &self.secret)
            .finish()
    }
}

impl KeyRecord {
    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        KeyStatus::derive(self.expires_at, self.enabled, now)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Disabled,
    Expired,
}

impl KeyStatus {
    /// Derived, never stored: expiry wins over the enabled flag, and a key is expired from the
    /// instant `now >= expires_at`.
    pub fn derive(expires_at: Option<DateTime<Utc>>, enabled: bool, now: DateTime<Utc>) -> Self {
        match expires_at {
            Some(expiry) if now >= expiry => Self::Expired,
            _ if !enabled => Self::Disabled,
            _ => Self::Active,
        }
    }
}

/// An operator account. `Debug` omits the hash.
#[derive(Clone)]
pub struct UserRecord {
    pub username: String,
    pub password_hash: String,
    pub active: bool,
}

impl fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRecord")
            .field("username", &self.username)
            .field("password_hash", &"[REDACTED]")
            .field("active", &self.active)
            .finish()
    }
}

/// The basic-auth lockout flag (`api_keys_enabled`) and when it was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthMode {
    pub api_keys_enabled: bool,
    pub locked_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn status_derivation() {
        let now = Utc::now();
        let past = Some(now - Duration::seconds(1));
        let future = Some(now + Duration::seconds(1));
        assert_eq!(KeyStatus::derive(None, true, now), KeyStatus::Active);
        assert_eq!(KeyStatus::derive(None, false, now), KeyStatus::Disabled);
        assert_eq!(KeyStatus::derive(future, true, now), KeyStatus::Active);
        assert_eq!(KeyStatus::derive(future, false, now), KeyStatus::Disabled);
        assert_eq!(KeyStatus::derive(past, true, now), KeyStatus::Expired);
        assert_eq!(KeyStatus::derive(past, false, now), KeyStatus::Expired);
        // The boundary: expired at exactly expires_at.
        assert_eq!(KeyStatus::derive(Some(now), true, now), KeyStatus::Expired);
    }
}
