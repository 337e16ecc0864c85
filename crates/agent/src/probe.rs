//! Health probes: a pure threshold state machine ([`ProbeState`]), the checks themselves
//! (HTTP, TCP, exec), and the per-process probe loop that reports transitions to the worker.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_spec::{Probe, Probes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::process::{self, LaunchSpec};
use nix::sys::signal::Signal;

/// Readiness is probed at most this far apart until the instance first becomes ready.
pub const FAST_READINESS_PERIOD: Duration = Duration::from_millis(100);

/// Kubernetes-style thresholds: the result flips to healthy after `success_threshold`
/// consecutive successes and to unhealthy after `failure_threshold` consecutive failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeState {
    success_threshold: u32,
    failure_threshold: u32,
    successes: u32,
    failures: u32,
    healthy: Option<bool>,
}

impl ProbeState {
    /// `initial`: the result before any check (`None` = unknown: startup; `Some(false)`:
    /// readiness; `Some(true)`: liveness).
    pub fn new(success_threshold: u32, failure_threshold: u32, initial: Option<bool>) -> Self {
        Self {
            success_threshold: success_threshold.max(1),
            failure_threshold: failure_threshold.max(1),
            successes: 0,
            failures: 0,
            healthy: initial,
        }
    }

    pub fn healthy(&self) -> Option<bool> {
        self.healthy
    }

    /// Records one check; returns the new result when it changed.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= self.success_threshold && self.healthy != Some(true) {
                self.healthy = Some(true);
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.failure_threshold && self.healthy != Some(false) {
                self.healthy = Some(false);
                return Some(false);
            }
        }
        None
    }
}

/// What a check needs to know about the instance.
#[derive(Debug, Clone)]
pub struct ProbeContext {
    /// The address the instance listens on (its node's).
    pub host: String,
    pub ports: BTreeMap<String, u16>,
    /// Name of the first port (default for http/tcp probes).
    pub first_port: Option<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    /// Exec probes run as the instance does: as this user and group, with this
    /// RLIMIT_NOFILE, inside the instance's cgroup (these `cgroup.procs` files).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub open_files: Option<u64>,
    pub cgroup_procs: Vec<PathBuf>,
}

impl ProbeContext {
    fn port(&self, name: Option<&String>) -> Result<u16, String> {
        let name = name
            .or(self.first_port.as_ref())
            .ok_or("no port to probe")?;
        self.ports
            .get(name)
            .copied()
            .ok_or_else(|| format!("unknown port {name:?}"))
    }
}

/// Runs one check; `Err` carries a human-readable reason.
pub async fn check(probe: &Probe, ctx: &ProbeContext) -> Result<(), String> {
    let timeout = probe.timeout.0.max(Duration::from_millis(1));
    if let Some(h) = &probe.http {
        let port = ctx.port(h.port.as_ref())?;
        return match tokio::time::timeout(timeout, http_get(&ctx.host, port, &h.path)).await {
            Ok(Ok(code)) if (200..400).contains(&code) => Ok(()),
            Ok(Ok(code)) => Err(format!("HTTP GET {} on port {port}: status {code}", h.path)),
            Ok(Err(e)) => Err(format!("HTTP GET {} on port {port}: {e}", h.path)),
            Err(_) => Err(format!(
                "HTTP GET {} on port {port}: timed out after {timeout:?}",
                h.path
            )),
        };
    }
    if let Some(t) = &probe.tcp {
        let port = ctx.port(t.port.as_ref())?;
        return match tokio::time::timeout(timeout, TcpStream::connect((ctx.host.as_str(), port)))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("TCP connect to port {port}: {e}")),
            Err(_) => Err(format!(
                "TCP connect to port {port}: timed out after {timeout:?}"
            )),
        };
    }
    if let Some(x) = &probe.exec {
        return exec(&x.command, ctx, timeout).await;
    }
    Err("probe has no http, tcp or exec check".to_string())
}

/// A minimal HTTP/1.1 GET; returns the status code.
async fn http_get(host: &str, port: u16, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect((host, port)).await?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: flotilla-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "malformed HTTP status line",
        )
    };
    let mut parts = line.split_whitespace();
    match parts.next() {
        Some(v) if v.starts_with("HTTP/") => {}
        _ => return Err(bad()),
    }
    parts.next().and_then(|c| c.parse().ok()).ok_or_else(bad)
}

