//! The routing table must follow the store whatever happens to the watches under it: churn from
//! several writers with watch buffers so small that reflectors keep being dropped and relisting,
//! changes made between `bind` and `run`, and reflectors that end while the gateway runs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flotilla_gateway::{Gateway, GatewayConfig, RouteTable, RoutingView};
use flotilla_spec::object::{Instance, InstanceSpec, InstanceStatus, ObjectMeta, Phase, Service};
use flotilla_spec::service::{RouteSpec, ServiceSpec};
use flotilla_store::{
    EmbeddedStore, KeyValue, ListResult, Precondition, Revision, Store, StoreError, StoreOptions,
    Watch, typed,
};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(10);
const SERVICES: usize = 6;
const INSTANCES: usize = 12;

fn service(name: &str) -> Service {
    let mut spec: ServiceSpec =
        serde_json::from_value(serde_json::json!({ "command": "flotilla-demo" })).unwrap();
    spec.ports = vec!["http".to_string()];
    spec.routes = vec![RouteSpec {
        host: Some(format!("{name}.example")),
        path: "/".to_string(),
        ..RouteSpec::default()
    }];
    Service {
        metadata: ObjectMeta::named(name),
        spec,
        status: Default::default(),
    }
}

fn instance(k: usize) -> Instance {
    let mut template: ServiceSpec =
        serde_json::from_value(serde_json::json!({ "command": "flotilla-demo" })).unwrap();
    template.ports = vec!["http".to_string()];
    Instance {
        metadata: ObjectMeta::named(format!("i{k:02}")),
        spec: InstanceSpec {
            service: format!("s{}", k % SERVICES),
            node: "local".to_string(),
            spec_hash: "h1".to_string(),
            template,
        },
        status: InstanceStatus {
            phase: Phase::Running,
            ready: true,
            host: Some("127.0.0.1".to_string()),
            ports: BTreeMap::from([("http".to_string(), 10_000 + k as u16)]),
            ..InstanceStatus::default()
        },
    }
}

/// Instance name → whether the table built from the store's current content routes to it.
async fn expected(store: &dyn Store) -> BTreeMap<String, bool> {
    let (services, _) = typed::list::<Service>(store).await.unwrap();
    let (instances, _) = typed::list::<Instance>(store).await.unwrap();
    let table = RouteTable::build(&services, &instances);
    (0..INSTANCES)
        .map(|k| {
            let name = format!("i{k:02}");
            let routed = table
                .routes()
                .any(|r| r.endpoints.iter().any(|e| e.instance == name));
            (name, routed)
        })
        .collect()
}

fn actual(view: &RoutingView) -> BTreeMap<String, bool> {
    (0..INSTANCES)
        .map(|k| {
            let name = format!("i{k:02}");
            let routed = view.routes_to(&name);
            (name, routed)
        })
        .collect()
}

/// Polls until the table in force routes exactly as one built from the store (no writes in
/// flight) would.
async fn converges(view: &RoutingView, store: &dyn Store, what: &str) {
    let want = expected(store).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let seen = actual(view);
        if seen == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: routing table froze; store implies {want:?}, table routes {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn tiny_watches() -> StoreOptions {
    StoreOptions {
        watch_buffer: 1,
        history_limit: 2,
        max_batch: 4,
        durable: false,
        ..StoreOptions::default()
    }
}

fn open(dir: &std::path::Path, options: StoreOptions) -> Arc<dyn Store> {
    Arc::new(EmbeddedStore::open_with(&dir.join("store.redb"), options).unwrap())
}

/// One writer's burst: creates, changes and deletes overlapping services and instances.
async fn churn(store: Arc<dyn Store>, writer: usize, round: usize, ops: usize) {
    for i in 0..ops {
        let pick = i * 5 + writer * 3 + round;
        let result = match (i + writer) % 6 {
            0 => typed::create(store.as_ref(), service(&format!("s{}", pick % SERVICES)))
                .await
                .map(drop),
            1 => typed::delete::<Service>(store.as_ref(), &format!("s{}", pick % SERVICES), None)
                .await
                .map(drop),
            2 | 3 => typed::create(store.as_ref(), instance(pick % INSTANCES))
                .await
                .map(drop),
            4 => typed::modify::<Instance>(
                store.as_ref(),
                &format!("i{:02}", pick % INSTANCES),
                |inst| {
                    inst.status.ready = !inst.status.ready;
                    true
                },
            )
            .await
            .map(drop),
            _ => typed::delete::<Instance>(
                store.as_ref(),
                &format!("i{:02}", pick % INSTANCES),
                None,
            )
            .await
            .map(drop),
        };
        match result {
            Ok(()) => {}
            Err(e) if e.is_conflict() => {}
            Err(e) => panic!("write failed: {e}"),
        }
    }
}

/// Several writers race on the same services and instances while every watch holds one event:
/// the gateway's reflectors are dropped (`Compacted`) and relist over and over, some from a
/// revision already out of the history. The first burst lands between `bind` and `run`. After
/// each burst the table must match the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_converges_under_concurrent_churn_and_compaction() {
    const WRITERS: usize = 3;
    const OPS: usize = 120;
    const ROUNDS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), tiny_watches());
    let mut registry = Registry::default();
    let gateway = Gateway::bind(
        GatewayConfig::new("127.0.0.1:0".parse().unwrap()),
        store.clone(),
        &mut registry,
    )
    .await
    .unwrap();
    let view = gateway.routing();
    let shutdown = CancellationToken::new();
    let mut gateway = Some(gateway);
    let mut task = None;
    for round in 0..ROUNDS {
        let mut writers = JoinSet::new();
        for w in 0..WRITERS {
            writers.spawn(churn(store.clone(), w, round, OPS));
        }
        while let Some(done) = writers.join_next().await {
            done.unwrap();
        }
        // The first burst lands between `bind` and `run`.
        if let Some(gateway) = gateway.take() {
            task = Some(tokio::spawn(gateway.run(shutdown.clone())));
        }
        converges(&view, store.as_ref(), &format!("round {round}")).await;
    }
    shutdown.cancel();
    timeout(DEADLINE, task.unwrap())
        .await
        .expect("gateway stops in time")
        .unwrap()
        .unwrap();
}

