//! The cluster's public-key infrastructure.
//!
//! - The **cluster CA** ([`Authority`]): made by the server on its first start (`ca.key`, kept
//!   readable by its owner only, and `ca.crt` in its data directory). It signs the server's own
//!   serving certificate (made afresh, in memory, at every start) and the certificates of
//!   nodes and gateways.
//! - A **node or gateway** makes its own key, sends a certificate signing request with its
//!   bootstrap token (a join or gateway token) and gets back a certificate naming it
//!   ([`Identity`]: the subject's common name is the node's name, its organisation
//!   `flotilla:nodes` or `flotilla:gateways`). The server takes only the public key from the
//!   request: who the certificate names is decided by the token, never by the requester.
//! - Every connection between them is **mutual TLS** ([`server_config`], [`client_config`]);
//!   the CLI's admin token travels inside TLS too.
//! - A new member learns the CA from a **pin** (the SHA-256 of the CA certificate) that its
//!   bootstrap token carries, so the token's holder needs nothing else to trust the server
//!   and never sends the token to an impostor ([`fetch_ca_pinned`]).

mod connect;

pub use connect::{Connector, Stream, fetch_ca_pinned};
pub use rustls;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Where the CA's files live in the server's data directory.
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";

/// How long the cluster CA is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
/// How long the server's serving certificate is valid (it is made afresh at every start).
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// Certificates start an hour in the past, so a member whose clock is slightly behind the
/// server's still accepts them.
const BACKDATE: Duration = Duration::from_secs(3600);

const NODES_ORG: &str = "flotilla:nodes";
const GATEWAYS_ORG: &str = "flotilla:gateways";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Certificate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

fn invalid(what: impl Into<String>, why: impl std::fmt::Display) -> PkiError {
    PkiError::Invalid {
        what: what.into(),
        why: why.to_string(),
    }
}

fn cert_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Certificate { what, source }
}

/// The single crypto provider of the control plane's TLS.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a member certificate says its holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Node,
    Gateway,
}

impl Role {
    fn org(self) -> &'static str {
        match self {
            Role::Node => NODES_ORG,
            Role::Gateway => GATEWAYS_ORG,
        }
    }
}

/// The holder of a member certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn date(t: SystemTime) -> time::OffsetDateTime {
    let secs = i64::try_from(unix(t)).unwrap_or(i64::MAX / 2);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A positive 128-bit serial: the high bit clear.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The pin of a CA certificate: `sha256:` and the hex SHA-256 of its DER.
pub fn pin_of(der: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
    )
}

/// The first certificate of a PEM text.
pub fn parse_cert(what: &str, pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| invalid(what, format!("not a PEM certificate: {e}")))
}

