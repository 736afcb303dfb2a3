//! DNS of the underlying network from systemd-resolved: the sans-IO part.
//!
//! resolved keeps DNS servers and search domains per link, plus global ones
//! (resolved.conf). Its D-Bus values come in here as plain data
//! ([`ResolvedView`]) and go out as a [`Dns`]; the D-Bus I/O is in
//! `resolved_bus.rs`.
//!
//! The underlying network's DNS is the *primary uplink's* link (the IPv4
//! uplink, else the IPv6 one):
//! - servers: the link's `DNSEx` (or `DNS` on resolved older than v246);
//!   when the link has none, the global servers (the Manager's entries with
//!   ifindex 0, never another link's);
//! - search domains: the link's domains that are not routing-only (`~`);
//!   when the link has none, the global non-routing-only domains.
//!
//! The fallback is per field, because resolved itself uses the global
//! servers for a link without servers of its own. `FallbackDNS` (the
//! compiled-in servers resolved uses when nothing is configured) is not
//! reported: it says nothing about the network. vane's own tunnel is never
//! read: its link is never the primary uplink (the snapshot excludes it),
//! and the Manager's per-link entries are ignored.
//!
//! Malformed values (an unknown address family, an address of the wrong
//! length for its family, an empty or unprintable domain) are skipped, each
//! with a [`ConvertError`] saying what and why; the rest is used.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::snapshot::Dns;
use crate::state::Exclusions;

const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;

/// Where the observer takes the underlying network's DNS from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DnsSource {
    /// systemd-resolved while it is on the system bus, else resolv.conf.
    #[default]
    Auto,
    /// systemd-resolved only; no DNS while it is not on the bus.
    Resolved,
    /// resolv.conf only; the bus is never contacted.
    ResolvConf,
}

impl DnsSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DnsSource::Auto => "auto",
            DnsSource::Resolved => "resolved",
            DnsSource::ResolvConf => "resolv-conf",
        }
    }
}

impl fmt::Display for DnsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DnsSource {
    type Err = String;

    fn from_str(s: &str) -> Result<DnsSource, String> {
        match s {
            "auto" => Ok(DnsSource::Auto),
            "resolved" => Ok(DnsSource::Resolved),
            "resolv-conf" => Ok(DnsSource::ResolvConf),
            _ => Err(format!(
                "{s:?} is not a DNS source (auto, resolved, resolv-conf)"
            )),
        }
    }
}

/// One server as resolved lists it: an address family (AF_INET or
/// AF_INET6) and the address bytes. `ifindex` is 0 for a global server
/// (and for every server of a link's own list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawServer {
    pub ifindex: i32,
    pub family: i32,
    pub address: Vec<u8>,
}

/// One domain as resolved lists it; `routing_only` is the `~` form, used
/// to route queries, never to complete names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDomain {
    pub ifindex: i32,
    pub name: String,
    pub routing_only: bool,
}

/// What resolved said: the primary link's lists (empty when there is no
/// primary uplink or resolved does not know the link) and the Manager's
/// lists (global entries have ifindex 0; the others are per-link copies,
/// ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedView {
    pub link_servers: Vec<RawServer>,
    pub link_domains: Vec<RawDomain>,
    pub manager_servers: Vec<RawServer>,
    pub manager_domains: Vec<RawDomain>,
}

/// A value resolved sent that is skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("DNS server with unknown address family {family}")]
    UnknownFamily { family: i32 },
    #[error("DNS server of family {family} with a {len}-byte address (want {want})")]
    AddressLength {
        family: i32,
        len: usize,
        want: usize,
    },
    #[error("search domain {name:?}: {why}")]
    BadDomain { name: String, why: &'static str },
}

/// The address of one server.
pub fn server_ip(family: i32, address: &[u8]) -> Result<IpAddr, ConvertError> {
    let want = match family {
        AF_INET => 4,
        AF_INET6 => 16,
        _ => return Err(ConvertError::UnknownFamily { family }),
    };
    let wrong = || ConvertError::AddressLength {
        family,
        len: address.len(),
        want,
    };
    Ok(match family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(address).map_err(|_| wrong())?,
        )),
        _ => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(address).map_err(|_| wrong())?,
        )),
    })
}

/// A search domain, checked: not empty, at most 253 bytes, printable
/// ASCII without spaces, not the root. A trailing dot is dropped.
pub fn search_domain(name: &str) -> Result<String, ConvertError> {
    let bad = |why| ConvertError::BadDomain {
        name: name.to_owned(),
        why,
    };
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(bad("empty or the root"));
    }
    if trimmed.len() > 253 {
        return Err(bad("longer than 253 bytes"));
    }
    if !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("not printable ASCII without spaces"));
    }
    Ok(trimmed.to_owned())
}

