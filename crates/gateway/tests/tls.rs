//! TLS termination: certificates chosen by SNI (exact, wildcard, default), HTTP/1.1 and HTTP/2
//! by ALPN, and certificates swapped under traffic when their files change.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use flotilla_gateway::{CertificateFiles, TlsConfig};
use http::StatusCode;
use tokio::time::Instant;

fn tls_config(certificates: Vec<CertificateFiles>) -> flotilla_gateway::GatewayConfig {
    let mut config = config();
    config.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    config.tls = Some(TlsConfig {
        certificates,
        reload_interval: Duration::from_millis(50),
    });
    config
}

fn entry(
    hosts: &[&str],
    files: (std::path::PathBuf, std::path::PathBuf),
    default: bool,
) -> CertificateFiles {
    CertificateFiles {
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        cert: files.0,
        key: files.1,
        default,
    }
}

#[tokio::test]
async fn sni_chooses_the_certificate_and_alpn_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_cert(&["a.test"]);
    let b = make_cert(&["*.b.test"]);
    let fallback = make_cert(&["fallback.test"]);
    let config = tls_config(vec![
        entry(&["a.test"], write_cert(dir.path(), "a", &a), false),
        entry(&["*.b.test"], write_cert(dir.path(), "b", &b), false),
        entry(&[], write_cert(dir.path(), "d", &fallback), true),
    ]);
    let up = Upstream::start("web", None).await;
    let mut gw = Gw::start(config, Some(up)).await;
    let tls_addr = gw.tls_addr.unwrap();

    // Verified for real, against only the right root: HTTP/1.1 and HTTP/2 by ALPN.
    let verified = tls_client(&[&a.der, &b.der], &[b"h2", b"http/1.1"]);
    let stream = tls_connect(&verified, tls_addr, "a.test").await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut h2 = h2_handshake(stream).await;
    for _ in 0..3 {
        let (status, body) = send(&mut h2, "a.test", "/x").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "web /x"));
    }
    let h1_only = tls_client(&[&b.der], &[b"http/1.1"]);
    let stream = tls_connect(&h1_only, tls_addr, "deep.b.test")
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut h1 = h1_handshake(stream).await;
    let (status, body) = send(&mut h1, "deep.b.test", "/y").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "web /y"));
    // No ALPN at all: HTTP/1.1.
    let no_alpn = tls_client(&[&a.der], &[]);
    let mut h1 = h1_handshake(tls_connect(&no_alpn, tls_addr, "a.test").await.unwrap()).await;
    assert_eq!(send(&mut h1, "a.test", "/z").await.0, StatusCode::OK);

    // Which certificate each name gets.
    let inspect = inspecting_client(&[b"http/1.1"]);
    for (name, want) in [
        ("a.test", &a.der),
        ("A.TEST", &a.der),
        ("x.b.test", &b.der),
        ("b.test", &fallback.der),
        ("x.y.b.test", &fallback.der),
        ("unknown.test", &fallback.der),
        // An IP address is sent without SNI.
        ("127.0.0.1", &fallback.der),
    ] {
        let stream = tls_connect(&inspect, tls_addr, name).await.unwrap();
        assert_eq!(&peer_cert(&stream), want, "certificate for {name}");
    }

    // The upstream is told the client came over HTTPS; the plain listener still works.
    let mut h1 = h1_handshake(tls_connect(&verified, tls_addr, "a.test").await.unwrap()).await;
    let response = h1
        .send_request(
            http::Request::get("/")
                .header("host", "a.test")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["x-seen-proto"], "https");
    assert_eq!(h1_get(gw.addr, "a.test", "/plain").await.0, StatusCode::OK);

    // A client that does not trust the certificate fails its handshake; the gateway counts it.
    let stranger = tls_client(&[&fallback.der], &[]);
    assert!(tls_connect(&stranger, tls_addr, "a.test").await.is_err());
    gw.wait_metric("flotilla_gateway_tls_handshake_errors_total", |v| v >= 1.0)
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn certificate_is_swapped_under_traffic_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let old = make_cert(&["swap.test"]);
    let new = make_cert(&["swap.test"]);
    let files = write_cert(dir.path(), "swap", &old);
    let config = tls_config(vec![entry(&["swap.test"], files, false)]);
    let up = Upstream::start("web", None).await;
    let mut gw = Gw::start(config, Some(up)).await;
    let tls_addr = gw.tls_addr.unwrap();
    let client = tls_client(&[&old.der, &new.der], &[b"h2", b"http/1.1"]);

    // A connection made before the swap keeps working after it.
    let mut before = h2_handshake(tls_connect(&client, tls_addr, "swap.test").await.unwrap()).await;
    assert_eq!(send(&mut before, "swap.test", "/").await.0, StatusCode::OK);

    // Traffic: every iteration is a new handshake and a request; none may fail.
    let swapped = Arc::new(AtomicBool::new(false));
    let (running_tx, mut running) = tokio::sync::mpsc::channel::<()>(1);
    let traffic = tokio::spawn({
        let client = client.clone();
        let (old_der, new_der) = (old.der.clone(), new.der.clone());
        let swapped = swapped.clone();
        async move {
            let end = Instant::now() + Duration::from_secs(20);
            let (mut requests, mut saw_old, mut saw_new) = (0u32, 0u32, 0u32);
            // Bounded: stops a few requests after the new certificate is seen.
            while saw_new < 20 {
                assert!(Instant::now() < end, "new certificate never served");
                let stream = tls_connect(&client, tls_addr, "swap.test")
                    .await
                    .unwrap_or_else(|e| panic!("handshake {requests} failed: {e}"));
                let cert = peer_cert(&stream);
                if cert == new_der {
                    assert!(
                        swapped.load(Ordering::SeqCst),
                        "new certificate before the swap"
                    );
                    saw_new += 1;
                } else {
                    assert_eq!(cert, old_der);
                    assert_eq!(saw_new, 0, "old certificate after the new one");
                    saw_old += 1;
                }
                let mut h1 = h1_handshake(stream).await;
                let (status, body) = send(&mut h1, "swap.test", "/t").await;
                assert_eq!((status, body.as_str()), (StatusCode::OK, "web /t"));
                requests += 1;
                if requests == 5 {
                    let _ = running_tx.try_send(());
                }
            }
            (saw_old, saw_new)
        }
    });

    // Let some traffic run on the old certificate, then rotate the files.
    tokio::time::timeout(DEADLINE, running.recv())
        .await
        .expect("traffic runs");
    swapped.store(true, Ordering::SeqCst);
    write_cert(dir.path(), "swap", &new);
    let (saw_old, saw_new) = tokio::time::timeout(Duration::from_secs(30), traffic)
        .await
        .expect("traffic loop ends")
        .unwrap();
    assert!(saw_old >= 1 && saw_new == 20, "{saw_old} {saw_new}");

    // The pre-swap connection was not disturbed.
    assert_eq!(send(&mut before, "swap.test", "/").await.0, StatusCode::OK);
    gw.stop().await;
}
