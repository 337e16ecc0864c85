//! Following the store: reflectors of services and instances feed the routing table, which is
//! rebuilt ([`RouteTable::build_with`]) on every change, on the shared reconcile runtime, and
//! swapped in with `arc-swap`. A swap
//! first marks unrouted the endpoints the new table leaves out, which is what a drain's
//! [`RoutingView`] relies on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use flotilla_spec::Object;
use flotilla_spec::object::{Instance, Service};
use flotilla_store::Store;
use flotilla_store::StoreError;
use flotilla_store::lock;
use flotilla_store::reconcile::{Backoff, Reconcile, Requeue, Runtime, RuntimeConfig, Trigger};
use flotilla_store::typed::{ObjectMap, Reflector};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::GatewayError;
use crate::error::error_chain;
use crate::table::{Endpoint, RouteConflict, RouteTable, TableState};

/// Read access to the routing table in force and to the requests in flight, for draining.
#[derive(Clone)]
pub struct RoutingView {
    table: Arc<ArcSwap<RouteTable>>,
    state: Arc<TableState>,
}

impl RoutingView {
    pub(crate) fn new(table: Arc<ArcSwap<RouteTable>>, state: Arc<TableState>) -> Self {
        Self { table, state }
    }

    /// Whether any route of the table in force sends new requests to `instance`.
    pub fn routes_to(&self, instance: &str) -> bool {
        self.table
            .load()
            .routes()
            .any(|r| r.endpoints.iter().any(|e| e.instance == instance))
    }

    /// Requests this gateway has in flight to `instance`: being sent, waiting for the answer,
    /// or with a response body (or an upgraded connection) not finished yet.
    pub fn in_flight_to(&self, instance: &str) -> u32 {
        self.state.endpoints.in_flight_to(instance)
    }

    /// Whether `instance` may still get a request from this gateway, or has one to answer: it
    /// is routed, or requests to it are in flight. Once false it stays false until a table
    /// routes to the instance again: a request that matched an older table and has not
    /// reached the instance yet sees it was taken out and goes elsewhere
    /// ([`Endpoint::start_if_routed`]).
    pub fn busy(&self, instance: &str) -> bool {
        // In this order: the table first (an instance taken out of it is marked unrouted before
        // the swap), then the requests in flight.
        self.routes_to(instance) || self.in_flight_to(instance) > 0
    }
}

/// The services and instances the routing table is built from, followed through the store.
pub(crate) struct StoreFollower {
    store: Arc<dyn Store>,
    services: Feed<Service>,
    instances: Feed<Instance>,
}

impl StoreFollower {
    /// Lists services and instances and starts following them. The reflectors are stopped by
    /// [`StoreFollower::run`] at its end, or by their `Drop` if it never runs.
    pub(crate) async fn start(store: Arc<dyn Store>) -> Result<Self, GatewayError> {
        let services = Feed::<Service>::start(store.clone())
            .await
            .map_err(|source| GatewayError::Store {
                action: "list services",
                source,
            })?;
        let instances = Feed::<Instance>::start(store.clone())
            .await
            .map_err(|source| GatewayError::Store {
                action: "list instances",
                source,
            })?;
        Ok(Self {
            store,
            services,
            instances,
        })
    }

    /// A table built from the current maps, which are marked seen: whatever the reflectors
    /// publish from now on reaches the table [`StoreFollower::run`] keeps.
    pub(crate) fn table(&mut self, state: &TableState) -> RouteTable {
        build_table(
            &self.services.take(),
            &self.instances.take(),
            state,
            &mut Vec::new(),
        )
    }

