//! A fleet on one machine: a `flotilla server`, agents on their own loopback addresses (one
//! per node: 127.77.N.I) and a standalone `flotilla gateway`, all real processes. Covers
//! placement over nodes, traffic through the gateway to every node, the loss of a node under
//! load, and a frozen agent that comes back to instances replaced meanwhile.
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)] // figures are printed for `--nocapture` runs

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "../../store/tests/support/etcd.rs"]
mod etcd_support;

use common::{flotilla_bin, http, http_on, instance_of, path_with_demo, wait_for};
use flotilla_pki::rustls;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A process a test started does not outlive it (a stopped one is woken to be killed).
impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // reaped already: its pid may be another process's now
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Agent {
    proc: Option<Proc>,
    address: String,
    data: PathBuf,
    /// The API address this agent uses, when not the server's own (a [`Link`]).
    api: Option<String>,
    /// More arguments for `flotilla agent`.
    extra: Vec<String>,
}

/// A TLS client configuration trusting the cluster CA of `ca`, showing the member
/// certificate kept in `member` (an agent's data directory) when given.
fn tls_config(ca: &std::path::Path, member: Option<&std::path::Path>) -> Arc<rustls::ClientConfig> {
    let ca = std::fs::read_to_string(ca).unwrap();
    let identity = member.map(|dir| {
        let cert = std::fs::read_to_string(dir.join("node.crt")).unwrap();
        let key = std::fs::read_to_string(dir.join("node.key")).unwrap();
        flotilla_pki::ClientIdentity::new(&cert, &key).unwrap()
    });
    flotilla_pki::client_config(&ca, identity).unwrap()
}

