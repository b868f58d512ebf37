//! Desktops in seconds (issue 14's figures), with real VMs of the desktop image (2 vCPU, 2 GB) and
//! headless Chromium; prints numbers, asserts nothing about them. In one run, side by side:
//! - license -> desktop drawn in Chromium, from the warm pool and cold (the browser's sign-in is
//!   included: the user opens the portal when told their desktop is there);
//! - hibernate, and open -> desktop drawn again for the hibernated desktop (the ticket resumes
//!   it), with the save file's size;
//! - how many 2 GB desktops one host with 24 GiB of RAM serves when 80 % of them are idle, with
//!   and without hibernation, by the placement rule cloudpc applies (a running desktop holds its
//!   RAM; a hibernated one holds none, and its save file counts against disk).
//!
//! Run as root after scripts/test.sh has set the host up (libvirt, the gallery with the desktop
//! image, web/ built): `CLOUDPC_TEST_GALLERY=/var/lib/cloudpc/gallery cargo bench --bench desktops`
#![allow(dead_code)]

#[path = "../tests/integration/support.rs"]
mod support;
#[path = "../tests/integration/vm_support.rs"]
mod vm_support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::VE;
use vm_support::*;

const LIMIT: Duration = Duration::from_secs(600);

/// A user with a password, in a group of their own that `policy` targets, and a one-seat license
/// of the desktop size (so a pool is not refilled once its seat is taken).
async fn desktop_user(s: &VmServer, upn: &str, policy: &Value) -> Value {
    let user = s
        .create(
            "/v1.0/users",
            json!({"userPrincipalName": upn, "displayName": upn, "passwordProfile": {"password": "Bench-Desk-42"}}),
        )
        .await;
    let group = s.group(&format!("group of {upn}")).await;
    s.add_member(&group, &user).await;
    s.assign(policy, &[&group]).await;
    s.create(
        "/v1.0/subscribedSkus",
        json!({"skuPartNumber": format!("SEAT_{}", upn.split('@').next().unwrap().to_uppercase()),
               "prepaidUnits": {"enabled": 1}, "vCpuCount": 2, "ramInGB": 2, "storageInGB": 8}),
    )
    .await
}

