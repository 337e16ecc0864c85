//! Domain operations: apply, delete, rollback, pause, resume and restart of services. Every
//! front door (the HTTP API, `flotilla up -f`, later the Kubernetes-compatible API and the
//! dashboard) calls these, and this is where authorization and admission hook in. They return
//! a typed [`OpError`]; each front door maps it to its own responses.

use std::collections::BTreeMap;

use flotilla_spec::{
    EventType, Object, ObjectMeta, Revision as ServiceRevision, Service, ServiceSpec, annotations,
};
use flotilla_store::{Store, StoreError, events, typed};
use serde::{Deserialize, Serialize};

use crate::error::FieldProblem;

/// Read-modify-write attempts of a write without a resourceVersion from the caller.
const ATTEMPTS: usize = 16;

/// A short random pause between attempts, so contending writers spread out.
async fn backoff() {
    use rand::Rng;
    let ms = rand::rng().random_range(1..=5);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

/// Why an operation did not happen. Nothing was written when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The object does not exist; `known` lists the names that do (for "did you mean").
    #[error("{}", not_found_message(kind, name, known))]
    NotFound {
        kind: &'static str,
        name: String,
        known: Vec<String>,
    },
    /// The request contradicts the stored state (a stale resourceVersion, nothing to undo).
    #[error("{message}")]
    Conflict {
        message: String,
        field: Option<String>,
    },
    /// The request is invalid; every problem found, each with its field path.
    #[error("invalid service: {}", summary(problems))]
    Invalid { problems: Vec<FieldProblem> },
    /// The store failed (logged by the front door; never shown to clients in detail).
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type OpResult<T> = Result<T, OpError>;

impl OpError {
    pub fn conflict(message: impl Into<String>) -> Self {
        OpError::Conflict {
            message: message.into(),
            field: None,
        }
    }
    fn conflict_on(message: impl Into<String>, field: &str) -> Self {
        OpError::Conflict {
            message: message.into(),
            field: Some(field.to_string()),
        }
    }
}

fn summary(problems: &[FieldProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `service helo not found (did you mean hello?)`, or the names that exist.
fn not_found_message(kind: &str, name: &str, known: &[String]) -> String {
    let mut message = format!("{kind} {name} not found");
    if let Some(close) = flotilla_spec::suggest(name, known) {
        message.push_str(&format!(" (did you mean {close}?)"));
    } else if known.is_empty() {
        message.push_str(&format!(" (there are no {kind}s)"));
    } else {
        const SHOWN: usize = 10;
        let mut list = known
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if known.len() > SHOWN {
            list.push_str(&format!(", … {} more", known.len() - SHOWN));
        }
        message.push_str(&format!(" ({kind}s: {list})"));
    }
    message
}

/// The not-found error for object `name` of kind `T`, listing the names that exist.
pub async fn not_found<T: Object>(store: &dyn Store, name: &str) -> OpError {
    let known = match typed::list::<T>(store).await {
        Ok((items, _)) => items
            .into_iter()
            .map(|o| o.metadata().name.clone())
            .collect(),
        Err(_) => Vec::new(),
    };
    OpError::NotFound {
        kind: kind_word(T::KIND),
        name: name.to_string(),
        known,
    }
}

fn kind_word(kind: &str) -> &'static str {
    match kind {
        "Service" => "service",
        "Instance" => "instance",
        "Event" => "event",
        "Revision" => "revision",
        "Node" => "node",
        _ => "object",
    }
}

/// The stored service `name`, or a not-found error naming the ones that exist.
pub async fn get_service(store: &dyn Store, name: &str) -> OpResult<Service> {
    get_named::<Service>(store, name).await
}

/// The stored object `name` of kind `T`, or a not-found error naming the ones that exist.
pub async fn get_named<T: Object>(store: &dyn Store, name: &str) -> OpResult<T> {
    match typed::get::<T>(store, name).await? {
        Some(o) => Ok(o),
        None => Err(not_found::<T>(store, name).await),
    }
}

#[derive(Debug, Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ApplyResult {
    Created,
    Configured,
    Unchanged,
}

/// A service to create or update.
#[derive(Debug, Clone)]
pub struct ApplyRequest {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// When set (non-zero), the apply only succeeds if the stored object has this version.
    pub resource_version: Option<u64>,
    pub spec: ServiceSpec,
}

impl ApplyRequest {
    pub fn new(name: impl Into<String>, spec: ServiceSpec) -> Self {
        Self {
            name: name.into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            resource_version: None,
            spec,
        }
    }
}

/// The change cause a revision records for an apply from `source`: `rollout history` tells a
/// deploy from `up`'s file apart from one made through the API.
fn apply_cause(source: &str) -> &'static str {
    if source == "up" { "up -f" } else { "apply" }
}

