//! The full tunnel (`include_all_networks = true`) end to end: policy
//! routing as wg-quick does it, for both families, the local networks in
//! or out, roaming between uplinks, and routing left exactly as it was
//! after `vanectl down`, after vaned stops and after a crash.
//!
//! "Leak" counters: the server's namespace counts, with nftables, every
//! packet arriving from the client over the underlay (any veth) that is
//! not the tunnel's encrypted UDP (and not neighbour discovery). Traffic
//! through the tunnel arrives on the server's WireGuard interface instead.

use std::time::Duration;

use vane_e2e::vaned::{text, Lab};
use vane_e2e::{wait_until, Netns};

const UP: Duration = Duration::from_secs(20);
/// An "internet" host behind the server, reachable through the tunnel or,
/// without it, over the underlay.
const NET4: &str = "203.0.113.1";
const NET6: &str = "fd00:203::1";

/// The rule file after the lab's `[tunnel]` lines: two more `[tunnel]`
/// keys, then a rule that always connects.
fn rules(exclude_local: bool) -> String {
    format!(
        "include_all_networks = true\nexclude_local_networks = {exclude_local}\n\n\
         [on_demand]\nenabled = true\n\n[[on_demand.rule]]\naction = \"connect\"\n"
    )
}

/// A lab whose tunnel carries everything, with the "internet" host on the
/// server's side (reachable over the underlay too).
fn lab(exclude_local: bool) -> Lab {
    let lab = Lab::new_with(&rules(exclude_local), "0.0.0.0/0, ::/0", "").unwrap();
    let b = &lab.pair.b;
    b.ip(&["addr", "add", &format!("{NET4}/32"), "dev", "lo"])
        .unwrap();
    b.ip(&["addr", "add", &format!("{NET6}/128"), "dev", "lo"])
        .unwrap();
    // The server routes the client's inner addresses back into its tunnel
    // (10.99.0.0/24 and fd99::/64 are on its interface already), and the
    // underlay way back for the client's underlay addresses is the veth.
    b.exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])
        .unwrap();
    lab
}

/// nftables counters in the server's namespace (see the module comment).
struct Leaks<'a> {
    ns: &'a Netns,
}

impl<'a> Leaks<'a> {
    fn install(ns: &'a Netns, server_if: &str) -> Leaks<'a> {
        let script = format!(
            "table inet vanetest {{\n\
             counter tunnel {{}}\n\
             counter leak {{}}\n\
             chain pre {{\n\
             type filter hook prerouting priority -300; policy accept;\n\
             iifname {{ \"lo\", \"{server_if}\" }} return\n\
             udp dport 51820 counter name \"tunnel\" return\n\
             icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report }} return\n\
             counter name \"leak\"\n\
             }}\n\
             }}\n"
        );
        let dir = vane_e2e::TempDir::new().unwrap();
        let path = dir.write("leak.nft", &script).unwrap();
        ns.exec("nft", &["-f", &path.display().to_string()])
            .unwrap();
        Leaks { ns }
    }

    fn packets(&self, name: &str) -> u64 {
        let out = self
            .ns
            .exec("nft", &["list", "counter", "inet", "vanetest", name])
            .unwrap();
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "packets")
            .and_then(|w| w[1].parse().ok())
            .unwrap_or_else(|| panic!("no packet count in {out}"))
    }

    fn leaked(&self) -> u64 {
        self.packets("leak")
    }

    fn tunnel(&self) -> u64 {
        self.packets("tunnel")
    }

    fn log(&self) -> String {
        self.ns
            .exec("nft", &["list", "table", "inet", "vanetest"])
            .unwrap_or_default()
    }
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
    let leaks = Leaks::install(&lab.pair.b, &lab.server_if);
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
    let leaks = Leaks::install(&lab.pair.b, &lab.server_if);
    let a = &lab.pair.a;
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    let rules = a.ip(&["rule"]).unwrap();
    assert!(
        rules.contains("not from all to 192.0.2.0/24 fwmark 0xca6c lookup 51820 proto 118"),
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
fn after_a_crash_the_next_vaned_repairs_routing_first() {
    let lab = lab(true);
    let a = &lab.pair.a;
    let before = routing(a);
    let mut vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    vaned.proc_.stop(nix::sys::signal::Signal::SIGKILL).unwrap();
    let left = a.ip(&["rule"]).unwrap();
    assert!(
        left.contains("proto 118"),
        "the crash left the rules: {left}"
    );

    // The next vaned starts with on-demand off and nothing to bring up.
    lab.write_rules(
        &lab.rules_text()
            .replace("action = \"connect\"", "action = \"disconnect\""),
    )
    .unwrap();
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("down", UP).unwrap();
    wait_until(UP, "the routing as it was", || routing(a) == before).unwrap_or_else(|e| {
        panic!(
            "{e}\nbefore:\n{before}\nnow:\n{}\nvaned log:\n{}",
            routing(a),
            vaned.proc_.log()
        )
    });
}
