//! Where an instance runs: a pure `place(request, nodes, placed) -> node | Unschedulable`, the
//! scheduler's whole decision (the fleet's scheduler loop feeds it from the store and writes
//! the binding). Filters first — each node that cannot take the instance says why — then a
//! score among the nodes left: least allocated (free share of CPU and memory after placing),
//! minus a penalty per instance of the same service already there (soft anti-affinity), ties
//! broken by the number of instances on the node, then by name, so the result is deterministic.
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
    /// Its agent reports memory or disk pressure: takes no new instance.
    pub memory_pressure: bool,
    pub disk_pressure: bool,
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub service: String,
    /// Placement priority: it may preempt instances of lower priority.
    pub priority: i32,
    /// The instance being placed, when it exists already (its own reservation is not in its
    /// way).
    pub instance: String,
    pub resources: Capacity,
    pub host_ports: Vec<u16>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub spread: Option<Spread>,
    pub anti_affinity: Option<AntiAffinity>,
}

/// An instance already bound to a node (or a pending one holding room on the node it
/// preempted instances on: `nominated`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placed {
    pub node: String,
    pub service: String,
    pub resources: Capacity,
    pub host_ports: Vec<u16>,
    /// Its name (empty: anonymous, never a preemption victim).
    pub instance: String,
    pub priority: i32,
    /// Being stopped already: it frees its room soon, and is no victim to choose again.
    pub terminating: bool,
    /// Not running there: room held for a pending preemptor.
    pub nominated: bool,
}

/// Instances to stop on `node` so that the request fits there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    pub node: String,
    /// The victims' names, lowest priority first.
    pub victims: Vec<String>,
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
    MemoryPressure,
    DiskPressure,
}

/// Every reason, in the order of their discriminants.
const REASONS: [Reason; 12] = [
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
    Reason::MemoryPressure,
    Reason::DiskPressure,
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
            Reason::MemoryPressure => "node(s) had memory pressure",
            Reason::DiskPressure => "node(s) had disk pressure",
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
    /// Instances running there (of every service), for ties.
    instances: u32,
}

impl Used {
    /// Takes what `p` holds.
    fn hold(&mut self, p: &Placed) {
        let r = &mut self.res;
        r.cpu_millicores = r.cpu_millicores.saturating_add(p.resources.cpu_millicores);
        r.memory_bytes = r.memory_bytes.saturating_add(p.resources.memory_bytes);
        r.pids = r.pids.saturating_add(p.resources.pids);
        self.ports.extend(p.host_ports.iter().copied());
        if !p.nominated {
            self.instances = self.instances.saturating_add(1);
        }
    }

    /// Gives back what `p` held.
    fn release(&mut self, p: &Placed) {
        let r = &mut self.res;
        r.cpu_millicores = r.cpu_millicores.saturating_sub(p.resources.cpu_millicores);
        r.memory_bytes = r.memory_bytes.saturating_sub(p.resources.memory_bytes);
        r.pids = r.pids.saturating_sub(p.resources.pids);
        for port in &p.host_ports {
            if let Some(k) = self.ports.iter().position(|x| x == port) {
                self.ports.swap_remove(k);
            }
        }
        if !p.nominated {
            self.instances = self.instances.saturating_sub(1);
        }
    }
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
    if node.memory_pressure {
        no(Reason::MemoryPressure);
    }
    if node.disk_pressure {
        no(Reason::DiskPressure);
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
    /// Per node: the named instances on it (candidates for preemption, and reservations).
    residents: Vec<Vec<Placed>>,
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
            residents: vec![Vec::new(); nodes.len()],
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
        self.used[i].hold(p);
        if !p.nominated {
            let counts = match self.services.get_mut(&p.service) {
                Some(c) => c,
                None => self.services.entry(p.service.clone()).or_default(),
            };
            *counts.entry(i).or_insert(0) += 1;
        }
        if !p.instance.is_empty() {
            self.residents[i].push(p.clone());
        }
    }

    /// Forgets the named instance (or reservation) `instance` on `node`: a victim, or the
    /// room a preemptor held for itself.
    pub fn unbind(&mut self, node: &str, instance: &str) -> bool {
        let Some(&i) = self.index.get(node) else {
            return false;
        };
        let Some(at) = self.residents[i]
            .iter()
            .position(|p| p.instance == instance)
        else {
            return false;
        };
        let p = self.residents[i].swap_remove(at);
        self.used[i].release(&p);
        if !p.nominated
            && let Some(c) = self
                .services
                .get_mut(&p.service)
                .and_then(|c| c.get_mut(&i))
        {
            *c = c.saturating_sub(1);
        }
        true
    }

    /// How many instances of lower priority than `req` are stopping on `node` (room being
    /// made, perhaps for it).
    pub fn making_room(&self, node: &str, req: &Request) -> usize {
        self.index.get(node).map_or(0, |&i| {
            self.residents[i]
                .iter()
                .filter(|p| p.terminating && p.priority < req.priority)
                .count()
        })
    }

