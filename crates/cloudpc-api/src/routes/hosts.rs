//! `/cloudpc/hosts`: the hypervisor hosts (a cloudpc extension), join tokens, and the join call
//! that host agents make.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use uuid::Uuid;

use cloudpc_agent::protocol::JoinRequest;
use cloudpc_control::App;
use cloudpc_types::hosts::{Host, HostUpdate, JoinToken, JoinTokenCreate};

use super::Reply;
use crate::auth::require_admin;
use crate::extract::{ApiJson, ApiPath};
use crate::odata::{Collection, GraphRequest};
use crate::Caller;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/hosts", get(list))
        .route("/hosts/joinTokens", post(create_join_token))
        .route("/hosts/{id}", get(read).patch(update).delete(remove))
        .route("/hosts/{id}/evacuate", post(evacuate))
}

/// The one route without a bearer token: a new host's agent proves itself with its join token.
pub fn agent_routes() -> Router<App> {
    Router::new().route("/agent/join", post(join))
}

fn host_id(id: &str) -> Result<Uuid, crate::ApiError> {
    // Like every other id: one that cannot exist is simply not found.
    Uuid::parse_str(id)
        .map_err(|_| crate::ApiError::new(StatusCode::NOT_FOUND, "NotFound", format!("host '{id}' does not exist")))
}

#[utoipa::path(get, path = "/cloudpc/hosts", tag = "hosts", operation_id = "list_hosts", responses((status = 200, body = Collection<Host>)))]
pub async fn list(State(app): State<App>, _caller: Caller, g: GraphRequest) -> Reply {
    g.page("hosts", app.list_hosts().await?)
}

#[utoipa::path(get, path = "/cloudpc/hosts/{id}", tag = "hosts", operation_id = "get_host", responses((status = 200, body = Host)))]
pub async fn read(State(app): State<App>, _caller: Caller, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.entity("hosts", &app.get_host(host_id(&id)?).await?, StatusCode::OK)
}

/// Sets the host's state: `ready`, `maintenance` (no new Cloud PCs) or `draining`.
#[utoipa::path(patch, path = "/cloudpc/hosts/{id}", tag = "hosts", operation_id = "update_host", request_body = HostUpdate, responses((status = 200, body = Host)))]
pub async fn update(
    State(app): State<App>,
    caller: Caller,
    g: GraphRequest,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<HostUpdate>,
) -> Reply {
    require_admin(&caller)?;
    g.entity("hosts", &app.set_host_state(&caller.0, host_id(&id)?, input.state.into()).await?, StatusCode::OK)
}

/// Removes a host that has no Cloud PCs left.
#[utoipa::path(delete, path = "/cloudpc/hosts/{id}", tag = "hosts", operation_id = "delete_host", responses((status = 204), (status = 409, description = "the host still has Cloud PCs, or is configured in the server's settings")))]
pub async fn remove(State(app): State<App>, caller: Caller, ApiPath(id): ApiPath<String>) -> Reply {
    require_admin(&caller)?;
    app.delete_host(&caller.0, host_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /cloudpc/hosts/{id}/evacuate`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvacuateRequest {
    /// Must be true: the Cloud PCs are recreated from their images and their users' data is lost.
    #[serde(default)]
    pub confirm_data_loss: bool,
}

/// The Cloud PCs being recreated elsewhere.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Evacuated {
    pub value: Vec<Uuid>,
}

/// Recreates the Cloud PCs of an unreachable host on other hosts of its region.
#[utoipa::path(post, path = "/cloudpc/hosts/{id}/evacuate", tag = "hosts", operation_id = "evacuate_host", request_body = EvacuateRequest, responses((status = 200, body = Evacuated), (status = 409, description = "the host is reachable: drain it instead")))]
pub async fn evacuate(
    State(app): State<App>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<EvacuateRequest>,
) -> Reply {
    require_admin(&caller)?;
    let moved = app.evacuate_host(&caller.0, host_id(&id)?, input.confirm_data_loss).await?;
    Ok(Json(Evacuated { value: moved }).into_response())
}

/// A short-lived, single-use token for one new host of the region; its secret is shown once.
#[utoipa::path(post, path = "/cloudpc/hosts/joinTokens", tag = "hosts", operation_id = "create_join_token", request_body = JoinTokenCreate, responses((status = 201, body = JoinToken)))]
pub async fn create_join_token(
    State(app): State<App>,
    caller: Caller,
    g: GraphRequest,
    ApiJson(input): ApiJson<JoinTokenCreate>,
) -> Reply {
    require_admin(&caller)?;
    g.entity("joinTokens", &app.create_join_token(&caller.0, input).await?, StatusCode::CREATED)
}

/// `POST /cloudpc/agent/join`: the agent's certificate request, signed if its token is good.
pub async fn join(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<JoinRequest>,
) -> Reply {
    Ok((StatusCode::CREATED, Json(app.join_host(req, Some(peer.ip().to_string())).await?)).into_response())
}
