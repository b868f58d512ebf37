//! Warm pools: a policy with `warmPoolSize` keeps that many booted, unassigned Cloud PCs ready for
//! each license with free seats, so a newly entitled user gets a desktop in seconds instead of a
//! cold boot.
//!
//! A pool machine is an ordinary Cloud PC record (it counts against its host's capacity through
//! the same sums) with `state.pool` set and no user: its user id is a placeholder (its own id),
//! which keeps the one-Cloud-PC-per-user-and-license index and matches no real user, so no user
//! ever sees it. Its workflow runs the core steps up to [`FIRST_USER_STEP`], waits for the guest
//! agent, and stops there as `pooled`. A claim (one transaction, `SKIP LOCKED`: see
//! [`cloudpc_store::Store::claim_pooled`]) gives it a user and resumes the workflow at that step:
//! identity refresh, directory join, enrollment, and the user-specific configuration.
//!
//! The reconciler decides (`reconciler::plan`): claims before creates, refills last (so entitled
//! users are served first), and removes machines that are surplus, stale (built from settings the
//! policy no longer has) or failed (after the clean-up delay, which spaces out rebuilds of a pool
//! that keeps failing).

use std::time::Instant;

use chrono::Utc;
use uuid::Uuid;

use cloudpc_guest::GuestAgent;
use cloudpc_types::cloud_pc::{CloudPc, CloudPcStatus, PowerState, ProvisioningStage, StepStatus};
use cloudpc_types::licensing::SubscribedSku;
use cloudpc_types::policy::ProvisioningPolicy;
use cloudpc_types::provisioning::{CloudPcRecord, Phase, PoolMember, ProvisioningState};

use crate::provisioning::steps::FIRST_USER_STEP;
use crate::provisioning::{finish, step_record, Outcome, MAX_ATTEMPTS};
use crate::{App, Result};

/// What of a policy and license a pool machine is built from. A machine whose fingerprint differs
/// from its policy's current one is stale: it is removed and rebuilt. Settings applied after the
/// claim (time zone, local admin, naming, grace period) are not in it: they reach every claimed
/// machine as they are at the claim.
pub fn fingerprint(policy: &ProvisioningPolicy, image_version: Option<&str>, sku: &SubscribedSku) -> String {
    let joins = serde_json::to_string(&policy.domain_join_configurations).unwrap_or_default();
    format!(
        "{:?}|{}|{}|{joins}|{}x{}x{}",
        policy.image_type,
        policy.image_id,
        image_version.unwrap_or(""),
        sku.v_cpu_count,
        sku.ram_in_gb,
        sku.storage_in_gb
    )
}

/// Steps after [`FIRST_USER_STEP`] that do not depend on the user: a pool machine runs them
/// while it waits.
const POOL_STEPS: [&str; 2] = ["growDisk", "blockRemoteDesktop"];

impl App {
    /// The image version a new machine of the policy's pool is built from (custom images only).
    pub(crate) async fn pool_image_version(&self, policy: &ProvisioningPolicy) -> Option<String> {
        match policy.image_type {
            cloudpc_types::policy::ImageType::Custom => {
                let id = Uuid::parse_str(&policy.image_id).ok()?;
                let image = self.store.get_device_image(id).await.ok()?;
                let ready = image.current().filter(|v| v.status == cloudpc_types::images::DeviceImageStatus::Ready)?;
                Some(ready.version.clone())
            }
            cloudpc_types::policy::ImageType::Gallery => None,
        }
    }

    /// Starts building one more machine of `policy`'s pool for `sku`.
    pub(crate) async fn create_pool_machine(&self, policy: Uuid, sku: Uuid) -> Result<()> {
        let s = self.store.get_sku(sku).await?;
        let id = Uuid::new_v4();
        let now = Utc::now();
        let mut state = ProvisioningState::new(id, sku, now);
        state.pool = Some(PoolMember { policy_id: policy, fingerprint: String::new(), ready: false });
        let mut rec = CloudPcRecord::new(
            CloudPc {
                display_name: "warm pool".into(),
                provisioning_policy_id: Some(policy),
                status: CloudPcStatus::Provisioning,
                ..crate::reconciler::new_cloud_pc(id, &s, now)
            },
            state,
        );
        let images = self.image_updates.lock().await;
        if let Err(e) = self.start_generation(&mut rec, policy).await {
            // Nothing to boot from (image gone, no healthy network): no pool machine is kept.
            tracing::warn!(policy = %policy, error = %e, "cannot fill the warm pool");
            return Ok(());
        }
        // After start_generation, which clears it.
        rec.pc.status_detail = Some("Booting for the policy's warm pool.".into());
        let audit = crate::cloud_pcs::system_event("Create pooled CloudPc", &rec);
        self.store.insert_cloud_pc(&mut rec, Some(&audit)).await?;
        drop(images);
        self.drive(rec.pc.id);
        Ok(())
    }

