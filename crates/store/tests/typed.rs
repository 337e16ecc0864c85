//! Typed helpers and the reflector, on the embedded store.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla_spec::{Event, EventType, ObjectMeta, ObjectRef};
use flotilla_store::typed::{self, ObjectMap, Reflector, TypedEvent};
use flotilla_store::{EmbeddedStore, Precondition, Store, StoreError, StoreOptions};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

fn open(dir: &Path, options: StoreOptions) -> Arc<dyn Store> {
    Arc::new(EmbeddedStore::open_with(&dir.join("store.redb"), options).expect("open store"))
}

fn event(name: &str, message: &str) -> Event {
    Event {
        metadata: ObjectMeta::named(name),
        involved: ObjectRef {
            kind: "Service".into(),
            name: "web".into(),
        },
        kind: EventType::Normal,
        reason: "Test".into(),
        message: message.into(),
        source: "test".into(),
        timestamp: flotilla_spec::now_rfc3339(),
    }
}

#[tokio::test]
async fn create_get_update_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreOptions::default());
    let store = store.as_ref();

    let created = typed::create(store, event("e1", "hello")).await.unwrap();
    let meta = &created.metadata;
    assert_eq!(meta.uid.len(), 36);
    assert_eq!(meta.uid.matches('-').count(), 4);
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, 1);
    assert_eq!(meta.resource_version, 1);
    assert_eq!(
        typed::get::<Event>(store, "e1").await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(typed::get::<Event>(store, "nope").await.unwrap(), None);

    // resource_version is not stored in the value.
    let raw = store.get("/registry/events/e1").await.unwrap().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&raw.value).unwrap();
    assert_eq!(json["metadata"]["resourceVersion"], 0);

    // A second create of the same name conflicts.
    let err = typed::create(store, event("e1", "again"))
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");

    // Update is compare-and-swap on resource_version.
    let mut changed = created.clone();
    changed.message = "changed".into();
    let updated = typed::update(store, changed.clone()).await.unwrap();
    assert_eq!(updated.metadata.resource_version, 2);
    assert_eq!(updated.metadata.uid, created.metadata.uid);
    let err = typed::update(store, changed.clone()).await.unwrap_err();
    assert!(err.is_conflict(), "stale update: {err}");
    let mut unread = changed.clone();
    unread.metadata.resource_version = 0;
    let err = typed::update(store, unread).await.unwrap_err();
    assert!(
        matches!(err, StoreError::MissingResourceVersion { .. }),
        "{err}"
    );

    let (items, revision) = typed::list::<Event>(store).await.unwrap();
    assert_eq!(items, vec![updated.clone()]);
    assert_eq!(revision, 2);

    // Delete: stale revision conflicts; then returns the deleted object.
    let err = typed::delete::<Event>(store, "e1", Some(1))
        .await
        .unwrap_err();
    assert!(err.is_conflict());
    let deleted = typed::delete::<Event>(store, "e1", Some(2)).await.unwrap();
    assert_eq!(deleted, Some(updated));
    assert_eq!(
        typed::delete::<Event>(store, "e1", None).await.unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modify_retries_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        dir.path(),
        StoreOptions {
            durable: false,
            ..StoreOptions::default()
        },
    );
    typed::create(store.as_ref(), event("counter", "0"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                let out = typed::modify::<Event>(store.as_ref(), "counter", |e| {
                    let n: u64 = e.message.parse().unwrap();
                    e.message = (n + 1).to_string();
                    true
                })
                .await
                .unwrap();
                assert!(out.is_some());
            }
        }));
    }
    for task in tasks {
        timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap();
    }
    let counter = typed::get::<Event>(store.as_ref(), "counter")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(counter.message, "40");

    // `false`: no write, the current object is returned.
    let revision = store.revision();
    let same = typed::modify::<Event>(store.as_ref(), "counter", |_| false)
        .await
        .unwrap();
    assert_eq!(same, Some(counter));
    assert_eq!(store.revision(), revision);

    // Absent object: None, `f` not called.
    let none = typed::modify::<Event>(store.as_ref(), "missing", |_| panic!("called"))
        .await
        .unwrap();
    assert_eq!(none, None);
}

