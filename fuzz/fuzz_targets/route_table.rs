//! The gateway's routing table, built from arbitrary (unvalidated: a remote store may hand the
//! gateway anything) services, routes and instances, then asked for arbitrary hosts and paths.
//! Building, looking up, rewriting the upstream path and rebuilding on the same state never
//! panic, and a match is consistent with the request (its prefix matches on whole segments).
//!
//! Kept to the table's small public surface (`RouteTable::build_with`, `lookup_request`,
//! `Route::upstream_path`, `normalize_host`) so it survives changes inside the gateway.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use flotilla_gateway::table::prefix_matches;
use flotilla_gateway::{Match, RouteTable, TableState};
use flotilla_spec::object::{Instance, ObjectMeta, Service};
use flotilla_spec::service::{RateLimitSpec, RouteSpec, ServiceSpec};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    services: Vec<Svc>,
    instances: Vec<Inst>,
    requests: Vec<Req>,
}

#[derive(Debug, Arbitrary)]
struct Svc {
    name: String,
    ports: Vec<String>,
    routes: Vec<Rt>,
}

#[derive(Debug, Arbitrary)]
struct Rt {
    host: Option<String>,
    path: String,
    port: Option<String>,
    headers: Vec<(String, String)>,
    strip_prefix: bool,
    rewrite: Option<String>,
    rate_limit: Option<(u32, Option<u32>)>,
}

#[derive(Debug, Arbitrary)]
struct Inst {
    /// Index into `services` (wrapped), so instances mostly belong to a real service.
    service: u8,
    name: String,
    ready: bool,
    host: Option<String>,
    ports: Vec<(String, u16)>,
}

#[derive(Debug, Arbitrary)]
struct Req {
    host: String,
    path: String,
    headers: Vec<(String, String)>,
}

fn service(s: &Svc) -> Option<Service> {
    let mut spec: ServiceSpec =
        serde_json::from_value(serde_json::json!({ "command": "fuzz" })).ok()?;
    spec.ports = s.ports.iter().take(16).cloned().collect();
    spec.routes = s
        .routes
        .iter()
        .take(32)
        .map(|r| RouteSpec {
            host: r.host.clone(),
            path: r.path.clone(),
            port: r.port.clone(),
            headers: r
                .headers
                .iter()
                .take(8)
                .cloned()
                .collect::<BTreeMap<_, _>>(),
            strip_prefix: r.strip_prefix,
            rewrite: r.rewrite.clone(),
            rate_limit: r.rate_limit.map(|(rps, burst)| RateLimitSpec {
                requests_per_second: rps,
                burst,
            }),
            ..RouteSpec::default()
        })
        .collect();
    Some(Service {
        metadata: ObjectMeta::named(s.name.clone()),
        spec,
        status: Default::default(),
    })
}

fn instance(i: &Inst, services: &[Service]) -> Option<Instance> {
    let owner = services.get(i.service as usize % services.len().max(1))?;
    let ports: BTreeMap<&str, u16> = i
        .ports
        .iter()
        .take(16)
        .map(|(n, p)| (n.as_str(), *p))
        .collect();
    // Through serde, like an Instance read from the store, so new optional fields do not break
    // this target.
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": i.name },
        "spec": {
            "service": owner.metadata.name,
            "node": "fuzz",
            "specHash": "h",
            "template": { "command": "fuzz" },
        },
        "status": {
            "phase": "Running",
            "ready": i.ready,
            "host": i.host,
            "ports": ports,
        },
    }))
    .ok()
}

fn header_map(pairs: &[(String, String)]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (k, v) in pairs.iter().take(16) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(k.as_bytes()),
            http::header::HeaderValue::from_str(v),
        ) {
            map.append(name, value);
        }
    }
    map
}

fuzz_target!(|input: Input| {
    let services: Vec<Service> = input.services.iter().take(16).filter_map(service).collect();
    let instances: Vec<Instance> = input
        .instances
        .iter()
        .take(32)
        .filter_map(|i| instance(i, &services))
        .collect();
    let state = TableState::default();
    let table = RouteTable::build_with(&services, &instances, &state);
    let _ = table.conflicts();
    let _ = table.routes().count();
    for req in input.requests.iter().take(16) {
        let m = table.lookup_request(&req.host, &req.path, &header_map(&req.headers));
        if let Some(route) = m.route() {
            assert!(
                prefix_matches(&route.path, &req.path),
                "route {:?} matched path {:?}",
                route.path,
                req.path
            );
            let _ = route.upstream_path(&req.path);
            if let Match::Ready(route) = &m {
                assert!(!route.endpoints.is_empty());
            }
        }
    }
    // A rebuild on the same state (the gateway does this on every store change) and a sweep.
    let again = RouteTable::build_with(&services, &instances, &state);
    drop(table);
    let _ = again.lookup("", "/");
    drop(again);
    let _ = state.sweep();
});
