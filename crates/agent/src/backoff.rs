//! Restart decisions after a process exit: a pure function of the policy, the exit and the
//! count of consecutive failures.

use std::time::Duration;

use flotilla_spec::{Phase, RestartPolicy};

/// A process that ran at least this long resets the consecutive-failure count.
pub const RESET_AFTER: Duration = Duration::from_secs(10);

/// Consecutive exits that put the instance into `CrashLoopBackOff`.
pub const CRASH_LOOP_AFTER: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start again after `delay`; `phase` is shown while waiting.
    Restart { delay: Duration, phase: Phase },
    /// Do not restart; the instance ends in `phase` (`Succeeded` or `Failed`).
    Stop { phase: Phase },
}

/// The consecutive-exit count after an exit of a process that ran for `ran_for`.
pub fn next_failure_count(previous: u32, ran_for: Duration) -> u32 {
    if ran_for >= RESET_AFTER {
        1
    } else {
        previous.saturating_add(1)
    }
}

/// Delay before restart number `n` of a streak (n = consecutive exits, counting this one):
/// the first restart is immediate, then `initial · 2^(n−2)`, capped at `max`.
pub fn backoff_delay(n: u32, initial: Duration, max: Duration) -> Duration {
    if n <= 1 {
        return Duration::ZERO;
    }
    let shift = (n - 2).min(31);
    initial.saturating_mul(1u32 << shift).min(max)
}

/// What to do after an exit. `success` is a clean exit (code 0, not killed by us for a failed
/// probe); `consecutive` is [`next_failure_count`] for this exit.
pub fn decide(
    policy: RestartPolicy,
    success: bool,
    consecutive: u32,
    initial: Duration,
    max: Duration,
) -> Decision {
    let restart = match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !success,
        RestartPolicy::Never => false,
    };
    if !restart {
        return Decision::Stop {
            phase: if success {
                Phase::Succeeded
            } else {
                Phase::Failed
            },
        };
    }
    Decision::Restart {
        delay: backoff_delay(consecutive, initial, max),
        phase: if consecutive >= CRASH_LOOP_AFTER {
            Phase::CrashLoopBackOff
        } else {
            Phase::Backoff
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn first_restart_immediate_then_doubling_capped() {
        let i = 100 * MS;
        let m = Duration::from_secs(1);
        let delays: Vec<_> = (1..=7).map(|n| backoff_delay(n, i, m)).collect();
        assert_eq!(
            delays,
            vec![
                Duration::ZERO,
                100 * MS,
                200 * MS,
                400 * MS,
                800 * MS,
                1000 * MS,
                1000 * MS
            ]
        );
        assert_eq!(backoff_delay(u32::MAX, i, m), m);
    }

    #[test]
    fn policies() {
        let i = 100 * MS;
        let m = Duration::from_secs(30);
        assert_eq!(
            decide(RestartPolicy::Always, true, 1, i, m),
            Decision::Restart {
                delay: Duration::ZERO,
                phase: Phase::Backoff
            }
        );
        assert_eq!(
            decide(RestartPolicy::OnFailure, true, 1, i, m),
            Decision::Stop {
                phase: Phase::Succeeded
            }
        );
        assert_eq!(
            decide(RestartPolicy::OnFailure, false, 2, i, m),
            Decision::Restart {
                delay: i,
                phase: Phase::Backoff
            }
        );
        assert_eq!(
            decide(RestartPolicy::Always, false, 3, i, m),
            Decision::Restart {
                delay: 2 * i,
                phase: Phase::CrashLoopBackOff
            }
        );
        assert_eq!(
            decide(RestartPolicy::Never, false, 5, i, m),
            Decision::Stop {
                phase: Phase::Failed
            }
        );
    }

    #[test]
    fn long_runs_reset_the_streak() {
        assert_eq!(next_failure_count(0, Duration::ZERO), 1);
        assert_eq!(next_failure_count(4, Duration::from_secs(1)), 5);
        assert_eq!(next_failure_count(4, RESET_AFTER), 1);
    }

    proptest! {
        #[test]
        fn delay_is_monotonic_and_bounded(n in 1u32..100, init in 1u64..10_000, max in 1u64..100_000) {
            let (i, m) = (Duration::from_millis(init), Duration::from_millis(max));
            let d = backoff_delay(n, i, m);
            prop_assert!(d <= m);
            prop_assert!(backoff_delay(n + 1, i, m) >= d);
        }
    }
}
