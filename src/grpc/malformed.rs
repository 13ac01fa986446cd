//! A request whose message bytes do not decode is the client's error. tonic's prost codec
//! reports it as INTERNAL (which reads as a server bug, and would page someone); this layer
//! turns exactly that status into INVALID_ARGUMENT, keeping the decoder's message ("failed to
//! decode Protobuf message: …", which names the field and never echoes its contents).

use tonic::codegen::http::{HeaderValue, Response};

/// The start of the percent-encoded `grpc-message` tonic sends for an undecodable request.
const DECODE_FAILURE: &[u8] = b"failed%20to%20decode%20Protobuf%20message";
const INTERNAL: &[u8] = b"13";
const INVALID_ARGUMENT: &str = "3";

/// For `tower::util::MapResponseLayer`: rewrites the (trailers-only) response of a request that
/// failed to decode. Every other response passes untouched.
pub fn undecodable_is_invalid_argument<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let undecodable = headers
        .get("grpc-status")
        .is_some_and(|status| status.as_bytes() == INTERNAL)
        && headers
            .get("grpc-message")
            .is_some_and(|message| message.as_bytes().starts_with(DECODE_FAILURE));
    if undecodable {
        headers.insert("grpc-status", HeaderValue::from_static(INVALID_ARGUMENT));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(status: tonic::Status) -> Option<String> {
        let response = undecodable_is_invalid_argument(status.into_http::<()>());
        response
            .headers()
            .get("grpc-status")
            .map(|value| value.to_str().unwrap().to_owned())
    }

    #[test]
    fn only_decode_failures_change_code() {
        assert_eq!(
            status_of(tonic::Status::internal(
                "failed to decode Protobuf message: invalid varint"
            )),
            Some("3".into())
        );
        assert_eq!(
            status_of(tonic::Status::internal("internal database error")),
            Some("13".into())
        );
        assert_eq!(
            status_of(tonic::Status::unavailable(
                "failed to decode Protobuf message"
            )),
            Some("14".into())
        );
    }
}
