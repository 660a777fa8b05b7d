//! What one stream has asked for and been sent, per resource type, and the pure decision of
//! what to send next. Shared by the State-of-the-World and the incremental (delta) protocols.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tokio::time::Instant;

use crate::cache::{ByName, Resource};

/// Per stream and type: the subscription, what the client holds, and the unacknowledged push.
#[derive(Debug, Default)]
pub struct TypeState {
    /// Subscribed to everything of this type.
    pub wildcard: bool,
    /// The first request subscribed to nothing, which the spec reads as a wildcard and keeps
    /// reading that way as long as later requests name nothing either.
    legacy_wildcard: bool,
    pub names: BTreeSet<String>,
    /// Name → version of every resource the client has been sent (or told us it has).
    pub sent: HashMap<Arc<str>, Arc<str>>,
    /// A push awaiting its ACK or NACK; nothing newer is sent until it is answered, so a stream
    /// that stops reading or answering gets at most one response per type in flight.
    pub pending: Option<Pending>,
    /// The nonce of the newest push of this type; any other nonce is stale.
    pub last_nonce: Option<String>,
    /// Has the client made a request for this type at all?
    pub requested: bool,
    pub acked_version: Option<String>,
    pub last_nack: Option<String>,
    /// The type version (`Resources::type_version`) this stream was last brought up to date
    /// with under its current subscription: while the snapshot's type version is still this
    /// one, there is nothing to diff. `None` whenever the subscription changes.
    pub up_to_date_at: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Pending {
    pub version: u64,
    pub changed_at: Instant,
}

/// What to send a client for one type.
#[derive(Debug, Default)]
pub struct Diff {
    pub changed: Vec<Arc<Resource>>,
    pub removed: Vec<Arc<str>>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

impl TypeState {
    /// Applies a State-of-the-World request's `resource_names`.
    pub fn set_sotw_names(&mut self, names: &[String]) {
        let first = !self.requested;
        self.requested = true;
        if first && names.is_empty() {
            self.legacy_wildcard = true;
        }
        let wildcard = names.iter().any(|n| n == "*") || (self.legacy_wildcard && names.is_empty());
        if !names.is_empty() {
            self.legacy_wildcard = false;
        }
        // Every ACK repeats the subscription, usually unchanged and in the same (sorted)
        // order: then there is nothing to rebuild or forget.
        let explicit = names.iter().filter(|n| *n != "*");
        if !first && wildcard == self.wildcard && self.names.iter().eq(explicit.clone()) {
            return;
        }
        self.wildcard = wildcard;
        self.names = explicit.cloned().collect();
        self.up_to_date_at = None;
        self.forget_unsubscribed();
    }

    /// Applies an incremental request's subscribe and unsubscribe lists.
    pub fn update_delta_names(&mut self, subscribe: &[String], unsubscribe: &[String]) {
        let first = !self.requested;
        self.requested = true;
        if first && subscribe.is_empty() {
            self.legacy_wildcard = true;
            self.wildcard = true;
        }
        for name in subscribe {
            if name == "*" {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
            }
        }
        for name in unsubscribe {
            if name == "*" {
                self.wildcard = false;
                self.legacy_wildcard = false;
            } else {
                self.names.remove(name);
            }
        }
        if first || !subscribe.is_empty() || !unsubscribe.is_empty() {
            self.up_to_date_at = None;
        }
        if !subscribe.is_empty() && self.legacy_wildcard && !subscribe.iter().any(|n| n == "*") {
            // Naming resources ends a legacy wildcard (spec: "Explicitly subscribing to
            // resources" after an implicit wildcard subscription).
            self.legacy_wildcard = false;
            self.wildcard = false;
        }
        self.forget_unsubscribed();
    }

