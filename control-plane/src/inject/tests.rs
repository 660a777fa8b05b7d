use serde_json::{Value, json};

use super::*;

fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "web", "namespace": "shop" },
        "spec": {
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": {
                    "serviceAccountName": "web",
                    "initContainers": [ { "name": "migrate", "image": "migrate:1" } ],
                    "containers": [ { "name": "web", "image": "web:1" } ],
                    "volumes": [ { "name": "data", "emptyDir": {} } ]
                }
            }
        }
    })
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

#[test]
fn a_deployment_gets_the_rules_then_the_sidecar_before_its_own_init_containers() {
    let mut doc = deployment();
    let out = inject(&mut doc, &InjectOptions::default()).unwrap();
    assert_eq!(
        out,
        vec![Outcome::Injected {
            kind: "Deployment".into(),
            name: "web".into()
        }]
    );
    let spec = &doc["spec"]["template"]["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["tern-init", "tern-proxy", "migrate"]
    );
    assert_eq!(names(&spec["containers"]), ["web"], "the app is untouched");
    assert_eq!(
        names(&spec["volumes"]),
        ["data", "tern-token", "tern-roots"]
    );
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    let args: Vec<&str> = proxy["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(
            &"--identity=spiffe://cluster.local/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)"
        ),
        "{args:?}"
    );
    // Every variable the arguments name is defined from the Downward API.
    let env: Vec<(&str, &str)> = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(env.contains(&("POD_NAMESPACE", "metadata.namespace")));
    assert!(env.contains(&("POD_SERVICE_ACCOUNT", "spec.serviceAccountName")));
    let init_args = &spec["initContainers"][0]["args"];
    assert_eq!(
        init_args,
        &json!(["--proxy-uid", "1337", "--exclude-inbound-ports", "15000"])
    );
    assert_eq!(
        spec["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "tern-ca"
    );
    assert!(
        doc["spec"]["template"]["metadata"]["annotations"][INJECTED_ANNOTATION]
            .as_str()
            .unwrap()
            .starts_with("tern-inject/")
    );
}

#[test]
fn injecting_twice_changes_nothing_the_second_time() {
    let mut doc = deployment();
    inject(&mut doc, &InjectOptions::default()).unwrap();
    let once = doc.clone();
    let out = inject(&mut doc, &InjectOptions::default()).unwrap();
    assert!(matches!(
        out[0],
        Outcome::Skipped {
            reason: Skip::AlreadyInjected,
            ..
        }
    ));
    assert_eq!(doc, once);
}

#[test]
fn every_kind_that_runs_pods_is_found_and_the_rest_pass_through() {
    let spec = json!({ "containers": [ { "name": "app", "image": "app:1" } ] });
    let template = json!({ "spec": spec });
    let docs = [
        json!({ "kind": "Pod", "metadata": { "name": "p" }, "spec": spec }),
        json!({ "kind": "StatefulSet", "metadata": { "name": "s" }, "spec": { "template": template } }),
        json!({ "kind": "DaemonSet", "metadata": { "name": "d" }, "spec": { "template": template } }),
        json!({ "kind": "Job", "metadata": { "name": "j" }, "spec": { "template": template } }),
        json!({ "kind": "CronJob", "metadata": { "name": "c" },
                "spec": { "jobTemplate": { "spec": { "template": template } } } }),
    ];
    let paths = [
        "/spec",
        "/spec/template/spec",
        "/spec/template/spec",
        "/spec/template/spec",
        "/spec/jobTemplate/spec/template/spec",
    ];
    for (mut doc, path) in docs.into_iter().zip(paths) {
        let out = inject(&mut doc, &InjectOptions::default()).unwrap();
        assert!(matches!(out[0], Outcome::Injected { .. }), "{doc}");
        let spec = doc.pointer(path).unwrap();
        assert_eq!(
            names(&spec["initContainers"]),
            ["tern-init", "tern-proxy"],
            "{doc}"
        );
        assert_eq!(
            names(&spec["volumes"]),
            ["tern-token", "tern-roots"],
            "{doc}"
        );
    }
    let mut service =
        json!({ "kind": "Service", "metadata": { "name": "web" }, "spec": { "ports": [] } });
    let before = service.clone();
    let out = inject(&mut service, &InjectOptions::default()).unwrap();
    assert!(matches!(
        out[0],
        Outcome::Skipped {
            reason: Skip::NoPods,
            ..
        }
    ));
    assert_eq!(service, before);
}