    /// Keeps `table` current until `stop`, on the shared reconcile runtime: one key (the
    /// table), triggered by every publication of either reflector and resynced every
    /// [`RESYNC`]. A reflector that ends is restarted (with backoff) and the table rebuilt
    /// from its first list; the follower never stops following the store before `stop`.
    pub(crate) async fn run(
        self,
        table: Arc<ArcSwap<RouteTable>>,
        state: Arc<TableState>,
        stop: CancellationToken,
    ) {
        let keeper = Arc::new(TableKeeper {
            maps: Mutex::new(Maps {
                services: self.services.rx.clone(),
                instances: self.instances.rx.clone(),
            }),
            table,
            state,
            conflicts: Mutex::new(Vec::new()),
        });
        let runtime = Runtime::new(
            "gateway-table",
            keeper.clone(),
            RuntimeConfig {
                resync: RESYNC,
                concurrency: 1,
                backoff: RESTART_BACKOFF,
            },
        );
        let feeds = tokio::spawn(follow_feeds(
            self.store,
            self.services,
            self.instances,
            keeper,
            runtime.trigger(),
            stop.clone(),
        ));
        runtime.run(stop.clone()).await;
        stop.cancel();
        if let Err(e) = feeds.await {
            tracing::error!(error = %e, "the gateway's store follower failed");
        }
    }
}

/// How often the table is rebuilt even when nothing was published (cheap, and a guard
/// against a publication lost to a bug).
const RESYNC: Duration = Duration::from_secs(30);

/// Between attempts to restart a reflector that ended.
const RESTART_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

/// The one key of the gateway's reconcile: the routing table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RoutingTableKey;

/// The maps the table is built from (replaced when a reflector is restarted).
struct Maps {
    services: watch::Receiver<ObjectMap<Service>>,
    instances: watch::Receiver<ObjectMap<Instance>>,
}

/// Rebuilds and swaps the routing table from the reflectors' current maps.
struct TableKeeper {
    maps: Mutex<Maps>,
    table: Arc<ArcSwap<RouteTable>>,
    state: Arc<TableState>,
    /// The conflicts last logged, so that each is logged when it appears, not per rebuild.
    conflicts: Mutex<Vec<RouteConflict>>,
}

#[async_trait]
impl Reconcile for TableKeeper {
    type Key = RoutingTableKey;
    type Error = std::convert::Infallible;

    async fn reconcile(&self, _key: &RoutingTableKey) -> Result<Requeue, Self::Error> {
        let (services, instances) = {
            let maps = lock(&self.maps);
            (
                maps.services.borrow().clone(),
                maps.instances.borrow().clone(),
            )
        };
        let next = build_table(
            &services,
            &instances,
            &self.state,
            &mut lock(&self.conflicts),
        );
        swap_table(&self.table, next);
        Ok(Requeue::Done)
    }

    async fn keys(&self) -> Result<Vec<RoutingTableKey>, Self::Error> {
        Ok(vec![RoutingTableKey])
    }
}

/// Which feed a notification came from.
enum Changed {
    Services(bool),
    Instances(bool),
}

/// Triggers the table's key on every publication of either reflector, until `stop`. A
/// reflector that ends is restarted (with backoff); the keeper is handed its receiver and the
/// table is rebuilt from its first list.
async fn follow_feeds(
    store: Arc<dyn Store>,
    mut services: Feed<Service>,
    mut instances: Feed<Instance>,
    keeper: Arc<TableKeeper>,
    trigger: Trigger<RoutingTableKey>,
    stop: CancellationToken,
) {
    loop {
        let changed = tokio::select! {
            () = stop.cancelled() => break,
            changed = services.rx.changed() => Changed::Services(changed.is_ok()),
            changed = instances.rx.changed() => Changed::Instances(changed.is_ok()),
        };
        match changed {
            Changed::Services(true) | Changed::Instances(true) => {}
            Changed::Services(false) => match services.restart(&store, &stop).await {
                Some(feed) => {
                    services = feed;
                    lock(&keeper.maps).services = services.rx.clone();
                }
                None => {
                    instances.stop().await;
                    return;
                }
            },
            Changed::Instances(false) => match instances.restart(&store, &stop).await {
                Some(feed) => {
                    instances = feed;
                    lock(&keeper.maps).instances = instances.rx.clone();
                }
                None => {
                    services.stop().await;
                    return;
                }
            },
        }
        trigger.trigger(RoutingTableKey);
    }
    services.stop().await;
    instances.stop().await;
}

