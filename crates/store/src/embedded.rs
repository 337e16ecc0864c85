//! The embedded backend: etcd's semantics on one redb file.
//!
//! # Layout
//! - table `kv`: key → `create_revision (u64 LE) | mod_revision (u64 LE) | version (u64 LE) | value`
//! - table `meta`: `"revision"` → the global revision (the revision of the last write).
//!
//! # Writes
//! One dedicated writer thread owns every write transaction. Requests reach it over a bounded
//! channel; it takes every request already queued (up to [`StoreOptions::max_batch`]), applies
//! them in order inside one redb write transaction (each write gets its own revision and its own
//! precondition check against the state left by the writes before it), commits once with
//! `Durability::Immediate`, publishes the events, and only then answers the callers: an
//! acknowledged write is on disk and already visible to watchers. A write whose caller stops
//! waiting (a dropped future) may still be applied, as with etcd.
//!
//! # Reads
//! `get` and `list` run in `spawn_blocking` on a redb read transaction (a consistent snapshot):
//! a list reads the global revision in the same snapshot as its items.
//!
//! # Watches
//! The writer publishes every committed event into an in-memory history of the last
//! [`StoreOptions::history_limit`] events and into every matching watcher's bounded channel, under
//! one lock that `watch` also takes to replay the history and register: no event is lost or
//! duplicated between replay and live. The history is not persisted: after a restart it starts at
//! the current revision, and a watch from an older revision gets `Compacted`. A watcher whose
//! channel is full is sent one `Compacted` (one slot is always kept free for it) and dropped, so
//! writers never block on slow readers.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::{
    KeyValue, ListResult, Precondition, Put, Revision, Store, StoreError, Watch, WatchEvent,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION_KEY: &str = "revision";
const HEADER_LEN: usize = 24;

/// Tuning of an [`EmbeddedStore`]. `Default` is what production uses.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Events kept in memory for watches to replay from (default 10,000).
    pub history_limit: usize,
    /// Events a watcher may have queued, beyond its replay, before it is dropped with
    /// `Compacted` (default 1,024).
    pub watch_buffer: usize,
    /// Write requests queued for the writer thread before `put`/`delete` wait (default 1,024).
    pub write_queue: usize,
    /// Most writes committed in one transaction (default 256).
    pub max_batch: usize,
    /// Memory redb may use to cache pages (default 32 MiB; redb's own default is 1 GiB, which
    /// a long-running server would fill with every page it ever read: the kernel's page
    /// cache already holds a hot file).
    pub cache_bytes: usize,
    /// Commit with `Durability::Immediate` (default `true`). `false` is for tests and benches
    /// only: acknowledged writes may then be lost by a crash.
    pub durable: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            history_limit: 10_000,
            watch_buffer: 1_024,
            write_queue: 1_024,
            max_batch: 256,
            cache_bytes: 32 << 20,
            durable: true,
        }
    }
}

