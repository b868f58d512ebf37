//! Post-provisioning configuration inside a Linux guest, one function per step.
//!
//! Each step is idempotent: running it twice leaves the guest as running it once does. The
//! scripts use only busybox-level tools, so they work on the tiny test image and on full
//! distributions alike.
//!
//! Running twice also means running while the first run is still going: when the server dies
//! mid-step, the guest keeps running the first run's script, and the server's re-run after its
//! restart must not race it (two online `resize2fs` fail with "Device or resource busy"; two
//! `/etc/shadow` rewrites can leave the first run's password). So every step's script first takes
//! the step's own lock in the guest and waits for an earlier run that still holds it.

use std::time::Duration;

use crate::{GuestAgent, GuestError, Result};

const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The shell prelude that takes a step's lock in the guest, waiting up to `wait_secs` for an
/// earlier run of the same step. The lock is a symbolic link whose target names the holder
/// (`pid:start time`): creating it is atomic everywhere, busybox included (which has no `flock`),
/// and a holder killed without releasing it is recognized as gone even if its pid was reused.
/// The lock lives under /run, a tmpfs, so a guest reboot clears it.
fn step_lock(step: &str, wait_secs: u64) -> String {
    format!(
        r#"lock_dir=${{CLOUDPC_STEP_LOCKS:-/run/cloudpc}}
mkdir -p "$lock_dir" 2>/dev/null || {{ lock_dir=/tmp/cloudpc; mkdir -p "$lock_dir"; }}
lock="$lock_dir/{step}.lock"
started() {{ cut -d' ' -f22 "/proc/$1/stat" 2>/dev/null; }}
me="$$:$(started $$)"
waited=0
while ! ln -s "$me" "$lock" 2>/dev/null; do
    holder=$(readlink "$lock" 2>/dev/null) || holder=
    pid=${{holder%%:*}}
    if [ -n "$holder" ] && {{ [ ! -r "/proc/$pid/stat" ] || [ "$(started "$pid")" != "${{holder#*:}}" ]; }}; then
        # Its holder was killed before it could release it.
        rm -f "$lock"
        continue
    fi
    if [ "$waited" -ge {wait_secs} ]; then
        if [ -n "$holder" ]; then
            echo "an earlier run of this step (guest process $pid) is still running after $waited s" >&2
        else
            echo "cannot take the step's lock $lock" >&2
        fi
        exit 75
    fi
    sleep 1
    waited=$((waited + 1))
done
trap 'if [ "$(readlink "$lock" 2>/dev/null)" = "$me" ]; then rm -f "$lock"; fi' EXIT
trap 'exit 143' HUP INT TERM
"#
    )
}

/// The script of a step: its lock, then its body.
fn locked_script(step: &str, body: &str, limit: Duration) -> String {
    format!("{}{body}", step_lock(step, limit.as_secs()))
}

/// Runs a step's script under its lock. `limit` bounds both the wait for an earlier run and the
/// step's own work.
async fn run_step(agent: &GuestAgent<'_>, step: &str, what: &str, body: &str, limit: Duration) -> Result<String> {
    agent.script(what, &locked_script(step, body, limit), limit * 2 + Duration::from_secs(10)).await
}

/// A Linux user name from a user principal name: lowercase letters, digits, `_` and `-`,
/// starting with a letter, at most 32 characters.
pub fn linux_username(upn: &str) -> String {
    let local = upn.split('@').next().unwrap_or(upn).to_ascii_lowercase();
    let mut name: String = local
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(32)
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name.insert(0, 'u');
        name.truncate(32);
    }
    name
}

/// Quotes a value for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

pub async fn set_hostname(agent: &GuestAgent<'_>, name: &str) -> Result<()> {
    let q = sh_quote(name);
    let script = format!("set -e\nprintf '%s\\n' {q} > /etc/hostname\nhostname {q}\n[ \"$(hostname)\" = {q} ]\n");
    run_step(agent, "setHostname", "setting the hostname", &script, STEP_TIMEOUT).await.map(|_| ())
}

