//! End-to-end: the observer's DNS from systemd-resolved over D-Bus. A
//! private `dbus-daemon` stands in for the system bus and a fake resolved
//! (written here with zbus) owns `org.freedesktop.resolve1` on it; the
//! observer runs in a network namespace of its own with real uplinks. Run
//! as root.
//!
//! The fake behaves as resolved does on the bus: the Manager's `DNS` and
//! `DNSEx` announce every server change (PropertiesChanged); nothing
//! announces new search domains, but resolved rewrites its resolv.conf, so
//! the fake rewrites the file the observer watches as the trigger. Its
//! Link objects have `DNS` but no `DNSEx` (as resolved before v246), its
//! Manager both, so both ways of reading servers are exercised.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{percentile, replace_file, Netns, Running};
use vane_observer::{DnsSource, Exclusions, NetworkSnapshot, ObserverConfig};
use zbus::object_server::SignalEmitter;
use zbus::OwnedObjectPath;

const T: Duration = Duration::from_secs(5);
const NAME: &str = "org.freedesktop.resolve1";
const ROOT: &str = "/org/freedesktop/resolve1";
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A server as resolved sends it: (family, address bytes).
fn srv(s: &str) -> (i32, Vec<u8>) {
    match ip(s) {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    }
}

/// A private bus: `dbus-daemon` on a socket in a temporary directory,
/// allowing anyone to own any name. Stopped on drop.
struct Bus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Bus {
    fn start() -> Bus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={}/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
</busconfig>
"#,
                dir.path().display()
            ),
        )
        .unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("dbus-daemon (Debian package dbus-daemon)");
        // It prints its address once listening, or exits (EOF).
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let address = line.trim().to_owned();
        assert!(address.starts_with("unix:"), "dbus-daemon printed {line:?}");
        Bus {
            child,
            address,
            _dir: dir,
        }
    }
}

impl Bus {
    /// Stops the daemon (every connection to it closes).
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.child.wait();
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug, Clone, Default)]
struct LinkConf {
    servers: Vec<(i32, Vec<u8>)>,
    domains: Vec<(String, bool)>,
}

#[derive(Debug, Default)]
struct FakeState {
    links: BTreeMap<i32, LinkConf>,
    global_servers: Vec<(i32, Vec<u8>)>,
    global_domains: Vec<String>,
}

type Shared = Arc<Mutex<FakeState>>;

fn link_path(ifindex: i32) -> String {
    format!("{ROOT}/link/_3{ifindex}")
}

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.resolve1")]
enum ResolveError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchLink(String),
}

struct Manager(Shared);

#[zbus::interface(name = "org.freedesktop.resolve1.Manager")]
impl Manager {
    fn get_link(&self, ifindex: i32) -> Result<OwnedObjectPath, ResolveError> {
        if !self.0.lock().unwrap().links.contains_key(&ifindex) {
            return Err(ResolveError::NoSuchLink(format!(
                "link {ifindex} not known"
            )));
        }
        Ok(OwnedObjectPath::try_from(link_path(ifindex)).unwrap())
    }

    /// Global servers (ifindex 0) and every link's, as resolved lists them.
    #[zbus(property, name = "DNS")]
    fn dns(&self) -> Vec<(i32, i32, Vec<u8>)> {
        self.dns_ex()
            .into_iter()
            .map(|(i, f, a, _, _)| (i, f, a))
            .collect()
    }

    #[zbus(property, name = "DNSEx")]
    fn dns_ex(&self) -> Vec<(i32, i32, Vec<u8>, u16, String)> {
        let s = self.0.lock().unwrap();
        let global = s
            .global_servers
            .iter()
            .map(|(f, a)| (0, *f, a.clone(), 0, String::new()));
        let links = s.links.iter().flat_map(|(i, l)| {
            l.servers
                .iter()
                .map(move |(f, a)| (*i, *f, a.clone(), 53, String::new()))
        });
        global.chain(links).collect()
    }

    #[zbus(property(emits_changed_signal = "false"), name = "Domains")]
    fn domains(&self) -> Vec<(i32, String, bool)> {
        let s = self.0.lock().unwrap();
        let global = s.global_domains.iter().map(|d| (0, d.clone(), false));
        let links = s
            .links
            .iter()
            .flat_map(|(i, l)| l.domains.iter().map(move |(d, r)| (*i, d.clone(), *r)));
        global.chain(links).collect()
    }
}

struct Link {
    ifindex: i32,
    state: Shared,
}

