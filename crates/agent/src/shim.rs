//! What keeps a workload alive without its agent: one small process per running instance, the
//! *shim*, started by the agent as `flotilla-shim` (the agent's own binary, re-executed through
//! `/proc/self/exe`, so an upgrade in place changes nothing for the shims already running).
//!
//! The shim is the workload's parent. It starts it (the same pre-exec path as before: cgroup,
//! rlimits, identity, a death signal tied to the shim), holds the read end of its output pipe and
//! writes whole lines into the instance's log files, waits for it and records its exit status in
//! `<data_dir>/run/<instance>/exit`, then ends. The agent only signals the workload's process
//! group and watches the shim end (a pidfd), so an agent that is killed, crashes, restarts or is
//! replaced by a new binary leaves every workload running, writing its log, with its exit
//! status still captured; the next agent finds the shims in `<data_dir>/run` ([`scan`]) and
//! re-adopts them.
//!
//! The shim uses no async runtime, no logging and one thread: `poll(2)` on the output pipe
//! and a pidfd of the workload, `read(2)` and `write(2)` into the log as raw system calls. Its stdin, stdout (after the start-up answer) and stderr are `/dev/null`, so the
//! agent's pipes closing never reaches it.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::driver::Running;
use crate::logs::{LineSink, LogWriter};
use crate::process::{self, LaunchSpec};

/// What a binary passes as [`crate::AgentConfig::shim`]: itself, even once replaced on disk.
pub const SELF_EXE: &str = "/proc/self/exe";

/// `argv[0]` of a shim: how the binaries' `main` knows it is one (see [`main_if_shim`]).
pub const ARG0: &str = "flotilla-shim";

/// State file of a running shim, in its instance's run directory.
const STATE: &str = "state.json";
/// Exit record, written by the shim once its workload ended.
const EXIT: &str = "exit.json";

/// How long, beyond the grace period, the shim waits for the output pipe to reach end-of-file
/// after its workload exited: what the workload left in its group may still write until the
/// agent has stopped it.
const DRAIN_SLACK: Duration = Duration::from_secs(10);
/// How long the shim waits for end-of-file before it records the exit.
pub(crate) const FIRST_DRAIN: Duration = Duration::from_millis(200);
/// How long the agent waits for the exit record once the workload ended.
const RECORD_WAIT: Duration = Duration::from_secs(5);
/// How long the agent waits for a starting shim's answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// `<data_dir>/run/<instance>`: the shim's state and the workload's exit record.
pub fn run_dir(data_dir: &Path, instance: &str) -> PathBuf {
    data_dir.join("run").join(instance)
}

/// What the agent sends a shim on its stdin: the launch and where the output goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimSpec {
    pub instance: String,
    /// The instance object's uid: a later instance of the same name is not this one.
    pub uid: String,
    /// The workload.
    pub launch: LaunchSpec,
    /// The cgroup's OOM kill count at the start, kept in the state for the exit's judgement.
    pub oom_before: u64,
    /// The instance's grace period: how long its leftovers may write after it ended.
    pub grace_ms: u64,
    pub log_dir: PathBuf,
    pub log_max_bytes: u64,
    pub log_max_files: u32,
    pub run_dir: PathBuf,
}

/// A running shim and its workload, as the shim records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    pub instance: String,
    pub uid: String,
    pub shim_pid: u32,
    /// Start times (see [`process::start_time`]): a pid reused by another process is not ours.
    pub shim_start: u64,
    pub pid: u32,
    pub pid_start: u64,
    /// Wall clock of the workload's start, milliseconds since the epoch.
    pub started_unix_ms: u64,
    /// See [`ShimSpec::oom_before`].
    #[serde(default)]
    pub oom_before: u64,
}

/// How a workload ended, as its shim recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The workload this is the end of (a record of an earlier run is not this run's).
    #[serde(default)]
    pub pid: u32,
    /// The raw wait status (exit code or signal).
    pub status: i32,
    /// When, milliseconds since the epoch.
    pub at_unix_ms: u64,
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes `value` as JSON to `dir/name` atomically (a temporary file, then rename).
fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(name))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Runs the shim when this process was started as one (`argv[0]` is [`ARG0`]) and returns its
/// exit code; `None` otherwise. The binaries call it first thing in `main`.
pub fn main_if_shim() -> Option<i32> {
    let arg0 = std::env::args_os().next()?;
    if Path::new(&arg0).file_name()? != ARG0 {
        return None;
    }
    Some(shim_main())
}

