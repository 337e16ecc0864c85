//! The routing table: a pure function of the stored Services and Instances.
//!
//! [`RouteTable::build`] turns every Service's routes into [`Route`]s carrying the addresses of
//! the service's routable instances; [`RouteTable::lookup`] picks the route for a request's host
//! and path. Neither does IO, so both are unit- and property-tested; the gateway rebuilds the
//! table on every store change and swaps it in atomically.
//!
//! Matching rules:
//! - hosts compare case-insensitively, without a `:port` and without a trailing dot;
//! - routes naming the request's host win over any-host routes, whatever their paths;
//! - among the routes of one host class, the longest path prefix wins;
//! - prefixes match whole segments: `/api` matches `/api` and `/api/x`, not `/apix`
//!   (`/api/` is the same prefix as `/api`; `/` matches every path);
//! - when two services claim the same host and path, the one whose name sorts first wins and the
//!   clash is reported in [`RouteTable::conflicts`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use flotilla_spec::object::{Instance, Service};

/// One upstream address of a route: a routable instance's host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Instance name.
    pub instance: String,
    /// `host:port` (`[v6]:port` for IPv6 hosts), ready for a URI authority.
    pub authority: String,
}

/// A route with the endpoints it currently balances over.
#[derive(Debug)]
pub struct Route {
    /// Owning service (also the `route` label of the gateway's metrics).
    pub service: String,
    /// Normalized host; `None` matches any host.
    pub host: Option<String>,
    /// Normalized path prefix (`/` or `/a/b`, never a trailing `/`).
    pub path: String,
    /// Named port the endpoints listen on (`None` when the service has no port at all).
    pub port: Option<String>,
    /// Ready endpoints, in instance-name order.
    pub endpoints: Vec<Endpoint>,
    /// Round-robin cursor.
    next: AtomicUsize,
}

impl Route {
    /// Index into `endpoints` where the next request starts (round-robin); `None` if there are
    /// no endpoints. Retries continue at the following indices.
    pub fn next_start(&self) -> Option<usize> {
        if self.endpoints.is_empty() {
            None
        } else {
            Some(self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len())
        }
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

/// Two services claiming the same host and path; `winner` (first by name) gets the traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConflict {
    pub host: Option<String>,
    pub path: String,
    pub winner: String,
    pub loser: String,
}

/// An immutable routing table; build a new one for every change.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Routes per normalized host, longest path first.
    by_host: HashMap<String, Vec<Arc<Route>>>,
    /// Any-host routes, longest path first.
    any_host: Vec<Arc<Route>>,
    conflicts: Vec<RouteConflict>,
}

impl RouteTable {
    /// Builds the table from every Service's routes and the routable Instances.
    ///
    /// An instance is an endpoint of a route when it belongs to the route's service,
    /// [`Instance::is_routable`] holds, and it reports a `status.host` and a host port for the
    /// route's port (the route's `port`, else the service's first port).
    pub fn build<'a, S, I>(services: S, instances: I) -> RouteTable
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

