//! Typed access to stored objects ([`flotilla_spec::Object`]) over any [`Store`].
//!
//! Objects are stored as JSON under `T::PREFIX + name`. `metadata.resource_version` is never
//! trusted from storage (it is written as 0): every read sets it to the key's `mod_revision`, and
//! [`update`] / [`delete`] use it for compare-and-swap.
//!
//! [`Reflector`] / [`run_reflector`] keep an always-current map of every object of a kind
//! (list, then watch, relist when compacted), for controllers, the agent and the gateway.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use flotilla_spec::Object;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{KeyValue, Precondition, Revision, Store, StoreError, Watch, WatchEvent};

/// Most read-modify-write attempts [`modify`] makes before giving up with the last `Conflict`.
pub const MODIFY_ATTEMPTS: usize = 32;

/// Decodes a stored object and sets its `resource_version` to the key's `mod_revision`.
pub fn decode<T: Object>(kv: &KeyValue) -> Result<T, StoreError> {
    let mut obj: T = serde_json::from_slice(&kv.value).map_err(|source| StoreError::Decode {
        key: kv.key.clone(),
        source,
    })?;
    obj.metadata_mut().resource_version = kv.mod_revision;
    Ok(obj)
}

/// Encodes an object for storage, with `resource_version` zeroed (it lives in the store's
/// `mod_revision`, not in the value).
pub fn encode<T: Object>(obj: &T) -> Result<Vec<u8>, StoreError> {
    let encode_err = |source| StoreError::Encode {
        key: obj.key(),
        source,
    };
    if obj.metadata().resource_version == 0 {
        return serde_json::to_vec(obj).map_err(encode_err);
    }
    let mut stored = obj.clone();
    stored.metadata_mut().resource_version = 0;
    serde_json::to_vec(&stored).map_err(encode_err)
}

/// A random, UUID-v4-shaped identifier (`8-4-4-4-12` lowercase hex).
pub fn new_uid() -> String {
    let mut b: u128 = rand::random();
    b = (b & !(0xF << 76)) | (0x4 << 76); // version 4
    b = (b & !(0x3 << 62)) | (0x2 << 62); // RFC 4122 variant
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        b >> 96,
        (b >> 80) & 0xFFFF,
        (b >> 64) & 0xFFFF,
        (b >> 48) & 0xFFFF,
        b & 0xFFFF_FFFF_FFFF
    )
}

/// The object `name` of kind `T`, if it exists.
pub async fn get<T: Object>(store: &dyn Store, name: &str) -> Result<Option<T>, StoreError> {
    match store.get(&T::key_for(name)).await? {
        Some(kv) => decode(&kv).map(Some),
        None => Ok(None),
    }
}

/// [`get`] from the nearest replica ([`Store::get_recent`]): possibly a little behind, for a
/// read-modify-write whose compare-and-swap catches that.
pub async fn get_recent<T: Object>(store: &dyn Store, name: &str) -> Result<Option<T>, StoreError> {
    match store.get_recent(&T::key_for(name)).await? {
        Some(kv) => decode(&kv).map(Some),
        None => Ok(None),
    }
}

/// Every object of kind `T`, in name order, and the revision they were read at (watch from it).
///
/// A value that does not decode (written by another version, say) is left out with a warning
/// naming its key, as the reflector does: one bad object must not stop every list, and with it
/// the controller and the API.
pub async fn list<T: Object>(store: &dyn Store) -> Result<(Vec<T>, Revision), StoreError> {
    list_named(store, "").await
}

/// The objects of kind `T` whose names start with `name_prefix` (one range read), and the
/// revision they were read at.
pub async fn list_named<T: Object>(
    store: &dyn Store,
    name_prefix: &str,
) -> Result<(Vec<T>, Revision), StoreError> {
    let listed = store.list(&format!("{}{name_prefix}", T::PREFIX)).await?;
    let items = listed
        .items
        .iter()
        .filter_map(|kv| match decode(kv) {
            Ok(obj) => Some(obj),
            Err(error) => {
                tracing::warn!(key = %kv.key, %error, "skipping an object that does not decode");
                None
            }
        })
        .collect();
    Ok((items, listed.revision))
}

/// Decoded objects of one kind kept by name and revision: a fresh list reuses what did not
/// change since the last one instead of decoding it again (a list stays as consistent as the
/// store's; only the decoding is saved).
#[derive(Debug)]
pub struct DecodeCache<T> {
    cache: std::sync::Mutex<std::collections::HashMap<String, (Revision, T)>>,
}

