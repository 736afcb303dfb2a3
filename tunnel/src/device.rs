//! The device: the I/O shell that moves packets between the TUN device and
//! the UDP socket, and applies configuration changes.
//!
//! A worker waits in one epoll set holding the TUN device (TUN ->
//! encapsulate -> UDP) and the UDP socket (UDP -> decapsulate -> TUN), and
//! hands a side to a helper thread when both are busy; a third thread
//! drives the timers (handshake retries, keepalives,
//! rekeying, the rate limiter's reset). The decisions (which peer, whether a source is allowed)
//! are the peer table's; this module only does the reading and writing.

use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsFd;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tracing::{debug, info, trace, warn};
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::batch::{encapsulate_packets, open_datagram, Counters, Opened, SendBatch};
use crate::clock::{read_clocks, ClockWatch};
use crate::model::{DeviceConfig, Key, PeerName};
use crate::peers::{Peer, PeerTable};
use crate::uapi::{self, UapiError};
use crate::uapi_server::UapiHandler;

/// Largest datagram or packet handled: an IP packet is at most 64 KiB.
const BUF_LEN: usize = 65_536 + 256;
/// Where a packet for the TUN device starts in its buffer: room for the
/// virtio-net header tun-rs writes in front of it.
const TUN_OFFSET: usize = VIRTIO_NET_HDR_LEN;
/// The encryption buffer of the TUN loop: one read's worth of packets
/// (64 KiB split into segments, each grown by WireGuard's 32 bytes and
/// padding, and its own headers).
const SEND_BATCH_BYTES: usize = 256 * 1024;
/// Packets decrypted before they are written to the TUN device (and GRO
/// merges them). Each buffer can grow to 64 KiB when it heads a merged
/// run, so this bounds the resident set too.
const TUN_WRITE_BATCH: usize = 64;
/// How often boringtun's timers are driven (as boringtun's own device does).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Forced handshakes (a wake, another network) at most this often.
const FORCED_HANDSHAKE_GAP: Duration = Duration::from_secs(1);

/// The state a configuration change replaces as a whole.
struct Active {
    config: DeviceConfig,
    table: Arc<PeerTable>,
}

/// One WireGuard interface.
pub struct Device {
    /// Non-blocking: the data path's threads wait in epoll or poll, where
    /// a stop can reach them.
    tun: SyncDevice,
    active: Mutex<Active>,
    /// A lock-cheap copy of `active.table` for the data path.
    table: RwLock<Arc<PeerTable>>,
    socket: RwLock<Arc<Bound>>,
    /// Written when `socket` is replaced: a worker then swaps the new
    /// socket into the epoll set.
    socket_changed: EventFd,
    /// Written by [`Device::wake`]: the timer thread then starts a
    /// handshake with every peer.
    woken: EventFd,
    /// Whether the configuration has a private key: the data path starts
    /// only then (see [`Device::run`]).
    keyed: tokio::sync::watch::Sender<bool>,
    pub counters: Counters,
}

/// What reading the TUN device and encrypting what it read needs.
struct TunReader {
    original: Vec<u8>,
    packets: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    batch: SendBatch<Arc<Peer>>,
}

impl TunReader {
    fn new() -> TunReader {
        TunReader {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65_535],
            // Zeroed allocations (not clones of one, which would copy and
            // so touch every page): only the pages packets touch count
            // against the resident set.
            packets: zeroed_buffers(IDEAL_BATCH_SIZE, 65_535),
            sizes: vec![0usize; IDEAL_BATCH_SIZE],
            batch: SendBatch::new(SEND_BATCH_BYTES, 1),
        }
    }
}

/// What one read of a side came to.
enum SideRead {
    /// Nothing was waiting.
    Empty,
    /// Packets were read and sent on (or dropped and counted).
    Sent,
    /// The data path is stopping.
    Stopped,
}

/// What reading the UDP socket and decrypting what it read needs.
struct UdpBuffers {
    recv_bufs: Vec<Vec<u8>>,
    metas: Vec<quinn_udp::RecvMeta>,
    out: Vec<Vec<u8>>,
    gro: GROTable,
}

impl UdpBuffers {
    fn new() -> UdpBuffers {
        UdpBuffers {
            recv_bufs: zeroed_buffers(quinn_udp::BATCH_SIZE, 65_536),
            metas: vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE],
            out: (0..TUN_WRITE_BATCH)
                .map(|_| Vec::with_capacity(TUN_OFFSET + 65_536))
                .collect(),
            gro: GROTable::default(),
        }
    }
}

