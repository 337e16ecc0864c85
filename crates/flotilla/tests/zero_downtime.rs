//! Zero-downtime rollouts under real client load, with their bounds checked from outside.
//!
//! Each test runs a real `flotilla up` with the demo service, sends traffic through the gateway
//! on persistent HTTP/1.1 and HTTP/2 connections (GETs and POSTs, which the gateway never
//! retries: a POST lost in a rollout shows as a failure; see `common::load`), starts a rollout,
//! and meanwhile samples the API's instance list every ~25 ms to check the deploy bounds as
//! the controller defines them (`crates/server/src/plan.rs`):
//!
//! - instances that exist, including those being stopped, never exceed `replicas + max_surge`;
//! - available instances (not being deleted, ready, `Running`, ready for `min_ready`) never
//!   fall below `replicas - max_unavailable`.
//!
//! Every test also asserts that the load and the sampler really ran during the rollout (a
//! minimum number of requests and samples, a minimum rate in every half second, samples with
//! both revisions present), so none of them can pass without traffic.
#![allow(clippy::disallowed_macros, clippy::unwrap_used, clippy::expect_used)] // results are printed for `--nocapture` runs

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use common::load::{Load, LoadConfig, Summary};
use common::*;
use serde_json::Value;

/// Deadline of a whole rollout on a loaded machine.
const ROLLOUT: Duration = Duration::from_secs(120);
/// Requests that must have started during each rollout (the load offers ~480/s).
const MIN_REQUESTS: usize = 300;
/// Requests that must have started in every half second of a rollout: a stall of the gateway
/// (or of the load) shows here.
const MIN_PER_HALF_SECOND: usize = 10;
/// Instance-list samples that must fall inside each rollout.
const MIN_SAMPLES: usize = 20;

/// The demo, answering with its version (`GREETING`), with a readiness probe tolerant enough
/// that a loaded machine does not flap it (a flap would lower availability by itself). It
/// takes half a second to start listening, as real services take a while: each step of a
/// rollout then lasts long enough for the load and the sampler to see it.
fn service(name: &str, replicas: u32, version: &str, deploy: &str) -> String {
    demo(
        name,
        replicas,
        version,
        deploy,
        r#", "--start-delay", "500ms""#,
    )
}

/// [`service`] with other demo arguments (`extra_args`: `, "--flag", "value"`).
fn demo(name: &str, replicas: u32, version: &str, deploy: &str, extra_args: &str) -> String {
    versioned_demo(name, replicas, version, extra_args, deploy, "500ms", 3)
}

fn service_object(up: &Up, name: &str) -> Value {
    up.api_get(&format!("/api/v1/services/{name}"))
}

