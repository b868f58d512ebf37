//! `/deviceManagement/virtualEndpoint/cloudPCs` and `/auditEvents` (both read-only here).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use cloudpc_control::App;
use cloudpc_types::audit::AuditEvent;
use cloudpc_types::cloud_pc::CloudPc;

use super::Reply;
use crate::odata::GraphRequest;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/deviceManagement/virtualEndpoint/cloudPCs", get(list_cloud_pcs))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}", get(get_cloud_pc))
        .route("/deviceManagement/virtualEndpoint/auditEvents", get(list_audit))
        .route("/deviceManagement/virtualEndpoint/auditEvents/{id}", get(get_audit))
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs", tag = "cloudPCs", responses((status = 200, body = Vec<CloudPc>)))]
pub async fn list_cloud_pcs(State(app): State<App>, g: GraphRequest) -> Reply {
    g.page("deviceManagement/virtualEndpoint/cloudPCs", app.list_cloud_pcs().await?)
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}", tag = "cloudPCs", responses((status = 200, body = CloudPc)))]
pub async fn get_cloud_pc(State(app): State<App>, g: GraphRequest, Path(id): Path<String>) -> Reply {
    g.entity("deviceManagement/virtualEndpoint/cloudPCs", &app.get_cloud_pc(&id).await?, StatusCode::OK)
}

/// Audit events are read-only: no route changes or deletes them.
#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/auditEvents", tag = "audit", responses((status = 200, body = Vec<AuditEvent>)))]
pub async fn list_audit(State(app): State<App>, g: GraphRequest) -> Reply {
    g.page("deviceManagement/virtualEndpoint/auditEvents", app.list_audit_events().await?)
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/auditEvents/{id}", tag = "audit", responses((status = 200, body = AuditEvent)))]
pub async fn get_audit(State(app): State<App>, g: GraphRequest, Path(id): Path<String>) -> Reply {
    g.entity("deviceManagement/virtualEndpoint/auditEvents", &app.get_audit_event(&id).await?, StatusCode::OK)
}
