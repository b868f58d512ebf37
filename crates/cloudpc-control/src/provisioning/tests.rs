//! Every provisioning step against a fake hypervisor, the way omicron tests its sagas: each step
//! run twice leaves what running it once does, and a failure after any step unwinds everything
//! the steps before it made. (Real VMs cover the same steps end to end in the integration tests;
//! here the point is the step units and their undo, at every position.)

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use cloudpc_hypervisor::{
    Accelerator, Capacity, HostConfig, Hypervisor, HypervisorError, NetworkSpec, NicSpec, Result as HvResult, VmSpec,
    VmState,
};
use cloudpc_store::{SqliteStore, Store};
use cloudpc_types::cloud_pc::CloudPc;
use cloudpc_types::provisioning::{CloudPcRecord, ProvisioningState};

use super::{Outcome, STEPS};
use crate::{App, AppConfig};

/// What the fake host holds: every resource a step can make on a host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Held {
    vms: BTreeSet<(String, bool)>,
    files: BTreeSet<PathBuf>,
    nics: BTreeSet<(String, String)>,
    networks: BTreeSet<String>,
}

/// A fake hypervisor: keeps what it was asked to make, answers the guest agent like a healthy
/// guest. For tests of the step units only.
struct FakeHost {
    config: HostConfig,
    held: Mutex<Held>,
}

impl FakeHost {
    fn held(&self) -> Held {
        self.held.lock().unwrap().clone()
    }
}

#[async_trait]
impl Hypervisor for FakeHost {
    fn config(&self) -> &HostConfig {
        &self.config
    }
    fn accelerator(&self) -> Accelerator {
        Accelerator::Tcg
    }
    async fn create_overlay(&self, _base: &Path, overlay: &Path, _size_gib: u64) -> HvResult<()> {
        self.held.lock().unwrap().files.insert(overlay.to_path_buf());
        Ok(())
    }
    async fn remove_file(&self, path: &Path) -> HvResult<()> {
        self.held.lock().unwrap().files.remove(path);
        Ok(())
    }
    async fn define_vm(&self, spec: &VmSpec) -> HvResult<()> {
        let mut h = self.held.lock().unwrap();
        if !h.vms.iter().any(|(n, _)| n == &spec.name) {
            h.vms.insert((spec.name.clone(), false));
        }
        h.files.insert(spec.console_log.clone());
        Ok(())
    }
    async fn remove_vm(&self, name: &str) -> HvResult<()> {
        self.held.lock().unwrap().vms.retain(|(n, _)| n != name);
        Ok(())
    }
    async fn state(&self, name: &str) -> HvResult<VmState> {
        let h = self.held.lock().unwrap();
        Ok(match h.vms.iter().find(|(n, _)| n == name) {
            Some((_, true)) => VmState::Running,
            Some((_, false)) => VmState::ShutOff,
            None => VmState::Missing,
        })
    }
    async fn list_vms(&self, prefix: &str) -> HvResult<Vec<String>> {
        Ok(self
            .held
            .lock()
            .unwrap()
            .vms
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, _)| n.clone())
            .collect())
    }
    async fn domain_xml(&self, name: &str) -> HvResult<String> {
        Ok(format!("<domain><name>{name}</name></domain>"))
    }
    async fn start(&self, name: &str) -> HvResult<()> {
        let mut h = self.held.lock().unwrap();
        if !h.vms.remove(&(name.to_string(), false)) && !h.vms.contains(&(name.to_string(), true)) {
            return Err(HypervisorError::Io(format!("no VM {name}")));
        }
        h.vms.insert((name.to_string(), true));
        Ok(())
    }
    async fn power_off(&self, name: &str) -> HvResult<()> {
        let mut h = self.held.lock().unwrap();
        if h.vms.remove(&(name.to_string(), true)) {
            h.vms.insert((name.to_string(), false));
        }
        Ok(())
    }
    async fn reboot(&self, _name: &str) -> HvResult<()> {
        Ok(())
    }
    async fn save(&self, name: &str) -> HvResult<()> {
        self.power_off(name).await
    }
    async fn resume(&self, name: &str) -> HvResult<cloudpc_hypervisor::Resumed> {
        self.start(name).await.map(|()| cloudpc_hypervisor::Resumed::Started)
    }
    async fn ensure_network(&self, spec: &NetworkSpec) -> HvResult<()> {
        self.held.lock().unwrap().networks.insert(spec.name.clone());
        Ok(())
    }
    async fn ensure_isolation_filter(&self) -> HvResult<String> {
        Ok("cloudpc-isolated".into())
    }
    async fn ensure_block_rdp_filter(&self) -> HvResult<String> {
        Ok("cloudpc-block-rdp".into())
    }
    async fn attach_nic(&self, vm: &str, nic: &NicSpec) -> HvResult<()> {
        self.held.lock().unwrap().nics.insert((vm.to_string(), nic.mac.clone()));
        Ok(())
    }
    async fn detach_nic(&self, vm: &str, mac: &str) -> HvResult<()> {
        self.held.lock().unwrap().nics.remove(&(vm.to_string(), mac.to_string()));
        Ok(())
    }
    async fn set_nic_filter(&self, _vm: &str, _nic: &NicSpec) -> HvResult<()> {
        Ok(())
    }
    async fn vnc_port(&self, _name: &str) -> HvResult<Option<u16>> {
        Ok(Some(5900))
    }
    async fn agent(&self, vm: &str, command: &serde_json::Value, _timeout_secs: i32) -> HvResult<serde_json::Value> {
        if self.state(vm).await? != VmState::Running {
            return Err(HypervisorError::Agent {
                vm: vm.into(),
                command: command.to_string(),
                message: "not running".into(),
            });
        }
        Ok(match command["execute"].as_str().unwrap_or_default() {
            "guest-get-osinfo" => json!({ "name": "Fake Linux", "kernel-release": "6.1" }),
            "guest-get-fsinfo" => json!([{ "mountpoint": "/", "total-bytes": 2u64 << 30, "used-bytes": 1u64 << 28 }]),
            "guest-exec" => json!({ "pid": 7 }),
            "guest-exec-status" => json!({ "exited": true, "exitcode": 0 }),
            _ => json!({}),
        })
    }
}

