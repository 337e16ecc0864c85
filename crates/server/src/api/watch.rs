//! `/api/v1/watch/{kind}`: NDJSON change streams that resume from a revision.

use super::*;

/// How often an idle watch stream carries a [`PING`] line.
pub(super) const KEEPALIVE: std::time::Duration = flotilla_store::remote::WATCH_KEEPALIVE;
const PING: &[u8] = b"{\"type\":\"PING\"}\n";

#[derive(Serialize)]
pub(super) struct WatchLine<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    object: serde_json::Value,
}

/// `GET /api/v1/watch/{services|instances|events}?resourceVersion=N`: NDJSON lines
/// `{"type": "ADDED"|"MODIFIED"|"DELETED", "object": …}` for every change after N (default:
/// now). If N is older than the retained history: one `{"type":"ERROR","object":{"code":410}}`
/// line, then the stream ends — relist and watch from the list's resourceVersion. An idle
/// stream carries `{"type":"PING"}` every [`KEEPALIVE`].
pub(super) async fn watch(
    State(state): State<ApiState>,
    Path(kind): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> ApiResult<Response> {
    let Some(info) = flotilla_spec::object::served_kind(&kind) else {
        return Err(ApiError::not_found(format!(
            "cannot watch {kind:?}: expected {}",
            flotilla_spec::object::served_plurals()
        )));
    };
    let prefix = info.prefix;
    let after: Revision =
        number(&query, "resourceVersion")?.unwrap_or_else(|| state.store.revision());
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    // `?node=` (instances only): what that node sees through the node interface.
    let source: Arc<dyn Store> = match query.get("node") {
        Some(node) if info.plural == Instance::PLURAL => {
            flotilla_store::NodeApi::instances(&super::nodes::node_api(&state, node))
        }
        Some(_) => {
            return Err(
                ApiError::bad_request("only instances can be watched by node")
                    .with_field("query.node"),
            );
        }
        None => state.store.clone(),
    };
    let mut watch = match source.watch(prefix, after).await {
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
        // A line on an idle stream, so that a client tells a quiet watch from a hung server.
        let keepalive = tokio::time::sleep(KEEPALIVE);
        tokio::pin!(keepalive);
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                () = &mut keepalive => {
                    if !send_chunk(&tx, Bytes::from_static(PING), &shutdown).await {
                        return;
                    }
                    keepalive.as_mut().reset(tokio::time::Instant::now() + KEEPALIVE);
                    continue;
                }
                ev = watch.next() => ev,
            };
            keepalive
                .as_mut()
                .reset(tokio::time::Instant::now() + KEEPALIVE);
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

pub(super) fn expired(requested: Revision, oldest: Revision) -> WatchLine<'static> {
    WatchLine {
        kind: "ERROR",
        object: serde_json::json!({
            "code": 410,
            "reason": "Expired",
            "message": format!("resourceVersion {requested} is too old (oldest retained: {oldest}); list again"),
        }),
    }
}

pub(super) fn with_version(value: &[u8], rv: Revision) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(value).unwrap_or_default();
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.insert("resourceVersion".to_string(), rv.into());
    }
    v
}

pub(super) fn watch_line(ev: &WatchEvent) -> Option<Bytes> {
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
