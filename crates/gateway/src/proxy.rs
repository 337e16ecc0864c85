//! Forwarding one request: route lookup, local answers (404/503/502/504/413/429, redirects),
//! upstream attempts with retries, upgrades and metrics. The header rules it applies are in
//! `headers.rs`.
//!
//! Per request: look the route up (host, path, headers) in the table in force, keep the
//! `Arc<Route>` to the end (a table swap never cuts a request), redirect to HTTPS or refuse
//! with 429 if the route says so, then try endpoints chosen by P2C ([`crate::balance`]) until
//! one answers, within the route's deadline.
//!
//! **Retries are only made where they are safe**, and each needs the service's retry budget
//! ([`crate::retry`]):
//! - the connection to the endpoint could not be established: nothing was sent, any method;
//! - the method is idempotent and the request body was never read, and the attempt failed
//!   before an answer (connection reset, endpoint killed) or the endpoint answered 502 or 503.
//!
//! Anything else (a POST whose connection broke after sending, a body already streamed) is
//! answered 502 rather than risk doing it twice.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::GatewayError;
use crate::access_log::{self, Outcome};
use crate::balance::{self, EndpointState, InFlight};
use crate::body::{AttemptBody, GatewayBody, Replay, full};
use crate::conn::ConnInfo;
use crate::error;
use crate::headers::{
    Host, Present, add_forwarded, content_length, request_host, strip_hop_by_hop,
    strip_request_hop_by_hop, upgrade_protocol,
};
use crate::metrics::{Metrics, NO_ROUTE};
use crate::ratelimit::retry_after_secs;
use crate::table::{Match, Route, RouteTable, TableState, normalize_host};
use crate::upstream::{Http1Pool, Reuse, UpstreamError, tracked};

use flotilla_spec::service::UpstreamProtocol;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle upstream connections are closed after this, in both clients.
const POOL_IDLE_TIMEOUT: Duration = Http1Pool::IDLE_TIMEOUT;
const H2_KEEPALIVE: Duration = Duration::from_secs(20);

pub type UpstreamClient = Client<HttpConnector, AttemptBody>;

fn connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.enforce_http(true);
    connector
}

/// Keep-alive HTTP/1.1 connections to upstream instances (one pool per gateway worker).
pub(crate) fn upstream_pool() -> Arc<Http1Pool> {
    Arc::new(Http1Pool::new(CONNECT_TIMEOUT))
}

/// Cleartext HTTP/2 (prior knowledge) client for `upstream = "h2c"` routes (gRPC): one
/// multiplexed connection per endpoint, kept alive with pings.
pub fn h2c_client() -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(H2_KEEPALIVE)
        .http2_keep_alive_timeout(H2_KEEPALIVE)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .build(connector())
}

