//! The systemd-resolved backend: the tunnel's servers and search domains
//! set on the tunnel's link over D-Bus (`SetLinkDNS`, `SetLinkDomains`; in
//! a full tunnel the routing domain `~.` and `SetLinkDefaultRoute`, so
//! every query goes to the tunnel's servers), undone with `RevertLink`.
//! Nothing to repair after a crash: resolved forgets a link's settings
//! when the device disappears, and the tunnel device goes with its process.

use std::net::IpAddr;

use super::{DnsError, TunnelDns};

pub(super) const RESOLVE1: &str = "org.freedesktop.resolve1";
const RESOLVE1_PATH: &str = "/org/freedesktop/resolve1";
const RESOLVE1_MANAGER: &str = "org.freedesktop.resolve1.Manager";
const RESOLVE1_LINK: &str = "org.freedesktop.resolve1.Link";

/// Whether systemd-resolved owns its name on `conn`.
pub(super) async fn resolved_on(conn: &zbus::Connection) -> bool {
    let Ok(proxy) = zbus::fdo::DBusProxy::new(conn).await else {
        return false;
    };
    let Ok(name) = zbus::names::BusName::try_from(RESOLVE1) else {
        return false;
    };
    proxy.name_has_owner(name).await.unwrap_or(false)
}

/// The backend's state: the D-Bus connection.
#[derive(Default)]
pub(super) struct Resolved {
    /// The system bus, connected on first use (or a private bus in tests).
    pub(super) bus: Option<zbus::Connection>,
}

impl Resolved {
    async fn bus(&mut self, method: &'static str) -> Result<zbus::Connection, DnsError> {
        if let Some(c) = &self.bus {
            return Ok(c.clone());
        }
        let conn = zbus::Connection::system()
            .await
            .map_err(|e| DnsError::DBus {
                method,
                source: Box::new(e),
            })?;
        self.bus = Some(conn.clone());
        Ok(conn)
    }

    async fn call<B>(&mut self, method: &'static str, body: &B) -> Result<(), DnsError>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        let conn = self.bus(method).await?;
        conn.call_method(
            Some(RESOLVE1),
            RESOLVE1_PATH,
            Some(RESOLVE1_MANAGER),
            method,
            body,
        )
        .await
        .map(drop)
        .map_err(|e| DnsError::DBus {
            method,
            source: Box::new(e),
        })
    }

    pub(super) async fn apply(&mut self, ifindex: u32, dns: &TunnelDns) -> Result<(), DnsError> {
        let index = ifindex as i32;
        let (servers, domains) = resolved_args(dns);
        self.call("SetLinkDNS", &(index, servers)).await?;
        self.call("SetLinkDomains", &(index, domains)).await?;
        self.call("SetLinkDefaultRoute", &(index, dns.full_tunnel))
            .await
    }

    pub(super) async fn revert(&mut self, ifindex: u32) -> Result<(), DnsError> {
        match self.call("RevertLink", &(ifindex as i32)).await {
            // The link is gone: so are its settings.
            Err(DnsError::DBus { source, .. })
                if matches!(&*source, zbus::Error::MethodError(name, _, _)
                    if name.as_str() == "org.freedesktop.resolve1.NoSuchLink") =>
            {
                Ok(())
            }
            other => other,
        }
    }
}

