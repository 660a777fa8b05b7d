//! Validation of the mTLS and authorization settings of listeners and services.

use http::HeaderName;

use super::super::load::ConfigError;
use super::super::model::{RawAuthorization, RawMtls, RawMtlsMode, RawVerdict};
use super::super::{ListenerMtls, MtlsMode};
use crate::authz::Authorization;
use crate::identity::SpiffeId;

pub(super) fn listener_mtls(at: &str, raw: Option<&RawMtls>) -> Result<ListenerMtls, ConfigError> {
    let Some(raw) = raw else {
        return Ok(ListenerMtls::default());
    };
    let at = format!("{at}.mtls");
    let mode = match raw.mode {
        None | Some(RawMtlsMode::Disabled) => MtlsMode::Disabled,
        Some(RawMtlsMode::Permissive) => MtlsMode::Permissive,
        Some(RawMtlsMode::Strict) => MtlsMode::Strict,
    };
    let authorization = raw
        .authorization
        .as_ref()
        .map(|a| authorization(&format!("{at}.authorization"), a))
        .transpose()?;
    let peer_identity_header = raw
        .peer_identity_header
        .as_deref()
        .map(|h| {
            HeaderName::try_from(h).map_err(|_| {
                ConfigError::field(
                    format!("{at}.peer_identity_header"),
                    format!("{h:?} is not a header name"),
                )
            })
        })
        .transpose()?;
    Ok(ListenerMtls {
        mode,
        authorization,
        peer_identity_header,
    })
}

fn authorization(at: &str, raw: &RawAuthorization) -> Result<Authorization, ConfigError> {
    let identities = raw
        .identities
        .iter()
        .enumerate()
        .map(|(i, s)| spiffe_id(&format!("{at}.identities[{i}]"), s))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, ns) in raw.namespaces.iter().enumerate() {
        if ns.is_empty() || ns.contains('/') {
            return Err(ConfigError::field(
                format!("{at}.namespaces[{i}]"),
                format!("{ns:?} is not a namespace"),
            ));
        }
    }
    for (i, domain) in raw.trust_domains.iter().enumerate() {
        // A trust domain is what a SPIFFE ID of that domain alone would be.
        spiffe_id(
            &format!("{at}.trust_domains[{i}]"),
            &format!("spiffe://{domain}"),
        )?;
    }
    Ok(Authorization {
        default_allow: raw.default == Some(RawVerdict::Allow),
        identities,
        namespaces: raw.namespaces.clone(),
        trust_domains: raw.trust_domains.clone(),
    })
}

pub(super) fn service_identity(
    at: &str,
    raw: Option<&str>,
) -> Result<Option<SpiffeId>, ConfigError> {
    raw.map(|s| spiffe_id(&format!("{at}.identity"), s))
        .transpose()
}

fn spiffe_id(at: &str, s: &str) -> Result<SpiffeId, ConfigError> {
    s.parse()
        .map_err(|e| ConfigError::field(at, format!("{s:?} is not a SPIFFE ID: {e}")))
}

#[cfg(test)]
mod tests {
    use crate::config::parse_yaml;

    fn error(yaml: &str) -> String {
        parse_yaml(yaml).unwrap_err().to_string()
    }

    #[test]
    fn listener_mtls_and_authorization_are_read() {
        let config = crate::config::parse_yaml(
            r#"
listeners:
  - name: inbound
    address: 127.0.0.1:0
    protocol: http
    mtls:
      mode: strict
      peer_identity_header: x-tern-peer-identity
      authorization: { default: deny, identities: [spiffe://cluster.local/ns/a/sa/web],
                       namespaces: [ops], trust_domains: [partner.example] }
    routes: [ { backends: [ { service: app } ] } ]
services:
  - name: app
    protocol: http1
    identity: spiffe://cluster.local/ns/a/sa/app
    endpoints: [ { address: 127.0.0.1:9 } ]
"#,
        )
        .unwrap();
        let mtls = &config.listeners[0].mtls;
        assert_eq!(mtls.mode, crate::config::MtlsMode::Strict);
        let authz = mtls.authorization.as_ref().unwrap();
        assert!(!authz.default_allow);
        assert_eq!(
            authz.identities[0].as_str(),
            "spiffe://cluster.local/ns/a/sa/web"
        );
        assert_eq!(
            mtls.peer_identity_header.as_ref().unwrap().as_str(),
            "x-tern-peer-identity"
        );
        assert_eq!(
            config.services[0].identity.as_ref().unwrap().as_str(),
            "spiffe://cluster.local/ns/a/sa/app"
        );
    }

    #[test]
    fn bad_security_settings_name_the_field() {
        let base = |mtls: &str, identity: &str| {
            format!(
                "listeners:\n  - name: l\n    address: 127.0.0.1:0\n    protocol: tcp\n    service: s\n    mtls: {mtls}\nservices:\n  - name: s\n    protocol: tcp\n    identity: {identity}\n    endpoints: [ {{ address: 127.0.0.1:9 }} ]\n"
            )
        };
        let ok_id = "spiffe://cluster.local/ns/a/sa/s";
        let cases = [
            (base("{ mode: sometimes }", ok_id), "listeners[0].mtls.mode"),
            (
                base("{ authorization: { identities: [web] } }", ok_id),
                "listeners[0].mtls.authorization.identities[0]: \"web\" is not a SPIFFE ID",
            ),
            (
                base("{ authorization: { trust_domains: [Bad.Domain] } }", ok_id),
                "listeners[0].mtls.authorization.trust_domains[0]",
            ),
            (
                base("{ authorization: { namespaces: [\"a/b\"] } }", ok_id),
                "listeners[0].mtls.authorization.namespaces[0]",
            ),
            (
                base("{ peer_identity_header: \"bad header\" }", ok_id),
                "listeners[0].mtls.peer_identity_header",
            ),
            (
                base("{ mode: strict }", "https://x"),
                "services[0].identity",
            ),
        ];
        for (yaml, want) in cases {
            let got = error(&yaml);
            assert!(got.contains(want), "{got} should name {want}");
        }
    }
}
