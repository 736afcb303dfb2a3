//! Hostile peers against vane-tunnel, with Debian's wireguard-go as the
//! honest peer, in network namespaces. Run as root (scripts/test does).
//!
//! - a handshake-initiation flood from 64 source addresses gets cookie
//!   replies while an established session carries a TCP transfer, and a
//!   new handshake from the honest peer still completes;
//! - transport datagrams captured off the wire and replayed are never
//!   delivered twice, and reordered ones inside the window are delivered;
//! - datagrams of every message type with wrong lengths, and garbage, are
//!   dropped and counted, and the session carries on.
//!
//! vane-tunnel reports its drop counters when it stops ("dropped packets:
//! ..." in its log); the tests read them there.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use blake2::digest::{consts::U16, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use vane_e2e::*;

const SECS: Duration = Duration::from_secs(1);

/// vane-tunnel in `pair.a` (192.0.2.1:51820, inner 10.10.0.1), wireguard-go
/// in `pair.b` (192.0.2.2:51821, inner 10.10.0.2), a session up.
// Fields drop in order: the processes first, then the namespaces.
struct Setup {
    vane: Proc,
    _wg: Proc,
    pair: Pair,
    _dir: TempDir,
    vane_if: String,
    vane_keys: Keys,
    wg_if: String,
    psk_file: std::path::PathBuf,
}

impl Setup {
    fn new() -> Result<Setup> {
        require_root();
        let pair = Pair::new()?;
        let dir = TempDir::new()?;
        let (vane_if, wg_if) = (unique("v"), unique("w"));
        let (vane_keys, wg_keys) = (Keys::new()?, Keys::new()?);
        // With a preshared key, so that the logs are also scanned for one.
        let psk = genpsk()?;
        let psk_file = dir.write("psk", &psk)?;
        let conf = dir.write(
            "vane.conf",
            &format!(
                "[Interface]\nPrivateKey = {}\nListenPort = 51820\nAddress = 10.10.0.1/24\nMTU = 1420\n\n\
                 [Peer]\nPublicKey = {}\nPresharedKey = {psk}\nEndpoint = 192.0.2.2:51821\nAllowedIPs = 10.10.0.2/32\n",
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
                "preshared-key",
                &psk_file.to_string_lossy(),
                "endpoint",
                "192.0.2.1:51820",
                "allowed-ips",
                "10.10.0.1/32",
            ],
        )?;
        tunnel_addrs(&pair.b, &wg_if, &["10.10.0.2/24"])?;
        pair.a.ping_until("10.10.0.2", 10 * SECS)?;
        pair.b.ping_until("10.10.0.1", 10 * SECS)?;
        Ok(Setup {
            vane,
            _wg: wg,
            pair,
            _dir: dir,
            vane_if,
            vane_keys,
            wg_if,
            psk_file,
        })
    }

    /// Stops vane-tunnel and returns its drop counters.
    fn stop_and_count(&mut self) -> Result<Counters> {
        self.vane.stop(nix::sys::signal::Signal::SIGTERM)?;
        Counters::parse(&self.vane.log())
    }
}

/// vane-tunnel's "dropped packets: ..." line.
#[derive(Debug)]
struct Counters {
    invalid: u64,
    unknown_peer: u64,
    cookies_sent: u64,
}

impl Counters {
    fn parse(log: &str) -> Result<Counters> {
        let line = log
            .lines()
            .find(|l| l.contains("dropped packets: "))
            .with_context(|| format!("no counters in the log:\n{log}"))?;
        let get = |name: &str| -> Result<u64> {
            line.split(name)
                .nth(1)
                .and_then(|rest| rest.trim_start().split(',').next())
                .and_then(|n| n.trim().parse().ok())
                .with_context(|| format!("no `{name}` in {line}"))
        };
        Ok(Counters {
            invalid: get("invalid datagrams")?,
            unknown_peer: get("unknown peer")?,
            cookies_sent: get("cookies sent")?,
        })
    }
}

