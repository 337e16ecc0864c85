//! What an agent tells the control plane about its node when it starts: address, capacity
//! (CPUs this process may use, memory, the pid limit), allocatable (capacity minus the
//! configured reserve), and labels (hostname, architecture, OS, and the configured ones).

use std::collections::BTreeMap;

use flotilla_spec::{NodeResources, NodeStatus};
use flotilla_store::Registration;

use crate::AgentConfig;

pub const HOSTNAME_LABEL: &str = "flotilla.dev/hostname";
pub const ARCH_LABEL: &str = "flotilla.dev/arch";
pub const OS_LABEL: &str = "flotilla.dev/os";

/// This machine's host name (the agent's default node name and its hostname label).
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// The machine's resources, as far as the host tells them.
pub fn capacity() -> NodeResources {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    NodeResources {
        cpu_millicores: cpus.saturating_mul(1000),
        memory_bytes: meminfo_total().unwrap_or(0),
        pids: read_u64("/proc/sys/kernel/pid_max").unwrap_or(0),
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn meminfo_total() -> Option<u64> {
    meminfo("MemTotal")
}

/// A field of `/proc/meminfo` (`MemTotal`, `MemAvailable`), in bytes.
pub(crate) fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text, key)
}

fn parse_meminfo(text: &str, key: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `capacity` minus `reserve`, never below zero.
pub fn allocatable(capacity: NodeResources, reserve: NodeResources) -> NodeResources {
    NodeResources {
        cpu_millicores: capacity
            .cpu_millicores
            .saturating_sub(reserve.cpu_millicores),
        memory_bytes: capacity.memory_bytes.saturating_sub(reserve.memory_bytes),
        pids: capacity.pids.saturating_sub(reserve.pids),
    }
}

/// The registration of this agent's node.
pub fn registration(config: &AgentConfig) -> Registration {
    let capacity = capacity();
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    if let Some(host) = hostname() {
        labels.insert(HOSTNAME_LABEL.to_string(), host);
    }
    labels.insert(ARCH_LABEL.to_string(), std::env::consts::ARCH.to_string());
    labels.insert(OS_LABEL.to_string(), std::env::consts::OS.to_string());
    labels.extend(config.labels.clone());
    Registration {
        lease_seconds: u32::try_from(config.lease_duration.as_secs().max(1)).unwrap_or(u32::MAX),
        labels,
        status: NodeStatus {
            address: config.host.clone(),
            capacity,
            allocatable: allocatable(capacity, config.reserve),
            conditions: Vec::new(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            registered_at: Some(flotilla_spec::now_rfc3339()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_reserve() {
        let text = "MemTotal:       16303092 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_meminfo(text, "MemTotal"), Some(16_303_092 * 1024));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n", "MemTotal"), None);
        let cap = NodeResources {
            cpu_millicores: 2000,
            memory_bytes: 1 << 30,
            pids: 100,
        };
        let reserve = NodeResources {
            cpu_millicores: 500,
            memory_bytes: 2 << 30,
            pids: 0,
        };
        let a = allocatable(cap, reserve);
        assert_eq!((a.cpu_millicores, a.memory_bytes, a.pids), (1500, 0, 100));
        let host = capacity();
        assert!(host.cpu_millicores >= 1000 && host.memory_bytes > 0);
    }
}
