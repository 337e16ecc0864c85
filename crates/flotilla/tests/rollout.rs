//! Zero-downtime deploys end to end: real `flotilla up`, real demo processes, and a load
//! generator sending requests through the gateway during every rollout.
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::load::{Load, LoadConfig};
use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// A service of the demo whose answer names its version (`GREETING`).
fn versioned(name: &str, replicas: u32, version: &str, extra_args: &str, deploy: &str) -> String {
    let deploy_line = format!("deploy = {{ max_surge = 1, max_unavailable = 0{deploy} }}");
    versioned_demo(
        name,
        replicas,
        version,
        extra_args,
        &deploy_line,
        "200ms",
        1,
    )
}

/// Requests that must have started during each rollout below (the load offers a few hundred
/// per second; the shortest window, a crash loop and its rollback, lasts about a second), so a
/// test whose load did not run cannot pass.
const MIN_REQUESTS: usize = 100;

/// Load through the gateway on persistent HTTP/1.1 and HTTP/2 connections, GETs and POSTs
/// (see `common::load`); returns once it flows.
fn start_load(up: &Up, host: &str) -> Load {
    let load = Load::start(LoadConfig::new(&up.gateway, host));
    wait_for("the load to flow", T, || {
        (load.answered() + load.failed() >= 50).then_some(())
    });
    load
}

fn service(up: &Up, name: &str) -> Value {
    up.api_get(&format!("/api/v1/services/{name}"))
}

