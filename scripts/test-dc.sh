#!/usr/bin/env bash
# scripts/test-dc.sh: a real Active Directory domain controller for the tests of network
# connections (Samba AD DC in a network namespace, with the DHCP server of "the organisation's
# network"), on one machine. Used by tests/integration/ad_support.rs; grown from the prototype in
# docs/notes/issue13/ (NOTES.md there has the measured facts, error texts and pitfalls).
#
#   test-dc.sh up        bridge + netns + provisioned Samba AD DC + DHCP (idempotent; ~2-4 s with
#                        the provision cache, ~10 s without)
#   test-dc.sh restart   samba only (knobs: CPC_DC_FAKETIME=+10m skews the DC's clock)
#   test-dc.sh status    what is up
#   test-dc.sh down      remove everything `up` made (processes, netns, veth, bridge, state)
#   test-dc.sh purge     down + remove the provision cache
#
# The packages (samba & co.) come from ensure_test_dc_packages in scripts/lib.sh.
# Layout (all overridable by environment):
#   host bridge  cpcorg0 10.77.0.1/24         "the organisation's network"
#   netns cpcdc  eth0 10.77.0.10/24 (veth cpcdc-h on the bridge), default via 10.77.0.1
#                runs `samba` (AD DC: LDAP 389, KDC 88, DNS 53, SMB 445, kpasswd 464, ...)
#                and dnsmasq (DHCP only, --port=0) for 10.77.0.100-199.
#   With CPC_DC_VLAN=<id>, the bridge filters VLANs and the DC's port carries only that VLAN
#   (untagged inside the netns), as does the host's address, so only VLAN <id> reaches the domain.
set -euo pipefail

BASE=${CPC_DC_BASE:-/run/cloudpc-test-dc}
STATE=$BASE/state
CACHE=${CPC_DC_CACHE:-/var/cache/cloudpc-test-dc}
D=$STATE/dc                     # samba --targetdir
CONF=$D/etc/smb.conf

BR=${CPC_DC_BRIDGE:-cpcorg0}
NS=${CPC_DC_NETNS:-cpcdc}
VETH_H=${NS}-h
NET=${CPC_DC_NET:-10.77.0}      # /24
HOST_IP=$NET.1
DC_IP=$NET.10
DHCP_FROM=$NET.100
DHCP_TO=$NET.199

