//! vane-tunnel against Debian's wireguard-go, in network namespaces.
//! Run as root (scripts/test does).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use vane_e2e::*;

const SECS: Duration = Duration::from_secs(1);

/// vane-tunnel in `pair.a` (configured by file), wireguard-go in `pair.b`
/// (configured by wg set). Inner addresses 10.10.0.{1,2} and fd10::{1,2}.
// Fields drop in order: the processes first (SIGTERM, so they clean up
// after themselves), then the namespaces.
struct Setup {
    vane: Proc,
    wg: Proc,
    pair: Pair,
    dir: TempDir,
    vane_if: String,
    wg_if: String,
    vane_keys: Keys,
    wg_keys: Keys,
}

impl Setup {
    /// `ipv6_outer`: the endpoints are the IPv6 underlay addresses.
    fn new(ipv6_outer: bool) -> Result<Setup> {
        require_root();
        let pair = Pair::new()?;
        let dir = TempDir::new()?;
        let (vane_if, wg_if) = (unique("v"), unique("w"));
        let (vane_keys, wg_keys) = (Keys::new()?, Keys::new()?);
        let (ep_b, ep_a) = if ipv6_outer {
            ("[fd00:77::2]:51821", "[fd00:77::1]:51820")
        } else {
            ("192.0.2.2:51821", "192.0.2.1:51820")
        };
        let conf = dir.write(
            "vane.conf",
            &format!(
                "[Interface]\nPrivateKey = {}\nListenPort = 51820\nAddress = 10.10.0.1/24, fd10::1/64\nMTU = 1420\n\n\
                 [Peer]\nPublicKey = {}\nEndpoint = {ep_b}\nAllowedIPs = 10.10.0.2/32, fd10::2/128\n",
                vane_keys.private, wg_keys.public
            ),
        )?;
        let vane = start_vane(&pair.a, &vane_if, &["--config", &conf.to_string_lossy()])?;
        let wg = start_wireguard_go(&pair.b, &wg_if)?;
        wg_set(
            &pair.b,
            &wg_if,
            &wg_keys,
            &dir,
            &[
                "listen-port",
                "51821",
                "peer",
                &vane_keys.public,
                "endpoint",
                ep_a,
                "allowed-ips",
                "10.10.0.1/32,fd10::1/128",
            ],
        )?;
        tunnel_addrs(&pair.b, &wg_if, &["10.10.0.2/24", "fd10::2/64"])?;
        Ok(Setup {
            pair,
            dir,
            vane_if,
            wg_if,
            vane_keys,
            wg_keys,
            vane,
            wg,
        })
    }
}

#[test]
fn ping_both_ways_ipv4_and_ipv6_inside() -> Result<()> {
    let s = Setup::new(false)?;
    s.pair.a.ping_until("10.10.0.2", 10 * SECS)?;
    s.pair.b.ping_until("10.10.0.1", 10 * SECS)?;
    s.pair.a.ping_until("fd10::2", 10 * SECS)?;
    s.pair.b.ping_until("fd10::1", 10 * SECS)?;
    // wg show against vane reports the handshake and the traffic.
    let hs = wg_show(&s.pair.a, &s.vane_if, &["latest-handshakes"])?;
    let secs: u64 = hs.split_whitespace().nth(1).unwrap_or("0").parse()?;
    assert!(secs > 0, "no handshake reported: {hs}");
    let transfer = wg_show(&s.pair.a, &s.vane_if, &["transfer"])?;
    let fields: Vec<u64> = transfer
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    assert!(
        fields[0] > 0 && fields[1] > 0,
        "transfer counters: {transfer}"
    );
    Ok(())
}

#[test]
fn ipv6_as_the_outer_transport() -> Result<()> {
    let s = Setup::new(true)?;
    s.pair.a.ping_until("10.10.0.2", 10 * SECS)?;
    s.pair.b.ping_until("fd10::1", 10 * SECS)?;
    let ep = wg_show(&s.pair.a, &s.vane_if, &["endpoints"])?;
    assert!(ep.ends_with("[fd00:77::2]:51821"), "{ep}");
    let ep = wg_show(&s.pair.b, &s.wg_if, &["endpoints"])?;
    assert!(ep.ends_with("[fd00:77::1]:51820"), "{ep}");
    Ok(())
}

