//! Runs the real `flotilla-demo` binary on a free loopback port and drives it over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::timeout;

const DEADLINE: Duration = Duration::from_secs(10);

struct Demo {
    child: Child,
    addr: SocketAddr,
    /// Lines the demo writes to stderr.
    log: mpsc::Receiver<String>,
}

impl Demo {
    async fn start(args: &[&str], env: &[(&str, &str)]) -> Demo {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-demo"));
        cmd.args(["--port", "0"])
            .args(args)
            .env_remove("PORT")
            .env_remove("GREETING")
            .env_remove("FLOTILLA_INSTANCE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn flotilla-demo");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, mut log) = mpsc::channel(1024);
        // Ends when the demo closes stderr (it exits) or the test drops the receiver.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        });
        let first = timeout(DEADLINE, async {
            while let Some(line) = log.recv().await {
                if line.contains("listening on http://") {
                    return line;
                }
            }
            panic!("demo exited before listening");
        })
        .await
        .expect("demo announces its address in time");
        let addr = first
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {first:?}"));
        Demo { child, addr, log }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("running") as i32)
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("send signal");
    }

    async fn get(&self, path: &str) -> (u16, String) {
        request(self.addr, "GET", path).await
    }

    async fn post(&self, path: &str) -> (u16, String) {
        request(self.addr, "POST", path).await
    }

    /// Waits until the demo logs a line containing `needle`.
    async fn wait_log(&mut self, needle: &str) -> String {
        timeout(DEADLINE, async {
            while let Some(line) = self.log.recv().await {
                if line.contains(needle) {
                    return line;
                }
            }
            panic!("demo exited before logging {needle:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("demo did not log {needle:?} in time"))
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        timeout(DEADLINE, self.child.wait())
            .await
            .expect("demo exits in time")
            .expect("wait for demo")
    }
}

/// One HTTP/1.1 request on a fresh connection; returns status and body.
async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    request_with_body(addr, method, path, "").await
}

async fn request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    timeout(DEADLINE, raw_request(addr, method, path, body))
        .await
        .unwrap_or_else(|_| panic!("{method} {path} timed out"))
}

async fn raw_request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let raw = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("complete answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, body.to_string())
}

