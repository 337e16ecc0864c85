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
use flotilla_server::api::servers::{ControlPlane, LEADER, SERVERS, ServerRecord};
use flotilla_server::auth::{TokenKind, parts};
use flotilla_server::cluster::Membership;
use flotilla_server::{LogSource, ServiceController};
use flotilla_store::{Credential, RemoteNode};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::up::{bind, parse_addr};
use crate::{AgentArgs, ServerArgs};
use crate::{context, member};

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

/// Which signal ended a daemon's wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (systemd's stop and restart).
    Terminate,
    /// SIGHUP (systemd's reload): exit as for SIGTERM, then run again in place ([`reexec`]).
    Hangup,
}

/// The daemon's signal handlers, installed before it says it is ready: a signal sent at once
/// after READY=1 (a reload, a stop) is handled, not taken with its default action (exit).
pub(crate) struct Signals {
    pub interrupt: tokio::signal::unix::Signal,
    pub terminate: tokio::signal::unix::Signal,
    pub hangup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hangup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }
}

/// Waits for SIGINT, SIGTERM or SIGHUP, or for `task` to end first (its result, then).
async fn until_signal<T>(
    signals: &mut Signals,
    task: &mut tokio::task::JoinHandle<T>,
) -> Result<(Option<T>, Option<Signal>)> {
    let (got, what) = tokio::select! {
        _ = signals.interrupt.recv() => (Signal::Interrupt, "SIGINT"),
        _ = signals.terminate.recv() => (Signal::Terminate, "SIGTERM"),
        _ = signals.hangup.recv() => (Signal::Hangup, "SIGHUP"),
        done = task => return done.map(|d| (Some(d), None)).map_err(|e| anyhow!("task failed: {e}")),
    };
    tracing::info!(signal = what, "shutting down");
    Ok((None, Some(got)))
}

/// Runs this program again in this process (same pid, arguments and environment), for a
/// reload: the new image reads its configuration (and, after an upgrade, is the new binary).
///
/// The program is `argv[0]` when it is an absolute path to a file (what systemd starts: after an
/// upgrade, the new binary), else this process's own executable.
fn reexec() -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    let program =
        if std::path::Path::new(&arg0).is_absolute() && std::path::Path::new(&arg0).is_file() {
            PathBuf::from(&arg0)
        } else {
            PathBuf::from(flotilla_agent::shim::SELF_EXE)
        };
    tracing::info!(program = %program.display(), "reloading: running again in place");
    let e = std::process::Command::new(program)
        .arg0(arg0)
        .args(args)
        .exec();
    anyhow!("cannot run again for the reload: {e}")
}

