//! libvirt XML for cloudpc's domains, NICs, networks and filters.
//!
//! Written as small templates by hand: the documents are short and fixed in shape, and every
//! value that comes from outside goes through [`escape`].

use crate::{Accelerator, Boot, NetworkSpec, NicSpec, VmSpec};

/// Escapes text for use inside XML attribute values and elements.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// The VNC console listens on loopback only, with a port libvirt picks; the gateway is the way in.
/// A USB tablet gives the browser console an absolute pointer (a PS/2 mouse alone drifts).
/// The serial console goes to a file that the guest (whose local admin is the user) can fill at
/// will: libvirt hands QEMU a pipe to virtlogd for it (`stdio_handler = "logd"`, the default in
/// qemu.conf), not the file, and virtlogd rotates it at `max_size` keeping `max_backups` copies
/// (2 MiB and 3 by default: at most 8 MiB per Cloud PC). The rotated copies go with the file.
///
/// The qemu-vdagent channel is QEMU's own spice agent peer: it shares QEMU's VNC clipboard with
/// spice-vdagent in the guest, so the console's clipboard reaches the guest's X and back (QEMU's
/// VNC server drops client cut text otherwise). Its mouse stays off (`server`): the tablet points.
/// A guest without the agent just sees one more unused virtio port.
pub fn domain(spec: &VmSpec, accel: Accelerator) -> String {
    let os = match &spec.boot {
        Boot::Kernel { kernel, initrd, cmdline } => format!(
            "<kernel>{}</kernel><initrd>{}</initrd><cmdline>{}</cmdline>",
            escape(&kernel.to_string_lossy()),
            escape(&initrd.to_string_lossy()),
            escape(cmdline)
        ),
        Boot::Firmware => "<boot dev='hd'/>".into(),
    };
    format!(
        "<domain type='{dtype}'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{os}</os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='qemu-vdagent'><source><clipboard copypaste='yes'/><mouse mode='server'/></source><target type='virtio' name='com.redhat.spice.0'/></channel>
    <serial type='file'><source path='{log}'/><target port='0'/></serial>
    <graphics type='vnc' autoport='yes' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics>
    <input type='tablet' bus='usb'/>
    <video><model type='vga'/></video>
    <memballoon model='none'/>
  </devices>
</domain>",
        dtype = accel.domain_type(),
        name = escape(&spec.name),
        mem = spec.memory_mib,
        vcpus = spec.vcpus,
        disk = escape(&spec.disk.to_string_lossy()),
        log = escape(&spec.console_log.to_string_lossy()),
    )
}

/// The NIC's port on the bridge is isolated: the bridge forwards nothing between two Cloud PCs'
/// ports (their filters also drop what they would send through the host). `params` are the
/// filter's parameters (see [`isolation_filter`]).
pub fn nic(nic: &NicSpec, params: &[(&str, String)]) -> String {
    let filter = nic
        .filter
        .as_deref()
        .map(|f| {
            let params: String = params
                .iter()
                .map(|(k, v)| format!("<parameter name='{}' value='{}'/>", escape(k), escape(v)))
                .collect();
            format!("<filterref filter='{}'>{params}</filterref>", escape(f))
        })
        .unwrap_or_default();
    if let Some(bridge) = &nic.bridge {
        // libvirt 9 tags ports of Open vSwitch bridges only, so cloudpc tags a Linux bridge's
        // port itself; the alias (kept in the definition) says which VLAN, at every start.
        let vlan = nic.vlan.map(|v| format!("<alias name='{VLAN_ALIAS}{v}'/>")).unwrap_or_default();
        return format!(
            "<interface type='bridge'><mac address='{}'/><source bridge='{}'/><model type='virtio'/>{filter}{vlan}</interface>",
            escape(&nic.mac),
            escape(bridge)
        );
    }
    format!(
        "<interface type='network'><mac address='{}'/><source network='{}'/><model type='virtio'/><port isolated='yes'/>{filter}</interface>",
        escape(&nic.mac),
        escape(&nic.network)
    )
}

/// The prefix of the user alias that marks a NIC on a VLAN (`ua-cloudpc-vlan<id>`).
pub const VLAN_ALIAS: &str = "ua-cloudpc-vlan";

