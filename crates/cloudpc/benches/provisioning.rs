//! Provisioning benchmark: for N license assignments, the time from assignment to `provisioned`
//! (p50, p95), split into guest boot, hypervisor and guest work, and the control plane's own
//! share, with per-step times. Real VMs of the tiny image (or, with `BENCH_IMAGE=desktop`, of the
//! desktop image on a 2 vCPU / 2 GB / 8 GB license); prints numbers, asserts nothing.
//!
//! Run: `CLOUDPC_TEST_GALLERY=/var/lib/cloudpc/gallery cargo bench --bench provisioning`
//! (after scripts/test.sh or scripts/run.sh has set up the host). `BENCH_N` sets N (default 5);
//! `BENCH_PARALLEL=1` assigns all licenses at once instead of one after another.
#![allow(dead_code)]

#[path = "../tests/integration/support.rs"]
mod support;
#[path = "../tests/integration/vm_support.rs"]
mod vm_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use vm_support::VmServer;

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(v: &Value) -> f64 {
    v.as_u64().unwrap_or(0) as f64
}

/// One row of the report: its label and how to read it from a sample.
type Row = (&'static str, Box<dyn Fn(&Sample) -> f64>);

struct Sample {
    total_ms: f64,
    steps_ms: f64,
    boot_ms: f64,
    per_step: Vec<(String, f64)>,
}

async fn run() {
    let n: usize = std::env::var("BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let parallel = std::env::var("BENCH_PARALLEL").is_ok_and(|v| v == "1");
    let s = VmServer::start(&["--cleanup-delay-secs", "1"]).await;
    let offer = std::env::var("BENCH_IMAGE").unwrap_or_else(|_| "tiny".into());
    let sku = if offer == "desktop" { s.tiny_sku("BENCH", 2, 2, 8).await } else { s.tiny_sku("BENCH", 1, 1, 1).await };
    let group = s.group("bench").await;
    let image = s.gallery_image(&offer).await;
    let policy = s.tiny_policy("bench", json!({ "imageId": image })).await;
    s.assign(&policy, &[&group]).await;
    let mut users = Vec::new();
    for i in 0..n {
        let upn = format!("bench{i}@contoso.com");
        let u = s.user(&upn).await;
        s.add_member(&group, &u).await;
        users.push(upn);
    }
    let mut assigned_at: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    let mut samples = Vec::new();
    let wall = Instant::now();
    if parallel {
        for upn in &users {
            assigned_at.insert(upn.clone(), Utc::now());
            s.license(upn, &sku, true).await;
        }
        s.wait_all(n, &["provisioned"], Duration::from_secs(600)).await;
    } else {
        for (i, upn) in users.iter().enumerate() {
            assigned_at.insert(upn.clone(), Utc::now());
            s.license(upn, &sku, true).await;
            s.wait_all(i + 1, &["provisioned"], Duration::from_secs(300)).await;
        }
    }
    let wall = wall.elapsed();
    for pc in s.cloud_pcs().await {
        let upn = pc["userPrincipalName"].as_str().unwrap().to_string();
        let done: DateTime<Utc> = pc["provisionedDateTime"].as_str().unwrap().parse().unwrap();
        let total_ms = (done - assigned_at[&upn]).num_microseconds().unwrap() as f64 / 1000.0;
        let steps = s.steps(&pc).await;
        let per_step: Vec<(String, f64)> = steps
            .iter()
            .map(|st| (st["name"].as_str().unwrap().to_string(), ms(&st["durationInMilliseconds"])))
            .collect();
        let steps_ms = per_step.iter().map(|(_, d)| d).sum();
        let boot_ms =
            per_step.iter().filter(|(n, _)| n == "attachNetwork" || n == "joinDirectory").map(|(_, d)| d).sum();
        samples.push(Sample { total_ms, steps_ms, boot_ms, per_step });
    }

    let col = |f: &dyn Fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (pct(&v, 0.5), pct(&v, 0.95))
    };
    println!(
        "cloudpc provisioning benchmark: N={n}, {}, {offer} image, accelerator from /run/cloudpc/accelerator = {}",
        if parallel { "all assigned at once" } else { "one after another" },
        std::fs::read_to_string("/run/cloudpc/accelerator").unwrap_or_else(|_| "?".into()).trim()
    );
    println!("wall time for all N: {:.1} s", wall.as_secs_f64());
    println!("{:<44} {:>10} {:>10}", "measure (ms)", "p50", "p95");
    let rows: Vec<Row> = vec![
        ("assignment -> provisioned", Box::new(|x: &Sample| x.total_ms)),
        ("  guest boot (VM start + agent answers)", Box::new(|x: &Sample| x.boot_ms)),
        ("  all steps (hypervisor, guest, store)", Box::new(|x: &Sample| x.steps_ms)),
        ("  control plane outside steps", Box::new(|x: &Sample| x.total_ms - x.steps_ms)),
        (
            "  control plane total (+ store-only steps)",
            Box::new(|x: &Sample| {
                let store_steps: f64 = x
                    .per_step
                    .iter()
                    .filter(|(n, _)| ["allocateCapacity", "setPrimaryUser", "assignUser"].contains(&n.as_str()))
                    .map(|(_, d)| d)
                    .sum();
                x.total_ms - x.steps_ms + store_steps
            }),
        ),
    ];
    for (name, f) in rows {
        let (p50, p95) = col(&*f);
        println!("{name:<44} {p50:>10.1} {p95:>10.1}");
    }
    let mut by_step: BTreeMap<usize, (String, Vec<f64>)> = BTreeMap::new();
    for smp in &samples {
        for (i, (name, d)) in smp.per_step.iter().enumerate() {
            by_step.entry(i).or_insert_with(|| (name.clone(), Vec::new())).1.push(*d);
        }
    }
    println!("per step (ms)                                      p50        p95");
    for (_, (name, mut v)) in by_step {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("  {name:<42} {:>10.1} {:>10.1}", pct(&v, 0.5), pct(&v, 0.95));
    }
}

fn main() {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime").block_on(run());
}
