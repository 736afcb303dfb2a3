//! The device: the I/O shell that moves packets between the TUN device and
//! the UDP socket, and applies configuration changes.
//!
//! Three loops run on tokio: TUN -> encapsulate -> UDP, UDP -> decapsulate ->
//! TUN, and the timers (handshake retries, keepalives, rekeying, the rate
//! limiter's reset). The decisions (which peer, whether a source is allowed)
//! are the peer table's; this module only does the reading and writing.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, trace, warn};
use tun_rs::AsyncDevice;

use crate::model::{DeviceConfig, Key, PeerName};
use crate::peers::{Peer, PeerTable};
use crate::uapi::{self, UapiError};
use crate::uapi_server::UapiHandler;

/// Largest datagram or packet handled: an IP packet is at most 64 KiB.
const BUF_LEN: usize = 65_536 + 256;
/// How often boringtun's timers are driven (as boringtun's own device does).
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Counters of what was dropped and why, for the log and for tests.
#[derive(Default)]
pub struct Counters {
    /// Datagrams that are not WireGuard messages, or fail authentication.
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
    fn bump(c: &AtomicU64) {
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

/// The state a configuration change replaces as a whole.
struct Active {
    config: DeviceConfig,
    table: Arc<PeerTable>,
}

/// One WireGuard interface.
pub struct Device {
    tun: Arc<AsyncDevice>,
    active: Mutex<Active>,
    /// A lock-cheap copy of `active.table` for the data path.
    table: RwLock<Arc<PeerTable>>,
    socket: RwLock<Arc<Bound>>,
    socket_changed: watch::Sender<Arc<Bound>>,
    pub counters: Counters,
}

impl Device {
    /// Creates the device around an open TUN device, binds its UDP socket
    /// and applies `config`.
    pub fn new(tun: AsyncDevice, config: DeviceConfig) -> io::Result<Arc<Device>> {
        let socket = bind_udp(config.listen_port, config.fwmark)?;
        Ok(Device::with_socket(tun, socket, config))
    }

    /// Creates the device around an open TUN device and a UDP socket that
    /// someone else bound (vaned hands the tunnel a socket it bound and
    /// marked). `config.listen_port` and `config.fwmark` should describe
    /// that socket, so that a `set` naming the same port and mark does not
    /// rebind.
    pub fn with_socket(tun: AsyncDevice, socket: Bound, config: DeviceConfig) -> Arc<Device> {
        let socket = Arc::new(socket);
        let table = Arc::new(PeerTable::build(
            &PeerTable::default(),
            &DeviceConfig::default(),
            &config,
        ));
        let (socket_changed, _) = watch::channel(Arc::clone(&socket));
        Arc::new(Device {
            tun: Arc::new(tun),
            active: Mutex::new(Active {
                config,
                table: Arc::clone(&table),
            }),
            table: RwLock::new(table),
            socket: RwLock::new(socket),
            socket_changed,
            counters: Counters::default(),
        })
    }

    pub fn tun(&self) -> &AsyncDevice {
        &self.tun
    }

    fn table(&self) -> Arc<PeerTable> {
        Arc::clone(&self.table.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn socket(&self) -> Arc<Bound> {
        Arc::clone(&self.socket.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn active(&self) -> std::sync::MutexGuard<'_, Active> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The actual UDP port (the configured one, or the one the kernel chose).
    pub fn listen_port(&self) -> u16 {
        self.socket().port
    }

    pub fn config(&self) -> DeviceConfig {
        self.active().config.clone()
    }

    /// Replaces the configuration. Everything that can fail (binding a new
    /// port, setting the mark) is done before anything is committed, so a
    /// refused change leaves the old configuration in force.
    pub fn reconfigure(&self, new: DeviceConfig) -> Result<(), UapiError> {
        self.update(|_| Ok(new))
    }

    /// Computes the new configuration from the one in force and applies
    /// it, under one lock: concurrent changes are serialised, none is lost.
    pub fn update(
        &self,
        change: impl FnOnce(&DeviceConfig) -> Result<DeviceConfig, UapiError>,
    ) -> Result<(), UapiError> {
        let mut active = self.active();
        let new = change(&active.config)?;
        let bound_port = self.listen_port();
        let port_changed = new.listen_port != active.config.listen_port
            && !(new.listen_port != 0 && new.listen_port == bound_port);
        let new_socket = if port_changed || new.fwmark != active.config.fwmark {
            if port_changed {
                Some(Arc::new(bind_udp(new.listen_port, new.fwmark).map_err(
                    |e| UapiError::Device {
                        errno: e.raw_os_error().unwrap_or(libc::EIO),
                        reason: format!("cannot bind UDP port {}: {e}", new.listen_port),
                    },
                )?))
            } else {
                set_mark(&self.socket().socket, new.fwmark).map_err(|e| UapiError::Device {
                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                    reason: format!("cannot set fwmark {}: {e}", new.fwmark),
                })?;
                None
            }
        } else {
            None
        };
        let table = Arc::new(PeerTable::build(&active.table, &active.config, &new));
        if let Some(socket) = new_socket {
            *self.socket.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&socket);
            self.socket_changed.send_replace(socket);
        }
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&table);
        active.table = table;
        active.config = new;
        debug!(
            peers = active.config.peers.len(),
            port = self.listen_port(),
            "configuration applied"
        );
        Ok(())
    }

    /// Runs the data path until the returned future is dropped or an I/O
    /// error on the TUN device ends it.
    pub async fn run(self: Arc<Self>) -> io::Result<()> {
        let tun_task = tokio::spawn(Arc::clone(&self).tun_loop());
        let udp_task = tokio::spawn(Arc::clone(&self).udp_loop());
        let timer_task = tokio::spawn(Arc::clone(&self).timer_loop());
        let _abort = AbortOnDrop(vec![
            tun_task.abort_handle(),
            udp_task.abort_handle(),
            timer_task.abort_handle(),
        ]);
        tokio::select! {
            r = tun_task => r.map_err(io::Error::other)?,
            r = udp_task => r.map_err(io::Error::other)?,
            r = timer_task => r.map_err(io::Error::other)?,
        }
    }

    /// TUN -> peer by destination -> encapsulate -> UDP.
    async fn tun_loop(self: Arc<Self>) -> io::Result<()> {
        let mut src = vec![0u8; BUF_LEN];
        let mut dst = vec![0u8; BUF_LEN + 32];
        loop {
            let n = self.tun.recv(&mut src).await?;
            let packet = &src[..n];
            let Some(addr) = Tunn::dst_address(packet) else {
                continue;
            };
            let table = self.table();
            let Some(peer) = table.route(addr) else {
                Counters::bump(&self.counters.no_route);
                trace!(%addr, "no peer for destination");
                continue;
            };
            let (out, endpoint) = {
                let mut state = peer.lock();
                let endpoint = state.endpoint;
                match state.tunn.encapsulate(packet, &mut dst) {
                    TunnResult::WriteToNetwork(out) => (out.len(), endpoint),
                    TunnResult::Err(e) => {
                        debug!(peer = %PeerName(&peer.public_key), error = ?e, "encapsulate failed");
                        continue;
                    }
                    _ => continue,
                }
            };
            self.send_to_peer(peer, &dst[..out], endpoint).await;
        }
    }

    async fn send_to_peer(&self, peer: &Peer, datagram: &[u8], endpoint: Option<SocketAddr>) {
        let Some(endpoint) = endpoint else {
            Counters::bump(&self.counters.no_endpoint);
            trace!(peer = %PeerName(&peer.public_key), "no endpoint, dropped");
            return;
        };
        let bound = self.socket();
        match bound
            .socket
            .send_to(datagram, bound.destination(endpoint))
            .await
        {
            Ok(_) => peer.add_tx(datagram.len()),
            Err(e) => debug!(%endpoint, error = %e, "send failed"),
        }
    }

    /// UDP -> peer by index or static key -> decapsulate -> TUN.
    async fn udp_loop(self: Arc<Self>) -> io::Result<()> {
        let mut buf = vec![0u8; BUF_LEN];
        let mut out = vec![0u8; BUF_LEN];
        let mut changes = self.socket_changed.subscribe();
        let mut socket = self.socket();
        loop {
            let received = tokio::select! {
                r = socket.socket.recv_from(&mut buf) => r,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    socket = Arc::clone(&changes.borrow_and_update());
                    continue;
                }
            };
            let (n, from) = match received {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors surface as ECONNREFUSED and the like on
                    // an unconnected UDP socket; they end nothing.
                    trace!(error = %e, "recv_from");
                    continue;
                }
            };
            let from = canonical(from);
            self.handle_datagram(&buf[..n], from, &mut out).await;
        }
    }

    async fn handle_datagram(&self, datagram: &[u8], from: SocketAddr, out: &mut [u8]) {
        let table = self.table();
        let Some(identity) = table.identity() else {
            return;
        };
        let peer = match Tunn::parse_incoming_packet(datagram) {
            Err(_) => {
                Counters::bump(&self.counters.invalid_datagrams);
                trace!(%from, len = datagram.len(), "not a WireGuard message");
                return;
            }
            Ok(Packet::HandshakeInit(init)) => {
                // The MACs and the load gate come before the expensive
                // Diffie-Hellman of identifying the initiator.
                match identity
                    .rate_limiter
                    .verify_packet(Some(from.ip()), datagram, out)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        Counters::bump(&self.counters.cookies_sent);
                        let cookie = cookie.to_vec();
                        let bound = self.socket();
                        let _ = bound.socket.send_to(&cookie, bound.destination(from)).await;
                        return;
                    }
                    Err(_) => {
                        Counters::bump(&self.counters.invalid_datagrams);
                        return;
                    }
                }
                match parse_handshake_anon(&identity.secret, &identity.public, &init) {
                    Ok(half) => table.peer_by_public(&half.peer_static_public),
                    Err(_) => {
                        Counters::bump(&self.counters.invalid_datagrams);
                        return;
                    }
                }
            }
            Ok(Packet::HandshakeResponse(p)) => table.peer_by_receiver(p.receiver_idx),
            Ok(Packet::PacketCookieReply(p)) => table.peer_by_receiver(p.receiver_idx),
            Ok(Packet::PacketData(p)) => table.peer_by_receiver(p.receiver_idx),
        };
        let Some(peer) = peer else {
            Counters::bump(&self.counters.unknown_peer);
            trace!(%from, "datagram for no known peer");
            return;
        };
        let peer = Arc::clone(peer);

        // Decapsulate under the peer's lock; what has to be sent back is
        // collected and sent after the lock is released.
        enum Outcome {
            Nothing,
            ToTunnel(usize, IpAddr),
            ToNetwork(Vec<Vec<u8>>),
        }
        let outcome = {
            let mut state = peer.lock();
            let outcome = match state.tunn.decapsulate(Some(from.ip()), datagram, out) {
                TunnResult::Done => Outcome::Nothing,
                TunnResult::Err(e) => {
                    drop(state);
                    self.count_error(&peer, e, from);
                    return;
                }
                TunnResult::WriteToNetwork(first) => {
                    // A handshake message answered: flush what boringtun
                    // queued while it had no session.
                    let mut sends = vec![first.to_vec()];
                    while let TunnResult::WriteToNetwork(more) =
                        state.tunn.decapsulate(None, &[], out)
                    {
                        sends.push(more.to_vec());
                    }
                    Outcome::ToNetwork(sends)
                }
                TunnResult::WriteToTunnelV4(p, src) => Outcome::ToTunnel(p.len(), src.into()),
                TunnResult::WriteToTunnelV6(p, src) => Outcome::ToTunnel(p.len(), src.into()),
            };
            // Authenticated: the peer is where this came from (roaming).
            if state.endpoint != Some(from) {
                debug!(peer = %PeerName(&peer.public_key), %from, "endpoint changed");
                state.endpoint = Some(from);
            }
            outcome
        };
        peer.add_rx(datagram.len());
        match outcome {
            Outcome::Nothing => {}
            Outcome::ToNetwork(sends) => {
                for s in sends {
                    self.send_to_peer(&peer, &s, Some(from)).await;
                }
            }
            Outcome::ToTunnel(len, src) => {
                if !table.allows_source(&peer, src) {
                    Counters::bump(&self.counters.source_not_allowed);
                    debug!(peer = %PeerName(&peer.public_key), %src, "inner source not in AllowedIPs, dropped");
                    return;
                }
                if let Err(e) = self.tun.send(&out[..len]).await {
                    debug!(error = %e, "write to TUN failed");
                }
            }
        }
    }

