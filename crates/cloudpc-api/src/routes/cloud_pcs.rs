//! `/deviceManagement/virtualEndpoint/cloudPCs` with its remote actions, `/auditEvents`, and the
//! device records provisioning makes (`/devices`, `/deviceManagement/managedDevices`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;

use cloudpc_control::FieldEquals;
use cloudpc_control::{App, Listing};
use cloudpc_types::audit::AuditEvent;
use cloudpc_types::cloud_pc::{
    CloudPc, ConsoleTicket, Device, InitialPassword, ManagedDevice, ProvisioningStepRecord, RenameRequest,
};

use super::{no_content, Reply};
use crate::extract::{ApiJson, ApiPath};
use crate::odata::{Collection, GraphRequest};
use crate::Caller;

const PCS: &str = "deviceManagement/virtualEndpoint/cloudPCs";

pub fn routes() -> Router<App> {
    Router::new()
        .route("/deviceManagement/virtualEndpoint/cloudPCs", get(list_cloud_pcs))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}", get(get_cloud_pc))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}/provisioningSteps", get(steps))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}/reprovision", post(reprovision))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}/retry", post(retry))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}/reboot", post(reboot))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}/powerOff", post(power_off))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}/powerOn", post(power_on))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}/hibernate", post(hibernate))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}/resume", post(resume))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}/rename", post(rename))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}/endGracePeriod", post(end_grace_period))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}/getInitialPassword", post(initial_password))
        .route("/deviceManagement/virtualEndpoint/cloudPCs/{id}/getConsoleTicket", post(console_ticket))
        .route("/deviceManagement/virtualEndpoint/auditEvents", get(list_audit))
        .route("/deviceManagement/virtualEndpoint/auditEvents/{id}", get(get_audit))
        .route("/devices", get(list_devices))
        .route("/deviceManagement/managedDevices", get(list_managed_devices))
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs", tag = "cloudPCs", responses((status = 200, body = Collection<CloudPc>)))]
pub async fn list_cloud_pcs(State(app): State<App>, g: GraphRequest) -> Reply {
    g.stored_page::<CloudPc>(&app, PCS, Listing::CloudPcs).await
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}", tag = "cloudPCs", responses((status = 200, body = CloudPc)))]
pub async fn get_cloud_pc(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.entity(PCS, &app.get_cloud_pc(&id).await?, StatusCode::OK)
}

/// cloudpc extension: each provisioning step with its times and error.
#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/provisioningSteps", tag = "cloudPCs", responses((status = 200, body = Collection<ProvisioningStepRecord>)))]
pub async fn steps(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.page(&format!("{PCS}('{id}')/provisioningSteps"), app.provisioning_steps(&id).await?)
}

/// Deletes and recreates the Cloud PC from its user's current policy (provisioned or failed only).
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/reprovision", tag = "cloudPCs", responses((status = 204), (status = 409, description = "not provisioned or failed")))]
pub async fn reprovision(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.reprovision(&actor, &id).await?;
    no_content()
}

/// cloudpc extension: the Retry of a failed Cloud PC.
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/retry", tag = "cloudPCs", responses((status = 204), (status = 409, description = "not failed")))]
pub async fn retry(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.retry(&actor, &id).await?;
    no_content()
}

#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/reboot", tag = "cloudPCs", responses((status = 204), (status = 409, description = "The Cloud PC is not provisioned, or its VM refused the action.")))]
pub async fn reboot(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.reboot(&actor, &id).await?;
    no_content()
}

#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/powerOff", tag = "cloudPCs", responses((status = 204), (status = 409, description = "The Cloud PC is not provisioned, or its VM refused the action.")))]
pub async fn power_off(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.power_off(&actor, &id).await?;
    no_content()
}

#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/powerOn", tag = "cloudPCs", responses((status = 204), (status = 409, description = "The Cloud PC is not provisioned, or its VM refused the action.")))]
pub async fn power_on(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.power_on(&actor, &id).await?;
    no_content()
}

/// cloudpc extension: saves the running Cloud PC's memory to disk and stops it (its RAM is freed);
/// opening it, or `resume`, brings it back where it was.
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/hibernate", tag = "cloudPCs", responses((status = 204), (status = 409, description = "The Cloud PC is not provisioned or not running, or its VM refused the action.")))]
pub async fn hibernate(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.hibernate(&actor, &id).await?;
    no_content()
}

/// cloudpc extension: starts a hibernated Cloud PC from its saved memory (a powered-off one boots).
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/resume", tag = "cloudPCs", responses((status = 204), (status = 409, description = "The Cloud PC is not provisioned, or its VM refused the action.")))]
pub async fn resume(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.resume(&actor, &id).await?;
    no_content()
}

#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/rename", tag = "cloudPCs", request_body = RenameRequest, responses((status = 204)))]
pub async fn rename(
    State(app): State<App>,
    Caller(actor): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<RenameRequest>,
) -> Reply {
    app.rename(&actor, &id, &input.display_name).await?;
    no_content()
}

#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/endGracePeriod", tag = "cloudPCs", responses((status = 204), (status = 409, description = "The Cloud PC is not in its grace period.")))]
pub async fn end_grace_period(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.end_grace_period(&actor, &id).await?;
    no_content()
}

/// cloudpc extension: the one-time password of the user's account; answered once.
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/getInitialPassword", tag = "cloudPCs", responses((status = 200, body = InitialPassword), (status = 409, description = "already shown")))]
pub async fn initial_password(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiPath(id): ApiPath<String>,
) -> Reply {
    g.entity("initialPassword", &app.take_initial_password(&actor, &id).await?, StatusCode::OK)
}

/// cloudpc extension: a single-use ticket, valid for seconds, that opens the Cloud PC's console
/// through the gateway's WebSocket (`url`).
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/getConsoleTicket", tag = "cloudPCs", responses((status = 200, body = ConsoleTicket), (status = 409, description = "not running")))]
pub async fn console_ticket(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiPath(id): ApiPath<String>,
) -> Reply {
    g.entity("consoleTicket", &app.issue_console_ticket(&actor, &id).await?, StatusCode::OK)
}

/// Audit events are read-only: no route changes or deletes them.
#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/auditEvents", tag = "audit", responses((status = 200, body = Collection<AuditEvent>)))]
pub async fn list_audit(State(app): State<App>, g: GraphRequest) -> Reply {
    // Paged and filtered by the database: the log grows without bound, so it is never read whole.
    let filter: Vec<FieldEquals> =
        g.options.filter.iter().map(|t| FieldEquals { path: t.path.clone(), value: t.value.clone() }).collect();
    let (items, total) = app.audit_events_page(&filter, g.options.skip, g.page_size()).await?;
    g.collection_page("deviceManagement/virtualEndpoint/auditEvents", items, total)
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/auditEvents/{id}", tag = "audit", responses((status = 200, body = AuditEvent)))]
pub async fn get_audit(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.entity("deviceManagement/virtualEndpoint/auditEvents", &app.get_audit_event(&id).await?, StatusCode::OK)
}

#[utoipa::path(get, path = "/v1.0/devices", tag = "devices", responses((status = 200, body = Collection<Device>)))]
pub async fn list_devices(State(app): State<App>, g: GraphRequest) -> Reply {
    g.page("devices", app.list_devices().await?)
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/managedDevices", tag = "devices", responses((status = 200, body = Collection<ManagedDevice>)))]
pub async fn list_managed_devices(State(app): State<App>, g: GraphRequest) -> Reply {
    g.page("deviceManagement/managedDevices", app.list_managed_devices().await?)
}
