//! The service controller: watches services and instances, runs `plan`, executes the actions.
//!
//! Level-triggered: any change (or the periodic resync) reconciles every service against a
//! fresh list from the store, so a missed or coalesced notification loses nothing.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use flotilla_spec::{
    EventType, Instance, InstanceSpec, Node, Object, ObjectMeta, Phase, Revision, RevisionSpec,
    Service, annotations, now_rfc3339,
};
use flotilla_store::{Leases, Store, StoreError, typed};
use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use flotilla_store::reconcile::{Backoff, Reconcile, Requeue, Runtime, RuntimeConfig, Trigger};

use crate::cluster::{Cluster, Membership, Summary};
use crate::plan::{Action, plan};
use crate::rollout;
use crate::schedule::{Placed, Placement, Request, Snapshot};
use flotilla_store::events;

const SOURCE: &str = "controller";
/// Instance creates a placement pass has in flight at once (the store commits them together).
const WRITES_IN_FLIGHT: usize = 64;
/// Instances created in one pass beyond which their events are summarised.
const EVENTS_PER_BATCH: usize = 10;

/// The first few names and how many more: `a, b, c and 997 more`.
fn sample<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> String {
    const SHOWN: usize = 3;
    let total = names.len();
    let mut out = names.take(SHOWN).collect::<Vec<_>>().join(", ");
    if total > SHOWN {
        out.push_str(&format!(" and {} more", total - SHOWN));
    }
    out
}
/// Orphans, event pruning and metrics run this often.
const HOUSEKEEPING: Duration = EVENT_GC;
/// Reconcile everything at least this often, even without notifications.
const RESYNC: Duration = Duration::from_secs(10);
/// While a rollout is in progress, time passes matters (min_ready, progress deadline): look
/// this often.
const RESYNC_ROLLING: Duration = Duration::from_millis(250);
/// Prune old events this often.
const EVENT_GC: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

/// The controller's metrics, registered once and kept across the controllers of successive
/// leadership terms.
#[derive(Clone)]
pub struct Metrics {
    instances: Family<PhaseLabels, Gauge>,
    reconciles: Counter,
    reconcile_errors: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            instances: Family::default(),
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
        };
        registry.register(
            "flotilla_instances",
            "Instances by phase",
            metrics.instances.clone(),
        );
        registry.register(
            "flotilla_controller_reconciles",
            "Reconcile passes of the service controller",
            metrics.reconciles.clone(),
        );
        registry.register(
            "flotilla_controller_reconcile_errors",
            "Reconcile passes that hit an error (retried)",
            metrics.reconcile_errors.clone(),
        );
        metrics
    }
}

pub struct ServiceController {
    store: Arc<dyn Store>,
    /// The nodes' heartbeats (renewed through the API or by the in-process agent).
    leases: Arc<Leases>,
    /// Which nodes make up the cluster; instances bound elsewhere are orphans.
    membership: Membership,
    /// Held while instances are placed, so that two services placed at once cannot both
    /// take the last room on a node.
    placing: tokio::sync::Mutex<()>,
    /// Set once running: the node lifecycle triggers every service when nodes change.
    trigger: OnceLock<Trigger<ControllerKey>>,
    /// Singleton instances whose fencing was announced (by uid).
    fencing: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The nodes as placement last saw them (name, ready, cordoned, drained, taints).
    node_shape: std::sync::Mutex<Vec<NodeShape>>,
    /// Decoded nodes from the last full list (lists stay fresh; only the decoding of what did
    /// not change is saved). Not for instances: at 10,000 of them the copies cost more memory
    /// than the decoding costs time (store writes bound placement, see benchmarks.md).
    nodes: typed::DecodeCache<Node>,
    metrics: Metrics,
}

const PHASES: [Phase; 8] = [
    Phase::Pending,
    Phase::Starting,
    Phase::Running,
    Phase::Backoff,
    Phase::CrashLoopBackOff,
    Phase::Stopping,
    Phase::Succeeded,
    Phase::Failed,
];

impl ServiceController {
    /// `membership` says which nodes make up the cluster; `leases` are the heartbeats the API
    /// and the in-process agent renew.
    pub fn new(
        store: Arc<dyn Store>,
        leases: Arc<Leases>,
        membership: Membership,
        registry: &mut Registry,
    ) -> Self {
        Self::with_metrics(store, leases, membership, Metrics::register(registry))
    }

    /// The same with metrics registered already (a leader's controller, one per term).
    pub fn with_metrics(
        store: Arc<dyn Store>,
        leases: Arc<Leases>,
        membership: Membership,
        metrics: Metrics,
    ) -> Self {
        Self {
            store,
            leases,
            membership,
            placing: tokio::sync::Mutex::new(()),
            trigger: OnceLock::new(),
            node_shape: std::sync::Mutex::new(Vec::new()),
            fencing: std::sync::Mutex::new(std::collections::HashSet::new()),
            nodes: typed::DecodeCache::default(),
            metrics,
        }
    }