    fn subscribed(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// An unsubscribed resource is forgotten, so a later re-subscription sends it again.
    fn forget_unsubscribed(&mut self) {
        if self.wildcard {
            return;
        }
        let names = &self.names;
        self.sent.retain(|name, _| names.contains(&**name));
    }

    /// What differs between the client's view and `current`, for the subscribed names.
    pub fn diff(&self, current: &ByName) -> Diff {
        let mut diff = Diff::default();
        // How many of the client's resources are still visible to it in `current`: when that
        // is all of them, nothing was removed and the search for removals is skipped.
        let mut still_there = 0;
        let mut consider = |resource: &Arc<Resource>| match self.sent.get(&resource.name) {
            Some(v) => {
                still_there += 1;
                if **v != *resource.version {
                    diff.changed.push(Arc::clone(resource));
                }
            }
            None => diff.changed.push(Arc::clone(resource)),
        };
        if self.wildcard {
            current
                .values()
                .filter(|r| !r.named_only)
                .for_each(&mut consider);
        }
        for name in &self.names {
            if let Some(r) = current.get(name.as_str())
                && (!self.wildcard || r.named_only)
            {
                consider(r);
            }
        }
        if still_there < self.sent.len() {
            for name in self.sent.keys() {
                let gone = match current.get(name) {
                    None => true,
                    // Still there, but only for clients naming it.
                    Some(r) => r.named_only && !self.names.contains(&**name),
                };
                if gone && self.subscribed(name) {
                    diff.removed.push(Arc::clone(name));
                }
            }
        }
        diff.removed.sort();
        diff
    }

    /// Every subscribed resource that exists (a full State-of-the-World response).
    pub fn all_subscribed(&self, current: &ByName) -> Vec<Arc<Resource>> {
        let mut out: Vec<Arc<Resource>> = if self.wildcard {
            current
                .values()
                .filter(|r| !r.named_only)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        for name in &self.names {
            if let Some(r) = current.get(name.as_str())
                && (!self.wildcard || r.named_only)
            {
                out.push(Arc::clone(r));
            }
        }
        out
    }

    /// Records that `changed` and `removed` were sent.
    pub fn mark_sent(&mut self, changed: &[Arc<Resource>], removed: &[Arc<str>]) {
        for r in changed {
            self.sent
                .insert(Arc::clone(&r.name), Arc::clone(&r.version));
        }
        for name in removed {
            self.sent.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Any;

    fn res(name: &str, version: &str) -> (Arc<str>, Arc<Resource>) {
        let r = Arc::new(Resource {
            name: Arc::from(name),
            version: Arc::from(version),
            any: Any::default(),
            named_only: false,
        });
        (Arc::clone(&r.name), r)
    }

    fn names(d: &[Arc<Resource>]) -> Vec<&str> {
        d.iter().map(|r| &*r.name).collect()
    }

    #[test]
    fn sotw_legacy_wildcard_and_explicit_names() {
        let mut s = TypeState::default();
        s.set_sotw_names(&[]);
        assert!(s.wildcard, "a first request naming nothing is a wildcard");
        s.set_sotw_names(&[]);
        assert!(s.wildcard, "and stays one");
        s.set_sotw_names(&["a".into()]);
        assert!(!s.wildcard);
        s.set_sotw_names(&[]);
        assert!(
            !s.wildcard,
            "after naming resources, an empty list means nothing"
        );
        s.set_sotw_names(&["*".into(), "b".into()]);
        assert!(s.wildcard);
    }

    #[test]
    fn sotw_first_request_with_names_is_not_wildcard() {
        let mut s = TypeState::default();
        s.set_sotw_names(&["a".into()]);
        assert!(!s.wildcard);
        let current: ByName = [res("a", "1"), res("b", "1")].into_iter().collect();
        assert_eq!(names(&s.diff(&current).changed), ["a"]);
    }

    #[test]
    fn diff_sends_only_changed_and_reports_removed() {
        let mut s = TypeState::default();
        s.set_sotw_names(&[]);
        let v1: ByName = [res("a", "1"), res("b", "1"), res("c", "1")]
            .into_iter()
            .collect();
        let d = s.diff(&v1);
        assert_eq!(names(&d.changed), ["a", "b", "c"]);
        s.mark_sent(&d.changed, &d.removed);
        assert!(s.diff(&v1).is_empty());

        let v2: ByName = [res("a", "1"), res("b", "2")].into_iter().collect();
        let d = s.diff(&v2);
        assert_eq!(names(&d.changed), ["b"]);
        assert_eq!(d.removed, vec![Arc::<str>::from("c")]);
        s.mark_sent(&d.changed, &d.removed);
        assert!(s.diff(&v2).is_empty());
    }

    #[test]
    fn unsubscribing_forgets_so_resubscribing_resends() {
        let mut s = TypeState::default();
        s.update_delta_names(&["a".into(), "b".into()], &[]);
        assert!(!s.wildcard);
        let v: ByName = [res("a", "1"), res("b", "1")].into_iter().collect();
        let d = s.diff(&v);
        s.mark_sent(&d.changed, &d.removed);
        s.update_delta_names(&[], &["a".into()]);
        assert!(s.diff(&v).is_empty(), "an unsubscribed name is not sent");
        s.update_delta_names(&["a".into()], &[]);
        assert_eq!(names(&s.diff(&v).changed), ["a"]);
    }

    #[test]
    fn delta_wildcard_rules() {
        let mut s = TypeState::default();
        s.update_delta_names(&[], &[]);
        assert!(
            s.wildcard,
            "first delta request naming nothing is a wildcard"
        );
        let mut s = TypeState::default();
        s.update_delta_names(&["x".into()], &[]);
        assert!(!s.wildcard);
        s.update_delta_names(&["*".into()], &[]);
        assert!(s.wildcard);
        s.update_delta_names(&[], &["*".into()]);
        assert!(!s.wildcard);
        assert!(s.names.contains("x"));
    }

    #[test]
    fn named_only_resources_skip_wildcards_but_not_names() {
        let hidden = Arc::new(Resource {
            name: Arc::from("api"),
            version: Arc::from("1"),
            any: Any::default(),
            named_only: true,
        });
        let current: ByName = [res("web", "1"), (Arc::clone(&hidden.name), hidden)]
            .into_iter()
            .collect();
        let mut wildcard = TypeState::default();
        wildcard.set_sotw_names(&[]);
        assert_eq!(names(&wildcard.all_subscribed(&current)), ["web"]);
        assert_eq!(names(&wildcard.diff(&current).changed), ["web"]);
        let mut named = TypeState::default();
        named.set_sotw_names(&["api".into()]);
        assert_eq!(names(&named.all_subscribed(&current)), ["api"]);
        assert_eq!(names(&named.diff(&current).changed), ["api"]);
    }

    #[test]
    fn a_repeated_subscription_keeps_the_stream_up_to_date() {
        let mut s = TypeState::default();
        s.set_sotw_names(&["a".into(), "b".into()]);
        s.up_to_date_at = Some(3);
        s.set_sotw_names(&["a".into(), "b".into()]);
        assert_eq!(
            s.up_to_date_at,
            Some(3),
            "an ACK repeating the names changes nothing"
        );
        s.set_sotw_names(&["b".into(), "a".into()]);
        assert_eq!(s.names.len(), 2, "another order is the same subscription");
        s.up_to_date_at = Some(3);
        s.set_sotw_names(&["a".into()]);
        assert_eq!(s.up_to_date_at, None, "a new subscription needs a new diff");
        s.up_to_date_at = Some(3);
        s.update_delta_names(&[], &["a".into()]);
        assert_eq!(s.up_to_date_at, None);
    }

    #[test]
    fn diff_finds_removals_only_when_something_is_gone() {
        let mut s = TypeState::default();
        s.update_delta_names(&["a".into(), "b".into()], &[]);
        let v1: ByName = [res("a", "1"), res("b", "1")].into_iter().collect();
        let d = s.diff(&v1);
        s.mark_sent(&d.changed, &d.removed);
        let v2: ByName = [res("a", "2")].into_iter().collect();
        let d = s.diff(&v2);
        assert_eq!(names(&d.changed), ["a"]);
        assert_eq!(d.removed, vec![Arc::<str>::from("b")]);
    }

    #[test]
    fn initial_versions_from_the_client_avoid_resending() {
        let mut s = TypeState::default();
        s.update_delta_names(&[], &[]);
        s.sent.insert(Arc::from("a"), Arc::from("1"));
        let v: ByName = [res("a", "1"), res("b", "1")].into_iter().collect();
        assert_eq!(names(&s.diff(&v).changed), ["b"]);
    }
}
