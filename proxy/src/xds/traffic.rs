//! Envoy's local rate limit and fault filters read back into Tern's model (with `tracer.rs`,
//! the inverse of the control plane's `traffic.rs`). A route's policy is its own
//! `typed_per_filter_config`, else its virtual host's, found by type; the rate limit's key
//! comes from the route's Tern metadata (`rate_limit_key`; absent, one bucket, as in Envoy).
//! What Tern cannot honour is refused with the field named.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{Metadata, RuntimeFractionalPercent};
use envoy_types::pb::envoy::config::route::v3::{
    FilterConfig, HeaderMatcher, VirtualHost, header_matcher,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{HttpFault, fault_abort};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use envoy_types::pb::google::protobuf::{self as pbuf, Any};
use prost::{Message, Name};

use super::decode::InvalidResource;
use super::policy::{Err, duration_text};
use crate::config::{RawFault, RawFaultAbort, RawFaultDelay, RawRateLimit};

pub(super) const ROUTER: &str = "envoy.filters.http.router";
const LOCAL_RATELIMIT: &str = "envoy.filters.http.local_ratelimit";
const FAULT: &str = "envoy.filters.http.fault";

/// The policy filters an HTTP connection manager runs: a route's config for a filter that is
/// not in the chain does nothing in Envoy, so it does nothing in Tern.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyFilters {
    pub rate_limit: bool,
    pub fault: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Router,
    RateLimit,
    Fault,
    Other,
}

