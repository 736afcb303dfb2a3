//! The data path's per-packet work, without I/O: encapsulating a batch of
//! packets read from the TUN device into datagrams laid out for UDP GSO,
//! and opening one received datagram into a packet for the TUN device.
//!
//! The device shell ([`crate::device`]) reads and writes; everything here
//! is plain data in, data out, so it is unit-tested and benchmarked
//! (`tunnel/benches/crypto.rs`) without sockets or a TUN device.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use tracing::{debug, trace};

use crate::model::PeerName;
use crate::peers::{Peer, PeerState, PeerTable};

/// Counters of what was dropped and why, for the log and for tests.
#[derive(Default)]
pub struct Counters {
    /// Datagrams that are not WireGuard messages, fail authentication or
    /// replay protection, or carry a packet shorter than its IP header.
    pub invalid_datagrams: AtomicU64,
    /// Datagrams for no known peer (unknown index or static key).
    pub unknown_peer: AtomicU64,
    /// Decrypted packets whose inner source is not in the peer's AllowedIPs.
    pub source_not_allowed: AtomicU64,
    /// Packets from the TUN device with no peer for their destination.
    pub no_route: AtomicU64,
    /// Packets for a peer with no known endpoint.
    pub no_endpoint: AtomicU64,
    /// Cookie replies sent because of handshake load.
    pub cookies_sent: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "invalid datagrams {}, unknown peer {}, inner source not allowed {}, no route {}, no endpoint {}, cookies sent {}",
            get(&self.invalid_datagrams),
            get(&self.unknown_peer),
            get(&self.source_not_allowed),
            get(&self.no_route),
            get(&self.no_endpoint),
            get(&self.cookies_sent)
        )
    }
}

/// The most UDP payload one GSO send may carry: the UDP length field is 16
/// bits, and the IPv4 header comes out of it too (65,535 - 20 - 8).
pub const MAX_GSO_BYTES: usize = 65_507;

/// Room a datagram needs in the send buffer: boringtun wants its output
/// buffer at least the packet plus 32 bytes, and at least a handshake
/// initiation (148 bytes).
pub fn room_for(packet_len: usize) -> usize {
    (packet_len + 32).max(148)
}

/// What a group of datagrams is sent for; groups only join datagrams for
/// the same peer.
pub trait Tag: Clone {
    fn same(&self, other: &Self) -> bool;
}

impl Tag for Arc<Peer> {
    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(self, other)
    }
}

impl Tag for u32 {
    fn same(&self, other: &Self) -> bool {
        self == other
    }
}

/// Datagrams that can go out in one `sendmsg` with UDP GSO: consecutive in
/// the buffer, one destination, every one `segment` bytes long but the last,
/// which may be shorter.
#[derive(Debug, Clone)]
pub struct Group<T> {
    pub start: usize,
    pub len: usize,
    pub segment: usize,
    pub count: usize,
    pub destination: SocketAddr,
    pub tag: T,
}

impl<T> Group<T> {
    /// The segment size to ask the kernel for (`None` for a lone datagram).
    pub fn segment_size(&self) -> Option<usize> {
        (self.count > 1).then_some(self.segment)
    }
}

/// One buffer of outgoing datagrams and how they group for GSO. Allocated
/// once and reused: [`SendBatch::clear`] keeps the memory.
pub struct SendBatch<T> {
    buf: Vec<u8>,
    len: usize,
    groups: Vec<Group<T>>,
    max_segments: usize,
    /// The last group ended with a short datagram: nothing may join it.
    closed: bool,
}

impl<T: Tag> SendBatch<T> {
    /// A batch of `capacity` bytes whose groups hold at most
    /// `max_segments` datagrams (1 where the kernel has no UDP GSO).
    pub fn new(capacity: usize, max_segments: usize) -> Self {
        SendBatch {
            buf: vec![0; capacity],
            len: 0,
            groups: Vec::with_capacity(64),
            max_segments: max_segments.max(1),
            closed: false,
        }
    }

