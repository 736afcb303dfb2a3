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
        domains.push(("~.".to_owned(), true));
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
            vec![("corp.example".to_owned(), false), ("~.".to_owned(), true)]
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

    struct FakeManager {
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl FakeManager {
        fn log(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
    }

    #[zbus::interface(name = "org.freedesktop.resolve1.Manager")]
    impl FakeManager {
        #[zbus(name = "SetLinkDNS")]
        fn set_link_dns(&self, ifindex: i32, addresses: Vec<(i32, Vec<u8>)>) {
            self.log(format!("SetLinkDNS {ifindex} {addresses:?}"));
        }
        #[zbus(name = "SetLinkDomains")]
        fn set_link_domains(&self, ifindex: i32, domains: Vec<(String, bool)>) {
            self.log(format!("SetLinkDomains {ifindex} {domains:?}"));
        }
        #[zbus(name = "SetLinkDefaultRoute")]
        fn set_link_default_route(&self, ifindex: i32, enable: bool) {
            self.log(format!("SetLinkDefaultRoute {ifindex} {enable}"));
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
            .serve_at(
                RESOLVE1_PATH,
                FakeManager {
                    calls: calls.clone(),
                },
            )
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
                r#"SetLinkDomains 7 [("corp.example", false), ("~.", true)]"#.to_owned(),
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
}
