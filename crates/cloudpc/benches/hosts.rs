//! Scale-out benchmark: `BENCH_HOSTS` (50) simulated hosts and `BENCH_CLOUD_PCS` (10,000) Cloud
//! PCs provisioned end to end through the real control plane and real host agents; prints
//! numbers, asserts nothing.
//!
//! The agents are real `cloudpc host-agent` processes joined with tokens and reached over mutual
//! TLS; they run `--simulate` (no VMs: each operation answers at once, after
//! `BENCH_LATENCY_MS`), so what is measured is the control plane: placement, the provisioning
//! workflow with its database writes, every agent call, the monitor. Users and the group are
//! written to the store before the server starts; the license goes to the group in one call, and
//! the clock runs from that call until the last Cloud PC is `provisioned`.
//!
//! Runs: SQLite with one control plane, and PostgreSQL with two replicas (when
//! `CLOUDPC_TEST_DATABASE_URL` is set). Reports Cloud PCs per second, time to the last one, and the
//! control plane's CPU time and peak memory.
//!
//! Run: `cargo bench --bench hosts` (set `CLOUDPC_TEST_DATABASE_URL` for the PostgreSQL run;
//! `BENCH_PARTS=sqlite` or `postgresql` picks one).
#![allow(dead_code)]

#[path = "../tests/integration/support.rs"]
mod support;

#[path = "common/mod.rs"]
mod common;

use common::{audit, env_usize, part};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use cloudpc_store::{SqliteStore, Store};

use support::*;