/// The host ports (`vnetN`) of a running domain's NICs that are on a VLAN, with the VLAN.
pub fn vlan_ports(domain_xml: &str) -> Vec<(String, u16)> {
    domain_xml
        .split("<interface ")
        .skip(1)
        .filter_map(|rest| {
            let iface = &rest[..rest.find("</interface>")?];
            let vlan = iface.split(&format!("<alias name='{VLAN_ALIAS}")).nth(1)?.split('\'').next()?.parse().ok()?;
            let port = iface.split("<target dev='").nth(1)?.split('\'').next()?.to_string();
            Some((port, vlan))
        })
        .collect()
}

/// The clipboard channel (`<channel type='qemu-vdagent'>…</channel>`) of a domain definition.
/// QEMU cannot migrate it, nor save a VM that has it, so a save unplugs it first.
pub fn vdagent_channel(domain_xml: &str) -> Option<String> {
    let start = domain_xml.find("<channel type='qemu-vdagent'")?;
    let end = start + domain_xml[start..].find("</channel>")? + "</channel>".len();
    Some(domain_xml[start..end].to_string())
}

/// The NICs of a domain definition that are on a libvirt network: (network, MAC lower case).
pub fn network_nics(domain_xml: &str) -> Vec<(String, String)> {
    domain_xml
        .split("<interface type='network'")
        .skip(1)
        .filter_map(|rest| {
            let iface = &rest[..rest.find("</interface>")?];
            let mac = iface.split("<mac address='").nth(1)?.split('\'').next()?.to_ascii_lowercase();
            let network = iface.split("<source network='").nth(1)?.split('\'').next()?.to_string();
            Some((network, mac))
        })
        .collect()
}

/// The gateway (host) address of a network, from its definition (`<ip address='…'`).
pub fn network_gateway(network_xml: &str) -> Option<String> {
    let start = network_xml.find("<ip ")?;
    let element = &network_xml[start..start + network_xml[start..].find('>')?];
    Some(element.split("address='").nth(1)?.split('\'').next()?.to_string())
}

/// The `<interface>` element of a domain definition that has this MAC address.
pub fn interface_with_mac(domain_xml: &str, mac: &str) -> Option<String> {
    let needle = format!("address='{}'", mac.to_ascii_lowercase());
    let mut rest = domain_xml;
    while let Some(start) = rest.find("<interface") {
        let end = rest[start..].find("</interface>")? + start + "</interface>".len();
        let element = &rest[start..end];
        if element.to_ascii_lowercase().contains(&needle) {
            return Some(element.to_string());
        }
        rest = &rest[end..];
    }
    None
}

/// The port libvirt gave the VNC console of a running domain (`port='-1'` until it runs).
pub fn vnc_port(domain_xml: &str) -> Option<u16> {
    let start = domain_xml.find("<graphics type='vnc'")?;
    let element = &domain_xml[start..start + domain_xml[start..].find('>')?];
    let port = element.split("port='").nth(1)?.split('\'').next()?;
    port.parse::<i32>().ok().filter(|p| *p > 0).map(|p| p as u16)
}

pub fn network(spec: &NetworkSpec) -> String {
    let s = escape(&spec.subnet);
    format!(
        "<network>
  <name>{}</name>
  <bridge name='{}' stp='on' delay='0'/>
  <forward mode='nat'/>
  <ip address='{s}.1' netmask='255.255.255.0'><dhcp><range start='{s}.10' end='{s}.250'/></dhcp></ip>
</network>",
        escape(&spec.name),
        escape(&spec.bridge)
    )
}

/// Every hosted network is a /24 inside this /12: the per-region networks of hosts in the
/// control plane's process (10.213.x) and each agent host's own (10.214.x and up).
pub const CLOUD_PC_NETWORKS: (&str, u8) = ("10.208.0.0", 12);

/// Whether an IPv4 address is inside [`CLOUD_PC_NETWORKS`].
pub fn in_cloud_pc_networks(ip: &str) -> bool {
    let mut octets = ip.split('.').map(|o| o.parse::<u8>());
    matches!((octets.next(), octets.next()), (Some(Ok(10)), Some(Ok(208..=223))))
}

pub const ISOLATION_FILTER: &str = "cloudpc-isolation";

