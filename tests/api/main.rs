//! keygate's integration tests: one binary, one file per feature, every test against a real
//! server on random ports and a real store.

mod helpers;

mod authorize;
mod brute_force;
mod db_outage;
mod hostile_input;
mod pg_cluster;
mod races;
mod restarts;
mod secret_leaks;
mod support;
mod tls;
