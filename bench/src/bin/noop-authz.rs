//! The benchmarks' baseline: an authorization server that allows everything without looking at
//! the request. It serves the same two RPCs as keygate's main port
//! (`envoy.service.auth.v3.Authorization/Check` and `keygate.v1.Authorizer/Authorize`) the
//! usual way: envoy-types' generated server, which decodes each Check request in full, on
//! tokio's default multi-threaded runtime with keygate's HTTP/2 keepalive setting.
//!
//! With `--answer keygate` it allows with the same response keygate gives a key by default
//! (identity headers, removed headers), so Envoy does the same work for both and only the
//! decision itself differs. `--answer identity-headers` and
//! `--answer removals` send one part of that answer each, so the benchmark can say what each
//! part costs Envoy.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, ValueEnum};
use envoy_types::{
    ext_authz::v3::{
        CheckResponseExt, OkHttpResponseBuilder,
        pb::{CheckRequest, CheckResponse, HeaderAppendAction},
    },
    pb::envoy::service::auth::v3::authorization_server::{Authorization, AuthorizationServer},
};
use keygate::grpc::envoy::{KEY_ID_HEADER, KEY_NAME_HEADER, USER_HEADER};
use keygate::grpc::proto::{
    AuthorizeRequest, AuthorizeResponse,
    authorizer_server::{Authorizer, AuthorizerServer},
};
use tonic::{Request, Response, Status, transport::Server};

#[derive(Parser)]
#[command(about = "No-op ext_authz server (allows everything): the benchmarks' baseline")]
struct Args {
    #[arg(long, env = "NOOP_AUTHZ_LISTEN", default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// What an allow carries: nothing, or what keygate sends for a key.
    #[arg(long, value_enum, default_value_t = Answer::Plain)]
    answer: Answer,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Answer {
    Plain,
    Keygate,
    /// Only keygate's two identity headers.
    IdentityHeaders,
    /// Only keygate's two header removals.
    Removals,
}

/// Allows every call.
struct AllowAll {
    answer: CheckResponse,
}

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(self.answer.clone()))
    }
}

fn allow(answer: Answer) -> CheckResponse {
    let mut response = CheckResponse::with_status(Status::ok(""));
    let mut http = OkHttpResponseBuilder::new();
    // As src/grpc/envoy.rs answers an allowed key (id 1, named "bench") by default.
    let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
    if matches!(answer, Answer::Keygate | Answer::IdentityHeaders) {
        http.add_header(KEY_ID_HEADER, 1.to_string(), overwrite, false)
            .add_header(KEY_NAME_HEADER, "bench".to_owned(), overwrite, true);
    }
    if matches!(answer, Answer::Keygate | Answer::Removals) {
        http.remove_header(USER_HEADER)
            .remove_header("authorization");
    }
    response.set_http_response(http);
    response
}

#[tonic::async_trait]
impl Authorizer for AllowAll {
    async fn authorize(
        &self,
        _: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        Ok(Response::new(AuthorizeResponse {
            allowed: true,
            ..Default::default()
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("noop-authz listening on {}", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(AuthorizationServer::new(AllowAll {
            answer: allow(args.answer),
        }))
        .add_service(AuthorizerServer::new(AllowAll {
            answer: allow(args.answer),
        }))
        .add_service(health_service)
        // SIGTERM as well as Ctrl-C: bench/run.sh stops its servers with SIGTERM.
        .serve_with_incoming_shutdown(incoming, keygate::app::shutdown_signal())
        .await?;
    Ok(())
}
