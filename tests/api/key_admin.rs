//! KeyAdmin over real gRPC (SPEC section 4): every RPC, every error code, the store left
//! unchanged by every failed call, and operator authentication on every RPC.

use std::time::Duration;

use chrono::{DateTime, Utc};
use keygate::grpc::proto::{
    ApiKey, CreateKeyRequest, DeleteKeyRequest, DenyReason, GetAuthModeRequest, GetKeyRequest,
    KeyStatus, ListKeysRequest, SetKeyEnabledRequest,
};
use prost::Message;
use tonic::{Code, Status};

use crate::{
    both_backends,
    helpers::{
        ADMIN_PASSWORD, ADMIN_USER, AdminClient, TestApp, TestBackend, admin_client,
        admin_client_with_header, assert_error, basic, bearer, eventually, spawn_app, timestamp_in,
    },
};

/// Every key, following next_page_token.
pub async fn all_keys(admin: &AdminClient) -> Vec<ApiKey> {
    let mut keys = Vec::new();
    let mut page_token = String::new();
    for _ in 0..1000 {
        let page = admin
            .clone()
            .list_keys(ListKeysRequest {
                page_size: 0,
                page_token,
            })
            .await
            .expect("ListKeys")
            .into_inner();
        keys.extend(page.keys);
        if page.next_page_token.is_empty() {
            return keys;
        }
        page_token = page.next_page_token;
    }
    panic!("ListKeys never ended");
}

pub fn to_time(ts: &prost_types::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(ts.seconds, ts.nanos as u32).expect("a valid timestamp")
}

fn status_of(key: &ApiKey) -> KeyStatus {
    KeyStatus::try_from(key.status).expect("a known KeyStatus")
}

async fn create_key_returns_the_clear_key_exactly_once(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let before = Utc::now() - chrono::Duration::seconds(2);
    let created = app
        .admin
        .clone()
        .create_key(CreateKeyRequest {
            name: "  prometheus scraper \t".into(),
            expires_at: None,
        })
        .await
        .expect("CreateKey")
        .into_inner();
    let after = Utc::now() + chrono::Duration::seconds(2);
    let key = created.key.clone().expect("key");
    assert!(key.id > 0);
    assert_eq!(key.name, "prometheus scraper", "the name is trimmed");
    let created_at = to_time(key.created_at.as_ref().expect("created_at"));
    assert!(
        (before..=after).contains(&created_at),
        "created_at {created_at}"
    );
    assert_eq!(key.expires_at, None);
    assert!(key.enabled);
    assert_eq!(status_of(&key), KeyStatus::Active);
    assert_eq!(key.last_used_at, None);
    assert_eq!(key.created_by, ADMIN_USER);

    // The whole clear key: uk<id>_ + 34 random + 6 checksum characters of [A-Za-z0-9].
    let secret = &created.secret;
    let body = secret
        .strip_prefix(&format!("uk{}_", key.id))
        .unwrap_or_else(|| panic!("key {} should start with uk{}_", secret.len(), key.id));
    assert_eq!(body.len(), 40);
    assert!(body.bytes().all(|b| b.is_ascii_alphanumeric()));
    let (signed, checksum) = secret.split_at(secret.len() - 6);
    assert_eq!(checksum, keygate::domain::key::checksum(signed));
    let random = &body[..34];

    // GetKey and ListKeys return the same record and never the secret, in no field.
    let fetched = app
        .admin
        .clone()
        .get_key(GetKeyRequest { id: key.id })
        .await
        .expect("GetKey")
        .into_inner();
    assert_eq!(fetched, key);
    let listed = app
        .admin
        .clone()
        .list_keys(ListKeysRequest::default())
        .await
        .expect("ListKeys")
        .into_inner();
    assert_eq!(listed.keys, vec![key.clone()]);
    for bytes in [fetched.encode_to_vec(), listed.encode_to_vec()] {
        assert!(
            !bytes.windows(random.len()).any(|w| w == random.as_bytes()),
            "the secret must not come back"
        );
    }

    // With an expiry: kept to the microsecond (what both stores hold).
    let mut expires_at = timestamp_in(3600);
    expires_at.nanos = 123_456_789;
    let (expiring, expiring_secret) = app.create_key_expiring("expiring", Some(expires_at)).await;
    assert_eq!(
        expiring.expires_at,
        Some(prost_types::Timestamp {
            seconds: expires_at.seconds,
            nanos: 123_456_000,
        })
    );
    assert_eq!(status_of(&expiring), KeyStatus::Active);
    assert!(expiring.id > key.id);
    assert_ne!(expiring_secret, created.secret);
    let fetched = app
        .admin
        .clone()
        .get_key(GetKeyRequest { id: expiring.id })
        .await
        .expect("GetKey")
        .into_inner();
    assert_eq!(fetched, expiring);

    // The latest expiry protobuf can carry round-trips through both stores.
    let (far, _) = app
        .create_key_expiring(
            "far future",
            Some(prost_types::Timestamp {
                seconds: 253_402_300_799,
                nanos: 999_999_999,
            }),
        )
        .await;
    let far_expiry = prost_types::Timestamp {
        seconds: 253_402_300_799,
        nanos: 999_999_000,
    };
    assert_eq!(far.expires_at, Some(far_expiry));
    let fetched = app
        .admin
        .clone()
        .get_key(GetKeyRequest { id: far.id })
        .await
        .expect("GetKey")
        .into_inner();
    assert_eq!(fetched, far);

    // 128 characters (not bytes) is the limit, on both stores.
    let (long, _) = app.create_key(&"é".repeat(128)).await;
    assert_eq!(long.name.chars().count(), 128);

    // Both keys work.
    for (secret, id) in [(&created.secret, key.id), (&expiring_secret, expiring.id)] {
        let allowed = app.authorize(&bearer(secret)).await;
        assert!(allowed.allowed, "{allowed:?}");
        assert_eq!(allowed.key_id, id);
    }
}

