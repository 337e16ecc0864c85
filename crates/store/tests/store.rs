//! The embedded store against real redb files in temporary directories.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_store::{
    EmbeddedStore, KeyValue, Precondition, Revision, Store, StoreError, StoreOptions, Watch,
    WatchEvent,
};
use proptest::prelude::*;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn open(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(&dir.join("store.redb")).expect("open store")
}

fn open_with(dir: &Path, options: StoreOptions) -> EmbeddedStore {
    EmbeddedStore::open_with(&dir.join("store.redb"), options).expect("open store")
}

async fn put(store: &dyn Store, key: &str, value: &str, pre: Precondition) -> KeyValue {
    timeout(WAIT, store.put(key, value.as_bytes().to_vec(), pre))
        .await
        .expect("put timed out")
        .expect("put")
}

async fn next_event(watch: &mut Watch) -> Result<WatchEvent, StoreError> {
    timeout(WAIT, watch.next())
        .await
        .expect("no watch event in time")
        .expect("watch ended")
}

/// Asserts nothing is queued on the watch right now (events are queued before writes return).
fn assert_idle(watch: &mut Watch) {
    assert!(
        watch.rx.try_recv().is_err(),
        "unexpected event queued on the watch"
    );
}

#[tokio::test]
async fn cas_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());

    let a1 = put(&store, "a", "one", Precondition::Absent).await;
    assert_eq!((a1.create_revision, a1.mod_revision, a1.version), (1, 1, 1));

    // Absent on an existing key conflicts and leaves the value alone.
    let err = store
        .put("a", b"two".to_vec(), Precondition::Absent)
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    match err {
        StoreError::Conflict {
            key,
            expected,
            actual,
        } => {
            assert_eq!(key, "a");
            assert_eq!(expected, Precondition::Absent);
            assert_eq!(actual, Some(1));
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(store.get("a").await.unwrap(), Some(a1.clone()));
    assert_eq!(store.revision(), 1);

    // CAS on the current revision succeeds.
    let a2 = put(&store, "a", "two", Precondition::ModRevision(1)).await;
    assert_eq!((a2.create_revision, a2.mod_revision, a2.version), (1, 2, 2));
    assert_eq!(a2.value, b"two");

    // A stale revision conflicts and changes nothing.
    let err = store
        .put("a", b"three".to_vec(), Precondition::ModRevision(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                actual: Some(2),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(store.get("a").await.unwrap(), Some(a2.clone()));

    // CAS on a missing key conflicts.
    let err = store
        .put("b", b"x".to_vec(), Precondition::ModRevision(1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { actual: None, .. }),
        "{err}"
    );
    assert_eq!(store.get("b").await.unwrap(), None);

    // Deletes: stale revision conflicts; Absent on an existing key conflicts.
    let err = store
        .delete("a", Precondition::ModRevision(1))
        .await
        .unwrap_err();
    assert!(err.is_conflict());
    let err = store.delete("a", Precondition::Absent).await.unwrap_err();
    assert!(err.is_conflict());
    assert_eq!(store.revision(), 2);

    let deleted = store
        .delete("a", Precondition::ModRevision(2))
        .await
        .unwrap();
    assert_eq!(deleted, Some(a2));
    assert_eq!(store.revision(), 3);
    assert_eq!(store.get("a").await.unwrap(), None);

    // Deleting an absent key succeeds without a write.
    assert_eq!(store.delete("a", Precondition::None).await.unwrap(), None);
    assert_eq!(store.delete("a", Precondition::Absent).await.unwrap(), None);
    assert_eq!(store.revision(), 3);

    // Re-creating starts a new lifetime: version 1, new create_revision.
    let a3 = put(&store, "a", "again", Precondition::Absent).await;
    assert_eq!((a3.create_revision, a3.mod_revision, a3.version), (4, 4, 1));
}

#[tokio::test]
async fn revisions_are_monotonic_and_deletes_bump_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.revision(), 0);
    let mut last = 0;
    for i in 0..20 {
        let key = format!("k/{}", i % 5);
        let kv = put(&store, &key, "v", Precondition::None).await;
        assert_eq!(kv.mod_revision, last + 1);
        last = kv.mod_revision;
        assert_eq!(store.revision(), last);
    }
    let prev = store.delete("k/0", Precondition::None).await.unwrap();
    assert!(prev.is_some());
    assert_eq!(store.revision(), last + 1);
}

#[tokio::test]
async fn list_by_prefix_in_key_order_at_a_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for key in ["a/2", "b/1", "a/1", "a", "a0", "a/3"] {
        put(&store, key, key, Precondition::None).await;
    }
    store.delete("a/3", Precondition::None).await.unwrap();
    let listed = store.list("a/").await.unwrap();
    let keys: Vec<_> = listed.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["a/1", "a/2"]);
    assert_eq!(listed.revision, 7);
    assert_eq!(listed.items[0].value, b"a/1");
    assert_eq!(store.list("").await.unwrap().items.len(), 5);
    assert!(store.list("zzz").await.unwrap().items.is_empty());
}

