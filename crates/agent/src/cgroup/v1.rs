//! cgroup v1: one hierarchy per controller (`memory`, `cpu`, `cpuacct`, `pids`), possibly
//! co-mounted (`cpu,cpuacct`). The instance's cgroup exists once per distinct hierarchy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{
    CPU_PERIOD_US, CgroupManager, Limits, RawUsage, cg_err, cpu_quota_us, parse_keyed, read_pids,
    read_u64, rmdir, subdirs, valid_component, write_file,
};
use crate::AgentError;

#[derive(Debug)]
pub struct V1Cgroups {
    /// Controller → `<base>/<scope>` (see [`crate::cgroup_scope_name`]).
    scopes: BTreeMap<String, PathBuf>,
    /// Distinct scope directories (co-mounted controllers share one).
    dirs: Vec<PathBuf>,
}

impl V1Cgroups {
    /// `bases`: controller → the agent's own cgroup directory in that controller's hierarchy.
    /// Creates `<base>/<scope_name>` in each; controllers where that fails are left out
    /// (with a warning); fails when none is usable.
    pub fn init(bases: BTreeMap<String, PathBuf>, scope_name: &str) -> Result<Self, AgentError> {
        if !valid_component(scope_name) {
            return Err(AgentError::Config(format!(
                "invalid cgroup scope name {scope_name:?}"
            )));
        }
        let mut scopes = BTreeMap::new();
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut last_err = None;
        for (ctrl, base) in bases {
            let scope = base.join(scope_name);
            match std::fs::create_dir_all(&scope) {
                Ok(()) => {
                    if !dirs.contains(&scope) {
                        dirs.push(scope.clone());
                    }
                    scopes.insert(ctrl, scope);
                }
                Err(e) => {
                    tracing::warn!(controller = %ctrl, path = %scope.display(), error = %e, "cgroup v1 controller not usable");
                    last_err = Some(AgentError::io("create cgroup", scope, e));
                }
            }
        }
        if scopes.is_empty() {
            return Err(
                last_err.unwrap_or_else(|| AgentError::Config("no cgroup v1 controllers".into()))
            );
        }
        Ok(Self { scopes, dirs })
    }

    fn dir(&self, ctrl: &str, instance: &str) -> Option<PathBuf> {
        self.scopes.get(ctrl).map(|s| s.join(instance))
    }

    fn write(&self, instance: &str, path: &Path, value: &str) -> Result<(), AgentError> {
        write_file(path, value).map_err(|e| cg_err("write", instance, path, e))
    }
}

