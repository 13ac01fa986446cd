//! "Parse, don't validate": KeyAdmin arguments become these types at the edge, and the messages
//! of the errors say exactly what is wrong (they are returned to the caller as
//! `INVALID_ARGUMENT`).

use chrono::{DateTime, SubsecRound, Utc};

pub const MAX_NAME_CHARS: usize = 128;
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidArgument(pub String);

fn invalid(message: impl Into<String>) -> InvalidArgument {
    InvalidArgument(message.into())
}

/// A key name: trimmed, 1..=128 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyName(String);

impl KeyName {
    pub fn parse(raw: &str) -> Result<Self, InvalidArgument> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(invalid("name must not be empty"));
        }
        let chars = name.chars().count();
        if chars > MAX_NAME_CHARS {
            return Err(invalid(format!(
                "name must be at most {MAX_NAME_CHARS} characters, got {chars}"
            )));
        }
        if name.chars().any(is_unprintable) {
            return Err(invalid(
                "name must be printable (no control, line separator or bidirectional control characters)",
            ));
        }
        if name.chars().all(|c| c.is_whitespace() || is_invisible(c)) {
            return Err(invalid(
                "name must contain a visible character (it is only spaces or invisible characters)",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// Characters a name must not contain: controls (C0, DEL, C1), the Unicode line and paragraph
/// separators (a line break by another name), and the invisible bidirectional controls that
/// make text display differently from what it is ("Trojan Source"). Joiners stay allowed:
/// emoji sequences need them.
fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}'
                | '\u{2029}'
                | '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// Characters that display as nothing (Unicode's default-ignorable code points and the fillers
/// that render blank): allowed inside a name, since emoji sequences need joiners, but a name
/// of nothing else would look empty in every list.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200D}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2065}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FFA0}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// A key's expiry: absent (never) or strictly in the future. Truncated to microseconds, the
/// precision both stores keep, so what CreateKey returns is what GetKey returns later.
pub fn parse_expiry(
    expires_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, InvalidArgument> {
    match expires_at {
        None => Ok(None),
        Some(at) => {
            let at = at.trunc_subsecs(6);
            if at <= now {
                Err(invalid(format!(
                    "expires_at must be in the future (got {}, now is {})",
                    at.to_rfc3339(),
                    now.to_rfc3339()
                )))
            } else {
                Ok(Some(at))
            }
        }
    }
}

/// Converts a protobuf timestamp's fields, rejecting values outside what chrono (and the stores)
/// can represent.
pub fn timestamp_from_parts(seconds: i64, nanos: i32) -> Result<DateTime<Utc>, InvalidArgument> {
    let nanos = u32::try_from(nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| invalid("timestamp nanos must be between 0 and 999999999"))?;
    // Protobuf's Timestamp is defined for years 0001..=9999.
    const MIN_SECONDS: i64 = -62_135_596_800;
    const MAX_SECONDS: i64 = 253_402_300_799;
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&seconds) {
        return Err(invalid(
            "timestamp must be between 0001-01-01 and 9999-12-31 (RFC 3339)",
        ));
    }
    DateTime::from_timestamp(seconds, nanos).ok_or_else(|| invalid("timestamp is out of range"))
}

/// A positive key id.
pub fn parse_key_id(id: i64) -> Result<i64, InvalidArgument> {
    if id <= 0 {
        Err(invalid(format!("id must be a positive integer, got {id}")))
    } else {
        Ok(id)
    }
}

/// A page of ListKeys: how many keys, and after which id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub size: usize,
    pub after_id: i64,
}

const PAGE_TOKEN_PREFIX: &str = "after:";

impl PageRequest {
    /// `page_size` 0 means the default; larger than the maximum is capped (as Google's API
    /// guidelines recommend) rather than refused.
    pub fn parse(page_size: i32, page_token: &str) -> Result<Self, InvalidArgument> {
        let size = match page_size {
            n if n < 0 => {
                return Err(invalid(format!("page_size must not be negative, got {n}")));
            }
            0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let after_id = if page_token.is_empty() {
            0
        } else {
            decode_page_token(page_token)
                .ok_or_else(|| invalid("page_token is not a token returned by ListKeys"))?
        };
        Ok(Self { size, after_id })
    }
}

/// The token for the page after the key with `last_id`. Opaque to clients; it is only a cursor,
/// so it carries no secret and needs no signature.
pub fn encode_page_token(last_id: i64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{PAGE_TOKEN_PREFIX}{last_id}"))
}

fn decode_page_token(token: &str) -> Option<i64> {
    use base64::Engine as _;
    if token.len() > 64 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let id: i64 = text.strip_prefix(PAGE_TOKEN_PREFIX)?.parse().ok()?;
    (id > 0).then_some(id)
}

/// A username for `keygate user add`: 1..=64 characters, no `:` (it could not be sent in Basic
/// auth), no whitespace or control characters.
pub fn parse_username(raw: &str) -> Result<String, InvalidArgument> {
    if raw.is_empty() || raw.chars().count() > 64 {
        return Err(invalid("username must be 1 to 64 characters"));
    }
    if raw.contains(':') || raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "username must not contain ':', whitespace or control characters",
        ));
    }
    Ok(raw.to_owned())
}