#[tokio::test]
async fn watch_replays_from_a_revision_then_streams_live() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    put(&store, "w/a", "1", Precondition::None).await;
    put(&store, "other/x", "1", Precondition::None).await;
    put(&store, "w/b", "1", Precondition::None).await;
    put(&store, "w/a", "2", Precondition::None).await;

    let mut watch = store.watch("w/", 1).await.unwrap();
    let e = next_event(&mut watch).await.unwrap();
    assert_eq!((e.key(), e.revision()), ("w/b", 3));
    let e = next_event(&mut watch).await.unwrap();
    assert_eq!((e.key(), e.revision()), ("w/a", 4));
    match e {
        WatchEvent::Put { kv, prev } => {
            assert_eq!(kv.value, b"2");
            assert_eq!(prev.map(|p| p.value), Some(b"1".to_vec()));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_idle(&mut watch);

    put(&store, "other/y", "1", Precondition::None).await;
    store.delete("w/b", Precondition::None).await.unwrap();
    let e = next_event(&mut watch).await.unwrap();
    match e {
        WatchEvent::Delete {
            key,
            revision,
            prev,
        } => {
            assert_eq!((key.as_str(), revision), ("w/b", 6));
            assert_eq!(prev.map(|p| p.mod_revision), Some(3));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_idle(&mut watch);

    // Watching from the current revision (or beyond) sees only later writes.
    let mut tail = store.watch("w/", store.revision()).await.unwrap();
    let mut future = store.watch("w/", 7).await.unwrap();
    assert_idle(&mut tail);
    put(&store, "w/c", "1", Precondition::None).await; // revision 7
    put(&store, "w/d", "1", Precondition::None).await; // revision 8
    assert_eq!(next_event(&mut tail).await.unwrap().revision(), 7);
    assert_eq!(next_event(&mut future).await.unwrap().revision(), 8);
}

#[tokio::test]
async fn resuming_from_the_last_seen_revision_sees_exactly_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut watch = store.watch("", 0).await.unwrap();
    for i in 0..10 {
        put(&store, &format!("k/{i}"), "v", Precondition::None).await;
    }
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_event(&mut watch).await.unwrap().revision());
    }
    drop(watch);
    let last = *seen.last().unwrap();
    let mut resumed = store.watch("", last).await.unwrap();
    for _ in 0..3 {
        put(&store, "k/late", "v", Precondition::None).await;
    }
    for _ in 0..9 {
        seen.push(next_event(&mut resumed).await.unwrap().revision());
    }
    assert_idle(&mut resumed);
    assert_eq!(seen, (1..=13).collect::<Vec<Revision>>());
}

#[tokio::test]
async fn too_old_revisions_are_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(
        dir.path(),
        StoreOptions {
            history_limit: 5,
            ..StoreOptions::default()
        },
    );
    for i in 0..10 {
        put(&store, &format!("k/{i}"), "v", Precondition::None).await;
    }
    assert_eq!(store.oldest_watchable(), 5);
    let err = store.watch("k/", 4).await.unwrap_err();
    match err {
        StoreError::Compacted { requested, oldest } => assert_eq!((requested, oldest), (4, 5)),
        other => panic!("unexpected {other}"),
    }
    let mut watch = store.watch("k/", 5).await.unwrap();
    for rev in 6..=10 {
        assert_eq!(next_event(&mut watch).await.unwrap().revision(), rev);
    }
    assert_idle(&mut watch);
}

