//! The few rtnetlink requests vaned makes: bring a link up, add addresses,
//! add and remove routes, delete a link. Each is one request and its
//! acknowledgement on a fresh NETLINK_ROUTE socket, through
//! netlink-packet-route (the messages) over netlink-sys (the socket),
//! the crates the observer reads the kernel with; the rtnetlink crate
//! would bring a second, newer netlink-packet-route into the build for
//! these five calls.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::net::routing::{Family, Rule, RULE_PROTOCOL};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use vane_observer::nl80211::{error_code, frames};

const NLMSG_ERROR: u16 = 2;

/// The index of the interface `name`, if it exists.
pub fn link_index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// Sends one request and waits for its acknowledgement.
fn request(message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    // Bounded: the kernel answers at once, but never hang the daemon.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let tv = nix::sys::time::TimeVal::new(2, 0);
    // SAFETY: fd is the live netlink socket; the option is a timeval.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const nix::sys::time::TimeVal).cast(),
            std::mem::size_of::<nix::sys::time::TimeVal>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = 1;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    msg.finalize();
    let mut out = vec![0; msg.buffer_len()];
    msg.serialize(&mut out);
    socket.send(&out, 0)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        if std::time::Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no rtnetlink ack"));
        }
        buf.clear();
        socket.recv(&mut buf, 0)?;
        for f in frames(&buf) {
            let f = f.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if f.seq == 1 && f.kind == NLMSG_ERROR {
                let code = error_code(f.payload);
                return if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
        }
    }
}

/// Sets the link up.
pub fn set_up(index: u32) -> io::Result<()> {
    set_link_up(index, true)
}

/// Sets the link down: nothing is routed into it any more.
pub fn set_down(index: u32) -> io::Result<()> {
    set_link_up(index, false)
}

fn set_link_up(index: u32, up: bool) -> io::Result<()> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    if up {
        link.header.flags = LinkFlags::Up;
    }
    link.header.change_mask = LinkFlags::Up;
    request(RouteNetlinkMessage::SetLink(link), 0)
}

/// Deletes the link (a persistent TUN device goes away with it).
pub fn delete_link(index: u32) -> io::Result<()> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    request(RouteNetlinkMessage::DelLink(link), 0)
}

/// Adds an address; IPv6 without duplicate address detection (the tunnel
/// is point-to-point, and a tentative address could not be used while the
/// device has no carrier). An address that is already there is fine.
pub fn add_address(index: u32, net: IpNet) -> io::Result<()> {
    let mut a = AddressMessage::default();
    a.header.index = index;
    a.header.prefix_len = net.prefix_len();
    a.header.family = family(net.addr());
    if net.addr().is_ipv6() {
        a.header.flags = AddressHeaderFlags::Nodad;
    }
    a.attributes.push(AddressAttribute::Local(net.addr()));
    a.attributes.push(AddressAttribute::Address(net.addr()));
    ignore(
        request(
            RouteNetlinkMessage::NewAddress(a),
            NLM_F_CREATE | NLM_F_EXCL,
        ),
        libc::EEXIST,
    )
}

/// Deletes an address (and with it the prefix route it made); one that is
/// not there is fine.
pub fn delete_address(index: u32, net: IpNet) -> io::Result<()> {
    let mut a = AddressMessage::default();
    a.header.index = index;
    a.header.prefix_len = net.prefix_len();
    a.header.family = family(net.addr());
    a.attributes.push(AddressAttribute::Local(net.addr()));
    a.attributes.push(AddressAttribute::Address(net.addr()));
    ignore(
        request(RouteNetlinkMessage::DelAddress(a), 0),
        libc::EADDRNOTAVAIL,
    )
}

fn family(addr: IpAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route_message(index: u32, net: IpNet, table: u32) -> RouteMessage {
    let net = net.trunc();
    let mut r = RouteMessage::default();
    r.header.address_family = family(net.addr());
    r.header.destination_prefix_length = net.prefix_len();
    r.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    r.header.protocol = RouteProtocol::Static;
    r.header.scope = RouteScope::Link;
    r.header.kind = RouteType::Unicast;
    if net.prefix_len() > 0 {
        r.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(net.addr())));
    }
    r.attributes.push(RouteAttribute::Oif(index));
    r.attributes.push(RouteAttribute::Table(table));
    r
}

/// Adds a route to `net` through the link, in `table`. An identical route
/// already there is fine.
pub fn add_route(index: u32, net: IpNet, table: u32) -> io::Result<()> {
    ignore(
        request(
            RouteNetlinkMessage::NewRoute(route_message(index, net, table)),
            NLM_F_CREATE | NLM_F_EXCL,
        ),
        libc::EEXIST,
    )
}

/// Deletes the route to `net` through the link from `table`; a route that
/// is not there is fine.
pub fn delete_route(index: u32, net: IpNet, table: u32) -> io::Result<()> {
    ignore(
        request(
            RouteNetlinkMessage::DelRoute(route_message(index, net, table)),
            0,
        ),
        libc::ESRCH,
    )
}

