//! Health checks of a network connection, run on a host: does the organisation's network reach
//! this host, and can a Cloud PC on it find and join the domain?
//!
//! The checks stand where a Cloud PC would stand. A throwaway network namespace gets a veth port
//! on the connection's bridge (an access port of its VLAN, if any), takes an address from the
//! organisation's DHCP, and from there asks the organisation's DNS for the domain's SRV records,
//! reads the domain controller's root DSE over LDAP (naming context and clock), gets a Kerberos
//! ticket for the join account, joins a test computer to the OU and deletes it again, reads the
//! machine-account quota, and connects to the control plane. The host's own resolver and routes
//! play no part: what passes here is what a Cloud PC on that bridge gets.
//!
//! The work is done by the tools an administrator would use (busybox `udhcpc`, `dig`,
//! `ldapsearch`, `kinit`, `adcli`), so a failure's text is the one they know; each runs with a
//! time limit, and the checks after DNS run at once, so the whole set stays under 10 s even
//! when the domain controller does not answer. Passwords reach the tools on stdin or in a 0600
//! file that is removed afterwards, never on a command line.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// What to check: one host's view of one connection.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkCheckSpec {
    pub bridge: String,
    pub vlan: Option<u16>,
    /// The Active Directory domain (DNS name); `None` for a connection without domain join.
    pub domain: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub organizational_unit: Option<String>,
    /// `host:port` of the control plane as Cloud PCs reach it (the public URL), if one is set.
    pub control_plane: Option<String>,
}

impl std::fmt::Debug for NetworkCheckSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkCheckSpec")
            .field("bridge", &self.bridge)
            .field("vlan", &self.vlan)
            .field("domain", &self.domain)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "(hidden)"))
            .field("organizational_unit", &self.organizational_unit)
            .field("control_plane", &self.control_plane)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckOutcome {
    Passed,
    Warning,
    Failed,
}

/// One check's result. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub outcome: CheckOutcome,
    pub started_ms: i64,
    pub ended_ms: i64,
    pub details: String,
    pub remedy: Option<String>,
}

/// The display names of the checks, in the order they are reported.
pub const BRIDGE: &str = "Host bridge";
pub const DHCP: &str = "DHCP";
pub const DNS: &str = "DNS";
pub const LDAP: &str = "Domain controller (LDAP)";
pub const KERBEROS: &str = "Kerberos and credentials";
pub const CLOCK: &str = "Clock";
pub const JOIN: &str = "Domain join to the OU";
pub const QUOTA: &str = "Machine account quota";
pub const CONTROL_PLANE: &str = "Control plane reachable";

/// Kerberos refuses tickets beyond this clock difference by default.
const MAX_SKEW_SECS: i64 = 300;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

struct Timed {
    name: &'static str,
    started: i64,
}

impl Timed {
    fn start(name: &'static str) -> Self {
        Self { name, started: now_ms() }
    }
    fn end(self, outcome: CheckOutcome, details: impl Into<String>, remedy: Option<String>) -> CheckResult {
        CheckResult {
            name: self.name.into(),
            outcome,
            started_ms: self.started,
            ended_ms: now_ms(),
            details: details.into(),
            remedy,
        }
    }
    fn passed(self, details: impl Into<String>) -> CheckResult {
        self.end(CheckOutcome::Passed, details, None)
    }
    fn failed(self, details: impl Into<String>, remedy: impl Into<String>) -> CheckResult {
        self.end(CheckOutcome::Failed, details, Some(remedy.into()))
    }
    fn warning(self, details: impl Into<String>, remedy: impl Into<String>) -> CheckResult {
        self.end(CheckOutcome::Warning, details, Some(remedy.into()))
    }
}

/// What a tool printed, and whether it succeeded in time.
struct Ran {
    ok: bool,
    timed_out: bool,
    out: String,
    err: String,
}

impl Ran {
    /// The tool's own words, on one line.
    fn said(&self) -> String {
        let text = if self.err.trim().is_empty() { &self.out } else { &self.err };
        let one: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let s = one.join(" / ");
        if s.len() > 400 {
            format!("{}…", &s[..s.char_indices().nth(400).map(|(i, _)| i).unwrap_or(s.len())])
        } else {
            s
        }
    }
}

/// Runs `args` (inside the namespace `ns` when given) with `stdin`, for at most `limit`.
async fn run(ns: Option<&str>, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>, limit: Duration) -> Ran {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(args);
            c
        }
        None => {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        }
    };
    cmd.envs(env.iter().copied())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Ran { ok: false, timed_out: false, out: String::new(), err: format!("cannot run {}: {e}", args[0]) }
        }
    };
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(text.as_bytes()).await;
        drop(pipe);
    }
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(o)) => Ran {
            ok: o.status.success(),
            timed_out: false,
            out: String::from_utf8_lossy(&o.stdout).into_owned(),
            err: String::from_utf8_lossy(&o.stderr).into_owned(),
        },
        Ok(Err(e)) => Ran { ok: false, timed_out: false, out: String::new(), err: e.to_string() },
        Err(_) => Ran { ok: false, timed_out: true, out: String::new(), err: String::new() },
    }
}

