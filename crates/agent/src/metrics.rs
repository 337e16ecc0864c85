//! The agent's Prometheus metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub type Labels = Vec<(String, String)>;

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub restarts: Family<Labels, Counter>,
    pub probe_failures: Family<Labels, Counter>,
    /// Checks that failed while the instance was starting (startup probes, and any probe
    /// before the instance was first ready): a normal deploy has many, an alert wants none.
    pub probe_startup_failures: Family<Labels, Counter>,
    pub oom_kills: Family<Labels, Counter>,
    pub cpu_millicores: Family<Labels, Gauge>,
    pub memory_bytes: Family<Labels, Gauge>,
}

pub fn service(service: &str) -> Labels {
    vec![("service".to_string(), service.to_string())]
}

pub fn probe(service: &str, probe: &str) -> Labels {
    vec![
        ("service".to_string(), service.to_string()),
        ("probe".to_string(), probe.to_string()),
    ]
}

/// Whether a failed check counts as a start-up failure: every startup-probe check, and any
/// check before the instance's process was first ready.
pub fn is_startup_failure(probe: &str, first_ready: bool) -> bool {
    probe == "startup" || !first_ready
}

pub fn instance(service: &str, instance: &str) -> Labels {
    vec![
        ("service".to_string(), service.to_string()),
        ("instance".to_string(), instance.to_string()),
    ]
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "flotilla_instance_restarts",
            "Restarts of instance processes",
            m.restarts.clone(),
        );
        registry.register(
            "flotilla_probe_failures",
            "Failed probe checks of instances that had been ready (startup checks are counted apart)",
            m.probe_failures.clone(),
        );
        registry.register(
            "flotilla_probe_startup_failures",
            "Failed probe checks while an instance was starting (before it was first ready)",
            m.probe_startup_failures.clone(),
        );
        registry.register(
            "flotilla_oom_kills",
            "Instance processes killed for exceeding their memory limit",
            m.oom_kills.clone(),
        );
        registry.register(
            "flotilla_instance_cpu_millicores",
            "CPU used by an instance, in thousandths of a core",
            m.cpu_millicores.clone(),
        );
        registry.register(
            "flotilla_instance_memory_bytes",
            "Memory used by an instance",
            m.memory_bytes.clone(),
        );
        m
    }

    /// Drops the per-instance series of a stopped instance.
    pub fn forget_instance(&self, service: &str, instance: &str) {
        let l = self::instance(service, instance);
        self.cpu_millicores.remove(&l);
        self.memory_bytes.remove(&l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_removal() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        m.restarts.get_or_create(&service("web")).inc();
        m.probe_failures
            .get_or_create(&probe("web", "liveness"))
            .inc();
        m.cpu_millicores
            .get_or_create(&instance("web", "web-1"))
            .set(250);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("flotilla_instance_restarts_total{service=\"web\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("flotilla_probe_failures_total{service=\"web\",probe=\"liveness\"} 1"),
            "{out}"
        );
        assert!(
            out.contains(
                "flotilla_instance_cpu_millicores{service=\"web\",instance=\"web-1\"} 250"
            ),
            "{out}"
        );
        m.forget_instance("web", "web-1");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(!out.contains("instance=\"web-1\""), "{out}");
    }

    #[test]
    fn checks_before_the_first_ready_are_startup_failures() {
        assert!(is_startup_failure("startup", true));
        assert!(is_startup_failure("readiness", false));
        assert!(is_startup_failure("liveness", false));
        assert!(!is_startup_failure("readiness", true));
        assert!(!is_startup_failure("liveness", true));
    }
}
