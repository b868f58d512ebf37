//! The provisioning workflow: one task per Cloud PC walks its steps, persisting each before the
//! next begins, so a crash at any point resumes where it stopped.
//!
//! Every step is idempotent (the ids it uses were chosen and saved before it ran) and the undo of
//! the whole workflow is too ("already gone" counts as done). Core steps that fail are retried
//! twice, undoing everything between attempts; post-provisioning steps that fail only add a
//! warning. Retry policy, written down once: API requests never retry; core steps retry as a
//! whole attempt (three in all); undo is re-run by the reconciler until it succeeds.

pub mod steps;
#[cfg(test)]
mod tests;

use std::time::Instant;

use chrono::{DateTime, Utc};
use rand::Rng;
use uuid::Uuid;

use cloudpc_types::cloud_pc::{CloudPcStatus, PowerState, ProvisioningStage, ProvisioningStepRecord, StepStatus};
use cloudpc_types::images::{DeviceImageStatus, GalleryImageStatus};
use cloudpc_types::policy::{ImageType, NamingTemplate};
use cloudpc_types::provisioning::{BuildSpec, CloudPcRecord, KernelBoot, Phase, Resources};

use crate::{App, Error, Result};

pub use steps::{ProvisioningStep, STEPS};

/// Core attempts before a Cloud PC is marked failed.
pub const MAX_ATTEMPTS: u32 = 3;

/// What running one step came to.
pub enum Outcome {
    Done {
        detail: Option<String>,
    },
    /// Cannot go on yet (no capacity); the Cloud PC waits and is tried again later.
    Wait(String),
    Failed(String),
}

/// Releases (or holds off) the workflow lease when the task ends, however it ends.
struct LeaseRelease {
    app: App,
    id: Uuid,
}

impl Drop for LeaseRelease {
    fn drop(&mut self) {
        let (app, id) = (self.app.clone(), self.id);
        tokio::spawn(async move {
            let store = app.store.clone();
            let more_work = store.get_cloud_pc_record(id).await.is_ok_and(|r| r.state.phase != Phase::Idle);
            let done = if more_work {
                store.claim_workflow(id, app.replica(), crate::replicas::WAIT_HOLD_OFF).await.map(|_| ())
            } else {
                store.release_workflow(id, app.replica()).await
            };
            if let Err(e) = done {
                tracing::warn!(cloud_pc = %id, error = %e, "could not release the workflow lease; it expires by itself");
            }
        });
    }
}

/// Removes the workflow guard when the task ends, however it ends.
struct RunningGuard {
    app: App,
    id: Uuid,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.app.running.lock().expect("running set").remove(&self.id);
    }
}

fn random_alnum(len: usize) -> String {
    const CHARS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..len).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect()
}

/// The policy's naming template, or Windows 365's default one.
pub(crate) fn naming_template(policy: &cloudpc_types::policy::ProvisioningPolicy) -> String {
    policy.cloud_pc_naming_template.clone().unwrap_or_else(|| "CPC-%USERNAME:4%-%RAND:5%".into())
}

/// The Cloud PC's device name from the policy's naming template and the user's nickname.
pub(crate) fn device_name(template: &str, nickname: &str) -> Result<String> {
    Ok(NamingTemplate::parse(template)?.expand(nickname, &mut || random_alnum(1).chars().next().unwrap_or('X')))
}

fn random_mac() -> String {
    let mut rng = rand::thread_rng();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", rng.gen::<u8>(), rng.gen::<u8>(), rng.gen::<u8>())
}

pub fn step_record(
    rec: &CloudPcRecord,
    name: &str,
    stage: ProvisioningStage,
    start: DateTime<Utc>,
) -> ProvisioningStepRecord {
    ProvisioningStepRecord {
        cloud_pc_id: rec.pc.id,
        generation: rec.state.generation,
        attempt: rec.state.attempt_total,
        sequence: steps::step_named(name).map_or(steps::STEPS.len() as u32, |(i, _)| i as u32),
        name: name.to_string(),
        stage,
        status: StepStatus::Running,
        start_date_time: start,
        end_date_time: None,
        duration_in_milliseconds: None,
        error: None,
        detail: None,
    }
}

