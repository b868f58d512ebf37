//! Images: the built-in gallery and custom device images imported from qcow2 files.
//!
//! A device image is stored as `pending`, then checked in the background: the qcow2 header is read
//! by hand first, so that a file naming a backing file or an external data file (which could make
//! QEMU read any host file) is refused before any QEMU tool opens it; then `qemu-img check` looks
//! for corruption and truncation. Pending images are checked again after a restart. The test boot
//! in a throwaway VM comes with the image-import work (issue 5).

use std::io::Read;
use std::path::Path;

use chrono::Utc;
use uuid::Uuid;

use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::images::{DeviceImage, DeviceImageCreate, DeviceImageErrorCode, DeviceImageStatus, GalleryImage};

use crate::audit::{Actor, Change};
use crate::directory::parse_id;
use crate::{App, Result};

fn image_change(activity: &str, op: AuditOperationType, image: &DeviceImage) -> Change<'static> {
    Change {
        component: "Images",
        activity: format!("{activity} DeviceImage"),
        operation: op,
        resource_type: "deviceImage",
        resource_id: image.id.to_string(),
        resource_name: image.display_name.clone(),
    }
}

/// Why an image was refused: Graph's error code and a sentence for the admin.
#[derive(Debug, PartialEq)]
pub struct ImageRejection {
    pub code: DeviceImageErrorCode,
    pub message: String,
}

fn reject(code: DeviceImageErrorCode, message: impl Into<String>) -> ImageRejection {
    ImageRejection { code, message: message.into() }
}

const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Incompatible-feature bits of a qcow2 v3 header.
const FEATURE_CORRUPT: u64 = 1 << 1;
const FEATURE_EXTERNAL_DATA_FILE: u64 = 1 << 2;

/// Reads a qcow2 header and returns the virtual size in bytes. Written by hand because the point
/// is to look at the file *without* letting a QEMU tool follow the references inside it.
pub fn inspect_qcow2_header(path: &Path) -> Result<u64, ImageRejection> {
    use DeviceImageErrorCode::*;
    let mut file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => reject(SourceImageNotFound, format!("no file at {}", path.display())),
        _ => reject(SourceImageNotFound, format!("cannot read {}: {e}", path.display())),
    })?;
    let meta = file.metadata().map_err(|e| reject(SourceImageNotFound, e.to_string()))?;
    if !meta.is_file() {
        return Err(reject(SourceImageInvalid, format!("{} is not a regular file", path.display())));
    }
    let mut header = [0u8; 104];
    let n = file.read(&mut header).map_err(|e| reject(SourceImageInvalid, e.to_string()))?;
    let be32 = |o: usize| u32::from_be_bytes(header[o..o + 4].try_into().expect("4 bytes"));
    let be64 = |o: usize| u64::from_be_bytes(header[o..o + 8].try_into().expect("8 bytes"));
    if n < 72 || be32(0) != QCOW2_MAGIC {
        return Err(reject(SourceImageInvalid, "the file is not a qcow2 image"));
    }
    let version = be32(4);
    if version != 2 && version != 3 {
        return Err(reject(SourceImageInvalid, format!("qcow2 version {version} is not supported")));
    }
    if be64(8) != 0 {
        return Err(reject(
            SourceImageInvalid,
            "the image names a backing file; import a standalone image (qemu-img convert flattens it)",
        ));
    }
    if version == 3 {
        if n < 104 {
            return Err(reject(SourceImageInvalid, "the qcow2 header is truncated"));
        }
        let incompatible = be64(72);
        if incompatible & FEATURE_EXTERNAL_DATA_FILE != 0 {
            return Err(reject(
                SourceImageInvalid,
                "the image keeps its data in an external data file; import a standalone image",
            ));
        }
        if incompatible & FEATURE_CORRUPT != 0 {
            return Err(reject(SourceImageInvalid, "the image is marked corrupt"));
        }
    }
    Ok(be64(24))
}

impl App {
    pub async fn list_gallery_images(&self) -> Result<Vec<GalleryImage>> {
        Ok(self.store.list_gallery_images().await?)
    }

    pub async fn get_gallery_image(&self, id: &str) -> Result<GalleryImage> {
        Ok(self.store.get_gallery_image(id).await?)
    }

    pub async fn list_device_images(&self) -> Result<Vec<DeviceImage>> {
        Ok(self.store.list_device_images().await?)
    }

    pub async fn get_device_image(&self, id: &str) -> Result<DeviceImage> {
        Ok(self.store.get_device_image(parse_id("deviceImage", id)?).await?)
    }

    /// Registers the image as `pending` and starts checking it in the background.
    pub async fn create_device_image(&self, actor: &Actor, input: DeviceImageCreate) -> Result<DeviceImage> {
        let image = DeviceImage {
            id: Uuid::new_v4(),
            display_name: input.display_name,
            version: input.version,
            source_image_resource_id: input.source_image_resource_id,
            status: DeviceImageStatus::Pending,
            error_code: None,
            status_details: None,
            operating_system: input.operating_system,
            os_build_number: input.os_build_number,
            size_in_gb: None,
            last_modified_date_time: Utc::now(),
        };
        image.validate()?;
        let audit = image_change("Create", AuditOperationType::Create, &image).event(actor, None, Some(&image));
        self.store.create_device_image(&image, &audit).await?;
        let app = self.clone();
        let id = image.id;
        tokio::spawn(async move { app.validate_device_image(id).await });
        Ok(image)
    }

