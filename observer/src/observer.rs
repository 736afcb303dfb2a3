//! The I/O shell: rtnetlink sockets, nl80211, file watches, systemd-resolved
//! over D-Bus, and the change stream.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, mpsc, watch};

use crate::classify::{Classifier, GlobError};
use crate::coalesce::{Coalescer, DEFAULT_WINDOW};
use crate::dns::{read_resolv_conf, RESOLV_CONF};
use crate::nl80211::{self, Nl80211};
use crate::resolved::{link_to_read, underlying_dns, DnsSource};
use crate::resolved_bus::ResolvedBus;
use crate::snapshot::{diff, Dns, InterfaceType, NetworkSnapshot, SnapshotDiff};
use crate::ssid::Ssid;
use crate::ssid_file::{read_ssid_file, SsidMap};
use crate::state::{Exclusions, LinkFacts, NetState, SnapshotInputs};
use crate::watch::{watch_file, FileWatch};

const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// The file systemd-resolved rewrites on every change of its DNS
/// configuration.
pub const RESOLVED_TRIGGER_FILE: &str = "/run/systemd/resolve/resolv.conf";

/// The bound on one exchange with the bus or resolved; the observer waits
/// for it inline (a local bus answers in about a millisecond).
const BUS_TIMEOUT: Duration = Duration::from_secs(1);

/// How the observer is set up.
#[derive(Debug, Clone)]
pub struct ObserverConfig {
    /// `/sys` on a real host.
    pub sysfs_root: PathBuf,
    /// The rule file's `[interfaces]` table, in order.
    pub interface_overrides: Vec<(String, InterfaceType)>,
    /// vane's own interfaces, table and DNS servers.
    pub exclusions: Exclusions,
    /// The SSID file (see [`crate::ssid_file`]), for hosts where nl80211
    /// does not tell. Its directory must exist.
    pub ssid_file: Option<PathBuf>,
    /// resolv.conf to read and watch; `None` reports no DNS (unless
    /// systemd-resolved does, see `dns_source`).
    pub resolv_conf: Option<PathBuf>,
    /// Where the DNS comes from: systemd-resolved when it is on the
    /// system bus, else resolv.conf (the default); one of them only.
    pub dns_source: DnsSource,
    /// The system bus's D-Bus address (`unix:path=...`); `None`:
    /// `DBUS_SYSTEM_BUS_ADDRESS`, else the standard socket.
    pub system_bus: Option<String>,
    /// A file systemd-resolved rewrites on every change, watched as the
    /// trigger to read resolved again (it announces new search domains
    /// on no D-Bus signal). `None`, or a missing directory: not watched.
    pub resolved_trigger_file: Option<PathBuf>,
    /// Whether to use nl80211 when the host has it.
    pub nl80211: bool,
    /// Follow-ups after a leading-edge emission are coalesced over this.
    pub coalesce_window: Duration,
    /// SO_RCVBUF of the event socket (an overrun triggers a re-dump).
    pub event_rcvbuf: usize,
}

impl Default for ObserverConfig {
    fn default() -> ObserverConfig {
        ObserverConfig {
            sysfs_root: PathBuf::from("/sys"),
            interface_overrides: Vec::new(),
            exclusions: Exclusions::default(),
            ssid_file: None,
            resolv_conf: Some(PathBuf::from(RESOLV_CONF)),
            dns_source: DnsSource::Auto,
            system_bus: None,
            resolved_trigger_file: Some(PathBuf::from(RESOLVED_TRIGGER_FILE)),
            nl80211: true,
            coalesce_window: DEFAULT_WINDOW,
            event_rcvbuf: 1 << 20,
        }
    }
}

/// One emitted change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub old: NetworkSnapshot,
    pub new: NetworkSnapshot,
    pub diff: SnapshotDiff,
    /// Wall-clock time of the emission.
    pub at: SystemTime,
}

