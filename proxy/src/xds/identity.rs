//! Mesh security over xDS. A meshed service's SPIFFE ID is said the way Envoy says it: the
//! cluster's `transport_socket` is `envoy.transport_sockets.tls` with an
//! `UpstreamTlsContext` whose validation context matches exactly one URI SAN. A listener's
//! mTLS mode and authorization travel in its `metadata.filter_metadata["tern"]["mtls"]`
//! (Envoy would need a DownstreamTlsContext with SDS and an RBAC filter; other clients
//! ignore Tern's metadata). Both sides use these functions, so what the control plane writes
//! is what the proxy reads.

use envoy_types::pb::envoy::config::core::v3::{Metadata, TransportSocket, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, UpstreamTlsContext,
    common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{self as pbuf, Any};
use prost::{Message, Name};

use crate::config::{ListenerMtls, MtlsMode};
use crate::config::{RawAuthorization, RawMtls, RawMtlsMode, RawVerdict};
use crate::identity::SpiffeId;

pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";
const TERN_METADATA: &str = "tern";
const MTLS_KEY: &str = "mtls";

/// A listener's mTLS settings as written in the YAML (the inverse of validation).
pub fn raw_mtls(mtls: &ListenerMtls) -> Option<RawMtls> {
    if *mtls == ListenerMtls::default() {
        return None;
    }
    Some(RawMtls {
        mode: Some(match mtls.mode {
            MtlsMode::Disabled => RawMtlsMode::Disabled,
            MtlsMode::Permissive => RawMtlsMode::Permissive,
            MtlsMode::Strict => RawMtlsMode::Strict,
        }),
        authorization: mtls.authorization.as_ref().map(|a| RawAuthorization {
            default: Some(if a.default_allow {
                RawVerdict::Allow
            } else {
                RawVerdict::Deny
            }),
            identities: a.identities.iter().map(ToString::to_string).collect(),
            namespaces: a.namespaces.clone(),
            trust_domains: a.trust_domains.clone(),
        }),
        peer_identity_header: mtls.peer_identity_header.as_ref().map(|h| h.to_string()),
    })
}

/// The listener metadata carrying `mtls`. One JSON string under one key: every map in it
/// has a single entry, so equal settings encode to equal bytes (resource versions are
/// content hashes, and prost writes maps in hash order).
pub fn listener_metadata(mtls: &RawMtls) -> Metadata {
    let json = serde_json::to_string(mtls).unwrap_or_default();
    let inner = pbuf::Struct {
        fields: [(
            MTLS_KEY.to_string(),
            pbuf::Value {
                kind: Some(pbuf::value::Kind::StringValue(json)),
            },
        )]
        .into_iter()
        .collect(),
    };
    Metadata {
        filter_metadata: [(TERN_METADATA.to_string(), inner)].into_iter().collect(),
        ..Default::default()
    }
}

/// A listener's `mtls` from its metadata, if it has one.
pub fn mtls_of(metadata: Option<&Metadata>) -> Result<Option<RawMtls>, String> {
    let Some(value) = metadata
        .and_then(|m| m.filter_metadata.get(TERN_METADATA))
        .and_then(|t| t.fields.get(MTLS_KEY))
    else {
        return Ok(None);
    };
    let Some(pbuf::value::Kind::StringValue(json)) = &value.kind else {
        return Err("must be a string (the listener's `mtls`, as JSON)".into());
    };
    serde_json::from_str(json)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The transport socket that says "speak mTLS to these endpoints; they must be `id`".
pub fn upstream_tls(id: &SpiffeId) -> TransportSocket {
    let context = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: vec!["h2".into()],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContext(
                    CertificateValidationContext {
                        match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                            san_type: subject_alt_name_matcher::SanType::Uri as i32,
                            matcher: Some(StringMatcher {
                                match_pattern: Some(string_matcher::MatchPattern::Exact(
                                    id.to_string(),
                                )),
                                ignore_case: false,
                            }),
                            oid: String::new(),
                        }],
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: TLS_TRANSPORT_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
            type_url: UpstreamTlsContext::type_url(),
            value: context.encode_to_vec(),
        })),
    }
}

