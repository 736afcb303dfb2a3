//! NetState from synthetic rtnetlink messages.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteNextHop, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::*;
use crate::snapshot::diff;

fn link(index: u32, name: &str, up: bool, kind: Option<InfoKind>) -> RouteNetlinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.link_layer_type = if kind == Some(InfoKind::Tun) {
        LinkLayerType::None
    } else {
        LinkLayerType::Ether
    };
    if up {
        m.header.flags = LinkFlags::Up | LinkFlags::Running | LinkFlags::LowerUp;
    }
    m.attributes.push(LinkAttribute::IfName(name.into()));
    if let Some(k) = kind {
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(k)]));
    }
    RouteNetlinkMessage::NewLink(m)
}

fn addr(index: u32, ip: &str, prefix: u8) -> AddressMessage {
    let ip: IpAddr = ip.parse().unwrap();
    let mut m = AddressMessage::default();
    m.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.header.prefix_len = prefix;
    m.header.index = index;
    m.attributes.push(AddressAttribute::Address(ip));
    if ip.is_ipv4() {
        m.attributes.push(AddressAttribute::Local(ip));
    }
    m
}

fn route(oif: u32, gw: Option<&str>, metric: Option<u32>, v6: bool, table: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    m.header.table = table.min(255) as u8;
    m.header.protocol = RouteProtocol::Static;
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    m.attributes.push(RouteAttribute::Table(table));
    if let Some(p) = metric {
        m.attributes.push(RouteAttribute::Priority(p));
    }
    m.attributes.push(RouteAttribute::Oif(oif));
    if let Some(gw) = gw {
        let ip: IpAddr = gw.parse().unwrap();
        m.attributes.push(RouteAttribute::Gateway(ip.into()));
    }
    m
}

fn v4(oif: u32, gw: &str, metric: u32) -> RouteMessage {
    route(oif, Some(gw), Some(metric), false, RT_TABLE_MAIN)
}

fn classify(l: &LinkFacts) -> InterfaceType {
    if l.name.starts_with("wl") {
        InterfaceType::Wifi
    } else if l.kind.as_deref() == Some("tun") {
        InterfaceType::Other
    } else {
        InterfaceType::Ethernet
    }
}

fn snap_with(s: &NetState, ex: &Exclusions, dns: &Dns) -> NetworkSnapshot {
    let ssid = |l: &LinkFacts| (l.name == "wlan0").then(|| Ssid(b"caf\xe9".to_vec()));
    s.snapshot(&SnapshotInputs {
        exclusions: ex,
        classify: &classify,
        ssid: &ssid,
        dns,
    })
}

