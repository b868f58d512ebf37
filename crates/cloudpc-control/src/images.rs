//! Images: the built-in gallery and custom device images imported from qcow2 files.
//!
//! A device image version is stored as `pending`, then checked in the background, cheapest and
//! safest check first: the qcow2 header is read by hand, so that a file naming a backing file or
//! an external data file (which could make QEMU read any host file) is refused before any QEMU tool
//! opens it; `qemu-img info` confirms the format and virtual size, `qemu-img check` looks for
//! corruption and truncation; the file is copied into cloudpc's own base file; and a throwaway VM
//! boots an overlay of that copy through firmware and must have its guest agent answer in time,
//! since provisioning configures every Cloud PC through that agent. Pending versions are checked
//! again after a restart. Sources come from a path on the server's host or from an upload streamed
//! through the API into the upload area (removed once checked).

use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::Utc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use cloudpc_guest::GuestAgent;
use cloudpc_hypervisor::{Boot, VmSpec};
use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::images::{
    self as image_types, DeviceImage, DeviceImageCreate, DeviceImageErrorCode, DeviceImageStatus, DeviceImageVersion,
    DeviceImageVersionCreate, GalleryImage,
};

use crate::audit::{Actor, Change};
use crate::directory::parse_id;
use crate::{App, Error, Result};

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

    /// Registers the image with its first version `pending` and starts checking it in the background.
    pub async fn create_device_image(&self, actor: &Actor, input: DeviceImageCreate) -> Result<DeviceImage> {
        self.create_image(actor, input, false).await
    }

    async fn create_image(&self, actor: &Actor, input: DeviceImageCreate, uploaded: bool) -> Result<DeviceImage> {
        let mut first = pending_version(input.version, input.source_image_resource_id, uploaded);
        first.operating_system = input.operating_system;
        first.os_build_number = input.os_build_number;
        let image = DeviceImage::new_pending(Uuid::new_v4(), input.display_name, first);
        image.validate()?;
        if !uploaded {
            self.check_import_path(&image.source_image_resource_id)?;
        }
        let audit = image_change("Create", AuditOperationType::Create, &image).event(actor, None, Some(&image));
        self.store.create_device_image(&image, &audit).await?;
        self.spawn_validation(image.id, image.version.clone());
        Ok(image)
    }

    /// Adds a new version from a file on the server's host. Existing Cloud PCs keep the version
    /// they were built from; new ones (and reprovisioned ones) get it once it is ready.
    pub async fn create_device_image_version(
        &self,
        actor: &Actor,
        id: &str,
        input: DeviceImageVersionCreate,
    ) -> Result<DeviceImage> {
        image_types::source_path(&input.source_image_resource_id)?;
        self.check_import_path(&input.source_image_resource_id)?;
        self.add_version(actor, id, pending_version(input.version, input.source_image_resource_id, false)).await
    }

    async fn add_version(&self, actor: &Actor, id: &str, version: DeviceImageVersion) -> Result<DeviceImage> {
        let id = parse_id("deviceImage", id)?;
        let _guard = self.image_updates.lock().await;
        let before = self.store.get_device_image(id).await?;
        before.check_new_version(&version.version)?;
        let mut image = before.clone();
        let v = version.version.clone();
        image.versions.push(version);
        image.refresh_current();
        let audit =
            image_change("Add version to", AuditOperationType::Patch, &image).event(actor, Some(&before), Some(&image));
        self.store.update_device_image(&image, &audit).await?;
        self.spawn_validation(id, v);
        Ok(image)
    }

    /// Receives an uploaded image into the upload area, then registers it like a host file.
    /// `target` is `None` for a new image, or the image that gets a new version.
    pub async fn upload_device_image(
        &self,
        actor: &Actor,
        target: UploadTarget,
        body: impl AsyncRead + Unpin + Send,
    ) -> Result<DeviceImage> {
        // Check the names before spending the bandwidth.
        image_types::image_version(target.version())?;
        match &target {
            UploadTarget::NewImage { display_name, .. } => {
                cloudpc_types::validate::display_name("displayName", display_name, 256)?;
            }
            UploadTarget::NewVersion { image_id, version } => {
                self.get_device_image(image_id).await?.check_new_version(version)?;
            }
        }
        let path = self.receive_upload(body).await?;
        let source = path.to_string_lossy().into_owned();
        let result = match target {
            UploadTarget::NewImage { display_name, version, operating_system } => {
                let input = DeviceImageCreate {
                    odata_type: Default::default(),
                    display_name,
                    version,
                    source_image_resource_id: source,
                    operating_system,
                    os_build_number: None,
                };
                self.create_image(actor, input, true).await
            }
            UploadTarget::NewVersion { image_id, version } => {
                self.add_version(actor, &image_id, pending_version(version, source, true)).await
            }
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(&path).await;
        }
        result
    }

    /// A host path must lie in one of the import directories (checked on the words here, and on
    /// the resolved path, symlinks followed, when the file is checked).
    fn check_import_path(&self, path: &str) -> Result<()> {
        let p = Path::new(path);
        let inside = !p.components().any(|c| matches!(c, std::path::Component::ParentDir))
            && self.import_dirs().iter().any(|d| p.starts_with(d));
        if inside {
            return Ok(());
        }
        Err(Error::invalid(
            "sourceImageResourceId",
            format!(
                "must be a file under an import directory of the server ({}); upload the file instead, or ask the \
                 operator to add a directory with --image-import-dir",
                self.import_dirs().iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        ))
    }

    fn import_dirs(&self) -> Vec<PathBuf> {
        self.config.image_import_dirs.iter().map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone())).collect()
    }

    /// The upload area, plus the import directories as their real paths (symlinks resolved).
    fn allowed_source_roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = self.import_dirs().iter().filter_map(|d| d.canonicalize().ok()).collect();
        roots.extend(self.upload_dir().canonicalize().ok());
        roots
    }

    fn upload_dir(&self) -> PathBuf {
        self.config.image_dir.join("uploads")
    }

    /// Streams the body to a file, refusing it past the size limit; a failed upload leaves nothing.
    async fn receive_upload(&self, mut body: impl AsyncRead + Unpin + Send) -> Result<PathBuf> {
        let dir = self.upload_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::HostIo(format!("cannot create {}: {e}", dir.display())))?;
        let dir = std::path::absolute(&dir).map_err(|e| Error::HostIo(e.to_string()))?;
        let id = Uuid::new_v4();
        let partial = dir.join(format!("{id}.qcow2.partial"));
        let done = dir.join(format!("{id}.qcow2"));
        // A qcow2 file is at most its virtual size plus metadata; 1/64 covers the metadata.
        let limit = (self.config.max_image_size_gb << 30) + (self.config.max_image_size_gb << 24) + (1 << 20);
        let outcome = async {
            let mut file = tokio::fs::File::create(&partial)
                .await
                .map_err(|e| Error::HostIo(format!("cannot create {}: {e}", partial.display())))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total: u64 = 0;
            loop {
                let n = body
                    .read(&mut buf)
                    .await
                    .map_err(|e| Error::invalid("body", format!("the upload broke off: {e}")))?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > limit {
                    return Err(Error::TooLarge(format!(
                        "the upload is larger than an image of the {} GiB limit can be",
                        self.config.max_image_size_gb
                    )));
                }
                file.write_all(&buf[..n]).await.map_err(|e| Error::HostIo(format!("cannot store the upload: {e}")))?;
            }
            if total == 0 {
                return Err(Error::invalid("body", "the upload is empty"));
            }
            file.sync_all().await.map_err(|e| Error::HostIo(format!("cannot store the upload: {e}")))?;
            tokio::fs::rename(&partial, &done).await.map_err(|e| Error::HostIo(format!("cannot store the upload: {e}")))
        }
        .await;
        if let Err(e) = outcome {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        Ok(done)
    }

    pub async fn delete_device_image(&self, actor: &Actor, id: &str) -> Result<()> {
        let image = self.get_device_image(id).await?;
        let audit = image_change("Delete", AuditOperationType::Delete, &image).event(actor, Some(&image), None);
        self.store.delete_device_image(image.id, &audit).await?;
        for v in &image.versions {
            remove_quietly(&self.image_base(image.id, &v.version)).await;
            if v.uploaded {
                remove_quietly(Path::new(&v.source_image_resource_id)).await;
            }
        }
        Ok(())
    }

    /// cloudpc's own copy of one version of a custom image: Cloud PCs use overlays on it, never the
    /// source file, so the source can be moved or changed without touching them.
    pub fn image_base(&self, id: Uuid, version: &str) -> PathBuf {
        self.config.image_dir.join(format!("{id}-{version}.qcow2"))
    }

    /// Copies a checked image into its base file (flattened by `qemu-img convert`, written under a
    /// temporary name and renamed, so a crash never leaves a half-copied base).
    async fn take_copy(&self, source: &Path, base: &Path) -> Result<(), ImageRejection> {
        let partial = base.with_extension("qcow2.partial");
        let out = tokio::process::Command::new(&self.config.qemu_img)
            .args(["convert", "-q", "-f", "qcow2", "-O", "qcow2"])
            .arg(source)
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
        tokio::fs::rename(&partial, base)
            .await
            .map_err(|e| reject(DeviceImageErrorCode::InternalServerError, format!("cannot store the image: {e}")))
    }

    /// Checks every version left `pending` (for example by a restart during a check) and removes
    /// uploads that no pending version needs (a crash between receiving and registering one).
    pub async fn resume_image_validation(&self) -> Result<()> {
        let images = self.store.list_device_images().await?;
        let mut wanted = std::collections::HashSet::new();
        for image in &images {
            for v in &image.versions {
                if v.status == DeviceImageStatus::Pending {
                    wanted.insert(PathBuf::from(&v.source_image_resource_id));
                    self.spawn_validation(image.id, v.version.clone());
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.upload_dir()) {
            for path in entries.flatten().map(|e| e.path()) {
                let known = std::path::absolute(&path).map(|p| wanted.contains(&p)).unwrap_or(false);
                if !known {
                    tracing::info!(path = %path.display(), "removing an upload no image needs");
                    remove_quietly(&path).await;
                }
            }
        }
        Ok(())
    }

    fn spawn_validation(&self, id: Uuid, version: String) {
        let app = self.clone();
        tokio::spawn(async move { app.validate_device_image(id, &version).await });
    }

    /// Moves a pending version to `ready` or `failed`. Errors are logged: nobody waits on this task.
    pub async fn validate_device_image(&self, id: Uuid, version: &str) {
        let Ok(image) = self.store.get_device_image(id).await else { return };
        let Some(v) = image.versions.iter().find(|v| v.version == version).cloned() else { return };
        if v.status != DeviceImageStatus::Pending {
            return;
        }
        let source = PathBuf::from(&v.source_image_resource_id);
        let base = self.image_base(id, version);
        let checked = async {
            let size = self.check_image_file(&source).await?;
            self.take_copy(&source, &base).await?;
            let os = self.test_boot(id, version, &base, size).await?;
            Ok::<_, ImageRejection>((size, os))
        }
        .await;
        if checked.is_err() {
            remove_quietly(&base).await;
        }
        if v.uploaded {
            remove_quietly(&source).await;
        }
        let _guard = self.image_updates.lock().await;
        // Read again: another version may have been added, or the image deleted, meanwhile.
        let Ok(before) = self.store.get_device_image(id).await else {
            remove_quietly(&base).await;
            return;
        };
        let mut image = before.clone();
        let Some(entry) = image.version_mut(version) else { return };
        match checked {
            Ok((size, os)) => {
                entry.status = DeviceImageStatus::Ready;
                entry.size_in_gb = Some((size as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0);
                if let Some((name, build)) = os {
                    entry.operating_system.get_or_insert(name);
                    entry.os_build_number = entry.os_build_number.take().or(build);
                }
            }
            Err(r) => {
                tracing::info!(image = %id, version, code = ?r.code, reason = %r.message, "custom image refused");
                entry.status = DeviceImageStatus::Failed;
                entry.error_code = Some(r.code);
                entry.status_details = Some(r.message);
            }
        }
        entry.last_modified_date_time = Utc::now();
        image.refresh_current();
        let audit = image_change("Validate", AuditOperationType::Patch, &image).event(
            &Actor::system(),
            Some(&before),
            Some(&image),
        );
        if let Err(e) = self.store.update_device_image(&image, &audit).await {
            tracing::warn!(image = %id, error = %e, "could not record the result of an image check");
        } else {
            // A policy may have been waiting for a ready image.
            self.changed();
        }
    }

    async fn check_image_file(&self, path: &Path) -> Result<u64, ImageRejection> {
        use DeviceImageErrorCode::*;
        // A symlink in an import directory must not lead outside the allowed places.
        if let Ok(real) = path.canonicalize() {
            if !self.allowed_source_roots().iter().any(|root| real.starts_with(root)) {
                return Err(reject(
                    SourceImageInvalid,
                    format!("{} leads outside the import directories", path.display()),
                ));
            }
        }
        let owned = path.to_path_buf();
        let header_size = tokio::task::spawn_blocking(move || inspect_qcow2_header(&owned))
            .await
            .map_err(|e| reject(InternalServerError, e.to_string()))??;
        self.check_size(header_size)?;
        // Safe now: the header has no backing or data file for qemu-img to follow.
        let info = self.qemu_img(&["info", "--output=json", "-f", "qcow2"], path).await?;
        let size = check_image_info(&info)?;
        self.check_size(size)?;
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

    fn check_size(&self, size: u64) -> Result<(), ImageRejection> {
        let limit = self.config.max_image_size_gb << 30;
        if size > limit {
            return Err(reject(
                DeviceImageErrorCode::SourceImageSizeExceedsLimitation,
                format!(
                    "the image's virtual size is {} GiB; the limit is {} GiB",
                    size.div_ceil(1 << 30),
                    self.config.max_image_size_gb
                ),
            ));
        }
        Ok(())
    }

    async fn qemu_img(&self, args: &[&str], path: &Path) -> Result<serde_json::Value, ImageRejection> {
        use DeviceImageErrorCode::*;
        let out = tokio::process::Command::new(&self.config.qemu_img)
            .args(args)
            .arg(path)
            .output()
            .await
            .map_err(|e| reject(InternalServerError, format!("cannot run {}: {e}", self.config.qemu_img)))?;
        if !out.status.success() {
            let detail = String::from_utf8_lossy(&out.stderr);
            let first = detail.lines().next().unwrap_or("unreadable image").trim().to_string();
            return Err(reject(SourceImageInvalid, format!("qemu-img cannot read the image: {first}")));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| reject(InternalServerError, format!("qemu-img info gave unexpected output: {e}")))
    }

    /// Boots an overlay of the base through firmware in a throwaway VM (no network) and waits for
    /// the guest agent; returns the operating system the agent reports. The VM and overlay are
    /// removed whatever happens, and the VM's name is fixed per version so a check that resumes
    /// after a crash replaces the old one.
    async fn test_boot(
        &self,
        id: Uuid,
        version: &str,
        base: &Path,
        size: u64,
    ) -> Result<Option<(String, Option<String>)>, ImageRejection> {
        use DeviceImageErrorCode::*;
        if !self.config.image_test_boot {
            return Ok(None);
        }
        let Some(hv) = self.hosts.first().cloned() else {
            return Err(reject(InternalServerError, "there is no hypervisor host to test-boot the image on"));
        };
        let dir = self.config.image_dir.join("checks");
        tokio::fs::create_dir_all(&dir).await.map_err(|e| reject(InternalServerError, e.to_string()))?;
        let name = format!("{}imagecheck-{}-{}", self.config.domain_prefix, &id.simple().to_string()[..12], version);
        let overlay = dir.join(format!("{id}-{version}.qcow2"));
        let log = dir.join(format!("{id}-{version}.log"));
        let internal = |e: cloudpc_hypervisor::HypervisorError| {
            reject(InternalServerError, format!("the test boot could not run: {e}"))
        };
        let run = async {
            hv.remove_vm(&name).await.map_err(internal)?;
            hv.remove_file(&overlay).await.map_err(internal)?;
            hv.create_overlay(base, &overlay, size.div_ceil(1 << 30).max(1)).await.map_err(internal)?;
            let spec = VmSpec {
                name: name.clone(),
                vcpus: 1,
                memory_mib: 1024,
                disk: overlay.clone(),
                boot: Boot::Firmware,
                console_log: log.clone(),
            };
            hv.define_vm(&spec).await.map_err(internal)?;
            hv.start(&name).await.map_err(internal)?;
            let agent = GuestAgent::new(hv.as_ref(), &name);
            let limit = self.config.image_test_boot_timeout;
            let waited = agent.wait_ready(limit).await.map_err(|_| {
                reject(
                    SourceImageInvalid,
                    format!(
                        "the image did not answer through the QEMU guest agent within {} s of booting; \
                         install and enable qemu-guest-agent in the image",
                        limit.as_secs()
                    ),
                )
            })?;
            tracing::info!(image = %id, version, boot_secs = waited.as_secs_f64(), "test boot: the guest agent answered");
            // Without /etc/os-release the agent still knows the kernel.
            let os = agent.os_info().await.ok().map(|info| {
                let name = info["pretty-name"].as_str().or(info["name"].as_str()).unwrap_or("Linux").to_string();
                (name, info["kernel-release"].as_str().map(String::from))
            });
            Ok(os)
        }
        .await;
        if let Err(e) = hv.remove_vm(&name).await {
            tracing::warn!(vm = %name, error = %e, "could not remove the test-boot VM");
        }
        remove_quietly(&overlay).await;
        remove_quietly(&log).await;
        run
    }
}

/// What an upload becomes: a new image, or a new version of an existing one.
#[derive(Debug, Clone)]
pub enum UploadTarget {
    NewImage { display_name: String, version: String, operating_system: Option<String> },
    NewVersion { image_id: String, version: String },
}

impl UploadTarget {
    fn version(&self) -> &str {
        match self {
            UploadTarget::NewImage { version, .. } | UploadTarget::NewVersion { version, .. } => version,
        }
    }
}

fn pending_version(version: String, source: String, uploaded: bool) -> DeviceImageVersion {
    DeviceImageVersion {
        version,
        source_image_resource_id: source,
        uploaded,
        status: DeviceImageStatus::Pending,
        error_code: None,
        status_details: None,
        operating_system: None,
        os_build_number: None,
        size_in_gb: None,
        last_modified_date_time: Utc::now(),
    }
}

/// The second look, with `qemu-img info`: a qcow2 without backing or data file; its virtual size.
fn check_image_info(info: &serde_json::Value) -> Result<u64, ImageRejection> {
    use DeviceImageErrorCode::*;
    if info["format"] != "qcow2" {
        return Err(reject(SourceImageInvalid, format!("qemu-img reads the file as {}, not qcow2", info["format"])));
    }
    if info.get("backing-filename").is_some() || info.get("full-backing-filename").is_some() {
        return Err(reject(SourceImageInvalid, "the image names a backing file; import a standalone image"));
    }
    if info["format-specific"]["data"].get("data-file").is_some() {
        return Err(reject(SourceImageInvalid, "the image keeps its data in an external data file"));
    }
    info["virtual-size"].as_u64().ok_or_else(|| reject(SourceImageInvalid, "qemu-img reports no virtual size"))
}

async fn remove_quietly(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a file");
        }
    }
}
