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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum PowerState {
    Running,
    PoweredOff,
    Unknown,
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
    pub provisioning_type: ProvisioningType,
    pub status: CloudPcStatus,
    pub status_detail: Option<String>,
    pub power_state: PowerState,
    pub grace_period_end_date_time: Option<DateTime<Utc>>,
    pub provisioned_date_time: Option<DateTime<Utc>>,
    pub last_modified_date_time: DateTime<Utc>,
}