fn snap(s: &NetState) -> NetworkSnapshot {
    snap_with(s, &Exclusions::default(), &Dns::default())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// eth0 (2) and wlan0 (3) up, lo (1), tunnel vane0 (9).
fn base() -> NetState {
    let mut s = NetState::new();
    let mut lo = LinkMessage::default();
    lo.header.index = 1;
    lo.header.link_layer_type = LinkLayerType::Loopback;
    lo.header.flags = LinkFlags::Up | LinkFlags::Running | LinkFlags::Loopback;
    lo.attributes.push(LinkAttribute::IfName("lo".into()));
    s.apply(&RouteNetlinkMessage::NewLink(lo), false);
    s.apply(&link(2, "eth0", true, None), false);
    s.apply(&link(3, "wlan0", true, None), false);
    s.apply(&link(9, "vane0", true, Some(InfoKind::Tun)), false);
    s.apply(
        &RouteNetlinkMessage::NewAddress(addr(2, "192.168.1.10", 24)),
        false,
    );
    s.apply(
        &RouteNetlinkMessage::NewAddress(addr(3, "10.0.0.5", 16)),
        false,
    );
    s.apply(
        &RouteNetlinkMessage::NewAddress(addr(3, "fe80::5", 64)),
        false,
    );
    s
}

#[test]
fn empty_state_is_offline() {
    let s = snap(&NetState::new());
    assert!(!s.available);
    assert_eq!(s.primary(), None);
    assert!(!snap(&base()).available, "links without a default route");
}

#[test]
fn lowest_metric_default_wins() {
    let mut s = base();
    s.apply(
        &RouteNetlinkMessage::NewRoute(v4(2, "192.168.1.1", 100)),
        false,
    );
    s.apply(
        &RouteNetlinkMessage::NewRoute(v4(3, "10.0.0.1", 600)),
        false,
    );
    let n = snap(&s);
    assert!(n.available);
    let u = n.ipv4.as_ref().unwrap();
    assert_eq!(u.interface, "eth0");
    assert_eq!(u.ifindex, 2);
    assert_eq!(u.kind, InterfaceType::Ethernet);
    assert_eq!(u.gateway, Some(ip("192.168.1.1")));
    assert_eq!(u.metric, 100);
    assert_eq!(u.ssid, None);
    assert_eq!(u.addresses.len(), 1);
    assert_eq!(n.ipv6, None);

    // Deleting the better route moves the uplink to Wi-Fi, with its SSID.
    s.apply(
        &RouteNetlinkMessage::DelRoute(v4(2, "192.168.1.1", 100)),
        false,
    );
    let m = snap(&s);
    let u = m.ipv4.as_ref().unwrap();
    assert_eq!(u.interface, "wlan0");
    assert_eq!(u.kind, InterfaceType::Wifi);
    assert_eq!(u.ssid, Some(Ssid(b"caf\xe9".to_vec())));
    assert_eq!(u.addresses.len(), 2);
    let d = diff(&n, &m);
    assert!(d.network_changed);
    assert!(d.touches("ipv4.interface"));
    assert!(d.touches("ipv4"));
    assert!(!d.touches("available"));
    assert!(!d.touches("ipv4.i"), "a prefix of a name is not a field");

    // And deleting that one too: offline.
    s.apply(
        &RouteNetlinkMessage::DelRoute(v4(3, "10.0.0.1", 600)),
        false,
    );
    assert!(!snap(&s).available);
}

#[test]
fn missing_priority_is_metric_zero_and_ties_break_by_ifindex() {
    let mut s = base();
    s.apply(
        &RouteNetlinkMessage::NewRoute(route(3, Some("10.0.0.1"), None, false, 254)),
        false,
    );
    s.apply(
        &RouteNetlinkMessage::NewRoute(route(2, Some("192.168.1.1"), None, false, 254)),
        false,
    );
    let u = snap(&s).ipv4.unwrap();
    assert_eq!((u.interface.as_str(), u.metric), ("eth0", 0));
}

#[test]
fn replace_overwrites_the_route_of_the_same_slot() {
    let mut s = base();
    s.apply(
        &RouteNetlinkMessage::NewRoute(v4(2, "192.168.1.1", 0)),
        false,
    );
    // `ip route replace default via 10.0.0.1 dev wlan0` announces only the
    // new route, flagged NLM_F_REPLACE.
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REPLACE;
    let mut msg = NetlinkMessage::new(
        hdr,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(v4(3, "10.0.0.1", 0))),
    );
    msg.finalize();
    // Through bytes, as the socket delivers it.
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    let decoded = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap();
    assert!(s.apply_netlink(&decoded));
    let u = snap(&s).ipv4.unwrap();
    assert_eq!(u.interface, "wlan0");
    // Without the flag, both routes would stand (an append), and eth0 would
    // win the tie; with it, eth0's route is gone.
    s.apply(&link(3, "wlan0", false, None), false);
    assert!(!snap(&s).available);
}

#[test]
fn carrier_loss_and_admin_down() {
    let mut s = base();
    s.apply(
        &RouteNetlinkMessage::NewRoute(v4(2, "192.168.1.1", 100)),
        false,
    );
    s.apply(
        &RouteNetlinkMessage::NewRoute(v4(3, "10.0.0.1", 600)),
        false,
    );
    // Carrier lost on eth0: up but not running. The route stays in the
    // kernel (linkdown) but is not usable.
    let mut m = LinkMessage::default();
    m.header.index = 2;
    m.header.link_layer_type = LinkLayerType::Ether;
    m.header.flags = LinkFlags::Up;
    m.attributes.push(LinkAttribute::IfName("eth0".into()));
    s.apply(&RouteNetlinkMessage::NewLink(m), false);
    assert_eq!(snap(&s).ipv4.unwrap().interface, "wlan0");
    assert!(!s.take_route_resync(), "carrier loss flushes nothing");
    // Carrier back: eth0 again.
    s.apply(&link(2, "eth0", true, None), false);
    assert_eq!(snap(&s).ipv4.unwrap().interface, "eth0");
    // Admin down: the kernel flushed eth0's routes silently; coming back
    // up does not bring them back.
    s.apply(&link(2, "eth0", false, None), false);
    assert!(s.take_route_resync());
    assert!(!s.take_route_resync(), "reading resets it");
    s.apply(&link(2, "eth0", true, None), false);
    assert_eq!(snap(&s).ipv4.unwrap().interface, "wlan0");
}

