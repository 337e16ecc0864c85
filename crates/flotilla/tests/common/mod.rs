//! Harness for end-to-end tests: a real `flotilla up` process on loopback with its own data
//! directory, context directory and node name, plus small blocking HTTP helpers.
#![allow(dead_code, clippy::disallowed_macros)] // test harness prints skip notices

pub mod load;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn flotilla_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flotilla"))
}

/// The demo service, built next to `flotilla` by `cargo test --workspace` / `cargo build`.
pub fn demo_bin() -> PathBuf {
    let p = flotilla_bin().with_file_name("flotilla-demo");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` (or the whole suite) first",
        p.display()
    );
    p
}

/// The context file of the only `up` writing into `config_dir`, once it is complete.
pub fn read_context(config_dir: &std::path::Path) -> Option<Value> {
    let dir = std::fs::read_dir(config_dir.join("contexts")).ok()?;
    let path = dir
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))?;
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        // The interval of a deadline-bounded poll, not synchronization: the condition is
        // re-checked each time.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// True when cgroup v1 memory/cpu/pids or cgroup v2 can be written here.
pub fn cgroups_available() -> bool {
    if !is_root() {
        return false;
    }
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        || (Path::new("/sys/fs/cgroup/memory").exists()
            && Path::new("/sys/fs/cgroup/pids").exists())
}

/// Prints a skip notice where people see it: libtest captures `print!`, not the stderr handle.
pub fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

/// Returns false (after printing why) when a test needing root and cgroups cannot run.
pub fn require_cgroups(test: &str) -> bool {
    if cgroups_available() {
        return true;
    }
    skip(&format!(
        "{test} needs root and writable cgroups (v1 or v2); run the suite as root"
    ));
    false
}

pub struct Http {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request with `Connection: close`; `None` if the connection failed.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<Http> {
    let stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    http_on(stream, addr, method, path, headers, body)
}

/// The same over an open connection (TLS, say).
#[allow(dead_code)] // not every test binary speaks TLS
pub fn http_on(
    mut stream: impl Read + Write,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<Http> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).ok()?;
    stream.flush().ok()?;
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify: what was read is the answer.
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Some(Http { status, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub struct Up {
    pub dir: tempfile::TempDir,
    pub node: String,
    pub child: Option<Child>,
    pub api: String,
    pub gateway: String,
    pub metrics: String,
    pub token: String,
    /// Output of the latest `flotilla up` started by [`Up::spawn`].
    pub log: PathBuf,
}

impl Up {
    /// Writes `services` (TOML `[service.*]` tables) to a file and runs `flotilla up -f` on it.
    pub fn start(services: &str) -> Up {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = format!("t{}", rand_suffix());
        let mut up = Up {
            dir,
            node,
            child: None,
            api: String::new(),
            gateway: String::new(),
            metrics: String::new(),
            token: String::new(),
            log: PathBuf::new(),
        };
        up.write_file(services);
        up.spawn();
        up
    }

    /// (Re)writes the file `up -f` reads: the test's `[up]` table and `services`.
    pub fn write_file(&self, services: &str) {
        let text = format!(
            "[up]\napi = \"127.0.0.1:0\"\ngateway = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n{services}"
        );
        std::fs::write(self.dir.path().join("flotilla.toml"), text).expect("write file");
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts (or restarts) `flotilla up` and waits until its API answers.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_dir_all(self.config_dir().join("contexts"));
        self.log = self.dir.path().join(format!("up-{}.log", rand_suffix()));
        let log = std::fs::File::create(&self.log).expect("log");
        let child = Command::new(flotilla_bin())
            .args(["up", "-f"])
            .arg(self.dir.path().join("flotilla.toml"))
            .args(["--node", &self.node])
            .env("FLOTILLA_CONFIG_DIR", self.config_dir())
            .env("PATH", path_with_demo())
            .env("FLOTILLA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn flotilla up");
        self.child = Some(child);
        let ctx: Value = wait_for(
            "flotilla up to write its context file",
            Duration::from_secs(30),
            || {
                if let Some(c) = self.child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    panic!(
                        "flotilla up exited early with {status}:\n{}",
                        self.up_logs()
                    );
                }
                read_context(&self.config_dir())
            },
        );
        let strip = |v: &Value| {
            v.as_str()
                .unwrap_or_default()
                .trim_start_matches("http://")
                .trim_end_matches("/metrics")
                .to_string()
        };
        self.api = strip(&ctx["api"]);
        self.gateway = strip(&ctx["gateway"]);
        self.metrics = strip(&ctx["metrics"]);
        self.token = std::fs::read_to_string(ctx["tokenFile"].as_str().expect("token file"))
            .expect("token")
            .trim()
            .to_string();
    }

    /// What the latest `flotilla up` printed so far.
    pub fn last_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn up_logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("up-") {
                    out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    /// Runs the CLI against this `up`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(flotilla_bin())
            .args(args)
            .env("FLOTILLA_CONFIG_DIR", self.config_dir())
            .env_remove("FLOTILLA_API")
            .env_remove("FLOTILLA_TOKEN")
            .env_remove("FLOTILLA_DATA_DIR")
            .current_dir(self.dir.path())
            .output()
            .expect("run flotilla")
    }

    pub fn api_get(&self, path: &str) -> Value {
        let auth = format!("Bearer {}", self.token);
        let r =
            http(&self.api, "GET", path, &[("Authorization", &auth)], "").expect("API reachable");
        assert!(r.status < 300, "GET {path}: {} {}", r.status, r.body);
        serde_json::from_str(&r.body).expect("JSON")
    }

    pub fn instances(&self, service: &str) -> Vec<Value> {
        let v = self.api_get(&format!("/api/v1/instances?service={service}"));
        v["items"].as_array().cloned().unwrap_or_default()
    }

    pub fn ready_instances(&self, service: &str) -> Vec<Value> {
        self.instances(service)
            .into_iter()
            .filter(|i| {
                i["status"]["ready"] == true && i["metadata"]["deletionTimestamp"].is_null()
            })
            .collect()
    }

    pub fn wait_ready(&self, service: &str, n: usize) -> Vec<Value> {
        wait_for(
            &format!("{n} ready instances of {service}"),
            Duration::from_secs(30),
            || {
                let ready = self.ready_instances(service);
                (ready.len() == n && self.instances(service).len() == n).then_some(ready)
            },
        )
    }

    pub fn through_gateway(&self, host: &str, path: &str) -> Option<Http> {
        http(&self.gateway, "GET", path, &[("Host", host)], "")
    }

    /// The cgroup directories of this node (v1 memory controller, or v2).
    pub fn node_cgroups(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for (ctrl, path) in own_cgroups() {
            let base = if ctrl.is_empty() {
                PathBuf::from("/sys/fs/cgroup")
            } else {
                PathBuf::from("/sys/fs/cgroup").join(&ctrl)
            };
            let scope = flotilla_agent::cgroup_scope_name(&self.node, &self.data_dir());
            let d = base.join(path.trim_start_matches('/')).join(scope);
            dirs.push(d);
        }
        dirs
    }

    /// Instance cgroups that still exist under this node.
    pub fn leftover_cgroups(&self) -> Vec<PathBuf> {
        let mut left = Vec::new();
        for d in self.node_cgroups() {
            if let Ok(entries) = std::fs::read_dir(&d) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        left.push(e.path());
                    }
                }
            }
        }
        left
    }

    /// Processes whose working directory is inside this test's directory (every workload's).
    pub fn workload_pids(&self) -> Vec<u32> {
        let me = std::process::id();
        let up = self.child.as_ref().map(|c| c.id());
        let root = std::fs::canonicalize(self.dir.path())
            .unwrap_or_else(|_| self.dir.path().to_path_buf());
        let mut pids = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if pid == me || Some(pid) == up {
                    continue;
                }
                if let Ok(cwd) = std::fs::read_link(e.path().join("cwd"))
                    && cwd.starts_with(&root)
                {
                    // Zombies are already dead; only count live ones.
                    let state = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                    let live = state
                        .rsplit_once(") ")
                        .map(|(_, r)| !r.starts_with('Z'))
                        .unwrap_or(false);
                    if live {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }

    /// Sends SIGTERM to `flotilla up` and waits for it to exit; returns its exit code.
    /// Ctrl-C (SIGINT): `up` stops every workload and exits; its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal_and_wait(nix::sys::signal::Signal::SIGINT)
    }

    /// SIGTERM (a restart by systemd, an upgrade): `up` exits, its workloads keep running.
    pub fn terminate(&mut self) -> Option<i32> {
        self.signal_and_wait(nix::sys::signal::Signal::SIGTERM)
    }

    fn signal_and_wait(&mut self, signal: nix::sys::signal::Signal) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        let status = wait_for(
            &format!("flotilla up to exit after {signal}"),
            Duration::from_secs(60),
            || child.try_wait().ok().flatten(),
        );
        status.code()
    }

    /// SIGKILLs `flotilla up`, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        // Last resort so a failed test never leaves workloads behind (a shim's workload dies
        // with it).
        kill_shims_under(self.dir.path());
        for pid in self.workload_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The shims (`flotilla-shim <run dir>`) whose run directory is under `dir`.
pub fn shims_under(dir: &Path) -> Vec<u32> {
    let root = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|b| *b == 0);
        if args.next() != Some(b"flotilla-shim".as_slice()) {
            continue;
        }
        let Some(run) = args.next() else { continue };
        let run = Path::new(std::ffi::OsStr::from_bytes(run));
        if run.starts_with(&root) || run.starts_with(dir) {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILLs the shims under `dir` (their workloads die with them): what a test leaves of the
/// agents it killed.
pub fn kill_shims_under(dir: &Path) {
    for pid in shims_under(dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// (controller, path) pairs from /proc/self/cgroup, for the controllers flotilla uses.
fn own_cgroups() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        if v2 && ctrls.is_empty() {
            out.push((String::new(), path.to_string()));
        } else if !v2 {
            for c in ctrls.split(',') {
                if matches!(c, "memory" | "pids") {
                    out.push((c.to_string(), path.to_string()));
                }
            }
        }
    }
    out
}

pub fn path_with_demo() -> String {
    let dir = demo_bin()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// `flotilla apply -f` of `text` (written to a file of its own) against `up`; must succeed.
pub fn apply(up: &Up, text: &str) {
    let file = up.dir.path().join(format!("apply-{}.toml", rand_suffix()));
    std::fs::write(&file, text).expect("write");
    let out = up.cli(&["apply", "-f", file.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn rand_suffix() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", n, std::process::id() % 4096)
}

/// The body the demo answers on `/`, which names the instance.
pub fn instance_of(body: &str) -> Option<String> {
    body.split_whitespace()
        .skip_while(|w| *w != "from")
        .nth(1)
        .map(str::to_string)
}

pub fn port_of(instance: &Value, name: &str) -> u16 {
    instance["status"]["ports"][name].as_u64().expect("port") as u16
}

pub fn name_of(instance: &Value) -> String {
    instance["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string()
}

pub fn demo_service(name: &str, replicas: u32, extra: &str) -> String {
    format!(
        r#"
[service.{name}]
command = "flotilla-demo"
args = ["--port", "${{PORT}}"]
replicas = {replicas}
ports = ["http"]
stop = {{ grace_period = "5s" }}
{extra}

[service.{name}.probes.readiness]
http = {{ path = "/health" }}
period = "200ms"
timeout = "200ms"
failure_threshold = 1

[[service.{name}.routes]]
host = "{name}.test"
path = "/"
"#
    )
}

/// A CLI process that streams (`logs -f`, `events -f`): its stdout lines arrive through a
/// channel read with deadlines; stderr goes to a file. Killed when dropped.
pub struct Follower {
    pub child: Child,
    pub lines: std::sync::mpsc::Receiver<String>,
    /// Every line received so far, in order.
    pub seen: Vec<String>,
    pub stderr: PathBuf,
}

impl Follower {
    pub fn start(up: &Up, args: &[&str]) -> Follower {
        let stderr = up
            .dir
            .path()
            .join(format!("follower-{}.err", rand_suffix()));
        let mut child = Command::new(flotilla_bin())
            .args(args)
            .env("FLOTILLA_CONFIG_DIR", up.config_dir())
            .env_remove("FLOTILLA_API")
            .env_remove("FLOTILLA_TOKEN")
            .env_remove("FLOTILLA_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn follower");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::sync_channel::<String>(4096);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Follower {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits (up to `timeout`) for a line matching `pred`, returning it.
    pub fn until(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {what} within {timeout:?}; got {:#?}\nstderr: {}",
                    self.seen,
                    self.stderr_text()
                ),
            }
        }
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (up to `timeout`) for the process to exit by itself.
    pub fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
        let child = &mut self.child;
        wait_for("the follower to exit", timeout, || {
            child.try_wait().ok().flatten()
        })
        .code()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A service that prints `tick-1`, `tick-2`, … ten times a second (no readiness probe, so
/// `min_ready` is its stability window).
pub fn ticker_service(min_ready: &str) -> String {
    format!(
        r#"
[service.ticker]
command = "sh"
args = ["-c", "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.1; done"]
deploy = {{ min_ready = "{min_ready}" }}
"#
    )
}

/// A demo service whose answer names its version (`GREETING`), with a readiness probe on
/// `/health` every `probe_period` (timeout the same) failing after `failure_threshold` misses.
/// `extra_args`: `, "--flag", "value"`; `deploy_line`: a whole `deploy = {…}` line or nothing.
pub fn versioned_demo(
    name: &str,
    replicas: u32,
    version: &str,
    extra_args: &str,
    deploy_line: &str,
    probe_period: &str,
    failure_threshold: u32,
) -> String {
    format!(
        r#"
[service.{name}]
command = "flotilla-demo"
args = ["--port", "${{PORT}}"{extra_args}]
replicas = {replicas}
ports = ["http"]
env = {{ GREETING = "{version}" }}
stop = {{ grace_period = "5s" }}
{deploy_line}

[service.{name}.probes.readiness]
http = {{ path = "/health" }}
period = "{probe_period}"
timeout = "{probe_period}"
failure_threshold = {failure_threshold}

[[service.{name}.routes]]
host = "{name}.test"
path = "/"
"#
    )
}

/// A singleton demo service listening on its node's address, for the partition tests.
pub const SINGLETON_SERVICE: &str = r#"
[service.solo]
command = "flotilla-demo"
args = ["--listen", "${FLOTILLA_HOST}:${PORT}"]
singleton = true
ports = ["http"]
stop = { grace_period = "1s" }

[service.solo.probes.readiness]
http = { path = "/health" }
period = "200ms"
timeout = "200ms"
failure_threshold = 1
"#;