/// Upgraded connections (WebSocket and others) being relayed; each is a task owned here and
/// ended by [`Tunnels::close`]. Clones share the tunnels.
#[derive(Debug, Default, Clone)]
pub struct Tunnels {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tunnels {
    /// Cuts every tunnel and waits for their tasks to end.
    pub async fn close(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Tunnels open now.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

/// Everything a connection needs to proxy its requests; shared by all connections.
#[derive(Debug)]
pub struct Proxy {
    pub table: Arc<ArcSwap<RouteTable>>,
    /// Keep-alive HTTP/1.1 connections to instances, of this worker.
    pub pool: Arc<Http1Pool>,
    /// For `upstream = "h2c"` routes.
    pub h2c: UpstreamClient,
    pub metrics: Metrics,
    /// The gateway's limits; the proxy enforces `max_body_bytes` (413).
    pub limits: crate::config::Limits,
    /// Write one log line per request.
    pub access_log: bool,
    /// State that survives table rebuilds (endpoints, limiters, budgets) and the policy.
    pub state: Arc<TableState>,
    pub tunnels: Tunnels,
}

impl Proxy {
    /// The proxy of one more gateway worker: new (empty) upstream connection pools, whose
    /// connections will be tasks on the runtime that uses them; everything else shared.
    pub fn for_worker(&self) -> Self {
        Self {
            table: self.table.clone(),
            pool: upstream_pool(),
            h2c: h2c_client(),
            metrics: self.metrics.clone(),
            limits: self.limits.clone(),
            access_log: self.access_log,
            state: self.state.clone(),
            tunnels: self.tunnels.clone(),
        }
    }

    /// Answers one client request; never fails (errors become 4xx/5xx answers).
    ///
    /// Everything up to the first upstream attempt is done here, synchronously; the future
    /// returned holds only what the exchange needs across its awaits. Keeping it small
    /// matters: it is moved into a task per HTTP/2 stream and into hyper's slot per HTTP/1
    /// request (see ARCHITECTURE.md, "Request future size").
    pub fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> impl Future<Output = Result<Response<GatewayBody>, Infallible>> + Send + 'static {
        let started = Instant::now();
        let logged = self
            .access_log
            .then(|| Box::new(access_log::Logged::of(&req)));
        let mut outcome = Outcome::default();
        let step = self.route(req, &conn, &mut outcome);
        async move {
            let response = match step {
                Step::Answer(response) => response,
                Step::Forward(mut forward) => {
                    self.forward(&mut forward, &mut outcome, started).await
                }
            };
            let elapsed = started.elapsed();
            match &outcome.route {
                Some(route) => self.metrics.observe_cached(
                    &route.metrics,
                    &route.service,
                    response.status(),
                    elapsed.as_secs_f64(),
                ),
                None => self
                    .metrics
                    .observe(NO_ROUTE, response.status(), elapsed.as_secs_f64()),
            }
            if let Some(request) = logged {
                access_log::log(&request, &conn, response.status(), &outcome, elapsed);
            }
            Ok(response)
        }
    }

    /// A local answer to a request, or what to send upstream; fills in `outcome`.
    fn route(&self, req: Request<Incoming>, conn: &ConnInfo, outcome: &mut Outcome) -> Step {
        let host_value = request_host(&req);
        let host = host_value.to_str().unwrap_or_default();
        // The guard is released before any await.
        let found = self
            .table
            .load()
            .lookup_request(host, req.uri().path(), req.headers());
        let route = match found {
            Match::NoRoute => {
                tracing::debug!(%host, path = req.uri().path(), "no route");
                return Step::Answer(error::no_route(host, req.uri().path()));
            }
            Match::NoReadyEndpoint(route) | Match::Ready(route) => route,
        };
        outcome.route = Some(route.clone());
        if route.redirect_https && !conn.tls {
            return Step::Answer(redirect_to_https(&req, host));
        }
        if let Some(limiter) = &route.rate_limit
            && let Err(wait) = limiter.check(conn.peer.ip())
        {
            self.metrics.rate_limited(&route.service);
            return Step::Answer(error::too_many_requests(retry_after_secs(wait)));
        }
        if route.endpoints.is_empty() {
            return Step::Answer(error::no_ready_instance(&route.service));
        }
        let host = Host {
            value: host_value.clone(),
            text: host,
        };
        self.prepare(req, route, conn, &host)
    }

    /// The request to send upstream, with its headers rewritten, or a local answer (400, 413).
    fn prepare(
        &self,
        mut req: Request<Incoming>,
        route: Arc<Route>,
        conn: &ConnInfo,
        host: &Host<'_>,
    ) -> Step {
        let limit = self.limits.max_body_bytes;
        let present = Present::scan(req.headers());
        if present.has(Present::CONTENT_LENGTH)
            && content_length(req.headers()).is_some_and(|len| len > limit)
        {
            return Step::Answer(error::too_large(limit));
        }
        let upgrade = if present.has(Present::CONNECTION) {
            upgrade_protocol(&req)
        } else {
            None
        };
        if upgrade.is_some() && route.upstream == UpstreamProtocol::H2c {
            return Step::Answer(error::bad_request(
                "protocol upgrades are not supported on this route\n",
            ));
        }
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let Some(path_and_query) = upstream_path_and_query(&route, &parts.uri) else {
            return Step::Answer(error::bad_request(
                "request target must be an absolute path\n",
            ));
        };
        let mut headers = parts.headers;
        let present = strip_request_hop_by_hop(&mut headers, present);
        if let Some(protocol) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol.clone());
        }
        match route.upstream {
            // HTTP/2 carries the host in `:authority`; the original is in X-Forwarded-Host.
            UpstreamProtocol::H2c => {
                if present.has(Present::HOST) {
                    headers.remove(header::HOST);
                }
            }
            UpstreamProtocol::Http1 => {
                if !present.has(Present::HOST) {
                    headers.insert(header::HOST, host.value.clone());
                }
            }
        }
        add_forwarded(&mut headers, conn.forwarding(), host, present);
        route.retry_budget.request();
        let request = UpstreamRequest {
            idempotent: is_idempotent(&parts.method),
            method: parts.method,
            path_and_query,
            headers: Some(headers),
            replay: Replay::new(body, limit),
            upgrade,
            client_upgrade,
        };
        Step::Forward(Box::new(Forward { route, request }))
    }

