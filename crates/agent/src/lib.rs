//! flotilla's node agent (the kubelet's job): runs the instances bound to this node as real
//! processes — own process group, cgroup limits (v1 or v2), rlimits, captured and rotated logs
//! — probes them, restarts them with backoff, reports their status and usage, and stops them
//! gracefully with nothing left behind.
//!
//! Structure: [`Agent::run`] follows the node's Instances through a store reflector and owns one
//! worker task per instance (`worker`); the decision logic is pure and unit-tested
//! ([`backoff`], [`probe::ProbeState`], exit classification), the OS-facing parts sit in
//! [`cgroup`] (file-level, testable on a fake tree), `process` (spawn, signals) and [`logs`].

pub mod backoff;
pub mod cgroup;
pub mod driver;
mod error;
pub mod logs;
mod metrics;
pub mod ports;
pub mod probe;
mod process;
mod transition;
mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_spec::Instance;
use flotilla_store::NodeApi;
use flotilla_store::typed::Reflector;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use cgroup::CgroupMode;
pub use error::AgentError;

use crate::cgroup::Detected;
use crate::worker::{Desired, Held, Shared};

/// How often the logs of gone instances are looked at for expiry.
const LOG_SWEEP: Duration = Duration::from_secs(300);

/// Extra time, beyond the longest grace period, that shutdown waits for workers.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(15);

/// Configuration of the node agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name: the agent runs the instances whose `spec.node` equals it.
    pub node: String,
    /// Logs live under `<data_dir>/logs/<instance>/`.
    pub data_dir: PathBuf,
    /// Address reported in `status.host` (instances listen on it).
    pub host: String,
    pub cgroups: CgroupMode,
    /// Size at which an instance's log file is rotated.
    pub log_max_bytes: u64,
    /// Log files kept per instance, the current one included.
    pub log_max_files: u32,
    /// How often CPU and memory usage is sampled (for the metrics).
    pub usage_interval: Duration,
    /// How often, at most, the sampled usage is written into `status.usage` (and only when
    /// it changed): every status write is a durable store write that also wakes the
    /// controller and the gateway.
    pub usage_status_interval: Duration,
    /// Host ports handed to instances come from this range. The default is 20000–32767
    /// clipped to stay out of the kernel's ephemeral range (`ip_local_port_range`), so an
    /// outgoing connection never takes an instance's port while it restarts.
    pub port_range: RangeInclusive<u16>,
    /// Confirms that the gateway stopped routing to an instance and has no request in flight
    /// to it, before its stop signal.
    pub drain: Option<Arc<dyn DrainHook>>,
    /// How long the logs of an instance that is gone are kept (checked every few minutes).
    pub log_retention: Duration,
}

/// Something that routes traffic to instances and can confirm it stopped doing so. In
/// `flotilla up` the in-process gateway implements it; across machines the pre-stop delay
/// covers propagation instead.
#[async_trait::async_trait]
pub trait DrainHook: Send + Sync + 'static {
    /// Returns once no new request will be sent to `instance` and none sent to it is still
    /// in flight (a request written to a process but not yet read by it is lost when the
    /// process closes its idle-looking connections at the stop signal).
    async fn unrouted(&self, instance: &str);
}

impl std::fmt::Debug for dyn DrainHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DrainHook")
    }
}

impl AgentConfig {
    /// Defaults: host 127.0.0.1, cgroups auto, 10 MiB × 3 log files, usage sampled every 5 s
    /// and written to the status at most every 30 s, ports per [`ports::default_port_range`].
    pub fn new(node: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node: node.into(),
            data_dir: data_dir.into(),
            host: "127.0.0.1".to_string(),
            cgroups: CgroupMode::Auto,
            log_max_bytes: 10 << 20,
            log_max_files: 3,
            usage_interval: Duration::from_secs(5),
            usage_status_interval: Duration::from_secs(30),
            log_retention: Duration::from_secs(3600),
            port_range: ports::default_port_range(ports::ephemeral_range()),
            drain: None,
        }
    }
}

