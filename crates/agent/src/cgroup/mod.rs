//! cgroups behind one trait, with a v1 (one hierarchy per controller) and a v2 (unified)
//! backend. Both work on plain directory trees given at construction, so their file-level
//! behaviour is unit-tested against a fake cgroupfs in a tempdir; the real thing is exercised by
//! the root integration tests.
//!
//! Layout: `<base>/<scope>/<instance>`, where `<scope>` is [`crate::cgroup_scope_name`]
//! (`flotilla-<node>-<hash of the data directory>`) and `<base>` is, per controller, the mount
//! point plus the path of the agent's own cgroup from `/proc/self/cgroup` (flotilla may itself
//! run nested inside a container's cgroup).

mod detect;
mod v1;
mod v2;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub use detect::{Detected, detect, parse_mountinfo, parse_proc_cgroup};
pub use v1::V1Cgroups;
pub use v2::V2Cgroups;

use crate::AgentError;

/// Which cgroup backend the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupMode {
    /// v2 on a pure v2 host, else v1 when its mounts exist, else disabled (with a warning).
    #[default]
    Auto,
    V1,
    V2,
    Disabled,
}

/// Resource limits of one instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub cpu_millicores: Option<u64>,
    pub pids: Option<u64>,
}

/// Cumulative counters read from an instance's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawUsage {
    /// Total CPU time consumed, in nanoseconds.
    pub cpu_ns: u64,
    pub memory_bytes: u64,
}

/// CFS period used for CPU limits (both versions).
pub const CPU_PERIOD_US: u64 = 100_000;

/// CFS quota for `millicores` with [`CPU_PERIOD_US`] (the kernel's minimum is 1000 µs).
pub fn cpu_quota_us(millicores: u64) -> u64 {
    (millicores.saturating_mul(CPU_PERIOD_US) / 1000).max(1000)
}

/// File-level cgroup operations for the instances of one node.
pub trait CgroupManager: Send + Sync + std::fmt::Debug {
    /// `"v1"` or `"v2"`.
    fn version(&self) -> &'static str;
    /// Creates the instance's cgroup(s) and writes its limits.
    fn create(&self, instance: &str, limits: &Limits) -> Result<(), AgentError>;
    /// The `cgroup.procs` files a child writes `0` to (before exec) to join the cgroup(s).
    fn procs_files(&self, instance: &str) -> Vec<PathBuf>;
    /// Moves `pid` into the instance's cgroup(s).
    fn add_pid(&self, instance: &str, pid: u32) -> Result<(), AgentError>;
    /// Processes in the instance's cgroup(s) (union over controllers).
    fn pids(&self, instance: &str) -> Result<Vec<u32>, AgentError>;
    /// Kills everything in the cgroup through the filesystem when the kernel supports it
    /// (v2 `cgroup.kill`); returns false when the caller must signal each pid.
    fn kill_via_fs(&self, instance: &str) -> Result<bool, AgentError>;
    fn usage(&self, instance: &str) -> Result<RawUsage, AgentError>;
    /// Number of OOM kills in the instance's cgroup so far.
    fn oom_kills(&self, instance: &str) -> Result<u64, AgentError>;
    /// Removes the instance's (empty) cgroup(s); absent is fine.
    fn remove(&self, instance: &str) -> Result<(), AgentError>;
    /// Names of the instance cgroups that exist under this node's scope (for the start-up sweep).
    fn instances(&self) -> Result<Vec<String>, AgentError>;
    /// Removes the node's (empty) scope directory when the agent stops; best effort.
    fn remove_scope(&self);
}

/// SIGKILLs everything in the instance's cgroup until it is empty (processes may fork while
/// being killed), bounded by `timeout`. Returns true when the cgroup ended up empty.
pub async fn kill_until_empty(cg: &dyn CgroupManager, instance: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    for round in 0u32.. {
        let pids = match cg.pids(instance) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(instance, error = %e, "cannot list cgroup processes");
                return false;
            }
        };
        if pids.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                instance,
                left = pids.len(),
                "processes survive in cgroup after SIGKILL"
            );
            return false;
        }
        let used_fs = round % 4 == 0 && cg.kill_via_fs(instance).unwrap_or(false);
        if !used_fs {
            for pid in pids {
                if let Ok(p) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(if round < 10 { 5 } else { 25 })).await;
    }
    false
}

/// Removes an instance's cgroups, retrying briefly while the kernel finishes tearing down
/// exited tasks (rmdir answers EBUSY until then).
pub async fn remove_with_retry(cg: &dyn CgroupManager, instance: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match cg.remove(instance) {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => {
                tracing::warn!(instance, error = %e, "cannot remove cgroup");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small file helpers shared by both backends.

pub(crate) fn cg_err(
    op: &'static str,
    instance: &str,
    path: &Path,
    e: std::io::Error,
) -> AgentError {
    AgentError::Cgroup {
        op,
        instance: instance.to_string(),
        path: path.to_path_buf(),
        source: e,
    }
}

/// Writes `value` to a cgroup control file (create is harmless on cgroupfs, and lets tests
/// use a plain directory tree).
pub(crate) fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(value.as_bytes())
}

pub(crate) fn read_u64(path: &Path) -> std::io::Result<u64> {
    let s = std::fs::read_to_string(path)?;
    s.trim().parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a number: {s:?}"),
        )
    })
}

/// Value of `key` in a flat-keyed file (`key value` per line), e.g. `memory.events`.
pub(crate) fn read_keyed(path: &Path, key: &str) -> std::io::Result<Option<u64>> {
    let s = std::fs::read_to_string(path)?;
    Ok(parse_keyed(&s, key))
}

pub(crate) fn parse_keyed(s: &str, key: &str) -> Option<u64> {
    s.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        if it.next() == Some(key) {
            it.next().and_then(|v| v.parse().ok())
        } else {
            None
        }
    })
}

pub(crate) fn read_pids(path: &Path) -> std::io::Result<Vec<u32>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// rmdir that treats "already gone" as success.
pub(crate) fn rmdir(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Subdirectories of `dir` (missing dir → empty).
pub(crate) fn subdirs(dir: &Path) -> std::io::Result<Vec<String>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry?;
        if entry.file_type()?.is_dir()
            && let Some(name) = entry.file_name().to_str()
        {
            out.push(name.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// True for instance names that are safe as a single path component.
pub(crate) fn valid_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota() {
        assert_eq!(cpu_quota_us(500), 50_000);
        assert_eq!(cpu_quota_us(2000), 200_000);
        assert_eq!(cpu_quota_us(1), 1000);
    }

    #[test]
    fn keyed() {
        let s = "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n";
        assert_eq!(parse_keyed(s, "oom_kill"), Some(1));
        assert_eq!(parse_keyed(s, "oom"), Some(2));
        assert_eq!(parse_keyed(s, "nope"), None);
    }
}
