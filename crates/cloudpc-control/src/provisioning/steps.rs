//! The provisioning steps, in the order Windows 365 runs them: each one a unit with its action
//! and its undo.
//!
//! Core: allocate capacity → create the VM → attach it to the region's network (and start it) →
//! join the directory → enroll in management → set the primary user. Post-provisioning (inside
//! the guest, through the agent): hostname → user account → local admin → time zone → grow the
//! disk → block inbound remote desktop. Assignment: the user gets the Cloud PC.
//!
//! A new step is one struct implementing [`ProvisioningStep`] and one entry in [`STEPS`]. Progress
//! is stored by step name, so an upgrade that inserts or reorders steps resumes a Cloud PC at the
//! step it was at. Every `run` is idempotent (the ids it uses were chosen and saved before), and
//! every `undo` treats "already gone" as done; the workflow undoes a generation by running every
//! step's `undo` in reverse order, whatever got done.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use rand::Rng;
use sha2::{Digest, Sha256};

use cloudpc_guest::{config as guest_config, GuestAgent};
use cloudpc_hypervisor::{Boot, Hypervisor, HypervisorError, NetworkSpec, NicSpec, VmSpec};
use cloudpc_types::cloud_pc::{Device, ManagedDevice, ProvisioningStage, UserAccountType};
use cloudpc_types::provisioning::{BuildSpec, CloudPcRecord, Resources};

use super::Outcome;
use crate::{App, Error, Result};

/// What a step runs with: the generation's spec, its resources as saved, and its host.
pub struct StepContext<'a> {
    pub app: &'a App,
    pub spec: BuildSpec,
    pub r: Resources,
    pub domain: String,
    /// `None` until a host is allocated.
    pub hv: Option<&'a dyn Hypervisor>,
}

impl StepContext<'_> {
    fn hv(&self) -> std::result::Result<&dyn Hypervisor, Outcome> {
        self.hv.ok_or_else(|| Outcome::Failed("no host was allocated".into()))
    }

    fn guest(&self) -> std::result::Result<GuestAgent<'_>, Outcome> {
        Ok(GuestAgent::new(self.hv()?, &self.domain))
    }
}

