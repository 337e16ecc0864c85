//! `POST /api/v1/tokens` (admin: a join or gateway token), `POST /api/v1/join` (a join
//! token's holder gets a node credential), `POST /api/v1/nodes/{node}/credential` (a node
//! renews its credential before it expires). See [`crate::auth`].

use std::time::{Duration, SystemTime};

use axum::Extension;
use flotilla_spec::Node;
use flotilla_store::LeaseState;

use crate::auth::{Principal, Signer, TokenKind};

use super::*;

/// How long a node credential lasts; its agent renews it at half of that.
pub const NODE_CREDENTIAL_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest join token.
const MAX_JOIN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest gateway token.
const MAX_GATEWAY_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenRequest {
    /// `join` or `gateway`.
    kind: String,
    /// `1h`, `30m`, `7d`.
    ttl: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct IssuedToken {
    token: String,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    expires_at: String,
}

fn signer(state: &ApiState) -> ApiResult<&Signer> {
    state.signer.as_deref().ok_or_else(|| {
        ApiError::bad_request(
            "this control plane issues no tokens (only the admin token is accepted)",
        )
    })
}

fn issued(
    kind: &'static str,
    node: Option<String>,
    token: String,
    expires: SystemTime,
) -> IssuedToken {
    IssuedToken {
        token,
        kind,
        node,
        expires_at: humantime::format_rfc3339_seconds(expires).to_string(),
    }
}

/// `POST /api/v1/tokens`: the admin creates a join or gateway token.
pub(super) async fn create_token(
    State(state): State<ApiState>,
    body: Bytes,
) -> ApiResult<Json<IssuedToken>> {
    let req: TokenRequest = json_body(&body)?;
    let ttl = humantime::parse_duration(&req.ttl).map_err(|e| {
        ApiError::bad_request(format!("invalid ttl {:?}: {e}", req.ttl)).with_field("ttl")
    })?;
    let (kind, name, max) = match req.kind.as_str() {
        "join" => (TokenKind::Join, "join", MAX_JOIN_TTL),
        "gateway" => (TokenKind::Gateway, "gateway", MAX_GATEWAY_TTL),
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown token kind {other:?}: expected \"join\" or \"gateway\""
            ))
            .with_field("kind"));
        }
    };
    if ttl.is_zero() || ttl > max {
        return Err(ApiError::bad_request(format!(
            "ttl must be between 1s and {} for a {name} token",
            humantime::format_duration(max)
        ))
        .with_field("ttl"));
    }
    let id: u64 = rand::random();
    let (token, expires) =
        signer(&state)?.issue(kind, &format!("{id:016x}"), ttl, SystemTime::now());
    tracing::info!(kind = name, ttl = %humantime::format_duration(ttl), "token issued");
    Ok(Json(issued(name, None, token, expires)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JoinRequest {
    node: String,
}

/// `POST /api/v1/join`: a join token's holder becomes node `node` (a credential for it). A
/// name whose node is alive (its lease held) is refused: a join token does not let its
/// holder take over a running node.
pub(super) async fn join(
    State(state): State<ApiState>,
    body: Bytes,
) -> ApiResult<Json<IssuedToken>> {
    let req: JoinRequest = json_body(&body)?;
    flotilla_spec::validate::validate_name(&req.node).map_err(|e| {
        ApiError::bad_request(format!("invalid node name {:?}: {e}", req.node)).with_field("node")
    })?;
    let live = matches!(state.leases.state(&req.node), LeaseState::Held { .. })
        && !state.leases.state(&req.node).left().is_zero();
    if live
        && typed::get::<Node>(&*state.store, &req.node)
            .await?
            .is_some()
    {
        return Err(ApiError::conflict(format!(
            "node {} is a live member of the cluster; join under another name, or once it is NotReady",
            req.node
        ))
        .with_field("node"));
    }
    let (token, expires) = signer(&state)?.issue(
        TokenKind::Node,
        &req.node,
        NODE_CREDENTIAL_TTL,
        SystemTime::now(),
    );
    tracing::info!(node = %req.node, "node joined with a join token");
    Ok(Json(issued("node", Some(req.node), token, expires)))
}

/// `POST /api/v1/nodes/{node}/credential`: a fresh credential for the node (its own, or the
/// admin's call).
pub(super) async fn renew_credential(
    State(state): State<ApiState>,
    Path(node): Path<String>,
    Extension(principal): Extension<Principal>,
) -> ApiResult<Json<IssuedToken>> {
    match &principal {
        Principal::Admin => {}
        Principal::Node(own) if *own == node => {}
        _ => return Err(ApiError::forbidden(format!("not node {node}'s credential"))),
    }
    let (token, expires) = signer(&state)?.issue(
        TokenKind::Node,
        &node,
        NODE_CREDENTIAL_TTL,
        SystemTime::now(),
    );
    Ok(Json(issued("node", Some(node), token, expires)))
}
