//! One task per instance: start the process, probe it, restart it by policy, stop it.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_spec::{
    EventType, ExitInfo, Instance, InstanceStatus, Phase, ServiceSpec, Usage, now_rfc3339,
};
use flotilla_store::NodeApi;
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::{self, Decision};
use crate::cgroup::{self, CgroupManager, Limits};
use crate::driver::{Driver, Output, Running};
use crate::logs;
use crate::metrics::{self, Metrics};
use crate::ports::PortAllocator;
use crate::probe::{self, ProbeContext, ProbeEvent};
use crate::process::{self, LaunchSpec};
use crate::shim::{self, Found};
use crate::transition::{self, Happened};
use crate::{AgentConfig, AgentError};

/// How long leftover processes get to die after SIGKILL before we give up (and log).
pub(crate) const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest pause between attempts to delete a stopped instance from the store.
const DELETE_RETRY_FIRST: Duration = Duration::from_millis(100);
const DELETE_RETRY_MAX: Duration = Duration::from_secs(5);
/// Poll interval while waiting for a stopping process group to exit.
const STOP_POLL: Duration = Duration::from_millis(25);

/// State shared by the agent and its workers.
pub(crate) struct Shared {
    pub config: AgentConfig,
    /// The agent's only way to the control plane.
    pub api: Arc<dyn NodeApi>,
    /// How workloads are run.
    pub driver: Arc<dyn Driver>,
    pub cgroups: Option<Arc<dyn CgroupManager>>,
    /// Why cgroups are not used, when they are not.
    pub cgroup_note: Option<String>,
    pub ports: PortAllocator,
    pub metrics: Metrics,
    /// When the last lease renewal that succeeded was sent (on this machine's clock).
    pub renewed: std::sync::Mutex<Option<std::time::Instant>>,
    /// What an earlier agent left in `<data_dir>/run`, by instance, until a worker takes it.
    pub found: Mutex<std::collections::HashMap<String, Found>>,
    /// When this agent started (for the re-adoption figures in its logs).
    pub started: Instant,
    /// At exit, leave the workloads running (see [`crate::Agent::detach_on_exit`]).
    pub detach: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// What an earlier agent left of instance `name`.
    pub fn take_found(&self, name: &str) -> Option<Found> {
        flotilla_store::lock(&self.found).remove(name)
    }

    /// Singletons must be stopped: the lease has a third of its time left (on this node's
    /// own clock) without a renewal, so the control plane may soon replace them elsewhere.
    pub fn fenced(&self) -> bool {
        let lease = self.config.lease_duration;
        flotilla_store::lock(&self.renewed).is_some_and(|t| t.elapsed() >= lease * 2 / 3)
    }
}

/// Longest wait for the drain hook's confirmation (unrouted, no request in flight).
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the agent wants from a worker. Later variants win over earlier ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Desired {
    Run,
    /// `deletion_timestamp` set: stop, clean up, delete the instance from the store.
    Delete,
    /// The agent shuts down: stop, clean up, set the status back to Pending.
    Shutdown,
    /// The agent exits and leaves the workload running for the next agent to re-adopt: stop
    /// supervising, touch neither the process nor the store.
    Detach,
    /// Vanished from the store (or rebound elsewhere): stop and clean up, no store writes.
    Gone,
}

/// What a worker's processes hold right now, kept outside the worker task (the agent has a
/// handle) so that the agent can clean up after a worker that panicked or was aborted.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// Process group of the running process.
    pub pgid: Option<u32>,
    pub ports: Vec<u16>,
    pub service: Option<String>,
}

enum EvKind {
    Startup,
    Other,
}

/// What taking over an earlier agent's process left the worker to do.
enum Resumed {
    /// Go on with the main loop: start the process (again).
    Continue,
    End(Desired),
}

/// RFC 3339 of a time in milliseconds since the epoch.
fn unix_ms_rfc3339(ms: u64) -> String {
    // Before the year 10000 (a record from outside says when; humantime formats 4-digit years).
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.min(253_402_300_799_000));
    humantime::format_rfc3339_millis(t).to_string()
}

/// How a process run ended.
enum RunEnd {
    Exited(ExitInfo, Duration),
    /// The process could not be started (preparation or spawn failed); the message says why.
    StartFailed(String),
    Stop(Desired),
}

#[cfg(test)]
pub(crate) static PANIC_AFTER_START: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Test hook: true (once) when the worker of `name` is to panic right after starting.
#[cfg(test)]
fn take_panic(name: &str) -> bool {
    let mut v = flotilla_store::lock(&PANIC_AFTER_START);
    let before = v.len();
    v.retain(|n| n != name);
    v.len() != before
}

/// Classifies an exit (pure). `killed_for`: the reason when the agent killed the process
/// because of a failed probe.
pub(crate) fn classify(
    status: Option<ExitStatus>,
    oom: bool,
    killed_for: Option<&str>,
) -> ExitInfo {
    let code = status.and_then(|s| s.code());
    let signal = status.and_then(|s| s.signal());
    let reason = if let Some(r) = killed_for {
        r
    } else if oom {
        "OOMKilled"
    } else if signal.is_some() {
        "Signaled"
    } else if code == Some(0) {
        "Completed"
    } else {
        "Error"
    };
    ExitInfo {
        code,
        signal,
        oom_killed: oom,
        reason: reason.to_string(),
        at: now_rfc3339(),
    }
}

/// CPU use in millicores from a CPU-time delta over a wall-time delta (pure).
pub(crate) fn millicores(cpu_ns: u64, wall: Duration) -> u64 {
    let wall_ns = wall.as_nanos().max(1);
    u64::try_from(u128::from(cpu_ns) * 1000 / wall_ns).unwrap_or(u64::MAX)
}