/// One provisioning step.
#[async_trait]
pub trait ProvisioningStep: Sync {
    /// The name stored as progress and shown in `provisioningSteps`; never reused for another step.
    fn name(&self) -> &'static str;
    fn stage(&self) -> ProvisioningStage;
    /// Whether the step has anything to do for this Cloud PC on this host; one that has not is
    /// passed over without a record (and without a write).
    fn applies(&self, _hv: Option<&dyn Hypervisor>, _rec: &CloudPcRecord) -> bool {
        true
    }
    /// Does the step; running it again after it succeeded (or half ran) changes nothing more.
    async fn run(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Outcome;
    /// Undoes what `run` made, if anything; "already gone" counts as done.
    async fn undo(&self, _cx: &StepContext<'_>, _rec: &mut CloudPcRecord) -> Result<()> {
        Ok(())
    }
}

/// The steps in order.
pub static STEPS: [&dyn ProvisioningStep; 15] = [
    &AllocateCapacity,
    &TransferImage,
    &CreateVm,
    &AttachNetwork,
    &RefreshIdentity,
    &JoinDirectory,
    &EnrollManagement,
    &SetPrimaryUser,
    &SetHostname,
    &CreateUserAccount,
    &AddLocalAdmin,
    &SetTimeZone,
    &GrowDisk,
    &BlockRemoteDesktop,
    &AssignUser,
];

/// Progress once every step is done.
pub const DONE: &str = "done";

/// A step by name, with its position.
pub fn step_named(name: &str) -> Option<(usize, &'static dyn ProvisioningStep)> {
    STEPS.iter().enumerate().find(|(_, s)| s.name() == name).map(|(i, s)| (i, *s))
}

/// The name stored as progress after `name` succeeded (or failed in post-provisioning).
pub fn after(name: &str) -> String {
    match step_named(name) {
        Some((i, _)) => STEPS.get(i + 1).map_or(DONE.to_string(), |s| s.name().to_string()),
        None => DONE.to_string(),
    }
}

pub(crate) fn hv_err(e: HypervisorError) -> Error {
    Error::Conflict(e.to_string())
}

/// Longest wait for a freshly started guest's agent (TCG boots are slow).
pub(crate) const BOOT_LIMIT: Duration = Duration::from_secs(180);

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

/// The Cloud PC's NIC on `hv`, and what `resources.network` records for it: on its network
/// connection's bridge on that host, or on the region's hosted network (made sure of here).
/// `blocked`: inbound remote desktop dropped (the blockRemoteDesktop step's filter).
pub(crate) async fn cloud_pc_nic(
    app: &App,
    spec: &BuildSpec,
    hv: &dyn Hypervisor,
    mac: String,
    blocked: bool,
) -> Result<(NicSpec, String)> {
    if let Some(id) = spec.connection_id {
        let c = app.get_network_connection(&id.to_string()).await?;
        let host = &hv.config().name;
        let (bridge, vlan) = match c.host_bridges.iter().find(|b| b.host_name.eq_ignore_ascii_case(host)) {
            Some(b) => (b.bridge_name.clone(), b.vlan_id),
            None => (c.bridge_name.clone(), c.vlan_id),
        };
        let filter = if blocked {
            hv.ensure_block_rdp_filter().await.map_err(hv_err)?;
            cloudpc_hypervisor::xml::BLOCK_RDP_ORG_FILTER
        } else {
            hv.ensure_isolation_filter().await.map_err(hv_err)?;
            cloudpc_hypervisor::xml::ORG_FILTER
        };
        let filter = Some(filter.to_string());
        let nic = NicSpec { network: String::new(), mac, filter, bridge: Some(bridge.clone()), vlan };
        let on = match vlan {
            Some(v) => format!("bridge:{bridge} VLAN {v}"),
            None => format!("bridge:{bridge}"),
        };
        return Ok((nic, on));
    }
    let net = host_network(hv.config(), &spec.region);
    hv.ensure_network(&net).await.map_err(hv_err)?;
    let filter = if blocked { hv.ensure_block_rdp_filter().await } else { hv.ensure_isolation_filter().await }
        .map_err(hv_err)?;
    Ok((NicSpec { network: net.name.clone(), mac, filter: Some(filter), bridge: None, vlan: None }, net.name))
}

/// The hosted NAT network of a Cloud PC on `host`: a host behind an agent has a subnet of its
/// own (so hosts never overlap); hosts in the control plane's process share one per region.
pub fn host_network(host: &cloudpc_hypervisor::HostConfig, region: &str) -> NetworkSpec {
    if host.subnet_index > 0 {
        let i = host.subnet_index;
        return NetworkSpec {
            name: format!("cloudpc-host{i}"),
            bridge: format!("cpchost{i:04x}"),
            subnet: cloudpc_agent::protocol::host_subnet(i),
        };
    }
    region_network(if region == "automatic" { &host.region } else { region })
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

/// How the VM boots: from its kernel (as its host has it) or through firmware.
pub fn boot_of(spec: &BuildSpec, on_host: Option<&cloudpc_types::provisioning::ImageOnHost>) -> Boot {
    match &spec.kernel {
        Some(k) => Boot::Kernel {
            kernel: on_host.and_then(|i| i.kernel.as_ref()).map_or(k.kernel.clone(), |f| f.path.clone()),
            initrd: on_host.and_then(|i| i.initrd.as_ref()).map_or(k.initrd.clone(), |f| f.path.clone()),
            cmdline: k.cmdline.clone(),
        },
        None => Boot::Firmware,
    }
}

/// `tri!` for a step context: the outcome the context refused with.
macro_rules! need {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(outcome) => return outcome,
        }
    };
}

struct AllocateCapacity;

#[async_trait]
impl ProvisioningStep for AllocateCapacity {
    fn name(&self) -> &'static str {
        "allocateCapacity"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::Core
    }
    async fn run(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Outcome {
        cx.app.allocate(rec).await
    }
    // The host is given up by the workflow after every other step's undo, which need it.
}

