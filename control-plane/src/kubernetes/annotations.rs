//! The `tern.dev/*` annotations users put on Services and EndpointSlices, and their parsing.

use std::collections::BTreeMap;

use tern_proxy::config::{RawLoadBalancer, parse_duration};
use tern_proxy::identity::SpiffeId;

use super::identity::{Override, TrustDomain};

/// On an EndpointSlice: the weight of each of its endpoints.
pub const WEIGHT: &str = "tern.dev/weight";
/// On a Service: the load balancer of each of its ports.
pub const LOAD_BALANCER: &str = "tern.dev/load-balancer";
/// On a Service: the upstream connect timeout of each of its ports.
pub const CONNECT_TIMEOUT: &str = "tern.dev/connect-timeout";
/// On a Service: the upstream idle timeout of each of its ports.
pub const IDLE_TIMEOUT: &str = "tern.dev/idle-timeout";

/// On a Service: the identity its endpoints present (a service account of the Service's
/// namespace, a full SPIFFE ID, or `none` for plaintext), instead of the derived one.
pub const IDENTITY: &str = "tern.dev/identity";

/// The longest Kubernetes object name (a DNS subdomain).
const MAX_NAME: usize = 253;

/// The proxy rejects heavier weights; checking here keeps one bad slice from failing the
/// whole snapshot later.
const MAX_WEIGHT: u32 = 10_000;

/// An annotation whose value was not understood; the default applies instead.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
#[error("annotation {key}={value:?} ignored: {reason}")]
pub struct InvalidAnnotation {
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

/// The value of annotation `key`, `None` when absent.
pub fn get<'a>(annotations: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    annotations?.get(key).map(String::as_str)
}

pub fn weight(value: &str) -> Result<u32, InvalidAnnotation> {
    match value.trim().parse::<u32>() {
        Ok(w) if (1..=MAX_WEIGHT).contains(&w) => Ok(w),
        _ => Err(invalid(
            WEIGHT,
            value,
            "expected an integer from 1 to 10000",
        )),
    }
}

pub fn load_balancer(value: &str) -> Result<RawLoadBalancer, InvalidAnnotation> {
    match value.trim() {
        "round_robin" => Ok(RawLoadBalancer::RoundRobin),
        "least_request" => Ok(RawLoadBalancer::LeastRequest),
        "peak_ewma" => Ok(RawLoadBalancer::PeakEwma),
        _ => Err(invalid(
            LOAD_BALANCER,
            value,
            "expected round_robin, least_request or peak_ewma",
        )),
    }
}

/// A duration annotation, checked with the proxy's own parser and passed on as written.
pub fn duration(key: &'static str, value: &str) -> Result<String, InvalidAnnotation> {
    match parse_duration(value) {
        Ok(_) => Ok(value.trim().to_string()),
        Err(reason) => Err(invalid(key, value, &reason)),
    }
}

/// A `tern.dev/identity` value on a Service in `namespace`.
pub fn identity(
    value: &str,
    namespace: &str,
    trust_domain: &TrustDomain,
) -> Result<Override, InvalidAnnotation> {
    let value = value.trim();
    if value == "none" {
        return Ok(Override::Plaintext);
    }
    if value.starts_with("spiffe://") {
        return value
            .parse::<SpiffeId>()
            .map(Override::Identity)
            .map_err(|e| invalid(IDENTITY, value, &e.to_string()));
    }
    let expected = "expected a service account name, a spiffe:// ID or none";
    // Service account names are DNS subdomains; checking that here keeps a typo such as
    // "Web" from becoming an identity no certificate carries.
    let is_name = !value.is_empty()
        && value.len() <= MAX_NAME
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !is_name {
        return Err(invalid(IDENTITY, value, expected));
    }
    trust_domain
        .service_account(namespace, value)
        .map(Override::Identity)
        .ok_or_else(|| invalid(IDENTITY, value, expected))
}

fn invalid(key: &'static str, value: &str, reason: &str) -> InvalidAnnotation {
    InvalidAnnotation {
        key,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_within_the_proxy_range_are_accepted() {
        assert_eq!(weight("1"), Ok(1));
        assert_eq!(weight(" 250 "), Ok(250));
        assert_eq!(weight("10000"), Ok(10_000));
        for bad in ["0", "10001", "-1", "1.5", "", "ten"] {
            assert!(weight(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn load_balancers_use_the_config_file_spelling() {
        assert_eq!(
            load_balancer("round_robin"),
            Ok(RawLoadBalancer::RoundRobin)
        );
        assert_eq!(
            load_balancer("least_request"),
            Ok(RawLoadBalancer::LeastRequest)
        );
        assert_eq!(load_balancer("peak_ewma"), Ok(RawLoadBalancer::PeakEwma));
        let err = load_balancer("random").unwrap_err();
        assert_eq!(
            err.to_string(),
            "annotation tern.dev/load-balancer=\"random\" ignored: \
             expected round_robin, least_request or peak_ewma"
        );
    }

    #[test]
    fn identities_are_a_service_account_a_spiffe_id_or_none() {
        let td: TrustDomain = "cluster.local".parse().expect("valid");
        let id = |text: &str| Override::Identity(text.parse().expect("valid SPIFFE ID"));
        assert_eq!(
            identity(" web ", "shop", &td),
            Ok(id("spiffe://cluster.local/ns/shop/sa/web"))
        );
        assert_eq!(
            identity("spiffe://other.org/ns/x/sa/y", "shop", &td),
            Ok(id("spiffe://other.org/ns/x/sa/y"))
        );
        assert_eq!(identity("none", "shop", &td), Ok(Override::Plaintext));
        for bad in [
            "",
            "Web",
            "web/x",
            "-web",
            "..",
            "spiffe://",
            "spiffe://a/b?c",
        ] {
            let err = identity(bad, "shop", &td).unwrap_err();
            assert_eq!(err.key, IDENTITY, "{bad:?}");
        }
        assert_eq!(
            identity("Web", "shop", &td).unwrap_err().to_string(),
            "annotation tern.dev/identity=\"Web\" ignored: \
             expected a service account name, a spiffe:// ID or none"
        );
    }

    #[test]
    fn durations_are_checked_and_kept_as_written() {
        assert_eq!(duration(CONNECT_TIMEOUT, " 1s "), Ok("1s".to_string()));
        assert_eq!(duration(IDLE_TIMEOUT, "1m30s"), Ok("1m30s".to_string()));
        let err = duration(CONNECT_TIMEOUT, "soon").unwrap_err();
        assert_eq!(err.key, CONNECT_TIMEOUT);
        assert_eq!(err.value, "soon");
    }
}
