//! The full tunnel (`include_all_networks = true`) end to end: policy
//! routing as wg-quick does it, for both families, the local networks in
//! or out, roaming between uplinks, and routing left exactly as it was
//! after `vanectl down`, after vaned stops and after a crash.
//!
//! "Leak" counters: the server's namespace counts, with nftables, every
//! packet arriving from the client over the underlay (any veth) that is
//! not the tunnel's encrypted UDP (and not neighbour discovery). Traffic
//! through the tunnel arrives on the server's WireGuard interface instead.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vane_e2e::leaks::Leaks;
use vane_e2e::vaned::{text, Lab};
use vane_e2e::{wait_until, Netns};

const UP: Duration = Duration::from_secs(20);
// NET4, NET6: an "internet" host behind the server, reachable through the
// tunnel or, without it, over the underlay.
use vane_e2e::leaks::{NET4, NET6};

/// The rule file after the lab's `[tunnel]` lines: two more `[tunnel]`
/// keys, then a rule that always connects.
fn rules(exclude_local: bool) -> String {
    format!(
        "include_all_networks = true\nexclude_local_networks = {exclude_local}\n\n\
         [on_demand]\nenabled = true\n\n[[on_demand.rule]]\naction = \"connect\"\n"
    )
}

/// An IPv6 default route on the client's underlay, as a dual-stack network
/// gives: without it an IPv6 packet outside the tunnel has no way out and a
/// check that none leaked could not fail.
fn ipv6_default_route(lab: &Lab) {
    lab.pair
        .a
        .ip(&["-6", "route", "add", "default", "via", "fd00:77::2"])
        .unwrap();
}

/// A lab whose tunnel carries everything, with the "internet" host on the
/// server's side (reachable over the underlay too).
fn lab(exclude_local: bool) -> Lab {
    let lab = Lab::new_with(&rules(exclude_local), "0.0.0.0/0, ::/0", "").unwrap();
    // The server routes the client's inner addresses back into its tunnel
    // (10.99.0.0/24 and fd99::/64 are on its interface already), and the
    // underlay way back for the client's underlay addresses is the veth.
    vane_e2e::leaks::internet_beyond(&lab);
    lab
}

