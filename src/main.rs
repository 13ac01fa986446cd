//! keygate's entry point: parse the command line, start logging, run the command.

use std::process::ExitCode;

use clap::Parser;
use keygate::{
    app::{Application, shutdown_signal},
    cli::{
        self,
        args::{Cli, Command, ServeArgs},
    },
    telemetry,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
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
    // Checked before anything is opened: a failed start-up creates no files.
    let app = Application::build(args.into_settings()?).await?;
    app.run_until_stopped(shutdown_signal()).await?;
    Ok(())
}