    /// Sends the request upstream within the route's deadline; the answer for the client.
    async fn forward(
        &self,
        forward: &mut Forward,
        outcome: &mut Outcome,
        started: Instant,
    ) -> Response<GatewayBody> {
        let Forward { route, request } = forward;
        let deadline = route.timeout.unwrap_or(self.state.policy.default_timeout);
        let attempts = self.attempts(route, request, outcome, started);
        let answer = match tokio::time::timeout(deadline, attempts).await {
            Ok(answer) => answer,
            Err(_) => {
                tracing::warn!(
                    service = %route.service,
                    timeout = ?deadline,
                    "upstream did not answer in time"
                );
                return error::upstream_timed_out(&route.service);
            }
        };
        match answer {
            Answer::Upstream(response, guard, reuse) => {
                if response.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let (Some(client_upgrade), Some(protocol)) =
                        (request.client_upgrade.take(), request.upgrade.take())
                {
                    // An upgraded connection is the tunnel's, never the pool's.
                    drop(reuse);
                    return self.tunnel(response, client_upgrade, protocol, guard, route);
                }
                into_client_response(response, guard, reuse)
            }
            Answer::TooLarge => error::too_large(self.limits.max_body_bytes),
            Answer::Failed => error::upstream_failed(&route.service),
        }
    }

    /// Tries endpoints until one answers or retrying is no longer safe or allowed.
    /// `started`: when the request came in, the first attempt's start (one clock read less).
    async fn attempts(
        &self,
        route: &Arc<Route>,
        request: &mut UpstreamRequest,
        outcome: &mut Outcome,
        started: Instant,
    ) -> Answer {
        let policy = &self.state.policy;
        // The request's route; replaced by the current table's version when every endpoint
        // left to try was taken out of the gateway since the request matched.
        let mut route = route.clone();
        let mut tried: u64 = 0;
        // An upstream 502/503 kept while a retry is tried; the answer if retries run out.
        // Boxed: the future of every request would otherwise carry its room.
        let mut held: Option<Box<Held>> = None;
        for attempt in 0..policy.max_attempts.max(1) {
            let Some((index, guard)) = self.pick(&mut route, &mut tried) else {
                break;
            };
            if attempt > 0 {
                if !route.retry_budget.try_retry() {
                    self.metrics.retry_refused(&route.service);
                    tracing::debug!(service = %route.service, "retry budget spent");
                    break;
                }
                self.metrics.retry(&route.service);
            }
            let endpoint = &route.endpoints[index];
            outcome.attempts += 1;
            outcome.instance = Some(endpoint.clone());
            // Every endpoint tried once, or the attempts spent: no retry can follow this one,
            // so the headers are moved into it rather than copied.
            let last = attempt + 1 >= policy.max_attempts.max(1)
                || (route.endpoints.len() <= 64
                    && u64::from(tried.count_ones()) >= route.endpoints.len() as u64);
            let upstream = match request.build(endpoint, route.upstream, last) {
                Ok(upstream) => upstream,
                Err(source) => {
                    let err = GatewayError::Upstream {
                        service: route.service.clone(),
                        endpoint: endpoint.authority.clone(),
                        retryable: true,
                        source,
                    };
                    tracing::warn!(error = %error_chain(&err), "bad endpoint address");
                    self.metrics.upstream_error(&route.service);
                    continue;
                }
            };
            let started = if attempt == 0 {
                started
            } else {
                Instant::now()
            };
            let sent = match route.upstream {
                UpstreamProtocol::Http1 => self
                    .pool
                    .send(endpoint, upstream)
                    .await
                    .map(|(response, reuse)| (response, Some(reuse))),
                UpstreamProtocol::H2c => self
                    .h2c
                    .request(upstream)
                    .await
                    .map(|response| (response, None))
                    .map_err(UpstreamError::H2c),
            };
            match sent {
                Ok((response, reuse)) => {
                    let status = response.status();
                    if !status.is_server_error() {
                        endpoint.on_success(started.elapsed(), policy);
                        return Answer::Upstream(response, guard, reuse);
                    }
                    self.failed(&route, endpoint, Some(started.elapsed()));
                    let retryable = matches!(
                        status,
                        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                    ) && request.idempotent
                        && request.upgrade.is_none()
                        && request.replay.unsent();
                    if !retryable {
                        return Answer::Upstream(response, guard, reuse);
                    }
                    tracing::debug!(
                        instance = %endpoint.instance,
                        %status,
                        attempt,
                        "upstream answered with a retryable status"
                    );
                    held = Some(Box::new((response, guard, reuse)));
                }
                Err(source) => {
                    drop(guard);
                    if request.replay.too_large() {
                        return Answer::TooLarge;
                    }
                    self.metrics.upstream_error(&route.service);
                    if source.is_connect() {
                        self.metrics.connect_error(&route.service);
                    }
                    self.failed(&route, endpoint, None);
                    // Safe to retry: nothing was sent (connect failed), or the method is
                    // idempotent — and either way the body was never read.
                    let retryable =
                        request.replay.unsent() && (source.is_connect() || request.idempotent);
                    let err = GatewayError::Upstream {
                        service: route.service.clone(),
                        endpoint: endpoint.authority.clone(),
                        retryable,
                        source: source.into(),
                    };
                    tracing::warn!(
                        instance = %endpoint.instance,
                        attempt,
                        error = %error_chain(&err),
                        "upstream request failed"
                    );
                    if !retryable {
                        return Answer::held(held);
                    }
                }
            }
        }
        Answer::held(held)
    }

