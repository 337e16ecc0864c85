//! The HTTP + JSON API (axum). Every route except `/healthz` needs the bearer token.

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
use flotilla_spec::{
    Event, EventType, Instance, Object, ObjectMeta, Revision as ServiceRevision, Service,
    ServiceSpec, annotations,
};
use flotilla_store::{Revision, Store, StoreError, WatchEvent, typed};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiResult, FieldProblem};
use crate::selector::Selector;
use flotilla_store::events;

/// Read-modify-write attempts of an apply without a resourceVersion.
const APPLY_ATTEMPTS: usize = 16;

/// A short random pause between attempts, so contending writers spread out.
async fn backoff() {
    use rand::Rng;
    let ms = rand::rng().random_range(1..=5);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

/// Held across the route check and the write of an apply.
static APPLY_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Largest accepted request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Buffered chunks per streaming response.
const STREAM_BUFFER: usize = 64;

/// Where the API reads instance logs from (the agent's files in `flotilla up`).
#[async_trait]
pub trait LogSource: Send + Sync + 'static {
    async fn read(&self, instance: &str, tail: Option<usize>) -> Result<Vec<u8>, String>;
    /// Streams the log from `tail` lines back, then new output, until `shutdown`.
    fn follow(
        &self,
        instance: &str,
        tail: Option<usize>,
        shutdown: CancellationToken,
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
    token: Arc<str>,
    logs: Arc<dyn LogSource>,
    latency: Family<RequestLabels, Histogram>,
    shutdown: CancellationToken,
}

impl ApiState {
    pub fn new(
        store: Arc<dyn Store>,
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
            store,
            token: token.into(),
            logs,
            latency,
            shutdown,
        }
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
        .route("/api/v1/events", get(list_events))
        .route("/api/v1/watch/{kind}", get(watch))
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

/// Bearer-token check, constant time in the token's length.
async fn auth(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => ApiError::unauthorized("missing bearer token (Authorization: Bearer <token>)")
            .into_response(),
        Some(t) if !constant_time_eq(t.trim().as_bytes(), state.token.as_bytes()) => {
            ApiError::unauthorized("invalid bearer token").into_response()
        }
        Some(_) => next.run(request).await,
    }
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
        tracing::info!(request_id = %id, %method, %path, status = status.as_u16(), message = %error.message, "request failed");
        let body = serde_json::json!({ "error": error, "requestId": id });
        response = (status, Json(body)).into_response();
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
        tracing::info!(request_id = %id, %method, %path, status = status.as_u16(), message = %error.message, "request rejected");
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
// Services

#[derive(Debug, Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ApplyResult {
    Created,
    Configured,
    Unchanged,
}

#[derive(Debug, Serialize)]
struct ApplyResponse {
    result: ApplyResult,
    service: Service,
}

/// Parses an apply body (a `Service` object); every error names the field path and the
/// line:col in the body.
fn parse_apply(body: &[u8]) -> ApiResult<Service> {
    flotilla_spec::parse_service_object_json(body).map_err(|errors| {
        let problems: Vec<FieldProblem> = errors
            .0
            .iter()
            .map(|e| FieldProblem {
                field: if e.path.is_empty() {
                    "body".to_string()
                } else {
                    e.path.clone()
                },
                message: format!("line {} column {}: {}", e.line, e.col, e.message),
            })
            .collect();
        if errors.0.iter().all(|e| e.path.is_empty()) {
            let mut error = ApiError::bad_request(format!(
                "malformed request body: {}",
                problems
                    .iter()
                    .map(|p| p.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
            error.details = problems;
            error
        } else {
            validation_error(problems)
        }
    })
}

fn validation_error(problems: Vec<FieldProblem>) -> ApiError {
    let summary = problems
        .iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect::<Vec<_>>()
        .join("; ");
    let mut error = ApiError::invalid(format!("invalid service: {summary}"));
    error.field = problems.first().map(|p| p.field.clone());
    error.details = problems;
    error
}

/// Create or update a service from a `{metadata, spec}` body.
async fn apply_service(State(state): State<ApiState>, body: Bytes) -> ApiResult<Response> {
    let service = parse_apply(&body)?;
    let request = ApplyRequest {
        name: service.metadata.name,
        labels: service.metadata.labels,
        annotations: service.metadata.annotations,
        resource_version: Some(service.metadata.resource_version),
        spec: service.spec,
    };
    let (result, service) = apply(&*state.store, request, "api").await?;
    let status = if result == ApplyResult::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(ApplyResponse { result, service })).into_response())
}

/// A service to create or update.
#[derive(Debug, Clone)]
pub struct ApplyRequest {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// When set (non-zero), the apply only succeeds if the stored object has this version.
    pub resource_version: Option<u64>,
    pub spec: ServiceSpec,
}

impl ApplyRequest {
    pub fn new(name: impl Into<String>, spec: ServiceSpec) -> Self {
        Self {
            name: name.into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            resource_version: None,
            spec,
        }
    }
}

/// The change cause a revision records for an apply from `source`: `rollout history` tells a
/// deploy from `up`'s file apart from one made through the API.
fn apply_cause(source: &str) -> &'static str {
    if source == "up" { "up -f" } else { "apply" }
}

/// Validates and stores a service: the one path for the API and for `flotilla up`'s file.
/// An apply that changes nothing writes nothing.
pub async fn apply(
    store: &dyn Store,
    request: ApplyRequest,
    source: &str,
) -> ApiResult<(ApplyResult, Service)> {
    let ApplyRequest {
        name,
        labels,
        annotations,
        resource_version,
        spec,
    } = request;

    let mut problems: Vec<FieldProblem> = flotilla_spec::validate_name(&name)
        .err()
        .into_iter()
        .map(|message| FieldProblem {
            field: "metadata.name".to_string(),
            message,
        })
        .collect();
    problems.extend(
        flotilla_spec::validate_spec(&spec)
            .into_iter()
            .map(|e| FieldProblem {
                field: format!("spec.{}", e.path),
                message: e.message,
            }),
    );
    if !problems.is_empty() {
        return Err(validation_error(problems));
    }

    // Applies are serialized so the route check below and the write are one step: two
    // concurrent applies cannot both claim a route. (Process-wide: one API server per store
    // today; across servers this becomes a store transaction.)
    let _serialized = APPLY_LOCK.lock().await;

    // Routes must not collide with another service's.
    let (others, _) = typed::list::<Service>(store).await?;
    let mut all: Vec<(&str, &ServiceSpec)> = others
        .iter()
        .filter(|s| s.metadata.name != name)
        .map(|s| (s.metadata.name.as_str(), &s.spec))
        .collect();
    all.push((&name, &spec));
    let clashes: Vec<FieldProblem> = flotilla_spec::validate_routes_across(&all)
        .into_iter()
        .filter(|c| c.service == name)
        .map(|c| {
            let e = c.to_field_error();
            FieldProblem {
                field: format!("spec.{}", e.path),
                message: e.message,
            }
        })
        .collect();
    if !clashes.is_empty() {
        return Err(validation_error(clashes));
    }

    let version_given = resource_version.filter(|v| *v != 0);
    for _ in 0..APPLY_ATTEMPTS {
        match typed::get::<Service>(store, &name).await? {
            None => {
                if version_given.is_some() {
                    return Err(ApiError::conflict(format!(
                        "service {name} does not exist (resourceVersion given)"
                    ))
                    .with_field("metadata.resourceVersion"));
                }
                let mut metadata = ObjectMeta::named(&name);
                metadata.labels = labels.clone();
                metadata.annotations = annotations.clone();
                metadata
                    .annotations
                    .retain(|k, _| !k.starts_with(annotations::PREFIX));
                metadata.annotations.insert(
                    annotations::CHANGE_CAUSE.to_string(),
                    apply_cause(source).to_string(),
                );
                let service = Service {
                    metadata,
                    spec: spec.clone(),
                    status: Default::default(),
                };
                let created = match typed::create(store, service).await {
                    Ok(s) => s,
                    // Created concurrently: read it and apply over it.
                    Err(StoreError::Conflict { .. }) => {
                        backoff().await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                return Ok(applied(store, source, ApplyResult::Created, created).await);
            }
            Some(mut current) => {
                if let Some(rv) = version_given
                    && rv != current.metadata.resource_version
                {
                    return Err(ApiError::conflict(format!(
                        "service {name} is at resourceVersion {}, not {rv}; read it again and retry",
                        current.metadata.resource_version
                    ))
                    .with_field("metadata.resourceVersion"));
                }
                let (spec, labels, annotations) =
                    (spec.clone(), labels.clone(), annotations.clone());
                let spec_changed = current.spec != spec;
                // Annotations flotilla manages (pause, restart token, change cause) are kept: the
                // user's file does not know them.
                let mut annotations = annotations;
                annotations.retain(|k, _| !k.starts_with(annotations::PREFIX));
                for (k, v) in &current.metadata.annotations {
                    if k.starts_with(annotations::PREFIX) {
                        annotations.insert(k.clone(), v.clone());
                    }
                }
                if !spec_changed
                    && current.metadata.labels == labels
                    && current.metadata.annotations == annotations
                {
                    return Ok((ApplyResult::Unchanged, current));
                }
                if spec_changed {
                    current.metadata.generation += 1;
                    annotations.insert(
                        annotations::CHANGE_CAUSE.to_string(),
                        apply_cause(source).to_string(),
                    );
                }
                current.spec = spec;
                current.metadata.labels = labels;
                current.metadata.annotations = annotations;
                // Compare-and-swap on the version we read. Without a resourceVersion from the
                // client, a concurrent write (the controller's status, say) only means "read
                // again"; with one, the client asked to fail.
                let updated = match typed::update(store, current).await {
                    Ok(u) => u,
                    Err(StoreError::Conflict { .. }) if version_given.is_none() => {
                        backoff().await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                return Ok(applied(store, source, ApplyResult::Configured, updated).await);
            }
        }
    }
    Err(ApiError::conflict(format!(
        "service {name} kept changing while it was applied; try again"
    )))
}

/// Records the event of a stored apply and hands back its result.
async fn applied(
    store: &dyn Store,
    source: &str,
    result: ApplyResult,
    service: Service,
) -> (ApplyResult, Service) {
    let what = if result == ApplyResult::Created {
        "created"
    } else {
        "configured"
    };
    let message = format!(
        "service {what} (generation {})",
        service.metadata.generation
    );
    events::record(
        store,
        Service::KIND,
        &service.metadata.name,
        EventType::Normal,
        "Applied",
        message,
        source,
    )
    .await;
    (result, service)
}

#[derive(Debug, Serialize)]
struct List<T> {
    items: Vec<T>,
    /// Store revision the list was read at; watch from it.
    #[serde(rename = "resourceVersion")]
    resource_version: Revision,
}

fn selector(query: &BTreeMap<String, String>) -> ApiResult<Selector> {
    match query.get("labelSelector") {
        None => Ok(Selector::default()),
        Some(s) => Selector::parse(s)
            .map_err(|m| ApiError::bad_request(m).with_field("query.labelSelector")),
    }
}

async fn list_services(
    State(state): State<ApiState>,
    Query(query): Query<BTreeMap<String, String>>,
) -> ApiResult<Json<List<Service>>> {
    let sel = selector(&query)?;
    let (items, rev) = typed::list::<Service>(&*state.store).await?;
    Ok(Json(List {
        items: items
            .into_iter()
            .filter(|s| sel.matches(&s.metadata.labels))
            .collect(),
        resource_version: rev,
    }))
}

/// `GET /api/v1/{kind}/{name}` for any stored kind.
async fn get_object<T: Object>(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<T>> {
    typed::get::<T>(&*state.store, &name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("{} {name} not found", T::KIND.to_lowercase())))
}

async fn delete_service(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Service>> {
    let deleted = typed::delete::<Service>(&*state.store, &name, None)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("service {name} not found")))?;
    events::record(
        &*state.store,
        Service::KIND,
        &name,
        EventType::Normal,
        "Deleted",
        "service deleted; its instances are stopping",
        "api",
    )
    .await;
    Ok(Json(deleted))
}

// ------------------------------------------------------------------------------------------
// Rollouts

/// The service's revisions, oldest first.
async fn revisions_of(store: &dyn Store, name: &str) -> ApiResult<Vec<ServiceRevision>> {
    let (all, _) = typed::list::<ServiceRevision>(store).await?;
    let mut mine: Vec<ServiceRevision> =
        all.into_iter().filter(|r| r.spec.service == name).collect();
    mine.sort_by_key(|r| r.spec.number);
    Ok(mine)
}

async fn existing_service(store: &dyn Store, name: &str) -> ApiResult<Service> {
    typed::get::<Service>(store, name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("service {name} not found")))
}

async fn list_revisions(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<List<ServiceRevision>>> {
    let service = existing_service(&*state.store, &name).await?;
    Ok(Json(List {
        items: revisions_of(&*state.store, &name).await?,
        resource_version: service.metadata.resource_version,
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RollbackBody {
    /// Revision to return to; default: the one before the current revision.
    #[serde(default)]
    to_revision: Option<u64>,
}

/// `rollout undo`: the service's spec becomes that of an earlier revision (a new revision
/// records it), through the same compare-and-swap as any write.
async fn rollback(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Service>> {
    let body: RollbackBody = if body.iter().all(u8::is_ascii_whitespace) {
        RollbackBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "invalid rollback request at line {} column {}: {e}",
                e.line(),
                e.column()
            ))
            .with_field("body")
        })?
    };
    let service = existing_service(&*state.store, &name).await?;
    let history = revisions_of(&*state.store, &name).await?;
    let current = service.status.revision;
    let target = match body.to_revision {
        Some(n) => history.iter().find(|r| r.spec.number == n).ok_or_else(|| {
            let known: Vec<String> = history.iter().map(|r| r.spec.number.to_string()).collect();
            ApiError::not_found(format!(
                "service {name} has no revision {n} (kept: {})",
                known.join(", ")
            ))
            .with_field("toRevision")
        })?,
        None => history
            .iter()
            .rev()
            .find(|r| r.spec.number < current)
            .ok_or_else(|| {
                ApiError::conflict(format!(
                    "service {name} has no revision before {current} to go back to"
                ))
            })?,
    };
    if target.spec.template_hash == crate::rollout::target_hash(&service) {
        return Err(ApiError::conflict(format!(
            "service {name} already runs the spec of revision {}",
            target.spec.number
        )));
    }
    let number = target.spec.number;
    let mut updated = service.clone();
    crate::controller::restore_template(
        &mut updated,
        &target.spec.template,
        target.spec.restart_token.as_deref(),
        &format!("rollback to revision {number}"),
    );
    let updated = typed::update(&*state.store, updated).await?;
    events::record(
        &*state.store,
        Service::KIND,
        &name,
        EventType::Normal,
        "RollbackRequested",
        format!("returning to the spec of revision {number}"),
        "api",
    )
    .await;
    Ok(Json(updated))
}

/// Sets or clears a flotilla-managed annotation with compare-and-swap; returns the service.
async fn set_annotation(
    state: &ApiState,
    name: &str,
    key: &str,
    value: Option<String>,
    cause: Option<&str>,
) -> ApiResult<Service> {
    let updated = typed::modify::<Service>(&*state.store, name, |s| {
        let ann = &mut s.metadata.annotations;
        let before = ann.clone();
        match &value {
            Some(v) => {
                ann.insert(key.to_string(), v.clone());
            }
            None => {
                ann.remove(key);
            }
        }
        if let Some(c) = cause {
            ann.insert(annotations::CHANGE_CAUSE.to_string(), c.to_string());
        }
        *ann != before
    })
    .await?;
    match updated {
        Some(s) => Ok(s),
        None => existing_service(&*state.store, name).await,
    }
}

async fn pause(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Service>> {
    existing_service(&*state.store, &name).await?;
    let s = set_annotation(
        &state,
        &name,
        annotations::PAUSED,
        Some("true".into()),
        None,
    )
    .await?;
    Ok(Json(s))
}

async fn resume(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Service>> {
    existing_service(&*state.store, &name).await?;
    let s = set_annotation(&state, &name, annotations::PAUSED, None, None).await?;
    Ok(Json(s))
}

/// A rolling restart: new instances of the same spec, one revision later.
async fn restart(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Service>> {
    existing_service(&*state.store, &name).await?;
    let token = flotilla_spec::now_rfc3339();
    let s = set_annotation(
        &state,
        &name,
        annotations::RESTARTED_AT,
        Some(token),
        Some("restart"),
    )
    .await?;
    events::record(
        &*state.store,
        Service::KIND,
        &name,
        EventType::Normal,
        "RestartRequested",
        "rolling restart requested",
        "api",
    )
    .await;
    Ok(Json(s))
}

// ------------------------------------------------------------------------------------------
// Instances

async fn list_instances(
    State(state): State<ApiState>,
    Query(query): Query<BTreeMap<String, String>>,
) -> ApiResult<Json<List<Instance>>> {
    let sel = selector(&query)?;
    let service = query.get("service");
    let (items, rev) = typed::list::<Instance>(&*state.store).await?;
    Ok(Json(List {
        items: items
            .into_iter()
            .filter(|i| service.is_none_or(|s| &i.spec.service == s))
            .filter(|i| sel.matches(&i.metadata.labels))
            .collect(),
        resource_version: rev,
    }))
}

// ------------------------------------------------------------------------------------------
// Events, watches, logs

fn flag(query: &BTreeMap<String, String>, name: &str) -> ApiResult<bool> {
    match query.get(name).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "query parameter {name} must be true or false, not {other:?}"
        ))
        .with_field(format!("query.{name}"))),
    }
}

fn number<T: std::str::FromStr>(
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

fn event_matches(e: &Event, query: &BTreeMap<String, String>) -> bool {
    query
        .get("kind")
        .is_none_or(|k| k.eq_ignore_ascii_case(&e.involved.kind))
        && query.get("name").is_none_or(|n| n == &e.involved.name)
}

fn ndjson_line<T: Serialize>(value: &T) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    Bytes::from(line)
}

/// Sends one chunk of a streaming response unless the server shuts down first: a client that
/// stops reading must not keep the server from exiting. False means stop streaming.
async fn send_chunk(tx: &mpsc::Sender<Bytes>, chunk: Bytes, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        sent = tx.send(chunk) => sent.is_ok(),
    }
}

fn stream_response(rx: mpsc::Receiver<Bytes>, content_type: &'static str) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut response = Body::from_stream(stream).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Events, oldest first. `follow=true` streams them as NDJSON, then new ones as they happen.
async fn list_events(
    State(state): State<ApiState>,
    Query(query): Query<BTreeMap<String, String>>,
) -> ApiResult<Response> {
    let follow = flag(&query, "follow")?;
    let (items, rev) = typed::list::<Event>(&*state.store).await?;
    let items: Vec<Event> = items
        .into_iter()
        .filter(|e| event_matches(e, &query))
        .collect();
    if !follow {
        return Ok(Json(List {
            items,
            resource_version: rev,
        })
        .into_response());
    }
    let mut watch = typed::watch::<Event>(&*state.store, rev).await?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        for e in &items {
            if !send_chunk(&tx, ndjson_line(e), &shutdown).await {
                return;
            }
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                ev = watch.next() => match ev {
                    Some(Ok(typed::TypedEvent::Put(e))) if event_matches(&e, &query) => {
                        if !send_chunk(&tx, ndjson_line(&e), &shutdown).await {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        tracing::debug!(%error, "event stream ended");
                        return;
                    }
                    None => return,
                },
            }
        }
    });
    Ok(stream_response(rx, "application/x-ndjson"))
}

#[derive(Serialize)]
struct WatchLine<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    object: serde_json::Value,
}

/// `GET /api/v1/watch/{services|instances|events}?resourceVersion=N`: NDJSON lines
/// `{"type": "ADDED"|"MODIFIED"|"DELETED", "object": …}` for every change after N (default:
/// now). If N is older than the retained history: one `{"type":"ERROR","object":{"code":410}}`
/// line, then the stream ends — relist and watch from the list's resourceVersion.
async fn watch(
    State(state): State<ApiState>,
    Path(kind): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> ApiResult<Response> {
    let prefix = match kind.as_str() {
        "services" => Service::PREFIX,
        "instances" => Instance::PREFIX,
        "events" => Event::PREFIX,
        other => {
            return Err(ApiError::not_found(format!(
                "cannot watch {other:?}: expected services, instances or events"
            )));
        }
    };
    let after: Revision =
        number(&query, "resourceVersion")?.unwrap_or_else(|| state.store.revision());
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let mut watch = match state.store.watch(prefix, after).await {
        Ok(w) => w,
        Err(StoreError::Compacted { oldest, .. }) => {
            let _ = tx.try_send(ndjson_line(&expired(after, oldest)));
            drop(tx);
            return Ok(stream_response(rx, "application/x-ndjson"));
        }
        Err(e) => return Err(e.into()),
    };
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                ev = watch.next() => ev,
            };
            let line = match ev {
                None => return,
                Some(Err(StoreError::Compacted { requested, oldest })) => {
                    send_chunk(&tx, ndjson_line(&expired(requested, oldest)), &shutdown).await;
                    return;
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "watch failed");
                    return;
                }
                Some(Ok(ev)) => watch_line(&ev),
            };
            if let Some(line) = line
                && !send_chunk(&tx, line, &shutdown).await
            {
                return;
            }
        }
    });
    Ok(stream_response(rx, "application/x-ndjson"))
}

