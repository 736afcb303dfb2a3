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

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use ipnet::IpNet;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};
use vane_tunnel::model::DeviceConfig;

use crate::dns;
use crate::net::killswitch;
use crate::net::routing::{self, FullTunnel, Rule};
use crate::net::rtnl;

pub mod adopt;
pub mod plan;
pub mod supervisor;
pub mod uapi_client;

use supervisor::Action;

/// A started process's phase (shared by the start and its watcher): who
/// reports its exit.
const STARTING: u8 = 0;
const LIVE: u8 = 1;
const EXITED_STARTING: u8 = 2;

/// The descriptor number the UDP socket has in the tunnel process.
const UDP_FD: i32 = 3;
/// The descriptor number of the readiness pipe's write end in the tunnel
/// process (`--ready-fd`).
const READY_FD: i32 = 4;
/// How long a tunnel process gets to come up and answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a tunnel process gets to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
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
}

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

/// A file's identity: device and inode.
fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn file_id_of(file: &std::fs::File) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

/// Opens the executable a process runs (the very file, even when a new
/// one has been renamed over its path since).
fn open_exe(pid: u32) -> Option<std::fs::File> {
    match std::fs::File::open(format!("/proc/{pid}/exe")) {
        Ok(f) => Some(f),
        Err(e) => {
            debug!(pid, "cannot hold the tunnel's executable open: {e}");
            None
        }
    }
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
    /// The daemon wants the kill switch (full tunnel only).
    protect: bool,
    /// The kill switch in place, as last applied.
    shield: Option<killswitch::Spec>,
    /// A kill switch table left by an earlier vaned may be in place.
    stale_shield: bool,
    /// The tunnel's DNS, and the observer's view of the network's DNS.
    dns: Option<TunnelDnsShell>,
    /// The binary on disk (device, inode) that failed to start when the
    /// previous one could, and why: later starts go to the previous one
    /// while it is still the file there.
    bad_binary: Option<((u64, u64), String)>,
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
            protect: false,
            shield: None,
            stale_shield: false,
            dns: None,
            bad_binary: None,
        }
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
                let text = String::from_utf8_lossy(&bytes);
                shell
                    .observer
                    .set(Some(vane_observer::dns::parse_resolv_conf(&text)));
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
        if !shell.applied {
            shell.observer.set(None);
        }
        Ok(())
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

    /// Whether the kill switch should block traffic outside the tunnel.
    pub fn set_protect(&mut self, on: bool) {
        self.protect = on;
        self.sync_kill_switch();
    }

    /// Makes the kill switch what the plan, the local subnets and the
    /// daemon's wish say. `apply` replaces the table in one transaction,
    /// so a change (new local subnets) never opens a gap.
    fn sync_kill_switch(&mut self) {
        let want = match (&self.plan.full, self.protect) {
            (Some(ft), true) => Some(killswitch::Spec {
                tunnel_if: self.plan.ifname.clone(),
                fwmark: ft.fwmark,
                allow_nets: routing::kill_switch_allowed(ft, &self.locals),
            }),
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
        let index = self.ensure_device().context("setting up the interface")?;
        self.up = true;
        self.sync_rules().context("policy routing")?;
        let socket = match &self.socket {
            Some(s) => s,
            None => {
                let s = vane_tunnel::device::bind_udp_std(
                    self.plan.device.listen_port,
                    self.plan.device.fwmark,
                )
                .with_context(|| {
                    format!("cannot bind UDP port {}", self.plan.device.listen_port)
                })?;
                self.socket.insert(s)
            }
        };
        let port = socket.local_addr()?.port();
        let (child, ready) = spawn(&self.plan, socket, exe).context("cannot start vane-tunnel")?;
        let pid = child.id().unwrap_or(0);
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
            exe: open_exe(pid),
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

    /// Creates the persistent device when it does not exist, and makes its
    /// addresses, link state and routes what the plan says (idempotent:
    /// a device left by an earlier vaned is reused).
    fn ensure_device(&self) -> io::Result<u32> {
        let plan = &self.plan;
        let index = match rtnl::link_index(&plan.ifname) {
            Some(i) => i,
            None => {
                // Owned by our uid: the tunnel runs as it, without
                // capabilities, and attaches by name.
                vane_tunnel::tun::create_persistent(
                    &plan.ifname,
                    plan.mtu,
                    nix::unistd::geteuid().as_raw(),
                )
                .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", plan.ifname)))?;
                rtnl::link_index(&plan.ifname)
                    .ok_or_else(|| io::Error::other("the device vanished after creation"))?
            }
        };
        for a in &plan.addresses {
            rtnl::add_address(index, *a)
                .map_err(|e| io::Error::new(e.kind(), format!("address {a}: {e}")))?;
        }
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
        Ok(index)
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
            exe: open_exe(pid),
        });
        if socket.is_some() {
            self.socket = socket;
        }
        self.up = true;
        self.locals = locals;
        if let Some(ft) = &self.plan.full {
            self.rules = routing::rules(ft, &self.locals);
        }
        self.protect = protect;
        if let (Some(ft), true, true) = (&self.plan.full, protect, self.stale_shield) {
            // The table in place is the one this plan makes.
            self.shield = Some(killswitch::Spec {
                tunnel_if: self.plan.ifname.clone(),
                fwmark: ft.fwmark,
                allow_nets: routing::kill_switch_allowed(ft, &self.locals),
            });
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
                    let _ = crate::tunnel::adopt::pidfd_signal(fd, nix::sys::signal::Signal::SIGTERM);
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
            if let Ok(Some(bytes)) =
                dns::underlying_resolv_conf(&shell.resolv_conf, &shell.state_dir)
            {
                let text = String::from_utf8_lossy(&bytes);
                shell
                    .observer
                    .set(Some(vane_observer::dns::parse_resolv_conf(&text)));
            }
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
            preflight(&self.plan.binary).await.map(|()| true)
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
        self.kill().await;
        let index = rtnl::link_index(&self.plan.ifname).unwrap_or(0);
        self.revert_dns(index).await;
        self.up = false;
        if let Err(e) = self.sync_rules() {
            warn!(interface = %self.plan.ifname, "removing the policy routing rules: {e}");
            remove_stale_rules();
            self.rules.clear();
        }
        if let Some(index) = rtnl::link_index(&self.plan.ifname) {
            if let Err(e) = rtnl::delete_link(index) {
                warn!(interface = %self.plan.ifname, "cannot delete the interface: {e}");
            }
        }
        self.socket = None;
        debug!(interface = %self.plan.ifname, "tunnel down");
    }
}

