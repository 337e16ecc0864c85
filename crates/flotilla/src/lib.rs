//! The `flotilla` and `flotilla-agent` binaries: CLI parsing and wiring only. Both binaries are
//! a `main` that calls [`main`] or [`agent_main`]; link-time optimisation keeps out of
//! `flotilla-agent` everything the agent does not reach (the API server, the store, the
//! gateway, the cluster CA), which is most of a node's memory (see ARCHITECTURE.md).
#![allow(clippy::disallowed_macros)] // the CLI is the one place that prints to the terminal

mod bench;
mod client;
mod commands;
mod context;
mod fleet;
mod follow;
mod gateway;
mod import;
mod member;
mod migrate;
mod output;
mod rollout;
mod sd;
mod simulate;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "flotilla",
    version,
    about = "Run and supervise services on one machine or a small fleet"
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Conn,
    /// Data directory (store, logs, admin token).
    #[arg(long, global = true, env = "FLOTILLA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log format of flotilla's own logs.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "FLOTILLA_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How a client command reaches the API. Accepted before the subcommand or after it (not by
/// `up`, which they mean nothing to).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Conn {
    /// API address (host:port or URL), or several servers' comma-separated (the client moves
    /// to the next when one does not answer); default: from the context file written by `up`.
    #[arg(long, env = "FLOTILLA_API")]
    pub api: Option<String>,
    /// Bearer token; default: the token file named in the context file.
    #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster CA of an `https://` API (`ca.crt` in the server's data directory);
    /// default: from the context file.
    #[arg(long, env = "FLOTILLA_CA")]
    pub ca: Option<PathBuf>,
}

/// [`Conn`] for a subcommand: global there, so that nested subcommands (`rollout status`) take
/// it too.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SubConn {
    /// API address (host:port or URL), or several servers' comma-separated (the client moves
    /// to the next when one does not answer); default: from the context file written by `up`.
    #[arg(
        long = "api",
        id = "sub_api",
        value_name = "API",
        global = true,
        env = "FLOTILLA_API"
    )]
    pub api: Option<String>,
    /// Bearer token; default: the token file named in the context file.
    #[arg(
        long = "token",
        id = "sub_token",
        value_name = "TOKEN",
        global = true,
        env = "FLOTILLA_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// The cluster CA of an `https://` API (`ca.crt` in the server's data directory);
    /// default: from the context file.
    #[arg(
        long = "ca",
        id = "sub_ca",
        value_name = "FILE",
        global = true,
        env = "FLOTILLA_CA"
    )]
    pub ca: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq, Default)]