/// Checks the connection manager's `http_filters`: local rate limit and fault in any order,
/// then the router, last (Envoy requires it there); other filters only if `is_optional`.
pub(super) fn http_filters(
    filters: &[HttpFilter],
    field: &str,
    err: Err<'_>,
) -> Result<PolicyFilters, InvalidResource> {
    let mut out = PolicyFilters::default();
    for (i, f) in filters.iter().enumerate() {
        let at = format!("{field}.http_filters[{i}]");
        let config = match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(c)) => Some(c),
            Some(http_filter::ConfigType::ConfigDiscovery(_)) => {
                return Err(err(
                    format!("{at}.config_discovery"),
                    "filter config discovery (ECDS) is not supported".into(),
                ));
            }
            None => None,
        };
        let kind = match config {
            Some(c) if is::<Router>(c) => Kind::Router,
            Some(c) if is::<LocalRateLimit>(c) => Kind::RateLimit,
            Some(c) if is::<HttpFault>(c) => Kind::Fault,
            Some(_) => Kind::Other,
            None => match f.name.as_str() {
                ROUTER => Kind::Router,
                LOCAL_RATELIMIT => Kind::RateLimit,
                FAULT => Kind::Fault,
                _ => Kind::Other,
            },
        };
        let last = i + 1 == filters.len();
        match kind {
            Kind::Router if !last => {
                return Err(err(
                    at,
                    "the router must be the last HTTP filter (Envoy requires it)".into(),
                ));
            }
            Kind::Router => {}
            Kind::RateLimit | Kind::Fault if last => {
                return Err(err(
                    at,
                    format!(
                        "{:?} cannot be the last HTTP filter: the router must be",
                        f.name
                    ),
                ));
            }
            Kind::RateLimit => {
                if std::mem::replace(&mut out.rate_limit, true) {
                    return Err(err(at, "a second local rate limit filter".into()));
                }
                let l: LocalRateLimit = unpack_or_default(config, &at, err)?;
                if l.token_bucket.is_some() && !percent_of(l.filter_enabled.as_ref()).is_zero() {
                    return Err(err(
                        format!("{at}.token_bucket"),
                        "a bucket for the whole listener is not supported; set buckets per route \
                         (typed_per_filter_config)"
                            .into(),
                    ));
                }
            }
            Kind::Fault => {
                if std::mem::replace(&mut out.fault, true) {
                    return Err(err(at, "a second fault filter".into()));
                }
                let fault: HttpFault = unpack_or_default(config, &at, err)?;
                if fault.delay.is_some() || fault.abort.is_some() {
                    return Err(err(
                        at,
                        "faults for the whole listener are not supported; set them per route \
                         (typed_per_filter_config)"
                            .into(),
                    ));
                }
            }
            Kind::Other if f.is_optional => {}
            Kind::Other => {
                return Err(err(
                    at,
                    format!(
                        "unsupported HTTP filter {:?} (Tern runs {LOCAL_RATELIMIT}, {FAULT} and \
                         {ROUTER}; mark others is_optional to let Tern skip them)",
                        f.name
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// A virtual host's own policy configs, which its routes without their own inherit.
pub(super) struct VhostPolicy(Found);

/// Reads a virtual host's policy. Envoy makes one bucket of each config, so a virtual host's
/// bucket is shared by every route that inherits it; Tern keeps a bucket per route, so that
/// sharing is refused (one inheriting route is the same thing).
pub(super) fn vhost_policy(
    vhost: &VirtualHost,
    vhost_field: &str,
    err: Err<'_>,
) -> Result<VhostPolicy, InvalidResource> {
    let found = per_filter(&vhost.typed_per_filter_config, vhost_field, err)?;
    if let Some(Entry::Config(at, l)) = &found.rate_limit
        && l.token_bucket.is_some()
    {
        let mut inheriting = 0;
        for (r, route) in vhost.routes.iter().enumerate() {
            let own = per_filter(
                &route.typed_per_filter_config,
                &format!("{vhost_field}.routes[{r}]"),
                err,
            )?;
            inheriting += usize::from(own.rate_limit.is_none());
        }
        if inheriting > 1 {
            return Err(err(
                at.clone(),
                format!(
                    "one bucket shared by {inheriting} routes is not supported (Tern keeps a \
                     bucket per route); configure the routes' own buckets"
                ),
            ));
        }
    }
    Ok(VhostPolicy(found))
}

/// A route's rate limit and fault, from its own per-filter config, else its virtual host's.
/// Tern limits before it injects faults whatever the order of the filters; the order matters
/// only to a request that is both limited and aborted.
pub(super) fn route_policy(
    route: &HashMap<String, Any>,
    vhost: &VhostPolicy,
    metadata: Option<&Metadata>,
    field: &str,
    err: Err<'_>,
) -> Result<(Option<RawRateLimit>, Option<RawFault>), InvalidResource> {
    let here = per_filter(route, field, err)?;
    let rate_limit = match here.rate_limit.as_ref().or(vhost.0.rate_limit.as_ref()) {
        Some(Entry::Config(at, l)) => rate_limit(l, metadata, at, field, err)?,
        Some(Entry::Disabled) | None => None,
    };
    let fault = match here.fault.as_ref().or(vhost.0.fault.as_ref()) {
        Some(Entry::Config(at, f)) => fault(f, at, err)?,
        Some(Entry::Disabled) | None => None,
    };
    Ok((rate_limit, fault))
}

/// The policy configs at one level.
#[derive(Default)]
struct Found {
    rate_limit: Option<Entry<LocalRateLimit>>,
    fault: Option<Entry<HttpFault>>,
}

/// A config, with the field it was found at; or the filter turned off at this level.
enum Entry<T> {
    Config(String, T),
    Disabled,
}

fn per_filter(
    map: &HashMap<String, Any>,
    field: &str,
    err: Err<'_>,
) -> Result<Found, InvalidResource> {
    let mut found = Found::default();
    // In key order, so that the error for two of a kind names the same entries every time.
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (name, any) in entries {
        let at = format!("{field}.typed_per_filter_config[{name}]");
        // A `FilterConfig` wraps the config to mark it optional, or turns the filter off for
        // this route or virtual host (then the config, if any, says which filter).
        let (any, at, disabled) = if is::<FilterConfig>(any) {
            let wrapper: FilterConfig = decode(any, &at, err)?;
            match wrapper.config {
                Some(inner) => (inner, format!("{at}.config"), wrapper.disabled),
                None if wrapper.disabled => {
                    match name.as_str() {
                        LOCAL_RATELIMIT => found.rate_limit = Some(Entry::Disabled),
                        FAULT => found.fault = Some(Entry::Disabled),
                        _ => {}
                    }
                    continue;
                }
                None => continue,
            }
        } else {
            (any.clone(), at, false)
        };
        if is::<LocalRateLimit>(&any) {
            if found.rate_limit.is_some() {
                return Err(err(at, "a second local rate limit config".into()));
            }
            found.rate_limit = Some(if disabled {
                Entry::Disabled
            } else {
                Entry::Config(at.clone(), decode(&any, &at, err)?)
            });
        } else if is::<HttpFault>(&any) {
            if found.fault.is_some() {
                return Err(err(at, "a second fault config".into()));
            }
            found.fault = Some(if disabled {
                Entry::Disabled
            } else {
                Entry::Config(at.clone(), decode(&any, &at, err)?)
            });
        }
        // Configs for other filters: the connection manager refuses those filters unless
        // they are optional, and optional ones Tern skips.
    }
    Ok(found)
}

fn rate_limit(
    l: &LocalRateLimit,
    metadata: Option<&Metadata>,
    at: &str,
    route_field: &str,
    err: Err<'_>,
) -> Result<Option<RawRateLimit>, InvalidResource> {
    let Some(bucket) = &l.token_bucket else {
        return Ok(None);
    };
    // Envoy limits only the enabled share of requests, and refuses only the enforced share
    // of those; both default to none.
    let enabled = percent_of(l.filter_enabled.as_ref());
    let enforced = percent_of(l.filter_enforced.as_ref());
    for (name, p) in [("filter_enabled", enabled), ("filter_enforced", enforced)] {
        if !p.is_zero() && !p.is_all() {
            return Err(err(
                format!("{at}.{name}"),
                "Tern limits all of a route's requests or none (0% or 100%)".into(),
            ));
        }
    }
    if enabled.is_zero() || enforced.is_zero() {
        return Ok(None);
    }
    let unsupported = [
        ("descriptors", !l.descriptors.is_empty()),
        ("rate_limits", !l.rate_limits.is_empty()),
        (
            "local_rate_limit_per_downstream_connection",
            l.local_rate_limit_per_downstream_connection,
        ),
        (
            "local_cluster_rate_limit",
            l.local_cluster_rate_limit.is_some(),
        ),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, present)| *present) {
        return Err(err(
            format!("{at}.{name}"),
            "not supported; Tern keeps one bucket per key (rate_limit_key in the route's Tern \
             metadata)"
                .into(),
        ));
    }
    if let Some(status) = &l.status
        && status.code != 429
    {
        return Err(err(
            format!("{at}.status"),
            format!("{}: Tern answers a limited request with 429", status.code),
        ));
    }
    let interval = bucket
        .fill_interval
        .as_ref()
        .map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9);
    if interval <= 0.0 {
        return Err(err(
            format!("{at}.token_bucket.fill_interval"),
            "missing or zero".into(),
        ));
    }
    let tokens = bucket.tokens_per_fill.as_ref().map_or(1, |t| t.value);
    if tokens == 0 {
        return Err(err(
            format!("{at}.token_bucket.tokens_per_fill"),
            "must be at least 1".into(),
        ));
    }
    if bucket.max_tokens == 0 {
        return Err(err(
            format!("{at}.token_bucket.max_tokens"),
            "0 refuses every request; Tern's burst is at least 1".into(),
        ));
    }
    let key = match metadata
        .and_then(|m| m.filter_metadata.get("tern"))
        .and_then(|tern| tern.fields.get("rate_limit_key"))
        .map(|v| &v.kind)
    {
        None => "none".to_string(),
        Some(Some(pbuf::value::Kind::StringValue(k))) if valid_key(k) => k.clone(),
        Some(_) => {
            return Err(err(
                format!("{route_field}.metadata.filter_metadata.tern.rate_limit_key"),
                "must be client_ip, header:NAME, peer_identity or none".into(),
            ));
        }
    };
    Ok(Some(RawRateLimit {
        requests_per_second: significant(f64::from(tokens) / interval),
        burst: Some(bucket.max_tokens),
        key: Some(key),
    }))
}

fn fault(f: &HttpFault, at: &str, err: Err<'_>) -> Result<Option<RawFault>, InvalidResource> {
    let unsupported = [
        ("upstream_cluster", !f.upstream_cluster.is_empty()),
        ("downstream_nodes", !f.downstream_nodes.is_empty()),
        ("max_active_faults", f.max_active_faults.is_some()),
        ("response_rate_limit", f.response_rate_limit.is_some()),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, present)| *present) {
        return Err(err(format!("{at}.{name}"), "not supported".into()));
    }
    let delay = match &f.delay {
        None => None,
        Some(d) => {
            let duration = match &d.fault_delay_secifier {
                Some(fault_delay::FaultDelaySecifier::FixedDelay(d)) => duration_text(d),
                Some(fault_delay::FaultDelaySecifier::HeaderDelay(_)) => {
                    return Err(err(
                        format!("{at}.delay.header_delay"),
                        "delays chosen by a request header are not supported".into(),
                    ));
                }
                None => return Err(err(format!("{at}.delay.fixed_delay"), "missing".into())),
            };
            Some(RawFaultDelay {
                percent: percent(
                    d.percentage.as_ref(),
                    &format!("{at}.delay.percentage"),
                    err,
                )?,
                duration,
            })
        }
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let status = match &a.error_type {
                Some(fault_abort::ErrorType::HttpStatus(s)) => match u16::try_from(*s) {
                    Ok(s) if (200..=599).contains(&s) => s,
                    _ => {
                        return Err(err(
                            format!("{at}.abort.http_status"),
                            format!("{s} is not an HTTP status between 200 and 599"),
                        ));
                    }
                },
                Some(fault_abort::ErrorType::GrpcStatus(_)) => {
                    return Err(err(
                        format!("{at}.abort.grpc_status"),
                        "gRPC aborts are not supported (abort with an HTTP status)".into(),
                    ));
                }
                Some(fault_abort::ErrorType::HeaderAbort(_)) => {
                    return Err(err(
                        format!("{at}.abort.header_abort"),
                        "aborts chosen by a request header are not supported".into(),
                    ));
                }
                None => return Err(err(format!("{at}.abort.http_status"), "missing".into())),
            };
            Some(RawFaultAbort {
                percent: percent(
                    a.percentage.as_ref(),
                    &format!("{at}.abort.percentage"),
                    err,
                )?,
                status,
            })
        }
    };
    let header = match f.headers.as_slice() {
        [] => None,
        [one] => Some(present_header(one, &format!("{at}.headers[0]"), err)?),
        _ => {
            return Err(err(
                format!("{at}.headers"),
                "Tern's fault condition is one header's presence".into(),
            ));
        }
    };
    if delay.is_none() && abort.is_none() {
        return Ok(None);
    }
    Ok(Some(RawFault {
        delay,
        abort,
        header,
    }))
}

fn present_header(h: &HeaderMatcher, at: &str, err: Err<'_>) -> Result<String, InvalidResource> {
    match &h.header_match_specifier {
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)) if !h.invert_match => {
            Ok(h.name.to_ascii_lowercase())
        }
        _ => Err(err(
            at.to_string(),
            "only a presence match (present_match: true) is supported".into(),
        )),
    }
}

