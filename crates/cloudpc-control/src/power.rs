//! Power state read back from the hypervisor, so `powerState` says what the VM really does.
//!
//! A guest can shut itself down, QEMU can die, and a host reboot leaves every VM shut off; none of
//! that goes through cloudpc. Each reconciler pass therefore reads the state of every provisioned
//! Cloud PC's VM and updates `powerState` to match. A Cloud PC is a dedicated PC that its user
//! expects to be on: one whose VM is shut off although nobody powered it off through cloudpc
//! (`powerOff` records `poweredOff`) is started again, with an audit event by cloudpc itself.
//! That is also what happens after a host reboot. Cloud PCs an admin powered off stay off, and so
//! do hibernated ones (their VM is `Saved`: shut off with its memory on disk).

use chrono::Utc;
use uuid::Uuid;

use cloudpc_hypervisor::VmState;
use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::cloud_pc::{CloudPcStatus, PowerState, PowerStateDetail};
use cloudpc_types::provisioning::{CloudPcRecord, Phase};

use crate::audit::{property, Actor, Change};
use crate::provisioning::steps::host_network;
use crate::{App, Error, Result};

/// Held while power is changed (remote actions) or compared with the VM (the resync), so the
/// resync never mistakes a VM that an action just powered off for one that stopped by itself.
/// A static rather than a field of `App`: there is one app per process, and the lock stays next
/// to the code that needs it.
// TODO-correctness: a process-local lock. With replicas, the resync runs on the reconciler's
// replica only, but an admin's power action on another replica can still cross it; the fix is to
// record the intended power state (compare-and-swap) before acting on the VM, and have the resync
// act only on a record it has re-read.
static POWER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the power lock; remote actions that change power hold it while they do.
pub(crate) async fn lock() -> tokio::sync::MutexGuard<'static, ()> {
    POWER.lock().await
}

/// How long a hibernation waits for the guest to flush its files before saving it anyway.
const FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Hibernates the VM: the guest flushes its files first, so the disk alone is whole should the
/// saved memory ever be dropped (a drain moves only the disk; a corrupt save file boots afresh).
/// A guest whose agent does not answer is saved anyway: its memory still holds everything.
pub(crate) async fn save_to_disk(hv: &dyn cloudpc_hypervisor::Hypervisor, domain: &str) -> Result<()> {
    // Only a running guest has an agent to ask (one already saved has nothing to flush).
    if matches!(hv.state(domain).await, Ok(VmState::Running)) {
        flush_guest(hv, domain, FLUSH_LIMIT, "hibernating it").await;
    }
    hv.save(domain).await.map_err(|e| Error::Conflict(e.to_string()))
}

/// Has the guest write what it holds in memory to its disk (`sync` through the guest agent)
/// before its VM is stopped or saved. Best effort: a guest that is off or has no agent is
/// logged, and the caller goes on.
pub(crate) async fn flush_guest(
    hv: &dyn cloudpc_hypervisor::Hypervisor,
    domain: &str,
    limit: std::time::Duration,
    before: &str,
) {
    if let Err(e) = cloudpc_guest::GuestAgent::new(hv, domain).exec("/bin/sync", &[], None, limit).await {
        tracing::info!(%domain, error = %e, "could not flush the guest's files before {before} (it may be off)");
    }
}

/// Why one Cloud PC's power state was not brought in line.
enum Unchecked {
    /// Its host did not tell the VM's state; its other Cloud PCs wait for the next pass.
    HostUnreachable(String),
    Failed(Error),
}

impl<E: Into<Error>> From<E> for Unchecked {
    fn from(e: E) -> Self {
        Unchecked::Failed(e.into())
    }
}

