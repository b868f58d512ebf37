//! Cloud PCs as the admin sees them, and the remote actions on them: reprovision, retry, restart,
//! power off/on, hibernate and resume, rename, end grace period, and the one-time look at the
//! initial password.
//!
//! Actions change the stored state and hand the work to the Cloud PC's workflow task, so an
//! action survives a restart just as provisioning does.

use chrono::Utc;

use cloudpc_hypervisor::VmState;
use cloudpc_types::audit::{AuditEvent, AuditOperationType};
use cloudpc_types::cloud_pc::{
    CloudPc, CloudPcStatus, InitialPassword, PowerState, PowerStateDetail, ProvisioningStepRecord, RemoteActionResult,
};
use cloudpc_types::provisioning::{CloudPcRecord, Phase};
use cloudpc_types::validate;

use crate::audit::{property, Actor, Change};
use crate::directory::parse_id;
use crate::{App, Error, Result};

fn pc_change(activity: &str, op: AuditOperationType, rec: &CloudPcRecord) -> Change<'static> {
    Change {
        component: "CloudPC",
        activity: activity.to_string(),
        operation: op,
        resource_type: "cloudPC",
        resource_id: rec.pc.id.to_string(),
        resource_name: rec.pc.managed_device_name.clone().unwrap_or_else(|| rec.pc.display_name.clone()),
    }
}

/// An audit event for a change cloudpc made by itself (provisioning, grace, clean-up).
pub(crate) fn system_event(activity: &str, rec: &CloudPcRecord) -> AuditEvent {
    let op = if activity.starts_with("Create") {
        AuditOperationType::Create
    } else if activity.starts_with("Delete") {
        AuditOperationType::Delete
    } else {
        AuditOperationType::Other
    };
    pc_change(activity, op, rec)
        .event_with(&Actor::system(), vec![property("status", None, Some(format!("{:?}", rec.pc.status)))])
}

fn action_result(name: &str, state: &str, detail: Option<String>) -> Option<RemoteActionResult> {
    let now = Utc::now();
    Some(RemoteActionResult {
        action_name: name.into(),
        action_state: state.into(),
        start_date_time: now,
        last_updated_date_time: now,
        status_detail: detail,
    })
}

/// What the action's result says about how the VM started: only a saved state that was lost.
fn resumed_detail(resumed: cloudpc_hypervisor::Resumed) -> Option<String> {
    match resumed {
        cloudpc_hypervisor::Resumed::BootedCold(why) => Some(format!(
            "The saved state could not be restored ({why}), so the Cloud PC started afresh: programs that were open \
             and unsaved work are lost; files on its disk are kept."
        )),
        _ => None,
    }
}

