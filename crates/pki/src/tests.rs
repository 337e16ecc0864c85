use super::*;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn node(name: &str) -> Identity {
    Identity {
        role: Role::Node,
        name: name.to_string(),
    }
}

#[test]
fn the_ca_is_made_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let first = Authority::load_or_create(dir.path()).unwrap();
    let again = Authority::load_or_create(dir.path()).unwrap();
    assert_eq!(first.pin(), again.pin());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the CA key is readable by its owner only");
    let other = Authority::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
    assert_ne!(first.pin(), other.pin());
}

#[test]
fn a_signed_certificate_names_whom_the_server_says_not_the_requester() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::load_or_create(dir.path()).unwrap();
    // The request asks to be "admin"; the server decides it is node-1.
    let (_key, csr) = new_key_and_csr("admin").unwrap();
    let (pem, expires) = ca
        .sign(&csr, &node("node-1"), Duration::from_secs(3600))
        .unwrap();
    let der = parse_cert("cert", &pem).unwrap();
    assert_eq!(identity_of(&der), Some(node("node-1")));
    let left = expires.duration_since(SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
    let parsed = expiry_of(&pem).unwrap();
    assert_eq!(unix(parsed), unix(expires));
}

#[test]
fn garbage_requests_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::load_or_create(dir.path()).unwrap();
    let err = ca
        .sign("not a csr", &node("n"), Duration::from_secs(60))
        .unwrap_err();
    assert!(
        err.to_string().contains("certificate signing request"),
        "{err}"
    );
    assert!(identity_of(b"\x30\x03\x02\x01\x00").is_none());
}

#[test]
fn pem_encoding_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::load_or_create(dir.path()).unwrap();
    let der = parse_cert("ca", ca.cert_pem()).unwrap();
    let again = connect::pem_for_tests(&der);
    assert_eq!(parse_cert("again", &again).unwrap(), der);
    for n in 0..5 {
        let bytes: Vec<u8> = (0..(60 + n)).map(|i| i as u8).collect();
        let text = connect::pem_for_tests(&bytes);
        assert_eq!(
            CertificateDer::from_pem_slice(text.as_bytes())
                .unwrap()
                .as_ref(),
            &bytes[..]
        );
    }
}

/// Serves one TLS connection: answers with who the client certificate names.
async fn serve_once(config: Arc<rustls::ServerConfig>) -> (u16, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let Ok(mut tls) = acceptor.accept(tcp).await else {
            return "handshake refused".to_string();
        };
        let who = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| identity_of(c))
            .map_or("anonymous".to_string(), |i| i.name);
        let _ = tls.write_all(who.as_bytes()).await;
        let _ = tls.shutdown().await;
        who
    });
    (port, task)
}

async fn talk(port: u16, config: Arc<rustls::ClientConfig>) -> Result<String, std::io::Error> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

use rustls_pki_types::ServerName;

#[tokio::test]
async fn mutual_tls_names_the_member_and_refuses_another_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::load_or_create(dir.path()).unwrap();
    let names = vec!["127.0.0.1".to_string()];

    // A node with a certificate of this CA is known by it.
    let (key, csr) = new_key_and_csr("node-1").unwrap();
    let (cert, _) = ca
        .sign(&csr, &node("node-1"), Duration::from_secs(600))
        .unwrap();
    let id = ClientIdentity::new(&cert, &key).unwrap();
    let (port, server) = serve_once(ca.server_config(&names).unwrap()).await;
    let said = talk(port, client_config(ca.cert_pem(), Some(id)).unwrap())
        .await
        .unwrap();
    assert_eq!(said, "node-1");
    assert_eq!(server.await.unwrap(), "node-1");

    // No certificate: allowed (it must then bring a token), anonymous.
    let (port, server) = serve_once(ca.server_config(&names).unwrap()).await;
    let said = talk(port, client_config(ca.cert_pem(), None).unwrap())
        .await
        .unwrap();
    assert_eq!(said, "anonymous");
    server.await.unwrap();

    // A certificate of another cluster's CA: the server refuses the handshake.
    let other = Authority::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
    let (key, csr) = new_key_and_csr("node-1").unwrap();
    let (cert, _) = other
        .sign(&csr, &node("node-1"), Duration::from_secs(600))
        .unwrap();
    let id = ClientIdentity::new(&cert, &key).unwrap();
    let (port, server) = serve_once(ca.server_config(&names).unwrap()).await;
    let _ = talk(port, client_config(ca.cert_pem(), Some(id)).unwrap()).await;
    assert_eq!(server.await.unwrap(), "handshake refused");

    // A client that trusts another CA refuses this server.
    let (port, server) = serve_once(ca.server_config(&names).unwrap()).await;
    assert!(
        talk(port, client_config(other.cert_pem(), None).unwrap())
            .await
            .is_err()
    );
    let _ = server.await;
}

#[tokio::test]
async fn the_pin_finds_this_clusters_ca_and_only_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::load_or_create(dir.path()).unwrap();
    let names = vec!["127.0.0.1".to_string()];
    let (port, server) = serve_once(ca.server_config(&names).unwrap()).await;
    let got = fetch_ca_pinned(&format!("https://127.0.0.1:{port}"), &ca.pin())
        .await
        .unwrap();
    assert_eq!(pin_of(&parse_cert("got", &got).unwrap()), ca.pin());
    let _ = server.await;

    let other = Authority::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
    let (port, server) = serve_once(ca.server_config(&names).unwrap()).await;
    let err = fetch_ca_pinned(&format!("https://127.0.0.1:{port}"), &other.pin())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pin"), "{err}");
    let _ = server.await;
}
