//! Sidecar mode end to end, with "pods" made of network namespaces on a bridge
//! (`deploy/local/pods.sh`), the iptables rules a Kubernetes init container would install
//! (`deploy/iptables/tern-iptables.sh`), a `tern-proxy` per pod running under its own user
//! id, Python apps, and the control plane's CA on the bridge. The apps know nothing of the
//! mesh: an app in pod `web` calls a service's virtual IP and reaches the apps in pods
//! `api-1` and `api-2` through both sidecars over mTLS.
//!
//! Needs root, `ip` and `iptables` (CI has them); elsewhere the test says it skipped.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use support::TempDir;
use tern_control_plane::ca::{self, BootstrapTokens, CaOptions, Credentials, RootSource};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const API: &str = "spiffe://cluster.local/ns/default/sa/api";
const INTRUDER: &str = "spiffe://cluster.local/ns/default/sa/intruder";
/// The proxies' user id, which the iptables rules exempt.
const PROXY_UID: &str = "1337";
const VIP: &str = "10.96.0.10";
const PODS: [&str; 5] = ["web", "api-1", "api-2", "plain", "intruder"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn can_run() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    for tool in ["ip", "iptables", "setpriv", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .status()
            .map_err(|e| e.to_string())?;
        if !found.success() {
            return Err(format!("{tool} is missing"));
        }
    }
    // A container may be root without the right to make namespaces.
    let probe = format!("ternprobe{}", fastrand::u32(..1000));
    let made = Command::new("ip").args(["netns", "add", &probe]).status();
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    match made {
        Ok(s) if s.success() => Ok(()),
        _ => Err("cannot create network namespaces".into()),
    }
}

/// The pods of one test; removed when dropped (processes first).
struct Pods {
    script: PathBuf,
    prefix: String,
    subnet: String,
    ips: Vec<IpAddr>,
    children: Vec<(String, Child)>,
    dir: TempDir,
}

impl Pods {
    fn up() -> Pods {
        let script = repo().join("deploy/local/pods.sh");
        let prefix = format!("t{:04x}", fastrand::u16(..));
        let subnet = format!("10.{}.{}", 100 + fastrand::u8(..100), fastrand::u8(1..250));
        let out = Command::new(&script)
            .args(["up", &prefix, &subnet])
            .args(PODS)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pods.sh up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ips = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
            .collect();
        Pods {
            script,
            prefix,
            subnet,
            ips,
            children: Vec::new(),
            dir: TempDir::new("sidecar"),
        }
    }

    fn ns(&self, pod: &str) -> String {
        format!("{}-{pod}", self.prefix)
    }

    fn ip(&self, pod: &str) -> IpAddr {
        self.ips[PODS.iter().position(|p| *p == pod).unwrap()]
    }

    fn bridge_ip(&self) -> IpAddr {
        format!("{}.1", self.subnet).parse().unwrap()
    }

    fn intercept(&self, pod: &str) {
        let status = Command::new(&self.script)
            .args(["intercept", &self.prefix, pod, "--proxy-uid", PROXY_UID])
            .status()
            .unwrap();
        assert!(status.success(), "iptables rules in {pod}");
    }

    /// Runs `args` in the pod (as root unless `as_proxy`), logging to `name.log`.
    fn spawn(&mut self, pod: &str, name: &str, as_proxy: bool, args: &[String]) {
        let log = std::fs::File::create(self.dir.0.join(format!("{name}.log"))).unwrap();
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns(pod)]);
        if as_proxy {
            command.args([
                "setpriv",
                &format!("--reuid={PROXY_UID}"),
                &format!("--regid={PROXY_UID}"),
                "--clear-groups",
            ]);
        }
        let child = command
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push((name.to_string(), child));
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.0.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Runs a command in the pod to completion (bounded by `timeout` seconds).
    fn run(&self, pod: &str, args: &[&str], timeout: u32) -> std::process::Output {
        Command::new("timeout")
            .arg(timeout.to_string())
            .args(["ip", "netns", "exec", &self.ns(pod)])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new(&self.script)
            .args(["down", &self.prefix])
            .args(PODS)
            .status();
    }
}

/// An app that says who it is and who the mesh said called it.
const APP: &str = r#"
import http.server, sys
name, port = sys.argv[1], int(sys.argv[2])
class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = (name + "\n").encode()
        self.send_response(200)
        self.send_header("x-app", name)
        self.send_header("x-seen-peer", self.headers.get("x-peer-identity", ""))
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", port), App).serve_forever()
"#;

