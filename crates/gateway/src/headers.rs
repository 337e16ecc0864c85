//! Header rules of the request and response the gateway forwards: hop-by-hop headers (and those
//! a `Connection` names) are removed, `TE: trailers` is kept, `Expect` is dropped, the host is
//! taken from the URI or `Host`, and the forwarding headers (`X-Forwarded-*`, `Forwarded`) are
//! added. [`Present`] finds the headers these rules look at in one pass over the names.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus `proxy-connection` and `keep-alive` seen in the
/// wild. `expect` is answered by our own server side, so it is not forwarded either.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The header a `Connection: close` names too.
static CLOSE: HeaderName = HeaderName::from_static("close");

/// The declared body length, if any (an unparsable one is left to hyper, which rejects it).
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` + `Upgrade`).
pub(crate) fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    req.headers().get(header::UPGRADE).cloned()
}

/// Whether the client accepts trailers (`TE: trailers`).
fn te_trailers(headers: &HeaderMap) -> bool {
    // On bytes, as `Connection` is read: a value with other bytes (obs-text) in another element
    // still lists `trailers`.
    headers
        .get_all(header::TE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
}

/// The host a request was sent to: the URI authority (absolute form) or the `Host` header;
/// empty if neither (or if it is not visible ASCII).
pub(crate) fn request_host<B>(req: &Request<B>) -> HeaderValue {
    let empty = || HeaderValue::from_static("");
    if let Some(authority) = req.uri().authority() {
        return HeaderValue::from_str(authority.as_str()).unwrap_or_else(|_| empty());
    }
    match req.headers().get(header::HOST) {
        Some(h) if h.to_str().is_ok() => h.clone(),
        _ => empty(),
    }
}

/// The request's host, as a header value (copied without allocating) and as text.
pub(crate) struct Host<'a> {
    pub(crate) value: HeaderValue,
    pub(crate) text: &'a str,
}

/// Removes the hop-by-hop headers of a request (and those its `Connection` names) and `Expect`,
/// keeping `TE: trailers`; `present` is the scan of the headers before, the result one that is
/// still right for the headers the request goes on to read (host, forwarding headers).
pub(crate) fn strip_request_hop_by_hop(headers: &mut HeaderMap, mut present: Present) -> Present {
    let wants_trailers = present.has(Present::TE) && te_trailers(headers);
    if strip_present(headers, present.hop()) {
        // `Connection` named other headers, which are gone now.
        present = Present::scan(headers);
    }
    if present.has(Present::EXPECT) {
        headers.remove(header::EXPECT);
    }
    if wants_trailers {
        // The only `TE` allowed over HTTP/2, and what gRPC needs to get its status.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    present
}

/// Removes the hop-by-hop headers of a message (and those its `Connection` names).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let present = Present::scan(headers);
    strip_present(headers, present.hop());
}

/// Removes the hop-by-hop headers flagged in `hop` (bits of [`HOP_BY_HOP`]), and the headers
/// `Connection` names; true if it named any that is not hop-by-hop already.
fn strip_present(headers: &mut HeaderMap, hop: u16) -> bool {
    if hop == 0 {
        return false;
    }
    // Tokens that are hop-by-hop themselves (`keep-alive`, `upgrade`) or `close` need no name
    // built: a plain `Connection: keep-alive`, as most messages have, allocates nothing.
    let mut named: Vec<HeaderName> = Vec::new();
    let mut close = false;
    if hop & Present::CONNECTION != 0 {
        for value in headers.get_all(header::CONNECTION) {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.is_empty() {
                    continue;
                }
                if is_hop_token(token) {
                    close |= token.eq_ignore_ascii_case(b"close");
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token) {
                    named.push(name);
                }
            }
        }
    }
    for name in &named {
        headers.remove(name);
    }
    if close {
        // `close` is an option like any other: a header of that name (reserved, RFC 9110
        // §18.4) goes too. No tracked header, so no rescan either.
        headers.remove(&CLOSE);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if hop & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    !named.is_empty()
}

/// A `Connection` token that needs no name built: the name of a hop-by-hop header itself, or
/// `close` (whose header [`strip_present`] removes by a static name), any case. Runs on most
/// messages, so without allocating.
fn is_hop_token(token: &[u8]) -> bool {
    // Room for the longest hop-by-hop name, `proxy-authorization`.
    let mut lower = [0u8; 19];
    let Some(lower) = lower.get_mut(..token.len()) else {
        return false;
    };
    for (to, from) in lower.iter_mut().zip(token) {
        *to = from.to_ascii_lowercase();
    }
    match std::str::from_utf8(lower) {
        Ok(name) => name == "close" || Present::bit(name) & Present::HOP != 0,
        Err(_) => false,
    }
}

/// Which of the headers the gateway looks at or rewrites a message carries, a bit each, found
/// in one pass over its names: most messages carry few of them, and each lookup in a
/// `HeaderMap` hashes.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Present(u16);

impl Present {
    /// Bits 0–8: the headers of [`HOP_BY_HOP`], in its order.
    const HOP: u16 = (1 << 9) - 1;
    pub(crate) const CONNECTION: u16 = 1;
    const TE: u16 = 1 << 5;
    pub(crate) const CONTENT_LENGTH: u16 = 1 << 9;
    pub(crate) const EXPECT: u16 = 1 << 10;
    pub(crate) const HOST: u16 = 1 << 11;
    pub(crate) const FORWARDED_FOR: u16 = 1 << 12;
    pub(crate) const FORWARDED_HOST: u16 = 1 << 13;
    pub(crate) const FORWARDED: u16 = 1 << 14;

    pub(crate) fn scan(headers: &HeaderMap) -> Self {
        Self(
            headers
                .keys()
                .fold(0, |bits, name| bits | Self::bit(name.as_str())),
        )
    }

    /// The bit of a header by its lowercase name; 0 for the headers not tracked.
    fn bit(name: &str) -> u16 {
        match name {
            "connection" => Self::CONNECTION,
            "keep-alive" => 1 << 1,
            "proxy-connection" => 1 << 2,
            "proxy-authenticate" => 1 << 3,
            "proxy-authorization" => 1 << 4,
            "te" => Self::TE,
            "trailer" => 1 << 6,
            "transfer-encoding" => 1 << 7,
            "upgrade" => 1 << 8,
            "content-length" => Self::CONTENT_LENGTH,
            "expect" => Self::EXPECT,
            "host" => Self::HOST,
            "x-forwarded-for" => Self::FORWARDED_FOR,
            "x-forwarded-host" => Self::FORWARDED_HOST,
            "forwarded" => Self::FORWARDED,
            _ => 0,
        }
    }

    pub(crate) fn has(self, flag: u16) -> bool {
        self.0 & flag != 0
    }

    /// The hop-by-hop headers present (bits of [`HOP_BY_HOP`]).
    fn hop(self) -> u16 {
        self.0 & Self::HOP
    }
}

pub(crate) fn add_forwarded(
    headers: &mut HeaderMap,
    client: &Forwarding,
    host: &Host<'_>,
    present: Present,
) {
    if !present.has(Present::FORWARDED_FOR) {
        headers.insert(X_FORWARDED_FOR.clone(), client.ip.clone());
    } else {
        let prior: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let forwarded_for = if prior.is_empty() {
            client.ip.to_str().unwrap_or_default().to_owned()
        } else {
            format!(
                "{}, {}",
                prior.join(", "),
                client.ip.to_str().unwrap_or_default()
            )
        };
        if let Ok(value) = HeaderValue::try_from(forwarded_for) {
            headers.insert(X_FORWARDED_FOR.clone(), value);
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), client.proto.clone());
    let host_text = host.text;
    if !host_text.is_empty() {
        // Replaces any the client sent.
        headers.insert(X_FORWARDED_HOST.clone(), host.value.clone());
    } else if present.has(Present::FORWARDED_HOST) {
        headers.remove(&X_FORWARDED_HOST);
    }

    // RFC 7239: append this hop's element to what earlier proxies wrote.
    let with_host = !host_text.is_empty()
        && host_text
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    let prior: Vec<&str> = if present.has(Present::FORWARDED) {
        headers
            .get_all(header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    } else {
        Vec::new()
    };
    let value = if prior.is_empty() && !with_host {
        Ok(client.element.clone())
    } else {
        let element = client.element.to_str().unwrap_or_default();
        let mut out = String::with_capacity(
            prior.iter().map(|p| p.len() + 2).sum::<usize>() + element.len() + host_text.len() + 8,
        );
        for p in &prior {
            out.push_str(p);
            out.push_str(", ");
        }
        out.push_str(element);
        if with_host {
            out.push_str(";host=\"");
            out.push_str(host_text);
            out.push('"');
        }
        HeaderValue::try_from(out)
    };
    if let Ok(value) = value {
        headers.insert(header::FORWARDED, value);
    }
}

/// A connection's part of the forwarding headers, computed once per connection.
#[derive(Debug)]
pub(crate) struct Forwarding {
    /// The client address, for `X-Forwarded-For`.
    ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    proto: HeaderValue,
    /// This hop's `Forwarded` element without the host: `for=…;proto=…`.
    element: HeaderValue,
}

impl Forwarding {
    pub(crate) fn new(peer: SocketAddr, scheme: &'static str) -> Self {
        let ip = peer.ip().to_string();
        let node = match peer.ip() {
            std::net::IpAddr::V4(_) => ip.clone(),
            std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        let element = format!("for={node};proto={scheme}");
        Self {
            ip: HeaderValue::try_from(ip).unwrap_or_else(|_| HeaderValue::from_static("")),
            proto: HeaderValue::from_static(scheme),
            element: HeaderValue::try_from(element)
                .unwrap_or_else(|_| HeaderValue::from_static("")),
        }
    }
}

/// What the fuzz targets (`fuzz/`) drive; not part of the gateway's API.
#[doc(hidden)]
pub mod fuzzing {
    use super::{HeaderMap, Present};

    /// The headers of a response (or a 101) as the gateway forwards them.
    pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
        super::strip_hop_by_hop(headers);
    }

    /// The headers of a request as the gateway forwards them (before its own `Host`, upgrade
    /// and forwarding headers). An error if the scan the request goes on with disagrees with
    /// the headers left about one it reads later.
    pub fn strip_request_hop_by_hop(headers: &mut HeaderMap) -> Result<(), String> {
        let present = super::strip_request_hop_by_hop(headers, Present::scan(headers));
        let fresh = Present::scan(headers);
        let later =
            Present::HOST | Present::FORWARDED_FOR | Present::FORWARDED_HOST | Present::FORWARDED;
        if present.0 & later == fresh.0 & later {
            Ok(())
        } else {
            Err(format!(
                "scan kept {:#06x}, headers have {:#06x}",
                present.0 & later,
                fresh.0 & later
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers["x-kept"], "yes");

        // The bits name the right headers.
        assert_eq!(HOP_BY_HOP[0], header::CONNECTION);
        assert_eq!(HOP_BY_HOP[5], header::TE);
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(name.clone(), HeaderValue::from_static("x"));
            assert_eq!(Present::scan(&headers).0, 1 << i, "{name}");
        }
        // A response's usual `Connection: keep-alive` names nothing else: no rescan needed.
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        let present = Present::scan(&headers);
        assert!(
            present.has(Present::CONNECTION)
                && present.has(Present::CONTENT_LENGTH)
                && !present.has(Present::HOST)
        );
        assert!(!strip_present(&mut headers, present.hop()));
        assert_eq!(headers.len(), 1, "{headers:?}");
        // Every `Connection` line counts, not only the first.
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.append(header::CONNECTION, HeaderValue::from_static("x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        let present = Present::scan(&headers);
        assert!(strip_present(&mut headers, present.hop()));
        assert!(headers.is_empty(), "{headers:?}");
        // `Connection: host` removes Host, and says so (the request rescans and sets it).
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Host"));
        headers.insert(header::HOST, HeaderValue::from_static("a.example"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        let present = Present::scan(&headers);
        assert!(present.has(Present::HOST) && present.has(Present::TE));
        assert!(strip_present(&mut headers, present.hop()));
        assert!(headers.is_empty(), "{headers:?}");
        assert!(!Present::scan(&headers).has(Present::HOST));
        // Tokens: any case, optional whitespace, empty ones skipped; every hop-by-hop name and
        // `close` build no name, anything else does.
        for name in &HOP_BY_HOP {
            assert!(is_hop_token(name.as_str().as_bytes()), "{name}");
            assert!(
                is_hop_token(name.as_str().to_uppercase().as_bytes()),
                "{name}"
            );
        }
        assert!(is_hop_token(b"Close"));
        assert!(!is_hop_token(b"closed") && !is_hop_token(b"x-upgrade") && !is_hop_token(b""));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static(" Keep-Alive ,, X-A\t, close,x-b"),
        );
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert("x-b", HeaderValue::from_static("2"));
        headers.insert("x-c", HeaderValue::from_static("3"));
        let present = Present::scan(&headers);
        assert!(strip_present(&mut headers, present.hop()));
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers["x-c"], "3");
        // `close` names a header too, like any option (found by fuzz/hop_by_hop).
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Close"));
        headers.insert("close", HeaderValue::from_static("1"));
        headers.insert("x-c", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers["x-c"], "3");
    }

    #[test]
    fn requests_keep_te_trailers_alone() {
        let strip = |pairs: &[(&'static str, &[u8])]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                let value = HeaderValue::from_bytes(value).unwrap();
                headers.append(HeaderName::from_static(name), value);
            }
            let present = Present::scan(&headers);
            strip_request_hop_by_hop(&mut headers, present);
            headers
        };
        let headers = strip(&[
            ("te", b"gzip, Trailers"),
            ("expect", b"100-continue"),
            ("connection", b"te"),
            ("content-type", b"application/grpc"),
        ]);
        assert_eq!(headers.len(), 2, "{headers:?}");
        assert_eq!(headers["te"], "trailers");
        assert!(strip(&[("te", b"gzip"), ("te", b"deflate")]).is_empty());
        // A byte outside ASCII (obs-text, which HTTP/1.1 parsers let through) in another
        // element does not hide `trailers` (found by fuzz/hop_by_hop).
        let headers = strip(&[("te", b"g\x83ip, trailers")]);
        assert_eq!(headers["te"], "trailers");
        // `Connection` naming a header the request reads later: the scan is redone.
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("forwarded"));
        headers.insert(header::FORWARDED, HeaderValue::from_static("for=192.0.2.1"));
        let before = Present::scan(&headers);
        let after = strip_request_hop_by_hop(&mut headers, before);
        assert!(before.has(Present::FORWARDED) && !after.has(Present::FORWARDED));
        assert!(headers.is_empty(), "{headers:?}");
    }

    #[test]
    fn forwarded_headers() {
        let peer: SocketAddr = "10.0.0.9:5555".parse().unwrap();
        let fwd = |peer: SocketAddr, scheme: &'static str| Forwarding::new(peer, scheme);
        let host = |text: &'static str| Host {
            value: HeaderValue::from_static(text),
            text,
        };
        let mut headers = HeaderMap::new();
        let present = Present::scan(&headers);
        add_forwarded(
            &mut headers,
            &fwd(peer, "http"),
            &host("Example.com:8080"),
            present,
        );
        assert_eq!(headers["x-forwarded-for"], "10.0.0.9");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "Example.com:8080");
        assert_eq!(
            headers["forwarded"],
            "for=10.0.0.9;proto=http;host=\"Example.com:8080\""
        );

        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("forwarded", HeaderValue::from_static("for=192.0.2.60"));
        let present = Present::scan(&headers);
        add_forwarded(&mut headers, &fwd(v6, "https"), &host(""), present);
        assert_eq!(
            headers["forwarded"],
            "for=192.0.2.60, for=\"[2001:db8::1]\";proto=https"
        );

        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        headers.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        headers.insert("x-forwarded-host", HeaderValue::from_static("spoofed"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let present = Present::scan(&headers);
        add_forwarded(&mut headers, &fwd(peer, "http"), &host(""), present);
        assert_eq!(headers["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert!(headers.get("x-forwarded-host").is_none());
    }

    #[test]
    fn host_comes_from_authority_then_host_header() {
        let req = Request::builder()
            .uri("http://Abs.example:81/x")
            .header(header::HOST, "other")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), "Abs.example:81");
        let req = Request::builder()
            .uri("/x")
            .header(header::HOST, "h.example")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), "h.example");
        let req = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(request_host(&req), "");
    }
}