/// Starts `vane-tunnel --foreground IFNAME --attach --udp-fd 3
/// --ready-fd 4` with the socket as descriptor 3, the write end of a
/// readiness pipe as 4, and no capabilities: the bounding set emptied,
/// SECBIT_NOROOT so uid 0 gains none at exec, and no_new_privs. Returns the
/// child and the pipe's read end.
fn spawn(
    plan: &Plan,
    socket: &UdpSocket,
    exe: Option<&std::fs::File>,
) -> io::Result<(Child, OwnedFd)> {
    // Copies numbered above the targets, so that neither dup2 below can
    // overwrite the other's source (close-on-exec: only the dup2 copies
    // reach the tunnel).
    let above = |fd: &dyn AsRawFd| -> io::Result<OwnedFd> {
        let raw = nix::fcntl::fcntl(
            // SAFETY: borrowed for the call only; the owner outlives it.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) },
            nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(READY_FD + 1),
        )?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor we own.
        Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) })
    };
    let udp = above(socket)?;
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let ready = above(&write_end)?;
    drop(write_end);
    let mut cmd = match exe {
        // The kernel opens the path at exec, before close-on-exec
        // descriptors close; argv[0] stays the binary's path, as adoption
        // checks it.
        Some(f) => {
            let mut c = Command::new(format!("/proc/self/fd/{}", f.as_raw_fd()));
            c.arg0(&plan.binary);
            c
        }
        None => Command::new(&plan.binary),
    };
    cmd.arg("--foreground")
        .arg(&plan.ifname)
        .arg("--attach")
        .arg("--udp-fd")
        .arg(UDP_FD.to_string())
        .arg("--ready-fd")
        .arg(READY_FD.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(false);
    let (udp_raw, ready_raw) = (udp.as_raw_fd(), ready.as_raw_fd());
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls (dup2, prctl).
    unsafe {
        cmd.pre_exec(move || {
            // dup2's copies are not close-on-exec.
            if libc::dup2(udp_raw, UDP_FD) < 0 || libc::dup2(ready_raw, READY_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            drop_privileges()
        });
    }
    let child = cmd.spawn()?;
    // Only the child holds the write end now: the pipe ends when it
    // reports or exits.
    drop((udp, ready));
    Ok((child, read_end))
}

/// Runs `BINARY --version` as a tunnel process would run (no privileges,
/// 5 s at most): a binary that cannot even do that (truncated, another
/// architecture, missing libraries, not vane-tunnel) is not one to move a
/// working tunnel to.
async fn preflight(binary: &std::path::Path) -> Result<(), String> {
    let mut cmd = Command::new(binary);
    cmd.arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: as in `spawn`: only prctl calls between fork and exec.
    unsafe {
        cmd.pre_exec(drop_privileges);
    }
    let output = match tokio::time::timeout(Duration::from_secs(5), cmd.output()).await {
        Err(_) => {
            return Err(format!(
                "{} --version did not finish in 5 s",
                binary.display()
            ))
        }
        Ok(Err(e)) => return Err(format!("cannot run {}: {e}", binary.display())),
        Ok(Ok(o)) => o,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = stderr.lines().next().unwrap_or_default();
        return Err(format!(
            "{} --version failed ({}){}{why}",
            binary.display(),
            output.status,
            if why.is_empty() { "" } else { ": " }
        ));
    }
    if !stdout.starts_with("vane-tunnel ") {
        return Err(format!(
            "{} is not vane-tunnel (--version printed {:?})",
            binary.display(),
            stdout.lines().next().unwrap_or_default()
        ));
    }
    Ok(())
}

/// Waits for the tunnel to report through its readiness pipe: one NUL
/// byte once its device is attached and its userspace API listens, the
/// reason otherwise; the pipe's end without a report means it exited.
async fn wait_ready(read_end: OwnedFd) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)?;
    let mut report = Vec::new();
    // At most 4 KiB of reason; the tunnel closes the pipe after reporting.
    let read = async {
        let mut limited = (&mut pipe).take(4096);
        limited.read_to_end(&mut report).await
    };
    match tokio::time::timeout(START_TIMEOUT, read).await {
        Err(_) => anyhow::bail!("vane-tunnel was not ready within {START_TIMEOUT:?}"),
        Ok(Err(e)) => anyhow::bail!("reading vane-tunnel's readiness: {e}"),
        Ok(Ok(_)) => {}
    }
    match report.as_slice() {
        [0] => Ok(()),
        [] => anyhow::bail!("vane-tunnel exited while starting"),
        reason => anyhow::bail!("vane-tunnel: {}", String::from_utf8_lossy(reason).trim()),
    }
}