    /// Runs until `shutdown` is cancelled, on the shared reconcile runtime: one key per
    /// service, triggered by changes of the service and of its instances, plus a housekeeping
    /// key (orphans, event pruning, metrics); every key is resynced every [`RESYNC`].
    pub async fn run(self, shutdown: CancellationToken) {
        let me = Arc::new(self);
        let runtime = Runtime::new(
            "service-controller",
            me.clone(),
            RuntimeConfig {
                resync: RESYNC,
                concurrency: 4,
                backoff: Backoff {
                    initial: Duration::from_millis(250),
                    max: Duration::from_secs(10),
                },
            },
        );
        let _ = me.trigger.set(runtime.trigger());
        let mut followers = tokio::task::JoinSet::new();
        for prefix in [Service::PREFIX, Instance::PREFIX, Node::PREFIX] {
            followers.spawn(follow(
                me.clone(),
                prefix,
                runtime.trigger(),
                shutdown.clone(),
            ));
        }
        followers.spawn(follow_leases(
            me.leases.subscribe(),
            runtime.trigger(),
            shutdown.clone(),
        ));
        runtime.run(shutdown.clone()).await;
        shutdown.cancel();
        while followers.join_next().await.is_some() {}
    }

    /// Instances, revisions and status of one service, from fresh lists.
    async fn reconcile_one(&self, name: &str) -> Result<bool, StoreError> {
        let service = typed::get::<Service>(&*self.store, name).await?;
        // Instances are named `<service>-<suffix>` and revisions `<service>.<number>`: one range
        // read each, of this service's (and of services whose names extend it, filtered out).
        let (instances, _) =
            typed::list_named::<Instance>(&*self.store, &format!("{name}-")).await?;
        let (revisions, _) =
            typed::list_named::<Revision>(&*self.store, &format!("{name}.")).await?;
        let cluster = self.cluster().await?;
        // Orphans (unknown nodes) are the housekeeping key's; they never count here. The
        // instances of a lost node are deleted and replaced.
        let mut owned: Vec<&Instance> = Vec::new();
        let mut fencing = false;
        for i in instances.iter().filter(|i| i.spec.service == name) {
            if i.spec.node.is_empty() || cluster.is_ready(&i.spec.node) {
                owned.push(i);
            } else if let Some(why) = cluster.lost(&i.spec.node) {
                if i.spec.template.singleton {
                    let wait =
                        cluster.fence_wait(&i.spec.node, i.spec.template.stop.grace_period.0);
                    if !wait.is_zero() {
                        // Still counted: no second copy starts before this one is fenced.
                        owned.push(i);
                        fencing = true;
                        self.fencing_event(i, why, wait).await;
                        continue;
                    }
                }
                self.delete_lost(i, why).await?;
            }
        }
        let mut history: Vec<&Revision> = revisions
            .iter()
            .filter(|r| r.spec.service == name)
            .collect();
        history.sort_by_key(|r| r.spec.number);
        let busy = self
            .reconcile_service(name, service.as_ref(), &owned, &history, &cluster)
            .await?;
        Ok(busy || fencing)
    }

    /// Once per instance: a singleton's instance on a lost node waits to be fenced.
    async fn fencing_event(&self, i: &Instance, why: &str, wait: Duration) {
        if !flotilla_store::lock(&self.fencing).insert(i.metadata.uid.clone()) {
            return;
        }
        events::record(
            &*self.store,
            Service::KIND,
            &i.spec.service,
            EventType::Warning,
            "Fencing",
            format!(
                "instance {} of a singleton: node {} is not ready ({why}); it is replaced once that node has stopped it, in {}",
                i.metadata.name,
                i.spec.node,
                humantime::format_duration(Duration::from_millis(
                    u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
                ))
            ),
            SOURCE,
        )
        .await;
    }

    /// The cluster's members and their readiness, now.
    async fn cluster(&self) -> Result<Cluster, StoreError> {
        let (nodes, _) = self.nodes.list(&*self.store).await?;
        Ok(Cluster::build(&self.membership, &nodes, &self.leases))
    }

