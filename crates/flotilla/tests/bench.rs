//! `flotilla bench overhead` on real processes: a sleeping one and a busy one.
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};

use common::flotilla_bin;

/// Kills its process when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(program: &str, args: &[&str]) -> Running {
    Running(
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}")),
    )
}

#[derive(Debug)]
struct Row {
    name: String,
    pid: u32,
    rss_kib: u64,
    cpu_percent: Option<f64>,
    uptime: f64,
}

fn rows(csv: &str) -> Vec<Row> {
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("seconds,name,pid,rss_kib,cpu_percent,cpu_seconds,uptime_seconds"),
        "{csv}"
    );
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 7, "{l}");
            Row {
                name: f[1].to_string(),
                pid: f[2].parse().unwrap(),
                rss_kib: f[3].parse().unwrap(),
                cpu_percent: (!f[4].is_empty()).then(|| f[4].parse().unwrap()),
                uptime: f[6].parse().unwrap(),
            }
        })
        .collect()
}

fn mean_cpu(rows: &[&Row]) -> f64 {
    let cpus: Vec<f64> = rows.iter().filter_map(|r| r.cpu_percent).collect();
    assert!(!cpus.is_empty(), "no CPU figure in {rows:?}");
    cpus.iter().sum::<f64>() / cpus.len() as f64
}

/// Each process gets a row per sample with its memory and uptime, and from the second sample
/// its CPU over the interval: the busy loop's shows, the sleeper's does not.
#[test]
fn overhead_samples_processes_as_csv() {
    let sleeper = spawn("sleep", &["60"]);
    let busy = spawn("sh", &["-c", "while :; do :; done"]);
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("overhead.csv");
    let (sleep_pid, busy_pid) = (sleeper.0.id().to_string(), busy.0.id().to_string());
    let out = Command::new(flotilla_bin())
        .args(["bench", "overhead", "--pid", &sleep_pid, "--pid", &busy_pid])
        .args(["--interval", "200ms", "--duration", "1s", "-o"])
        .arg(&csv)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = std::fs::read_to_string(&csv).unwrap();
    let all = rows(&text);
    let of = |pid: u32| -> Vec<&Row> { all.iter().filter(|r| r.pid == pid).collect() };
    let (sleeping, spinning) = (of(sleeper.0.id()), of(busy.0.id()));
    assert_eq!(sleeping.len(), 6, "{text}");
    assert_eq!(spinning.len(), 6, "{text}");
    assert!(sleeping.iter().all(|r| r.name == "sleep"), "{text}");
    assert!(spinning.iter().all(|r| r.name == "sh"), "{text}");
    assert!(all.iter().all(|r| r.rss_kib > 0), "{text}");
    assert!(sleeping[0].cpu_percent.is_none() && sleeping[1].cpu_percent.is_some());
    assert!(sleeping[5].uptime >= sleeping[0].uptime + 0.5, "{text}");
    let (idle, spin) = (mean_cpu(&sleeping), mean_cpu(&spinning));
    assert!(
        idle < 5.0,
        "a sleeping process used {idle:.1} % CPU:\n{text}"
    );
    assert!(spin > 20.0, "a busy loop used {spin:.1} % CPU:\n{text}");
    assert!(
        stderr.contains("NAME  PROCESSES  RSS MEDIAN  RSS MAX  CPU MEAN")
            && stderr.contains("sh  1  "),
        "{stderr}"
    );
}

/// By name, and nothing to sample or a too-short interval are errors, not an empty file.
#[test]
fn overhead_by_name_and_its_mistakes() {
    let _sleeper = spawn("sleep", &["60"]);
    let out = Command::new(flotilla_bin())
        .args(["bench", "overhead", "--process", "sleep"])
        .args(["--interval", "100ms", "--duration", "100ms"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(rows(&text).iter().any(|r| r.name == "sleep"), "{text}");

    let out = Command::new(flotilla_bin())
        .args(["bench", "overhead", "--process", "no-such-process-here"])
        .args(["--interval", "100ms", "--duration", "100ms"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no process matched (no-such-process-here)"),
        "{stderr}"
    );

    let out = Command::new(flotilla_bin())
        .args(["bench", "overhead", "--interval", "10ms"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--interval: at least 100ms"), "{stderr}");
}