/// The UDP side: the socket registered in the set, and its buffers
/// (allocated by the first thread that reads, as [`TunReader`]).
struct UdpSide {
    bound: Arc<Bound>,
    buffers: Option<UdpBuffers>,
}

/// What serving a registration came to.
enum Served {
    Done,
    Stopped,
}

/// Reads a side once, or with `drain` until nothing more waits there, at
/// most [`DRAIN_ROUNDS`] times: then the side goes back to the set, and
/// the helper to its poll, where a stop reaches it even under a flood.
fn read_side(drain: bool, mut read: impl FnMut() -> io::Result<SideRead>) -> io::Result<Served> {
    let rounds = if drain { DRAIN_ROUNDS } else { 1 };
    for _ in 0..rounds {
        match read()? {
            SideRead::Stopped => return Ok(Served::Stopped),
            SideRead::Sent => continue,
            SideRead::Empty => break,
        }
    }
    Ok(Served::Done)
}

/// Reads the helper makes of a side before handing it back (each up to
/// 64 KiB from the TUN device, or 32 datagrams).
const DRAIN_ROUNDS: usize = 64;

fn is_side(token: u64) -> bool {
    token == TOKEN_TUN || token == TOKEN_UDP
}

const TOKEN_TUN: u64 = 0;
const TOKEN_UDP: u64 = 1;
const TOKEN_SOCKET: u64 = 2;
const TOKEN_STOP: u64 = 3;
const ONE_SHOT_IN: EpollFlags = EpollFlags::EPOLLIN.union(EpollFlags::EPOLLONESHOT);

/// The epoll set of the data path, and the sides' buffers.
struct DataPlane {
    epoll: Epoll,
    /// A side handed to the helper: its token + 1. At most one is
    /// outstanding (see [`Device::data_loop`]).
    help: EventFd,
    /// The TUN side's buffers. Allocated by the first thread that reads:
    /// memory a thread allocates comes from its own arena, fresh and
    /// untouched, where the main arena's calloc zeroed (touched) 6 MB of it.
    tun: Mutex<Option<TunReader>>,
    udp: Mutex<UdpSide>,
}

impl DataPlane {
    fn new(device: &Device, stop: &EventFd) -> io::Result<DataPlane> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let bound = device.socket();
        epoll.add(device.tun.as_fd(), EpollEvent::new(ONE_SHOT_IN, TOKEN_TUN))?;
        epoll.add(
            bound.socket.as_fd(),
            EpollEvent::new(ONE_SHOT_IN, TOKEN_UDP),
        )?;
        epoll.add(
            device.socket_changed.as_fd(),
            EpollEvent::new(ONE_SHOT_IN, TOKEN_SOCKET),
        )?;
        // Level triggered and never drained: it stays reported however
        // many other events come first.
        epoll.add(
            stop.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_STOP),
        )?;
        Ok(DataPlane {
            epoll,
            help: new_eventfd()?,
            tun: Mutex::new(None),
            udp: Mutex::new(UdpSide {
                bound,
                buffers: None,
            }),
        })
    }

    fn udp(&self) -> std::sync::MutexGuard<'_, UdpSide> {
        self.udp.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands a side back to the set after its event was handled; reported
    /// again at once if more is waiting.
    fn rearm(&self, fd: std::os::fd::BorrowedFd<'_>, token: u64) -> io::Result<()> {
        Ok(self
            .epoll
            .modify(fd, &mut EpollEvent::new(ONE_SHOT_IN, token))?)
    }
}

impl Device {
    /// Creates the device around an open TUN device, binds its UDP socket
    /// and applies `config`.
    pub fn new(tun: SyncDevice, config: DeviceConfig) -> io::Result<Arc<Device>> {
        let socket = bind_udp(config.listen_port, config.fwmark)?;
        Device::with_socket(tun, socket, config)
    }

    /// Creates the device around an open TUN device and a UDP socket that
    /// someone else bound (vaned hands the tunnel a socket it bound and
    /// marked). `config.listen_port` and `config.fwmark` should describe
    /// that socket, so that a `set` naming the same port and mark does not
    /// rebind.
    pub fn with_socket(
        tun: SyncDevice,
        socket: Bound,
        config: DeviceConfig,
    ) -> io::Result<Arc<Device>> {
        tun.set_nonblocking(true)?;
        let socket_changed = new_eventfd()?;
        let woken = new_eventfd()?;
        let socket = Arc::new(socket);
        let table = Arc::new(PeerTable::build(
            &PeerTable::default(),
            &DeviceConfig::default(),
            &config,
        ));
        let keyed = tokio::sync::watch::Sender::new(config.private_key.is_some());
        Ok(Arc::new(Device {
            tun,
            keyed,
            active: Mutex::new(Active {
                config,
                table: Arc::clone(&table),
            }),
            table: RwLock::new(table),
            socket: RwLock::new(socket),
            socket_changed,
            woken,
            counters: Counters::default(),
        }))
    }

