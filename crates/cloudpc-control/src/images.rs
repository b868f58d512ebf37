//! Images: the built-in gallery and custom device images imported from qcow2 files.
//!
//! A device image version is stored as `pending`, then checked in the background, cheapest and
//! safest check first: the qcow2 header is read by hand, so that a file naming a backing file or
//! an external data file (which could make QEMU read any host file) is refused before any QEMU tool
//! opens it; `qemu-img info` confirms the format and virtual size, `qemu-img check` looks for
//! corruption and truncation; `qemu-img measure` tells how much the copy will write (compressed
//! clusters expand), which must fit in the free space beyond the reserve before any of it is
//! written; the file is copied into cloudpc's own base file; and a throwaway VM
//! boots an overlay of that copy through firmware and must have its guest agent answer in time,
//! since provisioning configures every Cloud PC through that agent. Pending versions are checked
//! again after a restart. Sources come from an upload streamed through the API into the upload
//! area, or from a path in an import directory on the server's host, which is first copied into
//! the staging area so that every check reads the same bytes (both removed once checked). Every
//! `qemu-img` runs under memory, CPU-time and wall-time limits ([`crate::bounded`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use uuid::Uuid;

use cloudpc_guest::GuestAgent;
use cloudpc_hypervisor::{Boot, VmSpec};
use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::images::{
    self as image_types, DeviceImage, DeviceImageCreate, DeviceImageErrorCode, DeviceImageStatus, DeviceImageVersion,
    DeviceImageVersionCreate, GalleryImage, SourceImageFormat,
};
use cloudpc_types::policy::ImageType;

