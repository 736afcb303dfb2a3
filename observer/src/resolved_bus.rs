//! systemd-resolved over D-Bus: the thin I/O shell around
//! [`crate::resolved`].
//!
//! What it does on the bus, and nothing else:
//! - `NameHasOwner("org.freedesktop.resolve1")`: is resolved running;
//! - `Manager.GetLink(ifindex)`, then the Link's `DNSEx` (`DNS` on a
//!   resolved without it) and `Domains`, and the Manager's `DNSEx`/`DNS`
//!   and `Domains`: the values [`crate::resolved::underlying_dns`] turns
//!   into a [`crate::Dns`];
//! - subscribes to `NameOwnerChanged` of that name (resolved starting or
//!   stopping) and to `PropertiesChanged` of any object under
//!   `/org/freedesktop/resolve1`, and reports each as a bare "look again".
//!
//! resolved announces a change of any link's servers (the Manager's `DNS`
//! and `DNSEx` emit PropertiesChanged) but not a change of search domains
//! (no property of a Link emits, nor the Manager's `Domains`). It rewrites
//! its own resolv.conf (/run/systemd/resolve/resolv.conf) on every change,
//! so the observer also watches that file as a trigger (its content is not
//! read): see `ObserverConfig::resolved_trigger_file`.

use std::num::NonZeroUsize;

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use zbus::message::Type as MessageType;
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath, OwnedVariant};

use crate::resolved::{RawDomain, RawServer, ResolvedView};

/// resolved's bus name.
pub const RESOLVED_NAME: &str = "org.freedesktop.resolve1";
const ROOT: &str = "/org/freedesktop/resolve1";
const MANAGER: &str = "org.freedesktop.resolve1.Manager";
const LINK: &str = "org.freedesktop.resolve1.Link";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const BUS_NAME: &str = "org.freedesktop.DBus";
const BUS_PATH: &str = "/org/freedesktop/DBus";
const NO_SUCH_LINK: &str = "org.freedesktop.resolve1.NoSuchLink";

/// A Link's `DNSEx` entry: family, address, port, TLS server name.
type LinkServerEx = (i32, Vec<u8>, u16, String);
/// The Manager's `DNSEx` entry: ifindex (0: global), then as a Link's.
type ManagerServerEx = (i32, i32, Vec<u8>, u16, String);

/// A connection to the system bus, for talking to resolved.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedBus {
    conn: Connection,
}

impl ResolvedBus {
    /// Connects to the bus at `address` (a D-Bus address such as
    /// `unix:path=/run/dbus/system_bus_socket`), or to the system bus
    /// (`DBUS_SYSTEM_BUS_ADDRESS`, else the standard socket).
    pub async fn connect(address: Option<&str>) -> zbus::Result<ResolvedBus> {
        let builder = match address {
            Some(a) => zbus::conn::Builder::address(a),
            None => zbus::conn::Builder::system(),
        };
        Ok(ResolvedBus {
            conn: builder.build().await?,
        })
    }

    /// Whether resolved's name has an owner.
    pub async fn present(&self) -> zbus::Result<bool> {
        let reply = self
            .conn
            .call_method(
                Some(BUS_NAME),
                BUS_PATH,
                Some(BUS_NAME),
                "NameHasOwner",
                &(RESOLVED_NAME,),
            )
            .await?;
        reply.body().deserialize::<bool>()
    }