/// A reflector the routing table follows, and the receiver it follows it with.
struct Feed<T: Object> {
    reflector: Reflector<T>,
    /// Marked seen at the map the table in force was built from.
    rx: watch::Receiver<ObjectMap<T>>,
}

impl<T: Object> Feed<T> {
    /// Lists the objects and starts following them (until [`Feed::stop`] or drop).
    async fn start(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let reflector = Reflector::<T>::start(store, &CancellationToken::new()).await?;
        let rx = reflector.subscribe();
        Ok(Self { reflector, rx })
    }

    /// The current map, marked seen: every later publication makes `changed` fire.
    fn take(&mut self) -> ObjectMap<T> {
        self.rx.borrow_and_update().clone()
    }

    /// Stops the reflector, logging how it ended if not cleanly.
    async fn stop(self) {
        if let Err(e) = self.reflector.stop().await {
            tracing::warn!(kind = T::KIND, error = %error_chain(&e), "reflector ended with an error");
        }
    }

    /// Replaces a feed whose reflector ended (the store was closed, or the task failed) with a
    /// new one (a full list), retrying with backoff until it starts. `None` if `stop` came first.
    async fn restart(self, store: &Arc<dyn Store>, stop: &CancellationToken) -> Option<Self> {
        tracing::warn!(
            kind = T::KIND,
            "reflector ended while the gateway runs; restarting it (the routing table is not following the store meanwhile)"
        );
        self.stop().await;
        let mut failures = 0u32;
        loop {
            let started = tokio::select! {
                () = stop.cancelled() => return None,
                started = Self::start(store.clone()) => started,
            };
            match started {
                Ok(feed) => {
                    tracing::info!(
                        kind = T::KIND,
                        "reflector restarted; routing table follows the store again"
                    );
                    return Some(feed);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(kind = T::KIND, error = %error_chain(&e), retry_in = ?RESTART_BACKOFF.delay(failures), "cannot restart the reflector");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(RESTART_BACKOFF.delay(failures)) => {}
            }
        }
    }
}

/// Puts `next` in force. Endpoints of the table in force that `next` leaves out are marked
/// unrouted first, so that once the swap is seen (a drain's `routes_to` is false) no request
/// that matched an older table can still start on them ([`Endpoint::start_if_routed`]).
pub(crate) fn swap_table(table: &ArcSwap<RouteTable>, next: RouteTable) {
    let kept: std::collections::HashSet<*const Endpoint> =
        next.endpoints().map(Arc::as_ptr).collect();
    for endpoint in table.load().endpoints() {
        if !kept.contains(&Arc::as_ptr(endpoint)) {
            endpoint.set_unrouted();
        }
    }
    table.store(Arc::new(next));
}

/// Builds a table, logging route conflicts when they differ from `known`.
fn build_table(
    services: &ObjectMap<Service>,
    instances: &ObjectMap<Instance>,
    state: &TableState,
    known: &mut Vec<RouteConflict>,
) -> RouteTable {
    let table = RouteTable::build_with(services.values(), instances.values(), state);
    if table.conflicts() != known.as_slice() {
        for c in table.conflicts() {
            tracing::warn!(
                host = c.host.as_deref().unwrap_or("*"),
                path = %c.path,
                winner = %c.winner,
                loser = %c.loser,
                "two services claim the same route; the first by name gets it"
            );
        }
        *known = table.conflicts().to_vec();
    }
    tracing::debug!(
        routes = table.routes().count(),
        endpoints = table.routes().map(|r| r.endpoints.len()).sum::<usize>(),
        "routing table rebuilt"
    );
    table
}
