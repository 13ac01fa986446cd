//! The operator commands besides `serve`: `keygate user add|passwd` (directly against the
//! database), `keygate keys …` (a KeyAdmin client) and `keygate healthcheck`; and the command
//! line itself (`args`).

pub mod args;

use std::io::{BufRead, IsTerminal};

use base64::Engine as _;
use chrono::DateTime;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tonic::{Request, metadata::MetadataValue, transport::Channel};

use args::{ClientTlsArgs, HealthcheckArgs, KeysArgs, KeysCommand, UserArgs, UserCommand};

use crate::{
    admin::operators::Operators,
    auth::{argon_pool::ArgonPool, passwords::Passwords, rate_limit::FailureLimiter},
    domain::hashing::SecretHasher,
    grpc::{
        convert::timestamp,
        proto::{self, key_admin_client::KeyAdminClient},
    },
    metrics::Metrics,
    store,
};

pub type CliResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Reads a password from stdin: one line, or a hidden prompt when stdin is a terminal.
pub fn read_password(prompt: &str) -> std::io::Result<SecretString> {
    let stdin = std::io::stdin();
    let line = if stdin.is_terminal() {
        rpassword::prompt_password(prompt)?
    } else {
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        line
    };
    Ok(SecretString::from(
        line.trim_end_matches(['\r', '\n']).to_owned(),
    ))
}

pub async fn run_user_command(command: UserCommand) -> CliResult {
    let (args, adding): (UserArgs, bool) = match command {
        UserCommand::Add(args) => (args, true),
        UserCommand::Passwd(args) => (args, false),
    };
    let store = store::connect(&args.database.resolved_url()).await?;
    store.migrate().await?;
    let metrics = Metrics::new();
    let argon = ArgonPool::new(SecretHasher::new(args.hashing.params())?, 1, 1, 0, metrics);
    let passwords = std::sync::Arc::new(Passwords::new(store.clone(), argon));
    // Nobody signs in here.
    let operators = Operators::new(store, passwords, FailureLimiter::unlimited());
    let password = read_password(&format!("Password for {}: ", args.name))?;
    if adding {
        operators.add_user(&args.name, &password).await?;
        eprintln!("user {} created", args.name);
    } else {
        operators.set_password(&args.name, &password).await?;
        eprintln!("password of {} changed", args.name);
    }
    Ok(())
}

pub async fn run_healthcheck(args: HealthcheckArgs) -> CliResult {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let channel = connect(
        &args.addr,
        "--addr",
        "http://127.0.0.1:50051",
        std::time::Duration::from_secs(2),
        &args.tls,
    )
    .await?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    if response.status() == ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!("not serving: {:?}", response.status()).into())
    }
}

/// Connects to a keygate listener: plaintext for `http://`, TLS for `https://` (verified
/// against --ca-cert, with --client-cert/--client-key for an admin listener that wants them).
/// tonic's own error says only "transport error"; this one names the address and the cause
/// (connection refused, bad URL, timeout, certificate).
pub async fn connect(
    addr: &str,
    flag: &str,
    example: &str,
    timeout: std::time::Duration,
    tls: &ClientTlsArgs,
) -> Result<Channel, String> {
    use crate::pem::PemContents;
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut endpoint = Channel::from_shared(addr.to_owned())
        .map_err(|e| format!("{flag} {addr:?} is not a URL ({e}); example: {example}"))?;
    if endpoint.uri().scheme().is_none() {
        return Err(format!("{flag} {addr:?} has no scheme; example: {example}"));
    }
    let read = |path: &std::path::PathBuf, contents| {
        crate::pem::read_pem(path, contents).map_err(|error| error.to_string())
    };
    if addr.starts_with("https://") {
        let ca = tls.ca_cert.as_ref().ok_or(
            "an https:// address needs --ca-cert (the CA that signed keygate's certificate)",
        )?;
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(ca, PemContents::CaCertificate)?));
        if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
            config = config.identity(Identity::from_pem(
                read(cert, PemContents::Certificate)?,
                read(key, PemContents::PrivateKey)?,
            ));
        }
        endpoint = endpoint.tls_config(config).map_err(|e| {
            format!(
                "invalid TLS settings: {}",
                crate::telemetry::error_chain(&e)
            )
        })?;
    } else if tls.ca_cert.is_some() || tls.client_cert.is_some() {
        return Err("--ca-cert and --client-cert need an https:// address".into());
    }
    endpoint
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|error| {
            format!(
                "cannot connect to {addr}: {}",
                crate::telemetry::error_chain(&error)
            )
        })
}

