//! What keygate reads of Envoy's `CheckRequest`: the `Authorization` header and the client's
//! address.
//!
//! Envoy sends every Check with all the request's headers, both peers, the path, host, method,
//! protocol and more. Decoded as envoy-types' `CheckRequest`, that is a string allocation per
//! header name and value, a hash map, and a dozen more strings, built and dropped for every
//! request, most of the server's work for an allow. This view has the same field numbers for the
//! fields keygate reads and no others: prost skips the rest by their length, so they are never
//! built. The header entries are `Bytes` taken from the request buffer without copying.
//!
//! Skipped fields are checked for framing only (a truncated or overlong field still fails the
//! decode), not for content: a header keygate does not read is not checked for UTF-8. The
//! `Authorization` value itself is checked by the credential parser, which denies a value that
//! is not UTF-8 as `MALFORMED_CREDENTIALS` (SPEC section 3, step 2).

use prost::bytes::Bytes;

/// `envoy.service.auth.v3.CheckRequest`, as far as keygate reads it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequestView {
    #[prost(message, optional, tag = "1")]
    attributes: Option<AttributeContextView>,
}

/// `envoy.service.auth.v3.AttributeContext`: `source` and `request`.
#[derive(Clone, PartialEq, prost::Message)]
struct AttributeContextView {
    #[prost(message, optional, tag = "1")]
    source: Option<PeerView>,
    #[prost(message, optional, tag = "4")]
    request: Option<RequestView>,
}

/// `AttributeContext.Peer`: its address.
#[derive(Clone, PartialEq, prost::Message)]
struct PeerView {
    #[prost(message, optional, tag = "1")]
    address: Option<AddressView>,
}

/// `envoy.config.core.v3.Address`. All three members of its `oneof` are listed, so that a
/// later member replaces an earlier one as in the full message.
#[derive(Clone, PartialEq, prost::Message)]
struct AddressView {
    #[prost(oneof = "AddressKind", tags = "1, 2, 3")]
    address: Option<AddressKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum AddressKind {
    #[prost(message, tag = "1")]
    Socket(SocketAddressView),
    #[prost(message, tag = "2")]
    Pipe(NotRead),
    #[prost(message, tag = "3")]
    EnvoyInternal(NotRead),
}

/// `envoy.config.core.v3.SocketAddress`: the address text.
#[derive(Clone, PartialEq, prost::Message)]
struct SocketAddressView {
    #[prost(string, tag = "2")]
    address: String,
}

/// A message keygate does not read.
#[derive(Clone, PartialEq, prost::Message)]
struct NotRead {}

/// `AttributeContext.Request`: its HTTP part.
#[derive(Clone, PartialEq, prost::Message)]
struct RequestView {
    #[prost(message, optional, tag = "2")]
    http: Option<HttpRequestView>,
}

/// `AttributeContext.HttpRequest`: the headers, as the string map Envoy sends by default
/// (`headers`, a `map<string, string>`, which is a repeated key/value entry on the wire) or as
/// the raw header map it sends with `encode_raw_headers: true`.
#[derive(Clone, PartialEq, prost::Message)]
struct HttpRequestView {
    #[prost(message, repeated, tag = "3")]
    headers: Vec<HeaderEntry>,
    #[prost(message, optional, tag = "13")]
    header_map: Option<HeaderMapView>,
}

/// One entry of `HttpRequest.headers`.
#[derive(Clone, PartialEq, prost::Message)]
struct HeaderEntry {
    #[prost(bytes = "bytes", tag = "1")]
    key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    value: Bytes,
}

/// `envoy.config.core.v3.HeaderMap`.
#[derive(Clone, PartialEq, prost::Message)]
struct HeaderMapView {
    #[prost(message, repeated, tag = "1")]
    headers: Vec<HeaderValueView>,
}

/// `envoy.config.core.v3.HeaderValue`.
#[derive(Clone, PartialEq, prost::Message)]
struct HeaderValueView {
    #[prost(bytes = "bytes", tag = "1")]
    key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    value: Bytes,
    #[prost(bytes = "bytes", tag = "3")]
    raw_value: Bytes,
}

impl CheckRequestView {
    /// The `Authorization` header: from the string map if it is there (the last entry wins, as
    /// in a decoded map), else the first match in the raw header map (its `raw_value` if set).
    pub fn authorization_header(&self) -> Option<&[u8]> {
        let http = self.attributes.as_ref()?.request.as_ref()?.http.as_ref()?;
        if let Some(entry) = http
            .headers
            .iter()
            .rev()
            .find(|entry| entry.key.as_ref() == b"authorization")
        {
            return Some(&entry.value);
        }
        http.header_map
            .as_ref()?
            .headers
            .iter()
            .find(|header| header.key.eq_ignore_ascii_case(b"authorization"))
            .map(|header| {
                if header.raw_value.is_empty() {
                    &header.value[..]
                } else {
                    &header.raw_value[..]
                }
            })
    }

