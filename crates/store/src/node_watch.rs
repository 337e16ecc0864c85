//! Instance watches by node, for a server with many agents.
//!
//! Each agent follows the instances bound to its node. Filtering a store watch per agent costs
//! every instance event one copy and one decode per connected agent: at 1,000 nodes, 1,000
//! decodes of every status report, which made the server CPU-bound long before its store was
//! (the 10,000-instance placement ran at 46/s). [`NodeWatches`] does what kube-apiserver's watch
//! cache does with its `spec.nodeName` index: one store watch for all instances, each event
//! read once for the node it is bound to (and was bound to), then handed only to that node's
//! watchers.
//!
//! The hub keeps the last [`NodeWatches::HISTORY`] instance events (shared, not copied per
//! node) so that an agent reconnecting with its last revision resumes without a relist; older
//! revisions answer `Compacted`, as the store does. A watcher whose channel fills is sent one
//! `Compacted` and dropped, so one slow agent never holds back the others.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use flotilla_spec::{Instance, Object};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{KeyValue, Revision, Store, StoreError, Watch, WatchEvent};

/// The node an instance record is bound to, read without decoding the rest of the object.
/// `None` for a record that is not an instance, or one not bound yet.
pub fn bound_node(kv: &KeyValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow, default)]
        spec: SpecProbe<'a>,
    }
    #[derive(serde::Deserialize, Default)]
    struct SpecProbe<'a> {
        #[serde(borrow, default)]
        node: Cow<'a, str>,
    }
    let probe: Probe<'_> = serde_json::from_slice(&kv.value).ok()?;
    (!probe.spec.node.is_empty()).then(|| probe.spec.node.into_owned())
}

/// Per-node instance watches over one store watch. Cheap to share (`Arc`).
pub struct NodeWatches {
    hub: Mutex<Hub>,
}

impl std::fmt::Debug for NodeWatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hub = self.hub();
        f.debug_struct("NodeWatches")
            .field("start", &hub.start)
            .field("history", &hub.history.len())
            .finish_non_exhaustive()
    }
}

pub(crate) struct Entry {
    revision: Revision,
    /// Node the instance is bound to after the event (none for a deletion).
    now: Option<String>,
    /// Node it was bound to before.
    before: Option<String>,
    event: Arc<WatchEvent>,
}

impl Entry {
    pub(crate) fn new(event: WatchEvent) -> Self {
        let (now, before) = match &event {
            WatchEvent::Put { kv, prev } => (bound_node(kv), prev.as_ref().and_then(bound_node)),
            WatchEvent::Delete { prev, .. } => (None, prev.as_ref().and_then(bound_node)),
        };
        Self {
            revision: event.revision(),
            now,
            before,
            event: Arc::new(event),
        }
    }

    /// The event as `node` sees it: an instance bound to it arrives (no `prev`), changes, or
    /// leaves (a deletion, also when it is bound elsewhere).
    pub(crate) fn view(&self, node: &str) -> Option<WatchEvent> {
        let was = self.before.as_deref() == Some(node);
        let is = self.now.as_deref() == Some(node);
        match &*self.event {
            WatchEvent::Put { kv, prev } if is => Some(WatchEvent::Put {
                kv: kv.clone(),
                prev: if was { prev.clone() } else { None },
            }),
            WatchEvent::Put { kv, prev } if was => Some(WatchEvent::Delete {
                key: kv.key.clone(),
                revision: kv.mod_revision,
                prev: prev.clone(),
            }),
            WatchEvent::Delete { .. } if was => Some((*self.event).clone()),
            _ => None,
        }
    }
}

struct Subscriber {
    prefix: String,
    after: Revision,
    tx: crate::embedded::WatchSender,
}

struct Hub {
    /// Every instance event with a revision in `(start, …]`, in order.
    history: VecDeque<Entry>,
    start: Revision,
    subscribers: HashMap<String, Vec<Subscriber>>,
    /// The dispatcher stopped (shutdown): new watches are refused.
    closed: bool,
}