pub async fn run_keys_command(args: KeysArgs) -> CliResult {
    let password = match std::env::var("KEYGATE_PASSWORD") {
        Ok(password) => SecretString::from(password),
        Err(_) => read_password(&format!("Password for {}: ", args.user))?,
    };
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        args.user,
        password.expose_secret()
    ));
    let header: MetadataValue<_> = format!("Basic {credentials}").parse()?;
    let channel = connect(
        &args.admin_addr,
        "--admin-addr",
        "http://127.0.0.1:50052",
        std::time::Duration::from_secs(30),
        &args.tls,
    )
    .await?;
    let mut client = KeyAdminClient::with_interceptor(channel, move |mut request: Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", header.clone());
        Ok(request)
    });
    let json = args.json;
    match args.command {
        KeysCommand::Create { name, expires_at } => {
            let created = client
                .create_key(proto::CreateKeyRequest {
                    name,
                    expires_at: expires_at.map(timestamp),
                })
                .await?
                .into_inner();
            let key = created.key.unwrap_or_default();
            if json {
                println!(
                    "{}",
                    json!({ "key": key_json(&key), "secret": created.secret })
                );
            } else {
                print_table(std::slice::from_ref(&key));
                println!("\nAPI key (shown once, store it now):\n{}", created.secret);
            }
        }
        KeysCommand::List => {
            let mut keys = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_keys(proto::ListKeysRequest {
                        page_size: 1000,
                        page_token,
                    })
                    .await?
                    .into_inner();
                keys.extend(page.keys);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if json {
                println!(
                    "{}",
                    json!({ "keys": keys.iter().map(key_json).collect::<Vec<_>>() })
                );
            } else {
                print_table(&keys);
            }
        }
        KeysCommand::Get { id } => {
            let key = client
                .get_key(proto::GetKeyRequest { id })
                .await?
                .into_inner();
            print_key(&key, json);
        }
        KeysCommand::Enable { id } | KeysCommand::Disable { id } => {
            let enabled = matches!(args.command, KeysCommand::Enable { .. });
            let key = client
                .set_key_enabled(proto::SetKeyEnabledRequest { id, enabled })
                .await?
                .into_inner();
            print_key(&key, json);
        }
        KeysCommand::Delete { id } => {
            client.delete_key(proto::DeleteKeyRequest { id }).await?;
            if json {
                println!("{}", json!({ "deleted": id }));
            } else {
                println!("deleted key {id}");
            }
        }
        KeysCommand::AuthMode => {
            let mode = client
                .get_auth_mode(proto::GetAuthModeRequest {})
                .await?
                .into_inner();
            let locked_at = mode.locked_at.as_ref().map(format_timestamp);
            if json {
                println!(
                    "{}",
                    json!({ "api_keys_enabled": mode.api_keys_enabled, "locked_at": locked_at })
                );
            } else if mode.api_keys_enabled {
                println!(
                    "API keys only (basic auth locked out since {})",
                    locked_at.unwrap_or_default()
                );
            } else {
                println!("basic auth (no API key created yet)");
            }
        }
    }
    Ok(())
}

fn format_timestamp(ts: &prost_types::Timestamp) -> String {
    DateTime::from_timestamp(ts.seconds, ts.nanos.max(0) as u32)
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn status_name(status: i32) -> &'static str {
    proto::KeyStatus::try_from(status)
        .map(|s| s.as_str_name())
        .unwrap_or("KEY_STATUS_UNSPECIFIED")
}

fn key_json(key: &proto::ApiKey) -> serde_json::Value {
    json!({
        "id": key.id,
        "name": key.name,
        "status": status_name(key.status),
        "enabled": key.enabled,
        "created_at": key.created_at.as_ref().map(format_timestamp),
        "expires_at": key.expires_at.as_ref().map(format_timestamp),
        "last_used_at": key.last_used_at.as_ref().map(format_timestamp),
        "created_by": key.created_by,
    })
}

fn print_key(key: &proto::ApiKey, json: bool) {
    if json {
        println!("{}", key_json(key));
    } else {
        print_table(std::slice::from_ref(key));
    }
}

fn print_table(keys: &[proto::ApiKey]) {
    let rows: Vec<[String; 6]> = keys
        .iter()
        .map(|key| {
            let time = |ts: &Option<prost_types::Timestamp>, none: &str| {
                ts.as_ref()
                    .map(format_timestamp)
                    .unwrap_or_else(|| none.to_owned())
            };
            [
                key.id.to_string(),
                key.name.clone(),
                status_name(key.status).to_owned(),
                time(&key.expires_at, "never"),
                time(&key.last_used_at, "-"),
                key.created_by.clone(),
            ]
        })
        .collect();
    let header = ["ID", "NAME", "STATUS", "EXPIRES", "LAST USED", "CREATED BY"];
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(&header.map(String::from)));
    for row in &rows {
        println!("{}", line(row));
    }
}
