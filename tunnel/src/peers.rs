//! The peer table: cryptokey routing and per-peer protocol state.
//!
//! Plain data, no I/O: the device shell asks it which peer a packet belongs
//! to (by inner destination address for packets from the TUN device, by
//! receiver index or handshake static key for datagrams from the network),
//! and swaps in a new table when the configuration changes.
//!
//! A [`PeerTable`] is immutable once built; the per-peer protocol state
//! (boringtun's `Tunn`, the current endpoint) sits behind one mutex per
//! peer, so the table itself can be shared by the receive and send paths
//! without a lock and replaced as a whole by a reconfiguration.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

use crate::model::{DeviceConfig, Key, PeerConfig, PeerStats};

/// Handshake messages a second before the device answers with cookies
/// instead of doing the Diffie-Hellman work. Each handshake message is
/// counted twice (once by the table's gate, once inside `Tunn`), so this is
/// twice the effective limit.
const HANDSHAKE_RATE_LIMIT: u64 = 200;

/// Receiver indices are 24 bits: boringtun shifts them left by 8 and uses
/// the low byte for the session.
const INDEX_MASK: u32 = 0x00ff_ffff;

/// Our own static key pair and the rate limiter bound to it.
pub struct Identity {
    pub secret: StaticSecret,
    pub public: PublicKey,
    pub rate_limiter: Arc<RateLimiter>,
}

impl Identity {
    fn new(private: &Key) -> Self {
        let secret = StaticSecret::from(*private.as_bytes());
        let public = PublicKey::from(&secret);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Identity {
            secret,
            public,
            rate_limiter,
        }
    }
}

/// One peer: what never changes while it exists, and its mutable state.
pub struct Peer {
    pub public_key: Key,
    /// The 24-bit local index; datagrams addressed to it carry it (shifted)
    /// as receiver index.
    pub index: u32,
    preshared_key: Option<Key>,
    persistent_keepalive: u16,
    state: Mutex<PeerState>,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
}

/// The part of a peer that the data path changes.
pub struct PeerState {
    pub tunn: Tunn,
    /// Where its datagrams go; moves to the source of every authenticated
    /// datagram (roaming).
    pub endpoint: Option<SocketAddr>,
}

impl Peer {
    fn new(identity: &Identity, config: &PeerConfig, index: u32) -> Self {
        let tunn = Tunn::new(
            identity.secret.clone(),
            PublicKey::from(*config.public_key.as_bytes()),
            config.preshared_key.as_ref().map(|k| *k.as_bytes()),
            (config.persistent_keepalive != 0).then_some(config.persistent_keepalive),
            index,
            Some(Arc::clone(&identity.rate_limiter)),
        );
        Peer {
            public_key: config.public_key.clone(),
            index,
            preshared_key: config.preshared_key.clone(),
            persistent_keepalive: config.persistent_keepalive,
            state: Mutex::new(PeerState {
                tunn,
                endpoint: config.endpoint,
            }),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
        }
    }

    /// Locks the peer's protocol state. A panic while holding the lock can
    /// only come from a bug in this process; the state is still usable
    /// (boringtun keeps its invariants per call), so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add_rx(&self, bytes: usize) {
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn add_tx(&self, bytes: usize) {
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn stats(&self) -> PeerStats {
        let since = self.lock().tunn.time_since_last_handshake();
        PeerStats {
            last_handshake: since.and_then(|d| SystemTime::now().checked_sub(d)),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
        }
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.lock().endpoint
    }

    /// Whether this peer can carry on under `config` without new protocol
    /// state (the keys and the keepalive are fixed at `Tunn` creation).
    fn compatible(&self, config: &PeerConfig) -> bool {
        self.public_key == config.public_key
            && self.preshared_key == config.preshared_key
            && self.persistent_keepalive == config.persistent_keepalive
    }
}

/// The immutable routing view of one configuration.
#[derive(Default)]
pub struct PeerTable {
    identity: Option<Arc<Identity>>,
    private_key: Option<Key>,
    peers: Vec<Arc<Peer>>,
    v4: PrefixMap<Ipv4Net, usize>,
    v6: PrefixMap<Ipv6Net, usize>,
    by_index: HashMap<u32, usize>,
    by_key: HashMap<[u8; 32], usize>,
    next_index: u32,
}

impl PeerTable {
    /// Builds the table for `config`, keeping the protocol state (sessions,
    /// counters, roamed endpoint) of every peer of `old` that `config` keeps
    /// unchanged in what that state depends on.
    ///
    /// `prev_config` is the configuration `old` was built from: an endpoint
    /// that the new configuration sets differently replaces the roamed one,
    /// an endpoint it leaves as it was does not.
    pub fn build(old: &PeerTable, prev_config: &DeviceConfig, config: &DeviceConfig) -> PeerTable {
        let same_identity = old.private_key == config.private_key;
        let identity = if same_identity {
            old.identity.clone()
        } else {
            config
                .private_key
                .as_ref()
                .map(|k| Arc::new(Identity::new(k)))
        };
        let mut table = PeerTable {
            identity: identity.clone(),
            private_key: config.private_key.clone(),
            next_index: old.next_index,
            ..PeerTable::default()
        };
        if table.next_index == 0 {
            table.next_index = random_index();
        }
        let Some(identity) = identity else {
            // Without a private key there is no protocol state: the peers
            // stay in the configuration (wg show lists them) but the table
            // routes nothing, as in wireguard-go.
            return table;
        };
        for peer_cfg in &config.peers {
            let reused = if same_identity {
                old.peer_by_key(&peer_cfg.public_key)
                    .filter(|p| p.compatible(peer_cfg))
                    .cloned()
            } else {
                None
            };
            let peer = match reused {
                Some(peer) => {
                    let prev_endpoint = prev_config
                        .peer(&peer_cfg.public_key)
                        .and_then(|p| p.endpoint);
                    if peer_cfg.endpoint != prev_endpoint && peer_cfg.endpoint.is_some() {
                        peer.lock().endpoint = peer_cfg.endpoint;
                    }
                    peer
                }
                None => {
                    let index = table.allocate_index(old);
                    Arc::new(Peer::new(&identity, peer_cfg, index))
                }
            };
            table.insert(peer, peer_cfg);
        }
        table
    }

