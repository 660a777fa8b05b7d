//! `xds_load`: the control plane under the load of many proxies. Starts `tern-control-plane`
//! on a generated mesh (1,000 services × 10 endpoints by default), opens 100 ADS streams that
//! behave like proxies, and measures the time to a full sync of every stream, the time from a
//! file edit to every stream ACKing the changed endpoints, and the control plane's RSS and CPU.
//!
//! Prints a summary on stderr and one JSON object on stdout (`benches/xds/run.sh` collects
//! them into a table). Every phase is bounded: the whole run ends by `--deadline`.
//!
//! Layout: `mesh` writes and edits the mesh file; `fake_proxy` is one simulated proxy's
//! stream; `wire` decodes just enough of the resources; `control_plane` runs and measures the
//! child process; `stats` does percentiles.

mod control_plane;
mod fake_proxy;
mod mesh;
mod stats;
mod wire;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::json;
use tern_proxy::xds::TypeKind;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};

use crate::control_plane::{ControlPlane, Launch, Memory};
use crate::fake_proxy::{Event, Protocol, StreamSpec};
use crate::mesh::{MAX_EDITS, Mesh};
use crate::stats::{ms, percentile_ms};

#[derive(Parser, Debug)]
#[command(
    name = "xds_load",
    about = "Load-tests tern-control-plane with many simulated proxies on ADS"
)]
struct Args {
    /// The control plane binary, a release build [default:
    /// $CARGO_TARGET_DIR/release/tern-control-plane, else target/release/tern-control-plane].
    #[arg(long)]
    control_plane: Option<PathBuf>,
    /// ADS variant the simulated proxies speak.
    #[arg(long, value_enum, default_value = "sotw")]
    protocol: Protocol,
    /// Simulated proxies (one ADS stream and one connection each).
    #[arg(long, default_value_t = 100)]
    streams: usize,
    #[arg(long, default_value_t = 1000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// HTTP listeners in the mesh file (each one a Listener and a RouteConfiguration).
    #[arg(long, default_value_t = 10)]
    listeners: usize,
    #[arg(long, default_value_t = 10)]
    routes_per_listener: usize,
    /// File edits after the sync, each changing one endpoint of one service.
    #[arg(long, default_value_t = 50)]
    edits: u32,
    /// Pause after every stream has ACKed an edit, before the next one; a random extra of up
    /// to `--watch-interval` spreads the edits over the control plane's polling phase.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    pause: Duration,
    /// Give up on one edit's missing ACKs after this long.
    #[arg(long, default_value = "5s", value_parser = duration)]
    edit_timeout: Duration,
    #[arg(long, default_value = "60s", value_parser = duration)]
    sync_timeout: Duration,
    /// The whole run (start-up, sync, edits) ends by then, finished or not.
    #[arg(long, default_value = "110s", value_parser = duration)]
    deadline: Duration,
    /// CPU list for `taskset -c` of the control plane; `none` to leave it unpinned.
    #[arg(long, default_value = "1")]
    cp_cpu: String,
    /// Passed to the control plane.
    #[arg(long, default_value = "10ms")]
    debounce: String,
    /// Passed to the control plane; also bounds the random extra pause between edits.
    #[arg(long, default_value = "25ms")]
    watch_interval: String,
    /// Where the mesh file and the control plane's log go (default: a new temporary directory,
    /// removed at the end unless `--keep`).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[arg(long)]
    keep: bool,
}

fn duration(text: &str) -> Result<Duration, String> {
    tern_proxy::config::parse_duration(text)
}