    /// The pool machine's core steps are done: once its guest agent answers it is ready for a
    /// claim. A guest that never answers fails the attempt like a core step (undo, retry).
    pub(crate) async fn pool_machine_booted(&self, rec: &mut CloudPcRecord) -> Result<bool> {
        let started = Instant::now();
        let mut record = step_record(rec, "waitInPool", ProvisioningStage::Core, Utc::now());
        self.save_workflow(rec, Some(&record)).await?;
        let hv = match rec.state.resources.host.clone() {
            Some(h) => Some(self.host(&h).await?),
            None => None,
        };
        let domain = rec.state.resources.domain.clone().unwrap_or_default();
        let waited = match hv.as_deref() {
            Some(hv) => GuestAgent::new(hv, &domain).wait_ready(crate::provisioning::steps::BOOT_LIMIT).await,
            None => Err(cloudpc_guest::GuestError::Protocol("no host was allocated".into())),
        };
        match waited {
            Ok(boot) => {
                finish(&mut record, StepStatus::Succeeded, started);
                // Saved first, so the steps below are recorded after it.
                self.save_workflow(rec, Some(&record)).await?;
                self.run_pool_steps(rec).await?;
                record.detail = Some(format!("guest agent answered after {} ms; ready for a user", boot.as_millis()));
                rec.state.boot_ms = Some(boot.as_millis() as u64);
                if let Some(pool) = rec.state.pool.as_mut() {
                    pool.ready = true;
                }
                rec.state.phase = Phase::Idle;
                rec.pc.status = CloudPcStatus::Pooled;
                rec.pc.status_detail = Some("Booted and waiting in the policy's warm pool for a user.".into());
                rec.pc.power_state = PowerState::Running;
                rec.pc.last_modified_date_time = Utc::now();
                self.save_workflow(rec, Some(&record)).await?;
                tracing::info!(cloud_pc = %rec.pc.id, "warm-pool machine ready");
                self.changed();
                Ok(false)
            }
            Err(e) => {
                finish(&mut record, StepStatus::Failed, started);
                record.error = Some(e.to_string());
                if rec.state.attempt < MAX_ATTEMPTS {
                    rec.state.phase = Phase::UndoThenRetry;
                } else {
                    rec.state.phase = Phase::Idle;
                    rec.state.cleanup_at = Some(Utc::now() + self.cleanup_delay());
                    rec.pc.status = CloudPcStatus::Failed;
                    rec.pc.status_detail = Some(format!(
                        "The warm-pool machine failed {MAX_ATTEMPTS} times: {e}. It is removed and rebuilt after the \
                         clean-up delay."
                    ));
                }
                self.save_workflow(rec, Some(&record)).await?;
                Ok(true)
            }
        }
    }

    /// Runs the steps past the claim point that are the same for every user, so a claim does
    /// not wait for them. One that fails here just runs again after the claim.
    async fn run_pool_steps(&self, rec: &mut CloudPcRecord) -> Result<()> {
        for name in POOL_STEPS {
            let Some((_, step)) = crate::provisioning::steps::step_named(name) else { continue };
            if rec.state.done_in_pool.iter().any(|d| d == name) {
                continue;
            }
            let started = Instant::now();
            let mut record = step_record(rec, name, step.stage(), Utc::now());
            self.save_workflow(rec, Some(&record)).await?;
            match self.run_step(step, rec).await {
                Outcome::Done { detail } => {
                    finish(&mut record, StepStatus::Succeeded, started);
                    record.detail = detail;
                    rec.state.done_in_pool.push(name.to_string());
                }
                Outcome::Wait(reason) | Outcome::Failed(reason) => {
                    finish(&mut record, StepStatus::Failed, started);
                    record.error = Some(format!("{reason}; it runs again once the machine is claimed"));
                }
            }
            self.save_workflow(rec, Some(&record)).await?;
        }
        Ok(())
    }

