//! Stock grpcurl against keygate, through server reflection only (no .proto files): what an
//! operator following the README does (SPEC section 4).

use std::{collections::BTreeSet, net::SocketAddr, process::Command};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::{
    both_backends,
    helpers::{ADMIN_PASSWORD, ADMIN_USER, TestBackend, basic, bearer, spawn_app, tool},
    processes::{Finished, run},
};

/// Runs grpcurl with `args` (plaintext, bounded in time, clean environment).
pub async fn grpcurl(args: &[&str]) -> Finished {
    let mut command = Command::new(tool("grpcurl"));
    command
        .env_clear()
        .args(["-plaintext", "-max-time", "30"])
        .args(args);
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    run(command, None).await
}

/// Calls `method` on `addr` with a JSON body and an optional `authorization` header value.
pub async fn call(
    addr: SocketAddr,
    authorization: Option<&str>,
    method: &str,
    body: Value,
) -> Finished {
    let header = authorization.map(|value| format!("authorization: {value}"));
    let body = body.to_string();
    let addr = addr.to_string();
    let mut args = Vec::new();
    if let Some(header) = &header {
        args.extend(["-H", header.as_str()]);
    }
    args.extend(["-d", body.as_str(), addr.as_str(), method]);
    grpcurl(&args).await
}

/// Calls `method` and parses its JSON answer; panics with grpcurl's output on failure.
pub async fn call_ok(
    addr: SocketAddr,
    authorization: Option<&str>,
    method: &str,
    body: Value,
) -> Value {
    let finished = call(addr, authorization, method, body)
        .await
        .expect_success(method);
    serde_json::from_str(&finished.stdout)
        .unwrap_or_else(|e| panic!("{method} printed no JSON ({e}): {finished}"))
}

pub fn operator() -> String {
    basic(ADMIN_USER, ADMIN_PASSWORD)
}

/// An int64 as grpcurl prints it (a JSON string, per the proto3 JSON mapping).
pub fn int64(value: &Value) -> i64 {
    value
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("not an int64: {value}"))
}

fn rfc3339(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(value.as_str().expect("a timestamp string"))
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

async fn listed_services(addr: SocketAddr) -> BTreeSet<String> {
    let finished = grpcurl(&[&addr.to_string(), "list"])
        .await
        .expect_success("grpcurl list");
    finished.stdout.lines().map(str::to_owned).collect()
}

async fn reflection_shows_each_listeners_services(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        listed_services(app.admin_addr).await,
        set(&[
            "keygate.v1.KeyAdmin",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ])
    );
    assert_eq!(
        listed_services(app.main_addr).await,
        set(&[
            "keygate.v1.Authorizer",
            "envoy.service.auth.v3.Authorization",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ])
    );

    let admin = app.admin_addr.to_string();
    let described = grpcurl(&[&admin, "describe", "keygate.v1.KeyAdmin"])
        .await
        .expect_success("describe KeyAdmin");
    for rpc in [
        "rpc CreateKey ( .keygate.v1.CreateKeyRequest ) returns ( .keygate.v1.CreateKeyResponse )",
        "rpc GetKey ( .keygate.v1.GetKeyRequest ) returns ( .keygate.v1.ApiKey )",
        "rpc ListKeys ( .keygate.v1.ListKeysRequest ) returns ( .keygate.v1.ListKeysResponse )",
        "rpc SetKeyEnabled ( .keygate.v1.SetKeyEnabledRequest ) returns ( .keygate.v1.ApiKey )",
        "rpc DeleteKey ( .keygate.v1.DeleteKeyRequest ) returns ( .keygate.v1.DeleteKeyResponse )",
        "rpc GetAuthMode ( .keygate.v1.GetAuthModeRequest ) returns ( .keygate.v1.AuthMode )",
    ] {
        assert!(described.stdout.contains(rpc), "{rpc} missing: {described}");
    }
    let api_key = grpcurl(&[&admin, "describe", "keygate.v1.ApiKey"])
        .await
        .expect_success("describe ApiKey");
    for field in [
        "int64 id = 1;",
        "string name = 2;",
        ".google.protobuf.Timestamp created_at = 3;",
        ".google.protobuf.Timestamp expires_at = 4;",
        "bool enabled = 5;",
        ".keygate.v1.KeyStatus status = 6;",
        ".google.protobuf.Timestamp last_used_at = 7;",
        "string created_by = 8;",
    ] {
        assert!(api_key.stdout.contains(field), "{field} missing: {api_key}");
    }
    let main = app.main_addr.to_string();
    let check = grpcurl(&[&main, "describe", "envoy.service.auth.v3.Authorization"])
        .await
        .expect_success("describe Authorization");
    assert!(check.stdout.contains("rpc Check"), "{check}");
    let authorize = grpcurl(&[&main, "describe", "keygate.v1.Authorizer"])
        .await
        .expect_success("describe Authorizer");
    assert!(authorize.stdout.contains("rpc Authorize"), "{authorize}");
}