/// Removes the temporary working directory however the run ends.
struct WorkDir {
    path: PathBuf,
    remove: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// What the edit phase measured.
#[derive(Default)]
struct Edits {
    done: u32,
    /// Per (stream, edit): rename → the stream's ACK of the load assignment carrying it.
    samples: Vec<Duration>,
    /// Per edit that every stream ACKed: the slowest stream.
    per_edit_max: Vec<Duration>,
    /// (stream, edit) pairs not ACKed within `--edit-timeout`.
    missing: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("xds_load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // However the run ends (deadline, SIGTERM from `timeout`, ^C), its future is dropped,
    // which kills the control plane (`kill_on_drop`) and removes the working directory.
    let outcome = runtime.block_on(async {
        let deadline = args.deadline;
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            result = tokio::time::timeout(deadline, run(&args)) => match result {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("the run did not finish within {deadline:?}")),
            },
            _ = terminate.recv() => Err(anyhow::anyhow!("terminated (SIGTERM)")),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // Streams still blocked on a dead control plane must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xds_load: {e:#}");
            println!(
                "{}",
                json!({ "protocol": args.protocol.as_str(), "error": format!("{e:#}") })
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<serde_json::Value> {
    if args.edits >= MAX_EDITS {
        bail!("--edits must be below {MAX_EDITS}");
    }
    if args.streams == 0 || args.services == 0 || args.endpoints == 0 {
        bail!("--streams, --services and --endpoints must be positive");
    }
    let started = Instant::now();
    let run_deadline = started + args.deadline;
    let work = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            WorkDir {
                path: dir.clone(),
                remove: false,
            }
        }
        None => {
            let path = std::env::temp_dir().join(format!("tern-xds-load-{}", std::process::id()));
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            WorkDir {
                path,
                remove: !args.keep,
            }
        }
    };
    let config = work.path.join("mesh.yaml");
    let mut mesh = Mesh::generate(
        args.services,
        args.endpoints,
        args.listeners,
        args.routes_per_listener,
    );
    let yaml = mesh.to_yaml();
    std::fs::write(&config, &yaml).with_context(|| format!("writing {}", config.display()))?;
    let cpu = (args.cp_cpu != "none").then_some(args.cp_cpu.as_str());
    let binary = args.control_plane.clone().unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
        PathBuf::from(target).join("release/tern-control-plane")
    });
    let mut cp = ControlPlane::start(Launch {
        binary: &binary,
        config: &config,
        cpu,
        debounce: &args.debounce,
        watch_interval: &args.watch_interval,
        log: work.path.join("control-plane.log"),
    })
    .await?;
    let ready = cp.wait_ready(Duration::from_secs(30)).await?;
    // Let start-up allocations settle before calling the RSS "idle".
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = cp.memory()?;
    let cpu_start = cp.cpu_seconds()?;
    let own_cpu_start = control_plane::own_cpu_seconds().await?;

    // Sync: every stream from connect to holding (and having ACKed) the whole mesh.
    let (events_tx, mut events) = mpsc::channel::<Event>(8192);
    let mut streams = JoinSet::new();
    let t0 = Instant::now();
    for id in 0..args.streams {
        streams.spawn(fake_proxy::run(StreamSpec {
            id,
            server: cp.xds.to_string(),
            protocol: args.protocol,
            expected_clusters: mesh.service_count(),
            events: events_tx.clone(),
        }));
    }
    let mut synced: Vec<Option<Duration>> = vec![None; args.streams];
    let mut largest = [0usize; 4];
    let mut count = 0;
    let sync_deadline = (t0 + args.sync_timeout).min(run_deadline);
    while count < args.streams {
        match timeout_at(sync_deadline, events.recv()).await {
            Err(_) => bail!(
                "only {count} of {} streams synced within {:?}",
                args.streams,
                args.sync_timeout
            ),
            Ok(None) => bail!("every stream ended"),
            Ok(Some(Event::Synced {
                stream,
                at,
                largest: sizes,
            })) => {
                for (max, size) in largest.iter_mut().zip(sizes) {
                    *max = (*max).max(size);
                }
                if synced[stream].is_none() {
                    synced[stream] = Some(at - t0);
                    count += 1;
                }
            }
            Ok(Some(Event::Ended { stream, reason })) => {
                bail!("stream {stream} ended during the sync: {reason}")
            }
            Ok(Some(Event::Saw { .. })) => {}
        }
    }
    let per_stream_sync: Vec<Duration> = synced.into_iter().flatten().collect();
    let sync = per_stream_sync.iter().max().copied().unwrap_or_default();
    let cpu_sync = cp.cpu_seconds()? - cpu_start;
    let own_cpu_sync = control_plane::own_cpu_seconds().await? - own_cpu_start;
    let at_sync = cp.memory()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_sync = cp.memory()?;
    eprintln!(
        "[{}] synced {} streams in {:.0} ms (control plane CPU {:.2} s, load generator CPU {:.2} s)",
        args.protocol.as_str(),
        args.streams,
        ms(sync),
        cpu_sync,
        own_cpu_sync
    );

    // Edits: one endpoint of one service per edit, paced so they never overlap.
    let cpu_edits_start = cp.cpu_seconds()?;
    let edits = run_edits(args, &mut mesh, &config, &mut events, &mut cp, run_deadline).await?;
    let cpu_edits = cp.cpu_seconds()? - cpu_edits_start;
    let end = cp.memory()?;
    let metrics = cp.metrics().await.unwrap_or_default();
    streams.abort_all();
    cp.stop().await;
    drop(work);

