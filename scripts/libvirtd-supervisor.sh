#!/bin/sh
# cloudpc-libvirtd-supervisor: runs libvirtd in the foreground and starts it again whenever it
# exits, as systemd's Restart= does where there is systemd (setup starts this only where it
# starts libvirtd itself). libvirt 9.0 has been seen to crash here (a NULL dereference in an RPC
# worker thread when a guest agent goes away mid-command); cloudpc reconnects by itself.
# With "hide-kvm", /dev/kvm is first covered in this (private) mount namespace: see lib.sh.
if [ "${1:-}" = hide-kvm ]; then
    mount --bind /run/cloudpc/no-kvm /dev/kvm || exit 1
fi
while :; do
    rm -f /var/run/libvirtd.pid
    libvirtd
    echo "$(date -Is) libvirtd exited with $?; starting it again" >> /var/log/libvirt/cloudpc-supervisor.log
    sleep 1
done