/// A share of requests, exactly as Envoy states it.
#[derive(Debug, Clone, Copy)]
struct Share {
    numerator: u64,
    denominator: u64,
}

impl Share {
    fn is_zero(self) -> bool {
        self.numerator == 0
    }

    fn is_all(self) -> bool {
        self.numerator >= self.denominator
    }
}

/// Unset is 0 %: Envoy's default for `filter_enabled` and `filter_enforced`.
fn percent_of(p: Option<&RuntimeFractionalPercent>) -> Share {
    share(p.and_then(|p| p.default_value.as_ref())).unwrap_or(Share {
        numerator: 0,
        denominator: 100,
    })
}

fn share(p: Option<&FractionalPercent>) -> Option<Share> {
    let p = p?;
    let denominator = match fractional_percent::DenominatorType::try_from(p.denominator).ok()? {
        fractional_percent::DenominatorType::Hundred => 100,
        fractional_percent::DenominatorType::TenThousand => 10_000,
        fractional_percent::DenominatorType::Million => 1_000_000,
    };
    Some(Share {
        numerator: u64::from(p.numerator),
        denominator,
    })
}

/// A fault's share in Tern's percent; unset is 0 % as in Envoy.
fn percent(p: Option<&FractionalPercent>, at: &str, err: Err<'_>) -> Result<f64, InvalidResource> {
    let Some(p) = p else {
        return Ok(0.0);
    };
    let Some(s) = share(Some(p)) else {
        return Err(err(
            format!("{at}.denominator"),
            format!("unknown denominator {}", p.denominator),
        ));
    };
    if s.numerator > s.denominator {
        return Err(err(
            at.to_string(),
            format!("{}/{} is above 100%", s.numerator, s.denominator),
        ));
    }
    // Exact integers divided once: 5000 per million is exactly the double nearest 0.5.
    Ok((s.numerator * 100) as f64 / s.denominator as f64)
}