REALM=${CPC_DC_REALM:-CORP.CLOUDPC.TEST}
DOMAIN=${CPC_DC_DOMAIN:-CORP}
DNSDOMAIN=${REALM,,}
BASEDN=DC=${DNSDOMAIN//./,DC=}
DC_HOST=${CPC_DC_HOSTNAME:-dc1}
ADMIN_PASS=${CPC_DC_ADMIN_PASS:-Adm1n!Pass-cpc}
JOIN_USER=${CPC_DC_JOIN_USER:-cpcjoin}
JOIN_PASS=${CPC_DC_JOIN_PASS:-J0in!Pass-cpc}
OU_RDN=${CPC_DC_OU:-OU=CloudPCs}
OU_DN=$OU_RDN,$BASEDN
VLAN=${CPC_DC_VLAN:-}

log() { printf '[dc.sh %(%T)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
nsx() { ip netns exec "$NS" "$@"; }
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
pidof_file() { [[ -s $1 ]] && cat "$1" || true; }

need_pkgs() {
    for b in samba samba-tool smbd winbindd ldapsearch kinit adcli dig dnsmasq ldbsearch; do
        command -v "$b" >/dev/null || die "$b missing: run scripts/test.sh, which installs the test DC's packages"
    done
    [[ -d /usr/share/samba/setup/ad-schema ]] || die "samba-ad-provision missing: run scripts/test.sh"
}

net_up() {
    if ! ip link show "$BR" >/dev/null 2>&1; then
        ip link add "$BR" type bridge
        ip addr add "$HOST_IP/24" dev "$BR"
    fi
    ip link set "$BR" up
    ip netns list | grep -qw "^$NS" || ip netns add "$NS"
    if ! ip link show "$VETH_H" >/dev/null 2>&1; then
        ip link add "$VETH_H" type veth peer name "${NS}-n"
        ip link set "${NS}-n" netns "$NS"
        nsx ip link set "${NS}-n" name eth0
        nsx ip addr add "$DC_IP/24" dev eth0
    fi
    ip link set "$VETH_H" master "$BR" up
    if [[ -n $VLAN ]]; then
        # The DC's port is an access port of VLAN $VLAN: frames of other VLANs never reach it.
        # The host's own address is on that VLAN too (the router and the control plane, as the
        # organisation's network sees them); the bridge's default VLAN 1 reaches neither.
        ip link set "$BR" type bridge vlan_filtering 1
        bridge vlan del dev "$VETH_H" vid 1 2>/dev/null || true
        bridge vlan add dev "$VETH_H" vid "$VLAN" pvid untagged
        bridge vlan add dev "$BR" vid "$VLAN" pvid untagged self
        bridge vlan del dev "$BR" vid 1 self 2>/dev/null || true
    fi
    nsx ip link set lo up
    nsx ip link set eth0 up
    nsx ip route replace default via "$HOST_IP"
    # `ip netns exec` bind-mounts /etc/netns/$NS/* over /etc: without this the DC's helpers
    # (samba_dnsupdate, ...) would send DNS to the host's resolver via the default route.
    mkdir -p "/etc/netns/$NS"
    printf 'search %s\nnameserver %s\n' "$DNSDOMAIN" "$DC_IP" >"/etc/netns/$NS/resolv.conf"
    printf '127.0.0.1 localhost\n%s %s.%s %s\n' "$DC_IP" "$DC_HOST" "$DNSDOMAIN" "$DC_HOST" >"/etc/netns/$NS/hosts"
    # Nothing from the test org network may leave this machine:
    #  - the DC netns may only talk to its /24 (its own netfilter tables, host untouched);
    #  - the host does not forward from the bridge to anywhere else (one tagged rule, removed by down).
    nsx iptables -C OUTPUT -o eth0 ! -d "$NET.0/24" -j REJECT 2>/dev/null ||
        nsx iptables -A OUTPUT -o eth0 ! -d "$NET.0/24" -j REJECT
    iptables -C FORWARD -i "$BR" ! -o "$BR" -m comment --comment cpc-dc-sh -j REJECT 2>/dev/null ||
        iptables -I FORWARD -i "$BR" ! -o "$BR" -m comment --comment cpc-dc-sh -j REJECT
}

provision() {
    [[ -f $D/private/sam.ldb ]] && return 0
    local key="$REALM|$DOMAIN|$DC_HOST|$DC_IP|$ADMIN_PASS|$JOIN_USER|$JOIN_PASS|$OU_DN|$D|v1"
    local tag; tag=$(printf %s "$key" | sha256sum | cut -c1-16)
    if [[ -f $CACHE/dc-$tag.tar ]]; then
        local t; t=$(now)
        mkdir -p "$STATE"; tar -C "$STATE" -xf "$CACHE/dc-$tag.tar"
        log "provision: restored from cache in $(since "$t") s"
        return 0
    fi
    local t; t=$(now)
    rm -rf "$D"; mkdir -p "$D/etc" "$D/run" "$D/log"
    # An empty smb.conf of our own: otherwise provision uses /etc/samba/smb.conf (the package's
    # file server config) as template and refuses/merges its shares and /var paths.
    : >"$CONF"
    nsx samba-tool domain provision -s "$CONF" --targetdir="$D" \
        --server-role=dc --realm="$REALM" --domain="$DOMAIN" --dns-backend=SAMBA_INTERNAL \
        --adminpass="$ADMIN_PASS" --host-name="$DC_HOST" --host-ip="$DC_IP" \
        --option="interfaces = lo eth0" --option="bind interfaces only = yes" \
        --option="log file = $D/log/samba.log" >"$D/log/provision.log" 2>&1 ||
        { tail -20 "$D/log/provision.log" >&2; die "provision failed"; }
    log "provision: samba-tool domain provision took $(since "$t") s"
    # Keep every runtime path inside $D (defaults are /run/samba, /var/lib/samba/...), no DNS
    # forwarder (provision copies the host's resolv.conf nameserver), allow simple binds on 389.
    sed -i '/dns forwarder/d' "$CONF"
    sed -i "/^\[global\]/a\\
\tpid directory = $D/run\\
\tncalrpc dir = $D/run/ncalrpc\\
\twinbindd socket directory = $D/run/winbindd\\
\tntp signd socket directory = $D/run/ntp_signd\\
\tprefork children = 1\\
\tldap server require strong auth = no" "$CONF"
    local st; st=$(now)
    local tool=(samba-tool)
    local H=(-H "$D/private/sam.ldb" -s "$CONF")
    # tests must not break when the cached DB is older than 42 days
    "${tool[@]}" domain passwordsettings set "${H[@]}" --max-pwd-age=0 >/dev/null
    "${tool[@]}" ou create "$OU_DN" "${H[@]}" >/dev/null
    "${tool[@]}" user create "$JOIN_USER" "$JOIN_PASS" "${H[@]}" \
        --description="CloudPC domain join account" >/dev/null
    "${tool[@]}" user setexpiry "$JOIN_USER" --noexpiry "${H[@]}" >/dev/null
    local sid; sid=$(ldbsearch -H "$D/private/sam.ldb" "(sAMAccountName=$JOIN_USER)" objectSid | awk '/^objectSid:/{print $2}')
    [[ -n $sid ]] || die "no SID for $JOIN_USER"
    # Delegation (what the Delegation of Control wizard does for "join a computer to the domain"):
    #  on the OU: create/delete child objects of class computer (bf967a86-...);
    #  inherited onto computer objects in it: full control (GA) — simplest working set for adcli
    #  (it resets the password, writes dNSHostName, servicePrincipalName, userAccountControl,
    #  msDS-SupportedEncryptionTypes, operatingSystem*).
    local sddl="(OA;CI;CCDC;bf967a86-0de6-11d0-a285-00aa003049e2;;$sid)(OA;CIIO;GA;;bf967a86-0de6-11d0-a285-00aa003049e2;$sid)"
    "${tool[@]}" dsacl set "${H[@]}" --objectdn="$OU_DN" --sddl="$sddl" >/dev/null
    log "provision: OU, join user, delegation took $(since "$st") s"
    mkdir -p "$CACHE"; tar -C "$STATE" -cf "$CACHE/dc-$tag.tar" dc
}

samba_start() {
    # Test knobs (for failure-mode tests; use with `dc.sh restart`):
    #   CPC_DC_FAKETIME="+10m"   run the DC with its clock shifted (libfaketime, package faketime)
    #   CPC_DC_SAMBA_OPTS="--option=server services=-dns"   extra samba arguments (here: no DNS)
    local pid; pid=$(pidof_file "$D/run/samba.pid")
    if alive "$pid"; then log "samba already running (pid $pid)"; else
        mkdir -p "$D/run" "$D/log"
        local pre=() extra=()
        if [[ -n ${CPC_DC_FAKETIME:-} ]]; then
            # LD_PRELOAD directly: the `faketime` wrapper waits for its child (blocks on samba -D)
            # and its shared-memory segment vanishes when it exits.
            local lib=/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1
            [[ -f $lib ]] || die "CPC_DC_FAKETIME needs the libfaketime package"
            pre=(env LD_PRELOAD=$lib FAKETIME="$CPC_DC_FAKETIME" FAKETIME_DONT_FAKE_MONOTONIC=1 LDB_MODULES_DISABLE_DEEPBIND=1)
        fi
        [[ -n ${CPC_DC_SAMBA_OPTS:-} ]] && extra=("$CPC_DC_SAMBA_OPTS")
        # smbd/winbindd (spawned by samba) open /var/log/samba/log.{smbd,winbindd} before they
        # read our smb.conf: remember which of those files we create, down removes them if empty.
        local f
        for f in /var/log/samba/log.smbd /var/log/samba/log.winbindd; do
            [[ -e $f ]] || grep -qxF "$f" "$STATE/created-files" 2>/dev/null || echo "$f" >>"$STATE/created-files"
        done
        nsx "${pre[@]}" samba -s "$CONF" -l "$D/log" -D "${extra[@]}"
    fi
}

samba_stop() {
    kill_wait "$(pidof_file "$D/run/samba.pid")"
    local p rest=()
    for p in $(pgrep -f -- "--configfile=$CONF" || true); do rest+=("$p"); done
    ((${#rest[@]})) && kill_wait "${rest[@]}"
    return 0
}

wait_dc() {
    local t; t=$(now) ok=
    for _ in $(seq 1 300); do
        if ldapsearch -x -LLL -o nettimeout=1 -H "ldap://$DC_IP" -s base -b "" currentTime >/dev/null 2>&1 &&
           { [[ ${CPC_DC_SAMBA_OPTS:-} == *-dns* ]] || dig +time=1 +tries=1 +short @"$DC_IP" SRV "_kerberos._tcp.$DNSDOMAIN" | grep -q '^0 '; } &&
           timeout 1 bash -c "exec 3<>/dev/tcp/$DC_IP/88" 2>/dev/null; then ok=1; break; fi
        sleep 0.1
    done
    [[ -n $ok ]] || { tail -30 "$D/log/samba.log" >&2; die "DC did not answer within 30 s"; }
    log "samba: LDAP+DNS+KDC answering $(since "$t") s after start"
}

dhcp_start() {
    local pid; pid=$(pidof_file "$STATE/dnsmasq.pid")
    alive "$pid" && return 0
    nsx dnsmasq --conf-file=/dev/null --port=0 --user=root \
        --interface=eth0 --except-interface=lo --bind-interfaces \
        --dhcp-range="$DHCP_FROM,$DHCP_TO,255.255.255.0,12h" --dhcp-authoritative --no-ping \
        --dhcp-option=option:router,"$HOST_IP" \
        --dhcp-option=option:dns-server,"$DC_IP" \
        --dhcp-option=option:domain-name,"$DNSDOMAIN" \
        --dhcp-option=option:domain-search,"$DNSDOMAIN" \
        --dhcp-leasefile="$STATE/dnsmasq.leases" --pid-file="$STATE/dnsmasq.pid" \
        --log-facility="$STATE/dnsmasq.log" --log-dhcp
}

write_client_conf() {
    cat >"$STATE/krb5.conf" <<EOF
[libdefaults]
    default_realm = $REALM
    dns_lookup_kdc = false
    dns_lookup_realm = false
    rdns = false
    dns_canonicalize_hostname = false
    udp_preference_limit = 0
[realms]
    $REALM = {
        kdc = $DC_IP
        admin_server = $DC_IP
        kpasswd_server = $DC_IP
    }
[domain_realm]
    .$DNSDOMAIN = $REALM
    $DNSDOMAIN = $REALM
EOF
    cat >"$STATE/env" <<EOF
REALM=$REALM
DOMAIN=$DOMAIN
DNSDOMAIN=$DNSDOMAIN
BASEDN=$BASEDN
OU_DN=$OU_DN
DC_IP=$DC_IP
DC_FQDN=$DC_HOST.$DNSDOMAIN
JOIN_USER=$JOIN_USER
JOIN_PASS='$JOIN_PASS'
ADMIN_PASS='$ADMIN_PASS'
KRB5_CONFIG=$STATE/krb5.conf
SMB_CONF=$CONF
SAM_LDB=$D/private/sam.ldb
NETNS=$NS
EOF
}

cmd_up() {
    need_pkgs
    local t; t=$(now)
    mkdir -p "$STATE"
    net_up
    provision
    samba_start
    dhcp_start
    write_client_conf
    wait_dc
    log "up: done in $(since "$t") s — DC $DC_HOST.$DNSDOMAIN at $DC_IP, env in $STATE/env"
}

cmd_status() {
    ip -br addr show "$BR" 2>/dev/null || echo "bridge $BR: absent"
    ip netns list | grep -w "$NS" || echo "netns $NS: absent"
    local p
    p=$(pidof_file "$D/run/samba.pid"); alive "$p" && echo "samba: running (pid $p)" || echo "samba: not running"
    p=$(pidof_file "$STATE/dnsmasq.pid"); alive "$p" && echo "dnsmasq: running (pid $p)" || echo "dnsmasq: not running"
}

kill_wait() {  # pid...
    local p
    for p in "$@"; do alive "$p" && kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
        local any=
        for p in "$@"; do alive "$p" && any=1; done
        [[ -z $any ]] && return 0
        sleep 0.1
    done
    for p in "$@"; do alive "$p" && kill -KILL "$p" 2>/dev/null || true; done
}

cmd_down() {
    local t; t=$(now)
    kill_wait "$(pidof_file "$STATE/dnsmasq.pid")" "$(pidof_file "$D/run/samba.pid")"
    # stragglers: only processes whose command line names our own config/state (never by bare name)
    local p rest=()
    for p in $(pgrep -f -- "$STATE/" || true); do [[ $p != "$$" ]] && rest+=("$p"); done
    ((${#rest[@]})) && kill_wait "${rest[@]}"
    ip netns list | grep -qw "^$NS" && ip netns delete "$NS"
    ip link show "$VETH_H" >/dev/null 2>&1 && ip link delete "$VETH_H"
    ip link show "$BR" >/dev/null 2>&1 && ip link delete "$BR"
    while iptables -C FORWARD -i "$BR" ! -o "$BR" -m comment --comment cpc-dc-sh -j REJECT 2>/dev/null; do
        iptables -D FORWARD -i "$BR" ! -o "$BR" -m comment --comment cpc-dc-sh -j REJECT
    done
    if [[ -f $STATE/created-files ]]; then
        while read -r f; do [[ -f $f && ! -s $f ]] && rm -f "$f"; done <"$STATE/created-files"
    fi
    rm -rf "/etc/netns/$NS" "$STATE"
    rmdir /etc/netns 2>/dev/null || true
    log "down: done in $(since "$t") s"
}

case ${1:-} in
    up) cmd_up ;;
    status) cmd_status ;;
    down) cmd_down ;;
    restart) need_pkgs; samba_stop; samba_start; wait_dc ;;  # honours CPC_DC_FAKETIME / CPC_DC_SAMBA_OPTS
    purge) cmd_down; rm -rf "$CACHE" ;;
    *) echo "usage: $0 up|restart|status|down|purge" >&2; exit 2 ;;
esac