/// The process environment and expanded args (pure).
pub(crate) fn build_env(
    instance: &str,
    service: &str,
    node: &str,
    host: &str,
    spec: &ServiceSpec,
    ports: &BTreeMap<String, u16>,
) -> Result<(BTreeMap<String, String>, Vec<String>), AgentError> {
    let platform =
        flotilla_spec::platform::platform_env(instance, service, node, host, &spec.ports, ports);
    let mut vars = spec.env.clone();
    vars.extend(platform.clone());
    let mut env = BTreeMap::new();
    for (k, v) in &spec.env {
        let x = flotilla_spec::expand(v, &vars).map_err(|source| AgentError::Expand {
            instance: instance.to_string(),
            what: format!("env {k}"),
            source,
        })?;
        env.insert(k.clone(), x);
    }
    env.extend(platform);
    let args = spec
        .args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            flotilla_spec::expand(a, &env).map_err(|source| AgentError::Expand {
                instance: instance.to_string(),
                what: format!("args[{i}]"),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((env, args))
}

/// Runs the worker of one instance until it is told to stop, then cleans up. Returns what
/// ended it, and whether the instance was deleted from the store.
pub(crate) async fn run(
    shared: Arc<Shared>,
    inst: Instance,
    desired: watch::Receiver<Desired>,
    held: Arc<Mutex<Held>>,
) -> (Desired, bool) {
    let mut w = Worker::new(shared, &inst, desired, held);
    let end = w.main().await;
    let deleted = w.finish(end).await;
    (end, deleted)
}

struct Prepared {
    env: BTreeMap<String, String>,
    args: Vec<String>,
    uid: Option<Uid>,
    gid: Option<Gid>,
}

struct Worker {
    shared: Arc<Shared>,
    name: String,
    /// The instance object's uid.
    uid: String,
    /// The status the instance had when this worker started (what a re-adopted process
    /// resumes from).
    initial: InstanceStatus,
    service: String,
    spec: ServiceSpec,
    desired: watch::Receiver<Desired>,
    ports: BTreeMap<String, u16>,
    /// The instance's cgroup, once created.
    cg: Option<Arc<dyn CgroupManager>>,
    /// Shown in status: e.g. running without limits.
    note: Option<String>,
    restarts: u32,
    consecutive: u32,
    last_usage: Option<(Instant, u64)>,
    /// When `status.usage` was last written during this run, and what was written.
    usage_written: Option<(Instant, u64, u64)>,
    /// Phase in which the last `FailedToStart` event was recorded (events are recorded on
    /// a change of phase only, not on every retry); reset by a successful start.
    start_failure_phase: Option<Phase>,
    held: Arc<Mutex<Held>>,
}

impl Worker {
    fn new(
        shared: Arc<Shared>,
        inst: &Instance,
        desired: watch::Receiver<Desired>,
        held: Arc<Mutex<Held>>,
    ) -> Self {
        if let Ok(mut h) = held.lock() {
            h.service = Some(inst.spec.service.clone());
        }
        Self {
            name: inst.metadata.name.clone(),
            uid: inst.metadata.uid.clone(),
            initial: inst.status.clone(),
            service: inst.spec.service.clone(),
            spec: inst.spec.template.clone(),
            desired,
            ports: BTreeMap::new(),
            cg: None,
            note: None,
            restarts: inst.status.restarts,
            consecutive: 0,
            last_usage: None,
            usage_written: None,
            start_failure_phase: None,
            held,
            shared,
        }
    }

    fn hold(&self, f: impl FnOnce(&mut Held)) {
        f(&mut flotilla_store::lock(&self.held));
    }

    fn desired_now(&self) -> Desired {
        *self.desired.borrow()
    }

    /// Waits until the agent wants something other than `Run`.
    async fn until_stop(desired: &mut watch::Receiver<Desired>) -> Desired {
        loop {
            let d = *desired.borrow_and_update();
            if d != Desired::Run {
                return d;
            }
            if desired.changed().await.is_err() {
                return Desired::Shutdown;
            }
        }
    }

    async fn main(&mut self) -> Desired {
        let mut prepared: Option<Prepared> = None;
        match self.shared.take_found(&self.name) {
            Some(found) if found.uid().is_none_or(|u| u == self.uid) => {
                match self.resume(found, &mut prepared).await {
                    Resumed::End(d) => return d,
                    Resumed::Continue => {}
                }
            }
            Some(stale) => {
                // An earlier instance of the same name (replaced meanwhile): not this one's.
                if let Some(pid) = stale.live_pid() {
                    tracing::info!(instance = %self.name, pid, "stopping the process of a replaced instance of this name");
                    self.kill_leftovers(pid).await;
                }
                shim::forget_run(&self.run_dir());
            }
            None => {}
        }
        loop {
            // Before every start and restart: a stop requested meanwhile (deletion, shutdown)
            // wins over starting again.
            let d = self.desired_now();
            if d != Desired::Run {
                return d;
            }
            if prepared.is_none() {
                match self.prepare() {
                    Ok(p) => prepared = Some(p),
                    Err(e) => {
                        tracing::warn!(instance = %self.name, error = %e, "cannot prepare instance");
                        if let Some(d) = self.after_start_failure(e.to_string()).await {
                            return d;
                        }
                        continue;
                    }
                }
            }
            let Some(p) = prepared.as_ref() else { continue };
            let next = match self.run_once(p).await {
                RunEnd::Stop(d) => return d,
                RunEnd::Exited(exit, ran_for) => self.after_exit(exit, ran_for, false).await,
                RunEnd::StartFailed(msg) => self.after_start_failure(msg).await,
            };
            if let Some(d) = next {
                return d;
            }
        }
    }

    /// A failed start (preparation or spawn) is a failed attempt like a crash: under `always`
    /// and `on-failure` it is retried with backoff and counted in `restarts`; under `never`
    /// the instance ends `Failed`. Returns `Some` when the worker should end.
    async fn after_start_failure(&mut self, msg: String) -> Option<Desired> {
        self.consecutive = backoff::next_failure_count(self.consecutive, Duration::ZERO);
        let rs = &self.spec.restart;
        let decision = backoff::decide(
            rs.policy,
            false,
            self.consecutive,
            rs.backoff_initial.0,
            rs.backoff_max.0,
        );
        match decision {
            Decision::Stop { phase } => {
                self.happened(Happened::Ended {
                    exit: None,
                    phase,
                    restarts: None,
                    message: Some(msg.clone()),
                })
                .await;
                self.event(EventType::Warning, "FailedToStart", &msg).await;
                Some(Self::until_stop(&mut self.desired).await)
            }
            Decision::Restart { delay, phase } => {
                let restarts = self.count_restart();
                let message = if delay.is_zero() {
                    format!("{msg}; retrying")
                } else {
                    format!(
                        "{msg}; retrying in {} after {} consecutive failures",
                        humantime::format_duration(delay),
                        self.consecutive
                    )
                };
                self.happened(Happened::Ended {
                    exit: None,
                    phase,
                    restarts: Some(restarts),
                    message: Some(message.clone()),
                })
                .await;
                if self.start_failure_phase != Some(phase) {
                    self.start_failure_phase = Some(phase);
                    self.event(EventType::Warning, "FailedToStart", &message)
                        .await;
                }
                if delay.is_zero() {
                    return None;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => None,
                    d = Self::until_stop(&mut self.desired) => Some(d),
                }
            }
        }
    }

    /// Allocates ports (keeping those of an earlier attempt), resolves the identity, builds
    /// the environment, opens the log, creates the cgroup. May be retried after a failure.
    fn prepare(&mut self) -> Result<Prepared, AgentError> {
        self.note = None;
        for name in &self.spec.ports {
            if self.ports.contains_key(name) {
                continue;
            }
            let port = self.shared.ports.allocate().map_err(|e| AgentError::Port {
                instance: self.name.clone(),
                port: name.clone(),
                message: e.to_string(),
            })?;
            self.ports.insert(name.clone(), port);
            self.hold(|h| h.ports.push(port));
        }
        let (env, args) = build_env(
            &self.name,
            &self.service,
            &self.shared.config.node,
            &self.shared.config.host,
            &self.spec,
            &self.ports,
        )?;
        let ident = |message: String| AgentError::Identity {
            instance: self.name.clone(),
            message,
        };
        let (mut uid, mut gid) = (None, None);
        if let Some(u) = &self.spec.user {
            let (u, g) = process::resolve_user(u).map_err(ident)?;
            uid = Some(u);
            gid = Some(g);
        }
        if let Some(g) = &self.spec.group {
            gid = Some(process::resolve_group(g).map_err(ident)?);
        }
        let limits = Limits {
            memory_bytes: self.spec.resources.memory.map(|b| b.0),
            cpu_millicores: self.spec.resources.cpu.map(|c| c.0),
            pids: self.spec.resources.pids,
        };
        let wants_limits = limits != Limits::default();
        match &self.shared.cgroups {
            Some(cg) => match cg.create(&self.name, &limits) {
                Ok(()) => self.cg = Some(cg.clone()),
                Err(e) => {
                    tracing::warn!(instance = %self.name, error = %e, "running without cgroup (no limits, no OOM detection)");
                    self.note = Some(format!("running without resource limits: {e}"));
                }
            },
            None if wants_limits => {
                let why = self
                    .shared
                    .cgroup_note
                    .clone()
                    .unwrap_or_else(|| "cgroups unavailable".into());
                self.note = Some(format!("running without resource limits: {why}"));
            }
            None => {}
        }
        Ok(Prepared {
            env,
            args,
            uid,
            gid,
        })
    }

    fn launch(&self, p: &Prepared) -> LaunchSpec {
        LaunchSpec {
            program: self.spec.command.clone(),
            args: p.args.clone(),
            env: p.env.clone(),
            workdir: self.spec.workdir.as_ref().map(PathBuf::from),
            uid: p.uid.map(Uid::as_raw),
            gid: p.gid.map(Gid::as_raw),
            open_files: self.spec.resources.open_files,
            cgroup_procs: self
                .cg
                .as_ref()
                .map(|c| c.procs_files(&self.name))
                .unwrap_or_default(),
        }
    }

    fn run_dir(&self) -> PathBuf {
        shim::run_dir(&self.shared.config.data_dir, &self.name)
    }

    /// Whether the status this worker started from shows process `pid` running (or stopping).
    fn records(&self, pid: u32) -> bool {
        self.initial.pid == Some(pid)
            && matches!(
                self.initial.phase,
                Phase::Starting | Phase::Running | Phase::Stopping
            )
    }

    /// Takes over what an earlier agent left of this instance: a process still running is
    /// re-adopted (probes, usage sampling and its exit resume; its status stays as it was); one
    /// that ended meanwhile is reported with its exit status, or as lost, and restarted by the
    /// restart policy.
    async fn resume(&mut self, found: Found, prepared: &mut Option<Prepared>) -> Resumed {
        let next = match found {
            Found::Alive { ref state } if !self.records(state.pid) => {
                // Started, but the agent died before recording it: its status has neither its
                // pid nor its ports, so it is started again rather than adopted blind.
                let pid = state.pid;
                tracing::info!(instance = %self.name, pid, "a process whose start was never recorded: starting it again");
                self.kill_leftovers(pid).await;
                shim::forget_run(&self.run_dir());
                return Resumed::Continue;
            }
            Found::Alive { .. } => {
                for (name, port) in &self.initial.ports {
                    self.ports.insert(name.clone(), *port);
                    self.shared.ports.claim(*port);
                    self.hold(|h| h.ports.push(*port));
                }
                let p = match self.prepare() {
                    Ok(p) => p,
                    Err(e) => {
                        // The process keeps running unsupervised is worse than a restart.
                        tracing::warn!(instance = %self.name, error = %e, "cannot resume the instance; restarting it");
                        if let Some(pid) = found.live_pid() {
                            self.kill_leftovers(pid).await;
                        }
                        return Resumed::Continue;
                    }
                };
                let Found::Alive { state, .. } = &found else {
                    return Resumed::Continue;
                };
                let (pid, started_ms) = (state.pid, state.started_unix_ms);
                let oom_before = state.oom_before;
                let child = match self.shared.driver.adopt(found, self.run_dir()) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(instance = %self.name, pid, error = %e, "cannot re-adopt the process; restarting it");
                        self.kill_leftovers(pid).await;
                        *prepared = Some(p);
                        return Resumed::Continue;
                    }
                };
                self.hold(|h| h.pgid = Some(pid));
                let age = Duration::from_millis(shim::unix_ms().saturating_sub(started_ms));
                let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                tracing::info!(instance = %self.name, pid, since_agent_start_ms = self.shared.started.elapsed().as_millis() as u64, "re-adopted a running process");
                self.event(
                    EventType::Normal,
                    "Adopted",
                    &format!(
                        "re-adopted process {pid} ({}) after an agent restart",
                        self.spec.command
                    ),
                )
                .await;
                if self.desired_now() != Desired::Run {
                    self.desired.mark_changed();
                }
                let resume = probe::Resume {
                    started: self.initial.phase != Phase::Starting,
                    ready: self.initial.ready,
                };
                let launch = self.launch(&p);
                let end = self
                    .supervise(&p, &launch, child, started, oom_before, Some(resume))
                    .await;
                *prepared = Some(p);
                match end {
                    RunEnd::Stop(d) => return Resumed::End(d),
                    RunEnd::Exited(exit, ran_for) => self.after_exit(exit, ran_for, false).await,
                    RunEnd::StartFailed(msg) => self.after_start_failure(msg).await,
                }
            }
            Found::Exited { state, exit } => {
                if self.desired_now() != Desired::Run {
                    return Resumed::End(self.desired_now());
                }
                let oom_before = state.as_ref().map_or(0, |s| s.oom_before);
                let cg_oom = self
                    .shared
                    .cgroups
                    .as_ref()
                    .and_then(|cg| cg.oom_kills(&self.name).ok())
                    .unwrap_or(0);
                let ran_for = state.as_ref().map_or(Duration::ZERO, |s| {
                    Duration::from_millis(exit.at_unix_ms.saturating_sub(s.started_unix_ms))
                });
                shim::forget_run(&self.run_dir());
                if let Some(s) = &state {
                    // What it left in its group, when no cgroup holds it.
                    self.kill_leftovers(s.pid).await;
                }
                let status = ExitStatus::from_raw(exit.status);
                let mut info = classify(Some(status), cg_oom > oom_before, None);
                info.at = unix_ms_rfc3339(exit.at_unix_ms);
                self.after_exit(info, ran_for, true).await
            }
            Found::Lost { .. } => {
                if let Some(pid) = found.live_pid() {
                    self.kill_leftovers(pid).await;
                }
                shim::forget_run(&self.run_dir());
                if self.desired_now() != Desired::Run {
                    return Resumed::End(self.desired_now());
                }
                let info = ExitInfo {
                    code: None,
                    signal: None,
                    oom_killed: false,
                    reason: "Unknown".to_string(),
                    at: now_rfc3339(),
                };
                self.after_exit(info, Duration::ZERO, true).await
            }
        };
        match next {
            Some(d) => Resumed::End(d),
            None => Resumed::Continue,
        }
    }

    async fn run_once(&mut self, p: &Prepared) -> RunEnd {
        let oom_before = self.oom_kills();
        let launch = self.launch(p);
        let output = Output {
            instance: self.name.clone(),
            uid: self.uid.clone(),
            log_dir: logs::log_dir(&self.shared.config.data_dir, &self.name),
            log_max_bytes: self.shared.config.log_max_bytes,
            log_max_files: self.shared.config.log_max_files,
            run_dir: self.run_dir(),
            oom_before,
            grace: self.spec.stop.grace_period.0,
        };
        let started = Instant::now();
        let child = match self.shared.driver.spawn(&launch, &output).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(instance = %self.name, error = %e, "spawn failed");
                return RunEnd::StartFailed(format!("cannot start {:?}: {e}", self.spec.command));
            }
        };
        let pid = child.pid();
        self.hold(|h| h.pgid = Some(pid));
        self.start_failure_phase = None;
        let has_startup = self.spec.probes.startup.is_some();
        let has_readiness = self.spec.probes.readiness.is_some();
        let started_at = now_rfc3339();
        let (host, ports, note) = (
            self.shared.config.host.clone(),
            self.ports.clone(),
            self.note.clone(),
        );
        self.happened(Happened::Started {
            pid,
            startup_probe: has_startup,
            readiness_probe: has_readiness,
            host,
            ports,
            at: started_at,
            note,
        })
        .await;
        self.event(
            EventType::Normal,
            "Started",
            &format!("started process {pid} ({})", self.spec.command),
        )
        .await;
        tracing::info!(instance = %self.name, pid, "process started");
        #[cfg(test)]
        if take_panic(&self.name) {
            panic!("test hook: worker of {} panics after start", self.name);
        }
        self.supervise(p, &launch, child, started, oom_before, None)
            .await
    }

    /// Probes, samples and waits for a running process until it ends or a stop is wanted.
    /// `resume`: the process was re-adopted, in the state its status shows.
    async fn supervise(
        &mut self,
        p: &Prepared,
        launch: &LaunchSpec,
        mut child: Box<dyn Running>,
        started: Instant,
        oom_before: u64,
        resume: Option<probe::Resume>,
    ) -> RunEnd {
        let pid = child.pid();
        let has_startup = self.spec.probes.startup.is_some();
        let has_readiness = self.spec.probes.readiness.is_some();
        let (ptx, mut prx) = mpsc::channel(16);
        let probe_cancel = CancellationToken::new();
        let ctx = ProbeContext {
            host: self.shared.config.host.clone(),
            ports: self.ports.clone(),
            first_port: self.spec.ports.first().cloned(),
            env: p.env.clone(),
            workdir: self.spec.workdir.as_ref().map(PathBuf::from),
            uid: p.uid.map(Uid::as_raw),
            gid: p.gid.map(Gid::as_raw),
            open_files: launch.open_files,
            cgroup_procs: launch.cgroup_procs.clone(),
        };
        let probes = tokio::spawn(probe::run_probes(
            self.spec.probes.clone(),
            ctx,
            ptx,
            probe_cancel.clone(),
            resume,
        ));
        let mut usage_tick = tokio::time::interval(
            self.shared
                .config
                .usage_interval
                .max(Duration::from_millis(100)),
        );
        usage_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.last_usage = None;
        self.usage_written = None;

        let mut killed_for: Option<&'static str> = None;
        // Without a readiness probe the process counts as ready from its start.
        let mut first_ready = resume.map_or(!has_readiness && !has_startup, |r| r.ready);
        // A re-adopted process: its first probe result after the adoption is logged.
        let mut unconfirmed = resume.is_some();
        let mut stop: Option<Desired> = None;
        // Every branch must be disabled once its source is exhausted: a closed channel is
        // ready at once and forever, and would turn this loop into a busy loop.
        let mut probes_open = true;
        let status = loop {
            tokio::select! {
                st = child.wait() => break st.ok(),
                ev = prx.recv(), if probes_open => {
                    let Some(ev) = ev else {
                        probes_open = false;
                        continue;
                    };
                    let ev_kind = if matches!(ev, ProbeEvent::StartupFailed(_)) { EvKind::Startup } else { EvKind::Other };
                    match ev {
                        ProbeEvent::CheckFailed { probe, message } => {
                            tracing::debug!(instance = %self.name, probe, detail = %message, "probe check failed");
                            let counter = if metrics::is_startup_failure(probe, first_ready) {
                                &self.shared.metrics.probe_startup_failures
                            } else {
                                &self.shared.metrics.probe_failures
                            };
                            counter.get_or_create(&metrics::probe(&self.service, probe)).inc();
                        }
                        ProbeEvent::StartupPassed => {
                            first_ready |= !has_readiness;
                            if has_startup {
                                self.happened(Happened::StartupPassed).await;
                            }
                        }
                        ProbeEvent::Ready(ready, message) => {
                            if std::mem::take(&mut unconfirmed) {
                                tracing::info!(instance = %self.name, pid, ready, since_agent_start_ms = self.shared.started.elapsed().as_millis() as u64, "re-adopted process probed");
                            }
                            first_ready |= ready;
                            self.happened(Happened::Readiness(ready)).await;
                            if !ready {
                                self.event(EventType::Warning, "Unhealthy", &format!("readiness probe failed: {message}")).await;
                            }
                        }
                        ProbeEvent::StartupFailed(message) | ProbeEvent::LivenessFailed(message) => {
                            let (which, reason) = if has_startup && matches!(ev_kind, EvKind::Startup) {
                                ("startup", "StartupFailed")
                            } else {
                                ("liveness", "LivenessFailed")
                            };
                            killed_for = Some(reason);
                            self.event(EventType::Warning, "Unhealthy", &format!("{which} probe failed: {message}")).await;
                            self.event(EventType::Warning, "Killed", &format!("stopping process {pid}: {which} probe failed")).await;
                            self.happened(Happened::Unhealthy).await;
                            break self.terminate(&mut child, pid).await;
                        }
                    }
                }
                r = self.desired.changed() => {
                    let d = if r.is_err() { Desired::Shutdown } else { *self.desired.borrow_and_update() };
                    if d == Desired::Run {
                        continue;
                    }
                    if d == Desired::Detach {
                        probe_cancel.cancel();
                        let _ = probes.await;
                        tracing::info!(instance = %self.name, pid, "agent exiting: the process keeps running");
                        return RunEnd::Stop(d);
                    }
                    if d != Desired::Gone {
                        self.happened(Happened::Stopping).await;
                    }
                    stop = Some(d);
                    if d == Desired::Delete {
                        self.drain().await;
                    }
                    break self.terminate(&mut child, pid).await;
                }
                _ = usage_tick.tick() => self.sample_usage().await,
            }
        };
        probe_cancel.cancel();
        let _ = probes.await;
        self.kill_leftovers(pid).await;
        self.hold(|h| h.pgid = None);
        if let Some(d) = stop {
            return RunEnd::Stop(d);
        }
        let oom = self.oom_kills() > oom_before;
        // Its end is reported now: a later agent must not find it again.
        shim::forget_run(&self.run_dir());
        RunEnd::Exited(classify(status, oom, killed_for), started.elapsed())
    }

    /// Returns `Some` when the worker should end.
    /// `away`: it ended while no agent ran (found by the next one).
    async fn after_exit(
        &mut self,
        exit: ExitInfo,
        ran_for: Duration,
        away: bool,
    ) -> Option<Desired> {
        let success = exit.reason == "Completed";
        let mut what = match (exit.code, exit.signal) {
            (_, Some(sig)) => format!("killed by signal {sig}"),
            (Some(code), None) => format!("exited with code {code}"),
            (None, None) if exit.reason == "Unknown" => {
                "ended, how is unknown (its shim is gone)".to_string()
            }
            (None, None) => "could not be started".to_string(),
        };
        if away {
            what.push_str(" while no agent ran");
        }
        tracing::info!(instance = %self.name, reason = %exit.reason, %what, "process ended");
        if exit.oom_killed {
            self.shared
                .metrics
                .oom_kills
                .get_or_create(&metrics::service(&self.service))
                .inc();
            self.event(
                EventType::Warning,
                "OOMKilled",
                &format!("process {what}: memory limit exceeded"),
            )
            .await;
        } else {
            let ty = if success {
                EventType::Normal
            } else {
                EventType::Warning
            };
            self.event(ty, "Exited", &format!("process {what} ({})", exit.reason))
                .await;
        }
        self.consecutive = backoff::next_failure_count(self.consecutive, ran_for);
        let rs = &self.spec.restart;
        let decision = backoff::decide(
            rs.policy,
            success,
            self.consecutive,
            rs.backoff_initial.0,
            rs.backoff_max.0,
        );
        let note = self.note.clone();
        match decision {
            Decision::Stop { phase } => {
                self.happened(Happened::Ended {
                    exit: Some(exit),
                    phase,
                    restarts: None,
                    message: note,
                })
                .await;
                Some(Self::until_stop(&mut self.desired).await)
            }
            Decision::Restart { delay, phase } => {
                let restarts = self.count_restart();
                let message = if delay.is_zero() {
                    note.clone()
                } else {
                    Some(format!(
                        "restarting in {} after {} consecutive exits",
                        humantime::format_duration(delay),
                        self.consecutive
                    ))
                };
                self.happened(Happened::Ended {
                    exit: Some(exit),
                    phase,
                    restarts: Some(restarts),
                    message,
                })
                .await;
                if delay.is_zero() {
                    return None;
                }
                self.event(
                    EventType::Warning,
                    "BackOff",
                    &format!(
                        "back-off {}: restarting failed process",
                        humantime::format_duration(delay)
                    ),
                )
                .await;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => None,
                    d = Self::until_stop(&mut self.desired) => Some(d),
                }
            }
        }
    }

    /// Counts one more restart of this instance, in its status and in the metrics.
    fn count_restart(&mut self) -> u32 {
        self.restarts = self.restarts.saturating_add(1);
        self.shared
            .metrics
            .restarts
            .get_or_create(&metrics::service(&self.service))
            .inc();
        self.restarts
    }

    /// Before the stop signal of a deleted instance: wait until the gateway no longer routes to
    /// it and has no request in flight to it (the drain hook, in-process in `flotilla up`; at
    /// most [`DRAIN_WAIT`]), then the service's pre-stop delay, so no request reaches, or is
    /// on its way to, a process that is shutting down. Requests still in flight after that
    /// (long streams, upgraded connections) finish after the signal, within the grace period.
    /// Agent shutdown skips this: the gateway is closing.
    async fn drain(&self) {
        if let Some(hook) = &self.shared.config.drain
            && tokio::time::timeout(DRAIN_WAIT, hook.unrouted(&self.name))
                .await
                .is_err()
        {
            tracing::info!(
                instance = %self.name,
                wait = ?DRAIN_WAIT,
                "the gateway still routes to the instance or has requests in flight to it; stopping it anyway"
            );
        }
        let delay = self.spec.deploy.pre_stop_delay.0;
        if !delay.is_zero() {
            tracing::debug!(instance = %self.name, ?delay, "pre-stop delay");
            tokio::time::sleep(delay).await;
        }
    }

    /// Sends the stop signal to the process group, waits up to the grace period for the
    /// process, its group and its cgroup to empty, then SIGKILLs whatever is left.
    async fn terminate(&mut self, child: &mut Box<dyn Running>, pid: u32) -> Option<ExitStatus> {
        let sig = process::parse_signal(&self.spec.stop.signal).unwrap_or(Signal::SIGTERM);
        let grace = self.spec.stop.grace_period.0;
        tracing::info!(instance = %self.name, pid, signal = %sig, ?grace, "stopping process group");
        self.shared.driver.signal_group(pid, sig);
        let deadline = tokio::time::Instant::now() + grace;
        let mut status = None;
        loop {
            if status.is_none() {
                tokio::select! {
                    st = child.wait() => status = Some(st.ok()),
                    _ = tokio::time::sleep(STOP_POLL) => {}
                }
            } else {
                tokio::time::sleep(STOP_POLL).await;
            }
            if status.is_some()
                && self.shared.driver.group_members(pid).is_empty()
                && self.cgroup_empty()
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::info!(instance = %self.name, "grace period over; killing what is left");
                break;
            }
        }
        self.kill_leftovers(pid).await;
        match status {
            Some(s) => s,
            None => tokio::time::timeout(KILL_TIMEOUT, child.wait())
                .await
                .ok()
                .and_then(Result::ok),
        }
    }

    fn cgroup_empty(&self) -> bool {
        match &self.cg {
            Some(cg) => cg.pids(&self.name).map(|p| p.is_empty()).unwrap_or(true),
            None => true,
        }
    }

    /// SIGKILLs everything left in the cgroup and in the process group.
    async fn kill_leftovers(&self, pgid: u32) {
        if let Some(cg) = &self.cg {
            cgroup::kill_until_empty(cg.as_ref(), &self.name, KILL_TIMEOUT).await;
        }
        if !self
            .shared
            .driver
            .kill_group_until_empty(pgid, KILL_TIMEOUT)
            .await
        {
            tracing::warn!(instance = %self.name, pgid, "process group survives SIGKILL");
        }
    }

    fn oom_kills(&self) -> u64 {
        self.cg
            .as_ref()
            .and_then(|cg| cg.oom_kills(&self.name).ok())
            .unwrap_or(0)
    }

    async fn sample_usage(&mut self) {
        let Some(cg) = &self.cg else { return };
        let u = match cg.usage(&self.name) {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(instance = %self.name, error = %e, "usage sample failed");
                return;
            }
        };
        let now = Instant::now();
        let cpu = match self.last_usage {
            Some((t0, c0)) => millicores(u.cpu_ns.saturating_sub(c0), now - t0),
            None => 0,
        };
        let first = self.last_usage.is_none();
        self.last_usage = Some((now, u.cpu_ns));
        if first {
            return;
        }
        let labels = metrics::instance(&self.service, &self.name);
        self.shared
            .metrics
            .cpu_millicores
            .get_or_create(&labels)
            .set(i64::try_from(cpu).unwrap_or(i64::MAX));
        self.shared
            .metrics
            .memory_bytes
            .get_or_create(&labels)
            .set(i64::try_from(u.memory_bytes).unwrap_or(i64::MAX));
        // The status gets the usage at most every `usage_status_interval`, and only when it
        // changed: each write is a durable store write that wakes the controller and gateway.
        let due = match self.usage_written {
            None => true,
            Some((at, c, m)) => {
                now.duration_since(at) >= self.shared.config.usage_status_interval
                    && (c, m) != (cpu, u.memory_bytes)
            }
        };
        if !due {
            return;
        }
        self.usage_written = Some((now, cpu, u.memory_bytes));
        let usage = Usage {
            cpu_millicores: cpu,
            memory_bytes: u.memory_bytes,
            sampled_at: now_rfc3339(),
        };
        self.happened(Happened::Usage(usage)).await;
    }

    /// Cleanup after the last process: cgroup, ports, metrics, and the store by `end`.
    /// Returns whether the instance was deleted from the store.
    async fn finish(&mut self, end: Desired) -> bool {
        if end == Desired::Detach {
            // The process, its cgroup, its ports and its run directory stay for the next agent.
            self.hold(|h| *h = Held::default());
            return false;
        }
        let _ = std::fs::remove_dir_all(self.run_dir());
        if let Some(cg) = self.cg.take() {
            cgroup::kill_until_empty(cg.as_ref(), &self.name, KILL_TIMEOUT).await;
            cgroup::remove_with_retry(cg.as_ref(), &self.name, KILL_TIMEOUT).await;
        } else if let Some(cg) = &self.shared.cgroups {
            // A cgroup may exist from before (e.g. prepare failed after creating it).
            let _ = cg.remove(&self.name);
        }
        self.shared.ports.release(self.ports.values().copied());
        self.hold(|h| *h = Held::default());
        self.shared
            .metrics
            .forget_instance(&self.service, &self.name);
        match end {
            Desired::Delete => {
                self.event(EventType::Normal, "Stopped", "instance stopped")
                    .await;
                return self.delete_from_store().await;
            }
            Desired::Shutdown => {
                self.happened(Happened::AgentShutDown).await;
                self.event(
                    EventType::Normal,
                    "Stopped",
                    "instance stopped: agent shut down",
                )
                .await;
            }
            Desired::Gone | Desired::Run | Desired::Detach => {
                tracing::info!(instance = %self.name, "instance gone from the store; stopped");
            }
        }
        false
    }

    /// Deletes the stopped instance from the store, retrying with capped exponential backoff
    /// until it succeeds or the agent wants more than a deletion (shutdown, instance gone).
    /// Returns whether it was deleted.
    async fn delete_from_store(&mut self) -> bool {
        let mut delay = DELETE_RETRY_FIRST;
        loop {
            match self.shared.api.finish_deletion(&self.name).await {
                Ok(_) => {
                    tracing::info!(instance = %self.name, "instance stopped and deleted");
                    return true;
                }
                Err(e) => {
                    tracing::warn!(instance = %self.name, error = %e, retry_in = ?delay, "cannot delete instance");
                }
            }
            let wait_beyond_delete = async {
                loop {
                    if *self.desired.borrow_and_update() > Desired::Delete {
                        return;
                    }
                    if self.desired.changed().await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = wait_beyond_delete => {
                    tracing::warn!(instance = %self.name, "instance not deleted from the store: agent stopping");
                    return false;
                }
            }
            delay = delay.saturating_mul(2).min(DELETE_RETRY_MAX);
        }
    }

    /// Records what happened in the status ([`transition::apply`]) through a
    /// read-modify-write; failures are logged, not fatal.
    async fn happened(&self, happened: Happened) {
        let edit = |status: &mut InstanceStatus| {
            let before = status.clone();
            transition::apply(status, &happened);
            // `readySince` follows `ready`: rollouts count an instance as available only once
            // it has been ready for `deploy.min_ready`.
            if !status.ready {
                status.ready_since = None;
            } else if !before.ready || status.ready_since.is_none() {
                status.ready_since = Some(now_rfc3339());
            }
            *status != before
        };
        let r = self.shared.api.modify_status(&self.name, &edit).await;
        match r {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::debug!(instance = %self.name, "status not written: instance is gone")
            }
            Err(e) => {
                tracing::warn!(instance = %self.name, error = %e, "cannot write instance status")
            }
        }
    }

    async fn event(&self, kind: EventType, reason: &str, message: &str) {
        self.shared
            .api
            .record_event(&self.name, kind, reason, message)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_spec::Object;
    use flotilla_store::{Store, typed};
    use std::os::unix::process::ExitStatusExt;

    /// A store that, once the worker records the first restart of the instance, tells the
    /// worker to delete it: the stop request arrives while the worker is about to restart.
    struct StopOnRestart {
        inner: Arc<dyn Store>,
        desired: watch::Sender<Desired>,
    }

    #[async_trait::async_trait]
    impl Store for StopOnRestart {
        async fn get(
            &self,
            key: &str,
        ) -> Result<Option<flotilla_store::KeyValue>, flotilla_store::StoreError> {
            self.inner.get(key).await
        }
        async fn list(
            &self,
            prefix: &str,
        ) -> Result<flotilla_store::ListResult, flotilla_store::StoreError> {
            self.inner.list(prefix).await
        }
        async fn put(
            &self,
            key: &str,
            value: Vec<u8>,
            pre: flotilla_store::Precondition,
        ) -> Result<flotilla_store::KeyValue, flotilla_store::StoreError> {
            let restarted = key == Instance::key_for("i")
                && serde_json::from_slice::<Instance>(&value).is_ok_and(|i| i.status.restarts >= 1);
            let r = self.inner.put(key, value, pre).await;
            if restarted {
                // As the controller would: mark it for deletion, then the agent tells the worker.
                let _ = typed::modify::<Instance>(self.inner.as_ref(), "i", |i| {
                    i.metadata.deletion_timestamp = Some(now_rfc3339());
                    true
                })
                .await;
                self.desired.send_replace(Desired::Delete);
            }
            r
        }
        async fn delete(
            &self,
            key: &str,
            pre: flotilla_store::Precondition,
        ) -> Result<Option<flotilla_store::KeyValue>, flotilla_store::StoreError> {
            self.inner.delete(key, pre).await
        }
        async fn watch(
            &self,
            prefix: &str,
            after: flotilla_store::Revision,
        ) -> Result<flotilla_store::Watch, flotilla_store::StoreError> {
            self.inner.watch(prefix, after).await
        }
        fn revision(&self) -> flotilla_store::Revision {
            self.inner.revision()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_requested_before_an_immediate_restart_wins() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> =
            Arc::new(flotilla_store::EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let inst = test_instance(
            "i",
            serde_json::json!({
                "command": "sh", "args": ["-c", "exit 1"],
                "restart": {"policy": "always"}
            }),
        );
        let inst = typed::create(inner.as_ref(), inst).await.unwrap();
        let (tx, rx) = watch::channel(Desired::Run);
        let store = Arc::new(StopOnRestart {
            inner: inner.clone(),
            desired: tx,
        });
        let shared = test_shared(dir.path(), store, Arc::new(crate::driver::ProcessDriver));
        let held = Arc::new(Mutex::new(Held::default()));
        let (end, deleted) =
            tokio::time::timeout(Duration::from_secs(15), run(shared, inst, rx, held.clone()))
                .await
                .unwrap();
        assert_eq!((end, deleted), (Desired::Delete, true));
        let (events, _) = typed::list::<flotilla_spec::Event>(inner.as_ref())
            .await
            .unwrap();
        let starts = events.iter().filter(|e| e.reason == "Started").count();
        assert_eq!(starts, 1, "restarted although a stop was pending");
        assert!(
            typed::get::<Instance>(inner.as_ref(), "i")
                .await
                .unwrap()
                .is_none()
        );
        let h = held.lock().unwrap();
        assert!(h.pgid.is_none() && h.ports.is_empty());
    }

    /// A worker over the recording driver: what it asked of the driver and what it wrote.
    async fn fake_worker(
        template: serde_json::Value,
        exits: Vec<i32>,
    ) -> (
        tempfile::TempDir,
        Arc<dyn Store>,
        crate::driver::fake::RecordingDriver,
        Arc<Shared>,
        Instance,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(flotilla_store::EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let inst = typed::create(store.as_ref(), test_instance("f", template))
            .await
            .unwrap();
        let driver = crate::driver::fake::RecordingDriver::new(exits);
        let shared = test_shared(dir.path(), store.clone(), Arc::new(driver.clone()));
        (dir, store, driver, shared, inst)
    }

    /// Instance `name` of service `svc` on node `n`, with `template` as its spec.
    fn test_instance(name: &str, template: serde_json::Value) -> Instance {
        Instance {
            metadata: flotilla_spec::ObjectMeta::named(name),
            spec: flotilla_spec::InstanceSpec {
                service: "svc".to_string(),
                node: "n".to_string(),
                spec_hash: "h".to_string(),
                template: serde_json::from_value(template).unwrap(),
            },
            status: Default::default(),
        }
    }

    /// What a worker of node `n` shares, over `store`, without cgroups.
    fn test_shared(
        dir: &std::path::Path,
        store: Arc<dyn Store>,
        driver: Arc<dyn crate::driver::Driver>,
    ) -> Arc<Shared> {
        let mut registry = prometheus_client::registry::Registry::default();
        let mut config = AgentConfig::new("n", dir.join("data"));
        config.cgroups = crate::CgroupMode::Disabled;
        Arc::new(Shared {
            ports: PortAllocator::new(config.port_range.clone()),
            config,
            api: Arc::new(flotilla_store::StoreNode::new(
                store,
                Default::default(),
                "n",
            )),
            driver,
            cgroups: None,
            cgroup_note: None,
            metrics: Metrics::register(&mut registry),
            renewed: std::sync::Mutex::new(None),
            found: Mutex::default(),
            started: Instant::now(),
            detach: std::sync::atomic::AtomicBool::new(false),
        })
    }

    #[tokio::test]
    async fn under_never_an_exit_is_terminal_and_nothing_is_signalled() {
        use crate::driver::fake::Call;
        let (_dir, store, driver, shared, inst) = fake_worker(
            serde_json::json!({"command": "srv", "restart": {"policy": "never"}}),
            vec![3 << 8],
        )
        .await;
        let (tx, rx) = watch::channel(Desired::Run);
        let worker = tokio::spawn(run(shared, inst, rx, Arc::default()));
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            let i = typed::get::<Instance>(store.as_ref(), "f")
                .await
                .unwrap()
                .unwrap();
            if i.status.phase == Phase::Failed {
                break i.status;
            }
            assert!(Instant::now() < deadline, "never failed: {i:#?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(status.last_exit.as_ref().and_then(|e| e.code), Some(3));
        assert_eq!(
            (status.pid, status.ready, status.restarts),
            (None, false, 0)
        );
        assert_eq!(
            driver.calls(),
            [Call::Spawn("srv".into()), Call::Kill(4_000_001)]
        );
        tx.send_replace(Desired::Gone);
        worker.await.unwrap();
    }

    #[tokio::test]
    async fn a_deletion_signals_the_group_with_the_stop_signal_then_deletes() {
        use crate::driver::fake::Call;
        let (_dir, store, driver, shared, inst) = fake_worker(
            serde_json::json!({"command": "srv", "stop": {"signal": "SIGUSR1"}}),
            vec![],
        )
        .await;
        typed::modify::<Instance>(store.as_ref(), "f", |i| {
            i.metadata.deletion_timestamp = Some(now_rfc3339());
            true
        })
        .await
        .unwrap();
        let (tx, rx) = watch::channel(Desired::Run);
        let worker = tokio::spawn(run(shared, inst, rx, Arc::default()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while typed::get::<Instance>(store.as_ref(), "f")
            .await
            .unwrap()
            .and_then(|i| i.status.pid)
            .is_none()
        {
            assert!(Instant::now() < deadline, "never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tx.send_replace(Desired::Delete);
        let (end, deleted) = worker.await.unwrap();
        assert_eq!((end, deleted), (Desired::Delete, true));
        let calls = driver.calls();
        assert_eq!(calls[0], Call::Spawn("srv".into()));
        assert_eq!(calls[1], Call::Signal(4_000_001, Signal::SIGUSR1));
        assert!(
            typed::get::<Instance>(store.as_ref(), "f")
                .await
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn exit_classification() {
        let code = |c: i32| Some(ExitStatus::from_raw(c << 8));
        let sig = |s: i32| Some(ExitStatus::from_raw(s));
        assert_eq!(classify(code(0), false, None).reason, "Completed");
        assert_eq!(classify(code(3), false, None).reason, "Error");
        assert_eq!(classify(code(3), false, None).code, Some(3));
        let k = classify(sig(9), false, None);
        assert_eq!((k.reason.as_str(), k.signal), ("Signaled", Some(9)));
        let o = classify(sig(9), true, None);
        assert_eq!((o.reason.as_str(), o.oom_killed), ("OOMKilled", true));
        assert_eq!(
            classify(sig(15), false, Some("LivenessFailed")).reason,
            "LivenessFailed"
        );
        assert_eq!(classify(None, false, None).reason, "Error");
    }

    #[test]
    fn cpu_math() {
        assert_eq!(millicores(500_000_000, Duration::from_secs(1)), 500);
        assert_eq!(millicores(4_000_000_000, Duration::from_secs(2)), 2000);
        assert_eq!(millicores(1, Duration::ZERO), 1000);
    }

    #[test]
    fn env_and_args() {
        let mut spec: ServiceSpec = serde_json::from_value(serde_json::json!({
            "command": "app",
            "args": ["--port", "${PORT}", "--admin=${PORT_ADMIN_API}", "${GREETING}", "$$HOME"],
            "ports": ["http", "admin-api"],
            "env": {"GREETING": "hello ${FLOTILLA_INSTANCE}", "URL": "http://127.0.0.1:${PORT_HTTP}/"}
        }))
        .unwrap();
        let ports = BTreeMap::from([("http".to_string(), 8001), ("admin-api".to_string(), 8002)]);
        let (env, args) = build_env("web-1", "web", "n1", "127.0.0.1", &spec, &ports).unwrap();
        assert_eq!(env["PORT"], "8001");
        assert_eq!(env["PORT_HTTP"], "8001");
        assert_eq!(env["PORT_ADMIN_API"], "8002");
        assert_eq!(env["FLOTILLA_SERVICE"], "web");
        assert_eq!(env["FLOTILLA_NODE"], "n1");
        assert_eq!(env["GREETING"], "hello web-1");
        assert_eq!(env["URL"], "http://127.0.0.1:8001/");
        assert_eq!(
            args,
            vec!["--port", "8001", "--admin=8002", "hello web-1", "$HOME"]
        );
        spec.args = vec!["${NOPE}".into()];
        let e = build_env("web-1", "web", "n1", "127.0.0.1", &spec, &ports)
            .unwrap_err()
            .to_string();
        assert!(e.contains("args[0]") && e.contains("NOPE"), "{e}");
    }
}
