//! The `keygate` binary as an operator uses it (SPEC sections 5 and 6): `user add|passwd`
//! against the database, `keys …` against a running server, start-up errors for bad settings,
//! and a bare `keygate` with no database configured (issue #5).
//!
//! These run the debug binary cargo builds for the tests (`CARGO_BIN_EXE_keygate`).

use std::{net::SocketAddr, path::Path};

use keygate::grpc::proto::{DenyReason, GetAuthModeRequest, GetKeyRequest};
use serde_json::{Value, json};
use tempfile::TempDir;
use tonic::Code;

use crate::{
    both_backends,
    grpcurl::{call, call_ok, int64, operator},
    helpers::{
        ADMIN_PASSWORD, ADMIN_USER, TestBackend, admin_client, basic, bearer, free_port, spawn_app,
    },
    processes::{Finished, KeygateProcess, free_addr, keygate_command, run},
};

fn temp_dir() -> TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// `keygate user <verb> <name> --database-url <url>` with `password` on stdin.
async fn user_command(verb: &str, name: &str, url: &str, password: &str) -> Finished {
    let dir = temp_dir();
    let mut command = keygate_command(dir.path());
    command.args(["user", verb, name, "--database-url", url]);
    run(command, Some(&format!("{password}\n"))).await
}

async fn user_add_and_passwd_manage_operators(backend: TestBackend) {
    let url = backend.url();
    let first = "first operator password";
    user_command("add", "ops", &url, first)
        .await
        .expect_success("keygate user add");

    // The bootstrap user is only created when no user exists; `ops` does.
    let app = spawn_app(&backend).await;
    let mut ops = admin_client(app.admin_addr, Some(("ops", first))).await;
    let mode = ops
        .get_auth_mode(GetAuthModeRequest {})
        .await
        .expect("ops authenticates KeyAdmin")
        .into_inner();
    assert!(!mode.api_keys_enabled);
    let (key, _) = {
        let created = ops
            .create_key(keygate::grpc::proto::CreateKeyRequest {
                name: "by ops".into(),
                expires_at: None,
            })
            .await
            .expect("CreateKey as ops")
            .into_inner();
        (created.key.expect("key"), created.secret)
    };
    assert_eq!(key.created_by, "ops");
    for (user, password) in [("ops", "wrong password"), (ADMIN_USER, ADMIN_PASSWORD)] {
        let mut client = admin_client(app.admin_addr, Some((user, password))).await;
        let refused = client
            .get_key(GetKeyRequest { id: key.id })
            .await
            .expect_err("wrong credentials");
        assert_eq!(refused.code(), Code::Unauthenticated, "{user}");
    }

    // Refusals: an existing name, a short password, a name Basic auth cannot carry, and
    // `passwd` for nobody. Each is a non-zero exit with a message that says why.
    for (verb, name, password, needle) in [
        ("add", "ops", "another long password", "already exists"),
        ("add", "shorty", "short", "at least 8"),
        ("add", "a:b", "long enough password", "':'"),
        ("passwd", "ghost", "long enough password", "no user named"),
    ] {
        let refused = user_command(verb, name, &url, password).await;
        assert!(!refused.success(), "user {verb} {name}: {refused}");
        assert!(
            refused.stderr.contains(needle),
            "user {verb} {name}: {refused}"
        );
        assert!(!refused.stderr.contains(password), "the password is echoed");
    }

    let second = "second operator password";
    let changed = user_command("passwd", "ops", &url, second)
        .await
        .expect_success("keygate user passwd");
    assert!(!changed.stdout.contains(second) && !changed.stderr.contains(second));

    // A fresh server (no cached verdicts) accepts only the new password.
    app.stop().await;
    let app = spawn_app(&backend).await;
    let mut old = admin_client(app.admin_addr, Some(("ops", first))).await;
    assert_eq!(
        old.get_key(GetKeyRequest { id: key.id })
            .await
            .expect_err("the old password")
            .code(),
        Code::Unauthenticated
    );
    let mut new = admin_client(app.admin_addr, Some(("ops", second))).await;
    let fetched = new
        .get_key(GetKeyRequest { id: key.id })
        .await
        .expect("the new password")
        .into_inner();
    assert_eq!(fetched, key);
}

/// `keygate keys [--json] <args>` against the server at `admin_addr` as the bootstrap user.
async fn keys_command(
    admin_addr: SocketAddr,
    password: &str,
    json: bool,
    args: &[&str],
) -> Finished {
    let dir = temp_dir();
    let mut command = keygate_command(dir.path());
    command.env("KEYGATE_PASSWORD", password).args([
        "keys",
        "--admin-addr",
        &format!("http://{admin_addr}"),
        "--user",
        ADMIN_USER,
    ]);
    if json {
        command.arg("--json");
    }
    command.args(args);
    run(command, None).await
}

