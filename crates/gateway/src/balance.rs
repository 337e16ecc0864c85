//! Endpoint state that outlives routing tables, the balancer and passive health.
//!
//! Routing tables are rebuilt every time a service or instance changes, which in a fleet is
//! every few seconds. What the gateway has learnt about an endpoint — requests in flight, latency,
//! consecutive failures, ejection — must not be forgotten at each rebuild, so it lives in an
//! [`EndpointRegistry`] keyed by (instance, address), and each table holds `Arc`s into it. An
//! entry nobody holds any more (no table, no request) is dropped after
//! [`UpstreamPolicy::endpoint_retention`], so a flapping instance keeps its ejection history but a
//! gone one does not leak.
//!
//! **Choice: power of two choices on least in-flight requests.** Two distinct random candidates
//! among the eligible endpoints; the one with fewer requests in flight wins, ties are broken at
//! random. In-flight count is the direct signal of load: a slow or stalled endpoint accumulates
//! in-flight requests and stops being chosen without any tuning, and it is exact (no decay
//! constant, no stale score for an idle endpoint). Peak-EWMA would react earlier to a slow but
//! lightly loaded endpoint, but an endpoint that is not chosen never refreshes its score, so it
//! needs decay tuning to avoid starving recovered endpoints. The latency EWMA is still kept per
//! endpoint (logged on ejection) for operators.
//!
//! **Passive health.** [`UpstreamPolicy::eject_after`] consecutive failures (connect errors,
//! transport errors, 5xx answers) eject an endpoint for `ejection_base × 2^(n-1)` (capped at
//! `ejection_max`), where `n` counts ejections since it was last healthy for a while. At most
//! `max_ejected_fraction` of a route's endpoints are ejected at once; if every candidate is
//! ejected or already tried, ejected ones are used anyway (better a likely failure than a
//! certain 503).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::clock::{coarse_ms, millis};

/// Knobs of balancing, passive health and retries.
#[derive(Debug, Clone)]
pub struct UpstreamPolicy {
    /// Consecutive failures that eject an endpoint.
    pub eject_after: u32,
    /// First ejection time; doubles with each ejection in a row.
    pub ejection_base: Duration,
    /// Longest ejection time.
    pub ejection_max: Duration,
    /// Largest share of a route's endpoints ejected at once (an endpoint is only ejected while
    /// fewer than `floor(n × fraction)` are).
    pub max_ejected_fraction: f64,
    /// Most attempts (endpoints tried) per request.
    pub max_attempts: usize,
    /// Retries may add this fraction of the requests of the last `retry_window`…
    pub retry_ratio: f64,
    /// …plus this many, so a quiet service can still retry.
    pub retry_floor: u32,
    pub retry_window: Duration,
    /// Deadline for the upstream's response head when a route sets no `timeout`.
    pub default_timeout: Duration,
    /// How long the state of an endpoint no table uses is remembered.
    pub endpoint_retention: Duration,
}

impl Default for UpstreamPolicy {
    fn default() -> Self {
        Self {
            eject_after: 5,
            ejection_base: Duration::from_secs(10),
            ejection_max: Duration::from_secs(300),
            max_ejected_fraction: 0.5,
            max_attempts: 3,
            retry_ratio: 0.2,
            retry_floor: 10,
            retry_window: Duration::from_secs(10),
            default_timeout: Duration::from_secs(60),
            endpoint_retention: Duration::from_secs(60),
        }
    }
}

/// What the gateway knows about one upstream endpoint; shared by every table that routes to it.
#[derive(Debug)]
pub struct EndpointState {
    /// Instance name.
    pub instance: String,
    /// `host:port` (`[v6]:port` for IPv6 hosts), ready for a URI authority.
    pub authority: String,
    /// `authority` parsed once for upstream URIs (`None`: not a valid authority).
    uri_authority: Option<http::uri::Authority>,
    in_flight: AtomicU32,
    /// Latency EWMA in microseconds, as `f64` bits.
    ewma_micros: AtomicU64,
    /// Consecutive failures since the last success.
    failures: AtomicU32,
    /// Time ([`coarse_ms`]) until which the endpoint is ejected (0: never ejected). Ejections
    /// and listings are timed on the coarse clock: their times are seconds, and balancing reads
    /// it for every choice.
    ejected_until: AtomicU64,
    /// Ejections in a row (backoff exponent).
    ejections: AtomicU32,
    /// Time ([`coarse_ms`]) when a table last included this endpoint.
    last_listed: AtomicU64,
    /// False once a table without this endpoint is in force (its instance is being stopped,
    /// or unready): a request that matched an older table must not send to it any more.
    routed: AtomicBool,
}

