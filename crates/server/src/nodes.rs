//! Node lifecycle: a node is Ready while its lease (renewed by its agent, held in the control
//! plane's memory: [`flotilla_store::Leases`]) has not expired. The decision is pure
//! ([`readiness`]); the controller writes the `Ready` condition only when it changes, so a
//! heartbeat costs the store nothing.

use std::time::Duration;

use flotilla_spec::NodeCondition;
use flotilla_store::LeaseState;

pub const READY: &str = "Ready";

/// What the `Ready` condition of a node should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
    /// How long until this can change without a new heartbeat (`None`: only a heartbeat can).
    pub recheck: Option<Duration>,
}

/// Readiness from the lease; `was_ready` is the condition as stored, which a control plane
/// that has just started (and knows no lease yet) keeps during its grace period.
pub fn readiness(lease: LeaseState, was_ready: bool) -> Readiness {
    let left = lease.left();
    match lease {
        LeaseState::Held { .. } if !left.is_zero() => Readiness {
            ready: true,
            reason: "AgentHeartbeat",
            message: "the agent renews its lease".into(),
            recheck: Some(left),
        },
        LeaseState::Held { ago, duration } => Readiness {
            ready: false,
            reason: "LeaseExpired",
            message: format!(
                "no heartbeat for {} (lease {})",
                humantime::format_duration(Duration::from_secs(ago.as_secs())),
                humantime::format_duration(duration)
            ),
            recheck: None,
        },
        LeaseState::Unknown { .. } if was_ready && !left.is_zero() => Readiness {
            ready: true,
            reason: "AgentHeartbeat",
            message: "the agent renews its lease".into(),
            recheck: Some(left),
        },
        LeaseState::Unknown { since_start, .. } => Readiness {
            ready: false,
            reason: "NoHeartbeat",
            message: format!(
                "no heartbeat since the control plane started {} ago",
                humantime::format_duration(Duration::from_secs(since_start.as_secs()))
            ),
            recheck: None,
        },
    }
}

/// `conditions` with `Ready` set to `status` (its transition time kept unless the status
/// changed); `false` when nothing changed.
pub fn set_ready(
    conditions: &mut Vec<NodeCondition>,
    status: bool,
    reason: &str,
    message: &str,
    now: &str,
) -> bool {
    match conditions.iter_mut().find(|c| c.kind == READY) {
        Some(c) if c.status == status && c.reason == reason => false,
        Some(c) => {
            if c.status != status {
                c.last_transition = now.to_string();
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message.to_string();
            true
        }
        None => {
            conditions.push(NodeCondition {
                kind: READY.to_string(),
                status,
                reason: reason.to_string(),
                message: message.to_string(),
                last_transition: now.to_string(),
            });
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(ago: u64, duration: u64) -> LeaseState {
        LeaseState::Held {
            ago: Duration::from_secs(ago),
            duration: Duration::from_secs(duration),
        }
    }

    #[test]
    fn ready_until_the_lease_expires() {
        let r = readiness(held(2, 6), false);
        assert!(r.ready);
        assert_eq!(r.recheck, Some(Duration::from_secs(4)));
        let r = readiness(held(9, 6), true);
        assert!(!r.ready);
        assert_eq!(r.reason, "LeaseExpired");
        assert_eq!(r.message, "no heartbeat for 9s (lease 6s)");
        assert_eq!(r.recheck, None);
    }

    #[test]
    fn a_restarted_control_plane_gives_ready_nodes_their_grace() {
        let unknown = |since: u64| LeaseState::Unknown {
            since_start: Duration::from_secs(since),
            grace: Duration::from_secs(6),
        };
        let r = readiness(unknown(1), true);
        assert!(r.ready);
        assert_eq!(r.recheck, Some(Duration::from_secs(5)));
        assert!(!readiness(unknown(7), true).ready);
        let r = readiness(unknown(1), false);
        assert!(!r.ready, "a node never seen beating is not made Ready");
        assert_eq!(r.reason, "NoHeartbeat");
    }

    #[test]
    fn the_condition_changes_only_when_readiness_does() {
        let mut c = Vec::new();
        assert!(set_ready(&mut c, true, "AgentHeartbeat", "ok", "t1"));
        assert!(!set_ready(&mut c, true, "AgentHeartbeat", "ok", "t2"));
        assert_eq!(c[0].last_transition, "t1");
        assert!(set_ready(
            &mut c,
            false,
            "LeaseExpired",
            "no heartbeat",
            "t3"
        ));
        assert_eq!((c[0].status, c[0].last_transition.as_str()), (false, "t3"));
    }
}