async fn bad_arguments_are_invalid_argument_and_change_nothing(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let admin = app.admin.clone();
    let mode = |admin: AdminClient| async move {
        admin
            .clone()
            .get_auth_mode(GetAuthModeRequest {})
            .await
            .expect("GetAuthMode")
            .into_inner()
    };
    // Failed creations on a new install must not set the lockout flag either.
    let create = |name: &str, expires_at| {
        let mut admin = admin.clone();
        let name = name.to_owned();
        async move {
            admin
                .create_key(CreateKeyRequest { name, expires_at })
                .await
        }
    };
    let check_creates = || async {
        assert_error(
            create("", None).await,
            Code::InvalidArgument,
            &["name", "empty"],
        );
        assert_error(
            create(" \t  ", None).await,
            Code::InvalidArgument,
            &["name", "empty"],
        );
        assert_error(
            create(&"n".repeat(129), None).await,
            Code::InvalidArgument,
            &["name", "at most 128"],
        );
        assert_error(
            create(&"é".repeat(129), None).await,
            Code::InvalidArgument,
            &["name", "at most 128"],
        );
        for control in [
            "bell\u{7}",
            "line\nbreak",
            "tab\tinside",
            "nul\0",
            "del\u{7f}",
            "line\u{2028}separator",
            "right-to-left \u{202E}override",
        ] {
            assert_error(
                create(control, None).await,
                Code::InvalidArgument,
                &["name", "control"],
            );
        }
        assert_error(
            create("past", Some(timestamp_in(-60))).await,
            Code::InvalidArgument,
            &["expires_at", "future"],
        );
        assert_error(
            create("now", Some(timestamp_in(0))).await,
            Code::InvalidArgument,
            &["expires_at", "future"],
        );
        for nanos in [-1, 1_000_000_000] {
            let mut at = timestamp_in(3600);
            at.nanos = nanos;
            assert_error(
                create("bad nanos", Some(at)).await,
                Code::InvalidArgument,
                &["expires_at", "nanos"],
            );
        }
        for seconds in [i64::MAX, i64::MIN] {
            assert_error(
                create(
                    "out of range",
                    Some(prost_types::Timestamp { seconds, nanos: 0 }),
                )
                .await,
                Code::InvalidArgument,
                &["expires_at"],
            );
        }
    };
    check_creates().await;
    let fresh = mode(admin.clone()).await;
    assert!(!fresh.api_keys_enabled, "{fresh:?}");
    assert_eq!(fresh.locked_at, None);
    assert!(all_keys(&admin).await.is_empty());

    let (key, _) = app.create_key("existing").await;
    app.set_enabled(key.id, false).await;
    let keys_before = all_keys(&admin).await;
    let mode_before = mode(admin.clone()).await;

    check_creates().await;
    for id in [0, -1, i64::MIN] {
        let needles = ["id must be a positive integer"];
        assert_error(
            admin.clone().get_key(GetKeyRequest { id }).await,
            Code::InvalidArgument,
            &needles,
        );
        assert_error(
            admin
                .clone()
                .set_key_enabled(SetKeyEnabledRequest { id, enabled: true })
                .await,
            Code::InvalidArgument,
            &needles,
        );
        assert_error(
            admin.clone().delete_key(DeleteKeyRequest { id }).await,
            Code::InvalidArgument,
            &needles,
        );
    }
    for page_size in [-1, i32::MIN] {
        assert_error(
            admin
                .clone()
                .list_keys(ListKeysRequest {
                    page_size,
                    page_token: String::new(),
                })
                .await,
            Code::InvalidArgument,
            &["page_size"],
        );
    }
    for page_token in ["garbage", "after:1", "YWZ0ZXI6LTE", "!!", &"A".repeat(200)] {
        assert_error(
            admin
                .clone()
                .list_keys(ListKeysRequest {
                    page_size: 10,
                    page_token: page_token.to_owned(),
                })
                .await,
            Code::InvalidArgument,
            &["page_token"],
        );
    }
    // Unknown ids.
    for unknown in [key.id + 1000, i64::MAX] {
        let needle = unknown.to_string();
        assert_error(
            admin.clone().get_key(GetKeyRequest { id: unknown }).await,
            Code::NotFound,
            &[&needle],
        );
        for enabled in [true, false] {
            assert_error(
                admin
                    .clone()
                    .set_key_enabled(SetKeyEnabledRequest {
                        id: unknown,
                        enabled,
                    })
                    .await,
                Code::NotFound,
                &[&needle],
            );
        }
        assert_error(
            admin
                .clone()
                .delete_key(DeleteKeyRequest { id: unknown })
                .await,
            Code::NotFound,
            &[&needle],
        );
    }

    assert_eq!(all_keys(&admin).await, keys_before);
    assert_eq!(mode(admin.clone()).await, mode_before);
    // An unknown id stays unknown: a later key does not get it by accident of the failed calls.
    let (next, _) = app.create_key("next").await;
    assert_eq!(next.id, key.id + 1, "no id was consumed by a failed call");
}

