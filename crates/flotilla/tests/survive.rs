//! Workloads outlive their agent: `flotilla up` exiting on SIGTERM, or killed with `kill -9`,
//! leaves every instance running; the next `up` re-adopts them (same pids, logs complete, exits
//! that happened meanwhile reported with their code), and Ctrl-C still stops everything.
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn services(go: &std::path::Path) -> String {
    format!(
        r#"{web}
[service.ticker]
command = "sh"
args = ["-c", "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.02; done"]

[service.later]
command = "sh"
args = ["-c", "while [ ! -e '{go}' ]; do sleep 0.05; done; exit 7"]
restart = {{ policy = "never" }}
"#,
        web = demo_service("web", 2, ""),
        go = go.display()
    )
}

fn pids(up: &Up) -> BTreeMap<String, u64> {
    up.api_get("/api/v1/instances")["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|i| Some((name_of(i), i["status"]["pid"].as_u64()?)))
        .collect()
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn events_with(up: &Up, reason: &str) -> Vec<Value> {
    up.api_get("/api/v1/events")["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["reason"] == reason)
        .collect()
}

fn running(up: &Up) -> BTreeMap<String, u64> {
    wait_for("every instance running and web ready", T, || {
        let ready = up.ready_instances("web").len() == 2;
        let all = up.api_get("/api/v1/instances")["items"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let all_running = all.len() == 4 && all.iter().all(|i| i["status"]["phase"] == "Running");
        (ready && all_running).then(|| pids(up))
    })
}

/// The `tick-N` numbers of the ticker's log, in order.
fn ticks(up: &Up) -> Vec<u64> {
    let out = up.cli(&["logs", "ticker"]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick-")?.parse().ok())
        .collect()
}

#[test]
fn workloads_outlive_up_and_the_next_up_adopts_them() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let mut up = Up::start(&services(&go));
    let first = running(&up);
    assert_eq!(first.len(), 4, "{first:?}");
    let name = |prefix: &str| {
        first
            .keys()
            .find(|n| n.starts_with(prefix))
            .cloned()
            .unwrap()
    };
    let (ticker, later) = (name("ticker-"), name("later-"));

    // SIGTERM (a restart by systemd): up exits, every workload keeps running, the next up
    // adopts them.
    assert_eq!(up.terminate(), Some(0), "{}", up.up_logs());
    for (n, pid) in &first {
        assert!(alive(*pid), "{n} (pid {pid}) died with up");
    }
    up.spawn();
    assert_eq!(running(&up), first, "pids after SIGTERM and a new up");
    wait_for("four Adopted events", T, || {
        (events_with(&up, "Adopted").len() == 4).then_some(())
    });

    // kill -9 (a crash): the same, and meanwhile `later` exits 7 and the ticker keeps writing.
    up.kill9();
    let log = up.data_dir().join("logs").join(&ticker).join("output.log");
    let size = std::fs::metadata(&log).unwrap().len();
    std::fs::write(&go, "").unwrap();
    let exit = up.data_dir().join("run").join(&later).join("exit.json");
    wait_for("`later` to exit while no agent runs", T, || {
        exit.exists().then_some(())
    });
    wait_for("the ticker to write while no agent runs", T, || {
        (std::fs::metadata(&log).map_or(0, |m| m.len()) > size + 200).then_some(())
    });
    up.spawn();
    let reported = wait_for("`later`'s exit reported", T, || {
        let i = up.api_get(&format!("/api/v1/instances/{later}"));
        (i["status"]["phase"] == "Failed").then_some(i)
    });
    assert_eq!(reported["status"]["lastExit"]["code"], 7, "{reported:#}");
    let exited = events_with(&up, "Exited");
    assert!(
        exited.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("exited with code 7 while no agent ran"))),
        "{exited:#?}"
    );
    let now = pids(&up);
    for (n, pid) in &first {
        if n != &later {
            assert_eq!(now.get(n), Some(pid), "{n} was not re-adopted: {now:?}");
        }
    }
    assert!(
        up.through_gateway("web.test", "/")
            .is_some_and(|r| r.status == 200)
    );

    // Nothing the ticker wrote was lost: every tick from the first to the last, once.
    let t = ticks(&up);
    assert!(t.len() > 20, "{} ticks", t.len());
    let expected: Vec<u64> = (1..=*t.last().unwrap()).collect();
    assert_eq!(t, expected, "ticks missing or repeated");

    // The adopted ticker is supervised: killed now, it is seen ending and restarted.
    let pid = first[&ticker];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restarted = wait_for("the ticker restarted", T, || {
        let i = up.api_get(&format!("/api/v1/instances/{ticker}"));
        (i["status"]["restarts"] == 1 && i["status"]["phase"] == "Running").then_some(i)
    });
    assert_eq!(
        restarted["status"]["lastExit"]["signal"], 9,
        "{restarted:#}"
    );

    // `flotilla down` (Ctrl-C to `up`) stops everything, shims included.
    let last = pids(&up);
    let down = up.cli(&["down"]);
    assert!(down.status.success(), "{down:?}");
    assert!(String::from_utf8_lossy(&down.stdout).contains("flotilla up stopped"));
    assert_eq!(up.stop(), Some(0), "{}", up.up_logs());
    for (n, pid) in &last {
        assert!(!alive(*pid), "{n} (pid {pid}) survives Ctrl-C");
    }
    assert!(
        shims_under(up.dir.path()).is_empty(),
        "shims survive Ctrl-C"
    );
}

/// An instance deleted while no agent ran is stopped by the next one, not adopted.
#[test]
fn a_workload_whose_instance_is_gone_is_stopped_not_adopted() {
    let mut up = Up::start(&demo_service("web", 1, ""));
    let inst = up.wait_ready("web", 1).remove(0);
    let pid = inst["status"]["pid"].as_u64().unwrap();
    up.kill9();
    assert!(alive(pid));
    // The next up runs under another node name: the store's instance is not this node's.
    up.node = format!("{}-other", up.node);
    up.spawn();
    wait_for("the old process stopped", T, || (!alive(pid)).then_some(()));
    let node = up.node.clone();
    let replacement = wait_for("a ready replacement on the new node", T, || {
        up.ready_instances("web")
            .into_iter()
            .find(|i| i["spec"]["node"] == node.as_str())
    });
    assert_ne!(replacement["status"]["pid"].as_u64(), Some(pid));
}

/// What `/proc/<pid>/fd` of `pid` links to.
fn descriptors(pid: u64) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn shims_and_workloads_hold_nothing_up_inherited() {
    // A descriptor without close-on-exec, as a shell or a CI runner leaves them: `up` gets it.
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let inode = nix::sys::stat::fstat(&write_end).unwrap().st_ino;
    let pipe = format!("pipe:[{inode}]");
    let mut up = Up::start(&demo_service("web", 1, ""));
    drop(write_end);
    let pid = up.wait_ready("web", 1)[0]["status"]["pid"]
        .as_u64()
        .unwrap();
    let shim = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap();
    let up_pid = u64::from(up.child.as_ref().unwrap().id());
    assert!(
        descriptors(up_pid).contains(&pipe),
        "the test's pipe did not reach up: the test proves nothing"
    );
    for (who, p) in [("the workload", pid), ("its shim", shim)] {
        let fds = descriptors(p);
        assert!(!fds.is_empty(), "{who} ({p}) has no descriptors to read");
        assert!(
            !fds.contains(&pipe),
            "{who} holds up's inherited {pipe}: {fds:?}"
        );
    }
    up.stop();
    drop(read_end);
}