    fn count_error(&self, peer: &Peer, e: WireGuardError, from: SocketAddr) {
        Counters::bump(&self.counters.invalid_datagrams);
        trace!(peer = %PeerName(&peer.public_key), %from, error = ?e, "datagram refused");
    }

    /// Drives every peer's timers: handshake (re)tries, keepalives,
    /// rekeying, session expiry; and resets the handshake rate limiter.
    async fn timer_loop(self: Arc<Self>) -> io::Result<()> {
        let mut out = vec![0u8; BUF_LEN];
        let mut tick = tokio::time::interval(TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let table = self.table();
            if let Some(identity) = table.identity() {
                identity.rate_limiter.reset_count();
            }
            for peer in table.peers() {
                let (len, endpoint) = {
                    let mut state = peer.lock();
                    let endpoint = state.endpoint;
                    match state.tunn.update_timers(&mut out) {
                        TunnResult::WriteToNetwork(p) => (p.len(), endpoint),
                        TunnResult::Err(WireGuardError::ConnectionExpired) => {
                            trace!(peer = %PeerName(&peer.public_key), "session expired");
                            continue;
                        }
                        TunnResult::Err(e) => {
                            debug!(peer = %PeerName(&peer.public_key), error = ?e, "timer");
                            continue;
                        }
                        _ => continue,
                    }
                };
                self.send_to_peer(peer, &out[..len], endpoint).await;
            }
        }
    }

