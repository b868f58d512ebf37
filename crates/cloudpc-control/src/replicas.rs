//! Sharing the work between several cloudpc replicas on one database.
//!
//! Nothing here is decided by a process-local lock: each Cloud PC's workflow runs on the replica
//! holding its lease (a row in the database, renewed every few seconds, expiring 15 s after the
//! last renewal), the reconciler acts on the replica holding the `reconciler` lease, and every
//! workflow write is conditioned on still holding the lease. A replica that dies stops renewing;
//! another one's scan finds the expired lease and carries the workflow on from the step where it
//! stopped (steps are idempotent). Changes are announced to every replica (PostgreSQL `NOTIFY`),
//! with the periodic resync as the safety net. On SQLite there is one process, which holds every
//! lease; the same code runs.

use std::collections::HashSet;
use std::time::Duration;

use uuid::Uuid;

use cloudpc_store::StoreError;
use cloudpc_types::audit::AuditEvent;
use cloudpc_types::cloud_pc::ProvisioningStepRecord;
use cloudpc_types::provisioning::CloudPcRecord;

use crate::{App, Result};

/// A workflow lease lasts this long after its last renewal.
pub const WORKFLOW_LEASE: Duration = Duration::from_secs(15);
/// Leases are renewed this often (a third of their life, so two renewals may fail).
pub const LEASE_RENEWAL: Duration = Duration::from_secs(5);
/// How often a replica looks for workflows whose lease expired (another replica died).
pub const SCAN_INTERVAL: Duration = Duration::from_secs(2);
/// The reconciler's lease: held by one replica, renewed at every pass and every renewal tick.
pub const RECONCILER_LEASE: &str = "reconciler";
/// A workflow that must wait (no capacity) keeps its lease this long before anyone retries it.
pub const WAIT_HOLD_OFF: Duration = Duration::from_secs(10);
/// Compare-and-swap retries before a write gives up (each one follows a newer write).
const MAX_REBASES: usize = 8;

/// Each replica's heartbeat lease is named this, then the replica's name.
const HEARTBEAT: &str = "replica:";

/// Topics of change notices; anything else means "something changed, reconcile".
const CLOSE_CONSOLES: &str = "close-consoles:";
const CLOSE_USER_CONSOLES: &str = "close-user-consoles:";

impl App {
    /// This replica's name in leases and logs.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Writes a Cloud PC outside its workflow (reconciler, actions, power): when the row moved on
    /// since `rec` was read, `rec`'s own changes are rebased onto the newer row and written again,
    /// so neither side's changes are lost.
    pub(crate) async fn save_record(
        &self,
        rec: &mut CloudPcRecord,
        step: Option<&ProvisioningStepRecord>,
        audit: Option<&AuditEvent>,
    ) -> Result<()> {
        self.save_rebasing(rec, step, audit, None).await
    }

    /// Writes a Cloud PC from its workflow: as [`App::save_record`], and only while this replica
    /// holds the workflow lease.
    pub(crate) async fn save_workflow(
        &self,
        rec: &mut CloudPcRecord,
        step: Option<&ProvisioningStepRecord>,
    ) -> Result<()> {
        let replica = self.replica.clone();
        self.save_rebasing(rec, step, None, Some(&replica)).await
    }

    async fn save_rebasing(
        &self,
        rec: &mut CloudPcRecord,
        step: Option<&ProvisioningStepRecord>,
        audit: Option<&AuditEvent>,
        lease: Option<&str>,
    ) -> Result<()> {
        for _ in 0..MAX_REBASES {
            match self.store.save_cloud_pc(rec, step, audit, lease).await {
                Err(StoreError::Stale { .. }) => {
                    let newer = self.store.get_cloud_pc_record(rec.pc.id).await?;
                    let (merged, conflicts) = rec.rebase(&newer);
                    if !conflicts.is_empty() {
                        tracing::info!(cloud_pc = %rec.pc.id, ?conflicts, "fields changed on both sides meanwhile; keeping this write's values");
                    }
                    *rec = merged;
                }
                other => return Ok(other?),
            }
        }
        Err(StoreError::Stale { kind: "cloudPC", id: rec.pc.id.to_string() }.into())
    }

