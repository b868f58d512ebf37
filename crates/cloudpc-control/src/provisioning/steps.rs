//! The provisioning steps, in the order Windows 365 runs them, and what each one does.
//!
//! Core: allocate capacity → create the VM → attach it to the region's network (and start it) →
//! join the directory → enroll in management → set the primary user. Post-provisioning (inside
//! the guest, through the agent): hostname → user account → local admin → time zone → grow the
//! disk → block inbound remote desktop. Assignment: the user gets the Cloud PC.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use rand::Rng;
use sha2::{Digest, Sha256};

use cloudpc_guest::{config as guest_config, GuestAgent};
use cloudpc_hypervisor::{Boot, HypervisorError, NetworkSpec, NicSpec, VmSpec};
use cloudpc_types::cloud_pc::{Device, ManagedDevice, ProvisioningStage, UserAccountType};
use cloudpc_types::provisioning::CloudPcRecord;

use super::Outcome;
use crate::App;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    AllocateCapacity,
    CreateVm,
    AttachNetwork,
    JoinDirectory,
    EnrollManagement,
    SetPrimaryUser,
    SetHostname,
    CreateUserAccount,
    AddLocalAdmin,
    SetTimeZone,
    GrowDisk,
    BlockRemoteDesktop,
    AssignUser,
}

impl Step {
    pub const ALL: [Step; 13] = [
        Step::AllocateCapacity,
        Step::CreateVm,
        Step::AttachNetwork,
        Step::JoinDirectory,
        Step::EnrollManagement,
        Step::SetPrimaryUser,
        Step::SetHostname,
        Step::CreateUserAccount,
        Step::AddLocalAdmin,
        Step::SetTimeZone,
        Step::GrowDisk,
        Step::BlockRemoteDesktop,
        Step::AssignUser,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::AllocateCapacity => "allocateCapacity",
            Step::CreateVm => "createVm",
            Step::AttachNetwork => "attachNetwork",
            Step::JoinDirectory => "joinDirectory",
            Step::EnrollManagement => "enrollManagement",
            Step::SetPrimaryUser => "setPrimaryUser",
            Step::SetHostname => "setHostname",
            Step::CreateUserAccount => "createUserAccount",
            Step::AddLocalAdmin => "addLocalAdmin",
            Step::SetTimeZone => "setTimeZone",
            Step::GrowDisk => "growDisk",
            Step::BlockRemoteDesktop => "blockRemoteDesktop",
            Step::AssignUser => "assignUser",
        }
    }

    pub fn stage(self) -> ProvisioningStage {
        match self {
            Step::AllocateCapacity
            | Step::CreateVm
            | Step::AttachNetwork
            | Step::JoinDirectory
            | Step::EnrollManagement
            | Step::SetPrimaryUser => ProvisioningStage::Core,
            Step::AssignUser => ProvisioningStage::Assignment,
            _ => ProvisioningStage::PostProvisioning,
        }
    }
}

/// Longest wait for a freshly started guest's agent (TCG boots are slow).
const BOOT_LIMIT: Duration = Duration::from_secs(180);

fn hv_failed(e: HypervisorError) -> Outcome {
    Outcome::Failed(e.to_string())
}

/// A Cloud PC disk that could not be made. A full file system is the host's problem, not the
/// image's: say so in a sentence instead of passing on qemu-img's error.
fn disk_failed(e: HypervisorError, disk: &std::path::Path) -> Outcome {
    let text = e.to_string();
    if text.contains("No space left on device") || text.contains("os error 28") {
        let dir = disk.parent().unwrap_or(disk);
        return Outcome::Failed(format!(
            "the disk of the host is full: there is no space left in {} for the Cloud PC's disk; free space there",
            dir.display()
        ));
    }
    Outcome::Failed(text)
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Outcome::Failed(e.to_string()),
        }
    };
}

/// The region's hosted NAT network: one per region, shared by every Cloud PC in it.
pub fn region_network(region: &str) -> NetworkSpec {
    let digest = Sha256::digest(region.as_bytes());
    NetworkSpec {
        name: format!("cloudpc-{region}"),
        bridge: format!("cpcbr{:02x}{:02x}{:02x}", digest[0], digest[1], digest[2]),
        subnet: format!("10.213.{}", 16 + (digest[3] as u32 % 224)),
    }
}

