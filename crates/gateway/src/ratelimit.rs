//! Per-route, per-client-IP token buckets (governor's GCRA) with bounded memory.
//!
//! Keys are client addresses; IPv6 clients are keyed by their /64 (one host usually owns a whole
//! /64 and could otherwise rotate addresses to escape its bucket), IPv4-mapped IPv6 addresses as
//! IPv4.
//!
//! **Memory bound.** governor keeps one small state per key forever unless told otherwise. The
//! store here holds at most `max_keys` clients per route:
//! - the gateway's housekeeping calls [`RouteLimiter::retain_recent`] every few seconds, which
//!   forgets every client whose bucket is full again (indistinguishable from a new client);
//! - when the store is full anyway (a flood of distinct addresses), clients that are not tracked
//!   yet **share one overflow bucket** with the route's quota, while tracked clients keep their
//!   own. Memory stays bounded, a flood gets one client's rate through the overflow in total, and
//!   known clients are unaffected; new legitimate clients are limited along with the flood until
//!   the next sweep frees room. (Refusing every new client would turn the cap into an outage;
//!   evicting tracked clients would let a flood reset their buckets.)

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use flotilla_spec::service::RateLimitSpec;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::{Quota, RateLimiter};

/// Default most clients tracked per route (~100 bytes each).
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// GCRA state (theoretical arrival time, ns since the limiter's start; 0 = fresh).
#[derive(Debug, Default)]
struct Tat(AtomicU64);

impl Tat {
    fn measure_and_replace<T, F, E>(&self, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut prev = self.0.load(Ordering::Acquire);
        loop {
            let old = (prev != 0).then(|| Nanos::new(prev));
            let (result, next) = f(old)?;
            match self.0.compare_exchange_weak(
                prev,
                next.as_u64(),
                Ordering::Release,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(result),
                Err(actual) => prev = actual,
            }
        }
    }
}

/// A governor state store with at most `max_keys` keys and an overflow bucket beyond.
#[derive(Debug)]
pub struct BoundedStore {
    map: DashMap<IpAddr, Tat>,
    max_keys: usize,
    overflow: Tat,
    /// Checks that went to the overflow bucket (shared with the [`RouteLimiter`]).
    overflowed: Arc<AtomicU64>,
}

impl BoundedStore {
    fn new(max_keys: usize, overflowed: Arc<AtomicU64>) -> Self {
        Self {
            map: DashMap::new(),
            max_keys: max_keys.max(1),
            overflow: Tat::default(),
            overflowed,
        }
    }
}

impl StateStore for BoundedStore {
    type Key = IpAddr;

    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.map.get(key) {
            return state.measure_and_replace(f);
        }
        // `len` visits every shard: only paid for clients seen for the first time.
        if self.map.len() >= self.max_keys {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            return self.overflow.measure_and_replace(f);
        }
        let state = self.map.entry(*key).or_default();
        state.measure_and_replace(f)
    }
}

impl ShrinkableKeyedStateStore<IpAddr> for BoundedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = drop_below.as_u64();
        self.map
            .retain(|_, state| state.0.load(Ordering::Relaxed) > drop_below);
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

type Limiter = RateLimiter<
    IpAddr,
    BoundedStore,
    DefaultClock,
    NoOpMiddleware<<DefaultClock as Clock>::Instant>,
>;

/// The rate limiter of one route.
pub struct RouteLimiter {
    spec: RateLimitSpec,
    limiter: Limiter,
    clock: DefaultClock,
    overflowed: Arc<AtomicU64>,
}

impl std::fmt::Debug for RouteLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteLimiter")
            .field("spec", &self.spec)
            .field("clients", &self.limiter.len())
            .finish_non_exhaustive()
    }
}

impl RouteLimiter {
    /// `None` when the spec allows nothing (validation rejects that).
    pub fn new(spec: RateLimitSpec, max_keys: usize) -> Option<Self> {
        let rate = NonZeroU32::new(spec.requests_per_second)?;
        let burst = NonZeroU32::new(spec.burst()).unwrap_or(rate);
        let quota = Quota::per_second(rate).allow_burst(burst);
        let clock = DefaultClock::default();
        let overflowed = Arc::new(AtomicU64::new(0));
        let store = BoundedStore::new(max_keys, overflowed.clone());
        Some(Self {
            spec,
            limiter: RateLimiter::new(quota, store, clock.clone()),
            clock,
            overflowed,
        })
    }

    pub fn spec(&self) -> &RateLimitSpec {
        &self.spec
    }

    /// Admits one request from `client`, or says how long until it would be admitted.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        self.limiter
            .check_key(&limit_key(client))
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets clients whose bucket is full again; returns how many are tracked.
    pub fn retain_recent(&self) -> usize {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.limiter.len()
    }

    /// Clients tracked right now.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }

    /// Checks of untracked clients made while the store was full (shared overflow bucket).
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The bucket key of a client address.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn spec(rps: u32, burst: u32) -> RateLimitSpec {
        RateLimitSpec {
            requests_per_second: rps,
            burst: Some(burst),
        }
    }

    #[test]
    fn burst_then_refusal_with_a_wait() {
        let limiter = RouteLimiter::new(spec(1, 3), 10).unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limiter.check(ip), Ok(()));
        }
        let wait = limiter.check(ip).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(retry_after_secs(wait), 1);
        // Another client has its own bucket.
        assert_eq!(limiter.check("10.0.0.2".parse().unwrap()), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limit_key(a), limit_key(b));
        assert_ne!(limit_key(a), limit_key(c));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(limit_key(mapped), IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_distinct_clients() {
        let cap = 5_000;
        let limiter = RouteLimiter::new(spec(1_000, 1_000), cap).unwrap();
        let known: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(limiter.check(known), Ok(()));
        for i in 0..100_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let _ = limiter.check(ip);
            assert!(limiter.tracked() <= cap);
        }
        assert_eq!(limiter.tracked(), cap);
        assert_eq!(limiter.overflowed(), 100_000 - (cap as u64 - 1));
        // The flood shared one bucket: at most its burst got through, the rest was refused…
        let new_client = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
        assert!(limiter.check(new_client).is_err());
        // …while an already tracked client still has its own bucket.
        assert_eq!(limiter.check(known), Ok(()));
    }

    #[test]
    fn retain_recent_forgets_clients_whose_bucket_refilled() {
        // 1000/s with a burst of 1: a bucket is full again 1 ms after its last request.
        let limiter = RouteLimiter::new(spec(1_000, 1), 100_000).unwrap();
        for i in 0..1_000u32 {
            let _ = limiter.check(IpAddr::V4(Ipv4Addr::from(i)));
        }
        assert_eq!(limiter.tracked(), 1_000);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while limiter.retain_recent() != 0 {
            assert!(std::time::Instant::now() < deadline, "keys never expired");
            std::hint::spin_loop();
        }
    }
}
