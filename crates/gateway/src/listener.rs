//! The connection layer: accepting on the plain and TLS listeners, the connection limit, TLS
//! handshakes, HTTP/1.1 + HTTP/2 on one port, per-connection timeouts and graceful shutdown.
//!
//! ```text
//! accept ──limit?──▶ 503 + close (plain) / close (TLS)
//!    │
//!    └─▶ connection task ──TLS handshake (timeout)──▶ Tracked IO ──hyper-util auto──▶ Proxy::handle
//!              ▲                                          │ bytes read/written    │ request begin/end
//!              └──────────────── ConnState (timestamps, in-flight count) ◀─────────┘
//! ```
//!
//! Each connection is one task that drives hyper's connection future and, beside it, one timer
//! whose deadline is derived from [`ConnState`]:
//!
//! - **header** — the first request head must be complete within `header_read_timeout` of the
//!   connection's start (after the TLS handshake), and each later HTTP/1 head within
//!   `header_read_timeout` of its first byte. A slowloris client is closed (no answer: it has
//!   not finished asking). hyper's own `header_read_timeout` is off: it also runs while an
//!   HTTP/1 connection sits idle between requests, which would make the idle timeout moot.
//! - **idle** — no request in flight (a request is in flight from its head until its response
//!   body is done) for `idle_timeout`: the connection is shut down gracefully (HTTP/2 GOAWAY).
//! - **stalled** — a connection that is closing (idle or gateway shutdown) with no request in
//!   flight and no byte moving for `header_read_timeout` is dropped.
//!
//! Connection limit: at `max_connections` open connections a new plain-text connection gets a
//! fixed `503` with `Connection: close` (written without reading the request, then the socket
//! is half-closed and drained briefly so the client sees the answer rather than a reset), and a
//! new TLS connection is closed at once (a handshake just to refuse would spend the CPU the
//! limit is protecting). The gateway never stops accepting, so the listen backlog never fills
//! with clients that would time out instead of being told.

use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::body::{BoxError, GatewayBody};
use crate::clock::{COARSE_TICK_MS, coarse_ms, millis};
use crate::config::Limits;
use crate::conn::ConnInfo;
use crate::error::error_chain;
use crate::metrics::ConnectionMetrics;
use crate::proxy::Proxy;

/// Pause after a failed `accept` (usually out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Refusals being written at once; past it, refused connections are closed without a word.
const MAX_REFUSALS: usize = 64;
/// Longest a refused connection is kept to deliver the 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Most bytes read (and discarded) from a refused connection.
const REFUSAL_DRAIN: usize = 64 << 10;
/// How often each worker closes its upstream connections idle for too long.
const POOL_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// hyper's smallest HTTP/1 read buffer.
const MIN_H1_BUF: usize = 8192;
/// HTTP/2: response bytes buffered per stream beyond what the client's window allows.
const H2_MAX_SEND_BUF: usize = 256 << 10;

#[cfg(test)]
const REFUSAL_BODY: &str = "too many connections; try again\n";
const REFUSAL: &str = concat!(
    "HTTP/1.1 503 Service Unavailable\r\n",
    "content-type: text/plain; charset=utf-8\r\n",
    "content-length: 32\r\n",
    "retry-after: 1\r\n",
    "connection: close\r\n",
    "\r\n",
    "too many connections; try again\n",
);

/// The hyper-util server for both protocols, configured from `limits`.
pub(crate) fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Ours is in `ConnState` (see the module documentation).
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(MIN_H1_BUF))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.h2_keepalive_interval)
        .keep_alive_timeout(limits.h2_keepalive_timeout)
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
        .initial_stream_window_size(limits.h2_stream_window)
        .initial_connection_window_size(limits.h2_connection_window)
        .max_send_buf_size(H2_MAX_SEND_BUF);
    builder
}

/// What every connection task of one worker shares. The open-connection count and connection
/// numbers are shared by all workers.
pub(crate) struct ConnLayer {
    pub builder: auto::Builder<TokioExecutor>,
    pub proxy: Arc<Proxy>,
    pub limits: Limits,
    pub metrics: ConnectionMetrics,
    pub tls: Option<TlsAcceptor>,
    open: Arc<AtomicUsize>,
    next_id: Arc<AtomicU64>,
}

