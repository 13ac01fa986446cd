//! Rolling restarts under load (issue 6, item 2): two keygate replicas behind one Envoy that
//! health-checks them; each in turn gets SIGTERM and is started again while clients keep
//! sending requests. No request may see a 5xx or a wrong answer.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    helpers::{ADMIN_PASSWORD, ADMIN_USER, TestBackend, admin_client, bearer, health, wait_for},
    http::HttpConnection,
    processes::{
        DemoUpstream, EnvoyProcess, KeygateProcess, envoy_socket, free_addr, render_example,
    },
};

/// A request slower than this counts as a wrong answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Load: a few connections, each sending back-to-back GETs, alternating a good key and two
/// bad ones. Bounded by the stop flag, 60 s and 100 000 requests per connection, and each
/// request by `REQUEST_TIMEOUT`.
#[derive(Default, Debug)]
struct Tally {
    good_ok: u64,
    bad_401: u64,
    wrong: Vec<String>,
}

async fn load(
    envoy: std::net::SocketAddr,
    good: String,
    bad: [String; 2],
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut connection: Option<HttpConnection> = None;
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && sent < 100_000 {
        sent += 1;
        let (header, want) = match sent % 3 {
            0 => (bearer(&good), 200),
            1 => (bearer(&bad[0]), 401),
            _ => (bearer(&bad[1]), 401),
        };
        if connection.is_none() {
            match HttpConnection::connect(envoy).await {
                Ok(c) => connection = Some(c),
                Err(e) => {
                    tally.wrong.push(format!("connect: {e}"));
                    continue;
                }
            }
        }
        let headers = [("authorization", header.as_str())];
        let exchange = connection
            .as_mut()
            .expect("connected")
            .get("/metrics", &headers);
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_) => Err(format!("no response within {REQUEST_TIMEOUT:?}")),
        };
        match result {
            Ok(response) if response.status == want => {
                if want == 200 {
                    tally.good_ok += 1
                } else {
                    tally.bad_401 += 1
                }
            }
            Ok(response) => tally.wrong.push(format!(
                "wanted {want}, got {} {:?}",
                response.status, response.body
            )),
            Err(error) => {
                tally.wrong.push(format!("wanted {want}, got {error}"));
                connection = None;
            }
        }
    }
    tally
}

