//! The README's grpcurl session and `keygate keys` examples, run command by command against a
//! fresh server with the real grpcurl and keygate binaries, so the README cannot drift.

use std::process::Command;

use crate::helpers::{ADMIN_PASSWORD, TestBackend, keygate_binary, spawn_app, tool};

/// The shell commands of the `n`th ```sh block under `heading`, continuation lines joined,
/// comments and blank lines dropped.
fn commands_in_block(readme: &str, heading: &str, n: usize) -> Vec<String> {
    let section = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?} section"))
        .1;
    let block = section
        .split("```sh\n")
        .nth(n + 1)
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_else(|| panic!("{heading:?} has no sh block #{n}"));
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(continued) => current.push_str(continued),
            None => {
                current.push_str(line);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
}

fn is_assignment(command: &str) -> bool {
    command.starts_with("export ")
        || command.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        })
}

/// Runs `command` after the assignments seen so far; returns stdout, panicking (with stderr)
/// on a non-zero exit.
fn run(assignments: &[String], command: &str, path: &str, admin_addr: &str) -> String {
    let script = format!("set -euo pipefail\n{}\n{command}\n", assignments.join("\n"));
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("PATH", path)
        .env("KEYGATE_ADMIN_ADDR", admin_addr)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run bash");
    assert!(
        output.status.success(),
        "README command failed: {command}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_sessions_run_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let backend = TestBackend::sqlite();
    let app = spawn_app(&backend).await;
    let localize = |command: &str| {
        command
            .replace("127.0.0.1:50052", &app.admin_addr.to_string())
            .replace("127.0.0.1:50051", &app.main_addr.to_string())
            .replace("change-me-now", ADMIN_PASSWORD)
    };
    let tool_dirs = [tool("grpcurl"), keygate_binary()]
        .map(|path| path.parent().unwrap().display().to_string())
        .join(":");
    let path = format!("{tool_dirs}:{}", std::env::var("PATH").unwrap_or_default());
    let admin_addr = format!("http://{}", app.admin_addr);

    let grpcurl_session = commands_in_block(&readme, "## A grpcurl session", 0);
    assert!(grpcurl_session.len() >= 10, "{grpcurl_session:?}");
    let mut assignments = Vec::new();
    let mut first_secret = None;
    let mut authorized = false;
    for command in &grpcurl_session {
        let mut command = localize(command);
        if command.starts_with("KEY=") {
            let secret: &String = first_secret
                .as_ref()
                .expect("a key was created before KEY=");
            command = format!("KEY='{secret}'");
        }
        if is_assignment(&command) {
            assignments.push(command);
            continue;
        }
        let stdout = run(&assignments, &command, &path, &admin_addr);
        if command.contains("CreateKey") && first_secret.is_none() {
            let created: serde_json::Value = serde_json::from_str(&stdout).expect("CreateKey JSON");
            first_secret = Some(created["secret"].as_str().expect("secret").to_owned());
        }
        if command.contains("Authorize") {
            assert!(stdout.contains("\"allowed\": true"), "{stdout}");
            authorized = true;
        }
        if command.ends_with(" list") {
            assert!(stdout.contains("keygate.v1.KeyAdmin"), "{stdout}");
        }
    }
    assert!(
        authorized,
        "the session ends with an Authorize that is allowed"
    );

    let cli_session = commands_in_block(&readme, "## A grpcurl session", 1);
    assert!(
        cli_session
            .iter()
            .any(|c| c.starts_with("keygate keys create"))
    );
    let mut assignments = Vec::new();
    for command in &cli_session {
        let command = localize(command);
        if is_assignment(&command) {
            assignments.push(command);
            continue;
        }
        let stdout = run(&assignments, &command, &path, &admin_addr);
        if command.contains("keys list") {
            assert!(stdout.contains("prometheus"), "{stdout}");
        }
    }
    app.stop().await;
}
