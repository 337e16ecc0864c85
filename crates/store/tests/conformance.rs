//! One conformance suite for both backends: every scenario here runs against the embedded
//! store (a redb file in a temporary directory) and against a real etcd (a fresh member per
//! test, from the `etcd` binary), so the two cannot drift apart. Watches are checked without
//! assuming that an event is queued before its write returns (etcd delivers it a moment
//! later): "nothing else arrived" is shown by writing a marker and seeing it come next.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_store::{
    EmbeddedStore, EtcdOptions, EtcdStore, KeyValue, Precondition, Put, Revision, Store,
    StoreError, StoreOptions, Watch, WatchEvent,
};
use proptest::prelude::*;
use support::etcd::{self, Etcd};
use support::{WAIT, next_event, put};
use tokio::time::timeout;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Embedded,
    Etcd,
}

#[derive(Clone, Copy, Default)]
struct Opts {
    /// Events kept for watches to replay (embedded: the history limit; etcd: what
    /// [`Subject::trim`] keeps when it compacts).
    history: Option<usize>,
    watch_buffer: Option<usize>,
}

/// A store and what keeps it alive (its directory, its etcd member).
#[allow(dead_code, reason = "the second fields are held, not read")]
enum Backend {
    Embedded(Arc<EmbeddedStore>, tempfile::TempDir),
    Etcd(Arc<EtcdStore>, Etcd),
}

/// The store under test and what it runs on.
struct Subject {
    store: Arc<dyn Store>,
    backend: Backend,
    history: Option<usize>,
}

impl Subject {
    /// The store of `kind`, or `None` (with the skip notice) when etcd cannot run here.
    async fn open(kind: Kind, opts: Opts, test: &str) -> Option<Subject> {
        let mut embedded = StoreOptions {
            durable: false,
            ..StoreOptions::default()
        };
        let mut remote = EtcdOptions::default();
        if let Some(h) = opts.history {
            embedded.history_limit = h;
        }
        if let Some(b) = opts.watch_buffer {
            embedded.watch_buffer = b;
            remote.watch_buffer = b;
        }
        let backend = match kind {
            Kind::Embedded => {
                let dir = tempfile::tempdir().unwrap();
                let store = Arc::new(
                    EmbeddedStore::open_with(&dir.path().join("s.redb"), embedded).unwrap(),
                );
                Backend::Embedded(store, dir)
            }
            Kind::Etcd => {
                if let Some(why) = etcd::unavailable() {
                    etcd::skip(test, &why);
                    return None;
                }
                let member = Etcd::start().await;
                let store = Arc::new(
                    EtcdStore::connect(&member.endpoints(), remote)
                        .await
                        .unwrap(),
                );
                Backend::Etcd(store, member)
            }
        };
        let store: Arc<dyn Store> = match &backend {
            Backend::Embedded(s, _) => s.clone(),
            Backend::Etcd(s, _) => s.clone(),
        };
        Some(Subject {
            store,
            backend,
            history: opts.history,
        })
    }

    /// Drops the history beyond `history` events (the embedded store does it as it writes).
    async fn trim(&self) {
        if let (Backend::Etcd(s, _), Some(keep)) = (&self.backend, self.history) {
            let from = s.revision() + 1 - keep as Revision;
            s.compact(from).await.unwrap();
        }
    }

    fn close(&self) {
        match &self.backend {
            Backend::Embedded(s, _) => s.close(),
            Backend::Etcd(s, _) => s.close(),
        }
    }
}

/// Shows that nothing but what was already read arrives on `watch` (of `prefix`): writes a
/// marker under it and expects the marker next. Returns the marker's revision.
async fn expect_quiet(store: &dyn Store, watch: &mut Watch, prefix: &str) -> Revision {
    let marker = put(
        store,
        &format!("{prefix}~quiet"),
        "marker",
        Precondition::None,
    )
    .await;
    let e = next_event(watch).await.unwrap();
    assert_eq!(
        (e.key(), e.revision()),
        (marker.key.as_str(), marker.mod_revision),
        "something arrived before the marker: {e:?}"
    );
    marker.mod_revision
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => { $(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(super::Kind::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                super::$name(super::Kind::Etcd).await
            }
        }
    )* };
}

