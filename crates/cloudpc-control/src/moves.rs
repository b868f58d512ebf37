//! Moving Cloud PCs off a host: drain, evacuation, and the clean-up of VMs a host should no
//! longer have.
//!
//! **Drain** is a cold move that keeps the user's data: the guest's file systems are synced
//! through its agent, the VM is stopped, its disk is copied to a ready host of the same region
//! (streamed through the control plane, agent to agent), and the VM is defined and started there;
//! then the old VM and disk go. The target is stored first (`moving_to`), and every part is
//! idempotent, so a move cut short by a crash is finished by whichever replica monitors next.
//! One move at a time per control plane, as an admin expects from a default drain.
//!
//! **Evacuation** is for a host that is gone: its Cloud PCs are recreated from their images on
//! other hosts, and what their users saved there is lost (the admin confirms that first).
//!
//! **Orphans**: a host that comes back after its Cloud PCs moved or were recreated still has
//! their old VMs (stopped, if its agent fenced itself). The monitor removes every VM an agent
//! reports that no Cloud PC places on that host.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use cloudpc_hypervisor::{Hypervisor, VmSpec, VmState};
use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::cloud_pc::{CloudPcStatus, PowerState};
use cloudpc_types::hosts::{Host, HostState};
use cloudpc_types::provisioning::{CloudPcRecord, Phase};
use cloudpc_types::ValidationError;

use crate::audit::{property, Actor, Change};
use crate::provisioning::steps::{cloud_pc_nic, host_network, hv_err};
use crate::{App, Error, Result};

/// How long the guest may take to flush its file systems before its VM is stopped.
const SYNC_LIMIT: Duration = Duration::from_secs(20);

/// Cloud PCs that can be moved now: provisioned and idle (a workflow in flight finishes first),
/// the same ones whose power cloudpc keeps.
fn movable(rec: &CloudPcRecord) -> bool {
    crate::power::watched(rec)
}

impl App {
    /// One step of every drain: finishes a move cut short, else moves the next Cloud PC off a
    /// draining host. Run by the monitor's replica; a move holds the Cloud PC's workflow lease.
    pub(crate) async fn drain_once(&self) -> Result<()> {
        let records = self.store.list_cloud_pc_records().await?;
        if let Some(rec) = records.iter().find(|r| r.state.moving_to.is_some()) {
            let target = rec.state.moving_to.clone().unwrap_or_default();
            return self.move_cloud_pc(rec.pc.id, &target).await;
        }
        let now = Utc::now();
        let rows = self.store.list_hosts().await?;
        let draining: Vec<&Host> = rows
            .iter()
            .filter(|r| {
                r.host.state == HostState::Draining && crate::hosts::effective_state(r, now) == HostState::Draining
            })
            .map(|r| &r.host)
            .collect();
        for host in draining {
            let Some(rec) = records
                .iter()
                .find(|r| r.state.resources.host.as_deref() == Some(host.display_name.as_str()) && movable(r))
            else {
                continue;
            };
            let target = {
                let _gate = self.allocation_gate.lock().await;
                let _lock = self.store.lock_allocation().await?;
                let spec = rec.state.spec.clone().unwrap_or_else(|| unreachable!("movable Cloud PCs have a spec"));
                let (candidates, why_none) = self.placement_candidates(&host.region).await?;
                // Disks move between hosts of one kind: a disk on an agent's host is based on that
                // host's image cache, one on a host in this process on cloudpc's own image files.
                let agent_kind = host.agent_address.is_some();
                let local: Vec<String> = self.local_hosts().iter().map(|h| h.config().name.clone()).collect();
                let best = candidates
                    .iter()
                    .filter(|(name, _, _)| name != &host.display_name)
                    .filter(|(name, _, _)| local.contains(name) != agent_kind)
                    .filter(|(_, cap, used)| {
                        used.vcpus + u64::from(spec.vcpus) <= cap.v_cpu_count
                            && used.memory_mib + spec.memory_mib <= cap.memory_in_mb
                            && used.storage_gib + spec.storage_gib <= cap.disk_in_gb
                    })
                    .max_by_key(|(name, cap, used)| (cap.memory_in_mb - used.memory_mib, name.clone()))
                    .map(|(name, _, _)| name.clone());
                let Some(target) = best else {
                    tracing::info!(
                        host = %host.display_name,
                        reason = why_none.as_deref().unwrap_or("no other ready host of the region has room"),
                        "drain waits for a host to move Cloud PCs to"
                    );
                    continue;
                };
                let mut rec = rec.clone();
                rec.state.moving_to = Some(target.clone());
                rec.pc.status_detail = Some(format!(
                    "Moving to another host (its host '{}' is being drained); it is back in a few minutes with \
                     everything saved on it.",
                    host.display_name
                ));
                self.save_record(&mut rec, None, None).await?;
                target
            };
            return self.move_cloud_pc(rec.pc.id, &target).await;
        }
        Ok(())
    }

