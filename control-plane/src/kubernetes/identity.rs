//! Which SPIFFE identity a Service port's endpoints present, derived from the pods behind
//! them (pure).
//!
//! The rules (ARCHITECTURE.md and README.md say the same):
//! - A pod is **meshed** when it runs the Tern sidecar: a container, or an init container
//!   with `restartPolicy: Always` (a native sidecar), named `tern-proxy`. That name is what
//!   `deploy/kubernetes/sidecar-example.yaml` uses and what an injector must keep. An init
//!   container of that name without `restartPolicy: Always` exits before the app starts, so
//!   it is no sidecar.
//! - A meshed pod's identity is `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`, what
//!   the CA issues for its token; no `serviceAccountName` means `default`, as the API server
//!   assigns.
//! - An endpoint without a Pod `targetRef` (a hand-made slice pointing outside the cluster) is
//!   not meshed: nothing there can hold a mesh certificate.
//! - An endpoint whose pod is not in the cache (or whose `targetRef.uid` names an older pod
//!   of that name) is **unknown**. It is withheld until its pod is seen: serving it plaintext
//!   could talk in clear to a meshed pod, and mTLS is not known to work either.
//!
//! Per port, over its ready endpoints: any meshed → mTLS to the identity most of them
//! present (ties: the ID that sorts first); endpoints that cannot present it (unmeshed, or
//! another service account) are withheld, because plaintext would silently downgrade the
//! meshed pods and a mesh handshake with them can only fail. None meshed → plaintext, as
//! without a mesh. A Service annotation `tern.dev/identity` replaces all of this.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::api::discovery::v1::Endpoint;
use tern_proxy::identity::{InvalidSpiffeId, SpiffeId};

/// The container name that marks a pod as running the Tern sidecar.
pub const SIDECAR_CONTAINER: &str = "tern-proxy";

/// The Kubernetes default when a pod names no service account.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// A SPIFFE trust domain (`cluster.local`), checked once so that every ID formed in it is
/// valid for any valid namespace and service account name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustDomain(Arc<str>);

/// Why `--trust-domain` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("trust domain {value:?}: {reason}")]
pub struct InvalidTrustDomain {
    pub value: String,
    pub reason: InvalidSpiffeId,
}

/// What the endpoint behind one address is, as far as the mesh can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Workload {
    /// A pod running the sidecar, whose certificate carries this ID.
    Meshed(SpiffeId),
    /// No sidecar: a pod without one, or no pod at all.
    Plain,
    /// A pod we have not seen (yet).
    Unknown,
}

/// How one Service port is spoken to and which of its endpoints can be.
#[derive(Debug, PartialEq)]
pub(crate) struct Decision {
    pub identity: Option<SpiffeId>,
    /// Only endpoints of this workload are served; `None`: all are (an annotation said so).
    serve_only: Option<Workload>,
    pub withheld: Withheld,
}

/// Ready endpoints left out by a [`Decision`], by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Withheld {
    /// Without the sidecar, beside meshed ones.
    pub unmeshed: usize,
    /// Meshed under another identity than the chosen one.
    pub other_identity: usize,
    /// Pods not seen.
    pub unknown: usize,
}

/// What a `tern.dev/identity` annotation asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Override {
    /// mTLS to this identity, for every endpoint.
    Identity(SpiffeId),
    /// `none`: plaintext to every endpoint.
    Plaintext,
}

/// The cached pods by (namespace, name).
pub(crate) type Pods<'a> = HashMap<(&'a str, &'a str), &'a Pod>;

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://THIS/ns/NAMESPACE/sa/SERVICE_ACCOUNT`, `None` when the names cannot be
    /// path segments (the API server's name rules make that impossible for real objects).
    pub(crate) fn service_account(&self, namespace: &str, account: &str) -> Option<SpiffeId> {
        SpiffeId::kubernetes(&self.0, namespace, account).ok()
    }
}

impl FromStr for TrustDomain {
    type Err = InvalidTrustDomain;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        // With a '/' the rest would read as a path and the ID below would still parse.
        let invalid = |reason| InvalidTrustDomain {
            value: value.to_string(),
            reason,
        };
        if value.contains('/') {
            return Err(invalid(InvalidSpiffeId::TrustDomainChar('/')));
        }
        SpiffeId::kubernetes(value, "ns", "sa").map_err(invalid)?;
        Ok(Self(Arc::from(value)))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Decision {
    pub fn serves(&self, workload: &Workload) -> bool {
        self.serve_only.as_ref().is_none_or(|only| only == workload)
    }
}

/// The pods by (namespace, name), for looking up endpoints' `targetRef`s.
pub(crate) fn index_pods<P: std::borrow::Borrow<Pod>>(pods: &[P]) -> Pods<'_> {
    pods.iter()
        .filter_map(|pod| {
            let pod = pod.borrow();
            let meta = &pod.metadata;
            Some(((meta.namespace.as_deref()?, meta.name.as_deref()?), pod))
        })
        .collect()
}

