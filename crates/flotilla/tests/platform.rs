//! End to end: a real `flotilla up`, real demo processes, real sockets and (as root) real
//! cgroups. Each test has its own data directory, ports and node name.
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

#[test]
fn three_replicas_all_get_traffic_through_the_gateway() {
    let up = Up::start(&demo_service("web", 3, ""));
    let ready = up.wait_ready("web", 3);
    let names: BTreeSet<String> = ready.iter().map(name_of).collect();

    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        let r = up
            .through_gateway("web.test", "/")
            .expect("gateway reachable");
        assert_eq!(r.status, 200, "{}", r.body);
        seen.insert(instance_of(&r.body).expect("instance in body"));
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(seen, names, "traffic must reach every ready instance");

    // No route → 404 with a reason; the CLI lists what runs.
    let r = up
        .through_gateway("nothing.test", "/")
        .expect("gateway reachable");
    assert_eq!(r.status, 404);
    assert!(r.body.contains("no route"), "{}", r.body);
    let out = up.cli(&["get", "instances"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    for n in &names {
        assert!(table.contains(n.as_str()), "{table}");
    }
    let out = up.cli(&["get", "services", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["items"][0]["status"]["readyReplicas"], 3, "{v}");
    let out = up.cli(&["get", "services", "web", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["metadata"]["name"], "web", "{v}");
}

#[test]
fn killed_instance_is_replaced_while_traffic_flows() {
    let up = Up::start(&demo_service("web", 2, ""));
    let ready = up.wait_ready("web", 2);
    let victim = &ready[0];
    let pid = victim["status"]["pid"].as_u64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");

    // Keep sending requests until the victim is back; none may fail.
    let started = Instant::now();
    let mut sent = 0;
    let mut failures = Vec::new();
    let name = name_of(victim);
    loop {
        let r = up.through_gateway("web.test", "/");
        sent += 1;
        match r {
            Some(r) if r.status == 200 => {}
            Some(r) => failures.push(format!("{} {}", r.status, r.body.trim())),
            None => failures.push("connection failed".to_string()),
        }
        let back = up.instances("web").iter().any(|i| {
            name_of(i) == name
                && i["status"]["ready"] == true
                && i["status"]["restarts"].as_u64() >= Some(1)
        });
        if back && sent >= 20 {
            break;
        }
        assert!(
            started.elapsed() < T,
            "instance {name} not back after {T:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {failures:?}",
        failures.len()
    );
    let inst = up.instances("web");
    let revived = inst
        .iter()
        .find(|i| name_of(i) == name)
        .expect("still there");
    assert_ne!(
        revived["status"]["pid"].as_u64(),
        Some(pid as u64),
        "a new process runs"
    );
}

#[test]
fn failing_liveness_restarts_and_failing_readiness_only_unroutes() {
    let extra = r#"
[service.web.probes.liveness]
http = { path = "/health" }
period = "300ms"
timeout = "250ms"
failure_threshold = 2
"#;
    // The liveness table must follow the readiness one; append it after the service.
    let up = Up::start(&format!("{}{extra}", demo_service("web", 2, "")));
    let ready = up.wait_ready("web", 2);
    let (a, b) = (&ready[0], &ready[1]);

    // Readiness failure: out of the gateway, not restarted.
    let port = port_of(a, "http");
    let r = http(
        &format!("127.0.0.1:{port}"),
        "POST",
        "/fail-readiness",
        &[],
        "",
    )
    .expect("demo reachable");
    assert_eq!(r.status, 200);
    let a_name = name_of(a);
    wait_for("instance to become unready", T, || {
        up.instances("web")
            .iter()
            .any(|i| name_of(i) == a_name && i["status"]["ready"] == false)
            .then_some(())
    });
    for _ in 0..20 {
        let r = up.through_gateway("web.test", "/").expect("gateway");
        assert_eq!(r.status, 200);
        assert_ne!(
            instance_of(&r.body).as_deref(),
            Some(a_name.as_str()),
            "unready instance got traffic"
        );
    }
    let a_now = up
        .instances("web")
        .into_iter()
        .find(|i| name_of(i) == a_name)
        .expect("a");
    assert_eq!(
        a_now["status"]["restarts"], 0,
        "readiness failure must not restart"
    );

    // Liveness failure (hang): restarted.
    let b_name = name_of(b);
    let port = port_of(b, "http");
    let _ = http(&format!("127.0.0.1:{port}"), "POST", "/hang", &[], "");
    let restarted = wait_for("liveness restart", T, || {
        up.instances("web")
            .into_iter()
            .find(|i| name_of(i) == b_name && i["status"]["restarts"].as_u64() >= Some(1))
    });
    let reason = restarted["status"]["lastExit"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(reason, "LivenessFailed", "{restarted}");
    up.wait_ready("web", 1 + 1);
}

#[test]
fn crash_loop_backs_off_and_shows_it() {
    let up = Up::start(
        r#"
[service.crashy]
command = "sh"
args = ["-c", "echo starting; exit 3"]
restart = { backoff_initial = "200ms", backoff_max = "5s" }
"#,
    );
    let inst = wait_for("CrashLoopBackOff", T, || {
        up.instances("crashy")
            .into_iter()
            .find(|i| i["status"]["phase"] == "CrashLoopBackOff")
    });
    assert!(inst["status"]["restarts"].as_u64() >= Some(2), "{inst}");
    assert_eq!(inst["status"]["lastExit"]["code"], 3, "{inst}");
    let out = up.cli(&["describe", "service", "crashy"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CrashLoopBackOff"), "{text}");
    // Backoff grows: restarts over the next second stay few.
    let before = inst["status"]["restarts"].as_u64().unwrap_or(0);
    let t0 = Instant::now();
    wait_for("a second to pass", T, || {
        (t0.elapsed() >= Duration::from_secs(1)).then_some(())
    });
    let after = up.instances("crashy")[0]["status"]["restarts"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        after - before <= 3,
        "restarted {} times in 1s despite backoff",
        after - before
    );
    let logs = up.cli(&["logs", "crashy"]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("starting"));
}

#[test]
fn memory_limit_oom_kill_is_reported() {
    if !require_cgroups("memory_limit_oom_kill_is_reported") {
        return;
    }
    let up = Up::start(
        r#"
[service.hog]
command = "flotilla-demo"
args = ["--port", "${PORT}", "--alloc-mb", "256"]
ports = ["http"]
resources = { memory = "32Mi" }
restart = { backoff_initial = "1s" }
"#,
    );
    let inst = wait_for("an OOM kill to be reported", T, || {
        up.instances("hog")
            .into_iter()
            .find(|i| i["status"]["lastExit"]["oomKilled"] == true)
    });
    assert_eq!(inst["status"]["lastExit"]["reason"], "OOMKilled", "{inst}");
    let events = up.api_get("/api/v1/events");
    let oom = events["items"]
        .as_array()
        .expect("items")
        .iter()
        .any(|e| e["reason"] == "OOMKilled");
    assert!(oom, "an OOMKilled event is recorded: {events}");
}

#[test]
fn fork_bomb_stops_at_the_pid_limit() {
    if !require_cgroups("fork_bomb_stops_at_the_pid_limit") {
        return;
    }
    let up = Up::start(
        r#"
[service.bomb]
command = "sh"
args = ["-c", "i=0; while [ $$i -lt 300 ]; do sleep 30 & i=$$((i+1)); done; echo done-forking; sleep 30"]
resources = { pids = 20 }
"#,
    );
    // The shell gives up with "Cannot fork" once the cgroup is full.
    wait_for("fork failures in the log", T, || {
        let out = up.cli(&["logs", "bomb"]);
        String::from_utf8_lossy(&out.stdout)
            .to_lowercase()
            .contains("fork")
            .then_some(())
    });
    for _ in 0..10 {
        let n = up.workload_pids().len();
        assert!(n <= 20, "{n} processes run in a cgroup limited to 20");
    }
    assert!(!up.instances("bomb").is_empty());
}

#[test]
fn delete_and_shutdown_leave_nothing_and_sigterm_comes_first() {
    let marker_dir = tempfile::tempdir().expect("tempdir");
    let marker = marker_dir.path().join("got-term");
    let grandchild = if cgroups_available() {
        // A grandchild in its own session that ignores SIGTERM: only the cgroup can catch it.
        "setsid sh -c 'trap \"\" TERM; sleep 300' & "
    } else {
        ""
    };
    let script = format!(
        "{grandchild}trap 'echo term >> {}; exit 0' TERM; while true; do sleep 0.05; done",
        marker.display()
    );
    let services = format!(
        r#"
[service.graceful]
command = "sh"
args = ["-c", "{}"]
stop = {{ grace_period = "5s" }}

{}"#,
        script.replace('\\', "\\\\").replace('"', "\\\""),
        demo_service("web", 2, "")
    );
    let mut up = Up::start(&services);
    up.wait_ready("web", 2);
    up.wait_ready("graceful", 1);
    wait_for("workloads to be running", T, || {
        (up.workload_pids().len() >= 3).then_some(())
    });

    let out = up.cli(&["delete", "service", "graceful"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("graceful's instance to be gone", T, || {
        up.instances("graceful").is_empty().then_some(())
    });
    let got = std::fs::read_to_string(&marker).unwrap_or_default();
    assert!(
        got.contains("term"),
        "the workload got SIGTERM before being killed"
    );

    // Ctrl-C (SIGTERM) of up: exits 0 and leaves no process and no cgroup behind.
    let code = up.stop();
    assert_eq!(code, Some(0), "flotilla up exits 0:\n{}", up.up_logs());
    let left = up.workload_pids();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    if cgroups_available() {
        let cg = up.leftover_cgroups();
        assert!(cg.is_empty(), "cgroups left behind: {cg:?}");
    } else {
        skip(
            "cgroup leftovers check of delete_and_shutdown_leave_nothing_and_sigterm_comes_first needs root",
        );
    }
}

#[test]
fn kill9_of_up_then_restart_keeps_services_and_their_processes() {
    let mut up = Up::start(&demo_service("web", 2, ""));
    up.wait_ready("web", 2);
    let before = up.api_get("/api/v1/services/web");
    let old_pids: BTreeSet<u64> = up
        .instances("web")
        .iter()
        .filter_map(|i| i["status"]["pid"].as_u64())
        .collect();

    up.kill9();
    up.spawn();
    let after = up.api_get("/api/v1/services/web");
    assert_eq!(before["metadata"]["uid"], after["metadata"]["uid"]);
    assert_eq!(
        before["metadata"]["generation"],
        after["metadata"]["generation"]
    );
    assert_eq!(before["spec"], after["spec"]);
    // The processes outlived their supervisor and were re-adopted: the same two, not restarted.
    let ready = wait_for("the 2 instances ready with their old processes", T, || {
        let ready = up.ready_instances("web");
        let pids: BTreeSet<u64> = ready
            .iter()
            .filter_map(|i| i["status"]["pid"].as_u64())
            .collect();
        (ready.len() == 2 && up.instances("web").len() == 2 && pids == old_pids).then_some(ready)
    });
    for i in &ready {
        assert_eq!(i["status"]["restarts"], 0, "{i:#}");
    }
    let r = up.through_gateway("web.test", "/").expect("gateway");
    assert_eq!(r.status, 200);
}

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    let up = Up::start(&demo_service("web", 1, ""));
    up.wait_ready("web", 1);
    let before = up.api_get("/api/v1/services/web");

    let cases = [
        (
            "syntax.toml",
            "[service.web]\ncommand = \"x\nreplicas = 2\n",
            "syntax.toml:2:",
        ),
        (
            "unknown.toml",
            "[service.web]\ncommand = \"x\"\nreplica = 2\n",
            "did you mean `replicas`",
        ),
        (
            "invalid.toml",
            "[service.web]\ncommand = \"x\"\nresources = { memory = \"lots\" }\n",
            "service.web.resources.memory",
        ),
    ];
    for (file, text, expect) in cases {
        std::fs::write(up.dir.path().join(file), text).expect("write");
        let out = up.cli(&["apply", "-f", file]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} must be refused");
        assert!(
            err.contains(expect),
            "{file}: expected {expect:?} in:\n{err}"
        );
    }

    // Straight to the API: no token, bad token, malformed body, invalid value.
    let r = http(&up.api, "GET", "/api/v1/services", &[], "").expect("api");
    assert_eq!(r.status, 401);
    assert!(r.body.contains("requestId"), "{}", r.body);
    let auth = format!("Bearer {}", up.token);
    let r = http(
        &up.api,
        "POST",
        "/api/v1/services",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        "{\"metadata\":",
    )
    .expect("api");
    assert_eq!(r.status, 400, "{}", r.body);
    let r = http(
        &up.api,
        "POST",
        "/api/v1/services",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        r#"{"metadata":{"name":"web"},"spec":{"command":"x","replicas":"three"}}"#,
    )
    .expect("api");
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("spec.replicas"), "{}", r.body);

    // What the user owns is untouched (status is the controller's and may move on by itself).
    let after = up.api_get("/api/v1/services/web");
    assert_eq!(before["spec"], after["spec"], "nothing stored changed");
    assert_eq!(
        before["metadata"]["generation"],
        after["metadata"]["generation"]
    );
    assert_eq!(before["metadata"]["uid"], after["metadata"]["uid"]);
    let revisions = up.api_get("/api/v1/services/web/revisions");
    assert_eq!(
        revisions["items"].as_array().map(Vec::len),
        Some(1),
        "no revision was recorded"
    );
}

#[test]
fn logs_events_and_metrics_are_exposed() {
    let up = Up::start(&demo_service("web", 1, ""));
    let ready = up.wait_ready("web", 1);
    for _ in 0..3 {
        up.through_gateway("web.test", "/").expect("gateway");
    }
    let name = name_of(&ready[0]);
    let out = up.cli(&["logs", "web", "--instance", &name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = up.cli(&["events"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Started") || text.contains("Created"),
        "{text}"
    );

    // A restart shows up in the restart counter.
    let pid = ready[0]["status"]["pid"].as_u64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let m = wait_for("the restart to be counted", T, || {
        let m = http(&up.metrics, "GET", "/metrics", &[], "")?;
        m.body
            .contains("flotilla_instance_restarts_total{service=\"web\"} 1")
            .then_some(m)
    });
    assert_eq!(m.status, 200);
    for series in [
        "flotilla_instances{phase=\"Running\"}",
        "flotilla_gateway_requests_total{route=\"web\",status_class=\"2xx\"} 3",
        "flotilla_gateway_request_duration_seconds_bucket",
        "flotilla_api_request_duration_seconds_bucket",
    ] {
        assert!(
            m.body.contains(series),
            "missing {series} in /metrics:\n{}",
            m.body
        );
    }
    if cgroups_available() {
        // Usage is sampled from the cgroup.
        wait_for("memory usage of the instance", T, || {
            let m = http(&up.metrics, "GET", "/metrics", &[], "")?;
            m.body
                .contains("flotilla_instance_memory_bytes{service=\"web\"")
                .then_some(())
        });
    }
    let out = up.cli(&["version"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("(server)"));
}

#[test]
fn logs_and_events_follow_stream_new_output() {
    let up = Up::start(&ticker_service("0s"));
    wait_for("the ticker to run", T, || {
        up.instances("ticker")
            .iter()
            .any(|i| i["status"]["phase"] == "Running")
            .then_some(())
    });
    let tick = |l: &str| {
        l.rsplit('-')
            .next()
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    let mut logs = Follower::start(&up, &["logs", "ticker", "-f", "--tail", "1"]);
    let first = logs.until("a tick", T, |l| l.contains("tick-"));
    let n = tick(&first).expect("tick number");
    // A tick written after the follow began proves it streams, not just dumps the file.
    logs.until("a later tick", T, |l| tick(l).is_some_and(|m| m >= n + 3));

    // A deploy replaces the instance: the follow goes on with the new one, from its first
    // line, and says who joined and who left (in any order with the new lines).
    let old = name_of(&up.instances("ticker")[0]);
    let out = up.cli(&["restart", "ticker"]);
    assert!(out.status.success(), "{out:?}");
    let joined = logs.until("a joined line", T, |l| l.ends_with(" joined"));
    let new = joined
        .trim_start_matches("--- ")
        .trim_end_matches(" joined")
        .to_string();
    assert!(new.starts_with("ticker-") && new != old, "{joined}");
    let wanted = [
        format!("[{new}] tick-1"),
        format!("[{new}] tick-20"),
        format!("--- {old} left"),
    ];
    let missing = std::cell::RefCell::new(wanted.to_vec());
    logs.until("the new instance's lines and the old one leaving", T, |l| {
        missing.borrow_mut().retain(|w| w != l);
        missing.borrow().is_empty()
    });
    drop(logs);

    let mut events = Follower::start(&up, &["events", "-f"]);
    events.until("the header", T, |l| l.starts_with("TIME"));
    let out = up.cli(&["delete", "service", "ticker"]);
    assert!(out.status.success());
    events.until("the Deleted event", T, |l| {
        l.contains("Deleted") && l.contains("service/ticker")
    });
}

#[test]
fn restart_policy_never_is_honoured() {
    let up = Up::start(
        r#"
[service.once]
command = "sh"
args = ["-c", "echo ran-once"]
restart = { policy = "never" }
"#,
    );
    let done = wait_for("the instance to succeed", T, || {
        up.instances("once")
            .into_iter()
            .find(|i| i["status"]["phase"] == "Succeeded")
    });
    // It stays: neither restarted nor replaced by a new instance.
    let t0 = Instant::now();
    wait_for("a second to pass", T, || {
        (t0.elapsed() >= Duration::from_secs(1)).then_some(())
    });
    let now = up.instances("once");
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(name_of(&now[0]), name_of(&done));
    assert_eq!(now[0]["status"]["restarts"], 0);
    let logs = String::from_utf8_lossy(&up.cli(&["logs", "once"]).stdout).to_string();
    assert_eq!(logs.matches("ran-once").count(), 1, "{logs}");
}

#[test]
fn a_client_that_stops_reading_does_not_block_shutdown() {
    use std::io::Write as _;
    // A chatty workload: its log grows by megabytes per second.
    let mut up = Up::start(
        r#"
[service.chatty]
command = "sh"
args = ["-c", "while true; do seq 1 100000; done"]
"#,
    );
    let inst = wait_for("the chatty instance", T, || {
        up.instances("chatty")
            .into_iter()
            .find(|i| i["status"]["phase"] == "Running")
    });
    // Follow its log and never read, so every buffer between the two ends fills up.
    let mut stalled = std::net::TcpStream::connect(&up.api).expect("connect");
    write!(
        stalled,
        "GET /api/v1/services/chatty/logs?follow=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        up.token
    )
    .expect("request");
    // Once the log has rotated, more than 10 MiB were offered to a client that read nothing.
    let rotated = up
        .data_dir()
        .join("logs")
        .join(name_of(&inst))
        .join("output.log.1");
    wait_for("the log to rotate", T, || rotated.exists().then_some(()));
    let t0 = Instant::now();
    let code = up.stop();
    assert_eq!(code, Some(0), "{}", up.up_logs());
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        t0.elapsed()
    );
    drop(stalled);
}

#[test]
fn standalone_gateway_routes_from_a_remote_api() {
    use std::process::{Command, Stdio};
    let mut up = Up::start(&demo_service("web", 2, ""));
    let ready = up.wait_ready("web", 2);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut gw = Command::new(flotilla_bin())
        .args(["gateway", "--listen", &listen])
        .args(["--api", &format!("http://{}", up.api), "--token", &up.token])
        .env("FLOTILLA_CONFIG_DIR", up.config_dir())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(up.dir.path().join("gateway.log")).unwrap())
        .spawn()
        .expect("spawn flotilla gateway");
    let get = || http(&listen, "GET", "/", &[("Host", "web.test")], "");
    let seen: std::collections::BTreeSet<String> =
        wait_for("the standalone gateway to route", T, || {
            let names: std::collections::BTreeSet<String> = (0..10)
                .filter_map(|_| get())
                .filter(|r| r.status == 200)
                .filter_map(|r| instance_of(&r.body))
                .collect();
            (names.len() == 2).then_some(names)
        });
    let expected: std::collections::BTreeSet<String> = ready.iter().map(name_of).collect();
    assert_eq!(seen, expected);

    // A change (one instance unready) reaches it through the remote watch.
    let victim = name_of(&ready[0]);
    let p = port_of(&ready[0], "http");
    http(
        &format!("127.0.0.1:{p}"),
        "POST",
        "/fail-readiness",
        &[],
        "",
    )
    .expect("demo");
    wait_for(
        "the standalone gateway to stop routing to the unready instance",
        T,
        || {
            let hits: Vec<String> = (0..10)
                .filter_map(|_| get())
                .filter_map(|r| instance_of(&r.body))
                .collect();
            (!hits.is_empty() && hits.iter().all(|n| n != &victim)).then_some(())
        },
    );

    // The API goes away: the gateway keeps retrying, and every retry line says why it failed.
    up.stop();
    let log = wait_for("the gateway's retry lines", T, || {
        let log = std::fs::read_to_string(up.dir.path().join("gateway.log")).unwrap_or_default();
        (log.matches("reflector list failed").count() >= 4).then_some(log)
    });
    for line in log.lines().filter(|l| l.contains("reflector list failed")) {
        assert!(
            line.contains("Connection refused") || line.contains("connect"),
            "a retry line without its cause: {line}"
        );
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(gw.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = wait_for("flotilla gateway to exit", T, || {
        gw.try_wait().ok().flatten()
    });
    assert!(status.success(), "{status}");
}