/// In the child before exec: no capability can survive the exec.
fn drop_privileges() -> io::Result<()> {
    const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
    const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
    const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
    const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
    // SAFETY: plain prctl calls with integer arguments.
    unsafe {
        for cap in 0..64 {
            // EINVAL past the last capability the kernel knows: done.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(io::Error::last_os_error());
            }
        }
        if libc::prctl(
            libc::PR_SET_SECUREBITS,
            SECBIT_NOROOT
                | SECBIT_NOROOT_LOCKED
                | SECBIT_NO_SETUID_FIXUP
                | SECBIT_NO_SETUID_FIXUP_LOCKED,
            0,
            0,
            0,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

async fn watch_child(
    mut child: Child,
    generation: u64,
    mut expected: oneshot::Receiver<()>,
    exited: watch::Sender<bool>,
    reports: mpsc::UnboundedSender<Report>,
    phase: std::sync::Arc<AtomicU8>,
) {
    let status = child.wait().await;
    exited.send_replace(true);
    if expected.try_recv().is_ok() {
        return;
    }
    if phase
        .compare_exchange(
            STARTING,
            EXITED_STARTING,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_ok()
    {
        // Still starting: the start reports it.
        debug!(generation, "vane-tunnel exited while starting: {status:?}");
        return;
    }
    let error = match status {
        Ok(s) => format!("vane-tunnel exited ({s})"),
        Err(e) => format!("cannot wait for vane-tunnel: {e}"),
    };
    warn!(generation, "{error}");
    let _ = reports.send(Report::Failed { generation, error });
}

/// Watches a process that is not our child (adopted) through its pidfd,
/// which becomes readable when it exits.
async fn watch_pidfd(
    pidfd: std::sync::Arc<OwnedFd>,
    generation: u64,
    mut expected: oneshot::Receiver<()>,
    exited: watch::Sender<bool>,
    reports: mpsc::UnboundedSender<Report>,
) {
    let register = |fd: OwnedFd| {
        // SAFETY: the AsyncFd owns this descriptor (a copy of the pidfd)
        // and nothing else closes or replaces it while it is registered.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)
    };
    let result = match pidfd.try_clone().and_then(register) {
        Ok(fd) => fd.readable().await.map(|_| ()),
        Err(e) => Err(e),
    };
    exited.send_replace(true);
    if expected.try_recv().is_ok() {
        return;
    }
    let error = match result {
        Ok(()) => "the adopted vane-tunnel exited".to_owned(),
        Err(e) => format!("cannot watch the adopted vane-tunnel: {e}"),
    };
    warn!(generation, "{error}");
    let _ = reports.send(Report::Failed { generation, error });
}

/// Whether the device an earlier run left (both processes gone) can be
/// re-attached as it is: a TUN device with the virtio-net header, no
/// process attached (no carrier), owned by this uid, with the plan's MTU
/// and exactly the plan's addresses (IPv6 link-local aside). Then its addresses and routes stay, and the next
/// start attaches a new tunnel process to it by name; anything else is
/// deleted and made afresh.
pub fn reusable_device(plan: &Plan) -> Result<(), String> {
    const IFF_TUN: u32 = 0x0001;
    const IFF_VNET_HDR: u32 = 0x4000;
    let sys = |attr: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{}/{attr}", plan.ifname))
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("{attr}: {e}"))
    };
    let flags = sys("tun_flags")?;
    let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16)
        .map_err(|_| format!("tun_flags {flags:?}"))?;
    if flags & IFF_TUN == 0 || flags & IFF_VNET_HDR == 0 {
        return Err(format!(
            "not a TUN device with the virtio-net header (flags {flags:#x})"
        ));
    }
    // A queue attached means a process still holds it (one vaned cannot
    // see: its userspace API socket is gone): deleting the device is what
    // stops it from using it.
    if sys("carrier").is_ok_and(|c| c == "1") {
        return Err("a process is still attached to it".into());
    }
    let owner = sys("owner")?;
    if owner != nix::unistd::geteuid().as_raw().to_string() {
        return Err(format!("owned by {owner}"));
    }
    let mtu = sys("mtu")?;
    if mtu != plan.mtu.to_string() {
        return Err(format!("MTU {mtu}, not {}", plan.mtu));
    }
    let mut have: Vec<IpNet> = Vec::new();
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("getifaddrs: {e}"))?;
    for a in addrs.filter(|a| a.interface_name == plan.ifname) {
        let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
            continue;
        };
        let net = if let (Some(ip), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            IpNet::new(ip.ip().into(), m.ip().to_bits().count_ones() as u8)
        } else if let (Some(ip), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            if ip.ip().is_unicast_link_local() {
                continue;
            }
            IpNet::new(ip.ip().into(), m.ip().to_bits().count_ones() as u8)
        } else {
            continue;
        };
        have.extend(net.ok());
    }
    let mut want = plan.addresses.clone();
    have.sort();
    want.sort();
    if have != want {
        return Err(format!("addresses {have:?}, not {want:?}"));
    }
    Ok(())
}