    /// The endpoint to try next and its in-flight guard, or `None` when every endpoint was
    /// tried.
    ///
    /// An endpoint taken out of the routing table since the request matched `route` (its
    /// instance is being stopped, or went unready) is passed over: nothing was sent to it, and
    /// once its drain has seen it unrouted and idle nothing may be (see
    /// [`EndpointState::start_if_routed`]). Passing over costs no attempt and no retry budget.
    /// When only such endpoints are left, the current table's version of the route (with the
    /// instances that replaced them) is used instead, a few times at most; when there is none,
    /// an unrouted endpoint is tried after all (an unready instance may still answer).
    fn pick(&self, route: &mut Arc<Route>, tried: &mut u64) -> Option<(usize, InFlight)> {
        const REFRESHES: usize = 3;
        for refresh in 0..=REFRESHES {
            let mut unrouted = None;
            // Each pass marks one endpoint tried (past 64 endpoints the bit set cannot, so the
            // passes are bounded by the number of endpoints).
            for _ in 0..route.endpoints.len() {
                let Some(index) = balance::choose(&route.endpoints, *tried) else {
                    break;
                };
                if index < 64 {
                    *tried |= 1 << index;
                }
                if let Some(guard) = route.endpoints[index].start_if_routed() {
                    return Some((index, guard));
                }
                unrouted.get_or_insert(index);
            }
            let fallback = unrouted?;
            let current = self
                .table
                .load()
                .same_route(route)
                .filter(|c| !Arc::ptr_eq(c, route) && !c.endpoints.is_empty());
            let Some(current) = current.filter(|_| refresh < REFRESHES) else {
                return Some((fallback, route.endpoints[fallback].start()));
            };
            tracing::debug!(
                service = %route.service,
                "the request's endpoints were taken out of the gateway; using the current route"
            );
            // Endpoints already tried (not merely passed over) stay tried.
            let mut remapped: u64 = 0;
            for (i, e) in current.endpoints.iter().enumerate().take(64) {
                let was_tried = route.endpoints.iter().enumerate().take(64).any(|(j, old)| {
                    *tried & (1 << j) != 0 && old.is_routed() && Arc::ptr_eq(old, e)
                });
                if was_tried {
                    remapped |= 1 << i;
                }
            }
            *route = current;
            *tried = remapped;
        }
        None
    }

