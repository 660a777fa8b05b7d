//! `tern-control-plane`: will serve the mesh to proxies over xDS v3 (ADS).
//!
//! Today it is a skeleton: it reads and validates the same YAML mesh description the proxy
//! reads statically, and prints what it would serve. The xDS server, the Kubernetes source
//! and the certificate authority are built on this entry point.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "tern-control-plane",
    version,
    about = "Tern's control plane (skeleton: validates a mesh file)"
)]
struct Args {
    /// The mesh description: the same YAML shape `tern-proxy --config` reads.
    #[arg(long, short)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match tern_proxy::config::load_file(&args.config) {
        Ok((config, _)) => {
            println!(
                "{}: valid mesh: {} listeners, {} services, {} endpoints",
                args.config.display(),
                config.listeners.len(),
                config.services.len(),
                config
                    .services
                    .iter()
                    .map(|s| s.endpoints.len())
                    .sum::<usize>()
            );
            println!("xDS serving is not implemented yet; run tern-proxy --config with this file.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", args.config.display());
            ExitCode::from(2)
        }
    }
}