/// One HTTPS request (`Connection: close`) to `addr` with `tls`, with a bearer token if given.
fn https(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<common::Http> {
    let tcp = std::net::TcpStream::connect(addr).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").ok()?;
    let conn = rustls::ClientConnection::new(tls.clone(), name).ok()?;
    let stream = rustls::StreamOwned::new(conn, tcp);
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    http_on(stream, addr, method, path, &headers, body)
}

/// A request with a bearer token: status and body (0 and empty when nothing answered).
fn call(
    api: &str,
    tls: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, String) {
    https(api, tls, method, path, Some(token), "")
        .map_or((0, String::new()), |r| (r.status, r.body))
}

struct Fleet {
    dir: tempfile::TempDir,
    api: String,
    /// The cluster CA (the server's `ca.crt`), and a TLS configuration trusting it.
    ca: PathBuf,
    tls: Arc<rustls::ClientConfig>,
    /// The admin token (for the test's own reads and the CLI).
    token: String,
    /// What agents join with.
    join: String,
    server: Proc,
    agents: BTreeMap<String, Agent>,
    gateway: Option<(Proc, String)>,
}

impl Fleet {
    /// A server and `nodes` agents named node-1… on 127.77.`net`.1…
    fn start(net: u8, nodes: u8) -> Fleet {
        Self::start_with(net, nodes, &[])
    }

    /// The same, with more arguments for `flotilla server`.
    fn start_with(net: u8, nodes: u8, server_args: &[&str]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let api = format!("127.0.0.1:{}", free_port());
        let data = dir.path().join("server");
        let mut args = vec![
            "--data-dir",
            data.to_str().unwrap(),
            "server",
            "--listen",
            &api,
        ];
        args.extend_from_slice(server_args);
        let server = spawn(&dir, "server", &args, &[]);
        let token_file = dir.path().join("server/admin.token");
        let token = wait_for("the server's token", Duration::from_secs(20), || {
            std::fs::read_to_string(&token_file)
                .ok()
                .filter(|t| !t.trim().is_empty())
        })
        .trim()
        .to_string();
        let ca = dir.path().join("server/ca.crt");
        wait_for("the cluster CA", Duration::from_secs(20), || {
            std::fs::metadata(&ca).ok().filter(|m| m.len() > 0)
        });
        let tls = tls_config(&ca, None);
        let mut fleet = Fleet {
            dir,
            api,
            ca,
            tls,
            token,
            join: String::new(),
            server,
            agents: BTreeMap::new(),
            gateway: None,
        };
        wait_for("the server's API", Duration::from_secs(20), || {
            https(&fleet.api, &fleet.tls, "GET", "/healthz", None, "").filter(|r| r.status == 200)
        });
        fleet.join = fleet.new_token(&["--join", "--ttl", "10m"]);
        for i in 1..=nodes {
            let name = format!("node-{i}");
            let agent = Agent {
                proc: None,
                address: format!("127.77.{net}.{i}"),
                data: fleet.dir.path().join(&name),
                api: None,
                extra: Vec::new(),
            };
            fleet.agents.insert(name.clone(), agent);
            fleet.start_agent(&name);
        }
        wait_for("every node Ready", Duration::from_secs(20), || {
            (fleet.ready_nodes().len() == usize::from(nodes)).then_some(())
        });
        fleet
    }

    fn start_agent(&mut self, name: &str) {
        let agent = &self.agents[name];
        let (address, data) = (agent.address.clone(), agent.data.clone());
        // `api` may name several servers (`a,b`): the agent fails over between them.
        let api = agent
            .api
            .as_deref()
            .unwrap_or(&self.api)
            .split(',')
            .map(|a| format!("https://{a}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec![
            "--data-dir",
            data.to_str().unwrap(),
            "agent",
            "--api",
            &api,
            "--node",
            name,
            "--address",
            &address,
            "--lease",
            "3s",
        ];
        // Placement must not hang on how full this machine's disk happens to be.
        if !agent.extra.iter().any(|a| a == "--pressure-disk") {
            args.extend(["--pressure-disk", "0%"]);
        }
        args.extend(agent.extra.iter().map(String::as_str));
        let env = [("FLOTILLA_TOKEN", self.join.as_str())];
        // node-2 runs `flotilla-agent`, the others `flotilla agent`: every fleet test sees both.
        let proc = if name == "node-2" {
            args.retain(|a| *a != "agent");
            spawn_bin(&agent_bin(), &self.dir, name, &args, &env)
        } else {
            spawn(&self.dir, name, &args, &env)
        };
        self.agents.get_mut(name).unwrap().proc = Some(proc);
    }

    /// Stops `name`'s agent (SIGINT: its instances stop) and starts it again through `api`.
    fn restart_agent_via(&mut self, name: &str, api: &str) {
        let agent = self.agents.get_mut(name).unwrap();
        if let Some(mut p) = agent.proc.take() {
            let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGINT);
            let _ = p.child.wait();
        }
        agent.api = Some(api.to_string());
        self.start_agent(name);
    }

    /// Stops the server (SIGTERM) and starts it again on the same data directory and
    /// address, with `extra` arguments; returns once its API answers.
    fn restart_server(&mut self, extra: &[&str]) {
        let _ = kill(
            Pid::from_raw(self.server.child.id() as i32),
            Signal::SIGTERM,
        );
        let _ = self.server.child.wait();
        let data = self.dir.path().join("server");
        let api = self.api.clone();
        let mut args = vec![
            "--data-dir",
            data.to_str().unwrap(),
            "server",
            "--listen",
            &api,
        ];
        args.extend_from_slice(extra);
        self.server = spawn(&self.dir, "server", &args, &[]);
        wait_for(
            "the restarted server's API",
            Duration::from_secs(20),
            || https(&self.api, &self.tls, "GET", "/healthz", None, "").filter(|r| r.status == 200),
        );
    }

    /// A CLI command that must succeed: what it printed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "flotilla {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `flotilla token create ARGS`: the token printed.
    fn new_token(&self, args: &[&str]) -> String {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn start_gateway(&mut self) -> String {
        let api = self.api.clone();
        self.start_gateway_via(&api)
    }

    /// A gateway reaching the API at `api` (`host:port`, or several comma-separated).
    fn start_gateway_via(&mut self, api: &str) -> String {
        let listen = format!("127.0.0.1:{}", free_port());
        let api: Vec<String> = api.split(',').map(|a| format!("https://{a}")).collect();
        let api = api.join(",");
        let token = self.new_token(&["--gateway", "--ttl", "1h"]);
        let proc = spawn(
            &self.dir,
            "gateway",
            &["gateway", "--api", &api, "--listen", &listen],
            &[("FLOTILLA_TOKEN", &token)],
        );
        wait_for("the gateway to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&listen).ok()
        });
        self.gateway = Some((proc, listen.clone()));
        listen
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(flotilla_bin())
            .args(args)
            .env("FLOTILLA_API", &self.api)
            .env("FLOTILLA_TOKEN", &self.token)
            .env("FLOTILLA_CA", &self.ca)
            .env("FLOTILLA_CONFIG_DIR", self.dir.path().join("config"))
            .output()
            .unwrap()
    }

    /// A request with the bearer `token`: status and body.
    fn call(&self, method: &str, path: &str, token: &str, body: &str) -> (u16, String) {
        let r = https(&self.api, &self.tls, method, path, Some(token), body)
            .unwrap_or_else(|| panic!("{method} {path}: no answer"));
        (r.status, r.body)
    }

    /// A request as node `node`, with the certificate its agent keeps: status and body.
    fn call_as_node(&self, node: &str, method: &str, path: &str, body: &str) -> (u16, String) {
        let tls = tls_config(&self.ca, Some(&self.agents[node].data));
        let r = https(&self.api, &tls, method, path, None, body)
            .unwrap_or_else(|| panic!("{method} {path}: no answer"));
        (r.status, r.body)
    }

    /// A GET that must answer 200. A 503 naming the store is retried for up to 15 s: right
    /// after etcd members come back, their election answers a read or two with it, and the
    /// server says to retry; a store that stays unavailable still fails the test.
    fn get(&self, path: &str) -> Value {
        let r = wait_for(
            &format!("GET {path} without a 503 from the store"),
            Duration::from_secs(15),
            || {
                let r = https(&self.api, &self.tls, "GET", path, Some(&self.token), "")
                    .unwrap_or_else(|| panic!("GET {path}: no answer"));
                (r.status != 503 || !r.body.contains("StoreUnavailable")).then_some(r)
            },
        );
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        serde_json::from_str(&r.body).unwrap()
    }

    fn apply(&self, text: &str) {
        let path = self.dir.path().join("services.toml");
        std::fs::write(&path, text).unwrap();
        let out = self.cli(&["apply", "-f", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ready_nodes(&self) -> Vec<String> {
        self.get("/api/v1/nodes")["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| {
                n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == true)
                })
            })
            .map(|n| n["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn instances(&self, service: &str) -> Vec<Value> {
        self.get(&format!("/api/v1/instances?service={service}"))["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn ready_instances(&self, service: &str) -> Vec<Value> {
        self.instances(service)
            .into_iter()
            .filter(|i| {
                i["status"]["ready"] == true && i["metadata"]["deletionTimestamp"].is_null()
            })
            .collect()
    }

    fn logs(&self) -> String {
        let mut out = format!("--- server\n{}", self.server.log());
        for (name, a) in &self.agents {
            if let Some(p) = &a.proc {
                out.push_str(&format!("\n--- {name}\n{}", p.log()));
            }
        }
        if let Some((g, _)) = &self.gateway {
            out.push_str(&format!("\n--- gateway\n{}", g.log()));
        }
        out
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Agents first (Ctrl-C: they stop their instances), then the rest; then whatever the
        // agents a test killed left running.
        for a in self.agents.values_mut() {
            if let Some(p) = a.proc.as_mut() {
                let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGCONT);
                let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGINT);
            }
        }
        for a in self.agents.values_mut() {
            if let Some(p) = a.proc.as_mut() {
                let _ = p.child.wait();
            }
        }
        common::kill_shims_under(self.dir.path());
        let mut rest: Vec<&mut Proc> = vec![&mut self.server];
        if let Some((g, _)) = self.gateway.as_mut() {
            rest.push(g);
        }
        for p in rest {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

fn spawn(dir: &tempfile::TempDir, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    spawn_bin(&flotilla_bin(), dir, name, args, env)
}

/// `flotilla-agent`, the agent alone (the same arguments as `flotilla agent`).
fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flotilla-agent"))
}

fn spawn_bin(
    bin: &Path,
    dir: &tempfile::TempDir,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let log = dir
        .path()
        .join(format!("{name}-{}.log", common::rand_suffix()));
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("PATH", path_with_demo())
        .env("FLOTILLA_LOG", "info")
        .env("FLOTILLA_CONFIG_DIR", dir.path().join("config"))
        .env_remove("FLOTILLA_TOKEN")
        .env_remove("FLOTILLA_API")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc {
        child: cmd.spawn().unwrap(),
        log,
    }
}

/// A demo service of `replicas` listening on its node's address.
fn web(replicas: u32) -> String {
    format!(
        r#"
[service.web]
command = "flotilla-demo"
args = ["--listen", "${{FLOTILLA_HOST}}:${{PORT}}"]
replicas = {replicas}
ports = ["http"]
stop = {{ grace_period = "2s" }}

[service.web.probes.readiness]
http = {{ path = "/health" }}
period = "200ms"
timeout = "200ms"
failure_threshold = 1

[[service.web.routes]]
path = "/"
"#
    )
}

fn node_of(i: &Value) -> String {
    i["spec"]["node"].as_str().unwrap_or_default().to_string()
}

fn per_node(instances: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for i in instances {
        *m.entry(node_of(i)).or_insert(0) += 1;
    }
    m
}

fn pid_of(i: &Value) -> i32 {
    i["status"]["pid"].as_i64().unwrap() as i32
}

fn alive(pid: i32) -> bool {
    // Signal 0: exists (a zombie counts as gone once reaped by its parent, the agent).
    kill(Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Requests through the gateway in two threads (GETs and POSTs) until stopped; counts.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<[AtomicU64; 2]>,
    failed: Arc<[AtomicU64; 2]>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(gateway: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let failed: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let mut threads = Vec::new();
        for (k, method) in ["GET", "POST"].into_iter().enumerate() {
            let (stop, ok, failed, gw) = (
                stop.clone(),
                ok.clone(),
                failed.clone(),
                gateway.to_string(),
            );
            threads.push(std::thread::spawn(move || {
                let mut failures = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match http(&gw, method, "/", &[], "ping") {
                        Some(r) if r.status == 200 => {
                            ok[k].fetch_add(1, Ordering::SeqCst);
                        }
                        other => {
                            failed[k].fetch_add(1, Ordering::SeqCst);
                            failures
                                .push(format!("{method}: {:?}", other.map(|r| (r.status, r.body))));
                        }
                    }
                    // The pace of the load, not synchronization.
                    #[allow(clippy::disallowed_methods)]
                    std::thread::sleep(Duration::from_millis(5));
                }
                failures
            }));
        }
        Load {
            stop,
            ok,
            failed,
            threads,
        }
    }

    /// (ok, failed) per method (GET, POST), and what the failures were.
    fn finish(self) -> ([u64; 2], [u64; 2], Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        for t in self.threads {
            failures.extend(t.join().unwrap());
        }
        let get = |a: &[AtomicU64; 2]| [a[0].load(Ordering::SeqCst), a[1].load(Ordering::SeqCst)];
        (get(&self.ok), get(&self.failed), failures)
    }
}

/// A standalone agent (server, gateway and agent apart) is `kill -9`ed under load through the
/// gateway and started again: its instances keep running and serving meanwhile (0 failed
/// requests), the new agent re-adopts them (same pids, no restart) and supervises them again:
/// an instance killed afterwards is reported and replaced.
#[test]
fn a_killed_agent_leaves_its_instances_serving_and_the_next_one_adopts_them() {
    let mut fleet = Fleet::start(13, 1);
    let gateway = fleet.start_gateway();
    fleet.apply(&web(2));
    let ready = wait_for("two ready instances", Duration::from_secs(30), || {
        let r = fleet.ready_instances("web");
        (r.len() == 2).then_some(r)
    });
    let before: BTreeMap<String, i32> = ready
        .iter()
        .map(|i| {
            (
                i["metadata"]["name"].as_str().unwrap().to_string(),
                pid_of(i),
            )
        })
        .collect();

    let load = Load::start(&gateway);
    wait_for("some load", Duration::from_secs(10), || {
        (load.ok[0].load(Ordering::SeqCst) > 20 && load.ok[1].load(Ordering::SeqCst) > 20)
            .then_some(())
    });
    let mut agent = fleet.agents.get_mut("node-1").unwrap().proc.take().unwrap();
    agent.child.kill().unwrap();
    let _ = agent.child.wait();
    // Load goes on while no agent runs.
    let while_down = load.ok[1].load(Ordering::SeqCst) + 50;
    wait_for(
        "load while the agent is down",
        Duration::from_secs(10),
        || (load.ok[1].load(Ordering::SeqCst) >= while_down).then_some(()),
    );
    for pid in before.values() {
        assert!(alive(*pid), "process {pid} died with its agent");
    }
    fleet.start_agent("node-1");
    let adopted = wait_for("both instances re-adopted", Duration::from_secs(20), || {
        let events = fleet.get("/api/v1/events");
        let n = events["items"]
            .as_array()
            .map(|items| items.iter().filter(|e| e["reason"] == "Adopted").count())
            .unwrap_or(0);
        (n == 2).then_some(events)
    });
    let after = load.ok[1].load(Ordering::SeqCst) + 50;
    wait_for("load after the restart", Duration::from_secs(10), || {
        (load.ok[1].load(Ordering::SeqCst) >= after).then_some(())
    });
    let (ok, failed, failures) = load.finish();
    assert_eq!(failed, [0, 0], "failed requests of {ok:?} ok: {failures:?}");
    let now: BTreeMap<String, i32> = fleet
        .ready_instances("web")
        .iter()
        .map(|i| {
            assert_eq!(i["status"]["restarts"], 0, "{i:#}");
            (
                i["metadata"]["name"].as_str().unwrap().to_string(),
                pid_of(i),
            )
        })
        .collect();
    assert_eq!(now, before, "events: {adopted:#}");

    // Supervised again: a process killed now is seen ending and is restarted.
    let (name, pid) = before.iter().next().map(|(n, p)| (n.clone(), *p)).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let restarted = wait_for(
        "the killed instance restarted",
        Duration::from_secs(20),
        || {
            let i = fleet.get(&format!("/api/v1/instances/{name}"));
            (i["status"]["restarts"] == 1 && i["status"]["ready"] == true && pid_of(&i) != pid)
                .then_some(i)
        },
    );
    assert_eq!(
        restarted["status"]["lastExit"]["signal"], 9,
        "{restarted:#}"
    );
}

/// 1 server + 3 agents: six replicas spread 2/2/2, each listening on its node's address, and
/// the gateway reaches all six. Then one node dies under load (`kill -9` of its agent and of
/// every instance on it): its instances are ready on the other nodes within 10 s, and
/// requests through the gateway keep succeeding: at most one GET fails, and a couple of POSTs
/// (those already sent to a dead instance, which are not retried).
#[test]
fn six_replicas_spread_over_three_nodes_and_survive_the_loss_of_one() {
    let mut fleet = Fleet::start(1, 3);
    let gateway = fleet.start_gateway();
    fleet.apply(&web(6));
    let ready = wait_for("six ready instances", Duration::from_secs(30), || {
        let r = fleet.ready_instances("web");
        (r.len() == 6).then_some(r)
    });
    let spread = per_node(&ready);
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{spread:?}"
    );
    for i in &ready {
        let node = node_of(i);
        assert_eq!(
            i["status"]["host"].as_str(),
            Some(fleet.agents[&node].address.as_str()),
            "instance on {node} listens on another address: {i:#}"
        );
    }
    // The gateway reaches every instance on every node.
    let names: Vec<String> = ready
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..300 {
        if let Some(r) = http(&gateway, "GET", "/", &[], "")
            && r.status == 200
            && let Some(name) = instance_of(&r.body)
        {
            seen.insert(name);
        }
        if seen.len() == 6 {
            break;
        }
    }
    assert_eq!(
        seen.iter().cloned().collect::<Vec<_>>(),
        {
            let mut n = names.clone();
            n.sort();
            n
        },
        "instances reached through the gateway"
    );

    // node-3 dies under load: its agent and every process on it.
    let load = Load::start(&gateway);
    wait_for("some load", Duration::from_secs(10), || {
        (load.ok[0].load(Ordering::SeqCst) > 20 && load.ok[1].load(Ordering::SeqCst) > 20)
            .then_some(())
    });
    let victims: Vec<i32> = ready
        .iter()
        .filter(|i| node_of(i) == "node-3")
        .map(pid_of)
        .collect();
    let mut agent = fleet.agents.get_mut("node-3").unwrap().proc.take().unwrap();
    let killed = Instant::now();
    agent.child.kill().unwrap();
    for pid in &victims {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let _ = agent.child.wait();
    let recovered = wait_for(
        "six ready instances on the two nodes left",
        Duration::from_secs(30),
        || {
            let r = fleet.ready_instances("web");
            (r.len() == 6 && r.iter().all(|i| node_of(i) != "node-3")).then_some(r)
        },
    );
    let took = killed.elapsed();
    // Some more load after the recovery, then the counts.
    let after = load.ok[1].load(Ordering::SeqCst) + 50;
    wait_for("load after the recovery", Duration::from_secs(10), || {
        (load.ok[1].load(Ordering::SeqCst) >= after).then_some(())
    });
    let (ok, failed, failures) = load.finish();
    assert!(
        took < Duration::from_secs(10),
        "replacement took {took:?}\n{}",
        fleet.logs()
    );
    assert_eq!(
        per_node(&recovered).values().copied().collect::<Vec<_>>(),
        [3, 3]
    );
    assert!(ok[0] > 100 && ok[1] > 100, "too little load: {ok:?}");
    // GETs are retried on another instance whatever happened; a POST is retried only when it
    // was never sent. One written on a kept-alive connection the dead instance's kernel
    // reset may have been processed, so it fails rather than run twice: a handful at most.
    // GETs almost never: about one run in ten saw a single 502 (perhaps a retry across the
    // table swap that removed the dead instances, still to be understood).
    assert!(failed[0] <= 1, "failed GETs of {ok:?} ok: {failures:?}");
    assert!(
        failed[1] <= 2,
        "failed POSTs {} of {} ok: {failures:?}",
        failed[1],
        ok[1]
    );
    println!(
        "node loss → six ready elsewhere in {took:?}; {} GETs ({} failed) and {} POSTs ({} failed)",
        ok[0], failed[0], ok[1], failed[1]
    );

    // What a user sees: node-3 NotReady, the loss in the events.
    let nodes = fleet.cli(&["get", "nodes"]);
    let text = String::from_utf8_lossy(&nodes.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("node-3"))
        .unwrap_or_default();
    assert!(line.contains("NotReady"), "{text}");
    let events = fleet.cli(&["events"]);
    let text = String::from_utf8_lossy(&events.stdout);
    assert!(
        text.contains("NodeLost") && text.contains("node node-3 is not ready"),
        "{text}"
    );
}

/// An agent frozen (SIGSTOP) is a node cut off while its processes still run: its lease
/// expires, its instances are replaced on the other nodes, and when it thaws it stops the
/// processes of the instances that were replaced and the node is Ready again.
#[test]
fn a_frozen_node_is_replaced_and_stops_its_superseded_instances_when_it_thaws() {
    let fleet = Fleet::start(2, 2);
    fleet.apply(&web(2));
    let ready = wait_for("two ready instances", Duration::from_secs(30), || {
        let r = fleet.ready_instances("web");
        (r.len() == 2).then_some(r)
    });
    assert_eq!(per_node(&ready).len(), 2, "not spread: {ready:#?}");
    let frozen_instance = ready.iter().find(|i| node_of(i) == "node-2").unwrap();
    let pid = pid_of(frozen_instance);
    let agent_pid = fleet.agents["node-2"].proc.as_ref().unwrap().child.id() as i32;
    kill(Pid::from_raw(agent_pid), Signal::SIGSTOP).unwrap();

    wait_for(
        "both instances ready on node-1",
        Duration::from_secs(20),
        || {
            let r = fleet.ready_instances("web");
            (r.len() == 2 && r.iter().all(|i| node_of(i) == "node-1")).then_some(())
        },
    );
    assert!(alive(pid), "the frozen node's process should still run");
    assert!(!fleet.ready_nodes().contains(&"node-2".to_string()));

    kill(Pid::from_raw(agent_pid), Signal::SIGCONT).unwrap();
    wait_for(
        "the thawed agent to stop its superseded instance",
        Duration::from_secs(20),
        || (!alive(pid)).then_some(()),
    );
    wait_for("node-2 Ready again", Duration::from_secs(20), || {
        fleet
            .ready_nodes()
            .contains(&"node-2".to_string())
            .then_some(())
    });
    // Nothing moves back: the two replacements stay where they are.
    let now = fleet.ready_instances("web");
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|i| node_of(i) == "node-1"), "{now:#?}");
}

/// Nodes join with a short-lived join token and get a certificate of their own from the
/// cluster CA, which reaches only their own instances: not another node's, not a service. A
/// wrong or expired join token is refused, and so is joining under the name of a live node,
/// or with a certificate of another cluster. A gateway token is only exchanged for a gateway
/// certificate, which only reads.
#[test]
fn join_tokens_and_node_certificates_are_scoped() {
    let fleet = Fleet::start(3, 2);
    fleet.apply(&web(2));
    wait_for("two ready instances", Duration::from_secs(30), || {
        (fleet.ready_instances("web").len() == 2).then_some(())
    });
    let data = &fleet.agents["node-1"].data;
    let cert =
        std::fs::read_to_string(data.join("node.crt")).expect("node-1 saved its certificate");
    let der = flotilla_pki::parse_cert("node-1", &cert).unwrap();
    assert_eq!(
        flotilla_pki::identity_of(&der),
        Some(flotilla_pki::Identity {
            role: flotilla_pki::Role::Node,
            name: "node-1".into()
        })
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "node.key is readable by its owner only");

    // Its own instances: yes. Another node's, all instances, a service: no.
    let (status, body) = fleet.call_as_node("node-1", "GET", "/api/v1/nodes/node-1/instances", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    for (method, path) in [
        ("GET", "/api/v1/nodes/node-2/instances"),
        ("GET", "/api/v1/instances"),
        ("GET", "/api/v1/services"),
        ("GET", "/api/v1/watch/instances?node=node-2"),
        ("POST", "/api/v1/services"),
        ("DELETE", "/api/v1/services/web"),
        ("POST", "/api/v1/tokens"),
        ("POST", "/api/v1/nodes/node-2/credential"),
    ] {
        let (status, body) = fleet.call_as_node("node-1", method, path, "{}");
        assert_eq!(
            status, 403,
            "{method} {path} with node-1's certificate: {body}"
        );
        assert!(body.contains("node-1"), "{body}");
    }
    // A write of another node's instance status through its own path is refused by the
    // node rules (it is not found there).
    let other = fleet
        .instances("web")
        .into_iter()
        .find(|i| node_of(i) == "node-2")
        .unwrap();
    let name = other["metadata"]["name"].as_str().unwrap();
    let (status, _) = fleet.call_as_node(
        "node-1",
        "PUT",
        &format!("/api/v1/nodes/node-1/instances/{name}/status"),
        &serde_json::json!({"resourceVersion": 1, "status": {"phase": "Failed"}}).to_string(),
    );
    assert_eq!(status, 404);
    // Without a token or a certificate: nothing.
    let anonymous = https(&fleet.api, &fleet.tls, "GET", "/api/v1/nodes", None, "").unwrap();
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);

    // Join: a made-up token, an expired one, a live node's name.
    let (_, csr) = flotilla_pki::new_key_and_csr("node-9").unwrap();
    let join = |token: &str, node: &str| {
        fleet.call(
            "POST",
            "/api/v1/join",
            token,
            &serde_json::json!({ "node": node, "csr": csr }).to_string(),
        )
    };
    let forged = fleet.join.replace("flt.join.", "flt.join.0").to_string();
    let (status, body) = join(&forged, "node-9");
    assert_eq!(status, 401, "{body}");
    let (status, body) = join("not-a-token", "node-9");
    assert_eq!(status, 401, "{body}");
    let (status, body) = join(&fleet.join, "node-2");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("live member"), "{body}");
    let (status, body) = fleet.call(
        "POST",
        "/api/v1/join",
        &fleet.join,
        r#"{"node":"node-9","csr":"garbage"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("csr"), "{body}");
    let short = fleet.new_token(&["--join", "--ttl", "1s"]);
    let (status, body) = wait_for(
        "the 1s join token to expire",
        Duration::from_secs(10),
        || {
            let (status, body) = join(&short, "node-9");
            (status != 200).then_some((status, body))
        },
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("expired"), "{body}");
    // A join token is for joining only.
    let (status, _) = fleet.call("GET", "/api/v1/nodes", &fleet.join, "");
    assert_eq!(status, 403);
    // An agent started with a bad join token says so and exits, without echoing it.
    let agent_with = |token: &str| {
        Command::new(flotilla_bin())
            .args(["--data-dir"])
            .arg(fleet.dir.path().join("node-9"))
            .args([
                "agent",
                "--api",
                &format!("https://{}", fleet.api),
                "--node",
                "node-9",
                "--address",
                "127.77.3.9",
            ])
            .env("FLOTILLA_TOKEN", token)
            .env("FLOTILLA_CONFIG_DIR", fleet.dir.path().join("config"))
            .output()
            .unwrap()
    };
    let bad = agent_with(&forged);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("joining") && err.contains("signature"),
        "{err}"
    );
    assert!(!err.contains(&forged), "the token was echoed: {err}");
    // A token whose pin names another CA: the agent does not even send it.
    let pin = fleet
        .join
        .split('.')
        .nth(2)
        .unwrap()
        .split('-')
        .nth(1)
        .unwrap()
        .to_string();
    let wrong_pin = fleet.join.replace(&pin, &"0".repeat(64));
    let bad = agent_with(&wrong_pin);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("pin"), "{err}");

    // A certificate of another cluster's CA is refused at the handshake.
    let other = tempfile::tempdir().unwrap();
    let other_ca = flotilla_pki::Authority::load_or_create(other.path()).unwrap();
    let (key, csr) = flotilla_pki::new_key_and_csr("node-1").unwrap();
    let node1 = flotilla_pki::Identity {
        role: flotilla_pki::Role::Node,
        name: "node-1".into(),
    };
    let (cert, _) = other_ca
        .sign(&csr, &node1, Duration::from_secs(600))
        .unwrap();
    let ca_pem = std::fs::read_to_string(&fleet.ca).unwrap();
    let foreign = flotilla_pki::client_config(
        &ca_pem,
        Some(flotilla_pki::ClientIdentity::new(&cert, &key).unwrap()),
    )
    .unwrap();
    let r = https(
        &fleet.api,
        &foreign,
        "GET",
        "/api/v1/nodes/node-1/instances",
        None,
        "",
    );
    assert!(
        r.is_none_or(|r| r.status != 200),
        "a foreign certificate was accepted"
    );

    // A gateway token only gets a gateway certificate; that reads what a gateway routes from,
    // and nothing else.
    let gw = fleet.new_token(&["--gateway", "--ttl", "1h"]);
    assert_eq!(fleet.call("GET", "/api/v1/services", &gw, "").0, 403);
    let (key, csr) = flotilla_pki::new_key_and_csr("gw").unwrap();
    let (status, body) = fleet.call(
        "POST",
        "/api/v1/gateways/credential",
        &gw,
        &serde_json::json!({ "csr": csr }).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let issued: Value = serde_json::from_str(&body).unwrap();
    let gw_tls = flotilla_pki::client_config(
        &ca_pem,
        Some(
            flotilla_pki::ClientIdentity::new(issued["certificate"].as_str().unwrap(), &key)
                .unwrap(),
        ),
    )
    .unwrap();
    let as_gateway = |method: &str, path: &str| {
        https(&fleet.api, &gw_tls, method, path, None, "{}")
            .unwrap()
            .status
    };
    assert_eq!(as_gateway("GET", "/api/v1/services"), 200);
    assert_eq!(as_gateway("GET", "/api/v1/instances"), 200);
    assert_eq!(as_gateway("POST", "/api/v1/services"), 403);
    assert_eq!(as_gateway("GET", "/api/v1/events"), 403);
    assert_eq!(as_gateway("GET", "/api/v1/nodes/node-1/instances"), 403);
}

