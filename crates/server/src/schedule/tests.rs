#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

const MI: u64 = 1 << 20;

fn node(name: &str, cpu: u64, mem_mi: u64, labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        allocatable: Capacity {
            cpu_millicores: cpu,
            memory_bytes: mem_mi * MI,
            pids: 1000,
        },
        ready: true,
        unschedulable: false,
        taints: Vec::new(),
        memory_pressure: false,
        disk_pressure: false,
    }
}

fn request(service: &str, cpu: u64, mem_mi: u64) -> Request {
    Request {
        service: service.into(),
        resources: Capacity {
            cpu_millicores: cpu,
            memory_bytes: mem_mi * MI,
            pids: 10,
        },
        host_ports: Vec::new(),
        node_selector: BTreeMap::new(),
        tolerations: Vec::new(),
        spread: None,
        anti_affinity: None,
        ..Default::default()
    }
}

/// Places `n` copies of `req` one after the other; the nodes chosen, in order.
fn place_all(req: &Request, nodes: &[NodeInfo], n: usize) -> (Vec<Placement>, Vec<Placed>) {
    let mut placed = Vec::new();
    let mut out = Vec::new();
    for _ in 0..n {
        let p = place(req, nodes, &placed);
        if let Placement::Node(name) = &p {
            placed.push(Placed {
                node: name.clone(),
                service: req.service.clone(),
                resources: req.resources,
                host_ports: req.host_ports.clone(),
                ..Default::default()
            });
        }
        out.push(p);
    }
    (out, placed)
}

fn on(p: &Placement) -> &str {
    match p {
        Placement::Node(n) => n,
        Placement::Unschedulable(u) => panic!("unschedulable: {u}"),
    }
}

#[test]
fn unschedulable_says_why_for_every_node_like_kubernetes() {
    let nodes = [
        node("a", 4000, 256, &[]),
        node("b", 4000, 256, &[]),
        node("c", 4000, 8192, &[("disk", "hdd")]),
    ];
    let mut req = request("web", 500, 1024);
    req.node_selector.insert("disk".into(), "ssd".into());
    let Placement::Unschedulable(u) = place(&req, &nodes, &[]) else {
        panic!("placed");
    };
    // Most frequent reason first; a node may give several.
    assert_eq!(
        u.to_string(),
        "0/3 nodes are available: 3 node(s) didn't match the node selector, 2 Insufficient memory."
    );
}

#[test]
fn the_least_allocated_node_wins_and_ties_go_by_name() {
    let nodes = [node("b", 4000, 4096, &[]), node("a", 4000, 4096, &[])];
    let req = request("web", 1000, 1024);
    let (got, _) = place_all(&req, &nodes, 4);
    let names: Vec<&str> = got.iter().map(on).collect();
    assert_eq!(names, ["a", "b", "a", "b"]);
    let bigger = [
        node("small", 1000, 1024, &[]),
        node("big", 8000, 16384, &[]),
    ];
    assert_eq!(on(&place(&req, &bigger, &[])), "big");
}

/// Soft anti-affinity keeps counting past two per node: a dozen replicas on three nodes stay
/// even (a saturating score once tied every node at two and piled the rest on the first).
#[test]
fn soft_anti_affinity_keeps_spreading_many_replicas() {
    let nodes = [
        node("a", 2000, 4096, &[]),
        node("b", 2000, 4096, &[]),
        node("c", 2000, 4096, &[]),
    ];
    let mut req = request("web", 0, 0);
    req.anti_affinity = Some(AntiAffinity::Soft);
    let (got, _) = place_all(&req, &nodes, 12);
    let mut per: BTreeMap<&str, u32> = BTreeMap::new();
    for p in &got {
        *per.entry(on(p)).or_insert(0) += 1;
    }
    assert_eq!(per.values().copied().collect::<Vec<_>>(), [4, 4, 4]);
}

