//! The transport for `envoy.service.auth.v3.Authorization`: what envoy-types' generated
//! `AuthorizationServer` does (route `/Check`, decode with prost, answer `UNIMPLEMENTED`
//! elsewhere), with three differences, each for the per-request cost of an allow. The request
//! is decoded as `CheckRequestView`, the two fields keygate reads, skipping the rest. The
//! answer may be bytes encoded earlier: an allowed key's answer never changes, so
//! `EnvoyAuthorizationService` encodes it once per key and every later allow writes those bytes
//! instead of building and encoding the same message again. And the handler is called as soon
//! as the request is decoded (`CheckHandler::check`), so what it answers at once needs no
//! future that holds the request.

use std::{convert::Infallible, future::Future, pin::Pin, sync::Arc};

use envoy_types::ext_authz::v3::pb::CheckResponse;
use prost::{Message, bytes::BufMut};

use super::check_request::CheckRequestView;
use tonic::{
    Status,
    codec::{Codec, EncodeBuf, Encoder},
    codegen::{Body, Bytes, Context, Poll, Service, StdError, http},
    server::{Grpc, NamedService, UnaryService},
};

/// The one method's path: what the server routes and what clients call.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// What Check sends: a message, or a message encoded before (an allowed key's, see
/// `EnvoyAuthorizationService::answer`). The message is boxed: an allow is the hot path, and
/// its answer should not carry a 272-byte variant through every future it passes.
pub enum CheckAnswer {
    Message(Box<CheckResponse>),
    Encoded(Bytes),
}

/// What answers Check.
pub trait CheckHandler: Send + Sync + 'static {
    /// Called when the request has been decoded. What can be answered at once is answered
    /// here, with a ready future: the future is boxed for every request, and one that held
    /// the decoded request until polled would make that allocation kilobytes.
    fn check(self: &Arc<Self>, request: tonic::Request<CheckRequestView>) -> CheckFuture;
}

/// What `CheckHandler::check` returns.
pub type CheckFuture = BoxFuture<tonic::Response<CheckAnswer>, Status>;

/// `envoy.service.auth.v3.Authorization` on a tonic router.
pub struct AuthorizationServer<T> {
    handler: Arc<T>,
}

impl<T> AuthorizationServer<T> {
    pub fn new(handler: T) -> Self {
        Self {
            handler: Arc::new(handler),
        }
    }
}

impl<T> Clone for AuthorizationServer<T> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
        }
    }
}

impl<T> NamedService for AuthorizationServer<T> {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

impl<T, B> Service<http::Request<B>> for AuthorizationServer<T>
where
    T: CheckHandler,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CHECK_PATH {
            return Box::pin(async {
                Ok(Status::unimplemented("").into_http::<tonic::body::Body>())
            });
        }
        let check = CheckMethod(self.handler.clone());
        Box::pin(async move { Ok(Grpc::new(CheckCodec).unary(check, request).await) })
    }
}

struct CheckMethod<T>(Arc<T>);

impl<T: CheckHandler> UnaryService<CheckRequestView> for CheckMethod<T> {
    type Response = CheckAnswer;
    type Future = CheckFuture;

    fn call(&mut self, request: tonic::Request<CheckRequestView>) -> Self::Future {
        self.0.check(request)
    }
}

/// prost for the request (tonic-prost's decoder, so a malformed request fails as it does for
/// every other RPC); the answer as a message or as its stored bytes.
struct CheckCodec;

impl Codec for CheckCodec {
    type Encode = CheckAnswer;
    type Decode = CheckRequestView;
    type Encoder = CheckAnswerEncoder;
    type Decoder = tonic_prost::ProstDecoder<CheckRequestView>;

    fn encoder(&mut self) -> Self::Encoder {
        CheckAnswerEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

struct CheckAnswerEncoder;

impl Encoder for CheckAnswerEncoder {
    type Item = CheckAnswer;
    type Error = Status;

    fn encode(&mut self, answer: CheckAnswer, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match answer {
            CheckAnswer::Message(response) => response
                .encode(buf)
                .map_err(|error| Status::internal(format!("encoding the answer: {error}"))),
            CheckAnswer::Encoded(bytes) => {
                buf.put_slice(&bytes);
                Ok(())
            }
        }
    }
}
