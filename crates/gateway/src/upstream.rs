//! The HTTP/1.1 upstream client: one keep-alive pool per gateway worker, of hyper client
//! connections whose connection tasks run on that worker's runtime.
//!
//! Per request: pop the most recently used idle connection to the endpoint (or connect), send,
//! and hand the connection back to the pool when the response body ([`tracked`]) has been read
//! to its end ([`Reuse`], carried by that body). Nothing else: no task per request, no channel
//! hand-off to another thread, no lock held across an await. A connection whose body was not
//! read to the end, or that was upgraded, is never reused (hyper closes it).
//!
//! An idle connection the endpoint closed is noticed at checkout (`is_closed`, or `ready`
//! failing) and skipped; a request refused by such a connection before anything was written is
//! sent again on another one (hyper hands the request back). Idle connections are dropped after
//! [`Http1Pool::IDLE_TIMEOUT`] (by [`Http1Pool::sweep`], which each worker runs every few
//! seconds), which ends their tasks.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::balance::{EndpointState, InFlight};
use crate::body::{AttemptBody, BoxError, GatewayBody};
use crate::clock::{coarse_ms, millis};

/// One upstream attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {authority}")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {authority} timed out after {timeout:?}")]
    ConnectTimeout {
        authority: String,
        timeout: Duration,
    },
    #[error("HTTP/1.1 handshake with {authority} failed")]
    Handshake {
        authority: String,
        #[source]
        source: hyper::Error,
    },
    #[error("request to {authority} failed")]
    Request {
        authority: String,
        #[source]
        source: hyper::Error,
    },
    #[error("h2c request failed")]
    H2c(#[source] hyper_util::client::legacy::Error),
}

impl UpstreamError {
    /// No connection could be established: nothing of the request was sent.
    pub fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Handshake { .. } => true,
            UpstreamError::Request { .. } => false,
            UpstreamError::H2c(e) => e.is_connect(),
        }
    }
}

struct Idle {
    sender: SendRequest<AttemptBody>,
    /// When it went idle ([`coarse_ms`]).
    since_ms: u64,
}

/// Keep-alive HTTP/1.1 connections to upstream endpoints, by `host:port`.
#[derive(Debug)]
pub struct Http1Pool {
    idle: Mutex<IdleMap>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle")
            .field("since_ms", &self.since_ms)
            .finish()
    }
}

/// A connection to give back to its pool once the response body has been read to the end.
#[derive(Debug)]
pub struct Reuse {
    pool: Arc<Http1Pool>,
    endpoint: Arc<EndpointState>,
    sender: SendRequest<AttemptBody>,
}

impl Reuse {
    /// The response was read to its end: the connection may carry the next request.
    pub fn release(self) {
        self.pool.put(&self.endpoint.authority, self.sender);
    }
}

/// Idle connections by endpoint `host:port`. The keys are the fleet's own endpoint addresses,
/// never a client's input, so they are hashed with FNV rather than SipHash: the map is looked up
/// twice per request (checkout and return).
type IdleMap = HashMap<String, VecDeque<Idle>, fnv::FnvBuildHasher>;

