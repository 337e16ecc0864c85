//! Starting processes and signalling them: the only place with `pre_exec`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid};

/// Everything needed to start one process of an instance (also what the agent sends a shim).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LaunchSpec {
    pub program: String,
    pub args: Vec<String>,
    /// Added to the agent's own environment.
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// RLIMIT_NOFILE (soft and hard).
    pub open_files: Option<u64>,
    /// `cgroup.procs` files the child joins before exec.
    pub cgroup_procs: Vec<PathBuf>,
}

/// Resolves a user given by name or number.
pub fn resolve_user(spec: &str) -> Result<(Uid, Gid), String> {
    if let Ok(n) = spec.parse::<u32>() {
        let uid = Uid::from_raw(n);
        let gid = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map_or(Gid::from_raw(n), |u| u.gid);
        return Ok((uid, gid));
    }
    match nix::unistd::User::from_name(spec) {
        Ok(Some(u)) => Ok((u.uid, u.gid)),
        Ok(None) => Err(format!("user {spec:?} does not exist")),
        Err(e) => Err(format!("cannot look up user {spec:?}: {e}")),
    }
}

/// Resolves a group given by name or number.
pub fn resolve_group(spec: &str) -> Result<Gid, String> {
    if let Ok(n) = spec.parse::<u32>() {
        return Ok(Gid::from_raw(n));
    }
    match nix::unistd::Group::from_name(spec) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(format!("group {spec:?} does not exist")),
        Err(e) => Err(format!("cannot look up group {spec:?}: {e}")),
    }
}

