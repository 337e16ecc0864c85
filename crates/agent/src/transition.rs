//! An instance's status as a pure function of what happened to it: the worker says what
//! happened (a start, a probe result, an end and the restart policy's decision, …) and this
//! module alone says what the status becomes. Tested without processes or a store.

use std::collections::BTreeMap;

use flotilla_spec::{ExitInfo, InstanceStatus, Phase, Usage};

/// What happened to an instance.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Happened {
    /// A process started; it is `Starting` until its startup probe passes, if it has one, and
    /// ready at once only without startup and readiness probes.
    Started {
        pid: u32,
        startup_probe: bool,
        readiness_probe: bool,
        host: String,
        ports: BTreeMap<String, u16>,
        at: String,
        note: Option<String>,
    },
    StartupPassed,
    Readiness(bool),
    /// A failed startup or liveness probe: the process is being killed.
    Unhealthy,
    /// A stop was asked for (deletion or shutdown).
    Stopping,
    Usage(Usage),
    /// The process ended, or could not start (`exit` is `None`), and the restart policy put
    /// the instance in `phase` (waiting to restart, or terminal).
    Ended {
        exit: Option<ExitInfo>,
        phase: Phase,
        /// The restart count, when this end counts as a restart.
        restarts: Option<u32>,
        message: Option<String>,
    },
    /// The agent shut down and stopped it: it runs again when an agent starts.
    AgentShutDown,
}

/// Applies `happened` to `status`.
pub(crate) fn apply(status: &mut InstanceStatus, happened: &Happened) {
    match happened {
        Happened::Started {
            pid,
            startup_probe,
            readiness_probe,
            host,
            ports,
            at,
            note,
        } => {
            status.phase = if *startup_probe {
                Phase::Starting
            } else {
                Phase::Running
            };
            status.ready = !startup_probe && !readiness_probe;
            status.pid = Some(*pid);
            status.host = Some(host.clone());
            status.ports = ports.clone();
            status.started_at = Some(at.clone());
            status.message = note.clone();
        }
        Happened::StartupPassed => status.phase = Phase::Running,
        Happened::Readiness(ready) => status.ready = *ready,
        Happened::Unhealthy => status.ready = false,
        Happened::Stopping => {
            status.phase = Phase::Stopping;
            status.ready = false;
        }
        Happened::Usage(usage) => status.usage = Some(usage.clone()),
        Happened::Ended {
            exit,
            phase,
            restarts,
            message,
        } => {
            status.phase = *phase;
            status.ready = false;
            status.pid = None;
            status.usage = None;
            if let Some(exit) = exit {
                status.last_exit = Some(exit.clone());
            }
            if let Some(n) = restarts {
                status.restarts = *n;
            }
            status.message = message.clone();
        }
        Happened::AgentShutDown => {
            status.phase = Phase::Pending;
            status.ready = false;
            status.pid = None;
            status.usage = None;
            status.message = Some("agent shut down".to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(startup: bool, readiness: bool) -> Happened {
        Happened::Started {
            pid: 42,
            startup_probe: startup,
            readiness_probe: readiness,
            host: "127.0.0.1".into(),
            ports: BTreeMap::from([("http".to_string(), 20001)]),
            at: "2026-12-01T00:00:00Z".into(),
            note: None,
        }
    }

    #[test]
    fn a_start_is_ready_only_without_probes_and_starting_only_with_a_startup_probe() {
        let mut s = InstanceStatus::default();
        apply(&mut s, &started(false, false));
        assert_eq!((s.phase, s.ready, s.pid), (Phase::Running, true, Some(42)));
        apply(&mut s, &started(false, true));
        assert_eq!((s.phase, s.ready), (Phase::Running, false));
        apply(&mut s, &started(true, true));
        assert_eq!((s.phase, s.ready), (Phase::Starting, false));
        apply(&mut s, &Happened::StartupPassed);
        apply(&mut s, &Happened::Readiness(true));
        assert_eq!((s.phase, s.ready), (Phase::Running, true));
        apply(&mut s, &Happened::Unhealthy);
        assert!(!s.ready);
    }

    #[test]
    fn an_end_clears_the_process_and_keeps_the_last_exit_of_a_failed_start() {
        let mut s = InstanceStatus::default();
        apply(&mut s, &started(false, false));
        apply(
            &mut s,
            &Happened::Usage(Usage {
                cpu_millicores: 5,
                memory_bytes: 1,
                sampled_at: "t".into(),
            }),
        );
        let exit = ExitInfo {
            code: Some(1),
            ..ExitInfo::default()
        };
        apply(
            &mut s,
            &Happened::Ended {
                exit: Some(exit.clone()),
                phase: Phase::Backoff,
                restarts: Some(1),
                message: Some("restarting".into()),
            },
        );
        assert_eq!(
            (s.phase, s.ready, s.pid, s.restarts),
            (Phase::Backoff, false, None, 1)
        );
        assert!(s.usage.is_none());
        assert_eq!(s.last_exit, Some(exit.clone()));
        // A start that fails keeps the last exit of the process before it.
        apply(
            &mut s,
            &Happened::Ended {
                exit: None,
                phase: Phase::Failed,
                restarts: None,
                message: Some("no such program".into()),
            },
        );
        assert_eq!((s.phase, s.restarts), (Phase::Failed, 1));
        assert_eq!(s.last_exit, Some(exit));
        apply(&mut s, &Happened::AgentShutDown);
        assert_eq!(s.phase, Phase::Pending);
        assert_eq!(s.message.as_deref(), Some("agent shut down"));
    }
}