/// A handshake initiation (type 1, 148 bytes) with random content and a
/// valid MAC1 for `responder` (so it passes the first check and counts
/// towards the load), MAC2 zero; its sender index is `sender`.
fn initiation(responder: &[u8; 32], sender: u32, random: &mut Pattern) -> [u8; 148] {
    let mut m = [0u8; 148];
    random.fill(&mut m[8..116]);
    m[0] = 1;
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    let mut h = Blake2s256::new();
    h.update(b"mac1----");
    h.update(responder);
    let key = h.finalize();
    let mut mac = <Blake2sMac<U16> as Mac>::new_from_slice(&key).expect("a 32-byte key");
    mac.update(&m[..116]);
    m[116..132].copy_from_slice(&mac.finalize().into_bytes());
    m
}

fn public_key_bytes(b64: &str) -> Result<[u8; 32]> {
    let v = base64::engine::general_purpose::STANDARD.decode(b64)?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("not a 32-byte key"))
}

#[test]
fn a_handshake_flood_gets_cookies_and_the_session_keeps_flowing() -> Result<()> {
    let mut s = Setup::new()?;
    // The flooders: 64 addresses in a third namespace, on a second link
    // of vane's namespace.
    let c = Netns::new("c")?;
    let (ac, ca) = veth(&s.pair.a, &c)?;
    s.pair
        .a
        .ip(&["addr", "add", "198.51.100.1/24", "dev", &ac])?;
    const FLOODERS: u8 = 64;
    for i in 0..FLOODERS {
        c.ip(&[
            "addr",
            "add",
            &format!("198.51.100.{}/24", 10 + i),
            "dev",
            &ca,
        ])?;
    }
    let responder = public_key_bytes(&s.vane_keys.public)?;
    let stop = Arc::new(AtomicBool::new(false));
    let cookies = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, cookies) = (Arc::clone(&stop), Arc::clone(&cookies));
        c.run_in(move || {
            let mut socks = Vec::new();
            for i in 0..FLOODERS {
                let s = UdpSocket::bind((Ipv4Addr::new(198, 51, 100, 10 + i), 0))?;
                s.set_nonblocking(true)?;
                socks.push(s);
            }
            let to: SocketAddr = "198.51.100.1:51820".parse()?;
            let mut random = Pattern::new(99);
            let mut per_flooder = vec![0u64; socks.len()];
            let (mut sent, mut wrong) = (0u64, 0u64);
            let mut buf = [0u8; 256];
            // A safety cap only; the test stops the flood when it is done.
            let cap = Instant::now() + 120 * SECS;
            while !stop.load(Ordering::Relaxed) && Instant::now() < cap {
                for (i, sock) in socks.iter().enumerate() {
                    let m = initiation(&responder, 0x1000 + i as u32, &mut random);
                    if sock.send_to(&m, to).is_ok() {
                        sent += 1;
                    }
                    while let Ok((n, from)) = sock.recv_from(&mut buf) {
                        // A cookie reply (type 3, 64 bytes) from vane's
                        // port, for this flooder's sender index.
                        if n == 64
                            && buf[..4] == [3, 0, 0, 0]
                            && buf[4..8] == (0x1000 + i as u32).to_le_bytes()
                            && from == to
                        {
                            per_flooder[i] += 1;
                            cookies.fetch_add(1, Ordering::Relaxed);
                        } else {
                            wrong += 1;
                        }
                    }
                }
            }
            Ok((sent, per_flooder, wrong))
        })
    };
    let result = (|| -> Result<_> {
        wait_until(20 * SECS, "the first cookie reply", || {
            cookies.load(Ordering::Relaxed) > 0
        })?;
        // Under load: the established session carries 8 MB each way.
        const N: usize = 8 * 1024 * 1024;
        let to_b: SocketAddr = "10.10.0.2:7001".parse()?;
        let (got, sent) = tcp_transfer(&s.pair.a, &s.pair.b, to_b, N, 60 * SECS)?;
        assert_eq!(got, sent, "vane -> wireguard-go under the flood");
        assert_eq!(got.0, N);
        let to_a: SocketAddr = "10.10.0.1:7002".parse()?;
        let (got, sent) = tcp_transfer(&s.pair.b, &s.pair.a, to_a, N, 60 * SECS)?;
        assert_eq!(got, sent, "wireguard-go -> vane under the flood");
        assert_eq!(got.0, N);
        let during = cookies.load(Ordering::Relaxed);
        // A new handshake under load: wireguard-go forgets its session (the
        // peer removed and added again) and must get through while vane
        // answers initiations without a valid MAC2 with cookies (the
        // protocol's way: it retries with the cookie's MAC2).
        let vane_public = s.vane_keys.public.clone();
        let psk = s.psk_file.to_string_lossy().into_owned();
        s.pair
            .b
            .exec("wg", &["set", &s.wg_if, "peer", &vane_public, "remove"])?;
        s.pair.b.exec(
            "wg",
            &[
                "set",
                &s.wg_if,
                "peer",
                &vane_public,
                "preshared-key",
                &psk,
                "endpoint",
                "192.0.2.1:51820",
                "allowed-ips",
                "10.10.0.1/32",
            ],
        )?;
        s.pair.b.ping_until("10.10.0.1", 60 * SECS)?;
        Ok(during)
    })();
    stop.store(true, Ordering::Relaxed);
    let (sent, per_flooder, wrong) = flood
        .join()
        .map_err(|_| anyhow::anyhow!("flooder panicked"))??;
    let during = result?;
    let received: u64 = per_flooder.iter().sum();
    let counters = s.stop_and_count()?;
    eprintln!(
        "flood: {sent} initiations from {FLOODERS} addresses, {received} cookie replies \
         received ({during} by the end of the transfers), per flooder min {} max {}, \
         {wrong} other datagrams; vane: {counters:?}",
        per_flooder.iter().min().unwrap_or(&0),
        per_flooder.iter().max().unwrap_or(&0),
    );
    assert!(
        per_flooder.iter().all(|&n| n > 0),
        "a flooder got no cookie: {per_flooder:?}"
    );
    assert_eq!(wrong, 0, "datagrams other than cookie replies came back");
    assert!(
        counters.cookies_sent >= received,
        "vane counted {} cookies, the flooders received {received}",
        counters.cookies_sent
    );
    // What was not answered by a cookie was refused (no such initiator).
    assert!(counters.invalid > 0, "{counters:?}");
    Ok(())
}

