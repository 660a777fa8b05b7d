//! Sidecar injection into Kubernetes manifests (`tern-inject`): every pod template gets the
//! interception init container and the proxy as a native sidecar, with the identity, the
//! CA and the control plane wired in. Pure: documents in, documents out; the binary only
//! reads and writes them.
//!
//! The identity is not written into the manifest: the kubelet expands `$(POD_NAMESPACE)`
//! and `$(POD_SERVICE_ACCOUNT)` in the proxy's arguments from the Downward API, so one
//! template serves whatever namespace it is applied in and whatever account it runs as,
//! and the proxy asks the CA for exactly the identity its token proves.

use serde_json::{Map, Value, json};

/// The proxy container's name. The control plane's Kubernetes source recognises a meshed
/// pod by it, and a template that has it is not injected twice.
pub const PROXY_CONTAINER: &str = "tern-proxy";
pub const INIT_CONTAINER: &str = "tern-init";
/// `disabled` on a workload or its pod template leaves it alone.
pub const INJECT_ANNOTATION: &str = "tern.dev/inject";
/// Written on every injected pod template: which injector did it.
pub const INJECTED_ANNOTATION: &str = "tern.dev/injected";
/// The uid the interception rules exempt: the proxy's own traffic must not loop.
pub const PROXY_UID: u64 = 1337;
pub const ADMIN_PORT: u16 = 15000;

/// What the injected containers point at.
#[derive(Debug, Clone)]
pub struct InjectOptions {
    pub proxy_image: String,
    pub init_image: String,
    /// The control plane's xDS address, `host:port`.
    pub xds: String,
    /// The mesh CA's address, `host:port`, and the name its certificate carries.
    pub ca: String,
    pub ca_server_name: String,
    /// The ConfigMap holding the mesh's trust anchors as `roots.pem`.
    pub roots_config_map: String,
    pub trust_domain: String,
    /// The projected token's audience: what the CA's TokenReview checks.
    pub token_audience: String,
    /// Inbound ports the rules leave alone (the admin port is always among them).
    pub exclude_inbound_ports: Vec<u16>,
}

impl Default for InjectOptions {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION");
        InjectOptions {
            proxy_image: format!("ghcr.io/tern-mesh/tern:{version}"),
            init_image: format!("ghcr.io/tern-mesh/tern-init:{version}"),
            xds: "tern-control-plane.tern-system.svc:15010".into(),
            ca: "tern-control-plane.tern-system.svc:15012".into(),
            ca_server_name: "tern-control-plane.tern-system.svc".into(),
            roots_config_map: "tern-ca-roots".into(),
            trust_domain: "cluster.local".into(),
            token_audience: "tern-ca".into(),
            exclude_inbound_ports: Vec::new(),
        }
    }
}

/// What became of one document (or of one item of a `List`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected {
        kind: String,
        name: String,
    },
    Skipped {
        kind: String,
        name: String,
        reason: Skip,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not a kind that runs pods (Service, ConfigMap, ...): passed through as it is.
    NoPods,
    AlreadyInjected,
    /// `tern.dev/inject: disabled`.
    Disabled,
    /// The pod shares the node's network namespace: interception rules would capture the
    /// node's traffic.
    HostNetwork,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NoPods => "runs no pods",
            Skip::AlreadyInjected => "already has a tern-proxy container",
            Skip::Disabled => "tern.dev/inject: disabled",
            Skip::HostNetwork => {
                "hostNetwork pods are not injected (the rules would capture the node's traffic)"
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("{kind} {name}: {field} must be {expected}")]
    Shape {
        kind: String,
        name: String,
        field: String,
        expected: &'static str,
    },
}

/// Injects one document in place and says what was done (a `List` yields one outcome per
/// item). A document that runs no pods is left untouched.
pub fn inject(doc: &mut Value, opts: &InjectOptions) -> Result<Vec<Outcome>, InjectError> {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if kind == "List" || kind.ends_with("List") {
        let mut out = Vec::new();
        if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                out.extend(inject(item, opts)?);
            }
        }
        return Ok(out);
    }
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)")
        .to_string();
    let Some(template) = pod_template_path(&kind) else {
        return Ok(vec![Outcome::Skipped {
            kind,
            name,
            reason: Skip::NoPods,
        }]);
    };
    let shape = |field: &str, expected| InjectError::Shape {
        kind: kind.clone(),
        name: name.clone(),
        field: field.to_string(),
        expected,
    };
    if disabled(doc.pointer("/metadata")) {
        return Ok(vec![skipped(&kind, &name, Skip::Disabled)]);
    }
    // A Pod is its own template: its metadata and spec are at the top.
    let pod = if template.is_empty() {
        &mut *doc
    } else {
        doc.pointer_mut(template)
            .ok_or_else(|| shape(template, "present in a workload that runs pods"))?
    };
    if !pod.is_object() {
        return Err(shape(template, "an object"));
    }
    if disabled(pod.pointer("/metadata")) {
        return Ok(vec![skipped(&kind, &name, Skip::Disabled)]);
    }
    let spec_field = format!("{template}/spec");
    let spec = pod
        .get("spec")
        .ok_or_else(|| shape(&spec_field, "present"))?;
    if !spec.is_object() {
        return Err(shape(&spec_field, "an object"));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(vec![skipped(&kind, &name, Skip::HostNetwork)]);
    }
    for list in ["containers", "initContainers"] {
        match spec.get(list) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                if items
                    .iter()
                    .any(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_CONTAINER))
                {
                    return Ok(vec![skipped(&kind, &name, Skip::AlreadyInjected)]);
                }
            }
            Some(_) => return Err(shape(&format!("{spec_field}/{list}"), "a list")),
        }
    }
    if spec
        .get("volumes")
        .is_some_and(|v| !v.is_null() && !v.is_array())
    {
        return Err(shape(&format!("{spec_field}/volumes"), "a list"));
    }
    annotate(pod);
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return Err(shape(&spec_field, "an object"));
    };
    // The rules first, then the proxy: the app's own init containers (after them) already
    // talk through the mesh.
    extend_list(
        spec,
        "initContainers",
        vec![init_container(opts), proxy_container(opts)],
        Vec::new(),
    );
    extend_list(spec, "volumes", Vec::new(), volumes(opts).into());
    Ok(vec![Outcome::Injected { kind, name }])
}

