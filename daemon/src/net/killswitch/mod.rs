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
//! The rules themselves, and what the table does, are in [`ruleset`].
//! This file is the shell: it finds `nft` and runs it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod ruleset;

#[cfg(test)]
pub use ruleset::DROP_COMMENT;
use ruleset::{lists_our_table, remove_document};
pub use ruleset::{ruleset, valid_ifname, PortalExemption, Spec, SpecError};

#[derive(Debug, thiserror::Error)]
pub enum KillSwitchError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("kill switch: the nft program was not found in /usr/sbin, /sbin or PATH (install the nftables package)")]
    NftNotFound,
    #[error("kill switch: running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kill switch: {path}: {source}")]
    Io {
        path: PathBuf,
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

/// The lockdown kill switch kept on disk (in vaned's state directory) for
/// the boot-time unit `vane-lockdown.service`, which loads it with
/// `nft -j -f` before any network comes up: a host in lockdown sends
/// nothing outside the tunnel between power-on and vaned's start.
pub const LOCKDOWN_FILE: &str = "lockdown.json";

/// Writes the lockdown kill switch for `spec` to `dir/lockdown.json`
/// (atomically), or, with `None` (lockdown released or off), removes it.
pub fn persist(dir: &Path, spec: Option<&Spec>) -> Result<(), KillSwitchError> {
    let path = dir.join(LOCKDOWN_FILE);
    let io = |source| KillSwitchError::Io {
        path: path.clone(),
        source,
    };
    match spec {
        Some(spec) => {
            let mut text = ruleset(spec)?.to_string();
            text.push('\n');
            crate::state::write_atomic(&path, text.as_bytes(), 0o644).map_err(io)
        }
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        },
    }
}

/// Whether `table inet vane` exists.
pub fn present() -> Result<bool, KillSwitchError> {
    Ok(lists_our_table(&nft(&["list", "tables", "inet"], None)?))
}

/// Root tests: each runs in a private network namespace of its own thread
/// (`unshare(CLONE_NEWNET)` is per thread; `nft` and `ip` children inherit
/// it), which dies with the thread, so nothing is left on the host.
#[cfg(test)]
mod netns_tests {
    use super::*;
    use serde_json::json;
    use std::io::ErrorKind;
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsFd;

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the kill switch tests create network namespaces: run them as root (scripts/test)"
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
                block_dns: true,
                portal: None,
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
                block_dns: true,
                portal: None,
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
                block_dns: true,
                portal: None,
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
                block_dns: true,
                portal: None,
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
            // Allowed local networks: out, but not DNS (a resolver there
            // would see every name outside the tunnel), UDP or TCP.
            send("192.168.50.9:9", None).unwrap();
            send("[fd50::9]:9", None).unwrap();
            for to in ["192.168.50.9:53", "[fd50::9]:53", "192.168.50.9:853"] {
                let r = send(to, None);
                assert!(eperm(&r), "DNS to {to}: {r:?}");
            }
            // TCP: the SYN is dropped by the DNS rule (its counter shows
            // it; the neighbour does not exist, so the connect alone could
            // not tell).
            let _ = std::net::TcpStream::connect_timeout(
                &"192.168.50.9:53".parse().unwrap(),
                std::time::Duration::from_millis(100),
            );
            let listed = run("nft", &["list", "table", "inet", "vane"]);
            let tcp_dns = listed
                .lines()
                .find(|l| l.contains("tcp dport { 53, 853 }"))
                .unwrap_or_else(|| panic!("no TCP DNS rule in {listed}"));
            assert!(
                !tcp_dns.contains("counter packets 0 "),
                "the TCP DNS SYN was not dropped by its rule: {tcp_dns}"
            );
            // Into the tunnel device: out, DNS too.
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
