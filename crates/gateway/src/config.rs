//! The gateway's settings: listeners, TLS certificates and the limits that protect it from slow,
//! greedy or hostile clients. Built in code ([`GatewayConfig::new`]) or from a flotilla file's
//! `[gateway]` table ([`GatewayConfig::from_section`]).

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use flotilla_spec::{FieldError, GatewaySection, validate::validate_gateway};

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Address to accept plain-text client connections on (HTTP/1.1 and prior-knowledge h2).
    pub listen: SocketAddr,
    /// Address to accept TLS connections on (ALPN `h2` / `http/1.1`); needs [`Self::tls`].
    pub tls_listen: Option<SocketAddr>,
    /// Certificates served on [`Self::tls_listen`].
    pub tls: Option<TlsConfig>,
    /// Protection against slow, greedy or hostile clients.
    pub limits: Limits,
    /// One log line per request (written by the proxy).
    pub access_log: bool,
    /// How long in-flight requests may run on after shutdown begins (default 10 s).
    pub shutdown_grace: Duration,
    /// Balancing, passive health and retry settings (owned by the request layer).
    pub upstream: crate::balance::UpstreamPolicy,
    /// Threads serving client connections, each with its own single-threaded runtime, its own
    /// accept loop on the shared listeners and its own upstream connection pools (default: one
    /// per available CPU).
    pub workers: usize,
}

impl GatewayConfig {
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

    /// Plain text on `listen`, no TLS, default limits.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            tls_listen: None,
            tls: None,
            limits: Limits::default(),
            access_log: false,
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
            upstream: crate::balance::UpstreamPolicy::default(),
            workers: Self::default_workers(),
        }
    }

    /// One worker per CPU this process may use (its affinity and cgroup quota count).
    pub fn default_workers() -> usize {
        std::thread::available_parallelism().map_or(1, usize::from)
    }

    /// The settings of a flotilla file's `[gateway]` table, with the plain listener on
    /// `listen`. Relative certificate paths are resolved against `base_dir` (the file's
    /// directory). The section is validated again here, so a section that did not come
    /// through `parse_file` is checked too.
    pub fn from_section(
        listen: SocketAddr,
        section: &GatewaySection,
        base_dir: &Path,
    ) -> Result<Self, ConfigError> {
        let errors = validate_gateway(section);
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        let mut config = Self::new(listen);
        config.access_log = section.access_log;
        if let Some(grace) = section.shutdown_grace {
            config.shutdown_grace = grace.0;
        }
        if let Some(workers) = section.workers {
            config.workers = workers as usize;
        }
        if let Some(addr) = &section.tls_listen {
            let addr = addr
                .parse()
                .map_err(|_| ConfigError::Address(addr.clone()))?;
            config.tls_listen = Some(addr);
            config.tls = Some(TlsConfig {
                certificates: section
                    .certificates
                    .iter()
                    .map(|c| CertificateFiles {
                        hosts: c.hosts.clone(),
                        cert: resolve(base_dir, &c.cert),
                        key: resolve(base_dir, &c.key),
                        default: c.default,
                    })
                    .collect(),
                reload_interval: TlsConfig::DEFAULT_RELOAD_INTERVAL,
            });
        }
        let l = &section.limits;
        let d = &mut config.limits;
        let set = |target: &mut Duration, value: Option<flotilla_spec::Dur>| {
            if let Some(v) = value {
                *target = v.0;
            }
        };
        set(&mut d.header_read_timeout, l.header_read_timeout);
        set(&mut d.idle_timeout, l.idle_timeout);
        set(&mut d.tls_handshake_timeout, l.tls_handshake_timeout);
        if let Some(v) = l.max_header_bytes {
            d.max_header_bytes = usize::try_from(v.0).unwrap_or(usize::MAX);
        }
        if let Some(v) = l.max_headers {
            d.max_headers = v as usize;
        }
        if let Some(v) = l.max_body_bytes {
            d.max_body_bytes = v.0;
        }
        if let Some(v) = l.max_connections {
            d.max_connections = v as usize;
        }
        if let Some(v) = l.h2_max_concurrent_streams {
            d.h2_max_concurrent_streams = v;
        }
        Ok(config)
    }
}

/// `base/path` for a relative `path` (without `.` components), `path` itself if absolute.
fn resolve(base: &Path, path: &str) -> PathBuf {
    let joined = base.join(path);
    joined
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid [gateway] table: {}", describe(.0))]
    Invalid(Vec<FieldError>),
    #[error("invalid gateway TLS address {0:?}")]
    Address(String),
}

fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("gateway.{}: {}", e.path, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Certificates for the TLS listener.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Chosen per connection by SNI; see [`crate::tls::CertResolver`].
    pub certificates: Vec<CertificateFiles>,
    /// How often the files are checked for changes (mtime, size, inode).
    pub reload_interval: Duration,
}

impl TlsConfig {
    pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(1);
}