    /// Passive health: counts a failure, ejecting the endpoint when it is due.
    fn failed(&self, route: &Route, endpoint: &EndpointState, latency: Option<Duration>) {
        if let Some(time) = endpoint.on_failure(latency, &route.endpoints, &self.state.policy) {
            self.metrics.ejection(&route.service);
            tracing::warn!(
                service = %route.service,
                instance = %endpoint.instance,
                endpoint = %endpoint.authority,
                ejected_for = ?time,
                latency_ewma = ?endpoint.ewma(),
                "endpoint ejected after consecutive failures"
            );
        }
    }

    /// Answers 101 to the client and relays bytes between the two upgraded connections in a
    /// task owned by [`Proxy::tunnels`].
    fn tunnel(
        &self,
        mut response: Response<Incoming>,
        client: hyper::upgrade::OnUpgrade,
        protocol: HeaderValue,
        guard: InFlight,
        route: &Route,
    ) -> Response<GatewayBody> {
        let upstream = hyper::upgrade::on(&mut response);
        let stop = self.tunnels.stop.clone();
        let service = route.service.clone();
        self.tunnels.tracker.spawn(async move {
            let relay = async {
                let (client, upstream) = tokio::try_join!(client, upstream)?;
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
                Ok::<(), crate::body::BoxError>(())
            };
            tokio::select! {
                () = stop.cancelled() => {}
                result = relay => {
                    if let Err(e) = result {
                        tracing::debug!(%service, error = %error_chain(e.as_ref()), "upgraded connection ended");
                    }
                }
            }
            drop(guard);
        });
        let (mut parts, _) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol);
        Response::from_parts(parts, full(bytes::Bytes::new()))
    }
}

/// A request on its way upstream: what the exchange keeps across its awaits. Boxed in
/// [`Step`], so that local answers do not carry its room.
struct Forward {
    route: Arc<Route>,
    request: UpstreamRequest,
}

/// What [`Proxy::route`] decided.
enum Step {
    /// Answered by the gateway itself (404, 503, 429, 413, redirects...).
    Answer(Response<GatewayBody>),
    Forward(Box<Forward>),
}

/// What one request sends upstream, whichever endpoint gets it.
struct UpstreamRequest {
    method: Method,
    path_and_query: PathAndQuery,
    /// Taken by the last possible attempt, cloned by the others.
    headers: Option<HeaderMap>,
    replay: Replay,
    idempotent: bool,
    /// The protocol the client asked to switch to (`Upgrade`), and its side of the upgrade.
    upgrade: Option<HeaderValue>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

impl UpstreamRequest {
    fn build(
        &mut self,
        endpoint: &EndpointState,
        protocol: UpstreamProtocol,
        last: bool,
    ) -> Result<Request<AttemptBody>, crate::body::BoxError> {
        let Some(authority) = endpoint.uri_authority() else {
            return Err(format!("invalid endpoint address {:?}", endpoint.authority).into());
        };
        let mut uri = http::uri::Parts::default();
        if protocol == UpstreamProtocol::H2c {
            // The h2c client takes the endpoint from the URI (`:authority`); HTTP/1.1 is sent
            // in origin form on a connection to the endpoint.
            uri.scheme = Some(http::uri::Scheme::HTTP);
            uri.authority = Some(authority.clone());
        }
        uri.path_and_query = Some(self.path_and_query.clone());
        let uri = Uri::from_parts(uri)?;
        let headers = match (last, &mut self.headers) {
            (true, headers) => headers.take(),
            (false, headers) => headers.clone(),
        };
        let Some(headers) = headers else {
            return Err("request headers already sent".into());
        };
        let mut upstream = Request::new(self.replay.attempt());
        *upstream.method_mut() = self.method.clone();
        *upstream.uri_mut() = uri;
        *upstream.version_mut() = match protocol {
            UpstreamProtocol::Http1 => Version::HTTP_11,
            UpstreamProtocol::H2c => Version::HTTP_2,
        };
        *upstream.headers_mut() = headers;
        Ok(upstream)
    }
}

/// An upstream response with the in-flight guard and pooled connection that go with its body.
type Held = (Response<Incoming>, InFlight, Option<Reuse>);

enum Answer {
    /// An upstream response (the in-flight guard goes with its body).
    Upstream(Response<Incoming>, InFlight, Option<Reuse>),
    /// The request body was longer than the limit (413).
    TooLarge,
    /// No endpoint answered (502).
    Failed,
}

impl Answer {
    /// The response held back for a retry, if any; else the request failed.
    fn held(held: Option<Box<Held>>) -> Self {
        match held {
            Some(held) => {
                let (response, guard, reuse) = *held;
                Self::Upstream(response, guard, reuse)
            }
            None => Self::Failed,
        }
    }
}

fn into_client_response(
    response: Response<Incoming>,
    guard: InFlight,
    reuse: Option<Reuse>,
) -> Response<GatewayBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // An h2c upstream's answer goes to the client in the client's protocol.
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, tracked(body, guard, reuse))
}

