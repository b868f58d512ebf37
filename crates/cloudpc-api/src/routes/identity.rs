//! `/cloudpc/identityProviders`: the organisation's identity providers (a cloudpc extension; in
//! Microsoft's world this is Entra ID itself). Readers may read them (they hold no secrets);
//! changes and SCIM tokens need Cloud PC Administrator.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;

use cloudpc_control::App;
use cloudpc_types::identity::{IdentityProvider, IdentityProviderCreate, IdentityProviderUpdate, ScimTokenCreated};

use super::Reply;
use crate::auth::require_admin;
use crate::extract::{ApiJson, ApiPath};
use crate::odata::{Collection, GraphRequest};
use crate::Caller;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/identityProviders", get(list).post(create))
        .route("/identityProviders/{id}", get(read).patch(update).delete(remove))
        .route("/identityProviders/{id}/scimToken", post(scim_token))
}

#[utoipa::path(get, path = "/cloudpc/identityProviders", tag = "identity", operation_id = "list_identity_providers", responses((status = 200, body = Collection<IdentityProvider>)))]
pub async fn list(State(app): State<App>, _caller: Caller, g: GraphRequest) -> Reply {
    g.page("identityProviders", app.list_identity_providers().await?)
}

#[utoipa::path(get, path = "/cloudpc/identityProviders/{id}", tag = "identity", operation_id = "get_identity_provider", responses((status = 200, body = IdentityProvider)))]
pub async fn read(State(app): State<App>, _caller: Caller, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.entity("identityProviders", &app.get_identity_provider(&id).await?, StatusCode::OK)
}

/// Connects an identity provider: its OpenID Connect client and the groups that grant roles.
#[utoipa::path(post, path = "/cloudpc/identityProviders", tag = "identity", operation_id = "create_identity_provider", request_body = IdentityProviderCreate, responses((status = 201, body = IdentityProvider), (status = 409, description = "a provider with that name exists")))]
pub async fn create(
    State(app): State<App>,
    caller: Caller,
    g: GraphRequest,
    ApiJson(input): ApiJson<IdentityProviderCreate>,
) -> Reply {
    require_admin(&caller)?;
    g.entity("identityProviders", &app.create_identity_provider(&caller.0, input).await?, StatusCode::CREATED)
}

#[utoipa::path(patch, path = "/cloudpc/identityProviders/{id}", tag = "identity", operation_id = "update_identity_provider", request_body = IdentityProviderUpdate, responses((status = 200, body = IdentityProvider), (status = 409, description = "a provider with that name exists, or the provider changed meanwhile")))]
pub async fn update(
    State(app): State<App>,
    caller: Caller,
    g: GraphRequest,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<IdentityProviderUpdate>,
) -> Reply {
    require_admin(&caller)?;
    g.entity("identityProviders", &app.update_identity_provider(&caller.0, &id, input).await?, StatusCode::OK)
}

/// Disconnects a provider that manages no users or groups any more.
#[utoipa::path(delete, path = "/cloudpc/identityProviders/{id}", tag = "identity", operation_id = "delete_identity_provider", responses((status = 204), (status = 409, description = "the provider still manages users or groups")))]
pub async fn remove(State(app): State<App>, caller: Caller, ApiPath(id): ApiPath<String>) -> Reply {
    require_admin(&caller)?;
    app.delete_identity_provider(&caller.0, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Issues the provider's SCIM bearer token (shown once; an earlier one stops working).
#[utoipa::path(post, path = "/cloudpc/identityProviders/{id}/scimToken", tag = "identity", operation_id = "create_scim_token", responses((status = 201, body = ScimTokenCreated)))]
pub async fn scim_token(State(app): State<App>, caller: Caller, ApiPath(id): ApiPath<String>) -> Reply {
    require_admin(&caller)?;
    Ok((StatusCode::CREATED, axum::Json(app.create_scim_token(&caller.0, &id).await?)).into_response())
}
