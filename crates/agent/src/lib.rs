//! flotilla's node agent (the kubelet's job): runs the instances bound to this node as real
//! processes — own process group, cgroup limits (v1 or v2), rlimits, captured and rotated logs
//! — probes them, restarts them with backoff, reports their status and usage, and stops them
//! gracefully with nothing left behind.
//!
//! Structure: [`Agent::run`] follows the node's Instances through a store reflector and, on the
//! shared reconcile runtime (`supervisor`), owns one worker task per instance (`worker`); the decision logic is pure and unit-tested
//! ([`backoff`], [`probe::ProbeState`], exit classification), the OS-facing parts sit in
//! [`cgroup`] (file-level, testable on a fake tree), `process` (spawn, signals) and [`logs`].

pub mod backoff;
pub mod cgroup;
pub mod driver;
mod error;
pub mod logs;
mod metrics;
pub mod ports;
pub mod pressure;
pub mod probe;
mod process;
pub mod registration;
pub mod shim;
mod supervisor;
mod transition;
mod worker;

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_spec::Instance;
use flotilla_store::NodeApi;
use flotilla_store::reconcile::{Backoff, Runtime, RuntimeConfig};
use flotilla_store::typed::Reflector;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use cgroup::CgroupMode;
pub use error::AgentError;

