//! The kill switch's ruleset as data: [`ruleset`] builds the nft JSON
//! document (libnftables-json) for a [`Spec`]; nothing here touches the
//! system (the shell, [`super`], loads it).
//!
//! What the table does (see [`ruleset`]):
//! - output: accepts loopback, everything out of the tunnel device, packets
//!   carrying the tunnel socket's fwmark (its encrypted UDP), DHCPv4 and
//!   DHCPv6 client requests, ICMPv6 router/neighbour discovery and MLD (the
//!   solicited-node multicast groups NDP relies on are joined with MLD
//!   reports, which snooping switches need to see), and destinations in the
//!   allowed networks, except DNS (UDP and TCP 53 and 853) when the tunnel
//!   has DNS servers of its own ([`Spec::block_dns`]); it drops everything
//!   else. An output drop makes the
//!   sender's `send` fail with EPERM, so applications learn at once instead
//!   of timing out.
//! - forward: drops forwarded packets leaving by any interface other than
//!   the tunnel unless their destination is in the allowed networks (DNS
//!   likewise not, with `block_dns`).
//!   Consequence for containers and VMs on this host (docker, podman,
//!   libvirt bridges routed or NATed by the host): while the kill switch is
//!   on, their traffic reaches only the allowed networks directly; anything
//!   else is dropped, including traffic the host would route into the
//!   tunnel unless the tunnel's peer accepts their (unmasqueraded) source
//!   addresses. Traffic between a container and the host itself is input
//!   and output, not forward; host → container goes out by the bridge and
//!   is allowed only when the bridge's subnet is in the allowed networks.
//!
//! Incoming connections on the uplink are not filtered, but their replies
//! are outgoing and therefore dropped unless the peer is in the allowed
//! networks (e.g. SSH from outside the local networks stops working while
//! the kill switch is on). There is deliberately no `ct state established`
//! exception: it would let connections opened before the switch went on
//! keep leaking.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{json, Value};

/// What the kill switch lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The tunnel device: traffic out of it is allowed (by name, so the
    /// rule holds while the device is absent or being recreated).
    pub tunnel_if: String,
    /// The tunnel UDP socket's SO_MARK (nonzero): marked packets are
    /// allowed.
    pub fwmark: u32,
    /// Destinations allowed outside the tunnel (local subnets and
    /// link-local when `exclude_local_networks`); may be empty.
    pub allow_nets: Vec<IpNet>,
    /// No DNS to the allowed destinations either: the tunnel has DNS
    /// servers of its own, so a query to a resolver on the local network
    /// is a name told outside the tunnel. (Without them the network's
    /// resolver is the only one, and blocking it would leave no DNS.)
    pub block_dns: bool,
    /// A captive portal exemption (`vanectl portal`), while open.
    pub portal: Option<PortalExemption>,
}

/// What a captive portal exemption lets out besides: DNS (UDP and TCP 53)
/// to the network's servers, TCP 80 and 443 to the portal's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalExemption {
    pub dns_servers: Vec<IpAddr>,
    pub portal_addresses: Vec<IpAddr>,
    /// The TCP ports let through to them (80, 443, the portal's own).
    pub portal_ports: Vec<u16>,
}
/// A [`Spec`] the kill switch cannot be built from.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("kill switch: tunnel interface name {0:?} is not a valid interface name (1 to 15 characters out of A-Z a-z 0-9 - _ .)")]
    BadInterface(String),
    #[error("kill switch: the tunnel's fwmark must not be 0 (unmarked packets are exactly what the kill switch drops)")]
    ZeroMark,
}

/// Checks an interface name the way the kernel and our config do, and so
/// that it cannot carry nft syntax (no quotes, spaces, `*` wildcards,
/// backslashes).
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn check(spec: &Spec) -> Result<(), SpecError> {
    if !valid_ifname(&spec.tunnel_if) {
        return Err(SpecError::BadInterface(spec.tunnel_if.clone()));
    }
    if spec.fwmark == 0 {
        return Err(SpecError::ZeroMark);
    }
    Ok(())
}

/// The allowed networks split by family, host bits cleared, overlaps and
/// neighbours merged (nft refuses overlapping intervals in a set).
fn split_nets(nets: &[IpNet]) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for n in nets {
        match n.trunc() {
            IpNet::V4(n) => v4.push(n),
            IpNet::V6(n) => v6.push(n),
        }
    }
    (Ipv4Net::aggregate(&v4), Ipv6Net::aggregate(&v6))
}