/// What the service manager is told once a signal ends the wait: a reload (SIGHUP) is not a
/// stop (systemd would kill a unit that said STOPPING=1 and then READY=1).
fn stopping_or_reloading(signal: Option<Signal>) {
    if signal == Some(Signal::Hangup) {
        crate::sd::reloading();
    } else {
        crate::sd::stopping();
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
    /// More names for the server's certificate (`--san`).
    #[serde(default)]
    san: Vec<String>,
    /// How long member certificates last (`--certificate-ttl`).
    certificate_ttl: Option<String>,
    /// etcd endpoints for the store (`--etcd`); the embedded store when empty.
    #[serde(default)]
    etcd: Vec<String>,
    /// `--etcd-ca`, `--etcd-cert`, `--etcd-key` (relative to the file's directory).
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
}

/// The names the server's certificate holds: the listen address (or, listening on every
/// address, each of this host's), loopback, `localhost`, the host name, and `extra`.
fn certificate_names(listen: std::net::SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "127.0.0.1".to_string(),
        "::1".to_string(),
        "localhost".to_string(),
    ];
    if listen.ip().is_unspecified() {
        if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
            for a in addrs {
                let Some(addr) = a.address else { continue };
                if let Some(v4) = addr.as_sockaddr_in() {
                    names.push(v4.ip().to_string());
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    names.push(v6.ip().to_string());
                }
            }
        }
    } else {
        names.push(listen.ip().to_string());
    }
    names.extend(flotilla_agent::registration::hostname());
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| !n.is_empty() && seen.insert(n.clone()));
    names
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
    /// A file holding the join token.
    token_file: Option<PathBuf>,
    /// The cluster CA (else the join token's pin finds it).
    ca_file: Option<PathBuf>,
    node: Option<String>,
    address: Option<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    reserve_cpu: Option<String>,
    reserve_memory: Option<String>,
    lease: Option<String>,
    pressure_memory: Option<String>,
    pressure_disk: Option<String>,
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
        .map(|d| base.as_ref().map_or_else(|| d.clone(), |b| b.join(&d)));
    let data_dir = data_dir_or(data_dir_flag.or(file_dir), "server")?;
    let etcd = if args.etcd.is_empty() {
        file.etcd.clone()
    } else {
        args.etcd.clone()
    };
    let (store, on_etcd) = if etcd.is_empty() {
        (crate::up::open_store(&data_dir)?, None)
    } else {
        let mut tls = args.etcd_tls.clone();
        let from_file = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| base.as_ref().map_or_else(|| p.clone(), |b| b.join(p)))
        };
        tls.etcd_ca = tls.etcd_ca.or_else(|| from_file(&file.etcd_ca));
        tls.etcd_cert = tls.etcd_cert.or_else(|| from_file(&file.etcd_cert));
        tls.etcd_key = tls.etcd_key.or_else(|| from_file(&file.etcd_key));
        let store = open_etcd(&etcd, etcd_tls(&etcd, &tls)?).await?;
        share_secrets(&store, &data_dir).await?;
        let shared: Arc<dyn flotilla_store::Store> = store.clone();
        (shared, Some(store))
    };
    let token = context::ensure_token(&data_dir)?;
    let authority =
        Arc::new(flotilla_pki::Authority::load_or_create(&data_dir).context("the cluster CA")?);
    let api_listener = bind("API", api_socket).await?;
    let api_local = api_listener.local_addr()?;
    let certificate_ttl = match (args.certificate_ttl, &file.certificate_ttl) {
        (Some(t), _) => t,
        (None, Some(text)) => humantime::parse_duration(text)
            .map_err(|e| anyhow!("invalid certificate_ttl {text:?} in --config: {e}"))?,
        (None, None) => flotilla_server::api::MEMBER_CERT_TTL,
    };
    if certificate_ttl < std::time::Duration::from_secs(10) {
        bail!(
            "invalid --certificate-ttl {}: must be at least 10s",
            humantime::format_duration(certificate_ttl)
        );
    }
    let mut sans = file.san.clone();
    sans.extend(args.sans.iter().cloned());
    let names = certificate_names(api_local, &sans);
    let tls = authority
        .server_config(&names)
        .context("the server's TLS certificate")?;
    let metrics_listener = match metrics_socket {
        Some(m) => Some(bind("metrics", m).await?),
        None => None,
    };

    let shutdown = CancellationToken::new();
    let mut registry = Registry::default();
    let leases = Arc::new(flotilla_store::Leases::new(flotilla_store::DEFAULT_LEASE));
    let mut tasks = tokio::task::JoinSet::new();
    let me = ServerRecord {
        name: format!(
            "{}:{}",
            flotilla_agent::registration::hostname().unwrap_or_else(|| "server".to_string()),
            api_local.port()
        ),
        api: format!("https://{api_local}"),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: flotilla_spec::now_rfc3339(),
    };
    let metrics = flotilla_server::controller::Metrics::register(&mut registry);
    let plane = match &on_etcd {
        Some(etcd) => {
            let relay = Arc::new(flotilla_store::EtcdNodeLeases::new(etcd, &me.name));
            leases.share(relay.clone());
            let (leases, stop) = (leases.clone(), shutdown.clone());
            tasks.spawn(async move {
                relay.follow(leases, stop).await;
                Ok(())
            });
            tasks.spawn(stay_present(etcd.clone(), me.clone(), shutdown.clone()));
            ControlPlane::Etcd {
                me: me.clone(),
                store: etcd.clone(),
                peers: flotilla_pki::client_config(authority.cert_pem(), None)
                    .context("a TLS configuration trusting the cluster CA")?,
            }
        }
        None => ControlPlane::Single {
            me: me.clone(),
            store: data_dir.join(crate::up::STORE_FILE).display().to_string(),
        },
    };
    let mut main_task = match &on_etcd {
        Some(etcd) => tokio::spawn(lead(
            etcd.clone(),
            me.clone(),
            leases.clone(),
            metrics,
            shutdown.clone(),
        )),
        None => {
            let controller = ServiceController::with_metrics(
                store.clone(),
                leases.clone(),
                Membership::Fleet,
                metrics,
            );
            let stop = shutdown.clone();
            tokio::spawn(async move {
                controller.run(stop.clone()).await;
                if stop.is_cancelled() {
                    Ok(())
                } else {
                    Err(anyhow!("the controller stopped unexpectedly"))
                }
            })
        }
    };
    let api_state = flotilla_server::ApiState::new(
        store.clone(),
        leases,
        token,
        Arc::new(NodeLogs),
        &mut registry,
        shutdown.clone(),
    )
    .with_signer(context::signer(&data_dir)?)
    .with_authority(authority.clone(), certificate_ttl)
    .with_control_plane(plane);
    let registry = Arc::new(registry);
    tasks.spawn(flotilla_server::serve_tls(
        api_listener,
        flotilla_server::router(api_state),
        tls,
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
    let ca_file = data_dir.join(flotilla_pki::CA_CERT_FILE);
    let ctx_path = context::write_context(&context::ContextFile {
        api: format!("https://{api_local}"),
        token_file: token_file.clone(),
        gateway: String::new(),
        metrics: String::new(),
        pid: std::process::id(),
        data_dir: context::canonical(&data_dir),
        ca: Some(ca_file.clone()),
    });
    let ctx_shown = match &ctx_path {
        Ok(p) => p.display().to_string(),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "could not write the context file; the CLI needs --api, --token and --ca");
            "(not written)".to_string()
        }
    };
    println!(
        "flotilla server {} is up in {:.0?}",
        env!("CARGO_PKG_VERSION"),
        started.elapsed()
    );
    println!(
        "  API       https://{api_local}  (token: {}){metrics_shown}",
        token_file.display()
    );
    println!("  CA        {}  ({})", ca_file.display(), authority.pin());
    println!("  data      {}", data_dir.display());
    println!("  context   {ctx_shown}");
    println!(
        "Nodes join with a token from `flotilla token create --join`: FLOTILLA_TOKEN=<token> flotilla agent --join https://{api_local} --node NAME --address IP\n  (or `flotilla-agent`, the agent alone, with the same flags)"
    );

    let mut signals = Signals::install()?;
    crate::sd::ready(&format!("API on https://{api_local}"));
    let watchdog = tokio::spawn(crate::sd::watchdog(shutdown.clone()));
    let (early, signal) = until_signal(&mut signals, &mut main_task).await?;
    stopping_or_reloading(signal);
    shutdown.cancel();
    let _ = watchdog.await;
    if early.is_none() {
        let _ = tokio::time::timeout(crate::up::SHUTDOWN_DEADLINE, &mut main_task).await;
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
    if let Ok(p) = &ctx_path {
        context::remove_own_context(p);
    }
    match early {
        Some(Err(e)) => Err(e),
        Some(Ok(())) => Err(anyhow!("the controller stopped unexpectedly")),
        None if signal == Some(Signal::Hangup) => Err(reexec()),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// How long the leader's key in etcd lasts without a renewal: a leader killed outright is
/// followed within this (and the watch's delivery); Kubernetes' default is 15 s. A deposed
/// leader that wakes up late writes nothing whatever the lease: its writes are fenced.
pub const LEADER_LEASE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a server's presence record outlives its last renewal.
const PRESENCE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Campaigns for the leadership until `stop`; while this server leads, runs the controller
/// (services, scheduler, node lifecycle) and etcd's compaction on a fenced view of the store.
/// When the leadership is lost, they stop and the campaign starts again.
async fn lead(
    store: Arc<flotilla_store::EtcdStore>,
    me: ServerRecord,
    leases: Arc<flotilla_store::Leases>,
    metrics: flotilla_server::controller::Metrics,
    stop: CancellationToken,
) -> Result<()> {
    let holder = serde_json::to_string(&me).context("encoding this server's record")?;
    loop {
        let Some(hold) = store.campaign(LEADER, &holder, LEADER_LEASE, &stop).await else {
            return Ok(());
        };
        tracing::info!(
            term = hold.term(),
            "leading: the controller, the scheduler and the node lifecycle run on this server"
        );
        // This server's view of the node leases may be older than their renewals (it may
        // lead because etcd was away): no node is judged lost on it for one grace.
        leases.regrace();
        let fenced: Arc<dyn flotilla_store::Store> = Arc::new(store.fenced(&hold));
        let controller = ServiceController::with_metrics(
            fenced,
            leases.clone(),
            Membership::Fleet,
            metrics.clone(),
        );
        let term = stop.child_token();
        let mut run = tokio::spawn(controller.run(term.clone()));
        let compaction = tokio::spawn(compact_etcd(store.clone(), term.clone()));
        let lost = hold.lost();
        let ended = tokio::select! {
            () = lost.cancelled() => {
                tracing::warn!("lost the leadership (no renewal in time): the controller stops; campaigning again");
                false
            }
            () = stop.cancelled() => false,
            _ = &mut run => true,
        };
        term.cancel();
        if !ended {
            let _ = tokio::time::timeout(crate::up::SHUTDOWN_DEADLINE, run).await;
        }
        let _ = compaction.await;
        hold.release().await;
        if ended && !stop.is_cancelled() {
            bail!("the controller stopped unexpectedly");
        }
        if stop.is_cancelled() {
            return Ok(());
        }
    }
}

/// Keeps this server's record in etcd (for `get servers`) until `stop`, taking it again after
/// etcd lost it.
async fn stay_present(
    store: Arc<flotilla_store::EtcdStore>,
    me: ServerRecord,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let key = format!("{SERVERS}{}", me.name);
    let Ok(value) = serde_json::to_string(&me) else {
        return Ok(());
    };
    while !stop.is_cancelled() {
        match store.hold(&key, &value, PRESENCE_TTL).await {
            Ok(hold) => {
                let lost = hold.lost();
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = lost.cancelled() => {}
                }
                hold.release().await;
            }
            Err(e) => {
                tracing::debug!(error = %flotilla_store::error_chain(&e), "cannot write this server's record in etcd; retrying");
            }
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
    Ok(())
}

/// The store key of the secrets every server of a cluster shares.
const SHARED_SECRETS: &str = "cluster/secrets";

/// The admin token, the token-signing key and the cluster CA belong to the cluster, not to one
/// server: the first server on an etcd publishes its own (in one write, so that two starting
/// at once cannot mix them), every later one adopts them into its data directory. Anyone who
/// can read etcd can read these, as with Kubernetes' secrets: give etcd client certificates
/// only to the servers.
async fn share_secrets(
    store: &flotilla_store::EtcdStore,
    data_dir: &std::path::Path,
) -> Result<()> {
    use flotilla_store::Store;
    const FILES: [&str; 4] = [
        context::TOKEN_FILE,
        context::SIGNING_KEY_FILE,
        flotilla_pki::CA_CERT_FILE,
        flotilla_pki::CA_KEY_FILE,
    ];
    context::ensure_token(data_dir)?;
    context::signer(data_dir)?;
    flotilla_pki::Authority::load_or_create(data_dir).context("the cluster CA")?;
    let mut mine = serde_json::Map::new();
    for file in FILES {
        let path = data_dir.join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        mine.insert(file.to_string(), serde_json::Value::String(text));
    }
    let encoded = serde_json::to_vec(&mine).context("encoding the cluster's secrets")?;
    let stored = match store
        .put(
            SHARED_SECRETS,
            encoded,
            flotilla_store::Precondition::Absent,
        )
        .await
    {
        Ok(_) => {
            tracing::info!(
                "published this server's CA, signing key and admin token for the cluster"
            );
            return Ok(());
        }
        Err(e) if e.is_conflict() => store
            .get(SHARED_SECRETS)
            .await
            .map_err(|e| anyhow!("{}", flotilla_store::error_chain(&e)))
            .context("reading the cluster's secrets from etcd")?
            .ok_or_else(|| {
                anyhow!("the cluster's secrets vanished from etcd while reading them")
            })?,
        Err(e) => {
            return Err(anyhow!("{}", flotilla_store::error_chain(&e)))
                .context("publishing the cluster's secrets to etcd");
        }
    };
    let theirs: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&stored.value)
        .context("the cluster's secrets in etcd (key cluster/secrets) do not decode")?;
    let mut adopted = false;
    for file in FILES {
        let Some(text) = theirs.get(file).and_then(|v| v.as_str()) else {
            bail!("the cluster's secrets in etcd lack {file}");
        };
        if mine.get(file).and_then(|v| v.as_str()) != Some(text) {
            context::write_private(&data_dir.join(file), text.as_bytes())?;
            adopted = true;
        }
    }
    if adopted {
        tracing::info!(data_dir = %data_dir.display(), "adopted the cluster's CA, signing key and admin token");
    }
    Ok(())
}

/// Revisions of history kept in etcd for watches to resume from (the embedded store's 10,000).
const ETCD_HISTORY: u64 = 10_000;

/// etcd keeps every revision until it is compacted: every five minutes, the history beyond
/// [`ETCD_HISTORY`] revisions is dropped (watchers from before it relist), until `stop`.
async fn compact_etcd(
    store: Arc<flotilla_store::EtcdStore>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use flotilla_store::Store;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(std::time::Duration::from_secs(300)) => {}
        }
        let revision = store.revision();
        if revision > ETCD_HISTORY
            && let Err(e) = store.compact(revision - ETCD_HISTORY).await
        {
            tracing::warn!(error = %flotilla_store::error_chain(&e), "cannot compact etcd's history");
        }
    }
}

