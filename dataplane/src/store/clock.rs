//! Time for the store: a physical clock behind a trait, giving the one interval type
//! ([`Interval`], `controlapi::glts`'s) holding true time: zero width for the plain system
//! clock, the GLTS interval when the node runs against a control plane. Writes are stamped by
//! the one stamper ([`Hlc`]) at `latest` and acknowledged once `earliest` has passed their
//! stamp (commit wait, [`Interval::has_passed`]), so a write that starts after another's
//! acknowledgement gets a larger timestamp, whatever node stamps it.
//!
//! A timestamp (GLT) is a u64: the physical time in microseconds since the Unix epoch in the
//! high 52 bits (good until 2112) and a logical counter in the low [`LOGICAL_BITS`] bits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use controlapi::glts::{Hlc, Interval};
/// Bits of a timestamp that hold the logical counter.
pub use wire::glt::{LOGICAL_BITS, origin_of, physical_us, timestamp_at, with_origin};

/// The clock has no interval (its sources disagree or are unreachable): nothing can be
/// stamped until it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no time interval: {0}")]
pub struct ClockUnavailable(pub String);

/// A source of physical time. The data node's GLTS client implements it with the control
/// plane's interval; tests inject a manual one.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The interval holding true time now.
    fn interval(&self) -> Result<Interval, ClockUnavailable>;
}

/// The machine's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn interval(&self) -> Result<Interval, ClockUnavailable> {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_micros()).unwrap_or(u64::MAX));
        Ok(Interval::exact_us(now_us))
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
    fn interval(&self) -> Result<Interval, ClockUnavailable> {
        let earliest_us = self.now_us.fetch_add(self.step_us, Ordering::Relaxed);
        Ok(Interval::from_us(earliest_us, earliest_us.saturating_add(self.width_us.load(Ordering::Relaxed))))
    }
}
