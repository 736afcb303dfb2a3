//! The tunnel supervisor's state machine: plain data in, actions out, time
//! passed in. The shell (the worker in `tunnel/mod.rs`, the loop in
//! `daemon.rs`) performs the actions and feeds back what happened.
//!
//! - `want(true)` from Down starts the tunnel; `want(false)` stops it from
//!   any state.
//! - A tunnel process that exits or fails to start while the tunnel is
//!   wanted is restarted: the first time at once (a crash or an upgrade
//!   should cost one round trip, not a backoff), then after a backoff that
//!   doubles up to [`MAX_BACKOFF`], so a tunnel that keeps crashing never
//!   becomes a busy loop. A run that lasted [`STABLE`] resets the count.
//! - Every attempt has a generation; reports about an older generation
//!   (a late exit of a process already replaced) are ignored.

use std::time::{Duration, Instant};

use vane_ctl::proto::TunnelState;

pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// A run at least this long is not part of a crash loop: its exit is
/// restarted at once, like a first crash. Short enough that a kill or an
/// upgrade a few seconds after the last one is not taken for a loop; a
/// tunnel dying every few seconds still restarts no faster than that.
pub const STABLE: Duration = Duration::from_secs(5);

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Make sure the device, routes and socket exist and start a tunnel
    /// process for this generation; report `started` or `failed`.
    Start { generation: u64 },
    /// Stop the tunnel process (if any) and remove the device, routes and
    /// socket; report `stopped`.
    Stop,
    /// Call `timer` at this instant.
    ArmTimer(Instant),
}

#[derive(Debug, Clone)]
pub struct Supervisor {
    state: TunnelState,
    want_up: bool,
    generation: u64,
    /// When the state last changed.
    since: Instant,
    /// When the current run became up.
    up_since: Option<Instant>,
    /// Failures in a row (reset by a stable run).
    failures: u32,
    /// Restarts after failures, in all.
    restarts: u32,
    /// Moves to a new binary, in all.
    upgrades: u32,
    last_error: Option<String>,
    timer: Option<Instant>,
}

impl Supervisor {
    pub fn new(now: Instant) -> Supervisor {
        Supervisor {
            state: TunnelState::Down,
            want_up: false,
            generation: 0,
            since: now,
            up_since: None,
            failures: 0,
            restarts: 0,
            upgrades: 0,
            last_error: None,
            timer: None,
        }
    }

