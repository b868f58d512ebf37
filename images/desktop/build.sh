#!/usr/bin/env bash
# Builds the Debian 12 desktop gallery image from Debian packages with mmdebstrap: systemd, the
# generic kernel (booted directly; it has the bochs DRM driver that Xorg needs for the VM's VGA),
# a small initramfs-tools initrd, Xorg with the jwm window manager, xterm, the xfe file manager, the
# dillo browser, the real qemu-guest-agent, spice-vdagent (the clipboard shared with the browser
# console) and xclip, dhcpcd, sudo, resize2fs and zoneinfo. The root filesystem fills the whole
# disk /dev/vda (no partition table), so the guest can grow it online with resize2fs.
#
# At boot cloudpc-desktop.service starts X on vt1 (the VNC console) and, as soon as cloudpc names
# the Cloud PC's user in /etc/cloudpc/primary-user (through the guest agent), runs that user's
# session as that user. The files copied into the image are under rootfs/ beside this script.
#
# Usage: images/desktop/build.sh OUT_DIR
# The result lands in OUT_DIR/desktop-<version>/ with manifest.json, packages.lock (every package
# in the image, dependencies included, with its version) and definition (a hash of this script and
# rootfs/). A build is reused while its definition is unchanged and the archive still offers every
# package in its packages.lock at the same version; a security update of any library rebuilds it.
# Needs root, mmdebstrap, debian-archive-keyring, e2fsprogs, qemu-utils and a Debian mirror.
set -euo pipefail
umask 022

out_root=${1:?usage: build.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org}
# jwm+xfe+dillo add 44 MB to the root; pcmanfm (GTK) would add 73 MB, netsurf-gtk 111 MB.
# dhcpcd (DHCP on every NIC, hotplug too, writes resolv.conf) rather than systemd-networkd +
# systemd-resolved: resolved sits before sysinit.target and cost 7 s of boot under emulation.
# spice-vdagent moves the clipboard between X and QEMU's qemu-vdagent channel, which QEMU's VNC
# server (the browser console) shares its clipboard with; it pulls in GTK 3 (+29 packages, 56 MB).
# adcli, sssd-ad, libnss-sss, libpam-sss and krb5-user: joining an Active Directory domain when a
# policy's network connection says so (cloudpc runs adcli and writes sssd.conf through the guest
# agent), domain accounts resolved and signed in by sssd, kinit/klist to check the machine's
# keytab. sssd starts only once cloudpc has written its configuration.
# dbus-x11 answers GTK's need for a session bus: apt would otherwise pick dbus-user-session, and
# with it pam_systemd, which starts a systemd user manager for every su (slow under emulation).
packages=(
    systemd-sysv udev kmod dbus linux-image-amd64 initramfs-tools
    xserver-xorg-core xserver-xorg-input-libinput xinit xauth x11-xserver-utils xfonts-base
    jwm xterm xfe dillo
    qemu-guest-agent iproute2 dhcpcd libnss-myhostname procps
    spice-vdagent dbus-x11 xclip
    e2fsprogs tzdata sudo passwd ca-certificates
    adcli sssd-ad libnss-sss libpam-sss krb5-user
)

step() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# The files under rootfs/ as "MODE PATH" lines: 755 if executable, else 644 (whatever the umask
# of the checkout), owned by root in the image.
rootfs_files() {
    (cd "$here/rootfs" && find . -type f | LC_ALL=C sort) | while read -r f; do
        if [ -x "$here/rootfs/$f" ]; then echo "755 $f"; else echo "644 $f"; fi
    done
}

# The definition: this script and the files it copies in.
definition=$( (cat "$here/build.sh"
               rootfs_files | while read -r mode f; do echo "$mode $f"; cat "$here/rootfs/$f"; done) |
              sha256sum | cut -c1-12)

# A private apt view of the archive the image is built from (not the host's sources: an Ubuntu
# host, or one with other mirrors, would see other versions). Kept under OUT_DIR/.apt-desktop so
# that later runs only fetch what changed. It answers: would every package in a build (its
# dependencies too, as recorded in its packages.lock) be installed at the same version today?
keyring_file=/usr/share/keyrings/debian-archive-keyring.gpg
apt_dir="$out_root/.apt-desktop"
apt_opts=(-o "Dir::State=$apt_dir" -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::status=$apt_dir/status"
          -o "Dir::Cache=$apt_dir/cache" -o "Dir::Etc::SourceList=$apt_dir/sources.list"
          -o "Dir::Etc::SourceParts=$apt_dir/none" -o "Dir::Etc::PreferencesParts=$apt_dir/none"
          -o "Dir::Etc::Preferences=$apt_dir/none" -o "APT::Architecture=amd64" -o "APT::Architectures=amd64"
          -o "Acquire::Languages=none" -o "Debug::NoLocking=true")
