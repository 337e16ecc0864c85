//! Who may call the API, and what each may reach.
//!
//! - The **admin** token (the data directory's `admin.token`): everything.
//! - **Bootstrap tokens**, signed and short-lived, each only exchanged for a certificate of
//!   the cluster CA ([`flotilla_pki`]): a **join** token (`flotilla token create --join`) at
//!   `POST /api/v1/join` for a node's, a **gateway** token (`--gateway`) at
//!   `POST /api/v1/gateways/credential` for a gateway's. Each carries the CA's pin, so that its
//!   holder can trust the server before sending it.
//! - **Node certificates** (mutual TLS): only that node's own endpoints
//!   (`/api/v1/nodes/{node}/…`, the watch of its instances). A compromised node cannot read
//!   other nodes' instances, nor change a service.
//! - **Gateway certificates**: read services, instances, nodes and their watches — what a
//!   gateway routes from — and nothing else.
//!
//! Bootstrap tokens are signed by the control plane (HMAC-SHA256 with a key kept in its data
//! directory) rather than stored: `flt.<kind>.<id>-<pin>.<expiry>.<mac>`. Checking one needs no
//! store read, and every one expires. Certificates are renewed by their holder at half-life.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;

/// What a signed token lets its holder be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Join,
    Gateway,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Join => "join",
            TokenKind::Gateway => "gateway",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "join" => Some(TokenKind::Join),
            "gateway" => Some(TokenKind::Gateway),
            _ => None,
        }
    }
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    /// A join token: may only exchange itself for a node certificate.
    Join,
    /// A gateway token (its id): may only exchange itself for a gateway certificate.
    GatewayToken(String),
    /// A node certificate.
    Node(String),
    /// A gateway certificate.
    Gateway(String),
}

/// The CA pin a bootstrap token carries (`sha256:<hex>`), read without checking the token.
pub fn pin_of_token(token: &str) -> Option<String> {
    let (_, pin) = parts(token)?.subject.rsplit_once('-')?;
    (pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("sha256:{pin}"))
}

/// The subject of a bootstrap token: a random id, and the pin of the CA (`sha256:<hex>`).
pub fn bootstrap_subject(id: u64, ca_pin: &str) -> String {
    format!("{id:016x}-{}", ca_pin.trim_start_matches("sha256:"))
}

/// Why a token was refused (said to the caller without echoing the token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not match (issued by another control plane, or altered)")]
    BadSignature,
    #[error("{kind} token expired {ago}s ago")]
    Expired { kind: &'static str, ago: u64 },
}

