//! The cluster as the controller sees it in one pass: which nodes belong to it, which are
//! ready, and the scheduler's view of them ([`crate::schedule`]).
//!
//! - [`Membership::Local`] (`flotilla up`): one machine. Its node is the process itself, so it
//!   is ready while the controller runs; any other node in the store (a store copied from
//!   another machine, `up` restarted under another `--node`) is not part of the cluster.
//! - [`Membership::Fleet`] (`flotilla server`): every registered Node object is a member, ready
//!   while its lease is ([`crate::nodes::readiness`]).

use std::collections::BTreeMap;

use flotilla_spec::{AntiAffinityMode, Instance, Node, Object, Phase, Resources, ServiceSpec};
use flotilla_store::{KeyValue, Store, StoreError};
use std::time::Duration;

use flotilla_store::{LeaseState, Leases};

/// Beyond a singleton's grace period: the agent's kill of what is left in the cgroup.
const FENCE_SLACK: Duration = Duration::from_millis(500);

use crate::schedule::{
    AntiAffinity, Capacity, NodeInfo, Placed, Request, Spread, Taint, Toleration,
};

/// Which nodes make up the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// One machine: this node, alive as long as this process.
    Local(String),
    /// Every registered node, alive while its lease is.
    Fleet,
}

/// One member node.
#[derive(Debug, Clone)]
struct Member {
    ready: bool,
    /// How long its lease has been expired (zero while it holds), and how long it lasts.
    expired_for: std::time::Duration,
    lease: std::time::Duration,
    /// Being drained: its instances are replaced elsewhere.
    draining: bool,
    /// Why it is not ready (the lease's story), for events.
    why: String,
}

/// The members of the cluster at one moment.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    members: BTreeMap<String, Member>,
    /// The scheduler's view of every member.
    pub nodes: Vec<NodeInfo>,
}

impl Cluster {
    pub fn build(membership: &Membership, nodes: &[Node], leases: &Leases) -> Cluster {
        let mut cluster = Cluster::default();
        for node in nodes {
            let name = &node.metadata.name;
            let (ready, why, expired_for, lease) = match membership {
                Membership::Local(local) if local == name => {
                    (true, String::new(), Duration::ZERO, Duration::ZERO)
                }
                Membership::Local(_) => continue,
                Membership::Fleet => {
                    let was_ready = node
                        .status
                        .condition(crate::nodes::READY)
                        .is_some_and(|c| c.status);
                    let state = leases.state(name);
                    let (expired_for, lease) = match state {
                        LeaseState::Held { ago, duration } => {
                            (ago.saturating_sub(duration), duration)
                        }
                        LeaseState::Unknown { since_start, grace } => {
                            (since_start.saturating_sub(grace), grace)
                        }
                    };
                    let r = crate::nodes::readiness(state, was_ready);
                    (r.ready, r.message, expired_for, lease)
                }
            };
            cluster.nodes.push(node_info(node, ready));
            let draining = node.spec.drain;
            cluster.members.insert(
                name.clone(),
                Member {
                    ready,
                    expired_for,
                    lease,
                    draining,
                    why,
                },
            );
        }
        // The local node is a member even before it registered (its instances are not
        // orphans), though nothing is placed on it until it has.
        if let Membership::Local(local) = membership {
            cluster.members.entry(local.clone()).or_insert(Member {
                ready: true,
                expired_for: Duration::ZERO,
                lease: Duration::ZERO,
                draining: false,
                why: String::new(),
            });
        }
        cluster
    }

    /// `node` belongs to the cluster (ready or not).
    pub fn is_member(&self, node: &str) -> bool {
        self.members.contains_key(node)
    }

    /// `node` is a member and ready.
    pub fn is_ready(&self, node: &str) -> bool {
        self.members.get(node).is_some_and(|m| m.ready)
    }

    /// `node` is being drained.
    pub fn is_draining(&self, node: &str) -> bool {
        self.members.get(node).is_some_and(|m| m.draining)
    }

    /// Why member `node` is lost (not ready); `None` when it is ready or not a member.
    pub fn lost(&self, node: &str) -> Option<&str> {
        self.members
            .get(node)
            .filter(|m| !m.ready)
            .map(|m| m.why.as_str())
    }