    /// Moves one Cloud PC to `target`, keeping its disk; every part may run again.
    async fn move_cloud_pc(&self, id: Uuid, target: &str) -> Result<()> {
        if !self.store.claim_workflow(id, self.replica(), crate::replicas::WORKFLOW_LEASE).await? {
            return Ok(());
        }
        // In the running set, the lease is renewed while the copy lasts and no workflow starts.
        if !self.running.lock().expect("running set").insert(id) {
            return Ok(());
        }
        let result = self.move_claimed(id, target).await;
        self.running.lock().expect("running set").remove(&id);
        let _ = self.store.release_workflow(id, self.replica()).await;
        if let Err(e) = &result {
            tracing::warn!(cloud_pc = %id, %target, error = %e, "moving a Cloud PC failed; trying again");
        }
        result
    }

    async fn move_claimed(&self, id: Uuid, target: &str) -> Result<()> {
        let mut rec = self.store.get_cloud_pc_record(id).await?;
        let r = rec.state.resources.clone();
        let (Some(source), Some(domain), Some(disk)) = (r.host.clone(), r.domain.clone(), r.disk.clone()) else {
            rec.state.moving_to = None;
            return self.save_record(&mut rec, None, None).await;
        };
        let started = std::time::Instant::now();
        let to = self.host(target).await?;
        let spec =
            rec.state.spec.clone().ok_or_else(|| Error::Conflict("the Cloud PC has no build specification".into()))?;
        // A hibernated Cloud PC's saved memory does not come along (only the disk does): it boots
        // afresh on the new host, so that it is there when its user opens it.
        let was_saved = rec.pc.power_state_detail == Some(cloudpc_types::cloud_pc::PowerStateDetail::Saved);
        let was_on = rec.pc.power_state != PowerState::PoweredOff || was_saved;
        if source != target {
            let from = self.host(&source).await?;
            self.close_consoles(id).await;
            // Flush what the user saved: the VM is stopped hard next.
            crate::power::flush_guest(from.as_ref(), &domain, SYNC_LIMIT, "moving it").await;
            {
                // Under the power lock: a power action or console ticket that starts after this
                // reads `moving_to` and is refused, and one already under way has finished (its VM
                // is stopped here, after the sync above).
                let _power = crate::power::lock().await;
                from.power_off(&domain).await.map_err(hv_err)?;
            }
            // Hosts in this process share the file system: the disk stays where it is.
            let shared = self.local_hosts().iter().any(|h| h.config().name == source)
                && self.local_hosts().iter().any(|h| h.config().name == target);
            // A VM already defined on the target means an earlier run of this move copied the
            // disk and may have started it there: copying again would replace the disk under it.
            let copied = !matches!(to.state(&domain).await.map_err(hv_err)?, VmState::Missing);
            if !shared && !copied {
                if let Some((data, _)) = from.export_file(&disk).await.map_err(hv_err)? {
                    to.import_file(&disk, data).await.map_err(hv_err)?;
                }
            }
            // The disk's base image (and kernel) must be on the new host first.
            rec.state.resources.image_on_host =
                if to.ships_images() { Some(self.image_on_host(to.as_ref(), &spec).await?) } else { None };
            self.define_and_start(to.as_ref(), &rec, &spec, was_on).await?;
            from.remove_vm(&domain).await.map_err(hv_err)?;
            if !shared {
                from.remove_file(&disk).await.map_err(hv_err)?;
            }
            if let Some(log) = &r.console_log {
                let _ = from.remove_file(log).await;
            }
        }
        let network = match spec.connection_id {
            Some(_) => rec.state.resources.network.clone(),
            None => Some(host_network(to.config(), &spec.region).name),
        };
        rec.state.resources.host = Some(target.to_string());
        rec.state.resources.network = network;
        rec.state.moving_to = None;
        rec.pc.status_detail = Some(format!(
            "Moved to another host on {} while its host '{source}' was drained; everything saved on it came along{}.",
            Utc::now().format("%Y-%m-%d %H:%M UTC"),
            if was_saved { ", but it was hibernated and started afresh: what was open is lost" } else { "" }
        ));
        rec.pc.power_state = if was_on { PowerState::Running } else { PowerState::PoweredOff };
        rec.pc.power_state_detail = None;
        let audit = Change {
            component: "Hosts",
            activity: "Move CloudPc".into(),
            operation: AuditOperationType::Patch,
            resource_type: "cloudPC",
            resource_id: id.to_string(),
            resource_name: rec.pc.managed_device_name.clone().unwrap_or_default(),
        }
        .event_with(&Actor::system(), vec![property("host", Some(source.clone()), Some(target.to_string()))]);
        self.save_record(&mut rec, None, Some(&audit)).await?;
        tracing::info!(cloud_pc = %id, from = %source, to = %target, ms = started.elapsed().as_millis() as u64, "Cloud PC moved");
        Ok(())
    }

