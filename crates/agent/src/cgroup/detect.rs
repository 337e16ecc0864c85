//! Finding the cgroup hierarchies: pure parsers of `/proc/self/mountinfo` and
//! `/proc/self/cgroup`, plus the probing glue.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{CgroupManager, CgroupMode, V1Cgroups, V2Cgroups};

/// One cgroup mount from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// `cgroup` (v1) or `cgroup2`.
    pub fstype: String,
    pub mount_point: PathBuf,
    /// Path inside the hierarchy that is mounted (`/` unless bind-mounted / namespaced).
    pub root: String,
    /// Super options (`rw,memory`, `rw,cpu,cpuacct`).
    pub options: Vec<String>,
}

/// The cgroup mounts listed in a mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split_whitespace().collect();
        let post: Vec<&str> = post.split_whitespace().collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let fstype = post[0];
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        out.push(CgroupMount {
            fstype: fstype.to_string(),
            mount_point: PathBuf::from(unescape(pre[4])),
            root: unescape(pre[3]),
            options: post[2].split(',').map(str::to_string).collect(),
        });
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
}

/// `/proc/self/cgroup` parsed: controller name (`""` for the v2 unified line) → path.
pub fn parse_proc_cgroup(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if ctrls.is_empty() {
            out.insert(String::new(), path.to_string());
        } else {
            for c in ctrls.split(',') {
                out.insert(c.to_string(), path.to_string());
            }
        }
    }
    out
}

/// `mount_point` + (`path` relative to the mount's `root`).
fn join_base(mount: &CgroupMount, path: &str) -> PathBuf {
    let rel = if mount.root == "/" {
        path
    } else {
        path.strip_prefix(mount.root.as_str()).unwrap_or(path)
    };
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(rel)
    }
}

/// v1 controllers the agent uses.
pub const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];

/// Base directory per v1 controller.
pub fn v1_bases(
    mounts: &[CgroupMount],
    procs: &BTreeMap<String, String>,
) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for ctrl in V1_CONTROLLERS {
        let Some(m) = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == ctrl))
        else {
            continue;
        };
        let path = procs.get(ctrl).map(String::as_str).unwrap_or("/");
        out.insert(ctrl.to_string(), join_base(m, path));
    }
    out
}

/// Base directory of the agent in a v2 hierarchy mounted at `mount`.
pub fn v2_base(mounts: &[CgroupMount], procs: &BTreeMap<String, String>) -> Option<PathBuf> {
    let m = mounts.iter().find(|m| m.fstype == "cgroup2")?;
    let path = procs.get("").map(String::as_str).unwrap_or("/");
    Some(join_base(m, path))
}

/// Outcome of cgroup detection.
pub enum Detected {
    Enabled(Arc<dyn CgroupManager>),
    /// No usable cgroups; the reason is logged and shown in instance status messages.
    Disabled(String),
}

/// Picks and initialises the backend for `mode` on this host; instance cgroups go under
/// `<agent's own cgroup>/<scope>` (see [`crate::cgroup_scope_name`]).
pub fn detect(mode: CgroupMode, scope: &str) -> Detected {
    if mode == CgroupMode::Disabled {
        return Detected::Disabled("cgroups disabled by configuration".to_string());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = parse_mountinfo(&mountinfo);
    let procs = parse_proc_cgroup(&proc_cgroup);
    let pure_v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let want_v2 = match mode {
        CgroupMode::V2 => true,
        CgroupMode::V1 => false,
        _ => pure_v2,
    };
    if want_v2 {
        let Some(base) = v2_base(&mounts, &procs) else {
            return Detected::Disabled("no cgroup2 mount found".to_string());
        };
        return match V2Cgroups::init(base.clone(), scope) {
            Ok(m) => Detected::Enabled(Arc::new(m)),
            Err(e) => {
                Detected::Disabled(format!("cgroup v2 at {} not usable: {e}", base.display()))
            }
        };
    }
    let bases = v1_bases(&mounts, &procs);
    if bases.is_empty() {
        return Detected::Disabled("no cgroup v1 or v2 hierarchy found".to_string());
    }
    match V1Cgroups::init(bases, scope) {
        Ok(m) => Detected::Enabled(Arc::new(m)),
        Err(e) => Detected::Disabled(format!("cgroup v1 not usable: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PROC_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/ae19
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn v1_bases_follow_proc_self_cgroup() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 5);
        let bases = v1_bases(&mounts, &parse_proc_cgroup(PROC_CGROUP));
        assert_eq!(
            bases["memory"],
            PathBuf::from("/sys/fs/cgroup/memory/process_api/ae19")
        );
        assert_eq!(bases["cpu"], PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(bases["cpuacct"], PathBuf::from("/sys/fs/cgroup/cpuacct"));
        assert_eq!(bases["pids"], PathBuf::from("/sys/fs/cgroup/pids"));
    }

    #[test]
    fn combined_and_namespaced_mounts() {
        let mi = "32 31 0:29 /kubepods/x /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                  40 31 0:40 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let pc = "3:cpu,cpuacct:/kubepods/x/y\n0::/system.slice/flotilla.service\n";
        let mounts = parse_mountinfo(mi);
        let procs = parse_proc_cgroup(pc);
        let bases = v1_bases(&mounts, &procs);
        assert_eq!(bases["cpu"], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/y"));
        assert_eq!(bases["cpuacct"], bases["cpu"]);
        assert_eq!(
            v2_base(&mounts, &procs),
            Some(PathBuf::from(
                "/sys/fs/cgroup/system.slice/flotilla.service"
            ))
        );
    }
}