#[test]
fn link_deletion_drops_its_routes_and_addresses() {
    let mut s = base();
    s.apply(
        &RouteNetlinkMessage::NewRoute(v4(2, "192.168.1.1", 100)),
        false,
    );
    let mut del = LinkMessage::default();
    del.header.index = 2;
    s.apply(&RouteNetlinkMessage::DelLink(del), false);
    assert!(!snap(&s).available);
    assert!(s.link(2).is_none());
    // A new link reusing the index starts clean.
    s.apply(&link(2, "eth1", true, None), false);
    assert!(!snap(&s).available);
}

#[test]
fn own_tunnel_is_excluded() {
    let mut s = base();
    // Full tunnel: the main table's best default points into vane0 ...
    s.apply(
        &RouteNetlinkMessage::NewRoute(route(9, None, Some(0), false, 254)),
        false,
    );
    s.apply(
        &RouteNetlinkMessage::NewRoute(v4(3, "10.0.0.1", 600)),
        false,
    );
    let mut ex = Exclusions::default();
    assert_eq!(
        snap_with(&s, &ex, &Dns::default()).ipv4.unwrap().interface,
        "vane0"
    );
    ex.ifindexes.insert(9);
    let n = snap_with(&s, &ex, &Dns::default());
    assert_eq!(n.ipv4.unwrap().interface, "wlan0");
    // ... and when the uplink is gone, every route points into the dead
    // tunnel: that is offline, not "online through vane0".
    s.apply(
        &RouteNetlinkMessage::DelRoute(v4(3, "10.0.0.1", 600)),
        false,
    );
    assert!(!snap_with(&s, &ex, &Dns::default()).available);
    // By name works too (the index may not be known yet).
    let by_name = Exclusions {
        ifnames: ["vane0".to_owned()].into(),
        ..Exclusions::default()
    };
    assert!(!snap_with(&s, &by_name, &Dns::default()).available);
}

#[test]
fn other_tables_are_ignored() {
    let mut s = base();
    // vane's own table (wg-quick style: table 51820 holds the tunnel's
    // default) and some other table never count.
    s.apply(
        &RouteNetlinkMessage::NewRoute(route(9, None, Some(0), false, 51820)),
        false,
    );
    s.apply(
        &RouteNetlinkMessage::NewRoute(route(2, Some("192.168.1.1"), Some(0), false, 100)),
        false,
    );
    assert!(!snap(&s).available);
    // Non-default and non-unicast routes are ignored.
    let mut r = v4(2, "192.168.1.1", 0);
    r.header.destination_prefix_length = 1;
    s.apply(&RouteNetlinkMessage::NewRoute(r), false);
    let mut r = v4(2, "192.168.1.1", 0);
    r.header.kind = RouteType::Unreachable;
    s.apply(&RouteNetlinkMessage::NewRoute(r), false);
    assert!(!snap(&s).available);
}

#[test]
fn ipv6_only() {
    let mut s = base();
    s.apply(
        &RouteNetlinkMessage::NewAddress(addr(2, "2001:db8::10", 64)),
        false,
    );
    s.apply(
        &RouteNetlinkMessage::NewRoute(route(2, Some("fe80::1"), Some(1024), true, 254)),
        false,
    );
    let n = snap(&s);
    assert!(n.available);
    assert_eq!(n.ipv4, None);
    let u = n.ipv6.as_ref().unwrap();
    assert_eq!(u.interface, "eth0");
    assert_eq!(u.gateway, Some(ip("fe80::1")));
    assert_eq!(u.metric, 1024);
    assert!(u.addresses.contains(&IfAddress {
        address: ip("2001:db8::10"),
        prefix_len: 64
    }));
    assert_eq!(n.primary().unwrap().interface, "eth0");
    let json = serde_json::to_string(&n).unwrap();
    assert_eq!(serde_json::from_str::<NetworkSnapshot>(&json).unwrap(), n);
}

