//! Custom images for real: BIOS disks built by images/tiny/build.sh, uploaded through the API and
//! the CLI, test-booted in a throwaway VM; versions that reach a Cloud PC only when it is
//! reprovisioned.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::cli;
use crate::support::*;
use crate::vm_support::*;

const BOOT: Duration = Duration::from_secs(150);

/// One of the import disks of the newest tiny build.
fn import_disk(name: &str) -> PathBuf {
    let path = newest_build("tiny").expect("a tiny image build").join("import").join(name);
    assert!(path.exists(), "{} is missing: run scripts/test.sh (images/tiny/build.sh makes it)", path.display());
    path
}

#[tokio::test]
async fn test_vm_uploaded_image_is_test_booted_and_one_without_agent_is_refused() {
    let _turn = vm_turn().await;
    let s = VmServer::start(&["--image-boot-timeout-secs", "25"]).await;

    // Through the CLI: streamed upload with progress, then --wait until the test boot is over.
    let good = import_disk("custom-bios.qcow2");
    let out = cli(
        &s,
        ADMIN_TOKEN,
        &["images", "upload", good.to_str().unwrap(), "--name", "Tiny BIOS", "--version", "1.0.0", "--wait"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "upload failed: {stderr}");
    assert!(stderr.contains("uploaded") && stderr.contains("checking image 1.0.0: ready"), "{stderr}");
    assert!(stderr.contains("checking image 1.0.0: testBoot"), "the wait shows the check's steps: {stderr}");
    let (_, list) = s.get(&format!("{VE}/deviceImages")).await;
    let img = list["value"][0].clone();
    assert_eq!(img["status"], "ready", "{img}");
    assert_eq!(img["version"], "1.0.0");
    assert!(img["versions"][0].get("checkStep").is_none(), "a finished check shows no step: {img}");
    assert!(
        img["osBuildNumber"].as_str().unwrap_or("").contains("amd64"),
        "the guest agent reported the kernel during the test boot: {img}"
    );
    let id = img["id"].as_str().unwrap();
    let base = s.data_dir().join("images").join(format!("{id}-1.0.0.qcow2"));
    assert!(base.exists());
    assert_eq!(
        files_under(&s.data_dir().join("images")),
        vec![base.clone()],
        "the upload and the test VM's overlay are gone; only cloudpc's base copy stays"
    );
    assert!(s.domains().is_empty(), "the throwaway VM was removed: {:?}", s.domains());

    // An image that boots but never starts its guest agent.
    let silent = import_disk("custom-bios-noagent.qcow2");
    let out = cli(
        &s,
        ADMIN_TOKEN,
        &["images", "upload", silent.to_str().unwrap(), "--name", "Silent", "--version", "1.0.0", "--wait"],
    );
    assert_eq!(out.status.code(), Some(3), "a failed check exits 3: {}", String::from_utf8_lossy(&out.stderr));
    let (_, list) = s.get(&format!("{VE}/deviceImages")).await;
    let failed = list["value"].as_array().unwrap().iter().find(|i| i["displayName"] == "Silent").unwrap().clone();
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["errorCode"], "sourceImageInvalid");
    assert!(failed["statusDetails"].as_str().unwrap().contains("guest agent"), "{failed}");
    assert_eq!(files_under(&s.data_dir().join("images")), vec![base], "nothing of the refused image is kept");
    assert!(s.domains().is_empty(), "{:?}", s.domains());

    // The same disk as a raw image (as `dd` would copy it) boots the same way.
    let raw = s.data_dir().join("custom-bios.img");
    qemu_img(&["convert", "-O", "raw", good.to_str().unwrap(), raw.to_str().unwrap()]);
    let out = cli(
        &s,
        ADMIN_TOKEN,
        &[
            "images",
            "upload",
            raw.to_str().unwrap(),
            "--format",
            "raw",
            "--name",
            "Raw BIOS",
            "--version",
            "1.0.0",
            "--wait",
        ],
    );
    assert!(out.status.success(), "raw upload failed: {}", String::from_utf8_lossy(&out.stderr));
    let (_, list) = s.get(&format!("{VE}/deviceImages")).await;
    let raw_img = list["value"].as_array().unwrap().iter().find(|i| i["displayName"] == "Raw BIOS").unwrap().clone();
    assert_eq!((&raw_img["status"], &raw_img["versions"][0]["sourceImageFormat"]), (&json!("ready"), &json!("raw")));
    assert!(raw_img["osBuildNumber"].as_str().unwrap_or("").contains("amd64"), "{raw_img}");

    // An upload over the size limit is cut off while streaming and leaves nothing.
    let small = Server::start_with(&["--max-image-size-gb", "1"], Some(ADMIN_TOKEN)).await;
    let big = small.data_dir().join("big.bin");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len((1 << 30) + (64 << 20)).unwrap();
    let out =
        cli(&small, ADMIN_TOKEN, &["images", "upload", big.to_str().unwrap(), "--name", "Big", "--version", "1.0.0"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("larger than"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(files_under(&small.data_dir().join("images")).is_empty());
    let (_, list) = small.get(&format!("{VE}/deviceImages")).await;
    assert_eq!(list["value"].as_array().unwrap().len(), 0, "no image record for a refused upload");
}

#[tokio::test]
async fn test_vm_new_image_version_reaches_a_cloud_pc_only_on_reprovision() {
    let _turn = vm_turn().await;
    let disk = import_disk("custom-bios.qcow2");
    let dir = disk.parent().unwrap().to_str().unwrap().to_string();
    let s = VmServer::start(&["--image-boot-timeout-secs", "60", "--image-import-dir", &dir]).await;
    let created = s
        .create(
            &format!("{VE}/deviceImages"),
            json!({"displayName": "Tiny BIOS", "version": "1.0.0", "sourceImageResourceId": disk}),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    let img = s.wait_checks(&id).await;
    assert_eq!(img["status"], "ready", "{img}");

    let sku = s.tiny_sku("TINY", 1, 1, 2).await;
    let policy = s.policy("BIOS", &img).await;
    s.user_targeted_by(&policy, "megan@contoso.com").await;
    s.license("megan@contoso.com", &sku, true).await;
    let pc = s.wait_all(1, &["provisioned"], BOOT).await.remove(0);
    let domain = format!("{}{}", s.prefix, pc["managedDeviceName"].as_str().unwrap().to_ascii_lowercase());
    let backing = |domain: &str| {
        let xml = virsh(&["dumpxml", domain]);
        let disk = xml.split("<source file='").nth(1).unwrap().split('\'').next().unwrap().to_string();
        let out = std::process::Command::new("qemu-img").args(["info", "--output=json", "-U", &disk]).output().unwrap();
        let info: Value = serde_json::from_slice(&out.stdout).unwrap();
        info["backing-filename"].as_str().unwrap_or("").to_string()
    };
    assert!(backing(&domain).ends_with(&format!("{id}-1.0.0.qcow2")), "{}", backing(&domain));
    assert!(virsh(&["dumpxml", &domain]).contains("<boot dev='hd'/>"), "custom images boot through firmware");
    // Post-provisioning grew the root partition and filesystem to the license's 2 GB disk.
    let df = guest_output(&domain, "/bin/df", &["-k", "/"]).await;
    let size_kib: u64 = df.lines().nth(1).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap();
    assert!(size_kib > 1_800_000, "root was grown on its partition: {df}");
    let user_line = guest_output(&domain, "/bin/cat", &["/etc/cloudpc/primary-user"]).await;
    assert_eq!(user_line.trim(), "megan");

    // Version 1.1.0: lower or equal versions are refused, a higher one is checked like the first.
    let (status, v) = s
        .post(&format!("{VE}/deviceImages/{id}/versions"), json!({"version": "1.0.0", "sourceImageResourceId": disk}))
        .await;
    assert_eq!(status.as_u16(), 400);
    assert!(message(&v).contains("higher than"), "{v}");
    let (status, v) = s
        .post(&format!("{VE}/deviceImages/{id}/versions"), json!({"version": "1.1.0", "sourceImageResourceId": disk}))
        .await;
    assert_eq!(status.as_u16(), 201, "{v}");
    assert_eq!(v["version"], "1.0.0", "the pending version is not current yet");
    let img = s.wait_checks(&id).await;
    assert_eq!(img["version"], "1.1.0", "{img}");
    assert_eq!(img["versions"].as_array().unwrap().len(), 2);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let same = s.cloud_pcs().await.remove(0);
    assert_eq!(same["managedDeviceName"], pc["managedDeviceName"]);
    assert_eq!(same["imageVersion"], "1.0.0", "{same}");
    assert!(backing(&domain).ends_with(&format!("{id}-1.0.0.qcow2")), "the existing Cloud PC is untouched");
    let (status, v) = s.delete(&format!("{VE}/deviceImages/{id}")).await;
    assert_eq!(status.as_u16(), 409, "in use: {v}");

    assert_eq!(s.action(&same, "reprovision").await.0, 204);
    let after = s.wait_all(1, &["provisioned"], BOOT).await.remove(0);
    let new_domain = format!("{}{}", s.prefix, after["managedDeviceName"].as_str().unwrap().to_ascii_lowercase());
    assert!(backing(&new_domain).ends_with(&format!("{id}-1.1.0.qcow2")), "reprovision picks up the new version");
    assert_eq!(after["imageVersion"], "1.1.0");
}

#[tokio::test]
async fn test_vm_image_check_killed_mid_test_boot_resumes_after_restart() {
    let _turn = vm_turn().await;
    let s = VmServer::start(&["--image-boot-timeout-secs", "60"]).await;
    let disk = import_disk("custom-bios.qcow2");
    let out =
        cli(&s, ADMIN_TOKEN, &["images", "upload", disk.to_str().unwrap(), "--name", "Crashy", "--version", "2.0.0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let start = std::time::Instant::now();
    while !s.domains().iter().any(|d| d.contains("imagecheck")) {
        assert!(start.elapsed() < BOOT, "the test boot never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Leftovers of other interrupted work, which the restart must sweep too.
    let images = s.data_dir().join("images");
    std::fs::create_dir_all(images.join("staging")).unwrap();
    std::fs::write(images.join("staging").join("stale.qcow2"), b"x").unwrap();
    std::fs::write(images.join(format!("{}-9.9.9.qcow2", uuid::Uuid::new_v4())), b"x").unwrap();
    // SIGKILL while the throwaway VM boots: the check starts over after the restart.
    let s = s.crash_and_restart().await;
    let (_, list) = s.get(&format!("{VE}/deviceImages")).await;
    let id = list["value"][0]["id"].as_str().unwrap().to_string();
    let img = s.wait_checks(&id).await;
    assert_eq!(img["status"], "ready", "{img}");
    assert!(s.domains().is_empty(), "no throwaway VM is left: {:?}", s.domains());
    assert_eq!(
        files_under(&s.data_dir().join("images")),
        vec![s.data_dir().join("images").join(format!("{id}-2.0.0.qcow2"))],
        "no upload, overlay or partial copy is left"
    );
}
