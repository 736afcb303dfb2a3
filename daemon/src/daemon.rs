//! vaned's loop: one task owns the state (rules, intent, decision,
//! supervisor) and reacts to the network, the rule file, control requests,
//! the tunnel worker's reports, timers and signals. Everything slow (the
//! tunnel's I/O, client connections) runs on other tasks and talks to this
//! one through channels, so the loop never waits on the outside.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, error, info, warn};
use vane_ctl::proto::{Command, TunnelState};
use vane_ctl::proto::{
    DaemonView, DecisionView, ErrorCode, Event, IntentView, KillSwitchView, NetworkView, PowerView,
    ProtoError, ReloadOutcome, Reply, RulesView, Status, TunnelStatus,
};
use vane_observer::{Exclusions, Observer, ObserverConfig};
use vane_policy::engine::{self, Decision, Desired, Manual, ManualIntent, Probes, UserIntent};
use vane_policy::reload::{Reloaded, RuleSource};

use crate::control::{self, unix_secs};
use crate::probe::{self, Prober};
use crate::sleep::Power;
use crate::state::StateStore;
use crate::tunnel::plan;
use crate::tunnel::supervisor::{Action, Supervisor};
use crate::tunnel::{Plan, Report, Worker};

/// How long the tunnel binary's path must be quiet before it is checked
/// (a rename is one event; a file written in place is many).
const BINARY_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// How often the clocks are compared for a suspend nobody announced.
const CLOCK_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// How often systemd-resolved's settings for the tunnel's link are
/// compared with the tunnel's DNS (only while it is applied there).
const DNS_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// A second wake reported within this of the first (logind's and the
/// clocks') is the same wake.
const SAME_WAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// How vaned was started.
pub struct Options {
    pub rules: RuleSource,
    pub plan: Plan,
    /// Why `plan` is only the unconfigured one (see `plan::unconfigured`).
    pub plan_error: Option<String>,
    pub binary: PathBuf,
    pub store: StateStore,
    pub intent: UserIntent,
    pub listener: tokio::net::UnixListener,
    pub group: Option<u32>,
    pub observer: ObserverConfig,
    /// The tunnel DNS backend; `None`: detect it.
    pub dns_backend: Option<crate::dns::Backend>,
    pub resolv_conf: PathBuf,
    pub state_dir: PathBuf,
    /// The tunnel's UDP socket as systemd kept it (descriptor store).
    pub kept_socket: Option<std::net::UdpSocket>,
    /// The tunnel's executable as systemd kept it, with its pid.
    pub kept_exe: Option<(u32, std::fs::File)>,
    /// The user the tunnel process runs as.
    pub tunnel_user: String,
}

enum WorkerMsg {
    Act(Action),
    Plan(Box<Plan>),
    Locals(Vec<ipnet::IpNet>),
    Protect(bool),
    Adopt {
        found: Box<crate::tunnel::adopt::Adoptable>,
        generation: u64,
        locals: Vec<ipnet::IpNet>,
        protect: bool,
    },
    /// Exit leaving everything in place for the next vaned.
    HandOver,
    /// Compare the tunnel binary on disk with the running one.
    CheckBinary,
    /// resolv.conf changed: the tunnel's DNS may need putting back.
    CheckDns,
    /// With systemd-resolved, whose link settings vaned is not told of
    /// when they change: check them (every [`DNS_POLL`], one at a time:
    /// the flag is cleared when done).
    PollDns(Arc<std::sync::atomic::AtomicBool>),
    /// Whether the kill switch stays when vaned stops (lockdown).
    HoldOnExit(bool),
    /// The machine woke up: the tunnel handshakes at once.
    Wake,
    /// Opens or closes the kill switch's captive portal exemption.
    Portal(Option<crate::net::killswitch::PortalExemption>),
}

/// How the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything vaned set up was taken down.
    Stopped,
    /// The tunnel, its device, rules, kill switch and DNS were left in
    /// place for the next vaned to adopt (SIGUSR2).
    HandedOver,
}

struct Daemon {
    rules: RuleSource,
    plan: Plan,
    binary: PathBuf,
    /// Why the tunnel's configuration cannot be used, if it cannot.
    plan_error: Option<String>,
    store: StateStore,
    intent: UserIntent,
    observer: Observer,
    prober: Prober,
    decision: Decision,
    supervisor: Supervisor,
    pid: Option<u32>,
    worker: mpsc::UnboundedSender<WorkerMsg>,
    events: broadcast::Sender<Event>,
    last_published: Option<Status>,
    started: SystemTime,
    /// SIGTERM arrived: stop the tunnel, then exit.
    shutting_down: bool,
    /// SIGUSR2 arrived: exit, leaving the tunnel for the next vaned.
    handing_over: bool,
    /// Replies to commands that wait for the tunnel to settle.
    parked: Vec<tokio::sync::oneshot::Sender<Result<Reply, ProtoError>>>,
    /// The uplinks' subnets last told to the worker.
    locals: Vec<ipnet::IpNet>,
    /// The kill switch wish last told to the worker (`None`: not yet).
    protect_sent: Option<bool>,
    /// What the worker last reported of the kill switch.
    kill_switch_active: bool,
    kill_switch_error: Option<String>,
    /// A new tunnel binary on disk that did not run, and why.
    binary_error: Option<String>,
    /// The worker's last word on the tunnel's DNS (see `Report::Dns`).
    dns_reasserted: u32,
    dns_error: Option<String>,
    /// vaned's state directory (state.json, lockdown.json).
    state_dir: PathBuf,
    /// The lockdown kill switch last written for the boot-time unit
    /// (`None`: not yet; `Some(None)`: none, the file removed).
    lockdown_saved: Option<Option<crate::net::killswitch::Spec>>,
    /// The tunnel's configuration file, watched: writing it (a first
    /// install) or changing it reloads.
    config_watch: Option<(PathBuf, vane_policy::reload::FileWatch)>,
    reload_tx: mpsc::UnboundedSender<()>,
    /// Sleep and wake, as `vanectl status` shows them.
    power: PowerView,
    /// logind waits for this before the machine sleeps: sent once the
    /// tunnel is down (`disconnect_on_sleep`).
    sleep_ready: Option<tokio::sync::oneshot::Sender<()>>,
    /// The tunnel went down for the sleep (`disconnect_on_sleep`) while
    /// the rules want it up: the kill switch stays, and the wake brings
    /// the tunnel back.
    down_for_sleep: bool,
    /// When the last wake was handled (logind and the clocks both report
    /// one wake; the second is not acted on again).
    last_wake: Option<Instant>,
    /// The tunnel went down for a sleep or an exemption that is over: the
    /// next evaluation brings it up unless the rules say down.
    restore_up: bool,
    /// The captive portal check and exemption on the current network.
    portal: crate::portal::Portal,
    portal_done: mpsc::UnboundedSender<PortalDone>,
    /// The tunnel is down for a captive portal exemption while the rules
    /// want it up (the kill switch stays).
    down_for_portal: bool,
}

