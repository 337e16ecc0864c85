//! The routing table: a pure function of the stored Services and Instances (plus the state that
//! survives rebuilds: endpoint health, rate-limit buckets, retry budgets).
//!
//! [`RouteTable::build_with`] turns every Service's routes into [`Route`]s carrying the states of
//! the service's routable instances; [`RouteTable::lookup_request`] picks the route for a
//! request. Neither does IO, so both are unit- and property-tested; the gateway rebuilds the
//! table on every store change and swaps it in atomically. A request keeps the `Arc<Route>` it
//! matched until it ends, so a swap never cuts it.
//!
//! Matching rules:
//! - hosts compare case-insensitively, without a `:port` and without a trailing dot;
//! - host classes, most specific first: the exact host, then wildcards (`*.example.com` matches
//!   `a.example.com` and `a.b.example.com`, not `example.com`; the longest suffix first), then
//!   any-host routes. A class is only left when none of its routes matches the path and headers;
//! - within a class, the longest path prefix wins; for the same prefix, a route with header
//!   conditions (all present with exactly the given values) beats one without, and more
//!   conditions beat fewer;
//! - prefixes match whole segments: `/api` matches `/api` and `/api/x`, not `/apix`
//!   (`/api/` is the same prefix as `/api`; `/` matches every path);
//! - when two services claim the same host, path and headers, the one whose name sorts first
//!   wins and the clash is reported in [`RouteTable::conflicts`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_spec::object::{Instance, Service};
use flotilla_spec::service::{RateLimitSpec, UpstreamProtocol};
use flotilla_store::lock;
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

pub use crate::balance::EndpointState as Endpoint;
use crate::balance::{EndpointRegistry, UpstreamPolicy};
use crate::ratelimit::{DEFAULT_MAX_KEYS, RouteLimiter};
use crate::retry::RetryBudget;

/// A route with the endpoints it currently balances over.
#[derive(Debug)]
pub struct Route {
    /// Owning service (also the `route` label of the gateway's metrics).
    pub service: String,
    /// Normalized host (`*.example.com` for a wildcard); `None` matches any host.
    pub host: Option<String>,
    /// Normalized path prefix (`/` or `/a/b`, never a trailing `/`).
    pub path: String,
    /// Header conditions, all of which must hold.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Named port the endpoints listen on (`None` when the service has no port at all).
    pub port: Option<String>,
    /// What replaces the matched prefix upstream (`strip_prefix` is `Some("/")`).
    pub rewrite: Option<String>,
    /// Deadline for the upstream's response head (retries included).
    pub timeout: Option<Duration>,
    pub redirect_https: bool,
    pub upstream: UpstreamProtocol,
    pub rate_limit: Option<Arc<RouteLimiter>>,
    /// Shared by every route of the service.
    pub retry_budget: Arc<RetryBudget>,
    /// Ready endpoints, in instance-name order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// This route's metric handles, resolved on its first request.
    pub metrics: crate::metrics::RouteMetrics,
}

impl Route {
    /// Whether the request's headers satisfy the route's header conditions.
    pub fn headers_match(&self, headers: &HeaderMap) -> bool {
        self.headers
            .iter()
            .all(|(name, value)| headers.get_all(name).iter().any(|v| v == value))
    }

    /// The path (and query) to send upstream for a request `path` this route matched.
    pub fn upstream_path(&self, path: &str) -> String {
        let Some(replacement) = &self.rewrite else {
            return path.to_owned();
        };
        let rest = if self.path == "/" {
            path
        } else {
            path.get(self.path.len()..).unwrap_or_default()
        };
        let mut out = String::with_capacity(replacement.len() + rest.len() + 1);
        out.push_str(replacement.trim_end_matches('/'));
        if rest.is_empty() || !rest.starts_with('/') {
            out.push('/');
        }
        out.push_str(rest);
        if out.len() > 1 && rest.is_empty() && !replacement.ends_with('/') {
            // `/api` → rewrite `/v2`: keep `/v2`, not `/v2/`.
            out.pop();
        }
        out
    }
}

/// The outcome of a lookup.
#[derive(Debug, Clone)]
pub enum Match {
    /// No route matches the host and path (404).
    NoRoute,
    /// A route matches but its service has no ready instance (503).
    NoReadyEndpoint(Arc<Route>),
    /// A route with at least one endpoint.
    Ready(Arc<Route>),
}

impl Match {
    /// The matched route, if any.
    pub fn route(&self) -> Option<&Arc<Route>> {
        match self {
            Match::NoRoute => None,
            Match::NoReadyEndpoint(route) | Match::Ready(route) => Some(route),
        }
    }
}