    pub fn tun(&self) -> &SyncDevice {
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
            *self.socket.write().unwrap_or_else(|e| e.into_inner()) = socket;
            // Cannot fail short of a counter at its maximum, which a
            // reader drains long before.
            let _ = self.socket_changed.write(1);
        }
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&table);
        active.table = table;
        active.config = new;
        self.keyed.send_replace(active.config.private_key.is_some());
        debug!(
            peers = active.config.peers.len(),
            port = self.listen_port(),
            "configuration applied"
        );
        Ok(())
    }

    /// Runs the data path until the returned future is dropped or an I/O
    /// error on the TUN device ends it.
    ///
    /// One worker thread waits in an epoll set holding the TUN device and
    /// the UDP socket, each registered one-shot: it serves a ready side
    /// (one read, everything it read sent on) and re-arms it, so a side is
    /// with one thread at a time and its packets keep their order. When
    /// both sides are ready it hands one to a helper thread, so under load
    /// they run in parallel on both cores. A third thread drives the
    /// timers. Why not a thread per side, or two in the set: a lone
    /// packet's answer is then served by a thread that slept, and the
    /// other waiter is woken for nothing (docs/performance.md has the
    /// measurements). Dropping the future signals the threads (an eventfd
    /// in the set and in the helper's poll, never drained) and joins them.
    ///
    /// Without a private key nothing can be encrypted or decrypted: the
    /// data path starts with the first configuration that has one. Until
    /// then what the host sends to the device waits in its queue (and
    /// datagrams in the socket's buffer) instead of being read and dropped
    /// for want of a peer: a tunnel vaned starts is attached and answering
    /// its userspace API before vaned configures it.
    pub async fn run(self: Arc<Self>) -> io::Result<()> {
        let mut keyed = self.keyed.subscribe();
        if keyed.wait_for(|k| *k).await.is_err() {
            return Err(io::Error::other("the device went away"));
        }
        let stop = Arc::new(new_eventfd()?);
        let plane = Arc::new(DataPlane::new(&self, &stop)?);
        let mut threads = Threads {
            stop: Arc::clone(&stop),
            handles: Vec::new(),
            drain: Some((Arc::clone(&self), Arc::clone(&plane))),
        };
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        type Body = fn(&Device, &EventFd, &DataPlane) -> io::Result<()>;
        let loops: [(&str, Body); 3] = [
            ("vane-data", |d, stop, plane| d.data_loop(stop, plane)),
            ("vane-helper", |d, stop, plane| d.helper_loop(stop, plane)),
            ("vane-timers", |d, stop, _| d.timer_loop(stop)),
        ];
        for (name, body) in loops {
            let device = Arc::clone(&self);
            let stop = Arc::clone(&stop);
            let plane = Arc::clone(&plane);
            let done = done_tx.clone();
            let handle = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let result =
                        std::panic::catch_unwind(AssertUnwindSafe(|| body(&device, &stop, &plane)))
                            .unwrap_or_else(|_| Err(io::Error::other(format!("{name} panicked"))));
                    let _ = done.send(result);
                })?;
            threads.handles.push(handle);
        }
        drop(done_tx);
        match done_rx.recv().await {
            Some(result) => result,
            None => Err(io::Error::other("the data path threads ended")),
        }
    }

    /// The worker that waits in the set. It takes up to two events: one
    /// ready side it handles itself; when both sides are ready (there is
    /// load), it hands one to the helper, so the two run on both cores.
    fn data_loop(&self, stop: &EventFd, plane: &DataPlane) -> io::Result<()> {
        let mut events = [EpollEvent::empty(); 2];
        loop {
            let n = match plane.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut ready: &[EpollEvent] = &events[..n];
            if let [a, b] = ready {
                if is_side(a.data()) && is_side(b.data()) {
                    // Only both data sides are handed over: the helper
                    // holds no side now (each was armed, so neither is
                    // with it), so the hand-off slot is free.
                    plane.help.write(b.data() + 1)?;
                    ready = &ready[..1];
                }
            }
            for event in ready {
                if let Served::Stopped = self.serve(event.data(), plane, stop, false)? {
                    return Ok(());
                }
            }
        }
    }

    /// The helper: waits for a side the waiting worker hands over under
    /// load, and serves it until nothing more waits there (or for
    /// [`DRAIN_ROUNDS`] reads). While idle it
    /// waits outside the set, so a lone packet never wakes it: a ping's
    /// way through the tunnel stays on the one worker (and core), with no
    /// wake-up of a thread that would find nothing.
    fn helper_loop(&self, stop: &EventFd, plane: &DataPlane) -> io::Result<()> {
        loop {
            let mut fds = [
                PollFd::new(plane.help.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            poll_fds(&mut fds, PollTimeout::NONE)?;
            if is_ready(&fds[1]) {
                return Ok(());
            }
            let token = match plane.help.read() {
                Ok(value) => value.saturating_sub(1),
                Err(nix::errno::Errno::EAGAIN) => continue,
                Err(e) => return Err(e.into()),
            };
            if let Served::Stopped = self.serve(token, plane, stop, true)? {
                return Ok(());
            }
        }
    }

    /// Serves one ready registration of the set and re-arms it: a side is
    /// read once (or, with `drain`, until nothing waits), everything read
    /// sent on. A side's lock is never contended: the one-shot
    /// registration gives it to one thread at a time.
    fn serve(
        &self,
        token: u64,
        plane: &DataPlane,
        stop: &EventFd,
        drain: bool,
    ) -> io::Result<Served> {
        match token {
            TOKEN_STOP => return Ok(Served::Stopped),
            TOKEN_TUN => {
                let mut reader = plane.tun.lock().unwrap_or_else(|e| e.into_inner());
                let reader = reader.get_or_insert_with(TunReader::new);
                if let Served::Stopped = read_side(drain, || self.read_tun(reader, stop))? {
                    return Ok(Served::Stopped);
                }
                plane.rearm(self.tun.as_fd(), TOKEN_TUN)?;
            }
            TOKEN_UDP => {
                let mut side = plane.udp();
                let UdpSide { bound, buffers } = &mut *side;
                let buffers = buffers.get_or_insert_with(UdpBuffers::new);
                if let Served::Stopped = read_side(drain, || self.read_udp(bound, buffers, stop))? {
                    return Ok(Served::Stopped);
                }
                // Under the lock: never re-arms a socket that a change has
                // just taken out of the set.
                plane.rearm(bound.socket.as_fd(), TOKEN_UDP)?;
            }
            TOKEN_SOCKET => {
                let mut side = plane.udp();
                // Drained, so the re-armed registration waits again; the
                // socket in force is read after, so no change is missed.
                let _ = self.socket_changed.read();
                let new = self.socket();
                if !Arc::ptr_eq(&new, &side.bound) {
                    plane.epoll.delete(side.bound.socket.as_fd())?;
                    plane
                        .epoll
                        .add(new.socket.as_fd(), EpollEvent::new(ONE_SHOT_IN, TOKEN_UDP))?;
                    side.bound = new;
                }
                plane.rearm(self.socket_changed.as_fd(), TOKEN_SOCKET)?;
            }
            _ => {}
        }
        Ok(Served::Done)
    }

    /// TUN -> peer by destination -> encapsulate -> UDP: one non-blocking
    /// read of the TUN device, its packets encrypted and sent. An error is
    /// the TUN device's own (the data path ends).
    ///
    /// One read from the offloaded TUN device returns up to 64 KiB of one
    /// TCP or UDP flow (TSO/USO), which tun-rs splits into MTU-sized
    /// packets; they are encrypted back to back into one buffer and go out
    /// as few `sendmsg` calls with UDP GSO as the destinations allow. A
    /// lone packet is sent as soon as it is read: nothing waits for a batch
    /// to fill.
    fn read_tun(&self, reader: &mut TunReader, stop: &EventFd) -> io::Result<SideRead> {
        let TunReader {
            original,
            packets,
            sizes,
            batch,
        } = reader;
        let n = match self.tun.recv_multiple(original, packets, sizes, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(SideRead::Empty),
            Err(e) if e.raw_os_error().is_some() => return Err(e),
            Err(e) => {
                // A malformed offloaded packet (tun-rs's own checks,
                // which carry no errno): skip it.
                debug!(error = %e, "unreadable packet from the TUN device");
                return Ok(SideRead::Sent);
            }
        };
        let table = self.table();
        let bound = self.socket();
        batch.set_max_segments(bound.state.max_gso_segments());
        let mut done = 0;
        while done < n {
            done += encapsulate_packets(
                &table,
                &packets[done..n],
                &sizes[done..n],
                batch,
                &self.counters,
            );
            let mut stopped = false;
            for (group, bytes) in batch.groups() {
                match bound.send(bytes, group.destination, group.segment_size(), stop) {
                    Ok(()) => group.tag.add_tx(bytes.len()),
                    Err(e) if is_stopped(&e) => {
                        stopped = true;
                        break;
                    }
                    Err(e) => debug!(endpoint = %group.destination, error = %e, "send failed"),
                }
            }
            batch.clear();
            if stopped {
                return Ok(SideRead::Stopped);
            }
        }
        Ok(SideRead::Sent)
    }

    /// After the threads have stopped: the packets the host had already
    /// queued on the device (a sender was told they went out) are read and
    /// sent on, at most [`DRAIN_ROUNDS`] reads, instead of dying with the
    /// process. vaned takes the routes away first, so nothing new comes.
    fn drain_tun(&self, plane: &DataPlane) {
        let Ok(stop) = new_eventfd() else {
            return;
        };
        let mut reader = plane.tun.lock().unwrap_or_else(|e| e.into_inner());
        let reader = reader.get_or_insert_with(TunReader::new);
        if let Err(e) = read_side(true, || self.read_tun(reader, &stop)) {
            debug!(error = %e, "draining the TUN device");
        }
    }

    /// UDP -> peer by index or static key -> decapsulate -> TUN: one
    /// `recvmmsg` of up to 32 datagrams, each possibly a run of segments
    /// the kernel coalesced (UDP GRO). The decrypted packets are written
    /// with tun-rs's GRO table, which merges consecutive TCP segments of a
    /// flow into one write of up to 64 KiB.
    fn read_udp(
        &self,
        bound: &Bound,
        buffers: &mut UdpBuffers,
        stop: &EventFd,
    ) -> io::Result<SideRead> {
        let UdpBuffers {
            recv_bufs,
            metas,
            out,
            gro,
        } = buffers;
        let count = match bound.recv(recv_bufs, metas) {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(SideRead::Empty),
            Err(e) => {
                // ICMP errors surface as ECONNREFUSED and the like on
                // an unconnected UDP socket; they end nothing.
                trace!(error = %e, "recvmmsg");
                return Ok(SideRead::Sent);
            }
        };
        let table = self.table();
        let mut pending = 0;
        for (meta, buf) in metas.iter().zip(recv_bufs.iter()).take(count) {
            let from = canonical(meta.addr);
            let stride = meta.stride.max(1);
            let Some(data) = buf.get(..meta.len) else {
                continue;
            };
            if data.is_empty() {
                // An empty datagram (`chunks` yields nothing for it):
                // not a WireGuard message, and counted as such.
                Counters::bump(&self.counters.invalid_datagrams);
                trace!(%from, "empty datagram");
                continue;
            }
            for datagram in data.chunks(stride) {
                let opened = open_datagram(
                    &table,
                    datagram,
                    from,
                    &mut out[pending],
                    TUN_OFFSET,
                    &self.counters,
                );
                match opened {
                    Opened::Nothing => {}
                    Opened::Tunnel { .. } => {
                        pending += 1;
                        if pending == out.len() {
                            self.write_tun(gro, &mut out[..pending]);
                            pending = 0;
                        }
                    }
                    Opened::Network(peer, sends) => {
                        for s in sends {
                            match bound.send(&s, from, None, stop) {
                                Ok(()) => peer.add_tx(s.len()),
                                Err(e) if is_stopped(&e) => return Ok(SideRead::Stopped),
                                Err(e) => debug!(%from, error = %e, "send failed"),
                            }
                        }
                    }
                    Opened::Cookie(cookie) => match bound.send(&cookie, from, None, stop) {
                        Err(e) if is_stopped(&e) => return Ok(SideRead::Stopped),
                        Err(e) => debug!(%from, error = %e, "send failed"),
                        Ok(()) => {}
                    },
                }
            }
        }
        if pending > 0 {
            self.write_tun(gro, &mut out[..pending]);
        }
        Ok(SideRead::Sent)
    }

    /// Writes decrypted packets. The TUN device takes writes without
    /// waiting (its send buffer is unlimited), so a non-blocking write
    /// does not refuse for lack of room.
    fn write_tun(&self, gro: &mut GROTable, packets: &mut [Vec<u8>]) {
        if let Err(e) = self.tun.send_multiple(gro, packets, TUN_OFFSET) {
            debug!(error = %e, "write to TUN failed");
        }
    }

    /// Drives every peer's timers: handshake (re)tries, keepalives,
    /// rekeying, session expiry; and resets the handshake rate limiter.
    fn timer_loop(&self, stop: &EventFd) -> io::Result<()> {
        let mut out = vec![0u8; BUF_LEN];
        let mut next = Instant::now();
        let mut clocks = ClockWatch::default();
        // Forced handshakes (vaned's SIGUSR1: a wake, another network; the
        // clocks: a sleep) at most one per FORCED_HANDSHAKE_GAP: a second
        // one right after would throw away the first's answer. One asked
        // for within the gap is not dropped but made when the gap ends (it
        // may be for a network that came after the first).
        let mut forced = Forced::default();
        loop {
            let now = Instant::now();
            let mut wait = next.saturating_duration_since(now);
            if let Some(at) = forced.pending_at() {
                wait = wait.min(at.saturating_duration_since(now));
            }
            let mut fds = [
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.woken.as_fd(), PollFlags::POLLIN),
            ];
            // Rounded up to whole milliseconds: rounded down, the last
            // millisecond before a tick would be spent polling with a zero
            // timeout.
            let millis = wait.as_micros().div_ceil(1000);
            poll_fds(
                &mut fds,
                PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX),
            )?;
            if is_ready(&fds[0]) {
                return Ok(());
            }
            if is_ready(&fds[1]) {
                let _ = self.woken.read();
                debug!("told to handshake now (a wake, another network)");
                forced.ask();
            }
            if Instant::now() >= next {
                // A late tick delays the next one rather than bunching up.
                next = Instant::now() + TIMER_TICK;
                if let Some(slept) = read_clocks().and_then(|(b, m)| clocks.observe(b, m)) {
                    info!(
                        slept_secs = slept.as_secs(),
                        "the machine slept: a handshake with every peer now"
                    );
                    // The gap was measured on a clock that stopped.
                    forced.slept();
                    forced.ask();
                }
                if forced.due(Instant::now()) && self.handshake_all(&mut out, stop).is_err() {
                    return Ok(());
                }
                if self.tick_timers(&mut out, stop).is_err() {
                    // Only a stop ends a round early.
                    return Ok(());
                }
            } else if forced.due(Instant::now()) && self.handshake_all(&mut out, stop).is_err() {
                return Ok(());
            }
        }
    }

    /// Starts a handshake with every peer that has an endpoint, whatever
    /// its timers say: after the machine slept, the sessions boringtun
    /// still counts as young may be gone at the peer (which rejects a
    /// session after 180 s of its own time), and waiting for the timers to
    /// notice takes 15 s of silence. A handshake already under way is
    /// started again (boringtun's `force_resend`). Errs only on a stop.
    fn handshake_all(&self, out: &mut [u8], stop: &EventFd) -> io::Result<()> {
        for peer in self.table().peers() {
            let (len, endpoint) = {
                let mut state = peer.lock();
                let Some(endpoint) = state.endpoint else {
                    continue;
                };
                match state.tunn.format_handshake_initiation(out, true) {
                    TunnResult::WriteToNetwork(p) => (p.len(), endpoint),
                    _ => continue,
                }
            };
            match self.socket().send(&out[..len], endpoint, None, stop) {
                Ok(()) => peer.add_tx(len),
                Err(e) if is_stopped(&e) => return Err(e),
                Err(e) => debug!(%endpoint, error = %e, "send failed"),
            }
        }
        Ok(())
    }

    /// The machine woke up (vaned heard it from logind, SIGUSR1): the
    /// timer thread starts a handshake with every peer at once.
    pub fn wake(&self) {
        // Cannot fail short of a counter at its maximum.
        let _ = self.woken.write(1);
    }

    fn tick_timers(&self, out: &mut [u8], stop: &EventFd) -> io::Result<()> {
        let table = self.table();
        if let Some(identity) = table.identity() {
            identity.rate_limiter.reset_count();
        }
        for peer in table.peers() {
            let (len, endpoint) = {
                let mut state = peer.lock();
                let endpoint = state.endpoint;
                match state.tunn.update_timers(out) {
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
            let Some(endpoint) = endpoint else {
                Counters::bump(&self.counters.no_endpoint);
                trace!(peer = %PeerName(&peer.public_key), "no endpoint, dropped");
                continue;
            };
            match self.socket().send(&out[..len], endpoint, None, stop) {
                Ok(()) => peer.add_tx(len),
                Err(e) if is_stopped(&e) => return Err(e),
                Err(e) => debug!(%endpoint, error = %e, "send failed"),
            }
        }
        Ok(())
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

/// When forced handshakes are made (see `Device::timer_loop`). Plain
/// bookkeeping, time passed in.
#[derive(Debug, Default)]
struct Forced {
    last: Option<Instant>,
    pending: bool,
}

impl Forced {
    /// A forced handshake is asked for.
    fn ask(&mut self) {
        self.pending = true;
    }

    /// The machine slept: the last one's time says nothing.
    fn slept(&mut self) {
        self.last = None;
    }

    /// When a pending one may be made.
    fn pending_at(&self) -> Option<Instant> {
        self.pending.then(|| {
            self.last
                .map_or_else(Instant::now, |t| t + FORCED_HANDSHAKE_GAP)
        })
    }

    /// Whether to make it now (then counted as made).
    fn due(&mut self, now: Instant) -> bool {
        if !self.pending || self.last.is_some_and(|t| now < t + FORCED_HANDSHAKE_GAP) {
            return false;
        }
        self.pending = false;
        self.last = Some(now);
        true
    }
}

/// The data path's threads: signalled and joined when dropped.
struct Threads {
    stop: Arc<EventFd>,
    handles: Vec<std::thread::JoinHandle<()>>,
    /// Once they are joined, what the host had already queued on the TUN
    /// device is read and sent on ([`Device::drain_tun`]).
    drain: Option<(Arc<Device>, Arc<DataPlane>)>,
}

impl Drop for Threads {
    fn drop(&mut self) {
        // Never drained: stays readable for every thread's poll.
        let _ = self.stop.write(1);
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
        if let Some((device, plane)) = self.drain.take() {
            device.drain_tun(&plane);
        }
    }
}

fn new_eventfd() -> io::Result<EventFd> {
    Ok(EventFd::from_flags(
        EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
    )?)
}

/// poll(2), resumed when a signal interrupts it.
fn poll_fds(fds: &mut [PollFd<'_>], timeout: PollTimeout) -> io::Result<i32> {
    loop {
        match nix::poll::poll(fds, timeout) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn is_ready(fd: &PollFd<'_>) -> bool {
    fd.revents().is_some_and(|r| !r.is_empty())
}

/// The error a send returns when the data path is stopped while it waits
/// for room in the socket buffer.
fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, StoppedError)
}

fn is_stopped(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<StoppedError>())
}

#[derive(Debug)]
struct StoppedError;

impl std::fmt::Display for StoppedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the data path is stopping")
    }
}

impl std::error::Error for StoppedError {}

/// The UDP socket and what the data path needs to know of it without a
/// system call.
pub struct Bound {
    /// Non-blocking: the data path's threads wait in epoll or poll.
    pub socket: std::net::UdpSocket,
    /// The bound port (the kernel's choice when 0 was asked for).
    pub port: u16,
    dual_stack: bool,
    /// quinn-udp's view of the socket: `sendmsg` with UDP GSO, `recvmmsg`
    /// with UDP GRO, and the fallbacks where the kernel or a device lacks
    /// them.
    state: quinn_udp::UdpSocketState,
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

    /// Sends `contents` to `to`: one datagram, or with `segment` a run of
    /// datagrams of that size (the last may be shorter) in one system call.
    /// Waits for room in the socket buffer unless `stop` is signalled
    /// (then the error satisfies [`is_stopped`]).
    fn send(
        &self,
        contents: &[u8],
        to: SocketAddr,
        segment: Option<usize>,
        stop: &EventFd,
    ) -> io::Result<()> {
        let transmit = quinn_udp::Transmit {
            destination: self.destination(to),
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        loop {
            let sent = match segment {
                // A lone datagram: a plain sendto, without the control
                // messages quinn-udp adds to every send (the ECN field,
                // which WireGuard does not use).
                None => self
                    .socket
                    .send_to(contents, transmit.destination)
                    .map(drop),
                Some(_) => self.state.try_send((&self.socket).into(), &transmit),
            };
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [
                        PollFd::new(self.socket.as_fd(), PollFlags::POLLOUT),
                        PollFd::new(stop.as_fd(), PollFlags::POLLIN),
                    ];
                    poll_fds(&mut fds, PollTimeout::NONE)?;
                    if is_ready(&fds[1]) {
                        return Err(stopped());
                    }
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE)
                    ) && segment.is_some() =>
                {
                    // The device refused GSO (EIO; quinn-udp stops
                    // segmenting for later sends), or a segment is larger
                    // than the path MTU (EMSGSIZE, EINVAL: a tunnel MTU
                    // too large for the path; sent alone, the kernel
                    // fragments it, as before batching). These go out one
                    // by one.
                    for d in contents.chunks(segment.unwrap_or(contents.len()).max(1)) {
                        self.send(d, to, None, stop)?;
                    }
                    return Ok(());
                }
                other => return other,
            }
        }
    }

    /// Receives up to `bufs.len()` datagrams (each possibly several
    /// coalesced by GRO: `meta.stride` bytes each), or `WouldBlock`.
    fn recv(&self, bufs: &mut [Vec<u8>], metas: &mut [quinn_udp::RecvMeta]) -> io::Result<usize> {
        let n = bufs.len().min(quinn_udp::BATCH_SIZE);
        let mut slices: [IoSliceMut<'_>; quinn_udp::BATCH_SIZE] =
            std::array::from_fn(|_| IoSliceMut::new(&mut []));
        for (slice, buf) in slices.iter_mut().zip(bufs.iter_mut()) {
            *slice = IoSliceMut::new(buf);
        }
        self.state
            .recv((&self.socket).into(), &mut slices[..n], &mut metas[..n])
    }
}

