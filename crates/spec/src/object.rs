//! The stored object model: every object has Kubernetes-shaped metadata, a spec and a status.
//!
//! Objects are stored as JSON. `resource_version` is never stored: it is the store's
//! `mod_revision` of the key, filled in on every read (as Kubernetes does over etcd).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::service::ServiceSpec;

/// Metadata shared by every object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Store revision of the last write of this object (0 = not yet stored).
    #[serde(default)]
    pub resource_version: u64,
    /// Bumped on every change of `spec`.
    #[serde(default)]
    pub generation: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Set when graceful deletion has begun (RFC 3339); the owner finishes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
}

impl ObjectMeta {
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// Implemented by every stored kind.
pub trait Object: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// Kind name, as in the API (`Service`).
    const KIND: &'static str;
    /// Store key prefix, ending in `/`; the key of an object is `PREFIX + name`.
    const PREFIX: &'static str;
    /// Plural name in API paths (`services`).
    const PLURAL: &'static str;
    fn metadata(&self) -> &ObjectMeta;
    fn metadata_mut(&mut self) -> &mut ObjectMeta;
    fn key(&self) -> String {
        format!("{}{}", Self::PREFIX, self.metadata().name)
    }
    fn key_for(name: &str) -> String {
        format!("{}{}", Self::PREFIX, name)
    }
}

/// One stored kind: what the API router, the watch endpoint and the remote store need to know
/// of it. Adding a kind is one `object!` line and one entry in [`KINDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    /// `Service`.
    pub kind: &'static str,
    /// `services`, as in `/api/v1/services` and `/api/v1/watch/services`.
    pub plural: &'static str,
    /// `/registry/services/`.
    pub prefix: &'static str,
    /// Whether the API serves it to clients (lists, gets and watches).
    pub served: bool,
}

impl KindInfo {
    pub const fn of<T: Object>(served: bool) -> Self {
        Self {
            kind: T::KIND,
            plural: T::PLURAL,
            prefix: T::PREFIX,
            served,
        }
    }
}

/// Every stored kind.
pub const KINDS: &[KindInfo] = &[
    KindInfo::of::<Service>(true),
    KindInfo::of::<Instance>(true),
    KindInfo::of::<Event>(true),
    KindInfo::of::<Revision>(false),
    KindInfo::of::<Node>(true),
];

/// The kind served under `plural` in API paths.
pub fn served_kind(plural: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.served && k.plural == plural)
}

/// The kind whose keys start with `prefix` (a kind's prefix, or a key under it).
pub fn kind_of_prefix(prefix: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| prefix.starts_with(k.prefix))
}

/// `services, instances or events`: the plural names the API serves, for messages.
pub fn served_plurals() -> String {
    let names: Vec<&str> = KINDS
        .iter()
        .filter(|k| k.served)
        .map(|k| k.plural)
        .collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

macro_rules! object {
    ($t:ty, $kind:literal, $plural:literal) => {
        impl Object for $t {
            const KIND: &'static str = $kind;
            const PREFIX: &'static str = concat!("/registry/", $plural, "/");
            const PLURAL: &'static str = $plural;
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Service

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
    #[serde(default)]
    pub status: ServiceStatus,
}
object!(Service, "Service", "services");

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    #[serde(default)]
    pub observed_generation: u64,
    /// Instances that exist and are not being deleted.
    #[serde(default)]
    pub replicas: u32,
    #[serde(default)]
    pub ready_replicas: u32,
    /// Hash of what the instances of the current revision run (see `template_hash`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spec_hash: String,
    /// Number of the revision being rolled out, or rolled out.
    #[serde(default)]
    pub revision: u64,
    /// Last revision whose rollout completed: where an automatic rollback returns.
    #[serde(default)]
    pub last_good_revision: u64,
    /// Instances running the current revision (not being deleted).
    #[serde(default)]
    pub updated_replicas: u32,
    /// Instances of the current revision ready for at least `deploy.min_ready`.
    #[serde(default)]
    pub available_replicas: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// Progress of the current rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    pub phase: RolloutPhase,
    /// Why the rollout is in this phase, for people.
    #[serde(default)]
    pub message: String,
    /// Revision the rollout started from (0: none).
    #[serde(default)]
    pub from_revision: u64,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339: last time an instance of the new revision became available.
    pub last_progress_at: String,
    /// Set while the service runs a revision that an automatic rollback returned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<u64>,
    /// The revision whose spec that automatic rollback restored (this revision is a new record
    /// of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<u64>,
    /// Why this revision exists (`apply`, `restart`, `automatic rollback from revision 2: …`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cause: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutPhase {
    /// New instances are being started and old ones replaced.
    Progressing,
    /// Every instance runs the current revision and is available.
    Complete,
    /// The rollout stopped: crash loop, or no progress within the deadline (no auto-rollback).
    Failed,
    /// A failed rollout was undone automatically; the service runs the last good revision.
    RolledBack,
    /// `flotilla rollout pause`: nothing is started or stopped for the rollout.
    Paused,
}

impl RolloutPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutPhase::Progressing => "Progressing",
            RolloutPhase::Complete => "Complete",
            RolloutPhase::Failed => "Failed",
            RolloutPhase::RolledBack => "RolledBack",
            RolloutPhase::Paused => "Paused",
        }
    }
}

