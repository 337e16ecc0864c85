//! Rollout bookkeeping: revision identity and history, and the pure judgement of how a rollout
//! is going (progress, completion, failure). The controller executes what these decide.

use std::time::{Duration, SystemTime};

use flotilla_spec::{
    Instance, Phase, RolloutPhase, RolloutStatus, Service, ServiceSpec, ServiceStatus, annotations,
};
use serde_json::Value;

use crate::plan::{Desired, available};

/// Consecutive restarts of a new instance after which the rollout counts as crash-looping.
pub const CRASH_RESTARTS: u32 = 3;

/// The hash instances of the service's current revision carry.
pub fn target_hash(service: &Service) -> String {
    flotilla_spec::target_hash(service)
}

pub fn paused(service: &Service) -> bool {
    service
        .metadata
        .annotations
        .get(annotations::PAUSED)
        .is_some_and(|v| v == "true")
}

/// What the plan needs from the service.
pub fn desired(service: &Service) -> Desired {
    let (mut max_surge, mut max_unavailable) = service.spec.deploy.resolve(service.spec.replicas);
    if service.spec.singleton {
        // Recreate: the old copy stops before the new one starts.
        (max_surge, max_unavailable) = (0, max_unavailable.max(1));
    }
    Desired {
        replicas: service.spec.replicas,
        target_hash: target_hash(service),
        max_surge,
        max_unavailable,
        min_ready: service
            .spec
            .deploy
            .min_ready(service.spec.probes.readiness.is_some()),
        paused: paused(service),
    }
}

/// Field paths (two levels deep) whose values differ between two templates; `replicas` and
/// `deploy` are not part of a revision and are ignored.
pub fn changes(old: &ServiceSpec, new: &ServiceSpec) -> Vec<String> {
    let norm = |s: &ServiceSpec| {
        let mut s = s.clone();
        s.replicas = 1;
        s.deploy = Default::default();
        serde_json::to_value(s).unwrap_or(Value::Null)
    };
    let (a, b) = (norm(old), norm(new));
    let mut out = Vec::new();
    diff(&a, &b, "", 0, &mut out);
    out
}

fn diff(a: &Value, b: &Value, path: &str, depth: usize, out: &mut Vec<String>) {
    if a == b {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) if depth < 2 => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &p,
                    depth + 1,
                    out,
                );
            }
        }
        _ => out.push(if path.is_empty() {
            "spec".into()
        } else {
            path.into()
        }),
    }
}

/// Why a rollout failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
}

/// The judgement of one reconcile pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub status: ServiceStatus,
    /// The rollout just failed (was Progressing, now is not).
    pub failed: Option<Failure>,
    /// The rollout just completed.
    pub completed: bool,
}

fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Computes the service's status after this pass: counts, progress, completion and failure.
/// `instances` are the service's own; `revision` the number of its current revision.
pub fn judge(
    service: &Service,
    revision: u64,
    instances: &[&Instance],
    now: SystemTime,
) -> Judgement {
    let d = desired(service);
    let old = &service.status;
    let live: Vec<&Instance> = instances
        .iter()
        .copied()
        .filter(|i| i.metadata.deletion_timestamp.is_none())
        .collect();
    let new: Vec<&Instance> = live
        .iter()
        .copied()
        .filter(|i| i.spec.spec_hash == d.target_hash)
        .collect();
    let old_live = live.len() - new.len();
    let updated = new.len() as u32;
    let available_new = new
        .iter()
        .filter(|i| available(i, d.min_ready, now))
        .count() as u32;

    let mut status = old.clone();
    status.observed_generation = service.metadata.generation;
    status.replicas = live
        .iter()
        .filter(|i| !i.status.phase.is_terminal())
        .count() as u32;
    status.ready_replicas = live.iter().filter(|i| i.is_routable()).count() as u32;
    status.spec_hash = d.target_hash.clone();
    status.updated_replicas = updated;
    status.available_replicas = available_new;

    let now_s = rfc3339(now);
    let mut rollout = old.rollout.clone().unwrap_or(RolloutStatus {
        phase: RolloutPhase::Progressing,
        message: String::new(),
        from_revision: 0,
        started_at: now_s.clone(),
        last_progress_at: now_s.clone(),
        rolled_back_from: None,
        rolled_back_to: None,
        cause: String::new(),
    });
    let mut failed = None;
    let mut completed = false;

    if status.revision != revision {
        // A new revision: a new rollout starts.
        let cause = service
            .metadata
            .annotations
            .get(annotations::CHANGE_CAUSE)
            .cloned()
            .unwrap_or_default();
        rollout = RolloutStatus {
            phase: RolloutPhase::Progressing,
            message: format!("rolling out revision {revision}"),
            from_revision: status.revision,
            started_at: now_s.clone(),
            last_progress_at: now_s.clone(),
            rolled_back_from: cause
                .starts_with("automatic rollback")
                .then_some(status.revision)
                .filter(|r| *r > 0),
            // The rollback restored the last good revision's spec.
            rolled_back_to: cause
                .starts_with("automatic rollback")
                .then_some(status.last_good_revision)
                .filter(|r| *r > 0),
            cause,
        };
        status.revision = revision;
    }

    let done = updated == d.replicas && available_new == d.replicas && old_live == 0;
    match rollout.phase {
        _ if d.paused => {
            rollout.phase = RolloutPhase::Paused;
            rollout.message = "paused: nothing is started or stopped until `rollout resume`".into();
        }
        RolloutPhase::Paused => {
            // Resumed: the deadline starts again.
            rollout.phase = RolloutPhase::Progressing;
            rollout.message = format!("rolling out revision {revision}");
            rollout.last_progress_at = now_s.clone();
        }
        _ => {}
    }
    if rollout.phase == RolloutPhase::Progressing || (rollout.phase == RolloutPhase::Failed && done)
    {
        if available_new > old.available_replicas || status.revision != old.revision {
            rollout.last_progress_at = now_s.clone();
        }
        if done {
            completed = rollout.phase != RolloutPhase::Complete;
            status.last_good_revision = revision;
            match rollout.rolled_back_from {
                Some(bad) => {
                    rollout.phase = RolloutPhase::RolledBack;
                    let why = rollout
                        .cause
                        .split_once(": ")
                        .map(|(_, why)| format!(": {why}"))
                        .unwrap_or_default();
                    rollout.message = match rollout.rolled_back_to {
                        Some(good) if good != revision => format!(
                            "rolled back from revision {bad} to the spec of revision {good}, recorded as revision {revision}{why}"
                        ),
                        _ => format!("rolled back from revision {bad} to revision {revision}{why}"),
                    };
                }
                None => {
                    rollout.phase = RolloutPhase::Complete;
                    rollout.message = format!(
                        "revision {revision}: {} of {} instances updated and available",
                        available_new, d.replicas
                    );
                }
            }
        } else if rollout.phase == RolloutPhase::Progressing {
            rollout.message = format!(
                "revision {revision}: {updated} of {} instances updated, {available_new} available, {old_live} old remaining",
                d.replicas
            );
            if let Some(reason) = crash_loop(&new) {
                failed = Some(Failure { reason });
            } else {
                let last = parse_time(&rollout.last_progress_at).unwrap_or(now);
                let stalled = now.duration_since(last).unwrap_or(Duration::ZERO);
                if stalled > service.spec.deploy.progress_deadline.0 {
                    failed = Some(Failure {
                        reason: format!(
                            "no instance of revision {revision} became available for {} (progress deadline)",
                            flotilla_spec::Dur(service.spec.deploy.progress_deadline.0)
                        ),
                    });
                }
            }
            if let Some(f) = &failed {
                rollout.phase = RolloutPhase::Failed;
                rollout.message = format!("revision {revision} failed: {}", f.reason);
            }
        }
    }
    status.rollout = Some(rollout);
    Judgement {
        status,
        failed,
        completed,
    }
}

/// A new instance that keeps crashing, or could not start at all.
fn crash_loop(new: &[&Instance]) -> Option<String> {
    new.iter().find_map(|i| {
        let s = &i.status;
        let crashing = s.phase == Phase::CrashLoopBackOff
            || s.phase == Phase::Failed
            || (s.restarts >= CRASH_RESTARTS && !s.ready);
        crashing.then(|| {
            let exit = s
                .last_exit
                .as_ref()
                .map(|e| {
                    format!(
                        " (last exit: {}{})",
                        e.reason,
                        e.code.map(|c| format!(" code {c}")).unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            format!(
                "instance {} is {} after {} restarts{exit}",
                i.metadata.name,
                s.phase.as_str(),
                s.restarts
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> ServiceSpec {
        serde_json::from_str(json).expect("spec")
    }

    #[test]
    fn changes_name_the_fields() {
        let a = spec(r#"{"command":"srv","args":["a"],"env":{"A":"1","B":"2"},"replicas":2}"#);
        let b = spec(r#"{"command":"srv","args":["b"],"env":{"A":"1","B":"3"},"replicas":5}"#);
        assert_eq!(
            changes(&a, &b),
            vec!["args".to_string(), "env.B".to_string()]
        );
        assert!(changes(&a, &a).is_empty());
    }
}