/// Binds the dual-stack UDP socket (IPv4 and IPv6 outer transport on one
/// port), falling back to IPv4 only where IPv6 is disabled.
pub fn bind_udp(port: u16, fwmark: u32) -> io::Result<Bound> {
    Bound::from_std(bind_udp_std(port, fwmark)?)
}

impl Bound {
    /// Takes a bound UDP socket (blocking or not) for the data path.
    pub fn from_std(socket: std::net::UdpSocket) -> io::Result<Bound> {
        socket.set_nonblocking(true)?;
        let state = quinn_udp::UdpSocketState::new((&socket).into())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot set up the UDP socket: {e}")))?;
        restore_path_mtu_discovery(&socket);
        let local = socket.local_addr()?;
        Ok(Bound {
            socket,
            port: local.port(),
            dual_stack: local.is_ipv6(),
            state,
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
    // 7 MiB). With GSO a burst arrives as 64 KiB runs, and 4 MiB
    // overflowed (UdpRcvbufErrors) with four TCP streams on two busy
    // cores; 16 MiB did not. It is kernel memory, charged only while
    // datagrams wait. The plain options are capped at net.core.[rw]mem_max; with
    // CAP_NET_ADMIN the force variants are not, so try those first.
    const SOCKET_BUFFER: usize = 16 << 20;
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    }
    Ok(socket.into())
}

/// quinn-udp turns on IP_PMTUDISC_PROBE (don't fragment, ignore the path
/// MTU) for QUIC's own path MTU probing; WireGuard has none, so the
/// kernel's default (fragment beyond a known path MTU) comes back, as with
/// wireguard-go. Best effort: an IPv4-only socket refuses the IPv6 option.
fn restore_path_mtu_discovery(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: a plain int option on a descriptor we own.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_WANT,
    );
    set(
        libc::IPPROTO_IPV6,
        libc::IPV6_MTU_DISCOVER,
        libc::IPV6_PMTUDISC_WANT,
    );
}

fn set_mark(socket: &std::net::UdpSocket, fwmark: u32) -> io::Result<()> {
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

fn zeroed_buffers(count: usize, len: usize) -> Vec<Vec<u8>> {
    (0..count).map(|_| vec![0u8; len]).collect()
}

#[cfg(test)]
mod forced_tests {
    use super::*;

    #[test]
    fn forced_handshakes_are_spaced_not_dropped() {
        let t0 = Instant::now();
        let mut f = Forced::default();
        assert!(!f.due(t0), "nothing asked");
        f.ask();
        assert!(f.due(t0));
        assert!(!f.due(t0), "made once");
        // Asked again within the gap: made when the gap ends.
        f.ask();
        assert!(!f.due(t0 + FORCED_HANDSHAKE_GAP / 2));
        assert_eq!(f.pending_at(), Some(t0 + FORCED_HANDSHAKE_GAP));
        assert!(f.due(t0 + FORCED_HANDSHAKE_GAP));
        assert_eq!(f.pending_at(), None);
        // After a sleep the gap does not hold (its clock stopped).
        f.ask();
        f.slept();
        assert!(f.due(t0 + FORCED_HANDSHAKE_GAP));
    }
}
