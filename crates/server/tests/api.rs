//! API behaviour against a real embedded store: auth, errors that name where, apply semantics,
//! conflicts, and that bad requests change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

use std::sync::Arc;

use async_trait::async_trait;
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use flotilla_server::{ApiState, LogSource, ServiceController};
use flotilla_spec::{Instance, Service};
use flotilla_store::{EmbeddedStore, Store, typed};
use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const TOKEN: &str = "test-token";

struct NoLogs;

#[async_trait]
impl LogSource for NoLogs {
    async fn read(&self, _: &str, _: Option<usize>) -> Result<Vec<u8>, String> {
        Ok(b"line\n".to_vec())
    }
    fn follow(
        &self,
        _: &str,
        _: Option<usize>,
        _: CancellationToken,
    ) -> mpsc::Receiver<Result<Bytes, String>> {
        mpsc::channel(1).1
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    router: axum::Router,
}

/// A controller for one machine whose node "local" is registered (as `up`'s agent does
/// before the controller starts).
async fn local_controller(store: &Arc<dyn Store>, registry: &mut Registry) -> ServiceController {
    use flotilla_store::NodeApi;
    let leases: Arc<flotilla_store::Leases> = Default::default();
    let node = flotilla_store::StoreNode::new(store.clone(), leases.clone(), "local");
    let mut registration = flotilla_store::Registration::default();
    registration.status.allocatable.cpu_millicores = 2000;
    registration.status.allocatable.memory_bytes = 1 << 32;
    registration.status.allocatable.pids = 10_000;
    node.register(registration)
        .await
        .expect("register the node");
    ServiceController::new(
        store.clone(),
        leases,
        flotilla_server::cluster::Membership::Local("local".into()),
        registry,
    )
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).expect("open store"));
    let mut registry = Registry::default();
    let state = ApiState::new(
        store.clone(),
        Default::default(),
        TOKEN,
        Arc::new(NoLogs),
        &mut registry,
        CancellationToken::new(),
    );
    Fixture {
        _dir: dir,
        store,
        router: flotilla_server::router(state),
    }
}

async fn call(
    router: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(body.map(Body::from).unwrap_or_else(Body::empty))
        .expect("request");
    let resp = router.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

fn hello(replicas: u32) -> String {
    json!({
        "metadata": { "name": "hello" },
        "spec": {
            "command": "/bin/sleep",
            "args": ["100"],
            "replicas": replicas,
            "ports": ["http"],
            "routes": [{ "host": "hello.localhost", "path": "/" }]
        }
    })
    .to_string()
}

#[tokio::test]
async fn requests_without_a_valid_token_are_refused() {
    let f = fixture();
    let (status, body) = call(&f.router, "GET", "/api/v1/services", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["reason"], "Unauthorized");
    assert!(body["requestId"].as_str().is_some_and(|s| !s.is_empty()));

    let (status, _) = call(&f.router, "GET", "/api/v1/services", Some("wrong"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some("wrong"),
        Some(hello(1)),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        typed::get::<Service>(&*f.store, "hello")
            .await
            .unwrap()
            .is_none()
    );

    // Liveness needs no token.
    let (status, _) = call(&f.router, "GET", "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn apply_creates_then_is_idempotent_then_configures() {
    let f = fixture();
    let (status, body) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(2)),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["result"], "created");
    assert_eq!(body["service"]["metadata"]["generation"], 1);
    let rev = f.store.revision();

    let (status, body) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(2)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["result"], "unchanged");
    assert_eq!(f.store.revision(), rev, "an unchanged apply must not write");

    let (status, body) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(3)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["result"], "configured");
    assert_eq!(body["service"]["metadata"]["generation"], 2);
    assert_eq!(body["service"]["spec"]["replicas"], 3);

    let (status, body) = call(
        &f.router,
        "GET",
        "/api/v1/services/hello",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["metadata"]["resourceVersion"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn malformed_and_invalid_bodies_name_where_and_change_nothing() {
    let f = fixture();
    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(1)),
    )
    .await;
    let before = typed::get::<Service>(&*f.store, "hello")
        .await
        .unwrap()
        .unwrap();
    let rev = f.store.revision();

    // Broken JSON: 400 with line and column.
    let (status, body) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some("{\n  \"metadata\": {\"name\": \"hello\"},\n  \"spec\": {\"command\": }\n}".into()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("line 3"), "{msg}");

    // Unknown field: 422 naming the path and suggesting the right name.
    let (status, body) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(r#"{"metadata":{"name":"hello"},"spec":{"command":"x","replica":2}}"#.into()),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "spec");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("`replica`") && msg.contains("`replicas`"),
        "{msg}"
    );

    // Invalid values: every problem listed with its path.
    let (status, body) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(
            r#"{"metadata":{"name":"hello"},"spec":{"command":"x","resources":{"memory":"lots"},"probes":{"readiness":{"http":{"path":"health"}}}}}"#
                .into(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let fields: Vec<&str> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert!(fields.contains(&"spec.resources.memory"), "{fields:?}");

    // Bad name.
    let (status, body) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(r#"{"metadata":{"name":"Hello_World"},"spec":{"command":"x"}}"#.into()),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "metadata.name");

    // Bad query parameter.
    let (status, body) = call(
        &f.router,
        "GET",
        "/api/v1/services?labelSelector=a%20b",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "query.labelSelector");

    let after = typed::get::<Service>(&*f.store, "hello")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before, after);
    assert_eq!(f.store.revision(), rev, "rejected requests must not write");
}

#[tokio::test]
async fn stale_resource_version_conflicts() {
    let f = fixture();
    let (_, body) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(1)),
    )
    .await;
    let rv = body["service"]["metadata"]["resourceVersion"]
        .as_u64()
        .unwrap();
    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(2)),
    )
    .await;

    let mut stale: Value = serde_json::from_str(&hello(5)).unwrap();
    stale["metadata"]["resourceVersion"] = json!(rv);
    let (status, body) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(stale.to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["field"], "metadata.resourceVersion");
    let stored = typed::get::<Service>(&*f.store, "hello")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.spec.replicas, 2);
}

