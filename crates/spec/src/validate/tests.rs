//! Each rule, checked through `parse_file` so the location of each error is checked too.

use crate::load::parse_file;

/// A valid service; tests add lines from line 4 on.
const BASE: &str = "[service.web]\ncommand = \"srv\"\nports = [\"http\", \"admin\"]\n";

fn errors(text: &str) -> Vec<String> {
    match parse_file(text, "f.toml") {
        Ok(_) => Vec::new(),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

#[track_caller]
fn check(text: &str, expected: &[&str]) {
    assert_eq!(errors(text), expected, "for file:\n{text}");
}

#[track_caller]
fn check_base(extra: &str, expected: &[&str]) {
    check(&format!("{BASE}{extra}"), expected);
}

#[test]
fn base_is_valid() {
    check(BASE, &[]);
}

#[test]
fn service_name() {
    check(
        "[service.Web]\ncommand = \"x\"\n",
        &["f.toml:1:10: service.Web: invalid name \"Web\": must start with a lowercase letter"],
    );
    check(
        "[service.1web]\ncommand = \"x\"\n",
        &["f.toml:1:10: service.1web: invalid name \"1web\": must start with a lowercase letter"],
    );
    check(
        "[service.web-]\ncommand = \"x\"\n",
        &["f.toml:1:10: service.web-: invalid name \"web-\": must not end with `-`"],
    );
    check(
        "[service.web_1]\ncommand = \"x\"\n",
        &[
            "f.toml:1:10: service.web_1: invalid name \"web_1\": invalid character '_': only lowercase letters, digits and `-` are allowed",
        ],
    );
    let long = "a".repeat(64);
    check(
        &format!("[service.{long}]\ncommand = \"x\"\n"),
        &[&format!(
            "f.toml:1:10: service.{long}: invalid name \"{long}\": must be at most 63 characters"
        )],
    );
    check(
        &format!("[service.{}]\ncommand = \"x\"\n", "a".repeat(63)),
        &[],
    );
    check("[service.a-1]\ncommand = \"x\"\n", &[]);
}

#[test]
fn command_args_workdir_user_group() {
    check(
        "[service.web]\ncommand = \" \"\nargs = [\"ok\", \"${\"]\nworkdir = \"\"\nuser = \"\"\ngroup = \"\"\n",
        &[
            "f.toml:2:11: service.web.command: must not be empty",
            "f.toml:3:15: service.web.args[1]: unterminated `${` at byte 0: expected `}`",
            "f.toml:4:11: service.web.workdir: must not be empty when set",
            "f.toml:5:8: service.web.user: must not be empty when set",
            "f.toml:6:9: service.web.group: must not be empty when set",
        ],
    );
}

#[test]
fn replicas() {
    check_base("replicas = 1000\n", &[]);
    check_base("replicas = 0\n", &[]);
    check_base(
        "replicas = 1001\n",
        &["f.toml:4:12: service.web.replicas: must be at most 1000 (got 1001)"],
    );
}

#[test]
fn env() {
    check_base(
        "env = { OK_1 = \"${PORT}\", \"1X\" = \"a\", \"A-B\" = \"b\", C = \"${}\" }\n",
        &[
            "f.toml:4:27: service.web.env.1X: invalid environment variable name \"1X\": expected [A-Za-z_][A-Za-z0-9_]*",
            "f.toml:4:39: service.web.env.A-B: invalid environment variable name \"A-B\": expected [A-Za-z_][A-Za-z0-9_]*",
            "f.toml:4:56: service.web.env.C: invalid variable name `` in `${…}`: expected [A-Za-z_][A-Za-z0-9_]*",
        ],
    );
}

#[test]
fn ports() {
    check(
        "[service.web]\ncommand = \"x\"\nports = [\"http\", \"Admin\", \"http\", \"a-very-long-port-name\"]\n",
        &[
            "f.toml:3:18: service.web.ports[1]: invalid port name \"Admin\": must start with a lowercase letter",
            "f.toml:3:27: service.web.ports[2]: duplicate port name \"http\"",
            "f.toml:3:35: service.web.ports[3]: invalid port name \"a-very-long-port-name\": must be at most 15 characters",
        ],
    );
    let many: Vec<String> = (0..17).map(|i| format!("\"p{i}\"")).collect();
    check(
        &format!(
            "[service.web]\ncommand = \"x\"\nports = [{}]\n",
            many.join(", ")
        ),
        &["f.toml:3:9: service.web.ports: at most 16 ports are allowed (got 17)"],
    );
}

#[test]
fn resources() {
    check_base(
        "resources = { cpu = \"250m\", memory = \"1Mi\", pids = 1, open_files = 1 }\n",
        &[],
    );
    check_base(
        "resources = { cpu = \"0m\", memory = \"512Ki\", pids = 0, open_files = 0 }\n",
        &[
            "f.toml:4:21: service.web.resources.cpu: must be at least 1m when set",
            "f.toml:4:36: service.web.resources.memory: must be at least 1Mi when set (got 512Ki)",
            "f.toml:4:52: service.web.resources.pids: must be at least 1 when set",
            "f.toml:4:68: service.web.resources.open_files: must be at least 1 when set",
        ],
    );
}

#[test]
fn probe_kinds() {
    check_base(
        "[service.web.probes.readiness]\nperiod = \"1s\"\n",
        &[
            "f.toml:4:21: service.web.probes.readiness: exactly one of `http`, `tcp`, `exec` must be set (found 0)",
        ],
    );
    check_base(
        "[service.web.probes.liveness]\ntcp = {}\nexec = { command = [\"true\"] }\n",
        &[
            "f.toml:4:21: service.web.probes.liveness: exactly one of `http`, `tcp`, `exec` must be set (found 2)",
        ],
    );
    check_base(
        "[service.web.probes.startup]\nexec = { command = [] }\n[service.web.probes.liveness]\nexec = { command = [\"\"] }\n",
        &[
            "f.toml:5:20: service.web.probes.startup.exec.command: must not be empty",
            "f.toml:7:21: service.web.probes.liveness.exec.command[0]: the program must not be empty",
        ],
    );
}

#[test]
fn probe_timing_and_thresholds() {
    check_base(
        "[service.web.probes.readiness]\ntcp = {}\nperiod = \"5ms\"\ntimeout = \"0s\"\nsuccess_threshold = 0\nfailure_threshold = 0\n",
        &[
            "f.toml:6:10: service.web.probes.readiness.period: must be at least 10ms (got 5ms)",
            "f.toml:7:11: service.web.probes.readiness.timeout: must be greater than 0",
            "f.toml:8:21: service.web.probes.readiness.success_threshold: must be at least 1",
            "f.toml:9:21: service.web.probes.readiness.failure_threshold: must be at least 1",
        ],
    );
    check_base(
        "[service.web.probes.liveness]\ntcp = {}\nperiod = \"1s\"\ntimeout = \"2s\"\nsuccess_threshold = 2\n",
        &[
            "f.toml:7:11: service.web.probes.liveness.timeout: must not be longer than period (2s > 1s)",
            "f.toml:8:21: service.web.probes.liveness.success_threshold: must be 1 for a liveness probe",
        ],
    );
    // Defaults (period 10s, timeout 1s) are valid; readiness may need several successes.
    check_base(
        "[service.web.probes.readiness]\ntcp = {}\nsuccess_threshold = 2\n",
        &[],
    );
}

#[test]
fn probe_http_and_ports() {
    check_base(
        "[service.web.probes.readiness]\nhttp = { path = \"health\", port = \"metrics\" }\n",
        &[
            "f.toml:5:17: service.web.probes.readiness.http.path: must start with `/` (got \"health\")",
            "f.toml:5:34: service.web.probes.readiness.http.port: unknown port \"metrics\": expected one of \"http\", \"admin\"",
        ],
    );
    check_base(
        "[service.web.probes.readiness]\nhttp = { port = \"admin\" }\n",
        &[],
    );
    check(
        "[service.web]\ncommand = \"x\"\nprobes.readiness.tcp = {}\nprobes.liveness.http = { port = \"http\" }\nprobes.startup.exec = { command = [\"true\"] }\n",
        &[
            "f.toml:3:18: service.web.probes.readiness.tcp: needs a port, but the service declares no `ports`",
            "f.toml:4:33: service.web.probes.liveness.http.port: unknown port \"http\": the service declares no `ports`",
        ],
    );
}

#[test]
fn restart() {
    check_base(
        "restart = { policy = \"on-failure\", backoff_initial = \"1m\", backoff_max = \"30s\" }\n",
        &[
            "f.toml:4:54: service.web.restart.backoff_initial: must not be longer than backoff_max (1m > 30s)",
        ],
    );
    check_base(
        "restart = { backoff_initial = \"0s\" }\n",
        &["f.toml:4:31: service.web.restart.backoff_initial: must be at least 1ms"],
    );
    check_base("restart = { policy = \"never\" }\n", &[]);
}

#[test]
fn stop() {
    for ok in [
        "SIGTERM", "TERM", "term", "SigInt", "usr2", "SIGHUP", "QUIT",
    ] {
        check_base(&format!("stop = {{ signal = \"{ok}\" }}\n"), &[]);
    }
    check_base(
        "stop = { signal = \"SIGKILL\", grace_period = \"2h\" }\n",
        &[
            "f.toml:4:19: service.web.stop.signal: unsupported stop signal \"SIGKILL\": expected one of SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2",
            "f.toml:4:45: service.web.stop.grace_period: must be at most 1h (got 2h)",
        ],
    );
    check_base("stop = { grace_period = \"1h\" }\n", &[]);
}

#[test]
fn routes() {
    check_base(
        "[[service.web.routes]]\nhost = \"web.localhost\"\npath = \"/api\"\nport = \"admin\"\n[[service.web.routes]]\npath = \"/\"\n",
        &[],
    );
    check_base(
        concat!(
            "[[service.web.routes]]\n",
            "host = \"Web.localhost\"\n",
            "path = \"api\"\n",
            "[[service.web.routes]]\n",
            "host = \"web.localhost:8080\"\n",
            "port = \"nope\"\n",
            "[[service.web.routes]]\n",
            "host = \"http://web\"\n",
            "path = \"/x?y\"\n",
            "[[service.web.routes]]\n",
            "host = \"a..b\"\n",
        ),
        &[
            "f.toml:5:8: service.web.routes[0].host: invalid host \"Web.localhost\": invalid character 'W': only lowercase letters, digits, `-` and `.` are allowed",
            "f.toml:6:8: service.web.routes[0].path: must start with `/` (got \"api\")",
            "f.toml:8:8: service.web.routes[1].host: invalid host \"web.localhost:8080\": must be a host name, without a port",
            "f.toml:9:8: service.web.routes[1].port: unknown port \"nope\": expected one of \"http\", \"admin\"",
            "f.toml:11:8: service.web.routes[2].host: invalid host \"http://web\": must be a host name, without a scheme",
            "f.toml:12:8: service.web.routes[2].path: must be a path prefix, without query or fragment",
            "f.toml:14:8: service.web.routes[3].host: invalid host \"a..b\": must not contain empty labels",
        ],
    );
}

#[test]
fn duplicate_routes_in_one_service() {
    check_base(
        "[[service.web.routes]]\npath = \"/api\"\n[[service.web.routes]]\npath = \"/api/\"\n[[service.web.routes]]\npath = \"/api\"\nhost = \"a.b\"\n",
        &[
            "f.toml:6:1: service.web.routes[1]: duplicate route */api/: same host and path as routes[0]",
        ],
    );
}

#[test]
fn route_without_ports() {
    check(
        "[service.web]\ncommand = \"x\"\n[[service.web.routes]]\npath = \"/\"\n",
        &["f.toml:3:1: service.web.routes[0]: needs a port, but the service declares no `ports`"],
    );
}

#[test]
fn routes_across_services() {
    let text = concat!(
        "[service.a]\ncommand = \"x\"\nports = [\"http\"]\n",
        "routes = [{ host = \"h.io\", path = \"/\" }, { path = \"/a\" }]\n",
        "[service.b]\ncommand = \"x\"\nports = [\"http\"]\n",
        "routes = [{ path = \"/b\" }, { host = \"h.io\" }]\n",
    );
    check(
        text,
        &[
            "f.toml:8:28: service.b.routes[1]: route h.io/ is already used by routes[0] of service \"a\"",
        ],
    );
}

#[test]
fn routes_across_list_api() {
    use crate::validate::{RouteConflict, validate_routes_across};
    let spec = |routes: &str| -> crate::ServiceSpec {
        serde_json::from_str(&format!(
            r#"{{"command":"x","ports":["http"],"routes":{routes}}}"#
        ))
        .unwrap()
    };
    let stored1 = spec(r#"[{"path":"/"}]"#);
    let stored2 = spec(r#"[{"host":"a.io","path":"/x"}]"#);
    let new = spec(r#"[{"host":"a.io","path":"/x/"},{"path":"/y"},{"path":"/"}]"#);
    let got = validate_routes_across(&[("s1", &stored1), ("s2", &stored2), ("new", &new)]);
    assert_eq!(
        got,
        vec![
            RouteConflict {
                service: "new".into(),
                route: 0,
                other_service: "s2".into(),
                other_route: 0,
                host_path: "a.io/x/".into(),
            },
            RouteConflict {
                service: "new".into(),
                route: 2,
                other_service: "s1".into(),
                other_route: 0,
                host_path: "*/".into(),
            },
        ]
    );
    // Updating a stored service: its own old routes are not conflicts when it is listed once.
    assert!(validate_routes_across(&[("s1", &stored1), ("s2", &stored2)]).is_empty());
}

#[test]
fn up_table() {
    check(
        "[up]\napi = \"127.0.0.1:7070\"\ngateway = \"localhost:8080\"\nmetrics = \"[::1]:9464\"\ndata_dir = \"\"\n",
        &[
            "f.toml:3:11: up.gateway: invalid address \"localhost:8080\": expected IP:PORT such as \"127.0.0.1:8080\"",
            "f.toml:5:12: up.data_dir: must not be empty when set",
        ],
    );
}

#[test]
fn validate_service_direct() {
    use crate::validate::validate_service;
    let spec: crate::ServiceSpec =
        serde_json::from_str(r#"{"command":"","replicas":2000}"#).unwrap();
    let errs: Vec<String> = validate_service("Bad", &spec)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errs,
        vec![
            "invalid name \"Bad\": must start with a lowercase letter",
            "command: must not be empty",
            "replicas: must be at most 1000 (got 2000)",
        ]
    );
}

#[test]
fn signal_names() {
    use crate::validate::normalize_signal_name;
    assert_eq!(normalize_signal_name("term"), Some("SIGTERM"));
    assert_eq!(normalize_signal_name("SIGUSR1"), Some("SIGUSR1"));
    assert_eq!(normalize_signal_name("SIG"), None);
    assert_eq!(normalize_signal_name("KILL"), None);
    assert_eq!(normalize_signal_name(""), None);
}

#[test]
fn template_variables_must_exist() {
    check_base(
        concat!(
            "args = [\"${PORT}\", \"${PORT_ADMIN}\", \"${FLOTILLA_INSTANCE}\", \"${GREETING}\", \"$HOME\", \"${HOME}\"]\n",
            "env = { GREETING = \"hi ${FLOTILLA_SERVICE} on ${PORT_HTTP}\", URL = \"${PORT_WEB}\" }\n",
        ),
        &[
            "f.toml:4:85: service.web.args[5]: unknown variable `HOME` in `${HOME}`: not set in `env` nor by flotilla",
            "f.toml:5:68: service.web.env.URL: unknown variable `PORT_WEB` in `${PORT_WEB}`: not a port of this service (see `ports`)",
        ],
    );
    check(
        "[service.web]\ncommand = \"x\"\nargs = [\"${PORT}\"]\n",
        &[
            "f.toml:3:9: service.web.args[0]: unknown variable `PORT` in `${PORT}`: not a port of this service (see `ports`)",
        ],
    );
}

#[test]
fn route_matching_and_forwarding_fields() {
    check_base(
        concat!(
            "[[service.web.routes]]\n",
            "host = \"*.web.io\"\n",
            "path = \"/api\"\n",
            "headers = { \"X-Canary\" = \"1\" }\n",
            "strip_prefix = true\n",
            "timeout = \"2s\"\n",
            "redirect_https = true\n",
            "upstream = \"h2c\"\n",
            "rate_limit = { requests_per_second = 10, burst = 20 }\n",
            "[[service.web.routes]]\n",
            "path = \"/api\"\n",
            "rewrite = \"/v2\"\n",
        ),
        &[],
    );
    check_base(
        concat!(
            "[[service.web.routes]]\n",
            "host = \"a.*.io\"\n",
            "headers = { \"x y\" = \"1\", ok = \" padded\" }\n",
            "strip_prefix = true\n",
            "rewrite = \"/v2\"\n",
            "timeout = \"0s\"\n",
            "rate_limit = { requests_per_second = 0, burst = 0 }\n",
            "[[service.web.routes]]\n",
            "host = \"*.\"\n",
            "rewrite = \"v2\"\n",
        ),
        &[
            "f.toml:5:8: service.web.routes[0].host: invalid host \"a.*.io\": a wildcard must be the whole first label (`*.example.com`)",
            "f.toml:6:21: service.web.routes[0].headers.\"x y\": invalid header name \"x y\": invalid character ' '",
            "f.toml:6:31: service.web.routes[0].headers.ok: header value must be printable ASCII without leading or trailing spaces, at most 1024 characters",
            "f.toml:8:11: service.web.routes[0].rewrite: cannot be combined with `strip_prefix = true` (`rewrite = \"/\"` strips)",
            "f.toml:9:11: service.web.routes[0].timeout: must be more than 0 and at most 1h (got 0s)",
            "f.toml:10:38: service.web.routes[0].rate_limit.requests_per_second: must be between 1 and 1000000 (got 0)",
            "f.toml:10:49: service.web.routes[0].rate_limit.burst: must be between 1 and 1000000 (got 0)",
            "f.toml:12:8: service.web.routes[1].host: invalid host \"*.\": after `*.`: must not be empty (leave `host` out to match any host)",
            "f.toml:13:11: service.web.routes[1].rewrite: must start with `/` (got \"v2\")",
        ],
    );
    check_base(
        "[[service.web.routes]]\nupstream = \"h3\"\n",
        &[
            "f.toml:5:12: service.web.routes[0].upstream: unknown value `h3`; expected one of `http1`, `h2c`",
        ],
    );
}

#[test]
fn routes_differing_only_in_headers_are_distinct() {
    check_base(
        concat!(
            "[[service.web.routes]]\npath = \"/api\"\n",
            "[[service.web.routes]]\npath = \"/api\"\nheaders = { x-canary = \"1\" }\n",
            "[[service.web.routes]]\npath = \"/api\"\nheaders = { X-Canary = \"1\" }\n",
        ),
        &[
            "f.toml:9:1: service.web.routes[2]: duplicate route */api [X-Canary=1]: same host and path as routes[1]",
        ],
    );
}

/// A default never contradicts a value the user set: shortening a probe period, lowering the
/// backoff ceiling or raising `min_ready` alone stays valid, and the dependent default follows.
#[test]
fn defaults_follow_the_fields_they_depend_on() {
    use std::time::Duration;
    let text = format!(
        "{BASE}[service.web.probes.readiness]\ntcp = {{}}\nperiod = \"200ms\"\n\
         [service.web.restart]\nbackoff_max = \"50ms\"\n\
         [service.web.deploy]\nmin_ready = \"5m\"\n"
    );
    check(&text, &[]);
    let file = parse_file(&text, "f.toml").expect("valid");
    let spec = &file.service["web"];
    let probe = spec.probes.readiness.as_ref().expect("readiness probe");
    assert_eq!(probe.timeout.0, Duration::from_millis(200));
    assert_eq!(spec.restart.backoff_initial.0, Duration::from_millis(50));
    assert_eq!(spec.deploy.progress_deadline.0, Duration::from_secs(7 * 60));

    // The other direction, and explicit values still win.
    let text = format!(
        "{BASE}[service.web.probes.liveness]\ntcp = {{}}\nperiod = \"30s\"\n\
         [service.web.restart]\nbackoff_initial = \"1m\"\n"
    );
    let file = parse_file(&text, "f.toml").expect("valid");
    let spec = &file.service["web"];
    let probe = spec.probes.liveness.as_ref().expect("liveness probe");
    assert_eq!(probe.timeout.0, Duration::from_secs(1));
    assert_eq!(spec.restart.backoff_max.0, Duration::from_secs(60));
    assert_eq!(spec.deploy.progress_deadline.0, Duration::from_secs(120));
    check_base(
        "[service.web.probes.liveness]\ntcp = {}\nperiod = \"200ms\"\ntimeout = \"1s\"\n",
        &[
            "f.toml:7:11: service.web.probes.liveness.timeout: must not be longer than period (1s > 200ms)",
        ],
    );
}

/// Routes the gateway would merge (`/a//b` and `/a/b`, `Host.` and `host`) are one route to
/// validation too: a duplicate in one service, a conflict across two.
#[test]
fn route_identity_is_the_gateways() {
    use crate::validate::validate_routes_across;
    check_base(
        "[[service.web.routes]]\npath = \"/a/b\"\n[[service.web.routes]]\npath = \"/a//b\"\n",
        &[
            "f.toml:6:1: service.web.routes[1]: duplicate route */a//b: same host and path as routes[0]",
        ],
    );
    let spec = |routes: &str| -> crate::ServiceSpec {
        serde_json::from_str(&format!(
            r#"{{"command":"x","ports":["http"],"routes":{routes}}}"#
        ))
        .expect("valid spec")
    };
    let a = spec(r#"[{"host":"h.io","path":"/a/b"}]"#);
    let b = spec(r#"[{"host":"H.io.","path":"/a//b"}]"#);
    let got = validate_routes_across(&[("a", &a), ("b", &b)]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].other_service, "a");
}
