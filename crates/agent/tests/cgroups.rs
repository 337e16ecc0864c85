//! Real cgroups (needs root and writable cgroup v1 or v2; skipped with a message otherwise).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

mod common;

use std::time::{Duration, Instant};

use common::*;
use flotilla_agent::cgroup::{self, CgroupMode, Detected, Limits};
use flotilla_spec::Phase;
use serde_json::json;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_exceeded_is_reported_oom_killed() {
    let mut h = start("oom", |_| {}).await;
    if !h.needs_root_cgroups("memory_limit_exceeded_is_reported_oom_killed") {
        return;
    }
    h.create(
        "hog",
        json!({
            "command": "python3",
            "args": ["-c", "import time\nx = b'x' * (256 << 20)\ntime.sleep(30)"],
            "resources": {"memory": "48Mi"},
            "restart": {"policy": "never"}
        }),
    )
    .await;
    let i = h
        .wait_instance("hog", T, "failed", |i| i.status.phase == Phase::Failed)
        .await;
    let e = i.status.last_exit.unwrap();
    assert!(e.oom_killed, "{e:?}");
    assert_eq!(e.reason, "OOMKilled");
    assert!(h.has_event("hog", "OOMKilled").await);
    assert!(
        h.metrics_text()
            .contains("flotilla_oom_kills_total{service=\"svc\"} 1")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_stops_at_pids_max_and_stop_leaves_nothing() {
    let mut h = start("pids", |_| {}).await;
    if !h.needs_root_cgroups("fork_bomb_stops_at_pids_max_and_stop_leaves_nothing") {
        return;
    }
    // dash gives up on the first fork that fails: the instance then restarts, which is fine;
    // what matters is that the cgroup never holds more than pids.max processes.
    let script = "i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done; wait";
    h.create(
        "bomb",
        json!({"command": "sh", "args": ["-c", script], "resources": {"pids": 20}, "stop": {"grace_period": "1s"}}),
    )
    .await;
    h.wait_instance("bomb", T, "running", |i| i.status.phase == Phase::Running)
        .await;
    let mut procs: Vec<u32> = Vec::new();
    if h.cgroups == Some("v1") {
        let scope = v1_scope("pids", &h.scope()).join("bomb");
        let max_hits = wait_for("pids.max reached", T, || async {
            let ev = std::fs::read_to_string(scope.join("pids.events")).ok()?;
            let n: u64 = ev
                .lines()
                .find_map(|l| l.strip_prefix("max "))?
                .trim()
                .parse()
                .ok()?;
            (n > 0).then_some(n)
        })
        .await;
        assert!(max_hits > 0);
        let s = std::fs::read_to_string(scope.join("cgroup.procs")).unwrap_or_default();
        procs = s.lines().filter_map(|l| l.parse().ok()).collect();
        assert!(procs.len() <= 20, "{} processes", procs.len());
        let peak: u64 = std::fs::read_to_string(scope.join("pids.peak"))
            .map(|s| s.trim().parse().unwrap_or(0))
            .unwrap_or(0);
        assert!(peak <= 20, "peak {peak}");
    }
    h.delete("bomb").await;
    h.wait_gone("bomb", T).await;
    for p in procs {
        assert!(!alive(p), "{p} survived");
    }
    if h.cgroups == Some("v1") {
        for c in ["memory", "pids", "cpu", "cpuacct"] {
            assert!(
                !v1_scope(c, &h.scope()).join("bomb").exists(),
                "{c} cgroup not removed"
            );
        }
    }
    h.stop().await;
    if h.cgroups == Some("v1") {
        assert!(
            !v1_scope("pids", &h.scope()).exists(),
            "node scope not removed on stop"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setsid_grandchild_is_killed_on_stop() {
    let mut h = start("setsid", |_| {}).await;
    if !h.needs_root_cgroups("setsid_grandchild_is_killed_on_stop") {
        return;
    }
    let w = h.work();
    let marker = format!("flotilla-setsid-{}", h.node);
    // The grandchild leaves the process group (setsid) and ignores SIGTERM: only the cgroup
    // can find it.
    let script = format!(
        "trap 'echo term > {w}/termed; exit 0' TERM\n\
         setsid sh -c 'trap \"\" TERM; echo $$$$ > {w}/gc.pid; exec python3 -c \"import time; time.sleep(300)\" {marker}' &\n\
         while :; do sleep 0.05; done",
        w = w.display()
    );
    h.create(
        "daemonizer",
        json!({"command": "sh", "args": ["-c", script], "stop": {"grace_period": "500ms"}}),
    )
    .await;
    h.wait_instance("daemonizer", T, "running", |i| {
        i.status.phase == Phase::Running
    })
    .await;
    let gc = wait_for("grandchild pid", T, || async {
        read_pid(&w.join("gc.pid"))
    })
    .await;
    wait_for("grandchild exec", T, || async {
        (!pids_with_cmdline(&marker).is_empty()).then_some(())
    })
    .await;
    h.delete("daemonizer").await;
    h.wait_gone("daemonizer", T).await;
    assert!(w.join("termed").exists());
    assert!(!alive(gc), "setsid grandchild {gc} survived");
    assert!(pids_with_cmdline(&marker).is_empty());
    if h.cgroups == Some("v1") {
        assert!(!v1_scope("memory", &h.scope()).join("daemonizer").exists());
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_sweep_kills_leftovers_of_a_previous_run() {
    let root = nix::unistd::geteuid().is_root();
    let node = unique_node("sweep");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let scope = flotilla_agent::cgroup_scope_name(&node, &data);
    let cg = match cgroup::detect(CgroupMode::Auto, &scope) {
        Detected::Enabled(cg) if root => cg,
        _ => {
            skip(
                "startup_sweep_kills_leftovers_of_a_previous_run",
                &format!("root: {root}"),
            );
            return;
        }
    };
    // A "previous run" that was SIGKILLed: a cgroup with a process in it.
    cg.create("old-1", &Limits::default()).unwrap();
    let mut child = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let pid = child.id();
    cg.add_pid("old-1", pid).unwrap();
    assert_eq!(cg.pids("old-1").unwrap(), vec![pid]);

    let store = open_store(dir.path());
    let mut h = start_with(dir, store, node, |_| {}).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success());
    wait_for("leftover cgroup removed", T, || async {
        cg.instances().unwrap().is_empty().then_some(())
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_sampled_and_cpu_is_limited() {
    let mut h = start("usage", |_| {}).await;
    if !h.needs_root_cgroups("usage_is_sampled_and_cpu_is_limited") {
        return;
    }
    h.create(
        "spin",
        json!({"command": "sh", "args": ["-c", "while :; do :; done"], "resources": {"cpu": "200m", "memory": "64Mi"}, "stop": {"grace_period": "200ms"}}),
    )
    .await;
    // Let a few samples accumulate, then check one after the first second.
    let deadline = Instant::now() + T;
    let mut samples = Vec::new();
    while samples.len() < 4 {
        assert!(Instant::now() < deadline, "no usage samples: {samples:?}");
        if let Some(u) = h.get("spin").await.and_then(|i| i.status.usage)
            && samples.last() != Some(&u)
        {
            samples.push(u);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = samples.last().unwrap();
    assert!(
        last.cpu_millicores > 50 && last.cpu_millicores < 400,
        "{samples:?}"
    );
    assert!(last.memory_bytes > 0);
    let m = h.metrics_text();
    assert!(
        m.contains("flotilla_instance_cpu_millicores{service=\"svc\",instance=\"spin\"}"),
        "{m}"
    );
    h.delete("spin").await;
    h.wait_gone("spin", T).await;
    assert!(!h.metrics_text().contains("instance=\"spin\""));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_one_node_name_keep_apart() {
    // Two `flotilla up` with different data directories and the same (default) node name:
    // the second one's start-up sweep and exit must not touch the first one's instances.
    let node = unique_node("twin");
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let mut a = start_with(dir, store, node.clone(), |_| {}).await;
    if !a.needs_root_cgroups("two_agents_with_one_node_name_keep_apart") {
        return;
    }
    a.create(
        "first",
        json!({"command": "sleep", "args": ["300"], "stop": {"grace_period": "1s"}}),
    )
    .await;
    let i = a
        .wait_instance("first", T, "running", |i| i.status.phase == Phase::Running)
        .await;
    let pid = i.status.pid.unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = open_store(dir2.path());
    let mut b = start_with(dir2, store2, node, |_| {}).await;
    assert_ne!(a.scope(), b.scope());
    assert!(a.scope().starts_with(&format!("flotilla-{}-", a.node)));
    // b has swept when it runs an instance of its own.
    b.create(
        "second",
        json!({"command": "sleep", "args": ["300"], "stop": {"grace_period": "1s"}}),
    )
    .await;
    b.wait_instance("second", T, "running", |i| i.status.phase == Phase::Running)
        .await;
    b.stop().await;
    assert!(
        alive(pid),
        "the other agent's start-up or exit killed {pid}"
    );
    let again = a.get("first").await.unwrap();
    assert_eq!(
        (again.status.pid, again.status.restarts),
        (Some(pid), 0),
        "{again:#?}"
    );
    a.stop().await;
    assert!(!alive(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_probes_run_as_the_instance_in_its_cgroup() {
    let mut h = start("execid", |_| {}).await;
    if !h.needs_root_cgroups("exec_probes_run_as_the_instance_in_its_cgroup") {
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        skip(
            "exec_probes_run_as_the_instance_in_its_cgroup",
            "no user nobody",
        );
        return;
    };
    // Ready only when the probe runs with the instance's uid, RLIMIT_NOFILE and cgroup.
    let check = format!(
        "test \"$(id -u)\" = {} && test \"$(ulimit -n)\" = 77 && grep -q '/{}/probed$' /proc/self/cgroup",
        nobody.uid,
        h.scope()
    );
    h.create(
        "probed",
        json!({
            "command": "sleep", "args": ["300"],
            "user": "nobody",
            "resources": {"open_files": 77},
            "probes": {"readiness": {"exec": {"command": ["sh", "-c", check]}, "period": "100ms"}},
            "stop": {"grace_period": "1s"}
        }),
    )
    .await;
    h.wait_instance("probed", T, "ready", |i| i.status.ready)
        .await;
    h.delete("probed").await;
    h.wait_gone("probed", T).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_written_to_the_status_rarely() {
    let mut h = start("usagew", |c| {
        c.usage_interval = Duration::from_millis(100);
        c.usage_status_interval = Duration::from_secs(30);
    })
    .await;
    if !h.needs_root_cgroups("usage_is_written_to_the_status_rarely") {
        return;
    }
    h.create(
        "quiet",
        json!({"command": "sleep", "args": ["300"], "stop": {"grace_period": "1s"}}),
    )
    .await;
    let i = h
        .wait_instance("quiet", T, "usage reported", |i| i.status.usage.is_some())
        .await;
    let rv = i.metadata.resource_version;
    // Over a window of many samples, the metrics are updated but the object is not written.
    let window = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < window {
        let now = h.get("quiet").await.unwrap();
        assert_eq!(now.metadata.resource_version, rv, "{now:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = h.metrics_text();
    assert!(
        m.contains("flotilla_instance_memory_bytes{service=\"svc\",instance=\"quiet\"}"),
        "{m}"
    );
    h.delete("quiet").await;
    h.wait_gone("quiet", T).await;
    h.stop().await;
}
