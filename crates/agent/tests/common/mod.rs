//! Test harness: a real EmbeddedStore in a tempdir, a real agent, real processes.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_agent::{Agent, AgentConfig, AgentError, CgroupMode};
use flotilla_spec::{Event, Instance, InstanceSpec, Object, ObjectMeta};
use flotilla_store::{
    EmbeddedStore, KeyValue, ListResult, Precondition, Revision, Store, StoreError, Watch, typed,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn Store>,
    pub node: String,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<Result<(), AgentError>>>,
    pub registry: Arc<std::sync::Mutex<prometheus_client::registry::Registry>>,
    pub cgroups: Option<&'static str>,
}

pub fn unique_node(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("t{prefix}-{:08x}", h.finish() as u32)
}

pub fn open_store(dir: &Path) -> Arc<dyn Store> {
    Arc::new(EmbeddedStore::open(&dir.join("store.redb")).unwrap())
}

pub async fn start(prefix: &str, tweak: impl FnOnce(&mut AgentConfig)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    start_with(dir, store, unique_node(prefix), tweak).await
}

pub async fn start_with(
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    node: String,
    tweak: impl FnOnce(&mut AgentConfig),
) -> Harness {
    let mut config = AgentConfig::new(node.clone(), dir.path().join("data"));
    config.usage_interval = Duration::from_millis(200);
    config.usage_status_interval = Duration::from_millis(200);
    config.cgroups = CgroupMode::Auto;
    tweak(&mut config);
    let mut registry = prometheus_client::registry::Registry::default();
    let api = Arc::new(flotilla_store::StoreNode::new(
        store.clone(),
        Default::default(),
        node.clone(),
    ));
    let agent = Agent::new(config, api, &mut registry).unwrap();
    let cgroups = agent.cgroup_version();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(agent.run(shutdown.clone()));
    Harness {
        dir,
        store,
        node,
        shutdown,
        task: Some(task),
        registry: Arc::new(std::sync::Mutex::new(registry)),
        cgroups,
    }
}

impl Harness {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Name of this agent's cgroup scope directory.
    pub fn scope(&self) -> String {
        flotilla_agent::cgroup_scope_name(&self.node, &self.data_dir())
    }

    pub fn work(&self) -> PathBuf {
        let p = self.dir.path().join("work");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// True when cgroups are usable as root; otherwise prints the skip line.
    pub fn needs_root_cgroups(&self, test: &str) -> bool {
        let root = nix::unistd::geteuid().is_root();
        if root && self.cgroups.is_some() {
            return true;
        }
        skip(test, &format!("root: {root}, cgroups: {:?}", self.cgroups));
        false
    }

    pub async fn create(&self, name: &str, spec: serde_json::Value) -> Instance {
        let inst = Instance {
            metadata: ObjectMeta::named(name),
            spec: InstanceSpec {
                service: "svc".to_string(),
                node: self.node.clone(),
                spec_hash: "h".to_string(),
                template: serde_json::from_value(spec).unwrap(),
            },
            status: Default::default(),
        };
        typed::create(self.store.as_ref(), inst).await.unwrap()
    }

    pub async fn get(&self, name: &str) -> Option<Instance> {
        typed::get::<Instance>(self.store.as_ref(), name)
            .await
            .unwrap()
    }

    pub async fn delete(&self, name: &str) {
        typed::modify::<Instance>(self.store.as_ref(), name, |i| {
            i.metadata.deletion_timestamp = Some(flotilla_spec::now_rfc3339());
            true
        })
        .await
        .unwrap();
    }

    pub async fn events(&self, instance: &str) -> Vec<Event> {
        let (evs, _) = typed::list::<Event>(self.store.as_ref()).await.unwrap();
        evs.into_iter()
            .filter(|e| e.involved.name == instance)
            .collect()
    }

    pub async fn has_event(&self, instance: &str, reason: &str) -> bool {
        self.events(instance)
            .await
            .iter()
            .any(|e| e.reason == reason)
    }

    /// Polls the instance until `f` holds; panics with the last status after `timeout`.
    pub async fn wait_instance(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        f: impl Fn(&Instance) -> bool,
    ) -> Instance {
        let deadline = Instant::now() + timeout;
        loop {
            let inst = self.get(name).await;
            if let Some(i) = &inst
                && f(i)
            {
                return i.clone();
            }
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for {name}: {what}; last: {inst:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_gone(&self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.get(name).await.is_some() {
            assert!(
                Instant::now() < deadline,
                "{name} not deleted within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().unwrap())
            .unwrap();
        out
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("agent did not stop in 30s")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Prints the line CI greps for when a test cannot run here.
#[allow(
    clippy::disallowed_macros,
    reason = "the skip notice must reach the test output"
)]
pub fn skip(test: &str, why: &str) {
    // Straight to the stderr handle: libtest does not capture it, so the notice is seen.
    let _ = std::io::Write::write_fmt(
        &mut std::io::stderr(),
        format_args!("skipped: {test} needs root and writable cgroup v1/v2 ({why})\n"),
    );
}

/// Polls `f` until it returns `Some`, bounded by `timeout`.
pub async fn wait_for<T, Fut: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Fut,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True when the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(str::to_string));
            !matches!(state.as_deref(), Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Live processes whose command line contains `needle`.
pub fn pids_with_cmdline(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) && alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// The agent's scope directory (see `Harness::scope`) in a v1 controller hierarchy.
pub fn v1_scope(controller: &str, scope: &str) -> PathBuf {
    let pc = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = pc
        .lines()
        .find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, c, path) = (p.next()?, p.next()?, p.next()?);
            c.split(',')
                .any(|x| x == controller)
                .then(|| path.to_string())
        })
        .unwrap_or_else(|| "/".to_string());
    PathBuf::from("/sys/fs/cgroup")
        .join(controller)
        .join(rel.trim_start_matches('/'))
        .join(scope)
}

/// A store whose first `fail_deletes` deletions of instances fail (a backend error).
pub struct FlakyStore {
    pub inner: Arc<dyn Store>,
    pub fail_deletes: std::sync::atomic::AtomicU32,
    pub failed: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl Store for FlakyStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        self.inner.list(prefix).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        pre: Precondition,
    ) -> Result<KeyValue, StoreError> {
        self.inner.put(key, value, pre).await
    }
    async fn delete(&self, key: &str, pre: Precondition) -> Result<Option<KeyValue>, StoreError> {
        use std::sync::atomic::Ordering;
        if key.starts_with(<Instance as Object>::PREFIX)
            && self
                .fail_deletes
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Backend {
                context: format!("delete {key}"),
                source: "injected failure".into(),
            });
        }
        self.inner.delete(key, pre).await
    }
    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        self.inner.watch(prefix, after).await
    }
    fn revision(&self) -> Revision {
        self.inner.revision()
    }
}

/// CPU time (user + system, in seconds) used so far by this process's threads named `name`.
pub fn threads_cpu_seconds(name: &str) -> f64 {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut ticks = 0u64;
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        let Some(i) = stat.rfind(')') else { continue };
        // After the comm: state(3) ppid ... utime(14) stime(15).
        let f: Vec<&str> = stat[i + 1..].split_whitespace().collect();
        let n = |k: usize| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += n(11) + n(12);
    }
    ticks as f64 / hz
}