/// Annotations flotilla manages on services; `apply` keeps them.
pub mod annotations {
    /// Set by `flotilla restart`: a new value makes new instances of an unchanged spec.
    pub const RESTARTED_AT: &str = "flotilla.dev/restartedAt";
    /// Set by `flotilla rollout pause`.
    pub const PAUSED: &str = "flotilla.dev/paused";
    /// Why the spec last changed (`rollback to revision 3`), recorded on the next revision.
    pub const CHANGE_CAUSE: &str = "flotilla.dev/change-cause";
    /// Prefix of every flotilla-managed annotation.
    pub const PREFIX: &str = "flotilla.dev/";
}

// ---------------------------------------------------------------------------------------------
// Revision

/// An immutable snapshot of a service's spec; a rollout moves instances to the newest one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    pub metadata: ObjectMeta,
    pub spec: RevisionSpec,
}
object!(Revision, "Revision", "revisions");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionSpec {
    pub service: String,
    /// 1, 2, 3, … per service.
    pub number: u64,
    /// `template_hash` of the template and restart token: instances carry it as `specHash`.
    pub template_hash: String,
    pub template: ServiceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_token: Option<String>,
    /// Why this revision exists: `apply`, `restart`, `rollback to revision 2`, ….
    #[serde(default)]
    pub cause: String,
    /// Field paths that differ from the previous revision (`args`, `env.GREETING`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
}

impl Revision {
    pub fn name_for(service: &str, number: u64) -> String {
        format!("{service}.{number}")
    }
}

// ---------------------------------------------------------------------------------------------
// Instance

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub metadata: ObjectMeta,
    pub spec: InstanceSpec,
    #[serde(default)]
    pub status: InstanceStatus,
}
object!(Instance, "Instance", "instances");

impl Instance {
    /// True when the gateway may send new requests to this instance.
    pub fn is_routable(&self) -> bool {
        self.metadata.deletion_timestamp.is_none()
            && self.status.ready
            && self.status.phase == Phase::Running
    }
}

/// What an instance runs. Written by the controller, immutable once created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    /// Owning service.
    pub service: String,
    /// Node the instance is bound to.
    pub node: String,
    /// Hash of `template`, identifies the revision the instance runs.
    pub spec_hash: String,
    /// Snapshot of the service spec at creation.
    pub template: ServiceSpec,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Accepted, process not started yet.
    #[default]
    Pending,
    /// Process started; startup probe (if any) not yet passed.
    Starting,
    /// Process running and past its startup probe.
    Running,
    /// Process exited and is waiting for its next restart.
    Backoff,
    /// Waiting for a restart after repeated consecutive failures.
    CrashLoopBackOff,
    /// Stop signal sent; waiting for the process group to exit.
    Stopping,
    /// Exited successfully and will not be restarted.
    Succeeded,
    /// Exited unsuccessfully and will not be restarted.
    Failed,
}