impl ConnLayer {
    pub fn new(
        proxy: Arc<Proxy>,
        limits: Limits,
        metrics: ConnectionMetrics,
        tls: Option<TlsAcceptor>,
    ) -> Self {
        Self {
            builder: http_builder(&limits),
            proxy,
            limits,
            metrics,
            tls,
            open: Arc::new(AtomicUsize::new(0)),
            next_id: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The layer of one more worker: its own upstream connection pools (their connections are
    /// tasks on the worker's runtime), everything else shared.
    fn for_worker(&self) -> Self {
        Self {
            builder: self.builder.clone(),
            proxy: Arc::new(self.proxy.for_worker()),
            limits: self.limits.clone(),
            metrics: self.metrics.clone(),
            tls: self.tls.clone(),
            open: self.open.clone(),
            next_id: self.next_id.clone(),
        }
    }

    /// Counts one more open connection unless the limit is reached.
    fn admit(&self) -> bool {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limits.max_connections).then_some(n + 1)
            })
            .is_ok()
    }
}

/// The listeners of one worker, served by [`serve`].
pub(crate) struct Listeners {
    pub plain: TcpListener,
    pub plain_addr: SocketAddr,
    pub tls: Option<(TcpListener, SocketAddr)>,
}

/// The gateway's bound sockets: one per worker on each address (`SO_REUSEPORT`).
pub(crate) struct Bound {
    pub plain: Vec<std::net::TcpListener>,
    pub plain_addr: SocketAddr,
    pub tls: Option<(Vec<std::net::TcpListener>, SocketAddr)>,
}

/// Accepts on every listener until `shutdown`, then stops accepting (the listeners are
/// closed), shuts every connection down gracefully, waits up to `grace` for them to finish and
/// closes what is left.
pub(crate) async fn serve(
    layer: Arc<ConnLayer>,
    listeners: Listeners,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let Listeners {
        plain,
        plain_addr,
        tls,
    } = listeners;
    let drain = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut refusals = JoinSet::new();
    let mut sweep = tokio::time::interval(POOL_SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let tls_listener = tls.as_ref().map(|(l, addr)| (l, *addr));
    loop {
        let (accepted, local, is_tls) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = plain.accept() => (accepted, plain_addr, false),
            accepted = accept_on(tls_listener.map(|(l, _)| l)) =>
                (accepted, tls_listener.map_or(plain_addr, |(_, a)| a), true),
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            Some(_) = refusals.join_next(), if !refusals.is_empty() => continue,
            _ = sweep.tick() => {
                let idle = layer.proxy.pool.sweep();
                tracing::trace!(idle, "upstream connection pool swept");
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if !layer.admit() {
            layer.metrics.refused.inc();
            tracing::debug!(%peer, tls = is_tls, "connection refused: connection limit reached");
            if !is_tls && refusals.len() < MAX_REFUSALS {
                refusals.spawn(refuse(stream));
            }
            continue;
        }
        layer.metrics.open.inc();
        let open = OpenGuard(layer.clone());
        let id = layer.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        connections.spawn(connection(
            open,
            stream,
            peer,
            local,
            id,
            is_tls,
            drain.clone(),
        ));
    }

    drop(plain);
    drop(tls);
    tracing::info!(
        connections = connections.len(),
        ?grace,
        "gateway stopped accepting: draining connections"
    );
    drain.cancel();
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "shutdown grace elapsed; closing the remaining connections"
        );
    }
    connections.shutdown().await;
    refusals.shutdown().await;
}

/// One worker thread: its runtime serves the listeners until shutdown, then waits for
/// `release` (tunnels on its runtime are cut first) before the runtime is dropped.
struct Worker {
    thread: std::thread::JoinHandle<()>,
    served: oneshot::Receiver<()>,
}

