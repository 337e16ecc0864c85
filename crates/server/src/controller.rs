//! The service controller: watches services and instances, runs `plan`, executes the actions.
//!
//! Level-triggered: any change (or the periodic resync) reconciles every service against a
//! fresh list from the store, so a missed or coalesced notification loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use flotilla_spec::{
    EventType, Instance, InstanceSpec, Object, ObjectMeta, Phase, Service, now_rfc3339,
};
use flotilla_store::{Store, StoreError, typed};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::plan::{Action, plan};
use flotilla_store::events;

const SOURCE: &str = "controller";
/// Reconcile everything at least this often, even without notifications.
const RESYNC: Duration = Duration::from_secs(10);
/// Prune old events this often.
const EVENT_GC: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone)]
struct Metrics {
    instances: Family<PhaseLabels, Gauge>,
    reconciles: Counter,
    reconcile_errors: Counter,
}

pub struct ServiceController {
    store: Arc<dyn Store>,
    node: String,
    metrics: Metrics,
}

const PHASES: [Phase; 8] = [
    Phase::Pending,
    Phase::Starting,
    Phase::Running,
    Phase::Backoff,
    Phase::CrashLoopBackOff,
    Phase::Stopping,
    Phase::Succeeded,
    Phase::Failed,
];

impl ServiceController {
    /// `node` is where new instances are bound until a scheduler exists.
    pub fn new(store: Arc<dyn Store>, node: impl Into<String>, registry: &mut Registry) -> Self {
        let metrics = Metrics {
            instances: Family::default(),
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
        };
        registry.register(
            "flotilla_instances",
            "Instances by phase",
            metrics.instances.clone(),
        );
        registry.register(
            "flotilla_controller_reconciles",
            "Reconcile passes of the service controller",
            metrics.reconciles.clone(),
        );
        registry.register(
            "flotilla_controller_reconcile_errors",
            "Reconcile passes that hit an error (retried)",
            metrics.reconcile_errors.clone(),
        );
        Self {
            store,
            node: node.into(),
            metrics,
        }
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last_gc = tokio::time::Instant::now();
        'rewatch: loop {
            let rev = self.store.revision();
            let watches = tokio::try_join!(
                self.store.watch(Service::PREFIX, rev),
                self.store.watch(Instance::PREFIX, rev)
            );
            let (mut services, mut instances) = match watches {
                Ok(w) => w,
                Err(error) => {
                    tracing::warn!(%error, "controller could not watch; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue 'rewatch,
                    }
                }
            };
            loop {
                self.reconcile_all_logged().await;
                if last_gc.elapsed() >= EVENT_GC {
                    last_gc = tokio::time::Instant::now();
                    if let Err(error) = events::prune(&*self.store, events::MAX_EVENTS).await {
                        tracing::warn!(%error, "event pruning failed");
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    ev = services.next() => if !matches!(ev, Some(Ok(_))) { continue 'rewatch },
                    ev = instances.next() => if !matches!(ev, Some(Ok(_))) { continue 'rewatch },
                    _ = tokio::time::sleep(RESYNC) => {}
                }
                // Coalesce a burst of changes into one pass.
                while let Ok(ev) = services.rx.try_recv() {
                    if ev.is_err() {
                        continue 'rewatch;
                    }
                }
                while let Ok(ev) = instances.rx.try_recv() {
                    if ev.is_err() {
                        continue 'rewatch;
                    }
                }
            }
        }
    }

    async fn reconcile_all_logged(&self) {
        self.metrics.reconciles.inc();
        if let Err(error) = self.reconcile_all().await {
            self.metrics.reconcile_errors.inc();
            tracing::warn!(%error, "reconcile failed; will retry");
        }
    }

    /// One pass over every service. Public for tests.
    pub async fn reconcile_all(&self) -> Result<(), StoreError> {
        let (services, _) = typed::list::<Service>(&*self.store).await?;
        let (instances, _) = typed::list::<Instance>(&*self.store).await?;

        let mut by_service: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
        for i in &instances {
            by_service.entry(&i.spec.service).or_default().push(i);
        }
        let services_by_name: BTreeMap<&str, &Service> = services
            .iter()
            .map(|s| (s.metadata.name.as_str(), s))
            .collect();
        let names: BTreeSet<&str> = services_by_name
            .keys()
            .copied()
            .chain(by_service.keys().copied())
            .collect();

        let mut first_error = None;
        for name in names {
            let service = services_by_name.get(name).copied();
            let owned = by_service.get(name).map(Vec::as_slice).unwrap_or(&[]);
            for action in plan(name, service, owned) {
                if let Err(error) = self.execute(service, action).await {
                    tracing::warn!(service = name, %error, "action failed");
                    first_error.get_or_insert(error);
                }
            }
            if let Some(service) = service
                && let Err(error) = self.update_status(service, owned).await
            {
                first_error.get_or_insert(error);
            }
        }

        for phase in PHASES {
            let n = instances.iter().filter(|i| i.status.phase == phase).count();
            self.metrics
                .instances
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str().to_string(),
                })
                .set(n as i64);
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn execute(&self, service: Option<&Service>, action: Action) -> Result<(), StoreError> {
        match action {
            Action::Create {
                service: name,
                spec_hash,
            } => {
                let Some(service) = service else {
                    return Ok(());
                };
                let instance_name = format!("{name}-{}", random_suffix());
                let mut metadata = ObjectMeta::named(&instance_name);
                metadata
                    .labels
                    .insert("flotilla.dev/service".to_string(), name.clone());
                let instance = Instance {
                    metadata,
                    spec: InstanceSpec {
                        service: name.clone(),
                        node: self.node.clone(),
                        spec_hash,
                        template: service.spec.clone(),
                    },
                    status: Default::default(),
                };
                typed::create(&*self.store, instance).await?;
                events::record(
                    &*self.store,
                    Service::KIND,
                    &name,
                    EventType::Normal,
                    "Created",
                    format!("created instance {instance_name}"),
                    SOURCE,
                )
                .await;
            }
            Action::Delete { instance, reason } => {
                let marked = typed::modify::<Instance>(&*self.store, &instance, |i| {
                    if i.metadata.deletion_timestamp.is_some() {
                        return false;
                    }
                    i.metadata.deletion_timestamp = Some(now_rfc3339());
                    true
                })
                .await?;
                if let Some(i) = marked {
                    events::record(
                        &*self.store,
                        Service::KIND,
                        &i.spec.service,
                        EventType::Normal,
                        "Deleting",
                        format!("deleting instance {instance}: {}", reason.as_str()),
                        SOURCE,
                    )
                    .await;
                }
            }
        }
        Ok(())
    }

    async fn update_status(
        &self,
        service: &Service,
        owned: &[&Instance],
    ) -> Result<(), StoreError> {
        let live: Vec<&&Instance> = owned
            .iter()
            .filter(|i| i.metadata.deletion_timestamp.is_none() && !i.status.phase.is_terminal())
            .collect();
        let replicas = live.len() as u32;
        let ready = live.iter().filter(|i| i.is_routable()).count() as u32;
        let generation = service.metadata.generation;
        let hash = flotilla_spec::spec_hash(&service.spec);
        typed::modify::<Service>(&*self.store, &service.metadata.name, |s| {
            // The spec may have moved on since our list; only report on what we looked at.
            if s.metadata.generation != generation {
                return false;
            }
            let st = &mut s.status;
            if st.observed_generation == generation
                && st.replicas == replicas
                && st.ready_replicas == ready
                && st.spec_hash == hash
            {
                return false;
            }
            st.observed_generation = generation;
            st.replicas = replicas;
            st.ready_replicas = ready;
            st.spec_hash = hash.clone();
            true
        })
        .await?;
        Ok(())
    }
}

/// Five characters of `[a-z0-9]`, as instance name suffixes.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}
