//! Retry budget: retries may add at most `ratio` of the requests seen over a sliding window, plus
//! a small floor (Finagle's and linkerd's design). Without one, retries multiply the load on a
//! service that is already failing.
//!
//! The request path only bumps an atomic counter; the window bookkeeping takes a lock only when
//! a retry is considered, which is rare.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Snapshots per window: the window slides in steps of `window / SLOTS`.
const SLOTS: u32 = 10;

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    floor: u64,
    window: Duration,
    requests: AtomicU64,
    retries: AtomicU64,
    /// (time, requests, retries) totals, oldest first, all within the window.
    history: Mutex<VecDeque<(Instant, u64, u64)>>,
}

impl RetryBudget {
    pub fn new(ratio: f64, floor: u32, window: Duration) -> Self {
        Self {
            ratio: ratio.max(0.0),
            floor: u64::from(floor),
            window: window.max(Duration::from_millis(10)),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            history: Mutex::new(VecDeque::with_capacity(SLOTS as usize + 1)),
        }
    }

    /// Counts an original request (not a retry).
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if there is one.
    pub fn try_retry(&self) -> bool {
        self.try_retry_at(Instant::now())
    }

    fn try_retry_at(&self, now: Instant) -> bool {
        let mut history = self
            .history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let requests = self.requests.load(Ordering::Relaxed);
        let retries = self.retries.load(Ordering::Relaxed);
        while history
            .front()
            .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) > self.window)
        {
            history.pop_front();
        }
        let step = self.window / SLOTS;
        if history
            .back()
            .is_none_or(|(at, _, _)| now.saturating_duration_since(*at) >= step)
        {
            history.push_back((now, requests, retries));
        }
        // The oldest snapshot still in the window is the baseline (what happened before it is
        // forgotten; with no traffic for a whole window, only the floor is available).
        let (_, base_requests, base_retries) = history.front().copied().unwrap_or((now, 0, 0));
        let window_requests = requests.saturating_sub(base_requests);
        let window_retries = retries.saturating_sub(base_retries);
        let allowed = self.floor + (window_requests as f64 * self.ratio) as u64;
        if window_retries < allowed {
            self.retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_ratio_plus_floor_per_window() {
        let budget = RetryBudget::new(0.2, 3, Duration::from_secs(10));
        let t0 = Instant::now();
        // Floor only.
        let granted = (0..10).filter(|_| budget.try_retry_at(t0)).count();
        assert_eq!(granted, 3);
        // 100 requests later: 20 more.
        for _ in 0..100 {
            budget.request();
        }
        let granted = (0..100).filter(|_| budget.try_retry_at(t0)).count();
        assert_eq!(granted, 20);
        // Once the window has passed, old requests and retries are forgotten: the floor again.
        let later = t0 + Duration::from_secs(11);
        assert!(budget.try_retry_at(later));
        let granted = (0..10)
            .filter(|_| budget.try_retry_at(later + Duration::from_secs(1)))
            .count();
        assert_eq!(granted, 2);
    }

    #[test]
    fn steady_failure_retries_stay_near_the_ratio() {
        let budget = RetryBudget::new(0.2, 0, Duration::from_secs(1));
        let t0 = Instant::now();
        let mut retried = 0;
        // 10 000 requests over 10 s, each wanting a retry.
        for i in 0..10_000u32 {
            budget.request();
            if budget.try_retry_at(t0 + Duration::from_millis(u64::from(i))) {
                retried += 1;
            }
        }
        assert!((1_500..=2_100).contains(&retried), "{retried}");
    }
}
