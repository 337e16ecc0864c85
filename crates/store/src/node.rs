//! The node interface: everything an agent may do to the control plane, and nothing more —
//! follow the instances bound to its node, write their status, record events about them, and
//! finish the deletion of one it has stopped. The agent never holds a general store handle, so
//! a node's credentials can be worth one node.
//!
//! - [`StoreNode`]: in-process, over the store (`flotilla up`), and what the API's node
//!   endpoints call, so the rules below are written once.
//! - [`crate::remote::RemoteNode`]: the same over the API, for an agent on another machine.
//!
//! Rules: an instance not bound to the node is invisible to it and cannot be written; only
//! `status` is ever written (spec and metadata stay as the controller wrote them); an instance
//! is deleted only once the controller marked it for deletion.

use std::sync::Arc;

use async_trait::async_trait;
use std::collections::BTreeMap;

use flotilla_spec::{
    EventType, Instance, InstanceStatus, Node, NodeCondition, NodeSpec, NodeStatus, Object,
    ObjectMeta,
};

use crate::{
    KeyValue, Leases, ListResult, NodeWatches, Precondition, Revision, Store, StoreError, Watch,
    events, typed,
};

/// Why a node operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The instance does not exist, or is bound to another node (the two are not told apart:
    /// a node learns nothing of other nodes' instances).
    #[error("instance {instance} not found on node {node}")]
    NotFound { instance: String, node: String },
    /// Deleting an instance the controller has not marked for deletion.
    #[error("instance {instance} is not being deleted; only the controller starts a deletion")]
    NotDeleting { instance: String },
    /// A status write raced another writer and the caller asked for compare-and-swap.
    #[error("instance {instance} changed (resourceVersion {expected} is stale); read it again")]
    Conflict {
        instance: String,
        expected: Revision,
    },
    /// A node reported a condition it does not own (only the pressure conditions are its).
    #[error("a node reports only MemoryPressure and DiskPressure, not {kind:?}")]
    NotNodeCondition { kind: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an agent says of its node when it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Registration {
    /// Labels the agent knows (`flotilla.dev/hostname`, `…/arch`, `…/os`, configured ones).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub status: NodeStatus,
    /// The node's first lease, renewed before the node is written so that a new node is
    /// never seen without one (0: none).
    #[serde(default)]
    pub lease_seconds: u32,
}

/// A status edit: changes the status in place and says whether it changed anything.
pub type StatusEdit<'a> = &'a (dyn Fn(&mut InstanceStatus) -> bool + Send + Sync);

/// What an agent may do, for one node.
#[async_trait]
pub trait NodeApi: Send + Sync + 'static {
    /// The node this interface speaks for.
    fn node(&self) -> &str;

    /// A read-only store view holding only this node's instances: what the agent's reflector
    /// lists and watches.
    fn instances(&self) -> Arc<dyn Store>;

    /// Read-modify-write of one instance's status, retried on conflicts. `Ok(None)`: the
    /// instance is gone (or not on this node).
    async fn modify_status(
        &self,
        instance: &str,
        edit: StatusEdit<'_>,
    ) -> Result<Option<Instance>, NodeError>;

    /// Records an event about one of this node's instances (failures are logged, not
    /// returned: events are for people).
    async fn record_event(&self, instance: &str, kind: EventType, reason: &str, message: &str);

    /// Removes a stopped instance the controller marked for deletion. `Ok(false)`: it was
    /// already gone.
    async fn finish_deletion(&self, instance: &str) -> Result<bool, NodeError>;

    /// Registers this node: creates its Node object, or replaces its status and the labels the
    /// agent reports (the spec — cordon — and other labels stay the operator's). Conditions are
    /// the control plane's and are kept.
    async fn register(&self, registration: Registration) -> Result<(), NodeError>;

    /// Renews this node's lease for `duration_seconds` from now (its heartbeat): kept in the
    /// control plane's memory, not written to the store.
    async fn renew_lease(&self, duration_seconds: u32) -> Result<(), NodeError>;

    /// Sets the conditions the node itself reports (`MemoryPressure`, `DiskPressure`); written
    /// only when one changes, its transition time with it. The agent calls it on changes.
    async fn report_conditions(&self, conditions: Vec<NodeCondition>) -> Result<(), NodeError>;
}

