//! `/api/v1/events`, plain and followed.

use super::*;

pub(super) fn event_matches(e: &Event, query: &BTreeMap<String, String>) -> bool {
    query
        .get("kind")
        .is_none_or(|k| k.eq_ignore_ascii_case(&e.involved.kind))
        && query.get("name").is_none_or(|n| n == &e.involved.name)
}

/// Events, oldest first. `follow=true` streams them as NDJSON, then new ones as they happen.
/// `since=REV` leaves out the events recorded at or before store revision `REV` (each event's
/// `metadata.resourceVersion`): a client that lost its stream resumes where it was, across a
/// restart of the server too, since events are stored.
pub(super) async fn list_events(
    State(state): State<ApiState>,
    Query(query): Query<BTreeMap<String, String>>,
) -> ApiResult<Response> {
    let follow = flag(&query, "follow")?;
    let since: u64 = number(&query, "since")?.unwrap_or(0);
    let (items, rev) = typed::list::<Event>(&*state.store).await?;
    let items: Vec<Event> = items
        .into_iter()
        .filter(|e| e.metadata.resource_version > since && event_matches(e, &query))
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
