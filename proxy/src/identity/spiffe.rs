//! SPIFFE IDs (`spiffe://TRUST_DOMAIN/PATH`), and the Kubernetes-shaped ones the mesh issues:
//! `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

const SCHEME: &str = "spiffe://";
/// The SPIFFE spec caps an ID at 2048 bytes.
const MAX_LEN: usize = 2048;

/// A validated SPIFFE ID. Cheap to clone; compared byte for byte (trust domains are
/// lower case by the spec, so there is one spelling of each ID).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<str>);

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpiffeId {
    #[error("a SPIFFE ID starts with \"spiffe://\"")]
    Scheme,
    #[error("a SPIFFE ID is at most {MAX_LEN} bytes")]
    TooLong,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error("the trust domain may hold only a-z, 0-9, '.', '-' and '_' (found {0:?})")]
    TrustDomainChar(char),
    #[error("a path segment is empty, \".\" or \"..\"")]
    Segment,
    #[error("a path may hold only letters, digits, '.', '-' and '_' between '/' (found {0:?})")]
    PathChar(char),
    #[error("a SPIFFE ID has no query, fragment or user info")]
    Extra,
}

impl SpiffeId {
    /// `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.
    pub fn kubernetes(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, InvalidSpiffeId> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn trust_domain(&self) -> &str {
        let rest = &self.0[SCHEME.len()..];
        rest.split_once('/').map_or(rest, |(domain, _)| domain)
    }

    /// The path after the trust domain, with its leading '/', or "" for the domain's own ID.
    pub fn path(&self) -> &str {
        let rest = &self.0[SCHEME.len()..];
        rest.find('/').map_or("", |i| &rest[i..])
    }

    /// The namespace of a `/ns/NAMESPACE/sa/SERVICE_ACCOUNT` ID.
    pub fn namespace(&self) -> Option<&str> {
        self.kubernetes_parts().map(|(ns, _)| ns)
    }

    /// The service account of a `/ns/NAMESPACE/sa/SERVICE_ACCOUNT` ID.
    pub fn service_account(&self) -> Option<&str> {
        self.kubernetes_parts().map(|(_, sa)| sa)
    }

    fn kubernetes_parts(&self) -> Option<(&str, &str)> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl FromStr for SpiffeId {
    type Err = InvalidSpiffeId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix(SCHEME).ok_or(InvalidSpiffeId::Scheme)?;
        if s.len() > MAX_LEN {
            return Err(InvalidSpiffeId::TooLong);
        }
        if rest.contains(['?', '#', '@']) {
            return Err(InvalidSpiffeId::Extra);
        }
        let (domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if domain.is_empty() {
            return Err(InvalidSpiffeId::EmptyTrustDomain);
        }
        if let Some(c) = domain
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(InvalidSpiffeId::TrustDomainChar(c));
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() || segment == "." || segment == ".." {
                    return Err(InvalidSpiffeId::Segment);
                }
                if let Some(c) = segment
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(InvalidSpiffeId::PathChar(c));
                }
            }
        }
        Ok(Self(Arc::from(s)))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_ids_split_into_their_parts() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("web"));
        assert_eq!(
            SpiffeId::kubernetes("cluster.local", "default", "web").unwrap(),
            id
        );
    }

    #[test]
    fn other_paths_have_no_namespace() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/workload",
            "spiffe://example.org/ns/a/sa/b/extra",
            "spiffe://example.org/ns/a/x/b",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.namespace(), None, "{s}");
        }
        let bare: SpiffeId = "spiffe://example.org".parse().unwrap();
        assert_eq!(bare.trust_domain(), "example.org");
        assert_eq!(bare.path(), "");
    }

    #[test]
    fn malformed_ids_are_refused_with_the_reason() {
        let cases = [
            ("http://example.org/a", InvalidSpiffeId::Scheme),
            ("spiffe:///a", InvalidSpiffeId::EmptyTrustDomain),
            (
                "spiffe://Example.org/a",
                InvalidSpiffeId::TrustDomainChar('E'),
            ),
            ("spiffe://example.org/", InvalidSpiffeId::Segment),
            ("spiffe://example.org/a//b", InvalidSpiffeId::Segment),
            ("spiffe://example.org/a/../b", InvalidSpiffeId::Segment),
            ("spiffe://example.org/a b", InvalidSpiffeId::PathChar(' ')),
            ("spiffe://example.org/a?b=c", InvalidSpiffeId::Extra),
            ("spiffe://user@example.org/a", InvalidSpiffeId::Extra),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<SpiffeId>(), Err(want), "{s}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_LEN));
        assert_eq!(long.parse::<SpiffeId>(), Err(InvalidSpiffeId::TooLong));
    }
}
