//! Sleep and wake. Two sources, because either can be missing:
//!
//! - **logind** (`org.freedesktop.login1` on the system bus): vaned holds
//!   a *delay* inhibitor for `sleep`, so when logind announces
//!   `PrepareForSleep(true)` the machine waits (at most logind's
//!   `InhibitDelayMaxSec`, 5 s by default) until vaned has done what it
//!   does before sleeping and closed the inhibitor's descriptor.
//!   `PrepareForSleep(false)` is the wake; the inhibitor is taken again.
//! - **the clocks**, for a suspend logind did not announce (no logind,
//!   `echo mem > /sys/power/state`, a VM paused): `CLOCK_BOOTTIME` counts
//!   the time suspended, `CLOCK_MONOTONIC` does not, so their difference
//!   grows by the time slept (`vane_tunnel::clock::ClockWatch`, pure,
//!   shared with the tunnel, which watches the clocks itself).
//!
//! The I/O shell ([`spawn_logind`]) talks to logind and sends [`Power`]
//! messages to the daemon's loop, which decides what to do (daemon.rs).

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

const LOGIN1: &str = "org.freedesktop.login1";
const LOGIN1_PATH: &str = "/org/freedesktop/login1";
const LOGIN1_MANAGER: &str = "org.freedesktop.login1.Manager";

/// The longest vaned keeps the machine from sleeping while it takes the
/// tunnel down; logind gives up waiting after its own `InhibitDelayMaxSec`
/// (5 s by default) anyway.
pub const SLEEP_DELAY_MAX: Duration = Duration::from_secs(4);

/// What the sleep sources tell the daemon's loop.
#[derive(Debug)]
pub enum Power {
    /// The machine is about to sleep (logind). Send on `ready` (or drop
    /// it) when vaned is ready: the machine sleeps then.
    Sleeping { ready: oneshot::Sender<()> },
    /// The machine woke up: from logind's word (`slept` unknown) or from
    /// the clocks (`slept` measured).
    Woke { slept: Option<Duration> },
    /// logind, found on the bus, is not preparing for sleep (a wake may
    /// have been announced while vaned was not listening).
    Awake,
}

/// How long vaned waits before it looks for the bus or logind again (at
/// boot vaned may start before D-Bus; a bus connection can close).
const RETRY: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Follows logind on the system bus (`DBUS_SYSTEM_BUS_ADDRESS`, else the
/// standard socket) for as long as vaned runs. Without a bus or a logind
/// it says so at debug level and looks again later (backing off to once a
/// minute): the clocks still notice a suspend meanwhile (after the wake,
/// without the chance to act before it).
pub fn spawn_logind(tx: mpsc::UnboundedSender<Power>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut wait = RETRY;
        loop {
            match follow_logind(&tx).await {
                Ok(()) => return,
                Err(e) => debug!(
                    "logind: {e}; a suspend is noticed by the clocks only (looking again in {} s)",
                    wait.as_secs()
                ),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
    })
}

/// Follows logind until the daemon's loop is gone (`Ok`) or the bus
/// fails (`Err`). A logind that restarts has forgotten the inhibitor: a
/// new one is taken from the new logind.
async fn follow_logind(tx: &mpsc::UnboundedSender<Power>) -> zbus::Result<()> {
    let conn = zbus::Connection::system().await?;
    let manager = zbus::Proxy::new(&conn, LOGIN1, LOGIN1_PATH, LOGIN1_MANAGER).await?;
    // Subscribed before the inhibitor is taken: no announcement is missed.
    let mut signals = manager.receive_signal("PrepareForSleep").await?;
    let mut owners = manager.receive_owner_changed().await?;
    let mut inhibitor = Some(inhibit(&manager).await?);
    info!("following logind: the tunnel is looked after before the machine sleeps and at once when it wakes");
    if let Ok(false) = manager.get_property::<bool>("PreparingForSleep").await {
        if tx.send(Power::Awake).is_err() {
            return Ok(());
        }
    }
    loop {
        let message = tokio::select! {
            m = signals.next() => match m {
                Some(m) => m,
                None => break,
            },
            owner = owners.next() => match owner {
                Some(Some(_)) => {
                    info!("logind restarted: taking the sleep inhibitor again");
                    inhibitor = Some(inhibit(&manager).await?);
                    continue;
                }
                Some(None) => {
                    warn!("logind left the bus: a suspend is noticed by the clocks only until it is back");
                    inhibitor = None;
                    continue;
                }
                None => break,
            },
        };
        let start: bool = match message.body().deserialize() {
            Ok(b) => b,
            Err(e) => {
                warn!("logind: a PrepareForSleep signal without its boolean: {e}");
                continue;
            }
        };
        if start {
            let (ready, done) = oneshot::channel();
            if tx.send(Power::Sleeping { ready }).is_err() {
                return Ok(());
            }
            // Held until the loop is ready (or gives up), then closed:
            // logind lets the machine sleep once every delay inhibitor is
            // closed.
            if tokio::time::timeout(SLEEP_DELAY_MAX, done).await.is_err() {
                warn!(
                    "not ready to sleep within {} s; letting the machine sleep anyway",
                    SLEEP_DELAY_MAX.as_secs()
                );
            }
            inhibitor = None;
        } else {
            if tx.send(Power::Woke { slept: None }).is_err() {
                return Ok(());
            }
            if inhibitor.is_none() {
                match inhibit(&manager).await {
                    Ok(fd) => inhibitor = Some(fd),
                    Err(e) => warn!("logind: cannot take the sleep inhibitor again: {e}"),
                }
            }
        }
    }
    drop(inhibitor);
    Err(zbus::Error::Failure("the bus connection closed".into()))
}

/// A delay inhibitor for sleep: the machine waits for vaned (within
/// logind's limit) until the descriptor is closed.
async fn inhibit(manager: &zbus::Proxy<'_>) -> zbus::Result<zbus::OwnedFd> {
    manager
        .call(
            "Inhibit",
            &(
                "sleep",
                "vaned",
                "Keep the VPN tunnel's kill switch and take the tunnel down if configured",
                "delay",
            ),
        )
        .await
}
