//! A café's captive portal, in namespaces. The server's namespace plays
//! the café's network as well as the VPN server: its DNS server (on
//! 192.0.2.53, the client's resolver) answers `check.portal.test` and
//! `login.portal.test`; an HTTP server answers the check URL with a 302 to
//! the login page until the user has logged in, and 204 after; until then
//! the portal also drops the WireGuard UDP (as portals do: nothing but
//! the portal until login).
//!
//! The client runs a full tunnel in lockdown with a DNS of its own, and
//! UDP senders to the internet, the local subnet and from a socket bound
//! to the uplink the whole time. nftables counters on the server's side
//! sort every packet from the client that is not WireGuard into the
//! portal's (DNS to the network's server, TCP 80/443 to the portal) and
//! the rest, which must stay 0.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vane_e2e::leaks::{internet_beyond, nft_counter, senders, NET4};
use vane_e2e::vaned::{text, Lab};
use vane_e2e::{wait_until, Netns, TempDir};

const UP: Duration = Duration::from_secs(20);
const RESOLVER: &str = "192.0.2.53";
const CHECK_ADDR: &str = "203.0.113.80";
const LOGIN_ADDR: &str = "203.0.113.81";
const TUNNEL_DNS: &str = "10.99.0.53";

/// A DNS server on RESOLVER:53 (UDP): A records for the portal's two
/// names, an empty answer for anything else. Written out by hand: the
/// test must not share the code it checks (vaned asks with hickory).
fn dns_server(ns: &Netns, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<anyhow::Result<()>> {
    ns.run_in(move || {
        let sock = UdpSocket::bind((RESOLVER, 53))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            if let Some(reply) = dns_reply(&buf[..n]) {
                let _ = sock.send_to(&reply, from);
            }
        }
        Ok(())
    })
}

