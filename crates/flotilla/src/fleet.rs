//! `flotilla server` and `flotilla agent`: the control plane and a node, as separate processes
//! for a fleet. `flotilla up` is the same parts in one process for one machine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use flotilla_agent::{Agent, AgentConfig};
use flotilla_server::auth::{TokenKind, parts};
use flotilla_server::cluster::Membership;
use flotilla_server::{LogSource, ServiceController};
use flotilla_store::{Credential, RemoteNode};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::context;
use crate::up::{bind, parse_addr};
use crate::{AgentArgs, ServerArgs};

/// The logs of an instance stay on its node; the server cannot read them.
struct NodeLogs;

const LOGS_ON_NODES: &str = "instance logs are kept on the node that runs the instance; read them there (the server does not relay them yet)";

#[async_trait]
impl LogSource for NodeLogs {
    async fn read(&self, _instance: &str, _tail: Option<usize>) -> Result<Vec<u8>, String> {
        Err(LOGS_ON_NODES.to_string())
    }

    fn follow(
        &self,
        _instance: &str,
        _tail: Option<usize>,
        _stop: CancellationToken,
    ) -> mpsc::Receiver<Result<Bytes, String>> {
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Err(LOGS_ON_NODES.to_string()));
        rx
    }
}

/// Waits for SIGINT or SIGTERM, or for `task` to end first (its result, then).
async fn until_signal<T>(task: &mut tokio::task::JoinHandle<T>) -> Result<Option<T>> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT received, shutting down");
            Ok(None)
        }
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM received, shutting down");
            Ok(None)
        }
        done = task => done.map(Some).map_err(|e| anyhow!("task failed: {e}")),
    }
}

fn data_dir_or(flag: Option<PathBuf>, leaf: &str) -> Result<PathBuf> {
    let dir = match flag {
        Some(d) => d,
        None => context::default_data_dir()?.join(leaf),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    Ok(std::path::absolute(&dir)?)
}

/// `--config` of `flotilla server`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    #[serde(default)]
    server: ServerTable,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerTable {
    listen: Option<String>,
    metrics_listen: Option<String>,
    data_dir: Option<PathBuf>,
}

/// `--config` of `flotilla agent`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    #[serde(default)]
    agent: AgentTable,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentTable {
    api: Option<String>,
    /// A file holding the join token (or a node credential).
    token_file: Option<PathBuf>,
    node: Option<String>,
    address: Option<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    reserve_cpu: Option<String>,
    reserve_memory: Option<String>,
    lease: Option<String>,
    data_dir: Option<PathBuf>,
}

/// Reads a TOML settings file; relative paths in it are taken from its directory.
fn read_settings<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<(T, PathBuf)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: T = toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let dir = std::path::absolute(path)?
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((value, dir))
}

/// `flotilla server`: the store, the API, the controller and the scheduler, for agents on
/// other machines. Runs no workload itself.
pub async fn server(args: ServerArgs, data_dir_flag: Option<PathBuf>) -> Result<ExitCode> {
    let started = Instant::now();
    let (file, base) = match &args.config {
        Some(path) => {
            let (f, dir) = read_settings::<ServerFile>(path)?;
            (f.server, Some(dir))
        }
        None => (ServerTable::default(), None),
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| "127.0.0.1:7443".to_string());
    let api_socket = parse_addr("API", &listen)?;
    let metrics_socket = match args.metrics_listen.or(file.metrics_listen) {
        Some(m) => Some(parse_addr("metrics", &m)?),
        None => None,
    };
    let file_dir = file
        .data_dir
        .map(|d| base.map_or_else(|| d.clone(), |b| b.join(&d)));
    let data_dir = data_dir_or(data_dir_flag.or(file_dir), "server")?;
    let store = crate::up::open_store(&data_dir)?;
    let token = context::ensure_token(&data_dir)?;
    let api_listener = bind("API", api_socket).await?;
    let api_local = api_listener.local_addr()?;
    let metrics_listener = match metrics_socket {
        Some(m) => Some(bind("metrics", m).await?),
        None => None,
    };

    let shutdown = CancellationToken::new();
    let mut registry = Registry::default();
    let leases = Arc::new(flotilla_store::Leases::new(flotilla_store::DEFAULT_LEASE));
    let controller = ServiceController::new(
        store.clone(),
        leases.clone(),
        Membership::Fleet,
        &mut registry,
    );
    let api_state = flotilla_server::ApiState::new(
        store.clone(),
        leases,
        token,
        Arc::new(NodeLogs),
        &mut registry,
        shutdown.clone(),
    )
    .with_signer(context::signer(&data_dir)?);
    let registry = Arc::new(registry);
    let mut tasks = tokio::task::JoinSet::new();
    let mut controller_task = tokio::spawn(controller.run(shutdown.clone()));
    tasks.spawn(flotilla_server::serve(
        api_listener,
        flotilla_server::router(api_state),
        shutdown.clone(),
    ));
    let mut metrics_shown = String::new();
    if let Some(listener) = metrics_listener {
        metrics_shown = format!("\n  metrics   http://{}/metrics", listener.local_addr()?);
        tasks.spawn(flotilla_server::serve(
            listener,
            flotilla_server::metrics::router(registry.clone()),
            shutdown.clone(),
        ));
    }
    let token_file = data_dir.join(context::TOKEN_FILE);
    println!(
        "flotilla server {} is up in {:.0?}",
        env!("CARGO_PKG_VERSION"),
        started.elapsed()
    );
    println!(
        "  API       http://{api_local}  (token: {}){metrics_shown}",
        token_file.display()
    );
    println!("  data      {}", data_dir.display());
    println!(
        "Nodes join with a token from `flotilla token create --join`: FLOTILLA_TOKEN=<token> flotilla agent --join http://{api_local} --node NAME --address IP"
    );

    let early = until_signal(&mut controller_task).await?;
    shutdown.cancel();
    if early.is_none() {
        let _ = tokio::time::timeout(crate::up::SHUTDOWN_DEADLINE, controller_task).await;
    }
    let drained = tokio::time::timeout(crate::up::SHUTDOWN_DEADLINE, async {
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %e, "server task ended with an error");
            }
        }
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    match early {
        Some(()) => Err(anyhow!("the controller stopped unexpectedly")),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// `label=value` pairs of `--label`.
fn parse_labels(labels: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for l in labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("invalid --label {l:?}: expected NAME=VALUE");
        };
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// Where an agent keeps its node credential.
const CREDENTIAL_FILE: &str = "node.token";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(serde::Deserialize)]
struct Issued {
    token: String,
}