async fn keys_json(admin_addr: SocketAddr, args: &[&str]) -> Value {
    let finished = keys_command(admin_addr, ADMIN_PASSWORD, true, args)
        .await
        .expect_success(&format!("keygate keys --json {args:?}"));
    serde_json::from_str(finished.stdout.trim())
        .unwrap_or_else(|e| panic!("keys {args:?} printed no JSON ({e}): {finished}"))
}

async fn keys_table(admin_addr: SocketAddr, args: &[&str]) -> Vec<String> {
    let finished = keys_command(admin_addr, ADMIN_PASSWORD, false, args)
        .await
        .expect_success(&format!("keygate keys {args:?}"));
    finished.stdout.lines().map(str::to_owned).collect()
}

const TABLE_HEADER: [&str; 6] = ["ID", "NAME", "STATUS", "EXPIRES", "LAST USED", "CREATED BY"];

#[track_caller]
fn assert_table_row(lines: &[String], id: i64, cells: &[&str]) {
    assert!(
        TABLE_HEADER.iter().all(|h| lines[0].contains(h)),
        "header: {lines:?}"
    );
    let row = lines
        .iter()
        .find(|line| line.split_whitespace().next() == Some(&id.to_string()))
        .unwrap_or_else(|| panic!("no row for key {id}: {lines:?}"));
    for cell in cells {
        assert!(row.contains(cell), "{cell:?} missing from {row:?}");
    }
}

