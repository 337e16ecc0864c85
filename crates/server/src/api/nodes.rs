//! `/api/v1/nodes/{node}/…`: the node interface over HTTP, for agents on other machines. Each
//! handler runs the same [`StoreNode`] rules as an in-process agent: a node sees and writes only
//! its own instances, writes only their status, and deletes only what the controller marked.

use flotilla_spec::{EventType, InstanceStatus, Node};
use flotilla_store::{LeaseState, NodeApi, NodeError, Registration, StoreNode};

use super::*;

pub(super) fn node_api(state: &ApiState, node: &str) -> StoreNode {
    StoreNode::new(state.store.clone(), state.leases.clone(), node)
        .with_watches(state.node_watches.clone())
}

impl From<NodeError> for ApiError {
    fn from(error: NodeError) -> Self {
        let message = error.to_string();
        match error {
            NodeError::NotFound { .. } => ApiError::not_found(message),
            NodeError::NotDeleting { .. } => ApiError::conflict(message),
            NodeError::NotNodeCondition { .. } => {
                ApiError::bad_request(message).with_field("conditions")
            }
            NodeError::Conflict { .. } => ApiError::conflict(message).with_field("resourceVersion"),
            NodeError::Store(e) => e.into(),
        }
    }
}

pub(super) async fn node_instances(
    State(state): State<ApiState>,
    Path(node): Path<String>,
) -> ApiResult<Json<List<Instance>>> {
    let (items, rev) = node_api(&state, &node).list().await?;
    Ok(Json(List {
        items,
        resource_version: rev,
    }))
}

