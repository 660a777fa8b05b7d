use std::sync::Arc;

use super::*;
use crate::metrics::Metrics;

fn snapshot() -> Snapshot {
    let config = crate::config::parse_yaml(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - match: { host: api.local, path_prefix: /v2, headers: { x-canary: "1" } }
        backends: [ { service: v2, weight: 1 }, { service: api, weight: 3 } ]
        timeout: 2s
        retry: { attempts: 2, on: [5xx] }
      - match: { host: api.local }
        backends: [ { service: api } ]
  - name: db
    address: 127.0.0.1:0
    protocol: tcp
    service: pg
services:
  - { name: api, protocol: http1, endpoints: [ { address: "10.0.0.1:80" }, { address: "10.0.0.2:80", weight: 3 } ] }
  - { name: v2, protocol: http1, load_balancer: peak_ewma, endpoints: [ { address: "10.0.1.1:80" } ] }
  - { name: pg, protocol: tcp, endpoints: [ { address: "10.0.2.1:5432" } ] }
"#,
    )
    .unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    Snapshot::build(
        Arc::new(config),
        "test".into(),
        &Snapshot::empty(),
        &metrics,
        None,
    )
}

fn ask(q: &str) -> Result<Value, String> {
    explain(&snapshot(), &Question::parse(q)?, None, Instant::now())
}

#[tokio::test]
async fn the_same_route_the_request_path_would_take() {
    let v = ask("listener=web&host=api.local:8080&path=%2Fv2%2Fusers&header=x-canary:1").unwrap();
    assert_eq!(v["route"]["index"], 0);
    assert_eq!(v["route"]["timeout_ms"], 2000);
    assert_eq!(v["route"]["retry"]["attempts"], 2);
    let backends = v["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    assert_eq!(backends[0]["service"], "v2");
    assert_eq!(backends[0]["share"], 0.25);
    assert_eq!(backends[0]["load_balancer"], "peak_ewma");
    assert_eq!(backends[1]["endpoints"][1]["weight"], 3);
    assert_eq!(backends[1]["endpoints"][1]["eligible"], true);
    assert_eq!(v["config"]["version"], 1);

    // Without the canary header, the second route.
    let v = ask("listener=web&host=api.local&path=/v2/users").unwrap();
    assert_eq!(v["route"]["index"], 1);
    assert!(v["route"]["retry"].is_string(), "{}", v["route"]["retry"]);
    // No route at all.
    let v = ask("listener=web&host=other&path=/").unwrap();
    assert!(v["route"].is_null());
    assert!(v["decision"].as_str().unwrap().contains("404"));
}

#[tokio::test]
async fn tcp_listeners_name_their_service_and_text_reads_well() {
    let v = ask("listener=db").unwrap();
    assert_eq!(v["opaque_tcp"]["service"], "pg");
    let text = render_text(&ask("listener=web&host=api.local&path=/").unwrap());
    assert!(text.contains("route    #1"), "{text}");
    assert!(text.contains("10.0.0.2:80"), "{text}");
}

#[test]
fn bad_questions_say_what_is_wrong() {
    assert!(Question::parse("host=x").unwrap_err().contains("listener"));
    assert!(
        Question::parse("listener=web&header=nocolon")
            .unwrap_err()
            .contains("name:value")
    );
    assert!(
        Question::parse("listener=web&path=relative")
            .unwrap_err()
            .contains("start with /")
    );
    assert!(
        Question::parse("listener=web&bogus=1")
            .unwrap_err()
            .contains("bogus")
    );
    assert!(Question::parse("listener=web&path=%zz").is_err());
    let e = explain(
        &snapshot(),
        &Question::parse("listener=nope").unwrap(),
        None,
        Instant::now(),
    )
    .unwrap_err();
    assert!(e.contains("db, web"), "{e}");
}
