//! The reconciler: level-triggered. It takes no input; it reads the world (users × licenses ×
//! group membership × ordered policy assignments) and the Cloud PCs that exist, decides what
//! should change, and does it. Change events wake it within a moment; a periodic resync makes
//! sure nothing depends on an event being seen.
//!
//! [`plan`] is a pure function, so its decisions are tested without VMs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use cloudpc_store::StoredAssignment;
use cloudpc_types::cloud_pc::{CloudPc, CloudPcStatus, PowerState, UserAccountType};
use cloudpc_types::policy::ProvisioningType;
use cloudpc_types::provisioning::{CloudPcRecord, Phase, ProvisioningState};

use crate::{App, Result};

/// Reconciler actions run at once in a pass (each concerns another Cloud PC).
const ACTIONS_AT_ONCE: usize = 8;

/// What the reconciler knows about one existing Cloud PC.
#[derive(Debug, Clone, PartialEq)]
pub struct ExistingPc {
    pub id: Uuid,
    pub user: Uuid,
    pub sku: Uuid,
    pub policy: Option<Uuid>,
    pub status: CloudPcStatus,
    pub phase: Phase,
    pub grace_end: Option<DateTime<Utc>>,
    pub cleanup_at: Option<DateTime<Utc>>,
    /// Set for a warm-pool machine.
    pub pool: Option<InPool>,
}

/// A warm-pool machine as the reconciler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InPool {
    pub policy: Uuid,
    /// Booted and claimable.
    pub ready: bool,
    /// Built from settings its policy no longer has.
    pub stale: bool,
}

/// A warm pool that should exist: `size` machines of `policy` for `sku`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolWant {
    pub policy: Uuid,
    pub sku: Uuid,
    pub size: u32,
}

/// The inputs of a decision.
#[derive(Debug, Default)]
pub struct World {
    /// Distinct (user, SKU) pairs that hold a license.
    pub licensed: Vec<(Uuid, Uuid)>,
    pub memberships: HashMap<Uuid, HashSet<Uuid>>,
    /// In order of first assignment: the first that matches a user wins.
    pub assignments: Vec<StoredAssignment>,
    pub pcs: Vec<ExistingPc>,
    pub pools: Vec<PoolWant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A licensed pair without a Cloud PC; `policy` is `None` when no policy targets the user.
    Create {
        user: Uuid,
        sku: Uuid,
        policy: Option<Uuid>,
    },
    /// A `notProvisioned` Cloud PC whose user is now targeted.
    Provision {
        pc: Uuid,
        policy: Uuid,
    },
    EnterGrace {
        pc: Uuid,
    },
    LeaveGrace {
        pc: Uuid,
    },
    Deprovision {
        pc: Uuid,
    },
    /// A `notProvisioned` Cloud PC whose license is gone.
    Forget {
        pc: Uuid,
    },
    /// Clean-up is due for a failed or deprovisioned Cloud PC.
    CleanUp {
        pc: Uuid,
    },
    /// A workflow should be running (resume after restart, retry after waiting for capacity).
    Resume {
        pc: Uuid,
    },
    /// As `Create`, but the policy's warm pool has a ready machine for the license: claim it.
    Claim {
        user: Uuid,
        sku: Uuid,
        policy: Uuid,
    },
    /// The policy's warm pool for the license is short of a machine.
    FillPool {
        policy: Uuid,
        sku: Uuid,
    },
    /// A warm-pool machine that is surplus, stale, no longer wanted, or failed long enough.
    RemovePooled {
        pc: Uuid,
    },
}

/// The policy that provisions a user: the first assigned one whose groups contain the user.
pub fn winning_policy(world: &World, user: Uuid) -> Option<Uuid> {
    let groups = world.memberships.get(&user)?;
    world.assignments.iter().find(|a| groups.contains(&a.group_id)).map(|a| a.policy_id)
}