/// A client app: GETs `url` until `count` requests or `seconds` pass (one connection each),
/// and prints a JSON summary.
const CLIENT: &str = r#"
import http.client, json, sys, time, urllib.parse
url, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
u = urllib.parse.urlsplit(url)
summary = {"ok": 0, "failed": 0, "statuses": {}, "apps": {}, "peers": {}, "errors": []}
deadline = time.time() + seconds
n = 0
while n < count and time.time() < deadline:
    n += 1
    try:
        c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=5)
        c.request("GET", u.path or "/")
        r = c.getresponse()
        r.read()
        s = str(r.status)
        summary["statuses"][s] = summary["statuses"].get(s, 0) + 1
        app = r.getheader("x-app", "")
        summary["apps"][app] = summary["apps"].get(app, 0) + 1
        peer = r.getheader("x-seen-peer", "")
        summary["peers"][peer] = summary["peers"].get(peer, 0) + 1
        summary["ok" if r.status == 200 else "failed"] += 1
        c.close()
    except Exception as e:
        summary["failed"] += 1
        if len(summary["errors"]) < 5:
            summary["errors"].append(repr(e))
print(json.dumps(summary))
"#;

fn client_config(api_1: IpAddr, api_2: IpAddr) -> String {
    format!(
        r#"
listeners:
  - name: outbound
    address: 127.0.0.1:15001
    protocol: tcp
    service: passthrough
    original_destination: true
    direction: outbound
  - name: api-vip
    address: {VIP}:80
    bind: false
    protocol: http
    direction: outbound
    routes:
      - backends: [ {{ service: api }} ]
  - name: inbound
    address: 0.0.0.0:15006
    protocol: tcp
    service: local-app
    original_destination: true
    mtls: {{ mode: strict }}
services:
  - name: passthrough
    protocol: tcp
    original_destination: {{}}
  - name: local-app
    protocol: tcp
    original_destination: {{ host: 127.0.0.1 }}
  - name: api
    protocol: http1
    identity: "{API}"
    endpoints: [ {{ address: "{api_1}:8080" }}, {{ address: "{api_2}:8080" }} ]
"#
    )
}