fn one_time_password() -> String {
    const CHARS: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..16).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect()
}

impl App {
    pub(super) async fn run_step(&self, step: Step, rec: &mut CloudPcRecord) -> Outcome {
        let Some(spec) = rec.state.spec.clone() else {
            return Outcome::Failed("the Cloud PC has no build specification; reprovision it".into());
        };
        let r = rec.state.resources.clone();
        let domain = r.domain.clone().unwrap_or_default();
        if step != Step::AllocateCapacity && r.host.is_none() {
            return Outcome::Failed("no host was allocated".into());
        }
        let hv = match r.host.as_deref().map(|h| self.host(h)) {
            Some(Ok(h)) => Some(h),
            Some(Err(e)) => return Outcome::Failed(e.to_string()),
            None => None,
        };
        match step {
            Step::AllocateCapacity => self.allocate(rec).await,
            Step::CreateVm => {
                let Some(hv) = hv else { return Outcome::Failed("no host".into()) };
                let disk = r.disk.clone().unwrap_or_default();
                if let Err(e) = hv.create_overlay(&spec.image_disk, &disk, spec.storage_gib).await {
                    return disk_failed(e, &disk);
                }
                let boot = match &spec.kernel {
                    Some(k) => {
                        Boot::Kernel { kernel: k.kernel.clone(), initrd: k.initrd.clone(), cmdline: k.cmdline.clone() }
                    }
                    None => Boot::Firmware,
                };
                let vm = VmSpec {
                    name: domain.clone(),
                    vcpus: spec.vcpus,
                    memory_mib: spec.memory_mib,
                    disk,
                    boot,
                    console_log: r.console_log.clone().unwrap_or_default(),
                };
                match hv.define_vm(&vm).await {
                    Ok(()) => Outcome::Done {
                        detail: Some(format!(
                            "{domain} on {}: {} vCPU, {} MiB, {} GiB",
                            hv.config().name,
                            spec.vcpus,
                            spec.memory_mib,
                            spec.storage_gib
                        )),
                    },
                    Err(e) => hv_failed(e),
                }
            }
            Step::AttachNetwork => {
                let Some(hv) = hv else { return Outcome::Failed("no host".into()) };
                let region = if spec.region == "automatic" { hv.config().region.clone() } else { spec.region.clone() };
                let net = region_network(&region);
                tri!(hv.ensure_network(&net).await);
                let mac = r.mac.clone().unwrap_or_default();
                // Isolated from the first packet: the guest boots onto the network right after.
                let filter = tri!(hv.ensure_isolation_filter().await);
                tri!(
                    hv.attach_nic(
                        &domain,
                        &NicSpec { network: net.name.clone(), mac: mac.clone(), filter: Some(filter) }
                    )
                    .await
                );
                rec.state.resources.network = Some(net.name.clone());
                tri!(hv.start(&domain).await);
                Outcome::Done { detail: Some(format!("NIC {mac} on {} ({}.0/24); VM started", net.name, net.subnet)) }
            }
            Step::JoinDirectory => {
                let Some(hv) = hv else { return Outcome::Failed("no host".into()) };
                let agent = GuestAgent::new(hv, &domain);
                let waited = tri!(agent.wait_ready(BOOT_LIMIT).await);
                rec.state.boot_ms = Some(waited.as_millis() as u64);
                let os = tri!(agent.os_info().await);
                let id = r.device_id.unwrap_or_default();
                let device = Device {
                    id,
                    device_id: id,
                    display_name: rec.pc.managed_device_name.clone().unwrap_or_default(),
                    operating_system: os["name"]
                        .as_str()
                        .or(os["kernel-release"].as_str())
                        .unwrap_or("Linux")
                        .to_string(),
                    operating_system_version: os["kernel-release"].as_str().map(str::to_string),
                    trust_type: "AzureAd".into(),
                    account_enabled: true,
                    registration_date_time: Utc::now(),
                    cloud_pc_id: rec.pc.id,
                };
                tri!(self.store.put_device(&device).await);
                Outcome::Done {
                    detail: Some(format!("guest agent answered after {} ms; device {id}", waited.as_millis())),
                }
            }
            Step::EnrollManagement => {
                let Some(hv) = hv else { return Outcome::Failed("no host".into()) };
                let agent = GuestAgent::new(hv, &domain);
                let os = tri!(agent.os_info().await);
                let fs = tri!(agent.fs_info().await);
                let root =
                    fs.as_array().and_then(|l| l.iter().find(|f| f["mountpoint"] == "/")).cloned().unwrap_or_default();
                let os_version = os["kernel-release"].as_str().map(str::to_string);
                let device = ManagedDevice {
                    id: r.managed_device_id.unwrap_or_default(),
                    device_name: rec.pc.managed_device_name.clone().unwrap_or_default(),
                    azure_ad_device_id: r.device_id.unwrap_or_default(),
                    operating_system: os["name"].as_str().unwrap_or("Linux").to_string(),
                    os_version: os_version.clone(),
                    management_agent: "cloudpc".into(),
                    enrolled_date_time: Utc::now(),
                    user_id: None,
                    user_principal_name: None,
                    total_storage_space_in_bytes: root["total-bytes"].as_u64(),
                    free_storage_space_in_bytes: match (root["total-bytes"].as_u64(), root["used-bytes"].as_u64()) {
                        (Some(t), Some(u)) => Some(t.saturating_sub(u)),
                        _ => None,
                    },
                    cloud_pc_id: rec.pc.id,
                };
                tri!(self.store.put_managed_device(&device).await);
                rec.pc.os_version = os_version;
                Outcome::Done { detail: Some(format!("managed device {}", device.id)) }
            }
            Step::SetPrimaryUser => {
                let user = tri!(self.store.get_user(rec.state.user_id).await);
                let id = r.managed_device_id.unwrap_or_default();
                let mut device = match self.store.get_managed_device(id).await {
                    Ok(d) => d,
                    Err(_) => return Outcome::Failed("the managed device record is missing".into()),
                };
                device.user_id = Some(user.id);
                device.user_principal_name = Some(user.user_principal_name.clone());
                tri!(self.store.put_managed_device(&device).await);
                Outcome::Done { detail: Some(format!("primary user {}", user.user_principal_name)) }
            }
            Step::SetHostname => {
                let Some(hv) = hv else { return Outcome::Failed("no host".into()) };
                let name = rec.pc.managed_device_name.clone().unwrap_or_default();
                tri!(guest_config::set_hostname(&GuestAgent::new(hv, &domain), &name).await);
                Outcome::Done { detail: Some(name) }
            }
            Step::CreateUserAccount => {
                let Some(hv) = hv else { return Outcome::Failed("no host".into()) };
                let user = tri!(self.store.get_user(rec.state.user_id).await);
                let username = guest_config::linux_username(&user.user_principal_name);
                let password = rec.state.initial_password.clone().unwrap_or_else(one_time_password);
                let hash = tri!(guest_config::hash_password(&password));
                tri!(
                    guest_config::create_user(&GuestAgent::new(hv, &domain), &username, &user.display_name, &hash)
                        .await
                );
                rec.state.initial_password = Some(password);
                rec.state.resources.username = Some(username.clone());
                Outcome::Done { detail: Some(format!("account {username} with a one-time password")) }
            }
            Step::AddLocalAdmin => {
                if !spec.local_admin {
                    rec.pc.user_account_type = UserAccountType::StandardUser;
                    return Outcome::Done {
                        detail: Some("skipped: the policy does not make users local administrators".into()),
                    };
                }
                let Some(hv) = hv else { return Outcome::Failed("no host".into()) };
                let Some(username) = r.username.clone() else {
                    return Outcome::Failed("the user account was not created".into());
                };
                tri!(guest_config::add_to_admin_group(&GuestAgent::new(hv, &domain), &username).await);
                rec.pc.user_account_type = UserAccountType::Administrator;
                Outcome::Done { detail: Some(format!("{username} is in wheel")) }
            }
            Step::SetTimeZone => {
                let Some(hv) = hv else { return Outcome::Failed("no host".into()) };
                let zone = spec.time_zone.clone().unwrap_or_else(|| "UTC".into());
                tri!(guest_config::set_time_zone(&GuestAgent::new(hv, &domain), &zone).await);
                Outcome::Done { detail: Some(zone) }
            }
            Step::GrowDisk => {
                let Some(hv) = hv else { return Outcome::Failed("no host".into()) };
                let size = tri!(guest_config::grow_root_filesystem(&GuestAgent::new(hv, &domain)).await);
                let want = spec.storage_gib << 30;
                // ext4 keeps journal and inode tables out of its size: 80% of the disk means grown.
                if size < want / 100 * 80 {
                    return Outcome::Failed(format!(
                        "the root filesystem is {size} bytes after growing; the license gives {want}"
                    ));
                }
                Outcome::Done { detail: Some(format!("root filesystem {size} bytes")) }
            }
            Step::BlockRemoteDesktop => {
                let Some(hv) = hv else { return Outcome::Failed("no host".into()) };
                let filter = tri!(hv.ensure_block_rdp_filter().await);
                let nic = NicSpec {
                    network: r.network.clone().unwrap_or_default(),
                    mac: r.mac.clone().unwrap_or_default(),
                    filter: Some(filter.clone()),
                };
                tri!(hv.set_nic_filter(&domain, &nic).await);
                Outcome::Done { detail: Some(format!("inbound TCP/UDP 3389 dropped by nwfilter {filter}")) }
            }
            Step::AssignUser => {
                let user = tri!(self.store.get_user(rec.state.user_id).await);
                rec.pc.user_principal_name = user.user_principal_name.clone();
                Outcome::Done { detail: Some(format!("assigned to {}", user.user_principal_name)) }
            }
        }
    }

