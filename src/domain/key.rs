//! The API key format of SPEC section 2: `<prefix><id>_<secret>`, where the 40-character secret
//! is 34 random characters followed by a 6-character CRC-32 checksum in base62.
//!
//! The checksum lets keygate reject a mistyped or forged key without touching the store, and
//! makes leaked keys machine-recognisable (as GitHub's tokens are).

use std::fmt;

use rand::{Rng, TryRngCore, distr::Alphanumeric, rngs::OsRng};
use secrecy::{ExposeSecret, SecretString};

/// Characters drawn from the OS CSPRNG.
pub const RANDOM_LEN: usize = 34;
/// Base62 characters of the CRC-32 checksum.
pub const CHECKSUM_LEN: usize = 6;
/// The part after `_`: random characters followed by the checksum.
pub const SECRET_LEN: usize = RANDOM_LEN + CHECKSUM_LEN;
const MAX_PREFIX_LEN: usize = 32;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A validated key prefix (default `uk`): 1 to 32 ASCII letters, digits, `-` or `_`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.is_empty() || value.len() > MAX_PREFIX_LEN {
            return Err(format!(
                "key prefix must be 1 to {MAX_PREFIX_LEN} characters long"
            ));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("key prefix may only contain ASCII letters, digits, '-' and '_'".into());
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self("uk".to_owned())
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The random part of a new key, before the store has assigned its id: the only part of a key
/// that nobody can compute.
pub struct KeyMaterial(SecretString);

impl KeyMaterial {
    /// 34 characters of `[A-Za-z0-9]`, each drawn uniformly (rejection sampling in
    /// `Alphanumeric`) from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut rng = OsRng.unwrap_err();
        let random: String = (0..RANDOM_LEN)
            .map(|_| char::from(rng.sample(Alphanumeric)))
            .collect();
        Self(SecretString::from(random))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The clear key handed to the operator once: `<prefix><id>_<random><checksum>`.
    pub fn clear_key(&self, prefix: &KeyPrefix, id: i64) -> SecretString {
        let mut key = format!("{prefix}{id}_{}", self.expose());
        let checksum = checksum(&key);
        key.push_str(&checksum);
        SecretString::from(key)
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial([REDACTED])")
    }
}

/// A presented string with the shape of a key: `<prefix><id>_<40 characters>`. Borrowed from
/// the request: parsing allocates nothing, because it runs on every request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PresentedKey<'a> {
    pub id: i64,
    /// The 40 characters after `_`: the random part, then the checksum.
    pub secret: &'a str,
    /// Everything before the checksum: the text the checksum covers.
    signed: &'a str,
}

impl<'a> PresentedKey<'a> {
    /// The 34 random characters: what a version-1 key's argon2id hash covers.
    pub fn random(&self) -> &'a str {
        &self.secret[..RANDOM_LEN]
    }

    pub fn checksum_matches(&self) -> bool {
        checksum_digits(self.signed).as_slice() == &self.secret.as_bytes()[RANDOM_LEN..]
    }
}

impl fmt::Debug for PresentedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresentedKey")
            .field("id", &self.id)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

/// Why a presented string is not a key. Only for tests and logs: every variant becomes
/// `INVALID_CREDENTIALS` for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("does not start with the key prefix")]
    Prefix,
    #[error("the id is not a positive decimal number")]
    Id,
    #[error("the secret is not 40 characters of [A-Za-z0-9]")]
    Secret,
    #[error("the checksum does not match")]
    Checksum,
}

/// Parses `<prefix><id>_<secret>` and verifies the checksum.
pub fn parse_key<'a>(
    prefix: &KeyPrefix,
    presented: &'a str,
) -> Result<PresentedKey<'a>, KeyFormatError> {
    let key = parse_key_shape(prefix, presented)?;
    if !key.checksum_matches() {
        return Err(KeyFormatError::Checksum);
    }
    Ok(key)
}

/// Parses `<prefix><id>_<secret>` without verifying the checksum, for callers that can tell
/// otherwise that it holds (see `PresentedKey::checksum_matches`).
pub fn parse_key_shape<'a>(
    prefix: &KeyPrefix,
    presented: &'a str,
) -> Result<PresentedKey<'a>, KeyFormatError> {
    let rest = presented
        .strip_prefix(prefix.as_str())
        .ok_or(KeyFormatError::Prefix)?;
    let (id_text, secret) = rest.split_once('_').ok_or(KeyFormatError::Id)?;
    let id = parse_id(id_text).ok_or(KeyFormatError::Id)?;
    if secret.len() != SECRET_LEN || !secret.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(KeyFormatError::Secret);
    }
    Ok(PresentedKey {
        id,
        secret,
        signed: &presented[..presented.len() - CHECKSUM_LEN],
    })
}

