//! The service controller's decision: a pure function from desired and observed state to actions.
//!
//! No IO happens here; `controller.rs` executes the actions. Start-up is the same path as any
//! change: reconcile against whatever instances exist, possibly none. A rolling update is the
//! same function too: instances whose `spec_hash` differs from the target are "old".

use std::time::{Duration, SystemTime};

use flotilla_spec::{Instance, Phase};

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
    /// Runs an older revision and enough instances of the new one are available.
    Replaced,
    /// Its node is being drained and enough replacements are available.
    Drained,
}

impl DeleteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeleteReason::ServiceGone => "service deleted",
            DeleteReason::ScaleDown => "scaled down",
            DeleteReason::Replaced => "replaced by a newer revision",
            DeleteReason::Drained => "its node is being drained",
        }
    }
}

/// What the service asks for, resolved to numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub replicas: u32,
    /// `template_hash` of the current revision.
    pub target_hash: String,
    /// Instances allowed above `replicas` while rolling.
    pub max_surge: u32,
    /// Instances allowed below `replicas` (available) while rolling.
    pub max_unavailable: u32,
    /// How long an instance must have been ready to count as available.
    pub min_ready: Duration,
    /// Paused: nothing is started or stopped.
    pub paused: bool,
}

fn deleting(i: &Instance) -> bool {
    i.metadata.deletion_timestamp.is_some()
}

/// Routed by the gateway and ready for at least `min_ready`.
pub fn available(i: &Instance, min_ready: Duration, now: SystemTime) -> bool {
    if !i.is_routable() {
        return false;
    }
    if min_ready.is_zero() {
        return true;
    }
    i.status
        .ready_since
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .and_then(|since| now.duration_since(since).ok())
        .is_some_and(|d| d >= min_ready)
}

/// Still has (or may get) a process: counts toward `replicas + max_surge`.
fn running(i: &Instance) -> bool {
    !i.status.phase.is_terminal()
}

