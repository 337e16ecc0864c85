//! A fleet over a real network: the server and each node in a network namespace of its own,
//! joined by veth pairs to a bridge in a "switch" namespace (addresses from 198.18.0.0/15,
//! the benchmarking range, only inside those namespaces). A partition is a link taken down.
//! Needs root (namespaces) and `ip` (iproute2, which scripts/install-deps.sh installs).
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{flotilla_bin, path_with_demo, wait_for};
use serde_json::Value;

/// Runs `ip ARGS`, which must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces `<id>-sw` (a bridge) and one per member, each with a veth to the bridge.
struct Net {
    id: String,
    members: Vec<String>,
}

impl Net {
    /// `None` (the test skips, saying why) without root or `ip`.
    fn create(members: &[&str]) -> Option<Net> {
        if !common::is_root() {
            common::skip("network namespaces need root");
            return None;
        }
        if Command::new("ip").arg("-V").output().is_err() {
            common::skip("`ip` (iproute2) is not installed: scripts/install-deps.sh installs it");
            return None;
        }
        let id = format!("f{}", &common::rand_suffix()[..4]);
        let net = Net {
            id: id.clone(),
            members: members.iter().map(|m| m.to_string()).collect(),
        };
        let sw = net.ns("sw");
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for (k, m) in members.iter().enumerate() {
            let ns = net.ns(m);
            let (inner, outer) = (format!("v{id}{k}"), net.port(m));
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &outer, "netns", &sw]);
            ip(&["-n", &sw, "link", "set", &outer, "master", "br0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.addr(m)),
                "dev",
                &inner,
            ]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
        }
        Some(net)
    }

    fn ns(&self, member: &str) -> String {
        format!("{}-{member}", self.id)
    }

    fn index(&self, member: &str) -> usize {
        self.members.iter().position(|m| m == member).unwrap()
    }

    /// The bridge's end of `member`'s link.
    fn port(&self, member: &str) -> String {
        format!("b{}{}", self.id, self.index(member))
    }

    fn addr(&self, member: &str) -> String {
        format!("198.18.0.{}", self.index(member) + 1)
    }

    /// Drops `member`'s link (up: restores it).
    fn link(&self, member: &str, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&[
            "-n",
            &self.ns("sw"),
            "link",
            "set",
            &self.port(member),
            state,
        ]);
    }

    /// `flotilla ARGS` inside `member`'s namespace.
    fn command(&self, member: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(member)])
            .arg(flotilla_bin())
            .args(args)
            .env("PATH", path_with_demo())
            .env_remove("FLOTILLA_TOKEN")
            .env_remove("FLOTILLA_API")
            .env_remove("FLOTILLA_CA");
        cmd
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it, and so their peers.
        for m in self.members.iter().map(String::as_str).chain(["sw"]) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(m)])
                .output();
        }
    }
}

struct Fleet {
    dir: tempfile::TempDir,
    net: Net,
    procs: BTreeMap<String, (Child, PathBuf)>,
    token: String,
    ca: PathBuf,
}

impl Fleet {
    fn spawn(&mut self, member: &str, args: &[&str], env: &[(&str, &str)]) {
        let log = self.dir.path().join(format!("{member}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = self.net.command(member, args);
        cmd.env("FLOTILLA_LOG", "info")
            .env("FLOTILLA_CONFIG_DIR", self.dir.path().join("config"))
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.procs
            .insert(member.to_string(), (cmd.spawn().unwrap(), log));
    }

    /// The CLI, as the admin, from the server's namespace.
    fn cli(&self, args: &[&str]) -> String {
        let api = format!("https://{}:7443", self.net.addr("server"));
        let out = self
            .net
            .command("server", args)
            .env("FLOTILLA_API", &api)
            .env("FLOTILLA_TOKEN", &self.token)
            .env("FLOTILLA_CA", &self.ca)
            .env("FLOTILLA_CONFIG_DIR", self.dir.path().join("config"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "flotilla {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Vec<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        match serde_json::from_str::<Value>(&self.cli(&all)).unwrap() {
            Value::Array(items) => items,
            v if v["items"].is_array() => v["items"].as_array().unwrap().clone(),
            v => vec![v],
        }
    }

    fn ready_nodes(&self) -> usize {
        self.json(&["get", "nodes"])
            .iter()
            .filter(|n| {
                n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == true)
                })
            })
            .count()
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|(m, (_, log))| {
                format!(
                    "--- {m}\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn start(net: Net, nodes: &[&str]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let server_dir = dir.path().join("server");
        let listen = format!("{}:7443", net.addr("server"));
        let mut fleet = Fleet {
            dir,
            net,
            procs: BTreeMap::new(),
            token: String::new(),
            ca: server_dir.join("ca.crt"),
        };
        fleet.spawn(
            "server",
            &[
                "--data-dir",
                server_dir.to_str().unwrap(),
                "server",
                "--listen",
                &listen,
            ],
            &[],
        );
        let token_file = server_dir.join("admin.token");
        fleet.token = wait_for("the server's token", Duration::from_secs(20), || {
            let t = std::fs::read_to_string(&token_file).ok()?;
            let ca = std::fs::metadata(&fleet.ca).ok()?;
            (!t.trim().is_empty() && ca.len() > 0).then(|| t.trim().to_string())
        });
        let join = wait_for("a join token", Duration::from_secs(20), || {
            let api = format!("https://{listen}");
            let out = fleet
                .net
                .command("server", &["token", "create", "--join", "--ttl", "10m"])
                .env("FLOTILLA_API", &api)
                .env("FLOTILLA_TOKEN", &fleet.token)
                .env("FLOTILLA_CA", &fleet.ca)
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        });
        for node in nodes {
            let data = fleet.dir.path().join(node);
            let address = fleet.net.addr(node);
            let api = format!("https://{listen}");
            fleet.spawn(
                node,
                &[
                    "--data-dir",
                    data.to_str().unwrap(),
                    "agent",
                    "--join",
                    &api,
                    "--node",
                    node,
                    "--address",
                    &address,
                    "--lease",
                    "3s",
                    // Placement must not hang on how full this machine's disk happens to be.
                    "--pressure-disk",
                    "0%",
                ],
                &[("FLOTILLA_TOKEN", &join)],
            );
        }
        wait_for("every node Ready", Duration::from_secs(30), || {
            (fleet.ready_nodes() == nodes.len()).then_some(())
        });
        fleet
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Agents first (they stop their instances), then the server; the net goes last.
        let mut order: Vec<String> = self
            .procs
            .keys()
            .filter(|k| *k != "server")
            .cloned()
            .collect();
        order.push("server".into());
        for m in &order {
            if let Some((child, _)) = self.procs.get_mut(m) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGINT,
                );
                // An agent stops its instances within their grace period, then exits.
                let _ = child.wait();
            }
        }
        common::kill_shims_under(self.dir.path());
    }
}

