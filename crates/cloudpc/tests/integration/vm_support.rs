//! Infrastructure for tests that boot real VMs: the tiny gallery image, a unique libvirt domain
//! prefix per server, one VM test at a time (two cores, TCG), and clean-up of every domain the
//! test's server made, even when the test fails.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

static VM_TURN: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();

/// How long one VM test may hold the turn; the longest takes about 5 minutes here.
const TURN_LIMIT: Duration = Duration::from_secs(20 * 60);

/// A VM test's turn; the test binary ends with a diagnosis if it is held for longer than
/// `TURN_LIMIT` (a hung VM test would otherwise hold every later one, and CI, until time ran out).
pub struct VmTurn {
    _guard: tokio::sync::MutexGuard<'static, ()>,
    /// Held (`flock`) for the turn: another test binary on the machine (a second run of the
    /// suite, a developer's single test) waits too, as the VMs, the test DC and the cores are
    /// the machine's, not the process's.
    _machine: std::fs::File,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    test: String,
    started: Instant,
}

impl Drop for VmTurn {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        // How long each VM test held the machine, for scripts/test.sh's summary: the VM tests,
        // one after another, are most of the suite's time.
        if let Ok(path) = std::env::var("CLOUDPC_TEST_TURN_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(f, "{:.1}\t{}", self.started.elapsed().as_secs_f64(), self.test);
            }
        }
    }
}

/// Waits for this test's turn to boot VMs.
pub async fn vm_turn() -> VmTurn {
    let guard = VM_TURN.get_or_init(|| tokio::sync::Mutex::new(())).lock().await;
    let machine = tokio::task::spawn_blocking(|| {
        let _ = std::fs::create_dir_all("/run/cloudpc-test");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/cloudpc-test/vm-turn.lock")
            .expect("open /run/cloudpc-test/vm-turn.lock");
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).expect("lock the machine's VM turn");
        file
    })
    .await
    .unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let test = std::thread::current().name().unwrap_or("a VM test").to_string();
    let watched = done.clone();
    let watched_test = test.clone();
    std::thread::spawn(move || {
        let test = watched_test;
        let started = Instant::now();
        while started.elapsed() < TURN_LIMIT {
            if watched.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        hung(&format!("{test} has held the VM turn for more than {} minutes", TURN_LIMIT.as_secs() / 60));
    });
    VmTurn { _guard: guard, _machine: machine, done, test, started: Instant::now() }
}

/// The gallery that scripts/test.sh builds the tiny image into.
pub fn gallery() -> PathBuf {
    let dir =
        PathBuf::from(std::env::var("CLOUDPC_TEST_GALLERY").unwrap_or_else(|_| "/var/lib/cloudpc/gallery".into()));
    let has_image = std::fs::read_dir(&dir)
        .map(|mut d| d.any(|e| e.map(|e| e.path().join("manifest.json").exists()).unwrap_or(false)))
        .unwrap_or(false);
    assert!(
        has_image,
        "no gallery image in {}: run scripts/test.sh, which builds the tiny test image and sets up libvirt",
        dir.display()
    );
    dir
}

/// The newest build directory of an image (`<offer>-<version>`) in the test gallery.
pub fn newest_build(offer: &str) -> Option<PathBuf> {
    let mut builds: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(gallery())
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{offer}-")))
                && p.join("manifest.json").exists()
        })
        .filter_map(|p| Some((std::fs::metadata(p.join("manifest.json")).ok()?.modified().ok()?, p)))
        .collect();
    builds.sort();
    builds.pop().map(|(_, p)| p)
}