#[tokio::test]
async fn reopen_preserves_data_and_revisions_and_compacts_old_watches() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = {
        let store = open(dir.path());
        let a = put(&store, "a", "1", Precondition::None).await;
        put(&store, "b", "1", Precondition::None).await;
        let b = put(&store, "b", "2", Precondition::None).await;
        put(&store, "c", "1", Precondition::None).await;
        store.delete("c", Precondition::None).await.unwrap();
        (a, b)
    };
    let store = open(dir.path());
    assert_eq!(store.revision(), 5);
    assert_eq!(store.get("a").await.unwrap(), Some(a));
    assert_eq!(store.get("b").await.unwrap(), Some(b.clone()));
    assert_eq!(store.get("c").await.unwrap(), None);
    assert_eq!(store.list("").await.unwrap().revision, 5);

    let err = store.watch("", 4).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Compacted {
                requested: 4,
                oldest: 5
            }
        ),
        "{err}"
    );
    let mut watch = store.watch("", 5).await.unwrap();
    let b3 = put(&store, "b", "3", Precondition::ModRevision(b.mod_revision)).await;
    assert_eq!((b3.mod_revision, b3.version, b3.create_revision), (6, 3, 2));
    assert_eq!(next_event(&mut watch).await.unwrap().revision(), 6);
}

#[tokio::test]
async fn slow_watcher_gets_compacted_and_writers_never_block() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(
        dir.path(),
        StoreOptions {
            watch_buffer: 4,
            durable: false,
            ..StoreOptions::default()
        },
    );
    let mut slow = store.watch("", 0).await.unwrap();
    let mut fast = store.watch("", 0).await.unwrap();
    let mut fast_seen = Vec::new();
    for i in 0..50 {
        // Each write must complete promptly although `slow` never reads.
        put(&store, &format!("k/{i}"), "v", Precondition::None).await;
        fast_seen.push(next_event(&mut fast).await.unwrap().revision());
    }
    assert_eq!(fast_seen, (1..=50).collect::<Vec<Revision>>());
    assert_eq!(store.watcher_count(), 1);

    let mut got = Vec::new();
    let err = loop {
        match next_event(&mut slow).await {
            Ok(e) => got.push(e.revision()),
            Err(err) => break err,
        }
    };
    assert_eq!(got, (1..=4).collect::<Vec<Revision>>());
    assert!(
        matches!(err, StoreError::Compacted { requested: 4, .. }),
        "{err}"
    );
    assert!(timeout(WAIT, slow.next()).await.unwrap().is_none());
}

