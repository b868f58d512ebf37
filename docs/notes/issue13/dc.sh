#!/usr/bin/env bash
# dc.sh — a real Samba Active Directory domain controller for tests, on one machine.
#
#   dc.sh install   apt-get the Debian 12 packages (once per machine; not part of `up`)
#   dc.sh up        bridge + netns + provisioned Samba AD DC + DHCP (idempotent)
#   dc.sh check     health checks from the host, each timed (DNS, LDAP, Kerberos, quota)
#   dc.sh client    a DHCP-configured test client netns (cpccli) on the bridge (needs busybox)
#   dc.sh demo      join/disable/delete a test computer + every failure mode, with timings
#   dc.sh status    what is up
#   dc.sh restart   restart samba only (with CPC_DC_FAKETIME / CPC_DC_SAMBA_OPTS test knobs)
#   dc.sh down      remove everything `up` made (processes, netns, veth, bridge, state)
#   dc.sh purge     down + remove the provision cache
#
# Layout (all overridable by environment):
#   host bridge  cpcorg0 10.77.0.1/24         "the organisation's network"
#   netns cpcdc  eth0 10.77.0.10/24 (veth cpcdc-h on the bridge), default via 10.77.0.1
#                runs `samba` (AD DC: LDAP 389, KDC 88, DNS 53, SMB 445, kpasswd 464, ...)
#                and dnsmasq (DHCP only, --port=0) for 10.77.0.100-199.
#   state        $CPC_DC_BASE/state   (removed by down)
#   cache        $CPC_DC_BASE/cache   (freshly provisioned DB, reused by the next up; removed by purge)
set -euo pipefail

BASE=${CPC_DC_BASE:-/tmp/issue13}
STATE=$BASE/state
CACHE=$BASE/cache
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

PKGS="samba samba-ad-dc samba-ad-provision winbind krb5-user ldap-utils ldb-tools adcli bind9-dnsutils dnsmasq-base faketime busybox"
# faketime: only for the clock-skew test (CPC_DC_FAKETIME); busybox: only for `client` (udhcpc)
# samba-ad-provision is only a Recommends of samba-ad-dc, but provisioning fails without it.

