//! One reconcile runtime for every control loop (the service controller today; the scheduler,
//! jobs and cron next): keys are triggered by watches and by a periodic resync, wait in a
//! deduplicated queue (so it is bounded by the number of distinct keys), and are never
//! reconciled twice at once — a key triggered while it runs is run once more afterwards.
//! `reconcile` answers done, or "again after"; a failure is retried with one [`Backoff`].
//!
//! The model is kube-rs's controller runner; a watch that ends is a [`crate::typed::Reflector`]'s
//! business (it relists after a backoff), and every relist triggers every key again.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::lock;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// Nothing until a trigger or the resync.
    Done,
    /// Look again after this long (time passing matters: a deadline, a stability window).
    After(Duration),
}

/// One control loop's logic.
#[async_trait]
pub trait Reconcile: Send + Sync + 'static {
    type Key: Clone + Eq + Hash + Debug + Send + Sync + 'static;
    type Error: std::error::Error + Send + 'static;
    /// Brings `key` to its desired state, reading what it needs fresh.
    async fn reconcile(&self, key: &Self::Key) -> Result<Requeue, Self::Error>;
    /// Every key that exists now, for the resync.
    async fn keys(&self) -> Result<Vec<Self::Key>, Self::Error>;
}

/// Exponential backoff: `initial`, doubling per consecutive failure, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 = the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial.saturating_mul(1u32 << doublings).min(self.max)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Every key is reconciled at least this often.
    pub resync: Duration,
    /// Keys reconciled at the same time (each key at most once).
    pub concurrency: usize,
    pub backoff: Backoff,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(10),
            concurrency: 4,
            backoff: Backoff::default(),
        }
    }
}

/// The queue's state: deduplicated and bounded by the number of distinct keys.
struct Queue<K> {
    ready: VecDeque<K>,
    queued: HashSet<K>,
    running: HashSet<K>,
    /// Triggered while running: run again when it finishes.
    dirty: HashSet<K>,
    /// Not before: key → when, and when → keys.
    delayed: HashMap<K, Instant>,
    due: BTreeMap<Instant, Vec<K>>,
}

impl<K: Clone + Eq + Hash> Queue<K> {
    fn new() -> Self {
        Self {
            ready: VecDeque::new(),
            queued: HashSet::new(),
            running: HashSet::new(),
            dirty: HashSet::new(),
            delayed: HashMap::new(),
            due: BTreeMap::new(),
        }
    }

    fn push(&mut self, key: K) {
        if self.running.contains(&key) {
            self.dirty.insert(key);
        } else if self.queued.insert(key.clone()) {
            self.ready.push_back(key);
        }
    }

    /// `key` again at `at`, unless it is due sooner already.
    fn push_at(&mut self, key: K, at: Instant) {
        if self.queued.contains(&key) {
            return;
        }
        if let Some(existing) = self.delayed.get(&key)
            && *existing <= at
        {
            return;
        }
        self.delayed.insert(key.clone(), at);
        self.due.entry(at).or_default().push(key);
    }

    /// Moves what is due by `now` to the ready queue; returns when the next delayed key is due.
    fn promote(&mut self, now: Instant) -> Option<Instant> {
        while let Some(entry) = self.due.first_entry() {
            if *entry.key() > now {
                return Some(*entry.key());
            }
            let (at, keys) = entry.remove_entry();
            for key in keys {
                // Only if this is still the key's latest schedule.
                if self.delayed.get(&key) == Some(&at) {
                    self.delayed.remove(&key);
                    self.push(key);
                }
            }
        }
        None
    }

    fn pop(&mut self) -> Option<K> {
        let key = self.ready.pop_front()?;
        self.queued.remove(&key);
        self.delayed.remove(&key);
        self.running.insert(key.clone());
        Some(key)
    }

    /// `key` finished; true when it was triggered meanwhile (it is queued again).
    fn finish(&mut self, key: &K) -> bool {
        self.running.remove(key);
        if self.dirty.remove(key) {
            self.push(key.clone());
            true
        } else {
            false
        }
    }
}

