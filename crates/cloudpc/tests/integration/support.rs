//! Test infrastructure: a real server process per test, and a small JSON client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

pub const ADMIN_TOKEN: &str = "cpc_integration-test-administrator-token-0123456789";
pub const VE: &str = "/v1.0/deviceManagement/virtualEndpoint";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cloudpc")
}

/// A running `cloudpc server` with its own data directory; killed when dropped.
pub struct Server {
    child: Child,
    pub url: String,
    pub data: tempfile::TempDir,
    /// Lines the server printed to stdout before it was ready.
    pub banner: Vec<String>,
    http: reqwest::Client,
    /// Prefix of the libvirt domains this server may create; swept at drop unless `stop` hands the
    /// data on to a restarted server.
    pub prefix: String,
    sweep: bool,
    /// The PostgreSQL database, when the suite runs on PostgreSQL.
    database: Option<String>,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(&[], Some(ADMIN_TOKEN)).await
    }

    /// Starts the server with extra flags; `admin_token` goes in through the environment.
    pub async fn start_with(extra: &[&str], admin_token: Option<&str>) -> Server {
        let data = tempfile::tempdir().expect("temp dir");
        Self::start_in(data, extra, admin_token).await
    }

    pub async fn start_in(data: tempfile::TempDir, extra: &[&str], admin_token: Option<&str>) -> Server {
        // QEMU runs as libvirt-qemu and must reach disks kept under the data directory.
        std::fs::set_permissions(data.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod data dir");
        // Every server gets its own domain prefix, so whatever VMs it starts are swept at drop.
        let prefix = match extra.iter().position(|a| *a == "--domain-prefix") {
            Some(i) => extra[i + 1].to_string(),
            None => format!("cpct{}-", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        };
        let database = test_database(data.path());
        let (child, url, banner) = spawn_server(data.path(), &prefix, database.as_deref(), extra, admin_token).await;
        Server { child, url, data, banner, http: test_client(), prefix, sweep: true, database }
    }

    /// Another replica on this server's database and data directory (PostgreSQL only). It does
    /// not sweep VMs when dropped; the first server does.
    pub async fn start_replica(&self, extra: &[&str]) -> Server {
        let database = self.database.clone().expect("replicas need PostgreSQL (CLOUDPC_TEST_BACKEND=postgresql)");
        let (child, url, banner) =
            spawn_server(self.data.path(), &self.prefix, Some(&database), extra, Some(ADMIN_TOKEN)).await;
        let data = tempfile::tempdir().expect("temp dir");
        Server {
            child,
            url,
            data,
            banner,
            http: test_client(),
            prefix: self.prefix.clone(),
            sweep: false,
            database: Some(database),
        }
    }

    /// Kills the process at once (SIGKILL), as a machine loss would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The PostgreSQL database this server uses (`None`: SQLite in its data directory).
    pub fn database_url(&self) -> Option<&str> {
        self.database.as_deref()
    }

    /// A server whose only host offers 1 vCPU and 1 GiB: a bigger Cloud PC waits there for
    /// capacity with its spec stored, and no VM is made.
    pub async fn start_on_small_host(extra: &[&str]) -> Server {
        let data = tempfile::tempdir().expect("temp dir");
        let config = data.path().join("cloudpc.toml");
        std::fs::write(
            &config,
            "[[hosts]]\nname = \"small\"\nuri = \"qemu:///system\"\nregion = \"local\"\nvcpus = 1\nmemory_mib = 1024\ndisk_gib = 10\n",
        )
        .expect("write the settings file");
        let mut args = vec!["--config", config.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Self::start_in(data, &args, Some(ADMIN_TOKEN)).await
    }

    /// The server's process id (the gateway benchmark reads its memory).
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Stops the server and hands back its data directory, for restart tests.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.sweep = false;
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.data, dir)
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        content_type: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let v = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        (status, v)
    }

    pub async fn call_as(&self, token: &str, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let body = body.map(|b| b.to_string());
        let ct = body.as_ref().map(|_| "application/json");
        self.raw(method, path, Some(token), body.as_deref(), ct).await
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(ADMIN_TOKEN, method, path, body).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, None).await
    }

    /// Posts and expects 201, returning the created resource.
    pub async fn create(&self, path: &str, body: Value) -> Value {
        let (s, v) = self.post(path, body).await;
        assert_eq!(s, StatusCode::CREATED, "POST {path}: {v}");
        v
    }

    pub async fn user(&self, upn: &str) -> Value {
        self.create("/v1.0/users", json!({ "userPrincipalName": upn, "displayName": upn })).await
    }

    pub async fn group(&self, name: &str) -> Value {
        self.create("/v1.0/groups", json!({ "displayName": name })).await
    }

    pub async fn sku(&self, part: &str, seats: u32) -> Value {
        self.create(
            "/v1.0/subscribedSkus",
            json!({ "skuPartNumber": part, "prepaidUnits": { "enabled": seats }, "vCpuCount": 2, "ramInGB": 4, "storageInGB": 8 }),
        )
        .await
    }

    pub async fn add_member(&self, group: &Value, user: &Value) -> (StatusCode, Value) {
        let body = json!({ "@odata.id": format!("https://graph.microsoft.com/v1.0/directoryObjects/{}", user["id"].as_str().unwrap()) });
        self.post(&format!("/v1.0/groups/{}/members/$ref", group["id"].as_str().unwrap()), body).await
    }

    /// A new user in a new group that `policy` is assigned to (no license yet).
    pub async fn user_targeted_by(&self, policy: &Value, upn: &str) -> Value {
        let group = self.group(&format!("Group of {upn}")).await;
        let user = self.user(upn).await;
        self.add_member(&group, &user).await;
        let (status, v) = self
            .post(
                &format!("{VE}/provisioningPolicies/{}/assign", policy["id"].as_str().unwrap()),
                json!({"assignments": [{"target": {"groupId": group["id"]}}]}),
            )
            .await;
        assert!(status.is_success(), "{v}");
        user
    }

    /// On a server from [`Server::start_on_small_host`]: licenses a new user targeted by `policy`
    /// and returns their Cloud PC, waiting for capacity with its spec (image, version) stored.
    pub async fn waiting_cloud_pc(&self, policy: &Value) -> Value {
        let upn = "waiting@contoso.com";
        self.user_targeted_by(policy, upn).await;
        let sku = self.sku("TWO_VCPU", 1).await;
        let body = json!({"addLicenses": [{"skuId": sku["skuId"]}], "removeLicenses": []});
        let (status, v) = self.post(&format!("/v1.0/users/{upn}/assignLicense"), body).await;
        assert!(status.is_success(), "{v}");
        let pc = self.wait_first_cloud_pc("pendingProvision").await;
        assert_eq!(pc["status"], "pendingProvision", "{pc}");
        pc
    }

    /// Waits up to 30 s for the first Cloud PC to reach `status`; returns it as last seen.
    pub async fn wait_first_cloud_pc(&self, status: &str) -> Value {
        let mut pc = Value::Null;
        for _ in 0..600 {
            let (_, v) = self.get(&format!("{VE}/cloudPCs")).await;
            pc = v["value"][0].clone();
            if pc["status"] == status {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pc
    }

    /// Registers a qcow2 file as a custom image and waits until its check is over.
    pub async fn image(&self, name: &str, file: &Path) -> Value {
        let created = self
            .create(
                &format!("{VE}/deviceImages"),
                json!({ "displayName": name, "version": "1.0.0", "sourceImageResourceId": file }),
            )
            .await;
        self.wait_image(created["id"].as_str().unwrap()).await
    }

    pub async fn wait_image(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let (s, v) = self.get(&format!("{VE}/deviceImages/{id}")).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            if v["status"] != "pending" {
                return v;
            }
            assert!(Instant::now() < deadline, "image {id} stayed pending");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until no version of the image is being checked; returns the image.
    pub async fn wait_checks(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let (s, v) = self.get(&format!("{VE}/deviceImages/{id}")).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            if v["versions"].as_array().is_some_and(|vs| vs.iter().all(|e| e["status"] != "pending")) {
                return v;
            }
            assert!(Instant::now() < deadline, "image {id} kept a pending version: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A ready custom image backed by a fresh small qcow2 file.
    pub async fn ready_image(&self, name: &str) -> Value {
        let file = qcow2(self.data_dir(), &format!("{name}.qcow2"), "64M");
        let image = self.image(name, &file).await;
        assert_eq!(image["status"], "ready", "{image}");
        image
    }

    pub async fn policy(&self, name: &str, image: &Value) -> Value {
        self.create(
            &format!("{VE}/provisioningPolicies"),
            json!({ "displayName": name, "imageId": image["id"], "imageType": "custom", "cloudPcNamingTemplate": "CPC-%RAND:5%" }),
        )
        .await
    }

    pub async fn audit_activities(&self) -> Vec<String> {
        let (_, v) = self.get(&format!("{VE}/auditEvents?$top=999")).await;
        v["value"].as_array().unwrap().iter().map(|e| e["activity"].as_str().unwrap().to_string()).collect()
    }

    /// Every table's row count, to prove a refused request changed nothing.
    pub async fn snapshot(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for path in [
            "/v1.0/users",
            "/v1.0/groups",
            "/v1.0/subscribedSkus",
            &format!("{VE}/deviceImages"),
            &format!("{VE}/provisioningPolicies"),
        ] {
            let (s, v) = self.get(&format!("{path}?$top=999")).await;
            assert_eq!(s, StatusCode::OK);
            out.push(v["value"].as_array().unwrap().len());
        }
        out.push(self.admin_audit_count().await);
        out
    }

    /// Audit events of changes people made (cloudpc's own background work is left out, since the
    /// reconciler may act at any moment).
    pub async fn admin_audit_count(&self) -> usize {
        let (_, v) = self.get(&format!("{VE}/auditEvents?$top=999&$filter=actor/type eq 'itPro'")).await;
        v["value"].as_array().unwrap().len()
    }

    /// Creates a reader token through the API.
    pub async fn reader_token(&self) -> String {
        let v = self.create("/cloudpc/tokens", json!({ "displayName": "auditor", "role": "cloudPcReader" })).await;
        v["secret"].as_str().unwrap().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.sweep {
            return;
        }
        // API tests can start provisioning too (a licensed user in a targeted group): leave no VM.
        // Time-limited, so a libvirtd that stopped answering fails the run rather than hangs it.
        let virsh =
            |args: &[&str]| Command::new("timeout").args(["120", "virsh", "-c", "qemu:///system"]).args(args).output();
        if let Ok(out) = virsh(&["list", "--all", "--name"]) {
            for d in String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|n| n.starts_with(&self.prefix))
            {
                let _ = virsh(&["destroy", d]);
                let _ = virsh(&["undefine", d]);
            }
        }
    }
}

/// Whether this run of the suite uses PostgreSQL (`CLOUDPC_TEST_BACKEND=postgresql`, set by
/// `scripts/test.sh` for its second pass) instead of each server's own SQLite file.
pub fn on_postgres() -> bool {
    std::env::var("CLOUDPC_TEST_BACKEND").is_ok_and(|b| b == "postgresql")
}

/// The database URL for a server using `data`: on PostgreSQL, a fresh database per data directory
/// (its URL is kept there, so a server restarted on the same data finds the same database). A
/// test that needs PostgreSQL in either pass writes the file itself ([`postgres_data_dir`]).
pub fn test_database(data: &Path) -> Option<String> {
    let kept = data.join(".test-database-url");
    if let Ok(url) = std::fs::read_to_string(&kept) {
        return Some(url);
    }
    on_postgres().then(|| fresh_pg_database(&kept))
}

/// A data directory whose servers use a fresh PostgreSQL database, whichever pass this is.
pub fn postgres_data_dir() -> tempfile::TempDir {
    let data = tempfile::tempdir().expect("temp dir");
    fresh_pg_database(&data.path().join(".test-database-url"));
    data
}

/// Creates an empty database on the test PostgreSQL server and writes its URL to `kept`.
pub fn fresh_pg_database(kept: &Path) -> String {
    let admin = std::env::var("CLOUDPC_TEST_DATABASE_URL").expect(
        "CLOUDPC_TEST_DATABASE_URL must name a PostgreSQL role that may create databases (scripts/test.sh sets it)",
    );
    let name = format!("cloudpc_test_{}", uuid::Uuid::new_v4().simple());
    let out = Command::new("psql")
        .args([admin.as_str(), "-v", "ON_ERROR_STOP=1", "-qc", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("psql is installed (scripts/test.sh installs PostgreSQL)");
    assert!(out.status.success(), "create test database: {}", String::from_utf8_lossy(&out.stderr));
    let (base, _) = admin.rsplit_once('/').expect("database URL ends in /<database>");
    let url = format!("{base}/{name}");
    std::fs::write(kept, &url).expect("keep the test database URL");
    url
}

/// The HTTP client of a test server: a request that gets no answer fails the test after a
/// while instead of holding up the whole suite (CI once ran out of time on a hung test).
fn test_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(240)).build().expect("HTTP client")
}

/// How long one run of the integration binary may take before the watchdog ends it
/// (`CLOUDPC_TEST_SUITE_LIMIT_SECS` overrides it, to see the watchdog work).
fn suite_limit() -> Duration {
    let secs = std::env::var("CLOUDPC_TEST_SUITE_LIMIT_SECS").ok().and_then(|s| s.parse().ok());
    Duration::from_secs(secs.unwrap_or(40 * 60))
}

/// Ends the test binary, with what was running, once it has run for longer than `suite_limit()`:
/// a test that hangs (on a call with no time limit of its own) then fails the suite with a
/// diagnosis, well within CI's time, instead of running out CI's clock with no output.
pub fn start_watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| {
            let limit = suite_limit();
            std::thread::sleep(limit);
            hung(&format!("the integration tests have run for more than {} s", limit.as_secs()));
        });
    });
}

