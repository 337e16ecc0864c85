//! A member of a fleet (an agent's node, a gateway): its certificate from the cluster CA,
//! got with a bootstrap token, kept renewed at half-life, and the TLS configuration it
//! connects with. See `flotilla_pki` and `flotilla_server::auth`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use flotilla_pki::{ClientIdentity, rustls::ClientConfig};
use tokio_util::sync::CancellationToken;

/// A member's certificate and key, and the CA that signed it.
#[derive(Clone)]
pub struct Enrolled {
    pub ca_pem: String,
    pub cert_pem: String,
    key_pem: String,
    pub expires: SystemTime,
}

#[derive(serde::Deserialize)]
struct Issued {
    certificate: String,
}

/// The cluster CA: the file given; else the CA the bootstrap token's pin finds at `api`.
pub async fn cluster_ca(api: &str, ca_file: Option<&Path>, token: Option<&str>) -> Result<String> {
    if let Some(path) = ca_file {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading the cluster CA {}", path.display()))?;
        flotilla_pki::parse_cert(&path.display().to_string(), &pem)?;
        return Ok(pem);
    }
    let Some(pin) = token.and_then(flotilla_server::auth::pin_of_token) else {
        bail!(
            "cannot tell which CA to trust at {api}: pass a join or gateway token from `flotilla token create` (it carries the CA's pin), or --ca FILE"
        );
    };
    // Any server of the cluster shows the same CA: the first that answers does.
    let servers = flotilla_store::servers::Servers::parse(api);
    let mut failure = None;
    for server in servers.all() {
        match flotilla_pki::fetch_ca_pinned(server, &pin).await {
            Ok(pem) => return Ok(pem),
            Err(e) => {
                failure = Some(anyhow!(e).context(format!("finding the cluster CA at {server}")))
            }
        }
    }
    Err(failure.unwrap_or_else(|| anyhow!("no server address given")))
}

/// Refuses an API that is not `https://`: a fleet's server speaks TLS only (every one of a
/// list of servers).
pub fn require_https(api: &str) -> Result<()> {
    let servers = flotilla_store::servers::Servers::parse(api);
    match servers.all().iter().find(|s| !s.starts_with("https://")) {
        None => Ok(()),
        Some(plain) => bail!(
            "{plain}: a flotilla server's API is https:// (only `flotilla up` serves plain HTTP, on loopback)"
        ),
    }
}

/// Gets a certificate for `name` at `path` of `api` (trusting `ca_pem`), showing `bearer`
/// (a bootstrap token) or the certificate in `identity`; `body` gets the signing request.
pub async fn enroll(
    api: &str,
    ca_pem: &str,
    bearer: Option<&str>,
    identity: Option<Arc<ClientIdentity>>,
    path: &str,
    name: &str,
    mut body: serde_json::Value,
) -> Result<Enrolled> {
    let (key_pem, csr) = flotilla_pki::new_key_and_csr(name)?;
    body["csr"] = serde_json::Value::String(csr);
    let tls = flotilla_pki::client_config(ca_pem, identity)?;
    let client =
        crate::client::Client::with_tls(api, bearer.unwrap_or_default().to_string(), Some(tls));
    let (_, bytes) = client
        .call(
            hyper::Method::POST,
            path,
            Some(body.to_string().into_bytes()),
        )
        .await?;
    let issued: Issued = serde_json::from_slice(&bytes)
        .with_context(|| format!("unexpected answer from POST {path}"))?;
    let expires = flotilla_pki::expiry_of(&issued.certificate)?;
    Ok(Enrolled {
        ca_pem: ca_pem.to_string(),
        cert_pem: issued.certificate,
        key_pem,
        expires,
    })
}

impl Enrolled {
    /// The certificate and key, to show the server.
    pub fn identity(&self) -> Result<Arc<ClientIdentity>> {
        Ok(ClientIdentity::new(&self.cert_pem, &self.key_pem)?)
    }

    /// The TLS configuration that trusts the CA and shows `identity`.
    pub fn tls(&self, identity: Arc<ClientIdentity>) -> Result<Arc<ClientConfig>> {
        Ok(flotilla_pki::client_config(&self.ca_pem, Some(identity))?)
    }

    fn files(dir: &Path, stem: &str) -> [PathBuf; 3] {
        [
            dir.join(flotilla_pki::CA_CERT_FILE),
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        ]
    }

    /// Keeps them in `dir` (`ca.crt`, `<stem>.crt`, `<stem>.key` readable by its owner only).
    pub fn save(&self, dir: &Path, stem: &str) -> Result<()> {
        let [ca, cert, key] = Self::files(dir, stem);
        flotilla_pki::write_private(&key, self.key_pem.as_bytes())?;
        flotilla_pki::write_private(&cert, self.cert_pem.as_bytes())?;
        flotilla_pki::write_private(&ca, self.ca_pem.as_bytes())?;
        Ok(())
    }

    /// What [`Enrolled::save`] kept, if it names `who` and is valid for another minute.
    pub fn load(dir: &Path, stem: &str, who: &flotilla_pki::Identity) -> Option<Self> {
        let [ca, cert, key] = Self::files(dir, stem);
        let read = |p: &Path| std::fs::read_to_string(p).ok();
        let cert_pem = read(&cert)?;
        let saved = Self {
            ca_pem: read(&ca)?,
            expires: flotilla_pki::expiry_of(&cert_pem).ok()?,
            cert_pem,
            key_pem: read(&key)?,
        };
        let der = flotilla_pki::parse_cert("saved", &saved.cert_pem).ok()?;
        let fresh = saved.expires > SystemTime::now() + Duration::from_secs(60);
        (flotilla_pki::identity_of(&der).as_ref() == Some(who) && fresh).then_some(saved)
    }
}

/// What a renewal loop renews.
pub struct Renewal {
    pub api: String,
    /// Where the member posts its next signing request.
    pub path: String,
    pub name: String,
    /// Where the renewed certificate is kept (directory and stem), if anywhere.
    pub save: Option<(PathBuf, &'static str)>,
}

/// Renews the certificate at half its remaining life (a new key each time), until `stop`;
/// the connections made from then on show the new one.
pub async fn renew(
    renewal: Renewal,
    mut current: Enrolled,
    identity: Arc<ClientIdentity>,
    stop: CancellationToken,
) {
    loop {
        let left = current
            .expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let wait = (left / 2).max(Duration::from_secs(5));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let renewed = enroll(
            &renewal.api,
            &current.ca_pem,
            None,
            Some(identity.clone()),
            &renewal.path,
            &renewal.name,
            serde_json::json!({}),
        )
        .await
        .and_then(|fresh| {
            identity
                .set(&fresh.cert_pem, &fresh.key_pem)
                .map_err(|e| anyhow!(e))?;
            Ok(fresh)
        });
        match renewed {
            Ok(fresh) => {
                if let Some((dir, stem)) = &renewal.save
                    && let Err(e) = fresh.save(dir, stem)
                {
                    tracing::warn!(error = %format!("{e:#}"), "could not save the renewed certificate");
                }
                tracing::info!(name = %renewal.name, expires = %humantime::format_rfc3339_seconds(fresh.expires), "certificate renewed");
                current = fresh;
            }
            Err(e) => {
                tracing::warn!(name = %renewal.name, error = %format!("{e:#}"), "could not renew the certificate; retrying");
                // Retry sooner than half of what is left once little is.
                current.expires = current.expires.min(SystemTime::now() + left);
            }
        }
    }
}
