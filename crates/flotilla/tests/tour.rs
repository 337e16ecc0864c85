//! The README's tour, run as a new user would: `flotilla up` on the hello example, then every
//! command of the README's tour block, in order, read from README.md itself, so the README can
//! only show what this test runs. Each command's exit code, headers and a row's cells are
//! checked, and nothing may print `panicked`.
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// The lines of README.md between `<!-- NAME -->` and `<!-- /NAME -->`, fences dropped.
fn readme_block(name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let start = format!("<!-- {name} -->");
    let end = format!("<!-- /{name} -->");
    let from = text
        .find(&start)
        .unwrap_or_else(|| panic!("README has no {start}"));
    let to = text[from..]
        .find(&end)
        .unwrap_or_else(|| panic!("README has no {end}"));
    text[from + start.len()..from + to]
        .lines()
        .filter(|l| !l.starts_with("```") && !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// A `flotilla up` of examples/hello, on ports the kernel picks and a data directory of its own.
struct Tour {
    dir: tempfile::TempDir,
    up: Option<Child>,
    gateway: String,
    log: PathBuf,
}

impl Tour {
    fn start() -> Tour {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Tour {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("up.log");
        let out = std::fs::File::create(&log).expect("log");
        let up = Command::new(flotilla_bin())
            .args(["up", "-f", "examples/hello/flotilla.toml"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--api-listen", "127.0.0.1:0"])
            .args(["--gateway-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .current_dir(repo_root())
            .env("FLOTILLA_CONFIG_DIR", dir.path().join("config"))
            .env("PATH", path_with_demo())
            .env_remove("FLOTILLA_API")
            .env_remove("FLOTILLA_TOKEN")
            .env_remove("FLOTILLA_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn flotilla up");
        let mut tour = Tour {
            dir,
            up: Some(up),
            gateway: String::new(),
            log,
        };
        let ctx: Value = wait_for("flotilla up to write its context", T, || {
            read_context(&tour.dir.path().join("config"))
        });
        tour.gateway = ctx["gateway"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("http://")
            .to_string();
        tour
    }

    fn command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(flotilla_bin());
        cmd.args(args)
            .current_dir(repo_root())
            .env("FLOTILLA_CONFIG_DIR", self.dir.path().join("config"))
            .env("NO_COLOR", "1")
            .env_remove("FLOTILLA_API")
            .env_remove("FLOTILLA_TOKEN")
            .env_remove("FLOTILLA_DATA_DIR")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[String]) -> Output {
        self.command(args).output().expect("run flotilla")
    }

    /// Runs a command that follows (`-f`) until a line contains `needle`, then ends it as Ctrl-C
    /// would. Returns what it printed.
    fn follow_until(&self, args: &[String], needle: &str) -> String {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut seen = String::new();
        let deadline = std::time::Instant::now() + T;
        let found = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                    if line.contains(needle) {
                        break true;
                    }
                }
                Err(_) => break false,
            }
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = child.wait();
        let _ = reader.join();
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        assert!(
            found,
            "`flotilla {}` never printed {needle:?}; it printed:\n{seen}\nstderr:\n{stderr}",
            args.join(" ")
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        seen
    }

    fn up_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tour {
    fn drop(&mut self) {
        if let Some(mut up) = self.up.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(up.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = wait_for("flotilla up to exit", T, || up.try_wait().ok().flatten());
        }
    }
}

/// Splits a README command line into words (single quotes group), without its comment.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            '#' if !quoted && cur.is_empty() => break,
            ' ' if !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn cells(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

fn table(stdout: &str) -> (Vec<&str>, Vec<Vec<&str>>) {
    let mut lines = stdout.lines();
    let header = cells(lines.next().unwrap_or_default());
    (header, lines.map(cells).collect())
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn the_readme_tour_works_as_written() {
    let tour = Tour::start();

    // `up` printed what the README shows, line for line (values differ).
    let up_lines = readme_block("up-output");
    let log = wait_for("up's start-up lines", T, || {
        let log = tour.up_log();
        log.contains("Ctrl-C stops every workload").then_some(log)
    });
    for want in up_lines.iter().skip(1) {
        let key: String = want
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let key = if want.starts_with("  ") {
            want.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        } else {
            key
        };
        assert!(
            log.lines().any(|l| l.trim_start().starts_with(&key)),
            "README shows `{want}`, up printed:\n{log}"
        );
    }
    assert!(
        log.contains("file      examples/hello/flotilla.toml: applied hello"),
        "{log}"
    );

    let ready = wait_for("3 ready instances of hello", T, || {
        let o = tour.run(&["get".into(), "instances".into(), "-o".into(), "json".into()]);
        let v: Value = serde_json::from_slice(&o.stdout).ok()?;
        let items = v["items"].as_array()?.clone();
        (items.len() == 3 && items.iter().all(|i| i["status"]["ready"] == true)).then_some(items)
    });
    let instance = ready[0]["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();

    let readme_output = readme_block("tour-output");
    let lines = readme_block("tour");
    assert!(
        lines.len() >= 15,
        "the README's tour is too short: {lines:?}"
    );
    let mut ran = Vec::new();
    for line in &lines {
        let mut args = words(line);
        let program = args.remove(0);
        for a in &mut args {
            if a.starts_with("hello-") {
                *a = instance.clone();
            }
            if a.contains("127.0.0.1:8080") {
                *a = a.replace("127.0.0.1:8080", &tour.gateway);
            }
        }
        let cmd = args.join(" ");
        ran.push(cmd.clone());
        if program == "curl" {
            let o = Command::new("curl")
                .args(["-sS", "--max-time", "10"])
                .args(&args)
                .output()
                .expect("curl");
            let (out, err) = text(&o);
            assert!(o.status.success(), "curl failed: {err}");
            assert!(out.starts_with("hello"), "curl: {out}");
            continue;
        }
        assert_eq!(program, "flotilla", "README tour line: {line}");
        if args.iter().any(|a| a == "-f") && matches!(args[0].as_str(), "logs" | "events") {
            let needle = if args[0] == "logs" {
                "[hello-"
            } else {
                "Applied"
            };
            let seen = tour.follow_until(&args, needle);
            if args[0] == "events" {
                let (header, _) = table(&seen);
                assert_eq!(
                    header,
                    ["TIME", "TYPE", "REASON", "OBJECT", "MESSAGE"],
                    "{seen}"
                );
            }
            continue;
        }
        let o = tour.run(&args);
        let (out, err) = text(&o);
        let code = o.status.code();
        assert!(
            !out.contains("panicked") && !err.contains("panicked"),
            "`flotilla {cmd}` panicked:\n{out}{err}"
        );
        let want_code = if cmd == "rollout status hello --no-watch" {
            4
        } else {
            0
        };
        assert_eq!(
            code,
            Some(want_code),
            "`flotilla {cmd}` exited {code:?}:\nstdout:\n{out}\nstderr:\n{err}"
        );
        check(&cmd, &out, &readme_output, &instance);
    }
    // Every command the README names was run (a renamed command cannot slip out of the tour).
    for needed in [
        "get services",
        "get instances",
        "describe service hello",
        "logs hello -f",
        "events -f",
        "apply -f",
        "rollout status hello",
        "rollout history hello",
        "rollout undo hello",
        "rollout pause hello",
        "rollout resume hello",
        "restart hello",
        "delete service hello",
        "version",
    ] {
        assert!(
            ran.iter().any(|c| c.starts_with(needed)),
            "the tour did not run `{needed}`: {ran:?}"
        );
    }

    // Normal deploys: no probe failure an alert would see (start-up checks are counted apart).
    let ctx: Value = read_context(&tour.dir.path().join("config")).expect("context");
    let metrics = ctx["metrics"].as_str().expect("metrics URL").to_string();
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "10", &metrics])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("flotilla_instances"), "{text}");
    for line in text
        .lines()
        .filter(|l| l.starts_with("flotilla_probe_failures_total{"))
    {
        assert!(
            line.ends_with(" 0"),
            "a normal deploy counted as probe failures: {line}"
        );
    }

    // After the delete, nothing of hello is left.
    wait_for("hello's instances to be gone", T, || {
        let o = tour.run(&["get".into(), "instances".into(), "-o".into(), "json".into()]);
        let v: Value = serde_json::from_slice(&o.stdout).ok()?;
        v["items"].as_array()?.is_empty().then_some(())
    });
}

/// What one command of the tour must print.
fn check(cmd: &str, out: &str, readme_output: &[String], instance: &str) {
    let readme_table = |header: &str| -> Vec<String> {
        readme_output
            .iter()
            .skip_while(|l| !l.starts_with(header))
            .take(2)
            .cloned()
            .collect()
    };
    match cmd {
        "get services" => {
            let (header, rows) = table(out);
            let readme = readme_table("NAME    READY");
            assert_eq!(header, cells(&readme[0]), "README's header differs:\n{out}");
            assert_eq!(
                header,
                [
                    "NAME",
                    "READY",
                    "INSTANCES",
                    "REVISION",
                    "ROLLOUT",
                    "ROUTES",
                    "AGE"
                ]
            );
            assert_eq!(rows.len(), 1, "{out}");
            assert_eq!(
                &rows[0][..6],
                ["hello", "3/3", "3", "1", "Complete", "hello.localhost/"]
            );
            assert_eq!(cells(&readme[1])[..6], rows[0][..6], "README's row differs");
        }
        "get instances" => {
            let (header, rows) = table(out);
            let readme = readme_table("NAME          SERVICE");
            assert_eq!(header, cells(&readme[0]), "README's header differs:\n{out}");
            assert_eq!(header.len(), 10);
            assert_eq!(rows.len(), 3, "{out}");
            for row in &rows {
                assert_eq!(row.len(), 10, "{out}");
                assert_eq!(&row[1..5], ["hello", "Running", "yes", "0"], "{out}");
                assert!(row[5].parse::<u32>().is_ok(), "pid: {out}");
                assert!(row[6].starts_with("http:"), "ports: {out}");
            }
        }
        "get nodes" => {
            let (header, rows) = table(out);
            assert_eq!(
                header,
                [
                    "NAME",
                    "STATUS",
                    "CPU",
                    "MEMORY",
                    "INSTANCES",
                    "LABELS",
                    "AGE",
                    "HEARTBEAT"
                ]
            );
            assert_eq!(rows.len(), 1, "{out}");
            assert_eq!(rows[0][..2], ["local", "Ready"], "{out}");
            assert_eq!(rows[0][4], "3", "instances on the node: {out}");
        }
        "describe node local" => {
            assert!(out.contains("Status:        Ready"), "{out}");
            assert!(out.contains("Capacity:      cpu "), "{out}");
            assert!(out.contains("flotilla.dev/os=linux"), "{out}");
            assert!(out.contains("hello-"), "its instances: {out}");
        }
        "get instances -o wide" => {
            let (header, rows) = table(out);
            assert_eq!(header.len(), 12, "{out}");
            assert_eq!(header[10..], ["NODE", "HOST"], "{out}");
            assert_eq!(rows.len(), 3, "{out}");
            assert!(
                rows.iter()
                    .all(|r| r[10] == "local" && r[11] == "127.0.0.1"),
                "{out}"
            );
            assert!(!out.contains('…'), "wide cuts nothing short: {out}");
        }
        "get instances -o json" => {
            let v: Value = serde_json::from_str(out).expect("JSON");
            assert_eq!(v["items"].as_array().map(Vec::len), Some(3), "{out}");
        }
        "describe service hello" => {
            assert!(out.contains("Name:          hello"), "{out}");
            assert!(out.contains("Replicas:      3 desired, 3 ready"), "{out}");
            assert!(out.contains("Rollout:       Complete"), "{out}");
            assert!(out.contains("Revision:      1 (last good 1)"), "{out}");
            assert!(out.contains("\nEvents:\n"), "{out}");
        }
        c if c.starts_with("logs hello --instance") => {
            assert!(out.lines().count() <= 20, "{out}");
            assert!(out.contains("listening"), "{out}");
            assert!(out.contains(instance), "{out}");
        }
        c if c.starts_with("apply -f") => {
            assert_eq!(out.trim(), "service/hello unchanged");
        }
        "restart hello" => assert_eq!(out.trim(), "service/hello restarting"),
        "rollout status hello" => {
            let last = out.lines().last().unwrap_or_default();
            assert!(last.contains("Complete"), "{out}");
            assert!(
                !out.lines()
                    .next()
                    .unwrap_or_default()
                    .starts_with("revision 1 Complete")
                    || last.starts_with("revision 1 "),
                "showed an earlier revision's result first:\n{out}"
            );
        }
        "rollout history hello" => {
            let (header, rows) = table(out);
            assert_eq!(header, ["REVISION", "AGE", "CAUSE", "CHANGED"]);
            assert_eq!(rows.len(), 2, "{out}");
            assert_eq!(rows[0][0], "1");
            assert_eq!(rows[0][2..4], ["up", "-f"], "{out}");
            assert_eq!(rows[1][0], "2*");
            assert_eq!(rows[1][2], "restart", "{out}");
        }
        c if c.starts_with("rollout undo hello") => {
            assert!(out.starts_with("service/hello rolling back"), "{out}");
        }
        "rollout pause hello" => assert_eq!(out.trim(), "service/hello paused"),
        "rollout status hello --no-watch" => assert!(out.contains("Paused"), "{out}"),
        "rollout resume hello" => assert_eq!(out.trim(), "service/hello resumed"),
        "delete service hello" => assert_eq!(out.trim(), "service/hello deleted"),
        "version" => {
            let version = env!("CARGO_PKG_VERSION");
            assert!(
                out.contains(&format!("flotilla {version} (client)")),
                "{out}"
            );
            assert!(
                out.contains(&format!("flotilla {version} (server)")),
                "{out}"
            );
        }
        other => panic!("the tour test does not know what `flotilla {other}` should print"),
    }
}

/// Errors a new user makes, each with its exit code and a message that helps.
#[test]
fn mistakes_get_clear_errors_and_exit_codes() {
    let tour = Tour::start();
    wait_for("hello to exist", T, || {
        let o = tour.run(&["get".into(), "services".into(), "hello".into()]);
        o.status.success().then_some(())
    });
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["get", "services", "helo"],
            1,
            "service helo not found (did you mean hello?)",
        ),
        (
            &["describe", "service", "nope"],
            1,
            "service nope not found (services: hello)",
        ),
        (&["rollout", "status", "nope", "--no-watch"], 1, "not found"),
        (
            &["rollout", "undo", "hello", "--to-revision", "9"],
            1,
            "revision 9 of service hello not found",
        ),
        (
            &["logs", "hello", "--instance", "hello-zzzzz"],
            1,
            "instance hello-zzzzz of service hello not found",
        ),
        (&["get", "pods"], 2, "invalid value 'pods'"),
        (
            &["describe", "node", "nope"],
            1,
            "node nope not found (nodes: local)",
        ),
        (&["frobnicate"], 2, "unrecognized subcommand"),
    ];
    // A bad listen address is refused before anything is created.
    let nowhere = tour.dir.path().join("never-created");
    let o = tour.run(&[
        "up".into(),
        "--api-listen".into(),
        "localhost:1".into(),
        "--data-dir".into(),
        nowhere.display().to_string(),
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("invalid API address \"localhost:1\": expected IP:PORT"),
        "{err}"
    );
    assert!(
        !nowhere.exists(),
        "the data directory was created for a bad address"
    );

    // Help says what each command takes, and only that: `up` lists no client flags.
    let help =
        |args: &[&str]| text(&tour.run(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())).0;
    let up_help = help(&["up", "--help"]);
    assert!(up_help.contains("--api-listen"), "{up_help}");
    assert!(
        !up_help.contains("--api ") && !up_help.contains("--token"),
        "up lists the client's flags: {up_help}"
    );
    assert!(up_help.contains("overrides the file"), "{up_help}");
    for cmd in [&["get", "--help"][..], &["rollout", "status", "--help"]] {
        let h = help(cmd);
        assert!(
            h.contains("--api <API>") && h.contains("--token <TOKEN>"),
            "{h}"
        );
    }
    let logs_help = help(&["logs", "--help"]);
    assert!(logs_help.contains("per instance"), "{logs_help}");
    assert!(logs_help.contains("--reconnect-for"), "{logs_help}");
    assert!(help(&["events", "--help"]).contains("--reconnect-for"));

    for (args, code, needle) in cases {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let o = tour.run(&args);
        let (out, err) = text(&o);
        assert_eq!(
            o.status.code(),
            Some(*code),
            "`flotilla {}`:\nstdout:\n{out}\nstderr:\n{err}",
            args.join(" ")
        );
        assert!(
            err.contains(needle),
            "`flotilla {}` said:\n{err}",
            args.join(" ")
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Logs are for machines too: `--log-format json` gives one JSON object a line, one key per
/// field (no second `message`), and text logs into a file carry no colour codes.
#[test]
fn logs_are_clean_json_and_uncoloured_text() {
    // Only whole lines: `up` may be in the middle of writing the last one.
    let check = |tour: &Tour, needle: &str| -> String {
        wait_for("up's log to show the rollout", T, || {
            let mut log = tour.up_log();
            log.truncate(log.rfind('\n').map_or(0, |end| end + 1));
            log.contains(needle).then_some(log)
        })
    };
    let tour = Tour::start_with(&["--log-format", "json"]);
    let log = check(&tour, "RolloutComplete");
    let mut lines = 0;
    for line in log.lines().filter(|l| l.starts_with('{')) {
        lines += 1;
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        // serde_json keeps the last of duplicate keys; count them in the text instead.
        for key in ["\"message\":", "\"detail\":", "\"error\":"] {
            let in_fields = line.matches(key).count();
            assert!(in_fields <= 1, "{key} appears {in_fields} times: {line}");
        }
        assert!(
            !line.contains("\"None\"") && !line.contains("Some("),
            "Rust debug values: {line}"
        );
        assert!(value["fields"]["message"].is_string(), "{line}");
    }
    assert!(lines > 5, "too few JSON lines:\n{log}");
    drop(tour);

    let tour = Tour::start();
    let log = check(&tour, "RolloutComplete");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
}

/// `events -f` and `logs -f` survive a restart of `up` (which listens on a new port: they find
/// it again through the context file): events resume after the last one shown, with none
/// repeated; logs go on with the instances started by the new `up`. When `up` stays away they
/// give up after `--reconnect-for` with an error and exit 1.
#[test]
fn events_and_logs_follow_across_a_restart_of_up() {
    let mut up = Up::start(&ticker_service("2s"));
    wait_for("the ticker to run", T, || {
        up.instances("ticker")
            .iter()
            .any(|i| i["status"]["phase"] == "Running")
            .then_some(())
    });
    let first_instance = name_of(&up.instances("ticker")[0]);
    let mut events = Follower::start(&up, &["events", "-f", "--reconnect-for", "5s"]);
    let mut logs = Follower::start(&up, &["logs", "ticker", "-f", "--reconnect-for", "5s"]);
    events.until("the service's first event", T, |l| {
        l.contains("service/ticker")
    });
    logs.until("a tick", T, |l| l.contains("tick-"));

    up.stop();
    up.spawn();
    for f in [&events, &logs] {
        wait_for("the follower to reconnect", T, || {
            f.stderr_text().contains("reconnected").then_some(())
        });
    }
    let out = up.cli(&["restart", "ticker"]);
    assert!(out.status.success(), "{out:?}");
    // A deploy in progress (the new instance must stay ready 2 s): the exit codes a script
    // relies on.
    let code = |args: &[&str]| up.cli(args).status.code();
    assert_eq!(
        code(&["rollout", "status", "ticker", "--no-watch"]),
        Some(3)
    );
    assert_eq!(
        code(&["rollout", "status", "ticker", "--timeout", "200ms"]),
        Some(5)
    );
    assert_eq!(code(&["rollout", "status", "ticker"]), Some(0));
    events.until("the restart's event after the restart of up", T, |l| {
        l.contains("RestartRequested")
    });
    let mut rows: Vec<&String> = events
        .seen
        .iter()
        .filter(|l| !l.starts_with("TIME"))
        .collect();
    let all = rows.len();
    rows.sort();
    rows.dedup();
    assert_eq!(
        rows.len(),
        all,
        "an event was shown twice: {:#?}",
        events.seen
    );
    assert!(
        events.stderr_text().contains("reconnected"),
        "{}",
        events.stderr_text()
    );
    // The deploy replaced the instance: the follow says who joined and who left, and goes on
    // with the new one from its first line.
    let joined = logs.until("a joined line", T, |l| l.ends_with(" joined"));
    let new = joined
        .trim_start_matches("--- ")
        .trim_end_matches(" joined")
        .to_string();
    assert_ne!(new, first_instance);
    logs.until("the old instance leaving", T, |l| {
        l == format!("--- {first_instance} left")
    });
    logs.until("a tick of the new instance", T, |l| {
        l.starts_with(&format!("[{new}] tick-"))
    });

    // `up` stays away: both give up with an error.
    up.stop();
    for f in [&mut events, &mut logs] {
        assert_eq!(f.exit_code(T), Some(1), "{}", f.stderr_text());
        let err = f.stderr_text();
        assert!(err.contains("did not come back within 5s"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
