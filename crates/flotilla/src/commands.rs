//! The client commands: each turns resolved arguments into API calls and prints the result.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use flotilla_spec::{Event, FlotillaFile, Instance, Service};
use hyper::Method;
use serde::Deserialize;

use crate::client::{Client, encode, ensure_name};
use crate::context::{self, api_url};
use crate::output;
use crate::{Cli, Command, Kind, Output};

#[derive(Deserialize)]
struct List<T> {
    items: Vec<T>,
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let Cli {
        conn: top,
        data_dir,
        command,
        ..
    } = cli;
    // After the subcommand wins over before it (both fall back to the environment).
    let sub = command.conn();
    let api = sub.api.or(top.api);
    let token = sub.token.or(top.token);
    let ca = sub.ca.or(top.ca);
    if let Command::Up(args) = command {
        return crate::up::run(args, data_dir).await;
    }
    if let Command::Down = command {
        return down(data_dir.as_deref()).await;
    }
    if let Command::Gateway(args) = command {
        let target = resolve(api, token, ca, data_dir)?;
        return crate::gateway::run(args, target).await;
    }
    if let Command::Server(args) = command {
        return crate::fleet::server(args, data_dir).await;
    }
    if let Command::SimulateNodes(args) = command {
        let (Some(api), Some(token)) = (api, token) else {
            bail!("simulate-nodes needs --api and a join token (--token or FLOTILLA_TOKEN)");
        };
        return crate::simulate::run(args, &context::api_url_tls(&api, true), &token, ca).await;
    }
    if let Command::Agent(args) = command {
        return crate::fleet::agent(args, api, token, ca, data_dir).await;
    }
    if let Command::Store {
        command: crate::StoreCommand::Migrate { from, to, tls },
    } = &command
    {
        return crate::migrate::run(from, to, tls).await;
    }
    if let Command::Bench {
        command:
            crate::BenchCommand::Overhead {
                processes,
                pids,
                interval,
                duration,
                output,
            },
    } = &command
    {
        let mut selection = crate::bench::Selection {
            names: processes.clone(),
            pids: pids.clone(),
        };
        if selection.names.is_empty() && selection.pids.is_empty() {
            selection.names = vec![
                "flotilla".into(),
                "flotilla-agent".into(),
                "flotilla-shim".into(),
            ];
        }
        let (interval, duration) = ((*interval).into(), (*duration).into());
        let samples = match output {
            Some(path) => {
                let mut file = std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                crate::bench::sample(&selection, interval, duration, &mut file).await?
            }
            None => {
                let mut stdout = std::io::stdout();
                crate::bench::sample(&selection, interval, duration, &mut stdout).await?
            }
        };
        if samples.is_empty() {
            bail!(
                "no process matched ({}); names are the kernel's (`ps -o comm`) or their command's file name",
                selection
                    .names
                    .iter()
                    .cloned()
                    .chain(selection.pids.iter().map(|p| format!("pid {p}")))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        eprint!("{}", crate::bench::summary(&samples));
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Import {
        files,
        output,
        image_map,
    } = &command
    {
        return crate::import::run(files, output.as_deref(), image_map.as_deref());
    }
    if let Command::Version { .. } = command {
        println!("flotilla {} (client)", env!("CARGO_PKG_VERSION"));
        if let Ok(client) = connect(api, token, ca, data_dir) {
            match client.get::<serde_json::Value>("/version").await {
                Ok(v) => println!("flotilla {} (server)", v["version"].as_str().unwrap_or("?")),
                Err(e) => println!("server: not reachable ({e})"),
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    // A file is checked before anything is contacted: its errors don't need a server.
    let file = match &command {
        Command::Apply { file, .. } => Some((file.clone(), load_file(file)?)),
        _ => None,
    };
    // Finds the API again after a lost stream (a restarted `up` may listen elsewhere).
    let reconnect = {
        let (api, token, ca, data_dir) = (api.clone(), token.clone(), ca.clone(), data_dir.clone());
        move || connect(api.clone(), token.clone(), ca.clone(), data_dir.clone())
    };
    let client = connect(api, token, ca, data_dir)?;
    match command {
        Command::Apply { .. } => match file {
            Some((path, parsed)) => apply(&client, &path, parsed).await,
            None => Ok(ExitCode::FAILURE),
        },
        Command::Get {
            kind,
            name,
            output,
            selector,
            service,
            ..
        } => get(&client, kind, name, output, selector, service).await,
        Command::Export { name, output, .. } => {
            let service: Service = client.get(&format!("/api/v1/services/{name}")).await?;
            let out = flotilla_kube::export(&name, &service.spec);
            for w in &out.warnings {
                eprintln!("warning: {w}");
            }
            match output {
                Some(path) => std::fs::write(&path, &out.yaml)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{}", out.yaml),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe {
            kind: crate::DescribeKind::Service,
            name,
            ..
        } => describe(&client, &name).await,
        Command::Describe {
            kind: crate::DescribeKind::Node,
            name,
            ..
        } => describe_node(&client, &name).await,
        Command::Logs {
            service,
            instance,
            follow,
            tail,
            reconnect_for,
            ..
        } => {
            let args = LogsArgs {
                service,
                instance,
                follow,
                tail,
                reconnect_for: reconnect_for.into(),
            };
            logs(client, &reconnect, args).await
        }
        Command::Events {
            follow,
            output,
            reconnect_for,
            ..
        } => events(client, &reconnect, follow, output, reconnect_for.into()).await,
        Command::Delete { name, .. } => {
            ensure_name("service", &name)?;
            client
                .call(Method::DELETE, &format!("/api/v1/services/{name}"), None)
                .await?;
            println!("service/{name} deleted");
            Ok(ExitCode::SUCCESS)
        }
        Command::Rollout { command, .. } => crate::rollout::run(&client, command).await,
        Command::Restart { service, .. } => crate::rollout::restart(&client, &service).await,
        Command::Node { command, .. } => steer_node(&client, command).await,
        Command::Token {
            command: crate::TokenCommand::Create { join, ttl, .. },
            ..
        } => create_token(&client, if join { "join" } else { "gateway" }, &ttl).await,
        Command::Up(_)
        | Command::Down
        | Command::Gateway(_)
        | Command::Server(_)
        | Command::Agent(_)
        | Command::SimulateNodes(_)
        | Command::Store { .. }
        | Command::Bench { .. }
        | Command::Import { .. }
        | Command::Version { .. } => Ok(ExitCode::SUCCESS),
    }
}

/// `flotilla node taint NODE KEY=VALUE… KEY-…`: the node's taints, edited.
async fn taint_node(client: &Client, node: &str, edits: &[String]) -> Result<ExitCode> {
    ensure_name("node", node)?;
    let path = format!("/api/v1/nodes/{}", encode(node));
    let current: serde_json::Value = client.get(&path).await?;
    let mut taints: Vec<flotilla_spec::NodeTaint> =
        serde_json::from_value(current["spec"]["taints"].clone()).unwrap_or_default();
    for edit in edits {
        if let Some(key) = edit.strip_suffix('-') {
            taints.retain(|t| t.key != key);
            continue;
        }
        let (key, value) = edit.split_once('=').unwrap_or((edit.as_str(), ""));
        if key.trim().is_empty() {
            bail!("invalid taint {edit:?}: expected KEY=VALUE, KEY, or KEY- to remove");
        }
        taints.retain(|t| t.key != key);
        taints.push(flotilla_spec::NodeTaint {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    let body = serde_json::json!({ "taints": taints })
        .to_string()
        .into_bytes();
    client
        .call(Method::PUT, &format!("{path}/taints"), Some(body))
        .await?;
    let shown: Vec<String> = taints
        .iter()
        .map(|t| format!("{}={}", t.key, t.value))
        .collect();
    if shown.is_empty() {
        println!("node/{node} untainted: it has no taints now");
    } else {
        println!("node/{node} tainted: {}", shown.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// `flotilla node cordon|uncordon|drain NODE`.
async fn steer_node(client: &Client, command: crate::NodeCommand) -> Result<ExitCode> {
    use crate::NodeCommand;
    let (node, action, timeout) = match command {
        NodeCommand::Taint { node, taints } => return taint_node(client, &node, &taints).await,
        NodeCommand::Cordon { node } => (node, "cordon", None),
        NodeCommand::Uncordon { node } => (node, "uncordon", None),
        NodeCommand::Drain { node, timeout } => (node, "drain", Some(*timeout)),
    };
    ensure_name("node", &node)?;
    client
        .call(
            Method::POST,
            &format!("/api/v1/nodes/{}/{action}", encode(&node)),
            None,
        )
        .await?;
    let Some(timeout) = timeout else {
        println!("node/{node} {action}ed");
        return Ok(ExitCode::SUCCESS);
    };
    println!("node/{node} cordoned; replacing its instances on other nodes");
    let deadline = std::time::Instant::now() + timeout;
    let mut last = usize::MAX;
    loop {
        let list: List<Instance> = client.get("/api/v1/instances").await?;
        let left = list.items.iter().filter(|i| i.spec.node == node).count();
        if left == 0 {
            println!("node/{node} drained");
            return Ok(ExitCode::SUCCESS);
        }
        if left != last {
            println!("  {left} instance(s) left on {node}");
            last = left;
        }
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "error: node/{node} still runs {left} instance(s) after {}: see `flotilla get instances -o wide` and `flotilla events` (a service may have nowhere else to go)",
                humantime::format_duration(timeout)
            );
            return Ok(ExitCode::from(5));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `flotilla token create`: the token alone on stdout (for `$(…)`), what it is on stderr.
async fn create_token(client: &Client, kind: &str, ttl: &str) -> Result<ExitCode> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Issued {
        token: String,
        expires_at: String,
    }
    let body = serde_json::json!({ "kind": kind, "ttl": ttl });
    let (_, bytes) = client
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(body.to_string().into_bytes()),
        )
        .await?;
    let issued: Issued =
        serde_json::from_slice(&bytes).context("unexpected answer from POST /api/v1/tokens")?;
    println!("{}", issued.token);
    eprintln!("{kind} token, valid until {}", issued.expires_at);
    Ok(ExitCode::SUCCESS)
}

/// Where the CLI's API is, and how to reach it.
pub struct Target {
    pub base: String,
    pub token: String,
    /// The cluster CA of an `https://` API.
    pub ca: Option<std::path::PathBuf>,
}

impl Target {
    /// The TLS configuration for `https://` (trusting the CA, no client certificate).
    pub fn tls(&self) -> Result<Option<std::sync::Arc<flotilla_pki::rustls::ClientConfig>>> {
        if !self.base.starts_with("https://") {
            return Ok(None);
        }
        let Some(ca) = &self.ca else {
            bail!(
                "{} is https://: pass the cluster CA with --ca FILE or FLOTILLA_CA (ca.crt in the server's data directory)",
                self.base
            );
        };
        let pem = std::fs::read_to_string(ca)
            .with_context(|| format!("reading the cluster CA {}", ca.display()))?;
        Ok(Some(flotilla_pki::client_config(&pem, None).with_context(
            || format!("the cluster CA {}", ca.display()),
        )?))
    }
}

/// Finds the API, the token and the CA: flags/env first, then the context file `up` or
/// `server` wrote, then the default address with the token from the data directory.
fn connect(
    api: Option<String>,
    token: Option<String>,
    ca: Option<std::path::PathBuf>,
    data_dir: Option<std::path::PathBuf>,
) -> Result<Client> {
    let target = resolve(api, token, ca, data_dir)?;
    Ok(Client::with_tls(
        &target.base,
        target.token.clone(),
        target.tls()?,
    ))
}

fn resolve(
    api: Option<String>,
    token: Option<String>,
    ca: Option<std::path::PathBuf>,
    data_dir: Option<std::path::PathBuf>,
) -> Result<Target> {
    // A CA in the data directory given: the server's (`flotilla server` keeps `ca.crt` there).
    let dir_ca = data_dir
        .as_ref()
        .map(|d| d.join(flotilla_pki::CA_CERT_FILE))
        .filter(|p| p.exists());
    if let (Some(a), Some(t)) = (&api, &token) {
        let ca = ca.or(dir_ca);
        return Ok(Target {
            base: context::api_url_tls(a, ca.is_some()),
            token: t.clone(),
            ca,
        });
    }
    let ctx = context::find_context(data_dir.as_deref())?;
    let ca = ca
        .or(dir_ca)
        .or_else(|| ctx.as_ref().and_then(|c| c.ca.clone()));
    let base = match (&api, &ctx) {
        (Some(a), _) => context::api_url_tls(a, ca.is_some()),
        (None, Some(c)) => c.api.clone(),
        (None, None) => api_url(context::DEFAULT_API),
    };
    let token = match (token, &ctx, data_dir) {
        (Some(t), _, _) => t,
        (None, _, Some(dir)) => context::read_token(&dir.join(context::TOKEN_FILE))?,
        (None, Some(c), None) => context::read_token(&c.token_file)?,
        (None, None, None) => {
            let path = context::default_data_dir()?.join(context::TOKEN_FILE);
            if !path.exists() {
                bail!(
                    "no running flotilla found: no context file in {} and no token at {}; start `flotilla up`, or pass --api and --token (FLOTILLA_API, FLOTILLA_TOKEN)",
                    context::contexts_dir()?.display(),
                    path.display()
                );
            }
            context::read_token(&path)?
        }
    };
    Ok(Target { base, token, ca })
}

/// Parses a flotilla file, printing every error with file:line:col, and resolves relative
/// paths against the file's directory.
pub fn load_file(path: &Path) -> Result<FlotillaFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let shown = path.display().to_string();
    let mut file = match flotilla_spec::parse_file(&text, &shown) {
        Ok(f) => f,
        Err(errors) => bail!("{} is invalid:\n{errors}", shown),
    };
    let abs = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let base = abs
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".to_string());
    for spec in file.service.values_mut() {
        flotilla_spec::resolve_paths(spec, &base);
    }
    Ok(file)
}

async fn apply(client: &Client, path: &Path, file: FlotillaFile) -> Result<ExitCode> {
    if file.service.is_empty() {
        bail!("{} declares no [service.NAME] table", path.display());
    }
    let mut failed = false;
    if let Some(section) = &file.gateway {
        gateway_note(client, section).await;
    }
    for (name, spec) in &file.service {
        let body = serde_json::json!({ "metadata": { "name": name }, "spec": spec });
        match client
            .call(
                Method::POST,
                "/api/v1/services",
                Some(serde_json::to_vec(&body)?),
            )
            .await
        {
            Ok((_, bytes)) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                println!(
                    "service/{name} {}",
                    v["result"].as_str().unwrap_or("applied")
                );
            }
            Err(e) => {
                failed = true;
                eprintln!("error: service/{name}: {e:#}");
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `apply` sends services only: a gateway reads its `[gateway]` table when it starts. Says so
/// when the file's table differs from the one the running `up` started with.
async fn gateway_note(client: &Client, section: &flotilla_spec::GatewaySection) {
    let running: Result<serde_json::Value> = client.get("/api/v1/gateway").await;
    let wanted = flotilla_spec::gateway_digest(Some(section));
    match running {
        Ok(v) if v["sectionDigest"].as_str() == Some(wanted.as_str()) => {
            println!("gateway unchanged");
        }
        Ok(_) => eprintln!(
            "note: the file's [gateway] table differs from the one `flotilla up` started with, and is not applied: gateway settings are read at start; restart `flotilla up -f FILE` to use them"
        ),
        Err(_) => eprintln!(
            "note: the file's [gateway] table is not applied: this server runs no gateway (a standalone `flotilla gateway -f FILE` reads it at start)"
        ),
    }
}

async fn get(
    client: &Client,
    kind: Kind,
    name: Option<String>,
    out: Output,
    selector: Option<String>,
    service: Option<String>,
) -> Result<ExitCode> {
    let mut query = Vec::new();
    if let Some(s) = &selector {
        query.push(format!("labelSelector={}", encode(s)));
    }
    if let Some(s) = &service {
        query.push(format!("service={}", encode(s)));
    }
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    let stdout = &mut std::io::stdout().lock();
    match (kind, name) {
        (Kind::Services, Some(name)) => {
            ensure_name("service", &name)?;
            let s: Service = client.get(&format!("/api/v1/services/{name}")).await?;
            print_one(stdout, out, &s, output::services_table)?;
        }
        (Kind::Services, None) => {
            let l: List<Service> = client.get(&format!("/api/v1/services{q}")).await?;
            print_items(stdout, out, &l.items, output::services_table)?;
        }
        (Kind::Instances, Some(name)) => {
            ensure_name("instance", &name)?;
            let i: Instance = client.get(&format!("/api/v1/instances/{name}")).await?;
            print_one(stdout, out, &i, output::instances_table)?;
        }
        (Kind::Instances, None) => {
            let l: List<Instance> = client.get(&format!("/api/v1/instances{q}")).await?;
            print_items(stdout, out, &l.items, output::instances_table)?;
        }
        (Kind::Servers, _) => {
            let view: output::ServersView = client.get("/api/v1/servers").await?;
            match out {
                Output::Json => writeln!(stdout, "{}", serde_json::to_string_pretty(&view)?)?,
                Output::Table | Output::Wide => write!(
                    stdout,
                    "{}",
                    output::servers_table(&view, out == Output::Wide)
                )?,
            }
        }
        (Kind::Nodes, name) => {
            let nodes: Vec<output::NodeView> = match &name {
                Some(name) => {
                    ensure_name("node", name)?;
                    vec![client.get(&format!("/api/v1/nodes/{name}")).await?]
                }
                None => {
                    client
                        .get::<List<output::NodeView>>("/api/v1/nodes")
                        .await?
                        .items
                }
            };
            let instances: List<Instance> = client.get("/api/v1/instances").await?;
            let rows: Vec<(output::NodeView, usize)> = nodes
                .into_iter()
                .map(|n| {
                    let count = instances
                        .items
                        .iter()
                        .filter(|i| i.spec.node == n.metadata.name)
                        .count();
                    (n, count)
                })
                .collect();
            match (out, name.is_some()) {
                (Output::Json, true) => {
                    writeln!(stdout, "{}", serde_json::to_string_pretty(&rows[0].0)?)?
                }
                (Output::Json, false) => {
                    let items: Vec<&output::NodeView> = rows.iter().map(|(n, _)| n).collect();
                    let v = serde_json::json!({ "items": items });
                    writeln!(stdout, "{}", serde_json::to_string_pretty(&v)?)?;
                }
                (Output::Table | Output::Wide, _) => write!(
                    stdout,
                    "{}",
                    output::nodes_table(&rows, out == Output::Wide)
                )?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A list prints as a table or as `{"items": [...]}`, whatever its length.
fn print_items<T: serde::Serialize>(
    w: &mut impl Write,
    out: Output,
    items: &[T],
    table: fn(&[T], bool) -> String,
) -> Result<()> {
    match out {
        Output::Json => {
            let v = serde_json::json!({ "items": items });
            writeln!(w, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        Output::Table => write!(w, "{}", table(items, false))?,
        Output::Wide => write!(w, "{}", table(items, true))?,
    }
    Ok(())
}

/// One named object prints as a table row or as the object itself.
fn print_one<T: serde::Serialize + Clone>(
    w: &mut impl Write,
    out: Output,
    item: &T,
    table: fn(&[T], bool) -> String,
) -> Result<()> {
    match out {
        Output::Json => writeln!(w, "{}", serde_json::to_string_pretty(item)?)?,
        Output::Table | Output::Wide => write!(
            w,
            "{}",
            table(std::slice::from_ref(item), out == Output::Wide)
        )?,
    }
    Ok(())
}

async fn describe_node(client: &Client, name: &str) -> Result<ExitCode> {
    ensure_name("node", name)?;
    let node: output::NodeView = client.get(&format!("/api/v1/nodes/{name}")).await?;
    let instances: List<Instance> = client.get("/api/v1/instances").await?;
    let here: Vec<Instance> = instances
        .items
        .into_iter()
        .filter(|i| i.spec.node == name)
        .collect();
    print!("{}", output::describe_node(&node, &here));
    Ok(ExitCode::SUCCESS)
}

async fn describe(client: &Client, name: &str) -> Result<ExitCode> {
    ensure_name("service", name)?;
    let service: Service = client.get(&format!("/api/v1/services/{name}")).await?;
    let instances: List<Instance> = client
        .get(&format!("/api/v1/instances?service={}", encode(name)))
        .await?;
    let events: List<Event> = client.get("/api/v1/events").await?;
    let related: Vec<Event> = events
        .items
        .into_iter()
        .filter(|e| {
            e.involved.name == name
                || instances
                    .items
                    .iter()
                    .any(|i| i.metadata.name == e.involved.name)
        })
        .collect();
    let recent = &related[related.len().saturating_sub(20)..];
    print!(
        "{}",
        output::describe_service(&service, &instances.items, recent)
    );
    Ok(ExitCode::SUCCESS)
}

/// What `logs` streams: the lines as they come, while noting which instances were followed
/// (from each line's `[instance]` prefix and the joined/left lines), so that a follow that
/// lost the API resumes with them at their end and the others from their start.
#[derive(Default)]
struct LogsSeen {
    known: std::collections::BTreeSet<String>,
    pending: Vec<u8>,
}

impl LogsSeen {
    fn note(&mut self, chunk: &[u8]) {
        self.pending.extend_from_slice(chunk);
        while let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end();
            if let Some(rest) = line.strip_prefix("--- ") {
                if let Some(name) = rest.strip_suffix(" joined") {
                    self.known.insert(name.to_string());
                } else if let Some(name) = rest.strip_suffix(" left") {
                    self.known.remove(name);
                }
            } else if let Some((name, _)) = line.strip_prefix('[').and_then(|l| l.split_once("] "))
            {
                self.known.insert(name.to_string());
            }
        }
    }
}

pub struct LogsArgs {
    pub service: String,
    pub instance: Option<String>,
    pub follow: bool,
    pub tail: Option<usize>,
    pub reconnect_for: std::time::Duration,
}

async fn logs(
    client: Client,
    connect: &dyn Fn() -> Result<Client>,
    args: LogsArgs,
) -> Result<ExitCode> {
    ensure_name("service", &args.service)?;
    let base = format!("/api/v1/services/{}/logs", args.service);
    let mut query = Vec::new();
    if let Some(i) = &args.instance {
        query.push(format!("instance={}", encode(i)));
    }
    if !args.follow {
        if let Some(t) = args.tail {
            query.push(format!("tail={t}"));
        }
        let (_, body) = client
            .call(Method::GET, &format!("{base}?{}", query.join("&")), None)
            .await?;
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&body)?;
        stdout.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    query.push("follow=true".to_string());
    let seen = std::cell::RefCell::new(LogsSeen::default());
    let mut connections = 0u32;
    let path = || {
        connections += 1;
        let mut q = query.clone();
        if connections == 1 {
            if let Some(t) = args.tail {
                q.push(format!("tail={t}"));
            }
        } else if args.instance.is_some() {
            // The same instance again: only what it writes from now on.
            q.push("tail=0".to_string());
        } else {
            let known: Vec<String> = seen.borrow().known.iter().map(|n| encode(n)).collect();
            q.push(format!("known={}", known.join(",")));
        }
        format!("{base}?{}", q.join("&"))
    };
    let mut stdout = std::io::stdout();
    crate::follow::follow(
        client,
        connect,
        path,
        |chunk| {
            seen.borrow_mut().note(chunk);
            stdout.write_all(chunk)?;
            stdout.flush()?;
            Ok(())
        },
        args.reconnect_for,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

async fn events(
    client: Client,
    connect: &dyn Fn() -> Result<Client>,
    follow: bool,
    out: Output,
    reconnect_for: std::time::Duration,
) -> Result<ExitCode> {
    if !follow {
        let l: List<Event> = client.get("/api/v1/events").await?;
        print_items(
            &mut std::io::stdout().lock(),
            out,
            &l.items,
            output::events_table,
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut pending = Vec::new();
    let mut header = out != Output::Json;
    // The revision of the last event shown: a lost stream resumes after it.
    let last = std::cell::Cell::new(0u64);
    let path = || match last.get() {
        0 => "/api/v1/events?follow=true".to_string(),
        rev => format!("/api/v1/events?follow=true&since={rev}"),
    };
    crate::follow::follow(
        client,
        connect,
        path,
        |chunk| {
            pending.extend_from_slice(chunk);
            let mut stdout = std::io::stdout().lock();
            while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let e: Event = serde_json::from_slice(&line).context("bad event from the API")?;
                last.set(last.get().max(e.metadata.resource_version));
                match out {
                    Output::Json => stdout.write_all(&line)?,
                    Output::Table | Output::Wide => {
                        if header {
                            write!(stdout, "{}", output::events_header())?;
                            header = false;
                        }
                        write!(stdout, "{}", output::event_row(&e, out == Output::Wide))?;
                    }
                }
            }
            stdout.flush()?;
            Ok(())
        },
        reconnect_for,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// `flotilla down`: SIGINT to the running `up` found by its context file, then waits for it to
/// exit (it stops every workload first, each within its grace period).
async fn down(data_dir: Option<&std::path::Path>) -> Result<ExitCode> {
    let Some(ctx) = crate::context::find_context(data_dir)? else {
        bail!(
            "no flotilla up is running{} (nothing to stop)",
            data_dir.map_or(String::new(), |d| format!(
                " with --data-dir {}",
                d.display()
            ))
        );
    };
    let pid = nix::unistd::Pid::from_raw(
        i32::try_from(ctx.pid)
            .map_err(|_| anyhow!("invalid pid {} in the context file", ctx.pid))?,
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)
        .with_context(|| format!("signalling flotilla up (pid {})", ctx.pid))?;
    eprintln!(
        "stopping flotilla up (pid {}, {}): every workload, then itself",
        ctx.pid,
        ctx.data_dir.display()
    );
    let started = std::time::Instant::now();
    while nix::sys::signal::kill(pid, None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{}/stat", ctx.pid))
            .unwrap_or_default()
            .contains(") Z ")
    {
        if started.elapsed() > std::time::Duration::from_secs(600) {
            bail!(
                "flotilla up (pid {}) is still stopping after 10 minutes",
                ctx.pid
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    println!("flotilla up stopped");
    Ok(ExitCode::SUCCESS)
}