#[test]
fn fifty_megabytes_each_way_arrive_intact() -> Result<()> {
    let s = Setup::new(false)?;
    s.pair.a.ping_until("10.10.0.2", 10 * SECS)?;
    const N: usize = 50 * 1024 * 1024;
    let to_b: SocketAddr = "10.10.0.2:7001".parse()?;
    let (got, sent) = tcp_transfer(&s.pair.a, &s.pair.b, to_b, N, 60 * SECS)?;
    assert_eq!(got, sent, "vane -> wireguard-go: (length, checksum)");
    assert_eq!(got.0, N);
    let to_a: SocketAddr = "[fd10::1]:7002".parse()?;
    let (got, sent) = tcp_transfer(&s.pair.b, &s.pair.a, to_a, N, 60 * SECS)?;
    assert_eq!(got, sent, "wireguard-go -> vane: (length, checksum)");
    assert_eq!(got.0, N);
    Ok(())
}

#[test]
fn roaming_peer_moves_its_endpoint() -> Result<()> {
    let s = Setup::new(false)?;
    s.pair.b.ping_until("10.10.0.1", 10 * SECS)?;
    // wireguard-go's host moves to a second uplink: its first link goes
    // down and it reaches vane's address through a router on the new one.
    // Its datagrams now come from 198.51.100.2; vane must follow.
    let (a2, b2) = veth(&s.pair.a, &s.pair.b)?;
    s.pair
        .a
        .ip(&["addr", "add", "198.51.100.1/24", "dev", &a2])?;
    s.pair
        .b
        .ip(&["addr", "add", "198.51.100.2/24", "dev", &b2])?;
    s.pair.b.ip(&["link", "set", &s.pair.veth_b, "down"])?;
    s.pair
        .b
        .ip(&["route", "add", "192.0.2.0/24", "via", "198.51.100.1"])?;
    s.pair.b.ping_until("10.10.0.1", 10 * SECS)?;
    wait_until(5 * SECS, "vane to show the new endpoint", || {
        wg_show(&s.pair.a, &s.vane_if, &["endpoints"])
            .map(|e| e.ends_with("198.51.100.2:51821"))
            .unwrap_or(false)
    })?;
    // And traffic vane starts reaches the new address.
    s.pair.a.ping_until("10.10.0.2", 5 * SECS)?;
    Ok(())
}

#[test]
fn recovers_after_the_peer_restarts() -> Result<()> {
    let mut s = Setup::new(false)?;
    s.pair.a.ping_until("10.10.0.2", 10 * SECS)?;
    s.wg.stop(nix::sys::signal::Signal::SIGKILL)?;
    assert!(!s.pair.a.ping_ok("10.10.0.2"));
    // Same keys, same configuration, new process (new sessions).
    let _ = std::fs::remove_file(uapi_socket(&s.wg_if));
    let _ = s.pair.b.ip(&["link", "del", &s.wg_if]);
    s.wg = start_wireguard_go(&s.pair.b, &s.wg_if)?;
    wg_set(
        &s.pair.b,
        &s.wg_if,
        &s.wg_keys,
        &s.dir,
        &[
            "listen-port",
            "51821",
            "peer",
            &s.vane_keys.public,
            "endpoint",
            "192.0.2.1:51820",
            "allowed-ips",
            "10.10.0.1/32,fd10::1/128",
        ],
    )?;
    tunnel_addrs(&s.pair.b, &s.wg_if, &["10.10.0.2/24", "fd10::2/64"])?;
    // vane's side starts sending: its stale session must give way to a new
    // handshake.
    s.pair.a.ping_until("10.10.0.2", 30 * SECS)?;
    Ok(())
}

