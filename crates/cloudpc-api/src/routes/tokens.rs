//! `/cloudpc/tokens`: cloudpc's own API for bearer tokens (Graph has no equivalent). Admins only.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use cloudpc_control::App;
use cloudpc_types::auth::{ApiToken, ApiTokenCreate, ApiTokenCreated};

use super::Reply;
use crate::auth::require_admin;
use crate::extract::{ApiJson, ApiPath};
use crate::odata::{Collection, GraphRequest};
use crate::Caller;

pub fn routes() -> Router<App> {
    Router::new().route("/tokens", get(list).post(create)).route("/tokens/{id}", get(read).delete(revoke))
}

#[utoipa::path(get, path = "/cloudpc/tokens/{id}", tag = "access", operation_id = "get_token", responses((status = 200, body = ApiToken)))]
pub async fn read(State(app): State<App>, caller: Caller, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    require_admin(&caller)?;
    g.entity("tokens", &app.get_token(&id).await?, StatusCode::OK)
}

/// Revokes a token: requests that carry it are refused from now on.
#[utoipa::path(delete, path = "/cloudpc/tokens/{id}", tag = "access", operation_id = "revoke_token", responses((status = 204), (status = 409, description = "the last administrator token cannot be revoked")))]
pub async fn revoke(State(app): State<App>, caller: Caller, ApiPath(id): ApiPath<String>) -> Reply {
    require_admin(&caller)?;
    app.revoke_token(&caller.0, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/cloudpc/tokens", tag = "access", operation_id = "list_tokens", responses((status = 200, body = Collection<ApiToken>)))]
pub async fn list(State(app): State<App>, caller: Caller, g: GraphRequest) -> Reply {
    require_admin(&caller)?;
    g.page("tokens", app.list_tokens().await?)
}

/// Creates a token; the answer holds its secret, which is never shown again.
#[utoipa::path(post, path = "/cloudpc/tokens", tag = "access", operation_id = "create_token", request_body = ApiTokenCreate, responses((status = 201, body = ApiTokenCreated)))]
pub async fn create(
    State(app): State<App>,
    caller: Caller,
    g: GraphRequest,
    ApiJson(input): ApiJson<ApiTokenCreate>,
) -> Reply {
    require_admin(&caller)?;
    g.entity("tokens", &app.create_token(&caller.0, input).await?, StatusCode::CREATED)
}