#[tokio::test]
async fn typed_watch_yields_puts_deletes_and_decode_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreOptions::default());
    let store = store.as_ref();
    let mut watch = typed::watch::<Event>(store, 0).await.unwrap();

    let created = typed::create(store, event("a", "1")).await.unwrap();
    store
        .put(
            "/registry/events/bad",
            b"{not json".to_vec(),
            Precondition::None,
        )
        .await
        .unwrap();
    typed::delete::<Event>(store, "a", None).await.unwrap();
    // Other kinds are not seen.
    store
        .put("/registry/services/x", b"{}".to_vec(), Precondition::None)
        .await
        .unwrap();

    let e = timeout(WAIT, watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(e, TypedEvent::Put(created.clone()));
    let err = timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    match err {
        StoreError::Decode { key, .. } => assert_eq!(key, "/registry/events/bad"),
        other => panic!("unexpected {other}"),
    }
    let e = timeout(WAIT, watch.next()).await.unwrap().unwrap().unwrap();
    match &e {
        TypedEvent::Deleted(obj) => {
            assert_eq!(obj.metadata.uid, created.metadata.uid);
            assert_eq!(e.revision(), 3);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(watch.into_inner().rx.try_recv().is_err());
}

async fn wait_for_map(
    rx: &mut watch::Receiver<ObjectMap<Event>>,
    what: &str,
    pred: impl FnMut(&ObjectMap<Event>) -> bool,
) -> ObjectMap<Event> {
    timeout(WAIT, rx.wait_for(pred))
        .await
        .unwrap_or_else(|_| panic!("reflector never showed {what}"))
        .expect("reflector stopped")
        .clone()
}

#[tokio::test]
async fn reflector_follows_creates_updates_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreOptions::default());
    typed::create(store.as_ref(), event("a", "1"))
        .await
        .unwrap();
    let shutdown = CancellationToken::new();

    let reflector = Reflector::<Event>::start(store.clone(), &shutdown)
        .await
        .unwrap();
    // Synced on start.
    assert_eq!(reflector.current().keys().collect::<Vec<_>>(), ["a"]);
    let mut rx = reflector.subscribe();

    let b = typed::create(store.as_ref(), event("b", "1"))
        .await
        .unwrap();
    let map = wait_for_map(&mut rx, "b", |m| m.contains_key("b")).await;
    assert_eq!(map["b"], b);

    typed::modify::<Event>(store.as_ref(), "a", |e| {
        e.message = "2".into();
        true
    })
    .await
    .unwrap();
    wait_for_map(&mut rx, "a updated", |m| {
        m.get("a").is_some_and(|a| a.message == "2")
    })
    .await;

    typed::delete::<Event>(store.as_ref(), "b", None)
        .await
        .unwrap();
    let map = wait_for_map(&mut rx, "b deleted", |m| !m.contains_key("b")).await;
    assert_eq!(map.keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(map["a"].metadata.resource_version, 3);

    timeout(WAIT, reflector.stop()).await.unwrap().unwrap();
}

#[test]
fn reflector_relists_after_compacted() {
    // A current-thread runtime: while this thread is blocked below, the reflector cannot drain
    // its watch, so it overflows and gets `Compacted`.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        dir.path(),
        StoreOptions {
            watch_buffer: 4,
            durable: false,
            ..StoreOptions::default()
        },
    );
    let shutdown = CancellationToken::new();
    let (tx, mut rx) = watch::channel(ObjectMap::<Event>::default());
    let task = rt.spawn(typed::run_reflector(store.clone(), shutdown.clone(), tx));
    rt.block_on(async {
        // The first notification is the first full list.
        timeout(WAIT, rx.changed()).await.unwrap().unwrap();
        assert!(rx.borrow_and_update().is_empty());
    });

    // Write from another thread and runtime while this runtime is parked.
    let writer_store = store.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for i in 0..50 {
                typed::create(writer_store.as_ref(), event(&format!("e{i:02}"), "x"))
                    .await
                    .unwrap();
            }
            typed::delete::<Event>(writer_store.as_ref(), "e00", None)
                .await
                .unwrap();
        });
    })
    .join()
    .unwrap();

    rt.block_on(async {
        // Only a relist can show everything: the watch dropped all but its first few events.
        let map = wait_for_map(&mut rx, "all 49 objects", |m| m.len() == 49).await;
        assert!(!map.contains_key("e00"));
        assert_eq!(map["e49"].metadata.resource_version, 50);
        shutdown.cancel();
        timeout(WAIT, task).await.unwrap().unwrap().unwrap();
    });
}