fn hash_of(instance: &Value) -> String {
    instance["spec"]["specHash"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits until `revision` of `name` is Complete and exactly `replicas` instances, all of its
/// hash, exist; returns the service and those instances.
fn wait_complete(up: &Up, name: &str, revision: u64, replicas: usize) -> (Value, Vec<Value>) {
    wait_for(
        &format!("revision {revision} of {name} to be rolled out"),
        ROLLOUT,
        || {
            let s = service_object(up, name);
            if s["status"]["revision"] != revision || s["status"]["rollout"]["phase"] != "Complete"
            {
                return None;
            }
            let target = s["status"]["specHash"].as_str()?.to_string();
            let instances = up.instances(name);
            (instances.len() == replicas && instances.iter().all(|i| hash_of(i) == target))
                .then_some((s, instances))
        },
    )
}

/// One instance as a sample saw it.
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    hash: String,
    phase: String,
    ready: bool,
    deleting: bool,
    ready_since: Option<SystemTime>,
}

#[derive(Debug, Clone)]
struct Sample {
    /// When the answer arrived: the list was read before this.
    at: Instant,
    wall: SystemTime,
    instances: Vec<Seen>,
}

impl Sample {
    /// As `plan::available`: routable (not being deleted, ready, `Running`) and ready for
    /// `min_ready`. Judged at the time the answer arrived, which is after the controller's
    /// decisions the list reflects, so an instance the controller counted is counted here too.
    fn available(&self, min_ready: Duration) -> usize {
        self.instances
            .iter()
            .filter(|i| !i.deleting && i.ready && i.phase == "Running")
            .filter(|i| {
                min_ready.is_zero()
                    || i.ready_since
                        .and_then(|t| self.wall.duration_since(t).ok())
                        .is_some_and(|d| d >= min_ready)
            })
            .count()
    }

    fn describe(&self, min_ready: Duration) -> String {
        let list: Vec<String> = self
            .instances
            .iter()
            .map(|i| {
                format!(
                    "{} [{}] {}{}{}",
                    i.name,
                    &i.hash[..i.hash.len().min(6)],
                    i.phase,
                    if i.ready { " ready" } else { "" },
                    if i.deleting { " deleting" } else { "" }
                )
            })
            .collect();
        format!(
            "{} instances, {} available: {}",
            self.instances.len(),
            self.available(min_ready),
            list.join(", ")
        )
    }
}

/// Polls `GET /api/v1/instances?service=NAME` from its own thread until finished.
struct Sampler {
    stop: Arc<AtomicBool>,
    taken: Arc<AtomicUsize>,
    thread: Option<JoinHandle<(Vec<Sample>, Vec<String>)>>,
}

impl Sampler {
    fn start(up: &Up, service: &str, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(AtomicUsize::new(0));
        let (api, auth) = (up.api.clone(), format!("Bearer {}", up.token));
        let path = format!("/api/v1/instances?service={service}");
        let thread = {
            let (stop, taken) = (stop.clone(), taken.clone());
            std::thread::spawn(move || {
                // Bounded even if the test never stops it.
                let deadline = Instant::now() + Duration::from_secs(300);
                let (mut samples, mut errors) = (Vec::new(), Vec::new());
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match http(&api, "GET", &path, &[("Authorization", &auth)], "") {
                        Some(r) if r.status == 200 => match parse_sample(&r.body) {
                            Some(instances) => {
                                samples.push(Sample {
                                    at: Instant::now(),
                                    wall: SystemTime::now(),
                                    instances,
                                });
                                taken.fetch_add(1, Ordering::Relaxed);
                            }
                            None => errors.push(format!("unreadable list: {}", r.body)),
                        },
                        Some(r) => errors.push(format!("{} {}", r.status, r.body)),
                        None => errors.push("API unreachable".to_string()),
                    }
                    // The poll interval, not synchronization: every sample is checked.
                    #[allow(clippy::disallowed_methods)]
                    std::thread::sleep(every);
                }
                (samples, errors)
            })
        };
        Sampler {
            stop,
            taken,
            thread: Some(thread),
        }
    }

    fn taken(&self) -> usize {
        self.taken.load(Ordering::Relaxed)
    }

    fn finish(mut self) -> (Vec<Sample>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("sampler thread"))
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn parse_sample(body: &str) -> Option<Vec<Seen>> {
    let v: Value = serde_json::from_str(body).ok()?;
    let items = v["items"].as_array()?;
    Some(
        items
            .iter()
            .map(|i| Seen {
                name: name_of(i),
                hash: hash_of(i),
                phase: i["status"]["phase"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                ready: i["status"]["ready"] == true,
                deleting: !i["metadata"]["deletionTimestamp"].is_null(),
                ready_since: i["status"]["readySince"]
                    .as_str()
                    .and_then(|t| humantime::parse_rfc3339_weak(t).ok()),
            })
            .collect(),
    )
}

/// The deploy bounds of one rollout, resolved to counts.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    replicas: usize,
    max_surge: usize,
    max_unavailable: usize,
    min_ready: Duration,
}

/// What the samples of a rollout showed.
#[derive(Debug)]
struct Observed {
    samples: usize,
    /// Samples with instances of both revisions.
    mixed: usize,
    max_instances: usize,
    min_available: usize,
}

/// Checks every sample against the bounds; returns what they showed inside `[from, to]`.
fn check_bounds(
    samples: &[Sample],
    b: Bounds,
    old_hash: &str,
    from: Instant,
    to: Instant,
) -> Observed {
    let mut seen = Observed {
        samples: 0,
        mixed: 0,
        max_instances: 0,
        min_available: usize::MAX,
    };
    let (max_total, min_available) = (b.replicas + b.max_surge, b.replicas - b.max_unavailable);
    for s in samples {
        let total = s.instances.len();
        let available = s.available(b.min_ready);
        let at = s.at.saturating_duration_since(from).as_secs_f64();
        assert!(
            total <= max_total,
            "at {at:.3}s of the rollout: {total} instances exist, more than replicas + \
             max_surge = {max_total}: {}",
            s.describe(b.min_ready)
        );
        assert!(
            available >= min_available,
            "at {at:.3}s of the rollout: {available} instances available, fewer than replicas - \
             max_unavailable = {min_available}: {}",
            s.describe(b.min_ready)
        );
        if s.at >= from && s.at <= to {
            seen.samples += 1;
            let old = s.instances.iter().filter(|i| i.hash == old_hash).count();
            if old > 0 && old < total {
                seen.mixed += 1;
            }
            seen.max_instances = seen.max_instances.max(total);
            seen.min_available = seen.min_available.min(available);
        }
    }
    assert!(
        seen.samples >= MIN_SAMPLES,
        "only {} samples of the instances fell inside the rollout (at least {MIN_SAMPLES} \
         needed for the bounds to mean anything)",
        seen.samples
    );
    assert!(
        seen.mixed >= 1,
        "no sample caught the rollout in progress (old and new instances together): {seen:?}"
    );
    seen
}

/// The load every rollout runs under: three HTTP/1.1 and three HTTP/2 connections, one
/// request in three a POST.
fn start_load(up: &Up, service: &str) -> Load {
    let load = Load::start(LoadConfig::new(&up.gateway, &format!("{service}.test")));
    wait_for("the load to flow", ROLLOUT, || {
        (load.answered() + load.failed() >= 100).then_some(())
    });
    load
}

/// What a rollout under load showed.
struct Rolled {
    load: Summary,
    samples: Vec<Sample>,
    from: Instant,
    to: Instant,
    old_hash: String,
    before: Vec<String>,
    after: Vec<Value>,
    service: Value,
}

/// Runs `trigger` (the change that starts revision `revision`) under load and the sampler,
/// waits for the rollout to complete and for every new instance to have answered some
/// request, then stops both.
fn roll_under_load(
    up: &Up,
    name: &str,
    replicas: usize,
    revision: u64,
    trigger: impl FnOnce(),
) -> Rolled {
    // From a settled start: with `min_ready`, instances that have only just become ready
    // are not available yet, and the bounds hold from the first complete rollout on.
    let (_, before_instances) = wait_complete(up, name, revision - 1, replicas);
    let old_hash = hash_of(&before_instances[0]);
    assert!(before_instances.iter().all(|i| hash_of(i) == old_hash));
    let before: Vec<String> = before_instances.iter().map(name_of).collect();

    let load = start_load(up, name);
    let sampler = Sampler::start(up, name, Duration::from_millis(25));
    wait_for("the sampler to run", ROLLOUT, || {
        (sampler.taken() >= 3).then_some(())
    });

    let from = Instant::now();
    trigger();
    let (service, after) = wait_complete(up, name, revision, replicas);
    let to = Instant::now();

    // The new instances all get traffic (and nothing else may answer from now on), and the
    // load goes on a little past the end, to show what answers then.
    let done = load.answered() + load.failed();
    wait_for("requests after the rollout", ROLLOUT, || {
        (load.answered() + load.failed() >= done + 100).then_some(())
    });
    for i in &after {
        let n = name_of(i);
        wait_for(&format!("new instance {n} to answer"), ROLLOUT, || {
            (load.answers_from(&n) > 0).then_some(())
        });
    }
    let (samples, errors) = sampler.finish();
    let load = load.finish();
    assert!(errors.is_empty(), "the API failed the sampler: {errors:?}");
    Rolled {
        load,
        samples,
        from,
        to,
        old_hash,
        before,
        after,
        service,
    }
}

/// The assertions every rollout under load makes; returns a line to print.
fn assert_zero_downtime(r: &Rolled, b: Bounds, test: &str) -> Observed {
    let l = &r.load;
    l.assert_clean(
        &format!("{test}, during the rollout"),
        r.from,
        r.to,
        MIN_REQUESTS,
    );
    let windows = l.per_window(r.from, r.to, Duration::from_millis(500));
    if let Some(min) = windows.iter().min() {
        assert!(
            *min >= MIN_PER_HALF_SECOND,
            "{test}: a half second of the rollout had only {min} requests (at least \
             {MIN_PER_HALF_SECOND}): {windows:?}"
        );
    }
    // Once complete, only the new instances answer: the old ones were unrouted before they
    // were stopped, and they are gone.
    let new: Vec<String> = r.after.iter().map(name_of).collect();
    let stray: Vec<_> = l
        .between(r.to, l.ended)
        .filter_map(|x| x.instance())
        .filter(|i| !new.iter().any(|n| n == i))
        .collect();
    assert!(
        stray.is_empty(),
        "{test}: answers from instances that were replaced, after the rollout: {stray:?}"
    );
    let seen = check_bounds(&r.samples, b, &r.old_hash, r.from, r.to);
    eprintln!(
        "{test}: rollout took {:.2}s; {}; per 500ms: min {} max {}; {} samples ({} mixed), \
         at most {} instances (bound {}), at least {} available (bound {})",
        (r.to - r.from).as_secs_f64(),
        l.describe(r.from, r.to),
        windows.iter().min().copied().unwrap_or(0),
        windows.iter().max().copied().unwrap_or(0),
        seen.samples,
        seen.mixed,
        seen.max_instances,
        b.replicas + b.max_surge,
        seen.min_available,
        b.replicas - b.max_unavailable,
    );
    seen
}

fn assert_versions_after(r: &Rolled, version: &str) {
    let late: Vec<_> = r
        .load
        .between(r.to, r.load.ended)
        .filter_map(|x| x.version())
        .collect();
    assert!(!late.is_empty(), "answers after the rollout");
    assert!(
        late.iter().all(|v| *v == version),
        "only {version} answers after the rollout: {:?}",
        late.iter()
            .filter(|v| **v != version)
            .take(5)
            .collect::<Vec<_>>()
    );
}

#[test]
fn rolling_update_with_default_bounds_under_load() {
    // Defaults: max_surge = 25 % of 4 (1), max_unavailable = 0.
    let up = Up::start(&service("web", 4, "v1", ""));
    let r = roll_under_load(&up, "web", 4, 2, || {
        apply(&up, &service("web", 4, "v2", ""))
    });
    let b = Bounds {
        replicas: 4,
        max_surge: 1,
        max_unavailable: 0,
        min_ready: Duration::ZERO,
    };
    let seen = assert_zero_downtime(&r, b, "defaults");
    assert_eq!(seen.max_instances, 5, "the surge was used: {seen:?}");
    assert_versions_after(&r, "v2");
}

#[test]
fn rolling_update_without_surge_under_load() {
    let deploy = "deploy = { max_surge = 0, max_unavailable = 1 }";
    let up = Up::start(&service("web", 4, "v1", deploy));
    let r = roll_under_load(&up, "web", 4, 2, || {
        apply(&up, &service("web", 4, "v2", deploy))
    });
    let b = Bounds {
        replicas: 4,
        max_surge: 0,
        max_unavailable: 1,
        min_ready: Duration::ZERO,
    };
    let seen = assert_zero_downtime(&r, b, "max_surge = 0, max_unavailable = 1");
    assert_eq!(
        seen.min_available, 3,
        "one instance was let go unavailable: {seen:?}"
    );
    assert_versions_after(&r, "v2");
}

#[test]
fn rolling_update_with_percentages_and_min_ready_under_load() {
    // 50 % of 4 rounded up is 2, 25 % of 4 rounded down is 1; a new instance counts as
    // available only after 500 ms of readiness.
    let deploy = r#"deploy = { max_surge = "50%", max_unavailable = "25%", min_ready = "500ms" }"#;
    let up = Up::start(&service("web", 4, "v1", deploy));
    let r = roll_under_load(&up, "web", 4, 2, || {
        apply(&up, &service("web", 4, "v2", deploy))
    });
    let b = Bounds {
        replicas: 4,
        max_surge: 2,
        max_unavailable: 1,
        min_ready: Duration::from_millis(500),
    };
    let seen = assert_zero_downtime(&r, b, "max_surge = 50%, max_unavailable = 25%");
    assert!(seen.max_instances > 4, "the surge was used: {seen:?}");
    assert_versions_after(&r, "v2");
}

#[test]
fn restart_replaces_every_instance_under_load() {
    let up = Up::start(&service("web", 4, "v1", ""));
    up.wait_ready("web", 4);
    let generation = service_object(&up, "web")["metadata"]["generation"].clone();
    let r = roll_under_load(&up, "web", 4, 2, || {
        let out = up.cli(&["restart", "web"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let b = Bounds {
        replicas: 4,
        max_surge: 1,
        max_unavailable: 0,
        min_ready: Duration::ZERO,
    };
    assert_zero_downtime(&r, b, "restart");
    assert_eq!(
        service_object(&up, "web")["metadata"]["generation"],
        generation,
        "a restart does not change the spec"
    );
    let after: Vec<String> = r.after.iter().map(name_of).collect();
    assert!(
        after.iter().all(|n| !r.before.contains(n)),
        "every instance was replaced: {:?} → {after:?}",
        r.before
    );
    assert_eq!(r.service["status"]["updatedReplicas"], 4);
    assert_versions_after(&r, "v1");
}

/// The single instance replaced twenty times in a row under load, as fast as it starts: each
/// replacement stops an instance that was just serving, so requests on their way to it when
/// it is stopped would be lost (they were, before the drain waited for requests in flight:
/// about one run in two of these lost some).
#[test]
fn replacing_the_only_instance_again_and_again_loses_no_request() {
    const ROUNDS: u64 = 20;
    let up = Up::start(&demo("web", 1, "v1", "", ""));
    let (_, first) = wait_complete(&up, "web", 1, 1);
    let old_hash = hash_of(&first[0]);
    let load = start_load(&up, "web");
    let sampler = Sampler::start(&up, "web", Duration::from_millis(25));
    let from = Instant::now();
    let mut replaced = Vec::new();
    for n in 2..2 + ROUNDS {
        apply(&up, &demo("web", 1, &format!("v{n}"), "", ""));
        let (_, now) = wait_complete(&up, "web", n, 1);
        replaced.push(name_of(&now[0]));
    }
    let to = Instant::now();
    let last = replaced.last().cloned().expect("rounds");
    wait_for("the last instance to answer", ROLLOUT, || {
        (load.answers_from(&last) > 0).then_some(())
    });
    let (samples, errors) = sampler.finish();
    let load = load.finish();
    assert!(errors.is_empty(), "the API failed the sampler: {errors:?}");
    load.assert_clean(
        &format!("{ROUNDS} replacements of the only instance"),
        from,
        to,
        MIN_REQUESTS,
    );
    let served = load.by_instance(from, load.ended);
    let unserved: Vec<_> = replaced
        .iter()
        .filter(|n| !served.contains_key(*n))
        .collect();
    assert!(
        unserved.len() <= ROUNDS as usize / 4,
        "most instances served before being replaced; these never did: {unserved:?}"
    );
    let b = Bounds {
        replicas: 1,
        max_surge: 1,
        max_unavailable: 0,
        min_ready: Duration::ZERO,
    };
    let seen = check_bounds(&samples, b, &old_hash, from, to);
    assert_eq!(seen.max_instances, 2, "the surge was used: {seen:?}");
    eprintln!(
        "{ROUNDS} replacements in {:.2}s: {} instances served; {} samples, at most {} instances, at least {} available",
        (to - from).as_secs_f64(),
        served.len(),
        seen.samples,
        seen.max_instances,
        seen.min_available,
    );
}
