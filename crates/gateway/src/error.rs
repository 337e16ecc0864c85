//! Errors and the gateway's own answers: the short plain-text responses it makes itself (404 no
//! route, 503 no ready instance, 502 upstream failed, 504 route timeout, 413 body too large, 429
//! rate limit, 400 bad request) and [`error_chain`], how errors are written to the logs.
//! Internal error details go to the logs only, never into an answer.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

pub use flotilla_store::error_chain;

use crate::body::{GatewayBody, full};

/// Longest host or path echoed back in a 404 body.
const ECHO_LIMIT: usize = 128;

/// A short plain-text answer made by the gateway itself.
pub fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<GatewayBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// 404: no route matches the host and path (echoed, clipped).
pub(crate) fn no_route(host: &str, path: &str) -> Response<GatewayBody> {
    let reason = format!(
        "no route for host {:?} and path {:?}\n",
        clip(host),
        clip(path)
    );
    text(StatusCode::NOT_FOUND, reason)
}

/// 503: the route's service has no ready instance.
pub(crate) fn no_ready_instance(service: &str) -> Response<GatewayBody> {
    let reason = format!("no ready instance for service {service:?}\n");
    text(StatusCode::SERVICE_UNAVAILABLE, reason)
}

/// 429 with `Retry-After` in seconds.
pub(crate) fn too_many_requests(retry_after_secs: u64) -> Response<GatewayBody> {
    let mut response = text(StatusCode::TOO_MANY_REQUESTS, "too many requests\n");
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

/// 413: the request body is longer than `limit` bytes.
pub(crate) fn too_large(limit: u64) -> Response<GatewayBody> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {limit} bytes\n"),
    )
}

/// 502: no endpoint of the service gave an answer.
pub(crate) fn upstream_failed(service: &str) -> Response<GatewayBody> {
    text(
        StatusCode::BAD_GATEWAY,
        format!("upstream error for service {service:?}\n"),
    )
}

/// 504: the service did not answer within the route's deadline.
pub(crate) fn upstream_timed_out(service: &str) -> Response<GatewayBody> {
    text(
        StatusCode::GATEWAY_TIMEOUT,
        format!("upstream timed out for service {service:?}\n"),
    )
}

/// 400 with a fixed reason.
pub(crate) fn bad_request(reason: &'static str) -> Response<GatewayBody> {
    text(StatusCode::BAD_REQUEST, reason)
}

/// At most [`ECHO_LIMIT`] characters of `s`.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(ECHO_LIMIT) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_char_boundaries() {
        let long = "é".repeat(ECHO_LIMIT + 10);
        assert_eq!(clip(&long).chars().count(), ECHO_LIMIT);
        assert_eq!(clip("short"), "short");
    }
}