/// A canonical decimal id: digits only, no sign, no leading zero, fits in `i64`, positive.
fn parse_id(text: &str) -> Option<i64> {
    if text.is_empty() || text.len() > 19 || text.starts_with('0') {
        return None;
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<i64>().ok().filter(|id| *id > 0)
}

/// CRC-32 (IEEE, as in zlib) of `text`, in base62 (`0-9A-Za-z`), most significant digit first,
/// left-padded with `0` to six characters.
pub fn checksum(text: &str) -> String {
    String::from_utf8(checksum_digits(text).to_vec()).expect("base62 digits are ASCII")
}

fn checksum_digits(text: &str) -> [u8; CHECKSUM_LEN] {
    base62_u32(crc32fast::hash(text.as_bytes()))
}

fn base62_u32(mut value: u32) -> [u8; CHECKSUM_LEN] {
    let mut digits = [b'0'; CHECKSUM_LEN];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    // 62^6 > u32::MAX, so six digits always suffice.
    debug_assert_eq!(value, 0);
    digits
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn prefix() -> KeyPrefix {
        KeyPrefix::default()
    }

    fn new_key(id: i64) -> String {
        KeyMaterial::generate()
            .clear_key(&prefix(), id)
            .expose_secret()
            .to_owned()
    }

    #[test]
    fn base62_matches_reference_values() {
        assert_eq!(&base62_u32(0), b"000000");
        assert_eq!(&base62_u32(61), b"00000z");
        assert_eq!(&base62_u32(62), b"000010");
        assert_eq!(&base62_u32(u32::MAX), b"4gfFC3");
    }

    #[test]
    fn checksum_is_crc32_ieee_of_the_text() {
        let crc = crc32fast::hash(b"123456789");
        assert_eq!(crc, 0xCBF4_3926, "the IEEE check value");
        assert_eq!(checksum("123456789"), "3jZRME");
        // Reference computed independently with Python's zlib.crc32 and a base62 encoder.
        assert_eq!(checksum("uk1_abcdefghijklmnopqrstuvwxyzABCDEFGH"), "0qr78l");
    }

    #[test]
    fn generated_key_has_the_documented_shape() {
        let key = new_key(42);
        assert!(key.starts_with("uk42_"));
        let secret = &key["uk42_".len()..];
        assert_eq!(secret.len(), SECRET_LEN);
        assert!(secret.bytes().all(|b| b.is_ascii_alphanumeric()));
        let parsed = parse_key(&prefix(), &key).expect("a fresh key parses");
        assert_eq!(parsed.id, 42);
        assert_eq!(parsed.secret, secret);
        assert_eq!(parsed.random(), &secret[..RANDOM_LEN]);
    }

    #[test]
    fn rejects_wrong_shapes() {
        let key = new_key(7);
        let p = prefix();
        assert_eq!(parse_key(&p, &key[1..]), Err(KeyFormatError::Prefix));
        assert_eq!(parse_key(&p, "uk_abc"), Err(KeyFormatError::Id));
        assert_eq!(parse_key(&p, "uk07_x"), Err(KeyFormatError::Id));
        assert_eq!(parse_key(&p, "uk0_x"), Err(KeyFormatError::Id));
        assert_eq!(parse_key(&p, "uk-1_x"), Err(KeyFormatError::Id));
        assert_eq!(
            parse_key(&p, "uk99999999999999999999_x"),
            Err(KeyFormatError::Id)
        );
        assert_eq!(parse_key(&p, "uk7"), Err(KeyFormatError::Id));
        assert_eq!(
            parse_key(&p, &key[..key.len() - 1]),
            Err(KeyFormatError::Secret)
        );
        assert_eq!(
            parse_key(&p, &format!("{key}a")),
            Err(KeyFormatError::Secret)
        );
        let mut with_symbol = key.clone();
        with_symbol.replace_range(10..11, "-");
        assert_eq!(parse_key(&p, &with_symbol), Err(KeyFormatError::Secret));
        let other = KeyPrefix::parse("kg").unwrap();
        assert_eq!(parse_key(&other, &key), Err(KeyFormatError::Prefix));
    }

    #[test]
    fn shape_parsing_leaves_the_checksum_to_the_caller() {
        let key = new_key(9);
        let mut wrong = key.clone();
        let last = if key.ends_with('a') { "b" } else { "a" };
        wrong.replace_range(key.len() - 1.., last);
        let shaped = parse_key_shape(&prefix(), &wrong).expect("the shape is right");
        assert_eq!(shaped.id, 9);
        assert!(!shaped.checksum_matches());
        assert_eq!(parse_key(&prefix(), &wrong), Err(KeyFormatError::Checksum));
        assert!(parse_key_shape(&prefix(), &key).unwrap().checksum_matches());
    }

    #[test]
    fn prefix_validation() {
        assert!(KeyPrefix::parse("uk").is_ok());
        assert!(KeyPrefix::parse("kg_live-").is_ok());
        assert!(KeyPrefix::parse("").is_err());
        assert!(KeyPrefix::parse("a b").is_err());
        assert!(KeyPrefix::parse(&"x".repeat(33)).is_err());
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let material = KeyMaterial::generate();
        assert!(!format!("{material:?}").contains(material.expose()));
        let key = new_key(3);
        let parsed = parse_key(&prefix(), &key).unwrap();
        assert!(!format!("{parsed:?}").contains(parsed.random()));
    }

    proptest! {
        #[test]
        fn any_single_character_change_fails(id in 1i64..i64::MAX, pos in 0usize..64, replacement in "[A-Za-z0-9_]") {
            let key = new_key(id);
            let pos = pos % key.len();
            let original = &key[pos..pos + 1];
            prop_assume!(original != replacement);
            let mut changed = key.clone();
            changed.replace_range(pos..pos + 1, &replacement);
            prop_assert!(parse_key(&prefix(), &changed).is_err(), "{changed} parsed");
            // What still has a key's shape fails on its checksum alone (the hot path's shortcut
            // relies on the shape check and the checksum being the whole of parse_key).
            if let Ok(shaped) = parse_key_shape(&prefix(), &changed) {
                prop_assert!(!shaped.checksum_matches(), "{changed} passed the checksum");
            }
        }

        #[test]
        fn round_trips_every_id(id in 1i64..i64::MAX) {
            let key = new_key(id);
            prop_assert_eq!(parse_key(&prefix(), &key).unwrap().id, id);
        }

        #[test]
        fn never_panics_on_arbitrary_input(input in ".{0,200}") {
            let _ = parse_key(&prefix(), &input);
        }
    }
}
