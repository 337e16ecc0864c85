//! Validation of parsed specs: pure functions returning every problem found.
//!
//! [`validate_spec`] returns paths relative to the spec (`probes.readiness.period`); callers
//! put their own prefix in front (`service.web.` in a file, `spec.` in an API object).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use crate::error::FieldError;
use crate::expand::{is_var_name, template_vars};
use crate::file::{FlotillaFile, GatewaySection, UpConfig};
use crate::path::FieldPath;
use crate::platform::{PLATFORM_VARS, STOP_SIGNALS, normalize_signal_name, port_env_var};
use crate::route::RouteKey;
use crate::service::{Probe, RouteSpec, ServiceSpec};

/// Most replicas one service may ask for.
/// Largest placement priority, either way (Kubernetes' bound for user priority classes).
pub const MAX_PRIORITY: u32 = 1_000_000_000;
pub const MAX_REPLICAS: u32 = 1000;
/// Most named ports per service.
pub const MAX_PORTS: usize = 16;
/// Longest port name (as Kubernetes).
pub const MAX_PORT_NAME_LEN: usize = 15;
/// Longest stop grace period.
pub const MAX_GRACE_PERIOD: Duration = Duration::from_secs(3600);
/// Shortest probe period.
pub const MIN_PROBE_PERIOD: Duration = Duration::from_millis(10);
/// Smallest memory limit.
pub const MIN_MEMORY: u64 = 1 << 20;

/// Start of the message for an invalid `env` key (located at the key, not the value).
pub(crate) const ENV_NAME_ERROR: &str = "invalid environment variable name";

/// Checks a service name: a DNS label (RFC 1123 as Kubernetes uses it, but starting with a
/// letter): lowercase letters, digits and `-`, at most 63 characters, starting with a letter
/// and not ending with `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    dns_label(name, 63).map_err(|why| format!("invalid name {name:?}: {why}"))
}

fn dns_label(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > max {
        return Err(format!("must be at most {max} characters"));
    }
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err("must start with a lowercase letter".into());
    }
    if s.ends_with('-') {
        return Err("must not end with `-`".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "invalid character {c:?}: only lowercase letters, digits and `-` are allowed"
        ));
    }
    Ok(())
}

/// Checks a route host: a lowercase DNS name (labels of letters, digits and `-`, separated by
/// dots), without scheme, port or path.
pub fn validate_hostname(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("must not be empty (leave `host` out to match any host)".into());
    }
    if host.contains("://") {
        return Err("must be a host name, without a scheme".into());
    }
    if host.contains(':') {
        return Err("must be a host name, without a port".into());
    }
    if host.contains('/') {
        return Err("must be a host name, without a path".into());
    }
    if host.len() > 253 {
        return Err("must be at most 253 characters".into());
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err("must not contain empty labels".into());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} must not start or end with `-`"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(format!(
                "invalid character {c:?}: only lowercase letters, digits, `-` and `.` are allowed"
            ));
        }
    }
    Ok(())
}

/// Checks a service: its name (error path: the root) and its spec.
pub fn validate_service(name: &str, spec: &ServiceSpec) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Err(m) = validate_name(name) {
        errs.push(FieldError::new(FieldPath::root(), m));
    }
    errs.extend(validate_spec(spec));
    errs
}

