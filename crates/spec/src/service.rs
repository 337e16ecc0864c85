//! The service spec: what a user writes per service. Field reference: `docs/spec.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::deploy::DeploySpec;
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
    /// At most one copy ever runs, even across a network partition: rollouts stop the old
    /// instance before starting the new one, and the instance of a lost node is replaced only
    /// once that node has stopped it itself (its lease provably expired on its own clock).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub singleton: bool,
    /// Placement priority: an instance that fits on no node may preempt (stop) instances of
    /// lower priority to make room. Default 0; between -1,000,000,000 and 1,000,000,000.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
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
    /// Which nodes the instances may run on and how they spread over them.
    #[serde(default, skip_serializing_if = "PlacementSpec::is_default")]
    pub placement: PlacementSpec,
    /// Rolling-update settings (not part of a revision).
    #[serde(default, skip_serializing_if = "DeploySpec::is_default")]
    pub deploy: DeploySpec,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
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

/// Where a service's instances may run. Resource limits (`resources`) are also what the
/// scheduler reserves on a node for each instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    /// Only nodes with all these labels (`zone = "a"`, `flotilla.dev/hostname = "web-1"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Two instances of the service on one node: `soft` (default: avoided while another node
    /// fits), `hard` (never), or `none`.
    #[serde(default, skip_serializing_if = "AntiAffinityMode::is_default")]
    pub anti_affinity: AntiAffinityMode,
    /// Spread the instances over the values of a node label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<SpreadSpec>,
    /// Taints of nodes this service may run on anyway (`{ key = "dedicated", value =
    /// "batch" }`; without `value`, any value of the key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<TolerationSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TolerationSpec {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl PlacementSpec {
    pub fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AntiAffinityMode {
    #[default]
    Soft,
    Hard,
    None,
}

impl AntiAffinityMode {
    pub fn is_default(&self) -> bool {
        *self == Self::Soft
    }
}

/// At most `max_skew` more instances in one domain (a value of `topology_key` on the nodes)
/// than in the least loaded one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpreadSpec {
    pub topology_key: String,
    #[serde(default = "default_max_skew")]
    pub max_skew: u32,
}

fn default_max_skew() -> u32 {
    1
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
#[serde(from = "ProbeFields")]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProbe>,
    pub initial_delay: Dur,
    pub period: Dur,
    /// Defaults to the shorter of 1s and `period`, so shortening a period alone stays valid.
    pub timeout: Dur,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// What a file or a request may say about a probe; defaults that depend on another field are
/// resolved in `From`, so no default can contradict a value the user set.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeFields {
    #[serde(default)]
    http: Option<HttpProbe>,
    #[serde(default)]
    tcp: Option<TcpProbe>,
    #[serde(default)]
    exec: Option<ExecProbe>,
    #[serde(default = "Dur::zero")]
    initial_delay: Dur,
    #[serde(default = "Dur::ten_seconds")]
    period: Dur,
    #[serde(default)]
    timeout: Option<Dur>,
    #[serde(default = "one")]
    success_threshold: u32,
    #[serde(default = "three")]
    failure_threshold: u32,
}

impl From<ProbeFields> for Probe {
    fn from(f: ProbeFields) -> Self {
        Self {
            http: f.http,
            tcp: f.tcp,
            exec: f.exec,
            initial_delay: f.initial_delay,
            timeout: f.timeout.unwrap_or(Dur::one_second().min(f.period)),
            period: f.period,
            success_threshold: f.success_threshold,
            failure_threshold: f.failure_threshold,
        }
    }
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
#[serde(from = "RestartFields")]
pub struct RestartSpec {
    pub policy: RestartPolicy,
    /// Delay before the second consecutive restart; doubles each time (the first is immediate).
    /// Defaults to the shorter of 100ms and `backoff_max`.
    pub backoff_initial: Dur,
    /// Defaults to the longer of 30s and `backoff_initial`.
    pub backoff_max: Dur,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartFields {
    #[serde(default)]
    policy: RestartPolicy,
    #[serde(default)]
    backoff_initial: Option<Dur>,
    #[serde(default)]
    backoff_max: Option<Dur>,
}

impl From<RestartFields> for RestartSpec {
    fn from(f: RestartFields) -> Self {
        let (initial, max) = match (f.backoff_initial, f.backoff_max) {
            (Some(i), Some(m)) => (i, m),
            (Some(i), None) => (i, Dur::default_backoff_max().max(i)),
            (None, Some(m)) => (Dur::default_backoff_initial().min(m), m),
            (None, None) => (Dur::default_backoff_initial(), Dur::default_backoff_max()),
        };
        Self {
            policy: f.policy,
            backoff_initial: initial,
            backoff_max: max,
        }
    }
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

/// Gateway rule: requests whose host, path prefix (and headers, if given) match go to `port` of
/// ready instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Exact host name (port ignored), or `*.example.com` for any subdomain; absent matches any
    /// host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix, matched on whole segments (`/api` matches `/api/x`, not `/apix`).
    #[serde(default = "root_path")]
    pub path: String,
    /// Named port; defaults to the service's first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Request headers that must all be present with exactly these values (names in any case).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Remove the matched prefix from the path sent upstream (`/api/x` → `/x`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub strip_prefix: bool,
    /// Replace the matched prefix with this path (`rewrite = "/v2"`: `/api/x` → `/v2/x`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
    /// Deadline for the upstream's response head, retries included (504 past it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// Answer plain-HTTP requests with a redirect to the same URL over HTTPS.
    #[serde(default, skip_serializing_if = "is_false")]
    pub redirect_https: bool,
    /// Protocol spoken to the instances: `http1` (default) or `h2c` (cleartext HTTP/2, for gRPC).
    #[serde(default, skip_serializing_if = "UpstreamProtocol::is_default")]
    pub upstream: UpstreamProtocol,
    /// Per-client-IP token bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
}

impl Default for RouteSpec {
    fn default() -> Self {
        Self {
            host: None,
            path: root_path(),
            port: None,
            headers: BTreeMap::new(),
            strip_prefix: false,
            rewrite: None,
            timeout: None,
            redirect_https: false,
            upstream: UpstreamProtocol::default(),
            rate_limit: None,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How the gateway talks to a route's instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge over cleartext (gRPC backends).
    H2c,
}

impl UpstreamProtocol {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A token bucket per client IP: `requests_per_second` sustained, bursts of `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub requests_per_second: u32,
    /// Bucket size; defaults to `requests_per_second`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl RateLimitSpec {
    /// The bucket size in force.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_second)
    }
}
