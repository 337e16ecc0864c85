//! The agent's control loop on the shared reconcile runtime: one key per instance of this
//! node (start a worker, or tell the running one what is wanted now) and a housekeeping key
//! (log expiry). Keys are triggered by the instance reflector's publications (only the
//! instances that changed), by a worker's end, and by the runtime's resync.
//!
//! Workers are long-lived tasks owned here (a [`TaskTracker`]): each is watched by a small
//! task that, when the worker ends — normally, by a panic or aborted at shutdown — cleans up
//! what it may have left behind, forgets it and triggers its instance again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_spec::Instance;
use flotilla_store::lock;
use flotilla_store::reconcile::{Reconcile, Requeue, Trigger};
use flotilla_store::typed::ObjectMap;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::worker::{self, Desired, Held, Shared};
use crate::{LOG_SWEEP, SHUTDOWN_SLACK, cgroup, logs, raise};

/// What the agent reconciles.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum AgentKey {
    /// One instance, by name.
    Instance(String),
    /// Expiry of the logs of gone instances.
    Logs,
    /// Renewal of the node's lease (its heartbeat).
    Heartbeat,
}

struct WorkerEntry {
    uid: String,
    /// Tells the watcher of a worker that was replaced from the current one.
    id: u64,
    desired: watch::Sender<Desired>,
    abort: AbortHandle,
}

#[derive(Default)]
struct State {
    workers: HashMap<String, WorkerEntry>,
    /// Instances whose deletion this agent finished, by name → uid, until the reflector no
    /// longer shows them (so that a late view of the deleted instance starts nothing).
    deleted: HashMap<String, String>,
}

/// The agent's reconciler: what runs on this node, against what the store wants.
pub(crate) struct Supervisor {
    shared: Arc<Shared>,
    instances: watch::Receiver<ObjectMap<Instance>>,
    state: Arc<Mutex<State>>,
    workers: TaskTracker,
    trigger: OnceLock<Trigger<AgentKey>>,
    /// Singletons were last found fenced (see [`Shared::fenced`]).
    fenced: std::sync::atomic::AtomicBool,
    next_id: AtomicU64,
}

impl Supervisor {
    pub(crate) fn new(
        shared: Arc<Shared>,
        instances: watch::Receiver<ObjectMap<Instance>>,
    ) -> Self {
        Self {
            shared,
            instances,
            state: Arc::default(),
            workers: TaskTracker::new(),
            trigger: OnceLock::new(),
            fenced: std::sync::atomic::AtomicBool::new(false),
            next_id: AtomicU64::new(0),
        }
    }

    /// Where a worker's end is reported (the runtime's trigger); set once, before it runs.
    pub(crate) fn set_trigger(&self, trigger: Trigger<AgentKey>) {
        let _ = self.trigger.set(trigger);
    }

    fn reconcile_instance(&self, name: &str) {
        let node = &self.shared.config.node;
        let inst = self
            .instances
            .borrow()
            .get(name)
            .filter(|i| &i.spec.node == node)
            .cloned();
        let mut state = lock(&self.state);
        if let Some(uid) = state.deleted.get(name) {
            if inst.as_ref().is_some_and(|i| &i.metadata.uid == uid) {
                return;
            }
            state.deleted.remove(name);
        }
        let Some(inst) = inst else {
            if let Some(w) = state.workers.get(name) {
                raise(&w.desired, Desired::Gone);
            }
            return;
        };
        let deleting = inst.metadata.deletion_timestamp.is_some();
        if let Some(w) = state.workers.get(name) {
            if w.uid != inst.metadata.uid {
                // Replaced by a new instance of the same name: the old worker goes first, and
                // its end triggers this key again.
                raise(&w.desired, Desired::Gone);
            } else if deleting {
                raise(&w.desired, Desired::Delete);
            }
            return;
        }
        if !deleting && inst.status.phase.is_terminal() {
            return;
        }
        if inst.spec.template.singleton && !deleting && self.shared.fenced() {
            // Cut off from the control plane: another node may run it soon.
            return;
        }
        let entry = self.start_worker(name, inst, deleting);
        state.workers.insert(name.to_string(), entry);
    }

    fn start_worker(&self, name: &str, inst: Instance, deleting: bool) -> WorkerEntry {
        let initial = if deleting {
            Desired::Delete
        } else {
            Desired::Run
        };
        let (tx, rx) = watch::channel(initial);
        let held = Arc::new(Mutex::new(Held::default()));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let uid = inst.metadata.uid.clone();
        let worker = tokio::spawn(worker::run(self.shared.clone(), inst, rx, held.clone()));
        let abort = worker.abort_handle();
        let watcher = WorkerWatcher {
            name: name.to_string(),
            uid: uid.clone(),
            id,
            held,
            shared: self.shared.clone(),
            state: self.state.clone(),
            trigger: self.trigger.get().cloned(),
        };
        self.workers
            .spawn(async move { watcher.watch(worker).await });
        tracing::debug!(instance = %name, "worker started");
        WorkerEntry {
            uid,
            id,
            desired: tx,
            abort,
        }
    }