const FAMILY: &str = "inet";
const TABLE: &str = "vane";
/// On every rule that drops, so `nft list ruleset` says whose it is.
pub const DROP_COMMENT: &str = "vane kill switch: outside the tunnel (managed by vaned)";
/// On the rules that drop DNS outside the tunnel.
pub const DNS_COMMENT: &str = "vane kill switch: DNS outside the tunnel (managed by vaned)";

fn prefix_elems<N: std::fmt::Display>(nets: &[N]) -> Vec<Value> {
    nets.iter()
        .filter_map(|n| {
            let text = n.to_string();
            let (addr, len) = text.split_once('/')?;
            Some(json!({"prefix": {"addr": addr, "len": len.parse::<u8>().ok()?}}))
        })
        .collect()
}

fn set_obj(name: &str, ty: &str, elems: Vec<Value>) -> Value {
    let mut set = json!({
        "family": FAMILY, "table": TABLE, "name": name,
        "type": ty, "flags": ["interval"],
    });
    if !elems.is_empty() {
        set["elem"] = Value::Array(elems);
    }
    json!({"add": {"set": set}})
}

fn chain_obj(name: &str, hook: &str) -> Value {
    json!({"add": {"chain": {
        "family": FAMILY, "table": TABLE, "name": name,
        "type": "filter", "hook": hook, "prio": 0, "policy": "accept",
    }}})
}

fn rule_obj(chain: &str, expr: Vec<Value>, comment: Option<&str>) -> Value {
    let mut rule = json!({"family": FAMILY, "table": TABLE, "chain": chain, "expr": expr});
    if let Some(c) = comment {
        rule["comment"] = json!(c);
    }
    json!({"add": {"rule": rule}})
}

