//! Revisioned key-value store with etcd's semantics: one global revision bumped by every write,
//! per-key `create_revision`/`mod_revision`/`version`, compare-and-swap, prefix lists read at a
//! revision, and watches that resume from a revision or answer `Compacted` so the client relists.
//!
//! - [`EmbeddedStore`]: the default backend, one redb file (see [`embedded`]).
//! - [`EtcdStore`]: the same on an etcd cluster, for servers that share their state (see [`etcd`]).
//! - [`typed`]: get/list/create/update/delete/modify/watch of [`flotilla_spec::Object`]s, and the
//!   [`typed::Reflector`] that keeps a live map of every object of a kind.

pub mod embedded;
mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod events;
pub mod lease;
pub mod node;
pub mod node_watch;
pub mod reconcile;
pub mod remote;
pub mod servers;
pub mod typed;

pub use embedded::{EmbeddedStore, StoreOptions};
pub use error::{BoxError, StoreError, error_chain};
#[cfg(feature = "etcd")]
pub use etcd::{EtcdNodeLeases, EtcdOptions, EtcdStore, EtcdTls};
pub use lease::{DEFAULT_LEASE, LeaseState, Leases, SharedLeases};

/// Locks `m`, taking over a lock poisoned by a panic: every value kept under these locks is
/// changed in single steps (a map insert, a queue push), so it stays consistent when a holder
/// panics, and the rest of the process should not die with it.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
pub use node::{NodeApi, NodeError, Registration, StoreNode};
pub use node_watch::NodeWatches;
#[doc(hidden)]
pub use remote::fuzzing;
pub use remote::{Credential, RemoteNode, RemoteStore, TlsConfig};

use async_trait::async_trait;
use tokio::sync::mpsc;

/// A global store revision. Every successful write bumps it by one.
pub type Revision = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: Revision,
    /// Revision of the last write of the key (an object's `resource_version`).
    pub mod_revision: Revision,
    /// Number of writes since creation (1 after create).
    pub version: u64,
}

/// Condition a write needs to hold, checked atomically with the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Write unconditionally.
    None,
    /// The key must not exist.
    Absent,
    /// The key must exist with exactly this `mod_revision`.
    ModRevision(Revision),
}

/// One write of a [`Store::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub key: String,
    pub value: Vec<u8>,
    pub pre: Precondition,
}

/// A commit writes each key once: the key put twice otherwise.
pub(crate) fn distinct_keys(puts: &[Put]) -> Result<(), StoreError> {
    for (i, put) in puts.iter().enumerate() {
        if puts[..i].iter().any(|p| p.key == put.key) {
            return Err(StoreError::backend(
                format!("committing {}", put.key),
                "a commit writes each key once",
            ));
        }
    }
    Ok(())
}

/// One put through [`Store::commit`] (with its guard, if any): for backends whose single
/// writes are commits of one key.
pub(crate) async fn commit_one<S: Store + ?Sized>(
    store: &S,
    key: &str,
    value: Vec<u8>,
    pre: Precondition,
    guard: Option<(&str, Revision)>,
) -> Result<KeyValue, StoreError> {
    let put = Put {
        key: key.to_owned(),
        value,
        pre,
    };
    store
        .commit(vec![put], guard)
        .await?
        .pop()
        .ok_or_else(|| StoreError::backend(format!("writing {key}"), "nothing was written"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListResult {
    pub items: Vec<KeyValue>,
    /// Revision the list was read at; watch from it to see every later change.
    pub revision: Revision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put {
        kv: KeyValue,
        prev: Option<KeyValue>,
    },
    Delete {
        key: String,
        revision: Revision,
        prev: Option<KeyValue>,
    },
}

impl WatchEvent {
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put { kv, .. } => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { kv, .. } => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// A live watch. Events arrive in revision order. If the watcher falls too far behind, it
/// receives one `Err(StoreError::Compacted { .. })` and then the channel closes: relist.
#[derive(Debug)]
pub struct Watch {
    pub rx: mpsc::Receiver<Result<WatchEvent, StoreError>>,
}

impl Watch {
    pub async fn next(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        self.rx.recv().await
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// `key` as the nearest replica has it, which may be a little behind the newest write
    /// (etcd's serializable read: no round to the leader): for a read-modify-write whose
    /// compare-and-swap catches a stale read. Decisions that write nothing need [`Self::get`].
    async fn get_recent(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.get(key).await
    }
    /// All keys starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError>;
    /// Writes `value`; returns the stored key-value. `Conflict` if `pre` does not hold.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        pre: Precondition,
    ) -> Result<KeyValue, StoreError>;
    /// `put`, if also no key under `prefix` was written after revision `since` (`Changed`
    /// otherwise): a write decided on what a list of `prefix` read at `since`, such as an apply
    /// that checked its routes against every other service's. Deletions do not count. A
    /// [`Self::commit`] of one put: only the stores a server keeps its state in (embedded,
    /// etcd) support it.
    async fn put_unless_changed(
        &self,
        key: &str,
        value: Vec<u8>,
        pre: Precondition,
        prefix: &str,
        since: Revision,
    ) -> Result<KeyValue, StoreError> {
        commit_one(self, key, value, pre, Some((prefix, since))).await
    }
    /// Writes every put, all at one revision, or none of them: `Conflict` naming the first
    /// whose precondition does not hold, `Changed` when a `guard` (prefix, revision) is given
    /// and a key under the prefix was written after it. Returns the stored key-values in
    /// order. Each key once; since the keys share a revision, a watch resuming from it could
    /// miss the others under its prefix: write at most one key under any prefix watched (one
    /// object per kind). Stores without transactions write them one by one, in order, and
    /// refuse a guard.
    async fn commit(
        &self,
        puts: Vec<Put>,
        guard: Option<(&str, Revision)>,
    ) -> Result<Vec<KeyValue>, StoreError> {
        distinct_keys(&puts)?;
        if let Some((prefix, _)) = guard {
            return Err(StoreError::backend(
                format!("writing unless {prefix} changed"),
                "this store does not support guarded writes",
            ));
        }
        let mut written = Vec::with_capacity(puts.len());
        for put in puts {
            written.push(self.put(&put.key, put.value, put.pre).await?);
        }
        Ok(written)
    }
    /// Deletes `key`; returns the deleted value, `None` if absent (and `pre` is `None`).
    async fn delete(&self, key: &str, pre: Precondition) -> Result<Option<KeyValue>, StoreError>;
    /// Events for keys under `prefix` with revision > `after`.
    /// `Compacted` if `after` is older than the retained history.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError>;
    /// The current global revision.
    fn revision(&self) -> Revision;
}
