//! The tunnel's I/O shell: the persistent TUN device, its addresses and
//! routes, the UDP socket, and the `vane-tunnel` process. It carries out
//! the supervisor's actions one at a time and reports what happened.
//!
//! The device and the socket are vaned's: the device is persistent (it
//! outlives any tunnel process, with its addresses and routes), and vaned
//! keeps the socket open across tunnel restarts, so a restarted tunnel
//! gets the very same socket (same port, same mark) as a descriptor. The
//! tunnel process attaches to the device by name (see vane_tunnel::tun for
//! why not by descriptor) and runs with no capabilities at all.
//!
//! The tunnel's lifecycle, file by file: [`plan`] (what the tunnel should
//! be, from the rule file and the wg-quick file), [`supervisor`] (the pure
//! state machine: when to start, restart, back off, stop), this file (the
//! [`Worker`] that carries the supervisor's actions out: device,
//! addresses, routes, rules, kill switch, DNS, process), [`process`]
//! (starting and watching a `vane-tunnel`), [`adopt`] and [`recover`]
//! (what an earlier vaned left: a tunnel to take over, or leftovers to
//! repair), [`uapi_client`] (configuring the tunnel through the
//! userspace API).

use std::io;
use std::net::UdpSocket;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use ipnet::IpNet;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};
use vane_tunnel::model::DeviceConfig;

use crate::dns;
use crate::net::killswitch;
use crate::net::routing::{self, FullTunnel, Rule};
use crate::net::rtnl;

pub mod adopt;
pub mod fdstore;
pub mod plan;
pub mod process;
pub mod recover;
pub mod supervisor;
pub mod uapi_client;

use process::{
    file_id, file_id_of, preflight, resolve_user, spawn, wait_ready, watch_child, watch_pidfd,
    LIVE, STARTING,
};
use recover::remove_stale_rules;
use supervisor::Action;

/// How long a tunnel process gets to stop after SIGTERM.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(3);
const MAIN_TABLE: u32 = 254;

/// Everything needed to bring the tunnel up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub ifname: String,
    pub mtu: u16,
    pub addresses: Vec<IpNet>,
    /// Routes through the tunnel in the main table (the peers' AllowedIPs).
    pub routes: Vec<IpNet>,
    pub device: DeviceConfig,
    pub binary: PathBuf,
    /// `include_all_networks`: policy routing into the tunnel.
    pub full: Option<FullTunnel>,
    /// The tunnel config's `DNS =`, applied while connected.
    pub dns_servers: Vec<std::net::IpAddr>,
    pub dns_search: Vec<String>,
}

/// What the worker reports.
#[derive(Debug)]
pub enum Report {
    Started {
        generation: u64,
        pid: u32,
    },
    Failed {
        generation: u64,
        error: String,
    },
    Stopped,
    /// The binary on disk was compared with the one tunnel process `pid`
    /// runs: `Ok(true)` another file that runs (`--version`), `Ok(false)`
    /// the same file, `Err` another file that does not run, and why.
    BinaryChecked {
        pid: u32,
        new: Result<bool, String>,
    },
    /// The kill switch is (or is not) in place now, and the error of the
    /// last attempt to change it, if it failed.
    KillSwitch {
        active: bool,
        error: Option<String>,
    },
    /// The tunnel's DNS was put back `reasserted` times since the tunnel
    /// started; `error`: why it is not in force although it should be.
    Dns {
        reasserted: u32,
        error: Option<String>,
    },
}

/// The tunnel process's user unless vaned is told another
/// (`--tunnel-user`); the package creates it.
pub const DEFAULT_TUNNEL_USER: &str = "vane-tunnel";

/// A running tunnel process, watched by a task that reports its exit.
struct Running {
    pid: u32,
    /// Tells the watcher the exit is expected (no failure report).
    expect_exit: Option<oneshot::Sender<()>>,
    /// Becomes true when the process has exited.
    exited: watch::Receiver<bool>,
    /// An adopted process (not our child) is signalled through its pidfd.
    pidfd: Option<std::sync::Arc<OwnedFd>>,
    /// The process's executable, held open while it runs. When an upgrade
    /// has replaced the file on disk, the process is the last user of the
    /// old one, and the kernel frees it (its page cache, its blocks) in the
    /// exiting process, before the exit is reported: 5-13 ms measured here
    /// for a 20 MB binary, all of it added to the replacement's traffic
    /// gap. Held here, the old file is freed after the successor runs.
    exe: Option<std::fs::File>,
}