use crate::audit::{Actor, Change};
use crate::bounded::{self, BoundedError, Limits};
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
        return Err(reject(
            SourceImageInvalid,
            "the file is not a qcow2 image (a raw disk image is imported with format=raw, or --format raw)",
        ));
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
        let mut images = self.store.list_device_images().await?;
        images.iter_mut().for_each(|i| self.show_check_steps(i));
        Ok(images)
    }

    pub async fn get_device_image(&self, id: &str) -> Result<DeviceImage> {
        let mut image = self.store.get_device_image(parse_id("deviceImage", id)?).await?;
        self.show_check_steps(&mut image);
        Ok(image)
    }

    /// Adds what each pending version's check is doing now. Kept in memory rather than stored:
    /// it changes every few seconds, is worth nothing after a restart (the check starts over),
    /// and would otherwise fill the audit log.
    fn show_check_steps(&self, image: &mut DeviceImage) {
        let steps = self.image_check_steps.lock().unwrap_or_else(|e| e.into_inner());
        for v in image.versions.iter_mut().filter(|v| v.status == DeviceImageStatus::Pending) {
            if let Some((step, since)) = steps.get(&(image.id, v.version.clone())) {
                v.check_step = Some((*step).to_string());
                v.check_step_since = Some(*since);
            }
        }
    }

    pub(crate) fn enter_check_step(&self, id: Uuid, version: &str, step: Option<&'static str>) {
        let mut steps = self.image_check_steps.lock().unwrap_or_else(|e| e.into_inner());
        match step {
            Some(step) => steps.insert((id, version.to_string()), (step, Utc::now())),
            None => steps.remove(&(id, version.to_string())),
        };
    }

    /// Registers the image with its first version `pending` and starts checking it in the background.
    pub async fn create_device_image(&self, actor: &Actor, input: DeviceImageCreate) -> Result<DeviceImage> {
        self.create_image(actor, input, false).await
    }

    async fn create_image(&self, actor: &Actor, input: DeviceImageCreate, uploaded: bool) -> Result<DeviceImage> {
        let mut first = DeviceImageVersion::pending(
            input.version,
            input.source_image_resource_id,
            input.source_image_format,
            uploaded,
        );
        first.operating_system = input.operating_system;
        first.os_build_number = input.os_build_number;
        let image = DeviceImage::new_pending(Uuid::new_v4(), input.display_name, first);
        image.validate()?;
        if !uploaded {
            self.check_import_path(&image.source_image_resource_id)?;
        }
        let audit = image_change("Create", AuditOperationType::Create, &image).event(actor, None, Some(&image));
        // Counted and created under the image lock, so two creations cannot both take the last place.
        let guard = self.image_updates.lock().await;
        self.check_room_for_an_image().await?;
        self.store.create_device_image(&image, &audit).await?;
        drop(guard);
        self.spawn_validation(image.id, image.version.clone());
        Ok(image)
    }

    /// Refuses a new image when the server already keeps the most it allows (failed ones count
    /// until deleted, as their files and records do).
    async fn check_room_for_an_image(&self) -> Result<()> {
        let n = self.store.list_device_images().await?.len();
        if n >= self.config.max_custom_images {
            return Err(self.no_room_for_an_image(n, 0));
        }
        Ok(())
    }

    /// Before an upload of a new image streams: counts it until it ends, so that uploads in
    /// flight cannot each pass the limit and all be refused after their bytes have arrived.
    async fn reserve_room_for_an_image(&self) -> Result<UploadReservation> {
        let n = self.store.list_device_images().await?.len();
        let uploading = self.new_image_uploads.fetch_add(1, Ordering::SeqCst);
        let reservation = UploadReservation(self.new_image_uploads.clone());
        if n + uploading >= self.config.max_custom_images {
            return Err(self.no_room_for_an_image(n, uploading));
        }
        Ok(reservation)
    }

    fn no_room_for_an_image(&self, images: usize, uploading: usize) -> Error {
        let max = self.config.max_custom_images;
        let also = if uploading > 0 { format!(" (and {uploading} being uploaded)") } else { String::new() };
        Error::Conflict(format!(
            "there are already {images} custom images{also}, the most this server keeps ({max}); delete one, or add \
             a version to an existing image"
        ))
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
        let version = DeviceImageVersion::pending(
            input.version,
            input.source_image_resource_id,
            input.source_image_format,
            false,
        );
        self.add_version(actor, id, version).await
    }

    async fn add_version(&self, actor: &Actor, id: &str, version: DeviceImageVersion) -> Result<DeviceImage> {
        let id = parse_id("deviceImage", id)?;
        let _guard = self.image_updates.lock().await;
        let before = self.store.get_device_image(id).await?;
        before.check_new_version(&version.version)?;
        let mut image = before.clone();
        let v = version.version.clone();
        // A failed version may be submitted again under its number.
        image.versions.retain(|e| e.version != v);
        image.versions.push(version);
        image.refresh_current();
        let audit =
            image_change("Add version to", AuditOperationType::Patch, &image).event(actor, Some(&before), Some(&image));
        self.store.update_device_image(&image, &audit).await?;
        self.spawn_validation(id, v);
        Ok(image)
    }

    /// Receives an uploaded image into the upload area, then registers it like a host file:
    /// as a new image, or as a new version of one.
    pub async fn upload_device_image(
        &self,
        actor: &Actor,
        target: UploadTarget,
        format: SourceImageFormat,
        content_length: Option<u64>,
        body: impl AsyncRead + Unpin + Send,
    ) -> Result<DeviceImage> {
        // Check the names and the announced size before spending the bandwidth.
        if content_length.is_some_and(|n| n > self.max_source_bytes()) {
            return Err(self.too_large());
        }
        image_types::image_version(target.version())?;
        let _reservation = match &target {
            UploadTarget::NewImage { display_name, .. } => {
                cloudpc_types::validate::display_name("displayName", display_name, 256)?;
                // Before the bytes are streamed; checked again when the image is created.
                Some(self.reserve_room_for_an_image().await?)
            }
            UploadTarget::NewVersion { image_id, version } => {
                self.get_device_image(image_id).await?.check_new_version(version)?;
                None
            }
        };
        let Ok(_streaming) = self.uploads.clone().try_acquire_owned() else {
            return Err(Error::Busy(format!(
                "the server is already receiving {} image upload(s), the most it takes at once; try again when one has finished",
                self.config.max_concurrent_uploads.max(1)
            )));
        };
        let path = self.receive_upload(content_length, body).await?;
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
                    source_image_format: format,
                };
                self.create_image(actor, input, true).await
            }
            UploadTarget::NewVersion { image_id, version } => {
                let version = DeviceImageVersion::pending(version, source, format, true);
                self.add_version(actor, &image_id, version).await
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

    fn upload_dir(&self) -> PathBuf {
        self.config.image_dir.join("uploads")
    }

    /// Private copies of host files, so every check and the final copy read the same bytes.
    fn staging_dir(&self) -> PathBuf {
        self.config.image_dir.join("staging")
    }

    fn checks_dir(&self) -> PathBuf {
        self.config.image_dir.join("checks")
    }

    /// The largest source file accepted: a qcow2 file is at most its virtual size plus metadata
    /// (1/64 covers it).
    fn max_source_bytes(&self) -> u64 {
        (self.config.max_image_size_gb << 30) + (self.config.max_image_size_gb << 24) + (1 << 20)
    }

    fn no_space(&self) -> Error {
        Error::InsufficientStorage(format!(
            "the server has too little free space for this image (it keeps {} free for its Cloud PCs)",
            human_bytes(self.config.image_free_space_reserve)
        ))
    }

    fn too_large(&self) -> Error {
        Error::TooLarge(format!(
            "the upload is larger than an image of the {} GiB limit can be",
            self.config.max_image_size_gb
        ))
    }

    /// Streams the body to a file, refusing it past the size limit; a failed upload leaves nothing.
    async fn receive_upload(
        &self,
        content_length: Option<u64>,
        body: impl AsyncRead + Unpin + Send,
    ) -> Result<PathBuf> {
        let dir = self.upload_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::HostIo(format!("cannot create {}: {e}", dir.display())))?;
        let dir = std::path::absolute(&dir).map_err(|e| Error::HostIo(e.to_string()))?;
        let done = dir.join(format!("{}.qcow2", Uuid::new_v4()));
        let reserve = self.config.image_free_space_reserve;
        if content_length.is_some_and(|n| free_bytes(&dir).is_some_and(|free| free < n + reserve)) {
            return Err(self.no_space());
        }
        match copy_capped(body, &done, self.max_source_bytes(), self.config.upload_idle_timeout, reserve).await {
            Ok(0) => {
                remove_quietly(&done).await;
                Err(Error::invalid("body", "the upload is empty"))
            }
            Ok(_) => Ok(done),
            Err(CopyFailure::TooLarge) => Err(self.too_large()),
            Err(CopyFailure::NoSpace) => Err(self.no_space()),
            Err(CopyFailure::Read(e)) => Err(Error::invalid("body", format!("the upload broke off: {e}"))),
            Err(CopyFailure::Write(e)) => Err(Error::HostIo(format!("cannot store the upload: {e}"))),
        }
    }

    /// Copies a host file into the staging area. The file is opened once (never blocking on a
    /// FIFO), must be a regular file, and its real path (symlinks resolved, read back from the open
    /// descriptor) must lie in an import directory; from then on only the copy is read, so
    /// swapping the file during the checks changes nothing.
    async fn stage_host_file(&self, source: &Path, id: Uuid, version: &str) -> Result<PathBuf, ImageRejection> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        use DeviceImageErrorCode::*;
        let file = std::fs::OpenOptions::new().read(true).custom_flags(O_NONBLOCK).open(source).map_err(|e| match e
            .kind()
        {
            std::io::ErrorKind::NotFound => reject(SourceImageNotFound, format!("no file at {}", source.display())),
            _ => reject(SourceImageNotFound, format!("cannot read {}: {e}", source.display())),
        })?;
        let meta = file.metadata().map_err(|e| reject(SourceImageNotFound, e.to_string()))?;
        if !meta.is_file() {
            return Err(reject(SourceImageInvalid, format!("{} is not a regular file", source.display())));
        }
        let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| reject(InternalServerError, format!("cannot tell where {} leads: {e}", source.display())))?;
        let roots: Vec<PathBuf> = self.import_dirs().iter().filter_map(|d| d.canonicalize().ok()).collect();
        if !roots.iter().any(|root| real.starts_with(root)) {
            return Err(reject(
                SourceImageInvalid,
                format!("{} leads outside the import directories", source.display()),
            ));
        }
        let dir = self.staging_dir();
        tokio::fs::create_dir_all(&dir).await.map_err(|e| reject(InternalServerError, e.to_string()))?;
        let staged = dir.join(format!("{id}-{version}.qcow2"));
        // A local file never stalls the way a client can; the limit is only a backstop.
        let idle = Duration::from_secs(3600);
        let reserve = self.config.image_free_space_reserve;
        match copy_capped(tokio::fs::File::from_std(file), &staged, self.max_source_bytes(), idle, reserve).await {
            Ok(_) => Ok(staged),
            Err(CopyFailure::TooLarge) => Err(reject(
                SourceImageSizeExceedsLimitation,
                format!("the file is larger than an image of the {} GiB limit can be", self.config.max_image_size_gb),
            )),
            // Not the image's fault: the check runs again later.
            Err(CopyFailure::NoSpace) => {
                Err(reject(InternalServerError, "the server has too little free space to stage the image"))
            }
            Err(CopyFailure::Read(e)) => {
                Err(reject(SourceImageInvalid, format!("cannot read {}: {e}", source.display())))
            }
            Err(CopyFailure::Write(e)) => Err(reject(InternalServerError, format!("cannot stage the image: {e}"))),
        }
    }

    pub async fn delete_device_image(&self, actor: &Actor, id: &str) -> Result<()> {
        // Under the image lock, so a version added meanwhile is not missed by the clean-up below.
        let _guard = self.image_updates.lock().await;
        // From the store, not the getter that adds check steps: the audit keeps what was stored.
        let image = self.store.get_device_image(parse_id("deviceImage", id)?).await?;
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

    /// Deletes one version of a custom image and its files, to free their space. Refused while the
    /// version is being checked, while a Cloud PC is built from it (its overlay sits on the
    /// version's base), for the image's only version (delete the image instead), and for the last
    /// ready version of an image that a policy uses.
    pub async fn delete_device_image_version(&self, actor: &Actor, id: &str, version: &str) -> Result<()> {
        let id = parse_id("deviceImage", id)?;
        let _guard = self.image_updates.lock().await;
        let before = self.store.get_device_image(id).await?;
        let Some(gone) = before.versions.iter().find(|v| v.version == version).cloned() else {
            return Err(Error::NotFound { kind: "deviceImage version", id: version.to_string() });
        };
        if gone.status == DeviceImageStatus::Pending {
            return Err(Error::Conflict(format!(
                "version {version} is still being checked; delete it once its check is over"
            )));
        }
        if before.versions.len() == 1 {
            return Err(Error::Conflict(format!(
                "version {version} is the image's only version; delete the image instead"
            )));
        }
        let image_id = id.to_string();
        let base = self.image_base(id, version);
        let built_from: Vec<String> = self
            .store
            .list_cloud_pc_records()
            .await?
            .into_iter()
            .filter(|r| {
                // By version, or by base file for specs written before versions existed.
                r.state.spec.as_ref().is_some_and(|s| {
                    s.image_id == image_id && (s.image_version.as_deref() == Some(version) || s.image_disk == base)
                })
            })
            .map(|r| format!("'{}'", r.pc.managed_device_name.unwrap_or_else(|| r.pc.id.to_string())))
            .collect();
        if !built_from.is_empty() {
            return Err(Error::Conflict(format!(
                "version {version} is used by Cloud PC {}; reprovision it onto another version first",
                built_from.join(", ")
            )));
        }
        let mut image = before.clone();
        image.versions.retain(|v| v.version != version);
        image.refresh_current();
        if !image.versions.iter().any(|v| v.status == DeviceImageStatus::Ready) {
            let policies: Vec<String> = self
                .store
                .list_policies()
                .await?
                .into_iter()
                .filter(|p| p.image_type == ImageType::Custom && p.image_id == image_id)
                .map(|p| format!("'{}'", p.display_name))
                .collect();
            if !policies.is_empty() {
                return Err(Error::Conflict(format!(
                    "version {version} is the image's last ready version and provisioning policy {} uses the image",
                    policies.join(", ")
                )));
            }
        }
        let audit = image_change("Delete version of", AuditOperationType::Patch, &image).event(
            actor,
            Some(&before),
            Some(&image),
        );
        self.store.update_device_image(&image, &audit).await?;
        remove_quietly(&base).await;
        if gone.uploaded {
            remove_quietly(Path::new(&gone.source_image_resource_id)).await;
        }
        Ok(())
    }

    /// cloudpc's own copy of one version of a custom image: Cloud PCs use overlays on it, never the
    /// source file, so the source can be moved or changed without touching them.
    pub fn image_base(&self, id: Uuid, version: &str) -> PathBuf {
        self.config.image_dir.join(format!("{id}-{version}.qcow2"))
    }

    /// Copies a checked image into its base file (flattened by `qemu-img convert`, written under a
    /// temporary name and renamed, so a crash never leaves a half-copied base). First makes sure
    /// what the copy will write fits: a few MiB of compressed clusters can expand to the image's
    /// whole virtual size.
    async fn take_copy(&self, source: &Path, base: &Path, format: SourceImageFormat) -> Result<(), ImageRejection> {
        self.check_room_for_copy(source, base, format).await?;
        let partial = base.with_extension("qcow2.partial");
        let args = [
            "convert".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            format.qemu_name().as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            source.as_os_str(),
            partial.as_os_str(),
        ];
        let out = self.run_qemu_img("copying the image", &args, COPY_LIMITS).await;
        let out = match out {
            Ok(out) => out,
            Err(r) => {
                remove_quietly(&partial).await;
                return Err(r);
            }
        };
        if !out.status.success() {
            remove_quietly(&partial).await;
            let detail = String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("").to_string();
            if detail.contains("No space left on device") {
                // Not the image's fault (the space went elsewhere meanwhile): the check runs again later.
                return Err(reject(
                    DeviceImageErrorCode::InternalServerError,
                    "the server's disk filled up while the image was being copied",
                ));
            }
            return Err(reject(
                DeviceImageErrorCode::SourceImageInvalid,
                format!("the image could not be copied: {detail}"),
            ));
        }
        tokio::fs::rename(&partial, base)
            .await
            .map_err(|e| reject(DeviceImageErrorCode::InternalServerError, format!("cannot store the image: {e}")))
    }

    /// Start-up: brings image records from before versions into the versioned shape, removes what
    /// interrupted checks left (test-boot VMs, overlays, staged and partial copies, bases and
    /// uploads no version needs), then checks every version still `pending` again.
    pub async fn resume_image_validation(&self) -> Result<()> {
        let mut images = self.store.list_device_images().await?;
        for image in images.iter_mut().filter(|i| i.versions.is_empty()) {
            self.migrate_unversioned(image).await?;
        }
        // Sweeping and resuming wait in the background until no other replica is alive: one that
        // runs could be writing an upload or booting a test VM that looks like a leftover. After a
        // crash that is the dead process's last heartbeat (15 s); on SQLite, at once.
        // What exists now is what an earlier run left; anything newer is this run's own work.
        // "Now" is read from the file system's clock (a marker file's time), which is coarser than
        // the system clock: a file made a moment after start could otherwise look older than it.
        let started = self.sweep_marker_time().await;
        let prefix = format!("{}imagecheck-", self.config.domain_prefix);
        let old_vms = match self.local_hosts().first() {
            Some(hv) => hv.list_vms(&prefix).await.unwrap_or_default(),
            None => Vec::new(),
        };
        let app = self.clone();
        tokio::spawn(async move {
            let alone = app.wait_until_alone(Duration::from_secs(20)).await;
            // Read again for what to keep: versions may have been added while this waited.
            let now = app.store.list_device_images().await.unwrap_or_else(|_| images.clone());
            if alone {
                app.sweep_image_leftovers(&now, &old_vms, started).await;
            } else {
                tracing::info!("other replicas are running: leftovers of image checks are left for a restart");
            }
            for image in &images {
                for v in image.versions.iter().filter(|v| v.status == DeviceImageStatus::Pending) {
                    app.spawn_validation(image.id, v.version.clone());
                }
            }
        });
        Ok(())
    }

    /// The file system's idea of now: the time of a marker file made (and removed) in the image
    /// directory. If it cannot be made, nothing counts as older (nothing is swept).
    async fn sweep_marker_time(&self) -> std::time::SystemTime {
        let marker = self.config.image_dir.join(".start-marker");
        let made = async {
            tokio::fs::create_dir_all(&self.config.image_dir).await?;
            tokio::fs::write(&marker, b"").await?;
            let t = tokio::fs::metadata(&marker).await?.modified()?;
            tokio::fs::remove_file(&marker).await?;
            std::io::Result::Ok(t)
        };
        made.await.unwrap_or(std::time::UNIX_EPOCH)
    }

    /// Removes the test-boot VMs an earlier run left and the image files, older than this run,
    /// that no image version needs.
    async fn sweep_image_leftovers(&self, images: &[DeviceImage], old_vms: &[String], started: std::time::SystemTime) {
        if let Some(hv) = self.local_hosts().first() {
            for vm in old_vms {
                tracing::info!(vm = %vm, "removing a test-boot VM an interrupted check left");
                let _ = hv.remove_vm(vm).await;
            }
        }
        let mut keep = std::collections::HashSet::new();
        for image in images {
            for v in &image.versions {
                if v.status == DeviceImageStatus::Ready {
                    keep.insert(self.image_base(image.id, &v.version));
                }
                if v.status == DeviceImageStatus::Pending && v.uploaded {
                    keep.insert(PathBuf::from(&v.source_image_resource_id));
                }
            }
        }
        let keep: std::collections::HashSet<PathBuf> =
            keep.iter().filter_map(|p| std::path::absolute(p).ok()).collect();
        for dir in [self.config.image_dir.clone(), self.upload_dir(), self.staging_dir(), self.checks_dir()] {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for path in entries.flatten().map(|e| e.path()).filter(|p| p.is_file()) {
                let known = std::path::absolute(&path).map(|p| keep.contains(&p)).unwrap_or(false);
                let ours = std::fs::metadata(&path).and_then(|m| m.modified()).is_ok_and(|t| t >= started);
                if !known && !ours {
                    tracing::info!(path = %path.display(), "removing a file no image version needs");
                    remove_quietly(&path).await;
                }
            }
        }
    }

    /// An image stored before versions existed becomes its own first version; its base file
    /// moves to the versioned name.
    async fn migrate_unversioned(&self, image: &mut DeviceImage) -> Result<()> {
        let before = image.clone();
        let mut first =
            // Images from before versions were all qcow2.
            DeviceImageVersion::pending(
                image.version.clone(),
                image.source_image_resource_id.clone(),
                SourceImageFormat::Qcow2,
                false,
            );
        first.status = image.status;
        first.error_code = image.error_code;
        first.status_details = image.status_details.clone();
        first.size_in_gb = image.size_in_gb;
        first.last_modified_date_time = image.last_modified_date_time;
        image.versions.push(first);
        let old = self.config.image_dir.join(format!("{}.qcow2", image.id));
        if old.exists() {
            tokio::fs::rename(&old, self.image_base(image.id, &image.version))
                .await
                .map_err(|e| Error::HostIo(format!("cannot rename {}: {e}", old.display())))?;
        }
        let audit = image_change("Migrate", AuditOperationType::Patch, image).event(
            &Actor::system(),
            Some(&before),
            Some(image),
        );
        self.store.update_device_image(image, &audit).await?;
        Ok(())
    }

    /// Checks one version in the background; a check that could not run (no host, libvirt down)
    /// is tried again later instead of failing an image that may be fine.
    fn spawn_validation(&self, id: Uuid, version: String) {
        // One check per version in this process, however often it is asked for.
        if !self.checks_running.lock().expect("checks").insert((id, version.clone())) {
            return;
        }
        let app = self.clone();
        tokio::spawn(async move {
            let _running = CheckRunning { app: app.clone(), key: (id, version.clone()) };
            // One replica checks a version: the check holds a lease, renewed while it runs.
            let lease = format!("image-check:{id}:{version}");
            let ttl = Duration::from_secs(30);
            // Another replica checks it, or a dead one held it: wait until the version is
            // no longer pending or the lease is free.
            loop {
                match app.store.try_lease(&lease, app.replica(), ttl).await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(image = %id, error = %e, "cannot lease an image check; trying again"),
                }
                let pending = app.store.get_device_image(id).await.is_ok_and(|i| {
                    i.versions.iter().any(|v| v.version == version && v.status == DeviceImageStatus::Pending)
                });
                if !pending {
                    return;
                }
                tokio::time::sleep(ttl / 6).await;
            }
            let renewer = {
                let (app, lease) = (app.clone(), lease.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(ttl / 3).await;
                        let _ = app.store.try_lease(&lease, app.replica(), ttl).await;
                    }
                })
            };
            let mut delay = Duration::from_secs(5);
            while !app.validate_device_image(id, &version).await {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(300));
            }
            renewer.abort();
            let _ = app.store.release_lease(&lease, app.replica()).await;
        });
    }

    /// Moves a pending version to `ready` or `failed`; returns false when the check should be
    /// tried again. Errors are logged: nobody waits on this task.
    pub async fn validate_device_image(&self, id: Uuid, version: &str) -> bool {
        let image = match self.store.get_device_image(id).await {
            Ok(image) => image,
            Err(cloudpc_store::StoreError::NotFound { .. }) => return true,
            Err(e) => {
                tracing::warn!(image = %id, error = %e, "cannot read an image to check it; trying again later");
                return false;
            }
        };
        let Some(v) = image.versions.iter().find(|v| v.version == version).cloned() else { return true };
        if v.status != DeviceImageStatus::Pending {
            return true;
        }
        let source = PathBuf::from(&v.source_image_resource_id);
        let base = self.image_base(id, version);
        let mut staged = None;
        let step = |name| self.enter_check_step(id, version, Some(name));
        // Cleared however the check ends, a panic included.
        let _clear = CheckStepGuard { app: self, id, version };
        let checked = async {
            let file = if v.uploaded {
                source.clone()
            } else {
                step("staging");
                staged.insert(self.stage_host_file(&source, id, version).await?).clone()
            };
            step("inspecting");
            let size = self.check_image_file(&file, v.source_image_format).await?;
            step("copying");
            self.take_copy(&file, &base, v.source_image_format).await?;
            step("waitingForTestBoot");
            let os = self.test_boot(id, version, &base, size).await?;
            Ok::<_, ImageRejection>((size, os))
        }
        .await;
        if let Some(path) = &staged {
            remove_quietly(path).await;
        }
        if checked.is_err() {
            remove_quietly(&base).await;
        }
        if let Err(r) = &checked {
            if r.code == DeviceImageErrorCode::InternalServerError {
                tracing::warn!(image = %id, version, reason = %r.message, "an image check could not run; trying again later");
                return false;
            }
        }
        let _guard = self.image_updates.lock().await;
        // Read again: another version may have been added, or the image deleted, meanwhile.
        let before = match self.store.get_device_image(id).await {
            Ok(image) => image,
            Err(cloudpc_store::StoreError::NotFound { .. }) => {
                remove_quietly(&base).await;
                if v.uploaded {
                    remove_quietly(&source).await;
                }
                return true;
            }
            Err(e) => {
                tracing::warn!(image = %id, error = %e, "cannot record an image check; checking again later");
                return false;
            }
        };
        let mut image = before.clone();
        let Some(entry) = image.version_mut(version) else { return true };
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
            tracing::warn!(image = %id, error = %e, "could not record the result of an image check; checking again later");
            return false;
        }
        // Only now that the result is stored: a crash before this point checks the upload again.
        if v.uploaded {
            remove_quietly(&source).await;
        }
        // A policy may have been waiting for a ready image.
        self.changed();
        true
    }

    /// Checks a file cloudpc holds (an upload or a staged copy); returns its virtual size.
    async fn check_image_file(&self, path: &Path, format: SourceImageFormat) -> Result<u64, ImageRejection> {
        use DeviceImageErrorCode::*;
        let owned = path.to_path_buf();
        if format == SourceImageFormat::Raw {
            let size = tokio::task::spawn_blocking(move || inspect_raw(&owned))
                .await
                .map_err(|e| reject(InternalServerError, e.to_string()))??;
            self.check_size(size)?;
            return Ok(size);
        }
        let header_size = tokio::task::spawn_blocking(move || inspect_qcow2_header(&owned))
            .await
            .map_err(|e| reject(InternalServerError, e.to_string()))??;
        self.check_size(header_size)?;
        // Safe now: the header has no backing or data file for qemu-img to follow.
        let info = self.qemu_img(&["info", "--output=json", "-f", "qcow2"], path).await?;
        let size = check_image_info(&info)?;
        self.check_size(size)?;
        let args = ["check".as_ref(), "-q".as_ref(), "-f".as_ref(), "qcow2".as_ref(), path.as_os_str()];
        let out = self.run_qemu_img("checking the image", &args, INSPECT_LIMITS).await?;
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
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        all.push(path.as_os_str());
        let out = self.run_qemu_img("reading the image", &all, INSPECT_LIMITS).await?;
        if !out.status.success() {
            let detail = String::from_utf8_lossy(&out.stderr);
            let first = detail.lines().next().unwrap_or("unreadable image").trim().to_string();
            return Err(reject(SourceImageInvalid, format!("qemu-img cannot read the image: {first}")));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| reject(InternalServerError, format!("qemu-img info gave unexpected output: {e}")))
    }

    /// `qemu-img measure`: the bytes the copy will write (data, expanded, plus metadata; zeros stay
    /// holes) must fit in the free space beyond the reserve.
    async fn check_room_for_copy(
        &self,
        source: &Path,
        base: &Path,
        format: SourceImageFormat,
    ) -> Result<(), ImageRejection> {
        use DeviceImageErrorCode::*;
        let args = [
            "measure".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            format.qemu_name().as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            source.as_os_str(),
        ];
        let out = self.run_qemu_img("measuring the image", &args, INSPECT_LIMITS).await?;
        if !out.status.success() {
            let detail = String::from_utf8_lossy(&out.stderr);
            let first = detail.lines().next().unwrap_or("unreadable image").trim().to_string();
            return Err(reject(SourceImageInvalid, format!("qemu-img cannot measure the image: {first}")));
        }
        let measured: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| reject(InternalServerError, format!("qemu-img measure gave unexpected output: {e}")))?;
        let required = measured["required"]
            .as_u64()
            .ok_or_else(|| reject(InternalServerError, format!("qemu-img measure gave no size: {measured}")))?;
        let dir = base.parent().unwrap_or(Path::new("."));
        let Some(free) = free_bytes(dir) else {
            return Err(reject(InternalServerError, format!("cannot tell the free space of {}", dir.display())));
        };
        let reserve = self.config.image_free_space_reserve;
        if required.saturating_add(reserve) > free {
            return Err(reject(
                SourceImageSizeExceedsLimitation,
                format!(
                    "the image holds {} of data once copied (compressed data expands), but the server has only {} \
                     free beyond the {} it keeps for its Cloud PCs; free space or import a smaller image",
                    human_bytes(required),
                    human_bytes(free.saturating_sub(reserve)),
                    human_bytes(reserve)
                ),
            ));
        }
        Ok(())
    }

    /// Every `qemu-img` call: under `limits`; a limit that stops it is the image's failure
    /// (a crafted image), saying which limit and while doing `what`.
    async fn run_qemu_img(
        &self,
        what: &str,
        args: &[&std::ffi::OsStr],
        limits: Limits,
    ) -> Result<std::process::Output, ImageRejection> {
        use DeviceImageErrorCode::*;
        bounded::run(&self.config.qemu_img, args, &limits).await.map_err(|e| match e {
            BoundedError::Spawn { .. } => reject(InternalServerError, e.to_string()),
            _ => reject(SourceImageInvalid, format!("{what} was stopped: {e}")),
        })
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
        let Some(hv) = self.test_boot_host().await else {
            return Err(reject(InternalServerError, "there is no hypervisor host to test-boot the image on"));
        };
        // One test boot at a time: parallel boots under emulation could miss the agent's deadline.
        let _turn = self.image_boots.lock().await;
        self.enter_check_step(id, version, Some("testBoot"));
        let dir = self.checks_dir();
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
            // A host behind an agent gets the image by content first, as for a Cloud PC.
            let base = if hv.ships_images() {
                let digest = self.image_digest(base).await.map_err(|e| reject(InternalServerError, e.to_string()))?;
                hv.ensure_image(&digest, base).await.map_err(internal)?
            } else {
                base.to_path_buf()
            };
            hv.create_overlay(&base, &overlay, size.div_ceil(1 << 30).max(1)).await.map_err(internal)?;
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
                let name = info["pretty-name"].as_str().or(info["name"].as_str()).unwrap_or("Linux");
                (guest_text(name), info["kernel-release"].as_str().map(guest_text))
            });
            Ok(os)
        }
        .await;
        if let Err(e) = hv.remove_vm(&name).await {
            tracing::warn!(vm = %name, error = %e, "could not remove the test-boot VM");
        }
        for file in [&overlay, &log] {
            if let Err(e) = hv.remove_file(file).await {
                tracing::warn!(file = %file.display(), error = %e, "could not remove a test-boot file");
            }
        }
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