#[zbus::interface(name = "org.freedesktop.resolve1.Link")]
impl Link {
    #[zbus(property(emits_changed_signal = "false"), name = "DNS")]
    fn dns(&self) -> Vec<(i32, Vec<u8>)> {
        let s = self.state.lock().unwrap();
        s.links
            .get(&self.ifindex)
            .map(|l| l.servers.clone())
            .unwrap_or_default()
    }

    #[zbus(property(emits_changed_signal = "false"), name = "Domains")]
    fn domains(&self) -> Vec<(String, bool)> {
        let s = self.state.lock().unwrap();
        s.links
            .get(&self.ifindex)
            .map(|l| l.domains.clone())
            .unwrap_or_default()
    }
}

/// The fake resolved, on its own runtime.
struct Fake {
    rt: tokio::runtime::Runtime,
    conn: zbus::Connection,
    state: Shared,
    /// The resolv.conf it "rewrites" on every change.
    trigger: PathBuf,
}

impl Fake {
    fn start(bus: &Bus, state: FakeState, trigger: &Path) -> Fake {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let ifindexes: Vec<i32> = state.links.keys().copied().collect();
        let state = Arc::new(Mutex::new(state));
        let conn = rt.block_on(async {
            let mut b = zbus::conn::Builder::address(bus.address.as_str())
                .serve_at(ROOT, Manager(state.clone()));
            for i in ifindexes {
                b = b.serve_at(
                    link_path(i),
                    Link {
                        ifindex: i,
                        state: state.clone(),
                    },
                );
            }
            let conn = b.build().await.expect("fake resolved on the bus");
            conn.request_name(NAME).await.expect("own the name");
            conn
        });
        std::fs::write(trigger, "# fake resolved\n").unwrap();
        Fake {
            rt,
            conn,
            state,
            trigger: trigger.to_owned(),
        }
    }

    /// Changes a link's servers and announces it as resolved does (the
    /// Manager's DNS and DNSEx, and its resolv.conf). Returns the time
    /// just before the signal went out.
    fn set_servers(&self, ifindex: i32, servers: Vec<(i32, Vec<u8>)>) -> Instant {
        self.state
            .lock()
            .unwrap()
            .links
            .entry(ifindex)
            .or_default()
            .servers = servers;
        let t0 = Instant::now();
        self.rt.block_on(async {
            let emitter = SignalEmitter::new(&self.conn, ROOT).unwrap();
            let manager = Manager(self.state.clone());
            manager.d_n_s_changed(&emitter).await.unwrap();
            manager.d_n_s_ex_changed(&emitter).await.unwrap();
        });
        t0
    }

    /// Changes a link's domains: no signal, only resolv.conf rewritten.
    fn set_domains(&self, ifindex: i32, domains: &[(&str, bool)]) {
        self.state
            .lock()
            .unwrap()
            .links
            .entry(ifindex)
            .or_default()
            .domains = domains.iter().map(|(d, r)| (d.to_string(), *r)).collect();
        replace_file(&self.trigger, format!("# {domains:?}\n").as_bytes());
    }

    fn release(&self) {
        self.rt
            .block_on(self.conn.release_name(NAME))
            .expect("release the name");
    }

    fn acquire(&self) {
        self.rt
            .block_on(self.conn.request_name(NAME))
            .expect("own the name");
    }
}