/// Name of the cgroup directory (the "scope") under which an agent creates its instances'
/// cgroups, inside the agent's own cgroup: `flotilla-<node>-<h>`, where `<h>` is 8 hex digits
/// of the 32-bit FNV-1a hash of the canonical `data_dir` (as given when it cannot be
/// canonicalized, e.g. before it exists).
///
/// The data directory is part of the name because two agents may share a node name (two
/// `flotilla up` with different data directories both default to node `local`): each sweeps
/// its scope at start-up and removes it at exit, which must not touch the other's instances.
pub fn cgroup_scope_name(node: &str, data_dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let canonical = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    format!(
        "flotilla-{node}-{:08x}",
        fnv1a32(canonical.as_os_str().as_bytes())
    )
}

/// 32-bit FNV-1a: small, stable across builds and platforms (unlike std's `DefaultHasher`).
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// The node agent. Build with [`Agent::new`], then [`Agent::run`] until shutdown.
pub struct Agent {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.shared.config.node)
            .field("cgroups", &self.cgroup_version())
            .finish()
    }
}

struct WorkerEntry {
    uid: String,
    desired: watch::Sender<Desired>,
    task: tokio::task::Id,
    /// What the worker's processes hold, for cleaning up after a worker that panicked or was
    /// aborted.
    held: Arc<std::sync::Mutex<Held>>,
}

/// What a worker task returns: instance name, uid, what ended it, and whether the instance
/// was deleted from the store.
type WorkerResult = (String, String, Desired, bool);

impl Agent {
    /// Detects cgroups (per `config.cgroups`), registers the metrics on `registry` and prepares
    /// the data directory.
    /// `api` is the agent's only way to the control plane: this node's instances, their
    /// status and events (in-process [`flotilla_store::StoreNode`], or over the API).
    pub fn new(
        config: AgentConfig,
        api: Arc<dyn NodeApi>,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<Self, AgentError> {
        if api.node() != config.node {
            return Err(AgentError::Config(format!(
                "the node interface is for node {:?}, the agent for {:?}",
                api.node(),
                config.node
            )));
        }
        if config.node.is_empty() || config.node.contains('/') || config.node.contains('\0') {
            return Err(AgentError::Config(format!(
                "invalid node name {:?}",
                config.node
            )));
        }
        let logs = config.data_dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| AgentError::io("create directory", logs, e))?;
        let scope = cgroup_scope_name(&config.node, &config.data_dir);
        let (cgroups, cgroup_note) = match cgroup::detect(config.cgroups, &scope) {
            Detected::Enabled(cg) => {
                tracing::info!(node = %config.node, version = cg.version(), %scope, "using cgroups for instance limits");
                (Some(cg), None)
            }
            Detected::Disabled(why) => {
                if config.cgroups != CgroupMode::Disabled {
                    tracing::warn!(node = %config.node, reason = %why, "running instances without cgroups: no resource limits, no OOM detection");
                }
                (None, Some(why))
            }
        };
        let metrics = metrics::Metrics::register(registry);
        Ok(Self {
            shared: Arc::new(Shared {
                ports: ports::PortAllocator::new(config.port_range.clone()),
                config,
                api,
                driver: Arc::new(driver::ProcessDriver),
                cgroups,
                cgroup_note,
                metrics,
            }),
        })
    }