impl Resolved {
    /// Whether the link's settings in resolved are still what
    /// [`apply`](Self::apply) set: servers, domains (with `~.` in a full
    /// tunnel) and the default-route flag. Another program (`resolvectl
    /// dns`, a network manager) may have changed them.
    pub(super) async fn in_force(
        &mut self,
        ifindex: u32,
        dns: &TunnelDns,
    ) -> Result<bool, DnsError> {
        let conn = self.bus("GetLink").await?;
        let dbus = |method: &'static str| {
            move |e: zbus::Error| DnsError::DBus {
                method,
                source: Box::new(e),
            }
        };
        let reply = conn
            .call_method(
                Some(RESOLVE1),
                RESOLVE1_PATH,
                Some(RESOLVE1_MANAGER),
                "GetLink",
                &(ifindex as i32),
            )
            .await
            .map_err(dbus("GetLink"))?;
        let path: zbus::OwnedObjectPath = reply.body().deserialize().map_err(dbus("GetLink"))?;
        let get = |property: &'static str| {
            let conn = conn.clone();
            let path = path.clone();
            async move {
                let reply = conn
                    .call_method(
                        Some(RESOLVE1),
                        path.as_str(),
                        Some("org.freedesktop.DBus.Properties"),
                        "Get",
                        &(RESOLVE1_LINK, property),
                    )
                    .await?;
                let value: zbus::OwnedVariant = reply.body().deserialize()?;
                Ok::<_, zbus::Error>(value)
            }
        };
        let (servers, domains) = resolved_args(dns);
        let now_servers: Vec<LinkDns> = get("DNS")
            .await
            .and_then(Vec::try_from)
            .map_err(dbus("Get DNS"))?;
        let now_domains: Vec<LinkDomain> = get("Domains")
            .await
            .and_then(Vec::try_from)
            .map_err(dbus("Get Domains"))?;
        let default_route: bool = get("DefaultRoute")
            .await
            .and_then(bool::try_from)
            .map_err(dbus("Get DefaultRoute"))?;
        // resolved keeps names normalized (no trailing dot, the root as
        // "."): compared as names, not as strings.
        let names = |d: Vec<LinkDomain>| -> Vec<(String, bool)> {
            let mut v: Vec<(String, bool)> = d
                .into_iter()
                .map(|(n, route)| (n.trim_end_matches('.').to_ascii_lowercase(), route))
                .collect();
            v.sort();
            v
        };
        Ok(now_servers == servers
            && names(now_domains) == names(domains)
            && default_route == dns.full_tunnel)
    }
}

/// A SetLinkDNS entry: (address family, address bytes).
pub type LinkDns = (i32, Vec<u8>);
/// A SetLinkDomains entry: (domain, routing only).
pub type LinkDomain = (String, bool);

/// systemd-resolved's SetLinkDNS and SetLinkDomains arguments: servers as
/// (address family, bytes); search domains, plus the routing domain `~.`
/// in a full tunnel.
pub fn resolved_args(dns: &TunnelDns) -> (Vec<LinkDns>, Vec<LinkDomain>) {
    let servers = dns
        .servers
        .iter()
        .map(|a| match a {
            IpAddr::V4(a) => (libc::AF_INET, a.octets().to_vec()),
            IpAddr::V6(a) => (libc::AF_INET6, a.octets().to_vec()),
        })
        .collect();
    let mut domains: Vec<(String, bool)> = dns.search.iter().map(|d| (d.clone(), false)).collect();
    if dns.full_tunnel {
        // The root as a routing-only domain: what `resolvectl domain IF
        // '~.'` sends (the `~` is resolvectl's notation for the flag, not
        // part of the name).
        domains.push((".".to_owned(), true));
    }
    (servers, domains)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::testing::dns;

    #[test]
    fn resolved_arguments() {
        let (servers, domains) =
            resolved_args(&dns(&["10.64.0.1", "fd00::53"], &["corp.example"], true));
        assert_eq!(
            servers,
            vec![
                (libc::AF_INET, vec![10, 64, 0, 1]),
                (
                    libc::AF_INET6,
                    vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x53]
                ),
            ]
        );
        assert_eq!(
            domains,
            vec![("corp.example".to_owned(), false), (".".to_owned(), true)]
        );
        let (_, domains) = resolved_args(&dns(&["10.64.0.1"], &["corp.example"], false));
        assert_eq!(domains, vec![("corp.example".to_owned(), false)]);
    }
}

/// systemd-resolved's side, played by a fake Manager on a private
/// dbus-daemon that records the calls it gets.
#[cfg(test)]
mod bus_tests {
    use super::*;
    use crate::dns::{Backend, DnsManager};
    use std::process::Stdio;
    use std::sync::{Arc, Mutex};