conformance!(
    cas_semantics,
    revisions_are_monotonic_and_deletes_bump_them,
    list_by_prefix_in_key_order_at_a_revision,
    watch_replays_from_a_revision_then_streams_live,
    resuming_from_the_last_seen_revision_sees_exactly_the_rest,
    too_old_revisions_are_compacted,
    slow_watcher_gets_compacted_and_writers_never_block,
    closing_ends_watches_and_refuses_requests,
    concurrent_cas_increments_are_serialised,
    large_lists_are_complete_and_at_one_revision,
    guarded_writes_fail_once_the_prefix_changed,
    concurrent_guarded_claims_have_one_winner,
    commits_write_every_key_at_one_revision_or_none,
);

async fn cas_semantics(kind: Kind) {
    let Some(s) = Subject::open(kind, Opts::default(), "cas_semantics").await else {
        return;
    };
    let store = &*s.store;
    assert_eq!(store.revision(), 0);

    let a1 = put(store, "a", "one", Precondition::Absent).await;
    assert_eq!((a1.create_revision, a1.mod_revision, a1.version), (1, 1, 1));

    // Absent on an existing key conflicts and leaves the value alone.
    let err = store
        .put("a", b"two".to_vec(), Precondition::Absent)
        .await
        .unwrap_err();
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
    let a2 = put(store, "a", "two", Precondition::ModRevision(1)).await;
    assert_eq!((a2.create_revision, a2.mod_revision, a2.version), (1, 2, 2));
    assert_eq!(a2.value, b"two");
    assert_eq!(store.get("a").await.unwrap(), Some(a2.clone()));

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
    let a3 = put(store, "a", "again", Precondition::Absent).await;
    assert_eq!((a3.create_revision, a3.mod_revision, a3.version), (4, 4, 1));
    // An unconditional write of a new key, then of an existing one.
    let c = put(store, "c", "1", Precondition::None).await;
    assert_eq!((c.create_revision, c.mod_revision, c.version), (5, 5, 1));
    let c = put(store, "c", "2", Precondition::None).await;
    assert_eq!((c.create_revision, c.mod_revision, c.version), (5, 6, 2));
}

async fn revisions_are_monotonic_and_deletes_bump_them(kind: Kind) {
    let test = "revisions_are_monotonic_and_deletes_bump_them";
    let Some(s) = Subject::open(kind, Opts::default(), test).await else {
        return;
    };
    let store = &*s.store;
    let mut last = 0;
    for i in 0..20 {
        let key = format!("k/{}", i % 5);
        let kv = put(store, &key, "v", Precondition::None).await;
        assert_eq!(kv.mod_revision, last + 1);
        last = kv.mod_revision;
        assert_eq!(store.revision(), last);
    }
    let prev = store.delete("k/0", Precondition::None).await.unwrap();
    assert!(prev.is_some());
    assert_eq!(store.revision(), last + 1);
}