/// The anti-spoofing rules both NIC filters start with: only the NIC's MAC, only its address
/// (`$IP`: reserved or learnt; DHCP from 0.0.0.0 before it has one), IPv4 and ARP only.
const ANTI_SPOOFING: &str = "  <rule action='drop' direction='out' priority='-900'><mac match='no' srcmacaddr='$MAC'/></rule>
  <rule action='accept' direction='out' priority='-850'><ip srcipaddr='0.0.0.0' protocol='udp' srcportstart='68' srcportend='68' dstportstart='67' dstportend='67'/></rule>
  <rule action='drop' direction='out' priority='-800'><ip match='no' srcipaddr='$IP'/></rule>
  <rule action='drop' direction='out' priority='-750'><arp match='no' arpsrcmacaddr='$MAC'/></rule>
  <rule action='drop' direction='out' priority='-740'><arp match='no' arpsrcipaddr='$IP'/></rule>
  <rule action='accept' direction='inout' priority='-500'><mac protocolid='arp'/></rule>
  <rule action='accept' direction='inout' priority='-500'><mac protocolid='ipv4'/></rule>
  <rule action='drop' direction='inout' priority='-400'/>";

/// What a Cloud PC may send, so that its user (who may be a local admin) cannot reach other
/// users' Cloud PCs or the host. Parameters: `MAC` (libvirt fills it in), `IP` (the address
/// reserved for the NIC, see [`crate::dhcp`]; learnt from the network's DHCP server,
/// `CTRL_IP_LEARNING=dhcp` and `DHCPSERVER`, only where it cannot be reserved), `GATEWAY` (the
/// host on the Cloud PC's network) and `HOST_IP` (each of the host's other addresses).
///
/// Layer 2 (ebtables): frames only from the NIC's own MAC, IPv4 only from its own address (or
/// a DHCP request), ARP only about itself, and nothing but IPv4 and ARP. Layer 3 (iptables):
/// DHCP and DNS to the host; nothing else to any Cloud PC network (neighbours, the host's
/// side) or to the host's other addresses; the rest (the internet, through NAT) passes.
/// The fixed UUID lets a redefinition update the live filter instead of creating a second one.
pub fn isolation_filter() -> String {
    let (net, mask) = CLOUD_PC_NETWORKS;
    format!(
        "<filter name='{ISOLATION_FILTER}' chain='root'>
  <uuid>0b6f3c1e-7d2a-4f55-8e0c-c10dbc0a1501</uuid>
{ANTI_SPOOFING}
  <rule action='accept' direction='out' priority='100'><udp dstportstart='67' dstportend='67'/></rule>
  <rule action='accept' direction='out' priority='110'><udp dstipaddr='$GATEWAY' dstportstart='53' dstportend='53'/></rule>
  <rule action='accept' direction='out' priority='110'><tcp dstipaddr='$GATEWAY' dstportstart='53' dstportend='53'/></rule>
  <rule action='drop' direction='out' priority='200'><all dstipaddr='{net}' dstipmask='{mask}'/></rule>
  <rule action='drop' direction='out' priority='210'><all dstipaddr='$HOST_IP'/></rule>
</filter>"
    )
}

pub const BLOCK_RDP_FILTER: &str = "cloudpc-block-rdp-isolated";

/// The isolation filter plus: inbound remote-desktop traffic (TCP and UDP 3389) dropped.
pub fn block_rdp_filter() -> String {
    format!(
        "<filter name='{BLOCK_RDP_FILTER}' chain='root'>
  <uuid>4f0c5a8e-2c4b-4d7e-9a55-c10dbc0a3390</uuid>
  <filterref filter='{ISOLATION_FILTER}'/>
  <rule action='drop' direction='in' priority='500'><tcp dstportstart='3389'/></rule>
  <rule action='drop' direction='in' priority='500'><udp dstportstart='3389'/></rule>
</filter>"
    )
}

/// What makes two definitions of a filter the same, in the form libvirt gives it back (its own
/// layout): the filters it includes and each rule's action, direction, priority and match
/// attributes, in order.
pub fn filter_fingerprint(doc: &str) -> Vec<String> {
    let mut parts = Vec::new();
    for piece in doc.split('<').skip(1) {
        let element = piece.split('>').next().unwrap_or("").trim_end_matches('/').trim();
        let Some(name) = element.split_whitespace().next() else { continue };
        if name.starts_with('/') || matches!(name, "filter" | "uuid") {
            continue;
        }
        let mut attrs: Vec<&str> = element.split_whitespace().skip(1).collect();
        attrs.sort_unstable();
        parts.push(format!("{name} {}", attrs.join(" ")));
    }
    parts
}