pub(crate) fn finish(step: &mut ProvisioningStepRecord, status: StepStatus, started: Instant) {
    step.status = status;
    step.end_date_time = Some(Utc::now());
    step.duration_in_milliseconds = Some(started.elapsed().as_millis() as u64);
}

impl App {
    /// Starts the workflow task of a Cloud PC unless one runs already, here or (holding its
    /// lease) on another replica.
    pub fn drive(&self, id: Uuid) {
        if self.running.lock().expect("running set").contains(&id) {
            return;
        }
        let app = self.clone();
        tokio::spawn(async move {
            if app.claim(id).await {
                app.drive_claimed(id);
            }
        });
    }

    /// Runs the workflow of a Cloud PC whose lease this replica holds. When the task ends with
    /// work left (waiting for capacity, or an error), the lease is kept for a hold-off and then
    /// any replica's scan picks the Cloud PC up again; otherwise it is released.
    pub(crate) fn drive_claimed(&self, id: Uuid) {
        if !self.running.lock().expect("running set").insert(id) {
            return;
        }
        let app = self.clone();
        tokio::spawn(async move {
            let _guard = RunningGuard { app: app.clone(), id };
            let _lease = LeaseRelease { app: app.clone(), id };
            let _slot = app.slots.clone().acquire_owned().await;
            let task = app.clone();
            // Supervised: a panic outside a step (steps catch their own) fails this Cloud PC only.
            match crate::supervise::supervised(async move { task.run_workflow(id).await }).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(cloud_pc = %id, error = %e, "provisioning workflow stopped; the reconciler will resume it")
                }
                Err(panic) => app.report_internal_error(id, None, "running its provisioning workflow", &panic).await,
            }
        });
    }

    /// Takes one injected fault for the step, if any are left (testing only).
    fn take_fault(&self, step: &str) -> bool {
        let mut faults = self.faults.lock().expect("faults");
        match faults.get_mut(step) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Fixes what a new generation is built from (license size, policy, image) and resets its
    /// resources. Called when provisioning starts and on reprovision.
    /// A generation that cannot start (its image is gone or not ready) fails at once with the
    /// reason. The Cloud PC still names the policy, so the reconciler sees it as that policy's
    /// (and leaves it be) and Retry can start it once the cause is fixed.
    pub(crate) async fn could_not_start(&self, rec: &mut CloudPcRecord, policy: Uuid, e: &Error) {
        rec.state.phase = Phase::Idle;
        self.retire_failed_pool_machine(rec);
        rec.pc.status = CloudPcStatus::Failed;
        rec.pc.status_detail = Some(format!("Provisioning could not start: {e}"));
        rec.pc.provisioning_policy_id = Some(policy);
        if let Ok(p) = self.store.get_policy(policy).await {
            rec.pc.provisioning_policy_name = Some(p.display_name);
        }
    }

    /// Callers hold `image_updates` until the new spec is stored: the image it names cannot be
    /// deleted in between (deletion refuses images that a stored spec names).
    pub(crate) async fn start_generation(&self, rec: &mut CloudPcRecord, policy_id: Uuid) -> Result<()> {
        let policy = self.store.get_policy(policy_id).await?;
        let sku = self.store.get_sku(rec.state.sku_id).await?;
        // A warm-pool machine has no user yet: its user-specific settings come with the claim.
        let user = match rec.state.pool {
            Some(_) => None,
            None => Some(self.store.get_user(rec.state.user_id).await?),
        };
        let mut image_version = None;
        let (image_disk, kernel) = match policy.image_type {
            ImageType::Gallery => {
                let image = self.store.get_gallery_image(&policy.image_id).await?;
                if image.status == GalleryImageStatus::NotSupported {
                    return Err(Error::Conflict(format!(
                        "the policy's gallery image '{}' is no longer supported (its files are gone); point the \
                         policy at another image",
                        image.display_name
                    )));
                }
                self.store.gallery_image_files(&policy.image_id).await?
            }
            ImageType::Custom => {
                let id = Uuid::parse_str(&policy.image_id)
                    .map_err(|_| Error::Conflict("the policy's image id is not valid".into()))?;
                let image = self.store.get_device_image(id).await?;
                let ready = image.current().filter(|v| v.status == DeviceImageStatus::Ready).ok_or_else(|| {
                    Error::Conflict(format!("the policy's image '{}' has no ready version", image.display_name))
                })?;
                image_version = Some(ready.version.clone());
                (self.image_base(id, &ready.version), None::<KernelBoot>)
            }
        };
        self.maybe_inject_panic("startGeneration");
        if let Some(pause) = self.config.injected_delays.get("startGeneration") {
            tokio::time::sleep(*pause).await;
        }
        let (region, connection_id) = self.network_of(&policy).await?;
        let template = naming_template(&policy);
        let name = match &user {
            Some(user) => device_name(&template, &user.mail_nickname)?,
            None => format!("POOL-{}", random_alnum(8)),
        };
        rec.state.spec = Some(BuildSpec {
            vcpus: sku.v_cpu_count,
            memory_mib: u64::from(sku.ram_in_gb) * 1024,
            storage_gib: u64::from(sku.storage_in_gb),
            image_id: policy.image_id.clone(),
            image_version,
            image_disk,
            kernel,
            region,
            naming_template: Some(template),
            local_admin: policy.local_admin_enabled,
            time_zone: policy.time_zone.clone(),
            grace_period_hours: policy.grace_period_in_hours,
            connection_id,
        });
        if let Some(pool) = rec.state.pool.as_mut() {
            let spec = rec.state.spec.as_ref().expect("set above");
            pool.fingerprint = crate::pool::fingerprint(&policy, spec.image_version.as_deref(), &sku);
            pool.ready = false;
        }
        rec.state.claimed_from_pool = false;
        rec.state.done_in_pool.clear();
        rec.state.generation += 1;
        rec.state.attempt = 1;
        rec.state.attempt_total = 1;
        rec.state.next_step = steps::STEPS[0].name().to_string();
        rec.state.phase = Phase::Forward;
        rec.state.warnings.clear();
        rec.state.initial_password = None;
        rec.state.cleanup_at = None;
        rec.state.boot_ms = None;
        rec.state.resources = self.new_resources(&name);
        rec.pc.provisioning_policy_id = Some(policy.id);
        rec.pc.provisioning_policy_name = Some(policy.display_name.clone());
        rec.pc.image_display_name = Some(policy.image_display_name.clone());
        rec.pc.image_version = rec.state.spec.as_ref().and_then(|s| s.image_version.clone());
        rec.pc.service_plan_id = sku.sku_id;
        rec.pc.service_plan_name = sku.service_plans.first().map(|p| p.service_plan_name.clone()).unwrap_or_default();
        rec.pc.provisioning_type = policy.provisioning_type;
        rec.pc.user_principal_name = user.as_ref().map(|u| u.user_principal_name.clone()).unwrap_or_default();
        rec.pc.managed_device_name = Some(name.clone());
        let whose = user.as_ref().map_or("warm pool", |u| u.display_name.as_str());
        rec.pc.display_name = format!("{} - {whose}", policy.display_name).chars().take(64).collect();
        rec.pc.status = CloudPcStatus::Provisioning;
        rec.pc.status_detail = None;
        rec.pc.provisioned_date_time = None;
        rec.pc.grace_period_end_date_time = None;
        rec.pc.power_state = PowerState::Unknown;
        // A new VM is never hibernated: left saved, its RAM would not be counted on its host.
        rec.pc.power_state_detail = None;
        rec.pc.last_modified_date_time = Utc::now();
        Ok(())
    }

    /// The region and network connection of a new generation: the policy's join configurations
    /// in order, the first one that is the hosted network or whose connection is healthy (its
    /// checks passed, warnings allowed), as Windows 365 picks among a policy's connections.
    async fn network_of(&self, policy: &cloudpc_types::policy::ProvisioningPolicy) -> Result<(String, Option<Uuid>)> {
        let configs = &policy.domain_join_configurations;
        let connections = if configs.iter().any(|c| c.on_premises_connection_id.is_some()) {
            self.list_network_connections().await?
        } else {
            Vec::new()
        };
        let mut unhealthy = Vec::new();
        for config in configs {
            let Some(id) = config.on_premises_connection_id.as_deref() else {
                return Ok((config.region_name.clone(), None));
            };
            match connections.iter().find(|c| c.id.to_string().eq_ignore_ascii_case(id)) {
                Some(c)
                    if matches!(
                        c.health_check_status,
                        cloudpc_types::network::HealthCheckStatus::Passed
                            | cloudpc_types::network::HealthCheckStatus::Warning
                    ) =>
                {
                    return Ok((c.region_name.clone(), Some(c.id)));
                }
                Some(c) => unhealthy.push(format!(
                    "'{}' is {}",
                    c.display_name,
                    cloudpc_types::network::wire_name(&c.health_check_status)
                )),
                None => unhealthy.push(format!("'{id}' no longer exists")),
            }
        }
        Err(Error::Conflict(format!(
            "none of the policy's network connections is healthy ({}); run their health checks and fix what they \
             report, then Retry",
            unhealthy.join("; ")
        )))
    }

    /// Ids for one attempt: the VM keeps the Cloud PC's name, each attempt gets a new NIC.
    fn new_resources(&self, managed_name: &str) -> Resources {
        let domain = format!("{}{}", self.config.domain_prefix, managed_name.to_ascii_lowercase());
        Resources {
            host: None,
            disk: Some(self.config.storage_dir.join(format!("{domain}.qcow2"))),
            console_log: Some(self.config.storage_dir.join(format!("{domain}.console.log"))),
            domain: Some(domain),
            network: None,
            mac: Some(random_mac()),
            device_id: Some(Uuid::new_v4()),
            managed_device_id: Some(Uuid::new_v4()),
            username: None,
            image_on_host: None,
        }
    }

    async fn save(&self, rec: &mut CloudPcRecord, step: Option<&ProvisioningStepRecord>) -> Result<()> {
        rec.pc.last_modified_date_time = Utc::now();
        self.save_workflow(rec, step).await
    }

    /// Runs the Cloud PC's workflow until it is idle, waiting, or deleted.
    async fn run_workflow(&self, id: Uuid) -> Result<()> {
        loop {
            let mut rec = match self.store.get_cloud_pc_record(id).await {
                Ok(r) => r,
                Err(cloudpc_store::StoreError::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            match rec.state.phase {
                Phase::Idle => return Ok(()),
                Phase::Forward => {
                    if !self.forward_one(&mut rec).await? {
                        return Ok(());
                    }
                }
                Phase::UndoThenRetry | Phase::UndoThenRestart | Phase::UndoThenDelete | Phase::UndoThenIdle => {
                    if !self.undo_all(&mut rec).await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Runs the next forward step; returns false when the workflow should stop for now.
    async fn forward_one(&self, rec: &mut CloudPcRecord) -> Result<bool> {
        // Steps with nothing to do on this host are passed over in memory; the next step's first
        // save stores the progress.
        while let Some((_, step)) = steps::step_named(&rec.state.next_step) {
            let hv = match rec.state.resources.host.clone() {
                Some(h) => self.host(&h).await.ok(),
                None => None,
            };
            // A warm-pool machine stops before the first user-specific step (which does not
            // apply to it yet).
            let waits_in_pool =
                rec.state.pool.as_ref().is_some_and(|p| !p.ready) && step.name() == steps::FIRST_USER_STEP;
            let done_in_pool = rec.state.done_in_pool.iter().any(|d| d == step.name());
            if waits_in_pool || (!done_in_pool && step.applies(hv.as_deref(), rec)) {
                break;
            }
            rec.state.next_step = steps::after(step.name());
        }
        if rec.state.next_step == steps::DONE {
            self.complete(rec).await?;
            return Ok(false);
        }
        if rec.state.pool.as_ref().is_some_and(|p| !p.ready) && rec.state.next_step == steps::FIRST_USER_STEP {
            return self.pool_machine_booted(rec).await;
        }
        let Some((_, step)) = steps::step_named(&rec.state.next_step) else {
            // A step this version does not have (a downgrade): start the attempt over.
            tracing::warn!(cloud_pc = %rec.pc.id, step = %rec.state.next_step, "unknown provisioning step; restarting the attempt");
            rec.state.phase = Phase::UndoThenRetry;
            rec.state.attempt = rec.state.attempt.saturating_sub(1);
            self.save(rec, None).await?;
            return Ok(true);
        };
        let started = Instant::now();
        let mut record = step_record(rec, step.name(), step.stage(), Utc::now());
        self.save(rec, Some(&record)).await?;
        let outcome = if self.take_fault(step.name()) {
            Outcome::Failed(format!("injected fault in {} (testing)", step.name()))
        } else {
            // A panic inside a step is that step's failure (undo, retry, attempts as usual), not
            // the end of the workflow task.
            let (app, mut work) = (self.clone(), rec.clone());
            let run = async move {
                app.maybe_inject_panic(step.name());
                // Testing only: widen the window in which a replica can be killed mid-step.
                if let Some(pause) = app.config.injected_delays.get(step.name()) {
                    tokio::time::sleep(*pause).await;
                }
                let outcome = app.run_step(step, &mut work).await;
                (outcome, work)
            };
            match crate::supervise::supervised(run).await {
                Ok((outcome, work)) => {
                    *rec = work;
                    outcome
                }
                Err(panic) => Outcome::Failed(format!("cloudpc hit an internal error in this step: {panic}")),
            }
        };
        match outcome {
            Outcome::Done { detail } => {
                finish(&mut record, StepStatus::Succeeded, started);
                record.detail = detail;
                rec.state.next_step = steps::after(step.name());
                if rec.pc.status == CloudPcStatus::PendingProvision {
                    rec.pc.status = CloudPcStatus::Provisioning;
                    rec.pc.status_detail = None;
                }
                self.save(rec, Some(&record)).await?;
                Ok(true)
            }
            Outcome::Wait(reason) => {
                finish(&mut record, StepStatus::Waiting, started);
                record.detail = Some(reason.clone());
                rec.pc.status = CloudPcStatus::PendingProvision;
                rec.pc.status_detail = Some(reason);
                self.save(rec, Some(&record)).await?;
                Ok(false)
            }
            Outcome::Failed(error) => {
                finish(&mut record, StepStatus::Failed, started);
                record.error = Some(error.clone());
                tracing::info!(cloud_pc = %rec.pc.id, step = step.name(), attempt = rec.state.attempt, %error, "provisioning step failed");
                if step.stage() != ProvisioningStage::Core {
                    rec.state.warnings.push(format!("{}: {error}", step.name()));
                    rec.state.next_step = steps::after(step.name());
                } else if rec.state.attempt < MAX_ATTEMPTS {
                    rec.state.phase = Phase::UndoThenRetry;
                    rec.pc.status_detail =
                        Some(format!("attempt {} failed at {}: {error}; retrying", rec.state.attempt, step.name()));
                } else {
                    rec.state.phase = Phase::Idle;
                    rec.state.cleanup_at = Some(Utc::now() + self.cleanup_delay());
                    rec.pc.status = CloudPcStatus::Failed;
                    rec.pc.status_detail = Some(format!(
                        "Provisioning failed {MAX_ATTEMPTS} times; last at step {}: {error}. Fix the cause, then select Retry.",
                        step.name()
                    ));
                }
                self.save(rec, Some(&record)).await?;
                Ok(true)
            }
        }
    }

    pub(crate) fn cleanup_delay(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.config.cleanup_delay).unwrap_or(chrono::Duration::hours(3))
    }

    /// All steps done: provisioned, or provisioned with warnings naming the failed steps.
    async fn complete(&self, rec: &mut CloudPcRecord) -> Result<()> {
        rec.state.phase = Phase::Idle;
        rec.pc.provisioned_date_time = Some(Utc::now());
        rec.pc.power_state = PowerState::Running;
        if rec.state.warnings.is_empty() {
            rec.pc.status = CloudPcStatus::Provisioned;
            rec.pc.status_detail = None;
        } else {
            rec.pc.status = CloudPcStatus::ProvisionedWithWarnings;
            rec.pc.status_detail = Some(format!(
                "Provisioned, but post-provisioning configuration had problems: {}. Reprovision to try again.",
                rec.state.warnings.join("; ")
            ));
        }
        self.save(rec, None).await?;
        tracing::info!(cloud_pc = %rec.pc.id, status = ?rec.pc.status, "Cloud PC provisioned");
        Ok(())
    }

    /// Undoes everything the current generation made, then moves on according to the phase.
    /// Returns false when the workflow should stop (deleted, or undo must be tried again later).
    async fn undo_all(&self, rec: &mut CloudPcRecord) -> Result<bool> {
        let started = Instant::now();
        let mut record = step_record(rec, "cleanup", ProvisioningStage::Cleanup, Utc::now());
        record.sequence = STEPS.len() as u32 + rec.state.attempt_total;
        self.save(rec, Some(&record)).await?;
        if let Err(e) = self.undo_resources(rec).await {
            finish(&mut record, StepStatus::Failed, started);
            record.error = Some(e.to_string());
            self.save(rec, Some(&record)).await?;
            return Err(e);
        }
        finish(&mut record, StepStatus::Succeeded, started);
        match rec.state.phase {
            Phase::UndoThenRetry => {
                rec.state.attempt += 1;
                rec.state.attempt_total += 1;
                rec.state.next_step = STEPS[0].name().to_string();
                rec.state.phase = Phase::Forward;
                let name = rec.pc.managed_device_name.clone().unwrap_or_default();
                rec.state.resources = self.new_resources(&name);
                rec.state.warnings.clear();
                self.save(rec, Some(&record)).await?;
                Ok(true)
            }
            Phase::UndoThenRestart => {
                let Some(policy) = rec.pc.provisioning_policy_id else {
                    rec.state.phase = Phase::Idle;
                    rec.pc.status = CloudPcStatus::NotProvisioned;
                    self.save(rec, Some(&record)).await?;
                    return Ok(false);
                };
                self.save(rec, Some(&record)).await?;
                let _images = self.image_updates.lock().await;
                if let Err(e) = self.start_generation(rec, policy).await {
                    self.could_not_start(rec, policy, &e).await;
                }
                rec.state.requested_at = Utc::now();
                self.save(rec, None).await?;
                Ok(true)
            }
            Phase::UndoThenDelete => {
                let audit = crate::cloud_pcs::system_event("Delete CloudPc", rec);
                self.store.delete_cloud_pc(rec.pc.id, Some(&audit)).await?;
                tracing::info!(cloud_pc = %rec.pc.id, "Cloud PC cleaned up and removed");
                self.changed();
                Ok(false)
            }
            Phase::UndoThenIdle => {
                rec.state.phase = Phase::Idle;
                rec.state.cleanup_at = None;
                rec.state.resources = Resources::default();
                self.save(rec, Some(&record)).await?;
                Ok(false)
            }
            Phase::Idle | Phase::Forward => Ok(true),
        }
    }

    /// Every step's undo, in reverse order; each treats "already gone" as done. The host is given
    /// up last, since the other undos need it.
    pub(crate) async fn undo_resources(&self, rec: &mut CloudPcRecord) -> Result<()> {
        let hv = match rec.state.resources.host.clone() {
            Some(h) => Some(self.host(&h).await?),
            None => None,
        };
        for step in STEPS.iter().rev() {
            let cx = self.step_context(rec, hv.as_deref());
            step.undo(&cx, rec).await?;
        }
        rec.state.resources.host = None;
        rec.pc.power_state = PowerState::Unknown;
        Ok(())
    }

    fn step_context<'a>(
        &'a self,
        rec: &CloudPcRecord,
        hv: Option<&'a dyn cloudpc_hypervisor::Hypervisor>,
    ) -> steps::StepContext<'a> {
        steps::StepContext {
            app: self,
            spec: rec.state.spec.clone().unwrap_or_else(|| BuildSpec {
                vcpus: 0,
                memory_mib: 0,
                storage_gib: 0,
                image_id: String::new(),
                image_version: None,
                image_disk: Default::default(),
                kernel: None,
                region: "automatic".into(),
                naming_template: None,
                local_admin: false,
                time_zone: None,
                grace_period_hours: None,
                connection_id: None,
            }),
            r: rec.state.resources.clone(),
            domain: rec.state.resources.domain.clone().unwrap_or_default(),
            hv,
        }
    }

    /// Runs one step forward (the engine persists before and after).
    pub(crate) async fn run_step(&self, step: &'static dyn ProvisioningStep, rec: &mut CloudPcRecord) -> Outcome {
        if rec.state.spec.is_none() {
            return Outcome::Failed("the Cloud PC has no build specification; reprovision it".into());
        }
        let hv = match rec.state.resources.host.clone() {
            Some(h) => match self.host(&h).await {
                Ok(h) => Some(h),
                Err(e) => return Outcome::Failed(e.to_string()),
            },
            None => None,
        };
        let cx = self.step_context(rec, hv.as_deref());
        step.run(&cx, rec).await
    }
}
