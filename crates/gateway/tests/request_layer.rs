//! The gateway's request layer end to end: a real gateway on loopback, a real embedded store in
//! a tempdir, real upstream servers (HTTP/1.1, h2c, upgrades). Routing features, balancing and
//! passive health, retries and their budget, rate limits, body limits, upgrades and gRPC-style
//! trailers, and table swaps under load.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

mod common;

use common::{instance, route, service_spec};
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{Gateway, GatewayConfig};
use flotilla_spec::object::{Instance, ObjectMeta, Service};
use flotilla_spec::quantity::Dur;
use flotilla_spec::service::{RateLimitSpec, RouteSpec, UpstreamProtocol};
use flotilla_store::typed;
use flotilla_store::{EmbeddedStore, Store, StoreOptions};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(10);

// ---- upstream servers -----------------------------------------------------------------------

/// How an upstream behaves; switchable while it runs.
#[derive(Default)]
struct Behaviour {
    /// Answer every request with this status (0: normal).
    status: AtomicU64,
    /// Requests received.
    hits: AtomicU64,
    /// Connections accepted.
    connections: AtomicU64,
}

/// A real HTTP/1.1 (or h2c) server on 127.0.0.1 that answers with its name and echoes what it
/// received in `x-seen-*` headers. `/slow?ms=N` waits N ms first; upgrade requests are accepted
/// and echoed back byte for byte.
struct Upstream {
    name: String,
    port: u16,
    behaviour: Arc<Behaviour>,
    task: JoinHandle<()>,
}

impl Upstream {
    async fn start(name: &str) -> Upstream {
        Self::start_proto(name, false).await
    }

    async fn start_proto(name: &str, h2c: bool) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let behaviour = Arc::new(Behaviour::default());
        let (owned_name, b) = (name.to_string(), behaviour.clone());
        // Aborting the task drops the listener and, through the JoinSet, every connection.
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                b.connections.fetch_add(1, Ordering::SeqCst);
                let (name, b) = (owned_name.clone(), b.clone());
                let service = service_fn(move |req| handle(name.clone(), b.clone(), req));
                let io = TokioIo::new(stream);
                connections.spawn(async move {
                    if h2c {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .with_upgrades()
                            .await;
                    }
                });
            }
        });
        Upstream {
            name: name.to_string(),
            port,
            behaviour,
            task,
        }
    }

    fn set_status(&self, status: u16) {
        self.behaviour
            .status
            .store(u64::from(status), Ordering::SeqCst);
    }

    fn hits(&self) -> u64 {
        self.behaviour.hits.load(Ordering::SeqCst)
    }

    fn connections(&self) -> u64 {
        self.behaviour.connections.load(Ordering::SeqCst)
    }

    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn handle(
    name: String,
    behaviour: Arc<Behaviour>,
    mut req: Request<Incoming>,
) -> Result<Response<UpBody>, Infallible> {
    behaviour.hits.fetch_add(1, Ordering::SeqCst);
    let echo = |h: &str| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    let seen = [
        (
            "x-seen-path",
            req.uri()
                .path_and_query()
                .map(|pq| pq.to_string())
                .unwrap_or_default(),
        ),
        ("x-seen-host", echo("host")),
        ("x-seen-te", echo("te")),
        ("x-seen-forwarded", echo("forwarded")),
        ("x-seen-version", format!("{:?}", req.version())),
    ];
    if req.headers().contains_key("upgrade") {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap();
        return Ok(response);
    }
    if let Some(ms) = req.uri().query().and_then(|q| q.strip_prefix("ms=")) {
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/grpc");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let status = match behaviour.status.load(Ordering::SeqCst) {
        0 => StatusCode::OK,
        s => StatusCode::from_u16(s as u16).unwrap(),
    };
    let text = Bytes::from(format!("{name} {}", body.len()));
    let body = if grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", name.parse().unwrap());
        Full::new(text)
            .with_trailers(async move { Some(Ok(trailers)) })
            .boxed()
    } else {
        Full::new(text).boxed()
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    for (header, value) in seen {
        response
            .headers_mut()
            .insert(header, value.parse().unwrap());
    }
    Ok(response)
}