pub enum Output {
    /// Aligned columns; long values are cut short with `…`.
    #[default]
    Table,
    /// The same columns with every value in full.
    Wide,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run everything on this machine: store, API, controller, agent, gateway.
    ///
    /// Settings come from these flags, then the file's `[up]` table, then the defaults: a flag
    /// overrides the file, which overrides the default.
    Up(UpArgs),
    /// Stop the running `flotilla up` (of `--data-dir`, or the only one) as Ctrl-C does: every
    /// workload stops gracefully, then it exits. (SIGTERM, what systemd sends, leaves them
    /// running for the next `up`.)
    Down,
    /// Run the gateway alone, routing from a remote API's services and instances.
    Gateway(GatewayArgs),
    /// Run the control plane of a fleet: store, API, controller and scheduler. Workloads run
    /// on agents (`flotilla agent`) that join it.
    Server(ServerArgs),
    /// Run this machine as a node of a fleet: register with the server's API, renew its
    /// lease, run the instances the server places here.
    Agent(AgentArgs),
    /// Benchmarking: many simulated nodes (heartbeats and instance status, no processes)
    /// against a server.
    #[command(hide = true)]
    SimulateNodes(SimulateArgs),
    /// Turn Kubernetes manifests (Deployments, Pods, Services, Ingresses, ConfigMaps,
    /// Secrets; files, directories or `-` for stdin) into a flotilla file, or say exactly
    /// which field of which file cannot be honoured.
    Import {
        /// Manifest files or directories (their `.yaml`, `.yml` and `.json` files); `-` reads
        /// stdin.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Write the flotilla file here instead of stdout.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// Image → command and arguments, a TOML file:
        /// `"ghcr.io/acme/web" = { command = "/opt/web/bin/web", args = ["--port", "${PORT}"] }`.
        #[arg(long = "image-map")]
        image_map: Option<PathBuf>,
    },
    /// Print a stored service as Kubernetes YAML: a Deployment, and a Service and an Ingress
    /// for its routes (what has no Kubernetes field is said on stderr).
    Export {
        #[arg(value_enum)]
        kind: ExportKind,
        name: String,
        /// Write the YAML here instead of stdout.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        #[command(flatten)]
        conn: SubConn,
    },
    /// Create or update the services in a file.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        conn: SubConn,
    },
    /// List objects.
    Get {
        #[arg(value_enum)]
        kind: Kind,
        /// Only this one.
        name: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Label selector (`app=web,tier!=db`).
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
        /// Instances of this service only.
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        conn: SubConn,
    },
    /// Show a service (spec, instances, recent events) or a node (readiness, resources, labels,
    /// instances) in detail.
    Describe {
        #[arg(value_enum)]
        kind: DescribeKind,
        name: String,
        #[command(flatten)]
        conn: SubConn,
    },
    /// Print the logs of a service's instances, each line prefixed with its instance.
    Logs {
        service: String,
        /// Only this instance (a name from `flotilla get instances`).
        #[arg(long)]
        instance: Option<String>,
        /// Keep streaming new output until Ctrl-C, following the service across deploys:
        /// instances that start are followed from their first line after a `--- NAME joined`
        /// line, and instances that go end with a `--- NAME left` line.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only the last N lines of each instance (N per instance, not in all).
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// With -f: when the API goes away (a restart of `up`), keep trying to reconnect for
        /// this long, then fail with exit 1. Instances already followed resume at their end.
        #[arg(long, value_name = "DURATION", default_value = "2m")]
        reconnect_for: humantime::Duration,
        #[command(flatten)]
        conn: SubConn,
    },
    /// List events, oldest first.
    Events {
        /// Keep streaming new events until Ctrl-C; survives a restart of the API (see
        /// --reconnect-for), resuming after the last event shown.
        #[arg(short = 'f', long)]
        follow: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
        /// With -f: when the API goes away, keep trying to reconnect for this long, then fail
        /// with exit 1.
        #[arg(long, value_name = "DURATION", default_value = "2m")]
        reconnect_for: humantime::Duration,
        #[command(flatten)]
        conn: SubConn,
    },
    /// Delete a service; its instances stop gracefully.
    Delete {
        #[arg(value_enum)]
        kind: DeleteKind,
        name: String,
        #[command(flatten)]
        conn: SubConn,
    },
    /// Follow, inspect and steer rolling updates.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
        #[command(flatten)]
        conn: SubConn,
    },
    /// Replace every instance of a service, one by one, without changing its spec.
    Restart {
        service: String,
        #[command(flatten)]
        conn: SubConn,
    },
    /// Steer a node: stop placing instances on it, or move its instances off it.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
        #[command(flatten)]
        conn: SubConn,
    },
    /// Create credentials for other machines (needs the admin token).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        conn: SubConn,
    },
    /// Work on a store directly, with no server running on it.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Measure this machine: what flotilla (and what it replaces) costs it.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Print the client's (and the server's, if reachable) version.
    Version {
        #[command(flatten)]
        conn: SubConn,
    },
}

