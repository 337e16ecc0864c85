//! Recording and pruning Events.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Precondition, Store, StoreError, typed};
use flotilla_spec::{Event, EventType, Object, ObjectMeta, ObjectRef, now_rfc3339};
use rand::Rng;

/// Events kept in the store; older ones are pruned.
pub const MAX_EVENTS: usize = 1000;

/// Name for a new event: sorts chronologically, unique across writers.
pub fn event_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let suffix: u32 = rand::rng().random();
    format!("{nanos:020}-{suffix:08x}")
}

/// Stores an event. Failures are logged, never propagated: events are for people.
pub async fn record(
    store: &dyn Store,
    kind: &str,
    name: &str,
    event_type: EventType,
    reason: &str,
    message: impl Into<String>,
    source: &str,
) {
    let event = new(kind, name, event_type, reason, message, source);
    log(&event);
    if let Err(error) = typed::create(store, event).await {
        tracing::warn!(error = %crate::error_chain(&error), "could not record event");
    }
}

/// An event to store: for [`typed::write_with_event`], which writes it in the same
/// transaction as the object it is about (and logs it once written).
pub fn new(
    kind: &str,
    name: &str,
    event_type: EventType,
    reason: &str,
    message: impl Into<String>,
    source: &str,
) -> Event {
    Event {
        metadata: ObjectMeta::named(event_name()),
        involved: ObjectRef {
            kind: kind.to_string(),
            name: name.to_string(),
        },
        kind: event_type,
        reason: reason.to_string(),
        message: message.into(),
        source: source.to_string(),
        timestamp: now_rfc3339(),
    }
}

/// Logs an event, as every recorded one is.
pub(crate) fn log(event: &Event) {
    let (kind, name) = (event.involved.kind.as_str(), event.involved.name.as_str());
    let (reason, detail) = (event.reason.as_str(), event.message.as_str());
    match event.kind {
        EventType::Normal => tracing::info!(kind, name, reason, detail, "event"),
        EventType::Warning => tracing::warn!(kind, name, reason, detail, "event"),
    }
}

/// Deletes the oldest events beyond `keep`. Returns how many were deleted.
pub async fn prune(store: &dyn Store, keep: usize) -> Result<usize, StoreError> {
    let listed = store.list(Event::PREFIX).await?;
    let excess = listed.items.len().saturating_sub(keep);
    for kv in &listed.items[..excess] {
        store.delete(&kv.key, Precondition::None).await?;
    }
    Ok(excess)
}