/// Node certificates are renewed at half-life and kept: with 12 s certificates the agent's
/// changes within seconds, the first is refused once it has expired, and the node stays
/// Ready throughout on the renewed ones.
#[test]
fn node_certificates_are_renewed_before_they_expire() {
    let fleet = Fleet::start_with(7, 1, &["--certificate-ttl", "12s"]);
    let data = fleet.agents["node-1"].data.clone();
    let first = std::fs::read_to_string(data.join("node.crt")).unwrap();
    let first_tls = tls_config(&fleet.ca, Some(&data));
    let own = "/api/v1/nodes/node-1/instances";
    let with_first = || https(&fleet.api, &first_tls, "GET", own, None, "").map(|r| r.status);
    assert_eq!(with_first(), Some(200));
    let expires = std::time::SystemTime::now() + Duration::from_secs(12);
    wait_for("a renewed certificate", Duration::from_secs(20), || {
        let now = std::fs::read_to_string(data.join("node.crt")).ok()?;
        (now != first).then_some(())
    });
    wait_for(
        "the renewed certificate to work",
        Duration::from_secs(10),
        || (fleet.call_as_node("node-1", "GET", own, "").0 == 200).then_some(()),
    );
    wait_for(
        "the first certificate to be refused",
        Duration::from_secs(20),
        || (with_first() != Some(200)).then_some(()),
    );
    assert!(std::time::SystemTime::now() + Duration::from_secs(1) >= expires);
    // A heartbeat made well after the first one's expiry: the agent renewed its lease on a
    // renewed certificate, and the node is Ready.
    wait_for(
        "a heartbeat after the first expiry",
        Duration::from_secs(20),
        || {
            let node = fleet.get("/api/v1/nodes/node-1");
            let age = Duration::from_millis(node["heartbeat"]["ageMillis"].as_u64()?);
            let since = std::time::SystemTime::now().duration_since(expires).ok()?;
            (since > age + Duration::from_secs(2)).then_some(())
        },
    );
    assert_eq!(
        fleet.ready_nodes(),
        vec!["node-1".to_string()],
        "{}",
        fleet.logs()
    );
    let log = fleet.agents["node-1"].proc.as_ref().unwrap().log();
    assert!(log.contains("certificate renewed"), "{log}");
    assert!(!log.contains("could not renew"), "{log}");
}

