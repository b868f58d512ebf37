//! Hypervisor hosts as members of the service: which hosts exist, how to reach each one, whether
//! it is alive, and joining new ones.
//!
//! Hosts live in the database (`hosts`), so every replica knows the same ones. A host is either
//! inside this process (the local libvirt of a one-machine install, configured at start) or
//! behind a host agent that joined with a token and is reached over mutual TLS
//! ([`cloudpc_agent::RemoteHost`]). The monitor runs on every replica to keep its table of
//! connections current; the replica holding the `host-monitor` lease also polls every agent
//! every [`REPORT_EVERY`] and records the reports. A host whose last report is older than
//! [`UNREACHABLE_AFTER`] reads as `unreachable`, and its Cloud PCs say so.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use cloudpc_agent::pki::{self, HostCa};
use cloudpc_agent::protocol::{HostReport, JoinRequest, JoinResponse};
use cloudpc_agent::RemoteHost;
use cloudpc_hypervisor::{Accelerator, Capacity, HostConfig, Hypervisor};
use cloudpc_store::{HostRow, HostUsage};
use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::cloud_pc::PowerState;
use cloudpc_types::hosts::{
    validate_name, validate_region, Host, HostResources, HostState, JoinToken, JoinTokenCreate,
};
use cloudpc_types::ValidationError;

use crate::audit::{Actor, Change};
use crate::{App, Error, Result};

/// How often agents report (the monitor polls them).
pub const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Three missed reports make a host unreachable.
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(15);
/// The monitor lease: one replica polls the agents.
const MONITOR_LEASE: &str = "host-monitor";
/// The database name of the host CA.
const CA_SECRET: &str = "host-ca";
/// Marks the status detail that the monitor set, so it can lift it again.
const UNREACHABLE_NOTE: &str = "Its host is unreachable";

/// Connections to hosts: those in this process, and one client per agent.
#[derive(Default)]
pub struct HostTable {
    local: Vec<Arc<dyn Hypervisor>>,
    remote: RwLock<HashMap<String, (Host, Arc<RemoteHost>)>>,
    /// This replica's TLS towards agents, and the CA that signs joining hosts.
    pki: RwLock<Option<(Arc<HostCa>, rustls::ClientConfig)>>,
}

impl HostTable {
    pub fn new(local: Vec<Arc<dyn Hypervisor>>) -> Self {
        Self { local, ..Default::default() }
    }

    pub fn local(&self) -> &[Arc<dyn Hypervisor>] {
        &self.local
    }

    fn find(&self, name: &str) -> Option<Arc<dyn Hypervisor>> {
        if let Some(h) = self.local.iter().find(|h| h.config().name == name) {
            return Some(h.clone());
        }
        self.remote.read().expect("host table").get(name).map(|(_, r)| r.clone() as Arc<dyn Hypervisor>)
    }

    fn remotes(&self) -> Vec<(Host, Arc<RemoteHost>)> {
        self.remote.read().expect("host table").values().cloned().collect()
    }
}

/// What a host reported last, as stored.
fn report_of(row: &HostRow) -> Option<HostReport> {
    row.report.as_ref().and_then(|r| serde_json::from_value(r.clone()).ok())
}

/// The state a read shows: the admin's, unless the host's agent stopped reporting. A host inside
/// the control plane's process is there as long as the process is, and reports only at start
/// (no heartbeat writes on a one-machine install).
pub fn effective_state(row: &HostRow, now: DateTime<Utc>) -> HostState {
    if row.host.agent_address.is_none() {
        return row.host.state;
    }
    let fresh =
        row.heartbeat.is_some_and(|h| now - h <= chrono::Duration::from_std(UNREACHABLE_AFTER).unwrap_or_default());
    if !fresh {
        HostState::Unreachable
    } else {
        row.host.state
    }
}

fn accelerator_of(text: &str) -> Accelerator {
    if text == "kvm" {
        Accelerator::Kvm
    } else {
        Accelerator::Tcg
    }
}