/// [`serve`] on one thread per bound socket, each with a single-threaded runtime, its own
/// accept loop and its own upstream connection pools, so a request is handled from accept to
/// upstream and back on one thread, without hand-offs between threads (the design nginx and
/// HAProxy use). Returns when every worker has stopped.
pub(crate) async fn serve_on_workers(
    layer: &ConnLayer,
    bound: Bound,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    let Bound {
        plain,
        plain_addr,
        tls,
    } = bound;
    let (tls_sockets, tls_addr) = match tls {
        Some((sockets, addr)) => (sockets.into_iter().map(Some).collect(), Some(addr)),
        None => (Vec::new(), None),
    };
    let mut tls_sockets = tls_sockets.into_iter();
    let stop = shutdown.child_token();
    let release = CancellationToken::new();
    let mut started: Vec<Worker> = Vec::with_capacity(plain.len());
    let mut failure = None;
    for (index, plain) in plain.into_iter().enumerate() {
        let tls = tls_addr.and_then(|addr| Some((tls_sockets.next().flatten()?, addr)));
        let sockets = (plain, plain_addr, tls);
        match start_worker(index, layer, sockets, &stop, &release, grace).await {
            Ok(worker) => started.push(worker),
            Err(e) => {
                failure = Some(e);
                stop.cancel();
                break;
            }
        }
    }
    if failure.is_none() {
        tracing::debug!(workers = started.len(), "gateway workers serving");
    }
    let mut threads = Vec::with_capacity(started.len());
    for worker in started {
        // An error means the thread ended without a word: it has stopped serving either way.
        let _ = worker.served.await;
        threads.push(worker.thread);
    }
    // Upgraded connections (WebSockets) outlive their HTTP connection: cut them while every
    // runtime still runs, then let the workers go.
    layer.proxy.tunnels.close().await;
    release.cancel();
    let joined = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .map(std::thread::JoinHandle::join)
            .filter(Result::is_err)
            .count()
    })
    .await;
    match joined {
        Ok(0) => {}
        Ok(panicked) => tracing::error!(panicked, "gateway worker threads panicked"),
        Err(e) => tracing::warn!(error = %e, "cannot join the gateway worker threads"),
    }
    failure.map_or(Ok(()), Err)
}

/// A worker's sockets: plain, its address, TLS and its address.
type WorkerSockets = (
    std::net::TcpListener,
    SocketAddr,
    Option<(std::net::TcpListener, SocketAddr)>,
);

/// Starts worker `index` and waits until it accepts connections.
async fn start_worker(
    index: usize,
    layer: &ConnLayer,
    (plain, plain_addr, tls): WorkerSockets,
    stop: &CancellationToken,
    release: &CancellationToken,
    grace: Duration,
) -> io::Result<Worker> {
    let layer = Arc::new(layer.for_worker());
    let (stop, release) = (stop.clone(), release.clone());
    let (ready_tx, ready_rx) = oneshot::channel::<io::Result<()>>();
    let (served_tx, served) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name(format!("gateway-{index}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let listeners = match register(plain, plain_addr, tls) {
                    Ok(listeners) => listeners,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                serve(layer, listeners, stop, grace).await;
                let _ = served_tx.send(());
                release.cancelled().await;
            });
        })?;
    let ready = ready_rx
        .await
        .unwrap_or_else(|_| Err(io::Error::other("gateway worker ended while starting")));
    match ready {
        Ok(()) => Ok(Worker { thread, served }),
        Err(e) => {
            // The thread has ended or is ending on its own.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            Err(e)
        }
    }
}

/// The listeners of a worker, registered with its runtime (called on it).
fn register(
    plain: std::net::TcpListener,
    plain_addr: SocketAddr,
    tls: Option<(std::net::TcpListener, SocketAddr)>,
) -> io::Result<Listeners> {
    let tls = match tls {
        Some((listener, addr)) => Some((TcpListener::from_std(listener)?, addr)),
        None => None,
    };
    Ok(Listeners {
        plain: TcpListener::from_std(plain)?,
        plain_addr,
        tls,
    })
}

async fn accept_on(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Tells a client turned away at the connection limit, then closes.
async fn refuse(mut stream: TcpStream) {
    let delivered = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(REFUSAL.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sends until it closes, so that closing does not reset the
        // connection before the client has read the answer.
        let mut sink = [0u8; 2048];
        let mut total = 0;
        while total < REFUSAL_DRAIN {
            match stream.read(&mut sink).await? {
                0 => break,
                n => total += n,
            }
        }
        Ok::<_, io::Error>(())
    })
    .await;
    if let Ok(Err(e)) = delivered {
        tracing::debug!(error = %e, "refused connection ended");
    }
}

