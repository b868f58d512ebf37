//! Post-provisioning steps inside real guests, run again after the server crashed while the
//! first run was still at work in the guest.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::vm_support::*;

const BOOT: Duration = Duration::from_secs(120);

async fn provisioning_pc(s: &VmServer, upn: &str, storage_gb: u32) -> Value {
    let sku = s.tiny_sku("TINY", 1, 1, storage_gb).await;
    let user = s.user(upn).await;
    let group = s.group(&format!("group of {upn}")).await;
    s.add_member(&group, &user).await;
    let policy = s.tiny_policy(&format!("policy of {upn}"), json!({})).await;
    s.assign(&policy, &[&group]).await;
    s.license(upn, &sku, true).await;
    let start = Instant::now();
    loop {
        if let Some(pc) = s.cloud_pcs().await.into_iter().next() {
            return pc;
        }
        assert!(start.elapsed() < BOOT, "no Cloud PC appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kill -9 while the first run's `resize2fs` is still growing the guest's filesystem: the re-run
/// after the restart must wait for it (not fail with "Device or resource busy") and the Cloud PC
/// ends `provisioned`.
#[tokio::test]
async fn test_vm_grow_disk_rerun_after_kill9_waits_for_the_first_run_in_the_guest() {
    let _turn = vm_turn().await;
    let settings = tempfile::tempdir().unwrap();
    let config = roomy_host_settings(settings.path());
    let s = VmServer::start(&["--config", &config]).await;
    // 64 GiB: growing the tiny image's 1 KiB-block ext4 online takes seconds under TCG.
    let pc = provisioning_pc(&s, "isaiah@contoso.com", 64).await;
    let domain = format!("{}{}", s.prefix, pc["managedDeviceName"].as_str().unwrap().to_ascii_lowercase());
    let start = Instant::now();
    loop {
        let growing = s.steps(&pc).await.iter().any(|st| st["name"] == "growDisk" && st["status"] == "running");
        if growing && !guest_output(&domain, "/bin/pidof", &["resize2fs"]).await.trim().is_empty() {
            break;
        }
        assert!(start.elapsed() < BOOT, "growDisk never started resize2fs in the guest");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let killed = Instant::now();
    let s = s.crash_and_restart().await;
    let still = !guest_output(&domain, "/bin/pidof", &["resize2fs"]).await.trim().is_empty();
    eprintln!("restarted in {:?}; the first resize2fs still running: {still}", killed.elapsed());
    let pc = s.wait_all(1, &["provisioned", "provisionedWithWarnings", "failed"], BOOT).await.remove(0);
    eprintln!("provisioned {:?} after the kill", killed.elapsed());
    assert_eq!(pc["status"], "provisioned", "{}", pc["statusDetail"]);
    let grow: Vec<Value> = s.steps(&pc).await.into_iter().filter(|st| st["name"] == "growDisk").collect();
    assert!(grow.iter().all(|st| st["status"] == "succeeded"), "{grow:?}");
    let fs = agent(&domain, json!({"execute": "guest-get-fsinfo"}));
    let root = fs.as_array().unwrap().iter().find(|f| f["mountpoint"] == "/").unwrap().clone();
    assert!(root["total-bytes"].as_u64().unwrap() > (64u64 << 30) / 10 * 8, "root grown: {root}");
    assert_eq!(s.domains(), vec![domain]);
}
