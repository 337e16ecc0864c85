//! Scheduler benchmark: places instances one at a time on simulated nodes with mixed
//! constraints, binding each placement before the next, on one thread.
//!
//! ```text
//! cargo run --release -p flotilla-server --example schedule_bench -- [NODES] [INSTANCES...]
//! ```
//! Defaults: 5,000 nodes; 10,000 and 100,000 instances.
#![allow(clippy::unwrap_used, clippy::disallowed_macros)] // a benchmark that prints

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla_server::schedule::{
    AntiAffinity, Capacity, NodeInfo, Placed, Placement, Request, Snapshot, Spread, Taint,
    Toleration,
};

const MI: u64 = 1 << 20;

fn nodes(n: usize) -> Vec<NodeInfo> {
    (0..n)
        .map(|i| {
            let mut labels = BTreeMap::new();
            labels.insert("zone".to_string(), format!("z{}", i % 3));
            labels.insert(
                "disk".to_string(),
                if i % 2 == 0 { "ssd" } else { "hdd" }.to_string(),
            );
            labels.insert("flotilla.dev/hostname".to_string(), format!("host-{i}"));
            NodeInfo {
                name: format!("node-{i:05}"),
                labels,
                allocatable: Capacity {
                    cpu_millicores: 32_000,
                    memory_bytes: 128 * 1024 * MI,
                    pids: 100_000,
                },
                ready: i % 100 != 7,
                unschedulable: i % 100 == 13,
                memory_pressure: false,
                disk_pressure: false,
                taints: if i % 20 == 3 {
                    vec![Taint {
                        key: "dedicated".into(),
                        value: "batch".into(),
                    }]
                } else {
                    Vec::new()
                },
            }
        })
        .collect()
}

/// The request of service `s`: one of ten kinds of constraints.
fn request(s: usize) -> Request {
    let mut r = Request {
        service: format!("svc-{s}"),
        resources: Capacity {
            cpu_millicores: 100 + (s as u64 % 4) * 100,
            memory_bytes: (128 + (s as u64 % 4) * 128) * MI,
            pids: 64,
        },
        host_ports: Vec::new(),
        node_selector: BTreeMap::new(),
        tolerations: Vec::new(),
        spread: None,
        anti_affinity: Some(AntiAffinity::Soft),
        ..Default::default()
    };
    match s % 10 {
        4 | 5 => {
            r.node_selector.insert("disk".into(), "ssd".into());
        }
        6 => r.anti_affinity = Some(AntiAffinity::Hard),
        7 => {
            r.spread = Some(Spread {
                topology_key: "zone".into(),
                max_skew: 1,
            })
        }
        8 => r.tolerations.push(Toleration {
            key: "dedicated".into(),
            value: None,
        }),
        9 => r.host_ports.push(9000 + (s as u16 % 500)),
        _ => {}
    }
    r
}

fn run(n_nodes: usize, instances: usize) {
    let services = 500;
    let requests: Vec<Request> = (0..services).map(request).collect();
    let mut snapshot = Snapshot::new(nodes(n_nodes), &[]);
    let mut latencies = Vec::with_capacity(instances);
    let mut unschedulable = 0usize;
    let started = Instant::now();
    for k in 0..instances {
        let req = &requests[k % services];
        let t = Instant::now();
        let answer = snapshot.place(req);
        latencies.push(t.elapsed());
        match answer {
            Placement::Node(node) => snapshot.bind(&Placed {
                node,
                service: req.service.clone(),
                resources: req.resources,
                host_ports: req.host_ports.clone(),
                ..Default::default()
            }),
            Placement::Unschedulable(_) => unschedulable += 1,
        }
    }
    let total = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{n_nodes} nodes, {instances} instances ({services} services, mixed constraints): {:.0} placements/s; per placement p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs; {unschedulable} unschedulable",
        instances as f64 / total.as_secs_f64(),
        us(pct(0.5)),
        us(pct(0.99)),
        us(latencies[latencies.len() - 1]),
    );
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n_nodes = args.first().copied().unwrap_or(5000);
    let counts: Vec<usize> = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec![10_000, 100_000]
    };
    for c in counts {
        run(n_nodes, c);
    }
}