async fn keys_commands_drive_a_running_server(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let addr = app.admin_addr;

    assert_eq!(
        keys_json(addr, &["auth-mode"]).await,
        json!({"api_keys_enabled": false, "locked_at": null})
    );
    let mode = keys_table(addr, &["auth-mode"]).await;
    assert!(mode[0].starts_with("basic auth"), "{mode:?}");

    // create, table form: the row, then the key on the last line.
    let table = keys_table(addr, &["create", "--name", "cli table"]).await;
    let secret = table.last().expect("output").trim().to_owned();
    let table_id: i64 = secret
        .strip_prefix("uk")
        .and_then(|rest| rest.split('_').next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no key on the last line: {table:?}"));
    assert_table_row(
        &table,
        table_id,
        &["cli table", "ACTIVE", "never", "-", ADMIN_USER],
    );
    assert!(app.authorize(&bearer(&secret)).await.allowed);

    // create --json with an expiry in another offset: normalised to UTC.
    let created = keys_json(
        addr,
        &[
            "create",
            "--name",
            "cli json",
            "--expires-at",
            "2099-01-01T02:00:00+02:00",
        ],
    )
    .await;
    let key = created["key"].clone();
    let id = key["id"].as_i64().expect("id");
    assert!(id > table_id);
    assert_eq!(key["name"], "cli json");
    assert_eq!(key["status"], "ACTIVE");
    assert_eq!(key["enabled"], true);
    assert_eq!(key["expires_at"], "2099-01-01T00:00:00Z");
    assert_eq!(key["last_used_at"], Value::Null);
    assert_eq!(key["created_by"], ADMIN_USER);
    chrono::DateTime::parse_from_rfc3339(key["created_at"].as_str().expect("created_at"))
        .expect("RFC 3339");
    let json_secret = created["secret"].as_str().expect("secret");
    assert!(json_secret.starts_with(&format!("uk{id}_")));
    assert!(app.authorize(&bearer(json_secret)).await.allowed);

    assert_eq!(keys_json(addr, &["get", &id.to_string()]).await, key);
    let get_table = keys_table(addr, &["get", &id.to_string()]).await;
    assert_table_row(&get_table, id, &["cli json", "2099-01-01T00:00:00Z"]);
    assert!(
        !get_table.concat().contains(json_secret),
        "get never shows the key"
    );

    let listed = keys_json(addr, &["list"]).await;
    let ids: Vec<i64> = listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![table_id, id]);
    let list_table = keys_table(addr, &["list"]).await;
    assert_eq!(list_table.len(), 3, "{list_table:?}");
    assert_table_row(&list_table, table_id, &["cli table"]);
    assert_table_row(&list_table, id, &["cli json"]);

    let disabled = keys_json(addr, &["disable", &id.to_string()]).await;
    assert_eq!(disabled["status"], "DISABLED");
    assert_eq!(disabled["enabled"], false);
    assert_eq!(
        app.authorize(&bearer(json_secret)).await.reason(),
        DenyReason::KeyDisabled
    );
    let enabled = keys_table(addr, &["enable", &id.to_string()]).await;
    assert_table_row(&enabled, id, &["ACTIVE"]);
    assert!(app.authorize(&bearer(json_secret)).await.allowed);

    let mode = keys_json(addr, &["auth-mode"]).await;
    assert_eq!(mode["api_keys_enabled"], true);
    chrono::DateTime::parse_from_rfc3339(mode["locked_at"].as_str().expect("locked_at"))
        .expect("RFC 3339");
    let mode = keys_table(addr, &["auth-mode"]).await;
    assert!(mode[0].starts_with("API keys only"), "{mode:?}");

    assert_eq!(
        keys_json(addr, &["delete", &id.to_string()]).await,
        json!({"deleted": id})
    );
    let deleted = keys_table(addr, &["delete", &table_id.to_string()]).await;
    assert_eq!(deleted, vec![format!("deleted key {table_id}")]);
    assert_eq!(keys_json(addr, &["list"]).await, json!({"keys": []}));

    // Failures: a non-zero exit and a message that says what is wrong.
    let gone = keys_command(addr, ADMIN_PASSWORD, true, &["get", &id.to_string()]).await;
    assert!(!gone.success(), "{gone}");
    assert!(
        gone.stderr.contains(&format!("no API key with id {id}")),
        "{gone}"
    );

    let wrong = keys_command(addr, "not the password", false, &["list"]).await;
    assert!(!wrong.success(), "{wrong}");
    assert!(
        wrong.stderr.contains("invalid username or password"),
        "{wrong}"
    );
    assert!(!wrong.stderr.contains("not the password"), "{wrong}");

    for bad in ["tomorrow", "2099-01-01", "2099-01-01 00:00:00"] {
        let refused = keys_command(
            addr,
            ADMIN_PASSWORD,
            false,
            &["create", "--name", "bad expiry", "--expires-at", bad],
        )
        .await;
        assert!(!refused.success(), "{bad}: {refused}");
        assert!(refused.stderr.contains("--expires-at"), "{bad}: {refused}");
        assert!(refused.stderr.contains("RFC 3339"), "{bad}: {refused}");
    }
    let past = keys_command(
        addr,
        ADMIN_PASSWORD,
        false,
        &[
            "create",
            "--name",
            "past",
            "--expires-at",
            "2000-01-01T00:00:00Z",
        ],
    )
    .await;
    assert!(!past.success(), "{past}");
    assert!(
        past.stderr.contains("expires_at must be in the future"),
        "{past}"
    );
    assert_eq!(keys_json(addr, &["list"]).await, json!({"keys": []}));

    // A server that is not there, or an address that is not a URL: said so, with the address.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    for (admin_addr, needle) in [
        (nowhere.as_str(), format!("cannot connect to {nowhere}")),
        ("127.0.0.1:50052", "has no scheme".to_owned()),
        ("not a url", "is not a URL".to_owned()),
    ] {
        let dir = temp_dir();
        let mut command = keygate_command(dir.path());
        command
            .env("KEYGATE_PASSWORD", ADMIN_PASSWORD)
            .env("KEYGATE_ADMIN_ADDR", admin_addr)
            .args(["keys", "list"]);
        let failed = run(command, None).await;
        assert!(!failed.success(), "{failed}");
        assert!(failed.stderr.contains(&needle), "{failed}");
    }
}

both_backends!(
    user_add_and_passwd_manage_operators,
    keys_commands_drive_a_running_server,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_fail_at_start_up_naming_the_setting() {
    let dir = temp_dir();
    /// Arguments, environment, and what the error message must say.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case; 11] = [
        (&["--listen", "nowhere"], &[], &["--listen", "nowhere"]),
        (
            &[],
            &[("KEYGATE_LISTEN", "nowhere")],
            &["--listen", "nowhere"],
        ),
        (&["--admin-listen", "127.0.0.1"], &[], &["--admin-listen"]),
        (&["--key-prefix", "a b"], &[], &["--key-prefix"]),
        (
            &[],
            &[("KEYGATE_LOG_FORMAT", "xml")],
            &["--log-format", "xml"],
        ),
        (
            &["serve", "--realm", "r", "--cache-capacity", "0"],
            &[],
            &["--cache-capacity"],
        ),
        (&["--admin-user", "admin"], &[], &["--admin-password"]),
        (&["--argon2-memory-kib", "1"], &[], &["--argon2-memory-kib"]),
        (&["--argon2-memory-kib", "8"], &[], &["--argon2-memory-kib"]),
        // A password on the command line is readable by every local user (/proc/<pid>/cmdline).
        (
            &["--admin-password", "hunter22"],
            &[],
            &["--admin-password"],
        ),
        (
            &["--database-url", "mysql://db/keygate"],
            &[],
            &["database URL", "postgres://"],
        ),
    ];
    for (args, env, needles) in cases {
        let mut command = keygate_command(dir.path());
        // Were a bad value accepted, the server would only ever listen on loopback.
        for (variable, value) in [
            ("KEYGATE_LISTEN", "127.0.0.1:0"),
            ("KEYGATE_ADMIN_LISTEN", "127.0.0.1:0"),
            ("KEYGATE_METRICS_LISTEN", "127.0.0.1:0"),
        ] {
            command.env(variable, value);
        }
        command.envs(env.iter().copied()).args(args);
        let failed = run(command, None).await;
        assert!(!failed.success(), "{args:?} {env:?}: {failed}");
        for needle in needles {
            assert!(failed.stderr.contains(needle), "{args:?} {env:?}: {failed}");
        }
    }
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "a failed start-up created files"
    );
}