pub const ORG_FILTER: &str = "cloudpc-org";

/// For a NIC on the organisation's network: the isolation filter's anti-spoofing part only. The
/// Cloud PC sends from its own MAC and from the address the organisation's DHCP gave it (learnt
/// from the DHCP exchange, any server: the network is the organisation's), IPv4 and ARP only.
/// Whom it may reach there is the organisation's firewall's to decide.
pub fn org_filter() -> String {
    format!(
        "<filter name='{ORG_FILTER}' chain='root'>
  <uuid>0b6f3c1e-7d2a-4f55-8e0c-c10dbc0a1502</uuid>
{ANTI_SPOOFING}
</filter>"
    )
}

pub const BLOCK_RDP_ORG_FILTER: &str = "cloudpc-block-rdp-org";

/// For a NIC on the organisation's network: [`org_filter`] plus inbound remote-desktop traffic
/// (TCP and UDP 3389) dropped.
pub fn block_rdp_org_filter() -> String {
    format!(
        "<filter name='{BLOCK_RDP_ORG_FILTER}' chain='root'>
  <uuid>4f0c5a8e-2c4b-4d7e-9a55-c10dbc0a3391</uuid>
  <filterref filter='{ORG_FILTER}'/>
  <rule action='drop' direction='in' priority='500'><tcp dstportstart='3389'/></rule>
  <rule action='drop' direction='in' priority='500'><udp dstportstart='3389'/></rule>
</filter>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vdagent_channel_is_found_in_a_definition() {
        let spec = VmSpec {
            name: "n".into(),
            vcpus: 1,
            memory_mib: 64,
            disk: PathBuf::from("/d"),
            boot: Boot::Firmware,
            console_log: PathBuf::from("/c"),
        };
        let c = vdagent_channel(&domain(&spec, Accelerator::Tcg)).expect("the clipboard channel");
        assert!(c.starts_with("<channel type='qemu-vdagent'>") && c.ends_with("</channel>"), "{c}");
        assert!(c.contains("com.redhat.spice.0"));
        assert_eq!(vdagent_channel("<domain><devices/></domain>"), None);
    }

    #[test]
    fn test_network_nics_are_read_from_a_domain_definition() {
        let d = "<domain><devices><interface type='network'><mac address='52:54:00:AA:BB:01'/><source network='cloudpc-local' portid='x'/></interface><interface type='bridge'><mac address='52:54:00:aa:bb:02'/><source bridge='br0'/></interface></devices></domain>";
        assert_eq!(network_nics(d), vec![("cloudpc-local".to_string(), "52:54:00:aa:bb:01".to_string())]);
    }

    #[test]
    fn test_cloud_pc_networks_cover_region_and_host_subnets_only() {
        for ip in ["10.213.16.5", "10.214.1.9", "10.221.255.1", "10.208.0.1", "10.223.0.1"] {
            assert!(in_cloud_pc_networks(ip), "{ip}");
        }
        for ip in ["10.207.1.1", "10.224.0.1", "192.168.1.1", "10.0.2.15", "1.10.213.4"] {
            assert!(!in_cloud_pc_networks(ip), "{ip}");
        }
    }
    use std::path::PathBuf;

    #[test]
    fn test_vnc_port_only_when_assigned() {
        assert_eq!(vnc_port("<graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1'>"), Some(5901));
        assert_eq!(vnc_port("<graphics type='vnc' port='-1' autoport='yes'>"), None);
        assert_eq!(vnc_port("<devices/>"), None);
    }

    #[test]
    fn test_filter_fingerprint_ignores_layout_and_sees_rule_changes() {
        let ours = block_rdp_org_filter();
        let libvirts = format!(
            "<filter name='{BLOCK_RDP_ORG_FILTER}' chain='root'>\n  <uuid>4f0c5a8e-2c4b-4d7e-9a55-c10dbc0a3391</uuid>\n  <filterref filter='{ORG_FILTER}'/>\n  <rule action='drop' direction='in' priority='500'>\n    <tcp dstportstart='3389'/>\n  </rule>\n  <rule action='drop' direction='in' priority='500'>\n    <udp dstportstart='3389'/>\n  </rule>\n</filter>\n"
        );
        assert_eq!(filter_fingerprint(&ours), filter_fingerprint(&libvirts));
        // The definition before the organisation filter existed: no filterref.
        let old = libvirts.replace(&format!("  <filterref filter='{ORG_FILTER}'/>\n"), "");
        assert_ne!(filter_fingerprint(&ours), filter_fingerprint(&old));
        assert_ne!(filter_fingerprint(&ours), filter_fingerprint(&libvirts.replace("3389", "3390")));
    }

    #[test]
    fn test_interface_with_mac_finds_the_right_element() {
        let xml = "<devices><interface type='network'><mac address='52:54:00:00:00:01'/><source network='a'/></interface>\n<interface type='network'><mac address='52:54:00:00:00:02'/><source network='b'/></interface></devices>";
        let found = interface_with_mac(xml, "52:54:00:00:00:02").unwrap();
        assert!(found.contains("network='b'") && !found.contains("network='a'"));
        assert_eq!(interface_with_mac(xml, "52:54:00:00:00:03"), None);
    }

    #[test]
    fn test_nic_is_isolated_and_carries_filter_parameters() {
        let spec = NicSpec {
            network: "n".into(),
            mac: "52:54:00:00:00:01".into(),
            filter: Some("f".into()),
            bridge: None,
            vlan: None,
        };
        let x = nic(&spec, &[("GATEWAY", "10.213.20.1".into()), ("HOST_IP", "192.0.2.7".into())]);
        assert!(x.contains("<port isolated='yes'/>"), "{x}");
        assert!(x.contains("<filterref filter='f'><parameter name='GATEWAY' value='10.213.20.1'/><parameter name='HOST_IP' value='192.0.2.7'/></filterref>"), "{x}");
        let gw = network_gateway("<network><ip address='10.213.20.1' netmask='255.255.255.0'><dhcp/></ip></network>");
        assert_eq!(gw.as_deref(), Some("10.213.20.1"));
        // On the organisation's bridge: a bridge interface, not isolated (the org's DHCP serves it).
        let org = NicSpec { bridge: Some("br-org".into()), filter: None, ..spec.clone() };
        let x = nic(&org, &[]);
        assert!(x.starts_with("<interface type='bridge'>") && x.contains("<source bridge='br-org'/>"), "{x}");
        assert!(!x.contains("isolated") && !x.contains("filterref"), "{x}");
        // On a VLAN: the alias says which, and the running domain's port is found by it.
        let tagged = nic(&NicSpec { vlan: Some(42), ..org }, &[]);
        assert!(tagged.contains("<alias name='ua-cloudpc-vlan42'/>"), "{tagged}");
        let live = format!(
            "<devices>{}\n<interface type='bridge'><mac address='52:54:00:00:00:02'/><target dev='vnet7'/><alias name='ua-cloudpc-vlan42'/></interface>\n<interface type='network'><target dev='vnet8'/><alias name='net1'/></interface></devices>",
            x.replace("<model", "<target dev='vnet6'/><model")
        );
        assert_eq!(vlan_ports(&live), vec![("vnet7".to_string(), 42)]);
    }

    #[test]
    fn test_domain_xml_escapes_and_listens_on_loopback() {
        let spec = VmSpec {
            name: "cpc-<x>".into(),
            vcpus: 2,
            memory_mib: 4096,
            disk: PathBuf::from("/d/a'b.qcow2"),
            boot: Boot::Firmware,
            console_log: PathBuf::from("/d/log"),
        };
        let x = domain(&spec, Accelerator::Tcg);
        assert!(x.contains("<name>cpc-&lt;x&gt;</name>"));
        assert!(x.contains("/d/a&apos;b.qcow2"));
        assert!(x.contains("listen='127.0.0.1'"));
        assert!(x.contains("<domain type='qemu'>"));
        assert!(x.contains("<vcpu>2</vcpu>") && x.contains(">4096</memory>"));
        assert!(x.contains("<channel type='qemu-vdagent'><source><clipboard copypaste='yes'/>"), "clipboard agent");
    }
}
