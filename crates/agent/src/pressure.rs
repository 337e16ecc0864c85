//! Memory and disk pressure of the node, as its agent sees them: `MemAvailable` of
//! `/proc/meminfo`, and the free share of the filesystem of the data directory (where logs
//! go). Under pressure the node takes no new instance (the scheduler's filter); the agent
//! reports the two conditions when they change, so a steady node writes nothing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla_spec::{DISK_PRESSURE, MEMORY_PRESSURE, NodeCondition};
use flotilla_store::NodeApi;
use tokio_util::sync::CancellationToken;

/// Below these the node is under pressure (the kubelet's default hard eviction thresholds:
/// `memory.available<100Mi`, `nodefs.available<10%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub memory_available_bytes: u64,
    /// Percent of the data directory's filesystem that must stay free.
    pub disk_available_percent: u8,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            memory_available_bytes: 100 << 20,
            disk_available_percent: 10,
        }
    }
}

/// What the node has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub memory_available: u64,
    pub disk_available: u64,
    pub disk_total: u64,
}

fn mib(b: u64) -> String {
    format!("{}Mi", b >> 20)
}

/// The two conditions for `sample`.
pub fn judge(sample: Sample, t: Thresholds) -> Vec<NodeCondition> {
    let memory = sample.memory_available < t.memory_available_bytes;
    let free_percent = sample
        .disk_available
        .saturating_mul(100)
        .checked_div(sample.disk_total)
        .unwrap_or(100);
    let disk = free_percent < u64::from(t.disk_available_percent);
    vec![
        NodeCondition {
            kind: MEMORY_PRESSURE.to_string(),
            status: memory,
            reason: if memory {
                "LowMemory"
            } else {
                "SufficientMemory"
            }
            .to_string(),
            message: if t.memory_available_bytes == 0 {
                format!(
                    "{} available (no pressure threshold)",
                    mib(sample.memory_available)
                )
            } else {
                format!(
                    "{} available (pressure below {})",
                    mib(sample.memory_available),
                    mib(t.memory_available_bytes)
                )
            },
            last_transition: String::new(),
        },
        NodeCondition {
            kind: DISK_PRESSURE.to_string(),
            status: disk,
            reason: if disk { "LowDisk" } else { "SufficientDisk" }.to_string(),
            message: if t.disk_available_percent == 0 {
                format!("{free_percent}% of the data disk free (no pressure threshold)")
            } else {
                format!(
                    "{free_percent}% of the data disk free (pressure below {}%)",
                    t.disk_available_percent
                )
            },
            last_transition: String::new(),
        },
    ]
}

/// Samples this machine; `None` when it cannot be read.
pub fn sample(data_dir: &Path) -> Option<Sample> {
    let memory_available = crate::registration::meminfo("MemAvailable")?;
    let fs = nix::sys::statvfs::statvfs(data_dir).ok()?;
    let block = fs.fragment_size();
    Some(Sample {
        memory_available,
        disk_available: fs.blocks_available().saturating_mul(block),
        disk_total: fs.blocks().saturating_mul(block),
    })
}

/// Whether two condition lists say the same (transition times aside). Messages carry the
/// figures, which move all the time: only statuses count, so that a steady node writes
/// nothing.
fn same(a: &[NodeCondition], b: &[NodeCondition]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.kind == y.kind && x.status == y.status)
}

/// Samples every `every` and reports the conditions when a status changes (and once at the
/// start), until `stop`.
pub async fn watch(
    api: Arc<dyn NodeApi>,
    data_dir: std::path::PathBuf,
    t: Thresholds,
    every: Duration,
    stop: CancellationToken,
) {
    let mut reported: Option<Vec<NodeCondition>> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(s) = sample(&data_dir) else {
            continue;
        };
        let now = judge(s, t);
        if reported.as_ref().is_some_and(|r| same(r, &now)) {
            continue;
        }
        for c in now.iter().filter(|c| c.status) {
            tracing::warn!(node = %api.node(), condition = %c.kind, message = %c.message, "node under pressure: it takes no new instance");
        }
        match api.report_conditions(now.clone()).await {
            Ok(()) => reported = Some(now),
            Err(e) => tracing::warn!(error = %e, "could not report the node's conditions"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_starts_below_the_thresholds() {
        let t = Thresholds::default();
        let ok = Sample {
            memory_available: 2 << 30,
            disk_available: 50,
            disk_total: 100,
        };
        let c = judge(ok, t);
        assert_eq!(c.iter().filter(|c| c.status).count(), 0, "{c:?}");
        let low = Sample {
            memory_available: 50 << 20,
            disk_available: 9,
            disk_total: 100,
        };
        let c = judge(low, t);
        assert!(c.iter().all(|c| c.status), "{c:?}");
        assert_eq!(c[0].message, "50Mi available (pressure below 100Mi)");
        assert_eq!(
            c[1].message,
            "9% of the data disk free (pressure below 10%)"
        );
        // Figures move, statuses do not: nothing to report.
        let a = judge(ok, t);
        let b = judge(
            Sample {
                memory_available: 3 << 30,
                ..ok
            },
            t,
        );
        assert!(same(&a, &b));
        assert!(!same(&a, &judge(low, t)));
    }

    #[test]
    fn this_machine_can_be_sampled() {
        let dir = tempfile::tempdir().unwrap();
        let s = sample(dir.path()).expect("meminfo and statvfs");
        assert!(s.memory_available > 0 && s.disk_total >= s.disk_available && s.disk_total > 0);
    }
}
