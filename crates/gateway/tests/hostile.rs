//! Hostile and broken clients: slowloris, idle connections, oversized and malformed requests,
//! too many connections. The gateway must shed them and keep serving everyone else.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

const HEADER_TIMEOUT: Duration = Duration::from_millis(500);

/// Writes `chunks` one by one, `gap` apart, until the gateway closes the connection; returns
/// when it closed (after the first chunk) and what it answered.
async fn trickle(stream: &mut TcpStream, chunks: &[&[u8]], gap: Duration) -> (Duration, String) {
    let began = Instant::now();
    let mut pace = tokio::time::interval(gap);
    for chunk in chunks.iter().cycle().take(200) {
        pace.tick().await;
        if stream.write_all(chunk).await.is_err() {
            break;
        }
        // The gateway closed: a read sees the end.
        let mut probe = [0u8; 1];
        match timeout(Duration::from_millis(1), stream.peek(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            _ => {}
        }
    }
    let answer = read_to_close(stream).await;
    (began.elapsed(), answer)
}

#[tokio::test]
async fn slowloris_is_cut_off_while_normal_clients_are_served() {
    let mut config = config();
    config.limits.header_read_timeout = HEADER_TIMEOUT;
    let up = Upstream::start("web", None).await;
    let gw = Gw::start(config, Some(up)).await;
    let addr = gw.addr;

    // Normal clients keep being served during the attack.
    let normal = tokio::spawn(async move {
        let mut served = 0;
        let end = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < end {
            assert_eq!(h1_get(addr, "ok.test", "/").await.0, StatusCode::OK);
            served += 1;
        }
        served
    });

    // A client that connects and says nothing.
    let silent = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let began = Instant::now();
        let answer = read_to_close(&mut stream).await;
        (began.elapsed(), answer)
    });
    // A client that trickles its first request head, one header line at a time.
    let first = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        trickle(&mut stream, &[b"X-Slow: 1\r\n"], Duration::from_millis(50)).await
    });
    // A client that makes one honest request, then trickles the next head on the same
    // keep-alive connection.
    let later = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /a HTTP/1.1\r\nHost: k\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 512];
        let n = tokio::io::AsyncReadExt::read(&mut stream, &mut head)
            .await
            .unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 200"));
        trickle(&mut stream, &[b"G", b"E", b"T "], Duration::from_millis(50)).await
    });
    // A prior-knowledge HTTP/2 client that sends the preface and never a request.
    let h2_silent = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let began = Instant::now();
        read_to_close(&mut stream).await;
        began.elapsed()
    });

    let bounds =
        |d: Duration| d >= HEADER_TIMEOUT - Duration::from_millis(60) && d < HEADER_TIMEOUT * 6;
    let (took, answer) = silent.await.unwrap();
    assert!(bounds(took), "silent client closed after {took:?}");
    assert_eq!(answer, "");
    for (which, task) in [("first head", first), ("keep-alive head", later)] {
        let (took, answer) = task.await.unwrap();
        assert!(bounds(took), "{which}: closed after {took:?}");
        assert!(!answer.contains("200"), "{which}: {answer:?}");
    }
    let took = h2_silent.await.unwrap();
    assert!(bounds(took), "h2 preface only: closed after {took:?}");

    let served = normal.await.unwrap();
    assert!(served >= 5, "only {served} normal requests");
    assert!(gw.metric(r#"flotilla_gateway_closed_connections_total{reason="header"}"#) >= 4.0);
}

#[tokio::test]
async fn idle_connections_are_closed_but_long_requests_are_not() {
    let mut config = config();
    config.limits.idle_timeout = Duration::from_millis(300);
    let up = Upstream::start("web", None).await;
    let gw = Gw::start(config, Some(up)).await;

    // HTTP/1.1 keep-alive: closed after being idle.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: i\r\n\r\n")
        .await
        .unwrap();
    let began = Instant::now();
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // HTTP/2: also closed (GOAWAY) once idle.
    let mut h2 = h2_handshake(TcpStream::connect(gw.addr).await.unwrap()).await;
    assert_eq!(send(&mut h2, "i", "/").await.0, StatusCode::OK);
    let end = Instant::now() + DEADLINE;
    while !h2.is_closed() {
        assert!(Instant::now() < end, "idle h2 connection still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A request that takes longer than the idle timeout is not cut.
    let mut h1 = h1_handshake(TcpStream::connect(gw.addr).await.unwrap()).await;
    assert_eq!(
        send(&mut h1, "i", "/slow?ms=900").await,
        (StatusCode::OK, "web /slow?ms=900".to_string())
    );
    assert!(gw.metric(r#"flotilla_gateway_closed_connections_total{reason="idle"}"#) >= 2.0);
}

#[tokio::test]
async fn oversized_and_malformed_requests_are_refused_and_nothing_breaks() {
    let mut config = config();
    config.limits.max_header_bytes = 16 << 10;
    config.limits.max_headers = 50;
    let up = Upstream::start("web", None).await;
    let mut gw = Gw::start(config, Some(up)).await;
    let addr = gw.addr;

    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20 << 10)
    );
    let answer = raw_exchange(addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let many: String = (0..60).map(|i| format!("X-H{i}: v\r\n")).collect();
    let answer = raw_exchange(
        addr,
        format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // Just under the limits is fine.
    let fits = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(12 << 10)
    );
    let answer = raw_exchange(addr, fits.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // HTTP/2: a header list over the limit is not served.
    let mut h2 = h2_handshake(TcpStream::connect(addr).await.unwrap()).await;
    let req = http::Request::get("http://a/")
        .version(http::Version::HTTP_2)
        .header("x-big", "b".repeat(20 << 10))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    match timeout(DEADLINE, h2.send_request(req)).await.unwrap() {
        Ok(response) => assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        ),
        Err(e) => assert!(!e.is_timeout(), "{e}"),
    }

    // Malformed requests: 400 or a plain close, never a hang or a crash.
    let mut inputs: Vec<Vec<u8>> = [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x08\x00\x00\x00\x00\x00\xff\xff\xff\xff",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    ]
    .iter()
    .map(|b| b.to_vec())
    .collect();
    // And deterministic pseudo-random noise, with and without a plausible start.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..60 {
        let len = 1 + (seed % 300) as usize;
        let mut noise: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect();
        if i % 2 == 0 {
            noise.splice(0..0, b"GET / HTTP/1.1\r\n".iter().copied());
        }
        inputs.push(noise);
    }
    for input in &inputs {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(input).await;
        let _ = stream.shutdown().await;
        let answer = read_to_close(&mut stream).await;
        // (A broken chunked body is found while it streams upstream: the proxy's answer.)
        assert!(
            answer.is_empty()
                || answer.starts_with("HTTP/1.1 ")
                // HTTP/2 frames: SETTINGS, GOAWAY.
                || answer.as_bytes().get(3) == Some(&0x07)
                || answer.as_bytes().get(3) == Some(&0x04),
            "{input:?} → {answer:?}"
        );
        if input.starts_with(b"GARBAGE") {
            assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        }
    }
    assert_eq!(h1_get(addr, "a", "/still").await.0, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn connections_past_the_limit_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(&["limit.test"]);
    let (cert_path, key_path) = write_cert(dir.path(), "limit", &cert);
    let mut config = config();
    config.limits.max_connections = 3;
    config.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    config.tls = Some(flotilla_gateway::TlsConfig {
        certificates: vec![flotilla_gateway::CertificateFiles {
            hosts: vec!["limit.test".into()],
            cert: cert_path,
            key: key_path,
            default: false,
        }],
        reload_interval: flotilla_gateway::TlsConfig::DEFAULT_RELOAD_INTERVAL,
    });
    let up = Upstream::start("web", None).await;
    let mut gw = Gw::start(config, Some(up)).await;
    let (addr, tls_addr) = (gw.addr, gw.tls_addr.unwrap());

    // Three clients hold their connections (each made a request, so each was accepted).
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut sender = h1_handshake(TcpStream::connect(addr).await.unwrap()).await;
        assert_eq!(send(&mut sender, "l", "/").await.0, StatusCode::OK);
        held.push(sender);
    }
    assert_eq!(gw.metric("flotilla_gateway_open_connections"), 3.0);

    // The fourth is told, and closed.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let answer = read_to_close(&mut stream).await;
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{answer}"
    );
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(
        answer.ends_with("too many connections; try again\n"),
        "{answer}"
    );
    // A client that sends its request first gets the same answer.
    let answer = raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: l\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // TLS clients are closed before any handshake work.
    let client = tls_client(&[&cert.der], &[]);
    assert!(tls_connect(&client, tls_addr, "limit.test").await.is_err());
    assert!(gw.metric("flotilla_gateway_refused_connections_total") >= 3.0);

    // The held connections still work; once one goes, a new client gets in.
    for sender in &mut held {
        assert_eq!(send(sender, "l", "/").await.0, StatusCode::OK);
    }
    held.pop();
    gw.wait_metric("flotilla_gateway_open_connections", |v| v == 2.0)
        .await;
    let mut sender =
        h1_handshake(tls_connect(&client, tls_addr, "limit.test").await.unwrap()).await;
    assert_eq!(send(&mut sender, "limit.test", "/").await.0, StatusCode::OK);
    gw.stop().await;
}
