//! cgroup v2 (unified hierarchy).
//!
//! Controllers are enabled top-down: `+memory +cpu +pids` (those the base offers) in the
//! base's `cgroup.subtree_control`, then in the node scope's (`flotilla-<node>-<hash>`). The
//! no-internal-processes rule forbids enabling controllers for children of a non-root cgroup
//! that has processes of its own; when the base is such a cgroup (typically the agent's own service cgroup), the agent
//! moves itself into a leaf `<base>/flotilla-supervisor` and retries. If other processes still
//! live in the base, enabling fails and the agent runs without cgroups (with a warning).
//! The node scope never holds processes itself; instances are leaves below it.

use std::path::{Path, PathBuf};

use super::{
    CPU_PERIOD_US, CgroupManager, Limits, RawUsage, cg_err, cpu_quota_us, read_keyed, read_pids,
    read_u64, rmdir, subdirs, valid_component, write_file,
};
use crate::AgentError;

const WANTED: [&str; 3] = ["memory", "cpu", "pids"];

#[derive(Debug)]
pub struct V2Cgroups {
    /// `<base>/<scope>` (see [`crate::cgroup_scope_name`]).
    scope: PathBuf,
    /// Controllers enabled for instances.
    controllers: Vec<String>,
}

impl V2Cgroups {
    /// `base`: the agent's own cgroup directory (mount point + path from `/proc/self/cgroup`).
    pub fn init(base: PathBuf, scope_name: &str) -> Result<Self, AgentError> {
        if !valid_component(scope_name) {
            return Err(AgentError::Config(format!(
                "invalid cgroup scope name {scope_name:?}"
            )));
        }
        let available_file = base.join("cgroup.controllers");
        let available = std::fs::read_to_string(&available_file)
            .map_err(|e| AgentError::io("read", available_file.clone(), e))?;
        let controllers: Vec<String> = WANTED
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| c.to_string())
            .collect();
        let enable: String = controllers
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        let subtree = base.join("cgroup.subtree_control");
        if !enable.is_empty()
            && let Err(e) = write_file(&subtree, &enable)
        {
            if e.raw_os_error() != Some(nix::libc::EBUSY) {
                return Err(AgentError::io("enable controllers in", subtree, e));
            }
            // No-internal-processes rule: move ourselves into a leaf, then retry.
            let leaf = base.join("flotilla-supervisor");
            std::fs::create_dir_all(&leaf)
                .map_err(|e| AgentError::io("create cgroup", leaf.clone(), e))?;
            let procs = leaf.join("cgroup.procs");
            write_file(&procs, &std::process::id().to_string())
                .map_err(|e| AgentError::io("move agent into", procs, e))?;
            write_file(&subtree, &enable)
                .map_err(|e| AgentError::io("enable controllers in", subtree, e))?;
        }
        let scope = base.join(scope_name);
        std::fs::create_dir_all(&scope)
            .map_err(|e| AgentError::io("create cgroup", scope.clone(), e))?;
        if !enable.is_empty() {
            let f = scope.join("cgroup.subtree_control");
            write_file(&f, &enable).map_err(|e| AgentError::io("enable controllers in", f, e))?;
        }
        Ok(Self { scope, controllers })
    }

    fn has(&self, c: &str) -> bool {
        self.controllers.iter().any(|x| x == c)
    }

    fn dir(&self, instance: &str) -> PathBuf {
        self.scope.join(instance)
    }

    fn write(&self, instance: &str, path: &Path, value: &str) -> Result<(), AgentError> {
        write_file(path, value).map_err(|e| cg_err("write", instance, path, e))
    }
}