/// Validates and stores a service: the one path for the API and for `flotilla up`'s file.
/// An apply that changes nothing writes nothing.
pub async fn apply(
    store: &dyn Store,
    request: ApplyRequest,
    source: &str,
) -> OpResult<(ApplyResult, Service)> {
    let ApplyRequest {
        name,
        labels,
        annotations,
        resource_version,
        spec,
    } = request;

    let mut problems: Vec<FieldProblem> = flotilla_spec::validate_name(&name)
        .err()
        .into_iter()
        .map(|message| FieldProblem {
            field: "metadata.name".to_string(),
            message,
        })
        .collect();
    problems.extend(
        flotilla_spec::validate_spec(&spec)
            .into_iter()
            .map(|e| FieldProblem {
                field: format!("spec.{}", e.path),
                message: e.message,
            }),
    );
    if !problems.is_empty() {
        return Err(OpError::Invalid { problems });
    }

    let version_given = resource_version.filter(|v| *v != 0);
    for attempt in 0..ATTEMPTS {
        // A first conflict is most often the controller's status write landing between our
        // read and our write: read again at once. Later ones are applies racing: back off.
        let pause = || async move {
            if attempt > 0 {
                backoff().await;
            }
        };
        // The first attempt reads the service from the nearest etcd member (no round to the
        // leader): a stale read fails the compare-and-swap, and an outcome that writes nothing
        // is confirmed on a fresh read before it is answered.
        let recent = attempt == 0;
        let current = if recent {
            typed::get_recent::<Service>(store, &name).await?
        } else {
            typed::get::<Service>(store, &name).await?
        };
        // An apply that claims a route this service does not hold yet checks it against every
        // other service's, and its write holds only if no service changed since that check
        // (a guarded write: one store transaction, on any number of servers). Applies that
        // claim nothing new are plain compare-and-swaps and run side by side.
        let claims_new = spec.routes.iter().any(|route| {
            current
                .as_ref()
                .is_none_or(|c| !c.spec.routes.contains(route))
        });
        let checked_at = if claims_new {
            Some(check_routes(store, &name, &spec).await?)
        } else {
            None
        };
        // The service and its `Applied` event: one transaction.
        let write = |service: Service| async move {
            let event = applied_event(&service, source);
            typed::write_with_event(store, service, checked_at, event).await
        };
        match current {
            None => {
                if version_given.is_some() {
                    if recent {
                        continue;
                    }
                    return Err(OpError::conflict_on(
                        format!("service {name} does not exist (resourceVersion given)"),
                        "metadata.resourceVersion",
                    ));
                }
                let mut metadata = ObjectMeta::named(&name);
                metadata.labels = labels.clone();
                metadata.annotations = annotations.clone();
                metadata
                    .annotations
                    .retain(|k, _| !k.starts_with(annotations::PREFIX));
                metadata.annotations.insert(
                    annotations::CHANGE_CAUSE.to_string(),
                    apply_cause(source).to_string(),
                );
                let service = Service {
                    metadata,
                    spec: spec.clone(),
                    status: Default::default(),
                };
                let created = match write(service).await {
                    Ok(s) => s,
                    // Created concurrently (read it and apply over it), or another service
                    // changed since the route check (check again).
                    Err(e) if e.is_conflict() => {
                        pause().await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                return Ok((ApplyResult::Created, created));
            }
            Some(mut current) => {
                if let Some(rv) = version_given
                    && rv != current.metadata.resource_version
                {
                    if recent {
                        continue;
                    }
                    return Err(OpError::conflict_on(
                        format!(
                            "service {name} is at resourceVersion {}, not {rv}; read it again and retry",
                            current.metadata.resource_version
                        ),
                        "metadata.resourceVersion",
                    ));
                }
                let (spec, labels, annotations) =
                    (spec.clone(), labels.clone(), annotations.clone());
                let spec_changed = current.spec != spec;
                // Annotations flotilla manages (pause, restart token, change cause) are kept: the
                // user's file does not know them.
                let mut annotations = annotations;
                annotations.retain(|k, _| !k.starts_with(annotations::PREFIX));
                for (k, v) in &current.metadata.annotations {
                    if k.starts_with(annotations::PREFIX) {
                        annotations.insert(k.clone(), v.clone());
                    }
                }
                if !spec_changed
                    && current.metadata.labels == labels
                    && current.metadata.annotations == annotations
                {
                    if recent {
                        continue;
                    }
                    return Ok((ApplyResult::Unchanged, current));
                }
                if spec_changed {
                    current.metadata.generation += 1;
                    annotations.insert(
                        annotations::CHANGE_CAUSE.to_string(),
                        apply_cause(source).to_string(),
                    );
                }
                current.spec = spec;
                current.metadata.labels = labels;
                current.metadata.annotations = annotations;
                // Compare-and-swap on the version we read. Without a resourceVersion from the
                // client, a concurrent write (the controller's status, say) only means "read
                // again"; with one, the client asked to fail.
                let updated = match write(current).await {
                    Ok(u) => u,
                    // Another service changed since the route check: check again.
                    Err(StoreError::Changed { .. }) => continue,
                    Err(StoreError::Conflict { .. }) if version_given.is_none() => {
                        pause().await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                return Ok((ApplyResult::Configured, updated));
            }
        }
    }
    Err(OpError::conflict(format!(
        "service {name} kept changing while it was applied; try again"
    )))
}

/// Checks `spec`'s routes against every other stored service's: the revision the services
/// were read at, or every clash (with its field path).
async fn check_routes(
    store: &dyn Store,
    name: &str,
    spec: &ServiceSpec,
) -> OpResult<flotilla_store::Revision> {
    let (others, revision) = typed::list::<Service>(store).await?;
    let mut all: Vec<(&str, &ServiceSpec)> = others
        .iter()
        .filter(|s| s.metadata.name != name)
        .map(|s| (s.metadata.name.as_str(), &s.spec))
        .collect();
    all.push((name, spec));
    let clashes: Vec<FieldProblem> = flotilla_spec::validate_routes_across(&all)
        .into_iter()
        .filter(|c| c.service == name)
        .map(|c| {
            let e = c.to_field_error();
            FieldProblem {
                field: format!("spec.{}", e.path),
                message: e.message,
            }
        })
        .collect();
    if clashes.is_empty() {
        Ok(revision)
    } else {
        Err(OpError::Invalid { problems: clashes })
    }
}

/// Records the event of a stored apply and hands back its result.
/// The event an apply writes with the service: created (not stored yet) or configured.
fn applied_event(service: &Service, source: &str) -> flotilla_spec::Event {
    let (what, generation) = match service.metadata.resource_version {
        0 => ("created", 1),
        _ => ("configured", service.metadata.generation),
    };
    events::new(
        Service::KIND,
        &service.metadata.name,
        EventType::Normal,
        "Applied",
        format!("service {what} (generation {generation})"),
        source,
    )
}

/// Deletes a service; the controller stops its instances gracefully.
pub async fn delete_service(store: &dyn Store, name: &str, source: &str) -> OpResult<Service> {
    let Some(deleted) = typed::delete::<Service>(store, name, None).await? else {
        return Err(not_found::<Service>(store, name).await);
    };
    events::record(
        store,
        Service::KIND,
        name,
        EventType::Normal,
        "Deleted",
        "service deleted; its instances are stopping",
        source,
    )
    .await;
    Ok(deleted)
}

/// The service's revisions, oldest first.
pub async fn revisions_of(store: &dyn Store, name: &str) -> OpResult<Vec<ServiceRevision>> {
    let (all, _) = typed::list::<ServiceRevision>(store).await?;
    let mut mine: Vec<ServiceRevision> =
        all.into_iter().filter(|r| r.spec.service == name).collect();
    mine.sort_by_key(|r| r.spec.number);
    Ok(mine)
}

/// `rollout undo`: the service's spec becomes that of an earlier revision (the previous one,
/// or `to_revision`); the controller records it as a new revision. A concurrent write (the
/// controller's status) is retried, not reported.
pub async fn rollback(
    store: &dyn Store,
    name: &str,
    to_revision: Option<u64>,
    source: &str,
) -> OpResult<Service> {
    for _ in 0..ATTEMPTS {
        let service = get_service(store, name).await?;
        let history = revisions_of(store, name).await?;
        let current = service.status.revision;
        let target = match to_revision {
            Some(n) => history.iter().find(|r| r.spec.number == n).ok_or_else(|| {
                let known: Vec<String> =
                    history.iter().map(|r| r.spec.number.to_string()).collect();
                OpError::NotFound {
                    kind: "revision",
                    name: format!("{n} of service {name}"),
                    known,
                }
            })?,
            None => history
                .iter()
                .rev()
                .find(|r| r.spec.number < current)
                .ok_or_else(|| {
                    OpError::conflict(format!(
                        "service {name} has no revision before {current} to go back to"
                    ))
                })?,
        };
        if target.spec.template_hash == crate::rollout::target_hash(&service) {
            return Err(OpError::conflict(format!(
                "service {name} already runs the spec of revision {}",
                target.spec.number
            )));
        }
        let number = target.spec.number;
        let mut updated = service.clone();
        crate::controller::restore_template(
            &mut updated,
            &target.spec.template,
            target.spec.restart_token.as_deref(),
            &format!("rollback to revision {number}"),
        );
        match typed::update(store, updated).await {
            Ok(updated) => {
                events::record(
                    store,
                    Service::KIND,
                    name,
                    EventType::Normal,
                    "RollbackRequested",
                    format!("returning to the spec of revision {number}"),
                    source,
                )
                .await;
                return Ok(updated);
            }
            Err(e) if e.is_conflict() => backoff().await,
            Err(e) => return Err(e.into()),
        }
    }
    Err(OpError::conflict(format!(
        "service {name} kept changing during the rollback; try again"
    )))
}

/// Sets or clears a flotilla-managed annotation with compare-and-swap; returns the service.
async fn set_annotation(
    store: &dyn Store,
    name: &str,
    key: &str,
    value: Option<String>,
    cause: Option<&str>,
) -> OpResult<Service> {
    let updated = typed::modify::<Service>(store, name, |s| {
        let ann = &mut s.metadata.annotations;
        let before = ann.clone();
        match &value {
            Some(v) => {
                ann.insert(key.to_string(), v.clone());
            }
            None => {
                ann.remove(key);
            }
        }
        if let Some(c) = cause {
            ann.insert(annotations::CHANGE_CAUSE.to_string(), c.to_string());
        }
        *ann != before
    })
    .await?;
    match updated {
        Some(s) => Ok(s),
        None => get_service(store, name).await,
    }
}

/// `rollout pause`: nothing is started or stopped for the rollout until [`resume`].
pub async fn pause(store: &dyn Store, name: &str) -> OpResult<Service> {
    get_service(store, name).await?;
    set_annotation(store, name, annotations::PAUSED, Some("true".into()), None).await
}

/// `rollout resume`.
pub async fn resume(store: &dyn Store, name: &str) -> OpResult<Service> {
    get_service(store, name).await?;
    set_annotation(store, name, annotations::PAUSED, None, None).await
}

/// A rolling restart: new instances of the same spec, one revision later.
pub async fn restart(store: &dyn Store, name: &str, source: &str) -> OpResult<Service> {
    get_service(store, name).await?;
    let token = flotilla_spec::now_rfc3339();
    let s = set_annotation(
        store,
        name,
        annotations::RESTARTED_AT,
        Some(token),
        Some("restart"),
    )
    .await?;
    events::record(
        store,
        Service::KIND,
        name,
        EventType::Normal,
        "RestartRequested",
        "rolling restart requested",
        source,
    )
    .await;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_store::{EmbeddedStore, KeyValue, ListResult, Precondition, Put, Revision, Watch};
    use std::sync::Mutex;

    /// The embedded store, except that `get_recent` answers what a lagging replica would:
    /// the key as it was when `freeze` was called.
    struct Lagging {
        inner: EmbeddedStore,
        frozen: Mutex<std::collections::HashMap<String, Option<KeyValue>>>,
    }

    impl Lagging {
        async fn freeze(&self, key: &str) {
            let now = self.inner.get(key).await.unwrap();
            self.frozen.lock().unwrap().insert(key.to_string(), now);
        }
    }

    #[async_trait::async_trait]
    impl Store for Lagging {
        async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
            self.inner.get(key).await
        }
        async fn get_recent(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
            let frozen = self.frozen.lock().unwrap().get(key).cloned();
            match frozen {
                Some(then) => Ok(then),
                None => self.inner.get(key).await,
            }
        }
        async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
            self.inner.list(prefix).await
        }
        async fn put(
            &self,
            key: &str,
            value: Vec<u8>,
            pre: Precondition,
        ) -> Result<KeyValue, StoreError> {
            self.inner.put(key, value, pre).await
        }
        async fn commit(
            &self,
            puts: Vec<Put>,
            guard: Option<(&str, Revision)>,
        ) -> Result<Vec<KeyValue>, StoreError> {
            self.inner.commit(puts, guard).await
        }
        async fn delete(
            &self,
            key: &str,
            pre: Precondition,
        ) -> Result<Option<KeyValue>, StoreError> {
            self.inner.delete(key, pre).await
        }
        async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
            self.inner.watch(prefix, after).await
        }
        fn revision(&self) -> Revision {
            self.inner.revision()
        }
    }

    fn spec(command: &str) -> ServiceSpec {
        serde_json::from_value(serde_json::json!({ "command": command, "replicas": 0 })).unwrap()
    }

    /// An apply reads from the nearest replica first; a stale answer must never decide an
    /// outcome that writes nothing (A, B, then A again on a replica that still has A).
    #[tokio::test]
    async fn a_stale_replica_never_makes_an_apply_unchanged_or_conflicting() {
        let dir = tempfile::tempdir().unwrap();
        let store = Lagging {
            inner: EmbeddedStore::open(&dir.path().join("store.redb")).unwrap(),
            frozen: Mutex::default(),
        };
        let key = Service::key_for("web");
        let (result, _) = apply(&store, ApplyRequest::new("web", spec("/bin/a")), "api")
            .await
            .unwrap();
        assert_eq!(result, ApplyResult::Created);
        store.freeze(&key).await;
        let (result, b) = apply(&store, ApplyRequest::new("web", spec("/bin/b")), "api")
            .await
            .unwrap();
        assert_eq!(result, ApplyResult::Configured);
        // The replica still says /bin/a: the apply of /bin/a is not "unchanged".
        let (result, a) = apply(&store, ApplyRequest::new("web", spec("/bin/a")), "api")
            .await
            .unwrap();
        assert_eq!(result, ApplyResult::Configured);
        assert_eq!(a.spec.command, "/bin/a");
        let stored = typed::get::<Service>(&store, "web").await.unwrap().unwrap();
        assert_eq!(stored.spec.command, "/bin/a");
        // The resourceVersion the client holds is checked against the fresh one.
        let mut request = ApplyRequest::new("web", spec("/bin/c"));
        request.resource_version = Some(a.metadata.resource_version);
        let (result, _) = apply(&store, request, "api").await.unwrap();
        assert_eq!(result, ApplyResult::Configured);
        let mut request = ApplyRequest::new("web", spec("/bin/d"));
        request.resource_version = Some(b.metadata.resource_version);
        assert!(matches!(
            apply(&store, request, "api").await,
            Err(OpError::Conflict { .. })
        ));
        // Absent on the replica, present in truth: a resourceVersion given still applies.
        store.freeze(&Service::key_for("new")).await;
        apply(&store, ApplyRequest::new("new", spec("/bin/a")), "api")
            .await
            .unwrap();
        let fresh = typed::get::<Service>(&store, "new").await.unwrap().unwrap();
        let mut request = ApplyRequest::new("new", spec("/bin/b"));
        request.resource_version = Some(fresh.metadata.resource_version);
        let (result, _) = apply(&store, request, "api").await.unwrap();
        assert_eq!(result, ApplyResult::Configured);
    }

    #[test]
    fn not_found_names_the_closest_or_the_existing() {
        let known = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            not_found_message("service", "helo", &known(&["hello", "web"])),
            "service helo not found (did you mean hello?)"
        );
        assert_eq!(
            not_found_message("service", "nope", &known(&["hello", "web"])),
            "service nope not found (services: hello, web)"
        );
        assert_eq!(
            not_found_message("service", "nope", &[]),
            "service nope not found (there are no services)"
        );
        let many: Vec<String> = (0..12).map(|i| format!("svc{i:02}x")).collect();
        assert!(not_found_message("service", "zzzzzz", &many).ends_with(", … 2 more)"));
    }
}