fn alive(pid: i64) -> bool {
    i32::try_from(pid).is_ok_and(|p| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
    })
}

/// Partition a node by dropping its link, for real: the singleton it runs is replaced on the
/// other node only once the cut-off node has stopped it itself, so two copies never run at
/// once; healed, the node comes back Ready and nothing runs twice.
#[test]
fn a_partitioned_node_never_leaves_two_copies_of_a_singleton() {
    let Some(net) = Net::create(&["server", "node-1", "node-2"]) else {
        return;
    };
    let fleet = Fleet::start(net, &["node-1", "node-2"]);
    let solo = common::SINGLETON_SERVICE;
    let path = fleet.dir.path().join("solo.toml");
    std::fs::write(&path, solo).unwrap();
    fleet.cli(&["node", "cordon", "node-2"]);
    fleet.cli(&["apply", "-f", path.to_str().unwrap()]);
    let ready_on = |node: &str| {
        fleet.json(&["get", "instances"]).into_iter().find(|i| {
            i["spec"]["service"] == "solo"
                && i["spec"]["node"] == node
                && i["status"]["ready"] == true
                && i["metadata"]["deletionTimestamp"].is_null()
        })
    };
    let first = wait_for("solo ready on node-1", Duration::from_secs(30), || {
        ready_on("node-1")
    });
    fleet.cli(&["node", "uncordon", "node-2"]);
    let old_pid = first["status"]["pid"].as_i64().unwrap();
    assert!(alive(old_pid));

    // Every process of the service ever listed is checked all along: never two alive.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let (ns, api) = (
            fleet.net.ns("server"),
            format!("https://{}:7443", fleet.net.addr("server")),
        );
        let (token, ca, config) = (
            fleet.token.clone(),
            fleet.ca.clone(),
            fleet.dir.path().join("config"),
        );
        std::thread::spawn(move || {
            let mut pids = std::collections::BTreeSet::new();
            let (mut most, mut samples) = (0, 0);
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let out = Command::new("ip")
                    .args(["netns", "exec", &ns])
                    .arg(flotilla_bin())
                    .args(["get", "instances", "-o", "json"])
                    .env("FLOTILLA_API", &api)
                    .env("FLOTILLA_TOKEN", &token)
                    .env("FLOTILLA_CA", &ca)
                    .env("FLOTILLA_CONFIG_DIR", &config)
                    .output();
                if let Ok(out) = out
                    && let Ok(v) = serde_json::from_slice::<Value>(&out.stdout)
                {
                    let items = v
                        .as_array()
                        .cloned()
                        .or_else(|| v["items"].as_array().cloned());
                    for i in items.unwrap_or_default() {
                        if i["spec"]["service"] == "solo"
                            && let Some(p) = i["status"]["pid"].as_i64()
                        {
                            pids.insert(p);
                        }
                    }
                }
                let running = pids.iter().filter(|p| alive(**p)).count();
                most = most.max(running);
                // Each round spawns the CLI: that paces the loop.
                samples += 1;
            }
            (most, pids.len(), samples)
        })
    };

    fleet.net.link("node-1", false);
    let cut = Instant::now();
    let second = wait_for("solo ready on node-2", Duration::from_secs(40), || {
        ready_on("node-2")
    });
    let took = cut.elapsed();
    assert!(
        !alive(old_pid),
        "the old copy still runs on the cut-off node (replaced after {took:?})\n{}",
        fleet.logs()
    );
    fleet.net.link("node-1", true);
    wait_for("node-1 Ready again", Duration::from_secs(30), || {
        (fleet.ready_nodes() == 2).then_some(())
    });
    let now: Vec<Value> = fleet
        .json(&["get", "instances"])
        .into_iter()
        .filter(|i| i["spec"]["service"] == "solo")
        .collect();
    assert_eq!(now.len(), 1, "{now:#?}");
    assert_eq!(now[0]["metadata"]["name"], second["metadata"]["name"]);
    stop.store(true, Ordering::SeqCst);
    let (most, pids, samples) = sampler.join().unwrap();
    assert!(samples >= 20, "the sampler ran {samples} times");
    assert_eq!(pids, 2, "both copies were seen");
    assert_eq!(most, 1, "two copies of the singleton ran at once");
    println!("node partitioned by its link: singleton replaced after {took:?}, never two copies");
}