/// A captive portal check's answer, on its way back to the loop.
struct PortalDone {
    network: String,
    seq: u64,
    found: crate::portal::Found,
}

/// Converts the observer's snapshot to what the rule engine reads.
pub fn policy_view(s: &vane_observer::NetworkSnapshot) -> engine::NetworkSnapshot {
    let primary = s.primary();
    engine::NetworkSnapshot {
        available: s.available,
        interface: primary.map(|u| u.interface.clone()),
        interface_type: primary.map(|u| u.kind),
        ssid: primary.and_then(|u| u.ssid.clone()),
        dns_search_domains: s.dns.search_domains.clone(),
        dns_servers: s.dns.servers.clone(),
        captive_portal: None,
    }
}

pub async fn run(options: Options) -> Result<Exit> {
    let Options {
        rules,
        plan,
        plan_error,
        binary,
        store,
        intent,
        listener,
        group,
        mut observer,
        dns_backend,
        resolv_conf,
        state_dir,
        mut kept_socket,
        mut kept_exe,
        tunnel_user,
    } = options;
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let mut worker = Worker::new(plan.clone(), reports_tx);
    let tunnel_uid = match crate::tunnel::process::resolve_user(&tunnel_user) {
        Ok(c) => Some(c.uid),
        Err(e) => {
            // Not fatal here: each start says it again (STATUS=, `vanectl
            // status`), and starts once the user exists.
            error!("{e}");
            None
        }
    };
    worker.set_user(tunnel_user);
    let mut hold_on_exit = false;
    // Lockdown never opens: the kill switch is in place before anything an
    // earlier run left (a tunnel process, the device, policy routing rules,
    // DNS) is stopped, removed or repaired, and stays through all of it.
    // A table an earlier run left is kept (replaced in one transaction);
    // without lockdown it stays until the first decision says whether it
    // is wanted (the worker leaves the kill switch alone until told).
    let stale_table = match crate::net::killswitch::present() {
        Ok(true) => {
            if plan.full.is_some() {
                info!("a kill switch table from an earlier run is in place; it stays until the rules decide");
            } else {
                warn!("a kill switch table from an earlier run is in place; the rules decide whether it stays");
            }
            worker.adopt_stale_kill_switch();
            true
        }
        Ok(false) => false,
        // No nft: there can be no table to repair; a full tunnel reports it.
        Err(e) => {
            info!("cannot look for a kill switch left by an earlier run: {e}");
            false
        }
    };
    // Any table of ours blocks what leaves outside the tunnel; replacing
    // one now (before the local subnets are known) would only block the
    // local networks for a moment on every handover.
    if plan.full.is_some()
        && rules.rules().tunnel.lockdown
        && !intent.lockdown_released
        && !stale_table
    {
        info!("lockdown: the kill switch goes on before anything else");
        worker.set_protect(true);
    }
    if plan.full.is_some() && plan.dns_servers.is_empty() {
        warn!(
            interface = %plan.ifname,
            "a full tunnel without `DNS =` in its configuration: names go to the network's resolver{}",
            if rules.rules().tunnel.exclude_local_networks {
                ", outside the tunnel when it is on the local network"
            } else {
                ", through the tunnel"
            }
        );
    }
    // A tunnel process left by an earlier vaned (killed, crashed, or
    // handed over) is adopted when it can be: then what that vaned set up
    // (device, routes, rules, kill switch, DNS) stays as it is.
    let adoptable = match crate::tunnel::adopt::find(
        &plan.ifname,
        &mut kept_socket,
        &mut kept_exe,
        tunnel_uid,
    )
    .await
    {
        Ok(found) => found,
        Err(e) => {
            warn!(interface = %plan.ifname, "cannot adopt the tunnel process left by an earlier vaned: {e:#}; it is stopped and the tunnel starts afresh");
            None
        }
    };
    // What a vaned that crashed left of its DNS goes first, before the
    // observer reads the network's.
    let backend = match dns_backend {
        Some(b) => b,
        None => crate::dns::detect().await,
    };
    let mut dns = crate::dns::DnsManager::new(resolv_conf.clone(), state_dir.clone(), backend);
    if adoptable.is_none() {
        if let Err(e) = dns.repair().await {
            error!("cannot repair the DNS left by an earlier run: {e}");
        }
    }
    observer.exclusions = exclusions(&plan);
    observer.interface_overrides = overrides(&rules);
    let observer = Observer::start(observer)
        .await
        .context("cannot start the network observer")?;
    let mut network_changes = observer.subscribe();

    // A tunnel process and device left behind by a vaned that crashed:
    // they go, and the rules decide afresh.
    // A device whose tunnel is gone too (both were killed, or both
    // replaced by an upgrade) is re-attached when it is as the plan makes
    // it: its addresses and routes stay, the next start attaches a new
    // tunnel to it by name. Otherwise it goes.
    let mut leftover_device = false;
    if let Some(socket) = kept_socket.take() {
        // No tunnel took it: the next start does (or it is closed).
        worker.reuse_socket(socket);
    }
    if adoptable.is_none() {
        crate::tunnel::recover::stop_orphan(&plan.ifname).await;
        if let Some(index) = crate::net::rtnl::link_index(&plan.ifname) {
            match crate::tunnel::recover::reusable_device(&plan) {
                Ok(()) => {
                    info!(interface = %plan.ifname, "re-attaching to the interface left by an earlier run");
                    leftover_device = true;
                }
                Err(why) => {
                    warn!(interface = %plan.ifname, "removing the interface left by an earlier run ({why})");
                    if let Err(e) = crate::net::rtnl::delete_link(index) {
                        warn!("cannot remove it: {e}");
                    }
                }
            }
        }
        crate::tunnel::recover::remove_stale_rules();
    }

    let (probes_tx, mut probes_done) = mpsc::unbounded_channel::<probe::Done>();
    let (portal_tx, mut portal_rx) = mpsc::unbounded_channel::<PortalDone>();
    let (worker_tx, mut worker_rx) = mpsc::unbounded_channel::<WorkerMsg>();
    worker.set_dns(crate::tunnel::TunnelDnsShell {
        manager: dns,
        observer: observer.resolv_conf_override(),
        resolv_conf: resolv_conf.clone(),
        state_dir: state_dir.clone(),
        applied: false,
    });
    let worker_task = tokio::spawn(async move {
        while let Some(m) = worker_rx.recv().await {
            match m {
                WorkerMsg::Act(a) => worker.act(a).await,
                WorkerMsg::Plan(p) => worker.set_plan(*p),
                WorkerMsg::Locals(l) => worker.set_locals(l),
                WorkerMsg::Protect(on) => worker.set_protect(on),
                WorkerMsg::Adopt {
                    found,
                    generation,
                    locals,
                    protect,
                } => {
                    worker.adopt(*found, generation, locals, protect).await;
                    // An upgrade put a new binary in place before this
                    // vaned started: the adopted tunnel moves to it.
                    worker.check_binary().await;
                }
                WorkerMsg::CheckBinary => worker.check_binary().await,
                WorkerMsg::CheckDns => worker.check_dns().await,
                WorkerMsg::PollDns(pending) => {
                    if worker.dns_polled() {
                        worker.check_dns().await;
                    }
                    pending.store(false, std::sync::atomic::Ordering::Release);
                }
                WorkerMsg::HoldOnExit(hold) => hold_on_exit = hold,
                WorkerMsg::Wake => worker.wake(),
                WorkerMsg::Portal(p) => worker.set_portal(p),
                WorkerMsg::HandOver => {
                    worker.hand_over();
                    return;
                }
            }
        }
        // The loop is gone: take the tunnel down with it, and the kill
        // switch unless in lockdown (which holds while vaned does not run,
        // until released: `vanectl lockdown off`, `lockdown = false`, or
        // the package removed).
        worker.set_portal(None);
        worker.stop().await;
        if !hold_on_exit {
            worker.set_protect(false);
        }
    });

    let (events, _) = broadcast::channel(64);
    let (requests_tx, mut requests) = mpsc::channel::<control::Request>(64);
    let shared = Arc::new(control::Shared {
        requests: requests_tx,
        events: events.clone(),
        group,
    });
    let server = tokio::spawn(control::serve(listener, shared));

    let (reload_tx, mut reload_rx) = mpsc::unbounded_channel::<()>();
    let _watch = watch(
        rules.path(),
        reload_tx.clone(),
        "reload with SIGHUP or `vanectl reload`",
    );

    // A new tunnel binary renamed into place (an upgrade) moves a running
    // tunnel to it; bursts of events are coalesced (see binary_check).
    let (binary_tx, mut binary_rx) = mpsc::unbounded_channel::<()>();
    let _binary_watch = watch(
        &binary,
        binary_tx,
        "a new binary is used from the tunnel's next start",
    );
    let mut binary_check: Option<Instant> = None;

    // resolv.conf written over by another program while the tunnel's DNS
    // is on (the file backend) is put back; bursts coalesced likewise.
    let (resolv_tx, mut resolv_rx) = mpsc::unbounded_channel::<()>();
    let resolv_tx_target = resolv_tx.clone();
    let _resolv_watch = watch(
        &resolv_conf,
        resolv_tx,
        "a tunnel DNS replaced by another program is not put back",
    );
    let mut resolv_check: Option<Instant> = None;
    // resolvconf writes the file /etc/resolv.conf links to
    // (/run/resolvconf/resolv.conf): watched too, for its changes.
    let _resolv_target_watch = std::fs::canonicalize(&resolv_conf)
        .ok()
        .filter(|target| *target != resolv_conf)
        .and_then(|target| {
            watch(
                &target,
                resolv_tx_target,
                "a tunnel DNS another program outranks is not put back",
            )
        });

    let now = Instant::now();
    let rules_portal = rules.rules().captive_portal.clone();
    let mut d = Daemon {
        decision: engine::decide(
            rules.rules(),
            &policy_view(&observer.snapshot()),
            &intent,
            &Probes::new(),
        ),
        rules,
        plan,
        binary,
        plan_error,
        store,
        intent,
        observer,
        prober: Prober::new(probes_tx),
        supervisor: Supervisor::new(now),
        pid: None,
        worker: worker_tx,
        events,
        last_published: None,
        started: SystemTime::now(),
        shutting_down: false,
        handing_over: false,
        parked: Vec::new(),
        locals: Vec::new(),
        protect_sent: None,
        kill_switch_active: false,
        kill_switch_error: None,
        binary_error: None,
        dns_reasserted: 0,
        dns_error: None,
        state_dir,
        lockdown_saved: None,
        config_watch: None,
        reload_tx,
        power: PowerView::default(),
        sleep_ready: None,
        down_for_sleep: false,
        last_wake: None,
        restore_up: false,
        portal: crate::portal::Portal::new(rules_portal.enabled, &rules_portal.check_url),
        portal_done: portal_tx,
        down_for_portal: false,
    };
    d.watch_config();
    if let Some(found) = adoptable {
        // Up as the earlier vaned left it; the first evaluation below
        // stops it if the rules now say down.
        let generation = d.supervisor.adopted(Instant::now());
        d.pid = Some(found.pid);
        d.locals = crate::net::routing::local_subnets(&d.observer.snapshot());
        let protect = d.protect_wanted();
        d.protect_sent = Some(protect);
        let _ = d.worker.send(WorkerMsg::Adopt {
            found: Box::new(found),
            generation,
            locals: d.locals.clone(),
            protect,
        });
    }
    d.follow_locals();
    d.evaluate();
    if leftover_device && d.supervisor.state() == TunnelState::Down {
        // The rules say down: the device kept for a start goes.
        if let Some(index) = crate::net::rtnl::link_index(&d.plan.ifname) {
            info!(interface = %d.plan.ifname, "removing the interface left by an earlier run (the tunnel is not wanted)");
            if let Err(e) = crate::net::rtnl::delete_link(index) {
                warn!("cannot remove it: {e}");
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    info!("vaned ready");

    // Sleep and wake: logind's announcements, and the clocks for a
    // suspend nobody announced (see sleep.rs).
    let (power_tx, mut power_rx) = mpsc::unbounded_channel::<Power>();
    let logind = crate::sleep::spawn_logind(power_tx);
    let mut clocks = vane_tunnel::clock::ClockWatch::default();
    let mut clock_tick = tokio::time::interval(CLOCK_CHECK);
    clock_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dns_poll = tokio::time::interval(DNS_POLL);
    let dns_poll_pending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    dns_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut sigusr2 = signal(SignalKind::user_defined2()).context("SIGUSR2 handler")?;
    let watchdog = sd_notify::watchdog_enabled()
        .map(|interval| (interval / 2).max(std::time::Duration::from_millis(100)));
    let mut watchdog_tick =
        tokio::time::interval(watchdog.unwrap_or(std::time::Duration::from_secs(3600)));

    loop {
        let timer = d.supervisor.timer();
        let probe_refresh = d.prober.next_refresh();
        let portal_next = d
            .portal_allowed()
            .then(|| d.portal.next_event(Instant::now()))
            .flatten();
        tokio::select! {
            change = network_changes.recv() => match change {
                Ok(change) => {
                    let _ = d.events.send(Event::Network { change: Box::new(change) });
                    d.follow_locals();
                    d.evaluate();
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    d.follow_locals();
                    d.evaluate();
                }
                Err(broadcast::error::RecvError::Closed) => {
                    error!("the network observer stopped");
                    break;
                }
            },
            Some(request) = requests.recv() => {
                let mutates = request.command.mutates();
                let reply = d.handle(request.command);
                if mutates && reply.is_ok() && d.settling() {
                    // Answered once the tunnel has reached where it is going,
                    // so `vanectl down` returns with the tunnel down.
                    d.parked.push(request.reply);
                } else {
                    let _ = request.reply.send(reply);
                }
            }
            Some(report) = reports.recv() => d.report(report),
            Some(done) = probes_done.recv() => {
                if d.prober.complete(done) {
                    d.evaluate();
                }
            }
            _ = async { tokio::time::sleep_until(probe_refresh.unwrap_or_else(Instant::now).into()).await }, if probe_refresh.is_some() => {
                d.evaluate();
            }
            Some(()) = binary_rx.recv() => {
                // Checked once the events stop for a moment: a binary
                // written in place is checked when complete, not halfway.
                while binary_rx.try_recv().is_ok() {}
                binary_check = Some(Instant::now() + BINARY_SETTLE);
            }
            _ = async { tokio::time::sleep_until(binary_check.unwrap_or_else(Instant::now).into()).await }, if binary_check.is_some() => {
                binary_check = None;
                let _ = d.worker.send(WorkerMsg::CheckBinary);
            }
            Some(()) = resolv_rx.recv() => {
                // Checked a moment after the first event of a burst (not
                // pushed back by the next ones: a program rewriting it
                // without pause must still be noticed, and reported).
                while resolv_rx.try_recv().is_ok() {}
                resolv_check.get_or_insert_with(|| Instant::now() + BINARY_SETTLE);
            }
            _ = async { tokio::time::sleep_until(resolv_check.unwrap_or_else(Instant::now).into()).await }, if resolv_check.is_some() => {
                resolv_check = None;
                let _ = d.worker.send(WorkerMsg::CheckDns);
            }
            Some(()) = reload_rx.recv() => {
                while reload_rx.try_recv().is_ok() {}
                d.reload();
            }
            _ = sighup.recv() => { info!("SIGHUP: reloading the rules"); d.reload(); }
            _ = sigterm.recv(), if !d.shutting_down => { info!("SIGTERM: shutting down"); d.shut_down(); }
            _ = sigint.recv(), if !d.shutting_down => { info!("SIGINT: shutting down"); d.shut_down(); }
            _ = sigusr2.recv(), if !d.shutting_down => {
                info!("SIGUSR2: handing over (the tunnel, its rules, kill switch and DNS stay for the next vaned)");
                d.handing_over = true;
                d.close_exemption_for_exit();
                break;
            }
            _ = async { tokio::time::sleep_until(timer.unwrap_or_else(Instant::now).into()).await }, if timer.is_some() => {
                let actions = d.supervisor.timer_fired(Instant::now());
                d.dispatch(actions);
            }
            Some(done) = portal_rx.recv() => d.portal_checked(done),
            _ = async { tokio::time::sleep_until(portal_next.unwrap_or_else(Instant::now).into()).await }, if portal_next.is_some() => {
                d.portal_due();
            }
            Some(power) = power_rx.recv() => match power {
                Power::Sleeping { ready } => d.going_to_sleep(ready),
                Power::Woke { slept } => d.woke(slept),
                // logind (again) on the bus, not preparing for sleep: a
                // wake announced while vaned was not listening.
                Power::Awake => {
                    if d.power.asleep {
                        d.woke(None);
                    }
                }
            },
            _ = clock_tick.tick() => {
                let read = vane_tunnel::clock::read_clocks();
                if let Some(slept) = read.and_then(|(b, m)| clocks.observe(b, m)) {
                    d.woke(Some(slept));
                }
            }
            _ = dns_poll.tick() => {
                // Not while the last one is still being answered (a slow
                // resolved must not pile polls up in front of the worker).
                if !dns_poll_pending.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    let _ = d.worker.send(WorkerMsg::PollDns(Arc::clone(&dns_poll_pending)));
                }
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
        if d.shutting_down && d.supervisor.state() == TunnelState::Down {
            break;
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    server.abort();
    logind.abort();
    let exit = if d.handing_over {
        let _ = d.worker.send(WorkerMsg::HandOver);
        Exit::HandedOver
    } else {
        Exit::Stopped
    };
    drop(d);
    // The worker stops the tunnel when its channel closes (unless it
    // hands over).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), worker_task).await;
    Ok(exit)
}

/// Watches `path` (see `vane_policy::reload::watch`): each change is a
/// message on `tx`. A watch that cannot be set up is logged with what that
/// costs (`otherwise`), and vaned goes on without it.
fn watch(
    path: &Path,
    tx: mpsc::UnboundedSender<()>,
    otherwise: &str,
) -> Option<vane_policy::reload::FileWatch> {
    vane_policy::reload::watch(path, move || {
        let _ = tx.send(());
    })
    .map_err(|e| warn!("cannot watch {}: {e}; {otherwise}", path.display()))
    .ok()
}

/// The captive portal view without the time of its last check: a check
/// that finds the same is not a change to tell watchers of.
fn portal_change(v: &Option<vane_ctl::proto::PortalView>) -> Option<vane_ctl::proto::PortalView> {
    v.clone()
        .map(|v| vane_ctl::proto::PortalView { checked: None, ..v })
}

/// What the observer must not count as the underlying network: the
/// tunnel's interface, vane's table, the tunnel's own DNS.
fn exclusions(plan: &Plan) -> Exclusions {
    Exclusions {
        ifnames: [plan.ifname.clone()].into(),
        table: plan.full.map(|f| f.table()),
        dns_servers: plan.dns_servers.iter().copied().collect(),
        dns_search_domains: plan.dns_search.iter().cloned().collect(),
        ..Exclusions::default()
    }
}

fn overrides(rules: &RuleSource) -> Vec<(String, vane_policy::rules::InterfaceType)> {
    rules
        .rules()
        .interfaces
        .iter()
        .map(|(p, t)| (p.text.clone(), *t))
        .collect()
}

impl Daemon {
    /// Tells the worker the uplinks' subnets when they changed (the full
    /// tunnel's rules and kill switch depend on them).
    fn follow_locals(&mut self) {
        let locals = crate::net::routing::local_subnets(&self.observer.snapshot());
        if locals != self.locals {
            self.locals = locals.clone();
            let _ = self.worker.send(WorkerMsg::Locals(locals));
        }
    }

    fn network(&self) -> engine::NetworkSnapshot {
        policy_view(&self.observer.snapshot())
    }

    /// Decides again and moves the tunnel toward the decision.
    fn evaluate(&mut self) {
        let now = Instant::now();
        let snapshot = self.observer.snapshot();
        let mut net = policy_view(&snapshot);
        let key = snapshot
            .available
            .then(|| crate::probe::network_key(&snapshot, &net));
        let seen = self.portal.seen_network();
        let before = self.portal.network().map(str::to_owned);
        if let Some(closed) = self.portal.set_network(key.as_deref(), SystemTime::now()) {
            self.portal_closed(closed);
        }
        if seen && key.is_some() && before != key && self.rules.rules().captive_portal.enabled {
            // Another network: the tunnel handshakes over it now (what
            // shows it works there, before any captive portal check).
            let _ = self.worker.send(WorkerMsg::Wake);
        }
        net.captive_portal = self.portal.captive();
        let probes = self.prober.results(&snapshot, &net);
        let decision = engine::decide(self.rules.rules(), &net, &self.intent, &probes);
        self.prober.start(
            &decision,
            self.rules.rules(),
            &snapshot,
            self.plan.device.fwmark,
        );
        if decision.override_expired {
            info!("the network changed: the manual override ends, the rules decide again");
            let mut intent = self.intent.clone();
            intent.manual = None;
            if let Err(e) = self.store.save(&intent) {
                error!("cannot save the state: {e}");
            }
            // In force either way: the override has expired.
            self.intent = intent;
        }
        if decision != self.decision {
            info!("decision: {decision}");
        }
        self.decision = decision;
        if self.shutting_down {
            return;
        }
        let asleep = self.power.asleep && self.rules.rules().tunnel.disconnect_on_sleep;
        let exempt = self.portal.exemption().is_some();
        // Down for a sleep or an exemption that is over: up again unless
        // the rules now say down ("unchanged" keeps what was before it).
        let desired = match self.decision.desired {
            // Kept (and the kill switch with it) while the tunnel's
            // configuration cannot be used.
            Desired::Unchanged if self.restore_up && self.plan_error.is_none() => {
                self.restore_up = false;
                Desired::Up
            }
            d => {
                if d != Desired::Unchanged {
                    self.restore_up = false;
                }
                d
            }
        };
        let actions = match desired {
            // Down until the wake, the kill switch kept as for a tunnel
            // that is up.
            Desired::Up if asleep => {
                self.down_for_sleep = true;
                self.supervisor.want(false, now)
            }
            // Down while the user logs in to the portal, likewise (also a
            // tunnel the rules leave as it is).
            Desired::Up if exempt => {
                self.down_for_portal = true;
                self.supervisor.want(false, now)
            }
            Desired::Unchanged if exempt && self.supervisor.wants_up() => {
                self.down_for_portal = true;
                self.supervisor.want(false, now)
            }
            Desired::Up if self.plan_error.is_none() => self.supervisor.want(true, now),
            Desired::Up => Vec::new(),
            Desired::Down => {
                self.down_for_sleep = false;
                self.down_for_portal = false;
                self.supervisor.want(false, now)
            }
            Desired::Unchanged => Vec::new(),
        };
        self.dispatch(actions);
        // After the tunnel was told what to do: a check knows whether it
        // is wanted up.
        self.start_portal_check(&snapshot);
    }

    /// Whether the captive portal check may go out now: not while the
    /// kill switch holds a tunnel that is not wanted (lockdown while
    /// down), where nothing would use its answer.
    fn portal_allowed(&self) -> bool {
        self.supervisor.wants_up() || !self.protect_wanted() || self.portal.exemption().is_some()
    }

    /// Starts the captive portal check when one is due (a new network,
    /// a wake, a portal to watch for the login).
    fn start_portal_check(&mut self, snapshot: &vane_observer::NetworkSnapshot) {
        if !self.portal_allowed() {
            return;
        }
        let Some(crate::portal::Start {
            network,
            seq,
            since,
            handshake_first,
        }) = self.portal.start(Instant::now(), SystemTime::now())
        else {
            return;
        };
        if handshake_first && self.supervisor.wants_up() {
            let _ = self.worker.send(WorkerMsg::Wake);
        }
        let url = self.portal.check_url().to_owned();
        let route = crate::probe::fetch::Route::uplinks(snapshot, self.plan.device.fwmark);
        let servers = snapshot.dns.servers.clone();
        let done = self.portal_done.clone();
        // A tunnel that is wanted up is asked first whether it connects:
        // then the check does not go out at all.
        let tunnel = self
            .supervisor
            .wants_up()
            .then(|| crate::portal::check::Tunnel {
                socket: crate::tunnel::uapi_client::socket_path(&self.plan.ifname),
                since,
            });
        debug!(url, "captive portal check");
        tokio::spawn(async move {
            let found =
                crate::portal::check::check_unless_connected(&url, &route, &servers, tunnel).await;
            let _ = done.send(PortalDone {
                network,
                seq,
                found,
            });
        });
    }

    /// A check or the exemption's end is due.
    fn portal_due(&mut self) {
        if let Some(closed) = self.portal.expire(Instant::now()) {
            self.portal_closed(closed);
            self.evaluate();
            return;
        }
        let snapshot = self.observer.snapshot();
        self.start_portal_check(&snapshot);
    }

    fn portal_checked(&mut self, done: PortalDone) {
        let before = self.portal.captive();
        let found = done.found.clone();
        let (taken, closed) = self.portal.complete(
            &done.network,
            done.seq,
            done.found,
            Instant::now(),
            SystemTime::now(),
        );
        if !taken {
            return;
        }
        match &found {
            crate::portal::Found::Portal { url, detail, .. } if before != Some(true) => {
                warn!(url, detail, "a captive portal: `vanectl portal` lets you log in (the tunnel stays down meanwhile)")
            }
            crate::portal::Found::Open if before == Some(true) => {
                info!("the captive portal lets us through now")
            }
            crate::portal::Found::Unknown { detail } => {
                debug!(detail, "captive portal check: no answer")
            }
            _ => debug!(?found, "captive portal check"),
        }
        if let Some(closed) = closed {
            self.portal_closed(closed);
        }
        self.evaluate();
    }

    /// The exemption closed: the kill switch lets only the tunnel out
    /// again, and the rules bring the tunnel back.
    fn portal_closed(&mut self, why: crate::portal::Closed) {
        info!("captive portal exemption closed: {why}");
        let _ = self.worker.send(WorkerMsg::Portal(None));
        // The next evaluation (every caller makes one) brings the tunnel
        // back unless the rules now say down.
        self.restore_up |= std::mem::take(&mut self.down_for_portal);
    }

    /// `vanectl portal`: opens the exemption, or closes it.
    fn portal_command(&mut self, open: bool) -> Result<(), ProtoError> {
        if !open {
            if let Some(closed) = self.portal.close() {
                self.portal_closed(closed);
                self.evaluate();
            }
            return Ok(());
        }
        let now = Instant::now();
        let length =
            std::time::Duration::from_secs(self.rules.rules().captive_portal.exemption_seconds);
        let servers = self.observer.snapshot().dns.servers.clone();
        let exemption = self
            .portal
            .open(now, SystemTime::now(), length, servers)
            .map_err(|message| ProtoError {
                code: ErrorCode::Failed,
                message,
            })?
            .clone();
        info!(
            dns = ?exemption.dns_servers,
            portal = ?exemption.portal_addresses,
            ports = ?exemption.portal_ports,
            seconds = length.as_secs(),
            "captive portal exemption open: the tunnel goes down, and only the network's DNS and the portal (its addresses, TCP 80, 443 and its own ports) are let out"
        );
        let _ = self.worker.send(WorkerMsg::Portal(Some(
            crate::net::killswitch::PortalExemption {
                dns_servers: exemption.dns_servers,
                portal_addresses: exemption.portal_addresses,
                portal_ports: exemption.portal_ports,
            },
        )));
        self.evaluate();
        Ok(())
    }

    /// logind announced that the machine is about to sleep: with
    /// `disconnect_on_sleep` the tunnel goes down first (the kill switch
    /// stays as the rules want it), and `ready` tells logind when it is
    /// down; otherwise at once.
    fn going_to_sleep(&mut self, ready: tokio::sync::oneshot::Sender<()>) {
        info!("the machine is going to sleep");
        self.power.asleep = true;
        // An exemption closes: its deadline runs on a clock that stops
        // while asleep, and the portal may be gone at the wake.
        if let Some(closed) = self.portal.close() {
            self.portal_closed(closed);
        }
        let _ = self.events.send(Event::Sleeping {});
        let wanted_up = self.supervisor.wants_up() || std::mem::take(&mut self.restore_up);
        if self.rules.rules().tunnel.disconnect_on_sleep && wanted_up {
            info!("disconnect_on_sleep: the tunnel goes down until the wake");
            self.down_for_sleep = true;
            self.sleep_ready = Some(ready);
            let actions = self.supervisor.want(false, Instant::now());
            self.dispatch(actions);
        } else {
            let _ = ready.send(());
            self.restore_up = wanted_up && !self.supervisor.wants_up();
            self.evaluate();
        }
    }

    /// The machine woke up (logind said so, or the clocks show it): the
    /// network is read afresh, probes run again, the rules decide at once,
    /// and a tunnel that is up handshakes now rather than at its next
    /// timer (its peer may have dropped the session meanwhile).
    fn woke(&mut self, slept: Option<std::time::Duration>) {
        let now = Instant::now();
        if !self.power.asleep && self.last_wake.is_some_and(|t| now - t < SAME_WAKE) {
            debug!(?slept, "the wake was handled already");
            return;
        }
        match slept {
            Some(s) => info!(slept_secs = s.as_secs(), "the machine woke up: reading the network afresh, probing again, handshaking at once"),
            None => info!("the machine woke up: reading the network afresh, probing again, handshaking at once"),
        }
        self.last_wake = Some(now);
        self.power = PowerView {
            asleep: false,
            wakes: self.power.wakes.saturating_add(1),
            last_wake: Some(unix_secs(SystemTime::now())),
            slept: slept.map(|s| s.as_secs()),
        };
        let _ = self.events.send(Event::Woke {
            slept: slept.map(|s| s.as_secs()),
        });
        // A sleep that never happened (logind gave up waiting, or the
        // machine woke before the tunnel was down).
        if let Some(ready) = self.sleep_ready.take() {
            let _ = ready.send(());
        }
        self.restore_up |= std::mem::take(&mut self.down_for_sleep);
        self.observer.resync();
        self.prober.expire_all();
        self.portal.recheck(SystemTime::now());
        let _ = self.worker.send(WorkerMsg::Wake);
        self.evaluate();
    }

    /// Whether the kill switch should be on: a full tunnel that the
    /// supervisor is keeping up (also while it restarts the tunnel), or in
    /// lockdown that the user has not released (also while vaned stops,
    /// and after: lockdown holds while vaned does not run).
    fn protect_wanted(&self) -> bool {
        self.lockdown()
            || (self.plan.full.is_some()
                && !self.shutting_down
                && (self.supervisor.wants_up()
                    || self.down_for_sleep
                    || self.down_for_portal
                    || self.restore_up))
    }

    /// Lockdown in force: the rule file's `lockdown = true` for a full
    /// tunnel, not released by the user.
    fn lockdown(&self) -> bool {
        self.plan.full.is_some()
            && self.rules.rules().tunnel.lockdown
            && !self.intent.lockdown_released
    }

    /// The kill switch that holds while vaned does not run: the plan's,
    /// with no local subnet allowed (the network at the next boot is not
    /// known), only link-local when `exclude_local_networks`.
    fn lockdown_spec(&self) -> Option<crate::net::killswitch::Spec> {
        let ft = self.plan.full.filter(|_| self.lockdown())?;
        Some(crate::net::killswitch::Spec {
            tunnel_if: self.plan.ifname.clone(),
            fwmark: ft.fwmark,
            allow_nets: crate::net::routing::kill_switch_allowed(&ft, &[]),
            block_dns: !self.plan.dns_servers.is_empty(),
            // Never kept for the next boot: it is for this network now.
            portal: None,
        })
    }

    /// Keeps `lockdown.json` (loaded at boot by vane-lockdown.service) and
    /// the worker's exit behaviour in step with lockdown.
    fn sync_lockdown(&mut self) {
        let spec = self.lockdown_spec();
        if self.lockdown_saved.as_ref() == Some(&spec) {
            return;
        }
        let _ = self.worker.send(WorkerMsg::HoldOnExit(spec.is_some()));
        match crate::net::killswitch::persist(&self.state_dir, spec.as_ref()) {
            Ok(()) => {
                if spec.is_some() {
                    info!("lockdown: the kill switch is kept for the next boot and while vaned does not run");
                } else if self.lockdown_saved.is_some() {
                    info!("lockdown released: no kill switch is kept for the next boot");
                }
                self.lockdown_saved = Some(spec);
            }
            // Tried again at the next change.
            Err(e) => error!("lockdown: {e}"),
        }
    }

    /// Watches the tunnel's configuration file the rules name (again when
    /// a reload names another).
    fn watch_config(&mut self) {
        let path = self.rules.rules().tunnel.config.clone();
        if self.config_watch.as_ref().is_some_and(|(p, _)| *p == path) {
            return;
        }
        self.config_watch = watch(
            &path,
            self.reload_tx.clone(),
            "after writing it, reload with `vanectl reload`",
        )
        .map(|w| (path, w));
    }

    fn dispatch(&mut self, actions: Vec<Action>) {
        // The worker takes its messages in order: the kill switch goes on
        // before the tunnel starts and off after it has stopped.
        let protect = self.protect_wanted();
        if protect && self.protect_sent != Some(true) {
            let _ = self.worker.send(WorkerMsg::Protect(true));
            self.protect_sent = Some(true);
        }
        for a in actions {
            if !matches!(a, Action::ArmTimer(_)) {
                let _ = self.worker.send(WorkerMsg::Act(a));
            }
        }
        if !protect && self.protect_sent != Some(false) {
            let _ = self.worker.send(WorkerMsg::Protect(false));
            self.protect_sent = Some(false);
        }
        self.publish();
    }

    fn report(&mut self, report: Report) {
        let now = Instant::now();
        let actions = match report {
            Report::Started { generation, pid } => {
                if generation == self.supervisor.generation() {
                    self.pid = Some(pid);
                    // It runs the binary on disk.
                    self.binary_error = None;
                }
                self.supervisor.started(generation, now)
            }
            Report::BinaryChecked { pid, new } => match new {
                Ok(false) => {
                    self.binary_error = None;
                    Vec::new()
                }
                Ok(true) => {
                    self.binary_error = None;
                    if self.pid == Some(pid) && !self.shutting_down {
                        info!(binary = %self.binary.display(), pid, "a new tunnel binary is on disk: moving the tunnel to it");
                        self.supervisor.upgrade(now)
                    } else {
                        Vec::new()
                    }
                }
                Err(e) => {
                    warn!("the new tunnel binary is not used: {e}; the tunnel keeps running the one it has");
                    self.binary_error = Some(e);
                    Vec::new()
                }
            },
            Report::Failed { generation, error } => {
                if generation == self.supervisor.generation() {
                    self.pid = None;
                }
                self.supervisor.failed(generation, error, now)
            }
            Report::Stopped => {
                self.pid = None;
                self.supervisor.stopped(now)
            }
            Report::KillSwitch { active, error } => {
                self.kill_switch_active = active;
                self.kill_switch_error = error;
                Vec::new()
            }
            Report::Dns { reasserted, error } => {
                self.dns_reasserted = reasserted;
                self.dns_error = error;
                Vec::new()
            }
        };
        self.dispatch(actions);
    }

    fn shut_down(&mut self) {
        self.shutting_down = true;
        self.close_exemption_for_exit();
        let actions = self.supervisor.want(false, Instant::now());
        self.dispatch(actions);
    }

    /// vaned stops or hands over: an open exemption closes first (a kill
    /// switch that outlives vaned, in lockdown, must not carry it).
    fn close_exemption_for_exit(&mut self) {
        if self.portal.close().is_some() {
            info!("captive portal exemption closed: vaned stops");
            let _ = self.worker.send(WorkerMsg::Portal(None));
        }
    }

    /// Reads the rule file again and, with it, the tunnel's configuration.
    fn reload(&mut self) -> ReloadOutcome {
        let outcome = match self.rules.reload() {
            Reloaded::Applied => ReloadOutcome::Applied,
            Reloaded::Unchanged => ReloadOutcome::Unchanged,
            Reloaded::Refused(e) => {
                error!("the rule file was refused; the rules in force stay:\n{e}");
                self.publish();
                return ReloadOutcome::Refused;
            }
        };
        self.observer
            .set_interface_overrides(&overrides(&self.rules))
            .unwrap_or_else(|e| {
                error!("interface overrides: {e}");
            });
        self.watch_config();
        let cp = self.rules.rules().captive_portal.clone();
        if let Some(closed) = self.portal.configure(cp.enabled, &cp.check_url) {
            self.portal_closed(closed);
        }
        self.replan();
        self.evaluate();
        if self.plan_error.is_some() {
            // The rules are in force; the tunnel's configuration is not.
            return ReloadOutcome::Refused;
        }
        outcome
    }

    /// Rebuilds the tunnel's plan from the rules' `[tunnel]` and its config
    /// file. A changed plan restarts a running tunnel; a plan that cannot
    /// be built keeps the old one running and is reported.
    fn replan(&mut self) {
        let rules = Arc::clone(self.rules.rules());
        match plan::build(&rules.tunnel, self.binary.clone()) {
            Ok(new) => {
                self.plan_error = None;
                if new != self.plan {
                    let ex = exclusions(&new);
                    if ex != exclusions(&self.plan) {
                        self.observer.set_exclusions(ex);
                    }
                    let restart = !matches!(self.supervisor.state(), TunnelState::Down);
                    let now = Instant::now();
                    let mut actions = Vec::new();
                    if restart {
                        info!("the tunnel's configuration changed: restarting it");
                        actions = self.supervisor.want(false, now);
                        // Started again by the next decision, also one
                        // that leaves the tunnel as it is.
                        self.restore_up = true;
                    }
                    // The old plan stops the old tunnel; the new one starts.
                    for a in actions {
                        let _ = self.worker.send(WorkerMsg::Act(a));
                    }
                    let _ = self.worker.send(WorkerMsg::Plan(Box::new(new.clone())));
                    self.plan = new;
                }
            }
            Err(e) => {
                if self.plan.device.private_key.is_none() {
                    // Only the unconfigured plan is in force.
                    warn!("the tunnel's configuration cannot be used yet: {e}");
                } else {
                    error!("the tunnel's configuration was refused; the one in force stays: {e}");
                }
                self.plan_error = Some(e.to_string());
            }
        }
    }

    fn set_intent(&mut self, intent: UserIntent) -> Result<(), ProtoError> {
        self.store.save(&intent).map_err(|e| ProtoError {
            code: ErrorCode::Failed,
            message: format!("cannot persist the change, nothing changed: {e}"),
        })?;
        self.intent = intent;
        self.evaluate();
        Ok(())
    }

    fn handle(&mut self, command: Command) -> Result<Reply, ProtoError> {
        let manual = |want| ManualIntent {
            want,
            network: self.network().identity(),
        };
        match command {
            Command::Watch {} => Ok(Reply::Watching),
            Command::Status {} => Ok(Reply::Status(self.status())),
            Command::Network {} => Ok(Reply::Network {
                network: NetworkView {
                    captive_portal: self.portal.view(),
                    ..NetworkView::from(&self.observer.snapshot())
                },
            }),
            Command::Up {} | Command::Down {} => {
                let want = if command == (Command::Up {}) {
                    Manual::Up
                } else {
                    Manual::Down
                };
                let mut intent = self.intent.clone();
                intent.manual = Some(manual(want));
                self.set_intent(intent)?;
                Ok(Reply::Status(self.status()))
            }
            Command::Resume {} => {
                let mut intent = self.intent.clone();
                intent.manual = None;
                self.set_intent(intent)?;
                Ok(Reply::Status(self.status()))
            }
            Command::OnDemand { enabled } => {
                let mut intent = self.intent.clone();
                intent.on_demand_disabled = !enabled;
                self.set_intent(intent)?;
                Ok(Reply::Status(self.status()))
            }
            Command::Lockdown { engaged } => {
                if !self.rules.rules().tunnel.lockdown {
                    return Err(ProtoError {
                        code: ErrorCode::Failed,
                        message: format!(
                            "lockdown is not configured ({} has no lockdown = true in [tunnel])",
                            self.rules.path().display()
                        ),
                    });
                }
                let mut intent = self.intent.clone();
                intent.lockdown_released = !engaged;
                self.set_intent(intent)?;
                Ok(Reply::Status(self.status()))
            }
            Command::Portal { open } => {
                self.portal_command(open)?;
                Ok(Reply::Status(self.status()))
            }
            Command::Reload {} => {
                let outcome = self.reload();
                Ok(Reply::Reloaded {
                    outcome,
                    status: self.status(),
                })
            }
        }
    }

    fn status(&self) -> Status {
        let now = Instant::now();
        let since = SystemTime::now()
            .checked_sub(now.saturating_duration_since(self.supervisor.since()))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let rules = self.rules.rules();
        Status {
            tunnel: TunnelStatus {
                interface: self.plan.ifname.clone(),
                state: self.supervisor.state(),
                since: unix_secs(since),
                pid: self.pid,
                restarts: self.supervisor.restarts(),
                last_error: self
                    .plan_error
                    .clone()
                    .or_else(|| self.supervisor.last_error().map(str::to_owned)),
                listen_port: None,
                peers: Vec::new(),
                upgrades: self.supervisor.upgrades(),
                binary_error: self.binary_error.clone(),
                dns_reasserted: self.dns_reasserted,
                dns_error: self.dns_error.clone(),
                kill_switch: self.plan.full.map(|_| KillSwitchView {
                    active: self.kill_switch_active,
                    lockdown: rules.tunnel.lockdown,
                    released: self.intent.lockdown_released,
                    error: self.kill_switch_error.clone(),
                }),
            },
            decision: DecisionView {
                desired: self.decision.desired,
                action: self.decision.action,
                rule: self.decision.rule,
                reason: self.decision.to_string(),
                detail: self.decision.reason.clone(),
                probes_needed: self.decision.probes_needed.clone(),
                probes: self.prober.view(),
            },
            network: NetworkView {
                captive_portal: self.portal.view(),
                ..NetworkView::from(&self.observer.snapshot())
            },
            intent: IntentView {
                on_demand: rules.on_demand && !self.intent.on_demand_disabled,
                persisted: self.intent.clone(),
            },
            rules: RulesView {
                file: self.rules.path().display().to_string(),
                rules: rules.rules.len(),
                refused: self
                    .rules
                    .last_refusal()
                    .map(|r| r.error.to_string())
                    .or_else(|| self.plan_error.clone()),
            },
            daemon: DaemonView {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                started: unix_secs(self.started),
                power: self.power.clone(),
            },
        }
    }

    /// Tells watchers (and systemd) when the status changed.
    /// Whether the tunnel is on its way up or down.
    fn settling(&self) -> bool {
        matches!(
            self.supervisor.state(),
            TunnelState::Starting | TunnelState::Stopping
        )
    }

    fn publish(&mut self) {
        self.sync_lockdown();
        if self.supervisor.state() == TunnelState::Down {
            if let Some(ready) = self.sleep_ready.take() {
                info!("the tunnel is down: the machine may sleep");
                let _ = ready.send(());
            }
        }
        let status = self.status();
        if !self.settling() {
            for reply in self.parked.drain(..) {
                let _ = reply.send(Ok(Reply::Status(status.clone())));
            }
        }
        let changed = self.last_published.as_ref().is_none_or(|last| {
            last.tunnel != status.tunnel
                || last.decision != status.decision
                || last.intent != status.intent
                || last.rules != status.rules
                || last.daemon.power != status.daemon.power
                || portal_change(&last.network.captive_portal)
                    != portal_change(&status.network.captive_portal)
        });
        if changed {
            let line = match &self.plan_error {
                Some(e) => format!("no tunnel: its configuration cannot be used: {e}"),
                None => format!("tunnel {}; {}", status.tunnel.state, status.decision.reason),
            };
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
            let _ = self.events.send(Event::Status {
                status: Box::new(status.clone()),
            });
            self.last_published = Some(status);
        }
    }
}
