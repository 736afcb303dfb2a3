//! A fake systemd-resolved on a private bus (crate::bus): the per-link
//! calls vaned's `resolved` DNS backend makes (`SetLinkDNS`,
//! `SetLinkDomains`, `SetLinkDefaultRoute`, `RevertLink`), the link
//! objects with their `DNS`, `Domains` and `DefaultRoute` properties
//! (`GetLink`), and a way to change a link's settings as another program
//! would (`resolvectl dns ...`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Result;

use crate::bus::PrivateBus;

const RESOLVE1: &str = "org.freedesktop.resolve1";
const RESOLVE1_PATH: &str = "/org/freedesktop/resolve1";
const RESOLVE1_MANAGER: &str = "org.freedesktop.resolve1.Manager";

type LinkDns = (i32, Vec<u8>);
type LinkDomain = (String, bool);

/// A link's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub dns: Vec<LinkDns>,
    pub domains: Vec<LinkDomain>,
    pub default_route: bool,
}

impl Link {
    /// The servers as addresses.
    pub fn servers(&self) -> Vec<IpAddr> {
        self.dns
            .iter()
            .filter_map(|(_, b)| match b.len() {
                4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                _ => None,
            })
            .collect()
    }
}

type Links = Arc<Mutex<BTreeMap<i32, Link>>>;

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.resolve1")]
enum ResolveError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchLink(String),
}

struct Manager {
    links: Links,
}

impl Manager {
    fn link(&self, ifindex: i32, f: impl FnOnce(&mut Link)) {
        f(self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ifindex)
            .or_default());
    }
}

#[zbus::interface(name = "org.freedesktop.resolve1.Manager")]
impl Manager {
    #[zbus(name = "SetLinkDNS")]
    fn set_link_dns(&self, ifindex: i32, addresses: Vec<LinkDns>) {
        self.link(ifindex, |l| l.dns = addresses);
    }
    #[zbus(name = "SetLinkDomains")]
    fn set_link_domains(&self, ifindex: i32, domains: Vec<LinkDomain>) {
        // As resolved keeps them: normalized, without a final dot.
        let kept = domains
            .into_iter()
            .map(|(n, r)| match n.as_str() {
                "." => (n, r),
                _ => (n.trim_end_matches('.').to_owned(), r),
            })
            .collect();
        self.link(ifindex, |l| l.domains = kept);
    }
    #[zbus(name = "SetLinkDefaultRoute")]
    fn set_link_default_route(&self, ifindex: i32, enable: bool) {
        self.link(ifindex, |l| l.default_route = enable);
    }
    #[zbus(name = "RevertLink")]
    fn revert_link(&self, ifindex: i32) {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ifindex);
    }
    #[zbus(name = "GetLink")]
    async fn get_link(
        &self,
        #[zbus(object_server)] server: &zbus::ObjectServer,
        ifindex: i32,
    ) -> Result<zbus::OwnedObjectPath, ResolveError> {
        // resolved escapes the index's digits: link 7 is .../link/_37.
        let escaped: String = ifindex
            .to_string()
            .bytes()
            .map(|b| format!("_{b:02x}"))
            .collect();
        let path = format!("{RESOLVE1_PATH}/link/{escaped}");
        let object = LinkObject {
            ifindex,
            links: self.links.clone(),
        };
        // Served on the first request; an existing object stays.
        let _ = server.at(path.as_str(), object).await;
        zbus::OwnedObjectPath::try_from(path).map_err(|e| ResolveError::NoSuchLink(e.to_string()))
    }
}

struct LinkObject {
    ifindex: i32,
    links: Links,
}

impl LinkObject {
    fn get(&self) -> Link {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&self.ifindex)
            .cloned()
            .unwrap_or_default()
    }
}

#[zbus::interface(name = "org.freedesktop.resolve1.Link")]
impl LinkObject {
    #[zbus(property, name = "DNS")]
    fn dns(&self) -> Vec<LinkDns> {
        self.get().dns
    }
    #[zbus(property, name = "Domains")]
    fn domains(&self) -> Vec<LinkDomain> {
        self.get().domains
    }
    #[zbus(property, name = "DefaultRoute")]
    fn default_route(&self) -> bool {
        self.get().default_route
    }
}

/// The fake resolved and its bus; both stop when it drops.
pub struct FakeResolved {
    pub address: String,
    links: Links,
    _conn: zbus::Connection,
    bus: PrivateBus,
}

impl FakeResolved {
    pub fn start(dir: &Path) -> Result<FakeResolved> {
        let bus = PrivateBus::start(dir, "resolved_bus_socket")?;
        let links = Links::default();
        let conn = bus.serve(
            RESOLVE1,
            RESOLVE1_PATH,
            Manager {
                links: links.clone(),
            },
        )?;
        Ok(FakeResolved {
            address: bus.address.clone(),
            links,
            _conn: conn,
            bus,
        })
    }

    /// A link's settings now.
    pub fn link(&self, ifindex: i32) -> Link {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ifindex)
            .cloned()
            .unwrap_or_default()
    }

    /// What another program does: `resolvectl dns IF ADDR` through the
    /// bus, as a client of its own.
    pub fn set_link_dns_as_another_program(&self, ifindex: i32, servers: &[IpAddr]) -> Result<()> {
        let dns: Vec<LinkDns> = servers
            .iter()
            .map(|a| match a {
                IpAddr::V4(a) => (libc::AF_INET, a.octets().to_vec()),
                IpAddr::V6(a) => (libc::AF_INET6, a.octets().to_vec()),
            })
            .collect();
        self.bus.rt.block_on(async {
            let conn = zbus::connection::Builder::address(self.address.as_str())
                .build()
                .await?;
            conn.call_method(
                Some(RESOLVE1),
                RESOLVE1_PATH,
                Some(RESOLVE1_MANAGER),
                "SetLinkDNS",
                &(ifindex, dns),
            )
            .await?;
            Ok::<_, zbus::Error>(())
        })?;
        Ok(())
    }
}