async fn list_keys_pages_by_id(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let mut created = Vec::new();
    for n in 0..7 {
        created.push(app.create_key(&format!("key {n}")).await.0);
    }
    let ids: Vec<i64> = created.iter().map(|key| key.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    let mut admin = app.admin.clone();
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_keys(ListKeysRequest {
                page_size: 3,
                page_token: page_token.clone(),
            })
            .await
            .expect("ListKeys")
            .into_inner();
        pages.push(page.keys.iter().map(|key| key.id).collect::<Vec<_>>());
        assert!(pages.len() <= 3, "too many pages: {pages:?}");
        if page.next_page_token.is_empty() {
            break;
        }
        assert_ne!(page.next_page_token, page_token);
        page_token = page.next_page_token;
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![3, 3, 1]
    );
    assert_eq!(pages.concat(), ids);

    // page_size 0 is the default (100), a huge one is capped: one page, no token.
    for page_size in [0, 7, 1000, i32::MAX] {
        let page = admin
            .list_keys(ListKeysRequest {
                page_size,
                page_token: String::new(),
            })
            .await
            .expect("ListKeys")
            .into_inner();
        assert_eq!(page.keys, created, "page_size {page_size}");
        assert_eq!(page.next_page_token, "", "page_size {page_size}");
    }
    // Exactly a page's worth: the last page is full and says so.
    let page = admin
        .list_keys(ListKeysRequest {
            page_size: 6,
            page_token: String::new(),
        })
        .await
        .expect("ListKeys")
        .into_inner();
    assert_eq!(page.keys.len(), 6);
    let last = admin
        .list_keys(ListKeysRequest {
            page_size: 6,
            page_token: page.next_page_token,
        })
        .await
        .expect("ListKeys")
        .into_inner();
    assert_eq!(last.keys, created[6..]);
    assert_eq!(last.next_page_token, "");

    // A token stays valid when the key it points after is deleted.
    let first = admin
        .list_keys(ListKeysRequest {
            page_size: 3,
            page_token: String::new(),
        })
        .await
        .expect("ListKeys")
        .into_inner();
    admin
        .delete_key(DeleteKeyRequest { id: ids[2] })
        .await
        .expect("DeleteKey");
    let second = admin
        .list_keys(ListKeysRequest {
            page_size: 3,
            page_token: first.next_page_token,
        })
        .await
        .expect("ListKeys")
        .into_inner();
    assert_eq!(
        second.keys.iter().map(|key| key.id).collect::<Vec<_>>(),
        ids[3..6]
    );
}