fn refuse(rec: &CloudPcRecord, action: &str, allowed: &str) -> Error {
    Error::Conflict(format!(
        "{action} is not possible while the Cloud PC is {}; it needs a Cloud PC that is {allowed}",
        serde_json::to_value(rec.pc.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    ))
}

impl App {
    pub async fn list_cloud_pcs(&self) -> Result<Vec<CloudPc>> {
        Ok(self.store.list_cloud_pcs().await?)
    }

    pub async fn get_cloud_pc(&self, id: &str) -> Result<CloudPc> {
        Ok(self.store.get_cloud_pc(parse_id("cloudPC", id)?).await?)
    }

    async fn record(&self, id: &str) -> Result<CloudPcRecord> {
        Ok(self.store.get_cloud_pc_record(parse_id("cloudPC", id)?).await?)
    }

    /// Every step of every attempt, with start, end, duration and error.
    pub async fn provisioning_steps(&self, id: &str) -> Result<Vec<ProvisioningStepRecord>> {
        let rec = self.record(id).await?;
        Ok(self.store.list_steps(rec.pc.id).await?)
    }

    async fn save_action(
        &self,
        actor: &Actor,
        rec: &mut CloudPcRecord,
        action: &str,
        detail: Option<String>,
    ) -> Result<()> {
        rec.pc.last_remote_action_result = action_result(action, "done", detail);
        rec.pc.last_modified_date_time = Utc::now();
        let audit = pc_change(&format!("{action} CloudPc"), AuditOperationType::Other, rec)
            .event_with(actor, vec![property("remoteAction", None, Some(action.to_string()))]);
        self.save_record(rec, None, Some(&audit)).await
    }

    /// Deletes and recreates the Cloud PC from the policy that targets its user now.
    pub async fn reprovision(&self, actor: &Actor, id: &str) -> Result<CloudPc> {
        let _power = crate::power::lock().await;
        let mut rec = self.record(id).await?;
        let ok = matches!(
            rec.pc.status,
            CloudPcStatus::Provisioned | CloudPcStatus::ProvisionedWithWarnings | CloudPcStatus::Failed
        );
        if !ok || rec.state.phase != Phase::Idle {
            return Err(refuse(&rec, "reprovision", "provisioned or failed"));
        }
        let (world, _) = self.world().await?;
        let policy = crate::reconciler::winning_policy(&world, rec.state.user_id).ok_or_else(|| {
            Error::Conflict(
                "no provisioning policy targets the Cloud PC's user any more, so it cannot be reprovisioned".into(),
            )
        })?;
        rec.pc.provisioning_policy_id = Some(policy);
        rec.pc.status = CloudPcStatus::Provisioning;
        rec.pc.status_detail = Some("Reprovisioning: removing the old VM.".into());
        rec.state.phase = Phase::UndoThenRestart;
        rec.state.cleanup_at = None;
        self.close_consoles(rec.pc.id).await;
        self.save_action(actor, &mut rec, "reprovision", None).await?;
        self.drive(rec.pc.id);
        Ok(rec.pc)
    }

    /// After a final failure: clean up what is left and provision again.
    pub async fn retry(&self, actor: &Actor, id: &str) -> Result<CloudPc> {
        let mut rec = self.record(id).await?;
        if rec.pc.status != CloudPcStatus::Failed || rec.state.phase != Phase::Idle {
            return Err(refuse(&rec, "retry", "failed"));
        }
        let policy = rec
            .pc
            .provisioning_policy_id
            .ok_or_else(|| Error::Conflict("the Cloud PC has no policy to retry with".into()))?;
        let (world, _) = self.world().await?;
        if crate::reconciler::winning_policy(&world, rec.state.user_id) != Some(policy) {
            return Err(Error::Conflict(
                "the Cloud PC's policy no longer targets its user; it will be cleaned up".into(),
            ));
        }
        rec.pc.status = CloudPcStatus::Provisioning;
        rec.pc.status_detail = Some("Retrying provisioning.".into());
        rec.state.phase = Phase::UndoThenRestart;
        rec.state.cleanup_at = None;
        self.save_action(actor, &mut rec, "retry", None).await?;
        self.drive(rec.pc.id);
        Ok(rec.pc)
    }

    fn running_vm(&self, rec: &CloudPcRecord, action: &str) -> Result<(String, String)> {
        let ok = matches!(
            rec.pc.status,
            CloudPcStatus::Provisioned | CloudPcStatus::ProvisionedWithWarnings | CloudPcStatus::InGracePeriod
        );
        // A Cloud PC being moved off a draining host has its disk copied: starting (or resuming)
        // the old VM now would write to it mid-copy.
        if let Some(target) = &rec.state.moving_to {
            return Err(Error::Conflict(format!(
                "the Cloud PC is moving to another host ({target}) while its host is drained; {action} is possible \
                 again in a few minutes"
            )));
        }
        match (&rec.state.resources.host, &rec.state.resources.domain) {
            (Some(h), Some(d)) if ok => Ok((h.clone(), d.clone())),
            _ => Err(refuse(rec, action, "provisioned")),
        }
    }

    pub async fn reboot(&self, actor: &Actor, id: &str) -> Result<CloudPc> {
        let _power = crate::power::lock().await;
        let mut rec = self.record(id).await?;
        let (host, domain) = self.running_vm(&rec, "restart")?;
        let hv = self.host(&host).await?;
        // Asks the VM, not the stored powerState: a guest may have shut itself down since.
        let state = hv.state(&domain).await.map_err(|e| Error::Conflict(e.to_string()))?;
        if state != VmState::Running {
            // Started as powerOn starts it: its network first, a hibernated one's RAM taken back.
            self.start_vm(actor, &mut rec, "reboot").await?;
            return Ok(rec.pc);
        }
        hv.reboot(&domain).await.map_err(|e| Error::Conflict(e.to_string()))?;
        rec.pc.power_state = PowerState::Running;
        rec.pc.power_state_detail = None;
        self.save_action(actor, &mut rec, "reboot", None).await?;
        Ok(rec.pc)
    }

    pub async fn power_off(&self, actor: &Actor, id: &str) -> Result<CloudPc> {
        let _power = crate::power::lock().await;
        let mut rec = self.record(id).await?;
        let (host, domain) = self.running_vm(&rec, "power off")?;
        self.close_consoles(rec.pc.id).await;
        self.host(&host).await?.power_off(&domain).await.map_err(|e| Error::Conflict(e.to_string()))?;
        rec.pc.power_state = PowerState::PoweredOff;
        self.save_action(actor, &mut rec, "powerOff", None).await?;
        Ok(rec.pc)
    }

    /// Starts the Cloud PC; a hibernated one resumes where it was.
    pub async fn power_on(&self, actor: &Actor, id: &str) -> Result<CloudPc> {
        let _power = crate::power::lock().await;
        let mut rec = self.record(id).await?;
        self.start_vm(actor, &mut rec, "powerOn").await?;
        Ok(rec.pc)
    }

    /// cloudpc extension: a hibernated (or powered-off) Cloud PC runs again, from its saved
    /// memory where it has some.
    pub async fn resume(&self, actor: &Actor, id: &str) -> Result<CloudPc> {
        let _power = crate::power::lock().await;
        let mut rec = self.record(id).await?;
        self.start_vm(actor, &mut rec, "resume").await?;
        Ok(rec.pc)
    }

    /// Starts or resumes the VM and records it running, under the power lock. A saved state that
    /// could not be restored (the VM booted afresh) is said in the action's result.
    pub(crate) async fn start_vm(&self, actor: &Actor, rec: &mut CloudPcRecord, action: &str) -> Result<()> {
        let (host, domain) = self.running_vm(rec, action)?;
        let hv = self.host(&host).await?;
        crate::power::ensure_vm_network(hv.as_ref(), rec).await?;
        let was_saved = rec.pc.power_state_detail == Some(PowerStateDetail::Saved);
        if was_saved {
            self.take_memory_back(rec, &host).await?;
        }
        let resumed = match hv.resume(&domain).await {
            Ok(r) => r,
            Err(e) => {
                if was_saved {
                    // Still saved: give the memory back to the host's sums.
                    rec.pc.power_state = PowerState::PoweredOff;
                    rec.pc.power_state_detail = Some(PowerStateDetail::Saved);
                    self.save_record(rec, None, None).await?;
                }
                return Err(Error::Conflict(e.to_string()));
            }
        };
        rec.pc.power_state = PowerState::Running;
        rec.pc.power_state_detail = None;
        self.save_action(actor, rec, action, resumed_detail(resumed)).await
    }

    /// A hibernated Cloud PC's RAM was counted free on its host, and other desktops may have
    /// taken it since. Under the allocation lock: if the host still has the memory (and vCPUs),
    /// the Cloud PC is counted running again before it resumes; if not, the resume is refused
    /// with the numbers, and the desktop stays saved (nothing is lost; it resumes once others
    /// hibernate, or after a move).
    async fn take_memory_back(&self, rec: &mut CloudPcRecord, host: &str) -> Result<()> {
        let Some(spec) = rec.state.spec.clone() else { return Ok(()) };
        let _lock = self.store.lock_allocation().await?;
        let (capacity, used) = self.host_room(host).await?;
        let free_mib = capacity.memory_in_mb.saturating_sub(used.memory_mib);
        let free_vcpus = capacity.v_cpu_count.saturating_sub(used.vcpus);
        if spec.memory_mib > free_mib || u64::from(spec.vcpus) > free_vcpus {
            return Err(Error::Conflict(format!(
                "the Cloud PC cannot resume now: its host {host} has {free_mib} MiB of RAM and {free_vcpus} vCPU free \
                 for running desktops, and it needs {} MiB and {} vCPU; try again when other desktops on the host are \
                 hibernated or powered off",
                spec.memory_mib, spec.vcpus
            )));
        }
        rec.pc.power_state = PowerState::Running;
        rec.pc.power_state_detail = None;
        self.save_record(rec, None, None).await
    }

    /// cloudpc extension: saves the running Cloud PC's memory to disk and stops it, freeing its
    /// RAM (hibernation). Its consoles close; opening it again resumes it where it was.
    pub async fn hibernate(&self, actor: &Actor, id: &str) -> Result<CloudPc> {
        let _power = crate::power::lock().await;
        let mut rec = self.record(id).await?;
        let (host, domain) = self.running_vm(&rec, "hibernate")?;
        let hv = self.host(&host).await?;
        let state = hv.state(&domain).await.map_err(|e| Error::Conflict(e.to_string()))?;
        if !matches!(state, VmState::Running | VmState::Saved) {
            return Err(Error::Conflict(
                "hibernate needs a running Cloud PC; this one is not running (power it on first)".into(),
            ));
        }
        self.close_consoles(rec.pc.id).await;
        crate::power::save_to_disk(hv.as_ref(), &domain).await?;
        rec.pc.power_state = PowerState::PoweredOff;
        rec.pc.power_state_detail = Some(PowerStateDetail::Saved);
        self.save_action(actor, &mut rec, "hibernate", None).await?;
        Ok(rec.pc)
    }

    /// Changes the display name only, as in Windows 365 (the device name stays).
    pub async fn rename(&self, actor: &Actor, id: &str, display_name: &str) -> Result<CloudPc> {
        validate::display_name("displayName", display_name, 64)?;
        let mut rec = self.record(id).await?;
        let old = rec.pc.display_name.clone();
        rec.pc.display_name = display_name.to_string();
        rec.pc.last_remote_action_result = action_result("rename", "done", None);
        rec.pc.last_modified_date_time = Utc::now();
        let audit = pc_change("rename CloudPc", AuditOperationType::Patch, &rec)
            .event_with(actor, vec![property("displayName", Some(old), Some(display_name.to_string()))]);
        self.save_record(&mut rec, None, Some(&audit)).await?;
        Ok(rec.pc)
    }

    pub async fn end_grace_period(&self, actor: &Actor, id: &str) -> Result<CloudPc> {
        // Deprovisioning powers the VM off: not to be mistaken for a VM that stopped by itself.
        let _power = crate::power::lock().await;
        let mut rec = self.record(id).await?;
        if rec.pc.status != CloudPcStatus::InGracePeriod {
            return Err(refuse(&rec, "endGracePeriod", "in its grace period"));
        }
        rec.pc.last_remote_action_result = action_result("endGracePeriod", "done", None);
        let audit = pc_change("endGracePeriod CloudPc", AuditOperationType::Other, &rec)
            .event_with(actor, vec![property("remoteAction", None, Some("endGracePeriod".into()))]);
        self.save_record(&mut rec, None, Some(&audit)).await?;
        self.deprovision(&mut rec).await?;
        Ok(rec.pc)
    }

    /// The generated password of the user's account, shown once: cloudpc forgets it after.
    pub async fn take_initial_password(&self, actor: &Actor, id: &str) -> Result<InitialPassword> {
        // Strict compare-and-swap, never rebased: of two readers racing, the one whose write lands
        // first gets the password, and the other reads again and finds it gone.
        loop {
            let mut rec = self.record(id).await?;
            let (Some(password), Some(user_name)) =
                (rec.state.initial_password.take(), rec.state.resources.username.clone())
            else {
                return Err(Error::Conflict(
                    "there is no initial password to show: it was shown already, the account is not made yet, or the user \
                     signs in with their domain account".into(),
                ));
            };
            let audit = pc_change("getInitialPassword CloudPc", AuditOperationType::Other, &rec).event_with(
                actor,
                vec![property("initialPassword", Some("(hidden)".into()), Some("(shown once, then forgotten)".into()))],
            );
            match self.store.save_cloud_pc(&mut rec, None, Some(&audit), None).await {
                Ok(()) => return Ok(InitialPassword { user_name, password }),
                Err(cloudpc_store::StoreError::Stale { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub async fn list_audit_events(&self) -> Result<Vec<AuditEvent>> {
        Ok(self.store.list_audit_events().await?)
    }

    /// One page of the audit log (in time order), matching `filter`, and the number matching.
    /// One page of users, groups or Cloud PCs, filtered and paged by the database.
    pub async fn list_page(
        &self,
        listing: cloudpc_store::Listing,
        filter: &[cloudpc_store::FieldEquals],
        skip: usize,
        top: usize,
    ) -> Result<(Vec<serde_json::Value>, usize)> {
        Ok(self.store.list_page(listing, filter, skip, top).await?)
    }

    pub async fn audit_events_page(
        &self,
        filter: &[cloudpc_store::FieldEquals],
        skip: usize,
        top: usize,
    ) -> Result<(Vec<AuditEvent>, usize)> {
        Ok(self.store.audit_events_page(filter, skip, top).await?)
    }

    pub async fn get_audit_event(&self, id: &str) -> Result<AuditEvent> {
        let id = parse_id("auditEvent", id)?;
        Ok(self.store.get_audit_event(id).await?)
    }

    /// Deletes audit events older than the retention setting (run at start and every hour).
    pub async fn prune_audit_log(&self) -> Result<u64> {
        let days = self.config.audit_retention_days;
        let n = self.store.prune_audit_events(days).await?;
        if n > 0 {
            tracing::info!(events = n, days, "audit events older than the retention period were deleted");
        }
        Ok(n)
    }

    pub async fn list_devices(&self) -> Result<Vec<cloudpc_types::cloud_pc::Device>> {
        Ok(self.store.list_devices().await?)
    }

    pub async fn list_managed_devices(&self) -> Result<Vec<cloudpc_types::cloud_pc::ManagedDevice>> {
        Ok(self.store.list_managed_devices().await?)
    }
}