    /// The moved VM on its new host: the same machine, its disk, a NIC on that host's network.
    async fn define_and_start(
        &self,
        to: &dyn Hypervisor,
        rec: &CloudPcRecord,
        spec: &cloudpc_types::provisioning::BuildSpec,
        start: bool,
    ) -> Result<()> {
        let r = &rec.state.resources;
        let domain = r.domain.clone().unwrap_or_default();
        let boot = crate::provisioning::steps::boot_of(spec, r.image_on_host.as_ref());
        let vm = VmSpec {
            name: domain.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk: r.disk.clone().unwrap_or_default(),
            boot,
            console_log: r.console_log.clone().unwrap_or_default(),
        };
        to.define_vm(&vm).await.map_err(hv_err)?;
        // The filter the Cloud PC had: inbound remote desktop blocked unless that step failed.
        let blocked = !rec.state.warnings.iter().any(|w| w.starts_with("blockRemoteDesktop"));
        let (nic, _) = cloud_pc_nic(self, spec, to, r.mac.clone().unwrap_or_default(), blocked).await?;
        to.attach_nic(&domain, &nic).await.map_err(hv_err)?;
        if start {
            to.start(&domain).await.map_err(hv_err)?;
        }
        Ok(())
    }

    /// Recreates the Cloud PCs of a lost host on other hosts. Refused unless the host is
    /// unreachable and the admin confirmed that their users' data is lost.
    pub async fn evacuate_host(&self, actor: &Actor, id: Uuid, confirm_data_loss: bool) -> Result<Vec<Uuid>> {
        let host = self.get_host(id).await?;
        if host.state != HostState::Unreachable {
            return Err(Error::Conflict(
                format!(
                    "host '{}' is {:?}, not unreachable: drain it instead, which moves its Cloud PCs with their data",
                    host.display_name, host.state
                )
                .replace("Ready", "ready")
                .replace("Maintenance", "in maintenance")
                .replace("Draining", "draining"),
            ));
        }
        let on_host: Vec<CloudPcRecord> = self
            .store
            .list_cloud_pc_records()
            .await?
            .into_iter()
            .filter(|r| r.state.resources.host.as_deref() == Some(host.display_name.as_str()))
            .collect();
        if !confirm_data_loss {
            return Err(Error::Invalid(ValidationError::new(
                "confirmDataLoss",
                format!(
                    "evacuating recreates the {} Cloud PC(s) of host '{}' on other hosts from their images: everything \
                     their users saved on them is lost. Send confirmDataLoss: true to go ahead",
                    on_host.len(),
                    host.display_name
                ),
            )));
        }
        let mut moved = Vec::new();
        for rec in on_host {
            let mut rec = rec;
            // The VM stays behind on the lost host; if it ever comes back, its agent fenced it and
            // the monitor removes it as an orphan.
            rec.state.resources.host = None;
            rec.state.moving_to = None;
            if rec.pc.provisioning_policy_id.is_none() {
                continue;
            }
            rec.pc.status = CloudPcStatus::Provisioning;
            rec.pc.power_state = PowerState::Unknown;
            rec.pc.power_state_detail = None;
            rec.pc.status_detail = Some(format!(
                "Recreated on another host: its host '{}' was lost. What was saved on it is gone.",
                host.display_name
            ));
            rec.state.phase = Phase::UndoThenRestart;
            rec.state.cleanup_at = None;
            let audit = Change {
                component: "Hosts",
                activity: "Evacuate CloudPc".into(),
                operation: AuditOperationType::Other,
                resource_type: "cloudPC",
                resource_id: rec.pc.id.to_string(),
                resource_name: rec.pc.managed_device_name.clone().unwrap_or_default(),
            }
            .event_with(actor, vec![property("host", Some(host.display_name.clone()), None)]);
            self.close_consoles(rec.pc.id).await;
            self.save_record(&mut rec, None, Some(&audit)).await?;
            self.drive(rec.pc.id);
            moved.push(rec.pc.id);
        }
        tracing::warn!(host = %host.display_name, cloud_pcs = moved.len(), "host evacuated");
        Ok(moved)
    }