/// Checks a service spec. Paths are relative to the spec.
pub fn validate_spec(spec: &ServiceSpec) -> Vec<FieldError> {
    let mut v = Errs::default();
    let root = FieldPath::root();

    if spec.command.trim().is_empty() {
        v.push(root.key("command"), "must not be empty");
    }
    let known = template_variables(spec);
    for (i, arg) in spec.args.iter().enumerate() {
        check_template(&mut v, root.key("args").index(i), arg, &known);
    }
    if let Some(w) = &spec.workdir
        && w.trim().is_empty()
    {
        v.push(root.key("workdir"), "must not be empty when set");
    }
    for (k, val) in &spec.env {
        let p = root.key("env").key(k.clone());
        if !is_var_name(k) {
            v.push(
                p.clone(),
                format!("{ENV_NAME_ERROR} {k:?}: expected [A-Za-z_][A-Za-z0-9_]*"),
            );
        }
        check_template(&mut v, p, val, &known);
    }
    if let Some(u) = &spec.user
        && u.trim().is_empty()
    {
        v.push(root.key("user"), "must not be empty when set");
    }
    if let Some(g) = &spec.group
        && g.trim().is_empty()
    {
        v.push(root.key("group"), "must not be empty when set");
    }
    if spec.replicas > MAX_REPLICAS {
        v.push(
            root.key("replicas"),
            format!("must be at most {MAX_REPLICAS} (got {})", spec.replicas),
        );
    }

    if spec.singleton && spec.replicas > 1 {
        v.push(
            root.key("replicas"),
            format!(
                "a singleton service runs at most one instance: replicas must be 0 or 1 (got {})",
                spec.replicas
            ),
        );
    }

    if spec.priority.unsigned_abs() > MAX_PRIORITY {
        v.push(
            root.key("priority"),
            format!(
                "must be between -{MAX_PRIORITY} and {MAX_PRIORITY} (got {})",
                spec.priority
            ),
        );
    }

    // Placement.
    let placement = root.key("placement");
    for k in spec.placement.node_selector.keys() {
        if k.trim().is_empty() {
            v.push(
                placement.key("node_selector"),
                "label names must not be empty",
            );
        }
    }
    for (i, t) in spec.placement.tolerations.iter().enumerate() {
        if t.key.trim().is_empty() {
            v.push(
                placement.key("tolerations").index(i).key("key"),
                "must not be empty",
            );
        }
    }
    if let Some(spread) = &spec.placement.spread {
        let p = placement.key("spread");
        if spread.topology_key.trim().is_empty() {
            v.push(p.key("topology_key"), "must not be empty");
        }
        if spread.max_skew == 0 {
            v.push(p.key("max_skew"), "must be at least 1");
        }
    }

    // Ports.
    if spec.ports.len() > MAX_PORTS {
        v.push(
            root.key("ports"),
            format!(
                "at most {MAX_PORTS} ports are allowed (got {})",
                spec.ports.len()
            ),
        );
    }
    let mut seen = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let p = root.key("ports").index(i);
        if let Err(why) = dns_label(port, MAX_PORT_NAME_LEN) {
            v.push(p.clone(), format!("invalid port name {port:?}: {why}"));
        }
        if !seen.insert(port.as_str()) {
            v.push(p, format!("duplicate port name {port:?}"));
        }
    }

    // Resources.
    let r = &spec.resources;
    let rp = root.key("resources");
    if let Some(cpu) = r.cpu
        && cpu.0 < 1
    {
        v.push(rp.key("cpu"), "must be at least 1m when set");
    }
    if let Some(mem) = r.memory
        && mem.0 < MIN_MEMORY
    {
        v.push(
            rp.key("memory"),
            format!("must be at least 1Mi when set (got {mem})"),
        );
    }
    if r.pids == Some(0) {
        v.push(rp.key("pids"), "must be at least 1 when set");
    }
    if r.open_files == Some(0) {
        v.push(rp.key("open_files"), "must be at least 1 when set");
    }

    // Probes.
    let pp = root.key("probes");
    for (name, probe) in [
        ("startup", &spec.probes.startup),
        ("readiness", &spec.probes.readiness),
        ("liveness", &spec.probes.liveness),
    ] {
        if let Some(probe) = probe {
            check_probe(&mut v, &pp.key(name), name, probe, &spec.ports);
        }
    }

    // Restart.
    let rs = &spec.restart;
    let rsp = root.key("restart");
    if rs.backoff_initial.0 < Duration::from_millis(1) {
        v.push(rsp.key("backoff_initial"), "must be at least 1ms");
    }
    if rs.backoff_initial > rs.backoff_max {
        v.push(
            rsp.key("backoff_initial"),
            format!(
                "must not be longer than backoff_max ({} > {})",
                rs.backoff_initial, rs.backoff_max
            ),
        );
    }

    // Stop.
    let sp = root.key("stop");
    if normalize_signal_name(&spec.stop.signal).is_none() {
        v.push(
            sp.key("signal"),
            format!(
                "unsupported stop signal {:?}: expected one of {}",
                spec.stop.signal,
                STOP_SIGNALS.join(", ")
            ),
        );
    }
    if spec.stop.grace_period.0 > MAX_GRACE_PERIOD {
        v.push(
            sp.key("grace_period"),
            format!("must be at most 1h (got {})", spec.stop.grace_period),
        );
    }

    // Routes.
    let mut seen_routes: BTreeMap<RouteKey, usize> = BTreeMap::new();
    for (i, route) in spec.routes.iter().enumerate() {
        let p = root.key("routes").index(i);
        check_route(&mut v, &p, route, &spec.ports);
        let key = RouteKey::of(route);
        if let Some(first) = seen_routes.insert(key.clone(), i) {
            // Keep the first index for later duplicates.
            seen_routes.insert(key, first);
            v.push(
                p,
                format!(
                    "duplicate route {}: same host and path as routes[{first}]",
                    describe_route(route)
                ),
            );
        }
    }

    check_deploy(
        &mut v,
        &root.key("deploy"),
        &spec.deploy,
        spec.probes.readiness.is_some(),
    );
    v.0
}

