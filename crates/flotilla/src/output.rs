//! Tables and descriptions for people.

use std::fmt::Write;
use std::time::SystemTime;

use flotilla_spec::{Event, Instance, Service};

/// A table column: its header, and the width past which its cells are cut short with `…`
/// (unless the table is wide). Names are never cut: people copy them.
#[derive(Clone, Copy)]
struct Col {
    name: &'static str,
    max: Option<usize>,
}

const fn col(name: &'static str) -> Col {
    Col { name, max: None }
}

const fn cut(name: &'static str, max: usize) -> Col {
    Col {
        name,
        max: Some(max),
    }
}

/// `s` in at most `max` characters: cut short with `…` when longer.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Left-aligned columns separated by three spaces; long cells of capped columns are cut short
/// unless `wide`. Rows and header have the same width by type, so a column added to one cannot
/// be forgotten in the other.
fn table<const N: usize>(cols: [Col; N], rows: Vec<[String; N]>, wide: bool) -> String {
    let rows: Vec<[String; N]> = rows
        .into_iter()
        .map(|row| {
            let mut i = 0;
            row.map(|cell| {
                let c = cols[i];
                i += 1;
                match c.max {
                    Some(max) if !wide => truncate(&cell, max),
                    _ => cell,
                }
            })
        })
        .collect();
    let mut widths: Vec<usize> = cols.iter().map(|c| c.name.chars().count()).collect();
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
    line(cols.map(|c| c.name.to_string()));
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
    span(secs)
}