/// Removes every rule vane may have left (a crash, a failed removal).
pub fn remove_stale_rules() {
    for family in [routing::Family::V4, routing::Family::V6] {
        for priority in routing::PRIORITIES {
            match rtnl::delete_vane_rules(family, priority) {
                Ok(0) => {}
                Ok(n) => info!(
                    ?family,
                    priority, "removed {n} policy routing rule(s) left by an earlier run"
                ),
                Err(e) => warn!(
                    ?family,
                    priority, "cannot remove vane's policy routing rules: {e}"
                ),
            }
        }
    }
}

/// A tunnel process left running by a vaned that died (its children
/// outlive it): found by its userspace API socket, identified by the
/// socket's peer credentials, and stopped, so the new vaned starts from a
/// clean slate: the fallback when it cannot be adopted (adopt.rs).
pub async fn stop_orphan(ifname: &str) {
    let path = uapi_client::socket_path(ifname);
    let Ok(Some(peer)) = crate::tunnel::adopt::socket_peer(ifname) else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(peer as i32);
    warn!(interface = %ifname, pid = peer, "stopping the tunnel process left by an earlier vaned");
    let gone = || std::os::unix::net::UnixStream::connect(&path).is_err();
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        while !gone() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if gone() {
            break;
        }
    }
    // A SIGKILLed tunnel could not remove its socket.
    if gone() {
        let _ = std::fs::remove_file(&path);
    }
}