/// A join token exchanged for the credential of node `node` (`POST /api/v1/join`).
pub(crate) async fn join(api: &str, join_token: &str, node: &str) -> Result<String> {
    let client = crate::client::Client::new(api, join_token.to_string());
    let body = serde_json::json!({ "node": node }).to_string().into_bytes();
    let (_, bytes) = client
        .call(hyper::Method::POST, "/api/v1/join", Some(body))
        .await
        .with_context(|| format!("joining {api} as node {node}"))?;
    Ok(serde_json::from_slice::<Issued>(&bytes)
        .context("unexpected answer from POST /api/v1/join")?
        .token)
}

/// The credential this agent uses: its saved node credential while valid; else a join
/// token exchanged for one (and saved); else the token given as it is.
async fn node_credential(
    api: &str,
    given: Option<&str>,
    node: &str,
    data_dir: &std::path::Path,
) -> Result<String> {
    let path = data_dir.join(CREDENTIAL_FILE);
    let saved = std::fs::read_to_string(&path)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| {
            parts(t).is_some_and(|p| {
                p.kind == TokenKind::Node && p.subject == node && p.expiry > unix_now() + 60
            })
        });
    let given_kind = given.and_then(parts).map(|p| p.kind);
    if let Some(saved) = saved.filter(|_| given.is_none() || given_kind == Some(TokenKind::Join)) {
        return Ok(saved);
    }
    match (given, given_kind) {
        (Some(g), Some(TokenKind::Node)) => Ok(g.to_string()),
        (Some(join_token), Some(TokenKind::Join)) => {
            let token = join(api, join_token, node).await?;
            context::write_private(&path, format!("{token}\n").as_bytes())?;
            tracing::info!(node, "joined with a join token; node credential saved");
            Ok(token)
        }
        (Some(other), _) => {
            tracing::warn!(
                node,
                "running the agent with a token that is not a node credential (the admin token?): it can do far more than a node needs; join with `flotilla token create --join`"
            );
            Ok(other.to_string())
        }
        (None, _) => bail!(
            "no credential for node {node}: pass a join token (`flotilla token create --join` on the server) with --token or FLOTILLA_TOKEN"
        ),
    }
}

/// Renews the node credential at half its life, until `stop`.
async fn renew_credential(
    api: String,
    node: String,
    credential: Credential,
    path: PathBuf,
    stop: CancellationToken,
) {
    loop {
        let current = credential.get();
        let Some(p) = parts(&current) else {
            return; // not a node credential: nothing to renew
        };
        let left = p.expiry.saturating_sub(unix_now());
        let wait = std::time::Duration::from_secs((left / 2).max(5));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let client = crate::client::Client::new(&api, credential.get().to_string());
        let renewed = client
            .call(
                hyper::Method::POST,
                &format!("/api/v1/nodes/{node}/credential"),
                None,
            )
            .await
            .and_then(|(_, bytes)| {
                serde_json::from_slice::<Issued>(&bytes).context("unexpected answer")
            });
        match renewed {
            Ok(issued) => {
                credential.set(&issued.token);
                if let Err(e) =
                    context::write_private(&path, format!("{}\n", issued.token).as_bytes())
                {
                    tracing::warn!(error = %format!("{e:#}"), "could not save the renewed node credential");
                }
                tracing::info!(node = %node, "node credential renewed");
            }
            Err(e) => {
                tracing::warn!(node = %node, error = %format!("{e:#}"), "could not renew the node credential; retrying");
            }
        }
    }
}