fn token_digest(secret: &str) -> String {
    format!("{:x}", Sha256::digest(secret.as_bytes()))
}

/// `https://host:port` with a port, nothing after it; returns the host part.
fn agent_host(address: &str) -> Result<String, ValidationError> {
    let bad = || ValidationError::new("address", format!("'{address}' must look like https://host:port"));
    let rest = address.strip_prefix("https://").ok_or_else(bad)?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (h, p) = v6.split_once("]:").ok_or_else(bad)?;
            (h, p)
        }
        None => rest.rsplit_once(':').ok_or_else(bad)?,
    };
    if host.is_empty() || port.parse::<u16>().is_err() || host.contains(['/', '@', '?', '#']) {
        return Err(bad());
    }
    Ok(host.to_string())
}

impl App {
    /// The hosts in this process (a one-machine install's local libvirt).
    pub fn local_hosts(&self) -> &[Arc<dyn Hypervisor>] {
        self.hosts.local()
    }

    /// Where custom images are test-booted: a host in this process, else any ready host.
    // TODO-correctness: a host behind an agent reads the image at the control plane's path, which
    // holds only where the hosts share that file system (images are not yet shipped to hosts).
    pub async fn test_boot_host(&self) -> Option<Arc<dyn Hypervisor>> {
        if let Some(h) = self.local_hosts().first() {
            return Some(h.clone());
        }
        let (ready, _) = self.placement_candidates("automatic").await.ok()?;
        let (name, _, _) = ready.first()?;
        self.host(name).await.ok()
    }

    /// The connection to a host by name: in this process, or its agent's client. A host another
    /// replica just added is looked up in the database.
    pub async fn host(&self, name: &str) -> Result<Arc<dyn Hypervisor>> {
        if let Some(h) = self.hosts.find(name) {
            return Ok(h);
        }
        self.refresh_hosts().await?;
        self.hosts.find(name).ok_or_else(|| Error::Conflict(format!("host '{name}' is not known any more")))
    }

