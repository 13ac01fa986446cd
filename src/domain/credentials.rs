//! Parsing the HTTP `Authorization` header (SPEC section 3, steps 1 and 2). Every input is either
//! credentials or a deny reason: no panic, no internal error, bounded work.

use std::fmt;

use base64::{
    Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};

/// Headers longer than this are malformed (SPEC: over 4 KiB).
pub const MAX_HEADER_LEN: usize = 4096;

/// Standard base64, accepting input with or without `=` padding: clients differ.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What a request presented. The secret is the Basic password or the Bearer token; for API keys
/// the Basic username is ignored, so `curl -u ":<key>"` works.
pub struct Credentials {
    /// `None` for Bearer, which carries no username.
    pub username: Option<String>,
    pub secret: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("no Authorization header")]
    Missing,
    #[error("malformed Authorization header: {0}")]
    Malformed(&'static str),
}

/// Parses a raw header value. An absent header and one that is empty or only whitespace are
/// both "missing": proxies differ in which of the two they forward.
pub fn parse_authorization(header: Option<&[u8]>) -> Result<Credentials, CredentialsError> {
    let raw = header.ok_or(CredentialsError::Missing)?;
    if raw.len() > MAX_HEADER_LEN {
        return Err(CredentialsError::Malformed("header is longer than 4 KiB"));
    }
    let text = std::str::from_utf8(raw)
        .map_err(|_| CredentialsError::Malformed("header is not UTF-8"))?
        .trim_matches(is_http_whitespace);
    if text.is_empty() {
        return Err(CredentialsError::Missing);
    }
    let (scheme, rest) = text
        .split_once(is_http_whitespace)
        .ok_or(CredentialsError::Malformed(
            "no credentials after the scheme",
        ))?;
    let rest = rest.trim_matches(is_http_whitespace);
    if rest.is_empty() {
        return Err(CredentialsError::Malformed(
            "no credentials after the scheme",
        ));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        parse_basic(rest)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        if rest.contains(is_http_whitespace) {
            return Err(CredentialsError::Malformed(
                "bearer token contains whitespace",
            ));
        }
        Ok(Credentials {
            username: None,
            secret: rest.to_owned(),
        })
    } else {
        Err(CredentialsError::Malformed("unknown scheme"))
    }
}

fn parse_basic(encoded: &str) -> Result<Credentials, CredentialsError> {
    let decoded = BASE64
        .decode(encoded)
        .map_err(|_| CredentialsError::Malformed("Basic credentials are not valid base64"))?;
    let pair = String::from_utf8(decoded)
        .map_err(|_| CredentialsError::Malformed("Basic credentials are not UTF-8"))?;
    // The password may itself contain ':'; only the first one separates.
    let (username, password) = pair
        .split_once(':')
        .ok_or(CredentialsError::Malformed("Basic credentials have no ':'"))?;
    Ok(Credentials {
        username: Some(username.to_owned()),
        secret: password.to_owned(),
    })
}

/// The client address a gateway reports (`10.0.0.1`, `10.0.0.1:4242`, `[::1]:4242`, `::1`), or
/// `None` when it is absent or unreadable: the rate limiter then files the request under "no
/// address" rather than failing it.
pub fn parse_client_address(text: &str) -> Option<std::net::IpAddr> {
    let text = text.trim();
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    text.parse::<std::net::SocketAddr>()
        .ok()
        .map(|addr| addr.ip())
}

fn is_http_whitespace(c: char) -> bool {
    c == ' ' || c == '\t'
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(header: &str) -> Result<Credentials, CredentialsError> {
        parse_authorization(Some(header.as_bytes()))
    }

    fn basic(pair: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }

    #[test]
    fn missing_and_blank_headers_are_missing() {
        assert_eq!(
            parse_authorization(None).unwrap_err(),
            CredentialsError::Missing
        );
        assert_eq!(parse("").unwrap_err(), CredentialsError::Missing);
        assert_eq!(parse("  \t ").unwrap_err(), CredentialsError::Missing);
    }

    #[test]
    fn basic_with_empty_username_carries_the_key_as_password() {
        let creds = parse(&basic(":uk1_secret")).unwrap();
        assert_eq!(creds.username.as_deref(), Some(""));
        assert_eq!(creds.secret, "uk1_secret");
    }

    #[test]
    fn password_may_contain_colons() {
        let creds = parse(&basic("admin:pa:ss:")).unwrap();
        assert_eq!(creds.username.as_deref(), Some("admin"));
        assert_eq!(creds.secret, "pa:ss:");
    }

    #[test]
    fn scheme_is_case_insensitive_and_spaces_are_tolerated() {
        for scheme in ["basic", "BASIC", "bAsIc"] {
            let header = basic("a:b").replacen("Basic", scheme, 1);
            assert_eq!(parse(&header).unwrap().secret, "b");
        }
        let spaced = basic("a:b").replacen(' ', "   ", 1);
        assert_eq!(parse(&format!("  {spaced}\t")).unwrap().secret, "b");
        assert_eq!(parse("bearer   tok").unwrap().secret, "tok");
        assert_eq!(parse("BEARER tok").unwrap().username, None);
    }

    #[test]
    fn unpadded_base64_is_accepted() {
        let padded = basic("a:bc");
        assert!(padded.ends_with('='));
        assert_eq!(parse(padded.trim_end_matches('=')).unwrap().secret, "bc");
    }

    #[test]
    fn malformed_inputs() {
        let cases = [
            "Basic",
            "Basic ",
            "Bearer",
            "Digest abc",
            "Basic !!!notbase64",
            "Basic YWJj", // "abc": no colon
            "Bearer a b",
            "Basicabc",
        ];
        for case in cases {
            assert!(
                matches!(parse(case), Err(CredentialsError::Malformed(_))),
                "{case:?} should be malformed"
            );
        }
        let not_utf8 = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode([0xff, b':', 0xfe])
        );
        assert!(matches!(
            parse(&not_utf8),
            Err(CredentialsError::Malformed(_))
        ));
        assert!(matches!(
            parse_authorization(Some(b"Bearer \xff\xfe")),
            Err(CredentialsError::Malformed(_))
        ));
    }

    #[test]
    fn header_size_limit_is_4_kib() {
        let at_limit = format!("Bearer {}", "a".repeat(MAX_HEADER_LEN - 7));
        assert_eq!(at_limit.len(), MAX_HEADER_LEN);
        assert!(parse(&at_limit).is_ok());
        let over = format!("{at_limit}a");
        assert!(matches!(parse(&over), Err(CredentialsError::Malformed(_))));
    }

    #[test]
    fn debug_redacts_the_secret() {
        let creds = parse(&basic("admin:hunter2")).unwrap();
        assert!(!format!("{creds:?}").contains("hunter2"));
    }

    #[test]
    fn client_addresses() {
        use std::net::IpAddr;
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(parse_client_address("10.0.0.1"), Some(v4));
        assert_eq!(parse_client_address("10.0.0.1:4242"), Some(v4));
        assert_eq!(parse_client_address("[::1]:4242"), Some(v6));
        assert_eq!(parse_client_address("::1"), Some(v6));
        assert_eq!(parse_client_address(""), None);
        assert_eq!(parse_client_address("example.com"), None);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = parse_authorization(Some(&bytes));
        }

        #[test]
        fn any_basic_pair_round_trips(user in "[^:]{0,40}", password in ".{0,80}") {
            let creds = parse(&basic(&format!("{user}:{password}"))).unwrap();
            prop_assert_eq!(creds.username.as_deref(), Some(user.as_str()));
            prop_assert_eq!(creds.secret, password);
        }
    }
}
