//! The driver seam: how a worker runs a workload, behind a trait, so the worker's logic does
//! not depend on it being a process. [`ShimDriver`] runs each workload under a shim of its own
//! (see [`crate::shim`]) so that it outlives its agent and is re-adopted by the next one;
//! [`ProcessDriver`] runs it as the agent's direct child, which dies with its agent (for
//! embedding the agent in a binary that cannot run shims, and for tests). A container driver
//! is another implementation, not a rewrite of the worker.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use crate::logs::{LineSink, LogWriter};
use crate::process::{self, LaunchSpec};
use crate::shim::{self, Found};

/// How long the output pump may take to drain after the process is gone.
const PUMP_DRAIN: Duration = Duration::from_secs(2);

/// A started workload.
#[async_trait]
pub trait Running: Send {
    /// Its process (and process group) id.
    fn pid(&self) -> u32;
    /// Waits for its process to end (what it left in its group may live on; the worker stops
    /// it). Cancel-safe: a worker selects on it beside probes and stop requests.
    async fn wait(&mut self) -> io::Result<ExitStatus>;
}

/// Where a workload's output goes, and which instance it is.
#[derive(Debug, Clone)]
pub struct Output {
    pub instance: String,
    /// The instance object's uid.
    pub uid: String,
    pub log_dir: PathBuf,
    pub log_max_bytes: u64,
    pub log_max_files: u32,
    /// The instance's run directory (the shim's state and exit record).
    pub run_dir: PathBuf,
    /// The cgroup's OOM kill count before the start.
    pub oom_before: u64,
    /// The instance's grace period.
    pub grace: Duration,
}

/// Runs workloads.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Starts `launch` in its own process group, its stdout and stderr into the log.
    async fn spawn(&self, launch: &LaunchSpec, output: &Output) -> io::Result<Box<dyn Running>>;
    /// Signals every member of the group; a vanished group is not an error.
    fn signal_group(&self, pgid: u32, signal: Signal) {
        process::signal_group(pgid, signal);
    }
    /// Live members of the group.
    fn group_members(&self, pgid: u32) -> Vec<u32> {
        process::group_members(pgid)
    }
    /// SIGKILLs the group until it is empty, within `timeout`; false if members are left.
    async fn kill_group_until_empty(&self, pgid: u32, timeout: Duration) -> bool {
        process::kill_group_until_empty(pgid, timeout).await
    }
    /// Whether a workload outlives its agent (and the agent may leave it running).
    fn survives_agent(&self) -> bool {
        false
    }
    /// Takes over a workload an earlier agent started, as [`crate::shim::scan`] found it.
    fn adopt(&self, found: Found, run_dir: PathBuf) -> io::Result<Box<dyn Running>> {
        let _ = (found, run_dir);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this driver does not re-adopt workloads",
        ))
    }
}

/// Each workload under its own shim, started from `program` (the agent's binary).
#[derive(Debug, Clone)]
pub struct ShimDriver {
    pub program: PathBuf,
}

#[async_trait]
impl Driver for ShimDriver {
    async fn spawn(&self, launch: &LaunchSpec, output: &Output) -> io::Result<Box<dyn Running>> {
        let spec = shim::ShimSpec {
            instance: output.instance.clone(),
            uid: output.uid.clone(),
            launch: launch.clone(),
            oom_before: output.oom_before,
            grace_ms: u64::try_from(output.grace.as_millis()).unwrap_or(u64::MAX),
            log_dir: output.log_dir.clone(),
            log_max_bytes: output.log_max_bytes,
            log_max_files: output.log_max_files,
            run_dir: output.run_dir.clone(),
        };
        Ok(Box::new(shim::spawn(&self.program, &spec).await?))
    }
    fn survives_agent(&self) -> bool {
        true
    }
    fn adopt(&self, found: Found, run_dir: PathBuf) -> io::Result<Box<dyn Running>> {
        found.into_running(run_dir)
    }
}

/// Processes as the agent's own children, in their own process group, placed in their cgroup
/// before `exec`; they die with the agent (`PR_SET_PDEATHSIG`).
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessDriver;

struct Child {
    child: tokio::process::Child,
    pid: u32,
    pump: Option<tokio::task::JoinHandle<()>>,
    cancel: CancellationToken,
}

impl Drop for Child {
    fn drop(&mut self) {
        // The pump ends at end-of-file (the worker kills what is left of the group), or is
        // cancelled a moment later.
        if let Some(pump) = self.pump.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let cancel = self.cancel.clone();
            runtime.spawn(async move {
                let mut pump = pump;
                if tokio::time::timeout(PUMP_DRAIN, &mut pump).await.is_err() {
                    cancel.cancel();
                    let _ = pump.await;
                }
            });
        }
    }
}

