//! GLTS, the global logical timestamp service: intervals [earliest, latest] of true time
//! (nanoseconds since the Unix epoch) with a bound that holds, and GLT timestamps inside them.
//!
//! Everything here is pure, with the local monotonic time passed in (`mono_ns`):
//! - [`marzullo`]: the fault-tolerant intersection of source intervals;
//! - [`estimator`]: samples (peer exchanges, local bounds) to an interval at any instant,
//!   widening by a drift bound between samples;
//! - [`hlc`]: the hybrid logical clock that stamps writes at the interval's latest bound; a
//!   write's commit wait ends once the earliest bound has passed its stamp
//!   ([`Interval::has_passed`]).
//!
//! A GLT is `physical_us << LOGICAL_BITS | logical`, as in the dataplane's store.

pub mod clockbound;
pub mod estimator;
pub mod hlc;
pub mod marzullo;

pub use estimator::{Estimator, EstimatorConfig, Exchange, GltsError, Source};
pub use hlc::Hlc;

/// Bits of a GLT below the physical microseconds.
pub use wire::glt::LOGICAL_BITS;

/// True time lies in `[earliest_ns, latest_ns]` (closed), in ns since the Unix epoch: the one
/// interval type of every clock (GLTS, the system clock, tests' manual clocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Interval {
    /// True time is at or after this.
    pub earliest_ns: u64,
    /// True time is at or before this.
    pub latest_ns: u64,
}

impl Interval {
    /// The interval `[earliest_us, latest_us]` of a clock that reads microseconds.
    pub fn from_us(earliest_us: u64, latest_us: u64) -> Self {
        Self { earliest_ns: earliest_us.saturating_mul(1000), latest_ns: latest_us.saturating_mul(1000) }
    }

    /// The zero-width interval of a clock trusted as exact, reading `now_us`.
    pub fn exact_us(now_us: u64) -> Self {
        Self::from_us(now_us, now_us)
    }

    /// The earliest bound in µs, rounded down: still a true lower bound, so a commit wait until
    /// it has passed a stamp's microsecond waits out the whole microsecond.
    pub fn earliest_us(&self) -> u64 {
        self.earliest_ns / 1000
    }

    /// The latest bound in µs, rounded down: a stamp taken there is inside the interval.
    pub fn latest_us(&self) -> u64 {
        self.latest_ns / 1000
    }

    /// Whether true time is certainly past the microsecond of `glt` (the commit wait is over).
    pub fn has_passed(&self, glt: u64) -> bool {
        self.earliest_us() > wire::glt::physical_us(glt)
    }

    /// `latest - earliest`.
    pub fn width_ns(&self) -> u64 {
        self.latest_ns.saturating_sub(self.earliest_ns)
    }

    /// Whether `true_ns` lies inside.
    pub fn contains(&self, true_ns: u64) -> bool {
        self.earliest_ns <= true_ns && true_ns <= self.latest_ns
    }

    /// The smallest GLT whose physical time is inside.
    pub fn earliest_glt(&self) -> u64 {
        self.earliest_ns.div_ceil(1000).saturating_mul(1 << LOGICAL_BITS)
    }

    /// The largest GLT whose physical time is inside.
    pub fn latest_glt(&self) -> u64 {
        (self.latest_ns / 1000).saturating_mul(1 << LOGICAL_BITS) | ((1 << LOGICAL_BITS) - 1)
    }
}

/// The physical time of `glt`, in ns: the start of its microsecond.
pub fn glt_physical_ns(glt: u64) -> u64 {
    wire::glt::physical_us(glt).saturating_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glt_bounds_of_an_interval() {
        let interval = Interval { earliest_ns: 1_000_500, latest_ns: 1_002_999 };
        assert_eq!(interval.earliest_glt(), 1001 << LOGICAL_BITS);
        assert_eq!(interval.latest_glt(), (1002 << LOGICAL_BITS) | 0xFFF);
        assert_eq!(glt_physical_ns(interval.earliest_glt()), 1_001_000);
        assert!(interval.contains(glt_physical_ns(interval.latest_glt())));
        assert_eq!(interval.width_ns(), 2499);
        assert_eq!((interval.earliest_us(), interval.latest_us()), (1000, 1002));
        assert!(interval.has_passed(999 << LOGICAL_BITS | 0xFFF));
        assert!(!interval.has_passed(1000 << LOGICAL_BITS));
        assert_eq!(Interval::exact_us(7), Interval { earliest_ns: 7000, latest_ns: 7000 });
    }
}
