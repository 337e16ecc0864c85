//! The HTTP + JSON API (axum). Every route except `/healthz` needs the bearer token. The
//! handlers, by resource, parse and authenticate; what they do is in [`crate::operations`].

mod drains;
mod events;
mod instances;
mod logs;
mod nodes;
pub mod servers;
mod services;
mod tokens;
pub use tokens::MEMBER_CERT_TTL;
mod watch;

use drains::*;
use events::*;
use instances::*;
use logs::*;
use nodes::*;
use services::*;
use watch::*;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_spec::{Event, Instance, Object, Revision as ServiceRevision, Service};
use flotilla_store::{Revision, Store, StoreError, WatchEvent, typed};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiResult, FieldProblem};
use crate::operations::{self, ApplyRequest, ApplyResult};
use crate::selector::Selector;

/// Largest accepted request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Buffered chunks per streaming response.
const STREAM_BUFFER: usize = 64;

/// Where the API reads instance logs from (the agent's files in `flotilla up`).
#[async_trait]
pub trait LogSource: Send + Sync + 'static {
    async fn read(&self, instance: &str, tail: Option<usize>) -> Result<Vec<u8>, String>;
    /// Streams the log from `tail` lines back (all of it when `None`), then new output; waits
    /// for a log that does not exist yet. Once `stop` is cancelled, what was written until then
    /// is still sent, then the stream ends.
    fn follow(
        &self,
        instance: &str,
        tail: Option<usize>,
        stop: CancellationToken,
    ) -> mpsc::Receiver<Result<Bytes, String>>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status_class: String,
}

#[derive(Clone)]
pub struct ApiState {
    store: Arc<dyn Store>,
    /// Node heartbeats, shared with the node lifecycle in the controller.
    leases: Arc<flotilla_store::Leases>,
    /// Issues and checks bootstrap tokens; `None`: only the admin token works.
    signer: Option<Arc<crate::auth::Signer>>,
    /// The cluster CA, which signs node and gateway certificates; `None` (`flotilla up`, on
    /// loopback): no member can join.
    authority: Option<Arc<flotilla_pki::Authority>>,
    /// How long the node and gateway certificates it signs last.
    member_ttl: std::time::Duration,
    /// Drains waiting for the gateways' confirmations.
    drains: Arc<crate::drains::Drains>,
    /// Agents' instance watches, one store watch for all of them.
    node_watches: Arc<flotilla_store::NodeWatches>,
    token: Arc<str>,
    logs: Arc<dyn LogSource>,
    latency: Family<RequestLabels, Histogram>,
    shutdown: CancellationToken,
    /// [`flotilla_spec::gateway_digest`] of the `[gateway]` table the in-process gateway
    /// started with; `None` when this server runs no gateway.
    gateway: Option<Arc<str>>,
    /// The servers and their store, for `GET /api/v1/servers`.
    control_plane: Option<servers::ControlPlane>,
}

impl ApiState {
    pub fn new(
        store: Arc<dyn Store>,
        leases: Arc<flotilla_store::Leases>,
        token: impl Into<Arc<str>>,
        logs: Arc<dyn LogSource>,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Self {
        let latency = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.5, 12))
        });
        registry.register(
            "flotilla_api_request_duration_seconds",
            "API request latency by method, route and status class",
            latency.clone(),
        );
        Self {
            node_watches: flotilla_store::NodeWatches::start(store.clone(), shutdown.clone()),
            store,
            leases,
            signer: None,
            authority: None,
            member_ttl: tokens::MEMBER_CERT_TTL,
            drains: crate::drains::Drains::new(),
            token: token.into(),
            logs,
            latency,
            shutdown,
            gateway: None,
            control_plane: None,
        }
    }

    /// What `GET /api/v1/servers` reports.
    pub fn with_control_plane(mut self, plane: servers::ControlPlane) -> Self {
        self.control_plane = Some(plane);
        self
    }

    /// Join, node and gateway tokens are signed and checked with this.
    pub fn with_signer(mut self, signer: crate::auth::Signer) -> Self {
        self.signer = Some(Arc::new(signer));
        self
    }

    /// Node and gateway certificates are signed by this CA, valid for `ttl` (their holders
    /// renew them at half-life).
    pub fn with_authority(
        mut self,
        authority: Arc<flotilla_pki::Authority>,
        ttl: std::time::Duration,
    ) -> Self {
        self.authority = Some(authority);
        self.member_ttl = ttl;
        self
    }

    /// This server runs a gateway, started with the `[gateway]` table of this digest.
    pub fn with_gateway(mut self, digest: impl Into<Arc<str>>) -> Self {
        self.gateway = Some(digest.into());
        self
    }
}

pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/api/v1/services", get(list_services).post(apply_service))
        .route(
            "/api/v1/services/{name}",
            get(get_object::<Service>).delete(delete_service),
        )
        .route("/api/v1/services/{name}/logs", get(service_logs))
        .route("/api/v1/services/{name}/revisions", get(list_revisions))
        .route("/api/v1/services/{name}/rollback", post(rollback))
        .route("/api/v1/services/{name}/pause", post(pause))
        .route("/api/v1/services/{name}/resume", post(resume))
        .route("/api/v1/services/{name}/restart", post(restart))
        .route("/api/v1/instances", get(list_instances))
        .route("/api/v1/instances/{name}", get(get_object::<Instance>))
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/nodes/{node}", get(get_node))
        .route(
            "/api/v1/nodes/{node}/registration",
            axum::routing::put(put_registration),
        )
        .route("/api/v1/nodes/{node}/lease", axum::routing::put(put_lease))
        .route(
            "/api/v1/nodes/{node}/conditions",
            axum::routing::put(put_conditions),
        )
        .route("/api/v1/nodes/{node}/instances", get(node_instances))
        .route(
            "/api/v1/nodes/{node}/instances/{name}",
            get(node_instance).delete(finish_deletion),
        )
        .route(
            "/api/v1/nodes/{node}/instances/{name}/status",
            axum::routing::put(put_status),
        )
        .route(
            "/api/v1/nodes/{node}/instances/{name}/events",
            post(post_event),
        )
        .route(
            "/api/v1/nodes/{node}/instances/{name}/drain",
            post(drain_instance),
        )
        .route(
            crate::auth::GATEWAY_DRAINS,
            get(poll_drains).post(confirm_drains),
        )
        .route("/api/v1/nodes/{node}/cordon", post(cordon))
        .route("/api/v1/nodes/{node}/uncordon", post(uncordon))
        .route("/api/v1/nodes/{node}/drain", post(drain))
        .route(
            "/api/v1/nodes/{node}/taints",
            axum::routing::put(put_taints),
        )
        .route(
            "/api/v1/nodes/{node}/credential",
            post(tokens::renew_credential),
        )
        .route("/api/v1/tokens", post(tokens::create_token))
        .route("/api/v1/join", post(tokens::join))
        .route(
            crate::auth::GATEWAY_CREDENTIAL,
            post(tokens::gateway_credential),
        )
        .route("/api/v1/events", get(list_events))
        .route("/api/v1/servers", get(servers::list_servers))
        .route("/api/v1/watch/{kind}", get(watch))
        .route("/api/v1/gateway", get(gateway_info))
        .route("/version", get(version))
        .route("/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such API path") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

// ------------------------------------------------------------------------------------------
// Middleware

