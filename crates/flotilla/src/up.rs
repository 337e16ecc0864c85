//! `flotilla up`: every component in one process, on the embedded store.
//!
//! Start-up order: store → token → listeners (so addresses are known and errors are early) →
//! controller, agent, gateway, API → apply the file's services through the API's own apply path.
//! Shutdown (SIGINT/SIGTERM): the gateway and API stop accepting, the agent stops every
//! workload gracefully (stop signal, grace period, SIGKILL of what is left), then exit 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use async_trait::async_trait;
use bytes::Bytes;
use flotilla_agent::{Agent, AgentConfig};
use flotilla_gateway::{Gateway, GatewayConfig};
use flotilla_server::cluster::Membership;
use flotilla_server::{ApplyRequest, LogSource, ServiceController};
use flotilla_store::{EmbeddedStore, Store};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::UpArgs;

/// How long servers and the controller get to finish after shutdown begins.
pub(crate) const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
use crate::context::{self, ContextFile};

/// The in-process gateway confirms an instance is unrouted, and that no request it sent the
/// instance is still in flight, before the agent signals it: a request written to the instance
/// but not yet read by it would be lost to a server that closes its idle-looking connections
/// at the stop signal (as hyper's and Go's graceful shutdowns do).
struct GatewayDrain(flotilla_gateway::RoutingView);