    /// Picks the host in the region with the most free memory that fits the Cloud PC.
    async fn allocate(&self, rec: &mut CloudPcRecord) -> Outcome {
        if rec.state.resources.host.is_some() {
            return Outcome::Done { detail: rec.state.resources.host.clone() };
        }
        let Some(spec) = rec.state.spec.clone() else { return Outcome::Failed("no build specification".into()) };
        let candidates: Vec<_> =
            self.hosts.iter().filter(|h| spec.region == "automatic" || h.config().region == spec.region).collect();
        if candidates.is_empty() {
            return Outcome::Wait(format!("no host serves region '{}'", spec.region));
        }
        // Held in the database: replicas allocating at the same moment take turns.
        let _lock = tri!(self.store.lock_allocation().await);
        // TODO-perf: reads every Cloud PC to sum what each host has promised; a per-host sum in
        // SQL (columns for host and size) would do for tens of thousands.
        let records = tri!(self.store.list_cloud_pc_records().await);
        let mut used: HashMap<String, (u64, u64, u64)> = HashMap::new();
        for other in records.iter().filter(|o| o.pc.id != rec.pc.id) {
            if let (Some(h), Some(s)) = (&other.state.resources.host, &other.state.spec) {
                let e = used.entry(h.clone()).or_default();
                e.0 += u64::from(s.vcpus);
                e.1 += s.memory_mib;
                e.2 += s.storage_gib;
            }
        }
        let best = candidates
            .iter()
            .filter_map(|h| {
                let c = h.config().capacity;
                let u = used.get(&h.config().name).copied().unwrap_or_default();
                // Disks are thin overlays: a license's size is what the guest may grow into,
                // not what it takes at once, so the host promises its disk times the overcommit
                // ratio (as OpenStack's disk_allocation_ratio does).
                let disk = (c.disk_gib as f64 * self.config.disk_overcommit).floor() as u64;
                let fits = u.0 + u64::from(spec.vcpus) <= u64::from(c.vcpus)
                    && u.1 + spec.memory_mib <= c.memory_mib
                    && u.2 + spec.storage_gib <= disk;
                fits.then(|| (c.memory_mib - u.1, h.config().name.clone()))
            })
            .max();
        match best {
            Some((_, name)) => {
                rec.state.resources.host = Some(name.clone());
                // Persisted under the lock, so the next allocation counts this one.
                tri!(self.save_workflow(rec, None).await);
                Outcome::Done { detail: Some(format!("host {name}")) }
            }
            None => Outcome::Wait(format!(
                "waiting for capacity: no host in region '{}' has {} vCPU, {} MiB RAM and {} GiB of (thin, {}x \
                 overcommitted) disk free",
                spec.region, spec.vcpus, spec.memory_mib, spec.storage_gib, self.config.disk_overcommit
            )),
        }
    }
}
