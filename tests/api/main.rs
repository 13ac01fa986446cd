//! keygate's integration tests: one binary, one file per feature, every test against a real
//! server on random ports and a real store.

mod helpers;
mod process;

mod authorize;
mod cli;
mod grpcurl;
mod key_admin;
mod lockout;
