//! Route identity and matching rules shared by validation and the gateway: one definition, so
//! what validation calls a duplicate is exactly what the gateway would merge.

use std::borrow::Cow;
use std::fmt;

use crate::service::RouteSpec;

/// What identifies a route: normalized host (`None` for any host), normalized path prefix, and
/// header conditions with lower-cased names, sorted. Two routes with equal keys match exactly
/// the same requests.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub host: Option<String>,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl RouteKey {
    pub fn of(route: &RouteSpec) -> Self {
        let host = route
            .host
            .as_deref()
            .map(normalize_host)
            .filter(|h| !h.is_empty());
        let mut headers: Vec<(String, String)> = route
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        headers.sort();
        Self {
            host,
            path: normalize_prefix(&route.path),
            headers,
        }
    }
}

impl fmt::Display for RouteKey {
    /// `host/path` (`*` for any host), then `[name=value, …]` when headers are matched.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.host.as_deref().unwrap_or("*"), self.path)?;
        if !self.headers.is_empty() {
            let headers: Vec<String> = self
                .headers
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            write!(f, " [{}]", headers.join(", "))?;
        }
        Ok(())
    }
}

/// Lower-cases a host and drops a `:port` and a trailing dot (`[::1]:80` → `[::1]`).
pub fn normalize_host(host: &str) -> String {
    normalized_host(host).into_owned()
}

/// [`normalize_host`], borrowing `host` when it is already in normal form (the usual case: no
/// allocation on the request path).
pub fn normalized_host(host: &str) -> Cow<'_, str> {
    let host = host.trim();
    let bytes = host.as_bytes();
    // One pass over the bytes (this runs on every request): where the name ends, and whether it
    // has capitals.
    let (mut colons, mut last_colon, mut upper) = (0usize, 0usize, false);
    let mut end = bytes.len();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b':' => {
                colons += 1;
                last_colon = i;
            }
            // IPv6 literal: keep up to the closing bracket.
            b']' if bytes[0] == b'[' => {
                end = i + 1;
                break;
            }
            b'A'..=b'Z' => upper = true,
            _ => {}
        }
    }
    // Only a port after the last colon (a bare IPv6 address has several colons).
    if bytes.first() != Some(&b'[')
        && colons == 1
        && bytes[last_colon + 1..].iter().all(u8::is_ascii_digit)
    {
        end = last_colon;
    }
    let mut host = &host[..end];
    if let Some(name) = host.strip_suffix('.') {
        host = name;
    }
    if upper {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// A route prefix in canonical form: a leading `/`, no trailing `/` (except the root), no empty
/// segments.
pub fn normalize_prefix(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 1);
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// True when `prefix` (normalized) matches `path` on whole segments.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn route(host: Option<&str>, path: &str, headers: &[(&str, &str)]) -> RouteSpec {
        RouteSpec {
            host: host.map(str::to_owned),
            path: path.to_owned(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            ..RouteSpec::default()
        }
    }

    #[test]
    fn routes_that_match_the_same_requests_have_one_key() {
        let same = [
            route(None, "/a/b", &[]),
            route(None, "/a//b", &[]),
            route(None, "/a/b/", &[]),
            route(Some(""), "a/b", &[]),
        ];
        for r in &same {
            assert_eq!(RouteKey::of(r), RouteKey::of(&same[0]), "{r:?}");
        }
        assert_eq!(
            RouteKey::of(&route(Some("Example.COM."), "/", &[("X-Env", "a")])),
            RouteKey::of(&route(Some("example.com"), "", &[("x-env", "a")]))
        );
        assert_ne!(
            RouteKey::of(&route(None, "/a", &[])),
            RouteKey::of(&route(None, "/ab", &[]))
        );
        assert_ne!(
            RouteKey::of(&route(None, "/a", &[("x", "1")])),
            RouteKey::of(&route(None, "/a", &[("x", "2")]))
        );
        assert_eq!(
            RouteKey::of(&route(Some("a.example"), "/x//", &[("B", "1"), ("a", "2")])).to_string(),
            "a.example/x [a=2, b=1]"
        );
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("::1"), "::1");
        assert_eq!(normalize_host(""), "");
        assert_eq!(normalize_host("a.b:"), "a.b");
        assert_eq!(normalize_host(" a.B.:80 "), "a.b");
        assert_eq!(normalize_host("[FE80::A]:443"), "[fe80::a]");
        assert_eq!(normalize_host("[::1"), "[::1");
        assert_eq!(normalize_host("a.b:8x"), "a.b:8x");
        assert!(matches!(
            normalized_host("api.example.com:8080"),
            Cow::Borrowed("api.example.com")
        ));
    }

    #[test]
    fn prefix_normalization_and_segments() {
        assert_eq!(normalize_prefix(""), "/");
        assert_eq!(normalize_prefix("/"), "/");
        assert_eq!(normalize_prefix("/api/"), "/api");
        assert_eq!(normalize_prefix("api//v1"), "/api/v1");
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(!prefix_matches("/api", "/"));
        assert!(prefix_matches("/", "/anything"));
    }
}