/// name → resource_version of a map of events.
fn versions(map: &ObjectMap<Event>) -> Vec<(String, u64)> {
    map.iter()
        .map(|(name, e)| (name.clone(), e.metadata.resource_version))
        .collect()
}

/// Waits until `rx` shows exactly what the store holds now (no writes are in flight).
async fn converges(rx: &mut watch::Receiver<ObjectMap<Event>>, store: &dyn Store, what: &str) {
    let (items, _) = typed::list::<Event>(store).await.unwrap();
    let want: Vec<(String, u64)> = items
        .iter()
        .map(|e| (e.metadata.name.clone(), e.metadata.resource_version))
        .collect();
    let reached = timeout(WAIT, rx.wait_for(|m| versions(m) == want))
        .await
        .map(|result| result.map(drop));
    match reached {
        Ok(result) => result.expect("reflector stopped"),
        Err(_) => panic!(
            "{what}: reflector froze; store has {want:?}, reflector shows {:?}",
            versions(&rx.borrow())
        ),
    }
}

/// Several writers create, change and delete overlapping objects while watches so small that
/// every reflector keeps being dropped (`Compacted`) and relisting, some from a revision already
/// out of the history; reflectors started mid-burst register between their list and their
/// watch under churn. After every burst, every reflector must show exactly the store's content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflectors_converge_under_concurrent_churn_and_compaction() {
    const WRITERS: usize = 4;
    const OPS: usize = 150;
    const ROUNDS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        dir.path(),
        StoreOptions {
            watch_buffer: 1,
            history_limit: 3,
            max_batch: 4,
            durable: false,
            ..StoreOptions::default()
        },
    );
    let shutdown = CancellationToken::new();
    let mut reflectors = vec![
        Reflector::<Event>::start(store.clone(), &shutdown)
            .await
            .unwrap(),
    ];
    let mut receivers = vec![reflectors[0].subscribe()];
    for round in 0..ROUNDS {
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            let store = store.clone();
            writers.spawn(async move {
                for i in 0..OPS {
                    // Overlapping names: writers race on the same objects.
                    let name = format!("o{:02}", (i * 7 + w * 3 + round) % 24);
                    let result = match (i + w) % 4 {
                        0 | 1 => typed::create(store.as_ref(), event(&name, "new"))
                            .await
                            .map(drop),
                        2 => typed::modify::<Event>(store.as_ref(), &name, |e| {
                            e.message = format!("{w}/{i}");
                            true
                        })
                        .await
                        .map(drop),
                        _ => typed::delete::<Event>(store.as_ref(), &name, None)
                            .await
                            .map(drop),
                    };
                    match result {
                        Ok(()) => {}
                        Err(e) if e.is_conflict() => {}
                        Err(e) => panic!("write failed: {e}"),
                    }
                }
            });
        }
        // A reflector that lists and registers its watch while the writers run.
        tokio::task::yield_now().await;
        let late = Reflector::<Event>::start(store.clone(), &shutdown)
            .await
            .unwrap();
        receivers.push(late.subscribe());
        reflectors.push(late);
        while let Some(done) = writers.join_next().await {
            done.unwrap();
        }
        for (i, rx) in receivers.iter_mut().enumerate() {
            converges(rx, store.as_ref(), &format!("round {round}, reflector {i}")).await;
        }
    }
    for reflector in reflectors {
        timeout(WAIT, reflector.stop()).await.unwrap().unwrap();
    }
}

/// The embedded store, with watches that can be cut with `Closed` (as a remote watch stream
/// that ends looked) and lists that can be made to fail with `Closed` while the store is open.
struct CuttableStore {
    inner: Arc<dyn Store>,
    cut: std::sync::Mutex<CancellationToken>,
    closed_lists: std::sync::atomic::AtomicUsize,
}

impl CuttableStore {
    fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            cut: std::sync::Mutex::new(CancellationToken::new()),
            closed_lists: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Ends every open watch with `Closed`; the next `closed_lists` lists fail with `Closed`,
    /// and so does every watch until then.
    fn cut(&self, closed_lists: usize) {
        self.closed_lists
            .store(closed_lists, std::sync::atomic::Ordering::SeqCst);
        let old = std::mem::take(&mut *self.cut.lock().unwrap());
        old.cancel();
    }
}