fn server_config() -> String {
    format!(
        r#"
listeners:
  - name: outbound
    address: 127.0.0.1:15001
    protocol: tcp
    service: passthrough
    original_destination: true
    direction: outbound
  - name: inbound
    address: 0.0.0.0:15006
    protocol: tcp
    service: local-app
    original_destination: true
    mtls: {{ mode: strict }}
  - name: inbound-http
    address: 0.0.0.0:8080
    bind: false
    protocol: http
    mtls:
      mode: strict
      authorization: {{ default: deny, identities: ["{WEB}"] }}
      peer_identity_header: x-peer-identity
    routes:
      - backends: [ {{ service: app }} ]
services:
  - name: passthrough
    protocol: tcp
    original_destination: {{}}
  - name: local-app
    protocol: tcp
    original_destination: {{ host: 127.0.0.1 }}
  - name: app
    protocol: http1
    endpoints: [ {{ address: "127.0.0.1:8080" }} ]
"#
    )
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let client = support::http1_client();
    let request = hyper::Request::get(format!("http://{addr}{path}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(2), client.request(request))
        .await
        .ok()?
        .ok()?;
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .ok()?
        .to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics").await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn summary(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "client said {e}: {} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_reach_a_service_through_both_sidecars_over_mtls() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED sidecar end-to-end test: {why}");
        return;
    }
    let mut pods = Pods::up();
    let dir = pods.dir.0.clone();
    // Every file the proxies read must be readable by their user id.
    let binary = dir.join("tern-proxy");
    std::fs::copy(env!("CARGO_BIN_EXE_tern-proxy"), &binary).unwrap();
    std::fs::write(dir.join("app.py"), APP).unwrap();
    std::fs::write(dir.join("client.py"), CLIENT).unwrap();

    // The CA on the bridge, with certificates that live 4 s: they rotate during the test.
    let tokens = format!(
        "{WEB} token-of-web-0123456789\n{API} token-of-api-0123456789\n{INTRUDER} token-of-intruder-0123456789\n"
    );
    let roots = dir.join("roots.pem");
    let mut registry = Registry::default();
    let metrics = tern_control_plane::metrics::Metrics::new(&mut registry);
    let stop = CancellationToken::new();
    let _stop_ca = stop.clone().drop_guard();
    let ca = ca::start(
        CaOptions {
            address: SocketAddr::new(pods.bridge_ip(), 0),
            trust_domain: "cluster.local".into(),
            root: RootSource::Generate,
            lifetime: Duration::from_secs(4),
            server_names: vec![ca::DEFAULT_SERVER_NAME.into()],
            credentials: Credentials {
                bootstrap: BootstrapTokens::parse(&tokens).unwrap(),
                token_review: None,
            },
            roots_out: Some(roots.clone()),
        },
        Arc::clone(&metrics),
        &TaskTracker::new(),
        stop,
    )
    .await
    .unwrap();

    // Apps first, then the rules, then the sidecars (as a pod's init container would).
    for pod in ["api-1", "api-2", "plain"] {
        let args = ["python3", dir.join("app.py").to_str().unwrap(), pod, "8080"].map(String::from);
        pods.spawn(pod, &format!("app-{pod}"), false, &args);
    }
    for pod in ["api-1", "api-2", "plain"] {
        let addr = SocketAddr::new(pods.ip(pod), 8080);
        let mut up = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "app in {pod}: {}", pods.log(&format!("app-{pod}")));
    }
    let sidecars = [
        (
            "web",
            WEB,
            client_config(pods.ip("api-1"), pods.ip("api-2")),
        ),
        ("api-1", API, server_config()),
        ("api-2", API, server_config()),
        (
            "intruder",
            INTRUDER,
            client_config(pods.ip("api-1"), pods.ip("api-2")),
        ),
    ];
    for (pod, identity, config) in &sidecars {
        pods.intercept(pod);
        let short = identity.rsplit('/').next().unwrap();
        let token = dir.join(format!("{pod}.token"));
        std::fs::write(&token, format!("token-of-{short}-0123456789\n")).unwrap();
        let config_path = dir.join(format!("{pod}.yaml"));
        std::fs::write(&config_path, config).unwrap();
        let args = [
            binary.to_str().unwrap(),
            "--config",
            config_path.to_str().unwrap(),
            "--admin-address",
            "0.0.0.0:15000",
            "--identity",
            identity,
            "--ca",
            &ca.address.to_string(),
            "--ca-roots",
            roots.to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
        ]
        .map(String::from);
        pods.spawn(pod, &format!("proxy-{pod}"), true, &args);
    }
    for (pod, _, _) in &sidecars {
        let admin = SocketAddr::new(pods.ip(pod), 15000);
        let mut ready = false;
        for _ in 0..200 {
            if let Some((200, _)) = http_get(admin, "/ready").await {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            ready,
            "sidecar in {pod}: {}",
            pods.log(&format!("proxy-{pod}"))
        );
    }
    let web_admin = SocketAddr::new(pods.ip("web"), 15000);
    let api_admin = SocketAddr::new(pods.ip("api-1"), 15000);
    let client = dir.join("client.py");
    let client = client.to_str().unwrap();

    // The app in `web` calls the virtual IP: both api pods answer, over mTLS, and their
    // apps are told the caller is `web`.
    let out = pods.run(
        "web",
        &["python3", client, &format!("http://{VIP}/"), "200", "30"],
        60,
    );
    let s = summary(&out);
    assert_eq!(s["ok"], 200, "{s}\n{}", pods.log("proxy-web"));
    assert!(s["apps"]["api-1"].as_u64().unwrap_or(0) > 40, "{s}");
    assert!(s["apps"]["api-2"].as_u64().unwrap_or(0) > 40, "{s}");
    assert_eq!(s["peers"][WEB], 200, "{s}");
    let handshakes = metric(
        api_admin,
        r#"tern_tls_inbound_handshakes_total{listener="inbound-http",result="ok"}"#,
    )
    .await;
    assert!(handshakes >= 1.0, "api-1 terminated no mTLS");

    // A destination the mesh does not know passes through as plain TCP.
    let plain = format!("http://{}:8080/", pods.ip("plain"));
    let s = summary(&pods.run("web", &["python3", client, &plain, "5", "10"], 30));
    assert_eq!(s["apps"]["plain"], 5, "{s}");

    // A pod without a sidecar is refused by the strict port: its connection is closed
    // before any byte reaches the app, and the refusal is counted.
    let direct = format!("http://{}:8080/", pods.ip("api-1"));
    let s = summary(&pods.run("plain", &["python3", client, &direct, "3", "10"], 30));
    assert_eq!(s["ok"], 0, "{s}");
    assert_eq!(s["failed"], 3, "{s}");
    let refused = metric(
        api_admin,
        r#"tern_authz_denied_total{listener="inbound-http",reason="no_identity"}"#,
    )
    .await;
    assert!(refused >= 3.0, "{refused}");

    // A meshed pod whose identity is not on the allow list gets 403.
    let s = summary(&pods.run(
        "intruder",
        &["python3", client, &format!("http://{VIP}/"), "4", "10"],
        30,
    ));
    assert_eq!(s["statuses"]["403"], 4, "{s}");

    // Certificates rotate under load (each lives 4 s; the load runs 9 s): nothing fails.
    let renewed_before = metric(web_admin, "tern_identity_certificate_renewals_total").await;
    let out = pods.run(
        "web",
        &["python3", client, &format!("http://{VIP}/"), "100000", "9"],
        60,
    );
    let s = summary(&out);
    assert_eq!(s["failed"], 0, "{s}\n{}", pods.log("proxy-web"));
    assert!(s["ok"].as_u64().unwrap() > 100, "{s}");
    let renewed = metric(web_admin, "tern_identity_certificate_renewals_total").await;
    assert!(
        renewed - renewed_before >= 2.0,
        "renewals {renewed_before} -> {renewed}"
    );
    let api_renewals = metric(api_admin, "tern_identity_certificate_renewals_total").await;
    assert!(api_renewals >= 3.0, "{api_renewals}");
}
