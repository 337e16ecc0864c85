//! Tables and descriptions for people.

use std::fmt::Write;
use std::time::SystemTime;

use flotilla_spec::{Event, Instance, Service};

/// Left-aligned columns separated by three spaces. Rows and header have the same width by type,
/// so a column added to one cannot be forgotten in the other.
fn table<const N: usize>(header: [&str; N], rows: Vec<[String; N]>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [String; N]| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                l.push_str(cell);
                l.push_str(&" ".repeat(pad + 3));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.map(str::to_string));
    for row in rows {
        line(row);
    }
    out
}

/// `5s`, `3m`, `2h`, `4d` since an RFC 3339 time.
pub fn age(ts: Option<&str>) -> String {
    let Some(t) = ts.and_then(|t| humantime::parse_rfc3339_weak(t).ok()) else {
        return "-".to_string();
    };
    let secs = SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

fn routes(s: &Service) -> String {
    if s.spec.routes.is_empty() {
        return "-".to_string();
    }
    s.spec
        .routes
        .iter()
        .map(|r| format!("{}{}", r.host.as_deref().unwrap_or("*"), r.path))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn services_table(items: &[Service]) -> String {
    let rows = items
        .iter()
        .map(|s| {
            [
                s.metadata.name.clone(),
                format!("{}/{}", s.status.ready_replicas, s.spec.replicas),
                s.status.replicas.to_string(),
                s.status.revision.to_string(),
                s.status
                    .rollout
                    .as_ref()
                    .map(|r| r.phase.as_str().to_string())
                    .unwrap_or_else(|| "-".to_string()),
                routes(s),
                age(s.metadata.creation_timestamp.as_deref()),
            ]
        })
        .collect();
    table(
        [
            "NAME",
            "READY",
            "INSTANCES",
            "REVISION",
            "ROLLOUT",
            "ROUTES",
            "AGE",
        ],
        rows,
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.1}Mi", bytes as f64 / (1024.0 * 1024.0))
}

pub fn phase(i: &Instance) -> String {
    if i.metadata.deletion_timestamp.is_some() && i.status.phase != flotilla_spec::Phase::Stopping {
        return "Terminating".to_string();
    }
    let mut p = i.status.phase.as_str().to_string();
    if let Some(exit) = &i.status.last_exit
        && exit.oom_killed
        && !i.status.ready
    {
        p.push_str(" (OOMKilled)");
    }
    p
}

pub fn instances_table(items: &[Instance]) -> String {
    let rows = items
        .iter()
        .map(|i| {
            let ports = i
                .status
                .ports
                .iter()
                .map(|(n, p)| format!("{n}:{p}"))
                .collect::<Vec<_>>()
                .join(",");
            let (cpu, mem) = match &i.status.usage {
                Some(u) => (format!("{}m", u.cpu_millicores), mib(u.memory_bytes)),
                None => ("-".to_string(), "-".to_string()),
            };
            [
                i.metadata.name.clone(),
                i.spec.service.clone(),
                phase(i),
                if i.status.ready { "yes" } else { "no" }.to_string(),
                i.status.restarts.to_string(),
                i.status
                    .pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                if ports.is_empty() { "-".into() } else { ports },
                cpu,
                mem,
                age(i.metadata.creation_timestamp.as_deref()),
            ]
        })
        .collect();
    table(
        [
            "NAME", "SERVICE", "PHASE", "READY", "RESTARTS", "PID", "PORTS", "CPU", "MEMORY", "AGE",
        ],
        rows,
    )
}

pub fn events_header() -> String {
    format!(
        "{:<24} {:<8} {:<14} {:<28} {}\n",
        "TIME", "TYPE", "REASON", "OBJECT", "MESSAGE"
    )
}

pub fn event_row(e: &Event) -> String {
    format!(
        "{:<24} {:<8} {:<14} {:<28} {}\n",
        e.timestamp,
        format!("{:?}", e.kind),
        e.reason,
        format!("{}/{}", e.involved.kind.to_lowercase(), e.involved.name),
        e.message
    )
}

pub fn events_table(items: &[Event]) -> String {
    let mut out = events_header();
    for e in items {
        out.push_str(&event_row(e));
    }
    out
}

pub fn describe_service(s: &Service, instances: &[Instance], events: &[Event]) -> String {
    let mut out = String::new();
    let m = &s.metadata;
    let _ = writeln!(out, "Name:          {}", m.name);
    let _ = writeln!(out, "UID:           {}", m.uid);
    let _ = writeln!(
        out,
        "Generation:    {} (observed {})",
        m.generation, s.status.observed_generation
    );
    let _ = writeln!(out, "Version:       {}", m.resource_version);
    let _ = writeln!(
        out,
        "Created:       {} ({} ago)",
        m.creation_timestamp.as_deref().unwrap_or("-"),
        age(m.creation_timestamp.as_deref())
    );
    if !m.labels.is_empty() {
        let labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "Labels:        {}", labels.join(","));
    }
    let _ = writeln!(
        out,
        "Replicas:      {} desired, {} ready",
        s.spec.replicas, s.status.ready_replicas
    );
    let last_good = match s.status.last_good_revision {
        0 => "no good revision yet".to_string(),
        n => format!("last good {n}"),
    };
    let _ = writeln!(out, "Revision:      {} ({last_good})", s.status.revision);
    if let Some(r) = &s.status.rollout {
        let _ = writeln!(out, "Rollout:       {}: {}", r.phase.as_str(), r.message);
    }
    let _ = writeln!(out, "Spec hash:     {}", s.status.spec_hash);
    let _ = writeln!(out, "\nSpec:");
    let spec = toml::to_string(&s.spec).unwrap_or_else(|e| format!("(cannot render: {e})\n"));
    for line in spec.lines() {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(out, "\nInstances:");
    if instances.is_empty() {
        let _ = writeln!(out, "  <none>");
    } else {
        for line in instances_table(instances).lines() {
            let _ = writeln!(out, "  {line}");
        }
        for i in instances {
            if let Some(exit) = &i.status.last_exit {
                let _ = writeln!(
                    out,
                    "  {}: last exit {} (code {}, signal {}) at {}",
                    i.metadata.name,
                    exit.reason,
                    exit.code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    exit.signal
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    exit.at
                );
            }
            if let Some(msg) = &i.status.message {
                let _ = writeln!(out, "  {}: {msg}", i.metadata.name);
            }
        }
    }
    let _ = writeln!(out, "\nEvents:");
    if events.is_empty() {
        let _ = writeln!(out, "  <none>");
    } else {
        for line in events_table(events).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

pub fn revisions_table(items: &[flotilla_spec::Revision], current: u64) -> String {
    let rows = items
        .iter()
        .map(|r| {
            let mark = if r.spec.number == current { "*" } else { "" };
            [
                format!("{}{mark}", r.spec.number),
                age(r.metadata.creation_timestamp.as_deref()),
                r.spec.cause.clone(),
                if r.spec.changes.is_empty() {
                    "-".to_string()
                } else {
                    r.spec.changes.join(", ")
                },
            ]
        })
        .collect();
    table(["REVISION", "AGE", "CAUSE", "CHANGED"], rows)
}
