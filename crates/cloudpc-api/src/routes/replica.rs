//! `/cloudpc/replica`: which replica answered and what database it uses (a cloudpc extension;
//! operators and tests use it to tell replicas apart behind a load balancer).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use utoipa::ToSchema;

use cloudpc_control::App;

use super::Reply;
use crate::odata::GraphRequest;
use crate::Caller;

pub fn routes() -> Router<App> {
    Router::new().route("/replica", get(read))
}

/// The replica that answered this request.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaInfo {
    /// This process's name in workflow leases (new at every start).
    pub replica: String,
    /// `sqlite` or `postgresql`.
    pub database: String,
    /// Cloud PCs whose provisioning workflow runs on this replica now.
    pub running_workflows: usize,
}

#[utoipa::path(get, path = "/cloudpc/replica", tag = "access", operation_id = "get_replica", responses((status = 200, body = ReplicaInfo)))]
pub async fn read(State(app): State<App>, _caller: Caller, g: GraphRequest) -> Reply {
    let info = ReplicaInfo {
        replica: app.replica().to_string(),
        database: app.store().backend().to_string(),
        running_workflows: app.running_workflows().len(),
    };
    g.entity("replica", &info, StatusCode::OK)
}