/// Rolling-update settings: a rollout must be able to move, and its timers must be sane.
fn check_deploy(
    v: &mut Errs,
    p: &FieldPath,
    d: &crate::deploy::DeploySpec,
    has_readiness_probe: bool,
) {
    use crate::deploy::Scale;
    if matches!(d.max_surge, Scale::Count(0) | Scale::Percent(0))
        && matches!(d.max_unavailable, Scale::Count(0) | Scale::Percent(0))
    {
        v.push(
            p.key("max_surge"),
            "max_surge and max_unavailable cannot both be 0: a rollout could never move",
        );
    }
    for (name, limit) in [
        (&d.max_surge, "max_surge"),
        (&d.max_unavailable, "max_unavailable"),
    ] {
        if let Scale::Count(n) = name
            && *n > MAX_REPLICAS
        {
            v.push(
                p.key(limit),
                format!("must be at most {MAX_REPLICAS} (got {n})"),
            );
        }
    }
    let hour = std::time::Duration::from_secs(3600);
    let min_ready = d.min_ready(has_readiness_probe);
    if min_ready > hour {
        v.push(p.key("min_ready"), "must be at most 1h");
    }
    if d.pre_stop_delay.0 > hour {
        v.push(p.key("pre_stop_delay"), "must be at most 1h");
    }
    if d.progress_deadline.0 < std::time::Duration::from_secs(1) {
        v.push(p.key("progress_deadline"), "must be at least 1s");
    }
    if d.progress_deadline.0 <= min_ready {
        v.push(
            p.key("progress_deadline"),
            if d.min_ready.is_some() || has_readiness_probe {
                "must be longer than min_ready, or no rollout could ever make progress".to_string()
            } else {
                format!(
                    "must be longer than min_ready, which is {} without a readiness probe, or no rollout could ever make progress",
                    crate::Dur(min_ready)
                )
            },
        );
    }
    if d.revision_history == 0 || d.revision_history > 100 {
        v.push(p.key("revision_history"), "must be between 1 and 100");
    }
}

/// Every variable `${…}` may name in this spec's args and env values: the keys of `env`,
/// [`PLATFORM_VARS`], and `PORT` plus `PORT_<NAME>` when the service has ports.
pub fn template_variables(spec: &ServiceSpec) -> BTreeSet<String> {
    let mut known: BTreeSet<String> = spec.env.keys().cloned().collect();
    known.extend(PLATFORM_VARS.iter().map(|s| s.to_string()));
    if !spec.ports.is_empty() {
        known.insert("PORT".to_string());
    }
    known.extend(spec.ports.iter().map(|p| port_env_var(p)));
    known
}

