//! vane-tunnel against itself, in network namespaces: the batched data path
//! on both ends (TUN offloads, UDP GSO on send, GRO on receive) keeps every
//! byte and its order. Run as root (scripts/test does). Against a peer that
//! does none of that, see tunnel.rs (Debian's wireguard-go).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use vane_e2e::*;

const SECS: Duration = Duration::from_secs(1);

// Fields drop in order: the processes first, then the namespaces.
struct Setup {
    _a: Proc,
    _b: Proc,
    pair: Pair,
    _dir: TempDir,
}

impl Setup {
    fn new(ipv6_outer: bool, veth_gro: bool) -> Result<Setup> {
        Setup::with_mtu(ipv6_outer, veth_gro, 1420)
    }

    fn with_mtu(ipv6_outer: bool, veth_gro: bool, mtu: u16) -> Result<Setup> {
        require_root();
        let pair = Pair::new()?;
        if veth_gro {
            // As real NICs have it: the kernel then coalesces the UDP
            // datagrams too, and UDP GRO reaches the socket.
            pair.a.exec("ethtool", &["-K", &pair.veth_a, "gro", "on"])?;
            pair.b.exec("ethtool", &["-K", &pair.veth_b, "gro", "on"])?;
        }
        let dir = TempDir::new()?;
        let (if_a, if_b) = (unique("v"), unique("v"));
        let (ka, kb) = (Keys::new()?, Keys::new()?);
        let (ep_a, ep_b) = if ipv6_outer {
            ("[fd00:77::1]:51820", "[fd00:77::2]:51821")
        } else {
            ("192.0.2.1:51820", "192.0.2.2:51821")
        };
        let conf = |name: &str,
                    own: &Keys,
                    port: u16,
                    addrs: &str,
                    peer: &Keys,
                    ep: &str,
                    allowed: &str| {
            dir.write(
                name,
                &format!(
                    "[Interface]\nPrivateKey = {}\nListenPort = {port}\nAddress = {addrs}\nMTU = {mtu}\n\n\
                     [Peer]\nPublicKey = {}\nEndpoint = {ep}\nAllowedIPs = {allowed}\n",
                    own.private, peer.public
                ),
            )
        };
        let ca = conf(
            "a.conf",
            &ka,
            51820,
            "10.11.0.1/24, fd11::1/64",
            &kb,
            ep_b,
            "10.11.0.2/32, fd11::2/128",
        )?;
        let cb = conf(
            "b.conf",
            &kb,
            51821,
            "10.11.0.2/24, fd11::2/64",
            &ka,
            ep_a,
            "10.11.0.1/32, fd11::1/128",
        )?;
        let a = start_vane(&pair.a, &if_a, &["--config", &ca.to_string_lossy()])?;
        let b = start_vane(&pair.b, &if_b, &["--config", &cb.to_string_lossy()])?;
        Ok(Setup {
            _a: a,
            _b: b,
            pair,
            _dir: dir,
        })
    }

    fn transfer_both_ways(&self) -> Result<()> {
        self.transfer_both_ways_of(64 * 1024 * 1024)
    }

    fn transfer_both_ways_of(&self, n: usize) -> Result<()> {
        self.pair.a.ping_until("10.11.0.2", 10 * SECS)?;
        let to_b: SocketAddr = "10.11.0.2:7101".parse()?;
        let (got, sent) = tcp_transfer(&self.pair.a, &self.pair.b, to_b, n, 60 * SECS)?;
        assert_eq!(got, sent, "a -> b: (length, checksum)");
        assert_eq!(got.0, n);
        let to_a: SocketAddr = "[fd11::1]:7102".parse()?;
        let (got, sent) = tcp_transfer(&self.pair.b, &self.pair.a, to_a, n, 60 * SECS)?;
        assert_eq!(got, sent, "b -> a: (length, checksum)");
        assert_eq!(got.0, n);
        Ok(())
    }
}

#[test]
fn vane_to_vane_over_ipv4_keeps_every_byte() -> Result<()> {
    Setup::new(false, false)?.transfer_both_ways()
}

#[test]
fn vane_to_vane_over_ipv6_with_veth_gro_keeps_every_byte() -> Result<()> {
    Setup::new(true, true)?.transfer_both_ways()
}

/// A tunnel MTU the path cannot carry (1500 inside 1500): the kernel
/// refuses GSO sends of oversized segments, and vane sends them one by
/// one so that they are fragmented, as any UDP sender's would be.
#[test]
fn a_tunnel_mtu_too_large_for_the_path_still_carries_traffic() -> Result<()> {
    Setup::with_mtu(false, false, 1500)?.transfer_both_ways_of(8 * 1024 * 1024)
}
