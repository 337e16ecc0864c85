//! Typed helpers and the reflector, on the embedded store.

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
