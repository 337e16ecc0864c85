//! flotilla's control plane: the HTTP API, the service controller, events and metrics.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod controller;
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

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