fn check_template(v: &mut Errs, p: FieldPath, template: &str, known: &BTreeSet<String>) {
    match template_vars(template) {
        Err(e) => v.push(p, e.to_string()),
        Ok(names) => {
            for name in names.iter().filter(|n| !known.contains(*n)) {
                let hint = if name.starts_with("PORT") {
                    "not a port of this service (see `ports`)"
                } else {
                    "not set in `env` nor by flotilla"
                };
                v.push(
                    p.clone(),
                    format!("unknown variable `{name}` in `${{{name}}}`: {hint}"),
                );
            }
        }
    }
}

fn check_probe(v: &mut Errs, p: &FieldPath, kind: &str, probe: &Probe, ports: &[String]) {
    let set = [
        probe.http.is_some(),
        probe.tcp.is_some(),
        probe.exec.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        v.push(
            p.clone(),
            format!("exactly one of `http`, `tcp`, `exec` must be set (found {set})"),
        );
    }
    if let Some(http) = &probe.http {
        if !http.path.starts_with('/') {
            v.push(
                p.key("http").key("path"),
                format!("must start with `/` (got {:?})", http.path),
            );
        }
        check_port_ref(v, &p.key("http"), http.port.as_deref(), ports);
    }
    if let Some(tcp) = &probe.tcp {
        check_port_ref(v, &p.key("tcp"), tcp.port.as_deref(), ports);
    }
    if let Some(exec) = &probe.exec {
        match exec.command.first() {
            None => v.push(p.key("exec").key("command"), "must not be empty"),
            Some(c) if c.trim().is_empty() => v.push(
                p.key("exec").key("command").index(0),
                "the program must not be empty",
            ),
            Some(_) => {}
        }
    }
    if probe.period.0 < MIN_PROBE_PERIOD {
        v.push(
            p.key("period"),
            format!("must be at least 10ms (got {})", probe.period),
        );
    }
    if probe.timeout.0.is_zero() {
        v.push(p.key("timeout"), "must be greater than 0");
    } else if probe.timeout > probe.period {
        v.push(
            p.key("timeout"),
            format!(
                "must not be longer than period ({} > {})",
                probe.timeout, probe.period
            ),
        );
    }
    if probe.success_threshold < 1 {
        v.push(p.key("success_threshold"), "must be at least 1");
    } else if kind != "readiness" && probe.success_threshold != 1 {
        v.push(
            p.key("success_threshold"),
            format!("must be 1 for a {kind} probe"),
        );
    }
    if probe.failure_threshold < 1 {
        v.push(p.key("failure_threshold"), "must be at least 1");
    }
}