    /// `"v1"`, `"v2"`, or `None` when running without cgroups.
    pub fn cgroup_version(&self) -> Option<&'static str> {
        self.shared.cgroups.as_ref().map(|c| c.version())
    }

    /// Runs until `shutdown`: sweeps leftovers of a previous run, then starts, supervises and
    /// stops this node's instances. On shutdown, stops every local instance gracefully (in
    /// parallel), sets them back to `Pending` and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let node = self.shared.config.node.clone();
        self.sweep().await;
        let reflector = Reflector::<Instance>::start(self.shared.api.instances(), &shutdown)
            .await
            .map_err(|source| AgentError::Store {
                op: "list",
                key: <Instance as flotilla_spec::Object>::PREFIX.to_string(),
                source,
            })?;
        let mut rx = reflector.subscribe();
        let mut map = reflector.current();
        let mut workers: HashMap<String, WorkerEntry> = HashMap::new();
        let mut tasks: JoinSet<WorkerResult> = JoinSet::new();
        let mut deleted_uids: HashSet<String> = HashSet::new();
        tracing::info!(node = %node, "agent running");
        self.reconcile(&map, &mut workers, &mut tasks, &deleted_uids);
        let mut result = Ok(());
        let mut log_sweep = tokio::time::interval(LOG_SWEEP);
        log_sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = log_sweep.tick() => self.expire_logs(&map),
                r = rx.changed() => {
                    if r.is_err() {
                        if !shutdown.is_cancelled() {
                            tracing::error!(node = %node, "instance reflector ended; stopping the agent");
                            result = Err(AgentError::Config("instance reflector ended (store closed?)".into()));
                        }
                        break;
                    }
                    map = rx.borrow_and_update().clone();
                    deleted_uids.retain(|uid| map.values().any(|i| &i.metadata.uid == uid));
                    self.reconcile(&map, &mut workers, &mut tasks, &deleted_uids);
                }
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    match done {
                        Ok((id, (name, uid, end, deleted))) => {
                            if workers.get(&name).is_some_and(|w| w.task == id) {
                                workers.remove(&name);
                            }
                            if end == Desired::Delete && deleted {
                                deleted_uids.insert(uid);
                            }
                        }
                        Err(e) => {
                            tracing::error!(node = %node, error = %e, "instance worker failed");
                            let id = e.id();
                            let failed: Vec<String> = workers
                                .iter()
                                .filter(|(_, w)| w.task == id)
                                .map(|(n, _)| n.clone())
                                .collect();
                            for name in failed {
                                if let Some(w) = workers.remove(&name) {
                                    // Before reconcile can start a new worker for it.
                                    self.clean_up_after_worker(&name, &w.held).await;
                                }
                            }
                        }
                    }
                    self.reconcile(&map, &mut workers, &mut tasks, &deleted_uids);
                }
            }
        }
        self.shutdown_workers(&mut workers, &mut tasks, &map).await;
        let _ = reflector.stop().await;
        if let Some(cg) = &self.shared.cgroups {
            cg.remove_scope();
        }
        tracing::info!(node = %node, "agent stopped");
        result
    }

    /// Starts workers for new instances and tells existing ones what is wanted now.
    fn reconcile(
        &self,
        map: &BTreeMap<String, Instance>,
        workers: &mut HashMap<String, WorkerEntry>,
        tasks: &mut JoinSet<WorkerResult>,
        deleted_uids: &HashSet<String>,
    ) {
        let node = &self.shared.config.node;
        for (name, inst) in map.iter().filter(|(_, i)| &i.spec.node == node) {
            let deleting = inst.metadata.deletion_timestamp.is_some();
            if let Some(w) = workers.get(name) {
                if w.uid != inst.metadata.uid {
                    raise(&w.desired, Desired::Gone);
                } else if deleting {
                    raise(&w.desired, Desired::Delete);
                }
                continue;
            }
            if deleted_uids.contains(&inst.metadata.uid) {
                continue;
            }
            if !deleting && inst.status.phase.is_terminal() {
                continue;
            }
            let initial = if deleting {
                Desired::Delete
            } else {
                Desired::Run
            };
            let (tx, rx) = watch::channel(initial);
            let shared = self.shared.clone();
            let inst = inst.clone();
            let (n, uid) = (name.clone(), inst.metadata.uid.clone());
            let held = Arc::new(std::sync::Mutex::new(Held::default()));
            let h = held.clone();
            let handle = tasks.spawn(async move {
                let (end, deleted) = worker::run(shared, inst, rx, h).await;
                (n, uid.clone(), end, deleted)
            });
            tracing::debug!(instance = %name, "worker started");
            workers.insert(
                name.clone(),
                WorkerEntry {
                    uid: inst_uid(map, name),
                    desired: tx,
                    task: handle.id(),
                    held,
                },
            );
        }
        for (name, w) in workers.iter() {
            let here = map.get(name).is_some_and(|i| &i.spec.node == node);
            if !here {
                raise(&w.desired, Desired::Gone);
            }
        }
    }

    async fn shutdown_workers(
        &self,
        workers: &mut HashMap<String, WorkerEntry>,
        tasks: &mut JoinSet<WorkerResult>,
        map: &BTreeMap<String, Instance>,
    ) {
        if tasks.is_empty() {
            return;
        }
        tracing::info!(node = %self.shared.config.node, instances = workers.len(), "stopping local instances");
        for w in workers.values() {
            raise(&w.desired, Desired::Shutdown);
        }
        let longest = map
            .values()
            .map(|i| i.spec.template.stop.grace_period.0)
            .max()
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + longest + SHUTDOWN_SLACK;
        while !tasks.is_empty() {
            match tokio::time::timeout_at(deadline, tasks.join_next_with_id()).await {
                Ok(Some(Ok((id, (name, ..))))) => {
                    if workers.get(&name).is_some_and(|w| w.task == id) {
                        workers.remove(&name);
                    }
                }
                Ok(Some(Err(e))) => {
                    // Its entry stays in `workers`: cleaned up below.
                    tracing::error!(error = %e, "instance worker failed during shutdown")
                }
                Ok(None) => {}
                Err(_) => {
                    tracing::error!(
                        left = tasks.len(),
                        "instance workers did not stop in time; aborting them"
                    );
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                }
            }
        }
        // Workers that panicked or were aborted (and workers replaced by a newer one whose
        // entry is gone, which finished normally) may have left processes behind.
        for (name, w) in workers.drain() {
            self.clean_up_after_worker(&name, &w.held).await;
        }
    }

    /// After a worker ended abnormally (panic, abort): kills its process group and
    /// everything in the instance's cgroup, removes the cgroup and releases its ports.
    async fn clean_up_after_worker(&self, name: &str, held: &std::sync::Mutex<Held>) {
        let held = std::mem::take(&mut *held.lock().unwrap_or_else(|p| p.into_inner()));
        tracing::warn!(instance = %name, pgid = held.pgid.map_or(-1, i64::from), "cleaning up after an abnormally ended worker");
        if let Some(pgid) = held.pgid {
            self.shared
                .driver
                .kill_group_until_empty(pgid, worker::KILL_TIMEOUT)
                .await;
        }
        if let Some(cg) = &self.shared.cgroups {
            cgroup::kill_until_empty(cg.as_ref(), name, worker::KILL_TIMEOUT).await;
            cgroup::remove_with_retry(cg.as_ref(), name, worker::KILL_TIMEOUT).await;
        }
        self.shared.ports.release(held.ports);
        if let Some(service) = &held.service {
            self.shared.metrics.forget_instance(service, name);
        }
    }

    /// Removes the log directories of instances that are gone, once `log_retention` passed
    /// since they were last written.
    fn expire_logs(&self, map: &BTreeMap<String, Instance>) {
        let keep: HashSet<String> = map.keys().cloned().collect();
        let config = &self.shared.config;
        for dir in logs::expired_log_dirs(
            &config.data_dir,
            &keep,
            config.log_retention,
            std::time::SystemTime::now(),
        ) {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "removed the logs of a gone instance")
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove old logs")
                }
            }
        }
    }

    /// Kills and removes every cgroup left under this node's scope by a previous run (which
    /// may have been SIGKILLed and so could not clean up).
    async fn sweep(&self) {
        let Some(cg) = &self.shared.cgroups else {
            return;
        };
        let names = match cg.instances() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list leftover cgroups");
                return;
            }
        };
        for name in names {
            let pids = cg.pids(&name).map(|p| p.len()).unwrap_or(0);
            tracing::info!(instance = %name, processes = pids, "sweeping leftover cgroup of a previous run");
            cgroup::kill_until_empty(cg.as_ref(), &name, Duration::from_secs(5)).await;
            cgroup::remove_with_retry(cg.as_ref(), &name, Duration::from_secs(5)).await;
        }
    }
}