    /// Claims the Cloud PC's workflow lease for this replica; false when another replica holds it.
    pub(crate) async fn claim(&self, id: Uuid) -> bool {
        match self.store.claim_workflow(id, &self.replica, WORKFLOW_LEASE).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(cloud_pc = %id, error = %e, "could not claim the workflow lease; the next scan tries again");
                false
            }
        }
    }

    /// Whether this replica may run the reconciler now. The lease is taken or renewed at most
    /// once per renewal period (passes can follow each other every few milliseconds under a
    /// stream of changes, and each try is a write); a renewal a moment ago is good for the rest of
    /// the lease's life.
    pub(crate) async fn lead(&self) -> bool {
        let recent = {
            let last = self.leading.lock().expect("leader state");
            last.filter(|(_, at)| at.elapsed() < LEASE_RENEWAL).map(|(leading, _)| leading)
        };
        if let Some(leading) = recent {
            return leading;
        }
        let leading = match self.store.try_lease(RECONCILER_LEASE, &self.replica, WORKFLOW_LEASE).await {
            Ok(leading) => leading,
            Err(e) => {
                tracing::warn!(error = %e, "could not take the reconciler lease");
                false
            }
        };
        *self.leading.lock().expect("leader state") = Some((leading, std::time::Instant::now()));
        leading
    }

    /// Says that something changed: wakes this replica's reconciler and tells the others.
    pub fn changed(&self) {
        self.changed.notify_one();
        self.publish("changed".into());
    }

    fn publish(&self, topic: String) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.publish_change(&topic).await {
                tracing::warn!(error = %e, "could not tell the other replicas about a change; their resync will");
            }
        });
    }

    /// Closes a Cloud PC's consoles on every replica.
    pub(crate) fn close_consoles_everywhere(&self, cloud_pc: Uuid) {
        self.close_local_consoles(cloud_pc);
        self.publish(format!("{CLOSE_CONSOLES}{cloud_pc}"));
    }

    /// Closes a user's consoles on every replica.
    pub(crate) fn close_user_consoles_everywhere(&self, user: Uuid) {
        self.publish(format!("{CLOSE_USER_CONSOLES}{user}"));
    }

    /// Starts the tasks that keep this replica in step with the others: its heartbeat and lease
    /// renewal, the scan for orphaned workflows, and the change listener.
    pub fn start_replica_tasks(&self) {
        let app = self.clone();
        tokio::spawn(async move {
            loop {
                app.heartbeat().await;
                app.renew_leases().await;
                tokio::time::sleep(LEASE_RENEWAL).await;
            }
        });
        let app = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SCAN_INTERVAL).await;
                app.scan_for_work().await;
            }
        });
        let app = self.clone();
        tokio::spawn(async move {
            loop {
                match app.store.next_change().await {
                    Ok(topic) => app.on_change(&topic).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "change notices stopped; relying on the resync until they are back");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    async fn on_change(&self, topic: &str) {
        if let Some(id) = topic.strip_prefix(CLOSE_CONSOLES).and_then(|s| Uuid::parse_str(s).ok()) {
            self.close_local_consoles(id);
        } else if let Some(id) = topic.strip_prefix(CLOSE_USER_CONSOLES).and_then(|s| Uuid::parse_str(s).ok()) {
            self.close_local_consoles_of_user(id).await;
        } else {
            self.changed.notify_one();
        }
    }

    /// This replica is alive: a lease named after it, renewed with the others.
    async fn heartbeat(&self) {
        let name = format!("{HEARTBEAT}{}", self.replica);
        if let Err(e) = self.store.try_lease(&name, &self.replica, WORKFLOW_LEASE).await {
            tracing::warn!(error = %e, "could not renew this replica's heartbeat");
        }
    }

    /// Waits (at most `limit`) until no other replica has a live heartbeat; true when none has.
    /// A replica that was killed stops beating, so after a crash this waits out its last lease.
    pub(crate) async fn wait_until_alone(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.store.live_leases(HEARTBEAT).await {
                Ok(live) if live.iter().all(|(_, owner)| owner == &self.replica) => return true,
                Ok(_) if tokio::time::Instant::now() >= deadline => return false,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(error = %e, "could not read the replicas' heartbeats");
                    return false;
                }
                _ => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    async fn renew_leases(&self) {
        let running: Vec<Uuid> = self.running.lock().expect("running set").iter().copied().collect();
        if running.is_empty() {
            return;
        }
        match self.store.renew_workflows(&running, &self.replica, WORKFLOW_LEASE).await {
            Ok(lost) if !lost.is_empty() => {
                tracing::warn!(?lost, "workflow leases lost (this replica was too slow); their next write stops them")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not renew workflow leases"),
        }
    }

    /// Takes over workflows nobody holds (their replica died, or they waited out a hold-off).
    async fn scan_for_work(&self) {
        let free = self.slots.available_permits();
        if free == 0 {
            return;
        }
        match self.store.claim_idle_workflows(&self.replica, WORKFLOW_LEASE, free).await {
            Ok(ids) => {
                for id in ids {
                    tracing::info!(cloud_pc = %id, replica = %self.replica, "took over a workflow nobody held");
                    self.drive_claimed(id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not look for orphaned workflows"),
        }
    }

    /// Workflows running on this replica now.
    pub fn running_workflows(&self) -> HashSet<Uuid> {
        self.running.lock().expect("running set").clone()
    }
}