/// A pipe for the child's stdout and stderr: (read end, write end for the child), both
/// close-on-exec (the child gets its copies as stdout and stderr).
pub fn output_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// The command for `spec`, stdin on /dev/null (the caller sets stdout and stderr), in its own
/// process group.
///
/// In the child, between fork and exec (async-signal-safe calls only, nothing allocates):
/// join the cgroups, set RLIMIT_NOFILE, drop to the configured group/user, then arm
/// `PR_SET_PDEATHSIG(SIGKILL)` (after the credential change, which would clear it) and check
/// the parent did not die in the meantime: the process never outlives whoever started it
/// (the agent for exec probes and direct children, the instance's shim for a workload).
pub fn command(spec: &LaunchSpec) -> std::io::Result<std::process::Command> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(&spec.env)
        .stdin(std::process::Stdio::null())
        .process_group(0);
    if let Some(w) = &spec.workdir {
        cmd.current_dir(w);
    }
    let procs: Vec<CString> = spec
        .cgroup_procs
        .iter()
        .map(|p| CString::new(p.as_os_str().as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let open_files = spec.open_files;
    let (uid, gid) = (spec.uid.map(Uid::from_raw), spec.gid.map(Gid::from_raw));
    let parent = nix::unistd::getpid();
    // SAFETY: the closure only makes async-signal-safe system calls (open, write, close,
    // setrlimit, setgroups, setgid, setuid, prctl, getppid) on data prepared before fork;
    // it does not allocate or take locks. The one `unsafe` of the workspace: `pre_exec` is the
    // only way to set up the child between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            use nix::fcntl::{OFlag, open};
            use nix::sys::stat::Mode;
            for p in &procs {
                let fd = open(
                    p.as_c_str(),
                    OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?;
                nix::unistd::write(&fd, b"0")?;
            }
            if let Some(n) = open_files {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)?;
            }
            if let Some(g) = gid {
                nix::unistd::setgroups(&[g])?;
                nix::unistd::setgid(g)?;
            }
            if let Some(u) = uid {
                nix::unistd::setuid(u)?;
            }
            // Only stdin, stdout and stderr reach the workload: whatever else its starter
            // held open without close-on-exec (a descriptor `flotilla up` inherited from its
            // shell, say) is closed by the exec. Kernels before 5.11 do not know the flag;
            // there the descriptors stay as before.
            nix::libc::syscall(
                nix::libc::SYS_close_range,
                3u32,
                u32::MAX,
                nix::libc::CLOSE_RANGE_CLOEXEC,
            );
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// [`command`] for the agent's own children (exec probes, the direct driver): SIGKILLed if
/// the `Child` is dropped before it was waited for (a worker that panics or is aborted leaves
/// no process running unsupervised).
pub fn tokio_command(spec: &LaunchSpec) -> std::io::Result<tokio::process::Command> {
    let mut cmd = tokio::process::Command::from(command(spec)?);
    cmd.kill_on_drop(true);
    Ok(cmd)
}

/// The start time of a process (clock ticks after boot, field 22 of `/proc/<pid>/stat`):
/// with the pid, what tells a process from a later one that reused its pid.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 (starttime) of a `/proc/<pid>/stat` line.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is a live (not zombie) process that started at `start`.
pub fn alive_since(pid: u32, start: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    parse_stat(&stat).is_some_and(|(state, _)| state != 'Z' && state != 'X')
        && parse_start_time(&stat) == Some(start)
}

/// Parses a stop signal name as validation accepts it (`SIGTERM`, `TERM`, `sigterm`; see
/// [`flotilla_spec::STOP_SIGNALS`]), or a number.
pub fn parse_signal(name: &str) -> Option<Signal> {
    if let Ok(n) = name.trim().parse::<i32>() {
        return Signal::try_from(n).ok();
    }
    flotilla_spec::normalize_signal_name(name)?.parse().ok()
}

/// Signals a process group; a vanished group is not an error.
pub fn signal_group(pgid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pgid) {
        let _ = killpg(Pid::from_raw(p), sig);
    }
}

/// SIGKILLs a process group until no live member is left, bounded by `timeout`. Returns true
/// when the group ended up empty.
pub async fn kill_group_until_empty(pgid: u32, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while pgid != 0 && !group_members(pgid).is_empty() {
        signal_group(pgid, Signal::SIGKILL);
        if std::time::Instant::now() >= deadline {
            tracing::warn!(pgid, "process group survives SIGKILL");
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    true
}

/// Live (non-zombie) processes whose process group is `pgid`, from `/proc`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((state, pgrp)) = parse_stat(&stat)
            && pgrp == pgid
            && state != 'Z'
            && state != 'X'
        {
            out.push(pid);
        }
    }
    out
}

/// (state, pgrp) from a `/proc/<pid>/stat` line (the comm field may contain anything).
pub fn parse_stat(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let _ppid = it.next()?;
    let pgrp = it.next()?.parse().ok()?;
    Some((state, pgrp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("SIGTERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("term"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("HUP"), Some(Signal::SIGHUP));
        assert_eq!(parse_signal("2"), Some(Signal::SIGINT));
        assert_eq!(parse_signal("NOPE"), None);
    }

    #[test]
    fn stat_parsing() {
        assert_eq!(parse_stat("123 (a b) c) S 1 456 456 0"), Some(('S', 456)));
        assert_eq!(parse_stat("garbage"), None);
        let line = "7 (x) y) S 1 7 7 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_start_time(line), Some(98765));
        let me = std::process::id();
        let start = start_time(me).unwrap();
        assert!(alive_since(me, start));
        assert!(!alive_since(me, start + 1));
    }

    #[test]
    fn users() {
        assert_eq!(resolve_user("root").unwrap().0, Uid::from_raw(0));
        assert_eq!(resolve_user("0").unwrap().1, Gid::from_raw(0));
        assert!(resolve_user("no-such-user-flotilla").is_err());
        assert_eq!(resolve_group("12345").unwrap(), Gid::from_raw(12345));
    }

    #[test]
    fn spawn_in_own_group_with_output_pipe() {
        use std::io::Read;
        let (r, w) = output_pipe().unwrap();
        let spec = LaunchSpec {
            program: "sh".into(),
            args: vec![
                "-c".into(),
                "echo out; echo err >&2; echo \"$X $(ulimit -n)\"".into(),
            ],
            env: BTreeMap::from([("X".to_string(), "hello".to_string())]),
            workdir: Some(std::env::temp_dir()),
            uid: None,
            gid: None,
            open_files: Some(123),
            cgroup_procs: vec![],
        };
        let mut cmd = command(&spec).unwrap();
        cmd.stdout(w.try_clone().unwrap()).stderr(w);
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        let pid = child.id();
        let st = child.wait().unwrap();
        assert!(st.success());
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(out, "out\nerr\nhello 123\n");
        assert!(group_members(pid).is_empty());
    }
}
