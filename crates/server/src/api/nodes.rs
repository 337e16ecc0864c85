//! `/api/v1/nodes/{node}/…`: the node interface over HTTP, for agents on other machines. Each
//! handler runs the same [`StoreNode`] rules as an in-process agent: a node sees and writes only
//! its own instances, writes only their status, and deletes only what the controller marked.

use flotilla_spec::{EventType, InstanceStatus};
use flotilla_store::{NodeApi, NodeError, StoreNode};

use super::*;

fn node_api(state: &ApiState, node: &str) -> StoreNode {
    StoreNode::new(state.store.clone(), node)
}

impl From<NodeError> for ApiError {
    fn from(error: NodeError) -> Self {
        let message = error.to_string();
        match error {
            NodeError::NotFound { .. } => ApiError::not_found(message),
            NodeError::NotDeleting { .. } => ApiError::conflict(message),
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
