//! Server reflection (v1 and v1alpha) for each listener, advertising exactly the services that
//! listener serves, so stock grpcurl can list, describe and call them with no .proto files.

use std::collections::{HashSet, VecDeque};

use prost::Message;
use prost_types::FileDescriptorSet;
use tonic::service::Routes;

const ENVOY_EXT_AUTHZ_FILE: &str = "envoy/service/auth/v3/external_auth.proto";
pub const ENVOY_AUTHORIZATION_SERVICE: &str = "envoy.service.auth.v3.Authorization";
const REFLECTION_SERVICES: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The Envoy API files the ext_authz service needs, out of the whole Envoy API's descriptor set
/// (1.3 MB, most of it irrelevant here): the service's file and its transitive imports.
pub fn envoy_ext_authz_descriptors() -> Result<FileDescriptorSet, prost::DecodeError> {
    let all = FileDescriptorSet::decode(xds_api::FILE_DESCRIPTOR_SET)?;
    let mut wanted = HashSet::new();
    let mut queue = VecDeque::from([ENVOY_EXT_AUTHZ_FILE.to_owned()]);
    while let Some(name) = queue.pop_front() {
        if !wanted.insert(name.clone()) {
            continue;
        }
        if let Some(file) = all.file.iter().find(|f| f.name() == name) {
            queue.extend(file.dependency.iter().cloned());
        }
    }
    Ok(FileDescriptorSet {
        file: all
            .file
            .into_iter()
            .filter(|f| wanted.contains(f.name()))
            .collect(),
    })
}

/// Adds both reflection services, advertising `services` (plus reflection itself).
pub fn add_reflection(
    routes: Routes,
    services: &[&str],
    include_envoy: Option<&FileDescriptorSet>,
) -> Result<Routes, tonic_reflection::server::Error> {
    let configure = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(super::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        if let Some(envoy) = include_envoy {
            builder = builder.register_file_descriptor_set(envoy.clone());
        }
        for name in services.iter().chain(REFLECTION_SERVICES.iter()) {
            builder = builder.with_service_name(*name);
        }
        builder
    };
    Ok(routes
        .add_service(configure().build_v1()?)
        .add_service(configure().build_v1alpha()?))
}
