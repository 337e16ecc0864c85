//! `POST /api/v1/tokens` (admin: a join or gateway token), `POST /api/v1/join` (a join
//! token's holder gets a node certificate), `POST /api/v1/nodes/{node}/credential` (a node
//! renews its certificate before it expires), `POST /api/v1/gateways/credential` (the same for
//! gateways). See [`crate::auth`].

use std::time::{Duration, SystemTime};

use axum::Extension;
use flotilla_spec::Node;
use flotilla_store::LeaseState;

use crate::auth::{Principal, Signer, TokenKind};

use super::*;

/// How long a node or gateway certificate lasts by default; its holder renews it at half of
/// that.
pub const MEMBER_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
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
    expires_at: String,
}

fn signer(state: &ApiState) -> ApiResult<&Signer> {
    state.signer.as_deref().ok_or_else(|| {
        ApiError::bad_request(
            "this control plane issues no tokens (only the admin token is accepted)",
        )
    })
}

fn issued(kind: &'static str, token: String, expires: SystemTime) -> IssuedToken {
    IssuedToken {
        token,
        kind,
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
    let pin = authority(&state)?.pin();
    let subject = crate::auth::bootstrap_subject(rand::random(), &pin);
    let (token, expires) = signer(&state)?.issue(kind, &subject, ttl, SystemTime::now());
    tracing::info!(kind = name, ttl = %humantime::format_duration(ttl), "token issued");
    Ok(Json(issued(name, token, expires)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JoinRequest {
    node: String,
    /// A PEM certificate signing request for the node's key.
    csr: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CsrRequest {
    csr: String,
}

/// A member certificate: PEM, with the CA that signed it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct IssuedCertificate {
    kind: &'static str,
    name: String,
    certificate: String,
    ca: String,
    expires_at: String,
}

fn authority(state: &ApiState) -> ApiResult<&flotilla_pki::Authority> {
    state.authority.as_deref().ok_or_else(|| {
        ApiError::bad_request(
            "this control plane has no cluster CA (flotilla up serves its API on loopback only): run `flotilla server` for a fleet",
        )
    })
}

fn certify(
    state: &ApiState,
    csr: &str,
    role: flotilla_pki::Role,
    name: &str,
) -> ApiResult<IssuedCertificate> {
    let ca = authority(state)?;
    let who = flotilla_pki::Identity {
        role,
        name: name.to_string(),
    };
    let (certificate, expires) = ca
        .sign(csr, &who, state.member_ttl)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_field("csr"))?;
    Ok(IssuedCertificate {
        kind: match role {
            flotilla_pki::Role::Node => "node",
            flotilla_pki::Role::Gateway => "gateway",
        },
        name: name.to_string(),
        certificate,
        ca: ca.cert_pem().to_string(),
        expires_at: humantime::format_rfc3339_seconds(expires).to_string(),
    })
}

/// `POST /api/v1/join`: a join token's holder becomes node `node` (a certificate for it). A
/// name whose node is alive (its lease held) is refused: a join token does not let its
/// holder take over a running node.
pub(super) async fn join(
    State(state): State<ApiState>,
    body: Bytes,
) -> ApiResult<Json<IssuedCertificate>> {
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
    let issued = certify(&state, &req.csr, flotilla_pki::Role::Node, &req.node)?;
    tracing::info!(node = %req.node, "node joined with a join token");
    Ok(Json(issued))
}

/// `POST /api/v1/nodes/{node}/credential`: a fresh certificate for the node (its own, or the
/// admin's call), for the key of the request.
pub(super) async fn renew_credential(
    State(state): State<ApiState>,
    Path(node): Path<String>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> ApiResult<Json<IssuedCertificate>> {
    match &principal {
        Principal::Admin => {}
        Principal::Node(own) if *own == node => {}
        _ => return Err(ApiError::forbidden(format!("not node {node}'s credential"))),
    }
    let req: CsrRequest = json_body(&body)?;
    Ok(Json(certify(
        &state,
        &req.csr,
        flotilla_pki::Role::Node,
        &node,
    )?))
}

/// `POST /api/v1/gateways/credential`: a gateway certificate, for a gateway token (named
/// `gateway-<its id>`) or a gateway renewing its own.
pub(super) async fn gateway_credential(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> ApiResult<Json<IssuedCertificate>> {
    let name = match &principal {
        Principal::GatewayToken(subject) => {
            let id = subject.split('-').next().unwrap_or_default();
            format!("gateway-{id}")
        }
        Principal::Gateway(name) => name.clone(),
        _ => {
            return Err(ApiError::forbidden(
                "only a gateway token or a gateway certificate gets a gateway certificate",
            ));
        }
    };
    let req: CsrRequest = json_body(&body)?;
    let issued = certify(&state, &req.csr, flotilla_pki::Role::Gateway, &name)?;
    tracing::info!(gateway = %name, "gateway certificate issued");
    Ok(Json(issued))
}