// ---- store objects and harness --------------------------------------------------------------

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    addr: SocketAddr,
    registry: Registry,
    shutdown: CancellationToken,
    gateway: Option<JoinHandle<Result<(), flotilla_gateway::GatewayError>>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut GatewayConfig)) -> Harness {
        let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap());
        tweak(&mut config);
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            durable: false,
            ..StoreOptions::default()
        };
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open_with(&dir.path().join("store.redb"), options).unwrap());
        let mut registry = Registry::default();
        let gateway = Gateway::bind(config, store.clone(), &mut registry)
            .await
            .unwrap();
        let addr = gateway.local_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gateway.run(shutdown.clone()));
        Harness {
            _dir: dir,
            store,
            addr,
            registry,
            shutdown,
            gateway: Some(task),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn add_service(&self, name: &str, routes: Vec<RouteSpec>) {
        let service = Service {
            metadata: ObjectMeta::named(name),
            spec: service_spec(routes),
            status: Default::default(),
        };
        typed::create(self.store.as_ref(), service).await.unwrap();
    }

    async fn set_routes(&self, name: &str, routes: Vec<RouteSpec>) {
        typed::modify::<Service>(self.store.as_ref(), name, |s| {
            s.spec.routes = routes.clone();
            true
        })
        .await
        .unwrap()
        .unwrap();
    }

    async fn add_instance(&self, service: &str, upstream: &Upstream) {
        let inst = instance(&upstream.name, service, upstream.port);
        typed::create(self.store.as_ref(), inst).await.unwrap();
    }

    async fn set_ready(&self, name: &str, ready: bool) {
        typed::modify::<Instance>(self.store.as_ref(), name, |i| {
            i.status.ready = ready;
            true
        })
        .await
        .unwrap()
        .unwrap();
    }

    fn request(&self, method: Method, host: &str, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("host", host)
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, String) {
        let response = timeout(DEADLINE, self.client.request(req))
            .await
            .expect("gateway answers in time")
            .expect("gateway answers");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    async fn get_with(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        let mut req = self.request(Method::GET, host, path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(Full::new(Bytes::new())).unwrap()).await
    }

    async fn get(&self, host: &str, path: &str) -> (StatusCode, String) {
        let (status, _, body) = self.get_with(host, path, &[]).await;
        (status, body)
    }

    /// Polls until a GET is answered by an upstream whose name satisfies `pred`.
    async fn wait_for(&self, host: &str, path: &str, pred: impl Fn(StatusCode, &str) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (status, body) = self.get(host, path).await;
            if pred(status, &body) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never reached; last {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    /// The value of a counter line such as `name_total{route="web"}` (0 if absent).
    fn counter(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.gateway.take() {
            timeout(DEADLINE, task)
                .await
                .expect("gateway stops in time")
                .unwrap()
                .unwrap();
        }
    }
}

fn name_of(body: &str) -> &str {
    body.split_whitespace().next().unwrap_or("")
}

/// `n` upstreams `svc-1..n` as ready instances of `svc`; waits until all answer.
async fn upstreams(h: &Harness, svc: &str, n: usize) -> Vec<Upstream> {
    let mut ups = Vec::new();
    for i in 1..=n {
        let up = Upstream::start(&format!("{svc}-{i}")).await;
        h.add_instance(svc, &up).await;
        ups.push(up);
    }
    let deadline = Instant::now() + DEADLINE;
    let mut seen = BTreeSet::new();
    while seen.len() < n {
        assert!(Instant::now() < deadline, "only {seen:?} answered");
        let (status, body) = h.get("h", "/").await;
        if status == StatusCode::OK {
            seen.insert(name_of(&body).to_string());
        }
    }
    ups
}

// ---- upstream connections -------------------------------------------------------------------

#[tokio::test]
async fn sequential_requests_reuse_their_upstream_connection() {
    let mut h = Harness::start().await;
    h.add_service("svc", vec![route(None, "/")]).await;
    let ups = upstreams(&h, "svc", 1).await;
    let before = ups[0].connections();
    assert!(before >= 1);
    for _ in 0..20 {
        let (status, body) = h.get("h", "/").await;
        assert_eq!((status, name_of(&body)), (StatusCode::OK, "svc-1"));
    }
    // Answers without a body (HEAD) give their connection back too.
    for _ in 0..10 {
        let req = h.request(Method::HEAD, "h", "/");
        let (status, _, body) = h.send(req.body(Full::new(Bytes::new())).unwrap()).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
    }
    assert_eq!(
        ups[0].connections(),
        before,
        "keep-alive: 30 sequential requests opened no new upstream connection"
    );
    h.stop().await;
}

// ---- routing --------------------------------------------------------------------------------

#[tokio::test]
async fn header_match_wildcard_strip_and_rewrite() {
    let mut h = Harness::start().await;
    let mut canary = route(None, "/api");
    canary.headers.insert("X-Canary".into(), "1".into());
    canary.strip_prefix = true;
    let mut wild = route(Some("*.example.test"), "/");
    wild.rewrite = Some("/v2".into());
    let mut ups = Vec::new();
    for (svc, routes) in [
        ("stable", vec![route(None, "/api")]),
        ("canary", vec![canary]),
        ("wild", vec![wild]),
        ("exact", vec![route(Some("shop.example.test"), "/")]),
    ] {
        h.add_service(svc, routes).await;
        let up = Upstream::start(&format!("{svc}-1")).await;
        h.add_instance(svc, &up).await;
        ups.push(up);
    }
    h.wait_for("shop.example.test", "/", |s, b| {
        s == StatusCode::OK && b.starts_with("exact")
    })
    .await;
    h.wait_for("a.example.test", "/", |s, b| {
        s == StatusCode::OK && b.starts_with("wild")
    })
    .await;
    h.wait_for("x", "/api", |s, b| {
        s == StatusCode::OK && b.starts_with("stable")
    })
    .await;
    h.wait_for("x", "/api", |s, _| s == StatusCode::OK).await;

    let (_, headers, body) = h.get_with("x", "/api/users?id=1", &[]).await;
    assert!(body.starts_with("stable"), "{body}");
    assert_eq!(headers["x-seen-path"], "/api/users?id=1");

    let (_, headers, body) = h
        .get_with("x", "/api/users?id=1", &[("x-canary", "1")])
        .await;
    assert!(body.starts_with("canary"), "{body}");
    assert_eq!(headers["x-seen-path"], "/users?id=1", "prefix stripped");
    let (_, headers, _) = h.get_with("x", "/api", &[("x-canary", "1")]).await;
    assert_eq!(headers["x-seen-path"], "/");

    let (_, headers, body) = h.get_with("deep.a.example.test", "/items/3?x=y", &[]).await;
    assert!(body.starts_with("wild"), "{body}");
    assert_eq!(
        headers["x-seen-path"], "/v2/items/3?x=y",
        "prefix rewritten"
    );
    assert_eq!(headers["x-seen-host"], "deep.a.example.test");

    let (_, _, body) = h
        .get_with("SHOP.example.test:80", "/api", &[("x-canary", "1")])
        .await;
    assert!(
        body.starts_with("exact"),
        "exact host beats everything: {body}"
    );
    let (status, _) = h.get("example.test", "/x").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a wildcard does not match its bare domain"
    );
    h.stop().await;
}

#[tokio::test]
async fn route_timeout_answers_504_and_redirects_to_https() {
    let mut h = Harness::start().await;
    let mut slow = route(None, "/");
    slow.timeout = Some(Dur(Duration::from_millis(200)));
    let mut secure = route(Some("pay.example"), "/");
    secure.redirect_https = true;
    h.add_service("web", vec![slow, secure]).await;
    let _ups = upstreams(&h, "web", 1).await;

    let began = Instant::now();
    let (status, body) = h.get("h", "/slow?ms=3000").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(h.get("h", "/slow?ms=1").await.0, StatusCode::OK);

    let (status, headers, _) = h.get_with("Pay.example:8080", "/checkout?id=7", &[]).await;
    assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(headers["location"], "https://pay.example/checkout?id=7");
    let post = h
        .request(Method::POST, "pay.example", "/charge")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (status, headers, _) = h.send(post).await;
    assert_eq!(status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(headers["location"], "https://pay.example/charge");
    h.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    let mut h = Harness::start_with(|c| c.limits.max_body_bytes = 1024).await;
    h.add_service("web", vec![route(None, "/")]).await;
    let ups = upstreams(&h, "web", 1).await;
    let hits_before = ups[0].hits();

    // Declared length: refused before anything is sent upstream.
    let req = h
        .request(Method::POST, "h", "/upload")
        .body(Full::new(Bytes::from(vec![b'x'; 2048])))
        .unwrap();
    let (status, _, body) = h.send(req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(ups[0].hits(), hits_before);

    // Streamed without a length: cut off at the limit.
    let client: Client<HttpConnector, Chunks> = Client::builder(TokioExecutor::new()).build_http();
    let req = h
        .request(Method::POST, "h", "/upload")
        .body(Chunks(vec![Bytes::from(vec![b'y'; 512]); 8]))
        .unwrap();
    let response = timeout(DEADLINE, client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // At the limit is fine.
    let req = h
        .request(Method::POST, "h", "/upload")
        .body(Full::new(Bytes::from(vec![b'x'; 1024])))
        .unwrap();
    let (status, _, body) = h.send(req).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "web-1 1024"));
    h.stop().await;
}

/// A request body sent in chunks, without a declared length.
struct Chunks(Vec<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let next = if self.0.is_empty() {
            None
        } else {
            Some(Ok(hyper::body::Frame::data(self.0.remove(0))))
        };
        std::task::Poll::Ready(next)
    }
}

// ---- swaps, failures, balancing ---------------------------------------------------------------

/// Sends `per_task` GETs from each of `tasks` concurrent clients; returns every non-200.
fn load(h: &Harness, tasks: usize, per_task: usize, path: &'static str) -> JoinSet<Vec<String>> {
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        let client = h.client.clone();
        let addr = h.addr;
        set.spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..per_task {
                let req = Request::get(format!("http://{addr}{path}"))
                    .header("host", "h")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                match timeout(DEADLINE, client.request(req)).await {
                    Ok(Ok(response)) => {
                        let status = response.status();
                        let body = response.into_body().collect().await;
                        if status != StatusCode::OK || body.is_err() {
                            failures.push(format!("{status} {body:?}"));
                        }
                    }
                    Ok(Err(e)) => failures.push(format!("client error {e}")),
                    Err(_) => failures.push("timeout".to_string()),
                }
            }
            failures
        });
    }
    set
}