/// The embedded store, with watches that can be cut with `Closed` and lists that can be made to
/// fail with `Closed` while the store is open: a reflector then ends, as one did when a remote
/// watch stream ended.
struct CuttableStore {
    inner: Arc<dyn Store>,
    cut: std::sync::Mutex<CancellationToken>,
    closed_lists: AtomicUsize,
}

impl CuttableStore {
    /// Ends every open watch with `Closed`; the next `closed_lists` lists fail with `Closed`.
    fn cut(&self, closed_lists: usize) {
        self.closed_lists.store(closed_lists, Ordering::SeqCst);
        let old = std::mem::take(&mut *self.cut.lock().unwrap());
        old.cancel();
    }
}

#[async_trait::async_trait]
impl Store for CuttableStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        let fail = self
            .closed_lists
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if fail.is_ok() {
            return Err(StoreError::Closed);
        }
        self.inner.list(prefix).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        pre: Precondition,
    ) -> Result<KeyValue, StoreError> {
        self.inner.put(key, value, pre).await
    }
    async fn delete(&self, key: &str, pre: Precondition) -> Result<Option<KeyValue>, StoreError> {
        self.inner.delete(key, pre).await
    }
    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        let mut inner = self.inner.watch(prefix, after).await?;
        let cut = self.cut.lock().unwrap().clone();
        let (tx, rx) = mpsc::channel(16);
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
                let Some(event) = event else { return };
                if tx.send(event).await.is_err() {
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

/// Both reflectors end (their watch and then their relist find the store "closed"): the table
/// used to freeze for good; the gateway now starts new reflectors and follows the store again.
#[tokio::test]
async fn table_follows_the_store_after_its_reflectors_end() {
    let dir = tempfile::tempdir().unwrap();
    let inner = open(dir.path(), StoreOptions::default());
    let store = Arc::new(CuttableStore {
        inner: inner.clone(),
        cut: std::sync::Mutex::new(CancellationToken::new()),
        closed_lists: AtomicUsize::new(0),
    });
    let mut registry = Registry::default();
    let gateway = Gateway::bind(
        GatewayConfig::new("127.0.0.1:0".parse().unwrap()),
        store.clone(),
        &mut registry,
    )
    .await
    .unwrap();
    let view = gateway.routing();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gateway.run(shutdown.clone()));

    typed::create(inner.as_ref(), service("s0")).await.unwrap();
    typed::create(inner.as_ref(), instance(0)).await.unwrap();
    converges(&view, inner.as_ref(), "before the cut").await;
    assert!(view.routes_to("i00"));

    // Each reflector's watch ends, and its relist fails with `Closed`: both reflectors end.
    store.cut(2);
    typed::create(inner.as_ref(), service("s1")).await.unwrap();
    typed::create(inner.as_ref(), instance(1)).await.unwrap();
    typed::delete::<Instance>(inner.as_ref(), "i00", None)
        .await
        .unwrap();
    converges(&view, inner.as_ref(), "after the reflectors ended").await;
    assert!(view.routes_to("i01") && !view.routes_to("i00"));

    shutdown.cancel();
    timeout(DEADLINE, task)
        .await
        .expect("gateway stops in time")
        .unwrap()
        .unwrap();
}