impl CgroupManager for V2Cgroups {
    fn version(&self) -> &'static str {
        "v2"
    }

    fn create(&self, instance: &str, limits: &Limits) -> Result<(), AgentError> {
        if !valid_component(instance) {
            return Err(AgentError::Config(format!(
                "invalid instance name {instance:?}"
            )));
        }
        let d = self.dir(instance);
        match std::fs::create_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(cg_err("mkdir", instance, &d, e)),
        }
        if self.has("memory") {
            let v = limits
                .memory_bytes
                .map_or("max".to_string(), |b| b.to_string());
            self.write(instance, &d.join("memory.max"), &v)?;
            let swap = d.join("memory.swap.max");
            if swap.exists() {
                let s = if limits.memory_bytes.is_some() {
                    "0"
                } else {
                    "max"
                };
                self.write(instance, &swap, s)?;
            }
        }
        if self.has("cpu") {
            let v = match limits.cpu_millicores {
                Some(m) => format!("{} {CPU_PERIOD_US}", cpu_quota_us(m)),
                None => format!("max {CPU_PERIOD_US}"),
            };
            self.write(instance, &d.join("cpu.max"), &v)?;
        }
        if self.has("pids") {
            let v = limits.pids.map_or("max".to_string(), |p| p.to_string());
            self.write(instance, &d.join("pids.max"), &v)?;
        }
        Ok(())
    }

    fn procs_files(&self, instance: &str) -> Vec<PathBuf> {
        vec![self.dir(instance).join("cgroup.procs")]
    }

    fn add_pid(&self, instance: &str, pid: u32) -> Result<(), AgentError> {
        let f = self.dir(instance).join("cgroup.procs");
        self.write(instance, &f, &pid.to_string())
    }

    fn pids(&self, instance: &str) -> Result<Vec<u32>, AgentError> {
        let f = self.dir(instance).join("cgroup.procs");
        read_pids(&f).map_err(|e| cg_err("read", instance, &f, e))
    }

    fn kill_via_fs(&self, instance: &str) -> Result<bool, AgentError> {
        let f = self.dir(instance).join("cgroup.kill");
        if !f.exists() {
            return Ok(false);
        }
        self.write(instance, &f, "1")?;
        Ok(true)
    }

    fn usage(&self, instance: &str) -> Result<RawUsage, AgentError> {
        let d = self.dir(instance);
        let stat = d.join("cpu.stat");
        let usec =
            read_keyed(&stat, "usage_usec").map_err(|e| cg_err("read", instance, &stat, e))?;
        let mem = d.join("memory.current");
        let memory_bytes = if self.has("memory") {
            read_u64(&mem).map_err(|e| cg_err("read", instance, &mem, e))?
        } else {
            0
        };
        Ok(RawUsage {
            cpu_ns: usec.unwrap_or(0).saturating_mul(1000),
            memory_bytes,
        })
    }

    fn oom_kills(&self, instance: &str) -> Result<u64, AgentError> {
        if !self.has("memory") {
            return Ok(0);
        }
        let f = self.dir(instance).join("memory.events");
        Ok(read_keyed(&f, "oom_kill")
            .map_err(|e| cg_err("read", instance, &f, e))?
            .unwrap_or(0))
    }

    fn remove(&self, instance: &str) -> Result<(), AgentError> {
        let d = self.dir(instance);
        rmdir(&d).map_err(|e| cg_err("rmdir", instance, &d, e))
    }

    fn remove_scope(&self) {
        let _ = rmdir(&self.scope);
    }

    fn instances(&self) -> Result<Vec<String>, AgentError> {
        subdirs(&self.scope).map_err(|e| AgentError::io("list", self.scope.clone(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(controllers: &str) -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("system.slice/flotilla.service");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("cgroup.controllers"), controllers).unwrap();
        (t, base)
    }

    #[test]
    fn init_enables_controllers_top_down() {
        let (_t, base) = fake("cpuset cpu io memory hugetlb pids rdma misc\n");
        let cg = V2Cgroups::init(base.clone(), "flotilla-n1").unwrap();
        assert_eq!(cg.version(), "v2");
        assert_eq!(
            std::fs::read_to_string(base.join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        assert_eq!(
            std::fs::read_to_string(base.join("flotilla-n1/cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
    }

    #[test]
    fn limits_usage_oom_kill_and_sweep_listing() {
        let (_t, base) = fake("cpu memory pids");
        let cg = V2Cgroups::init(base.clone(), "flotilla-n1").unwrap();
        let d = base.join("flotilla-n1/web-1");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("memory.swap.max"), "max").unwrap();
        let limits = Limits {
            memory_bytes: Some(128 << 20),
            cpu_millicores: Some(1500),
            pids: Some(100),
        };
        cg.create("web-1", &limits).unwrap();
        let rd = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        assert_eq!(rd("memory.max"), "134217728");
        assert_eq!(rd("memory.swap.max"), "0");
        assert_eq!(rd("cpu.max"), "150000 100000");
        assert_eq!(rd("pids.max"), "100");

        cg.create("web-2", &Limits::default()).unwrap();
        let d2 = base.join("flotilla-n1/web-2");
        assert_eq!(
            std::fs::read_to_string(d2.join("memory.max")).unwrap(),
            "max"
        );
        assert_eq!(
            std::fs::read_to_string(d2.join("cpu.max")).unwrap(),
            "max 100000"
        );
        assert_eq!(cg.instances().unwrap(), vec!["web-1", "web-2"]);

        std::fs::write(d.join("cgroup.procs"), "7\n8\n").unwrap();
        assert_eq!(cg.pids("web-1").unwrap(), vec![7, 8]);
        assert_eq!(cg.procs_files("web-1"), vec![d.join("cgroup.procs")]);
        std::fs::write(
            d.join("cpu.stat"),
            "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
        )
        .unwrap();
        std::fs::write(d.join("memory.current"), "8192\n").unwrap();
        assert_eq!(
            cg.usage("web-1").unwrap(),
            RawUsage {
                cpu_ns: 2_500_000,
                memory_bytes: 8192
            }
        );
        std::fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills("web-1").unwrap(), 1);

        // No cgroup.kill (kernel < 5.14): the caller signals each pid.
        assert!(!cg.kill_via_fs("web-1").unwrap());
        std::fs::write(d.join("cgroup.kill"), "").unwrap();
        assert!(cg.kill_via_fs("web-1").unwrap());
        assert_eq!(rd("cgroup.kill"), "1");
    }

    #[test]
    fn missing_controllers_are_skipped() {
        let (_t, base) = fake("memory");
        let cg = V2Cgroups::init(base.clone(), "flotilla-n1").unwrap();
        cg.create(
            "x",
            &Limits {
                cpu_millicores: Some(100),
                ..Limits::default()
            },
        )
        .unwrap();
        assert!(!base.join("flotilla-n1/x/cpu.max").exists());
        assert!(base.join("flotilla-n1/x/memory.max").exists());
    }
}
