//! End-to-end: the observer inside a network namespace of its own, real
//! kernel changes, asserted events. Run as root.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{percentile, replace_file, Netns, Running};
use vane_observer::{DnsSource, Exclusions, InterfaceType, ObserverConfig, Ssid};

const T: Duration = Duration::from_secs(5);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Two veth uplinks: up1 (198.18.1.2/24) and up2 (198.18.2.2/24, Wi-Fi by
/// override, SSID from the file).
fn two_uplinks() -> Netns {
    let ns = Netns::new();
    ns.veth("up1", "up1p");
    ns.veth("up2", "up2p");
    ns.ips("addr add 198.18.1.2/24 dev up1");
    ns.ips("addr add 198.18.2.2/24 dev up2");
    ns
}

fn config(dir: &std::path::Path) -> ObserverConfig {
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 198.18.1.1\nsearch lan.example\n").unwrap();
    ObserverConfig {
        interface_overrides: vec![
            ("up1".into(), InterfaceType::Ethernet),
            ("up2".into(), InterfaceType::Wifi),
            ("vane*".into(), InterfaceType::Other),
        ],
        ssid_file: Some(dir.join("ssid")),
        resolv_conf: Some(resolv),
        // Whatever the host runs, these tests read the file they write.
        dns_source: DnsSource::ResolvConf,
        nl80211: true,
        ..ObserverConfig::default()
    }
}

#[test]
fn default_route_moves_links_flap_addresses_change() {
    let ns = two_uplinks();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ssid"), "up2 caf\\xe9\n").unwrap();
    ns.ips("route add default via 198.18.1.1 dev up1 metric 100");
    let mut obs = Running::start(&ns, config(dir.path()));

    // The initial dump.
    let s = &obs.initial;
    assert!(s.available);
    let u = s.ipv4.as_ref().unwrap();
    assert_eq!(
        (u.interface.as_str(), u.kind),
        ("up1", InterfaceType::Ethernet)
    );
    assert_eq!(u.gateway, Some(ip("198.18.1.1")));
    assert_eq!(u.metric, 100);
    assert_eq!(u.ssid, None);
    assert!(u.addresses.iter().any(|a| a.address == ip("198.18.1.2")));
    assert_eq!(s.dns.servers, vec![ip("198.18.1.1")]);
    assert_eq!(s.dns.search_domains, vec!["lan.example"]);
    assert_eq!(s.ipv6, None);

    // A second default with a worse metric changes nothing.
    ns.ips("route add default via 198.18.2.1 dev up2 metric 200");
    obs.expect_quiet(Duration::from_millis(300));

    // Move the default route to up2 (Wi-Fi, with its SSID).
    ns.ips("route replace default via 198.18.2.1 dev up2 metric 50");
    let c = obs.wait_for("up2 primary", T, |s| {
        s.primary().is_some_and(|u| u.interface == "up2")
    });
    let u = c.new.ipv4.as_ref().unwrap();
    assert_eq!(u.kind, InterfaceType::Wifi);
    assert_eq!(u.ssid, Some(Ssid(b"caf\xe9".to_vec())));
    assert_eq!(u.metric, 50);
    assert!(c.diff.network_changed);
    assert!(c.diff.touches("ipv4.interface"));
    assert_eq!(c.old.ipv4.as_ref().unwrap().interface, "up1");

    // Link down: its routes go (IPv4 flushes them silently) and up1's
    // metric-100 route takes over.
    ns.ips("link set up2 down");
    obs.wait_for("up1 back after up2 down", T, |s| {
        s.primary().is_some_and(|u| u.interface == "up1")
    });
    // Up again: its routes do not come back by themselves.
    ns.ips("link set up2 up");
    obs.expect_quiet(Duration::from_millis(300));

    // Carrier loss on up1 (its peer goes down): no usable uplink.
    ns.ips("link set up1p down");
    obs.wait_for("offline on carrier loss", T, |s| !s.available);
    ns.ips("link set up1p up");
    obs.wait_for("online on carrier", T, |s| {
        s.available && s.primary().is_some_and(|u| u.interface == "up1")
    });

    // Addresses come and go.
    ns.ips("addr add 198.18.1.3/24 dev up1");
    let c = obs.wait_for("second address", T, |s| {
        s.ipv4
            .as_ref()
            .is_some_and(|u| u.addresses.iter().any(|a| a.address == ip("198.18.1.3")))
    });
    assert!(!c.diff.network_changed, "a new address is the same network");
    ns.ips("addr del 198.18.1.3/24 dev up1");
    obs.wait_for("second address gone", T, |s| {
        s.ipv4
            .as_ref()
            .is_some_and(|u| !u.addresses.iter().any(|a| a.address == ip("198.18.1.3")))
    });
    // Removing the only address flushes the default route through it
    // without an RTM_DELROUTE: the observer re-dumps and goes offline.
    ns.ips("addr del 198.18.1.2/24 dev up1");
    obs.wait_for("offline after address removal", T, |s| !s.available);
}

#[test]
fn ssid_file_edits() {
    let ns = two_uplinks();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ssid");
    ns.ips("route add default via 198.18.2.1 dev up2");
    let mut obs = Running::start(&ns, config(dir.path()));
    let u = obs.initial.ipv4.clone().unwrap();
    assert_eq!(
        (u.interface.as_str(), u.ssid),
        ("up2", None),
        "no file: no SSID"
    );

    replace_file(&file, b"# hook\nup2 HomeNet\n");
    let c = obs.wait_for("SSID HomeNet", T, |s| {
        s.ipv4.as_ref().and_then(|u| u.ssid.clone()) == Some(Ssid(b"HomeNet".to_vec()))
    });
    assert!(c.diff.touches("ipv4.ssid"));
    assert!(c.diff.network_changed);

    // A bad file is refused with file:line, and the SSID stays.
    replace_file(&file, b"up2 Office\nup1\n");
    let e = obs.wait_ssid_error(T, |e| e.is_some()).unwrap_or_default();
    assert!(e.contains("ssid:2:"), "{e}");
    obs.expect_quiet(Duration::from_millis(300));

    // Written in place (not renamed), with a non-UTF-8 SSID.
    std::fs::write(&file, b"up2 Caf\\xe9\n").unwrap();
    obs.wait_for("SSID Caf\\xe9", T, |s| {
        s.ipv4.as_ref().and_then(|u| u.ssid.clone()) == Some(Ssid(b"Caf\xe9".to_vec()))
    });
    obs.wait_ssid_error(T, |e| e.is_none());

    // Removed: disassociated.
    std::fs::remove_file(&file).unwrap();
    obs.wait_for("no SSID", T, |s| {
        s.ipv4.as_ref().is_some_and(|u| u.ssid.is_none())
    });

    // resolv.conf edits.
    replace_file(
        &dir.path().join("resolv.conf"),
        b"nameserver 198.18.2.1\nsearch corp.example.com\n",
    );
    let c = obs.wait_for("new DNS", T, |s| s.dns.servers == vec![ip("198.18.2.1")]);
    assert_eq!(c.new.dns.search_domains, vec!["corp.example.com"]);
    assert!(c.diff.network_changed);
}

#[test]
fn own_tunnel_is_not_the_network_and_ipv6_only_works() {
    let ns = two_uplinks();
    let dir = tempfile::tempdir().unwrap();
    // vane's tunnel, carrying a better default route than the uplink.
    ns.ips("tuntap add mode tun vane0");
    ns.ips("link set vane0 up");
    ns.ips("addr add 10.64.0.2/32 dev vane0");
    ns.ips("route add default via 198.18.1.1 dev up1 metric 100");
    ns.ips("route add default dev vane0 metric 1");
    // A TUN without a reader has no carrier; vane's persistent device is
    // the same. The main table's best default still names it.
    let mut cfg = config(dir.path());
    cfg.exclusions = Exclusions {
        ifnames: ["vane0".to_owned()].into(),
        table: Some(51820),
        ..Exclusions::default()
    };
    // wg-quick style: the tunnel's default in its own table.
    ns.ips("route add default dev vane0 table 51820");
    let mut obs = Running::start(&ns, cfg);
    assert_eq!(obs.initial.ipv4.as_ref().unwrap().interface, "up1");

    // The uplink goes; every default route now points into the tunnel:
    // that is offline, never "online through vane0".
    ns.ips("route del default via 198.18.1.1 dev up1 metric 100");
    let c = obs.wait_for("offline", T, |s| !s.available);
    assert_eq!(c.new.ipv4, None);

    // IPv6 only.
    ns.ips("addr add 2001:db8:1::2/64 dev up1 nodad");
    ns.ips("-6 route add default via 2001:db8:1::1 dev up1 metric 1024");
    let c = obs.wait_for("IPv6 uplink", T, |s| s.available);
    assert_eq!(c.new.ipv4, None);
    let u = c.new.ipv6.as_ref().unwrap();
    assert_eq!(u.interface, "up1");
    assert_eq!(u.gateway, Some(ip("2001:db8:1::1")));
    assert_eq!(u.metric, 1024);
    assert_eq!(c.new.primary().unwrap().interface, "up1");
    ns.ips("-6 route del default via 2001:db8:1::1 dev up1 metric 1024");
    obs.wait_for("IPv6 gone", T, |s| !s.available);
}

#[test]
fn flapping_is_coalesced() {
    let ns = two_uplinks();
    let dir = tempfile::tempdir().unwrap();
    ns.ips("route add default via 198.18.1.1 dev up1 metric 100");
    ns.ips("route add default via 198.18.2.1 dev up2 metric 200");
    let mut cfg = config(dir.path());
    cfg.coalesce_window = Duration::from_millis(250);
    let mut obs = Running::start(&ns, cfg);
    // Ten carrier flaps of up1 in quick succession, ending up.
    let start = Instant::now();
    for _ in 0..10 {
        ns.ips("link set up1p down");
        ns.ips("link set up1p up");
    }
    let flaps = start.elapsed();
    // Drain until quiet; all emissions are bounded by the window count.
    let mut n = 0;
    while obs.changes.recv_timeout(Duration::from_millis(600)).is_ok() {
        n += 1;
        assert!(n < 100, "endless changes");
    }
    let max = 2 + (flaps.as_millis() / 250) as usize * 2;
    assert!(n <= max, "{n} changes for 20 flaps in {flaps:?}");
    // And it ends where the kernel ends.
    ns.ips("link set up1 down");
    obs.wait_for("up2 after up1 down", T, |s| {
        s.primary().is_some_and(|u| u.interface == "up2")
    });
}

/// Latency from just before `ip route replace` to the emitted event, over
/// 30 leading-edge changes.
#[test]
fn latency_of_the_leading_edge() {
    let ns = two_uplinks();
    let dir = tempfile::tempdir().unwrap();
    ns.ips("route add default via 198.18.1.1 dev up1 metric 100");
    let mut cfg = config(dir.path());
    cfg.coalesce_window = Duration::from_millis(30);
    let mut obs = Running::start(&ns, cfg);
    let mut lat = Vec::new();
    for i in 0..30 {
        let (dev, gw) = if i % 2 == 0 {
            ("up2", "198.18.2.1")
        } else {
            ("up1", "198.18.1.1")
        };
        // Let the previous window close so this is a leading edge.
        std::thread::sleep(Duration::from_millis(40));
        let t0 = Instant::now();
        ns.ips(&format!(
            "route replace default via {gw} dev {dev} metric 100"
        ));
        obs.wait_for(dev, T, |s| s.primary().is_some_and(|u| u.interface == dev));
        lat.push(t0.elapsed());
    }
    lat.sort();
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    println!(
        "leading-edge latency over {} changes: p50 {p50:?}, p99 {p99:?}",
        lat.len()
    );
    assert!(p50 < Duration::from_millis(50), "p50 {p50:?}");
}

/// A burst of events overruns a small event socket; the observer re-dumps
/// and ends exactly where the kernel is.
#[test]
fn overrun_triggers_a_full_redump() {
    let ns = two_uplinks();
    let dir = tempfile::tempdir().unwrap();
    ns.ips("route add default via 198.18.1.1 dev up1 metric 100");
    let mut cfg = config(dir.path());
    cfg.event_rcvbuf = 4096;
    let mut obs = Running::start(&ns, cfg);
    let batch = dir.path().join("batch");
    let mut text = String::new();
    for i in 0..400 {
        text.push_str(&format!(
            "addr add 198.19.{}.{}/32 dev up1\n",
            i / 200,
            1 + i % 200
        ));
    }
    text.push_str("route replace default via 198.18.2.1 dev up2 metric 100\n");
    std::fs::write(&batch, text).unwrap();
    // The observer is stalled while the burst happens, so the 4 KiB
    // buffer overflows.
    obs.stall(Duration::from_millis(500));
    ns.ips(&format!("-batch {}", batch.display()));
    let c = obs.wait_for("up2 after the burst", T, |s| {
        s.primary().is_some_and(|u| u.interface == "up2")
    });
    assert_eq!(c.new.ipv4.as_ref().unwrap().gateway, Some(ip("198.18.2.1")));
    let deadline = Instant::now() + T;
    while obs.overruns.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "400 events into a 4 KiB socket buffer did not overrun"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The address count survived the overrun too: move back to up1 and
    // look at its addresses.
    ns.ips("route replace default via 198.18.1.1 dev up1 metric 100");
    let c = obs.wait_for("up1 again", T, |s| {
        s.primary().is_some_and(|u| u.interface == "up1")
    });
    let n = c.new.ipv4.as_ref().unwrap().addresses.len();
    assert!(n >= 401, "{n} addresses");
}
