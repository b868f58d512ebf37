//! `/deviceManagement/virtualEndpoint/provisioningPolicies` and their `assign` action.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;

use cloudpc_control::App;
use cloudpc_types::policy::{
    AssignRequest, PolicyAssignment, ProvisioningPolicy, ProvisioningPolicyCreate, ProvisioningPolicyUpdate,
};

use super::{no_content, Reply};
use crate::extract::{ApiJson, ApiPath};
use crate::odata::{Collection, GraphRequest};
use crate::Caller;

const SET: &str = "deviceManagement/virtualEndpoint/provisioningPolicies";

pub fn routes() -> Router<App> {
    Router::new()
        .route("/deviceManagement/virtualEndpoint/provisioningPolicies", get(list).post(create))
        .route("/deviceManagement/virtualEndpoint/provisioningPolicies/{id}", get(read).patch(update).delete(remove))
        .route("/deviceManagement/virtualEndpoint/provisioningPolicies/{id}/assign", post(assign))
        .route("/deviceManagement/virtualEndpoint/provisioningPolicies/{id}/assignments", get(assignments))
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/provisioningPolicies", tag = "policies", operation_id = "list_policies", params(("$expand" = Option<String>, Query, pattern = "^assignments(,assignments)*$", description = "assignments: each policy with its assignments")), responses((status = 200, body = Collection<ProvisioningPolicy>)))]
pub async fn list(State(app): State<App>, g: GraphRequest) -> Reply {
    let expand = g.options.expand_only(&["assignments"])?;
    g.page(SET, app.list_policies(expand).await?)
}

#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/provisioningPolicies", tag = "policies", operation_id = "create_policy", request_body = ProvisioningPolicyCreate, responses((status = 201, body = ProvisioningPolicy)))]
pub async fn create(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiJson(input): ApiJson<ProvisioningPolicyCreate>,
) -> Reply {
    g.entity(SET, &app.create_policy(&actor, input).await?, StatusCode::CREATED)
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/provisioningPolicies/{id}", tag = "policies", operation_id = "get_policy",
    params(("$expand" = Option<String>, Query, pattern = "^assignments(,assignments)*$", description = "assignments: the policy with its assignments")),
    responses((status = 200, body = ProvisioningPolicy)))]
pub async fn read(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    let expand = g.options.expand_only(&["assignments"])?;
    g.entity(SET, &app.get_policy(&id, expand).await?, StatusCode::OK)
}

/// Changes the policy; Cloud PCs already provisioned from it stay as they are.
#[utoipa::path(patch, path = "/v1.0/deviceManagement/virtualEndpoint/provisioningPolicies/{id}", tag = "policies", operation_id = "update_policy", request_body = ProvisioningPolicyUpdate, responses((status = 204)))]
pub async fn update(
    State(app): State<App>,
    Caller(actor): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<ProvisioningPolicyUpdate>,
) -> Reply {
    app.update_policy(&actor, &id, input).await?;
    no_content()
}

#[utoipa::path(delete, path = "/v1.0/deviceManagement/virtualEndpoint/provisioningPolicies/{id}", tag = "policies", operation_id = "delete_policy", responses((status = 204), (status = 409, description = "the policy still has assignments")))]
pub async fn remove(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.delete_policy(&actor, &id).await?;
    no_content()
}

/// Replaces the policy's group targets with the given ordered list.
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/provisioningPolicies/{id}/assign", tag = "policies", operation_id = "assign_policy", request_body = AssignRequest, responses((status = 204)))]
pub async fn assign(
    State(app): State<App>,
    Caller(actor): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<AssignRequest>,
) -> Reply {
    app.assign_policy(&actor, &id, input).await?;
    no_content()
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/provisioningPolicies/{id}/assignments", tag = "policies", operation_id = "list_policy_assignments", responses((status = 200, body = Collection<PolicyAssignment>)))]
pub async fn assignments(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.page(&format!("{SET}('{id}')/assignments"), app.policy_assignments(&id).await?)
}