fn expired(requested: Revision, oldest: Revision) -> WatchLine<'static> {
    WatchLine {
        kind: "ERROR",
        object: serde_json::json!({
            "code": 410,
            "reason": "Expired",
            "message": format!("resourceVersion {requested} is too old (oldest retained: {oldest}); list again"),
        }),
    }
}

fn with_version(value: &[u8], rv: Revision) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(value).unwrap_or_default();
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.insert("resourceVersion".to_string(), rv.into());
    }
    v
}

fn watch_line(ev: &WatchEvent) -> Option<Bytes> {
    let line = match ev {
        WatchEvent::Put { kv, prev } => WatchLine {
            kind: if prev.is_some() { "MODIFIED" } else { "ADDED" },
            object: with_version(&kv.value, kv.mod_revision),
        },
        WatchEvent::Delete { prev, revision, .. } => WatchLine {
            kind: "DELETED",
            object: with_version(&prev.as_ref()?.value, *revision),
        },
    };
    Some(ndjson_line(&line))
}

/// `GET /api/v1/services/{name}/logs?instance=&tail=&follow=`. Without `instance`, the logs
/// of every instance of the service, each line prefixed with `[instance]`.
async fn service_logs(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> ApiResult<Response> {
    let follow = flag(&query, "follow")?;
    let tail: Option<usize> = number(&query, "tail")?;
    let (instances, _) = typed::list::<Instance>(&*state.store).await?;
    let mut targets: Vec<String> = instances
        .iter()
        .filter(|i| i.spec.service == name)
        .map(|i| i.metadata.name.clone())
        .collect();
    if let Some(wanted) = query.get("instance") {
        if !targets.contains(wanted) {
            return Err(ApiError::not_found(format!(
                "instance {wanted} of service {name} not found"
            ))
            .with_field("query.instance"));
        }
        targets = vec![wanted.clone()];
    } else if targets.is_empty() && typed::get::<Service>(&*state.store, &name).await?.is_none() {
        return Err(ApiError::not_found(format!("service {name} not found")));
    }
    let prefixed = targets.len() > 1;

    if !follow {
        let mut out = Vec::new();
        for instance in &targets {
            let bytes = state.logs.read(instance, tail).await.map_err(|e| {
                tracing::warn!(instance, error = %e, "reading logs failed");
                ApiError::internal()
            })?;
            append_lines(&mut out, instance, &bytes, prefixed);
        }
        let mut response = Body::from(out).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return Ok(response);
    }

    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
    let shutdown = state.shutdown.child_token();
    for instance in targets {
        let mut source = state.logs.follow(&instance, tail, shutdown.clone());
        let tx = tx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let chunk = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => { shutdown.cancel(); return }
                    c = source.recv() => c,
                };
                match chunk {
                    Some(Ok(bytes)) => {
                        let mut out = Vec::with_capacity(bytes.len());
                        append_lines(&mut out, &instance, &bytes, prefixed);
                        if !send_chunk(&tx, Bytes::from(out), &shutdown).await {
                            shutdown.cancel();
                            return;
                        }
                    }
                    Some(Err(error)) => {
                        tracing::debug!(instance, %error, "log follow ended");
                        return;
                    }
                    None => return,
                }
            }
        });
    }
    drop(tx);
    Ok(stream_response(rx, "text/plain; charset=utf-8"))
}

fn append_lines(out: &mut Vec<u8>, instance: &str, bytes: &[u8], prefixed: bool) {
    if !prefixed {
        out.extend_from_slice(bytes);
        return;
    }
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(format!("[{instance}] ").as_bytes());
        out.extend_from_slice(line);
    }
}

// ------------------------------------------------------------------------------------------
// Misc

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