async fn expired_keys_stay_listed_as_expired(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let (forever, _) = app.create_key("forever").await;
    let (soon, secret) = app.create_key_expiring("soon", Some(timestamp_in(2))).await;
    assert_eq!(status_of(&soon), KeyStatus::Active);
    let admin = app.admin.clone();
    let listed = eventually("the key expires", Duration::from_secs(30), || {
        let admin = admin.clone();
        async move {
            let keys = all_keys(&admin).await;
            let soon = keys.iter().find(|key| key.id == soon.id).cloned()?;
            (status_of(&soon) == KeyStatus::Expired).then_some(keys)
        }
    })
    .await;
    assert_eq!(listed.len(), 2, "expired keys are kept and listed");
    let forever_now = listed.iter().find(|key| key.id == forever.id).unwrap();
    assert_eq!(status_of(forever_now), KeyStatus::Active);
    let got = app
        .admin
        .clone()
        .get_key(GetKeyRequest { id: soon.id })
        .await
        .expect("GetKey")
        .into_inner();
    assert_eq!(status_of(&got), KeyStatus::Expired);
    assert!(got.enabled, "expiry is not the enabled flag");
    assert_eq!(
        app.authorize(&bearer(&secret)).await.reason(),
        DenyReason::KeyExpired
    );
    // Expiry wins over the enabled flag, both ways.
    let disabled = app.set_enabled(soon.id, false).await;
    assert_eq!(status_of(&disabled), KeyStatus::Expired);
    assert!(!disabled.enabled);
    let enabled = app.set_enabled(soon.id, true).await;
    assert_eq!(status_of(&enabled), KeyStatus::Expired);
    assert_eq!(
        app.authorize(&bearer(&secret)).await.reason(),
        DenyReason::KeyExpired
    );
}

async fn set_key_enabled_toggles_the_status(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let (key, secret) = app.create_key("toggle").await;
    let (other, _) = app.create_key("bystander").await;
    for _ in 0..2 {
        let disabled = app.set_enabled(key.id, false).await;
        assert!(!disabled.enabled);
        assert_eq!(status_of(&disabled), KeyStatus::Disabled);
        assert_eq!(
            ApiKey {
                enabled: true,
                status: KeyStatus::Active as i32,
                ..disabled.clone()
            },
            key,
            "only the flag and the status change"
        );
        let fetched = app
            .admin
            .clone()
            .get_key(GetKeyRequest { id: key.id })
            .await
            .expect("GetKey")
            .into_inner();
        assert_eq!(fetched, disabled);
        assert_eq!(
            app.authorize(&bearer(&secret)).await.reason(),
            DenyReason::KeyDisabled
        );
    }
    for _ in 0..2 {
        let enabled = app.set_enabled(key.id, true).await;
        assert!(enabled.enabled);
        assert_eq!(status_of(&enabled), KeyStatus::Active);
        assert!(app.authorize(&bearer(&secret)).await.allowed);
    }
    let untouched = app
        .admin
        .clone()
        .get_key(GetKeyRequest { id: other.id })
        .await
        .expect("GetKey")
        .into_inner();
    assert_eq!(untouched, other);
}