    /// The names of the request's headers (both of the forms Envoy may send them in).
    pub fn header_names(&self) -> impl Iterator<Item = &[u8]> {
        let http = self
            .attributes
            .as_ref()
            .and_then(|attributes| attributes.request.as_ref()?.http.as_ref());
        let entries = http.into_iter().flat_map(|http| &http.headers);
        let mapped = http
            .and_then(|http| http.header_map.as_ref())
            .into_iter()
            .flat_map(|map| &map.headers);
        entries
            .map(|entry| &entry.key[..])
            .chain(mapped.map(|header| &header.key[..]))
    }

    /// The client's (the downstream peer's) socket address, as Envoy wrote it.
    pub fn client_address(&self) -> Option<&str> {
        let address = self
            .attributes
            .as_ref()?
            .source
            .as_ref()?
            .address
            .as_ref()?;
        match address.address.as_ref()? {
            AddressKind::Socket(socket) => Some(&socket.address),
            AddressKind::Pipe(_) | AddressKind::EnvoyInternal(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::{
        ext_authz::v3::{CheckRequestExt, pb::CheckRequest},
        pb::envoy::{
            config::core::v3::{
                Address, HeaderMap, HeaderValue, Pipe, SocketAddress, address, socket_address,
            },
            service::auth::v3::{AttributeContext, attribute_context},
        },
    };
    use prost::Message;

    use super::*;

    /// What keygate read from a fully decoded `CheckRequest` before this view existed: the
    /// reference the view must agree with.
    fn reference(request: &CheckRequest) -> (Option<Vec<u8>>, Option<String>) {
        let header = request
            .get_client_headers()
            .and_then(|headers| headers.get("authorization"))
            .map(|value| value.as_bytes().to_vec())
            .or_else(|| {
                let http = request
                    .attributes
                    .as_ref()?
                    .request
                    .as_ref()?
                    .http
                    .as_ref()?;
                http.header_map
                    .as_ref()?
                    .headers
                    .iter()
                    .find(|h| h.key.eq_ignore_ascii_case("authorization"))
                    .map(|h| {
                        if h.raw_value.is_empty() {
                            h.value.as_bytes().to_vec()
                        } else {
                            h.raw_value.clone()
                        }
                    })
            });
        (header, request.get_client_address().cloned())
    }

    fn view_of(bytes: &[u8]) -> (Option<Vec<u8>>, Option<String>) {
        let view = CheckRequestView::decode(bytes).expect("the view decodes what Envoy sends");
        (
            view.authorization_header().map(<[u8]>::to_vec),
            view.client_address().map(str::to_owned),
        )
    }

    fn agree(request: &CheckRequest) -> (Option<Vec<u8>>, Option<String>) {
        let expected = reference(request);
        assert_eq!(view_of(&request.encode_to_vec()), expected, "{request:?}");
        expected
    }

    fn socket(address: &str, port: u32) -> attribute_context::Peer {
        attribute_context::Peer {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: address.into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                    ..Default::default()
                })),
            }),
            service: "downstream".into(),
            principal: "spiffe://example/client".into(),
            ..Default::default()
        }
    }

    fn request(
        headers: &[(&str, &str)],
        header_map: Option<Vec<HeaderValue>>,
        source: Option<attribute_context::Peer>,
    ) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                source,
                destination: Some(socket("10.0.0.1", 10000)),
                request: Some(attribute_context::Request {
                    http: Some(attribute_context::HttpRequest {
                        id: "1234".into(),
                        method: "GET".into(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        header_map: header_map.map(|headers| HeaderMap { headers }),
                        path: "/metrics".into(),
                        host: "example".into(),
                        protocol: "HTTP/1.1".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                context_extensions: HashMap::from([("route".into(), "metrics".into())]),
                ..Default::default()
            }),
        }
    }

    fn raw(key: &str, value: &str, raw_value: &[u8]) -> HeaderValue {
        HeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: raw_value.to_vec(),
        }
    }

    #[test]
    fn reads_what_a_full_decode_reads() {
        let envoy_like = [
            (":authority", "example"),
            (":method", "GET"),
            (":path", "/metrics"),
            ("user-agent", "curl/8"),
            ("authorization", "Basic OnVrMV9hYmM="),
            ("x-request-id", "f00"),
        ];
        let (header, client) = agree(&request(
            &envoy_like,
            None,
            Some(socket("192.0.2.7", 40000)),
        ));
        assert_eq!(header.as_deref(), Some(&b"Basic OnVrMV9hYmM="[..]));
        assert_eq!(client.as_deref(), Some("192.0.2.7"));

        // No header, no source, no attributes at all.
        assert_eq!(agree(&request(&envoy_like[..4], None, None)), (None, None));
        assert_eq!(agree(&CheckRequest::default()), (None, None));

        // The raw header map (`encode_raw_headers: true`): any case, raw_value first.
        let raw_map = vec![
            raw(":path", "/metrics", b""),
            raw("Authorization", "", b"Bearer uk1_raw"),
            raw("authorization", "Bearer second", b""),
        ];
        let (header, _) = agree(&request(&[], Some(raw_map), None));
        assert_eq!(header.as_deref(), Some(&b"Bearer uk1_raw"[..]));
        let (header, _) = agree(&request(
            &[],
            Some(vec![raw("AUTHORIZATION", "Bearer value", b"")]),
            None,
        ));
        assert_eq!(header.as_deref(), Some(&b"Bearer value"[..]));

        // The string map wins over the raw map.
        let (header, _) = agree(&request(
            &[("authorization", "Bearer from-map")],
            Some(vec![raw("authorization", "Bearer from-raw", b"")]),
            None,
        ));
        assert_eq!(header.as_deref(), Some(&b"Bearer from-map"[..]));

        // Only the exact lower-case name counts in the string map (Envoy lower-cases them).
        agree(&request(&[("Authorization", "Bearer x")], None, None));

        // A pipe address is no client address.
        let pipe = attribute_context::Peer {
            address: Some(Address {
                address: Some(address::Address::Pipe(Pipe {
                    path: "/run/envoy.sock".into(),
                    mode: 0,
                })),
            }),
            ..Default::default()
        };
        assert_eq!(agree(&request(&[], None, Some(pipe))).1, None);
    }

    #[test]
    fn repeated_fields_resolve_as_in_a_full_decode() {
        // The same map key twice: a decoded map keeps the last value.
        let entry = |key: &str, value: &str| {
            let mut map = HashMap::new();
            map.insert(key.to_owned(), value.to_owned());
            attribute_context::HttpRequest {
                headers: map,
                ..Default::default()
            }
        };
        let with_http = |http| CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(http),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let mut bytes = with_http(entry("authorization", "Bearer first")).encode_to_vec();
        bytes.extend(with_http(entry("authorization", "Bearer last")).encode_to_vec());
        let full = CheckRequest::decode(&bytes[..]).unwrap();
        assert_eq!(view_of(&bytes), reference(&full));
        assert_eq!(view_of(&bytes).0.as_deref(), Some(&b"Bearer last"[..]));

        // A socket address, then a pipe (one `oneof`): the pipe replaces it.
        let source = |peer| CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer),
                ..Default::default()
            }),
        };
        let mut bytes = source(socket("192.0.2.7", 1)).encode_to_vec();
        bytes.extend(
            source(attribute_context::Peer {
                address: Some(Address {
                    address: Some(address::Address::Pipe(Pipe::default())),
                }),
                ..Default::default()
            })
            .encode_to_vec(),
        );
        let full = CheckRequest::decode(&bytes[..]).unwrap();
        assert_eq!(view_of(&bytes), reference(&full));
        assert_eq!(view_of(&bytes).1, None);
    }

    #[test]
    fn a_broken_frame_still_fails_the_decode() {
        let good = request(
            &[("authorization", "Bearer x")],
            None,
            Some(socket("192.0.2.7", 1)),
        )
        .encode_to_vec();
        for cut in [1, good.len() / 2, good.len() - 1] {
            assert!(
                CheckRequestView::decode(&good[..cut]).is_err(),
                "decoded a request cut at {cut} of {} bytes",
                good.len()
            );
        }
        assert!(CheckRequestView::decode(&[0xff; 16][..]).is_err());
    }
}
