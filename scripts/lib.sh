# shellcheck shell=bash
# Shared by scripts/run.sh, scripts/run-replicas.sh and scripts/test.sh: install what cloudpc needs
# on Debian/Ubuntu. Sourced, not run.

# System packages cloudpc needs to build and run: the toolchain's C side, qemu-img (image checks,
# overlays), QEMU and libvirt (the hypervisor; libvirt-dev to build the binding), dnsmasq and
# iptables (hosted NAT networks, nwfilter), cpio and e2fsprogs (building the tiny test image),
# syslinux, mtools, dosfstools and fdisk (its BIOS-bootable import disks), mmdebstrap (the desktop
# gallery image). chromium runs the browser tests of the portal; python3 and python3-venv run schemathesis against the OpenAPI document.
# The health checks of network connections run busybox (udhcpc), dig, ldapsearch, kinit and adcli
# against the organisation's network and domain controller.
CLOUDPC_PACKAGES="build-essential pkg-config ca-certificates curl qemu-utils qemu-system-x86 libvirt-daemon
libvirt-daemon-driver-qemu libvirt-clients libvirt-dev dnsmasq-base iptables cpio e2fsprogs chromium
syslinux syslinux-common mtools dosfstools fdisk mmdebstrap debian-archive-keyring python3 python3-venv
iproute2 busybox bind9-dnsutils ldap-utils krb5-user adcli"

# Where gallery images are built (shared by the service and the tests; builds are cached there).
CLOUDPC_GALLERY_DIR=${CLOUDPC_GALLERY_DIR:-/var/lib/cloudpc/gallery}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Every command that setup, the service and the tests run, with the package that brings it. Checked
# after installing: a package can be "installed" and still not give the command (a newer build
# from elsewhere that apt swapped out, a diversion), and that must stop setup here, not later.
CLOUDPC_COMMANDS="cc:build-essential pkg-config:pkg-config curl:curl qemu-img:qemu-utils
qemu-system-x86_64:qemu-system-x86 virsh:libvirt-clients libvirtd:libvirt-daemon virtlogd:libvirt-daemon
dnsmasq:dnsmasq-base iptables:iptables cpio:cpio mkfs.ext4:e2fsprogs syslinux:syslinux mcopy:mtools
mkfs.vfat:dosfstools sfdisk:fdisk mmdebstrap:mmdebstrap chromium:chromium python3:python3
ip:iproute2 bridge:iproute2 busybox:busybox dig:bind9-dnsutils ldapsearch:ldap-utils kinit:krb5-user adcli:adcli"

# The one version the QEMU packages must share: the installed qemu-system-x86's, else the version
# apt would install. qemu-utils from elsewhere (a backport) conflicts with Debian's QEMU, and apt
# resolves that by removing qemu-utils: pinning both to one version in one apt call keeps qemu-img.
qemu_version() {
    local v
    v=$(dpkg-query -W -f='${Status} ${Version}' qemu-system-x86 2>/dev/null | sed -n 's/^install ok installed //p')
    [ -n "$v" ] || v=$(apt-cache policy qemu-system-x86 2>/dev/null | sed -n 's/^ *Candidate: //p')
    [ "$v" = "(none)" ] && v=""
    printf '%s' "$v"
}

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

ensure_packages() {
    local missing=() p
    for p in $CLOUDPC_PACKAGES; do is_installed "$p" || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ] || ! check_commands quiet; then
        if ! command -v apt-get >/dev/null; then
            echo "cloudpc: please install: ${missing[*]} (this script knows apt-get only)" >&2
            exit 1
        fi
        echo "cloudpc: installing system packages: ${missing[*]:-(commands missing; reinstalling the set)}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        # The whole set in one resolution, so apt cannot satisfy one package by removing another.
        local want=() qv
        qv=$(qemu_version)
        for p in $CLOUDPC_PACKAGES; do
            case "$p" in qemu-utils | qemu-system-x86) [ -n "$qv" ] && p="$p=$qv" ;; esac
            want+=("$p")
        done
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            --allow-downgrades "${want[@]}"
    fi
    check_commands
}

# Every command in CLOUDPC_COMMANDS is on the PATH (root's sbin directories included); names the
# missing ones and their packages. `check_commands quiet` only answers.
check_commands() { check_command_list "$CLOUDPC_COMMANDS" "${1:-}"; }

