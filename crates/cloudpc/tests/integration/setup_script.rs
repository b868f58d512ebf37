//! The setup scripts' package handling (scripts/lib.sh), run by bash with stand-ins for dpkg-query,
//! apt-cache and apt-get that describe a machine with a backported qemu-utils 10 and no
//! qemu-system-x86 (what the review saw): the one install call must pin both QEMU packages to the
//! version apt would install for qemu-system-x86 and allow the downgrade, so apt cannot resolve the
//! conflict by removing qemu-utils. The real apt run was checked by hand on such a machine; these
//! stand-ins only record what the script asks apt to do.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn stub(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn test_setup_installs_the_whole_set_in_one_call_with_qemu_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("apt.log");
    stub(
        dir.path(),
        "dpkg-query",
        r#"pkg="${@: -1}"
case "$pkg" in
  qemu-system-x86) exit 1 ;;
  qemu-utils) case "$*" in *Version*) echo "install ok installed 1:10.0.2+ds-2~bpo12+1" ;; *) echo "install ok installed" ;; esac ;;
  *) case "$*" in *Version*) echo "install ok installed 1.0" ;; *) echo "install ok installed" ;; esac ;;
esac"#,
    );
    stub(
        dir.path(),
        "apt-cache",
        r#"[ "$1" = policy ] && [ "$2" = qemu-system-x86 ] && printf 'qemu-system-x86:\n  Installed: (none)\n  Candidate: 1:7.2+dfsg-7+deb12u18\n'"#,
    );
    stub(dir.path(), "apt-get", &format!("echo \"$*\" >> {}", log.display()));
    let path = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap());
    let out = std::process::Command::new("/bin/bash")
        .args(["-c", ". scripts/lib.sh && ensure_packages"])
        .current_dir(repo())
        .env("PATH", path)
        .output()
        .unwrap();
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let installs: Vec<&str> = calls.lines().filter(|l| l.split_whitespace().any(|w| w == "install")).collect();
    assert_eq!(installs.len(), 1, "one apt resolution for the whole set: {calls}");
    let install = installs[0];
    for want in [
        "qemu-utils=1:7.2+dfsg-7+deb12u18",
        "qemu-system-x86=1:7.2+dfsg-7+deb12u18",
        "--allow-downgrades",
        "libvirt-daemon",
        "chromium",
        "mmdebstrap",
    ] {
        assert!(install.split_whitespace().any(|w| w == want), "{want} is missing from: {install}");
    }
}

#[test]
fn test_setup_names_every_missing_command_and_its_package() {
    let out = std::process::Command::new("/bin/bash")
        .args(["-c", ". scripts/lib.sh && check_commands"])
        .current_dir(repo())
        // Only the sbin directories the check adds itself: qemu-img and friends in /usr/bin are missing.
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("qemu-img (package qemu-utils)"), "{err}");
    assert!(err.contains("virsh (package libvirt-clients)") && err.contains("chromium (package chromium)"), "{err}");
    assert!(!err.contains("libvirtd (package"), "libvirtd is in /usr/sbin, which the check searches: {err}");
}
