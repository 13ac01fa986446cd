//! keygate: an API-key authorization service for Envoy's ext_authz filter and gRPC clients.
//!
//! Layers, from the inside out: `domain` (pure logic), `store` (persistence), the use cases
//! (`authorizer`, `keys`, `operators`) with their supporting `cache`, `key_reads`, `passwords`, `rate_limit`,
//! `usage` and `argon_pool`, then the adapters (`grpc`, `cli`) and the process (`config`, `telemetry`,
//! `startup`).

pub mod argon_pool;
pub mod authorizer;
pub mod cache;
pub mod cli;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod key_reads;
pub mod keys;
pub mod listener;
pub mod metrics;
pub mod operators;
pub mod passwords;
pub mod rate_limit;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod usage;