impl Command {
    /// The API flags given after the subcommand, if any.
    pub fn conn(&self) -> Conn {
        let sub = match self {
            Command::Up(_)
            | Command::Down
            | Command::Server(_)
            | Command::Store { .. }
            | Command::Import { .. }
            | Command::Bench { .. } => {
                return Conn::default();
            }
            Command::Gateway(args) => &args.conn,
            Command::Agent(args) => &args.conn,
            Command::SimulateNodes(args) => &args.conn,
            Command::Apply { conn, .. }
            | Command::Get { conn, .. }
            | Command::Describe { conn, .. }
            | Command::Export { conn, .. }
            | Command::Logs { conn, .. }
            | Command::Events { conn, .. }
            | Command::Delete { conn, .. }
            | Command::Rollout { conn, .. }
            | Command::Restart { conn, .. }
            | Command::Token { conn, .. }
            | Command::Node { conn, .. }
            | Command::Version { conn } => conn,
        };
        Conn {
            api: sub.api.clone(),
            token: sub.token.clone(),
            ca: sub.ca.clone(),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// No new instance is placed on the node; what runs there stays.
    Cordon { node: String },
    /// Placements on the node resume (and a drain in progress stops).
    Uncordon { node: String },
    /// Set taints (`KEY=VALUE`, or `KEY` alone) or remove them (`KEY-`): only services that
    /// tolerate a node's taints (`placement.tolerations`) are placed there; what runs stays.
    Taint {
        node: String,
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        taints: Vec<String>,
    },
    /// Cordon the node and replace its instances on other nodes, each service keeping
    /// `replicas - max_unavailable` available as in a rollout; waits until the node is empty
    /// (exit 0) or the timeout passes (exit 5).
    Drain {
        node: String,
        #[arg(long, default_value = "5m")]
        timeout: humantime::Duration,
    },
}

/// TLS to `https://` etcd members.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EtcdTlsArgs {
    /// The CA that signed the etcd members' certificates (needed for `https://` members).
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// This process's certificate for etcd's `--client-cert-auth` (with --etcd-key).
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The private key of --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Sample the resident memory, CPU and uptime of processes at an interval, as CSV (one row
    /// per process and sample; a summary per name on stderr at the end).
    ///
    /// Without --process or --pid: flotilla's own processes. Compare with what flotilla
    /// replaces: `flotilla bench overhead --process flotilla --process kubelet --process containerd`.
    Overhead {
        /// A process name: the kernel's (as `ps -o comm` shows) or the file name of its
        /// command. Repeatable.
        #[arg(long = "process", value_name = "NAME")]
        processes: Vec<String>,
        /// A process id. Repeatable.
        #[arg(long = "pid", value_name = "PID")]
        pids: Vec<u32>,
        /// Time between samples (at least 100ms).
        #[arg(long, default_value = "1s")]
        interval: humantime::Duration,
        /// How long to sample.
        #[arg(long, default_value = "60s")]
        duration: humantime::Duration,
        /// Write the CSV here instead of standard output.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Copy every object of a stopped server's embedded store into an empty etcd, once, before
    /// starting the server with `--etcd`.
    Migrate {
        /// The embedded store: `redb:PATH` (`store.redb` in the server's data directory).
        #[arg(long, value_name = "redb:PATH")]
        from: String,
        /// The etcd cluster: `etcd:URL[,URL…]`.
        #[arg(long, value_name = "etcd:URLS")]
        to: String,
        #[command(flatten)]
        tls: EtcdTlsArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a new token: `--join` (a node exchanges it for its own credential when its agent
    /// starts) or `--gateway` (reads services, instances and nodes; for `flotilla gateway`).
    #[command(group(clap::ArgGroup::new("kind").required(true).args(["join", "gateway"])))]
    Create {
        #[arg(long)]
        join: bool,
        #[arg(long)]
        gateway: bool,
        /// How long the token is valid (`30m`, `1h`, `7d`; join tokens at most 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Show the rollout's progress until it finishes; exit 0 when complete, 1 when it failed
    /// or was rolled back, 4 at once when it is paused, 5 on timeout.
    Status {
        service: String,
        /// Print the state once and exit (0 complete, 1 failed/rolled back, 3 in progress,
        /// 4 paused).
        #[arg(long)]
        no_watch: bool,
        /// Give up after this long (e.g. `5m`).
        #[arg(long, default_value = "10m")]
        timeout: humantime::Duration,
    },
    /// List the service's revisions and what changed in each.
    History {
        service: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Go back to the previous revision, or to `--to-revision`.
    Undo {
        service: String,
        #[arg(long)]
        to_revision: Option<u64>,
    },
    /// Stop starting and stopping instances for the current rollout.
    Pause { service: String },
    /// Continue a paused rollout.
    Resume { service: String },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Kind {
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "instance", alias = "inst")]
    Instances,
    #[value(alias = "node", alias = "no")]
    Nodes,
    /// The control plane's servers, which one leads, and their store's health.
    #[value(alias = "server")]
    Servers,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ExportKind {
    #[value(alias = "services", alias = "svc")]
    Service,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DescribeKind {
    #[value(alias = "services", alias = "svc")]
    Service,
    #[value(alias = "nodes", alias = "no")]
    Node,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DeleteKind {
    #[value(alias = "services", alias = "svc")]
    Service,
}

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// A flotilla file: `[up]` settings and services to apply at start.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// API listen address [default: 127.0.0.1:7070].
    #[arg(long)]
    pub api_listen: Option<String>,
    /// Gateway listen address [default: 127.0.0.1:8080].
    #[arg(long)]
    pub gateway_listen: Option<String>,
    /// Metrics listen address [default: 127.0.0.1:9464].
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Node name of this machine.
    #[arg(long, default_value = "local")]
    pub node: String,
}

#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub conn: SubConn,
    /// Listen address for client traffic.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Metrics listen address (none if unset).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// A flotilla file whose `[gateway]` table (TLS, limits, access log) configures it.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// A TOML file with a `[server]` table (`listen`, `metrics_listen`, `data_dir`, `san`,
    /// `certificate_ttl`); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// API listen address (agents, gateways and the CLI connect here) [default:
    /// 127.0.0.1:7443].
    #[arg(long)]
    pub listen: Option<String>,
    /// Metrics listen address (none if unset).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Another name or address agents and gateways reach the server by, for its TLS
    /// certificate (repeatable; the listen address, this host's addresses and names are in
    /// it already).
    #[arg(long = "san", value_name = "NAME")]
    pub sans: Vec<String>,
    /// How long node and gateway certificates last (they are renewed at half of it)
    /// [default: 24h; at least 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub certificate_ttl: Option<std::time::Duration>,
    /// Keep the store on etcd (`http://etcd-1:2379,http://etcd-2:2379,…`) instead of the
    /// embedded file in the data directory. Several servers may share one etcd: one leads,
    /// every one answers the API.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    pub etcd: Vec<String>,
    #[command(flatten)]
    pub etcd_tls: EtcdTlsArgs,
}

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    #[command(flatten)]
    pub conn: SubConn,
    /// A TOML file with an `[agent]` table (`api`, `token_file`, `ca_file`, `node`, `address`,
    /// `labels`, `reserve_cpu`, `reserve_memory`, `lease`, `pressure_memory`, `pressure_disk`,
    /// `data_dir`); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The server's API to join (the same as --api): one URL, or every server's,
    /// comma-separated (`https://server-1:7443,https://server-2:7443`); the agent moves to
    /// the next when one does not answer.
    #[arg(long, value_name = "URLS")]
    pub join: Option<String>,
    /// This node's name [default: the host name].
    #[arg(long)]
    pub node: Option<String>,
    /// The IP address of this node: instances listen on it (`FLOTILLA_HOST`) and gateways
    /// connect to it [default: 127.0.0.1].
    #[arg(long)]
    pub address: Option<String>,
    /// A label of this node (`zone=a`), for placement; repeat for more.
    #[arg(long = "label", value_name = "NAME=VALUE")]
    pub label: Vec<String>,
    /// CPU held back from instances (`500m`, `1`): allocatable = capacity − reserve.
    #[arg(long)]
    pub reserve_cpu: Option<String>,
    /// Memory held back from instances (`512Mi`, `1Gi`).
    #[arg(long)]
    pub reserve_memory: Option<String>,
    /// How long the node's lease lasts without a renewal (renewed every third of it); a node
    /// whose lease expired is NotReady and its instances are replaced elsewhere [default: 6s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lease: Option<std::time::Duration>,
    /// Memory pressure below this much available memory (no new instance is placed here)
    /// [default: 100Mi].
    #[arg(long)]
    pub pressure_memory: Option<String>,
    /// Disk pressure below this share of the data directory's filesystem free [default: 10%].
    #[arg(long)]
    pub pressure_disk: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub conn: SubConn,
    /// How many nodes.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// Node names are PREFIX-00000, PREFIX-00001, …
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    pub lease: std::time::Duration,
    /// How long to run.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: std::time::Duration,
}

/// Servers hold a descriptor per connection: use the whole hard limit, not the usual soft 1024.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, soft, hard, "cannot raise the open-files limit");
    }
}

/// glibc gives threads that allocate arenas of their own (up to 8 per core) and seldom returns
/// their free space: a server at 1,000 nodes held about 40 MiB more than with two, which match
/// the runtime's two workers. `MALLOC_ARENA_MAX` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called before the runtime starts any thread; mallopt only sets a tunable.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

/// Client commands end quietly when their reader goes away (`flotilla events -f | head`), as
/// every Unix tool does: Rust ignores SIGPIPE, which turns the next write into an error (and
/// `println!` into a panic). The servers keep ignoring it: a closed stdout must not kill them.
fn default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: restores the default disposition before any thread is started; no handler runs.
    #[allow(unsafe_code)]
    let restored = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    if let Err(e) = restored {
        tracing::debug!(error = %e, "cannot restore the default SIGPIPE disposition");
    }
}

/// `flotilla`: every command.
pub fn main() -> ExitCode {
    if let Some(code) = flotilla_agent::shim::main_if_shim() {
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = Cli::parse();
    let daemon = matches!(
        cli.command,
        Command::Up(_)
            | Command::Gateway(_)
            | Command::Server(_)
            | Command::Agent(_)
            | Command::SimulateNodes(_)
    );
    if !daemon {
        default_sigpipe();
    }
    init_logging(
        cli.log_format,
        matches!(
            cli.command,
            Command::Up(_) | Command::Server(_) | Command::Agent(_)
        ),
    );
    if daemon {
        raise_open_files_limit();
        limit_malloc_arenas();
    }
    let runtime = if matches!(cli.command, Command::Agent(_)) {
        agent_runtime()
    } else {
        multi_thread()
    };
    block_on(runtime, commands::run(cli))
}

/// `flotilla-agent`: the agent alone, with the arguments of `flotilla agent`.
#[derive(Parser, Debug)]
#[command(
    name = "flotilla-agent",
    version,
    about = "Run the instances a flotilla server binds to this node (the same as `flotilla agent`, in a smaller binary)"
)]
pub struct AgentCli {
    /// Data directory (node certificate, logs).
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log format of flotilla's own logs.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "FLOTILLA_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// `flotilla-agent`'s main.
pub fn agent_main() -> ExitCode {
    if let Some(code) = flotilla_agent::shim::main_if_shim() {
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = AgentCli::parse();
    init_logging(cli.log_format, true);
    raise_open_files_limit();
    limit_malloc_arenas();
    let conn = cli.agent.conn.clone();
    // One thread: a node's supervision is waiting, not computing (log files are read on the
    // blocking pool), and the work-stealing scheduler's code and threads are memory an idle
    // node would keep for nothing.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    block_on(
        runtime,
        fleet::agent(cli.agent, conn.api, conn.token, conn.ca, cli.data_dir),
    )
}

/// `flotilla`'s runtime: two workers (the gateway's own workers are apart from it).
fn multi_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// The agent's runtime, in both binaries: one thread. A node's supervision waits far more than
/// it computes (log files are read on the blocking pool), and idle worker threads are memory
/// every node would keep for nothing.
fn agent_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs `work` on `runtime` and turns its end into an exit code.
fn block_on(
    runtime: std::io::Result<tokio::runtime::Runtime>,
    work: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> ExitCode {
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Colour only on a terminal, and never when `NO_COLOR` is set (to anything but empty).
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn init_logging(format: LogFormat, is_up: bool) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let default = if is_up {
        LevelFilter::INFO
    } else {
        LevelFilter::WARN
    };
    let filter = match std::env::var("FLOTILLA_LOG") {
        Ok(text) => log_filter(&text, default).unwrap_or_else(|e| {
            eprintln!("flotilla: FLOTILLA_LOG={text:?}: {e}; logging at {default}");
            Targets::new().with_default(default)
        }),
        Err(_) => Targets::new().with_default(default),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(colour())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(layer.json()).init(),
        LogFormat::Text => registry.with(layer).init(),
    }
}

/// `FLOTILLA_LOG`: a level, and/or `target=level` directives, separated by commas
/// (`info,flotilla_gateway=debug`); spaces around them and empty ones do not count.
fn log_filter(
    text: &str,
    default: tracing_subscriber::filter::LevelFilter,
) -> Result<tracing_subscriber::filter::Targets, String> {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let level = |s: &str| {
        s.trim()
            .parse::<LevelFilter>()
            .map_err(|_| format!("{s:?} is not a level (trace, debug, info, warn, error or off)"))
    };
    let mut filter = Targets::new().with_default(default);
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        filter = match directive.split_once('=') {
            Some((target, lvl)) if !target.trim().is_empty() => {
                filter.with_target(target.trim().to_string(), level(lvl)?)
            }
            Some(_) => return Err(format!("{directive:?} names no target before `=`")),
            None => filter.with_default(level(directive)?),
        };
    }
    Ok(filter)
}

#[cfg(test)]
mod log_filter_tests {
    use super::log_filter;
    use tracing::Level;
    use tracing_subscriber::filter::LevelFilter;

    #[test]
    fn levels_and_targets() {
        let f = log_filter(" info , flotilla_gateway=debug,, ", LevelFilter::WARN).unwrap();
        assert!(f.would_enable("flotilla_gateway::proxy", &Level::DEBUG));
        assert!(!f.would_enable("flotilla_gateway::proxy", &Level::TRACE));
        assert!(f.would_enable("flotilla_agent", &Level::INFO));
        assert!(!f.would_enable("flotilla_agent", &Level::DEBUG));
        let f = log_filter("", LevelFilter::WARN).unwrap();
        assert!(!f.would_enable("x", &Level::INFO));
        assert!(f.would_enable("x", &Level::WARN));
        for bad in ["verbose", "x=loud", "=debug"] {
            let e = log_filter(bad, LevelFilter::WARN).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }
}
