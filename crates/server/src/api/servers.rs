//! `GET /api/v1/servers`: the servers of the control plane, which one leads, and the health of
//! the store they share, as the answering server sees them.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::ApiState;
use crate::error::ApiResult;

/// Store key prefix of the servers' presence records (each bound to its server's etcd lease).
pub const SERVERS: &str = "servers/";
/// Store key of the leader's election (its value: the leader's [`ServerRecord`]).
pub const LEADER: &str = "leader";

/// One server, as it describes itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServerRecord {
    pub name: String,
    /// Its API's URL.
    pub api: String,
    pub version: String,
    /// When it started (RFC 3339).
    pub started_at: String,
}

/// What the servers share, for `GET /api/v1/servers`.
#[derive(Clone)]
pub enum ControlPlane {
    /// One server on its embedded store (`up`, or `server` without etcd).
    Single { me: ServerRecord, store: String },
    /// Servers sharing an etcd cluster; one leads.
    Etcd {
        me: ServerRecord,
        store: Arc<flotilla_store::EtcdStore>,
        /// Trusts the cluster CA: to ask the other servers whether they answer.
        peers: Arc<flotilla_pki::rustls::ClientConfig>,
    },
}

/// How long another server may take to answer `GET /healthz` for `get servers`.
const PEER_PROBE: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether the server at `api` answers `GET /healthz` within [`PEER_PROBE`].
async fn answers(api: &str, tls: Arc<flotilla_pki::rustls::ClientConfig>) -> bool {
    use http_body_util::Empty;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<hyper::body::Bytes>>(flotilla_pki::Connector::new(Some(tls)));
    let Ok(uri) = format!("{}/healthz", api.trim_end_matches('/')).parse::<hyper::Uri>() else {
        return false;
    };
    matches!(
        tokio::time::timeout(PEER_PROBE, client.get(uri)).await,
        Ok(Ok(r)) if r.status().is_success()
    )
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ServerView {
    #[serde(flatten)]
    record: ServerRecord,
    leader: bool,
    /// The server that answered this request.
    answering: bool,
    /// Whether it answered the answering server just now (not said of the answering one).
    #[serde(skip_serializing_if = "Option::is_none")]
    reachable: Option<bool>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct StoreView {
    kind: &'static str,
    /// The file (embedded) or the endpoints (etcd).
    location: String,
    healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    members: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ServersAnswer {
    items: Vec<ServerView>,
    store: StoreView,
}

pub(super) async fn list_servers(State(state): State<ApiState>) -> ApiResult<Json<ServersAnswer>> {
    let Some(plane) = state.control_plane.clone() else {
        return Ok(Json(ServersAnswer {
            items: Vec::new(),
            store: StoreView {
                kind: "embedded",
                location: String::new(),
                healthy: true,
                error: None,
                members: Vec::new(),
            },
        }));
    };
    Ok(Json(match plane {
        ControlPlane::Single { me, store } => ServersAnswer {
            items: vec![ServerView {
                record: me,
                leader: true,
                answering: true,
                reachable: None,
            }],
            store: StoreView {
                kind: "embedded",
                location: store,
                healthy: true,
                error: None,
                members: Vec::new(),
            },
        },
        ControlPlane::Etcd { me, store, peers } => etcd_view(&me, &store, &peers).await,
    }))
}

async fn etcd_view(
    me: &ServerRecord,
    store: &flotilla_store::EtcdStore,
    peers: &Arc<flotilla_pki::rustls::ClientConfig>,
) -> ServersAnswer {
    use flotilla_store::Store;
    let mut error = None;
    let leader = match store.holder(LEADER).await {
        Ok(l) => l.and_then(|(v, _)| serde_json::from_str::<ServerRecord>(&v).ok()),
        Err(e) => {
            error = Some(flotilla_store::error_chain(&e));
            None
        }
    };
    let mut records: Vec<ServerRecord> = match store.list(SERVERS).await {
        Ok(list) => list
            .items
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect(),
        Err(e) => {
            error.get_or_insert(flotilla_store::error_chain(&e));
            Vec::new()
        }
    };
    if !records.iter().any(|r| r.name == me.name) {
        records.push(me.clone());
    }
    records.sort_by(|a, b| a.name.cmp(&b.name));
    // A server killed a moment ago keeps its record until its lease ends: ask each.
    let reachable = futures::future::join_all(records.iter().map(|r| {
        let (api, tls, mine) = (r.api.clone(), peers.clone(), r.name == me.name);
        async move { (!mine).then_some(answers(&api, tls).await) }
    }))
    .await;
    let members = match store.members().await {
        Ok(m) => m,
        Err(e) => {
            error.get_or_insert(flotilla_store::error_chain(&e));
            Vec::new()
        }
    };
    let answering = members.iter().filter(|m| m.healthy).count();
    let quorum = answering * 2 > members.len();
    if !quorum && !members.is_empty() {
        error.get_or_insert(format!(
            "no quorum: {answering} of {} members answer; writes fail until a majority is back",
            members.len()
        ));
    }
    ServersAnswer {
        items: records
            .into_iter()
            .zip(reachable)
            .map(|(r, reachable)| ServerView {
                leader: leader.as_ref().is_some_and(|l| l.name == r.name),
                answering: r.name == me.name,
                reachable,
                record: r,
            })
            .collect(),
        store: StoreView {
            kind: "etcd",
            location: store.endpoints().to_string(),
            healthy: error.is_none() && quorum,
            error,
            members: members
                .iter()
                .filter_map(|m| serde_json::to_value(m).ok())
                .collect(),
        },
    }
}