        // (host, path) -> route; the first service by name keeps a contested key.
        let mut routes: BTreeMap<(Option<String>, String), Route> = BTreeMap::new();
        let mut conflicts = Vec::new();
        for service in services {
            let name = &service.metadata.name;
            let ready = instances_by_service
                .get(name.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            for spec in &service.spec.routes {
                let host = spec
                    .host
                    .as_deref()
                    .map(normalize_host)
                    .filter(|h| !h.is_empty());
                let path = normalize_prefix(&spec.path);
                let key = (host.clone(), path.clone());
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
                    .map(|port| endpoints_for(ready, port))
                    .unwrap_or_default();
                routes.insert(
                    key,
                    Route {
                        service: name.clone(),
                        host,
                        path,
                        port,
                        endpoints,
                        // A random start, so a table rebuilt between two requests does not
                        // send both to the first endpoint.
                        next: AtomicUsize::new(rand::random::<u32>() as usize),
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
            match &route.host {
                Some(host) => table.by_host.entry(host.clone()).or_default().push(route),
                None => table.any_host.push(route),
            }
        }
        let longest_first = |a: &Arc<Route>, b: &Arc<Route>| b.path.len().cmp(&a.path.len());
        for list in table.by_host.values_mut() {
            list.sort_by(longest_first);
        }
        table.any_host.sort_by(longest_first);
        table
    }

    /// The route for a request's `host` (a `Host` header or URI authority, any case, with or
    /// without `:port`; empty if the request has none) and `path`.
    pub fn lookup(&self, host: &str, path: &str) -> Match {
        let host = normalize_host(host);
        let found = self
            .by_host
            .get(&host)
            .and_then(|routes| longest_match(routes, path))
            .or_else(|| longest_match(&self.any_host, path));
        match found {
            None => Match::NoRoute,
            Some(route) if route.endpoints.is_empty() => Match::NoReadyEndpoint(route.clone()),
            Some(route) => Match::Ready(route.clone()),
        }
    }

    /// Every route, host routes first (hosts in no particular order).
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_host.values().flatten().chain(&self.any_host)
    }

    /// Clashing routes found while building.
    pub fn conflicts(&self) -> &[RouteConflict] {
        &self.conflicts
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty() && self.any_host.is_empty()
    }
}

fn endpoints_for(instances: &[&Instance], port: &str) -> Vec<Endpoint> {
    instances
        .iter()
        .filter_map(|instance| {
            let host = instance.status.host.as_deref()?.trim();
            let number = *instance.status.ports.get(port)?;
            if host.is_empty() || number == 0 {
                return None;
            }
            Some(Endpoint {
                instance: instance.metadata.name.clone(),
                authority: authority(host, number),
            })
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

/// Lower-cases a host and drops a `:port` and a trailing dot (`[::1]:80` → `[::1]`).
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let host = if host.starts_with('[') {
        // IPv6 literal: keep up to the closing bracket.
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            // Only a port after the last colon (a bare IPv6 address has several colons).
            Some((name, port))
                if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                name
            }
            _ => host,
        }
    };
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
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

fn longest_match<'r>(routes: &'r [Arc<Route>], path: &str) -> Option<&'r Arc<Route>> {
    // Sorted longest first: the first match is the longest.
    routes
        .iter()
        .find(|route| prefix_matches(&route.path, path))
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
            port: None,
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
    fn host_normalization() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("::1"), "::1");
        assert_eq!(normalize_host(""), "");
        assert_eq!(normalize_host("a.b:"), "a.b");
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
        // Round-robin over all of them.
        let starts: Vec<_> = (0..4).map(|_| route.next_start().unwrap()).collect();
        assert_eq!(starts, [0, 1, 2, 0]);
    }

    #[test]
    fn route_port_selects_the_named_port() {
        let mut svc = service("web", vec![]);
        svc.spec.ports = vec!["http".into(), "admin".into()];
        svc.spec.routes = vec![
            route(None, "/"),
            RouteSpec {
                host: None,
                path: "/admin".into(),
                port: Some("admin".into()),
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

    // ---- property tests against a brute-force model ----------------------------------------

    /// (service index, host or any, path prefix)
    type RouteModel = (usize, Option<String>, String);

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
        prop::sample::select(vec!["a.example", "b.example", "c.example"]).prop_map(str::to_string)
    }

    fn arb_routes() -> impl Strategy<Value = Vec<RouteModel>> {
        prop::collection::vec((0..4usize, prop::option::of(arb_host()), arb_path()), 0..12)
    }

    /// Mangles a host the way clients may send it: case and an optional port.
    fn arb_request_host() -> impl Strategy<Value = String> {
        (arb_host(), any::<bool>(), prop::option::of(1u16..)).prop_map(|(h, upper, port)| {
            let h = if upper { h.to_uppercase() } else { h };
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
                    .filter(|(s, _, _)| *s == i)
                    .map(|(_, h, p)| route(h.as_deref(), p))
                    .collect();
                service(&format!("svc{i}"), routes)
            })
            .collect()
    }

    /// The specification, written as plainly as possible.
    fn model_lookup(model: &[RouteModel], host: &str, path: &str) -> Option<(usize, String)> {
        let host = normalize_host(host);
        let best = |want_host: bool| {
            model
                .iter()
                .filter(|(_, h, _)| match h {
                    Some(h) => want_host && normalize_host(h) == host,
                    None => !want_host,
                })
                .filter(|(_, _, p)| prefix_matches(&normalize_prefix(p), path))
                // Longest prefix; among equal keys the first service by name (index).
                .map(|(s, _, p)| (normalize_prefix(p), *s))
                .min_by(|(pa, sa), (pb, sb)| pb.len().cmp(&pa.len()).then(sa.cmp(sb)))
                .map(|(p, s)| (s, p))
        };
        best(true).or_else(|| best(false))
    }

    proptest! {
        #[test]
        fn lookup_agrees_with_the_model(
            model in arb_routes(),
            host in arb_request_host(),
            path in arb_path(),
        ) {
            let table = RouteTable::build(&services_from(&model), &[]);
            let got = table
                .lookup(&host, &path)
                .route()
                .map(|r| (r.service.clone(), r.path.clone()));
            let want = model_lookup(&model, &host, &path).map(|(s, p)| (format!("svc{s}"), p));
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
                if let Some(h) = &route.host {
                    prop_assert_eq!(h, &normalize_host(&host));
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
