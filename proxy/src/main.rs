//! `tern-proxy`: flags, exit codes and signals. Everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tern_proxy::app::{self, App};
use tern_proxy::config::parse_duration;
use tern_proxy::identity::{CaClient, Identity, IdentityCounters};
use tern_proxy::tls::MeshTls;
use tern_proxy::xds::{XdsOptions, XdsProtocol};
use tracing::Instrument;

/// Exit status for an invalid configuration (nothing was bound).
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "tern-proxy",
    version,
    about = "Tern's sidecar and gateway proxy"
)]
struct Args {
    /// YAML config file; watched for changes and reloaded on SIGHUP.
    #[arg(long, short, conflicts_with = "xds")]
    config: Option<PathBuf>,
    /// Follow the control plane at this address (`host:port`, plaintext gRPC ADS) instead
    /// of a file.
    #[arg(long)]
    xds: Option<String>,
    /// This proxy's node id, as the control plane sees it.
    #[arg(long, default_value_t = default_node())]
    node: String,
    /// The xDS protocol variant: state of the world or incremental (delta).
    #[arg(long, value_enum, default_value = "sotw")]
    xds_protocol: XdsProtocol,
    /// Time in-flight work gets after SIGTERM when following xDS.
    #[arg(long, default_value = "10s", value_parser = duration)]
    drain_timeout: Duration,
    /// Resident memory to stay under, e.g. `512MiB` (overrides `memory_limit` in the file;
    /// the only way to set it with `--xds`). Past 90% of it, new connections are refused and
    /// new requests answered 503.
    #[arg(long, value_parser = memory_limit)]
    memory_limit: Option<u64>,
    /// Admin server address (overrides `admin.address` in the file).
    #[arg(long)]
    admin_address: Option<SocketAddr>,
    /// How often the config file is checked for changes.
    #[arg(long, default_value = "1s", value_parser = duration)]
    watch_interval: Duration,
    /// Worker threads. Default: the CPUs this process may use (affinity and cgroup quota).
    /// With one, a single-threaded runtime runs everything on one core without the
    /// work-stealing scheduler's overhead.
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// This proxy's SPIFFE ID (`spiffe://TRUST_DOMAIN/ns/NS/sa/SA`). With it the proxy makes
    /// a key in memory, gets a certificate from the mesh CA (`--ca`), is not ready until it
    /// holds one, renews it, and speaks mTLS on listeners and to services that ask for it.
    #[arg(long, requires_all = ["ca", "ca_roots"])]
    identity: Option<tern_proxy::identity::SpiffeId>,
    /// The mesh CA's Certify address, `host:port` (TLS).
    #[arg(long, requires = "identity")]
    ca: Option<String>,
    /// The mesh's trust anchors (PEM): they verify the CA and every peer.
    #[arg(long, requires = "identity")]
    ca_roots: Option<PathBuf>,
    /// The name the CA's certificate must carry.
    #[arg(long, default_value = "tern-ca")]
    ca_server_name: String,
    /// The credential shown to the CA: a projected service-account token on Kubernetes, a
    /// bootstrap token locally. Read on every renewal (the kubelet rotates it).
    #[arg(long, default_value = "/var/run/secrets/tern/token")]
    token_file: PathBuf,
    /// Time an mTLS handshake may take.
    #[arg(long, default_value = "10s", value_parser = duration)]
    tls_handshake_timeout: Duration,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs sample upstreams, a proxy in front of them and a load client, and prints how
    /// each balancing algorithm spread the requests. Needs no files.
    Demo(tern_proxy::demo::DemoArgs),
    /// Validates a config file and exits (0 valid, 2 invalid).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Waits until a proxy's `/ready` answers 200 (exit 0), or exits 1 at the timeout. For
    /// entrypoints (`tern-proxy wait-ready --admin 127.0.0.1:15000 && exec app`) and
    /// Kubernetes startup probes.
    WaitReady {
        /// The proxy's admin address, `host:port`.
        #[arg(long)]
        admin: String,
        #[arg(long, default_value = "60s", value_parser = duration)]
        timeout: Duration,
        /// Time between tries.
        #[arg(long, default_value = "200ms", value_parser = duration)]
        interval: Duration,
    },
    /// Asks a running proxy what it would do with a request: listener, route, backends,
    /// endpoints with their live state, policies, config version (`GET /explain`).
    Explain {
        /// The proxy's admin address, `host:port`.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: String,
        #[arg(long)]
        listener: String,
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// `name:value`; repeat for more.
        #[arg(long)]
        header: Vec<String>,
        /// Print the JSON instead of the text.
        #[arg(long)]
        json: bool,
    },
    /// A live table of services and endpoints (request rate, success rate, p50/p99, in
    /// flight, ejection and health), from a proxy's admin port.
    Top {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: String,
        #[arg(long, default_value = "1s", value_parser = duration)]
        interval: Duration,
        /// Print one frame (after one interval) and exit.
        #[arg(long)]
        once: bool,
    },
}

fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text)
}

fn memory_limit(text: &str) -> Result<u64, String> {
    tern_proxy::config::parse_memory_limit(text)
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(
        args.log_json,
        matches!(
            args.command,
            Some(
                Command::Demo(_)
                    | Command::WaitReady { .. }
                    | Command::Explain { .. }
                    | Command::Top { .. }
            )
        ),
    );
    let workers = args
        .worker_threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    let built = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.command {
        Some(Command::Demo(demo)) => runtime
            .block_on(tern_proxy::demo::run(demo))
            .map(|()| ExitCode::SUCCESS),
        Some(Command::Check { config }) => Ok(check(&config)),
        Some(Command::WaitReady {
            admin,
            timeout,
            interval,
        }) => Ok(runtime.block_on(wait_ready(&admin, timeout, interval))),
        Some(Command::Top {
            admin,
            interval,
            once,
        }) => match runtime.block_on(tern_proxy::top::run(&admin, interval, once)) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("tern-proxy top: {e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Some(Command::Explain {
            admin,
            listener,
            host,
            path,
            method,
            header,
            json,
        }) => {
            use tern_proxy::admin_client::encode;
            let mut query = format!(
                "/explain?listener={}&path={}&method={}",
                encode(&listener),
                encode(&path),
                encode(&method)
            );
            if let Some(h) = host {
                query.push_str(&format!("&host={}", encode(&h)));
            }
            for h in header {
                query.push_str(&format!("&header={}", encode(&h)));
            }
            if !json {
                query.push_str("&format=text");
            }
            match runtime.block_on(tern_proxy::admin_client::get(
                &admin,
                &query,
                Duration::from_secs(5),
            )) {
                Ok((200, body)) => {
                    print!("{body}");
                    Ok(ExitCode::SUCCESS)
                }
                Ok((status, body)) => {
                    eprint!("tern-proxy explain: {status}: {body}");
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => {
                    eprintln!("tern-proxy explain: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        None => match (args.config.clone(), args.xds.clone()) {
            (Some(path), _) => runtime.block_on(run(args, path)),
            (None, Some(server)) => runtime.block_on(run_xds(args, server)),
            (None, None) => {
                eprintln!(
                    "tern-proxy: --config FILE or --xds HOST:PORT is required (or try `tern-proxy demo`)"
                );
                Ok(ExitCode::from(EXIT_BAD_CONFIG))
            }
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match app::load(path) {
        Ok(_) => {
            println!("{}: valid", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

async fn wait_ready(admin: &str, timeout: Duration, interval: Duration) -> ExitCode {
    match tern_proxy::wait_ready::wait_ready(admin, timeout, interval).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-proxy wait-ready: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, path: PathBuf) -> anyhow::Result<ExitCode> {
    // Validate everything before binding anything.
    let (config, text, source) = match app::load(&path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("tern-proxy: invalid config {}: {e}", path.display());
            return Ok(ExitCode::from(EXIT_BAD_CONFIG));
        }
    };
    let admin = args.admin_address.or(config.admin);
    let drain_timeout = config.drain_timeout;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;

    let app = new_app(&args)?;
    app.set_memory_limit(args.memory_limit);
    let version = app
        .apply(config, source)
        .await
        .context("starting listeners")?;
    if let Some(addr) = admin {
        let bound = app
            .serve_admin(addr)
            .await
            .with_context(|| format!("binding admin server on {addr}"))?;
        tracing::info!(address = %bound, "admin server listening");
    }
    app.spawn_reloader(path, &text, args.watch_interval)
        .context("starting the config watcher")?;
    app.set_ready(true);
    if let Some(mesh) = app.mesh() {
        tracing::info!(identity = %mesh.identity().id, "waiting for the workload certificate");
    }
    tracing::info!(version, listeners = ?app.bound_addresses(), "tern-proxy started");

    stop_requested(&app, &mut terminate).await;
    let clean = app.drain(drain_timeout).await;
    tracing::info!(clean, "drained; exiting");
    Ok(ExitCode::SUCCESS)
}

/// Follows a control plane: not ready until the first complete config has been applied;
/// keeps serving the last good config whenever the control plane is away.
async fn run_xds(args: Args, server: String) -> anyhow::Result<ExitCode> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let app = new_app(&args)?;
    app.set_memory_limit(args.memory_limit);
    if let Some(addr) = args.admin_address {
        let bound = app
            .serve_admin(addr)
            .await
            .with_context(|| format!("binding admin server on {addr}"))?;
        tracing::info!(address = %bound, "admin server listening");
    }
    let options = XdsOptions {
        server,
        node: args.node.clone(),
        protocol: args.xds_protocol,
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(10),
    };
    tracing::info!(server = %options.server, node = %options.node, "following the control plane");
    let stop = app.drain_signal();
    let follower = tokio::spawn(
        tern_proxy::xds::run(app.clone(), options, stop).instrument(tracing::info_span!("xds")),
    );
    stop_requested(&app, &mut terminate).await;
    let clean = app.drain(args.drain_timeout).await;
    let _ = follower.await;
    tracing::info!(clean, "drained; exiting");
    Ok(ExitCode::SUCCESS)
}

/// The app, with a workload identity when `--identity` is given: its certificate is fetched
/// and renewed by a task that ends with the drain.
fn new_app(args: &Args) -> anyhow::Result<App> {
    let (Some(id), Some(ca), Some(roots)) = (&args.identity, &args.ca, &args.ca_roots) else {
        return Ok(App::new());
    };
    let roots_pem = std::fs::read_to_string(roots)
        .with_context(|| format!("reading the trust anchors {}", roots.display()))?;
    let identity = Identity::new(id.clone(), &roots_pem, IdentityCounters::default())
        .with_context(|| format!("the trust anchors {}", roots.display()))?;
    let mesh = MeshTls::new(Arc::clone(&identity), args.tls_handshake_timeout)
        .context("building the mesh TLS config")?;
    let app = App::with_mesh(Some(mesh));
    let client = CaClient {
        address: ca.clone(),
        server_name: args.ca_server_name.clone(),
        roots_pem,
        token_file: args.token_file.clone(),
    };
    tokio::spawn(
        identity
            .run(client, app.drain_signal())
            .instrument(tracing::info_span!("identity", id = %id)),
    );
    Ok(app)
}

/// Waits for SIGTERM, an interrupt or `POST /shutdown`: all three start the same drain.
async fn stop_requested(app: &App, terminate: &mut tokio::signal::unix::Signal) {
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
        () = app.shutdown_requested() => tracing::info!("POST /shutdown: draining"),
    }
}

/// The host name, which is the pod name on Kubernetes.
fn default_node() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "tern-proxy".to_string())
}

fn init_logging(json: bool, quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
