//! Leading-edge emission with coalescing of follow-ups, as a sans-IO state
//! machine: the caller passes the time in and sleeps until
//! [`Coalescer::deadline`].
//!
//! - Quiet, then a change: emit at once and open a window.
//! - Changes inside the window: remembered, not emitted.
//! - The window ends with changes remembered: emit once (the latest
//!   state) and open a new window, so a link flapping without pause is
//!   reported at most once per window; with nothing remembered, go quiet.

use std::time::{Duration, Instant};

/// The default window.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(150);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Quiet,
    Window { until: Instant, pending: bool },
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Coalescer {
    window: Duration,
    state: State,
}

impl Coalescer {
    pub fn new(window: Duration) -> Coalescer {
        Coalescer {
            window,
            state: State::Quiet,
        }
    }

    /// A change happened at `now`. Returns true when it should be emitted
    /// now (the leading edge).
    pub fn on_change(&mut self, now: Instant) -> bool {
        match &mut self.state {
            State::Window { until, pending } if now < *until => {
                *pending = true;
                false
            }
            _ => {
                self.state = State::Window {
                    until: now + self.window,
                    pending: false,
                };
                true
            }
        }
    }

    /// When the caller must call [`Coalescer::on_timeout`] next.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Quiet => None,
            State::Window { until, .. } => Some(until),
        }
    }

    /// Time passed. Returns true when the coalesced changes should be
    /// emitted now (the trailing edge).
    pub fn on_timeout(&mut self, now: Instant) -> bool {
        match self.state {
            State::Window { until, pending } if now >= until => {
                if pending {
                    self.state = State::Window {
                        until: now + self.window,
                        pending: false,
                    };
                    true
                } else {
                    self.state = State::Quiet;
                    false
                }
            }
            _ => false,
        }
    }

    /// Forgets remembered changes (the caller found the state back where
    /// it was last emitted). The window stays open.
    pub fn cancel_pending(&mut self) {
        if let State::Window { pending, .. } = &mut self.state {
            *pending = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_millis(150);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn first_change_is_emitted_at_once() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(W);
        assert_eq!(c.deadline(), None);
        assert!(c.on_change(t0));
        assert_eq!(c.deadline(), Some(t0 + W));
        // Nothing more: the window closes quietly.
        assert!(!c.on_timeout(t0 + W));
        assert_eq!(c.deadline(), None);
        // The next change is a leading edge again.
        assert!(c.on_change(t0 + ms(500)));
    }

    #[test]
    fn follow_ups_are_coalesced_into_one_trailing_emission() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(W);
        assert!(c.on_change(t0));
        assert!(!c.on_change(t0 + ms(10)));
        assert!(!c.on_change(t0 + ms(20)));
        assert!(!c.on_timeout(t0 + ms(100)), "early wake-ups do nothing");
        assert!(c.on_timeout(t0 + W));
        assert_eq!(c.deadline(), Some(t0 + W + W));
        assert!(!c.on_timeout(t0 + W + W));
        assert_eq!(c.deadline(), None);
    }

    #[test]
    fn continuous_flapping_is_emitted_once_per_window() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(W);
        let mut emitted = 0;
        let mut t = t0;
        // A change every 10 ms for 1.5 s.
        while t < t0 + ms(1500) {
            if c.deadline().is_some_and(|d| d <= t) && c.on_timeout(t) {
                emitted += 1;
            }
            if c.on_change(t) {
                emitted += 1;
            }
            t += ms(10);
        }
        assert!((9..=11).contains(&emitted), "{emitted}");
    }

    #[test]
    fn cancelled_changes_are_not_emitted() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(W);
        assert!(c.on_change(t0));
        assert!(!c.on_change(t0 + ms(5)));
        c.cancel_pending();
        assert!(!c.on_timeout(t0 + W));
        assert_eq!(c.deadline(), None);
    }
}
