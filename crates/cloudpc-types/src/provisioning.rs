//! What cloudpc remembers about a Cloud PC beyond its Graph view: the workflow's position and the
//! ids of everything provisioning made, so that any step can be redone or undone after a crash.
//!
//! Ids are chosen before the step that uses them runs (and persisted), so a step that is run
//! again finds what it made the first time instead of making a second one.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::cloud_pc::{CloudPc, CloudPcStatus};

/// The hardware and image a generation of a Cloud PC is built from, copied from the license and
/// policy when the generation starts: later edits do not reach an existing Cloud PC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub storage_gib: u64,
    pub image_id: String,
    /// The custom image's version this generation is built from (gallery images: none).
    #[serde(default)]
    pub image_version: Option<String>,
    pub image_disk: PathBuf,
    /// Direct kernel boot (gallery images that ship a kernel); `None` boots through firmware.
    pub kernel: Option<KernelBoot>,
    pub region: String,
    pub naming_template: Option<String>,
    pub local_admin: bool,
    pub time_zone: Option<String>,
    pub grace_period_hours: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

/// What the workflow is doing with the Cloud PC's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Nothing runs (notProvisioned, provisioned, failed waiting for clean-up, in grace).
    Idle,
    /// Running the steps forward from `next_step`.
    Forward,
    /// Undoing everything, then starting the next attempt.
    UndoThenRetry,
    /// Undoing everything, then starting a new generation (reprovision, admin retry).
    UndoThenRestart,
    /// Undoing everything, then forgetting the Cloud PC (clean-up after deprovisioning).
    UndoThenDelete,
    /// Undoing everything and staying as is (clean-up of a failed Cloud PC, which keeps its Retry).
    UndoThenIdle,
}

/// The ids of what the current generation made (or is about to make).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    pub host: Option<String>,
    pub domain: Option<String>,
    pub disk: Option<PathBuf>,
    pub console_log: Option<PathBuf>,
    pub network: Option<String>,
    pub mac: Option<String>,
    pub device_id: Option<Uuid>,
    pub managed_device_id: Option<Uuid>,
    pub username: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningState {
    pub user_id: Uuid,
    pub sku_id: Uuid,
    pub phase: Phase,
    pub generation: u32,
    /// Core attempts in this round (1-based); three fail in a row → failed.
    pub attempt: u32,
    /// Attempts since the generation started, for step records (admin retries continue it).
    pub attempt_total: u32,
    pub next_step: u32,
    pub spec: Option<BuildSpec>,
    pub resources: Resources,
    /// Post-provisioning steps that failed, as "step: error".
    pub warnings: Vec<String>,
    /// The generated one-time password until the admin has retrieved it.
    pub initial_password: Option<String>,
    /// When clean-up may run (after a final failure or a deprovision).
    pub cleanup_at: Option<DateTime<Utc>>,
    /// Status to return to when a grace period ends because the cause was restored.
    pub status_before_grace: Option<CloudPcStatus>,
    /// When the current generation was asked for, to measure time to provisioned.
    pub requested_at: DateTime<Utc>,
    /// Milliseconds from VM start to the guest agent answering (guest boot).
    pub boot_ms: Option<u64>,
}

impl ProvisioningState {
    pub fn new(user_id: Uuid, sku_id: Uuid, now: DateTime<Utc>) -> Self {
        Self {
            user_id,
            sku_id,
            phase: Phase::Idle,
            generation: 0,
            attempt: 0,
            attempt_total: 0,
            next_step: 0,
            spec: None,
            resources: Resources::default(),
            warnings: Vec::new(),
            initial_password: None,
            cleanup_at: None,
            status_before_grace: None,
            requested_at: now,
            boot_ms: None,
        }
    }
}

/// A Cloud PC as stored: the Graph view and the workflow state, written together.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudPcRecord {
    pub pc: CloudPc,
    pub state: ProvisioningState,
}
