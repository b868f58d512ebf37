//! Soak benchmark (issue 9): many provisionings of the tiny image while the server is killed with
//! SIGKILL at random moments and libvirtd is restarted once in the middle. Cloud PCs come in waves
//! (the machine has room for a few at once); after each wave every Cloud PC must be `provisioned`
//! with exactly one domain and one disk, and once the wave is removed (license gone, grace period
//! ended, clean-up) nothing of it may remain: no domain, no disk, no NIC filter. Prints figures;
//! the counts it checks are printed too, and a broken invariant ends it with a non-zero exit.
//!
//! Run: `CLOUDPC_TEST_GALLERY=/var/lib/cloudpc/gallery cargo bench --bench soak`
//! (`BENCH_N`, default 50; `BENCH_WAVE`, default 5; `BENCH_SEED` for the kill moments).
#![allow(dead_code)]

#[path = "../tests/integration/support.rs"]
mod support;
#[path = "../tests/integration/vm_support.rs"]
mod vm_support;

use std::time::{Duration, Instant};

use serde_json::json;

use vm_support::VmServer;

/// A small deterministic generator, so a run can be repeated with its seed.
struct Lcg(u64);

impl Lcg {
    fn next_ms(&mut self, max: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % max
    }
}

fn virsh(args: &[&str]) -> String {
    let out = std::process::Command::new("virsh").arg("-c").arg("qemu:///system").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn filters(prefix: &str) -> usize {
    virsh(&["nwfilter-list"]).lines().filter(|l| l.contains(prefix)).count()
}

async fn run() {
    let n: usize = std::env::var("BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let wave: usize = std::env::var("BENCH_WAVE").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let mut rng = Lcg(std::env::var("BENCH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(7365));
    let mut s = VmServer::start(&["--cleanup-delay-secs", "1"]).await;
    let sku = s.tiny_sku("SOAK", 1, 1, 1).await;
    let (_, _) = s
        .patch(
            &format!("/v1.0/subscribedSkus/{}", sku["id"].as_str().unwrap()),
            json!({"prepaidUnits": {"enabled": n}}),
        )
        .await;
    let group = s.group("soak").await;
    let policy = s.tiny_policy("soak", json!({})).await;
    s.assign(&policy, &[&group]).await;
    let started = Instant::now();
    let (mut kills, mut provisioned, mut with_warnings, mut restarted_libvirtd) = (0, 0, 0, None);
    let mut wave_times = Vec::new();
    let mut leftovers = 0;
    let waves = n.div_ceil(wave);
    for w in 0..waves {
        let t = Instant::now();
        let users: Vec<String> = (0..wave.min(n - w * wave)).map(|i| format!("soak{w}x{i}@contoso.com")).collect();
        for upn in &users {
            let u = s.user(upn).await;
            s.add_member(&group, &u).await;
            s.license(upn, &sku, true).await;
        }
        // One or two kills at random moments while the wave provisions.
        for _ in 0..(1 + rng.next_ms(2)) {
            tokio::time::sleep(Duration::from_millis(300 + rng.next_ms(6000))).await;
            s = s.crash_and_restart().await;
            kills += 1;
        }
        if w == waves / 2 {
            tokio::time::sleep(Duration::from_millis(500 + rng.next_ms(3000))).await;
            restarted_libvirtd = Some(vm_support::restart_libvirtd());
        }
        let pcs = s
            .wait_all(users.len(), &["provisioned", "provisionedWithWarnings", "failed"], Duration::from_secs(600))
            .await;
        for pc in &pcs {
            match pc["status"].as_str() {
                Some("provisioned") => provisioned += 1,
                Some("provisionedWithWarnings") => with_warnings += 1,
                _ => {}
            }
        }
        let domains = s.domains();
        let disks: Vec<String> = s.disks().into_iter().filter(|d| d.ends_with(".qcow2")).collect();
        println!(
            "wave {w}: {} Cloud PCs ({}), {} domains, {} disks, {:.1} s",
            pcs.len(),
            vm_support::summary(&pcs),
            domains.len(),
            disks.len(),
            t.elapsed().as_secs_f64()
        );
        assert_eq!(domains.len(), users.len(), "exactly one domain per Cloud PC");
        assert_eq!(disks.len(), users.len(), "exactly one disk per Cloud PC");
        // Remove the wave: license gone, grace period ended, clean-up after 1 s.
        for upn in &users {
            s.license(upn, &sku, false).await;
        }
        let graced = s.wait_all(users.len(), &["inGracePeriod"], Duration::from_secs(60)).await;
        for pc in &graced {
            s.action(pc, "endGracePeriod").await;
        }
        let gone = Instant::now();
        while !s.cloud_pcs().await.is_empty() && gone.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let left = s.domains().len() + s.disks().iter().filter(|d| d.ends_with(".qcow2")).count() + filters(&s.prefix);
        leftovers += left;
        assert_eq!(left, 0, "nothing of wave {w} is left after clean-up");
        wave_times.push(t.elapsed().as_secs_f64());
    }
    wave_times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "soak: {n} provisionings in {waves} waves of {wave}, {kills} kill -9 of the server, libvirtd restarted once ({:.1} s)",
        restarted_libvirtd.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN)
    );
    println!(
        "  provisioned {provisioned}, with warnings {with_warnings}, failed {}; leftovers after clean-up {leftovers}",
        n - provisioned - with_warnings
    );
    println!(
        "  wave (provision + remove) p50 {:.1} s, max {:.1} s; total {:.0} s",
        wave_times[wave_times.len() / 2],
        wave_times[wave_times.len() - 1],
        started.elapsed().as_secs_f64()
    );
    if provisioned != n {
        eprintln!("soak: {} Cloud PCs did not end `provisioned`", n - provisioned);
        std::process::exit(1);
    }
}

fn main() {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(run());
}
