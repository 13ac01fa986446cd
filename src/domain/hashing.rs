//! argon2id hashing of key secrets and passwords. CPU-bound and deliberately slow: callers run it
//! off the async runtime (see `crate::auth::argon_pool`).

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version,
    password_hash::SaltString,
};
use rand::TryRngCore;
use rand::rngs::OsRng;

/// argon2id cost parameters. The defaults are OWASP's minimum recommendation
/// (m = 19 MiB, t = 2, p = 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for HashParams {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid argon2 parameters: {0}")]
pub struct InvalidHashParams(String);

/// Hashes new secrets with the configured parameters and verifies presented ones against
/// stored PHC strings (which carry their own parameters, so old hashes keep verifying after the
/// configuration changes).
#[derive(Clone)]
pub struct SecretHasher {
    argon2: Argon2<'static>,
}

impl SecretHasher {
    pub fn new(params: HashParams) -> Result<Self, InvalidHashParams> {
        let params = Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            None,
        )
        .map_err(|e| InvalidHashParams(e.to_string()))?;
        Ok(Self {
            argon2: Argon2::new(Algorithm::Argon2id, Version::V0x13, params),
        })
    }

    /// Returns the PHC string (`$argon2id$v=19$m=...`) of `secret` with a fresh random salt.
    pub fn hash(&self, secret: &str) -> String {
        let mut salt_bytes = [0u8; 16];
        OsRng
            .try_fill_bytes(&mut salt_bytes)
            .expect("the operating system's random source failed");
        let salt = SaltString::encode_b64(&salt_bytes).expect("16 bytes is a valid salt length");
        self.argon2
            .hash_password(secret.as_bytes(), &salt)
            .expect("argon2 hashing with validated parameters cannot fail")
            .to_string()
    }

    /// Constant-time verification. A stored hash that does not parse verifies nothing.
    pub fn verify(&self, stored_phc: &str, secret: &str) -> bool {
        match PasswordHash::new(stored_phc) {
            Ok(hash) => self
                .argon2
                .verify_password(secret.as_bytes(), &hash)
                .is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> SecretHasher {
        SecretHasher::new(HashParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap()
    }

    #[test]
    fn hash_then_verify() {
        let hasher = cheap();
        let phc = hasher.hash("correct horse");
        assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"));
        assert!(hasher.verify(&phc, "correct horse"));
        assert!(!hasher.verify(&phc, "correct horsE"));
        assert!(!hasher.verify("not a phc string", "correct horse"));
    }

    #[test]
    fn salts_differ() {
        let hasher = cheap();
        assert_ne!(hasher.hash("x"), hasher.hash("x"));
    }

    #[test]
    fn verification_uses_the_stored_parameters() {
        let phc = cheap().hash("s");
        let other = SecretHasher::new(HashParams {
            memory_kib: 2048,
            iterations: 2,
            parallelism: 1,
        })
        .unwrap();
        assert!(other.verify(&phc, "s"));
    }

    #[test]
    fn default_parameters_are_owasp_minimum() {
        let phc = SecretHasher::new(HashParams::default()).unwrap().hash("s");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    }

    #[test]
    fn rejects_nonsense_parameters() {
        assert!(
            SecretHasher::new(HashParams {
                memory_kib: 1,
                iterations: 0,
                parallelism: 0
            })
            .is_err()
        );
    }
}