archive_view() {
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/none"
    : > "$apt_dir/status"
    local signed=""
    [ -f "$keyring_file" ] && signed="[signed-by=$keyring_file] "
    printf 'deb %s%s/debian %s main\ndeb %s%s/debian %s-updates main\ndeb %s%s/debian-security %s-security main\n' \
        "$signed" "$mirror" "$suite" "$signed" "$mirror" "$suite" "$signed" "$mirror" "$suite" > "$apt_dir/sources.list"
    apt-get "${apt_opts[@]}" -qq --error-on=any update >/dev/null 2>"$apt_dir/update.log"
}
# "name version" for each package named on stdin, as the archive offers them now.
candidates() {
    xargs apt-cache "${apt_opts[@]}" policy 2>/dev/null | awk '/^[^ ]/ {sub(":$", "", $1); p=$1} /Candidate:/ {print p, $2}' | LC_ALL=C sort
}

# Reuse the newest build of this definition whose every package is still current.
builds=$(ls -1dt "$out_root"/desktop-*/ 2>/dev/null | while read -r d; do
    [ -f "$d/manifest.json" ] && [ -f "$d/packages.lock" ] && [ "$(cat "$d/definition" 2>/dev/null)" = "$definition" ] && echo "${d%/}"
done || true)
# DESKTOP_IGNORE_UPDATES=1: rebuild only when the definition changes (an air-gapped host, or an
# admin who takes package updates on their own schedule).
if [ "${DESKTOP_IGNORE_UPDATES:-0}" = 1 ] && [ -n "$builds" ]; then
    newest=$(echo "$builds" | head -1)
    step "desktop image of definition $definition reused without looking for package updates: $newest"
    echo "$newest"
    exit 0
fi
if archive_view; then
    while read -r d; do
        [ -n "$d" ] || continue
        if [ "$(cut -d' ' -f1 "$d/packages.lock" | candidates)" = "$(cat "$d/packages.lock")" ]; then
            step "desktop image is up to date (definition $definition, $(wc -l < "$d/packages.lock") packages unchanged): $d"
            echo "$d"
            exit 0
        fi
        step "a package of $d has a newer version in the archive: building again"
        break
    done <<< "$builds"
else
    # Offline: keep what there is rather than fail the setup.
    newest=$(echo "$builds" | head -1)
    if [ -n "$newest" ]; then
        step "cannot reach the archive to look for updates ($(tail -1 "$apt_dir/update.log")); using $newest"
        echo "$newest"
        exit 0
    fi
    echo "build.sh: cannot read the Debian archive at $mirror: $(tail -3 "$apt_dir/update.log")" >&2
    exit 1
fi

work=$(mktemp -d)
# --one-file-system: never follow a mount mmdebstrap might leave behind if it is killed.
trap 'rm -rf --one-file-system "$work"' EXIT
trap 'exit 130' INT TERM   # so that the clean-up above runs when the build is interrupted
root="$work/rootfs"

step "installing ${#packages[@]} packages and their dependencies with mmdebstrap ($suite)"
# setup-hook: a small initrd (only the modules listed, not MODULES=most) is made when the kernel
# is installed (udev loads the rest, bochs for the VGA too: having it in the initrd made X come no
# sooner). dpkg path-exclude: no manuals, docs (the copyright files stay) or translations.
# The Debian archive's keyring by name, so that the build also works on a non-Debian host
# (Ubuntu ships it as debian-archive-keyring too).
keyring=()
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] && keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
mmdebstrap --variant=minbase --mode=root "${keyring[@]}" \
    --include="$(IFS=,; echo "${packages[*]}")" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
        echo MODULES=list > "$1/etc/initramfs-tools/conf.d/cloudpc.conf"
        printf "virtio_pci\nvirtio_blk\next4\n" > "$1/usr/share/initramfs-tools/modules.d/cloudpc"' \
    "$suite" "$root" \
    "deb $mirror/debian $suite main" \
    "deb $mirror/debian $suite-updates main" \
    "deb $mirror/debian-security $suite-security main" >&2