/// `flotilla agent`: runs the instances the server binds to this node.
pub async fn agent(
    args: AgentArgs,
    api_flag: Option<String>,
    token_flag: Option<String>,
    data_dir_flag: Option<PathBuf>,
) -> Result<ExitCode> {
    let (file, base) = match &args.config {
        Some(path) => {
            let (f, dir) = read_settings::<AgentFile>(path)?;
            (f.agent, dir)
        }
        None => (AgentTable::default(), PathBuf::from(".")),
    };
    let Some(api) = args.join.clone().or(api_flag).or(file.api.clone()) else {
        bail!(
            "flotilla agent needs the server's API: --join URL (or --api, or `api` in --config), and a join token: --token or FLOTILLA_TOKEN"
        );
    };
    let api = crate::context::api_url(&api);
    let api = api.as_str();
    let token = match (token_flag, &file.token_file) {
        (Some(t), _) => Some(t),
        (None, Some(path)) => {
            let path = base.join(path);
            Some(
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading the token file {}", path.display()))?
                    .trim()
                    .to_string(),
            )
        }
        (None, None) => None,
    };
    let token = token.as_deref();
    let node = match args
        .node
        .clone()
        .or(file.node.clone())
        .or_else(flotilla_agent::registration::hostname)
    {
        Some(n) => n,
        None => bail!("cannot tell this machine's host name: pass --node NAME"),
    };
    flotilla_spec::validate::validate_name(&node)
        .map_err(|e| anyhow!("invalid --node {node:?}: {e}"))?;
    let address_text = args
        .address
        .clone()
        .or(file.address.clone())
        .unwrap_or_else(|| "127.0.0.1".to_string());
    let address: std::net::IpAddr = address_text.parse().map_err(|_| {
        anyhow!(
            "invalid --address {address_text:?}: expected the IP address instances listen on (such as 198.18.0.2)"
        )
    })?;
    let file_dir = file.data_dir.as_ref().map(|d| base.join(d));
    let data_dir = data_dir_or(data_dir_flag.or(file_dir), "agent")?;
    let mut config = AgentConfig::new(&node, data_dir.clone());
    config.host = address.to_string();
    config.labels = file.labels.clone();
    config.labels.extend(parse_labels(&args.label)?);
    if let Some((k, _)) = config
        .labels
        .iter()
        .find(|(k, _)| k.trim().is_empty() || k.starts_with("flotilla.dev/"))
    {
        bail!(
            "invalid label {k:?}: the name must be non-empty and not in flotilla.dev/ (the agent sets those)"
        );
    }
    if let Some(cpu) = args.reserve_cpu.as_ref().or(file.reserve_cpu.as_ref()) {
        config.reserve.cpu_millicores = flotilla_spec::quantity::parse_cpu(cpu)
            .map_err(|e| anyhow!("invalid --reserve-cpu {cpu:?}: {e}"))?
            .0;
    }
    if let Some(mem) = args
        .reserve_memory
        .as_ref()
        .or(file.reserve_memory.as_ref())
    {
        config.reserve.memory_bytes = flotilla_spec::quantity::parse_bytes(mem)
            .map_err(|e| anyhow!("invalid --reserve-memory {mem:?}: {e}"))?
            .0;
    }
    config.lease_duration = match (args.lease, &file.lease) {
        (Some(l), _) => l,
        (None, Some(text)) => humantime::parse_duration(text)
            .map_err(|e| anyhow!("invalid lease {text:?} in --config: {e}"))?,
        (None, None) => flotilla_store::DEFAULT_LEASE,
    };
    if config.lease_duration < std::time::Duration::from_secs(1) {
        bail!(
            "invalid --lease {}: must be at least 1s",
            humantime::format_duration(config.lease_duration)
        );
    }
    let credential = Credential::new(&node_credential(api, token, &node, &data_dir).await?);
    let mut registry = Registry::default();
    let node_api = Arc::new(RemoteNode::with_credential(api, credential.clone(), &node));
    let mut agent = Agent::new(config, node_api, &mut registry)
        .map_err(|e| anyhow!(e))
        .context("starting the agent")?;
    agent
        .register()
        .await
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("joining the cluster at {api}"))?;
    println!(
        "flotilla agent {}: node {node} ({address}) joined {api}",
        env!("CARGO_PKG_VERSION")
    );
    println!("  data      {}", data_dir.display());
    let shutdown = CancellationToken::new();
    let renewal = tokio::spawn(renew_credential(
        api.to_string(),
        node.clone(),
        credential,
        data_dir.join(CREDENTIAL_FILE),
        shutdown.clone(),
    ));
    let mut task = tokio::spawn(agent.run(shutdown.clone()));
    let early = until_signal(&mut task).await?;
    shutdown.cancel();
    let _ = renewal.await;
    let was_early = early.is_some();
    let result = match early {
        Some(done) => done,
        None => task.await.map_err(|e| anyhow!("the agent failed: {e}"))?,
    };
    match (result, was_early) {
        (Ok(()), false) => Ok(ExitCode::SUCCESS),
        (Ok(()), true) => Err(anyhow!("the agent stopped unexpectedly")),
        (Err(e), _) => Err(anyhow!(e).context("agent")),
    }
}
