//! The kill switch: an nftables table of vane's own (`table inet vane`)
//! that lets nothing leave the host by the underlying interfaces except the
//! tunnel's own encrypted UDP, the link's housekeeping (DHCP, neighbour
//! discovery) and the destinations the configuration excludes from the
//! tunnel (local networks).
//!
//! The rules are built by [`ruleset`] (pure, unit tested) as an nft JSON
//! document (libnftables-json) and loaded by [`apply`] through
//! `nft -j -f -`, which runs the whole document as ONE netlink
//! transaction: the table is created, or replaced with no moment without
//! rules, or nothing changes at all.
//!
//! Why the `nft` binary rather than a crate: the `nft` program is the one
//! implementation of nftables the kernel's developers keep (the netlink
//! expressions behind a rule such as `icmpv6 type { … }` are low-level
//! bytecode that no well-kept Rust crate builds for us). Why its JSON
//! interface rather than its script language: every value (interface
//! name, address, mark) travels as a JSON string or number, so none can
//! ever be read as nft syntax; the names are still checked, for a clear
//! error. An administrator reads the result with `nft list ruleset` as
//! usual; the drop rules carry a comment naming vaned.
//!
//! What the table does (see [`ruleset`]):
//! - output: accepts loopback, everything out of the tunnel device, packets
//!   carrying the tunnel socket's fwmark (its encrypted UDP), DHCPv4 and
//!   DHCPv6 client requests, ICMPv6 router/neighbour discovery and MLD (the
//!   solicited-node multicast groups NDP relies on are joined with MLD
//!   reports, which snooping switches need to see), and destinations in the
//!   allowed networks; it drops everything else. An output drop makes the
//!   sender's `send` fail with EPERM, so applications learn at once instead
//!   of timing out.
//! - forward: drops forwarded packets leaving by any interface other than
//!   the tunnel unless their destination is in the allowed networks.
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
//!
//! The table stands beside any other firewall: in nftables a drop in any
//! base chain is final, an accept elsewhere does not override it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
}

