//! The hypervisor layer: everything cloudpc asks of a host that runs Cloud PCs.
//!
//! The control plane sees only [`Hypervisor`]; [`libvirt::LibvirtHost`] implements it with libvirt
//! and QEMU. Every operation is idempotent (asking for what already exists, or removing what is
//! already gone, succeeds), because provisioning steps may run again after a crash.

pub mod accel;
pub mod dhcp;
pub mod libvirt;
pub mod netcheck;
pub mod xml;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use accel::Accelerator;

/// What a host can give to Cloud PCs in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

/// A hypervisor host as configured: where it is, and how much it may hand out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostConfig {
    pub name: String,
    /// libvirt connection URI, such as `qemu:///system`.
    pub uri: String,
    pub region: String,
    pub capacity: Capacity,
    /// Which hosted-network subnet this host uses: 0 for the per-region networks of hosts inside
    /// the control plane's process, a number unique to the host for hosts behind agents.
    #[serde(default)]
    pub subnet_index: u32,
}

/// How a VM boots: straight into a kernel (fast under TCG) or through firmware like a PC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Boot {
    Kernel { kernel: PathBuf, initrd: PathBuf, cmdline: String },
    Firmware,
}

/// One Cloud PC's virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// The libvirt domain name; cloudpc uses the Cloud PC's managed device name plus its id.
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk: PathBuf,
    pub boot: Boot,
    /// File that receives the serial console, for diagnosing boots. Written through virtlogd,
    /// which caps it (see [`xml::domain`]).
    pub console_log: PathBuf,
}

/// A virtual NIC on a hosted network, or (with `bridge`) on a host bridge that leads to the
/// organisation's own network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub network: String,
    pub mac: String,
    /// nwfilter applied to the NIC: one of cloudpc's ([`Hypervisor::ensure_isolation_filter`],
    /// [`Hypervisor::ensure_block_rdp_filter`]), whose parameters the hypervisor fills in.
    pub filter: Option<String>,
    /// The host bridge to plug the NIC into instead of `network`. Such a NIC gets its address
    /// from the organisation's DHCP, so the hosted network's isolation filter (which trusts only
    /// the host's DHCP) does not apply; [`xml::ORG_FILTER`] or [`xml::BLOCK_RDP_ORG_FILTER`] does.
    #[serde(default)]
    pub bridge: Option<String>,
    /// The VLAN of `bridge` the NIC is on: its port carries only that VLAN, untagged towards the
    /// guest (bridge VLAN filtering). Set again at every start, as libvirt makes a new port then.
    #[serde(default)]
    pub vlan: Option<u16>,
}

/// How [`Hypervisor::resume`] started a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "outcome", content = "reason")]
pub enum Resumed {
    /// From its saved memory: what ran before runs on.
    Restored,
    /// It had no saved memory (or was running already).
    Started,
    /// Its saved memory could not be restored, for this reason, and was discarded; the guest
    /// booted afresh (what was open is lost, the disk is kept).
    BootedCold(String),
}

/// A NAT network for one region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    pub bridge: String,
    /// First three octets of the /24, such as `10.213.7`.
    pub subnet: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Running,
    ShutOff,
    /// Shut off with its memory saved to disk ([`Hypervisor::save`]); the next start resumes it.
    Saved,
    /// Defined but neither running nor shut off (paused, crashed, starting).
    Other,
    Missing,
}

/// Errors cross the wire between a host agent and the control plane as they are, so the control
/// plane sees the same error whether the host is local or behind an agent.
#[derive(Debug, thiserror::Error, Serialize, Deserialize)]
pub enum HypervisorError {
    #[error("the host agent of {host} could not be reached: {message}")]
    Unreachable { host: String, message: String },
    #[error("libvirt refused {action}: {message}")]
    Libvirt { action: String, message: String },
    #[error("the guest agent of {vm} did not answer {command}: {message}")]
    Agent { vm: String, command: String, message: String },
    #[error("{program} failed: {message}")]
    Command { program: String, message: String },
    #[error("{0}")]
    Io(String),
    #[error("the image needs a {image_gib} GiB disk, more than the {disk_gib} GiB the license gives")]
    TooSmall { image_gib: u64, disk_gib: u64 },
}

