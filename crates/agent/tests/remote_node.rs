//! An agent on "another machine": it reaches the control plane only through the node interface
//! over HTTP (a real API server on loopback), runs its node's instances, reports their status and
//! events, finishes deletions, and cannot see or touch another node's instances.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use flotilla_agent::{Agent, AgentConfig, CgroupMode};
use flotilla_server::{ApiState, LogSource};
use flotilla_spec::{Event, EventType, Instance, InstanceSpec, InstanceStatus, ObjectMeta, Phase};
use flotilla_store::{EmbeddedStore, NodeApi, RemoteNode, Store, typed};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "node-test-token";

struct NoLogs;

#[async_trait]
impl LogSource for NoLogs {
    async fn read(&self, _: &str, _: Option<usize>) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
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

fn instance(name: &str, node: &str) -> Instance {
    Instance {
        metadata: ObjectMeta::named(name),
        spec: InstanceSpec {
            service: "svc".into(),
            node: node.into(),
            spec_hash: "h".into(),
            template: serde_json::from_value(serde_json::json!({
                "command": "sh", "args": ["-c", "echo up; exec sleep 300"],
                "stop": {"grace_period": "2s"}
            }))
            .unwrap(),
        },
        status: Default::default(),
    }
}

async fn poll<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A store served by a real API on loopback.
struct Api {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    leases: Arc<flotilla_store::Leases>,
    shutdown: CancellationToken,
    registry: prometheus_client::registry::Registry,
    base: String,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Api {
    async fn start() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let shutdown = CancellationToken::new();
        let mut registry = prometheus_client::registry::Registry::default();
        let leases = Arc::new(flotilla_store::Leases::new(Duration::from_secs(2)));
        let state = ApiState::new(
            store.clone(),
            leases.clone(),
            TOKEN,
            Arc::new(NoLogs),
            &mut registry,
            shutdown.clone(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(flotilla_server::serve(
            listener,
            flotilla_server::router(state),
            shutdown.clone(),
        ));
        Api {
            dir,
            store,
            leases,
            shutdown,
            registry,
            base,
            server,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_over_http_runs_its_node_and_nothing_else() {
    let Api {
        dir,
        store,
        shutdown,
        mut registry,
        base,
        server,
        ..
    } = Api::start().await;

    let node = format!("remote-{}", std::process::id());
    typed::create(store.as_ref(), instance("mine", &node))
        .await
        .unwrap();
    typed::create(store.as_ref(), instance("theirs", "elsewhere"))
        .await
        .unwrap();

    let mut config = AgentConfig::new(node.clone(), dir.path().join("data"));
    config.cgroups = CgroupMode::Disabled;
    let api = Arc::new(RemoteNode::new(&base, TOKEN, &node));
    let agent = Agent::new(config, api, &mut registry).unwrap();
    let agent_shutdown = CancellationToken::new();
    let agent_task = tokio::spawn(agent.run(agent_shutdown.clone()));

    // Its instance runs, with status and events written through the API.
    let pid = poll("the instance to run", async || {
        let i = typed::get::<Instance>(store.as_ref(), "mine")
            .await
            .unwrap()?;
        (i.status.phase == Phase::Running).then_some(i.status.pid?)
    })
    .await;
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let source = format!("agent/{node}");
    poll("its Started event", async || {
        let (events, _) = typed::list::<Event>(store.as_ref()).await.unwrap();
        events
            .iter()
            .any(|e| e.involved.name == "mine" && e.reason == "Started" && e.source == source)
            .then_some(())
    })
    .await;
    let theirs = typed::get::<Instance>(store.as_ref(), "theirs")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        theirs.status,
        InstanceStatus::default(),
        "another node's instance was touched"
    );

    // A node's interface cannot see, write or delete another node's instance.
    let other = RemoteNode::new(&base, TOKEN, "intruder");
    let set = |s: &mut InstanceStatus| {
        s.restarts = 99;
        true
    };
    assert!(other.modify_status("mine", &set).await.unwrap().is_none());
    assert!(!other.finish_deletion("mine").await.unwrap());
    other
        .record_event("mine", EventType::Warning, "Forged", "not mine")
        .await;
    let (listed, _) = typed::list::<Instance>(other.instances().as_ref())
        .await
        .unwrap();
    assert!(listed.is_empty(), "{listed:#?}");
    let mine = typed::get::<Instance>(store.as_ref(), "mine")
        .await
        .unwrap()
        .unwrap();
    assert_ne!(mine.status.restarts, 99);
    let (events, _) = typed::list::<Event>(store.as_ref()).await.unwrap();
    assert!(!events.iter().any(|e| e.reason == "Forged"));
    // And its own node's interface cannot delete what the controller did not mark.
    let own = RemoteNode::new(&base, TOKEN, &node);
    assert!(own.finish_deletion("mine").await.is_err());

    // The controller marks it for deletion: the agent stops it and finishes the deletion.
    typed::modify::<Instance>(store.as_ref(), "mine", |i| {
        i.metadata.deletion_timestamp = Some(flotilla_spec::now_rfc3339());
        true
    })
    .await
    .unwrap();
    poll("the instance to be deleted", async || {
        typed::get::<Instance>(store.as_ref(), "mine")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    poll("its process to be gone", async || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.contains(") Z")).then_some(())
    })
    .await;

    agent_shutdown.cancel();
    agent_task.await.unwrap().unwrap();
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// A remote agent registers its node (capacity, labels, address) and renews its lease; the
/// controller marks the node Ready, and NotReady once the agent stops and the lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_registers_beats_and_goes_not_ready_when_its_agent_stops() {
    use flotilla_spec::Node;
    use flotilla_store::LeaseState;
    let Api {
        dir,
        store,
        leases,
        shutdown,
        mut registry,
        base,
        server,
    } = Api::start().await;
    let controller = flotilla_server::controller::ServiceController::new(
        store.clone(),
        leases.clone(),
        flotilla_server::cluster::Membership::Fleet,
        &mut registry,
    );
    let controller_task = tokio::spawn(controller.run(shutdown.clone()));

    let node = format!("beating-{}", std::process::id());
    let mut config = AgentConfig::new(node.clone(), dir.path().join("data"));
    config.cgroups = CgroupMode::Disabled;
    config.lease_duration = Duration::from_secs(2);
    config.labels.insert("zone".into(), "a".into());
    let api = Arc::new(RemoteNode::new(&base, TOKEN, &node));
    let agent = Agent::new(config, api, &mut registry).unwrap();
    let agent_shutdown = CancellationToken::new();
    let agent_task = tokio::spawn(agent.run(agent_shutdown.clone()));

    let ready = |n: &Node| n.status.condition("Ready").map(|c| c.status);
    let registered = poll("the node to register and be Ready", async || {
        let n = typed::get::<Node>(store.as_ref(), &node).await.unwrap()?;
        (ready(&n) == Some(true)).then_some(n)
    })
    .await;
    assert_eq!(
        registered.metadata.labels.get("zone").map(String::as_str),
        Some("a")
    );
    assert_eq!(
        registered
            .metadata
            .labels
            .get("flotilla.dev/os")
            .map(String::as_str),
        Some("linux")
    );
    assert!(registered.status.allocatable.cpu_millicores >= 1000);
    assert!(registered.status.capacity.memory_bytes > 0);
    assert_eq!(registered.status.address, "127.0.0.1");
    // The lease is renewed, and a heartbeat writes nothing to the store (once the NodeReady
    // event, written after the condition, is in).
    poll("the NodeReady event", async || {
        let (events, _) = typed::list::<Event>(store.as_ref()).await.unwrap();
        events
            .iter()
            .any(|e| e.involved.name == node && e.reason == "NodeReady")
            .then_some(())
    })
    .await;
    // Settled: the revision the store reports catches up with the last write it committed.
    let mut last = store.revision();
    let revision = poll("the store to settle", async || {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = store.revision();
        let settled = now == last;
        last = now;
        settled.then_some(now)
    })
    .await;
    let age = || match leases.state(&node) {
        LeaseState::Held { ago, duration } => {
            assert_eq!(duration, Duration::from_secs(2));
            ago
        }
        other => panic!("no lease after registration: {other:?}"),
    };
    for _ in 0..2 {
        let before = age();
        poll("the lease to be renewed", async || {
            (age() < before).then_some(())
        })
        .await;
    }
    assert_eq!(store.revision(), revision, "a heartbeat wrote to the store");

    // The agent stops: its lease expires and the node becomes NotReady, with an event.
    agent_shutdown.cancel();
    agent_task.await.unwrap().unwrap();
    let stopped = Instant::now();
    let down = poll("the node to become NotReady", async || {
        let n = typed::get::<Node>(store.as_ref(), &node).await.unwrap()?;
        (ready(&n) == Some(false)).then_some(n)
    })
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
    let c = down.status.condition("Ready").unwrap();
    assert_eq!(c.reason, "LeaseExpired", "{c:?}");
    // The event is written right after the condition.
    poll("the NodeNotReady event", async || {
        let (events, _) = typed::list::<Event>(store.as_ref()).await.unwrap();
        events
            .iter()
            .any(|e| e.involved.name == node && e.reason == "NodeNotReady")
            .then_some(())
    })
    .await;

    shutdown.cancel();
    controller_task.await.unwrap();
    server.await.unwrap().unwrap();
}