/// Gives a machine booted ahead of time (a warm-pool machine) an identity of its own before its
/// user gets it: a new machine id, new SSH host keys where sshd is installed, and the kernel's
/// random pool stirred with `entropy` from the host (a saved seed would otherwise be the one the
/// image was built with). Returns the new machine id. Idempotent: a second run makes another
/// fresh identity, which is as good.
pub async fn refresh_identity(agent: &GuestAgent<'_>, entropy_hex: &str) -> Result<String> {
    let seed = sh_quote(entropy_hex);
    let script = format!(
        r#"set -e
printf '%s' {seed} > /dev/urandom
rm -f /var/lib/systemd/random-seed
if command -v systemd-machine-id-setup >/dev/null 2>&1; then
    rm -f /etc/machine-id
    systemd-machine-id-setup >/dev/null 2>&1
else
    # No systemd (busybox images): a random 128-bit id, as systemd writes it.
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > /etc/machine-id
    echo >> /etc/machine-id
fi
if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then
    cp /etc/machine-id /var/lib/dbus/machine-id
fi
# Host keys made before the claim are never kept: shared ones would let one machine pose as another.
rm -f /etc/ssh/ssh_host_*
if command -v ssh-keygen >/dev/null 2>&1 && [ -d /etc/ssh ]; then
    ssh-keygen -A >/dev/null
    if command -v systemctl >/dev/null 2>&1; then systemctl try-restart ssh.service sshd.service 2>/dev/null || true; fi
fi
cat /etc/machine-id
"#
    );
    let out = run_step(agent, "refreshIdentity", "refreshing the machine's identity", &script, STEP_TIMEOUT).await?;
    Ok(out.trim().to_string())
}

/// SHA-512 crypt of the password, made on the host so the guest never sees it in clear.
pub fn hash_password(password: &str) -> Result<String> {
    let params = sha_crypt::Sha512Params::new(10_000).map_err(|e| GuestError::Protocol(format!("{e:?}")))?;
    sha_crypt::sha512_simple(password, &params).map_err(|e| GuestError::Protocol(format!("{e:?}")))
}

/// Creates the user (or updates the password of an existing one) with a home directory.
/// Values are written with `printf '%s'`, never `echo`: dash's echo expands backslash escapes, so
/// an admin-set display name holding `\n` would add a line to /etc/passwd.
pub async fn create_user(
    agent: &GuestAgent<'_>,
    username: &str,
    display_name: &str,
    password_hash: &str,
) -> Result<()> {
    let script = create_user_script(username, display_name, password_hash);
    run_step(agent, "createUserAccount", "creating the user account", &script, STEP_TIMEOUT).await.map(|_| ())
}

/// The script of `createUserAccount`: written for whatever `/bin/sh` the image has (busybox ash,
/// dash, bash), so values go through `printf '%s'` only.
fn create_user_script(username: &str, display_name: &str, password_hash: &str) -> String {
    let (u, gecos, hash) =
        (sh_quote(username), sh_quote(&display_name.replace([':', '\n'], " ")), sh_quote(password_hash));
    format!(
        r#"set -e
u={u}
if ! grep -q "^$u:" /etc/passwd; then
    uid=1000
    while cut -d: -f3 /etc/passwd | grep -qx "$uid"; do uid=$((uid+1)); done
    printf '%s:x:%s:100:%s:/home/%s:/bin/sh\n' "$u" "$uid" {gecos} "$u" >> /etc/passwd
    mkdir -p "/home/$u"
    chown "$uid:100" "/home/$u"
    chmod 700 "/home/$u"
fi
grep -v "^$u:" /etc/shadow > /etc/shadow.new || true
printf '%s:%s:19000:0:99999:7:::\n' "$u" {hash} >> /etc/shadow.new
chmod 600 /etc/shadow.new
mv /etc/shadow.new /etc/shadow
grep -q "^$u:" /etc/passwd
# Images with a desktop start the graphical session for this user.
umask 022
mkdir -p /etc/cloudpc
printf '%s\n' "$u" > /etc/cloudpc/primary-user
"#
    )
}