async fn failures_of(mut set: JoinSet<Vec<String>>) -> Vec<String> {
    let mut all = Vec::new();
    while let Some(result) = timeout(DEADLINE * 3, set.join_next()).await.unwrap() {
        all.extend(result.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_and_instance_changes_under_load_drop_no_request() {
    let mut h = Harness::start().await;
    h.add_service("web", vec![route(None, "/")]).await;
    let ups = upstreams(&h, "web", 3).await;
    let traffic = load(&h, 4, 150, "/slow?ms=1");

    // Swap repeatedly while traffic runs: instances in and out of the table (at least one
    // always ready) and the service's routes rewritten.
    for round in 0..12 {
        let out = &ups[round % 3].name;
        h.set_ready(out, false).await;
        let extra = route(None, &format!("/extra-{round}"));
        h.set_routes("web", vec![route(None, "/"), extra]).await;
        h.set_ready(out, true).await;
        tokio::task::yield_now().await;
    }
    let failures = failures_of(traffic).await;
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(ups.iter().all(|u| u.hits() > 0));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_traffic_is_invisible_to_idempotent_requests() {
    let mut h = Harness::start().await;
    h.add_service("web", vec![route(None, "/")]).await;
    let mut ups = upstreams(&h, "web", 3).await;
    let traffic = load(&h, 4, 100, "/slow?ms=3");
    // Kill one once traffic is flowing to it (requests are in flight there).
    let victim = ups.remove(1);
    let deadline = Instant::now() + DEADLINE;
    while victim.hits() < 20 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    victim.kill().await;
    let failures = failures_of(traffic).await;
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(h.counter(r#"flotilla_gateway_upstream_errors_total{route="web"}"#) >= 1.0);
    assert!(h.counter(r#"flotilla_gateway_retries_total{route="web"}"#) >= 1.0);
    h.stop().await;
}

#[tokio::test]
async fn failing_endpoint_is_ejected_then_recovers() {
    let mut h = Harness::start_with(|c| {
        c.upstream.eject_after = 3;
        c.upstream.ejection_base = Duration::from_millis(300);
    })
    .await;
    h.add_service("web", vec![route(None, "/")]).await;
    let ups = upstreams(&h, "web", 3).await;
    ups[0].set_status(500);

    // Until it is ejected, the failing endpoint's 500s reach clients (a 500 is not retried).
    let deadline = Instant::now() + DEADLINE;
    while h.counter(r#"flotilla_gateway_ejections_total{route="web"}"#) < 1.0 {
        assert!(Instant::now() < deadline, "never ejected");
        h.get("h", "/").await;
    }
    // Ejected: no traffic reaches it.
    let hits = ups[0].hits();
    for _ in 0..30 {
        let (status, body) = h.get("h", "/").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_ne!(name_of(&body), "web-1");
    }
    assert_eq!(ups[0].hits(), hits);

    // Healthy again: traffic comes back once the ejection time is over.
    ups[0].set_status(0);
    h.wait_for("h", "/", |s, b| {
        s == StatusCode::OK && name_of(b) == "web-1"
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn retry_budget_caps_retries() {
    let mut h = Harness::start_with(|c| {
        c.upstream.retry_ratio = 0.2;
        c.upstream.retry_floor = 2;
        c.upstream.retry_window = Duration::from_secs(60);
        c.upstream.eject_after = 1_000;
    })
    .await;
    h.add_service("web", vec![route(None, "/")]).await;
    let ups = upstreams(&h, "web", 3).await;
    for up in &ups {
        up.set_status(503);
    }
    let before: u64 = ups.iter().map(Upstream::hits).sum();
    let n = 50;
    for _ in 0..n {
        let (status, _) = h.get("h", "/").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let sent: u64 = ups.iter().map(Upstream::hits).sum::<u64>() - before;
    let retries = h.counter(r#"flotilla_gateway_retries_total{route="web"}"#);
    // Each request wanted two retries; the budget allows 2 + 20 % of the requests in the window
    // (the warm-up requests of `upstreams` count too).
    let warmup = before as f64;
    assert!(
        retries <= 2.0 + 0.2 * (n as f64 + warmup) + 1.0,
        "{retries} retries"
    );
    assert!(retries >= 2.0 + 0.2 * n as f64 - 1.0, "{retries} retries");
    assert_eq!(sent as f64, n as f64 + retries);
    assert!(h.counter(r#"flotilla_gateway_retries_refused_total{route="web"}"#) > 0.0);

    // A POST is never retried on a 503.
    let retries_before = h.counter(r#"flotilla_gateway_retries_total{route="web"}"#);
    let post = h
        .request(Method::POST, "h", "/")
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    assert_eq!(h.send(post).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        h.counter(r#"flotilla_gateway_retries_total{route="web"}"#),
        retries_before
    );
    h.stop().await;
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_and_recovers() {
    let mut h = Harness::start().await;
    let mut limited = route(None, "/");
    limited.rate_limit = Some(RateLimitSpec {
        requests_per_second: 20,
        burst: Some(3),
    });
    h.add_service("web", vec![limited]).await;
    let _ups = upstreams(&h, "web", 1).await;

    // Drain the bucket.
    let deadline = Instant::now() + DEADLINE;
    let headers = loop {
        let (status, headers, _) = h.get_with("h", "/", &[]).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            break headers;
        }
        assert!(Instant::now() < deadline);
    };
    assert_eq!(headers["retry-after"], "1");
    assert!(h.counter(r#"flotilla_gateway_rate_limited_total{route="web"}"#) >= 1.0);
    // 20/s: a token is back within 50 ms.
    h.wait_for("h", "/", |s, _| s == StatusCode::OK).await;
    h.stop().await;
}

// ---- upgrades and gRPC ------------------------------------------------------------------------

#[tokio::test]
async fn websocket_upgrade_round_trip() {
    let mut h = Harness::start().await;
    h.add_service("ws", vec![route(None, "/")]).await;
    let _ups = upstreams(&h, "ws", 1).await;

    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = timeout(DEADLINE, stream.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");

    for message in [&b"hello"[..], b"through the gateway", &[0u8, 255, 7]] {
        stream.write_all(message).await.unwrap();
        let mut echo = vec![0u8; message.len()];
        timeout(DEADLINE, stream.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echo, message);
    }
    drop(stream);
    // Shutdown also ends any tunnel still open.
    h.stop().await;
}

#[tokio::test]
async fn grpc_over_h2_end_to_end_keeps_trailers() {
    let mut h = Harness::start().await;
    let mut grpc = route(None, "/");
    grpc.upstream = UpstreamProtocol::H2c;
    h.add_service("grpc", vec![grpc]).await;
    let up = Upstream::start_proto("grpc-1", true).await;
    h.add_instance("grpc", &up).await;
    h.wait_for("h", "/", |s, b| {
        s == StatusCode::OK && b.starts_with("grpc-1")
    })
    .await;

    // HTTP/2 with prior knowledge to the gateway, h2c to the upstream.
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::post(format!("http://{}/pkg.Greeter/SayHello", h.addr))
        .header("host", "h")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x05hello")))
        .unwrap();
    let response = timeout(DEADLINE, client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.headers()["x-seen-te"], "trailers");
    assert_eq!(response.headers()["x-seen-version"], "HTTP/2.0");
    let collected = timeout(DEADLINE, response.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "grpc-1");
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"grpc-1 10"));
    h.stop().await;
}
