//! flotilla's control plane: the HTTP API, the service controller, events and metrics.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod controller;
pub mod drains;
pub mod error;

pub mod metrics;
pub mod nodes;
pub mod openapi;
pub mod operations;
pub mod plan;
pub mod rollout;
pub mod schedule;
pub mod selector;

pub use api::{ApiState, LogSource, router};
pub use controller::ServiceController;
pub use error::ApiError;
pub use operations::{ApplyRequest, ApplyResult, OpError, apply};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The verified member certificate a connection's peer showed, if any: put in every request's
/// extensions by [`serve_tls`], read by the API's authentication.
#[derive(Clone, Debug, Default)]
pub struct Peer(pub Option<flotilla_pki::Identity>);

/// A TLS handshake that takes longer is dropped (a client that connects and says nothing).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests get to finish once `shutdown` fires.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Whether a new connection opens with a TLS record; a client speaking plain HTTP to it is
/// told, in an HTTP answer it can read, to use `https://`.
async fn starts_with_tls(tcp: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncWriteExt;
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == 0x16 => true,
        Ok(Ok(1)) => {
            let body = r#"{"error":{"code":400,"message":"this API speaks TLS only: use https:// and the cluster CA (--ca, FLOTILLA_CA)","reason":"BadRequest"}}"#;
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.write_all(answer.as_bytes())).await;
            let _ = tcp.shutdown().await;
            false
        }
        _ => false,
    }
}

/// Serves `router` over TLS (`tls` from [`flotilla_pki::Authority::server_config`]) on
/// `listener` until `shutdown`, then gives in-flight requests [`DRAIN_DEADLINE`] to finish.
pub async fn serve_tls(
    listener: TcpListener,
    router: axum::Router,
    tls: Arc<flotilla_pki::rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower::ServiceExt;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, addr) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let mut tcp = tcp;
            if !starts_with_tls(&mut tcp).await {
                return;
            }
            let handshake = tokio::select! {
                () = stop.cancelled() => return,
                h = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => h,
            };
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "API TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %addr, "API TLS handshake timed out");
                    return;
                }
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| flotilla_pki::identity_of(c));
            let peer = Peer(identity);
            let service =
                router.map_request(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    req
                });
            let service = hyper_util::service::TowerToHyperService::new(service);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(peer = %addr, error = %e, "API connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(DRAIN_DEADLINE, async {
        graceful.shutdown().await;
        connections.wait().await;
    })
    .await;
    Ok(())
}

/// Serves `router` on `listener` until `shutdown`, then finishes in-flight requests.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}
