//! Time for the store: a physical clock behind a trait, and the hybrid logical clock (HLC)
//! that stamps every write.
//!
//! The clock gives an interval [earliest, latest] holding true time (zero width for the plain
//! system clock; the GLTS interval when the node runs against a control plane). Writes are
//! stamped at `latest` and acknowledged once `earliest` has passed their stamp (commit wait),
//! so a write that starts after another's acknowledgement gets a larger timestamp, whatever
//! node stamps it.
//!
//! A timestamp (GLT) is a u64: the physical time in microseconds since the Unix epoch in the
//! high 52 bits (good until 2112) and a logical counter in the low [`LOGICAL_BITS`] bits. The
//! HLC never goes backwards: when the physical clock stalls or steps back, the logical part
//! counts on (and carries into the physical part after 4096 stamps in one microsecond).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Bits of a timestamp that hold the logical counter.
pub use wire::glt::{LOGICAL_BITS, origin_of, physical_us, timestamp_at, with_origin};

/// Physical time bounds, in microseconds since the Unix epoch: true time lies inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeInterval {
    /// True time is not before this.
    pub earliest_us: u64,
    /// True time is not after this.
    pub latest_us: u64,
}

impl TimeInterval {
    /// The zero-width interval of a clock trusted as exact.
    pub fn exact(now_us: u64) -> Self {
        Self { earliest_us: now_us, latest_us: now_us }
    }
}

/// The clock has no interval (its sources disagree or are unreachable): nothing can be
/// stamped until it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no time interval: {0}")]
pub struct ClockUnavailable(pub String);

/// A source of physical time. The data node's GLTS client implements it with the control
/// plane's interval; tests inject a manual one.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The interval holding true time now.
    fn interval(&self) -> Result<TimeInterval, ClockUnavailable>;
}

/// The machine's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn interval(&self) -> Result<TimeInterval, ClockUnavailable> {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_micros()).unwrap_or(u64::MAX));
        Ok(TimeInterval::exact(now_us))
    }
}

/// A clock for tests: the interval [now, now + width], where `now` moves when told to and, unless
/// frozen, by 1 µs at each reading (as a real clock read twice has moved on, so a commit wait
/// ends without the test advancing it).
#[derive(Debug, Default)]
pub struct ManualClock {
    now_us: AtomicU64,
    width_us: AtomicU64,
    step_us: u64,
}

impl ManualClock {
    /// A clock reading `now_us`, zero width, moving 1 µs per reading.
    pub fn new(now_us: u64) -> Self {
        Self { now_us: AtomicU64::new(now_us), width_us: AtomicU64::new(0), step_us: 1 }
    }

    /// A clock reading `now_us` that moves only when told to: a write's commit wait then
    /// lasts until the test advances it.
    pub fn frozen(now_us: u64) -> Self {
        Self { step_us: 0, ..Self::new(now_us) }
    }

    /// Sets the interval's width.
    pub fn set_width(&self, width_us: u64) {
        self.width_us.store(width_us, Ordering::Relaxed);
    }

    /// Moves the clock to `now_us` (backwards too: the HLC must cope).
    pub fn set(&self, now_us: u64) {
        self.now_us.store(now_us, Ordering::Relaxed);
    }

    /// Moves the clock forward by `delta_us`.
    pub fn advance(&self, delta_us: u64) {
        self.now_us.fetch_add(delta_us, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn interval(&self) -> Result<TimeInterval, ClockUnavailable> {
        let earliest_us = self.now_us.fetch_add(self.step_us, Ordering::Relaxed);
        Ok(TimeInterval { earliest_us, latest_us: earliest_us.saturating_add(self.width_us.load(Ordering::Relaxed)) })
    }
}

/// A hybrid logical clock: strictly increasing stamps that track physical time. With an
/// origin (a multi-master cluster, see [`wire::glt`]) every stamp carries it in its lowest
/// bits, so no other region ever issues the same stamp.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hlc {
    last: u64,
    origin: Option<u8>,
}

impl Hlc {
    /// A clock whose stamps carry `origin` (`None`: plain stamps).
    pub fn with_origin(origin: Option<u8>) -> Self {
        Self { last: 0, origin }
    }