impl Http1Pool {
    /// Idle connections kept per endpoint (per worker); more are closed when returned.
    pub const MAX_IDLE_PER_ENDPOINT: usize = 512;
    /// An idle connection unused this long is closed (by default).
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(IdleMap::default()),
            connect_timeout,
            idle_timeout: Self::IDLE_TIMEOUT,
        }
    }

    /// Closes connections idle for `idle_timeout` instead of [`Self::IDLE_TIMEOUT`].
    pub fn with_idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    fn lock(&self) -> MutexGuard<'_, IdleMap> {
        // The map is consistent after every operation; a panic elsewhere cannot break it.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `request` to `endpoint` on a pooled or new connection. The request's URI must be
    /// in origin form and it must carry `Host`.
    ///
    /// Not an `async fn`: that would keep a second copy of `request` in the future.
    pub fn send(
        self: &Arc<Self>,
        endpoint: &Arc<EndpointState>,
        mut request: http::Request<AttemptBody>,
    ) -> impl Future<Output = Result<(http::Response<Incoming>, Reuse), UpstreamError>> + Send + 'static
    {
        let pool = self.clone();
        let endpoint = endpoint.clone();
        async move {
            let authority = &endpoint.authority;
            loop {
                let (mut sender, reused) = match pool.checkout(authority).await {
                    Some(sender) => (sender, true),
                    // Boxed: connecting is rare and its future is large.
                    None => (Box::pin(pool.connect(authority)).await?, false),
                };
                match sender.try_send_request(request).await {
                    Ok(response) => {
                        let reuse = Reuse {
                            pool,
                            endpoint,
                            sender,
                        };
                        return Ok((response, reuse));
                    }
                    Err(mut e) => match e.take_message() {
                        // Refused before anything was written (the endpoint closed the idle
                        // connection): send it on another one.
                        Some(unsent) if reused => {
                            tracing::trace!(%authority, error = %e.error(), "pooled connection closed; retrying on another");
                            request = unsent;
                        }
                        _ => {
                            return Err(UpstreamError::Request {
                                authority: authority.clone(),
                                source: e.into_error(),
                            });
                        }
                    },
                }
            }
        }
    }

    /// The most recently used idle connection to `authority` that is still open, ready for a
    /// request.
    async fn checkout(&self, authority: &str) -> Option<SendRequest<AttemptBody>> {
        loop {
            let mut idle = self.lock().get_mut(authority)?.pop_back()?;
            if idle.sender.is_closed() || self.expired(&idle, coarse_ms()) {
                continue;
            }
            // Returned as soon as its response ended, a connection may still be finishing
            // that exchange; this waits for it (or for it to fail).
            if idle.sender.ready().await.is_ok() {
                return Some(idle.sender);
            }
        }
    }

    async fn connect(&self, authority: &str) -> Result<SendRequest<AttemptBody>, UpstreamError> {
        let connected = tokio::time::timeout(self.connect_timeout, TcpStream::connect(authority))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout {
                authority: authority.to_owned(),
                timeout: self.connect_timeout,
            })?;
        let stream = connected.map_err(|source| UpstreamError::Connect {
            authority: authority.to_owned(),
            source,
        })?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%authority, error = %e, "cannot set TCP_NODELAY upstream");
        }
        let handshake = |source| UpstreamError::Handshake {
            authority: authority.to_owned(),
            source,
        };
        let (mut sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(handshake)?;
        // The connection's task: it ends when every sender is dropped (the pool closes idle
        // connections) or the endpoint closes, and with the worker's runtime at shutdown.
        let peer = authority.to_owned();
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(authority = %peer, error = %e, "upstream connection ended");
            }
        });
        sender.ready().await.map_err(handshake)?;
        Ok(sender)
    }

    fn expired(&self, idle: &Idle, now_ms: u64) -> bool {
        now_ms.saturating_sub(idle.since_ms) >= millis(self.idle_timeout)
    }

    fn put(&self, authority: &str, sender: SendRequest<AttemptBody>) {
        if sender.is_closed() {
            return;
        }
        let idle = Idle {
            sender,
            since_ms: coarse_ms(),
        };
        let mut pool = self.lock();
        match pool.get_mut(authority) {
            Some(queue) => {
                if queue.len() < Self::MAX_IDLE_PER_ENDPOINT {
                    queue.push_back(idle);
                }
            }
            None => {
                pool.insert(authority.to_owned(), VecDeque::from([idle]));
            }
        }
    }

    /// Closes connections idle for the idle timeout or closed by their endpoint, and
    /// forgets endpoints without idle connections. Returns how many connections stay idle.
    pub fn sweep(&self) -> usize {
        let now = coarse_ms();
        let mut pool = self.lock();
        pool.retain(|_, queue| {
            // Oldest first: the front holds the connections idle the longest.
            queue.retain(|i| !i.sender.is_closed() && !self.expired(i, now));
            !queue.is_empty()
        });
        pool.values().map(VecDeque::len).sum()
    }

    /// Idle connections to `authority` now (tests, metrics).
    pub fn idle(&self, authority: &str) -> usize {
        self.lock().get(authority).map_or(0, VecDeque::len)
    }
}

/// An upstream response body that keeps its endpoint's in-flight count until it ends (or is
/// dropped), so least-in-flight balancing sees streaming responses as load. Read to its end,
/// it gives its HTTP/1.1 connection back to the pool (`reuse`).
pub fn tracked(body: Incoming, guard: InFlight, reuse: Option<Reuse>) -> GatewayBody {
    Tracked {
        body,
        guard: Some(guard),
        reuse,
    }
    .boxed_unsync()
}

struct Tracked {
    body: Incoming,
    guard: Option<InFlight>,
    reuse: Option<Reuse>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                this.guard = None;
                if let Some(reuse) = this.reuse.take() {
                    reuse.release();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.guard = None;
                this.reuse = None;
            }
            _ => {}
        }
        polled.map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // A response without a body (HEAD, 204, 304, empty) may never be polled.
        if self.body.is_end_stream()
            && let Some(reuse) = self.reuse.take()
        {
            reuse.release();
        }
    }
}