/// The embedded store. Cheap to share behind an `Arc` (`Arc<dyn Store>`).
///
/// Dropping it stops the writer thread (after the batch in progress, if any, which is waited
/// for) and closes the database file once the last read in flight ends.
pub struct EmbeddedStore {
    db: Arc<Database>,
    shared: Arc<Shared>,
    writer: Option<mpsc::Sender<WriteRequest>>,
    writer_thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

struct Shared {
    hub: Mutex<Hub>,
    revision: AtomicU64,
    closed: AtomicBool,
}

impl Shared {
    fn hub(&self) -> MutexGuard<'_, Hub> {
        // The hub's invariants hold between statements; a panic elsewhere cannot break them.
        self.hub
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl EmbeddedStore {
    /// Opens (creating if missing) the store at `path` with default options.
    ///
    /// Blocking: does file IO and one durable commit. Call it at start-up, or inside
    /// `spawn_blocking`. Needs no runtime itself; `get`/`list` need a tokio runtime.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// Opens (creating if missing) the store at `path`. See [`EmbeddedStore::open`].
    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create(path)
            .map_err(|e| StoreError::backend(format!("opening {}", path.display()), e))?;
        let revision = init_tables(&db)
            .map_err(|e| StoreError::backend(format!("initialising {}", path.display()), e))?;
        let db = Arc::new(db);
        let options = StoreOptions {
            history_limit: options.history_limit.max(1),
            watch_buffer: options.watch_buffer.max(1),
            write_queue: options.write_queue.max(1),
            max_batch: options.max_batch.max(1),
            cache_bytes: options.cache_bytes,
            durable: options.durable,
        };
        let shared = Arc::new(Shared {
            hub: Mutex::new(Hub {
                history: VecDeque::new(),
                start: revision,
                limit: options.history_limit,
                buffer: options.watch_buffer,
                watchers: Vec::new(),
                closed: false,
            }),
            revision: AtomicU64::new(revision),
            closed: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel(options.write_queue);
        let writer = Writer {
            db: db.clone(),
            shared: shared.clone(),
            max_batch: options.max_batch,
            durable: options.durable,
        };
        let writer_thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::backend("spawning the store writer thread", e))?;
        tracing::info!(path = %path.display(), revision, "store opened");
        Ok(Self {
            db,
            shared,
            writer: Some(tx),
            writer_thread: Some(writer_thread),
            path: path.to_owned(),
        })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving: every watcher gets `Err(Closed)` and its channel ends; later calls return
    /// `Closed`. Writes already queued still complete. The file is released on drop.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        let mut hub = self.shared.hub();
        hub.closed = true;
        for w in hub.watchers.drain(..) {
            // The reserved slot guarantees room for this message.
            let _ = w.tx.try_send(Err(StoreError::Closed));
        }
    }

    /// Revision of the oldest event a watch can still replay from (the smallest `after`).
    pub fn oldest_watchable(&self) -> Revision {
        self.shared.hub().start
    }

    /// Live watchers (those whose receiver was dropped are pruned on the next write or watch).
    pub fn watcher_count(&self) -> usize {
        self.shared.hub().watchers.len()
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.shared.closed.load(Ordering::Acquire) {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    async fn write(&self, op: Op) -> Result<Outcome, StoreError> {
        self.check_open()?;
        let writer = self.writer.as_ref().ok_or(StoreError::Closed)?;
        let (reply, rx) = oneshot::channel();
        writer
            .send(WriteRequest { op, reply })
            .await
            .map_err(|_| writer_gone())?;
        rx.await.map_err(|_| writer_gone())?
    }

    async fn read<R, F>(&self, what: &'static str, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Database) -> Result<R, StoreError> + Send + 'static,
    {
        self.check_open()?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::backend(format!("{what}: blocking task failed"), e))?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the request channel ends the writer loop after its current batch.
        self.writer.take();
        if let Some(thread) = self.writer_thread.take()
            && thread.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "store writer thread panicked");
        }
    }
}

fn writer_gone() -> StoreError {
    StoreError::backend(
        "writing",
        "the store writer thread has stopped (see earlier errors)",
    )
}

fn init_tables(db: &Database) -> Result<Revision, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    let revision = {
        txn.open_table(KV)?;
        let meta = txn.open_table(META)?;
        meta.get(REVISION_KEY)?.map(|g| g.value()).unwrap_or(0)
    };
    txn.commit()?;
    Ok(revision)
}

// ---------------------------------------------------------------------------------------------
// Record encoding

fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + kv.value.len());
    buf.extend_from_slice(&kv.create_revision.to_le_bytes());
    buf.extend_from_slice(&kv.mod_revision.to_le_bytes());
    buf.extend_from_slice(&kv.version.to_le_bytes());
    buf.extend_from_slice(&kv.value);
    buf
}

fn decode_record(key: &str, bytes: &[u8]) -> Result<KeyValue, StoreError> {
    Ok(KeyValue {
        key: key.to_owned(),
        create_revision: record_word(key, bytes, 0)?,
        mod_revision: record_mod_revision(key, bytes)?,
        version: record_word(key, bytes, 2)?,
        value: bytes
            .get(HEADER_LEN..)
            .ok_or_else(|| short_record(key, bytes))?
            .to_vec(),
    })
}

/// A record's `mod_revision`, without copying its value.
fn record_mod_revision(key: &str, bytes: &[u8]) -> Result<Revision, StoreError> {
    record_word(key, bytes, 1)
}

/// Word `i` of a record's header.
fn record_word(key: &str, bytes: &[u8], i: usize) -> Result<u64, StoreError> {
    let slice = bytes
        .get(i * 8..i * 8 + 8)
        .ok_or_else(|| short_record(key, bytes))?;
    let arr: [u8; 8] = slice.try_into().map_err(|_| short_record(key, bytes))?;
    Ok(u64::from_le_bytes(arr))
}

fn short_record(key: &str, bytes: &[u8]) -> StoreError {
    StoreError::backend(
        format!("decoding the record of {key}"),
        format!("record of {} bytes is shorter than its header", bytes.len()),
    )
}

