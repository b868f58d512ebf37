# Shared by scripts/run.sh and scripts/test.sh: install what cloudpc needs on Debian/Ubuntu.
# Sourced, not run.

# System packages cloudpc needs to build and run: the toolchain's C side, qemu-img (image checks,
# overlays), QEMU and libvirt (the hypervisor; libvirt-dev to build the binding), dnsmasq and
# iptables (hosted NAT networks, nwfilter), cpio and e2fsprogs (building the tiny test image),
# syslinux, mtools, dosfstools and fdisk (its BIOS-bootable import disks), mmdebstrap (the desktop
# gallery image). chromium runs the browser tests of the portal.
CLOUDPC_PACKAGES="build-essential pkg-config ca-certificates curl qemu-utils qemu-system-x86 libvirt-daemon
libvirt-daemon-driver-qemu libvirt-clients libvirt-dev dnsmasq-base iptables cpio e2fsprogs chromium
syslinux syslinux-common mtools dosfstools fdisk mmdebstrap debian-archive-keyring"

# Where gallery images are built (shared by the service and the tests; builds are cached there).
CLOUDPC_GALLERY_DIR=${CLOUDPC_GALLERY_DIR:-/var/lib/cloudpc/gallery}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_packages() {
    local missing=()
    for p in $CLOUDPC_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if ! command -v apt-get >/dev/null; then
            echo "cloudpc: please install: ${missing[*]} (this script knows apt-get only)" >&2
            exit 1
        fi
        echo "cloudpc: installing system packages: ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

# Node.js builds the portal; an existing installation (of any origin) is kept.
ensure_node() {
    if ! command -v npm >/dev/null; then
        echo "cloudpc: installing Node.js and npm"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
    fi
}

# Builds the portal (web/dist) from npm packages pinned by web/package-lock.json.
build_web() {
    echo "cloudpc: building the portal"
    (cd web && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)
}

ensure_rust() {
    if ! command -v cargo >/dev/null; then
        [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    fi
    if ! command -v cargo >/dev/null; then
        echo "cloudpc: installing the Rust toolchain with rustup"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
        . "$HOME/.cargo/env"
    fi
}

# Prepares this machine as a hypervisor host: libvirt's user and directories, the gallery images
# (tiny, and the desktop unless CLOUDPC_DESKTOP_IMAGE=no), the KVM probe, and the libvirt daemons
# (started here, since there may be no systemd).
setup_host() {
    getent group libvirt-qemu >/dev/null || as_root groupadd -r libvirt-qemu
    id libvirt-qemu >/dev/null 2>&1 || as_root useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
    as_root mkdir -p /var/log/libvirt /var/run/libvirt /etc/libvirt /var/lib/cloudpc "$CLOUDPC_GALLERY_DIR"
    as_root chmod 755 /var/lib/cloudpc "$CLOUDPC_GALLERY_DIR"
    # QEMU runs as an unprivileged user; cloudpc keeps its disks in directories that user can reach.
    if ! grep -qs '^user' /etc/libvirt/qemu.conf; then
        printf 'user = "libvirt-qemu"\ngroup = "libvirt-qemu"\n' | as_root tee -a /etc/libvirt/qemu.conf >/dev/null
    fi

    echo "cloudpc: building the tiny test image (cached)"
    local image
    image=$(as_root images/tiny/build.sh "$CLOUDPC_GALLERY_DIR" | tail -1)

    # /dev/kvm can exist while KVM guests hang (nested virtualization): boot the image's kernel under
    # KVM, and if it does not power off in time, hide /dev/kvm so libvirt stops expecting KVM.
    local restart_libvirt=no
    if [ -e /dev/kvm ] && [ "$(cat /run/cloudpc/accelerator 2>/dev/null)" != kvm ]; then
        if timeout 8 qemu-system-x86_64 -accel kvm -machine pc -nodefaults -nographic -display none -serial none \
            -m 128 -no-reboot -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
            -append "rdinit=/bin/busybox panic=-1 quiet -- poweroff -f" >/dev/null 2>&1; then
            as_root mkdir -p /run/cloudpc && echo kvm | as_root tee /run/cloudpc/accelerator >/dev/null
        else
            echo "cloudpc: KVM guests do not run on this machine; using TCG (software emulation) and hiding /dev/kvm from libvirt"
            as_root rm -f /dev/kvm
            as_root mkdir -p /run/cloudpc && echo tcg | as_root tee /run/cloudpc/accelerator >/dev/null
            restart_libvirt=yes
        fi
    fi
    if [ "${CLOUDPC_DESKTOP_IMAGE:-yes}" != no ]; then
        echo "cloudpc: building the desktop gallery image (cached; the first build takes a few minutes)"
        as_root images/desktop/build.sh "$CLOUDPC_GALLERY_DIR" >/dev/null
    fi
    if ! pgrep -x virtlogd >/dev/null; then as_root virtlogd -d; fi
    if [ "$restart_libvirt" = yes ] && pgrep -x libvirtd >/dev/null; then
        as_root pkill -x libvirtd
        for _ in $(seq 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
        as_root rm -f /var/run/libvirtd.pid
    fi
    if ! pgrep -x libvirtd >/dev/null; then
        as_root rm -f /var/run/libvirtd.pid
        as_root libvirtd -d
    fi
    for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "cloudpc: libvirtd did not come up (see /var/log/libvirt/libvirtd.log)" >&2
    return 1
}
