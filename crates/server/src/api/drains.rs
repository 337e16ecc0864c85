//! Draining across machines ([`crate::drains`]): `POST /api/v1/nodes/{node}/instances/{name}/drain`
//! for the agent about to stop an instance; `GET` and `POST /api/v1/gateways/drains` for the
//! gateways that confirm they no longer route to it.

use std::time::Duration;

use axum::Extension;

use crate::auth::Principal;
use crate::drains::Outcome;

use super::*;

/// The longest a drain or a gateway's poll may wait.
const MAX_WAIT: Duration = Duration::from_secs(30);

fn wait_of(query: &BTreeMap<String, String>, name: &str, default: Duration) -> ApiResult<Duration> {
    match query.get(name) {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text)
            .map(|d| d.min(MAX_WAIT))
            .map_err(|e| {
                ApiError::bad_request(format!("invalid {name} {text:?}: {e}")).with_field(name)
            }),
    }
}

/// `POST /api/v1/nodes/{node}/instances/{name}/drain?timeout=2s`: once every live gateway
/// confirmed the instance unrouted (or at the timeout, naming the rest).
pub(super) async fn drain_instance(
    State(state): State<ApiState>,
    Path((node, name)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
) -> ApiResult<Json<Outcome>> {
    let timeout = wait_of(&query, "timeout", Duration::from_secs(2))?;
    let bound = typed::get::<Instance>(&*state.store, &name)
        .await?
        .is_some_and(|i| i.spec.node == node);
    if !bound {
        return Err(ApiError::not_found(format!(
            "instance {name} not found on node {node}"
        )));
    }
    Ok(Json(state.drains.drain(&name, timeout).await))
}

fn gateway_name(principal: &Principal) -> ApiResult<&str> {
    match principal {
        Principal::Gateway(name) => Ok(name),
        _ => Err(ApiError::forbidden(
            "only a gateway (with its certificate) takes part in draining",
        )),
    }
}

#[derive(Debug, Serialize)]
pub(super) struct Pending {
    instances: Vec<String>,
}

/// `GET /api/v1/gateways/drains?wait=10s`: the instances this gateway is to confirm.
pub(super) async fn poll_drains(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<BTreeMap<String, String>>,
) -> ApiResult<Json<Pending>> {
    let gateway = gateway_name(&principal)?;
    let wait = wait_of(&query, "wait", Duration::from_secs(10))?;
    let instances = state.drains.poll(gateway, wait, &state.shutdown).await;
    Ok(Json(Pending { instances }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Confirmation {
    confirmed: Vec<String>,
}

/// `POST /api/v1/gateways/drains` `{confirmed: [...]}`: no longer routed, nothing in flight.
pub(super) async fn confirm_drains(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let gateway = gateway_name(&principal)?;
    let c: Confirmation = json_body(&body)?;
    state.drains.confirm(gateway, &c.confirmed);
    Ok(StatusCode::NO_CONTENT)
}
