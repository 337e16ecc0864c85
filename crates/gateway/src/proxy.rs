//! Forwarding one request: route lookup, local answers (404/503/502), upstream attempts with
//! retries, header rewriting and metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::GatewayError;
use crate::body::{AttemptBody, GatewayBody, Replay, full, stream};
use crate::conn::ConnInfo;
use crate::metrics::{Metrics, NO_ROUTE};
use crate::table::{Match, Route, RouteTable};

/// Most endpoints one request is tried on.
const MAX_ATTEMPTS: usize = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const POOL_MAX_IDLE_PER_HOST: usize = 64;
/// Longest host or path echoed back in a 404 body.
const ECHO_LIMIT: usize = 128;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus `proxy-connection` and `keep-alive` seen in the
/// wild. `expect` is answered by our own server side, so it is not forwarded either.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub type UpstreamClient = Client<HttpConnector, AttemptBody>;

/// Pooled keep-alive HTTP/1.1 client for upstream instances.
pub fn upstream_client() -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// Everything a connection needs to proxy its requests; shared by all connections.
#[derive(Debug)]
pub struct Proxy {
    pub table: Arc<ArcSwap<RouteTable>>,
    pub client: UpstreamClient,
    pub metrics: Metrics,
}

impl Proxy {
    /// Answers one client request; never fails (errors become 4xx/5xx answers).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Result<Response<GatewayBody>, Infallible> {
        let started = Instant::now();
        let (route, response) = self.route(req, &conn).await;
        self.metrics.observe(
            route.as_deref().unwrap_or(NO_ROUTE),
            response.status(),
            started.elapsed().as_secs_f64(),
        );
        Ok(response)
    }

    /// The answer and the service that produced it (`None`: no route).
    async fn route(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> (Option<String>, Response<GatewayBody>) {
        let host = request_host(&req);
        // The guard is released before any await.
        let found = self.table.load().lookup(&host, req.uri().path());
        match found {
            Match::NoRoute => {
                tracing::debug!(%host, path = req.uri().path(), "no route");
                let reason = format!(
                    "no route for host {:?} and path {:?}\n",
                    clip(&host),
                    clip(req.uri().path())
                );
                (None, text(StatusCode::NOT_FOUND, reason))
            }
            Match::NoReadyEndpoint(route) => {
                let reason = format!("no ready instance for service {:?}\n", route.service);
                let service = route.service.clone();
                (Some(service), text(StatusCode::SERVICE_UNAVAILABLE, reason))
            }
            Match::Ready(route) => {
                let response = self.forward(req, &route, conn, host).await;
                (Some(route.service.clone()), response)
            }
        }
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        route: &Route,
        conn: &ConnInfo,
        host: String,
    ) -> Response<GatewayBody> {
        let (parts, body) = req.into_parts();
        let path_and_query = match parts.uri.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "request target must be an absolute path\n",
                );
            }
        };
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::EXPECT);
        add_forwarded(&mut headers, conn.peer, conn.scheme(), &host);
        let idempotent = is_idempotent(&parts.method);
        let replay = Replay::new(body);

        let (Some(first), n) = (route.next_start(), route.endpoints.len()) else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no ready instance for service {:?}\n", route.service),
            );
        };
        for attempt in 0..n.min(MAX_ATTEMPTS) {
            let endpoint = &route.endpoints[(first + attempt) % n];
            let uri = match Uri::builder()
                .scheme("http")
                .authority(endpoint.authority.as_str())
                .path_and_query(path_and_query.clone())
                .build()
            {
                Ok(uri) => uri,
                Err(source) => {
                    let err = GatewayError::Upstream {
                        service: route.service.clone(),
                        endpoint: endpoint.authority.clone(),
                        retryable: true,
                        source: source.into(),
                    };
                    tracing::warn!(error = %err, "bad endpoint address");
                    self.metrics.upstream_error(&route.service);
                    continue;
                }
            };
            let mut upstream = Request::new(replay.attempt());
            *upstream.method_mut() = parts.method.clone();
            *upstream.uri_mut() = uri;
            *upstream.version_mut() = Version::HTTP_11;
            *upstream.headers_mut() = headers.clone();

            match self.client.request(upstream).await {
                Ok(response) => return into_client_response(response),
                Err(source) => {
                    self.metrics.upstream_error(&route.service);
                    // Safe to retry: nothing was sent (connect failed), or the method is
                    // idempotent — and either way the body was never read.
                    let retryable = replay.unsent() && (source.is_connect() || idempotent);
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
                        break;
                    }
                }
            }
        }
        text(
            StatusCode::BAD_GATEWAY,
            format!("upstream error for service {:?}\n", route.service),
        )
    }
}

fn into_client_response(response: Response<Incoming>) -> Response<GatewayBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, stream(body))
}

/// The host a request was sent to: the URI authority (absolute form) or the `Host` header;
/// empty if neither.
fn request_host<B>(req: &Request<B>) -> String {
    if let Some(authority) = req.uri().authority() {
        return authority.as_str().to_owned();
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Appends the client to `X-Forwarded-For`; sets `X-Forwarded-Proto` and `X-Forwarded-Host`
/// (the gateway is the edge: clients' values for those are not trusted).
fn add_forwarded(headers: &mut HeaderMap, peer: SocketAddr, scheme: &'static str, host: &str) {
    let client = peer.ip().to_string();
    let prior: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let forwarded_for = if prior.is_empty() {
        client
    } else {
        format!("{}, {client}", prior.join(", "))
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
    headers.remove(&X_FORWARDED_HOST);
    if let Ok(value) = HeaderValue::from_str(host)
        && !host.is_empty()
    {
        headers.insert(X_FORWARDED_HOST.clone(), value);
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A short plain-text answer made by the gateway itself.
pub fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<GatewayBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// At most [`ECHO_LIMIT`] characters of `s`.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(ECHO_LIMIT) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

/// `error: cause: cause` for logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers["x-kept"], "yes");
    }

    #[test]
    fn forwarded_headers() {
        let peer: SocketAddr = "10.0.0.9:5555".parse().unwrap();
        let mut headers = HeaderMap::new();
        add_forwarded(&mut headers, peer, "http", "Example.com:8080");
        assert_eq!(headers["x-forwarded-for"], "10.0.0.9");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "Example.com:8080");

        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        headers.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        headers.insert("x-forwarded-host", HeaderValue::from_static("spoofed"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        add_forwarded(&mut headers, peer, "http", "");
        assert_eq!(headers["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert!(headers.get("x-forwarded-host").is_none());
    }

    #[test]
    fn host_comes_from_authority_then_host_header() {
        let req = Request::builder()
            .uri("http://Abs.example:81/x")
            .header(header::HOST, "other")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), "Abs.example:81");
        let req = Request::builder()
            .uri("/x")
            .header(header::HOST, "h.example")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), "h.example");
        let req = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(request_host(&req), "");
    }

    #[test]
    fn clip_keeps_char_boundaries() {
        let long = "é".repeat(ECHO_LIMIT + 10);
        assert_eq!(clip(&long).chars().count(), ECHO_LIMIT);
        assert_eq!(clip("short"), "short");
    }
}