/// Triggers keys of a running [`Runtime`]: cheap to clone, never blocks, never grows the queue
/// past the number of distinct keys.
pub struct Trigger<K> {
    queue: Arc<Mutex<Queue<K>>>,
    notify: Arc<Notify>,
}

impl<K> Clone for Trigger<K> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
            notify: self.notify.clone(),
        }
    }
}

impl<K: Clone + Eq + Hash> Trigger<K> {
    pub fn trigger(&self, key: K) {
        lock(&self.queue).push(key);
        self.notify.notify_one();
    }
}

/// What one reconcile task hands back: its key and how it went.
type Outcome<R> = (
    <R as Reconcile>::Key,
    Result<Requeue, <R as Reconcile>::Error>,
);

/// Runs one [`Reconcile`] until shutdown.
pub struct Runtime<R: Reconcile> {
    reconciler: Arc<R>,
    config: RuntimeConfig,
    queue: Arc<Mutex<Queue<R::Key>>>,
    notify: Arc<Notify>,
    name: &'static str,
}

impl<R: Reconcile> Runtime<R> {
    pub fn new(name: &'static str, reconciler: Arc<R>, config: RuntimeConfig) -> Self {
        Self {
            reconciler,
            config,
            queue: Arc::new(Mutex::new(Queue::new())),
            notify: Arc::new(Notify::new()),
            name,
        }
    }

    pub fn trigger(&self) -> Trigger<R::Key> {
        Trigger {
            queue: self.queue.clone(),
            notify: self.notify.clone(),
        }
    }

