//! Fixed addresses for Cloud PCs on a hosted network.
//!
//! The isolation filter lets a Cloud PC send only from its own address. Learning that address
//! by watching the DHCP exchange (libvirt's `CTRL_IP_LEARNING=dhcp`) missed it now and then, and
//! a guest whose exchange was missed stayed cut off until its next renewal (never, for a DHCP
//! client that asks once). So each NIC on a hosted network gets its address reserved in the
//! network's DHCP server (a `<host mac ip/>` entry) before it first asks, and the filter is
//! given that address outright. The choice is made here, from what the network's definition
//! reserves and what its DHCP server has leased (the dnsmasq status file libvirt keeps), because
//! dnsmasq refuses to hand out a reserved address that is still leased to another MAC.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use serde::Deserialize;

/// A `<host>` entry of a network's `<dhcp>`: this MAC always gets this address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub mac: String,
    pub ip: Ipv4Addr,
}

impl Reservation {
    /// The element `virNetworkUpdate` adds or deletes.
    pub fn xml(&self) -> String {
        format!("<host mac='{}' ip='{}'/>", crate::xml::escape(&self.mac), self.ip)
    }
}

/// One lease of the network's DHCP server, as libvirt's lease helper writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Lease {
    #[serde(rename = "ip-address")]
    pub ip: String,
    #[serde(rename = "mac-address", default)]
    pub mac: String,
    /// Seconds since the epoch; 0 for a lease that never ends.
    #[serde(rename = "expiry-time", default)]
    pub expiry: i64,
}

/// Where libvirt keeps the leases of the network whose bridge this is.
pub fn lease_file(bridge: &str) -> std::path::PathBuf {
    std::path::Path::new("/var/lib/libvirt/dnsmasq").join(format!("{bridge}.status"))
}

/// The leases in a status file's text; an empty or unreadable file has none.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    serde_json::from_str(text).unwrap_or_default()
}

fn attr<'a>(element: &'a str, name: &str) -> Option<&'a str> {
    [format!(" {name}='"), format!(" {name}=\"")].iter().find_map(|needle| {
        let start = element.find(needle.as_str())? + needle.len();
        let quote = needle.chars().last()?;
        Some(&element[start..start + element[start..].find(quote)?])
    })
}

/// The elements named `name` (their opening tags) in a document.
fn elements<'a>(doc: &'a str, name: &str) -> Vec<&'a str> {
    let open = format!("<{name} ");
    let mut found = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find(&open) {
        let Some(len) = rest[start..].find('>') else { break };
        found.push(&rest[start..start + len]);
        rest = &rest[start + len..];
    }
    found
}

/// The reservations in a network's definition.
pub fn reservations(network_xml: &str) -> Vec<Reservation> {
    elements(network_xml, "host")
        .into_iter()
        .filter_map(|h| {
            Some(Reservation { mac: attr(h, "mac")?.to_ascii_lowercase(), ip: attr(h, "ip")?.parse().ok()? })
        })
        .collect()
}

/// The first and last address the network's DHCP server hands out.
pub fn range(network_xml: &str) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let r = elements(network_xml, "range").into_iter().next()?;
    Some((attr(r, "start")?.parse().ok()?, attr(r, "end")?.parse().ok()?))
}

/// The bridge of a network's definition.
pub fn bridge(network_xml: &str) -> Option<String> {
    attr(elements(network_xml, "bridge").into_iter().next()?, "name").map(str::to_string)
}

/// The MAC addresses of a domain definition's NICs, lower case.
pub fn domain_macs(domain_xml: &str) -> Vec<String> {
    elements(domain_xml, "mac").into_iter().filter_map(|m| attr(m, "address")).map(str::to_ascii_lowercase).collect()
}

/// What to do to give `mac` a fixed address on a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The address `mac` will have.
    pub ip: Ipv4Addr,
    /// Whether its reservation is still to be added.
    pub add: bool,
    /// Reservations of NICs that no longer exist on the host, to delete first.
    pub stale: Vec<Reservation>,
}

