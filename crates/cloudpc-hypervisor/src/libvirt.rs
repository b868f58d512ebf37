//! The libvirt backend: one connection per host, calls made on blocking threads.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::network::Network;
use virt::nwfilter::NWFilter;
use virt::sys;

use crate::{xml, Accelerator, HostConfig, Hypervisor, HypervisorError, NetworkSpec, NicSpec, Result, VmSpec, VmState};

pub struct LibvirtHost {
    config: HostConfig,
    conn: Arc<Connect>,
    accel: Accelerator,
    qemu_img: String,
}

fn libvirt_err(action: &str, e: virt::error::Error) -> HypervisorError {
    HypervisorError::Libvirt { action: action.to_string(), message: e.message().to_string() }
}

fn is_missing(e: &virt::error::Error) -> bool {
    matches!(e.code(), ErrorNumber::NoDomain | ErrorNumber::NoNetwork | ErrorNumber::NoNwfilter)
}

impl LibvirtHost {
    pub fn open(config: HostConfig, accel: Accelerator, qemu_img: &str) -> Result<Self> {
        // libvirt prints every error to stderr by default; cloudpc reports them itself.
        virt::error::clear_error_callback();
        let conn =
            Connect::open(Some(&config.uri)).map_err(|e| libvirt_err(&format!("connecting to {}", config.uri), e))?;
        Ok(Self { config, conn: Arc::new(conn), accel, qemu_img: qemu_img.to_string() })
    }