/// A bare `keygate` (no subcommand, no database setting) in `working_dir`, on free loopback
/// ports, logging at debug level to `log`.
fn bare_keygate(working_dir: &Path, log: &Path) -> KeygateProcess {
    let addrs = [free_addr(), free_addr(), free_addr()];
    KeygateProcess::start(working_dir, log, &[], addrs, &[("RUST_LOG", "debug")])
}

/// Issue #5: one command, no database configured, and keys survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_keygate_keeps_its_keys_in_keygate_db_in_its_working_directory() {
    let dir = temp_dir();
    let logs = temp_dir();
    let log = logs.path().join("keygate.log");
    let op = operator();
    let op = Some(op.as_str());

    let mut server = bare_keygate(dir.path(), &log);
    server.wait_serving().await;
    let created = call_ok(
        server.admin,
        op,
        "keygate.v1.KeyAdmin/CreateKey",
        json!({"name": "survivor"}),
    )
    .await;
    let id = int64(&created["key"]["id"]);
    let secret = created["secret"].as_str().expect("secret").to_owned();
    let authorize = |addr, header: String| async move {
        call_ok(
            addr,
            None,
            "keygate.v1.Authorizer/Authorize",
            json!({"authorization": header}),
        )
        .await
    };
    let allowed = authorize(server.main, bearer(&secret)).await;
    assert_eq!(allowed["allowed"], true, "{allowed}");
    assert_eq!(int64(&allowed["keyId"]), id);
    let mode = call_ok(
        server.admin,
        op,
        "keygate.v1.KeyAdmin/GetAuthMode",
        json!({}),
    )
    .await;
    assert_eq!(mode["apiKeysEnabled"], true);
    server.stop().await;

    assert!(
        dir.path().join("keygate.db").is_file(),
        "no keygate.db in the working directory: {:?}",
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect::<Vec<_>>()
    );

    let mut server = bare_keygate(dir.path(), &log);
    server.wait_serving().await;
    let got = call_ok(
        server.admin,
        op,
        "keygate.v1.KeyAdmin/GetKey",
        json!({"id": id}),
    )
    .await;
    // The use before the restart was written at the latest on shutdown.
    let mut got = got;
    let last_used = got
        .as_object_mut()
        .unwrap()
        .remove("lastUsedAt")
        .unwrap_or_else(|| panic!("last_used_at was not written before the exit: {got}"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(last_used.as_str().unwrap()).is_ok(),
        "{last_used}"
    );
    assert_eq!(got, created["key"]);
    assert_eq!(
        call_ok(
            server.admin,
            op,
            "keygate.v1.KeyAdmin/GetAuthMode",
            json!({})
        )
        .await,
        mode
    );
    let allowed = authorize(server.main, bearer(&secret)).await;
    assert_eq!(allowed["allowed"], true, "{allowed}");
    let denied = authorize(server.main, basic(ADMIN_USER, ADMIN_PASSWORD)).await;
    assert_eq!(
        denied["reason"], "INVALID_CREDENTIALS",
        "the lockout survived"
    );
    let wrong = call(
        server.admin,
        Some(&basic(ADMIN_USER, "wrong")),
        "keygate.v1.KeyAdmin/GetAuthMode",
        json!({}),
    )
    .await;
    assert!(wrong.stderr.contains("Unauthenticated"), "{wrong}");
    let log = server.stop().await;

    // Even at debug level, neither the key nor the password reaches the log.
    assert!(log.contains("keygate listening"), "{log}");
    for secret_text in [
        secret.as_str(),
        &secret[secret.len() - 40..],
        ADMIN_PASSWORD,
    ] {
        assert!(!log.contains(secret_text), "the log contains a secret");
    }
}