/// Issues and checks signed tokens.
pub struct Signer {
    key: hmac::Key,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

const PREFIX: &str = "flt";

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Signer {
    /// A signer over `secret` (at least 32 random bytes, kept by the control plane).
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    fn mac(&self, body: &str) -> String {
        hex(hmac::sign(&self.key, body.as_bytes()).as_ref())
    }

    /// A token of `kind` for `subject` (the node's name; a random id for join tokens),
    /// valid for `ttl` from `now`; and its expiry.
    pub fn issue(
        &self,
        kind: TokenKind,
        subject: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> (String, SystemTime) {
        let expires = now + ttl;
        let body = format!("{PREFIX}.{}.{subject}.{}", kind.as_str(), unix(expires));
        let mac = self.mac(&body);
        (
            format!("{body}.{mac}"),
            UNIX_EPOCH + Duration::from_secs(unix(expires)),
        )
    }

    /// Checks a token at `now`: its kind and subject.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<(TokenKind, String), TokenError> {
        let (body, mac) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let parts = parts(token).ok_or(TokenError::Malformed)?;
        let (kind, subject, expiry) = (parts.kind, parts.subject, parts.expiry);
        let given = (0..mac.len())
            .step_by(2)
            .map(|i| {
                mac.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or(TokenError::Malformed)?;
        hmac::verify(&self.key, body.as_bytes(), &given).map_err(|_| TokenError::BadSignature)?;
        let now = unix(now);
        if expiry <= now {
            return Err(TokenError::Expired {
                kind: kind.as_str(),
                ago: now - expiry,
            });
        }
        if subject.is_empty() {
            return Err(TokenError::Malformed);
        }
        Ok((kind, subject.to_string()))
    }
}

/// A signed token's fields, read without checking its signature (that is [`Signer::verify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenParts<'a> {
    pub kind: TokenKind,
    pub subject: &'a str,
    /// Seconds since the Unix epoch.
    pub expiry: u64,
}

/// The fields of `flt.<kind>.<subject>.<expiry>.<mac>`; `None` for anything else. A holder
/// uses it to see when its own token expires.
pub fn parts(token: &str) -> Option<TokenParts<'_>> {
    let (body, _mac) = token.rsplit_once('.')?;
    let (head, expiry) = body.rsplit_once('.')?;
    let (kind, subject) = head
        .strip_prefix(PREFIX)?
        .strip_prefix('.')?
        .split_once('.')?;
    Some(TokenParts {
        kind: TokenKind::parse(kind)?,
        subject,
        expiry: expiry.parse().ok()?,
    })
}

/// Where gateways get and renew their certificates.
pub const GATEWAY_CREDENTIAL: &str = "/api/v1/gateways/credential";
/// Where gateways learn what is being drained and confirm they stopped routing to it.
pub const GATEWAY_DRAINS: &str = "/api/v1/gateways/drains";

/// Whether `principal` may make this request; `Err` says what it may do instead.
pub fn allowed(
    principal: &Principal,
    method: &http::Method,
    path: &str,
    query: Option<&str>,
) -> Result<(), String> {
    let node_of_query = || {
        query
            .unwrap_or_default()
            .split('&')
            .find_map(|kv| kv.strip_prefix("node="))
    };
    match principal {
        Principal::Admin => Ok(()),
        Principal::Join => {
            if method == http::Method::POST && path == "/api/v1/join" {
                Ok(())
            } else {
                Err(
                    "a join token can only be exchanged for a node certificate (POST /api/v1/join)"
                        .into(),
                )
            }
        }
        Principal::GatewayToken(_) => {
            if method == http::Method::POST && path == GATEWAY_CREDENTIAL {
                Ok(())
            } else {
                Err(format!(
                    "a gateway token can only be exchanged for a gateway certificate (POST {GATEWAY_CREDENTIAL})"
                ))
            }
        }
        Principal::Node(node) => {
            let own = format!("/api/v1/nodes/{node}/");
            // Not cordon, uncordon or drain: those are the operator's.
            let own_part = path.strip_prefix(&own).is_some_and(|rest| {
                [
                    "registration",
                    "lease",
                    "conditions",
                    "credential",
                    "instances",
                ]
                .iter()
                .any(|p| rest == *p || rest.starts_with(&format!("{p}/")))
            });
            let ok = own_part
                || (method == http::Method::GET
                    && path == "/api/v1/watch/instances"
                    && node_of_query() == Some(node.as_str()));
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "the certificate of node {node} only reaches {own}… and the watch of its own instances"
                ))
            }
        }
        Principal::Gateway(_) => {
            if (method == http::Method::POST && path == GATEWAY_CREDENTIAL)
                || path == GATEWAY_DRAINS
            {
                return Ok(());
            }
            let readable = [
                "/api/v1/services",
                "/api/v1/instances",
                "/api/v1/nodes",
                "/api/v1/gateway",
                "/api/v1/watch/services",
                "/api/v1/watch/instances",
                "/api/v1/watch/nodes",
            ];
            if method == http::Method::GET && readable.contains(&path) {
                Ok(())
            } else {
                Err("a gateway certificate only reads services, instances and nodes".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_expire_and_cannot_be_altered() {
        let s = Signer::new(b"0123456789abcdef0123456789abcdef");
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let pin = format!("sha256:{}", "ab".repeat(32));
        let subject = bootstrap_subject(7, &pin);
        let (tok, exp) = s.issue(TokenKind::Join, &subject, Duration::from_secs(60), t0);
        assert_eq!(exp, t0 + Duration::from_secs(60));
        assert_eq!(s.verify(&tok, t0), Ok((TokenKind::Join, subject.clone())));
        assert_eq!(pin_of_token(&tok), Some(pin));
        assert_eq!(
            s.verify(&tok, t0 + Duration::from_secs(70)),
            Err(TokenError::Expired {
                kind: "join",
                ago: 10
            })
        );
        // Another kind, or another control plane's key: refused.
        let forged = tok.replace("join", "gateway");
        assert_eq!(s.verify(&forged, t0), Err(TokenError::BadSignature));
        let other = Signer::new(b"another key, another key, anothe");
        assert_eq!(other.verify(&tok, t0), Err(TokenError::BadSignature));
        assert_eq!(s.verify("admin-ish", t0), Err(TokenError::Malformed));
        assert_eq!(s.verify("flt.join.x.1.zz", t0), Err(TokenError::Malformed));
        assert_eq!(s.verify("flt.node.x.1.00", t0), Err(TokenError::Malformed));
    }

    #[test]
    fn each_principal_reaches_only_its_own() {
        use http::Method;
        let n = Principal::Node("node-1".into());
        assert!(allowed(&n, &Method::PUT, "/api/v1/nodes/node-1/lease", None).is_ok());
        assert!(
            allowed(
                &n,
                &Method::GET,
                "/api/v1/nodes/node-1/instances/web-1",
                None
            )
            .is_ok()
        );
        assert!(allowed(&n, &Method::POST, "/api/v1/nodes/node-1/uncordon", None).is_err());
        assert!(allowed(&n, &Method::POST, "/api/v1/nodes/node-1/instancesx", None).is_err());
        assert!(allowed(&n, &Method::GET, "/api/v1/nodes/node-2/instances", None).is_err());
        assert!(allowed(&n, &Method::GET, "/api/v1/nodes/node-10/instances", None).is_err());
        assert!(
            allowed(
                &n,
                &Method::GET,
                "/api/v1/watch/instances",
                Some("resourceVersion=1&node=node-1")
            )
            .is_ok()
        );
        assert!(
            allowed(
                &n,
                &Method::GET,
                "/api/v1/watch/instances",
                Some("node=node-2")
            )
            .is_err()
        );
        assert!(allowed(&n, &Method::GET, "/api/v1/instances", None).is_err());
        assert!(allowed(&n, &Method::POST, "/api/v1/services", None).is_err());
        let g = Principal::Gateway("gateway-1".into());
        assert!(allowed(&g, &Method::GET, "/api/v1/watch/services", None).is_ok());
        assert!(allowed(&g, &Method::POST, GATEWAY_CREDENTIAL, None).is_ok());
        assert!(allowed(&g, &Method::GET, GATEWAY_DRAINS, Some("wait=10s")).is_ok());
        assert!(allowed(&g, &Method::POST, GATEWAY_DRAINS, None).is_ok());
        assert!(
            allowed(
                &n,
                &Method::POST,
                "/api/v1/nodes/node-1/instances/web-1/drain",
                None
            )
            .is_ok()
        );
        assert!(allowed(&n, &Method::GET, GATEWAY_DRAINS, None).is_err());
        assert!(allowed(&g, &Method::POST, "/api/v1/services", None).is_err());
        assert!(allowed(&g, &Method::GET, "/api/v1/events", None).is_err());
        let gt = Principal::GatewayToken("1".into());
        assert!(allowed(&gt, &Method::POST, GATEWAY_CREDENTIAL, None).is_ok());
        assert!(allowed(&gt, &Method::GET, "/api/v1/services", None).is_err());
        assert!(allowed(&Principal::Join, &Method::POST, "/api/v1/join", None).is_ok());
        assert!(allowed(&Principal::Join, &Method::GET, "/api/v1/nodes", None).is_err());
    }
}
