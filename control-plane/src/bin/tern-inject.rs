//! `tern-inject`: adds the Tern sidecar to the pods of Kubernetes manifests, like
//! `linkerd inject` or `istioctl kube-inject`: `tern-inject -f app.yaml | kubectl apply -f -`.
//! Manifests in, manifests out on stdout; what was done to each document on stderr.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde_json::Value;
use tern_control_plane::inject::{InjectOptions, Outcome, inject};

/// Exit status for input that is not YAML or a pod template of the wrong shape (nothing
/// is written).
const EXIT_INVALID: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "tern-inject",
    version,
    about = "Adds the Tern sidecar (interception init container and native-sidecar proxy) to the pods of Kubernetes manifests"
)]
struct Args {
    /// Manifest files (multi-document YAML); `-` or none reads stdin.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    #[arg(long)]
    proxy_image: Option<String>,
    #[arg(long)]
    init_image: Option<String>,
    /// The control plane's xDS address.
    #[arg(long)]
    xds: Option<String>,
    /// The mesh CA's address.
    #[arg(long)]
    ca: Option<String>,
    /// The name the CA's certificate carries.
    #[arg(long)]
    ca_server_name: Option<String>,
    /// The ConfigMap holding the mesh's roots as `roots.pem`.
    #[arg(long)]
    roots_config_map: Option<String>,
    #[arg(long)]
    trust_domain: Option<String>,
    /// Inbound ports the interception leaves alone (the admin port 15000 always is);
    /// repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
}

impl Args {
    fn options(&self) -> InjectOptions {
        let d = InjectOptions::default();
        InjectOptions {
            proxy_image: self.proxy_image.clone().unwrap_or(d.proxy_image),
            init_image: self.init_image.clone().unwrap_or(d.init_image),
            xds: self.xds.clone().unwrap_or(d.xds),
            ca: self.ca.clone().unwrap_or(d.ca),
            ca_server_name: self.ca_server_name.clone().unwrap_or(d.ca_server_name),
            roots_config_map: self.roots_config_map.clone().unwrap_or(d.roots_config_map),
            trust_domain: self.trust_domain.clone().unwrap_or(d.trust_domain),
            token_audience: d.token_audience,
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-inject: {e:#}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let opts = args.options();
    let mut out = Vec::new();
    let sources: Vec<Option<&PathBuf>> = if args.files.is_empty() {
        vec![None]
    } else {
        args.files
            .iter()
            .map(|f| (f.as_os_str() != "-").then_some(f))
            .collect()
    };
    for source in sources {
        let (label, text) = match source {
            Some(path) => (
                path.display().to_string(),
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            ),
            None => {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text)?;
                ("stdin".to_string(), text)
            }
        };
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .map_err(|e| anyhow::anyhow!("{label}: not YAML: {e}"))?;
        // Empty documents (a trailing `---`) carry nothing to apply.
        for (i, mut doc) in docs.into_iter().filter(|d| !d.is_null()).enumerate() {
            let outcomes = inject(&mut doc, &opts)
                .map_err(|e| anyhow::anyhow!("{label}: document {}: {e}", i + 1))?;
            for o in outcomes {
                match o {
                    Outcome::Injected { kind, name } => eprintln!("injected {kind} {name}"),
                    Outcome::Skipped { kind, name, reason } => {
                        eprintln!("skipped {kind} {name}: {}", reason.as_str())
                    }
                }
            }
            out.push(doc);
        }
    }
    let text = serde_saphyr::to_string_multiple(&out)?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}