/// Who is calling: the admin token (constant-time compare) or a signed bootstrap token in
/// `Authorization`; else the member certificate the connection showed ([`crate::Peer`]); then
/// whether that caller may reach this path ([`crate::auth::allowed`]). The principal is left
/// in the request's extensions for the handlers.
async fn auth(State(state): State<ApiState>, mut request: Request, next: Next) -> Response {
    use crate::auth::{Principal, TokenKind};
    use flotilla_pki::Role;
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let peer = request
        .extensions()
        .get::<crate::Peer>()
        .and_then(|p| p.0.clone());
    let principal = match (given, peer) {
        (Some(given), _) if constant_time_eq(given.as_bytes(), state.token.as_bytes()) => {
            Principal::Admin
        }
        (Some(given), _) => {
            let Some(signer) = state.signer.as_ref().filter(|_| given.starts_with("flt.")) else {
                return ApiError::unauthorized("invalid bearer token").into_response();
            };
            match signer.verify(given, std::time::SystemTime::now()) {
                Ok((TokenKind::Join, _)) => Principal::Join,
                Ok((TokenKind::Gateway, subject)) => Principal::GatewayToken(subject),
                Err(e) => return ApiError::unauthorized(e.to_string()).into_response(),
            }
        }
        (None, Some(id)) => match id.role {
            Role::Node => Principal::Node(id.name),
            Role::Gateway => Principal::Gateway(id.name),
        },
        (None, None) => {
            return ApiError::unauthorized(
                "missing credentials: a bearer token (Authorization: Bearer <token>) or a member certificate",
            )
            .into_response();
        }
    };
    let uri = request.uri();
    if let Err(why) = crate::auth::allowed(&principal, request.method(), uri.path(), uri.query()) {
        return ApiError::forbidden(why).into_response();
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Request id, latency metrics, access log, and rendering of error bodies.
async fn observe(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let path = request.uri().path().to_string();
    let mut response = next.run(request).await;
    if let Some(error) = response.extensions_mut().remove::<ApiError>() {
        let status = error.status;
        tracing::info!(request_id = %id, %method, %path, status = status.as_u16(), error = %error.message, "request failed");
        let reason = error.reason;
        let body = serde_json::json!({ "error": error, "requestId": id });
        response = (status, Json(body)).into_response();
        // Clients fail over on a 503, unless it is the store's: every server would say so.
        if let Ok(v) = HeaderValue::from_str(reason) {
            response
                .headers_mut()
                .insert(flotilla_store::servers::REASON_HEADER, v);
        }
    } else if let Some(rejection) = rejection_message(&mut response).await {
        let status = response.status();
        let reason = match status.as_u16() {
            405 => "MethodNotAllowed",
            413 => "PayloadTooLarge",
            415 => "UnsupportedMediaType",
            422 => "Invalid",
            _ => "BadRequest",
        };
        let error = ApiError::new(status, reason, rejection);
        tracing::info!(request_id = %id, %method, %path, status = status.as_u16(), error = %error.message, "request rejected");
        response = (
            status,
            Json(serde_json::json!({ "error": error, "requestId": id })),
        )
            .into_response();
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let status_class = format!("{}xx", response.status().as_u16() / 100);
    state
        .latency
        .get_or_create(&RequestLabels {
            method,
            route,
            status_class,
        })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// axum's own rejections (bad query string, body too large, …) are plain text: turn them
/// into the same JSON error shape as ours.
async fn rejection_message(response: &mut Response) -> Option<String> {
    let status = response.status();
    if !(status.is_client_error()) {
        return None;
    }
    let is_text = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !is_text {
        return None;
    }
    let body = std::mem::replace(response.body_mut(), Body::empty());
    let bytes = axum::body::to_bytes(body, 64 * 1024).await.ok()?;
    Some(String::from_utf8_lossy(&bytes).trim().to_string())
}

fn request_id() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}

// ------------------------------------------------------------------------------------------
// Helpers shared by the handlers

/// A JSON request body, or a 400 naming where it is malformed.
pub(super) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid request body at line {} column {}: {e}",
            e.line(),
            e.column()
        ))
        .with_field("body")
    })
}

#[derive(Debug, Serialize)]
pub(super) struct List<T> {
    pub(super) items: Vec<T>,
    /// Store revision the list was read at; watch from it.
    #[serde(rename = "resourceVersion")]
    pub(super) resource_version: Revision,
}

pub(super) fn selector(query: &BTreeMap<String, String>) -> ApiResult<Selector> {
    match query.get("labelSelector") {
        None => Ok(Selector::default()),
        Some(s) => Selector::parse(s)
            .map_err(|m| ApiError::bad_request(m).with_field("query.labelSelector")),
    }
}

pub(super) fn flag(query: &BTreeMap<String, String>, name: &str) -> ApiResult<bool> {
    match query.get(name).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "query parameter {name} must be true or false, not {other:?}"
        ))
        .with_field(format!("query.{name}"))),
    }
}

pub(super) fn number<T: std::str::FromStr>(
    query: &BTreeMap<String, String>,
    name: &str,
) -> ApiResult<Option<T>> {
    match query.get(name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "query parameter {name} must be a non-negative integer, not {v:?}"
            ))
            .with_field(format!("query.{name}"))
        }),
    }
}

pub(super) fn ndjson_line<T: Serialize>(value: &T) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    Bytes::from(line)
}

/// Sends one chunk of a streaming response unless the server shuts down first: a client that
/// stops reading must not keep the server from exiting. False means stop streaming.
pub(super) async fn send_chunk(
    tx: &mpsc::Sender<Bytes>,
    chunk: Bytes,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        sent = tx.send(chunk) => sent.is_ok(),
    }
}

pub(super) fn stream_response(rx: mpsc::Receiver<Bytes>, content_type: &'static str) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut response = Body::from_stream(stream).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

// ------------------------------------------------------------------------------------------
// Misc

/// `GET /api/v1/gateway`: what the in-process gateway was started with (its settings are read
/// at start; `apply` compares a file's `[gateway]` table with it).
async fn gateway_info(State(state): State<ApiState>) -> ApiResult<Json<serde_json::Value>> {
    match &state.gateway {
        Some(digest) => Ok(Json(serde_json::json!({ "sectionDigest": &**digest }))),
        None => Err(ApiError::not_found("this server runs no gateway")),
    }
}

async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "api": "v1" }))
}

async fn openapi() -> Response {
    let mut response = crate::openapi::DOCUMENT.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