/// How long a starting server waits for etcd to answer.
const ETCD_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The TLS settings for `endpoints` from the files named in `args`; `None` for `http://` ones.
pub(crate) fn etcd_tls(
    endpoints: &[String],
    args: &crate::EtcdTlsArgs,
) -> Result<Option<flotilla_store::EtcdTls>> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let https = endpoints.iter().any(|e| e.starts_with("https://"));
    let Some(ca) = &args.etcd_ca else {
        if https {
            bail!(
                "https:// etcd members need --etcd-ca FILE (the CA that signed their certificates)"
            );
        }
        return Ok(None);
    };
    let identity = match (&args.etcd_cert, &args.etcd_key) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        (None, None) => None,
        _ => bail!("--etcd-cert and --etcd-key go together"),
    };
    Ok(Some(flotilla_store::EtcdTls {
        ca_pem: read(ca)?,
        identity,
    }))
}

/// The store on the etcd cluster at `endpoints`, once it answers (within [`ETCD_WAIT`]).
async fn open_etcd(
    endpoints: &[String],
    tls: Option<flotilla_store::EtcdTls>,
) -> Result<Arc<flotilla_store::EtcdStore>> {
    let shown = endpoints.join(",");
    let options = flotilla_store::EtcdOptions {
        tls,
        ..flotilla_store::EtcdOptions::default()
    };
    // etcd may come up after the server (both started at boot): wait for it a while.
    let waiting = Instant::now();
    let store = loop {
        match flotilla_store::EtcdStore::connect(endpoints, options.clone()).await {
            Ok(store) => break store,
            Err(e) if e.is_unavailable() && waiting.elapsed() < ETCD_WAIT => {
                tracing::warn!(etcd = %shown, error = %flotilla_store::error_chain(&e), "waiting for etcd");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(anyhow!("{}", flotilla_store::error_chain(&e)))
                    .with_context(|| format!("opening the store on etcd at {shown}"));
            }
        }
    };
    tracing::info!(etcd = %shown, "store on etcd");
    Ok(Arc::new(store))
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

/// The agent's drain hook across machines: before it signals a deleted instance, the servers
/// wait (briefly) for every gateway to confirm it no longer routes to it. Each server knows
/// the gateways that poll it, so with several servers the agent asks every one of them at
/// once (one that is down answers nothing and holds nothing up).
struct ServerDrain {
    /// One client per server.
    clients: Vec<Arc<crate::client::Client>>,
    node: String,
}

#[derive(serde::Deserialize)]
struct DrainOutcome {
    confirmed: Vec<String>,
    waiting: Vec<String>,
}

/// How long one server may take to answer a drain (it waits up to 1.9 s itself).
const DRAIN_ANSWER: std::time::Duration = std::time::Duration::from_millis(2500);

impl ServerDrain {
    fn new(api: &str, tls: Arc<flotilla_pki::rustls::ClientConfig>, node: &str) -> Self {
        let clients = flotilla_store::servers::Servers::parse(api)
            .all()
            .iter()
            .map(|base| {
                Arc::new(crate::client::Client::with_tls(
                    base,
                    String::new(),
                    Some(tls.clone()),
                ))
            })
            .collect();
        Self {
            clients,
            node: node.to_string(),
        }
    }
}

#[async_trait]
impl flotilla_agent::DrainHook for ServerDrain {
    async fn unrouted(&self, instance: &str) {
        // Within the agent's own bound on the wait.
        let path = format!(
            "/api/v1/nodes/{}/instances/{instance}/drain?timeout=1900ms",
            self.node
        );
        // Owned by this call; each ends within DRAIN_ANSWER.
        let mut asks = tokio::task::JoinSet::new();
        for client in &self.clients {
            let (client, path) = (client.clone(), path.clone());
            asks.spawn(async move {
                let answer = tokio::time::timeout(
                    DRAIN_ANSWER,
                    client.call(hyper::Method::POST, &path, None),
                )
                .await
                .map_err(|_| anyhow::anyhow!("no answer within {DRAIN_ANSWER:?}"))
                .and_then(|a| a)
                .and_then(|(_, body)| Ok(serde_json::from_slice::<DrainOutcome>(&body)?));
                (client.base(), answer)
            });
        }
        let (mut confirmed, mut waiting, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(done) = asks.join_next().await {
            let Ok((server, answer)) = done else { continue };
            match answer {
                Ok(o) => {
                    confirmed.extend(o.confirmed);
                    waiting.extend(o.waiting);
                }
                Err(e) => failed.push(format!("{server}: {e:#}")),
            }
        }
        // A gateway that moved between servers may be live at both: confirmed is confirmed.
        confirmed.sort();
        confirmed.dedup();
        waiting.sort();
        waiting.dedup();
        waiting.retain(|g| !confirmed.contains(g));
        if failed.len() == self.clients.len() {
            tracing::warn!(instance, error = %failed.join("; "), "could not drain the instance through any server");
            return;
        }
        if !failed.is_empty() {
            tracing::debug!(instance, error = %failed.join("; "), "a server did not answer the drain");
        }
        if waiting.is_empty() {
            tracing::info!(
                instance,
                gateways = confirmed.len(),
                "instance unrouted by every gateway"
            );
        } else {
            tracing::info!(
                instance,
                waiting = %waiting.join(","),
                "gateways still route to the instance; stopping it anyway"
            );
        }
    }
}

/// Where an agent keeps its node certificate and key (`node.crt`, `node.key`, with `ca.crt`).
const CERT_STEM: &str = "node";

/// A join token exchanged at `api` for the certificate of node `node` (`POST /api/v1/join`).
pub(crate) async fn join(
    api: &str,
    ca_pem: &str,
    join_token: &str,
    node: &str,
) -> Result<member::Enrolled> {
    member::enroll(
        api,
        ca_pem,
        Some(join_token),
        None,
        "/api/v1/join",
        node,
        serde_json::json!({ "node": node }),
    )
    .await
    .with_context(|| format!("joining {api} as node {node}"))
}

/// This agent's certificate: the one it saved while valid (unless a join token is given for
/// another run: then that one); else a join token's, saved.
async fn node_certificate(
    api: &str,
    given: Option<&str>,
    ca_file: Option<&std::path::Path>,
    node: &str,
    data_dir: &std::path::Path,
) -> Result<member::Enrolled> {
    let who = flotilla_pki::Identity {
        role: flotilla_pki::Role::Node,
        name: node.to_string(),
    };
    if let Some(saved) = member::Enrolled::load(data_dir, CERT_STEM, &who) {
        return Ok(saved);
    }
    let Some(token) = given else {
        bail!(
            "no certificate for node {node} in {}: pass a join token (`flotilla token create --join` on the server) with --token or FLOTILLA_TOKEN",
            data_dir.display()
        );
    };
    match parts(token).map(|p| p.kind) {
        Some(TokenKind::Join) => {}
        _ => bail!(
            "the token given is not a join token: create one with `flotilla token create --join` on the server"
        ),
    }
    let ca = member::cluster_ca(api, ca_file, Some(token)).await?;
    let enrolled = join(api, &ca, token, node).await?;
    enrolled.save(data_dir, CERT_STEM)?;
    tracing::info!(node, "joined with a join token; node certificate saved");
    Ok(enrolled)
}

/// `flotilla agent`: runs the instances the server binds to this node.
pub async fn agent(
    args: AgentArgs,
    api_flag: Option<String>,
    token_flag: Option<String>,
    ca_flag: Option<PathBuf>,
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
    let api = crate::context::api_url_tls(&api, true);
    let api = api.as_str();
    member::require_https(api)?;
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
    config.shim = Some(PathBuf::from(flotilla_agent::shim::SELF_EXE));
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
    if let Some(mem) = args
        .pressure_memory
        .as_ref()
        .or(file.pressure_memory.as_ref())
    {
        config.pressure.memory_available_bytes = flotilla_spec::quantity::parse_bytes(mem)
            .map_err(|e| anyhow!("invalid --pressure-memory {mem:?}: {e}"))?
            .0;
    }
    if let Some(disk) = args.pressure_disk.as_ref().or(file.pressure_disk.as_ref()) {
        config.pressure.disk_available_percent = disk
            .trim()
            .strip_suffix('%')
            .and_then(|p| p.trim().parse::<u8>().ok())
            .filter(|p| *p <= 100)
            .ok_or_else(|| {
                anyhow!(
                    "invalid --pressure-disk {disk:?}: expected a share of the disk, 0% to 100%"
                )
            })?;
    }
    if config.lease_duration < std::time::Duration::from_secs(1) {
        bail!(
            "invalid --lease {}: must be at least 1s",
            humantime::format_duration(config.lease_duration)
        );
    }
    let ca_file = ca_flag.or(file.ca_file.as_ref().map(|p| base.join(p)));
    let enrolled = node_certificate(api, token, ca_file.as_deref(), &node, &data_dir).await?;
    let identity = enrolled.identity()?;
    let tls = enrolled.tls(identity.clone())?;
    config.drain = Some(Arc::new(ServerDrain::new(api, tls.clone(), &node)));
    let mut registry = Registry::default();
    let node_api = Arc::new(RemoteNode::connect(
        api,
        Credential::new(""),
        &node,
        Some(tls),
    ));
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
    let renewal = tokio::spawn(member::renew(
        member::Renewal {
            api: api.to_string(),
            path: format!("/api/v1/nodes/{node}/credential"),
            name: node.clone(),
            save: Some((data_dir.clone(), CERT_STEM)),
        },
        enrolled,
        identity,
        shutdown.clone(),
    ));
    let detach = agent.detach_on_exit();
    let mut signals = Signals::install()?;
    crate::sd::ready(&format!("node {node} joined {api}"));
    let watchdog = tokio::spawn(crate::sd::watchdog(shutdown.clone()));
    let mut task = tokio::spawn(agent.run(shutdown.clone()));
    let (early, signal) = until_signal(&mut signals, &mut task).await?;
    // SIGTERM (systemd's stop and restart, an upgrade) and SIGHUP (a reload) leave the
    // workloads running for the next agent; Ctrl-C stops them.
    detach.set(matches!(signal, Some(Signal::Terminate | Signal::Hangup)));
    stopping_or_reloading(signal);
    shutdown.cancel();
    let _ = renewal.await;
    let _ = watchdog.await;
    let was_early = early.is_some();
    let result = match early {
        Some(done) => done,
        None => task.await.map_err(|e| anyhow!("the agent failed: {e}"))?,
    };
    match (result, was_early) {
        (Ok(()), false) if signal == Some(Signal::Hangup) => Err(reexec()),
        (Ok(()), false) => Ok(ExitCode::SUCCESS),
        (Ok(()), true) => Err(anyhow!("the agent stopped unexpectedly")),
        (Err(e), _) => Err(anyhow!(e).context("agent")),
    }
}
