//! Simulated hosts, for measuring scale without hardware (`cloudpc host-agent --simulate`).
//!
//! Honestly a simulation: no VM, no disk, no network exists. Each operation waits the configured
//! latency and then answers as a healthy host would, keeping only enough state (which VMs are
//! defined and running, each disk's size) for the control plane's checks to hold. Tests of the
//! real path never use it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use cloudpc_hypervisor::{
    Accelerator, ConsoleStream, HostConfig, Hypervisor, HypervisorError, NetworkSpec, NicSpec, Result, VmSpec, VmState,
};

#[derive(Default)]
struct World {
    /// VM name → (running, disk size in GiB).
    vms: HashMap<String, (bool, u64)>,
    disks: HashMap<PathBuf, u64>,
    /// VMs saved to disk (shut off, resumed by the next start).
    saved: std::collections::HashSet<String>,
}

pub struct SimulatedHost {
    config: HostConfig,
    latency: Duration,
    world: Mutex<World>,
}

impl SimulatedHost {
    pub fn new(config: HostConfig, latency: Duration) -> Self {
        Self { config, latency, world: Mutex::new(World::default()) }
    }

    async fn pause(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().expect("simulated world")
    }

    fn missing(name: &str) -> HypervisorError {
        HypervisorError::Libvirt { action: format!("finding {name}"), message: "no such simulated VM".into() }
    }
}

#[async_trait]
impl Hypervisor for SimulatedHost {
    fn config(&self) -> &HostConfig {
        &self.config
    }

    fn accelerator(&self) -> Accelerator {
        Accelerator::Tcg
    }

    async fn create_overlay(&self, _base: &Path, overlay: &Path, size_gib: u64) -> Result<()> {
        self.pause().await;
        self.world().disks.insert(overlay.to_path_buf(), size_gib);
        Ok(())
    }

    async fn remove_file(&self, path: &Path) -> Result<()> {
        self.world().disks.remove(path);
        Ok(())
    }

    async fn define_vm(&self, spec: &VmSpec) -> Result<()> {
        self.pause().await;
        let mut w = self.world();
        let size = w.disks.get(&spec.disk).copied().unwrap_or(0);
        w.vms.entry(spec.name.clone()).or_insert((false, size));
        Ok(())
    }

    async fn remove_vm(&self, name: &str) -> Result<()> {
        self.world().vms.remove(name);
        Ok(())
    }

    async fn state(&self, name: &str) -> Result<VmState> {
        let w = self.world();
        Ok(match w.vms.get(name) {
            Some((false, _)) if w.saved.contains(name) => VmState::Saved,
            Some((true, _)) => VmState::Running,
            Some((false, _)) => VmState::ShutOff,
            None => VmState::Missing,
        })
    }

    async fn list_vms(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self.world().vms.keys().filter(|n| n.starts_with(prefix)).cloned().collect())
    }

    async fn domain_xml(&self, name: &str) -> Result<String> {
        match self.world().vms.contains_key(name) {
            true => Ok(format!("<domain type='simulated'><name>{name}</name></domain>")),
            false => Err(Self::missing(name)),
        }
    }

    async fn start(&self, name: &str) -> Result<()> {
        self.pause().await;
        match self.world().vms.get_mut(name) {
            Some(vm) => {
                vm.0 = true;
                Ok(())
            }
            None => Err(Self::missing(name)),
        }
    }

    async fn power_off(&self, name: &str) -> Result<()> {
        if let Some(vm) = self.world().vms.get_mut(name) {
            vm.0 = false;
        }
        Ok(())
    }

    async fn reboot(&self, name: &str) -> Result<()> {
        self.start(name).await
    }

    async fn save(&self, name: &str) -> Result<()> {
        self.pause().await;
        let mut w = self.world();
        match w.vms.get_mut(name) {
            Some(vm) if vm.0 => {
                vm.0 = false;
                w.saved.insert(name.to_string());
                Ok(())
            }
            Some(_) => Ok(()),
            None => Err(Self::missing(name)),
        }
    }

    async fn resume(&self, name: &str) -> Result<cloudpc_hypervisor::Resumed> {
        let saved = self.world().saved.remove(name);
        self.start(name).await?;
        Ok(if saved { cloudpc_hypervisor::Resumed::Restored } else { cloudpc_hypervisor::Resumed::Started })
    }

    async fn ensure_network(&self, _spec: &NetworkSpec) -> Result<()> {
        Ok(())
    }

    async fn ensure_isolation_filter(&self) -> Result<String> {
        Ok("cloudpc-isolated".into())
    }

    async fn ensure_block_rdp_filter(&self) -> Result<String> {
        Ok("cloudpc-block-rdp".into())
    }

    async fn attach_nic(&self, _vm: &str, _nic: &NicSpec) -> Result<()> {
        Ok(())
    }

    async fn detach_nic(&self, _vm: &str, _mac: &str) -> Result<()> {
        Ok(())
    }

    async fn set_nic_filter(&self, _vm: &str, _nic: &NicSpec) -> Result<()> {
        Ok(())
    }

    async fn vnc_port(&self, _name: &str) -> Result<Option<u16>> {
        Ok(None)
    }

    /// Answers the guest-agent commands provisioning sends as a healthy guest would.
    async fn agent(&self, vm: &str, command: &serde_json::Value, _timeout_secs: i32) -> Result<serde_json::Value> {
        self.pause().await;
        let Some((running, size)) = self.world().vms.get(vm).copied() else { return Err(Self::missing(vm)) };
        if !running {
            return Err(HypervisorError::Agent {
                vm: vm.into(),
                command: command["execute"].to_string(),
                message: "the simulated VM is not running".into(),
            });
        }
        Ok(match command["execute"].as_str().unwrap_or_default() {
            "guest-get-osinfo" => json!({ "name": "Simulated Linux", "kernel-release": "simulated" }),
            "guest-get-fsinfo" => json!([{ "mountpoint": "/", "total-bytes": size << 30, "used-bytes": 1u64 << 30 }]),
            "guest-exec" => json!({ "pid": 1 }),
            "guest-exec-status" => json!({ "exited": true, "exitcode": 0, "out-data": "" }),
            _ => json!({}),
        })
    }

    async fn open_console(&self, name: &str) -> Result<Box<dyn ConsoleStream>> {
        Err(HypervisorError::Io(format!("{name} is a simulated VM: it has no console")))
    }
}