/// What vane must leave as it found it: rules and routes of both families.
fn routing(ns: &Netns) -> String {
    [
        &["rule"][..],
        &["-6", "rule"],
        &["route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
    ]
    .iter()
    .map(|args| ns.ip(args).unwrap())
    .collect::<Vec<_>>()
    .join("\n")
}

#[test]
fn everything_goes_through_the_tunnel_and_routing_is_restored() {
    let lab = lab(true);
    let leaks = Leaks::install(&lab.pair.b, &lab.server_if, NET4, NET6);
    let a = &lab.pair.a;
    let before = routing(a);
    // Without vane, the "internet" is reached over the underlay.
    assert!(a.ping_ok(NET4));
    assert!(leaks.leaked() > 0, "the counters see plain traffic");

    let mut vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    let rules4 = a.ip(&["rule"]).unwrap();
    let rules6 = a.ip(&["-6", "rule"]).unwrap();
    for r in [&rules4, &rules6] {
        assert!(
            r.contains("not from all fwmark 0xca6c lookup 51820 proto 118"),
            "{r}"
        );
        assert!(
            r.contains("from all lookup main suppress_prefixlength 0 proto 118"),
            "{r}"
        );
    }
    let table = a.ip(&["route", "show", "table", "51820"]).unwrap();
    assert!(
        table.contains(&format!("default dev {}", lab.ifname)),
        "{table}"
    );
    let table6 = a.ip(&["-6", "route", "show", "table", "51820"]).unwrap();
    assert!(
        table6.contains(&format!("default dev {}", lab.ifname)),
        "{table6}"
    );

    // Both families reach the "internet" through the tunnel only.
    let leaked = leaks.leaked();
    a.ping_until(NET4, UP).unwrap();
    a.ping_until(NET6, UP).unwrap();
    assert!(a.ping_ok("10.99.0.2"), "the server's inner address");
    assert_eq!(
        leaks.leaked(),
        leaked,
        "plain packets reached the server over the underlay:\n{}",
        leaks.log()
    );
    assert!(leaks.tunnel() > 0);

    // The directly attached subnet bypasses the tunnel
    // (exclude_local_networks = true): the ping arrives on the veth.
    a.ping_until("192.0.2.2", UP).unwrap();
    assert!(
        leaks.leaked() > leaked,
        "the local subnet went through the tunnel"
    );

    // Roaming: the default route moves to a second uplink; the tunnel's
    // own packets follow it (they are marked and use the main table), and
    // the traffic keeps going through the tunnel.
    let second = lab.second_uplink().unwrap();
    lab.default_via("198.51.100.2", &second).unwrap();
    let leaked = leaks.leaked();
    let through = leaks.tunnel();
    a.ping_until(NET4, UP).unwrap();
    assert!(leaks.tunnel() > through);
    let s = vaned.status().unwrap();
    assert_eq!(s["network"]["interface"], second.as_str(), "{s:#}");
    assert_eq!(leaks.leaked(), leaked, "{}", leaks.log());
    // Put the route back for the comparison with the routing before.
    lab.default_via("192.0.2.2", &lab.pair.veth_a).unwrap();
    a.ip(&["link", "del", &second]).unwrap();
    // vaned has seen the move back (a manual down made before that would
    // end with the network change, as `until-network-change` says).
    wait_until(UP, "vaned to see the first uplink again", || {
        vaned.status().is_ok_and(|s| {
            s["network"]["interface"] == lab.pair.veth_a.as_str()
                && s["network"]["ipv4"]["addresses"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
        })
    })
    .unwrap();

    // Without `lockdown = true` there is no lockdown to release.
    let o = vaned.ctl(&["lockdown", "off"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("lockdown is not configured"));

    // Down: every rule and route of vane's is gone.
    let o = vaned.ctl(&["down"]);
    assert!(o.status.success(), "{}", text(&o));
    vaned.wait_state("down", UP).unwrap();
    assert_eq!(routing(a), before, "vaned log:\n{}", vaned.proc_.log());
    assert!(a.ping_ok(NET4), "plain traffic flows again");

    // Up again, then vaned stops: the same.
    let o = vaned.ctl(&["up"]);
    assert!(o.status.success(), "{}", text(&o));
    vaned.wait_state("up", UP).unwrap();
    a.ping_until(NET4, UP).unwrap();
    vaned.proc_.stop(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(routing(a), before);
}

#[test]
fn without_exclude_local_networks_the_local_subnet_goes_through_the_tunnel() {
    let lab = lab(false);
    let leaks = Leaks::install(&lab.pair.b, &lab.server_if, NET4, NET6);
    let a = &lab.pair.a;
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    let rules = a.ip(&["rule"]).unwrap();
    assert!(
        rules.contains("from all to 192.0.2.0/24 fwmark 0xca6c lookup main proto 118"),
        "{rules}"
    );
    assert!(
        rules.contains("from all to 192.0.2.0/24 lookup 51820 proto 118"),
        "{rules}"
    );
    a.ping_until(NET4, UP).unwrap();
    let leaked = leaks.leaked();
    // 192.0.2.2 is on the client's own subnet, and it is the server's
    // underlay address: the ping goes through the tunnel all the same.
    a.ping_until("192.0.2.2", UP).unwrap();
    assert_eq!(leaks.leaked(), leaked, "{}", leaks.log());
}

#[test]
fn after_a_crash_the_next_vaned_repairs_routing_firewall_and_dns_first() {
    let mut lab = Lab::new_with(
        &rules(true),
        "0.0.0.0/0, ::/0",
        &format!("DNS = {TUNNEL_DNS}, tunnel.example"),
    )
    .unwrap();
    ipv6_default_route(&lab);
    lab.use_netns_resolv_conf().unwrap();
    let a = &lab.pair.a;
    let before = routing(a);
    let before_nft = nft_ruleset(a);
    let original_resolv = std::fs::read(&lab.resolv_conf).unwrap();
    let mut vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    // vaned and the tunnel crash together; nothing cleans up after them
    // (the tunnel's userspace API socket stays, as on a real host).
    let tunnel = vaned.tunnel_pid().unwrap();
    vaned.proc_.owned.clear();
    vaned.proc_.stop(nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tunnel as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_until(UP, "the tunnel process gone", || {
        vane_e2e::process_gone(tunnel)
    })
    .unwrap();
    let left = a.ip(&["rule"]).unwrap();
    assert!(
        left.contains("proto 118"),
        "the crash left the rules: {left}"
    );
    assert!(nft_ruleset(a).contains("table inet vane"));
    let resolv = std::fs::read_to_string(&lab.resolv_conf).unwrap();
    assert!(resolv.contains(TUNNEL_DNS), "{resolv}");

    // The next vaned starts with nothing to bring up.
    lab.write_rules(
        &lab.rules_text()
            .replace("action = \"connect\"", "action = \"disconnect\""),
    )
    .unwrap();
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("down", UP).unwrap();
    let now = || {
        (
            routing(a),
            nft_ruleset(a),
            std::fs::read(&lab.resolv_conf).unwrap(),
        )
    };
    wait_until(UP, "routing, firewall and DNS as they were", || {
        now() == (before.clone(), before_nft.clone(), original_resolv.clone())
    })
    .unwrap_or_else(|e| {
        let (r, n, d) = now();
        panic!(
            "{e}\nbefore:\n{before}\n{before_nft}\nnow:\n{r}\n{n}\n{}\nvaned log:\n{}",
            String::from_utf8_lossy(&d),
            vaned.proc_.log()
        )
    });
}

#[test]
fn lockdown_blocks_while_the_user_is_disconnected_until_released() {
    let lab = Lab::new_with(
        &rules(true).replace(
            "exclude_local_networks = true\n",
            "exclude_local_networks = true\nlockdown = true\n",
        ),
        "0.0.0.0/0, ::/0",
        // With DNS servers of its own, the kill switch keeps DNS in the
        // tunnel, also from the local network's resolver.
        &format!("DNS = {TUNNEL_DNS}"),
    )
    .unwrap();
    ipv6_default_route(&lab);
    let b = &lab.pair.b;
    b.ip(&["addr", "add", &format!("{NET4}/32"), "dev", "lo"])
        .unwrap();
    b.ip(&["addr", "add", &format!("{NET6}/128"), "dev", "lo"])
        .unwrap();
    // The network's DNS server, on the local network (which this tunnel
    // excludes): the kill switch keeps DNS from it all the same.
    b.ip(&["addr", "add", "192.0.2.53/24", "dev", &lab.pair.veth_b])
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (local_dns, responder) = dns_responder(b, "192.0.2.53", true, stop.clone());
    let leaks = Leaks::install(b, &lab.server_if, NET4, NET6);
    let a = &lab.pair.a;
    let before_nft = nft_ruleset(a);
    let stop_traffic = Arc::new(AtomicBool::new(false));
    let generator = traffic(a, &lab.pair.veth_a, stop_traffic.clone());
    let mut vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    a.ping_until(NET4, UP).unwrap();
    let dns_baseline = local_dns.load(Ordering::Relaxed);
    let kill_switch =
        |v: &vane_e2e::vaned::Vaned| v.status().unwrap()["tunnel"]["kill_switch"].clone();

    // The user disconnects: in lockdown, nothing leaves unprotected, from
    // the moment of the `down` on (while up, this traffic arrives through
    // the tunnel and is not counted).
    let baseline = leaks.beyond();
    let o = vaned.ctl(&["down"]);
    assert!(o.status.success(), "{}", text(&o));
    vaned.wait_state("down", UP).unwrap();
    let k = kill_switch(&vaned);
    assert_eq!(k["active"], true, "{k}");
    assert_eq!(k["lockdown"], true, "{k}");
    assert_eq!(k["released"], false, "{k}");
    assert!(!a.ping_ok(NET4), "plain traffic left during lockdown");
    // Counted on the wire, both families, with the traffic running all
    // along: nothing for a host beyond the gateway left the uplink while
    // down in lockdown (the local network is excluded from the tunnel
    // here, so its traffic may pass).
    assert_eq!(
        leaks.beyond(),
        baseline,
        "leaked during lockdown:\n{}",
        leaks.log()
    );
    // Not one DNS query reached the local network's resolver since the
    // tunnel came up (the traffic sends it one every millisecond).
    assert_eq!(local_dns.load(Ordering::Relaxed), dns_baseline);

    // Released: traffic flows without the tunnel, and it is persisted.
    let o = vaned.ctl(&["lockdown", "off"]);
    assert!(o.status.success(), "{}", text(&o));
    wait_until(UP, "the kill switch off", || {
        kill_switch(&vaned)["active"] == false
    })
    .unwrap();
    a.ping_until(NET4, UP).unwrap();
    // The same counters see plain traffic once released.
    wait_until(UP, "plain traffic counted after the release", || {
        leaks.beyond() > baseline && local_dns.load(Ordering::Relaxed) > dns_baseline
    })
    .unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&vaned.state_file).unwrap()).unwrap();
    assert_eq!(state["intent"]["lockdown_released"], true, "{state:#}");
    assert_eq!(nft_ruleset(a), before_nft);

    // Engaged again: blocked again.
    let o = vaned.ctl(&["lockdown", "on"]);
    assert!(o.status.success(), "{}", text(&o));
    wait_until(UP, "the kill switch on", || {
        kill_switch(&vaned)["active"] == true
    })
    .unwrap();
    assert!(!a.ping_ok(NET4));

    // vaned stops in lockdown: the kill switch stays (lockdown holds while
    // vaned does not run), and the strict one is kept on disk for the
    // boot-time unit (vane-lockdown.service). Counted on the wire with the
    // traffic running: nothing leaves while no vaned runs.
    let lockdown_file = vaned.state_file.with_file_name("lockdown.json");
    wait_until(UP, "lockdown.json written", || lockdown_file.exists()).unwrap();
    let baseline = leaks.beyond();
    vaned.proc_.stop(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(
        nft_ruleset(a).contains("table inet vane"),
        "the kill switch went with vaned in lockdown:\n{}",
        vaned.proc_.log()
    );
    assert!(!a.ping_ok(NET4), "plain traffic left with vaned stopped");
    // The file nft loads at boot: a host rebooted now is as locked down.
    let kept = std::fs::read_to_string(&lockdown_file).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&kept).unwrap();
    assert!(doc["nftables"].is_array(), "{kept}");
    // Loaded over the table in place (the document replaces the table in
    // one transaction, as at boot where there is none): it blocks by
    // itself.
    a.exec("nft", &["-j", "-f", lockdown_file.to_str().unwrap()])
        .unwrap();
    assert!(
        !a.ping_ok(NET4),
        "the kept kill switch lets plain traffic out"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        leaks.beyond(),
        baseline,
        "leaked while vaned was stopped in lockdown:\n{}",
        leaks.log()
    );

    // The next vaned keeps it; released, it goes, with the file; stopped
    // then, vaned leaves the host as it found it.
    let mut vaned = lab.start_vaned(&[]).unwrap();
    wait_until(UP, "vaned answers", || vaned.status().is_ok()).unwrap();
    assert!(!a.ping_ok(NET4));
    let o = vaned.ctl(&["lockdown", "off"]);
    assert!(o.status.success(), "{}", text(&o));
    wait_until(UP, "the kill switch off", || {
        kill_switch(&vaned)["active"] == false
    })
    .unwrap();
    assert!(
        !lockdown_file.exists(),
        "lockdown.json outlived the release"
    );
    vaned.proc_.stop(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(nft_ruleset(a), before_nft);
    assert!(a.ping_ok(NET4));
    stop_traffic.store(true, Ordering::Relaxed);
    generator.join().unwrap().unwrap();
    stop.store(true, Ordering::Relaxed);
    responder.join().unwrap().unwrap();
}

/// The tunnel's DNS server, on the server's side of the tunnel.
const TUNNEL_DNS: &str = "10.99.0.53";

/// A DNS server that answers every query NXDOMAIN and counts them (only
/// those from outside the tunnel, from an underlay address, when
/// `plain_only`); runs in `ns` until `stop`.
fn dns_responder(
    ns: &Netns,
    addr: &str,
    plain_only: bool,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, std::thread::JoinHandle<anyhow::Result<()>>) {
    let count = Arc::new(AtomicU64::new(0));
    let (c, addr) = (count.clone(), format!("{addr}:53"));
    let handle = ns.run_in(move || {
        let sock = std::net::UdpSocket::bind(&addr)?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            if n < 12 {
                continue;
            }
            let inner =
                matches!(from.ip(), std::net::IpAddr::V4(v4) if v4.octets()[..2] == [10, 99]);
            if !(plain_only && inner) {
                c.fetch_add(1, Ordering::Relaxed);
            }
            // The query back as a response: QR set, RCODE 3 (NXDOMAIN).
            let mut reply = buf[..n].to_vec();
            reply[2] |= 0x80;
            reply[3] = (reply[3] & 0xf0) | 3;
            let _ = sock.send_to(&reply, from);
        }
        Ok(())
    });
    (count, handle)
}

/// Traffic of every kind from the client, until `stop` (UDP every
/// millisecond, so that a leak of a few milliseconds is caught): UDP to the
/// "internet" (both families), to the local subnet and to the network's
/// DNS server, TCP connection attempts, and UDP from a socket bound to the
/// uplink device (as `ping -I eth0` does: routing rules cannot send that
/// into the tunnel, only the kill switch stops it). Errors (EPERM from the
/// kill switch) are expected and ignored.
fn traffic(
    ns: &Netns,
    uplink: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    let uplink = uplink.to_owned();
    ns.run_in(move || {
        let (v4, v6, bound) = vane_e2e::leaks::leak_sockets(&uplink)?;
        let query = [
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 4, b'l', b'e', b'a', b'k', 7, b'e', b'x',
            b'a', b'm', b'p', b'l', b'e', 0, 0, 1, 0, 1,
        ];
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let _ = v4.send_to(b"udp", (NET4, 9));
            let _ = bound.send_to(b"bound", (NET4, 9));
            let _ = v6.send_to(b"udp", (NET6, 9));
            let _ = v4.send_to(b"local", ("192.0.2.2", 9));
            let _ = v4.send_to(&query, ("192.0.2.53", 53));
            // TCP connection attempts block up to their timeout: every
            // tenth round, so the UDP above goes out every millisecond.
            if round.is_multiple_of(10) {
                for dst in [format!("{NET4}:80"), "192.0.2.2:80".to_owned()] {
                    if let Ok(addr) = dst.parse() {
                        let _ =
                            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(5));
                    }
                }
            }
            round += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    })
}

fn nft_ruleset(ns: &Netns) -> String {
    ns.exec("nft", &["list", "ruleset"]).unwrap()
}

#[test]
fn nothing_leaks_through_connect_a_tunnel_kill_a_roam_and_disconnect() {
    let mut lab = Lab::new_with(
        &rules(false),
        "0.0.0.0/0, ::/0",
        &format!("DNS = {TUNNEL_DNS}, tunnel.example"),
    )
    .unwrap();
    ipv6_default_route(&lab);
    lab.use_netns_resolv_conf().unwrap();
    let original_resolv = std::fs::read(&lab.resolv_conf).unwrap();
    let b = &lab.pair.b;
    b.ip(&["addr", "add", &format!("{NET4}/32"), "dev", "lo"])
        .unwrap();
    b.ip(&["addr", "add", &format!("{NET6}/128"), "dev", "lo"])
        .unwrap();
    b.ip(&["addr", "add", &format!("{TUNNEL_DNS}/32"), "dev", "lo"])
        .unwrap();
    // The network's own DNS server (what resolv.conf names), on the
    // server's side of the underlay.
    b.ip(&["addr", "add", "192.0.2.53/24", "dev", &lab.pair.veth_b])
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tunnel_queries, responder) = dns_responder(b, TUNNEL_DNS, false, stop.clone());
    let (network_queries, network_responder) = dns_responder(b, "192.0.2.53", true, stop.clone());
    let leaks = Leaks::install(b, &lab.server_if, NET4, NET6);
    let a = &lab.pair.a;
    let second = lab.second_uplink().unwrap();
    let before_nft = nft_ruleset(a);
    let before_routing = routing(a);

    let stop_traffic = Arc::new(AtomicBool::new(false));
    let generator = traffic(a, &lab.pair.veth_a, stop_traffic.clone());
    let vaned = lab.start_vaned(&[]).unwrap();
    // From the moment the kill switch is on, the policy says up: count.
    let mut status = serde_json::Value::Null;
    wait_until(UP, "the kill switch", || {
        status = vaned.status().unwrap_or_default();
        status["tunnel"]["kill_switch"]["active"] == true
    })
    .unwrap_or_else(|e| panic!("{e}: {status:#}\n{}", vaned.proc_.log()));
    let baseline = leaks.leaked();
    let plain_queries = network_queries.load(Ordering::Relaxed);
    vaned.wait_state("up", UP).unwrap();

    // Connected: the resolver reads the tunnel's DNS, and its queries
    // reach the tunnel's DNS server through the tunnel.
    let resolv = std::fs::read_to_string(&lab.resolv_conf).unwrap();
    assert!(
        resolv.contains(&format!("nameserver {TUNNEL_DNS}")),
        "{resolv}"
    );
    assert!(!resolv.contains("192.0.2.53"), "{resolv}");
    let o = a
        .cmd("getent")
        .args(["hosts", "leak-check.example"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "NXDOMAIN from our responder: {}",
        text(&o)
    );
    assert!(tunnel_queries.load(Ordering::Relaxed) > 0);
    // The rules still see the network's DNS, not the tunnel's.
    let s = vaned.status().unwrap();
    assert_eq!(s["network"]["dns_servers"][0], "192.0.2.53", "{s:#}");
    a.ping_until(NET4, UP).unwrap();

    // The tunnel process is killed: the kill switch holds while it is
    // replaced, and traffic resumes through the new one.
    vaned.kill_tunnel_and_wait_for_the_next(UP).unwrap();
    a.ping_until(NET4, UP).unwrap();

    // The uplink changes under the tunnel.
    lab.default_via("198.51.100.2", &second).unwrap();
    wait_until(UP, "vaned on the second uplink", || {
        vaned
            .status()
            .is_ok_and(|s| s["network"]["interface"] == second.as_str())
    })
    .unwrap();
    let through = leaks.tunnel();
    a.ping_until(NET4, UP).unwrap_or_else(|e| {
        panic!(
            "{e}\nrules:\n{}\nroutes:\n{}\nnft:\n{}\nserver:\n{}\nvaned:\n{}",
            a.ip(&["rule"]).unwrap_or_default(),
            a.ip(&["route", "show", "table", "all"]).unwrap_or_default(),
            nft_ruleset(a),
            vane_e2e::wg_show(b, &lab.server_if, &[]).unwrap_or_default(),
            vaned.proc_.log()
        )
    });
    assert!(
        leaks.tunnel() > through,
        "the tunnel moved to the second uplink"
    );

    // Until the user disconnects, not one packet left by the uplinks
    // except the tunnel's own, and the network's DNS server heard nothing
    // over the underlay (what the traffic sends it explicitly arrives
    // through the tunnel).
    assert_eq!(
        leaks.leaked(),
        baseline,
        "packets leaked while the policy said up:\n{}\nvaned log:\n{}",
        leaks.log(),
        vaned.proc_.log()
    );
    assert_eq!(network_queries.load(Ordering::Relaxed), plain_queries);

    let o = vaned.ctl(&["down"]);
    assert!(o.status.success(), "{}", text(&o));
    vaned.wait_state("down", UP).unwrap();
    stop_traffic.store(true, Ordering::Relaxed);
    generator.join().unwrap().unwrap();
    // After disconnect: normal traffic flows again, the DNS is the
    // network's (byte for byte), and the firewall is as it was.
    a.ping_until("203.0.113.1", UP).unwrap();
    assert!(leaks.leaked() > baseline);
    assert_eq!(std::fs::read(&lab.resolv_conf).unwrap(), original_resolv);
    // ... and names go to the network's DNS server again (which shows the
    // silence above was not a deaf server).
    let o = a
        .cmd("getent")
        .args(["hosts", "after.example"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(network_queries.load(Ordering::Relaxed) > plain_queries);
    assert_eq!(nft_ruleset(a), before_nft);
    lab.default_via("192.0.2.2", &lab.pair.veth_a).unwrap();
    assert_eq!(routing(a), before_routing);
    stop.store(true, Ordering::Relaxed);
    responder.join().unwrap().unwrap();
    network_responder.join().unwrap().unwrap();
}

/// Replaces the lab's resolv.conf the way a DHCP client does (a new file
/// renamed over it).
fn rewrite_resolv_conf(lab: &Lab, text: &str) {
    let tmp = lab.resolv_conf.with_extension("dhclient-new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &lab.resolv_conf).unwrap();
}

#[test]
fn the_tunnels_dns_is_put_back_when_another_program_replaces_it() {
    let lab = Lab::new_with(
        &rules(true),
        "0.0.0.0/0, ::/0",
        &format!("DNS = {TUNNEL_DNS}, tunnel.example"),
    )
    .unwrap();
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    let ours = |lab: &Lab| {
        std::fs::read_to_string(&lab.resolv_conf)
            .unwrap_or_default()
            .contains(&format!("nameserver {TUNNEL_DNS}"))
    };
    assert!(ours(&lab));

    // A DHCP renewal replaces resolv.conf: put back, and the new file is
    // the network's now (the rules see its server).
    let t = std::time::Instant::now();
    rewrite_resolv_conf(&lab, "nameserver 192.0.2.99\n");
    wait_until(UP, "the tunnel's DNS put back", || ours(&lab)).unwrap();
    let put_back = t.elapsed();
    wait_until(UP, "the network's new DNS server in the status", || {
        vaned.status().is_ok_and(|s| {
            s["network"]["dns_servers"][0] == "192.0.2.99" && s["tunnel"]["dns_reasserted"] == 1
        })
    })
    .unwrap_or_else(|e| panic!("{e}: {:#}", vaned.status().unwrap_or_default()));
    // Written in place this time.
    std::fs::write(&lab.resolv_conf, "nameserver 192.0.2.98\n").unwrap();
    wait_until(UP, "the tunnel's DNS put back again", || ours(&lab)).unwrap();

    // Disconnected: the network's latest resolv.conf, byte for byte.
    let o = vaned.ctl(&["down"]);
    assert!(o.status.success(), "{}", text(&o));
    vaned.wait_state("down", UP).unwrap();
    assert_eq!(
        std::fs::read_to_string(&lab.resolv_conf).unwrap(),
        "nameserver 192.0.2.98\n"
    );

    // A program that keeps rewriting it is reported, not raced forever.
    let o = vaned.ctl(&["up"]);
    assert!(o.status.success(), "{}", text(&o));
    vaned.wait_state("up", UP).unwrap();
    wait_until(UP, "ours in place", || ours(&lab)).unwrap();
    let mut status = serde_json::Value::Null;
    for i in 0..200 {
        rewrite_resolv_conf(&lab, &format!("nameserver 192.0.2.{}\n", 100 + i % 50));
        std::thread::sleep(Duration::from_millis(20));
        status = vaned.status().unwrap_or_default();
        if !status["tunnel"]["dns_error"].is_null() {
            break;
        }
    }
    let error = status["tunnel"]["dns_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("vaned stopped putting the tunnel's DNS back"),
        "{status:#}"
    );
    assert_eq!(status["tunnel"]["dns_reasserted"], 3, "{status:#}");
    // Given up: the other program's file stays.
    rewrite_resolv_conf(&lab, "nameserver 192.0.2.97\n");
    let settled = std::time::Instant::now();
    wait_until(UP, "a moment for vaned to react", || {
        settled.elapsed() > Duration::from_millis(500)
    })
    .unwrap();
    assert!(!ours(&lab), "vaned kept fighting");
    let o = vaned.ctl(&["status"]);
    assert!(text(&o).contains("tunnel DNS not in force"), "{}", text(&o));
    eprintln!("the tunnel's DNS put back {put_back:?} after resolv.conf was replaced");
}

/// Waits until `ours` (the tunnel's DNS in force again) and the status
/// counts one re-assertion without an error; returns the time since `t`.
fn put_back_once(
    vaned: &vane_e2e::vaned::Vaned,
    t: std::time::Instant,
    ours: impl FnMut() -> bool,
) -> Duration {
    wait_until(UP, "the tunnel's DNS put back", ours)
        .unwrap_or_else(|e| panic!("{e}\n{}", vaned.proc_.log()));
    let put_back = t.elapsed();
    wait_until(UP, "the status counts it", || {
        vaned
            .status()
            .is_ok_and(|s| s["tunnel"]["dns_reasserted"] == 1 && s["tunnel"]["dns_error"].is_null())
    })
    .unwrap();
    put_back
}

/// A stand-in for resolvconf (openresolv's options): entries in
/// `DIR/interface/METRIC-EXCL-NAME` (stdin), and `DIR/resolv.conf`
/// generated from them after each change: the exclusive (`-x`) entries
/// alone when there are any, else all, ordered by metric and name.
fn fake_resolvconf(dir: &std::path::Path) -> std::path::PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        r#"#!/bin/sh
set -e
D='{d}'
mkdir -p "$D/interface"
case "$1" in
-a) name=$2; shift 2; m=100; x=0
    while [ $# -gt 0 ]; do
        case "$1" in -m) m=$2; shift;; -x) x=1;; esac
        shift
    done
    rm -f "$D"/interface/*-"$name"
    cat > "$D/interface/$m-$x-$name" ;;
-d) rm -f "$D"/interface/*-"$2" ;;
*) echo "resolvconf: unsupported: $*" >&2; exit 1 ;;
esac
if ls "$D"/interface/*-1-* >/dev/null 2>&1; then pick='*-1-*'; else pick='*'; fi
{{ echo '# generated by resolvconf'; for f in $(cd "$D/interface" && ls $pick 2>/dev/null | sort); do cat "$D/interface/$f"; done; }} > "$D/resolv.conf.new"
mv "$D/resolv.conf.new" "$D/resolv.conf"
"#,
        d = dir.display()
    );
    let prog = bin.join("resolvconf");
    std::fs::write(&prog, script).unwrap();
    std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    prog
}

fn resolvconf(prog: &std::path::Path, args: &[&str], stdin: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "resolvconf {args:?}");
}

#[test]
fn a_resolvconf_entry_deleted_or_outranked_by_another_program_is_put_back_or_reported() {
    let mut lab = Lab::new_with(
        &rules(true),
        "0.0.0.0/0, ::/0",
        &format!("DNS = {TUNNEL_DNS}"),
    )
    .unwrap();
    // /etc/resolv.conf as resolvconf makes it: a link to the file it
    // generates, with the network's entry (a DHCP client's).
    let run = lab.dir.path().join("run-resolvconf");
    let prog = fake_resolvconf(&run);
    resolvconf(&prog, &["-a", "eth0.dhclient"], "nameserver 192.0.2.53\n");
    let link = lab.dir.path().join("etc-resolv.conf");
    std::os::unix::fs::symlink(run.join("resolv.conf"), &link).unwrap();
    lab.resolv_conf = link;
    lab.dns_backend = "resolvconf";
    let path = format!(
        "{}:{}",
        prog.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    lab.vaned_env.push(("PATH".into(), path));
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    let first = |lab: &Lab| {
        let text = std::fs::read_to_string(&lab.resolv_conf).unwrap_or_default();
        text.lines().find(|l| l.starts_with("nameserver"))
            == Some(&format!("nameserver {TUNNEL_DNS}"))
    };
    wait_until(UP, "the tunnel's DNS first", || first(&lab)).unwrap();

    // Someone deletes our entry: put back.
    let record = format!("{}.vane", lab.ifname);
    let t = std::time::Instant::now();
    resolvconf(&prog, &["-d", &record, "-f"], "");
    assert!(!first(&lab));
    let put_back = put_back_once(&vaned, t, || first(&lab));

    // Another program's exclusive entry outranks ours: putting ours back
    // does not help, and that is reported at once, not fought.
    resolvconf(
        &prog,
        &["-a", "aaa.othervpn", "-m", "0", "-x"],
        "nameserver 192.0.2.77\n",
    );
    let mut status = serde_json::Value::Null;
    wait_until(UP, "the report", || {
        status = vaned.status().unwrap_or_default();
        !status["tunnel"]["dns_error"].is_null()
    })
    .unwrap_or_else(|e| panic!("{e}: {status:#}\n{}", vaned.proc_.log()));
    let error = status["tunnel"]["dns_error"].as_str().unwrap_or_default();
    assert!(error.contains("takes precedence"), "{status:#}");
    assert!(!first(&lab));
    let o = vaned.ctl(&["status"]);
    assert!(text(&o).contains("tunnel DNS not in force"), "{}", text(&o));

    // Down: our entry goes, the others stay.
    let o = vaned.ctl(&["down"]);
    assert!(o.status.success(), "{}", text(&o));
    vaned.wait_state("down", UP).unwrap();
    let entries: Vec<String> = std::fs::read_dir(run.join("interface"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!entries.iter().any(|e| e.ends_with(&record)), "{entries:?}");
    assert_eq!(entries.len(), 2, "{entries:?}");
    eprintln!("the tunnel's resolvconf entry put back {put_back:?} after it was deleted");
}

#[test]
fn a_resolved_link_setting_another_program_changed_is_put_back() {
    let mut lab = Lab::new_with(
        &rules(true),
        "0.0.0.0/0, ::/0",
        &format!("DNS = {TUNNEL_DNS}, tunnel.example"),
    )
    .unwrap();
    let resolved = vane_e2e::resolved::FakeResolved::start(lab.dir.path()).unwrap();
    lab.system_bus = Some(resolved.address.clone());
    lab.dns_backend = "resolved";
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    let out = lab
        .pair
        .a
        .ip(&["-o", "link", "show", "dev", &lab.ifname])
        .unwrap();
    let ifindex: i32 = out.split(':').next().unwrap().trim().parse().unwrap();
    let ours =
        || resolved.link(ifindex).servers() == [TUNNEL_DNS.parse::<std::net::IpAddr>().unwrap()];
    wait_until(UP, "the tunnel's DNS on its link", ours).unwrap();
    let link = resolved.link(ifindex);
    assert!(link.default_route, "{link:?}");
    assert!(link.domains.contains(&(".".to_owned(), true)), "{link:?}");

    // `resolvectl dns IF 192.0.2.99` by someone else: noticed (vaned
    // polls the link every second) and put back.
    let t = std::time::Instant::now();
    resolved
        .set_link_dns_as_another_program(ifindex, &["192.0.2.99".parse().unwrap()])
        .unwrap();
    assert!(!ours());
    let put_back = put_back_once(&vaned, t, ours);

    // Down: the link's settings reverted.
    let o = vaned.ctl(&["down"]);
    assert!(o.status.success(), "{}", text(&o));
    vaned.wait_state("down", UP).unwrap();
    assert_eq!(resolved.link(ifindex), vane_e2e::resolved::Link::default());
    eprintln!("the tunnel's resolved link settings put back {put_back:?} after another program changed them");
}
