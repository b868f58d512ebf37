//! Choosing the accelerator by probing, not by looking for `/dev/kvm`.
//!
//! On nested or misconfigured hosts `/dev/kvm` exists but guests hang, so the probe boots a real
//! kernel under KVM with an init that powers off at once: finishing within the time limit proves
//! KVM works, anything else means TCG (software emulation), which always works.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    /// The libvirt domain type for this accelerator.
    pub fn domain_type(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "qemu",
        }
    }
}

/// A kernel and initramfs whose busybox can power the probe guest off.
pub struct ProbeKernel<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
}

/// Boots the probe kernel under KVM; `Kvm` only if it powered off within `limit`.
pub async fn probe(qemu: &str, kernel: Option<ProbeKernel<'_>>, limit: Duration) -> (Accelerator, String) {
    if !Path::new("/dev/kvm").exists() {
        return (Accelerator::Tcg, "no /dev/kvm; using TCG".into());
    }
    let Some(k) = kernel else {
        return (Accelerator::Tcg, "no probe kernel available; using TCG without trying KVM".into());
    };
    let mut cmd = tokio::process::Command::new(qemu);
    cmd.args(["-accel", "kvm", "-machine", "pc", "-nodefaults", "-nographic", "-display", "none"])
        .args(["-serial", "none", "-m", "128", "-no-reboot", "-kernel"])
        .arg(k.kernel)
        .arg("-initrd")
        .arg(k.initrd)
        .args(["-append", "rdinit=/bin/busybox panic=-1 quiet -- poweroff -f"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (Accelerator::Tcg, format!("cannot run {qemu} ({e}); using TCG")),
    };
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) if status.success() => (Accelerator::Kvm, "KVM probe guest finished; using KVM".into()),
        Ok(Ok(status)) => (Accelerator::Tcg, format!("KVM probe guest failed ({status}); using TCG")),
        Ok(Err(e)) => (Accelerator::Tcg, format!("KVM probe could not be waited for ({e}); using TCG")),
        Err(_) => {
            let _ = child.kill().await;
            (Accelerator::Tcg, format!("KVM probe guest did not finish within {}s; using TCG", limit.as_secs()))
        }
    }
}
