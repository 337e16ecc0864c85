//! TLS termination: rustls (ring provider, TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`) with
//! certificates chosen per connection by SNI.
//!
//! ```text
//! PEM files ──CertFiles (poll mtime/size/inode)──▶ CertSet ──┐
//!                                                             ├─ArcSwap─▶ CertResolver::resolve(SNI)
//! ACME / anything else ──CertResolver::set_dynamic──▶ CertSet ┘
//! ```
//!
//! - A handshake picks its certificate from an immutable [`CertSet`] loaded through `arc-swap`:
//!   no lock, and a swap never touches established connections.
//! - Hot reload: [`CertFiles`] re-reads an entry when its certificate or key file changes. A
//!   file that does not parse, or a key that does not match its certificate (a rotation caught
//!   half-way), is logged and the entry keeps serving its previous certificate; the entry is
//!   tried again at the next change.
//! - Seam for ACME: certificates obtained at run time go in with
//!   [`CertResolver::set_dynamic`]. They take precedence over file certificates for the names
//!   they cover and survive file reloads. A TLS-ALPN-01 responder would add its challenge
//!   certificate the same way (and `acme-tls/1` to the ALPN list).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::config::{CertificateFiles, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS is enabled but no certificate is configured")]
    NoCertificates,
    #[error("cannot read certificates from {path}")]
    ReadCert {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("no certificate found in {path}")]
    EmptyCert { path: PathBuf },
    #[error("cannot read a private key from {path}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("unusable certificate {cert} with key {key}")]
    BadKey {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot set up TLS")]
    Config(#[source] rustls::Error),
}

/// The single crypto provider of the gateway.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server configuration for the TLS listener: TLS 1.3 and 1.2, no client certificates,
/// ALPN `h2` then `http/1.1`, stateless session tickets, certificates from `resolver`.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::Config)?;
    Ok(Arc::new(config))
}

/// Certificates by server name. Immutable once built; swapped whole.
#[derive(Debug, Clone, Default)]
pub struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is stored under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertSet {
    /// Serves `key` for `host`: an exact name or a one-label wildcard (`*.example.com` matches
    /// `a.example.com`, not `example.com` nor `a.b.example.com`). Names are case-insensitive.
    pub fn insert(&mut self, host: &str, key: Arc<CertifiedKey>) {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match host.strip_prefix("*.") {
            Some(parent) => self.wildcard.insert(parent.to_string(), key),
            None => self.exact.insert(host, key),
        };
    }

    /// Serves `key` to clients without SNI or asking for a name no entry covers.
    pub fn set_default(&mut self, key: Arc<CertifiedKey>) {
        self.default = Some(key);
    }

    /// The certificate for a name, exact match first, then wildcard; no default.
    pub fn find(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        if let Some(key) = self.exact.get(name) {
            return Some(key);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.default.is_none()
    }
}

/// Picks the certificate of each handshake from the SNI name: certificates fed at run time
/// ([`set_dynamic`](Self::set_dynamic)) first, then those of the files, then the default.
/// A handshake with no certificate to offer is aborted by rustls.
#[derive(Debug, Default)]
pub struct CertResolver {
    files: ArcSwap<CertSet>,
    dynamic: ArcSwap<CertSet>,
}

impl CertResolver {
    pub fn new(files: CertSet) -> Self {
        Self {
            files: ArcSwap::from_pointee(files),
            dynamic: ArcSwap::default(),
        }
    }

    /// The certificate a client asking for `sni` gets.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let files = self.files.load();
        let dynamic = self.dynamic.load();
        if let Some(name) = sni {
            let name = name.trim_end_matches('.');
            let lower;
            let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                lower = name.to_ascii_lowercase();
                lower.as_str()
            } else {
                name
            };
            if let Some(key) = dynamic.find(name).or_else(|| files.find(name)) {
                return Some(key.clone());
            }
        }
        files.default.clone().or_else(|| dynamic.default.clone())
    }

    /// Replaces the certificates loaded from files (what [`CertFiles`] does on a change).
    pub fn set_files(&self, set: CertSet) {
        self.files.store(Arc::new(set));
    }

    /// Replaces the certificates obtained at run time (the ACME seam). They win over file
    /// certificates for the names they cover; their default is used only when the files have
    /// none.
    pub fn set_dynamic(&self, set: CertSet) {
        self.dynamic.store(Arc::new(set));
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self.lookup(hello.server_name());
        if key.is_none() {
            tracing::debug!(sni = ?hello.server_name(), "no certificate for this name");
        }
        key
    }
}

