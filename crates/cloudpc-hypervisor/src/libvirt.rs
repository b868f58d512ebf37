//! The libvirt backend: one connection per host, calls made on blocking threads.
//!
//! libvirtd can go away under cloudpc (a package upgrade restarts it); its client connection is
//! then closed for good and every later call fails. So every call goes through [`LibvirtHost::with_conn`],
//! which notices a dead connection, opens a new one with backoff, and runs the call again. QEMU
//! keeps running while libvirtd restarts, so the call finds what it left. Calls are idempotent,
//! which makes running one again safe even when the first try got through before the connection died.
//!
//! libvirtd can also stop answering without going away (libvirt 9.0 has been seen wedged on CI
//! hosts). A call therefore has a time limit: past it, the call fails with a sentence saying so
//! (the step retries like any other failure) and its connection is given up, so the next call
//! opens a new one rather than queueing behind the stuck one.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{ErrorDomain, ErrorNumber};
use virt::network::Network;
use virt::nwfilter::NWFilter;
use virt::sys;

use crate::{xml, Accelerator, HostConfig, Hypervisor, HypervisorError, NetworkSpec, NicSpec, Result, VmSpec, VmState};

/// How long one call keeps trying to reach a libvirtd that went away before it gives up (a
/// restart takes a second or two; the next call tries again anyway).
const RECONNECT_LIMIT: Duration = Duration::from_secs(30);
/// How often a call runs again after its connection was lost (libvirtd restarted in between).
const MAX_RECONNECTS: u32 = 3;
/// How long a call may wait for libvirtd's answer. Longer than any call takes on a slow TCG host
/// (defining and starting a domain takes seconds); guest-agent calls add their own timeout.
const CALL_LIMIT: Duration = Duration::from_secs(120);
/// How long opening a connection may take before that attempt counts as failed.
const OPEN_LIMIT: Duration = Duration::from_secs(20);

/// A libvirt connection, closed when the last call that uses it is done (`Connect` has no `Drop`),
/// and whether it was given up because libvirtd stopped answering on it.
struct Conn(Connect, std::sync::atomic::AtomicBool);

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.0.close();
    }
}

pub struct LibvirtHost {
    config: HostConfig,
    /// The current connection; replaced when it is found dead.
    conn: Mutex<Arc<Conn>>,
    /// Lets one call at a time reconnect, so a restart does not open a connection per waiting call.
    reconnecting: tokio::sync::Mutex<()>,
    accel: Accelerator,
    qemu_img: String,
}

fn libvirt_err(action: &str, e: virt::error::Error) -> HypervisorError {
    HypervisorError::Libvirt { action: action.to_string(), message: e.message().to_string() }
}

fn is_missing(e: &virt::error::Error) -> bool {
    matches!(e.code(), ErrorNumber::NoDomain | ErrorNumber::NoNetwork | ErrorNumber::NoNwfilter)
}

/// Whether an error says the connection to libvirtd is gone (rather than the request refused).
fn is_connection_error(e: &virt::error::Error) -> bool {
    matches!(e.code(), ErrorNumber::InvalidConn)
        || (matches!(e.code(), ErrorNumber::SystemError)
            && matches!(e.domain(), ErrorDomain::Rpc | ErrorDomain::Remote))
        || e.message().contains("client socket is closed")
}

/// Whether the connection can still carry calls. The remote driver answers from its own state,
/// without a round trip.
fn alive(conn: &Conn) -> bool {
    !conn.1.load(std::sync::atomic::Ordering::Relaxed) && conn.0.is_alive().unwrap_or(false)
}

/// What a call through [`LibvirtHost::with_conn`] failed with.
enum CallError {
    /// libvirt answered with an error.
    Libvirt(virt::error::Error),
    /// libvirtd could not be reached, or the blocking task died.
    Unreachable(String),
}

impl LibvirtHost {
    pub fn open(config: HostConfig, accel: Accelerator, qemu_img: &str) -> Result<Self> {
        // libvirt prints every error to stderr by default; cloudpc reports them itself.
        virt::error::clear_error_callback();
        let conn =
            Connect::open(Some(&config.uri)).map_err(|e| libvirt_err(&format!("connecting to {}", config.uri), e))?;
        Ok(Self {
            config,
            conn: Mutex::new(Arc::new(Conn(conn, Default::default()))),
            reconnecting: tokio::sync::Mutex::new(()),
            accel,
            qemu_img: qemu_img.to_string(),
        })
    }