/// The container format a file's first bytes announce, if any (the signatures `qemu-img` probes).
fn container_format(head: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0, &QCOW2_MAGIC.to_be_bytes()) {
        Some("qcow2")
    } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        Some("VMDK")
    } else if at(0, b"vhdxfile") {
        Some("VHDX")
    } else if at(0, b"conectix") {
        Some("VHD")
    } else if at(0, b"QED\0") {
        Some("QED")
    } else if at(0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
        Some("VDI")
    } else if at(0, b"LUKS\xba\xbe") {
        Some("LUKS")
    } else {
        None
    }
}

/// A raw disk has no header to trust or distrust: its virtual size is its length. It must not be
/// a container in disguise (converted as raw, that would become a disk holding the container
/// file, and a VMDK descriptor can name other host files).
fn inspect_raw(path: &Path) -> Result<u64, ImageRejection> {
    use DeviceImageErrorCode::*;
    let mut file = std::fs::File::open(path)
        .map_err(|e| reject(SourceImageNotFound, format!("cannot read {}: {e}", path.display())))?;
    let size = file.metadata().map_err(|e| reject(SourceImageNotFound, e.to_string()))?.len();
    let mut head = Vec::with_capacity(512);
    (&mut file).take(512).read_to_end(&mut head).map_err(|e| reject(SourceImageInvalid, e.to_string()))?;
    match container_format(&head) {
        Some("qcow2") => {
            return Err(reject(SourceImageInvalid, "the file is a qcow2 image, not a raw disk; import it as qcow2"));
        }
        Some(other) => {
            return Err(reject(
                SourceImageInvalid,
                format!(
                    "the file is a {other} image, not a raw disk; convert it first (qemu-img convert -O qcow2) and \
                     import the result"
                ),
            ));
        }
        None => {}
    }
    if size == 0 || size % 512 != 0 {
        return Err(reject(
            SourceImageInvalid,
            format!("a raw disk image is a whole number of 512-byte sectors; this file has {size} bytes"),
        ));
    }
    Ok(size)
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

/// What the guest says about itself is the image author's text: bounded, no control characters.
fn guest_text(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(256).collect()
}

/// `O_NONBLOCK` on Linux: opening a FIFO must not wait for a writer.
const O_NONBLOCK: i32 = 0o4000;

/// Limits of `qemu-img info`, `check` and `measure`: they read metadata only.
const INSPECT_LIMITS: Limits = Limits { memory: 1 << 30, cpu_secs: 300, wall: Duration::from_secs(600) };

/// Limits of the copy: it reads (and may decompress) every cluster of an image of up to the
/// maximum size. A stuck copy (a crafted image, a hung file system) must not hold a check forever.
const COPY_LIMITS: Limits = Limits { memory: 2 << 30, cpu_secs: 3600, wall: Duration::from_secs(1800) };

/// Sizes in messages: MiB below a GiB, GiB with one decimal above.
fn human_bytes(n: u64) -> String {
    if n < 1 << 30 {
        format!("{} MiB", n.div_ceil(1 << 20))
    } else {
        format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64)
    }
}

