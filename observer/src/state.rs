//! The sans-IO core: rtnetlink messages in, a [`NetworkSnapshot`] out.
//!
//! [`NetState`] keeps the links, addresses and default routes the kernel
//! reported (an initial dump, then events) and computes the snapshot on
//! demand. It never does I/O; classification, the SSID and DNS come in
//! through [`SnapshotInputs`].
//!
//! Kernel behaviour it accounts for:
//! - IPv4 routes are flushed *silently* when their interface goes
//!   administratively down or is deleted, and when the addresses they
//!   depend on are removed. [`NetState`] drops the routes of a link that
//!   goes down or away itself, and asks for a route re-dump
//!   ([`NetState::take_route_resync`]) after an IPv4 address is removed.
//! - `ip route replace` is announced as RTM_NEWROUTE with NLM_F_REPLACE
//!   and no RTM_DELROUTE for the route it replaced.
//! - A route whose interface has lost carrier stays in the table (flagged
//!   linkdown, without an event); so a route counts only through a link
//!   that is IFF_UP and IFF_RUNNING (operationally up), whatever the
//!   route's flags said when it was announced.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use serde::{Deserialize, Serialize};

use crate::snapshot::{Dns, IfAddress, InterfaceType, NetworkSnapshot, Uplink};
use crate::ssid::Ssid;

/// The main routing table.
pub const RT_TABLE_MAIN: u32 = 254;

/// What the observer must not count as the underlying network: vane's own
/// tunnel interfaces and routing table, and the DNS servers vane itself
/// installs for the tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusions {
    /// Interfaces by index (the tunnel's, once it exists).
    #[serde(default)]
    pub ifindexes: BTreeSet<u32>,
    /// Interfaces by exact name (for a tunnel whose index is not known yet).
    #[serde(default)]
    pub ifnames: BTreeSet<String>,
    /// vane's own routing table. Only the main table is read anyway; this
    /// matters when someone sets it to 254, which then hides nothing but
    /// the excluded interfaces' routes.
    #[serde(default)]
    pub table: Option<u32>,
    /// DNS servers that are the tunnel's, never the underlying network's.
    #[serde(default)]
    pub dns_servers: BTreeSet<IpAddr>,
    /// Search domains that are the tunnel's (compared without case and
    /// trailing dot): when vane itself writes resolv.conf, they must not
    /// read as the underlying network's, or a `dns_search_domain` rule
    /// would flap on the tunnel's own DNS.
    #[serde(default)]
    pub dns_search_domains: BTreeSet<String>,
}

fn domain_key(d: &str) -> String {
    d.trim_end_matches('.').to_ascii_lowercase()
}

impl Exclusions {
    fn excludes_link(&self, link: &LinkFacts) -> bool {
        self.ifindexes.contains(&link.ifindex) || self.ifnames.contains(&link.name)
    }
}

/// What the kernel said about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    pub ifindex: u32,
    pub name: String,
    /// The link-layer type (ARPHRD_*).
    pub arphrd: u16,
    /// The rtnetlink link kind (`veth`, `tun`, `wireguard`, `wwan`, ...),
    /// when the link has one.
    pub kind: Option<String>,
    /// IFF_UP: administratively up.
    pub admin_up: bool,
    /// IFF_RUNNING: operationally up (carrier).
    pub running: bool,
    pub loopback: bool,
}

impl LinkFacts {
    /// Administratively and operationally up, and not the loopback.
    pub fn usable(&self) -> bool {
        self.admin_up && self.running && !self.loopback
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct NextHop {
    oif: Option<u32>,
    gateway: Option<IpAddr>,
}

/// Identity of a default route as the kernel keys it, plus its next hop.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RouteKey {
    v6: bool,
    table: u32,
    tos: u8,
    metric: u32,
    hops: Vec<NextHop>,
}

impl RouteKey {
    fn slot(&self) -> (bool, u32, u8, u32) {
        (self.v6, self.table, self.tos, self.metric)
    }
}

/// What the DNS, SSID and classification sources contribute.
pub struct SnapshotInputs<'a> {
    pub exclusions: &'a Exclusions,
    /// The type of a link.
    pub classify: &'a dyn Fn(&LinkFacts) -> InterfaceType,
    /// The SSID of a link (asked only for Wi-Fi links).
    pub ssid: &'a dyn Fn(&LinkFacts) -> Option<Ssid>,
    pub dns: &'a Dns,
}