    /// Marks the named instance on `node` as stopping.
    pub fn mark_terminating(&mut self, node: &str, instance: &str) {
        if let Some(&i) = self.index.get(node)
            && let Some(p) = self.residents[i]
                .iter_mut()
                .find(|p| p.instance == instance)
        {
            p.terminating = true;
        }
    }

    /// Where `req`, which fits on no node as things are, would fit by stopping instances of
    /// lower priority; `None` when nowhere. Like kube-scheduler: only nodes whose sole
    /// objections are resources or host ports are candidates; on each, every lower-priority
    /// instance is taken out, then put back, highest priority first, while the request still
    /// fits; the node whose victims have the lowest highest priority wins, then the fewest
    /// victims, then the name. A node where lower-priority instances are already stopping is
    /// waited for rather than preempted again. Topology spread is checked against the domains
    /// as they are.
    pub fn preempt(&mut self, req: &Request) -> Option<Preemption> {
        const ROOM: u16 = (1 << Reason::InsufficientCpu as u16)
            | (1 << Reason::InsufficientMemory as u16)
            | (1 << Reason::InsufficientPids as u16)
            | (1 << Reason::HostPort as u16);
        if let Some(spread) = &req.spread
            && !self.domains.contains_key(&spread.topology_key)
        {
            let d = Domains::new(&self.nodes, &spread.topology_key);
            self.domains.insert(spread.topology_key.clone(), d);
        }
        let counts = self.services.get(&req.service);
        let same = |i: usize| counts.and_then(|c| c.get(&i)).copied().unwrap_or(0);
        // Spread: the service's instances per domain, and the least loaded domain among
        // those with a node that could take it (resources aside).
        let spread = req.spread.as_ref().and_then(|s| {
            let d = self.domains.get(&s.topology_key)?;
            let mut per = vec![0u32; d.count];
            for (&i, &c) in counts.into_iter().flatten() {
                if let Some(Some(x)) = d.of_node.get(i) {
                    per[*x as usize] += c;
                }
            }
            let eligible =
                |i: usize| filter(req, &self.nodes[i], &self.used[i], || same(i)) & !ROOM == 0;
            let min = (0..self.nodes.len())
                .filter(|&i| eligible(i))
                .filter_map(|i| d.of_node[i])
                .map(|x| per[x as usize])
                .min()?;
            Some((d, per, min, s.max_skew.max(1)))
        });
        // (highest victim priority, victims, node name) — lowest wins — and the node's index
        // and victims.
        type Choice = ((i32, usize, String), usize, Vec<String>);
        let mut best: Option<Choice> = None;
        for i in 0..self.nodes.len() {
            let why = filter(req, &self.nodes[i], &self.used[i], || same(i));
            if why == 0 || why & !ROOM != 0 {
                continue;
            }
            if let Some((d, per, min, skew)) = &spread {
                let ok = d.of_node[i].is_some_and(|x| per[x as usize] + 1 - min <= *skew);
                if !ok {
                    continue;
                }
            }
            let lower = |p: &&Placed| p.priority < req.priority && p.instance != req.instance;
            if self.residents[i]
                .iter()
                .filter(lower)
                .any(|p| p.terminating)
            {
                // Room is being made here already: wait for it.
                continue;
            }
            let mut candidates: Vec<&Placed> = self.residents[i]
                .iter()
                .filter(lower)
                .filter(|p| !p.nominated)
                .collect();
            // Put back highest priority first (then the oldest-bound, as listed).
            candidates.sort_by_key(|p| std::cmp::Reverse(p.priority));
            let mut u = self.used[i].clone();
            for p in &candidates {
                u.release(p);
            }
            let fits_now = |u: &Used| filter(req, &self.nodes[i], u, || same(i)) == 0;
            if !fits_now(&u) {
                continue;
            }
            let mut victims = Vec::new();
            for p in &candidates {
                let mut with = u.clone();
                with.hold(p);
                if fits_now(&with) {
                    u = with;
                } else {
                    victims.push(*p);
                }
            }
            if victims.is_empty() {
                continue;
            }
            let key = (
                victims.iter().map(|p| p.priority).max().unwrap_or(i32::MIN),
                victims.len(),
                self.nodes[i].name.clone(),
            );
            if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                victims.sort_by_key(|p| p.priority);
                let names = victims.iter().map(|p| p.instance.clone()).collect();
                best = Some((key, i, names));
            }
        }
        best.map(|(_, i, victims)| Preemption {
            node: self.nodes[i].name.clone(),
            victims,
        })
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
            // Higher score wins; on a tie the node running fewer instances (of any service:
            // requests without resources score alike everywhere), then the name first in order.
            let better = match best {
                None => true,
                Some((s, b)) => {
                    let key = |n: usize| (self.used[n].instances, &self.nodes[n].name);
                    score > s || (score == s && key(i) < key(b))
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