#[tokio::test]
async fn routes_may_not_collide_across_services() {
    let f = fixture();
    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(1)),
    )
    .await;
    let other = hello(1).replace("\"name\":\"hello\"", "\"name\":\"other\"");
    let (status, body) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(other),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "spec.routes[0]");
    assert!(
        typed::get::<Service>(&*f.store, "other")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn delete_and_not_found() {
    let f = fixture();
    let (status, body) = call(
        &f.router,
        "DELETE",
        "/api/v1/services/nope",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["reason"], "NotFound");
    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(1)),
    )
    .await;
    let (status, _) = call(
        &f.router,
        "DELETE",
        "/api/v1/services/hello",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        &f.router,
        "GET",
        "/api/v1/services/hello",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(&f.router, "GET", "/no/such/path", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn openapi_and_events_are_served() {
    let f = fixture();
    let (status, body) = call(&f.router, "GET", "/openapi.json", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["openapi"], "3.1.0");
    let (_, applied) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(1)),
    )
    .await;
    let (status, body) = call(&f.router, "GET", "/api/v1/events", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    let items = body["items"].as_array().unwrap();
    let reasons: Vec<&str> = items
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, vec!["Applied"]);
    // The service and its event are one write: the same revision.
    assert_eq!(
        items[0]["metadata"]["resourceVersion"], applied["service"]["metadata"]["resourceVersion"],
        "{body}"
    );
}

#[tokio::test]
async fn watch_from_a_revision_streams_later_changes_and_expired_says_so() {
    let f = fixture();
    let (_, body) = call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(1)),
    )
    .await;
    let rv = body["service"]["metadata"]["resourceVersion"]
        .as_u64()
        .unwrap();
    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(2)),
    )
    .await;

    let req = Request::builder()
        .uri(format!("/api/v1/watch/services?resourceVersion={rv}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let resp = f.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
        .await
        .expect("a watch event in time")
        .expect("frame")
        .expect("ok frame");
    let line: Value = serde_json::from_slice(frame.data_ref().unwrap()).unwrap();
    assert_eq!(line["type"], "MODIFIED");
    assert_eq!(line["object"]["spec"]["replicas"], 2);

    // A revision older than the retained history (history starts at open) is expired.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let s = EmbeddedStore::open(&path).unwrap();
        for i in 0..3 {
            s.put(
                &format!("/registry/services/x{i}"),
                b"{}".to_vec(),
                flotilla_store::Precondition::None,
            )
            .await
            .unwrap();
        }
    }
    let reopened: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
    let mut registry = Registry::default();
    let router = flotilla_server::router(ApiState::new(
        reopened,
        Default::default(),
        TOKEN,
        Arc::new(NoLogs),
        &mut registry,
        CancellationToken::new(),
    ));
    let (status, body) = call(
        &router,
        "GET",
        "/api/v1/watch/services?resourceVersion=1",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let text = body
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| body.to_string());
    assert!(text.contains("\"code\":410"), "{text}");
}