/// Weight of the newest sample in the latency EWMA.
const EWMA_ALPHA: f64 = 0.3;

impl EndpointState {
    fn new(instance: String, authority: String) -> Self {
        Self {
            uri_authority: http::uri::Authority::try_from(authority.as_str()).ok(),
            instance,
            authority,
            in_flight: AtomicU32::new(0),
            ewma_micros: AtomicU64::new(0f64.to_bits()),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            last_listed: AtomicU64::new(0),
            routed: AtomicBool::new(true),
        }
    }

    /// A detached endpoint (tests, tables built without a registry).
    pub fn detached(instance: &str, authority: &str) -> Self {
        Self::new(instance.to_owned(), authority.to_owned())
    }

    /// The authority of upstream request URIs, parsed once.
    pub fn uri_authority(&self) -> Option<&http::uri::Authority> {
        self.uri_authority.as_ref()
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Latency EWMA to the response head.
    pub fn ewma(&self) -> Duration {
        Duration::from_secs_f64(f64::from_bits(self.ewma_micros.load(Ordering::Relaxed)) / 1e6)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.is_ejected_at(coarse_ms())
    }

    fn is_ejected_at(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        // SeqCst: see `start_if_routed`.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            endpoint: self.clone(),
        }
    }

    /// Like [`start`](Self::start), unless the endpoint was taken out of the routing table
    /// since the request matched its route (`None`: nothing was counted, send it elsewhere).
    ///
    /// Draining relies on this: the table swap marks a dropped endpoint unrouted first, then
    /// the drain sees the table without it and waits for its in-flight count to reach zero.
    /// The count is raised before the mark is read, both sequentially consistent, so either
    /// the drain sees this request in flight or this request sees the mark: no request reaches
    /// an instance after its drain ended.
    pub fn start_if_routed(self: &Arc<Self>) -> Option<InFlight> {
        let guard = self.start();
        self.routed.load(Ordering::SeqCst).then_some(guard)
    }

    /// Whether the table in force (or one being built) routes to this endpoint.
    pub fn is_routed(&self) -> bool {
        self.routed.load(Ordering::SeqCst)
    }

    /// Marks the endpoint as no longer routed; done before the table without it is swapped in.
    pub fn set_unrouted(&self) {
        self.routed.store(false, Ordering::SeqCst);
    }

    fn observe_latency(&self, latency: Duration) {
        let sample = latency.as_secs_f64() * 1e6;
        let old = f64::from_bits(self.ewma_micros.load(Ordering::Relaxed));
        let new = if old == 0.0 {
            sample
        } else {
            old + EWMA_ALPHA * (sample - old)
        };
        // Racy read-modify-write: concurrent samples may overwrite each other, which only makes
        // the average a little noisier.
        self.ewma_micros.store(new.to_bits(), Ordering::Relaxed);
    }

    /// The endpoint answered (not 5xx).
    pub fn on_success(&self, latency: Duration, policy: &UpstreamPolicy) {
        self.observe_latency(latency);
        self.on_success_at(coarse_ms(), policy);
    }

