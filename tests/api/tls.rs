//! Transport security (issue 6, item 6): TLS on the main and admin listeners, client
//! certificates (mTLS) on the admin listener, exercised with the real grpcurl, the keygate CLI
//! and Envoy with `examples/envoy-tls.yaml`. The certificates are made here with rcgen.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::{
    helpers::{ADMIN_PASSWORD, ADMIN_USER, basic, bearer, tool, wait_for},
    http::try_http_get,
    processes::{
        DemoUpstream, EnvoyProcess, KeygateProcess, envoy_socket, free_addr, keygate_command,
        render_example, run,
    },
};

/// A private CA with a server certificate for `keygate` and 127.0.0.1, an operator's client
/// certificate, and a client certificate from another CA.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn create(dir: &Path) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "keygate test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(ca.clone(), ca_key);

        let leaf = |names: Vec<String>, cn: &str, usage, issuer: &Issuer<'_, KeyPair>| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let cert = params.signed_by(&key, issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (cert, key) = leaf(
            vec!["keygate".into(), "127.0.0.1".into()],
            "keygate",
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        write("server.pem", cert);
        write("server.key", key);
        let (cert, key) = leaf(
            vec!["operator".into()],
            "operator",
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        );
        write("client.pem", cert);
        write("client.key", key);

        let rogue_key = KeyPair::generate().unwrap();
        let mut rogue = ca.clone();
        rogue.distinguished_name = rcgen::DistinguishedName::new();
        rogue
            .distinguished_name
            .push(DnType::CommonName, "rogue CA");
        let rogue = Issuer::new(rogue, rogue_key);
        let (cert, key) = leaf(
            vec!["operator".into()],
            "operator",
            ExtendedKeyUsagePurpose::ClientAuth,
            &rogue,
        );
        write("rogue.pem", cert);
        write("rogue.key", key);
        Self {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

fn grpcurl(args: &[&str]) -> Output {
    Command::new(tool("grpcurl"))
        .args(["-max-time", "10"])
        .args(args)
        .output()
        .expect("run grpcurl")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyadmin_and_check_over_tls_with_client_certificates_on_the_admin_listener() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
    let env = [
        ("KEYGATE_TLS_CERT", pki.path("server.pem")),
        ("KEYGATE_TLS_KEY", pki.path("server.key")),
        ("KEYGATE_ADMIN_TLS_CLIENT_CA", pki.path("ca.pem")),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut keygate = KeygateProcess::serve(
        dir.path(),
        "keygate",
        &url,
        [free_addr(), free_addr(), free_addr()],
        &env,
    );
    let (main, admin) = (keygate.main.to_string(), keygate.admin.to_string());
    let ca = pki.path("ca.pem");
    let mtls = [
        "-cacert",
        &ca,
        "-cert",
        &pki.path("client.pem"),
        "-key",
        &pki.path("client.key"),
    ];
    let operator = format!("authorization: {}", basic(ADMIN_USER, ADMIN_PASSWORD));

    // Health over TLS, with the keygate CLI (as a container health check would run it).
    wait_for(
        "keygate healthcheck over TLS",
        Duration::from_secs(30),
        || {
            keygate.process.assert_running();
            let status = keygate_command(dir.path())
                .args([
                    "healthcheck",
                    "--addr",
                    &format!("https://{main}"),
                    "--ca-cert",
                    &ca,
                ])
                .output()
                .expect("run keygate healthcheck");
            async move { status.status.success() }
        },
    )
    .await;

    // KeyAdmin with a client certificate: grpcurl, with reflection, over mTLS.
    let created = grpcurl(
        &[
            &mtls[..],
            &["-H", &operator, "-d", r#"{"name": "over tls"}"#, &admin],
            &["keygate.v1.KeyAdmin/CreateKey"],
        ]
        .concat(),
    );
    assert!(created.status.success(), "{}", text(&created));
    let created: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let secret = created["secret"].as_str().expect("secret").to_owned();

    // Without a client certificate, with one from another CA, or without TLS: no KeyAdmin.
    let refusals = [
        grpcurl(&[
            "-cacert",
            &ca,
            "-H",
            &operator,
            &admin,
            "keygate.v1.KeyAdmin/ListKeys",
        ]),
        grpcurl(&[
            "-cacert",
            &ca,
            "-cert",
            &pki.path("rogue.pem"),
            "-key",
            &pki.path("rogue.key"),
            "-H",
            &operator,
            &admin,
            "keygate.v1.KeyAdmin/ListKeys",
        ]),
        grpcurl(&[
            "-plaintext",
            "-H",
            &operator,
            &admin,
            "keygate.v1.KeyAdmin/ListKeys",
        ]),
    ];
    for refused in &refusals {
        assert!(!refused.status.success(), "accepted: {}", text(refused));
        assert!(!text(refused).contains("over tls"), "{}", text(refused));
    }
    // The main listener: TLS, no client certificate needed, no plaintext.
    let health = grpcurl(&["-cacert", &ca, &main, "grpc.health.v1.Health/Check"]);
    assert!(text(&health).contains("SERVING"), "{}", text(&health));
    let plaintext = grpcurl(&["-plaintext", &main, "grpc.health.v1.Health/Check"]);
    assert!(!plaintext.status.success(), "{}", text(&plaintext));

    // The keygate CLI as a KeyAdmin client over mTLS.
    let keys = |extra: &[&str]| {
        keygate_command(dir.path())
            .args([
                "keys",
                "list",
                "--json",
                "--admin-addr",
                &format!("https://{admin}"),
            ])
            .args(["--ca-cert", &ca])
            .args(extra)
            .env("KEYGATE_PASSWORD", ADMIN_PASSWORD)
            .output()
            .expect("run keygate keys")
    };
    let listed = keys(&[
        "--client-cert",
        &pki.path("client.pem"),
        "--client-key",
        &pki.path("client.key"),
    ]);
    assert!(listed.status.success(), "{}", text(&listed));
    assert!(text(&listed).contains("over tls"), "{}", text(&listed));
    let refused = keys(&[]);
    assert!(!refused.status.success(), "{}", text(&refused));

    // Check through Envoy, which verifies keygate's certificate (SAN keygate) against the CA.
    let upstream = DemoUpstream::start().await;
    // Loopback only, and ports Envoy picks itself.
    let config = render_example(
        "envoy-tls.yaml",
        &[
            (envoy_socket("0.0.0.0", 10000), envoy_socket("127.0.0.1", 0)),
            (
                envoy_socket("127.0.0.1", 9901),
                envoy_socket("127.0.0.1", 0),
            ),
            (
                envoy_socket("upstream", 8080),
                envoy_socket("127.0.0.1", upstream.addr.port()),
            ),
            (
                envoy_socket("keygate", 50051),
                envoy_socket("127.0.0.1", keygate.main.port()),
            ),
            ("/etc/keygate/tls/ca.pem".into(), ca.clone()),
        ],
    );
    let envoy = EnvoyProcess::start(&config).await;
    let good = bearer(&secret);
    // The last checksum character changed (to one it is not).
    let last = if secret.ends_with('0') { '1' } else { '0' };
    let bad = bearer(&format!("{}{last}", &secret[..secret.len() - 1]));
    wait_for(
        "a good key through Envoy over TLS",
        Duration::from_secs(20),
        || async {
            try_http_get(envoy.addr, "/metrics", &[("authorization", &good)])
                .await
                .is_ok_and(|response| response.status == 200)
        },
    )
    .await;
    for (header, want) in [
        (good.as_str(), 200),
        (bad.as_str(), 401),
        (good.as_str(), 200),
    ] {
        let response = envoy.get("/metrics", &[("authorization", header)]).await;
        assert_eq!(response.status, want, "{header}\n{}", envoy.log());
    }
    keygate.process.assert_running();
}

/// A missing or invalid certificate, key or CA stops `keygate serve` with a message naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_are_start_up_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let garbage = garbage.display().to_string();
    let missing = dir.path().join("missing.pem").display().to_string();
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let other_key = pki.path("client.key");
    let cases: [(&[&str], &str); 6] = [
        (&["--tls-cert", &missing, "--tls-key", &key], "cannot read"),
        (&["--tls-cert", &cert, "--tls-key", &missing], "cannot read"),
        (
            &["--tls-cert", &garbage, "--tls-key", &key],
            "holds no PEM certificate",
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &garbage],
            "holds no PEM private key",
        ),
        // A key that is not the certificate's.
        (
            &["--tls-cert", &cert, "--tls-key", &other_key],
            "not be consistent",
        ),
        (
            &[
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--admin-tls-client-ca",
                &garbage,
            ],
            "holds no PEM CA certificate",
        ),
    ];
    for (args, expected) in cases {
        let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
        let mut command = keygate_command(dir.path());
        command
            .args(["serve", "--database-url", &url])
            .args(["--listen", &free_addr().to_string()])
            .args(["--admin-listen", &free_addr().to_string()])
            .args(["--metrics-listen", &free_addr().to_string()])
            .args(args);
        // Bounded, and killed if it does not exit.
        let output = tokio::time::timeout(Duration::from_secs(30), run(command, None))
            .await
            .expect("keygate exits");
        let stderr = &output.stderr;
        assert!(!output.status.success(), "{args:?} started");
        assert!(
            stderr.contains(expected),
            "{args:?}: the error does not say {expected:?}: {stderr}"
        );
        if expected != "not be consistent" {
            assert!(
                stderr.contains(".pem"),
                "{args:?}: the error names no file: {stderr}"
            );
        }
    }
}