    pub fn state(&self) -> TunnelState {
        self.state
    }
    pub fn since(&self) -> Instant {
        self.since
    }
    pub fn restarts(&self) -> u32 {
        self.restarts
    }
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
    /// Whether the tunnel is wanted up (also while it restarts).
    pub fn wants_up(&self) -> bool {
        self.want_up
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// The pending timer, if any.
    pub fn timer(&self) -> Option<Instant> {
        self.timer
    }

    fn set(&mut self, state: TunnelState, now: Instant) {
        if self.state != state {
            self.state = state;
            self.since = now;
        }
    }

    fn start(&mut self, now: Instant) -> Vec<Action> {
        self.generation += 1;
        self.timer = None;
        self.set(TunnelState::Starting, now);
        vec![Action::Start {
            generation: self.generation,
        }]
    }

    /// A new tunnel binary is on disk (an upgrade): a running tunnel moves
    /// to it as a new generation (the worker stops the old process and
    /// starts the new one). Not a failure: neither the restart count nor
    /// the backoff changes. Anything but a running, wanted tunnel picks the
    /// new binary up at its next start anyway.
    pub fn upgrade(&mut self, now: Instant) -> Vec<Action> {
        if self.state != TunnelState::Up || !self.want_up {
            return Vec::new();
        }
        self.upgrades += 1;
        if self
            .up_since
            .take()
            .is_some_and(|t| now.saturating_duration_since(t) >= STABLE)
        {
            self.failures = 0;
        }
        self.start(now)
    }

    /// Upgrades done (see [`Supervisor::upgrade`]).
    pub fn upgrades(&self) -> u32 {
        self.upgrades
    }

    /// The policy's wish.
    pub fn want(&mut self, up: bool, now: Instant) -> Vec<Action> {
        self.want_up = up;
        match (up, self.state) {
            (true, TunnelState::Down) => self.start(now),
            (true, _) => Vec::new(),
            (false, TunnelState::Down | TunnelState::Stopping) => Vec::new(),
            (false, _) => {
                self.timer = None;
                self.up_since = None;
                self.set(TunnelState::Stopping, now);
                vec![Action::Stop]
            }
        }
    }

    /// A tunnel process left by an earlier vaned was adopted: it is up
    /// (and wanted up, until the rules say otherwise) as a new generation,
    /// whose failure is restarted like any other.
    pub fn adopted(&mut self, now: Instant) -> u64 {
        self.want_up = true;
        self.generation += 1;
        self.timer = None;
        self.up_since = Some(now);
        self.set(TunnelState::Up, now);
        self.generation
    }

    /// The tunnel of `generation` runs and is configured.
    pub fn started(&mut self, generation: u64, now: Instant) -> Vec<Action> {
        if generation != self.generation || self.state != TunnelState::Starting {
            return Vec::new();
        }
        self.set(TunnelState::Up, now);
        self.up_since = Some(now);
        Vec::new()
    }

    /// The tunnel of `generation` failed to start, or its process exited.
    pub fn failed(&mut self, generation: u64, error: String, now: Instant) -> Vec<Action> {
        if generation != self.generation
            || !matches!(self.state, TunnelState::Starting | TunnelState::Up)
        {
            return Vec::new();
        }
        if self
            .up_since
            .is_some_and(|t| now.saturating_duration_since(t) >= STABLE)
        {
            self.failures = 0;
        }
        self.up_since = None;
        self.failures += 1;
        self.restarts += 1;
        self.last_error = Some(error);
        let delay = backoff(self.failures);
        if delay.is_zero() {
            return self.start(now);
        }
        self.set(TunnelState::Restarting, now);
        let at = now + delay;
        self.timer = Some(at);
        vec![Action::ArmTimer(at)]
    }

    /// The timer fired.
    pub fn timer_fired(&mut self, now: Instant) -> Vec<Action> {
        match self.timer {
            Some(at) if now >= at => {}
            _ => return Vec::new(),
        }
        self.timer = None;
        if self.state == TunnelState::Restarting && self.want_up {
            self.start(now)
        } else {
            Vec::new()
        }
    }

    /// The stop finished (device and routes removed).
    pub fn stopped(&mut self, now: Instant) -> Vec<Action> {
        if self.state != TunnelState::Stopping {
            return Vec::new();
        }
        self.set(TunnelState::Down, now);
        self.failures = 0;
        if self.want_up {
            self.start(now)
        } else {
            Vec::new()
        }
    }
}

/// The delay before restart number `failures` in a row: none for the
/// first, then 0.5 s doubling to 30 s.
pub fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let exp = (failures - 2).min(16);
    FIRST_BACKOFF.saturating_mul(1u32 << exp).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gen(actions: &[Action]) -> u64 {
        match actions {
            [Action::Start { generation }] => *generation,
            other => panic!("expected a start, got {other:?}"),
        }
    }

