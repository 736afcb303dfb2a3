//! Noticing that the machine slept: `CLOCK_BOOTTIME` counts the time
//! suspended, `CLOCK_MONOTONIC` does not, so their difference grows by the
//! time slept. The tunnel watches it on its timer tick (a suspend nobody
//! announced: no logind, a paused VM) and vaned on its own, next to
//! logind's announcements. `Instant`, which boringtun's timers use, is
//! `CLOCK_MONOTONIC`: after a wake its sessions look as young as before
//! the sleep, while the peer (awake all along) may have dropped them.

use std::time::Duration;

/// A jump of `CLOCK_BOOTTIME` ahead of `CLOCK_MONOTONIC` at least this
/// long is a suspend worth acting on (the two advance together while the
/// machine runs, also while a process is stalled; a shorter suspend leaves
/// every session and timer valid).
pub const CLOCK_JUMP_MIN: Duration = Duration::from_secs(2);

/// Notices a suspend from the clocks: fed `CLOCK_BOOTTIME` and
/// `CLOCK_MONOTONIC` read together, it reports how long the machine slept
/// since the last reading. Pure: the readings are given.
#[derive(Debug, Default)]
pub struct ClockWatch {
    /// BOOTTIME - MONOTONIC at the last reading, in nanoseconds (signed:
    /// in a time namespace BOOTTIME can be behind MONOTONIC).
    offset: Option<i128>,
}

impl ClockWatch {
    pub fn observe(&mut self, boottime: Duration, monotonic: Duration) -> Option<Duration> {
        let offset = boottime.as_nanos() as i128 - monotonic.as_nanos() as i128;
        let previous = self.offset.replace(offset);
        let slept = u64::try_from(offset - previous?).ok()?;
        let slept = Duration::from_nanos(slept);
        (slept >= CLOCK_JUMP_MIN).then_some(slept)
    }
}

/// Reads the two clocks for [`ClockWatch::observe`].
pub fn read_clocks() -> Option<(Duration, Duration)> {
    use nix::time::{clock_gettime, ClockId};
    let read = |id| {
        clock_gettime(id)
            .ok()
            .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
    };
    Some((
        read(ClockId::CLOCK_BOOTTIME)?,
        read(ClockId::CLOCK_MONOTONIC)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn the_clocks_advancing_together_are_no_sleep() {
        let mut w = ClockWatch::default();
        assert_eq!(w.observe(s(100), s(90)), None, "the first reading");
        assert_eq!(w.observe(s(101), s(91)), None);
        assert_eq!(w.observe(s(500), s(490)), None);
    }

    #[test]
    fn boottime_jumping_ahead_is_the_time_slept() {
        let mut w = ClockWatch::default();
        w.observe(s(100), s(90));
        assert_eq!(w.observe(s(3700), s(91)), Some(s(3599)));
        // Counted once: the next reading compares with the new offset.
        assert_eq!(w.observe(s(3701), s(92)), None);
    }

    #[test]
    fn a_short_suspend_is_left_alone() {
        let mut w = ClockWatch::default();
        w.observe(s(100), s(90));
        let short = Duration::from_millis(1500);
        assert_eq!(w.observe(s(101) + short, s(91)), None);
        // Absorbed; a later sleep is measured from there.
        assert_eq!(w.observe(s(110) + short, s(92)), Some(s(8)));
    }

    #[test]
    fn clocks_going_backwards_do_not_panic() {
        let mut w = ClockWatch::default();
        w.observe(s(100), s(90));
        assert_eq!(w.observe(s(50), s(91)), None);
        assert_eq!(w.observe(s(0), s(200)), None);
        // Behind (a time namespace), then a sleep.
        assert_eq!(w.observe(s(10), s(201)), Some(s(9)));
    }

    #[test]
    fn the_clocks_can_be_read() {
        let (boot, mono) = read_clocks().unwrap();
        let mut w = ClockWatch::default();
        assert_eq!(w.observe(boot, mono), None);
        let (boot, mono) = read_clocks().unwrap();
        assert_eq!(w.observe(boot, mono), None, "no sleep within this test");
    }
}
