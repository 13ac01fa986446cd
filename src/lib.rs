//! keygate: an API-key authorization service for Envoy's ext_authz filter and gRPC clients.
//!
//! Layers, from the inside out, each depending only on those before it (docs/ARCHITECTURE.md):
//! `domain` (pure logic: the key format, credentials, digests, the decision's rules), `store`
//! (persistence), `metrics`, the use cases (`auth`: deciding a request; `admin`: managing keys and
//! operators), the adapters (`grpc`, `cli`), and `app`, which wires a process together from its
//! `settings`.

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

use std::process::ExitCode;

use clap::Parser;

use crate::{
    app::{Application, shutdown_signal},
    cli::args::{Cli, Command, ServeArgs},
};

/// The `keygate` command: parse the command line, start logging, run the command. It lives
/// here rather than in `main.rs` so that the server's futures are compiled once, in this
/// crate: a binary awaiting them would compile them all again.
pub fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keygate: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(Cli::parse()))
}

async fn run(cli: Cli) -> ExitCode {
    telemetry::init(cli.log.log_format);
    let result = match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(*args).await,
        Some(Command::User(command)) => cli::run_user_command(command).await,
        Some(Command::Keys(args)) => cli::run_keys_command(args).await,
        Some(Command::Healthcheck(args)) => cli::run_healthcheck(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keygate: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> cli::CliResult {
    // Before anything else, so that no SIGTERM finds the default handler (which kills).
    let stop = shutdown_signal();
    // Checked before anything is opened: a failed start-up creates no files.
    let app = Application::build(args.into_settings()?).await?;
    app.run_until_stopped(stop).await?;
    Ok(())
}