/// `42s`, `5m`, `3h`, `2d`: the way ages are shown.
fn span(secs: u64) -> String {
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

pub fn services_table(items: &[Service], wide: bool) -> String {
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
            col("NAME"),
            col("READY"),
            col("INSTANCES"),
            col("REVISION"),
            col("ROLLOUT"),
            cut("ROUTES", 40),
            col("AGE"),
        ],
        rows,
        wide,
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

const INSTANCE_COLS: [Col; 10] = [
    col("NAME"),
    col("SERVICE"),
    cut("PHASE", 24),
    col("READY"),
    col("RESTARTS"),
    col("PID"),
    cut("PORTS", 32),
    col("CPU"),
    col("MEMORY"),
    col("AGE"),
];

fn instance_row(i: &Instance) -> [String; 10] {
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
}

/// Instances; `wide` adds where each runs (NODE, and HOST: the address it listens on).
pub fn instances_table(items: &[Instance], wide: bool) -> String {
    if !wide {
        return table(
            INSTANCE_COLS,
            items.iter().map(instance_row).collect(),
            false,
        );
    }
    let mut cols = [col(""); 12];
    cols[..10].copy_from_slice(&INSTANCE_COLS);
    cols[10] = col("NODE");
    cols[11] = col("HOST");
    let rows = items
        .iter()
        .map(|i| {
            let base = instance_row(i);
            let mut row: [String; 12] = Default::default();
            for (slot, cell) in row.iter_mut().zip(base) {
                *slot = cell;
            }
            row[10] = i.spec.node.clone();
            row[11] = i.status.host.clone().unwrap_or_else(|| "-".into());
            row
        })
        .collect();
    table(cols, rows, true)
}

/// Event columns have fixed widths, so that a followed stream stays aligned row after row:
/// longer values are cut short with `…` (all of them shown with `-o wide`, unaligned).
const EVENT_COLS: [(&str, usize); 4] = [("TIME", 24), ("TYPE", 8), ("REASON", 20), ("OBJECT", 36)];

pub fn events_header() -> String {
    let mut out = String::new();
    for (name, width) in EVENT_COLS {
        let _ = write!(out, "{name:<width$}   ");
    }
    out.push_str("MESSAGE\n");
    out
}

pub fn event_row(e: &Event, wide: bool) -> String {
    let cells = [
        e.timestamp.clone(),
        format!("{:?}", e.kind),
        e.reason.clone(),
        format!("{}/{}", e.involved.kind.to_lowercase(), e.involved.name),
    ];
    let mut out = String::new();
    for (cell, (_, width)) in cells.iter().zip(EVENT_COLS) {
        let cell = if wide {
            cell.clone()
        } else {
            truncate(cell, width)
        };
        let _ = write!(out, "{cell:<width$}   ");
    }
    out.push_str(&e.message);
    out.push('\n');
    out
}

pub fn events_table(items: &[Event], wide: bool) -> String {
    let mut out = events_header();
    for e in items {
        out.push_str(&event_row(e, wide));
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
        for line in instances_table(instances, false).lines() {
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
        for line in events_table(events, false).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

pub fn revisions_table(items: &[flotilla_spec::Revision], current: u64, wide: bool) -> String {
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
    table(
        [
            col("REVISION"),
            col("AGE"),
            cut("CAUSE", 60),
            col("CHANGED"),
        ],
        rows,
        wide,
    )
}

/// A node's last heartbeat, as the control plane saw it.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    pub age_millis: u64,
    pub lease_seconds: u64,
}

/// A node as the API shows it: the object and its last heartbeat.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeView {
    pub metadata: flotilla_spec::ObjectMeta,
    #[serde(default)]
    pub spec: flotilla_spec::NodeSpec,
    #[serde(default)]
    pub status: flotilla_spec::NodeStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<Heartbeat>,
}

impl NodeView {
    /// `Ready`, `NotReady` or `Unknown`, with `,SchedulingDisabled` when cordoned.
    pub fn status_word(&self) -> String {
        let mut s = match self.status.condition("Ready") {
            Some(c) if c.status => "Ready".to_string(),
            Some(_) => "NotReady".to_string(),
            None => "Unknown".to_string(),
        };
        if self.spec.unschedulable {
            s.push_str(",SchedulingDisabled");
        }
        for kind in [flotilla_spec::MEMORY_PRESSURE, flotilla_spec::DISK_PRESSURE] {
            if self.status.condition(kind).is_some_and(|c| c.status) {
                s.push(',');
                s.push_str(kind);
            }
        }
        s
    }
}

/// `2`, `1.5` cores from millicores.
fn cores(millicores: u64) -> String {
    if millicores.is_multiple_of(1000) {
        (millicores / 1000).to_string()
    } else {
        format!("{:.1}", millicores as f64 / 1000.0)
    }
}

/// `15.5Gi`, `512Mi`.
fn bytes(b: u64) -> String {
    const GI: f64 = 1024.0 * 1024.0 * 1024.0;
    if b as f64 >= GI {
        format!("{:.1}Gi", b as f64 / GI)
    } else {
        mib(b)
    }
}

fn labels(l: &std::collections::BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return "-".to_string();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Nodes with the number of instances bound to each.
pub fn nodes_table(items: &[(NodeView, usize)], wide: bool) -> String {
    let rows = items
        .iter()
        .map(|(n, instances)| {
            [
                n.metadata.name.clone(),
                n.status_word(),
                cores(n.status.allocatable.cpu_millicores),
                bytes(n.status.allocatable.memory_bytes),
                instances.to_string(),
                if wide {
                    labels(&n.metadata.labels)
                } else {
                    // The operator's labels; the agent's own (flotilla.dev/…) with -o wide.
                    labels(
                        &n.metadata
                            .labels
                            .iter()
                            .filter(|(k, _)| !k.starts_with("flotilla.dev/"))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    )
                },
                age(n.metadata.creation_timestamp.as_deref()),
                n.heartbeat
                    .map_or_else(|| "-".to_string(), |h| span(h.age_millis / 1000)),
            ]
        })
        .collect();
    table(
        [
            col("NAME"),
            col("STATUS"),
            col("CPU"),
            col("MEMORY"),
            col("INSTANCES"),
            cut("LABELS", 48),
            col("AGE"),
            col("HEARTBEAT"),
        ],
        rows,
        wide,
    )
}

pub fn describe_node(n: &NodeView, instances: &[Instance]) -> String {
    let mut out = String::new();
    let s = &n.status;
    let _ = writeln!(out, "Name:          {}", n.metadata.name);
    let _ = writeln!(out, "Status:        {}", n.status_word());
    if let Some(c) = s.condition("Ready") {
        let _ = writeln!(
            out,
            "Ready:         {} ({}: {}) since {}",
            c.status, c.reason, c.message, c.last_transition
        );
    }
    for (kind, label) in [
        (flotilla_spec::MEMORY_PRESSURE, "MemoryPressure:"),
        (flotilla_spec::DISK_PRESSURE, "DiskPressure:  "),
    ] {
        if let Some(c) = s.condition(kind) {
            let _ = writeln!(
                out,
                "{label} {} ({}: {}) since {}",
                c.status, c.reason, c.message, c.last_transition
            );
        }
    }
    let _ = writeln!(out, "Address:       {}", s.address);
    let _ = writeln!(
        out,
        "Capacity:      cpu {}, memory {}, pids {}",
        cores(s.capacity.cpu_millicores),
        bytes(s.capacity.memory_bytes),
        s.capacity.pids
    );
    let _ = writeln!(
        out,
        "Allocatable:   cpu {}, memory {}, pids {}",
        cores(s.allocatable.cpu_millicores),
        bytes(s.allocatable.memory_bytes),
        s.allocatable.pids
    );
    let _ = writeln!(out, "Labels:        {}", labels(&n.metadata.labels));
    if !n.spec.taints.is_empty() {
        let taints: Vec<String> = n
            .spec
            .taints
            .iter()
            .map(|t| format!("{}={}", t.key, t.value))
            .collect();
        let _ = writeln!(out, "Taints:        {}", taints.join(", "));
    }
    let _ = writeln!(out, "Agent:         {}", s.agent_version);
    let _ = writeln!(
        out,
        "Registered:    {}",
        s.registered_at.as_deref().unwrap_or("-")
    );
    match n.heartbeat {
        Some(h) => {
            let _ = writeln!(
                out,
                "Heartbeat:     {} ago (lease {}s)",
                span(h.age_millis / 1000),
                h.lease_seconds
            );
        }
        None => {
            let _ = writeln!(out, "Heartbeat:     none since the control plane started");
        }
    }
    let _ = writeln!(out, "\nInstances:");
    if instances.is_empty() {
        let _ = writeln!(out, "  (none)");
    } else {
        for line in instances_table(instances, false).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn long_values_are_cut_short_and_columns_stay_aligned() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
        assert_eq!(truncate("ééééé", 3), "éé…");
        let rows = vec![
            ["a".to_string(), "x".repeat(100), "1".to_string()],
            ["bb".to_string(), "y".to_string(), "2".to_string()],
        ];
        let cols = [col("NAME"), cut("ROUTES", 10), col("AGE")];
        let t = table(cols, rows.clone(), false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[1], format!("a      {}…   1", "x".repeat(9)));
        // AGE starts at the same column on every line.
        let age_at = lines[0].find("AGE").unwrap();
        for l in &lines[1..] {
            assert_eq!(l.chars().count() - 1, age_at, "{t}");
        }
        let wide = table(cols, rows, true);
        assert!(wide.contains(&"x".repeat(100)), "{wide}");
    }

    #[test]
    fn event_rows_keep_their_columns_whatever_the_values() {
        let event = |object: &str, reason: &str| Event {
            metadata: flotilla_spec::ObjectMeta::named("e"),
            involved: flotilla_spec::object::ObjectRef {
                kind: "Service".into(),
                name: object.into(),
            },
            kind: flotilla_spec::object::EventType::Normal,
            reason: reason.into(),
            message: "the message".into(),
            source: "test".into(),
            timestamp: "2026-12-01T10:00:00.000Z".into(),
        };
        let header = events_header();
        let short = event_row(&event("web", "Applied"), false);
        let long = event_row(&event(&"n".repeat(60), &"R".repeat(40)), false);
        let message_at = |l: &str| l.find("MESSAGE").or_else(|| l.find("the message")).unwrap();
        let char_at = |l: &str| l[..message_at(l)].chars().count();
        assert_eq!(char_at(&header), char_at(&short));
        assert_eq!(char_at(&header), char_at(&long), "{header}{long}");
        assert!(long.contains('…'));
        let wide = event_row(&event(&"n".repeat(60), "Applied"), true);
        assert!(wide.contains(&"n".repeat(60)));
    }
}

/// `GET /api/v1/servers`, as `get servers` prints it.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServersView {
    pub items: Vec<ServerRow>,
    pub store: StoreRow,
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerRow {
    pub name: String,
    pub api: String,
    pub version: String,
    pub started_at: String,
    pub leader: bool,
    pub answering: bool,
    /// Whether it answered the answering server (absent: the answering one, or not asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreRow {
    pub kind: String,
    pub location: String,
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberRow>,
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberRow {
    pub name: String,
    pub url: String,
    pub healthy: bool,
    pub leader: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The servers (which leads, which answered), then the store and its members.
pub fn servers_table(view: &ServersView, wide: bool) -> String {
    let rows = view
        .items
        .iter()
        .map(|s| {
            let mut role = if s.leader { "leader" } else { "follower" }.to_string();
            if s.answering {
                role.push_str(" (answered)");
            } else if s.reachable == Some(false) {
                role.push_str(" (unreachable)");
            }
            [
                s.name.clone(),
                role,
                s.api.clone(),
                s.version.clone(),
                age(Some(&s.started_at)),
            ]
        })
        .collect();
    let mut out = table(
        [
            col("NAME"),
            col("ROLE"),
            col("API"),
            col("VERSION"),
            col("AGE"),
        ],
        rows,
        wide,
    );
    if !view.items.iter().any(|s| s.leader) && view.store.kind == "etcd" {
        out.push_str(
            "no server leads right now (an election is under way, or etcd has no quorum)\n",
        );
    }
    let store = &view.store;
    let health = if store.healthy {
        "healthy"
    } else {
        "UNHEALTHY"
    };
    let _ = writeln!(out, "\nSTORE  {} {}  {health}", store.kind, store.location);
    if let Some(e) = &store.error {
        let _ = writeln!(out, "  error: {e}");
    }
    if !store.members.is_empty() {
        let rows = store
            .members
            .iter()
            .map(|m| {
                let mut status = if m.healthy { "healthy" } else { "unreachable" }.to_string();
                if m.leader {
                    status.push_str(", etcd leader");
                }
                [
                    m.name.clone(),
                    status,
                    m.url.clone(),
                    m.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&table(
            [col("MEMBER"), col("STATUS"), col("URL"), cut("ERROR", 60)],
            rows,
            wide,
        ));
    }
    out
}
