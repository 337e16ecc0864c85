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

use std::collections::{BTreeMap, HashMap};
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

/// Every reason, in the order of their discriminants.
const REASONS: [Reason; 10] = [
    Reason::NotReady,
    Reason::Cordoned,
    Reason::UntoleratedTaint,
    Reason::NodeSelector,
    Reason::InsufficientCpu,
    Reason::InsufficientMemory,
    Reason::InsufficientPids,
    Reason::HostPort,
    Reason::AntiAffinity,
    Reason::Spread,
];

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

/// What is already used on one node.
#[derive(Debug, Default, Clone)]
struct Used {
    res: Capacity,
    ports: Vec<u16>,
}

/// Whether `need` more fits in `allocatable` with `used` taken.
fn fits(need: u64, used: u64, allocatable: u64) -> bool {
    need == 0 || used.saturating_add(need) <= allocatable
}

/// The reasons `node` cannot take `req` as a set of [`Reason`] bits (0: it can), spread
/// aside; `same` counts the service's instances already there (asked only for hard
/// anti-affinity: a map lookup per node looked at is a good part of a scan).
fn filter(req: &Request, node: &NodeInfo, u: &Used, same: impl Fn() -> u32) -> u16 {
    let mut why = 0u16;
    let mut no = |r: Reason| why |= 1 << (r as u16);
    if !node.ready {
        no(Reason::NotReady);
    }
    if node.unschedulable {
        no(Reason::Cordoned);
    }
    if node
        .taints
        .iter()
        .any(|t| !req.tolerations.iter().any(|tol| tol.tolerates(t)))
    {
        no(Reason::UntoleratedTaint);
    }
    if req
        .node_selector
        .iter()
        .any(|(k, v)| node.labels.get(k) != Some(v))
    {
        no(Reason::NodeSelector);
    }
    let (r, a) = (req.resources, node.allocatable);
    if !fits(r.cpu_millicores, u.res.cpu_millicores, a.cpu_millicores) {
        no(Reason::InsufficientCpu);
    }
    if !fits(r.memory_bytes, u.res.memory_bytes, a.memory_bytes) {
        no(Reason::InsufficientMemory);
    }
    if !fits(r.pids, u.res.pids, a.pids) {
        no(Reason::InsufficientPids);
    }
    if req.host_ports.iter().any(|p| u.ports.contains(p)) {
        no(Reason::HostPort);
    }
    if req.anti_affinity == Some(AntiAffinity::Hard) && same() > 0 {
        no(Reason::AntiAffinity);
    }
    why
}

/// Free share (0–1000 per resource, averaged over CPU and memory) left after placing.
fn least_allocated(req: &Request, node: &NodeInfo, u: &Used) -> u64 {
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
        u.res.cpu_millicores,
        a.cpu_millicores,
    ) + share(
        req.resources.memory_bytes,
        u.res.memory_bytes,
        a.memory_bytes,
    )) / 2
}

/// Points taken off per instance of the same service on a node (soft anti-affinity).
const SOFT_ANTI_AFFINITY_PENALTY: i64 = 500;

/// Chooses the node for `req` among `nodes`, given the instances already `placed`.
pub fn place(req: &Request, nodes: &[NodeInfo], placed: &[Placed]) -> Placement {
    Snapshot::new(nodes.to_vec(), placed).place(req)
}

/// The nodes and what runs on them, kept up to date placement by placement ([`Snapshot::bind`])
/// so that placing one instance costs a scan of (some of) the nodes, not of every instance.
///
/// Like kube-scheduler, a placement without a spread constraint stops looking once it has
/// found enough feasible nodes (all of them up to 100 nodes; then 50 % less 1 % per 125 nodes,
/// at least 5 % and 100 nodes: 500 of 5,000), starting where the last scan stopped so that
/// every node gets its turn. It only answers Unschedulable after looking at every node. A
/// spread constraint looks at every node: the skew is defined over all domains that can take
/// the instance.
#[derive(Debug, Clone)]
pub struct Snapshot {
    nodes: Vec<NodeInfo>,
    used: Vec<Used>,
    index: HashMap<String, usize>,
    /// Per service: its instances per node index.
    services: HashMap<String, FnvHashMap<usize, u32>>,
    /// Per topology key: each node's domain (an index into the key's domain names).
    domains: HashMap<String, Domains>,
    /// Where the next sampled scan starts.
    cursor: usize,
}

type FnvHashMap<K, V> = HashMap<K, V, fnv::FnvBuildHasher>;

/// The values of one node label: which one each node has.
#[derive(Debug, Clone)]
struct Domains {
    of_node: Vec<Option<u32>>,
    count: usize,
}

impl Domains {
    fn new(nodes: &[NodeInfo], key: &str) -> Domains {
        let mut names: HashMap<&str, u32> = HashMap::new();
        let of_node = nodes
            .iter()
            .map(|n| {
                n.labels.get(key).map(|v| {
                    let next = u32::try_from(names.len()).unwrap_or(u32::MAX);
                    *names.entry(v.as_str()).or_insert(next)
                })
            })
            .collect();
        Domains {
            of_node,
            count: names.len(),
        }
    }
}

