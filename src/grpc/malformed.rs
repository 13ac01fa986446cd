//! Requests whose message cannot be read are the client's error. tonic reports them as INTERNAL
//! (which reads as a server bug, and would page someone); this layer turns exactly those
//! statuses into INVALID_ARGUMENT. A decode failure keeps the decoder's message ("failed to
//! decode Protobuf message: …", which names the field and never echoes its contents); a missing
//! message and a compressed-flag message without `grpc-encoding` get one that says what the
//! client must change. (gRPC's compression document asks for INTERNAL in the second case; for a
//! service whose operators alert on INTERNAL, what the client sent decides the code.)

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use tonic::codegen::http::{HeaderValue, Response};

const INTERNAL: &[u8] = b"13";
const INVALID_ARGUMENT: &str = "3";

/// The starts of the percent-encoded `grpc-message`s tonic sends for requests it cannot read,
/// each with the message keygate answers instead (`None`: keep tonic's).
const UNREADABLE: [(&[u8], Option<&str>); 3] = [
    (b"failed%20to%20decode%20Protobuf%20message", None),
    (
        b"Missing%20request%20message",
        Some("the request carries no message; a unary call sends exactly one"),
    ),
    (
        b"protocol%20error:%20received%20message%20with%20compressed-flag",
        Some("the message is flagged compressed but the request names no grpc-encoding"),
    ),
];

/// For `tower::util::MapResponseLayer`: rewrites the (trailers-only) response of a request
/// whose message could not be read. Every other response passes untouched.
pub fn unreadable_is_invalid_argument<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    if headers
        .get("grpc-status")
        .is_none_or(|status| status.as_bytes() != INTERNAL)
    {
        return response;
    }
    let Some(message) = headers.get("grpc-message") else {
        return response;
    };
    let Some((_, replacement)) = UNREADABLE
        .iter()
        .find(|(start, _)| message.as_bytes().starts_with(start))
    else {
        return response;
    };
    if let Some(replacement) = replacement {
        const SPACES: &AsciiSet = &CONTROLS.add(b' ');
        let encoded = utf8_percent_encode(replacement, SPACES).to_string();
        headers.insert(
            "grpc-message",
            HeaderValue::from_str(&encoded).expect("an ASCII message"),
        );
    }
    headers.insert("grpc-status", HeaderValue::from_static(INVALID_ARGUMENT));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: tonic::Status) -> tonic::Status {
        let response = unreadable_is_invalid_argument(status.into_http::<()>());
        tonic::Status::from_header_map(response.headers()).expect("a status")
    }

    #[test]
    fn only_unreadable_requests_change_code() {
        let decode = answered(tonic::Status::internal(
            "failed to decode Protobuf message: invalid varint",
        ));
        assert_eq!(decode.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            decode.message(),
            "failed to decode Protobuf message: invalid varint"
        );
        let missing = answered(tonic::Status::internal("Missing request message."));
        assert_eq!(missing.code(), tonic::Code::InvalidArgument);
        assert!(missing.message().contains("no message"), "{missing:?}");
        let compressed = answered(tonic::Status::internal(
            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
        ));
        assert_eq!(compressed.code(), tonic::Code::InvalidArgument);
        assert!(
            compressed.message().contains("grpc-encoding"),
            "{compressed:?}"
        );

        let database = answered(tonic::Status::internal("internal database error"));
        assert_eq!(database.code(), tonic::Code::Internal);
        let unavailable = answered(tonic::Status::unavailable(
            "failed to decode Protobuf message",
        ));
        assert_eq!(unavailable.code(), tonic::Code::Unavailable);
    }
}
