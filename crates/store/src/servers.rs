//! The API's servers as a client sees them: one address, or the several servers of a cluster
//! that share one etcd (`https://server-1:7443,https://server-2:7443`). Every server answers
//! the whole API, so a client uses one until it fails, then the next; a request that may be
//! repeated is retried on the next server at once.
//!
//! What counts as failing: no connection (nothing was sent: any request may be retried), a
//! transport error or a timeout after sending, or `502`/`503`/`504` — those three only retried
//! for methods HTTP calls idempotent and that our API makes safe to repeat (`GET`, `HEAD`,
//! `PUT`: every `PUT` replaces a whole value or is a compare-and-swap on a resourceVersion).
//! A `POST` or `DELETE` that may have reached a server is never sent twice: its error is
//! returned, and the next request goes to the next server.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::{Method, StatusCode};

/// How long an attempt that could be retried on another server may take before it is (the
/// last server gets what remains of the request's budget).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// The addresses of the API, and which one is in use. Clones share the choice.
#[derive(Clone)]
pub struct Servers {
    urls: Arc<[Arc<str>]>,
    current: Arc<AtomicUsize>,
}

impl Servers {
    /// `list` is one base URL or several separated by commas; spaces around each and a
    /// trailing `/` are dropped. An empty list keeps one empty address, which every request
    /// then reports as a bad address.
    pub fn parse(list: &str) -> Self {
        let mut urls: Vec<Arc<str>> = list
            .split(',')
            .map(|u| u.trim().trim_end_matches('/'))
            .filter(|u| !u.is_empty())
            .map(Arc::from)
            .collect();
        if urls.is_empty() {
            urls.push(Arc::from(""));
        }
        Self {
            urls: urls.into(),
            current: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The address in use.
    pub fn current(&self) -> Arc<str> {
        let i = self.current.load(Ordering::Relaxed) % self.urls.len();
        self.urls[i].clone()
    }

    /// Every address, in the order given.
    pub fn all(&self) -> &[Arc<str>] {
        &self.urls
    }

    /// The order to try them in for one request: the one in use, then each other once.
    pub fn attempts(&self) -> Vec<(usize, Arc<str>)> {
        let n = self.urls.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        (0..n)
            .map(|k| {
                let i = (first + k) % n;
                (i, self.urls[i].clone())
            })
            .collect()
    }

    /// Server `index` failed: the next one is used from now on — unless another request
    /// already moved on (several failures of one server move the choice once).
    fn failed(&self, index: usize) {
        let n = self.urls.len();
        if n > 1 {
            let _ = self.current.compare_exchange(
                index,
                (index + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// An attempt on server `index`: it counts as failed unless [`Attempt::succeeded`] is
    /// called, so one abandoned by its caller (an outer timeout) moves the client on too.
    pub fn attempt(&self, index: usize) -> Attempt<'_> {
        Attempt {
            servers: self,
            index,
            done: false,
        }
    }
}

impl fmt::Display for Servers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, url) in self.urls.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(url)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Servers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Servers({self})")
    }
}

/// See [`Servers::attempt`].
pub struct Attempt<'a> {
    servers: &'a Servers,
    index: usize,
    done: bool,
}

impl Attempt<'_> {
    pub fn succeeded(mut self) {
        self.done = true;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.servers.failed(self.index);
        }
    }
}

/// Whether a request with `method` may be sent again after it may have reached a server.
pub fn repeatable(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::PUT)
}

/// The header a server's error answers name their reason in (`StoreUnavailable`, …).
pub const REASON_HEADER: &str = "x-flotilla-reason";

/// An answer that says this server cannot serve now and another may: a proxy's or a draining
/// server's `502`/`503`/`504`, but not a `StoreUnavailable` (the store they share is down:
/// every server would answer the same).
pub fn unavailable(status: StatusCode, headers: &hyper::HeaderMap) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    ) && headers
        .get(REASON_HEADER)
        .is_none_or(|r| r.as_bytes() != b"StoreUnavailable")
}

/// Whether a failure of the client stack left the request unsent (no connection was made).
pub fn unsent(error: &hyper_util::client::legacy::Error) -> bool {
    error.is_connect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_trimmed_and_a_failure_moves_on_once() {
        let s = Servers::parse(" https://a:1/, https://b:2 ,,https://c:3");
        assert_eq!(s.to_string(), "https://a:1, https://b:2, https://c:3");
        assert_eq!(&*s.current(), "https://a:1");
        let order: Vec<usize> = s.attempts().into_iter().map(|(i, _)| i).collect();
        assert_eq!(order, [0, 1, 2]);
        // Two requests fail on a: the client moves to b once, not past it.
        s.failed(0);
        s.failed(0);
        assert_eq!(&*s.current(), "https://b:2");
        let order: Vec<usize> = s.attempts().into_iter().map(|(i, _)| i).collect();
        assert_eq!(order, [1, 2, 0]);
        s.failed(1);
        s.failed(2);
        assert_eq!(&*s.current(), "https://a:1");
    }

    #[test]
    fn an_abandoned_attempt_counts_as_failed_a_finished_one_does_not() {
        let s = Servers::parse("http://a,http://b");
        s.attempt(0).succeeded();
        assert_eq!(&*s.current(), "http://a");
        drop(s.attempt(0));
        assert_eq!(&*s.current(), "http://b");
        let one = Servers::parse("http://a");
        one.failed(0);
        assert_eq!(&*one.current(), "http://a");
        assert_eq!(Servers::parse(" , ").all().len(), 1);
    }

    #[test]
    fn only_repeatable_methods_are_sent_twice() {
        assert!(repeatable(&Method::GET) && repeatable(&Method::PUT));
        assert!(!repeatable(&Method::POST) && !repeatable(&Method::DELETE));
        let none = hyper::HeaderMap::new();
        assert!(unavailable(StatusCode::SERVICE_UNAVAILABLE, &none));
        assert!(!unavailable(StatusCode::CONFLICT, &none));
        let mut store_down = hyper::HeaderMap::new();
        store_down.insert(REASON_HEADER, "StoreUnavailable".parse().unwrap());
        assert!(!unavailable(StatusCode::SERVICE_UNAVAILABLE, &store_down));
    }
}
