//! One structured log line per request (`[gateway] access_log = true`), on the tracing target
//! `flotilla::access`. With the binary's JSON subscriber each line is one JSON object; filter
//! with `RUST_LOG=flotilla::access=info`.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};

use crate::balance::EndpointState;
use crate::conn::ConnInfo;
use crate::table::Route;

/// Longest path or host logged (longer ones are cut: a log line stays bounded).
const FIELD_LIMIT: usize = 512;

/// What became of a request, for metrics and the access log.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// The matched route (its service is the `route` label).
    pub route: Option<Arc<Route>>,
    /// The endpoint that answered (or failed last).
    pub instance: Option<Arc<EndpointState>>,
    /// Upstream attempts made.
    pub attempts: u32,
}

/// What is logged of the request, taken before the request is consumed.
#[derive(Debug)]
pub(crate) struct Logged {
    method: String,
    host: String,
    path: String,
    version: http::Version,
    user_agent: String,
}

impl Logged {
    pub(crate) fn of<B>(req: &Request<B>) -> Self {
        let header = |name: http::header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(clip)
                .unwrap_or_default()
        };
        let host = match req.uri().authority() {
            Some(a) => clip(a.as_str()),
            None => header(http::header::HOST),
        };
        Self {
            method: req.method().to_string(),
            host,
            path: clip(req.uri().path()),
            version: req.version(),
            user_agent: header(http::header::USER_AGENT),
        }
    }
}

fn clip(s: &str) -> String {
    match s.char_indices().nth(FIELD_LIMIT) {
        Some((end, _)) => s[..end].to_owned(),
        None => s.to_owned(),
    }
}

pub(crate) fn log(
    req: &Logged,
    conn: &ConnInfo,
    status: StatusCode,
    outcome: &Outcome,
    elapsed: Duration,
) {
    tracing::info!(
        target: "flotilla::access",
        client = %conn.peer.ip(),
        conn = conn.id,
        tls = conn.tls,
        method = %req.method,
        host = %req.host,
        path = %req.path,
        version = ?req.version,
        user_agent = %req.user_agent,
        status = status.as_u16(),
        route = outcome.route.as_ref().map_or("-", |r| r.service.as_str()),
        instance = outcome.instance.as_ref().map_or("-", |e| e.instance.as_str()),
        attempts = outcome.attempts,
        duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        "request"
    );
}