/// Keeps the open-connection count; released when the connection task ends or is aborted.
struct OpenGuard(Arc<ConnLayer>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.open.dec();
    }
}

async fn connection(
    open: OpenGuard,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    id: u64,
    is_tls: bool,
    drain: CancellationToken,
) {
    let layer = &open.0;
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    if is_tls {
        // Boxed: the TLS connection's future is twice a plain one's, and every connection
        // task would otherwise be that large (memory per idle connection).
        Box::pin(tls_connection(layer, stream, peer, local, id, &drain)).await;
    } else {
        serve_http(layer, stream, ConnInfo::plain(peer, local, id), &drain).await;
    }
}

async fn tls_connection(
    layer: &ConnLayer,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    id: u64,
    drain: &CancellationToken,
) {
    let Some(acceptor) = layer.tls.as_ref() else {
        return;
    };
    let handshake = tokio::select! {
        () = drain.cancelled() => return,
        hs = tokio::time::timeout(layer.limits.tls_handshake_timeout, acceptor.accept(stream)) => hs,
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            layer.metrics.tls_handshake_errors.inc();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            layer.metrics.tls_handshake_errors.inc();
            layer.metrics.closed("tls_handshake");
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let sni = stream
        .get_ref()
        .1
        .server_name()
        .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
    let info = ConnInfo::tls(peer, local, id, sni);
    serve_http(layer, stream, info, drain).await;
}

/// What ends one wait of the connection task.
enum Event {
    Done(Result<(), BoxError>),
    Shutdown,
    Idle,
    Close(&'static str),
    Recheck,
}

async fn serve_http<S>(layer: &ConnLayer, io: S, info: ConnInfo, drain: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(ConnState::new());
    let peer = info.peer;
    let info = Arc::new(info);
    let service = {
        let proxy = layer.proxy.clone();
        let state = state.clone();
        service_fn(move |req: Request<Incoming>| {
            let guard = RequestGuard::begin(&state, req.version());
            let response = proxy.clone().handle(req, info.clone());
            async move {
                let response = match response.await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(response.map(|inner| TrackedBody {
                    inner,
                    _guard: guard,
                }))
            }
        })
    };
    let io = TokioIo::new(Tracked {
        io,
        state: state.clone(),
    });
    let mut conn = pin!(layer.builder.serve_connection_with_upgrades(io, service));
    let limits = &layer.limits;
    let mut timer = pin!(tokio::time::sleep_until(
        state.born + limits.header_read_timeout
    ));
    let mut shutdown = pin!(drain.cancelled());
    // When the graceful shutdown began (ms since the connection's start).
    let mut draining: Option<u64> = None;
    loop {
        let event = poll_fn(|cx| {
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Done(result));
            }
            if draining.is_none() && shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Shutdown);
            }
            let fired = timer.as_mut().poll(cx).is_ready();
            if fired || state.dirty.swap(false, Ordering::AcqRel) {
                match state.decide(limits, draining) {
                    Decision::Wait(at_ms) => {
                        // Moved earlier only: a timer set too early just fires and is set
                        // again, which is cheaper than re-arming it at every request.
                        let at = state.born + Duration::from_millis(at_ms);
                        if fired || at < timer.deadline() {
                            timer.as_mut().reset(at);
                        }
                        if timer.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Event::Recheck);
                        }
                    }
                    Decision::Drain => return Poll::Ready(Event::Idle),
                    Decision::Close(reason) => return Poll::Ready(Event::Close(reason)),
                }
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Done(Ok(())) => return,
            Event::Done(Err(e)) => {
                tracing::debug!(%peer, error = %error_chain(e.as_ref()), "client connection ended");
                return;
            }
            Event::Shutdown | Event::Idle => {
                if matches!(event, Event::Idle) {
                    layer.metrics.closed("idle");
                    tracing::debug!(%peer, "idle connection: closing");
                }
                conn.as_mut().graceful_shutdown();
                draining = Some(state.now_ms());
                state.dirty.store(true, Ordering::Release);
            }
            Event::Close(reason) => {
                layer.metrics.closed(reason);
                tracing::debug!(%peer, reason, "closing connection");
                return;
            }
            Event::Recheck => state.dirty.store(true, Ordering::Release),
        }
    }
}