fn rss_kib(pid: Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn greets_with_instance_name_greeting_and_pid() {
    let mut demo = Demo::start(&[], &[("FLOTILLA_INSTANCE", "web-1")]).await;
    let pid = demo.pid();
    assert_eq!(
        demo.get("/").await,
        (200, format!("hello from web-1 (pid {pid})\n"))
    );
    assert_eq!(demo.get("/pid").await, (200, format!("{pid}\n")));
    assert_eq!(demo.get("/health").await, (200, "ok".to_string()));
    assert_eq!(demo.get("/nope").await.0, 404);
    assert_eq!(demo.get("/crash").await.0, 405);
    assert_eq!(
        request_with_body(demo.addr, "POST", "/", "twelve bytes").await,
        (
            200,
            format!("hello from web-1 (pid {pid}): received 12 bytes\n")
        )
    );
    assert_eq!(
        demo.post("/").await,
        (
            200,
            format!("hello from web-1 (pid {pid}): received 0 bytes\n")
        )
    );
    assert_eq!(demo.post("/pid").await.0, 405);
    assert_eq!(request(demo.addr, "PUT", "/").await.0, 405);
    assert_eq!(demo.get("/slow?ms=x").await.0, 400);
    demo.signal(Signal::SIGTERM);
    assert!(demo.wait_exit().await.success());

    let demo = Demo::start(&[], &[("GREETING", "howdy")]).await;
    let (status, body) = demo.get("/").await;
    assert_eq!(status, 200);
    assert!(body.starts_with("howdy from "), "{body}");
    assert!(
        body.ends_with(&format!(" (pid {})\n", demo.pid())),
        "{body}"
    );
}

#[tokio::test]
async fn listen_flag_and_port_env() {
    // An invalid $PORT is reported, not silently replaced by a default.
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-demo"))
        .env("PORT", "not-a-port")
        .stderr(Stdio::piped())
        .output();
    let out = timeout(DEADLINE, out).await.expect("exits").expect("run");
    assert!(!out.status.success());

    // --listen takes precedence over --port.
    let demo = Demo::start(&["--listen", "127.0.0.1:0"], &[("PORT", "1")]).await;
    assert_eq!(demo.get("/health").await.0, 200);
}

#[tokio::test]
async fn readiness_switches() {
    let demo = Demo::start(&[], &[]).await;
    assert_eq!(demo.get("/health").await.0, 200);
    assert_eq!(demo.post("/fail-readiness").await.0, 200);
    assert_eq!(demo.get("/health").await, (503, "not ready\n".to_string()));
    // The service itself keeps answering.
    assert_eq!(demo.get("/").await.0, 200);
    assert_eq!(demo.post("/recover").await.0, 200);
    assert_eq!(demo.get("/health").await.0, 200);

    let demo = Demo::start(&["--fail-readiness"], &[]).await;
    assert_eq!(demo.get("/health").await.0, 503);
    assert_eq!(demo.post("/recover").await.0, 200);
    assert_eq!(demo.get("/health").await.0, 200);
}

#[tokio::test]
async fn hang_makes_health_never_answer_until_shutdown() {
    let mut demo = Demo::start(&[], &[]).await;
    assert_eq!(demo.post("/hang").await.0, 200);
    let addr = demo.addr;
    let mut hanging = tokio::spawn(async move { raw_request(addr, "GET", "/health", "").await });
    // A probe with a timeout gives up: nothing arrives within its timeout.
    assert!(
        timeout(Duration::from_millis(300), &mut hanging)
            .await
            .is_err(),
        "/health answered while hanging"
    );
    // Other endpoints still answer; recovering makes new health checks answer again.
    assert_eq!(demo.get("/").await.0, 200);
    assert_eq!(demo.post("/recover").await.0, 200);
    assert_eq!(demo.get("/health").await.0, 200);
    // Shutdown releases the hung request, so the process still exits promptly and cleanly.
    demo.signal(Signal::SIGTERM);
    let (status, _) = timeout(DEADLINE, hanging)
        .await
        .expect("hung request released")
        .expect("join");
    assert_eq!(status, 503);
    assert!(demo.wait_exit().await.success());
}

#[tokio::test]
async fn crash_endpoint_and_flag_exit_with_code_1() {
    let mut demo = Demo::start(&[], &[]).await;
    assert_eq!(demo.post("/crash").await, (200, "crashing\n".to_string()));
    assert_eq!(demo.wait_exit().await.code(), Some(1));

    let mut demo = Demo::start(&["--crash-after", "500ms"], &[]).await;
    assert_eq!(demo.get("/health").await.0, 200);
    assert_eq!(demo.wait_exit().await.code(), Some(1));
}

#[tokio::test]
async fn a_crash_due_during_a_slow_start_comes_before_listening() {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-demo"))
        .args([
            "--port",
            "0",
            "--start-delay",
            "30s",
            "--crash-after",
            "10ms",
        ])
        .env_remove("PORT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = timeout(DEADLINE, out)
        .await
        .expect("the demo crashes long before its start delay ends")
        .expect("run flotilla-demo");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("crashing as asked (--crash-after 10ms)"),
        "{log}"
    );
    assert!(!log.contains("listening on"), "{log}");
}

#[tokio::test]
async fn alloc_keeps_touched_memory() {
    let demo = Demo::start(&[], &[]).await;
    let before = rss_kib(demo.pid());
    let (status, body) = demo.post("/alloc?mb=32").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "allocated 32 MiB, holding 32 MiB\n");
    let after = rss_kib(demo.pid());
    assert!(
        after >= before + 30 * 1024,
        "rss {before} KiB -> {after} KiB"
    );
    assert_eq!(demo.post("/alloc").await.0, 400);
    assert_eq!(demo.post("/alloc?mb=99999999").await.0, 507);

    let demo = Demo::start(&["--alloc-mb", "24"], &[]).await;
    assert!(rss_kib(demo.pid()) >= 24 * 1024);
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let mut demo = Demo::start(&[], &[]).await;
    let addr = demo.addr;
    let slow = tokio::spawn(async move { request(addr, "GET", "/slow?ms=400").await });
    demo.wait_log("slow request: answering in 400 ms").await;
    demo.signal(Signal::SIGTERM);
    demo.wait_log("received SIGTERM, shutting down").await;
    let (status, body) = slow.await.expect("join");
    assert_eq!(
        (status, body.as_str()),
        (200, "slow response after 400 ms\n")
    );
    assert_eq!(demo.wait_exit().await.code(), Some(0));
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}

#[tokio::test]
async fn sigint_also_shuts_down() {
    let mut demo = Demo::start(&[], &[]).await;
    demo.signal(Signal::SIGINT);
    demo.wait_log("received SIGINT, shutting down").await;
    assert_eq!(demo.wait_exit().await.code(), Some(0));
}

#[tokio::test]
async fn ignore_sigterm_needs_sigkill() {
    let mut demo = Demo::start(&["--ignore-sigterm"], &[]).await;
    demo.signal(Signal::SIGTERM);
    demo.wait_log("received SIGTERM, ignoring it").await;
    assert_eq!(demo.get("/health").await.0, 200);
    demo.signal(Signal::SIGKILL);
    let status = demo.wait_exit().await;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
}

#[tokio::test]
async fn start_delay_listens_late_and_dies_on_sigterm_meanwhile() {
    let started = std::time::Instant::now();
    let demo = Demo::start(&["--start-delay", "600ms"], &[]).await;
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "listening after {:?}",
        started.elapsed()
    );
    assert_eq!(demo.get("/health").await.0, 200);

    // Still waiting: SIGTERM ends it at once (nothing to drain yet).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-demo"));
    let mut child = cmd
        .args(["--port", "0", "--start-delay", "1h"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn flotilla-demo");
    let stderr = child.stderr.take().expect("stderr piped");
    let mut lines = BufReader::new(stderr).lines();
    let line = timeout(DEADLINE, lines.next_line())
        .await
        .expect("a first line in time")
        .expect("read stderr")
        .expect("a line");
    assert!(line.contains("starting slowly: listening in 1h"), "{line}");
    kill(
        Pid::from_raw(child.id().expect("running") as i32),
        Signal::SIGTERM,
    )
    .expect("send signal");
    let status = timeout(DEADLINE, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
}
