//! Parsing the HTTP `Authorization` header (SPEC section 3, steps 1 and 2). Every input is either
//! credentials or a deny reason: no panic, no internal error, bounded work.

use std::{borrow::Cow, fmt};

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
///
/// A Bearer token is borrowed from the header; a Basic pair is decoded once and both halves
/// are read from that one buffer. Parsing a credential makes at most one copy of the secret on
/// the heap (none for a Bearer token), and does no allocation on the hot path's common case.
pub struct Credentials<'a> {
    /// The Bearer token, or the decoded Basic `username:password` pair.
    text: Cow<'a, str>,
    /// For Basic, where the `:` is in `text`; `None` for Bearer, which carries no username.
    colon: Option<usize>,
}

impl Credentials<'_> {
    /// `None` for Bearer, which carries no username.
    pub fn username(&self) -> Option<&str> {
        self.colon.map(|colon| &self.text[..colon])
    }

    pub fn secret(&self) -> &str {
        match self.colon {
            Some(colon) => &self.text[colon + 1..],
            None => &self.text,
        }
    }
}

impl fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username())
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
pub fn parse_authorization(header: Option<&[u8]>) -> Result<Credentials<'_>, CredentialsError> {
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
            text: Cow::Borrowed(rest),
            colon: None,
        })
    } else {
        Err(CredentialsError::Malformed("unknown scheme"))
    }
}

fn parse_basic(encoded: &str) -> Result<Credentials<'static>, CredentialsError> {
    let decoded = BASE64
        .decode(encoded)
        .map_err(|_| CredentialsError::Malformed("Basic credentials are not valid base64"))?;
    let pair = String::from_utf8(decoded)
        .map_err(|_| CredentialsError::Malformed("Basic credentials are not UTF-8"))?;
    // The password may itself contain ':'; only the first one separates.
    let colon = pair
        .find(':')
        .ok_or(CredentialsError::Malformed("Basic credentials have no ':'"))?;
    Ok(Credentials {
        text: Cow::Owned(pair),
        colon: Some(colon),
    })
}

/// The client address a request came with, parsed only when something reads it: the failure
/// limiter before argon2 work, or a deny's log line. A cached key's allow never does, so the
/// hot path does not pay for parsing text it will not use.
#[derive(Clone, Copy, Default)]
pub struct ClientAddress<'a> {
    /// As the gateway reported it.
    reported: Option<&'a str>,
    /// Used when the report is absent or unreadable (e.g. the caller's own address).
    fallback: Option<std::net::IpAddr>,
}

impl<'a> ClientAddress<'a> {
    pub fn new(reported: Option<&'a str>, fallback: Option<std::net::IpAddr>) -> Self {
        Self { reported, fallback }
    }

    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.reported
            .and_then(parse_client_address)
            .or(self.fallback)
    }
}

impl fmt::Debug for ClientAddress<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.ip(), f)
    }
}

