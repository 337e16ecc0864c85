//! A read-only [`Store`] over flotilla's HTTP API: how components that run apart from the
//! control plane (`flotilla gateway`, later remote agents) consume the same trait.
//!
//! Keys map to API resources (`/registry/services/NAME` ↔ `/api/v1/services/NAME`); a list
//! returns the revision it was read at; a watch streams `/api/v1/watch/{kind}` from a revision
//! and turns the API's `410 Expired` line into [`StoreError::Compacted`], so reflectors relist
//! exactly as they do against the embedded store. Writes are refused: they go through the API's
//! own endpoints, with admission and validation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::servers::{ATTEMPT_TIMEOUT, Servers, repeatable, unavailable, unsent};
use crate::{KeyValue, ListResult, Precondition, Revision, Store, StoreError, Watch, WatchEvent};

/// The TLS configuration of a client of the API ([`flotilla_pki::client_config`]).
pub type TlsConfig = flotilla_pki::rustls::ClientConfig;

/// Events buffered per watch.
pub(crate) const WATCH_BUFFER: usize = 256;
/// A request (not a watch stream) that takes longer has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A watch stream silent for longer is taken for dead (its server is hung or cut off) and
/// resumed elsewhere: the API sends a keep-alive line every `WATCH_KEEPALIVE`.
const WATCH_SILENCE: Duration = Duration::from_secs(15);
/// How often the API writes a keep-alive line on an idle watch stream.
pub const WATCH_KEEPALIVE: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct RemoteStore {
    servers: Servers,
    token: Credential,
    /// When set, instances are read through this node's endpoints (only its own).
    node: Option<Arc<str>>,
    http: Client<flotilla_pki::Connector, Full<Bytes>>,
    revision: Arc<AtomicU64>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

fn backend(context: impl Into<String>, source: impl Into<crate::BoxError>) -> StoreError {
    StoreError::Backend {
        context: context.into(),
        source: source.into(),
    }
}

fn read_only(key: &str) -> StoreError {
    backend(
        format!("writing {key}"),
        "the remote store is read-only: write through the API",
    )
}

/// `/registry/services/` → `services`.
fn kind_of(prefix: &str) -> Result<&'static str, StoreError> {
    flotilla_spec::object::kind_of_prefix(prefix)
        .filter(|k| k.served)
        .map(|k| k.plural)
        .ok_or_else(|| {
            backend(
                format!("reading {prefix}"),
                format!(
                    "the API serves {} only",
                    flotilla_spec::object::served_plurals()
                ),
            )
        })
}

fn prefix_of(kind: &str) -> &'static str {
    flotilla_spec::object::served_kind(kind).map_or("/registry/", |k| k.prefix)
}

/// An object from the API as the store would hold it: `mod_revision` from its
/// `metadata.resourceVersion`, the value without it (the typed layer fills it in on reads).
fn to_kv(kind: &str, mut object: Value) -> Result<KeyValue, StoreError> {
    let name = object["metadata"]["name"]
        .as_str()
        .ok_or_else(|| backend(format!("reading {kind}"), "an object without metadata.name"))?
        .to_string();
    let rv = object["metadata"]["resourceVersion"].as_u64().unwrap_or(0);
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    let key = format!("{}{name}", prefix_of(kind));
    let value = serde_json::to_vec(&object).map_err(|e| StoreError::Encode {
        key: key.clone(),
        source: e,
    })?;
    Ok(KeyValue {
        key,
        value,
        create_revision: 0,
        mod_revision: rv,
        version: 0,
    })
}

/// A bearer token that its holder may replace (a node renews its credential) while every
/// clone of the store or node interface keeps using the current one.
#[derive(Clone)]
pub struct Credential(Arc<std::sync::RwLock<Arc<str>>>);

impl Credential {
    pub fn new(token: &str) -> Self {
        Self(Arc::new(std::sync::RwLock::new(token.into())))
    }

    pub fn get(&self) -> Arc<str> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn set(&self, token: &str) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = token.into();
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(..)")
    }
}