impl NodeWatches {
    /// Instance events kept for watches to resume from.
    pub const HISTORY: usize = 4_096;
    /// Events a node's watcher may have queued before it is dropped with `Compacted`.
    pub const BUFFER: usize = 1_024;

    /// Starts following `store`'s instances from its current revision. The dispatcher task
    /// ends on `shutdown` (every watcher then gets `Closed`).
    pub fn start(store: Arc<dyn Store>, shutdown: CancellationToken) -> Arc<Self> {
        let start = store.revision();
        let this = Arc::new(Self {
            hub: Mutex::new(Hub {
                history: VecDeque::new(),
                start,
                subscribers: HashMap::new(),
                closed: false,
            }),
        });
        let hub = this.clone();
        tokio::spawn(async move { hub.dispatch(store, start, shutdown).await });
        this
    }

    fn hub(&self) -> MutexGuard<'_, Hub> {
        // The hub's invariants hold between statements; a panic elsewhere cannot break them.
        self.hub
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Watchers connected now, over all nodes.
    pub fn watcher_count(&self) -> usize {
        self.hub().subscribers.values().map(Vec::len).sum()
    }

    /// The instances under `prefix` bound to `node`, changes after `after`.
    pub fn watch(&self, node: &str, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        let mut hub = self.hub();
        if hub.closed {
            return Err(StoreError::Closed);
        }
        if after < hub.start {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: hub.start,
            });
        }
        let from = hub.history.partition_point(|e| e.revision <= after);
        let replay: Vec<WatchEvent> = hub
            .history
            .range(from..)
            .filter_map(|e| e.view(node))
            .filter(|e| e.key().starts_with(prefix))
            .collect();
        let (tx, rx) = mpsc::channel(replay.len() + Self::BUFFER + 1);
        let mut last = after;
        for event in replay {
            last = event.revision();
            tx.try_send(Ok(event))
                .map_err(|e| StoreError::backend("replaying node watch history", e.to_string()))?;
        }
        let list = hub.subscribers.entry(node.to_string()).or_default();
        list.retain(|s| !s.tx.is_closed());
        list.push(Subscriber {
            prefix: prefix.to_string(),
            after: last,
            tx,
        });
        Ok(Watch { rx })
    }

    async fn dispatch(
        &self,
        store: Arc<dyn Store>,
        mut from: Revision,
        shutdown: CancellationToken,
    ) {
        loop {
            let mut watch = match store.watch(Instance::PREFIX, from).await {
                Ok(w) => w,
                Err(StoreError::Compacted { .. }) => {
                    from = self.restart(store.revision());
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "node watches: watching instances failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => continue,
                    }
                }
            };
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => {
                        self.close();
                        return;
                    }
                    event = watch.next() => event,
                };
                match event {
                    Some(Ok(event)) => {
                        from = event.revision();
                        self.publish(Entry::new(event));
                    }
                    Some(Err(StoreError::Compacted { .. })) => {
                        tracing::warn!("node watches fell behind the store; every node relists");
                        from = self.restart(store.revision());
                        break;
                    }
                    Some(Err(StoreError::Closed)) | None => {
                        self.close();
                        return;
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "node watches: instance watch failed; resuming");
                        break;
                    }
                }
            }
        }
        self.close();
    }

    fn publish(&self, entry: Entry) {
        let mut hub = self.hub();
        let start = hub.start;
        for node in [entry.now.as_deref(), entry.before.as_deref()]
            .into_iter()
            .flatten()
        {
            let Some(list) = hub.subscribers.get_mut(node) else {
                continue;
            };
            let Some(view) = entry.view(node) else {
                continue;
            };
            list.retain_mut(|s| {
                if s.tx.is_closed() {
                    return false;
                }
                if entry.revision <= s.after || !view.key().starts_with(&s.prefix) {
                    return true;
                }
                if !crate::embedded::offer(&s.tx, &view, s.after, start) {
                    tracing::warn!(
                        node,
                        after = s.after,
                        "node watcher fell behind; dropping it"
                    );
                    return false;
                }
                s.after = entry.revision;
                true
            });
            if entry.now == entry.before {
                // Bound to the same node before and after: one view is enough.
                break;
            }
        }
        hub.history.push_back(entry);
        while hub.history.len() > Self::HISTORY {
            if let Some(old) = hub.history.pop_front() {
                hub.start = old.revision;
            }
        }
    }

    /// Forgets the history and ends every watch with `Compacted` (they relist); follows the
    /// store again from `revision`.
    fn restart(&self, revision: Revision) -> Revision {
        let mut hub = self.hub();
        hub.history.clear();
        hub.start = revision;
        for (_, list) in hub.subscribers.drain() {
            for s in list {
                let _ = s.tx.try_send(Err(StoreError::Compacted {
                    requested: s.after,
                    oldest: revision,
                }));
            }
        }
        revision
    }

    fn close(&self) {
        let mut hub = self.hub();
        hub.closed = true;
        for (_, list) in hub.subscribers.drain() {
            for s in list {
                let _ = s.tx.try_send(Err(StoreError::Closed));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::tests::instance;
    use crate::{EmbeddedStore, NodeApi, StoreNode, typed};
    use std::time::Duration;

    fn open(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("open store"))
    }

    /// (type, name) of the next event within a deadline, `None` if nothing comes.
    async fn next(watch: &mut Watch) -> Option<(&'static str, String)> {
        let ev = tokio::time::timeout(Duration::from_millis(300), watch.next())
            .await
            .ok()??
            .expect("event");
        Some(match ev {
            WatchEvent::Put { kv, prev } => (
                if prev.is_some() { "MODIFIED" } else { "ADDED" },
                typed::decode::<Instance>(&kv)
                    .expect("decode")
                    .metadata
                    .name,
            ),
            WatchEvent::Delete { key, .. } => (
                "DELETED",
                key.trim_start_matches(Instance::PREFIX).to_string(),
            ),
        })
    }

    fn ev(kind: &'static str, name: &str) -> Option<(&'static str, String)> {
        Some((kind, name.to_string()))
    }

    async fn bind(store: &dyn Store, name: &str, node: &str) {
        typed::modify::<Instance>(store, name, |i| {
            i.spec.node = node.to_string();
            true
        })
        .await
        .expect("bind")
        .expect("bound");
    }

    /// The same story through the shared hub and through a node's own filtered watch: each
    /// node sees its instances arrive (also when bound after creation), change and go (also
    /// when rebound elsewhere), and nothing of the other node's.
    #[tokio::test]
    async fn each_node_sees_only_its_instances_arrive_change_and_leave() {
        for shared in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = open(&dir);
            let shutdown = CancellationToken::new();
            let node = |name: &str| {
                let n = StoreNode::new(store.clone(), Default::default(), name);
                if shared {
                    n.with_watches(NodeWatches::start(store.clone(), shutdown.clone()))
                } else {
                    n
                }
            };
            let (a, b) = (node("a"), node("b"));
            let from = store.revision();
            let mut wa = a
                .instances()
                .watch(Instance::PREFIX, from)
                .await
                .expect("watch a");
            let mut wb = b
                .instances()
                .watch(Instance::PREFIX, from)
                .await
                .expect("watch b");

            typed::create(store.as_ref(), instance("a1", "a"))
                .await
                .expect("create");
            typed::create(store.as_ref(), instance("u1", ""))
                .await
                .expect("create");
            bind(store.as_ref(), "u1", "b").await;
            a.modify_status("a1", &|s| {
                s.restarts = 1;
                true
            })
            .await
            .expect("status");
            bind(store.as_ref(), "a1", "b").await;
            typed::delete::<Instance>(store.as_ref(), "u1", None)
                .await
                .expect("delete");

            assert_eq!(next(&mut wa).await, ev("ADDED", "a1"), "shared={shared}");
            assert_eq!(next(&mut wa).await, ev("MODIFIED", "a1"));
            assert_eq!(
                next(&mut wa).await,
                ev("DELETED", "a1"),
                "rebound elsewhere: gone"
            );
            assert_eq!(next(&mut wa).await, None, "nothing of b's");
            assert_eq!(
                next(&mut wb).await,
                ev("ADDED", "u1"),
                "bound after creation"
            );
            assert_eq!(next(&mut wb).await, ev("ADDED", "a1"));
            assert_eq!(next(&mut wb).await, ev("DELETED", "u1"));
            assert_eq!(next(&mut wb).await, None);
            shutdown.cancel();
        }
    }

    #[tokio::test]
    async fn a_watch_resumes_from_its_revision_and_an_older_one_is_compacted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        typed::create(store.as_ref(), instance("old", "a"))
            .await
            .expect("create");
        let before_hub = store.revision() - 1;
        let shutdown = CancellationToken::new();
        let hub = NodeWatches::start(store.clone(), shutdown.clone());
        let first = typed::create(store.as_ref(), instance("a1", "a"))
            .await
            .expect("create");
        typed::create(store.as_ref(), instance("a2", "a"))
            .await
            .expect("create");
        typed::create(store.as_ref(), instance("b1", "b"))
            .await
            .expect("create");

        // Resuming after a1: a2 only, from the hub's history. Polled: the hub may not have
        // read the last writes yet, and a watch registered meanwhile still gets them live.
        let mut w = hub
            .watch("a", Instance::PREFIX, first.metadata.resource_version)
            .expect("watch");
        assert_eq!(next(&mut w).await, ev("ADDED", "a2"));
        assert_eq!(next(&mut w).await, None);

        assert!(matches!(
            hub.watch("a", Instance::PREFIX, before_hub),
            Err(StoreError::Compacted { .. })
        ));
        assert_eq!(hub.watcher_count(), 1);
        shutdown.cancel();
        assert!(matches!(w.next().await, Some(Err(StoreError::Closed))));
        assert!(matches!(
            hub.watch("a", Instance::PREFIX, store.revision()),
            Err(StoreError::Closed)
        ));
    }

    /// A node that stops reading is dropped with `Compacted` once its buffer is full; the
    /// other node's watch keeps every event.
    #[tokio::test]
    async fn a_slow_node_is_dropped_without_holding_back_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(
            EmbeddedStore::open_with(
                &dir.path().join("s.redb"),
                crate::StoreOptions {
                    durable: false,
                    ..Default::default()
                },
            )
            .expect("open store"),
        );
        let shutdown = CancellationToken::new();
        let hub = NodeWatches::start(store.clone(), shutdown.clone());
        let from = store.revision();
        let mut slow = hub.watch("a", Instance::PREFIX, from).expect("watch");
        let mut fast = hub.watch("b", Instance::PREFIX, from).expect("watch");
        let total = NodeWatches::BUFFER + 8;
        let mut seen = 0;
        for n in 0..total {
            typed::create(store.as_ref(), instance(&format!("a{n}"), "a"))
                .await
                .expect("create");
            typed::create(store.as_ref(), instance(&format!("b{n}"), "b"))
                .await
                .expect("create");
            while let Ok(Some(ev)) = tokio::time::timeout(Duration::ZERO, fast.next()).await {
                ev.expect("fast watcher keeps up");
                seen += 1;
            }
        }
        while seen < total {
            let ev = tokio::time::timeout(Duration::from_secs(5), fast.next())
                .await
                .expect("event in time")
                .expect("stream open");
            ev.expect("fast watcher keeps up");
            seen += 1;
        }
        let mut got = 0;
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(5), slow.next()).await {
                Ok(Some(Ok(_))) => got += 1,
                Ok(Some(Err(e))) => break e,
                other => panic!("slow watcher ended without Compacted: {other:?}"),
            }
        };
        assert!(matches!(end, StoreError::Compacted { .. }), "{end}");
        assert!(got < total, "dropped before the end ({got} of {total})");
        shutdown.cancel();
    }
}