/// Runs an exec probe with the instance's identity, rlimits and cgroup (the same pre-exec
/// path as the instance's own process), in its own process group; on timeout the whole group
/// is SIGKILLed. Whatever the command left running in its group is killed too.
async fn exec(command: &[String], ctx: &ProbeContext, timeout: Duration) -> Result<(), String> {
    let Some((prog, args)) = command.split_first() else {
        return Err("exec probe has an empty command".to_string());
    };
    let launch = LaunchSpec {
        program: prog.clone(),
        args: args.to_vec(),
        env: ctx.env.clone(),
        workdir: ctx.workdir.clone(),
        uid: ctx.uid,
        gid: ctx.gid,
        open_files: ctx.open_files,
        cgroup_procs: ctx.cgroup_procs.clone(),
    };
    let mut cmd = process::tokio_command(&launch).map_err(|e| format!("exec {prog}: {e}"))?;
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().map_err(|e| format!("exec {prog}: {e}"))?;
    let pgid = child.id().unwrap_or(0);
    let r = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(format!("exec {prog}: {st}")),
        Ok(Err(e)) => Err(format!("exec {prog}: {e}")),
        Err(_) => {
            process::signal_group(pgid, Signal::SIGKILL);
            let _ = child.kill().await;
            Err(format!("exec {prog}: timed out after {timeout:?}"))
        }
    };
    if pgid != 0 && !process::group_members(pgid).is_empty() {
        process::signal_group(pgid, Signal::SIGKILL);
    }
    r
}

/// What the probe loop tells the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeEvent {
    /// One check failed (`probe`: `startup`, `readiness`, `liveness`).
    CheckFailed {
        probe: &'static str,
        message: String,
    },
    StartupPassed,
    /// The startup probe reached its failure threshold: restart.
    StartupFailed(String),
    Ready(bool, String),
    /// The liveness probe reached its failure threshold: restart.
    LivenessFailed(String),
}

/// Where the probes of a re-adopted process start: past its initial delays, past its startup
/// probe if that had passed, and from the readiness its status shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub started: bool,
    pub ready: bool,
}

/// Runs the probes of one process until `cancel`; reports through `tx`. Does not return
/// before `cancel`, even when there is nothing (left) to probe, so `tx` stays open and the
/// worker's receiver never reports a closed channel while the process runs.
pub async fn run_probes(
    probes: Probes,
    ctx: ProbeContext,
    tx: mpsc::Sender<ProbeEvent>,
    cancel: CancellationToken,
    resume: Option<Resume>,
) {
    let body = async {
        if let Some(p) = &probes.startup
            && !resume.is_some_and(|r| r.started)
            && !startup(p, &ctx, &tx).await
        {
            return;
        }
        let _ = tx.send(ProbeEvent::StartupPassed).await;
        tokio::join!(
            readiness(probes.readiness.as_ref(), &ctx, &tx, resume),
            liveness(probes.liveness.as_ref(), &ctx, &tx, resume)
        );
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = body => cancel.cancelled().await,
    }
}

async fn failed(tx: &mpsc::Sender<ProbeEvent>, probe: &'static str, message: &str) {
    let _ = tx
        .send(ProbeEvent::CheckFailed {
            probe,
            message: message.to_string(),
        })
        .await;
}

/// Returns true when the startup probe passed.
async fn startup(p: &Probe, ctx: &ProbeContext, tx: &mpsc::Sender<ProbeEvent>) -> bool {
    tokio::time::sleep(p.initial_delay.0).await;
    let mut st = ProbeState::new(1, p.failure_threshold, None);
    let mut tick = tokio::time::interval(p.period.0.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let r = check(p, ctx).await;
        if let Err(m) = &r {
            failed(tx, "startup", m).await;
        }
        match st.observe(r.is_ok()) {
            Some(true) => return true,
            Some(false) => {
                let _ = tx
                    .send(ProbeEvent::StartupFailed(r.err().unwrap_or_default()))
                    .await;
                return false;
            }
            None => {}
        }
    }
}

async fn readiness(
    p: Option<&Probe>,
    ctx: &ProbeContext,
    tx: &mpsc::Sender<ProbeEvent>,
    resume: Option<Resume>,
) {
    let Some(p) = p else {
        let _ = tx.send(ProbeEvent::Ready(true, String::new())).await;
        return;
    };
    // A re-adopted process that was ready stays ready unless the probe fails its threshold,
    // and its first success is reported (the confirmation that it still answers).
    let initial = match resume {
        None => {
            tokio::time::sleep(p.initial_delay.0).await;
            Some(false)
        }
        Some(r) if r.ready => None,
        Some(_) => Some(false),
    };
    let mut st = ProbeState::new(p.success_threshold, p.failure_threshold, initial);
    let mut ever_ready = false;
    let period = p.period.0.max(Duration::from_millis(10));
    loop {
        let r = check(p, ctx).await;
        if let Err(m) = &r {
            failed(tx, "readiness", m).await;
        }
        if let Some(ready) = st.observe(r.is_ok()) {
            ever_ready |= ready;
            let _ = tx
                .send(ProbeEvent::Ready(ready, r.err().unwrap_or_default()))
                .await;
        }
        let wait = if ever_ready {
            period
        } else {
            period.min(FAST_READINESS_PERIOD)
        };
        tokio::time::sleep(wait).await;
    }
}