async fn list_by_prefix_in_key_order_at_a_revision(kind: Kind) {
    let test = "list_by_prefix_in_key_order_at_a_revision";
    let Some(s) = Subject::open(kind, Opts::default(), test).await else {
        return;
    };
    let store = &*s.store;
    for key in ["a/2", "b/1", "a/1", "a", "a0", "a/3"] {
        put(store, key, key, Precondition::None).await;
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

async fn watch_replays_from_a_revision_then_streams_live(kind: Kind) {
    let test = "watch_replays_from_a_revision_then_streams_live";
    let Some(s) = Subject::open(kind, Opts::default(), test).await else {
        return;
    };
    let store = &*s.store;
    put(store, "w/a", "1", Precondition::None).await;
    put(store, "other/x", "1", Precondition::None).await;
    put(store, "w/b", "1", Precondition::None).await;
    put(store, "w/a", "2", Precondition::None).await;

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
    assert_eq!(expect_quiet(store, &mut watch, "w/").await, 5);

    put(store, "other/y", "1", Precondition::None).await;
    store.delete("w/b", Precondition::None).await.unwrap();
    match next_event(&mut watch).await.unwrap() {
        WatchEvent::Delete {
            key,
            revision,
            prev,
        } => {
            assert_eq!((key.as_str(), revision), ("w/b", 7));
            assert_eq!(prev.map(|p| p.mod_revision), Some(3));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(expect_quiet(store, &mut watch, "w/").await, 8);

    // Watching from the current revision (or beyond) sees only later writes.
    let mut tail = store.watch("w/", store.revision()).await.unwrap();
    let mut future = store.watch("w/", 9).await.unwrap();
    put(store, "w/c", "1", Precondition::None).await; // revision 9
    put(store, "w/d", "1", Precondition::None).await; // revision 10
    assert_eq!(next_event(&mut tail).await.unwrap().revision(), 9);
    assert_eq!(next_event(&mut future).await.unwrap().revision(), 10);
}

async fn resuming_from_the_last_seen_revision_sees_exactly_the_rest(kind: Kind) {
    let test = "resuming_from_the_last_seen_revision_sees_exactly_the_rest";
    let Some(s) = Subject::open(kind, Opts::default(), test).await else {
        return;
    };
    let store = &*s.store;
    let mut watch = store.watch("", 0).await.unwrap();
    for i in 0..10 {
        put(store, &format!("k/{i}"), "v", Precondition::None).await;
    }
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_event(&mut watch).await.unwrap().revision());
    }
    drop(watch);
    let last = *seen.last().unwrap();
    let mut resumed = store.watch("", last).await.unwrap();
    for _ in 0..3 {
        put(store, "k/late", "v", Precondition::None).await;
    }
    for _ in 0..9 {
        seen.push(next_event(&mut resumed).await.unwrap().revision());
    }
    assert_eq!(expect_quiet(store, &mut resumed, "").await, 14);
    assert_eq!(seen, (1..=13).collect::<Vec<Revision>>());
}

async fn too_old_revisions_are_compacted(kind: Kind) {
    let opts = Opts {
        history: Some(5),
        ..Opts::default()
    };
    let Some(s) = Subject::open(kind, opts, "too_old_revisions_are_compacted").await else {
        return;
    };
    let store = &*s.store;
    for i in 0..10 {
        put(store, &format!("k/{i}"), "v", Precondition::None).await;
    }
    s.trim().await;
    let err = store.watch("k/", 4).await.unwrap_err();
    match err {
        StoreError::Compacted { requested, oldest } => assert_eq!((requested, oldest), (4, 5)),
        other => panic!("unexpected {other}"),
    }
    let mut watch = store.watch("k/", 5).await.unwrap();
    for rev in 6..=10 {
        assert_eq!(next_event(&mut watch).await.unwrap().revision(), rev);
    }
    assert_eq!(expect_quiet(store, &mut watch, "k/").await, 11);
}

async fn slow_watcher_gets_compacted_and_writers_never_block(kind: Kind) {
    let opts = Opts {
        watch_buffer: Some(4),
        ..Opts::default()
    };
    let test = "slow_watcher_gets_compacted_and_writers_never_block";
    let Some(s) = Subject::open(kind, opts, test).await else {
        return;
    };
    let store = &*s.store;
    let mut slow = store.watch("", 0).await.unwrap();
    let mut fast = store.watch("", 0).await.unwrap();
    let mut fast_seen = Vec::new();
    for i in 0..50 {
        // Each write must complete promptly although `slow` never reads.
        put(store, &format!("k/{i}"), "v", Precondition::None).await;
        fast_seen.push(next_event(&mut fast).await.unwrap().revision());
    }
    assert_eq!(fast_seen, (1..=50).collect::<Vec<Revision>>());

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

async fn closing_ends_watches_and_refuses_requests(kind: Kind) {
    let test = "closing_ends_watches_and_refuses_requests";
    let Some(s) = Subject::open(kind, Opts::default(), test).await else {
        return;
    };
    let store = &*s.store;
    let mut watch = store.watch("", 0).await.unwrap();
    put(store, "k", "v", Precondition::None).await;
    next_event(&mut watch).await.unwrap();
    s.close();
    assert!(matches!(
        next_event(&mut watch).await,
        Err(StoreError::Closed)
    ));
    assert!(timeout(WAIT, watch.next()).await.unwrap().is_none());
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

async fn concurrent_cas_increments_are_serialised(kind: Kind) {
    let test = "concurrent_cas_increments_are_serialised";
    let Some(s) = Subject::open(kind, Opts::default(), test).await else {
        return;
    };
    let store = s.store.clone();
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

/// `put_unless_changed`: refused (`Changed`, nothing written) once any key under the prefix
/// was written after the revision given; writes elsewhere and deletions do not count; a
/// failed precondition is still a `Conflict` on the key.
async fn guarded_writes_fail_once_the_prefix_changed(kind: Kind) {
    let test = "guarded_writes_fail_once_the_prefix_changed";
    let Some(s) = Subject::open(kind, Opts::default(), test).await else {
        return;
    };
    let store = &*s.store;
    put(store, "s/a", "1", Precondition::Absent).await;
    put(store, "s/b", "1", Precondition::Absent).await;
    let listed = store.list("s/").await.unwrap();
    assert_eq!(listed.revision, 2);
    let c = store
        .put_unless_changed("s/c", b"1".to_vec(), Precondition::Absent, "s/", 2)
        .await
        .unwrap();
    assert_eq!((c.create_revision, c.mod_revision, c.version), (3, 3, 1));
    let err = store
        .put_unless_changed("s/d", b"1".to_vec(), Precondition::Absent, "s/", 2)
        .await
        .unwrap_err();
    match &err {
        StoreError::Changed {
            prefix,
            since,
            revision,
        } => assert_eq!((prefix.as_str(), *since, *revision), ("s/", 2, 3)),
        other => panic!("unexpected {other}"),
    }
    assert!(err.is_conflict());
    assert_eq!(store.get("s/d").await.unwrap(), None);
    assert_eq!(store.revision(), 3);

    // A write under another prefix does not count.
    put(store, "t/x", "1", Precondition::None).await;
    let d = store
        .put_unless_changed("s/d", b"1".to_vec(), Precondition::Absent, "s/", 3)
        .await
        .unwrap();
    assert_eq!(d.mod_revision, 5);
    // Nor does a deletion.
    store.delete("s/a", Precondition::None).await.unwrap();
    let e = store
        .put_unless_changed("s/e", b"1".to_vec(), Precondition::None, "s/", 5)
        .await
        .unwrap();
    assert_eq!(e.mod_revision, 7);
    // A stale precondition under a holding guard: a `Conflict` on the key.
    let err = store
        .put_unless_changed("s/c", b"2".to_vec(), Precondition::ModRevision(1), "s/", 7)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { key, actual: Some(3), .. } if key == "s/c"),
        "{err}"
    );
    assert_eq!(store.get("s/c").await.unwrap().unwrap().value, b"1");
    // An update guarded at the current revision goes through.
    let c2 = store
        .put_unless_changed("s/c", b"2".to_vec(), Precondition::ModRevision(3), "s/", 7)
        .await
        .unwrap();
    assert_eq!((c2.create_revision, c2.mod_revision, c2.version), (3, 8, 2));
}

fn put_of(key: &str, value: &str, pre: Precondition) -> Put {
    Put {
        key: key.to_string(),
        value: value.as_bytes().to_vec(),
        pre,
    }
}

/// `commit`: every key written at one revision (watchers see each, at that revision), or
/// none when one precondition or the guard fails; the error names the key that failed.
async fn commits_write_every_key_at_one_revision_or_none(kind: Kind) {
    let test = "commits_write_every_key_at_one_revision_or_none";
    let Some(s) = Subject::open(kind, Opts::default(), test).await else {
        return;
    };
    let store = &*s.store;
    let a = put(store, "s/a", "1", Precondition::Absent).await;
    let mut services = store.watch("s/", a.mod_revision).await.unwrap();
    let mut events = store.watch("e/", 0).await.unwrap();
    let written = store
        .commit(
            vec![
                put_of("s/a", "2", Precondition::ModRevision(a.mod_revision)),
                put_of("e/1", "applied", Precondition::Absent),
            ],
            None,
        )
        .await
        .unwrap();
    let shape: Vec<_> = written
        .iter()
        .map(|kv| {
            (
                kv.key.as_str(),
                kv.create_revision,
                kv.mod_revision,
                kv.version,
            )
        })
        .collect();
    assert_eq!(shape, [("s/a", 1, 2, 2), ("e/1", 2, 2, 1)]);
    assert_eq!(store.revision(), 2);
    let e = next_event(&mut services).await.unwrap();
    assert_eq!((e.key(), e.revision()), ("s/a", 2));
    let e = next_event(&mut events).await.unwrap();
    assert_eq!((e.key(), e.revision()), ("e/1", 2));

    // One stale precondition: nothing is written, and the error names that key.
    let err = store
        .commit(
            vec![
                put_of("e/2", "applied", Precondition::Absent),
                put_of("s/a", "3", Precondition::ModRevision(1)),
            ],
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { key, actual: Some(2), .. } if key == "s/a"),
        "{err}"
    );
    assert_eq!(store.get("e/2").await.unwrap(), None);
    assert_eq!(store.get("s/a").await.unwrap().unwrap().value, b"2");
    assert_eq!(store.revision(), 2);

    // A guard: refused once the prefix changed after it, with nothing written.
    put(store, "s/b", "1", Precondition::Absent).await;
    let err = store
        .commit(
            vec![
                put_of("s/c", "1", Precondition::Absent),
                put_of("e/3", "applied", Precondition::Absent),
            ],
            Some(("s/", 2)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Changed { revision: 3, .. }),
        "{err}"
    );
    assert_eq!(store.get("s/c").await.unwrap(), None);
    assert_eq!(store.get("e/3").await.unwrap(), None);
    let written = store
        .commit(
            vec![
                put_of("s/c", "1", Precondition::Absent),
                put_of("e/3", "applied", Precondition::Absent),
            ],
            Some(("s/", 3)),
        )
        .await
        .unwrap();
    assert!(written.iter().all(|kv| kv.mod_revision == 4), "{written:?}");

    // A key twice is refused, and so nothing is written.
    let err = store
        .commit(
            vec![
                put_of("e/4", "1", Precondition::None),
                put_of("e/4", "2", Precondition::None),
            ],
            None,
        )
        .await
        .unwrap_err();
    let chain = flotilla_store::error_chain(&err);
    assert!(chain.contains("each key once"), "{chain}");
    assert_eq!(store.get("e/4").await.unwrap(), None);
    assert_eq!(store.revision(), 4);
}

/// Eight writers each claim a name (as applies claim routes): list, see nothing claimed, write
/// guarded on the list's revision, retry on `Changed`. Exactly one wins, whatever the timing.
async fn concurrent_guarded_claims_have_one_winner(kind: Kind) {
    let test = "concurrent_guarded_claims_have_one_winner";
    let Some(s) = Subject::open(kind, Opts::default(), test).await else {
        return;
    };
    for round in 0..5 {
        let prefix = format!("claims-{round}/");
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (store, prefix) = (s.store.clone(), prefix.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let listed = store.list(&prefix).await.unwrap();
                    if !listed.items.is_empty() {
                        return false;
                    }
                    let key = format!("{prefix}{i}");
                    match store
                        .put_unless_changed(
                            &key,
                            b"mine".to_vec(),
                            Precondition::Absent,
                            &prefix,
                            listed.revision,
                        )
                        .await
                    {
                        Ok(_) => return true,
                        Err(StoreError::Changed { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }));
        }
        let mut won = 0;
        for task in tasks {
            if timeout(Duration::from_secs(60), task)
                .await
                .unwrap()
                .unwrap()
            {
                won += 1;
            }
        }
        assert_eq!(won, 1, "round {round}");
        assert_eq!(s.store.list(&prefix).await.unwrap().items.len(), 1);
    }
}

/// More keys than one page of an etcd list, with values big enough that one message could not
/// carry them all: the list is whole, in order, and of one revision.
async fn large_lists_are_complete_and_at_one_revision(kind: Kind) {
    let test = "large_lists_are_complete_and_at_one_revision";
    let Some(s) = Subject::open(kind, Opts::default(), test).await else {
        return;
    };
    let store = s.store.clone();
    let value = "x".repeat(4096);
    let mut writers = Vec::new();
    for w in 0..4 {
        let (store, value) = (store.clone(), value.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..350 {
                put(
                    &*store,
                    &format!("big/{w}-{i:04}"),
                    &value,
                    Precondition::None,
                )
                .await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    put(&*store, "bigger", "outside the prefix", Precondition::None).await;
    let listed = store.list("big/").await.unwrap();
    assert_eq!(listed.items.len(), 1400);
    assert!(listed.items.windows(2).all(|w| w[0].key < w[1].key));
    assert!(listed.items.iter().all(|kv| kv.value.len() == 4096));
    assert_eq!(listed.revision, 1401);
}

// ---------------------------------------------------------------------------------------------
// Model-based property test, against both backends

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

async fn run_model(store: &dyn Store, ops: Vec<ModelOp>) {
    // The store may have history already (the etcd runs share one member): the model starts at
    // its revision, and stale preconditions are relative to it.
    let base = store.revision();
    let mut watch = store.watch("p/", base).await.unwrap();
    let mut model = Model {
        revision: base,
        kvs: BTreeMap::new(),
        events: Vec::new(),
    };
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
            PreKind::Stale(r) => Precondition::ModRevision(base + *r),
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
    for _ in 0..want_events.len() {
        got_events.push(next_event(&mut watch).await.unwrap());
    }
    assert_eq!(got_events, want_events);
    expect_quiet(store, &mut watch, "p/").await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_a_btreemap_model(ops in proptest::collection::vec(model_op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let options = StoreOptions { durable: false, ..StoreOptions::default() };
            let store = EmbeddedStore::open_with(&dir.path().join("s.redb"), options).unwrap();
            run_model(&store, ops).await;
        });
    }
}

/// The same model against etcd: one member for all the cases (each in a namespace of its own),
/// owned by the test so that it stops with it.
#[test]
fn etcd_matches_a_btreemap_model() {
    if let Some(why) = etcd::unavailable() {
        etcd::skip("etcd_matches_a_btreemap_model", &why);
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let member = rt.block_on(Etcd::start());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    });
    let case = std::cell::Cell::new(0u64);
    let outcome = runner.run(&proptest::collection::vec(model_op(), 1..60), |ops| {
        case.set(case.get() + 1);
        rt.block_on(async {
            let options = EtcdOptions {
                namespace: format!("/model-{}/", case.get()),
                ..EtcdOptions::default()
            };
            let store = EtcdStore::connect(&member.endpoints(), options)
                .await
                .unwrap();
            run_model(&store, ops).await;
        });
        Ok(())
    });
    drop(member);
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

/// An exclusive hold (etcd only): a second holder is refused with the first one's name until
/// the first releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_holds_are_exclusive_until_released() {
    let test = "etcd_holds_are_exclusive_until_released";
    let Some(s) = Subject::open(Kind::Etcd, Opts::default(), test).await else {
        return;
    };
    let Backend::Etcd(store, _) = &s.backend else {
        unreachable!()
    };
    let ttl = Duration::from_secs(3);
    let first = store.hold_exclusive("lock", "first", ttl).await.unwrap();
    match store.hold_exclusive("lock", "second", ttl).await {
        Err(StoreError::Held { key, holder }) => {
            assert_eq!((key.as_str(), holder.as_str()), ("lock", "first"))
        }
        Err(other) => panic!("unexpected {other}"),
        Ok(_) => panic!("two holders at once"),
    }
    // Renewed: nobody else gets it for longer than the lease's own length.
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        assert!(!first.lost().is_cancelled());
        assert!(store.hold_exclusive("lock", "second", ttl).await.is_err());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    first.release().await;
    let second = store.hold_exclusive("lock", "second", ttl).await.unwrap();
    second.release().await;
}

/// Puts `key`, retrying while the cluster elects a leader (up to `within`): how many attempts.
async fn put_retrying(store: &dyn Store, key: &str, within: Duration) -> usize {
    let deadline = std::time::Instant::now() + within;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match store.put(key, b"v".to_vec(), Precondition::None).await {
            Ok(_) => return attempts,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(
                    e.is_unavailable(),
                    "{key}: {}",
                    flotilla_store::error_chain(&e)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{key} not written in {within:?}: {e}"),
        }
    }
}

/// Three members: with one down writes go on; with two down they fail as `Unavailable` (the
/// API's 503) within the request timeout; with both back, writes work again and every
/// acknowledged write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_without_quorum_is_unavailable_and_recovers() {
    if let Some(why) = etcd::unavailable() {
        etcd::skip("etcd_without_quorum_is_unavailable_and_recovers", &why);
        return;
    }
    let mut cluster = etcd::Cluster::start(3).await;
    let options = EtcdOptions {
        request_timeout: Duration::from_secs(2),
        ..EtcdOptions::default()
    };
    let store = EtcdStore::connect(&cluster.endpoints(), options.clone())
        .await
        .unwrap();
    let mut acked = Vec::new();
    for i in 0..10 {
        let key = format!("k/{i:02}");
        put_retrying(&store, &key, Duration::from_secs(10)).await;
        acked.push(key);
    }
    cluster.kill(0);
    // A client that connects now, with the dead member first in its list, works too, once
    // the others have a leader (connecting reads the revision linearizably; when the member
    // killed led, the election can outlast one request timeout on a loaded machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let late = loop {
        match EtcdStore::connect(&cluster.endpoints(), options.clone()).await {
            Ok(store) => break store,
            Err(e) if e.is_unavailable() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!(
                "connecting with a member down: {}",
                flotilla_store::error_chain(&e)
            ),
        }
    };
    put_retrying(&late, "k/late", Duration::from_secs(15)).await;
    acked.push("k/late".to_string());
    for i in 10..20 {
        let key = format!("k/{i:02}");
        put_retrying(&store, &key, Duration::from_secs(15)).await;
        acked.push(key);
    }
    // A leader's view (fenced on a leader key): its reads never come from a lagging member.
    let leadership = store
        .hold_exclusive("leader", "me", Duration::from_secs(30))
        .await
        .unwrap();
    let leader = store.fenced(&leadership);
    cluster.kill(1);
    let started = std::time::Instant::now();
    let err = store
        .put("k/lost", b"v".to_vec(), Precondition::None)
        .await
        .unwrap_err();
    assert!(
        err.is_unavailable(),
        "{}",
        flotilla_store::error_chain(&err)
    );
    assert!(err.to_string().contains("etcd"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Reads still answer, from what the live member has: every acknowledged key, and the
    // refused write is not there.
    let started = std::time::Instant::now();
    let listed = store.list("k/").await.unwrap();
    let keys: Vec<&str> = listed.items.iter().map(|kv| kv.key.as_str()).collect();
    for key in &acked {
        assert!(
            keys.contains(&key.as_str()),
            "{key} is not read without a quorum"
        );
    }
    assert!(!keys.contains(&"k/lost"), "{keys:?}");
    assert!(store.get("k/00").await.unwrap().is_some());
    let again = std::time::Instant::now();
    assert!(store.get("k/late").await.unwrap().is_some());
    assert!(
        again.elapsed() < Duration::from_secs(1),
        "a read while degraded took {:?} (the first took {:?})",
        again.elapsed(),
        again - started
    );
    let err = leader.list("k/").await.unwrap_err();
    assert!(
        err.is_unavailable(),
        "{}",
        flotilla_store::error_chain(&err)
    );

    cluster.restart(0);
    cluster.restart(1);
    for i in 20..30 {
        let key = format!("k/{i:02}");
        put_retrying(&store, &key, Duration::from_secs(60)).await;
        acked.push(key);
    }
    let listed = store.list("k/").await.unwrap();
    let keys: Vec<&str> = listed.items.iter().map(|kv| kv.key.as_str()).collect();
    for key in &acked {
        assert!(
            keys.contains(&key.as_str()),
            "{key} was acknowledged and is gone"
        );
    }
}

/// etcd over TLS with client certificates: the store works with the CA and its certificate,
/// and without a certificate it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_needs_the_ca_and_a_client_certificate() {
    if let Some(why) = etcd::unavailable() {
        etcd::skip("etcd_over_tls_needs_the_ca_and_a_client_certificate", &why);
        return;
    }
    let tls = etcd::TestTls::make();
    let member = Etcd::start_tls(&tls).await;
    let with = EtcdOptions {
        tls: Some(flotilla_store::EtcdTls {
            ca_pem: tls.ca_pem.clone(),
            identity: Some((tls.client_cert.clone(), tls.client_key.clone())),
        }),
        ..EtcdOptions::default()
    };
    let store = EtcdStore::connect(&member.endpoints(), with).await.unwrap();
    let kv = put(&store, "k", "v", Precondition::Absent).await;
    assert_eq!(store.get("k").await.unwrap(), Some(kv));

    let without = EtcdOptions {
        tls: Some(flotilla_store::EtcdTls {
            ca_pem: tls.ca_pem.clone(),
            identity: None,
        }),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        ..EtcdOptions::default()
    };
    let refused = EtcdStore::connect(&member.endpoints(), without).await;
    assert!(refused.is_err(), "connected without a client certificate");
}
