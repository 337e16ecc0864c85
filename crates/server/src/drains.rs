//! Draining across machines: before an agent stops a deleted instance, every gateway that may
//! route to it confirms it no longer does and has no request in flight to it.
//!
//! Gateways (with a gateway certificate) long-poll `GET /api/v1/gateways/drains`: the answer
//! is the instances being drained that this gateway has not confirmed yet. For each, the
//! gateway waits until its own table no longer routes to it and nothing is in flight, then
//! confirms it (`POST /api/v1/gateways/drains`). The agent asks
//! `POST /api/v1/nodes/{node}/instances/{name}/drain`, which answers once every live gateway
//! has confirmed (or at its deadline, naming those that did not). A gateway is live while it
//! has a poll open, and for [`GRACE`] after its last one ended: a gateway that dies stops
//! holding drains up within seconds, and one that merely reconnects is still waited for.
//!
//! Everything is in memory and bounded by what exists: gateways, and instances being drained.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;

/// How long a gateway counts as live after its last poll ended.
pub const GRACE: Duration = Duration::from_secs(2);
/// A gateway unseen for this long is forgotten.
const FORGET: Duration = Duration::from_secs(3600);

#[derive(Debug, Default)]
struct Gateway {
    open_polls: usize,
    last_seen: Option<Instant>,
}

impl Gateway {
    fn live(&self, now: Instant) -> bool {
        self.open_polls > 0
            || self
                .last_seen
                .is_some_and(|t| now.duration_since(t) < GRACE)
    }
}

#[derive(Debug, Default)]
struct State {
    gateways: BTreeMap<String, Gateway>,
    /// Instance being drained → the gateways that confirmed it; several waiters may share it.
    draining: BTreeMap<String, (usize, BTreeSet<String>)>,
}

/// What a drain found.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Outcome {
    /// Live gateways that confirmed the instance unrouted.
    pub confirmed: Vec<String>,
    /// Live gateways that had not by the deadline.
    pub waiting: Vec<String>,
}

#[derive(Debug)]
pub struct Drains {
    state: Mutex<State>,
    /// Bumped at every change (a drain starts, a confirmation, a gateway comes or goes).
    changed: watch::Sender<u64>,
}

impl Default for Drains {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
        }
    }
}

/// Ends a gateway's poll when dropped (the request finished or its connection went away).
struct OpenPoll<'a> {
    drains: &'a Drains,
    gateway: String,
}

impl Drop for OpenPoll<'_> {
    fn drop(&mut self) {
        let mut s = self.drains.lock();
        if let Some(g) = s.gateways.get_mut(&self.gateway) {
            g.open_polls = g.open_polls.saturating_sub(1);
            g.last_seen = Some(Instant::now());
        }
    }
}

impl Drains {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// What `gateway` should confirm, waiting up to `wait` for something to (or until
    /// `stop`). The gateway is live meanwhile.
    pub async fn poll(
        &self,
        gateway: &str,
        wait: Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Vec<String> {
        let mut rx = self.changed.subscribe();
        let _open = {
            let mut s = self.lock();
            let now = Instant::now();
            s.gateways.retain(|_, g| {
                g.open_polls > 0 || g.last_seen.is_some_and(|t| now.duration_since(t) < FORGET)
            });
            let g = s.gateways.entry(gateway.to_string()).or_default();
            g.open_polls += 1;
            g.last_seen = Some(now);
            OpenPoll {
                drains: self,
                gateway: gateway.to_string(),
            }
        };
        // A gateway that was not live before is news to drains in progress.
        self.bump();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let pending: Vec<String> = self
                .lock()
                .draining
                .iter()
                .filter(|(_, (_, by))| !by.contains(gateway))
                .map(|(i, _)| i.clone())
                .collect();
            if !pending.is_empty() {
                return pending;
            }
            tokio::select! {
                () = stop.cancelled() => return Vec::new(),
                () = tokio::time::sleep_until(deadline) => return Vec::new(),
                r = rx.changed() => if r.is_err() { return Vec::new() },
            }
        }
    }

