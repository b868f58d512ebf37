//! Network connection benchmark (issue 13's figures), against the test domain controller
//! (scripts/test-dc.sh) and real VMs; prints numbers, asserts nothing:
//! - the health checks of a good connection, run `BENCH_N` times (default 5): min, median, max,
//!   and the slowest check of each run;
//! - assignment -> provisioned, side by side for the same image: the tiny image on the hosted
//!   network and on the organisation's network (no domain join: the tiny image has no adcli), and
//!   the desktop image on the hosted network and joined to the domain (a real `adcli` join, sssd,
//!   the domain account as the user), with the joinDirectory step's share.
//!
//! Run as root after scripts/test.sh has set the host up (libvirt, gallery with the desktop
//! image, the test DC's packages):
//! `CLOUDPC_TEST_GALLERY=/var/lib/cloudpc/gallery cargo bench --bench network_connections`
#![allow(dead_code)]

#[path = "../tests/integration/ad_support.rs"]
mod ad_support;
#[path = "../tests/integration/support.rs"]
mod support;
#[path = "../tests/integration/vm_support.rs"]
mod vm_support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use ad_support::*;
use support::VE;
use vm_support::VmServer;

const NC: &str = "/v1.0/deviceManagement/virtualEndpoint/onPremisesConnections";

/// Runs the connection's checks and returns the finished run.
async fn run_checks(s: &VmServer, id: &str) -> Value {
    let (_, before) = s.get(&format!("{NC}/{id}")).await;
    let last = before.pointer("/healthCheckStatusDetail/startDateTime").cloned();
    s.post(&format!("{NC}/{id}/runHealthChecks"), json!({})).await;
    loop {
        let (_, c) = s.get(&format!("{NC}/{id}")).await;
        let start = c.pointer("/healthCheckStatusDetail/startDateTime").cloned();
        let ended = c.pointer("/healthCheckStatusDetail/endDateTime").is_some_and(|e| !e.is_null());
        if ended && start != last && !matches!(c["healthCheckStatus"].as_str(), Some("pending" | "running")) {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn millis(a: &Value, b: &Value) -> f64 {
    let t = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or("")).ok();
    match (t(a), t(b)) {
        (Some(a), Some(b)) => (b - a).num_milliseconds() as f64,
        _ => f64::NAN,
    }
}

/// Licenses the user (already in the policy's group) and returns seconds to `provisioned`, and the
/// joinDirectory step's seconds; then frees the Cloud PC again.
async fn provision(s: &VmServer, upn: &str, sku: &Value) -> (f64, f64, String) {
    let started = Instant::now();
    s.license(upn, sku, true).await;
    let pc = loop {
        let pcs = s.cloud_pcs().await;
        if let Some(pc) = pcs.into_iter().find(|p| p["userPrincipalName"] == upn) {
            if matches!(pc["status"].as_str(), Some("provisioned" | "provisionedWithWarnings" | "failed")) {
                break pc;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(900), "{upn}'s Cloud PC is not ready after 15 minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let total = started.elapsed().as_secs_f64();
    let steps = s.steps(&pc).await;
    let join = steps
        .iter()
        .rev()
        .find(|st| st["name"] == "joinDirectory")
        .and_then(|st| st["durationInMilliseconds"].as_f64())
        .unwrap_or(f64::NAN)
        / 1000.0;
    let status = pc["status"].as_str().unwrap_or("?").to_string();
    s.license(upn, sku, false).await;
    let started = Instant::now();
    loop {
        let pcs = s.cloud_pcs().await;
        match pcs.iter().find(|p| p["userPrincipalName"] == upn) {
            None => break,
            Some(p) if p["status"] == "inGracePeriod" => {
                s.action(p, "endGracePeriod").await;
            }
            Some(_) => {}
        }
        if started.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    (total, join, status)
}

async fn run() {
    let n: usize = std::env::var("BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let dc = TestDc::up().await;
    dc.create_user("gina", "Gina!Pass-9c1e");
    let (public, public_url) = public_listener();
    let s = VmServer::start(&["--public-url", &public_url, "--cleanup-delay-secs", "1"]).await;

    let hq = s.create(NC, hq_connection()).await;
    let hq_id = hq["id"].as_str().unwrap().to_string();
    let mut runs = Vec::new();
    println!("health checks of a good connection (9 checks, one host), {n} runs:");
    for _ in 0..n {
        let c = run_checks(&s, &hq_id).await;
        let d = &c["healthCheckStatusDetail"];
        let total = millis(&d["startDateTime"], &d["endDateTime"]);
        let slowest = d["healthChecks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| (millis(&k["startDateTime"], &k["endDateTime"]), k["displayName"].as_str().unwrap_or("")))
            .fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a });
        println!("  {:>6.0} ms  {}  (slowest: {} {:.0} ms)", total, c["healthCheckStatus"], slowest.1, slowest.0);
        runs.push(total);
    }
    runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "  min {:.2} s, median {:.2} s, max {:.2} s (goal: under 10 s)",
        runs[0] / 1000.0,
        runs[runs.len() / 2] / 1000.0,
        runs[runs.len() - 1] / 1000.0
    );

    let branch =
        s.create(NC, json!({"displayName": "Branch", "connectionType": "azureADJoin", "bridgeName": BRIDGE})).await;
    let branch_id = branch["id"].as_str().unwrap().to_string();
    run_checks(&s, &branch_id).await;
    let tiny = s.gallery_image("tiny").await;
    let desktop = s.gallery_image("desktop").await;
    let tiny_sku = s.tiny_sku("TINY", 1, 1, 1).await;
    let desk_sku = s.tiny_sku("DESK", 2, 2, 8).await;
    let cases = [
        ("tiny image, hosted network", &tiny, &tiny_sku, None, "th@contoso.com"),
        ("tiny image, organisation's network", &tiny, &tiny_sku, Some(("azureADJoin", &branch_id)), "to@contoso.com"),
        ("desktop image, hosted network", &desktop, &desk_sku, None, "dh@contoso.com"),
        ("desktop image, domain join", &desktop, &desk_sku, Some(("hybridAzureADJoin", &hq_id)), "gina@contoso.com"),
    ];
    println!("assignment -> provisioned, one Cloud PC at a time:");
    for (i, (label, image, sku, network, upn)) in cases.into_iter().enumerate() {
        let mut body = json!({"displayName": format!("bench {i}"), "imageId": image, "imageType": "gallery"});
        if let Some((kind, id)) = network {
            body["domainJoinConfigurations"] = json!([{"domainJoinType": kind, "onPremisesConnectionId": id}]);
        }
        let policy = s.create(&format!("{VE}/provisioningPolicies"), body).await;
        let group = s.group(&format!("bench {i}")).await;
        let user = s.user(upn).await;
        s.add_member(&group, &user).await;
        s.assign(&policy, &[&group]).await;
        let (total, join, status) = provision(&s, upn, sku).await;
        println!("  {label:<38} {total:>6.1} s ({status}; joinDirectory {join:.1} s)");
    }
    drop(public);
    drop(dc);
}

fn main() {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime").block_on(run());
}
