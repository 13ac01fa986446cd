//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so building keygate needs no
//! `protoc` on the machine) and writes the file-descriptor set that server reflection serves.
//! Release binaries are also linked with their hot functions first (see `hot_symbols`).

use std::{env, path::PathBuf, process::Command};

use prost::Message;

/// Functions a cached allow runs, one mangled name per line (`bench/hot-symbols.sh` writes it).
const HOT_SYMBOLS: &str = "bench/hot-symbols.txt";

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
    hot_symbols(&out_dir);
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

/// Orders the functions a cached allow runs first in release binaries' `.text`, next to each
/// other. Between two requests through Envoy, Envoy's own work evicts the server's code from the
/// caches, so each request fetches it again: spread over keygate's 12 MB of text (h2, hyper and
/// tokio placed among sqlx, argon2 and the CLI), that is many more pages and cache lines than in
/// a small binary. Linked in this order, keygate answered 3.8 µs sooner at the median through
/// Envoy at one connection (README, "Hot functions first"). Every binary gets the same order,
/// the no-op server included, so the benchmarks compare like with like.
///
/// Only lld reads the order (`--symbol-ordering-file`), so the linker is asked first with a
/// one-line program built the way cargo will link the binaries; with another linker, or
/// without the file, the binaries link in the default order. Names the build no longer has
/// are skipped (`--no-warn-symbol-ordering`): a stale file costs speed, never the build.
fn hot_symbols(out_dir: &std::path::Path) {
    println!("cargo:rerun-if-changed={HOT_SYMBOLS}");
    println!("cargo:rerun-if-env-changed=KEYGATE_DEFAULT_FUNCTION_ORDER");
    if env::var("PROFILE").as_deref() != Ok("release")
        || env::var_os("KEYGATE_DEFAULT_FUNCTION_ORDER").is_some()
    {
        return;
    }
    let Ok(manifest_dir) = env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    let order = PathBuf::from(manifest_dir).join(HOT_SYMBOLS);
    if !order.is_file() {
        return;
    }
    let args = [
        format!("-Wl,--symbol-ordering-file={}", order.display()),
        "-Wl,--no-warn-symbol-ordering".to_owned(),
    ];
    if linker_accepts(out_dir, &args) {
        for arg in args {
            println!("cargo:rustc-link-arg-bins={arg}");
        }
    } else {
        println!(
            "cargo:warning=the linker does not take --symbol-ordering-file (not lld?): default function order"
        );
    }
}

/// Links an empty program with `args`, with the rustc, target, linker and flags cargo uses.
fn linker_accepts(out_dir: &std::path::Path, args: &[String]) -> bool {
    let source = out_dir.join("link_probe.rs");
    if std::fs::write(&source, "fn main() {}\n").is_err() {
        return false;
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let mut command = Command::new(rustc);
    if let Ok(target) = env::var("TARGET") {
        command.args(["--target", &target]);
    }
    if let Ok(linker) = env::var("RUSTC_LINKER") {
        command.arg(format!("-Clinker={linker}"));
    }
    if let Ok(flags) = env::var("CARGO_ENCODED_RUSTFLAGS") {
        command.args(flags.split('\x1f').filter(|flag| !flag.is_empty()));
    }
    for arg in args {
        command.arg(format!("-Clink-arg={arg}"));
    }
    command
        .arg("-o")
        .arg(out_dir.join("link_probe"))
        .arg(&source)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