#[async_trait]
impl flotilla_agent::DrainHook for GatewayDrain {
    async fn unrouted(&self, instance: &str) {
        // The table swap follows the same store event within milliseconds, and requests in
        // flight end as they are answered; the agent bounds this wait.
        while self.0.busy(instance) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// Serves instance logs from the agent's files.
struct AgentLogs {
    data_dir: PathBuf,
}

#[async_trait]
impl LogSource for AgentLogs {
    async fn read(&self, instance: &str, tail: Option<usize>) -> Result<Vec<u8>, String> {
        match flotilla_agent::logs::read(&self.data_dir, instance, tail).await {
            Ok(bytes) => Ok(bytes),
            // Not started yet (or failed before its first output): nothing to show.
            Err(flotilla_agent::AgentError::LogNotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn follow(
        &self,
        instance: &str,
        tail: Option<usize>,
        stop: CancellationToken,
    ) -> mpsc::Receiver<Result<Bytes, String>> {
        let mut inner = flotilla_agent::logs::follow(&self.data_dir, instance, tail, stop);
        let (tx, rx) = mpsc::channel(16);
        // Ends when the agent's stream ends (after `stop`, once drained) or the reader goes.
        tokio::spawn(async move {
            while let Some(item) = inner.recv().await {
                if tx.send(item.map_err(|e| e.to_string())).await.is_err() {
                    return;
                }
            }
        });
        rx
    }
}

/// Where `up` records what it applied from its file: service name → digest of the spec.
const APPLIED_FILE: &str = "up-applied.json";

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct AppliedRecord {
    services: std::collections::BTreeMap<String, String>,
}

fn spec_digest(spec: &flotilla_spec::ServiceSpec) -> Result<String> {
    let bytes = serde_json::to_vec(spec).context("encoding a service spec")?;
    Ok(flotilla_spec::content_digest(&bytes))
}

/// Applies the file's services whose spec changed since `up` last applied them (all of them
/// on a first start or without a record), records their digests, and returns their names.
async fn apply_file(
    store: &dyn Store,
    file: &flotilla_spec::FlotillaFile,
    data_dir: &Path,
) -> Result<Vec<String>> {
    let record_path = data_dir.join(APPLIED_FILE);
    let mut record: AppliedRecord = match std::fs::read(&record_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %record_path.display(), error = %e, "unreadable record of the last applied file; applying every service");
            AppliedRecord::default()
        }),
        Err(_) => AppliedRecord::default(),
    };
    let mut applied = Vec::new();
    for (name, spec) in &file.service {
        let digest = spec_digest(spec)?;
        if record.services.get(name) == Some(&digest) {
            tracing::info!(service = %name, "unchanged in the file since the last start; not re-applied");
            continue;
        }
        match flotilla_server::apply(store, ApplyRequest::new(name, spec.clone()), "up").await {
            Ok((result, _)) => tracing::info!(service = %name, ?result, "applied"),
            Err(e) => return Err(anyhow!("service {name}: {e}")),
        }
        record.services.insert(name.clone(), digest);
        applied.push(name.clone());
    }
    if !applied.is_empty() {
        let tmp = data_dir.join(format!("{APPLIED_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(&record).context("encoding the applied record")?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &record_path))
            .with_context(|| format!("writing {}", record_path.display()))?;
    }
    Ok(applied)
}

/// SIGHUP: reads the file again and applies the services that changed in it since they were
/// last applied. A file that does not parse or apply is reported and changes nothing.
async fn reload(store: &dyn Store, path: Option<&Path>, data_dir: &Path) {
    let Some(path) = path else {
        tracing::info!("SIGHUP received; no file to reload (up runs without -f)");
        return;
    };
    let applied = match crate::commands::load_file(path) {
        Ok(file) => apply_file(store, &file, data_dir)
            .await
            .map(|applied| describe_file_apply(path, &applied, &file)),
        Err(e) => Err(e),
    };
    match applied {
        Ok(note) => tracing::info!(file = %path.display(), "reloaded: {note}"),
        Err(e) => {
            tracing::error!(file = %path.display(), error = %format!("{e:#}"), "reload failed; nothing changed")
        }
    }
}

/// The start-up line about the file: what was applied, or that nothing was.
fn describe_file_apply(
    path: &Path,
    applied: &[String],
    file: &flotilla_spec::FlotillaFile,
) -> String {
    let path = path.display();
    if file.service.is_empty() {
        format!("{path}: no services")
    } else if applied.is_empty() {
        format!(
            "{path}: unchanged since the last start, not re-applied (the store's revisions stand; `flotilla apply -f` re-applies)"
        )
    } else if applied.len() == file.service.len() {
        format!("{path}: applied {}", applied.join(", "))
    } else {
        format!(
            "{path}: applied {} (changed since the last start); the others are unchanged",
            applied.join(", ")
        )
    }
}

/// A listen address: an IP and a port (`127.0.0.1:7070`, `[::1]:7070`); names are not resolved.
pub(crate) fn parse_addr(what: &str, addr: &str) -> Result<SocketAddr> {
    addr.parse().map_err(|_| {
        anyhow!(
            "invalid {what} address {addr:?}: expected IP:PORT such as 127.0.0.1:7070 or [::1]:7070 (host names are not resolved)"
        )
    })
}

pub(crate) async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for the {what} on {addr}"))
}

/// The embedded store of a data directory (`store.redb`), which one process holds at a time.
/// The embedded store's file in a data directory.
pub(crate) const STORE_FILE: &str = "store.redb";

pub(crate) fn open_store(data_dir: &Path) -> Result<Arc<dyn Store>> {
    let path = data_dir.join(STORE_FILE);
    let store = EmbeddedStore::open(&path).with_context(|| {
        format!(
            "opening the store at {} (is another flotilla using this data directory?)",
            path.display()
        )
    })?;
    Ok(Arc::new(store))
}

pub async fn run(args: UpArgs, data_dir_flag: Option<PathBuf>) -> Result<ExitCode> {
    let started = Instant::now();
    let file = match &args.file {
        Some(path) => Some(crate::commands::load_file(path)?),
        None => None,
    };
    let up = file.as_ref().and_then(|f| f.up.clone()).unwrap_or_default();
    let file_dir = args
        .file
        .as_ref()
        .and_then(|p| std::path::absolute(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf));

    let api_addr = args
        .api_listen
        .or(up.api)
        .unwrap_or_else(|| context::DEFAULT_API.to_string());
    let gw_addr = args
        .gateway_listen
        .or(up.gateway)
        .unwrap_or_else(|| context::DEFAULT_GATEWAY.to_string());
    let metrics_addr = args
        .metrics_listen
        .or(up.metrics)
        .unwrap_or_else(|| context::DEFAULT_METRICS.to_string());
    // Every address is checked before anything is created or opened.
    let api_socket = parse_addr("API", &api_addr)?;
    let metrics_socket = parse_addr("metrics", &metrics_addr)?;
    let gw_socket = parse_addr("gateway", &gw_addr)?;

    let data_dir = match (data_dir_flag, &up.data_dir, &file_dir) {
        (Some(d), _, _) => d,
        (None, Some(d), Some(base)) => base.join(d),
        (None, Some(d), None) => PathBuf::from(d),
        (None, None, _) => context::default_data_dir()?,
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let data_dir = std::path::absolute(&data_dir)?;

    let store = open_store(&data_dir)?;
    let token = context::ensure_token(&data_dir)?;

    let api_listener = bind("API", api_socket).await?;
    let metrics_listener = bind("metrics", metrics_socket).await?;
    let api_local = api_listener.local_addr()?;
    let metrics_local = metrics_listener.local_addr()?;

    let shutdown = CancellationToken::new();
    let mut registry = Registry::default();
    let leases = Arc::new(flotilla_store::Leases::new(flotilla_store::DEFAULT_LEASE));
    let controller = ServiceController::new(
        store.clone(),
        leases.clone(),
        Membership::Local(args.node.clone()),
        &mut registry,
    );
    let gw_config = match file.as_ref().and_then(|f| f.gateway.as_ref()) {
        Some(section) => {
            let base = file_dir.clone().unwrap_or_else(|| PathBuf::from("."));
            GatewayConfig::from_section(gw_socket, section, &base).context("[gateway]")?
        }
        None => GatewayConfig::new(gw_socket),
    };
    let gateway = Gateway::bind(gw_config, store.clone(), &mut registry)
        .await
        .with_context(|| format!("cannot start the gateway on {gw_addr}"))?;
    let gw_local = gateway.local_addr();
    let mut agent_config = AgentConfig::new(&args.node, data_dir.clone());
    agent_config.shim = Some(PathBuf::from(flotilla_agent::shim::SELF_EXE));
    // One machine has nowhere else to place an instance: pressure is not a reason to stop.
    agent_config.pressure = flotilla_agent::pressure::Thresholds {
        memory_available_bytes: 0,
        disk_available_percent: 0,
    };
    agent_config.drain = Some(Arc::new(GatewayDrain(gateway.routing())));
    let node_api = Arc::new(flotilla_store::StoreNode::new(
        store.clone(),
        leases.clone(),
        &args.node,
    ));
    let mut agent = Agent::new(agent_config, node_api, &mut registry)
        .map_err(|e| anyhow!(e))
        .context("starting the agent")?;
    let gw_tls = gateway.tls_local_addr();
    let api_state = flotilla_server::ApiState::new(
        store.clone(),
        leases,
        token,
        Arc::new(AgentLogs {
            data_dir: data_dir.clone(),
        }),
        &mut registry,
        shutdown.clone(),
    )
    .with_signer(context::signer(&data_dir)?)
    .with_gateway(flotilla_spec::gateway_digest(
        file.as_ref().and_then(|f| f.gateway.as_ref()),
    ))
    .with_control_plane(flotilla_server::api::servers::ControlPlane::Single {
        me: flotilla_server::api::servers::ServerRecord {
            name: args.node.clone(),
            api: format!("http://{api_local}"),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: flotilla_spec::now_rfc3339(),
        },
        store: data_dir.join(STORE_FILE).display().to_string(),
    });
    let registry = Arc::new(registry);

    // The node is registered before the controller's first placements look for it.
    agent
        .register()
        .await
        .map_err(|e| anyhow!(e))
        .context("registering this node")?;
    // Every task is owned here and ends when `shutdown` is cancelled.
    let agent_shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let controller_task = tokio::spawn({
        let s = shutdown.clone();
        async move { controller.run(s).await }
    });
    let detach = agent.detach_on_exit();
    let mut agent_task = tokio::spawn({
        let s = agent_shutdown.clone();
        async move { agent.run(s).await }
    });
    tasks.spawn({
        let s = shutdown.clone();
        async move {
            gateway.run(s).await.context("gateway")?;
            Ok("gateway")
        }
    });
    tasks.spawn({
        let s = shutdown.clone();
        let router = flotilla_server::router(api_state);
        async move {
            flotilla_server::serve(api_listener, router, s)
                .await
                .context("API server")?;
            Ok("api")
        }
    });
    tasks.spawn({
        let s = shutdown.clone();
        let router = flotilla_server::metrics::router(registry.clone());
        async move {
            flotilla_server::serve(metrics_listener, router, s)
                .await
                .context("metrics server")?;
            Ok("metrics")
        }
    });

    // The file's services go through the same apply as the API, but only those that changed
    // in the file since `up` last applied them: a deploy made later through the API (apply,
    // undo) must survive a restart. A failure stops everything through the normal shutdown
    // below, so nothing already started is left behind.
    let mut failed: Option<anyhow::Error> = None;
    let mut file_note = None;
    let mut ctx_written = None;
    if let (Some(file), Some(path)) = (&file, &args.file) {
        match apply_file(&*store, file, &data_dir).await {
            Ok(applied) => file_note = Some(describe_file_apply(path, &applied, file)),
            Err(e) => failed = Some(e),
        }
    }

    if failed.is_none() {
        let api_url = format!("http://{api_local}");
        let ctx_path = context::write_context(&ContextFile {
            api: api_url.clone(),
            token_file: data_dir.join(context::TOKEN_FILE),
            gateway: format!("http://{gw_local}"),
            metrics: format!("http://{metrics_local}/metrics"),
            pid: std::process::id(),
            data_dir: context::canonical(&data_dir),
            ca: None,
        });
        let ctx_path = match ctx_path {
            Ok(p) => {
                let shown = p.display().to_string();
                ctx_written = Some(p);
                shown
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not write the context file; the CLI needs --api and --token");
                "(not written)".to_string()
            }
        };
        println!(
            "flotilla {} is up in {:.0?}",
            env!("CARGO_PKG_VERSION"),
            started.elapsed()
        );
        println!(
            "  API       {api_url}  (token: {})",
            data_dir.join(context::TOKEN_FILE).display()
        );
        println!("  gateway   http://{gw_local}");
        if let Some(tls) = gw_tls {
            println!("  gateway   https://{tls}");
        }
        println!("  metrics   http://{metrics_local}/metrics");
        println!("  data      {}", data_dir.display());
        println!("  context   {ctx_path}");
        if let Some(note) = &file_note {
            println!("  file      {note}");
        }
        println!(
            "Ctrl-C stops every workload and exits; SIGTERM exits and leaves them running for the next `flotilla up`."
        );
    }
    // Handlers first: a signal sent at once after READY=1 must not find the default action.
    let crate::fleet::Signals {
        interrupt: mut sigint,
        terminate: mut sigterm,
        hangup: mut sighup,
    } = crate::fleet::Signals::install()?;
    crate::sd::ready(&format!("API on http://{api_local}, gateway on {gw_local}"));
    let watchdog = tokio::spawn(crate::sd::watchdog(shutdown.clone()));

    let mut agent_done = None;
    while failed.is_none() {
        tokio::select! {
            _ = sigint.recv() => {
                tracing::info!("SIGINT received, stopping every workload");
                break;
            }
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM received, exiting; the workloads keep running");
                detach.set(true);
                break;
            }
            _ = sighup.recv() => {
                // `systemctl reload`: the file's changed services are applied, as at a start.
                crate::sd::reloading();
                reload(&*store, args.file.as_deref(), &data_dir).await;
                crate::sd::ready("reloaded");
            }
            done = &mut agent_task => {
                failed = Some(match done {
                    Ok(Ok(())) => anyhow!("the agent stopped unexpectedly"),
                    Ok(Err(e)) => anyhow!(e).context("agent"),
                    Err(e) => anyhow!("the agent failed: {e}"),
                });
                agent_done = Some(());
            }
            done = tasks.join_next() => {
                failed = Some(match done {
                    Some(Ok(Ok(name))) => anyhow!("{name} stopped unexpectedly"),
                    Some(Ok(Err(e))) => e,
                    Some(Err(e)) => anyhow!("a task failed: {e}"),
                    None => anyhow!("no tasks left"),
                });
            }
        }
    }
    if let Some(e) = &failed {
        tracing::error!(error = %format!("{e:#}"), "shutting down after a failure");
    }
    // A second signal means "now": exit without waiting for workloads to finish. What still
    // runs stays under its shim, and the next start re-adopts it.
    tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        tracing::warn!("second signal: exiting without waiting for workloads");
        #[allow(clippy::disallowed_methods)] // the user asked twice; nothing is left to clean up
        std::process::exit(130);
    });

    crate::sd::stopping();
    // 1. Stop the controller (nothing new is created) and stop accepting requests.
    shutdown.cancel();
    let _ = watchdog.await;
    if tokio::time::timeout(SHUTDOWN_DEADLINE, controller_task)
        .await
        .is_err()
    {
        tracing::warn!("controller did not stop in time");
    }
    // 2. Stop every workload gracefully (each has its own grace period).
    agent_shutdown.cancel();
    if agent_done.is_none() {
        match agent_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "agent shutdown reported an error"),
            Err(e) => tracing::error!(error = %e, "agent task failed"),
        }
    }
    // 3. The API, gateway and metrics servers finish in-flight requests, within a deadline.
    let drained = tokio::time::timeout(SHUTDOWN_DEADLINE, async {
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %format!("{e:#}"), "task ended with an error");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("servers did not finish within {SHUTDOWN_DEADLINE:?}; closing them");
        tasks.abort_all();
    }
    if let Some(path) = &ctx_written {
        context::remove_own_context(path);
    }
    if detach.detaching() {
        tracing::info!("exiting; the workloads keep running for the next `flotilla up`");
    } else {
        tracing::info!("all workloads stopped; bye");
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}