    /// `gateway` no longer routes to `instances` and has nothing in flight to them.
    pub fn confirm(&self, gateway: &str, instances: &[String]) {
        {
            let mut s = self.lock();
            for i in instances {
                if let Some((_, by)) = s.draining.get_mut(i) {
                    by.insert(gateway.to_string());
                }
            }
            if let Some(g) = s.gateways.get_mut(gateway) {
                g.last_seen = Some(Instant::now());
            }
        }
        self.bump();
    }

    fn outcome(&self, instance: &str) -> Outcome {
        let s = self.lock();
        let now = Instant::now();
        let by = s.draining.get(instance).map(|(_, by)| by);
        let mut out = Outcome::default();
        for (name, _) in s.gateways.iter().filter(|(_, g)| g.live(now)) {
            if by.is_some_and(|b| b.contains(name)) {
                out.confirmed.push(name.clone());
            } else {
                out.waiting.push(name.clone());
            }
        }
        out
    }

    /// Waits until every live gateway confirmed `instance` unrouted, or `timeout`.
    pub async fn drain(&self, instance: &str, timeout: Duration) -> Outcome {
        let mut rx = self.changed.subscribe();
        self.lock()
            .draining
            .entry(instance.to_string())
            .or_default()
            .0 += 1;
        self.bump();
        let deadline = tokio::time::Instant::now() + timeout;
        // A gateway's grace ending changes who is live without an event: look again then.
        let tick = GRACE / 4;
        let out = loop {
            let out = self.outcome(instance);
            if out.waiting.is_empty() || tokio::time::Instant::now() >= deadline {
                break out;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = tokio::time::sleep(tick) => {}
                _ = rx.changed() => {}
            }
        };
        let mut s = self.lock();
        if let Some(entry) = s.draining.get_mut(instance) {
            entry.0 = entry.0.saturating_sub(1);
            if entry.0 == 0 {
                s.draining.remove(instance);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_drain_waits_for_every_live_gateway_and_only_until_its_deadline() {
        let d = Drains::new();
        let stop = tokio_util::sync::CancellationToken::new();
        // No gateway: nothing to wait for.
        assert_eq!(
            d.drain("web-1", Duration::from_secs(5)).await,
            Outcome::default()
        );

        // Two gateways polling; one confirms at once, the other only later.
        let (a, b) = (d.clone(), d.clone());
        let (sa, sb) = (stop.clone(), stop.clone());
        let ga = tokio::spawn(async move {
            let got = a.poll("gw-a", Duration::from_secs(10), &sa).await;
            a.confirm("gw-a", &got);
            got
        });
        let gb = tokio::spawn(async move {
            let got = b.poll("gw-b", Duration::from_secs(10), &sb).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            b.confirm("gw-b", &got);
            // Back to polling, as a gateway does.
            b.poll("gw-b", Duration::from_secs(10), &sb).await
        });
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        let out = d.drain("web-1", Duration::from_secs(5)).await;
        assert_eq!(out.confirmed, vec!["gw-a".to_string(), "gw-b".to_string()]);
        assert!(out.waiting.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(ga.await.unwrap(), vec!["web-1".to_string()]);

        // Neither confirms web-2 (gw-b sees it and stops): within their grace both are still
        // waited for, so the drain ends at its deadline, naming them.
        let started = tokio::time::Instant::now();
        let out = d.drain("web-2", Duration::from_secs(1)).await;
        assert_eq!(out.waiting, vec!["gw-a".to_string(), "gw-b".to_string()]);
        assert!(out.confirmed.is_empty());
        assert!(started.elapsed() >= Duration::from_secs(1));
        stop.cancel();
        let _ = gb.await;

        // A gateway gone (no poll open, its grace over) is not waited for.
        tokio::time::sleep(GRACE).await;
        let started = tokio::time::Instant::now();
        let out = d.drain("web-3", Duration::from_secs(5)).await;
        assert_eq!(out, Outcome::default());
        assert!(started.elapsed() < Duration::from_millis(10));
    }
}
