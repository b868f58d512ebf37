//! The server on a small file system of its own (a loop-mounted ext4 as its data directory):
//! images that would expand past the free space, and a disk that fills up under provisioning.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;
use crate::vm_support::*;

/// A small ext4 file system mounted on a fresh directory; unmounted (and its loop device freed)
/// when dropped, even when the test fails. Declare it before the server using it, so the server
/// stops first.
pub struct LoopFs {
    backing: tempfile::TempDir,
    mount: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl LoopFs {
    pub fn new(size: &str) -> LoopFs {
        let backing = tempfile::tempdir().expect("temp dir");
        let file = backing.path().join("fs.img");
        run("truncate", &["-s", size, file.to_str().unwrap()]);
        // No blocks reserved for root: the server runs as root and would use them.
        run("mkfs.ext4", &["-q", "-m", "0", file.to_str().unwrap()]);
        let dir = tempfile::tempdir().expect("temp dir");
        run("mount", &["-o", "loop", file.to_str().unwrap(), dir.path().to_str().unwrap()]);
        LoopFs { backing, mount: dir.path().to_path_buf(), dir: Some(dir) }
    }

    /// The mounted directory, to hand to `Server::start_in`.
    pub fn take_dir(&mut self) -> tempfile::TempDir {
        self.dir.take().expect("the directory was handed out once")
    }

    pub fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // QEMU may take a moment to close a disk after its domain is destroyed.
        let mut unmounted = false;
        for _ in 0..100 {
            if Command::new("umount").arg(&self.mount).status().is_ok_and(|s| s.success()) {
                unmounted = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = std::fs::remove_dir(&self.mount);
        let _ = &self.backing;
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn free_bytes(path: &Path) -> u64 {
    let st = rustix::fs::statvfs(path).expect("statvfs");
    st.f_bavail * st.f_frsize
}

/// Samples the free space every 20 ms until dropped; the least seen.
struct FreeSpaceWatch {
    least: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FreeSpaceWatch {
    fn start(path: &Path) -> FreeSpaceWatch {
        let least = Arc::new(AtomicU64::new(free_bytes(path)));
        let (l, p) = (least.clone(), path.to_path_buf());
        let task = tokio::spawn(async move {
            loop {
                l.fetch_min(free_bytes(&p), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        FreeSpaceWatch { least, task }
    }

    fn least(&self) -> u64 {
        self.least.load(Ordering::SeqCst)
    }
}

impl Drop for FreeSpaceWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A qcow2 of a few MiB whose 192 MiB of compressed clusters (a non-zero pattern) expand when
/// copied: more than the 128 MiB file system holds.
#[tokio::test]
async fn test_compressed_image_that_would_expand_past_the_free_space_fails_before_copying() {
    let mut fs = LoopFs::new("128M");
    let s = Server::start_in(fs.take_dir(), &["--image-free-space-reserve-mib", "16"], Some(ADMIN_TOKEN)).await;
    let image = fs.path().join("compressed.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "192M"]);
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -c -P 0xa5 0 192M"])
        .arg(&image)
        .output()
        .expect("qemu-io (qemu-utils)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let on_disk = std::fs::metadata(&image).unwrap().len();
    assert!(on_disk < 8 << 20, "a small file: {on_disk} bytes");
    let before = free_bytes(fs.path());
    assert!(before < 192 << 20, "the data does not fit: {before} bytes free");

    let watch = FreeSpaceWatch::start(fs.path());
    let started = std::time::Instant::now();
    let v = s.image("compressed", &image).await;
    eprintln!("refused in {:?}", started.elapsed());
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["errorCode"], "sourceImageSizeExceedsLimitation", "{v}");
    let detail = v["statusDetails"].as_str().unwrap_or_default();
    assert!(detail.contains("once copied") && detail.contains("free"), "{detail}");
    // Staging copies the few MiB of the source; nothing near the expanded size was written.
    let dropped = before.saturating_sub(watch.least());
    assert!(dropped < 2 * on_disk + (4 << 20), "free space dropped by {dropped} bytes during the check");
    let leftovers: Vec<PathBuf> = files_under(&fs.path().join("images"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e != "db"))
        .collect();
    assert!(leftovers.is_empty(), "no copies left behind: {leftovers:?}");
}

/// The data directory's file system fills up: provisioning fails saying the disk is full, the
/// database (on the same full file system) keeps every record, and Retry works once there is
/// space again.
#[tokio::test]
async fn test_vm_full_disk_fails_provisioning_with_the_reason_and_retry_works_once_freed() {
    let _turn = vm_turn().await;
    let settings = tempfile::tempdir().unwrap();
    let config = roomy_host_settings(settings.path());
    let mut fs = LoopFs::new("64M");
    let s = VmServer::start_in(fs.take_dir(), &["--config", &config]).await;
    let sku = s.tiny_sku("TINY", 1, 1, 1).await;
    let upn = "megan@contoso.com";
    let user = s.user(upn).await;
    let group = s.group("full disk").await;
    s.add_member(&group, &user).await;
    let policy = s.tiny_policy("full disk", json!({})).await;
    s.assign(&policy, &[&group]).await;
    // Records that must all survive; enough writes that SQLite's write-ahead log has wrapped
    // once, as on any server that has run a while, so its next writes reuse the log's space.
    const OTHERS: usize = 400;
    for i in 0..OTHERS {
        s.user(&format!("user{i}@contoso.com")).await;
    }
    let audit_before = s.audit_activities().await.len();
    // Where the log's next write lands depends on every earlier write (schema changes included),
    // so a log about to grow past its largest size would fail for want of space no server ever
    // lacks. A checkpoint that restarts the log makes the next writes reuse its file from the
    // start, as they do after any automatic checkpoint.
    if s.database_url().is_none() {
        let url = format!("sqlite://{}", s.data_dir().join("cloudpc.db").display());
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url).await.unwrap();
        sqlx::query("PRAGMA wal_checkpoint(RESTART)").execute(&mut conn).await.unwrap();
        drop(conn);
    }

    // Fill the file system, leaving less than a Cloud PC disk (an overlay of about 200 KiB) needs.
    let filler = fs.path().join("filler");
    let leave = 160u64 << 10;
    let size = free_bytes(fs.path()).saturating_sub(leave);
    run("fallocate", &["-l", &size.to_string(), filler.to_str().unwrap()]);
    eprintln!("filled: {} bytes free", free_bytes(fs.path()));
    s.license(upn, &sku, true).await;
    let started = std::time::Instant::now();
    let failed = s.wait_all(1, &["failed", "provisioned"], Duration::from_secs(60)).await.remove(0);
    eprintln!("failed after {:?}: {}", started.elapsed(), failed["statusDetail"]);
    assert_eq!(failed["status"], "failed", "{failed}");
    let detail = failed["statusDetail"].as_str().unwrap();
    assert!(detail.contains("disk of the host is full") && detail.contains("Retry"), "{detail}");
    assert!(s.domains().is_empty(), "no VM without a disk: {:?}", s.domains());

    // Nothing lost: every record reads back, and the database passes SQLite's own check.
    let (_, users) = s.get("/v1.0/users?$count=true&$top=1").await;
    assert_eq!(users["@odata.count"], json!(OTHERS + 1), "{users}");
    assert!(s.audit_activities().await.len() > audit_before);
    // On PostgreSQL the database lives elsewhere and is not on the full file system.
    if s.database_url().is_none() {
        let db = s.data_dir().join("cloudpc.db");
        let url = format!("sqlite://{}?mode=ro", db.display());
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url).await.unwrap();
        let (check,): (String,) = sqlx::query_as("PRAGMA integrity_check").fetch_one(&mut conn).await.unwrap();
        assert_eq!(check, "ok");
        drop(conn);
    }

    std::fs::remove_file(&filler).unwrap();
    assert_eq!(s.action(&failed, "retry").await.0, 204);
    let started = std::time::Instant::now();
    if qemu_sees(fs.path()) {
        let pc: Value = s.wait_all(1, &["provisioned"], Duration::from_secs(180)).await.remove(0);
        eprintln!("provisioned {:?} after Retry", started.elapsed());
        assert_eq!(s.domains().len(), 1, "{:?}", s.domains());
        assert_eq!(pc["userPrincipalName"], upn);
    } else {
        // libvirtd (and so QEMU) runs in another mount namespace and cannot see this test's
        // file system: the retry can only be followed until its disk is made.
        eprintln!("libvirtd runs in another mount namespace: following the retry up to its disk");
        loop {
            let steps = s.steps(&failed).await;
            // Retry starts a new generation: its createVm must succeed.
            let generation = steps.iter().filter_map(|st| st["generation"].as_u64()).max().unwrap_or(0);
            if steps
                .iter()
                .any(|st| st["name"] == "createVm" && st["status"] == "succeeded" && st["generation"] == generation)
            {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the retry made no disk: {steps:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(s.disks().iter().any(|d| d.ends_with(".qcow2")), "{:?}", s.disks());
    }
}

/// Whether QEMU, started by libvirtd, sees the file system this test mounted at `dir`: libvirtd
/// shares this process's mount namespace, or its own receives new mounts (a slave namespace, as
/// the host setup makes on TCG hosts). Looked up through libvirtd's own root.
fn qemu_sees(dir: &std::path::Path) -> bool {
    let Ok(out) = Command::new("pidof").arg("libvirtd").output() else { return false };
    let pid = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string();
    let marker = dir.join(".visible-to-libvirtd");
    if pid.is_empty() || std::fs::write(&marker, b"").is_err() {
        return false;
    }
    let seen = std::path::Path::new(&format!("/proc/{pid}/root{}", marker.display())).exists();
    let _ = std::fs::remove_file(&marker);
    seen
}