impl Phase {
    /// No process will run for this instance again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Backoff => "Backoff",
            Phase::CrashLoopBackOff => "CrashLoopBackOff",
            Phase::Stopping => "Stopping",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }
}

/// Observed state of an instance. Written by the agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    #[serde(default)]
    pub phase: Phase,
    #[serde(default)]
    pub ready: bool,
    /// Restarts of the process within this instance.
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Address other components use to reach the instance's ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Allocated host port per named port.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    /// RFC 3339, start of the current process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RFC 3339: since when `ready` has been true (absent while not ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitInfo>,
    /// Human-readable reason for the current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// A pending instance that preempted lower-priority instances: the node it waits for
    /// (written by the scheduler; room there is held for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nominated_node: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default)]
    pub oom_killed: bool,
    /// `Completed`, `Error`, `OOMKilled`, `Signaled`, `LivenessFailed`, `Stopped`.
    pub reason: String,
    /// RFC 3339.
    pub at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub cpu_millicores: u64,
    pub memory_bytes: u64,
    /// RFC 3339.
    pub sampled_at: String,
}

// ---------------------------------------------------------------------------------------------
// Event

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub metadata: ObjectMeta,
    pub involved: ObjectRef,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Short CamelCase reason (`Started`, `Killed`, `OOMKilled`, `Unhealthy`, …).
    pub reason: String,
    pub message: String,
    /// Component that reported it (`agent/local`, `controller`, `api`).
    pub source: String,
    /// RFC 3339.
    pub timestamp: String,
}
object!(Event, "Event", "events");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    Normal,
    Warning,
}

/// Current time as RFC 3339 with millisecond precision (UTC).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

// ---------------------------------------------------------------------------------------------
// Node

/// A machine that runs instances: registered by its agent (status), steered by the operator
/// (spec: cordon). Its liveness is a lease its agent renews, held in the control plane's
/// memory (`flotilla_store::Leases`): a heartbeat writes nothing to the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NodeSpec,
    #[serde(default)]
    pub status: NodeStatus,
}
object!(Node, "Node", "nodes");

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    /// Cordoned: no new instance is placed on it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
    /// Being drained (implies cordoned): its instances are replaced elsewhere, each service
    /// keeping `replicas - max_unavailable` available, as in a rollout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
    /// Instances that do not tolerate one of these are not placed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<NodeTaint>,
}

/// `key=value`: repels instances without a matching toleration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTaint {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

/// CPU, memory and process counts of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeResources {
    pub cpu_millicores: u64,
    pub memory_bytes: u64,
    pub pids: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The address instances on this node listen on (what gateways connect to).
    #[serde(default)]
    pub address: String,
    /// What the machine has.
    #[serde(default)]
    pub capacity: NodeResources,
    /// What instances may use: capacity minus the node's reserve.
    #[serde(default)]
    pub allocatable: NodeResources,
    /// `Ready` (from the lease), set by the control plane; `MemoryPressure` and
    /// `DiskPressure`, reported by the agent when they change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<NodeCondition>,
    #[serde(default)]
    pub agent_version: String,
    /// RFC 3339: when the agent registered (started) last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<String>,
}

impl NodeStatus {
    /// The condition of this type, if reported.
    pub fn condition(&self, kind: &str) -> Option<&NodeCondition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }
}

/// A node's memory is short (reported by its agent): no new instance is placed there.
pub const MEMORY_PRESSURE: &str = "MemoryPressure";
/// A node's data disk is short (reported by its agent): no new instance is placed there.
pub const DISK_PRESSURE: &str = "DiskPressure";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCondition {
    /// `Ready` (the control plane's), `MemoryPressure`, `DiskPressure` (the agent's).
    #[serde(rename = "type")]
    pub kind: String,
    pub status: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339: when `status` last changed.
    #[serde(default)]
    pub last_transition: String,
}
