//! flotilla services → Kubernetes YAML (a Deployment, and a Service and an Ingress when the
//! service has routes), so a team can go back. What has no Kubernetes field is said in a
//! warning, never dropped silently; what `flotilla import` reads back gives the same service.

use std::fmt::Write as _;

use flotilla_spec::{Probe, RestartPolicy, Scale, ServiceSpec};

/// A YAML value, in the order it is written.
enum Y {
    Map(Vec<(String, Y)>),
    Seq(Vec<Y>),
    Str(String),
    Int(i64),
}

fn map(entries: Vec<(&str, Y)>) -> Y {
    Y::Map(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn s(v: impl Into<String>) -> Y {
    Y::Str(v.into())
}

fn int(v: impl TryInto<i64>) -> Y {
    Y::Int(v.try_into().unwrap_or(i64::MAX))
}

/// Kubernetes YAML for `spec`, and what could not be said in it.
pub struct Exported {
    pub yaml: String,
    pub warnings: Vec<String>,
}

/// The container port each named port gets (flotilla allocates host ports per instance;
/// Kubernetes wants numbers): 8080, 8081, … in the order of `ports`.
fn port_number(i: usize) -> i64 {
    8080 + i64::try_from(i).unwrap_or(0)
}

pub fn export(name: &str, spec: &ServiceSpec) -> Exported {
    let mut warnings = Vec::new();
    let mut warn = |field: &str, what: &str| warnings.push(format!("{name}: {field}: {what}"));
    let labels = || map(vec![("app", s(name))]);

    // The container.
    let mut c: Vec<(&str, Y)> = vec![("name", s(name)), ("image", s(name))];
    warn(
        "image",
        "flotilla runs a command; the Deployment gets `image: <name>`, set the real one",
    );
    c.push(("command", Y::Seq(vec![s(&spec.command)])));
    if !spec.args.is_empty() {
        c.push((
            "args",
            Y::Seq(spec.args.iter().map(|a| s(to_k8s(a))).collect()),
        ));
    }
    if let Some(wd) = &spec.workdir {
        c.push(("workingDir", s(wd)));
    }
    if !spec.ports.is_empty() {
        c.push((
            "ports",
            Y::Seq(
                spec.ports
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        map(vec![
                            ("name", s(p)),
                            ("containerPort", Y::Int(port_number(i))),
                        ])
                    })
                    .collect(),
            ),
        ));
    }
    let mut env = Vec::new();
    // What flotilla gives every instance, for the process to find its ports as it does here.
    for (i, p) in spec.ports.iter().enumerate() {
        if i == 0 {
            env.push(map(vec![
                ("name", s("PORT")),
                ("value", s(port_number(0).to_string())),
            ]));
        }
        env.push(map(vec![
            ("name", s(flotilla_spec::port_env_var(p))),
            ("value", s(port_number(i).to_string())),
        ]));
    }
    for (k, v) in &spec.env {
        let field = match v.as_str() {
            "${FLOTILLA_INSTANCE}" => Some("metadata.name"),
            "${FLOTILLA_NODE}" => Some("spec.nodeName"),
            "${FLOTILLA_HOST}" => Some("status.podIP"),
            _ => None,
        };
        env.push(match field {
            Some(path) => map(vec![
                ("name", s(k)),
                (
                    "valueFrom",
                    map(vec![("fieldRef", map(vec![("fieldPath", s(path))]))]),
                ),
            ]),
            None => map(vec![("name", s(k)), ("value", s(to_k8s(v)))]),
        });
    }
    if !env.is_empty() {
        c.push(("env", Y::Seq(env)));
    }
    let r = &spec.resources;
    let mut limits = Vec::new();
    if let Some(cpu) = r.cpu {
        limits.push(("cpu", s(cpu.to_string())));
    }
    if let Some(mem) = r.memory {
        limits.push(("memory", s(mem.to_string())));
    }
    if !limits.is_empty() {
        c.push(("resources", map(vec![("limits", map(limits))])));
    }
    if r.pids.is_some() {
        warn("resources.pids", "no Kubernetes field; left out");
    }
    if r.open_files.is_some() {
        warn("resources.open_files", "no Kubernetes field; left out");
    }
    for (k8s, probe, which) in [
        ("startupProbe", &spec.probes.startup, "startup"),
        ("readinessProbe", &spec.probes.readiness, "readiness"),
        ("livenessProbe", &spec.probes.liveness, "liveness"),
    ] {
        if let Some(p) = probe {
            let probe = export_probe(p, spec, &mut |f: &str, w: &str| {
                warn(&format!("probes.{which}.{f}"), w)
            });
            c.push((k8s, probe));
        }
    }
    let pre_stop = spec.deploy.pre_stop_delay.0;
    if !pre_stop.is_zero() {
        c.push((
            "lifecycle",
            map(vec![(
                "preStop",
                map(vec![(
                    "sleep",
                    map(vec![("seconds", int(seconds_up(pre_stop)))]),
                )]),
            )]),
        ));
    }
    // The pod.
    let mut pod: Vec<(&str, Y)> = Vec::new();
    pod.push((
        "terminationGracePeriodSeconds",
        int(seconds_up(spec.stop.grace_period.0)),
    ));
    if !spec.stop.signal.eq_ignore_ascii_case("SIGTERM")
        && !spec.stop.signal.eq_ignore_ascii_case("TERM")
    {
        warn("stop.signal", "Kubernetes sends SIGTERM; left out");
    }
    let mut security = Vec::new();
    for (field, value, k8s) in [
        ("user", &spec.user, "runAsUser"),
        ("group", &spec.group, "runAsGroup"),
    ] {
        match value.as_deref().map(str::parse::<i64>) {
            Some(Ok(n)) => security.push((k8s, Y::Int(n))),
            Some(Err(_)) => warn(field, "a name: Kubernetes takes a number; left out"),
            None => {}
        }
    }
    if !security.is_empty() {
        pod.push(("securityContext", map(security)));
    }
    let pl = &spec.placement;
    if !pl.node_selector.is_empty() {
        pod.push((
            "nodeSelector",
            Y::Map(
                pl.node_selector
                    .iter()
                    .map(|(k, v)| (k.clone(), s(v)))
                    .collect(),
            ),
        ));
    }
    if !pl.tolerations.is_empty() {
        pod.push((
            "tolerations",
            Y::Seq(
                pl.tolerations
                    .iter()
                    .map(|t| match &t.value {
                        Some(v) => map(vec![
                            ("key", s(&t.key)),
                            ("operator", s("Equal")),
                            ("value", s(v)),
                        ]),
                        None => map(vec![("key", s(&t.key)), ("operator", s("Exists"))]),
                    })
                    .collect(),
            ),
        ));
    }
    if !pl.anti_affinity.is_default() {
        warn("placement.anti_affinity", "use a podAntiAffinity; left out");
    }
    if pl.spread.is_some() {
        warn(
            "placement.spread",
            "use topologySpreadConstraints; left out",
        );
    }
    if spec.priority != 0 {
        warn("priority", "use a PriorityClass; left out");
    }
    if spec.singleton {
        warn(
            "singleton",
            "no Kubernetes equivalent (a StatefulSet of one comes closest); left out",
        );
    }
    if spec.restart.policy != RestartPolicy::Always {
        warn("restart.policy", "a Deployment restarts Always; left out");
    }
    pod.push(("containers", Y::Seq(vec![map(c)])));
    // The Deployment.
    let d = &spec.deploy;
    let scale = |v: &Scale| match v {
        Scale::Count(n) => int(*n),
        Scale::Percent(p) => s(format!("{p}%")),
    };
    let mut dspec: Vec<(&str, Y)> = vec![
        ("replicas", int(spec.replicas)),
        ("selector", map(vec![("matchLabels", labels())])),
        (
            "strategy",
            map(vec![
                ("type", s("RollingUpdate")),
                (
                    "rollingUpdate",
                    map(vec![
                        ("maxSurge", scale(&d.max_surge)),
                        ("maxUnavailable", scale(&d.max_unavailable)),
                    ]),
                ),
            ]),
        ),
    ];
    if let Some(m) = d.min_ready {
        dspec.push(("minReadySeconds", int(seconds_up(m.0))));
    }
    dspec.push((
        "progressDeadlineSeconds",
        int(seconds_up(d.progress_deadline.0)),
    ));
    dspec.push(("revisionHistoryLimit", int(d.revision_history)));
    dspec.push((
        "template",
        map(vec![
            ("metadata", map(vec![("labels", labels())])),
            ("spec", map(pod)),
        ]),
    ));
    if !d.auto_rollback {
        warn(
            "deploy.auto_rollback",
            "Kubernetes never rolls back by itself; left out",
        );
    }
    let mut docs = vec![map(vec![
        ("apiVersion", s("apps/v1")),
        ("kind", s("Deployment")),
        (
            "metadata",
            map(vec![("name", s(name)), ("labels", labels())]),
        ),
        ("spec", map(dspec)),
    ])];
    // Routes: a Service for their ports, an Ingress for their hosts and paths.
    if !spec.routes.is_empty() {
        let first = spec.ports.first().cloned().unwrap_or_default();
        let mut used: Vec<String> = Vec::new();
        let mut rules: Vec<(Option<String>, Vec<Y>)> = Vec::new();
        for (i, route) in spec.routes.iter().enumerate() {
            let port = route.port.clone().unwrap_or_else(|| first.clone());
            if !used.contains(&port) {
                used.push(port.clone());
            }
            let field = format!("routes[{i}]");
            for (set, what) in [
                (!route.headers.is_empty(), "headers"),
                (route.strip_prefix, "strip_prefix"),
                (route.rewrite.is_some(), "rewrite"),
                (route.timeout.is_some(), "timeout"),
                (route.redirect_https, "redirect_https"),
                (!route.upstream.is_default(), "upstream"),
                (route.rate_limit.is_some(), "rate_limit"),
            ] {
                if set {
                    warn(
                        &format!("{field}.{what}"),
                        "no Ingress field (an ingress controller's annotation may do it); left out",
                    );
                }
            }
            let path = map(vec![
                ("path", s(&route.path)),
                ("pathType", s("Prefix")),
                (
                    "backend",
                    map(vec![(
                        "service",
                        map(vec![
                            ("name", s(name)),
                            ("port", map(vec![("name", s(&port))])),
                        ]),
                    )]),
                ),
            ]);
            match rules.iter_mut().find(|(h, _)| *h == route.host) {
                Some((_, paths)) => paths.push(path),
                None => rules.push((route.host.clone(), vec![path])),
            }
        }
        let ports = used
            .iter()
            .map(|p| {
                let i = spec.ports.iter().position(|q| q == p).unwrap_or(0);
                map(vec![
                    ("name", s(p)),
                    ("port", Y::Int(port_number(i))),
                    ("targetPort", s(p)),
                ])
            })
            .collect();
        docs.push(map(vec![
            ("apiVersion", s("v1")),
            ("kind", s("Service")),
            ("metadata", map(vec![("name", s(name))])),
            (
                "spec",
                map(vec![("selector", labels()), ("ports", Y::Seq(ports))]),
            ),
        ]));
        let rules = rules
            .into_iter()
            .map(|(host, paths)| {
                let mut rule = Vec::new();
                if let Some(h) = host {
                    rule.push(("host", s(h)));
                }
                rule.push(("http", map(vec![("paths", Y::Seq(paths))])));
                map(rule)
            })
            .collect();
        docs.push(map(vec![
            ("apiVersion", s("networking.k8s.io/v1")),
            ("kind", s("Ingress")),
            ("metadata", map(vec![("name", s(name))])),
            ("spec", map(vec![("rules", Y::Seq(rules))])),
        ]));
    }
    let mut yaml = String::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            yaml.push_str("---\n");
        }
        emit(&mut yaml, d, 0);
    }
    Exported { yaml, warnings }
}