#[test]
fn two_peers_each_get_exactly_their_traffic() -> Result<()> {
    require_root();
    let a = Netns::new("a")?;
    let b = Netns::new("b")?;
    let c = Netns::new("c")?;
    let (ab_a, ab_b) = veth(&a, &b)?;
    let (ac_a, ac_c) = veth(&a, &c)?;
    a.ip(&["addr", "add", "192.0.2.1/24", "dev", &ab_a])?;
    b.ip(&["addr", "add", "192.0.2.2/24", "dev", &ab_b])?;
    a.ip(&["addr", "add", "198.51.100.1/24", "dev", &ac_a])?;
    c.ip(&["addr", "add", "198.51.100.2/24", "dev", &ac_c])?;
    let dir = TempDir::new()?;
    let (ka, kb, kc) = (Keys::new()?, Keys::new()?, Keys::new()?);
    let (ia, ib, ic) = (unique("v"), unique("w"), unique("w"));
    let _va = start_vane(&a, &ia, &[])?;
    let _wb = start_wireguard_go(&b, &ib)?;
    let _wc = start_wireguard_go(&c, &ic)?;
    wg_set(
        &a,
        &ia,
        &ka,
        &dir,
        &[
            "listen-port",
            "51820",
            "peer",
            &kb.public,
            "endpoint",
            "192.0.2.2:51820",
            "allowed-ips",
            "10.20.1.0/24",
            "peer",
            &kc.public,
            "endpoint",
            "198.51.100.2:51820",
            "allowed-ips",
            "10.20.2.0/24",
        ],
    )?;
    tunnel_addrs(&a, &ia, &["10.20.0.1/16"])?;
    for (ns, ifn, keys, ep, inner) in [
        (&b, &ib, &kb, "192.0.2.1:51820", "10.20.1.2/16"),
        (&c, &ic, &kc, "198.51.100.1:51820", "10.20.2.2/16"),
    ] {
        wg_set(
            ns,
            ifn,
            keys,
            &dir,
            &[
                "listen-port",
                "51820",
                "peer",
                &ka.public,
                "endpoint",
                ep,
                // Each peer lets anything from vane in (the check under test
                // is on vane's side).
                "allowed-ips",
                "10.20.0.0/16",
            ],
        )?;
        tunnel_addrs(ns, ifn, &[inner])?;
    }
    a.ping_until("10.20.1.2", 10 * SECS)?;
    a.ping_until("10.20.2.2", 10 * SECS)?;

    let rx = |ns: &Netns, ifn: &str| -> u64 {
        wg_show(ns, ifn, &["transfer"])
            .ok()
            .and_then(|t| t.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    };
    // 20 pings to B's network move B's counter and not C's.
    let (b0, c0) = (rx(&b, &ib), rx(&c, &ic));
    a.exec("ping", &["-c", "20", "-i", "0.01", "-W", "1", "10.20.1.2"])?;
    let (b1, c1) = (rx(&b, &ib), rx(&c, &ic));
    assert!(b1 >= b0 + 20 * 84, "B received {} bytes", b1 - b0);
    assert!(
        c1 < c0 + 20 * 84,
        "C received {} bytes of B's traffic",
        c1 - c0
    );
    // And the other way round.
    a.exec("ping", &["-c", "20", "-i", "0.01", "-W", "1", "10.20.2.2"])?;
    let (b2, c2) = (rx(&b, &ib), rx(&c, &ic));
    assert!(c2 >= c1 + 20 * 84, "C received {} bytes", c2 - c1);
    assert!(
        b2 < b1 + 20 * 84,
        "B received {} bytes of C's traffic",
        b2 - b1
    );

    // A packet from C with a source in B's AllowedIPs is dropped by vane:
    // counted where vane would deliver it, A's side of the tunnel device
    // (whatever vane did, the reply would go to B, so C's ping alone
    // could not tell).
    let script = dir.write(
        "spoof.nft",
        &format!(
            "table inet spoofcheck {{\n\
             counter spoofed {{}}\n\
             counter genuine {{}}\n\
             chain pre {{\n\
             type filter hook prerouting priority -300; policy accept;\n\
             iifname \"{ia}\" ip saddr 10.20.1.99 counter name \"spoofed\"\n\
             iifname \"{ia}\" ip saddr 10.20.2.2 counter name \"genuine\"\n\
             }}\n\
             }}\n"
        ),
    )?;
    a.exec("nft", &["-f", &script.display().to_string()])?;
    let counted = |name: &str| vane_e2e::leaks::nft_counter(&a, "spoofcheck", name);
    c.ip(&["addr", "add", "10.20.1.99/32", "dev", &ic])?;
    let spoofed = c
        .cmd("ping")
        .args([
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "10.20.1.99",
            "10.20.0.1",
        ])
        .output()?;
    assert!(
        !spoofed.status.success(),
        "vane answered a packet whose source belongs to another peer"
    );
    assert_eq!(counted("spoofed"), 0, "a spoofed packet reached A");
    // While C's own address still works, and is counted.
    assert!(c.ping_ok("10.20.0.1"));
    assert!(counted("genuine") > 0);
    Ok(())
}

#[test]
fn wg_show_set_showconf_and_setconf_work_against_vane() -> Result<()> {
    let s = Setup::new(false)?;
    let (a, ifn) = (&s.pair.a, s.vane_if.as_str());
    s.pair.a.ping_until("10.10.0.2", 10 * SECS)?;

    assert_eq!(wg_show(a, ifn, &["listen-port"])?, "51820");
    assert_eq!(wg_show(a, ifn, &["public-key"])?, s.vane_keys.public);
    assert_eq!(wg_show(a, ifn, &["private-key"])?, s.vane_keys.private);
    let conf = a.exec("wg", &["showconf", ifn])?;
    assert!(
        conf.contains(&format!("PrivateKey = {}", s.vane_keys.private)),
        "{conf}"
    );
    assert!(
        conf.contains(&format!("PublicKey = {}", s.wg_keys.public)),
        "{conf}"
    );
    assert!(
        conf.contains("AllowedIPs = 10.10.0.2/32, fd10::2/128"),
        "{conf}"
    );
    assert!(conf.contains("Endpoint = 192.0.2.2:51821"), "{conf}");

    // Add a peer with a preshared key and keepalive, change allowed IPs,
    // remove an allowed IP, change the port.
    let extra = Keys::new()?;
    let psk = s.dir.write("psk", &genpsk()?)?;
    a.exec(
        "wg",
        &[
            "set",
            ifn,
            "listen-port",
            "51900",
            "peer",
            &extra.public,
            "preshared-key",
            &psk.to_string_lossy(),
            "persistent-keepalive",
            "15",
            "allowed-ips",
            "10.30.0.0/16,10.31.0.0/16",
        ],
    )?;
    assert_eq!(wg_show(a, ifn, &["listen-port"])?, "51900");
    let allowed = wg_show(a, ifn, &["allowed-ips"])?;
    assert!(
        allowed.contains(&format!("{}\t10.30.0.0/16 10.31.0.0/16", extra.public)),
        "{allowed}"
    );
    let ka = wg_show(a, ifn, &["persistent-keepalive"])?;
    assert!(ka.contains(&format!("{}\t15", extra.public)), "{ka}");
    let psks = wg_show(a, ifn, &["preshared-keys"])?;
    assert!(
        psks.contains(std::fs::read_to_string(&psk)?.trim()),
        "{psks}"
    );
    // `allowed-ips` replaces the list.
    a.exec(
        "wg",
        &[
            "set",
            ifn,
            "peer",
            &extra.public,
            "allowed-ips",
            "10.32.0.0/16",
        ],
    )?;
    let allowed = wg_show(a, ifn, &["allowed-ips"])?;
    assert!(
        allowed.contains(&format!("{}\t10.32.0.0/16", extra.public)),
        "{allowed}"
    );
    assert!(!allowed.contains("10.30.0.0/16"), "{allowed}");
    a.exec("wg", &["set", ifn, "peer", &extra.public, "remove"])?;
    assert!(!wg_show(a, ifn, &["peers"])?.contains(&extra.public));

    // The port change is real: wireguard-go must now reach vane on 51900.
    s.pair.b.exec(
        "wg",
        &[
            "set",
            &s.wg_if,
            "peer",
            &s.vane_keys.public,
            "endpoint",
            "192.0.2.1:51900",
        ],
    )?;
    s.pair.b.ping_until("10.10.0.1", 10 * SECS)?;

    // setconf replaces the whole configuration.
    let newconf = s.dir.write(
        "set.conf",
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.2:51821\nAllowedIPs = 10.10.0.2/32\n",
            s.vane_keys.private, s.wg_keys.public
        ),
    )?;
    a.exec("wg", &["setconf", ifn, &newconf.to_string_lossy()])?;
    assert_eq!(wg_show(a, ifn, &["listen-port"])?, "51820");
    let allowed = wg_show(a, ifn, &["allowed-ips"])?;
    assert_eq!(allowed, format!("{}\t10.10.0.2/32", s.wg_keys.public));
    s.pair.b.exec(
        "wg",
        &[
            "set",
            &s.wg_if,
            "peer",
            &s.vane_keys.public,
            "endpoint",
            "192.0.2.1:51820",
        ],
    )?;
    s.pair.b.ping_until("10.10.0.1", 10 * SECS)?;
    Ok(())
}