    /// The configuration with every peer's current (possibly roamed)
    /// endpoint, as the userspace API reports it.
    fn live_config(&self) -> (DeviceConfig, Arc<PeerTable>) {
        let active = self.active();
        let mut config = active.config.clone();
        for peer in &mut config.peers {
            if let Some(p) = active.table.peer_by_key(&peer.public_key) {
                peer.endpoint = p.endpoint().or(peer.endpoint);
            }
        }
        (config, Arc::clone(&active.table))
    }
}

impl UapiHandler for Device {
    fn get(&self) -> String {
        let (config, table) = self.live_config();
        uapi::format_get(&config, self.listen_port(), |key: &Key| {
            table
                .peer_by_key(key)
                .map(|p| p.stats())
                .unwrap_or_default()
        })
    }

    fn set(&self, body: &str) -> Result<(), UapiError> {
        // Parsed and validated against the configuration in force, then
        // applied whole; a concurrent set waits for this one.
        self.update(|current| uapi::apply_set(current, body))
    }
}

/// The UDP socket and what the data path needs to know of it without a
/// system call.
pub struct Bound {
    pub socket: UdpSocket,
    /// The bound port (the kernel's choice when 0 was asked for).
    pub port: u16,
    dual_stack: bool,
}

impl Bound {
    /// The destination as the socket needs it: IPv4 as mapped IPv6 on the
    /// dual-stack socket.
    fn destination(&self, addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        }
    }
}