#[derive(Debug, thiserror::Error)]
pub enum KillSwitchError {
    #[error("kill switch: tunnel interface name {0:?} is not a valid interface name (1 to 15 characters out of A-Z a-z 0-9 - _ .)")]
    BadInterface(String),
    #[error("kill switch: the tunnel's fwmark must not be 0 (unmarked packets are exactly what the kill switch drops)")]
    ZeroMark,
    #[error("kill switch: the nft program was not found in /usr/sbin, /sbin or PATH (install the nftables package)")]
    NftNotFound,
    #[error("kill switch: running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kill switch: `nft {args}` failed ({status}): {stderr}")]
    Nft {
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
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

fn check(spec: &Spec) -> Result<(), KillSwitchError> {
    if !valid_ifname(&spec.tunnel_if) {
        return Err(KillSwitchError::BadInterface(spec.tunnel_if.clone()));
    }
    if spec.fwmark == 0 {
        return Err(KillSwitchError::ZeroMark);
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
pub fn ruleset(spec: &Spec) -> Result<Value, KillSwitchError> {
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
        vec![
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
        ]
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
    cmds.extend(allowed(output));
    cmds.push(rule_obj(
        "forward",
        vec![eq(meta("oifname"), json!(ifname)), accept()],
        None,
    ));
    cmds.extend(allowed("forward"));
    Ok(json!({"nftables": cmds}))
}

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

/// The nft program: /usr/sbin/nft, /sbin/nft, else the first `nft` in PATH.
pub fn nft_path() -> Result<PathBuf, KillSwitchError> {
    let fixed = [Path::new("/usr/sbin/nft"), Path::new("/sbin/nft")];
    if let Some(p) = fixed.iter().find(|p| p.is_file()) {
        return Ok(p.to_path_buf());
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("nft"))
                .find(|p| p.is_file())
        })
        .ok_or(KillSwitchError::NftNotFound)
}

/// Runs nft with `args`, `stdin` as its input; returns its stdout.
fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, KillSwitchError> {
    let program = nft_path()?;
    let spawn_err = |source| KillSwitchError::Spawn {
        program: program.display().to_string(),
        source,
    };
    let mut child = Command::new(&program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error (nft exited early) shows up as nft's status below.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(KillSwitchError::Nft {
            args: args.join(" "),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates or atomically replaces `table inet vane` (one nft transaction:
/// there is never a moment without the rules when replacing).
pub fn apply(spec: &Spec) -> Result<(), KillSwitchError> {
    let doc = ruleset(spec)?;
    nft(&["-j", "-f", "-"], Some(&doc.to_string()))?;
    tracing::info!(
        interface = %spec.tunnel_if,
        allowed = spec.allow_nets.len(),
        "kill switch on (nftables table inet vane)"
    );
    Ok(())
}

/// Removes `table inet vane`; no table is fine.
pub fn remove() -> Result<(), KillSwitchError> {
    nft(&["-j", "-f", "-"], Some(&remove_document().to_string()))?;
    tracing::debug!("kill switch off (table inet vane removed)");
    Ok(())
}

/// Whether `table inet vane` exists.
pub fn present() -> Result<bool, KillSwitchError> {
    Ok(lists_our_table(&nft(&["list", "tables", "inet"], None)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nets: &[&str]) -> Spec {
        Spec {
            tunnel_if: "wg0".into(),
            fwmark: 0xca6c,
            allow_nets: nets.iter().map(|n| n.parse().unwrap()).collect(),
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
        assert_eq!((output.len(), forward.len()), (9, 4));
        // The interface name and the mark are plain JSON values.
        assert_eq!(output[1]["expr"][0]["match"]["right"], "wg0");
        assert_eq!(output[2]["expr"][0]["match"]["right"], 0xca6c);
        // Each chain ends in a counted drop.
        for chain in [&output, &forward] {
            let last = chain.last().unwrap();
            assert_eq!(last["expr"][1], json!({"drop": null}));
            assert_eq!(last["comment"], DROP_COMMENT);
        }
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
                matches!(err, KillSwitchError::BadInterface(ref n) if n == bad),
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
        assert!(matches!(ruleset(&s), Err(KillSwitchError::ZeroMark)));
    }

    #[test]
    fn table_listing_is_parsed() {
        assert!(lists_our_table("table inet filter\ntable inet vane\n"));
        assert!(!lists_our_table("table inet filter\ntable ip vane\n"));
        assert!(!lists_our_table("table inet vane2\n"));
        assert!(!lists_our_table(""));
    }
}

/// Root tests: each runs in a private network namespace of its own thread
/// (`unshare(CLONE_NEWNET)` is per thread; `nft` and `ip` children inherit
/// it), which dies with the thread, so nothing is left on the host.
#[cfg(test)]
mod netns_tests {
    use super::*;
    use std::io::ErrorKind;
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsFd;

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the kill switch tests create network namespaces: run them as root (sudo scripts/test)"
        );
    }

    /// Runs `f` on a thread in a fresh network namespace.
    fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        require_root();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    fn run(program: &str, args: &[&str]) -> String {
        let out = Command::new(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn ruleset_now() -> String {
        run("nft", &["list", "ruleset"])
    }

    #[test]
    fn apply_replace_and_remove_in_a_private_netns() {
        in_netns(|| {
            // Someone else's table, which must survive untouched.
            run("nft", &["add", "table", "ip", "theirs"]);
            run(
                "nft",
                &[
                    "add",
                    "chain",
                    "ip",
                    "theirs",
                    "c",
                    "{ type filter hook output priority 10; }",
                ],
            );
            let before = ruleset_now();
            assert!(!present().unwrap());
            remove().unwrap(); // no table: fine

            let s1 = Spec {
                tunnel_if: "wg7".into(),
                fwmark: 0x1234,
                allow_nets: vec![
                    "192.168.1.0/24".parse().unwrap(),
                    "fe80::/10".parse().unwrap(),
                ],
            };
            apply(&s1).unwrap();
            assert!(present().unwrap());
            let listed = ruleset_now();
            assert!(listed.contains("table inet vane"), "{listed}");
            assert!(listed.contains("oifname \"wg7\" accept"), "{listed}");
            assert!(listed.contains("meta mark 0x00001234 accept"), "{listed}");
            assert!(listed.contains("192.168.1.0/24"), "{listed}");
            assert!(listed.contains("fe80::/10"), "{listed}");
            assert!(listed.contains(DROP_COMMENT), "{listed}");
            for line in [
                "oif \"lo\" accept",
                "udp sport 68 udp dport 67 accept comment \"DHCPv4\"",
                "meta nfproto ipv6 udp sport 546 udp dport 547 accept comment \"DHCPv6\"",
                "ip daddr @allow4 accept",
                "ip6 daddr @allow6 accept",
                "nd-neighbor-solicit",
                "mld2-listener-report",
                "type filter hook output priority filter; policy accept;",
                "type filter hook forward priority filter; policy accept;",
            ] {
                assert!(listed.contains(line), "{line} in {listed}");
            }

            // Replace: new values, one table, no trace of the old ones.
            let s2 = Spec {
                tunnel_if: "wg8".into(),
                fwmark: 0x99,
                allow_nets: vec![],
            };
            apply(&s2).unwrap();
            let listed = ruleset_now();
            assert_eq!(listed.matches("table inet vane {").count(), 1, "{listed}");
            assert!(listed.contains("oifname \"wg8\" accept"), "{listed}");
            assert!(!listed.contains("wg7"), "{listed}");
            assert!(!listed.contains("192.168.1.0/24"), "{listed}");
            apply(&s2).unwrap(); // idempotent

            // A refused spec changes nothing.
            let bad = Spec {
                tunnel_if: "x\" accept".into(),
                ..s2.clone()
            };
            assert!(apply(&bad).is_err());
            assert_eq!(ruleset_now(), listed);

            remove().unwrap();
            assert!(!present().unwrap());
            assert_eq!(ruleset_now(), before);
            remove().unwrap();
            assert_eq!(ruleset_now(), before);
        });
    }

    #[test]
    fn nft_errors_carry_its_stderr() {
        in_netns(|| {
            let err = nft(
                &["-f", "-"],
                Some("table inet vane { chain c { nonsense } }\n"),
            )
            .unwrap_err();
            let text = err.to_string();
            assert!(text.contains("Error"), "{text}");
            assert!(!present().unwrap());

            // A replacement nft refuses (a bad rule after the delete of
            // the old table) leaves the old table whole: nothing of the
            // script is committed. (This error is caught by nft before it
            // talks to the kernel; a kernel-side failure aborts the one
            // netlink batch the same way.)
            let spec = Spec {
                tunnel_if: "wg0".into(),
                fwmark: 0x7,
                allow_nets: vec!["10.0.0.0/8".parse().unwrap()],
            };
            apply(&spec).unwrap();
            let before = ruleset_now();
            let mut broken = ruleset(&spec).unwrap();
            let cmds = broken["nftables"].as_array_mut().unwrap();
            assert_eq!(
                cmds[1],
                json!({"delete": {"table": {"family": "inet", "name": "vane"}}})
            );
            let last = cmds.last_mut().unwrap();
            last["add"]["rule"]["expr"] = json!([{"frobnicate": null}]);
            let err = nft(&["-j", "-f", "-"], Some(&broken.to_string())).unwrap_err();
            assert!(err.to_string().contains("frobnicate"), "{err}");
            assert_eq!(ruleset_now(), before);
        });
    }

    fn send(to: &str, mark: Option<u32>) -> std::io::Result<usize> {
        let to: SocketAddr = to.parse().unwrap();
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sock = UdpSocket::bind(bind)?;
        if let Some(m) = mark {
            nix::sys::socket::setsockopt(&sock.as_fd(), nix::sys::socket::sockopt::Mark, &m)
                .map_err(std::io::Error::from)?;
        }
        sock.send_to(b"vane kill switch test", to)
    }

    fn eperm(r: &std::io::Result<usize>) -> bool {
        matches!(r, Err(e) if e.kind() == ErrorKind::PermissionDenied)
    }

    #[test]
    fn the_filter_drops_what_leaves_outside_the_tunnel() {
        in_netns(|| {
            // An uplink (a veth pair, both ends here: a send to an
            // unresolved neighbour succeeds, queued) with the default
            // routes, and another veth playing the tunnel device.
            let ip = |a: &[&str]| run("ip", a);
            ip(&["link", "set", "lo", "up"]);
            ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
            ip(&["link", "add", "wgt", "type", "veth", "peer", "name", "wgt1"]);
            for dev in ["up0", "up1", "wgt", "wgt1"] {
                ip(&["link", "set", dev, "up"]);
            }
            ip(&["addr", "add", "192.168.50.2/24", "dev", "up0"]);
            ip(&["-6", "addr", "add", "fd50::2/64", "dev", "up0", "nodad"]);
            ip(&["addr", "add", "10.9.0.2/32", "dev", "wgt"]);
            ip(&["route", "add", "default", "dev", "up0"]);
            ip(&["-6", "route", "add", "default", "dev", "up0"]);
            ip(&["route", "add", "203.0.113.0/24", "dev", "wgt"]);

            // Before: everything goes out.
            assert!(send("198.51.100.7:53", None).is_ok());
            assert!(send("[2001:db8::7]:53", None).is_ok());

            apply(&Spec {
                tunnel_if: "wgt".into(),
                fwmark: 0x51,
                allow_nets: vec![
                    "192.168.50.0/24".parse().unwrap(),
                    "fd50::/64".parse().unwrap(),
                ],
            })
            .unwrap();

            // Not allowed, by the uplink: EPERM.
            for (to, mark) in [
                ("198.51.100.7:53", None),
                ("[2001:db8::7]:53", None),
                // Another mark is no better.
                ("198.51.100.7:53", Some(0x52)),
                ("[2001:db8::7]:53", Some(0x52)),
            ] {
                let r = send(to, mark);
                assert!(eperm(&r), "{to} mark {mark:?}: {r:?}");
            }
            // The tunnel's mark: out.
            send("198.51.100.7:51820", Some(0x51)).unwrap();
            send("[2001:db8::7]:51820", Some(0x51)).unwrap();
            // Allowed local networks: out.
            send("192.168.50.9:53", None).unwrap();
            send("[fd50::9]:53", None).unwrap();
            // Into the tunnel device: out.
            send("203.0.113.5:53", None).unwrap();
            // Loopback: out.
            send("127.0.0.1:9", None).unwrap();
            // A DHCPv4 client's broadcast: out; the same from another port: not.
            let dhcp = |port: u16| {
                let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap();
                sock.set_broadcast(true).unwrap();
                sock.send_to(b"DHCPDISCOVER", "255.255.255.255:67")
            };
            dhcp(68).unwrap();
            let r = dhcp(6800);
            assert!(eperm(&r), "{r:?}");

            // Removed: everything goes out again.
            remove().unwrap();
            send("198.51.100.7:53", None).unwrap();
            send("[2001:db8::7]:53", None).unwrap();
        });
    }
}