/// Runs virsh and returns its standard output. A virsh that gets no answer from libvirtd in
/// 120 s is stopped, and says so, so that a stuck daemon fails the test rather than hanging it.
pub fn virsh(args: &[&str]) -> String {
    let out =
        Command::new("timeout").args(["120", "virsh", "-c", "qemu:///system"]).args(args).output().expect("virsh");
    if out.status.code() == Some(124) {
        eprintln!("virsh {args:?} got no answer from libvirtd within 120 s");
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn domains(prefix: &str) -> Vec<String> {
    virsh(&["list", "--all", "--name"])
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Removes every domain with the prefix (the test's own), whatever state the test left.
pub struct DomainSweeper(pub String);

impl Drop for DomainSweeper {
    fn drop(&mut self) {
        for d in domains(&self.0) {
            virsh(&["destroy", &d]);
            virsh(&["undefine", "--managed-save", &d]);
        }
    }
}

pub struct VmServer {
    pub s: Server,
    pub prefix: String,
    pub extra: Vec<String>,
    _sweeper: DomainSweeper,
}

impl std::ops::Deref for VmServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.s
    }
}

pub fn vm_args(prefix: &str, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "--gallery-dir".to_string(),
        gallery().to_string_lossy().into_owned(),
        "--domain-prefix".into(),
        prefix.to_string(),
        "--resync-secs".into(),
        "1".into(),
    ];
    args.extend(extra.iter().cloned());
    args
}

impl VmServer {
    pub async fn start(extra: &[&str]) -> VmServer {
        Self::start_in(tempfile::tempdir().expect("temp dir"), extra).await
    }

    /// On a data directory the test prepared (a small file system of its own, say).
    pub async fn start_in(data: tempfile::TempDir, extra: &[&str]) -> VmServer {
        let prefix = format!("cpct{}-", &uuid_like()[..6]);
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let args = vm_args(&prefix, &extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let s = Server::start_in(data, &refs, Some(ADMIN_TOKEN)).await;
        VmServer { s, _sweeper: DomainSweeper(prefix.clone()), prefix, extra }
    }

    /// Kills the server with SIGKILL and starts it again on the same data.
    pub async fn crash_and_restart(self) -> VmServer {
        let VmServer { s, prefix, extra, _sweeper } = self;
        let data = s.stop();
        let args = vm_args(&prefix, &extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let s = Server::start_in(data, &refs, Some(ADMIN_TOKEN)).await;
        VmServer { s, prefix, extra, _sweeper }
    }

    pub fn domains(&self) -> Vec<String> {
        domains(&self.prefix)
    }

    /// The tiny image (the gallery may also hold the desktop image and older builds).
    pub async fn gallery_image_id(&self) -> String {
        self.gallery_image("tiny").await
    }

    /// The newest registered build of a gallery offer (`tiny`, `desktop`).
    pub async fn gallery_image(&self, offer: &str) -> String {
        let (_, v) = self.get(&format!("{VE}/galleryImages")).await;
        let newest = newest_build(offer).expect("a gallery image build of that offer");
        let sku = newest.file_name().unwrap().to_string_lossy().replace(&format!("{offer}-"), "");
        v["value"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["offerName"] == offer && i["skuName"].as_str().unwrap_or("").ends_with(&sku))
            .unwrap_or_else(|| panic!("gallery image {offer} {sku} is not registered: {v}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn tiny_policy(&self, name: &str, extra: Value) -> Value {
        let mut body = json!({"displayName": name, "imageId": self.gallery_image_id().await, "imageType": "gallery"});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            body[k] = v;
        }
        self.create(&format!("{VE}/provisioningPolicies"), body).await
    }

    pub async fn assign(&self, policy: &Value, groups: &[&Value]) {
        let body =
            json!({"assignments": groups.iter().map(|g| json!({"target": {"groupId": g["id"]}})).collect::<Vec<_>>()});
        let (status, v) =
            self.post(&format!("{VE}/provisioningPolicies/{}/assign", policy["id"].as_str().unwrap()), body).await;
        assert_eq!(status.as_u16(), 204, "{v}");
    }

    pub async fn tiny_sku(&self, part: &str, vcpus: u32, ram_gb: u32, storage_gb: u32) -> Value {
        self.create(
            "/v1.0/subscribedSkus",
            json!({"skuPartNumber": part, "prepaidUnits": {"enabled": 10}, "vCpuCount": vcpus, "ramInGB": ram_gb, "storageInGB": storage_gb}),
        )
        .await
    }

    pub async fn license(&self, user: &str, sku: &Value, add: bool) {
        let body = if add {
            json!({"addLicenses": [{"skuId": sku["skuId"]}], "removeLicenses": []})
        } else {
            json!({"addLicenses": [], "removeLicenses": [sku["skuId"]]})
        };
        let (status, v) = self.post(&format!("/v1.0/users/{user}/assignLicense"), body).await;
        assert_eq!(status.as_u16(), 200, "{v}");
    }

    pub async fn cloud_pcs(&self) -> Vec<Value> {
        let (_, v) = self.get(&format!("{VE}/cloudPCs")).await;
        v["value"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until there are `n` Cloud PCs and all are in one of `statuses`.
    pub async fn wait_all(&self, n: usize, statuses: &[&str], limit: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let pcs = self.cloud_pcs().await;
            if pcs.len() == n && pcs.iter().all(|p| statuses.contains(&p["status"].as_str().unwrap_or(""))) {
                return pcs;
            }
            if start.elapsed() > limit {
                panic!("waited {limit:?} for {n} Cloud PCs in {statuses:?}; have: {}", summary(&pcs));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn steps(&self, pc: &Value) -> Vec<Value> {
        let (_, v) =
            self.get(&format!("{VE}/cloudPCs/{}/provisioningSteps?$top=999", pc["id"].as_str().unwrap())).await;
        v["value"].as_array().cloned().unwrap_or_default()
    }

    pub async fn action(&self, pc: &Value, action: &str) -> (u16, Value) {
        let (s, v) = self
            .call(reqwest::Method::POST, &format!("{VE}/cloudPCs/{}/{action}", pc["id"].as_str().unwrap()), None)
            .await;
        (s.as_u16(), v)
    }

    pub fn disks(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.data_dir().join("disks"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// A settings file with one host of fixed, roomy capacity: Cloud PCs are not held back by what
/// the machine's disk has free (a large thin disk, a small data directory).
pub fn roomy_host_settings(dir: &std::path::Path) -> String {
    let path = dir.join("cloudpc.toml");
    std::fs::write(
        &path,
        "[[hosts]]\nname = \"local\"\nuri = \"qemu:///system\"\nregion = \"local\"\nvcpus = 8\nmemory_mib = 8192\ndisk_gib = 500\n",
    )
    .expect("write the settings file");
    path.to_string_lossy().into_owned()
}

pub fn summary(pcs: &[Value]) -> String {
    pcs.iter()
        .map(|p| format!("{} {} ({})", p["managedDeviceName"], p["status"], p["statusDetail"].as_str().unwrap_or("")))
        .collect::<Vec<_>>()
        .join("; ")
}

fn uuid_like() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Runs a guest-agent command against a domain through virsh.
pub fn agent(domain: &str, command: Value) -> Value {
    let out = virsh(&["qemu-agent-command", domain, &command.to_string()]);
    serde_json::from_str::<Value>(&out).map(|v| v["return"].clone()).unwrap_or(Value::Null)
}

/// The libvirt domain of a Cloud PC of the server whose domains start with `prefix`.
pub fn domain_of(pc: &Value, prefix: &str) -> String {
    format!("{prefix}{}", pc["managedDeviceName"].as_str().unwrap().to_ascii_lowercase())
}

/// A domain's NICs on hosted networks: (network, MAC), from its definition.
pub fn hosted_nics(domain: &str) -> Vec<(String, String)> {
    cloudpc_hypervisor::xml::network_nics(&virsh(&["dumpxml", "--inactive", domain]))
}

/// The address the hosted network reserves for a MAC (its `<host>` entry), if any.
pub fn reserved_ip(network: &str, mac: &str) -> Option<String> {
    cloudpc_hypervisor::dhcp::reservations(&virsh(&["net-dumpxml", network]))
        .into_iter()
        .find(|r| r.mac.eq_ignore_ascii_case(mac))
        .map(|r| r.ip.to_string())
}

/// The filter parameter `name` of a domain's NIC, as it runs (its live definition).
pub fn nic_filter_param(domain: &str, name: &str) -> Option<String> {
    let live = virsh(&["dumpxml", domain]);
    let needle = format!("<parameter name='{name}' value='");
    Some(live.split(&needle).nth(1)?.split('\'').next()?.to_string())
}

/// Runs a program in the guest and returns its standard output.
pub async fn guest_output(domain: &str, path: &str, args: &[&str]) -> String {
    let started = agent(
        domain,
        json!({"execute": "guest-exec", "arguments": {"path": path, "arg": args, "capture-output": true}}),
    );
    let pid = started["pid"].as_i64().expect("guest-exec started");
    // Generous: under TCG a busy desktop guest runs short scripts slowly.
    for _ in 0..600 {
        let st = agent(domain, json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}));
        if st["exited"] == true {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(st["out-data"].as_str().unwrap_or(""))
                .unwrap_or_default();
            return String::from_utf8_lossy(&bytes).into_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} did not finish in the guest");
}

/// Restarts libvirtd as a package upgrade does (SIGTERM, then a new daemon): the supervisor the
/// host setup runs it under (scripts/libvirtd-supervisor.sh) starts it again, in the same way
/// (on a TCG host with /dev/kvm, in a slave mount namespace where /dev/kvm is covered); without
/// one, it is started as setup starts it. QEMU processes live on. Returns once the new daemon
/// answers.
pub fn restart_libvirtd() -> Duration {
    let sh = |cmd: &str| std::process::Command::new("sh").arg("-c").arg(cmd).status().is_ok_and(|s| s.success());
    let started = Instant::now();
    let supervised = sh("pgrep -f cloudpc-libvirtd-supervisor >/dev/null");
    let old = std::process::Command::new("pgrep").args(["-xo", "libvirtd"]).output().ok();
    let old = old.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    sh("pkill -x libvirtd");
    // A daemon busy with many guests takes a while to stop; past 30 s it is killed.
    for i in 0..300 {
        if old.is_empty() || !std::path::Path::new(&format!("/proc/{old}")).exists() {
            break;
        }
        if i == 299 {
            sh(&format!("kill -9 {old}"));
            std::thread::sleep(Duration::from_millis(500));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !supervised {
        let hide = std::path::Path::new("/dev/kvm").exists()
            && std::fs::read_to_string("/run/cloudpc/accelerator").is_ok_and(|a| a.trim() == "tcg");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let ok = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(". scripts/lib.sh && start_libvirtd {}", if hide { "yes" } else { "no" }))
            .current_dir(root)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "libvirtd did not start again");
    }
    for _ in 0..300 {
        if sh("virsh -c qemu:///system version >/dev/null 2>&1") {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("libvirtd did not answer after its restart (see /var/log/libvirt/libvirtd.log)");
}

/// The built portal and its npm packages (scripts/test.sh builds them).
pub fn web_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");
    assert!(
        dir.join("dist/index.html").exists() && dir.join("node_modules/playwright-core").exists(),
        "run scripts/test.sh: it builds web/ with npm"
    );
    dir
}

/// Runs one of web/tests/*.mjs in headless Chromium with `env`, saving a screenshot under
/// target/test-artifacts/; fails the test with the script's output if it fails.
pub async fn browser_test(script: &str, env: &[(&str, &str)], screenshot: &str) -> String {
    let web = web_dir();
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts").join(screenshot);
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(web.join("tests").join(script)).env("SCREENSHOT", &shot).current_dir(&web);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("node");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(out.status.success(), "browser test {script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000, "screenshot saved");
    stdout
}
