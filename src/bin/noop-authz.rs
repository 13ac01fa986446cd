//! The benchmarks' baseline: an authorization server that allows everything without looking at
//! the request. It serves the same two RPCs as keygate's main port
//! (`envoy.service.auth.v3.Authorization/Check` and `keygate.v1.Authorizer/Authorize`) with the
//! same stack (tokio's default multi-threaded runtime, tonic, the same HTTP/2 server settings,
//! keygate's Check transport sending an answer encoded once).
//!
//! It decodes each Check request in full, as envoy-types' generated server does: what a no-op
//! written the usual way costs. keygate decodes only the two fields it reads
//! (`keygate::grpc::check_request`); with `--decode keygate` the no-op does the same, and the
//! difference between the two is then what keygate's decision costs.
//!
//! With `--answer keygate` it allows with the same response keygate gives a key by default
//! (identity headers, removed headers), so Envoy does the same work for both and only the
//! decision itself differs. `--answer identity-headers` and
//! `--answer removals` send one part of that answer each, so the benchmark can say what each
//! part costs Envoy.

use std::{marker::PhantomData, net::SocketAddr, sync::Arc, time::Duration};

use clap::{Parser, ValueEnum};
use envoy_types::ext_authz::v3::{
    CheckResponseExt, OkHttpResponseBuilder,
    pb::{CheckRequest, CheckResponse, HeaderAppendAction},
};
use keygate::grpc::check_request::CheckRequestView;
use keygate::grpc::check_server::{AuthorizationServer, CheckAnswer, CheckFuture, CheckHandler};
use keygate::grpc::envoy::{KEY_ID_HEADER, KEY_NAME_HEADER, USER_HEADER};
use keygate::grpc::proto::{
    AuthorizeRequest, AuthorizeResponse,
    authorizer_server::{Authorizer, AuthorizerServer},
};
use prost::{Message, bytes::Bytes};
use tonic::{Request, Response, Status, transport::Server};

#[derive(Parser)]
#[command(about = "No-op ext_authz server (allows everything): the benchmarks' baseline")]
struct Args {
    #[arg(long, env = "NOOP_AUTHZ_LISTEN", default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// What an allow carries: nothing, or what keygate sends for a key.
    #[arg(long, value_enum, default_value_t = Answer::Plain)]
    answer: Answer,
    /// What a Check request is decoded as.
    #[arg(long, value_enum, default_value_t = Decode::Full)]
    decode: Decode,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Decode {
    /// envoy-types' `CheckRequest`, every field.
    Full,
    /// keygate's view: the `Authorization` header and the client address only.
    Keygate,
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

/// Allows every call; Check requests are decoded as `R`.
struct AllowAll<R> {
    /// The Check answer, encoded once (as keygate keeps an allowed key's).
    encoded: Bytes,
    request: PhantomData<fn() -> R>,
}

impl<R> AllowAll<R> {
    fn new(answer: Answer) -> Self {
        Self {
            encoded: Bytes::from(allow(answer).encode_to_vec()),
            request: PhantomData,
        }
    }
}

impl<R: Message + Default + Send + 'static> CheckHandler for AllowAll<R> {
    type Request = R;

    fn check(self: &Arc<Self>, _: Request<R>) -> CheckFuture {
        Box::pin(std::future::ready(Ok(Response::new(CheckAnswer::Encoded(
            self.encoded.clone(),
        )))))
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
impl<R: Send + 'static> Authorizer for AllowAll<R> {
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
    match args.decode {
        Decode::Full => serve::<CheckRequest>(&args).await,
        Decode::Keygate => serve::<CheckRequestView>(&args).await,
    }
}

async fn serve<R: Message + Default + Send + 'static>(
    args: &Args,
) -> Result<(), Box<dyn std::error::Error>> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("noop-authz listening on {}", listener.local_addr()?);
    // The same server settings as keygate's (src/startup.rs).
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(AuthorizationServer::new(AllowAll::<R>::new(args.answer)))
        .add_service(AuthorizerServer::new(AllowAll::<R>::new(args.answer)))
        .add_service(health_service)
        // SIGTERM as well as Ctrl-C, as keygate: bench/run.sh stops its servers with SIGTERM,
        // and a profile-instrumented build (scripts/pgo-build.sh) writes its profile only on a
        // normal exit.
        .serve_with_incoming_shutdown(
            keygate::startup::no_delay(listener),
            keygate::startup::shutdown_signal(),
        )
        .await?;
    Ok(())
}