#[tokio::test]
async fn dropped_watchers_are_removed_and_close_ends_watches() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let dropped = store.watch("", 0).await.unwrap();
    let mut kept = store.watch("", 0).await.unwrap();
    assert_eq!(store.watcher_count(), 2);
    drop(dropped);
    put(&store, "k", "v", Precondition::None).await;
    assert_eq!(store.watcher_count(), 1);
    next_event(&mut kept).await.unwrap();

    store.close();
    assert!(matches!(
        next_event(&mut kept).await,
        Err(StoreError::Closed)
    ));
    assert!(timeout(WAIT, kept.next()).await.unwrap().is_none());
    assert!(store.get("k").await.unwrap_err().is_closed());
    assert!(
        store
            .put("k", vec![], Precondition::None)
            .await
            .unwrap_err()
            .is_closed()
    );
    assert!(store.watch("", 1).await.unwrap_err().is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_increments_are_serialised() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(open_with(
        dir.path(),
        StoreOptions {
            durable: false,
            ..StoreOptions::default()
        },
    ));
    store
        .put("counter", b"0".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                loop {
                    let kv = store.get("counter").await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                    let next = (n + 1).to_string().into_bytes();
                    match store
                        .put("counter", next, Precondition::ModRevision(kv.mod_revision))
                        .await
                    {
                        Ok(_) => break,
                        Err(e) if e.is_conflict() => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    for task in tasks {
        timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap();
    }
    let kv = store.get("counter").await.unwrap().unwrap();
    assert_eq!(kv.value, b"200");
    assert_eq!(kv.version, 201);
    assert_eq!(store.revision(), 201);
}

// ---------------------------------------------------------------------------------------------
// Model-based property test

#[derive(Debug, Clone)]
enum PreKind {
    None,
    Absent,
    Current,
    Stale(u64),
}

#[derive(Debug, Clone)]
enum ModelOp {
    Put(usize, u8, PreKind),
    Delete(usize, PreKind),
}

fn pre_kind() -> impl Strategy<Value = PreKind> {
    prop_oneof![
        Just(PreKind::None),
        Just(PreKind::Absent),
        Just(PreKind::Current),
        (0u64..40).prop_map(PreKind::Stale),
    ]
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        3 => (0usize..6, any::<u8>(), pre_kind()).prop_map(|(k, v, p)| ModelOp::Put(k, v, p)),
        1 => (0usize..6, pre_kind()).prop_map(|(k, p)| ModelOp::Delete(k, p)),
    ]
}

const MODEL_KEYS: [&str; 6] = ["p/a", "p/b", "p/c", "q/a", "p/aa", "p"];

#[derive(Default)]
struct Model {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    events: Vec<WatchEvent>,
}

impl Model {
    fn holds(&self, key: &str, pre: Precondition) -> bool {
        let cur = self.kvs.get(key);
        match pre {
            Precondition::None => true,
            Precondition::Absent => cur.is_none(),
            Precondition::ModRevision(r) => cur.is_some_and(|c| c.mod_revision == r),
        }
    }
    fn put(&mut self, key: &str, value: Vec<u8>, pre: Precondition) -> Option<KeyValue> {
        if !self.holds(key, pre) {
            return None;
        }
        self.revision += 1;
        let prev = self.kvs.get(key).cloned();
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision: prev.as_ref().map_or(self.revision, |p| p.create_revision),
            mod_revision: self.revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
        };
        self.kvs.insert(key.to_owned(), kv.clone());
        self.events.push(WatchEvent::Put {
            kv: kv.clone(),
            prev,
        });
        Some(kv)
    }
    fn delete(&mut self, key: &str, pre: Precondition) -> Result<Option<KeyValue>, ()> {
        if !self.holds(key, pre) {
            return Err(());
        }
        let prev = self.kvs.remove(key);
        if prev.is_some() {
            self.revision += 1;
            self.events.push(WatchEvent::Delete {
                key: key.to_owned(),
                revision: self.revision,
                prev: prev.clone(),
            });
        }
        Ok(prev)
    }
}

async fn run_model(ops: Vec<ModelOp>) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(
        dir.path(),
        StoreOptions {
            durable: false,
            ..StoreOptions::default()
        },
    );
    let mut watch = store.watch("p/", 0).await.unwrap();
    let mut model = Model::default();
    for op in ops {
        let (key, pre_kind) = match &op {
            ModelOp::Put(k, _, p) | ModelOp::Delete(k, p) => (MODEL_KEYS[*k], p),
        };
        let pre = match pre_kind {
            PreKind::None => Precondition::None,
            PreKind::Absent => Precondition::Absent,
            PreKind::Current => {
                Precondition::ModRevision(model.kvs.get(key).map_or(0, |kv| kv.mod_revision))
            }
            PreKind::Stale(r) => Precondition::ModRevision(*r),
        };
        match op {
            ModelOp::Put(_, v, _) => {
                let got = store.put(key, vec![v], pre).await;
                let want = model.put(key, vec![v], pre);
                match (got, want) {
                    (Ok(got), Some(want)) => assert_eq!(got, want),
                    (Err(e), None) => assert!(e.is_conflict(), "{e}"),
                    (got, want) => panic!("put {key} {pre:?}: store {got:?}, model {want:?}"),
                }
            }
            ModelOp::Delete(..) => {
                let got = store.delete(key, pre).await;
                let want = model.delete(key, pre);
                match (got, want) {
                    (Ok(got), Ok(want)) => assert_eq!(got, want),
                    (Err(e), Err(())) => assert!(e.is_conflict(), "{e}"),
                    (got, want) => panic!("delete {key} {pre:?}: store {got:?}, model {want:?}"),
                }
            }
        }
        assert_eq!(store.revision(), model.revision);
    }
    for prefix in ["", "p/", "p/a", "q/"] {
        let listed = store.list(prefix).await.unwrap();
        let want: Vec<KeyValue> = model
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        assert_eq!(listed.items, want);
        assert_eq!(listed.revision, model.revision);
    }
    let want_events: Vec<WatchEvent> = model
        .events
        .iter()
        .filter(|e| e.key().starts_with("p/"))
        .cloned()
        .collect();
    let mut got_events = Vec::new();
    while let Ok(event) = watch.rx.try_recv() {
        got_events.push(event.unwrap());
    }
    assert_eq!(got_events, want_events);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_a_btreemap_model(ops in proptest::collection::vec(model_op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_model(ops));
    }
}

