//! Images a Cloud PC can start from: the built-in gallery and the admin's own uploads.
//!
//! Shaped like Graph's `cloudPcGalleryImage` and `cloudPcDeviceImage`. A device image goes
//! `pending` → `ready` or `failed` (with an `errorCode`) once its source file has been checked and
//! test-booted.
//!
//! A device image keeps its id across versions (a cloudpc extension): `versions` lists each
//! `Major.Minor.Patch` import, and the Graph fields at the top describe the *current* version, the
//! newest one that is ready (or, while none is, the newest one). Policies name the image; a Cloud PC
//! records the version it was built from, so a new version reaches it only when it is reprovisioned.

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

/// cloudpc extension: the format of an imported file. Either way cloudpc keeps a qcow2 copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum SourceImageFormat {
    #[default]
    Qcow2,
    /// A plain disk image (as `dd` makes): no header, its size is its length.
    Raw,
}

impl SourceImageFormat {
    /// The query-parameter form (`format=raw`).
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        match s {
            "qcow2" => Ok(Self::Qcow2),
            "raw" => Ok(Self::Raw),
            _ => Err(ValidationError::new("format", format!("must be qcow2 or raw, not '{s}'"))),
        }
    }

    /// The name `qemu-img -f` takes.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
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
    /// The stored row's version, for compare-and-swap writes; not part of the Graph body.
    #[serde(skip)]
    pub row_version: u64,
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
    /// cloudpc extension: every version of the image, oldest first.
    #[serde(default)]
    pub versions: Vec<DeviceImageVersion>,
}

/// One imported version of a device image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceImageVersion {
    pub version: String,
    pub source_image_resource_id: String,
    /// The source was uploaded through the API into cloudpc's upload area (removed once checked).
    #[serde(default)]
    pub uploaded: bool,
    #[serde(default)]
    pub source_image_format: SourceImageFormat,
    pub status: DeviceImageStatus,
    pub error_code: Option<DeviceImageErrorCode>,
    pub status_details: Option<String>,
    /// What the guest agent reported during the test boot (`guest-get-osinfo`).
    pub operating_system: Option<String>,
    pub os_build_number: Option<String>,
    pub size_in_gb: Option<f64>,
    pub last_modified_date_time: DateTime<Utc>,
    /// While `pending`: the check running now (`staging`, `inspecting`, `copying`, `testBoot`)
    /// and since when. Shown, never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_step_since: Option<DateTime<Utc>>,
}

impl DeviceImageVersion {
    /// A version just submitted, not checked yet.
    pub fn pending(version: String, source: String, format: SourceImageFormat, uploaded: bool) -> Self {
        DeviceImageVersion {
            version,
            source_image_resource_id: source,
            uploaded,
            source_image_format: format,
            status: DeviceImageStatus::Pending,
            error_code: None,
            status_details: None,
            operating_system: None,
            os_build_number: None,
            size_in_gb: None,
            last_modified_date_time: Utc::now(),
            check_step: None,
            check_step_since: None,
        }
    }
}

impl DeviceImage {
    /// A new image whose only version is `pending`.
    pub fn new_pending(id: Uuid, display_name: String, first: DeviceImageVersion) -> Self {
        let mut image = DeviceImage {
            row_version: 0,
            id,
            display_name,
            version: String::new(),
            source_image_resource_id: String::new(),
            status: DeviceImageStatus::Pending,
            error_code: None,
            status_details: None,
            operating_system: None,
            os_build_number: None,
            size_in_gb: None,
            last_modified_date_time: first.last_modified_date_time,
            versions: vec![first],
        };
        image.refresh_current();
        image
    }

    /// The version new Cloud PCs are built from: the newest ready one, else the newest.
    pub fn current(&self) -> Option<&DeviceImageVersion> {
        let order = |v: &&DeviceImageVersion| parse_version(&v.version);
        self.versions
            .iter()
            .filter(|v| v.status == DeviceImageStatus::Ready)
            .max_by_key(order)
            .or_else(|| self.versions.iter().max_by_key(order))
    }

    /// Copies the current version into the Graph fields at the top.
    pub fn refresh_current(&mut self) {
        let Some(c) = self.current().cloned() else { return };
        self.version = c.version;
        self.source_image_resource_id = c.source_image_resource_id;
        self.status = c.status;
        self.error_code = c.error_code;
        self.status_details = c.status_details;
        if c.operating_system.is_some() {
            self.operating_system = c.operating_system;
            self.os_build_number = c.os_build_number;
        }
        self.size_in_gb = c.size_in_gb;
        self.last_modified_date_time =
            self.versions.iter().map(|v| v.last_modified_date_time).max().unwrap_or(c.last_modified_date_time);
    }

