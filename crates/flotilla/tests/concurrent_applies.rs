//! Applies with no lock between them: on the embedded store, and through two separate etcd
//! clients on one member (two servers of a cluster). Services claiming the same route at once:
//! exactly one gets it, every other is told which service holds it. Services claiming nothing
//! new all go through side by side.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

#[path = "../../store/tests/support/etcd.rs"]
mod etcd_support;

use std::sync::Arc;

use flotilla_server::{ApplyRequest, OpError, apply};
use flotilla_store::{EmbeddedStore, EtcdOptions, EtcdStore, Store, StoreOptions};

fn spec(path: &str) -> flotilla_spec::ServiceSpec {
    let body = serde_json::json!({
        "command": "/bin/sleep",
        "args": ["100"],
        "replicas": 0,
        "ports": ["http"],
        "routes": [{ "host": "shared.localhost", "path": path }]
    });
    flotilla_spec::parse_service_json(body.to_string().as_bytes()).unwrap()
}

/// Eight services claim `/round-N` at once, in each of 5 rounds; writers alternate between
/// `stores` (several servers' views of one store).
async fn one_claim_wins(stores: &[Arc<dyn Store>]) {
    for round in 0..5 {
        let path = format!("/round-{round}");
        let mut tasks = Vec::new();
        for i in 0..8 {
            let store = stores[i % stores.len()].clone();
            let spec = spec(&path);
            tasks.push(tokio::spawn(async move {
                let name = format!("claim-{round}-{i}");
                apply(store.as_ref(), ApplyRequest::new(name, spec), "test").await
            }));
        }
        let (mut won, mut refused) = (Vec::new(), Vec::new());
        for task in tasks {
            match task.await.unwrap() {
                Ok((_, service)) => won.push(service.metadata.name),
                Err(OpError::Invalid { problems }) => refused.push(problems),
                Err(other) => panic!("round {round}: {other}"),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: {won:?} all got {path}");
        for problems in &refused {
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].field, "spec.routes[0]", "{problems:?}");
            assert!(
                problems[0].message.contains(&won[0]),
                "the refusal names the holder {}: {problems:?}",
                won[0]
            );
        }
    }
    // Distinct routes, and re-applies claiming nothing new: all go through.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = stores[i % stores.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut spec = spec(&format!("/own-{}", i % 8));
            spec.replicas = u32::try_from(i / 8).unwrap();
            let name = format!("own-{}", i % 8);
            apply(store.as_ref(), ApplyRequest::new(name, spec), "test").await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_on_the_embedded_store_claim_a_route_once() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open_with(
            &dir.path().join("s.redb"),
            StoreOptions {
                durable: false,
                ..StoreOptions::default()
            },
        )
        .unwrap(),
    );
    one_claim_wins(&[store]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_through_two_etcd_clients_claim_a_route_once() {
    let test = "concurrent_applies_through_two_etcd_clients_claim_a_route_once";
    if let Some(why) = etcd_support::unavailable() {
        etcd_support::skip(test, &why);
        return;
    }
    let member = etcd_support::Etcd::start().await;
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..2 {
        let store = EtcdStore::connect(
            std::slice::from_ref(&member.endpoint),
            EtcdOptions::default(),
        )
        .await
        .unwrap();
        stores.push(Arc::new(store));
    }
    one_claim_wins(&stores).await;
}