fn shim_main() -> i32 {
    let _ = nix::sys::prctl::set_name(c"flotilla-shim");
    close_inherited_descriptors();
    let mut input = Vec::new();
    let mut answer = io::stdout().lock();
    let spec: ShimSpec = match io::stdin()
        .lock()
        .take(4 << 20)
        .read_to_end(&mut input)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_slice(&input).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(answer, "err {} bad shim input: {e}", nix::libc::EINVAL);
            return 2;
        }
    };
    drop(input);
    // No log, no start: output nobody can read is a failure to report, not to hide.
    let writer = match LogWriter::open(&spec.log_dir, spec.log_max_bytes, spec.log_max_files) {
        Ok(w) => w,
        Err(e) => {
            let _ = writeln!(answer, "err {} {e}", nix::libc::EIO);
            return 1;
        }
    };
    let started = match start(&spec) {
        Ok(s) => s,
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(nix::libc::EIO);
            let _ = writeln!(answer, "err {errno} {e}");
            return 1;
        }
    };
    let (mut child, output, state) = started;
    // The workload's end, as a descriptor the output loop polls beside the pipe.
    // Not `open_pidfd`: a workload that already exited is still our unreaped child, and its
    // pidfd is what tells the loop so.
    let exited = match i32::try_from(state.pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or(rustix::io::Errno::SRCH)
        .and_then(|pid| rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()))
    {
        Ok(fd) => fd,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let _ = writeln!(
                answer,
                "err {} cannot watch the workload: {e}",
                e.raw_os_error()
            );
            return 1;
        }
    };
    if let Err(e) = write_json(&spec.run_dir, STATE, &state) {
        let _ = child.kill();
        let _ = child.wait();
        let errno = e.raw_os_error().unwrap_or(nix::libc::EIO);
        let _ = writeln!(answer, "err {errno} cannot write the shim's state: {e}");
        return 1;
    }
    let _ = writeln!(answer, "ok {}", state.pid);
    let _ = answer.flush();
    drop(answer);
    // From here on nothing reaches the agent's pipes: it may be gone at any time.
    if let Ok(null) = std::fs::File::options().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(&null);
    }
    let mut out = Output {
        fd: Some(output),
        sink: LineSink::new(writer, spec.instance.clone()),
        buf: vec![0; 16 * 1024],
    };
    trim_start_up_pages();
    // One thread: poll(2) on the pipe and the pidfd, read(2) and write(2) into the log.
    while let Some(fd) = out.fd.as_ref() {
        let mut fds = [
            rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(&exited, rustix::event::PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            // Out of kernel memory, say: never stop reading (a full pipe would block the
            // workload), try again in a moment.
            Err(_) => {
                // No runtime here, and not a synchronization: a pause before trying again.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        let (output_ready, ended) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if output_ready {
            out.read_once();
        }
        if ended {
            break;
        }
    }
    let status = loop {
        match child.wait() {
            Ok(st) => break st.into_raw(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break -1,
        }
    };
    let at_unix_ms = unix_ms();
    // Its last words are in the log before its end is known (end-of-file at once, unless
    // something it left in its group holds the pipe).
    out.drain_for(FIRST_DRAIN);
    let record = ExitRecord {
        pid: state.pid,
        status,
        at_unix_ms,
    };
    let recorded = write_json(&spec.run_dir, EXIT, &record);
    // What the workload left in its group may write on until the agent stopped it (at once
    // after a crash, after the grace period on a stop).
    out.drain_for(Duration::from_millis(spec.grace_ms) + DRAIN_SLACK);
    out.sink.finish();
    match recorded {
        Ok(()) => 0,
        Err(_) => 3,
    }
}

/// A shim outlives its agent, and whatever the agent inherited without close-on-exec (a pipe
/// of the shell that started `flotilla up`, say) would stay open as long as its workload runs:
/// everything but stdin, stdout and stderr is closed before the shim opens anything.
fn close_inherited_descriptors() {
    // SAFETY: close_range(2) on descriptors this process has not opened and does not use;
    // std holds none at this point of `main`.
    #[allow(unsafe_code)]
    unsafe {
        nix::libc::syscall(nix::libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    }
}

/// The read end of the workload's output pipe and where its lines go.
struct Output {
    /// Until end-of-file (or an error reading): then closed, so a writer gets EPIPE rather
    /// than blocking on a pipe nobody reads.
    fd: Option<OwnedFd>,
    sink: LineSink,
    buf: Vec<u8>,
}

impl Output {
    /// One read(2): what it got goes to the log. End-of-file or an error closes the output,
    /// and a last line without its newline is written then, before any exit record.
    fn read_once(&mut self) {
        let Some(fd) = self.fd.as_ref() else { return };
        match rustix::io::read(fd, &mut self.buf) {
            Ok(0) => self.close(),
            Ok(n) => self.sink.feed(self.buf.get(..n).unwrap_or_default()),
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
            Err(_) => self.close(),
        }
    }

    fn close(&mut self) {
        self.fd = None;
        self.sink.finish();
    }

    /// Reads until end-of-file or until `limit` has passed.
    fn drain_for(&mut self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while let Some(fd) = self.fd.as_ref() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            let Ok(timeout) = rustix::time::Timespec::try_from(left) else {
                return;
            };
            let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => {}
                Ok(_) => self.read_once(),
                Err(_) => return,
            }
        }
    }
}

/// The clean, read-only pages of this binary that the start-up touched (argument parsing, JSON,
/// the spawn: megabytes, since the kernel maps file pages around each fault) leave this
/// process's resident set: what a shim keeps resident while it waits is what its loop uses
/// (tens of KiB of code) and its own heap and stack. Only mappings of our own executable that
/// are not writable and hold no private or anonymous page are dropped, so every page comes back
/// unchanged from the file on its next use.
fn trim_start_up_pages() {
    // The heap the start-up freed (the spec, JSON) goes back too.
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps; nothing
    // allocated is touched.
    #[cfg(target_env = "gnu")]
    #[allow(unsafe_code)]
    unsafe {
        nix::libc::malloc_trim(0);
    }
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    for (start, end) in clean_mappings_of(&smaps, &exe.to_string_lossy()) {
        let Some(len) = end.checked_sub(start) else {
            continue;
        };
        // SAFETY: [start, end) is a whole private mapping of our executable that is not
        // writable and has no private (copied-on-write) or anonymous page: MADV_DONTNEED only
        // removes its page-table entries, and the next access faults the same bytes in from
        // the file (which the kernel keeps from being written while it runs).
        #[allow(unsafe_code)]
        let _ = unsafe {
            rustix::mm::madvise(
                start as *mut std::ffi::c_void,
                len,
                rustix::mm::Advice::LinuxDontNeed,
            )
        };
    }
}

/// (start, end) of the mappings of `path` in a `/proc/<pid>/smaps` text that are not writable and
/// hold only clean file pages (`Private_Dirty` and `Anonymous` both 0 kB).
fn clean_mappings_of(smaps: &str, path: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    let mut dirty = false;
    let mut flush = |current: &mut Option<(usize, usize)>, dirty: bool| {
        if let Some(range) = current.take()
            && !dirty
        {
            out.push(range);
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            flush(&mut current, dirty);
            dirty = false;
            let perms = fields.next().unwrap_or("");
            let name = fields.nth(3).unwrap_or("");
            if name == path && perms.as_bytes().get(1) == Some(&b'-') {
                current = Some((a, b));
            }
            continue;
        }
        if first == "Private_Dirty:" || first == "Anonymous:" {
            dirty |= fields.next().is_some_and(|kb| kb != "0");
        }
    }
    flush(&mut current, dirty);
    out
}

/// Starts the workload with its output on a pipe; its state as the shim will record it.
fn start(spec: &ShimSpec) -> io::Result<(std::process::Child, OwnedFd, ShimState)> {
    std::fs::create_dir_all(&spec.run_dir)?;
    let (r, w) = process::output_pipe()?;
    let mut cmd = process::command(&spec.launch)?;
    cmd.stdout(w.try_clone()?).stderr(w);
    let child = cmd.spawn()?;
    drop(cmd);
    let pid = child.id();
    let me = std::process::id();
    let state = ShimState {
        instance: spec.instance.clone(),
        uid: spec.uid.clone(),
        shim_pid: me,
        shim_start: process::start_time(me).unwrap_or(0),
        pid,
        pid_start: process::start_time(pid).unwrap_or(0),
        started_unix_ms: unix_ms(),
        oom_before: spec.oom_before,
    };
    Ok((child, r, state))
}

/// Starts a shim for `spec` through `program` (the agent's binary) and waits for its answer:
/// the workload's pid, or why it could not start (the error the spawn itself met).
pub(crate) async fn spawn(program: &Path, spec: &ShimSpec) -> io::Result<ShimRun> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    std::fs::create_dir_all(&spec.run_dir)?;
    for stale in [EXIT, STATE] {
        match std::fs::remove_file(spec.run_dir.join(stale)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let mut cmd = tokio::process::Command::new(program);
    // `flotilla-shim <run dir>` in `ps`: which instance, and which agent's.
    cmd.arg0(ARG0)
        .arg(&spec.run_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        // Out of the agent's process group: a Ctrl-C in its terminal is not for the shim.
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn()?;
    let input = serde_json::to_vec(spec).map_err(io::Error::other)?;
    let answer = async {
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("shim without stdin"))?;
        stdin.write_all(&input).await?;
        drop(stdin);
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("shim without stdout"))?;
        let mut line = String::new();
        tokio::io::BufReader::new(stdout.take(64 * 1024))
            .read_line(&mut line)
            .await?;
        Ok::<_, io::Error>(line)
    };
    let line = match tokio::time::timeout(START_TIMEOUT, answer).await {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => {
            let _ = child.kill().await;
            return Err(e);
        }
        Err(_) => {
            let _ = child.kill().await;
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the shim did not answer within {START_TIMEOUT:?}"),
            ));
        }
    };
    match parse_answer(&line) {
        Ok(pid) => {
            let opened = read_json::<ShimState>(&spec.run_dir.join(STATE))
                .filter(|s| s.pid == pid)
                .ok_or_else(|| io::Error::other("the shim started without recording its state"))
                .and_then(|state| ShimRun::adopt(&state, spec.run_dir.clone()));
            match opened {
                Ok(mut run) => {
                    run._child = Some(child);
                    Ok(run)
                }
                Err(e) => {
                    // Unwatched, it must not run: the workload dies with its shim.
                    let _ = child.kill().await;
                    Err(e)
                }
            }
        }
        Err(e) => {
            let _ = child.wait().await;
            Err(e)
        }
    }
}

