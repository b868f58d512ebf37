//! What cloudpc remembers about a Cloud PC beyond its Graph view: the workflow's position and the
//! ids of everything provisioning made, so that any step can be redone or undone after a crash.
//!
//! Ids are chosen before the step that uses them runs (and persisted), so a step that is run
//! again finds what it made the first time instead of making a second one.

use std::path::PathBuf;
use std::sync::Arc;

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
    /// The network connection the Cloud PC is on: the policy's first whose health checks passed
    /// when the generation started. None: the region's hosted network.
    #[serde(default)]
    pub connection_id: Option<uuid::Uuid>,
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
    /// Where the host keeps the image files this Cloud PC boots from, once they reached it.
    #[serde(default)]
    pub image_on_host: Option<ImageOnHost>,
}

/// One image file on a host: its content's digest and the host's path to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostFile {
    pub sha256: String,
    pub path: PathBuf,
}

/// The base disk (and kernel, for direct kernel boot) of a Cloud PC, as its host has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageOnHost {
    pub disk: HostFile,
    pub kernel: Option<HostFile>,
    pub initrd: Option<HostFile>,
}

impl ImageOnHost {
    pub fn digests(&self) -> impl Iterator<Item = &str> {
        [Some(&self.disk), self.kernel.as_ref(), self.initrd.as_ref()].into_iter().flatten().map(|f| f.sha256.as_str())
    }
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
    /// The step to run next, by name (`done` when all ran). Records written before steps were
    /// stored by name hold their position in the original thirteen steps instead.
    #[serde(deserialize_with = "step_name_or_legacy_position")]
    pub next_step: String,
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
    /// The host the Cloud PC is being moved to (a drain), until the move is done.
    #[serde(default)]
    pub moving_to: Option<String>,
    /// Set while the Cloud PC is a machine of a policy's warm pool (booted, no user yet).
    #[serde(default)]
    pub pool: Option<PoolMember>,
    /// This generation's VM was booted ahead of time in a warm pool and claimed for the user:
    /// its identity is refreshed before the user-specific steps.
    #[serde(default)]
    pub claimed_from_pool: bool,
    /// Steps after the claim point that a warm-pool machine ran while it waited (they are the
    /// same for every user); the workflow passes over them after the claim.
    #[serde(default)]
    pub done_in_pool: Vec<String>,
}

/// A warm-pool machine: which policy it waits for, and what it was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolMember {
    pub policy_id: Uuid,
    /// What of the policy the machine was built from (image, its version, network); a policy
    /// edit that changes it makes the machine stale, and it is rebuilt.
    pub fingerprint: String,
    /// Booted and waiting for a user (claimable).
    pub ready: bool,
}

impl PoolMember {
    /// What a claim looks for: a machine of this policy built to its current fingerprint, so a
    /// stale machine (one the reconciler is about to remove) is never given to a user.
    pub fn claim_key(policy_id: Uuid, fingerprint: &str) -> String {
        format!("{policy_id} {fingerprint}")
    }
}

impl CloudPcRecord {
    /// The claim key while the Cloud PC is a booted, idle, unclaimed warm-pool machine; `None`
    /// otherwise (booting, failed, being moved, rebuilt or removed, or a user's).
    pub fn claimable_as(&self) -> Option<String> {
        let pool = self.state.pool.as_ref()?;
        let claimable = pool.ready
            && self.state.phase == Phase::Idle
            && self.pc.status == CloudPcStatus::Pooled
            && self.state.moving_to.is_none();
        claimable.then(|| PoolMember::claim_key(pool.policy_id, &pool.fingerprint))
    }
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
            next_step: String::new(),
            spec: None,
            resources: Resources::default(),
            warnings: Vec::new(),
            initial_password: None,
            cleanup_at: None,
            status_before_grace: None,
            requested_at: now,
            boot_ms: None,
            moving_to: None,
            pool: None,
            claimed_from_pool: false,
            done_in_pool: Vec::new(),
        }
    }
}

