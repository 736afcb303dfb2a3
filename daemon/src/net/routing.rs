//! Full-tunnel routing as plain data: which policy routing rules and which
//! routes of vane's own table `include_all_networks` needs, and which
//! destinations stay outside the tunnel. The worker carries these out
//! through rtnetlink ([`super::rtnl`]); nothing here touches the system.
//!
//! The scheme is wg-quick's: the tunnel's UDP socket carries a fwmark; the
//! default routes (IPv4 and IPv6) through the tunnel sit in vane's table;
//! a rule sends every packet WITHOUT the mark to that table, after a rule
//! that consults the main table with `suppress_prefixlength 0` (so every
//! main-table route except a default route still applies: the peers'
//! AllowedIPs, the directly attached subnets, other local bridges). The
//! tunnel's own encrypted packets carry the mark, skip vane's table and
//! follow the main table's default route, whichever uplink carries it
//! now: roaming between uplinks needs nothing from vane.
//!
//! `exclude_local_networks = false` adds, before those, two rules per
//! directly attached subnet of the uplinks: marked packets for it use the
//! main table (the tunnel's own packets, when the endpoint is on the local
//! network), every other packet for it goes to vane's table, so even the
//! local network is reached through the tunnel. (Not one rule `not to S
//! fwmark M`: a rule's `not` inverts its whole selector, so that rule
//! would also catch every marked packet for any other destination.) Link-local destinations are left alone either way: they are
//! scoped to their link and cannot be routed through a tunnel.
//!
//! The rules have fixed priorities and carry vane's own protocol number,
//! so they are told apart from anyone else's and a vaned that starts after
//! a crash can remove exactly those (`ip rule` shows `proto 118`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The fwmark (and table number) of a full tunnel when the tunnel config
/// names no FwMark: wg-quick's.
pub const DEFAULT_FWMARK: u32 = 51820;
/// The protocol number on vane's rules (FRA_PROTOCOL); unassigned in
/// iproute2's rt_protos.
pub const RULE_PROTOCOL: u8 = 118;
/// Marked packets to a local subnet: the main table
/// (`exclude_local_networks = false` only).
pub const PRIO_LOCAL_MARKED: u32 = 32339;
/// Other packets to a local subnet: to vane's table
/// (`exclude_local_networks = false` only).
pub const PRIO_LOCAL: u32 = 32340;
/// The main table, default routes suppressed.
pub const PRIO_SUPPRESS: u32 = 32341;
/// Unmarked packets: to vane's table.
pub const PRIO_TUNNEL: u32 = 32342;
/// All of vane's priorities, for the repair after a crash.
pub const PRIORITIES: [u32; 4] = [PRIO_LOCAL_MARKED, PRIO_LOCAL, PRIO_SUPPRESS, PRIO_TUNNEL];

/// The full tunnel's parameters, from the rule file and the tunnel config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FullTunnel {
    /// The UDP socket's mark; also the number of vane's table.
    pub fwmark: u32,
    pub exclude_local_networks: bool,
}

impl FullTunnel {
    pub fn table(&self) -> u32 {
        self.fwmark
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

/// One policy routing rule, as `ip rule` would show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    pub family: Family,
    pub priority: u32,
    /// Lookup this table.
    pub table: u32,
    /// Match packets with this mark (`fwmark M`), or with `invert`,
    /// packets without it (`not fwmark M`; only on rules without `to`).
    pub fwmark: Option<u32>,
    pub invert: bool,
    /// Ignore routes of this prefix length or shorter from the table.
    pub suppress_prefixlen: Option<u32>,
    /// Only for this destination.
    pub to: Option<IpNet>,
}

pub const MAIN_TABLE: u32 = 254;

/// The rules a full tunnel needs, for both families. `locals` are the
/// uplinks' directly attached subnets (see `local_subnets`).
pub fn rules(ft: &FullTunnel, locals: &[IpNet]) -> Vec<Rule> {
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        if !ft.exclude_local_networks {
            for net in locals.iter().filter(|n| Family::of(n) == family) {
                out.push(Rule {
                    family,
                    priority: PRIO_LOCAL_MARKED,
                    table: MAIN_TABLE,
                    fwmark: Some(ft.fwmark),
                    invert: false,
                    suppress_prefixlen: None,
                    to: Some(*net),
                });
                out.push(Rule {
                    family,
                    priority: PRIO_LOCAL,
                    table: ft.table(),
                    fwmark: None,
                    invert: false,
                    suppress_prefixlen: None,
                    to: Some(*net),
                });
            }
        }
        out.push(Rule {
            family,
            priority: PRIO_SUPPRESS,
            table: MAIN_TABLE,
            fwmark: None,
            invert: false,
            suppress_prefixlen: Some(0),
            to: None,
        });
        out.push(Rule {
            family,
            priority: PRIO_TUNNEL,
            table: ft.table(),
            fwmark: Some(ft.fwmark),
            invert: true,
            suppress_prefixlen: None,
            to: None,
        });
    }
    out
}

/// The routes of vane's table: both default routes through the tunnel
/// (IPv6 too when the peers carry none: it is then dropped inside the
/// tunnel instead of leaking past it).
pub fn table_routes() -> [IpNet; 2] {
    [
        IpNet::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).unwrap_or_default(),
        IpNet::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).unwrap_or_default(),
    ]
}

