//! keygate: an API-key authorization service for Envoy's ext_authz filter and gRPC clients.
//!
//! Layers, from the inside out, each depending only on those before it (docs/ARCHITECTURE.md):
//! `domain` (pure logic: the key format, credentials, digests, the decision's rules), `store`
//! (persistence), `metrics`, the use cases (`auth`: deciding a request; `admin`: managing keys
//! and operators), the adapters (`grpc`, `cli`), and `app`, which wires a process together from its `settings`.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod domain;
pub mod grpc;
pub mod metrics;
pub mod pem;
pub mod settings;
pub mod store;
pub mod telemetry;
