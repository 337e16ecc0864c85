//! 10,000 idle keep-alive connections keep memory bounded. Alone in its test binary, so the
//! process's RSS is the gateway's; the clients run in a child process (this same test binary,
//! told so by an environment variable), so each process needs only ~10,000 descriptors.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

const CONNECTIONS: usize = 10_000;
/// Connections being opened at once (keeps the listen backlog from overflowing).
const PARALLEL: usize = 100;
/// The bound asserted; nginx needs ~1-2 KiB per idle connection, hyper keeps its read and
/// write buffers (8 KiB each at most) between requests.
const MAX_BYTES_PER_CONNECTION: u64 = 48 << 10;

/// One end of every connection per process, plus the test's own files.
const FDS_NEEDED: u64 = CONNECTIONS as u64 + 500;
/// Set in the child process: the gateway's address.
const CLIENT_ENV: &str = "FLOTILLA_IDLE_CLIENTS_TO";

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Raises RLIMIT_NOFILE to what the test needs; false (with the reason) if it cannot.
fn raise_fd_limit() -> Result<(), String> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    if soft >= FDS_NEEDED {
        return Ok(());
    }
    if hard >= FDS_NEEDED {
        return setrlimit(Resource::RLIMIT_NOFILE, FDS_NEEDED, hard).map_err(|e| e.to_string());
    }
    // Raising the hard limit needs CAP_SYS_RESOURCE.
    setrlimit(Resource::RLIMIT_NOFILE, FDS_NEEDED, FDS_NEEDED)
        .map_err(|e| format!("RLIMIT_NOFILE is {soft}, {FDS_NEEDED} needed: {e}"))
}

/// An idle keep-alive connection: one request answered (a 404: no route), then nothing.
async fn idle_connection(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")?
                    .parse()
                    .ok()
            })
            .expect("a content-length");
        if body.len() >= length {
            assert!(head.starts_with("HTTP/1.1 404"), "{head}");
            return stream;
        }
    }
}

/// Not a test of its own: the client side of [`ten_thousand_idle_connections_keep_memory_bounded`]
/// when run as its child process (does nothing otherwise). Opens the connections, says
/// `ready`, and holds them until its standard input closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_helper_process() {
    let Ok(addr) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    raise_fd_limit().unwrap();
    let mut streams = Vec::with_capacity(CONNECTIONS);
    let mut opening = JoinSet::new();
    for _ in 0..CONNECTIONS {
        if opening.len() >= PARALLEL
            && let Some(done) = opening.join_next().await
        {
            streams.push(done.unwrap());
        }
        opening.spawn(async move {
            timeout(DEADLINE, idle_connection(addr))
                .await
                .expect("connection answered in time")
        });
    }
    while let Some(done) = opening.join_next().await {
        streams.push(done.unwrap());
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready {}", streams.len());
    let _ = out.flush();
    // Standard input ends when the parent closes it, or dies.
    let closed = tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
    });
    let _ = timeout(Duration::from_secs(120), closed).await;
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_keep_memory_bounded() {
    if std::env::var(CLIENT_ENV).is_ok() {
        return;
    }
    if let Err(why) = raise_fd_limit() {
        note(&format!("skipped: ten_thousand_idle_connections: {why}"));
        return;
    }
    let mut config = config();
    config.limits.max_connections = CONNECTIONS + 100;
    let mut gw = Gw::start(config, None).await;
    let addr = gw.addr;

    // Warm up the allocator and the gateway's code paths before the baseline.
    let mut warm = Vec::new();
    for _ in 0..200 {
        warm.push(idle_connection(addr).await);
    }
    drop(warm);
    gw.wait_metric("flotilla_gateway_open_connections", |v| v == 0.0)
        .await;
    let before = rss_bytes();

    let began = Instant::now();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "idle_clients_helper_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CLIENT_ENV, addr.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // (libtest may print the test's name on the same line.)
            if let Some((_, n)) = line.split_once("ready ") {
                return n.trim().parse::<usize>().unwrap();
            }
        }
        panic!("client process ended before it was ready");
    })
    .await
    .expect("10,000 connections opened in time");
    assert_eq!(ready, CONNECTIONS);
    let opened = began.elapsed();
    gw.wait_metric("flotilla_gateway_open_connections", |v| {
        v == CONNECTIONS as f64
    })
    .await;
    let after = rss_bytes();
    let per_connection = after.saturating_sub(before) / CONNECTIONS as u64;
    note(&format!(
        "10000 idle connections opened in {opened:.1?}: gateway RSS {} MiB -> {} MiB, {:.1} KiB \
         per connection",
        before >> 20,
        after >> 20,
        per_connection as f64 / 1024.0
    ));
    assert!(
        per_connection <= MAX_BYTES_PER_CONNECTION,
        "{per_connection} bytes per idle connection"
    );

    // Still serving, and every connection is released when its client goes.
    assert_eq!(h1_get(addr, "x", "/").await.0, http::StatusCode::NOT_FOUND);
    drop(child.stdin.take());
    let status = timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("client process exits")
        .unwrap();
    assert!(status.success(), "{status}");
    gw.wait_metric("flotilla_gateway_open_connections", |v| v == 0.0)
        .await;
    gw.stop().await;
}
