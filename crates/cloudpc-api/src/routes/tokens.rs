//! `/cloudpc/tokens`: cloudpc's own API for bearer tokens (Graph has no equivalent). Admins only.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use cloudpc_control::App;
use cloudpc_types::auth::{ApiToken, ApiTokenCreate, ApiTokenCreated};

use super::Reply;
use crate::auth::require_admin;
use crate::extract::ApiJson;
use crate::odata::{Collection, GraphRequest};
use crate::Caller;

pub fn routes() -> Router<App> {
    Router::new().route("/tokens", get(list).post(create))
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
