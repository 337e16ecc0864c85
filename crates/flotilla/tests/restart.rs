//! What a restart of `flotilla up` keeps and what it changes: deploys made through the API
//! survive it, edits of the file roll out, and a store from another run or another machine
//! converges.
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn greeting_service(greeting: &str) -> String {
    demo_service("web", 2, &format!("env = {{ GREETING = \"{greeting}\" }}"))
}

fn revision(up: &Up) -> u64 {
    up.api_get("/api/v1/services/web")["status"]["revision"]
        .as_u64()
        .unwrap_or(0)
}

fn greeting(up: &Up) -> String {
    up.api_get("/api/v1/services/web")["spec"]["env"]["GREETING"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Every ready instance answers with `greeting`, through the gateway.
fn wait_serving(up: &Up, greeting: &str) {
    wait_for(
        &format!("web to answer {greeting:?} from 2 instances"),
        T,
        || {
            let ready = up.ready_instances("web");
            let all = up.instances("web");
            let answers: Vec<String> = (0..6)
                .filter_map(|_| up.through_gateway("web.test", "/"))
                .filter(|r| r.status == 200)
                .map(|r| r.body)
                .collect();
            (ready.len() == 2
                && all.len() == 2
                && answers.len() == 6
                && answers.iter().all(|b| b.starts_with(greeting)))
            .then_some(())
        },
    );
}

/// `up`'s output once its start-up banner is whole (its last line printed): the banner's
/// `file` line is in it. (A log line may say "file" earlier.)
fn wait_banner(up: &Up) -> String {
    wait_for("up to print its start-up banner", T, || {
        let log = up.last_log();
        log.contains("Ctrl-C stops every workload").then_some(log)
    })
}

#[test]
fn a_restart_keeps_api_deploys_and_rolls_out_file_edits() {
    let mut up = Up::start(&greeting_service("from-file"));
    wait_serving(&up, "from-file");
    let log = wait_banner(&up);
    assert!(log.contains(": applied web"), "start-up output:\n{log}");

    // A deploy through the API, then a crash of `up`.
    let other = up.dir.path().join("other.toml");
    std::fs::write(&other, greeting_service("from-api")).expect("write");
    let out = up.cli(&["apply", "-f", other.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_serving(&up, "from-api");
    let api_revision = revision(&up);
    up.kill9();

    // The unchanged file is not re-applied: the API's revision stands.
    up.spawn();
    let log = wait_banner(&up);
    assert!(
        log.contains("unchanged since the last start, not re-applied"),
        "start-up output:\n{log}"
    );
    wait_serving(&up, "from-api");
    assert_eq!(greeting(&up), "from-api");
    assert_eq!(revision(&up), api_revision);

    // An edit of the file rolls out at the next start.
    up.write_file(&greeting_service("edited"));
    up.stop();
    up.spawn();
    let log = wait_banner(&up);
    assert!(log.contains(": applied web"), "start-up output:\n{log}");
    wait_serving(&up, "edited");
    assert!(revision(&up) > api_revision);
    let history = up.cli(&["rollout", "history", "web"]);
    assert!(history.status.success());
    let history = String::from_utf8_lossy(&history.stdout);
    assert!(history.contains("up -f"), "history:\n{history}");
    assert!(history.contains("apply"), "history:\n{history}");
}

/// A store whose instances are bound to another node (copied from another machine, or `up`
/// restarted under another `--node`) converges: the orphans are deleted, replacements run.
#[test]
fn instances_of_an_unknown_node_are_replaced() {
    let mut up = Up::start(&greeting_service("hi"));
    wait_serving(&up, "hi");
    let old: Vec<String> = up.instances("web").iter().map(name_of).collect();
    up.kill9();

    up.node = format!("{}-moved", up.node);
    up.spawn();
    wait_serving(&up, "hi");
    let now = up.instances("web");
    for i in &now {
        assert_eq!(i["spec"]["node"], Value::from(up.node.clone()));
        assert!(
            !old.contains(&name_of(i)),
            "orphan {} still listed",
            name_of(i)
        );
    }
    let events = up.api_get("/api/v1/events");
    let orphaned = events["items"]
        .as_array()
        .map(|items| items.iter().filter(|e| e["reason"] == "Orphaned").count())
        .unwrap_or(0);
    assert_eq!(orphaned, old.len(), "events: {events:#}");
}

/// `apply` sends services only; a file whose `[gateway]` table differs from the one `up`
/// started with is not silently "unchanged": the CLI says the settings need a restart of `up`,
/// and after that restart the same file's gateway is unchanged.
#[test]
fn apply_says_when_gateway_settings_need_a_restart_of_up() {
    let with_gateway = |access_log: bool| {
        format!(
            "[gateway]\naccess_log = {access_log}\n\n{}",
            demo_service("web", 1, "")
        )
    };
    let mut up = Up::start(&with_gateway(false));
    up.wait_ready("web", 1);
    let apply = |up: &Up, text: &str| {
        let path = up.dir.path().join("apply.toml");
        std::fs::write(&path, text).unwrap();
        let o = up.cli(&["apply", "-f", path.to_str().unwrap()]);
        assert!(o.status.success(), "{o:?}");
        (
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (out, err) = apply(&up, &with_gateway(false));
    assert!(out.contains("gateway unchanged"), "{out}{err}");
    assert!(out.contains("service/web unchanged"), "{out}{err}");

    let (out, err) = apply(&up, &with_gateway(true));
    assert!(
        err.contains("[gateway] table differs") && err.contains("restart `flotilla up"),
        "{out}{err}"
    );
    assert!(!out.contains("gateway unchanged"), "{out}");

    // Start-up reads it: after a restart with the new file, the same table is unchanged.
    up.write_file(&with_gateway(true));
    up.stop();
    up.spawn();
    let (out, err) = apply(&up, &with_gateway(true));
    assert!(out.contains("gateway unchanged"), "{out}{err}");
}
