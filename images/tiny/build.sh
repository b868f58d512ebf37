#!/usr/bin/env bash
# Builds the tiny test gallery image from Debian packages: a cloud kernel booted directly, a small
# initramfs that loads the virtio modules and mounts the root disk, and an ext4 root filesystem
# (busybox, the real qemu-guest-agent, resize2fs, zoneinfo) that lives on the Cloud PC's own disk.
#
# The same root filesystem is also written as two BIOS-bootable disks (MBR, a FAT boot partition
# with SYSLINUX, the ext4 root as partition 2) under import/: `custom-bios.qcow2` is a valid custom
# image to import, `custom-bios-noagent.qcow2` boots but never starts the guest agent, so an import
# of it must fail its test boot. Neither is a gallery image.
#
# Usage: images/tiny/build.sh OUT_DIR
# The result lands in OUT_DIR/tiny-<version>/ with manifest.json; a build whose inputs (this
# script and the package versions) did not change is reused.
set -euo pipefail

out_root=${1:?usage: build.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
packages=(busybox-static qemu-guest-agent linux-image-cloud-amd64)

step() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9][^ ]*\)/\1/p' | head -1)
[ -n "$kernel_pkg" ] || { echo "build.sh: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 1; }
versions=""
for p in busybox-static qemu-guest-agent "$kernel_pkg"; do
    versions+="$p=$(apt-cache policy "$p" | sed -n 's/.*Candidate: //p')"$'\n'
done
version=$( (cat "$0"; printf '%s' "$versions") | sha256sum | cut -c1-12)
dest="$out_root/tiny-$version"
if [ -f "$dest/manifest.json" ]; then
    step "tiny image $version is up to date: $dest"
    echo "$dest"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step "downloading ${packages[*]} ($kernel_pkg)"
(cd "$work" && apt-get download -qq busybox-static qemu-guest-agent "$kernel_pkg" 2>/dev/null)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/x"; done
kver=${kernel_pkg#linux-image-}
mods="$work/x/lib/modules/$kver/kernel"

step "assembling the initramfs"
init="$work/initramfs"
mkdir -p "$init"/{bin,sbin,lib/modules,proc,sys,dev,newroot}
cp "$work/x/bin/busybox" "$init/bin/busybox"
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev \
         drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci drivers/block/virtio_blk \
         drivers/char/virtio_console; do
    cp "$mods/$m.ko" "$init/lib/modules/"
done
cat > "$init/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console; do
    insmod /lib/modules/$m.ko
done
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=/dev/*) root=${arg#root=} ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
    echo "cloudpc-tiny: cannot mount the root disk $root"
    exec sh
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
INIT
chmod +x "$init/init"
(cd "$init" && find . | cpio -o -H newc --quiet | gzip -9) > "$work/initrd.img"

step "assembling the root filesystem"
root="$work/rootfs"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/modules,lib64,etc/init.d,proc,sys,dev,run,tmp,root,home,var/log,usr/share}
chmod 1777 "$root/tmp"
cp "$work/x/bin/busybox" "$root/bin/busybox"
"$root/bin/busybox" --list-full | while read -r applet; do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
cp "$work/x/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
cp /sbin/resize2fs "$root/sbin/resize2fs"
# sfdisk and resizepart grow the root partition of the BIOS disks (busybox cannot).
cp /sbin/sfdisk "$root/sbin/sfdisk"
cp /usr/bin/resizepart "$root/usr/bin/resizepart"
# Shared libraries of the dynamic programs, from the host's Debian packages.
for bin in "$root/usr/sbin/qemu-ga" "$root/sbin/resize2fs" "$root/sbin/sfdisk" "$root/usr/bin/resizepart"; do
    ldd "$bin" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r lib; do
        [ -f "$lib" ] || continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done
for m in net/core/failover drivers/net/net_failover drivers/net/virtio_net; do
    cp "$mods/$m.ko" "$root/lib/modules/"
done
if [ -d /usr/share/zoneinfo ]; then cp -r /usr/share/zoneinfo "$root/usr/share/zoneinfo"; fi
cat > "$root/etc/passwd" <<'EOF2'
root:x:0:0:root:/root:/bin/sh
EOF2
echo 'root:*:19000:0:99999:7:::' > "$root/etc/shadow"
chmod 600 "$root/etc/shadow"
cat > "$root/etc/group" <<'EOF2'
root:x:0:
wheel:x:10:
users:x:100:
EOF2
echo "/bin/sh" > "$root/etc/shells"
echo "cloudpc" > "$root/etc/hostname"
echo "UTC" > "$root/etc/timezone"
cat > "$root/etc/inittab" <<'EOF2'
::sysinit:/etc/init.d/rcS
::respawn:/sbin/cloudpc-qga
tty1::respawn:/sbin/getty 38400 tty1
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/umount -a -r
EOF2
cat > "$root/etc/init.d/rcS" <<'EOF2'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -o remount,rw /
hostname -F /etc/hostname
for m in failover net_failover virtio_net; do insmod /lib/modules/$m.ko 2>/dev/null; done
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
    udhcpc -b -q -i eth0 -s /etc/udhcpc.script >/dev/null 2>&1 &
fi
printf '\n  cloudpc tiny image - %s\n\n' "$(hostname)" > /dev/tty1
echo "cloudpc-tiny: booted"
EOF2
chmod +x "$root/etc/init.d/rcS"
cat > "$root/etc/udhcpc.script" <<'EOF2'
#!/bin/sh
case "$1" in
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done ;;
    deconfig) ip addr flush dev "$interface" ;;
esac
EOF2
chmod +x "$root/etc/udhcpc.script"
cat > "$root/sbin/cloudpc-qga" <<'EOF2'
#!/bin/sh
# Starts the guest agent on its virtio port (no udev here, so find the port by name).
for p in /sys/class/virtio-ports/*; do
    if [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
        exec /usr/sbin/qemu-ga -m virtio-serial -p "/dev/$(basename "$p")" -t /run
    fi
done
sleep 1
EOF2
chmod +x "$root/sbin/cloudpc-qga"
cat > "$root/sbin/shutdown" <<'EOF2'
#!/bin/sh
# qemu-ga runs "shutdown -h|-r"; busybox has poweroff and reboot.
case "$*" in *-r*) exec reboot ;; *) exec poweroff ;; esac
EOF2
chmod +x "$root/sbin/shutdown"

step "making the ext4 disk"
truncate -s 192M "$work/root.raw"
mkfs.ext4 -q -L cloudpc-root -d "$root" "$work/root.raw"
mkdir -p "$dest.tmp"
qemu-img convert -q -f raw -O qcow2 "$work/root.raw" "$dest.tmp/disk.qcow2"
cp "$work/x/boot/vmlinuz-$kver" "$dest.tmp/vmlinuz"
cp "$work/initrd.img" "$dest.tmp/initrd.img"

# BIOS disks for import tests: MBR boot code, partition 1 FAT16 (32 MiB, SYSLINUX, kernel, initrd),
# partition 2 the ext4 root. Assembled with dd so no loop device or mount is needed.
bios_disk() { # ROOT_RAW OUT_QCOW2
    local raw="$work/bios.raw" fat="$work/boot.fat"
    rm -f "$raw" "$fat"
    mkfs.vfat -C "$fat" 32768 >/dev/null
    syslinux --install "$fat"
    printf 'DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND root=/dev/vda2 console=tty1 console=ttyS0 rw quiet\n' > "$work/syslinux.cfg"
    mcopy -i "$fat" "$work/x/boot/vmlinuz-$kver" ::vmlinuz
    mcopy -i "$fat" "$work/initrd.img" "$work/syslinux.cfg" ::
    truncate -s $((34 + 192))M "$raw"
    dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
    printf 'label: dos\nstart=2048, size=65536, type=6, bootable\nstart=67584, type=83\n' | sfdisk -q "$raw"
    dd if="$fat" of="$raw" bs=512 seek=2048 conv=notrunc status=none
    dd if="$1" of="$raw" bs=512 seek=67584 conv=notrunc status=none
    qemu-img convert -q -f raw -O qcow2 "$raw" "$2"
}
step "making the BIOS-bootable import disks"
mkdir -p "$dest.tmp/import"
bios_disk "$work/root.raw" "$dest.tmp/import/custom-bios.qcow2"
sed -i '/cloudpc-qga/d' "$root/etc/inittab"
truncate -s 192M "$work/root-noagent.raw"
mkfs.ext4 -q -L cloudpc-root -d "$root" "$work/root-noagent.raw"
bios_disk "$work/root-noagent.raw" "$dest.tmp/import/custom-bios-noagent.qcow2"

size=$(stat -c %s "$dest.tmp/disk.qcow2")
cat > "$dest.tmp/manifest.json" <<EOF2
{
  "id": "cloudpc_tiny_busybox-$version",
  "displayName": "cloudpc tiny (busybox, qemu-guest-agent, $kver)",
  "publisherName": "cloudpc",
  "offerName": "tiny",
  "skuName": "busybox-$version",
  "disk": "disk.qcow2",
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "cmdline": "console=tty1 console=ttyS0 root=/dev/vda rw quiet",
  "diskBytes": $size
}
EOF2
rm -rf "$dest"
mv "$dest.tmp" "$dest"
step "built $dest ($((size / 1024)) KiB disk)"
echo "$dest"