# check_commands for another list of command:package pairs (the PostgreSQL ones).
check_command_list() {
    local pair cmd pkg missing=()
    for pair in $1; do
        cmd=${pair%%:*} pkg=${pair#*:}
        PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd (package $pkg)")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "${2:-}" = quiet ] && return 1
    echo "cloudpc: these commands are still missing after installing the system packages:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    echo "cloudpc: install those packages (apt-get install ...) and run this script again" >&2
    exit 1
}

# The test domain controller's packages (scripts/test-dc.sh): Samba as an AD DC, faketime for the
# clock-skew test. samba-ad-provision is only a Recommends of samba-ad-dc, yet provisioning needs
# it. No service of these packages may start on the host (the DC runs in a network namespace):
# they are installed under a policy-rc.d that refuses every start, and stopped after anyway.
CLOUDPC_TEST_DC_PACKAGES="samba samba-ad-dc samba-ad-provision winbind ldb-tools faketime"
CLOUDPC_TEST_DC_COMMANDS="samba:samba samba-tool:samba-common-bin ldbsearch:ldb-tools"
ensure_test_dc_packages() {
    local missing=() p made_policy=no
    for p in $CLOUDPC_TEST_DC_PACKAGES; do is_installed "$p" || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "cloudpc: installing the test domain controller's packages: ${missing[*]}"
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
            as_root chmod 755 /usr/sbin/policy-rc.d
            made_policy=yes
        fi
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
        [ "$made_policy" = yes ] && as_root rm -f /usr/sbin/policy-rc.d
        for p in samba-ad-dc smbd nmbd winbind; do
            if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
                as_root systemctl disable --now "$p" >/dev/null 2>&1 || true
            elif [ -x "/etc/init.d/$p" ]; then
                as_root "/etc/init.d/$p" stop >/dev/null 2>&1 || true
            fi
        done
    fi
    [ -d /usr/share/samba/setup/ad-schema ] || {
        echo "cloudpc: samba-ad-provision is installed but /usr/share/samba/setup/ad-schema is missing" >&2
        exit 1
    }
    check_command_list "$CLOUDPC_TEST_DC_COMMANDS"
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
    # KVM; if it does not power off in time this host uses TCG, recorded for cloudpc in
    # /run/cloudpc/accelerator. The device node is never touched (other users of the machine keep
    # KVM): only libvirtd runs in a mount namespace where /dev/kvm is covered, because libvirt
    # otherwise re-probes QEMU's capabilities on every call when KVM is present but unusable.
    if [ -e /dev/kvm ] && [ ! -s /run/cloudpc/accelerator ]; then
        as_root mkdir -p /run/cloudpc
        if timeout 8 qemu-system-x86_64 -accel kvm -machine pc -nodefaults -nographic -display none -serial none \
            -m 128 -no-reboot -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
            -append "rdinit=/bin/busybox panic=-1 quiet -- poweroff -f" >/dev/null 2>&1; then
            echo kvm | as_root tee /run/cloudpc/accelerator >/dev/null
        else
            echo tcg | as_root tee /run/cloudpc/accelerator >/dev/null
        fi
    fi
    local hide_kvm=no
    if [ -e /dev/kvm ] && [ "$(cat /run/cloudpc/accelerator 2>/dev/null)" = tcg ]; then
        hide_kvm=yes
        echo "cloudpc: KVM guests do not run on this machine; this host uses TCG (software emulation)." \
            "/dev/kvm stays; libvirtd runs with it hidden (see /run/cloudpc/accelerator)"
    fi
    if [ "${CLOUDPC_DESKTOP_IMAGE:-yes}" != no ]; then
        echo "cloudpc: building the desktop gallery image (cached; the first build takes a few minutes)"
        as_root images/desktop/build.sh "$CLOUDPC_GALLERY_DIR" >/dev/null
    fi
    if ! pgrep -x virtlogd >/dev/null; then as_root virtlogd -d; fi
    # libvirt builds a private /dev for each QEMU from libvirtd's /dev, and cannot carry the covered
    # /dev/kvm (a mount point) into it: on such a host its per-VM /dev namespace is turned off.
    # QEMU still runs as libvirt-qemu and reaches device nodes only by their permissions.
    # TODO-security: a per-VM /dev without KVM (libvirt offers no setting for that in 9.0).
    local conf_changed=no marker="# cloudpc: TCG host with /dev/kvm hidden from libvirtd"
    if [ "$hide_kvm" = yes ] && ! grep -qs '^namespaces *= *\[ *\]' /etc/libvirt/qemu.conf; then
        printf '%s\nnamespaces = []\n' "$marker" | as_root tee -a /etc/libvirt/qemu.conf >/dev/null
        conf_changed=yes
    elif [ "$hide_kvm" = no ] && grep -qsF "$marker" /etc/libvirt/qemu.conf; then
        as_root sed -i "\\|^$marker\$|{N;d}" /etc/libvirt/qemu.conf
        conf_changed=yes
    fi
    # A libvirtd started before this decision (or by the system, or without the supervisor)
    # sees the wrong /dev/kvm or settings, or would stay down after a crash: start it again.
    local pid restart=no
    pid=$(pgrep -xo libvirtd || true)
    if [ -n "$pid" ] && [ "$conf_changed" = yes ]; then restart=yes; fi
    if [ -n "$pid" ] && [ "$hide_kvm" = yes ] &&
        [ "$(as_root readlink "/proc/$pid/ns/mnt")" = "$(readlink /proc/1/ns/mnt)" ]; then restart=yes; fi
    if [ -n "$pid" ] && ! pgrep -f cloudpc-libvirtd-supervisor >/dev/null && ! [ -d /run/systemd/system ]; then
        restart=yes
    fi
    if [ "$restart" = yes ]; then stop_libvirtd; fi
    if ! pgrep -x libvirtd >/dev/null && ! pgrep -f cloudpc-libvirtd-supervisor >/dev/null; then
        start_libvirtd "$hide_kvm"
    fi
    # A libvirtd that systemd runs still gets the supervisor's probe for a daemon that stopped
    # answering (systemd restarts one that exits).
    if ! pgrep -f cloudpc-libvirtd-supervisor >/dev/null; then
        as_root mkdir -p /run/cloudpc
        as_root install -m 755 "$(dirname "${BASH_SOURCE[0]}")/libvirtd-supervisor.sh" /run/cloudpc/cloudpc-libvirtd-supervisor
        as_root setsid /run/cloudpc/cloudpc-libvirtd-supervisor watch </dev/null >/dev/null 2>&1 &
    fi
    for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "cloudpc: libvirtd did not come up (see /var/log/libvirt/libvirtd.log)" >&2
    return 1
}

# Starts libvirtd under scripts/libvirtd-supervisor.sh, which starts it again if it exits (as
# systemd would); with "yes", in its own mount namespace where /dev/kvm is covered by an empty
# file no one may open, so libvirt (and the QEMU it starts) sees no usable KVM. The namespace is a
# slave of the host's: file systems mounted later (a data directory on another disk) still reach
# libvirtd and QEMU. That needs the host's mounts to be shared, which systemd makes them at boot;
# where nothing did (containers, minimal init), setup does the same. The supervisor runs from a
# copy in /run, so it outlives the checkout it came from.
start_libvirtd() {
    as_root mkdir -p /run/cloudpc
    as_root install -m 755 "$(dirname "${BASH_SOURCE[0]}")/libvirtd-supervisor.sh" /run/cloudpc/cloudpc-libvirtd-supervisor
    if [ "${1:-no}" = yes ]; then
        as_root install -m 000 /dev/null /run/cloudpc/no-kvm
        if ! grep -q ' / / .*shared:' /proc/self/mountinfo; then as_root mount --make-rshared /; fi
        as_root setsid /run/cloudpc/cloudpc-libvirtd-supervisor hide-kvm </dev/null >/dev/null 2>&1 &
    else
        as_root setsid /run/cloudpc/cloudpc-libvirtd-supervisor </dev/null >/dev/null 2>&1 &
    fi
    for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "cloudpc: libvirtd did not come up (see /var/log/libvirt/libvirtd.log)" >&2
    return 1
}

# Stops libvirtd and its supervisor (QEMU processes live on).
stop_libvirtd() {
    as_root pkill -f cloudpc-libvirtd-supervisor || true
    as_root pkill -x libvirtd || true
    for _ in $(seq 300); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
    as_root pkill -9 -x libvirtd || true
    as_root rm -f /var/run/libvirtd.pid
}

# Everything `cloudpc server` needs before it starts: system packages, Node.js and Rust, this
# machine as a hypervisor host, the portal and the release binary. Shared by run.sh and
# run-replicas.sh.
prepare_server() {
    ensure_packages
    ensure_node
    ensure_rust
    setup_host
    build_web
    echo "cloudpc: building (the first build takes a few minutes)"
    cargo build --release --locked --bin cloudpc
}

# PostgreSQL, for the test suite's PostgreSQL pass and for several replicas on one machine. The
# commands come from postgresql-common's version-neutral wrappers, which pick the server or
# client version that fits the cluster; checked after installing, like CLOUDPC_COMMANDS.
CLOUDPC_PG_COMMANDS="psql:postgresql-client-common pg_isready:postgresql-client-common
pg_lsclusters:postgresql-common pg_ctlcluster:postgresql-common pg_createcluster:postgresql-common"

# Makes a local PostgreSQL cluster run and accept the role cloudpc (password CLOUDPC_PG_PASSWORD,
# default cloudpc; may create databases, since the tests create one per test) over TCP on
# 127.0.0.1, with a database cloudpc it owns. Sets and exports CLOUDPC_PG_URL, such as
# postgres://cloudpc:cloudpc@127.0.0.1:5432/cloudpc. Every step leaves what is already right alone.
ensure_postgres() {
    local pw=${CLOUDPC_PG_PASSWORD:-cloudpc} ver name port status log url
    ensure_postgres_packages || return 1
    if [ -z "$(pg_cluster)" ]; then create_pg_cluster || return 1; fi
    read -r ver name port status log <<<"$(pg_cluster)"
    if [ -z "$port" ]; then
        echo "cloudpc: pg_lsclusters lists no PostgreSQL cluster" >&2
        return 1
    fi
    # "online,recovery" (a standby) runs too; it will refuse the role below, with PostgreSQL's word.
    if [ "${status%%,*}" != online ]; then
        echo "cloudpc: starting PostgreSQL $ver/$name"
        # pg_ctlcluster runs pg_ctl itself where systemd is not PID 1, so this works in containers.
        as_root pg_ctlcluster "$ver" "$name" start || {
            echo "cloudpc: PostgreSQL $ver/$name did not start; see $log" >&2
            return 1
        }
    fi
    wait_pg_ready "$ver/$name" "$port" "$log" || return 1
    ensure_pg_role "$ver/$name" "$pw" || return 1
    url="postgres://cloudpc:$(url_encode "$pw")@127.0.0.1:$port/cloudpc"
    check_pg_login "$ver/$name" "$port" "$url" || return 1
    export CLOUDPC_PG_URL="$url"
    echo "cloudpc: PostgreSQL $ver/$name ready: CLOUDPC_PG_URL=postgres://cloudpc:***@127.0.0.1:$port/cloudpc" \
        "(password from CLOUDPC_PG_PASSWORD, default cloudpc)"
}

# Debian's postgresql and postgresql-client, installed only when no server or no client of any
# major version is there: next to one from elsewhere (apt.postgresql.org's 17, say) Debian's would
# add a second server version with a second cluster. Then the commands must be there.
# Drops the databases earlier test runs made (cloudpc_test_*), which nothing else uses.
drop_test_databases() {
    local db
    for db in $(psql "$CLOUDPC_PG_URL" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'cloudpc\_test\_%'"); do
        psql "$CLOUDPC_PG_URL" -qc "DROP DATABASE IF EXISTS $db (FORCE)" >/dev/null
    done
}

ensure_postgres_packages() {
    local want=() pair
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || want+=(postgresql)
    compgen -G '/usr/lib/postgresql/*/bin/psql' >/dev/null || want+=(postgresql-client)
    # A wrapper command gone while a server and a client are there: its package, again.
    for pair in $CLOUDPC_PG_COMMANDS; do
        command -v "${pair%%:*}" >/dev/null || want+=("${pair#*:}")
    done
    if [ ${#want[@]} -gt 0 ]; then
        if ! command -v apt-get >/dev/null; then
            echo "cloudpc: please install PostgreSQL: ${want[*]} (this script knows apt-get only)" >&2
            exit 1
        fi
        echo "cloudpc: installing PostgreSQL: ${want[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}"
    fi
    check_command_list "$CLOUDPC_PG_COMMANDS"
}

# The cluster cloudpc uses, as "version name port status logfile" (empty if there is none): a
# running one before a stopped one, then the newest version, so a second cluster is never started
# when one already runs.
pg_cluster() {
    pg_lsclusters -h 2>/dev/null | awk '{ print ($4 ~ /^online/ ? 0 : 1), $1, $2, $3, $4, $7 }' |
        sort -k1,1n -k2,2Vr | head -1 | cut -d' ' -f2-
}

# A cluster "main" for the newest installed server version (a machine whose packages were told
# not to create one, such as some container images).
create_pg_cluster() {
    local ver
    ver=$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | cut -d/ -f5 | sort -V | tail -1)
    echo "cloudpc: creating the PostgreSQL cluster $ver/main"
    as_root pg_createcluster "$ver" main >/dev/null || {
        echo "cloudpc: pg_createcluster $ver main failed" >&2
        return 1
    }
}

# Waits until the cluster ($1, as version/name) accepts connections on 127.0.0.1 and its port ($2).
wait_pg_ready() {
    for _ in $(seq 60); do
        pg_isready -q -h 127.0.0.1 -p "$2" -t 1 && return 0
        sleep 0.5
    done
    echo "cloudpc: PostgreSQL $1 runs but does not accept connections on 127.0.0.1:$2 (its listen_addresses" \
        "must include localhost or 127.0.0.1: pg_conftool $1 show listen_addresses); see $3" >&2
    return 1
}

# psql as the superuser postgres on the cluster $1 (version/name), through its Unix socket (root
# cannot run the server's tools); from / so psql has a working directory it may read.
pg_admin_psql() {
    local cluster=$1
    shift
    (cd / && as_root runuser -u postgres -- psql --cluster "$cluster" -X -q -v ON_ERROR_STOP=1 -d postgres "$@")
}

# The role cloudpc with the password $2 and CREATEDB, and the database cloudpc owned by it, on the
# cluster $1. The password is set every time, so a changed CLOUDPC_PG_PASSWORD takes effect; it
# goes to psql on stdin, as an SQL literal, so it does not show up in the process list.
ensure_pg_role() {
    local literal="'${2//\'/\'\'}'"
    pg_admin_psql "$1" <<SQL || { echo "cloudpc: could not set up the role and database cloudpc in PostgreSQL $1" >&2; return 1; }
SELECT 'CREATE ROLE cloudpc' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cloudpc') \gexec
ALTER ROLE cloudpc LOGIN CREATEDB PASSWORD $literal;
SELECT 'CREATE DATABASE cloudpc OWNER cloudpc' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'cloudpc') \gexec
ALTER DATABASE cloudpc OWNER TO cloudpc;
SQL
}

# Signs in with the URL $3 to the cluster $1 (port $2) the way the service and the tests will: as
# cloudpc, with the password, over TCP on 127.0.0.1. pg_hba.conf decides that; Debian's allows it
# (scram-sha-256 for 127.0.0.1/32).
check_pg_login() {
    local out hba
    out=$(PGCONNECT_TIMEOUT=5 psql "$3" -X -q -A -t -c 'select 1' 2>&1) && return 0
    hba=$(pg_admin_psql "$1" -A -t -c 'show hba_file' 2>/dev/null || echo "the cluster's pg_hba.conf")
    echo "cloudpc: the role cloudpc cannot sign in with its password over TCP at 127.0.0.1:$2 (PostgreSQL $1):" >&2
    printf '  %s\n' "${out//$'\n'/$'\n'  }" >&2
    echo "cloudpc: $hba needs a line such as 'host all all 127.0.0.1/32 scram-sha-256' (md5 on" \
        "PostgreSQL 13) above any line for 127.0.0.1 that rejects it, then: pg_ctlcluster ${1/\// } reload" >&2
    return 1
}

# Percent-encodes $1 for the user part of a URL (a password with @, : or / would cut it short).
url_encode() {
    local LC_ALL=C s=$1 out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case "$c" in
            [A-Za-z0-9._~-]) out+=$c ;;
            *) printf -v c '%%%02X' "'$c" && out+=$c ;;
        esac
    done
    printf '%s' "$out"
}
