//! A fake systemd-logind on a private `dbus-daemon`, for vaned's sleep and
//! wake: it hands out inhibitors (`Inhibit`, a pipe's write end, as logind
//! hands out a FIFO's; the lock is held while any copy of it is open) and
//! emits `PrepareForSleep`. vaned reaches it through
//! `DBUS_SYSTEM_BUS_ADDRESS=` [`FakeLogind::address`].

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::bus::PrivateBus;

const LOGIN1: &str = "org.freedesktop.login1";
const LOGIN1_PATH: &str = "/org/freedesktop/login1";
const LOGIN1_MANAGER: &str = "org.freedesktop.login1.Manager";

/// One inhibitor handed out: who asked, and our end of its pipe.
struct Inhibitor {
    what: String,
    who: String,
    mode: String,
    read_end: OwnedFd,
}

impl Inhibitor {
    /// Whether every copy of the write end is closed.
    fn released(&self) -> bool {
        let mut fds = [nix::poll::PollFd::new(
            self.read_end.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
            Ok(n) if n > 0 => fds[0]
                .revents()
                .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLHUP)),
            _ => false,
        }
    }
}

#[derive(Default)]
struct Manager {
    inhibitors: Arc<Mutex<Vec<Inhibitor>>>,
}

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl Manager {
    fn inhibit(
        &self,
        what: String,
        who: String,
        _why: String,
        mode: String,
    ) -> zbus::fdo::Result<zbus::OwnedFd> {
        let (read_end, write_end) =
            nix::unistd::pipe().map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?;
        self.inhibitors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Inhibitor {
                what,
                who,
                mode,
                read_end,
            });
        Ok(zbus::OwnedFd::from(write_end))
    }
}

/// The fake logind and its bus; both stop when it drops.
pub struct FakeLogind {
    pub address: String,
    inhibitors: Arc<Mutex<Vec<Inhibitor>>>,
    conn: zbus::Connection,
    bus: PrivateBus,
}

impl FakeLogind {
    /// Starts a dbus-daemon listening in `dir` and logind's name on it.
    pub fn start(dir: &Path) -> Result<FakeLogind> {
        let bus = PrivateBus::start(dir, "system_bus_socket")?;
        let inhibitors = Arc::new(Mutex::new(Vec::new()));
        let manager = Manager {
            inhibitors: Arc::clone(&inhibitors),
        };
        let conn = bus.serve(LOGIN1, LOGIN1_PATH, manager)?;
        Ok(FakeLogind {
            address: bus.address.clone(),
            inhibitors,
            conn,
            bus,
        })
    }

    /// The delay inhibitors for sleep held now, by who asked for them.
    pub fn sleep_delays(&self) -> Vec<String> {
        self.inhibitors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|i| i.what.split(':').any(|w| w == "sleep") && i.mode == "delay")
            .filter(|i| !i.released())
            .map(|i| i.who.clone())
            .collect()
    }

    /// Waits until `who` holds a delay inhibitor for sleep.
    pub fn wait_for_delay(&self, who: &str, timeout: Duration) -> Result<()> {
        crate::wait_until(timeout, &format!("{who}'s sleep inhibitor"), || {
            self.sleep_delays().iter().any(|w| w == who)
        })
    }

    fn prepare_for_sleep(&self, start: bool) -> Result<()> {
        self.bus.rt.block_on(self.conn.emit_signal(
            None::<()>,
            LOGIN1_PATH,
            LOGIN1_MANAGER,
            "PrepareForSleep",
            &(start,),
        ))?;
        Ok(())
    }

    /// Announces the sleep and waits, as logind does (at most `limit`, its
    /// InhibitDelayMaxSec), until every delay inhibitor is released.
    /// Returns how long that took, `None` if `limit` passed first.
    pub fn sleep(&self, limit: Duration) -> Result<Option<Duration>> {
        let t0 = Instant::now();
        self.prepare_for_sleep(true)?;
        let released = crate::wait_until(limit, "the sleep inhibitors released", || {
            self.sleep_delays().is_empty()
        });
        Ok(released.ok().map(|()| t0.elapsed()))
    }

    /// Announces the wake.
    pub fn wake(&self) -> Result<()> {
        self.prepare_for_sleep(false)
    }
}