    /// Runs a libvirt call on a blocking thread, since libvirt's API is synchronous.
    async fn call<T, F>(&self, action: String, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T, virt::error::Error> + Send + 'static,
    {
        let conn = self.conn.clone();
        let act = action.clone();
        tokio::task::spawn_blocking(move || f(&conn))
            .await
            .map_err(|e| HypervisorError::Io(format!("{act}: {e}")))?
            .map_err(|e| libvirt_err(&action, e))
    }
}

fn lookup(conn: &Connect, name: &str) -> Result<Option<Domain>, virt::error::Error> {
    match Domain::lookup_by_name(conn, name) {
        Ok(d) => Ok(Some(d)),
        Err(e) if is_missing(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Flags that change the definition and, when the VM runs, the live VM too.
fn config_and_live(d: &Domain) -> Result<u32, virt::error::Error> {
    let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
    if d.is_active()? {
        flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
    }
    Ok(flags)
}

fn has_mac(d: &Domain, mac: &str) -> Result<bool, virt::error::Error> {
    Ok(xml::interface_with_mac(&d.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?, mac).is_some())
}

#[async_trait]
impl Hypervisor for LibvirtHost {
    fn config(&self) -> &HostConfig {
        &self.config
    }

    fn accelerator(&self) -> Accelerator {
        self.accel
    }

    async fn create_overlay(&self, base: &Path, overlay: &Path, size_gib: u64) -> Result<()> {
        if overlay.exists() {
            return Ok(());
        }
        if let Some(dir) = overlay.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| HypervisorError::Io(format!("creating {}: {e}", dir.display())))?;
        }
        // An overlay smaller than its base would cut the image's filesystem short.
        let info = tokio::process::Command::new(&self.qemu_img)
            .args(["info", "-U", "--output=json", "-f", "qcow2"])
            .arg(base)
            .output()
            .await
            .map_err(|e| HypervisorError::Command { program: self.qemu_img.clone(), message: e.to_string() })?;
        let base_size = serde_json::from_slice::<serde_json::Value>(&info.stdout)
            .ok()
            .and_then(|v| v["virtual-size"].as_u64())
            .ok_or_else(|| HypervisorError::Command {
                program: format!("{} info", self.qemu_img),
                message: format!(
                    "cannot read the image {}: {}",
                    base.display(),
                    String::from_utf8_lossy(&info.stderr).trim()
                ),
            })?;
        if base_size > size_gib << 30 {
            return Err(HypervisorError::TooSmall { image_gib: base_size.div_ceil(1 << 30), disk_gib: size_gib });
        }
        // Written under a temporary name and renamed, so a crash never leaves a half-made overlay.
        let tmp = overlay.with_extension("qcow2.partial");
        let out = tokio::process::Command::new(&self.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(&tmp)
            .arg(format!("{size_gib}G"))
            .output()
            .await
            .map_err(|e| HypervisorError::Command { program: self.qemu_img.clone(), message: e.to_string() })?;
        if !out.status.success() {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(HypervisorError::Command {
                program: format!("{} create", self.qemu_img),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        tokio::fs::rename(&tmp, overlay)
            .await
            .map_err(|e| HypervisorError::Io(format!("renaming {}: {e}", tmp.display())))
    }

    async fn remove_file(&self, path: &Path) -> Result<()> {
        match tokio::fs::remove_file(path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(HypervisorError::Io(format!("removing {}: {e}", path.display()))),
        }
    }

    async fn define_vm(&self, spec: &VmSpec) -> Result<()> {
        let name = spec.name.clone();
        let doc = xml::domain(spec, self.accel);
        self.call(format!("defining VM {name}"), move |c| {
            if lookup(c, &name)?.is_none() {
                Domain::define_xml(c, &doc)?;
            }
            Ok(())
        })
        .await
    }

    async fn remove_vm(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.call(format!("removing VM {name}"), move |c| {
            let Some(d) = lookup(c, &name)? else { return Ok(()) };
            if d.is_active()? {
                d.destroy()?;
            }
            d.undefine()
        })
        .await
    }

    async fn state(&self, name: &str) -> Result<VmState> {
        let name = name.to_string();
        self.call(format!("reading the state of {name}"), move |c| {
            let Some(d) = lookup(c, &name)? else { return Ok(VmState::Missing) };
            Ok(match d.get_state()?.0 {
                sys::VIR_DOMAIN_RUNNING => VmState::Running,
                sys::VIR_DOMAIN_SHUTOFF => VmState::ShutOff,
                _ => VmState::Other,
            })
        })
        .await
    }

    async fn list_vms(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = prefix.to_string();
        self.call("listing VMs".into(), move |c| {
            let mut names = Vec::new();
            for d in c.list_all_domains(0)? {
                let n = d.get_name()?;
                if n.starts_with(&prefix) {
                    names.push(n);
                }
            }
            names.sort();
            Ok(names)
        })
        .await
    }

    async fn domain_xml(&self, name: &str) -> Result<String> {
        let name = name.to_string();
        self.call(format!("reading the definition of {name}"), move |c| {
            Domain::lookup_by_name(c, &name)?.get_xml_desc(0)
        })
        .await
    }

    async fn start(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.call(format!("starting {name}"), move |c| {
            let d = Domain::lookup_by_name(c, &name)?;
            if !d.is_active()? {
                d.create()?;
            }
            Ok(())
        })
        .await
    }

    async fn power_off(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.call(format!("powering off {name}"), move |c| {
            if let Some(d) = lookup(c, &name)? {
                if d.is_active()? {
                    d.destroy()?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn reboot(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        // A reset needs nothing from the guest, so it works even when the guest is stuck.
        self.call(format!("restarting {name}"), move |c| Domain::lookup_by_name(c, &name)?.reset().map(|_| ())).await
    }

    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<()> {
        let name = spec.name.clone();
        let doc = xml::network(spec);
        self.call(format!("starting network {name}"), move |c| {
            let net = match Network::lookup_by_name(c, &name) {
                Ok(n) => n,
                Err(e) if is_missing(&e) => Network::define_xml(c, &doc)?,
                Err(e) => return Err(e),
            };
            if !net.is_active()? {
                net.create()?;
            }
            Ok(())
        })
        .await
    }

    async fn ensure_block_rdp_filter(&self) -> Result<String> {
        self.call("defining the remote-desktop filter".into(), move |c| {
            // Redefining a filter makes libvirt rebuild the rules of every NIC using it: only define
            // it when it is missing.
            match NWFilter::lookup_by_name(c, xml::BLOCK_RDP_FILTER) {
                Ok(_) => {}
                Err(e) if is_missing(&e) => {
                    NWFilter::define_xml(c, &xml::block_rdp_filter())?;
                }
                Err(e) => return Err(e),
            }
            Ok(xml::BLOCK_RDP_FILTER.to_string())
        })
        .await
    }

    async fn attach_nic(&self, vm: &str, nic: &NicSpec) -> Result<()> {
        let (vm, mac, doc) = (vm.to_string(), nic.mac.clone(), xml::nic(nic));
        self.call(format!("attaching a NIC to {vm}"), move |c| {
            let d = Domain::lookup_by_name(c, &vm)?;
            if !has_mac(&d, &mac)? {
                d.attach_device_flags(&doc, config_and_live(&d)?)?;
            }
            Ok(())
        })
        .await
    }

    async fn detach_nic(&self, vm: &str, mac: &str) -> Result<()> {
        let (vm, mac) = (vm.to_string(), mac.to_string());
        self.call(format!("detaching a NIC from {vm}"), move |c| {
            let Some(d) = lookup(c, &vm)? else { return Ok(()) };
            // libvirt wants the whole <interface> element back, so take it from the definition.
            if let Some(doc) = xml::interface_with_mac(&d.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?, &mac) {
                d.detach_device_flags(&doc, config_and_live(&d)?)?;
            }
            Ok(())
        })
        .await
    }

    async fn set_nic_filter(&self, vm: &str, nic: &NicSpec) -> Result<()> {
        let (vm, doc) = (vm.to_string(), xml::nic(nic));
        self.call(format!("updating the NIC filter of {vm}"), move |c| {
            let d = Domain::lookup_by_name(c, &vm)?;
            d.update_device_flags(&doc, config_and_live(&d)?).map(|_| ())
        })
        .await
    }

    async fn vnc_port(&self, name: &str) -> Result<Option<u16>> {
        let xml = self.domain_xml(name).await?;
        Ok(xml::vnc_port(&xml))
    }

    async fn agent(&self, vm: &str, command: &serde_json::Value, timeout_secs: i32) -> Result<serde_json::Value> {
        let (name, cmd) = (vm.to_string(), command.to_string());
        let what = command.get("execute").and_then(|v| v.as_str()).unwrap_or("?").to_string();
        let conn = self.conn.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let d = Domain::lookup_by_name(&conn, &name)?;
            d.qemu_agent_command(&cmd, timeout_secs, 0)
        })
        .await
        .map_err(|e| HypervisorError::Io(e.to_string()))?
        .map_err(|e| HypervisorError::Agent {
            vm: vm.to_string(),
            command: what.clone(),
            message: e.message().to_string(),
        })?;
        let v: serde_json::Value = serde_json::from_str(&answer).map_err(|e| HypervisorError::Agent {
            vm: vm.to_string(),
            command: what.clone(),
            message: e.to_string(),
        })?;
        Ok(v.get("return").cloned().unwrap_or(serde_json::Value::Null))
    }
}