    /// Starts forwarding resolved's signals (see the module documentation)
    /// as `()` on the returned channel. The channel closes when the
    /// connection does.
    pub async fn subscribe(&self) -> zbus::Result<mpsc::UnboundedReceiver<()>> {
        let owner = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender(BUS_NAME)
            .interface(BUS_NAME)
            .member("NameOwnerChanged")
            .arg(0, RESOLVED_NAME)
            .build()?;
        // No sender in this rule: a signal carries the owner's unique
        // name, which the client-side match would not equate with the
        // well-known one. Any PropertiesChanged under resolved's path only
        // makes the observer look again.
        let props = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .interface(PROPERTIES)
            .member("PropertiesChanged")
            .path_namespace(ROOT)
            .build()?;
        let queue = NonZeroUsize::new(64);
        let mut owner = MessageStream::for_match_rule(owner, &self.conn, queue).await?;
        let mut props = MessageStream::for_match_rule(props, &self.conn, queue).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = owner.next() => m,
                    m = props.next() => m,
                };
                match next {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::debug!("resolved signal: {e}"),
                    None => break,
                }
                if tx.send(()).is_err() {
                    break;
                }
            }
        });
        Ok(rx)
    }

    /// What resolved says about link `ifindex` (none: only the Manager's
    /// lists) and globally.
    pub async fn read(&self, ifindex: Option<u32>) -> zbus::Result<ResolvedView> {
        let mut view = ResolvedView::default();
        if let Some(path) = self.link_path(ifindex).await? {
            view.link_servers = self.link_servers(path.as_str()).await?;
            let domains: Vec<(String, bool)> = self.get(path.as_str(), LINK, "Domains").await?;
            view.link_domains = domains
                .into_iter()
                .map(|(name, routing_only)| RawDomain {
                    ifindex: 0,
                    name,
                    routing_only,
                })
                .collect();
        }
        view.manager_servers = self.manager_servers().await?;
        let domains: Vec<(i32, String, bool)> = self.get(ROOT, MANAGER, "Domains").await?;
        view.manager_domains = domains
            .into_iter()
            .map(|(ifindex, name, routing_only)| RawDomain {
                ifindex,
                name,
                routing_only,
            })
            .collect();
        Ok(view)
    }

    /// The Link object of `ifindex`; none when resolved does not know it.
    async fn link_path(&self, ifindex: Option<u32>) -> zbus::Result<Option<OwnedObjectPath>> {
        let Some(ifindex) = ifindex.and_then(|i| i32::try_from(i).ok()) else {
            return Ok(None);
        };
        let reply = self
            .conn
            .call_method(
                Some(RESOLVED_NAME),
                ROOT,
                Some(MANAGER),
                "GetLink",
                &(ifindex,),
            )
            .await;
        match reply {
            Ok(m) => Ok(Some(m.body().deserialize::<OwnedObjectPath>()?)),
            Err(zbus::Error::MethodError(name, _, _)) if name.as_str() == NO_SUCH_LINK => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn link_servers(&self, path: &str) -> zbus::Result<Vec<RawServer>> {
        let ex: zbus::Result<Vec<LinkServerEx>> = self.get(path, LINK, "DNSEx").await;
        let raw = match ex {
            Ok(v) => v.into_iter().map(|(f, a, _, _)| (0, f, a)).collect(),
            Err(_) => {
                let v: Vec<(i32, Vec<u8>)> = self.get(path, LINK, "DNS").await?;
                v.into_iter().map(|(f, a)| (0, f, a)).collect::<Vec<_>>()
            }
        };
        Ok(servers(raw))
    }

    async fn manager_servers(&self) -> zbus::Result<Vec<RawServer>> {
        let ex: zbus::Result<Vec<ManagerServerEx>> = self.get(ROOT, MANAGER, "DNSEx").await;
        let raw = match ex {
            Ok(v) => v.into_iter().map(|(i, f, a, _, _)| (i, f, a)).collect(),
            Err(_) => {
                let v: Vec<(i32, i32, Vec<u8>)> = self.get(ROOT, MANAGER, "DNS").await?;
                v
            }
        };
        Ok(servers(raw))
    }

    /// One property, by `org.freedesktop.DBus.Properties.Get` (resolved's
    /// Link properties announce no changes, so nothing is cached). A value
    /// of another D-Bus type than expected is an error.
    async fn get<T>(&self, path: &str, interface: &str, property: &str) -> zbus::Result<T>
    where
        T: DeserializeOwned + zbus::Type,
    {
        let reply = self
            .conn
            .call_method(
                Some(RESOLVED_NAME),
                path,
                Some(PROPERTIES),
                "Get",
                &(interface, property),
            )
            .await?;
        let value: OwnedVariant = reply.body().deserialize()?;
        zbus::as_variant::deserialize_for_property(&value)
    }
}

fn servers(raw: Vec<(i32, i32, Vec<u8>)>) -> Vec<RawServer> {
    raw.into_iter()
        .map(|(ifindex, family, address)| RawServer {
            ifindex,
            family,
            address,
        })
        .collect()
}