/// `ok <pid>` or `err <errno> <message>`.
fn parse_answer(line: &str) -> io::Result<u32> {
    let line = line.trim_end();
    if let Some(pid) = line.strip_prefix("ok ") {
        return pid
            .parse()
            .map_err(|_| io::Error::other(format!("the shim answered {line:?}")));
    }
    if let Some(rest) = line.strip_prefix("err ") {
        let (errno, message) = rest.split_once(' ').unwrap_or((rest, ""));
        return Err(match errno.parse::<i32>() {
            // The spawn's own error, as the worker reports it without a shim.
            Ok(n) if message.ends_with(&format!("(os error {n})")) => {
                io::Error::from_raw_os_error(n)
            }
            _ => io::Error::other(message.to_string()),
        });
    }
    if line.is_empty() {
        return Err(io::Error::other("the shim ended without answering"));
    }
    Err(io::Error::other(format!("the shim answered {line:?}")))
}

/// The exit status the shim in `run_dir` recorded for workload `pid`.
fn exit_status(run_dir: &Path, pid: u32) -> io::Result<ExitStatus> {
    read_json::<ExitRecord>(&run_dir.join(EXIT))
        .filter(|r| r.pid == pid)
        .map(|r| ExitStatus::from_raw(r.status))
        .ok_or_else(|| io::Error::other("the shim ended without recording the workload's exit"))
}