/// The throwaway namespace and its veth port; removed on drop, whatever happened.
struct Probe {
    ns: String,
    port: String,
    dir: PathBuf,
}

impl Drop for Probe {
    fn drop(&mut self) {
        // Synchronous on purpose: drop may run while the runtime is shutting down.
        // The lease goes back to the organisation's DHCP: a run every few hours from every host
        // must not use up its pool. Skipped when no lease was taken.
        if self.dir.join("lease").exists() {
            release_lease(&self.ns, &self.dir);
        }
        let _ = std::process::Command::new("ip").args(["netns", "delete", &self.ns]).output();
        let _ = std::process::Command::new("ip").args(["link", "delete", &self.port]).output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.ns));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Gives the probe's lease back: a udhcpc asks for the same address again, and on SIGUSR2 sends
/// the server a DHCPRELEASE (udhcpc -q -R exits without sending one). At most about 4 s.
fn release_lease(ns: &str, dir: &Path) {
    let log = dir.join("release.log");
    let Ok(out) = std::fs::File::create(&log) else { return };
    let Ok(err) = out.try_clone() else { return };
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "busybox", "udhcpc", "-i", "eth0", "-f", "-n", "-t", "2", "-T", "1"])
        .args(["-s", "/bin/true"])
        .stdout(out)
        .stderr(err)
        .spawn();
    let Ok(mut child) = child else { return };
    // `ip netns exec` execs udhcpc: the child's pid is udhcpc's.
    let pid = child.id().to_string();
    let said = |what: &str| std::fs::read_to_string(&log).is_ok_and(|t| t.contains(what));
    let wait_for = |what: &str, limit: Duration| {
        let start = std::time::Instant::now();
        while !said(what) && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
        said(what)
    };
    if wait_for("obtained", Duration::from_secs(3)) {
        let _ = std::process::Command::new("kill").args(["-USR2", &pid]).output();
        wait_for("released", Duration::from_secs(1));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A short random tag for names (interface names are at most 15 characters).
fn tag() -> String {
    // A counter too, so two probes started in the same nanosecond still differ.
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let mixed = (nanos as u64 ^ (n << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((std::process::id() as u64) << 20);
    format!("{:08x}", (mixed >> 16) as u32)
}

/// Asks the organisation's DHCP for a lease on the probe's port (3 tries, 1 s apart); the
/// script [`prepare`] wrote records it.
async fn take_lease(probe: &Probe) -> (Ran, Option<Lease>) {
    let script = probe.dir.join("udhcpc.sh").to_string_lossy().into_owned();
    let ran = run(
        Some(&probe.ns),
        &["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "3", "-T", "1", "-s", &script],
        &[],
        None,
        Duration::from_secs(6),
    )
    .await;
    (ran, read_lease(&probe.dir.join("lease")))
}

/// One DNS question (`kind` `name`) to `server`, from the probe.
async fn dig(ns: &str, server: &str, kind: &str, name: &str) -> Ran {
    let at = format!("@{server}");
    run(Some(ns), &["dig", "+time=2", "+tries=1", "+short", &at, kind, name], &[], None, Duration::from_secs(4)).await
}

/// The first SRV target in dig's short answer (`0 100 389 dc1.corp.contoso.com.`).
fn srv_target(r: &Ran) -> Option<String> {
    r.out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() == 4 && f[0].parse::<u16>().is_ok()).then(|| f[3].trim_end_matches('.').to_string())
    })
}

/// The first IPv4 address in dig's short answer.
fn first_address(r: &Ran) -> Option<String> {
    r.out.lines().map(str::trim).find(|l| l.parse::<std::net::Ipv4Addr>().is_ok()).map(str::to_string)
}

/// The lease udhcpc got: address, router, DNS servers, domain.
#[derive(Debug, Default)]
struct Lease {
    ip: String,
    router: String,
    dns: Vec<String>,
    domain: String,
}

fn read_lease(path: &Path) -> Option<Lease> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lease = Lease::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        match k {
            "ip" => lease.ip = v.to_string(),
            "router" => lease.router = v.split_whitespace().next().unwrap_or("").to_string(),
            "dns" => lease.dns = v.split_whitespace().map(str::to_string).collect(),
            "domain" => lease.domain = v.to_string(),
            _ => {}
        }
    }
    (!lease.ip.is_empty()).then_some(lease)
}

/// `DC=corp,DC=contoso,DC=com` for `corp.contoso.com`.
pub fn base_dn(domain: &str) -> String {
    domain.split('.').map(|l| format!("DC={l}")).collect::<Vec<_>>().join(",")
}

/// The account's name without a domain (`CORP\join`, `join@corp.contoso.com` → `join`).
pub fn account_name(username: &str) -> &str {
    let name = username.rsplit('\\').next().unwrap_or(username);
    name.split('@').next().unwrap_or(name)
}

