//! flotilla's edge gateway: a reverse proxy that routes by host and longest path prefix to the
//! ready instances of services.
//!
//! ```text
//! store ──reflectors (Service, Instance)──▶ RouteTable::build ──ArcSwap──▶ per-request lookup
//!                                                                              │
//! client ──TCP (+TLS, SNI)──▶ listener ──hyper-util auto (h1/h2)──▶ Proxy::handle ──▶ instance
//! ```
//!
//! The connection layer (`listener.rs`, `tls.rs`, [`config`]) owns sockets, TLS, protocol
//! negotiation, timeouts and limits; it hands each request to [`proxy::Proxy::handle`] with the
//! connection's [`conn::ConnInfo`].
//!
//! - The routing table is a pure function of the stored objects ([`RouteTable::build`]),
//!   rebuilt on every change and swapped in atomically; requests never wait for a rebuild.
//! - The request layer ([`proxy`]): routes by host (exact, `*.wildcard`), path prefix and
//!   headers; balances with the power of two choices on requests in flight ([`balance`]),
//!   ejects failing endpoints, retries only where safe under a retry budget ([`retry`]),
//!   rate-limits per client IP ([`ratelimit`]), relays upgrades and h2c/gRPC. Endpoint state
//!   lives in a [`TableState`] that outlives every table, so rebuilds forget nothing.
//! - Answers of the gateway itself are short plain text: 404 (no route), 503 (no ready
//!   instance), 502 (upstream failed), 504 (route timeout), 413 (body too large), 429 (rate
//!   limit). Internal error details go to the logs only.
//! - Shutdown stops accepting on every listener, shuts connections down gracefully (HTTP/1
//!   `Connection: close` after the current response, HTTP/2 GOAWAY), lets in-flight requests
//!   finish within [`GatewayConfig::shutdown_grace`], then closes what is left.

mod access_log;
pub mod balance;
mod bind;
mod body;
mod clock;
pub mod config;
pub mod conn;
mod error;
mod follower;
mod headers;
mod listener;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod retry;
pub mod table;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use flotilla_store::Store;
use flotilla_store::StoreError;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

pub use body::{AttemptBody, BoxError, GatewayBody};
pub use config::{CertificateFiles, ConfigError, GatewayConfig, Limits, TlsConfig};
pub use follower::RoutingView;
#[doc(hidden)]
pub use headers::fuzzing;
pub use metrics::Metrics;
pub use table::{Endpoint, Match, Route, RouteConflict, RouteTable, TableState};

