//! No secret leaks (issue 6, item 4): the whole scenario (operator login before the lockout,
//! a wrong admin password, `keygate user add`, CreateKey, good and bad keys over Authorize and
//! Check, `keygate keys list`) against the keygate binary with RUST_LOG=trace, in text and in
//! JSON. No clear key, key secret, password or argon2 hash may appear in any log line, any
//! error message, or the Debug output of the domain records.

use std::time::Duration;

use base64::Engine as _;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest,
    attribute_context::{HttpRequest, Request as AttributeRequest},
    authorization_client::AuthorizationClient,
};
use keygate::{
    domain::{
        credentials::parse_authorization,
        digest::SecretDigest,
        key::{KeyPrefix, parse_key},
        model::StoredSecret,
    },
    grpc::proto::{
        AuthorizeRequest, CreateKeyRequest, GetKeyRequest, authorizer_client::AuthorizerClient,
    },
};
use tonic::Status;

use crate::{
    both_backends,
    helpers::{
        ADMIN_PASSWORD, ADMIN_USER, TestBackend, admin_client, basic, bearer, channel,
        test_settings,
    },
    processes::{KeygateProcess, free_addr, keygate_command, run},
};

const WRONG_PASSWORD: &str = "Tr0ub4dor&3-wrong-guess";
const NEW_USER: &str = "bob";
const NEW_PASSWORD: &str = "bobs very own passphrase 42";

/// Everything a run printed or answered, to search for secrets.
#[derive(Default)]
struct Transcript {
    texts: Vec<(String, String)>,
}

impl Transcript {
    fn add(&mut self, source: impl Into<String>, text: impl Into<String>) {
        self.texts.push((source.into(), text.into()));
    }

    fn status(&mut self, source: &str, status: &Status) {
        self.add(source, format!("{status:?} {}", status.message()));
    }

    fn assert_free_of(&self, secrets: &[(&str, String)]) {
        for (source, text) in &self.texts {
            for (name, secret) in secrets {
                assert!(!secret.is_empty());
                if let Some(at) = text.find(secret.as_str()) {
                    let line = text[..at].rsplit('\n').next().unwrap_or_default();
                    panic!("{source} contains the {name}: …{line}[{name}]…");
                }
            }
        }
    }
}

fn b64(text: &str) -> String {
    b64_bytes(text.as_bytes())
}