    pub async fn delete_device_image(&self, actor: &Actor, id: &str) -> Result<()> {
        let image = self.get_device_image(id).await?;
        let audit = image_change("Delete", AuditOperationType::Delete, &image).event(actor, Some(&image), None);
        self.store.delete_device_image(image.id, &audit).await?;
        if let Err(e) = tokio::fs::remove_file(self.image_base(image.id)).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(image = %image.id, error = %e, "could not remove the image's base file");
            }
        }
        Ok(())
    }

    /// cloudpc's own copy of a custom image: Cloud PCs use overlays on it, never the source file,
    /// so the source can be moved or changed without touching them.
    pub fn image_base(&self, id: Uuid) -> std::path::PathBuf {
        self.config.image_dir.join(format!("{id}.qcow2"))
    }

    /// Copies a checked image into its base file (flattened by `qemu-img convert`, written under a
    /// temporary name and renamed, so a crash never leaves a half-copied base).
    async fn take_copy(&self, image: &DeviceImage) -> Result<(), ImageRejection> {
        let base = self.image_base(image.id);
        let partial = base.with_extension("qcow2.partial");
        let out = tokio::process::Command::new(&self.config.qemu_img)
            .args(["convert", "-q", "-f", "qcow2", "-O", "qcow2"])
            .arg(&image.source_image_resource_id)
            .arg(&partial)
            .output()
            .await
            .map_err(|e| {
                reject(DeviceImageErrorCode::InternalServerError, format!("cannot run {}: {e}", self.config.qemu_img))
            })?;
        if !out.status.success() {
            let _ = tokio::fs::remove_file(&partial).await;
            let detail = String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("").to_string();
            return Err(reject(
                DeviceImageErrorCode::SourceImageInvalid,
                format!("the image could not be copied: {detail}"),
            ));
        }
        tokio::fs::rename(&partial, &base)
            .await
            .map_err(|e| reject(DeviceImageErrorCode::InternalServerError, format!("cannot store the image: {e}")))
    }

    /// Checks every image left `pending` (for example by a restart during a check).
    pub async fn resume_image_validation(&self) -> Result<()> {
        for image in self.store.list_device_images().await? {
            if image.status == DeviceImageStatus::Pending {
                let app = self.clone();
                tokio::spawn(async move { app.validate_device_image(image.id).await });
            }
        }
        Ok(())
    }

    /// Moves a pending image to `ready` or `failed`. Errors are logged: nobody waits on this task.
    pub async fn validate_device_image(&self, id: Uuid) {
        let Ok(before) = self.store.get_device_image(id).await else { return };
        if before.status != DeviceImageStatus::Pending {
            return;
        }
        let mut image = before.clone();
        let checked = match self.check_image_file(Path::new(&image.source_image_resource_id)).await {
            Ok(size) => self.take_copy(&image).await.map(|()| size),
            Err(r) => Err(r),
        };
        match checked {
            Ok(size) => {
                image.status = DeviceImageStatus::Ready;
                image.size_in_gb = Some((size as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0);
            }
            Err(r) => {
                image.status = DeviceImageStatus::Failed;
                image.error_code = Some(r.code);
                image.status_details = Some(r.message);
            }
        }
        image.last_modified_date_time = Utc::now();
        let audit = image_change("Validate", AuditOperationType::Patch, &image).event(
            &Actor::system(),
            Some(&before),
            Some(&image),
        );
        if let Err(e) = self.store.update_device_image(&image, &audit).await {
            tracing::warn!(image = %id, error = %e, "could not record the result of an image check");
        }
    }

    async fn check_image_file(&self, path: &Path) -> Result<u64, ImageRejection> {
        use DeviceImageErrorCode::*;
        let owned = path.to_path_buf();
        let size = tokio::task::spawn_blocking(move || inspect_qcow2_header(&owned))
            .await
            .map_err(|e| reject(InternalServerError, e.to_string()))??;
        let limit = self.config.max_image_size_gb << 30;
        if size > limit {
            return Err(reject(
                SourceImageSizeExceedsLimitation,
                format!(
                    "the image's virtual size is {} GiB; the limit is {} GiB",
                    size.div_ceil(1 << 30),
                    self.config.max_image_size_gb
                ),
            ));
        }
        // Safe now: the header has no backing or data file for qemu-img to follow.
        let out = tokio::process::Command::new(&self.config.qemu_img)
            .args(["check", "-q", "-f", "qcow2"])
            .arg(path)
            .output()
            .await
            .map_err(|e| reject(InternalServerError, format!("cannot run {}: {e}", self.config.qemu_img)))?;
        // Exit 3 means leaked clusters only: wasted space, not damage.
        match out.status.code() {
            Some(0) | Some(3) => Ok(size),
            _ => {
                let detail = String::from_utf8_lossy(&out.stderr);
                let first = detail.lines().next().unwrap_or("the image is damaged").trim().to_string();
                Err(reject(SourceImageInvalid, format!("qemu-img check failed: {first}")))
            }
        }
    }
}
