//! The server on a small file system of its own (a loop-mounted ext4 as its data directory):
//! images that would expand past the free space, and a disk that fills up under provisioning.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

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
        run("mkfs.ext4", &["-q", file.to_str().unwrap()]);
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