    /// How long until a singleton's instance on lost node `node` is fenced: its agent stops
    /// singletons once a third of the lease is left without a renewal (on its own clock), in
    /// at most `grace` (the instance's stop grace period) and a little; the control plane
    /// waits that long past the expiry it saw, which comes later than the node's own.
    /// Zero: fenced, the instance may be replaced.
    pub fn fence_wait(&self, node: &str, grace: Duration) -> Duration {
        let Some(m) = self.members.get(node).filter(|m| !m.ready) else {
            return Duration::ZERO;
        };
        let needed = m.lease / 3 + grace + FENCE_SLACK;
        needed.saturating_sub(m.expired_for)
    }

    /// The member names, for messages.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }
}

fn node_info(node: &Node, ready: bool) -> NodeInfo {
    let a = node.status.allocatable;
    let pressure = |kind: &str| node.status.condition(kind).is_some_and(|c| c.status);
    NodeInfo {
        name: node.metadata.name.clone(),
        labels: node.metadata.labels.clone(),
        allocatable: Capacity {
            cpu_millicores: a.cpu_millicores,
            memory_bytes: a.memory_bytes,
            pids: a.pids,
        },
        ready,
        unschedulable: node.spec.unschedulable || node.spec.drain,
        taints: node
            .spec
            .taints
            .iter()
            .map(|t| Taint {
                key: t.key.clone(),
                value: t.value.clone(),
            })
            .collect(),
        memory_pressure: pressure(flotilla_spec::MEMORY_PRESSURE),
        disk_pressure: pressure(flotilla_spec::DISK_PRESSURE),
    }
}

/// What each instance of a service reserves on its node: its resource limits.
pub fn resources(spec: &ServiceSpec) -> Capacity {
    capacity(&spec.resources)
}

fn capacity(r: &Resources) -> Capacity {
    Capacity {
        cpu_millicores: r.cpu.map_or(0, |c| c.0),
        memory_bytes: r.memory.map_or(0, |m| m.0),
        pids: r.pids.unwrap_or(0),
    }
}

/// What an instance of `service` (running `spec`) asks of its node.
pub fn request(service: &str, spec: &ServiceSpec) -> Request {
    let p = &spec.placement;
    Request {
        service: service.to_string(),
        priority: spec.priority,
        instance: String::new(),
        resources: resources(spec),
        host_ports: Vec::new(),
        node_selector: p.node_selector.clone(),
        tolerations: p
            .tolerations
            .iter()
            .map(|t| Toleration {
                key: t.key.clone(),
                value: t.value.clone(),
            })
            .collect(),
        spread: p.spread.as_ref().map(|s| Spread {
            topology_key: s.topology_key.clone(),
            max_skew: s.max_skew,
        }),
        anti_affinity: match p.anti_affinity {
            AntiAffinityMode::Soft => Some(AntiAffinity::Soft),
            AntiAffinityMode::Hard => Some(AntiAffinity::Hard),
            AntiAffinityMode::None => None,
        },
    }
}

/// The few fields of an instance that placement and housekeeping read. Read from the record
/// by [`Summary::decode`] without the rest of the object (the template's command, env,
/// probes…): decoding every instance in full cost a placement pass 30 MB at 10,000 instances.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub name: String,
    pub resource_version: u64,
    pub service: String,
    pub node: String,
    pub nominated_node: Option<String>,
    pub phase: Phase,
    pub deleting: bool,
    pub resources: Capacity,
    pub priority: i32,
}

impl Summary {
    pub fn of(i: &Instance) -> Self {
        Self {
            name: i.metadata.name.clone(),
            resource_version: i.metadata.resource_version,
            service: i.spec.service.clone(),
            node: i.spec.node.clone(),
            nominated_node: i.status.nominated_node.clone(),
            phase: i.status.phase,
            deleting: i.metadata.deletion_timestamp.is_some(),
            resources: capacity(&i.spec.template.resources),
            priority: i.spec.template.priority,
        }
    }