    fn allocate_index(&mut self, old: &PeerTable) -> u32 {
        loop {
            let candidate = self.next_index & INDEX_MASK;
            self.next_index = (self.next_index.wrapping_add(1)) & INDEX_MASK;
            if candidate == 0 {
                continue;
            }
            if !self.by_index.contains_key(&candidate) && !old.by_index.contains_key(&candidate) {
                return candidate;
            }
        }
    }

    fn insert(&mut self, peer: Arc<Peer>, config: &PeerConfig) {
        let slot = self.peers.len();
        for net in &config.allowed_ips {
            // A prefix listed by two peers belongs to the later one, as in
            // wireguard-go (the later `allowed_ip` moves it).
            match net {
                IpNet::V4(n) => {
                    self.v4.insert(*n, slot);
                }
                IpNet::V6(n) => {
                    self.v6.insert(*n, slot);
                }
            }
        }
        self.by_index.insert(peer.index, slot);
        self.by_key.insert(*peer.public_key.as_bytes(), slot);
        self.peers.push(peer);
    }

    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_deref()
    }

    pub fn peers(&self) -> &[Arc<Peer>] {
        &self.peers
    }

    pub fn peer_by_key(&self, key: &Key) -> Option<&Arc<Peer>> {
        self.by_key.get(key.as_bytes()).map(|&i| &self.peers[i])
    }

    pub fn peer_by_public(&self, key: &[u8; 32]) -> Option<&Arc<Peer>> {
        self.by_key.get(key).map(|&i| &self.peers[i])
    }

    /// The peer a datagram with this receiver index is for.
    pub fn peer_by_receiver(&self, receiver_idx: u32) -> Option<&Arc<Peer>> {
        self.by_index
            .get(&(receiver_idx >> 8))
            .map(|&i| &self.peers[i])
    }

    fn slot_for(&self, addr: IpAddr) -> Option<usize> {
        match addr {
            IpAddr::V4(a) => self.v4.get_lpm(&Ipv4Net::from(a)).map(|(_, &slot)| slot),
            IpAddr::V6(a) => self.v6.get_lpm(&Ipv6Net::from(a)).map(|(_, &slot)| slot),
        }
    }

    /// Cryptokey routing: the peer whose AllowedIPs hold `dst` by longest
    /// prefix.
    pub fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.slot_for(dst).map(|i| &self.peers[i])
    }

    /// Whether `peer` may send packets with inner source `src` (the
    /// longest-prefix owner of `src` must be that very peer).
    pub fn allows_source(&self, peer: &Peer, src: IpAddr) -> bool {
        self.slot_for(src)
            .is_some_and(|i| self.peers[i].index == peer.index)
    }
}

fn random_index() -> u32 {
    use rand_core::RngCore;
    (rand_core::OsRng.next_u32() & INDEX_MASK).max(1)
}

