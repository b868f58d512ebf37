//! SCIM benchmark against real server processes (SQLite, and PostgreSQL when
//! `CLOUDPC_TEST_DATABASE_URL` is set); prints numbers, asserts nothing.
//!
//! - Latency: `BENCH_CHANGES` (20) times, a SCIM PATCH adds a new user to a group that a policy
//!   targets and that carries a license; measured until the user's Cloud PC exists (provisioning
//!   started: the server runs with no hypervisor host, so it then waits for capacity). p50, p90, max.
//! - Push: `BENCH_SCIM_USERS` (10,000) users and `BENCH_SCIM_GROUPS` (500) groups with their
//!   members, as a provider's first sync would send them, 8 requests at a time: time, requests
//!   per second, and the server's peak memory (VmHWM).
//!
//! Run: `cargo bench --bench scim`.
#![allow(dead_code)]

#[path = "../tests/integration/support.rs"]
mod support;

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::env_usize;
use serde_json::{json, Value};

const USER: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const GROUP: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
const PATCH: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

struct Scim {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Scim {
    async fn send(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("content-type", "application/scim+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    async fn user(&self, upn: &str) -> String {
        let v = self
            .send(
                reqwest::Method::POST,
                "/Users",
                json!({"schemas": [USER], "userName": upn, "active": true, "displayName": upn}),
            )
            .await;
        v["id"].as_str().unwrap().to_string()
    }
}

fn peak_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

async fn bench(name: &str, s: &support::Server) {
    let p = s
        .create(
            "/cloudpc/identityProviders",
            json!({"displayName": "Bench ID", "issuer": "https://idp.bench.example", "clientId": "cloudpc"}),
        )
        .await;
    let (_, t) =
        s.post(&format!("/cloudpc/identityProviders/{}/scimToken", p["id"].as_str().unwrap()), json!(null)).await;
    let scim = Arc::new(Scim {
        http: reqwest::Client::new(),
        base: format!("{}/scim/v2", s.url),
        token: t["secret"].as_str().unwrap().to_string(),
    });

    // Latency: membership change → Cloud PC stored.
    let changes = env_usize("BENCH_CHANGES", 20);
    let sku = s.sku("CPC_SCIM", (changes + 10) as u32).await;
    let group =
        scim.send(reqwest::Method::POST, "/Groups", json!({"schemas": [GROUP], "displayName": "Targeted"})).await;
    let gid = group["id"].as_str().unwrap().to_string();
    let (st, v) = s
        .post(
            &format!("/v1.0/groups/{gid}/assignLicense"),
            json!({"addLicenses": [{"skuId": sku["skuId"]}], "removeLicenses": []}),
        )
        .await;
    assert!(st.is_success(), "{v}");
    let image = s.ready_image("scim-bench").await;
    let policy = s.policy("SCIM bench", &image).await;
    let (st, v) = s
        .post(
            &format!(
                "/v1.0/deviceManagement/virtualEndpoint/provisioningPolicies/{}/assign",
                policy["id"].as_str().unwrap()
            ),
            json!({"assignments": [{"target": {"groupId": gid}}]}),
        )
        .await;
    assert!(st.is_success(), "{v}");
    let mut times = Vec::new();
    for i in 0..changes {
        let uid = scim.user(&format!("latency{i}@contoso.com")).await;
        let t = Instant::now();
        scim.send(
            reqwest::Method::PATCH,
            &format!("/Groups/{gid}"),
            json!({"schemas": [PATCH], "Operations": [{"op": "Add", "path": "members", "value": [{"value": uid}]}]}),
        )
        .await;
        loop {
            let (_, v) = s.get("/v1.0/deviceManagement/virtualEndpoint/cloudPCs").await;
            if v["value"].as_array().is_some_and(|a| a.len() > i) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no Cloud PC 30 s after a membership change");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(t.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name}: SCIM membership change → provisioning started, {changes} changes: p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        ms(times[changes / 2]),
        ms(times[changes * 9 / 10]),
        ms(*times.last().unwrap())
    );

    // Push: a first sync of many users and groups.
    let users_n = env_usize("BENCH_SCIM_USERS", 10_000);
    let groups_n = env_usize("BENCH_SCIM_GROUPS", 500);
    let t = Instant::now();
    let ids = Arc::new(tokio::sync::Mutex::new(vec![String::new(); users_n]));
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..users_n {
        let (scim, ids, permit) = (scim.clone(), ids.clone(), sem.clone().acquire_owned().await.unwrap());
        set.spawn(async move {
            let id = scim.user(&format!("user{i}@contoso.com")).await;
            ids.lock().await[i] = id;
            drop(permit);
        });
    }
    while set.join_next().await.is_some() {}
    let users_done = t.elapsed();
    let ids = ids.lock().await.clone();
    let per_group = users_n / groups_n.max(1);
    for g in 0..groups_n {
        let (scim, permit) = (scim.clone(), sem.clone().acquire_owned().await.unwrap());
        let members: Vec<Value> =
            ids[g * per_group..(g + 1) * per_group].iter().map(|id| json!({"value": id})).collect();
        set.spawn(async move {
            scim.send(
                reqwest::Method::POST,
                "/Groups",
                json!({"schemas": [GROUP], "displayName": format!("Team {g}"), "members": members}),
            )
            .await;
            drop(permit);
        });
    }
    while set.join_next().await.is_some() {}
    let all = t.elapsed();
    println!(
        "{name}: SCIM push of {users_n} users ({:.1} s, {:.0}/s) and {groups_n} groups with {per_group} members each ({:.1} s): {:.1} s in all; server peak memory {:.0} MiB",
        users_done.as_secs_f64(),
        users_n as f64 / users_done.as_secs_f64(),
        (all - users_done).as_secs_f64(),
        all.as_secs_f64(),
        peak_mib(s.pid())
    );
    let t = Instant::now();
    let list = scim
        .http
        .get(format!("{}/Users?filter=userName%20eq%20%22user5000%40contoso.com%22", scim.base))
        .bearer_auth(&scim.token)
        .send()
        .await
        .unwrap();
    assert!(list.status().is_success());
    println!(
        "{name}: a userName lookup among {} users: {:.1} ms",
        users_n + changes,
        t.elapsed().as_secs_f64() * 1000.0
    );
}

#[tokio::main]
async fn main() {
    let s = support::Server::start_with(&["--no-local-host"], Some(support::ADMIN_TOKEN)).await;
    bench("sqlite", &s).await;
    drop(s);
    if std::env::var("CLOUDPC_TEST_DATABASE_URL").is_ok() {
        let s =
            support::Server::start_in(support::postgres_data_dir(), &["--no-local-host"], Some(support::ADMIN_TOKEN))
                .await;
        bench("postgresql", &s).await;
    }
}
