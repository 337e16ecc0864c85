//! Harness of the connection-layer tests: a real gateway on loopback sockets over a real
//! embedded store in a tempdir, real upstream HTTP servers, certificates made with rcgen and
//! clients on hyper + tokio-rustls.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{Gateway, GatewayConfig, GatewayError};
use flotilla_spec::object::{Instance, InstanceSpec, InstanceStatus, ObjectMeta, Phase, Service};
use flotilla_spec::service::{RouteSpec, ServiceSpec};
use flotilla_store::typed;
use flotilla_store::{EmbeddedStore, Store, StoreOptions};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

pub const DEADLINE: Duration = Duration::from_secs(10);

// ---- upstream ------------------------------------------------------------------------------

/// A real HTTP/1.1 server on 127.0.0.1 answering `NAME PATH`. `/slow?ms=N` answers after N ms
/// and first reports its arrival on `started`.
pub struct Upstream {
    pub port: u16,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &str, started: Option<mpsc::Sender<String>>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let name = name.to_string();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                let started = started.clone();
                let service = service_fn(move |req| answer(name.clone(), started.clone(), req));
                connections.spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { port, task }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    name: String,
    started: Option<mpsc::Sender<String>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|pq| pq.to_string())
        .unwrap_or_default();
    let proto = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    if let Some(ms) = path.strip_prefix("/slow?ms=") {
        if let Some(started) = &started {
            let _ = started.send(path.clone()).await;
        }
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let _ = req.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from(format!("{name} {path}"))));
    response
        .headers_mut()
        .insert("x-seen-proto", proto.parse().unwrap());
    Ok(response)
}

// ---- gateway -------------------------------------------------------------------------------

pub fn config() -> GatewayConfig {
    GatewayConfig::new("127.0.0.1:0".parse().unwrap())
}

pub struct Gw {
    _dir: tempfile::TempDir,
    pub store: Arc<dyn Store>,
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub registry: Registry,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<Result<(), GatewayError>>>,
    /// Kept alive as long as the gateway.
    pub upstream: Option<Upstream>,
}

impl Gw {
    /// A gateway whose route `/` (any host) goes to `upstream`, in force from the first
    /// request (the store is filled before the gateway loads it).
    pub async fn start(config: GatewayConfig, upstream: Option<Upstream>) -> Gw {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            durable: false,
            ..StoreOptions::default()
        };
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open_with(&dir.path().join("store.redb"), options).unwrap());
        if let Some(up) = &upstream {
            add_route(store.as_ref(), up.port).await;
        }
        let mut registry = Registry::default();
        let gateway = Gateway::bind(config, store.clone(), &mut registry)
            .await
            .unwrap();
        let addr = gateway.local_addr();
        let tls_addr = gateway.tls_local_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gateway.run(shutdown.clone()));
        Gw {
            _dir: dir,
            store,
            addr,
            tls_addr,
            registry,
            shutdown,
            task: Some(task),
            upstream,
        }
    }

    pub fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    /// The value of one sample line (`name{labels}` exactly), 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Polls `metric` until `pred` holds (bounded by [`DEADLINE`]).
    pub async fn wait_metric(&self, sample: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            let v = self.metric(sample);
            if pred(v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "{sample} stayed at {v}\n{}",
                self.metrics()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            timeout(DEADLINE, task)
                .await
                .expect("gateway stops in time")
                .unwrap()
                .unwrap();
        }
    }
}

async fn add_route(store: &dyn Store, port: u16) {
    let spec = serde_json::json!({
        "command": "flotilla-demo",
        "ports": ["http"],
        "routes": [{ "path": "/" }],
    });
    let service = Service {
        metadata: ObjectMeta::named("web"),
        spec: serde_json::from_value(spec.clone()).unwrap(),
        status: Default::default(),
    };
    typed::create(store, service).await.unwrap();
    let mut instance: Instance = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "web-1" },
        "spec": { "service": "web", "node": "local", "specHash": "h1", "template": spec },
    }))
    .unwrap();
    instance.metadata = ObjectMeta::named("web-1");
    instance.status.phase = Phase::Running;
    instance.status.ready = true;
    instance.status.host = Some("127.0.0.1".to_string());
    instance.status.ports = BTreeMap::from([("http".to_string(), port)]);
    typed::create(store, instance).await.unwrap();
}

// ---- clients -------------------------------------------------------------------------------

/// One request on a fresh HTTP/1.1 connection: status, body.
pub async fn h1_get(addr: SocketAddr, host: &str, path: &str) -> (StatusCode, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut sender = h1_handshake(stream).await;
    send(&mut sender, host, path).await
}