fn seconds_up(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn export_probe(p: &Probe, spec: &ServiceSpec, warn: &mut impl FnMut(&str, &str)) -> Y {
    let first = || spec.ports.first().cloned().unwrap_or_default();
    let mut out: Vec<(&str, Y)> = Vec::new();
    if let Some(h) = &p.http {
        out.push((
            "httpGet",
            map(vec![
                ("path", s(&h.path)),
                ("port", s(h.port.clone().unwrap_or_else(first))),
            ]),
        ));
    } else if let Some(t) = &p.tcp {
        out.push((
            "tcpSocket",
            map(vec![("port", s(t.port.clone().unwrap_or_else(first)))]),
        ));
    } else if let Some(e) = &p.exec {
        out.push((
            "exec",
            map(vec![("command", Y::Seq(e.command.iter().map(s).collect()))]),
        ));
    }
    for (k8s, d) in [
        ("initialDelaySeconds", p.initial_delay.0),
        ("periodSeconds", p.period.0),
        ("timeoutSeconds", p.timeout.0),
    ] {
        if d.subsec_nanos() > 0 {
            warn(k8s, "Kubernetes counts whole seconds; rounded up");
        }
        out.push((
            k8s,
            int(seconds_up(d).max(u64::from(k8s != "initialDelaySeconds"))),
        ));
    }
    out.push(("successThreshold", int(p.success_threshold)));
    out.push(("failureThreshold", int(p.failure_threshold)));
    map(out)
}

/// flotilla's `${VAR}` as Kubernetes' `$(VAR)`; a literal `$` stays one, escaped (`$$`) where
/// Kubernetes would read it as the start of a reference.
pub(crate) fn to_k8s(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut rest = v;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(inner) = after.strip_prefix('{')
            && let Some(end) = inner.find('}')
        {
            out.push_str("$(");
            out.push_str(&inner[..end]);
            out.push(')');
            rest = &inner[end + 1..];
            continue;
        }
        // A literal `$` (`$$` in flotilla, or a `$` nothing follows).
        let after = after.strip_prefix('$').unwrap_or(after);
        if after.starts_with('(') || after.starts_with('$') {
            out.push_str("$$");
        } else {
            out.push('$');
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

fn emit(out: &mut String, y: &Y, indent: usize) {
    match y {
        Y::Map(entries) => {
            for (k, v) in entries {
                let _ = write!(out, "{:indent$}{}:", "", scalar(k));
                match v {
                    Y::Map(m) if m.is_empty() => out.push_str(" {}\n"),
                    Y::Seq(items) if items.is_empty() => out.push_str(" []\n"),
                    Y::Map(_) => {
                        out.push('\n');
                        emit(out, v, indent + 2);
                    }
                    Y::Seq(_) => {
                        out.push('\n');
                        emit(out, v, indent);
                    }
                    _ => {
                        out.push(' ');
                        emit(out, v, 0);
                    }
                }
            }
        }
        Y::Seq(items) => {
            for item in items {
                let _ = write!(out, "{:indent$}- ", "");
                match item {
                    Y::Map(_) | Y::Seq(_) => {
                        // The first line of the item goes after the dash.
                        let mut inner = String::new();
                        emit(&mut inner, item, indent + 2);
                        out.push_str(inner.trim_start());
                    }
                    _ => emit(out, item, 0),
                }
            }
        }
        Y::Str(v) => {
            out.push_str(&scalar(v));
            out.push('\n');
        }
        Y::Int(n) => {
            let _ = writeln!(out, "{n}");
        }
    }
}

/// A string as a YAML scalar: plain when it reads back as the same string, else quoted.
fn scalar(v: &str) -> String {
    let safe = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && !v.starts_with(['-', '.']);
    let plain = safe
        && crate::yaml::parse(&format!("k: {v}\n"))
            .ok()
            .and_then(|d| d.into_iter().next())
            .and_then(|d| d.get("k").and_then(|n| n.as_str().map(|b| b == v)))
            .unwrap_or(false);
    if plain {
        v.to_string()
    } else {
        let mut q = String::from("\"");
        for c in v.chars() {
            match c {
                '"' => q.push_str("\\\""),
                '\\' => q.push_str("\\\\"),
                '\n' => q.push_str("\\n"),
                '\t' => q.push_str("\\t"),
                c if c.is_control() => {
                    let _ = write!(q, "\\u{:04x}", u32::from(c));
                }
                c => q.push(c),
            }
        }
        q.push('"');
        q
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dollars_go_back() {
        assert_eq!(to_k8s("--port=${PORT}"), "--port=$(PORT)");
        assert_eq!(to_k8s("$$HOME"), "$HOME");
        assert_eq!(to_k8s("a$$(b)"), "a$$(b)");
        assert_eq!(to_k8s("cost: 5$"), "cost: 5$");
    }

    #[test]
    fn scalars_read_back_as_written() {
        for v in [
            "web", "8080", "true", "null", "", "a: b", "- x", "#c", "1.5", "x y", "é", "\"q\"",
        ] {
            let doc = format!("k: {}\n", scalar(v));
            let back = crate::yaml::parse(&doc).unwrap();
            assert_eq!(back[0].get("k").unwrap().as_str(), Some(v), "{doc}");
        }
    }
}