    /// Gives the user a ready machine of the policy's pool for the license, if it has one; the
    /// workflow goes on from the user-specific steps. `false`: the pool had none.
    pub(crate) async fn claim_from_pool(&self, user: Uuid, sku: Uuid, policy: Uuid) -> Result<bool> {
        let u = self.store.get_user(user).await?;
        let p = self.store.get_policy(policy).await?;
        // Only a machine built to the policy's current settings: a stale one is on its way out.
        let fingerprint =
            fingerprint(&p, self.pool_image_version(&p).await.as_deref(), &self.store.get_sku(sku).await?);
        let key = PoolMember::claim_key(policy, &fingerprint);
        let template = crate::provisioning::naming_template(&p);
        let name = crate::provisioning::device_name(&template, &u.mail_nickname)?;
        let assign = Box::new(move |rec: &mut CloudPcRecord| {
            let now = Utc::now();
            rec.state.user_id = u.id;
            rec.state.pool = None;
            rec.state.claimed_from_pool = true;
            rec.state.requested_at = now;
            rec.state.phase = Phase::Forward;
            rec.state.next_step = FIRST_USER_STEP.to_string();
            if let Some(spec) = rec.state.spec.as_mut() {
                // Applied after the claim, so as the policy has them now.
                spec.naming_template = Some(template);
                spec.local_admin = p.local_admin_enabled;
                spec.time_zone = p.time_zone.clone();
                spec.grace_period_hours = p.grace_period_in_hours;
            }
            rec.pc.user_principal_name = u.user_principal_name.clone();
            rec.pc.managed_device_name = Some(name);
            rec.pc.display_name = format!("{} - {}", p.display_name, u.display_name).chars().take(64).collect();
            rec.pc.provisioning_policy_id = Some(p.id);
            rec.pc.provisioning_policy_name = Some(p.display_name.clone());
            rec.pc.status = CloudPcStatus::Provisioning;
            rec.pc.status_detail = Some("Claimed from the warm pool; setting it up for its user.".into());
            rec.pc.last_modified_date_time = now;
            crate::cloud_pcs::system_event("Claim pooled CloudPc", rec)
        });
        match self.store.claim_pooled(&key, sku, assign).await? {
            Some(rec) => {
                tracing::info!(cloud_pc = %rec.pc.id, user = %user, "warm-pool machine claimed");
                self.drive(rec.pc.id);
                self.changed();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// A warm-pool machine that failed outside its own workflow (provisioning could not start
    /// after an evacuation, an internal error) is removed after the clean-up delay like one whose
    /// boot failed (being failed, it is not claimable meanwhile). Nobody retries it: it has no user.
    pub(crate) fn retire_failed_pool_machine(&self, rec: &mut CloudPcRecord) {
        if rec.state.pool.is_some() {
            rec.state.cleanup_at = Some(Utc::now() + self.cleanup_delay());
        }
    }

    /// Takes a machine out of its pool (surplus, stale, unwanted, or failed): removed at once, no
    /// grace period, since nobody used it.
    pub(crate) async fn remove_pool_machine(&self, rec: &mut CloudPcRecord) -> Result<()> {
        rec.pc.status = CloudPcStatus::Deprovisioning;
        rec.pc.status_detail = Some("Leaving the warm pool: the policy no longer needs this machine.".into());
        rec.state.phase = Phase::UndoThenDelete;
        rec.state.cleanup_at = None;
        // Off the claimable list in the same write.
        if let Some(pool) = rec.state.pool.as_mut() {
            pool.ready = false;
        }
        rec.pc.last_modified_date_time = Utc::now();
        // Compare-and-swap, never rebased: a claim that got this machine first wins, and the next
        // pass sees it is a user's now.
        match self.store.save_cloud_pc(rec, None, None, None).await {
            Ok(()) => {}
            Err(cloudpc_store::StoreError::Stale { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        self.drive(rec.pc.id);
        Ok(())
    }
}