/// The observer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    #[error("rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("rtnetlink dump of {what}: {source}")]
    Dump {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Glob(#[from] GlobError),
    #[error("watching {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

enum Command {
    Exclusions(Exclusions),
    Classifier(Box<Classifier>),
    ResolvConfOverride(Option<Dns>),
    Resync,
}

/// A handle that tells the observer what the underlying network's
/// resolv.conf said while vane's own tunnel DNS stands in its place (vaned
/// writes resolv.conf itself when neither systemd-resolved nor resolvconf
/// runs): the rules keep seeing the network's DNS, not the tunnel's.
#[derive(Debug, Clone)]
pub struct ResolvConfOverride {
    commands: mpsc::UnboundedSender<Command>,
}

impl ResolvConfOverride {
    /// `Some`: use this instead of resolv.conf; `None`: read resolv.conf
    /// again. Sent before resolv.conf is changed, it is in force before
    /// the change is seen (commands are handled first).
    pub fn set(&self, dns: Option<Dns>) {
        let _ = self.commands.send(Command::ResolvConfOverride(dns));
    }
}

enum FileEvent {
    Ssid,
    Dns,
    Resolved,
}

/// A running observer. Dropping it stops it.
#[derive(Debug)]
pub struct Observer {
    snapshot: watch::Receiver<NetworkSnapshot>,
    changes: broadcast::Sender<Change>,
    ssid_file_error: watch::Receiver<Option<String>>,
    commands: mpsc::UnboundedSender<Command>,
    sysfs_root: PathBuf,
    overruns: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Observer {
    /// Opens the sockets, dumps the kernel's state, reads the SSID file
    /// and resolv.conf, and starts watching. The first snapshot is ready
    /// when this returns. Must run inside a tokio runtime; the sockets
    /// belong to the calling thread's network namespace.
    pub async fn start(config: ObserverConfig) -> Result<Observer, ObserverError> {
        let classifier = Classifier::new(&config.sysfs_root, &config.interface_overrides)?;
        let events = event_socket(config.event_rcvbuf).map_err(ObserverError::Socket)?;
        let dumper = Dumper::new().map_err(ObserverError::Socket)?;
        let (file_tx, file_rx) = mpsc::unbounded_channel();
        let mut watches = Vec::new();
        if let Some(p) = &config.ssid_file {
            let tx = file_tx.clone();
            watches.push(
                watch_file(p, move || {
                    let _ = tx.send(FileEvent::Ssid);
                })
                .map_err(|source| ObserverError::Watch {
                    path: p.clone(),
                    source,
                })?,
            );
        }
        if let Some(p) = &config.resolv_conf {
            let tx = file_tx.clone();
            watches.push(
                watch_file(p, move || {
                    let _ = tx.send(FileEvent::Dns);
                })
                .map_err(|source| ObserverError::Watch {
                    path: p.clone(),
                    source,
                })?,
            );
        }
        let (resolved, resolved_events) = connect_resolved(&config).await;
        if resolved.is_some() {
            if let Some(p) = &config.resolved_trigger_file {
                if p.parent().is_some_and(|d| d.is_dir()) {
                    let tx = file_tx.clone();
                    match watch_file(p, move || {
                        let _ = tx.send(FileEvent::Resolved);
                    }) {
                        Ok(w) => watches.push(w),
                        Err(e) => tracing::warn!("watching {}: {e}", p.display()),
                    }
                }
            }
        }
        let (ssid_err_tx, ssid_err_rx) = watch::channel(None);
        let mut core = Core {
            state: NetState::new(),
            classifier,
            exclusions: config.exclusions.clone(),
            ssid_file: config.ssid_file.clone(),
            ssid_map: SsidMap::new(),
            ssid_error: ssid_err_tx,
            resolv_conf: config.resolv_conf.clone(),
            resolv_dns: Dns::default(),
            resolv_override: None,
            dns_source: config.dns_source,
            resolved,
            nl80211: None,
            nl80211_ssids: BTreeMap::new(),
            coalescer: Coalescer::new(config.coalesce_window),
            emitted: NetworkSnapshot::default(),
            dumper,
        };
        core.full_dump().await?;
        core.reload_ssid_file();
        core.reload_dns();
        core.recheck_resolved().await;
        let mut wifi_events = None;
        if config.nl80211 {
            match Nl80211::open() {
                Ok(Some(n)) => {
                    match n.event_socket().and_then(async_fd) {
                        Ok(s) => wifi_events = Some(s),
                        Err(e) => tracing::warn!("nl80211 events: {e}"),
                    }
                    core.nl80211 = Some(n);
                    core.requery_wifi();
                }
                Ok(None) => tracing::debug!("no nl80211 on this host"),
                Err(e) => tracing::warn!("nl80211: {e}; using the SSID file only"),
            }
        }
        let first = core.follow_primary().await;
        core.emitted = first.clone();
        let (snap_tx, snap_rx) = watch::channel(first);
        let (changes, _) = broadcast::channel(256);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let overruns = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(
            core,
            overruns.clone(),
            events,
            wifi_events,
            file_rx,
            resolved_events,
            cmd_rx,
            snap_tx,
            changes.clone(),
            watches,
        ));
        Ok(Observer {
            snapshot: snap_rx,
            changes,
            ssid_file_error: ssid_err_rx,
            commands: cmd_tx,
            sysfs_root: config.sysfs_root,
            overruns,
            task,
        })
    }

    /// The last emitted snapshot.
    pub fn snapshot(&self) -> NetworkSnapshot {
        self.snapshot.borrow().clone()
    }

    /// The emitted snapshots as a watch channel.
    pub fn watch(&self) -> watch::Receiver<NetworkSnapshot> {
        self.snapshot.clone()
    }

    /// Every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Why the SSID file was last refused, while it is (the previous SSIDs
    /// stay in force).
    pub fn ssid_file_error(&self) -> Option<String> {
        self.ssid_file_error.borrow().clone()
    }

    /// The handle for [`ResolvConfOverride`].
    pub fn resolv_conf_override(&self) -> ResolvConfOverride {
        ResolvConfOverride {
            commands: self.commands.clone(),
        }
    }

    /// Replaces the exclusions (the tunnel came up with a new ifindex).
    pub fn set_exclusions(&self, exclusions: Exclusions) {
        let _ = self.commands.send(Command::Exclusions(exclusions));
    }

    /// Replaces the `[interfaces]` overrides (the rule file was reloaded).
    pub fn set_interface_overrides(
        &self,
        overrides: &[(String, InterfaceType)],
    ) -> Result<(), GlobError> {
        let c = Classifier::new(&self.sysfs_root, overrides)?;
        let _ = self.commands.send(Command::Classifier(Box::new(c)));
        Ok(())
    }

    /// Reads everything afresh (the kernel's links, addresses and routes,
    /// Wi-Fi, the SSID file, DNS), as at the start: after the machine
    /// woke up, when events may have been missed or come late.
    pub fn resync(&self) {
        let _ = self.commands.send(Command::Resync);
    }

    /// How many times the event socket overran (each answered by a full
    /// re-dump).
    pub fn overruns(&self) -> u64 {
        self.overruns.load(Ordering::Relaxed)
    }

    /// Whether the observer's task has stopped (it stops only on a fatal
    /// socket error, which it logs).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

struct Core {
    state: NetState,
    classifier: Classifier,
    exclusions: Exclusions,
    ssid_file: Option<PathBuf>,
    ssid_map: SsidMap,
    ssid_error: watch::Sender<Option<String>>,
    resolv_conf: Option<PathBuf>,
    /// What resolv.conf says.
    resolv_dns: Dns,
    /// What to use instead while vane's own resolv.conf stands in place.
    resolv_override: Option<Dns>,
    dns_source: DnsSource,
    /// systemd-resolved, when the bus could be reached (and the source is
    /// not resolv.conf only).
    resolved: Option<ResolvedState>,
    nl80211: Option<Nl80211>,
    nl80211_ssids: BTreeMap<u32, Option<Ssid>>,
    coalescer: Coalescer,
    emitted: NetworkSnapshot,
    dumper: Dumper,
}

/// What the observer knows of systemd-resolved.
struct ResolvedState {
    bus: ResolvedBus,
    /// Whether its name has an owner.
    present: bool,
    /// The link its DNS was last read for (`Some(None)`: no primary
    /// uplink); `None`: not read since it appeared.
    read_for: Option<Option<u32>>,
    /// The DNS last read; `None` until a read succeeds.
    dns: Option<Dns>,
}

/// Connects to the system bus unless the DNS comes from resolv.conf only;
/// without a bus, the DNS comes from resolv.conf (or, for resolved only,
/// there is none).
async fn connect_resolved(
    config: &ObserverConfig,
) -> (Option<ResolvedState>, Option<mpsc::UnboundedReceiver<()>>) {
    if config.dns_source == DnsSource::ResolvConf {
        return (None, None);
    }
    let connected = tokio::time::timeout(BUS_TIMEOUT, async {
        let bus = ResolvedBus::connect(config.system_bus.as_deref()).await?;
        let events = bus.subscribe().await?;
        Ok::<_, zbus::Error>((bus, events))
    })
    .await;
    let why = match connected {
        Ok(Ok((bus, events))) => {
            let state = ResolvedState {
                bus,
                present: false,
                read_for: None,
                dns: None,
            };
            return (Some(state), Some(events));
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer in {BUS_TIMEOUT:?}"),
    };
    match config.dns_source {
        DnsSource::Resolved => {
            tracing::warn!("system bus: {why}; no DNS without systemd-resolved")
        }
        _ => tracing::info!("system bus: {why}; DNS from resolv.conf"),
    }
    (None, None)
}

impl Core {
    fn compute(&self) -> NetworkSnapshot {
        let classify = |l: &LinkFacts| self.classifier.classify(l);
        let ssid = |l: &LinkFacts| match self.nl80211_ssids.get(&l.ifindex) {
            Some(s) => s.clone(),
            None => self.ssid_map.get(&l.name).cloned(),
        };
        self.state.snapshot(&SnapshotInputs {
            exclusions: &self.exclusions,
            classify: &classify,
            ssid: &ssid,
            dns: &self.dns(),
        })
    }

    /// The DNS in force: resolved's while it is on the bus (and was read),
    /// else resolv.conf's, unless the source is resolved only.
    fn dns(&self) -> Dns {
        if let Some(ResolvedState {
            present: true,
            dns: Some(d),
            ..
        }) = &self.resolved
        {
            return d.clone();
        }
        match self.dns_source {
            DnsSource::Resolved => Dns::default(),
            _ => self
                .resolv_override
                .clone()
                .unwrap_or_else(|| self.resolv_dns.clone()),
        }
    }

    /// The link whose resolved DNS is the underlying network's.
    fn primary_link(&self, snap: &NetworkSnapshot) -> Option<u32> {
        link_to_read(
            snap.primary().map(|u| (u.ifindex, u.interface.as_str())),
            &self.exclusions,
        )
    }

    /// Resolved may have appeared, gone or changed: look again.
    async fn recheck_resolved(&mut self) {
        let Some(r) = &mut self.resolved else { return };
        let present = match tokio::time::timeout(BUS_TIMEOUT, r.bus.present()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::warn!("system bus: asking for systemd-resolved: {e}");
                r.present
            }
            Err(_) => {
                tracing::warn!("system bus: no answer in {BUS_TIMEOUT:?}");
                r.present
            }
        };
        if present != r.present {
            if present {
                tracing::info!("systemd-resolved is on the bus: DNS from it");
            } else if self.dns_source == DnsSource::Resolved {
                tracing::warn!("systemd-resolved left the bus: no DNS");
            } else {
                tracing::info!("systemd-resolved left the bus: DNS from resolv.conf");
            }
        }
        r.present = present;
        r.read_for = None;
        if !present {
            r.dns = None;
            return;
        }
        let link = self.primary_link(&self.compute());
        self.read_resolved(link).await;
    }

    async fn read_resolved(&mut self, link: Option<u32>) {
        let Some(r) = &mut self.resolved else { return };
        r.read_for = Some(link);
        match tokio::time::timeout(BUS_TIMEOUT, r.bus.read(link)).await {
            Ok(Ok(view)) => {
                let (dns, skipped) = underlying_dns(&view);
                for e in skipped {
                    tracing::warn!("systemd-resolved: {e}; skipped");
                }
                r.dns = Some(dns);
            }
            Ok(Err(e)) => tracing::warn!(
                "systemd-resolved: reading the DNS of link {link:?}: {e}; keeping the previous DNS"
            ),
            Err(_) => tracing::warn!(
                "systemd-resolved: no answer in {BUS_TIMEOUT:?}; keeping the previous DNS"
            ),
        }
    }

    /// The snapshot, with resolved's DNS read again first when the primary
    /// uplink moved to another link.
    async fn follow_primary(&mut self) -> NetworkSnapshot {
        let snap = self.compute();
        let link = self.primary_link(&snap);
        match &self.resolved {
            Some(r) if r.present && r.read_for != Some(link) => {
                self.read_resolved(link).await;
                self.compute()
            }
            _ => snap,
        }
    }

    async fn full_dump(&mut self) -> Result<(), ObserverError> {
        self.state.clear();
        for (what, req) in [
            (
                "links",
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
            ),
            (
                "addresses",
                RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            ),
            (
                "routes",
                RouteNetlinkMessage::GetRoute(RouteMessage::default()),
            ),
        ] {
            let msgs = self
                .dumper
                .dump(req)
                .await
                .map_err(|source| ObserverError::Dump { what, source })?;
            for m in &msgs {
                self.state.apply_netlink(m);
            }
        }
        self.state.take_route_resync();
        Ok(())
    }

    async fn route_dump(&mut self) -> io::Result<()> {
        let msgs = self
            .dumper
            .dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()))
            .await?;
        self.state.clear_routes();
        for m in &msgs {
            self.state.apply_netlink(m);
        }
        Ok(())
    }

    fn reload_ssid_file(&mut self) {
        let Some(p) = &self.ssid_file else { return };
        match read_ssid_file(p) {
            Ok(m) => {
                self.ssid_map = m;
                self.ssid_error.send_replace(None);
            }
            Err(e) => {
                tracing::warn!("SSID file refused, keeping the previous SSIDs: {e}");
                self.ssid_error.send_replace(Some(e.to_string()));
            }
        }
    }

    fn reload_dns(&mut self) {
        let Some(p) = &self.resolv_conf else { return };
        match read_resolv_conf(p) {
            Ok(d) => self.resolv_dns = d,
            Err(e) => tracing::warn!("{}: {e}; keeping the previous DNS", p.display()),
        }
    }

    fn requery_wifi(&mut self) {
        let Some(n) = &mut self.nl80211 else { return };
        match n.interfaces() {
            Ok(list) => {
                self.nl80211_ssids = list.iter().map(|i| (i.ifindex, i.ssid.clone())).collect();
                let set: BTreeSet<u32> = list.iter().map(|i| i.ifindex).collect();
                self.classifier.set_nl80211_interfaces(set);
            }
            Err(e) => tracing::warn!("nl80211 interface query: {e}"),
        }
    }

    /// Something may have changed at `now`: emit at once on a leading
    /// edge, else remember it for the window's end.
    async fn touched(&mut self, now: Instant, out: &Emitter) {
        let snap = self.follow_primary().await;
        if snap == self.emitted {
            self.coalescer.cancel_pending();
            return;
        }
        if self.coalescer.on_change(now) {
            self.emit(snap, out);
        }
    }

    async fn window_ended(&mut self, now: Instant, out: &Emitter) {
        if self.coalescer.on_timeout(now) {
            let snap = self.follow_primary().await;
            if snap != self.emitted {
                self.emit(snap, out);
            }
        }
    }

    fn emit(&mut self, snap: NetworkSnapshot, out: &Emitter) {
        let old = std::mem::replace(&mut self.emitted, snap.clone());
        let change = Change {
            diff: diff(&old, &snap),
            old,
            new: snap.clone(),
            at: SystemTime::now(),
        };
        tracing::info!("network: {}", change.diff);
        out.snapshot.send_replace(snap);
        let _ = out.changes.send(change);
    }
}

struct Emitter {
    snapshot: watch::Sender<NetworkSnapshot>,
    changes: broadcast::Sender<Change>,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    mut core: Core,
    overruns: Arc<AtomicU64>,
    events: AsyncFd<Socket>,
    wifi: Option<AsyncFd<Socket>>,
    mut files: mpsc::UnboundedReceiver<FileEvent>,
    mut resolved_events: Option<mpsc::UnboundedReceiver<()>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    snapshot: watch::Sender<NetworkSnapshot>,
    changes: broadcast::Sender<Change>,
    _watches: Vec<FileWatch>,
) {
    let out = Emitter { snapshot, changes };
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 18);
    let mut files_open = true;
    let mut commands_open = true;
    loop {
        let deadline = core.coalescer.deadline();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let resolved_ready = async {
            match &mut resolved_events {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let wifi_ready = async {
            match &wifi {
                Some(w) => w.readable().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Commands first: an override sent before a file changes is in
            // force when the change is read.
            biased;
            cmd = commands.recv(), if commands_open => {
                match cmd {
                    Some(Command::Exclusions(e)) => core.exclusions = e,
                    Some(Command::ResolvConfOverride(d)) => core.resolv_override = d,
                    Some(Command::Resync) => {
                        if let Err(e) = core.full_dump().await {
                            tracing::error!("{e}");
                        }
                        core.reload_ssid_file();
                        core.reload_dns();
                        core.recheck_resolved().await;
                        core.requery_wifi();
                    }
                    Some(Command::Classifier(c)) => {
                        let nl = core.nl80211_ssids.keys().copied().collect();
                        core.classifier = *c;
                        core.classifier.set_nl80211_interfaces(nl);
                    }
                    None => commands_open = false,
                }
                core.touched(Instant::now(), &out).await;
            }
            r = events.readable() => {
                let mut guard = match r {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::error!("rtnetlink event socket: {e}; the observer stops");
                        return;
                    }
                };
                let mut overrun = false;
                let mut any = false;
                loop {
                    buf.clear();
                    match guard.get_inner().recv(&mut buf, libc::MSG_DONTWAIT) {
                        Ok(_) => {
                            any = true;
                            for m in decode_all(&buf) {
                                core.state.apply_netlink(&m);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            guard.clear_ready();
                            break;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            overrun = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::error!("rtnetlink event socket: {e}; the observer stops");
                            return;
                        }
                    }
                }
                drop(guard);
                if overrun {
                    overruns.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("rtnetlink events overran; dumping everything again");
                    if let Err(e) = core.full_dump().await {
                        tracing::error!("{e}");
                    }
                } else if core.state.take_route_resync() {
                    if let Err(e) = core.route_dump().await {
                        tracing::warn!("rtnetlink route re-dump: {e}");
                    }
                }
                if any || overrun {
                    core.touched(Instant::now(), &out).await;
                }
            }
            r = wifi_ready => {
                let mut requery = false;
                if let (Ok(mut guard), Some(w)) = (r, &wifi) {
                    loop {
                        buf.clear();
                        match w.get_ref().recv(&mut buf, libc::MSG_DONTWAIT) {
                            Ok(_) => {
                                for f in nl80211::frames(&buf).flatten() {
                                    if let Ok((cmd, _)) = nl80211::genl(f.payload) {
                                        requery |= nl80211::is_requery_trigger(cmd);
                                    }
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                guard.clear_ready();
                                break;
                            }
                            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => requery = true,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                tracing::warn!("nl80211 events: {e}");
                                guard.clear_ready();
                                break;
                            }
                        }
                    }
                }
                if requery {
                    core.requery_wifi();
                    core.touched(Instant::now(), &out).await;
                }
            }
            ev = files.recv(), if files_open => {
                match ev {
                    Some(FileEvent::Ssid) => core.reload_ssid_file(),
                    Some(FileEvent::Dns) => core.reload_dns(),
                    Some(FileEvent::Resolved) => core.recheck_resolved().await,
                    None => files_open = false,
                }
                core.touched(Instant::now(), &out).await;
            }
            ev = resolved_ready => {
                match ev {
                    Some(()) => {
                        // A burst of signals is one look.
                        if let Some(rx) = &mut resolved_events {
                            while rx.try_recv().is_ok() {}
                        }
                        core.recheck_resolved().await;
                    }
                    None => {
                        tracing::warn!("the system bus connection closed; systemd-resolved is no longer followed");
                        resolved_events = None;
                        core.resolved = None;
                    }
                }
                core.touched(Instant::now(), &out).await;
            }
            () = sleep => {
                core.window_ended(Instant::now(), &out).await;
            }
        }
    }
}

/// Decodes every rtnetlink message of a datagram as the observer receives
/// it from the kernel; undecodable ones are logged and skipped. Public so
/// that the fuzz targets can feed [`NetState`](crate::NetState) exactly
/// what the observer would.
pub fn decode_all(buf: &[u8]) -> Vec<NetlinkMessage<RouteNetlinkMessage>> {
    let mut out = Vec::new();
    let mut offset = 0;
    for f in nl80211::frames(buf) {
        let f = match f {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("rtnetlink: {e}");
                break;
            }
        };
        let len = 16 + f.payload.len();
        let Some(bytes) = buf.get(offset..offset + len) else {
            break;
        };
        offset = (offset + len + 3) & !3;
        if f.kind == NLMSG_DONE || f.kind == NLMSG_ERROR {
            continue;
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) {
            Ok(m) => out.push(m),
            Err(e) => tracing::debug!("rtnetlink message type {} skipped: {e}", f.kind),
        }
    }
    out
}

fn event_socket(rcvbuf: usize) -> io::Result<AsyncFd<Socket>> {
    let mut s = Socket::new(NETLINK_ROUTE)?;
    s.bind_auto()?;
    for g in [
        RTNLGRP_LINK,
        RTNLGRP_IPV4_IFADDR,
        RTNLGRP_IPV6_IFADDR,
        RTNLGRP_IPV4_ROUTE,
        RTNLGRP_IPV6_ROUTE,
    ] {
        s.add_membership(g)?;
    }
    s.set_rx_buf_sz(rcvbuf)?;
    s.set_non_blocking(true)?;
    async_fd(s)
}

fn async_fd(s: Socket) -> io::Result<AsyncFd<Socket>> {
    // SAFETY: the Socket owns its fd; the AsyncFd owns the Socket and
    // neither closes nor replaces the fd while registered.
    unsafe { Ok(AsyncFd::register(s)?) }
}

/// Request/response socket for dumps, separate from the event socket so a
/// dump never interleaves with events.
struct Dumper {
    socket: AsyncFd<Socket>,
    seq: u32,
}

impl Dumper {
    fn new() -> io::Result<Dumper> {
        let mut s = Socket::new(NETLINK_ROUTE)?;
        s.bind_auto()?;
        s.connect(&SocketAddr::new(0, 0))?;
        s.set_non_blocking(true)?;
        Ok(Dumper {
            socket: async_fd(s)?,
            seq: 0,
        })
    }

    async fn dump(
        &mut self,
        req: RouteNetlinkMessage,
    ) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
        // A dump interrupted by a change (NLM_F_DUMP_INTR) is retried.
        for _ in 0..5 {
            let (msgs, interrupted) = self.dump_once(req.clone()).await?;
            if !interrupted {
                return Ok(msgs);
            }
        }
        Err(io::Error::other("dump interrupted 5 times in a row"))
    }

    async fn dump_once(
        &mut self,
        req: RouteNetlinkMessage,
    ) -> io::Result<(Vec<NetlinkMessage<RouteNetlinkMessage>>, bool)> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(req));
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        self.socket.get_ref().send(&out, 0)?;
        let mut msgs = Vec::new();
        let mut interrupted = false;
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 18);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut guard = tokio::time::timeout_at(deadline, self.socket.readable())
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no dump reply in 5 s"))??;
            buf.clear();
            match guard.get_inner().recv(&mut buf, libc::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for f in nl80211::frames(&buf) {
                let f = f.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if f.seq != seq {
                    continue;
                }
                if f.flags & netlink_packet_core::NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match f.kind {
                    NLMSG_DONE => return Ok((msgs, interrupted)),
                    NLMSG_ERROR => {
                        let code = nl80211::error_code(f.payload);
                        if code == 0 {
                            return Ok((msgs, interrupted));
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    _ => {}
                }
            }
            for m in decode_all(&buf) {
                if m.header.sequence_number == seq {
                    msgs.push(m);
                }
            }
        }
    }
}