/// Links, addresses and default routes as the kernel reported them.
#[derive(Debug, Clone, Default)]
pub struct NetState {
    links: BTreeMap<u32, LinkFacts>,
    addresses: BTreeMap<u32, BTreeSet<IfAddress>>,
    routes: BTreeSet<RouteKey>,
    route_resync: bool,
}

impl NetState {
    pub fn new() -> NetState {
        NetState::default()
    }

    /// Forgets everything (before a full re-dump).
    pub fn clear(&mut self) {
        *self = NetState::default();
    }

    /// Forgets the routes (before a route re-dump).
    pub fn clear_routes(&mut self) {
        self.routes.clear();
    }

    /// Whether the kernel may have removed IPv4 routes without saying so,
    /// so the caller should re-dump the routes ([`NetState::clear_routes`],
    /// then apply the dump). Reading resets it.
    pub fn take_route_resync(&mut self) -> bool {
        std::mem::take(&mut self.route_resync)
    }

    pub fn link(&self, ifindex: u32) -> Option<&LinkFacts> {
        self.links.get(&ifindex)
    }

    pub fn link_by_name(&self, name: &str) -> Option<&LinkFacts> {
        self.links.values().find(|l| l.name == name)
    }

    pub fn links(&self) -> impl Iterator<Item = &LinkFacts> {
        self.links.values()
    }

    /// Applies one netlink message (of a dump or an event). Messages that
    /// are not about links, addresses or routes are ignored. Returns
    /// whether the message was of interest.
    pub fn apply_netlink(&mut self, msg: &NetlinkMessage<RouteNetlinkMessage>) -> bool {
        match &msg.payload {
            NetlinkPayload::InnerMessage(inner) => {
                let replace = msg.header.flags & NLM_F_REPLACE != 0;
                self.apply(inner, replace)
            }
            _ => false,
        }
    }

    /// Applies one decoded rtnetlink message. `replace` is the header's
    /// NLM_F_REPLACE flag (it matters for RTM_NEWROUTE).
    pub fn apply(&mut self, msg: &RouteNetlinkMessage, replace: bool) -> bool {
        match msg {
            RouteNetlinkMessage::NewLink(m) => {
                self.new_link(m);
                true
            }
            RouteNetlinkMessage::DelLink(m) => {
                self.del_link(m.header.index);
                true
            }
            RouteNetlinkMessage::NewAddress(m) => {
                if let Some(a) = address_of(m) {
                    self.addresses.entry(m.header.index).or_default().insert(a);
                }
                true
            }
            RouteNetlinkMessage::DelAddress(m) => {
                if let Some(a) = address_of(m) {
                    if let Some(set) = self.addresses.get_mut(&m.header.index) {
                        set.remove(&a);
                        if set.is_empty() {
                            self.addresses.remove(&m.header.index);
                        }
                    }
                    if a.address.is_ipv4() {
                        self.route_resync = true;
                    }
                }
                true
            }
            RouteNetlinkMessage::NewRoute(m) => {
                if let Some(key) = default_route_key(m) {
                    if replace {
                        let slot = key.slot();
                        self.routes.retain(|r| r.slot() != slot);
                    }
                    self.routes.insert(key);
                }
                true
            }
            RouteNetlinkMessage::DelRoute(m) => {
                if let Some(key) = default_route_key(m) {
                    if !self.routes.remove(&key) {
                        // A deletion that names no next hop removes the
                        // first route of that slot, as the kernel does.
                        if key
                            .hops
                            .iter()
                            .all(|h| h.oif.is_none() && h.gateway.is_none())
                        {
                            let slot = key.slot();
                            if let Some(first) =
                                self.routes.iter().find(|r| r.slot() == slot).cloned()
                            {
                                self.routes.remove(&first);
                            }
                        }
                    }
                }
                true
            }
            _ => false,
        }
    }

    fn new_link(&mut self, m: &LinkMessage) {
        let index = m.header.index;
        let flags = m.header.flags;
        let old = self.links.get(&index);
        let mut name = old.map(|l| l.name.clone()).unwrap_or_default();
        let mut kind = old.and_then(|l| l.kind.clone());
        for attr in &m.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = n.clone(),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        let facts = LinkFacts {
            ifindex: index,
            name,
            arphrd: m.header.link_layer_type.into(),
            kind,
            admin_up: flags.contains(LinkFlags::Up),
            running: flags.contains(LinkFlags::Running),
            loopback: flags.contains(LinkFlags::Loopback),
        };
        if !facts.admin_up && old.is_some_and(|o| o.admin_up) {
            // The kernel flushes the routes through a link that goes
            // down (IPv4 without telling).
            self.drop_routes_via(index);
            self.route_resync = true;
        }
        self.links.insert(index, facts);
    }