fn eq(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn accept() -> Value {
    json!({"accept": null})
}

/// `add table` then `delete table`: one transaction that removes the table
/// whether or not it exists (adding an existing table is a no-op).
fn remove_commands() -> Vec<Value> {
    let table = json!({"family": FAMILY, "name": TABLE});
    vec![
        json!({"add": {"table": table.clone()}}),
        json!({"delete": {"table": table}}),
    ]
}

/// The nft JSON document (libnftables-json, for `nft -j -f -`) that
/// creates or atomically replaces `table inet vane`: the old table is
/// removed and the new one built in the same transaction, which nft
/// commits at once or not at all.
///
/// JSON rather than the nft script language: every value is a JSON
/// string or number, so no interface name or address can be read as nft
/// syntax, whatever it holds (the name is still checked, for a clear
/// error).
pub fn ruleset(spec: &Spec) -> Result<Value, SpecError> {
    check(spec)?;
    let (v4, v6) = split_nets(&spec.allow_nets);
    let ifname = spec.tunnel_if.as_str();
    let mark = spec.fwmark;

    let mut cmds = remove_commands();
    cmds.push(json!({"add": {"table": {"family": FAMILY, "name": TABLE}}}));
    cmds.push(set_obj("allow4", "ipv4_addr", prefix_elems(&v4)));
    cmds.push(set_obj("allow6", "ipv6_addr", prefix_elems(&v6)));
    cmds.push(chain_obj("output", "output"));
    cmds.push(chain_obj("forward", "forward"));
    let allowed = |chain: &str| {
        let mut rules = Vec::new();
        if spec.block_dns {
            // DNS leaves by the tunnel (or loopback, to a local stub) only:
            // not to a resolver on an allowed local network either, where
            // a DHCP client's resolv.conf would send every name.
            rules.push(rule_obj(
                chain,
                vec![
                    eq(payload("udp", "dport"), json!({"set": [53, 853]})),
                    json!({"counter": {"packets": 0, "bytes": 0}}),
                    json!({"drop": null}),
                ],
                Some(DNS_COMMENT),
            ));
            rules.push(rule_obj(
                chain,
                vec![
                    eq(payload("tcp", "dport"), json!({"set": [53, 853]})),
                    json!({"counter": {"packets": 0, "bytes": 0}}),
                    json!({"drop": null}),
                ],
                Some(DNS_COMMENT),
            ));
        }
        rules.extend([
            rule_obj(
                chain,
                vec![eq(payload("ip", "daddr"), json!("@allow4")), accept()],
                None,
            ),
            rule_obj(
                chain,
                vec![eq(payload("ip6", "daddr"), json!("@allow6")), accept()],
                None,
            ),
            rule_obj(
                chain,
                vec![
                    json!({"counter": {"packets": 0, "bytes": 0}}),
                    json!({"drop": null}),
                ],
                Some(DROP_COMMENT),
            ),
        ]);
        rules
    };
    let output = "output";
    cmds.push(rule_obj(
        output,
        vec![eq(meta("oif"), json!("lo")), accept()],
        None,
    ));
    cmds.push(rule_obj(
        output,
        vec![eq(meta("oifname"), json!(ifname)), accept()],
        None,
    ));
    cmds.push(rule_obj(
        output,
        vec![eq(meta("mark"), json!(mark)), accept()],
        None,
    ));
    cmds.push(rule_obj(
        output,
        vec![
            eq(payload("udp", "sport"), json!(68)),
            eq(payload("udp", "dport"), json!(67)),
            accept(),
        ],
        Some("DHCPv4"),
    ));
    cmds.push(rule_obj(
        output,
        vec![
            eq(meta("nfproto"), json!("ipv6")),
            eq(payload("udp", "sport"), json!(546)),
            eq(payload("udp", "dport"), json!(547)),
            accept(),
        ],
        Some("DHCPv6"),
    ));
    cmds.push(rule_obj(
        output,
        vec![
            eq(
                payload("icmpv6", "type"),
                json!({"set": [
                    "nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit",
                    "nd-neighbor-advert", "mld-listener-report", "mld-listener-done",
                    "mld2-listener-report",
                ]}),
            ),
            accept(),
        ],
        Some("NDP and MLD"),
    ));
    if let Some(p) = &spec.portal {
        cmds.extend(portal_rules(output, p));
    }
    cmds.extend(allowed(output));
    cmds.push(rule_obj(
        "forward",
        vec![eq(meta("oifname"), json!(ifname)), accept()],
        None,
    ));
    cmds.extend(allowed("forward"));
    Ok(json!({"nftables": cmds}))
}

/// The exemption's accept rules (before the DNS drop and the final drop),
/// counted, with their comment.
fn portal_rules(chain: &str, p: &PortalExemption) -> Vec<Value> {
    let mut rules = Vec::new();
    for (family, v4) in [("ip", true), ("ip6", false)] {
        let pick = |addrs: &[IpAddr]| -> Vec<String> {
            addrs
                .iter()
                .filter(|a| a.is_ipv4() == v4)
                .map(|a| a.to_string())
                .collect()
        };
        let dns = pick(&p.dns_servers);
        if !dns.is_empty() {
            for proto in ["udp", "tcp"] {
                rules.push(rule_obj(
                    chain,
                    vec![
                        eq(payload(family, "daddr"), json!({"set": dns})),
                        eq(payload(proto, "dport"), json!(53)),
                        json!({"counter": {"packets": 0, "bytes": 0}}),
                        accept(),
                    ],
                    Some(PORTAL_COMMENT),
                ));
            }
        }
        let hosts = pick(&p.portal_addresses);
        if !hosts.is_empty() {
            rules.push(rule_obj(
                chain,
                vec![
                    eq(payload(family, "daddr"), json!({"set": hosts})),
                    eq(payload("tcp", "dport"), json!({"set": p.portal_ports})),
                    json!({"counter": {"packets": 0, "bytes": 0}}),
                    accept(),
                ],
                Some(PORTAL_COMMENT),
            ));
        }
    }
    rules
}

/// The exemption's rules' comment.
pub const PORTAL_COMMENT: &str = "captive portal exemption (vanectl portal)";

/// The document that removes the table if it is there, in one transaction
/// (so removing is idempotent without a check-then-act race).
pub fn remove_document() -> Value {
    json!({"nftables": remove_commands()})
}

/// Whether `nft list tables` output names our table.
pub fn lists_our_table(list_tables: &str) -> bool {
    list_tables
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["table", "inet", "vane"])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nets: &[&str]) -> Spec {
        Spec {
            tunnel_if: "wg0".into(),
            fwmark: 0xca6c,
            allow_nets: nets.iter().map(|n| n.parse().unwrap()).collect(),
            block_dns: true,
            portal: None,
        }
    }

    /// The commands of a document, as (verb, object kind, object).
    fn commands(doc: &Value) -> Vec<(String, String, Value)> {
        doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let (verb, obj) = c.as_object().unwrap().iter().next().unwrap();
                let (kind, body) = obj.as_object().unwrap().iter().next().unwrap();
                (verb.clone(), kind.clone(), body.clone())
            })
            .collect()
    }

    fn set_elems(doc: &Value, name: &str) -> Vec<String> {
        commands(doc)
            .into_iter()
            .find(|(_, k, b)| k == "set" && b["name"] == name)
            .map(|(_, _, b)| {
                b["elem"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|e| {
                                format!(
                                    "{}/{}",
                                    e["prefix"]["addr"].as_str().unwrap(),
                                    e["prefix"]["len"]
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap()
    }

    #[test]
    fn the_document_replaces_the_table_in_one_transaction() {
        let doc = ruleset(&spec(&[
            "192.168.1.7/24",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "fe80::/10",
            "fd00:1::/64",
        ]))
        .unwrap();
        let cmds = commands(&doc);
        let head: Vec<(&str, &str)> = cmds
            .iter()
            .take(3)
            .map(|(v, k, _)| (v.as_str(), k.as_str()))
            .collect();
        assert_eq!(
            head,
            [("add", "table"), ("delete", "table"), ("add", "table")]
        );
        assert!(cmds.iter().all(|(_, _, b)| b["family"] == "inet"));
        // Host bits cleared, overlaps merged, per family.
        assert_eq!(set_elems(&doc, "allow4"), ["10.0.0.0/8", "192.168.1.0/24"]);
        assert_eq!(set_elems(&doc, "allow6"), ["fd00:1::/64", "fe80::/10"]);
        let rules: Vec<&Value> = cmds
            .iter()
            .filter(|(_, k, _)| k == "rule")
            .map(|(_, _, b)| b)
            .collect();
        let output: Vec<&&Value> = rules.iter().filter(|r| r["chain"] == "output").collect();
        let forward: Vec<&&Value> = rules.iter().filter(|r| r["chain"] == "forward").collect();
        assert_eq!((output.len(), forward.len()), (11, 6));
        // The interface name and the mark are plain JSON values.
        assert_eq!(output[1]["expr"][0]["match"]["right"], "wg0");
        assert_eq!(output[2]["expr"][0]["match"]["right"], 0xca6c);
        // DNS (UDP and TCP 53 and 853) is dropped before the allowed
        // networks are accepted: a resolver on the local network is not
        // reached outside the tunnel.
        for chain in [&output, &forward] {
            let dns: Vec<usize> = chain
                .iter()
                .enumerate()
                .filter(|(_, r)| r["comment"] == DNS_COMMENT)
                .map(|(i, _)| i)
                .collect();
            let allow = chain
                .iter()
                .position(|r| r["expr"][0]["match"]["right"] == "@allow4")
                .unwrap();
            assert_eq!(dns, [allow - 2, allow - 1]);
            for (i, proto) in [(dns[0], "udp"), (dns[1], "tcp")] {
                let m = &chain[i]["expr"][0]["match"];
                assert_eq!(m["left"]["payload"]["protocol"], proto);
                assert_eq!(m["left"]["payload"]["field"], "dport");
                assert_eq!(m["right"], json!({"set": [53, 853]}));
                assert_eq!(chain[i]["expr"][2], json!({"drop": null}));
            }
        }
        // Each chain ends in a counted drop.
        for chain in [&output, &forward] {
            let last = chain.last().unwrap();
            assert_eq!(last["expr"][1], json!({"drop": null}));
            assert_eq!(last["comment"], DROP_COMMENT);
        }
    }

    #[test]
    fn without_tunnel_dns_the_local_resolver_stays_reachable() {
        let mut s = spec(&["192.168.1.0/24"]);
        s.block_dns = false;
        let doc = ruleset(&s).unwrap();
        let rules: Vec<Value> = commands(&doc)
            .into_iter()
            .filter(|(_, k, _)| k == "rule")
            .map(|(_, _, b)| b)
            .collect();
        assert!(rules.iter().all(|r| r["comment"] != DNS_COMMENT));
        assert_eq!(rules.len(), 9 + 4);
    }

    #[test]
    fn empty_allow_nets_gives_empty_sets() {
        let doc = ruleset(&spec(&[])).unwrap();
        assert!(set_elems(&doc, "allow4").is_empty());
        assert!(set_elems(&doc, "allow6").is_empty());
    }

    #[test]
    fn one_family_only() {
        let doc = ruleset(&spec(&["fe80::1/64"])).unwrap();
        assert_eq!(set_elems(&doc, "allow6"), ["fe80::/64"]);
        assert!(set_elems(&doc, "allow4").is_empty());
        let doc = ruleset(&spec(&["172.16.5.5/32"])).unwrap();
        assert_eq!(set_elems(&doc, "allow4"), ["172.16.5.5/32"]);
    }

    #[test]
    fn removal_is_add_then_delete() {
        let cmds = commands(&remove_document());
        let verbs: Vec<&str> = cmds.iter().map(|(v, _, _)| v.as_str()).collect();
        assert_eq!(verbs, ["add", "delete"]);
    }

    #[test]
    fn injection_and_odd_names_are_refused() {
        for bad in [
            "",
            "wg0\" accept",
            "wg\"0",
            "wg 0",
            "wg0*",
            "wg0\\",
            "wg0\n",
            "a;b",
            "{x}",
            ".",
            "..",
            "abcdefghijklmnop",
            "wg/0",
            "wgö",
        ] {
            let mut s = spec(&[]);
            s.tunnel_if = bad.into();
            let err = ruleset(&s).unwrap_err();
            assert!(
                matches!(err, SpecError::BadInterface(ref n) if n == bad),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains("not a valid interface name"));
        }
        for good in ["wg0", "vane-home", "tun_1.2", "abcdefghijklmno"] {
            let mut s = spec(&[]);
            s.tunnel_if = good.into();
            assert!(ruleset(&s).is_ok(), "{good}");
        }
    }

    #[test]
    fn zero_mark_is_refused() {
        let mut s = spec(&[]);
        s.fwmark = 0;
        assert!(matches!(ruleset(&s), Err(SpecError::ZeroMark)));
    }

    #[test]
    fn table_listing_is_parsed() {
        assert!(lists_our_table("table inet filter\ntable inet vane\n"));
        assert!(!lists_our_table("table inet filter\ntable ip vane\n"));
        assert!(!lists_our_table("table inet vane2\n"));
        assert!(!lists_our_table(""));
    }

    #[test]
    fn the_portal_exemption_lets_out_dns_to_the_network_and_the_portal_on_its_ports_before_any_drop(
    ) {
        let mut sp = spec(&[]);
        sp.portal = Some(PortalExemption {
            dns_servers: vec!["192.0.2.53".parse().unwrap(), "fd00::53".parse().unwrap()],
            portal_addresses: vec!["203.0.113.81".parse().unwrap()],
            portal_ports: vec![80, 443, 8002],
        });
        let doc = ruleset(&sp).unwrap();
        let rules: Vec<&Value> = doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.get("add").and_then(|a| a.get("rule")))
            .filter(|r| r["chain"] == "output")
            .collect();
        let exempt: Vec<usize> = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r["comment"] == PORTAL_COMMENT)
            .map(|(i, _)| i)
            .collect();
        // UDP and TCP 53 for each family's server, the ports for the IPv4
        // portal address (no IPv6 one).
        assert_eq!(exempt.len(), 5, "{rules:#?}");
        let first_drop = rules
            .iter()
            .position(|r| r["comment"] == DNS_COMMENT || r["comment"] == DROP_COMMENT)
            .unwrap();
        assert!(exempt.iter().all(|i| *i < first_drop), "{rules:#?}");
        let text = serde_json::to_string(&rules).unwrap();
        assert!(
            text.contains("203.0.113.81")
                && text.contains("192.0.2.53")
                && text.contains("fd00::53")
        );
        assert!(text.contains("[80,443,8002]"), "{text}");
        // Not in the forward chain: the exemption is the host's own
        // browser, not a routed container's.
        let forward = serde_json::to_string(&doc).unwrap();
        assert_eq!(forward.matches(PORTAL_COMMENT).count(), 5);
        // Without it, nothing of the kind.
        let plain = serde_json::to_string(&ruleset(&spec(&[])).unwrap()).unwrap();
        assert!(!plain.contains(PORTAL_COMMENT));
    }
}