    fn on_success_at(&self, now_ms: u64, policy: &UpstreamPolicy) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        // Healthy for a whole base ejection time since coming back: forget the backoff.
        if self.ejections.load(Ordering::Relaxed) != 0 {
            let until = self.ejected_until.load(Ordering::Relaxed);
            if now_ms >= until.saturating_add(millis(policy.ejection_base)) {
                self.ejections.store(0, Ordering::Relaxed);
            }
        }
    }

    /// The endpoint failed (connect or transport error, or a 5xx answer). Returns the ejection
    /// time when this failure ejected it. `peers` are the endpoints of the route the request
    /// came on (this one included), for the ejected-fraction cap.
    pub fn on_failure(
        &self,
        latency: Option<Duration>,
        peers: &[Arc<EndpointState>],
        policy: &UpstreamPolicy,
    ) -> Option<Duration> {
        if let Some(latency) = latency {
            self.observe_latency(latency);
        }
        self.on_failure_at(coarse_ms(), peers, policy)
    }

    fn on_failure_at(
        &self,
        now_ms: u64,
        peers: &[Arc<EndpointState>],
        policy: &UpstreamPolicy,
    ) -> Option<Duration> {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < policy.eject_after.max(1) || self.is_ejected_at(now_ms) {
            return None;
        }
        let ejected = peers.iter().filter(|p| p.is_ejected_at(now_ms)).count();
        let allowed = (peers.len() as f64 * policy.max_ejected_fraction).floor() as usize;
        if ejected >= allowed {
            return None;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let time = policy
            .ejection_base
            .saturating_mul(1u32 << n)
            .min(policy.ejection_max);
        self.ejected_until
            .store(now_ms.saturating_add(millis(time)), Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        Some(time)
    }
}

/// A request in flight on an endpoint; decrements the count when dropped.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<EndpointState>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Endpoint state by (instance, address), shared by successive routing tables.
#[derive(Debug)]
pub struct EndpointRegistry {
    endpoints: Mutex<HashMap<(String, String), Arc<EndpointState>>>,
}

impl Default for EndpointRegistry {
    fn default() -> Self {
        Self {
            endpoints: Mutex::new(HashMap::new()),
        }
    }
}

impl EndpointRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), Arc<EndpointState>>> {
        // Only map operations run under the lock; a poisoned map is still consistent.
        self.endpoints
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state of `instance` at `authority`, created if new; marked as listed now, and as
    /// routed (it is about to be, by the table being built).
    pub fn get(&self, instance: &str, authority: &str) -> Arc<EndpointState> {
        let now = coarse_ms();
        let mut map = self.lock();
        let state = map
            .entry((instance.to_owned(), authority.to_owned()))
            .or_insert_with(|| {
                Arc::new(EndpointState::new(
                    instance.to_owned(),
                    authority.to_owned(),
                ))
            });
        state.last_listed.store(now, Ordering::Relaxed);
        state.routed.store(true, Ordering::SeqCst);
        state.clone()
    }

    /// Forgets endpoints that no table or request holds and that no table listed for
    /// `retention`. Returns how many are left.
    pub fn sweep(&self, retention: Duration) -> usize {
        let now = coarse_ms();
        let mut map = self.lock();
        map.retain(|_, state| {
            Arc::strong_count(state) > 1
                || now.saturating_sub(state.last_listed.load(Ordering::Relaxed)) < millis(retention)
        });
        map.len()
    }