    /// Renews the node's lease; when to renew it next (sooner after a failure, so that one
    /// lost write does not let the lease expire). A renewal gets a sixth of the lease: over a
    /// link that drops packets (no reset, no answer) a request would otherwise hang for the
    /// client's whole timeout, and the fencing check after it would come too late.
    async fn heartbeat(&self) -> Duration {
        let lease = self.shared.config.lease_duration;
        let seconds = u32::try_from(lease.as_secs().max(1)).unwrap_or(u32::MAX);
        let sent = std::time::Instant::now();
        let attempt = tokio::time::timeout(lease / 6, self.shared.api.renew_lease(seconds)).await;
        let next = match attempt {
            Ok(Ok(())) => {
                *lock(&self.shared.renewed) = Some(sent);
                lease / 3
            }
            Ok(Err(error)) => {
                tracing::warn!(node = %self.shared.config.node, error = %flotilla_store::error_chain(&error), "could not renew the node's lease");
                (lease / 12).max(Duration::from_millis(100))
            }
            Err(_) => {
                tracing::warn!(node = %self.shared.config.node, timeout = ?(lease / 6), "renewing the node's lease timed out");
                (lease / 12).max(Duration::from_millis(100))
            }
        };
        let fenced = self.shared.fenced();
        if fenced != self.fenced.swap(fenced, Ordering::SeqCst) {
            self.fence_changed(fenced);
        }
        next
    }

    /// Singletons stop when the lease is about to expire unrenewed (the control plane will
    /// replace them elsewhere once it has expired for longer) and may start again once a
    /// renewal gets through.
    fn fence_changed(&self, fenced: bool) {
        let node = &self.shared.config.node;
        let singletons: Vec<String> = self
            .instances
            .borrow()
            .iter()
            .filter(|(_, i)| i.spec.template.singleton && &i.spec.node == node)
            .map(|(n, _)| n.clone())
            .collect();
        if fenced {
            tracing::warn!(node = %node, instances = singletons.len(), "lease about to expire without a renewal: stopping singleton instances");
            let state = lock(&self.state);
            for name in &singletons {
                if let Some(w) = state.workers.get(name) {
                    raise(&w.desired, Desired::Gone);
                }
            }
        } else {
            tracing::info!(node = %node, "lease renewed again: singleton instances may run");
            if let Some(trigger) = self.trigger.get() {
                for name in singletons {
                    trigger.trigger(AgentKey::Instance(name));
                }
            }
        }
    }

    /// Removes the log directories of instances that are gone, once `log_retention` passed
    /// since they were last written.
    fn expire_logs(&self) {
        let keep: HashSet<String> = self.instances.borrow().keys().cloned().collect();
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

    /// Stops every worker gracefully (in parallel) and waits for them, within the longest
    /// grace period plus [`SHUTDOWN_SLACK`]; workers still running then are aborted and
    /// cleaned up after. Called once the runtime stopped, so nothing starts a worker anymore.
    /// With `detach`, workers stop supervising and leave their processes running instead.
    pub(crate) async fn shutdown(&self, detach: bool) {
        let to = if detach {
            Desired::Detach
        } else {
            Desired::Shutdown
        };
        let running = {
            let state = lock(&self.state);
            for w in state.workers.values() {
                raise(&w.desired, to);
            }
            state.workers.len()
        };
        self.workers.close();
        if running == 0 {
            self.workers.wait().await;
            return;
        }
        if detach {
            tracing::info!(node = %self.shared.config.node, instances = running, "leaving local instances running");
        } else {
            tracing::info!(node = %self.shared.config.node, instances = running, "stopping local instances");
        }
        let longest = self
            .instances
            .borrow()
            .values()
            .map(|i| i.spec.template.stop.grace_period.0)
            .max()
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + longest + SHUTDOWN_SLACK;
        if tokio::time::timeout_at(deadline, self.workers.wait())
            .await
            .is_err()
        {
            {
                let state = lock(&self.state);
                tracing::error!(
                    left = state.workers.len(),
                    "instance workers did not stop in time; aborting them"
                );
                for w in state.workers.values() {
                    w.abort.abort();
                }
            }
            // Each watcher cleans up after its aborted worker.
            self.workers.wait().await;
        }
    }
}

/// Watches one worker until it ends, then settles its account.
struct WorkerWatcher {
    name: String,
    uid: String,
    id: u64,
    /// What the worker's processes hold, for cleaning up after a worker that panicked or was
    /// aborted.
    held: Arc<Mutex<Held>>,
    shared: Arc<Shared>,
    state: Arc<Mutex<State>>,
    trigger: Option<Trigger<AgentKey>>,
}

impl WorkerWatcher {
    async fn watch(self, worker: tokio::task::JoinHandle<(Desired, bool)>) {
        match worker.await {
            Ok((end, deleted)) => {
                let mut state = lock(&self.state);
                self.forget(&mut state);
                if end == Desired::Delete && deleted {
                    state.deleted.insert(self.name.clone(), self.uid.clone());
                }
            }
            Err(e) => {
                tracing::error!(instance = %self.name, error = %e, "instance worker failed");
                // Before the entry goes, so that no new worker starts for it meanwhile.
                self.clean_up().await;
                self.forget(&mut lock(&self.state));
            }
        }
        if let Some(trigger) = &self.trigger {
            trigger.trigger(AgentKey::Instance(self.name.clone()));
        }
    }