/// `current` with the node-reported `reported` merged in: a transition time moves only when
/// the status does. `None` when nothing changes.
pub fn merge_conditions(
    current: &[NodeCondition],
    reported: &[NodeCondition],
    now: &str,
) -> Option<Vec<NodeCondition>> {
    let mut out = current.to_vec();
    let mut changed = false;
    for r in reported {
        match out.iter_mut().find(|c| c.kind == r.kind) {
            Some(c) if c.status == r.status && c.reason == r.reason && c.message == r.message => {}
            Some(c) => {
                if c.status != r.status {
                    c.last_transition = now.to_string();
                }
                c.status = r.status;
                c.reason = r.reason.clone();
                c.message = r.message.clone();
                changed = true;
            }
            None => {
                let mut c = r.clone();
                c.last_transition = now.to_string();
                out.push(c);
                changed = true;
            }
        }
    }
    changed.then_some(out)
}

/// The node interface over a store, in-process.
#[derive(Clone)]
pub struct StoreNode {
    store: Arc<dyn Store>,
    leases: Arc<Leases>,
    node: String,
    watches: Option<Arc<NodeWatches>>,
}

impl std::fmt::Debug for StoreNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreNode")
            .field("node", &self.node)
            .finish()
    }
}

/// Status writes retried on conflicts before giving up.
const STATUS_ATTEMPTS: usize = 16;

impl StoreNode {
    pub fn new(store: Arc<dyn Store>, leases: Arc<Leases>, node: impl Into<String>) -> Self {
        Self {
            store,
            leases,
            node: node.into(),
            watches: None,
        }
    }

    /// Serves this node's instance watches from a shared [`NodeWatches`] (a server with many
    /// agents) instead of filtering a store watch of its own.
    pub fn with_watches(mut self, watches: Arc<NodeWatches>) -> Self {
        self.watches = Some(watches);
        self
    }

    fn not_found(&self, instance: &str) -> NodeError {
        NodeError::NotFound {
            instance: instance.to_string(),
            node: self.node.clone(),
        }
    }

    /// The instance, if it exists and is bound to this node.
    pub async fn get(&self, instance: &str) -> Result<Option<Instance>, NodeError> {
        Ok(typed::get::<Instance>(self.store.as_ref(), instance)
            .await?
            .filter(|i| i.spec.node == self.node))
    }

    /// This node's instances and the revision they were read at.
    pub async fn list(&self) -> Result<(Vec<Instance>, Revision), NodeError> {
        let listed = self.store.list(Instance::PREFIX).await?;
        let mine = listed
            .items
            .iter()
            .filter(|kv| on_node(kv, &self.node))
            .map(typed::decode::<Instance>)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((mine, listed.revision))
    }