#[async_trait::async_trait]
impl Store for CuttableStore {
    async fn get(&self, key: &str) -> Result<Option<flotilla_store::KeyValue>, StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<flotilla_store::ListResult, StoreError> {
        let failed = self.closed_lists.fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |n| n.checked_sub(1),
        );
        if failed.is_ok() {
            return Err(StoreError::Closed);
        }
        self.inner.list(prefix).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        pre: Precondition,
    ) -> Result<flotilla_store::KeyValue, StoreError> {
        self.inner.put(key, value, pre).await
    }
    async fn delete(
        &self,
        key: &str,
        pre: Precondition,
    ) -> Result<Option<flotilla_store::KeyValue>, StoreError> {
        self.inner.delete(key, pre).await
    }
    async fn watch(
        &self,
        prefix: &str,
        after: flotilla_store::Revision,
    ) -> Result<flotilla_store::Watch, StoreError> {
        if self.closed_lists.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return Err(StoreError::Closed);
        }
        let mut inner = self.inner.watch(prefix, after).await?;
        let cut = self.cut.lock().unwrap().clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    biased;
                    () = cut.cancelled() => {
                        let _ = tx.send(Err(StoreError::Closed)).await;
                        return;
                    }
                    event = inner.rx.recv() => event,
                };
                match event {
                    Some(event) => {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                }
            }
        });
        Ok(flotilla_store::Watch { rx })
    }
    fn revision(&self) -> flotilla_store::Revision {
        self.inner.revision()
    }
}

/// A watch that ends with `Closed` while the store is open (as a remote watch stream did when
/// the API restarted) used to stop the reflector for good, freezing every consumer: now it
/// resumes from the last revision and misses nothing.
#[tokio::test]
async fn reflector_relists_after_a_watch_ends_with_closed() {
    let dir = tempfile::tempdir().unwrap();
    let inner = open(dir.path(), StoreOptions::default());
    let store = Arc::new(CuttableStore::new(inner.clone()));
    let shutdown = CancellationToken::new();
    let reflector = Reflector::<Event>::start(store.clone(), &shutdown)
        .await
        .unwrap();
    let mut rx = reflector.subscribe();
    typed::create(inner.as_ref(), event("a", "1"))
        .await
        .unwrap();
    wait_for_map(&mut rx, "a", |m| m.contains_key("a")).await;

    store.cut(0);
    typed::create(inner.as_ref(), event("b", "1"))
        .await
        .unwrap();
    wait_for_map(&mut rx, "b, after the watch was cut", |m| {
        m.contains_key("b")
    })
    .await;

    // A closed store: the watch resumed after the cut fails at once, the reflector relists,
    // and a list that finds the store closed ends it, with `Closed`.
    store.cut(usize::MAX);
    let ended = timeout(WAIT, rx.changed()).await.expect("reflector ends");
    assert!(ended.is_err(), "the reflector's sender is dropped");
    let result = timeout(WAIT, reflector.stop()).await.unwrap();
    assert!(matches!(result, Err(StoreError::Closed)), "{result:?}");
}

/// A decode cache answers what a plain list would, change after change, and what a prefix
/// list reads is exactly the objects whose names start with it.
#[tokio::test]
async fn the_decode_cache_and_named_lists_read_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreOptions::default());
    let store = store.as_ref();
    let cache = typed::DecodeCache::<Event>::default();
    let messages = |items: Vec<Event>| {
        let mut v: Vec<(String, String)> = items
            .into_iter()
            .map(|e| (e.metadata.name, e.message))
            .collect();
        v.sort();
        v
    };
    for name in ["web-a", "web-b", "webber-c", "api-d"] {
        typed::create(store, event(name, "one")).await.unwrap();
    }
    let (first, _) = cache.list(store).await.unwrap();
    assert_eq!(first.len(), 4);
    typed::modify::<Event>(store, "web-a", |e| {
        e.message = "two".into();
        true
    })
    .await
    .unwrap();
    typed::delete::<Event>(store, "api-d", None).await.unwrap();
    let (cached, rev) = cache.list(store).await.unwrap();
    let (plain, plain_rev) = typed::list::<Event>(store).await.unwrap();
    assert_eq!(rev, plain_rev);
    assert_eq!(messages(cached), messages(plain));
    let (web, _) = typed::list_named::<Event>(store, "web-").await.unwrap();
    let names: Vec<String> = web.into_iter().map(|e| e.metadata.name).collect();
    assert_eq!(names, vec!["web-a".to_string(), "web-b".to_string()]);
}