pub async fn h1_handshake<S>(io: S) -> hyper::client::conn::http1::SendRequest<Full<Bytes>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

pub async fn h2_handshake<S>(io: S) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

pub trait Sender {
    fn send_request(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> impl Future<Output = hyper::Result<Response<Incoming>>> + Send;
    fn version(&self) -> Version;
}

impl Sender for hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    fn send_request(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> impl Future<Output = hyper::Result<Response<Incoming>>> + Send {
        hyper::client::conn::http1::SendRequest::send_request(self, req)
    }
    fn version(&self) -> Version {
        Version::HTTP_11
    }
}

impl Sender for hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    fn send_request(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> impl Future<Output = hyper::Result<Response<Incoming>>> + Send {
        hyper::client::conn::http2::SendRequest::send_request(self, req)
    }
    fn version(&self) -> Version {
        Version::HTTP_2
    }
}

/// GET `path` with `Host: host` (`:authority` on HTTP/2); panics on a transport error.
pub async fn send(sender: &mut impl Sender, host: &str, path: &str) -> (StatusCode, String) {
    try_send(sender, host, path)
        .await
        .unwrap_or_else(|e| panic!("request {path} failed: {e}"))
}

pub async fn try_send(
    sender: &mut impl Sender,
    host: &str,
    path: &str,
) -> Result<(StatusCode, String), String> {
    let version = sender.version();
    let req = if version == Version::HTTP_2 {
        Request::get(format!("https://{host}{path}"))
    } else {
        Request::get(path).header("host", host)
    }
    .version(version)
    .body(Full::new(Bytes::new()))
    .unwrap();
    let response = timeout(DEADLINE, sender.send_request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    assert_eq!(response.version(), version);
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Writes `bytes` and reads until the gateway closes (or [`DEADLINE`]).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_to_close(&mut stream).await
}

/// Everything the peer sends until it closes; a reset counts as a close.
pub async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match timeout(DEADLINE, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "connection not closed in time; got {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---- certificates and TLS clients ----------------------------------------------------------

/// A self-signed certificate and its key, as PEM.
pub struct TestCert {
    pub der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn make_cert(names: &[&str]) -> TestCert {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).unwrap();
    TestCert {
        der: ck.cert.der().clone(),
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
    }
}

/// Writes the cert and key as `DIR/NAME.pem` and `DIR/NAME.key`, each by an atomic rename (as
/// certificate tools do), the certificate first.
pub fn write_cert(dir: &Path, name: &str, cert: &TestCert) -> (PathBuf, PathBuf) {
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    replace_file(&cert_path, cert.cert_pem.as_bytes());
    replace_file(&key_path, cert.key_pem.as_bytes());
    (cert_path, key_path)
}

pub fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client trusting exactly `roots`.
pub fn tls_client(roots: &[&CertificateDer<'static>], alpn: &[&[u8]]) -> TlsConnector {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    // Every connection is a full handshake, so it shows the certificate served now.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// A client that accepts any certificate (signatures are still checked), to see which one the
/// gateway picked for names the certificate does not cover.
pub fn inspecting_client(alpn: &[&[u8]]) -> TlsConnector {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider())))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

pub async fn tls_connect(
    connector: &TlsConnector,
    addr: SocketAddr,
    server_name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    timeout(DEADLINE, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))?
}

/// The certificate the server presented.
pub fn peer_cert(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---- store objects shared by the test files --------------------------------------------------

pub fn route(host: Option<&str>, path: &str) -> RouteSpec {
    RouteSpec {
        host: host.map(str::to_string),
        path: path.to_string(),
        ..RouteSpec::default()
    }
}

pub fn service_spec(routes: Vec<RouteSpec>) -> ServiceSpec {
    let mut spec: ServiceSpec =
        serde_json::from_value(serde_json::json!({ "command": "flotilla-demo" })).unwrap();
    spec.ports = vec!["http".to_string()];
    spec.routes = routes;
    spec
}

pub fn instance(name: &str, service: &str, port: u16) -> Instance {
    Instance {
        metadata: ObjectMeta::named(name),
        spec: InstanceSpec {
            service: service.to_string(),
            node: "local".to_string(),
            spec_hash: "h1".to_string(),
            template: service_spec(vec![]),
        },
        status: InstanceStatus {
            phase: Phase::Running,
            ready: true,
            host: Some("127.0.0.1".to_string()),
            ports: BTreeMap::from([("http".to_string(), port)]),
            ..InstanceStatus::default()
        },
    }
}
