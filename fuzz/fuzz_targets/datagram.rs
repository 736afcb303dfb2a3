//! The tunnel's receive path (`vane_tunnel::batch::open_datagram`, which
//! runs boringtun's parsing, rate limiter and `Tunn::decapsulate`, then
//! vane's peer lookup, roaming and inner-source check) on datagrams from
//! the network.
//!
//! Each run builds a device with one peer (AllowedIPs 10.0.0.2/32 and
//! fd00::2/128) and completes a real handshake with a boringtun `Tunn`
//! playing that peer. The input is a list of records `op, len (u16 le),
//! bytes`:
//! - 0: the bytes as a datagram: never delivered (it cannot authenticate);
//! - 1: the bytes as a packet the peer sends: if delivered, it is the
//!   packet sent (up to its IP length, at least its IP header) from an
//!   allowed source; the same
//!   datagram again is never delivered (replay);
//! - 2: the last encrypted datagram with the bytes XORed in: if anything
//!   changed, never delivered;
//! - 3: the bytes sent twice by the peer, delivered in reverse order:
//!   the reordered one is accepted if the first was.
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use libfuzzer_sys::fuzz_target;
use vane_tunnel::batch::{open_datagram, Opened};
use vane_tunnel::batch::Counters;
use vane_tunnel::model::{DeviceConfig, Key, PeerConfig};
use vane_tunnel::peers::PeerTable;

const OUR_KEY: [u8; 32] = [0x11; 32];
const PEER_KEY: [u8; 32] = [0x22; 32];
const OFFSET: usize = 16;

fn from() -> SocketAddr {
    "192.0.2.2:51821".parse().unwrap()
}

struct Lab {
    table: PeerTable,
    peer: Tunn,
    counters: Counters,
    out: Vec<u8>,
    last: Option<Vec<u8>>,
}

impl Lab {
    fn new() -> Lab {
        let peer_public = Key::from_bytes(PEER_KEY).public_key();
        let mut pc = PeerConfig::new(peer_public);
        pc.add_allowed_ip("10.0.0.2/32".parse().unwrap());
        pc.add_allowed_ip("fd00::2/128".parse().unwrap());
        let config = DeviceConfig {
            private_key: Some(Key::from_bytes(OUR_KEY)),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![pc],
        };
        let table = PeerTable::build(&PeerTable::default(), &DeviceConfig::default(), &config);
        let ours = PublicKey::from(&StaticSecret::from(OUR_KEY));
        let peer = Tunn::new(StaticSecret::from(PEER_KEY), ours, None, None, 1, None);
        let mut lab = Lab {
            table,
            peer,
            counters: Counters::default(),
            out: Vec::new(),
            last: None,
        };
        lab.handshake();
        lab
    }

    fn open(&mut self, datagram: &[u8]) -> Opened {
        open_datagram(
            &self.table,
            datagram,
            from(),
            &mut self.out,
            OFFSET,
            &self.counters,
        )
    }

    fn handshake(&mut self) {
        let mut buf = vec![0u8; 2048];
        let init = match self.peer.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        };
        let Opened::Network(_, answers) = self.open(&init) else {
            panic!("the initiation was not answered");
        };
        for a in answers {
            let _ = self.peer.decapsulate(Some(from().ip()), &a, &mut buf);
            while let TunnResult::WriteToNetwork(_) = self.peer.decapsulate(None, &[], &mut buf) {}
        }
    }

    fn seal(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; packet.len() + 64];
        match self.peer.encapsulate(packet, &mut buf) {
            TunnResult::WriteToNetwork(d) => Some(d.to_vec()),
            _ => None,
        }
    }

    fn invalid(&self) -> u64 {
        self.counters.invalid_datagrams.load(Ordering::Relaxed)
    }
}

/// The inner source of an IP packet, as the allowed-IPs check reads it.
fn source(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(p.get(12..16)?).ok()?)),
        6 => Some(IpAddr::from(<[u8; 16]>::try_from(p.get(8..24)?).ok()?)),
        _ => None,
    }
}

fn allowed(src: Option<IpAddr>) -> bool {
    matches!(src, Some(a) if a == "10.0.0.2".parse::<IpAddr>().unwrap()
        || a == "fd00::2".parse::<IpAddr>().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let mut lab = Lab::new();
    let mut rest = data;
    while rest.len() >= 3 {
        let op = rest[0] % 4;
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let bytes = &rest[3..3 + len];
        rest = &rest[3 + len..];
        match op {
            0 => {
                let o = lab.open(bytes);
                assert!(
                    !matches!(o, Opened::Tunnel { .. }),
                    "forged datagram delivered"
                );
            }
            1 => {
                let Some(d) = lab.seal(bytes) else { continue };
                if let Opened::Tunnel { len } = lab.open(&d) {
                    let got = &lab.out[OFFSET..OFFSET + len];
                    assert_eq!(got, &bytes[..len], "delivered packet differs");
                    let header = if got.first().map(|b| b >> 4) == Some(6) {
                        40
                    } else {
                        20
                    };
                    assert!(
                        got.len() >= header,
                        "a packet shorter than its header delivered"
                    );
                    assert!(allowed(source(got)), "source not in AllowedIPs delivered");
                    let before = lab.invalid();
                    let again = lab.open(&d);
                    assert!(!matches!(again, Opened::Tunnel { .. }), "replay delivered");
                    assert_eq!(lab.invalid(), before + 1, "replay not counted");
                }
                lab.last = Some(d);
            }
            2 => {
                let Some(mut d) = lab.last.clone() else {
                    continue;
                };
                let mut changed = false;
                for (i, b) in bytes.iter().enumerate() {
                    if let Some(x) = d.get_mut(i) {
                        *x ^= b;
                        changed |= *b != 0;
                    }
                }
                if changed {
                    let o = lab.open(&d);
                    assert!(
                        !matches!(o, Opened::Tunnel { .. }),
                        "tampered datagram delivered"
                    );
                }
            }
            _ => {
                let (Some(a), Some(b)) = (lab.seal(bytes), lab.seal(bytes)) else {
                    continue;
                };
                let later = matches!(lab.open(&b), Opened::Tunnel { .. });
                let earlier = matches!(lab.open(&a), Opened::Tunnel { .. });
                assert_eq!(later, earlier, "reordered datagram treated differently");
                lab.last = Some(a);
            }
        }
    }
});