/// CPU seconds (user + system) and peak resident memory (MiB) of a process.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, hwm / 1024.0)
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(
    server: &Server,
    token: &str,
    n: usize,
    dir: &std::path::Path,
    latency: usize,
    per_host: usize,
) -> Agent {
    let dir = dir.join(format!("agent-{n}"));
    let mut child = Command::new(bin())
        .args(["host-agent", "--simulate", "--listen", "127.0.0.1:0", "--domain-prefix", "bench-"])
        .arg("--data-dir")
        .arg(&dir)
        .args(["--join", &server.url, "--token", token, "--name", &format!("sim-{n:03}")])
        .args(["--simulate-latency-ms", &latency.to_string()])
        .args(["--vcpus", &(per_host * 2).to_string(), "--memory-mib", &(per_host * 2048).to_string()])
        .args(["--disk-gib", &(per_host * 8).to_string()])
        .env("CLOUDPC_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start an agent");
    let out = BufReader::new(child.stdout.take().unwrap());
    for line in out.lines().map_while(Result::ok) {
        if line.starts_with("cloudpc host agent") {
            return Agent(child);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("agent {n} did not start");
}

/// Writes `n` users and one group holding them straight into the store, before the server runs.
async fn seed(store: &Arc<dyn Store>, n: usize) -> Uuid {
    let group = cloudpc_types::directory::Group {
        row_version: 0,
        id: Uuid::new_v4(),
        display_name: "bench".into(),
        description: None,
        mail_nickname: Some("bench".into()),
        security_enabled: true,
        mail_enabled: false,
        created_date_time: Utc::now(),
        identity_provider_id: None,
        external_id: None,
    };
    store.create_group(&group, &audit("Add group")).await.unwrap();
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    let mut set = tokio::task::JoinSet::new();
    for chunk in ids.chunks(n.div_ceil(8).max(1)) {
        let (store, chunk, gid) = (store.clone(), chunk.to_vec(), group.id);
        set.spawn(async move {
            for id in chunk {
                let upn = format!("u{}@contoso.com", id.simple());
                let user: cloudpc_types::directory::User = serde_json::from_value(json!({
                    "id": id, "userPrincipalName": upn, "displayName": upn, "mailNickname": format!("u{}", &id.simple().to_string()[..8]),
                    "accountEnabled": true, "createdDateTime": Utc::now()
                }))
                .unwrap();
                store.create_user(&user, None, &audit("Add user")).await.unwrap();
                store.add_member(gid, id, &audit("Add member")).await.unwrap();
            }
        });
    }
    while set.join_next().await.is_some() {}
    group.id
}

async fn run(label: &str, database: Option<String>, replicas: usize) {
    let hosts = env_usize("BENCH_HOSTS", 50);
    let pcs = env_usize("BENCH_CLOUD_PCS", 10_000);
    let latency = env_usize("BENCH_LATENCY_MS", 0);
    let parallel = env_usize("BENCH_PARALLEL", 64);
    let data = tempfile::tempdir().unwrap();
    if let Some(url) = &database {
        std::fs::write(data.path().join(".test-database-url"), url).unwrap();
    }
    // Seed the directory into the database the servers will open.
    let store: Arc<dyn Store> = match &database {
        Some(url) => Arc::new(cloudpc_store::PgStore::connect(url).await.unwrap()),
        None => Arc::new(SqliteStore::open(&data.path().join("cloudpc.db")).await.unwrap()),
    };
    let seeding = Instant::now();
    let group = seed(&store, pcs).await;
    println!("[{label}] seeded {pcs} users in one group in {:.1} s", seeding.elapsed().as_secs_f64());
    drop(store);
    let parallel_arg = parallel.to_string();
    let gallery = std::env::var("CLOUDPC_TEST_GALLERY").unwrap_or_else(|_| "/var/lib/cloudpc/gallery".into());
    let flags = [
        "--no-local-host",
        "--max-parallel-provisioning",
        parallel_arg.as_str(),
        "--resync-secs",
        "5",
        "--gallery-dir",
        gallery.as_str(),
    ];
    let s = Server::start_in(data, &flags, Some(ADMIN_TOKEN)).await;
    let mut others = Vec::new();
    for _ in 1..replicas {
        others.push(s.start_replica(&flags).await);
    }
    let agents_dir = tempfile::tempdir().unwrap();
    let per_host = pcs.div_ceil(hosts) + 2;
    let joining = Instant::now();
    let mut agents = Vec::new();
    for n in 0..hosts {
        let t = s.create("/cloudpc/hosts/joinTokens", json!({"region": "bench"})).await;
        agents.push(start_agent(&s, t["token"].as_str().unwrap(), n, agents_dir.path(), latency, per_host));
    }
    println!("[{label}] {hosts} simulated hosts joined in {:.1} s", joining.elapsed().as_secs_f64());
    let sku = s
        .create(
            "/v1.0/subscribedSkus",
            json!({"skuPartNumber": "BENCH", "prepaidUnits": {"enabled": pcs}, "vCpuCount": 2, "ramInGB": 2, "storageInGB": 8}),
        )
        .await;
    let (_, images) = s.get(&format!("{VE}/galleryImages")).await;
    let image =
        images["value"][0]["id"].as_str().expect("a gallery image (scripts/test.sh builds the tiny one)").to_string();
    let policy = s
        .create(
            &format!("{VE}/provisioningPolicies"),
            json!({"displayName": "bench", "imageId": image, "imageType": "gallery",
                   "domainJoinConfigurations": [{"domainJoinType": "azureADJoin", "regionName": "bench"}]}),
        )
        .await;
    let (st, v) = s
        .post(
            &format!("{VE}/provisioningPolicies/{}/assign", policy["id"].as_str().unwrap()),
            json!({"assignments": [{"target": {"groupId": group}}]}),
        )
        .await;
    assert_eq!(st.as_u16(), 204, "{v}");
    let (cpu0, _) = usage(s.pid());
    let others_cpu0: f64 = others.iter().map(|o| usage(o.pid()).0).sum();
    let started = Instant::now();
    let (st, v) = s
        .post(
            &format!("/v1.0/groups/{group}/assignLicense"),
            json!({"addLicenses": [{"skuId": sku["skuId"]}], "removeLicenses": []}),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    let mut last_report = Instant::now();
    let mut first_done: Option<Duration> = None;
    loop {
        let (_, v) = s.get(&format!("{VE}/cloudPCs?$filter=status eq 'provisioned'&$count=true&$top=1")).await;
        let done = v["@odata.count"].as_u64().unwrap_or(0) as usize;
        if done > 0 && first_done.is_none() {
            first_done = Some(started.elapsed());
        }
        if done >= pcs {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            println!("[{label}]   {done}/{pcs} provisioned after {:.0} s", started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        if started.elapsed() > Duration::from_secs(3600) {
            println!("[{label}] gave up after an hour with {done}/{pcs} provisioned");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let took = started.elapsed();
    let (cpu1, rss) = usage(s.pid());
    let mut cpu = cpu1 - cpu0;
    let mut peak = rss;
    let others_cpu1: f64 = others.iter().map(|o| usage(o.pid()).0).sum();
    cpu += others_cpu1 - others_cpu0;
    for o in &others {
        peak = peak.max(usage(o.pid()).1);
    }
    let (_, hv) = s.get("/cloudpc/hosts").await;
    let counts: Vec<u64> =
        hv["value"].as_array().unwrap().iter().map(|h| h["cloudPcCount"].as_u64().unwrap_or(0)).collect();
    println!(
        "[{label}] {pcs} Cloud PCs on {hosts} hosts, {replicas} control plane(s): first provisioned after {:.1} s, last after \
         {:.1} s = {:.1} Cloud PCs/s; control-plane CPU {:.0} s ({:.0}% of one core), peak memory {:.0} MiB per process; \
         Cloud PCs per host {}..{}",
        first_done.unwrap_or_default().as_secs_f64(),
        took.as_secs_f64(),
        pcs as f64 / took.as_secs_f64(),
        cpu,
        cpu / took.as_secs_f64() * 100.0,
        peak,
        counts.iter().min().unwrap_or(&0),
        counts.iter().max().unwrap_or(&0),
    );
    drop(agents);
}

#[tokio::main]
async fn main() {
    if part("sqlite") {
        run("sqlite", None, 1).await;
    }
    if part("postgresql") {
        if let Ok(admin) = std::env::var("CLOUDPC_TEST_DATABASE_URL") {
            let dir = tempfile::tempdir().unwrap();
            let url = fresh_pg_database(&dir.path().join("url"));
            let _ = admin;
            run("postgresql, 2 replicas", Some(url), 2).await;
        } else {
            println!("[postgresql] skipped: set CLOUDPC_TEST_DATABASE_URL");
        }
    }
}
