//! Node heartbeats, held in the control plane's memory rather than in the store.
//!
//! A heartbeat says only "this node is alive now"; it is worth nothing after a few seconds, so
//! making it durable would cost a write per node every beat (5,000 nodes beating every 2 s is
//! 2,500 durable writes a second) for nothing. etcd's own lease keep-alives are not written
//! to its log either. Times are the control plane's monotonic clock at arrival, never the
//! node's wall clock, so a node with a skewed clock is judged like any other. After a restart
//! of the control plane no lease is known: every node gets one `grace` from the start before
//! it can be judged NotReady (Kubernetes' node controller does the same); a new leader, or a
//! server that reads the shared leases again after etcd was away, gives the same grace again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{StoreError, lock};

/// Where renewals go when several servers share the control plane (on etcd): any server may
/// receive a node's heartbeat, and every server learns of it from there ([`Leases::hold_shared`],
/// [`Leases::end_shared`]).
#[async_trait::async_trait]
pub trait SharedLeases: Send + Sync + 'static {
    /// Renews `node`'s lease for `duration`; an error means the renewal did not count.
    async fn renew(&self, node: &str, duration: Duration) -> Result<(), StoreError>;
}

/// What the control plane knows of a node's lease at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed `ago` before now, for `duration` from its renewal.
    Held { ago: Duration, duration: Duration },
    /// Never renewed since this control plane started, `since_start` ago; nodes are given
    /// `grace` from the start.
    Unknown {
        since_start: Duration,
        grace: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
struct Held {
    renewed: Instant,
    duration: Duration,
    /// Held in the shared store: live until it says the lease ended.
    shared: bool,
}

impl Held {
    fn live(&self, now: Instant) -> bool {
        self.shared || now.saturating_duration_since(self.renewed) < self.duration
    }
}

/// The leases of every node, as renewed through this control plane.
#[derive(Debug)]
pub struct Leases {
    held: Mutex<HashMap<String, Held>>,
    started: Instant,
    grace: Duration,
    /// The start of the latest [`Leases::regrace`], if any.
    regraced: Mutex<Option<Instant>>,
    /// Bumped when a renewal makes a node live that was not (first lease, or expired), and
    /// when a shared lease ends.
    revived: tokio::sync::watch::Sender<u64>,
    shared: OnceLock<Arc<dyn SharedLeases>>,
}

impl std::fmt::Debug for dyn SharedLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedLeases")
    }
}

/// How long a node's lease lasts unless its agent is configured otherwise (renewed every
/// third of it), and the grace a restarted control plane gives every node.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(6);

/// Longest lease a node may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);

impl Default for Leases {
    /// A table with [`DEFAULT_LEASE`] as the grace.
    fn default() -> Self {
        Self::new(DEFAULT_LEASE)
    }
}

impl Leases {
    /// A table whose nodes are given `grace` from now before an unknown lease counts as
    /// expired.
    pub fn new(grace: Duration) -> Self {
        Self {
            held: Mutex::new(HashMap::new()),
            started: Instant::now(),
            grace,
            regraced: Mutex::new(None),
            revived: tokio::sync::watch::Sender::new(0),
            shared: OnceLock::new(),
        }
    }

    /// Sends every renewal to `relay` from now on (set once, before the API serves).
    pub fn share(&self, relay: Arc<dyn SharedLeases>) {
        let _ = self.shared.set(relay);
    }

    /// Where renewals go, when the leases are shared.
    pub fn shared(&self) -> Option<&Arc<dyn SharedLeases>> {
        self.shared.get()
    }

    /// `node`'s lease, held in the shared store for `duration` per renewal, is live.
    pub fn hold_shared(&self, node: &str, duration: Duration) {
        let now = Instant::now();
        self.insert(
            node,
            Held {
                renewed: now,
                duration: duration.min(MAX_LEASE),
                shared: true,
            },
            now,
        );
    }

    /// Records `held` for `node`; a node that was not live is revived.
    fn insert(&self, node: &str, held: Held, now: Instant) {
        let revived = match lock(&self.held).insert(node.to_string(), held) {
            Some(before) => !before.live(now),
            None => true,
        };
        if revived {
            self.bump();
        }
    }

    /// `node`'s shared lease ended (expired or revoked) just now.
    pub fn end_shared(&self, node: &str) {
        let now = Instant::now();
        let mut held = lock(&self.held);
        if let Some(h) = held.get_mut(node)
            && h.shared
        {
            h.shared = false;
            h.renewed = now.checked_sub(h.duration).unwrap_or(now);
            drop(held);
            self.bump();
        }
    }