fn check_port_ref(v: &mut Errs, p: &FieldPath, port: Option<&str>, ports: &[String]) {
    match port {
        Some(name) if !ports.iter().any(|x| x == name) => {
            let msg = if ports.is_empty() {
                format!("unknown port {name:?}: the service declares no `ports`")
            } else {
                format!(
                    "unknown port {name:?}: expected one of {}",
                    ports
                        .iter()
                        .map(|x| format!("{x:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            v.push(p.key("port"), msg);
        }
        Some(_) => {}
        None if ports.is_empty() => v.push(
            p.clone(),
            "needs a port, but the service declares no `ports`",
        ),
        None => {}
    }
}

fn check_route(v: &mut Errs, p: &FieldPath, route: &RouteSpec, ports: &[String]) {
    if !route.path.starts_with('/') {
        v.push(
            p.key("path"),
            format!("must start with `/` (got {:?})", route.path),
        );
    } else if route.path.contains(['?', '#']) {
        v.push(
            p.key("path"),
            "must be a path prefix, without query or fragment",
        );
    }
    if let Some(host) = &route.host
        && let Err(why) = validate_route_host(host)
    {
        v.push(p.key("host"), format!("invalid host {host:?}: {why}"));
    }
    check_port_ref(v, p, route.port.as_deref(), ports);
    for (name, value) in &route.headers {
        let hp = p.key("headers").key(name);
        if let Err(why) = validate_header_name(name) {
            v.push(hp.clone(), format!("invalid header name {name:?}: {why}"));
        }
        if value.len() > MAX_ROUTE_HEADER_VALUE
            || value.trim() != value
            || !value.bytes().all(|b| (0x20..0x7f).contains(&b))
        {
            v.push(
                hp,
                format!(
                    "header value must be printable ASCII without leading or trailing spaces, \
                     at most {MAX_ROUTE_HEADER_VALUE} characters"
                ),
            );
        }
    }
    if let Some(rewrite) = &route.rewrite {
        if route.strip_prefix {
            v.push(
                p.key("rewrite"),
                "cannot be combined with `strip_prefix = true` (`rewrite = \"/\"` strips)",
            );
        } else if !rewrite.starts_with('/') {
            v.push(
                p.key("rewrite"),
                format!("must start with `/` (got {rewrite:?})"),
            );
        } else if rewrite.contains(['?', '#']) {
            v.push(
                p.key("rewrite"),
                "must be a path, without query or fragment",
            );
        }
    }
    if let Some(timeout) = route.timeout
        && (timeout.0.is_zero() || timeout.0 > MAX_ROUTE_TIMEOUT)
    {
        v.push(
            p.key("timeout"),
            format!("must be more than 0 and at most 1h (got {timeout})"),
        );
    }
    if let Some(limit) = &route.rate_limit {
        let rp = p.key("rate_limit");
        if !(1..=MAX_RATE).contains(&limit.requests_per_second) {
            v.push(
                rp.key("requests_per_second"),
                format!(
                    "must be between 1 and {MAX_RATE} (got {})",
                    limit.requests_per_second
                ),
            );
        }
        if let Some(burst) = limit.burst
            && !(1..=MAX_RATE).contains(&burst)
        {
            v.push(
                rp.key("burst"),
                format!("must be between 1 and {MAX_RATE} (got {burst})"),
            );
        }
    }
}

/// Longest route `headers` value.
pub const MAX_ROUTE_HEADER_VALUE: usize = 1024;
/// Longest route timeout.
pub const MAX_ROUTE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Highest `rate_limit.requests_per_second` and `burst`.
pub const MAX_RATE: u32 = 1_000_000;

/// Checks a route host: a host name as [`validate_hostname`] accepts, or `*.` followed by one
/// (any subdomain of it, at any depth).
pub fn validate_route_host(host: &str) -> Result<(), String> {
    match host.strip_prefix("*.") {
        Some(rest) => validate_hostname(rest).map_err(|why| format!("after `*.`: {why}")),
        None if host.contains('*') => {
            Err("a wildcard must be the whole first label (`*.example.com`)".into())
        }
        None => validate_hostname(host),
    }
}

/// Checks an HTTP header name (an RFC 9110 token), as a route may match on.
pub fn validate_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(*c)))
    {
        return Err(format!("invalid character {c:?}"));
    }
    Ok(())
}

fn describe_route(r: &RouteSpec) -> String {
    let mut out = format!("{}{}", r.host.as_deref().unwrap_or("*"), r.path);
    if !r.headers.is_empty() {
        let headers: Vec<String> = r.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(" [{}]", headers.join(", ")));
    }
    out
}

/// A route of one service that matches the same host and path as a route of another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "route {host_path} of service {service:?} (routes[{route}]) conflicts with routes[{other_route}] of service {other_service:?}"
)]
pub struct RouteConflict {
    /// The service whose route conflicts (the later one in the list).
    pub service: String,
    /// Index of the conflicting route in `service`'s routes.
    pub route: usize,
    /// The service that claimed the host and path first (earlier in the list).
    pub other_service: String,
    pub other_route: usize,
    /// `host/path` (`*` for any host).
    pub host_path: String,
}

impl RouteConflict {
    /// As a field error with a path relative to `service`'s spec (`routes[i]`).
    pub fn to_field_error(&self) -> FieldError {
        FieldError::new(
            FieldPath::root().key("routes").index(self.route),
            format!(
                "route {} is already used by routes[{}] of service {:?}",
                self.host_path, self.other_route, self.other_service
            ),
        )
    }
}