pub fn plan(world: &World, now: DateTime<Utc>) -> Vec<Action> {
    // Each group's first assignment, so a user's winning policy is the earliest among their
    // groups' (the same answer as `winning_policy`, without scanning every assignment per user).
    let mut first: HashMap<Uuid, usize> = HashMap::new();
    for (i, a) in world.assignments.iter().enumerate() {
        first.entry(a.group_id).or_insert(i);
    }
    let winner = |user: Uuid| {
        let groups = world.memberships.get(&user)?;
        let i = groups.iter().filter_map(|g| first.get(g)).min()?;
        Some(world.assignments[*i].policy_id)
    };
    let desired: BTreeMap<(Uuid, Uuid), Option<Uuid>> =
        world.licensed.iter().map(|&(u, s)| ((u, s), winner(u))).collect();
    let mut actions = Vec::new();
    let mut has_pc = HashSet::new();
    let wanted_pools: HashMap<(Uuid, Uuid), u32> = world.pools.iter().map(|p| ((p.policy, p.sku), p.size)).collect();
    // Per pool: machines that count toward its size, and the ready ones (claimable).
    let mut members: HashMap<(Uuid, Uuid), u32> = HashMap::new();
    let mut ready: HashMap<(Uuid, Uuid), Vec<Uuid>> = HashMap::new();
    let mut unwanted: HashSet<Uuid> = HashSet::new();
    for pc in &world.pcs {
        let Some(pool) = pc.pool else { continue };
        let key = (pool.policy, pc.sku);
        let idle = pc.phase == Phase::Idle;
        let cleanup_due = pc.cleanup_at.is_some_and(|t| t <= now);
        match pc.status {
            CloudPcStatus::Deprovisioning => {}
            // A failed machine holds its place until its clean-up time, so a pool that cannot
            // be built is retried once per clean-up delay, not in a loop.
            CloudPcStatus::Failed if idle && cleanup_due => actions.push(Action::RemovePooled { pc: pc.id }),
            // One still booting is removed once it is idle.
            _ if pool.stale => {
                if idle {
                    actions.push(Action::RemovePooled { pc: pc.id });
                }
            }
            // No longer wanted (the last free seat was just taken, say): a ready one can still
            // serve the user who took it, and is removed only if no claim does.
            status if !wanted_pools.contains_key(&key) => {
                if status == CloudPcStatus::Pooled && pool.ready && idle {
                    ready.entry(key).or_default().push(pc.id);
                    unwanted.insert(pc.id);
                } else if idle {
                    actions.push(Action::RemovePooled { pc: pc.id });
                }
            }
            status => {
                *members.entry(key).or_default() += 1;
                if status == CloudPcStatus::Pooled && pool.ready && idle {
                    ready.entry(key).or_default().push(pc.id);
                }
            }
        }
    }
    for pc in &world.pcs {
        has_pc.insert((pc.user, pc.sku));
        if pc.pool.is_some() {
            continue;
        }
        let wanted = desired.get(&(pc.user, pc.sku));
        // Still wanted, under the same policy it was made by?
        let keep = matches!(wanted, Some(Some(p)) if Some(*p) == pc.policy);
        let cleanup_due = pc.cleanup_at.is_some_and(|t| t <= now);
        use CloudPcStatus::*;
        match pc.status {
            NotProvisioned => match wanted {
                None => actions.push(Action::Forget { pc: pc.id }),
                Some(Some(p)) => actions.push(Action::Provision { pc: pc.id, policy: *p }),
                Some(None) => {}
            },
            Provisioned | ProvisionedWithWarnings if !keep => actions.push(Action::EnterGrace { pc: pc.id }),
            InGracePeriod if keep => actions.push(Action::LeaveGrace { pc: pc.id }),
            InGracePeriod if pc.grace_end.is_some_and(|t| t <= now) => actions.push(Action::Deprovision { pc: pc.id }),
            Failed if cleanup_due => actions.push(Action::CleanUp { pc: pc.id }),
            Failed if !keep && pc.phase == Phase::Idle => actions.push(Action::Deprovision { pc: pc.id }),
            Deprovisioning if cleanup_due => actions.push(Action::CleanUp { pc: pc.id }),
            _ => {}
        }
        let busy = matches!(
            pc.phase,
            Phase::Forward
                | Phase::UndoThenRetry
                | Phase::UndoThenRestart
                | Phase::UndoThenDelete
                | Phase::UndoThenIdle
        );
        if busy {
            actions.push(Action::Resume { pc: pc.id });
        }
    }
    for (&(user, sku), &policy) in &desired {
        if !has_pc.contains(&(user, sku)) {
            let pooled = policy.and_then(|p| ready.get_mut(&(p, sku))).and_then(Vec::pop);
            match (pooled, policy) {
                (Some(_), Some(policy)) => {
                    // The claimed machine leaves the pool, which is refilled below.
                    if let Some(n) = members.get_mut(&(policy, sku)) {
                        *n = n.saturating_sub(1);
                    }
                    actions.push(Action::Claim { user, sku, policy });
                }
                _ => actions.push(Action::Create { user, sku, policy }),
            }
        }
    }
    // Unwanted machines that no claim took go.
    let mut left: Vec<Uuid> = ready.values().flatten().copied().filter(|id| unwanted.contains(id)).collect();
    left.sort();
    actions.extend(left.into_iter().map(|pc| Action::RemovePooled { pc }));
    // Refills come last: entitled users are served before pools are topped up.
    for want in &world.pools {
        let have = members.get(&(want.policy, want.sku)).copied().unwrap_or(0);
        for _ in have..want.size {
            actions.push(Action::FillPool { policy: want.policy, sku: want.sku });
        }
        // A shrunk pool gives up ready machines first-to-last (any will do).
        let surplus = have.saturating_sub(want.size) as usize;
        if let Some(ids) = ready.get(&(want.policy, want.sku)) {
            actions.extend(ids.iter().take(surplus).map(|&pc| Action::RemovePooled { pc }));
        }
    }
    actions
}