fn backend<E: Into<redb::Error>>(context: impl Into<String>) -> impl FnOnce(E) -> StoreError {
    let context = context.into();
    move |e| StoreError::backend(context, e.into())
}

fn precondition_holds(pre: Precondition, current: Option<&KeyValue>) -> bool {
    match pre {
        Precondition::None => true,
        Precondition::Absent => current.is_none(),
        Precondition::ModRevision(rev) => current.is_some_and(|kv| kv.mod_revision == rev),
    }
}

// ---------------------------------------------------------------------------------------------
// Writer

enum Op {
    /// Every put at one revision, or none.
    Commit {
        puts: Vec<Put>,
        /// Also nothing under this prefix written after this revision.
        guard: Option<(String, Revision)>,
    },
    Delete {
        key: String,
        pre: Precondition,
    },
}

enum Outcome {
    Put(Vec<KeyValue>),
    Delete(Option<KeyValue>),
}

struct WriteRequest {
    op: Op,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

struct Writer {
    db: Arc<Database>,
    shared: Arc<Shared>,
    max_batch: usize,
    durable: bool,
}

impl Writer {
    fn run(self, mut rx: mpsc::Receiver<WriteRequest>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            self.process(&mut batch);
        }
        tracing::debug!("store writer stopped");
    }

    fn process(&self, batch: &mut Vec<WriteRequest>) {
        match self.apply(batch) {
            Ok((results, events, revision)) => {
                if !events.is_empty() {
                    let mut hub = self.shared.hub();
                    self.shared.revision.store(revision, Ordering::Release);
                    for event in events {
                        hub.publish(event);
                    }
                }
                for (req, result) in batch.drain(..).zip(results) {
                    let _ = req.reply.send(result);
                }
            }
            Err(err) => {
                tracing::error!(error = %err, writes = batch.len(), "store write batch failed");
                let message = err.to_string();
                for req in batch.drain(..) {
                    let _ = req.reply.send(Err(StoreError::backend(
                        "committing a write batch",
                        message.clone(),
                    )));
                }
            }
        }
    }

    /// Applies the batch in one transaction. Per-request results (conflicts are per request);
    /// an `Err` means nothing was written.
    #[allow(clippy::type_complexity)]
    fn apply(
        &self,
        batch: &[WriteRequest],
    ) -> Result<(Vec<Result<Outcome, StoreError>>, Vec<WatchEvent>, Revision), StoreError> {
        let mut txn = self
            .db
            .begin_write()
            .map_err(backend("beginning a write transaction"))?;
        let durability = if self.durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        txn.set_durability(durability)
            .map_err(backend("setting durability"))?;
        let mut results = Vec::with_capacity(batch.len());
        let mut events = Vec::new();
        let revision = {
            let mut kv = txn.open_table(KV).map_err(backend("opening table kv"))?;
            let mut meta = txn
                .open_table(META)
                .map_err(backend("opening table meta"))?;
            let mut revision = meta
                .get(REVISION_KEY)
                .map_err(backend("reading the revision"))?
                .map(|g| g.value())
                .unwrap_or(0);
            for req in batch {
                let (key, pre) = match &req.op {
                    Op::Commit { puts, guard } => {
                        let currents = match check_commit(&kv, puts, guard.as_ref())? {
                            Ok(currents) => currents,
                            Err(err) => {
                                results.push(Err(err));
                                continue;
                            }
                        };
                        revision += 1;
                        let mut written = Vec::with_capacity(puts.len());
                        for (put, current) in puts.iter().zip(currents) {
                            let new = KeyValue {
                                key: put.key.clone(),
                                value: put.value.clone(),
                                create_revision: current
                                    .as_ref()
                                    .map_or(revision, |c| c.create_revision),
                                mod_revision: revision,
                                version: current.as_ref().map_or(1, |c| c.version + 1),
                            };
                            kv.insert(put.key.as_str(), encode_record(&new).as_slice())
                                .map_err(backend(format!("writing {}", put.key)))?;
                            events.push(WatchEvent::Put {
                                kv: new.clone(),
                                prev: current,
                            });
                            written.push(new);
                        }
                        results.push(Ok(Outcome::Put(written)));
                        continue;
                    }
                    Op::Delete { key, pre } => (key.as_str(), *pre),
                };
                let current = match read_current(&kv, key)? {
                    Ok(current) => current,
                    Err(err) => {
                        // A corrupt record fails the writes to its key only.
                        results.push(Err(err));
                        continue;
                    }
                };
                // Deleting an absent key (under `None` or `Absent`) succeeds
                // without a write.
                if !precondition_holds(pre, current.as_ref()) {
                    results.push(Err(conflict(key, pre, current.as_ref())));
                    continue;
                }
                if current.is_some() {
                    revision += 1;
                    kv.remove(key).map_err(backend(format!("deleting {key}")))?;
                    events.push(WatchEvent::Delete {
                        key: key.to_owned(),
                        revision,
                        prev: current.clone(),
                    });
                }
                results.push(Ok(Outcome::Delete(current)));
            }
            if !events.is_empty() {
                meta.insert(REVISION_KEY, revision)
                    .map_err(backend("writing the revision"))?;
            }
            revision
        };
        if events.is_empty() {
            txn.abort()
                .map_err(backend("aborting an empty transaction"))?;
        } else {
            txn.commit().map_err(backend("committing"))?;
        }
        Ok((results, events, revision))
    }
}