#[test]
fn malformed_uapi_input_changes_nothing() -> Result<()> {
    let s = Setup::new(false)?;
    let (a, ifn) = (&s.pair.a, s.vane_if.as_str());
    let before = a.exec("wg", &["showconf", ifn])?;

    // wg(8) itself refuses a bad key before sending; the tunnel must refuse
    // what it is sent: a raw set whose last line is bad.
    let stranger = Keys::new()?;
    let hex_key = base64_to_hex(&stranger.public)?;
    let request =
        format!("set=1\nlisten_port=51999\npublic_key={hex_key}\nallowed_ip=10.0.0.0/33\n\n");
    let reply = raw_uapi(ifn, request.as_bytes())?;
    assert!(reply.starts_with("errno=-"), "reply: {reply:?}");
    assert_ne!(reply.trim(), "errno=0");
    // Unknown key, garbage, protocol version.
    for bad in [
        "set=1\nlisten_port=51999\nno_such_key=1\n\n".to_owned(),
        "set=1\nlisten_port=51999\nlisten_port\n\n".to_owned(),
        format!("set=1\npublic_key={hex_key}\nprotocol_version=9\n\n"),
        "hello=1\n\n".to_owned(),
    ] {
        let reply = raw_uapi(ifn, bad.as_bytes())?;
        assert!(reply.starts_with("errno=-"), "{bad:?} -> {reply:?}");
    }
    assert_eq!(
        a.exec("wg", &["showconf", ifn])?,
        before,
        "a refused set changed the configuration"
    );
    let bad_key = a
        .cmd("wg")
        .args(["set", ifn, "peer", "not-a-key"])
        .output()?;
    assert!(!bad_key.status.success());
    // Still working.
    s.pair.a.ping_until("10.10.0.2", 10 * SECS)?;
    Ok(())
}

