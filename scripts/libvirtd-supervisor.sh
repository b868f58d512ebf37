#!/bin/sh
# cloudpc-libvirtd-supervisor: runs libvirtd in the foreground and starts it again whenever it
# exits, as systemd's Restart= does where there is systemd (setup starts this only where it
# starts libvirtd itself). libvirt 9.0 has been seen to crash here (a NULL dereference in an RPC
# worker thread when a guest agent goes away mid-command); cloudpc reconnects by itself.
# With "hide-kvm", each libvirtd gets a new mount namespace, a slave of the host's, where
# /dev/kvm is covered (see lib.sh): a new one every time, since a libvirtd started again in the
# namespace of one that stopped was seen to start VMs whose guest agent it never reached.
while :; do
    rm -f /var/run/libvirtd.pid
    if [ "${1:-}" = hide-kvm ]; then
        unshare --mount --propagation slave sh -c 'mount --bind /run/cloudpc/no-kvm /dev/kvm && exec libvirtd'
    else
        libvirtd
    fi
    echo "$(date -Is) libvirtd exited with $?; starting it again" >> /var/log/libvirt/cloudpc-supervisor.log
    sleep 1
done
