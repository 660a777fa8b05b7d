//! Who may call a listener: allow lists of SPIFFE IDs, namespaces and trust domains over the
//! peer identity that mTLS proved, and a default for everyone else. Pure; the listener and
//! the request path apply the verdict (close the connection, or 403) and count it.

use crate::identity::SpiffeId;

/// A listener's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// What happens to a caller no allow entry names.
    pub default_allow: bool,
    pub identities: Vec<SpiffeId>,
    pub namespaces: Vec<String>,
    pub trust_domains: Vec<String>,
}

/// Why a caller was refused; the label of `tern_authz_denied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deny {
    /// Plaintext: no identity to check against the allow lists.
    NoIdentity,
    /// An identity, but not one the policy allows.
    NotAllowed,
}

impl Deny {
    pub const ALL: [Deny; 2] = [Deny::NoIdentity, Deny::NotAllowed];

    pub fn as_str(self) -> &'static str {
        match self {
            Deny::NoIdentity => "no_identity",
            Deny::NotAllowed => "not_allowed",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The body of a 403.
    pub fn explain(self, peer: Option<&SpiffeId>) -> String {
        match (self, peer) {
            (Deny::NoIdentity, _) => {
                "forbidden: this port needs a mesh identity (mTLS) and the caller has none\n"
                    .to_owned()
            }
            (Deny::NotAllowed, Some(id)) => {
                format!("forbidden: {id} is not allowed to call this port\n")
            }
            (Deny::NotAllowed, None) => "forbidden: caller not allowed\n".to_owned(),
        }
    }
}

impl Authorization {
    /// Allowed when an allow entry names the peer, else the default decides.
    pub fn decide(&self, peer: Option<&SpiffeId>) -> Result<(), Deny> {
        if let Some(id) = peer {
            let named = self.identities.iter().any(|allowed| allowed == id)
                || id
                    .namespace()
                    .is_some_and(|ns| self.namespaces.iter().any(|n| n == ns))
                || self.trust_domains.iter().any(|d| d == id.trust_domain());
            if named || self.default_allow {
                return Ok(());
            }
            return Err(Deny::NotAllowed);
        }
        if self.default_allow {
            Ok(())
        } else {
            Err(Deny::NoIdentity)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn deny_by_default() -> Authorization {
        Authorization {
            default_allow: false,
            identities: vec![id("spiffe://cluster.local/ns/shop/sa/web")],
            namespaces: vec!["ops".into()],
            trust_domains: vec!["partner.example".into()],
        }
    }

    #[test]
    fn default_deny_admits_only_what_is_named() {
        let policy = deny_by_default();
        let cases = [
            (Some("spiffe://cluster.local/ns/shop/sa/web"), Ok(())),
            (Some("spiffe://cluster.local/ns/ops/sa/anything"), Ok(())),
            (Some("spiffe://partner.example/billing"), Ok(())),
            (
                Some("spiffe://cluster.local/ns/shop/sa/other"),
                Err(Deny::NotAllowed),
            ),
            (
                // A namespace is only read from /ns/NS/sa/SA paths.
                Some("spiffe://cluster.local/ops"),
                Err(Deny::NotAllowed),
            ),
            (None, Err(Deny::NoIdentity)),
        ];
        for (peer, want) in cases {
            let peer = peer.map(id);
            assert_eq!(policy.decide(peer.as_ref()), want, "{peer:?}");
        }
    }

    #[test]
    fn default_allow_admits_everyone() {
        let policy = Authorization {
            default_allow: true,
            ..deny_by_default()
        };
        assert_eq!(policy.decide(None), Ok(()));
        assert_eq!(
            policy.decide(Some(&id("spiffe://cluster.local/ns/x/sa/y"))),
            Ok(())
        );
    }

    #[test]
    fn a_deny_explains_itself() {
        let peer = id("spiffe://cluster.local/ns/x/sa/y");
        assert!(
            Deny::NotAllowed
                .explain(Some(&peer))
                .contains("spiffe://cluster.local/ns/x/sa/y is not allowed")
        );
        assert!(Deny::NoIdentity.explain(None).contains("mTLS"));
    }
}