/// LDAP's GeneralizedTime (`20261201033335.0Z`) as seconds since the epoch.
fn generalized_time(s: &str) -> Option<i64> {
    let d = s.get(..14)?;
    let n = |r: std::ops::Range<usize>| d.get(r)?.parse::<i64>().ok();
    let (y, mo, day, h, mi, sec) = (n(0..4)?, n(4..6)?, n(6..8)?, n(8..10)?, n(10..12)?, n(12..14)?);
    // Days from the civil date (Howard Hinnant's algorithm): no date crate in this layer.
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec)
}

/// The value of `attr:` in ldapsearch's LDIF output.
fn ldif_value<'a>(ldif: &'a str, attr: &str) -> Option<&'a str> {
    ldif.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(attr).then(|| v.trim())
    })
}

/// Runs every check for `spec` on this host. Needs root (namespaces, bridge ports).
pub async fn run_checks(spec: &NetworkCheckSpec) -> Vec<CheckResult> {
    let mut results = Vec::new();

    // The bridge, and its VLAN.
    let t = Timed::start(BRIDGE);
    let sys = PathBuf::from("/sys/class/net").join(&spec.bridge);
    let bridge_fix = format!(
        "Create the bridge on this host and give it the port that leads to the organisation's network \
         (ip link add {0} type bridge; ip link set <uplink> master {0}; ip link set {0} up), or correct the \
         connection's bridgeName.",
        spec.bridge
    );
    if !sys.join("bridge").is_dir() {
        let what = if sys.exists() { "exists but is not a bridge" } else { "does not exist" };
        results.push(t.failed(format!("The interface {} {what} on this host.", spec.bridge), bridge_fix));
        return results;
    }
    let flags = std::fs::read_to_string(sys.join("flags")).unwrap_or_default();
    let up = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).is_ok_and(|f| f & 1 == 1);
    if !up {
        results.push(t.failed(
            format!("The bridge {} is down.", spec.bridge),
            format!("Bring it up: ip link set {} up.", spec.bridge),
        ));
        return results;
    }
    if let Some(vlan) = spec.vlan {
        let filtering = std::fs::read_to_string(sys.join("bridge/vlan_filtering")).unwrap_or_default();
        if filtering.trim() != "1" {
            results.push(t.failed(
                format!("The connection uses VLAN {vlan}, but the bridge {} does not filter VLANs.", spec.bridge),
                format!(
                    "Turn on VLAN filtering (ip link set {0} type bridge vlan_filtering 1) and let the uplink \
                     carry VLAN {vlan} (bridge vlan add dev <uplink> vid {vlan}).",
                    spec.bridge
                ),
            ));
            return results;
        }
        let shown = run(None, &["bridge", "vlan", "show"], &[], None, Duration::from_secs(3)).await;
        let carried = shown.out.lines().any(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            // Lines are "<port> <vid> [flags]" or "      <vid> [flags]" for the same port.
            fields.iter().any(|f| *f == vlan.to_string())
        });
        if !carried {
            results.push(t.failed(
                format!("No port of the bridge {} carries VLAN {vlan}.", spec.bridge),
                format!("Let the uplink carry it: bridge vlan add dev <uplink> vid {vlan}."),
            ));
            return results;
        }
        results.push(t.passed(format!("The bridge {} is up and carries VLAN {vlan}.", spec.bridge)));
    } else {
        results.push(t.passed(format!("The bridge {} is up.", spec.bridge)));
    }

    // The probe's namespace, on the bridge like a Cloud PC's NIC.
    let t = Timed::start(DHCP);
    let id = tag();
    let probe = Probe {
        ns: format!("cpchc{id}"),
        port: format!("hc{id}"),
        dir: std::env::temp_dir().join(format!("cloudpc-netcheck-{id}")),
    };
    if let Err(e) = prepare(&probe, spec).await {
        results.push(t.failed(
            format!("The check could not put a test port on the bridge: {e}"),
            "The health checks need root on the host (network namespaces and bridge ports); run cloudpc's \
             service or host agent as root.",
        ));
        return results;
    }
    let (dhcp, lease) = take_lease(&probe).await;
    let Some(lease) = lease else {
        let seen = if dhcp.timed_out { "no answer within 6 s".to_string() } else { dhcp.said() };
        let where_ = match spec.vlan {
            Some(v) => format!("the bridge {} on VLAN {v}", spec.bridge),
            None => format!("the bridge {}", spec.bridge),
        };
        results.push(t.failed(
            format!("No DHCP server gave an address on {where_} ({seen})."),
            "Make sure the organisation's DHCP serves this network segment (or relays to it) and has free \
             addresses, and that the bridge's uplink is the right port and VLAN.",
        ));
        return results;
    };
    results.push(t.passed(format!(
        "Got {} from DHCP (router {}, DNS {}{}).",
        lease.ip,
        if lease.router.is_empty() { "none" } else { &lease.router },
        if lease.dns.is_empty() { "none".to_string() } else { lease.dns.join(" ") },
        if lease.domain.is_empty() { String::new() } else { format!(", domain {}", lease.domain) }
    )));

    let control_plane = control_plane_check(&probe, spec);
    let Some(domain) = spec.domain.as_deref() else {
        results.push(control_plane.await);
        return results;
    };

    // DNS: the domain's SRV records, asked of the DNS server the lease names.
    let t = Timed::start(DNS);
    let Some(dns) = lease.dns.first().cloned() else {
        results.push(t.failed(
            "The DHCP lease names no DNS server.",
            "Let the DHCP server hand out the domain's DNS servers (option 6).",
        ));
        results.push(control_plane.await);
        return results;
    };
    let ldap_srv = format!("_ldap._tcp.{domain}");
    let krb_srv = format!("_kerberos._tcp.{domain}");
    let (ldap_ans, krb_ans) =
        tokio::join!(dig(&probe.ns, &dns, "SRV", &ldap_srv), dig(&probe.ns, &dns, "SRV", &krb_srv));
    let (Some(dc_name), Some(_)) = (srv_target(&ldap_ans), srv_target(&krb_ans)) else {
        let said = if ldap_ans.timed_out || ldap_ans.out.contains("timed out") {
            format!("the DNS server {dns} did not answer")
        } else if ldap_ans.out.trim().is_empty() && ldap_ans.ok {
            format!("{dns} knows no {ldap_srv} or {krb_srv} records")
        } else {
            ldap_ans.said()
        };
        results.push(t.failed(
            format!("The domain's domain controllers were not found in DNS: {said}."),
            format!(
                "Check that adDomainName ({domain}) is the domain's DNS name and that the DNS server the DHCP \
                 lease names ({dns}) is the domain's DNS (it must answer {ldap_srv})."
            ),
        ));
        results.push(control_plane.await);
        return results;
    };
    let Some(dc_ip) = first_address(&dig(&probe.ns, &dns, "A", &dc_name).await) else {
        results.push(t.failed(
            format!("{dc_name} (the domain controller named by {ldap_srv}) has no address in DNS."),
            format!("Add the A record of {dc_name} on the domain's DNS server."),
        ));
        results.push(control_plane.await);
        return results;
    };
    results.push(t.passed(format!("{dns} lists {dc_name} ({dc_ip}) under {ldap_srv} and {krb_srv}.")));

    // Everything else at once.
    let (ldap, kerberos, join, quota, control) = tokio::join!(
        ldap_and_clock(&probe, domain, &dc_name, &dc_ip),
        kerberos_check(&probe, spec, domain, &dc_ip),
        join_check(&probe, spec, domain, &dc_ip),
        quota_check(&probe, spec, domain, &dc_ip),
        control_plane,
    );
    results.extend(ldap);
    results.extend([kerberos, join, quota, control]);
    results
}