#[test]
fn a_list_is_injected_item_by_item() {
    let mut list = json!({ "kind": "List", "items": [
        deployment(),
        { "kind": "ConfigMap", "metadata": { "name": "cfg" } }
    ] });
    let out = inject(&mut list, &InjectOptions::default()).unwrap();
    assert_eq!(out.len(), 2);
    assert!(matches!(out[0], Outcome::Injected { .. }));
    assert!(matches!(
        out[1],
        Outcome::Skipped {
            reason: Skip::NoPods,
            ..
        }
    ));
    assert_eq!(
        names(&list["items"][0]["spec"]["template"]["spec"]["initContainers"])[..2],
        ["tern-init", "tern-proxy"]
    );
}

#[test]
fn opted_out_and_host_network_pods_are_left_alone() {
    let mut on_workload = deployment();
    on_workload["metadata"]["annotations"] = json!({ "tern.dev/inject": "disabled" });
    let mut on_template = deployment();
    on_template["spec"]["template"]["metadata"]["annotations"] =
        json!({ "tern.dev/inject": "false" });
    let mut host = deployment();
    host["spec"]["template"]["spec"]["hostNetwork"] = json!(true);
    for (mut doc, reason) in [
        (on_workload, Skip::Disabled),
        (on_template, Skip::Disabled),
        (host, Skip::HostNetwork),
    ] {
        let before = doc.clone();
        let out = inject(&mut doc, &InjectOptions::default()).unwrap();
        assert_eq!(
            out[0],
            Outcome::Skipped {
                kind: "Deployment".into(),
                name: "web".into(),
                reason
            }
        );
        assert_eq!(doc, before);
    }
}

#[test]
fn a_malformed_template_is_refused_with_the_field_named() {
    let mut no_template =
        json!({ "kind": "Deployment", "metadata": { "name": "web" }, "spec": {} });
    let e = inject(&mut no_template, &InjectOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Deployment web: /spec/template must be present in a workload that runs pods"
    );
    let mut bad_list = deployment();
    bad_list["spec"]["template"]["spec"]["initContainers"] = json!("migrate");
    let e = inject(&mut bad_list, &InjectOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Deployment web: /spec/template/spec/initContainers must be a list"
    );
    let mut bad_volumes = deployment();
    bad_volumes["spec"]["template"]["spec"]["volumes"] = json!({ "data": {} });
    let e = inject(&mut bad_volumes, &InjectOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Deployment web: /spec/template/spec/volumes must be a list"
    );
}

#[test]
fn options_reach_the_containers() {
    let opts = InjectOptions {
        proxy_image: "registry.local/tern:dev".into(),
        trust_domain: "prod.example".into(),
        exclude_inbound_ports: vec![9090, 15000, 8081],
        ..InjectOptions::default()
    };
    let mut doc = deployment();
    inject(&mut doc, &opts).unwrap();
    let init = &doc["spec"]["template"]["spec"]["initContainers"];
    assert_eq!(init[1]["image"], "registry.local/tern:dev");
    assert!(init[1]["args"].as_array().unwrap().iter().any(|a| {
        a.as_str()
            .unwrap()
            .starts_with("--identity=spiffe://prod.example/ns/")
    }));
    assert_eq!(init[0]["args"][3], "8081,9090,15000");
}