use crate::bind::bind_tcp;
use crate::follower::StoreFollower;
use crate::listener::{Bound, ConnLayer};
use crate::metrics::ConnectionMetrics;
use crate::proxy::Proxy;
use crate::tls::{CertFiles, CertResolver, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Another process listens on the address (`SO_REUSEPORT` would share its traffic).
    #[error("{addr} is already in use by {}; stop it or choose another address", holder.as_deref().unwrap_or("another process"))]
    AddressInUse {
        addr: SocketAddr,
        holder: Option<String>,
    },
    #[error("cannot read the address the gateway listens on")]
    LocalAddr(#[source] std::io::Error),
    #[error("cannot start the gateway's worker threads")]
    Workers(#[source] std::io::Error),
    #[error("tls_listen is set but no certificate is configured")]
    TlsWithoutCertificates,
    #[error("cannot set up TLS")]
    Tls(#[source] TlsError),
    #[error("cannot {action} from the store")]
    Store {
        action: &'static str,
        #[source]
        source: StoreError,
    },
    /// One attempt to get an answer from an upstream instance failed.
    #[error("upstream {endpoint} of service {service:?} failed (retryable: {retryable})")]
    Upstream {
        service: String,
        endpoint: String,
        /// True when the request may be sent to another endpoint: nothing of it was processed.
        retryable: bool,
        #[source]
        source: BoxError,
    },
}

impl GatewayError {
    /// Whether the failed operation may be retried (elsewhere) without harm.
    pub fn is_retryable(&self) -> bool {
        match self {
            GatewayError::Upstream { retryable, .. } => *retryable,
            GatewayError::Store { source, .. } => source.is_transient(),
            GatewayError::Bind { .. }
            | GatewayError::AddressInUse { .. }
            | GatewayError::LocalAddr(_)
            | GatewayError::Workers(_)
            | GatewayError::TlsWithoutCertificates
            | GatewayError::Tls(_) => false,
        }
    }
}

/// A bound gateway, ready to [`run`](Gateway::run).
pub struct Gateway {
    config: GatewayConfig,
    /// One listening socket per worker on the same address (`SO_REUSEPORT`).
    listener: Vec<std::net::TcpListener>,
    local_addr: SocketAddr,
    tls_listener: Option<(Vec<std::net::TcpListener>, SocketAddr)>,
    certs: Option<CertFiles>,
    layer: Arc<ConnLayer>,
    proxy: Arc<Proxy>,
    /// Stopped by `run` at its end, or by its `Drop` if the gateway never runs.
    follower: StoreFollower,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("local_addr", &self.local_addr)
            .field("tls_local_addr", &self.tls_local_addr())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Binds the listeners, loads the TLS certificates, registers the metrics and loads the
    /// routing table from the store (so the gateway routes correctly from its first request).
    /// The store is then followed until [`run`](Gateway::run) ends or the gateway is dropped.
    pub async fn bind(
        config: GatewayConfig,
        store: Arc<dyn Store>,
        registry: &mut Registry,
    ) -> Result<Self, GatewayError> {
        let workers = config.workers.max(1);
        let (listener, local_addr) = bind_tcp(config.listen, workers)?;
        let (tls_listener, certs, acceptor) = match (config.tls_listen, &config.tls) {
            (None, _) => (None, None, None),
            (Some(_), None) => return Err(GatewayError::TlsWithoutCertificates),
            (Some(addr), Some(tls)) => {
                let certs = CertFiles::load(tls).map_err(GatewayError::Tls)?;
                let server = tls::server_config(certs.resolver()).map_err(GatewayError::Tls)?;
                let bound = bind_tcp(addr, workers)?;
                let acceptor = tokio_rustls::TlsAcceptor::from(server);
                (Some(bound), Some(certs), Some(acceptor))
            }
        };
        let mut follower = StoreFollower::start(store).await?;
        // Built from the maps the follower marks seen: whatever the reflectors publish from now
        // on, before `run` or during it, reaches the table.
        let state = Arc::new(TableState::new(config.upstream.clone()));
        let table = follower.table(&state);
        let proxy = Arc::new(Proxy {
            table: Arc::new(ArcSwap::from_pointee(table)),
            pool: proxy::upstream_pool(),
            h2c: proxy::h2c_client(),
            metrics: Metrics::register(registry),
            limits: config.limits.clone(),
            access_log: config.access_log,
            state,
            tunnels: proxy::Tunnels::default(),
        });
        let layer = Arc::new(ConnLayer::new(
            proxy.clone(),
            config.limits.clone(),
            ConnectionMetrics::register(registry),
            acceptor,
        ));
        match tls_listener.as_ref() {
            Some((_, tls_addr)) => {
                tracing::info!(addr = %local_addr, %tls_addr, "gateway listening")
            }
            None => tracing::info!(addr = %local_addr, "gateway listening"),
        }
        Ok(Self {
            config,
            listener,
            local_addr,
            tls_listener,
            certs,
            layer,
            proxy,
            follower,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the TLS listener, if there is one.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls_listener.as_ref().map(|(_, addr)| *addr)
    }

    /// The TLS certificate resolver, for certificates obtained at run time (ACME):
    /// see [`CertResolver::set_dynamic`].
    pub fn cert_resolver(&self) -> Option<Arc<CertResolver>> {
        self.certs.as_ref().map(CertFiles::resolver)
    }

    /// The routing table in force right now.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.proxy.table.load_full()
    }

    /// A view of the table in force, which outlives [`run`](Gateway::run)'s start: the agent
    /// asks it whether an instance is still routed, or still has requests in flight, before
    /// signalling it (drain).
    pub fn routing(&self) -> RoutingView {
        RoutingView::new(self.proxy.table.clone(), self.proxy.state.clone())
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets in-flight requests
    /// finish within `shutdown_grace`, closes the rest and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let Gateway {
            config,
            listener,
            local_addr,
            tls_listener,
            certs,
            layer,
            proxy,
            follower,
        } = self;

        let stop_updates = CancellationToken::new();
        let updater = tokio::spawn(follower.run(
            proxy.table.clone(),
            proxy.state.clone(),
            stop_updates.clone(),
        ));
        let housekeeper = tokio::spawn(housekeeping(proxy.state.clone(), stop_updates.clone()));

        let reloader = certs.map(|certs| {
            let interval = config
                .tls
                .as_ref()
                .map_or(TlsConfig::DEFAULT_RELOAD_INTERVAL, |t| t.reload_interval);
            tokio::spawn(certs.watch(interval, stop_updates.clone()))
        });

        let bound = Bound {
            plain: listener,
            plain_addr: local_addr,
            tls: tls_listener,
        };
        let served =
            listener::serve_on_workers(&layer, bound, shutdown, config.shutdown_grace).await;

        stop_updates.cancel();
        if let Err(e) = updater.await {
            tracing::warn!(error = %e, "routing table updater failed");
        }
        if let Err(e) = housekeeper.await {
            tracing::warn!(error = %e, "gateway housekeeping failed");
        }
        if let Some(reloader) = reloader
            && let Err(e) = reloader.await
        {
            tracing::warn!(error = %e, "certificate reloader failed");
        }
        served.map_err(GatewayError::Workers)?;
        tracing::info!(addr = %local_addr, "gateway stopped");
        Ok(())
    }
}

/// How often state no table uses is forgotten and rate limiters drop refilled buckets.
const HOUSEKEEPING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Sweeps the state shared by routing tables until `stop`.
async fn housekeeping(state: Arc<TableState>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A sweep visits every tracked client: off the runtime's worker threads.
        let state = state.clone();
        match tokio::task::spawn_blocking(move || state.sweep()).await {
            Ok(clients) => tracing::trace!(clients, "rate limiters swept"),
            Err(e) => tracing::warn!(error = %e, "sweep failed"),
        }
    }
}