/// Makes a guest that has just joined an Active Directory domain sign its accounts in: Kerberos
/// finds the domain's KDCs through DNS, and sssd resolves and authenticates domain accounts with
/// the machine account `adcli` made. Only `allowed` (the Cloud PC's primary user) may sign in: a
/// Cloud PC is one person's. Domain account names are used without the domain (`gina`, not
/// `gina@corp.example`), as the desktop session and `sudo` know users by short name.
pub async fn configure_domain_sign_in(
    agent: &GuestAgent<'_>,
    domain: &str,
    host_fqdn: &str,
    allowed: &str,
) -> Result<()> {
    let script = domain_sign_in_script(domain, host_fqdn, allowed);
    run_step(agent, "joinDirectory", "configuring domain sign-in (sssd, Kerberos)", &script, STEP_TIMEOUT)
        .await
        .map(|_| ())
}

fn domain_sign_in_script(domain: &str, host_fqdn: &str, allowed: &str) -> String {
    let (d, realm, host, allow) = (
        sh_quote(&domain.to_ascii_lowercase()),
        sh_quote(&domain.to_ascii_uppercase()),
        sh_quote(&host_fqdn.to_ascii_lowercase()),
        sh_quote(allowed),
    );
    format!(
        r#"set -e
d={d}; realm={realm}; host={host}; allow={allow}
command -v sssd >/dev/null || {{ echo "the image has no sssd, which signing domain accounts in needs" >&2; exit 1; }}
umask 022
printf '[libdefaults]
    default_realm = %s
    dns_lookup_kdc = true
    dns_lookup_realm = false
    rdns = false
' "$realm" > /etc/krb5.conf.new
mv /etc/krb5.conf.new /etc/krb5.conf
umask 077
mkdir -p /etc/sssd
printf '%s
' '[sssd]' "domains = $d" 'services = nss, pam' '' "[domain/$d]" 'id_provider = ad'     'access_provider = simple' "simple_allow_users = $allow" "ad_domain = $d" "krb5_realm = $realm"     "ad_hostname = $host" 'use_fully_qualified_names = False' 'fallback_homedir = /home/%u'     'default_shell = /bin/bash' 'cache_credentials = True' 'dyndns_update = False'     'ad_gpo_access_control = disabled' > /etc/sssd/sssd.conf.new
chmod 600 /etc/sssd/sssd.conf.new
mv /etc/sssd/sssd.conf.new /etc/sssd/sssd.conf
grep -q '^passwd:.*sss' /etc/nsswitch.conf || sed -i 's/^\(passwd\|group\|shadow\):.*/& sss/' /etc/nsswitch.conf
systemctl enable sssd >/dev/null 2>&1 || true
systemctl restart sssd
"#
    )
}

/// Makes the domain account `username` the Cloud PC's user (it is not created: the domain has
/// it): waits until sssd resolves it, gives it its home directory, and names it as the primary
/// user, whose desktop session then starts as that account.
pub async fn use_domain_account(agent: &GuestAgent<'_>, username: &str, domain: &str) -> Result<()> {
    let (u, d) = (sh_quote(username), sh_quote(domain));
    let script = format!(
        r#"set -e
u={u}; d={d}
waited=0
until ent=$(getent passwd "$u"); do
    if [ "$waited" -ge 60 ]; then
        echo "the domain $d has no account $u (sssd has not found it in 60 s)" >&2
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done
uid=$(printf '%s' "$ent" | cut -d: -f3)
gid=$(printf '%s' "$ent" | cut -d: -f4)
home=$(printf '%s' "$ent" | cut -d: -f6)
[ "$uid" -ge 1000 ] || {{ echo "the domain account $u has uid $uid, a system account's" >&2; exit 1; }}
mkdir -p "$home"
chown "$uid:$gid" "$home"
chmod 700 "$home"
umask 022
mkdir -p /etc/cloudpc
printf '%s
' "$u" > /etc/cloudpc/primary-user
"#
    );
    run_step(agent, "createUserAccount", "using the domain account", &script, Duration::from_secs(90)).await.map(|_| ())
}