fn is_link_local(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// The directly attached subnets of the uplinks (both families),
/// link-local and host routes (/32, /128) left out, sorted, no duplicates.
pub fn local_subnets(snapshot: &vane_observer::NetworkSnapshot) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = [&snapshot.ipv4, &snapshot.ipv6]
        .into_iter()
        .flatten()
        .flat_map(|u| u.addresses.iter())
        .filter(|a| !is_link_local(&a.address) && !a.address.is_loopback())
        .filter_map(|a| IpNet::new(a.address, a.prefix_len).ok())
        .filter(|n| n.prefix_len() < n.max_prefix_len())
        .map(|n| n.trunc())
        .collect();
    nets.sort();
    nets.dedup();
    nets
}

/// Link-local and link-scope multicast: what keeps the local link usable
/// (and lets printers be discovered) when local networks bypass the tunnel.
pub fn link_local_nets() -> Vec<IpNet> {
    ["169.254.0.0/16", "224.0.0.0/24", "fe80::/10", "ff02::/16"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The destinations the kill switch lets past the tunnel: with
/// `exclude_local_networks`, the local subnets and the link-local ranges;
/// otherwise none.
pub fn kill_switch_allowed(ft: &FullTunnel, locals: &[IpNet]) -> Vec<IpNet> {
    if !ft.exclude_local_networks {
        return Vec::new();
    }
    let mut nets = locals.to_vec();
    nets.extend(link_local_nets());
    nets
}

#[cfg(test)]
mod tests {
    use super::*;
    use vane_observer::snapshot::{IfAddress, Uplink};
    use vane_observer::NetworkSnapshot;
    use vane_policy::rules::InterfaceType;

    fn uplink(addrs: &[&str]) -> Uplink {
        Uplink {
            interface: "eth0".into(),
            ifindex: 2,
            kind: InterfaceType::Ethernet,
            gateway: None,
            metric: 0,
            addresses: addrs
                .iter()
                .map(|s| {
                    let n: IpNet = s.parse().unwrap();
                    IfAddress {
                        address: n.addr(),
                        prefix_len: n.prefix_len(),
                    }
                })
                .collect(),
            ssid: None,
        }
    }

    #[test]
    fn local_subnets_are_the_uplinks_networks_without_link_local_or_hosts() {
        let s = NetworkSnapshot {
            available: true,
            ipv4: Some(uplink(&[
                "192.168.1.23/24",
                "10.9.9.9/32",
                "169.254.3.4/16",
                "fe80::1/64",
                "2001:db8:1::5/64",
            ])),
            ipv6: Some(uplink(&["2001:db8:1::5/64", "fd00:1::2/48"])),
            dns: Default::default(),
        };
        let nets: Vec<String> = local_subnets(&s).iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["192.168.1.0/24", "2001:db8:1::/64", "fd00:1::/48"]);
        assert!(local_subnets(&NetworkSnapshot::default()).is_empty());
    }

    #[test]
    fn the_rules_are_wg_quicks_for_both_families() {
        let ft = FullTunnel {
            fwmark: 0x1234,
            exclude_local_networks: true,
        };
        let locals: Vec<IpNet> = vec!["192.168.1.0/24".parse().unwrap()];
        let r = rules(&ft, &locals);
        assert_eq!(r.len(), 4);
        for family in [Family::V4, Family::V6] {
            let mine: Vec<&Rule> = r.iter().filter(|x| x.family == family).collect();
            assert_eq!(mine.len(), 2);
            assert_eq!(
                (mine[0].priority, mine[0].table, mine[0].suppress_prefixlen),
                (PRIO_SUPPRESS, MAIN_TABLE, Some(0))
            );
            assert_eq!(
                (
                    mine[1].priority,
                    mine[1].table,
                    mine[1].fwmark,
                    mine[1].invert
                ),
                (PRIO_TUNNEL, 0x1234, Some(0x1234), true)
            );
            // The main table is consulted first.
            assert!(mine[0].priority < mine[1].priority);
        }
        assert_eq!(kill_switch_allowed(&ft, &locals).len(), 1 + 4);
    }

    #[test]
    fn without_exclude_local_networks_the_local_subnets_go_to_the_tunnel_too() {
        let ft = FullTunnel {
            fwmark: 7,
            exclude_local_networks: false,
        };
        let locals: Vec<IpNet> = vec![
            "192.168.1.0/24".parse().unwrap(),
            "2001:db8::/64".parse().unwrap(),
        ];
        let r = rules(&ft, &locals);
        let local: Vec<&Rule> = r.iter().filter(|x| x.priority == PRIO_LOCAL).collect();
        assert_eq!(local.len(), 2);
        for l in &local {
            assert_eq!((l.table, l.fwmark, l.invert), (7, None, false));
            assert_eq!(Family::of(&l.to.unwrap()), l.family);
            // Before the main table is consulted.
            assert!(l.priority < PRIO_SUPPRESS);
        }
        // The tunnel's own packets to a local subnet (an endpoint on the
        // local network) use the main table, before the rule above.
        let marked: Vec<&Rule> = r
            .iter()
            .filter(|x| x.priority == PRIO_LOCAL_MARKED)
            .collect();
        assert_eq!(marked.len(), 2);
        for m in &marked {
            assert_eq!((m.table, m.fwmark, m.invert), (MAIN_TABLE, Some(7), false));
            assert!(m.priority < PRIO_LOCAL);
        }
        // No inverted rule has a destination: `not` inverts the whole
        // selector.
        assert!(r.iter().all(|x| !(x.invert && x.to.is_some())));
        assert!(kill_switch_allowed(&ft, &locals).is_empty());
    }

    #[test]
    fn the_table_holds_both_default_routes() {
        let r = table_routes();
        assert_eq!(r[0].to_string(), "0.0.0.0/0");
        assert_eq!(r[1].to_string(), "::/0");
    }
}
