//! Where an instance runs: a pure `place(request, nodes, placed) -> node | Unschedulable`, the
//! scheduler's whole decision (the fleet's scheduler loop feeds it from the store and writes
//! the binding). Filters first — each node that cannot take the instance says why — then a
//! score among the nodes left: least allocated (free share of CPU and memory after placing),
//! minus a penalty per instance of the same service already there (soft anti-affinity), ties
//! broken by name so the result is deterministic.
//!
//! Property-tested: it never overcommits a node, never breaks a hard constraint (readiness,
//! cordon, taints, node selector, host ports, hard anti-affinity, topology spread), and answers
//! Unschedulable only when no node passes every filter.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Resources a node offers or an instance asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub cpu_millicores: u64,
    pub memory_bytes: u64,
    pub pids: u64,
}

/// A taint: nodes repel instances that do not tolerate it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
}

/// Tolerates taints with this key (and this value, when given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toleration {
    pub key: String,
    pub value: Option<String>,
}

impl Toleration {
    fn tolerates(&self, taint: &Taint) -> bool {
        self.key == taint.key && self.value.as_ref().is_none_or(|v| *v == taint.value)
    }
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Capacity minus the node's reserve.
    pub allocatable: Capacity,
    pub ready: bool,
    /// Cordoned: takes no new instance.
    pub unschedulable: bool,
    pub taints: Vec<Taint>,
}

/// Replicas of the service spread over the values of a node label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spread {
    pub topology_key: String,
    /// Most instances a domain may have above the least loaded one (≥ 1).
    pub max_skew: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AntiAffinity {
    /// Never two instances of the service on one node.
    Hard,
    /// Rather not: a node that already runs one scores lower.
    Soft,
}

/// What an instance needs from its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub service: String,
    pub resources: Capacity,
    pub host_ports: Vec<u16>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub spread: Option<Spread>,
    pub anti_affinity: Option<AntiAffinity>,
}

/// An instance already bound to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub node: String,
    pub service: String,
    pub resources: Capacity,
    pub host_ports: Vec<u16>,
}

/// Why a node cannot take the instance (each is counted over the nodes, as Kubernetes does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    NotReady,
    Cordoned,
    UntoleratedTaint,
    NodeSelector,
    InsufficientCpu,
    InsufficientMemory,
    InsufficientPids,
    HostPort,
    AntiAffinity,
    Spread,
}

impl Reason {
    fn text(self) -> &'static str {
        match self {
            Reason::NotReady => "node(s) not ready",
            Reason::Cordoned => "node(s) cordoned",
            Reason::UntoleratedTaint => "node(s) had untolerated taints",
            Reason::NodeSelector => "node(s) didn't match the node selector",
            Reason::InsufficientCpu => "Insufficient cpu",
            Reason::InsufficientMemory => "Insufficient memory",
            Reason::InsufficientPids => "Insufficient pids",
            Reason::HostPort => "node(s) didn't have the requested host ports free",
            Reason::AntiAffinity => "node(s) already run an instance of the service",
            Reason::Spread => "node(s) would break the topology spread",
        }
    }
}

/// No node can take the instance: how many nodes there are and why each said no.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    pub nodes: usize,
    /// Reason → number of nodes that gave it (a node may give several).
    pub reasons: BTreeMap<Reason, usize>,
}

impl fmt::Display for Unschedulable {
    /// `0/3 nodes are available: 2 Insufficient memory, 1 node(s) didn't match the node
    /// selector.`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0/{} nodes are available", self.nodes)?;
        let mut reasons: Vec<(&Reason, &usize)> = self.reasons.iter().collect();
        // Most frequent first, then in a fixed order.
        reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (i, (reason, n)) in reasons.iter().enumerate() {
            let sep = if i == 0 { ": " } else { ", " };
            write!(f, "{sep}{n} {}", reason.text())?;
        }
        f.write_str(".")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Node(String),
    Unschedulable(Unschedulable),
}

/// Per node: what is already used there, and how many instances of the service run on it.
#[derive(Default)]
struct Usage {
    used: Capacity,
    ports: BTreeSet<u16>,
    same_service: u32,
}

fn usage(nodes: &[NodeInfo], placed: &[Placed], service: &str) -> BTreeMap<String, Usage> {
    let mut by_node: BTreeMap<String, Usage> = nodes
        .iter()
        .map(|n| (n.name.clone(), Usage::default()))
        .collect();
    for p in placed {
        if let Some(u) = by_node.get_mut(&p.node) {
            u.used.cpu_millicores = u
                .used
                .cpu_millicores
                .saturating_add(p.resources.cpu_millicores);
            u.used.memory_bytes = u.used.memory_bytes.saturating_add(p.resources.memory_bytes);
            u.used.pids = u.used.pids.saturating_add(p.resources.pids);
            u.ports.extend(p.host_ports.iter().copied());
            if p.service == service {
                u.same_service += 1;
            }
        }
    }
    by_node
}

/// Whether `need` more fits in `allocatable` with `used` taken.
fn fits(need: u64, used: u64, allocatable: u64) -> bool {
    need == 0 || used.saturating_add(need) <= allocatable
}

