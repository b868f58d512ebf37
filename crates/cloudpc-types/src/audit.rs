//! Audit events: who changed what, when, and how. Shaped like Graph's `cloudPcAuditEvent`.
//!
//! Events are written in the same transaction as the change they record and are never edited.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum AuditOperationType {
    Create,
    Delete,
    Patch,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum AuditResult {
    Success,
    ClientError,
    Failure,
    Timeout,
    Other,
}

/// Who made the change: a token's holder (an IT pro) or cloudpc itself (`application`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditActor {
    #[serde(rename = "type")]
    pub actor_type: String,
    pub user_id: Option<String>,
    pub user_principal_name: Option<String>,
    pub application_display_name: Option<String>,
    pub ip_address: Option<String>,
    pub user_permissions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditProperty {
    pub display_name: String,
    pub old_value: Option<String>,
    pub new_value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditResource {
    pub display_name: String,
    pub resource_type: String,
    pub resource_id: String,
    pub modified_properties: Vec<AuditProperty>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    pub id: Uuid,
    pub display_name: String,
    pub component_name: String,
    pub activity: String,
    pub activity_date_time: DateTime<Utc>,
    pub activity_type: String,
    pub activity_operation_type: AuditOperationType,
    pub activity_result: AuditResult,
    pub correlation_id: Uuid,
    pub category: String,
    pub actor: AuditActor,
    pub resources: Vec<AuditResource>,
}