fn rule_message(rule: &Rule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = match rule.family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    m.header.action = RuleAction::ToTable;
    m.header.table = u8::try_from(rule.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    m.attributes.push(RuleAttribute::Priority(rule.priority));
    m.attributes.push(RuleAttribute::Table(rule.table));
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(RULE_PROTOCOL)));
    if rule.invert {
        m.header.flags = RuleFlags::Invert;
    }
    if let Some(mark) = rule.fwmark {
        m.attributes.push(RuleAttribute::FwMark(mark));
        m.attributes.push(RuleAttribute::FwMask(u32::MAX));
    }
    if let Some(len) = rule.suppress_prefixlen {
        m.attributes.push(RuleAttribute::SuppressPrefixLen(len));
    }
    if let Some(to) = rule.to {
        let to = to.trunc();
        m.header.dst_len = to.prefix_len();
        m.attributes.push(RuleAttribute::Destination(to.addr()));
    }
    m
}

/// Adds a policy routing rule; an identical one already there is fine.
pub fn add_rule(rule: &Rule) -> io::Result<()> {
    ignore(
        request(
            RouteNetlinkMessage::NewRule(rule_message(rule)),
            NLM_F_CREATE | NLM_F_EXCL,
        ),
        libc::EEXIST,
    )
}

/// Deletes a policy routing rule; one that is not there is fine.
pub fn delete_rule(rule: &Rule) -> io::Result<()> {
    ignore(
        request(RouteNetlinkMessage::DelRule(rule_message(rule)), 0),
        libc::ENOENT,
    )
}

/// Deletes every rule of `family` at `priority` that carries vane's
/// protocol number (the kernel matches a deletion on the attributes
/// given), returning how many went. For the repair after a crash.
pub fn delete_vane_rules(family: Family, priority: u32) -> io::Result<usize> {
    let mut m = RuleMessage::default();
    m.header.family = match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    m.attributes.push(RuleAttribute::Priority(priority));
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(RULE_PROTOCOL)));
    // Bounded: a rule per local subnet at most, and subnets are few.
    for n in 0..1024 {
        match request(RouteNetlinkMessage::DelRule(m.clone()), 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
    }
    Ok(1024)
}

fn ignore(r: io::Result<()>, errno: i32) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(errno) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};

    #[test]
    fn a_rule_message_says_what_ip_rule_would_show() {
        let rule = Rule {
            family: Family::V6,
            priority: 32342,
            table: 51820,
            fwmark: Some(51820),
            invert: true,
            suppress_prefixlen: None,
            to: Some("2001:db8::5/64".parse().unwrap()),
        };
        let m = rule_message(&rule);
        let mut bytes = vec![0; m.buffer_len()];
        m.emit(&mut bytes);
        let back = RuleMessage::parse(bytes.as_slice()).unwrap();
        assert_eq!(back.header.family, AddressFamily::Inet6);
        assert_eq!(back.header.action, RuleAction::ToTable);
        assert!(back.header.flags.contains(RuleFlags::Invert));
        assert_eq!(back.header.dst_len, 64);
        for a in [
            RuleAttribute::Priority(32342),
            RuleAttribute::Table(51820),
            RuleAttribute::FwMark(51820),
            RuleAttribute::Destination("2001:db8::".parse().unwrap()),
            RuleAttribute::Protocol(RouteProtocol::Other(RULE_PROTOCOL)),
        ] {
            assert!(back.attributes.contains(&a), "{a:?} in {back:?}");
        }
        let suppress = rule_message(&Rule {
            family: Family::V4,
            priority: 32341,
            table: 254,
            fwmark: None,
            invert: false,
            suppress_prefixlen: Some(0),
            to: None,
        });
        assert!(!suppress.header.flags.contains(RuleFlags::Invert));
        assert_eq!(suppress.header.table, 254);
        assert!(suppress
            .attributes
            .contains(&RuleAttribute::SuppressPrefixLen(0)));
    }

    #[test]
    fn a_route_message_names_the_prefix_link_and_table() {
        let m = route_message(7, "10.1.2.3/24".parse().unwrap(), 254);
        let mut bytes = vec![0; m.buffer_len()];
        m.emit(&mut bytes);
        let back = RouteMessage::parse(bytes.as_slice()).unwrap();
        assert_eq!(back.header.destination_prefix_length, 24);
        assert!(back
            .attributes
            .contains(&RouteAttribute::Destination(RouteAddress::Inet(
                "10.1.2.0".parse().unwrap()
            ))));
        assert!(back.attributes.contains(&RouteAttribute::Oif(7)));
        assert!(back.attributes.contains(&RouteAttribute::Table(254)));
        let m = route_message(7, "::/0".parse().unwrap(), 51820);
        assert_eq!(m.header.address_family, AddressFamily::Inet6);
        assert!(!m
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Destination(_))));
    }
}