pub(super) async fn node_instance(
    State(state): State<ApiState>,
    Path((node, name)): Path<(String, String)>,
) -> ApiResult<Json<Instance>> {
    let api = node_api(&state, &node);
    match api.get(&name).await? {
        Some(i) => Ok(Json(i)),
        None => Err(NodeError::NotFound {
            instance: name,
            node,
        }
        .into()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct StatusWrite {
    resource_version: Revision,
    status: InstanceStatus,
}

pub(super) async fn put_status(
    State(state): State<ApiState>,
    Path((node, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Instance>> {
    let write: StatusWrite = json_body(&body)?;
    let api = node_api(&state, &node);
    Ok(Json(
        api.replace_status(&name, write.resource_version, write.status)
            .await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventWrite {
    #[serde(rename = "type")]
    kind: EventType,
    reason: String,
    message: String,
}

/// Longest reason and message an agent may record.
const MAX_REASON: usize = 64;
const MAX_MESSAGE: usize = 4096;

pub(super) async fn post_event(
    State(state): State<ApiState>,
    Path((node, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let event: EventWrite = json_body(&body)?;
    if event.reason.is_empty() || event.reason.len() > MAX_REASON {
        return Err(
            ApiError::invalid(format!("reason must be 1 to {MAX_REASON} bytes"))
                .with_field("reason"),
        );
    }
    if event.message.len() > MAX_MESSAGE {
        return Err(
            ApiError::invalid(format!("message must be at most {MAX_MESSAGE} bytes"))
                .with_field("message"),
        );
    }
    let api = node_api(&state, &node);
    if api.get(&name).await?.is_none() {
        return Err(NodeError::NotFound {
            instance: name,
            node,
        }
        .into());
    }
    api.record_event(&name, event.kind, &event.reason, &event.message)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn finish_deletion(
    State(state): State<ApiState>,
    Path((node, name)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let api = node_api(&state, &node);
    if api.finish_deletion(&name).await? {
        Ok(Json(serde_json::json!({ "deleted": name })))
    } else {
        Err(NodeError::NotFound {
            instance: name,
            node,
        }
        .into())
    }
}

/// A node as the API shows it: the object and its heartbeat as this control plane saw it
/// (held in memory, never stored).
#[derive(Debug, Serialize)]
pub(super) struct NodeView {
    #[serde(flatten)]
    node: Node,
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat: Option<Heartbeat>,
}

/// The last heartbeat of a node.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Heartbeat {
    /// Milliseconds since the last lease renewal reached this control plane.
    age_millis: u64,
    /// The lease lasts this long from each renewal.
    lease_seconds: u64,
}

fn view(state: &ApiState, node: Node) -> NodeView {
    let heartbeat = match state.leases.state(&node.metadata.name) {
        LeaseState::Held { ago, duration } => Some(Heartbeat {
            age_millis: u64::try_from(ago.as_millis()).unwrap_or(u64::MAX),
            lease_seconds: duration.as_secs(),
        }),
        LeaseState::Unknown { .. } => None,
    };
    NodeView { node, heartbeat }
}

/// `GET /api/v1/nodes`: every registered node with its last heartbeat.
pub(super) async fn list_nodes(State(state): State<ApiState>) -> ApiResult<Json<List<NodeView>>> {
    let (nodes, rev) = typed::list::<Node>(&*state.store).await?;
    let items = nodes.into_iter().map(|n| view(&state, n)).collect();
    Ok(Json(List {
        items,
        resource_version: rev,
    }))
}

/// `GET /api/v1/nodes/{node}`.
pub(super) async fn get_node(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<NodeView>> {
    let node = operations::get_named::<Node>(&*state.store, &name).await?;
    Ok(Json(view(&state, node)))
}

/// `PUT /api/v1/nodes/{node}/registration`: an agent registers its node.
pub(super) async fn put_registration(
    State(state): State<ApiState>,
    Path(node): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let registration: Registration = json_body(&body)?;
    if registration.lease_seconds > 3600 {
        return Err(
            ApiError::bad_request("leaseSeconds must be at most 3600").with_field("leaseSeconds")
        );
    }
    node_api(&state, &node).register(registration).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct LeaseWrite {
    duration_seconds: u32,
}

/// `PUT /api/v1/nodes/{node}/lease`: an agent's heartbeat.
pub(super) async fn put_lease(
    State(state): State<ApiState>,
    Path(node): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let write: LeaseWrite = json_body(&body)?;
    if write.duration_seconds == 0 || write.duration_seconds > 3600 {
        return Err(
            ApiError::bad_request("durationSeconds must be between 1 and 3600")
                .with_field("durationSeconds"),
        );
    }
    node_api(&state, &node)
        .renew_lease(write.duration_seconds)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConditionsWrite {
    conditions: Vec<flotilla_spec::NodeCondition>,
}

/// `PUT /api/v1/nodes/{node}/conditions`: the agent's own conditions (memory and disk
/// pressure), sent when they change.
pub(super) async fn put_conditions(
    State(state): State<ApiState>,
    Path(node): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let write: ConditionsWrite = json_body(&body)?;
    if write.conditions.len() > 8 {
        return Err(ApiError::bad_request("at most 8 conditions").with_field("conditions"));
    }
    node_api(&state, &node)
        .report_conditions(write.conditions)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What `cordon`, `uncordon` and `drain` do to a node's spec.
fn set_schedulable(spec: &mut flotilla_spec::NodeSpec, action: &str) -> bool {
    let before = spec.clone();
    match action {
        "cordon" => spec.unschedulable = true,
        "drain" => {
            spec.unschedulable = true;
            spec.drain = true;
        }
        _ => {
            spec.unschedulable = false;
            spec.drain = false;
        }
    }
    *spec != before
}

async fn steer(state: &ApiState, name: &str, action: &str) -> ApiResult<Json<NodeView>> {
    operations::get_named::<Node>(&*state.store, name).await?;
    let node = typed::modify::<Node>(&*state.store, name, |n| {
        set_schedulable(&mut n.spec, action)
    })
    .await?;
    let node = match node {
        Some(n) => n,
        None => operations::get_named::<Node>(&*state.store, name).await?,
    };
    tracing::info!(node = %name, action, "node steered");
    Ok(Json(view(state, node)))
}

/// `POST /api/v1/nodes/{node}/cordon`: no new instance is placed on it.
pub(super) async fn cordon(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<NodeView>> {
    steer(&state, &name, "cordon").await
}

/// `POST /api/v1/nodes/{node}/uncordon`: placements resume (and a drain stops).
pub(super) async fn uncordon(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<NodeView>> {
    steer(&state, &name, "uncordon").await
}

/// `POST /api/v1/nodes/{node}/drain`: cordoned, and its instances replaced elsewhere within
/// each service's max_unavailable.
pub(super) async fn drain(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<NodeView>> {
    steer(&state, &name, "drain").await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TaintsWrite {
    taints: Vec<flotilla_spec::NodeTaint>,
}

/// `PUT /api/v1/nodes/{node}/taints`: replaces the node's taints (`{"taints": [{key, value}]}`).
pub(super) async fn put_taints(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<NodeView>> {
    let write: TaintsWrite = json_body(&body)?;
    for (i, t) in write.taints.iter().enumerate() {
        if t.key.trim().is_empty() || t.key.contains(char::is_whitespace) {
            return Err(
                ApiError::bad_request(format!("invalid taint key {:?}", t.key))
                    .with_field(format!("taints[{i}].key")),
            );
        }
    }
    operations::get_named::<Node>(&*state.store, &name).await?;
    let taints = write.taints;
    let node = typed::modify::<Node>(&*state.store, &name, |n| {
        if n.spec.taints == taints {
            return false;
        }
        n.spec.taints = taints.clone();
        true
    })
    .await?;
    let node = match node {
        Some(n) => n,
        None => operations::get_named::<Node>(&*state.store, &name).await?,
    };
    Ok(Json(view(&state, node)))
}
