//! Startup probes end to end: a real `flotilla up` and real demo processes that take their time
//! to listen (`--start-delay`).
//!
//! - A slow starter whose liveness probe would kill it during start-up (shown by a twin without
//!   a startup probe, which is killed) is left alone while its startup probe has not passed,
//!   and becomes ready without a restart.
//! - An instance that never starts is restarted once its startup probe reaches its failure
//!   threshold, not before, and its status and events say why.
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)] // results are printed for `--nocapture` runs

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// Liveness that fails at once while nothing listens (a refused connection), twice in a row
/// (~1 s), but that a loaded machine does not trip once the process serves: a check has a whole
/// second.
const LIVENESS: &str = r#"
http = { path = "/health" }
period = "1s"
timeout = "1s"
failure_threshold = 2
"#;

/// The demo listening only after `delay`, with the liveness probe above and, if given, a
/// startup probe (`[…probes.startup]` body).
fn slow_demo(name: &str, delay: &str, startup: Option<&str>) -> String {
    let startup = startup
        .map(|s| format!("[service.{name}.probes.startup]\n{s}\n"))
        .unwrap_or_default();
    format!(
        r#"
[service.{name}]
command = "flotilla-demo"
args = ["--port", "${{PORT}}", "--start-delay", "{delay}"]
ports = ["http"]
stop = {{ grace_period = "5s" }}

{startup}
[service.{name}.probes.liveness]
{LIVENESS}
[service.{name}.probes.readiness]
http = {{ path = "/health" }}
period = "200ms"
timeout = "200ms"
failure_threshold = 3
"#
    )
}

fn time_of(v: &Value) -> SystemTime {
    let text = v.as_str().unwrap_or_else(|| panic!("a time, got {v}"));
    humantime::parse_rfc3339_weak(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn the_instance(up: &Up, service: &str) -> Option<Value> {
    let mut all = up.instances(service);
    assert!(all.len() <= 1, "one replica: {all:?}");
    all.pop()
}

fn events_of(up: &Up, instance: &str) -> Vec<(String, String)> {
    let v = up.api_get(&format!("/api/v1/events?kind=Instance&name={instance}"));
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_slow_starter_is_not_killed_by_liveness_while_its_startup_probe_has_not_passed() {
    // Up to 10 s to start (50 × 200 ms) for a process that listens after 3 s. The control has
    // the same process and liveness probe, and no startup probe.
    let startup = r#"http = { path = "/health" }
period = "200ms"
timeout = "200ms"
failure_threshold = 50"#;
    let up = Up::start(&format!(
        "{}{}",
        slow_demo("slow", "3s", Some(startup)),
        slow_demo("control", "3s", None)
    ));
    let t0 = Instant::now();

    // Until ready: Starting while its startup probe has not passed, and never restarted.
    let mut starting = false;
    let ready = wait_for("the slow starter to become ready", T, || {
        let i = the_instance(&up, "slow")?;
        assert_eq!(
            i["status"]["restarts"], 0,
            "restarted while starting up: {i}"
        );
        // Starting until the startup probe passes; Running (not yet ready) briefly after.
        if i["status"]["pid"].is_u64() && i["status"]["phase"] == "Starting" {
            assert_ne!(i["status"]["ready"], true, "ready while starting: {i}");
            starting = true;
        }
        (i["status"]["ready"] == true).then_some(i)
    });
    assert!(starting, "the instance was seen starting: {ready}");
    assert_eq!(ready["status"]["phase"], "Running", "{ready}");
    let took = time_of(&ready["status"]["readySince"])
        .duration_since(time_of(&ready["status"]["startedAt"]))
        .expect("ready after it started");
    assert!(
        took >= Duration::from_secs(3),
        "ready {took:?} after its start: the start-up delay was real"
    );

    // The same liveness probe kills the control during its start-up.
    let killed = wait_for("the control to be killed by liveness", T, || {
        the_instance(&up, "control").filter(|i| i["status"]["restarts"].as_u64() >= Some(1))
    });
    assert_eq!(
        killed["status"]["lastExit"]["reason"], "LivenessFailed",
        "{killed}"
    );

    // Liveness runs now (three of its periods) and passes: still never restarted.
    let since = Instant::now();
    wait_for("three liveness periods to pass", T, || {
        let i = the_instance(&up, "slow")?;
        assert_eq!(i["status"]["restarts"], 0, "restarted once ready: {i}");
        (since.elapsed() >= Duration::from_secs(3)).then_some(())
    });
    let name = name_of(&ready);
    let events = events_of(&up, &name);
    assert!(
        !events.iter().any(|(reason, _)| reason == "Killed"),
        "{events:?}"
    );
    eprintln!(
        "slow starter ready {took:?} after its process started ({:?} after up), not restarted; \
         the control was killed by liveness",
        t0.elapsed()
    );
}

#[test]
fn an_instance_that_never_starts_is_restarted_after_the_startup_threshold() {
    const PERIOD: Duration = Duration::from_millis(300);
    const THRESHOLD: u32 = 5;
    // The kill comes at the threshold-th failed check: checks run at 0, P, 2P, ….
    let due = PERIOD * (THRESHOLD - 1);
    let startup = format!(
        "http = {{ path = \"/health\" }}\nperiod = \"{}ms\"\ntimeout = \"{}ms\"\nfailure_threshold = {THRESHOLD}",
        PERIOD.as_millis(),
        PERIOD.as_millis()
    );
    let up = Up::start(&slow_demo("never", "1h", Some(&startup)));

    // The first process, seen before its restart.
    let first = wait_for("the first process to start", T, || {
        the_instance(&up, "never").filter(|i| {
            i["status"]["pid"].is_u64()
                && i["status"]["restarts"] == 0
                && i["status"]["startedAt"].is_string()
        })
    });
    let name = name_of(&first);
    let first_started = time_of(&first["status"]["startedAt"]);
    let seen_at = Instant::now();

    let mut phases = std::collections::BTreeSet::new();
    let restarted = wait_for("a restart after the startup threshold", T, || {
        let i = the_instance(&up, "never")?;
        assert_eq!(name_of(&i), name, "restarted in place, not replaced");
        assert_ne!(i["status"]["ready"], true, "never ready: {i}");
        phases.insert(
            i["status"]["phase"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        (i["status"]["restarts"].as_u64() >= Some(1)).then_some(i)
    });
    let exit = &restarted["status"]["lastExit"];
    assert_eq!(exit["reason"], "StartupFailed", "{restarted}");
    let lived = time_of(&exit["at"])
        .duration_since(first_started)
        .expect("exit after start");
    // Timer ticks are exact to a few ms; the agent's clock reads bracket them.
    assert!(
        lived + Duration::from_millis(20) >= due,
        "killed after {lived:?}, before {THRESHOLD} failed checks {PERIOD:?} apart ({due:?})"
    );
    assert!(
        lived < due + Duration::from_secs(10),
        "killed only after {lived:?} (due after {due:?})"
    );
    assert!(
        phases.contains("Starting"),
        "Starting until the probe failed: {phases:?}"
    );

    let events = events_of(&up, &name);
    let said =
        |reason: &str, text: &str| events.iter().any(|(r, m)| r == reason && m.contains(text));
    assert!(
        said("Unhealthy", "startup probe failed") && said("Killed", "startup probe failed"),
        "the events say why: {events:?}"
    );
    eprintln!(
        "never-starting instance killed {lived:?} after its start (due after {due:?}; seen \
         restarted {:?} after its first sighting)",
        seen_at.elapsed()
    );
}