fn rollout_phase(up: &Up, name: &str) -> String {
    service(up, name)["status"]["rollout"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits until the service's rollout of a spec at least `generation` reaches `phase`.
fn wait_phase(up: &Up, name: &str, generation: u64, phase: &str) -> Value {
    wait_for(&format!("rollout of {name} to be {phase}"), T, || {
        let s = service(up, name);
        let seen = s["status"]["observedGeneration"].as_u64().unwrap_or(0) >= generation;
        (seen && s["status"]["rollout"]["phase"] == phase).then_some(s)
    })
}

fn versions_answering(up: &Up, host: &str, n: usize) -> Vec<String> {
    (0..n)
        .filter_map(|_| up.through_gateway(host, "/"))
        .map(|r| {
            r.body
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[test]
fn rolling_update_of_five_replicas_drops_no_request() {
    let up = Up::start(&versioned("web", 5, "v1", "", ""));
    up.wait_ready("web", 5);
    wait_phase(&up, "web", 1, "Complete");

    let load = start_load(&up, "web.test");
    let from = Instant::now();
    apply(&up, &versioned("web", 5, "v2", "", ""));
    let s = wait_phase(&up, "web", 2, "Complete");
    let to = Instant::now();
    let load = load.finish();
    load.assert_clean("the rolling update", from, to, MIN_REQUESTS);
    assert_eq!(s["status"]["revision"], 2);
    assert!(
        versions_answering(&up, "web.test", 10)
            .iter()
            .all(|v| v == "v2")
    );
    // Complete once the old ones are deleting; the last may still be stopping: five remain.
    assert_eq!(up.wait_ready("web", 5).len(), 5);

    // The CLI agrees, and history shows what changed.
    let out = up.cli(&["rollout", "status", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = up.cli(&["rollout", "history", "web"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("env.GREETING"), "{text}");

    // An apply that changes nothing records no revision.
    apply(&up, &versioned("web", 5, "v2", "", ""));
    let revs = up.api_get("/api/v1/services/web/revisions");
    assert_eq!(revs["items"].as_array().map(Vec::len), Some(2), "{revs}");
}

#[test]
fn a_revision_that_never_gets_ready_rolls_back_without_failed_requests() {
    let up = Up::start(&versioned("web", 3, "v1", "", ""));
    up.wait_ready("web", 3);
    wait_phase(&up, "web", 1, "Complete");

    let load = start_load(&up, "web.test");
    let from = Instant::now();
    apply(
        &up,
        &versioned(
            "web",
            3,
            "v2",
            r#", "--fail-readiness""#,
            r#", progress_deadline = "2s""#,
        ),
    );
    let s = wait_phase(&up, "web", 3, "RolledBack");
    let to = Instant::now();
    let load = load.finish();
    load.assert_clean(
        "the failed rollout and its rollback",
        from,
        to,
        MIN_REQUESTS,
    );

    let msg = s["status"]["rollout"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Revision 1 was good; its spec comes back as a new record, revision 3.
    assert!(
        msg.contains(
            "rolled back from revision 2 to the spec of revision 1, recorded as revision 3"
        ),
        "{msg}"
    );
    assert!(msg.contains("progress deadline"), "{msg}");
    assert!(
        versions_answering(&up, "web.test", 10)
            .iter()
            .all(|v| v == "v1")
    );
    let out = up.cli(&["rollout", "status", "web"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "rollout status fails after a rollback: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let events = up.api_get("/api/v1/events?kind=Service&name=web");
    let reasons: Vec<&str> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&"RolloutFailed") && reasons.contains(&"RolledBack"),
        "{reasons:?}"
    );
}

#[test]
fn a_revision_that_crashes_on_start_rolls_back() {
    let up = Up::start(&versioned("web", 2, "v1", "", ""));
    up.wait_ready("web", 2);
    wait_phase(&up, "web", 1, "Complete");
    let load = start_load(&up, "web.test");
    let from = Instant::now();
    apply(
        &up,
        // It crashes before it listens, so it never passes readiness: one that crashed a few
        // milliseconds after a passed probe would take the requests sent to it down too.
        &versioned(
            "web",
            2,
            "v2",
            r#", "--start-delay", "1s", "--crash-after", "10ms""#,
            "",
        ),
    );
    let s = wait_phase(&up, "web", 3, "RolledBack");
    let to = Instant::now();
    let load = load.finish();
    load.assert_clean(
        "the crashing rollout and its rollback",
        from,
        to,
        MIN_REQUESTS,
    );
    let msg = s["status"]["rollout"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        msg.contains("CrashLoopBackOff") || msg.contains("restarts"),
        "{msg}"
    );
    assert!(
        versions_answering(&up, "web.test", 6)
            .iter()
            .all(|v| v == "v1")
    );
}

#[test]
fn undo_returns_to_the_previous_revision() {
    let up = Up::start(&versioned("web", 2, "v1", "", ""));
    up.wait_ready("web", 2);
    apply(&up, &versioned("web", 2, "v2", "", ""));
    wait_phase(&up, "web", 2, "Complete");
    assert!(
        versions_answering(&up, "web.test", 4)
            .iter()
            .all(|v| v == "v2")
    );

    let out = up.cli(&["rollout", "undo", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = wait_phase(&up, "web", 3, "Complete");
    assert_eq!(s["status"]["revision"], 3);
    assert!(
        versions_answering(&up, "web.test", 6)
            .iter()
            .all(|v| v == "v1")
    );
    let revs = up.api_get("/api/v1/services/web/revisions");
    let causes: Vec<&str> = revs["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["spec"]["cause"].as_str())
        .collect();
    assert_eq!(causes.last(), Some(&"rollback to revision 1"), "{causes:?}");

    // Undo to a revision that does not exist names it.
    let out = up.cli(&["rollout", "undo", "web", "--to-revision", "42"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("revision 42 of service web not found"),
        "{err}"
    );
}

#[test]
fn pause_holds_a_rollout_and_resume_finishes_it() {
    let up = Up::start(&versioned("web", 2, "v1", "", ""));
    up.wait_ready("web", 2);
    wait_phase(&up, "web", 1, "Complete");
    assert!(up.cli(&["rollout", "pause", "web"]).status.success());
    apply(&up, &versioned("web", 2, "v2", "", ""));
    wait_phase(&up, "web", 2, "Paused");
    assert!(
        versions_answering(&up, "web.test", 4)
            .iter()
            .all(|v| v == "v1"),
        "nothing rolled while paused"
    );
    assert!(up.cli(&["rollout", "resume", "web"]).status.success());
    wait_phase(&up, "web", 2, "Complete");
    assert!(
        versions_answering(&up, "web.test", 4)
            .iter()
            .all(|v| v == "v2")
    );
}

#[test]
fn flotilla_killed_mid_rollout_finishes_it_after_restart() {
    // min_ready keeps the rollout in progress long enough to kill flotilla in the middle.
    let mut up = Up::start(&versioned("web", 4, "v1", "", r#", min_ready = "1s""#));
    up.wait_ready("web", 4);
    wait_phase(&up, "web", 1, "Complete");
    // The user edits the file `up` runs from and applies it: after a restart, `up` applies
    // the file again, and it must say v2.
    let file = up.dir.path().join("flotilla.toml");
    let text = std::fs::read_to_string(&file)
        .expect("read")
        .replace("\"v1\"", "\"v2\"");
    std::fs::write(&file, text).expect("write");
    let out = up.cli(&["apply", "-f", file.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the rollout to be under way", T, || {
        let s = service(&up, "web");
        (s["status"]["updatedReplicas"].as_u64() >= Some(1)
            && rollout_phase(&up, "web") == "Progressing")
            .then_some(())
    });
    up.kill9();
    up.spawn();
    let s = wait_phase(&up, "web", 2, "Complete");
    assert_eq!(s["status"]["revision"], 2);
    // An old instance that was being stopped at the kill outlived it and finishes stopping
    // (gracefully, under the new `up`).
    wait_for("four instances, none stopping", T, || {
        (up.instances("web").len() == 4).then_some(())
    });
    assert!(
        versions_answering(&up, "web.test", 8)
            .iter()
            .all(|v| v == "v2")
    );
    // The history survived the restart.
    let revs = up.api_get("/api/v1/services/web/revisions");
    assert_eq!(revs["items"].as_array().map(Vec::len), Some(2));
}

#[test]
fn concurrent_applies_with_a_version_conflict_and_never_corrupt() {
    let up = Up::start(&versioned("web", 1, "v1", "", ""));
    up.wait_ready("web", 1);
    // Read once the controller is done writing status: any write moves the version.
    wait_phase(&up, "web", 1, "Complete");
    let s = service(&up, "web");
    let rv = s["metadata"]["resourceVersion"].as_u64().expect("rv");
    let auth = format!("Bearer {}", up.token);
    let body = |greeting: &str| {
        let mut v = s.clone();
        v["spec"]["env"]["GREETING"] = Value::String(greeting.into());
        v["metadata"]["resourceVersion"] = Value::from(rv);
        v.to_string()
    };
    let (a, b) = (body("va"), body("vb"));
    let api = up.api.clone();
    let auth2 = auth.clone();
    let api2 = api.clone();
    let t1 = std::thread::spawn(move || {
        http(
            &api,
            "POST",
            "/api/v1/services",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            &a,
        )
    });
    let t2 = std::thread::spawn(move || {
        http(
            &api2,
            "POST",
            "/api/v1/services",
            &[
                ("Authorization", &auth2),
                ("Content-Type", "application/json"),
            ],
            &b,
        )
    });
    let r1 = t1.join().expect("thread").expect("answer");
    let r2 = t2.join().expect("thread").expect("answer");
    let mut codes = [r1.status, r2.status];
    codes.sort();
    assert_eq!(
        codes,
        [200, 409],
        "one wins, the other gets a conflict: {} / {}",
        r1.body,
        r2.body
    );
    let loser = if r1.status == 409 { &r1.body } else { &r2.body };
    assert!(loser.contains("resourceVersion"), "{loser}");
    let s = service(&up, "web");
    assert_eq!(s["metadata"]["generation"], 2);
    let g = s["spec"]["env"]["GREETING"].as_str().unwrap_or_default();
    assert!(g == "va" || g == "vb", "{g}");
}

#[test]
fn in_flight_requests_finish_when_their_instance_is_replaced() {
    let up = Up::start(&versioned("web", 1, "v1", "", ""));
    up.wait_ready("web", 1);
    wait_phase(&up, "web", 1, "Complete");
    // A slow request is in flight through the gateway when the deploy replaces its instance.
    let gw = up.gateway.clone();
    let slow =
        std::thread::spawn(move || http(&gw, "GET", "/slow?ms=1500", &[("Host", "web.test")], ""));
    wait_for("the slow request to be in flight", T, || {
        let m = http(&up.metrics, "GET", "/metrics", &[], "")?;
        m.body
            .contains("flotilla_gateway_open_connections 1")
            .then_some(())
    });
    let load = start_load(&up, "web.test");
    let from = Instant::now();
    apply(&up, &versioned("web", 1, "v2", "", ""));
    wait_phase(&up, "web", 2, "Complete");
    let r = slow
        .join()
        .expect("thread")
        .expect("the slow request got an answer");
    // Until the old instance has drained its slow request: the whole replacement.
    let to = Instant::now();
    let load = load.finish();
    load.assert_clean(
        "the replacement of the only instance",
        from,
        to,
        MIN_REQUESTS,
    );
    assert_eq!(
        r.status, 200,
        "the in-flight request finished on the old instance: {}",
        r.body
    );
}

/// Without a readiness probe an instance is available only once it stayed up for the stability
/// window (5 s): a process that crashes a second after each start is never a good rollout,
/// its rollout fails, and its revision never becomes the last good one; a process that stays
/// up completes its rollout once the window passed; `min_ready` overrides the window.
#[test]
fn a_crash_loop_without_a_readiness_probe_is_never_a_good_rollout() {
    let started = Instant::now();
    let up = Up::start(
        r#"
[service.exit1]
command = "sh"
args = ["-c", "sleep 1; exit 1"]

[service.steady]
command = "sleep"
args = ["300"]

[service.quick]
command = "sleep"
args = ["300"]
deploy = { min_ready = "0s" }
"#,
    );
    let mut steady_complete = None;
    wait_for("exit1 to fail and steady to complete", T, || {
        let exit1 = up.cli(&["rollout", "status", "exit1", "--no-watch"]);
        let said = String::from_utf8_lossy(&exit1.stdout).to_string();
        assert!(
            !said.contains("Complete"),
            "a crash loop passed for a good rollout: {said}"
        );
        let s = service(&up, "exit1");
        assert_eq!(
            s["status"]["lastGoodRevision"].as_u64().unwrap_or(0),
            0,
            "a crash-looping revision became the last good one: {s}"
        );
        if steady_complete.is_none() && rollout_phase(&up, "steady") == "Complete" {
            steady_complete = Some(started.elapsed());
        }
        // The CLI asked before the service was read: its verdict may lag one step behind.
        let failed = exit1.status.code() == Some(1);
        if failed {
            assert!(said.contains("Failed"), "exit 1 says why: {said}");
        } else {
            assert_eq!(exit1.status.code(), Some(3), "in progress: {said}");
        }
        (failed && steady_complete.is_some()).then_some(())
    });
    let steady = steady_complete.unwrap();
    assert!(
        steady >= Duration::from_secs(5),
        "steady completed after {steady:?}, before the stability window"
    );
    // `min_ready = "0s"` completes as soon as the instance runs (well before the window).
    assert_eq!(rollout_phase(&up, "quick"), "Complete");
    let s = service(&up, "steady");
    assert!(s["status"]["lastGoodRevision"].as_u64().unwrap_or(0) >= 1);
    let msg = service(&up, "exit1")["status"]["rollout"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("restarts"), "{msg}");
}
