//! A small HTTP client for the API, on hyper (the same stack as the gateway and the server).

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use flotilla_store::servers::{ATTEMPT_TIMEOUT, Servers, repeatable, unavailable, unsent};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

/// A client of one API, or of the servers of one cluster (`base` lists them separated by
/// commas): requests go to one until it fails, then to the next ([`flotilla_store::servers`]).
pub struct Client {
    servers: Servers,
    token: String,
    http: HyperClient<flotilla_pki::Connector, Full<Bytes>>,
}

/// An error answered by the API, rendered for people.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
    pub details: Vec<(String, String)>,
    pub request_id: Option<String>,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.details.len() > 1 {
            write!(f, "{} ({}):", self.status.as_u16(), reason(self.status))?;
            for (field, message) in &self.details {
                write!(f, "\n  {field}: {message}")?;
            }
        } else {
            write!(f, "{}", self.message)?;
            if let Some(field) = &self.field {
                write!(f, " (field {field})")?;
            }
        }
        if let Some(id) = &self.request_id {
            write!(f, " [request {id}]")?;
        }
        Ok(())
    }
}

fn reason(s: StatusCode) -> &'static str {
    s.canonical_reason().unwrap_or("error")
}

impl std::error::Error for ApiFailure {}

impl Client {
    /// A client of `base` (one URL or several, comma-separated) that speaks TLS with `tls` to
    /// `https://` (the bearer `token` is left out when empty: a member certificate in `tls`
    /// speaks for it).
    pub fn with_tls(
        base: &str,
        token: String,
        tls: Option<std::sync::Arc<flotilla_pki::rustls::ClientConfig>>,
    ) -> Self {
        let http =
            HyperClient::builder(TokioExecutor::new()).build(flotilla_pki::Connector::new(tls));
        Self {
            servers: Servers::parse(base),
            token,
            http,
        }
    }

    fn request(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Request<Full<Bytes>>> {
        let uri: Uri = format!("{base}{path}")
            .parse()
            .with_context(|| format!("bad API address {base:?}"))?;
        let mut builder = Request::builder().method(method).uri(uri);
        if !self.token.is_empty() {
            if !flotilla_store::remote::token_is_sendable(&self.token) {
                bail!("{}", flotilla_store::remote::BAD_TOKEN);
            }
            builder = builder.header("authorization", format!("Bearer {}", self.token));
        }
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        Ok(builder.body(Full::new(body.unwrap_or_default()))?)
    }

    /// Sends a request to the server in use; to the next one when it cannot be reached, or
    /// (for a request that may be repeated) fails, hangs or answers that it cannot serve.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let body = body.map(Bytes::from);
        let attempts = self.servers.attempts();
        let count = attempts.len();
        let mut last = String::new();
        for (k, (index, base)) in attempts.into_iter().enumerate() {
            let more = k + 1 < count;
            let retry = more && repeatable(&method);
            let request = self.request(&base, method.clone(), path, body.clone())?;
            let attempt = self.servers.attempt(index);
            let answer = if retry {
                match tokio::time::timeout(ATTEMPT_TIMEOUT, self.http.request(request)).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        last = format!("{base}: no answer within {}s", ATTEMPT_TIMEOUT.as_secs());
                        continue;
                    }
                }
            } else {
                self.http.request(request).await
            };
            match answer {
                Ok(response) if retry && unavailable(response.status(), response.headers()) => {
                    last = format!("{base}: answered {}", response.status());
                }
                Ok(response) => {
                    attempt.succeeded();
                    return Ok(response);
                }
                Err(e) if (more && unsent(&e)) || retry => {
                    last = format!("{base}: {}", flotilla_store::error_chain(&e));
                }
                Err(e) => {
                    last = flotilla_store::error_chain(&e);
                    if count > 1 {
                        last = format!("{base}: {last}");
                    }
                    break;
                }
            }
        }
        if count > 1 {
            bail!(
                "cannot reach the flotilla API at any of {} (last: {last}) (set --api / FLOTILLA_API)",
                self.servers
            )
        }
        bail!(
            "cannot reach the flotilla API at {} ({last}); is `flotilla up` running? (set --api / FLOTILLA_API)",
            self.servers
        )
    }

    /// Sends a request and returns the body, turning API errors into [`ApiFailure`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes)> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .context("reading the API's answer")?
            .to_bytes();
        if !status.is_success() {
            return Err(failure(status, &bytes).into());
        }
        Ok((status, bytes))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (_, body) = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&body).with_context(|| format!("unexpected answer from GET {path}"))
    }

    /// The base URL of the server in use.
    pub fn base(&self) -> std::sync::Arc<str> {
        self.servers.current()
    }

    /// Opens a streamed GET: its body, once the API answered with success.
    pub async fn open_stream(&self, path: &str) -> Result<hyper::body::Incoming> {
        let response = self.send(Method::GET, path, None).await?;
        let status = response.status();
        let body = response.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .context("reading the API's answer")?
                .to_bytes();
            return Err(failure(status, &bytes).into());
        }
        Ok(body)
    }
}

fn failure(status: StatusCode, body: &[u8]) -> ApiFailure {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let error = &value["error"];
    let message = error["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "{} {}",
                status.as_u16(),
                String::from_utf8_lossy(body).trim()
            )
        });
    let details = error["details"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|d| {
                    (
                        d["field"].as_str().unwrap_or_default().to_string(),
                        d["message"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    ApiFailure {
        status,
        message,
        field: error["field"].as_str().map(str::to_string),
        details,
        request_id: value["requestId"].as_str().map(str::to_string),
    }
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn ensure_name(kind: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.contains('?') || name.contains('#') {
        bail!("invalid {kind} name {name:?}");
    }
    Ok(())
}
