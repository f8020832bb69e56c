//! GLTS, the global logical timestamp service: intervals [earliest, latest] of true time
//! (nanoseconds since the Unix epoch) with a bound that holds, and GLT timestamps inside them.
//!
//! Everything here is pure, with the local monotonic time passed in (`mono_ns`):
//! - [`marzullo`]: the fault-tolerant intersection of source intervals;
//! - [`estimator`]: samples (peer exchanges, local bounds) to an interval at any instant,
//!   widening by a drift bound between samples;
//! - [`clock`]: the data node's interval clock: strictly increasing GLTs inside the interval,
//!   and how long `commit_wait` must wait.
//!
//! A GLT is `physical_us << LOGICAL_BITS | logical`, as in the dataplane's store.

pub mod clock;
pub mod clockbound;
pub mod estimator;
pub mod marzullo;

pub use clock::{IntervalClock, StampError};
pub use estimator::{Estimator, EstimatorConfig, Exchange, GltsError, Source};

/// Bits of a GLT below the physical microseconds.
pub use wire::glt::LOGICAL_BITS;

/// True time lies in `[earliest_ns, latest_ns]` (closed), in ns since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Interval {
    /// True time is at or after this.
    pub earliest_ns: u64,
    /// True time is at or before this.
    pub latest_ns: u64,
}

impl Interval {
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
    }
}