/// Cordon stops placements on a node; drain moves its instances to the other nodes without
/// ever dropping below `replicas - max_unavailable` ready instances (0 here); uncordon lets
/// placements come back.
#[test]
fn cordon_and_drain_move_instances_within_max_unavailable() {
    let fleet = Fleet::start(4, 3);
    let deploy = "\n[service.web.deploy]\nmax_surge = 1\nmax_unavailable = 0\n";
    fleet.apply(&format!("{}{deploy}", web(3)));
    let ready = wait_for("three ready instances", Duration::from_secs(30), || {
        let r = fleet.ready_instances("web");
        (r.len() == 3).then_some(r)
    });
    assert_eq!(per_node(&ready).len(), 3, "not spread: {ready:#?}");

    assert_eq!(
        fleet.ok(&["node", "cordon", "node-3"]).trim(),
        "node/node-3 cordoned"
    );
    let nodes = fleet.ok(&["get", "nodes"]);
    let line = nodes
        .lines()
        .find(|l| l.starts_with("node-3"))
        .unwrap_or_default();
    assert!(line.contains("Ready,SchedulingDisabled"), "{nodes}");
    // Scaled up: nothing new on the cordoned node.
    fleet.apply(&format!("{}{deploy}", web(5)));
    let five = wait_for("five ready instances", Duration::from_secs(30), || {
        let r = fleet.ready_instances("web");
        (r.len() == 5).then_some(r)
    });
    assert_eq!(
        per_node(&five).get("node-3"),
        Some(&1),
        "{:?}",
        per_node(&five)
    );

    // Drain, sampling the ready count all along.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (api, token, stop, tls) = (
            fleet.api.clone(),
            fleet.token.clone(),
            stop.clone(),
            fleet.tls.clone(),
        );
        std::thread::spawn(move || {
            let mut least = usize::MAX;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let (status, body) =
                    call(&api, &tls, "GET", "/api/v1/instances?service=web", &token);
                if status == 200 {
                    let v: Value = serde_json::from_str(&body).unwrap();
                    let n = v["items"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|i| {
                            i["status"]["ready"] == true
                                && i["metadata"]["deletionTimestamp"].is_null()
                        })
                        .count();
                    least = least.min(n);
                }
            }
            least
        })
    };
    let out = fleet.cli(&["node", "drain", "node-3", "--timeout", "30s"]);
    stop.store(true, Ordering::SeqCst);
    let least = sampler.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drain: {text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        fleet.logs()
    );
    assert!(text.contains("node/node-3 drained"), "{text}");
    assert!(
        least >= 5,
        "only {least} ready instances during the drain (max_unavailable = 0)"
    );
    let after = wait_for("five ready off node-3", Duration::from_secs(30), || {
        let r = fleet.ready_instances("web");
        (r.len() == 5 && r.iter().all(|i| node_of(i) != "node-3")).then_some(r)
    });
    assert_eq!(per_node(&after).len(), 2);
    let events = fleet.ok(&["events"]);
    assert!(events.contains("its node is being drained"), "{events}");

    // Uncordon: the next instance goes to the empty node.
    let out = fleet.cli(&["node", "uncordon", "node-3"]);
    assert!(out.status.success());
    fleet.apply(&format!("{}{deploy}", web(6)));
    wait_for(
        "an instance on node-3 again",
        Duration::from_secs(30),
        || {
            let r = fleet.ready_instances("web");
            (r.len() == 6 && r.iter().any(|i| node_of(i) == "node-3")).then_some(())
        },
    );
    // A node cannot uncordon itself.
    let (status, _) = fleet.call_as_node("node-3", "POST", "/api/v1/nodes/node-3/uncordon", "");
    assert_eq!(status, 403);
}