    let per_edit_ms: Vec<f64> = edits.per_edit_max.iter().map(|d| ms(*d)).collect();
    let (cp_sum, cp_count) = stats::eds_push_latency(&metrics).unwrap_or((0.0, 0.0));
    let mib = |kib: u64| kib as f64 / 1024.0;
    let report = json!({
        "protocol": args.protocol.as_str(),
        "streams": args.streams,
        "services": args.services,
        "endpoints": args.endpoints,
        "listeners": args.listeners,
        "mesh_bytes": yaml.len(),
        "largest_response_kib": TypeKind::ALL
            .iter()
            .map(|k| (k.short().to_string(), json!(largest[k.index()] as f64 / 1024.0)))
            .collect::<serde_json::Map<_, _>>(),
        "ready_ms": ms(ready),
        "sync_ms": ms(sync),
        "sync_stream_p50_ms": percentile_ms(&per_stream_sync, 50.0),
        "edits": edits.done,
        "edit_samples": edits.samples.len(),
        "edit_missing": edits.missing,
        "edit_p50_ms": percentile_ms(&edits.samples, 50.0),
        "edit_p99_ms": percentile_ms(&edits.samples, 99.0),
        "edit_max_p50_ms": percentile_ms(&edits.per_edit_max, 50.0),
        "edit_max_max_ms": per_edit_ms.iter().copied().fold(f64::NAN, f64::max),
        "cp_eds_push_mean_ms": if cp_count > 0.0 { cp_sum / cp_count * 1000.0 } else { f64::NAN },
        "cp_eds_push_count": cp_count,
        "nacks": stats::nacks(&metrics),
        "rss_idle_mib": mib(idle.rss_kib),
        "rss_at_sync_mib": mib(at_sync.rss_kib),
        "rss_after_sync_mib": mib(after_sync.rss_kib),
        "rss_end_mib": mib(end.rss_kib),
        "rss_peak_mib": mib(end.hwm_kib),
        "cpu_sync_s": cpu_sync,
        "cpu_edits_s": cpu_edits,
        "cpu_per_edit_ms": if edits.done > 0 { cpu_edits * 1000.0 / f64::from(edits.done) } else { f64::NAN },
        "loadgen_cpu_sync_s": own_cpu_sync,
    });
    summarize(args, &report, &end);
    Ok(report)
}

async fn run_edits(
    args: &Args,
    mesh: &mut Mesh,
    config: &Path,
    events: &mut mpsc::Receiver<Event>,
    cp: &mut ControlPlane,
    run_deadline: Instant,
) -> anyhow::Result<Edits> {
    let mut out = Edits::default();
    let watch_interval = duration(&args.watch_interval).map_err(anyhow::Error::msg)?;
    let mut rng = fastrand::Rng::with_seed(0x7e57);
    for number in 1..=args.edits {
        // Leave room to stop the control plane and report before the hard deadline.
        if Instant::now() + args.edit_timeout + Duration::from_secs(3) > run_deadline {
            eprintln!(
                "[{}] stopping after {} edits: the run deadline is near",
                args.protocol.as_str(),
                out.done
            );
            break;
        }
        if cp.exited() {
            bail!("the control plane exited during the edits");
        }
        mesh.edit(number);
        let t = mesh.replace_file(config)?;
        let mut acked: Vec<Option<Duration>> = vec![None; args.streams];
        let mut count = 0;
        while count < args.streams {
            match timeout_at(t + args.edit_timeout, events.recv()).await {
                Err(_) => break,
                Ok(None) => bail!("every stream ended"),
                Ok(Some(Event::Saw { stream, edit, at })) => {
                    if edit == number && acked[stream].is_none() {
                        acked[stream] = Some(at - t);
                        count += 1;
                    }
                }
                Ok(Some(Event::Ended { stream, reason })) => {
                    bail!("stream {stream} ended during edit {number}: {reason}")
                }
                Ok(Some(Event::Synced { .. })) => {}
            }
        }
        out.done = number;
        out.missing += args.streams - count;
        let this: Vec<Duration> = acked.into_iter().flatten().collect();
        if count == args.streams
            && let Some(max) = this.iter().max()
        {
            out.per_edit_max.push(*max);
        }
        out.samples.extend(this);
        let jitter = watch_interval.mul_f64(rng.f64());
        tokio::time::sleep(args.pause + jitter).await;
    }
    Ok(out)
}

fn summarize(args: &Args, r: &serde_json::Value, end: &Memory) {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "[{p}] {streams} streams × {services} services × {endpoints} endpoints: \
         full sync {sync:.0} ms; {edits} edits, edit→ACK p50 {p50:.1} ms, p99 {p99:.1} ms, \
         slowest stream per edit: median {mp50:.1} ms, max {mmax:.1} ms ({missing} missing); \
         RSS idle {idle:.1} MiB, after sync {after:.1} MiB, end {endr:.1} MiB, peak {peak:.1} MiB; \
         CPU sync {cs:.2} s, edits {ce:.2} s ({cpe:.1} ms per edit)",
        p = args.protocol.as_str(),
        streams = args.streams,
        services = args.services,
        endpoints = args.endpoints,
        sync = f("sync_ms"),
        edits = f("edits"),
        p50 = f("edit_p50_ms"),
        p99 = f("edit_p99_ms"),
        mp50 = f("edit_max_p50_ms"),
        mmax = f("edit_max_max_ms"),
        missing = f("edit_missing"),
        idle = f("rss_idle_mib"),
        after = f("rss_after_sync_mib"),
        endr = end.rss_kib as f64 / 1024.0,
        peak = f("rss_peak_mib"),
        cs = f("cpu_sync_s"),
        ce = f("cpu_edits_s"),
        cpe = f("cpu_per_edit_ms"),
    );
}