/// The identity a cluster's transport socket expects of its endpoints. The error says what
/// Tern cannot honour (it speaks mesh mTLS with its own certificate, nothing else).
pub fn identity_of(socket: &TransportSocket) -> Result<SpiffeId, String> {
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
        return Err("needs a typed_config".into());
    };
    if any.type_url != UpstreamTlsContext::type_url() {
        return Err(format!(
            "{} is not supported (only an UpstreamTlsContext)",
            any.type_url
        ));
    }
    let context = UpstreamTlsContext::decode(any.value.as_slice())
        .map_err(|e| format!("cannot decode the UpstreamTlsContext: {e}"))?;
    let validation = match context
        .common_tls_context
        .and_then(|c| c.validation_context_type)
    {
        Some(common_tls_context::ValidationContextType::ValidationContext(v)) => v,
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            c.default_validation_context.unwrap_or_default()
        }
        _ => return Err("needs a validation_context naming the peer's SPIFFE ID".into()),
    };
    let uris: Vec<&SubjectAltNameMatcher> = validation
        .match_typed_subject_alt_names
        .iter()
        .filter(|m| m.san_type == subject_alt_name_matcher::SanType::Uri as i32)
        .collect();
    let [only] = uris.as_slice() else {
        return Err(format!(
            "needs exactly one URI SAN matcher in match_typed_subject_alt_names, found {}",
            uris.len()
        ));
    };
    match only.matcher.as_ref().and_then(|m| m.match_pattern.as_ref()) {
        Some(string_matcher::MatchPattern::Exact(id)) => id
            .parse()
            .map_err(|e| format!("the URI SAN matcher {id:?} is not a SPIFFE ID: {e}")),
        _ => Err("the URI SAN matcher must be `exact` (one SPIFFE ID)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_mtls_round_trips_and_bad_metadata_says_why() {
        let yaml = "listeners:\n  - name: l\n    address: 127.0.0.1:0\n    protocol: tcp\n    service: s\n    mtls: { mode: strict, authorization: { default: deny, identities: [spiffe://td/ns/a/sa/b], namespaces: [shop], trust_domains: [other.td] }, peer_identity_header: x-peer }\nservices:\n  - name: s\n    protocol: tcp\n    endpoints: [ { address: 127.0.0.1:9 } ]\n";
        let config = crate::config::parse_yaml(yaml).unwrap();
        let typed = &config.listeners[0].mtls;
        let raw = raw_mtls(typed).unwrap();
        let back = mtls_of(Some(&listener_metadata(&raw))).unwrap().unwrap();
        assert_eq!(back, raw);
        assert_eq!(
            listener_metadata(&raw).encode_to_vec(),
            listener_metadata(&back).encode_to_vec()
        );
        assert!(raw_mtls(&ListenerMtls::default()).is_none());
        assert_eq!(mtls_of(None).unwrap(), None);

        let mut bad = listener_metadata(&raw);
        bad.filter_metadata
            .get_mut(TERN_METADATA)
            .unwrap()
            .fields
            .insert(
                MTLS_KEY.into(),
                pbuf::Value {
                    kind: Some(pbuf::value::Kind::StringValue(
                        r#"{"mode":"sometimes"}"#.into(),
                    )),
                },
            );
        assert!(mtls_of(Some(&bad)).unwrap_err().contains("sometimes"));
    }

    #[test]
    fn what_the_control_plane_writes_the_proxy_reads() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        assert_eq!(identity_of(&upstream_tls(&id)).unwrap(), id);
    }

    fn socket_with(matchers: Vec<SubjectAltNameMatcher>, type_url: String) -> TransportSocket {
        let context = UpstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                validation_context_type: Some(
                    common_tls_context::ValidationContextType::ValidationContext(
                        CertificateValidationContext {
                            match_typed_subject_alt_names: matchers,
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        TransportSocket {
            name: TLS_TRANSPORT_SOCKET.into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
                type_url,
                value: context.encode_to_vec(),
            })),
        }
    }

    #[test]
    fn a_context_tern_cannot_honour_is_refused_with_the_reason() {
        let uri = |pattern| SubjectAltNameMatcher {
            san_type: subject_alt_name_matcher::SanType::Uri as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(pattern),
                ignore_case: false,
            }),
            oid: String::new(),
        };
        let tls = UpstreamTlsContext::type_url();
        let prefix = uri(string_matcher::MatchPattern::Prefix("spiffe://".into()));
        let err = identity_of(&socket_with(vec![prefix], tls.clone())).unwrap_err();
        assert!(err.contains("exact"), "{err}");
        let err = identity_of(&socket_with(vec![], tls.clone())).unwrap_err();
        assert!(err.contains("found 0"), "{err}");
        let bad = uri(string_matcher::MatchPattern::Exact("https://x".into()));
        let err = identity_of(&socket_with(vec![bad], tls)).unwrap_err();
        assert!(err.contains("not a SPIFFE ID"), "{err}");
        let err = identity_of(&socket_with(vec![], "type.googleapis.com/x.Y".into())).unwrap_err();
        assert!(err.contains("not supported"), "{err}");
    }
}