pub type Result<T, E = HypervisorError> = std::result::Result<T, E>;

/// A console connection: the raw VNC byte stream of one VM, wherever it comes from.
pub trait ConsoleStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> ConsoleStream for T {}

/// A file's bytes on their way between hosts.
pub type FileReader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// Whether a libvirt URI names this machine (no host part, like `qemu:///system`): only then is a
/// VM's loopback console port reachable from here.
pub fn uri_is_local(uri: &str) -> bool {
    uri.split_once("://").is_some_and(|(_, rest)| rest.starts_with('/'))
}

#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    fn config(&self) -> &HostConfig;
    /// The accelerator guests run with (probed when the host was opened).
    fn accelerator(&self) -> Accelerator;

    /// A copy-on-write overlay of `base` with a virtual size of `size_gib`; kept if it exists.
    async fn create_overlay(&self, base: &Path, overlay: &Path, size_gib: u64) -> Result<()>;
    /// Removes a file and the copies log rotation made of it (`<file>.0`, …); a missing file is fine.
    async fn remove_file(&self, path: &Path) -> Result<()>;

    /// Defines the VM (not started); an existing definition is kept.
    async fn define_vm(&self, spec: &VmSpec) -> Result<()>;
    /// Stops and removes the VM's definition; a missing VM is fine.
    async fn remove_vm(&self, name: &str) -> Result<()>;
    async fn state(&self, name: &str) -> Result<VmState>;
    /// Names of all VMs whose name starts with `prefix`.
    async fn list_vms(&self, prefix: &str) -> Result<Vec<String>>;
    async fn domain_xml(&self, name: &str) -> Result<String>;
    async fn start(&self, name: &str) -> Result<()>;
    /// Hard power off; an already stopped VM is fine.
    async fn power_off(&self, name: &str) -> Result<()>;
    async fn reboot(&self, name: &str) -> Result<()>;
    /// Saves the running VM's memory to disk and stops it, freeing its RAM (hibernation); the
    /// next start resumes it where it was. A VM already saved or shut off is fine.
    async fn save(&self, name: &str) -> Result<()>;
    /// Starts the VM, from its saved memory if it has some. A saved state that cannot be
    /// restored (a corrupt or missing file) is discarded and the VM boots cold, which the
    /// outcome says. A running VM is fine.
    async fn resume(&self, name: &str) -> Result<Resumed>;

    /// Creates and starts the region's NAT network if it does not run yet.
    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<()>;
    /// Defines the filter that keeps a Cloud PC from its neighbours and the host (anti-spoofing,
    /// only DHCP and DNS to the host), and the anti-spoofing filter of NICs on an organisation's
    /// network ([`xml::ORG_FILTER`]); returns the isolation filter's name.
    async fn ensure_isolation_filter(&self) -> Result<String>;
    /// Defines the isolation filter plus a drop of inbound remote-desktop traffic; returns its name.
    async fn ensure_block_rdp_filter(&self) -> Result<String>;
    /// Adds the NIC to the VM's definition (and the running VM); a NIC with that MAC is kept.
    async fn attach_nic(&self, vm: &str, nic: &NicSpec) -> Result<()>;
    /// Removes the NIC with that MAC; a missing NIC or VM is fine.
    async fn detach_nic(&self, vm: &str, mac: &str) -> Result<()>;
    /// Replaces the NIC's filter on the definition and, if running, live.
    async fn set_nic_filter(&self, vm: &str, nic: &NicSpec) -> Result<()>;

    /// The loopback port of the running VM's VNC console, if it has one.
    async fn vnc_port(&self, name: &str) -> Result<Option<u16>>;

    /// Sends one guest-agent command (JSON) and returns its `return` value.
    async fn agent(&self, vm: &str, command: &serde_json::Value, timeout_secs: i32) -> Result<serde_json::Value>;
    /// Reads a Cloud PC's file (its disk) to copy it to another host: `None` when it is not there.
    /// The default reads this machine's file system.
    async fn export_file(&self, path: &Path) -> Result<Option<(FileReader, u64)>> {
        match tokio::fs::File::open(path).await {
            Ok(f) => {
                let len =
                    f.metadata().await.map_err(|e| HypervisorError::Io(format!("{}: {e}", path.display())))?.len();
                Ok(Some((Box::new(f), len)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(HypervisorError::Io(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Writes a Cloud PC's file copied from another host: whole under a temporary name, synced,
    /// then renamed, so a copy cut short never passes for the file. Returns the bytes written.
    async fn import_file(&self, path: &Path, mut data: FileReader) -> Result<u64> {
        let io = |e: std::io::Error| HypervisorError::Io(format!("cannot write {}: {e}", path.display()));
        let partial = path.with_extension("import-partial");
        let mut f = tokio::fs::File::create(&partial).await.map_err(io)?;
        let n = tokio::io::copy(&mut data, &mut f).await.map_err(io)?;
        f.sync_all().await.map_err(io)?;
        drop(f);
        tokio::fs::rename(&partial, path).await.map_err(io)?;
        Ok(n)
    }

    /// Whether base images must be copied to this host ([`Hypervisor::ensure_image`]); hosts in
    /// the control plane's process read them where the control plane keeps them.
    fn ships_images(&self) -> bool {
        false
    }

    /// Makes sure the host has the image file whose content has this sha256, copying `source`
    /// there if it has not (verified on arrival), and returns where the host keeps it.
    async fn ensure_image(&self, _sha256: &str, source: &Path) -> Result<PathBuf> {
        Ok(source.to_path_buf())
    }

    /// Removes the host's cached images that are not in `keep` (and were not just copied);
    /// returns the digests removed.
    async fn retain_images(&self, _keep: &[String]) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Runs the health checks of a network connection from this host (see [`netcheck`]).
    async fn network_check(&self, _spec: &netcheck::NetworkCheckSpec) -> Result<Vec<netcheck::CheckResult>> {
        Err(HypervisorError::Io(format!("host '{}' cannot run network health checks", self.config().name)))
    }

    /// Disables a Cloud PC's computer object in the connection's domain (see
    /// [`netcheck::disable_computer`]), from this host's bridge to the organisation's network.
    async fn disable_computer(&self, _spec: &netcheck::NetworkCheckSpec, _name: &str) -> Result<String> {
        Err(HypervisorError::Io(format!("host '{}' cannot reach a domain controller", self.config().name)))
    }

    /// Opens the VM's console. Consoles listen on their host's loopback; a host on this machine
    /// connects to it, a host behind an agent relays it (the default serves hosts on this machine).
    async fn open_console(&self, name: &str) -> Result<Box<dyn ConsoleStream>> {
        let uri = &self.config().uri;
        if !uri_is_local(uri) {
            return Err(HypervisorError::Io(format!(
                "host '{}' ({uri}) is not on this machine and has no agent to relay its consoles",
                self.config().name
            )));
        }
        let port = self
            .vnc_port(name)
            .await?
            .ok_or_else(|| HypervisorError::Io(format!("the console of {name} is not listening")))?;
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| HypervisorError::Io(format!("the console of {name} did not answer: {e}")))?;
        let _ = stream.set_nodelay(true);
        Ok(Box::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_uris_without_a_host_are_on_this_machine() {
        assert!(uri_is_local("qemu:///system"));
        assert!(uri_is_local("qemu:///session"));
        for remote in ["qemu+ssh://root@hv2/system", "qemu+tls://hv3.example/system", "qemu://hv4/system", "bogus"] {
            assert!(!uri_is_local(remote), "{remote}");
        }
    }
}
