//! A cheap clock for bookkeeping whose limits are whole seconds (connection timeouts, idle
//! upstream connections), read several times per request.

/// The longest step of the coarse clock (a kernel tick at HZ=100).
pub(crate) const COARSE_TICK_MS: u64 = 10;

/// Milliseconds on the kernel's coarse monotonic clock, which advances once per tick (1–10 ms)
/// and is read from the vDSO without the TSC: several times cheaper than `Instant::now`. It
/// runs at the same rate as `Instant`, and may read up to a tick behind it.
pub(crate) fn coarse_ms() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or(0, |t| {
        let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
        let nanos = u64::try_from(t.tv_nsec()).unwrap_or(0);
        secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
    })
}

/// `duration` in whole milliseconds, saturated.
pub(crate) fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clock_keeps_pace_with_instant() {
        let (start, coarse_start) = (std::time::Instant::now(), coarse_ms());
        let deadline = start + std::time::Duration::from_secs(10);
        loop {
            // Precise reads on both sides of the coarse one, whatever the scheduler does.
            let before = millis(start.elapsed());
            let coarse = coarse_ms() - coarse_start;
            let after = millis(start.elapsed());
            assert!(
                coarse + COARSE_TICK_MS >= before,
                "{coarse} ms, {before} ms before"
            );
            assert!(
                coarse <= after + COARSE_TICK_MS,
                "{coarse} ms, {after} ms after"
            );
            if coarse >= 50 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "coarse clock stopped");
            std::hint::spin_loop();
        }
    }
}
