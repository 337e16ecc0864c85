//! The service controller's decision: a pure function from desired and observed state to actions.
//!
//! No IO happens here; `controller.rs` executes the actions. Start-up is the same path as any
//! change: reconcile against whatever instances exist, possibly none.

use flotilla_spec::{Instance, Phase, Service};

/// Something the executor does to move observed state toward desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create one instance of `service` from its current spec.
    Create { service: String, spec_hash: String },
    /// Begin graceful deletion: the gateway stops routing to it, the agent stops it and removes it.
    Delete {
        instance: String,
        reason: DeleteReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// The service was deleted.
    ServiceGone,
    /// More instances than replicas.
    ScaleDown,
    /// Runs an older spec and enough current ones are ready.
    Replaced,
}

impl DeleteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeleteReason::ServiceGone => "service deleted",
            DeleteReason::ScaleDown => "scaled down",
            DeleteReason::Replaced => "replaced by a newer spec",
        }
    }
}

fn deleting(i: &Instance) -> bool {
    i.metadata.deletion_timestamp.is_some()
}

fn ready(i: &Instance) -> bool {
    i.is_routable()
}

/// Computes the actions for one service. `instances` are those owned by the service (by
/// `spec.service`); `service` is `None` once it has been deleted.
///
/// Guarantees (property-tested): only instances of this service are touched; nothing is deleted
/// twice; when the spec changes, old instances are removed only as new ones become ready, so
/// ready instances never drop below what was ready; the result converges to exactly
/// `replicas` instances of the current spec (terminal ones included: they honour their
/// restart policy and are not replaced until the spec changes).
pub fn plan(name: &str, service: Option<&Service>, instances: &[&Instance]) -> Vec<Action> {
    let mut actions = Vec::new();
    let live: Vec<&Instance> = instances
        .iter()
        .copied()
        .filter(|i| !deleting(i) && i.spec.service == name)
        .collect();

    let Some(service) = service else {
        for i in live {
            actions.push(delete(i, DeleteReason::ServiceGone));
        }
        return actions;
    };
    let hash = flotilla_spec::spec_hash(&service.spec);
    let replicas = service.spec.replicas as usize;

    // A terminal instance (Succeeded/Failed: only under restart policy `never` or `on-failure`)
    // has done what its policy asked. It still counts toward `replicas`, so the policy is
    // honoured rather than turned into "replace at once"; it is replaced when the spec changes.
    let (mut current, old): (Vec<&Instance>, Vec<&Instance>) =
        live.into_iter().partition(|i| i.spec.spec_hash == hash);

    // Scale the current spec to `replicas`: create the missing ones, or remove the extras,
    // least useful first (not ready, then newest).
    if current.len() < replicas {
        for _ in current.len()..replicas {
            actions.push(Action::Create {
                service: name.to_string(),
                spec_hash: hash.clone(),
            });
        }
    } else if current.len() > replicas {
        current.sort_by(|a, b| removal_order(a, b));
        for i in &current[..current.len() - replicas] {
            actions.push(delete(i, DeleteReason::ScaleDown));
        }
        current.drain(..current.len() - replicas);
    }

    // Old-spec instances go as current ones become ready: keep enough old ready instances that
    // ready(current) + ready(kept old) stays at least what it was, up to `replicas`.
    let ready_current = current.iter().filter(|i| ready(i)).count();
    let mut old = old;
    old.sort_by(|a, b| removal_order(a, b));
    let old_ready = old.iter().filter(|i| ready(i)).count();
    let keep_ready = replicas.saturating_sub(ready_current).min(old_ready);
    // Remove all not-ready old instances, and ready ones beyond `keep_ready`.
    let mut ready_seen = 0usize;
    // Iterate from most useful to least so the kept ones are the best.
    for i in old.iter().rev() {
        if ready(i) && ready_seen < keep_ready {
            ready_seen += 1;
            continue;
        }
        actions.push(delete(i, DeleteReason::Replaced));
    }
    actions
}