/// Finds routes with the same host and path in two different services. Each conflict is
/// reported once, against the service that comes later in `services`: to check a new service
/// against stored ones, put the stored ones first and the new one last. Routes repeated within
/// one service are reported by [`validate_spec`] instead.
pub fn validate_routes_across(services: &[(&str, &ServiceSpec)]) -> Vec<RouteConflict> {
    let mut claimed: BTreeMap<RouteKey, (&str, usize)> = BTreeMap::new();
    let mut out = Vec::new();
    for (service, spec) in services {
        for (i, route) in spec.routes.iter().enumerate() {
            let key = RouteKey::of(route);
            match claimed.get(&key) {
                Some((other, j)) if other != service => out.push(RouteConflict {
                    service: service.to_string(),
                    route: i,
                    other_service: other.to_string(),
                    other_route: *j,
                    host_path: describe_route(route),
                }),
                Some(_) => {}
                None => {
                    claimed.insert(key, (service, i));
                }
            }
        }
    }
    out
}

/// Checks the `[up]` table. Paths are relative to it.
pub fn validate_up(up: &UpConfig) -> Vec<FieldError> {
    let mut v = Errs::default();
    for (name, addr) in [
        ("api", &up.api),
        ("gateway", &up.gateway),
        ("metrics", &up.metrics),
    ] {
        if let Some(a) = addr
            && a.parse::<SocketAddr>().is_err()
        {
            v.push(
                FieldPath::root().key(name),
                format!("invalid address {a:?}: expected IP:PORT such as \"127.0.0.1:8080\""),
            );
        }
    }
    if let Some(d) = &up.data_dir
        && d.trim().is_empty()
    {
        v.push(
            FieldPath::root().key("data_dir"),
            "must not be empty when set",
        );
    }
    v.0
}

/// Checks the `[gateway]` table. Paths are relative to it.
/// Most gateway worker threads `[gateway] workers` may ask for.
pub const MAX_GATEWAY_WORKERS: u32 = 256;

pub fn validate_gateway(gw: &GatewaySection) -> Vec<FieldError> {
    let mut v = Errs::default();
    let root = FieldPath::root();
    if let Some(a) = &gw.tls_listen {
        if a.parse::<SocketAddr>().is_err() {
            v.push(
                root.key("tls_listen"),
                format!("invalid address {a:?}: expected IP:PORT such as \"0.0.0.0:8443\""),
            );
        } else if gw.certificates.is_empty() {
            v.push(
                root.key("tls_listen"),
                "needs at least one [[gateway.certificates]] entry",
            );
        }
    }
    if gw.tls_listen.is_none() && !gw.certificates.is_empty() {
        v.push(
            root.key("certificates"),
            "certificates are served on `tls_listen`, which is not set",
        );
    }
    check_certificates(&mut v, &root.key("certificates"), gw);
    check_gateway_limits(&mut v, &root.key("limits"), gw);
    if let Some(grace) = gw.shutdown_grace
        && grace.0 > MAX_GRACE_PERIOD
    {
        v.push(root.key("shutdown_grace"), "must be at most 1h");
    }
    if let Some(workers) = gw.workers
        && !(1..=MAX_GATEWAY_WORKERS).contains(&workers)
    {
        v.push(
            root.key("workers"),
            format!("must be between 1 and {MAX_GATEWAY_WORKERS}"),
        );
    }
    v.0
}