    /// Evacuates hosts unreachable for longer than the configured time (off by default).
    pub(crate) async fn auto_evacuate(&self) -> Result<()> {
        let Some(after) = self.config.evacuate_after else { return Ok(()) };
        let now = Utc::now();
        for row in self.store.list_hosts().await? {
            let lost_since = row.heartbeat.unwrap_or(row.host.created_date_time);
            if crate::hosts::effective_state(&row, now) != HostState::Unreachable
                || now - lost_since < chrono::Duration::from_std(after).unwrap_or_default()
            {
                continue;
            }
            let moved = self.evacuate_host(&Actor::system(), row.host.id, true).await?;
            if !moved.is_empty() {
                tracing::warn!(host = %row.host.display_name, "evacuated automatically after {after:?} unreachable");
            }
        }
        Ok(())
    }

    /// Removes the VMs (and their disks) an agent reports that no Cloud PC places on its host.
    pub(crate) async fn remove_orphans(
        &self,
        host: &str,
        reported: &[String],
        records: &[CloudPcRecord],
    ) -> Result<()> {
        if reported.is_empty() {
            return Ok(());
        }
        let expected: HashSet<String> = records
            .iter()
            .filter(|r| r.state.resources.host.as_deref() == Some(host) || r.state.moving_to.as_deref() == Some(host))
            .filter_map(|r| r.state.resources.domain.clone())
            .collect();
        let check_prefix = format!("{}imagecheck-", self.config.domain_prefix);
        let hv = self.host(host).await?;
        for vm in reported {
            if expected.contains(vm) || vm.starts_with(&check_prefix) || !vm.starts_with(&self.config.domain_prefix) {
                continue;
            }
            tracing::warn!(%host, %vm, "removing a VM no Cloud PC has on this host (moved or recreated elsewhere)");
            hv.power_off(vm).await.map_err(hv_err)?;
            hv.remove_vm(vm).await.map_err(hv_err)?;
            let disk = self.config.storage_dir.join(format!("{vm}.qcow2"));
            hv.remove_file(&disk).await.map_err(hv_err)?;
            hv.remove_file(&disk.with_extension("console.log")).await.map_err(hv_err)?;
        }
        Ok(())
    }
}
