//! `flotilla gateway`: the gateway alone, fed by a remote API through the same `Store` trait
//! the in-process gateway of `flotilla up` uses.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use flotilla_gateway::{Gateway, GatewayConfig};
use flotilla_store::{RemoteStore, Store};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::GatewayArgs;

pub async fn run(args: GatewayArgs, api: &str, token: &str) -> Result<ExitCode> {
    let store: Arc<dyn Store> = Arc::new(RemoteStore::new(api, token));
    let listen: SocketAddr = args.listen.parse().with_context(|| {
        format!(
            "invalid listen address {:?} (expected host:port)",
            args.listen
        )
    })?;
    let config = match &args.file {
        None => GatewayConfig::new(listen),
        Some(path) => {
            let file = crate::commands::load_file(path)?;
            let base = std::path::absolute(path)
                .ok()
                .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
                .unwrap_or_else(|| std::path::PathBuf::from("."));
            match &file.gateway {
                Some(section) => GatewayConfig::from_section(listen, section, &base)
                    .with_context(|| format!("the [gateway] table of {}", path.display()))?,
                None => GatewayConfig::new(listen),
            }
        }
    };
    let mut registry = Registry::default();
    let gateway = Gateway::bind(config, store, &mut registry)
        .await
        .with_context(|| format!("starting the gateway on {listen} against the API at {api}"))?;
    let local = gateway.local_addr();
    let shutdown = CancellationToken::new();
    let metrics = match &args.metrics_listen {
        Some(addr) => {
            let addr: SocketAddr = addr
                .parse()
                .with_context(|| format!("invalid metrics address {addr:?}"))?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            let router = flotilla_server::metrics::router(Arc::new(registry));
            let s = shutdown.clone();
            println!("  metrics   http://{}/metrics", listener.local_addr()?);
            Some(tokio::spawn(flotilla_server::serve(listener, router, s)))
        }
        None => None,
    };
    println!("flotilla gateway on http://{local}, routing from {api}");
    if let Some(tls) = gateway.tls_local_addr() {
        println!("  TLS       https://{tls}");
    }
    let mut task = tokio::spawn(gateway.run(shutdown.clone()));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let early = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = sigterm.recv() => None,
        done = &mut task => Some(done),
    };
    shutdown.cancel();
    let result = match early {
        Some(done) => done,
        None => task.await,
    };
    if let Some(m) = metrics {
        let _ = m.await;
    }
    match result {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("gateway")),
        Err(e) => Err(anyhow::anyhow!("gateway task failed: {e}")),
    }
}