    /// Deletes an instance of a node that is not ready: its agent cannot stop it or confirm
    /// anything, so the object goes at once (the gateways stop routing to it) and the plan
    /// replaces it. If the node comes back, its agent stops the process, whose instance is gone.
    async fn delete_lost(&self, i: &Instance, why: &str) -> Result<(), StoreError> {
        let name = &i.metadata.name;
        let rv = i.metadata.resource_version;
        match typed::delete::<Instance>(&*self.store, name, Some(rv)).await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            // Changed meanwhile: looked at again on the next pass.
            Err(e) if e.is_conflict() => return Ok(()),
            Err(e) => return Err(e),
        }
        flotilla_store::lock(&self.fencing).remove(&i.metadata.uid);
        tracing::warn!(instance = %name, node = %i.spec.node, why, "deleted an instance of a lost node");
        events::record(
            &*self.store,
            Service::KIND,
            &i.spec.service,
            EventType::Warning,
            "NodeLost",
            format!(
                "deleted instance {name}: node {} is not ready ({why}); replacing it",
                i.spec.node
            ),
            SOURCE,
        )
        .await;
        Ok(())
    }

    /// Orphans, event pruning and the instances-by-phase gauge.
    async fn housekeeping(&self) -> Result<(), StoreError> {
        let (mut instances, _) = crate::cluster::summaries(&*self.store).await?;
        let cluster = self.cluster().await?;
        self.collect_orphans(&mut instances, &cluster).await?;
        self.count_phases(&instances);
        events::prune(&*self.store, events::MAX_EVENTS).await?;
        Ok(())
    }

    /// Sets each node's `Ready` condition from its lease (written only when it changes); when
    /// to look again: as a lease expires, at the latest at the resync.
    async fn node_readiness(&self) -> Result<Duration, StoreError> {
        let (nodes, _) = self.nodes.list(&*self.store).await?;
        self.leases
            .retain(|name| nodes.iter().any(|n| n.metadata.name == name));
        let stamp = now_rfc3339();
        let mut next = RESYNC;
        // What placement depends on: which nodes exist, are ready, cordoned, drained.
        let mut shape: Vec<NodeShape> = Vec::with_capacity(nodes.len());
        for node in nodes {
            let name = node.metadata.name.clone();
            let was_ready = node
                .status
                .condition(crate::nodes::READY)
                .is_some_and(|c| c.status);
            let r = crate::nodes::readiness(self.leases.state(&name), was_ready);
            if let Some(left) = r.recheck {
                next = next.min(left + Duration::from_millis(20));
            }
            shape.push((
                name.clone(),
                r.ready,
                node.spec.unschedulable,
                node.spec.drain,
                placement_fingerprint(&node),
            ));
            let mut conditions = node.status.conditions.clone();
            if !crate::nodes::set_ready(&mut conditions, r.ready, r.reason, &r.message, &stamp) {
                continue;
            }
            typed::modify::<Node>(&*self.store, &name, |n| {
                n.status.conditions = conditions.clone();
                true
            })
            .await?;
            let (kind, what) = if r.ready {
                (EventType::Normal, "NodeReady")
            } else {
                (EventType::Warning, "NodeNotReady")
            };
            tracing::info!(node = %name, ready = r.ready, reason = r.reason, "node readiness changed");
            events::record(
                &*self.store,
                Node::KIND,
                &name,
                kind,
                what,
                r.message,
                SOURCE,
            )
            .await;
        }
        let changed = {
            let mut last = flotilla_store::lock(&self.node_shape);
            let changed = *last != shape;
            *last = shape;
            changed
        };
        if changed {
            self.trigger_services().await;
        }
        Ok(next.max(Duration::from_millis(50)))
    }

    /// Every service is looked at again (nodes changed: lost instances, room for pending ones).
    async fn trigger_services(&self) {
        let Some(trigger) = self.trigger.get() else {
            return;
        };
        match typed::list::<Service>(&*self.store).await {
            Ok((services, _)) => {
                for s in services {
                    trigger.trigger(ControllerKey::Service(s.metadata.name));
                }
            }
            Err(error) => tracing::warn!(%error, "listing services after a node change"),
        }
    }

    fn count_phases(&self, instances: &[Summary]) {
        for phase in PHASES {
            let n = instances.iter().filter(|i| i.phase == phase).count();
            self.metrics
                .instances
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str().to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// One pass over every service; true while some rollout is in progress. Public for tests.
    pub async fn reconcile_all(&self) -> Result<bool, StoreError> {
        let mut first_error = None;
        let mut busy = false;
        for key in self.keys().await? {
            match self.reconcile(&key).await {
                Ok(Requeue::After(_)) => busy |= matches!(key, ControllerKey::Service(_)),
                Ok(Requeue::Done) => {}
                Err(error) => {
                    tracing::warn!(?key, %error, "reconcile failed");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(busy),
        }
    }

    /// Removes instances bound to a node that is not part of this cluster (a store copied from
    /// another machine, or `up` restarted under another `--node`): no agent will ever run or
    /// stop them, so they are deleted outright, like Kubernetes' pod garbage collector does
    /// for pods of deleted nodes, and dropped from `instances` so this pass replaces them.
    async fn collect_orphans(
        &self,
        instances: &mut Vec<Summary>,
        cluster: &Cluster,
    ) -> Result<(), StoreError> {
        let mut kept = Vec::with_capacity(instances.len());
        for i in std::mem::take(instances) {
            if i.node.is_empty() || cluster.is_member(&i.node) {
                kept.push(i);
                continue;
            }
            let name = i.name.clone();
            let rv = i.resource_version;
            match typed::delete::<Instance>(&*self.store, &name, Some(rv)).await {
                Ok(Some(_)) => {}
                // Gone already, or changed meanwhile (looked at again next pass).
                Ok(None) => continue,
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
            }
            tracing::info!(instance = %name, node = %i.node, "deleted instance bound to an unknown node");
            events::record(
                &*self.store,
                Service::KIND,
                &i.service,
                EventType::Warning,
                "Orphaned",
                format!(
                    "deleted instance {name}: bound to node {:?}, which is not part of this cluster (nodes: {})",
                    i.node,
                    cluster.names().collect::<Vec<_>>().join(", ")
                ),
                SOURCE,
            )
            .await;
        }
        *instances = kept;
        Ok(())
    }

    /// Revisions, instances and status of one service. True while its rollout is in progress.
    async fn reconcile_service(
        &self,
        name: &str,
        service: Option<&Service>,
        owned: &[&Instance],
        history: &[&Revision],
        cluster: &Cluster,
    ) -> Result<bool, StoreError> {
        let now = std::time::SystemTime::now();
        let Some(service) = service else {
            // Gone: stop its instances and forget its revisions.
            for action in plan(name, None, owned, now) {
                self.execute(action).await?;
            }
            for r in history {
                typed::delete::<Revision>(&*self.store, &r.metadata.name, None).await?;
            }
            return Ok(false);
        };

        let revision = self.ensure_revision(service, history).await?;
        let desired = rollout::desired(service);
        // Instances of a node being drained are planned as if they ran an older revision: they
        // are replaced like in a rollout, within max_surge and max_unavailable.
        let drained: Vec<Instance> = owned
            .iter()
            .filter(|i| cluster.is_draining(&i.spec.node))
            .map(|i| {
                let mut i = (*i).clone();
                i.spec.spec_hash.push_str("+drain");
                i
            })
            .collect();
        let view: Vec<&Instance> = owned
            .iter()
            .copied()
            .filter(|i| !cluster.is_draining(&i.spec.node))
            .chain(drained.iter())
            .collect();
        let mut creates = Vec::new();
        for action in plan(name, Some(&desired), &view, now) {
            match action {
                Action::Create { spec_hash, .. } => creates.push(spec_hash),
                Action::Delete { instance, .. }
                    if drained.iter().any(|d| d.metadata.name == instance) =>
                {
                    self.execute(Action::Delete {
                        instance,
                        reason: crate::plan::DeleteReason::Drained,
                    })
                    .await?
                }
                other => self.execute(other).await?,
            }
        }
        let pending: Vec<&Instance> = owned
            .iter()
            .copied()
            .filter(|i| i.spec.node.is_empty() && i.metadata.deletion_timestamp.is_none())
            .collect();
        // An instance waiting for the room it preempted is looked at again soon: the victims'
        // deletion wakes their own services, not this one.
        let mut preempting = false;
        if !creates.is_empty() || !pending.is_empty() {
            preempting = self.place(service, cluster, creates, &pending).await?;
        }

        let judgement = rollout::judge(service, revision, owned, now);
        if let Some(failure) = &judgement.failed {
            events::record(
                &*self.store,
                Service::KIND,
                name,
                EventType::Warning,
                "RolloutFailed",
                format!("revision {revision}: {}", failure.reason),
                SOURCE,
            )
            .await;
            if service.spec.deploy.auto_rollback {
                self.roll_back(service, revision, history, &failure.reason)
                    .await?;
            }
        }
        let mut completed = None;
        if judgement.completed {
            let phase = judgement
                .status
                .rollout
                .as_ref()
                .map(|r| r.phase.as_str())
                .unwrap_or_default();
            let (kind, reason) = if phase == "RolledBack" {
                (EventType::Warning, "RolledBack")
            } else {
                (EventType::Normal, "RolloutComplete")
            };
            let message = judgement
                .status
                .rollout
                .as_ref()
                .map(|r| r.message.clone())
                .unwrap_or_default();
            // Written with the status that says so.
            completed = Some(events::new(
                Service::KIND,
                name,
                kind,
                reason,
                message,
                SOURCE,
            ));
        }
        let busy = judgement
            .status
            .rollout
            .as_ref()
            .is_some_and(|r| r.phase == flotilla_spec::RolloutPhase::Progressing)
            || !desired.min_ready.is_zero()
                && judgement.status.available_replicas < desired.replicas
            || !drained.is_empty()
            || preempting;
        let generation = service.metadata.generation;
        let status = judgement.status;
        let report = |s: &mut Service| {
            // The spec may have moved on since our list; only report on what we looked at.
            if s.metadata.generation != generation || s.status == status {
                return false;
            }
            s.status = status.clone();
            true
        };
        typed::modify_with_event(&*self.store, name, Some(service.clone()), report, completed)
            .await?;
        Ok(busy)
    }

    /// The number of the revision for the service's current spec, recording a new one (and
    /// pruning the history) when the spec changed.
    async fn ensure_revision(
        &self,
        service: &Service,
        history: &[&Revision],
    ) -> Result<u64, StoreError> {
        let hash = rollout::target_hash(service);
        let latest = history.last();
        if let Some(r) = latest
            && r.spec.template_hash == hash
        {
            return Ok(r.spec.number);
        }
        let number = latest.map_or(1, |r| r.spec.number + 1);
        let name = &service.metadata.name;
        let token = service
            .metadata
            .annotations
            .get(annotations::RESTARTED_AT)
            .cloned();
        let cause = service
            .metadata
            .annotations
            .get(annotations::CHANGE_CAUSE)
            .cloned()
            .unwrap_or_else(|| "apply".to_string());
        let changes = match latest {
            Some(prev) => {
                let mut c = rollout::changes(&prev.spec.template, &service.spec);
                if c.is_empty() && prev.spec.restart_token != token {
                    c.push("restart".to_string());
                }
                c
            }
            None => Vec::new(),
        };
        let mut metadata = ObjectMeta::named(Revision::name_for(name, number));
        metadata
            .labels
            .insert("flotilla.dev/service".to_string(), name.clone());
        let revision = Revision {
            metadata,
            spec: RevisionSpec {
                service: name.clone(),
                number,
                template_hash: hash,
                template: service.spec.clone(),
                restart_token: token,
                cause: cause.clone(),
                changes: changes.clone(),
            },
        };
        let what = if changes.is_empty() {
            String::new()
        } else {
            format!(" (changed: {})", changes.join(", "))
        };
        let started = events::new(
            Service::KIND,
            name,
            EventType::Normal,
            "RolloutStarted",
            format!("revision {number} ({cause}){what}"),
            SOURCE,
        );
        // The revision and its event in one transaction; a revision already there (another
        // pass wrote it) was announced by that pass.
        match typed::write_with_event(&*self.store, revision, None, started).await {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
        // Keep the newest `revision_history`, and always the last good one.
        let keep = service.spec.deploy.revision_history as usize;
        let last_good = service.status.last_good_revision;
        let total = history.len() + 1;
        if total > keep {
            for r in history.iter().take(total - keep) {
                if r.spec.number != last_good {
                    typed::delete::<Revision>(&*self.store, &r.metadata.name, None).await?;
                }
            }
        }
        Ok(number)
    }

    /// Returns the service to its last good revision after a failed rollout.
    async fn roll_back(
        &self,
        service: &Service,
        failed_revision: u64,
        history: &[&Revision],
        reason: &str,
    ) -> Result<(), StoreError> {
        let good = service.status.last_good_revision;
        let Some(target) = history
            .iter()
            .find(|r| r.spec.number == good && good != failed_revision)
        else {
            tracing::warn!(service = %service.metadata.name, "rollout failed and there is no earlier good revision to return to");
            return Ok(());
        };
        let cause = format!(
            "automatic rollback from revision {failed_revision} to the spec of revision {good}: {reason}"
        );
        let template = target.spec.template.clone();
        let token = target.spec.restart_token.clone();
        let generation = service.metadata.generation;
        let written = typed::modify::<Service>(&*self.store, &service.metadata.name, |s| {
            if s.metadata.generation != generation {
                return false; // someone applied meanwhile: theirs wins
            }
            restore_template(s, &template, token.as_deref(), &cause);
            true
        })
        .await?;
        if written.is_some() {
            events::record(
                &*self.store,
                Service::KIND,
                &service.metadata.name,
                EventType::Warning,
                "RollingBack",
                format!("returning to revision {good}: {reason}"),
                SOURCE,
            )
            .await;
        }
        Ok(())
    }

    /// Places new instances of `service` (one per `creates` hash) and the `pending` ones that
    /// found no node before, one at a time against a fresh list of what every node runs.
    /// An instance that fits nowhere preempts lower-priority instances where that makes room
    /// ([`Self::make_room`]); else it is created (or stays) unbound and Pending, with the
    /// reasons in its status and a FailedScheduling event when they change. True when one
    /// waits for the room it preempted.
    async fn place(
        &self,
        service: &Service,
        cluster: &Cluster,
        creates: Vec<String>,
        pending: &[&Instance],
    ) -> Result<bool, StoreError> {
        let _placing = self.placing.lock().await;
        let mut preempting = false;
        let (all, _) = crate::cluster::summaries(&*self.store).await?;
        let placed: Vec<Placed> = all
            .iter()
            .filter_map(crate::cluster::placed)
            .filter(|p| cluster.is_ready(&p.node))
            .collect();
        let mut snapshot = Snapshot::new(cluster.nodes.clone(), &placed);
        let name = &service.metadata.name;
        for i in pending {
            let mut request = crate::cluster::request(name, &i.spec.template);
            request.instance = i.metadata.name.clone();
            // The room it holds is not in its own way.
            if let Some(n) = &i.status.nominated_node {
                snapshot.unbind(n, &i.metadata.name);
            }
            match snapshot.place(&request) {
                Placement::Node(node) => {
                    let bound = typed::modify::<Instance>(&*self.store, &i.metadata.name, |i| {
                        // Bound meanwhile, or deleted by this very pass (a scale-down).
                        if !i.spec.node.is_empty() || i.metadata.deletion_timestamp.is_some() {
                            return false;
                        }
                        i.spec.node = node.clone();
                        i.status.message = None;
                        i.status.nominated_node = None;
                        true
                    })
                    .await?;
                    // `modify` answers the current object also when it did not write.
                    let bound = bound
                        .filter(|b| b.spec.node == node && b.metadata.deletion_timestamp.is_none());
                    if let Some(b) = bound {
                        if let Some(p) = crate::cluster::placed(&Summary::of(&b)) {
                            snapshot.bind(&p);
                        }
                        self.scheduled_event(name, &b.metadata.name, &node, "assigned")
                            .await;
                    }
                }
                Placement::Unschedulable(why) => {
                    let (nominated, message) = match self
                        .make_room(&mut snapshot, &request, i.status.nominated_node.as_deref())
                        .await?
                    {
                        Some((node, message)) => (Some(node), message),
                        None => (None, why.to_string()),
                    };
                    preempting |= nominated.is_some();
                    if i.status.message.as_deref() == Some(message.as_str())
                        && i.status.nominated_node == nominated
                    {
                        continue;
                    }
                    let written = typed::modify::<Instance>(&*self.store, &i.metadata.name, |i| {
                        if !i.spec.node.is_empty() {
                            return false;
                        }
                        i.status.message = Some(message.clone());
                        i.status.nominated_node = nominated.clone();
                        true
                    })
                    .await?;
                    if written.is_some() && nominated.is_none() {
                        self.unschedulable_event(
                            name,
                            &format!("instance {}", i.metadata.name),
                            &message,
                        )
                        .await;
                    }
                }
            }
        }
        // Decided one after the other against the snapshot, written together: the store
        // commits concurrent writes in one transaction, so a scale-up of a thousand costs a
        // few commits rather than a thousand.
        let mut instances = Vec::with_capacity(creates.len());
        for spec_hash in creates {
            let instance_name = format!("{name}-{}", random_suffix());
            let mut request = crate::cluster::request(name, &service.spec);
            request.instance = instance_name.clone();
            let (node, message, nominated) = match snapshot.place(&request) {
                Placement::Node(node) => (node, None, None),
                Placement::Unschedulable(why) => {
                    match self.make_room(&mut snapshot, &request, None).await? {
                        Some((node, message)) => (String::new(), Some(message), Some(node)),
                        None => (String::new(), Some(why.to_string()), None),
                    }
                }
            };
            let mut metadata = ObjectMeta::named(&instance_name);
            metadata
                .labels
                .insert("flotilla.dev/service".to_string(), name.clone());
            let mut instance = Instance {
                metadata,
                spec: InstanceSpec {
                    service: name.clone(),
                    node,
                    spec_hash,
                    template: service.spec.clone(),
                },
                status: Default::default(),
            };
            preempting |= nominated.is_some();
            instance.status.message = message;
            instance.status.nominated_node = nominated;
            if let Some(p) = crate::cluster::placed(&Summary::of(&instance)) {
                snapshot.bind(&p);
            }
            instances.push(instance);
        }
        let mut created = Vec::with_capacity(instances.len());
        let mut writes = futures::stream::iter(
            instances
                .into_iter()
                .map(|i| typed::create(&*self.store, i)),
        )
        .buffered(WRITES_IN_FLIGHT);
        let mut failed = None;
        while let Some(result) = writes.next().await {
            match result {
                Ok(i) => created.push(i),
                Err(e) => failed = Some(e),
            }
        }
        drop(writes);
        self.created_events(name, &created).await;
        match failed {
            // What was created is in the store; the next pass sees it and makes the rest.
            Some(e) => Err(e),
            None => Ok(preempting),
        }
    }

    /// Events for instances just created: one each (Created, or FailedScheduling with the
    /// reason), or, beyond [`EVENTS_PER_BATCH`], one summary per kind so that a large scale-up
    /// does not push every other event out of the store's bounded history.
    async fn created_events(&self, service: &str, created: &[Instance]) {
        let (placed, unplaced): (Vec<&Instance>, Vec<&Instance>) =
            created.iter().partition(|i| !i.spec.node.is_empty());
        let unplaced: Vec<&Instance> = unplaced
            .into_iter()
            .filter(|i| i.status.nominated_node.is_none())
            .collect();
        if placed.len() + unplaced.len() <= EVENTS_PER_BATCH {
            let events = placed
                .iter()
                .map(|i| {
                    futures::future::Either::Left(self.scheduled_event(
                        service,
                        &i.metadata.name,
                        &i.spec.node,
                        "created",
                    ))
                })
                .chain(unplaced.iter().map(|i| {
                    let subject = format!("instance {}", i.metadata.name);
                    let why = i.status.message.as_deref().unwrap_or_default().to_string();
                    futures::future::Either::Right(async move {
                        self.unschedulable_event(service, &subject, &why).await
                    })
                }));
            futures::future::join_all(events).await;
            return;
        }
        if !placed.is_empty() {
            let nodes: std::collections::BTreeSet<&str> =
                placed.iter().map(|i| i.spec.node.as_str()).collect();
            let message = match &self.membership {
                Membership::Local(_) => format!(
                    "created {} instances ({})",
                    placed.len(),
                    sample(placed.iter().map(|i| i.metadata.name.as_str()))
                ),
                Membership::Fleet => format!(
                    "created {} instances ({}) on {} node(s)",
                    placed.len(),
                    sample(placed.iter().map(|i| i.metadata.name.as_str())),
                    nodes.len()
                ),
            };
            events::record(
                &*self.store,
                Service::KIND,
                service,
                EventType::Normal,
                "Created",
                message,
                SOURCE,
            )
            .await;
        }
        if let Some(first) = unplaced.first() {
            let subject = format!(
                "{} instances ({})",
                unplaced.len(),
                sample(unplaced.iter().map(|i| i.metadata.name.as_str()))
            );
            let why = first.status.message.as_deref().unwrap_or_default();
            self.unschedulable_event(service, &subject, why).await;
        }
    }

    /// For `request`, which fits nowhere: the node where room is being made for it, and what
    /// to say — the node it was nominated to while lower-priority instances there are still
    /// stopping, else a node where stopping lower-priority instances makes room (they are
    /// marked for deletion now, with a Preempted event on their service). The room is held
    /// in `snapshot` for it. `None`: no preemption can help.
    async fn make_room(
        &self,
        snapshot: &mut Snapshot,
        request: &Request,
        nominated: Option<&str>,
    ) -> Result<Option<(String, String)>, StoreError> {
        let hold = |snapshot: &mut Snapshot, node: &str| {
            snapshot.bind(&Placed {
                node: node.to_string(),
                service: request.service.clone(),
                resources: request.resources,
                host_ports: request.host_ports.clone(),
                instance: request.instance.clone(),
                priority: request.priority,
                terminating: false,
                nominated: true,
            });
        };
        if let Some(node) = nominated {
            let stopping = snapshot.making_room(node, request);
            if stopping > 0 {
                hold(snapshot, node);
                return Ok(Some((
                    node.to_string(),
                    format!(
                        "waiting for node {node}: {stopping} lower-priority instance(s) stopping to make room"
                    ),
                )));
            }
        }
        let Some(preemption) = snapshot.preempt(request) else {
            return Ok(None);
        };
        let node = preemption.node;
        for victim in &preemption.victims {
            let marked = self.mark_deleting(victim).await?;
            snapshot.mark_terminating(&node, victim);
            if let Some(v) = marked {
                tracing::info!(victim = %victim, node = %node, preemptor = %request.instance, "preempting");
                events::record(
                    &*self.store,
                    Service::KIND,
                    &v.spec.service,
                    EventType::Warning,
                    "Preempted",
                    format!(
                        "instance {victim} on node {node} (priority {}): stopped to make room for instance {} of service {} (priority {})",
                        v.spec.template.priority, request.instance, request.service, request.priority
                    ),
                    SOURCE,
                )
                .await;
            }
        }
        let message = format!(
            "waiting for node {node}: preempting {} lower-priority instance(s) ({})",
            preemption.victims.len(),
            preemption.victims.join(", ")
        );
        events::record(
            &*self.store,
            Service::KIND,
            &request.service,
            EventType::Normal,
            "Preempting",
            format!("instance {}: {message}", request.instance),
            SOURCE,
        )
        .await;
        hold(snapshot, &node);
        Ok(Some((node, message)))
    }

    async fn scheduled_event(&self, service: &str, instance: &str, node: &str, what: &str) {
        let message = match &self.membership {
            // One machine: where it runs says nothing.
            Membership::Local(_) => format!("{what} instance {instance}"),
            Membership::Fleet => format!("{what} instance {instance} to node {node}"),
        };
        let reason = if what == "created" {
            "Created"
        } else {
            "Scheduled"
        };
        events::record(
            &*self.store,
            Service::KIND,
            service,
            EventType::Normal,
            reason,
            message,
            SOURCE,
        )
        .await;
    }

    /// `subject`: `instance NAME`, or `N instances (…)` for a summary.
    async fn unschedulable_event(&self, service: &str, subject: &str, why: &str) {
        tracing::info!(service, subject, why, "not placed");
        events::record(
            &*self.store,
            Service::KIND,
            service,
            EventType::Warning,
            "FailedScheduling",
            format!("{subject}: {why}"),
            SOURCE,
        )
        .await;
    }

    /// Starts the deletion of `instance` (its agent stops it, then removes it); the instance
    /// if this call started it.
    async fn mark_deleting(&self, instance: &str) -> Result<Option<Instance>, StoreError> {
        typed::modify::<Instance>(&*self.store, instance, |i| {
            if i.metadata.deletion_timestamp.is_some() {
                return false;
            }
            i.metadata.deletion_timestamp = Some(now_rfc3339());
            true
        })
        .await
    }

    async fn execute(&self, action: Action) -> Result<(), StoreError> {
        match action {
            // Creates go through `place`.
            Action::Create { .. } => {}
            Action::Delete { instance, reason } => {
                let marked = self.mark_deleting(&instance).await?;
                if let Some(i) = marked {
                    events::record(
                        &*self.store,
                        Service::KIND,
                        &i.spec.service,
                        EventType::Normal,
                        "Deleting",
                        format!("deleting instance {instance}: {}", reason.as_str()),
                        SOURCE,
                    )
                    .await;
                }
            }
        }
        Ok(())
    }
}

/// Puts a revision's template back as the service's spec, keeping `replicas` and `deploy`
/// (which are not part of revisions), with the revision's restart token and a change cause.
pub fn restore_template(
    s: &mut Service,
    template: &flotilla_spec::ServiceSpec,
    restart_token: Option<&str>,
    cause: &str,
) {
    let replicas = s.spec.replicas;
    let deploy = s.spec.deploy.clone();
    s.spec = template.clone();
    s.spec.replicas = replicas;
    s.spec.deploy = deploy;
    s.metadata.generation += 1;
    let ann = &mut s.metadata.annotations;
    match restart_token {
        Some(t) => {
            ann.insert(annotations::RESTARTED_AT.to_string(), t.to_string());
        }
        None => {
            ann.remove(annotations::RESTARTED_AT);
        }
    }
    ann.insert(annotations::CHANGE_CAUSE.to_string(), cause.to_string());
}

/// Five characters of `[a-z0-9]`, as instance name suffixes.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A key of the service controller's runtime.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ControllerKey {
    Service(String),
    Housekeeping,
    /// Node readiness from the leases.
    Nodes,
}

#[async_trait::async_trait]
impl Reconcile for ServiceController {
    type Key = ControllerKey;
    type Error = StoreError;

    async fn reconcile(&self, key: &ControllerKey) -> Result<Requeue, StoreError> {
        self.metrics.reconciles.inc();
        let result = match key {
            ControllerKey::Service(name) => self.reconcile_one(name).await.map(|busy| {
                if busy {
                    Requeue::After(RESYNC_ROLLING)
                } else {
                    Requeue::Done
                }
            }),
            ControllerKey::Housekeeping => self
                .housekeeping()
                .await
                .map(|()| Requeue::After(HOUSEKEEPING)),
            ControllerKey::Nodes => self.node_readiness().await.map(Requeue::After),
        };
        if result.is_err() {
            self.metrics.reconcile_errors.inc();
        }
        result
    }

    async fn keys(&self) -> Result<Vec<ControllerKey>, StoreError> {
        let (services, _) = typed::list::<Service>(&*self.store).await?;
        let (instances, _) = typed::list::<Instance>(&*self.store).await?;
        let (revisions, _) = typed::list::<Revision>(&*self.store).await?;
        let names: BTreeSet<String> = services
            .into_iter()
            .map(|s| s.metadata.name)
            .chain(instances.into_iter().map(|i| i.spec.service))
            .chain(revisions.into_iter().map(|r| r.spec.service))
            .collect();
        Ok(names
            .into_iter()
            .map(ControllerKey::Service)
            .chain([ControllerKey::Housekeeping, ControllerKey::Nodes])
            .collect())
    }
}

/// Follows one prefix and triggers the services its changes concern. A watch that cannot
/// start or ends is started again after a pause, and then every key is triggered: changes
/// made meanwhile were not seen.
async fn follow(
    controller: Arc<ServiceController>,
    prefix: &'static str,
    trigger: Trigger<ControllerKey>,
    shutdown: CancellationToken,
) {
    let mut first = true;
    loop {
        let rev = controller.store.revision();
        match controller.store.watch(prefix, rev).await {
            Ok(mut watch) => {
                if !first {
                    match controller.keys().await {
                        Ok(keys) => keys.into_iter().for_each(|k| trigger.trigger(k)),
                        Err(error) => tracing::warn!(%error, "relisting after a watch failed"),
                    }
                }
                first = false;
                loop {
                    let ev = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        ev = watch.rx.recv() => ev,
                    };
                    match ev {
                        Some(Ok(_)) if prefix == Node::PREFIX => {
                            // A node registered or changed: its readiness is looked at.
                            trigger.trigger(ControllerKey::Nodes);
                        }
                        Some(Ok(ev)) => {
                            if let Some(name) = service_of(prefix, &ev) {
                                trigger.trigger(ControllerKey::Service(name));
                            }
                        }
                        Some(Err(error)) => {
                            tracing::debug!(prefix, %error, "controller watch ended; watching again");
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(error) => tracing::warn!(prefix, %error, "controller could not watch; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// What placement depends on of a node: name, ready, cordoned, drained, and a fingerprint
/// of its taints and pressure conditions.
type NodeShape = (String, bool, bool, bool, usize);

/// A fingerprint of a node's taints and pressure conditions, to see them change.
fn placement_fingerprint(node: &flotilla_spec::Node) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for t in &node.spec.taints {
        t.key.hash(&mut h);
        t.value.hash(&mut h);
    }
    for kind in [flotilla_spec::MEMORY_PRESSURE, flotilla_spec::DISK_PRESSURE] {
        node.status
            .condition(kind)
            .is_some_and(|c| c.status)
            .hash(&mut h);
    }
    h.finish() as usize
}

/// Triggers the node lifecycle each time a node's lease comes alive (first heartbeat, or one
/// after an expiry); expiries are found by the lifecycle's own requeue.
async fn follow_leases(
    mut revived: tokio::sync::watch::Receiver<u64>,
    trigger: Trigger<ControllerKey>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = revived.changed() => {
                if changed.is_err() {
                    return;
                }
                trigger.trigger(ControllerKey::Nodes);
            }
        }
    }
}

/// The service a change concerns: the service itself, or an instance's service.
fn service_of(prefix: &str, ev: &flotilla_store::WatchEvent) -> Option<String> {
    let kv = match ev {
        flotilla_store::WatchEvent::Put { kv, .. } => kv,
        flotilla_store::WatchEvent::Delete { prev, key, .. } => match prev {
            Some(kv) => kv,
            None if prefix == Service::PREFIX => {
                return key.strip_prefix(prefix).map(str::to_string);
            }
            None => return None,
        },
    };
    if prefix == Service::PREFIX {
        return kv.key.strip_prefix(prefix).map(str::to_string);
    }
    typed::decode::<Instance>(kv).ok().map(|i| i.spec.service)
}