#[test]
fn hard_anti_affinity_puts_one_per_node_then_stops() {
    let nodes = [
        node("a", 4000, 4096, &[]),
        node("b", 4000, 4096, &[]),
        node("c", 4000, 4096, &[]),
    ];
    let mut req = request("db", 100, 64);
    req.anti_affinity = Some(AntiAffinity::Hard);
    let (got, _) = place_all(&req, &nodes, 4);
    let mut names: Vec<&str> = got[..3].iter().map(on).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
    let Placement::Unschedulable(u) = &got[3] else {
        panic!("a fourth copy was placed: {got:?}");
    };
    assert_eq!(
        u.to_string(),
        "0/3 nodes are available: 3 node(s) already run an instance of the service."
    );
    // Soft: spread first, then doubled up.
    req.anti_affinity = Some(AntiAffinity::Soft);
    let (got, _) = place_all(&req, &nodes, 6);
    let mut per: BTreeMap<&str, u32> = BTreeMap::new();
    for p in &got {
        *per.entry(on(p)).or_insert(0) += 1;
    }
    assert_eq!(per.values().copied().collect::<Vec<_>>(), [2, 2, 2]);
}

#[test]
fn replicas_spread_over_zones_within_max_skew() {
    let nodes = [
        node("a1", 16000, 16384, &[("zone", "a")]),
        node("a2", 16000, 16384, &[("zone", "a")]),
        node("b1", 4000, 4096, &[("zone", "b")]),
        node("c1", 4000, 4096, &[("zone", "c")]),
    ];
    let mut req = request("web", 500, 256);
    req.spread = Some(Spread {
        topology_key: "zone".into(),
        max_skew: 1,
    });
    let (got, placed) = place_all(&req, &nodes, 6);
    assert!(
        got.iter().all(|p| matches!(p, Placement::Node(_))),
        "{got:?}"
    );
    let mut zones: BTreeMap<&str, u32> = BTreeMap::new();
    for p in &placed {
        let zone = &nodes.iter().find(|n| n.name == p.node).unwrap().labels["zone"];
        *zones.entry(zone).or_insert(0) += 1;
    }
    assert_eq!(zones.values().copied().collect::<Vec<_>>(), [2, 2, 2]);
}

#[test]
fn cordoned_not_ready_and_tainted_nodes_take_nothing_unless_tolerated() {
    let mut cordoned = node("cordoned", 4000, 4096, &[]);
    cordoned.unschedulable = true;
    let mut down = node("down", 4000, 4096, &[]);
    down.ready = false;
    let mut gpu = node("gpu", 4000, 4096, &[]);
    gpu.taints.push(Taint {
        key: "gpu".into(),
        value: "true".into(),
    });
    let nodes = [cordoned, down, gpu];
    let mut req = request("web", 100, 64);
    let Placement::Unschedulable(u) = place(&req, &nodes, &[]) else {
        panic!("placed");
    };
    assert_eq!(
        u.to_string(),
        "0/3 nodes are available: 1 node(s) not ready, 1 node(s) cordoned, 1 node(s) had untolerated taints."
    );
    req.tolerations.push(Toleration {
        key: "gpu".into(),
        value: None,
    });
    assert_eq!(on(&place(&req, &nodes, &[])), "gpu");
}

#[test]
fn a_host_port_is_taken_once_per_node() {
    let nodes = [node("a", 4000, 4096, &[]), node("b", 4000, 4096, &[])];
    let mut req = request("edge", 100, 64);
    req.host_ports = vec![443];
    let (got, _) = place_all(&req, &nodes, 3);
    assert_ne!(on(&got[0]), on(&got[1]));
    assert!(
        matches!(&got[2], Placement::Unschedulable(u) if u.reasons.get(&Reason::HostPort) == Some(&2))
    );
}

// ---- properties ----------------------------------------------------------------------------

fn arb_node(i: usize) -> impl Strategy<Value = NodeInfo> {
    (
        0u64..8000,
        0u64..8192,
        0u64..200,
        proptest::option::of(prop::sample::select(vec!["a", "b", "c"])),
        proptest::option::of(prop::sample::select(vec!["ssd", "hdd"])),
        any::<bool>(),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            move |(cpu, mem, pids, zone, disk, tainted, cordoned, down)| {
                let mut labels = BTreeMap::new();
                if let Some(z) = zone {
                    labels.insert("zone".to_string(), z.to_string());
                }
                if let Some(d) = disk {
                    labels.insert("disk".to_string(), d.to_string());
                }
                NodeInfo {
                    name: format!("n{i}"),
                    labels,
                    allocatable: Capacity {
                        cpu_millicores: cpu,
                        memory_bytes: mem * MI,
                        pids,
                    },
                    ready: !down,
                    unschedulable: cordoned,
                    taints: if tainted && i.is_multiple_of(3) {
                        vec![Taint {
                            key: "dedicated".into(),
                            value: "batch".into(),
                        }]
                    } else {
                        Vec::new()
                    },
                    memory_pressure: false,
                    disk_pressure: false,
                }
            },
        )
}