    fn current(&self) -> Arc<Conn> {
        self.conn.lock().expect("libvirt connection").clone()
    }

    /// Marks `conn` as not to be used again: the next call opens a new connection.
    fn give_up(&self, conn: &Arc<Conn>) {
        conn.1.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A live connection: the current one, or a new one if the current one is dead (or is `lost`,
    /// the one a call just failed on). Tries with backoff for [`RECONNECT_LIMIT`].
    async fn live_connection(&self, lost: Option<&Arc<Conn>>) -> Result<Arc<Conn>, String> {
        let usable = |c: &Arc<Conn>| alive(c) && !lost.is_some_and(|l| Arc::ptr_eq(c, l));
        let conn = self.current();
        if usable(&conn) {
            return Ok(conn);
        }
        let _one_at_a_time = self.reconnecting.lock().await;
        // Another call may have reconnected while this one waited.
        let conn = self.current();
        if usable(&conn) {
            return Ok(conn);
        }
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let uri = self.config.uri.clone();
            let opening = tokio::task::spawn_blocking(move || Connect::open(Some(&uri)));
            let opened = match tokio::time::timeout(OPEN_LIMIT, opening).await {
                Ok(joined) => joined.map_err(|e| e.to_string())?,
                Err(_) if started.elapsed() >= RECONNECT_LIMIT => {
                    return Err(format!(
                        "libvirt at {} did not answer a connection within {} s",
                        self.config.uri,
                        OPEN_LIMIT.as_secs()
                    ));
                }
                Err(_) => continue,
            };
            match opened {
                Ok(c) => {
                    let conn = Arc::new(Conn(c, Default::default()));
                    *self.conn.lock().expect("libvirt connection") = conn.clone();
                    tracing::info!(host = %self.config.name, uri = %self.config.uri, waited_ms = started.elapsed().as_millis() as u64, "reconnected to libvirt");
                    return Ok(conn);
                }
                Err(e) if started.elapsed() >= RECONNECT_LIMIT => {
                    return Err(format!(
                        "libvirt at {} could not be reached for {} s: {}",
                        self.config.uri,
                        RECONNECT_LIMIT.as_secs(),
                        e.message()
                    ));
                }
                Err(e) => {
                    tracing::debug!(uri = %self.config.uri, error = %e.message(), "libvirt not reachable yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Runs a libvirt call on a blocking thread (libvirt's API is synchronous), on a live
    /// connection; when the connection turns out to be dead, reconnects and runs it again.
    async fn with_conn<T, F>(&self, f: F) -> Result<T, CallError>
    where
        T: Send + 'static,
        F: Fn(&Connect) -> Result<T, virt::error::Error> + Send + Sync + 'static,
    {
        self.with_conn_within(CALL_LIMIT, f).await
    }

    /// [`Self::with_conn`] with the time limit `limit` for libvirtd's answer.
    async fn with_conn_within<T, F>(&self, limit: Duration, f: F) -> Result<T, CallError>
    where
        T: Send + 'static,
        F: Fn(&Connect) -> Result<T, virt::error::Error> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let mut reconnects = 0;
        let mut lost: Option<Arc<Conn>> = None;
        loop {
            let conn = self.live_connection(lost.as_ref()).await.map_err(CallError::Unreachable)?;
            let (g, c) = (f.clone(), conn.clone());
            let call = tokio::task::spawn_blocking(move || g(&c.0));
            let result = match tokio::time::timeout(limit, call).await {
                Ok(joined) => joined.map_err(|e| CallError::Unreachable(e.to_string()))?,
                Err(_) => {
                    // The blocked thread keeps its clone of the connection until libvirtd answers
                    // or dies; later calls use a new connection.
                    self.give_up(&conn);
                    tracing::warn!(host = %self.config.name, uri = %self.config.uri, limit_s = limit.as_secs(), "libvirt did not answer a call in time; the connection is given up");
                    return Err(CallError::Unreachable(format!(
                        "libvirt at {} did not answer within {} s",
                        self.config.uri,
                        limit.as_secs()
                    )));
                }
            };
            match result {
                Err(e) if reconnects < MAX_RECONNECTS && (is_connection_error(&e) || !alive(&conn)) => {
                    reconnects += 1;
                    tracing::warn!(host = %self.config.name, error = %e.message(), "the libvirt connection was lost; reconnecting");
                    lost = Some(conn);
                }
                Err(e) => return Err(CallError::Libvirt(e)),
                Ok(v) => return Ok(v),
            }
        }
    }

    /// The libvirt call `f`, its errors reported as refusals of `action`.
    async fn call<T, F>(&self, action: String, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Connect) -> Result<T, virt::error::Error> + Send + Sync + 'static,
    {
        self.with_conn(f).await.map_err(|e| match e {
            CallError::Libvirt(e) => libvirt_err(&action, e),
            CallError::Unreachable(message) => HypervisorError::Libvirt { action, message },
        })
    }

    /// Puts the running domain's NICs that are on a VLAN on it (see [`xml::VLAN_ALIAS`]): after
    /// every start and attach, as libvirt makes each port anew, on the bridge's default VLAN.
    async fn tag_vlan_ports(&self, name: &str) -> Result<()> {
        let vm = name.to_string();
        let live = self.call(format!("reading the NICs of {vm}"), move |c| {
            let d = Domain::lookup_by_name(c, &vm)?;
            if d.is_active()? {
                d.get_xml_desc(0).map(Some)
            } else {
                Ok(None)
            }
        });
        let Some(live) = live.await? else { return Ok(()) };
        for (port, vlan) in xml::vlan_ports(&live) {
            crate::netcheck::tag_access_port(&port, vlan).await.map_err(|message| HypervisorError::Libvirt {
                action: format!("putting {name}'s NIC on VLAN {vlan}"),
                message,
            })?;
        }
        Ok(())
    }
}

/// Defines a filter of cloudpc's unless it exists as this version of cloudpc writes it.
/// Redefining makes libvirt rebuild the rules of every NIC using it, so it is not done on every
/// call; but a definition an earlier version left (other rules) is replaced, or its NICs would
/// keep the old rules.
fn define_filter(c: &Connect, name: &str, doc: &str) -> Result<(), virt::error::Error> {
    match NWFilter::lookup_by_name(c, name) {
        Ok(f) if xml::filter_fingerprint(&f.get_xml_desc(0)?) == xml::filter_fingerprint(doc) => Ok(()),
        Ok(_) => NWFilter::define_xml(c, doc).map(|_| ()),
        Err(e) if is_missing(&e) => NWFilter::define_xml(c, doc).map(|_| ()),
        Err(e) => Err(e),
    }
}

/// The parameters of cloudpc's NIC filters (see [`xml::isolation_filter`]): the gateway of the
/// NIC's network, the NIC's address (reserved here, see [`crate::dhcp`]) and the host's other
/// addresses. `local`: the host is this machine, whose DHCP leases can be read; a host behind a
/// remote URI falls back to learning the address from the network's DHCP server.
fn filter_params(
    c: &Connect,
    nic: &NicSpec,
    host_ips: &[String],
    local: bool,
) -> Result<Vec<(&'static str, String)>, virt::error::Error> {
    if nic.filter.is_none() {
        return Ok(Vec::new());
    }
    // On the organisation's bridge: the address is learnt from whichever DHCP server answers.
    if nic.bridge.is_some() {
        return Ok(vec![("CTRL_IP_LEARNING", "dhcp".to_string())]);
    }
    let network = Network::lookup_by_name(c, &nic.network)?;
    let net = network.get_xml_desc(0)?;
    let gateway = xml::network_gateway(&net).unwrap_or_default();
    let mut params = vec![("GATEWAY", gateway.clone())];
    match if local { reserve_address(c, &network, &net, &nic.mac)? } else { None } {
        Some(ip) => params.push(("IP", ip.to_string())),
        None => params.extend([("DHCPSERVER", gateway.clone()), ("CTRL_IP_LEARNING", "dhcp".to_string())]),
    }
    let others: Vec<&String> = host_ips.iter().filter(|ip| **ip != gateway).collect();
    if others.is_empty() {
        // The filter needs at least one value; the gateway is dropped by the network rule anyway.
        params.push(("HOST_IP", gateway));
    }
    params.extend(others.into_iter().map(|ip| ("HOST_IP", ip.clone())));
    Ok(params)
}

/// Adds or deletes (`command`) a reservation in a network's DHCP server, live and in its
/// definition.
fn update_reservation(
    network: &Network,
    command: sys::virNetworkUpdateCommand,
    r: &crate::dhcp::Reservation,
) -> Result<(), virt::error::Error> {
    let mut flags = sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG;
    if network.is_active()? {
        flags |= sys::VIR_NETWORK_UPDATE_AFFECT_LIVE;
    }
    network.update(command, sys::VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, &r.xml(), flags)
}

/// Gives `mac` a fixed address on the hosted network (see [`crate::dhcp`]) and returns it;
/// `None` (and a warning) when the network has no free address left, and the filter then
/// learns the address instead. Called under [`filter_turn`], so two NICs never get one address.
fn reserve_address(
    c: &Connect,
    network: &Network,
    net_xml: &str,
    mac: &str,
) -> Result<Option<std::net::Ipv4Addr>, virt::error::Error> {
    let Some(range) = crate::dhcp::range(net_xml) else { return Ok(None) };
    let reserved = crate::dhcp::reservations(net_xml);
    let mut live = std::collections::HashSet::new();
    if !reserved.iter().any(|r| r.mac.eq_ignore_ascii_case(mac)) {
        for d in c.list_all_domains(0)? {
            live.extend(crate::dhcp::domain_macs(&d.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?));
        }
    }
    let leases = crate::dhcp::bridge(net_xml)
        .and_then(|b| std::fs::read_to_string(crate::dhcp::lease_file(&b)).ok())
        .map(|text| crate::dhcp::parse_leases(&text))
        .unwrap_or_default();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let Some(plan) = crate::dhcp::plan(mac, range, &reserved, &leases, &live, now) else {
        tracing::warn!(network = %network.get_name()?, "the network has no address left to reserve; the NIC filter learns the address instead");
        return Ok(None);
    };
    for r in &plan.stale {
        update_reservation(network, sys::VIR_NETWORK_UPDATE_COMMAND_DELETE, r)?;
    }
    if plan.add {
        let r = crate::dhcp::Reservation { mac: mac.to_ascii_lowercase(), ip: plan.ip };
        update_reservation(network, sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, &r)?;
    }
    Ok(Some(plan.ip))
}

/// Frees the addresses reserved for a domain's NICs on hosted networks (before it is removed,
/// or the NIC detached). What is missed here is freed the next time an address is chosen.
fn release_addresses(c: &Connect, domain_xml: &str, only_mac: Option<&str>) -> Result<(), virt::error::Error> {
    for (network_name, mac) in xml::network_nics(domain_xml) {
        if only_mac.is_some_and(|m| !m.eq_ignore_ascii_case(&mac)) {
            continue;
        }
        let network = match Network::lookup_by_name(c, &network_name) {
            Ok(n) => n,
            Err(e) if is_missing(&e) => continue,
            Err(e) => return Err(e),
        };
        let net = network.get_xml_desc(0)?;
        for r in crate::dhcp::reservations(&net).into_iter().filter(|r| r.mac.eq_ignore_ascii_case(&mac)) {
            update_reservation(&network, sys::VIR_NETWORK_UPDATE_COMMAND_DELETE, &r)?;
        }
    }
    Ok(())
}

/// libvirt 9.0 deadlocks when NIC filter bindings change at the same time with DHCP snooping on:
/// seen here as two `virDomainUpdateDeviceFlags`, one tearing a binding down (waiting in
/// `virNWFilterDHCPSnoopEnd`) and one creating a binding, with a `dhcp-decode` thread waiting
/// between them; every later call then hangs. So whatever instantiates or tears down NIC
/// filters (attaching, detaching or updating a NIC, starting or stopping a VM) takes turns, across
/// every process on the machine that talks to this libvirtd (an exclusive `flock`).
async fn filter_turn() -> Result<std::fs::File> {
    tokio::task::spawn_blocking(|| {
        let dir = std::path::Path::new("/run/cloudpc");
        let _ = std::fs::create_dir_all(dir);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("nwfilter.lock"))
            .map_err(|e| HypervisorError::Io(format!("cannot open /run/cloudpc/nwfilter.lock: {e}")))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| HypervisorError::Io(format!("cannot lock /run/cloudpc/nwfilter.lock: {e}")))?;
        Ok(file)
    })
    .await
    .map_err(|e| HypervisorError::Io(e.to_string()))?
}

/// The host's IPv4 addresses outside loopback (`ip -j -4 addr`). Addresses in the Cloud PC
/// networks are left out: the filter drops those networks as a whole.
async fn host_addresses() -> Vec<String> {
    let Ok(out) = tokio::process::Command::new("ip").args(["-j", "-4", "addr", "show"]).output().await else {
        tracing::warn!(
            "cannot list the host's addresses (ip -j -4 addr); Cloud PCs are kept only from their networks' host"
        );
        return Vec::new();
    };
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut ips: Vec<String> = links
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().map(str::to_string))
        .filter(|ip| !ip.starts_with("127.") && !xml::in_cloud_pc_networks(ip))
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The copies virtlogd rotated out of a log file (`<file>.0`, `<file>.1`, …): they belong to the
/// file, and go with it.
async fn rotated_copies(path: &Path) -> Vec<std::path::PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else { return Vec::new() };
    let mut copies = Vec::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        let file = entry.file_name();
        let suffix = file.to_str().and_then(|f| f.strip_prefix(name)).and_then(|f| f.strip_prefix('.'));
        if suffix.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
            copies.push(entry.path());
        }
    }
    copies
}

