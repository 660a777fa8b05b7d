//! Gateway TLS: a listener that terminates TLS for clients outside the mesh with
//! certificates from files, chosen by SNI, and reloaded when the files change. A reload that
//! fails (a half-written file, a key that does not match) keeps the certificates in use.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::GatewayTlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{cert}: the key in {key} is not this certificate's key")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("building the TLS config: {0}")]
    Config(String),
}

/// One certificate and the names it answers for.
#[derive(Debug)]
struct Entry {
    /// Lower-case; `*.example.com` matches one label.
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

/// A file's modification time and length (`None`: unreadable).
type Stamp = Option<(SystemTime, u64)>;

/// Certificates loaded from files, with what the files looked like when read.
#[derive(Debug)]
struct Loaded {
    entries: Vec<Entry>,
    stamps: Vec<Stamp>,
}

/// A TLS-terminating listener's certificates and acceptor.
pub struct GatewayTls {
    config: GatewayTlsConfig,
    current: Arc<ArcSwap<Loaded>>,
    /// The file stamps of the last failed reload: not retried (nor logged) until they change.
    failed: std::sync::Mutex<Option<Vec<Stamp>>>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for GatewayTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayTls")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct BySni(Arc<ArcSwap<Loaded>>);

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.0.load();
        let pick = match hello.server_name() {
            Some(sni) => pick(&loaded.entries, sni),
            None => None,
        };
        // No SNI, or a name no certificate has: the first certificate (the listener's
        // default), as nginx and Envoy do.
        pick.or_else(|| loaded.entries.first())
            .map(|e| Arc::clone(&e.key))
    }
}

/// The certificate for `sni`: an exact name first, then a wildcard (pure).
fn pick<'a>(entries: &'a [Entry], sni: &str) -> Option<&'a Entry> {
    let sni = sni.to_ascii_lowercase();
    entries.iter().find(|e| e.names.contains(&sni)).or_else(|| {
        let (_, parent) = sni.split_once('.')?;
        let wildcard = format!("*.{parent}");
        entries.iter().find(|e| e.names.contains(&wildcard))
    })
}

impl GatewayTls {
    pub fn load(config: &GatewayTlsConfig) -> Result<Arc<Self>, GatewayError> {
        let current = Arc::new(ArcSwap::from_pointee(read(config)?));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| GatewayError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(BySni(Arc::clone(&current))));
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(GatewayTls {
            config: config.clone(),
            current,
            failed: std::sync::Mutex::new(None),
            acceptor: TlsAcceptor::from(Arc::new(server)),
        }))
    }

    pub fn config(&self) -> &GatewayTlsConfig {
        &self.config
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Re-reads the files if any changed since they were read. `Ok(true)`: new certificates
    /// are in use for the next handshakes; an error leaves the old ones in place.
    pub fn reload_if_changed(&self) -> Result<bool, GatewayError> {
        let now = stamps(&self.config);
        if now == self.current.load().stamps {
            return Ok(false);
        }
        let Ok(mut failed) = self.failed.lock() else {
            return Ok(false);
        };
        if failed.as_ref() == Some(&now) {
            return Ok(false);
        }
        match read(&self.config) {
            Ok(loaded) => {
                *failed = None;
                self.current.store(Arc::new(loaded));
                Ok(true)
            }
            Err(e) => {
                *failed = Some(now);
                Err(e)
            }
        }
    }
}

fn stamps(config: &GatewayTlsConfig) -> Vec<Stamp> {
    config
        .certificates
        .iter()
        .flat_map(|c| [&c.cert, &c.key])
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

fn read(config: &GatewayTlsConfig) -> Result<Loaded, GatewayError> {
    // Stamps first: a file changed while being read is read again on the next check.
    let stamps = stamps(config);
    let provider = rustls::crypto::ring::default_provider();
    let mut entries = Vec::with_capacity(config.certificates.len());
    for c in &config.certificates {
        let chain = read_chain(&c.cert)?;
        let key = read_key(&c.key)?;
        let signing =
            provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| GatewayError::Parse {
                    path: c.key.clone(),
                    reason: e.to_string(),
                })?;
        let key = CertifiedKey::new(chain, signing);
        if key.keys_match().is_err() {
            return Err(GatewayError::KeyMismatch {
                cert: c.cert.clone(),
                key: c.key.clone(),
            });
        }
        let names = if c.server_names.is_empty() {
            dns_names(&key.cert[0]).map_err(|reason| GatewayError::Parse {
                path: c.cert.clone(),
                reason,
            })?
        } else {
            c.server_names.clone()
        };
        entries.push(Entry {
            names,
            key: Arc::new(key),
        });
    }
    Ok(Loaded { entries, stamps })
}

fn read_file(path: &Path) -> Result<Vec<u8>, GatewayError> {
    std::fs::read(path).map_err(|source| GatewayError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, GatewayError> {
    let pem = read_file(path)?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| GatewayError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(GatewayError::Parse {
            path: path.to_owned(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, GatewayError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| GatewayError::Parse {
        path: path.to_owned(),
        reason: format!("no private key: {e}"),
    })
}

/// The DNS names of a certificate's SAN extension, lower-case.
fn dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| e.to_string())?;
    let names: Vec<String> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        return Err("the certificate has no DNS names; give `server_names`".into());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(names: &[&str]) -> Entry {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(der)
            .unwrap();
        Entry {
            names: names.iter().map(|n| n.to_string()).collect(),
            key: Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)),
        }
    }

    #[test]
    fn sni_picks_exact_names_before_wildcards() {
        let entries = vec![
            entry(&["*.example.com"]),
            entry(&["api.example.com", "api.example.org"]),
        ];
        let names = |sni| pick(&entries, sni).map(|e| e.names[0].clone());
        assert_eq!(names("API.example.com").as_deref(), Some("api.example.com"));
        assert_eq!(names("api.example.org").as_deref(), Some("api.example.com"));
        assert_eq!(names("www.example.com").as_deref(), Some("*.example.com"));
        // A wildcard covers one label only.
        assert_eq!(names("a.b.example.com"), None);
        assert_eq!(names("example.com"), None);
    }
}