/// Two services claiming the same host, path and headers; `winner` (first by name) gets the
/// traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConflict {
    pub host: Option<String>,
    pub path: String,
    pub winner: String,
    pub loser: String,
}

pub use flotilla_spec::route::{
    RouteKey, normalize_host, normalize_prefix, normalized_host, prefix_matches,
};

/// What outlives a routing table: endpoint state, rate limiters per route, retry budgets per
/// service. Entries no table holds are dropped by [`TableState::sweep`].
#[derive(Debug)]
pub struct TableState {
    pub policy: UpstreamPolicy,
    pub endpoints: EndpointRegistry,
    /// Most clients tracked by one route's rate limiter.
    pub max_rate_limit_keys: usize,
    limiters: Mutex<HashMap<(String, RouteKey), Arc<RouteLimiter>>>,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
}

impl Default for TableState {
    fn default() -> Self {
        Self::new(UpstreamPolicy::default())
    }
}

impl TableState {
    pub fn new(policy: UpstreamPolicy) -> Self {
        Self {
            policy,
            endpoints: EndpointRegistry::default(),
            max_rate_limit_keys: DEFAULT_MAX_KEYS,
            limiters: Mutex::new(HashMap::new()),
            budgets: Mutex::new(HashMap::new()),
        }
    }

    fn limiter(
        &self,
        service: &str,
        key: &RouteKey,
        spec: RateLimitSpec,
    ) -> Option<Arc<RouteLimiter>> {
        let mut limiters = lock(&self.limiters);
        let k = (service.to_owned(), key.clone());
        if let Some(existing) = limiters.get(&k)
            && *existing.spec() == spec
        {
            return Some(existing.clone());
        }
        let limiter = Arc::new(RouteLimiter::new(spec, self.max_rate_limit_keys)?);
        limiters.insert(k, limiter.clone());
        Some(limiter)
    }

    fn budget(&self, service: &str) -> Arc<RetryBudget> {
        lock(&self.budgets)
            .entry(service.to_owned())
            .or_insert_with(|| {
                Arc::new(RetryBudget::new(
                    self.policy.retry_ratio,
                    self.policy.retry_floor,
                    self.policy.retry_window,
                ))
            })
            .clone()
    }

    /// Every rate limiter in use.
    pub fn limiters(&self) -> Vec<Arc<RouteLimiter>> {
        lock(&self.limiters).values().cloned().collect()
    }

    /// Housekeeping: forgets what no table holds any more (endpoints after the retention),
    /// and lets rate limiters forget clients whose buckets refilled. Returns the number of
    /// rate-limited clients still tracked.
    pub fn sweep(&self) -> usize {
        self.endpoints.sweep(self.policy.endpoint_retention);
        lock(&self.budgets).retain(|_, b| Arc::strong_count(b) > 1);
        let limiters: Vec<Arc<RouteLimiter>> = {
            let mut map = lock(&self.limiters);
            map.retain(|_, l| Arc::strong_count(l) > 1);
            map.values().cloned().collect()
        };
        // Outside the lock: a sweep visits every tracked client.
        limiters.iter().map(|l| l.retain_recent()).sum()
    }
}

type HostMap = HashMap<String, Vec<Arc<Route>>, fnv::FnvBuildHasher>;

/// An immutable routing table; build a new one for every change.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Routes per normalized exact host, most specific first. FNV-hashed: looked up on every
    /// request; its keys come from the config and a client's host is only looked up, never
    /// inserted, so a hostile host cannot lengthen a probe beyond what the config built.
    by_host: HostMap,
    /// Routes per wildcard suffix (`example.com` for `*.example.com`), most specific first.
    wildcard: HostMap,
    /// Any-host routes, most specific first.
    any_host: Vec<Arc<Route>>,
    conflicts: Vec<RouteConflict>,
}

impl RouteTable {
    /// [`build_with`](Self::build_with) a fresh state (tests, one-off tables).
    pub fn build<'a, S, I>(services: S, instances: I) -> RouteTable
    where
        S: IntoIterator<Item = &'a Service>,
        I: IntoIterator<Item = &'a Instance>,
    {
        Self::build_with(services, instances, &TableState::default())
    }