/// The current record of `key`: the outer error fails the batch, the inner only the request
/// (a record that does not decode).
fn read_current(
    kv: &redb::Table<&str, &[u8]>,
    key: &str,
) -> Result<Result<Option<KeyValue>, StoreError>, StoreError> {
    Ok(
        match kv.get(key).map_err(backend(format!("reading {key}")))? {
            Some(guard) => decode_record(key, guard.value()).map(Some),
            None => Ok(None),
        },
    )
}

/// Whether a commit may be written, as this batch left the table: each key's current record,
/// or why not (a precondition, the guard, a record that does not decode).
#[allow(clippy::type_complexity)]
fn check_commit(
    kv: &redb::Table<&str, &[u8]>,
    puts: &[Put],
    guard: Option<&(String, Revision)>,
) -> Result<Result<Vec<Option<KeyValue>>, StoreError>, StoreError> {
    let mut currents = Vec::with_capacity(puts.len());
    for put in puts {
        let current = match read_current(kv, &put.key)? {
            Ok(current) => current,
            Err(err) => return Ok(Err(err)),
        };
        if !precondition_holds(put.pre, current.as_ref()) {
            return Ok(Err(conflict(&put.key, put.pre, current.as_ref())));
        }
        currents.push(current);
    }
    if let Some((prefix, since)) = guard {
        match newest_under(kv, prefix) {
            Ok(newest) if newest > *since => {
                return Ok(Err(StoreError::Changed {
                    prefix: prefix.clone(),
                    since: *since,
                    revision: newest,
                }));
            }
            Ok(_) => {}
            Err(err) => return Ok(Err(err)),
        }
    }
    Ok(Ok(currents))
}

/// The newest `mod_revision` of the keys under `prefix` (0 if none), as this batch left them.
fn newest_under(kv: &redb::Table<&str, &[u8]>, prefix: &str) -> Result<Revision, StoreError> {
    let range = kv
        .range::<&str>(prefix..)
        .map_err(backend(format!("listing {prefix}")))?;
    let mut newest = 0;
    for entry in range {
        let (k, v) = entry.map_err(backend(format!("listing {prefix}")))?;
        let key = k.value();
        if !key.starts_with(prefix) {
            break;
        }
        newest = newest.max(record_mod_revision(key, v.value())?);
    }
    Ok(newest)
}

fn conflict(key: &str, expected: Precondition, current: Option<&KeyValue>) -> StoreError {
    StoreError::Conflict {
        key: key.to_owned(),
        expected,
        actual: current.map(|c| c.mod_revision),
    }
}

// ---------------------------------------------------------------------------------------------
// Watch hub

pub(crate) type WatchSender = mpsc::Sender<Result<WatchEvent, StoreError>>;

/// Queues `event` for a watcher; `false` when the watcher is gone or fell behind. A watcher
/// whose channel is full is sent `Compacted` (from `last_sent`; the oldest replayable revision
/// is `oldest`) in the one slot always kept free for it, and is to be dropped.
pub(crate) fn offer(
    tx: &WatchSender,
    event: &WatchEvent,
    last_sent: Revision,
    oldest: Revision,
) -> bool {
    if tx.capacity() <= 1 {
        let _ = tx.try_send(Err(StoreError::Compacted {
            requested: last_sent,
            oldest,
        }));
        return false;
    }
    tx.try_send(Ok(event.clone())).is_ok()
}

struct Watcher {
    prefix: String,
    /// Only events with a revision above this are sent.
    after: Revision,
    /// Revision of the last event queued to this watcher.
    last_sent: Revision,
    tx: WatchSender,
}