impl RemoteStore {
    /// `base` is the API's URL (`http://10.0.0.1:7070`), `token` a bearer token.
    pub fn new(base: &str, token: &str) -> Self {
        Self::with_credential(base, Credential::new(token))
    }

    /// The same with a token that may be replaced later.
    pub fn with_credential(base: &str, token: Credential) -> Self {
        Self::connect(base, token, None)
    }

    /// The API at `base` over TLS when `tls` is given (`https://`; the client certificate, if
    /// any, is in the configuration), with `token` as bearer token (none when empty). `base`
    /// may list several servers of one cluster, separated by commas: see [`Servers`].
    pub fn connect(base: &str, token: Credential, tls: Option<Arc<TlsConfig>>) -> Self {
        Self {
            servers: Servers::parse(base),
            token,
            node: None,
            http: Client::builder(TokioExecutor::new()).build(flotilla_pki::Connector::new(tls)),
            revision: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The same API, reading instances as node `node` does: only the instances bound to it.
    pub fn for_node(
        base: &str,
        token: Credential,
        node: &str,
        tls: Option<Arc<TlsConfig>>,
    ) -> Self {
        let mut store = Self::connect(base, token, tls);
        store.node = Some(node.into());
        store
    }

    /// API path of a kind's list (`instances` of a node-scoped store: the node's).
    fn list_path(&self, kind: &str) -> String {
        match (&self.node, kind) {
            (Some(node), "instances") => format!("/api/v1/nodes/{node}/instances"),
            _ => format!("/api/v1/{kind}"),
        }
    }

    /// A request to the API at `base` with the bearer token (and a JSON body, if any).
    fn build(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Request<Full<Bytes>>, StoreError> {
        let uri: Uri = format!("{base}{path}")
            .parse()
            .map_err(|e| backend(format!("building a request to {base}{path}"), e))?;
        let mut req = Request::builder().method(method).uri(uri);
        let token = self.token.get();
        if !token.is_empty() {
            if !token_is_sendable(&token) {
                return Err(backend(format!("sending a request for {path}"), BAD_TOKEN));
            }
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        req.body(Full::new(body.unwrap_or_default()))
            .map_err(|e| backend(format!("building a request for {path}"), e))
    }

    /// Sends one request and reads the whole answer, within [`REQUEST_TIMEOUT`], failing over
    /// to the next server as [`crate::servers`] describes.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), StoreError> {
        let what = format!("{method} {path}");
        let body = body.map(Bytes::from);
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let attempts = self.servers.attempts();
        let count = attempts.len();
        let mut last = None;
        for (k, (index, base)) in attempts.into_iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            // Another server may be tried after this one.
            let retry = k + 1 < count && repeatable(&method);
            let req = self.build(&base, method.clone(), path, body.clone())?;
            let attempt = self.servers.attempt(index);
            let fetch = async {
                let resp = self.http.request(req).await.map_err(|e| {
                    let again = unsent(&e) && k + 1 < count;
                    (again, backend(format!("{what} to {base}"), e))
                })?;
                let status = resp.status();
                let elsewhere = unavailable(status, resp.headers());
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| (false, backend(format!("reading the answer to {what}"), e)))?
                    .to_bytes();
                Ok((status, body, elsewhere))
            };
            let limit = if retry {
                left.min(ATTEMPT_TIMEOUT)
            } else {
                left
            };
            match tokio::time::timeout(limit, fetch).await {
                Ok(Ok((status, body, true))) if retry => {
                    last = Some(answer_error(&format!("{what} to {base}"), status, &body));
                }
                Ok(Ok((status, body, _))) => {
                    attempt.succeeded();
                    return Ok((status, body));
                }
                Ok(Err((again, error))) if again || retry => last = Some(error),
                Ok(Err((_, error))) => return Err(error),
                Err(_) if retry => last = Some(backend(format!("{what} to {base}"), "timed out")),
                Err(_) => return Err(backend(format!("{what} to {base}"), "timed out")),
            }
        }
        Err(last.unwrap_or_else(|| backend(what, "timed out")))
    }

    async fn get_json(&self, path: &str) -> Result<Option<Value>, StoreError> {
        let (status, body) = self.send(Method::GET, path, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(answer_error(&format!("GET {path}"), status, &body));
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| backend(format!("decoding GET {path}"), e))
    }

    fn seen(&self, rev: Revision) {
        self.revision.fetch_max(rev, Ordering::Relaxed);
    }
}

#[async_trait]
impl Store for RemoteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let kind = kind_of(key)?;
        let name = &key[prefix_of(kind).len()..];
        if name.is_empty() || name.contains('/') {
            return Ok(None);
        }
        match self
            .get_json(&format!("{}/{name}", self.list_path(kind)))
            .await?
        {
            None => Ok(None),
            Some(v) => {
                let kv = to_kv(kind, v)?;
                self.seen(kv.mod_revision);
                Ok(Some(kv))
            }
        }
    }

    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        let kind = kind_of(prefix)?;
        let v = self
            .get_json(&self.list_path(kind))
            .await?
            .ok_or_else(|| backend(format!("listing {kind}"), "the API has no such list"))?;
        let revision = v["resourceVersion"].as_u64().unwrap_or(0);
        let items = v["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .cloned()
                    .map(|o| to_kv(kind, o))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let items = items
            .into_iter()
            .filter(|kv| kv.key.starts_with(prefix))
            .collect();
        self.seen(revision);
        Ok(ListResult { items, revision })
    }

    async fn put(
        &self,
        key: &str,
        _value: Vec<u8>,
        _pre: Precondition,
    ) -> Result<KeyValue, StoreError> {
        Err(read_only(key))
    }

    async fn delete(&self, key: &str, _pre: Precondition) -> Result<Option<KeyValue>, StoreError> {
        Err(read_only(key))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        let kind = kind_of(prefix)?;
        let mut path = format!("/api/v1/watch/{kind}?resourceVersion={after}");
        if let (Some(node), "instances") = (&self.node, kind) {
            path.push_str(&format!("&node={node}"));
        }
        let (index, resp) = self.open_watch(&path).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let prefix = prefix.to_string();
        let me = self.clone();
        // Owned by the watch: it ends when the receiver is dropped or the stream ends. A
        // stream that ends any other way counts against its server, so that the watcher's
        // next watch (from its last revision) goes to the next one.
        tokio::spawn(async move {
            let servers = me.servers.clone();
            let attempt = servers.attempt(index);
            let mut body = resp.into_body();
            let mut decoder = WatchDecoder::new(kind, &prefix);
            loop {
                let frame = tokio::select! {
                    _ = tx.closed() => {
                        attempt.succeeded();
                        return;
                    }
                    f = tokio::time::timeout(WATCH_SILENCE, body.frame()) => f,
                };
                let Ok(frame) = frame else {
                    let silent = format!("no word from the API for {}s", WATCH_SILENCE.as_secs());
                    let _ = tx.send(Err(backend("watching", silent))).await;
                    return;
                };
                let data = match frame {
                    None => {
                        // The API restarted, or a proxy cut a long stream: not a closed store
                        // (`Closed` is permanent), so the watcher relists after a backoff.
                        let _ = tx
                            .send(Err(backend("watching", "the API ended the watch stream")))
                            .await;
                        return;
                    }
                    Some(Err(e)) => {
                        let _ = tx.send(Err(backend("reading the watch stream", e))).await;
                        return;
                    }
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => d,
                        Err(_) => continue,
                    },
                };
                decoder.push(&data);
                while let Some(event) = decoder.next_event() {
                    let event = match event {
                        Ok(ev) => ev,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    me.seen(event.revision());
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Watch { rx })
    }

    fn revision(&self) -> Revision {
        self.revision.load(Ordering::Relaxed)
    }
}

impl RemoteStore {
    /// Opens the watch stream at `path` on the first server that answers it with success:
    /// that server's index and the answer.
    async fn open_watch(
        &self,
        path: &str,
    ) -> Result<(usize, hyper::Response<hyper::body::Incoming>), StoreError> {
        let attempts = self.servers.attempts();
        let count = attempts.len();
        let mut last = None;
        for (k, (index, base)) in attempts.into_iter().enumerate() {
            let limit = if k + 1 < count {
                ATTEMPT_TIMEOUT
            } else {
                REQUEST_TIMEOUT
            };
            let req = self.build(&base, Method::GET, path, None)?;
            let attempt = self.servers.attempt(index);
            let error = match tokio::time::timeout(limit, self.http.request(req)).await {
                Err(_) => backend(format!("GET {base}{path}"), "timed out"),
                Ok(Err(e)) => backend(format!("GET {base}{path}"), e),
                Ok(Ok(resp)) if resp.status().is_success() => {
                    attempt.succeeded();
                    return Ok((index, resp));
                }
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    let elsewhere = unavailable(status, resp.headers());
                    let body = tokio::time::timeout(ATTEMPT_TIMEOUT, resp.into_body().collect())
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let error = answer_error(&format!("GET {path}"), status, &body);
                    if !elsewhere {
                        // This server answered; another would say the same.
                        attempt.succeeded();
                        return Err(error);
                    }
                    error
                }
            };
            last = Some(error);
        }
        Err(last.unwrap_or_else(|| backend(format!("GET {path}"), "no server to ask")))
    }
}

/// An unsuccessful answer as an error that keeps what the API said (its message, never the
/// token): `GET /api/v1/services: the API answered 401 Unauthorized: invalid bearer token`.
fn answer_error(what: &str, status: StatusCode, body: &[u8]) -> StoreError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    backend(
        what.to_string(),
        format!("the API answered {status}: {message}"),
    )
}

