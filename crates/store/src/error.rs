//! Errors of the store and of the typed helpers.

use std::error::Error as StdError;

use crate::{Precondition, Revision};

/// Boxed source of a backend error.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A write's precondition did not hold; nothing was written.
    #[error("conflict on {key}: expected {expected:?}, found {}", describe_actual(*.actual))]
    Conflict {
        key: String,
        expected: Precondition,
        /// `mod_revision` of the key when the write was attempted (`None`: absent).
        actual: Option<Revision>,
    },
    /// A guarded write ([`crate::Store::put_unless_changed`]) found a key under its prefix
    /// written after the revision it was decided at; nothing was written.
    #[error("conflict: {prefix} changed after revision {since} (at revision {revision})")]
    Changed {
        prefix: String,
        since: Revision,
        /// The newest `mod_revision` found under the prefix.
        revision: Revision,
    },
    /// The requested revision is older than the retained event history (or the watcher fell
    /// behind): list again and watch from the list's revision.
    #[error("revision {requested} is compacted; oldest revision to watch from is {oldest}")]
    Compacted {
        requested: Revision,
        /// The smallest `after` a new watch accepts right now.
        oldest: Revision,
    },
    /// The storage backend failed (IO, corruption, a panicked blocking task).
    #[error("store backend error: {context}")]
    Backend {
        context: String,
        #[source]
        source: BoxError,
    },
    /// The store cannot be reached or cannot decide (etcd without a quorum): nothing was
    /// written, and the same request may succeed once it is back.
    #[error("the store ({store}) is unavailable: {context}")]
    Unavailable {
        /// Which store, for people: `etcd`.
        store: &'static str,
        context: String,
        #[source]
        source: BoxError,
    },
    /// A stored value could not be decoded as the expected type.
    #[error("cannot decode the value of {key}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// A value could not be encoded for storage.
    #[error("cannot encode the value of {key}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// An update needs the `resource_version` it read (compare-and-swap), and it was 0.
    #[error("update of {key} needs metadata.resourceVersion (read the object first)")]
    MissingResourceVersion { key: String },
    /// A delete event carried no previous value, so the deleted object cannot be rebuilt.
    #[error("delete event for {key} carries no previous value")]
    MissingPrevious { key: String },
    /// A key held exclusively (under a lease) by another holder.
    #[error("{key} is held by {holder}")]
    Held { key: String, holder: String },
    /// A leader-only write made after this process stopped leading: another server may lead
    /// now, so nothing was written (the write's transaction compares the leader key).
    #[error("not written: this server no longer leads ({key} changed hands)")]
    Fenced { key: String },
    /// The store has been closed.
    #[error("store is closed")]
    Closed,
}

fn describe_actual(actual: Option<Revision>) -> String {
    match actual {
        Some(rev) => format!("mod_revision {rev}"),
        None => "no key".to_owned(),
    }
}

impl StoreError {
    pub(crate) fn backend(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Backend {
            context: context.into(),
            source: source.into(),
        }
    }

    /// The store is out of reach for now (no quorum, no member answering).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// A precondition failed: re-read and retry (or report a conflict to the client).
    /// A precondition (or a guarded write's guard) did not hold: nothing was written.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            StoreError::Conflict { .. } | StoreError::Changed { .. }
        )
    }

    /// The watch cannot resume: list again.
    pub fn is_compacted(&self) -> bool {
        matches!(self, StoreError::Compacted { .. })
    }

    /// A leader-only write refused because the writer no longer leads.
    pub fn is_fenced(&self) -> bool {
        matches!(self, StoreError::Fenced { .. })
    }

    pub fn is_closed(&self) -> bool {
        matches!(self, StoreError::Closed)
    }

    /// Bad data in the store (or a type that does not match it), not a transient failure.
    pub fn is_decode(&self) -> bool {
        matches!(self, StoreError::Decode { .. })
    }

    /// Worth retrying the same request later (the backend may recover).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Backend { .. })
    }
}

/// An error and its causes, `: `-separated: what a log line needs (an error's `Display` alone
/// says what failed, not why — `GET /api/v1/services` without its `401 invalid token`).
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
