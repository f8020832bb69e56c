//! Time for the store: a physical clock behind a trait, and the hybrid logical clock (HLC)
//! that stamps every write.
//!
//! A timestamp (GLT) is a u64: the physical time in microseconds since the Unix epoch in the
//! high 52 bits (good until 2112) and a logical counter in the low [`LOGICAL_BITS`] bits. The
//! HLC never goes backwards: when the physical clock stalls or steps back, the logical part
//! counts on (and carries into the physical part after 4096 stamps in one microsecond).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Bits of a timestamp that hold the logical counter.
pub const LOGICAL_BITS: u32 = 12;

/// A source of physical time. The GLTS client of the control-plane issue implements it with
/// an interval clock; tests inject a manual one.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Microseconds since the Unix epoch.
    fn now_us(&self) -> u64;
}

/// The machine's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_micros()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_us: AtomicU64,
}

impl ManualClock {
    /// A clock reading `now_us`.
    pub fn new(now_us: u64) -> Self {
        Self { now_us: AtomicU64::new(now_us) }
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
    fn now_us(&self) -> u64 {
        self.now_us.load(Ordering::Relaxed)
    }
}

/// The timestamp whose physical part is `physical_us` and logical part 0.
pub fn timestamp_at(physical_us: u64) -> u64 {
    physical_us.saturating_mul(1 << LOGICAL_BITS)
}

/// The physical part of a timestamp, in microseconds since the Unix epoch.
pub fn physical_us(ts: u64) -> u64 {
    ts >> LOGICAL_BITS
}

/// A hybrid logical clock: strictly increasing stamps that track physical time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hlc {
    last: u64,
}

impl Hlc {
    /// A new stamp, greater than every stamp issued or observed before.
    pub fn tick(&mut self, now_us: u64) -> u64 {
        self.last = timestamp_at(now_us).max(self.last.saturating_add(1));
        self.last
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
