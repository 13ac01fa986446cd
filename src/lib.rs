//! keygate: an API-key authorization service for Envoy's ext_authz filter and gRPC clients.

pub mod domain;
pub mod store;