struct Hub {
    /// Every event with a revision in `(start, last]`, in revision order.
    history: VecDeque<WatchEvent>,
    start: Revision,
    limit: usize,
    buffer: usize,
    watchers: Vec<Watcher>,
    closed: bool,
}

impl Hub {
    fn publish(&mut self, event: WatchEvent) {
        let revision = event.revision();
        self.history.push_back(event);
        while self.history.len() > self.limit {
            if let Some(old) = self.history.pop_front() {
                self.start = old.revision();
            }
        }
        let Some(event) = self.history.back() else {
            return;
        };
        let start = self.start;
        self.watchers.retain_mut(|w| {
            if w.tx.is_closed() {
                return false;
            }
            if revision <= w.after || !event.key().starts_with(&w.prefix) {
                return true;
            }
            if !offer(&w.tx, event, w.last_sent, start) {
                tracing::warn!(prefix = %w.prefix, last_sent = w.last_sent, "watcher fell behind; dropping it");
                return false;
            }
            w.last_sent = revision;
            true
        });
    }

    fn register(&mut self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        if self.closed {
            return Err(StoreError::Closed);
        }
        if after < self.start {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: self.start,
            });
        }
        let from = self.history.partition_point(|e| e.revision() <= after);
        let replay: Vec<WatchEvent> = self
            .history
            .range(from..)
            .filter(|e| e.key().starts_with(prefix))
            .cloned()
            .collect();
        let (tx, rx) = mpsc::channel(replay.len() + self.buffer + 1);
        let mut last_sent = after;
        for event in replay {
            last_sent = event.revision();
            tx.try_send(Ok(event))
                .map_err(|e| StoreError::backend("replaying watch history", e.to_string()))?;
        }
        self.watchers.retain(|w| !w.tx.is_closed());
        self.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            after,
            last_sent,
            tx,
        });
        Ok(Watch { rx })
    }
}

// ---------------------------------------------------------------------------------------------
// Store impl

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.read("get", move |db| {
            let txn = db.begin_read().map_err(backend("beginning a read"))?;
            let table = txn.open_table(KV).map_err(backend("opening table kv"))?;
            match table
                .get(key.as_str())
                .map_err(backend(format!("reading {key}")))?
            {
                Some(guard) => Ok(Some(decode_record(&key, guard.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        let prefix = prefix.to_owned();
        self.read("list", move |db| {
            let txn = db.begin_read().map_err(backend("beginning a read"))?;
            let meta = txn
                .open_table(META)
                .map_err(backend("opening table meta"))?;
            let revision = meta
                .get(REVISION_KEY)
                .map_err(backend("reading the revision"))?
                .map(|g| g.value())
                .unwrap_or(0);
            let table = txn.open_table(KV).map_err(backend("opening table kv"))?;
            let range = table
                .range::<&str>(prefix.as_str()..)
                .map_err(backend(format!("listing {prefix}")))?;
            let mut items = Vec::new();
            for entry in range {
                let (k, v) = entry.map_err(backend(format!("listing {prefix}")))?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                items.push(decode_record(key, v.value())?);
            }
            Ok(ListResult { items, revision })
        })
        .await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        pre: Precondition,
    ) -> Result<KeyValue, StoreError> {
        crate::commit_one(self, key, value, pre, None).await
    }

    async fn commit(
        &self,
        puts: Vec<Put>,
        guard: Option<(&str, Revision)>,
    ) -> Result<Vec<KeyValue>, StoreError> {
        crate::distinct_keys(&puts)?;
        if puts.is_empty() {
            return Ok(Vec::new());
        }
        let op = Op::Commit {
            puts,
            guard: guard.map(|(prefix, since)| (prefix.to_owned(), since)),
        };
        match self.write(op).await? {
            Outcome::Put(written) => Ok(written),
            Outcome::Delete(_) => Err(StoreError::backend("commit", "writer answered a delete")),
        }
    }

    async fn delete(&self, key: &str, pre: Precondition) -> Result<Option<KeyValue>, StoreError> {
        let op = Op::Delete {
            key: key.to_owned(),
            pre,
        };
        match self.write(op).await? {
            Outcome::Delete(prev) => Ok(prev),
            Outcome::Put(_) => Err(StoreError::backend("delete", "writer answered a put")),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        self.check_open()?;
        self.shared.hub().register(prefix, after)
    }

    fn revision(&self) -> Revision {
        self.shared.revision.load(Ordering::Acquire)
    }
}