/// The steps in the order of the first releases, which stored progress as a position in it.
const LEGACY_STEP_ORDER: [&str; 13] = [
    "allocateCapacity",
    "createVm",
    "attachNetwork",
    "joinDirectory",
    "enrollManagement",
    "setPrimaryUser",
    "setHostname",
    "createUserAccount",
    "addLocalAdmin",
    "setTimeZone",
    "growDisk",
    "blockRemoteDesktop",
    "assignUser",
];

fn step_name_or_legacy_position<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Name(String),
        Position(u32),
    }
    Ok(match Stored::deserialize(d)? {
        Stored::Name(n) => n,
        Stored::Position(i) => LEGACY_STEP_ORDER.get(i as usize).map_or("done", |n| n).to_string(),
    })
}

/// A Cloud PC as stored: the Graph view and the workflow state, written together.
///
/// `version` and `base` make writes compare-and-swap: the store writes a record only if the row
/// still has `version`, and `base` is the record as it was read at that version, so a writer whose
/// copy went stale (the workflow holds its copy for the length of a step) can [`rebase`] its own
/// changes onto the newer row instead of undoing someone else's.
///
/// [`rebase`]: CloudPcRecord::rebase
#[derive(Debug, Clone, PartialEq)]
pub struct CloudPcRecord {
    pub pc: CloudPc,
    pub state: ProvisioningState,
    /// The stored row's version this copy was read at (0: never stored).
    pub version: u64,
    /// The record as read at `version`, set by the store.
    pub base: Option<Arc<(CloudPc, ProvisioningState)>>,
}

impl CloudPcRecord {
    pub fn new(pc: CloudPc, state: ProvisioningState) -> Self {
        Self { pc, state, version: 0, base: None }
    }

    /// Applies the changes this copy made since `base` onto `newer` (the row as stored now): a
    /// field this copy changed takes this copy's value, every other field keeps the newer one.
    /// Fields are compared one by one down through nested objects; lists and plain values are
    /// compared whole. Returns the merged record, at `newer`'s version, and the fields both
    /// changed to different values (this copy's value is kept for them; the caller logs them).
    pub fn rebase(&self, newer: &CloudPcRecord) -> (CloudPcRecord, Vec<String>) {
        let Some(base) = self.base.as_deref() else {
            // Nothing to compare with: every field counts as changed by this copy.
            let mut merged = self.clone();
            merged.version = newer.version;
            merged.base = newer.base.clone();
            return (merged, Vec::new());
        };
        let mut conflicts = Vec::new();
        let pc = merge_value(&to_value(&base.0), &to_value(&self.pc), to_value(&newer.pc), "pc", &mut conflicts);
        let state =
            merge_value(&to_value(&base.1), &to_value(&self.state), to_value(&newer.state), "state", &mut conflicts);
        // Both sides are our own types, serialized a moment ago, so they read back.
        let merged = CloudPcRecord {
            pc: serde_json::from_value(pc).expect("merged Cloud PC reads back"),
            state: serde_json::from_value(state).expect("merged provisioning state reads back"),
            version: newer.version,
            base: newer.base.clone(),
        };
        (merged, conflicts)
    }
}

fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("record serializes to JSON")
}

