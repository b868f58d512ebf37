//! Control-plane benchmark, SQLite and PostgreSQL side by side; prints numbers, asserts nothing.
//!
//! - Reconcile: `BENCH_USERS` users (100,000), 5,000 groups, 200 policies each assigned to 25
//!   groups, one SKU. No hypervisor host, so nothing boots: Cloud PCs wait for capacity. Reports a
//!   full pass (read the world, plan, act), the read and the plan alone, and one membership change
//!   until its Cloud PC is stored.
//! - Bulk: `BENCH_BULK` users (10,000) in a targeted group get the SKU in one group assignment:
//!   time until every Cloud PC is stored and `pendingProvision`.
//! - API: 64 clients for `BENCH_API_SECS` (60) s of mixed reads and writes (80/20) against real
//!   server processes: SQLite, PostgreSQL with one replica, PostgreSQL with two (requests
//!   alternate between them, as behind a load balancer): throughput, p50/p99, errors.
//!
//! Run: `CLOUDPC_TEST_DATABASE_URL=postgres://cloudpc:cloudpc@127.0.0.1:5432/cloudpc cargo bench
//! --bench control_plane` (`scripts/test.sh` sets up PostgreSQL; `ensure_postgres` in
//! `scripts/lib.sh` prints the URL). `BENCH_PARTS=reconcile,api` picks parts.
#![allow(dead_code)]

#[path = "../tests/integration/support.rs"]
mod support;

#[path = "common/mod.rs"]
mod common;

use common::{audit, env_usize, part};

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use cloudpc_control::{App, AppConfig};
use cloudpc_store::{PgStore, SqliteStore, Store};
use cloudpc_types::cloud_pc::CloudPcStatus;

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Runs `f` over `items`, `width` at a time.
async fn parallel<T, F, Fut>(items: Vec<T>, width: usize, f: F)
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(width));
    let mut set = tokio::task::JoinSet::new();
    for item in items {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let f = f.clone();
        set.spawn(async move {
            f(item).await;
            drop(permit);
        });
    }
    while set.join_next().await.is_some() {}
}

async fn open(backend: &str, dir: &std::path::Path) -> Arc<dyn Store> {
    match backend {
        "sqlite" => Arc::new(SqliteStore::open(&dir.join("cloudpc.db")).await.unwrap()),
        _ => {
            let url = support::fresh_pg_database(&dir.join(".test-database-url"));
            Arc::new(PgStore::connect(&url).await.unwrap())
        }
    }
}

fn user(n: usize) -> cloudpc_types::directory::User {
    serde_json::from_value(json!({
        "id": Uuid::new_v4(), "userPrincipalName": format!("u{n}@contoso.com"), "displayName": format!("User {n}"),
        "mail": null, "mailNickname": format!("u{n}"), "accountEnabled": true, "createdDateTime": Utc::now()
    }))
    .unwrap()
}

fn group(name: &str) -> cloudpc_types::directory::Group {
    serde_json::from_value(json!({
        "id": Uuid::new_v4(), "displayName": name, "description": null, "mailNickname": null,
        "securityEnabled": true, "mailEnabled": false, "createdDateTime": Utc::now()
    }))
    .unwrap()
}