    /// Replaces the status of `instance` if it is still at `resource_version` (compare and
    /// swap, as a remote agent's write arrives). Only `status` is taken from the caller.
    pub async fn replace_status(
        &self,
        instance: &str,
        resource_version: Revision,
        status: InstanceStatus,
    ) -> Result<Instance, NodeError> {
        let Some(mut current) = self.get(instance).await? else {
            return Err(self.not_found(instance));
        };
        if current.metadata.resource_version != resource_version {
            return Err(NodeError::Conflict {
                instance: instance.to_string(),
                expected: resource_version,
            });
        }
        current.status = status;
        match typed::update(self.store.as_ref(), current).await {
            Ok(updated) => Ok(updated),
            Err(e) if e.is_conflict() => Err(NodeError::Conflict {
                instance: instance.to_string(),
                expected: resource_version,
            }),
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait]
impl NodeApi for StoreNode {
    fn node(&self) -> &str {
        &self.node
    }

    fn instances(&self) -> Arc<dyn Store> {
        Arc::new(NodeInstances {
            inner: self.store.clone(),
            node: self.node.clone(),
            watches: self.watches.clone(),
        })
    }

    async fn modify_status(
        &self,
        instance: &str,
        edit: StatusEdit<'_>,
    ) -> Result<Option<Instance>, NodeError> {
        for _ in 0..STATUS_ATTEMPTS {
            let Some(mut current) = self.get(instance).await? else {
                return Ok(None);
            };
            if !edit(&mut current.status) {
                return Ok(Some(current));
            }
            match typed::update(self.store.as_ref(), current).await {
                Ok(updated) => return Ok(Some(updated)),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(NodeError::Conflict {
            instance: instance.to_string(),
            expected: 0,
        })
    }

    async fn record_event(&self, instance: &str, kind: EventType, reason: &str, message: &str) {
        match self.get(instance).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::debug!(instance, node = %self.node, reason, "event about an instance not on this node dropped");
                return;
            }
            Err(error) => {
                tracing::warn!(instance, error = %crate::error_chain(&error), "could not check the instance of an event");
                return;
            }
        }
        let source = format!("agent/{}", self.node);
        events::record(
            self.store.as_ref(),
            Instance::KIND,
            instance,
            kind,
            reason,
            message,
            &source,
        )
        .await;
    }

    async fn finish_deletion(&self, instance: &str) -> Result<bool, NodeError> {
        for _ in 0..STATUS_ATTEMPTS {
            let Some(current) = self.get(instance).await? else {
                return Ok(false);
            };
            if current.metadata.deletion_timestamp.is_none() {
                return Err(NodeError::NotDeleting {
                    instance: instance.to_string(),
                });
            }
            let rv = current.metadata.resource_version;
            match typed::delete::<Instance>(self.store.as_ref(), instance, Some(rv)).await {
                Ok(deleted) => return Ok(deleted.is_some()),
                // A status write landed meanwhile: still ours to delete.
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(NodeError::Conflict {
            instance: instance.to_string(),
            expected: 0,
        })
    }

    async fn register(&self, registration: Registration) -> Result<(), NodeError> {
        let store = self.store.as_ref();
        if registration.lease_seconds > 0 {
            self.renew_lease(registration.lease_seconds).await?;
        }
        for _ in 0..STATUS_ATTEMPTS {
            let Registration { labels, status, .. } = registration.clone();
            let updated = typed::modify::<Node>(store, &self.node, |n| {
                let conditions = std::mem::take(&mut n.status.conditions);
                n.status = status.clone();
                n.status.conditions = conditions;
                n.metadata.labels.extend(labels.clone());
                true
            })
            .await?;
            if updated.is_some() {
                return Ok(());
            }
            let mut metadata = ObjectMeta::named(self.node.clone());
            metadata.labels = labels;
            let node = Node {
                metadata,
                spec: NodeSpec::default(),
                status,
            };
            match typed::create(store, node).await {
                Ok(_) => return Ok(()),
                // Created meanwhile (another start of this agent): update it instead.
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(NodeError::Store(StoreError::Conflict {
            key: Node::key_for(&self.node),
            expected: Precondition::None,
            actual: None,
        }))
    }

    async fn renew_lease(&self, duration_seconds: u32) -> Result<(), NodeError> {
        let duration = std::time::Duration::from_secs(u64::from(duration_seconds));
        match self.leases.shared() {
            // Several servers: the lease lives in the shared store, whichever server hears it.
            Some(relay) => relay.renew(&self.node, duration).await?,
            None => self.leases.renew(&self.node, duration),
        }
        Ok(())
    }

    async fn report_conditions(&self, conditions: Vec<NodeCondition>) -> Result<(), NodeError> {
        if let Some(c) = conditions.iter().find(|c| {
            c.kind != flotilla_spec::MEMORY_PRESSURE && c.kind != flotilla_spec::DISK_PRESSURE
        }) {
            return Err(NodeError::NotNodeCondition {
                kind: c.kind.clone(),
            });
        }
        let now = flotilla_spec::now_rfc3339();
        typed::modify::<Node>(self.store.as_ref(), &self.node, |n| match merge_conditions(
            &n.status.conditions,
            &conditions,
            &now,
        ) {
            Some(merged) => {
                n.status.conditions = merged;
                true
            }
            None => false,
        })
        .await?;
        Ok(())
    }
}

/// A read-only store holding only the instances of one node.
struct NodeInstances {
    inner: Arc<dyn Store>,
    node: String,
    watches: Option<Arc<NodeWatches>>,
}

impl NodeInstances {
    fn mine(&self, kv: &KeyValue) -> bool {
        kv.key.starts_with(Instance::PREFIX) && on_node(kv, &self.node)
    }

    fn refuse(key: &str) -> StoreError {
        StoreError::backend(
            format!("reading {key}"),
            "a node sees only its own instances",
        )
    }
}

#[async_trait]
impl Store for NodeInstances {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        if !key.starts_with(Instance::PREFIX) {
            return Err(Self::refuse(key));
        }
        Ok(self.inner.get(key).await?.filter(|kv| self.mine(kv)))
    }

    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        if !prefix.starts_with(Instance::PREFIX) {
            return Err(Self::refuse(prefix));
        }
        let mut listed = self.inner.list(prefix).await?;
        listed.items.retain(|kv| self.mine(kv));
        Ok(listed)
    }

    async fn put(&self, key: &str, _: Vec<u8>, _: Precondition) -> Result<KeyValue, StoreError> {
        Err(StoreError::backend(
            format!("writing {key}"),
            "the node interface writes through modify_status",
        ))
    }

    async fn delete(&self, key: &str, _: Precondition) -> Result<Option<KeyValue>, StoreError> {
        Err(StoreError::backend(
            format!("deleting {key}"),
            "the node interface deletes through finish_deletion",
        ))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        if !prefix.starts_with(Instance::PREFIX) {
            return Err(Self::refuse(prefix));
        }
        if let Some(watches) = &self.watches {
            return watches.watch(&self.node, prefix, after);
        }
        let mut inner = self.inner.watch(prefix, after).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(crate::remote::WATCH_BUFFER);
        let node = self.node.clone();
        // Owned by the returned watch: ends when its receiver is dropped or the inner ends.
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = tx.closed() => return,
                    ev = inner.rx.recv() => ev,
                };
                let Some(ev) = ev else { return };
                let view = match ev {
                    Ok(ev) => match crate::node_watch::Entry::new(ev).view(&node) {
                        Some(view) => Ok(view),
                        None => continue,
                    },
                    Err(e) => Err(e),
                };
                if tx.send(view).await.is_err() {
                    return;
                }
            }
        });
        Ok(Watch { rx })
    }