/// The node interface over the API, for an agent on another machine: the same rules as
/// [`crate::StoreNode`], which the API's node endpoints run.
#[derive(Clone, Debug)]
pub struct RemoteNode {
    api: RemoteStore,
    node: String,
}

/// Status writes retried on conflicts before giving up.
const STATUS_ATTEMPTS: usize = 16;

impl RemoteNode {
    pub fn new(base: &str, token: &str, node: &str) -> Self {
        Self::with_credential(base, Credential::new(token), node)
    }

    /// The node interface with a credential its holder renews.
    pub fn with_credential(base: &str, token: Credential, node: &str) -> Self {
        Self::connect(base, token, node, None)
    }

    /// The node interface over TLS (the node's certificate in `tls`) when `tls` is given.
    pub fn connect(base: &str, token: Credential, node: &str, tls: Option<Arc<TlsConfig>>) -> Self {
        Self {
            api: RemoteStore::for_node(base, token, node, tls),
            node: node.to_string(),
        }
    }

    fn path(&self, instance: &str) -> String {
        format!("/api/v1/nodes/{}/instances/{instance}", self.node)
    }

    /// `PUT /api/v1/nodes/{node}/{what}` with `body` as JSON.
    async fn put(&self, what: &str, body: &impl serde::Serialize) -> Result<(), crate::NodeError> {
        let path = format!("/api/v1/nodes/{}/{what}", self.node);
        let body =
            serde_json::to_vec(body).map_err(|e| backend(format!("encoding PUT {path}"), e))?;
        let (status, bytes) = self.api.send(Method::PUT, &path, Some(body)).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(answer_error(&format!("PUT {path}"), status, &bytes).into())
        }
    }
}

