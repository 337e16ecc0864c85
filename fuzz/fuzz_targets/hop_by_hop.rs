//! The gateway's hop-by-hop header stripping, against a plain reference (RFC 9110 §7.6.1).
//!
//! The input is a header block, one `name: value` line each (`\r\n` or `\n`); lines whose name or
//! value `http` refuses are left out. The gateway must forward:
//! - of a response (and a 101): every header but `Connection`, the headers its tokens name (any
//!   case, trimmed of spaces and tabs, empty ones skipped, every `Connection` line) and the fixed
//!   hop-by-hop list, `TE` included;
//! - of a request: the same, less `Expect` (answered by the gateway itself), and `TE: trailers`
//!   alone if the client's `TE` listed `trailers`; the header scan the request goes on with must
//!   still be right about the headers left.
#![no_main]

use std::collections::BTreeSet;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

/// What the gateway documents as hop-by-hop (`proxy.rs`, `HOP_BY_HOP`).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn header_map(data: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in data.split(|&b| b == b'\n').take(64) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
    map
}

/// The comma-separated elements of every value of `name`, trimmed, lowercased, non-empty.
fn list(headers: &HeaderMap, name: &str) -> BTreeSet<Vec<u8>> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        // Only spaces and tabs can be there to trim: `http` refuses other controls in values.
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The headers left once `Connection`, what it names and `drop` are removed.
fn reference(headers: &HeaderMap, drop: &[&str]) -> HeaderMap {
    let named = list(headers, "connection");
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if !drop.contains(&name.as_str()) && !named.contains(name.as_str().as_bytes()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn reference_response(headers: &HeaderMap) -> HeaderMap {
    reference(headers, &HOP_BY_HOP)
}

fn reference_request(headers: &HeaderMap) -> HeaderMap {
    let mut drop = HOP_BY_HOP.to_vec();
    drop.push("expect");
    let mut out = reference(headers, &drop);
    if list(headers, "te").contains(&b"trailers"[..]) {
        out.insert("te", HeaderValue::from_static("trailers"));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let headers = header_map(data);

    let mut response = headers.clone();
    flotilla_gateway::fuzzing::strip_hop_by_hop(&mut response);
    let expected = reference_response(&headers);
    assert_eq!(response, expected, "response headers, from {headers:?}");

    let mut request = headers.clone();
    if let Err(e) = flotilla_gateway::fuzzing::strip_request_hop_by_hop(&mut request) {
        panic!("request header scan: {e}, from {headers:?}");
    }
    let expected = reference_request(&headers);
    assert_eq!(request, expected, "request headers, from {headers:?}");
});
