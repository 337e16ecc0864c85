use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::quantity::{Dur, parse_bytes, parse_cpu, parse_duration};
use crate::service::RestartPolicy;
use crate::{ByteSize, Millicores};

const EXAMPLE: &str = r#"
[up]
api = "127.0.0.1:7070"
gateway = "127.0.0.1:8080"

[service.hello]
command = "flotilla-demo"
args = ["--port", "${PORT}"]
replicas = 3
ports = ["http"]
env = { GREETING = "hello" }
resources = { cpu = "250m", memory = "64Mi", pids = 64, open_files = 1024 }
restart = { policy = "always", backoff_initial = "100ms", backoff_max = "30s" }
stop = { signal = "SIGTERM", grace_period = "10s" }

[service.hello.probes.readiness]
http = { path = "/health" }
period = "1s"

[[service.hello.routes]]
host = "hello.localhost"
path = "/"
"#;

fn errors(text: &str) -> Vec<String> {
    match parse_file(text, "f.toml") {
        Ok(_) => Vec::new(),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

fn json_errors(body: &str) -> Vec<String> {
    match parse_service_json(body.as_bytes()) {
        Ok(_) => Vec::new(),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn parses_the_example() {
    let f = parse_file(EXAMPLE, "flotilla.toml").unwrap();
    let up = f.up.as_ref().unwrap();
    assert_eq!(up.api.as_deref(), Some("127.0.0.1:7070"));
    let s = &f.service["hello"];
    assert_eq!(s.command, "flotilla-demo");
    assert_eq!(s.args, vec!["--port", "${PORT}"]);
    assert_eq!(s.replicas, 3);
    assert_eq!(s.env["GREETING"], "hello");
    assert_eq!(s.resources.cpu, Some(Millicores(250)));
    assert_eq!(s.resources.memory, Some(ByteSize(64 << 20)));
    assert_eq!(s.resources.pids, Some(64));
    assert_eq!(s.restart.policy, RestartPolicy::Always);
    assert_eq!(
        s.restart.backoff_max,
        Dur(std::time::Duration::from_secs(30))
    );
    let r = s.probes.readiness.as_ref().unwrap();
    assert_eq!(r.http.as_ref().unwrap().path, "/health");
    assert_eq!(r.period, Dur(std::time::Duration::from_secs(1)));
    assert_eq!(r.timeout, Dur::one_second());
    assert_eq!(r.failure_threshold, 3);
    assert_eq!(s.routes[0].host.as_deref(), Some("hello.localhost"));
}

#[test]
fn defaults() {
    let f = parse_file("[service.a]\ncommand = \"x\"\n", "f.toml").unwrap();
    let s = &f.service["a"];
    assert_eq!(s.replicas, 1);
    assert_eq!(s.stop.signal, "SIGTERM");
    assert_eq!(s.stop.grace_period, Dur::ten_seconds());
    assert_eq!(s.restart.backoff_initial, Dur::default_backoff_initial());
    assert!(f.up.is_none());
    assert!(parse_file("", "f.toml").unwrap().service.is_empty());
}

#[test]
fn unknown_field_with_suggestion() {
    assert_eq!(
        errors("[service.web]\ncommand = \"x\"\nreplica = 3\n"),
        vec!["f.toml:3:1: service.web: unknown field `replica` — did you mean `replicas`?"]
    );
    assert_eq!(
        errors("[servce.web]\ncommand = \"x\"\n"),
        vec![
            "f.toml:1:2: : unknown field `servce` — did you mean `service`?".replace(": : ", ": ")
        ]
    );
    assert_eq!(
        errors(
            "[service.web]\ncommand = \"x\"\nports = [\"http\"]\n[service.web.probes.readiness]\ntcp = {}\nperod = \"1s\"\n"
        ),
        vec![
            "f.toml:6:1: service.web.probes.readiness: unknown field `perod` — did you mean `period`?"
        ]
    );
    assert_eq!(
        errors("[service.web]\ncommand = \"x\"\nrestart = { max_backoff = \"1s\" }\n"),
        vec![
            "f.toml:3:13: service.web.restart: unknown field `max_backoff` — did you mean `backoff_max`?"
        ]
    );
}

#[test]
fn unknown_field_without_suggestion() {
    assert_eq!(
        errors("[service.web]\ncommand = \"x\"\n[service.web.stop]\nzzz = 1\n"),
        vec![
            "f.toml:4:1: service.web.stop: unknown field `zzz`; expected one of `signal`, `grace_period`"
        ]
    );
}

#[test]
fn unknown_variant() {
    assert_eq!(
        errors("[service.web]\ncommand = \"x\"\nrestart.policy = \"onfailure\"\n"),
        vec![
            "f.toml:3:18: service.web.restart.policy: unknown value `onfailure` — did you mean `on-failure`?"
        ]
    );
}

#[test]
fn suggestions() {
    let c = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let fields = c(&["command", "args", "replicas", "ports", "env", "routes"]);
    assert_eq!(suggest("replica", &fields), Some("replicas"));
    assert_eq!(suggest("Replicas", &fields), Some("replicas"));
    assert_eq!(suggest("comand", &fields), Some("command"));
    assert_eq!(suggest("route", &fields), Some("routes"));
    assert_eq!(suggest("envs", &fields), Some("env"));
    assert_eq!(suggest("image", &fields), None);
    assert_eq!(suggest("x", &fields), None);
    assert_eq!(suggest("anything", &[]), None);
}

#[test]
fn wrong_types_and_invalid_values() {
    assert_eq!(
        errors(concat!(
            "[service.web]\n",
            "command = \"x\"\n",
            "replicas = \"3\"\n",
            "args = [\"a\", 2]\n",
            "resources = { memory = \"64MB\", cpu = -1 }\n",
            "stop.grace_period = 10\n",
        )),
        vec![
            "f.toml:3:12: service.web.replicas: invalid type: string \"3\", expected a whole number ≥ 0",
            "f.toml:4:14: service.web.args[1]: invalid type: integer `2`, expected a string",
            "f.toml:5:24: service.web.resources.memory: invalid size \"64MB\": expected e.g. \"64Mi\", \"1Gi\", \"500M\" or a number of bytes",
            "f.toml:5:38: service.web.resources.cpu: invalid cpu -1: must be between 0 and 1000000 cores",
            "f.toml:6:21: service.web.stop.grace_period: invalid type: integer `10`, expected a duration such as \"100ms\", \"10s\" or \"1m\"",
        ]
    );
}

#[test]
fn missing_required_field() {
    assert_eq!(
        errors("[service.web]\nreplicas = 2\n"),
        vec!["f.toml:1:10: service.web: missing field `command`"]
    );
    // A required field dropped for having the wrong type is reported once.
    assert_eq!(
        errors("[service.web]\ncommand = 5\n"),
        vec!["f.toml:2:11: service.web.command: invalid type: integer `5`, expected a string"]
    );
}

#[test]
fn syntax_error_is_one_located_error() {
    let e = parse_file("[service.web]\ncommand = \n", "f.toml").unwrap_err();
    assert_eq!(e.len(), 1);
    let e = &e.0[0];
    assert_eq!((e.file.as_deref(), e.line, e.col), (Some("f.toml"), 2, 11));
    assert_eq!(e.path, "");
    assert!(e.to_string().starts_with("f.toml:2:11: "), "{e}");

    let e = parse_file("a = 1\na = 2\n", "f.toml").unwrap_err();
    assert_eq!(e.len(), 1);
    assert_eq!((e.0[0].line, e.0[0].col), (2, 1), "{e}");
}

#[test]
fn all_errors_across_services_in_document_order() {
    let text = concat!(
        "[service.b]\n",
        "command = \"\"\n",
        "[service.a]\n",
        "command = \"x\"\n",
        "replicas = 2000\n",
        "colour = \"red\"\n",
        "[service.c]\n",
        "command = \"x\"\n",
        "replicas = 5000\n",
    );
    assert_eq!(
        errors(text),
        vec![
            "f.toml:2:11: service.b.command: must not be empty",
            // service.a has a deserialization error, so its values are not validated further.
            "f.toml:6:1: service.a: unknown field `colour`; expected one of `command`, `args`, `workdir`, `env`, `user`, `group`, `replicas`, `singleton`, `priority`, `ports`, `resources`, `probes`, `restart`, `stop`, `routes`, `placement`, `deploy`",
            "f.toml:9:12: service.c.replicas: must be at most 1000 (got 5000)",
        ]
    );
}

#[test]
fn datetimes_and_odd_numbers() {
    assert_eq!(
        errors("[service.web]\ncommand = 1979-05-27T07:32:00Z\nresources.cpu = nan\n"),
        vec![
            "f.toml:2:11: service.web.command: invalid type: date-time 1979-05-27T07:32:00Z; no field takes a date or time (quote it to make a string)",
            "f.toml:3:17: service.web.resources.cpu: invalid number nan: must be finite",
        ]
    );
    let f = parse_file(
        "[service.web]\ncommand = \"x\"\nresources.cpu = 0.5\nresources.memory = 0x100000\n",
        "f",
    )
    .unwrap();
    assert_eq!(f.service["web"].resources.cpu, Some(Millicores(500)));
    assert_eq!(f.service["web"].resources.memory, Some(ByteSize(1 << 20)));
}

#[test]
fn unicode_columns_count_characters() {
    assert_eq!(
        errors("[service.web]\ncommand = \"x\"\nenv = { \"É\" = \"é\", B = \"${\" }\n"),
        vec![
            "f.toml:3:9: service.web.env.\"É\": invalid environment variable name \"É\": expected [A-Za-z_][A-Za-z0-9_]*",
            "f.toml:3:24: service.web.env.B: unterminated `${` at byte 0: expected `}`",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// JSON

#[test]
fn json_ok() {
    let s = parse_service_json(br#"{"command":"srv","ports":["http"],"routes":[{"path":"/"}]}"#)
        .unwrap();
    assert_eq!(s.command, "srv");
    assert_eq!(s.routes[0].path, "/");
}

#[test]
fn json_errors_are_located() {
    let body = "{\n  \"command\": \"srv\",\n  \"replicas\": \"3\",\n  \"probes\": {\"readiness\": {\"tcp\": {}, \"perod\": \"1s\"}}\n}";
    assert_eq!(
        json_errors(body),
        vec![
            "3:15: replicas: invalid type: string \"3\", expected a whole number ≥ 0",
            "4:39: probes.readiness: unknown field `perod` — did you mean `period`?",
        ]
    );
    let body = "{\n  \"command\": \"srv\",\n  \"replicas\": 3000,\n  \"probes\": {\"readiness\": {\"tcp\": {}}}\n}";
    assert_eq!(
        json_errors(body),
        vec![
            "3:15: replicas: must be at most 1000 (got 3000)",
            "4:28: probes.readiness.tcp: needs a port, but the service declares no `ports`",
        ]
    );
}

#[test]
fn json_syntax_errors() {
    assert_eq!(
        json_errors("{\"command\": 1,}"),
        vec!["1:15: trailing comma"]
    );
    assert_eq!(json_errors(""), vec!["1:0: EOF while parsing a value"]);
    assert_eq!(
        json_errors("[]"),
        vec!["1:1: invalid length 0, expected struct ServiceSpec with 17 elements"]
    );
    let e = parse_service_json(b"{\"command\": \"\xff\"}").unwrap_err();
    assert_eq!(e.len(), 1);
}

#[test]
fn json_service_object() {
    let body = br#"{"metadata": {"name": "Web"}, "spec": {"command": "x", "replicas": 2000}}"#;
    let errs: Vec<String> = parse_service_object_json(body)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errs,
        vec![
            "1:23: metadata.name: invalid name \"Web\": must start with a lowercase letter",
            "1:68: spec.replicas: must be at most 1000 (got 2000)",
        ]
    );
    let body = br#"{"metadata": {"name": "web"}, "spec": {"command": "x", "replica": 2}}"#;
    let errs: Vec<String> = parse_service_object_json(body)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errs,
        vec!["1:56: spec: unknown field `replica` — did you mean `replicas`?"]
    );
    let ok =
        parse_service_object_json(br#"{"metadata": {"name": "web"}, "spec": {"command": "x"}}"#)
            .unwrap();
    assert_eq!(ok.metadata.name, "web");
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn json_round_trip() {
    let f = parse_file(EXAMPLE, "f").unwrap();
    let full = parse_file(
        concat!(
            "[service.full]\ncommand = \"./bin/x\"\nargs = [\"a\"]\nworkdir = \"w\"\nuser = \"nobody\"\n",
            "group = \"nogroup\"\nreplicas = 0\nports = [\"http\", \"grpc\"]\n",
            "resources = { cpu = 2, memory = 1048576, pids = 3, open_files = 4 }\n",
            "restart = { policy = \"on-failure\", backoff_initial = \"1s 500ms\", backoff_max = \"1m\" }\n",
            "stop = { signal = \"int\", grace_period = \"0s\" }\n",
            "probes.startup = { exec = { command = [\"true\", \"x\"] }, initial_delay = \"2s\" }\n",
            "probes.liveness = { tcp = { port = \"grpc\" }, period = \"20ms\", timeout = \"20ms\" }\n",
            "probes.readiness = { http = { port = \"http\" }, success_threshold = 2, failure_threshold = 9 }\n",
            "routes = [{ port = \"grpc\" }, { host = \"a.b\", path = \"/x\", port = \"http\" }]\n",
        ),
        "f",
    )
    .unwrap();
    for spec in f.service.values().chain(full.service.values()) {
        let json = serde_json::to_vec(spec).unwrap();
        let back = parse_service_json(&json).unwrap();
        assert_eq!(&back, spec);
    }
}

#[test]
fn toml_round_trip() {
    let f = parse_file(EXAMPLE, "f").unwrap();
    let text = toml::to_string(&f).unwrap();
    let back = parse_file(&text, "f").unwrap();
    assert_eq!(back, f);
}

#[test]
fn examples_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path().join("flotilla.toml");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let name = path.display().to_string();
        if let Err(e) = parse_file(&text, &name) {
            panic!("{e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #[test]
    fn parser_never_panics(text in ".*") {
        let _ = parse_file(&text, "f");
        let _ = parse_service_json(text.as_bytes());
        let _ = parse_service_object_json(text.as_bytes());
    }

    #[test]
    fn parser_never_panics_on_near_valid_files(
        lines in proptest::collection::vec(
            prop_oneof![
                Just("[service.web]".to_string()),
                Just("[[service.web.routes]]".to_string()),
                Just("[service.web.probes.readiness]".to_string()),
                Just("[up]".to_string()),
                "[a-z_.]{1,20} = \"[a-zA-Z0-9${}/:. ]{0,12}\"",
                "[a-z_.]{1,20} = -?[0-9]{1,12}",
                "[a-z_.]{1,20} = \\[\"[a-z]{0,5}\", [0-9]\\]",
                "[a-z_.]{1,20} = \\{ [a-z_]{1,8} = \"[a-z0-9]{0,5}\" \\}",
            ],
            0..12,
        )
    ) {
        let text = lines.join("\n");
        if let Err(errs) = parse_file(&text, "f") {
            for e in errs.iter() {
                // Every error is located in the text.
                prop_assert!(e.line >= 1, "{}", e);
            }
        }
    }

    #[test]
    fn json_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = parse_service_json(&bytes);
    }

    #[test]
    fn bytes_round_trip(n in any::<u64>()) {
        prop_assert_eq!(parse_bytes(&ByteSize(n).to_string()), Ok(ByteSize(n)));
    }

    #[test]
    fn cpu_round_trip(n in any::<u64>()) {
        prop_assert_eq!(parse_cpu(&Millicores(n).to_string()), Ok(Millicores(n)));
    }

    #[test]
    fn duration_round_trip(secs in 0u64..10 * 365 * 86_400, nanos in 0u32..1_000_000_000) {
        let d = Dur(std::time::Duration::new(secs, nanos));
        prop_assert_eq!(parse_duration(&d.to_string()), Ok(d));
    }

    #[test]
    fn spec_env_round_trip(env in proptest::collection::btree_map("[A-Z_][A-Z0-9_]{0,8}", "[^$]{0,10}", 0..5)) {
        let mut spec: crate::ServiceSpec = serde_json::from_str(r#"{"command":"x"}"#).unwrap();
        spec.env = env.into_iter().collect::<BTreeMap<_, _>>();
        let json = serde_json::to_vec(&spec).unwrap();
        prop_assert_eq!(parse_service_json(&json).unwrap(), spec.clone());
        let mut file = FlotillaFile::default();
        file.service.insert("web".into(), spec);
        let text = toml::to_string(&file).unwrap();
        prop_assert_eq!(parse_file(&text, "f").unwrap(), file);
    }
}

#[test]
fn deep_nesting_does_not_overflow() {
    for depth in [100, 5_000] {
        let text = format!("a = {}{}\n", "[".repeat(depth), "]".repeat(depth));
        let _ = parse_file(&text, "f");
        let text = format!("a = {}1{}\n", "{ b = ".repeat(depth), " }".repeat(depth));
        let _ = parse_file(&text, "f");
        let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(parse_service_json(body.as_bytes()).is_err());
    }
}

// ---- [gateway] ------------------------------------------------------------------------------

#[test]
fn gateway_section_parses() {
    let text = r#"
[gateway]
tls_listen = "0.0.0.0:8443"
access_log = true
shutdown_grace = "5s"
workers = 4

[gateway.limits]
header_read_timeout = "5s"
max_header_bytes = "32Ki"
max_connections = 5000

[[gateway.certificates]]
hosts = ["api.example.com", "*.example.com"]
cert = "certs/example.pem"
key = "certs/example.key"

[[gateway.certificates]]
cert = "/etc/tls/default.pem"
key = "/etc/tls/default.key"
default = true
"#;
    let f = parse_file(text, "f.toml").unwrap();
    let gw = f.gateway.unwrap();
    assert_eq!(gw.tls_listen.as_deref(), Some("0.0.0.0:8443"));
    assert!(gw.access_log);
    assert_eq!(gw.certificates.len(), 2);
    assert_eq!(
        gw.certificates[0].hosts,
        ["api.example.com", "*.example.com"]
    );
    assert!(gw.certificates[1].default);
    assert_eq!(gw.limits.max_header_bytes, Some(ByteSize(32 << 10)));
    assert_eq!(
        gw.limits.header_read_timeout,
        Some(Dur(std::time::Duration::from_secs(5)))
    );
    assert_eq!(gw.limits.max_connections, Some(5000));
    assert_eq!(gw.workers, Some(4));
}

#[test]
fn gateway_section_errors_are_located() {
    let text = r#"
[gateway]
tls_listen = "localhost:8443"

[gateway.limits]
max_header_bytes = "1Ki"
idle_timeout = "10ms"

[[gateway.certificates]]
hosts = ["Bad_Host", "*.ok.example", "*.ok.example"]
cert = ""
key = "k.pem"

[[gateway.certificates]]
cert = "c.pem"
key = "k.pem"
"#;
    let errs = errors(text);
    let expected = [
        "f.toml:3:14: gateway.tls_listen: invalid address \"localhost:8443\"",
        "f.toml:6:20: gateway.limits.max_header_bytes: must be between 8192 and 1048576",
        "f.toml:7:16: gateway.limits.idle_timeout: must be between 1s and 1h",
        "f.toml:10:10: gateway.certificates[0].hosts[0]: invalid host \"Bad_Host\"",
        "f.toml:10:38: gateway.certificates[0].hosts[2]: host \"*.ok.example\" is already served",
        "f.toml:11:8: gateway.certificates[0].cert: must not be empty",
        "f.toml:14:1: gateway.certificates[1].hosts: must name at least one host",
    ];
    assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    for (got, want) in errs.iter().zip(expected) {
        assert!(
            got.starts_with(want),
            "{got:?} does not start with {want:?}"
        );
    }

    let errs = errors("[gateway]\nbogus = 1\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("f.toml:2:1: gateway: unknown field `bogus`"),
        "{errs:?}"
    );

    let errs = errors("[gateway]\nworkers = 0\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("f.toml:2:11: gateway.workers: must be between 1 and 256"),
        "{errs:?}"
    );

    let errs =
        errors("[[gateway.certificates]]\nhosts = [\"a.example\"]\ncert = \"c\"\nkey = \"k\"\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("gateway.certificates: certificates are served on `tls_listen`"));
}

/// A service without a required field does not hide the problems of the others.
#[test]
fn a_missing_field_does_not_hide_other_services_errors() {
    let text = "[service.a]\nreplicas = 2\n\n[service.b]\ncommand = \"x\"\nreplicas = \"three\"\n\n[service.c]\ncommand = \"y\"\nports = [\"Http\"]\n";
    let errors: Vec<String> = match crate::load::parse_file(text, "f.toml") {
        Ok(_) => Vec::new(),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    };
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].starts_with("f.toml:1:10: service.a: missing field `command`"),
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("service.b.replicas")),
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("service.c.ports")),
        "{errors:#?}"
    );
}

#[test]
fn type_errors_speak_the_files_words() {
    let errors: Vec<String> = match crate::load::parse_file(
        "[service.a]\ncommand = \"x\"\nreplicas = -1\nargs = \"one\"\nenv = [\"A=1\"]\n",
        "f.toml",
    ) {
        Ok(_) => Vec::new(),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    };
    let all = errors.join("\n");
    assert!(all.contains("expected a whole number ≥ 0"), "{all}");
    assert!(all.contains("expected a list"), "{all}");
    assert!(all.contains("expected a table"), "{all}");
    for rust in ["u32", "sequence", "a map"] {
        assert!(!all.contains(rust), "{rust}: {all}");
    }
}