/// One certificate chain and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertificateFiles {
    /// Exact names (`api.example.com`) and one-label wildcards (`*.example.com`).
    pub hosts: Vec<String>,
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
    /// Served when the client sends no SNI or an unknown name. Without any `default`, the first
    /// certificate is the default.
    pub default: bool,
}

/// Limits on what one client may take. Defaults follow nginx's and HAProxy's spirit, tightened
/// for an internet-facing edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest time for a request head to arrive: from the connection's start (after the TLS
    /// handshake) to its first request, and from the first byte of each later HTTP/1 request
    /// head to its end. Slowloris defence. Default 10 s.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (gracefully: an HTTP/2
    /// client gets a GOAWAY). Default 60 s.
    pub idle_timeout: Duration,
    /// Longest TLS handshake. Default 10 s.
    pub tls_handshake_timeout: Duration,
    /// Largest request head (HTTP/1: request line and headers, answered 431; HTTP/2: the
    /// decoded header list). At least 8 KiB. Default 64 KiB.
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1 request (answered 431). Default 100.
    pub max_headers: usize,
    /// Largest request body; enforced by the proxy (413). Default 10 MiB.
    pub max_body_bytes: u64,
    /// Most client connections open at once, over both listeners. Past it, new plain-text
    /// connections are answered `503` with `Connection: close` and TLS connections are closed
    /// before the handshake; the gateway never stops accepting. Default 10 000.
    pub max_connections: usize,
    /// HTTP/2: most concurrent streams per connection. Default 100.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: PING interval to detect dead peers (`None`: no pings). Default 20 s.
    pub h2_keepalive_interval: Option<Duration>,
    /// HTTP/2: close when a PING is not answered within this. Default 20 s.
    pub h2_keepalive_timeout: Duration,
    /// HTTP/2: streams reset by the client before the server saw them, queued at most (rapid
    /// reset, CVE-2023-44487). Default 20.
    pub h2_max_pending_accept_reset_streams: usize,
    /// HTTP/2: streams the server may reset for protocol errors before closing the
    /// connection (CVE-2024-27316-style floods). Default 256.
    pub h2_max_local_error_reset_streams: usize,
    /// HTTP/2: receive window per stream and per connection: what one client may make the
    /// gateway buffer. Defaults 256 KiB and 1 MiB.
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
            max_headers: 100,
            max_body_bytes: 10 << 20,
            max_connections: 10_000,
            h2_max_concurrent_streams: 100,
            h2_keepalive_interval: Some(Duration::from_secs(20)),
            h2_keepalive_timeout: Duration::from_secs(20),
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 256,
            h2_stream_window: 256 << 10,
            h2_connection_window: 1 << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use flotilla_spec::{CertificateSection, GatewayLimitsSection, quantity::ByteSize};

    use super::*;

    #[test]
    fn section_paths_resolve_against_the_file_directory() {
        let section = GatewaySection {
            tls_listen: Some("127.0.0.1:8443".into()),
            certificates: vec![
                CertificateSection {
                    hosts: vec!["a.example".into()],
                    cert: "./certs/a.pem".into(),
                    key: "/etc/tls/a.key".into(),
                    default: false,
                },
                CertificateSection {
                    hosts: vec![],
                    cert: "d.pem".into(),
                    key: "d.key".into(),
                    default: true,
                },
            ],
            limits: GatewayLimitsSection {
                max_header_bytes: Some(ByteSize(16 << 10)),
                max_connections: Some(7),
                ..Default::default()
            },
            access_log: true,
            shutdown_grace: None,
            workers: Some(3),
        };
        let config = GatewayConfig::from_section(
            "127.0.0.1:8080".parse().unwrap(),
            &section,
            Path::new("/srv/app"),
        )
        .unwrap();
        assert_eq!(config.tls_listen, Some("127.0.0.1:8443".parse().unwrap()));
        let tls = config.tls.unwrap();
        assert_eq!(tls.certificates[0].cert, Path::new("/srv/app/certs/a.pem"));
        assert_eq!(tls.certificates[0].key, Path::new("/etc/tls/a.key"));
        assert_eq!(tls.certificates[1].cert, Path::new("/srv/app/d.pem"));
        assert!(tls.certificates[1].default);
        assert_eq!(config.limits.max_header_bytes, 16 << 10);
        assert_eq!(config.limits.max_connections, 7);
        assert_eq!(config.limits.idle_timeout, Limits::default().idle_timeout);
        assert!(config.access_log);
        assert_eq!(config.workers, 3);
    }

    #[test]
    fn invalid_section_is_refused_with_every_problem() {
        let section = GatewaySection {
            tls_listen: Some("nowhere".into()),
            limits: GatewayLimitsSection {
                max_headers: Some(0),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = GatewayConfig::from_section(
            "127.0.0.1:8080".parse().unwrap(),
            &section,
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("gateway.tls_listen: invalid address"), "{err}");
        assert!(err.contains("gateway.limits.max_headers"), "{err}");
    }
}