/// Binds the dual-stack UDP socket (IPv4 and IPv6 outer transport on one
/// port), falling back to IPv4 only where IPv6 is disabled.
pub fn bind_udp(port: u16, fwmark: u32) -> io::Result<Bound> {
    Bound::from_std(bind_udp_std(port, fwmark)?)
}

impl Bound {
    /// Takes a bound UDP socket (blocking or not) into the runtime.
    pub fn from_std(socket: std::net::UdpSocket) -> io::Result<Bound> {
        socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(socket)?;
        let local = socket.local_addr()?;
        Ok(Bound {
            socket,
            port: local.port(),
            dual_stack: local.is_ipv6(),
        })
    }
}

/// [`bind_udp`] without the runtime: what vaned binds and hands over.
pub fn bind_udp_std(port: u16, fwmark: u32) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
        Ok(s) => {
            s.set_only_v6(false)?;
            s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
            s
        }
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            warn!("IPv6 is not available, the tunnel uses IPv4 transport only");
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            s
        }
        Err(e) => return Err(e),
    };
    if fwmark != 0 {
        socket.set_mark(fwmark)?;
    }
    // Room for bursts while the TUN side is busy (wireguard-go asks for
    // 7 MiB). The plain options are capped at net.core.[rw]mem_max; with
    // CAP_NET_ADMIN the force variants are not, so try those first.
    const SOCKET_BUFFER: usize = 4 << 20;
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    }
    Ok(socket.into())
}

fn set_mark(socket: &UdpSocket, fwmark: u32) -> io::Result<()> {
    socket2::SockRef::from(socket).set_mark(fwmark)
}

/// IPv4-mapped IPv6 source addresses (from the dual-stack socket) as plain
/// IPv4, so endpoints read as wg(8) users expect.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}