/// Bytes available to cloudpc on the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

#[derive(Debug)]
enum CopyFailure {
    NoSpace,
    TooLarge,
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Forgets a version's check in `checks_running` when its task ends, however it ends.
struct CheckRunning {
    app: App,
    key: (Uuid, String),
}

impl Drop for CheckRunning {
    fn drop(&mut self) {
        self.app.checks_running.lock().expect("checks").remove(&self.key);
    }
}

/// Copies a stream into `dest` (through `dest.partial` and a rename), at most `limit` bytes;
/// returns the size. A source that gives nothing for `idle` fails it. Nothing stays behind when it
/// fails.
async fn copy_capped(
    mut from: impl AsyncRead + Unpin,
    dest: &Path,
    limit: u64,
    idle: Duration,
    reserve: u64,
) -> Result<u64, CopyFailure> {
    let partial = dest.with_extension("qcow2.partial");
    let outcome = async {
        let mut file = tokio::fs::File::create(&partial).await.map_err(CopyFailure::Write)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total: u64 = 0;
        let dir = dest.parent().unwrap_or(Path::new("."));
        loop {
            let n = tokio::time::timeout(idle, from.read(&mut buf))
                .await
                .map_err(|_| {
                    CopyFailure::Read(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("nothing arrived for {} s", idle.as_secs()),
                    ))
                })?
                .map_err(CopyFailure::Read)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > limit {
                return Err(CopyFailure::TooLarge);
            }
            // Every 64 MiB: stop before the reserve is eaten.
            if total % (64 << 20) < n as u64 && free_bytes(dir).is_some_and(|free| free < reserve) {
                return Err(CopyFailure::NoSpace);
            }
            // Runs of zeros become holes: a sparse disk image stays sparse in cloudpc's copies.
            if buf[..n].iter().all(|&b| b == 0) {
                file.seek(std::io::SeekFrom::Current(n as i64)).await.map_err(CopyFailure::Write)?;
            } else {
                file.write_all(&buf[..n]).await.map_err(CopyFailure::Write)?;
            }
        }
        file.set_len(total).await.map_err(CopyFailure::Write)?;
        file.sync_all().await.map_err(CopyFailure::Write)?;
        tokio::fs::rename(&partial, dest).await.map_err(CopyFailure::Write)?;
        Ok(total)
    }
    .await;
    if outcome.is_err() {
        remove_quietly(&partial).await;
    }
    outcome
}

