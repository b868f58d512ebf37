//! `/deviceManagement/virtualEndpoint/onPremisesConnections`: network connections to the
//! organisation's own network and Active Directory domain (Graph's resource and field names).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;

use cloudpc_control::App;
use cloudpc_types::network::{OnPremisesConnection, OnPremisesConnectionCreate, OnPremisesConnectionUpdate};

use super::{no_content, Reply};
use crate::extract::{ApiJson, ApiPath};
use crate::odata::{Collection, GraphRequest};
use crate::Caller;

const SET: &str = "deviceManagement/virtualEndpoint/onPremisesConnections";

pub fn routes() -> Router<App> {
    Router::new()
        .route("/deviceManagement/virtualEndpoint/onPremisesConnections", get(list).post(create))
        .route("/deviceManagement/virtualEndpoint/onPremisesConnections/{id}", get(read).patch(update).delete(remove))
        .route("/deviceManagement/virtualEndpoint/onPremisesConnections/{id}/runHealthChecks", post(run_health_checks))
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/onPremisesConnections", tag = "networks", operation_id = "list_connections", responses((status = 200, body = Collection<OnPremisesConnection>)))]
pub async fn list(State(app): State<App>, g: GraphRequest) -> Reply {
    g.page(SET, app.list_network_connections().await?)
}

/// Adds a connection; its health checks are `pending` until they run.
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/onPremisesConnections", tag = "networks", operation_id = "create_connection", request_body = OnPremisesConnectionCreate, responses((status = 201, body = OnPremisesConnection), (status = 409, description = "a connection with that name exists")))]
pub async fn create(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiJson(input): ApiJson<OnPremisesConnectionCreate>,
) -> Reply {
    g.entity(SET, &app.create_network_connection(&actor, input).await?, StatusCode::CREATED)
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/onPremisesConnections/{id}", tag = "networks", operation_id = "get_connection", responses((status = 200, body = OnPremisesConnection)))]
pub async fn read(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.entity(SET, &app.get_network_connection(&id).await?, StatusCode::OK)
}

/// Changes a connection; one in use may only be renamed, and the join type never changes.
#[utoipa::path(patch, path = "/v1.0/deviceManagement/virtualEndpoint/onPremisesConnections/{id}", tag = "networks", operation_id = "update_connection", request_body = OnPremisesConnectionUpdate, responses((status = 204), (status = 409, description = "the connection is in use, has a name taken by another, or changed meanwhile")))]
pub async fn update(
    State(app): State<App>,
    Caller(actor): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<OnPremisesConnectionUpdate>,
) -> Reply {
    app.update_network_connection(&actor, &id, input).await?;
    no_content()
}

#[utoipa::path(delete, path = "/v1.0/deviceManagement/virtualEndpoint/onPremisesConnections/{id}", tag = "networks", operation_id = "delete_connection", responses((status = 204), (status = 409, description = "a provisioning policy uses the connection")))]
pub async fn remove(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.delete_network_connection(&actor, &id).await?;
    no_content()
}

/// Runs the connection's health checks again, from every host of its region. They run in the
/// background: the connection shows `running`, then the results in `healthCheckStatusDetail`.
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/onPremisesConnections/{id}/runHealthChecks", tag = "networks", operation_id = "run_connection_health_checks", responses((status = 204)))]
pub async fn run_health_checks(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.request_network_checks(&actor, &id).await?;
    no_content()
}
