//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so building keygate needs no
//! `protoc` on the machine) and writes the file-descriptor set that server reflection serves.

use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/keygate/v1/keygate.proto";
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds the migration files at compile time; without this a new
    // migration file would not trigger a rebuild.
    println!("cargo:rerun-if-changed=migrations");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // compile_fds does not write the descriptor set itself; reflection needs it.
    std::fs::write(
        out_dir.join("keygate_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(authorization_as_bytes(descriptors))?;
    Ok(())
}

/// The descriptors the Rust code is generated from, with `AuthorizeRequest.authorization` as
/// `bytes`. The wire encoding of `string` and `bytes` is the same; what differs is that prost
/// refuses a `string` that is not UTF-8 before keygate sees it, where SPEC section 3 step 2
/// makes that header a deny (`MALFORMED_CREDENTIALS`) like any other malformed one. Reflection
/// and every client keep the `string` of the .proto (the set written above).
fn authorization_as_bytes(
    mut descriptors: prost_types::FileDescriptorSet,
) -> prost_types::FileDescriptorSet {
    use prost_types::field_descriptor_proto::Type;
    let field = descriptors
        .file
        .iter_mut()
        .filter(|file| file.package() == "keygate.v1")
        .flat_map(|file| file.message_type.iter_mut())
        .filter(|message| message.name() == "AuthorizeRequest")
        .flat_map(|message| message.field.iter_mut())
        .find(|field| field.name() == "authorization")
        .expect("keygate.v1.AuthorizeRequest.authorization");
    assert_eq!(field.r#type(), Type::String, "the .proto declares a string");
    field.set_type(Type::Bytes);
    descriptors
}