async fn deleted_keys_are_gone_and_their_ids_never_come_back(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let (keep, keep_secret) = app.create_key("keep").await;
    let (doomed, doomed_secret) = app.create_key("doomed").await;
    // Cached as verified before the delete: the delete must still take effect at once.
    assert!(app.authorize(&bearer(&doomed_secret)).await.allowed);

    let mut admin = app.admin.clone();
    admin
        .delete_key(DeleteKeyRequest { id: doomed.id })
        .await
        .expect("DeleteKey");
    assert_error(
        admin.get_key(GetKeyRequest { id: doomed.id }).await,
        Code::NotFound,
        &[],
    );
    assert_error(
        admin.delete_key(DeleteKeyRequest { id: doomed.id }).await,
        Code::NotFound,
        &[],
    );
    assert_error(
        admin
            .set_key_enabled(SetKeyEnabledRequest {
                id: doomed.id,
                enabled: true,
            })
            .await,
        Code::NotFound,
        &[],
    );
    assert_eq!(all_keys(&admin).await, vec![keep.clone()]);
    assert_eq!(
        app.authorize(&bearer(&doomed_secret)).await.reason(),
        DenyReason::InvalidCredentials
    );
    assert!(app.authorize(&bearer(&keep_secret)).await.allowed);

    // The deleted id was the highest: the next key still gets a new one, even after a
    // restart.
    let (next, _) = app.create_key("next").await;
    assert!(next.id > doomed.id, "{} reused", next.id);
    admin
        .delete_key(DeleteKeyRequest { id: next.id })
        .await
        .expect("DeleteKey");
    app.stop().await;
    let app = spawn_app(&backend).await;
    let (after_restart, _) = app.create_key("after restart").await;
    assert!(after_restart.id > next.id, "{} reused", after_restart.id);
    assert_eq!(
        app.authorize(&bearer(&doomed_secret)).await.reason(),
        DenyReason::InvalidCredentials
    );
}