/// A pidfd of `pid` registered with the runtime: readable once the process ended. `None` when
/// `pid` is no longer the process that started at `start` (it ended already); an error when no
/// pidfd can be had (a kernel before 5.3, no descriptor left).
fn watch(pid: u32, start: u64) -> io::Result<Option<tokio::io::unix::AsyncFd<OwnedFd>>> {
    let Some(fd) = open_pidfd(pid, start)? else {
        return Ok(None);
    };
    // SAFETY: the registered fd is the `OwnedFd` the `AsyncFd` owns: it is closed only when
    // the `AsyncFd` drops it, after deregistering it.
    #[allow(unsafe_code)]
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    };
    registered.map(Some).map_err(|e| e.into_parts().1)
}

/// A workload under its shim, as the agent watches it: pidfds of both (whoever's child they
/// are), and the exit record the shim writes once it reaped the workload.
pub(crate) struct ShimRun {
    pid: u32,
    workload: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
    shim: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
    /// A shim this agent started: kept so that the runtime reaps it when it ends.
    _child: Option<tokio::process::Child>,
    run_dir: PathBuf,
}

impl ShimRun {
    /// Watches the shim and workload `state` describes (one an earlier agent started, until
    /// the caller gives it the child it started itself).
    fn adopt(state: &ShimState, run_dir: PathBuf) -> io::Result<Self> {
        Ok(Self {
            pid: state.pid,
            workload: watch(state.pid, state.pid_start)?,
            shim: watch(state.shim_pid, state.shim_start)?,
            _child: None,
            run_dir,
        })
    }
}