struct TransferImage;

#[async_trait]
impl ProvisioningStep for TransferImage {
    fn name(&self) -> &'static str {
        "transferImage"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::Core
    }
    /// Hosts in the control plane's process read images where cloudpc keeps them.
    fn applies(&self, hv: Option<&dyn Hypervisor>, _rec: &CloudPcRecord) -> bool {
        hv.is_none_or(|h| h.ships_images())
    }
    async fn run(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Outcome {
        let hv = need!(cx.hv());
        if !hv.ships_images() {
            return Outcome::Done { detail: Some("the host reads the image where cloudpc keeps it".into()) };
        }
        let started = std::time::Instant::now();
        match cx.app.image_on_host(hv, &cx.spec).await {
            Ok(on_host) => {
                let short = on_host.disk.sha256[..12].to_string();
                rec.state.resources.image_on_host = Some(on_host);
                Outcome::Done {
                    detail: Some(format!(
                        "image sha256:{short}… on {} after {} ms",
                        hv.config().name,
                        started.elapsed().as_millis()
                    )),
                }
            }
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
    // Cached images belong to the host, not to one Cloud PC: the monitor removes those no Cloud
    // PC there needs.
}

struct CreateVm;

#[async_trait]
impl ProvisioningStep for CreateVm {
    fn name(&self) -> &'static str {
        "createVm"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::Core
    }
    async fn run(&self, cx: &StepContext<'_>, _rec: &mut CloudPcRecord) -> Outcome {
        let hv = need!(cx.hv());
        let spec = &cx.spec;
        let disk = cx.r.disk.clone().unwrap_or_default();
        let on_host = cx.r.image_on_host.as_ref();
        let base = on_host.map_or(spec.image_disk.clone(), |i| i.disk.path.clone());
        if let Err(e) = hv.create_overlay(&base, &disk, spec.storage_gib).await {
            return disk_failed(e, &disk);
        }
        let boot = boot_of(spec, on_host);
        let vm = VmSpec {
            name: cx.domain.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk,
            boot,
            console_log: cx.r.console_log.clone().unwrap_or_default(),
        };
        match hv.define_vm(&vm).await {
            Ok(()) => Outcome::Done {
                detail: Some(format!(
                    "{} on {}: {} vCPU, {} MiB, {} GiB",
                    cx.domain,
                    hv.config().name,
                    spec.vcpus,
                    spec.memory_mib,
                    spec.storage_gib
                )),
            },
            Err(e) => hv_failed(e),
        }
    }
    async fn undo(&self, cx: &StepContext<'_>, _rec: &mut CloudPcRecord) -> Result<()> {
        let Some(hv) = cx.hv else { return Ok(()) };
        if !cx.domain.is_empty() {
            hv.remove_vm(&cx.domain).await.map_err(hv_err)?;
        }
        for file in [cx.r.disk.as_deref(), cx.r.console_log.as_deref()].into_iter().flatten() {
            hv.remove_file(file).await.map_err(hv_err)?;
            hv.remove_file(&file.with_extension("qcow2.partial")).await.map_err(hv_err)?;
        }
        Ok(())
    }
}

struct AttachNetwork;

#[async_trait]
impl ProvisioningStep for AttachNetwork {
    fn name(&self) -> &'static str {
        "attachNetwork"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::Core
    }
    async fn run(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Outcome {
        let hv = need!(cx.hv());
        let mac = cx.r.mac.clone().unwrap_or_default();
        // On a hosted network, isolated from the first packet: the guest boots onto it right after.
        let (nic, network) = tri!(cloud_pc_nic(cx.app, &cx.spec, hv, mac.clone(), false).await);
        tri!(hv.attach_nic(&cx.domain, &nic).await);
        rec.state.resources.network = Some(network.clone());
        tri!(hv.start(&cx.domain).await);
        let on = match network.strip_prefix("bridge:") {
            Some(bridge) => format!("the organisation's network (host bridge {bridge})"),
            None => {
                let net = host_network(hv.config(), &cx.spec.region);
                format!("{} ({}.0/24)", net.name, net.subnet)
            }
        };
        Outcome::Done { detail: Some(format!("NIC {mac} on {on}; VM started")) }
    }
    async fn undo(&self, cx: &StepContext<'_>, _rec: &mut CloudPcRecord) -> Result<()> {
        if let (Some(hv), Some(mac)) = (cx.hv, cx.r.mac.as_deref()) {
            if !cx.domain.is_empty() {
                hv.detach_nic(&cx.domain, mac).await.map_err(hv_err)?;
            }
        }
        Ok(())
    }
}

/// The first step that makes a Cloud PC its user's: a warm-pool machine is booted through the
/// steps before it and waits there for a claim.
pub const FIRST_USER_STEP: &str = "refreshIdentity";

/// A warm-pool machine was booted before anyone owned it: before it becomes a user's, it gets an
/// identity of its own (machine id, SSH host keys, random state). Its NIC needs no change: each
/// pool machine is booted cold with a MAC (and so a hosted-network address) of its own, never
/// cloned from another.
struct RefreshIdentity;

#[async_trait]
impl ProvisioningStep for RefreshIdentity {
    fn name(&self) -> &'static str {
        FIRST_USER_STEP
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::Core
    }
    fn applies(&self, _hv: Option<&dyn Hypervisor>, rec: &CloudPcRecord) -> bool {
        rec.state.claimed_from_pool
    }
    async fn run(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Outcome {
        if !rec.state.claimed_from_pool {
            return Outcome::Done { detail: Some("a VM made for this user: nothing to refresh".into()) };
        }
        let agent = need!(cx.guest());
        tri!(agent.wait_ready(BOOT_LIMIT).await);
        let mut entropy = [0u8; 64];
        rand::thread_rng().fill(&mut entropy[..]);
        let hex: String = entropy.iter().map(|b| format!("{b:02x}")).collect();
        let id = tri!(guest_config::refresh_identity(&agent, &hex).await);
        Outcome::Done {
            detail: Some(format!(
                "claimed from the warm pool; new machine-id {id}, SSH host keys regenerated where sshd is installed, \
                 random state reseeded; NIC {}",
                cx.r.mac.clone().unwrap_or_default()
            )),
        }
    }
    // Inside the guest: gone with the VM.
}

struct JoinDirectory;

#[async_trait]
impl ProvisioningStep for JoinDirectory {
    fn name(&self) -> &'static str {
        "joinDirectory"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::Core
    }
    async fn run(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Outcome {
        let agent = need!(cx.guest());
        let waited = tri!(agent.wait_ready(BOOT_LIMIT).await);
        rec.state.boot_ms = Some(waited.as_millis() as u64);
        let os = tri!(agent.os_info().await);
        let id = cx.r.device_id.unwrap_or_default();
        // On a connection that joins a domain: a real Active Directory join from inside the guest.
        let mut joined = None;
        if let Some(conn) = cx.spec.connection_id {
            let c = tri!(cx.app.get_network_connection(&conn.to_string()).await);
            if c.connection_type == cloudpc_types::policy::DomainJoinType::HybridAzureAdJoin {
                let name = computer_name(rec);
                match join_domain(cx, &agent, &c, &name).await {
                    Ok(detail) => joined = Some(detail),
                    Err(reason) => return Outcome::Failed(reason),
                }
                // A joined machine is of use only once domain accounts can sign in to it.
                let user = tri!(cx.app.store.get_user(rec.state.user_id).await);
                let domain = c.ad_domain_name.clone().unwrap_or_default();
                let fqdn = format!("{}.{domain}", name.to_ascii_lowercase());
                let allowed = guest_config::linux_username(&user.user_principal_name);
                tri!(guest_config::configure_domain_sign_in(&agent, &domain, &fqdn, &allowed).await);
            }
        }
        let device = Device {
            id,
            device_id: id,
            display_name: rec.pc.managed_device_name.clone().unwrap_or_default(),
            operating_system: os["name"].as_str().or(os["kernel-release"].as_str()).unwrap_or("Linux").to_string(),
            operating_system_version: os["kernel-release"].as_str().map(str::to_string),
            // Graph's trust types: joined to Entra ID only, or to the on-premises domain too.
            trust_type: if joined.is_some() { "ServerAd" } else { "AzureAd" }.into(),
            account_enabled: true,
            registration_date_time: Utc::now(),
            cloud_pc_id: rec.pc.id,
        };
        tri!(cx.app.store.put_device(&device).await);
        let joined = joined.map(|j| format!("; {j}")).unwrap_or_default();
        Outcome::Done {
            detail: Some(format!("guest agent answered after {} ms; device {id}{joined}", waited.as_millis())),
        }
    }
    async fn undo(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Result<()> {
        if let Some(id) = cx.r.device_id {
            cx.app.store.delete_device(id).await?;
        }
        // The computer object stays in the domain, disabled (as Windows 365 leaves it). Best
        // effort: a domain controller out of reach must not keep the clean-up from finishing.
        if let (Some(conn), Some(hv)) = (cx.spec.connection_id, cx.hv) {
            let c = cx.app.get_network_connection(&conn.to_string()).await?;
            if c.connection_type == cloudpc_types::policy::DomainJoinType::HybridAzureAdJoin {
                let spec = cx.app.connection_check_spec(&c, &hv.config().name).await?;
                let name = computer_name(rec);
                match hv.disable_computer(&spec, &name).await {
                    Ok(done) => tracing::info!(cloud_pc = %rec.pc.id, "{done}"),
                    Err(e) => {
                        tracing::warn!(cloud_pc = %rec.pc.id, computer = %name, error = %e, "the computer object could not be disabled; disable it in the domain by hand")
                    }
                }
            }
        }
        Ok(())
    }
}

/// The Active Directory domain the Cloud PC joins, if its network connection joins one.
async fn joined_domain(cx: &StepContext<'_>) -> Result<Option<String>> {
    let Some(conn) = cx.spec.connection_id else { return Ok(None) };
    let c = cx.app.get_network_connection(&conn.to_string()).await?;
    Ok((c.connection_type == cloudpc_types::policy::DomainJoinType::HybridAzureAdJoin)
        .then(|| c.ad_domain_name.unwrap_or_default()))
}

/// The Cloud PC's computer name in the domain: its device name, upper case, at most the 15
/// characters a NetBIOS name has.
fn computer_name(rec: &CloudPcRecord) -> String {
    let name = rec.pc.managed_device_name.clone().unwrap_or_default().to_ascii_uppercase();
    name.chars().take(15).collect::<String>().trim_end_matches('-').to_string()
}

/// Joins the guest to the connection's domain with `adcli` (the domain's DNS from the
/// organisation's DHCP finds the domain controller, as for any machine on that network), then
/// waits until the domain controller lists the computer object. The password reaches adcli on
/// stdin only.
async fn join_domain(
    cx: &StepContext<'_>,
    agent: &GuestAgent<'_>,
    c: &cloudpc_types::network::OnPremisesConnection,
    name: &str,
) -> std::result::Result<String, String> {
    let has = agent
        .exec("/bin/sh", &["-c", "command -v adcli"], None, Duration::from_secs(20))
        .await
        .map_err(|e| e.to_string())?;
    if has.code != 0 {
        return Err(
            "the Cloud PC's image has no adcli, which joining the Active Directory domain needs: use an image with \
             adcli and sssd (the desktop gallery image has them)"
                .into(),
        );
    }
    let password = match cx.app.store.network_connection_password(c.id).await.map_err(|e| e.to_string())? {
        Some(sealed) => {
            crate::networks::unseal(&cx.app.config.secrets_key_file, c.id, &sealed).map_err(|e| e.to_string())?
        }
        None => return Err(format!("the network connection '{}' has no domain password", c.display_name)),
    };
    let domain = c.ad_domain_name.clone().unwrap_or_default();
    let user = c.ad_domain_username.clone().unwrap_or_default();
    let account = cloudpc_hypervisor::netcheck::account_name(&user).to_string();
    let ou = c.organizational_unit.clone().unwrap_or_default();
    let fqdn = format!("{}.{domain}", name.to_ascii_lowercase());
    // The guest agent answers before DHCP has set up the organisation's network (nothing at boot
    // waits for it): wait until the guest can discover the domain's controllers.
    let info = ["-c", "exec adcli info \"$1\"", "adcli", &domain];
    let started = std::time::Instant::now();
    loop {
        let out = agent.exec("/bin/sh", &info, None, Duration::from_secs(30)).await.map_err(|e| e.to_string())?;
        if out.code == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(90) {
            return Err(format!(
                "the Cloud PC found no domain controller of {domain} in 90 s on the organisation's network: {}",
                out.stderr.trim()
            ));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let join = [
        "-c",
        "exec adcli \"$@\"",
        "adcli",
        "join",
        "--domain",
        &domain,
        "--domain-ou",
        &ou,
        "--login-user",
        &account,
        "--stdin-password",
        "--computer-name",
        name,
        "--host-fqdn",
        &fqdn,
        "--show-details",
    ];
    // An existing object of that name (an earlier Cloud PC's, left disabled by its clean-up) is
    // taken over: adcli resets its password and enables it again.
    let out = agent
        .exec("/bin/sh", &join, Some(password.as_bytes()), Duration::from_secs(120))
        .await
        .map_err(|e| e.to_string())?;
    if out.code != 0 {
        return Err(format!("joining {domain} failed: {}", out.stderr.trim()));
    }
    let dn = out.stdout.lines().find_map(|l| l.strip_prefix("computer-dn = ")).unwrap_or(name).trim().to_string();
    let show = [
        "-c",
        "exec adcli \"$@\"",
        "adcli",
        "show-computer",
        "--domain",
        &domain,
        "--login-user",
        &account,
        "--stdin-password",
        name,
    ];
    let started = std::time::Instant::now();
    loop {
        let out = agent
            .exec("/bin/sh", &show, Some(password.as_bytes()), Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?;
        if out.code == 0 && out.stdout.contains("sAMAccountName") {
            return Ok(format!("joined {domain}: computer object {dn}"));
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "{domain}'s domain controller does not list {name} a minute after the join: {}",
                out.stderr.trim()
            ));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

struct EnrollManagement;

#[async_trait]
impl ProvisioningStep for EnrollManagement {
    fn name(&self) -> &'static str {
        "enrollManagement"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::Core
    }
    async fn run(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Outcome {
        let agent = need!(cx.guest());
        let os = tri!(agent.os_info().await);
        let fs = tri!(agent.fs_info().await);
        let root = fs.as_array().and_then(|l| l.iter().find(|f| f["mountpoint"] == "/")).cloned().unwrap_or_default();
        let os_version = os["kernel-release"].as_str().map(str::to_string);
        let device = ManagedDevice {
            id: cx.r.managed_device_id.unwrap_or_default(),
            device_name: rec.pc.managed_device_name.clone().unwrap_or_default(),
            azure_ad_device_id: cx.r.device_id.unwrap_or_default(),
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
        tri!(cx.app.store.put_managed_device(&device).await);
        rec.pc.os_version = os_version;
        Outcome::Done { detail: Some(format!("managed device {}", device.id)) }
    }
    async fn undo(&self, cx: &StepContext<'_>, _rec: &mut CloudPcRecord) -> Result<()> {
        if let Some(id) = cx.r.managed_device_id {
            cx.app.store.delete_managed_device(id).await?;
        }
        Ok(())
    }
}

struct SetPrimaryUser;

#[async_trait]
impl ProvisioningStep for SetPrimaryUser {
    fn name(&self) -> &'static str {
        "setPrimaryUser"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::Core
    }
    async fn run(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Outcome {
        let user = tri!(cx.app.store.get_user(rec.state.user_id).await);
        let id = cx.r.managed_device_id.unwrap_or_default();
        let mut device = match cx.app.store.get_managed_device(id).await {
            Ok(d) => d,
            Err(_) => return Outcome::Failed("the managed device record is missing".into()),
        };
        device.user_id = Some(user.id);
        device.user_principal_name = Some(user.user_principal_name.clone());
        tri!(cx.app.store.put_managed_device(&device).await);
        Outcome::Done { detail: Some(format!("primary user {}", user.user_principal_name)) }
    }
    // The primary user is a field of the managed device, which enrollManagement's undo removes.
}

struct SetHostname;

#[async_trait]
impl ProvisioningStep for SetHostname {
    fn name(&self) -> &'static str {
        "setHostname"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::PostProvisioning
    }
    async fn run(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Outcome {
        let name = rec.pc.managed_device_name.clone().unwrap_or_default();
        tri!(guest_config::set_hostname(&need!(cx.guest()), &name).await);
        Outcome::Done { detail: Some(name) }
    }
    // Inside the guest: gone with the VM.
}

struct CreateUserAccount;

#[async_trait]
impl ProvisioningStep for CreateUserAccount {
    fn name(&self) -> &'static str {
        "createUserAccount"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::PostProvisioning
    }
    async fn run(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Outcome {
        let agent = need!(cx.guest());
        let user = tri!(cx.app.store.get_user(rec.state.user_id).await);
        let username = guest_config::linux_username(&user.user_principal_name);
        // On a domain-joined Cloud PC the user is the domain account of the same name (as an
        // organisation syncing its directory has it), signed in by sssd: no local account and no
        // one-time password, the domain's password is theirs.
        if let Some(domain) = tri!(joined_domain(cx).await) {
            tri!(guest_config::use_domain_account(&agent, &username, &domain).await);
            rec.state.initial_password = None;
            rec.state.resources.username = Some(username.clone());
            return Outcome::Done { detail: Some(format!("domain account {username} of {domain}")) };
        }
        let password = rec.state.initial_password.clone().unwrap_or_else(one_time_password);
        let hash = tri!(guest_config::hash_password(&password));
        tri!(guest_config::create_user(&agent, &username, &user.display_name, &hash).await);
        rec.state.initial_password = Some(password);
        rec.state.resources.username = Some(username.clone());
        Outcome::Done { detail: Some(format!("account {username} with a one-time password")) }
    }
}

struct AddLocalAdmin;

#[async_trait]
impl ProvisioningStep for AddLocalAdmin {
    fn name(&self) -> &'static str {
        "addLocalAdmin"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::PostProvisioning
    }
    async fn run(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Outcome {
        if !cx.spec.local_admin {
            rec.pc.user_account_type = UserAccountType::StandardUser;
            return Outcome::Done {
                detail: Some("skipped: the policy does not make users local administrators".into()),
            };
        }
        let agent = need!(cx.guest());
        let Some(username) = rec.state.resources.username.clone() else {
            return Outcome::Failed("the user account was not created".into());
        };
        tri!(guest_config::add_to_admin_group(&agent, &username).await);
        rec.pc.user_account_type = UserAccountType::Administrator;
        Outcome::Done { detail: Some(format!("{username} is in wheel")) }
    }
}

struct SetTimeZone;

#[async_trait]
impl ProvisioningStep for SetTimeZone {
    fn name(&self) -> &'static str {
        "setTimeZone"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::PostProvisioning
    }
    async fn run(&self, cx: &StepContext<'_>, _rec: &mut CloudPcRecord) -> Outcome {
        let zone = cx.spec.time_zone.clone().unwrap_or_else(|| "UTC".into());
        tri!(guest_config::set_time_zone(&need!(cx.guest()), &zone).await);
        Outcome::Done { detail: Some(zone) }
    }
}

struct GrowDisk;

#[async_trait]
impl ProvisioningStep for GrowDisk {
    fn name(&self) -> &'static str {
        "growDisk"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::PostProvisioning
    }
    async fn run(&self, cx: &StepContext<'_>, _rec: &mut CloudPcRecord) -> Outcome {
        let size = tri!(guest_config::grow_root_filesystem(&need!(cx.guest())).await);
        let want = cx.spec.storage_gib << 30;
        // ext4 keeps journal and inode tables out of its size: 80% of the disk means grown.
        if size < want / 100 * 80 {
            return Outcome::Failed(format!(
                "the root filesystem is {size} bytes after growing; the license gives {want}"
            ));
        }
        Outcome::Done { detail: Some(format!("root filesystem {size} bytes")) }
    }
}

struct BlockRemoteDesktop;

#[async_trait]
impl ProvisioningStep for BlockRemoteDesktop {
    fn name(&self) -> &'static str {
        "blockRemoteDesktop"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::PostProvisioning
    }
    async fn run(&self, cx: &StepContext<'_>, _rec: &mut CloudPcRecord) -> Outcome {
        let hv = need!(cx.hv());
        let (nic, _) = tri!(cloud_pc_nic(cx.app, &cx.spec, hv, cx.r.mac.clone().unwrap_or_default(), true).await);
        tri!(hv.set_nic_filter(&cx.domain, &nic).await);
        let filter = nic.filter.unwrap_or_default();
        Outcome::Done { detail: Some(format!("inbound TCP/UDP 3389 dropped by nwfilter {filter}")) }
    }
}

struct AssignUser;

#[async_trait]
impl ProvisioningStep for AssignUser {
    fn name(&self) -> &'static str {
        "assignUser"
    }
    fn stage(&self) -> ProvisioningStage {
        ProvisioningStage::Assignment
    }
    async fn run(&self, cx: &StepContext<'_>, rec: &mut CloudPcRecord) -> Outcome {
        let user = tri!(cx.app.store.get_user(rec.state.user_id).await);
        rec.pc.user_principal_name = user.user_principal_name.clone();
        Outcome::Done { detail: Some(format!("assigned to {}", user.user_principal_name)) }
    }
}

impl App {
    /// Places the Cloud PC on a ready host of its region with room for its size, the one with
    /// the most free memory (spreading load, as nova's default RAM weigher does); with none, the
    /// Cloud PC waits with the reason and is tried again when something changes.
    async fn allocate(&self, rec: &mut CloudPcRecord) -> Outcome {
        if rec.state.resources.host.is_some() {
            return Outcome::Done { detail: rec.state.resources.host.clone() };
        }
        let Some(spec) = rec.state.spec.clone() else { return Outcome::Failed("no build specification".into()) };
        // Held in the database: replicas allocating at the same moment take turns, and each sees
        // the hosts the previous one chose (they are summed from the stored Cloud PCs).
        let _gate = self.allocation_gate.lock().await;
        let _lock = tri!(self.store.lock_allocation().await);
        let (candidates, why_none) = tri!(self.placement_candidates(&spec.region).await);
        if let Some(reason) = why_none {
            return Outcome::Wait(format!("waiting for a host: {reason}"));
        }
        let best = candidates
            .iter()
            .filter_map(|(name, cap, used)| {
                let fits = used.vcpus + u64::from(spec.vcpus) <= cap.v_cpu_count
                    && used.memory_mib + spec.memory_mib <= cap.memory_in_mb
                    && used.storage_gib + spec.storage_gib <= cap.disk_in_gb;
                fits.then(|| (cap.memory_in_mb - used.memory_mib, std::cmp::Reverse(used.cloud_pcs), name.clone()))
            })
            .max();
        match best {
            Some((_, _, name)) => {
                rec.state.resources.host = Some(name.clone());
                // Persisted under the lock, so the next allocation counts this one.
                tri!(self.save_workflow(rec, None).await);
                Outcome::Done { detail: Some(format!("host {name}")) }
            }
            None => Outcome::Wait(format!(
                "waiting for capacity: no ready host in region '{}' has {} vCPU, {} MiB RAM and {} GiB of (thin, {}x \
                 overcommitted) disk free",
                spec.region, spec.vcpus, spec.memory_mib, spec.storage_gib, self.config.disk_overcommit
            )),
        }
    }
}
