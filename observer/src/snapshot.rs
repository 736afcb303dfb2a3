//! The network as the observer reports it: plain data, serde, and a diff.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::ssid::Ssid;

/// The interface types, as the rule file names them.
pub use vane_policy::rules::InterfaceType;

/// An address on an interface, with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IfAddress {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for IfAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// The uplink of one address family: the interface that carries the
/// default route of the main table with the lowest metric, and what is
/// known about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uplink {
    /// Interface name.
    pub interface: String,
    pub ifindex: u32,
    #[serde(rename = "type")]
    pub kind: InterfaceType,
    /// The default route's next hop; `None` for a point-to-point or
    /// on-link default route.
    pub gateway: Option<IpAddr>,
    /// The default route's metric (RTA_PRIORITY; 0 when absent).
    pub metric: u32,
    /// Every address on the interface (both families, sorted), link-local
    /// ones included.
    pub addresses: Vec<IfAddress>,
    /// The SSID, only when the interface is Wi-Fi and the SSID is known.
    pub ssid: Option<Ssid>,
}

/// DNS configuration of the underlying network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default)]
    pub servers: Vec<IpAddr>,
    #[serde(default)]
    pub search_domains: Vec<String>,
}

/// The underlying network at one moment. Never the path through vane's
/// own tunnel: its interfaces and routing table are excluded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSnapshot {
    /// Whether any usable network exists: an up interface (not vane's)
    /// carries a default route of the main table, for either family.
    pub available: bool,
    /// The IPv4 uplink.
    pub ipv4: Option<Uplink>,
    /// The IPv6 uplink.
    pub ipv6: Option<Uplink>,
    #[serde(default)]
    pub dns: Dns,
}

impl NetworkSnapshot {
    /// The primary interface: the IPv4 uplink if there is one, else the
    /// IPv6 one.
    pub fn primary(&self) -> Option<&Uplink> {
        self.ipv4.as_ref().or(self.ipv6.as_ref())
    }
}

/// One field that differs between two snapshots, in display form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    /// A dotted path such as `ipv4.gateway` or `dns.servers`.
    pub field: String,
    /// The old value as text (`-` for none).
    pub old: String,
    /// The new value as text (`-` for none).
    pub new: String,
}

impl fmt::Display for FieldChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} -> {}", self.field, self.old, self.new)
    }
}

/// What differs between two snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDiff {
    pub changes: Vec<FieldChange>,
    /// Whether the primary interface, its type, its SSID or the DNS search
    /// domains differ, or availability changed: "a different network",
    /// as opposed to a new lease or metric on the same one.
    pub network_changed: bool,
}

impl SnapshotDiff {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Whether a field (or any field below it: `ipv4` covers
    /// `ipv4.gateway`) changed.
    pub fn touches(&self, field: &str) -> bool {
        self.changes.iter().any(|c| {
            c.field == field
                || (c.field.starts_with(field) && c.field[field.len()..].starts_with('.'))
        })
    }
}

impl fmt::Display for SnapshotDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for c in &self.changes {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

fn opt<T: fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn list<T: fmt::Display>(v: &[T]) -> String {
    if v.is_empty() {
        return "-".to_owned();
    }
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn push(out: &mut Vec<FieldChange>, field: &str, old: String, new: String) {
    if old != new {
        out.push(FieldChange {
            field: field.to_owned(),
            old,
            new,
        });
    }
}

fn diff_uplink(out: &mut Vec<FieldChange>, fam: &str, old: Option<&Uplink>, new: Option<&Uplink>) {
    let f = |name: &str| format!("{fam}.{name}");
    push(
        out,
        &f("interface"),
        opt(old.map(|u| &u.interface)),
        opt(new.map(|u| &u.interface)),
    );
    push(
        out,
        &f("ifindex"),
        opt(old.map(|u| u.ifindex)),
        opt(new.map(|u| u.ifindex)),
    );
    push(
        out,
        &f("type"),
        opt(old.map(|u| u.kind)),
        opt(new.map(|u| u.kind)),
    );
    push(
        out,
        &f("gateway"),
        opt(old.and_then(|u| u.gateway)),
        opt(new.and_then(|u| u.gateway)),
    );
    push(
        out,
        &f("metric"),
        opt(old.map(|u| u.metric)),
        opt(new.map(|u| u.metric)),
    );
    push(
        out,
        &f("addresses"),
        old.map_or_else(|| "-".to_owned(), |u| list(&u.addresses)),
        new.map_or_else(|| "-".to_owned(), |u| list(&u.addresses)),
    );
    push(
        out,
        &f("ssid"),
        opt(old.and_then(|u| u.ssid.as_ref())),
        opt(new.and_then(|u| u.ssid.as_ref())),
    );
}

fn domains_key(d: &[String]) -> Vec<String> {
    let mut v: Vec<String> = d
        .iter()
        .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// What differs from `old` to `new`.
pub fn diff(old: &NetworkSnapshot, new: &NetworkSnapshot) -> SnapshotDiff {
    let mut changes = Vec::new();
    push(
        &mut changes,
        "available",
        old.available.to_string(),
        new.available.to_string(),
    );
    diff_uplink(&mut changes, "ipv4", old.ipv4.as_ref(), new.ipv4.as_ref());
    diff_uplink(&mut changes, "ipv6", old.ipv6.as_ref(), new.ipv6.as_ref());
    push(
        &mut changes,
        "dns.servers",
        list(&old.dns.servers),
        list(&new.dns.servers),
    );
    push(
        &mut changes,
        "dns.search_domains",
        list(&old.dns.search_domains),
        list(&new.dns.search_domains),
    );
    let identity = |s: &NetworkSnapshot| {
        let p = s.primary();
        (
            s.available,
            p.map(|u| u.interface.clone()),
            p.map(|u| u.kind),
            p.and_then(|u| u.ssid.clone()),
            domains_key(&s.dns.search_domains),
        )
    };
    let network_changed = identity(old) != identity(new);
    SnapshotDiff {
        changes,
        network_changed,
    }
}