/// Whether the Cloud PC has a VM whose power the user expects cloudpc to keep. Not while a drain
/// moves it: the move stops the old VM on purpose, and the VM on the new host is the one to keep.
pub(crate) fn watched(rec: &CloudPcRecord) -> bool {
    rec.state.phase == Phase::Idle
        && rec.state.moving_to.is_none()
        && matches!(
            rec.pc.status,
            CloudPcStatus::Provisioned
                | CloudPcStatus::ProvisionedWithWarnings
                | CloudPcStatus::InGracePeriod
                | CloudPcStatus::Pooled
        )
        && rec.state.resources.host.is_some()
        && rec.state.resources.domain.is_some()
}

/// Starts the Cloud PC's hosted network if it is down: a host reboot does not start it again,
/// and the VM cannot start without it.
pub(crate) async fn ensure_vm_network(hv: &dyn cloudpc_hypervisor::Hypervisor, rec: &CloudPcRecord) -> Result<()> {
    if let Some(spec) = &rec.state.spec {
        let net = host_network(hv.config(), &spec.region);
        if rec.state.resources.network.as_deref() == Some(net.name.as_str()) {
            hv.ensure_network(&net).await.map_err(|e| Error::Conflict(e.to_string()))?;
        }
    }
    Ok(())
}

/// An audit event for a power change cloudpc made by itself.
fn power_event(
    rec: &CloudPcRecord,
    activity: &str,
    properties: Vec<cloudpc_types::audit::AuditProperty>,
) -> cloudpc_types::audit::AuditEvent {
    Change {
        component: "CloudPC",
        activity: activity.into(),
        operation: AuditOperationType::Other,
        resource_type: "cloudPC",
        resource_id: rec.pc.id.to_string(),
        resource_name: rec.pc.managed_device_name.clone().unwrap_or_default(),
    }
    .event_with(&Actor::system(), properties)
}

/// Whether the record already says what the VM does.
fn in_line(observed: VmState, state: PowerState, detail: Option<PowerStateDetail>) -> bool {
    matches!(
        (observed, state, detail),
        (VmState::Running, PowerState::Running, None)
            | (VmState::ShutOff, PowerState::PoweredOff, None)
            | (VmState::Saved, PowerState::PoweredOff, Some(PowerStateDetail::Saved))
    )
}

