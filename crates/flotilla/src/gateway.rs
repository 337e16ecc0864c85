//! `flotilla gateway`: the gateway alone, fed by a remote API through the same `Store` trait
//! the in-process gateway of `flotilla up` uses.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use flotilla_gateway::{Gateway, GatewayConfig};
use flotilla_store::{Credential, RemoteStore, Store};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::GatewayArgs;

/// The gateway's view of the API: with a gateway token at an `https://` API, a gateway
/// certificate got for it (and renewed until `stop`); else the token as it is.
async fn remote_store(
    target: &crate::commands::Target,
    stop: &CancellationToken,
) -> Result<(
    RemoteStore,
    Option<tokio::task::JoinHandle<()>>,
    Option<crate::client::Client>,
)> {
    use flotilla_server::auth::{GATEWAY_CREDENTIAL, TokenKind, parts};
    let (api, token) = (target.base.as_str(), target.token.as_str());
    let is_gateway_token = parts(token).is_some_and(|p| p.kind == TokenKind::Gateway);
    if !api.starts_with("https://") || !is_gateway_token {
        let store = RemoteStore::connect(api, Credential::new(token), target.tls()?);
        return Ok((store, None, None));
    }
    let ca = crate::member::cluster_ca(api, target.ca.as_deref(), Some(token)).await?;
    let enrolled = crate::member::enroll(
        api,
        &ca,
        Some(token),
        None,
        GATEWAY_CREDENTIAL,
        "gateway",
        serde_json::json!({}),
    )
    .await
    .with_context(|| format!("getting a gateway certificate from {api}"))?;
    let identity = enrolled.identity()?;
    let tls = enrolled.tls(identity.clone())?;
    let store = RemoteStore::connect(api, Credential::new(""), Some(tls.clone()));
    let client = crate::client::Client::with_tls(api, String::new(), Some(tls));
    let renewal = crate::member::Renewal {
        api: api.to_string(),
        path: GATEWAY_CREDENTIAL.to_string(),
        name: "gateway".to_string(),
        save: None,
    };
    let task = tokio::spawn(crate::member::renew(
        renewal,
        enrolled,
        identity,
        stop.clone(),
    ));
    Ok((store, Some(task), Some(client)))
}

#[derive(serde::Deserialize)]
struct Pending {
    instances: Vec<String>,
}

/// How long the gateway tries to confirm one round of drains before polling again.
const CONFIRM_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes part in draining ([`flotilla_server::drains`]): polls the server for instances being
/// drained, and confirms each once this gateway no longer routes to it and has nothing in
/// flight to it. Until `stop`.
async fn confirm_drains(
    client: crate::client::Client,
    view: flotilla_gateway::RoutingView,
    stop: CancellationToken,
) {
    use flotilla_server::auth::GATEWAY_DRAINS;
    let pause = |d| {
        let stop = stop.clone();
        async move {
            tokio::select! {
                () = stop.cancelled() => false,
                () = tokio::time::sleep(d) => true,
            }
        }
    };
    let poll_path = format!("{GATEWAY_DRAINS}?wait=10s");
    loop {
        let polled = tokio::select! {
            () = stop.cancelled() => return,
            r = client.get::<Pending>(&poll_path) => r,
        };
        let mut left = match polled {
            Ok(p) => p.instances,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "polling the server for drains failed; retrying");
                if !pause(std::time::Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        let deadline = tokio::time::Instant::now() + CONFIRM_WITHIN;
        while !left.is_empty() {
            let (done, busy): (Vec<String>, Vec<String>) =
                left.into_iter().partition(|i| !view.busy(i));
            if !done.is_empty() {
                let body = serde_json::json!({ "confirmed": done })
                    .to_string()
                    .into_bytes();
                if let Err(e) = client
                    .call(hyper::Method::POST, GATEWAY_DRAINS, Some(body))
                    .await
                {
                    tracing::warn!(error = %format!("{e:#}"), "confirming drains failed");
                }
            }
            left = busy;
            if left.is_empty()
                || tokio::time::Instant::now() >= deadline
                || !pause(std::time::Duration::from_millis(5)).await
            {
                break;
            }
        }
    }
}

pub async fn run(args: GatewayArgs, target: crate::commands::Target) -> Result<ExitCode> {
    let api = target.base.as_str();
    let shutdown = CancellationToken::new();
    let (store, renewal, member_client) = remote_store(&target, &shutdown).await?;
    let store: Arc<dyn Store> = Arc::new(store);
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
    let drains = member_client
        .map(|client| tokio::spawn(confirm_drains(client, gateway.routing(), shutdown.clone())));
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
    if let Some(r) = renewal {
        let _ = r.await;
    }
    if let Some(d) = drains {
        let _ = d.await;
    }
    match result {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("gateway")),
        Err(e) => Err(anyhow::anyhow!("gateway task failed: {e}")),
    }
}
