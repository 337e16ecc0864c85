//! The client side's connections: plain TCP for `http://`, TLS for `https://` (hyper's
//! legacy client over our own connector), and the pinned first contact of a new member.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::{PkiError, invalid, pin_of, provider};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects `http://` URLs in the clear and `https://` ones with TLS (when configured).
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    tls: Option<TlsConnector>,
}

impl Connector {
    /// `tls`: the configuration for `https://`; without one, `https://` URLs are refused.
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(3)));
        http.set_nodelay(true);
        http.enforce_http(false);
        Self {
            http,
            tls: tls.map(TlsConnector::from),
        }
    }
}

fn server_name(uri: &Uri) -> Result<ServerName<'static>, BoxError> {
    let host = uri.host().ok_or("URL without a host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(ServerName::try_from(host.to_string())?)
}

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let https = uri.scheme_str() == Some("https");
            let tls = match (https, tls) {
                (false, _) => None,
                (true, Some(tls)) => Some(tls),
                (true, None) => {
                    return Err("https:// needs the cluster's CA (--ca or FLOTILLA_CA)".into());
                }
            };
            let name = if https {
                Some(server_name(&uri)?)
            } else {
                None
            };
            let tcp = tower_service::Service::call(&mut http, uri)
                .await?
                .into_inner();
            match (tls, name) {
                (Some(tls), Some(name)) => {
                    let stream =
                        tokio::time::timeout(Duration::from_secs(10), tls.connect(name, tcp))
                            .await
                            .map_err(|_| "TLS handshake timed out")??;
                    Ok(Stream::Tls(Box::new(TokioIo::new(stream))))
                }
                _ => Ok(Stream::Plain(TokioIo::new(tcp))),
            }
        })
    }
}

/// A connection to the API, in the clear or in TLS.
pub enum Stream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Stream::Plain(s) => s.connected(),
            Stream::Tls(s) => s.inner().get_ref().0.connected(),
        }
    }
}

impl Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts the server only if the chain it presents holds the CA of `pin` and its
/// certificate verifies against that CA; remembers that CA.
#[derive(Debug)]
struct PinVerifier {
    pin: String,
    found: Mutex<Option<CertificateDer<'static>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| pin_of(c) == self.pin) else {
            return Err(rustls::Error::General(
                "the server's CA does not match the token's pin (another cluster, or an impostor)"
                    .into(),
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified =
            inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        if let Ok(mut f) = self.found.lock() {
            *f = Some(ca.clone().into_owned());
        }
        Ok(verified)
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The CA certificate (PEM) of the server at `api` (an `https://` URL), trusted because its
/// SHA-256 is `pin`: the first contact of a member that holds only a bootstrap token.
pub async fn fetch_ca_pinned(api: &str, pin: &str) -> Result<String, PkiError> {
    let what = format!("reaching {api}");
    let uri: Uri = api.parse().map_err(|e| invalid(&what, e))?;
    let name = server_name(&uri).map_err(|e| invalid(&what, e))?;
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let provider = provider();
    let verifier = Arc::new(PinVerifier {
        pin: pin.to_string(),
        found: Mutex::new(None),
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let contact = async {
        let tcp = TcpStream::connect((host, port)).await?;
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
        Ok::<_, io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(10), contact)
        .await
        .map_err(|_| invalid(&what, "timed out"))?
        .map_err(|e| invalid(&what, e))?;
    let der = verifier
        .found
        .lock()
        .ok()
        .and_then(|f| f.clone())
        .ok_or_else(|| invalid(&what, "the server presented no CA"))?;
    Ok(pem_encode(&der))
}

/// A certificate's PEM text.
fn pem_encode(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
pub(crate) fn pem_for_tests(der: &[u8]) -> String {
    pem_encode(der)
}
