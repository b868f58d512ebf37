//! The built-in gallery: images built by the project's own commands (see `images/`), found as
//! `manifest.json` files under the gallery directory and listed in `galleryImages`.

use std::path::Path;

use chrono::{Datelike, Utc};
use serde::Deserialize;

use cloudpc_types::images::{GalleryImage, GalleryImageStatus};
use cloudpc_types::provisioning::KernelBoot;

use crate::{App, Result};

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
    /// Registers every image found under `dir` (one sub-directory per image build).
    pub async fn register_gallery(&self, dir: &Path) -> Result<usize> {
        let mut n = 0;
        let Ok(entries) = std::fs::read_dir(dir) else { return Ok(0) };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            // A build in progress (or killed) writes into `<name>.tmp` before renaming it.
            if path.extension().is_some_and(|e| e == "tmp") {
                continue;
            }
            let manifest_path = path.join("manifest.json");
            let Ok(text) = std::fs::read_to_string(&manifest_path) else { continue };
            let m: Manifest = match serde_json::from_str(&text) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(path = %manifest_path.display(), error = %e, "skipping a gallery image with an unreadable manifest");
                    continue;
                }
            };
            let today = Utc::now().date_naive();
            let image = GalleryImage {
                id: m.id.clone(),
                display_name: m.display_name,
                publisher_name: m.publisher_name,
                offer_name: m.offer_name,
                sku_name: m.sku_name,
                // The disk a license must give at least (the virtual size), not the file's size.
                size_in_gb: crate::images::inspect_qcow2_header(&path.join(&m.disk))
                    .unwrap_or(m.disk_bytes)
                    .div_ceil(1 << 30) as u32,
                start_date: today,
                end_date: today.with_year(today.year() + 1).unwrap_or(today),
                expiration_date: today.with_year(today.year() + 1).unwrap_or(today),
                status: GalleryImageStatus::Supported,
            };
            let boot = match (m.kernel, m.initrd) {
                (Some(k), Some(i)) => Some(KernelBoot {
                    kernel: path.join(k),
                    initrd: path.join(i),
                    cmdline: m.cmdline.unwrap_or_default(),
                }),
                _ => None,
            };
            self.store.upsert_gallery_image(&image, &path.join(&m.disk), boot.as_ref()).await?;
            tracing::info!(image = %m.id, "gallery image registered");
            n += 1;
        }
        Ok(n)
    }
}
