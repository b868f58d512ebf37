//! The built-in gallery: images built by the project's own commands (see `images/`), found as
//! `manifest.json` files under the gallery directory and listed in `galleryImages`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use chrono::{Datelike, Utc};
use serde::Deserialize;

use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::images::{GalleryImage, GalleryImageStatus};
use cloudpc_types::provisioning::KernelBoot;

use crate::audit::{Actor, Change};
use crate::{App, Error, Result};

/// What an image build leaves next to its files.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    id: String,
    display_name: String,
    publisher_name: String,
    offer_name: String,
    sku_name: String,
    disk: String,
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
    disk_bytes: u64,
}

impl App {
    /// Registers every image found in the gallery directory (one sub-directory per image build). The newest
    /// build of each offer is `supported`; older builds stay usable but say `supportedWithWarning`
    /// (a newer build exists), as Windows 365 marks gallery images past their end date. A build
    /// registered before whose files are gone becomes `notSupported`: policies cannot pick it.
    pub async fn register_gallery(&self) -> Result<usize> {
        let dir = self.config.gallery_dir.as_path();
        // Deletions a crash interrupted.
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "deleting") {
                remove_build(&entry.path()).await;
            }
        }
        let builds = scan(dir);
        let mut newest: HashMap<&str, SystemTime> = HashMap::new();
        for b in &builds {
            let t = newest.entry(b.manifest.offer_name.as_str()).or_insert(b.built);
            *t = (*t).max(b.built);
        }
        let today = Utc::now().date_naive();
        for b in &builds {
            let m = &b.manifest;
            let superseded = newest.get(m.offer_name.as_str()).is_some_and(|t| *t > b.built);
            let image = GalleryImage {
                id: m.id.clone(),
                display_name: m.display_name.clone(),
                publisher_name: m.publisher_name.clone(),
                offer_name: m.offer_name.clone(),
                sku_name: m.sku_name.clone(),
                // The disk a license must give at least (the virtual size), not the file's size.
                size_in_gb: crate::images::inspect_qcow2_header(&b.path.join(&m.disk))
                    .unwrap_or(m.disk_bytes)
                    .div_ceil(1 << 30) as u32,
                start_date: today,
                end_date: today.with_year(today.year() + 1).unwrap_or(today),
                expiration_date: today.with_year(today.year() + 1).unwrap_or(today),
                status: if superseded {
                    GalleryImageStatus::SupportedWithWarning
                } else {
                    GalleryImageStatus::Supported
                },
            };
            let boot = match (&m.kernel, &m.initrd) {
                (Some(k), Some(i)) => Some(KernelBoot {
                    kernel: b.path.join(k),
                    initrd: b.path.join(i),
                    cmdline: m.cmdline.clone().unwrap_or_default(),
                }),
                _ => None,
            };
            self.store.upsert_gallery_image(&image, &b.path.join(&m.disk), boot.as_ref()).await?;
            tracing::info!(image = %m.id, status = ?image.status, "gallery image registered");
        }
        for mut gone in self.store.list_gallery_images().await? {
            if builds.iter().any(|b| b.manifest.id == gone.id) || gone.status == GalleryImageStatus::NotSupported {
                continue;
            }
            let (disk, boot) = self.store.gallery_image_files(&gone.id).await?;
            gone.status = GalleryImageStatus::NotSupported;
            self.store.upsert_gallery_image(&gone, &disk, boot.as_ref()).await?;
            tracing::warn!(image = %gone.id, "the files of a gallery image are gone; it is no longer supported");
        }
        Ok(builds.len())
    }

    /// Deletes an image build nothing uses any more, to free its space: its registration, then
    /// its directory (only one that lies directly inside the gallery directory). Without the
    /// directory the build is not registered again at the next start.
    pub async fn delete_gallery_image(&self, actor: &Actor, id: &str) -> Result<()> {
        let doomed = {
            // Under the image lock: a Cloud PC that has read this image stores its spec first.
            let _guard = self.image_updates.lock().await;
            let image = self.store.get_gallery_image(id).await?;
            let (disk, _) = self.store.gallery_image_files(id).await?;
            let audit = Change {
                component: "Images",
                activity: "Delete GalleryImage".into(),
                operation: AuditOperationType::Delete,
                resource_type: "galleryImage",
                resource_id: image.id.clone(),
                resource_name: image.display_name.clone(),
            }
            .event(actor, Some(&image), None);
            let build = disk
                .parent()
                .filter(|b| b.parent() == Some(self.config.gallery_dir.as_path()) && b.is_dir())
                .map(Path::to_path_buf);
            // Out of the scan's sight first (a rename is quick, the removal is not and happens
            // after the lock): a crash or a failed removal never brings the build back.
            let doomed = match &build {
                Some(b) => {
                    let mut to = b.clone().into_os_string();
                    to.push(".deleting");
                    let to = PathBuf::from(to);
                    std::fs::rename(b, &to).map_err(|e| Error::HostIo(format!("cannot move {}: {e}", b.display())))?;
                    Some(to)
                }
                None => {
                    tracing::warn!(disk = %disk.display(), "a deleted gallery image's files are not a build in the gallery; left alone");
                    None
                }
            };
            if let Err(e) = self.store.delete_gallery_image(id, &audit).await {
                if let (Some(b), Some(to)) = (&build, &doomed) {
                    if let Err(e) = std::fs::rename(to, b) {
                        tracing::error!(dir = %to.display(), error = %e, "cannot put back a gallery build that stays registered");
                    }
                }
                return Err(e.into());
            }
            doomed
        };
        if let Some(dir) = doomed {
            remove_build(&dir).await;
        }
        // The offer's other builds: the newest of them is now the current one.
        if let Err(e) = self.register_gallery().await {
            tracing::warn!(error = %e, "cannot refresh the gallery after a deletion");
        }
        Ok(())
    }
}

async fn remove_build(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a deleted gallery build");
        }
    }
}

/// A manifest names its files inside its own build directory, nothing else.
fn plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None))
}

/// One image build found in the gallery directory.
struct Build {
    path: PathBuf,
    manifest: Manifest,
    /// When its disk was written: the newest build of an offer is the current one.
    built: SystemTime,
}

fn scan(dir: &Path) -> Vec<Build> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        // A build in progress (or killed) writes into `<name>.tmp` before renaming it; a deleted
        // one is renamed to `<name>.deleting` before its removal.
        if path.extension().is_some_and(|e| e == "tmp" || e == "deleting") {
            continue;
        }
        let manifest_path = path.join("manifest.json");
        let Ok(text) = std::fs::read_to_string(&manifest_path) else { continue };
        let manifest: Manifest = match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(path = %manifest_path.display(), error = %e, "skipping a gallery image with an unreadable manifest");
                continue;
            }
        };
        let names = [Some(&manifest.disk), manifest.kernel.as_ref(), manifest.initrd.as_ref()];
        if !names.into_iter().flatten().all(|n| plain_file_name(n)) {
            tracing::warn!(path = %manifest_path.display(), "skipping a gallery image whose manifest names files outside its directory");
            continue;
        }
        let Ok(built) = std::fs::metadata(path.join(&manifest.disk)).and_then(|m| m.modified()) else {
            tracing::warn!(path = %path.display(), "skipping a gallery image without its disk");
            continue;
        };
        out.push(Build { path, manifest, built });
    }
    out
}