    /// Builds the table from every Service's routes and the routable Instances, taking the
    /// endpoints', rate limiters' and retry budgets' state from `state`.
    ///
    /// An instance is an endpoint of a route when it belongs to the route's service,
    /// [`Instance::is_routable`] holds, and it reports a `status.host` and a host port for the
    /// route's port (the route's `port`, else the service's first port).
    pub fn build_with<'a, S, I>(services: S, instances: I, state: &TableState) -> RouteTable
    where
        S: IntoIterator<Item = &'a Service>,
        I: IntoIterator<Item = &'a Instance>,
    {
        let mut services: Vec<&Service> = services.into_iter().collect();
        services.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

        // Routable instances per service, in name order.
        let mut instances_by_service: HashMap<&str, Vec<&Instance>> = HashMap::new();
        for instance in instances {
            if instance.is_routable() && instance.status.host.is_some() {
                instances_by_service
                    .entry(instance.spec.service.as_str())
                    .or_default()
                    .push(instance);
            }
        }
        for list in instances_by_service.values_mut() {
            list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        }

        // key -> route; the first service by name keeps a contested key.
        let mut routes: BTreeMap<RouteKey, Route> = BTreeMap::new();
        let mut conflicts = Vec::new();
        for service in services {
            let name = &service.metadata.name;
            let ready = instances_by_service
                .get(name.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            for spec in &service.spec.routes {
                let key = RouteKey::of(spec);
                let (host, path) = (key.host.clone(), key.path.clone());
                // Validation rejects bad names and values; a stored object that slipped through
                // gets a condition that never holds rather than none.
                let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
                let mut impossible = false;
                for (k, v) in &spec.headers {
                    match (
                        HeaderName::from_bytes(k.as_bytes()),
                        HeaderValue::from_str(v),
                    ) {
                        (Ok(name), Ok(value)) => headers.push((name, value)),
                        _ => impossible = true,
                    }
                }
                if impossible {
                    tracing::warn!(service = %name, path = %path, "route has an invalid header condition; it matches nothing");
                    continue;
                }
                if let Some(existing) = routes.get(&key) {
                    if existing.service != *name {
                        conflicts.push(RouteConflict {
                            host,
                            path,
                            winner: existing.service.clone(),
                            loser: name.clone(),
                        });
                    }
                    continue;
                }
                let port = spec
                    .port
                    .clone()
                    .or_else(|| service.spec.ports.first().cloned());
                let endpoints = port
                    .as_deref()
                    .map(|port| endpoints_for(ready, port, &state.endpoints))
                    .unwrap_or_default();
                let rewrite = if spec.strip_prefix {
                    Some("/".to_owned())
                } else {
                    spec.rewrite.clone()
                };
                let rate_limit = spec
                    .rate_limit
                    .and_then(|limit| state.limiter(name, &key, limit));
                routes.insert(
                    key,
                    Route {
                        service: name.clone(),
                        host,
                        path,
                        headers,
                        port,
                        rewrite,
                        timeout: spec.timeout.map(|t| t.0),
                        redirect_https: spec.redirect_https,
                        upstream: spec.upstream,
                        rate_limit,
                        retry_budget: state.budget(name),
                        endpoints,
                        metrics: Default::default(),
                    },
                );
            }
        }

        let mut table = RouteTable {
            conflicts,
            ..RouteTable::default()
        };
        for route in routes.into_values() {
            let route = Arc::new(route);
            match route.host.as_deref() {
                Some(host) => match host.strip_prefix("*.") {
                    Some(suffix) => table
                        .wildcard
                        .entry(suffix.to_owned())
                        .or_default()
                        .push(route),
                    None => table
                        .by_host
                        .entry(host.to_owned())
                        .or_default()
                        .push(route),
                },
                None => table.any_host.push(route),
            }
        }
        // Longest prefix first; for one prefix, more header conditions first.
        let most_specific_first = |a: &Arc<Route>, b: &Arc<Route>| {
            b.path
                .len()
                .cmp(&a.path.len())
                .then(b.headers.len().cmp(&a.headers.len()))
        };
        for list in table.by_host.values_mut() {
            list.sort_by(most_specific_first);
        }
        for list in table.wildcard.values_mut() {
            list.sort_by(most_specific_first);
        }
        table.any_host.sort_by(most_specific_first);
        table
    }

    /// The route for a request's `host` (a `Host` header or URI authority, any case, with or
    /// without `:port`; empty if the request has none) and `path`, ignoring header conditions'
    /// routes (as for a request without headers).
    pub fn lookup(&self, host: &str, path: &str) -> Match {
        self.lookup_request(host, path, &HeaderMap::new())
    }

    /// The route for a request's host, path and headers.
    pub fn lookup_request(&self, host: &str, path: &str, headers: &HeaderMap) -> Match {
        let host = normalized_host(host);
        let find = |routes: &[Arc<Route>]| {
            routes
                .iter()
                .find(|r| prefix_matches(&r.path, path) && r.headers_match(headers))
                .cloned()
        };
        let mut found = self.by_host.get(&*host).and_then(|routes| find(routes));
        if found.is_none() && !self.wildcard.is_empty() {
            // Suffixes after each dot, longest first: a.b.example.com → b.example.com, …
            let mut rest: &str = &host;
            while let Some((_, suffix)) = rest.split_once('.') {
                if let Some(route) = self.wildcard.get(suffix).and_then(|routes| find(routes)) {
                    found = Some(route);
                    break;
                }
                rest = suffix;
            }
        }
        match found.or_else(|| find(&self.any_host)) {
            None => Match::NoRoute,
            Some(route) if route.endpoints.is_empty() => Match::NoReadyEndpoint(route),
            Some(route) => Match::Ready(route),
        }
    }

    /// This table's version of `route` (taken from an older table): the route of the same
    /// service with the same host, path and header conditions, and the same upstream
    /// rewriting, port and protocol (so a request prepared for `route` can be sent to its
    /// endpoints as it is). `None` when the route is gone or changed.
    pub fn same_route(&self, route: &Route) -> Option<Arc<Route>> {
        let candidates = match route.host.as_deref() {
            None => &self.any_host,
            Some(host) => match host.strip_prefix("*.") {
                Some(suffix) => self.wildcard.get(suffix)?,
                None => self.by_host.get(host)?,
            },
        };
        candidates
            .iter()
            .find(|r| {
                r.service == route.service
                    && r.host == route.host
                    && r.path == route.path
                    && r.headers == route.headers
                    && r.rewrite == route.rewrite
                    && r.port == route.port
                    && r.upstream == route.upstream
            })
            .cloned()
    }

    /// Every endpoint of every route (an endpoint of several routes appears once per route).
    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.routes().flat_map(|r| r.endpoints.iter())
    }

