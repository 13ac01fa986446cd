//! keygate's integration tests: one binary, one file per feature, every test against a real
//! server on random ports and a real store.

mod helpers;
mod process;
mod processes;

mod authorize;
mod cli;
mod envoy;
mod grpcurl;
mod key_admin;
mod lockout;
mod readme;
