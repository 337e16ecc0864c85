//! `flotilla bench overhead`: what processes cost their machine (resident memory, CPU, uptime),
//! sampled from `/proc` at an interval for a duration and written as CSV, so a team compares
//! flotilla's overhead with what it replaces (a kubelet, a k3s server) on its own machines.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What one `/proc/<pid>/stat` line says that the sampler needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// The kernel's name for the process (at most 15 bytes).
    pub comm: String,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// When the process started, in clock ticks after boot.
    pub start_ticks: u64,
    /// Resident pages.
    pub rss_pages: u64,
}

/// Parses a `/proc/<pid>/stat` line; the name (in parentheses) may hold any byte, so the
/// fields are counted from its last `)`.
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_string();
    // Fields after the name, numbered from 3 (state) as in proc(5).
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { rest.get(n - 3)?.parse().ok() };
    Some(ProcStat {
        comm,
        cpu_ticks: field(14)?.checked_add(field(15)?)?,
        start_ticks: field(22)?,
        rss_pages: field(24)?,
    })
}

/// Which processes to sample: by pid, or by name (the kernel's `comm`, or the file name of
/// the first word of the command line, so names longer than 15 bytes match too).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub names: Vec<String>,
    pub pids: Vec<u32>,
}

impl Selection {
    fn matches(&self, pid: u32, comm: &str) -> Option<String> {
        if self.pids.contains(&pid) {
            return Some(comm.to_string());
        }
        if self.names.iter().any(|n| n == comm) {
            return Some(comm.to_string());
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let first = cmdline.split(|b| *b == 0).next()?;
        let base = String::from_utf8_lossy(first.rsplit(|b| *b == b'/').next()?).into_owned();
        self.names.contains(&base).then_some(base)
    }
}

/// One sample of one process.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at: Duration,
    pub name: String,
    pub pid: u32,
    pub rss_kib: u64,
    /// Over the interval since the previous sample of this pid (empty for the first).
    pub cpu_percent: Option<f64>,
    pub cpu_seconds: f64,
    pub uptime_seconds: f64,
}

/// The machine's constants the samples are computed with.
struct Clock {
    ticks_per_second: f64,
    page_kib: u64,
}

impl Clock {
    fn of_this_machine() -> Result<Self> {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .context("reading the clock tick rate")?
            .filter(|t| *t > 0)
            .ok_or_else(|| anyhow::anyhow!("the system reports no clock tick rate"))?;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .context("reading the page size")?
            .filter(|p| *p > 0)
            .ok_or_else(|| anyhow::anyhow!("the system reports no page size"))?;
        Ok(Clock {
            ticks_per_second: ticks as f64,
            page_kib: (page as u64 / 1024).max(1),
        })
    }
}

fn boot_uptime() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/uptime").context("reading /proc/uptime")?;
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/uptime: unexpected content {text:?}"))
}

/// Every process `selection` names, as they are now: (pid, name, stat).
fn snapshot(selection: &Selection) -> Vec<(u32, String, ProcStat)> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    let me = std::process::id();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // The sampler is a flotilla too: not what is measured.
        if pid == me {
            continue;
        }
        // A process may end between the listing and the read: skip it.
        let Ok(line) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(stat) = parse_stat(&line) else {
            continue;
        };
        if let Some(name) = selection.matches(pid, &stat.comm) {
            found.push((pid, name, stat));
        }
    }
    found.sort_by_key(|(pid, _, _)| *pid);
    found
}