fn b64_bytes(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn scenario(backend: TestBackend, format: &str) {
    let dir = tempfile::tempdir().unwrap();
    let url = backend.url();
    let env = [("RUST_LOG", "trace"), ("KEYGATE_LOG_FORMAT", format)];
    let mut keygate = KeygateProcess::serve(
        dir.path(),
        "keygate",
        &url,
        [free_addr(), free_addr(), free_addr()],
        &env,
    );
    keygate.wait_serving().await;
    let mut transcript = Transcript::default();
    let mut authorizer = AuthorizerClient::new(channel(keygate.main).await);
    let mut authorize = async |header: String| {
        authorizer
            .authorize(AuthorizeRequest {
                authorization: header.into(),
                client_address: "192.0.2.10".into(),
            })
            .await
            .map(|response| response.into_inner())
    };

    // Before the lockout: operators' passwords over Authorize.
    assert!(
        authorize(basic(ADMIN_USER, ADMIN_PASSWORD))
            .await
            .unwrap()
            .allowed
    );
    assert!(
        !authorize(basic(ADMIN_USER, WRONG_PASSWORD))
            .await
            .unwrap()
            .allowed
    );

    // KeyAdmin with a wrong password.
    let refused = admin_client(keygate.admin, Some((ADMIN_USER, WRONG_PASSWORD)))
        .await
        .get_key(GetKeyRequest { id: 1 })
        .await
        .expect_err("wrong password");
    transcript.status("KeyAdmin error (wrong password)", &refused);

    // `keygate user add` reads the password from stdin.
    let mut add = keygate_command(dir.path());
    add.args(["user", "add", NEW_USER, "--database-url", &url])
        .env("RUST_LOG", "trace")
        .env("KEYGATE_LOG_FORMAT", format);
    let added = run(add, Some(&format!("{NEW_PASSWORD}\n")))
        .await
        .expect_success("keygate user add");
    transcript.add(
        "`keygate user add` output",
        format!("{}{}", added.stdout, added.stderr),
    );

    // A key, used well and badly, over Authorize and Check.
    let mut admin = admin_client(keygate.admin, Some((ADMIN_USER, ADMIN_PASSWORD))).await;
    let created = admin
        .create_key(CreateKeyRequest {
            name: "leak test".into(),
            expires_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    let key = created.secret.clone();
    let id = created.key.as_ref().unwrap().id;
    let random = key.split_once('_').unwrap().1[..34].to_owned();
    let wrong_secret = {
        let body = format!("uk{id}_{}", "W".repeat(34));
        format!("{body}{}", keygate::domain::key::checksum(&body))
    };
    let mistyped = format!(
        "{}{}",
        &key[..key.len() - 1],
        if key.ends_with('a') { 'b' } else { 'a' }
    );
    for (header, allowed) in [
        (bearer(&key), true),
        (basic("", &key), true),
        (bearer(&wrong_secret), false),
        (bearer(&mistyped), false),
        (basic(NEW_USER, NEW_PASSWORD), false),
        (basic(ADMIN_USER, ADMIN_PASSWORD), false),
    ] {
        assert_eq!(authorize(header).await.unwrap().allowed, allowed);
    }
    let mut check = AuthorizationClient::new(channel(keygate.main).await);
    for header in [bearer(&key), bearer(&wrong_secret)] {
        let response = check
            .check(CheckRequest {
                attributes: Some(AttributeContext {
                    request: Some(AttributeRequest {
                        http: Some(HttpRequest {
                            headers: [("authorization".to_owned(), header)].into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        transcript.add("Check response", format!("{response:?}"));
    }
    let missing = admin
        .get_key(GetKeyRequest { id: id + 1 })
        .await
        .unwrap_err();
    transcript.status("KeyAdmin error (not found)", &missing);
    let fetched = admin
        .get_key(GetKeyRequest { id })
        .await
        .unwrap()
        .into_inner();
    transcript.add("GetKey response", format!("{fetched:?}"));

    // `keygate keys list` as a KeyAdmin client.
    let mut list = keygate_command(dir.path());
    list.args([
        "keys",
        "list",
        "--admin-addr",
        &format!("http://{}", keygate.admin),
    ])
    .env("KEYGATE_PASSWORD", ADMIN_PASSWORD)
    .env("RUST_LOG", "trace")
    .env("KEYGATE_LOG_FORMAT", format);
    let listed = run(list, None).await.expect_success("keygate keys list");
    transcript.add(
        "`keygate keys list` output",
        format!("{}{}", listed.stdout, listed.stderr),
    );

    // The domain records' Debug output.
    let store = backend.store().await;
    let record = store.get_key(id).await.unwrap().unwrap();
    let StoredSecret::Digest(digest) = &record.secret else {
        panic!("a new key is stored as its digest: {record:?}");
    };
    assert_eq!(*digest, SecretDigest::of(&key));
    let digest_hex: String = digest
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    transcript.add("KeyRecord Debug", format!("{record:?} {record:#?}"));
    let user = store.find_user(NEW_USER).await.unwrap().unwrap();
    transcript.add("UserRecord Debug", format!("{user:?} {user:#?}"));
    let header = bearer(&key);
    let credentials = parse_authorization(Some(header.as_bytes())).unwrap();
    transcript.add("Credentials Debug", format!("{credentials:?}"));
    let header = basic(NEW_USER, NEW_PASSWORD);
    let credentials = parse_authorization(Some(header.as_bytes())).unwrap();
    transcript.add("Credentials Debug", format!("{credentials:?}"));
    let prefix = KeyPrefix::parse("uk").unwrap();
    transcript.add(
        "ParsedKey Debug",
        format!("{:?}", parse_key(&prefix, &key).unwrap()),
    );
    let material = keygate::domain::key::KeyMaterial::generate();
    transcript.add("KeyMaterial Debug", format!("{material:?}"));
    let mut settings = test_settings();
    settings.database_url = url.clone();
    transcript.add("Settings Debug", format!("{settings:?}"));

    // The logs, after a graceful stop.
    let status = keygate.process.terminate(Duration::from_secs(30)).await;
    assert!(status.success());
    let log = keygate.process.log();
    match format {
        "json" => {
            for line in log.lines().filter(|l| !l.trim().is_empty()) {
                let event: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                assert!(event.get("level").is_some(), "{line}");
            }
            assert!(
                log.contains(r#""level":"TRACE""#),
                "RUST_LOG=trace had no effect"
            );
        }
        _ => assert!(log.contains("TRACE"), "RUST_LOG=trace had no effect"),
    }
    assert!(
        log.contains("INVALID_CREDENTIALS"),
        "the denies were not logged"
    );
    transcript.add(format!("keygate's {format} log"), log.clone());

    transcript.assert_free_of(&[
        ("clear key", key.clone()),
        ("key's random part", random),
        (
            "wrong key secret",
            wrong_secret[wrong_secret.len() - 40..].to_owned(),
        ),
        ("admin password", ADMIN_PASSWORD.to_owned()),
        ("wrong password", WRONG_PASSWORD.to_owned()),
        ("new user's password", NEW_PASSWORD.to_owned()),
        (
            "Basic header of the admin",
            b64(&format!("{ADMIN_USER}:{ADMIN_PASSWORD}")),
        ),
        ("Basic header with a key", b64(&format!(":{key}"))),
        ("argon2 hash", "$argon2id$".to_owned()),
        ("key digest (hex)", digest_hex.clone()),
        ("key digest (HEX)", digest_hex.to_uppercase()),
        ("key digest (base64)", b64_bytes(digest.as_bytes())),
        ("key digest (bytes)", format!("{:?}", digest.as_bytes())),
        ("password hash", user.password_hash.clone()),
    ]);
    eprintln!(
        "secret leak figures ({format}, {}): {} log lines, {} bytes searched",
        if backend.is_postgres() {
            "postgres"
        } else {
            "sqlite"
        },
        log.lines().count(),
        transcript.texts.iter().map(|(_, t)| t.len()).sum::<usize>()
    );
}

async fn no_secret_in_text_logs(backend: TestBackend) {
    scenario(backend, "text").await
}

async fn no_secret_in_json_logs(backend: TestBackend) {
    scenario(backend, "json").await
}

both_backends!(no_secret_in_text_logs, no_secret_in_json_logs);
