//! Post-provisioning configuration inside a Linux guest, one function per step.
//!
//! Each step is idempotent: running it twice leaves the guest as running it once does. The
//! scripts use only busybox-level tools, so they work on the tiny test image and on full
//! distributions alike.

use std::time::Duration;

use crate::{GuestAgent, GuestError, Result};

const STEP_TIMEOUT: Duration = Duration::from_secs(60);

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
    let script = format!("set -e\necho {q} > /etc/hostname\nhostname {q}\n[ \"$(hostname)\" = {q} ]\n");
    agent.script("setting the hostname", &script, STEP_TIMEOUT).await.map(|_| ())
}

/// SHA-512 crypt of the password, made on the host so the guest never sees it in clear.
pub fn hash_password(password: &str) -> Result<String> {
    let params = sha_crypt::Sha512Params::new(10_000).map_err(|e| GuestError::Protocol(format!("{e:?}")))?;
    sha_crypt::sha512_simple(password, &params).map_err(|e| GuestError::Protocol(format!("{e:?}")))
}

/// Creates the user (or updates the password of an existing one) with a home directory.
pub async fn create_user(
    agent: &GuestAgent<'_>,
    username: &str,
    display_name: &str,
    password_hash: &str,
) -> Result<()> {
    let (u, gecos, hash) =
        (sh_quote(username), sh_quote(&display_name.replace([':', '\n'], " ")), sh_quote(password_hash));
    let script = format!(
        r#"set -e
u={u}
if ! grep -q "^$u:" /etc/passwd; then
    uid=1000
    while cut -d: -f3 /etc/passwd | grep -qx "$uid"; do uid=$((uid+1)); done
    echo "$u:x:$uid:100:"{gecos}":/home/$u:/bin/sh" >> /etc/passwd
    mkdir -p "/home/$u"
    chown "$uid:100" "/home/$u"
    chmod 700 "/home/$u"
fi
grep -v "^$u:" /etc/shadow > /etc/shadow.new || true
echo "$u:"{hash}":19000:0:99999:7:::" >> /etc/shadow.new
chmod 600 /etc/shadow.new
mv /etc/shadow.new /etc/shadow
grep -q "^$u:" /etc/passwd
# Images with a desktop start the graphical session for this user.
umask 022
mkdir -p /etc/cloudpc
echo "$u" > /etc/cloudpc/primary-user
"#
    );
    agent.script("creating the user account", &script, STEP_TIMEOUT).await.map(|_| ())
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
    agent.script("adding the user to the administrators (wheel)", &script, STEP_TIMEOUT).await.map(|_| ())
}

/// Points /etc/localtime at the zone; refused if the guest has no such zone.
pub async fn set_time_zone(agent: &GuestAgent<'_>, zone: &str) -> Result<()> {
    if zone.is_empty() || zone.contains("..") || zone.starts_with('/') {
        return Err(GuestError::Protocol(format!("'{zone}' is not a time zone name")));
    }
    let z = sh_quote(zone);
    let script = format!(
        "set -e\nz={z}\n[ -f \"/usr/share/zoneinfo/$z\" ] || {{ echo \"no time zone $z in the guest\" >&2; exit 1; }}\nln -sf \"/usr/share/zoneinfo/$z\" /etc/localtime\necho \"$z\" > /etc/timezone\n"
    );
    agent.script("setting the time zone", &script, STEP_TIMEOUT).await.map(|_| ())
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
    agent.script("growing the root filesystem", GROW_ROOT, Duration::from_secs(300)).await?;
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
    fn test_hash_password_is_sha512_crypt() {
        let h = hash_password("S3cret!").unwrap();
        assert!(h.starts_with("$6$rounds=10000$"), "{h}");
        assert!(sha_crypt::sha512_check("S3cret!", &h).is_ok());
    }
}
