//! Node lifecycle: a node is Ready while its lease (renewed by its agent) has not expired. The
//! decision is pure ([`readiness`]); the controller writes the `Ready` condition only when it
//! changes, so heartbeats cost one small lease write each and nothing more.

use std::time::{Duration, SystemTime};

use flotilla_spec::{LeaseSpec, NodeCondition};

pub const READY: &str = "Ready";

/// What the `Ready` condition should say at `now`, and how long until that can change
/// (`None`: only a new heartbeat can change it).
pub fn readiness(
    lease: Option<&LeaseSpec>,
    now: SystemTime,
) -> (bool, String, String, Option<Duration>) {
    let Some(lease) = lease else {
        return (
            false,
            "NoLease".into(),
            "the agent has not sent a heartbeat".into(),
            None,
        );
    };
    let Some(renewed) = humantime::parse_rfc3339_weak(&lease.renew_time).ok() else {
        return (
            false,
            "BadLease".into(),
            format!("unreadable renew time {:?}", lease.renew_time),
            None,
        );
    };
    let expires = renewed + Duration::from_secs(u64::from(lease.duration_seconds));
    match expires.duration_since(now) {
        Ok(left) if !left.is_zero() => (
            true,
            "AgentHeartbeat".into(),
            "the agent renews its lease".into(),
            Some(left),
        ),
        _ => {
            let since = now.duration_since(renewed).unwrap_or_default();
            (
                false,
                "LeaseExpired".into(),
                format!(
                    "no heartbeat for {} (lease {}s)",
                    humantime::format_duration(Duration::from_secs(since.as_secs())),
                    lease.duration_seconds
                ),
                None,
            )
        }
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

    fn lease(at: SystemTime, secs: u32) -> LeaseSpec {
        LeaseSpec {
            renew_time: humantime::format_rfc3339_millis(at).to_string(),
            duration_seconds: secs,
        }
    }

    #[test]
    fn ready_until_the_lease_expires() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let l = lease(t0, 6);
        let (ready, _, _, left) = readiness(Some(&l), t0 + Duration::from_secs(2));
        assert!(ready);
        assert_eq!(left, Some(Duration::from_secs(4)));
        let (ready, reason, message, left) = readiness(Some(&l), t0 + Duration::from_secs(9));
        assert!(!ready);
        assert_eq!(reason, "LeaseExpired");
        assert_eq!(message, "no heartbeat for 9s (lease 6s)");
        assert_eq!(left, None);
        assert!(!readiness(None, t0).0);
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
