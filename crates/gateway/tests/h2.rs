//! HTTP/2 downstream: prior knowledge on the plain port, ALPN on TLS, and graceful shutdown
//! with an HTTP/2 request in flight.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

mod common;

use std::time::Duration;

use common::*;
use flotilla_gateway::{CertificateFiles, TlsConfig};
use http::StatusCode;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

#[tokio::test]
async fn prior_knowledge_h2_and_http1_share_the_plain_port() {
    let up = Upstream::start("web", None).await;
    let mut gw = Gw::start(config(), Some(up)).await;

    let mut h2 = h2_handshake(TcpStream::connect(gw.addr).await.unwrap()).await;
    // Concurrent streams on one connection.
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut sender = h2.clone();
        streams.spawn(async move { send(&mut sender, "h2.test", &format!("/s/{i}")).await });
    }
    let mut bodies = Vec::new();
    while let Some(done) = streams.join_next().await {
        let (status, body) = done.unwrap();
        assert_eq!(status, StatusCode::OK);
        bodies.push(body);
    }
    bodies.sort();
    assert_eq!(bodies.len(), 20);
    assert!(bodies.contains(&"web /s/7".to_string()), "{bodies:?}");
    assert_eq!(send(&mut h2, "h2.test", "/again").await.1, "web /again");

    // HTTP/1.1 on the same port.
    assert_eq!(
        h1_get(gw.addr, "h1.test", "/one").await,
        (StatusCode::OK, "web /one".to_string())
    );
    // The HTTP/1.1 connection is gone, the HTTP/2 one stays.
    gw.wait_metric("flotilla_gateway_open_connections", |v| v == 1.0)
        .await;
    assert_eq!(send(&mut h2, "h2.test", "/last").await.0, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_h2_requests_on_both_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(&["shut.test"]);
    let (cert_path, key_path) = write_cert(dir.path(), "shut", &cert);
    let mut config = config();
    config.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    config.tls = Some(TlsConfig {
        certificates: vec![CertificateFiles {
            hosts: vec!["shut.test".into()],
            cert: cert_path,
            key: key_path,
            default: false,
        }],
        reload_interval: TlsConfig::DEFAULT_RELOAD_INTERVAL,
    });
    config.shutdown_grace = Duration::from_secs(8);
    let (started_tx, mut started) = mpsc::channel(8);
    let up = Upstream::start("web", Some(started_tx)).await;
    let mut gw = Gw::start(config, Some(up)).await;
    let (addr, tls_addr) = (gw.addr, gw.tls_addr.unwrap());

    let mut plain = h2_handshake(TcpStream::connect(addr).await.unwrap()).await;
    let client = tls_client(&[&cert.der], &[b"h2"]);
    let mut tls = h2_handshake(tls_connect(&client, tls_addr, "shut.test").await.unwrap()).await;
    assert_eq!(send(&mut plain, "shut.test", "/").await.0, StatusCode::OK);
    assert_eq!(send(&mut tls, "shut.test", "/").await.0, StatusCode::OK);
    // Idle connections must not hold the shutdown up: an HTTP/1.1 keep-alive one, and an
    // HTTP/2 one with no stream open.
    let mut idle_h1 = h1_handshake(TcpStream::connect(addr).await.unwrap()).await;
    assert_eq!(send(&mut idle_h1, "shut.test", "/").await.0, StatusCode::OK);
    let mut idle_h2 = h2_handshake(TcpStream::connect(addr).await.unwrap()).await;
    assert_eq!(send(&mut idle_h2, "shut.test", "/").await.0, StatusCode::OK);

    let slow_plain = tokio::spawn({
        let mut plain = plain.clone();
        async move { try_send(&mut plain, "shut.test", "/slow?ms=400").await }
    });
    let slow_tls = tokio::spawn({
        let mut tls = tls.clone();
        async move { try_send(&mut tls, "shut.test", "/slow?ms=400").await }
    });
    for _ in 0..2 {
        let path = timeout(DEADLINE, started.recv()).await.unwrap().unwrap();
        assert_eq!(path, "/slow?ms=400");
    }

    let began = Instant::now();
    gw.shutdown.cancel();
    let finished = |r: Result<Result<(StatusCode, String), String>, _>| r.unwrap().unwrap();
    assert_eq!(
        finished(timeout(DEADLINE, slow_plain).await.unwrap()),
        (StatusCode::OK, "web /slow?ms=400".to_string())
    );
    assert_eq!(
        finished(timeout(DEADLINE, slow_tls).await.unwrap()),
        (StatusCode::OK, "web /slow?ms=400".to_string())
    );
    gw.stop().await;
    // Done when the in-flight requests were, not at the end of the grace period.
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "{:?}",
        began.elapsed()
    );
    // Nothing new is accepted, on either listener, nor on the old connections.
    assert!(TcpStream::connect(addr).await.is_err());
    assert!(TcpStream::connect(tls_addr).await.is_err());
    assert!(try_send(&mut plain, "shut.test", "/").await.is_err());
    assert!(try_send(&mut tls, "shut.test", "/").await.is_err());
    assert!(try_send(&mut idle_h1, "shut.test", "/").await.is_err());
}