log() { printf '[dc.sh %(%T)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
nsx() { ip netns exec "$NS" "$@"; }
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
pidof_file() { [[ -s $1 ]] && cat "$1" || true; }

cmd_install() {
    local t; t=$(now)
    local missing=()
    for p in $PKGS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
    if ((${#missing[@]})); then
        # No service of these packages may start on the host. Debian's invoke-rc.d asks
        # /usr/sbin/policy-rc.d; put a deny-all one in place for the install if there is none.
        local made_policy=
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
        [[ -n $made_policy ]] && rm -f /usr/sbin/policy-rc.d
        # Belt and braces: stop/disable whatever a postinst may still have started on the host
        # (smbd/nmbd/winbind/samba-ad-dc units or init scripts); our DC runs only in the netns.
        for svc in smbd nmbd samba-ad-dc winbind; do
            command -v systemctl >/dev/null && systemctl disable --now "$svc" >/dev/null 2>&1 || true
            [[ -x /etc/init.d/$svc ]] && /etc/init.d/$svc stop >/dev/null 2>&1 || true
        done
    fi
    log "install: done in $(since "$t") s (missing were: ${missing[*]:-none})"
}

need_pkgs() {
    for b in samba samba-tool smbd winbindd ldapsearch kinit adcli dig dnsmasq ldbsearch; do
        command -v "$b" >/dev/null || die "$b missing: run '$0 install' first"
    done
    [[ -d /usr/share/samba/setup/ad-schema ]] || die "samba-ad-provision missing: run '$0 install'"
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

chk_dns() {
    local t; t=$(now); local srv a
    srv=$(dig +time=2 +tries=1 +short @"$DC_IP" SRV "_ldap._tcp.$DNSDOMAIN" 2>&1) || true
    a=$(dig +time=2 +tries=1 +short @"$DC_IP" A "$DNSDOMAIN" 2>&1) || true
    if grep -qE '^[0-9]+ [0-9]+ 389 ' <<<"$srv" && grep -qE '^[0-9.]+$' <<<"$a"; then
        echo "DNS      ok   $(since "$t")s  SRV=[$(echo $srv)] A=[$(echo $a)]"
    else echo "DNS      FAIL $(since "$t")s  $(echo $srv | cut -c1-120)"; return 1; fi
}
chk_ldap() {
    local t; t=$(now); local rd ct
    rd=$(ldapsearch -x -LLL -o nettimeout=2 -o ldif-wrap=no -H "ldap://$DC_IP" -s base -b "" defaultNamingContext currentTime 2>&1) || true
    ct=$(awk '/^currentTime:/{print $2}' <<<"$rd")
    [[ -n $ct ]] || { echo "LDAP     FAIL $(since "$t")s  $(echo $rd)"; return 1; }
    local dcs hs; dcs=$(date -u -d "${ct:0:8} ${ct:8:2}:${ct:10:2}:${ct:12:2}" +%s); hs=$(date -u +%s)
    echo "LDAP     ok   $(since "$t")s  $(awk '/^defaultNamingContext:/{print $2}' <<<"$rd") currentTime=$ct skew=$((hs-dcs))s"
    if (( hs-dcs > 300 || dcs-hs > 300 )); then
        echo "CLOCK    FAIL host-DC skew $((hs-dcs))s, |skew| > 300s (Kerberos default max skew)"; return 1; fi
}
chk_krb() {
    local t; t=$(now); local ko rc=0
    ko=$(printf '%s' "$JOIN_PASS" | KRB5CCNAME=MEMORY: timeout 5 kinit "$JOIN_USER@$REALM" 2>&1 >/dev/null) || rc=$?
    if ((rc == 0)); then echo "KERBEROS ok   $(since "$t")s  kinit $JOIN_USER@$REALM"
    elif ((rc == 124)); then echo "KERBEROS FAIL $(since "$t")s  no answer from KDC $DC_IP:88 within 5 s"; return 1
    else echo "KERBEROS FAIL $(since "$t")s  $ko"; return 1; fi
}
chk_ldap_auth() {  # quota + OU, one simple bind as the join account
    local t; t=$(now); local q
    q=$(ldapsearch -x -LLL -o nettimeout=2 -o ldif-wrap=no -H "ldap://$DC_IP" -D "$JOIN_USER@$DNSDOMAIN" -w "$JOIN_PASS" \
        -s base -b "$BASEDN" ms-DS-MachineAccountQuota 2>&1) || true
    if grep -qi '^ms-DS-MachineAccountQuota:' <<<"$q"; then
        echo "QUOTA    ok   $(since "$t")s  $(grep -i '^ms-DS-MachineAccountQuota:' <<<"$q")"
    else echo "QUOTA    FAIL $(since "$t")s  $(echo $q)"; return 1; fi
    t=$(now); local ou
    ou=$(ldapsearch -x -LLL -o nettimeout=2 -H "ldap://$DC_IP" -D "$JOIN_USER@$DNSDOMAIN" -w "$JOIN_PASS" \
        -s base -b "$OU_DN" dn 2>&1) || true
    if grep -q '^dn:' <<<"$ou"; then echo "OU       ok   $(since "$t")s  $OU_DN"
    else echo "OU       FAIL $(since "$t")s  $(echo $ou)"; return 1; fi
}
cmd_check() {
    # Health checks as the product would do them, from the host, in parallel, each timed.
    export KRB5_CONFIG=$STATE/krb5.conf
    local tmp fail=0 c; tmp=$(mktemp -d)
    for c in dns ldap krb ldap_auth; do "chk_$c" >"$tmp/$c" 2>&1 & done
    wait
    for c in dns ldap krb ldap_auth; do cat "$tmp/$c"; grep -q FAIL "$tmp/$c" && fail=1; done
    rm -rf "$tmp"
    return $fail
}

# A test client on the org network, configured only through the org DHCP (like a Cloud PC VM
# on the bridge would be): netns $CLI_NS, resolv.conf written from the DHCP lease.
CLI_NS=${CPC_DC_CLIENT_NETNS:-cpccli}
cmd_client() {
    command -v busybox >/dev/null || die "client needs busybox (udhcpc): apt-get install busybox"
    local t; t=$(now)
    ip netns list | grep -qw "^$CLI_NS" || ip netns add "$CLI_NS"
    if ! ip link show "${CLI_NS}-h" >/dev/null 2>&1; then
        ip link add "${CLI_NS}-h" type veth peer name "${CLI_NS}-n"
        ip link set "${CLI_NS}-n" netns "$CLI_NS"
        ip -n "$CLI_NS" link set "${CLI_NS}-n" name eth0
    fi
    ip link set "${CLI_NS}-h" master "$BR" up
    ip -n "$CLI_NS" link set lo up; ip -n "$CLI_NS" link set eth0 up
    mkdir -p "/etc/netns/$CLI_NS" "$STATE"
    cat >"$STATE/udhcpc.sh" <<EOF
#!/bin/sh
# busybox udhcpc hook: \$1 = deconfig|bound|renew; env: ip mask router dns domain search
case "\$1" in
  deconfig) ip addr flush dev "\$interface" ;;
  bound|renew)
    ip addr flush dev "\$interface"
    ip addr add "\$ip/\${mask:-24}" dev "\$interface"
    [ -n "\$router" ] && ip route replace default via "\${router%% *}" dev "\$interface"
    { if [ -n "\$search" ]; then echo "search \$search"; elif [ -n "\$domain" ]; then echo "search \$domain"; fi
      for d in \$dns; do echo "nameserver \$d"; done; } > /etc/netns/$CLI_NS/resolv.conf
    env | grep -E '^(ip|mask|subnet|router|dns|domain|search|lease|serverid)=' | sort > $STATE/client.lease
    ;;
esac
EOF
    chmod +x "$STATE/udhcpc.sh"
    ip netns exec "$CLI_NS" busybox udhcpc -i eth0 -n -q -f -t 5 -T 1 -s "$STATE/udhcpc.sh" >"$STATE/udhcpc.log" 2>&1 ||
        { cat "$STATE/udhcpc.log" >&2; die "no DHCP lease"; }
    # the client, like the DC, only talks to the org /24
    ip netns exec "$CLI_NS" iptables -C OUTPUT -o eth0 ! -d "$NET.0/24" -j REJECT 2>/dev/null ||
        ip netns exec "$CLI_NS" iptables -A OUTPUT -o eth0 ! -d "$NET.0/24" -j REJECT
    log "client: netns $CLI_NS got $(grep '^ip=' "$STATE/client.lease") via DHCP in $(since "$t") s"
    cat "$STATE/client.lease" "/etc/netns/$CLI_NS/resolv.conf"
}

cmd_demo() {
    # Reproduces every verification of NOTES.md from the host: checks, join, disable, delete,
    # and the failure modes with their exact error texts. Leaves the DC as it found it.
    export KRB5_CONFIG=$STATE/krb5.conf KRB5CCNAME=FILE:$STATE/demo.ccache
    local t pc=CPC-DEMO01 kt=$STATE/cpc-demo01.keytab cdn
    cdn="CN=CPC-DEMO01,$OU_DN"
    step() { printf '\n=== %s\n' "$*"; }
    join() {  # password computer-name [extra adcli args]
        printf '%s' "$1" | adcli join --domain "$DNSDOMAIN" --domain-controller "$DC_IP" \
            --login-user "$JOIN_USER" --stdin-password --host-fqdn "${2,,}.$DNSDOMAIN" \
            --computer-name "$2" --host-keytab "$STATE/${2,,}.keytab" "${@:3}" 2>&1
    }
    step "health checks (all)"; t=$(now); cmd_check || true; echo "total $(since "$t") s"
    step "adcli join $pc into $OU_DN"; rm -f "$kt"; t=$(now)
    join "$JOIN_PASS" "$pc" --domain-ou "$OU_DN" --os-name="CloudPC demo"; echo "rc=$? in $(since "$t") s"
    samba-tool computer show "$pc" -H "$D/private/sam.ldb" -s "$CONF" --attributes=dn,userAccountControl,dNSHostName,servicePrincipalName
    step "machine account can get a TGT with its keytab"
    kinit -k -t "$kt" "$pc\$@$REALM" 2>&1 && echo ok
    step "disable (userAccountControl |= ACCOUNTDISABLE 0x2) via LDAP as $JOIN_USER"
    local uac; uac=$(ldapsearch -x -LLL -H "ldap://$DC_IP" -D "$JOIN_USER@$DNSDOMAIN" -w "$JOIN_PASS" -s base -b "$cdn" userAccountControl | awk '/^userAccountControl:/{print $2}')
    t=$(now)
    printf 'dn: %s\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: %s\n' "$cdn" $((uac | 2)) |
        ldapmodify -x -H "ldap://$DC_IP" -D "$JOIN_USER@$DNSDOMAIN" -w "$JOIN_PASS" >/dev/null && echo "uac $uac -> $((uac | 2)) in $(since "$t") s"
    samba-tool computer show "$pc" -H "$D/private/sam.ldb" -s "$CONF" --attributes=userAccountControl | grep -i useraccountcontrol
    kinit -k -t "$kt" "$pc\$@$REALM" 2>&1 || true
    step "adcli delete-computer $pc"; t=$(now)
    printf '%s' "$JOIN_PASS" | adcli delete-computer --domain "$DNSDOMAIN" --domain-controller "$DC_IP" \
        --login-user "$JOIN_USER" --stdin-password "$pc" 2>&1; echo "rc=$? in $(since "$t") s"
    samba-tool computer list -H "$D/private/sam.ldb" -s "$CONF" | grep -c "^$pc" || true
    step "FAIL wrong password"
    printf 'wrong' | kinit "$JOIN_USER@$REALM" 2>&1 >/dev/null || true
    join wrong CPC-DEMO02 --domain-ou "$OU_DN" || true
    ldapsearch -x -LLL -H "ldap://$DC_IP" -D "$JOIN_USER@$DNSDOMAIN" -w wrong -s base -b "" dn 2>&1 || true
    step "FAIL nonexistent OU"
    join "$JOIN_PASS" CPC-DEMO02 --domain-ou "OU=Nope,$BASEDN" || true
    step "FAIL DNS: nothing answers at $NET.99"; t=$(now)
    dig +time=2 +tries=1 @"$NET.99" SRV "_ldap._tcp.$DNSDOMAIN" 2>&1 | grep -E '^;; (comm|no servers)' || true; echo "($(since "$t") s)"
    step "FAIL DNS: DC running without its DNS service"
    CPC_DC_SAMBA_OPTS="--option=server services=-dns" samba_stop_start
    dig +time=2 +tries=1 @"$DC_IP" SRV "_ldap._tcp.$DNSDOMAIN" 2>&1 | grep -E '^;; (comm|no servers)' || true
    step "FAIL clock: DC 10 minutes ahead (libfaketime on samba)"
    CPC_DC_FAKETIME=+10m samba_stop_start
    cmd_check | grep -E 'LDAP|CLOCK' || true
    echo "- MIT kinit with default kdc_timesync=1 (corrects itself using the KDC's time):"
    printf '%s' "$JOIN_PASS" | kinit "$JOIN_USER@$REALM" >/dev/null 2>&1 && echo "  kinit ok (no error!)"
    sed 's/^\[libdefaults\]/[libdefaults]\n    kdc_timesync = 0/' "$STATE/krb5.conf" >"$STATE/krb5-notimesync.conf"
    echo "- with kdc_timesync = 0:"
    printf '%s' "$JOIN_PASS" | KRB5_CONFIG=$STATE/krb5-notimesync.conf kinit "$JOIN_USER@$REALM" 2>&1 >/dev/null || true
    KRB5_CONFIG=$STATE/krb5-notimesync.conf join "$JOIN_PASS" CPC-DEMO03 --domain-ou "$OU_DN" || true
    samba_stop_start
    kdestroy -q 2>/dev/null || true
}
samba_stop_start() { samba_stop; samba_start; wait_dc; }

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
    ip netns list | grep -qw "^$CLI_NS" && ip netns delete "$CLI_NS"
    ip link show "${CLI_NS}-h" >/dev/null 2>&1 && ip link delete "${CLI_NS}-h"
    rm -rf "/etc/netns/$CLI_NS"
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
    install) cmd_install ;;
    up) cmd_up ;;
    check) cmd_check ;;
    status) cmd_status ;;
    down) cmd_down ;;
    client) cmd_client ;;
    demo) cmd_demo ;;
    restart) need_pkgs; samba_stop; samba_start; wait_dc ;;  # honours CPC_DC_FAKETIME / CPC_DC_SAMBA_OPTS
    purge) cmd_down; rm -rf "$CACHE" ;;
    *) echo "usage: $0 install|up|check|status|down|purge" >&2; exit 2 ;;
esac