    /// Every route, host routes first (hosts in no particular order).
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_host
            .values()
            .flatten()
            .chain(self.wildcard.values().flatten())
            .chain(&self.any_host)
    }

    /// Clashing routes found while building.
    pub fn conflicts(&self) -> &[RouteConflict] {
        &self.conflicts
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty() && self.wildcard.is_empty() && self.any_host.is_empty()
    }
}

fn endpoints_for(
    instances: &[&Instance],
    port: &str,
    registry: &EndpointRegistry,
) -> Vec<Arc<Endpoint>> {
    instances
        .iter()
        .filter_map(|instance| {
            let host = instance.status.host.as_deref()?.trim();
            let number = *instance.status.ports.get(port)?;
            if host.is_empty() || number == 0 {
                return None;
            }
            Some(registry.get(&instance.metadata.name, &authority(host, number)))
        })
        .collect()
}

/// `host:port`, bracketing a bare IPv6 address.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use flotilla_spec::object::{InstanceSpec, InstanceStatus, ObjectMeta, Phase};
    use flotilla_spec::service::{RouteSpec, ServiceSpec};
    use proptest::prelude::*;

    use super::*;

    fn spec(ports: &[&str], routes: Vec<RouteSpec>) -> ServiceSpec {
        let mut spec: ServiceSpec =
            serde_json::from_value(serde_json::json!({ "command": "demo" })).unwrap();
        spec.ports = ports.iter().map(|p| p.to_string()).collect();
        spec.routes = routes;
        spec
    }

    fn route(host: Option<&str>, path: &str) -> RouteSpec {
        RouteSpec {
            host: host.map(str::to_string),
            path: path.to_string(),
            ..RouteSpec::default()
        }
    }

    fn service(name: &str, routes: Vec<RouteSpec>) -> Service {
        Service {
            metadata: ObjectMeta::named(name),
            spec: spec(&["http"], routes),
            status: Default::default(),
        }
    }

    fn instance(name: &str, service: &str, port: u16, ready: bool) -> Instance {
        Instance {
            metadata: ObjectMeta::named(name),
            spec: InstanceSpec {
                service: service.to_string(),
                node: "local".to_string(),
                spec_hash: "h".to_string(),
                template: spec(&["http"], vec![]),
            },
            status: InstanceStatus {
                phase: Phase::Running,
                ready,
                host: Some("127.0.0.1".to_string()),
                ports: BTreeMap::from([("http".to_string(), port)]),
                ..Default::default()
            },
        }
    }

    fn service_of(table: &RouteTable, host: &str, path: &str) -> Option<String> {
        table.lookup(host, path).route().map(|r| r.service.clone())
    }

    #[test]
    fn same_route_finds_a_routes_version_in_a_newer_table() {
        let state = TableState::default();
        let services = [
            service("web", vec![route(Some("web.test"), "/api")]),
            service("any", vec![route(None, "/")]),
            service("wild", vec![route(Some("*.wild.test"), "/")]),
        ];
        let old = RouteTable::build_with(
            &services,
            &[
                instance("web-1", "web", 1, true),
                instance("any-1", "any", 2, true),
            ],
            &state,
        );
        let new = RouteTable::build_with(
            &services,
            &[
                instance("web-2", "web", 3, true),
                instance("wild-2", "wild", 4, true),
            ],
            &state,
        );
        for r in old.routes() {
            let found = new.same_route(r).expect("same route");
            assert_eq!(
                (&found.service, &found.host, &found.path),
                (&r.service, &r.host, &r.path)
            );
        }
        let web = old
            .lookup("web.test", "/api")
            .route()
            .cloned()
            .expect("web");
        let names: Vec<_> = new
            .same_route(&web)
            .expect("web")
            .endpoints
            .iter()
            .map(|e| e.instance.clone())
            .collect();
        assert_eq!(names, ["web-2"]);
        // A route whose path changed is another route.
        let moved = RouteTable::build_with(
            &[service("web", vec![route(Some("web.test"), "/v2")])],
            &[instance("web-2", "web", 3, true)],
            &state,
        );
        assert!(moved.same_route(&web).is_none());
        assert!(RouteTable::default().same_route(&web).is_none());
    }

    #[test]
    fn longest_prefix_wins_and_exact_host_beats_any_host() {
        let services = vec![
            service("root", vec![route(None, "/")]),
            service("api", vec![route(None, "/api")]),
            service("apiv2", vec![route(None, "/api/v2/")]),
            service("shop", vec![route(Some("Shop.Example.com"), "/")]),
        ];
        let table = RouteTable::build(&services, &[]);
        assert_eq!(service_of(&table, "x", "/"), Some("root".into()));
        assert_eq!(service_of(&table, "x", "/apix"), Some("root".into()));
        assert_eq!(service_of(&table, "x", "/api"), Some("api".into()));
        assert_eq!(service_of(&table, "x", "/api/v1"), Some("api".into()));
        assert_eq!(service_of(&table, "x", "/api/v2"), Some("apiv2".into()));
        assert_eq!(service_of(&table, "x", "/api/v2/z"), Some("apiv2".into()));
        // The host route wins even over a longer any-host prefix.
        assert_eq!(
            service_of(&table, "shop.example.COM:8443", "/api/v2"),
            Some("shop".into())
        );
        assert_eq!(table.routes().count(), 4);
    }

    #[test]
    fn host_routes_fall_back_to_any_host_when_no_path_matches() {
        let services = vec![
            service("shop-api", vec![route(Some("shop"), "/api")]),
            service("root", vec![route(None, "/")]),
        ];
        let table = RouteTable::build(&services, &[]);
        assert_eq!(
            service_of(&table, "shop", "/api/x"),
            Some("shop-api".into())
        );
        assert_eq!(service_of(&table, "shop", "/other"), Some("root".into()));

        let only_host = vec![service("shop-api", vec![route(Some("shop"), "/api")])];
        let table = RouteTable::build(&only_host, &[]);
        assert!(matches!(table.lookup("other", "/api"), Match::NoRoute));
        assert!(matches!(table.lookup("", "/api"), Match::NoRoute));
    }

    #[test]
    fn endpoints_are_routable_instances_with_a_port() {
        let services = vec![service("web", vec![route(None, "/")])];
        let mut not_running = instance("web-4", "web", 9004, true);
        not_running.status.phase = Phase::Starting;
        let mut deleting = instance("web-5", "web", 9005, true);
        deleting.metadata.deletion_timestamp = Some("2026-01-01T00:00:00Z".into());
        let mut no_port = instance("web-6", "web", 9006, true);
        no_port.status.ports.clear();
        let mut v6 = instance("web-7", "web", 9007, true);
        v6.status.host = Some("::1".into());
        let instances = vec![
            instance("web-2", "web", 9002, true),
            instance("web-1", "web", 9001, true),
            instance("web-3", "web", 9003, false),
            instance("other-1", "other", 9100, true),
            not_running,
            deleting,
            no_port,
            v6,
        ];
        let table = RouteTable::build(&services, &instances);
        let Match::Ready(route) = table.lookup("h", "/") else {
            panic!("expected a ready route");
        };
        let authorities: Vec<_> = route
            .endpoints
            .iter()
            .map(|e| e.authority.as_str())
            .collect();
        assert_eq!(
            authorities,
            ["127.0.0.1:9001", "127.0.0.1:9002", "[::1]:9007"]
        );
    }

    #[test]
    fn route_port_selects_the_named_port() {
        let mut svc = service("web", vec![]);
        svc.spec.ports = vec!["http".into(), "admin".into()];
        svc.spec.routes = vec![
            route(None, "/"),
            RouteSpec {
                path: "/admin".into(),
                port: Some("admin".into()),
                ..RouteSpec::default()
            },
        ];
        let mut inst = instance("web-1", "web", 9001, true);
        inst.status.ports.insert("admin".into(), 9901);
        let table = RouteTable::build(&[svc], &[inst]);
        let authority = |path| match table.lookup("h", path) {
            Match::Ready(route) => route.endpoints[0].authority.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(authority("/"), "127.0.0.1:9001");
        assert_eq!(authority("/admin/x"), "127.0.0.1:9901");
    }

    #[test]
    fn no_ready_instance_is_distinct_from_no_route() {
        let services = vec![service("web", vec![route(None, "/web")])];
        let instances = vec![instance("web-1", "web", 9001, false)];
        let table = RouteTable::build(&services, &instances);
        match table.lookup("h", "/web") {
            Match::NoReadyEndpoint(route) => assert_eq!(route.service, "web"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(table.lookup("h", "/"), Match::NoRoute));
        assert!(RouteTable::build(&[], &[]).is_empty());
    }

    #[test]
    fn conflicting_routes_go_to_the_first_service_by_name() {
        let services = vec![
            service("zeta", vec![route(Some("a"), "/x/")]),
            service(
                "alpha",
                vec![route(Some("A"), "/x"), route(Some("a"), "/x")],
            ),
        ];
        let table = RouteTable::build(&services, &[]);
        assert_eq!(service_of(&table, "a", "/x"), Some("alpha".into()));
        assert_eq!(
            table.conflicts(),
            [RouteConflict {
                host: Some("a".into()),
                path: "/x".into(),
                winner: "alpha".into(),
                loser: "zeta".into(),
            }]
        );
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any_host() {
        let services = vec![
            service("any", vec![route(None, "/")]),
            service("wild", vec![route(Some("*.example.com"), "/")]),
            service("deep", vec![route(Some("*.eu.example.com"), "/api")]),
            service("exact", vec![route(Some("shop.example.com"), "/")]),
        ];
        let table = RouteTable::build(&services, &[]);
        assert_eq!(
            service_of(&table, "shop.example.com", "/x"),
            Some("exact".into())
        );
        assert_eq!(
            service_of(&table, "Blog.Example.com:80", "/x"),
            Some("wild".into())
        );
        assert_eq!(
            service_of(&table, "a.b.example.com", "/"),
            Some("wild".into())
        );
        // The longer wildcard suffix first, falling back to the shorter when its paths miss.
        assert_eq!(
            service_of(&table, "x.eu.example.com", "/api/1"),
            Some("deep".into())
        );
        assert_eq!(
            service_of(&table, "x.eu.example.com", "/web"),
            Some("wild".into())
        );
        // A wildcard does not match the bare domain.
        assert_eq!(service_of(&table, "example.com", "/"), Some("any".into()));
        assert_eq!(service_of(&table, "other.org", "/"), Some("any".into()));
    }

    #[test]
    fn header_routes_beat_the_same_prefix_without_headers() {
        let mut canary = route(None, "/api");
        canary.headers.insert("X-Canary".into(), "1".into());
        let services = vec![
            service("stable", vec![route(None, "/api")]),
            service("canary", vec![canary]),
            service("deeper", vec![route(None, "/api/v2")]),
        ];
        let table = RouteTable::build(&services, &[]);
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            h
        };
        let lookup = |path, headers: &HeaderMap| {
            table
                .lookup_request("h", path, headers)
                .route()
                .map(|r| r.service.clone())
        };
        assert_eq!(lookup("/api/x", &with(&[])), Some("stable".into()));
        assert_eq!(
            lookup("/api/x", &with(&[("x-canary", "1")])),
            Some("canary".into())
        );
        assert_eq!(
            lookup("/api/x", &with(&[("x-canary", "2")])),
            Some("stable".into())
        );
        // Any of several values of the header may match.
        assert_eq!(
            lookup("/api/x", &with(&[("x-canary", "0"), ("x-canary", "1")])),
            Some("canary".into())
        );
        // A longer prefix still wins over a header route.
        assert_eq!(
            lookup("/api/v2/x", &with(&[("x-canary", "1")])),
            Some("deeper".into())
        );
        assert!(table.conflicts().is_empty());
    }

    #[test]
    fn strip_and_rewrite_replace_the_matched_prefix() {
        let built = |path: &str, strip: bool, rewrite: Option<&str>| {
            let mut r = route(None, path);
            r.strip_prefix = strip;
            r.rewrite = rewrite.map(str::to_string);
            let table = RouteTable::build(&[service("s", vec![r])], &[]);
            table.lookup("h", path).route().cloned().unwrap()
        };
        let strip = built("/api", true, None);
        assert_eq!(strip.upstream_path("/api/x/y"), "/x/y");
        assert_eq!(strip.upstream_path("/api"), "/");
        assert_eq!(strip.upstream_path("/api/"), "/");
        let rewrite = built("/api", false, Some("/v2"));
        assert_eq!(rewrite.upstream_path("/api/x"), "/v2/x");
        assert_eq!(rewrite.upstream_path("/api"), "/v2");
        let slash = built("/api", false, Some("/v2/"));
        assert_eq!(slash.upstream_path("/api/x"), "/v2/x");
        assert_eq!(slash.upstream_path("/api"), "/v2/");
        let root = built("/", false, Some("/base"));
        assert_eq!(root.upstream_path("/x"), "/base/x");
        assert_eq!(root.upstream_path("/"), "/base/");
        let none = built("/api", false, None);
        assert_eq!(none.upstream_path("/api/x"), "/api/x");
    }

    #[test]
    fn endpoint_and_limiter_state_survive_rebuilds() {
        let state = TableState::default();
        let mut limited = route(None, "/");
        limited.rate_limit = Some(RateLimitSpec {
            requests_per_second: 5,
            burst: None,
        });
        let services = vec![service("web", vec![limited])];
        let instances = vec![instance("web-1", "web", 9001, true)];
        let first = RouteTable::build_with(&services, &instances, &state);
        let Match::Ready(r1) = first.lookup("h", "/") else {
            panic!("ready route expected")
        };
        let _in_flight = r1.endpoints[0].start();
        let second = RouteTable::build_with(&services, &instances, &state);
        let Match::Ready(r2) = second.lookup("h", "/") else {
            panic!("ready route expected")
        };
        assert!(Arc::ptr_eq(&r1.endpoints[0], &r2.endpoints[0]));
        assert_eq!(r2.endpoints[0].in_flight(), 1);
        assert!(Arc::ptr_eq(
            r1.rate_limit.as_ref().unwrap(),
            r2.rate_limit.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(&r1.retry_budget, &r2.retry_budget));
        // A changed quota is a new limiter.
        let mut faster = route(None, "/");
        faster.rate_limit = Some(RateLimitSpec {
            requests_per_second: 50,
            burst: None,
        });
        let third = RouteTable::build_with(&[service("web", vec![faster])], &instances, &state);
        let r3 = third.lookup("h", "/").route().cloned().unwrap();
        assert!(!Arc::ptr_eq(
            r1.rate_limit.as_ref().unwrap(),
            r3.rate_limit.as_ref().unwrap()
        ));
    }

    // ---- property tests against a brute-force model ----------------------------------------

    /// (service index, host or any, path prefix, needs `x-c: 1`)
    type RouteModel = (usize, Option<String>, String, bool);

    fn arb_segment() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "ab", "b", "api", "apix", "v1"]).prop_map(str::to_string)
    }

    fn arb_path() -> impl Strategy<Value = String> {
        (prop::collection::vec(arb_segment(), 0..4), any::<bool>()).prop_map(|(segs, slash)| {
            let mut path = String::new();
            for s in &segs {
                path.push('/');
                path.push_str(s);
            }
            if path.is_empty() || slash {
                path.push('/');
            }
            path
        })
    }

    fn arb_host() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "a.example",
            "b.example",
            "x.a.example",
            "*.example",
            "*.a.example",
        ])
        .prop_map(str::to_string)
    }

    fn arb_routes() -> impl Strategy<Value = Vec<RouteModel>> {
        prop::collection::vec(
            (
                0..4usize,
                prop::option::of(arb_host()),
                arb_path(),
                prop::bool::weighted(0.3),
            ),
            0..12,
        )
    }

    /// Mangles a host the way clients may send it: case and an optional port.
    fn arb_request_host() -> impl Strategy<Value = String> {
        let host = prop::sample::select(vec![
            "a.example",
            "b.example",
            "x.a.example",
            "y.x.a.example",
            "example",
            "other",
        ]);
        (host, any::<bool>(), prop::option::of(1u16..)).prop_map(|(h, upper, port)| {
            let h = if upper {
                h.to_uppercase()
            } else {
                h.to_string()
            };
            match port {
                Some(p) => format!("{h}:{p}"),
                None => h,
            }
        })
    }

    fn services_from(model: &[RouteModel]) -> Vec<Service> {
        (0..4)
            .map(|i| {
                let routes = model
                    .iter()
                    .filter(|(s, _, _, _)| *s == i)
                    .map(|(_, h, p, hdr)| {
                        let mut r = route(h.as_deref(), p);
                        if *hdr {
                            r.headers.insert("x-c".into(), "1".into());
                        }
                        r
                    })
                    .collect();
                service(&format!("svc{i}"), routes)
            })
            .collect()
    }

    /// The specification, written as plainly as possible: the most specific host class with a
    /// matching route, then the longest prefix, then header routes, then the first service.
    fn model_lookup(
        model: &[RouteModel],
        host: &str,
        path: &str,
        with_header: bool,
    ) -> Option<(usize, String)> {
        let host = normalize_host(host);
        // Lower is more specific; None: the route's host does not apply.
        let class = |h: &Option<String>| -> Option<usize> {
            match h {
                None => Some(10_000),
                Some(h) => match h.strip_prefix("*.") {
                    Some(suffix) if host.ends_with(&format!(".{suffix}")) => {
                        Some(1_000 - suffix.len())
                    }
                    Some(_) => None,
                    None => (normalize_host(h) == host).then_some(0),
                },
            }
        };
        model
            .iter()
            .filter(|(_, _, p, hdr)| {
                prefix_matches(&normalize_prefix(p), path) && (!hdr || with_header)
            })
            .filter_map(|(s, h, p, hdr)| Some((class(h)?, normalize_prefix(p), *hdr, *s)))
            .min_by(|(ca, pa, ha, sa), (cb, pb, hb, sb)| {
                ca.cmp(cb)
                    .then(pb.len().cmp(&pa.len()))
                    .then(hb.cmp(ha))
                    .then(sa.cmp(sb))
            })
            .map(|(_, p, _, s)| (s, p))
    }

    fn request_headers(with_header: bool) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if with_header {
            headers.insert("x-c", HeaderValue::from_static("1"));
        }
        headers
    }

    proptest! {
        #[test]
        fn lookup_agrees_with_the_model(
            model in arb_routes(),
            host in arb_request_host(),
            path in arb_path(),
            with_header in any::<bool>(),
        ) {
            let table = RouteTable::build(&services_from(&model), &[]);
            let got = table
                .lookup_request(&host, &path, &request_headers(with_header))
                .route()
                .map(|r| (r.service.clone(), r.path.clone()));
            let want = model_lookup(&model, &host, &path, with_header)
                .map(|(s, p)| (format!("svc{s}"), p));
            prop_assert_eq!(got, want);
        }

        #[test]
        fn matched_prefix_is_a_whole_segment_prefix(
            model in arb_routes(),
            host in arb_request_host(),
            path in arb_path(),
        ) {
            let table = RouteTable::build(&services_from(&model), &[]);
            if let Some(route) = table.lookup(&host, &path).route() {
                prop_assert!(path.starts_with(route.path.as_str()));
                let rest = &path[route.path.len()..];
                prop_assert!(route.path == "/" || rest.is_empty() || rest.starts_with('/'));
                prop_assert!(route.headers.is_empty());
                if let Some(h) = &route.host {
                    let want = normalize_host(&host);
                    match h.strip_prefix("*.") {
                        Some(suffix) => {
                            let dotted = format!(".{suffix}");
                            prop_assert!(want.ends_with(&dotted));
                        }
                        None => prop_assert_eq!(h, &want),
                    }
                }
            }
        }

        #[test]
        fn every_ready_instance_is_an_endpoint(
            ready in prop::collection::vec(any::<bool>(), 0..8),
        ) {
            let services = vec![service("web", vec![route(None, "/")])];
            let instances: Vec<_> = ready
                .iter()
                .enumerate()
                .map(|(i, r)| instance(&format!("web-{i}"), "web", 9000 + i as u16, *r))
                .collect();
            let table = RouteTable::build(&services, &instances);
            let want: Vec<_> = instances
                .iter()
                .filter(|i| i.status.ready)
                .map(|i| format!("127.0.0.1:{}", i.status.ports["http"]))
                .collect();
            let got: Vec<_> = table
                .lookup("h", "/")
                .route()
                .map(|r| r.endpoints.iter().map(|e| e.authority.clone()).collect())
                .unwrap_or_default();
            prop_assert_eq!(got, want);
        }
    }
}
