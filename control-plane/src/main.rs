//! `tern-control-plane`: flags, logging and signals. Everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tern_control_plane::ca::{CaOptions, RootSource};
use tern_control_plane::kubernetes::TrustDomain;
use tern_control_plane::{Options, kubernetes, start};

#[derive(Parser, Debug)]
#[command(
    name = "tern-control-plane",
    version,
    about = "Tern's control plane: serves the mesh to proxies over xDS v3 (ADS)"
)]
struct Args {
    /// The mesh description: the same YAML shape `tern-proxy --config` reads. Watched.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Also serve the Services and EndpointSlices of the Kubernetes cluster found by the
    /// usual means (in-cluster service account, or KUBECONFIG), with identities derived
    /// from their Pods (in `--trust-domain`).
    #[arg(long)]
    kubernetes: bool,
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds_address: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin_address: SocketAddr,
    /// How long a change waits for more before a version is published.
    #[arg(long, default_value = "10ms", value_parser = duration)]
    debounce: Duration,
    /// How often the mesh file is checked for edits.
    #[arg(long, default_value = "25ms", value_parser = duration)]
    watch_interval: Duration,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Validate the mesh file and exit (0 valid, 2 invalid).
    #[arg(long)]
    check: bool,
    /// Be the mesh's certificate authority: serve `tern.identity.v1.Identity/Certify` over
    /// TLS on `--ca-address`.
    #[arg(long)]
    ca: bool,
    #[arg(long, default_value = "127.0.0.1:15012")]
    ca_address: SocketAddr,
    /// The SPIFFE trust domain the CA issues identities in, and the one `--kubernetes`
    /// derives services' identities in.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The root (or intermediate) certificate to sign with, PEM; with `--ca-key`. Without
    /// both, a root is made at start and kept in memory only.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The PKCS#8 PEM key of `--ca-cert`.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// How long issued certificates live.
    #[arg(long, default_value = "24h", value_parser = duration)]
    cert_lifetime: Duration,
    /// Bootstrap tokens, one `SPIFFE_ID TOKEN` per line: a caller presenting TOKEN may get
    /// a certificate for SPIFFE_ID (and only that one).
    #[arg(long)]
    bootstrap_tokens: Option<PathBuf>,
    /// Write the root certificate here (public) for proxies' `--ca-roots`.
    #[arg(long)]
    ca_roots_out: Option<PathBuf>,
    /// A name the CA's serving certificate carries; repeat for more.
    #[arg(long, default_values_t = vec![tern_control_plane::ca::DEFAULT_SERVER_NAME.to_string()])]
    ca_server_name: Vec<String>,
    /// With `--kubernetes`: the audience projected service-account tokens must carry
    /// (checked by TokenReview).
    #[arg(long, default_value = "tern-ca")]
    token_audience: String,
}

fn duration(text: &str) -> Result<Duration, String> {
    tern_proxy::config::parse_duration(text)
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_json);
    if args.config.is_none() && !args.kubernetes {
        eprintln!("tern-control-plane: give --config FILE, --kubernetes, or both");
        return ExitCode::from(2);
    }
    if let Some(path) = &args.config
        && let Err(e) = tern_proxy::config::load_file(path)
    {
        eprintln!(
            "tern-control-plane: invalid mesh file {}: {e}",
            path.display()
        );
        return ExitCode::from(2);
    }
    let trust_domain = match args.trust_domain.parse::<TrustDomain>() {
        Ok(domain) => domain,
        Err(e) => {
            eprintln!("tern-control-plane: --trust-domain: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("valid");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern-control-plane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, trust_domain)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-control-plane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, trust_domain: TrustDomain) -> anyhow::Result<()> {
    let client = if args.kubernetes {
        Some(kube::Client::try_default().await?)
    } else {
        None
    };
    let ca = if args.ca {
        let bootstrap = match &args.bootstrap_tokens {
            Some(path) => tern_control_plane::ca::BootstrapTokens::read(path)?,
            None => Default::default(),
        };
        let token_review = client
            .clone()
            .map(|client| tern_control_plane::ca::TokenReviewer {
                client,
                audience: args.token_audience.clone(),
            });
        let root = match (args.ca_cert.clone(), args.ca_key.clone()) {
            (Some(cert), Some(key)) => RootSource::Files { cert, key },
            _ => RootSource::Generate,
        };
        Some(CaOptions {
            address: args.ca_address,
            trust_domain: args.trust_domain.clone(),
            root,
            lifetime: args.cert_lifetime,
            server_names: args.ca_server_name.clone(),
            credentials: tern_control_plane::ca::Credentials {
                bootstrap,
                token_review,
            },
            roots_out: args.ca_roots_out.clone(),
        })
    } else {
        None
    };
    let running = start(Options {
        config: args.config,
        xds_address: args.xds_address,
        admin_address: Some(args.admin_address),
        kubernetes: client.map(|client| kubernetes::Source {
            client,
            trust_domain,
        }),
        debounce: args.debounce,
        watch_interval: args.watch_interval,
        ca,
    })
    .await?;
    tracing::info!(
        xds = %running.xds_address,
        admin = ?running.admin_address,
        ca = ?running.ca.as_ref().map(|c| c.address),
        "tern-control-plane serving"
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: stopping"),
    }
    running.shutdown().await;
    Ok(())
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
