//! Custom-image import benchmark: how fast the CLI streams an image into the server, how long the
//! checks take (header, `qemu-img info`/`check`, the copy into cloudpc's base file) for a large
//! image, and how long a real BIOS image takes from upload to `ready` with its test boot. Prints
//! numbers, asserts nothing.
//!
//! Run: `CLOUDPC_TEST_GALLERY=/var/lib/cloudpc/gallery cargo bench --bench image_import` (after
//! scripts/test.sh or scripts/run.sh has built the gallery). The large image is the desktop
//! gallery build's disk (about 700 MiB); `BENCH_N` sets how many BIOS imports to time (default 3).
#![allow(dead_code)]

#[path = "../tests/integration/support.rs"]
mod support;
#[path = "../tests/integration/vm_support.rs"]
mod vm_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use support::{bin, Server, ADMIN_TOKEN, VE};
use vm_support::{newest_build, VmServer};

/// Uploads `file` through the CLI as a new image; returns the image and the upload's duration.
fn upload(s: &Server, file: &Path, name: &str) -> (Value, Duration) {
    let started = Instant::now();
    let out = Command::new(bin())
        .args(["images", "upload"])
        .arg(file)
        .args(["--name", name, "--version", "1.0.0", "--output", "json"])
        .env("CLOUDPC_URL", &s.url)
        .env("CLOUDPC_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("run cloudpc");
    let took = started.elapsed();
    assert!(out.status.success(), "upload failed: {}", String::from_utf8_lossy(&out.stderr));
    (serde_json::from_slice(&out.stdout).expect("the CLI prints the image as JSON"), took)
}

/// Waits until the image's check is over; returns its status and how long that took.
async fn checked(s: &Server, image: &Value) -> (String, Duration) {
    let started = Instant::now();
    let done = s.wait_image(image["id"].as_str().expect("an id")).await;
    (done["status"].as_str().unwrap_or("?").to_string(), started.elapsed())
}

fn mib(path: &Path) -> f64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) as f64 / f64::from(1 << 20)
}

async fn run() {
    let n: usize = std::env::var("BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(3);

    // A large image without its test boot (the desktop disk boots its kernel directly, not
    // through firmware): streaming and the file checks alone.
    match newest_build("desktop").map(|d| d.join("disk.qcow2")) {
        Some(disk) => {
            let s = Server::start_with(&[], Some(ADMIN_TOKEN)).await;
            let size = mib(&disk);
            let (image, up) = upload(&s, &disk, "Large");
            let (status, check) = checked(&s, &image).await;
            println!(
                "large image ({size:.0} MiB): upload {:.1} s ({:.0} MiB/s), checks and copy {:.1} s -> {status}",
                up.as_secs_f64(),
                size / up.as_secs_f64(),
                check.as_secs_f64()
            );
        }
        None => println!("no desktop build in the gallery: large-image upload skipped"),
    }

    // A BIOS disk with its test boot, as an admin's own image would go.
    let bios = newest_build("tiny").expect("a tiny build").join("import").join("custom-bios.qcow2");
    let s = VmServer::start(&["--image-boot-timeout-secs", "120"]).await;
    let mut rows = Vec::new();
    for i in 0..n {
        let (image, up) = upload(&s, &bios, &format!("Bios {i}"));
        let (status, check) = checked(&s, &image).await;
        rows.push((up, check, status));
    }
    let size = mib(&bios);
    for (i, (up, check, status)) in rows.iter().enumerate() {
        println!(
            "BIOS image {i} ({size:.0} MiB): upload {:.2} s, checks + test boot to the guest agent {:.1} s -> {status}",
            up.as_secs_f64(),
            check.as_secs_f64()
        );
    }
    let mut checks: Vec<f64> = rows.iter().map(|r| r.1.as_secs_f64()).collect();
    checks.sort_by(f64::total_cmp);
    println!("BIOS image: upload to ready p50 {:.1} s (n={n})", checks[checks.len() / 2]);
    let (_, list) = s.get(&format!("{VE}/deviceImages")).await;
    println!("images: {}", list["value"].as_array().map_or(0, Vec::len));
}

fn main() {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime").block_on(run());
}