async fn liveness(
    p: Option<&Probe>,
    ctx: &ProbeContext,
    tx: &mpsc::Sender<ProbeEvent>,
    resume: Option<Resume>,
) {
    let Some(p) = p else {
        return;
    };
    if resume.is_none() {
        tokio::time::sleep(p.initial_delay.0).await;
    }
    let mut st = ProbeState::new(p.success_threshold, p.failure_threshold, Some(true));
    let mut tick = tokio::time::interval(p.period.0.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let r = check(p, ctx).await;
        if let Err(m) = &r {
            failed(tx, "liveness", m).await;
        }
        if st.observe(r.is_ok()) == Some(false) {
            let _ = tx
                .send(ProbeEvent::LivenessFailed(r.err().unwrap_or_default()))
                .await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_spec::{Dur, ExecProbe, HttpProbe, TcpProbe};

    #[test]
    fn thresholds() {
        let mut r = ProbeState::new(2, 3, Some(false));
        assert_eq!(r.observe(true), None);
        assert_eq!(r.observe(true), Some(true));
        assert_eq!(r.observe(true), None);
        assert_eq!(r.observe(false), None);
        assert_eq!(r.observe(false), None);
        assert_eq!(r.observe(true), None, "a success resets the failure streak");
        assert_eq!(r.observe(false), None);
        assert_eq!(r.observe(false), None);
        assert_eq!(r.observe(false), Some(false));
        assert_eq!(r.observe(false), None);
        assert_eq!(r.healthy(), Some(false));

        let mut live = ProbeState::new(1, 1, Some(true));
        assert_eq!(live.observe(true), None);
        assert_eq!(live.observe(false), Some(false));

        let mut start = ProbeState::new(1, 2, None);
        assert_eq!(start.observe(false), None);
        assert_eq!(start.observe(true), Some(true));
        let mut start = ProbeState::new(0, 0, None);
        assert_eq!(
            start.observe(false),
            Some(false),
            "thresholds are at least 1"
        );
    }

    fn probe() -> Probe {
        Probe {
            http: None,
            tcp: None,
            exec: None,
            initial_delay: Dur::zero(),
            period: Dur(Duration::from_millis(50)),
            timeout: Dur(Duration::from_millis(500)),
            success_threshold: 1,
            failure_threshold: 1,
        }
    }

    fn ctx(port: u16) -> ProbeContext {
        ProbeContext {
            host: "127.0.0.1".into(),
            ports: BTreeMap::from([("http".to_string(), port)]),
            first_port: Some("http".to_string()),
            env: BTreeMap::from([("WANT".to_string(), "yes".to_string())]),
            workdir: None,
            uid: None,
            gid: None,
            open_files: None,
            cgroup_procs: Vec::new(),
        }
    }

    async fn serve_once(status: &'static str) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await;
        });
        port
    }

    #[tokio::test]
    async fn http_tcp_exec_checks() {
        let mut p = probe();
        p.http = Some(HttpProbe {
            path: "/healthz".to_string(),
            port: None,
        });
        let port = serve_once("204 No Content").await;
        assert_eq!(check(&p, &ctx(port)).await, Ok(()));
        let port = serve_once("302 Found").await;
        assert_eq!(check(&p, &ctx(port)).await, Ok(()));
        let port = serve_once("503 Service Unavailable").await;
        let e = check(&p, &ctx(port)).await.unwrap_err();
        assert!(e.contains("503"), "{e}");

        let mut t = probe();
        t.tcp = Some(TcpProbe { port: None });
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(check(&t, &ctx(port)).await, Ok(()));
        drop(l);
        assert!(check(&t, &ctx(port)).await.is_err());
        t.tcp = Some(TcpProbe {
            port: Some("nope".to_string()),
        });
        assert!(
            check(&t, &ctx(port))
                .await
                .unwrap_err()
                .contains("unknown port")
        );

        let mut x = probe();
        x.exec = Some(ExecProbe {
            command: vec!["sh".into(), "-c".into(), "test \"$WANT\" = yes".into()],
        });
        assert_eq!(check(&x, &ctx(1)).await, Ok(()));
        x.exec = Some(ExecProbe {
            command: vec!["sh".into(), "-c".into(), "exit 3".into()],
        });
        assert!(check(&x, &ctx(1)).await.is_err());
        x.exec = Some(ExecProbe {
            command: vec!["sleep".into(), "5".into()],
        });
        x.timeout = Dur(Duration::from_millis(100));
        let started = std::time::Instant::now();
        assert!(check(&x, &ctx(1)).await.unwrap_err().contains("timed out"));
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn loop_reports_transitions() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("ready");
        let mut r = probe();
        r.period = Dur(Duration::from_secs(60)); // fast period applies until first ready
        r.exec = Some(ExecProbe {
            command: vec!["test".into(), "-e".into(), flag.display().to_string()],
        });
        let probes = Probes {
            startup: None,
            readiness: Some(r),
            liveness: None,
        };
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run_probes(probes, ctx(1), tx, cancel.clone(), None));
        assert_eq!(rx.recv().await, Some(ProbeEvent::StartupPassed));
        assert!(matches!(
            rx.recv().await,
            Some(ProbeEvent::CheckFailed {
                probe: "readiness",
                ..
            })
        ));
        std::fs::write(&flag, "").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let ev = tokio::time::timeout_at(deadline, rx.recv()).await.unwrap();
            if let Some(ProbeEvent::Ready(true, _)) = ev {
                break;
            }
        }
        cancel.cancel();
        task.await.unwrap();
    }
}