impl Snapshot {
    pub fn new(nodes: Vec<NodeInfo>, placed: &[Placed]) -> Snapshot {
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let mut s = Snapshot {
            used: vec![Used::default(); nodes.len()],
            nodes,
            index,
            services: HashMap::new(),
            domains: HashMap::new(),
            cursor: 0,
        };
        for p in placed {
            s.bind(p);
        }
        s
    }

    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// Records an instance on its node (ignored when the node is not in the snapshot).
    pub fn bind(&mut self, p: &Placed) {
        let Some(&i) = self.index.get(&p.node) else {
            return;
        };
        let u = &mut self.used[i];
        u.res.cpu_millicores = u
            .res
            .cpu_millicores
            .saturating_add(p.resources.cpu_millicores);
        u.res.memory_bytes = u.res.memory_bytes.saturating_add(p.resources.memory_bytes);
        u.res.pids = u.res.pids.saturating_add(p.resources.pids);
        u.ports.extend(p.host_ports.iter().copied());
        let counts = match self.services.get_mut(&p.service) {
            Some(c) => c,
            None => self.services.entry(p.service.clone()).or_default(),
        };
        *counts.entry(i).or_insert(0) += 1;
    }

    /// How many feasible nodes a sampled scan looks for.
    fn wanted(&self) -> usize {
        let n = self.nodes.len();
        if n <= 100 {
            return n;
        }
        let percent = 50usize.saturating_sub(n / 125).max(5);
        (n * percent / 100).max(100)
    }

    /// Chooses the node for `req`; binding it is the caller's ([`Snapshot::bind`]).
    pub fn place(&mut self, req: &Request) -> Placement {
        let n = self.nodes.len();
        if let Some(spread) = &req.spread
            && !self.domains.contains_key(&spread.topology_key)
        {
            let d = Domains::new(&self.nodes, &spread.topology_key);
            self.domains.insert(spread.topology_key.clone(), d);
        }
        let domains = req
            .spread
            .as_ref()
            .and_then(|s| self.domains.get(&s.topology_key));
        let counts = self.services.get(&req.service);
        let same = |i: usize| counts.and_then(|c| c.get(&i)).copied().unwrap_or(0);
        // The service's instances per domain, and which domains have a feasible node so far.
        let mut per_domain: Vec<u32> = Vec::new();
        let mut seen_domain: Vec<bool> = Vec::new();
        let mut domains_left = 0;
        if let Some(d) = domains {
            per_domain = vec![0; d.count];
            seen_domain = vec![false; d.count];
            domains_left = d.count;
            for (&i, &c) in counts.into_iter().flatten() {
                if let Some(Some(x)) = d.of_node.get(i) {
                    per_domain[*x as usize] += c;
                }
            }
        }
        let wanted = self.wanted();
        // Nodes that gave each reason, by `Reason as usize`.
        let mut refused = [0usize; REASONS.len()];
        let mut feasible: Vec<usize> = Vec::new();
        let mut scanned = 0;
        // Enough feasible nodes, and (with a spread) one in every domain: the least loaded
        // domain that can take the instance is then known exactly.
        while scanned < n && (feasible.len() < wanted || domains_left > 0) {
            let i = (self.cursor + scanned) % n;
            scanned += 1;
            let why = filter(req, &self.nodes[i], &self.used[i], || same(i));
            if why == 0 {
                feasible.push(i);
                if let Some(Some(x)) = domains.map(|d| d.of_node[i])
                    && !seen_domain[x as usize]
                {
                    seen_domain[x as usize] = true;
                    domains_left -= 1;
                }
            }
            if why != 0 {
                for (bit, count) in refused.iter_mut().enumerate() {
                    if why & (1 << bit) != 0 {
                        *count += 1;
                    }
                }
            }
        }
        if n > 0 {
            self.cursor = (self.cursor + scanned) % n;
        }
        if let (Some(spread), Some(d)) = (&req.spread, domains) {
            let min = (0..d.count)
                .filter(|&x| seen_domain[x])
                .map(|x| per_domain[x])
                .min();
            let before = feasible.len();
            feasible.retain(|&i| match (d.of_node[i], min) {
                (Some(x), Some(min)) => per_domain[x as usize] + 1 - min <= spread.max_skew.max(1),
                _ => false,
            });
            refused[Reason::Spread as usize] += before - feasible.len();
        }
        // Signed: the penalty must keep counting past the free share (a saturating score
        // would tie every node that already runs two and pile the rest on the first name).
        let soft = req.anti_affinity == Some(AntiAffinity::Soft);
        let mut best: Option<(i64, usize)> = None;
        for i in feasible {
            let mut score = i64::try_from(least_allocated(req, &self.nodes[i], &self.used[i]))
                .unwrap_or(i64::MAX);
            if soft {
                score -= SOFT_ANTI_AFFINITY_PENALTY * i64::from(same(i));
            }
            // Higher score wins; on a tie the name first in order does.
            let better = match best {
                None => true,
                Some((s, b)) => {
                    score > s || (score == s && self.nodes[i].name < self.nodes[b].name)
                }
            };
            if better {
                best = Some((score, i));
            }
        }
        match best {
            Some((_, i)) => Placement::Node(self.nodes[i].name.clone()),
            None => Placement::Unschedulable(Unschedulable {
                nodes: n,
                reasons: REASONS
                    .iter()
                    .zip(refused)
                    .filter(|(_, count)| *count > 0)
                    .map(|(r, count)| (*r, count))
                    .collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
