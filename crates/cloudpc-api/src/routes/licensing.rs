//! `/subscribedSkus`, `assignLicense` and `licenseDetails`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;

use cloudpc_control::App;
use cloudpc_types::licensing::{AssignLicenseRequest, LicenseDetails, SkuCreate, SkuUpdate, SubscribedSku};

use super::{no_content, Reply};
use crate::extract::{ApiJson, ApiPath};
use crate::odata::{Collection, GraphRequest};
use crate::Caller;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/subscribedSkus", get(list_skus).post(create_sku))
        .route("/subscribedSkus/{id}", get(get_sku).patch(update_sku).delete(delete_sku))
        .route("/users/{id}/assignLicense", post(assign_user_license))
        .route("/users/{id}/licenseDetails", get(license_details))
        .route("/groups/{id}/assignLicense", post(assign_group_license))
        .route("/groups/{id}/assignedLicenses", get(group_licenses))
}

#[utoipa::path(get, path = "/v1.0/subscribedSkus", tag = "licensing", responses((status = 200, body = Collection<SubscribedSku>)))]
pub async fn list_skus(State(app): State<App>, g: GraphRequest) -> Reply {
    g.page("subscribedSkus", app.list_skus().await?)
}

#[utoipa::path(post, path = "/v1.0/subscribedSkus", tag = "licensing", request_body = SkuCreate, responses((status = 201, body = SubscribedSku), (status = 409, description = "A SKU with this skuPartNumber exists.")))]
pub async fn create_sku(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiJson(input): ApiJson<SkuCreate>,
) -> Reply {
    g.entity("subscribedSkus", &app.create_sku(&actor, input).await?, StatusCode::CREATED)
}

#[utoipa::path(get, path = "/v1.0/subscribedSkus/{id}", tag = "licensing", responses((status = 200, body = SubscribedSku)))]
pub async fn get_sku(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.entity("subscribedSkus", &app.get_sku(&id).await?, StatusCode::OK)
}

#[utoipa::path(patch, path = "/v1.0/subscribedSkus/{id}", tag = "licensing", request_body = SkuUpdate, responses((status = 204), (status = 409, description = "A SKU with this skuPartNumber exists, or fewer seats than are assigned.")))]
pub async fn update_sku(
    State(app): State<App>,
    Caller(actor): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<SkuUpdate>,
) -> Reply {
    app.update_sku(&actor, &id, input).await?;
    no_content()
}

#[utoipa::path(delete, path = "/v1.0/subscribedSkus/{id}", tag = "licensing", responses((status = 204), (status = 409, description = "still assigned")))]
pub async fn delete_sku(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.delete_sku(&actor, &id).await?;
    no_content()
}

#[utoipa::path(post, path = "/v1.0/users/{id}/assignLicense", tag = "licensing", request_body = AssignLicenseRequest, responses((status = 200, body = cloudpc_types::directory::User), (status = 409, description = "not enough seats")))]
pub async fn assign_user_license(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<AssignLicenseRequest>,
) -> Reply {
    g.entity("users", &app.assign_user_license(&actor, &id, input).await?, StatusCode::OK)
}

#[utoipa::path(post, path = "/v1.0/groups/{id}/assignLicense", tag = "licensing", request_body = AssignLicenseRequest, responses((status = 200, body = cloudpc_types::directory::Group), (status = 409, description = "not enough seats")))]
pub async fn assign_group_license(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<AssignLicenseRequest>,
) -> Reply {
    g.entity("groups", &app.assign_group_license(&actor, &id, input).await?, StatusCode::OK)
}

#[utoipa::path(get, path = "/v1.0/users/{id}/licenseDetails", tag = "licensing", responses((status = 200, body = Collection<LicenseDetails>)))]
pub async fn license_details(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.page("licenseDetails", app.license_details(&id).await?)
}

/// cloudpc's view of a group's licenses (Graph shows them as the group's `assignedLicenses`).
#[utoipa::path(get, path = "/v1.0/groups/{id}/assignedLicenses", tag = "licensing", responses((status = 200, body = Collection<SubscribedSku>)))]
pub async fn group_licenses(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.page("subscribedSkus", app.group_license_skus(&id).await?)
}