/// Chooses `mac`'s address: the one already reserved for it; else the one it holds a lease on
/// (a Cloud PC that ran before reservations keeps its address); else the lowest address of
/// the range that nobody holds. Reservations of MACs that no NIC on the host has (`live_macs`)
/// are freed. `None` when the range is full.
pub fn plan(
    mac: &str,
    range: (Ipv4Addr, Ipv4Addr),
    reserved: &[Reservation],
    leases: &[Lease],
    live_macs: &HashSet<String>,
    now: i64,
) -> Option<Plan> {
    let mac = mac.to_ascii_lowercase();
    if let Some(r) = reserved.iter().find(|r| r.mac == mac) {
        return Some(Plan { ip: r.ip, add: false, stale: Vec::new() });
    }
    let (kept, stale): (Vec<&Reservation>, Vec<&Reservation>) =
        reserved.iter().partition(|r| live_macs.contains(&r.mac));
    let in_range = |ip: Ipv4Addr| u32::from(range.0) <= u32::from(ip) && u32::from(ip) <= u32::from(range.1);
    let mut taken: HashSet<Ipv4Addr> = kept.iter().map(|r| r.ip).collect();
    let mut own = None;
    for l in leases.iter().filter(|l| l.expiry == 0 || l.expiry > now) {
        let Ok(ip) = l.ip.parse::<Ipv4Addr>() else { continue };
        if l.mac.eq_ignore_ascii_case(&mac) {
            own = Some(ip);
        } else {
            taken.insert(ip);
        }
    }
    let ip = own
        .filter(|ip| in_range(*ip) && !taken.contains(ip))
        .or_else(|| (u32::from(range.0)..=u32::from(range.1)).map(Ipv4Addr::from).find(|ip| !taken.contains(ip)))?;
    Some(Plan { ip, add: true, stale: stale.into_iter().cloned().collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: &str = "<network>
  <name>cloudpc-local</name>
  <bridge name='cpcbr1' stp='on' delay='0'/>
  <ip address='10.213.42.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='10.213.42.10' end='10.213.42.12'/>
      <host mac='52:54:00:AA:00:01' ip='10.213.42.10'/>
      <host mac='52:54:00:aa:00:02' name='x' ip='10.213.42.11'/>
    </dhcp>
  </ip>
</network>";

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn lease(ip: &str, mac: &str, expiry: i64) -> Lease {
        Lease { ip: ip.into(), mac: mac.into(), expiry }
    }

    #[test]
    fn test_reads_a_networks_reservations_range_and_bridge() {
        assert_eq!(
            reservations(NET),
            vec![
                Reservation { mac: "52:54:00:aa:00:01".into(), ip: ip("10.213.42.10") },
                Reservation { mac: "52:54:00:aa:00:02".into(), ip: ip("10.213.42.11") },
            ]
        );
        assert_eq!(range(NET), Some((ip("10.213.42.10"), ip("10.213.42.12"))));
        assert_eq!(bridge(NET).as_deref(), Some("cpcbr1"));
        assert_eq!(
            domain_macs("<interface type='network'><mac address='52:54:00:AB:CD:EF'/></interface>"),
            vec!["52:54:00:ab:cd:ef"]
        );
    }

    #[test]
    fn test_reads_libvirts_lease_file() {
        let text = r#"[{"ip-address": "10.213.42.25", "mac-address": "52:54:00:01:11:b1",
            "client-id": "01:52:54:00:01:11:b1", "expiry-time": 1796133224}]"#;
        let l = parse_leases(text);
        assert_eq!(
            (l[0].ip.as_str(), l[0].mac.as_str(), l[0].expiry),
            ("10.213.42.25", "52:54:00:01:11:b1", 1796133224)
        );
        assert!(parse_leases("").is_empty());
        assert!(parse_leases("not json").is_empty());
    }

    #[test]
    fn test_a_mac_keeps_its_reservation() {
        let live: HashSet<String> = ["52:54:00:aa:00:01".to_string()].into();
        let p = plan("52:54:00:AA:00:01", range(NET).unwrap(), &reservations(NET), &[], &live, 0).unwrap();
        assert_eq!(p, Plan { ip: ip("10.213.42.10"), add: false, stale: vec![] });
    }

    #[test]
    fn test_a_new_mac_gets_an_address_nobody_holds_and_stale_reservations_go() {
        // ...:02 is on no NIC any more, so its reservation is stale and .11 is free again; .10
        // is reserved for a live NIC.
        let live: HashSet<String> = ["52:54:00:aa:00:01".to_string()].into();
        let p = plan("52:54:00:aa:00:03", range(NET).unwrap(), &reservations(NET), &[], &live, 100).unwrap();
        assert_eq!(p.ip, ip("10.213.42.11"));
        assert!(p.add);
        assert_eq!(p.stale, vec![Reservation { mac: "52:54:00:aa:00:02".into(), ip: ip("10.213.42.11") }]);
    }

    #[test]
    fn test_an_address_still_leased_to_another_mac_is_not_chosen() {
        // dnsmasq would not hand out .11 while a removed Cloud PC's lease on it runs; an expired
        // lease holds nothing.
        let live: HashSet<String> = ["52:54:00:aa:00:01".to_string()].into();
        let leases = [lease("10.213.42.11", "52:54:00:aa:00:02", 200), lease("10.213.42.12", "52:54:00:aa:00:09", 50)];
        let p = plan("52:54:00:aa:00:03", range(NET).unwrap(), &reservations(NET), &leases, &live, 100).unwrap();
        assert_eq!(p.ip, ip("10.213.42.12"));
        let never_ends = [lease("10.213.42.11", "x", 0), lease("10.213.42.12", "y", 0)];
        assert_eq!(plan("52:54:00:aa:00:03", range(NET).unwrap(), &reservations(NET), &never_ends, &live, 100), None);
    }

    #[test]
    fn test_a_nic_that_already_has_a_lease_keeps_its_address() {
        let leases = [lease("10.213.42.12", "52:54:00:AA:00:07", 200)];
        let p = plan("52:54:00:aa:00:07", range(NET).unwrap(), &[], &leases, &HashSet::new(), 100).unwrap();
        assert_eq!((p.ip, p.add), (ip("10.213.42.12"), true));
        // Unless another NIC's reservation holds it.
        let held = [Reservation { mac: "52:54:00:aa:00:01".into(), ip: ip("10.213.42.12") }];
        let live: HashSet<String> = ["52:54:00:aa:00:01".to_string()].into();
        let p = plan("52:54:00:aa:00:07", range(NET).unwrap(), &held, &leases, &live, 100).unwrap();
        assert_eq!(p.ip, ip("10.213.42.10"));
    }
}