struct Fixture {
    app: App,
    host: Arc<FakeHost>,
    _dir: tempfile::TempDir,
}

/// An app on a real SQLite store with the fake host, a tiny gallery image, and the demo's user,
/// license and policy.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let build = dir.path().join("gallery/tiny-1");
    std::fs::create_dir_all(&build).unwrap();
    for f in ["disk.qcow2", "vmlinuz", "initrd.img"] {
        std::fs::write(build.join(f), b"").unwrap();
    }
    let manifest = json!({"id": "tiny-1", "displayName": "tiny", "publisherName": "cloudpc", "offerName": "tiny",
        "skuName": "1", "disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "quiet", "diskBytes": 1});
    std::fs::write(build.join("manifest.json"), manifest.to_string()).unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("cloudpc.db")).await.unwrap());
    let config = AppConfig {
        gallery_dir: dir.path().join("gallery"),
        storage_dir: dir.path().join("disks"),
        image_dir: dir.path().join("images"),
        domain_prefix: "fake-".into(),
        ..AppConfig::default()
    };
    let host = Arc::new(FakeHost {
        config: HostConfig {
            name: "local".into(),
            uri: "qemu:///system".into(),
            region: "local".into(),
            capacity: Capacity { vcpus: 16, memory_mib: 16384, disk_gib: 100 },
            subnet_index: 0,
        },
        held: Mutex::default(),
    });
    let app = App::new(store, config, vec![host.clone() as Arc<dyn Hypervisor>]);
    app.start_hosts().await.unwrap();
    app.register_gallery().await.unwrap();
    app.set_up_demo().await.unwrap().expect("the demo set-up");
    Fixture { app, host, _dir: dir }
}

/// A Cloud PC of the demo user at the start of a generation, with its workflow lease held.
async fn new_generation(app: &App) -> CloudPcRecord {
    let user = app.store.list_users().await.unwrap().remove(0);
    let sku = app.store.list_skus().await.unwrap().remove(0);
    let policy = app.store.list_policies().await.unwrap().remove(0);
    for old in app.store.list_cloud_pc_records().await.unwrap() {
        app.store.delete_cloud_pc(old.pc.id, None).await.unwrap();
    }
    let now = Utc::now();
    let pc = CloudPc {
        display_name: "test".into(),
        user_principal_name: user.user_principal_name.clone(),
        ..crate::reconciler::new_cloud_pc(Uuid::new_v4(), &sku, now)
    };
    let mut rec = CloudPcRecord::new(pc, ProvisioningState::new(user.id, sku.id, now));
    app.store.insert_cloud_pc(&mut rec, None).await.unwrap();
    app.start_generation(&mut rec, policy.id).await.unwrap();
    app.store.save_cloud_pc(&mut rec, None, None, None).await.unwrap();
    assert!(app.store.claim_workflow(rec.pc.id, app.replica(), std::time::Duration::from_secs(60)).await.unwrap());
    rec
}