    fn bump(&self) {
        self.revived.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Renews `node`'s lease for `duration` from now (at most [`MAX_LEASE`]).
    pub fn renew(&self, node: &str, duration: Duration) {
        self.renew_at(node, duration.min(MAX_LEASE), Instant::now());
    }

    fn renew_at(&self, node: &str, duration: Duration, now: Instant) {
        self.insert(
            node,
            Held {
                renewed: now,
                duration,
                shared: false,
            },
            now,
        );
    }

    /// What this table knows may be stale (a new leader took over, or the shared store was
    /// unreachable and its leases are being read again): for one `grace` from now, a lease
    /// that looks expired is Unknown instead, as after a restart, so that no node is judged
    /// lost on a view older than its renewals.
    pub fn regrace(&self) {
        self.regrace_at(Instant::now());
    }

    fn regrace_at(&self, now: Instant) {
        *lock(&self.regraced) = Some(now);
    }

    /// The lease of `node` as of now.
    pub fn state(&self, node: &str) -> LeaseState {
        self.state_at(node, Instant::now())
    }

    fn state_at(&self, node: &str, now: Instant) -> LeaseState {
        let state = self.known_at(node, now);
        if state.left().is_zero()
            && let Some(from) = *lock(&self.regraced)
        {
            let since = now.saturating_duration_since(from);
            if since < self.grace {
                return LeaseState::Unknown {
                    since_start: since,
                    grace: self.grace,
                };
            }
        }
        state
    }

    fn known_at(&self, node: &str, now: Instant) -> LeaseState {
        match lock(&self.held).get(node) {
            Some(h) if h.shared => LeaseState::Held {
                ago: Duration::ZERO,
                duration: h.duration,
            },
            Some(h) => LeaseState::Held {
                ago: now.saturating_duration_since(h.renewed),
                duration: h.duration,
            },
            None => LeaseState::Unknown {
                since_start: now.saturating_duration_since(self.started),
                grace: self.grace,
            },
        }
    }

    /// Forgets the expired leases of nodes `keep` says no longer exist. A live lease stays:
    /// it may belong to a node registering right now, after the caller listed the nodes.
    pub fn retain(&self, keep: impl FnMut(&str) -> bool) {
        self.retain_at(keep, Instant::now());
    }

    fn retain_at(&self, mut keep: impl FnMut(&str) -> bool, now: Instant) {
        lock(&self.held).retain(|name, held| held.live(now) || keep(name));
    }

    /// Changes each time a node becomes live that was not, or a shared lease ends: what the
    /// node lifecycle waits on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revived.subscribe()
    }
}

impl LeaseState {
    /// Time left before the lease counts as expired (zero once it has).
    pub fn left(&self) -> Duration {
        match *self {
            LeaseState::Held { ago, duration } => duration.saturating_sub(ago),
            LeaseState::Unknown { since_start, grace } => grace.saturating_sub(since_start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_are_judged_on_the_control_planes_clock() {
        let leases = Leases::new(Duration::from_secs(6));
        let t0 = leases.started;
        assert_eq!(
            leases.state_at("a", t0 + Duration::from_secs(2)),
            LeaseState::Unknown {
                since_start: Duration::from_secs(2),
                grace: Duration::from_secs(6)
            }
        );
        let mut revived = leases.subscribe();
        leases.renew_at("a", Duration::from_secs(3), t0 + Duration::from_secs(1));
        assert!(
            revived.has_changed().unwrap_or(false),
            "a first lease revives"
        );
        revived.mark_unchanged();
        leases.renew_at("a", Duration::from_secs(3), t0 + Duration::from_secs(2));
        assert!(!revived.has_changed().unwrap_or(true), "a renewal does not");
        let s = leases.state_at("a", t0 + Duration::from_secs(4));
        assert_eq!(s.left(), Duration::from_secs(1));
        // Expired, then renewed: revived again.
        leases.renew_at("a", Duration::from_secs(3), t0 + Duration::from_secs(9));
        assert!(revived.has_changed().unwrap_or(false));
        // A live lease survives a stale list of nodes; an expired one of an unknown node goes.
        let later = t0 + Duration::from_secs(20);
        leases.renew_at("b", Duration::from_secs(60), later);
        leases.renew_at("c", Duration::from_secs(1), t0);
        leases.retain_at(|_| false, later);
        assert!(matches!(
            leases.state_at("b", later),
            LeaseState::Held { .. }
        ));
        assert!(matches!(
            leases.state_at("c", later),
            LeaseState::Unknown { .. }
        ));
    }

    #[test]
    fn a_regrace_holds_judgement_for_one_grace() {
        let leases = Leases::new(Duration::from_secs(6));
        let t0 = leases.started;
        leases.renew_at("a", Duration::from_secs(3), t0 + Duration::from_secs(10));
        leases.renew_at("b", Duration::from_secs(3), t0 + Duration::from_secs(19));
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(
            leases.state_at("a", at(20)).left(),
            Duration::ZERO,
            "expired"
        );
        // A new term at 20 s: for 6 s, a lease that looks expired is not judged.
        leases.regrace_at(at(20));
        assert_eq!(
            leases.state_at("a", at(22)),
            LeaseState::Unknown {
                since_start: Duration::from_secs(2),
                grace: Duration::from_secs(6)
            }
        );
        // A live lease is what it is.
        assert_eq!(
            leases.state_at("b", at(21)),
            LeaseState::Held {
                ago: Duration::from_secs(2),
                duration: Duration::from_secs(3)
            }
        );
        // After the grace, expired again; renewed meanwhile, live.
        assert_eq!(leases.state_at("a", at(27)).left(), Duration::ZERO);
        leases.renew_at("a", Duration::from_secs(3), at(25));
        assert_eq!(leases.state_at("a", at(26)).left(), Duration::from_secs(2));
    }
}