/// The peers whose report of the client address is believed (SPEC section 3): a gateway in
/// front of keygate. From any other caller, its own address is the client, so a caller cannot
/// choose the rate-limit budget it spends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    /// A comma-separated list of addresses and CIDR networks; empty trusts nobody.
    pub fn parse(text: &str) -> Result<Self, String> {
        text.split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| {
                part.parse::<ipnet::IpNet>()
                    .or_else(|_| part.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("{part:?} is not an IP address or CIDR network"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether what `peer` says about its client is believed. A request with no peer address
    /// did not come over TCP (an in-process caller) and is believed.
    pub fn believes(&self, peer: Option<std::net::IpAddr>) -> bool {
        peer.is_none_or(|peer| {
            let peer = peer.to_canonical();
            self.0.iter().any(|net| net.contains(&peer))
        })
    }

    /// The client of a request `peer` sent, reporting `reported`.
    pub fn client<'a>(
        &self,
        reported: Option<&'a str>,
        peer: Option<std::net::IpAddr>,
    ) -> ClientAddress<'a> {
        ClientAddress::new(reported.filter(|_| self.believes(peer)), peer)
    }
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

    fn parse(header: &str) -> Result<Credentials<'_>, CredentialsError> {
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
        let header = basic(":uk1_secret");
        let creds = parse(&header).unwrap();
        assert_eq!(creds.username(), Some(""));
        assert_eq!(creds.secret(), "uk1_secret");
    }

    #[test]
    fn password_may_contain_colons() {
        let header = basic("admin:pa:ss:");
        let creds = parse(&header).unwrap();
        assert_eq!(creds.username(), Some("admin"));
        assert_eq!(creds.secret(), "pa:ss:");
    }

    #[test]
    fn scheme_is_case_insensitive_and_spaces_are_tolerated() {
        for scheme in ["basic", "BASIC", "bAsIc"] {
            let header = basic("a:b").replacen("Basic", scheme, 1);
            assert_eq!(parse(&header).unwrap().secret(), "b");
        }
        let spaced = basic("a:b").replacen(' ', "   ", 1);
        assert_eq!(parse(&format!("  {spaced}\t")).unwrap().secret(), "b");
        assert_eq!(parse("bearer   tok").unwrap().secret(), "tok");
        assert_eq!(parse("BEARER tok").unwrap().username(), None);
    }

    #[test]
    fn unpadded_base64_is_accepted() {
        let padded = basic("a:bc");
        assert!(padded.ends_with('='));
        assert_eq!(parse(padded.trim_end_matches('=')).unwrap().secret(), "bc");
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
        let header = basic("admin:hunter2");
        let creds = parse(&header).unwrap();
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

    #[test]
    fn a_client_address_falls_back_when_the_report_is_absent_or_unreadable() {
        let fallback = Some("10.0.0.9".parse().unwrap());
        let reported = |text| ClientAddress::new(text, fallback).ip();
        assert_eq!(reported(Some("[::1]:4242")), Some("::1".parse().unwrap()));
        assert_eq!(
            reported(Some("10.0.0.1:80")),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(reported(Some("not an address")), fallback);
        assert_eq!(reported(None), fallback);
        assert_eq!(ClientAddress::default().ip(), None);
        assert_eq!(
            format!("{:?}", ClientAddress::new(Some("10.0.0.1"), None)),
            "Some(10.0.0.1)"
        );
    }

    #[test]
    fn only_trusted_peers_choose_the_client_address() {
        let trusted = TrustedProxies::parse("127.0.0.0/8, ::1,10.1.0.0/16").unwrap();
        let ip = |text: &str| text.parse::<std::net::IpAddr>().unwrap();
        let client = |peer: &str| trusted.client(Some("192.0.2.7"), Some(ip(peer))).ip();
        assert_eq!(client("127.0.0.1"), Some(ip("192.0.2.7")));
        assert_eq!(client("::1"), Some(ip("192.0.2.7")));
        assert_eq!(client("::ffff:127.0.0.2"), Some(ip("192.0.2.7")));
        assert_eq!(client("10.1.200.3"), Some(ip("192.0.2.7")));
        assert_eq!(client("10.2.0.1"), Some(ip("10.2.0.1")));
        assert_eq!(client("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(
            trusted.client(None, Some(ip("10.2.0.1"))).ip(),
            Some(ip("10.2.0.1"))
        );
        let nobody = TrustedProxies::parse("").unwrap();
        assert_eq!(
            nobody.client(Some("192.0.2.7"), Some(ip("127.0.0.1"))).ip(),
            Some(ip("127.0.0.1"))
        );
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("localhost").is_err());
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = parse_authorization(Some(&bytes));
        }

        #[test]
        fn any_basic_pair_round_trips(user in "[^:]{0,40}", password in ".{0,80}") {
            let header = basic(&format!("{user}:{password}"));
            let creds = parse(&header).unwrap();
            prop_assert_eq!(creds.username(), Some(user.as_str()));
            prop_assert_eq!(creds.secret(), password);
        }
    }
}