fn lookup(conn: &Connect, name: &str) -> Result<Option<Domain>, virt::error::Error> {
    match Domain::lookup_by_name(conn, name) {
        Ok(d) => Ok(Some(d)),
        Err(e) if is_missing(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Flags that change the definition and, when the VM runs, the live VM too.
fn config_and_live(d: &Domain) -> Result<u32, virt::error::Error> {
    let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
    if d.is_active()? {
        flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
    }
    Ok(flags)
}

fn has_mac(d: &Domain, mac: &str) -> Result<bool, virt::error::Error> {
    Ok(xml::interface_with_mac(&d.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?, mac).is_some())
}

#[async_trait]
impl Hypervisor for LibvirtHost {
    fn config(&self) -> &HostConfig {
        &self.config
    }

    fn accelerator(&self) -> Accelerator {
        self.accel
    }

    async fn create_overlay(&self, base: &Path, overlay: &Path, size_gib: u64) -> Result<()> {
        if overlay.exists() {
            return Ok(());
        }
        if let Some(dir) = overlay.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| HypervisorError::Io(format!("creating {}: {e}", dir.display())))?;
        }
        // An overlay smaller than its base would cut the image's filesystem short.
        let info = tokio::process::Command::new(&self.qemu_img)
            .args(["info", "-U", "--output=json", "-f", "qcow2"])
            .arg(base)
            .output()
            .await
            .map_err(|e| HypervisorError::Command { program: self.qemu_img.clone(), message: e.to_string() })?;
        let base_size = serde_json::from_slice::<serde_json::Value>(&info.stdout)
            .ok()
            .and_then(|v| v["virtual-size"].as_u64())
            .ok_or_else(|| HypervisorError::Command {
                program: format!("{} info", self.qemu_img),
                message: format!(
                    "cannot read the image {}: {}",
                    base.display(),
                    String::from_utf8_lossy(&info.stderr).trim()
                ),
            })?;
        if base_size > size_gib << 30 {
            return Err(HypervisorError::TooSmall { image_gib: base_size.div_ceil(1 << 30), disk_gib: size_gib });
        }
        // Written under a temporary name and renamed, so a crash never leaves a half-made overlay.
        let tmp = overlay.with_extension("qcow2.partial");
        let out = tokio::process::Command::new(&self.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(&tmp)
            .arg(format!("{size_gib}G"))
            .output()
            .await
            .map_err(|e| HypervisorError::Command { program: self.qemu_img.clone(), message: e.to_string() })?;
        if !out.status.success() {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(HypervisorError::Command {
                program: format!("{} create", self.qemu_img),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        tokio::fs::rename(&tmp, overlay)
            .await
            .map_err(|e| HypervisorError::Io(format!("renaming {}: {e}", tmp.display())))
    }

    async fn remove_file(&self, path: &Path) -> Result<()> {
        let remove = |p: std::path::PathBuf| async move {
            match tokio::fs::remove_file(&p).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(HypervisorError::Io(format!("removing {}: {e}", p.display()))),
            }
        };
        for rotated in rotated_copies(path).await {
            remove(rotated).await?;
        }
        remove(path.to_path_buf()).await
    }

    async fn define_vm(&self, spec: &VmSpec) -> Result<()> {
        let name = spec.name.clone();
        let doc = xml::domain(spec, self.accel);
        self.call(format!("defining VM {name}"), move |c| {
            if lookup(c, &name)?.is_none() {
                Domain::define_xml(c, &doc)?;
            }
            Ok(())
        })
        .await
    }

    async fn remove_vm(&self, name: &str) -> Result<()> {
        let _turn = filter_turn().await?;
        let name = name.to_string();
        self.call(format!("removing VM {name}"), move |c| {
            let Some(d) = lookup(c, &name)? else { return Ok(()) };
            if d.is_active()? {
                d.destroy()?;
            }
            release_addresses(c, &d.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?, None)?;
            // A hibernated VM has a save file, which goes with it.
            d.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        })
        .await
    }

    async fn state(&self, name: &str) -> Result<VmState> {
        let name = name.to_string();
        self.call(format!("reading the state of {name}"), move |c| {
            let Some(d) = lookup(c, &name)? else { return Ok(VmState::Missing) };
            Ok(match d.get_state()?.0 {
                sys::VIR_DOMAIN_RUNNING => VmState::Running,
                sys::VIR_DOMAIN_SHUTOFF if d.has_managed_save(0)? => VmState::Saved,
                sys::VIR_DOMAIN_SHUTOFF => VmState::ShutOff,
                _ => VmState::Other,
            })
        })
        .await
    }

    async fn list_vms(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = prefix.to_string();
        self.call("listing VMs".into(), move |c| {
            let mut names = Vec::new();
            for d in c.list_all_domains(0)? {
                let n = d.get_name()?;
                if n.starts_with(&prefix) {
                    names.push(n);
                }
            }
            names.sort();
            Ok(names)
        })
        .await
    }

    async fn domain_xml(&self, name: &str) -> Result<String> {
        let name = name.to_string();
        self.call(format!("reading the definition of {name}"), move |c| {
            Domain::lookup_by_name(c, &name)?.get_xml_desc(0)
        })
        .await
    }

    async fn start(&self, name: &str) -> Result<()> {
        // libvirt resumes a VM that has saved memory when it starts it; a save it cannot
        // restore is handled as in `resume`, so a start never fails on one.
        self.resume(name).await.map(|_| ())
    }

    async fn power_off(&self, name: &str) -> Result<()> {
        let _turn = filter_turn().await?;
        let name = name.to_string();
        self.call(format!("powering off {name}"), move |c| {
            let Some(d) = lookup(c, &name)? else { return Ok(()) };
            // A libvirtd that has just started takes a moment to take its running domains back;
            // meanwhile it reports them active but refuses to destroy them as "not running".
            for attempt in 0.. {
                if !d.is_active()? {
                    return Ok(());
                }
                match d.destroy() {
                    Ok(_) => return Ok(()),
                    Err(e) if e.code() == ErrorNumber::OperationInvalid && attempt < 20 => {
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .await
    }

    async fn reboot(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        // A reset needs nothing from the guest, so it works even when the guest is stuck.
        self.call(format!("restarting {name}"), move |c| Domain::lookup_by_name(c, &name)?.reset().map(|_| ())).await
    }

    async fn save(&self, name: &str) -> Result<()> {
        let _turn = filter_turn().await?;
        let name = name.to_string();
        self.call(format!("saving {name} to disk"), move |c| {
            let d = Domain::lookup_by_name(c, &name)?;
            if !d.is_active()? {
                return Ok(());
            }
            // QEMU cannot save a VM with the clipboard channel, so it is unplugged (live only; the
            // definition keeps it) and plugged in again after the restore.
            let channel = xml::vdagent_channel(&d.get_xml_desc(0)?);
            if let Some(channel) = &channel {
                d.detach_device_flags(channel, sys::VIR_DOMAIN_AFFECT_LIVE)?;
            }
            if let Err(e) = d.managed_save(0) {
                if let Some(channel) = &channel {
                    let _ = d.attach_device_flags(channel, sys::VIR_DOMAIN_AFFECT_LIVE);
                }
                return Err(e);
            }
            Ok(())
        })
        .await
    }

    async fn resume(&self, name: &str) -> Result<crate::Resumed> {
        let _turn = filter_turn().await?;
        let vm = name.to_string();
        let resumed = self
            .call(format!("resuming {vm}"), move |c| {
                let d = Domain::lookup_by_name(c, &vm)?;
                if d.is_active()? {
                    return Ok(crate::Resumed::Started);
                }
                if !d.has_managed_save(0)? {
                    d.create()?;
                    return Ok(crate::Resumed::Started);
                }
                match d.create() {
                    // libvirt boots the disk by itself when the saved state's header is unreadable.
                    Ok(_) if d.get_state()?.1 != sys::VIR_DOMAIN_RUNNING_RESTORED as i32 => Ok(
                        crate::Resumed::BootedCold("libvirt could not read the saved state and booted the disk".into()),
                    ),
                    Ok(_) => {
                        // The clipboard channel was unplugged for the save (see `save`).
                        if let Some(channel) = xml::vdagent_channel(&d.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?) {
                            if xml::vdagent_channel(&d.get_xml_desc(0)?).is_none() {
                                d.attach_device_flags(&channel, sys::VIR_DOMAIN_AFFECT_LIVE)?;
                            }
                        }
                        Ok(crate::Resumed::Restored)
                    }
                    Err(e) => {
                        // The saved memory is unusable; the disk is not, so boot from it.
                        let why = e.message().to_string();
                        tracing::warn!(vm = %vm, error = %why, "the saved state could not be restored; booting afresh");
                        d.create_with_flags(sys::VIR_DOMAIN_START_FORCE_BOOT)?;
                        Ok(crate::Resumed::BootedCold(why))
                    }
                }
            })
            .await?;
        self.tag_vlan_ports(name).await?;
        Ok(resumed)
    }

    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<()> {
        let name = spec.name.clone();
        let doc = xml::network(spec);
        self.call(format!("starting network {name}"), move |c| {
            let net = match Network::lookup_by_name(c, &name) {
                Ok(n) => n,
                Err(e) if is_missing(&e) => Network::define_xml(c, &doc)?,
                Err(e) => return Err(e),
            };
            if !net.is_active()? {
                net.create()?;
            }
            Ok(())
        })
        .await
    }

    async fn ensure_isolation_filter(&self) -> Result<String> {
        self.call("defining the Cloud PC isolation filter".into(), |c| {
            define_filter(c, xml::ISOLATION_FILTER, &xml::isolation_filter())?;
            define_filter(c, xml::ORG_FILTER, &xml::org_filter())?;
            Ok(xml::ISOLATION_FILTER.to_string())
        })
        .await
    }

    async fn ensure_block_rdp_filter(&self) -> Result<String> {
        self.call("defining the remote-desktop filter".into(), |c| {
            define_filter(c, xml::ISOLATION_FILTER, &xml::isolation_filter())?;
            define_filter(c, xml::ORG_FILTER, &xml::org_filter())?;
            define_filter(c, xml::BLOCK_RDP_FILTER, &xml::block_rdp_filter())?;
            define_filter(c, xml::BLOCK_RDP_ORG_FILTER, &xml::block_rdp_org_filter())?;
            Ok(xml::BLOCK_RDP_FILTER.to_string())
        })
        .await
    }

    async fn attach_nic(&self, vm: &str, nic: &NicSpec) -> Result<()> {
        let _turn = filter_turn().await?;
        let vm_name = vm;
        let (vm, nic, host_ips) = (vm.to_string(), nic.clone(), host_addresses().await);
        let local = crate::uri_is_local(&self.config.uri);
        self.call(format!("attaching a NIC to {vm}"), move |c| {
            let d = Domain::lookup_by_name(c, &vm)?;
            if !has_mac(&d, &nic.mac)? {
                let doc = xml::nic(&nic, &filter_params(c, &nic, &host_ips, local)?);
                d.attach_device_flags(&doc, config_and_live(&d)?)?;
            }
            Ok(())
        })
        .await?;
        self.tag_vlan_ports(vm_name).await
    }

    async fn detach_nic(&self, vm: &str, mac: &str) -> Result<()> {
        let _turn = filter_turn().await?;
        let (vm, mac) = (vm.to_string(), mac.to_string());
        self.call(format!("detaching a NIC from {vm}"), move |c| {
            let Some(d) = lookup(c, &vm)? else { return Ok(()) };
            // libvirt wants the whole <interface> element back, so take it from the definition.
            let definition = d.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?;
            if let Some(doc) = xml::interface_with_mac(&definition, &mac) {
                d.detach_device_flags(&doc, config_and_live(&d)?)?;
                release_addresses(c, &definition, Some(&mac))?;
            }
            Ok(())
        })
        .await
    }

    async fn set_nic_filter(&self, vm: &str, nic: &NicSpec) -> Result<()> {
        let _turn = filter_turn().await?;
        let (vm, nic, host_ips) = (vm.to_string(), nic.clone(), host_addresses().await);
        let local = crate::uri_is_local(&self.config.uri);
        self.call(format!("updating the NIC filter of {vm}"), move |c| {
            let d = Domain::lookup_by_name(c, &vm)?;
            let doc = xml::nic(&nic, &filter_params(c, &nic, &host_ips, local)?);
            d.update_device_flags(&doc, config_and_live(&d)?).map(|_| ())
        })
        .await
    }

    async fn vnc_port(&self, name: &str) -> Result<Option<u16>> {
        let xml = self.domain_xml(name).await?;
        Ok(xml::vnc_port(&xml))
    }

    async fn network_check(
        &self,
        spec: &crate::netcheck::NetworkCheckSpec,
    ) -> Result<Vec<crate::netcheck::CheckResult>> {
        // The checks run on this machine: a host reached through a remote libvirt URI has no way
        // to run them (hosts elsewhere run them through their agent).
        if !crate::uri_is_local(&self.config.uri) {
            return Err(HypervisorError::Io(format!(
                "host '{}' ({}) is not on this machine and has no agent to run network health checks",
                self.config.name, self.config.uri
            )));
        }
        Ok(crate::netcheck::run_checks(spec).await)
    }

    async fn disable_computer(&self, spec: &crate::netcheck::NetworkCheckSpec, name: &str) -> Result<String> {
        if !crate::uri_is_local(&self.config.uri) {
            return Err(HypervisorError::Io(format!(
                "host '{}' ({}) is not on this machine and has no agent to reach the domain controller",
                self.config.name, self.config.uri
            )));
        }
        crate::netcheck::disable_computer(spec, name).await.map_err(HypervisorError::Io)
    }

    async fn agent(&self, vm: &str, command: &serde_json::Value, timeout_secs: i32) -> Result<serde_json::Value> {
        let (name, cmd) = (vm.to_string(), command.to_string());
        let what = command.get("execute").and_then(|v| v.as_str()).unwrap_or("?").to_string();
        // A dead connection fails the command at once (no waiting out its timeout); it then runs
        // again on a new connection, as libvirtd reattaches to the guest's agent when it starts.
        let limit = CALL_LIMIT + Duration::from_secs(timeout_secs.max(0) as u64);
        let answer = self
            .with_conn_within(limit, move |c| {
                Domain::lookup_by_name(c, &name)?.qemu_agent_command(&cmd, timeout_secs, 0)
            })
            .await
            .map_err(|e| HypervisorError::Agent {
                vm: vm.to_string(),
                command: what.clone(),
                message: match e {
                    CallError::Libvirt(e) => e.message().to_string(),
                    CallError::Unreachable(m) => m,
                },
            })?;
        let v: serde_json::Value = serde_json::from_str(&answer).map_err(|e| HypervisorError::Agent {
            vm: vm.to_string(),
            command: what.clone(),
            message: e.to_string(),
        })?;
        Ok(v.get("return").cloned().unwrap_or(serde_json::Value::Null))
    }
}