fn delete(i: &Instance, reason: DeleteReason) -> Action {
    Action::Delete {
        instance: i.metadata.name.clone(),
        reason,
    }
}

/// Orders instances from least to most useful to keep.
fn removal_order(a: &Instance, b: &Instance) -> std::cmp::Ordering {
    let score = |i: &Instance| {
        (
            !i.status.phase.is_terminal(),
            ready(i),
            i.status.phase == Phase::Running,
            std::cmp::Reverse(i.metadata.creation_timestamp.clone()),
            std::cmp::Reverse(i.metadata.name.clone()),
        )
    };
    score(a).cmp(&score(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_spec::{InstanceSpec, InstanceStatus, ObjectMeta, ServiceSpec};
    use proptest::prelude::*;

    fn spec(command: &str, replicas: u32) -> ServiceSpec {
        let mut s: ServiceSpec =
            serde_json::from_str(&format!(r#"{{"command":"{command}"}}"#)).expect("spec");
        s.replicas = replicas;
        s
    }

    fn service(command: &str, replicas: u32) -> Service {
        Service {
            metadata: ObjectMeta::named("web"),
            spec: spec(command, replicas),
            status: Default::default(),
        }
    }

    fn instance(name: &str, svc: &Service, ready: bool) -> Instance {
        Instance {
            metadata: ObjectMeta::named(name),
            spec: InstanceSpec {
                service: "web".into(),
                node: "local".into(),
                spec_hash: flotilla_spec::spec_hash(&svc.spec),
                template: svc.spec.clone(),
            },
            status: InstanceStatus {
                phase: Phase::Running,
                ready,
                ..Default::default()
            },
        }
    }

    fn creates(a: &[Action]) -> usize {
        a.iter()
            .filter(|a| matches!(a, Action::Create { .. }))
            .count()
    }
    fn deletes(a: &[Action]) -> Vec<String> {
        a.iter()
            .filter_map(|a| match a {
                Action::Delete { instance, .. } => Some(instance.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn start_up_creates_replicas() {
        let svc = service("a", 3);
        let a = plan("web", Some(&svc), &[]);
        assert_eq!(creates(&a), 3);
        assert!(deletes(&a).is_empty());
    }

    #[test]
    fn steady_state_does_nothing() {
        let svc = service("a", 2);
        let i1 = instance("web-1", &svc, true);
        let i2 = instance("web-2", &svc, false);
        assert!(plan("web", Some(&svc), &[&i1, &i2]).is_empty());
    }

    #[test]
    fn scale_down_removes_unready_first() {
        let svc = service("a", 1);
        let i1 = instance("web-1", &svc, true);
        let i2 = instance("web-2", &svc, false);
        let a = plan("web", Some(&svc), &[&i1, &i2]);
        assert_eq!(deletes(&a), vec!["web-2".to_string()]);
    }

    #[test]
    fn deleted_service_deletes_all_once() {
        let svc = service("a", 2);
        let i1 = instance("web-1", &svc, true);
        let mut i2 = instance("web-2", &svc, true);
        i2.metadata.deletion_timestamp = Some("x".into());
        let a = plan("web", None, &[&i1, &i2]);
        assert_eq!(deletes(&a), vec!["web-1".to_string()]);
    }

    #[test]
    fn terminal_instance_is_kept_until_the_spec_changes() {
        let svc = service("a", 1);
        let mut i1 = instance("web-1", &svc, false);
        i1.status.phase = Phase::Failed;
        assert!(
            plan("web", Some(&svc), &[&i1]).is_empty(),
            "restart policy is honoured"
        );
        let changed = service("b", 1);
        let a = plan("web", Some(&changed), &[&i1]);
        assert_eq!(creates(&a), 1);
        assert_eq!(deletes(&a), vec!["web-1".to_string()]);
    }

    #[test]
    fn scale_down_removes_terminal_first() {
        let svc = service("a", 1);
        let i1 = instance("web-1", &svc, true);
        let mut i2 = instance("web-2", &svc, false);
        i2.status.phase = Phase::Succeeded;
        let a = plan("web", Some(&svc), &[&i1, &i2]);
        assert_eq!(deletes(&a), vec!["web-2".to_string()]);
    }

    #[test]
    fn spec_change_keeps_old_until_new_ready() {
        let old_svc = service("a", 2);
        let new_svc = service("b", 2);
        let o1 = instance("web-o1", &old_svc, true);
        let o2 = instance("web-o2", &old_svc, true);
        // Nothing new yet: create two, keep both old.
        let a = plan("web", Some(&new_svc), &[&o1, &o2]);
        assert_eq!(creates(&a), 2);
        assert!(deletes(&a).is_empty());
        // One new ready: one old can go.
        let n1 = instance("web-n1", &new_svc, true);
        let n2 = instance("web-n2", &new_svc, false);
        let a = plan("web", Some(&new_svc), &[&o1, &o2, &n1, &n2]);
        assert_eq!(creates(&a), 0);
        assert_eq!(deletes(&a).len(), 1);
    }

    #[test]
    fn ignores_other_services() {
        let svc = service("a", 1);
        let mut other = instance("api-1", &svc, true);
        other.spec.service = "api".into();
        let a = plan("web", Some(&svc), &[&other]);
        assert_eq!(creates(&a), 1);
        assert!(deletes(&a).is_empty());
    }

    /// A model of the world: applies a plan, then lets some new instances become ready.
    fn arb_world() -> impl Strategy<Value = (u32, Vec<(bool, bool, u8)>, bool)> {
        // replicas, instances (current spec?, ready?, phase selector), service exists?
        (
            0u32..6,
            proptest::collection::vec((any::<bool>(), any::<bool>(), 0u8..8), 0..10),
            prop::bool::weighted(0.9),
        )
    }

    proptest! {
        #[test]
        fn plan_properties((replicas, insts, exists) in arb_world()) {
            let old_svc = service("old", replicas);
            let new_svc = service("new", replicas);
            let mut owned = Vec::new();
            for (n, (current, ready, phase)) in insts.iter().enumerate() {
                let base = if *current { &new_svc } else { &old_svc };
                let mut i = instance(&format!("web-{n}"), base, *ready);
                i.status.phase = match phase {
                    0 => Phase::Failed,
                    1 => Phase::Succeeded,
                    2 => Phase::Pending,
                    3 => Phase::Backoff,
                    _ => Phase::Running,
                };
                if !matches!(i.status.phase, Phase::Running) {
                    i.status.ready = false;
                }
                owned.push(i);
            }
            let refs: Vec<&Instance> = owned.iter().collect();
            let actions = plan("web", exists.then_some(&new_svc), &refs);

            // Nothing deleted twice; only known instances deleted.
            let dels = deletes(&actions);
            let mut uniq = dels.clone();
            uniq.sort();
            uniq.dedup();
            prop_assert_eq!(uniq.len(), dels.len());
            for d in &dels {
                prop_assert!(owned.iter().any(|i| &i.metadata.name == d));
            }
            if !exists {
                prop_assert_eq!(creates(&actions), 0);
                prop_assert_eq!(dels.len(), owned.len());
                return Ok(());
            }
            let remaining: Vec<&Instance> =
                owned.iter().filter(|i| !dels.contains(&i.metadata.name)).collect();
            // Ready instances never fall below min(before, replicas).
            let ready_before = owned.iter().filter(|i| i.is_routable()).count();
            let ready_after = remaining.iter().filter(|i| i.is_routable()).count();
            prop_assert!(ready_after >= ready_before.min(replicas as usize));
            // After creates, exactly `replicas` instances of the current spec.
            let hash = flotilla_spec::spec_hash(&new_svc.spec);
            let current_after = remaining
                .iter()
                .filter(|i| i.spec.spec_hash == hash)
                .count() + creates(&actions);
            prop_assert_eq!(current_after, replicas as usize);
            // Terminal instances of an old spec are always removed.
            for i in &remaining {
                prop_assert!(!(i.status.phase.is_terminal() && i.spec.spec_hash != hash));
            }
        }
    }
}