/// A network link the test can cut: a TCP relay in front of the server's API. Cut, it resets
/// every connection and refuses new ones, as a dropped link does to an agent.
struct Link {
    addr: String,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Link {
    fn start(upstream: &str) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Default::default();
        let accept = {
            let (up, stop, conns, upstream) = (
                up.clone(),
                stop.clone(),
                conns.clone(),
                upstream.to_string(),
            );
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the connection closes
                    }
                    let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                        continue;
                    };
                    let mut held = conns.lock().unwrap();
                    held.push(client.try_clone().unwrap());
                    held.push(server.try_clone().unwrap());
                    for (mut from, mut to) in [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ] {
                        // Ends when either side closes or the link is cut (shutdown).
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            })
        };
        Link {
            addr,
            up,
            stop,
            conns,
            accept: Some(accept),
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cut();
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(&self.addr); // wakes the accept loop
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// A singleton on a node whose link to the server is cut: the node stops it itself before
/// its lease expires, the server replaces it on another node only once that is certain, and
/// at no moment do two copies answer. Healed, the node runs nothing of it again.
#[test]
fn a_partitioned_singleton_never_runs_twice() {
    let mut fleet = Fleet::start(5, 2);
    let link = Link::start(&fleet.api);
    fleet.restart_agent_via("node-2", &link.addr);
    wait_for(
        "node-2 Ready through the link",
        Duration::from_secs(20),
        || (fleet.ready_nodes().len() == 2).then_some(()),
    );
    let solo = common::SINGLETON_SERVICE;
    // On node-2 first.
    assert!(fleet.cli(&["node", "cordon", "node-1"]).status.success());
    fleet.apply(solo);
    let first = wait_for("solo ready on node-2", Duration::from_secs(30), || {
        fleet.ready_instances("solo").into_iter().next()
    });
    assert_eq!(node_of(&first), "node-2");
    assert!(fleet.cli(&["node", "uncordon", "node-1"]).status.success());
    let old_pid = pid_of(&first);

    // Every endpoint ever listed is probed directly, all the time: never two answer at once.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (api, token, stop, tls) = (
            fleet.api.clone(),
            fleet.token.clone(),
            stop.clone(),
            fleet.tls.clone(),
        );
        std::thread::spawn(move || {
            let mut endpoints = std::collections::BTreeSet::new();
            let mut most = 0;
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let (status, body) =
                    call(&api, &tls, "GET", "/api/v1/instances?service=solo", &token);
                if status == 200 {
                    let v: Value = serde_json::from_str(&body).unwrap();
                    for i in v["items"].as_array().unwrap() {
                        if let (Some(h), Some(p)) = (
                            i["status"]["host"].as_str(),
                            i["status"]["ports"]["http"].as_u64(),
                        ) {
                            endpoints.insert(format!("{h}:{p}"));
                        }
                    }
                }
                let answering = endpoints
                    .iter()
                    .filter(|e| http(e, "GET", "/health", &[], "").is_some_and(|r| r.status == 200))
                    .count();
                most = most.max(answering);
            }
            (most, endpoints.len())
        })
    };

    link.cut();
    let cut = Instant::now();
    let second = wait_for("solo ready on node-1", Duration::from_secs(40), || {
        fleet
            .ready_instances("solo")
            .into_iter()
            .find(|i| node_of(i) == "node-1")
    });
    let took = cut.elapsed();
    assert!(
        !alive(old_pid),
        "the old copy still runs on the cut-off node (replaced after {took:?})\n{}",
        fleet.logs()
    );
    link.heal();
    wait_for("node-2 Ready again", Duration::from_secs(20), || {
        (fleet.ready_nodes().len() == 2).then_some(())
    });
    // Settled: one copy, the new one; the old process is gone for good.
    let now = fleet.instances("solo");
    assert_eq!(now.len(), 1, "{now:#?}");
    assert_eq!(now[0]["metadata"]["name"], second["metadata"]["name"]);
    stop.store(true, Ordering::SeqCst);
    let (most, endpoints) = sampler.join().unwrap();
    assert_eq!(endpoints, 2, "both copies were probed");
    assert_eq!(most, 1, "two copies of the singleton answered at once");
    assert!(!alive(old_pid));
    let events = fleet.ok(&["events"]);
    assert!(events.contains("Fencing"), "{events}");
    println!("partitioned singleton replaced after {took:?}, never two copies answering");
    // A singleton cannot ask for more than one.
    let path = fleet.dir.path().join("two.toml");
    std::fs::write(
        &path,
        solo.replace("singleton = true", "singleton = true\nreplicas = 2"),
    )
    .unwrap();
    let out = fleet.cli(&["apply", "-f", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("singleton service runs at most one instance"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `flotilla server --config` and `flotilla agent --config` (as in /etc/flotilla/…): the
/// files' settings are used, flags win over them, and a mistake names the file and line.
#[test]
fn server_and_agent_take_their_settings_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        dir.path().join("server.toml"),
        format!("[server]\nlisten = \"{api}\"\ndata_dir = \"srv\"\n"),
    )
    .unwrap();
    let server = spawn(
        &dir,
        "server",
        &[
            "server",
            "--config",
            dir.path().join("server.toml").to_str().unwrap(),
        ],
        &[],
    );
    let token_file = dir.path().join("srv/admin.token");
    let token = wait_for(
        "the server's token in the file's data_dir",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&token_file)
                .ok()
                .filter(|t| !t.trim().is_empty())
        },
    );
    let token = token.trim().to_string();
    let ca = dir.path().join("srv/ca.crt");
    wait_for(
        "the cluster CA in the file's data_dir",
        Duration::from_secs(20),
        || std::fs::metadata(&ca).ok().filter(|m| m.len() > 0),
    );
    let tls = tls_config(&ca, None);
    wait_for(
        "the API on the file's address",
        Duration::from_secs(20),
        || https(&api, &tls, "GET", "/healthz", None, "").filter(|r| r.status == 200),
    );
    let r = https(
        &api,
        &tls,
        "POST",
        "/api/v1/tokens",
        Some(&token),
        r#"{"kind":"join","ttl":"10m"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let join: Value = serde_json::from_str(&r.body).unwrap();
    std::fs::write(
        dir.path().join("join.token"),
        join["token"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("agent.toml"),
        format!(
            "[agent]\napi = \"https://{api}\"\ntoken_file = \"join.token\"\nnode = \"from-file\"\naddress = \"127.77.6.1\"\nlabels = {{ zone = \"a\" }}\nlease = \"3s\"\ndata_dir = \"agent\"\n"
        ),
    )
    .unwrap();
    // `flotilla-agent` here; the mistaken file below goes to `flotilla agent`.
    let mut agent = spawn_bin(
        &agent_bin(),
        &dir,
        "agent",
        &[
            "--config",
            dir.path().join("agent.toml").to_str().unwrap(),
            "--label",
            "tier=web",
        ],
        &[],
    );
    let node = wait_for("the node from the file", Duration::from_secs(20), || {
        let r = https(
            &api,
            &tls,
            "GET",
            "/api/v1/nodes/from-file",
            Some(&token),
            "",
        )?;
        (r.status == 200).then(|| serde_json::from_str::<Value>(&r.body).unwrap())
    });
    assert_eq!(node["status"]["address"], "127.77.6.1");
    assert_eq!(node["metadata"]["labels"]["zone"], "a");
    assert_eq!(node["metadata"]["labels"]["tier"], "web");
    assert_eq!(node["heartbeat"]["leaseSeconds"], 3);
    assert!(dir.path().join("agent/node.crt").exists());
    assert!(dir.path().join("agent/node.key").exists());

    // A mistake in a file: named with its line, nothing started.
    std::fs::write(
        dir.path().join("bad.toml"),
        "[agent]\nnode = \"x\"\nadress = \"10.0.0.1\"\n",
    )
    .unwrap();
    let out = Command::new(flotilla_bin())
        .args(["agent", "--config"])
        .arg(dir.path().join("bad.toml"))
        .env("FLOTILLA_CONFIG_DIR", dir.path().join("config"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("line 3") && err.contains("adress"),
        "{err}"
    );

    let _ = kill(Pid::from_raw(agent.child.id() as i32), Signal::SIGINT);
    let _ = agent.child.wait();
    let mut server = server;
    let _ = server.child.kill();
    let _ = server.child.wait();
}

/// Taints keep out the services that do not tolerate them; an instance that fits no node
/// waits Pending with Kubernetes-style reasons, and is placed once a node can take it.
#[test]
fn taints_tolerations_and_unschedulable_reasons() {
    let fleet = Fleet::start(7, 2);
    assert_eq!(
        fleet
            .ok(&["node", "taint", "node-2", "dedicated=batch"])
            .trim(),
        "node/node-2 tainted: dedicated=batch"
    );
    let described = fleet.ok(&["describe", "node", "node-2"]);
    assert!(
        described.contains("Taints:        dedicated=batch"),
        "{described}"
    );

    fleet.apply(&web(3));
    let ready = wait_for("three web instances", Duration::from_secs(30), || {
        let r = fleet.ready_instances("web");
        (r.len() == 3).then_some(r)
    });
    assert!(
        ready.iter().all(|i| node_of(i) == "node-1"),
        "{:?}",
        per_node(&ready)
    );

    // Routed by web only (one route per path).
    let unrouted = |n: u32| web(n).replace("[[service.web.routes]]\npath = \"/\"\n", "");
    let batch = unrouted(2).replace("service.web", "service.batch").replace(
        "[service.batch.probes.readiness]",
        "[[service.batch.placement.tolerations]]\nkey = \"dedicated\"\n\n[service.batch.probes.readiness]",
    );
    let path = fleet.dir.path().join("batch.toml");
    std::fs::write(&path, &batch).unwrap();
    assert!(
        fleet
            .cli(&["apply", "-f", path.to_str().unwrap()])
            .status
            .success()
    );
    let b = wait_for("two batch instances", Duration::from_secs(30), || {
        let r = fleet.ready_instances("batch");
        (r.len() == 2).then_some(r)
    });
    assert_eq!(
        per_node(&b).len(),
        2,
        "a toleration lets it on node-2 too: {:?}",
        per_node(&b)
    );

    // Nowhere to go: Pending, with why.
    let nowhere = unrouted(1).replace("service.web", "service.picky").replace(
        "[service.picky.probes.readiness]",
        "[service.picky.placement]\nnode_selector = { zone = \"mars\" }\n\n[service.picky.probes.readiness]",
    );
    std::fs::write(&path, &nowhere).unwrap();
    assert!(
        fleet
            .cli(&["apply", "-f", path.to_str().unwrap()])
            .status
            .success()
    );
    // node-2 also has its taint: each node's reasons are counted, most frequent first.
    let why = "0/2 nodes are available: 2 node(s) didn't match the node selector, 1 node(s) had untolerated taints.";
    let pending = wait_for(
        "the reason on the pending instance",
        Duration::from_secs(20),
        || {
            fleet
                .instances("picky")
                .into_iter()
                .find(|i| i["status"]["message"].as_str().is_some_and(|m| m == why))
        },
    );
    assert_eq!(pending["spec"]["node"], "");
    let events = fleet.ok(&["events"]);
    assert!(events.contains("FailedScheduling"), "{events}");

    // Untainted, node-2 takes what tolerated nothing; picky still waits.
    assert!(
        fleet
            .cli(&["node", "taint", "node-2", "dedicated-"])
            .status
            .success()
    );
    let described = fleet.ok(&["describe", "node", "node-2"]);
    assert!(!described.contains("Taints:"), "{described}");
    fleet.apply(&web(4));
    wait_for("a web instance on node-2", Duration::from_secs(30), || {
        let r = fleet.ready_instances("web");
        (r.len() == 4 && r.iter().any(|i| node_of(i) == "node-2")).then_some(())
    });
}

/// A service of `replicas`, each asking `cpu` millicores, with `priority` and `extra` lines.
fn cpu_service(name: &str, replicas: u32, cpu: u64, priority: i32, extra: &str) -> String {
    format!(
        r#"
[service.{name}]
command = "flotilla-demo"
args = ["--listen", "${{FLOTILLA_HOST}}:${{PORT}}"]
replicas = {replicas}
priority = {priority}
ports = ["http"]
resources = {{ cpu = "{cpu}m" }}
stop = {{ grace_period = "2s" }}
{extra}
[service.{name}.probes.readiness]
http = {{ path = "/health" }}
period = "200ms"
timeout = "200ms"
failure_threshold = 1
"#
    )
}

/// Two nodes full of low-priority batch instances; a high-priority service that fits nowhere
/// stops the fewest of them it needs (one per node) and runs; the batch instances it displaced
/// wait Pending (they preempt nothing: nothing has a lower priority), and the events say who
/// preempted whom.
#[test]
fn a_higher_priority_service_preempts_lower_priority_instances() {
    let fleet = Fleet::start(8, 2);
    let node = fleet.get("/api/v1/nodes/node-1");
    let cpu = node["status"]["allocatable"]["cpuMillicores"]
        .as_u64()
        .unwrap_or_else(|| panic!("allocatable cpu of {node:#}"));
    assert!(cpu >= 500, "{node:#}");
    // Two batch instances per node take 80 % of it; an urgent one needs 50 %.
    let path = fleet.dir.path().join("batch.toml");
    std::fs::write(&path, cpu_service("batch", 4, cpu * 2 / 5, 0, "")).unwrap();
    fleet.ok(&["apply", "-f", path.to_str().unwrap()]);
    let batch = wait_for("four batch instances", Duration::from_secs(30), || {
        let r = fleet.ready_instances("batch");
        (r.len() == 4).then_some(r)
    });
    assert_eq!(per_node(&batch).values().collect::<Vec<_>>(), vec![&2, &2]);

    let urgent = cpu_service(
        "urgent",
        2,
        cpu / 2,
        1000,
        "[service.urgent.placement]\nanti_affinity = \"hard\"\n",
    );
    let path = fleet.dir.path().join("urgent.toml");
    std::fs::write(&path, urgent).unwrap();
    fleet.ok(&["apply", "-f", path.to_str().unwrap()]);
    let ready = wait_for(
        "both urgent instances ready",
        Duration::from_secs(40),
        || {
            let r = fleet.ready_instances("urgent");
            (r.len() == 2).then_some(r)
        },
    );
    assert_eq!(per_node(&ready).len(), 2, "{:?}", per_node(&ready));
    // One batch instance per node was stopped; their replacements wait with the reason.
    let pending = wait_for(
        "two batch instances pending for cpu",
        Duration::from_secs(30),
        || {
            let all = fleet.instances("batch");
            let live: Vec<&Value> = all
                .iter()
                .filter(|i| i["metadata"]["deletionTimestamp"].is_null())
                .collect();
            let waiting: Vec<Value> = live
                .iter()
                .filter(|i| i["spec"]["node"].as_str().unwrap_or_default().is_empty())
                .map(|i| (*i).clone())
                .collect();
            (live.len() == 4 && waiting.len() == 2).then_some(waiting)
        },
    );
    for i in &pending {
        let message = i["status"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("Insufficient cpu"), "{i:#}");
        assert!(i["status"]["nominatedNode"].is_null(), "{i:#}");
    }
    assert_eq!(fleet.ready_instances("batch").len(), 2);
    let events = fleet.ok(&["events"]);
    assert_eq!(
        events.matches("Preempted").count(),
        2,
        "one victim per node: {events}"
    );
    assert!(
        events.contains("to make room for instance urgent-"),
        "{events}"
    );
    assert!(events.contains("Preempting"), "{events}");
    // Scaled down, the urgent service gives the room back to batch.
    std::fs::write(
        &path,
        cpu_service(
            "urgent",
            0,
            cpu / 2,
            1000,
            "[service.urgent.placement]\nanti_affinity = \"hard\"\n",
        ),
    )
    .unwrap();
    fleet.ok(&["apply", "-f", path.to_str().unwrap()]);
    wait_for(
        "four batch instances again",
        Duration::from_secs(40),
        || (fleet.ready_instances("batch").len() == 4).then_some(()),
    );
}

/// Before an agent stops a deleted instance, every gateway routing from the server confirms
/// it no longer routes to it; a gateway that cannot answer (frozen) holds the stop only until
/// the drain's deadline.
#[test]
fn draining_waits_for_the_gateways_on_other_machines() {
    let mut fleet = Fleet::start(9, 1);
    let gateway = fleet.start_gateway();
    fleet.apply(&web(2));
    wait_for(
        "two instances behind the gateway",
        Duration::from_secs(30),
        || (answering_instances(&gateway).len() == 2).then_some(()),
    );
    let agent_log = || fleet.agents["node-1"].proc.as_ref().unwrap().log();

    fleet.apply(&web(1));
    wait_for("one instance left", Duration::from_secs(30), || {
        (fleet.instances("web").len() == 1).then_some(())
    });
    let log = agent_log();
    assert!(
        log.contains("instance unrouted by every gateway") && log.contains("gateways=1"),
        "{log}"
    );

    // A frozen gateway is waited for, within the deadline, and named.
    let gw_pid = Pid::from_raw(fleet.gateway.as_ref().unwrap().0.child.id() as i32);
    kill(gw_pid, Signal::SIGSTOP).unwrap();
    fleet.apply(&web(0));
    wait_for("no instance left", Duration::from_secs(30), || {
        fleet.instances("web").is_empty().then_some(())
    });
    kill(gw_pid, Signal::SIGCONT).unwrap();
    let log = agent_log();
    assert!(
        log.contains("gateways still route to the instance; stopping it anyway")
            && log.contains("waiting=gateway-"),
        "{log}"
    );
}

/// Two servers on one etcd; the gateway polls only the second, the agent talks to the first:
/// before the agent stops an instance, the gateway (known only to the second server) still
/// confirms it unrouted, because the agent asks every server.
#[test]
fn draining_waits_for_gateways_polling_another_server() {
    let test = "draining_waits_for_gateways_polling_another_server";
    let Some(rt) = with_etcd(test) else { return };
    let mut ha = Ha::start(&rt, 16, 1);
    let (ok, out) = ha.apply(&web_version(2, "1"));
    assert!(ok, "{out}");
    let second = ha.apis[1].clone();
    let gateway = ha.fleet.start_gateway_via(&second);
    wait_for(
        "two instances behind the gateway",
        Duration::from_secs(30),
        || (answering_instances(&gateway).len() == 2).then_some(()),
    );
    let (ok, out) = ha.apply(&web_version(1, "1"));
    assert!(ok, "{out}");
    wait_for("one instance left", Duration::from_secs(30), || {
        (ha.fleet.instances("web").len() == 1).then_some(())
    });
    let log = ha.fleet.agents["node-1"].proc.as_ref().unwrap().log();
    assert!(
        log.contains("instance unrouted by every gateway") && log.contains("gateways=1"),
        "{log}"
    );
}

/// A node whose agent reports disk pressure shows it (condition, status, describe) and takes
/// no new instance; the scheduler says so when nothing else can take one.
#[test]
fn a_node_under_pressure_takes_no_new_instance() {
    let mut fleet = Fleet::start(10, 2);
    // Asking for every byte of the disk free: node-2 is under disk pressure at once.
    fleet.agents.get_mut("node-2").unwrap().extra = vec!["--pressure-disk".into(), "100%".into()];
    let link = fleet.api.clone();
    fleet.restart_agent_via("node-2", &link);
    wait_for(
        "node-2 under disk pressure",
        Duration::from_secs(20),
        || {
            let n = fleet.get("/api/v1/nodes/node-2");
            n["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "DiskPressure" && c["status"] == true)
                .then_some(())
        },
    );
    let nodes = fleet.ok(&["get", "nodes"]);
    assert!(nodes.contains("Ready,DiskPressure"), "{nodes}");
    let described = fleet.ok(&["describe", "node", "node-2"]);
    assert!(
        described.contains("DiskPressure:   true (LowDisk:"),
        "{described}"
    );
    assert!(described.contains("MemoryPressure: false"), "{described}");

    fleet.apply(&web(2));
    let ready = wait_for("two web instances", Duration::from_secs(30), || {
        let r = fleet.ready_instances("web");
        (r.len() == 2).then_some(r)
    });
    assert!(
        ready.iter().all(|i| node_of(i) == "node-1"),
        "{:?}",
        per_node(&ready)
    );
    fleet.ok(&["node", "cordon", "node-1"]);
    fleet.apply(&web(3));
    let pending = wait_for("a pending instance", Duration::from_secs(30), || {
        fleet
            .instances("web")
            .into_iter()
            .find(|i| i["spec"]["node"].as_str().unwrap_or_default().is_empty())
    });
    let why = pending["status"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        why.contains("1 node(s) had disk pressure") && why.contains("1 node(s) cordoned"),
        "{why}"
    );
}

/// `flotilla server` on `data`, listening on `listen`, with its store on `etcd`.
fn spawn_etcd_server(
    dir: &tempfile::TempDir,
    name: &str,
    data: &Path,
    listen: &str,
    etcd: &str,
) -> Proc {
    let data = data.to_str().unwrap();
    let args = [
        "--data-dir",
        data,
        "server",
        "--listen",
        listen,
        "--etcd",
        etcd,
    ];
    spawn(dir, name, &args, &[])
}

/// Waits until the server at `api` answers `GET /healthz`.
fn wait_answering(api: &str, tls: &Arc<rustls::ClientConfig>, what: &str) {
    wait_for(what, Duration::from_secs(30), || {
        https(api, tls, "GET", "/healthz", None, "").filter(|r| r.status == 200)
    });
}

/// The instances that answered 20 requests through `gateway`.
fn answering_instances(gateway: &str) -> BTreeSet<String> {
    (0..20)
        .filter_map(|_| http(gateway, "GET", "/", &[], ""))
        .filter(|r| r.status == 200)
        .filter_map(|r| instance_of(&r.body))
        .collect()
}

/// A runtime for a test that needs etcd, or `None` (after the skip notice) when etcd cannot run
/// here.
fn with_etcd(test: &str) -> Option<tokio::runtime::Runtime> {
    if let Some(why) = etcd_support::unavailable() {
        etcd_support::skip(test, &why);
        return None;
    }
    Some(tokio::runtime::Runtime::new().unwrap())
}

/// `flotilla server --etcd`: the state lives in etcd (nothing in the data directory's store, all
/// of it there after a restart); a second server on the same etcd adopts the cluster's token
/// and CA, answers the API, and leads once the first dies.
#[test]
fn servers_on_etcd_share_its_state_and_one_leads_at_a_time() {
    let test = "servers_on_etcd_share_its_state_and_one_leads_at_a_time";
    let Some(rt) = with_etcd(test) else { return };
    let member = rt.block_on(etcd_support::Etcd::start());
    let mut fleet = Fleet::start_with(9, 0, &["--etcd", &member.endpoint]);
    let file = fleet.dir.path().join("web.toml");
    std::fs::write(&file, web(2)).unwrap();
    fleet.ok(&["apply", "-f", file.to_str().unwrap()]);
    let uid = |fleet: &Fleet| {
        let (status, body) = fleet.call("GET", "/api/v1/services/web", &fleet.token, "");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["metadata"]["uid"].as_str().unwrap().to_string()
    };
    let before = uid(&fleet);
    assert!(!fleet.dir.path().join("server/store.redb").exists());

    // A second server on the same etcd follows: it adopts the cluster's admin token and CA,
    // answers the API (writes too), and `get servers` names the leader.
    let other = fleet.dir.path().join("other");
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let second = spawn_etcd_server(&fleet.dir, "second", &other, &listen, &member.endpoint);
    let via_second = |args: &[&str]| {
        let out = Command::new(flotilla_bin())
            .arg("--data-dir")
            .arg(&other)
            .args(args)
            .env("FLOTILLA_CONFIG_DIR", fleet.dir.path().join("config"))
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let servers = wait_for(
        "the second server to answer",
        Duration::from_secs(20),
        || {
            let (ok, out) = via_second(&["get", "servers"]);
            (ok && out.matches(":").count() > 0 && out.contains("follower (answered)"))
                .then_some(out)
        },
    );
    let first_port = fleet.api.rsplit(':').next().unwrap().to_string();
    let leader_line = servers
        .lines()
        .find(|l| l.contains(" leader "))
        .unwrap_or_else(|| panic!("no leader in:\n{servers}"));
    assert!(leader_line.contains(&first_port), "{servers}");
    assert!(
        servers.contains("STORE  etcd") && servers.contains("healthy"),
        "{servers}"
    );
    assert_eq!(
        std::fs::read_to_string(other.join("admin.token"))
            .unwrap()
            .trim(),
        fleet.token,
        "the second server adopted the cluster's admin token"
    );
    std::fs::write(&file, web(3)).unwrap();
    let (ok, out) = via_second(&["apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "a follower takes writes: {out}");

    // The leader dies: the follower leads (the lease is 2 s) and the controller runs there.
    fleet.server.child.kill().unwrap();
    let _ = fleet.server.child.wait();
    let killed = std::time::Instant::now();
    wait_for("the second server to lead", Duration::from_secs(10), || {
        std::fs::read_to_string(&second.log)
            .unwrap()
            .contains("leading:")
            .then_some(())
    });
    let took = killed.elapsed();
    eprintln!("{test}: the follower led {took:?} after the leader's kill -9");
    assert!(took < Duration::from_secs(6), "failover took {took:?}");
    let servers = wait_for(
        "the second to show as leader",
        Duration::from_secs(10),
        || {
            let (ok, out) = via_second(&["get", "servers"]);
            (ok && out.contains("leader (answered)")).then_some(out)
        },
    );
    assert!(servers.contains(&port), "{servers}");

    // Restarted, the first finds everything in etcd (and follows).
    fleet.restart_server(&["--etcd", &member.endpoint]);
    let data = fleet.dir.path().join("server");
    assert_eq!(uid(&fleet), before);
    drop(second);
    assert!(fleet.ok(&["get", "services"]).contains("web"));
    assert!(!data.join("store.redb").exists());
}

/// Two servers on one etcd; agents, a gateway and the CLI are given both. `kill -9` of the
/// server they use (the leader): the nodes stay Ready and keep their instances (same pids),
/// the gateway keeps routing without a failed request, the CLI answers through the other
/// server, and a new apply reaches the agents (the other server leads and places it).
#[test]
fn agents_gateways_and_the_cli_fail_over_to_another_server() {
    let test = "agents_gateways_and_the_cli_fail_over_to_another_server";
    let Some(rt) = with_etcd(test) else { return };
    let member = rt.block_on(etcd_support::Etcd::start());
    let mut fleet = Fleet::start_with(12, 0, &["--etcd", &member.endpoint]);
    let other = fleet.dir.path().join("other");
    let second_api = format!("127.0.0.1:{}", free_port());
    let second = spawn_etcd_server(&fleet.dir, "second", &other, &second_api, &member.endpoint);
    wait_answering(&second_api, &fleet.tls, "the second server's API");
    let both = format!("{},{}", fleet.api, second_api);
    for i in 1..=2 {
        let name = format!("node-{i}");
        fleet.agents.insert(
            name.clone(),
            Agent {
                proc: None,
                address: format!("127.77.12.{i}"),
                data: fleet.dir.path().join(&name),
                api: Some(both.clone()),
                extra: Vec::new(),
            },
        );
        fleet.start_agent(&name);
    }
    wait_for("both nodes Ready", Duration::from_secs(20), || {
        (fleet.ready_nodes().len() == 2).then_some(())
    });
    fleet.apply(&web(2));
    let before = wait_for("two ready instances", Duration::from_secs(30), || {
        let ready = fleet.ready_instances("web");
        (ready.len() == 2).then_some(ready)
    });
    let pids: BTreeSet<i32> = before.iter().map(pid_of).collect();
    let gateway = fleet.start_gateway_via(&both);
    wait_for("the gateway to route", Duration::from_secs(20), || {
        http(&gateway, "GET", "/", &[], "").filter(|r| r.status == 200)
    });
    let load = Load::start(&gateway);
    wait_for("load through the gateway", Duration::from_secs(10), || {
        (load.ok[0].load(Ordering::SeqCst) > 20).then_some(())
    });

    // The first server (the leader, and the first address of every client) dies.
    fleet.server.child.kill().unwrap();
    let _ = fleet.server.child.wait();
    let killed = Instant::now();
    let first_log = fleet.server.log();
    let first_api = std::mem::replace(&mut fleet.api, second_api.clone());
    let dead = std::mem::replace(&mut fleet.server, second);

    // The CLI, given both addresses, answers through the second.
    let cli_both = |args: &[&str]| {
        Command::new(flotilla_bin())
            .args(args)
            .env(
                "FLOTILLA_API",
                format!("https://{first_api},https://{second_api}"),
            )
            .env("FLOTILLA_TOKEN", &fleet.token)
            .env("FLOTILLA_CA", &fleet.ca)
            .env("FLOTILLA_CONFIG_DIR", fleet.dir.path().join("config"))
            .output()
            .unwrap()
    };
    let out = cli_both(&["get", "nodes"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && printed.contains("node-1") && printed.contains("node-2"),
        "get nodes through the list: {}{}",
        printed,
        String::from_utf8_lossy(&out.stderr)
    );
    let file = fleet.dir.path().join("web3.toml");
    std::fs::write(&file, web(3)).unwrap();
    let out = cli_both(&["apply", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "apply through the list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The second server leads and places the third; an agent runs it.
    let after = wait_for("three ready instances", Duration::from_secs(30), || {
        let ready = fleet.ready_instances("web");
        (ready.len() == 3).then_some(ready)
    });
    eprintln!(
        "{test}: the new instance was ready {:?} after the kill",
        killed.elapsed()
    );
    // Past more than one node lease (3 s) since the kill: both nodes renewed theirs through
    // the second server, and their instances were neither replaced nor restarted.
    wait_for(
        "a node lease past the kill",
        Duration::from_secs(10),
        || (killed.elapsed() > Duration::from_secs(4)).then_some(()),
    );
    let ready = fleet.ready_nodes();
    assert_eq!(
        ready.len(),
        2,
        "nodes after the failover: {ready:?}\n{}",
        fleet.logs()
    );
    let now: BTreeSet<i32> = fleet.ready_instances("web").iter().map(pid_of).collect();
    assert!(
        pids.is_subset(&now),
        "instances replaced: {pids:?} → {now:?}"
    );
    assert_eq!(now.len(), 3, "{after:?}");
    let (ok, failed, failures) = load.finish();
    assert!(ok[0] > 0 && ok[1] > 0, "no load: {ok:?}");
    assert_eq!(
        failed,
        [0, 0],
        "requests failed across the failover: {failures:?}\n--- first server\n{first_log}\n{}",
        fleet.logs()
    );
    drop(dead);
}

/// Three servers on a three-member etcd cluster (the fleet's own server is the first, each on
/// its own data directory and address), and `nodes` agents given every server's address.
struct Ha {
    fleet: Fleet,
    etcd: etcd_support::Cluster,
    endpoints: String,
    /// Every server's address (`host:port`); `fleet.api` is a live one (for the test's reads).
    apis: Vec<String>,
    /// Servers 2 and 3 (indices 1 and 2): the process (`None` while killed), its data.
    others: Vec<(Option<Proc>, PathBuf)>,
    /// Whether server 1 (`fleet.server`) runs.
    first_alive: bool,
}

impl Ha {
    fn start(rt: &tokio::runtime::Runtime, net: u8, nodes: u8) -> Ha {
        let etcd = rt.block_on(etcd_support::Cluster::start(3));
        let endpoints = etcd.endpoints().join(",");
        let fleet = Fleet::start_with(net, 0, &["--etcd", &endpoints]);
        let mut ha = Ha {
            apis: vec![fleet.api.clone()],
            fleet,
            etcd,
            endpoints,
            others: Vec::new(),
            first_alive: true,
        };
        for k in 2..=3 {
            let data = ha.fleet.dir.path().join(format!("server-{k}"));
            ha.apis.push(format!("127.0.0.1:{}", free_port()));
            ha.others.push((None, data));
            ha.start_server(k - 1);
        }
        let all = ha.apis.join(",");
        for i in 1..=nodes {
            let name = format!("node-{i}");
            let agent = Agent {
                proc: None,
                address: format!("127.77.{net}.{i}"),
                data: ha.fleet.dir.path().join(&name),
                api: Some(all.clone()),
                extra: Vec::new(),
            };
            ha.fleet.agents.insert(name.clone(), agent);
            ha.fleet.start_agent(&name);
        }
        wait_for("every node Ready", Duration::from_secs(30), || {
            (ha.fleet.ready_nodes().len() == usize::from(nodes)).then_some(())
        });
        ha
    }

    /// Starts server `i` (again) on its data directory and address; returns once it answers.
    fn start_server(&mut self, i: usize) {
        let api = self.apis[i].clone();
        let data = match i {
            0 => self.fleet.dir.path().join("server"),
            _ => self.others[i - 1].1.clone(),
        };
        let name = format!("server-{}", i + 1);
        let proc = spawn_etcd_server(&self.fleet.dir, &name, &data, &api, &self.endpoints);
        match i {
            0 => {
                self.fleet.server = proc;
                self.first_alive = true;
            }
            _ => self.others[i - 1].0 = Some(proc),
        }
        wait_answering(&api, &self.fleet.tls, &format!("{name}'s API"));
    }

    fn alive(&self, i: usize) -> bool {
        match i {
            0 => self.first_alive,
            _ => self.others[i - 1].0.is_some(),
        }
    }

    fn pid(&self, i: usize) -> i32 {
        let child = match i {
            0 => &self.fleet.server.child,
            _ => &self.others[i - 1].0.as_ref().unwrap().child,
        };
        child.id() as i32
    }

    /// `kill -9` of server `i`; the test's own reads move to a live server.
    fn kill_server(&mut self, i: usize) {
        match i {
            0 => {
                let _ = self.fleet.server.child.kill();
                let _ = self.fleet.server.child.wait();
                self.first_alive = false;
            }
            _ => drop(self.others[i - 1].0.take()),
        }
        if let Some(live) = (0..3).find(|&k| self.alive(k)) {
            self.fleet.api = self.apis[live].clone();
        }
    }

    /// The index of the server that leads, as a live server reports it.
    fn leader(&self) -> Option<usize> {
        let r = https(
            &self.fleet.api,
            &self.fleet.tls,
            "GET",
            "/api/v1/servers",
            Some(&self.fleet.token),
            "",
        )?;
        let v: Value = serde_json::from_str(&r.body).ok()?;
        let api = v["items"]
            .as_array()?
            .iter()
            .find(|s| s["leader"] == true)?["api"]
            .as_str()?
            .to_string();
        self.apis
            .iter()
            .position(|a| api.ends_with(&format!("//{a}")))
    }

    /// The CLI given every server's address.
    fn cli(&self, args: &[&str]) -> Output {
        let all: Vec<String> = self.apis.iter().map(|a| format!("https://{a}")).collect();
        Command::new(flotilla_bin())
            .args(args)
            .env("FLOTILLA_API", all.join(","))
            .env("FLOTILLA_TOKEN", &self.fleet.token)
            .env("FLOTILLA_CA", &self.fleet.ca)
            .env("FLOTILLA_CONFIG_DIR", self.fleet.dir.path().join("config"))
            .output()
            .unwrap()
    }

    /// `flotilla apply` of `text` through every server's address: whether it went through, and
    /// what it printed.
    fn apply(&self, text: &str) -> (bool, String) {
        let path = self
            .fleet
            .dir
            .path()
            .join(format!("apply-{}.toml", common::rand_suffix()));
        std::fs::write(&path, text).unwrap();
        let out = self.cli(&["apply", "-f", path.to_str().unwrap()]);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn logs(&self) -> String {
        let mut out = self.fleet.logs();
        for (k, (p, _)) in self.others.iter().enumerate() {
            if let Some(p) = p {
                out.push_str(&format!("\n--- server-{}\n{}", k + 2, p.log()));
            }
        }
        out
    }
}

/// [`web`] with `V = "<version>"` in its environment: a new revision per version.
fn web_version(replicas: u32, version: &str) -> String {
    web(replicas).replacen(
        "ports = [\"http\"]",
        &format!("ports = [\"http\"]\nenv = {{ V = \"{version}\" }}"),
        1,
    )
}

fn version_of(i: &Value) -> String {
    i["spec"]["template"]["env"]["V"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Three servers on a three-member etcd, two nodes, a gateway; every client has every server's
/// address. The leader is killed in the middle of a rollout: another leads within 3 s, the
/// rollout completes, no instance is lost or duplicated. One etcd member dies: applies go on.
/// A second dies: writes fail with a clear error while the instances keep running, the
/// gateway keeps routing and reads answer; both come back: everything converges.
#[test]
fn three_servers_survive_their_leader_and_etcd_members_dying() {
    let test = "three_servers_survive_their_leader_and_etcd_members_dying";
    let Some(rt) = with_etcd(test) else { return };
    let mut ha = Ha::start(&rt, 13, 2);
    let (ok, out) = ha.apply(&web_version(3, "1"));
    assert!(ok, "{out}");
    wait_for("three ready instances", Duration::from_secs(30), || {
        (ha.fleet.ready_instances("web").len() == 3).then_some(())
    });
    let all = ha.apis.join(",");
    let gateway = ha.fleet.start_gateway_via(&all);
    wait_for("the gateway to route", Duration::from_secs(20), || {
        http(&gateway, "GET", "/", &[], "").filter(|r| r.status == 200)
    });
    let load = Load::start(&gateway);

    // A rollout starts; the leader dies under it.
    let leader = wait_for("a leader", Duration::from_secs(10), || ha.leader());
    let (ok, out) = ha.apply(&web_version(3, "2"));
    assert!(ok, "{out}");
    ha.kill_server(leader);
    let killed = Instant::now();
    let next = wait_for("another leader", Duration::from_secs(10), || {
        ha.leader().filter(|&l| l != leader)
    });
    let took = killed.elapsed();
    eprintln!(
        "{test}: server-{} led {took:?} after server-{}'s kill -9",
        next + 1,
        leader + 1
    );
    assert!(took <= Duration::from_secs(3), "failover took {took:?}");
    // `get servers` does not show the dead one as a working follower (its record may linger
    // until its lease ends: then it is marked unreachable).
    let out = ha.cli(&["get", "servers"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    let dead_port = format!(":{}", ha.apis[leader].rsplit(':').next().unwrap());
    eprintln!("{test}: get servers after the failover:\n{shown}");
    assert!(
        shown
            .lines()
            .filter(|l| l.contains(&dead_port))
            .all(|l| l.contains("(unreachable)")),
        "{shown}"
    );
    // The rollout completes: three ready instances of version 2, each name once, nothing
    // else left; never more than the surge above three meanwhile.
    let mut most = 0;
    let done = wait_for("the rollout to complete", Duration::from_secs(60), || {
        let all = ha.fleet.instances("web");
        most = most.max(all.len());
        let ready = ha.fleet.ready_instances("web");
        (all.len() == 3 && ready.len() == 3 && ready.iter().all(|i| version_of(i) == "2"))
            .then_some(ready)
    });
    let names: BTreeSet<String> = done
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 3, "{done:?}");
    assert!(
        most <= 4,
        "{most} instances at once during the rollout (surge 1)"
    );
    let pids: BTreeSet<i32> = done.iter().map(pid_of).collect();

    // One etcd member dies: applies go through. When it was etcd's leader, writes answer 503
    // "unavailable, nothing was written" until the other two elect one (and the server's
    // request to the dead member cannot be known unsent): the CLI says to retry, and a retry
    // within a few seconds goes through.
    ha.etcd.kill(0);
    let deadline = Instant::now() + Duration::from_secs(15);
    let (ok, out) = loop {
        let (ok, out) = ha.apply(&web_version(4, "2"));
        if ok || !out.contains("unavailable") || Instant::now() >= deadline {
            break (ok, out);
        }
        #[allow(clippy::disallowed_methods)] // the pace of a user's retries
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(ok, "apply with one etcd member down: {out}");
    wait_for("four ready instances", Duration::from_secs(30), || {
        (ha.fleet.ready_instances("web").len() == 4).then_some(())
    });
    let pids: BTreeSet<i32> = ha
        .fleet
        .ready_instances("web")
        .iter()
        .map(pid_of)
        .collect::<BTreeSet<_>>()
        .union(&pids)
        .copied()
        .collect();

    // A second dies: no quorum. Writes fail naming the store; reads answer; the instances run
    // and the gateway routes to them.
    ha.etcd.kill(1);
    let before = load.ok[0].load(Ordering::SeqCst);
    let refused = Instant::now();
    let (ok, out) = ha.apply(&web_version(5, "2"));
    assert!(!ok, "applied without an etcd quorum: {out}");
    assert!(out.contains("the store (etcd) is unavailable"), "{out}");
    // One server's answer is every server's: the CLI does not ask the others too (one server
    // takes up to two etcd request timeouts, 5 s each: its read, then its write).
    assert!(
        refused.elapsed() < Duration::from_secs(15),
        "the refusal took {:?}",
        refused.elapsed()
    );
    let servers = ha.cli(&["get", "servers"]);
    let shown = String::from_utf8_lossy(&servers.stdout);
    assert!(
        servers.status.success(),
        "{}",
        String::from_utf8_lossy(&servers.stderr)
    );
    for (member, status) in [
        ("m1", "unreachable"),
        ("m2", "unreachable"),
        ("m3", "healthy"),
    ] {
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with(member) && l.contains(status)),
            "{member} not {status}:\n{shown}"
        );
    }
    let listed = ha.cli(&["get", "services"]);
    assert!(
        listed.status.success() && String::from_utf8_lossy(&listed.stdout).contains("web"),
        "get services without a quorum: {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    for pid in &pids {
        assert!(alive(*pid), "instance {pid} stopped without a quorum");
    }
    wait_for(
        "requests routed without a quorum",
        Duration::from_secs(10),
        || (load.ok[0].load(Ordering::SeqCst) > before + 50).then_some(()),
    );

    // Both come back: the write goes through and everything converges.
    ha.etcd.restart(0);
    ha.etcd.restart(1);
    wait_for(
        "an apply once etcd is back",
        Duration::from_secs(60),
        || ha.apply(&web_version(5, "2")).0.then_some(()),
    );
    wait_for("five ready instances", Duration::from_secs(60), || {
        (ha.fleet.ready_instances("web").len() == 5).then_some(())
    });
    // No node was judged lost on a view older than its renewals (a new leader and a server
    // reading the leases again after the outage give every node one grace): the same
    // instances still run.
    for pid in &pids {
        if !alive(*pid) {
            let events = ha.cli(&["events"]);
            panic!(
                "instance {pid} did not survive the outage\n--- events\n{}\n{}",
                String::from_utf8_lossy(&events.stdout),
                ha.logs()
            );
        }
    }
    let (ok, failed, failures) = load.finish();
    assert!(ok[0] > 0 && ok[1] > 0, "no load: {ok:?}");
    assert!(
        failed[0] + failed[1] <= 2,
        "requests failed: {failed:?} {failures:?}\n{}",
        ha.logs()
    );
    eprintln!("{test}: {ok:?} requests answered, {failed:?} failed");
}

/// The leader frozen (SIGSTOP) past its lease and past the nodes' leases: another leads, keeps
/// the nodes Ready and scales the service up. Thawed (SIGCONT) with its stale view, the old
/// leader writes nothing: the nodes stay Ready, no instance is added, replaced or stopped,
/// and it follows.
#[test]
fn a_leader_frozen_past_its_lease_writes_nothing_when_it_thaws() {
    let test = "a_leader_frozen_past_its_lease_writes_nothing_when_it_thaws";
    let Some(rt) = with_etcd(test) else { return };
    let mut ha = Ha::start(&rt, 14, 2);
    let (ok, out) = ha.apply(&web_version(2, "1"));
    assert!(ok, "{out}");
    wait_for("two ready instances", Duration::from_secs(30), || {
        (ha.fleet.ready_instances("web").len() == 2).then_some(())
    });
    let old = wait_for("a leader", Duration::from_secs(10), || ha.leader());
    let pid = Pid::from_raw(ha.pid(old));
    kill(pid, Signal::SIGSTOP).unwrap();
    let frozen = Instant::now();
    let live = (0..3).find(|&k| k != old).unwrap();
    ha.fleet.api = ha.apis[live].clone();
    let new = wait_for("another leader", Duration::from_secs(10), || {
        ha.leader().filter(|&l| l != old)
    });
    eprintln!(
        "{test}: server-{} leads {:?} after the freeze",
        new + 1,
        frozen.elapsed()
    );
    let (ok, out) = ha.apply(&web_version(3, "1"));
    assert!(ok, "{out}");
    let three = wait_for("three ready instances", Duration::from_secs(30), || {
        let ready = ha.fleet.ready_instances("web");
        (ready.len() == 3).then_some(ready)
    });
    let names = |instances: &[Value]| -> BTreeMap<String, i32> {
        instances
            .iter()
            .map(|i| {
                (
                    i["metadata"]["name"].as_str().unwrap().to_string(),
                    pid_of(i),
                )
            })
            .collect()
    };
    let expected = names(&three);
    // Frozen for well past the node leases (3 s) too: its clock says every node is late.
    wait_for(
        "the freeze to outlast the node leases",
        Duration::from_secs(20),
        || (frozen.elapsed() > Duration::from_secs(7)).then_some(()),
    );
    kill(pid, Signal::SIGCONT).unwrap();
    let thawed = Instant::now();
    // For 6 s after the thaw nothing changes: the same instances (same pids), none marked for
    // deletion, both nodes Ready.
    while thawed.elapsed() < Duration::from_secs(6) {
        let all = ha.fleet.instances("web");
        assert_eq!(
            names(&all),
            expected,
            "instances changed after the thaw\n{}",
            ha.logs()
        );
        assert!(
            all.iter()
                .all(|i| i["metadata"]["deletionTimestamp"].is_null()),
            "{all:?}"
        );
        assert_eq!(
            ha.fleet.ready_nodes().len(),
            2,
            "a node went NotReady\n{}",
            ha.logs()
        );
        #[allow(clippy::disallowed_methods)] // the pace of the observation, not synchronization
        std::thread::sleep(Duration::from_millis(100));
    }
    // It follows, and says why it stopped leading.
    assert_ne!(ha.leader(), Some(old));
    let log = match old {
        0 => ha.fleet.server.log(),
        k => ha.others[k - 1].0.as_ref().unwrap().log(),
    };
    eprintln!(
        "{test}: the thawed leader had {} writes refused by the fence",
        log.matches("no longer leads").count()
    );
    assert!(
        https(&ha.apis[old], &ha.fleet.tls, "GET", "/healthz", None, "")
            .is_some_and(|r| r.status == 200),
        "the thawed server answers\n{log}"
    );
}

/// 50 rounds of `kill -9` of a server or an etcd member (then its restart) while three
/// writers apply services through all three servers: every apply that was acknowledged (a
/// 200 or 201) is there afterwards, with the spec it acknowledged.
#[test]
fn every_acknowledged_apply_survives_50_rounds_of_kill_9() {
    let test = "every_acknowledged_apply_survives_50_rounds_of_kill_9";
    let Some(rt) = with_etcd(test) else { return };
    let mut ha = Ha::start(&rt, 15, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..3 {
        let (stop, attempts) = (stop.clone(), attempts.clone());
        let (apis, tls, token) = (
            ha.apis.clone(),
            ha.fleet.tls.clone(),
            ha.fleet.token.clone(),
        );
        writers.push(std::thread::spawn(move || {
            let mut acked: Vec<(String, u64)> = Vec::new();
            let mut refused: BTreeMap<u16, u64> = BTreeMap::new();
            let deadline = Instant::now() + Duration::from_secs(600);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                n += 1;
                attempts.fetch_add(1, Ordering::SeqCst);
                let name = format!("w{w}-{n}");
                let body = serde_json::json!({
                    "metadata": { "name": name },
                    "spec": { "command": "/bin/true", "replicas": 0, "env": { "N": n.to_string() } }
                })
                .to_string();
                let api = &apis[(n as usize + w) % apis.len()];
                let answer = std::net::TcpStream::connect(api).ok().and_then(|tcp| {
                    tcp.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
                    let server = rustls::pki_types::ServerName::try_from("127.0.0.1").ok()?;
                    let conn = rustls::ClientConnection::new(tls.clone(), server).ok()?;
                    let auth = format!("Bearer {token}");
                    http_on(
                        rustls::StreamOwned::new(conn, tcp),
                        api,
                        "POST",
                        "/api/v1/services",
                        &[
                            ("Authorization", &auth),
                            ("Content-Type", "application/json"),
                        ],
                        &body,
                    )
                });
                match answer {
                    Some(r) if r.status == 200 || r.status == 201 => acked.push((name, n)),
                    Some(r) => *refused.entry(r.status).or_default() += 1,
                    None => *refused.entry(0).or_default() += 1,
                }
            }
            (acked, refused)
        }));
    }
    let more_attempts = |what: &str| {
        let from = attempts.load(Ordering::SeqCst);
        wait_for(what, Duration::from_secs(60), || {
            (attempts.load(Ordering::SeqCst) >= from + 6).then_some(())
        });
    };
    for round in 0..50 {
        let which = (round / 2) % 3;
        if round % 2 == 0 {
            ha.kill_server(which);
            more_attempts("writes with a server down");
            ha.start_server(which);
        } else {
            ha.etcd.kill(which);
            more_attempts("writes with an etcd member down");
            ha.etcd.restart(which);
            rt.block_on(ha.etcd.wait_writable());
        }
        more_attempts("writes after the restart");
    }
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    let mut refused: BTreeMap<u16, u64> = BTreeMap::new();
    for w in writers {
        let (a, r) = w.join().unwrap();
        acked.extend(a);
        for (status, count) in r {
            *refused.entry(status).or_default() += count;
        }
    }
    // Every acknowledged apply, read back through any server.
    let mut missing = Vec::new();
    for (name, n) in &acked {
        let (status, body) = call(
            &ha.fleet.api,
            &ha.fleet.tls,
            "GET",
            &format!("/api/v1/services/{name}"),
            &ha.fleet.token,
        );
        let stored: Option<Value> = serde_json::from_str(&body).ok();
        let stored_n = stored
            .as_ref()
            .and_then(|v| v["spec"]["env"]["N"].as_str().map(str::to_string));
        if status != 200 || stored_n.as_deref() != Some(n.to_string().as_str()) {
            missing.push(format!("{name}: {status} {body}"));
        }
    }
    eprintln!(
        "{test}: {} applies acknowledged and all {} read back; refused or unanswered by status: {refused:?}",
        acked.len(),
        acked.len() - missing.len()
    );
    assert!(
        acked.len() >= 300,
        "too few acknowledged writes to mean anything: {}",
        acked.len()
    );
    assert!(missing.is_empty(), "acknowledged and lost: {missing:?}");
}

/// A server on a three-member etcd: without a quorum a write is refused with a 503 that names
/// the store (the CLI says so), and once the quorum is back the same write goes through.
#[test]
fn without_an_etcd_quorum_writes_fail_with_503_and_recover() {
    let test = "without_an_etcd_quorum_writes_fail_with_503_and_recover";
    let Some(rt) = with_etcd(test) else { return };
    let mut cluster = rt.block_on(etcd_support::Cluster::start(3));
    let endpoints = cluster.endpoints().join(",");
    let fleet = Fleet::start_with(10, 0, &["--etcd", &endpoints]);
    let file = fleet.dir.path().join("web.toml");
    std::fs::write(&file, web(2)).unwrap();
    fleet.ok(&["apply", "-f", file.to_str().unwrap()]);

    cluster.kill(0);
    cluster.kill(1);
    std::fs::write(&file, web(3)).unwrap();
    let out = fleet.cli(&["apply", "-f", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "applied without a quorum");
    assert!(err.contains("the store (etcd) is unavailable"), "{err}");
    // Back within the server's hold (15 s): it stays up and carries on.
    cluster.restart(0);
    cluster.restart(1);
    wait_for(
        "the apply to go through again",
        Duration::from_secs(60),
        || {
            fleet
                .cli(&["apply", "-f", file.to_str().unwrap()])
                .status
                .success()
                .then_some(())
        },
    );
    let v = fleet.get("/api/v1/services/web");
    assert_eq!(v["spec"]["replicas"], 3, "{v}");
    assert!(fleet.server.child.id() > 0);
}

/// `flotilla store migrate`: a stopped server's embedded store into an empty etcd; the server
/// started on etcd has the same services (same uids), their revision history and instances;
/// a second migration into the now full etcd is refused.
#[test]
fn store_migrate_moves_an_embedded_store_to_etcd() {
    let test = "store_migrate_moves_an_embedded_store_to_etcd";
    if let Some(why) = etcd_support::unavailable() {
        etcd_support::skip(test, &why);
        return;
    }
    let mut fleet = Fleet::start(11, 0);
    let file = fleet.dir.path().join("web.toml");
    std::fs::write(&file, web(2)).unwrap();
    fleet.ok(&["apply", "-f", file.to_str().unwrap()]);
    fleet.ok(&["restart", "web"]);
    // The controller records the restart's revision in the status a moment later.
    let before = wait_for("revision 2 in the status", Duration::from_secs(20), || {
        let s = fleet.get("/api/v1/services/web");
        (s["status"]["revision"] == 2).then_some(s)
    });
    let history = fleet.ok(&["rollout", "history", "web"]);
    let instances = fleet.instances("web").len();
    assert!(instances >= 2, "{instances}");
    let _ = kill(
        Pid::from_raw(fleet.server.child.id() as i32),
        Signal::SIGTERM,
    );
    let _ = fleet.server.child.wait();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let member = rt.block_on(etcd_support::Etcd::start());
    let data = fleet.dir.path().join("server");
    let from = format!("redb:{}", data.join("store.redb").display());
    let to = format!("etcd:{}", member.endpoint);
    let out = fleet.cli(&["store", "migrate", "--from", &from, "--to", &to]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("services") && said.contains("read them back"),
        "{said}"
    );
    // Into an etcd that holds something: refused, nothing written.
    let again = fleet.cli(&["store", "migrate", "--from", &from, "--to", &to]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(err.contains("already holds"), "{err}");

    fleet.restart_server(&["--etcd", &member.endpoint]);
    let after = fleet.get("/api/v1/services/web");
    assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(after["spec"], before["spec"]);
    assert_eq!(after["status"]["revision"], before["status"]["revision"]);
    assert_eq!(
        fleet.ok(&["rollout", "history", "web"]).lines().count(),
        history.lines().count()
    );
    assert_eq!(fleet.instances("web").len(), instances);
}

/// `server --etcd https://…` with `--etcd-ca`, `--etcd-cert` and `--etcd-key` reaches an etcd
/// that requires client certificates; without the CA it says what is missing.
#[test]
fn a_server_reaches_etcd_over_tls_with_its_certificate() {
    let test = "a_server_reaches_etcd_over_tls_with_its_certificate";
    if let Some(why) = etcd_support::unavailable() {
        etcd_support::skip(test, &why);
        return;
    }
    let tls = etcd_support::TestTls::make();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let member = rt.block_on(etcd_support::Etcd::start_tls(&tls));
    let (cert, key) = (
        tls.dir.path().join("client.crt"),
        tls.dir.path().join("client.key"),
    );
    std::fs::write(&cert, &tls.client_cert).unwrap();
    std::fs::write(&key, &tls.client_key).unwrap();
    let ca = tls.dir.path().join("ca.crt");
    let fleet = Fleet::start_with(
        12,
        0,
        &[
            "--etcd",
            &member.endpoint,
            "--etcd-ca",
            ca.to_str().unwrap(),
            "--etcd-cert",
            cert.to_str().unwrap(),
            "--etcd-key",
            key.to_str().unwrap(),
        ],
    );
    let file = fleet.dir.path().join("web.toml");
    std::fs::write(&file, web(1)).unwrap();
    fleet.ok(&["apply", "-f", file.to_str().unwrap()]);
    assert!(fleet.ok(&["get", "services"]).contains("web"));

    let out = Command::new(flotilla_bin())
        .args(["--data-dir"])
        .arg(fleet.dir.path().join("other"))
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            &member.endpoint,
        ])
        .env("FLOTILLA_CONFIG_DIR", fleet.dir.path().join("config"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("need --etcd-ca"), "{err}");
}
