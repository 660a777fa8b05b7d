//! A meshed service's SPIFFE ID over xDS, said the way Envoy says it: the cluster's
//! `transport_socket` is `envoy.transport_sockets.tls` with an `UpstreamTlsContext` whose
//! validation context matches exactly one URI SAN. Both sides use these two functions, so
//! what the control plane writes is what the proxy reads.

use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, UpstreamTlsContext,
    common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use crate::identity::SpiffeId;

pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";

/// The transport socket that says "speak mTLS to these endpoints; they must be `id`".
pub fn upstream_tls(id: &SpiffeId) -> TransportSocket {
    let context = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: vec!["h2".into()],
            validation_context_type: Some(common_tls_context::ValidationContextType::ValidationContext(
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
            )),
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