async fn every_rpc_requires_an_operator(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let (key, secret) = app.create_key("existing").await;
    let keys_before = all_keys(&app.admin).await;
    let b64 = |text: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(text)
    };
    let wrong_password = "not the password";
    let headers = [
        basic(ADMIN_USER, wrong_password),
        basic(ADMIN_USER, ""),
        basic("nobody", ADMIN_PASSWORD),
        basic("", ADMIN_PASSWORD),
        bearer(&secret),
        basic("", &secret),
        basic(ADMIN_USER, &secret),
        bearer(ADMIN_PASSWORD),
        format!("Bearer {}", b64(&format!("{ADMIN_USER}:{ADMIN_PASSWORD}"))),
        "Basic !!!notbase64".into(),
        format!("Basic {}", b64("no colon")),
        "Basic".into(),
        format!("Digest {}", b64(&format!("{ADMIN_USER}:{ADMIN_PASSWORD}"))),
        "garbage".into(),
    ];
    let mut clients = vec![(
        "no metadata".to_owned(),
        admin_client(app.admin_addr, None).await,
    )];
    for header in headers {
        clients.push((
            header.clone(),
            admin_client_with_header(app.admin_addr, &header).await,
        ));
    }
    for (label, client) in &clients {
        let check = |result: Result<(), Status>, rpc: &str| {
            let status = result.expect_err(&format!("{rpc} with {label:?} should fail"));
            assert_eq!(status.code(), Code::Unauthenticated, "{rpc} with {label:?}");
            for secret_text in [secret.as_str(), ADMIN_PASSWORD, wrong_password] {
                assert!(
                    !status.message().contains(secret_text),
                    "{rpc}: the message echoes a credential"
                );
            }
        };
        let mut c = client.clone();
        check(
            c.create_key(CreateKeyRequest {
                name: "intruder".into(),
                expires_at: None,
            })
            .await
            .map(drop),
            "CreateKey",
        );
        check(
            c.get_key(GetKeyRequest { id: key.id }).await.map(drop),
            "GetKey",
        );
        check(
            c.list_keys(ListKeysRequest::default()).await.map(drop),
            "ListKeys",
        );
        check(
            c.set_key_enabled(SetKeyEnabledRequest {
                id: key.id,
                enabled: false,
            })
            .await
            .map(drop),
            "SetKeyEnabled",
        );
        check(
            c.delete_key(DeleteKeyRequest { id: key.id })
                .await
                .map(drop),
            "DeleteKey",
        );
        check(
            c.get_auth_mode(GetAuthModeRequest {}).await.map(drop),
            "GetAuthMode",
        );
    }
    assert_eq!(all_keys(&app.admin).await, keys_before, "nothing changed");

    // The bootstrap operator still works after all those failures, with any scheme casing,
    // on a fresh connection.
    for scheme in ["Basic", "basic", "BASIC"] {
        let header = format!(
            "{scheme} {}",
            b64(&format!("{ADMIN_USER}:{ADMIN_PASSWORD}"))
        );
        let mut operator = admin_client_with_header(app.admin_addr, &header).await;
        let fetched = operator
            .get_key(GetKeyRequest { id: key.id })
            .await
            .expect("the operator is accepted")
            .into_inner();
        assert_eq!(fetched, key);
    }
    let mut fresh = admin_client(app.admin_addr, Some((ADMIN_USER, ADMIN_PASSWORD))).await;
    let mode = fresh
        .get_auth_mode(GetAuthModeRequest {})
        .await
        .expect("GetAuthMode")
        .into_inner();
    assert!(mode.api_keys_enabled);
}

async fn last_used_at_is_set_after_a_successful_use(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let (used, secret) = app.create_key("used").await;
    let (unused, _) = app.create_key("unused").await;
    assert_eq!(used.last_used_at, None);
    let get = |app: &TestApp, id: i64| {
        let mut admin = app.admin.clone();
        async move {
            admin
                .get_key(GetKeyRequest { id })
                .await
                .expect("GetKey")
                .into_inner()
        }
    };
    assert_eq!(get(&app, used.id).await.last_used_at, None);

    // A wrong secret for `unused` (right shape and checksum) is not a use.
    let forged = {
        let signed = format!("uk{}_{}", unused.id, "B".repeat(34));
        format!("{signed}{}", keygate::domain::key::checksum(&signed))
    };
    assert_eq!(
        app.authorize(&bearer(&forged)).await.reason(),
        DenyReason::InvalidCredentials
    );
    let before = Utc::now() - chrono::Duration::seconds(1);
    assert!(app.authorize(&bearer(&secret)).await.allowed);
    let after = Utc::now() + chrono::Duration::seconds(1);

    let last_used = eventually("last_used_at is written", Duration::from_secs(20), || {
        let fetched = get(&app, used.id);
        async move { fetched.await.last_used_at }
    })
    .await;
    assert_eq!(
        last_used.nanos % 1000,
        0,
        "microseconds, as every timestamp on both stores"
    );
    let last_used = to_time(&last_used);
    assert!((before..=after).contains(&last_used), "{last_used}");
    let unused_now = get(&app, unused.id).await;
    assert_eq!(unused_now.last_used_at, None);
    assert_eq!(unused_now, unused);
    // ListKeys shows it too.
    let listed = all_keys(&app.admin).await;
    let listed_used = listed.iter().find(|key| key.id == used.id).unwrap();
    assert_eq!(
        listed_used.last_used_at.as_ref().map(to_time),
        Some(last_used)
    );
}

both_backends!(
    create_key_returns_the_clear_key_exactly_once,
    bad_arguments_are_invalid_argument_and_change_nothing,
    list_keys_pages_by_id,
    expired_keys_stay_listed_as_expired,
    set_key_enabled_toggles_the_status,
    deleted_keys_are_gone_and_their_ids_never_come_back,
    every_rpc_requires_an_operator,
    last_used_at_is_set_after_a_successful_use,
);

