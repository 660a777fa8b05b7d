//! Access logs on real sockets: one JSON (or templated text) line per HTTP request and per
//! TCP connection, written by the background writer; SIGUSR1 reopens the file.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(log: &Path, format: &str, api: SocketAddr, echo: SocketAddr) -> String {
    let dead = format!("127.0.0.1:{}", free_port());
    format!(
        r#"
telemetry:
  access_log: {{ path: "{log}", {format} }}
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - match: {{ path_prefix: /dead }}
        backends: [ {{ service: dead }} ]
      - match: {{ host: api.local }}
        backends: [ {{ service: api }} ]
  - name: raw
    address: 127.0.0.1:0
    protocol: tcp
    service: echo
services:
  - name: api
    protocol: http1
    endpoints: [ {{ address: "{api}" }} ]
  - name: dead
    protocol: http1
    endpoints: [ {{ address: "{dead}" }} ]
  - name: echo
    protocol: tcp
    endpoints: [ {{ address: "{echo}" }} ]
"#,
        log = log.display()
    )
}

/// Waits until the file holds `n` lines (the writer is asynchronous), then returns them.
async fn lines(path: &Path, n: usize) -> Vec<String> {
    for _ in 0..250 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "fewer than {n} lines in {}:\n{}",
        path.display(),
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

#[tokio::test]
async fn json_lines_describe_each_request_and_connection() {
    let dir = TempDir::new("access-json");
    let log = dir.0.join("access.log");
    let api = Upstream::start("api").await;
    let echo = tcp_echo().await;
    let proxy = Proxy::start(&config(&log, "format: json", api.addr, echo)).await;
    let web = proxy.addr("web");
    let client = http1_client();

    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = get(
        &client,
        web,
        "api.local",
        "/v1/items?x=1",
        &[("traceparent", trace)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        get(&client, web, "nowhere.local", "/", &[]).await.status,
        404
    );
    assert_eq!(
        get(&client, web, "api.local", "/dead", &[]).await.status,
        503
    );
    let mut tcp = TcpStream::connect(proxy.addr("raw")).await.unwrap();
    tcp.write_all(b"twelve bytes").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut back = Vec::new();
    tcp.read_to_end(&mut back).await.unwrap();

    let lines = lines(&log, 4).await;
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let find = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        records
            .iter()
            .find(|r| pred(r))
            .unwrap_or_else(|| panic!("{records:#?}"))
    };

    let ok = find(&|r| r["status"] == 200);
    assert_eq!(ok["kind"], "http");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/v1/items?x=1");
    assert_eq!(ok["authority"], "api.local");
    assert_eq!(ok["protocol"], "HTTP/1.1");
    assert_eq!(ok["listener"], "web");
    assert_eq!(ok["client_ip"], "127.0.0.1");
    assert_eq!(ok["upstream_service"], "api");
    assert_eq!(ok["upstream_endpoint"], api.addr.to_string());
    assert_eq!(ok["response_flags"], "-");
    assert_eq!(ok["retries"], 0);
    assert_eq!(ok["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(ok["duration_ms"].as_f64().unwrap() > 0.0);
    let start = ok["start_time"].as_str().unwrap();
    assert!(
        start.len() == 24 && start.ends_with('Z') && start.as_bytes()[10] == b'T',
        "{start}"
    );

    let no_route = find(&|r| r["status"] == 404);
    assert_eq!(no_route["response_flags"], "no_route");
    let dead = find(&|r| r["status"] == 503);
    assert_eq!(dead["response_flags"], "upstream_connect_failure");
    let tcp = find(&|r| r["kind"] == "tcp");
    assert_eq!(tcp["listener"], "raw");
    assert_eq!(tcp["bytes_received"], 12);
    assert_eq!(tcp["bytes_sent"], 12);
    assert_eq!(tcp["upstream_endpoint"], echo.to_string());

    let m = proxy.metrics();
    assert!(m.contains("tern_access_log_records_written_total 4"), "{m}");
    assert!(m.contains("tern_access_log_records_dropped_total 0"), "{m}");
}

#[tokio::test]
async fn text_templates_render_the_fields_asked_for() {
    let dir = TempDir::new("access-text");
    let log = dir.0.join("access.log");
    let api = Upstream::start("api").await;
    let echo = tcp_echo().await;
    let format =
        r#"format: text, template: "%METHOD% %PATH% %STATUS% %RESPONSE_FLAGS% %UPSTREAM_SERVICE%""#;
    let proxy = Proxy::start(&config(&log, format, api.addr, echo)).await;
    let client = http1_client();
    get(&client, proxy.addr("web"), "api.local", "/a", &[]).await;
    get(&client, proxy.addr("web"), "other", "/b", &[]).await;
    let lines = lines(&log, 2).await;
    assert!(lines.contains(&"GET /a 200 - api".to_string()), "{lines:?}");
    assert!(
        lines.contains(&"GET /b 404 no_route -".to_string()),
        "{lines:?}"
    );
}

#[test]
fn a_bad_template_names_the_field() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let yaml = config(
        Path::new("/tmp/x.log"),
        r#"format: text, template: "%METHOD% %BOGUS%""#,
        addr,
        addr,
    );
    let e = tern_proxy::config::parse_yaml(&yaml)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("telemetry.access_log.template") && e.contains("%BOGUS%"),
        "{e}"
    );
    let yaml = config(Path::new("/tmp/x.log"), "format: xml", addr, addr);
    let e = tern_proxy::config::parse_yaml(&yaml)
        .unwrap_err()
        .to_string();
    assert!(e.contains("telemetry.access_log.format"), "{e}");
}

#[tokio::test]
async fn sigusr1_reopens_the_log_file_for_logrotate() {
    let dir = TempDir::new("access-rotate");
    let log = dir.0.join("access.log");
    let rotated = dir.0.join("access.log.1");
    let api = Upstream::start("api").await;
    let echo = tcp_echo().await;
    let port = free_port();
    let yaml = config(&log, "format: json", api.addr, echo).replacen(
        "127.0.0.1:0",
        &format!("127.0.0.1:{port}"),
        1,
    );
    let proxy = ProxyProcess::start_in(&dir, &yaml).await;
    let web: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = http1_client();

    get(&client, web, "api.local", "/before", &[]).await;
    lines(&log, 1).await;
    std::fs::rename(&log, &rotated).unwrap();
    proxy.signal("USR1");
    // The writer reopens on the signal; until then lines would still go to the renamed file.
    tokio::time::sleep(Duration::from_millis(300)).await;
    get(&client, web, "api.local", "/after", &[]).await;

    let fresh = lines(&log, 1).await;
    assert!(fresh[0].contains("/after"), "{fresh:?}");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("/before") && !old.contains("/after"), "{old}");
}

#[tokio::test]
async fn sigusr1_never_kills_a_proxy_without_a_log_file() {
    let dir = TempDir::new("access-usr1");
    let api = Upstream::start("api").await;
    let port = free_port();
    let yaml = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:{port}\n    protocol: http\n    routes: [ {{ backends: [ {{ service: api }} ] }} ]\nservices:\n  - name: api\n    protocol: http1\n    endpoints: [ {{ address: \"{}\" }} ]\n",
        api.addr
    );
    let mut proxy = ProxyProcess::start_in(&dir, &yaml).await;
    proxy.signal("USR1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let web: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(get(&http1_client(), web, "x", "/", &[]).await.status, 200);
    assert_eq!(
        proxy.wait_exit(Duration::from_millis(10)).await,
        None,
        "SIGUSR1 killed it"
    );
}