pub struct Worker {
    plan: Plan,
    socket: Option<UdpSocket>,
    running: Option<Running>,
    reports: mpsc::UnboundedSender<Report>,
    /// The uplinks' directly attached subnets, for the full tunnel's rules.
    locals: Vec<IpNet>,
    /// The policy routing rules in place (full tunnel).
    rules: Vec<Rule>,
    /// The device is set up (between a start and a stop).
    up: bool,
    /// The daemon wants the kill switch (full tunnel only); `None` until
    /// it has said so: until then the kill switch is left as it is (a
    /// table an earlier run left stays in place), whatever else changes.
    protect: Option<bool>,
    /// The kill switch in place, as last applied.
    shield: Option<killswitch::Spec>,
    /// A kill switch table left by an earlier vaned may be in place.
    stale_shield: bool,
    /// A captive portal exemption the kill switch carries, while open.
    portal: Option<killswitch::PortalExemption>,
    /// The tunnel's DNS, and the observer's view of the network's DNS.
    dns: Option<TunnelDnsShell>,
    /// The tunnel's DNS put back after someone replaced it, since the
    /// tunnel started.
    reasserts: dns::Reasserts,
    /// The binary on disk (device, inode) that failed to start when the
    /// previous one could, and why: later starts go to the previous one
    /// while it is still the file there.
    bad_binary: Option<((u64, u64), String)>,
    /// The user the tunnel process runs as (vaned's `--tunnel-user`).
    user: String,
}

/// What the worker needs to apply the tunnel's DNS.
pub struct TunnelDnsShell {
    pub manager: dns::DnsManager,
    /// Tells the observer the network's own resolv.conf while ours stands
    /// in its place.
    pub observer: vane_observer::ResolvConfOverride,
    pub resolv_conf: PathBuf,
    pub state_dir: PathBuf,
    /// Our DNS is in place.
    pub applied: bool,
}

impl TunnelDnsShell {
    /// Tells the observer that `resolv_conf` (bytes) is the network's DNS.
    fn observe(&self, resolv_conf: &[u8]) {
        let text = String::from_utf8_lossy(resolv_conf);
        self.observer
            .set(Some(vane_observer::dns::parse_resolv_conf(&text)));
    }

    /// While ours stands in place: the network's resolv.conf is the one in
    /// the backup; the observer is told it.
    fn observe_backup(&self) {
        if let Ok(Some(bytes)) = dns::underlying_resolv_conf(&self.resolv_conf, &self.state_dir) {
            self.observe(&bytes);
        }
    }
}

impl Worker {
    pub fn new(plan: Plan, reports: mpsc::UnboundedSender<Report>) -> Worker {
        Worker {
            plan,
            socket: None,
            running: None,
            reports,
            locals: Vec::new(),
            rules: Vec::new(),
            up: false,
            protect: None,
            shield: None,
            stale_shield: false,
            portal: None,
            dns: None,
            reasserts: dns::Reasserts::default(),
            bad_binary: None,
            user: DEFAULT_TUNNEL_USER.to_owned(),
        }
    }

    /// The user the tunnel process runs as from its next start.
    pub fn set_user(&mut self, user: String) {
        self.user = user;
    }

    /// Enables the tunnel DNS (`DNS =` of the tunnel config).
    pub fn set_dns(&mut self, shell: TunnelDnsShell) {
        self.dns = Some(shell);
    }

    /// Puts the tunnel's DNS in place (again). The observer is first told
    /// what the network's own resolv.conf says, so the rules go on seeing
    /// the network's DNS, not the tunnel's.
    async fn apply_dns(&mut self, ifindex: u32) -> Result<(), dns::DnsError> {
        let plan = &self.plan;
        let Some(shell) = &mut self.dns else {
            return Ok(());
        };
        if plan.dns_servers.is_empty() && !shell.applied {
            return Ok(());
        }
        if shell.manager.backend() != dns::Backend::Resolved && !plan.dns_servers.is_empty() {
            let underlying =
                // Ours in place: the network's is in the backup (`Some`).
                // Not ours and nothing applied yet: the file is the
                // network's. Not ours but applied (resolvconf's file with
                // ours in it): the override stands.
                match dns::underlying_resolv_conf(&shell.resolv_conf, &shell.state_dir)? {
                    None if !shell.applied => {
                        Some(std::fs::read(&shell.resolv_conf).unwrap_or_default())
                    }
                    other => other,
                };
            if let Some(bytes) = underlying {
                shell.observe(&bytes);
            }
        }
        let tunnel_dns = dns::TunnelDns {
            servers: plan.dns_servers.clone(),
            search: plan.dns_search.clone(),
            full_tunnel: plan.full.is_some(),
        };
        shell
            .manager
            .apply(&plan.ifname, ifindex, &tunnel_dns)
            .await?;
        shell.applied = !plan.dns_servers.is_empty();
        if shell.applied {
            // A resolv.conf someone wrote over ours has just become the
            // network's (in the backup): the observer reads it from there.
            shell.observe_backup();
        } else {
            shell.observer.set(None);
        }
        Ok(())
    }