fn check_certificates(v: &mut Errs, p: &FieldPath, gw: &GatewaySection) {
    let mut claimed: BTreeMap<&str, usize> = BTreeMap::new();
    let mut default: Option<usize> = None;
    for (i, c) in gw.certificates.iter().enumerate() {
        let p = p.index(i);
        for (field, path) in [("cert", &c.cert), ("key", &c.key)] {
            if path.trim().is_empty() {
                v.push(p.key(field), "must not be empty");
            }
        }
        if c.default {
            match default {
                Some(first) => v.push(
                    p.key("default"),
                    format!("only one certificate may be the default (certificates[{first}] is)"),
                ),
                None => default = Some(i),
            }
        } else if c.hosts.is_empty() {
            v.push(
                p.key("hosts"),
                "must name at least one host (or set `default = true`)",
            );
        }
        for (j, host) in c.hosts.iter().enumerate() {
            let hp = p.key("hosts").index(j);
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if let Err(why) = validate_hostname(bare) {
                v.push(
                    hp,
                    format!("invalid host {host:?}: {why} (a wildcard is `*.` then a name)"),
                );
                continue;
            }
            if let Some(first) = claimed.insert(host.as_str(), i) {
                let by = if first == i {
                    String::from("this certificate")
                } else {
                    format!("certificates[{first}]")
                };
                v.push(hp, format!("host {host:?} is already served by {by}"));
            }
        }
    }
}

fn check_gateway_limits(v: &mut Errs, p: &FieldPath, gw: &GatewaySection) {
    let l = &gw.limits;
    let ms = Duration::from_millis;
    for (name, value, min, max) in [
        (
            "header_read_timeout",
            l.header_read_timeout,
            ms(100),
            ms(600_000),
        ),
        ("idle_timeout", l.idle_timeout, ms(1000), ms(3_600_000)),
        (
            "tls_handshake_timeout",
            l.tls_handshake_timeout,
            ms(100),
            ms(600_000),
        ),
    ] {
        if let Some(d) = value
            && !(min..=max).contains(&d.0)
        {
            v.push(
                p.key(name),
                format!(
                    "must be between {} and {} (got {d})",
                    crate::quantity::Dur(min),
                    crate::quantity::Dur(max)
                ),
            );
        }
    }
    let ranges: [(&str, Option<u64>, u64, u64); 5] = [
        (
            "max_header_bytes",
            l.max_header_bytes.map(|b| b.0),
            8 << 10,
            1 << 20,
        ),
        ("max_headers", l.max_headers.map(u64::from), 1, 1000),
        ("max_body_bytes", l.max_body_bytes.map(|b| b.0), 1, u64::MAX),
        (
            "max_connections",
            l.max_connections.map(u64::from),
            1,
            1_000_000,
        ),
        (
            "h2_max_concurrent_streams",
            l.h2_max_concurrent_streams.map(u64::from),
            1,
            10_000,
        ),
    ];
    for (name, value, min, max) in ranges {
        if let Some(n) = value
            && !(min..=max).contains(&n)
        {
            let message = if max == u64::MAX {
                format!("must be at least {min} (got {n})")
            } else {
                format!("must be between {min} and {max} (got {n})")
            };
            v.push(p.key(name), message);
        }
    }
}

/// Checks a whole file: `[up]`, every service (name and spec) and routes across services.
/// Paths are from the file's root (`service.web.replicas`).
pub fn validate_file(file: &FlotillaFile) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(up) = &file.up {
        let prefix = FieldPath::root().key("up");
        errs.extend(validate_up(up).into_iter().map(|e| e.prefixed(&prefix)));
    }
    if let Some(gateway) = &file.gateway {
        let prefix = FieldPath::root().key("gateway");
        errs.extend(
            validate_gateway(gateway)
                .into_iter()
                .map(|e| e.prefixed(&prefix)),
        );
    }
    for (name, spec) in &file.service {
        let prefix = FieldPath::root().key("service").key(name.clone());
        errs.extend(
            validate_service(name, spec)
                .into_iter()
                .map(|e| e.prefixed(&prefix)),
        );
    }
    let list: Vec<(&str, &ServiceSpec)> =
        file.service.iter().map(|(n, s)| (n.as_str(), s)).collect();
    for c in validate_routes_across(&list) {
        let prefix = FieldPath::root().key("service").key(c.service.clone());
        errs.push(c.to_field_error().prefixed(&prefix));
    }
    errs
}

#[derive(Default)]
struct Errs(Vec<FieldError>);

impl Errs {
    fn push(&mut self, path: FieldPath, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message));
    }
}

#[cfg(test)]
mod tests;