    /// Requests in flight to `instance`, over all its addresses.
    pub fn in_flight_to(&self, instance: &str) -> u32 {
        self.lock()
            .iter()
            .filter(|((name, _), _)| name == instance)
            // SeqCst: see `EndpointState::start_if_routed`.
            .map(|(_, state)| state.in_flight.load(Ordering::SeqCst))
            .sum()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Power of two choices: the index of the endpoint to try next, among those not in `tried`
/// (a bit set over indices; endpoints past 64 are never excluded). Prefers endpoints that are
/// not ejected; falls back to ejected ones when nothing else is left. `None` when every endpoint
/// was tried.
pub fn choose(endpoints: &[Arc<EndpointState>], tried: u64) -> Option<usize> {
    let now = coarse_ms();
    choose_with(endpoints, tried, &mut rand::rng(), |e| e.is_ejected_at(now))
}

fn choose_with(
    endpoints: &[Arc<EndpointState>],
    tried: u64,
    rng: &mut impl rand::Rng,
    ejected: impl Fn(&EndpointState) -> bool,
) -> Option<usize> {
    let untried = |i: usize| i >= 64 || tried & (1 << i) == 0;
    let healthy = |i: usize| untried(i) && !ejected(&endpoints[i]);
    let count_healthy = (0..endpoints.len()).filter(|&i| healthy(i)).count();
    if count_healthy > 0 {
        return Some(p2c(endpoints, count_healthy, healthy, rng));
    }
    let count_untried = (0..endpoints.len()).filter(|&i| untried(i)).count();
    if count_untried > 0 {
        return Some(p2c(endpoints, count_untried, untried, rng));
    }
    None
}

/// P2C over the `count` (> 0) endpoints that satisfy `eligible`.
fn p2c(
    endpoints: &[Arc<EndpointState>],
    count: usize,
    eligible: impl Fn(usize) -> bool,
    rng: &mut impl rand::Rng,
) -> usize {
    let nth = |n: usize| {
        (0..endpoints.len())
            .filter(|&i| eligible(i))
            .nth(n)
            .unwrap_or(0)
    };
    if count == 1 {
        return nth(0);
    }
    let a = rng.random_range(0..count);
    // A second candidate distinct from the first.
    let mut b = rng.random_range(0..count - 1);
    if b >= a {
        b += 1;
    }
    let (a, b) = (nth(a), nth(b));
    let (la, lb) = (endpoints[a].in_flight(), endpoints[b].in_flight());
    match la.cmp(&lb) {
        std::cmp::Ordering::Less => a,
        std::cmp::Ordering::Greater => b,
        // Equal load: the random order of the candidates already breaks the tie.
        std::cmp::Ordering::Equal => a,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn endpoints(n: usize) -> Vec<Arc<EndpointState>> {
        (0..n)
            .map(|i| Arc::new(EndpointState::detached(&format!("e{i}"), "127.0.0.1:1")))
            .collect()
    }

    fn policy() -> UpstreamPolicy {
        UpstreamPolicy {
            eject_after: 3,
            ejection_base: Duration::from_secs(10),
            ejection_max: Duration::from_secs(35),
            ..UpstreamPolicy::default()
        }
    }

    #[test]
    fn an_unrouted_endpoint_takes_no_request_and_counts_none() {
        let registry = EndpointRegistry::default();
        let e = registry.get("web-1", "127.0.0.1:1");
        let other_port = registry.get("web-1", "127.0.0.1:2");
        let guard = e.start_if_routed().expect("routed");
        let _other = other_port.start();
        assert_eq!(registry.in_flight_to("web-1"), 2, "over all its addresses");
        assert_eq!(registry.in_flight_to("web-2"), 0);
        e.set_unrouted();
        assert!(e.start_if_routed().is_none());
        assert_eq!(e.in_flight(), 1, "a refused start leaves no count behind");
        drop(guard);
        assert_eq!(registry.in_flight_to("web-1"), 1);
        // A table that lists it again routes to it again.
        let again = registry.get("web-1", "127.0.0.1:1");
        assert!(Arc::ptr_eq(&again, &e) && e.is_routed());
        assert!(e.start_if_routed().is_some());
    }

    #[test]
    fn p2c_prefers_the_less_loaded_of_two() {
        let eps = endpoints(2);
        let _busy: Vec<_> = (0..5).map(|_| eps[0].start()).collect();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..100 {
            assert_eq!(choose_with(&eps, 0, &mut rng, |_| false), Some(1));
        }
        drop(_busy);
        assert_eq!(eps[0].in_flight(), 0);
    }

    #[test]
    fn p2c_never_picks_the_most_loaded_and_spreads_ties() {
        let eps = endpoints(4);
        let _busy: Vec<_> = (0..3).map(|_| eps[2].start()).collect();
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[choose_with(&eps, 0, &mut rng, |_| false).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0, "{counts:?}");
        for i in [0, 1, 3] {
            assert!(counts[i] > 1000, "{counts:?}");
        }
    }

    #[test]
    fn ejected_and_tried_endpoints_are_avoided_then_used_as_a_last_resort() {
        let eps = endpoints(3);
        let mut rng = StdRng::seed_from_u64(3);
        let ejected = |e: &EndpointState| e.instance == "e0";
        for _ in 0..50 {
            let i = choose_with(&eps, 0b010, &mut rng, ejected).unwrap();
            assert_eq!(i, 2);
        }
        // Only the ejected one is left untried: use it.
        assert_eq!(choose_with(&eps, 0b110, &mut rng, ejected), Some(0));
        assert_eq!(choose_with(&eps, 0b111, &mut rng, ejected), None);
        assert_eq!(choose_with(&[], 0, &mut rng, ejected), None);
    }

    #[test]
    fn ejection_backs_off_caps_and_recovers() {
        let p = policy();
        let eps = endpoints(4);
        let e = &eps[0];
        assert_eq!(e.on_failure_at(0, &eps, &p), None);
        assert_eq!(e.on_failure_at(0, &eps, &p), None);
        assert_eq!(e.on_failure_at(0, &eps, &p), Some(Duration::from_secs(10)));
        assert!(e.is_ejected_at(9_999));
        assert!(!e.is_ejected_at(10_000));
        // Back, fails again: ejected twice as long, then capped.
        for _ in 0..2 {
            assert_eq!(e.on_failure_at(10_000, &eps, &p), None);
        }
        assert_eq!(
            e.on_failure_at(10_000, &eps, &p),
            Some(Duration::from_secs(20))
        );
        for _ in 0..2 {
            e.on_failure_at(30_000, &eps, &p);
        }
        assert_eq!(
            e.on_failure_at(30_000, &eps, &p),
            Some(Duration::from_secs(35))
        );
        // A success soon after coming back keeps the backoff; one a base time later resets it.
        e.on_success_at(65_000, &p);
        assert_ne!(e.ejections.load(Ordering::Relaxed), 0);
        e.on_success_at(75_000, &p);
        assert_eq!(e.ejections.load(Ordering::Relaxed), 0);
        assert_eq!(e.consecutive_failures(), 0);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let p = policy();
        let eps = endpoints(4);
        for _ in 0..10 {
            eps[1].on_failure_at(0, &eps, &p);
            eps[1].on_failure_at(0, &eps, &p);
            eps[1].on_success_at(0, &p);
        }
        assert!(!eps[1].is_ejected_at(0));
    }

    #[test]
    fn at_most_a_fraction_is_ejected() {
        let p = policy();
        let eps = endpoints(5);
        let mut ejected = 0;
        for e in &eps {
            for _ in 0..p.eject_after {
                if e.on_failure_at(0, &eps, &p).is_some() {
                    ejected += 1;
                }
            }
        }
        // floor(5 × 0.5) = 2.
        assert_eq!(ejected, 2);
        assert_eq!(eps.iter().filter(|e| e.is_ejected_at(1)).count(), 2);
        // A single endpoint is never ejected.
        let one = endpoints(1);
        for _ in 0..10 {
            assert_eq!(one[0].on_failure_at(0, &one, &p), None);
        }
    }

    #[test]
    fn registry_keeps_state_across_lookups_and_sweeps_unused_entries() {
        let registry = EndpointRegistry::default();
        let a = registry.get("web-1", "127.0.0.1:1");
        let _guard = a.start();
        let again = registry.get("web-1", "127.0.0.1:1");
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(again.in_flight(), 1);
        // Same instance at a new address is a new endpoint.
        let moved = registry.get("web-1", "127.0.0.1:2");
        assert!(!Arc::ptr_eq(&a, &moved));
        drop((again, moved));
        // Held entries stay; unheld ones go once the retention has passed.
        assert_eq!(registry.sweep(Duration::from_secs(60)), 2);
        assert_eq!(registry.sweep(Duration::ZERO), 1);
        drop(_guard);
        drop(a);
        assert_eq!(registry.sweep(Duration::ZERO), 0);
    }

    proptest! {
        #[test]
        fn choice_is_untried_and_prefers_healthy_and_lighter(
            loads in prop::collection::vec(0u32..4, 0..10),
            ejected_mask in any::<u64>(),
            tried in any::<u64>(),
            seed in any::<u64>(),
        ) {
            let eps = endpoints(loads.len());
            let mut guards = Vec::new();
            for (e, &load) in eps.iter().zip(&loads) {
                for _ in 0..load {
                    guards.push(e.start());
                }
            }
            let is_ejected = |e: &EndpointState| {
                let i: usize = e.instance[1..].parse().unwrap_or(0);
                ejected_mask & (1 << i) != 0
            };
            let mut rng = StdRng::seed_from_u64(seed);
            let untried: Vec<usize> = (0..eps.len()).filter(|i| tried & (1 << i) == 0).collect();
            let healthy: Vec<usize> = untried
                .iter()
                .copied()
                .filter(|&i| ejected_mask & (1 << i) == 0)
                .collect();
            match choose_with(&eps, tried, &mut rng, is_ejected) {
                None => prop_assert!(untried.is_empty()),
                Some(i) => {
                    prop_assert!(untried.contains(&i));
                    let pool = if healthy.is_empty() { &untried } else { &healthy };
                    prop_assert!(pool.contains(&i));
                    // Never the unique most loaded of a pool of two or more.
                    let max = pool.iter().map(|&j| loads[j]).max().unwrap_or(0);
                    let at_max = pool.iter().filter(|&&j| loads[j] == max).count();
                    if pool.len() >= 2 && at_max == 1 {
                        prop_assert!(loads[i] < max);
                    }
                }
            }
        }
    }
}