/// Adds the user to the `wheel` group, the Linux convention for local administrators.
pub async fn add_to_admin_group(agent: &GuestAgent<'_>, username: &str) -> Result<()> {
    let u = sh_quote(username);
    let script = format!(
        r#"set -e
u={u}
grep -q '^wheel:' /etc/group || echo 'wheel:x:10:' >> /etc/group
line=$(grep '^wheel:' /etc/group)
members=${{line##*:}}
case ",$members," in
    *",$u,"*) ;;
    *) if [ -n "$members" ]; then new="$line,$u"; else new="$line$u"; fi
       sed -i "s/^wheel:.*/$new/" /etc/group ;;
esac
id -Gn "$u" | grep -qw wheel
"#
    );
    run_step(agent, "addLocalAdmin", "adding the user to the administrators (wheel)", &script, STEP_TIMEOUT)
        .await
        .map(|_| ())
}

/// Points /etc/localtime at the zone; refused if the guest has no such zone.
pub async fn set_time_zone(agent: &GuestAgent<'_>, zone: &str) -> Result<()> {
    if zone.is_empty() || zone.contains("..") || zone.starts_with('/') {
        return Err(GuestError::Protocol(format!("'{zone}' is not a time zone name")));
    }
    let z = sh_quote(zone);
    let script = format!(
        "set -e\nz={z}\n[ -f \"/usr/share/zoneinfo/$z\" ] || {{ echo \"no time zone $z in the guest\" >&2; exit 1; }}\nln -sf \"/usr/share/zoneinfo/$z\" /etc/localtime\nprintf '%s\\n' \"$z\" > /etc/timezone\n"
    );
    run_step(agent, "setTimeZone", "setting the time zone", &script, STEP_TIMEOUT).await.map(|_| ())
}