/// When a PEM certificate expires.
pub fn expiry_of(pem: &str) -> Result<SystemTime, PkiError> {
    let der = parse_cert("certificate", pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| invalid("certificate", format!("unreadable: {e}")))?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Who a (verified) member certificate names; `None` for one that names no member.
pub fn identity_of(der: &[u8]) -> Option<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?;
    let org = subject.iter_organization().next()?.as_str().ok()?;
    let role = match org {
        NODES_ORG => Role::Node,
        GATEWAYS_ORG => Role::Gateway,
        _ => return None,
    };
    Some(Identity {
        role,
        name: name.to_string(),
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` through a temporary file renamed into place, readable only by its
/// owner whatever mode an old file had.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let io = |at: &Path| {
        let at = at.to_path_buf();
        move |source| PkiError::Io { path: at, source }
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The cluster CA.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Authority({})", self.pin())
    }
}

impl Authority {
    /// The CA of `dir` (`ca.crt`, `ca.key`), made there first if it has none.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        if key_path.exists() {
            let key_pem = read(&key_path)?;
            let cert_pem = read(&cert_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(cert_err(format!(
                "{}: the cluster CA's key",
                key_path.display()
            )))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(cert_err(format!(
                "{}: the cluster CA's certificate",
                cert_path.display()
            )))?;
            let cert_der = parse_cert(&cert_path.display().to_string(), &cert_pem)?;
            return Ok(Self {
                issuer,
                cert_der,
                cert_pem,
            });
        }
        let key = KeyPair::generate().map_err(cert_err("making the cluster CA's key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "flotilla cluster CA");
        dn.push(DnType::OrganizationName, "flotilla");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = date(now - BACKDATE);
        params.not_after = date(now + CA_LIFETIME);
        params.serial_number = Some(serial());
        let cert = params
            .self_signed(&key)
            .map_err(cert_err("making the cluster CA"))?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        let cert_pem = cert.pem();
        std::fs::write(&cert_path, &cert_pem).map_err(|source| PkiError::Io {
            path: cert_path.clone(),
            source,
        })?;
        tracing::info!(ca = %cert_path.display(), "cluster CA made");
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_der: cert.der().clone(),
            cert_pem,
        })
    }

    /// The CA certificate (PEM), which members trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The pin bootstrap tokens carry.
    pub fn pin(&self) -> String {
        pin_of(&self.cert_der)
    }

    /// A certificate for `who`, valid for `ttl`, for the public key of the signing request
    /// `csr_pem` (whose own subject and extensions are ignored). PEM, and its expiry.
    pub fn sign(
        &self,
        csr_pem: &str,
        who: &Identity,
        ttl: Duration,
    ) -> Result<(String, SystemTime), PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            invalid(
                "csr",
                format!("not a valid certificate signing request: {e}"),
            )
        })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, who.name.as_str());
        dn.push(DnType::OrganizationName, who.role.org());
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let expires = now + ttl;
        params.not_before = date(now - BACKDATE);
        params.not_after = date(expires);
        params.serial_number = Some(serial());
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(cert_err(format!("signing the certificate of {}", who.name)))?;
        Ok((cert.pem(), UNIX_EPOCH + Duration::from_secs(unix(expires))))
    }

    /// The server's TLS configuration: a serving certificate for `names` (IP addresses and
    /// DNS names), made now; client certificates optional, but verified against this CA when
    /// given (the admin and bootstrap tokens come without one).
    pub fn server_config(&self, names: &[String]) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let key = KeyPair::generate().map_err(cert_err("making the server's key"))?;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(cert_err("the server certificate's names"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "flotilla server");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = date(now - BACKDATE);
        params.not_after = date(now + SERVER_CERT_LIFETIME);
        params.serial_number = Some(serial());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_err("signing the server's certificate"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone())?;
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| invalid("client certificate verifier", e))?;
        let key_der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| invalid("the server's key", e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.der().clone(), self.cert_der.clone()], key_der)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // No session resumption: a resumed session skips the client certificate's checks, so
        // an expired certificate would keep working. Connections are long-lived anyway.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

/// A member's new key (PEM) and a signing request for it (PEM).
pub fn new_key_and_csr(name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(cert_err("making a key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(cert_err("making a certificate signing request"))?;
    let csr_pem = csr
        .pem()
        .map_err(cert_err("encoding a certificate signing request"))?;
    Ok((key.serialize_pem(), csr_pem))
}

/// A member's certificate and key, replaceable while connections use it (renewal).
#[derive(Debug)]
pub struct ClientIdentity {
    current: RwLock<Arc<CertifiedKey>>,
}

fn certified(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, PkiError> {
    let cert = parse_cert("certificate", cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| invalid("key", format!("not a PEM private key: {e}")))?;
    Ok(Arc::new(CertifiedKey::from_der(
        vec![cert],
        key,
        &provider(),
    )?))
}

impl ClientIdentity {
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Arc<Self>, PkiError> {
        Ok(Arc::new(Self {
            current: RwLock::new(certified(cert_pem, key_pem)?),
        }))
    }

    /// Uses a renewed certificate from the next connection on.
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
        let new = certified(cert_pem, key_pem)?;
        if let Ok(mut c) = self.current.write() {
            *c = new;
        }
        Ok(())
    }
}

impl rustls::client::ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The TLS configuration of a client of the API: it trusts `ca_pem` only, and shows
/// `identity` when given.
pub fn client_config(
    ca_pem: &str,
    identity: Option<Arc<ClientIdentity>>,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| invalid("CA", format!("not a PEM certificate: {e}")))?;
        roots.add(cert)?;
        added += 1;
    }
    if added == 0 {
        return Err(invalid("CA", "no certificate in it"));
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder.with_client_cert_resolver(id),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests;