#[tokio::test]
async fn controller_converges_instances_to_replicas() {
    let f = fixture();
    let mut registry = Registry::default();
    let controller = local_controller(&f.store, &mut registry).await;
    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(3)),
    )
    .await;
    controller.reconcile_all().await.unwrap();
    let (instances, _) = typed::list::<Instance>(&*f.store).await.unwrap();
    assert_eq!(instances.len(), 3);
    assert!(
        instances
            .iter()
            .all(|i| i.spec.service == "hello" && i.spec.node == "local")
    );
    // Reconciling again changes nothing (no duplicate creates).
    controller.reconcile_all().await.unwrap();
    assert_eq!(typed::list::<Instance>(&*f.store).await.unwrap().0.len(), 3);

    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(1)),
    )
    .await;
    controller.reconcile_all().await.unwrap();
    let (instances, _) = typed::list::<Instance>(&*f.store).await.unwrap();
    let deleting = instances
        .iter()
        .filter(|i| i.metadata.deletion_timestamp.is_some())
        .count();
    assert_eq!(deleting, 2);

    call(
        &f.router,
        "DELETE",
        "/api/v1/services/hello",
        Some(TOKEN),
        None,
    )
    .await;
    controller.reconcile_all().await.unwrap();
    let (instances, _) = typed::list::<Instance>(&*f.store).await.unwrap();
    assert!(
        instances
            .iter()
            .all(|i| i.metadata.deletion_timestamp.is_some())
    );
}

/// A small scale-up records an event per instance; a large one a single summary, so that it
/// does not push every other event out of the store's bounded list.
#[tokio::test]
async fn a_large_scale_up_records_one_summary_event() {
    let f = fixture();
    let mut registry = Registry::default();
    let controller = local_controller(&f.store, &mut registry).await;
    let created_events = || async {
        let (events, _) = typed::list::<flotilla_spec::Event>(&*f.store)
            .await
            .unwrap();
        events
            .into_iter()
            .filter(|e| e.reason == "Created")
            .map(|e| e.message)
            .collect::<Vec<_>>()
    };
    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(3)),
    )
    .await;
    controller.reconcile_all().await.unwrap();
    let small = created_events().await;
    assert_eq!(small.len(), 3, "{small:?}");
    assert!(
        small
            .iter()
            .all(|m| m.starts_with("created instance hello-")),
        "{small:?}"
    );

    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(203)),
    )
    .await;
    controller.reconcile_all().await.unwrap();
    assert_eq!(
        typed::list::<Instance>(&*f.store).await.unwrap().0.len(),
        203
    );
    let all = created_events().await;
    assert_eq!(all.len(), 4, "one more event for 200 instances: {all:?}");
    let summary = &all[3];
    assert!(
        summary.starts_with("created 200 instances (hello-") && summary.ends_with(" and 197 more)"),
        "{summary}"
    );
}

/// A scale-down that deletes instances still waiting for room never binds them afterwards in
/// the same pass (they would be started only to be stopped).
#[tokio::test]
async fn pending_instances_deleted_by_a_scale_down_are_not_bound() {
    let f = fixture();
    let mut registry = Registry::default();
    let controller = local_controller(&f.store, &mut registry).await;
    let spec = |replicas: u32| {
        json!({
            "metadata": { "name": "big" },
            "spec": { "command": "/bin/sleep", "args": ["100"], "replicas": replicas,
                      "resources": { "cpu": "1000m" } }
        })
        .to_string()
    };
    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(spec(4)),
    )
    .await;
    controller.reconcile_all().await.unwrap();
    let (instances, _) = typed::list::<Instance>(&*f.store).await.unwrap();
    let pending: Vec<String> = instances
        .iter()
        .filter(|i| i.spec.node.is_empty())
        .map(|i| i.metadata.name.clone())
        .collect();
    assert_eq!(pending.len(), 2, "2 CPUs hold two of four: {instances:?}");

    // One running instance exits (its room frees up) as the service is scaled down to one.
    let exited = instances.iter().find(|i| !i.spec.node.is_empty()).unwrap();
    typed::modify::<Instance>(&*f.store, &exited.metadata.name, |i| {
        i.status.phase = flotilla_spec::Phase::Failed;
        true
    })
    .await
    .unwrap();
    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(spec(1)),
    )
    .await;
    controller.reconcile_all().await.unwrap();
    let (instances, _) = typed::list::<Instance>(&*f.store).await.unwrap();
    for i in instances
        .iter()
        .filter(|i| i.metadata.deletion_timestamp.is_some())
    {
        if pending.contains(&i.metadata.name) {
            assert!(i.spec.node.is_empty(), "deleted, then bound: {i:?}");
        }
    }
    // The one kept may be placed now (in the exited one's room); no deleted one is.
    let deleted: Vec<&str> = instances
        .iter()
        .filter(|i| i.metadata.deletion_timestamp.is_some())
        .map(|i| i.metadata.name.as_str())
        .collect();
    let (events, _) = typed::list::<flotilla_spec::Event>(&*f.store)
        .await
        .unwrap();
    let assigned: Vec<&str> = events
        .iter()
        .filter(|e| e.reason == "Scheduled")
        .filter_map(|e| e.message.strip_prefix("assigned instance "))
        .collect();
    assert!(
        assigned.iter().all(|a| !deleted.contains(a)),
        "assigned {assigned:?}, deleted {deleted:?}"
    );
}