impl App {
    /// Brings `powerState` of every provisioned Cloud PC in line with its VM, and starts again
    /// the VMs that stopped without a `powerOff`. Called at the end of each reconciler pass.
    pub(crate) async fn resync_power(&self) {
        let records = match self.store.list_cloud_pc_records().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the Cloud PCs to check their power state");
                return;
            }
        };
        // A host that did not answer is not asked again in this pass: each call to an unreachable
        // libvirtd waits for it, and the reconciler's pass waits for this.
        // Hosts known to be unreachable are skipped quietly: the monitor marks their Cloud PCs.
        let rows = self.store.list_hosts().await.unwrap_or_default();
        let mut unreachable: std::collections::HashSet<String> = rows
            .iter()
            .filter(|r| crate::hosts::effective_state(r, Utc::now()) == cloudpc_types::hosts::HostState::Unreachable)
            .map(|r| r.host.display_name.clone())
            .collect();
        // What each agent reported with its last heartbeat: a Cloud PC whose VM it saw in the
        // state the record says, after the record's last change, needs no call to its host (with
        // thousands of Cloud PCs, a call each per pass is most of the control plane's work).
        let reports: std::collections::HashMap<
            String,
            (chrono::DateTime<Utc>, std::collections::HashMap<String, VmState>),
        > = rows
            .iter()
            .filter(|r| r.host.agent_address.is_some())
            .filter_map(|r| {
                let at = r.heartbeat?;
                let report: cloudpc_agent::HostReport = serde_json::from_value(r.report.clone()?).ok()?;
                Some((r.host.display_name.clone(), (at, report.vms.into_iter().map(|v| (v.name, v.state)).collect())))
            })
            .collect();
        for rec in records.iter().filter(|r| watched(r)) {
            let host = rec.state.resources.host.clone().unwrap_or_default();
            if unreachable.contains(&host) {
                continue;
            }
            let seen = reports.get(&host).and_then(|(at, vms)| {
                let domain = rec.state.resources.domain.as_deref()?;
                (*at > rec.pc.last_modified_date_time).then(|| vms.get(domain).copied()).flatten()
            });
            let in_line = seen.is_some_and(|s| in_line(s, rec.pc.power_state, rec.pc.power_state_detail));
            if in_line {
                continue;
            }
            match self.resync_power_of(rec.pc.id).await {
                Ok(()) => {}
                Err(Unchecked::HostUnreachable(e)) => {
                    tracing::warn!(cloud_pc = %rec.pc.id, %host, error = %e, "could not read the Cloud PC's power state");
                    unreachable.insert(host);
                }
                Err(Unchecked::Failed(e)) => {
                    tracing::warn!(cloud_pc = %rec.pc.id, error = %e, "could not bring the Cloud PC's power state in line");
                }
            }
        }
        self.hibernate_idle(&records, &unreachable).await;
    }

    /// Hibernates the running Cloud PCs whose policy sets `hibernateAfterMinutes` and whose
    /// console has been closed that long. Idle counts from the latest of: the console's in-use
    /// mark ending ([`crate::console::CONSOLE_IN_USE`]), provisioning, and the last remote action.
    async fn hibernate_idle(&self, records: &[CloudPcRecord], unreachable: &std::collections::HashSet<String>) {
        let Ok(policies) = self.store.list_policies().await else { return };
        let after: std::collections::HashMap<Uuid, u32> =
            policies.iter().filter_map(|p| Some((p.id, p.hibernate_after_minutes?))).collect();
        if after.is_empty() {
            return;
        }
        let marks: std::collections::HashMap<String, chrono::DateTime<Utc>> = match self
            .store
            .lease_ends(crate::console::CONSOLE_MARK)
            .await
        {
            Ok(m) => m.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "could not read when consoles were last open; no Cloud PC is hibernated this pass");
                return;
            }
        };
        let now = Utc::now();
        for rec in records.iter().filter(|r| watched(r) && r.pc.power_state == PowerState::Running) {
            let Some(minutes) = rec.pc.provisioning_policy_id.and_then(|p| after.get(&p)) else { continue };
            if rec.state.resources.host.as_ref().is_some_and(|h| unreachable.contains(h)) {
                continue;
            }
            let idle_since = [
                marks.get(&format!("{}{}", crate::console::CONSOLE_MARK, rec.pc.id)).copied(),
                rec.pc.provisioned_date_time,
                rec.pc.last_remote_action_result.as_ref().map(|a| a.last_updated_date_time),
            ]
            .into_iter()
            .flatten()
            .max();
            let limit = self.config.idle_minute * *minutes;
            let idle = idle_since.map(|t| (now - t).to_std().unwrap_or_default()).unwrap_or_default();
            if idle < limit {
                continue;
            }
            if let Err(e) = self.hibernate_idle_one(rec.pc.id, *minutes).await {
                tracing::warn!(cloud_pc = %rec.pc.id, error = %e, "could not hibernate the idle Cloud PC");
            }
        }
    }

    async fn hibernate_idle_one(&self, id: Uuid, minutes: u32) -> Result<()> {
        let _power = lock().await;
        // Read again under the lock: an action may have changed it since the pass began.
        let mut rec = self.store.get_cloud_pc_record(id).await?;
        if !watched(&rec) || rec.pc.power_state != PowerState::Running {
            return Ok(());
        }
        let (Some(host), Some(domain)) = (rec.state.resources.host.clone(), rec.state.resources.domain.clone()) else {
            return Ok(());
        };
        // A console may have opened (on any replica) since the pass read the marks: read again.
        let mark = format!("{}{}", crate::console::CONSOLE_MARK, rec.pc.id);
        let marks = self.store.lease_ends(crate::console::CONSOLE_MARK).await?;
        if marks.iter().any(|(name, ends)| *name == mark && *ends > Utc::now()) {
            return Ok(());
        }
        let hv = self.host(&host).await?;
        save_to_disk(hv.as_ref(), &domain).await?;
        tracing::info!(cloud_pc = %id, %domain, minutes, "hibernated the Cloud PC: its console was closed that long");
        rec.pc.power_state = PowerState::PoweredOff;
        rec.pc.power_state_detail = Some(PowerStateDetail::Saved);
        rec.pc.last_modified_date_time = Utc::now();
        let audit = power_event(
            &rec,
            "hibernate CloudPc",
            vec![
                property("powerState", Some("running".into()), Some("poweredOff (saved)".into())),
                property(
                    "reason",
                    None,
                    Some(format!("its console was closed for {minutes} minutes (hibernateAfterMinutes)")),
                ),
            ],
        );
        self.save_record(&mut rec, None, Some(&audit)).await
    }

    async fn resync_power_of(&self, id: Uuid) -> Result<(), Unchecked> {
        let _power = lock().await;
        // Read under the lock: a power action that finished before holds what it saved.
        let mut rec = self.store.get_cloud_pc_record(id).await?;
        if !watched(&rec) {
            return Ok(());
        }
        let (Some(host), Some(domain)) = (rec.state.resources.host.clone(), rec.state.resources.domain.clone()) else {
            return Ok(());
        };
        let hv = self.host(&host).await?;
        let observed = hv.state(&domain).await.map_err(|e| Unchecked::HostUnreachable(e.to_string()))?;
        let was = rec.pc.power_state;
        if in_line(observed, was, rec.pc.power_state_detail) {
            return Ok(());
        }
        match observed {
            VmState::Running => {
                self.save_power(&mut rec, PowerState::Running, None).await?;
            }
            // Hibernated by cloudpc (or saved on the host): it stays so until it is opened.
            VmState::Saved => {
                self.save_power(&mut rec, PowerState::PoweredOff, Some(PowerStateDetail::Saved)).await?;
            }
            // Its saved memory was discarded on the host: powered off, and still meant to be.
            VmState::ShutOff if was == PowerState::PoweredOff => {
                self.save_power(&mut rec, PowerState::PoweredOff, None).await?;
            }
            VmState::ShutOff if was != PowerState::PoweredOff => {
                ensure_vm_network(hv.as_ref(), &rec).await?;
                match hv.start(&domain).await {
                    Ok(()) => {
                        tracing::info!(cloud_pc = %id, %domain, "the Cloud PC's VM was shut off without a powerOff; started it again");
                        rec.pc.power_state = PowerState::Running;
                        rec.pc.power_state_detail = None;
                        rec.pc.last_modified_date_time = Utc::now();
                        let audit = power_event(&rec, "powerOn CloudPc", vec![
                                property("powerState", Some("poweredOff".into()), Some("running".into())),
                                property(
                                    "reason",
                                    None,
                                    Some("the VM stopped without a powerOff action (shut down from inside, crashed, or the host restarted)".into()),
                                ),
                            ],
                        );
                        self.save_record(&mut rec, None, Some(&audit)).await?;
                    }
                    Err(e) => {
                        // Unknown, not poweredOff: poweredOff means "an admin wants it off", and the
                        // next pass must try again.
                        if was != PowerState::Unknown {
                            self.save_power(&mut rec, PowerState::Unknown, None).await?;
                        }
                        return Err(Error::Conflict(format!(
                            "the VM {domain} is shut off and could not be started again: {e}"
                        ))
                        .into());
                    }
                }
            }
            VmState::Missing | VmState::Other if was != PowerState::Unknown => {
                self.save_power(&mut rec, PowerState::Unknown, None).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Records what libvirt reports; no audit event, since nothing was changed, only observed.
    async fn save_power(
        &self,
        rec: &mut CloudPcRecord,
        state: PowerState,
        detail: Option<PowerStateDetail>,
    ) -> Result<()> {
        rec.pc.power_state = state;
        rec.pc.power_state_detail = detail;
        rec.pc.last_modified_date_time = Utc::now();
        self.save_record(rec, None, None).await
    }
}
