//! The service spec: what a user writes per service. Field reference: `docs/spec.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::quantity::{ByteSize, Dur, Millicores};

/// One service, as written under `[service.NAME]` in a flotilla file or in the API's `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Program to run: a path, or a name looked up in `PATH`.
    pub command: String,
    /// Arguments; `${PORT}`, `${PORT_<NAME>}` and `${VAR}` (from `env`) are expanded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Working directory (absolute once stored; relative paths resolve against the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// User name or numeric uid to run as (needs root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Group name or numeric gid to run as (needs root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// Named ports; the agent allocates a free host port for each, per instance, and passes it
    /// as `PORT_<NAME>` (upper-cased, `-` → `_`); the first one is also `PORT`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Probes::is_empty")]
    pub probes: Probes,
    #[serde(default)]
    pub restart: RestartSpec,
    #[serde(default)]
    pub stop: StopSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
}

fn default_replicas() -> u32 {
    1
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU limit: `"500m"` (millicores), `0.5` or `"0.5"` (cores), `2` (cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Millicores>,
    /// Memory limit: bytes as an integer, or `"64Mi"`, `"1Gi"`, `"500M"`, `"512Ki"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// Maximum number of processes/threads in the instance's cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// `RLIMIT_NOFILE` (soft and hard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probes {
    /// Gates readiness and liveness until it first succeeds; failure restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<Probe>,
    /// Failure takes the instance out of the gateway (no restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
    /// Failure restarts the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
}

impl Probes {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// One probe. Exactly one of `http`, `tcp`, `exec` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProbe>,
    #[serde(default = "Dur::zero")]
    pub initial_delay: Dur,
    #[serde(default = "Dur::ten_seconds")]
    pub period: Dur,
    #[serde(default = "Dur::one_second")]
    pub timeout: Dur,
    #[serde(default = "one")]
    pub success_threshold: u32,
    #[serde(default = "three")]
    pub failure_threshold: u32,
}

fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}

/// `GET http://127.0.0.1:<port><path>`; 2xx and 3xx are success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    #[serde(default = "root_path")]
    pub path: String,
    /// Named port; defaults to the service's first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
}

fn root_path() -> String {
    "/".to_string()
}

/// A TCP connect to the named port succeeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    /// Named port; defaults to the service's first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
}

/// A command exits 0 (run with the instance's environment and working directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecProbe {
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSpec {
    #[serde(default)]
    pub policy: RestartPolicy,
    /// Delay before the second consecutive restart; doubles each time (the first is immediate).
    #[serde(default = "Dur::default_backoff_initial")]
    pub backoff_initial: Dur,
    #[serde(default = "Dur::default_backoff_max")]
    pub backoff_max: Dur,
}

impl Default for RestartSpec {
    fn default() -> Self {
        Self {
            policy: RestartPolicy::Always,
            backoff_initial: Dur::default_backoff_initial(),
            backoff_max: Dur::default_backoff_max(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopSpec {
    /// Signal sent to the whole process group first: `SIGTERM`, `SIGINT`, `SIGQUIT`, `SIGHUP`,
    /// `SIGUSR1`, `SIGUSR2` (with or without the `SIG` prefix).
    #[serde(default = "default_stop_signal")]
    pub signal: String,
    /// Time between the stop signal and SIGKILL of everything left in the cgroup.
    #[serde(default = "Dur::ten_seconds")]
    pub grace_period: Dur,
}

fn default_stop_signal() -> String {
    "SIGTERM".to_string()
}

impl Default for StopSpec {
    fn default() -> Self {
        Self {
            signal: default_stop_signal(),
            grace_period: Dur::ten_seconds(),
        }
    }
}

/// Gateway rule: requests whose host and path prefix match go to `port` of ready instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Exact host name (port ignored); absent matches any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix, matched on whole segments (`/api` matches `/api/x`, not `/apix`).
    #[serde(default = "root_path")]
    pub path: String,
    /// Named port; defaults to the service's first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
}