    /// The tunnel's DNS may have been changed by another program (the
    /// file backend's resolv.conf replaced by a DHCP client, resolvconf's
    /// entry deleted or outranked, the link's settings in
    /// systemd-resolved changed): when it is no longer in force it is put
    /// back (the file backend keeps the other file as the network's,
    /// restored when the tunnel goes down). A program that keeps changing
    /// it is reported, not raced forever ([`dns::Reasserts`]), and so is
    /// a change that putting back does not undo (another program's DNS
    /// takes precedence).
    pub async fn check_dns(&mut self) {
        let Some(shell) = &mut self.dns else { return };
        if !self.up || !shell.applied || self.reasserts.gave_up {
            return;
        }
        let index = rtnl::link_index(&self.plan.ifname).unwrap_or(0);
        let tunnel_dns = dns::TunnelDns {
            servers: self.plan.dns_servers.clone(),
            search: self.plan.dns_search.clone(),
            full_tunnel: self.plan.full.is_some(),
        };
        match shell.manager.in_force(index, &tunnel_dns).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                warn!(interface = %self.plan.ifname, "cannot check the tunnel's DNS: {e}");
                return;
            }
        }
        let backend = shell.manager.backend();
        let what = match backend {
            dns::Backend::File => format!("{} was replaced", shell.resolv_conf.display()),
            dns::Backend::Resolvconf => format!(
                "the tunnel's servers are no longer first in {} (resolvconf)",
                shell.resolv_conf.display()
            ),
            dns::Backend::Resolved => {
                "systemd-resolved's settings for the tunnel's link were changed".to_owned()
            }
        };
        let had_given_up = self.reasserts.gave_up;
        if !self.reasserts.allow(std::time::Instant::now()) {
            if !had_given_up {
                let why = format!(
                    "{what}, by another program, {} times within {} s; vaned stopped putting the tunnel's DNS back",
                    dns::REASSERT_MAX + 1,
                    dns::REASSERT_WINDOW.as_secs()
                );
                error!(interface = %self.plan.ifname, "{why}");
                let _ = self.reports.send(Report::Dns {
                    reasserted: self.reasserts.total,
                    error: Some(why),
                });
            }
            return;
        }
        warn!(interface = %self.plan.ifname, backend = ?backend, "{what} while the tunnel's DNS is on: put back");
        let error = match self.apply_dns(index).await {
            Err(e) => {
                error!(interface = %self.plan.ifname, "cannot put the tunnel's DNS back: {e}");
                Some(format!("cannot put the tunnel's DNS back: {e}"))
            }
            Ok(()) => match self.dns.as_mut() {
                Some(shell) => match shell.manager.in_force(index, &tunnel_dns).await {
                    Ok(false) => {
                        let why = format!("{what}, and putting it back did not help: another program's DNS takes precedence");
                        error!(interface = %self.plan.ifname, "{why}");
                        Some(why)
                    }
                    _ => None,
                },
                None => None,
            },
        };
        let _ = self.reports.send(Report::Dns {
            reasserted: self.reasserts.total,
            error,
        });
    }

    /// Whether the tunnel's DNS goes through systemd-resolved, whose
    /// changes vaned is not told of: polled (see daemon.rs).
    pub fn dns_polled(&self) -> bool {
        self.dns
            .as_ref()
            .is_some_and(|d| d.applied && d.manager.backend() == dns::Backend::Resolved)
    }

    /// Takes the tunnel's DNS away, restoring what was there exactly.
    async fn revert_dns(&mut self, ifindex: u32) {
        let Some(shell) = &mut self.dns else { return };
        if !shell.applied {
            return;
        }
        match shell.manager.revert(&self.plan.ifname, ifindex).await {
            Ok(()) => {
                shell.applied = false;
                shell.observer.set(None);
            }
            Err(e) => error!(interface = %self.plan.ifname, "cannot restore the DNS: {e}"),
        }
    }

    /// A kill switch table is in place from an earlier run: the first
    /// decision replaces or removes it.
    pub fn adopt_stale_kill_switch(&mut self) {
        self.stale_shield = true;
    }

    /// The UDP socket every tunnel process of this worker is given, kept
    /// in systemd's descriptor store too (see [`fdstore`]).
    fn set_socket(&mut self, socket: Option<UdpSocket>) {
        match &socket {
            Some(s) => fdstore::store(&self.plan.ifname, s),
            None if self.socket.is_some() => fdstore::forget(&self.plan.ifname),
            None => {}
        }
        self.socket = socket;
    }

    /// A UDP socket kept from an earlier run (systemd's descriptor store)
    /// that no running tunnel uses: the next start takes it rather than
    /// binding the port again (which the kept copy would refuse). Not of
    /// this plan's port: closed.
    pub fn reuse_socket(&mut self, socket: UdpSocket) {
        let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
        let wanted = self.plan.device.listen_port;
        if self.socket.is_none() && (wanted == 0 || wanted == port) {
            debug!(interface = %self.plan.ifname, port, "reusing the UDP socket kept by systemd");
            self.set_socket(Some(socket));
        } else {
            drop(socket);
            fdstore::forget(&self.plan.ifname);
        }
    }

    /// Whether the kill switch should block traffic outside the tunnel.
    pub fn set_protect(&mut self, on: bool) {
        self.protect = Some(on);
        self.sync_kill_switch();
    }

    /// Opens (`Some`) or closes the kill switch's captive portal
    /// exemption.
    pub fn set_portal(&mut self, portal: Option<killswitch::PortalExemption>) {
        if self.portal != portal {
            self.portal = portal;
            self.sync_kill_switch();
        }
    }

    /// The kill switch the plan and the local subnets make.
    fn shield_spec(&self, ft: &FullTunnel) -> killswitch::Spec {
        killswitch::Spec {
            tunnel_if: self.plan.ifname.clone(),
            fwmark: ft.fwmark,
            allow_nets: routing::kill_switch_allowed(ft, &self.locals),
            block_dns: !self.plan.dns_servers.is_empty(),
            portal: self.portal.clone(),
        }
    }

    /// Makes the kill switch what the plan, the local subnets and the
    /// daemon's wish say. `apply` replaces the table in one transaction,
    /// so a change (new local subnets) never opens a gap.
    fn sync_kill_switch(&mut self) {
        let Some(protect) = self.protect else {
            return;
        };
        let want = match (&self.plan.full, protect) {
            (Some(ft), true) => Some(self.shield_spec(ft)),
            _ => None,
        };
        if want == self.shield && !self.stale_shield {
            return;
        }
        // nft runs as a child process (milliseconds): tell the runtime this
        // thread blocks, so the daemon's loop keeps its own.
        let change = || match &want {
            Some(spec) => killswitch::apply(spec),
            None => killswitch::remove(),
        };
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let result = if multi_thread {
            tokio::task::block_in_place(change)
        } else {
            change()
        };
        let error = match result {
            Ok(()) => {
                self.shield = want;
                self.stale_shield = false;
                None
            }
            Err(e) => {
                error!(interface = %self.plan.ifname, "{e}");
                Some(e.to_string())
            }
        };
        let _ = self.reports.send(Report::KillSwitch {
            active: self.shield.is_some() || self.stale_shield,
            error,
        });
    }

    /// The uplinks' subnets changed: the full tunnel's rules follow.
    pub fn set_locals(&mut self, locals: Vec<IpNet>) {
        if locals == self.locals {
            return;
        }
        self.locals = locals;
        self.sync_kill_switch();
        if self.up {
            if let Err(e) = self.sync_rules() {
                warn!(interface = %self.plan.ifname, "policy routing rules: {e}");
            }
        }
    }

    /// Makes the policy routing rules what the plan and the local subnets
    /// ask for: new ones are added before old ones go, so no packet meets
    /// a moment without a rule.
    fn sync_rules(&mut self) -> io::Result<()> {
        let want = match &self.plan.full {
            Some(ft) if self.up => routing::rules(ft, &self.locals),
            _ => Vec::new(),
        };
        let new: Vec<Rule> = want
            .iter()
            .filter(|r| !self.rules.contains(r))
            .copied()
            .collect();
        for r in &new {
            rtnl::add_rule(r).map_err(|e| io::Error::new(e.kind(), format!("rule {r:?}: {e}")))?;
            self.rules.push(*r);
        }
        let stale: Vec<Rule> = self
            .rules
            .iter()
            .filter(|r| !want.contains(r))
            .copied()
            .collect();
        for r in stale {
            rtnl::delete_rule(&r)
                .map_err(|e| io::Error::new(e.kind(), format!("rule {r:?}: {e}")))?;
            self.rules.retain(|x| *x != r);
        }
        Ok(())
    }

    /// A new plan (the configuration changed); used from the next start.
    pub fn set_plan(&mut self, plan: Plan) {
        self.plan = plan;
        self.sync_kill_switch();
    }

    /// Carries out one action.
    pub async fn act(&mut self, action: Action) {
        match action {
            Action::Start { generation } => {
                let report = match self.start(generation).await {
                    Ok((pid, fallback)) => {
                        let _ = self.reports.send(Report::Started { generation, pid });
                        match fallback {
                            // After Started, which clears a refusal.
                            Some(why) => Report::BinaryChecked { pid, new: Err(why) },
                            None => return,
                        }
                    }
                    Err(e) => {
                        warn!(interface = %self.plan.ifname, "tunnel start failed: {e:#}");
                        self.kill().await;
                        Report::Failed {
                            generation,
                            error: format!("{e:#}"),
                        }
                    }
                };
                let _ = self.reports.send(report);
            }
            Action::Stop => {
                self.stop().await;
                let _ = self.reports.send(Report::Stopped);
            }
            Action::ArmTimer(_) => {}
        }
    }

    /// Starts the tunnel process of `generation`; returns its pid, and why
    /// it runs the previous binary rather than the one on disk, if so.
    async fn start(&mut self, generation: u64) -> anyhow::Result<(u32, Option<String>)> {
        // The old process's executable is let go a while after the new one
        // runs (see Running::exe), off this task: freeing a replaced binary
        // takes milliseconds, better spent after the new handshake.
        let old_exe = self.running.as_mut().and_then(|r| r.exe.take());
        let on_disk = file_id(&self.plan.binary);
        let known_bad = self
            .bad_binary
            .as_ref()
            .filter(|(id, _)| Some(*id) == on_disk);
        let mut fallback = None;
        let mut started = match (known_bad, &old_exe) {
            // It failed before: straight to the previous binary.
            (Some((_, why)), Some(exe)) => {
                fallback = Some(why.clone());
                self.start_process(generation, Some(exe)).await
            }
            _ => self.start_process(generation, None).await,
        };
        if let (Err(e), Some(exe), None) = (&started, &old_exe, &fallback) {
            // The binary on disk does not start (a bad upgrade that got
            // past `--version`): the one that ran before still can, from
            // the file held open. A tunnel that was up stays up.
            if on_disk.is_some() && file_id_of(exe) != on_disk {
                warn!(interface = %self.plan.ifname, "the tunnel binary on disk did not start ({e:#}); starting the previous one");
                let why = format!(
                    "{} did not start: {e:#}; the previous binary runs",
                    self.plan.binary.display()
                );
                if let Some(id) = on_disk {
                    self.bad_binary = Some((id, why.clone()));
                }
                started = self.start_process(generation, Some(exe)).await;
                fallback = Some(why);
            }
        }
        if let Some(exe) = old_exe {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = tokio::task::spawn_blocking(move || drop(exe)).await;
            });
        }
        started.map(|pid| (pid, fallback))
    }

    /// Starts a tunnel process from the binary on disk, or from `exe` (a
    /// file held open) when given.
    async fn start_process(
        &mut self,
        generation: u64,
        exe: Option<&std::fs::File>,
    ) -> anyhow::Result<u32> {
        use anyhow::Context as _;
        // A process of an older generation (it failed) must be gone first.
        self.kill().await;
        let creds = resolve_user(&self.user).map_err(anyhow::Error::msg)?;
        let index = self
            .ensure_device(creds.uid)
            .context("setting up the interface")?;
        if self.socket.is_none() {
            let s = vane_tunnel::device::bind_udp_std(
                self.plan.device.listen_port,
                self.plan.device.fwmark,
            )
            .with_context(|| format!("cannot bind UDP port {}", self.plan.device.listen_port))?;
            self.set_socket(Some(s));
        }
        let Some(socket) = self.socket.as_ref() else {
            anyhow::bail!("no UDP socket");
        };
        let port = socket.local_addr()?.port();
        // Bound here, as root, where wg(8) looks (mode 0600: only root may
        // use it); the tunnel listens on it, and cannot create or remove
        // anything there itself.
        let api = vane_tunnel::uapi_server::bind_unlistened(
            std::path::Path::new(vane_tunnel::uapi_server::SOCKET_DIR),
            &self.plan.ifname,
        )
        .context("the userspace API socket")?;
        let exe = match exe {
            Some(f) => f.try_clone(),
            None => std::fs::File::open(&self.plan.binary),
        }
        .with_context(|| format!("cannot open {}", self.plan.binary.display()))?;
        let (child, ready) =
            spawn(&self.plan, socket, &api, &exe, creds).context("cannot start vane-tunnel")?;
        drop(api);
        let pid = child.id().unwrap_or(0);
        fdstore::store_exe(&self.plan.ifname, pid, &exe);
        info!(interface = %self.plan.ifname, pid, generation, ifindex = index, "tunnel process started");
        let (expect_tx, expect_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = watch::channel(false);
        let reports = self.reports.clone();
        let phase = std::sync::Arc::new(AtomicU8::new(STARTING));
        tokio::spawn(watch_child(
            child,
            generation,
            expect_rx,
            exited_tx,
            reports,
            std::sync::Arc::clone(&phase),
        ));
        self.running = Some(Running {
            pid,
            expect_exit: Some(expect_tx),
            exited: exited_rx,
            pidfd: None,
            exe: Some(exe),
        });
        let path = uapi_client::socket_path(&self.plan.ifname);
        let mut config = self.plan.device.clone();
        config.listen_port = port;
        wait_ready(ready).await?;
        uapi_client::set(&path, &config)
            .await
            .context("configuring the tunnel")?;
        // From here its exit is the watcher's to report; before, this
        // start reports it (as a failed start, which may be retried with
        // the previous binary). Exactly one of the two wins the exchange.
        if phase
            .compare_exchange(STARTING, LIVE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            anyhow::bail!("vane-tunnel exited while starting");
        }
        // Only now, with a process reading the device and knowing its
        // peers, does traffic go into it: a packet routed into a device
        // that nobody reads is dropped after its sender was told it went
        // out (boringtun queues what it reads before the handshake).
        self.route_into(index)
            .context("routing into the interface")?;
        self.up = true;
        self.sync_rules().context("policy routing")?;
        if self.reasserts.total > 0 || self.reasserts.gave_up {
            self.reasserts = dns::Reasserts::default();
            let _ = self.reports.send(Report::Dns {
                reasserted: 0,
                error: None,
            });
        }
        if let Err(e) = self.apply_dns(index).await {
            // A full tunnel without its DNS would send every name to the
            // network's resolver: fail (the kill switch holds, the
            // supervisor retries, the status says why). A split tunnel
            // goes on with the network's DNS.
            if self.plan.full.is_some() {
                return Err(e).context("the tunnel's DNS");
            }
            warn!(interface = %self.plan.ifname, "the tunnel's DNS: {e}");
        }
        Ok(pid)
    }

    /// Creates the persistent device when it does not exist, and gives it
    /// the plan's addresses (idempotent: a device left by an earlier vaned
    /// is reused). A new device stays down, so nothing is routed into it
    /// before a tunnel process reads it: see [`route_into`](Self::route_into).
    fn ensure_device(&self, owner: u32) -> io::Result<u32> {
        let plan = &self.plan;
        let index = match rtnl::link_index(&plan.ifname) {
            Some(i) => {
                // Left by an earlier run, perhaps for a tunnel of another
                // uid (an upgrade from a vaned that ran it as root): given
                // to this one (nobody is attached: the old process is gone).
                if vane_tunnel::tun::owner(&plan.ifname) != Some(owner) {
                    vane_tunnel::tun::set_persistent_owner(&plan.ifname, owner).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("giving {} to uid {owner}: {e}", plan.ifname),
                        )
                    })?;
                }
                i
            }
            None => {
                // Owned by the tunnel's uid: the tunnel runs as it, without
                // capabilities, and attaches by name.
                vane_tunnel::tun::create_persistent(&plan.ifname, plan.mtu, owner).map_err(
                    |e| io::Error::new(e.kind(), format!("creating {}: {e}", plan.ifname)),
                )?;
                rtnl::link_index(&plan.ifname)
                    .ok_or_else(|| io::Error::other("the device vanished after creation"))?
            }
        };
        for a in &plan.addresses {
            rtnl::add_address(index, *a)
                .map_err(|e| io::Error::new(e.kind(), format!("address {a}: {e}")))?;
        }
        Ok(index)
    }

    /// Brings the device up and adds the routes into it (the peers'
    /// AllowedIPs in the main table; a full tunnel's default routes in
    /// vane's table); idempotent.
    fn route_into(&self, index: u32) -> io::Result<()> {
        let plan = &self.plan;
        rtnl::set_up(index).map_err(|e| io::Error::new(e.kind(), format!("link up: {e}")))?;
        for r in &plan.routes {
            rtnl::add_route(index, *r, MAIN_TABLE)
                .map_err(|e| io::Error::new(e.kind(), format!("route {r}: {e}")))?;
        }
        if let Some(ft) = &plan.full {
            for r in routing::table_routes() {
                rtnl::add_route(index, r, ft.table()).map_err(|e| {
                    io::Error::new(e.kind(), format!("route {r} table {}: {e}", ft.table()))
                })?;
            }
        }
        Ok(())
    }

    /// Removes the routes `route_into` added, and the addresses with the
    /// prefix routes they made (the link stays up).
    fn unroute(&self, index: u32) {
        let plan = &self.plan;
        for a in &plan.addresses {
            if let Err(e) = rtnl::delete_address(index, *a) {
                debug!(interface = %plan.ifname, "address {a}: {e}");
            }
        }
        let mut routes: Vec<(IpNet, u32)> = plan.routes.iter().map(|r| (*r, MAIN_TABLE)).collect();
        if let Some(ft) = &plan.full {
            routes.extend(routing::table_routes().into_iter().map(|r| (r, ft.table())));
        }
        for (r, table) in routes {
            if let Err(e) = rtnl::delete_route(index, r, table) {
                debug!(interface = %plan.ifname, "route {r} table {table}: {e}");
            }
        }
    }

    /// The machine woke up: the running tunnel process (if any) starts a
    /// handshake with every peer now (SIGUSR1, see vane-tunnel), rather
    /// than sending on a session the peer may have dropped while the
    /// machine slept and noticing only when its timers expire.
    pub fn wake(&self) {
        let Some(running) = &self.running else {
            return;
        };
        let sig = nix::sys::signal::Signal::SIGUSR1;
        // A vane-tunnel older than this vaned (adopted after an upgrade)
        // may not handle SIGUSR1, and would die of it.
        let status = std::fs::read_to_string(format!("/proc/{}/status", running.pid));
        if !status.is_ok_and(|s| catches(&s, sig)) {
            debug!(pid = running.pid, "the tunnel process does not handle SIGUSR1 (an older binary); not told to handshake now");
            return;
        }
        let sent = match &running.pidfd {
            Some(fd) => crate::tunnel::adopt::pidfd_signal(fd, sig),
            None => nix::sys::signal::kill(nix::unistd::Pid::from_raw(running.pid as i32), sig)
                .map_err(std::io::Error::from),
        };
        match sent {
            Ok(()) => debug!(pid = running.pid, "told the tunnel to handshake now"),
            Err(e) => warn!(
                pid = running.pid,
                "cannot tell the tunnel to handshake now: {e}"
            ),
        }
    }

    /// Stops the tunnel process, if any: SIGTERM, then SIGKILL.
    async fn kill(&mut self) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        if let Some(tx) = running.expect_exit.take() {
            let _ = tx.send(());
        }
        let pid = nix::unistd::Pid::from_raw(running.pid as i32);
        let signal = |sig| match &running.pidfd {
            Some(fd) => {
                let _ = crate::tunnel::adopt::pidfd_signal(fd, sig);
            }
            None => {
                let _ = nix::sys::signal::kill(pid, sig);
            }
        };
        signal(nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(STOP_TIMEOUT, running.exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            warn!(pid = running.pid, "tunnel process ignored SIGTERM; SIGKILL");
            signal(nix::sys::signal::Signal::SIGKILL);
            let _ = tokio::time::timeout(STOP_TIMEOUT, running.exited.wait_for(|e| *e)).await;
        }
        fdstore::forget_exe(&self.plan.ifname, running.pid);
        // Its userspace API socket (vaned bound it; the tunnel cannot
        // remove it): wg(8) finds no interface rather than a dead one.
        if let Err(e) = vane_tunnel::uapi_server::remove_stale(
            std::path::Path::new(vane_tunnel::uapi_server::SOCKET_DIR),
            &self.plan.ifname,
        ) {
            debug!(interface = %self.plan.ifname, "the userspace API socket stays: {e}");
        }
    }

    /// Takes over a tunnel process left by an earlier vaned (see
    /// crate::tunnel::adopt): it becomes this worker's running process of
    /// `generation`, and the device, routes, rules, kill switch and DNS in
    /// place are taken as applied. Nothing on the data path is touched
    /// unless its configuration differs from the plan, which is then
    /// applied with `set` (no restart).
    pub async fn adopt(
        &mut self,
        found: crate::tunnel::adopt::Adoptable,
        generation: u64,
        locals: Vec<IpNet>,
        protect: bool,
    ) {
        let crate::tunnel::adopt::Adoptable {
            pid,
            pidfd,
            socket,
            exe,
            config: live,
        } = found;
        let pidfd = std::sync::Arc::new(pidfd);
        let (expect_tx, expect_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = watch::channel(false);
        tokio::spawn(watch_pidfd(
            std::sync::Arc::clone(&pidfd),
            generation,
            expect_rx,
            exited_tx,
            self.reports.clone(),
        ));
        self.running = Some(Running {
            pid,
            expect_exit: Some(expect_tx),
            exited: exited_rx,
            pidfd: Some(pidfd),
            exe,
        });
        if socket.is_some() {
            self.set_socket(socket);
        }
        self.up = true;
        self.locals = locals;
        if let Some(ft) = &self.plan.full {
            self.rules = routing::rules(ft, &self.locals);
        }
        self.protect = Some(protect);
        if let (Some(ft), true, true) = (&self.plan.full, protect, self.stale_shield) {
            // The table in place is the one this plan makes.
            self.shield = Some(self.shield_spec(ft));
            self.stale_shield = false;
            let _ = self.reports.send(Report::KillSwitch {
                active: true,
                error: None,
            });
        } else {
            // No table where one is wanted (put it in place), or one that
            // is not wanted (remove it).
            self.sync_kill_switch();
        }
        self.adopt_dns();
        let diff = crate::tunnel::adopt::differences(&self.plan.device, &live);
        if diff.is_empty() {
            info!(interface = %self.plan.ifname, pid, generation, "adopted the running tunnel process; its configuration matches, nothing changed");
            return;
        }
        info!(interface = %self.plan.ifname, pid, "adopted the running tunnel process; applying the configuration (differs: {})", diff.join(", "));
        let mut config = self.plan.device.clone();
        config.listen_port = live.listen_port;
        let path = uapi_client::socket_path(&self.plan.ifname);
        if let Err(e) = uapi_client::set(&path, &config).await {
            warn!(interface = %self.plan.ifname, "configuring the adopted tunnel: {e}; restarting it");
            // Its exit is reported as a failure: the supervisor restarts it.
            if let Some(r) = &self.running {
                if let Some(fd) = &r.pidfd {
                    let _ =
                        crate::tunnel::adopt::pidfd_signal(fd, nix::sys::signal::Signal::SIGTERM);
                }
            }
        }
    }

    /// The tunnel's DNS of the plan is taken as in place (an earlier vaned
    /// applied it and handed over), and the observer is told the
    /// network's own resolv.conf from the backup.
    fn adopt_dns(&mut self) {
        let plan = &self.plan;
        let Some(shell) = &mut self.dns else { return };
        if plan.dns_servers.is_empty() {
            return;
        }
        shell.applied = true;
        if shell.manager.backend() != dns::Backend::Resolved {
            shell.observe_backup();
        }
    }

    /// Compares the binary on disk with the file the running tunnel process
    /// executes (an upgrade renames a new one over the path) and reports
    /// it; another file is tried (`--version`, without privileges) before
    /// it is reported as one to move to.
    pub async fn check_binary(&mut self) {
        let Some(running) = &self.running else { return };
        let pid = running.pid;
        let Some(running_file) = running.exe.as_ref().and_then(file_id_of) else {
            return;
        };
        let Some(id) = file_id(&self.plan.binary) else {
            // Removed (by an upgrade in progress, say): the rename that
            // puts the new one in place is another event.
            debug!(binary = %self.plan.binary.display(), "tunnel binary missing");
            return;
        };
        let new = if id == running_file {
            Ok(false)
        } else if let Some((_, why)) = self.bad_binary.as_ref().filter(|(bad, _)| *bad == id) {
            Err(why.clone())
        } else {
            match resolve_user(&self.user) {
                Ok(creds) => preflight(&self.plan.binary, creds).await.map(|()| true),
                Err(e) => Err(e),
            }
        };
        let _ = self.reports.send(Report::BinaryChecked { pid, new });
    }

    /// vaned hands over to a successor: the process, device, routes,
    /// rules, kill switch and DNS stay as they are; only the watcher is
    /// told the coming silence is expected.
    pub fn hand_over(&mut self) {
        if let Some(mut r) = self.running.take() {
            if let Some(tx) = r.expect_exit.take() {
                let _ = tx.send(());
            }
            info!(interface = %self.plan.ifname, pid = r.pid, "handing over: the tunnel process, its device, rules, kill switch and DNS stay for the next vaned");
        }
    }

    /// Takes everything down: the process, the device (its routes and
    /// addresses go with it) and the socket.
    pub async fn stop(&mut self) {
        // Nothing more is routed into the device before its reader stops:
        // what the tunnel has read it sends, what comes after finds no
        // route into a device nobody reads.
        self.up = false;
        if let Err(e) = self.sync_rules() {
            warn!(interface = %self.plan.ifname, "removing the policy routing rules: {e}");
            remove_stale_rules();
            self.rules.clear();
        }
        let index = rtnl::link_index(&self.plan.ifname).unwrap_or(0);
        // The routes (and the addresses, whose prefix routes lead into the
        // device too) go before the link: a packet the kernel routed into
        // the device just before reaches its queue (the link still up) and
        // the stopping tunnel drains and sends it. Taking the link down
        // first dropped such a packet on its way (its sender had been told
        // it was sent).
        if index != 0 {
            self.unroute(index);
        }
        self.kill().await;
        if index != 0 {
            if let Err(e) = rtnl::set_down(index) {
                debug!(interface = %self.plan.ifname, "link down: {e}");
            }
        }
        self.revert_dns(index).await;
        if let Some(index) = rtnl::link_index(&self.plan.ifname) {
            if let Err(e) = rtnl::delete_link(index) {
                warn!(interface = %self.plan.ifname, "cannot delete the interface: {e}");
            }
        }
        self.set_socket(None);
        debug!(interface = %self.plan.ifname, "tunnel down");
    }
}

/// Whether a process whose /proc/PID/status is `status` has a handler for
/// `signal` (its `SigCgt` mask).
fn catches(status: &str, signal: nix::sys::signal::Signal) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << (signal as u32 - 1)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn a_handler_is_read_from_sigcgt() {
        // SIGUSR1 (10) is bit 9: 0x200; SIGTERM (15) bit 14: 0x4000.
        let status = "Name:\tvane-tunnel\nSigIgn:\t0000000000001000\nSigCgt:\t0000000180004202\n";
        assert!(catches(status, Signal::SIGUSR1));
        assert!(catches(status, Signal::SIGTERM));
        assert!(!catches(status, Signal::SIGUSR2));
        let old = "SigCgt:\t0000000180004002\n";
        assert!(!catches(old, Signal::SIGUSR1));
        assert!(!catches("SigCgt:\tzz\n", Signal::SIGUSR1));
        assert!(!catches("", Signal::SIGUSR1));
    }
}
