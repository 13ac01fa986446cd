//! gRPC adapters: convert wire types to domain types, call a use case, map the result back.
//! No decision and no SQL lives here.

pub mod authorizer;
pub mod check_request;
pub mod check_server;
pub mod convert;
pub mod envoy;
pub mod key_admin;
pub mod malformed;
pub mod reflection;
pub mod status;

/// The generated `keygate.v1` types, clients and servers.
pub mod proto {
    tonic::include_proto!("keygate.v1");

    /// The file-descriptor set `build.rs` wrote, served by server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/keygate_descriptor.bin"));
}