async fn remove_quietly(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a file");
        }
    }
}

/// Clears a version's check step when dropped.
struct CheckStepGuard<'a> {
    app: &'a App,
    id: Uuid,
    version: &'a str,
}

impl Drop for CheckStepGuard<'_> {
    fn drop(&mut self) {
        self.app.enter_check_step(self.id, self.version, None);
    }
}

/// One upload of a new image in flight, counted against the image limit until it is dropped.
struct UploadReservation(Arc<AtomicUsize>);

impl Drop for UploadReservation {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn copies_keep_runs_of_zeros_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        // 32 MiB of zeros with 1 MiB of data in the middle, as a mostly empty disk image is.
        let mut source = vec![0u8; 32 << 20];
        source[(16 << 20)..(17 << 20)].fill(0xa5);
        let dest = dir.path().join("copy.qcow2");
        let n = copy_capped(&source[..], &dest, 64 << 20, Duration::from_secs(5), 0).await.unwrap();
        assert_eq!(n, 32 << 20);
        let meta = std::fs::metadata(&dest).unwrap();
        assert_eq!(meta.len(), 32 << 20, "the copy has the full length");
        assert!(meta.blocks() * 512 < 4 << 20, "only the data takes space: {} bytes", meta.blocks() * 512);
        assert_eq!(std::fs::read(&dest).unwrap(), source, "and the same bytes");
    }

    #[test]
    fn container_signatures_are_recognized() {
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        for (head, format) in [
            (&b"QFI\xfb\0\0\0\x03"[..], Some("qcow2")),
            (b"# Disk DescriptorFile\nversion=1\n", Some("VMDK")),
            (b"KDMV\x01\0\0\0", Some("VMDK")),
            (b"vhdxfile", Some("VHDX")),
            (b"conectix", Some("VHD")),
            (b"QED\0", Some("QED")),
            (&vdi[..], Some("VDI")),
            (b"LUKS\xba\xbe\0\x01", Some("LUKS")),
            (&[0u8; 512][..], None),
            (b"\xeb\x63\x90", None),
        ] {
            assert_eq!(container_format(head), format, "{head:?}");
        }
    }
}