    /// The first stamp this clock may issue at or above `ts`.
    fn stamp_from(&self, ts: u64) -> u64 {
        self.origin.map_or(ts, |origin| with_origin(ts, origin))
    }

    /// A new stamp, greater than every stamp issued or observed before.
    pub fn tick(&mut self, now_us: u64) -> u64 {
        self.last = self.stamp_from(timestamp_at(now_us).max(self.last.saturating_add(1)));
        self.last
    }

    /// How long until the next stamp fits inside `interval` (its physical part at most
    /// `latest`): 0 when it fits now. Nonzero only after observing a timestamp from a clock that
    /// ran ahead, or after 4096 stamps (256 with an origin) in one microsecond.
    pub fn wait_us(&self, interval: TimeInterval) -> u64 {
        physical_us(self.stamp_from(self.last.saturating_add(1))).saturating_sub(interval.latest_us)
    }

    /// Takes note of a timestamp seen elsewhere (recovery, a peer) so later stamps exceed it.
    pub fn observe(&mut self, ts: u64) {
        self.last = self.last.max(ts);
    }

    /// The last stamp issued or observed.
    pub fn last(&self) -> u64 {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_strictly_increase_when_the_clock_stalls_or_steps_back() {
        let mut hlc = Hlc::default();
        let a = hlc.tick(1_000);
        let b = hlc.tick(1_000);
        let c = hlc.tick(900);
        let d = hlc.tick(2_000);
        assert!(a < b && b < c && c < d);
        assert_eq!(physical_us(a), 1_000);
        assert_eq!(physical_us(c), 1_000);
        assert_eq!(d, timestamp_at(2_000));
    }

    #[test]
    fn observed_timestamps_are_exceeded() {
        let mut hlc = Hlc::default();
        hlc.observe(timestamp_at(5_000) + 7);
        assert_eq!(hlc.tick(10), timestamp_at(5_000) + 8);
    }

    #[test]
    fn a_stamp_ahead_of_the_interval_waits() {
        let mut hlc = Hlc::default();
        let interval = TimeInterval { earliest_us: 900, latest_us: 1_000 };
        assert_eq!(hlc.wait_us(interval), 0);
        hlc.observe(timestamp_at(1_250) + 3);
        assert_eq!(hlc.wait_us(interval), 250);
        assert_eq!(hlc.wait_us(TimeInterval { earliest_us: 1_100, latest_us: 1_250 }), 0);
    }

    #[test]
    fn stamps_with_an_origin_carry_it_and_exceed_what_other_regions_stamped() {
        let mut hlc = Hlc::with_origin(Some(2));
        let a = hlc.tick(1_000);
        assert_eq!(a, timestamp_at(1_000) + 2);
        let b = hlc.tick(1_000);
        assert_eq!(b, a + 16);
        hlc.observe(timestamp_at(5_000) + 7); // stamped by origin 7
        let c = hlc.tick(10);
        assert_eq!(c, timestamp_at(5_000) + 18);
        assert!([a, b, c].iter().all(|ts| origin_of(*ts) == 2));
        // The wait accounts for the step to the origin.
        let mut full = Hlc::with_origin(Some(15));
        full.observe(timestamp_at(77) + (1 << LOGICAL_BITS) - 1);
        assert_eq!(full.wait_us(TimeInterval::exact(77)), 1);
        assert_eq!(physical_us(full.tick(77)), 78);
    }

    #[test]
    fn logical_overflow_carries_into_physical() {
        let mut hlc = Hlc::default();
        let mut last = 0;
        for _ in 0..(1 << LOGICAL_BITS) + 10 {
            let ts = hlc.tick(77);
            assert!(ts > last);
            last = ts;
        }
        assert_eq!(physical_us(last), 78);
    }
}