fn arb_nodes() -> impl Strategy<Value = Vec<NodeInfo>> {
    (1usize..8).prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>())
}

fn arb_request() -> impl Strategy<Value = Request> {
    (
        prop::sample::select(vec!["web", "db", "cache"]),
        0u64..3000,
        0u64..3000,
        0u64..50,
        proptest::option::of(prop::sample::select(vec![80u16, 443])),
        proptest::option::of(prop::sample::select(vec!["ssd", "hdd"])),
        any::<bool>(),
        proptest::option::of(1u32..3),
        proptest::option::of(prop::sample::select(vec![
            AntiAffinity::Hard,
            AntiAffinity::Soft,
        ])),
    )
        .prop_map(
            |(service, cpu, mem, pids, port, disk, tolerate, skew, anti)| Request {
                service: service.to_string(),
                resources: Capacity {
                    cpu_millicores: cpu,
                    memory_bytes: mem * MI,
                    pids,
                },
                host_ports: port.into_iter().collect(),
                node_selector: disk
                    .map(|d| BTreeMap::from([("disk".to_string(), d.to_string())]))
                    .unwrap_or_default(),
                tolerations: if tolerate {
                    vec![Toleration {
                        key: "dedicated".into(),
                        value: Some("batch".into()),
                    }]
                } else {
                    Vec::new()
                },
                spread: skew.map(|max_skew| Spread {
                    topology_key: "zone".into(),
                    max_skew,
                }),
                anti_affinity: anti,
                ..Default::default()
            },
        )
}

/// A second, plain statement of the hard constraints: can `node` take `req`?
fn allowed(req: &Request, node: &NodeInfo, placed: &[Placed]) -> bool {
    let here: Vec<&Placed> = placed.iter().filter(|p| p.node == node.name).collect();
    let sum = |f: fn(&Capacity) -> u64| here.iter().map(|p| f(&p.resources)).sum::<u64>();
    let fits = |need: u64, used: u64, total: u64| need == 0 || used + need <= total;
    node.ready
        && !node.unschedulable
        && node.taints.iter().all(|t| {
            req.tolerations
                .iter()
                .any(|tol| tol.key == t.key && tol.value.as_ref().is_none_or(|v| *v == t.value))
        })
        && req
            .node_selector
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v))
        && fits(
            req.resources.cpu_millicores,
            sum(|c| c.cpu_millicores),
            node.allocatable.cpu_millicores,
        )
        && fits(
            req.resources.memory_bytes,
            sum(|c| c.memory_bytes),
            node.allocatable.memory_bytes,
        )
        && fits(req.resources.pids, sum(|c| c.pids), node.allocatable.pids)
        && !req
            .host_ports
            .iter()
            .any(|port| here.iter().any(|p| p.host_ports.contains(port)))
        && !(req.anti_affinity == Some(AntiAffinity::Hard)
            && here.iter().any(|p| p.service == req.service))
}

/// The spread after putting one more instance on `node`, over the domains that have a node
/// allowed to take it (`None`: `node` has no domain).
fn skew_after(
    req: &Request,
    nodes: &[NodeInfo],
    placed: &[Placed],
    node: &NodeInfo,
) -> Option<u32> {
    let key = &req.spread.as_ref()?.topology_key;
    let target = node.labels.get(key)?;
    let count = |d: &String| {
        placed
            .iter()
            .filter(|p| p.service == req.service)
            .filter(|p| {
                nodes
                    .iter()
                    .any(|n| n.name == p.node && n.labels.get(key) == Some(d))
            })
            .count() as u32
    };
    let eligible: BTreeSet<&String> = nodes
        .iter()
        .filter(|n| allowed(req, n, placed))
        .filter_map(|n| n.labels.get(key))
        .collect();
    let min = eligible.iter().map(|d| count(d)).min()?;
    Some(count(target) + 1 - min)
}