/// Everything the steps made, on the host and in the store, for one Cloud PC.
async fn made(f: &Fixture) -> (Held, usize, usize) {
    let devices = f.app.store.list_devices().await.unwrap().len();
    let managed = f.app.store.list_managed_devices().await.unwrap().len();
    (f.host.held(), devices, managed)
}

async fn run(f: &Fixture, i: usize, rec: &mut CloudPcRecord) {
    let step = STEPS[i];
    match f.app.run_step(step, rec).await {
        Outcome::Done { .. } => {}
        Outcome::Wait(w) => panic!("{} waited: {w}", step.name()),
        Outcome::Failed(e) => panic!("{} failed: {e}", step.name()),
    }
    // The engine saves after each step; so does this test, so the next run reads it back.
    f.app.store.save_cloud_pc(rec, None, None, None).await.unwrap();
}

#[tokio::test]
async fn test_every_step_run_twice_leaves_what_running_it_once_does() {
    let f = fixture().await;
    let mut rec = new_generation(&f.app).await;
    // As a claimed warm-pool machine, so refreshIdentity does its work too.
    rec.state.claimed_from_pool = true;
    let mut names = Vec::new();
    for (i, step) in STEPS.iter().enumerate() {
        run(&f, i, &mut rec).await;
        let once = (made(&f).await, rec.state.resources.clone(), rec.state.initial_password.clone());
        let mut again = f.app.store.get_cloud_pc_record(rec.pc.id).await.unwrap();
        run(&f, i, &mut again).await;
        let twice = (made(&f).await, again.state.resources.clone(), again.state.initial_password.clone());
        assert_eq!(once, twice, "{} run twice", step.name());
        rec = again;
        names.push(step.name());
    }
    let (held, devices, managed) = made(&f).await;
    assert_eq!((held.vms.len(), held.nics.len(), devices, managed), (1, 1, 1, 1), "one of each: {held:?}");
    assert!(held.vms.iter().all(|(_, running)| *running));
    assert_eq!(names.len(), STEPS.len(), "{names:?}");
}

#[tokio::test]
async fn test_a_failure_after_any_step_unwinds_everything_made_before() {
    let f = fixture().await;
    let network_only = |h: &Held| h.vms.is_empty() && h.files.is_empty() && h.nics.is_empty();
    for (k, last) in STEPS.iter().enumerate() {
        let mut rec = new_generation(&f.app).await;
        for i in 0..=k {
            run(&f, i, &mut rec).await;
        }
        f.app.undo_resources(&mut rec).await.unwrap_or_else(|e| panic!("undo after {}: {e}", last.name()));
        let (held, devices, managed) = made(&f).await;
        assert!(network_only(&held), "after {}: {held:?}", last.name());
        assert_eq!((devices, managed), (0, 0), "after {}", last.name());
        assert_eq!(rec.state.resources.host, None);
        // Undo is idempotent too.
        rec.state.resources.host = Some("local".into());
        f.app.undo_resources(&mut rec).await.unwrap();
    }
}

#[test]
fn test_step_names_are_unique_and_progress_moves_by_name() {
    let names: BTreeSet<&str> = STEPS.iter().map(|s| s.name()).collect();
    assert_eq!(names.len(), STEPS.len());
    let order: HashMap<&str, usize> = STEPS.iter().enumerate().map(|(i, s)| (s.name(), i)).collect();
    for s in STEPS.iter() {
        let next = super::steps::after(s.name());
        if next != super::steps::DONE {
            assert_eq!(order[next.as_str()], order[s.name()] + 1);
        }
    }
    assert_eq!(super::steps::after("assignUser"), super::steps::DONE);
}

