//! Who is asking: a token in, the SPIFFE ID it proves out. On Kubernetes the token is the
//! pod's projected service-account token, checked by the API server (TokenReview); locally
//! it is a bootstrap token from a file both sides are given.

use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use tern_proxy::identity::SpiffeId;

/// Bootstrap tokens shorter than this are refused when the file is read: they are guessable.
const MIN_TOKEN_LEN: usize = 16;
/// Kubernetes service account user names: `system:serviceaccount:NAMESPACE:NAME`.
const SA_PREFIX: &str = "system:serviceaccount:";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("the token is not known")]
    Unknown,
    #[error("the API server did not authenticate the token{}", .0.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    NotAuthenticated(Option<String>),
    #[error("the token is for {0:?}, which is not a service account")]
    NotServiceAccount(String),
    #[error("the token's audiences {got:?} do not include {want:?}")]
    Audience { got: Vec<String>, want: String },
    #[error("asking the API server (TokenReview) failed: {0}")]
    Review(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// Tokens from a file, one `SPIFFE_ID TOKEN` per line (`#` starts a comment).
#[derive(Clone, Default)]
pub struct BootstrapTokens {
    entries: Vec<(SpiffeId, Vec<u8>)>,
}

impl std::fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("BootstrapTokens")
            .field("identities", &self.entries.len())
            .finish()
    }
}

impl BootstrapTokens {
    pub fn read(path: &Path) -> Result<Self, TokensFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, reason)| TokensFileError::Line {
            path: path.to_owned(),
            line,
            reason,
        })
    }

    /// Parses the file's text; an error names the line (1-based) and the reason.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(id), Some(token), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err((n + 1, "expected `SPIFFE_ID TOKEN`".into()));
            };
            let id: SpiffeId = id.parse().map_err(|e| (n + 1, format!("{e}")))?;
            if token.len() < MIN_TOKEN_LEN {
                return Err((
                    n + 1,
                    format!("the token for {id} is shorter than {MIN_TOKEN_LEN} characters"),
                ));
            }
            entries.push((id, token.as_bytes().to_vec()));
        }
        Ok(BootstrapTokens { entries })
    }

    /// The identity `token` stands for. Every entry is compared, each in constant time, so
    /// the time taken says nothing about how close a guess was.
    pub fn identify(&self, token: &str) -> Option<SpiffeId> {
        let mut found = None;
        for (id, known) in &self.entries {
            if constant_time_eq(known, token.as_bytes()) && found.is_none() {
                found = Some(id.clone());
            }
        }
        found
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks tokens with the Kubernetes API server.
#[derive(Clone)]
pub struct TokenReviewer {
    pub client: kube::Client,
    /// The audience the projected token must carry (e.g. `tern-ca`), so that a token
    /// minted for another service cannot be replayed here.
    pub audience: String,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub async fn identify(&self, token: &str, trust_domain: &str) -> Result<SpiffeId, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Review(e.to_string()))?;
        let status = answer.status.ok_or(AuthError::NotAuthenticated(None))?;
        if status.authenticated != Some(true) {
            return Err(AuthError::NotAuthenticated(status.error));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.iter().any(|a| a == &self.audience) {
            return Err(AuthError::Audience {
                got: audiences,
                want: self.audience.clone(),
            });
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        service_account_identity(&username, trust_domain)
    }
}

/// `system:serviceaccount:NS:SA` → `spiffe://TRUST_DOMAIN/ns/NS/sa/SA` (pure).
pub fn service_account_identity(username: &str, trust_domain: &str) -> Result<SpiffeId, AuthError> {
    let not_sa = || AuthError::NotServiceAccount(username.to_owned());
    let rest = username.strip_prefix(SA_PREFIX).ok_or_else(not_sa)?;
    let (namespace, name) = rest.split_once(':').ok_or_else(not_sa)?;
    if namespace.is_empty() || name.is_empty() || name.contains(':') {
        return Err(not_sa());
    }
    SpiffeId::kubernetes(trust_domain, namespace, name).map_err(|_| not_sa())
}

/// Every way a caller may prove who it is, tried in order.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub bootstrap: BootstrapTokens,
    pub token_review: Option<TokenReviewer>,
}

impl Credentials {
    pub async fn identify(&self, token: &str, trust_domain: &str) -> Result<SpiffeId, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if let Some(id) = self.bootstrap.identify(token) {
            return Ok(id);
        }
        match &self.token_review {
            Some(reviewer) => reviewer.identify(token, trust_domain).await,
            None => Err(AuthError::Unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENS: &str = "\
# who may ask for what
spiffe://cluster.local/ns/default/sa/web   0123456789abcdef-web
spiffe://cluster.local/ns/default/sa/api   0123456789abcdef-api   # trailing comment
";

    #[test]
    fn a_bootstrap_token_proves_exactly_its_identity() {
        let tokens = BootstrapTokens::parse(TOKENS).unwrap();
        assert_eq!(
            tokens.identify("0123456789abcdef-web").unwrap().as_str(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(
            tokens.identify("0123456789abcdef-api").unwrap().as_str(),
            "spiffe://cluster.local/ns/default/sa/api"
        );
        assert!(tokens.identify("0123456789abcdef-we").is_none());
        assert!(tokens.identify("").is_none());
        assert!(
            format!("{tokens:?}").find("0123").is_none(),
            "tokens leak into logs"
        );
    }

    #[test]
    fn a_bad_tokens_file_names_the_line() {
        let err = BootstrapTokens::parse("spiffe://a/b tooshort\n").unwrap_err();
        assert_eq!(err.0, 1);
        assert!(err.1.contains("shorter than 16"), "{}", err.1);
        let err = BootstrapTokens::parse("\n\nnot-an-id 0123456789abcdef0\n").unwrap_err();
        assert_eq!(err.0, 3);
        let err = BootstrapTokens::parse("spiffe://a/b\n").unwrap_err();
        assert!(err.1.contains("SPIFFE_ID TOKEN"), "{}", err.1);
    }

    #[test]
    fn service_account_user_names_map_to_spiffe_ids() {
        assert_eq!(
            service_account_identity("system:serviceaccount:shop:cart", "cluster.local")
                .unwrap()
                .as_str(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        for bad in [
            "system:node:worker-1",
            "alice",
            "system:serviceaccount:shop",
            "system:serviceaccount::cart",
            "system:serviceaccount:shop:cart:extra",
        ] {
            assert!(
                matches!(
                    service_account_identity(bad, "cluster.local"),
                    Err(AuthError::NotServiceAccount(_))
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn without_token_review_an_unknown_token_is_refused() {
        let credentials = Credentials {
            bootstrap: BootstrapTokens::parse(TOKENS).unwrap(),
            token_review: None,
        };
        assert!(matches!(
            credentials.identify("", "cluster.local").await,
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            credentials
                .identify("ffffffffffffffffffff", "cluster.local")
                .await,
            Err(AuthError::Unknown)
        ));
    }
}