#[sqlx::test(migrations = false)]
async fn rolling_restarts_under_load_lose_no_request(pool: sqlx::PgPool) {
    let backend = TestBackend::postgres(pool);
    let url = backend.url();
    let dir = tempfile::tempdir().unwrap();
    // NOT_SERVING for 3 s before closing: six of Envoy's 0.5 s health checks, of which it
    // needs two to take the replica out.
    // Every client comes through Envoy from one address, and the unknown id below is a failure
    // that spends the failure budget (SPEC section 3, step 5): the limiter is off here, so the
    // answers measure the restarts alone.
    let env = [
        ("KEYGATE_SHUTDOWN_DELAY_SECS", "3"),
        ("KEYGATE_RATE_LIMIT_PER_MINUTE", "0"),
    ];
    let addrs = [
        [free_addr(), free_addr(), free_addr()],
        [free_addr(), free_addr(), free_addr()],
    ];
    let mut replicas = [
        KeygateProcess::serve(dir.path(), "keygate-a", &url, addrs[0], &env),
        KeygateProcess::serve(dir.path(), "keygate-b", &url, addrs[1], &env),
    ];
    for replica in &mut replicas {
        replica.wait_serving().await;
    }

    let created = admin_client(replicas[0].admin, Some((ADMIN_USER, ADMIN_PASSWORD)))
        .await
        .create_key(keygate::grpc::proto::CreateKeyRequest {
            name: "scraper".into(),
            expires_at: None,
        })
        .await
        .expect("CreateKey")
        .into_inner();
    let good = created.secret;
    let id = created.key.unwrap().id;
    // A mistyped key (bad checksum: no store lookup) and a well-formed key with an id nobody
    // has (a store lookup): both 401.
    let mistyped = format!(
        "{}{}",
        &good[..good.len() - 1],
        if good.ends_with('0') { '1' } else { '0' }
    );
    let unknown = {
        let body = format!("uk{}_{}", id + 1000, "Q".repeat(34));
        format!("{body}{}", keygate::domain::key::checksum(&body))
    };

    let upstream = DemoUpstream::start().await;
    // Loopback only, and ports Envoy picks itself.
    let config = render_example(
        "envoy-replicas.yaml",
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
                envoy_socket("keygate-a", 50051),
                envoy_socket("127.0.0.1", replicas[0].main.port()),
            ),
            (
                envoy_socket("keygate-b", 50051),
                envoy_socket("127.0.0.1", replicas[1].main.port()),
            ),
        ],
    );
    let envoy = EnvoyProcess::start(&config).await;
    let all_healthy = || async {
        let hosts = envoy.hosts("authorizer").await;
        hosts.len() == 2 && hosts.iter().all(|(_, healthy)| *healthy)
    };
    wait_for(
        "Envoy sees both replicas healthy",
        Duration::from_secs(20),
        all_healthy,
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(load(
                envoy.addr,
                good.clone(),
                [mistyped.clone(), unknown.clone()],
                stop.clone(),
            ))
        })
        .collect();
    let load_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut figures = Vec::new();
    for (index, name) in ["keygate-a", "keygate-b"].into_iter().enumerate() {
        let replica = &mut replicas[index];
        replica.process.sigterm();
        let terminated = Instant::now();
        let not_serving = wait_for(
            &format!("{name} reports NOT_SERVING after SIGTERM"),
            Duration::from_secs(5),
            || async { health(replica.main, "").await == Some(ServingStatus::NotServing) },
        )
        .await;
        let drained = wait_for(
            &format!("Envoy takes {name} out"),
            Duration::from_secs(5),
            || async {
                envoy
                    .hosts("authorizer")
                    .await
                    .iter()
                    .any(|(host, healthy)| {
                        host.ends_with(&format!(":{}", replica.main.port())) && !healthy
                    })
            },
        )
        .await;
        let status = replica.process.wait(Duration::from_secs(20)).await;
        assert!(
            status.success(),
            "{name} exited with {status}:\n{}",
            replica.process.log()
        );
        let exited = terminated.elapsed();
        let restarted = Instant::now();
        let addrs = [replica.main, replica.admin, replica.metrics];
        *replica = KeygateProcess::serve(dir.path(), name, &url, addrs, &env);
        let serving = replica.wait_serving().await;
        wait_for(
            "Envoy takes the replica back",
            Duration::from_secs(10),
            all_healthy,
        )
        .await;
        figures.push(format!(
            "{name}: NOT_SERVING {not_serving:?} after SIGTERM, out of Envoy's rotation after \
             {drained:?}, exited after {exited:?}; restarted SERVING in {serving:?}, back in \
             rotation after {:?}",
            restarted.elapsed()
        ));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = load_started.elapsed();

    let mut total = Tally::default();
    for worker in workers {
        let tally = worker.await.unwrap();
        total.good_ok += tally.good_ok;
        total.bad_401 += tally.bad_401;
        total.wrong.extend(tally.wrong);
    }
    let requests = total.good_ok + total.bad_401 + total.wrong.len() as u64;
    eprintln!(
        "rolling restart figures: {requests} requests in {elapsed:?} ({:.0}/s): {} good → 200, \
         {} bad → 401, {} wrong; {}",
        requests as f64 / elapsed.as_secs_f64(),
        total.good_ok,
        total.bad_401,
        total.wrong.len(),
        figures.join("; ")
    );
    assert!(
        total.wrong.is_empty(),
        "{} requests got a wrong answer or a 5xx, e.g. {:?}\nEnvoy log:\n{}",
        total.wrong.len(),
        &total.wrong[..total.wrong.len().min(10)],
        envoy.log()
    );
    assert!(
        total.good_ok > 100 && total.bad_401 > 100,
        "too little load: {total:?}"
    );
}
