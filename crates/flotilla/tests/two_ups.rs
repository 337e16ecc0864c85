//! Two `flotilla up` on one machine. Addresses are never shared with another process: a second
//! `up` or `flotilla gateway` on a gateway address in use refuses to start, naming the address
//! and the process that holds it, and the first one keeps all the traffic. Each `up` has its own
//! context file (one per data directory): the CLI finds the one of `--data-dir`, the only one
//! running, or lists them; no `up` removes another's.
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// Runs `cmd` to its end (bounded), returning its exit code and stderr.
fn run_to_end(cmd: &mut Command) -> (Option<i32>, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(
        "it to refuse the address (still running: it shares it instead)",
        Duration::from_secs(20),
        || child.try_wait().unwrap(),
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

#[test]
fn a_gateway_address_in_use_is_refused_not_shared() {
    let up = Up::start(&demo_service("web", 1, ""));
    up.wait_ready("web", 1);
    let pid = up.child.as_ref().unwrap().id();
    let other = tempfile::tempdir().unwrap();
    std::fs::write(
        other.path().join("flotilla.toml"),
        format!(
            "[up]\napi = \"127.0.0.1:0\"\ngateway = \"{}\"\nmetrics = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n{}",
            up.gateway,
            demo_service("web", 1, "")
        ),
    )
    .unwrap();
    let (code, err) = run_to_end(
        Command::new(flotilla_bin())
            .args(["up", "-f"])
            .arg(other.path().join("flotilla.toml"))
            .env("FLOTILLA_CONFIG_DIR", other.path().join("config"))
            .env("PATH", path_with_demo()),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&up.gateway), "names the address: {err}");
    assert!(
        err.contains(&format!("pid {pid} (flotilla)")),
        "names the process: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let (code, err) = run_to_end(
        Command::new(flotilla_bin())
            .args(["gateway", "--listen", &up.gateway, "--api", &up.api])
            .env("FLOTILLA_TOKEN", &up.token)
            .env("FLOTILLA_CONFIG_DIR", other.path().join("config")),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&up.gateway), "names the address: {err}");
    assert!(
        err.contains(&format!("pid {pid} ")),
        "names the process: {err}"
    );

    // The first `up` kept every request.
    for _ in 0..20 {
        let r = up.through_gateway("web.test", "/").expect("an answer");
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

/// A second `up` writing its context into `config`: its own data directory and addresses.
fn second_up(dir: &std::path::Path, config: &std::path::Path) -> Child {
    std::fs::write(
        dir.join("flotilla.toml"),
        format!(
            "[up]\napi = \"127.0.0.1:0\"\ngateway = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n{}",
            demo_service("other", 1, "")
        ),
    )
    .unwrap();
    Command::new(flotilla_bin())
        .args(["up", "-f"])
        .arg(dir.join("flotilla.toml"))
        .env("FLOTILLA_CONFIG_DIR", config)
        .env("PATH", path_with_demo())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn contexts(config: &std::path::Path) -> usize {
    std::fs::read_dir(config.join("contexts"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn each_up_has_its_own_context_and_the_cli_finds_the_right_one() {
    let up = Up::start(&demo_service("web", 1, ""));
    up.wait_ready("web", 1);
    let other = tempfile::tempdir().unwrap();
    let mut second = second_up(other.path(), &up.config_dir());
    wait_for("the second up's context", Duration::from_secs(30), || {
        (contexts(&up.config_dir()) == 2).then_some(())
    });
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    // Two running, nothing says which: the CLI lists both and asks.
    let o = up.cli(&["get", "services"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let said = text(&o);
    assert!(said.contains("2 flotilla processes are running"), "{said}");
    let first_dir = up.data_dir().canonicalize().unwrap();
    let second_dir = other.path().join("data").canonicalize().unwrap();
    for dir in [&first_dir, &second_dir] {
        assert!(
            said.contains(&format!("--data-dir {}", dir.display())),
            "{said}"
        );
    }

    // --data-dir (or FLOTILLA_DATA_DIR) picks one.
    let first_dir_s = first_dir.display().to_string();
    let o = up.cli(&["--data-dir", &first_dir_s, "get", "services"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("web") && !text(&o).contains("other"));
    let o = Command::new(flotilla_bin())
        .args(["get", "services"])
        .env("FLOTILLA_CONFIG_DIR", up.config_dir())
        .env("FLOTILLA_DATA_DIR", &second_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("other") && !text(&o).contains("web"));

    // The second stops (Ctrl-C): its context goes, the first's stays, and the CLI finds the
    // first.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    wait_for("the second up to stop", Duration::from_secs(30), || {
        second.try_wait().unwrap()
    });
    assert_eq!(contexts(&up.config_dir()), 1, "one context left");
    let o = up.cli(&["get", "services"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("web"), "{}", text(&o));
}
