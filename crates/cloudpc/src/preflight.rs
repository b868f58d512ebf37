//! Checks at start-up that catch a set-up which would only fail later, VM by VM: QEMU runs as an
//! unprivileged user (libvirt's `user` setting), and must reach the disks and images under the
//! data directory. A directory it cannot traverse (a `mktemp -d` one, a home directory) made every
//! VM start and image test boot fail with "Permission denied" while the server looked healthy.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The user QEMU runs as under libvirt's system instance: `user = "…"` in qemu.conf, else
/// Debian's default. `None` when QEMU runs as root (or the user does not exist): nothing to check.
fn qemu_user(qemu_conf: &str) -> Option<(String, u32, u32)> {
    let configured = std::fs::read_to_string(qemu_conf).ok().and_then(|text| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "user").then(|| v.trim().trim_matches('"').to_string())
        })
    });
    let name = configured.unwrap_or_else(|| "libvirt-qemu".into());
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, &name]).stderr(Stdio::null()).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    let (uid, gid) = (id("-u")?, id("-g")?);
    (uid != 0).then_some((name, uid, gid))
}

/// Whether `uid:gid` may open `dir` for listing and traverse it (asked of the kernel, so ACLs
/// and every parent's mode count).
fn reachable(dir: &Path, uid: u32, gid: u32) -> bool {
    Command::new("test")
        .arg("-x")
        .arg(dir)
        .uid(uid)
        .gid(gid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Refuses to start when QEMU's user cannot reach one of `dirs` (which exist), naming the first
/// directory on the way that stops it and what to change.
pub fn check_qemu_can_reach(dirs: &[&Path], qemu_conf: &str) -> Result<(), String> {
    let Some((user, uid, gid)) = qemu_user(qemu_conf) else { return Ok(()) };
    for dir in dirs {
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        if reachable(&dir, uid, gid) {
            continue;
        }
        let ancestors: Vec<PathBuf> = dir.ancestors().map(Path::to_path_buf).collect();
        let blocker = ancestors.iter().rev().find(|a| !reachable(a, uid, gid)).unwrap_or(&dir);
        return Err(format!(
            "QEMU runs as user '{user}', which cannot enter {} (needed for {}): VMs and image test boots \
             would fail with \"Permission denied\". Let it through (chmod o+x {}) or choose a --data-dir it can \
             reach, such as /var/lib/cloudpc/data",
            blocker.display(),
            dir.display(),
            blocker.display()
        ));
    }
    Ok(())
}