impl<T> Default for DecodeCache<T> {
    fn default() -> Self {
        Self {
            cache: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl<T: Object + Clone> DecodeCache<T> {
    /// Every object of kind `T`, as [`list`] reads them.
    pub async fn list(&self, store: &dyn Store) -> Result<(Vec<T>, Revision), StoreError> {
        let listed = store.list(T::PREFIX).await?;
        let mut cache = crate::lock(&self.cache);
        let mut items = Vec::with_capacity(listed.items.len());
        let mut keep = std::collections::HashSet::with_capacity(listed.items.len());
        for kv in &listed.items {
            keep.insert(kv.key.as_str());
            if let Some((rev, obj)) = cache.get(&kv.key)
                && *rev == kv.mod_revision
            {
                items.push(obj.clone());
                continue;
            }
            match decode::<T>(kv) {
                Ok(obj) => {
                    cache.insert(kv.key.clone(), (kv.mod_revision, obj.clone()));
                    items.push(obj);
                }
                Err(error) => {
                    tracing::warn!(key = %kv.key, %error, "skipping an object that does not decode");
                }
            }
        }
        cache.retain(|k, _| keep.contains(k.as_str()));
        Ok((items, listed.revision))
    }
}

/// Stores a new object; `Conflict` if one of that name exists. Fills `uid` if empty,
/// `creation_timestamp` if unset and `generation = 1` if 0. Returns the stored object (with its
/// `resource_version`).
pub async fn create<T: Object>(store: &dyn Store, mut obj: T) -> Result<T, StoreError> {
    new_object(&mut obj);
    let kv = store
        .put(&obj.key(), encode(&obj)?, Precondition::Absent)
        .await?;
    obj.metadata_mut().resource_version = kv.mod_revision;
    Ok(obj)
}

/// What [`create`] fills in.
fn new_object<T: Object>(obj: &mut T) {
    let meta = obj.metadata_mut();
    if meta.uid.is_empty() {
        meta.uid = new_uid();
    }
    if meta.creation_timestamp.is_none() {
        meta.creation_timestamp = Some(flotilla_spec::now_rfc3339());
    }
    if meta.generation == 0 {
        meta.generation = 1;
    }
    meta.resource_version = 0;
}

/// [`create`] (`resource_version` 0) or [`update`] of `obj`, and `event` about it, in one
/// transaction (one write where the store has transactions, instead of two); with `since`,
/// only if no object of the kind was written after it (`Changed` otherwise): for a write
/// decided on a list of every object of the kind read at `since` (an apply's route check).
pub async fn write_with_event<T: Object>(
    store: &dyn Store,
    mut obj: T,
    since: Option<Revision>,
    mut event: flotilla_spec::Event,
) -> Result<T, StoreError> {
    // One key per kind in a commit (see `Store::commit`).
    debug_assert_ne!(T::KIND, flotilla_spec::Event::KIND);
    let pre = match obj.metadata().resource_version {
        0 => {
            new_object(&mut obj);
            Precondition::Absent
        }
        rv => Precondition::ModRevision(rv),
    };
    new_object(&mut event);
    let puts = vec![
        crate::Put {
            key: obj.key(),
            value: encode(&obj)?,
            pre,
        },
        crate::Put {
            key: event.key(),
            value: encode(&event)?,
            pre: Precondition::Absent,
        },
    ];
    let guard = since.map(|since| (T::PREFIX, since));
    let written = store.commit(puts, guard).await?;
    let kv = written
        .first()
        .ok_or_else(|| StoreError::backend(format!("writing {}", obj.key()), "nothing written"))?;
    obj.metadata_mut().resource_version = kv.mod_revision;
    crate::events::log(&event);
    Ok(obj)
}

/// Replaces an object if it is unchanged since it was read: compare-and-swap on
/// `metadata.resource_version` (`MissingResourceVersion` if 0, `Conflict` if stale or deleted).
/// Does not touch `generation`: the caller bumps it when it changes the spec.
pub async fn update<T: Object>(store: &dyn Store, mut obj: T) -> Result<T, StoreError> {
    let rv = obj.metadata().resource_version;
    if rv == 0 {
        return Err(StoreError::MissingResourceVersion { key: obj.key() });
    }
    let kv = store
        .put(&obj.key(), encode(&obj)?, Precondition::ModRevision(rv))
        .await?;
    obj.metadata_mut().resource_version = kv.mod_revision;
    Ok(obj)
}

/// Deletes the object `name` (only at revision `rv` when given). Returns the deleted object,
/// `None` if there was none.
pub async fn delete<T: Object>(
    store: &dyn Store,
    name: &str,
    rv: Option<Revision>,
) -> Result<Option<T>, StoreError> {
    let pre = rv.map_or(Precondition::None, Precondition::ModRevision);
    match store.delete(&T::key_for(name), pre).await? {
        Some(kv) => decode(&kv).map(Some),
        None => Ok(None),
    }
}

/// Read-modify-write with retries on conflict (up to [`MODIFY_ATTEMPTS`]). `f` edits the current
/// object and returns whether to write it (`false`: no write, the current object is returned).
/// `f` may run several times, each time on a freshly read object. `None` if the object does not
/// exist.
pub async fn modify<T: Object>(
    store: &dyn Store,
    name: &str,
    f: impl FnMut(&mut T) -> bool,
) -> Result<Option<T>, StoreError> {
    modify_with_event(store, name, None, f, None).await
}

/// [`modify`], starting from `known` (an object read lately; it is read again only if it
/// changed since), and when it writes, `event` in the same transaction (not stored when it
/// does not write).
pub async fn modify_with_event<T: Object>(
    store: &dyn Store,
    name: &str,
    mut known: Option<T>,
    mut f: impl FnMut(&mut T) -> bool,
    event: Option<flotilla_spec::Event>,
) -> Result<Option<T>, StoreError> {
    let mut last_conflict = None;
    for _ in 0..MODIFY_ATTEMPTS {
        let read = match known.take() {
            Some(obj) => Some(obj),
            None => get::<T>(store, name).await?,
        };
        let Some(mut obj) = read else {
            return Ok(None);
        };
        if !f(&mut obj) {
            return Ok(Some(obj));
        }
        let rv = obj.metadata().resource_version;
        // The key is the one read, whatever `f` did to the metadata.
        let meta = obj.metadata_mut();
        meta.name = name.to_owned();
        meta.resource_version = rv;
        let written = match &event {
            Some(event) => write_with_event(store, obj, None, event.clone()).await,
            None => update(store, obj).await,
        };
        match written {
            Ok(stored) => return Ok(Some(stored)),
            Err(err) if err.is_conflict() => {
                tracing::debug!(kind = T::KIND, name, "modify conflicted; retrying");
                last_conflict = Some(err);
            }
            Err(err) => return Err(err),
        }
    }
    Err(last_conflict.unwrap_or_else(|| StoreError::Conflict {
        key: T::key_for(name),
        expected: Precondition::None,
        actual: None,
    }))
}

/// A change to an object of kind `T`.
#[derive(Debug, Clone, PartialEq)]
pub enum TypedEvent<T> {
    /// Created or updated: the new object, `resource_version` = the write's revision.
    Put(T),
    /// Deleted: the last stored object, with `resource_version` set to the revision of the
    /// delete (as Kubernetes does), so a client can resume a watch from it.
    Deleted(T),
}

impl<T: Object> TypedEvent<T> {
    pub fn object(&self) -> &T {
        match self {
            TypedEvent::Put(obj) | TypedEvent::Deleted(obj) => obj,
        }
    }
    pub fn into_object(self) -> T {
        match self {
            TypedEvent::Put(obj) | TypedEvent::Deleted(obj) => obj,
        }
    }
    pub fn name(&self) -> &str {
        &self.object().metadata().name
    }
    /// Revision of the change.
    pub fn revision(&self) -> Revision {
        self.object().metadata().resource_version
    }
}

/// Converts a raw event under `T::PREFIX` into a typed one.
pub fn typed_event<T: Object>(event: &WatchEvent) -> Result<TypedEvent<T>, StoreError> {
    match event {
        WatchEvent::Put { kv, .. } => decode(kv).map(TypedEvent::Put),
        WatchEvent::Delete {
            key,
            revision,
            prev,
        } => {
            let prev = prev
                .as_ref()
                .ok_or_else(|| StoreError::MissingPrevious { key: key.clone() })?;
            let mut obj: T = decode(prev)?;
            obj.metadata_mut().resource_version = *revision;
            Ok(TypedEvent::Deleted(obj))
        }
    }
}

/// A watch over every object of kind `T`.
#[derive(Debug)]
pub struct TypedWatch<T> {
    inner: Watch,
    _kind: PhantomData<fn() -> T>,
}

impl<T: Object> TypedWatch<T> {
    /// The next change. `Err(Compacted)` (then `None`) when the watch cannot go on: relist.
    /// A value that does not decode gives `Err(Decode)` naming its key, and the watch goes on.
    pub async fn next(&mut self) -> Option<Result<TypedEvent<T>, StoreError>> {
        let event = self.inner.next().await?;
        Some(event.and_then(|e| typed_event(&e)))
    }

    pub fn into_inner(self) -> Watch {
        self.inner
    }
}

/// Watches every object of kind `T` changed after revision `after`.
pub async fn watch<T: Object>(
    store: &dyn Store,
    after: Revision,
) -> Result<TypedWatch<T>, StoreError> {
    Ok(TypedWatch {
        inner: store.watch(T::PREFIX, after).await?,
        _kind: PhantomData,
    })
}

// ---------------------------------------------------------------------------------------------
// Reflector

/// Every object of a kind, by name: a snapshot published by a reflector.
pub type ObjectMap<T> = Arc<BTreeMap<String, T>>;

/// Most events folded into one published snapshot.
const MAX_EVENTS_PER_PUBLISH: usize = 1_024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Keeps `tx` holding the full current map of objects of kind `T` (name → object): lists,
/// publishes, watches from the list's revision and publishes after every change (events already
/// queued are folded into one publication), relists on `Compacted`; a watch that fails or
/// ends any other way is resumed from the revision of its last event after a backoff (another
/// server of a cluster answers it), and relisted if the resumed one fails before any event. It
/// never stops on its own while the store is open: every way a watch can end leads to a new one.
///
/// Every full list is published with `send_replace`, so receivers are notified even when nothing
/// changed: the first notification a receiver sees after creation is the first complete list.
/// Objects whose value does not decode as `T` are left out of the map, with a warning.
///
/// Returns `Ok(())` when `shutdown` is cancelled or every receiver is dropped; `Err(Closed)` if
/// a list finds the store closed.
pub async fn run_reflector<T: Object>(
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    tx: watch::Sender<ObjectMap<T>>,
) -> Result<(), StoreError> {
    reflect(store, shutdown, tx, None).await
}

/// A running reflector (see [`run_reflector`]) owned by this handle: dropping the handle or
/// cancelling the token it was started with stops it.
#[derive(Debug)]
pub struct Reflector<T: Object> {
    rx: watch::Receiver<ObjectMap<T>>,
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<(), StoreError>>>,
}

impl<T: Object> Reflector<T> {
    /// Lists the objects (so the reflector is synced when this returns), then follows changes in
    /// a spawned task until `shutdown` is cancelled or the handle is dropped.
    pub async fn start(
        store: Arc<dyn Store>,
        shutdown: &CancellationToken,
    ) -> Result<Self, StoreError> {
        let (map, revision) = relist::<T>(store.as_ref()).await?;
        let (tx, rx) = watch::channel(Arc::new(map.clone()));
        let cancel = shutdown.child_token();
        let task = tokio::spawn(reflect(store, cancel.clone(), tx, Some((map, revision))));
        Ok(Self {
            rx,
            cancel,
            task: Some(task),
        })
    }

    /// The current map.
    pub fn current(&self) -> ObjectMap<T> {
        self.rx.borrow().clone()
    }

    /// A receiver of every new map (its current value is marked seen).
    ///
    /// Read the map to start from with the receiver's `borrow_and_update`, not with an earlier
    /// [`current`](Self::current): a map published between the two would count as seen and
    /// never be acted on (the gateway's routing table once froze that way).
    pub fn subscribe(&self) -> watch::Receiver<ObjectMap<T>> {
        let mut rx = self.rx.clone();
        rx.mark_unchanged();
        rx
    }

    /// Stops the reflector and waits for its task to end.
    pub async fn stop(mut self) -> Result<(), StoreError> {
        self.cancel.cancel();
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| StoreError::backend("reflector task failed", e))?,
            None => Ok(()),
        }
    }
}

impl<T: Object> Drop for Reflector<T> {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn relist<T: Object>(
    store: &dyn Store,
) -> Result<(BTreeMap<String, T>, Revision), StoreError> {
    let listed = store.list(T::PREFIX).await?;
    let mut map = BTreeMap::new();
    for kv in &listed.items {
        let Some(name) = kv.key.strip_prefix(T::PREFIX) else {
            continue;
        };
        match decode::<T>(kv) {
            Ok(obj) => {
                map.insert(name.to_owned(), obj);
            }
            Err(err) => {
                tracing::warn!(kind = T::KIND, error = %err, "skipping undecodable object");
            }
        }
    }
    Ok((map, listed.revision))
}

/// Why a watch ended.
enum WatchEnd<T> {
    Shutdown,
    /// The watch failed or ended (`None`): watch again from where it was, or relist.
    Ended {
        map: BTreeMap<String, T>,
        /// The revision of the last event applied (or the list's).
        revision: Revision,
        /// Whether it delivered an event: a watch that resumed and failed again at once relists.
        progressed: bool,
        error: Option<StoreError>,
    },
}

async fn reflect<T: Object>(
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    tx: watch::Sender<ObjectMap<T>>,
    mut listed: Option<(BTreeMap<String, T>, Revision)>,
) -> Result<(), StoreError> {
    let mut backoff = BACKOFF_MIN;
    // The watch about to start resumes one that ended.
    let mut resuming = false;
    loop {
        let (map, revision) = match listed.take() {
            Some(listed) => listed,
            None => {
                let result = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tx.closed() => return Ok(()),
                    result = relist::<T>(store.as_ref()) => result,
                };
                match result {
                    Ok((map, revision)) => {
                        tx.send_replace(Arc::new(map.clone()));
                        (map, revision)
                    }
                    Err(StoreError::Closed) => return Err(StoreError::Closed),
                    Err(err) => {
                        tracing::warn!(kind = T::KIND, error = %crate::error_chain(&err), "reflector list failed; retrying");
                        if !pause(&shutdown, &mut backoff).await {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
        };
        match follow(store.as_ref(), &shutdown, &tx, map, revision).await {
            WatchEnd::Shutdown => return Ok(()),
            WatchEnd::Ended {
                error: Some(err), ..
            } if err.is_compacted() => {
                tracing::debug!(kind = T::KIND, error = %crate::error_chain(&err), "reflector relisting");
                backoff = BACKOFF_MIN;
                resuming = false;
            }
            // A watch that ends any other way — a server gone, a stream cut, even `Closed` —
            // is resumed from its last revision (on a store of several servers, the next one
            // answers), once; if that one fails before any event too, the reflector relists.
            // Only the list decides that the store is closed for good: a reflector that stops
            // freezes every consumer.
            WatchEnd::Ended {
                map,
                revision,
                progressed,
                error,
            } => {
                let resume = progressed || !resuming;
                let what = if resume {
                    "reflector watch ended; resuming"
                } else {
                    "reflector watch ended; relisting"
                };
                match &error {
                    Some(e) => {
                        tracing::warn!(kind = T::KIND, revision, error = %crate::error_chain(e), "{what}")
                    }
                    None => tracing::warn!(kind = T::KIND, revision, "{what}"),
                }
                if progressed {
                    backoff = BACKOFF_MIN;
                }
                resuming = resume;
                if resume {
                    listed = Some((map, revision));
                }
                if !pause(&shutdown, &mut backoff).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Waits out the backoff (doubling it); false if shut down meanwhile.
async fn pause(shutdown: &CancellationToken, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

async fn follow<T: Object>(
    store: &dyn Store,
    shutdown: &CancellationToken,
    tx: &watch::Sender<ObjectMap<T>>,
    mut map: BTreeMap<String, T>,
    mut revision: Revision,
) -> WatchEnd<T> {
    let mut watch = match store.watch(T::PREFIX, revision).await {
        Ok(watch) => watch,
        Err(error) => {
            return WatchEnd::Ended {
                map,
                revision,
                progressed: false,
                error: Some(error),
            };
        }
    };
    let mut progressed = false;
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return WatchEnd::Shutdown,
            _ = tx.closed() => return WatchEnd::Shutdown,
            event = watch.next() => event,
        };
        let mut next = first;
        let mut applied = 0;
        loop {
            match next {
                Some(Ok(event)) => {
                    apply_event(&mut map, &event);
                    revision = revision.max(event.revision());
                    progressed = true;
                }
                ended => {
                    if applied > 0 {
                        tx.send_replace(Arc::new(map.clone()));
                    }
                    return WatchEnd::Ended {
                        map,
                        revision,
                        progressed,
                        error: ended.and_then(Result::err),
                    };
                }
            }
            applied += 1;
            if applied >= MAX_EVENTS_PER_PUBLISH {
                break;
            }
            match watch.rx.try_recv() {
                Ok(event) => next = Some(event),
                Err(_) => break,
            }
        }
        tx.send_replace(Arc::new(map.clone()));
    }
}

fn apply_event<T: Object>(map: &mut BTreeMap<String, T>, event: &WatchEvent) {
    let Some(name) = event.key().strip_prefix(T::PREFIX) else {
        return;
    };
    match event {
        WatchEvent::Put { kv, .. } => match decode::<T>(kv) {
            Ok(obj) => {
                map.insert(name.to_owned(), obj);
            }
            Err(err) => {
                tracing::warn!(kind = T::KIND, error = %err, "dropping undecodable object");
                map.remove(name);
            }
        },
        WatchEvent::Delete { .. } => {
            map.remove(name);
        }
    }
}