impl CgroupManager for V1Cgroups {
    fn version(&self) -> &'static str {
        "v1"
    }

    fn create(&self, instance: &str, limits: &Limits) -> Result<(), AgentError> {
        if !valid_component(instance) {
            return Err(AgentError::Config(format!(
                "invalid instance name {instance:?}"
            )));
        }
        for d in &self.dirs {
            let d = d.join(instance);
            match std::fs::create_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(cg_err("mkdir", instance, &d, e)),
            }
        }
        if let Some(mem) = self.dir("memory", instance) {
            // Always write, so a reused directory does not keep an old limit.
            let v = limits
                .memory_bytes
                .map_or("-1".to_string(), |b| b.to_string());
            // memsw must stay >= the memory limit: raise order matters when lowering/raising.
            let memsw = mem.join("memory.memsw.limit_in_bytes");
            let has_memsw = memsw.exists();
            if limits.memory_bytes.is_none() && has_memsw {
                self.write(instance, &memsw, &v)?;
            }
            self.write(instance, &mem.join("memory.limit_in_bytes"), &v)?;
            if limits.memory_bytes.is_some() && has_memsw {
                self.write(instance, &memsw, &v)?;
            }
        }
        if let Some(cpu) = self.dir("cpu", instance) {
            self.write(
                instance,
                &cpu.join("cpu.cfs_period_us"),
                &CPU_PERIOD_US.to_string(),
            )?;
            let quota = limits
                .cpu_millicores
                .map_or("-1".to_string(), |m| cpu_quota_us(m).to_string());
            self.write(instance, &cpu.join("cpu.cfs_quota_us"), &quota)?;
        }
        if let Some(pids) = self.dir("pids", instance) {
            let v = limits.pids.map_or("max".to_string(), |p| p.to_string());
            self.write(instance, &pids.join("pids.max"), &v)?;
        }
        Ok(())
    }

    fn procs_files(&self, instance: &str) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|d| d.join(instance).join("cgroup.procs"))
            .collect()
    }

    fn add_pid(&self, instance: &str, pid: u32) -> Result<(), AgentError> {
        for f in self.procs_files(instance) {
            self.write(instance, &f, &pid.to_string())?;
        }
        Ok(())
    }

    fn pids(&self, instance: &str) -> Result<Vec<u32>, AgentError> {
        let mut all = Vec::new();
        for f in self.procs_files(instance) {
            all.extend(read_pids(&f).map_err(|e| cg_err("read", instance, &f, e))?);
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    fn kill_via_fs(&self, _instance: &str) -> Result<bool, AgentError> {
        Ok(false)
    }

    fn usage(&self, instance: &str) -> Result<RawUsage, AgentError> {
        let mut u = RawUsage::default();
        if let Some(d) = self.dir("cpuacct", instance) {
            let f = d.join("cpuacct.usage");
            u.cpu_ns = read_u64(&f).map_err(|e| cg_err("read", instance, &f, e))?;
        }
        if let Some(d) = self.dir("memory", instance) {
            let f = d.join("memory.usage_in_bytes");
            u.memory_bytes = read_u64(&f).map_err(|e| cg_err("read", instance, &f, e))?;
        }
        Ok(u)
    }

    fn oom_kills(&self, instance: &str) -> Result<u64, AgentError> {
        let Some(d) = self.dir("memory", instance) else {
            return Ok(0);
        };
        let f = d.join("memory.oom_control");
        let s = std::fs::read_to_string(&f).map_err(|e| cg_err("read", instance, &f, e))?;
        Ok(parse_keyed(&s, "oom_kill").unwrap_or(0))
    }

    fn remove(&self, instance: &str) -> Result<(), AgentError> {
        let mut first = None;
        for d in &self.dirs {
            let d = d.join(instance);
            if let Err(e) = rmdir(&d) {
                first.get_or_insert(cg_err("rmdir", instance, &d, e));
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn remove_scope(&self) {
        for d in &self.dirs {
            let _ = rmdir(d);
        }
    }

    fn instances(&self) -> Result<Vec<String>, AgentError> {
        let mut all = Vec::new();
        for d in &self.dirs {
            all.extend(subdirs(d).map_err(|e| AgentError::io("list", d.clone(), e))?);
        }
        all.sort();
        all.dedup();
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake() -> (tempfile::TempDir, V1Cgroups) {
        let t = tempfile::tempdir().unwrap();
        let mut bases = BTreeMap::new();
        for c in ["memory", "cpu", "cpuacct", "pids"] {
            bases.insert(c.to_string(), t.path().join(c).join("nested"));
        }
        let cg = V1Cgroups::init(bases, "flotilla-n1").unwrap();
        (t, cg)
    }

    #[test]
    fn create_writes_limits_per_controller() {
        let (t, cg) = fake();
        // memsw exists on this "host": pre-create it in the instance dir.
        let mem = t.path().join("memory/nested/flotilla-n1/web-1");
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(mem.join("memory.memsw.limit_in_bytes"), "").unwrap();
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_millicores: Some(250),
            pids: Some(50),
        };
        cg.create("web-1", &limits).unwrap();
        let rd = |p: &str| std::fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(
            rd("memory/nested/flotilla-n1/web-1/memory.limit_in_bytes"),
            "67108864"
        );
        assert_eq!(
            rd("memory/nested/flotilla-n1/web-1/memory.memsw.limit_in_bytes"),
            "67108864"
        );
        assert_eq!(
            rd("cpu/nested/flotilla-n1/web-1/cpu.cfs_period_us"),
            "100000"
        );
        assert_eq!(rd("cpu/nested/flotilla-n1/web-1/cpu.cfs_quota_us"), "25000");
        assert_eq!(rd("pids/nested/flotilla-n1/web-1/pids.max"), "50");
        assert!(t.path().join("cpuacct/nested/flotilla-n1/web-1").is_dir());
        assert_eq!(cg.procs_files("web-1").len(), 4);
        assert_eq!(cg.instances().unwrap(), vec!["web-1".to_string()]);
    }

    #[test]
    fn pids_usage_oom_and_remove() {
        let (t, cg) = fake();
        cg.create("a", &Limits::default()).unwrap();
        let base = |c: &str| t.path().join(c).join("nested/flotilla-n1/a");
        std::fs::write(base("memory").join("cgroup.procs"), "10\n12\n").unwrap();
        std::fs::write(base("pids").join("cgroup.procs"), "12\n13\n").unwrap();
        assert_eq!(cg.pids("a").unwrap(), vec![10, 12, 13]);
        std::fs::write(base("cpuacct").join("cpuacct.usage"), "123456789\n").unwrap();
        std::fs::write(base("memory").join("memory.usage_in_bytes"), "4096\n").unwrap();
        assert_eq!(
            cg.usage("a").unwrap(),
            RawUsage {
                cpu_ns: 123456789,
                memory_bytes: 4096
            }
        );
        std::fs::write(
            base("memory").join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills("a").unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(base("pids").join("pids.max")).unwrap(),
            "max"
        );
        // A fake dir with files is not removable by rmdir: error names the instance.
        let err = cg.remove("a").unwrap_err().to_string();
        assert!(err.contains("for a"), "{err}");
        assert!(cg.create("../x", &Limits::default()).is_err());
    }
}