/// Grows the root partition (if root is on one; custom images usually are) to the end of its disk,
/// then the ext4 filesystem, online. `growpart` when the image has it; otherwise util-linux's
/// `sfdisk` rewrites the table and `resizepart` tells the running kernel.
const GROW_ROOT: &str = r#"set -e
dev=$(awk '$2 == "/" && $1 ~ /^\/dev\// {print $1}' /proc/mounts | tail -1)
[ -n "$dev" ] || dev=/dev/vda
name=${dev##*/}
if [ -f "/sys/class/block/$name/partition" ]; then
    part=$(cat "/sys/class/block/$name/partition")
    disk=/dev/$(basename "$(readlink -f "/sys/class/block/$name/..")")
    if command -v growpart >/dev/null; then
        # growpart exits 1 when the partition already fills the disk.
        growpart "$disk" "$part" >&2 || [ $? -eq 1 ]
    else
        echo ', +' | sfdisk -q --no-reread --no-tell-kernel -N "$part" "$disk" >&2
        start=$(cat "/sys/class/block/$name/start")
        total=$(cat "/sys/class/block/${disk##*/}/size")
        resizepart "$disk" "$part" $((total - start))
    fi
fi
resize2fs "$dev" >&2
"#;

/// Grows the root filesystem to fill its disk (online); returns the new size in bytes.
pub async fn grow_root_filesystem(agent: &GuestAgent<'_>) -> Result<u64> {
    // An earlier run still growing it holds the lock: this one then finds nothing left to grow.
    run_step(agent, "growDisk", "growing the root filesystem", GROW_ROOT, Duration::from_secs(300)).await?;
    let fs = agent.fs_info().await?;
    fs.as_array()
        .and_then(|list| list.iter().find(|f| f["mountpoint"] == "/"))
        .and_then(|f| f["total-bytes"].as_u64())
        .ok_or_else(|| GuestError::Protocol("the guest reports no root filesystem size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_linux_username_sanitizes_principal_names() {
        assert_eq!(linux_username("Adele.Vance@contoso.com"), "adele_vance");
        assert_eq!(linux_username("1st@contoso.com"), "u1st");
        assert_eq!(linux_username("o'brien@contoso.com"), "o_brien");
    }

    #[test]
    fn test_sh_quote_survives_single_quotes() {
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn test_create_user_script_keeps_backslashes_of_a_display_name_under_dash() {
        // The host's /bin/sh is dash on Debian, as in the desktop image: its echo expands `\n`.
        let root = tempfile::tempdir().unwrap();
        let r = root.path().display().to_string();
        std::fs::create_dir_all(format!("{r}/etc")).unwrap();
        std::fs::write(format!("{r}/etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(format!("{r}/etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
        let script = create_user_script("adele", r"Adele \nroot2::0:0:x:/root:/bin/sh \101", "$6$x$y")
            .replace("/etc/", &format!("{r}/etc/"))
            .replace("\"/home/", &format!("\"{r}/home/"))
            .replace("chown ", "true ");
        let out = std::process::Command::new("/bin/sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let passwd = std::fs::read_to_string(format!("{r}/etc/passwd")).unwrap();
        assert_eq!(passwd.lines().count(), 2, "one line added for the user: {passwd}");
        assert!(
            passwd.contains(r"adele:x:1000:100:Adele \nroot2  0 0 x /root /bin/sh \101:/home/adele:/bin/sh"),
            "{passwd}"
        );
        let shadow = std::fs::read_to_string(format!("{r}/etc/shadow")).unwrap();
        assert!(shadow.lines().any(|l| l == "adele:$6$x$y:19000:0:99999:7:::"), "{shadow}");
    }

    /// Runs a step's script with the host's `sh`, its locks in `dir`.
    fn spawn_locked(dir: &std::path::Path, body: &str, wait_secs: u64) -> std::process::Child {
        use std::io::Write;
        let mut child = std::process::Command::new("/bin/sh")
            .arg("-s")
            .env("CLOUDPC_STEP_LOCKS", dir)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let script = locked_script("growDisk", body, Duration::from_secs(wait_secs));
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        child
    }

    #[test]
    fn test_a_second_run_of_a_step_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let body = format!("set -e\necho start >> {0}\nsleep 2\necho end >> {0}\n", log.display());
        let first = spawn_locked(dir.path(), &body, 30);
        std::thread::sleep(Duration::from_millis(300));
        let second = spawn_locked(dir.path(), &body, 30);
        for child in [first, second] {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "start\nend\nstart\nend\n", "one after the other");
        assert!(std::fs::symlink_metadata(dir.path().join("growDisk.lock")).is_err(), "released at exit");
    }

    #[test]
    fn test_a_step_lock_of_a_killed_run_is_taken_over_and_a_live_one_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("growDisk.lock");
        // A holder that is gone (no such process): the lock is stale.
        std::os::unix::fs::symlink("4194304:1", &lock).unwrap();
        let out = spawn_locked(dir.path(), "echo ran\n", 5).wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // A live holder (this test process, with its real start time): the wait gives up, saying why.
        std::fs::remove_file(&lock).ok();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let start = stat.rsplit(')').next().unwrap().split_whitespace().nth(19).unwrap().to_string();
        std::os::unix::fs::symlink(format!("{}:{start}", std::process::id()), &lock).unwrap();
        let out = spawn_locked(dir.path(), "echo ran\n", 1).wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{err}");
        assert!(err.contains("an earlier run of this step") && err.contains("still running"), "{err}");
        assert!(std::fs::symlink_metadata(&lock).is_ok(), "someone else's lock is left alone");
    }

    #[test]
    fn test_hash_password_is_sha512_crypt() {
        let h = hash_password("S3cret!").unwrap();
        assert!(h.starts_with("$6$rounds=10000$"), "{h}");
        assert!(sha_crypt::sha512_check("S3cret!", &h).is_ok());
    }
}