    pub fn set_max_segments(&mut self, max_segments: usize) {
        self.max_segments = max_segments.max(1);
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.groups.clear();
        self.closed = false;
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The free tail of the buffer, where the next datagram is written, if
    /// at least `need` bytes are left.
    pub fn room(&mut self, need: usize) -> Option<&mut [u8]> {
        (self.buf.len() - self.len >= need).then(|| &mut self.buf[self.len..])
    }

    /// Takes the `n` bytes just written at the start of [`SendBatch::room`]
    /// as one datagram to `destination`.
    pub fn commit(&mut self, n: usize, destination: SocketAddr, tag: &T) {
        let start = self.len;
        self.len += n;
        if let Some(g) = self.groups.last_mut() {
            let joins = !self.closed
                && g.tag.same(tag)
                && g.destination == destination
                && g.count < self.max_segments
                && n <= g.segment
                && g.len + n <= MAX_GSO_BYTES
                && g.start + g.len == start;
            if joins {
                g.len += n;
                g.count += 1;
                self.closed = n < g.segment;
                return;
            }
        }
        self.groups.push(Group {
            start,
            len: n,
            segment: n,
            count: 1,
            destination,
            tag: tag.clone(),
        });
        self.closed = false;
    }

    /// The groups and their bytes, in the order they were committed.
    pub fn groups(&self) -> impl Iterator<Item = (&Group<T>, &[u8])> {
        self.groups
            .iter()
            .map(|g| (g, &self.buf[g.start..g.start + g.len]))
    }
}

/// Encapsulates packets for their peers into `batch`, starting with
/// `packets[0]` (`sizes[i]` bytes of `packets[i]`), until all are done or the batch is full; returns how many
/// were consumed (the caller sends the batch and calls again with the rest).
///
/// Consecutive packets for one peer are encrypted under one lock.
pub fn encapsulate_packets<P: AsRef<[u8]>>(
    table: &PeerTable,
    packets: &[P],
    sizes: &[usize],
    batch: &mut SendBatch<Arc<Peer>>,
    counters: &Counters,
) -> usize {
    let mut held: Option<(&Arc<Peer>, MutexGuard<'_, PeerState>)> = None;
    for (i, (packet, &size)) in packets.iter().zip(sizes).enumerate() {
        let Some(packet) = packet.as_ref().get(..size) else {
            continue;
        };
        let Some(addr) = Tunn::dst_address(packet) else {
            continue;
        };
        let Some(peer) = table.route(addr) else {
            Counters::bump(&counters.no_route);
            trace!(%addr, "no peer for destination");
            continue;
        };
        let Some(room) = batch.room(room_for(packet.len())) else {
            return i;
        };
        if !held.as_ref().is_some_and(|(p, _)| Arc::ptr_eq(p, peer)) {
            // One lock at a time: release the previous peer first.
            drop(held.take());
            held = Some((peer, peer.lock()));
        }
        let Some((_, state)) = held.as_mut() else {
            continue;
        };
        let endpoint = state.endpoint;
        let n = match state.tunn.encapsulate(packet, room) {
            TunnResult::WriteToNetwork(out) => out.len(),
            TunnResult::Err(e) => {
                debug!(peer = %PeerName(&peer.public_key), error = ?e, "encapsulate failed");
                continue;
            }
            _ => continue,
        };
        match endpoint {
            Some(endpoint) => batch.commit(n, endpoint, peer),
            None => {
                Counters::bump(&counters.no_endpoint);
                trace!(peer = %PeerName(&peer.public_key), "no endpoint, dropped");
            }
        }
    }
    packets.len()
}

/// What became of one received datagram.
pub enum Opened {
    /// Dropped (counted) or consumed by the protocol (keepalive, cookie).
    Nothing,
    /// A packet for the TUN device, `len` bytes at `out[offset..]`, its
    /// inner source checked against the peer's AllowedIPs.
    Tunnel { len: usize },
    /// Datagrams to send back to the sender: a handshake answered, and
    /// what boringtun had queued for the new session (rare; allocates).
    Network(Arc<Peer>, Vec<Vec<u8>>),
    /// A cookie reply because of handshake load.
    Cookie(Vec<u8>),
}

/// The shortest IPv4 and IPv6 headers.
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;

/// A decrypted packet of `len` bytes from `src`: for the TUN device if it
/// holds at least its IP header (`header`) and the sending peer owns that
/// source (the longest-prefix match), else dropped.
///
/// boringtun cuts the packet to its IPv4 total length without checking
/// that this covers the header (a length of 1 gave a 1-byte "packet"; found
/// by the `datagram` fuzz target); wireguard-go drops such packets, and so
/// does vane.
fn inner(
    table: &PeerTable,
    peer: &Arc<Peer>,
    len: usize,
    header: usize,
    src: std::net::IpAddr,
    counters: &Counters,
) -> Opened {
    if len < header {
        Counters::bump(&counters.invalid_datagrams);
        debug!(peer = %PeerName(&peer.public_key), len, "decrypted packet shorter than its IP header, dropped");
        return Opened::Nothing;
    }
    if table.allows_source(peer, src) {
        Opened::Tunnel { len }
    } else {
        Counters::bump(&counters.source_not_allowed);
        debug!(peer = %PeerName(&peer.public_key), %src, "inner source not in AllowedIPs, dropped");
        Opened::Nothing
    }
}

/// Opens one datagram from `from`: finds its peer (by receiver index, or
/// by static key for an initiation, after the rate limiter's MACs and load
/// check), decapsulates it, moves the peer's endpoint (roaming) and checks
/// the inner source. A data packet lands in `out[offset..]`; `out` is
/// resized as needed (no allocation once it has the capacity).
pub fn open_datagram(
    table: &PeerTable,
    datagram: &[u8],
    from: SocketAddr,
    out: &mut Vec<u8>,
    offset: usize,
    counters: &Counters,
) -> Opened {
    let Some(identity) = table.identity() else {
        return Opened::Nothing;
    };
    let peer = match Tunn::parse_incoming_packet(datagram) {
        Err(_) => {
            Counters::bump(&counters.invalid_datagrams);
            trace!(%from, len = datagram.len(), "not a WireGuard message");
            return Opened::Nothing;
        }
        Ok(Packet::HandshakeInit(init)) => {
            // The MACs and the load gate come before the expensive
            // Diffie-Hellman of identifying the initiator.
            let mut cookie = [0u8; 256];
            match identity
                .rate_limiter
                .verify_packet(Some(from.ip()), datagram, &mut cookie)
            {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    Counters::bump(&counters.cookies_sent);
                    return Opened::Cookie(cookie.to_vec());
                }
                Err(_) => {
                    Counters::bump(&counters.invalid_datagrams);
                    return Opened::Nothing;
                }
            }
            match parse_handshake_anon(&identity.secret, &identity.public, &init) {
                Ok(half) => table.peer_by_public(&half.peer_static_public),
                Err(_) => {
                    Counters::bump(&counters.invalid_datagrams);
                    return Opened::Nothing;
                }
            }
        }
        Ok(Packet::HandshakeResponse(p)) => table.peer_by_receiver(p.receiver_idx),
        Ok(Packet::PacketCookieReply(p)) => table.peer_by_receiver(p.receiver_idx),
        Ok(Packet::PacketData(p)) => table.peer_by_receiver(p.receiver_idx),
    };
    let Some(peer) = peer else {
        Counters::bump(&counters.unknown_peer);
        trace!(%from, "datagram for no known peer");
        return Opened::Nothing;
    };

    // boringtun writes at most the datagram's length (a handshake answer
    // is shorter than 148 bytes).
    out.resize(offset + datagram.len().max(148), 0);
    let opened = {
        let mut state = peer.lock();
        let opened = match state
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut out[offset..])
        {
            TunnResult::Done => Opened::Nothing,
            TunnResult::Err(e) => {
                drop(state);
                count_error(counters, peer, e, from);
                return Opened::Nothing;
            }
            TunnResult::WriteToNetwork(first) => {
                // A handshake message answered: flush what boringtun
                // queued while it had no session. Queued packets can be
                // as large as any packet, hence the large scratch buffer.
                let mut sends = vec![first.to_vec()];
                let mut scratch = vec![0u8; 65_536 + 256];
                while let TunnResult::WriteToNetwork(more) =
                    state.tunn.decapsulate(None, &[], &mut scratch)
                {
                    sends.push(more.to_vec());
                }
                Opened::Network(Arc::clone(peer), sends)
            }
            TunnResult::WriteToTunnelV4(p, src) => {
                inner(table, peer, p.len(), IPV4_HEADER, src.into(), counters)
            }
            TunnResult::WriteToTunnelV6(p, src) => {
                inner(table, peer, p.len(), IPV6_HEADER, src.into(), counters)
            }
        };
        // Authenticated: the peer is where this came from (roaming).
        if state.endpoint != Some(from) {
            debug!(peer = %PeerName(&peer.public_key), %from, "endpoint changed");
            state.endpoint = Some(from);
        }
        opened
    };
    peer.add_rx(datagram.len());
    if let Opened::Tunnel { len } = opened {
        out.truncate(offset + len);
    }
    opened
}