#[async_trait]
impl crate::NodeApi for RemoteNode {
    fn node(&self) -> &str {
        &self.node
    }

    fn instances(&self) -> Arc<dyn Store> {
        Arc::new(self.api.clone())
    }

    async fn modify_status(
        &self,
        instance: &str,
        edit: crate::node::StatusEdit<'_>,
    ) -> Result<Option<flotilla_spec::Instance>, crate::NodeError> {
        use flotilla_spec::Instance;
        for _ in 0..STATUS_ATTEMPTS {
            let Some(v) = self.api.get_json(&self.path(instance)).await? else {
                return Ok(None);
            };
            let mut current: Instance = serde_json::from_value(v)
                .map_err(|e| backend(format!("decoding instance {instance}"), e))?;
            if !edit(&mut current.status) {
                return Ok(Some(current));
            }
            let body = serde_json::json!({
                "resourceVersion": current.metadata.resource_version,
                "status": current.status,
            });
            let path = format!("{}/status", self.path(instance));
            let (status, bytes) = self
                .api
                .send(Method::PUT, &path, Some(body.to_string().into_bytes()))
                .await?;
            match status {
                s if s.is_success() => {
                    let updated: Instance = serde_json::from_slice(&bytes)
                        .map_err(|e| backend(format!("decoding PUT {path}"), e))?;
                    return Ok(Some(updated));
                }
                StatusCode::CONFLICT => continue,
                StatusCode::NOT_FOUND => return Ok(None),
                s => return Err(answer_error(&format!("PUT {path}"), s, &bytes).into()),
            }
        }
        Err(crate::NodeError::Conflict {
            instance: instance.to_string(),
            expected: 0,
        })
    }

