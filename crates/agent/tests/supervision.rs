//! Process supervision with real processes, sockets and the embedded store.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

mod common;

use std::time::{Duration, Instant};

use common::*;
use flotilla_spec::Phase;
use serde_json::json;

const T: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_ports_env_args_logs_and_restarts_after_kill9() {
    let mut h = start("run", |_| {}).await;
    let script = r#"echo "port=$PORT http=$PORT_HTTP admin=$PORT_ADMIN_API inst=$FLOTILLA_INSTANCE svc=$FLOTILLA_SERVICE node=$FLOTILLA_NODE greet=$GREETING arg=$1"; echo to-stderr >&2; exec python3 -m http.server --bind 127.0.0.1 "$PORT""#;
    h.create(
        "web-1",
        json!({
            "command": "sh",
            "args": ["-c", script, "sh", "a-${PORT_ADMIN_API}"],
            "ports": ["http", "admin-api"],
            "env": {"GREETING": "hi-${FLOTILLA_INSTANCE}"},
            "probes": {"readiness": {"http": {"path": "/"}, "period": "10s"}},
            "stop": {"grace_period": "2s"}
        }),
    )
    .await;
    let started = Instant::now();
    let inst = h
        .wait_instance("web-1", T, "running and ready", |i| {
            i.status.phase == Phase::Running && i.status.ready
        })
        .await;
    // Readiness is polled fast (100 ms) until first ready, although the period is 10 s.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    let http = inst.status.ports["http"];
    let admin = inst.status.ports["admin-api"];
    assert_ne!(http, admin);
    // From the agent's range, outside the kernel's ephemeral range.
    let range = flotilla_agent::AgentConfig::new("n", "/").port_range;
    assert!(range.contains(&http) && range.contains(&admin), "{range:?}");
    assert_eq!(inst.status.host.as_deref(), Some("127.0.0.1"));
    let pid = inst.status.pid.unwrap();

    let log = flotilla_agent::logs::read(&h.data_dir(), "web-1", None)
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&log);
    let want = format!(
        "port={http} http={http} admin={admin} inst=web-1 svc=svc node={} greet=hi-web-1 arg=a-{admin}",
        h.node
    );
    assert!(log.contains(&want), "log {log:?} lacks {want:?}");
    assert!(log.contains("to-stderr\n"), "{log}");
    assert!(h.has_event("web-1", "Started").await);

    // The server answers on the allocated port.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");

    // kill -9: restarted at once (first restart), restarts = 1, ready again, same ports.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let inst = h
        .wait_instance("web-1", T, "restarted and ready", |i| {
            i.status.restarts == 1 && i.status.ready && i.status.pid.is_some_and(|p| p != pid)
        })
        .await;
    let exit = inst.status.last_exit.clone().unwrap();
    assert_eq!((exit.reason.as_str(), exit.signal), ("Signaled", Some(9)));
    assert_eq!(inst.status.ports["http"], http);
    assert!(
        h.metrics_text()
            .contains("flotilla_instance_restarts_total{service=\"svc\"} 1")
    );

    // Delete: stopped, deleted from the store, the process is gone.
    let pid2 = inst.status.pid.unwrap();
    h.delete("web-1").await;
    h.wait_gone("web-1", T).await;
    assert!(!alive(pid2));
    assert!(h.has_event("web-1", "Stopped").await);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_rotate_into_whole_lines() {
    let mut h = start("logs", |c| {
        c.log_max_bytes = 4096;
        c.log_max_files = 3;
    })
    .await;
    h.create(
        "chatty",
        json!({
            "command": "sh",
            "args": ["-c", "i=0; while [ $i -lt 400 ]; do echo \"line $i ......................................\"; i=$((i+1)); done; exec sleep 60"],
            "stop": {"grace_period": "1s"}
        }),
    )
    .await;
    let dir = h.data_dir().join("logs/chatty");
    wait_for("log with line 399", T, || async {
        let s = std::fs::read_to_string(dir.join("output.log")).ok()?;
        s.contains("line 399 ").then_some(())
    })
    .await;
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["output.log", "output.log.1", "output.log.2"]);
    for n in &names {
        let s = std::fs::read_to_string(dir.join(n)).unwrap();
        assert!(s.len() <= 4096);
        assert!(
            s.lines()
                .all(|l| l.starts_with("line ") && l.ends_with('.')),
            "{n}: {s}"
        );
    }
    let tail = flotilla_agent::logs::read(&h.data_dir(), "chatty", Some(2))
        .await
        .unwrap();
    let tail = String::from_utf8(tail).unwrap();
    assert!(
        tail.starts_with("line 398 ") && tail.contains("line 399 "),
        "{tail}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_failure_restarts_and_readiness_failure_does_not() {
    let mut h = start("probe", |_| {}).await;
    let w = h.work();
    let dead = w.join("dead");
    let ready = w.join("ready");
    h.create(
        "live",
        json!({
            "command": "sleep", "args": ["60"],
            "probes": {"liveness": {"exec": {"command": ["sh", "-c", format!("test ! -e {}", dead.display())]},
                                     "period": "100ms", "failure_threshold": 2}},
            "stop": {"grace_period": "1s"}
        }),
    )
    .await;
    std::fs::write(&ready, "").unwrap();
    h.create(
        "ready",
        json!({
            "command": "sleep", "args": ["60"],
            "probes": {"readiness": {"exec": {"command": ["test", "-e", ready.display().to_string()]},
                                      "period": "100ms", "failure_threshold": 2}},
            "stop": {"grace_period": "1s"}
        }),
    )
    .await;
    let live = h
        .wait_instance("live", T, "running", |i| {
            i.status.phase == Phase::Running && i.status.ready
        })
        .await;
    let r = h
        .wait_instance("ready", T, "ready", |i| i.status.ready)
        .await;

    std::fs::write(&dead, "").unwrap();
    std::fs::remove_file(&ready).unwrap();
    let live2 = h
        .wait_instance("live", T, "restarted after liveness failure", |i| {
            i.status.restarts >= 1
                && i.status
                    .last_exit
                    .as_ref()
                    .is_some_and(|e| e.reason == "LivenessFailed")
        })
        .await;
    assert_ne!(live2.status.pid, live.status.pid);
    assert!(h.has_event("live", "Killed").await);
    assert!(h.metrics_text().contains("probe=\"liveness\""));

    let r2 = h
        .wait_instance("ready", T, "unready", |i| !i.status.ready)
        .await;
    assert_eq!(r2.status.restarts, 0);
    assert_eq!(r2.status.pid, r.status.pid);
    assert_eq!(r2.status.phase, Phase::Running);
    // The event is recorded just after the status write.
    wait_for("Unhealthy event", T, || async {
        h.has_event("ready", "Unhealthy").await.then_some(())
    })
    .await;
    // And back.
    std::fs::write(&ready, "").unwrap();
    h.wait_instance("ready", T, "ready again", |i| i.status.ready)
        .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_backs_off_with_growing_delay() {
    let mut h = start("crash", |_| {}).await;
    h.create(
        "crash",
        json!({
            "command": "sh", "args": ["-c", "echo crashing; exit 3"],
            "restart": {"policy": "always", "backoff_initial": "200ms", "backoff_max": "2s"}
        }),
    )
    .await;
    // Record when each restart count is first seen.
    let mut seen: Vec<(u32, Instant)> = Vec::new();
    let deadline = Instant::now() + T;
    let mut crash_loop = false;
    while seen.last().is_none_or(|(n, _)| *n < 5) {
        assert!(Instant::now() < deadline, "no 5 restarts in time: {seen:?}");
        if let Some(i) = h.get("crash").await {
            if seen.last().is_none_or(|(n, _)| *n != i.status.restarts) {
                seen.push((i.status.restarts, Instant::now()));
            }
            crash_loop |= i.status.phase == Phase::CrashLoopBackOff;
            if let Some(e) = &i.status.last_exit {
                assert_eq!((e.reason.as_str(), e.code), ("Error", Some(3)));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(crash_loop, "never saw CrashLoopBackOff");
    let at = |n: u32| seen.iter().find(|(k, _)| *k == n).map(|(_, t)| *t);
    // Delays: restart 1 immediate, then 200ms, 400ms, 800ms.
    let (t3, t4, t5) = (at(3).unwrap(), at(4).unwrap(), at(5).unwrap());
    let (g4, g5) = (t4 - t3, t5 - t4);
    assert!(g4 >= Duration::from_millis(300), "{seen:?}");
    assert!(g5 >= Duration::from_millis(700) && g5 > g4, "{seen:?}");
    assert!(h.has_event("crash", "BackOff").await);
    assert!(h.has_event("crash", "Exited").await);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_policy_ends_in_succeeded_or_failed() {
    let mut h = start("never", |_| {}).await;
    h.create(
        "ok",
        json!({"command": "true", "restart": {"policy": "never"}}),
    )
    .await;
    h.create(
        "bad",
        json!({"command": "false", "restart": {"policy": "on-failure", "backoff_initial": "10s"}}),
    )
    .await;
    h.create(
        "nocmd",
        json!({"command": "/nonexistent/flotilla-test", "restart": {"policy": "never"}}),
    )
    .await;
    h.wait_instance("ok", T, "succeeded", |i| i.status.phase == Phase::Succeeded)
        .await;
    let b = h
        .wait_instance("bad", T, "restarted once then backing off", |i| {
            i.status.restarts >= 1 && i.status.phase == Phase::Backoff
        })
        .await;
    assert_eq!(b.status.last_exit.unwrap().code, Some(1));
    let n = h
        .wait_instance("nocmd", T, "failed", |i| i.status.phase == Phase::Failed)
        .await;
    assert!(n.status.message.unwrap_or_default().contains("nonexistent"));
    // Deleting a terminal instance still removes it.
    h.delete("ok").await;
    h.wait_gone("ok", T).await;
    // Deleting during backoff as well.
    h.delete("bad").await;
    h.wait_gone("bad", T).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_signals_the_group_before_sigkill() {
    let mut h = start("stop", |_| {}).await;
    let w = h.work();
    // `$$$$` is a literal `$$` after flotilla's `${VAR}` expansion of args.
    let script = format!(
        r#"trap 'echo term > {w}/termed; exit 0' TERM
sh -c 'trap "echo child > {w}/child-termed; exit 0" TERM; echo $$$$ > {w}/child.pid; while :; do sleep 0.05; done' &
sh -c 'trap "" TERM; echo $$$$ > {w}/stubborn.pid; exec sleep 300' &
echo started
while :; do sleep 0.05; done"#,
        w = w.display()
    );
    h.create(
        "stopper",
        json!({"command": "sh", "args": ["-c", script], "stop": {"signal": "TERM", "grace_period": "1s"}}),
    )
    .await;
    let inst = h
        .wait_instance("stopper", T, "running", |i| {
            i.status.phase == Phase::Running
        })
        .await;
    let pid = inst.status.pid.unwrap();
    let child = wait_for("child pid", T, || async { read_pid(&w.join("child.pid")) }).await;
    let stubborn = wait_for("stubborn pid", T, || async {
        read_pid(&w.join("stubborn.pid"))
    })
    .await;
    let started = Instant::now();
    h.delete("stopper").await;
    h.wait_gone("stopper", T).await;
    // The whole group got SIGTERM; the one ignoring it was SIGKILLed after the grace period.
    assert!(w.join("termed").exists());
    assert!(w.join("child-termed").exists());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    for p in [pid, child, stubborn] {
        assert!(!alive(p), "pid {p} survived");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_shutdown_stops_instances_and_sets_pending() {
    let mut h = start("shutdown", |_| {}).await;
    h.create(
        "a",
        json!({"command": "sleep", "args": ["300"], "stop": {"grace_period": "1s"}}),
    )
    .await;
    h.create(
        "b",
        json!({"command": "sleep", "args": ["300"], "stop": {"grace_period": "1s"}}),
    )
    .await;
    let a = h
        .wait_instance("a", T, "running", |i| i.status.phase == Phase::Running)
        .await;
    let b = h
        .wait_instance("b", T, "running", |i| i.status.phase == Phase::Running)
        .await;
    h.stop().await;
    for (name, pid) in [("a", a.status.pid.unwrap()), ("b", b.status.pid.unwrap())] {
        let i = h.get(name).await.expect("not deleted on shutdown");
        assert_eq!(i.status.phase, Phase::Pending);
        assert!(!i.status.ready);
        assert_eq!(i.status.pid, None);
        assert!(!alive(pid));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_limits_are_reported_as_not_applied() {
    let mut h = start("nocg", |c| c.cgroups = flotilla_agent::CgroupMode::Disabled).await;
    assert_eq!(h.cgroups, None);
    h.create(
        "limited",
        json!({"command": "sleep", "args": ["60"], "resources": {"memory": "64Mi"}, "stop": {"grace_period": "1s"}}),
    )
    .await;
    let i = h
        .wait_instance("limited", T, "running", |i| {
            i.status.phase == Phase::Running
        })
        .await;
    let msg = i.status.message.unwrap_or_default();
    assert!(msg.contains("running without resource limits"), "{msg}");
    let pid = i.status.pid.unwrap();
    h.delete("limited").await;
    h.wait_gone("limited", T).await;
    assert!(!alive(pid));
    h.stop().await;
}

#[test]
fn instance_without_probes_uses_no_cpu() {
    // The agent runs on this runtime's threads, named so that their CPU time can be told
    // apart from that of the tests running in parallel.
    const THREADS: &str = "flotilla-idle";
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(THREADS)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut h = start("idle", |c| c.usage_interval = Duration::from_secs(5)).await;
        h.create(
            "idle",
            json!({"command": "sleep", "args": ["300"], "stop": {"grace_period": "1s"}}),
        )
        .await;
        h.wait_instance("idle", T, "running and ready", |i| {
            i.status.phase == Phase::Running && i.status.ready
        })
        .await;
        // A measurement window (not synchronization): a worker spinning on a closed channel
        // burns a whole CPU in it.
        let (cpu0, t0) = (threads_cpu_seconds(THREADS), Instant::now());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let used = threads_cpu_seconds(THREADS) - cpu0;
        let wall = t0.elapsed().as_secs_f64();
        assert!(
            used < 0.2 * wall,
            "agent used {used:.2}s CPU in {wall:.2}s with one idle instance"
        );
        h.delete("idle").await;
        h.wait_gone("idle", T).await;
        h.stop().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failures_back_off_unless_policy_is_never() {
    let mut h = start("startfail", |_| {}).await;
    let backoff = json!({"policy": "always", "backoff_initial": "50ms", "backoff_max": "200ms"});
    h.create(
        "nouser",
        json!({"command": "sleep", "args": ["300"], "user": "no-such-user-flotilla", "restart": backoff}),
    )
    .await;
    h.create(
        "badexpand",
        json!({"command": "sleep", "args": ["${NOPE}"],
               "restart": {"policy": "on-failure", "backoff_initial": "50ms", "backoff_max": "200ms"}}),
    )
    .await;
    h.create(
        "nobinary",
        json!({"command": "/nonexistent/flotilla-test", "restart": backoff}),
    )
    .await;
    h.create(
        "nouser-never",
        json!({"command": "sleep", "args": ["300"], "user": "no-such-user-flotilla", "restart": {"policy": "never"}}),
    )
    .await;
    for (name, why) in [
        ("nouser", "no-such-user-flotilla"),
        ("badexpand", "NOPE"),
        ("nobinary", "nonexistent"),
    ] {
        let i = h
            .wait_instance(name, T, "retrying in CrashLoopBackOff", |i| {
                i.status.phase == Phase::CrashLoopBackOff && i.status.restarts >= 5
            })
            .await;
        let msg = i.status.message.clone().unwrap_or_default();
        assert!(
            msg.contains(why) && msg.contains("retrying"),
            "{name}: {msg}"
        );
        // One event per phase change (Backoff, CrashLoopBackOff), not one per attempt.
        let n = h
            .events(name)
            .await
            .iter()
            .filter(|e| e.reason == "FailedToStart")
            .count();
        assert!((1..=2).contains(&n), "{name}: {n} FailedToStart events");
    }
    let n = h
        .wait_instance("nouser-never", T, "failed", |i| {
            i.status.phase == Phase::Failed
        })
        .await;
    assert!(
        n.status
            .message
            .unwrap_or_default()
            .contains("no-such-user-flotilla")
    );
    assert_eq!(n.status.restarts, 0);
    assert!(h.has_event("nouser-never", "FailedToStart").await);
    // Deleting while backing off removes it.
    for name in ["nouser", "badexpand", "nobinary", "nouser-never"] {
        h.delete(name).await;
    }
    for name in ["nouser", "badexpand", "nobinary", "nouser-never"] {
        h.wait_gone(name, T).await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_store_delete_is_retried() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let flaky = Arc::new(FlakyStore {
        inner: open_store(dir.path()),
        fail_deletes: AtomicU32::new(3),
        failed: AtomicU32::new(0),
    });
    let mut h = start_with(dir, flaky.clone(), unique_node("flaky"), |_| {}).await;
    h.create(
        "doomed",
        json!({"command": "sleep", "args": ["300"], "stop": {"grace_period": "1s"}}),
    )
    .await;
    h.wait_instance("doomed", T, "running", |i| i.status.phase == Phase::Running)
        .await;
    h.delete("doomed").await;
    h.wait_gone("doomed", T).await;
    assert_eq!(flaky.failed.load(Ordering::SeqCst), 3);
    h.stop().await;
}
