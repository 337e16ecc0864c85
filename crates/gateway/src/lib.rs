//! flotilla's edge gateway: an HTTP/1.1 reverse proxy that routes by host and longest path
//! prefix to the ready instances of services.
//!
//! ```text
//! store ──reflectors (Service, Instance)──▶ RouteTable::build ──ArcSwap──▶ per-request lookup
//!                                                                              │
//! client ──TCP──▶ accept loop ──hyper http1──▶ Proxy::handle ──pooled client──▶ instance
//! ```
//!
//! - The routing table is a pure function of the stored objects ([`RouteTable::build`]),
//!   rebuilt on every change and swapped in atomically; requests never wait for a rebuild.
//! - Requests are balanced round-robin over a route's ready endpoints. A request whose upstream
//!   connection fails (or, for idempotent methods, whose upstream fails before answering) is
//!   retried on the next endpoint when its body was never read, so nothing is sent twice.
//! - Answers of the gateway itself are short plain text: 404 (no route), 503 (no ready
//!   instance), 502 (upstream failed). Internal error details go to the logs only.
//! - Shutdown stops accepting, lets in-flight requests finish within
//!   [`GatewayConfig::shutdown_grace`], then closes what is left.
//!
//! Seams for the hardening work: TLS wraps the accepted stream before `serve_connection`
//! (and sets [`proxy::Proxy::scheme`]); HTTP/2 swaps `http1::Builder` for hyper-util's `auto`
//! builder; rate limits and timeouts wrap [`proxy::Proxy::handle`].

mod body;
pub mod conn;
pub mod metrics;
pub mod proxy;
pub mod table;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use flotilla_spec::object::{Instance, Service};
use flotilla_store::Store;
use flotilla_store::StoreError;
use flotilla_store::typed::{ObjectMap, Reflector};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use body::{BoxError, GatewayBody};
pub use metrics::Metrics;
pub use table::{Endpoint, Match, Route, RouteConflict, RouteTable};

use crate::conn::ConnInfo;
use crate::proxy::{Proxy, error_chain};

/// Longest time a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (usually out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Address to accept client connections on.
    pub listen: SocketAddr,
    /// How long in-flight requests may run on after shutdown begins (default 10 s).
    pub shutdown_grace: Duration,
}

impl GatewayConfig {
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the address the gateway listens on")]
    LocalAddr(#[source] std::io::Error),
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
            GatewayError::Bind { .. } | GatewayError::LocalAddr(_) => false,
        }
    }
}

/// A bound gateway, ready to [`run`](Gateway::run).
pub struct Gateway {
    config: GatewayConfig,
    listener: TcpListener,
    local_addr: SocketAddr,
    proxy: Arc<Proxy>,
    services: Reflector<Service>,
    instances: Reflector<Instance>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("local_addr", &self.local_addr)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Binds the listener, registers the metrics and loads the routing table from the store
    /// (so the gateway routes correctly from its first request). The store is then followed
    /// until [`run`](Gateway::run) ends or the gateway is dropped.
    pub async fn bind(
        config: GatewayConfig,
        store: Arc<dyn Store>,
        registry: &mut Registry,
    ) -> Result<Self, GatewayError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| GatewayError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(GatewayError::LocalAddr)?;
        // Stopped by `run` at its end, or by their `Drop` if the gateway never runs.
        let unowned = CancellationToken::new();
        let services = Reflector::<Service>::start(store.clone(), &unowned)
            .await
            .map_err(|source| GatewayError::Store {
                action: "list services",
                source,
            })?;
        let instances = Reflector::<Instance>::start(store, &unowned)
            .await
            .map_err(|source| GatewayError::Store {
                action: "list instances",
                source,
            })?;
        let table = build_table(&services.current(), &instances.current(), &mut Vec::new());
        let proxy = Arc::new(Proxy {
            table: Arc::new(ArcSwap::from_pointee(table)),
            client: proxy::upstream_client(),
            metrics: Metrics::register(registry),
        });
        tracing::info!(addr = %local_addr, "gateway listening");
        Ok(Self {
            config,
            listener,
            local_addr,
            proxy,
            services,
            instances,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The routing table in force right now.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.proxy.table.load_full()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets in-flight requests
    /// finish within `shutdown_grace`, closes the rest and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let Gateway {
            config,
            listener,
            local_addr,
            proxy,
            services,
            instances,
        } = self;

        let stop_updates = CancellationToken::new();
        let updater = tokio::spawn(keep_table_current(
            services.subscribe(),
            instances.subscribe(),
            proxy.table.clone(),
            stop_updates.clone(),
        ));

        let graceful = GracefulShutdown::new();
        let mut next_conn: u64 = 0;
        let mut connections = JoinSet::new();
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                            continue;
                        }
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    let proxy = proxy.clone();
                    next_conn += 1;
                    let info = Arc::new(ConnInfo::plain(peer, local_addr, next_conn));
                    let service = service_fn(move |req| proxy.clone().handle(req, info.clone()));
                    let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                    connections.spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(%peer, error = %error_chain(&e), "client connection ended");
                        }
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }

        drop(listener);
        tracing::info!(
            addr = %local_addr,
            connections = connections.len(),
            grace = ?config.shutdown_grace,
            "gateway stopping: draining connections"
        );
        if tokio::time::timeout(config.shutdown_grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = connections.len(),
                "shutdown grace elapsed; closing the remaining connections"
            );
        }
        connections.shutdown().await;

        stop_updates.cancel();
        if let Err(e) = updater.await {
            tracing::warn!(error = %e, "routing table updater failed");
        }
        for (kind, result) in [
            ("services", services.stop().await),
            ("instances", instances.stop().await),
        ] {
            if let Err(e) = result {
                tracing::warn!(kind, error = %error_chain(&e), "reflector ended with an error");
            }
        }
        tracing::info!(addr = %local_addr, "gateway stopped");
        Ok(())
    }
}

/// Rebuilds and swaps the table whenever services or instances change, until `stop` or until
/// the store stops publishing (the last table then stays in force).
async fn keep_table_current(
    mut services: watch::Receiver<ObjectMap<Service>>,
    mut instances: watch::Receiver<ObjectMap<Instance>>,
    table: Arc<ArcSwap<RouteTable>>,
    stop: CancellationToken,
) {
    let mut conflicts = Vec::new();
    loop {
        let changed = tokio::select! {
            () = stop.cancelled() => return,
            changed = services.changed() => changed,
            changed = instances.changed() => changed,
        };
        if changed.is_err() {
            tracing::error!("store watch ended; routing table frozen at its last state");
            return;
        }
        let services_now = services.borrow_and_update().clone();
        let instances_now = instances.borrow_and_update().clone();
        let next = build_table(&services_now, &instances_now, &mut conflicts);
        table.store(Arc::new(next));
    }
}

/// Builds a table, logging route conflicts when they differ from `known`.
fn build_table(
    services: &ObjectMap<Service>,
    instances: &ObjectMap<Instance>,
    known: &mut Vec<RouteConflict>,
) -> RouteTable {
    let table = RouteTable::build(services.values(), instances.values());
    if table.conflicts() != known.as_slice() {
        for c in table.conflicts() {
            tracing::warn!(
                host = c.host.as_deref().unwrap_or("*"),
                path = %c.path,
                winner = %c.winner,
                loser = %c.loser,
                "two services claim the same route; the first by name gets it"
            );
        }
        *known = table.conflicts().to_vec();
    }
    tracing::debug!(
        routes = table.routes().count(),
        endpoints = table.routes().map(|r| r.endpoints.len()).sum::<usize>(),
        "routing table rebuilt"
    );
    table
}