fn skipped(kind: &str, name: &str, reason: Skip) -> Outcome {
    Outcome::Skipped {
        kind: kind.to_string(),
        name: name.to_string(),
        reason,
    }
}

/// Where a kind keeps its pod template (`""`: the document is the pod).
fn pod_template_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn disabled(metadata: Option<&Value>) -> bool {
    metadata
        .and_then(|m| m.pointer("/annotations"))
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .and_then(Value::as_str)
        .is_some_and(|v| v.eq_ignore_ascii_case("disabled") || v.eq_ignore_ascii_case("false"))
}

fn annotate(pod: &mut Value) {
    let annotations = pod
        .as_object_mut()
        .and_then(|pod| object_in(pod, "metadata"))
        .and_then(|metadata| object_in(metadata, "annotations"));
    if let Some(annotations) = annotations {
        annotations.insert(
            INJECTED_ANNOTATION.into(),
            Value::String(format!("tern-inject/{}", env!("CARGO_PKG_VERSION"))),
        );
    }
}

/// The object under `key`, made if absent (or replacing `null` and other non-objects). An
/// existing key keeps its place in the document.
fn object_in<'a>(map: &'a mut Map<String, Value>, key: &str) -> Option<&'a mut Map<String, Value>> {
    if !map.get(key).is_some_and(Value::is_object) {
        map.insert(key.to_string(), Value::Object(Map::new()));
    }
    map.get_mut(key).and_then(Value::as_object_mut)
}

/// Puts `front` before and `back` after the list under `key`; `null` (an empty key in
/// YAML) is an empty list, anything else was refused before.
fn extend_list(map: &mut Map<String, Value>, key: &str, front: Vec<Value>, back: Vec<Value>) {
    if !map.get(key).is_some_and(Value::is_array) {
        map.insert(key.to_string(), Value::Array(Vec::new()));
    }
    if let Some(Value::Array(list)) = map.get_mut(key) {
        list.splice(0..0, front);
        list.extend(back);
    }
}

fn init_container(opts: &InjectOptions) -> Value {
    let mut excluded = vec![ADMIN_PORT];
    excluded.extend(opts.exclude_inbound_ports.iter().copied());
    excluded.sort_unstable();
    excluded.dedup();
    let excluded = excluded
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    json!({
        "name": INIT_CONTAINER,
        "image": opts.init_image,
        "args": ["--proxy-uid", PROXY_UID.to_string(), "--exclude-inbound-ports", excluded],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] }
        }
    })
}

fn proxy_container(opts: &InjectOptions) -> Value {
    json!({
        "name": PROXY_CONTAINER,
        "image": opts.proxy_image,
        // A native sidecar (Kubernetes 1.29+): started before the app and stopped after it,
        // and it does not keep a Job's pod alive once the app has exited.
        "restartPolicy": "Always",
        "args": [
            format!("--xds={}", opts.xds),
            format!(
                "--identity=spiffe://{}/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)",
                opts.trust_domain
            ),
            format!("--ca={}", opts.ca),
            format!("--ca-server-name={}", opts.ca_server_name),
            "--ca-roots=/etc/tern/roots/roots.pem",
            "--token-file=/var/run/secrets/tern/token",
            format!("--admin-address=0.0.0.0:{ADMIN_PORT}"),
            "--log-json"
        ],
        "env": [
            { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
            { "name": "POD_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
            { "name": "POD_SERVICE_ACCOUNT", "valueFrom": { "fieldRef": { "fieldPath": "spec.serviceAccountName" } } }
        ],
        "ports": [ { "name": "tern-admin", "containerPort": ADMIN_PORT } ],
        "startupProbe": {
            "httpGet": { "path": "/ready", "port": ADMIN_PORT },
            "periodSeconds": 1,
            "failureThreshold": 60
        },
        "readinessProbe": { "httpGet": { "path": "/ready", "port": ADMIN_PORT } },
        "resources": {
            "requests": { "cpu": "50m", "memory": "32Mi" },
            "limits": { "memory": "128Mi" }
        },
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] }
        },
        "volumeMounts": [
            { "name": "tern-token", "mountPath": "/var/run/secrets/tern", "readOnly": true },
            { "name": "tern-roots", "mountPath": "/etc/tern/roots", "readOnly": true }
        ]
    })
}

fn volumes(opts: &InjectOptions) -> [Value; 2] {
    [
        // A short-lived token for the CA's audience only, rotated by the kubelet: the key
        // stays in the proxy's memory, the token is all that is on disk.
        json!({
            "name": "tern-token",
            "projected": { "sources": [ { "serviceAccountToken": {
                "path": "token", "audience": opts.token_audience, "expirationSeconds": 3600
            } } ] }
        }),
        json!({ "name": "tern-roots", "configMap": { "name": opts.roots_config_map } }),
    ]
}

#[cfg(test)]
mod tests;