/// An AF_PACKET socket on `ifname` in the calling thread's namespace,
/// carrying IPv4 packets (link-layer header removed).
fn packet_socket(ifname: &str) -> Result<(std::os::fd::OwnedFd, libc::sockaddr_ll)> {
    use std::os::fd::FromRawFd;
    let proto = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {ifname}");
    }
    // SAFETY: sockaddr_ll is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    use std::os::fd::AsRawFd;
    // SAFETY: addr is a valid sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("bind AF_PACKET");
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: a timeval option of its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    Ok((fd, addr))
}

/// The UDP payload of an IPv4 packet from `src` to port `dport`.
fn udp_payload(p: &[u8], src: Ipv4Addr, dport: u16) -> Option<&[u8]> {
    if p.len() < 28 || p[0] >> 4 != 4 || p[9] != 17 || p[12..16] != src.octets() {
        return None;
    }
    let ihl = usize::from(p[0] & 0xf) * 4;
    let udp = p.get(ihl..)?;
    if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != dport {
        return None;
    }
    Some(&udp[8..])
}

#[test]
fn replayed_datagrams_are_refused_and_reordered_ones_accepted() -> Result<()> {
    let mut s = Setup::new()?;
    let (veth_a, veth_b) = (s.pair.veth_a.clone(), s.pair.veth_b.clone());
    let mac_a = s
        .pair
        .a
        .ip(&["-o", "link", "show", &veth_a])?
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .context("veth MAC")?
        .to_owned();
    let mac: Vec<u8> = mac_a
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()?;

    // What vane delivers to 10.10.0.1:9000, until the "end" marker.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let listener = s.pair.a.run_in(move || {
        let sock = UdpSocket::bind("10.10.0.1:9000")?;
        sock.set_read_timeout(Some(30 * SECS))?;
        let _ = ready_tx.send(());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 2048];
        loop {
            let n = sock.recv(&mut buf).context("listener")?;
            if &buf[..n] == b"end" {
                return Ok(got);
            }
            got.push(buf[..n].to_vec());
        }
    });
    ready_rx.recv_timeout(10 * SECS)?;

    // Two messages whose transport datagrams (272 and 368 bytes: 200 and
    // 300 bytes of UDP payload, padded and sealed) vane's host drops in
    // nftables, after the sniffer has copied them off the wire.
    let nft = "table inet vanereplay {\n chain input {\n  type filter hook input priority -10;\n  \
               udp dport 51820 udp length { 280, 376 } drop\n }\n}\n";
    let nft_file = s._dir.write("replay.nft", nft)?;
    s.pair.a.exec("nft", &["-f", &nft_file.to_string_lossy()])?;
    let (cap_tx, cap_rx) = std::sync::mpsc::channel::<()>();
    let sniffer = {
        let veth_a = veth_a.clone();
        s.pair.a.run_in(move || {
            let (fd, _) = packet_socket(&veth_a)?;
            let _ = cap_tx.send(());
            let (mut first, mut second) = (None, None);
            let deadline = Instant::now() + 20 * SECS;
            let mut buf = vec![0u8; 65536];
            while (first.is_none() || second.is_none()) && Instant::now() < deadline {
                use std::os::fd::AsRawFd;
                // SAFETY: recv into a buffer of its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n <= 0 {
                    continue;
                }
                let p = &buf[..n as usize];
                if let Some(u) = udp_payload(p, Ipv4Addr::new(192, 0, 2, 2), 51820) {
                    if u.first() == Some(&4) && u.len() == 272 {
                        first = Some(p.to_vec());
                    } else if u.first() == Some(&4) && u.len() == 368 {
                        second = Some(p.to_vec());
                    }
                }
            }
            match (first, second) {
                // veth leaves the UDP checksum to be completed (checksum
                // offload), so the captured one is partial: clear it (none,
                // as IPv4 allows) for the copies to be accepted.
                (Some(mut a), Some(mut b)) => {
                    for p in [&mut a, &mut b] {
                        let ihl = usize::from(p[0] & 0xf) * 4;
                        p[ihl + 6..ihl + 8].fill(0);
                    }
                    Ok((a, b))
                }
                _ => bail!("the transport datagrams were not seen on the wire"),
            }
        })
    };
    cap_rx.recv_timeout(10 * SECS)?;
    let (m1, m2) = (vec![b'1'; 200], vec![b'2'; 300]);
    {
        let (m1, m2) = (m1.clone(), m2.clone());
        s.pair
            .b
            .run_in(move || {
                let sock = UdpSocket::bind("10.10.0.2:0")?;
                sock.send_to(&m1, "10.10.0.1:9000")?;
                sock.send_to(&m2, "10.10.0.1:9000")?;
                Ok(())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    }
    let (d1, d2) = sniffer
        .join()
        .map_err(|_| anyhow::anyhow!("sniffer panicked"))??;
    s.pair
        .a
        .exec("nft", &["delete", "table", "inet", "vanereplay"])?;

    // Put back on the wire from the peer's side, exactly as captured:
    // the later one first (reordered, inside the window: delivered), then
    // the earlier one (delivered), then both again, several times
    // (replays: refused).
    let replays = 6u64;
    s.pair
        .b
        .run_in(move || {
            let (fd, mut addr) = packet_socket(&veth_b)?;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&mac);
            let mut order = vec![&d2, &d1];
            for _ in 0..replays / 2 {
                order.push(&d2);
                order.push(&d1);
            }
            for p in order {
                use std::os::fd::AsRawFd;
                // SAFETY: sendto with a buffer of its length and a valid
                // sockaddr_ll.
                let r = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        p.as_ptr().cast(),
                        p.len(),
                        0,
                        &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error()).context("inject");
                }
            }
            // Then the marker, through the tunnel as usual: it comes after
            // the injected datagrams on the same path.
            let sock = UdpSocket::bind("10.10.0.2:0")?;
            sock.send_to(b"end", "10.10.0.1:9000")?;
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("injector panicked"))??;
    let got = listener
        .join()
        .map_err(|_| anyhow::anyhow!("listener panicked"))??;
    let ones = got.iter().filter(|m| **m == m1).count();
    let twos = got.iter().filter(|m| **m == m2).count();
    assert_eq!(
        (ones, twos, got.len()),
        (1, 1, 2),
        "each message delivered exactly once (lengths {:?})",
        got.iter().map(Vec::len).collect::<Vec<_>>()
    );
    // The endpoint did not move, and the session still works.
    let ep = wg_show(&s.pair.a, &s.vane_if, &["endpoints"])?;
    assert!(ep.ends_with("192.0.2.2:51821"), "{ep}");
    s.pair.b.ping_until("10.10.0.1", 5 * SECS)?;
    let counters = s.stop_and_count()?;
    eprintln!(
        "replay: delivered {got_len} messages; vane: {counters:?}",
        got_len = got.len()
    );
    assert!(
        counters.invalid >= replays,
        "{replays} replays, {} counted invalid",
        counters.invalid
    );
    Ok(())
}

