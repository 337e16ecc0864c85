//! `flotilla simulate-nodes`: many simulated nodes against a real server, for measuring the
//! server at scale. Each node joins, registers, renews its lease and follows its instances
//! through the same node interface a real agent uses ([`RemoteNode`]); an instance that
//! appears is reported Running and ready at once (no process is started).

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use flotilla_spec::{Instance, NodeResources, NodeStatus, Phase};
use flotilla_store::typed::Reflector;
use flotilla_store::{Credential, NodeApi, Registration, RemoteNode};
use tokio_util::sync::CancellationToken;

use crate::SimulateArgs;

#[derive(Default)]
struct Stats {
    beats: AtomicU64,
    beat_failures: AtomicU64,
    statuses: AtomicU64,
    /// Lease renewal latencies in µs (bounded: the last 200,000).
    latencies: std::sync::Mutex<Vec<u64>>,
}

async fn run_node(
    api: Arc<RemoteNode>,
    lease: Duration,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> Result<()> {
    let reflector = Reflector::<Instance>::start(api.instances(), &stop)
        .await
        .map_err(|e| anyhow!("{}: following instances: {e}", api.node()))?;
    let mut instances = reflector.subscribe();
    let mut reported: HashSet<String> = HashSet::new();
    let lease_secs = u32::try_from(lease.as_secs().max(1)).unwrap_or(u32::MAX);
    let mut beat = tokio::time::interval(lease / 3);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = beat.tick() => {
                let t = Instant::now();
                match api.renew_lease(lease_secs).await {
                    Ok(()) => {
                        stats.beats.fetch_add(1, Ordering::Relaxed);
                        let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                        let mut l = flotilla_store::lock(&stats.latencies);
                        if l.len() < 200_000 {
                            l.push(us);
                        }
                    }
                    Err(_) => {
                        stats.beat_failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            changed = instances.changed() => {
                if changed.is_err() {
                    break;
                }
                let fresh: Vec<String> = instances
                    .borrow_and_update()
                    .iter()
                    .filter(|(n, i)| !reported.contains(*n) && i.metadata.deletion_timestamp.is_none())
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in fresh {
                    let edit = |s: &mut flotilla_spec::InstanceStatus| {
                        s.phase = Phase::Running;
                        s.ready = true;
                        s.ready_since = Some(flotilla_spec::now_rfc3339());
                        true
                    };
                    if api.modify_status(&name, &edit).await.is_ok() {
                        stats.statuses.fetch_add(1, Ordering::Relaxed);
                        reported.insert(name);
                    }
                }
            }
        }
    }
    let _ = reflector.stop().await;
    Ok(())
}

pub async fn run(
    args: SimulateArgs,
    api: &str,
    join_token: &str,
    ca_file: Option<std::path::PathBuf>,
) -> Result<ExitCode> {
    crate::member::require_https(api)?;
    let ca = crate::member::cluster_ca(api, ca_file.as_deref(), Some(join_token)).await?;
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..args.nodes {
        let node = format!("{}-{i:05}", args.prefix);
        let enrolled = crate::fleet::join(api, &ca, join_token, &node).await?;
        let remote = Arc::new(RemoteNode::connect(
            api,
            Credential::new(""),
            &node,
            Some(enrolled.tls(enrolled.identity()?)?),
        ));
        let resources = NodeResources {
            cpu_millicores: 32_000,
            memory_bytes: 128 << 30,
            pids: 100_000,
        };
        remote
            .register(Registration {
                labels: [("zone".to_string(), format!("z{}", i % 3))].into(),
                status: NodeStatus {
                    address: format!("198.18.{}.{}", i / 250, i % 250 + 1),
                    capacity: resources,
                    allocatable: resources,
                    agent_version: format!("{}-simulated", env!("CARGO_PKG_VERSION")),
                    ..Default::default()
                },
                lease_seconds: u32::try_from(args.lease.as_secs().max(1)).unwrap_or(6),
            })
            .await
            .with_context(|| format!("registering {node}"))?;
        tasks.spawn(run_node(remote, args.lease, stats.clone(), stop.clone()));
    }
    println!(
        "{} simulated nodes joined in {:.1?}",
        args.nodes,
        started.elapsed()
    );
    let deadline = tokio::time::sleep(args.duration);
    tokio::pin!(deadline);
    let mut report = tokio::time::interval(Duration::from_secs(10));
    report.tick().await;
    loop {
        tokio::select! {
            () = &mut deadline => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = report.tick() => print_stats(&stats, started),
        }
    }
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    print_stats(&stats, started);
    Ok(ExitCode::SUCCESS)
}

fn print_stats(stats: &Stats, started: Instant) {
    let mut l = flotilla_store::lock(&stats.latencies).clone();
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "after {:.0?}: {} heartbeats ({} failed), {} instances reported; heartbeat latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        started.elapsed(),
        stats.beats.load(Ordering::Relaxed),
        stats.beat_failures.load(Ordering::Relaxed),
        stats.statuses.load(Ordering::Relaxed),
        pct(0.5),
        pct(0.99),
        l.last().copied().unwrap_or(0) as f64 / 1000.0
    );
}
