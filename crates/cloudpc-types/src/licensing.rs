//! Licenses: SKUs that carry a Cloud PC hardware size and a seat count, and their assignment to
//! users directly or through groups.
//!
//! Shaped like Graph's `subscribedSku`, `assignLicense` and `licenseDetails`. Creating and editing
//! SKUs is cloudpc's own extension (in Graph they come from purchases).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::validate::{self, ValidationError};
use crate::ODataType;

/// Seat counts; cloudpc uses `enabled` as the number of seats and keeps the others for Graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrepaidUnits {
    pub enabled: u32,
    #[serde(default)]
    pub suspended: u32,
    #[serde(default)]
    pub warning: u32,
    #[serde(default)]
    pub locked_out: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePlanInfo {
    pub service_plan_id: Uuid,
    pub service_plan_name: String,
    pub provisioning_status: String,
    pub applies_to: String,
}

/// A license product. `vCpuCount`, `ramInGB` and `storageInGB` size every Cloud PC it gives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscribedSku {
    /// The stored row's version, for compare-and-swap writes; not part of the Graph body.
    #[serde(skip)]
    pub row_version: u64,
    pub id: Uuid,
    pub sku_id: Uuid,
    pub sku_part_number: String,
    pub display_name: String,
    pub applies_to: String,
    pub capability_status: String,
    /// Users holding the SKU, directly or through a group; filled at read time.
    pub consumed_units: u32,
    pub prepaid_units: PrepaidUnits,
    pub v_cpu_count: u32,
    #[serde(rename = "ramInGB")]
    pub ram_in_gb: u32,
    #[serde(rename = "storageInGB")]
    pub storage_in_gb: u32,
    pub service_plans: Vec<ServicePlanInfo>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SkuCreate {
    #[serde(rename = "@odata.type", default)]
    #[schema(ignore)]
    pub odata_type: ODataType,
    pub sku_part_number: String,
    #[serde(default)]
    pub display_name: Option<String>,
    pub prepaid_units: PrepaidUnits,
    pub v_cpu_count: u32,
    #[serde(rename = "ramInGB")]
    pub ram_in_gb: u32,
    #[serde(rename = "storageInGB")]
    pub storage_in_gb: u32,
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SkuUpdate {
    #[serde(rename = "@odata.type", default)]
    #[schema(ignore)]
    pub odata_type: ODataType,
    pub sku_part_number: Option<String>,
    pub display_name: Option<String>,
    pub prepaid_units: Option<PrepaidUnits>,
    pub v_cpu_count: Option<u32>,
    #[serde(rename = "ramInGB")]
    pub ram_in_gb: Option<u32>,
    #[serde(rename = "storageInGB")]
    pub storage_in_gb: Option<u32>,
}

impl SubscribedSku {
    /// Hardware sizes within what one host can reasonably give a desktop.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::nickname("skuPartNumber", &self.sku_part_number, 64)?;
        validate::display_name("displayName", &self.display_name, 256)?;
        range("vCpuCount", self.v_cpu_count, 1, 64)?;
        range("ramInGB", self.ram_in_gb, 1, 512)?;
        range("storageInGB", self.storage_in_gb, 1, 4096)?;
        range("prepaidUnits.enabled", self.prepaid_units.enabled, 0, 1_000_000)
    }
}

fn range(field: &str, v: u32, min: u32, max: u32) -> Result<(), ValidationError> {
    if v < min || v > max {
        return Err(ValidationError::new(field, format!("must be between {min} and {max}, not {v}")));
    }
    Ok(())
}

/// One license to add in `assignLicense`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AssignedLicenseInput {
    pub sku_id: Uuid,
    #[serde(default)]
    pub disabled_plans: Vec<Uuid>,
}

/// Body of `POST /users/{id}/assignLicense` and `POST /groups/{id}/assignLicense`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AssignLicenseRequest {
    pub add_licenses: Vec<AssignedLicenseInput>,
    pub remove_licenses: Vec<Uuid>,
}

/// How a user holds a license: directly, or through one or more groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LicenseAssignmentState {
    pub sku_id: Uuid,
    /// `null` for a direct assignment, else the group it comes from.
    pub assigned_by_group: Option<Uuid>,
    pub state: String,
}

/// One entry of `/users/{id}/licenseDetails`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LicenseDetails {
    pub id: String,
    pub sku_id: Uuid,
    pub sku_part_number: String,
    pub service_plans: Vec<ServicePlanInfo>,
    pub license_assignment_states: Vec<LicenseAssignmentState>,
}
