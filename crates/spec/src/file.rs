//! A flotilla file: optional `[up]` settings for `flotilla up`, an optional `[gateway]` table
//! (TLS, limits), and `[service.NAME]` tables.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::quantity::{ByteSize, Dur};
use crate::service::ServiceSpec;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlotillaFile {
    /// Settings used only by `flotilla up`; ignored by `flotilla apply`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up: Option<UpConfig>,
    /// Edge gateway settings: TLS listener and certificates, limits, access log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySection>,
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

/// `[gateway]`: how the edge gateway faces clients. Every field is optional; defaults are the
/// gateway's own (`docs/spec.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// HTTPS listen address (`IP:PORT`); needs at least one certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_listen: Option<String>,
    /// Certificates chosen by SNI; `[[gateway.certificates]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateSection>,
    #[serde(default, skip_serializing_if = "GatewayLimitsSection::is_empty")]
    pub limits: GatewayLimitsSection,
    /// One JSON line per request on the gateway's log.
    #[serde(default)]
    pub access_log: bool,
    /// How long in-flight requests may finish after shutdown begins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_grace: Option<Dur>,
    /// Threads serving client connections (default: one per available CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
}

/// One certificate (PEM chain and key files; relative paths resolve against the file's directory).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSection {
    /// Host names it serves: exact (`api.example.com`) or one-label wildcards (`*.example.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// PEM certificate chain, leaf first.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// Served to clients without SNI or asking for an unknown name (else the first certificate).
    #[serde(default)]
    pub default: bool,
}

/// `[gateway.limits]`: protection against slow, greedy or hostile clients.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayLimitsSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_read_timeout: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_handshake_timeout: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_headers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_max_concurrent_streams: Option<u32>,
}

impl GatewayLimitsSection {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// A fingerprint of a file's `[gateway]` table (`"none"` without one): `flotilla up` reports
/// the one it started with, so that `apply` can say when a file's table differs from it.
pub fn gateway_digest(section: Option<&GatewaySection>) -> String {
    match section.and_then(|s| serde_json::to_vec(s).ok()) {
        Some(bytes) => crate::content_digest(&bytes),
        None => "none".to_string(),
    }
}
