//! The observability kit against a real Prometheus (Debian package `prometheus`): it scrapes
//! a proxy under traffic, and every query of the Grafana dashboard and of the alert rules in
//! `deploy/observability/` returns data through Prometheus' HTTP API. `promtool` checks the
//! rules and the proxy's metrics text.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `prometheus` and `promtool` on PATH, or the test says why it cannot run. CI installs them
/// (`.ci/run`), so there this is never skipped.
fn tools() -> Option<(PathBuf, PathBuf)> {
    let find = |name: &str| {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
    };
    Some((find("prometheus")?, find("promtool")?))
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every PromQL expression of the dashboard (with `$service` filled in) and of the rules
/// (the part left of the threshold: a rule that does not fire still has to see data).
fn queries() -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/observability/grafana/tern-mesh.json"))
            .unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().unwrap().replace("$service", "api"));
        }
    }
    let rules = std::fs::read_to_string(repo().join("deploy/observability/alerts.yml")).unwrap();
    let rules: serde_json::Value = serde_saphyr::from_str(&rules).unwrap();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let expr = rule["expr"].as_str().unwrap().trim();
            let left = [" > ", " == ", " < "]
                .iter()
                .filter_map(|op| expr.rfind(op))
                .max()
                .map(|i| &expr[..i])
                .unwrap_or(expr);
            out.push(left.to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_queries_return_data_from_a_real_prometheus() {
    let Some((prometheus, promtool)) = tools() else {
        eprintln!("SKIPPED: prometheus/promtool not installed (apt-get install prometheus)");
        return;
    };
    let dir = TempDir::new("prometheus");
    let rules = repo().join("deploy/observability/alerts.yml");
    let check = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // A proxy with traffic of every kind the queries look at: answers, a dead endpoint
    // (connect failures, retries), TCP bytes.
    let api = Upstream::start("api").await;
    let echo = tcp_echo().await;
    let (web, raw) = (free_port(), free_port());
    let (dead, dead2) = (free_port(), free_port());
    let yaml = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:{web}\n    protocol: http\n    routes:\n      - match: {{ path_prefix: /dead }}\n        backends: [ {{ service: dead }} ]\n      - backends: [ {{ service: api }} ]\n  - name: raw\n    address: 127.0.0.1:{raw}\n    protocol: tcp\n    service: echo\nservices:\n  - name: api\n    protocol: http1\n    endpoints: [ {{ address: \"{}\" }} ]\n  - name: dead\n    protocol: http1\n    endpoints: [ {{ address: \"127.0.0.1:{dead}\" }}, {{ address: \"127.0.0.1:{dead2}\", weight: 2 }} ]\n  - name: echo\n    protocol: tcp\n    endpoints: [ {{ address: \"{echo}\" }} ]\n",
        api.addr
    );
    let config = dir.0.join("tern.yaml");
    std::fs::write(&config, yaml).unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut proxy = ProxyProcess::spawn(&config, admin, &dir.0);
    proxy.wait_ready().await;

    let metrics_text = proxy.admin_get("/metrics").await.body;
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics_text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        metrics_text.contains("tern_build_info{version="),
        "{metrics_text}"
    );

    let prom_port = free_port();
    let prom_config = dir.0.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [ \"{}\" ]\nscrape_configs:\n  - job_name: tern-proxy\n    static_configs: [ {{ targets: [ \"{admin}\" ] }} ]\n",
            rules.display()
        ),
    )
    .unwrap();
    let _prometheus = Killed(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let prom: SocketAddr = format!("127.0.0.1:{prom_port}").parse().unwrap();

    // Traffic over a few scrapes, so that rate() has two samples in its window.
    let client = http1_client();
    let web: SocketAddr = format!("127.0.0.1:{web}").parse().unwrap();
    let raw: SocketAddr = format!("127.0.0.1:{raw}").parse().unwrap();
    for round in 0..6 {
        for _ in 0..20 {
            get(&client, web, "x", "/ok", &[]).await;
        }
        get(&client, web, "x", "/dead", &[]).await;
        let mut s = tokio::net::TcpStream::connect(raw).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, b"bytes")
            .await
            .unwrap();
        drop(s);
        if round < 5 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    }

    let query = |q: String| {
        let client = client.clone();
        async move {
            let encoded: String = url_encode(&q);
            let r = get(
                &client,
                prom,
                "prometheus",
                &format!("/api/v1/query?query={encoded}"),
                &[],
            )
            .await;
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
            (r.status, v)
        }
    };
    let mut missing = Vec::new();
    for q in queries() {
        let mut ok = false;
        for _ in 0..20 {
            let (status, v) = query(q.clone()).await;
            assert_eq!(status, 200, "{q}: {v}");
            assert_eq!(v["status"], "success", "{q}: {v}");
            if v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if !ok {
            missing.push(q);
        }
    }
    assert!(
        missing.is_empty(),
        "queries without data:\n{}\nprometheus log:\n{}",
        missing.join("\n"),
        std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap_or_default()
    );
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