/// When a connection's timer should fire next, or what to do now.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// Check again at this time (ms since the connection's start).
    Wait(u64),
    /// Idle for too long: shut down gracefully.
    Drain,
    /// Drop the connection now, for this reason (a metric label).
    Close(&'static str),
}

/// What the timer of a connection is computed from. Written by the IO wrapper (bytes moving),
/// the request guards (requests beginning and ending, possibly on other tasks for HTTP/2) and
/// read by the connection task. Times are milliseconds since `born`.
#[derive(Debug)]
pub(crate) struct ConnState {
    /// For the timer's deadlines.
    born: Instant,
    /// The same moment on the coarse clock ([`coarse_ms`]), for the millisecond stamps.
    born_ms: u64,
    in_flight: AtomicU32,
    requests: AtomicU64,
    /// An HTTP/2 connection: its bytes between requests are frames (PINGs, SETTINGS), not a
    /// request head being trickled.
    h2: AtomicBool,
    /// First byte of the next HTTP/1 request head, plus one; 0: none pending.
    head_started: AtomicU64,
    /// Start or end of the last request.
    last_request: AtomicU64,
    /// Last byte read or written.
    last_io: AtomicU64,
    /// Something the timer depends on changed.
    dirty: AtomicBool,
}

impl ConnState {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            born_ms: coarse_ms(),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            head_started: AtomicU64::new(0),
            last_request: AtomicU64::new(0),
            last_io: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
        }
    }

    /// Milliseconds since the connection's start, on the coarse clock: it may read up to one
    /// kernel tick behind `born.elapsed()`, which `decide` allows for.
    fn now_ms(&self) -> u64 {
        // The coarse clock never goes back, so this never wraps in use; wrapping (not
        // saturating) lets tests place `born_ms` before the machine booted.
        coarse_ms().wrapping_sub(self.born_ms)
    }

    fn on_read(&self) {
        let now = self.now_ms();
        self.last_io.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Acquire) == 0
            && !self.h2.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started.store(now + 1, Ordering::Relaxed);
            self.dirty.store(true, Ordering::Release);
        }
    }

    fn on_write(&self) {
        self.last_io.store(self.now_ms(), Ordering::Relaxed);
    }

    fn decide(&self, limits: &Limits, draining: Option<u64>) -> Decision {
        // A deadline within a coarse tick is due: the timer (on the precise clock) fires at it,
        // and must not find it still ahead and be set again until the coarse clock catches up.
        let now = self.now_ms() + COARSE_TICK_MS;
        let (header, idle) = (
            millis(limits.header_read_timeout),
            millis(limits.idle_timeout),
        );
        if self.in_flight.load(Ordering::Acquire) > 0 {
            // A request ending on another task (HTTP/2) is noticed by then at the latest.
            return Decision::Wait(now.saturating_add(idle.max(1)));
        }
        let mut next = u64::MAX;
        let requests = self.requests.load(Ordering::Acquire);
        if requests == 0 {
            if now >= header {
                return Decision::Close("header");
            }
            next = header;
        }
        let head = self.head_started.load(Ordering::Relaxed);
        if head != 0 {
            let at = (head - 1).saturating_add(header);
            if now >= at {
                return Decision::Close("header");
            }
            next = next.min(at);
        }
        match draining {
            None if requests > 0 => {
                let at = self
                    .last_request
                    .load(Ordering::Relaxed)
                    .saturating_add(idle);
                if now >= at {
                    return Decision::Drain;
                }
                next = next.min(at);
            }
            None => {}
            Some(since) => {
                let at = self
                    .last_io
                    .load(Ordering::Relaxed)
                    .max(since)
                    .saturating_add(header);
                if now >= at {
                    return Decision::Close("stalled");
                }
                next = next.min(at);
            }
        }
        Decision::Wait(next)
    }
}