/// Prints what may explain a hang (processes, VMs), kills the servers, agents and browsers this
/// binary started (they would otherwise hold the output pipe open, and the CI job with it), and
/// ends the test binary with a failure. Written straight to stderr: the test harness captures
/// `eprintln!` from threads a test spawned.
pub fn hung(why: &str) -> ! {
    use std::io::Write;
    let mut err = std::io::stderr();
    let _ = writeln!(err, "\n=== WATCHDOG: {why}; ending the test run. What was running:");
    for cmd in [
        "ps -eo pid,ppid,etime,stat,args --sort=start_time | grep -E 'cloudpc|qemu|virsh|node|chromium' | grep -v grep",
        "timeout 20 virsh -c qemu:///system list --all",
        "tail -n 5 /var/log/libvirt/cloudpc-supervisor.log",
        "tail -n 30 /var/log/libvirt/libvirtd.log",
        "for t in /proc/$(pgrep -xo libvirtd)/task/*; do echo \"$(cat $t/comm) $(cat $t/wchan)\"; done",
    ] {
        if let Ok(out) = Command::new("sh").arg("-c").arg(cmd).output() {
            let _ = writeln!(
                err,
                "$ {cmd}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    for pid in descendants(std::process::id()) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    std::process::exit(101)
}

/// Every process below `root`, from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // The command name may hold spaces; the fields after its closing parenthesis do not.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// Starts `cloudpc server` on `data` and waits until it listens.
async fn spawn_server(
    data: &Path,
    prefix: &str,
    database: Option<&str>,
    extra: &[&str],
    admin_token: Option<&str>,
) -> (Child, String, Vec<String>) {
    start_watchdog();
    let mut cmd = Command::new(bin());
    cmd.args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(extra)
        .env_remove("CLOUDPC_ADMIN_TOKEN")
        .env_remove("CLOUDPC_CONFIG")
        .env_remove("CLOUDPC_DATABASE_URL")
        .env("CLOUDPC_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if !extra.contains(&"--domain-prefix") {
        cmd.args(["--domain-prefix", prefix]);
    }
    if let Some(url) = database {
        cmd.args(["--database-url", url]);
    }
    // Blank qcow2 files stand in for images in tests of other features and cannot boot, so
    // the test boot is skipped unless a test sets its timeout (the image-import tests do).
    if !extra.contains(&"--image-boot-timeout-secs") {
        cmd.arg("--skip-image-test-boot");
    }
    // Tests make their image files in the data directory; some add more import directories.
    cmd.arg("--image-import-dir").arg(data);
    if let Some(t) = admin_token {
        cmd.env("CLOUDPC_ADMIN_TOKEN", t);
    }
    let mut child = cmd.spawn().expect("start cloudpc server");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut banner = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("cloudpc listening on ") {
                    break rest.trim().to_string();
                }
                banner.push(line);
            }
            Err(_) => panic!("server did not start; printed: {banner:?}"),
        }
    };
    (child, url, banner)
}

/// Runs qemu-img, panicking with its output on failure.
pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed (scripts/setup installs qemu-utils)");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn qcow2(dir: &Path, name: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), size]);
    path
}

/// The error message of a Graph error body.
pub fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or_else(|| panic!("not a Graph error: {v}"))
}

/// Every file under a directory, recursively.
pub fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}