    async fn record_event(
        &self,
        instance: &str,
        kind: flotilla_spec::EventType,
        reason: &str,
        message: &str,
    ) {
        let body = serde_json::json!({ "type": kind, "reason": reason, "message": message });
        let path = format!("{}/events", self.path(instance));
        match self
            .api
            .send(Method::POST, &path, Some(body.to_string().into_bytes()))
            .await
        {
            Ok((s, _)) if s.is_success() => {}
            Ok((s, bytes)) => {
                let error = answer_error(&format!("POST {path}"), s, &bytes);
                tracing::warn!(instance, error = %crate::error_chain(&error), "could not record event");
            }
            Err(error) => {
                tracing::warn!(instance, error = %crate::error_chain(&error), "could not record event")
            }
        }
    }

    async fn register(
        &self,
        registration: crate::node::Registration,
    ) -> Result<(), crate::NodeError> {
        self.put("registration", &registration).await
    }

    async fn renew_lease(&self, duration_seconds: u32) -> Result<(), crate::NodeError> {
        self.put(
            "lease",
            &serde_json::json!({ "durationSeconds": duration_seconds }),
        )
        .await
    }

    async fn report_conditions(
        &self,
        conditions: Vec<flotilla_spec::NodeCondition>,
    ) -> Result<(), crate::NodeError> {
        self.put(
            "conditions",
            &serde_json::json!({ "conditions": conditions }),
        )
        .await
    }

    async fn finish_deletion(&self, instance: &str) -> Result<bool, crate::NodeError> {
        let path = self.path(instance);
        let (status, bytes) = self.api.send(Method::DELETE, &path, None).await?;
        match status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            StatusCode::CONFLICT => Err(crate::NodeError::NotDeleting {
                instance: instance.to_string(),
            }),
            s => Err(answer_error(&format!("DELETE {path}"), s, &bytes).into()),
        }
    }
}

/// Longest line of a watch stream (one object): far above any real object, bounded.
const MAX_WATCH_LINE: usize = 16 << 20;

/// The body of the API's watch, as store events: NDJSON lines, however the body is framed.
struct WatchDecoder<'a> {
    kind: &'static str,
    prefix: &'a str,
    /// Bytes received and not decoded yet from `start` on; the lines before it are decoded.
    pending: Vec<u8>,
    start: usize,
    /// `pending[start..scanned]` holds no newline (`start <= scanned <= pending.len()`): a long
    /// line is searched once, however many frames it comes in.
    scanned: usize,
}

impl<'a> WatchDecoder<'a> {
    fn new(kind: &'static str, prefix: &'a str) -> Self {
        Self {
            kind,
            prefix,
            pending: Vec::new(),
            start: 0,
            scanned: 0,
        }
    }

