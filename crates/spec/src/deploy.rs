//! How a service moves from one revision to the next: `[service.NAME.deploy]`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::quantity::Dur;

/// Rolling-update settings. None of them is part of a revision: changing them changes how the
/// next rollout runs, not what runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "DeployFields")]
pub struct DeploySpec {
    /// Instances above `replicas` that may run during a rollout: a count or a percentage of
    /// `replicas`, rounded up.
    pub max_surge: Scale,
    /// Instances below `replicas` that may be unavailable during a rollout: a count or a
    /// percentage of `replicas`, rounded down.
    pub max_unavailable: Scale,
    /// How long a new instance must stay ready before it counts as available. Unset: zero
    /// with a readiness probe, [`STABILITY_WINDOW`] without one (see [`DeploySpec::min_ready`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ready: Option<Dur>,
    /// A rollout that makes no progress for this long has failed. Defaults to `min_ready` + 2m.
    pub progress_deadline: Dur,
    /// Return to the last good revision when a rollout fails.
    pub auto_rollback: bool,
    /// Time between taking an instance out of the gateway and sending it the stop signal.
    pub pre_stop_delay: Dur,
    /// Revisions kept for `rollout history` and `rollout undo`.
    pub revision_history: u32,
}

/// What a file or a request may say; `progress_deadline`'s default follows `min_ready`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployFields {
    #[serde(default = "Scale::default_surge")]
    max_surge: Scale,
    #[serde(default = "Scale::zero")]
    max_unavailable: Scale,
    #[serde(default)]
    min_ready: Option<Dur>,
    #[serde(default)]
    progress_deadline: Option<Dur>,
    #[serde(default = "yes")]
    auto_rollback: bool,
    #[serde(default = "Dur::zero")]
    pre_stop_delay: Dur,
    #[serde(default = "default_history")]
    revision_history: u32,
}

impl From<DeployFields> for DeploySpec {
    fn from(f: DeployFields) -> Self {
        let deadline = f.progress_deadline.unwrap_or_else(|| {
            let min_ready = f.min_ready.map_or(std::time::Duration::ZERO, |d| d.0);
            Dur(min_ready.saturating_add(default_progress_deadline().0))
        });
        Self {
            max_surge: f.max_surge,
            max_unavailable: f.max_unavailable,
            min_ready: f.min_ready,
            progress_deadline: deadline,
            auto_rollback: f.auto_rollback,
            pre_stop_delay: f.pre_stop_delay,
            revision_history: f.revision_history,
        }
    }
}

fn default_progress_deadline() -> Dur {
    Dur(std::time::Duration::from_secs(120))
}
fn yes() -> bool {
    true
}
fn default_history() -> u32 {
    10
}

impl Default for DeploySpec {
    fn default() -> Self {
        Self {
            max_surge: Scale::default_surge(),
            max_unavailable: Scale::zero(),
            min_ready: None,
            progress_deadline: default_progress_deadline(),
            auto_rollback: true,
            pre_stop_delay: Dur::zero(),
            revision_history: default_history(),
        }
    }
}

/// Without a readiness probe, how long a new instance must have stayed running before it
/// counts as available (unless `min_ready` says otherwise): a process that crashes at start-up
/// must not pass for a good rollout, and must never become the "last good" revision.
pub const STABILITY_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

impl DeploySpec {
    pub fn is_default(&self) -> bool {
        self == &Self::default()
    }

    /// How long a new instance must stay ready before it counts as available: `min_ready`
    /// when set; otherwise zero when a readiness probe says when it is ready, and
    /// [`STABILITY_WINDOW`] when nothing but staying up can.
    pub fn min_ready(&self, has_readiness_probe: bool) -> std::time::Duration {
        match self.min_ready {
            Some(d) => d.0,
            None if has_readiness_probe => std::time::Duration::ZERO,
            None => STABILITY_WINDOW,
        }
    }

    /// `(max_surge, max_unavailable)` as instance counts for `replicas`. Never both zero: a
    /// rollout must be able to move.
    pub fn resolve(&self, replicas: u32) -> (u32, u32) {
        let surge = self.max_surge.resolve(replicas, true);
        let unavailable = self.max_unavailable.resolve(replicas, false);
        if surge == 0 && unavailable == 0 {
            (1, 0)
        } else {
            (surge, unavailable)
        }
    }
}

/// A count (`2`) or a percentage of replicas (`"25%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Count(u32),
    Percent(u32),
}

impl Scale {
    pub fn zero() -> Self {
        Scale::Count(0)
    }
    pub fn default_surge() -> Self {
        Scale::Percent(25)
    }
    /// Instances for `replicas`; percentages round up or down.
    pub fn resolve(self, replicas: u32, round_up: bool) -> u32 {
        match self {
            Scale::Count(n) => n,
            Scale::Percent(p) => {
                let scaled = u64::from(replicas) * u64::from(p);
                let n = if round_up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                };
                u32::try_from(n).unwrap_or(u32::MAX)
            }
        }
    }
}

impl fmt::Display for Scale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scale::Count(n) => write!(f, "{n}"),
            Scale::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Scale {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Scale::Count(n) => s.serialize_u32(*n),
            Scale::Percent(_) => s.collect_str(self),
        }
    }
}

struct ScaleVisitor;
impl de::Visitor<'_> for ScaleVisitor {
    type Value = Scale;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a count such as 1, or a percentage such as \"25%\"")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scale, E> {
        u32::try_from(v)
            .map(Scale::Count)
            .map_err(|_| E::custom(format!("{v} is too large")))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scale, E> {
        u32::try_from(v)
            .map(Scale::Count)
            .map_err(|_| E::custom(format!("{v} must be between 0 and {}", u32::MAX)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scale, E> {
        let t = v.trim();
        let bad = || {
            E::custom(format!(
                "invalid {v:?}: expected a count such as 1 or a percentage such as \"25%\""
            ))
        };
        match t.strip_suffix('%') {
            Some(p) => {
                let p: u32 = p.trim().parse().map_err(|_| bad())?;
                if p > 100 {
                    return Err(E::custom(format!("{v:?} is more than 100%")));
                }
                Ok(Scale::Percent(p))
            }
            None => t.parse().map(Scale::Count).map_err(|_| bad()),
        }
    }
}

impl<'de> Deserialize<'de> for Scale {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScaleVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_resolve_like_kubernetes() {
        assert_eq!(Scale::Percent(25).resolve(10, true), 3);
        assert_eq!(Scale::Percent(25).resolve(10, false), 2);
        assert_eq!(Scale::Count(2).resolve(10, true), 2);
        let d = DeploySpec {
            max_surge: Scale::Count(0),
            ..DeploySpec::default()
        };
        assert_eq!(d.resolve(3), (1, 0), "never both zero");
        assert_eq!(DeploySpec::default().resolve(1), (1, 0));
    }

    #[test]
    fn parses_counts_and_percentages() {
        let s: Scale = serde_json::from_str("\"25%\"").unwrap();
        assert_eq!(s, Scale::Percent(25));
        let s: Scale = serde_json::from_str("2").unwrap();
        assert_eq!(s, Scale::Count(2));
        assert!(serde_json::from_str::<Scale>("\"150%\"").is_err());
        assert!(serde_json::from_str::<Scale>("-1").is_err());
        assert!(serde_json::from_str::<Scale>("\"x\"").is_err());
        assert_eq!(
            serde_json::to_string(&Scale::Percent(25)).unwrap(),
            "\"25%\""
        );
        assert_eq!(serde_json::to_string(&Scale::Count(3)).unwrap(), "3");
    }
}