/// Samples `selection` every `interval` for `duration`, writing one CSV row per process and
/// sample to `out`; returns every sample (for the summary).
pub async fn sample(
    selection: &Selection,
    interval: Duration,
    duration: Duration,
    out: &mut dyn Write,
) -> Result<Vec<Sample>> {
    if interval < Duration::from_millis(100) {
        bail!("invalid --interval: at least 100ms");
    }
    if duration < interval {
        bail!("invalid --duration: at least one --interval");
    }
    let clock = Clock::of_this_machine()?;
    writeln!(
        out,
        "seconds,name,pid,rss_kib,cpu_percent,cpu_seconds,uptime_seconds"
    )?;
    let started = Instant::now();
    let mut previous: BTreeMap<u32, (u64, Instant)> = BTreeMap::new();
    let mut samples = Vec::new();
    let rounds = (duration.as_millis() / interval.as_millis()).max(1) as u64 + 1;
    for round in 0..rounds {
        let now = Instant::now();
        let uptime = boot_uptime()?;
        for (pid, name, stat) in snapshot(selection) {
            let cpu_percent = previous.get(&pid).map(|(ticks, then)| {
                let spent = stat.cpu_ticks.saturating_sub(*ticks) as f64 / clock.ticks_per_second;
                let wall = now.duration_since(*then).as_secs_f64();
                if wall > 0.0 {
                    100.0 * spent / wall
                } else {
                    0.0
                }
            });
            previous.insert(pid, (stat.cpu_ticks, now));
            let s = Sample {
                at: now.duration_since(started),
                name,
                pid,
                rss_kib: stat.rss_pages * clock.page_kib,
                cpu_percent,
                cpu_seconds: stat.cpu_ticks as f64 / clock.ticks_per_second,
                uptime_seconds: (uptime - stat.start_ticks as f64 / clock.ticks_per_second)
                    .max(0.0),
            };
            writeln!(
                out,
                "{:.3},{},{},{},{},{:.2},{:.1}",
                s.at.as_secs_f64(),
                csv_field(&s.name),
                s.pid,
                s.rss_kib,
                s.cpu_percent.map(|c| format!("{c:.2}")).unwrap_or_default(),
                s.cpu_seconds,
                s.uptime_seconds
            )?;
            samples.push(s);
        }
        out.flush()?;
        if round + 1 < rounds {
            let next = started + interval * (round as u32 + 1);
            tokio::time::sleep_until(next.into()).await;
        }
    }
    Ok(samples)
}

/// A name as one CSV field: quoted when it holds a comma, a quote or a line break.
fn csv_field(name: &str) -> String {
    if name.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", name.replace('"', "\"\""))
    } else {
        name.to_string()
    }
}

/// Per name: processes seen, median and peak RSS, mean CPU.
pub fn summary(samples: &[Sample]) -> String {
    let mut by_name: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        by_name.entry(&s.name).or_default().push(s);
    }
    let mut text = String::from("NAME  PROCESSES  RSS MEDIAN  RSS MAX  CPU MEAN\n");
    for (name, list) in by_name {
        let mut rss: Vec<u64> = list.iter().map(|s| s.rss_kib).collect();
        rss.sort_unstable();
        let median = rss[rss.len() / 2];
        let max = rss.last().copied().unwrap_or_default();
        let cpus: Vec<f64> = list.iter().filter_map(|s| s.cpu_percent).collect();
        let cpu = if cpus.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2} %", cpus.iter().sum::<f64>() / cpus.len() as f64)
        };
        let pids: std::collections::BTreeSet<u32> = list.iter().map(|s| s.pid).collect();
        text.push_str(&format!(
            "{name}  {}  {:.1} MiB  {:.1} MiB  {cpu}\n",
            pids.len(),
            median as f64 / 1024.0,
            max as f64 / 1024.0
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_whatever_the_name_holds() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1000 0 0 0 150 50 0 0 20 0 \
                    4 0 123456 20000000 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 \
                    0 0 0 0 0";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                comm: "my (odd) name".into(),
                cpu_ticks: 200,
                start_ticks: 123456,
                rss_pages: 2560,
            }
        );
        assert_eq!(parse_stat("4242 (short) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn names_with_commas_are_quoted() {
        assert_eq!(csv_field("kubelet"), "kubelet");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("a\"b"), "\"a\"\"b\"");
    }
}