    /// Removes the worker's entry, unless a newer worker has it.
    fn forget(&self, state: &mut State) {
        if state
            .workers
            .get(&self.name)
            .is_some_and(|w| w.id == self.id)
        {
            state.workers.remove(&self.name);
        }
    }

    /// After a worker ended abnormally (panic, abort): kills its process group and
    /// everything in the instance's cgroup, removes the cgroup and releases its ports.
    async fn clean_up(&self) {
        let held = std::mem::take(&mut *lock(&self.held));
        let name = &self.name;
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
}

#[async_trait]
impl Reconcile for Supervisor {
    type Key = AgentKey;
    type Error = std::convert::Infallible;

    async fn reconcile(&self, key: &AgentKey) -> Result<Requeue, Self::Error> {
        match key {
            AgentKey::Instance(name) => {
                self.reconcile_instance(name);
                Ok(Requeue::Done)
            }
            AgentKey::Logs => {
                self.expire_logs();
                Ok(Requeue::After(LOG_SWEEP))
            }
            AgentKey::Heartbeat => Ok(Requeue::After(self.heartbeat().await)),
        }
    }

    async fn keys(&self) -> Result<Vec<AgentKey>, Self::Error> {
        let node = &self.shared.config.node;
        let mut names: HashSet<String> = self
            .instances
            .borrow()
            .iter()
            .filter(|(_, i)| &i.spec.node == node)
            .map(|(n, _)| n.clone())
            .collect();
        names.extend(lock(&self.state).workers.keys().cloned());
        Ok(names
            .into_iter()
            .map(AgentKey::Instance)
            .chain([AgentKey::Logs, AgentKey::Heartbeat])
            .collect())
    }
}

/// Triggers the instances that changed in each publication of the reflector, until `stop`.
/// When the reflector ends (the store was closed) it cancels `stop` and answers false.
pub(crate) async fn follow(
    mut instances: watch::Receiver<ObjectMap<Instance>>,
    trigger: Trigger<AgentKey>,
    stop: CancellationToken,
) -> bool {
    let mut seen: HashMap<String, u64> = versions(&instances.borrow_and_update());
    loop {
        tokio::select! {
            () = stop.cancelled() => return true,
            changed = instances.changed() => {
                if changed.is_err() {
                    stop.cancel();
                    return false;
                }
            }
        }
        let now = versions(&instances.borrow_and_update());
        for name in changed(&seen, &now) {
            trigger.trigger(AgentKey::Instance(name.clone()));
        }
        seen = now;
    }
}

/// Names added, changed (another resource version) or removed between two views.
fn changed<'a>(
    seen: &'a HashMap<String, u64>,
    now: &'a HashMap<String, u64>,
) -> impl Iterator<Item = &'a String> {
    let added_or_changed = now
        .iter()
        .filter(|(name, version)| seen.get(*name) != Some(*version))
        .map(|(name, _)| name);
    let removed = seen.keys().filter(|name| !now.contains_key(*name));
    added_or_changed.chain(removed)
}

fn versions(map: &ObjectMap<Instance>) -> HashMap<String, u64> {
    map.iter()
        .map(|(n, i)| (n.clone(), i.metadata.resource_version))
        .collect()
}

/// The runtime's resync for the agent: every instance is looked at again this often.
pub(crate) const RESYNC: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_instances_that_changed_are_triggered() {
        let view = |pairs: &[(&str, u64)]| -> HashMap<String, u64> {
            pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
        };
        let seen = view(&[("a", 1), ("b", 2), ("c", 3)]);
        let now = view(&[("a", 1), ("b", 5), ("d", 4)]);
        let mut got: Vec<&String> = changed(&seen, &now).collect();
        got.sort();
        assert_eq!(got, ["b", "c", "d"]);
        assert_eq!(changed(&now, &now).count(), 0);
    }
}
