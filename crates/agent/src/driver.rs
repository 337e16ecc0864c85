//! The driver seam: how a worker runs a workload, behind a trait, so the worker's logic does
//! not depend on it being a process. [`ProcessDriver`] runs a process in its own process group
//! (today's only driver); a container driver, or one that re-adopts workloads that outlived
//! their agent, is another implementation, not a rewrite of the worker.

use std::io;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;

use crate::process::{self, LaunchSpec};

/// A started workload.
#[async_trait]
pub trait Running: Send {
    /// Its process (and process group) id.
    fn pid(&self) -> u32;
    /// Waits for it to end. Cancel-safe: a worker selects on it beside probes and stop requests.
    async fn wait(&mut self) -> io::Result<ExitStatus>;
}

/// Runs workloads.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Starts `launch` in its own process group, its stdout and stderr on `output`.
    fn spawn(&self, launch: &LaunchSpec, output: OwnedFd) -> io::Result<Box<dyn Running>>;
    /// Signals every member of the group; a vanished group is not an error.
    fn signal_group(&self, pgid: u32, signal: Signal);
    /// Live members of the group.
    fn group_members(&self, pgid: u32) -> Vec<u32>;
    /// SIGKILLs the group until it is empty, within `timeout`; false if members are left.
    async fn kill_group_until_empty(&self, pgid: u32, timeout: Duration) -> bool;
    /// Takes over a workload started by an earlier agent (by its pid). The process driver
    /// cannot yet: its children die with their agent.
    fn adopt(&self, pid: u32) -> io::Result<Box<dyn Running>> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("cannot adopt process {pid}: this driver does not re-adopt workloads"),
        ))
    }
}

/// Processes in their own process group, placed in their cgroup before `exec`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessDriver;

struct Child(tokio::process::Child, u32);

#[async_trait]
impl Running for Child {
    fn pid(&self) -> u32 {
        self.1
    }
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.0.wait().await
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    fn spawn(&self, launch: &LaunchSpec, output: OwnedFd) -> io::Result<Box<dyn Running>> {
        let child = process::spawn(launch, output)?;
        let pid = child.id().unwrap_or(0);
        Ok(Box::new(Child(child, pid)))
    }
    fn signal_group(&self, pgid: u32, signal: Signal) {
        process::signal_group(pgid, signal);
    }
    fn group_members(&self, pgid: u32) -> Vec<u32> {
        process::group_members(pgid)
    }
    async fn kill_group_until_empty(&self, pgid: u32, timeout: Duration) -> bool {
        process::kill_group_until_empty(pgid, timeout).await
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
        fn spawn(&self, launch: &LaunchSpec, _output: OwnedFd) -> io::Result<Box<dyn Running>> {
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