#[test]
fn config_file_errors_exit_2_with_file_and_line() -> Result<()> {
    require_root();
    let ns = Netns::new("e")?;
    let dir = TempDir::new()?;
    let keys = Keys::new()?;
    let bad = dir.write(
        "bad.conf",
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 99999\n",
            keys.private
        ),
    )?;
    let ifn = unique("v");
    let out = ns
        .cmd(&vane_tunnel_bin().to_string_lossy())
        .args(["--foreground", &ifn, "--config", &bad.to_string_lossy()])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3: ListenPort", bad.display())),
        "{err}"
    );
    assert!(!err.contains(&keys.private), "the key leaked into: {err}");
    // Nothing was created.
    assert!(!uapi_socket(&ifn).exists());
    assert!(ns.ip(&["link", "show", &ifn]).is_err());

    let loose = dir.write(
        "loose.conf",
        &format!("[Interface]\nPrivateKey = {}\n", keys.private),
    )?;
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o640))?;
    let out = ns
        .cmd(&vane_tunnel_bin().to_string_lossy())
        .args(["--foreground", &ifn, "--config", &loose.to_string_lossy()])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    Ok(())
}

#[test]
fn sigterm_removes_the_interface_and_the_socket() -> Result<()> {
    let mut s = Setup::new(false)?;
    s.pair.a.ping_until("10.10.0.2", 10 * SECS)?;
    // Signalled by hand, not with Proc::stop, which would remove the
    // socket on vane's behalf: vane must do it itself.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.vane.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let mut status = None;
    wait_until(10 * SECS, "vane-tunnel to exit", || {
        status = s.vane.try_wait();
        status.is_some()
    })?;
    let status = status.ok_or_else(|| anyhow::anyhow!("no exit status"))?;
    assert!(status.success(), "exit status {status}");
    assert!(!uapi_socket(&s.vane_if).exists());
    assert!(s.pair.a.ip(&["link", "show", &s.vane_if]).is_err());
    let log = s.vane.log();
    assert!(
        !log.contains(&s.vane_keys.private),
        "private key in the log"
    );
    Ok(())
}