    pub fn decode(kv: &KeyValue) -> Result<Self, StoreError> {
        #[derive(serde::Deserialize)]
        struct Raw {
            #[serde(default)]
            metadata: Meta,
            spec: Spec,
            #[serde(default)]
            status: Status,
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(rename_all = "camelCase")]
        struct Meta {
            #[serde(default)]
            name: String,
            #[serde(default)]
            deletion_timestamp: Option<serde::de::IgnoredAny>,
        }
        #[derive(serde::Deserialize)]
        struct Spec {
            service: String,
            #[serde(default)]
            node: String,
            template: Template,
        }
        #[derive(serde::Deserialize)]
        struct Template {
            #[serde(default)]
            priority: i32,
            #[serde(default)]
            resources: Resources,
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(rename_all = "camelCase")]
        struct Status {
            #[serde(default)]
            phase: Phase,
            #[serde(default)]
            nominated_node: Option<String>,
        }
        let raw: Raw = serde_json::from_slice(&kv.value).map_err(|source| StoreError::Decode {
            key: kv.key.clone(),
            source,
        })?;
        Ok(Self {
            name: raw.metadata.name,
            resource_version: kv.mod_revision,
            service: raw.spec.service,
            node: raw.spec.node,
            nominated_node: raw.status.nominated_node,
            phase: raw.status.phase,
            deleting: raw.metadata.deletion_timestamp.is_some(),
            resources: capacity(&raw.spec.template.resources),
            priority: raw.spec.template.priority,
        })
    }
}

/// Every instance's [`Summary`] and the revision they were read at.
pub async fn summaries(store: &dyn Store) -> Result<(Vec<Summary>, u64), StoreError> {
    let listed = store.list(Instance::PREFIX).await?;
    let all = listed
        .items
        .iter()
        .map(Summary::decode)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((all, listed.revision))
}

/// What an instance holds on its node, if it is bound and may still run; or the room a
/// pending preemptor holds on the node it was nominated to.
pub fn placed(instance: &Summary) -> Option<Placed> {
    if instance.phase.is_terminal() {
        return None;
    }
    let (node, nominated) = match (&instance.node, &instance.nominated_node) {
        (n, _) if !n.is_empty() => (n.clone(), false),
        (_, Some(n)) if !instance.deleting => (n.clone(), true),
        _ => return None,
    };
    Some(Placed {
        node,
        service: instance.service.clone(),
        resources: instance.resources,
        host_ports: Vec::new(),
        instance: instance.name.clone(),
        priority: instance.priority,
        terminating: instance.deleting,
        nominated,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test
    use super::*;

    /// The slim decode reads what the full one does, for every field placement uses.
    #[test]
    fn a_summary_decoded_from_the_record_matches_the_full_instance() {
        let template: ServiceSpec = serde_json::from_value(serde_json::json!({
            "command": "x",
            "priority": 7,
            "resources": {"cpu": "250m", "memory": "64Mi", "pids": 30},
            "env": {"A": "b"},
        }))
        .unwrap();
        let mut i = Instance {
            metadata: flotilla_spec::ObjectMeta::named("web-1"),
            spec: flotilla_spec::InstanceSpec {
                service: "web".into(),
                node: String::new(),
                spec_hash: "h".into(),
                template,
            },
            status: Default::default(),
        };
        i.status.nominated_node = Some("n2".into());
        i.status.phase = Phase::Running;
        for deleting in [false, true] {
            i.metadata.deletion_timestamp = deleting.then(|| "2026-01-01T00:00:00Z".into());
            let kv = KeyValue {
                key: Instance::key_for("web-1"),
                value: serde_json::to_vec(&i).unwrap(),
                create_revision: 3,
                mod_revision: 9,
                version: 2,
            };
            let mut expected = Summary::of(&i);
            expected.resource_version = 9;
            let decoded = Summary::decode(&kv).unwrap();
            assert_eq!(decoded, expected);
            assert_eq!(decoded.resources.cpu_millicores, 250);
            assert_eq!(decoded.resources.memory_bytes, 64 << 20);
            assert_eq!(decoded.priority, 7);
            assert_eq!(
                placed(&decoded).map(|p| p.nominated),
                (!deleting).then_some(true)
            );
        }
        let bad = KeyValue {
            key: "/instances/x".into(),
            value: b"{".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
        };
        assert!(
            Summary::decode(&bad)
                .unwrap_err()
                .to_string()
                .contains("/instances/x")
        );
    }
}