/// The link of the primary uplink to read, unless it is one of vane's
/// own (never true of a snapshot's uplink; checked all the same).
pub fn link_to_read(primary: Option<(u32, &str)>, exclusions: &Exclusions) -> Option<u32> {
    let (ifindex, name) = primary?;
    if exclusions.ifindexes.contains(&ifindex) || exclusions.ifnames.contains(name) {
        return None;
    }
    Some(ifindex)
}

/// The underlying network's DNS from what resolved said (see the module
/// documentation), and the values skipped.
pub fn underlying_dns(view: &ResolvedView) -> (Dns, Vec<ConvertError>) {
    let mut errors = Vec::new();
    let mut servers = collect_servers(view.link_servers.iter(), &mut errors);
    if servers.is_empty() {
        servers = collect_servers(
            view.manager_servers.iter().filter(|s| s.ifindex == 0),
            &mut errors,
        );
    }
    let mut search_domains = collect_domains(view.link_domains.iter(), &mut errors);
    if search_domains.is_empty() {
        search_domains = collect_domains(
            view.manager_domains.iter().filter(|d| d.ifindex == 0),
            &mut errors,
        );
    }
    (
        Dns {
            servers,
            search_domains,
        },
        errors,
    )
}

fn collect_servers<'a>(
    raw: impl Iterator<Item = &'a RawServer>,
    errors: &mut Vec<ConvertError>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for s in raw {
        match server_ip(s.family, &s.address) {
            Ok(ip) if !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
    }
    out
}