/// `Udp: ... RcvbufErrors ...` of the namespace: datagrams the kernel
/// dropped because the socket buffer was full.
fn rcvbuf_errors(ns: &Netns) -> Result<u64> {
    let snmp = ns.exec("cat", &["/proc/net/snmp"])?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next().context("Udp")?, udp.next().context("Udp")?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .context("RcvbufErrors")
}

#[test]
fn malformed_datagrams_of_every_type_are_dropped_and_counted() -> Result<()> {
    let mut s = Setup::new()?;
    let mut random = Pattern::new(3);
    let mut datagrams: Vec<Vec<u8>> = Vec::new();
    let mut typed = |t: u8, len: usize| {
        let mut d = vec![0u8; len];
        random.fill(&mut d);
        if len > 0 {
            d[0] = t;
        }
        for b in d.iter_mut().take(4).skip(1) {
            *b = 0;
        }
        datagrams.push(d);
    };
    // Each message type one byte short, one byte long, truncated to its
    // header and grossly oversized; then the right sizes with random
    // content (bad MAC, unknown receiver index).
    for (t, size) in [(1u8, 148usize), (2, 92), (3, 64)] {
        for len in [4, size - 1, size + 1, size * 2, 65_507] {
            typed(t, len);
        }
        typed(t, size);
    }
    for len in [4, 16, 31, 32, 100, 1500, 9000, 65_507] {
        typed(4, len);
    }
    // Unknown types, and no type at all.
    for t in [0u8, 5, 255] {
        for len in [1, 100, 65_507] {
            typed(t, len);
        }
    }
    typed(0, 0);
    let sent = datagrams.len() as u64;
    let drops_before = rcvbuf_errors(&s.pair.a)?;
    s.pair
        .b
        .run_in(move || {
            let sock = UdpSocket::bind("192.0.2.2:0")?;
            for d in &datagrams {
                sock.send_to(d, "192.0.2.1:51820")?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    // The session is unaffected: 4 MB each way, intact.
    const N: usize = 4 * 1024 * 1024;
    let (got, sent_b) = tcp_transfer(
        &s.pair.a,
        &s.pair.b,
        "10.10.0.2:7003".parse()?,
        N,
        60 * SECS,
    )?;
    assert_eq!(got, sent_b);
    let (got, sent_a) = tcp_transfer(
        &s.pair.b,
        &s.pair.a,
        "10.10.0.1:7004".parse()?,
        N,
        60 * SECS,
    )?;
    assert_eq!(got, sent_a);
    let ep = wg_show(&s.pair.a, &s.vane_if, &["endpoints"])?;
    assert!(
        ep.ends_with("192.0.2.2:51821"),
        "garbage moved the endpoint: {ep}"
    );
    let lost = rcvbuf_errors(&s.pair.a)? - drops_before;
    let counters = s.stop_and_count()?;
    eprintln!("malformed: sent {sent}, lost in the kernel {lost}; vane: {counters:?}");
    assert_eq!(
        counters.invalid + counters.unknown_peer,
        sent - lost,
        "every malformed datagram that reached vane is counted once"
    );
    assert_eq!(counters.cookies_sent, 0);
    Ok(())
}