    fn del_link(&mut self, index: u32) {
        self.links.remove(&index);
        self.addresses.remove(&index);
        self.drop_routes_via(index);
    }

    fn drop_routes_via(&mut self, index: u32) {
        let mut kept = BTreeSet::new();
        for mut r in std::mem::take(&mut self.routes) {
            r.hops.retain(|h| h.oif != Some(index));
            if !r.hops.is_empty() {
                kept.insert(r);
            }
        }
        self.routes = kept;
    }

    /// The uplink of one family.
    fn uplink(&self, v6: bool, inputs: &SnapshotInputs<'_>) -> Option<Uplink> {
        let mut best: Option<(u32, u32, Option<IpAddr>)> = None;
        for r in &self.routes {
            if r.v6 != v6 || r.table != RT_TABLE_MAIN || inputs.exclusions.table == Some(r.table) {
                continue;
            }
            for hop in &r.hops {
                let Some(oif) = hop.oif else { continue };
                let Some(link) = self.links.get(&oif) else {
                    continue;
                };
                if !link.usable() || inputs.exclusions.excludes_link(link) {
                    continue;
                }
                let cand = (r.metric, oif, hop.gateway);
                if best.is_none_or(|b| (cand.0, cand.1) < (b.0, b.1)) {
                    best = Some(cand);
                }
            }
        }
        let (metric, oif, gateway) = best?;
        let link = self.links.get(&oif)?;
        let kind = (inputs.classify)(link);
        let ssid = if kind == InterfaceType::Wifi {
            (inputs.ssid)(link)
        } else {
            None
        };
        Some(Uplink {
            interface: link.name.clone(),
            ifindex: oif,
            kind,
            gateway,
            metric,
            addresses: self
                .addresses
                .get(&oif)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
            ssid,
        })
    }

    /// The snapshot of the current state.
    pub fn snapshot(&self, inputs: &SnapshotInputs<'_>) -> NetworkSnapshot {
        let ipv4 = self.uplink(false, inputs);
        let ipv6 = self.uplink(true, inputs);
        let available = ipv4.is_some() || ipv6.is_some();
        let dns = Dns {
            servers: inputs
                .dns
                .servers
                .iter()
                .filter(|s| !inputs.exclusions.dns_servers.contains(s))
                .copied()
                .collect(),
            search_domains: inputs
                .dns
                .search_domains
                .iter()
                .filter(|d| {
                    !inputs
                        .exclusions
                        .dns_search_domains
                        .iter()
                        .any(|x| domain_key(x) == domain_key(d))
                })
                .cloned()
                .collect(),
        };
        NetworkSnapshot {
            available,
            ipv4,
            ipv6,
            dns,
        }
    }
}

fn address_of(m: &AddressMessage) -> Option<IfAddress> {
    let mut address = None;
    let mut local = None;
    for attr in &m.attributes {
        match attr {
            AddressAttribute::Address(a) => address = Some(*a),
            AddressAttribute::Local(a) => local = Some(*a),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's
    // on a point-to-point link); IPv6 sends only IFA_ADDRESS.
    let address = local.or(address)?;
    Some(IfAddress {
        address,
        prefix_len: m.header.prefix_len,
    })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The key of a unicast default route (IPv4 or IPv6, any table); `None`
/// for every other route.
fn default_route_key(m: &RouteMessage) -> Option<RouteKey> {
    let v6 = match m.header.address_family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    if m.header.destination_prefix_length != 0 || m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(m.header.table);
    let mut metric = 0;
    let mut oif = None;
    let mut gateway = None;
    let mut multipath = Vec::new();
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(g) => gateway = route_ip(g),
            RouteAttribute::Via(_) => {}
            RouteAttribute::MultiPath(hops) => {
                for h in hops {
                    let gw = h.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(g) => route_ip(g),
                        _ => None,
                    });
                    multipath.push(NextHop {
                        oif: Some(h.interface_index),
                        gateway: gw,
                    });
                }
            }
            _ => {}
        }
    }
    if table == u32::from(RouteHeader::RT_TABLE_UNSPEC) {
        return None;
    }
    let hops = if multipath.is_empty() {
        vec![NextHop { oif, gateway }]
    } else {
        multipath.sort();
        multipath
    };
    Some(RouteKey {
        v6,
        table,
        tos: m.header.tos,
        metric,
        hops,
    })
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