// ---------------------------------------------------------------------------------------------
// kill -9 durability

const CHILD_ENV: &str = "FLOTILLA_STORE_DURABILITY_CHILD_DB";

/// Not a test on its own: when re-executed by `acknowledged_writes_survive_kill_9` with the
/// environment variable set, writes keys until killed, printing each acknowledged one.
#[test]
fn durability_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = Arc::new(EmbeddedStore::open(Path::new(&path)).unwrap());
        let mut writers = Vec::new();
        for w in 0..4 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                // Bounded, in case the parent died without killing us.
                for i in 0..20_000 {
                    let key = format!("k/{w}/{i:05}");
                    let kv = store
                        .put(&key, key.clone().into_bytes(), Precondition::Absent)
                        .await
                        .unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {key} {}", kv.mod_revision).unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
    });
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "durability_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut acked: Vec<(String, Revision)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    // Only complete lines count: a line is printed after its write was acknowledged.
    let mut read_line = |acked: &mut Vec<(String, Revision)>| -> bool {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            return false;
        }
        if let Some(rest) = line.strip_prefix("ACK ").and_then(|l| l.strip_suffix('\n')) {
            let (key, rev) = rest.split_once(' ').unwrap();
            acked.push((key.to_owned(), rev.parse().unwrap()));
        }
        true
    };
    // Kill it mid-stream, once it has acknowledged a good number of writes.
    while acked.len() < 200 {
        assert!(Instant::now() < deadline, "child too slow");
        assert!(read_line(&mut acked), "child ended early");
    }
    child.kill().unwrap(); // SIGKILL
    // Lines printed before the kill are acknowledged writes too.
    while read_line(&mut acked) {}
    let status = child.wait().unwrap();
    assert!(!status.success(), "child was expected to be killed");

    let store = EmbeddedStore::open(&db).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listed = store.list("k/").await.unwrap();
        let stored: BTreeMap<String, KeyValue> = listed
            .items
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        assert!(stored.len() >= acked.len());
        let max_acked = acked.iter().map(|(_, r)| *r).max().unwrap();
        assert!(listed.revision >= max_acked);
        assert_eq!(store.revision(), listed.revision);
        for (key, rev) in &acked {
            let kv = stored
                .get(key)
                .unwrap_or_else(|| panic!("acknowledged {key} lost"));
            assert_eq!(kv.mod_revision, *rev, "{key}");
            assert_eq!(kv.create_revision, *rev, "{key}");
            assert_eq!(kv.version, 1);
            assert_eq!(kv.value, key.as_bytes());
        }
        // Every stored key has a distinct revision, all within the store's revision.
        let mut revs: Vec<Revision> = stored.values().map(|kv| kv.mod_revision).collect();
        revs.sort_unstable();
        revs.dedup();
        assert_eq!(revs.len(), stored.len());
        assert!(revs.iter().all(|r| *r <= listed.revision));
        // The store keeps working after recovery.
        let kv = store
            .put("after", b"x".to_vec(), Precondition::Absent)
            .await
            .unwrap();
        assert_eq!(kv.mod_revision, listed.revision + 1);
    });
}
