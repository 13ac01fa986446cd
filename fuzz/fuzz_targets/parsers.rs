//! The `Authorization` header parser and the key parser on arbitrary bytes: no panic, bounded
//! time, and nothing that is not a correctly checksummed key ever parses as one.

#![no_main]

use std::time::{Duration, Instant};

use keygate::domain::{
    credentials::{MAX_HEADER_LEN, parse_authorization},
    key::{KeyPrefix, checksum, parse_key, parse_key_shape},
};
use libfuzzer_sys::fuzz_target;

fn check_key(prefix: &KeyPrefix, presented: &str) {
    // The shape alone (the hot path's first step) agrees with the full parse on everything
    // but the checksum.
    let shaped = parse_key_shape(prefix, presented);
    match (&shaped, parse_key(prefix, presented)) {
        (Ok(shaped), Ok(parsed)) => assert!(shaped.checksum_matches() && *shaped == parsed),
        (Ok(shaped), Err(_)) => assert!(!shaped.checksum_matches()),
        (Err(_), parsed) => assert!(parsed.is_err()),
    }
    if let Ok(parsed) = parse_key(prefix, presented) {
        // Only a string of the exact shape, whose checksum matches, is a key.
        let (signed, sum) = presented.split_at(presented.len() - 6);
        assert_eq!(checksum(signed), sum);
        assert_eq!(
            signed,
            format!("{}{}_{}", prefix.as_str(), parsed.id, parsed.random())
        );
        assert!(parsed.id > 0);
        assert_eq!(parsed.random().len(), 34);
        assert_eq!(parsed.secret.len(), 40);
    }
}

fuzz_target!(|data: &[u8]| {
    let started = Instant::now();
    let prefix = KeyPrefix::parse("uk").expect("the default prefix");
    match parse_authorization(Some(data)) {
        Ok(credentials) => {
            assert!(data.len() <= MAX_HEADER_LEN);
            assert!(!credentials.secret().is_empty() || credentials.username().is_some());
            check_key(&prefix, credentials.secret());
        }
        Err(_) => {}
    }
    if let Ok(text) = std::str::from_utf8(data) {
        check_key(&prefix, text);
    }
    // Linear work on at most a few KiB: far below a millisecond; 50 ms allows for the
    // instrumented build on a loaded machine.
    assert!(started.elapsed() < Duration::from_millis(50));
});
