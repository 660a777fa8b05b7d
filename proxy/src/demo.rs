//! `tern-proxy demo`: three sample upstreams (two fast, one slow), the real proxy in front of
//! them with one listener per balancing algorithm, a load client, and a table of how each
//! algorithm spread the requests. Everything runs on loopback in this process.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::app::App;
use crate::config::parse_yaml;

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Requests sent through each balancing algorithm.
    #[arg(long, default_value_t = 3000)]
    pub requests: usize,
    /// Requests in flight at a time.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Latency of the slow upstream, in milliseconds (the two others answer in 1 ms).
    #[arg(long, default_value_t = 25)]
    pub slow_ms: u64,
}

const ALGORITHMS: [&str; 3] = ["round_robin", "least_request", "peak_ewma"];

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let delays = [1, 1, args.slow_ms.max(1)];
    let mut upstreams = Vec::new();
    for (i, ms) in delays.iter().enumerate() {
        upstreams.push(spawn_upstream(i, Duration::from_millis(*ms)).await?);
    }
    let yaml = demo_config(&upstreams);
    let config = parse_yaml(&yaml).context("the embedded demo config is invalid")?;
    let app = App::new();
    app.apply(config, "embedded demo config".into()).await?;
    let bound = app.bound_addresses();

    println!(
        "Tern demo: 3 upstreams on loopback, answering in {} ms, {} ms and {} ms.",
        delays[0], delays[1], delays[2]
    );
    println!(
        "Sending {} requests per algorithm, {} at a time, through tern-proxy.\n",
        args.requests, args.concurrency
    );
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut results = Vec::new();
    for algorithm in ALGORITHMS {
        let addr = *bound.get(algorithm).context("demo listener not bound")?;
        results.push((algorithm, load(&client, addr, algorithm, &args).await?));
    }

    println!();
    println!(
        "{:<14} {:<22} {:>8} {:>7} {:>9} {:>9}",
        "algorithm", "endpoint", "requests", "share", "p50", "p99"
    );
    for (algorithm, stats) in &results {
        let total: usize = stats.iter().map(|s| s.len()).sum();
        for (i, latencies) in stats.iter().enumerate() {
            let mut sorted = latencies.clone();
            sorted.sort();
            println!(
                "{:<14} {:<22} {:>8} {:>6.1}% {:>9} {:>9}",
                algorithm,
                format!("{} ({} ms)", upstreams[i], delays[i]),
                latencies.len(),
                100.0 * latencies.len() as f64 / total.max(1) as f64,
                fmt_latency(percentile(&sorted, 0.50)),
                fmt_latency(percentile(&sorted, 0.99)),
            );
        }
        let mut all: Vec<Duration> = stats.iter().flatten().copied().collect();
        all.sort();
        println!(
            "{:<14} {:<22} {:>8} {:>7} {:>9} {:>9}\n",
            "",
            "all",
            total,
            "",
            fmt_latency(percentile(&all, 0.50)),
            fmt_latency(percentile(&all, 0.99)),
        );
    }
    println!("Round robin spreads evenly and pays for the slow endpoint at p99; least request and");
    println!(
        "peak-EWMA steer away from it. Run `tern-proxy --config deploy/examples/static.yaml` next."
    );
    app.drain(Duration::from_secs(1)).await;
    Ok(())
}

/// Sends `args.requests` requests to `addr`; returns client-seen latencies per upstream index.
async fn load(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    algorithm: &str,
    args: &DemoArgs,
) -> anyhow::Result<Vec<Vec<Duration>>> {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, next, done, total) =
            (client.clone(), next.clone(), done.clone(), args.requests);
        let uri: hyper::Uri = format!("http://{addr}/demo").parse()?;
        workers.push(tokio::spawn(async move {
            let mut seen: Vec<Vec<Duration>> = vec![Vec::new(); 3];
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let start = Instant::now();
                let response = client
                    .request(Request::get(uri.clone()).body(Empty::new())?)
                    .await?;
                let upstream = response
                    .headers()
                    .get("x-demo-upstream")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok());
                response.into_body().collect().await?;
                if let Some(i) = upstream.filter(|i| *i < 3) {
                    seen[i].push(start.elapsed());
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(seen)
        }));
    }
    let progress = {
        let (done, total, name) = (done.clone(), args.requests, algorithm.to_string());
        tokio::spawn(async move {
            loop {
                let n = done.load(Ordering::Relaxed).min(total);
                let filled = 30 * n / total.max(1);
                eprint!(
                    "\r{:<14} [{}{}] {:>6}/{}",
                    name,
                    "#".repeat(filled),
                    ".".repeat(30 - filled),
                    n,
                    total
                );
                let _ = std::io::stderr().flush();
                if n >= total {
                    eprintln!();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut merged: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    for w in workers {
        let seen = w.await??;
        for (i, s) in seen.into_iter().enumerate() {
            merged[i].extend(s);
        }
    }
    done.store(args.requests, Ordering::Relaxed);
    let _ = progress.await;
    Ok(merged)
}

/// A sample upstream that answers after `delay`, naming itself in `x-demo-upstream`.
async fn spawn_upstream(index: usize, delay: Duration) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                    tokio::time::sleep(delay).await;
                    let mut r = Response::new(Full::new(Bytes::from(format!(
                        "hello from upstream {index}\n"
                    ))));
                    r.headers_mut().insert("x-demo-upstream", index.into());
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn demo_config(upstreams: &[SocketAddr]) -> String {
    let endpoints: String = upstreams
        .iter()
        .map(|a| format!("      - {{ address: \"{a}\" }}\n"))
        .collect();
    let mut yaml = String::from("listeners:\n");
    for a in ALGORITHMS {
        yaml.push_str(&format!(
            "  - name: {a}\n    address: 127.0.0.1:0\n    protocol: http\n    routes:\n      - backends: [ {{ service: demo-{a} }} ]\n"
        ));
    }
    yaml.push_str("services:\n");
    for a in ALGORITHMS {
        yaml.push_str(&format!(
            "  - name: demo-{a}\n    protocol: http1\n    load_balancer: {a}\n    endpoints:\n{endpoints}"
        ));
    }
    yaml
}

fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() as f64 * q).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1);
    Some(sorted[idx])
}

fn fmt_latency(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.2} ms", d.as_secs_f64() * 1000.0),
        None => "-".into(),
    }
}