async fn reconcile_bench(backend: &str) {
    let (users_n, bulk_n) = (env_usize("BENCH_USERS", 100_000), env_usize("BENCH_BULK", 10_000));
    let (groups_n, policies_n, per_policy) = (5_000usize, 200usize, 25usize);
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let width = if backend == "sqlite" { 1 } else { 8 };
    let started = Instant::now();
    // The directory: users, groups (user i in group i mod 5000), a gallery image, policies.
    let users: Vec<_> = (0..users_n).map(user).collect();
    let ids: Vec<Uuid> = users.iter().map(|u| u.id).collect();
    let s = store.clone();
    parallel(users, width, move |u| {
        let s = s.clone();
        async move { s.create_user(&u, None, &audit("Add user")).await.unwrap() }
    })
    .await;
    let groups: Vec<_> = (0..groups_n).map(|i| group(&format!("G{i}"))).collect();
    for g in &groups {
        store.create_group(g, &audit("Add group")).await.unwrap();
    }
    let memberships: Vec<(Uuid, Uuid)> = ids.iter().enumerate().map(|(i, u)| (groups[i % groups_n].id, *u)).collect();
    let s = store.clone();
    parallel(memberships, width, move |(g, u)| {
        let s = s.clone();
        async move { s.add_member(g, u, &audit("Add member")).await.unwrap() }
    })
    .await;
    let image: cloudpc_types::images::GalleryImage = serde_json::from_value(json!({
        "id": "bench", "displayName": "Bench", "publisherName": "cloudpc", "offerName": "bench", "skuName": "bench",
        "status": "supported", "sizeInGb": 1, "startDate": "2026-01-01", "endDate": "2030-01-01",
        "expirationDate": "2030-01-01"
    }))
    .unwrap();
    store.upsert_gallery_image(&image, std::path::Path::new("/nonexistent/bench.qcow2"), None).await.unwrap();
    let mut policy_ids = Vec::new();
    for p in 0..policies_n {
        let policy: cloudpc_types::policy::ProvisioningPolicy = serde_json::from_value(json!({
            "id": Uuid::new_v4(), "displayName": format!("Policy {p}"), "description": "", "imageId": "bench",
            "imageDisplayName": "Bench", "imageType": "gallery", "provisioningType": "dedicated",
            "cloudPcNamingTemplate": null, "domainJoinConfigurations": [], "enableSingleSignOn": false,
            "localAdminEnabled": false, "createdDateTime": Utc::now(), "lastModifiedDateTime": Utc::now(),
            "gracePeriodInHours": null, "timeZone": null, "windowsSetting": {"locale": "en-US"}, "managedBy": "windows365"
        }))
        .unwrap();
        store.create_policy(&policy, &audit("Add policy")).await.unwrap();
        let targets: Vec<Uuid> = (0..per_policy).map(|k| groups[(p * per_policy + k) % groups_n].id).collect();
        store.set_policy_assignments(policy.id, &targets, &audit("Assign")).await.unwrap();
        policy_ids.push(policy.id);
    }
    let sku: cloudpc_types::licensing::SubscribedSku = serde_json::from_value(json!({
        "id": Uuid::new_v4(), "skuId": Uuid::new_v4(), "skuPartNumber": "CPC_BENCH", "displayName": "Bench",
        "appliesTo": "User", "capabilityStatus": "Enabled", "consumedUnits": 0,
        "prepaidUnits": {"enabled": users_n + 10}, "vCpuCount": 2, "ramInGB": 4, "storageInGB": 64, "servicePlans": []
    }))
    .unwrap();
    store.create_sku(&sku, &audit("Add SKU")).await.unwrap();
    // The bulk group: the first `bulk_n` users, who are all targeted by some policy already.
    let bulk = group("Bulk");
    store.create_group(&bulk, &audit("Add group")).await.unwrap();
    let s = store.clone();
    parallel(ids[..bulk_n].to_vec(), width, move |u| {
        let s = s.clone();
        let g = bulk.id;
        async move { s.add_member(g, u, &audit("Add member")).await.unwrap() }
    })
    .await;
    println!(
        "{backend}: generated {users_n} users, {groups_n} groups, {policies_n} policies x {per_policy} groups in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // No hosts: every Cloud PC waits for capacity; the resync is off, passes run when asked.
    let config = AppConfig {
        resync_interval: Duration::from_secs(3600),
        storage_dir: dir.path().join("disks"),
        image_dir: dir.path().join("images"),
        gallery_dir: dir.path().join("gallery"),
        ..AppConfig::default()
    };
    let app = App::new(store.clone(), config, vec![]);
    app.start_replica_tasks();

    // Bulk: one group license → every Cloud PC stored and pending for capacity.
    let started = Instant::now();
    store.change_group_licenses(bulk_id(&store).await, &[sku.id], &[], &audit("Assign license")).await.unwrap();
    app.reconcile().await.unwrap();
    let planned = started.elapsed();
    loop {
        let pcs = store.list_cloud_pcs().await.unwrap();
        let pending = pcs.iter().filter(|p| p.status == CloudPcStatus::PendingProvision).count();
        if pcs.len() == bulk_n && pending == bulk_n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "{backend}: bulk: {bulk_n} users licensed in one group assignment -> all {bulk_n} Cloud PCs stored in {:.1} s, all pendingProvision after {:.1} s",
        planned.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // Full passes over the whole world, now steady (nothing to create).
    let mut passes = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        app.reconcile().await.unwrap();
        passes.push(t.elapsed());
    }
    passes.sort();
    let (actions, read, plan) = app.plan_only().await.unwrap();
    println!(
        "{backend}: full pass over {users_n} users / {} Cloud PCs: median {} (min {}); of which reading the world {}, plan() {} ({actions} actions)",
        bulk_n,
        ms(passes[passes.len() / 2]),
        ms(passes[0]),
        ms(read),
        ms(plan)
    );

    // One membership change: a licensed user joins a targeted group → its Cloud PC is stored.
    let newcomer = user(users_n + 1);
    store.create_user(&newcomer, None, &audit("Add user")).await.unwrap();
    store.change_user_licenses(newcomer.id, &[sku.id], &[], &audit("Assign license")).await.unwrap();
    app.reconcile().await.unwrap();
    let t = Instant::now();
    store.add_member(groups[0].id, newcomer.id, &audit("Add member")).await.unwrap();
    let write = t.elapsed();
    app.reconcile().await.unwrap();
    let pc = store.list_cloud_pc_records().await.unwrap().into_iter().find(|r| r.state.user_id == newcomer.id);
    println!(
        "{backend}: one membership change: write {}, then the pass that decides and stores its Cloud PC {} (policy set: {})",
        ms(write),
        ms(t.elapsed() - write),
        pc.is_some_and(|r| r.pc.provisioning_policy_id.is_some())
    );
}

async fn bulk_id(store: &Arc<dyn Store>) -> Uuid {
    store.list_groups().await.unwrap().into_iter().find(|g| g.display_name == "Bulk").unwrap().id
}

/// 64 clients, mixed reads and writes, against the given replicas (round robin).
async fn api_load(label: &str, urls: &[String], secs: u64) {
    // Names unique to this run: runs may share a database.
    let run = Uuid::new_v4().simple().to_string()[..6].to_string();
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut set = tokio::task::JoinSet::new();
    for c in 0..64usize {
        let (http, urls, run) = (http.clone(), urls.to_vec(), run.clone());
        set.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let mut i = 0usize;
            while Instant::now() < deadline {
                let url = &urls[(c + i) % urls.len()];
                let t = Instant::now();
                let req = match i % 10 {
                    // Writes: a new user, then a rename of it.
                    0 => http.post(format!("{url}/v1.0/users")).json(&json!({
                        "userPrincipalName": format!("c{c}-{i}-{run}@contoso.com"), "displayName": "Load"
                    })),
                    1 => {
                        http.get(format!("{url}/v1.0/users?$filter=userPrincipalName eq 'c{c}-{}@contoso.com'", i - 1))
                    }
                    2..=5 => http.get(format!("{url}/v1.0/users?$top=20")),
                    6 | 7 => http.get(format!("{url}/v1.0/subscribedSkus")),
                    _ => http.get(format!("{url}{}/cloudPCs", support::VE)),
                };
                match req.bearer_auth(support::ADMIN_TOKEN).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed());
                    }
                    Ok(r) => {
                        errors += 1;
                        if errors <= 2 {
                            let status = r.status();
                            eprintln!("error: {status} {}", r.text().await.unwrap_or_default());
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        if errors <= 2 {
                            eprintln!("error: {e}");
                        }
                    }
                }
                i += 1;
            }
            (lat, errors)
        });
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    while let Some(r) = set.join_next().await {
        let (l, e) = r.unwrap();
        lat.extend(l);
        errors += e;
    }
    lat.sort();
    let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default();
    println!(
        "api {label}: {} requests in {secs} s = {:.0}/s, p50 {}, p99 {}, errors {errors}",
        lat.len(),
        lat.len() as f64 / secs as f64,
        ms(pct(0.5)),
        ms(pct(0.99))
    );
}