impl Drop for ShimRun {
    fn drop(&mut self) {
        // A shim adopted after this agent ran itself again (a reload) is its child although its
        // runtime never started it: reap it if it ended, or it stays a zombie.
        if self._child.is_none()
            && let Some(shim) = &self.shim
        {
            use std::os::fd::AsFd;
            let _ = rustix::process::waitid(
                rustix::process::WaitId::PidFd(shim.get_ref().as_fd()),
                rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG,
            );
        }
    }
}

#[async_trait]
impl Running for ShimRun {
    fn pid(&self) -> u32 {
        self.pid
    }
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(w) = &self.workload {
            let _ready = w.readable().await?;
        }
        // The shim writes the record right after reaping the workload.
        let deadline = tokio::time::Instant::now() + RECORD_WAIT;
        loop {
            if let Ok(status) = exit_status(&self.run_dir, self.pid) {
                return Ok(status);
            }
            let shim_gone = match &self.shim {
                Some(shim) => tokio::select! {
                    biased;
                    r = shim.readable() => { let _gone = r?; true }
                    () = tokio::time::sleep(Duration::from_millis(5)) => false,
                },
                None => true,
            };
            if shim_gone || tokio::time::Instant::now() >= deadline {
                return exit_status(&self.run_dir, self.pid);
            }
        }
    }
}

/// What an agent finds of an instance in `<data_dir>/run` at start-up.
#[derive(Debug)]
pub enum Found {
    /// Its shim still runs: the workload is re-adopted.
    Alive { state: ShimState },
    /// The workload ended while no agent ran; its shim recorded how.
    Exited {
        state: Option<ShimState>,
        exit: ExitRecord,
    },
    /// The shim is gone without a record (killed, or the machine rebooted).
    Lost { state: Option<ShimState> },
}

impl Found {
    /// The instance object's uid the shim was started for, when known.
    pub fn uid(&self) -> Option<&str> {
        match self {
            Found::Alive { state } => Some(&state.uid),
            Found::Exited { state, .. } | Found::Lost { state } => {
                state.as_ref().map(|s| s.uid.as_str())
            }
        }
    }

    /// A live workload, to be killed when nothing adopts it.
    pub fn live_pid(&self) -> Option<u32> {
        match self {
            Found::Alive { state } => Some(state.pid),
            Found::Lost { state: Some(s) } if process::alive_since(s.pid, s.pid_start) => {
                Some(s.pid)
            }
            _ => None,
        }
    }

    pub fn into_running(self, run_dir: PathBuf) -> io::Result<Box<dyn Running>> {
        match self {
            Found::Alive { state } => Ok(Box::new(ShimRun::adopt(&state, run_dir)?)),
            _ => Err(io::Error::other("the shim is not running")),
        }
    }
}

/// Forgets the run recorded in `run_dir` once its end was reported: a later agent must not
/// report it again.
pub fn forget_run(run_dir: &Path) {
    for file in [EXIT, STATE] {
        let _ = std::fs::remove_file(run_dir.join(file));
    }
}

/// The instances in `<data_dir>/run`, by name, and what is left of each.
pub fn scan(data_dir: &Path) -> BTreeMap<String, Found> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(data_dir.join("run")) else {
        return out;
    };
    for e in entries.flatten() {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let dir = e.path();
        let state: Option<ShimState> = read_json(&dir.join(STATE));
        // A record is the end of the run the state describes, not of an earlier one.
        let of_run = |e: &ExitRecord| state.as_ref().is_none_or(|s| s.pid == e.pid);
        let exit: Option<ExitRecord> = read_json(&dir.join(EXIT)).filter(of_run);
        let found = match (state, exit) {
            (state, Some(exit)) => Found::Exited { state, exit },
            (Some(state), None) if process::alive_since(state.shim_pid, state.shim_start) => {
                Found::Alive { state }
            }
            (Some(state), None) => {
                // It may have ended between the two reads.
                match read_json::<ExitRecord>(&dir.join(EXIT)).filter(|e| e.pid == state.pid) {
                    Some(exit) => Found::Exited {
                        state: Some(state),
                        exit,
                    },
                    None => Found::Lost { state: Some(state) },
                }
            }
            // Nothing ever ran there (a start that failed before its shim wrote anything).
            (None, None) => continue,
        };
        out.insert(name, found);
    }
    out
}

