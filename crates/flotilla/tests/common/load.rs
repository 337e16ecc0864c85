//! A load generator for end-to-end tests: real clients on persistent connections.
//!
//! Each connection is one task holding ONE connection to the gateway, HTTP/1.1 keep-alive or
//! HTTP/2 with prior knowledge (h2c; the gateway's plain port speaks both), and sending one
//! request at a time: GETs and, every `post_every`-th request, a POST with a small body that
//! the demo must answer with its exact length. Every request is recorded: when it started, how
//! long it took, its method, which instance answered, or why it failed.
//!
//! What counts as a failure: an error of any kind once the request was handed to the
//! connection (the gateway never retries a POST whose connection broke, so a lost POST shows
//! here), a non-2xx answer, an answer that does not match the request, a timeout, or a
//! connection to the gateway that cannot be made. What does not: the server closing a
//! connection gracefully between requests (HTTP/1.1 `Connection: close` or an idle close,
//! HTTP/2 GOAWAY) with the next request not yet written; the connection is then re-made
//! (counted in [`Summary::reconnects`]) and the request sent on the new one.
//!
//! Bounded in time ([`LoadConfig::max_duration`]) and count ([`LoadConfig::max_requests`]),
//! paced per connection ([`LoadConfig::per_conn_rate`]) so the machine's other work (probes,
//! the controller) is not starved, and stopped by [`Load::finish`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{TrySendError, http1, http2};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `IP:PORT` of the gateway's plain listener.
    pub gateway: String,
    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2) of every request.
    pub host: String,
    /// Connections speaking HTTP/1.1 with keep-alive.
    pub http1: usize,
    /// Connections speaking HTTP/2 with prior knowledge.
    pub http2: usize,
    /// Every `post_every`-th request of a connection is a POST (0: GETs only).
    pub post_every: u64,
    /// Most requests per second on one connection; `None`: back to back.
    pub per_conn_rate: Option<f64>,
    /// The load stops by itself after this long.
    pub max_duration: Duration,
    /// ... or after this many requests in all.
    pub max_requests: u64,
    /// A request without a complete answer after this long has failed.
    pub request_timeout: Duration,
}

impl LoadConfig {
    /// Three HTTP/1.1 and three HTTP/2 connections, one request in three a POST, 80 requests
    /// per second per connection, at most 3 minutes.
    pub fn new(gateway: &str, host: &str) -> Self {
        LoadConfig {
            gateway: gateway.to_string(),
            host: host.to_string(),
            http1: 3,
            http2: 3,
            post_every: 3,
            per_conn_rate: Some(80.0),
            max_duration: Duration::from_secs(180),
            max_requests: 2_000_000,
            request_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Http1,
    Http2,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// A 2xx answer that matches the request: `version` is the first word of the demo's body
    /// (its `GREETING`), `instance` the instance that answered.
    Answered {
        status: u16,
        instance: String,
        version: String,
    },
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Record {
    pub start: Instant,
    pub latency: Duration,
    /// Index of the connection (task) that sent it.
    pub conn: usize,
    pub proto: Proto,
    pub method: &'static str,
    pub outcome: Outcome,
}

impl Record {
    pub fn failed(&self) -> bool {
        matches!(self.outcome, Outcome::Failed(_))
    }
    pub fn instance(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Answered { instance, .. } => Some(instance),
            Outcome::Failed(_) => None,
        }
    }
    pub fn version(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Answered { version, .. } => Some(version),
            Outcome::Failed(_) => None,
        }
    }
}

/// Counters readable while the load runs.
#[derive(Default)]
struct Live {
    answered: AtomicU64,
    failed: AtomicU64,
    issued: AtomicU64,
    /// Answers per instance.
    by_instance: Mutex<BTreeMap<String, u64>>,
}

/// What one connection task hands back.
#[derive(Default)]
struct ConnReport {
    records: Vec<Record>,
    connects: u64,
    reconnects: u64,
}

/// A running load; [`Load::finish`] stops it and returns its [`Summary`].
pub struct Load {
    pub started: Instant,
    config: LoadConfig,
    stop: CancellationToken,
    live: Arc<Live>,
    thread: Option<JoinHandle<Vec<ConnReport>>>,
}

impl Load {
    pub fn start(config: LoadConfig) -> Load {
        let stop = CancellationToken::new();
        let live = Arc::new(Live::default());
        let started = Instant::now();
        let thread = {
            let (config, stop, live) = (config.clone(), stop.clone(), live.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("load generator runtime");
                rt.block_on(run(config, stop, live, started))
            })
        };
        Load {
            started,
            config,
            stop,
            live,
            thread: Some(thread),
        }
    }