/// Reads a PEM certificate chain and its private key, and checks that they belong together.
pub fn load_certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCert {
            path: cert.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::EmptyCert {
            path: cert.to_path_buf(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::ReadKey {
        path: key.to_path_buf(),
        source,
    })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|source| TlsError::BadKey {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    })
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

#[derive(Debug)]
struct Entry {
    files: CertificateFiles,
    /// Of the cert and key files when they were last read.
    seen: (Option<Stamp>, Option<Stamp>),
    /// The last certificate that loaded.
    key: Arc<CertifiedKey>,
}

/// The certificates named in the configuration, kept current with their files.
#[derive(Debug)]
pub struct CertFiles {
    entries: Vec<Entry>,
    resolver: Arc<CertResolver>,
    provider: Arc<CryptoProvider>,
}

impl CertFiles {
    /// Loads every certificate (any failure is an error: a gateway must not start without a
    /// certificate it was told to serve) and returns them with a resolver serving them.
    pub fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        if config.certificates.is_empty() {
            return Err(TlsError::NoCertificates);
        }
        let provider = provider();
        let mut entries = Vec::with_capacity(config.certificates.len());
        for files in &config.certificates {
            // Stamped before reading: a write that lands during the read is seen next time.
            let seen = (stamp(&files.cert), stamp(&files.key));
            let key = load_certified_key(&files.cert, &files.key, &provider)?;
            entries.push(Entry {
                files: files.clone(),
                seen,
                key: Arc::new(key),
            });
        }
        let this = Self {
            entries,
            resolver: Arc::new(CertResolver::default()),
            provider,
        };
        this.resolver.set_files(this.build());
        Ok(this)
    }

    pub fn resolver(&self) -> Arc<CertResolver> {
        self.resolver.clone()
    }

    fn build(&self) -> CertSet {
        let mut set = CertSet::default();
        for entry in &self.entries {
            for host in &entry.files.hosts {
                set.insert(host, entry.key.clone());
            }
        }
        let default = self
            .entries
            .iter()
            .find(|e| e.files.default)
            .or(self.entries.first());
        if let Some(entry) = default {
            set.set_default(entry.key.clone());
        }
        set
    }

    /// Re-reads the entries whose files changed since they were last read and swaps the new
    /// set in if any loaded. Blocking (file IO): run it off the async workers. Returns how many
    /// entries were reloaded.
    pub fn reload_changed(&mut self) -> usize {
        let mut reloaded = 0;
        for entry in &mut self.entries {
            let now = (stamp(&entry.files.cert), stamp(&entry.files.key));
            if now == entry.seen {
                continue;
            }
            entry.seen = now;
            match load_certified_key(&entry.files.cert, &entry.files.key, &self.provider) {
                Ok(key) => {
                    entry.key = Arc::new(key);
                    reloaded += 1;
                    tracing::info!(
                        cert = %entry.files.cert.display(),
                        hosts = ?entry.files.hosts,
                        "certificate reloaded"
                    );
                }
                Err(e) => tracing::warn!(
                    error = %crate::error::error_chain(&e),
                    "certificate files changed but cannot be used; still serving the previous \
                     certificate"
                ),
            }
        }
        if reloaded > 0 {
            self.resolver.set_files(self.build());
        }
        reloaded
    }

    /// Checks the files every `interval` until `stop`.
    pub async fn watch(mut self, interval: Duration, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let checked = tokio::task::spawn_blocking(move || {
                self.reload_changed();
                self
            })
            .await;
            match checked {
                Ok(back) => self = back,
                Err(e) => {
                    tracing::error!(error = %e, "certificate reload failed; reloading stops");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_for(name: &str) -> Arc<CertifiedKey> {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let provider = provider();
        let der = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        Arc::new(CertifiedKey::from_der(vec![ck.cert.der().clone()], der, &provider).unwrap())
    }

    fn write(path: &Path, text: &str) {
        // Atomic replace, as certificate tools do: a new inode every time.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn broken_or_mismatched_files_keep_the_previous_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("c.key"));
        let make = |name: &str| rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let first = make("r.example");
        write(&cert, &first.cert.pem());
        write(&key, &first.signing_key.serialize_pem());
        let config = TlsConfig {
            certificates: vec![CertificateFiles {
                hosts: vec!["r.example".into()],
                cert: cert.clone(),
                key: key.clone(),
                default: false,
            }],
            reload_interval: Duration::from_secs(1),
        };
        let mut files = CertFiles::load(&config).unwrap();
        let resolver = files.resolver();
        let served = || resolver.lookup(Some("r.example")).unwrap().cert[0].clone();
        assert_eq!(&served(), first.cert.der());
        assert_eq!(files.reload_changed(), 0, "nothing changed");

        write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        );
        assert_eq!(files.reload_changed(), 0);
        assert_eq!(&served(), first.cert.der());
        write(&cert, "");
        assert_eq!(files.reload_changed(), 0);
        assert_eq!(&served(), first.cert.der());

        // Half a rotation: the new certificate with the old key.
        let second = make("r.example");
        write(&cert, &second.cert.pem());
        assert_eq!(files.reload_changed(), 0);
        assert_eq!(&served(), first.cert.der());
        // The rotation completes.
        write(&key, &second.signing_key.serialize_pem());
        assert_eq!(files.reload_changed(), 1);
        assert_eq!(&served(), second.cert.der());

        // A deleted file is a failed reload too.
        std::fs::remove_file(&key).unwrap();
        assert_eq!(files.reload_changed(), 0);
        assert_eq!(&served(), second.cert.der());

        // Starting with a broken file is an error that names it.
        let err = CertFiles::load(&config).unwrap_err();
        assert!(err.to_string().contains("c.key"), "{err}");
    }

    #[test]
    fn lookup_by_exact_name_then_wildcard_then_default() {
        let (a, w, d, dynamic) = (
            key_for("a.example"),
            key_for("*.example"),
            key_for("default"),
            key_for("acme.example"),
        );
        let mut set = CertSet::default();
        set.insert("a.example", a.clone());
        set.insert("*.Example", w.clone());
        set.set_default(d.clone());
        let resolver = CertResolver::new(set);
        let is = |got: Option<Arc<CertifiedKey>>, want: &Arc<CertifiedKey>| {
            Arc::ptr_eq(&got.unwrap(), want)
        };
        assert!(is(resolver.lookup(Some("a.example")), &a));
        assert!(is(resolver.lookup(Some("A.Example.")), &a));
        assert!(is(resolver.lookup(Some("b.example")), &w));
        assert!(is(resolver.lookup(Some("x.b.example")), &d));
        assert!(is(resolver.lookup(Some("example")), &d));
        assert!(is(resolver.lookup(None), &d));

        let mut extra = CertSet::default();
        extra.insert("acme.example", dynamic.clone());
        resolver.set_dynamic(extra);
        assert!(is(resolver.lookup(Some("acme.example")), &dynamic));
        // File reloads leave run-time certificates alone.
        resolver.set_files(CertSet::default());
        assert!(is(resolver.lookup(Some("acme.example")), &dynamic));
        assert!(resolver.lookup(Some("a.example")).is_none());
    }
}