/// Seconds elapsed as wg(8) expects them in `last_handshake_time_*`.
pub fn unix_time(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::generate_private()
    }

    fn peer_cfg(public: &Key, ips: &[&str]) -> PeerConfig {
        let mut p = PeerConfig::new(public.clone());
        for ip in ips {
            p.add_allowed_ip(ip.parse().unwrap());
        }
        p
    }

    fn config(peers: Vec<PeerConfig>) -> DeviceConfig {
        DeviceConfig {
            private_key: Some(key()),
            listen_port: 0,
            fwmark: 0,
            peers,
        }
    }

    #[test]
    fn longest_prefix_wins_v4_and_v6() {
        let (a, b) = (key().public_key(), key().public_key());
        let cfg = config(vec![
            peer_cfg(&a, &["10.0.0.0/8", "fd00::/16"]),
            peer_cfg(&b, &["10.1.0.0/16", "fd00:1::/32"]),
        ]);
        let t = PeerTable::build(&PeerTable::default(), &DeviceConfig::default(), &cfg);
        let route = |s: &str| t.route(s.parse().unwrap()).map(|p| p.public_key.clone());
        assert_eq!(route("10.2.3.4"), Some(a.clone()));
        assert_eq!(route("10.1.3.4"), Some(b.clone()));
        assert_eq!(route("11.0.0.1"), None);
        assert_eq!(route("fd00:2::1"), Some(a.clone()));
        assert_eq!(route("fd00:1::1"), Some(b.clone()));
        assert_eq!(route("fe80::1"), None);
    }

    #[test]
    fn source_check_requires_the_longest_prefix_owner() {
        let (a, b) = (key().public_key(), key().public_key());
        let cfg = config(vec![
            peer_cfg(&a, &["10.0.0.0/8"]),
            peer_cfg(&b, &["10.1.0.0/16"]),
        ]);
        let t = PeerTable::build(&PeerTable::default(), &DeviceConfig::default(), &cfg);
        let pa = t.peer_by_key(&a).unwrap();
        let pb = t.peer_by_key(&b).unwrap();
        assert!(t.allows_source(pa, "10.9.0.1".parse().unwrap()));
        assert!(!t.allows_source(pa, "10.1.0.1".parse().unwrap()));
        assert!(t.allows_source(pb, "10.1.0.1".parse().unwrap()));
        assert!(!t.allows_source(pb, "192.168.0.1".parse().unwrap()));
    }

    #[test]
    fn receiver_index_finds_the_peer() {
        let (a, b) = (key().public_key(), key().public_key());
        let cfg = config(vec![peer_cfg(&a, &[]), peer_cfg(&b, &[])]);
        let t = PeerTable::build(&PeerTable::default(), &DeviceConfig::default(), &cfg);
        let pb = t.peer_by_key(&b).unwrap();
        let found = t.peer_by_receiver((pb.index << 8) | 3).unwrap();
        assert_eq!(found.public_key, b);
        assert_ne!(t.peer_by_key(&a).unwrap().index, pb.index);
    }

    #[test]
    fn unchanged_peers_keep_their_state_across_rebuilds() {
        let (a, b) = (key().public_key(), key().public_key());
        let cfg1 = config(vec![peer_cfg(&a, &["10.0.0.0/8"]), peer_cfg(&b, &[])]);
        let t1 = PeerTable::build(&PeerTable::default(), &DeviceConfig::default(), &cfg1);
        let roamed: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        t1.peer_by_key(&a).unwrap().lock().endpoint = Some(roamed);
        t1.peer_by_key(&a).unwrap().add_rx(100);

        // Change only b's keepalive and a's allowed IPs.
        let mut cfg2 = cfg1.clone();
        cfg2.peers[0].add_allowed_ip("172.16.0.0/12".parse().unwrap());
        cfg2.peers[1].persistent_keepalive = 25;
        let t2 = PeerTable::build(&t1, &cfg1, &cfg2);
        let a2 = t2.peer_by_key(&a).unwrap();
        assert!(Arc::ptr_eq(a2, t1.peer_by_key(&a).unwrap()));
        assert_eq!(a2.endpoint(), Some(roamed), "roamed endpoint kept");
        assert_eq!(a2.stats().rx_bytes, 100);
        assert!(!Arc::ptr_eq(
            t2.peer_by_key(&b).unwrap(),
            t1.peer_by_key(&b).unwrap()
        ));
        assert_eq!(
            t2.route("172.16.1.1".parse().unwrap()).unwrap().public_key,
            a
        );

        // An endpoint set by configuration replaces the roamed one.
        let mut cfg3 = cfg2.clone();
        let set: SocketAddr = "198.51.100.7:51820".parse().unwrap();
        cfg3.peers[0].endpoint = Some(set);
        let t3 = PeerTable::build(&t2, &cfg2, &cfg3);
        assert_eq!(t3.peer_by_key(&a).unwrap().endpoint(), Some(set));

        // A new private key makes new protocol state for everyone.
        let mut cfg4 = cfg3.clone();
        cfg4.private_key = Some(key());
        let t4 = PeerTable::build(&t3, &cfg3, &cfg4);
        assert!(!Arc::ptr_eq(
            t4.peer_by_key(&a).unwrap(),
            t3.peer_by_key(&a).unwrap()
        ));
    }

    #[test]
    fn no_private_key_routes_nothing() {
        let a = key().public_key();
        let mut cfg = config(vec![peer_cfg(&a, &["0.0.0.0/0"])]);
        cfg.private_key = None;
        let t = PeerTable::build(&PeerTable::default(), &DeviceConfig::default(), &cfg);
        assert!(t.identity().is_none());
        assert!(t.route("1.2.3.4".parse().unwrap()).is_none());
    }

    #[test]
    fn a_handshake_between_two_tables_establishes_a_session() {
        // Two devices' tables, wired back to back without sockets.
        let (ka, kb) = (key(), key());
        let mut ca = DeviceConfig {
            private_key: Some(ka.clone()),
            ..Default::default()
        };
        ca.peers.push(peer_cfg(&kb.public_key(), &["10.0.0.2/32"]));
        let mut cb = DeviceConfig {
            private_key: Some(kb.clone()),
            ..Default::default()
        };
        cb.peers.push(peer_cfg(&ka.public_key(), &["10.0.0.1/32"]));
        let ta = PeerTable::build(&PeerTable::default(), &DeviceConfig::default(), &ca);
        let tb = PeerTable::build(&PeerTable::default(), &DeviceConfig::default(), &cb);

        let mut buf = vec![0u8; 2048];
        let pa = ta.route("10.0.0.2".parse().unwrap()).unwrap();
        let init = match pa.lock().tunn.encapsulate(&[0x45; 40], &mut buf) {
            boringtun::noise::TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("expected a handshake initiation, got {other:?}"),
        };
        // B identifies the initiator by its static key.
        let parsed = Tunn::parse_incoming_packet(&init).unwrap();
        let boringtun::noise::Packet::HandshakeInit(hs) = parsed else {
            panic!("not an initiation")
        };
        let idb = tb.identity().unwrap();
        let half = boringtun::noise::handshake::parse_handshake_anon(&idb.secret, &idb.public, &hs)
            .unwrap();
        let pb = tb.peer_by_public(&half.peer_static_public).unwrap();
        assert_eq!(pb.public_key, ka.public_key());
    }

    #[test]
    fn under_handshake_load_initiators_get_cookies_and_then_pass() {
        let (ka, kb) = (key(), key());
        let mut cb = DeviceConfig {
            private_key: Some(kb.clone()),
            ..Default::default()
        };
        cb.peers.push(peer_cfg(&ka.public_key(), &[]));
        let tb = PeerTable::build(&PeerTable::default(), &DeviceConfig::default(), &cb);
        let gate = &tb.identity().unwrap().rate_limiter;
        // The initiator: A's view of B.
        let mut a = Tunn::new(
            StaticSecret::from(*ka.as_bytes()),
            PublicKey::from(*kb.public_key().as_bytes()),
            None,
            None,
            1,
            None,
        );
        let from: IpAddr = "192.0.2.9".parse().unwrap();
        let mut buf = vec![0u8; 2048];
        let mut out = vec![0u8; 2048];
        let mut cookie = None;
        for _ in 0..(HANDSHAKE_RATE_LIMIT + 5) {
            let init = match a.format_handshake_initiation(&mut buf, true) {
                boringtun::noise::TunnResult::WriteToNetwork(p) => p.to_vec(),
                other => panic!("{other:?}"),
            };
            if let Err(boringtun::noise::TunnResult::WriteToNetwork(c)) =
                gate.verify_packet(Some(from), &init, &mut out)
            {
                cookie = Some(c.to_vec());
                break;
            }
        }
        let cookie = cookie.expect("no cookie reply under load");
        assert_eq!(cookie.len(), 64);
        // The initiator takes the cookie; its next initiation carries a
        // valid mac2 and passes the gate although the load persists.
        assert!(matches!(
            a.decapsulate(Some("192.0.2.1".parse().unwrap()), &cookie, &mut buf),
            boringtun::noise::TunnResult::Done
        ));
        let init = match a.format_handshake_initiation(&mut buf, true) {
            boringtun::noise::TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("{other:?}"),
        };
        assert!(gate.verify_packet(Some(from), &init, &mut out).is_ok());
        // From another address the same message does not pass.
        assert!(gate
            .verify_packet(Some("198.51.100.1".parse().unwrap()), &init, &mut out)
            .is_err());
    }
}