/// Three-way merge of one JSON value: `mine` changed from `base`, `theirs` is the newer stored one.
fn merge_value(
    base: &serde_json::Value,
    mine: &serde_json::Value,
    theirs: serde_json::Value,
    path: &str,
    conflicts: &mut Vec<String>,
) -> serde_json::Value {
    use serde_json::Value;
    if mine == base {
        return theirs;
    }
    if let (Value::Object(b), Value::Object(m), Value::Object(t)) = (base, mine, &theirs) {
        let mut out = t.clone();
        let keys: std::collections::BTreeSet<&String> = b.keys().chain(m.keys()).collect();
        for k in keys {
            let (bv, mv) = (b.get(k).unwrap_or(&Value::Null), m.get(k).unwrap_or(&Value::Null));
            let tv = t.get(k).cloned().unwrap_or(Value::Null);
            let merged = merge_value(bv, mv, tv, &format!("{path}.{k}"), conflicts);
            out.insert(k.clone(), merged);
        }
        return Value::Object(out);
    }
    if &theirs != base && &theirs != mine {
        conflicts.push(path.to_string());
    }
    mine.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> CloudPcRecord {
        let now = Utc::now();
        let pc: CloudPc = serde_json::from_value(serde_json::json!({
            "id": Uuid::new_v4(), "displayName": "Old name", "userPrincipalName": "a@b.c",
            "servicePlanId": Uuid::new_v4(), "servicePlanName": "plan", "provisioningType": "dedicated",
            "status": "provisioning", "powerState": "unknown", "lastModifiedDateTime": now,
            "userAccountType": "standardUser"
        }))
        .expect("a Cloud PC");
        let mut rec = CloudPcRecord::new(pc, ProvisioningState::new(Uuid::new_v4(), Uuid::new_v4(), now));
        rec.base = Some(Arc::new((rec.pc.clone(), rec.state.clone())));
        rec.version = 3;
        rec
    }

    #[test]
    fn test_progress_stored_as_a_position_reads_as_the_step_name() {
        let mut v = serde_json::to_value(record().state).unwrap();
        v["nextStep"] = serde_json::json!(3);
        let state: ProvisioningState = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(state.next_step, "joinDirectory");
        v["nextStep"] = serde_json::json!(13);
        assert_eq!(serde_json::from_value::<ProvisioningState>(v.clone()).unwrap().next_step, "done");
        v["nextStep"] = serde_json::json!("growDisk");
        assert_eq!(serde_json::from_value::<ProvisioningState>(v).unwrap().next_step, "growDisk");
    }

    #[test]
    fn rebase_keeps_changes_made_meanwhile_and_adds_mine() {
        let mine_base = record();
        // Meanwhile an admin renamed it and read the one-time password.
        let mut theirs = mine_base.clone();
        theirs.pc.display_name = "New name".into();
        theirs.state.initial_password = None;
        theirs.version = 4;
        // The workflow, from its older copy, finished a step.
        let mut mine = mine_base.clone();
        mine.state.next_step = "setPrimaryUser".into();
        mine.state.resources.host = Some("local".into());
        let (merged, conflicts) = mine.rebase(&theirs);
        assert_eq!(merged.pc.display_name, "New name");
        assert_eq!(merged.state.next_step, "setPrimaryUser");
        assert_eq!(merged.state.resources.host.as_deref(), Some("local"));
        assert_eq!(merged.version, 4);
        assert!(conflicts.is_empty(), "{conflicts:?}");
    }

    #[test]
    fn rebase_does_not_bring_back_a_password_that_was_read() {
        let mut base = record();
        base.state.initial_password = Some("secret".into());
        base.base = Some(Arc::new((base.pc.clone(), base.state.clone())));
        let mut theirs = base.clone();
        theirs.state.initial_password = None;
        let mut mine = base.clone();
        mine.state.next_step = "createVm".into();
        let (merged, _) = mine.rebase(&theirs);
        assert_eq!(merged.state.initial_password, None);
    }

    #[test]
    fn rebase_reports_fields_both_changed() {
        let base = record();
        let mut theirs = base.clone();
        theirs.pc.status_detail = Some("theirs".into());
        let mut mine = base.clone();
        mine.pc.status_detail = Some("mine".into());
        let (merged, conflicts) = mine.rebase(&theirs);
        assert_eq!(merged.pc.status_detail.as_deref(), Some("mine"));
        assert_eq!(conflicts, vec!["pc.statusDetail".to_string()]);
    }
}