/// The namespace, its port on the bridge (an access port of the VLAN), and the DHCP client's
/// script, which records the lease and the DNS servers for tools run inside.
async fn prepare(probe: &Probe, spec: &NetworkCheckSpec) -> Result<(), String> {
    std::fs::create_dir_all(&probe.dir).map_err(|e| format!("cannot create {}: {e}", probe.dir.display()))?;
    let etc = format!("/etc/netns/{}", probe.ns);
    std::fs::create_dir_all(&etc).map_err(|e| format!("cannot create {etc}: {e}"))?;
    let script = format!(
        "#!/bin/sh\n\
         case \"$1\" in\n\
         deconfig) ip addr flush dev \"$interface\" ;;\n\
         bound|renew)\n\
           ip addr flush dev \"$interface\"\n\
           ip addr add \"$ip/${{mask:-24}}\" dev \"$interface\"\n\
           [ -n \"$router\" ] && ip route replace default via \"${{router%% *}}\" dev \"$interface\"\n\
           {{ [ -n \"$domain\" ] && echo \"search $domain\"; for d in $dns; do echo \"nameserver $d\"; done; }} > {etc}/resolv.conf\n\
           {{ echo \"ip=$ip\"; echo \"router=$router\"; echo \"dns=$dns\"; echo \"domain=$domain\"; }} > {dir}/lease\n\
           ;;\n\
         esac\n",
        dir = probe.dir.display()
    );
    let path = probe.dir.join("udhcpc.sh");
    std::fs::write(&path, script).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(|e| e.to_string())?;
    let peer = format!("{}n", probe.port);
    let limit = Duration::from_secs(3);
    let steps: Vec<Vec<String>> = vec![
        vec!["ip".into(), "netns".into(), "add".into(), probe.ns.clone()],
        vec!["ip", "link", "add", &probe.port, "type", "veth", "peer", "name", &peer]
            .into_iter()
            .map(String::from)
            .collect(),
        vec!["ip", "link", "set", &peer, "netns", &probe.ns].into_iter().map(String::from).collect(),
        vec!["ip", "-n", &probe.ns, "link", "set", &peer, "name", "eth0"].into_iter().map(String::from).collect(),
        vec!["ip", "-n", &probe.ns, "link", "set", "lo", "up"].into_iter().map(String::from).collect(),
        vec!["ip", "-n", &probe.ns, "link", "set", "eth0", "up"].into_iter().map(String::from).collect(),
        vec!["ip", "link", "set", &probe.port, "master", &spec.bridge, "up"].into_iter().map(String::from).collect(),
    ];
    for step in steps {
        let args: Vec<&str> = step.iter().map(String::as_str).collect();
        let r = run(None, &args, &[], None, limit).await;
        if !r.ok {
            return Err(format!("{}: {}", args.join(" "), r.said()));
        }
    }
    if let Some(vlan) = spec.vlan {
        tag_access_port(&probe.port, vlan).await?;
    }
    Ok(())
}