/// The path and query to send upstream: the route's rewrite applied to the path.
fn upstream_path_and_query(route: &Route, uri: &Uri) -> Option<PathAndQuery> {
    let pq = uri.path_and_query()?;
    if !pq.as_str().starts_with('/') {
        return None;
    }
    if route.rewrite.is_none() {
        return Some(pq.clone());
    }
    let mut out = route.upstream_path(pq.path());
    if let Some(query) = pq.query() {
        out.push('?');
        out.push_str(query);
    }
    PathAndQuery::try_from(out).ok()
}

/// A redirect to the same URL over HTTPS: 301 for GET and HEAD, 308 (method and body kept)
/// otherwise.
fn redirect_to_https<B>(req: &Request<B>, host: &str) -> Response<GatewayBody> {
    let host = normalize_host(host);
    let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{host}{pq}");
    let Ok(location) = HeaderValue::from_str(&location) else {
        return error::bad_request("invalid host\n");
    };
    if host.is_empty() {
        return error::bad_request("missing host\n");
    }
    let status = if matches!(*req.method(), Method::GET | Method::HEAD) {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    let mut response = text(status, "");
    response.headers_mut().insert(header::LOCATION, location);
    response
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The gateway's own answers and the log form of errors, in [`crate::error`]; kept here by path.
pub use crate::error::{error_chain, text};

/// What the fuzz targets (`fuzz/`) drive; moved to [`crate::headers`], kept here by path.
#[doc(hidden)]
pub use crate::headers::fuzzing;

#[cfg(test)]
mod tests {
    use super::*;

    // ---- draining: requests that matched an older table --------------------------------------

    fn web(paths: &[&str]) -> flotilla_spec::object::Service {
        let routes: Vec<serde_json::Value> = paths
            .iter()
            .map(|p| serde_json::json!({ "path": p }))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web" },
            "spec": { "command": "srv", "ports": ["http"], "routes": routes },
        }))
        .expect("service")
    }

    fn ready(name: &str, port: u16) -> flotilla_spec::object::Instance {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "spec": { "service": "web", "node": "local", "specHash": "h",
                      "template": { "command": "srv", "ports": ["http"] } },
            "status": { "phase": "Running", "ready": true, "host": "127.0.0.1",
                        "ports": { "http": port } },
        }))
        .expect("instance")
    }

    /// A proxy over `instances`, and the route a request to `/` matches now.
    fn proxy_with(instances: &[flotilla_spec::object::Instance]) -> (Proxy, Arc<Route>) {
        let state = Arc::new(TableState::default());
        let table = RouteTable::build_with(&[web(&["/"])], instances, &state);
        let route = table.lookup("h", "/").route().cloned().expect("route");
        let proxy = Proxy {
            table: Arc::new(ArcSwap::from_pointee(table)),
            pool: upstream_pool(),
            h2c: h2c_client(),
            metrics: Metrics::register(&mut prometheus_client::registry::Registry::default()),
            limits: crate::config::Limits::default(),
            access_log: false,
            state,
            tunnels: Tunnels::default(),
        };
        (proxy, route)
    }

    fn swap(
        proxy: &Proxy,
        services: &[flotilla_spec::object::Service],
        instances: &[flotilla_spec::object::Instance],
    ) {
        let next = RouteTable::build_with(services, instances, &proxy.state);
        crate::follower::swap_table(&proxy.table, next);
    }

    fn names(route: &Route) -> Vec<&str> {
        route
            .endpoints
            .iter()
            .map(|e| e.instance.as_str())
            .collect()
    }

    #[tokio::test]
    async fn a_request_that_matched_an_older_table_goes_to_the_instance_that_replaced_its_own() {
        let (proxy, matched) = proxy_with(&[ready("web-old", 1)]);
        let old = matched.endpoints[0].clone();
        // The rollout: web-old is taken out (its drain begins), web-new serves.
        swap(&proxy, &[web(&["/"])], &[ready("web-new", 2)]);
        assert!(!old.is_routed());

        let (mut route, mut tried) = (matched.clone(), 0);
        let (index, guard) = proxy.pick(&mut route, &mut tried).expect("an endpoint");
        assert_eq!(route.endpoints[index].instance, "web-new");
        assert_eq!(names(&route), ["web-new"], "the current table's route");
        assert_eq!(
            old.in_flight(),
            0,
            "nothing counted on the drained endpoint"
        );
        assert_eq!(route.endpoints[index].in_flight(), 1);
        drop(guard);
        assert_eq!(route.endpoints[index].in_flight(), 0);
        // Nothing left to try: the only endpoint was tried.
        assert!(proxy.pick(&mut route, &mut tried).is_none());
    }

    #[tokio::test]
    async fn endpoints_tried_stay_tried_in_the_newer_route() {
        let (proxy, matched) = proxy_with(&[ready("web-a", 1), ready("web-b", 2)]);
        // web-a was tried (and failed); then web-b is taken out and web-c comes in.
        let a = matched
            .endpoints
            .iter()
            .position(|e| e.instance == "web-a")
            .expect("a");
        let mut tried: u64 = 1 << a;
        swap(
            &proxy,
            &[web(&["/"])],
            &[ready("web-a", 1), ready("web-c", 3)],
        );
        let mut route = matched.clone();
        let (index, _guard) = proxy.pick(&mut route, &mut tried).expect("an endpoint");
        assert_eq!(route.endpoints[index].instance, "web-c");
        assert!(
            proxy.pick(&mut route, &mut tried).is_none(),
            "web-a is not tried twice"
        );
    }

    #[tokio::test]
    async fn an_unrouted_endpoint_is_still_tried_when_its_route_has_nothing_else() {
        // The route changed (its path), so it has no current version: the request goes where
        // it matched, counted in flight (a drain not yet over waits for it).
        let (proxy, matched) = proxy_with(&[ready("web-old", 1)]);
        swap(&proxy, &[web(&["/v2"])], &[ready("web-new", 2)]);
        let (mut route, mut tried) = (matched.clone(), 0);
        let (index, guard) = proxy.pick(&mut route, &mut tried).expect("an endpoint");
        assert!(Arc::ptr_eq(&route, &matched));
        assert_eq!(route.endpoints[index].instance, "web-old");
        assert_eq!(route.endpoints[index].in_flight(), 1);
        drop(guard);
        // Every instance unready: the current route exists but is empty; same fallback.
        let (proxy, matched) = proxy_with(&[ready("web-old", 1)]);
        swap(&proxy, &[web(&["/"])], &[]);
        let (mut route, mut tried) = (matched.clone(), 0);
        let (index, _guard) = proxy.pick(&mut route, &mut tried).expect("an endpoint");
        assert_eq!(route.endpoints[index].instance, "web-old");
    }

    #[tokio::test]
    async fn routing_view_is_busy_while_a_request_is_in_flight_to_an_unrouted_instance() {
        let (proxy, matched) = proxy_with(&[ready("web-old", 1)]);
        let view = crate::RoutingView::new(proxy.table.clone(), proxy.state.clone());
        let (mut route, mut tried) = (matched.clone(), 0);
        let (_, guard) = proxy.pick(&mut route, &mut tried).expect("an endpoint");
        assert!(view.routes_to("web-old") && view.busy("web-old"));
        swap(&proxy, &[web(&["/"])], &[ready("web-new", 2)]);
        assert!(!view.routes_to("web-old"));
        assert_eq!(view.in_flight_to("web-old"), 1);
        assert!(
            view.busy("web-old"),
            "unrouted, but its request is not answered yet"
        );
        drop(guard);
        assert!(!view.busy("web-old"));
        assert!(view.busy("web-new") && !view.busy("web-other"));
        // Routed again (it became ready again): requests may start on it again.
        swap(
            &proxy,
            &[web(&["/"])],
            &[ready("web-old", 1), ready("web-new", 2)],
        );
        assert!(matched.endpoints[0].is_routed());
    }
}