fn count_error(counters: &Counters, peer: &Peer, e: WireGuardError, from: SocketAddr) {
    Counters::bump(&counters.invalid_datagrams);
    trace!(peer = %PeerName(&peer.public_key), %from, error = ?e, "datagram refused");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn put(batch: &mut SendBatch<u32>, n: usize, to: &str, tag: u32) {
        let room = batch.room(n).expect("room");
        room[..n].fill(n as u8);
        batch.commit(n, addr(to), &tag);
    }

    fn shape(batch: &SendBatch<u32>) -> Vec<(usize, usize, usize)> {
        batch
            .groups()
            .map(|(g, b)| {
                assert_eq!(b.len(), g.len);
                (g.count, g.segment, g.len)
            })
            .collect()
    }

    #[test]
    fn equal_datagrams_to_one_destination_form_one_group() {
        let mut b = SendBatch::new(1 << 16, 64);
        for _ in 0..10 {
            put(&mut b, 1000, "192.0.2.1:1", 7);
        }
        put(&mut b, 300, "192.0.2.1:1", 7);
        assert_eq!(shape(&b), vec![(11, 1000, 10_300)]);
        let (g, _) = b.groups().next().unwrap();
        assert_eq!(g.segment_size(), Some(1000));
    }

    #[test]
    fn a_short_datagram_closes_its_group() {
        let mut b = SendBatch::new(1 << 16, 64);
        put(&mut b, 1000, "192.0.2.1:1", 7);
        put(&mut b, 300, "192.0.2.1:1", 7);
        put(&mut b, 300, "192.0.2.1:1", 7);
        put(&mut b, 1200, "192.0.2.1:1", 7);
        assert_eq!(
            shape(&b),
            vec![(2, 1000, 1300), (1, 300, 300), (1, 1200, 1200)]
        );
    }

    #[test]
    fn destination_peer_and_limits_split_groups() {
        let mut b = SendBatch::new(1 << 18, 3);
        put(&mut b, 100, "192.0.2.1:1", 7);
        put(&mut b, 100, "192.0.2.2:1", 7);
        put(&mut b, 100, "192.0.2.2:1", 8);
        for _ in 0..4 {
            put(&mut b, 100, "192.0.2.2:1", 8);
        }
        assert_eq!(
            shape(&b),
            vec![(1, 100, 100), (1, 100, 100), (3, 100, 300), (2, 100, 200)]
        );
        b.clear();
        assert!(b.is_empty());
        b.set_max_segments(64);
        for _ in 0..50 {
            put(&mut b, 1452, "192.0.2.1:1", 7);
        }
        let groups = shape(&b);
        assert!(groups.iter().all(|&(_, _, len)| len <= MAX_GSO_BYTES));
        assert_eq!(groups.iter().map(|g| g.0).sum::<usize>(), 50);
        assert_eq!(groups[0].0, MAX_GSO_BYTES / 1452);
    }

    /// A device with one peer (AllowedIPs 10.0.0.2/32) and a boringtun
    /// `Tunn` playing that peer, with a completed handshake.
    fn session() -> (PeerTable, Tunn, Counters) {
        use crate::model::{DeviceConfig, Key, PeerConfig};
        use boringtun::x25519::{PublicKey, StaticSecret};
        let (ours, theirs) = ([0x11u8; 32], [0x22u8; 32]);
        let mut pc = PeerConfig::new(Key::from_bytes(theirs).public_key());
        pc.add_allowed_ip("10.0.0.2/32".parse().unwrap());
        let config = DeviceConfig {
            private_key: Some(Key::from_bytes(ours)),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![pc],
        };
        let table = PeerTable::build(&PeerTable::default(), &DeviceConfig::default(), &config);
        let our_public = PublicKey::from(&StaticSecret::from(ours));
        let mut peer = Tunn::new(StaticSecret::from(theirs), our_public, None, None, 1, None);
        let counters = Counters::default();
        let mut buf = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(init) = peer.format_handshake_initiation(&mut buf, false)
        else {
            panic!("no initiation");
        };
        let init = init.to_vec();
        let mut out = Vec::new();
        let from = addr("192.0.2.2:51821");
        let Opened::Network(_, answers) =
            open_datagram(&table, &init, from, &mut out, 0, &counters)
        else {
            panic!("initiation not answered");
        };
        for a in answers {
            let _ = peer.decapsulate(Some(from.ip()), &a, &mut buf);
            while let TunnResult::WriteToNetwork(_) = peer.decapsulate(None, &[], &mut buf) {}
        }
        (table, peer, counters)
    }

    fn seal(peer: &mut Tunn, packet: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; packet.len() + 64];
        match peer.encapsulate(packet, &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("not sealed"),
        }
    }

    /// An IPv4 header from 10.0.0.2 to 10.0.0.1 with `total` as its total
    /// length, and a payload.
    fn ipv4(total: u16) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
        ];
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p.extend_from_slice(b"hello");
        p
    }

    #[test]
    fn a_packet_shorter_than_its_ip_header_is_dropped_and_counted() {
        // The input the datagram fuzz target found: an IPv4 total length
        // of 1 made boringtun hand over a 1-byte packet.
        let (table, mut peer, counters) = session();
        let from = addr("192.0.2.2:51821");
        let mut out = Vec::new();
        let d = seal(&mut peer, &ipv4(1));
        let o = open_datagram(&table, &d, from, &mut out, 16, &counters);
        assert!(matches!(o, Opened::Nothing));
        assert_eq!(counters.invalid_datagrams.load(Ordering::Relaxed), 1);
        // A whole packet passes; replayed, it is refused and counted.
        let d = seal(&mut peer, &ipv4(25));
        let o = open_datagram(&table, &d, from, &mut out, 16, &counters);
        assert!(matches!(o, Opened::Tunnel { len: 25 }));
        assert_eq!(&out[16..], &ipv4(25)[..]);
        let o = open_datagram(&table, &d, from, &mut out, 16, &counters);
        assert!(matches!(o, Opened::Nothing));
        assert_eq!(counters.invalid_datagrams.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_full_buffer_has_no_room() {
        let mut b: SendBatch<u32> = SendBatch::new(1000, 64);
        assert!(b.room(room_for(1000)).is_none());
        assert!(b.room(room_for(100)).is_some());
        put(&mut b, 900, "192.0.2.1:1", 1);
        assert!(b.room(148).is_none());
        assert!(b.room(100).is_some());
    }
}