/// Counts a request as in flight from its head until its response body is done or dropped.
struct RequestGuard(Arc<ConnState>);

impl RequestGuard {
    fn begin(state: &Arc<ConnState>, version: Version) -> Self {
        if version == Version::HTTP_2 {
            state.h2.store(true, Ordering::Relaxed);
        }
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.requests.fetch_add(1, Ordering::AcqRel);
        state.head_started.store(0, Ordering::Relaxed);
        state.last_request.store(state.now_ms(), Ordering::Relaxed);
        state.dirty.store(true, Ordering::Release);
        Self(state.clone())
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let state = &self.0;
        state.last_request.store(state.now_ms(), Ordering::Relaxed);
        state.in_flight.fetch_sub(1, Ordering::AcqRel);
        state.dirty.store(true, Ordering::Release);
    }
}

/// The response body, holding its request's guard.
pub(crate) struct TrackedBody {
    inner: GatewayBody,
    _guard: RequestGuard,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client stream, noting in [`ConnState`] when bytes move.
struct Tracked<S> {
    io: S,
    state: Arc<ConnState>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.state.on_write();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.state.on_write();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..Limits::default()
        }
    }

    /// A state whose clock reads `now` ms (or up to a coarse tick more), however long the
    /// machine has been up (CI machines run the suite minutes after boot).
    fn at(now: u64) -> ConnState {
        let mut state = ConnState::new();
        state.born_ms = coarse_ms().wrapping_sub(now);
        state
    }

    #[test]
    fn refusal_is_well_formed() {
        let (head, body) = REFUSAL.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, REFUSAL_BODY);
        assert!(head.contains(&format!("content-length: {}", REFUSAL_BODY.len())));
    }

    #[test]
    fn first_request_must_arrive_within_the_header_timeout() {
        let l = limits();
        assert_eq!(at(0).decide(&l, None), Decision::Wait(10_000));
        assert_eq!(at(10_000).decide(&l, None), Decision::Close("header"));
    }

    #[test]
    fn idle_keep_alive_connection_is_drained_then_dropped_if_stuck() {
        let l = limits();
        let s = at(5_000);
        s.requests.store(1, Ordering::Relaxed);
        s.last_request.store(4_000, Ordering::Relaxed);
        assert_eq!(s.decide(&l, None), Decision::Wait(64_000));
        let s = at(64_000);
        s.requests.store(1, Ordering::Relaxed);
        s.last_request.store(4_000, Ordering::Relaxed);
        assert_eq!(s.decide(&l, None), Decision::Drain);
        // Closing, nothing moves: dropped a header timeout later.
        assert_eq!(s.decide(&l, Some(64_000)), Decision::Wait(74_000));
        let s = at(74_000);
        s.requests.store(1, Ordering::Relaxed);
        assert_eq!(s.decide(&l, Some(64_000)), Decision::Close("stalled"));
    }

    #[test]
    fn trickled_head_is_cut_but_http2_frames_are_not_a_head() {
        let l = limits();
        let s = at(20_000);
        s.requests.store(3, Ordering::Relaxed);
        s.last_request.store(15_000, Ordering::Relaxed);
        s.head_started.store(12_001, Ordering::Relaxed);
        assert_eq!(s.decide(&l, None), Decision::Wait(22_000));
        s.head_started.store(10_001, Ordering::Relaxed);
        assert_eq!(s.decide(&l, None), Decision::Close("header"));

        let s = at(20_000);
        s.requests.store(1, Ordering::Relaxed);
        s.h2.store(true, Ordering::Relaxed);
        s.on_read();
        assert_eq!(s.head_started.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_request_in_flight_is_never_timed_out() {
        let l = limits();
        let s = Arc::new(at(500_000));
        let guard = RequestGuard::begin(&s, Version::HTTP_11);
        assert!(matches!(s.decide(&l, None), Decision::Wait(_)));
        assert!(matches!(s.decide(&l, Some(0)), Decision::Wait(_)));
        drop(guard);
        assert_eq!(s.in_flight.load(Ordering::Relaxed), 0);
        assert!(matches!(s.decide(&l, None), Decision::Wait(_)));
    }
}