    /// Appends a frame of the body.
    fn push(&mut self, data: &[u8]) {
        // The decoded lines go before the buffer grows: each byte is moved at most once more.
        self.pending.drain(..self.start);
        self.scanned -= self.start;
        self.start = 0;
        self.pending.extend_from_slice(data);
    }

    /// The event of the next complete line under the prefix; `None` when every complete line
    /// received is decoded. An error ends the watch.
    fn next_event(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        loop {
            let Some(at) = self
                .pending
                .get(self.scanned..)?
                .iter()
                .position(|b| *b == b'\n')
            else {
                self.scanned = self.pending.len();
                // A stream that never ends its line must not grow memory without bound.
                if self.pending.len() - self.start > MAX_WATCH_LINE {
                    self.start = self.pending.len();
                    return Some(Err(backend(
                        "watching",
                        format!("a watch line is longer than {MAX_WATCH_LINE} bytes"),
                    )));
                }
                return None;
            };
            let end = self.scanned + at + 1;
            let line = self.pending.get(self.start..end)?;
            self.start = end;
            self.scanned = end;
            match watch_event(self.kind, self.prefix, line) {
                Ok(Some(event)) => return Some(Ok(event)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// What the fuzz targets (`fuzz/`) drive; not part of the store's API.
#[doc(hidden)]
pub mod fuzzing {
    use super::{StoreError, WatchDecoder, WatchEvent, kind_of};

    /// What a watch of `prefix` yields for a body that comes in `frames`: its events, up to and
    /// with the error that ends it.
    pub fn watch_stream<'f>(
        prefix: &str,
        frames: impl IntoIterator<Item = &'f [u8]>,
    ) -> Vec<Result<WatchEvent, StoreError>> {
        let kind = match kind_of(prefix) {
            Ok(kind) => kind,
            Err(e) => return vec![Err(e)],
        };
        let mut decoder = WatchDecoder::new(kind, prefix);
        let mut events = Vec::new();
        for frame in frames {
            decoder.push(frame);
            while let Some(event) = decoder.next_event() {
                let failed = event.is_err();
                events.push(event);
                if failed {
                    return events;
                }
            }
        }
        events
    }

    /// One line of a watch of `prefix`, decoded on its own.
    pub fn watch_line(prefix: &str, line: &[u8]) -> Result<Option<WatchEvent>, StoreError> {
        super::watch_event(kind_of(prefix)?, prefix, line)
    }
}

/// One NDJSON line of the API's watch as a store event (`None`: not under `prefix`).
fn watch_event(kind: &str, prefix: &str, line: &[u8]) -> Result<Option<WatchEvent>, StoreError> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| backend("decoding a watch event", e))?;
    let object = v["object"].clone();
    match v["type"].as_str() {
        Some("ERROR") => {
            let code = object["code"].as_u64().unwrap_or(0);
            if code == 410 {
                return Err(StoreError::Compacted {
                    requested: 0,
                    oldest: 0,
                });
            }
            Err(backend(
                "watching",
                format!("the API ended the watch: {}", object["message"]),
            ))
        }
        Some("ADDED") | Some("MODIFIED") => {
            let kv = to_kv(kind, object)?;
            if !kv.key.starts_with(prefix) {
                return Ok(None);
            }
            // A previous value is not sent by the API; its presence only marks an update.
            let prev = (v["type"] == "MODIFIED").then(|| kv.clone());
            Ok(Some(WatchEvent::Put { kv, prev }))
        }
        Some("DELETED") => {
            let kv = to_kv(kind, object)?;
            if !kv.key.starts_with(prefix) {
                return Ok(None);
            }
            Ok(Some(WatchEvent::Delete {
                key: kv.key.clone(),
                revision: kv.mod_revision,
                prev: Some(kv),
            }))
        }
        _ => Ok(None),
    }
}

/// Why a token cannot be sent (the token itself is never shown: it is a secret).
pub const BAD_TOKEN: &str = "the token holds a space, a line break or another character no flotilla token has: copy it again, without what was printed around it";

/// Whether `token` can travel in an `Authorization` header: every flotilla token is printable
/// ASCII without spaces, so anything else is a copying mistake, told as such.
pub fn token_is_sendable(token: &str) -> bool {
    token.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::fuzzing::watch_stream;
    use super::*;

    const PREFIX: &str = "/registry/services/";

    fn line(kind: &str, name: &str, rv: u64) -> String {
        format!(
            "{{\"type\":\"{kind}\",\"object\":{{\"metadata\":{{\"name\":\"{name}\",\"resourceVersion\":{rv}}},\"spec\":{{}}}}}}\n"
        )
    }

    fn revisions(events: &[Result<WatchEvent, StoreError>]) -> Vec<Result<Revision, String>> {
        events
            .iter()
            .map(|e| match e {
                Ok(ev) => Ok(ev.revision()),
                Err(e) => Err(e.to_string()),
            })
            .collect()
    }

    #[test]
    fn watch_lines_are_decoded_however_the_body_is_framed() {
        let body = [
            line("ADDED", "a", 3),
            line("MODIFIED", "a", 4),
            line("DELETED", "a", 5),
        ]
        .concat();
        let whole = watch_stream(PREFIX, [body.as_bytes()]);
        assert_eq!(revisions(&whole), [Ok(3), Ok(4), Ok(5)]);
        let bytes: Vec<&[u8]> = body.as_bytes().chunks(1).collect();
        assert_eq!(revisions(&watch_stream(PREFIX, bytes)), revisions(&whole));
        let (a, b) = body.as_bytes().split_at(body.len() / 2 + 1);
        assert_eq!(
            revisions(&watch_stream(PREFIX, [a, b, &[][..]])),
            revisions(&whole)
        );
        // A line not yet ended is not decoded; ADDED carries no previous value, MODIFIED does.
        let events = watch_stream(PREFIX, [body.as_bytes(), b"{\"type\":"]);
        assert_eq!(events.len(), 3);
        assert!(matches!(&events[0], Ok(WatchEvent::Put { prev: None, .. })));
        assert!(matches!(
            &events[1],
            Ok(WatchEvent::Put { prev: Some(_), .. })
        ));
        assert!(
            matches!(&events[2], Ok(WatchEvent::Delete { key, .. }) if key == "/registry/services/a")
        );
    }

    #[test]
    fn watch_stream_ends_at_its_first_error() {
        let expired = "{\"type\":\"ERROR\",\"object\":{\"code\":410,\"reason\":\"Expired\"}}\n";
        let body = [line("ADDED", "a", 3), expired.into(), line("ADDED", "b", 4)].concat();
        let events = watch_stream(PREFIX, [body.as_bytes()]);
        assert_eq!(events.len(), 2);
        assert!(matches!(events[1], Err(StoreError::Compacted { .. })));
        // Not JSON, and an object without a name: errors too. Unknown types are skipped, and
        // so are objects outside a narrower prefix.
        let events = watch_stream(PREFIX, [&b"not json\n"[..]]);
        assert!(matches!(events[..], [Err(StoreError::Backend { .. })]));
        let events = watch_stream(PREFIX, [&b"{\"type\":\"ADDED\",\"object\":{}}\n"[..]]);
        assert!(matches!(events[..], [Err(StoreError::Backend { .. })]));
        let body = [
            "{\"type\":\"BOOKMARK\",\"object\":{}}\n".to_string(),
            line("ADDED", "web", 7),
            line("ADDED", "api", 8),
        ]
        .concat();
        let events = watch_stream("/registry/services/a", [body.as_bytes()]);
        assert_eq!(revisions(&events), [Ok(8)]);
    }

    #[test]
    fn a_line_that_never_ends_is_cut_not_buffered_forever() {
        let chunk = vec![b'x'; 1 << 20];
        let frames: Vec<&[u8]> = (0..17).map(|_| chunk.as_slice()).collect();
        let events = watch_stream(PREFIX, frames);
        assert_eq!(events.len(), 1);
        let error = events[0].as_ref().expect_err("cut");
        assert!(error.to_string().contains("watching"), "{error}");
    }
}