fn dns_reply(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    // The question: labels to the root, then type and class.
    let mut i = 12;
    let mut name = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        name.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let end = i + 4;
    q.get(..end)?;
    let addr = match (name.join(".").as_str(), qtype) {
        ("check.portal.test", 1) => Some(CHECK_ADDR),
        ("login.portal.test", 1) => Some(LOGIN_ADDR),
        _ => None,
    };
    let mut r = q[..end].to_vec();
    r[2] = 0x81; // QR, RD
    r[3] = 0x80; // RA, NOERROR
    r[6..12].copy_from_slice(&[0, u8::from(addr.is_some()), 0, 0, 0, 0]);
    if let Some(a) = addr {
        let ip: std::net::Ipv4Addr = a.parse().ok()?;
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

/// The portal's web server on CHECK_ADDR:80 and LOGIN_ADDR:80.
fn web_server(
    ns: &Netns,
    logged_in: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    ns.run_in(move || {
        let listeners = [
            TcpListener::bind((CHECK_ADDR, 80))?,
            TcpListener::bind((LOGIN_ADDR, 80))?,
        ];
        for l in &listeners {
            l.set_nonblocking(true)?;
        }
        while !stop.load(Ordering::Relaxed) {
            let mut idle = true;
            for l in &listeners {
                let Ok((mut s, _)) = l.accept() else { continue };
                idle = false;
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut req = Vec::new();
                let mut chunk = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&chunk[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req).to_ascii_lowercase();
                let answer = if req.contains("host: check.portal.test") {
                    if logged_in.load(Ordering::Relaxed) {
                        "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_owned()
                    } else {
                        "HTTP/1.1 302 Found\r\nLocation: http://login.portal.test/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
                    }
                } else if req.starts_with("get /login") {
                    logged_in.store(true, Ordering::Relaxed);
                    "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nwelcome!\n".to_owned()
                } else {
                    "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nlogin\n".to_owned()
                };
                let _ = s.write_all(answer.as_bytes());
            }
            if idle {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    })
}

/// Counters on the server's side for what comes from the client: the
/// tunnel's UDP, the portal's traffic, and everything else (which must
/// stay 0). Also the portal's block of the WireGuard UDP until login.
fn install_counters(ns: &Netns, server_if: &str) {
    let script = format!(
        "table inet portaltest {{\n\
         counter tunnel {{}}\n\
         counter portal {{}}\n\
         counter other {{}}\n\
         chain pre {{\n\
         type filter hook prerouting priority -300; policy accept;\n\
         iifname {{ \"lo\", \"{server_if}\" }} return\n\
         udp dport 51820 counter name \"tunnel\" return\n\
         ip daddr {RESOLVER} udp dport 53 counter name \"portal\" return\n\
         ip daddr {RESOLVER} tcp dport 53 counter name \"portal\" return\n\
         ip daddr {{ {CHECK_ADDR}, {LOGIN_ADDR} }} tcp dport {{ 80, 443 }} counter name \"portal\" return\n\
         icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report }} return\n\
         counter name \"other\" log prefix \"vane-not-portal \"\n\
         }}\n\
         }}\n\
         table inet portalblock {{\n\
         chain in {{\n\
         type filter hook input priority 0; policy accept;\n\
         udp dport 51820 drop\n\
         }}\n\
         }}\n"
    );
    let dir = TempDir::new().unwrap();
    let path = dir.write("portal.nft", &script).unwrap();
    ns.exec("nft", &["-f", &path.display().to_string()])
        .unwrap();
}

/// The user's browser: looks the name up as every program does (the
/// namespace's resolv.conf) and GETs `path`.
fn browse(ns: &Netns, host: &'static str, path: &'static str) -> anyhow::Result<String> {
    let out = ns.exec("getent", &["ahostsv4", host])?;
    let addr: std::net::IpAddr = out
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow::anyhow!("{host}: no address"))?
        .parse()?;
    ns.run_in(move || {
        let mut s = TcpStream::connect_timeout(&(addr, 80).into(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    })
    .join()
    .unwrap()
}

#[test]
fn behind_a_captive_portal_the_user_logs_in_through_a_narrow_exemption_and_nothing_else_leaves() {
    let rules = "include_all_networks = true\nexclude_local_networks = false\nlockdown = true\n\n\
         [on_demand]\nenabled = true\n\n[[on_demand.rule]]\naction = \"connect\"\n\n\
         [captive_portal]\ncheck_url = \"http://check.portal.test/generate_204\"\nexemption_seconds = 120\n";
    let mut lab = Lab::new_with(rules, "0.0.0.0/0, ::/0", &format!("DNS = {TUNNEL_DNS}")).unwrap();
    internet_beyond(&lab);
    lab.use_netns_resolv_conf().unwrap();
    let (a, b) = (&lab.pair.a, &lab.pair.b);
    b.ip(&[
        "addr",
        "add",
        &format!("{RESOLVER}/24"),
        "dev",
        &lab.pair.veth_b,
    ])
    .unwrap();
    for addr in [CHECK_ADDR, LOGIN_ADDR] {
        b.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])
            .unwrap();
    }
    install_counters(b, &lab.server_if);
    let stop = Arc::new(AtomicBool::new(false));
    let logged_in = Arc::new(AtomicBool::new(false));
    let dns = dns_server(b, stop.clone());
    let web = web_server(b, logged_in.clone(), stop.clone());
    let rounds = Arc::new(AtomicU64::new(0));
    let traffic = senders(a, &lab.pair.veth_a, stop.clone(), rounds.clone());
    let other = || nft_counter(b, "portaltest", "other");
    let portal_packets = || nft_counter(b, "portaltest", "portal");

    let started = Instant::now();
    let vaned = lab.start_vaned(&[]).unwrap();
    // The senders ran before vaned: from the kill switch on, nothing.
    vaned.wait_kill_switch(UP).unwrap();
    let baseline = other();
    let mut status = serde_json::Value::Null;
    wait_until(UP, "the portal detected", || {
        status = vaned.status().unwrap_or_default();
        status["network"]["captive_portal"]["state"] == "portal"
    })
    .unwrap_or_else(|e| panic!("{e}: {status:#}\n{}", vaned.proc_.log()));
    let detected = started.elapsed();
    assert_eq!(
        status["network"]["captive_portal"]["url"], "http://login.portal.test/",
        "{status:#}"
    );
    assert_eq!(status["tunnel"]["kill_switch"]["active"], true);
    let o = vaned.ctl(&["network"]);
    assert!(
        text(&o).contains("captive portal: http://login.portal.test/"),
        "{}",
        text(&o)
    );
    // Behind the portal nothing gets through: not the tunnel, not the
    // user (the name does not even resolve: resolv.conf is the tunnel's).
    assert!(browse(a, "login.portal.test", "/").is_err());
    assert_eq!(
        other(),
        baseline,
        "before the exemption\n{}",
        vaned.proc_.log()
    );

    // The user asks to log in.
    let o = vaned.ctl(&["portal"]);
    assert!(o.status.success(), "{}", text(&o));
    let opened = Instant::now();
    vaned.wait_state("down", UP).unwrap();
    let s = vaned.status().unwrap();
    let exemption = &s["network"]["captive_portal"]["exemption"];
    assert_eq!(exemption["dns_servers"][0], RESOLVER, "{s:#}");
    let mut allowed: Vec<String> = exemption["portal_addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    allowed.sort();
    assert_eq!(allowed, [CHECK_ADDR, LOGIN_ADDR], "{s:#}");
    assert_eq!(s["tunnel"]["kill_switch"]["active"], true, "{s:#}");
    // The portal's page loads (the network's DNS, the portal's address) ...
    let page = wait_until_ok(|| browse(a, "login.portal.test", "/"));
    assert!(page.contains("login"), "{page}");
    // ... and nothing else does: another host on port 80, a name the
    // portal's DNS does not know still resolves nowhere useful.
    assert!(
        !tcp_connects(a, NET4),
        "a connection outside the portal went through"
    );
    let r = rounds.load(Ordering::Relaxed);
    wait_until(UP, "more rounds of sends", || {
        rounds.load(Ordering::Relaxed) >= r + 200
    })
    .unwrap();
    assert_eq!(
        other(),
        baseline,
        "during the exemption: packets that were not the portal's\n{}",
        vaned.proc_.log()
    );

    // Closed by the user's word: the tunnel is wanted up again at once,
    // the exemption's addresses blocked again; then opened again.
    let o = vaned.ctl(&["portal", "close"]);
    assert!(o.status.success(), "{}", text(&o));
    vaned.wait_state("up", UP).unwrap();
    let s = vaned.status().unwrap();
    assert!(
        s["network"]["captive_portal"]["exemption"].is_null(),
        "{s:#}"
    );
    assert!(
        !tcp_connects(a, LOGIN_ADDR),
        "the portal is still let through"
    );
    let o = vaned.ctl(&["portal"]);
    assert!(o.status.success(), "{}", text(&o));
    vaned.wait_state("down", UP).unwrap();

    // The user logs in; the portal lets the tunnel's UDP through.
    let welcome = browse(a, "login.portal.test", "/login").unwrap();
    assert!(welcome.contains("welcome"), "{welcome}");
    let logged = Instant::now();
    b.exec("nft", &["delete", "table", "inet", "portalblock"])
        .unwrap();
    // The check passes: the exemption closes, the tunnel comes up.
    wait_until(UP, "the exemption closed and the tunnel up", || {
        vaned.status().is_ok_and(|s| {
            s["network"]["captive_portal"]["state"] == "none"
                && s["network"]["captive_portal"]["exemption"].is_null()
                && s["tunnel"]["state"] == "up"
        })
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:#}\n{}",
            vaned.status().unwrap_or_default(),
            vaned.proc_.log()
        )
    });
    a.ping_until(NET4, UP).unwrap();
    let through = logged.elapsed();
    // With nothing to log in to, the exemption is refused.
    let o = vaned.ctl(&["portal"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no captive portal on this network"),
        "{}",
        text(&o)
    );

    let r = rounds.load(Ordering::Relaxed);
    wait_until(UP, "more rounds of sends", || {
        rounds.load(Ordering::Relaxed) >= r + 200
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap().unwrap();
    dns.join().unwrap().unwrap();
    web.join().unwrap().unwrap();
    assert_eq!(
        other(),
        baseline,
        "packets outside the tunnel that were not the portal's\n{}",
        vaned.proc_.log()
    );
    eprintln!(
        "portal detected {:.0} ms after vaned started; exemption open {:.1} s; \
         login to a ping through the tunnel {:.0} ms; portal packets {}; others {}",
        detected.as_secs_f64() * 1e3,
        opened.elapsed().as_secs_f64(),
        through.as_secs_f64() * 1e3,
        portal_packets(),
        other() - baseline
    );
}

/// Whether a TCP connection from `ns` to `addr` port 80 is made within
/// 0.5 s (the kill switch refuses one at once).
fn tcp_connects(ns: &Netns, addr: &'static str) -> bool {
    ns.run_in(move || {
        Ok(TcpStream::connect_timeout(
            &(addr.parse::<std::net::IpAddr>()?, 80).into(),
            Duration::from_millis(500),
        )?)
    })
    .join()
    .unwrap()
    .is_ok()
}

/// Retries `f` for a few seconds (the exemption's kill switch and the
/// reverted DNS take a moment after `vanectl portal` returns).
fn wait_until_ok<T>(mut f: impl FnMut() -> anyhow::Result<T>) -> T {
    let deadline = Instant::now() + UP;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