use crate::cgroup::Detected;
use crate::supervisor::Supervisor;
use crate::worker::{Desired, Shared};

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
    /// Labels of this node, added to the ones the agent knows (hostname, arch, os).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Held back from instances: allocatable = capacity − reserve.
    pub reserve: flotilla_spec::NodeResources,
    /// The node's lease lasts this long; it is renewed every third of it. A node whose lease
    /// expired is NotReady.
    pub lease_duration: Duration,
    /// Below these the node reports memory or disk pressure (and takes no new instance).
    pub pressure: pressure::Thresholds,
    /// How often pressure is sampled.
    pub pressure_interval: Duration,
    /// The program that runs a workload's shim (see [`shim`]): the agent's own binary,
    /// `/proc/self/exe`, whose `main` calls [`shim::main_if_shim`] first. With `None`
    /// workloads are the agent's direct children and die with it.
    pub shim: Option<PathBuf>,
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
            labels: std::collections::BTreeMap::new(),
            reserve: flotilla_spec::NodeResources::default(),
            lease_duration: flotilla_store::DEFAULT_LEASE,
            pressure: pressure::Thresholds::default(),
            pressure_interval: Duration::from_secs(10),
            port_range: ports::default_port_range(ports::ephemeral_range()),
            drain: None,
            shim: None,
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
    /// [`Agent::register`] was called.
    registered: bool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.shared.config.node)
            .field("cgroups", &self.cgroup_version())
            .finish()
    }
}

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
        let driver: Arc<dyn driver::Driver> = match &config.shim {
            Some(program) => Arc::new(driver::ShimDriver {
                program: program.clone(),
            }),
            None => Arc::new(driver::ProcessDriver),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                ports: ports::PortAllocator::new(config.port_range.clone()),
                config,
                api,
                driver,
                cgroups,
                cgroup_note,
                metrics,
                renewed: std::sync::Mutex::new(None),
                found: std::sync::Mutex::default(),
                started: std::time::Instant::now(),
                detach: std::sync::atomic::AtomicBool::new(false),
            }),
            registered: false,
        })
    }

    /// Registers this node (capacity, allocatable, labels, address, and its first lease):
    /// what `run` does first unless this was called. `flotilla up` calls it before its
    /// controller starts, so that the first placements find the node.
    pub async fn register(&mut self) -> Result<(), AgentError> {
        let node = &self.shared.config.node;
        let api = &self.shared.api;
        let sent = std::time::Instant::now();
        api.register(registration::registration(&self.shared.config))
            .await
            .map_err(|e| AgentError::Config(format!("registering node {node}: {e}")))?;
        *flotilla_store::lock(&self.shared.renewed) = Some(sent);
        self.registered = true;
        Ok(())
    }

    /// A handle that, set before the shutdown token is cancelled, makes [`Agent::run`] leave
    /// every workload running for the next agent to re-adopt (what SIGTERM does: a restart
    /// or an upgrade of the agent) instead of stopping them (Ctrl-C, `flotilla down`). Only
    /// when workloads run under shims; otherwise they stop either way.
    pub fn detach_on_exit(&self) -> DetachOnExit {
        DetachOnExit(self.shared.clone())
    }

    /// `"v1"`, `"v2"`, or `None` when running without cgroups.
    pub fn cgroup_version(&self) -> Option<&'static str> {
        self.shared.cgroups.as_ref().map(|c| c.version())
    }

    /// Runs until `shutdown`: sweeps leftovers of a previous run, then starts, supervises and
    /// stops this node's instances, on the shared reconcile runtime (see [`supervisor`]). On
    /// shutdown, stops every local instance gracefully (in parallel), sets them back to
    /// `Pending` and returns.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let node = self.shared.config.node.clone();
        let found = shim::scan(&self.shared.config.data_dir);
        if !found.is_empty() {
            let running = found
                .values()
                .filter(|f| matches!(f, shim::Found::Alive { .. }))
                .count();
            tracing::info!(node = %node, running, ended = found.len() - running, "found the instances of an earlier agent");
        }
        // Every cgroup of what was found stays until its worker is done with it: a running
        // process's is re-adopted, an ended one's holds the OOM count its end is judged by.
        let keep: std::collections::HashSet<String> = found.keys().cloned().collect();
        *flotilla_store::lock(&self.shared.found) = found.into_iter().collect();
        self.sweep(&keep).await;
        let reflector = Reflector::<Instance>::start(self.shared.api.instances(), &shutdown)
            .await
            .map_err(|source| AgentError::Store {
                op: "list",
                key: <Instance as flotilla_spec::Object>::PREFIX.to_string(),
                source,
            })?;
        let snapshot = reflector.subscribe().borrow().clone();
        self.forget_unknown(&snapshot).await;
        if !self.registered {
            self.register().await?;
        }
        let supervisor = Arc::new(Supervisor::new(self.shared.clone(), reflector.subscribe()));
        let runtime = Runtime::new(
            "agent",
            supervisor.clone(),
            RuntimeConfig {
                resync: supervisor::RESYNC,
                concurrency: 4,
                backoff: Backoff::default(),
            },
        );
        supervisor.set_trigger(runtime.trigger());
        let stop = shutdown.child_token();
        let follower = tokio::spawn(supervisor::follow(
            reflector.subscribe(),
            runtime.trigger(),
            stop.clone(),
        ));
        let pressure = tokio::spawn(pressure::watch(
            self.shared.api.clone(),
            self.shared.config.data_dir.clone(),
            self.shared.config.pressure,
            self.shared.config.pressure_interval,
            stop.clone(),
        ));
        tracing::info!(node = %node, "agent running");
        runtime.run(stop.clone()).await;
        stop.cancel();
        let _ = pressure.await;
        let followed = follower.await.unwrap_or(false);
        let result = if followed || shutdown.is_cancelled() {
            Ok(())
        } else {
            tracing::error!(node = %node, "instance reflector ended; stopping the agent");
            Err(AgentError::Config(
                "instance reflector ended (store closed?)".into(),
            ))
        };
        let detach = self.shared.detach.load(std::sync::atomic::Ordering::SeqCst)
            && self.shared.driver.survives_agent();
        supervisor.shutdown(detach).await;
        let _ = reflector.stop().await;
        if detach {
            tracing::info!(node = %node, "agent stopped; its workloads keep running");
        } else {
            if let Some(cg) = &self.shared.cgroups {
                cg.remove_scope();
            }
            tracing::info!(node = %node, "agent stopped");
        }
        result
    }

    /// Kills what an earlier agent left running for instances the store no longer has on
    /// this node (deleted or moved meanwhile), and forgets them.
    async fn forget_unknown(&self, instances: &flotilla_store::typed::ObjectMap<Instance>) {
        let node = &self.shared.config.node;
        let unknown: Vec<(String, shim::Found)> = {
            let mut found = flotilla_store::lock(&self.shared.found);
            let names: Vec<String> = found
                .iter()
                .filter(|(name, f)| {
                    !instances.get(*name).is_some_and(|i| {
                        &i.spec.node == node && f.uid().is_none_or(|u| u == i.metadata.uid)
                    })
                })
                .map(|(n, _)| n.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|n| found.remove(&n).map(|f| (n, f)))
                .collect()
        };
        for (name, f) in unknown {
            if let Some(pid) = f.live_pid() {
                tracing::info!(instance = %name, pid, "stopping a process of an instance that is no longer on this node");
                self.shared
                    .driver
                    .kill_group_until_empty(pid, Duration::from_secs(5))
                    .await;
            }
            if let Some(cg) = &self.shared.cgroups {
                cgroup::kill_until_empty(cg.as_ref(), &name, Duration::from_secs(5)).await;
                cgroup::remove_with_retry(cg.as_ref(), &name, Duration::from_secs(5)).await;
            }
            let _ = std::fs::remove_dir_all(shim::run_dir(&self.shared.config.data_dir, &name));
        }
    }

    /// Kills and removes every cgroup left under this node's scope by a previous run (which
    /// may have been SIGKILLed and so could not clean up), except those of the processes
    /// that are re-adopted (`keep`).
    async fn sweep(&self, keep: &std::collections::HashSet<String>) {
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
        for name in names.into_iter().filter(|n| !keep.contains(n)) {
            let pids = cg.pids(&name).map(|p| p.len()).unwrap_or(0);
            tracing::info!(instance = %name, processes = pids, "sweeping leftover cgroup of a previous run");
            cgroup::kill_until_empty(cg.as_ref(), &name, Duration::from_secs(5)).await;
            cgroup::remove_with_retry(cg.as_ref(), &name, Duration::from_secs(5)).await;
        }
    }
}

/// See [`Agent::detach_on_exit`].
#[derive(Clone)]
pub struct DetachOnExit(Arc<Shared>);

impl DetachOnExit {
    /// Whether the workloads will be (were) left running at exit.
    pub fn detaching(&self) -> bool {
        self.0.detach.load(std::sync::atomic::Ordering::SeqCst) && self.0.driver.survives_agent()
    }

    /// At exit, leave the workloads running (or, with `false`, stop them).
    pub fn set(&self, detach: bool) {
        self.0
            .detach
            .store(detach, std::sync::atomic::Ordering::SeqCst);
    }
}

impl std::fmt::Debug for DetachOnExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DetachOnExit")
    }
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
        let api = Arc::new(flotilla_store::StoreNode::new(
            store.clone(),
            Default::default(),
            node.clone(),
        ));
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