fn collect_domains<'a>(
    raw: impl Iterator<Item = &'a RawDomain>,
    errors: &mut Vec<ConvertError>,
) -> Vec<String> {
    let mut out = Vec::new();
    for d in raw.filter(|d| !d.routing_only) {
        match search_domain(&d.name) {
            Ok(name) if !out.contains(&name) => out.push(name),
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(ifindex: i32, a: [u8; 4]) -> RawServer {
        RawServer {
            ifindex,
            family: AF_INET,
            address: a.to_vec(),
        }
    }

    fn dom(ifindex: i32, name: &str, routing_only: bool) -> RawDomain {
        RawDomain {
            ifindex,
            name: name.into(),
            routing_only,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_by_family_and_length() {
        assert_eq!(server_ip(AF_INET, &[10, 0, 0, 1]), Ok(ip("10.0.0.1")));
        let v6: Ipv6Addr = "fd00::53".parse().unwrap();
        assert_eq!(server_ip(AF_INET6, &v6.octets()), Ok(IpAddr::V6(v6)));
        assert_eq!(
            server_ip(AF_INET, &[10, 0, 0]),
            Err(ConvertError::AddressLength {
                family: AF_INET,
                len: 3,
                want: 4
            })
        );
        assert_eq!(
            server_ip(AF_INET6, &[10, 0, 0, 1]),
            Err(ConvertError::AddressLength {
                family: AF_INET6,
                len: 4,
                want: 16
            })
        );
        assert_eq!(
            server_ip(AF_INET, &[0; 16]),
            Err(ConvertError::AddressLength {
                family: AF_INET,
                len: 16,
                want: 4
            })
        );
        assert_eq!(
            server_ip(7, &[10, 0, 0, 1]),
            Err(ConvertError::UnknownFamily { family: 7 })
        );
        assert_eq!(
            server_ip(-1, &[]),
            Err(ConvertError::UnknownFamily { family: -1 })
        );
        assert!(server_ip(7, &[])
            .unwrap_err()
            .to_string()
            .contains("unknown address family 7"));
    }

    #[test]
    fn domains_are_checked() {
        assert_eq!(search_domain("corp.example").unwrap(), "corp.example");
        assert_eq!(search_domain("corp.example.").unwrap(), "corp.example");
        for bad in ["", ".", "a b", "tab\there", "nul\0", "caf\u{e9}"] {
            assert!(search_domain(bad).is_err(), "{bad:?} accepted");
        }
        assert!(search_domain(&"a".repeat(254)).is_err());
        assert!(search_domain(&"a".repeat(253)).is_ok());
    }

    #[test]
    fn link_values_win_and_routing_only_domains_are_not_search_domains() {
        let view = ResolvedView {
            link_servers: vec![
                v4(0, [10, 1, 0, 1]),
                v4(0, [10, 1, 0, 2]),
                v4(0, [10, 1, 0, 1]),
            ],
            link_domains: vec![
                dom(0, "corp.example", false),
                dom(0, ".", true),
                dom(0, "route.example", true),
                dom(0, "lab.example", false),
            ],
            manager_servers: vec![v4(0, [9, 9, 9, 9])],
            manager_domains: vec![dom(0, "global.example", false)],
        };
        let (dns, errors) = underlying_dns(&view);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(dns.servers, vec![ip("10.1.0.1"), ip("10.1.0.2")]);
        assert_eq!(dns.search_domains, vec!["corp.example", "lab.example"]);
    }

    #[test]
    fn global_fallback_per_field_never_another_links_entries() {
        // The link has domains but no servers; the Manager lists the
        // tunnel's (ifindex 9) entries next to the global ones.
        let view = ResolvedView {
            link_servers: vec![],
            link_domains: vec![dom(0, "corp.example", false)],
            manager_servers: vec![
                v4(9, [10, 99, 0, 1]),
                v4(0, [9, 9, 9, 9]),
                v4(3, [10, 1, 0, 1]),
            ],
            manager_domains: vec![
                dom(9, "tunnel.example", false),
                dom(0, "global.example", false),
            ],
        };
        let (dns, _) = underlying_dns(&view);
        assert_eq!(dns.servers, vec![ip("9.9.9.9")]);
        assert_eq!(dns.search_domains, vec!["corp.example"]);

        // No link at all (offline): global values only.
        let view = ResolvedView {
            link_servers: vec![],
            link_domains: vec![dom(0, "only-routing.example", true)],
            ..view
        };
        let (dns, _) = underlying_dns(&view);
        assert_eq!(dns.servers, vec![ip("9.9.9.9")]);
        assert_eq!(dns.search_domains, vec!["global.example"]);

        // Nothing global either: no DNS.
        let (dns, errors) = underlying_dns(&ResolvedView::default());
        assert_eq!(dns, Dns::default());
        assert!(errors.is_empty());
    }

    #[test]
    fn malformed_entries_are_skipped_with_a_reason_and_the_rest_kept() {
        let view = ResolvedView {
            link_servers: vec![
                RawServer {
                    ifindex: 0,
                    family: AF_INET,
                    address: vec![1, 2, 3, 4, 5],
                },
                RawServer {
                    ifindex: 0,
                    family: 99,
                    address: vec![1, 2, 3, 4],
                },
                v4(0, [10, 1, 0, 1]),
            ],
            link_domains: vec![dom(0, "bad domain", false), dom(0, "ok.example", false)],
            ..ResolvedView::default()
        };
        let (dns, errors) = underlying_dns(&view);
        assert_eq!(dns.servers, vec![ip("10.1.0.1")]);
        assert_eq!(dns.search_domains, vec!["ok.example"]);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(matches!(
            errors[0],
            ConvertError::AddressLength { len: 5, .. }
        ));
        assert!(matches!(
            errors[1],
            ConvertError::UnknownFamily { family: 99 }
        ));
        assert!(matches!(errors[2], ConvertError::BadDomain { .. }));

        // A link whose every server is malformed falls back to the global
        // ones, as one without servers does.
        let view = ResolvedView {
            link_servers: vec![RawServer {
                ifindex: 0,
                family: AF_INET6,
                address: vec![0; 4],
            }],
            manager_servers: vec![v4(0, [9, 9, 9, 9])],
            ..ResolvedView::default()
        };
        let (dns, errors) = underlying_dns(&view);
        assert_eq!(dns.servers, vec![ip("9.9.9.9")]);
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn the_excluded_link_is_never_read() {
        let mut ex = Exclusions::default();
        assert_eq!(link_to_read(Some((3, "eth0")), &ex), Some(3));
        assert_eq!(link_to_read(None, &ex), None);
        ex.ifindexes.insert(3);
        assert_eq!(link_to_read(Some((3, "eth0")), &ex), None);
        ex.ifindexes.clear();
        ex.ifnames.insert("vane0".into());
        assert_eq!(link_to_read(Some((7, "vane0")), &ex), None);
    }

    #[test]
    fn source_names() {
        for s in [DnsSource::Auto, DnsSource::Resolved, DnsSource::ResolvConf] {
            assert_eq!(s.as_str().parse::<DnsSource>(), Ok(s));
        }
        assert!("systemd".parse::<DnsSource>().is_err());
        assert_eq!(DnsSource::default(), DnsSource::Auto);
    }
}