/// A new password: at least 8 characters, at most 1024 (argon2 time must stay bounded).
pub fn check_password(password: &str) -> Result<(), InvalidArgument> {
    let chars = password.chars().count();
    if chars < 8 {
        return Err(invalid("password must be at least 8 characters"));
    }
    if password.len() > 1024 {
        return Err(invalid("password must be at most 1024 bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use proptest::prelude::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(
            KeyName::parse("  prometheus ").unwrap().as_str(),
            "prometheus"
        );
        assert!(KeyName::parse("").is_err());
        assert!(KeyName::parse("   ").is_err());
        assert!(KeyName::parse(&"é".repeat(128)).is_ok());
        let long = KeyName::parse(&"é".repeat(129)).unwrap_err();
        assert!(long.0.contains("at most 128"), "{long}");
        assert!(KeyName::parse("a\u{7}b").is_err());
        assert!(KeyName::parse("line\nbreak").is_err());
        assert!(KeyName::parse("emoji 🔑 ok").is_ok());
        assert!(KeyName::parse("family 👨\u{200D}👩\u{200D}👧").is_ok());
        for unprintable in [
            "a\u{7f}b",
            "a\u{85}b",
            "a\u{2028}b",
            "a\u{2029}b",
            "admin\u{202E}txt.exe",
            "a\u{2066}b",
            "a\u{FEFF}b",
        ] {
            assert!(KeyName::parse(unprintable).is_err(), "{unprintable:?}");
        }
        for invisible in [
            "\u{200B}",
            " \u{2060} ",
            "\u{200B}\u{200D}\u{3164}",
            "\u{00AD}",
        ] {
            let error = KeyName::parse(invisible).unwrap_err();
            assert!(error.0.contains("visible"), "{invisible:?}: {error}");
        }
        assert!(KeyName::parse("a\u{200B}b").is_ok());
    }

    #[test]
    fn expiry_must_be_in_the_future() {
        let now = Utc::now();
        assert_eq!(parse_expiry(None, now).unwrap(), None);
        assert!(parse_expiry(Some(now), now).is_err());
        assert!(parse_expiry(Some(now - Duration::seconds(5)), now).is_err());
        let later = now + Duration::seconds(60);
        assert_eq!(
            parse_expiry(Some(later), now).unwrap(),
            Some(later.trunc_subsecs(6))
        );
    }

    #[test]
    fn timestamps_out_of_range_are_rejected() {
        assert!(timestamp_from_parts(0, 0).is_ok());
        assert!(timestamp_from_parts(0, -1).is_err());
        assert!(timestamp_from_parts(0, 1_000_000_000).is_err());
        assert!(timestamp_from_parts(i64::MAX, 0).is_err());
        assert!(timestamp_from_parts(i64::MIN, 0).is_err());
        assert!(timestamp_from_parts(253_402_300_799, 999_999_999).is_ok());
    }

    #[test]
    fn ids_must_be_positive() {
        assert!(parse_key_id(1).is_ok());
        assert!(parse_key_id(0).is_err());
        assert!(parse_key_id(-7).is_err());
    }

    #[test]
    fn page_requests() {
        assert_eq!(
            PageRequest::parse(0, "").unwrap(),
            PageRequest {
                size: 100,
                after_id: 0
            }
        );
        assert_eq!(PageRequest::parse(5000, "").unwrap().size, MAX_PAGE_SIZE);
        assert!(PageRequest::parse(-1, "").is_err());
        let token = encode_page_token(42);
        assert_eq!(PageRequest::parse(10, &token).unwrap().after_id, 42);
        for bad in ["x", "after:1", "!!!", &"A".repeat(100)] {
            assert!(PageRequest::parse(10, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn usernames_and_passwords() {
        assert!(parse_username("admin").is_ok());
        assert!(parse_username("").is_err());
        assert!(parse_username("a:b").is_err());
        assert!(parse_username("a b").is_err());
        assert!(check_password("short").is_err());
        assert!(check_password("long enough").is_ok());
    }

    proptest! {
        #[test]
        fn page_tokens_round_trip(id in 1i64..i64::MAX) {
            prop_assert_eq!(decode_page_token(&encode_page_token(id)), Some(id));
        }

        #[test]
        fn name_parsing_never_panics_and_bounds_hold(raw in ".{0,300}") {
            if let Ok(name) = KeyName::parse(&raw) {
                let n = name.as_str().chars().count();
                prop_assert!((1..=MAX_NAME_CHARS).contains(&n));
                prop_assert_eq!(name.as_str().trim(), name.as_str());
            }
        }
    }
}