/// Computes the actions for one service. `instances` are those owned by it (by `spec.service`);
/// `desired` is `None` once the service has been deleted.
///
/// Guarantees (property-tested over whole simulated rollouts):
/// - instances running (including those being stopped) never exceed
///   `replicas + max_surge`, unless they already did;
/// - available instances never drop below `replicas - max_unavailable`, unless they already
///   were below (then they never drop further);
/// - nothing is deleted twice, only owned instances are touched;
/// - once every new instance becomes available, the service converges to exactly `replicas`
///   instances of the target revision.
///
/// Terminal instances (restart policy `never`/`on-failure`) of the target revision count toward
/// `replicas`: they did what their policy asked and are not replaced until the revision changes.
pub fn plan(
    name: &str,
    desired: Option<&Desired>,
    instances: &[&Instance],
    now: SystemTime,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let owned: Vec<&Instance> = instances
        .iter()
        .copied()
        .filter(|i| i.spec.service == name)
        .collect();
    let live: Vec<&Instance> = owned.iter().copied().filter(|i| !deleting(i)).collect();

    let Some(d) = desired else {
        for i in live {
            actions.push(delete(i, DeleteReason::ServiceGone));
        }
        return actions;
    };
    if d.paused {
        return actions;
    }
    let replicas = d.replicas as usize;
    let max_total = replicas + d.max_surge as usize;
    let min_available = replicas.saturating_sub(d.max_unavailable as usize);
    let is_available = |i: &Instance| available(i, d.min_ready, now);

    let (mut new, old): (Vec<&Instance>, Vec<&Instance>) = live
        .iter()
        .copied()
        .partition(|i| i.spec.spec_hash == d.target_hash);
    let mut running_total = owned.iter().filter(|i| running(i)).count();
    let mut available_total = live.iter().filter(|i| is_available(i)).count();

    // Too many instances of the target revision: remove the least useful.
    if new.len() > replicas {
        new.sort_by(|a, b| usefulness(a, b, d.min_ready, now));
        for i in &new[..new.len() - replicas] {
            actions.push(delete(i, DeleteReason::ScaleDown));
            if running(i) {
                running_total -= 1;
            }
            if is_available(i) {
                available_total -= 1;
            }
        }
        new.drain(..new.len() - replicas);
    }

    // Old instances that are not available cost nothing to remove: do that first, it frees
    // surge room and never lowers availability.
    let (old_available, old_unavailable): (Vec<&Instance>, Vec<&Instance>) =
        old.into_iter().partition(|i| is_available(i));
    for i in &old_unavailable {
        actions.push(delete(i, DeleteReason::Replaced));
        if running(i) {
            running_total -= 1;
        }
    }

    // Start new instances within the surge budget.
    let wanted = replicas.saturating_sub(new.len());
    let room = max_total.saturating_sub(running_total);
    for _ in 0..wanted.min(room) {
        actions.push(Action::Create {
            service: name.to_string(),
            spec_hash: d.target_hash.clone(),
        });
    }

    // Stop available old instances only as far as availability allows: the new ones must be
    // available first (with max_unavailable = 0, one for one).
    let mut old_available = old_available;
    old_available.sort_by(|a, b| usefulness(a, b, d.min_ready, now));
    let removable = available_total.saturating_sub(min_available);
    for i in old_available.iter().take(removable) {
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
fn usefulness(
    a: &Instance,
    b: &Instance,
    min_ready: Duration,
    now: SystemTime,
) -> std::cmp::Ordering {
    let score = |i: &Instance| {
        (
            !i.status.phase.is_terminal(),
            available(i, min_ready, now),
            i.is_routable(),
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

    fn template() -> ServiceSpec {
        serde_json::from_str(r#"{"command":"srv"}"#).expect("spec")
    }

    fn desired(replicas: u32, hash: &str, surge: u32, unavailable: u32) -> Desired {
        Desired {
            replicas,
            target_hash: hash.to_string(),
            max_surge: surge,
            max_unavailable: unavailable,
            min_ready: Duration::ZERO,
            paused: false,
        }
    }

    fn instance(name: &str, hash: &str, ready: bool) -> Instance {
        Instance {
            metadata: ObjectMeta::named(name),
            spec: InstanceSpec {
                service: "web".into(),
                node: "local".into(),
                spec_hash: hash.into(),
                template: template(),
            },
            status: InstanceStatus {
                phase: if ready {
                    Phase::Running
                } else {
                    Phase::Starting
                },
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

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[test]
    fn start_up_creates_replicas() {
        let a = plan("web", Some(&desired(3, "h1", 1, 0)), &[], now());
        assert_eq!(
            creates(&a),
            3,
            "creating from nothing is bounded by replicas + surge"
        );
        assert!(deletes(&a).is_empty());
    }

    #[test]
    fn steady_state_does_nothing() {
        let i1 = instance("web-1", "h1", true);
        let i2 = instance("web-2", "h1", false);
        assert!(plan("web", Some(&desired(2, "h1", 1, 0)), &[&i1, &i2], now()).is_empty());
    }

    #[test]
    fn scale_down_removes_unready_first() {
        let i1 = instance("web-1", "h1", true);
        let i2 = instance("web-2", "h1", false);
        let a = plan("web", Some(&desired(1, "h1", 1, 0)), &[&i1, &i2], now());
        assert_eq!(deletes(&a), vec!["web-2".to_string()]);
    }

    #[test]
    fn deleted_service_deletes_all_once() {
        let i1 = instance("web-1", "h1", true);
        let mut i2 = instance("web-2", "h1", true);
        i2.metadata.deletion_timestamp = Some("x".into());
        let a = plan("web", None, &[&i1, &i2], now());
        assert_eq!(deletes(&a), vec!["web-1".to_string()]);
    }

    #[test]
    fn terminal_instance_is_kept_until_the_revision_changes() {
        let mut i1 = instance("web-1", "h1", false);
        i1.status.phase = Phase::Failed;
        assert!(plan("web", Some(&desired(1, "h1", 1, 0)), &[&i1], now()).is_empty());
        let a = plan("web", Some(&desired(1, "h2", 1, 0)), &[&i1], now());
        assert_eq!(creates(&a), 1);
        assert_eq!(deletes(&a), vec!["web-1".to_string()]);
    }

    #[test]
    fn rolling_update_surges_then_replaces_one_for_one() {
        let o: Vec<Instance> = (0..3)
            .map(|n| instance(&format!("web-o{n}"), "h1", true))
            .collect();
        let refs: Vec<&Instance> = o.iter().collect();
        // Surge 1, unavailable 0: one new instance, nothing old stops yet.
        let a = plan("web", Some(&desired(3, "h2", 1, 0)), &refs, now());
        assert_eq!(creates(&a), 1);
        assert!(deletes(&a).is_empty());
        // The new one is starting: still nothing old may stop, nothing more may start.
        let n0 = instance("web-n0", "h2", false);
        let mut with_new = refs.clone();
        with_new.push(&n0);
        assert!(plan("web", Some(&desired(3, "h2", 1, 0)), &with_new, now()).is_empty());
        // It became ready: exactly one old instance goes.
        let n0 = instance("web-n0", "h2", true);
        let mut with_new = refs.clone();
        with_new.push(&n0);
        let a = plan("web", Some(&desired(3, "h2", 1, 0)), &with_new, now());
        assert_eq!(deletes(&a).len(), 1);
    }

    #[test]
    fn a_new_revision_that_never_gets_ready_never_stops_the_old_one() {
        let o1 = instance("web-o1", "h1", true);
        let o2 = instance("web-o2", "h1", true);
        let mut n1 = instance("web-n1", "h2", false);
        n1.status.phase = Phase::CrashLoopBackOff;
        let a = plan(
            "web",
            Some(&desired(2, "h2", 1, 0)),
            &[&o1, &o2, &n1],
            now(),
        );
        assert!(deletes(&a).is_empty(), "{a:?}");
        assert_eq!(
            creates(&a),
            0,
            "the surge is used up by the crash-looping instance"
        );
    }

    #[test]
    fn min_ready_delays_availability() {
        let d = Desired {
            min_ready: Duration::from_secs(5),
            ..desired(1, "h2", 1, 0)
        };
        let o1 = instance("web-o1", "h1", true);
        let mut n1 = instance("web-n1", "h2", true);
        n1.status.ready_since = Some(humantime::format_rfc3339(now()).to_string());
        // Old instances count as available regardless of their own ready_since? No: the same
        // rule applies, so give the old one a long history.
        let mut o1 = o1;
        o1.status.ready_since = Some("2020-01-01T00:00:00Z".into());
        let a = plan("web", Some(&d), &[&o1, &n1], now());
        assert!(
            deletes(&a).is_empty(),
            "new instance not ready long enough: {a:?}"
        );
        let later = now() + Duration::from_secs(6);
        let a = plan("web", Some(&d), &[&o1, &n1], later);
        assert_eq!(deletes(&a), vec!["web-o1".to_string()]);
    }

    #[test]
    fn paused_does_nothing() {
        let o1 = instance("web-o1", "h1", true);
        let d = Desired {
            paused: true,
            ..desired(1, "h2", 1, 0)
        };
        assert!(plan("web", Some(&d), &[&o1], now()).is_empty());
    }

    #[test]
    fn ignores_other_services() {
        let mut other = instance("api-1", "h1", true);
        other.spec.service = "api".into();
        let a = plan("web", Some(&desired(1, "h1", 1, 0)), &[&other], now());
        assert_eq!(creates(&a), 1);
        assert!(deletes(&a).is_empty());
    }

    /// A simulated world: each step applies the plan, then the world moves (some new instances
    /// become ready, some stopping ones finish). The invariants are checked after every plan.
    fn simulate(
        replicas: u32,
        surge: u32,
        unavailable: u32,
        start: usize,
        moves: &[(u8, u8)],
        new_ever_ready: bool,
    ) -> Result<(), TestCaseError> {
        let d = desired(replicas, "new", surge, unavailable);
        let mut world: Vec<Instance> = (0..start)
            .map(|n| instance(&format!("web-old{n}"), "old", true))
            .collect();
        let mut next = 0usize;
        let max_total = (replicas + surge) as usize;
        let min_avail = (replicas as usize).saturating_sub(unavailable as usize);
        for (step, (ready_pick, finish_pick)) in moves.iter().enumerate() {
            let refs: Vec<&Instance> = world.iter().collect();
            let running_before = world.iter().filter(|i| running(i)).count();
            let avail_before = world
                .iter()
                .filter(|i| available(i, Duration::ZERO, now()))
                .count();
            let actions = plan("web", Some(&d), &refs, now());
            let dels = deletes(&actions);
            let mut uniq = dels.clone();
            uniq.sort();
            uniq.dedup();
            prop_assert_eq!(uniq.len(), dels.len(), "deleted twice at step {}", step);
            for a in &actions {
                match a {
                    Action::Delete { instance, .. } => {
                        let i = world.iter_mut().find(|i| &i.metadata.name == instance);
                        prop_assert!(i.is_some());
                        if let Some(i) = i {
                            prop_assert!(
                                i.metadata.deletion_timestamp.is_none(),
                                "deleting a deleting instance"
                            );
                            i.metadata.deletion_timestamp = Some("now".into());
                        }
                    }
                    Action::Create { spec_hash, .. } => {
                        next += 1;
                        world.push(instance(&format!("web-new{next}"), spec_hash, false));
                    }
                }
            }
            let running_after = world.iter().filter(|i| running(i)).count();
            let avail_after = world
                .iter()
                .filter(|i| available(i, Duration::ZERO, now()))
                .count();
            prop_assert!(
                running_after <= max_total.max(running_before),
                "step {}: {} running > {} (was {})",
                step,
                running_after,
                max_total,
                running_before
            );
            prop_assert!(
                avail_after >= min_avail.min(avail_before),
                "step {}: {} available < {} (was {})",
                step,
                avail_after,
                min_avail,
                avail_before
            );
            // The world moves.
            if new_ever_ready {
                let pending: Vec<usize> = world
                    .iter()
                    .enumerate()
                    .filter(|(_, i)| !i.status.ready && i.metadata.deletion_timestamp.is_none())
                    .map(|(n, _)| n)
                    .collect();
                if !pending.is_empty() {
                    let n = pending[*ready_pick as usize % pending.len()];
                    world[n].status.ready = true;
                    world[n].status.phase = Phase::Running;
                }
            }
            let stopping: Vec<usize> = world
                .iter()
                .enumerate()
                .filter(|(_, i)| i.metadata.deletion_timestamp.is_some())
                .map(|(n, _)| n)
                .collect();
            if !stopping.is_empty() && finish_pick % 2 == 0 {
                world.remove(stopping[*finish_pick as usize % stopping.len()]);
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn rollouts_keep_their_bounds(
            replicas in 1u32..8,
            surge in 0u32..4,
            unavailable in 0u32..3,
            start in 0usize..9,
            moves in proptest::collection::vec((any::<u8>(), any::<u8>()), 1..60),
            ever_ready in prop::bool::weighted(0.8),
        ) {
            let (surge, unavailable) = if surge == 0 && unavailable == 0 { (1, 0) } else { (surge, unavailable) };
            simulate(replicas, surge, unavailable, start, &moves, ever_ready)?;
        }

        /// Given enough steps where everything becomes ready and stops promptly, the rollout
        /// finishes with exactly `replicas` instances of the new revision.
        #[test]
        fn rollouts_converge(replicas in 1u32..8, surge in 0u32..4, unavailable in 0u32..3, start in 0usize..9) {
            let (surge, unavailable) = if surge == 0 && unavailable == 0 { (1, 0) } else { (surge, unavailable) };
            let d = desired(replicas, "new", surge, unavailable);
            let mut world: Vec<Instance> = (0..start).map(|n| instance(&format!("web-old{n}"), "old", true)).collect();
            let mut next = 0;
            for _ in 0..200 {
                let refs: Vec<&Instance> = world.iter().collect();
                let actions = plan("web", Some(&d), &refs, now());
                if actions.is_empty() { break; }
                for a in actions {
                    match a {
                        Action::Delete { instance, .. } => world.retain(|i| i.metadata.name != instance),
                        Action::Create { spec_hash, .. } => { next += 1; world.push(instance(&format!("web-new{next}"), &spec_hash, true)); }
                    }
                }
            }
            prop_assert_eq!(world.len(), replicas as usize);
            prop_assert!(world.iter().all(|i| i.spec.spec_hash == "new"));
        }
    }
}