#[async_trait]
impl Running for Child {
    fn pid(&self) -> u32 {
        self.pid
    }
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await?;
        // Its last words are in the log before its end is reported; what it left in its
        // group may write on (the pump runs until end-of-file, at most `PUMP_DRAIN` after
        // this handle is dropped).
        if let Some(pump) = &mut self.pump
            && tokio::time::timeout(crate::shim::FIRST_DRAIN, &mut *pump)
                .await
                .is_ok()
        {
            self.pump = None;
        }
        Ok(status)
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    async fn spawn(&self, launch: &LaunchSpec, output: &Output) -> io::Result<Box<dyn Running>> {
        let writer = LogWriter::open(&output.log_dir, output.log_max_bytes, output.log_max_files)
            .map_err(io::Error::other)?;
        let (r, w) = process::output_pipe()?;
        let mut cmd = process::tokio_command(launch)?;
        cmd.stdout(w.try_clone()?).stderr(w);
        let child = cmd.spawn()?;
        drop(cmd);
        let pid = child.id().unwrap_or(0);
        let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(r)?;
        let cancel = CancellationToken::new();
        let pump = tokio::spawn(crate::logs::pump(
            rx,
            LineSink::new(writer, output.instance.clone()),
            cancel.clone(),
        ));
        Ok(Box::new(Child {
            child,
            pid,
            pump: Some(pump),
            cancel,
        }))
    }
}

/// A driver for unit tests of the worker: records every call, and its workloads end when the
/// test says so (or at once with a given status).
#[cfg(test)]
pub(crate) mod fake {
    use std::os::unix::process::ExitStatusExt;
    use std::sync::{Arc, Mutex};

    use tokio::sync::watch;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Call {
        Spawn(String),
        Signal(u32, Signal),
        Kill(u32),
    }

    /// A fake workload's pid and the sender of its end.
    type End = (u32, watch::Sender<Option<i32>>);

    #[derive(Clone)]
    pub(crate) struct RecordingDriver {
        pub calls: Arc<Mutex<Vec<Call>>>,
        /// Raw wait statuses the next spawns end with, in order; when empty, a spawned
        /// workload runs until it is signalled.
        pub exits: Arc<Mutex<Vec<i32>>>,
        next_pid: Arc<Mutex<u32>>,
        /// pid → its end (a raw wait status), set by a signal or an exit.
        ends: Arc<Mutex<Vec<End>>>,
    }

    impl RecordingDriver {
        pub(crate) fn new(exits: Vec<i32>) -> Self {
            Self {
                calls: Arc::default(),
                exits: Arc::new(Mutex::new(exits)),
                next_pid: Arc::new(Mutex::new(4_000_000)),
                ends: Arc::default(),
            }
        }
        pub(crate) fn calls(&self) -> Vec<Call> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }
        fn record(&self, call: Call) {
            if let Ok(mut c) = self.calls.lock() {
                c.push(call);
            }
        }
    }

    struct FakeRunning {
        pid: u32,
        end: watch::Receiver<Option<i32>>,
    }

    #[async_trait]
    impl Running for FakeRunning {
        fn pid(&self) -> u32 {
            self.pid
        }
        async fn wait(&mut self) -> io::Result<ExitStatus> {
            loop {
                if let Some(raw) = *self.end.borrow_and_update() {
                    return Ok(ExitStatus::from_raw(raw));
                }
                if self.end.changed().await.is_err() {
                    return Err(io::Error::other("fake workload dropped"));
                }
            }
        }
    }

    #[async_trait]
    impl Driver for RecordingDriver {
        async fn spawn(
            &self,
            launch: &LaunchSpec,
            _output: &Output,
        ) -> io::Result<Box<dyn Running>> {
            self.record(Call::Spawn(launch.program.clone()));
            let pid = {
                let mut p = self
                    .next_pid
                    .lock()
                    .map_err(|_| io::Error::other("poisoned"))?;
                *p += 1;
                *p
            };
            let exit = self.exits.lock().ok().and_then(|mut e| {
                if e.is_empty() {
                    None
                } else {
                    Some(e.remove(0))
                }
            });
            let (tx, rx) = watch::channel(exit);
            if let Ok(mut ends) = self.ends.lock() {
                ends.push((pid, tx));
            }
            Ok(Box::new(FakeRunning { pid, end: rx }))
        }
        fn signal_group(&self, pgid: u32, signal: Signal) {
            self.record(Call::Signal(pgid, signal));
            if let Ok(ends) = self.ends.lock()
                && let Some((_, tx)) = ends.iter().find(|(p, _)| *p == pgid)
            {
                tx.send_if_modified(|e| {
                    if e.is_none() {
                        *e = Some(signal as i32);
                        true
                    } else {
                        false
                    }
                });
            }
        }
        fn group_members(&self, _pgid: u32) -> Vec<u32> {
            Vec::new()
        }
        async fn kill_group_until_empty(&self, pgid: u32, _timeout: Duration) -> bool {
            self.record(Call::Kill(pgid));
            true
        }
    }
}