/// A pidfd of `pid` if it is still the process that started at `start` (`None`: it is gone).
fn open_pidfd(pid: u32, start: u64) -> io::Result<Option<OwnedFd>> {
    let Some(raw) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Ok(None);
    };
    let fd = match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::NONBLOCK) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Ok(None),
        Err(e) => return Err(io::Error::from(e)),
    };
    // Checked after opening: the fd refers to that process whatever happens to the pid later.
    Ok(process::alive_since(pid, start).then_some(fd))
}

/// Reads the first line of a file (for tests and diagnostics).
#[cfg(test)]
fn first_line(path: &Path) -> Option<String> {
    let f = std::fs::File::open(path).ok()?;
    io::BufRead::lines(io::BufReader::new(f)).next()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clean_read_only_mappings_of_the_executable_are_trimmed() {
        let smaps = "\
55d0-55e0 r--p 00000000 08:01 42 /usr/bin/flotilla
Rss:                  64 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
55e0-5600 r-xp 00010000 08:01 42 /usr/bin/flotilla
Private_Dirty:         0 kB
Anonymous:             0 kB
5600-5610 r--p 00030000 08:01 42 /usr/bin/flotilla
Private_Dirty:        12 kB
Anonymous:            12 kB
5610-5620 rw-p 00040000 08:01 42 /usr/bin/flotilla
Private_Dirty:         0 kB
Anonymous:             0 kB
7f00-7f10 r-xp 00000000 08:01 43 /usr/lib/other.so
Private_Dirty:         0 kB
Anonymous:             0 kB
7ff0-7ff8 rw-p 00000000 00:00 0 [stack]
Private_Dirty:         8 kB
";
        assert_eq!(
            clean_mappings_of(smaps, "/usr/bin/flotilla"),
            [(0x55d0, 0x55e0), (0x55e0, 0x5600)]
        );
    }

    #[test]
    fn answers() {
        assert_eq!(parse_answer("ok 42\n").unwrap(), 42);
        let e = parse_answer("err 2 No such file or directory (os error 2)\n").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(2));
        assert_eq!(e.to_string(), "No such file or directory (os error 2)");
        let e = parse_answer("err 22 bad shim input: EOF").unwrap_err();
        assert_eq!(e.to_string(), "bad shim input: EOF");
        assert!(
            parse_answer("")
                .unwrap_err()
                .to_string()
                .contains("without answering")
        );
        assert!(parse_answer("ok nope").is_err());
    }

    #[test]
    fn scan_tells_alive_exited_and_lost_apart() {
        let t = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let state = |name: &str, shim_start: u64| ShimState {
            instance: name.into(),
            uid: format!("uid-{name}"),
            shim_pid: me,
            shim_start,
            pid: me,
            pid_start: process::start_time(me).unwrap(),
            started_unix_ms: 1,
            oom_before: 0,
        };
        let start = process::start_time(me).unwrap();
        for (name, st, exit) in [
            ("alive", Some(state("alive", start)), None),
            ("reused", Some(state("reused", start + 1)), None),
            (
                "exited",
                Some(state("exited", start)),
                Some(ExitRecord {
                    pid: me,
                    status: 3 << 8,
                    at_unix_ms: 2,
                }),
            ),
            ("empty", None, None),
        ] {
            let dir = run_dir(t.path(), name);
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(st) = st {
                write_json(&dir, STATE, &st).unwrap();
            }
            if let Some(exit) = exit {
                write_json(&dir, EXIT, &exit).unwrap();
            }
        }
        let found = scan(t.path());
        assert!(matches!(found["alive"], Found::Alive { .. }));
        assert_eq!(found["alive"].uid(), Some("uid-alive"));
        // Same pid, other start time: another process took the pid.
        assert!(matches!(found["reused"], Found::Lost { .. }));
        assert!(matches!(&found["exited"], Found::Exited { exit, .. } if exit.status == 3 << 8));
        assert!(!found.contains_key("empty"), "nothing ran there");
        assert_eq!(
            first_line(&run_dir(t.path(), "alive").join(STATE)).map(|l| l.contains("uid-alive")),
            Some(true)
        );
    }
}
