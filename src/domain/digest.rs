//! The SHA-256 digest that identifies a key's secret in the store (SPEC sections 1 and 2).
//!
//! A key's secret is 34 characters drawn uniformly from 62 by the OS CSPRNG (about 202 bits), so
//! a single SHA-256 is already beyond brute force and a slow password hash would add nothing but
//! cost: every replica can verify a key it has never seen for the price of one store read.

use std::fmt;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// Bytes in a digest.
pub const DIGEST_LEN: usize = 32;

/// SHA-256 of the UTF-8 bytes of a whole clear key (`<prefix><id>_<secret>`). `Debug` never shows
/// it: a digest is as sensitive as a password hash.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretDigest([u8; DIGEST_LEN]);

impl SecretDigest {
    pub fn of(clear_key: &str) -> Self {
        Self(Sha256::digest(clear_key.as_bytes()).into())
    }

    /// Whether `presented` is the clear key this digest was made from, compared in constant
    /// time so that timing says nothing about how much of a guess was right.
    pub fn matches(&self, presented: &str) -> bool {
        Self::of(presented).0.ct_eq(&self.0).into()
    }

    /// `None` unless `bytes` is exactly one digest long (a corrupt row verifies nothing).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; DIGEST_LEN] {
        &self.0
    }
}

impl fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretDigest([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn is_sha256_of_the_whole_key() {
        // Reference: `printf %s 'abc' | sha256sum`.
        let digest = SecretDigest::of("abc");
        assert_eq!(
            digest.as_bytes()[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "SHA-256(\"abc\") starts ba7816bf"
        );
        assert!(digest.matches("abc"));
        assert!(!digest.matches("abd"));
        assert!(!digest.matches("abc "));
        assert!(!digest.matches(""));
    }

    #[test]
    fn slices_of_the_wrong_length_are_refused() {
        let digest = SecretDigest::of("k");
        assert_eq!(SecretDigest::from_slice(digest.as_bytes()), Some(digest));
        assert_eq!(SecretDigest::from_slice(&[0; 31]), None);
        assert_eq!(SecretDigest::from_slice(&[0; 33]), None);
        assert_eq!(SecretDigest::from_slice(&[]), None);
    }

    #[test]
    fn debug_output_never_shows_the_bytes() {
        let text = format!("{:?}", SecretDigest::of("uk1_secret"));
        assert_eq!(text, "SecretDigest([REDACTED])");
    }

    proptest! {
        #[test]
        fn only_the_same_text_matches(a in ".{0,80}", b in ".{0,80}") {
            prop_assert_eq!(SecretDigest::of(&a).matches(&b), a == b);
        }
    }
}