#[tokio::test]
async fn revision_history_is_capped_and_keeps_the_last_good_one() {
    let f = fixture();
    let mut registry = Registry::default();
    let controller = local_controller(&f.store, &mut registry).await;
    let spec = |n: u32| {
        json!({
            "metadata": { "name": "hist" },
            "spec": { "command": "/bin/sleep", "args": [n.to_string()], "deploy": { "revision_history": 3 } }
        })
        .to_string()
    };
    // Revision 1 completes only if its instance is ready, and (without a readiness probe) has
    // been for the stability window; there is no agent here, so mark it.
    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(spec(1)),
    )
    .await;
    controller.reconcile_all().await.unwrap();
    let (instances, _) = typed::list::<Instance>(&*f.store).await.unwrap();
    for i in instances {
        typed::modify::<Instance>(&*f.store, &i.metadata.name, |i| {
            i.status.phase = flotilla_spec::Phase::Running;
            i.status.ready = true;
            i.status.ready_since = Some("2020-01-01T00:00:00Z".into());
            true
        })
        .await
        .unwrap();
    }
    controller.reconcile_all().await.unwrap();
    let svc = typed::get::<Service>(&*f.store, "hist")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(svc.status.last_good_revision, 1, "{:?}", svc.status);

    for n in 2..=8 {
        call(
            &f.router,
            "POST",
            "/api/v1/services",
            Some(TOKEN),
            Some(spec(n)),
        )
        .await;
        controller.reconcile_all().await.unwrap();
    }
    let (_, body) = call(
        &f.router,
        "GET",
        "/api/v1/services/hist/revisions",
        Some(TOKEN),
        None,
    )
    .await;
    let numbers: Vec<u64> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["spec"]["number"].as_u64().unwrap())
        .collect();
    assert_eq!(
        numbers,
        vec![1, 6, 7, 8],
        "the newest 3 and the last good one"
    );
    let changes = &body["items"][3]["spec"]["changes"];
    assert_eq!(changes, &json!(["args"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_applies_succeed_while_status_is_being_written() {
    let f = fixture();
    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(1)),
    )
    .await;
    // Another writer (like the controller) keeps changing the status.
    let store = f.store.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 5_000 {
                n += 1;
                let _ = typed::modify::<Service>(&*store, "hello", |s| {
                    s.status.ready_replicas = n;
                    true
                })
                .await;
                // Pacing of the competing writer (about a thousand writes a second, far above
                // what the controller does), not synchronization.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
    };
    // Applies without a resourceVersion never fail because of it.
    for replicas in 2..22 {
        let (status, body) = call(
            &f.router,
            "POST",
            "/api/v1/services",
            Some(TOKEN),
            Some(hello(replicas)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "apply {replicas}: {body}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let s = typed::get::<Service>(&*f.store, "hello")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.spec.replicas, 21);
}

/// In a fleet the controller spreads a service's instances over the ready nodes.
#[tokio::test]
async fn a_fleet_controller_spreads_instances_over_ready_nodes() {
    use flotilla_store::NodeApi;
    let f = fixture();
    let leases: Arc<flotilla_store::Leases> = Default::default();
    for n in ["a", "b", "c"] {
        let node = flotilla_store::StoreNode::new(f.store.clone(), leases.clone(), n);
        let mut registration = flotilla_store::Registration::default();
        registration.status.allocatable.cpu_millicores = 32_000;
        registration.status.allocatable.memory_bytes = 128 << 30;
        registration.lease_seconds = 60;
        node.register(registration).await.expect("register");
    }
    let mut registry = Registry::default();
    let controller = ServiceController::new(
        f.store.clone(),
        leases,
        flotilla_server::cluster::Membership::Fleet,
        &mut registry,
    );
    call(
        &f.router,
        "POST",
        "/api/v1/services",
        Some(TOKEN),
        Some(hello(6)),
    )
    .await;
    controller.reconcile_all().await.unwrap();
    let (instances, _) = typed::list::<Instance>(&*f.store).await.unwrap();
    let mut per: std::collections::BTreeMap<String, usize> = Default::default();
    for i in &instances {
        *per.entry(i.spec.node.clone()).or_insert(0) += 1;
    }
    assert_eq!(
        per.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{per:?}"
    );
}
