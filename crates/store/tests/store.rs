//! What only the embedded store promises, against real redb files in temporary directories:
//! events queued before the write returns, reopening, watcher bookkeeping, durability across
//! `kill -9`. What both backends promise is in `conformance.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_store::{
    EmbeddedStore, KeyValue, Precondition, Revision, Store, StoreError, Watch, WatchEvent,
};
use support::{next_event, put};

fn open(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(&dir.join("store.redb")).expect("open store")
}

/// Asserts nothing is queued on the watch right now (events are queued before writes return).
fn assert_idle(watch: &mut Watch) {
    assert!(
        watch.rx.try_recv().is_err(),
        "unexpected event queued on the watch"
    );
}

/// The embedded store queues each event before the write returns (`assert_idle` right after a
/// write holds); etcd delivers it a moment later.
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

    // What closing does to watches and requests is in conformance.rs; here, the bookkeeping.
    store.close();
    assert!(matches!(
        next_event(&mut kept).await,
        Err(StoreError::Closed)
    ));
    assert_eq!(store.watcher_count(), 0);
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
