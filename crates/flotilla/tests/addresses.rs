//! Addresses are never shared with another process: a second `flotilla up` or `flotilla
//! gateway` on a gateway address in use refuses to start, naming the address and the process
//! that holds it, and the first one keeps all the traffic.
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
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
