//! The agent's error type: every variant says which instance or file it is about.

use std::path::PathBuf;

use flotilla_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A file or directory operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A cgroup operation failed.
    #[error("cgroup {op} for {instance} ({}): {source}", path.display())]
    Cgroup {
        op: &'static str,
        instance: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `${VAR}` in an arg or env value could not be expanded.
    #[error("instance {instance}: cannot expand {what}: {source}")]
    Expand {
        instance: String,
        what: String,
        #[source]
        source: flotilla_spec::expand::ExpandError,
    },
    /// A user or group in the spec does not exist.
    #[error("instance {instance}: {message}")]
    Identity { instance: String, message: String },
    /// No free port could be allocated.
    #[error("instance {instance}: cannot allocate a port for {port}: {message}")]
    Port {
        instance: String,
        port: String,
        message: String,
    },
    /// A store operation failed.
    #[error("store {op} {key}: {source}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: StoreError,
    },
    /// Invalid agent configuration.
    #[error("invalid agent configuration: {0}")]
    Config(String),
    /// No log directory exists for the instance.
    #[error("log for instance {instance} not found under {}", dir.display())]
    LogNotFound { instance: String, dir: PathBuf },
}

impl AgentError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AgentError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