    struct Bus {
        child: std::process::Child,
        address: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for Bus {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn private_bus() -> Bus {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix:path={}", dir.path().join("bus").display());
        let mut child = std::process::Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", "--print-address=1"])
            .arg(format!("--address={address}"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("dbus-daemon (package dbus-daemon)");
        // It prints its address once it listens (the socket file exists a
        // moment before: a connection then was refused), or exits (EOF).
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        assert!(line.starts_with("unix:"), "dbus-daemon printed {line:?}");
        Bus {
            child,
            address,
            _dir: dir,
        }
    }

    #[derive(Debug, zbus::DBusError)]
    #[zbus(prefix = "org.freedesktop.resolve1")]
    enum ResolveError {
        #[zbus(error)]
        ZBus(zbus::Error),
        NoSuchLink(String),
    }

    /// What the fake resolved holds for a link.
    #[derive(Default)]
    struct LinkState {
        dns: Vec<LinkDns>,
        domains: Vec<LinkDomain>,
        default_route: bool,
    }

    type Links = Arc<Mutex<std::collections::BTreeMap<i32, LinkState>>>;

    struct FakeManager {
        calls: Arc<Mutex<Vec<String>>>,
        links: Links,
    }

    impl FakeManager {
        fn new(calls: Arc<Mutex<Vec<String>>>) -> Self {
            FakeManager {
                calls,
                links: Links::default(),
            }
        }
        fn log(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
        fn link(&self, ifindex: i32, f: impl FnOnce(&mut LinkState)) {
            f(self.links.lock().unwrap().entry(ifindex).or_default());
        }
    }

    /// A link object, as resolved serves them at
    /// /org/freedesktop/resolve1/link/_3N (the index's digits escaped).
    struct FakeLink {
        ifindex: i32,
        links: Links,
    }

    impl FakeLink {
        fn with<T>(&self, f: impl FnOnce(&LinkState) -> T) -> T {
            let links = self.links.lock().unwrap();
            f(links.get(&self.ifindex).unwrap_or(&LinkState::default()))
        }
    }

    #[zbus::interface(name = "org.freedesktop.resolve1.Link")]
    impl FakeLink {
        #[zbus(property, name = "DNS")]
        fn dns(&self) -> Vec<LinkDns> {
            self.with(|l| l.dns.clone())
        }
        #[zbus(property, name = "Domains")]
        fn domains(&self) -> Vec<LinkDomain> {
            self.with(|l| l.domains.clone())
        }
        #[zbus(property, name = "DefaultRoute")]
        fn default_route(&self) -> bool {
            self.with(|l| l.default_route)
        }
    }

    fn link_path(ifindex: i32) -> String {
        let escaped: String = ifindex
            .to_string()
            .bytes()
            .map(|b| format!("_{b:02x}"))
            .collect();
        format!("{RESOLVE1_PATH}/link/{escaped}")
    }

    #[zbus::interface(name = "org.freedesktop.resolve1.Manager")]
    impl FakeManager {
        #[zbus(name = "SetLinkDNS")]
        fn set_link_dns(&self, ifindex: i32, addresses: Vec<(i32, Vec<u8>)>) {
            self.log(format!("SetLinkDNS {ifindex} {addresses:?}"));
            self.link(ifindex, |l| l.dns = addresses);
        }
        #[zbus(name = "SetLinkDomains")]
        fn set_link_domains(&self, ifindex: i32, domains: Vec<(String, bool)>) {
            self.log(format!("SetLinkDomains {ifindex} {domains:?}"));
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
            self.log(format!("SetLinkDefaultRoute {ifindex} {enable}"));
            self.link(ifindex, |l| l.default_route = enable);
        }
        #[zbus(name = "GetLink")]
        async fn get_link(
            &self,
            #[zbus(object_server)] server: &zbus::ObjectServer,
            ifindex: i32,
        ) -> Result<zbus::OwnedObjectPath, ResolveError> {
            let path = link_path(ifindex);
            let link = FakeLink {
                ifindex,
                links: self.links.clone(),
            };
            // Served on first request (an existing object stays).
            let _ = server.at(path.as_str(), link).await;
            zbus::OwnedObjectPath::try_from(path)
                .map_err(|e| ResolveError::NoSuchLink(e.to_string()))
        }
        #[zbus(name = "RevertLink")]
        fn revert_link(&self, ifindex: i32) -> Result<(), ResolveError> {
            self.log(format!("RevertLink {ifindex}"));
            if ifindex == 99 {
                return Err(ResolveError::NoSuchLink(format!(
                    "Link {ifindex} not known"
                )));
            }
            Ok(())
        }
    }

    async fn connect(address: &str) -> zbus::Connection {
        zbus::connection::Builder::address(address)
            .build()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn resolved_gets_per_link_dns_and_revert_link() {
        let bus = private_bus();
        let client = connect(&bus.address).await;
        assert!(!resolved_on(&client).await, "no resolved yet");

        let calls = Arc::new(Mutex::new(Vec::new()));
        let _server = zbus::connection::Builder::address(bus.address.as_str())
            .name(RESOLVE1)
            .serve_at(RESOLVE1_PATH, FakeManager::new(calls.clone()))
            .build()
            .await
            .unwrap();
        assert!(resolved_on(&client).await);

        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        let mut m =
            DnsManager::new(resolv.clone(), dir.path().into(), Backend::Resolved).with_bus(client);
        let full = TunnelDns {
            servers: vec!["10.64.0.1".parse().unwrap(), "fd00::53".parse().unwrap()],
            search: vec!["corp.example".into()],
            full_tunnel: true,
        };
        m.apply("wg0", 7, &full).await.unwrap();
        let split = TunnelDns {
            full_tunnel: false,
            search: vec![],
            ..full.clone()
        };
        m.apply("wg0", 7, &split).await.unwrap();
        m.revert("wg0", 7).await.unwrap();
        // A link resolved no longer knows: reverted already.
        m.revert("gone", 99).await.unwrap();

        let fd00_53 = "[253, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 83]";
        assert_eq!(
            *calls.lock().unwrap(),
            vec![
                format!("SetLinkDNS 7 [(2, [10, 64, 0, 1]), (10, {fd00_53})]"),
                r#"SetLinkDomains 7 [("corp.example", false), (".", true)]"#.to_owned(),
                "SetLinkDefaultRoute 7 true".to_owned(),
                format!("SetLinkDNS 7 [(2, [10, 64, 0, 1]), (10, {fd00_53})]"),
                "SetLinkDomains 7 []".to_owned(),
                "SetLinkDefaultRoute 7 false".to_owned(),
                "RevertLink 7".to_owned(),
                "RevertLink 99".to_owned(),
            ]
        );
        assert!(!resolv.exists(), "resolv.conf is not touched");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    #[tokio::test]
    async fn resolved_errors_name_the_method() {
        let bus = private_bus();
        // Nobody owns org.freedesktop.resolve1 on this bus.
        let dir = tempfile::tempdir().unwrap();
        let mut m = DnsManager::new(dir.path().join("r"), dir.path().into(), Backend::Resolved)
            .with_bus(connect(&bus.address).await);
        let dns = TunnelDns {
            servers: vec!["10.64.0.1".parse().unwrap()],
            search: vec![],
            full_tunnel: true,
        };
        let err = m.apply("wg0", 7, &dns).await.unwrap_err();
        assert!(err.to_string().contains("SetLinkDNS"), "{err}");
    }

    #[tokio::test]
    async fn a_link_setting_another_program_changed_is_noticed() {
        let bus = private_bus();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let _server = zbus::connection::Builder::address(bus.address.as_str())
            .name(RESOLVE1)
            .serve_at(RESOLVE1_PATH, FakeManager::new(calls.clone()))
            .build()
            .await
            .unwrap();
        let client = connect(&bus.address).await;
        let dir = tempfile::tempdir().unwrap();
        let mut m = DnsManager::new(dir.path().join("r"), dir.path().into(), Backend::Resolved)
            .with_bus(client.clone());
        let dns = TunnelDns {
            servers: vec!["10.64.0.1".parse().unwrap()],
            search: vec!["corp.example.".into()],
            full_tunnel: true,
        };
        m.apply("wg0", 7, &dns).await.unwrap();
        assert!(m.in_force(7, &dns).await.unwrap());
        // `resolvectl dns wg0 192.168.1.1` by someone else.
        // Another client of the bus, making the same calls vaned does.
        let mut other = Resolved {
            bus: Some(connect(&bus.address).await),
        };
        let servers: Vec<LinkDns> = vec![(libc::AF_INET, vec![192, 168, 1, 1])];
        other.call("SetLinkDNS", &(7i32, servers)).await.unwrap();
        assert!(!m.in_force(7, &dns).await.unwrap());
        m.apply("wg0", 7, &dns).await.unwrap();
        assert!(m.in_force(7, &dns).await.unwrap());
        // The routing domain taken away: queries no longer all go to ours.
        let domains: Vec<LinkDomain> = vec![("corp.example".into(), false)];
        other
            .call("SetLinkDomains", &(7i32, domains))
            .await
            .unwrap();
        assert!(!m.in_force(7, &dns).await.unwrap());
        m.apply("wg0", 7, &dns).await.unwrap();
        // The default-route flag.
        other
            .call("SetLinkDefaultRoute", &(7i32, false))
            .await
            .unwrap();
        assert!(!m.in_force(7, &dns).await.unwrap());
    }
}