# What the image holds, dependencies included: the cache key of later runs, and the version.
chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' | LC_ALL=C sort > "$work/packages.lock"
version=$( (echo "$definition"; cat "$work/packages.lock") | sha256sum | cut -c1-12)
dest="$out_root/desktop-$version"

kver=$(basename "$root"/usr/lib/modules/*)
[ -f "$root/boot/vmlinuz-$kver" ] && [ -f "$root/boot/initrd.img-$kver" ] || { echo "build.sh: no kernel/initrd for $kver" >&2; exit 1; }

step "configuring the system"
rootfs_files | while read -r mode f; do install -D -o root -g root -m "$mode" "$here/rootfs/$f" "$root/$f"; done
chmod 0440 "$root/etc/sudoers.d/cloudpc-wheel"   # sudo ignores a file others may read
echo cloudpc > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
echo 'LANG=C.UTF-8' > "$root/etc/default/locale"
# Administrators are the members of wheel (cloudpc adds the user); Debian has none (gid 10 is uucp).
chroot "$root" groupadd --system wheel
chroot "$root" passwd --lock root >/dev/null
systemctl --root="$root" enable cloudpc-desktop.service dhcpcd.service >/dev/null 2>&1
rm -f "$root/etc/resolv.conf"; : > "$root/etc/resolv.conf"   # dhcpcd fills it (it must exist)
# Masked to boot faster: boot-time and periodic jobs a Cloud PC does not need, the console keymap
# (X has its own), and the text login on tty1 where X runs. Nothing waits for the network.
systemctl --root="$root" mask e2scrub_reap.service e2scrub_all.timer apt-daily.timer \
    apt-daily-upgrade.timer dpkg-db-backup.timer \
    keyboard-setup.service getty@tty1.service >/dev/null 2>&1
# Kernel drivers for hardware a QEMU VM never has (sound, radio, cameras, GPUs other than the
# emulated ones, InfiniBand...): about 170 MB of the 400 MB of modules.
mods="$root/usr/lib/modules/$kver/kernel"
rm -rf "$mods"/sound "$mods"/drivers/{media,infiniband,staging,iio,comedi,bluetooth,isdn} \
    "$mods"/drivers/net/wireless "$mods"/drivers/gpu/drm/{amd,i915,nouveau,radeon} \
    "$mods"/net/{wireless,mac80211,bluetooth}
chroot "$root" depmod "$kver"
rm -rf "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* "$root"/var/log/*.log

step "making the ext4 root disk ($(du -sxm "$root" | cut -f1) MB of files)"
truncate -s 2G "$work/root.raw"
mkfs.ext4 -q -L cloudpc-root -d "$root" "$work/root.raw"
mkdir -p "$out_root"
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
# Uncompressed. Measured: 742 MB in 0.3 s; zstd-compressed 238 MB in 4 s (zlib: 244 MB, 21 s),
# but then every boot to X took 1.4 s longer (QEMU decompresses each cluster the guest reads from
# this base, for the whole life of every Cloud PC on it). Boots are many, builds and disks few.
qemu-img convert -q -f raw -O qcow2 "$work/root.raw" "$dest.tmp/disk.qcow2"
cp "$work/packages.lock" "$dest.tmp/packages.lock"
echo "$definition" > "$dest.tmp/definition"
cp "$root/boot/vmlinuz-$kver" "$dest.tmp/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$dest.tmp/initrd.img"
size=$(stat -c %s "$dest.tmp/disk.qcow2")
cat > "$dest.tmp/manifest.json" <<EOF
{
  "id": "cloudpc_desktop_debian12-$version",
  "displayName": "cloudpc desktop (Debian 12, jwm, xterm, xfe, dillo, $kver)",
  "publisherName": "cloudpc",
  "offerName": "desktop",
  "skuName": "debian12-$version",
  "disk": "disk.qcow2",
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "cmdline": "console=tty1 console=ttyS0 root=/dev/vda rootfstype=ext4 rw quiet",
  "diskBytes": $size
}
EOF
chmod 755 "$dest.tmp"
chmod 644 "$dest.tmp"/*
rm -rf "$dest"
mv "$dest.tmp" "$dest"
step "built $dest ($((size / 1024 / 1024)) MiB disk)"
echo "$dest"