    fn revision(&self) -> Revision {
        self.inner.revision()
    }
}

fn on_node(kv: &KeyValue, node: &str) -> bool {
    crate::node_watch::bound_node(kv).is_some_and(|n| n == node)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flotilla_spec::{InstanceSpec, ObjectMeta};

    /// An instance of service `svc` bound to `node` ("" for none).
    pub(crate) fn instance(name: &str, node: &str) -> Instance {
        Instance {
            metadata: ObjectMeta::named(name),
            spec: InstanceSpec {
                service: "svc".into(),
                node: node.into(),
                spec_hash: "h".into(),
                template: serde_json::from_value(serde_json::json!({"command": "x"}))
                    .expect("template"),
            },
            status: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_node_sees_and_writes_only_its_own_instances() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(crate::EmbeddedStore::open(&dir.path().join("s.redb")).expect("open store"));
        typed::create(store.as_ref(), instance("a1", "a"))
            .await
            .expect("create");
        typed::create(store.as_ref(), instance("b1", "b"))
            .await
            .expect("create");
        let a = StoreNode::new(store.clone(), Default::default(), "a");

        let (mine, _) = typed::list::<Instance>(a.instances().as_ref())
            .await
            .expect("list");
        assert_eq!(
            mine.iter()
                .map(|i| i.metadata.name.as_str())
                .collect::<Vec<_>>(),
            ["a1"]
        );
        assert!(
            typed::get::<Instance>(a.instances().as_ref(), "b1")
                .await
                .expect("get")
                .is_none()
        );
        assert!(
            a.instances()
                .put(&Instance::key_for("a1"), vec![], Precondition::None)
                .await
                .is_err()
        );

        // Status of its own: written; of another node's: as if it did not exist.
        let set = |s: &mut InstanceStatus| {
            s.restarts = 7;
            true
        };
        assert!(a.modify_status("a1", &set).await.expect("modify").is_some());
        assert!(a.modify_status("b1", &set).await.expect("modify").is_none());
        let b1 = typed::get::<Instance>(store.as_ref(), "b1")
            .await
            .expect("get")
            .expect("b1");
        assert_eq!(b1.status.restarts, 0);

        // Deletion only once the controller started it, and only of its own.
        assert!(matches!(
            a.finish_deletion("a1").await,
            Err(NodeError::NotDeleting { .. })
        ));
        assert!(
            !a.finish_deletion("b1")
                .await
                .expect("not ours: nothing happens")
        );
        typed::modify::<Instance>(store.as_ref(), "a1", |i| {
            i.metadata.deletion_timestamp = Some(flotilla_spec::now_rfc3339());
            true
        })
        .await
        .expect("mark");
        assert!(a.finish_deletion("a1").await.expect("delete"));
        assert!(
            typed::get::<Instance>(store.as_ref(), "b1")
                .await
                .expect("get")
                .is_some()
        );

        // A stale compare-and-swap is a conflict, not a lost write.
        let b = StoreNode::new(store.clone(), Default::default(), "b");
        let rv = b1.metadata.resource_version;
        b.replace_status("b1", rv, InstanceStatus::default())
            .await
            .expect("cas");
        assert!(matches!(
            b.replace_status("b1", rv, InstanceStatus::default()).await,
            Err(NodeError::Conflict { .. })
        ));
    }
}