    /// Requests answered so far (2xx and matching).
    pub fn answered(&self) -> u64 {
        self.live.answered.load(Ordering::Relaxed)
    }

    /// Requests failed so far.
    pub fn failed(&self) -> u64 {
        self.live.failed.load(Ordering::Relaxed)
    }

    /// Answers so far from `instance`.
    pub fn answers_from(&self, instance: &str) -> u64 {
        self.live
            .by_instance
            .lock()
            .map(|m| m.get(instance).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Stops the load (requests in flight finish, within the request timeout) and returns
    /// every record.
    pub fn finish(mut self) -> Summary {
        self.stop.cancel();
        let reports = self
            .thread
            .take()
            .map(|t| t.join().expect("load generator thread"))
            .unwrap_or_default();
        let ended = Instant::now();
        let mut summary = Summary {
            started: self.started,
            ended,
            config: self.config.clone(),
            records: Vec::new(),
            connects: 0,
            reconnects: 0,
        };
        for r in reports {
            summary.records.extend(r.records);
            summary.connects += r.connects;
            summary.reconnects += r.reconnects;
        }
        summary.records.sort_by_key(|r| r.start);
        summary
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // A test that panics before `finish` must not leave the load running.
        self.stop.cancel();
    }
}

async fn run(
    config: LoadConfig,
    stop: CancellationToken,
    live: Arc<Live>,
    started: Instant,
) -> Vec<ConnReport> {
    let deadline = tokio::time::Instant::from_std(started + config.max_duration);
    let config = Arc::new(config);
    let mut tasks = Vec::new();
    let protos = std::iter::repeat_n(Proto::Http1, config.http1)
        .chain(std::iter::repeat_n(Proto::Http2, config.http2));
    for (conn, proto) in protos.enumerate() {
        let (config, stop, live) = (config.clone(), stop.clone(), live.clone());
        tasks.push(tokio::spawn(connection(
            conn, proto, config, stop, live, deadline,
        )));
    }
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await.expect("load connection task"));
    }
    reports
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn connect(gateway: &str, proto: Proto) -> Result<Sender, String> {
        let stream = TcpStream::connect(gateway)
            .await
            .map_err(|e| format!("cannot connect to the gateway: {e}"))?;
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        match proto {
            Proto::Http1 => {
                let (sender, conn) = http1::handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
                tokio::spawn(conn);
                Ok(Sender::H1(sender))
            }
            Proto::Http2 => {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
                tokio::spawn(conn);
                Ok(Sender::H2(sender))
            }
        }
    }

    /// Ok when the connection can take the next request; Err when the server closed it.
    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Full<Bytes>>>> {
        match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        }
    }
}

fn request(config: &LoadConfig, proto: Proto, post: bool, body: &Bytes) -> Request<Full<Bytes>> {
    let b = Request::builder().method(if post { "POST" } else { "GET" });
    let b = match proto {
        // Origin form and a Host header, as a browser sends over HTTP/1.1.
        Proto::Http1 => b.uri("/").header(hyper::header::HOST, config.host.as_str()),
        // HTTP/2 carries the host in :authority.
        Proto::Http2 => b.uri(format!("http://{}/", config.host)),
    };
    let body = if post { body.clone() } else { Bytes::new() };
    b.body(Full::new(body)).expect("request")
}