async fn seed(s: &support::Server) {
    for i in 0..200 {
        s.user(&format!("seed{i}@contoso.com")).await;
    }
    s.create(
        "/v1.0/subscribedSkus",
        json!({"skuPartNumber": "CPC_API", "displayName": "API", "prepaidUnits": {"enabled": 10}, "vCpuCount": 2, "ramInGB": 4, "storageInGB": 64}),
    )
    .await;
}

#[tokio::main]
async fn main() {
    if part("reconcile") {
        for backend in ["sqlite", "postgresql"] {
            reconcile_bench(backend).await;
        }
    }
    if part("api") {
        let secs = env_usize("BENCH_API_SECS", 60) as u64;
        let sqlite = support::Server::start().await;
        seed(&sqlite).await;
        api_load("sqlite, 1 replica", std::slice::from_ref(&sqlite.url), secs).await;
        drop(sqlite);
        let pg = support::Server::start_in(support::postgres_data_dir(), &[], Some(support::ADMIN_TOKEN)).await;
        seed(&pg).await;
        api_load("postgresql, 1 replica", std::slice::from_ref(&pg.url), secs).await;
        drop(pg);
        // A fresh database again, so both runs start from the same data.
        let pg = support::Server::start_in(support::postgres_data_dir(), &[], Some(support::ADMIN_TOKEN)).await;
        let second = pg.start_replica(&[]).await;
        seed(&pg).await;
        api_load("postgresql, 2 replicas", &[pg.url.clone(), second.url.clone()], secs).await;
    }
}