    /// Sets up the host CA (once for all replicas) and this replica's client certificate, and
    /// registers the hosts in this process.
    pub async fn start_hosts(&self) -> Result<()> {
        let fresh = HostCa::generate().map_err(|e| Error::Conflict(e.to_string()))?;
        let stored = self
            .store
            .init_secret(CA_SECRET, &serde_json::json!({ "cert": fresh.cert_pem, "key": fresh.key_pem }).to_string())
            .await?;
        let v: serde_json::Value = serde_json::from_str(&stored).map_err(|_| {
            Error::Conflict("the stored host CA is not readable; restore the database's 'secrets' table".into())
        })?;
        let ca = HostCa {
            cert_pem: v["cert"].as_str().unwrap_or_default().to_string(),
            key_pem: v["key"].as_str().unwrap_or_default().to_string(),
        };
        let (cert, key) = ca.issue_control_plane(self.replica()).map_err(|e| Error::Conflict(e.to_string()))?;
        let tls = pki::client_config(&ca.cert_pem, &cert, &key).map_err(|e| Error::Conflict(e.to_string()))?;
        *self.hosts.pki.write().expect("host pki") = Some((Arc::new(ca), tls));
        let rows = self.store.list_hosts().await?;
        for hv in self.hosts.local() {
            let c = hv.config();
            match rows.iter().find(|r| r.host.display_name.eq_ignore_ascii_case(&c.name)) {
                Some(row) if row.host.agent_address.is_some() => {
                    return Err(Error::Conflict(format!(
                        "host '{}' is configured in this process but joined as an agent at {}; rename one",
                        c.name,
                        row.host.agent_address.as_deref().unwrap_or_default()
                    )))
                }
                Some(row) if row.host.region != c.region => {
                    let mut host = row.host.clone();
                    host.region = c.region.clone();
                    let audit = self.host_event("Update Host", AuditOperationType::Patch, &host);
                    self.store.update_host(&host, &audit).await?;
                }
                Some(_) => {}
                None => {
                    let host = Host::new(&c.name, &c.region, None);
                    let audit = self.host_event("Create Host", AuditOperationType::Create, &host);
                    match self.store.create_host(&host, Some(&audit)).await {
                        // Another replica registered it at the same moment.
                        Ok(_) | Err(cloudpc_store::StoreError::Conflict(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        self.report_local_hosts().await;
        self.refresh_hosts().await
    }

    fn host_event(&self, activity: &str, op: AuditOperationType, host: &Host) -> cloudpc_types::audit::AuditEvent {
        Change {
            component: "Hosts",
            activity: activity.into(),
            operation: op,
            resource_type: "host",
            resource_id: host.id.to_string(),
            resource_name: host.display_name.clone(),
        }
        .event(&Actor::system(), None, Some(host))
    }

    /// Brings this replica's agent clients in line with the database.
    pub async fn refresh_hosts(&self) -> Result<()> {
        let rows = self.store.list_hosts().await?;
        let Some(tls) = self.hosts.pki.read().expect("host pki").as_ref().map(|(_, t)| t.clone()) else {
            return Ok(());
        };
        let mut table = self.hosts.remote.write().expect("host table");
        let mut seen = HashSet::new();
        for row in rows {
            let Some(address) = row.host.agent_address.clone() else { continue };
            let name = row.host.display_name.clone();
            seen.insert(name.clone());
            let report = report_of(&row);
            let accelerator = report.as_ref().map_or(Accelerator::Tcg, |r| accelerator_of(&r.accelerator));
            let same = table.get(&name).is_some_and(|(h, r)| {
                h.agent_address == row.host.agent_address
                    && h.region == row.host.region
                    && r.accelerator() == accelerator
            });
            if same {
                continue;
            }
            let config = HostConfig {
                name: name.clone(),
                uri: address.clone(),
                region: row.host.region.clone(),
                capacity: report.as_ref().map_or(Capacity { vcpus: 0, memory_mib: 0, disk_gib: 0 }, |r| r.capacity),
                subnet_index: row.host.subnet_index,
            };
            match RemoteHost::new(config, accelerator, &address, tls.clone()) {
                Ok(remote) => {
                    table.insert(name, (row.host.clone(), Arc::new(remote)));
                }
                Err(e) => tracing::warn!(host = %name, error = %e, "cannot set up the client for a host agent"),
            }
        }
        table.retain(|name, _| seen.contains(name));
        Ok(())
    }

    /// Hosts in this process report once, at start (their capacity comes from the settings).
    async fn report_local_hosts(&self) {
        let Ok(rows) = self.store.list_hosts().await else { return };
        for hv in self.hosts.local() {
            let c = hv.config();
            let Some(row) = rows.iter().find(|r| r.host.display_name == c.name) else { continue };
            let report = HostReport {
                name: c.name.clone(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                accelerator: if hv.accelerator() == Accelerator::Kvm { "kvm" } else { "tcg" }.into(),
                capacity: c.capacity,
                vms: Vec::new(),
                fenced: false,
            };
            let value = serde_json::to_value(&report).unwrap_or_default();
            if let Err(e) = self.store.record_host_report(row.host.id, &value, Utc::now()).await {
                tracing::warn!(error = %e, "could not record the local host's report");
            }
        }
    }

    /// Every replica keeps its host table current; the one holding the monitor lease polls the
    /// agents, records their reports and marks the Cloud PCs of unreachable hosts.
    pub async fn run_host_monitor(self) {
        let mut unreachable: Option<HashSet<String>> = None;
        let mut polls: u64 = 0;
        loop {
            if let Err(e) = self.refresh_hosts().await {
                tracing::warn!(error = %e, "could not read the hosts");
            }
            // Hosts in this process need no monitor: without agents nothing is written here (a
            // one-machine install's database, possibly on a full disk, sees no extra writes).
            let leading = !self.hosts.remotes().is_empty()
                && matches!(self.store.try_lease(MONITOR_LEASE, self.replica(), UNREACHABLE_AFTER).await, Ok(true));
            if leading {
                self.poll_hosts().await;
                if let Err(e) = self.auto_evacuate().await {
                    tracing::warn!(error = %e, "could not evacuate a lost host");
                }
                // About once a minute: the image caches change slowly.
                polls += 1;
                if polls % 12 == 1 {
                    if let Err(e) = self.retain_host_images().await {
                        tracing::warn!(error = %e, "could not trim the hosts' image caches");
                    }
                }
                match self.mark_unreachable_cloud_pcs(unreachable.as_ref()).await {
                    Ok(now) => unreachable = Some(now),
                    Err(e) => tracing::warn!(error = %e, "could not update the Cloud PCs of unreachable hosts"),
                }
            } else {
                unreachable = None;
            }
            tokio::time::sleep(REPORT_EVERY).await;
        }
    }

    /// Drains, one move at a time, on the replica holding the drain lease.
    pub async fn run_drains(self) {
        let mut rounds: u64 = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            rounds += 1;
            // Work (and the lease's write) only while a host drains, and once a minute for a move
            // whose host was set back to ready before the move was done.
            let draining = match self.store.list_hosts().await {
                Ok(rows) => rows.iter().any(|r| r.host.state == HostState::Draining),
                Err(_) => false,
            };
            if !draining && !rounds.is_multiple_of(30) {
                continue;
            }
            if !matches!(self.store.try_lease("host-drain", self.replica(), UNREACHABLE_AFTER).await, Ok(true)) {
                continue;
            }
            if let Err(e) = self.drain_once().await {
                tracing::warn!(error = %e, "a drain step failed; trying again");
            }
        }
    }

    async fn poll_hosts(&self) {
        let mut reported: Vec<(String, Vec<String>)> = Vec::new();
        let mut polls = tokio::task::JoinSet::new();
        for (host, remote) in self.hosts.remotes() {
            polls.spawn(async move { (host, remote.status().await) });
        }
        while let Some(done) = polls.join_next().await {
            let Ok((host, result)) = done else { continue };
            match result {
                Ok(report) => {
                    let value = serde_json::to_value(&report).unwrap_or_default();
                    if let Err(e) = self.store.record_host_report(host.id, &value, Utc::now()).await {
                        tracing::warn!(host = %host.display_name, error = %e, "could not record a host report");
                    }
                    if !report.vms.is_empty() {
                        reported.push((host.display_name.clone(), report.vms.iter().map(|v| v.name.clone()).collect()));
                    }
                }
                Err(e) => tracing::debug!(host = %host.display_name, error = %e, "host agent did not report"),
            }
        }
        // The Cloud PCs are read once for all hosts: with thousands, a read per host is the cost.
        if !reported.is_empty() {
            match self.store.list_cloud_pc_records().await {
                Ok(records) => {
                    for (host, names) in &reported {
                        if let Err(e) = self.remove_orphans(host, names, &records).await {
                            tracing::warn!(%host, error = %e, "could not remove orphaned VMs");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not read the Cloud PCs to look for orphaned VMs"),
            }
        }
    }

    /// Cloud PCs on an unreachable host show it (`powerState: unknown`, a status detail); when the
    /// host is back the note goes. Work is done only when the set of unreachable hosts changed
    /// (or on the first pass of a new monitor).
    async fn mark_unreachable_cloud_pcs(&self, before: Option<&HashSet<String>>) -> Result<HashSet<String>> {
        let now = Utc::now();
        let rows = self.store.list_hosts().await?;
        let lost: HashMap<String, Option<DateTime<Utc>>> = rows
            .iter()
            .filter(|r| effective_state(r, now) == HostState::Unreachable)
            .map(|r| (r.host.display_name.clone(), r.heartbeat))
            .collect();
        let names: HashSet<String> = lost.keys().cloned().collect();
        if before == Some(&names) {
            return Ok(names);
        }
        for rec in self.store.list_cloud_pc_records().await? {
            let Some(host) = rec.state.resources.host.clone() else { continue };
            let noted = rec.pc.status_detail.as_deref().is_some_and(|d| d.starts_with(UNREACHABLE_NOTE));
            let id = rec.pc.id;
            let update = match lost.get(&host) {
                Some(since) if !noted => {
                    let since = since.map_or("it joined".to_string(), |s| s.to_rfc3339());
                    Some((
                        PowerState::Unknown,
                        Some(format!("{UNREACHABLE_NOTE} (host '{host}' has not reported since {since})")),
                    ))
                }
                None if noted => Some((PowerState::Unknown, None)),
                _ => None,
            };
            if let Some((power, detail)) = update {
                let mut rec = rec;
                rec.pc.power_state = power;
                rec.pc.status_detail = detail;
                if let Err(e) = self.save_record(&mut rec, None, None).await {
                    tracing::warn!(cloud_pc = %id, error = %e, "could not note the host's state on a Cloud PC");
                }
            }
        }
        Ok(names)
    }

    /// The sha256 of an image file, computed once per version of the file (size and time).
    pub(crate) async fn image_digest(&self, path: &std::path::Path) -> Result<String> {
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|e| Error::Conflict(format!("the image file {} cannot be read: {e}", path.display())))?;
        let stamp = (meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
        if let Some((len, t, d)) = self.image_digests.lock().expect("digests").get(path) {
            if (*len, *t) == stamp {
                return Ok(d.clone());
            }
        }
        let owned = path.to_path_buf();
        let digest = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            use std::io::Read;
            let mut f = std::fs::File::open(&owned)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            Ok(format!("{:x}", hasher.finalize()))
        })
        .await
        .map_err(|e| Error::Conflict(format!("hashing the image failed: {e}")))?
        .map_err(|e| Error::Conflict(format!("the image file {} cannot be read: {e}", path.display())))?;
        self.image_digests.lock().expect("digests").insert(path.to_path_buf(), (stamp.0, stamp.1, digest.clone()));
        Ok(digest)
    }

    /// Puts the generation's image files on the host (each copied once per host, by content) and
    /// says where the host keeps them.
    pub(crate) async fn image_on_host(
        &self,
        hv: &dyn Hypervisor,
        spec: &cloudpc_types::provisioning::BuildSpec,
    ) -> Result<cloudpc_types::provisioning::ImageOnHost> {
        use cloudpc_types::provisioning::{HostFile, ImageOnHost};
        let ship = |path: std::path::PathBuf| async move {
            let sha256 = self.image_digest(&path).await?;
            let on_host = hv.ensure_image(&sha256, &path).await.map_err(|e| Error::Conflict(e.to_string()))?;
            Ok::<_, Error>(HostFile { sha256, path: on_host })
        };
        let disk = ship(spec.image_disk.clone()).await?;
        let (kernel, initrd) = match &spec.kernel {
            Some(k) => (Some(ship(k.kernel.clone()).await?), Some(ship(k.initrd.clone()).await?)),
            None => (None, None),
        };
        Ok(ImageOnHost { disk, kernel, initrd })
    }

    /// Tells each agent which cached images its Cloud PCs still need; it removes the others.
    async fn retain_host_images(&self) -> Result<()> {
        let records = self.store.list_cloud_pc_records().await?;
        for (host, remote) in self.hosts.remotes() {
            let name = host.display_name.as_str();
            let keep: HashSet<String> = records
                .iter()
                .filter(|r| {
                    r.state.resources.host.as_deref() == Some(name) || r.state.moving_to.as_deref() == Some(name)
                })
                .filter_map(|r| r.state.resources.image_on_host.as_ref())
                .flat_map(|i| i.digests().map(str::to_string).collect::<Vec<_>>())
                .collect();
            let keep: Vec<String> = keep.into_iter().collect();
            match remote.retain_images(&keep).await {
                Ok(removed) if !removed.is_empty() => {
                    tracing::info!(host = %name, removed = removed.len(), "host removed cached images no Cloud PC needs")
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(host = %name, error = %e, "could not trim the host's image cache"),
            }
        }
        Ok(())
    }

    /// Every host with its live state, capacity, use and Cloud PC count.
    pub async fn list_hosts(&self) -> Result<Vec<Host>> {
        let rows = self.store.list_hosts().await?;
        let usage = self.store.host_usage().await?;
        let now = Utc::now();
        Ok(rows
            .iter()
            .map(|r| self.host_view(r, usage.get(&r.host.display_name).copied().unwrap_or_default(), now))
            .collect())
    }

    pub async fn get_host(&self, id: Uuid) -> Result<Host> {
        self.list_hosts()
            .await?
            .into_iter()
            .find(|h| h.id == id)
            .ok_or_else(|| Error::NotFound { kind: "host", id: id.to_string() })
    }

    /// What a host can give after the overcommit ratios.
    pub(crate) fn capacity_of(&self, row: &HostRow) -> HostResources {
        let c = report_of(row).map(|r| r.capacity).unwrap_or(Capacity { vcpus: 0, memory_mib: 0, disk_gib: 0 });
        let times = |v: u64, ratio: f64| (v as f64 * ratio).floor() as u64;
        HostResources {
            v_cpu_count: times(u64::from(c.vcpus), self.config.cpu_overcommit),
            memory_in_mb: times(c.memory_mib, self.config.memory_overcommit),
            disk_in_gb: times(c.disk_gib, self.config.disk_overcommit),
        }
    }

    fn host_view(&self, row: &HostRow, usage: HostUsage, now: DateTime<Utc>) -> Host {
        let report = report_of(row);
        let capacity = self.capacity_of(row);
        let used =
            HostResources { v_cpu_count: usage.vcpus, memory_in_mb: usage.memory_mib, disk_in_gb: usage.storage_gib };
        let state = effective_state(row, now);
        let status_detail = match (state, &report) {
            (HostState::Unreachable, _) => Some(match row.heartbeat {
                Some(h) => format!("the host has not reported since {}", h.to_rfc3339()),
                None => "the host has not reported yet".to_string(),
            }),
            (_, Some(r)) if r.fenced => {
                Some("the agent stopped its VMs: it heard from no control plane for longer than its lease".to_string())
            }
            _ => None,
        };
        Host {
            state,
            accelerator: report.as_ref().map(|r| r.accelerator.clone()),
            agent_version: report.as_ref().map(|r| r.agent_version.clone()),
            capacity,
            used,
            free: HostResources {
                v_cpu_count: capacity.v_cpu_count.saturating_sub(used.v_cpu_count),
                memory_in_mb: capacity.memory_in_mb.saturating_sub(used.memory_in_mb),
                disk_in_gb: capacity.disk_in_gb.saturating_sub(used.disk_in_gb),
            },
            cloud_pc_count: usage.cloud_pcs,
            saved_cloud_pc_count: usage.saved,
            last_heartbeat_date_time: row.heartbeat,
            status_detail,
            ..row.host.clone()
        }
    }

    /// Sets a host's state: `ready`, `maintenance` (no new Cloud PCs) or `draining`.
    pub async fn set_host_state(&self, actor: &Actor, id: Uuid, state: HostState) -> Result<Host> {
        if state == HostState::Unreachable {
            return Err(Error::Invalid(ValidationError::new(
                "state",
                "'unreachable' is what cloudpc shows when a host stops reporting; set ready, maintenance or draining",
            )));
        }
        let rows = self.store.list_hosts().await?;
        let row = rows
            .into_iter()
            .find(|r| r.host.id == id)
            .ok_or_else(|| Error::NotFound { kind: "host", id: id.to_string() })?;
        let before = row.host.clone();
        let mut host = row.host.clone();
        host.state = state;
        let audit = Change {
            component: "Hosts",
            activity: "Update Host".into(),
            operation: AuditOperationType::Patch,
            resource_type: "host",
            resource_id: id.to_string(),
            resource_name: host.display_name.clone(),
        }
        .event(actor, Some(&before), Some(&host));
        self.store.update_host(&host, &audit).await?;
        self.changed();
        self.get_host(id).await
    }

    /// Removes a host with no Cloud PCs left (its agent is no longer trusted by this cloudpc's
    /// replicas: they forget its address).
    pub async fn delete_host(&self, actor: &Actor, id: Uuid) -> Result<()> {
        let host = self.get_host(id).await?;
        if host.agent_address.is_none() {
            return Err(Error::Conflict(format!(
                "host '{}' is configured in the server's settings; remove it there",
                host.display_name
            )));
        }
        let audit = Change {
            component: "Hosts",
            activity: "Delete Host".into(),
            operation: AuditOperationType::Delete,
            resource_type: "host",
            resource_id: id.to_string(),
            resource_name: host.display_name.clone(),
        }
        .event(actor, Some(&host), None);
        self.store.delete_host(id, &audit).await?;
        self.refresh_hosts().await
    }

    /// A short-lived, single-use token that lets one new host join the region.
    pub async fn create_join_token(&self, actor: &Actor, input: JoinTokenCreate) -> Result<JoinToken> {
        validate_region(&input.region).map_err(Error::Invalid)?;
        let minutes = input.valid_for_minutes.unwrap_or(30.0);
        if !(1.0..=1440.0).contains(&minutes) {
            return Err(Error::Invalid(ValidationError::new(
                "validForMinutes",
                format!("{minutes} is out of range: a join token is valid for 1 to 1440 minutes"),
            )));
        }
        let secret: String = {
            let mut rng = rand::thread_rng();
            (0..32).map(|_| format!("{:02x}", rng.gen::<u8>())).collect()
        };
        let secret = format!("cpcjoin_{secret}");
        let expires = Utc::now() + chrono::Duration::milliseconds((minutes * 60_000.0) as i64);
        let audit = Change {
            component: "Hosts",
            activity: "Create JoinToken".into(),
            operation: AuditOperationType::Create,
            resource_type: "hostJoinToken",
            resource_id: token_digest(&secret)[..12].to_string(),
            resource_name: format!("join token for region {}", input.region),
        }
        .event_with(actor, vec![crate::audit::property("expirationDateTime", None, Some(expires.to_rfc3339()))]);
        self.store.put_join_token(&token_digest(&secret), &input.region, expires, &audit).await?;
        Ok(JoinToken { token: secret, region: input.region, expiration_date_time: expires })
    }

    /// A host agent joins with its token: it is registered in the token's region, and its
    /// certificate request is signed for the address it gave.
    pub async fn join_host(&self, req: JoinRequest, ip_address: Option<String>) -> Result<JoinResponse> {
        validate_name("name", &req.name).map_err(Error::Invalid)?;
        let address_host = agent_host(&req.address).map_err(Error::Invalid)?;
        let ca = self
            .hosts
            .pki
            .read()
            .expect("host pki")
            .as_ref()
            .map(|(ca, _)| ca.clone())
            .ok_or_else(|| Error::Conflict("hosts are not set up yet; try again in a moment".into()))?;
        let certificate = ca
            .sign_host(&req.certificate_request, &req.name, &address_host)
            .map_err(|e| Error::Invalid(ValidationError::new("certificateRequest", e.to_string())))?;
        let host = Host {
            accelerator: Some(req.accelerator.clone()),
            agent_version: Some(req.agent_version.clone()),
            ..Host::new(&req.name, "", Some(req.address.trim_end_matches('/').to_string()))
        };
        let actor = Actor {
            id: None,
            name: format!("host agent {}", req.name),
            role: cloudpc_types::auth::Role::CloudPcAdministrator,
            ip_address,
            system: true,
        };
        let audit = Change {
            component: "Hosts",
            activity: "Join Host".into(),
            operation: AuditOperationType::Create,
            resource_type: "host",
            resource_id: host.id.to_string(),
            resource_name: host.display_name.clone(),
        }
        .event(&actor, None, Some(&host));
        let stored = self.store.join_host(&token_digest(&req.token), &host, &audit).await?;
        // The join's report stands as the first heartbeat: capacity is known at once.
        let report = HostReport {
            name: req.name.clone(),
            agent_version: req.agent_version.clone(),
            accelerator: req.accelerator.clone(),
            capacity: req.capacity,
            vms: Vec::new(),
            fenced: false,
        };
        let value = serde_json::to_value(&report).unwrap_or_default();
        self.store.record_host_report(stored.id, &value, Utc::now()).await?;
        self.refresh_hosts().await?;
        self.changed();
        tracing::info!(host = %stored.display_name, region = %stored.region, address = %req.address, "host joined");
        Ok(JoinResponse {
            host_id: stored.id,
            region: stored.region,
            subnet_index: stored.subnet_index,
            certificate,
            ca_certificate: ca.cert_pem.clone(),
        })
    }

    /// A host's capacity (after overcommit) and what its Cloud PCs take of it now.
    pub(crate) async fn host_room(&self, host: &str) -> Result<(HostResources, HostUsage)> {
        let rows = self.store.list_hosts().await?;
        let row = rows
            .iter()
            .find(|r| r.host.display_name == host)
            .ok_or_else(|| Error::NotFound { kind: "host", id: host.to_string() })?;
        let used = self.store.host_usage().await?.get(host).copied().unwrap_or_default();
        Ok((self.capacity_of(row), used))
    }

    /// Where a Cloud PC may be placed now: ready hosts of the region with their capacity (after
    /// overcommit) and use. Also says why none qualifies.
    pub(crate) async fn placement_candidates(
        &self,
        region: &str,
    ) -> Result<(Vec<(String, HostResources, HostUsage)>, Option<String>)> {
        let rows = self.store.list_hosts().await?;
        let usage = self.store.host_usage().await?;
        let now = Utc::now();
        let in_region: Vec<&HostRow> =
            rows.iter().filter(|r| region == "automatic" || r.host.region.eq_ignore_ascii_case(region)).collect();
        if in_region.is_empty() {
            return Ok((Vec::new(), Some(format!("no host serves region '{region}'"))));
        }
        let ready: Vec<_> = in_region
            .iter()
            .filter(|r| effective_state(r, now) == HostState::Ready && !report_of(r).is_some_and(|rep| rep.fenced))
            .map(|r| {
                let name = r.host.display_name.clone();
                let used = usage.get(&name).copied().unwrap_or_default();
                (name, self.capacity_of(r), used)
            })
            .collect();
        if ready.is_empty() {
            let states: Vec<String> = in_region
                .iter()
                .map(|r| format!("{} is {:?}", r.host.display_name, effective_state(r, now)).to_lowercase())
                .collect();
            return Ok((Vec::new(), Some(format!("no host in region '{region}' is ready ({})", states.join(", ")))));
        }
        Ok((ready, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_agent_addresses_must_be_https_with_a_port() {
        assert_eq!(agent_host("https://10.0.0.5:7443").unwrap(), "10.0.0.5");
        assert_eq!(agent_host("https://hv1.example.org:7443/").unwrap(), "hv1.example.org");
        assert_eq!(agent_host("https://[::1]:7443").unwrap(), "::1");
        for bad in ["http://10.0.0.5:7443", "https://10.0.0.5", "https://:7443", "https://a@b:1", "https://h:99999"] {
            assert!(agent_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_a_host_without_a_recent_report_is_unreachable() {
        let now = Utc::now();
        let host = Host { state: HostState::Maintenance, ..Host::new("hv1", "eu", Some("https://hv1:7366".into())) };
        let mut row = HostRow { host, report: None, heartbeat: None };
        assert_eq!(effective_state(&row, now), HostState::Unreachable);
        row.heartbeat = Some(now - chrono::Duration::seconds(14));
        assert_eq!(effective_state(&row, now), HostState::Maintenance);
        row.heartbeat = Some(now - chrono::Duration::seconds(16));
        assert_eq!(effective_state(&row, now), HostState::Unreachable);
    }
}