/// A TCP proxy in front of Postgres that the test can cut (every connection dropped, new ones
/// closed at once) and restore: the database becomes unreachable the way a network failure
/// makes it, without touching the shared Postgres server.
struct CuttableProxy {
    addr: std::net::SocketAddr,
    up: tokio::sync::watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let (up, _) = tokio::sync::watch::channel(true);
        let state = up.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*state.borrow() {
                    continue;
                }
                let mut cut = state.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { addr, up, accept }
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.set_up(false);
        self.accept.abort();
    }
}

/// SPEC 4: store down → UNAVAILABLE, on every RPC, with no SQL in the message; and back to
/// normal, with nothing half-done, once the database is reachable again. Postgres only: the
/// embedded SQLite file cannot become unreachable.
#[sqlx::test(migrations = false)]
async fn key_admin_is_unavailable_while_postgres_is_unreachable(pool: sqlx::PgPool) {
    use keygate::{app::Application, store::PostgresStore};

    let options = pool.connect_options();
    let proxy =
        CuttableProxy::start(format!("{}:{}", options.get_host(), options.get_port())).await;
    let via_proxy = (*options).clone().host("127.0.0.1").port(proxy.addr.port());
    // The pool settings of PostgresStore::connect, through the proxy.
    let store_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(via_proxy);
    let store = std::sync::Arc::new(PostgresStore::from_pool(store_pool, "via proxy".into()));
    let app = Application::build_with_store(crate::helpers::test_settings(), store)
        .await
        .expect("build keygate");
    let admin_addr = app.admin_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    crate::helpers::wait_until_serving(admin_addr).await;
    let admin = admin_client(admin_addr, Some((ADMIN_USER, ADMIN_PASSWORD))).await;
    let (key, _) = {
        let created = admin
            .clone()
            .create_key(CreateKeyRequest {
                name: "before the outage".into(),
                expires_at: None,
            })
            .await
            .expect("CreateKey")
            .into_inner();
        (created.key.unwrap(), created.secret)
    };
    let keys_before = all_keys(&admin).await;

    proxy.set_up(false);
    let mut calls = tokio::task::JoinSet::new();
    let id = key.id;
    macro_rules! spawn_call {
        ($name:literal, |$c:ident| $call:expr) => {{
            let mut $c = admin.clone();
            calls.spawn(async move { ($name, $call.await.map(drop)) });
        }};
    }
    spawn_call!("CreateKey", |c| c.create_key(CreateKeyRequest {
        name: "during the outage".into(),
        expires_at: None,
    }));
    spawn_call!("GetKey", |c| c.get_key(GetKeyRequest { id }));
    spawn_call!("ListKeys", |c| c.list_keys(ListKeysRequest::default()));
    spawn_call!("SetKeyEnabled", |c| c
        .set_key_enabled(SetKeyEnabledRequest { id, enabled: false }));
    spawn_call!("DeleteKey", |c| c.delete_key(DeleteKeyRequest { id }));
    spawn_call!("GetAuthMode", |c| c.get_auth_mode(GetAuthModeRequest {}));
    while let Some(joined) = calls.join_next().await {
        let (rpc, result) = joined.expect("call task");
        let status = result.expect_err(rpc);
        assert_eq!(status.code(), Code::Unavailable, "{rpc}: {status:?}");
        let message = status.message().to_lowercase();
        for leak in [
            "select",
            "insert",
            "update",
            "delete from",
            "sqlx",
            "$argon2",
        ] {
            assert!(!message.contains(leak), "{rpc}: {status:?}");
        }
    }

    proxy.set_up(true);
    let keys_after = eventually("KeyAdmin recovers", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            let page = admin.list_keys(ListKeysRequest::default()).await.ok()?;
            Some(page.into_inner().keys)
        }
    })
    .await;
    assert_eq!(
        keys_after, keys_before,
        "nothing was half-done during the outage"
    );
    let _ = stop.send(());
    server
        .await
        .expect("server task")
        .expect("keygate stopped cleanly");
}