/// The reasons `node` cannot take `req` (empty: it can), spread aside.
fn filter(req: &Request, node: &NodeInfo, u: &Usage) -> Vec<Reason> {
    let mut why = Vec::new();
    if !node.ready {
        why.push(Reason::NotReady);
    }
    if node.unschedulable {
        why.push(Reason::Cordoned);
    }
    if node
        .taints
        .iter()
        .any(|t| !req.tolerations.iter().any(|tol| tol.tolerates(t)))
    {
        why.push(Reason::UntoleratedTaint);
    }
    if req
        .node_selector
        .iter()
        .any(|(k, v)| node.labels.get(k) != Some(v))
    {
        why.push(Reason::NodeSelector);
    }
    let (r, a) = (req.resources, node.allocatable);
    if !fits(r.cpu_millicores, u.used.cpu_millicores, a.cpu_millicores) {
        why.push(Reason::InsufficientCpu);
    }
    if !fits(r.memory_bytes, u.used.memory_bytes, a.memory_bytes) {
        why.push(Reason::InsufficientMemory);
    }
    if !fits(r.pids, u.used.pids, a.pids) {
        why.push(Reason::InsufficientPids);
    }
    if req.host_ports.iter().any(|p| u.ports.contains(p)) {
        why.push(Reason::HostPort);
    }
    if req.anti_affinity == Some(AntiAffinity::Hard) && u.same_service > 0 {
        why.push(Reason::AntiAffinity);
    }
    why
}

/// Free share (0–1000 per resource, averaged over CPU and memory) left after placing.
fn least_allocated(req: &Request, node: &NodeInfo, u: &Usage) -> u64 {
    let share = |need: u64, used: u64, total: u64| -> u64 {
        if total == 0 {
            return 0;
        }
        let after = used.saturating_add(need).min(total);
        (total - after).saturating_mul(1000) / total
    };
    let a = node.allocatable;
    (share(
        req.resources.cpu_millicores,
        u.used.cpu_millicores,
        a.cpu_millicores,
    ) + share(
        req.resources.memory_bytes,
        u.used.memory_bytes,
        a.memory_bytes,
    )) / 2
}

/// Points taken off per instance of the same service on a node (soft anti-affinity).
const SOFT_ANTI_AFFINITY_PENALTY: i64 = 500;

/// Chooses the node for `req` among `nodes`, given the instances already `placed`.
pub fn place(req: &Request, nodes: &[NodeInfo], placed: &[Placed]) -> Placement {
    let usage = usage(nodes, placed, &req.service);
    let empty = Usage::default();
    let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
    let mut feasible: Vec<&NodeInfo> = Vec::new();
    for node in nodes {
        let why = filter(req, node, usage.get(&node.name).unwrap_or(&empty));
        if why.is_empty() {
            feasible.push(node);
        }
        for r in why {
            *reasons.entry(r).or_insert(0) += 1;
        }
    }
    if let Some(spread) = &req.spread {
        let allowed = within_skew(spread, nodes, &feasible, &usage);
        let before = feasible.len();
        feasible.retain(|n| allowed.contains(n.name.as_str()));
        if feasible.len() < before {
            *reasons.entry(Reason::Spread).or_insert(0) += before - feasible.len();
        }
    }
    let best = feasible.into_iter().max_by(|a, b| {
        // Signed: the penalty must keep counting past the free share (a saturating score
        // would tie every node that already runs two and pile the rest on the first name).
        let score = |n: &NodeInfo| {
            let u = usage.get(&n.name).unwrap_or(&empty);
            let mut s = i64::try_from(least_allocated(req, n, u)).unwrap_or(i64::MAX);
            if req.anti_affinity == Some(AntiAffinity::Soft) {
                s -= SOFT_ANTI_AFFINITY_PENALTY * i64::from(u.same_service);
            }
            s
        };
        // Higher score wins; on a tie the name first in order does.
        score(a).cmp(&score(b)).then_with(|| b.name.cmp(&a.name))
    });
    match best {
        Some(node) => Placement::Node(node.name.clone()),
        None => Placement::Unschedulable(Unschedulable {
            nodes: nodes.len(),
            reasons,
        }),
    }
}

/// The feasible nodes where one more instance keeps the spread within `max_skew`. Domains are
/// the values of the topology key; a domain's count is the service's instances on all its
/// nodes, and the least loaded domain is sought among those with a feasible node (a domain
/// whose nodes are all full or cordoned cannot hold the others back). A node without the label
/// is in no domain and takes no spread instance.
fn within_skew<'a>(
    spread: &Spread,
    nodes: &[NodeInfo],
    feasible: &[&'a NodeInfo],
    usage: &BTreeMap<String, Usage>,
) -> BTreeSet<&'a str> {
    let domain = |n: &NodeInfo| n.labels.get(&spread.topology_key).cloned();
    let mut count: BTreeMap<String, u32> = BTreeMap::new();
    for n in nodes {
        if let Some(d) = domain(n) {
            *count.entry(d).or_insert(0) += usage.get(&n.name).map_or(0, |u| u.same_service);
        }
    }
    let eligible: BTreeSet<String> = feasible.iter().filter_map(|n| domain(n)).collect();
    let Some(min) = eligible.iter().filter_map(|d| count.get(d)).min().copied() else {
        return BTreeSet::new();
    };
    feasible
        .iter()
        .filter(|n| {
            domain(n)
                .and_then(|d| count.get(&d).copied())
                .is_some_and(|c| c + 1 - min <= spread.max_skew.max(1))
        })
        .map(|n| n.name.as_str())
        .collect()
}

#[cfg(test)]
mod tests;