/// What the endpoint is; `namespace` is its slice's, the default for its `targetRef`.
pub(crate) fn workload_of(
    endpoint: &Endpoint,
    namespace: &str,
    pods: &Pods,
    trust_domain: &TrustDomain,
) -> Workload {
    let Some(target) = &endpoint.target_ref else {
        return Workload::Plain;
    };
    if target.kind.as_deref() != Some("Pod") {
        return Workload::Plain;
    }
    let namespace = target.namespace.as_deref().unwrap_or(namespace);
    let Some(pod) = target
        .name
        .as_deref()
        .and_then(|name| pods.get(&(namespace, name)))
    else {
        return Workload::Unknown;
    };
    // A pod recreated under the same name (a StatefulSet's) may run differently; the slice
    // speaks of the old one until the controller catches up.
    if let (Some(want), Some(have)) = (&target.uid, &pod.metadata.uid)
        && want != have
    {
        return Workload::Unknown;
    }
    if !runs_sidecar(pod) {
        return Workload::Plain;
    }
    let spec = pod.spec.as_ref();
    let account = spec
        .and_then(|s| s.service_account_name.as_deref())
        // The deprecated alias, still honoured by the API server.
        .or_else(|| spec.and_then(|s| s.service_account.as_deref()))
        .filter(|a| !a.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
    // A name that cannot form an ID is treated like a pod we cannot see: withheld.
    trust_domain
        .service_account(namespace, account)
        .map_or(Workload::Unknown, Workload::Meshed)
}

/// See the module doc for the rule.
pub(crate) fn runs_sidecar(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    let is_sidecar = |c: &Container| c.name == SIDECAR_CONTAINER;
    spec.containers.iter().any(is_sidecar)
        || spec
            .init_containers
            .iter()
            .flatten()
            .any(|c| is_sidecar(c) && c.restart_policy.as_deref() == Some("Always"))
}

/// Decides one port from its ready endpoints' workloads (one per address).
pub(crate) fn decide<'a>(
    workloads: impl IntoIterator<Item = &'a Workload>,
    annotation: Option<&Override>,
) -> Decision {
    match annotation {
        Some(Override::Identity(id)) => {
            return Decision {
                identity: Some(id.clone()),
                serve_only: None,
                withheld: Withheld::default(),
            };
        }
        Some(Override::Plaintext) => {
            return Decision {
                identity: None,
                serve_only: None,
                withheld: Withheld::default(),
            };
        }
        None => {}
    }
    let mut meshed: BTreeMap<&SpiffeId, usize> = BTreeMap::new();
    let mut plain = 0;
    let mut unknown = 0;
    for workload in workloads {
        match workload {
            Workload::Meshed(id) => *meshed.entry(id).or_default() += 1,
            Workload::Plain => plain += 1,
            Workload::Unknown => unknown += 1,
        }
    }
    // Most endpoints first; among equals the smallest ID, so the choice does not depend on
    // the order the cache hands objects over.
    let chosen = meshed
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(id, count)| ((*id).clone(), *count));
    match chosen {
        Some((id, count)) => Decision {
            identity: Some(id.clone()),
            serve_only: Some(Workload::Meshed(id)),
            withheld: Withheld {
                unmeshed: plain,
                other_identity: meshed.values().sum::<usize>() - count,
                unknown,
            },
        },
        None => Decision {
            identity: None,
            serve_only: Some(Workload::Plain),
            withheld: Withheld {
                unknown,
                ..Withheld::default()
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn td() -> TrustDomain {
        "cluster.local".parse().expect("valid trust domain")
    }

    fn pod(spec: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "namespace": "shop", "name": "web-1", "uid": "u1" },
            "spec": spec,
        }))
        .expect("valid Pod")
    }

    fn endpoint(target: Value) -> Endpoint {
        serde_json::from_value(json!({ "addresses": ["10.0.0.1"], "targetRef": target }))
            .expect("valid Endpoint")
    }

    fn id(text: &str) -> SpiffeId {
        text.parse().expect("valid SPIFFE ID")
    }

    #[test]
    fn trust_domains_are_checked_once() {
        assert_eq!(td().as_str(), "cluster.local");
        for bad in ["", "Cluster.local", "cluster.local/x", "a b"] {
            let err = bad.parse::<TrustDomain>().unwrap_err();
            assert_eq!(err.value, bad);
        }
        let err = "UPPER".parse::<TrustDomain>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "trust domain \"UPPER\": the trust domain may hold only a-z, 0-9, '.', '-' and '_' \
             (found 'U')"
        );
    }

    #[test]
    fn a_container_or_native_sidecar_named_tern_proxy_is_the_sidecar() {
        let containers =
            pod(json!({ "containers": [{ "name": "app" }, { "name": "tern-proxy" }] }));
        let native = pod(json!({
            "initContainers": [{ "name": "tern-init" }, { "name": "tern-proxy", "restartPolicy": "Always" }],
            "containers": [{ "name": "app" }],
        }));
        let plain_init = pod(json!({
            "initContainers": [{ "name": "tern-proxy" }],
            "containers": [{ "name": "app" }],
        }));
        let other = pod(json!({ "containers": [{ "name": "app" }, { "name": "envoy" }] }));
        assert!(runs_sidecar(&containers));
        assert!(runs_sidecar(&native));
        assert!(
            !runs_sidecar(&plain_init),
            "an init container that exits is no sidecar"
        );
        assert!(!runs_sidecar(&other));
        assert!(!runs_sidecar(&Pod::default()));
    }

    #[test]
    fn workloads_come_from_the_target_pod() {
        let meshed = pod(json!({
            "serviceAccountName": "web",
            "containers": [{ "name": "app" }, { "name": "tern-proxy" }],
        }));
        let no_account = pod(json!({ "containers": [{ "name": "tern-proxy" }] }));
        let unmeshed =
            pod(json!({ "serviceAccountName": "web", "containers": [{ "name": "app" }] }));
        let target = json!({ "kind": "Pod", "name": "web-1", "namespace": "shop", "uid": "u1" });
        let of = |pod: &Pod, target: Value| {
            let pods = index_pods(std::slice::from_ref(pod));
            workload_of(&endpoint(target), "shop", &pods, &td())
        };
        assert_eq!(
            of(&meshed, target.clone()),
            Workload::Meshed(id("spiffe://cluster.local/ns/shop/sa/web"))
        );
        assert_eq!(
            of(&no_account, json!({ "kind": "Pod", "name": "web-1" })),
            Workload::Meshed(id("spiffe://cluster.local/ns/shop/sa/default")),
            "no namespace in the targetRef means the slice's; no account means default"
        );
        assert_eq!(of(&unmeshed, target.clone()), Workload::Plain);
        assert_eq!(
            of(
                &meshed,
                json!({ "kind": "Pod", "name": "web-2", "namespace": "shop" })
            ),
            Workload::Unknown
        );
        assert_eq!(
            of(
                &meshed,
                json!({ "kind": "Pod", "name": "web-1", "namespace": "shop", "uid": "u0" })
            ),
            Workload::Unknown,
            "a pod recreated under the same name is not the one the slice means"
        );
        assert_eq!(
            of(&meshed, json!({ "kind": "Node", "name": "web-1" })),
            Workload::Plain
        );
        let pods = index_pods(std::slice::from_ref(&meshed));
        let untargeted: Endpoint =
            serde_json::from_value(json!({ "addresses": ["10.0.0.1"] })).expect("valid Endpoint");
        assert_eq!(
            workload_of(&untargeted, "shop", &pods, &td()),
            Workload::Plain
        );
    }

    #[test]
    fn the_most_common_identity_wins_and_the_rest_are_withheld() {
        let a = Workload::Meshed(id("spiffe://cluster.local/ns/shop/sa/a"));
        let b = Workload::Meshed(id("spiffe://cluster.local/ns/shop/sa/b"));
        let decision = decide([&b, &a, &b, &Workload::Plain, &Workload::Unknown], None);
        assert_eq!(
            decision.identity,
            Some(id("spiffe://cluster.local/ns/shop/sa/b"))
        );
        assert!(decision.serves(&b));
        assert!(!decision.serves(&a));
        assert!(!decision.serves(&Workload::Plain));
        assert!(!decision.serves(&Workload::Unknown));
        assert_eq!(
            decision.withheld,
            Withheld {
                unmeshed: 1,
                other_identity: 1,
                unknown: 1
            }
        );
        // A tie goes to the ID that sorts first, whatever the order.
        for order in [[&a, &b], [&b, &a]] {
            assert_eq!(
                decide(order, None).identity,
                Some(id("spiffe://cluster.local/ns/shop/sa/a"))
            );
        }
    }

    #[test]
    fn without_meshed_pods_plaintext_but_never_to_unknown_pods() {
        let decision = decide([&Workload::Plain, &Workload::Unknown], None);
        assert_eq!(decision.identity, None);
        assert!(decision.serves(&Workload::Plain));
        assert!(!decision.serves(&Workload::Unknown));
        assert_eq!(decision.withheld.unknown, 1);
        assert_eq!(decide([], None).identity, None);
    }

    #[test]
    fn an_override_serves_every_endpoint() {
        let given = id("spiffe://cluster.local/ns/shop/sa/pinned");
        let meshed = Workload::Meshed(id("spiffe://cluster.local/ns/shop/sa/web"));
        let all = [&meshed, &Workload::Plain, &Workload::Unknown];
        let pinned = decide(all, Some(&Override::Identity(given.clone())));
        assert_eq!(pinned.identity, Some(given));
        let plaintext = decide(all, Some(&Override::Plaintext));
        assert_eq!(plaintext.identity, None);
        for decision in [pinned, plaintext] {
            assert!(all.iter().all(|w| decision.serves(w)), "{decision:?}");
            assert_eq!(decision.withheld, Withheld::default());
        }
    }
}