/// Makes a bridge port an access port of `vlan`: it carries that VLAN only, untagged towards
/// what is plugged in (a Cloud PC, or the probe). The bridge's default VLAN 1 is taken off it, so
/// nothing else reaches the port. Done with iproute2's `bridge`, which the health checks need
/// anyway, rather than netlink messages written by hand.
pub async fn tag_access_port(port: &str, vlan: u16) -> Result<(), String> {
    let (vid, limit) = (vlan.to_string(), Duration::from_secs(5));
    let sys = Path::new("/sys/class/net");
    let bridge = std::fs::read_link(sys.join(port).join("master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .ok_or_else(|| format!("port {port} is on no bridge, so it cannot be put on VLAN {vlan}"))?;
    let filtering = std::fs::read_to_string(sys.join(&bridge).join("bridge/vlan_filtering")).unwrap_or_default();
    if filtering.trim() != "1" {
        // Else the port would carry the bridge's untagged traffic: the wrong network.
        return Err(format!(
            "the bridge {bridge} does not filter VLANs, so port {port} cannot be kept to VLAN {vlan}: turn it on \
             (ip link set {bridge} type bridge vlan_filtering 1)"
        ));
    }
    let added =
        run(None, &["bridge", "vlan", "add", "dev", port, "vid", &vid, "pvid", "untagged"], &[], None, limit).await;
    if !added.ok {
        return Err(format!("cannot put port {port} on VLAN {vlan} (bridge vlan add): {}", added.said()));
    }
    if vlan != 1 {
        // Absent already when an earlier run took it off: nothing to do then.
        let _ = run(None, &["bridge", "vlan", "del", "dev", port, "vid", "1"], &[], None, limit).await;
    }
    Ok(())
}

/// How an LDAP tool binds: anonymously, or as `who` with the password in the file `password`.
type Bind<'a> = Option<(&'a str, &'a Path)>;

/// Runs `tool` (ldapsearch or ldapmodify) in the probe against the domain controller, for at most
/// 5 s, with `args` after the connection and bind options (`input` on stdin).
async fn ldap(probe: &Probe, tool: &str, dc_ip: &str, bind: Bind<'_>, args: &[&str], input: Option<&str>) -> Ran {
    let url = format!("ldap://{dc_ip}");
    let mut argv = vec![tool, "-x", "-o", "nettimeout=3", "-H", &url];
    let file;
    if let Some((who, password)) = bind {
        file = password.to_string_lossy().into_owned();
        argv.extend(["-D", who, "-y", &file]);
    }
    if tool == "ldapsearch" {
        argv.extend(["-LLL", "-o", "ldif-wrap=no"]);
    }
    argv.extend_from_slice(args);
    run(Some(&probe.ns), &argv, &[], input, Duration::from_secs(5)).await
}

/// The root DSE, read anonymously: the naming context must be the domain's, and its clock gives
/// the skew (read here rather than waiting for Kerberos to complain, which MIT Kerberos does not:
/// it corrects for the KDC's time by itself, while Windows does not).
async fn ldap_and_clock(probe: &Probe, domain: &str, dc_name: &str, dc_ip: &str) -> Vec<CheckResult> {
    let t = Timed::start(LDAP);
    let r =
        ldap(probe, "ldapsearch", dc_ip, None, &["-s", "base", "-b", "", "defaultNamingContext", "currentTime"], None)
            .await;
    let naming = ldif_value(&r.out, "defaultNamingContext").map(str::to_string);
    let Some(naming) = naming else {
        let said = if r.timed_out { "no answer within 5 s".into() } else { r.said() };
        return vec![t.failed(
            format!("The domain controller {dc_name} ({dc_ip}) did not answer LDAP on port 389: {said}."),
            format!("Check that {dc_name} is running and that firewalls let this network reach it on TCP 389."),
        )];
    };
    let want = base_dn(domain);
    let ldap = if naming.eq_ignore_ascii_case(&want) {
        t.passed(format!("{dc_name} answers LDAP for {naming}."))
    } else {
        t.failed(
            format!("{dc_name} serves {naming}, not {want}."),
            format!("Correct adDomainName ({domain}) or the DNS records that point to {dc_name}."),
        )
    };
    let t = Timed::start(CLOCK);
    let clock = match ldif_value(&r.out, "currentTime").and_then(generalized_time) {
        None => t.warning(
            format!("{dc_name} did not give its time."),
            "Compare the domain controller's clock with the host's by hand.",
        ),
        Some(dc_time) => {
            let skew = now_ms() / 1000 - dc_time;
            if skew.abs() > MAX_SKEW_SECS {
                t.failed(
                    format!(
                        "The domain controller's clock is {} s {} this host's; Kerberos allows {MAX_SKEW_SECS} s.",
                        skew.abs(),
                        if skew < 0 { "ahead of" } else { "behind" }
                    ),
                    "Synchronise the domain controller and the hosts with the same time source (NTP).",
                )
            } else {
                t.passed(format!("The domain controller's clock is within {} s of this host's.", skew.abs().max(1)))
            }
        }
    };
    vec![ldap, clock]
}

fn krb5_conf(probe: &Probe, realm: &str, dc_ip: &str) -> std::io::Result<PathBuf> {
    let path = probe.dir.join("krb5.conf");
    std::fs::write(
        &path,
        format!(
            "[libdefaults]\n default_realm = {realm}\n dns_lookup_kdc = false\n dns_lookup_realm = false\n \
             rdns = false\n udp_preference_limit = 0\n[realms]\n {realm} = {{\n  kdc = {dc_ip}\n }}\n"
        ),
    )?;
    Ok(path)
}

fn credentials_remedy(spec: &NetworkCheckSpec) -> String {
    format!(
        "Check adDomainUsername ({}) and adDomainPassword: the account must exist, be enabled and have this \
         password.",
        spec.username.as_deref().unwrap_or("")
    )
}

/// A real Kerberos exchange as the join account: the KDC answers and the password is right.
async fn kerberos_check(probe: &Probe, spec: &NetworkCheckSpec, domain: &str, dc_ip: &str) -> CheckResult {
    let t = Timed::start(KERBEROS);
    let (Some(user), Some(password)) = (spec.username.as_deref(), spec.password.as_deref()) else {
        return t.failed(
            "The connection has no domain account or no password.",
            "Set adDomainUsername and adDomainPassword.",
        );
    };
    let realm = domain.to_ascii_uppercase();
    let conf = match krb5_conf(probe, &realm, dc_ip) {
        Ok(p) => p,
        Err(e) => return t.failed(format!("cannot write a Kerberos configuration: {e}"), "Check the host's /tmp."),
    };
    let principal = format!("{}@{realm}", account_name(user));
    let conf = conf.to_string_lossy().into_owned();
    let r = run(
        Some(&probe.ns),
        &["kinit", &principal],
        &[("KRB5_CONFIG", conf.as_str()), ("KRB5CCNAME", "MEMORY:")],
        Some(password),
        Duration::from_secs(5),
    )
    .await;
    if r.ok {
        return t.passed(format!("The KDC at {dc_ip} gave {principal} a ticket."));
    }
    let said = r.said();
    if r.timed_out || said.contains("Cannot contact any KDC") {
        t.failed(
            format!("The KDC at {dc_ip} did not answer on port 88."),
            "Let this network reach the domain controllers on TCP and UDP 88.",
        )
    } else if said.contains("Password incorrect") || said.contains("Preauthentication failed") {
        t.failed(format!("The password of {principal} is wrong ({said})."), credentials_remedy(spec))
    } else if said.contains("not found in Kerberos database") {
        t.failed(format!("The domain has no account {principal} ({said})."), credentials_remedy(spec))
    } else if said.contains("revoked") || said.contains("expired") {
        t.failed(format!("The account {principal} cannot sign in ({said})."), credentials_remedy(spec))
    } else {
        t.failed(format!("Kerberos refused {principal}: {said}"), credentials_remedy(spec))
    }
}

/// Runs `adcli <command>` in the probe as `account` against the domain controller at `dc_ip`
/// (no DNS discovery: the DNS check has found it), the password on stdin.
#[allow(clippy::too_many_arguments)]
async fn adcli(
    probe: &Probe,
    command: &str,
    domain: &str,
    dc_ip: &str,
    account: &str,
    password: &str,
    extra: &[&str],
    limit: Duration,
) -> Ran {
    let mut argv = vec![
        "adcli",
        command,
        "--domain",
        domain,
        "--domain-controller",
        dc_ip,
        "--login-user",
        account,
        "--stdin-password",
    ];
    argv.extend_from_slice(extra);
    run(Some(&probe.ns), &argv, &[], Some(password), limit).await
}

/// Joins a test computer to the OU with the connection's account, then deletes it.
async fn join_check(probe: &Probe, spec: &NetworkCheckSpec, domain: &str, dc_ip: &str) -> CheckResult {
    let t = Timed::start(JOIN);
    let (Some(user), Some(password), Some(ou)) =
        (spec.username.as_deref(), spec.password.as_deref(), spec.organizational_unit.as_deref())
    else {
        return t.failed(
            "The connection lacks the account, its password or the organizational unit.",
            "Set adDomainUsername, adDomainPassword and organizationalUnit.",
        );
    };
    let name = format!("CPCHC{}", &tag()[..6].to_ascii_uppercase());
    let fqdn = format!("{}.{domain}", name.to_ascii_lowercase());
    let keytab = probe.dir.join("join.keytab").to_string_lossy().into_owned();
    let account = account_name(user);
    let extra = ["--domain-ou", ou, "--computer-name", &name, "--host-fqdn", &fqdn, "--host-keytab", &keytab];
    let joined = adcli(probe, "join", domain, dc_ip, account, password, &extra, Duration::from_secs(8)).await;
    if !joined.ok {
        let said = if joined.timed_out { "no answer within 8 s".into() } else { joined.said() };
        let remedy = if said.contains("organizational unit does not exist") {
            format!("Create the OU {ou}, or correct organizationalUnit.")
        } else if said.contains("Insufficient permissions") || said.contains("acl:") {
            format!(
                "Delegate to {account} the right to create and delete computer objects in {ou} (Delegation of \
                 Control: \"Create, delete, and manage computer accounts\")."
            )
        } else if said.contains("Preauthentication failed") || said.contains("Couldn't authenticate") {
            credentials_remedy(spec)
        } else if said.contains("Clock skew") {
            "Synchronise the domain controller and the hosts with the same time source (NTP).".into()
        } else {
            format!("Check that {account} may join computers to {ou} from this network.")
        };
        return t.failed(format!("A test computer could not be joined to {ou}: {said}"), remedy);
    }
    let deleted =
        adcli(probe, "delete-computer", domain, dc_ip, account, password, &[&name], Duration::from_secs(6)).await;
    if deleted.ok {
        t.passed(format!("{account} joined the test computer {name} to {ou} and deleted it again."))
    } else {
        t.warning(
            format!("{account} joined the test computer {name} to {ou} but could not delete it: {}", deleted.said()),
            format!(
                "Delete the computer object {name} by hand, and give {account} the right to delete computers in {ou}."
            ),
        )
    }
}

/// Writes the password where ldapsearch/ldapmodify read it (`-y`): a 0600 file in the probe's
/// directory, removed with it.
fn password_file(probe: &Probe, password: &str) -> Result<PathBuf, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = probe.dir.join("ldap.pw");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(password.as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// ms-DS-MachineAccountQuota, read with a simple bind as the account. Only ever a warning: an
/// account with delegated rights on the OU joins whatever the quota says, and some domain
/// controllers (Samba) do not apply it at all.
async fn quota_check(probe: &Probe, spec: &NetworkCheckSpec, domain: &str, dc_ip: &str) -> CheckResult {
    let t = Timed::start(QUOTA);
    let (Some(user), Some(password)) = (spec.username.as_deref(), spec.password.as_deref()) else {
        return t.warning("Not checked: no account.", "Set adDomainUsername and adDomainPassword.");
    };
    let pw_file = match password_file(probe, password) {
        Ok(p) => p,
        Err(e) => return t.warning(format!("Not checked: {e}"), "Check the host's /tmp."),
    };
    let bind = format!("{}@{domain}", account_name(user));
    let base = base_dn(domain);
    let r = ldap(
        probe,
        "ldapsearch",
        dc_ip,
        Some((&bind, &pw_file)),
        &["-s", "base", "-b", &base, "ms-DS-MachineAccountQuota"],
        None,
    )
    .await;
    match ldif_value(&r.out, "ms-DS-MachineAccountQuota").and_then(|v| v.parse::<i64>().ok()) {
        Some(0) => t.warning(
            "The domain's machine-account quota is 0: only accounts with delegated rights on the OU can join.",
            format!("Make sure {bind} has delegated rights to create computer objects in the OU."),
        ),
        Some(q) => t.passed(format!(
            "The domain's machine-account quota is {q} per account (accounts with delegated rights on the OU are not \
             bound by it)."
        )),
        None if r.said().contains("Strong(er) authentication required") => t.warning(
            "The domain controller requires signed LDAP, so the quota was not read.",
            "Nothing to do if the join check passed; the quota matters only for accounts without delegated rights.",
        ),
        None if r.said().contains("Invalid credentials") => {
            t.failed(format!("The domain controller refused {bind}: {}", r.said()), credentials_remedy(spec))
        }
        None => t.warning(
            format!("The quota could not be read: {}", if r.timed_out { "no answer".into() } else { r.said() }),
            "Nothing to do if the join check passed.",
        ),
    }
}

/// A TCP connection from the probe to the control plane's public address.
async fn control_plane_check(probe: &Probe, spec: &NetworkCheckSpec) -> CheckResult {
    let t = Timed::start(CONTROL_PLANE);
    let Some(target) = spec.control_plane.as_deref() else {
        return t.warning(
            "Not checked: the control plane has no public URL.",
            "Set cloudpc's --public-url to the address Cloud PCs and browsers use, and run the checks again.",
        );
    };
    let Some((host, port)) = target.rsplit_once(':') else {
        return t.warning(format!("Not checked: {target} has no port."), "Set --public-url with a port.");
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let script = format!("exec 3<>/dev/tcp/{host}/{port}");
    if host.chars().any(|c| !(c.is_ascii_alphanumeric() || ".-:".contains(c))) || port.parse::<u16>().is_err() {
        return t.warning(format!("Not checked: {target} is not a host and port."), "Correct --public-url.");
    }
    let r = run(Some(&probe.ns), &["bash", "-c", &script], &[], None, Duration::from_secs(3)).await;
    if r.ok {
        t.passed(format!("{target} accepts connections from this network."))
    } else {
        let said = if r.timed_out { "no answer within 3 s".into() } else { r.said() };
        t.failed(
            format!("{target} cannot be reached from this network: {said}"),
            format!("Route this network to {target} (the control plane's public address) and open TCP {port} to it."),
        )
    }
}

/// Disables the computer object `name` (userAccountControl gains ACCOUNTDISABLE) with the
/// connection's account, from a probe on the bridge as in [`run_checks`]: a Cloud PC's clean-up
/// leaves its computer object in place, disabled, as Windows 365 does. Returns what was done; a
/// computer that does not exist is not an error (it was never joined, or was removed by hand).
pub async fn disable_computer(spec: &NetworkCheckSpec, name: &str) -> Result<String, String> {
    let (Some(domain), Some(user), Some(password)) =
        (spec.domain.as_deref(), spec.username.as_deref(), spec.password.as_deref())
    else {
        return Err("the connection has no domain, account or password".into());
    };
    let id = tag();
    let probe = Probe {
        ns: format!("cpchc{id}"),
        port: format!("hc{id}"),
        dir: std::env::temp_dir().join(format!("cloudpc-netcheck-{id}")),
    };
    prepare(&probe, spec).await?;
    let lease = take_lease(&probe).await.1.ok_or("no DHCP lease on the organisation's network")?;
    let dns = lease.dns.first().ok_or("the DHCP lease names no DNS server")?;
    let dc = srv_target(&dig(&probe.ns, dns, "SRV", &format!("_ldap._tcp.{domain}")).await)
        .ok_or_else(|| format!("no domain controller of {domain} in DNS"))?;
    let dc_ip = first_address(&dig(&probe.ns, dns, "A", &dc).await).ok_or_else(|| format!("{dc} has no address"))?;
    let pw = password_file(&probe, password)?;
    let bind = format!("{}@{domain}", account_name(user));
    let base = base_dn(domain);
    let filter = format!("(&(objectClass=computer)(sAMAccountName={}$))", name.to_ascii_uppercase());
    let as_account = Some((bind.as_str(), pw.as_path()));
    let found =
        ldap(&probe, "ldapsearch", &dc_ip, as_account, &["-b", &base, &filter, "userAccountControl"], None).await;
    if !found.ok {
        return Err(format!("the domain controller {dc} could not be searched: {}", found.said()));
    }
    let (Some(dn), Some(uac)) = (
        ldif_value(&found.out, "dn"),
        ldif_value(&found.out, "userAccountControl").and_then(|v| v.parse::<u32>().ok()),
    ) else {
        return Ok(format!("no computer object {name} in {domain}; nothing to disable"));
    };
    if uac & 2 != 0 {
        return Ok(format!("the computer object {dn} was already disabled"));
    }
    let change =
        format!("dn: {dn}\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: {}\n", uac | 2);
    let done = ldap(&probe, "ldapmodify", &dc_ip, as_account, &[], Some(&change)).await;
    if done.ok {
        Ok(format!("disabled the computer object {dn}"))
    } else {
        Err(format!("the computer object {dn} could not be disabled: {}", done.said()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_generalized_time_and_names() {
        assert_eq!(generalized_time("19700101000000.0Z"), Some(0));
        assert_eq!(generalized_time("20261201033335.0Z"), Some(1_796_096_015));
        assert_eq!(generalized_time("2026"), None);
        assert_eq!(base_dn("corp.contoso.com"), "DC=corp,DC=contoso,DC=com");
        assert_eq!(account_name("CORP\\join"), "join");
        assert_eq!(account_name("join@corp.contoso.com"), "join");
        assert_eq!(account_name("join"), "join");
        assert_eq!(ldif_value("dn:\ncurrentTime: 2026\n", "currenttime"), Some("2026"));
        let spec = NetworkCheckSpec {
            bridge: "br0".into(),
            vlan: None,
            domain: None,
            username: None,
            password: Some("s3cret".into()),
            organizational_unit: None,
            control_plane: None,
        };
        assert!(!format!("{spec:?}").contains("s3cret"));
    }
}