/// One connection: connect, then one request at a time until stopped, out of time or count.
async fn connection(
    conn: usize,
    proto: Proto,
    config: Arc<LoadConfig>,
    stop: CancellationToken,
    live: Arc<Live>,
    deadline: tokio::time::Instant,
) -> ConnReport {
    let mut report = ConnReport::default();
    let mut sender: Option<Sender> = None;
    let mut pace = config.per_conn_rate.map(|rate| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut seq: u64 = 0;
    loop {
        if let Some(p) = pace.as_mut() {
            tokio::select! {
                _ = p.tick() => {}
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if stop.is_cancelled()
            || tokio::time::Instant::now() >= deadline
            || live.issued.fetch_add(1, Ordering::Relaxed) >= config.max_requests
        {
            break;
        }
        seq += 1;
        let post = config.post_every > 0 && seq.is_multiple_of(config.post_every);
        let method = if post { "POST" } else { "GET" };
        // A small body that names the request, so its length is checked by the answer.
        let body = Bytes::from(format!("load conn={conn} seq={seq} {:-<24}", ""));
        let start = Instant::now();
        let outcome = tokio::time::timeout(
            config.request_timeout,
            exchange(&config, proto, post, &body, &mut sender, &mut report),
        )
        .await
        .unwrap_or_else(|_| {
            // The connection may be stuck: do not reuse it.
            sender = None;
            Outcome::Failed(format!(
                "no complete answer within {:?}",
                config.request_timeout
            ))
        });
        match &outcome {
            Outcome::Answered { instance, .. } => {
                live.answered.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut m) = live.by_instance.lock() {
                    *m.entry(instance.clone()).or_default() += 1;
                }
            }
            Outcome::Failed(_) => {
                live.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        report.records.push(Record {
            start,
            latency: start.elapsed(),
            conn,
            proto,
            method,
            outcome,
        });
    }
    report
}

/// One request on the connection, re-made first if the server closed it gracefully.
async fn exchange(
    config: &LoadConfig,
    proto: Proto,
    post: bool,
    body: &Bytes,
    sender: &mut Option<Sender>,
    report: &mut ConnReport,
) -> Outcome {
    let mut req = request(config, proto, post, body);
    // Each pass either sends the request or re-makes a connection the server had closed
    // before anything of the request was written; a few passes at most.
    for _ in 0..5 {
        let s = match sender {
            Some(s) => s,
            None => {
                let s = match Sender::connect(&config.gateway, proto).await {
                    Ok(s) => s,
                    Err(e) => return Outcome::Failed(e),
                };
                report.connects += 1;
                sender.insert(s)
            }
        };
        if s.ready().await.is_err() {
            // Closed by the server between requests (Connection: close, idle, GOAWAY).
            report.reconnects += 1;
            *sender = None;
            continue;
        }
        let response = match s.send(req).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                Some(unsent) => {
                    // Refused before anything was written: the connection was closing.
                    report.reconnects += 1;
                    *sender = None;
                    req = unsent;
                    continue;
                }
                None => {
                    *sender = None;
                    return Outcome::Failed(format!("request failed: {}", chain(e.error())));
                }
            },
        };
        let status = response.status().as_u16();
        let closing = response
            .headers()
            .get(hyper::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let text = match response.into_body().collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(e) => {
                *sender = None;
                return Outcome::Failed(format!("{status} answer, body failed: {}", chain(&e)));
            }
        };
        if closing {
            // Announced: the next request goes on a new connection.
            report.reconnects += 1;
            *sender = None;
        }
        if !(200..300).contains(&status) {
            return Outcome::Failed(format!("{status} {}", text.trim()));
        }
        let Some(instance) = super::instance_of(&text) else {
            return Outcome::Failed(format!("{status} answer names no instance: {text:?}"));
        };
        if post && !text.contains(&format!("received {} bytes", body.len())) {
            return Outcome::Failed(format!("POST of {} bytes answered {text:?}", body.len()));
        }
        let version = text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        return Outcome::Answered {
            status,
            instance,
            version,
        };
    }
    Outcome::Failed("the gateway closed every new connection before the request".into())
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let _ = write!(s, ": {c}");
        cur = c.source();
    }
    s
}

/// Everything a load recorded.
pub struct Summary {
    pub started: Instant,
    pub ended: Instant,
    pub config: LoadConfig,
    /// By start time.
    pub records: Vec<Record>,
    /// Connections made (the first of each connection task included).
    pub connects: u64,
    /// Connections the server closed gracefully, re-made by the generator.
    pub reconnects: u64,
}

impl Summary {
    pub fn total(&self) -> usize {
        self.records.len()
    }

    pub fn failures(&self) -> Vec<&Record> {
        self.records.iter().filter(|r| r.failed()).collect()
    }

    /// Requests that started in `[from, to)`.
    pub fn between(&self, from: Instant, to: Instant) -> impl Iterator<Item = &Record> {
        self.records
            .iter()
            .filter(move |r| r.start >= from && r.start < to)
    }

    /// Requests started in each whole `window` from `from` to `to` (a last, partial window is
    /// left out).
    pub fn per_window(&self, from: Instant, to: Instant, window: Duration) -> Vec<usize> {
        let mut out = Vec::new();
        let mut t = from;
        while t + window <= to {
            out.push(self.between(t, t + window).count());
            t += window;
        }
        out
    }

    /// Answers per instance in `[from, to)`.
    pub fn by_instance(&self, from: Instant, to: Instant) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in self.between(from, to) {
            if let Some(i) = r.instance() {
                *m.entry(i.to_string()).or_default() += 1;
            }
        }
        m
    }

    /// Panics unless no request failed and at least `min` requests started in `[from, to)`,
    /// with GETs and POSTs over both protocols among them (for the protocols and methods the
    /// load sends).
    pub fn assert_clean(&self, what: &str, from: Instant, to: Instant, min: usize) {
        assert!(
            self.failures().is_empty(),
            "{what}: {}",
            self.failure_report()
        );
        let window: Vec<&Record> = self.between(from, to).collect();
        assert!(
            window.len() >= min,
            "{what}: only {} requests, at least {min} needed: {}",
            window.len(),
            self.describe(from, to)
        );
        let has = |p: &dyn Fn(&Record) -> bool| window.iter().any(|r| p(r));
        if self.config.post_every > 0 {
            assert!(
                has(&|r| r.method == "POST") && has(&|r| r.method == "GET"),
                "{what}: GETs and POSTs: {}",
                self.describe(from, to)
            );
        }
        if self.config.http1 > 0 && self.config.http2 > 0 {
            assert!(
                has(&|r| r.proto == Proto::Http1) && has(&|r| r.proto == Proto::Http2),
                "{what}: HTTP/1.1 and HTTP/2: {}",
                self.describe(from, to)
            );
        }
        // Shown with `--nocapture`.
        eprintln!("{what}: {}", self.describe(from, to));
    }

    /// The first failures, with their times from the start of the load.
    pub fn failure_report(&self) -> String {
        let failures = self.failures();
        let mut s = format!("{} of {} requests failed", failures.len(), self.total());
        for r in failures.iter().take(20) {
            let _ = write!(
                s,
                "\n  at {:>8.3}s conn {} {:?} {}: {}",
                (r.start - self.started).as_secs_f64(),
                r.conn,
                r.proto,
                r.method,
                match &r.outcome {
                    Outcome::Failed(why) => why.as_str(),
                    Outcome::Answered { .. } => "",
                }
            );
        }
        s
    }

    /// A line for the test's output: counts, rate and latency in `[from, to)`.
    pub fn describe(&self, from: Instant, to: Instant) -> String {
        let in_window: Vec<&Record> = self.between(from, to).collect();
        let secs = (to - from).as_secs_f64().max(1e-9);
        let posts = in_window.iter().filter(|r| r.method == "POST").count();
        let h2 = in_window.iter().filter(|r| r.proto == Proto::Http2).count();
        let max_latency = in_window
            .iter()
            .map(|r| r.latency)
            .max()
            .unwrap_or_default();
        format!(
            "{} requests in {:.2}s ({:.0}/s; {} POST, {} over HTTP/2), max latency {:?}; \
             whole load: {} requests, {} failed, {} connections made, {} closed by the server",
            in_window.len(),
            secs,
            in_window.len() as f64 / secs,
            posts,
            h2,
            max_latency,
            self.total(),
            self.failures().len(),
            self.connects,
            self.reconnects,
        )
    }
}