/// The ifindex of `dev` inside `ns` (`ip -o link show` starts with it).
fn ifindex(ns: &Netns, dev: &str) -> i32 {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-o", "link", "show", dev])
        .output()
        .unwrap();
    assert!(out.status.success(), "ip link show {dev}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':').next().unwrap().trim().parse().unwrap()
}

fn servers(s: &NetworkSnapshot) -> Vec<IpAddr> {
    s.dns.servers.clone()
}

fn domains(s: &NetworkSnapshot) -> Vec<&str> {
    s.dns.search_domains.iter().map(String::as_str).collect()
}

/// Nothing of the tunnel's link is ever in the snapshot.
fn assert_no_tunnel(s: &NetworkSnapshot) {
    assert!(!s.dns.servers.contains(&ip("10.99.0.1")), "{:?}", s.dns);
    assert!(
        !s.dns.search_domains.iter().any(|d| d == "tunnel.example"),
        "{:?}",
        s.dns
    );
}

struct Setup {
    ns: Netns,
    dir: tempfile::TempDir,
    bus: Bus,
    fake: Fake,
    up1: i32,
    up2: i32,
    tunnel: i32,
    config: ObserverConfig,
}

/// Two uplinks (up1 primary, up2 spare) and vane's tunnel (vane0, with a
/// better default route, excluded by name); resolved knows all three.
fn setup() -> Setup {
    let ns = Netns::new();
    ns.veth("up1", "up1p");
    ns.veth("up2", "up2p");
    ns.veth("vane0", "vane0p");
    ns.ips("addr add 198.18.1.2/24 dev up1");
    ns.ips("addr add 198.18.2.2/24 dev up2");
    ns.ips("addr add 10.64.0.2/24 dev vane0");
    ns.ips("route add default via 198.18.1.1 dev up1 metric 100");
    ns.ips("route add default via 10.64.0.1 dev vane0 metric 1");
    let (up1, up2, tunnel) = (
        ifindex(&ns, "up1"),
        ifindex(&ns, "up2"),
        ifindex(&ns, "vane0"),
    );
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 198.18.1.1\nsearch lan.example\n").unwrap();
    let trigger = dir.path().join("resolved").join("resolv.conf");
    std::fs::create_dir(trigger.parent().unwrap()).unwrap();
    let bus = Bus::start();
    let mut state = FakeState {
        global_servers: vec![srv("9.9.9.9")],
        global_domains: vec!["global.example".into()],
        ..FakeState::default()
    };
    state.links.insert(
        up1,
        LinkConf {
            servers: vec![srv("10.1.0.53"), srv("fd00::53")],
            domains: vec![
                ("corp.example".into(), false),
                ("route.example".into(), true),
                (".".into(), true),
                ("lab.example".into(), false),
            ],
        },
    );
    state.links.insert(
        up2,
        LinkConf {
            servers: vec![srv("10.20.0.53")],
            domains: vec![("two.example".into(), false)],
        },
    );
    state.links.insert(
        tunnel,
        LinkConf {
            servers: vec![srv("10.99.0.1")],
            domains: vec![("tunnel.example".into(), false), (".".into(), true)],
        },
    );
    let fake = Fake::start(&bus, state, &trigger);
    let config = ObserverConfig {
        resolv_conf: Some(resolv),
        dns_source: DnsSource::Auto,
        system_bus: Some(bus.address.clone()),
        resolved_trigger_file: Some(trigger),
        exclusions: Exclusions {
            ifnames: ["vane0".to_owned()].into(),
            dns_servers: [ip("10.99.0.1")].into(),
            ..Exclusions::default()
        },
        nl80211: false,
        ..ObserverConfig::default()
    };
    Setup {
        ns,
        dir,
        bus,
        fake,
        up1,
        up2,
        tunnel,
        config,
    }
}

#[test]
fn dns_follows_resolved_and_falls_back_to_resolv_conf() {
    let mut s = setup();
    let (up1, up2, tunnel) = (s.up1, s.up2, s.tunnel);
    let fake = &s.fake;
    let mut obs = Running::start(&s.ns, s.config.clone());

    // The primary link's servers and non-routing-only domains.
    let first = &obs.initial;
    assert_eq!(first.primary().unwrap().interface, "up1");
    assert_eq!(servers(first), vec![ip("10.1.0.53"), ip("fd00::53")]);
    assert_eq!(domains(first), vec!["corp.example", "lab.example"]);
    assert_no_tunnel(first);

    // New servers: announced, followed, with the diff.
    fake.set_servers(up1, vec![srv("10.2.0.53")]);
    let c = obs.wait_for("new servers", T, |n| servers(n) == vec![ip("10.2.0.53")]);
    assert!(c.diff.touches("dns.servers"));
    assert!(!c.diff.touches("dns.search_domains"));
    let d = c
        .diff
        .changes
        .iter()
        .find(|f| f.field == "dns.servers")
        .unwrap();
    assert!(
        d.old.contains("10.1.0.53") && d.new.contains("10.2.0.53"),
        "{d}"
    );
    assert!(!c.diff.network_changed, "new servers are the same network");

    // New domains: no signal, only resolved's resolv.conf rewritten.
    fake.set_domains(up1, &[("new.example", false), ("vpn.example", true)]);
    let c = obs.wait_for("new domains", T, |n| domains(n) == vec!["new.example"]);
    assert!(c.diff.touches("dns.search_domains"));
    assert!(
        c.diff.network_changed,
        "new search domains are another network"
    );
    assert_eq!(servers(&c.new), vec![ip("10.2.0.53")]);

    // Malformed servers (5 bytes for IPv4, an unknown family) are skipped;
    // the good one is used.
    fake.set_servers(
        up1,
        vec![
            (AF_INET, vec![10, 3, 0, 53, 1]),
            (99, vec![10, 3, 0, 53]),
            srv("10.3.0.53"),
        ],
    );
    obs.wait_for("malformed skipped", T, |n| {
        servers(n) == vec![ip("10.3.0.53")]
    });

    // The tunnel's link changes: nothing to report.
    fake.set_servers(tunnel, vec![srv("10.99.0.1"), srv("10.99.0.2")]);
    fake.set_domains(tunnel, &[("tunnel.example", false)]);
    obs.expect_quiet(Duration::from_millis(400));

    // The link loses its servers and domains: the global ones, never the
    // tunnel's (which the Manager lists too).
    fake.set_domains(up1, &[]);
    fake.set_servers(up1, vec![]);
    let c = obs.wait_for("global fallback", T, |n| {
        servers(n) == vec![ip("9.9.9.9")] && domains(n) == vec!["global.example"]
    });
    assert_no_tunnel(&c.new);
    assert!(!c.new.dns.servers.contains(&ip("10.99.0.2")));

    // The primary uplink moves to up2: the first change that names up2
    // already carries up2's DNS.
    s.ns.ips("route add default via 198.18.2.1 dev up2 metric 50");
    let c = obs.wait_for("up2 primary", T, |n| {
        n.primary().is_some_and(|u| u.interface == "up2")
    });
    assert_eq!(servers(&c.new), vec![ip("10.20.0.53")]);
    assert_eq!(domains(&c.new), vec!["two.example"]);

    // resolved goes away: resolv.conf.
    fake.release();
    let c = obs.wait_for("resolv.conf fallback", T, |n| {
        servers(n) == vec![ip("198.18.1.1")]
    });
    assert_eq!(domains(&c.new), vec!["lan.example"]);

    // While it is away, its values are not read (the trigger file alone
    // changes nothing) and resolv.conf edits are followed.
    fake.set_domains(up2, &[("ignored.example", false)]);
    replace_file(
        &s.dir.path().join("resolv.conf"),
        b"nameserver 198.18.1.7\nsearch lan2.example\n",
    );
    let c = obs.wait_for("resolv.conf edit", T, |n| {
        servers(n) == vec![ip("198.18.1.7")]
    });
    assert_eq!(domains(&c.new), vec!["lan2.example"]);

    // It comes back: its values again.
    fake.set_domains(up2, &[("two.example", false)]);
    fake.acquire();
    obs.wait_for("resolved back", T, |n| {
        servers(n) == vec![ip("10.20.0.53")] && domains(n) == vec!["two.example"]
    });

    // The bus itself goes: resolv.conf again.
    s.bus.stop();
    obs.wait_for("bus gone", T, |n| servers(n) == vec![ip("198.18.1.7")]);
}

/// resolv-conf only never asks the bus; resolved only reports no DNS
/// while resolved is away.
#[test]
fn the_source_can_be_forced() {
    let s = setup();
    let mut cfg = s.config.clone();
    cfg.dns_source = DnsSource::ResolvConf;
    let obs = Running::start(&s.ns, cfg);
    assert_eq!(servers(&obs.initial), vec![ip("198.18.1.1")]);
    drop(obs);

    let mut cfg = s.config.clone();
    cfg.dns_source = DnsSource::Resolved;
    let mut obs = Running::start(&s.ns, cfg);
    assert_eq!(servers(&obs.initial), vec![ip("10.1.0.53"), ip("fd00::53")]);
    s.fake.release();
    let c = obs.wait_for("no DNS", T, |n| n.dns.servers.is_empty());
    assert!(c.new.dns.search_domains.is_empty());
    drop(obs);

    // A bus that cannot be reached: auto falls back to resolv.conf.
    let mut cfg = s.config.clone();
    cfg.system_bus = Some(format!("unix:path={}/no-bus", s.dir.path().display()));
    let obs = Running::start(&s.ns, cfg);
    assert_eq!(servers(&obs.initial), vec![ip("198.18.1.1")]);
}

/// From the fake's PropertiesChanged to the observer's event, over 20
/// server changes (reported, not asserted).
#[test]
fn latency_of_a_resolved_change() {
    let s = setup();
    let mut cfg = s.config.clone();
    // A tiny window, so each change is a leading edge without waiting.
    cfg.coalesce_window = Duration::from_millis(1);
    let mut obs = Running::start(&s.ns, cfg);
    let mut lat = Vec::new();
    for i in 1..=20u8 {
        let want = IpAddr::from([10, 5, 0, i]);
        let t0 = s.fake.set_servers(s.up1, vec![srv(&want.to_string())]);
        obs.wait_for("server change", T, |n| servers(n) == vec![want]);
        lat.push(t0.elapsed());
    }
    lat.sort();
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    println!(
        "resolved PropertiesChanged to observer event over {} changes: p50 {p50:?}, p99 {p99:?}",
        lat.len()
    );
}