fn inst_uid(map: &BTreeMap<String, Instance>, name: &str) -> String {
    map.get(name)
        .map(|i| i.metadata.uid.clone())
        .unwrap_or_default()
}

/// Moves a worker's desired state forward (never back: Gone > Shutdown > Delete > Run).
fn raise(tx: &watch::Sender<Desired>, to: Desired) {
    tx.send_if_modified(|d| {
        if to > *d {
            *d = to;
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_spec::{InstanceSpec, ObjectMeta, Phase};
    use flotilla_store::typed;

    #[test]
    fn scope_name_depends_on_node_and_data_dir() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let sa = cgroup_scope_name("local", a.path());
        assert!(sa.starts_with("flotilla-local-") && sa.len() == "flotilla-local-".len() + 8);
        std::fs::create_dir(a.path().join("x")).unwrap();
        assert_eq!(sa, cgroup_scope_name("local", &a.path().join("x/..")));
        assert_ne!(sa, cgroup_scope_name("local", b.path()));
        assert_ne!(sa, cgroup_scope_name("other", a.path()));
        // FNV-1a reference values.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::disallowed_macros)] // a skip notice where people see it
    async fn worker_panic_leaves_no_process_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn flotilla_store::Store> =
            Arc::new(flotilla_store::EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let node = format!("tpanic-{}", std::process::id());
        let config = AgentConfig::new(node.clone(), dir.path().join("data"));
        let mut registry = prometheus_client::registry::Registry::default();
        let api = Arc::new(flotilla_store::StoreNode::new(store.clone(), node.clone()));
        let agent = Agent::new(config, api, &mut registry).unwrap();
        let Some(cg) = agent.shared.cgroups.clone() else {
            eprintln!(
                "skipped: worker_panic_leaves_no_process_behind needs writable cgroups (run the suite as root)"
            );
            return;
        };
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: worker_panic_leaves_no_process_behind needs root");
            return;
        }
        worker::PANIC_AFTER_START
            .lock()
            .unwrap()
            .push("panicky".to_string());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(agent.run(shutdown.clone()));
        let inst = Instance {
            metadata: ObjectMeta::named("panicky"),
            spec: InstanceSpec {
                service: "svc".to_string(),
                node,
                spec_hash: "h".to_string(),
                template: serde_json::from_value(serde_json::json!({
                    "command": "sh", "args": ["-c", "sleep 300 & exec sleep 300"],
                    "stop": {"grace_period": "1s"}
                }))
                .unwrap(),
            },
            status: Default::default(),
        };
        typed::create(store.as_ref(), inst).await.unwrap();
        let get = || async {
            typed::get::<Instance>(store.as_ref(), "panicky")
                .await
                .unwrap()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let first = loop {
            if let Some(pid) = get().await.and_then(|i| i.status.pid) {
                break pid;
            }
            assert!(std::time::Instant::now() < deadline, "never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The worker panicked after the start; the agent cleans up and starts a new worker.
        let second = loop {
            let i = get().await.unwrap();
            if let Some(pid) = i.status.pid
                && pid != first
                && i.status.phase == Phase::Running
            {
                break pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never restarted: {i:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            process::group_members(first).is_empty(),
            "processes of the panicked worker survive"
        );
        let pids = cg.pids("panicky").unwrap();
        assert!(!pids.is_empty());
        for p in pids {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            if let Some((_, pgrp)) = process::parse_stat(&stat) {
                assert_eq!(
                    pgrp, second,
                    "process {p} in the cgroup is not of the new run"
                );
            }
        }
        shutdown.cancel();
        task.await.unwrap().unwrap();
        assert!(process::group_members(second).is_empty());
    }
}
