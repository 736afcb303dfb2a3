//! Leaks counted on the wire: nftables counters in the server's namespace
//! count every packet arriving from the client over the underlay (any
//! interface but loopback and the server's WireGuard interface) that is
//! not the tunnel's encrypted UDP or neighbour discovery. Traffic through
//! the tunnel arrives on the server's WireGuard interface instead. Each
//! counted packet is also logged with the prefix `vane-leak ` (the
//! kernel log), to find out what it was.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::vaned::Lab;
use crate::{Netns, TempDir};

pub struct Leaks<'a> {
    ns: &'a Netns,
}

impl<'a> Leaks<'a> {
    /// Installs the counters in `ns` (the server's namespace, whose
    /// WireGuard interface is `server_if`); `beyond4` and `beyond6` are
    /// hosts beyond the client's gateway, counted apart as well (what a
    /// kill switch must stop even where the local networks are excluded
    /// from the tunnel).
    pub fn install(ns: &'a Netns, server_if: &str, beyond4: &str, beyond6: &str) -> Leaks<'a> {
        let script = format!(
            "table inet vanetest {{\n\
             counter tunnel {{}}\n\
             counter leak {{}}\n\
             counter beyond {{}}\n\
             chain pre {{\n\
             type filter hook prerouting priority -300; policy accept;\n\
             iifname {{ \"lo\", \"{server_if}\" }} return\n\
             udp dport 51820 counter name \"tunnel\" return\n\
             icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report }} return\n\
             ip daddr {beyond4} counter name \"beyond\"\n\
             ip6 daddr {beyond6} counter name \"beyond\"\n\
             counter name \"leak\" log prefix \"vane-leak \"\n\
             }}\n\
             }}\n"
        );
        let dir = TempDir::new().unwrap();
        let path = dir.write("leak.nft", &script).unwrap();
        ns.exec("nft", &["-f", &path.display().to_string()])
            .unwrap();
        Leaks { ns }
    }

    fn packets(&self, name: &str) -> u64 {
        nft_counter(self.ns, "vanetest", name)
    }

    /// Every packet that left outside the tunnel.
    pub fn leaked(&self) -> u64 {
        self.packets("leak")
    }

    /// Those of them for the hosts beyond the gateway.
    pub fn beyond(&self) -> u64 {
        self.packets("beyond")
    }

    /// The tunnel's own encrypted UDP.
    pub fn tunnel(&self) -> u64 {
        self.packets("tunnel")
    }

    /// The counters as nft lists them, for a failure's message.
    pub fn log(&self) -> String {
        self.ns
            .exec("nft", &["list", "table", "inet", "vanetest"])
            .unwrap_or_default()
    }
}

/// The packets the named counter of `table inet TABLE` in `ns` has seen.
pub fn nft_counter(ns: &Netns, table: &str, name: &str) -> u64 {
    let out = ns
        .exec("nft", &["list", "counter", "inet", table, name])
        .unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "packets")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {out}"))
}

/// Beyond the gateway: on the server's loopback, reachable through the
/// tunnel or, without it, over the underlay.
pub const NET4: &str = "203.0.113.1";
pub const NET6: &str = "fd00:203::1";

pub fn lockdown_lab() -> Lab {
    let rules = "include_all_networks = true\nexclude_local_networks = false\nlockdown = true\n\n\
                 [on_demand]\nenabled = true\n\n[[on_demand.rule]]\naction = \"connect\"\n";
    let lab = Lab::new_with(rules, "0.0.0.0/0, ::/0", "").unwrap();
    internet_beyond(&lab);
    lab
}

/// The "internet" beyond the client's gateway, for a full tunnel's lab:
/// NET4 and NET6 on the server's loopback, reachable through the tunnel or,
/// without it, over the underlay (the server forwards), and an IPv6
/// default route on the client's underlay, as a dual-stack network gives:
/// without it an IPv6 packet outside the tunnel has no way out, and a
/// check that none leaked could not fail.
pub fn internet_beyond(lab: &Lab) {
    let (a, b) = (&lab.pair.a, &lab.pair.b);
    b.ip(&["addr", "add", &format!("{NET4}/32"), "dev", "lo"])
        .unwrap();
    b.ip(&["addr", "add", &format!("{NET6}/128"), "dev", "lo"])
        .unwrap();
    b.exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])
        .unwrap();
    a.ip(&["-6", "route", "add", "default", "via", "fd00:77::2"])
        .unwrap();
}

/// UDP every millisecond until `stop`: to NET4 and NET6 beyond the
/// gateway, to the local subnet, and from a socket bound to the uplink.
/// Counts the rounds of sends in `rounds` (EPERM from the kill switch is
/// expected and ignored).
pub fn senders(
    ns: &Netns,
    uplink: &str,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    let uplink = uplink.to_owned();
    ns.run_in(move || {
        let (v4, v6, bound) = leak_sockets(&uplink)?;
        while !stop.load(Ordering::Relaxed) {
            let _ = v4.send_to(b"beyond", (NET4, 9));
            let _ = v6.send_to(b"beyond6", (NET6, 9));
            let _ = v4.send_to(b"local", ("192.0.2.2", 9));
            let _ = bound.send_to(b"bound", (NET4, 9));
            rounds.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    })
}

/// The sockets a leak sender sends from (call it in the client's
/// namespace): IPv4, IPv6, and IPv4 bound to the uplink device (as `ping
/// -I eth0` does: routing rules cannot send that into the tunnel, only the
/// kill switch stops it).
pub fn leak_sockets(
    uplink: &str,
) -> anyhow::Result<(
    std::net::UdpSocket,
    std::net::UdpSocket,
    std::net::UdpSocket,
)> {
    let v4 = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let v6 = std::net::UdpSocket::bind("[::]:0")?;
    let bound = std::net::UdpSocket::bind("0.0.0.0:0")?;
    nix::sys::socket::setsockopt(
        &bound,
        nix::sys::socket::sockopt::BindToDevice,
        &std::ffi::OsString::from(uplink),
    )?;
    Ok((v4, v6, bound))
}
