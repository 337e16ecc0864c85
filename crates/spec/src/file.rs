//! A flotilla file: optional `[up]` settings for `flotilla up`, and `[service.NAME]` tables.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::service::ServiceSpec;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlotillaFile {
    /// Settings used only by `flotilla up`; ignored by `flotilla apply`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up: Option<UpConfig>,
    /// Services by name.
    #[serde(default)]
    pub service: BTreeMap<String, ServiceSpec>,
}

/// Addresses and storage of a local `flotilla up`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpConfig {
    /// API listen address (default `127.0.0.1:7070`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// Gateway listen address (default `127.0.0.1:8080`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Metrics listen address (default `127.0.0.1:9464`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// Data directory (store, logs, token); relative to the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
}