#[test]
fn ipv6_multipath_default() {
    let mut s = base();
    let mut r = RouteMessage::default();
    r.header.address_family = AddressFamily::Inet6;
    r.header.table = 254;
    r.header.kind = RouteType::Unicast;
    r.attributes.push(RouteAttribute::Priority(1024));
    let hop = |i: u32, gw: Ipv6Addr| {
        let mut h = RouteNextHop::default();
        h.interface_index = i;
        h.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet6(gw)));
        h
    };
    r.attributes.push(RouteAttribute::MultiPath(vec![
        hop(9, Ipv6Addr::LOCALHOST),
        hop(3, "fe80::2".parse().unwrap()),
    ]));
    s.apply(&RouteNetlinkMessage::NewRoute(r.clone()), false);
    let ex = Exclusions {
        ifindexes: [9].into(),
        ..Exclusions::default()
    };
    let u = snap_with(&s, &ex, &Dns::default()).ipv6.unwrap();
    assert_eq!(u.interface, "wlan0");
    s.apply(&RouteNetlinkMessage::DelRoute(r), false);
    assert!(!snap_with(&s, &ex, &Dns::default()).available);
}

#[test]
fn address_changes_and_resync_request() {
    let mut s = base();
    s.apply(
        &RouteNetlinkMessage::NewRoute(v4(2, "192.168.1.1", 100)),
        false,
    );
    let before = snap(&s);
    s.apply(
        &RouteNetlinkMessage::NewAddress(addr(2, "192.168.1.11", 24)),
        false,
    );
    let after = snap(&s);
    let d = diff(&before, &after);
    assert_eq!(d.changes.len(), 1, "{d}");
    assert!(d.touches("ipv4.addresses"));
    assert!(!d.network_changed, "a new address is the same network");
    s.apply(
        &RouteNetlinkMessage::DelAddress(addr(2, "192.168.1.11", 24)),
        false,
    );
    assert_eq!(snap(&s), before);
    assert!(
        s.take_route_resync(),
        "IPv4 address removal may flush routes"
    );
    s.apply(
        &RouteNetlinkMessage::DelAddress(addr(3, "fe80::5", 64)),
        false,
    );
    assert!(!s.take_route_resync());
}

#[test]
fn clear_routes_then_redump() {
    let mut s = base();
    s.apply(
        &RouteNetlinkMessage::NewRoute(v4(2, "192.168.1.1", 100)),
        false,
    );
    s.clear_routes();
    assert!(!snap(&s).available);
    s.apply(
        &RouteNetlinkMessage::NewRoute(v4(3, "10.0.0.1", 600)),
        false,
    );
    assert_eq!(snap(&s).ipv4.unwrap().interface, "wlan0");
    s.clear();
    assert!(s.links().next().is_none());
}

#[test]
fn dns_and_own_dns_servers() {
    let mut s = base();
    s.apply(
        &RouteNetlinkMessage::NewRoute(v4(2, "192.168.1.1", 100)),
        false,
    );
    let dns = Dns {
        servers: vec![ip("192.168.1.1"), ip("10.64.0.1")],
        search_domains: vec!["corp.example.com".into()],
    };
    let ex = Exclusions {
        dns_servers: [ip("10.64.0.1")].into(),
        ..Exclusions::default()
    };
    let n = snap_with(&s, &ex, &dns);
    assert_eq!(n.dns.servers, vec![ip("192.168.1.1")]);
    assert_eq!(n.dns.search_domains, dns.search_domains);
    let d = diff(&snap(&s), &n);
    assert!(d.network_changed, "search domains are part of the identity");
    assert!(d.touches("dns"));

    // The tunnel's own search domains are not the network's either.
    let ex = Exclusions {
        dns_servers: [ip("10.64.0.1")].into(),
        dns_search_domains: ["Corp.Example.com.".to_owned()].into(),
        ..Exclusions::default()
    };
    let n = snap_with(&s, &ex, &dns);
    assert!(n.dns.search_domains.is_empty(), "{:?}", n.dns);
}

#[test]
fn diff_of_equal_snapshots_is_empty() {
    let mut s = base();
    s.apply(
        &RouteNetlinkMessage::NewRoute(v4(3, "10.0.0.1", 600)),
        false,
    );
    let n = snap(&s);
    assert!(diff(&n, &n).is_empty());
    let off = NetworkSnapshot::default();
    let d = diff(&off, &n);
    assert!(d.network_changed);
    assert!(d.to_string().starts_with("available: false -> true"), "{d}");
    let _ = Ipv4Addr::LOCALHOST;
}
