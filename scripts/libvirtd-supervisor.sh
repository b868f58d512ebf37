#!/bin/sh
# cloudpc-libvirtd-supervisor: runs libvirtd in the foreground and starts it again whenever it
# exits, as systemd's Restart= does where there is systemd (setup starts this only where it
# starts libvirtd itself). libvirt 9.0 has been seen to crash here (a NULL dereference in an RPC
# worker thread when a guest agent goes away mid-command); cloudpc reconnects by itself.
# With "hide-kvm", each libvirtd gets a new mount namespace, a slave of the host's, where
# /dev/kvm is covered (see lib.sh): a new one every time, since a libvirtd started again in the
# namespace of one that stopped was seen to start VMs whose guest agent it never reached.
#
# libvirt 9.0 has also been seen to stop answering altogether (CI hosts; every virsh call hung
# for 15 minutes). A running daemon that leaves two probes in a row unanswered for
# CLOUDPC_LIBVIRTD_PROBE_TIMEOUT seconds each (default 20, a probe every
# CLOUDPC_LIBVIRTD_PROBE_EVERY seconds, default 10) is killed, and the loop below starts it again.
# QEMU processes live on and the new daemon takes them back. A probe refused outright (the daemon
# is starting) does not count. With "watch", only the probe runs: for a libvirtd that systemd
# runs (and restarts, Restart=on-failure).
LOG=/var/log/libvirt/cloudpc-supervisor.log
EVERY=${CLOUDPC_LIBVIRTD_PROBE_EVERY:-10}
LIMIT=${CLOUDPC_LIBVIRTD_PROBE_TIMEOUT:-20}

watch_for_hangs() {
    misses=0
    while sleep "$EVERY"; do
        pid=$(pgrep -xo libvirtd) || { misses=0; continue; }
        timeout -s KILL "$LIMIT" virsh -c qemu:///system list --all --name >/dev/null 2>&1
        case $? in
            124 | 137) misses=$((misses + 1)) ;;
            *) misses=0 ;;
        esac
        if [ "$misses" -ge 2 ]; then
            echo "$(date -Is) libvirtd $pid left two probes unanswered for ${LIMIT} s each; killing it" >> "$LOG"
            kill -9 "$pid" 2>/dev/null
            misses=0
        fi
    done
}
if [ "${1:-}" = watch ]; then
    watch_for_hangs
    exit
fi
watch_for_hangs &

while :; do
    rm -f /var/run/libvirtd.pid
    if [ "${1:-}" = hide-kvm ]; then
        unshare --mount --propagation slave sh -c 'mount --bind /run/cloudpc/no-kvm /dev/kvm && exec libvirtd'
    else
        libvirtd
    fi
    echo "$(date -Is) libvirtd exited with $?; starting it again" >> "$LOG"
    sleep 1
done
