//! keygate's integration tests: one binary, one file per feature, every test against a real
//! server on random ports and a real store.

mod helpers;

mod authorize;
mod cache;