/// Checks one answer of the scheduler against the plain statement of the constraints; the
/// instance placed, if any.
fn check(
    req: &Request,
    nodes: &[NodeInfo],
    placed: &[Placed],
    answer: Placement,
) -> Result<Option<Placed>, TestCaseError> {
    let fine = |n: &NodeInfo| {
        allowed(req, n, placed)
            && match &req.spread {
                None => true,
                Some(s) => skew_after(req, nodes, placed, n).is_some_and(|k| k <= s.max_skew),
            }
    };
    match answer {
        Placement::Node(name) => {
            let node = nodes.iter().find(|n| n.name == name).unwrap();
            prop_assert!(
                allowed(req, node, placed),
                "{name} breaks a hard constraint for {req:?}"
            );
            prop_assert!(fine(node), "{name} breaks the spread for {req:?}");
            Ok(Some(Placed {
                node: name,
                service: req.service.clone(),
                resources: req.resources,
                host_ports: req.host_ports.clone(),
                ..Default::default()
            }))
        }
        Placement::Unschedulable(u) => {
            prop_assert!(
                !nodes.iter().any(fine),
                "unschedulable ({u}) though a node could take {req:?}"
            );
            prop_assert_eq!(u.nodes, nodes.len());
            prop_assert!(!u.reasons.is_empty());
            Ok(None)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn never_overcommits_never_breaks_a_hard_constraint_and_keeps_the_skew(
        nodes in arb_nodes(),
        requests in prop::collection::vec(arb_request(), 1..40),
    ) {
        let mut placed: Vec<Placed> = Vec::new();
        for req in &requests {
            let answer = place(req, &nodes, &placed);
            if let Some(p) = check(req, &nodes, &placed, answer)? {
                placed.push(p);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Past 100 nodes a placement looks at a sample of the nodes; it still never breaks a
    /// constraint, and answers Unschedulable only when no node at all could take it.
    #[test]
    fn a_sampled_scan_of_many_nodes_keeps_every_constraint(
        nodes in (101usize..260).prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>()),
        requests in prop::collection::vec(arb_request(), 1..60),
    ) {
        let mut snapshot = Snapshot::new(nodes.clone(), &[]);
        let mut placed: Vec<Placed> = Vec::new();
        for req in &requests {
            let answer = snapshot.place(req);
            if let Some(p) = check(req, &nodes, &placed, answer)? {
                snapshot.bind(&p);
                placed.push(p);
            }
        }
    }
}

/// Placements bound one after the other into one snapshot spread like fresh ones, past the
/// sampling threshold too.
#[test]
fn a_snapshot_spreads_what_it_binds() {
    let nodes: Vec<NodeInfo> = (0..200)
        .map(|i| node(&format!("n{i:03}"), 32_000, 128 * 1024, &[]))
        .collect();
    let mut req = request("big", 0, 0);
    req.anti_affinity = Some(AntiAffinity::Soft);
    let mut snapshot = Snapshot::new(nodes, &[]);
    let mut per: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..400 {
        let Placement::Node(name) = snapshot.place(&req) else {
            panic!("unschedulable");
        };
        snapshot.bind(&Placed {
            node: name.clone(),
            service: req.service.clone(),
            resources: req.resources,
            host_ports: Vec::new(),
            ..Default::default()
        });
        *per.entry(name).or_insert(0) += 1;
    }
    assert_eq!(per.len(), 200, "{per:?}");
    assert!(per.values().all(|&n| n == 2), "{per:?}");
}

#[test]
fn reasons_are_listed_in_discriminant_order() {
    for (i, r) in REASONS.iter().enumerate() {
        assert_eq!(*r as usize, i, "{r:?}");
    }
}

fn resident(node: &str, name: &str, service: &str, cpu: u64, priority: i32) -> Placed {
    Placed {
        node: node.into(),
        service: service.into(),
        resources: Capacity {
            cpu_millicores: cpu,
            memory_bytes: 0,
            pids: 0,
        },
        instance: name.into(),
        priority,
        ..Default::default()
    }
}

fn urgent(cpu: u64, priority: i32) -> Request {
    let mut r = request("urgent", cpu, 0);
    r.resources.pids = 0;
    r.priority = priority;
    r.instance = "urgent-1".into();
    r
}

#[test]
fn preemption_stops_the_fewest_lowest_priority_instances_that_make_room() {
    let nodes = vec![node("n1", 1000, 1024, &[])];
    let placed = vec![
        resident("n1", "a", "batch", 300, 0),
        resident("n1", "b", "batch", 300, 0),
        resident("n1", "c", "reports", 300, 5),
    ];
    let mut s = Snapshot::new(nodes, &placed);
    let req = urgent(400, 10);
    assert!(matches!(s.place(&req), Placement::Unschedulable(_)));
    // All three out, then put back highest priority first while 400m still fits: c and one
    // of the batch ones stay.
    let p = s.preempt(&req).unwrap();
    assert_eq!(p.node, "n1");
    assert_eq!(p.victims.len(), 1, "{p:?}");
    assert!(p.victims[0] == "a" || p.victims[0] == "b", "{p:?}");
    // Nothing of equal or higher priority is ever a victim.
    assert_eq!(s.preempt(&urgent(400, 0)), None);
    assert_eq!(s.preempt(&urgent(1200, 10)), None, "more than the node has");
    // Once the victim is gone, it fits.
    assert!(s.unbind("n1", &p.victims[0]));
    assert_eq!(s.place(&req), Placement::Node("n1".into()));
}

#[test]
fn preemption_picks_the_node_with_the_least_important_victims() {
    let nodes = vec![
        node("n1", 1000, 1024, &[]),
        node("n2", 1000, 1024, &[]),
        node("n3", 1000, 1024, &[("disk", "hdd")]),
    ];
    let placed = vec![
        resident("n1", "mid", "api", 1000, 5),
        resident("n2", "low-1", "batch", 500, 1),
        resident("n2", "low-2", "batch", 500, 1),
        resident("n3", "lowest", "batch", 1000, -5),
    ];
    let mut s = Snapshot::new(nodes, &placed);
    let mut req = urgent(800, 10);
    req.node_selector = BTreeMap::from([("disk".to_string(), "ssd".to_string())]);
    // n3 has the cheapest victim but fails the node selector (not a matter of room): never.
    assert_eq!(s.preempt(&req), None);
    req.node_selector.clear();
    let p = s.preempt(&req).unwrap();
    assert_eq!(p.node, "n3");
    assert_eq!(p.victims, vec!["lowest".to_string()]);
    // Without n3, two priority-1 victims beat one priority-5 victim.
    s.unbind("n3", "lowest");
    s.bind(&resident("n3", "top", "core", 1000, 100));
    let p = s.preempt(&req).unwrap();
    assert_eq!(p.node, "n2");
    assert_eq!(p.victims.len(), 2);
}

#[test]
fn room_being_made_is_waited_for_and_held_for_its_preemptor() {
    let nodes = vec![node("n1", 1000, 1024, &[])];
    let mut stopping = resident("n1", "old", "batch", 1000, 0);
    stopping.terminating = true;
    let mut s = Snapshot::new(nodes.clone(), &[stopping]);
    let req = urgent(800, 10);
    // Lower-priority instances are stopping there already: no second round of victims.
    assert_eq!(s.making_room("n1", &req), 1);
    assert_eq!(s.preempt(&req), None);

    // The room a nominated preemptor holds is not given to a lower-priority instance.
    let mut s = Snapshot::new(nodes, &[]);
    let mut held = resident("n1", "urgent-1", "urgent", 800, 10);
    held.nominated = true;
    s.bind(&held);
    let low = {
        let mut r = request("batch", 500, 0);
        r.resources.pids = 0;
        r
    };
    assert!(matches!(s.place(&low), Placement::Unschedulable(_)));
    // Nor is a reservation a victim, nor counted as an instance of its service.
    assert_eq!(s.preempt(&urgent(900, 20)), None);
    // The preemptor itself drops its own hold and fits.
    assert!(s.unbind("n1", "urgent-1"));
    assert_eq!(s.place(&req), Placement::Node("n1".into()));
}

fn arb_residents(nodes: usize) -> impl Strategy<Value = Vec<Placed>> {
    prop::collection::vec((0..nodes, 100u64..700, -3i32..4, any::<bool>()), 0..12).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(k, (n, cpu, prio, terminating))| {
                let mut p = resident(&format!("n{n}"), &format!("r{k}"), "other", cpu, prio);
                p.terminating = terminating && k % 3 == 0;
                p
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Preemption only ever stops instances of lower priority, on the node it names, and
    /// stopping them makes the request fit there; it answers None only when no node could
    /// take the request even with every lower-priority instance gone (or one is already
    /// making room).
    #[test]
    fn preemption_frees_exactly_enough_and_only_below_its_priority(
        residents in arb_residents(3),
        cpu in 100u64..1200,
        priority in -2i32..5,
    ) {
        let nodes: Vec<NodeInfo> = (0..3).map(|i| node(&format!("n{i}"), 1000, 1024, &[])).collect();
        let mut s = Snapshot::new(nodes.clone(), &residents);
        let req = urgent(cpu, priority);
        if !matches!(s.place(&req), Placement::Unschedulable(_)) {
            return Ok(());
        }
        match s.preempt(&req) {
            Some(p) => {
                for v in &p.victims {
                    let r = residents.iter().find(|r| &r.instance == v).unwrap();
                    prop_assert!(r.priority < priority, "victim {v} has priority {}", r.priority);
                    prop_assert_eq!(&r.node, &p.node);
                    prop_assert!(!r.terminating);
                    prop_assert!(s.unbind(&p.node, v));
                }
                let node = nodes.iter().find(|n| n.name == p.node).unwrap();
                let idx = s.index[&p.node];
                prop_assert_eq!(filter(&req, node, &s.used[idx], || 0), 0);
            }
            None => {
                for n in &nodes {
                    let here: Vec<&Placed> = residents.iter().filter(|r| r.node == n.name).collect();
                    let waiting = here.iter().any(|r| r.terminating && r.priority < priority);
                    let kept: u64 = here
                        .iter()
                        .filter(|r| r.priority >= priority)
                        .map(|r| r.resources.cpu_millicores)
                        .sum();
                    prop_assert!(
                        waiting || kept + cpu > 1000,
                        "node {} could take {cpu}m by preemption: {here:?}",
                        n.name
                    );
                }
            }
        }
    }
}

#[test]
fn nodes_under_pressure_take_nothing_new() {
    let mut nodes = vec![
        node("n1", 1000, 1024, &[]),
        node("n2", 1000, 1024, &[]),
        node("n3", 1000, 1024, &[]),
    ];
    nodes[0].memory_pressure = true;
    nodes[1].disk_pressure = true;
    let req = request("web", 100, 64);
    assert_eq!(place(&req, &nodes, &[]), Placement::Node("n3".into()));
    nodes[2].memory_pressure = true;
    match place(&req, &nodes, &[]) {
        Placement::Unschedulable(u) => assert_eq!(
            u.to_string(),
            "0/3 nodes are available: 2 node(s) had memory pressure, 1 node(s) had disk pressure."
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn ties_go_to_the_node_running_fewer_instances_of_any_service() {
    let nodes = vec![node("n1", 1000, 1024, &[]), node("n2", 1000, 1024, &[])];
    // Nothing requested: least-allocated ties everywhere; soft anti-affinity sees only the
    // same service. Ten services of one replica each spread 5/5, not all on n1.
    let mut s = Snapshot::new(nodes, &[]);
    let mut per = BTreeMap::new();
    for k in 0..10 {
        let mut req = request(&format!("svc-{k}"), 0, 0);
        req.resources.pids = 0;
        let Placement::Node(n) = s.place(&req) else {
            panic!("unschedulable")
        };
        s.bind(&Placed {
            node: n.clone(),
            service: req.service.clone(),
            ..Default::default()
        });
        *per.entry(n).or_insert(0) += 1;
    }
    assert_eq!(per.values().collect::<Vec<_>>(), vec![&5, &5], "{per:?}");
}