async fn key_admin_through_grpcurl(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let admin = app.admin_addr;
    let op = operator();
    let op = Some(op.as_str());
    let service = |rpc: &str| format!("keygate.v1.KeyAdmin/{rpc}");

    let mode = call_ok(admin, op, &service("GetAuthMode"), json!({})).await;
    assert_eq!(
        mode,
        json!({}),
        "false and unset are omitted in proto3 JSON"
    );

    let created = call_ok(
        admin,
        op,
        &service("CreateKey"),
        json!({"name": "  grpcurl  "}),
    )
    .await;
    let key = &created["key"];
    let id = int64(&key["id"]);
    assert_eq!(key["name"], "grpcurl");
    assert_eq!(key["status"], "ACTIVE");
    assert_eq!(key["enabled"], true);
    assert_eq!(key["createdBy"], ADMIN_USER);
    assert!(key.get("expiresAt").is_none(), "{created}");
    assert!(key.get("lastUsedAt").is_none(), "{created}");
    let secret = created["secret"].as_str().expect("secret").to_owned();
    assert!(secret.starts_with(&format!("uk{id}_")), "{secret}");

    let expiry = (Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let expiring = call_ok(
        admin,
        op,
        &service("CreateKey"),
        json!({"name": "with expiry", "expires_at": expiry}),
    )
    .await;
    let expiring_id = int64(&expiring["key"]["id"]);
    assert_eq!(
        rfc3339(&expiring["key"]["expiresAt"]),
        rfc3339(&json!(expiry))
    );
    assert_eq!(expiring["key"]["status"], "ACTIVE");

    let got = call_ok(admin, op, &service("GetKey"), json!({"id": id})).await;
    assert_eq!(got, *key);
    assert!(!got.to_string().contains(&secret[secret.len() - 40..]));

    let listed = call_ok(admin, op, &service("ListKeys"), json!({})).await;
    let ids: Vec<i64> = listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| int64(&k["id"]))
        .collect();
    assert_eq!(ids, vec![id, expiring_id]);
    let paged = call_ok(admin, op, &service("ListKeys"), json!({"page_size": 1})).await;
    assert_eq!(paged["keys"].as_array().unwrap().len(), 1);
    let token = paged["nextPageToken"].as_str().expect("a next page token");
    let rest = call_ok(
        admin,
        op,
        &service("ListKeys"),
        json!({"page_size": 1, "page_token": token}),
    )
    .await;
    assert_eq!(int64(&rest["keys"][0]["id"]), expiring_id);

    let disabled = call_ok(
        admin,
        op,
        &service("SetKeyEnabled"),
        json!({"id": id, "enabled": false}),
    )
    .await;
    assert_eq!(disabled["status"], "DISABLED");
    assert!(disabled.get("enabled").is_none(), "{disabled}");
    let enabled = call_ok(
        admin,
        op,
        &service("SetKeyEnabled"),
        json!({"id": id.to_string(), "enabled": true}),
    )
    .await;
    assert_eq!(enabled["status"], "ACTIVE");

    let mode = call_ok(admin, op, &service("GetAuthMode"), json!({})).await;
    assert_eq!(mode["apiKeysEnabled"], true);
    rfc3339(&mode["lockedAt"]);

    // The key works through grpcurl on the main listener, both schemes.
    for header in [bearer(&secret), basic("", &secret)] {
        let answer = call_ok(
            app.main_addr,
            None,
            "keygate.v1.Authorizer/Authorize",
            json!({"authorization": header}),
        )
        .await;
        assert_eq!(answer["allowed"], true, "{answer}");
        assert_eq!(int64(&answer["keyId"]), id);
        assert_eq!(answer["keyName"], "grpcurl");
    }
    let denied = call_ok(
        app.main_addr,
        None,
        "keygate.v1.Authorizer/Authorize",
        json!({"authorization": operator()}),
    )
    .await;
    assert_eq!(denied, json!({"reason": "INVALID_CREDENTIALS"}));

    let deleted = call_ok(admin, op, &service("DeleteKey"), json!({"id": id})).await;
    assert_eq!(deleted, json!({}));
    let gone = call(admin, op, &service("GetKey"), json!({"id": id})).await;
    assert!(!gone.success());
    assert!(gone.stderr.contains("NotFound"), "{gone}");
    let invalid = call(admin, op, &service("CreateKey"), json!({"name": ""})).await;
    assert!(!invalid.success());
    assert!(invalid.stderr.contains("InvalidArgument"), "{invalid}");
    assert!(
        invalid.stderr.contains("name must not be empty"),
        "{invalid}"
    );

    // Wrong, missing or key credentials: a failing exit status and Unauthenticated.
    let wrong = basic(ADMIN_USER, "wrong password");
    let key_as_password = basic("", &secret);
    for authorization in [Some(wrong.as_str()), None, Some(key_as_password.as_str())] {
        for (rpc, body) in [
            ("GetAuthMode", json!({})),
            ("ListKeys", json!({})),
            ("CreateKey", json!({"name": "intruder"})),
            ("DeleteKey", json!({"id": expiring_id})),
        ] {
            let refused = call(admin, authorization, &service(rpc), body).await;
            assert!(!refused.success(), "{rpc}: {refused}");
            assert!(
                refused.stderr.contains("Unauthenticated"),
                "{rpc}: {refused}"
            );
        }
    }
    let left = call_ok(admin, op, &service("ListKeys"), json!({})).await;
    assert_eq!(left["keys"].as_array().unwrap().len(), 1, "{left}");
}

both_backends!(
    reflection_shows_each_listeners_services,
    key_admin_through_grpcurl,
);