    pub fn version_mut(&mut self, version: &str) -> Option<&mut DeviceImageVersion> {
        self.versions.iter_mut().find(|v| v.version == version)
    }

    /// A new version must be higher than every version the image has that did not fail, so
    /// "newest" is unambiguous; a failed version's number may be used again.
    pub fn check_new_version(&self, version: &str) -> Result<(), ValidationError> {
        image_version(version)?;
        let new = parse_version(version).expect("checked above");
        let kept = self.versions.iter().filter(|v| v.status != DeviceImageStatus::Failed);
        if let Some(top) = kept.filter_map(|v| parse_version(&v.version)).max() {
            if new <= top {
                return Err(ValidationError::new(
                    "version",
                    format!("must be higher than the image's newest version {}.{}.{}", top.0, top.1, top.2),
                ));
            }
        }
        Ok(())
    }
}

/// `Major.Minor.Patch` as numbers, for ordering.
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split('.').map(|p| p.parse::<u64>().ok());
    let r = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(r)
}

/// Input of `POST deviceImages/{id}/versions`: a new version from a file on the server's host.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceImageVersionCreate {
    pub version: String,
    pub source_image_resource_id: String,
    #[serde(default)]
    pub source_image_format: SourceImageFormat,
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
    #[serde(default)]
    pub source_image_format: SourceImageFormat,
}

impl DeviceImage {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::display_name("displayName", &self.display_name, 256)?;
        image_version(&self.version)?;
        source_path(&self.source_image_resource_id)
    }
}

/// A source is a disk image file on the server's host, named by an absolute path.
pub fn source_path(path: &str) -> Result<(), ValidationError> {
    if !path.starts_with('/') {
        return Err(ValidationError::new(
            "sourceImageResourceId",
            "must be an absolute path to a disk image file on the server's host",
        ));
    }
    validate::description("sourceImageResourceId", path, 4096)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn version(v: &str, status: DeviceImageStatus) -> DeviceImageVersion {
        DeviceImageVersion {
            status,
            ..DeviceImageVersion::pending(v.into(), format!("/src/{v}.qcow2"), SourceImageFormat::Qcow2, false)
        }
    }

    #[test]
    fn test_current_version_is_newest_ready_then_newest() {
        let mut img =
            DeviceImage::new_pending(Uuid::nil(), "Base".into(), version("1.0.0", DeviceImageStatus::Pending));
        assert_eq!((img.version.as_str(), img.status), ("1.0.0", DeviceImageStatus::Pending));
        img.version_mut("1.0.0").unwrap().status = DeviceImageStatus::Ready;
        img.versions.push(version("1.1.0", DeviceImageStatus::Pending));
        img.refresh_current();
        assert_eq!(
            (img.version.as_str(), img.status),
            ("1.0.0", DeviceImageStatus::Ready),
            "a pending version is not current yet"
        );
        img.version_mut("1.1.0").unwrap().status = DeviceImageStatus::Failed;
        img.refresh_current();
        assert_eq!(img.version, "1.0.0", "a failed version never replaces a ready one");
        img.versions.push(version("1.2.0", DeviceImageStatus::Ready));
        img.refresh_current();
        assert_eq!((img.version.as_str(), img.source_image_resource_id.as_str()), ("1.2.0", "/src/1.2.0.qcow2"));
    }

    #[test]
    fn test_new_version_must_be_higher() {
        let img = DeviceImage::new_pending(Uuid::nil(), "Base".into(), version("1.10.0", DeviceImageStatus::Ready));
        assert!(img.check_new_version("1.9.9").is_err(), "compared as numbers, not text");
        assert!(img.check_new_version("1.10.0").is_err());
        assert!(img.check_new_version("1.10.1").is_ok());
        assert!(img.check_new_version("2.0").is_err());
        let mut img = img;
        img.versions.push(version("2.0.0", DeviceImageStatus::Failed));
        assert!(img.check_new_version("2.0.0").is_ok(), "a failed version may be submitted again");
        assert!(img.check_new_version("1.10.0").is_err());
    }

    #[test]
    fn test_parse_version() {
        assert_eq!(parse_version("1.2.3"), Some((1, 2, 3)));
        assert_eq!(parse_version("1.2"), None);
        assert_eq!(parse_version("1.2.3.4"), None);
        assert_eq!(parse_version("1.x.3"), None);
    }
}