/// A hibernated Cloud PC being moved off a draining host is not started on its old host (power
/// actions and console tickets are refused with the reason), and a new generation of a
/// hibernated Cloud PC (reprovision, evacuation) counts its RAM on its host again.
#[tokio::test]
async fn test_a_moving_cloud_pc_is_not_started_and_a_new_generation_is_not_left_hibernated() {
    use cloudpc_types::cloud_pc::{CloudPcStatus, PowerState, PowerStateDetail};
    use cloudpc_types::provisioning::Phase;
    let f = fixture().await;
    let actor = crate::audit::Actor::system();
    let mut rec = new_generation(&f.app).await;
    for i in 0..STEPS.len() {
        run(&f, i, &mut rec).await;
    }
    rec.pc.status = CloudPcStatus::Provisioned;
    rec.pc.power_state = PowerState::Running;
    rec.state.phase = Phase::Idle;
    f.app.store.save_cloud_pc(&mut rec, None, None, None).await.unwrap();
    f.app.store.release_workflow(rec.pc.id, f.app.replica()).await.unwrap();
    let id = rec.pc.id.to_string();
    let memory = rec.state.spec.as_ref().unwrap().memory_mib;
    let used = |app: &App| {
        let app = app.clone();
        async move { app.host_room("local").await.unwrap().1.memory_mib }
    };
    assert_eq!(used(&f.app).await, memory, "a running Cloud PC's RAM is counted");

    let pc = f.app.hibernate(&actor, &id).await.unwrap();
    assert_eq!(pc.power_state_detail, Some(PowerStateDetail::Saved));
    assert_eq!(used(&f.app).await, 0, "a hibernated one's is not");

    let mut rec = f.app.store.get_cloud_pc_record(rec.pc.id).await.unwrap();
    rec.state.moving_to = Some("other".into());
    f.app.store.save_cloud_pc(&mut rec, None, None, None).await.unwrap();
    for refused in [
        f.app.power_on(&actor, &id).await.map(|_| ()),
        f.app.resume(&actor, &id).await.map(|_| ()),
        f.app.reboot(&actor, &id).await.map(|_| ()),
        f.app.issue_console_ticket(&actor, &id).await.map(|_| ()),
    ] {
        let e = refused.expect_err("refused while moving");
        assert!(e.to_string().contains("moving to another host"), "{e}");
    }
    let domain = rec.state.resources.domain.clone().unwrap();
    assert_eq!(f.host.state(&domain).await.unwrap(), VmState::ShutOff, "the old VM stayed stopped");

    // A new generation (as reprovision and evacuation start one) builds a VM that runs.
    rec.state.moving_to = None;
    assert!(f.app.store.claim_workflow(rec.pc.id, f.app.replica(), std::time::Duration::from_secs(60)).await.unwrap());
    let policy = rec.pc.provisioning_policy_id.unwrap();
    f.app.start_generation(&mut rec, policy).await.unwrap();
    f.app.store.save_cloud_pc(&mut rec, None, None, None).await.unwrap();
    assert_eq!(rec.pc.power_state_detail, None);
    run(&f, 0, &mut rec).await;
    assert_eq!(rec.state.resources.host.as_deref(), Some("local"), "{} placed it", STEPS[0].name());
    assert_eq!(used(&f.app).await, memory, "the new generation's RAM is counted");
}

/// A warm-pool machine that fails outside its own workflow (an internal error here) leaves the
/// claimable set and gets a clean-up time, so the reconciler removes it rather than keeping a
/// failed machine in the pool's place for ever (nobody retries a machine without a user).
#[tokio::test]
async fn test_a_pool_machine_failed_by_an_internal_error_is_retired() {
    use cloudpc_types::cloud_pc::CloudPcStatus;
    use cloudpc_types::provisioning::{Phase, PoolMember};
    let f = fixture().await;
    let mut rec = new_generation(&f.app).await;
    let policy = rec.pc.provisioning_policy_id.unwrap();
    rec.state.user_id = rec.pc.id;
    rec.state.pool = Some(PoolMember { policy_id: policy, fingerprint: "f".into(), ready: true });
    rec.state.phase = Phase::Idle;
    rec.pc.status = CloudPcStatus::Pooled;
    f.app.store.save_cloud_pc(&mut rec, None, None, None).await.unwrap();
    assert!(rec.claimable_as().is_some());

    f.app.report_internal_error(rec.pc.id, Some(policy), "testing", "injected").await;
    let rec = f.app.store.get_cloud_pc_record(rec.pc.id).await.unwrap();
    assert_eq!(rec.pc.status, CloudPcStatus::Failed);
    assert_eq!(rec.claimable_as(), None);
    assert!(rec.state.cleanup_at.is_some(), "removed after the clean-up delay");
}
