//! Cloud PCs: one dedicated VM per (user, license), shaped like Graph's `cloudPC`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::policy::ProvisioningType;

/// Graph's `cloudPcStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum CloudPcStatus {
    NotProvisioned,
    Provisioning,
    Provisioned,
    ProvisionedWithWarnings,
    InGracePeriod,
    Deprovisioning,
    Failed,
    PendingProvision,
    Resizing,
    Restoring,
    /// cloudpc extension: a booted machine of a policy's warm pool, waiting for a user. Shown to
    /// administrators only.
    Pooled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum PowerState {
    Running,
    PoweredOff,
    Unknown,
}

/// cloudpc extension: more about a `poweredOff` Cloud PC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum PowerStateDetail {
    /// Hibernated: its memory is saved to disk and its RAM is free.
    Saved,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudPc {
    pub id: Uuid,
    pub display_name: String,
    pub managed_device_name: Option<String>,
    pub user_principal_name: String,
    pub provisioning_policy_id: Option<Uuid>,
    pub provisioning_policy_name: Option<String>,
    pub service_plan_id: Uuid,
    pub service_plan_name: String,
    pub image_display_name: Option<String>,
    /// cloudpc extension: the custom image version this Cloud PC was built from (it changes
    /// only on reprovision); none for gallery images.
    #[serde(default)]
    pub image_version: Option<String>,
    pub provisioning_type: ProvisioningType,
    pub status: CloudPcStatus,
    pub status_detail: Option<String>,
    pub power_state: PowerState,
    /// cloudpc extension: `saved` when the Cloud PC is hibernated, that is powered off with its
    /// memory saved to disk; opening it (or `resume`) brings it back where it was.
    #[serde(default)]
    pub power_state_detail: Option<PowerStateDetail>,
    pub grace_period_end_date_time: Option<DateTime<Utc>>,
    pub provisioned_date_time: Option<DateTime<Utc>>,
    pub last_modified_date_time: DateTime<Utc>,
    /// `administrator` when the policy made the user a local administrator.
    pub user_account_type: UserAccountType,
    pub os_version: Option<String>,
    /// The last remote action and how it ended.
    pub last_remote_action_result: Option<RemoteActionResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum UserAccountType {
    StandardUser,
    Administrator,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoteActionResult {
    pub action_name: String,
    /// Graph's `actionState`: none, pending, canceled, active, done, failed, notSupported.
    pub action_state: String,
    pub start_date_time: DateTime<Utc>,
    pub last_updated_date_time: DateTime<Utc>,
    pub status_detail: Option<String>,
}

/// The three stages of provisioning, as Windows 365 names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum ProvisioningStage {
    Core,
    PostProvisioning,
    Assignment,
    /// Undoing what earlier steps did (between attempts, on reprovision, at clean-up).
    Cleanup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum StepStatus {
    Running,
    Succeeded,
    Failed,
    /// Needs something that is not there yet (capacity); retried later.
    Waiting,
}

/// One provisioning step as it ran: a cloudpc extension exposed at `cloudPCs/{id}/provisioningSteps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningStepRecord {
    pub cloud_pc_id: Uuid,
    /// Increases with every reprovision.
    pub generation: u32,
    /// 1, 2 or 3 for core provisioning; retries by an admin continue the count.
    pub attempt: u32,
    pub sequence: u32,
    pub name: String,
    pub stage: ProvisioningStage,
    pub status: StepStatus,
    pub start_date_time: DateTime<Utc>,
    pub end_date_time: Option<DateTime<Utc>>,
    pub duration_in_milliseconds: Option<u64>,
    pub error: Option<String>,
    pub detail: Option<String>,
}

/// The answer of `getInitialPassword`: shown once, then forgotten by cloudpc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitialPassword {
    pub user_name: String,
    pub password: String,
}

/// A console ticket: single use, valid for seconds, presented to the gateway's WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleTicket {
    pub ticket: String,
    pub cloud_pc_id: Uuid,
    pub expiration_date_time: DateTime<Utc>,
    /// Path of the gateway's WebSocket, with the ticket.
    pub url: String,
}

/// Body of `rename`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenameRequest {
    pub display_name: String,
}

/// A directory device object (Graph `device`), made when a Cloud PC joins the directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub id: Uuid,
    pub device_id: Uuid,
    pub display_name: String,
    pub operating_system: String,
    pub operating_system_version: Option<String>,
    pub trust_type: String,
    pub account_enabled: bool,
    pub registration_date_time: DateTime<Utc>,
    /// cloudpc extension: the Cloud PC this device is.
    pub cloud_pc_id: Uuid,
}

/// A managed device (Graph `managedDevice`), made when a Cloud PC enrolls in management.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedDevice {
    pub id: Uuid,
    pub device_name: String,
    pub azure_ad_device_id: Uuid,
    pub operating_system: String,
    pub os_version: Option<String>,
    pub management_agent: String,
    pub enrolled_date_time: DateTime<Utc>,
    /// The primary user, set by the primary-user step.
    pub user_id: Option<Uuid>,
    pub user_principal_name: Option<String>,
    pub total_storage_space_in_bytes: Option<u64>,
    pub free_storage_space_in_bytes: Option<u64>,
    /// cloudpc extension: the Cloud PC this device is.
    pub cloud_pc_id: Uuid,
}

/// A Cloud PC as its user sees it in the portal: the Graph view plus the step it is on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortalCloudPc {
    #[serde(flatten)]
    pub cloud_pc: CloudPc,
    /// The last provisioning step that ran, such as "joinDirectory".
    pub current_step: Option<String>,
    pub current_step_status: Option<StepStatus>,
}