    #[test]
    fn an_upgrade_moves_a_running_tunnel_without_counting_a_failure() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        // Nothing to move while down or starting.
        assert!(s.upgrade(t0).is_empty());
        let g1 = gen(&s.want(true, t0));
        assert!(s.upgrade(t0).is_empty());
        s.started(g1, t0);
        let t1 = t0 + STABLE * 2;
        let g2 = gen(&s.upgrade(t1));
        assert!(g2 > g1);
        assert_eq!(s.state(), TunnelState::Starting);
        assert_eq!((s.restarts(), s.upgrades()), (0, 1));
        // The old process's exit is stale.
        assert!(s.failed(g1, "killed".into(), t1).is_empty());
        // The new binary failing to start is restarted at once (the run
        // before the upgrade was stable), then backs off.
        let g3 = gen(&s.failed(g2, "no good".into(), t1));
        assert!(matches!(
            s.failed(g3, "no good".into(), t1).as_slice(),
            [Action::ArmTimer(_)]
        ));
        assert_eq!(s.state(), TunnelState::Restarting);
        assert!(s.upgrade(t1).is_empty());
        // Not wanted: no upgrade either.
        let mut s = Supervisor::new(t0);
        let g = gen(&s.want(true, t0));
        s.started(g, t0);
        s.want(false, t0);
        assert!(s.upgrade(t0).is_empty());
    }

    #[test]
    fn up_then_down() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        let g = gen(&s.want(true, t0));
        assert_eq!(s.state(), TunnelState::Starting);
        assert!(s.want(true, t0).is_empty());
        s.started(g, t0);
        assert_eq!(s.state(), TunnelState::Up);
        assert_eq!(s.want(false, t0), vec![Action::Stop]);
        assert_eq!(s.state(), TunnelState::Stopping);
        assert!(s.want(false, t0).is_empty());
        assert!(s.stopped(t0).is_empty());
        assert_eq!(s.state(), TunnelState::Down);
    }

    #[test]
    fn a_crash_is_restarted_at_once_then_with_growing_backoff() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        let g1 = gen(&s.want(true, t0));
        s.started(g1, t0);
        // First crash: restarted at once, a new generation.
        let g2 = gen(&s.failed(g1, "killed".into(), t0));
        assert!(g2 > g1);
        assert_eq!(s.restarts(), 1);
        assert_eq!(s.last_error(), Some("killed"));
        // A late report about the old process changes nothing.
        assert!(s.failed(g1, "late".into(), t0).is_empty());
        assert_eq!(s.state(), TunnelState::Starting);
        // Second failure in a row: a timer, no start.
        let a = s.failed(g2, "again".into(), t0);
        assert_eq!(a, vec![Action::ArmTimer(t0 + FIRST_BACKOFF)]);
        assert_eq!(s.state(), TunnelState::Restarting);
        assert!(s.timer_fired(t0).is_empty(), "early timer");
        let g3 = gen(&s.timer_fired(t0 + FIRST_BACKOFF));
        let a = s.failed(g3, "again".into(), t0);
        assert_eq!(a, vec![Action::ArmTimer(t0 + 2 * FIRST_BACKOFF)]);
    }

    #[test]
    fn a_stable_run_resets_the_backoff() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        let g = gen(&s.want(true, t0));
        s.started(g, t0);
        let g = gen(&s.failed(g, "x".into(), t0));
        s.started(g, t0);
        let later = t0 + STABLE;
        let g2 = gen(&s.failed(g, "x".into(), later));
        assert!(g2 > g);
    }

    #[test]
    fn down_during_backoff_stops_and_cancels_the_timer() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        let g = gen(&s.want(true, t0));
        let g = gen(&s.failed(g, "x".into(), t0));
        s.failed(g, "x".into(), t0);
        assert_eq!(s.state(), TunnelState::Restarting);
        assert_eq!(s.want(false, t0), vec![Action::Stop]);
        assert_eq!(s.timer(), None);
        assert!(s.timer_fired(t0 + MAX_BACKOFF).is_empty());
        s.stopped(t0);
        assert_eq!(s.state(), TunnelState::Down);
    }

    #[test]
    fn up_while_stopping_starts_again_after_the_stop() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        let g = gen(&s.want(true, t0));
        s.started(g, t0);
        s.want(false, t0);
        assert!(s.want(true, t0).is_empty());
        let g2 = gen(&s.stopped(t0));
        assert!(g2 > g);
    }

    #[test]
    fn an_adopted_tunnel_is_up_and_restarted_when_it_dies() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        let g = s.adopted(t0);
        assert_eq!(s.state(), TunnelState::Up);
        assert!(s.wants_up());
        assert!(s.want(true, t0).is_empty());
        let g2 = gen(&s.failed(g, "killed".into(), t0));
        assert!(g2 > g);
        let mut s = Supervisor::new(t0);
        s.adopted(t0);
        assert_eq!(s.want(false, t0), vec![Action::Stop]);
    }

    #[test]
    fn the_backoff_is_bounded() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), FIRST_BACKOFF);
        assert_eq!(backoff(3), 2 * FIRST_BACKOFF);
        assert_eq!(backoff(100), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Want(bool),
        Started,
        Failed,
        Stale,
        Timer(u64),
        Stopped,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            any::<bool>().prop_map(Step::Want),
            Just(Step::Started),
            Just(Step::Failed),
            Just(Step::Stale),
            (0u64..40_000).prop_map(Step::Timer),
            Just(Step::Stopped),
        ]
    }

    proptest! {
        /// Whatever happens: at most one start per report (no busy loop),
        /// a stop is only asked when leaving a running state, and when the
        /// tunnel is not wanted it never starts.
        #[test]
        fn never_a_busy_loop_and_never_up_unwanted(steps in proptest::collection::vec(step(), 1..60)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut s = Supervisor::new(t0);
            for st in steps {
                let g = s.generation();
                let actions = match st {
                    Step::Want(b) => s.want(b, now),
                    Step::Started => s.started(g, now),
                    Step::Failed => s.failed(g, "x".into(), now),
                    Step::Stale => s.failed(g.wrapping_sub(1), "x".into(), now),
                    Step::Timer(ms) => { now += Duration::from_millis(ms); s.timer_fired(now) }
                    Step::Stopped => s.stopped(now),
                };
                prop_assert!(actions.len() <= 1);
                for a in &actions {
                    if let Action::Start { .. } = a {
                        prop_assert!(s.wants_up());
                        prop_assert_eq!(s.state(), TunnelState::Starting);
                    }
                    if let Action::ArmTimer(at) = a {
                        prop_assert!(*at > now);
                    }
                }
                if !s.wants_up() {
                    prop_assert!(matches!(s.state(), TunnelState::Down | TunnelState::Stopping));
                }
            }
        }
    }
}
