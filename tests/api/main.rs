//! keygate's integration tests: one binary, one file per feature, every test against a real
//! server on random ports and a real store.

mod helpers;
mod http;
mod processes;

mod authorize;
mod brute_force;
mod cache;
mod cli;
mod db_outage;
mod envoy;
mod grpcurl;
mod hardening;
mod hostile_input;
mod key_admin;
mod lockout;
mod pg_cluster;
mod races;
mod readme;
mod restarts;
mod secret_leaks;
mod tls;
mod upgrade;