    /// Reconciles until `shutdown`; then waits for the reconciles in progress to finish (they
    /// are owned here and never outlive the runtime).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tasks: JoinSet<Outcome<R>> = JoinSet::new();
        let mut failures: HashMap<R::Key, u32> = HashMap::new();
        let mut next_resync = Instant::now();
        let concurrency = self.config.concurrency.max(1);
        loop {
            let now = Instant::now();
            if now >= next_resync {
                next_resync = now + self.config.resync;
                match self.reconciler.keys().await {
                    Ok(keys) => {
                        let mut q = lock(&self.queue);
                        for key in keys {
                            q.push(key);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(runtime = self.name, error = %crate::error_chain(&error), "listing keys for the resync failed");
                        next_resync = now + self.config.backoff.initial;
                    }
                }
            }
            let next_due = {
                let mut q = lock(&self.queue);
                let next_due = q.promote(now);
                while tasks.len() < concurrency {
                    let Some(key) = q.pop() else { break };
                    let r = self.reconciler.clone();
                    tasks.spawn(async move {
                        let result = r.reconcile(&key).await;
                        (key, result)
                    });
                }
                next_due
            };
            let wake = next_due.map_or(next_resync, |d| d.min(next_resync));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep_until(wake) => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    self.finished(done, &mut failures);
                }
            }
        }
        while let Some(done) = tasks.join_next().await {
            self.finished(done, &mut failures);
        }
    }

    fn finished(
        &self,
        done: Result<Outcome<R>, tokio::task::JoinError>,
        failures: &mut HashMap<R::Key, u32>,
    ) {
        let (key, result) = match done {
            Ok(d) => d,
            Err(error) => {
                // A panicked reconcile: its key is lost until the next resync re-adds it.
                tracing::error!(runtime = self.name, %error, "a reconcile panicked");
                return;
            }
        };
        let mut q = lock(&self.queue);
        let again = q.finish(&key);
        match result {
            Ok(requeue) => {
                failures.remove(&key);
                if let (Requeue::After(d), false) = (requeue, again) {
                    q.push_at(key, Instant::now() + d);
                }
            }
            Err(error) => {
                let n = failures.entry(key.clone()).or_insert(0);
                *n = n.saturating_add(1);
                let delay = self.config.backoff.delay(*n);
                tracing::warn!(runtime = self.name, key = ?key, error = %crate::error_chain(&error), retry_in = ?delay, "reconcile failed");
                if !again {
                    q.push_at(key, Instant::now() + delay);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn backoff_doubles_to_its_cap() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let got: Vec<u128> = (1..=6).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn the_queue_deduplicates_and_never_runs_a_key_twice_at_once() {
        let mut q = Queue::new();
        q.push("a");
        q.push("a");
        q.push("b");
        assert_eq!(q.pop(), Some("a"));
        q.push("a"); // while running: remembered, not queued
        assert_eq!(q.pop(), Some("b"));
        assert_eq!(q.pop(), None);
        assert!(q.finish(&"a"));
        assert_eq!(q.pop(), Some("a"));
        assert!(!q.finish(&"a"));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn delayed_keys_come_due_once_and_a_trigger_wins_over_a_delay() {
        let mut q = Queue::new();
        let t0 = Instant::now();
        q.push_at("a", t0 + Duration::from_secs(5));
        q.push_at("a", t0 + Duration::from_secs(1)); // sooner wins
        q.push_at("a", t0 + Duration::from_secs(3)); // later ignored
        assert_eq!(q.promote(t0), Some(t0 + Duration::from_secs(1)));
        assert_eq!(q.pop(), None);
        q.promote(t0 + Duration::from_secs(1));
        assert_eq!(q.pop(), Some("a"));
        q.finish(&"a");
        q.promote(t0 + Duration::from_secs(10));
        assert_eq!(q.pop(), None, "stale schedules do not run the key again");
        q.push_at("b", t0 + Duration::from_secs(9));
        q.push("b");
        assert_eq!(q.pop(), Some("b"));
    }

    struct Counting {
        runs: AtomicUsize,
        concurrent: AtomicUsize,
        max_concurrent: AtomicUsize,
        fail_first: AtomicUsize,
    }

    #[async_trait]
    impl Reconcile for Counting {
        type Key = &'static str;
        type Error = std::io::Error;
        async fn reconcile(&self, _key: &&'static str) -> Result<Requeue, std::io::Error> {
            let now = self.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_concurrent.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.concurrent.fetch_sub(1, Ordering::SeqCst);
            self.runs.fetch_add(1, Ordering::SeqCst);
            if self.fail_first.load(Ordering::SeqCst) > 0 {
                self.fail_first.fetch_sub(1, Ordering::SeqCst);
                return Err(std::io::Error::other("transient"));
            }
            Ok(Requeue::Done)
        }
        async fn keys(&self) -> Result<Vec<&'static str>, std::io::Error> {
            Ok(vec!["k"])
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_key_at_a_time_failures_back_off_and_shutdown_waits() {
        let r = Arc::new(Counting {
            runs: AtomicUsize::new(0),
            concurrent: AtomicUsize::new(0),
            max_concurrent: AtomicUsize::new(0),
            fail_first: AtomicUsize::new(2),
        });
        let config = RuntimeConfig {
            resync: Duration::from_secs(60),
            concurrency: 4,
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(10),
            },
        };
        let rt = Runtime::new("test", r.clone(), config);
        let trigger = rt.trigger();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(rt.run(shutdown.clone()));
        // A burst of triggers while the resync's run is in flight: one more run, not ten.
        tokio::time::sleep(Duration::from_millis(10)).await;
        for _ in 0..10 {
            trigger.trigger("k");
        }
        // First run fails (retry in 1s) but was triggered meanwhile: runs again at once and
        // fails again (retry in 2s), then succeeds.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(r.runs.load(Ordering::SeqCst), 3);
        assert_eq!(r.max_concurrent.load(Ordering::SeqCst), 1);
        // Nothing more until the resync.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(r.runs.load(Ordering::SeqCst), 3);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(r.runs.load(Ordering::SeqCst), 4);
        trigger.trigger("k");
        tokio::time::sleep(Duration::from_millis(1)).await;
        shutdown.cancel();
        task.await.expect("runtime");
        assert_eq!(
            r.concurrent.load(Ordering::SeqCst),
            0,
            "shutdown left a reconcile running"
        );
        assert_eq!(r.runs.load(Ordering::SeqCst), 5);
    }
}
