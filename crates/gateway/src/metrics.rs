//! The gateway's Prometheus metrics.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `route` label value of requests no route matched.
pub const NO_ROUTE: &str = "none";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Service name, or [`NO_ROUTE`].
    pub route: String,
    /// `1xx` … `5xx`.
    pub status_class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Handles to the registered metrics (cheap to clone: they share their values).
#[derive(Debug, Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    upstream_errors: Family<RouteLabels, Counter>,
    connect_errors: Family<RouteLabels, Counter>,
    retries: Family<RouteLabels, Counter>,
    retries_refused: Family<RouteLabels, Counter>,
    ejections: Family<RouteLabels, Counter>,
    rate_limited: Family<RouteLabels, Counter>,
}

/// Upper bounds of the request duration buckets: 100 µs … 10 s, log-spaced (1, 2.5, 5 per
/// decade) so the exposition shows round numbers.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Metrics {
    /// Registers `flotilla_gateway_requests_total{route,status_class}`,
    /// `flotilla_gateway_request_duration_seconds{route}` and
    /// `flotilla_gateway_upstream_errors_total{route}` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::unregistered();
        registry.register(
            "flotilla_gateway_requests",
            "Requests answered by the gateway, by route (service; none when no route matched) \
             and status class",
            metrics.requests.clone(),
        );
        registry.register(
            "flotilla_gateway_request_duration_seconds",
            "Time from receiving a request to sending the response head, by route",
            metrics.duration.clone(),
        );
        registry.register(
            "flotilla_gateway_upstream_errors",
            "Failed attempts to get a response from an upstream instance (each retry counts)",
            metrics.upstream_errors.clone(),
        );
        registry.register(
            "flotilla_gateway_upstream_connect_errors",
            "Failed connection attempts to upstream instances",
            metrics.connect_errors.clone(),
        );
        registry.register(
            "flotilla_gateway_retries",
            "Requests sent again to another endpoint",
            metrics.retries.clone(),
        );
        registry.register(
            "flotilla_gateway_retries_refused",
            "Retries that were safe but refused because the retry budget was spent",
            metrics.retries_refused.clone(),
        );
        registry.register(
            "flotilla_gateway_ejections",
            "Endpoints ejected by passive health checking",
            metrics.ejections.clone(),
        );
        registry.register(
            "flotilla_gateway_rate_limited",
            "Requests refused with 429 by a route's rate limit",
            metrics.rate_limited.clone(),
        );
        metrics
    }

    /// Metrics that are not exported anywhere.
    pub fn unregistered() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            upstream_errors: Family::default(),
            connect_errors: Family::default(),
            retries: Family::default(),
            retries_refused: Family::default(),
            ejections: Family::default(),
            rate_limited: Family::default(),
        }
    }

    /// [`observe`](Self::observe) for a matched route, through the handles cached in `cached`
    /// (resolved on the route's first request, then a few atomic loads per request instead of
    /// label allocations and family lookups).
    pub fn observe_cached(
        &self,
        cached: &RouteMetrics,
        route: &str,
        status: http::StatusCode,
        seconds: f64,
    ) {
        let handles = cached.0.get_or_init(|| RouteHandles {
            requests: Default::default(),
            duration: self
                .duration
                .get_or_create(&RouteLabels {
                    route: route.to_owned(),
                })
                .clone(),
        });
        let class = status_class(status);
        let slot = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        handles.requests[slot]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        route: route.to_owned(),
                        status_class: class,
                    })
                    .clone()
            })
            .inc();
        handles.duration.observe(seconds);
    }

    pub fn observe(&self, route: &str, status: http::StatusCode, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                status_class: status_class(status),
            })
            .inc();
        self.duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(seconds);
    }

    pub fn upstream_error(&self, route: &str) {
        self.upstream_errors
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .inc();
    }
}

/// Per-route handles into [`Metrics`]' families, filled in lazily (a series still appears on
/// its first observation, as with `get_or_create`). One per [`crate::Route`]; a route is only
/// used with the [`Metrics`] of the gateway whose table holds it.
#[derive(Debug, Default)]
pub struct RouteMetrics(OnceLock<RouteHandles>);

#[derive(Debug)]
struct RouteHandles {
    /// `requests{route, status_class}` for 1xx … 5xx.
    requests: [OnceLock<Counter>; 5],
    duration: Histogram,
}

/// Connection-level metrics, kept by the connection layer (`listener.rs`).
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    /// Client connections open now (both listeners).
    pub open: prometheus_client::metrics::gauge::Gauge,
    /// Connections turned away because `max_connections` were open.
    pub refused: Counter,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_errors: Counter,
    /// Connections the gateway closed, by reason: `header` (no complete request head within
    /// `header_read_timeout`), `idle` (no request within `idle_timeout`), `stalled` (nothing
    /// moved while closing).
    pub closed: Family<CloseLabels, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CloseLabels {
    pub reason: &'static str,
}

impl ConnectionMetrics {
    /// Registers `flotilla_gateway_open_connections`, `flotilla_gateway_refused_connections_total`,
    /// `flotilla_gateway_tls_handshake_errors_total` and
    /// `flotilla_gateway_closed_connections_total{reason}`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "flotilla_gateway_open_connections",
            "Client connections open now",
            metrics.open.clone(),
        );
        registry.register(
            "flotilla_gateway_refused_connections",
            "Client connections refused because the connection limit was reached",
            metrics.refused.clone(),
        );
        registry.register(
            "flotilla_gateway_tls_handshake_errors",
            "TLS handshakes that failed or timed out",
            metrics.tls_handshake_errors.clone(),
        );
        registry.register(
            "flotilla_gateway_closed_connections",
            "Client connections closed by the gateway's timeouts, by reason",
            metrics.closed.clone(),
        );
        metrics
    }

    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&CloseLabels { reason }).inc();
    }
}

/// Per-route counters of the request path.
impl Metrics {
    fn inc(family: &Family<RouteLabels, Counter>, route: &str) {
        family
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .inc();
    }

    pub fn connect_error(&self, route: &str) {
        Self::inc(&self.connect_errors, route);
    }

    pub fn retry(&self, route: &str) {
        Self::inc(&self.retries, route);
    }

    pub fn retry_refused(&self, route: &str) {
        Self::inc(&self.retries_refused, route);
    }

    pub fn ejection(&self, route: &str) {
        Self::inc(&self.ejections, route);
    }

    pub fn rate_limited(&self, route: &str) {
        Self::inc(&self.rate_limited, route);
    }
}

fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn exposition_has_the_documented_names_and_buckets() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.observe("web", http::StatusCode::OK, 0.002);
        metrics.observe(NO_ROUTE, http::StatusCode::NOT_FOUND, 0.000_05);
        metrics.upstream_error("web");
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"flotilla_gateway_requests_total{route="web",status_class="2xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"flotilla_gateway_requests_total{route="none",status_class="4xx"} 1"#)
        );
        assert!(text.contains(r#"flotilla_gateway_upstream_errors_total{route="web"} 1"#));
        // The first and last buckets, and the 2 ms observation counted from the 2.5 ms bucket.
        for line in [
            r#"flotilla_gateway_request_duration_seconds_bucket{le="0.0001",route="web"} 0"#,
            r#"flotilla_gateway_request_duration_seconds_bucket{le="0.0025",route="web"} 1"#,
            r#"flotilla_gateway_request_duration_seconds_bucket{le="10.0",route="web"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