fn valid_key(k: &str) -> bool {
    match k {
        "client_ip" | "peer_identity" | "none" => true,
        _ => k
            .strip_prefix("header:")
            .is_some_and(|h| http::HeaderName::from_bytes(h.as_bytes()).is_ok()),
    }
}

/// A fill interval is whole nanoseconds, so `tokens / interval` carries noise near the eighth
/// digit; seven significant digits give back the rate a person wrote.
fn significant(rate: f64) -> f64 {
    if !(rate.is_finite() && rate > 0.0) {
        return rate;
    }
    // Scaled by an exact power of ten either way (10^-3 has no exact binary form).
    let digits = 6 - rate.log10().floor() as i32;
    if digits >= 0 {
        let scale = 10f64.powi(digits);
        (rate * scale).round() / scale
    } else {
        let scale = 10f64.powi(-digits);
        (rate / scale).round() * scale
    }
}

pub(super) fn is<T: Name>(any: &Any) -> bool {
    any.type_url.rsplit('/').next() == Some(T::full_name().as_str())
}

pub(super) fn decode<T: Message + Default>(
    any: &Any,
    at: &str,
    err: Err<'_>,
) -> Result<T, InvalidResource> {
    T::decode(any.value.as_slice()).map_err(|e| err(at.to_string(), format!("cannot decode: {e}")))
}

fn unpack_or_default<T: Message + Default>(
    any: Option<&Any>,
    at: &str,
    err: Err<'_>,
) -> Result<T, InvalidResource> {
    any.map_or_else(|| Ok(T::default()), |a| decode(a, at, err))
}
