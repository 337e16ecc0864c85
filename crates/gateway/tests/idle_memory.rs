//! 10,000 idle keep-alive connections keep memory bounded. Alone in its test binary, so the
//! process's RSS is this test's.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

const CONNECTIONS: usize = 10_000;
/// Connections being opened at once (keeps the listen backlog from overflowing).
const PARALLEL: usize = 100;
/// The bound asserted; nginx needs ~1-2 KiB per idle connection, hyper keeps its read and
/// write buffers (8 KiB each at most) between requests.
const MAX_BYTES_PER_CONNECTION: u64 = 48 << 10;

/// Both ends of every connection live in this process, plus the test's own files.
const FDS_NEEDED: u64 = 2 * CONNECTIONS as u64 + 500;

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
    let hard = hard.max(FDS_NEEDED);
    setrlimit(Resource::RLIMIT_NOFILE, FDS_NEEDED, hard)
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
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ")?.parse().ok())
            .expect("a content-length");
        if body.len() >= length {
            assert!(head.starts_with("HTTP/1.1 404"), "{head}");
            return stream;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_keep_memory_bounded() {
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
    let mut streams = Vec::with_capacity(CONNECTIONS);
    let mut opening = JoinSet::new();
    let open_all = async {
        for _ in 0..CONNECTIONS {
            if opening.len() >= PARALLEL
                && let Some(done) = opening.join_next().await
            {
                streams.push(done.unwrap());
            }
            opening.spawn(idle_connection(addr));
        }
        while let Some(done) = opening.join_next().await {
            streams.push(done.unwrap());
        }
    };
    timeout(Duration::from_secs(60), open_all)
        .await
        .expect("10,000 connections opened in time");
    let opened = began.elapsed();
    gw.wait_metric("flotilla_gateway_open_connections", |v| {
        v == CONNECTIONS as f64
    })
    .await;
    let after = rss_bytes();
    let per_connection = after.saturating_sub(before) / CONNECTIONS as u64;
    note(&format!(
        "10000 idle connections opened in {opened:.1?}: RSS {} MiB -> {} MiB, {:.1} KiB per \
         connection (both ends, in this process)",
        before >> 20,
        after >> 20,
        per_connection as f64 / 1024.0
    ));
    assert!(
        per_connection <= MAX_BYTES_PER_CONNECTION,
        "{per_connection} bytes per idle connection"
    );

    // Still serving, and every connection is released when its client goes.
    assert_eq!(
        h1_get(addr, "x", "/").await.0,
        http::StatusCode::NOT_FOUND
    );
    drop(streams);
    gw.wait_metric("flotilla_gateway_open_connections", |v| v == 0.0)
        .await;
    gw.stop().await;
}