/// A Cloud PC record's body before provisioning: the license's service plan, nothing else yet.
pub(crate) fn new_cloud_pc(id: Uuid, sku: &cloudpc_types::licensing::SubscribedSku, now: DateTime<Utc>) -> CloudPc {
    CloudPc {
        id,
        display_name: String::new(),
        managed_device_name: None,
        user_principal_name: String::new(),
        provisioning_policy_id: None,
        provisioning_policy_name: None,
        service_plan_id: sku.sku_id,
        service_plan_name: sku.service_plans.first().map(|p| p.service_plan_name.clone()).unwrap_or_default(),
        image_display_name: None,
        image_version: None,
        provisioning_type: ProvisioningType::Dedicated,
        status: CloudPcStatus::NotProvisioned,
        status_detail: None,
        power_state: PowerState::Unknown,
        power_state_detail: None,
        grace_period_end_date_time: None,
        provisioned_date_time: None,
        last_modified_date_time: now,
        user_account_type: UserAccountType::StandardUser,
        os_version: None,
        last_remote_action_result: None,
    }
}

impl App {
    /// Runs the reconciler until the process ends. Each pass runs supervised: a panic in one
    /// (say, while reading the world) is logged and the next event or resync runs a new pass.
    pub async fn run_reconciler(self) {
        loop {
            let app = self.clone();
            // One replica reconciles at a time; the others only serve requests and run workflows.
            let pass = async move {
                if app.lead().await {
                    app.reconcile().await
                } else {
                    Ok(())
                }
            };
            match crate::supervise::supervised(pass).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reconciler pass failed; trying again at the next event or resync")
                }
                Err(panic) => {
                    tracing::error!(
                        panic,
                        "reconciler pass hit an internal error; trying again at the next event or resync"
                    )
                }
            }
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(self.config.resync_interval) => {}
            }
            // Coalesce bursts of changes into one pass.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn world(&self) -> Result<(World, HashMap<Uuid, CloudPcRecord>)> {
        let mut licensed: Vec<(Uuid, Uuid)> =
            self.store.license_grants().await?.into_iter().map(|g| (g.user_id, g.sku_id)).collect();
        // A disabled account is not entitled: its Cloud PCs enter their grace period, as when the
        // license is removed (a leaver deactivated in the organisation's directory).
        let disabled: HashSet<Uuid> = self.store.disabled_users().await?.into_iter().collect();
        licensed.retain(|(user, _)| !disabled.contains(user));
        licensed.sort();
        licensed.dedup();
        let mut memberships: HashMap<Uuid, HashSet<Uuid>> = HashMap::new();
        for (group, user) in self.store.memberships().await? {
            memberships.entry(user).or_default().insert(group);
        }
        let mut assignments = self.store.list_assignments().await?;
        assignments.sort_by_key(|a| (a.assigned_at, a.policy_id, a.position));
        let (pools, fingerprints) = self.wanted_pools(&assignments).await?;
        let records: HashMap<Uuid, CloudPcRecord> =
            self.store.list_cloud_pc_records().await?.into_iter().map(|r| (r.pc.id, r)).collect();
        let pcs = records
            .values()
            .map(|r| ExistingPc {
                id: r.pc.id,
                user: r.state.user_id,
                sku: r.state.sku_id,
                policy: r.pc.provisioning_policy_id,
                status: r.pc.status,
                phase: r.state.phase,
                grace_end: r.pc.grace_period_end_date_time,
                cleanup_at: r.state.cleanup_at,
                pool: r.state.pool.as_ref().map(|p| InPool {
                    policy: p.policy_id,
                    ready: p.ready,
                    stale: fingerprints.get(&(p.policy_id, r.state.sku_id)).is_some_and(|f| *f != p.fingerprint),
                }),
            })
            .collect();
        Ok((World { licensed, memberships, assignments, pcs, pools }, records))
    }

    /// The warm pools that should exist, with the fingerprint a machine of each is built to: for
    /// each assigned policy with a `warmPoolSize`, one per license that has free seats.
    async fn wanted_pools(
        &self,
        assignments: &[StoredAssignment],
    ) -> Result<(Vec<PoolWant>, HashMap<(Uuid, Uuid), String>)> {
        let assigned: HashSet<Uuid> = assignments.iter().map(|a| a.policy_id).collect();
        let policies: Vec<_> = self
            .store
            .list_policies()
            .await?
            .into_iter()
            .filter(|p| p.warm_pool_size > 0 && assigned.contains(&p.id))
            .collect();
        if policies.is_empty() {
            return Ok((Vec::new(), HashMap::new()));
        }
        let consumed = self.store.consumed_units().await?;
        let skus = self.store.list_skus().await?;
        let (mut pools, mut fingerprints) = (Vec::new(), HashMap::new());
        for p in &policies {
            let version = self.pool_image_version(p).await;
            for s in &skus {
                // Fingerprints for every license: a machine whose license just ran out of free
                // seats may still be claimed, and must not be stale.
                fingerprints.insert((p.id, s.id), crate::pool::fingerprint(p, version.as_deref(), s));
                if consumed.get(&s.id).copied().unwrap_or(0) < s.prepaid_units.enabled {
                    pools.push(PoolWant { policy: p.id, sku: s.id, size: p.warm_pool_size });
                }
            }
        }
        Ok((pools, fingerprints))
    }

    /// Reads the world and plans without acting; returns how many actions the plan has, and how
    /// long reading and planning took (the control-plane benchmark reports them).
    pub async fn plan_only(&self) -> Result<(usize, Duration, Duration)> {
        let started = std::time::Instant::now();
        let (world, _) = self.world().await?;
        let read = started.elapsed();
        let started = std::time::Instant::now();
        let actions = plan(&world, Utc::now()).len();
        Ok((actions, read, started.elapsed()))
    }

    /// One pass: read the world, plan, act. Each action runs supervised, on its own: a panic
    /// while acting for one Cloud PC marks that Cloud PC failed with the reason and the pass goes
    /// on with the others.
    pub async fn reconcile(&self) -> Result<()> {
        self.maybe_inject_panic("reconcile");
        let (world, mut records) = self.world().await?;
        let now = Utc::now();
        // Actions concern different Cloud PCs, so several run at once (a bulk license
        // assignment creates thousands); each is still its own supervised task.
        let width = Arc::new(tokio::sync::Semaphore::new(ACTIONS_AT_ONCE));
        let mut running = tokio::task::JoinSet::new();
        // Workflows with work left are resumed by the lease scan, not from here.
        for action in plan(&world, now).into_iter().filter(|a| !matches!(a, Action::Resume { .. })) {
            let app = self.clone();
            let policy = match &action {
                Action::Create { policy, .. } => *policy,
                Action::Provision { policy, .. } | Action::Claim { policy, .. } | Action::FillPool { policy, .. } => {
                    Some(*policy)
                }
                _ => None,
            };
            let (pc, during) = match &action {
                Action::Create { .. } => (None, "creating a Cloud PC"),
                Action::Provision { pc, .. } => (Some(*pc), "starting provisioning"),
                Action::EnterGrace { pc } => (Some(*pc), "starting the grace period"),
                Action::LeaveGrace { pc } => (Some(*pc), "ending the grace period"),
                Action::Deprovision { pc } => (Some(*pc), "deprovisioning"),
                Action::Forget { pc } => (Some(*pc), "removing a Cloud PC that is no longer licensed"),
                Action::CleanUp { pc } => (Some(*pc), "cleaning up"),
                Action::Resume { pc } => (Some(*pc), "resuming provisioning"),
                Action::Claim { .. } => (None, "claiming a warm-pool machine"),
                Action::FillPool { .. } => (None, "filling a warm pool"),
                Action::RemovePooled { pc } => (Some(*pc), "removing a warm-pool machine"),
            };
            let rec = pc.and_then(|id| records.remove(&id));
            let created = std::sync::Arc::new(std::sync::Mutex::new(None));
            let created_in_task = created.clone();
            let work = async move {
                match (action, rec) {
                    (Action::Create { user, sku, policy }, _) => {
                        app.create_cloud_pc(user, sku, policy, &created_in_task).await
                    }
                    (Action::Provision { policy, .. }, Some(mut rec)) => app.begin_provisioning(&mut rec, policy).await,
                    (Action::EnterGrace { .. }, Some(mut rec)) => app.enter_grace(&mut rec).await,
                    (Action::LeaveGrace { .. }, Some(mut rec)) => app.leave_grace(&mut rec).await,
                    (Action::Deprovision { .. }, Some(mut rec)) => app.deprovision(&mut rec).await,
                    (Action::Forget { pc }, Some(rec)) => {
                        let audit = crate::cloud_pcs::system_event("Delete CloudPc", &rec);
                        app.store.delete_cloud_pc(pc, Some(&audit)).await.map_err(Into::into)
                    }
                    (Action::CleanUp { .. }, Some(mut rec)) => app.clean_up(&mut rec).await,
                    (Action::Claim { user, sku, policy }, _) => {
                        // Another replica or pass may have taken the last ready machine.
                        if app.claim_from_pool(user, sku, policy).await? {
                            Ok(())
                        } else {
                            app.create_cloud_pc(user, sku, Some(policy), &created_in_task).await
                        }
                    }
                    (Action::FillPool { policy, sku }, _) => app.create_pool_machine(policy, sku).await,
                    (Action::RemovePooled { .. }, Some(mut rec)) => app.remove_pool_machine(&mut rec).await,
                    // Workflows with work left are picked up by every replica's scan for free or
                    // expired leases (`replicas.rs`), a few at a time as slots free up; driving
                    // each one from every pass would cost one claim per waiting Cloud PC.
                    (Action::Resume { .. }, _) => Ok(()),
                    // Another action of this pass took the record already.
                    (_, None) => Ok(()),
                }
            };
            let (this, permit) = (self.clone(), width.clone().acquire_owned().await);
            running.spawn(async move {
                let _permit = permit;
                match crate::supervise::supervised(work).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "reconciler action failed"),
                    Err(panic) => {
                        let created_pc = *created.lock().expect("created id");
                        match pc.or(created_pc) {
                            Some(id) => this.report_internal_error(id, policy, during, &panic).await,
                            None => tracing::error!(panic, during, "reconciler action hit an internal error"),
                        }
                    }
                }
            });
        }
        while running.join_next().await.is_some() {}
        self.resync_power().await;
        Ok(())
    }

    /// `created` gets the new Cloud PC's id as soon as it is stored, so an internal error after
    /// that can be shown on it.
    async fn create_cloud_pc(
        &self,
        user: Uuid,
        sku: Uuid,
        policy: Option<Uuid>,
        created: &std::sync::Mutex<Option<Uuid>>,
    ) -> Result<()> {
        let u = self.store.get_user(user).await?;
        let s = self.store.get_sku(sku).await?;
        let now = Utc::now();
        let mut rec = CloudPcRecord::new(
            CloudPc {
                display_name: format!("{} - {}", s.display_name, u.display_name).chars().take(64).collect(),
                user_principal_name: u.user_principal_name.clone(),
                status_detail: Some("No provisioning policy targets this user.".into()),
                ..new_cloud_pc(Uuid::new_v4(), &s, now)
            },
            ProvisioningState::new(user, sku, now),
        );
        let audit = crate::cloud_pcs::system_event("Create CloudPc", &rec);
        self.store.insert_cloud_pc(&mut rec, Some(&audit)).await?;
        *created.lock().expect("created id") = Some(rec.pc.id);
        if let Some(p) = policy {
            self.begin_provisioning(&mut rec, p).await?;
        }
        Ok(())
    }

    async fn begin_provisioning(&self, rec: &mut CloudPcRecord, policy: Uuid) -> Result<()> {
        rec.state.requested_at = Utc::now();
        let images = self.image_updates.lock().await;
        if let Err(e) = self.start_generation(rec, policy).await {
            self.could_not_start(rec, policy, &e).await;
        }
        self.save_record(rec, None, None).await?;
        drop(images);
        self.drive(rec.pc.id);
        Ok(())
    }

    async fn enter_grace(&self, rec: &mut CloudPcRecord) -> Result<()> {
        let hours = rec.state.spec.as_ref().and_then(|s| s.grace_period_hours);
        let grace = match hours {
            Some(h) => chrono::Duration::hours(i64::from(h)),
            None => chrono::Duration::from_std(self.config.grace_period).unwrap_or(chrono::Duration::days(7)),
        };
        rec.state.status_before_grace = Some(rec.pc.status);
        rec.pc.status = CloudPcStatus::InGracePeriod;
        rec.pc.grace_period_end_date_time = Some(Utc::now() + grace);
        rec.pc.status_detail = Some("The user lost the license, group membership or policy assignment; the Cloud PC is deprovisioned when the grace period ends.".into());
        rec.pc.last_modified_date_time = Utc::now();
        let audit = crate::cloud_pcs::system_event("Enter grace period CloudPc", rec);
        self.save_record(rec, None, Some(&audit)).await?;
        Ok(())
    }

    async fn leave_grace(&self, rec: &mut CloudPcRecord) -> Result<()> {
        rec.pc.status = rec.state.status_before_grace.take().unwrap_or(CloudPcStatus::Provisioned);
        rec.pc.grace_period_end_date_time = None;
        rec.pc.status_detail = None;
        rec.pc.last_modified_date_time = Utc::now();
        let audit = crate::cloud_pcs::system_event("Leave grace period CloudPc", rec);
        self.save_record(rec, None, Some(&audit)).await?;
        Ok(())
    }

    /// Takes the Cloud PC away from its user now; clean-up follows after the configured delay.
    pub(crate) async fn deprovision(&self, rec: &mut CloudPcRecord) -> Result<()> {
        self.close_consoles(rec.pc.id).await;
        if let (Some(host), Some(domain)) = (rec.state.resources.host.clone(), rec.state.resources.domain.clone()) {
            if let Ok(hv) = self.host(&host).await {
                if let Err(e) = hv.power_off(&domain).await {
                    tracing::warn!(cloud_pc = %rec.pc.id, error = %e, "could not power off a deprovisioned Cloud PC; clean-up will remove it");
                }
            }
        }
        rec.pc.status = CloudPcStatus::Deprovisioning;
        rec.pc.power_state = PowerState::PoweredOff;
        rec.pc.status_detail = Some("Deprovisioned; its resources are removed at clean-up.".into());
        rec.state.phase = Phase::Idle;
        rec.state.cleanup_at = Some(Utc::now() + self.cleanup_delay());
        rec.pc.last_modified_date_time = Utc::now();
        let audit = crate::cloud_pcs::system_event("Deprovision CloudPc", rec);
        self.save_record(rec, None, Some(&audit)).await?;
        self.changed();
        Ok(())
    }

    async fn clean_up(&self, rec: &mut CloudPcRecord) -> Result<()> {
        rec.state.phase =
            if rec.pc.status == CloudPcStatus::Failed { Phase::UndoThenIdle } else { Phase::UndoThenDelete };
        rec.state.cleanup_at = None;
        self.save_record(rec, None, None).await?;
        self.drive(rec.pc.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::new_v4()).collect()
    }

    fn assignment(policy: Uuid, group: Uuid, minutes: i64) -> StoredAssignment {
        StoredAssignment {
            policy_id: policy,
            group_id: group,
            position: 0,
            assigned_at: Utc::now() + chrono::Duration::minutes(minutes),
        }
    }

    fn pc(id: Uuid, user: Uuid, sku: Uuid, policy: Option<Uuid>, status: CloudPcStatus) -> ExistingPc {
        ExistingPc { id, user, sku, policy, status, phase: Phase::Idle, grace_end: None, cleanup_at: None, pool: None }
    }

    #[test]
    fn test_plan_two_licenses_get_two_cloud_pcs_from_one_policy() {
        let [user, sku1, sku2, group, policy] = ids(5).try_into().unwrap();
        let world = World {
            licensed: vec![(user, sku1), (user, sku2)],
            memberships: HashMap::from([(user, HashSet::from([group]))]),
            assignments: vec![assignment(policy, group, 0)],
            pcs: vec![],
            pools: vec![],
        };
        let actions = plan(&world, Utc::now());
        assert_eq!(actions.len(), 2);
        assert!(actions.contains(&Action::Create { user, sku: sku1, policy: Some(policy) }));
        assert!(actions.contains(&Action::Create { user, sku: sku2, policy: Some(policy) }));
    }

    #[test]
    fn test_plan_first_assigned_policy_wins() {
        let [user, sku, g1, g2, early, late] = ids(6).try_into().unwrap();
        let world = World {
            licensed: vec![(user, sku)],
            memberships: HashMap::from([(user, HashSet::from([g1, g2]))]),
            assignments: vec![assignment(early, g2, 0), assignment(late, g1, 5)],
            pcs: vec![],
            pools: vec![],
        };
        assert_eq!(plan(&world, Utc::now()), vec![Action::Create { user, sku, policy: Some(early) }]);
    }

    #[test]
    fn test_plan_licensed_but_untargeted_user_is_not_provisioned() {
        let [user, sku] = ids(2).try_into().unwrap();
        let world = World { licensed: vec![(user, sku)], ..Default::default() };
        assert_eq!(plan(&world, Utc::now()), vec![Action::Create { user, sku, policy: None }]);
    }

    #[test]
    fn test_plan_grace_enter_leave_expire() {
        let [user, sku, group, policy, id] = ids(5).try_into().unwrap();
        let targeted = World {
            licensed: vec![(user, sku)],
            memberships: HashMap::from([(user, HashSet::from([group]))]),
            assignments: vec![assignment(policy, group, 0)],
            pcs: vec![pc(id, user, sku, Some(policy), CloudPcStatus::Provisioned)],
            pools: vec![],
        };
        assert!(plan(&targeted, Utc::now()).is_empty(), "a provisioned, wanted Cloud PC is left alone");

        let unlicensed = World { pcs: targeted.pcs.clone(), ..Default::default() };
        assert_eq!(plan(&unlicensed, Utc::now()), vec![Action::EnterGrace { pc: id }]);

        let mut in_grace = pc(id, user, sku, Some(policy), CloudPcStatus::InGracePeriod);
        in_grace.grace_end = Some(Utc::now() + chrono::Duration::hours(1));
        let restored = World { pcs: vec![in_grace.clone()], ..targeted };
        assert_eq!(plan(&restored, Utc::now()), vec![Action::LeaveGrace { pc: id }]);

        let still_gone = World { pcs: vec![in_grace.clone()], ..Default::default() };
        assert!(plan(&still_gone, Utc::now()).is_empty(), "grace not over yet");
        assert_eq!(plan(&still_gone, Utc::now() + chrono::Duration::hours(2)), vec![Action::Deprovision { pc: id }]);
    }

    #[test]
    fn test_plan_policy_change_puts_old_pc_in_grace_and_waits_for_it() {
        let [user, sku, g1, g2, old, new, id] = ids(7).try_into().unwrap();
        let world = World {
            licensed: vec![(user, sku)],
            memberships: HashMap::from([(user, HashSet::from([g2]))]),
            assignments: vec![assignment(old, g1, 0), assignment(new, g2, 1)],
            pcs: vec![pc(id, user, sku, Some(old), CloudPcStatus::Provisioned)],
            pools: vec![],
        };
        assert_eq!(plan(&world, Utc::now()), vec![Action::EnterGrace { pc: id }], "one Cloud PC per user and license");
    }

    #[test]
    fn test_plan_not_provisioned_pc_follows_targeting_and_license() {
        let [user, sku, group, policy, id] = ids(5).try_into().unwrap();
        let waiting = pc(id, user, sku, None, CloudPcStatus::NotProvisioned);
        let world = World {
            licensed: vec![(user, sku)],
            memberships: HashMap::from([(user, HashSet::from([group]))]),
            assignments: vec![assignment(policy, group, 0)],
            pcs: vec![waiting.clone()],
            pools: vec![],
        };
        assert_eq!(plan(&world, Utc::now()), vec![Action::Provision { pc: id, policy }]);
        let gone = World { pcs: vec![waiting], ..Default::default() };
        assert_eq!(plan(&gone, Utc::now()), vec![Action::Forget { pc: id }]);
    }

    #[test]
    fn test_plan_resumes_busy_workflows_and_cleans_up_when_due() {
        let [user, sku, id, id2] = ids(4).try_into().unwrap();
        let mut busy = pc(id, user, sku, None, CloudPcStatus::Provisioning);
        busy.phase = Phase::Forward;
        let mut failed = pc(id2, user, Uuid::new_v4(), None, CloudPcStatus::Failed);
        failed.cleanup_at = Some(Utc::now() - chrono::Duration::seconds(1));
        let world = World { licensed: vec![(user, sku)], pcs: vec![busy, failed], ..Default::default() };
        let actions = plan(&world, Utc::now());
        assert!(actions.contains(&Action::Resume { pc: id }));
        assert!(actions.contains(&Action::CleanUp { pc: id2 }));
    }

    fn pooled(id: Uuid, sku: Uuid, policy: Uuid, status: CloudPcStatus, ready: bool) -> ExistingPc {
        ExistingPc {
            id,
            user: id,
            sku,
            policy: Some(policy),
            status,
            phase: Phase::Idle,
            grace_end: None,
            cleanup_at: None,
            pool: Some(InPool { policy, ready, stale: false }),
        }
    }

    #[test]
    fn test_plan_warm_pool_claims_before_creating_and_refills_last() {
        let [user, sku, group, policy, m1, m2] = ids(6).try_into().unwrap();
        let want = PoolWant { policy, sku, size: 2 };
        let empty = World {
            licensed: vec![],
            assignments: vec![assignment(policy, group, 0)],
            pools: vec![want],
            ..Default::default()
        };
        assert_eq!(plan(&empty, Utc::now()), vec![Action::FillPool { policy, sku }; 2], "an empty pool is filled");

        // One ready, one booting: a new user gets the ready one, and one refill follows.
        let mut booting = pooled(m2, sku, policy, CloudPcStatus::Provisioning, false);
        booting.phase = Phase::Forward;
        let world = World {
            licensed: vec![(user, sku)],
            memberships: HashMap::from([(user, HashSet::from([group]))]),
            assignments: vec![assignment(policy, group, 0)],
            pcs: vec![pooled(m1, sku, policy, CloudPcStatus::Pooled, true), booting.clone()],
            pools: vec![want],
        };
        let actions = plan(&world, Utc::now());
        assert_eq!(
            actions.iter().filter(|a| !matches!(a, Action::Resume { .. })).cloned().collect::<Vec<_>>(),
            vec![Action::Claim { user, sku, policy }, Action::FillPool { policy, sku }],
            "claim first, refill last"
        );

        // The user took the last free seat, so no pool is wanted any more: the ready machine
        // still serves them, and nothing is refilled or removed.
        let last_seat = World {
            licensed: world.licensed.clone(),
            memberships: world.memberships.clone(),
            assignments: world.assignments.clone(),
            pcs: world.pcs.clone(),
            pools: vec![],
        };
        assert_eq!(
            plan(&last_seat, Utc::now())
                .into_iter()
                .filter(|a| !matches!(a, Action::Resume { .. }))
                .collect::<Vec<_>>(),
            vec![Action::Claim { user, sku, policy }]
        );
        // Without a user to claim it, an unwanted ready machine goes.
        let unclaimed = World { licensed: vec![], ..last_seat };
        assert_eq!(
            plan(&unclaimed, Utc::now())
                .into_iter()
                .filter(|a| !matches!(a, Action::Resume { .. }))
                .collect::<Vec<_>>(),
            vec![Action::RemovePooled { pc: m1 }]
        );

        // Only a booting machine: the user is not made to wait for it; a Cloud PC is created.
        let world = World { pcs: vec![booting], ..world };
        assert!(plan(&world, Utc::now()).contains(&Action::Create { user, sku, policy: Some(policy) }));
    }

    #[test]
    fn test_plan_warm_pool_removes_stale_surplus_unwanted_and_long_failed_machines() {
        let [sku, policy, m1, m2, m3, m4] = ids(6).try_into().unwrap();
        let mut stale = pooled(m1, sku, policy, CloudPcStatus::Pooled, true);
        stale.pool = Some(InPool { policy, ready: true, stale: true });
        let mut failed = pooled(m4, sku, policy, CloudPcStatus::Failed, false);
        failed.cleanup_at = Some(Utc::now() + chrono::Duration::hours(1));
        let world = World {
            pcs: vec![
                stale.clone(),
                pooled(m2, sku, policy, CloudPcStatus::Pooled, true),
                pooled(m3, sku, policy, CloudPcStatus::Pooled, true),
                failed.clone(),
            ],
            pools: vec![PoolWant { policy, sku, size: 2 }],
            ..Default::default()
        };
        let actions = plan(&world, Utc::now());
        assert!(actions.contains(&Action::RemovePooled { pc: m1 }), "stale: {actions:?}");
        // m2, m3 and the failed m4 (not due yet) make 3 for a size of 2: one ready one goes.
        let removed: Vec<_> = actions.iter().filter(|a| matches!(a, Action::RemovePooled { .. })).collect();
        assert_eq!(removed.len(), 2, "{actions:?}");
        assert!(!actions.contains(&Action::RemovePooled { pc: m4 }), "a failed machine holds its place until clean-up");
        assert!(!actions.iter().any(|a| matches!(a, Action::FillPool { .. })));
        // Its clean-up time come, the failed one goes and is replaced.
        let later = Utc::now() + chrono::Duration::hours(2);
        let actions = plan(
            &World { pcs: vec![failed], pools: vec![PoolWant { policy, sku, size: 1 }], ..Default::default() },
            later,
        );
        assert_eq!(actions, vec![Action::RemovePooled { pc: m4 }, Action::FillPool { policy, sku }]);
        // No pool wanted any more (size 0, unassigned, or no free seats): every idle machine goes.
        let gone = World { pcs: vec![pooled(m2, sku, policy, CloudPcStatus::Pooled, true)], ..Default::default() };
        assert_eq!(plan(&gone, Utc::now()), vec![Action::RemovePooled { pc: m2 }]);
    }
}
