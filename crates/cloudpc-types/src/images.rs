//! Images a Cloud PC can start from: the built-in gallery and the admin's own uploads.
//!
//! Shaped like Graph's `cloudPcGalleryImage` and `cloudPcDeviceImage`. A device image goes
//! `pending` → `ready` or `failed` (with an `errorCode`) once its source file has been checked.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::validate::{self, ValidationError};
use crate::ODataType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum GalleryImageStatus {
    Supported,
    SupportedWithWarning,
    NotSupported,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GalleryImage {
    /// `publisher_offer_sku`, as in Graph.
    pub id: String,
    pub display_name: String,
    pub publisher_name: String,
    pub offer_name: String,
    pub sku_name: String,
    pub size_in_gb: u32,
    pub start_date: NaiveDate,
    pub end_date: NaiveDate,
    pub expiration_date: NaiveDate,
    pub status: GalleryImageStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum DeviceImageStatus {
    Pending,
    Ready,
    Failed,
    Warning,
}

/// Graph's `cloudPcDeviceImageErrorCode` values that cloudpc produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum DeviceImageErrorCode {
    InternalServerError,
    SourceImageNotFound,
    OsVersionNotSupported,
    SourceImageInvalid,
    SourceImageNotGeneralized,
    SourceImageSizeExceedsLimitation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceImage {
    pub id: Uuid,
    pub display_name: String,
    pub version: String,
    /// Path of the source file on the server's host.
    pub source_image_resource_id: String,
    pub status: DeviceImageStatus,
    pub error_code: Option<DeviceImageErrorCode>,
    /// cloudpc extension: a sentence saying why the image failed.
    pub status_details: Option<String>,
    pub operating_system: Option<String>,
    pub os_build_number: Option<String>,
    pub size_in_gb: Option<f64>,
    pub last_modified_date_time: DateTime<Utc>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceImageCreate {
    #[serde(rename = "@odata.type", default)]
    #[schema(ignore)]
    pub odata_type: ODataType,
    pub display_name: String,
    pub version: String,
    pub source_image_resource_id: String,
    #[serde(default)]
    pub operating_system: Option<String>,
    #[serde(default)]
    pub os_build_number: Option<String>,
}

impl DeviceImage {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::display_name("displayName", &self.display_name, 256)?;
        image_version(&self.version)?;
        if !self.source_image_resource_id.starts_with('/') {
            return Err(ValidationError::new(
                "sourceImageResourceId",
                "must be an absolute path to a qcow2 file on the server's host",
            ));
        }
        validate::description("sourceImageResourceId", &self.source_image_resource_id, 4096)
    }
}

/// `Major.Minor.Patch`, each a number of up to 9 digits.
pub fn image_version(v: &str) -> Result<(), ValidationError> {
    let parts: Vec<&str> = v.split('.').collect();
    let ok = parts.len() == 3
        && parts.iter().all(|p| !p.is_empty() && p.len() <= 9 && p.chars().all(|c| c.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new("version", format!("must look like Major.Minor.Patch (for example 1.0.0), not '{v}'")))
    }
}