async fn wait_for(s: &VmServer, what: &str, test: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(pc) = s.cloud_pcs().await.into_iter().find(|p| test(p)) {
            return pc;
        }
        assert!(start.elapsed() < LIMIT, "waited {LIMIT:?} for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Licenses the user, waits until their desktop is provisioned, then signs in with Chromium and
/// opens it; returns seconds from the license to provisioned and to the desktop drawn, and what
/// the browser spent (sign-in, open to drawn).
async fn license_to_desktop(s: &VmServer, upn: &str, sku: &Value, shot: &str) -> (f64, f64, String) {
    let started = Instant::now();
    let at = chrono::Utc::now().timestamp_millis();
    s.license(upn, sku, true).await;
    wait_for(s, "provisioned", |p| p["userPrincipalName"] == upn && p["status"] == "provisioned").await;
    let provisioned = started.elapsed().as_secs_f64();
    let out = browser_test(
        "portal.mjs",
        &[("CLOUDPC_URL", &s.url), ("CLOUDPC_USER", upn), ("CLOUDPC_PASSWORD", "Bench-Desk-42"), ("DESKTOP", "1")],
        shot,
    )
    .await;
    let shown: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let browser = format!(
        "page load to signed in {} ms, open to drawn {} ms",
        shown["pageLoadToSignedInMs"], shown["openToFirstFrameMs"]
    );
    (provisioned, (shown["shownAtMs"].as_i64().unwrap() - at) as f64 / 1000.0, browser)
}

#[tokio::main]
async fn main() {
    let web = web_dir();
    let s = VmServer::start(&["--web-dir", web.join("dist").to_str().unwrap()]).await;
    let image = s.gallery_image("desktop").await;
    let policy = |name: &str, pool: u32| json!({"displayName": name, "imageId": image, "imageType": "gallery", "warmPoolSize": pool});
    // Warm: one pooled desktop for a one-seat license, given to the user licensed once it is
    // ready and the machine has settled.
    let pooled_policy = s.create(&format!("{VE}/provisioningPolicies"), policy("pooled", 1)).await;
    let pool_sku = desktop_user(&s, "pooled@contoso.com", &pooled_policy).await;
    let filled = Instant::now();
    wait_for(&s, "a pooled desktop", |p| p["status"] == "pooled").await;
    println!("warm pool: the desktop booted into the pool in {:.1} s", filled.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (warm_prov, warm_drawn, warm_browser) =
        license_to_desktop(&s, "pooled@contoso.com", &pool_sku, "bench-pooled.png").await;
    let pc = wait_for(&s, "the pooled user's desktop", |p| p["userPrincipalName"] == "pooled@contoso.com").await;
    let steps = s.steps(&pc).await;
    let claimed: Vec<String> = steps
        .iter()
        .skip_while(|st| st["name"] != "refreshIdentity")
        .map(|st| format!("{} {} ms", st["name"].as_str().unwrap_or(""), st["durationInMilliseconds"]))
        .collect();
    println!("after the claim: {}", claimed.join(", "));

    // Cold, for the same size and image: the pooled policy keeps no pool from now on.
    s.patch(
        &format!("{VE}/provisioningPolicies/{}", pooled_policy["id"].as_str().unwrap()),
        json!({"warmPoolSize": 0}),
    )
    .await;
    let cold_policy = s.create(&format!("{VE}/provisioningPolicies"), policy("cold", 0)).await;
    let cold_sku = desktop_user(&s, "cold@contoso.com", &cold_policy).await;
    let (cold_prov, cold_drawn, cold_browser) =
        license_to_desktop(&s, "cold@contoso.com", &cold_sku, "bench-cold.png").await;

    // Hibernate the pooled user's desktop, then open it again.
    let t = Instant::now();
    let (status, body) = s.action(&pc, "hibernate").await;
    assert_eq!(status, 204, "{body}");
    let hibernate_s = t.elapsed().as_secs_f64();
    let save_mib = std::fs::read_dir("/var/lib/libvirt/qemu/save")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&s.prefix))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0) as f64
        / 1048576.0;
    let out = browser_test(
        "portal.mjs",
        &[
            ("CLOUDPC_URL", &s.url),
            ("CLOUDPC_USER", "pooled@contoso.com"),
            ("CLOUDPC_PASSWORD", "Bench-Desk-42"),
            ("DESKTOP", "1"),
            ("RESUMING", "1"),
        ],
        "bench-resumed.png",
    )
    .await;
    let shown: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let resume_s = shown["openToFirstFrameMs"].as_f64().unwrap_or(f64::NAN) / 1000.0;

    // A 24 GiB host offers 22 GiB (the agent keeps 2 GiB for the host) to 2 GB desktops.
    let offered_mib = 24 * 1024 - 2048;
    let without = offered_mib / 2048;
    // With hibernation only the active fifth holds RAM: N/5 * 2 GiB <= offered.
    let with = offered_mib * 5 / 2048;
    // Disk for that many (thin 8 GB disks, at most 2 GiB of save file each, counted 4x thin):
    let disk_gb = with as f64 * (8.0 + 2.0) / 4.0;

    println!();
    println!("| desktop image, 2 vCPU / 2 GB, TCG | from the warm pool | cold |");
    println!("| --- | --- | --- |");
    println!("| license -> provisioned | {warm_prov:.1} s | {cold_prov:.1} s |");
    println!("| license -> desktop drawn in Chromium (sign-in included) | {warm_drawn:.1} s | {cold_drawn:.1} s |");
    println!("browser, warm: {warm_browser}; cold: {cold_browser}");
    println!();
    println!(
        "hibernate: {hibernate_s:.1} s, save file {save_mib:.0} MiB; open -> desktop drawn again: {resume_s:.1} s"
    );
    println!(
        "2 GB desktops on one 24 GiB host, 80 % idle: {without} without hibernation, {with} with it \
         (placement counts disk too: {disk_gb:.0} GB of data disk at the default 4x thin overcommit)"
    );
}