#[test]
fn garbage_datagrams_are_dropped_and_the_tunnel_lives() -> Result<()> {
    let mut s = Setup::new(false)?;
    s.pair.a.ping_until("10.10.0.2", 10 * SECS)?;
    // Random, truncated and oversized datagrams at vane's port.
    let sender = s.pair.b.run_in(|| {
        let sock = std::net::UdpSocket::bind("192.0.2.2:0")?;
        let mut p = Pattern::new(7);
        for len in [0usize, 1, 3, 4, 31, 32, 92, 148, 500, 1500, 9000, 60000] {
            for first in [0u8, 1, 2, 3, 4, 9] {
                let mut buf = vec![0u8; len];
                p.fill(&mut buf);
                if let Some(b) = buf.first_mut() {
                    *b = first;
                }
                let _ = sock.send_to(&buf, "192.0.2.1:51820");
            }
        }
        Ok(())
    });
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    s.pair.a.ping_until("10.10.0.2", 5 * SECS)?;
    s.pair.b.ping_until("10.10.0.1", 5 * SECS)?;
    // And they were counted (reported when the tunnel stops).
    s.vane.stop(nix::sys::signal::Signal::SIGTERM)?;
    let log = s.vane.log();
    let invalid: u64 = log
        .split("dropped packets: invalid datagrams ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(invalid >= 50, "garbage not counted as invalid: {log}");
    Ok(())
}

#[test]
fn a_finished_test_leaves_nothing_behind() -> Result<()> {
    let s = Setup::new(false)?;
    s.pair.a.ping_until("10.10.0.2", 10 * SECS)?;
    let sockets = [uapi_socket(&s.vane_if), uapi_socket(&s.wg_if)];
    let namespaces = [s.pair.a.name.clone(), s.pair.b.name.clone()];
    let dir = s.dir.path().to_owned();
    drop(s);
    for sock in &sockets {
        assert!(!sock.exists(), "{} left behind", sock.display());
    }
    let listed = run(std::process::Command::new("ip").args(["netns", "list"]))?;
    for ns in &namespaces {
        assert!(
            !listed.split_whitespace().any(|n| n == ns),
            "namespace {ns} left behind"
        );
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
    Ok(())
}

fn raw_uapi(ifname: &str, request: &[u8]) -> Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(uapi_socket(ifname))?;
    s.set_read_timeout(Some(5 * SECS))?;
    s.write_all(request)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn base64_to_hex(b64: &str) -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = String::new();
    for c in b64.trim_end_matches('=').bytes() {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .ok_or_else(|| anyhow::anyhow!("not base64"))? as u32;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push_str(&format!("{:02x}", (bits >> nbits) & 0xff));
        }
    }
    Ok(out)
}
