//! The interval clock a data node stamps writes with: an [`Estimator`] plus a hybrid logical
//! clock. Every GLT it hands out lies inside the interval of the instant it was asked at (its
//! physical microseconds do), and GLTs strictly increase. `commit_wait(ts)` waits until the
//! interval's earliest bound has passed `ts`. Pure: the caller passes the local monotonic
//! time and sleeps.
//!
//! Stamps are taken at the interval's *latest* bound, as Spanner does: a write stamped at
//! `latest` and acknowledged after its commit wait has `ts < true time` at the ack, and any
//! write that starts after the ack, on any node with a correct interval, is stamped at its own
//! `latest >= true time > ts`. Stamping at `earliest` would not give that order.

use thiserror::Error;

use super::{Estimator, GltsError, Interval, LOGICAL_BITS, glt_physical_ns};

/// Why no GLT can be handed out now.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StampError {
    /// No interval (too few sources agree, or none yet).
    #[error(transparent)]
    NoInterval(#[from] GltsError),
    /// The next GLT would lie past the interval's latest bound (the clock observed a GLT from
    /// a node whose interval ran ahead, or the logical counter of this microsecond is
    /// exhausted). Retry at `retry_at_ns` (local monotonic).
    #[error("the next timestamp {next_glt} lies past the interval (latest {latest_glt}); retry at {retry_at_ns}")]
    AheadOfInterval {
        /// The GLT that would be next.
        next_glt: u64,
        /// The interval's latest GLT now.
        latest_glt: u64,
        /// When the interval will have moved far enough.
        retry_at_ns: u64,
    },
}

/// An estimator and the last GLT handed out or observed.
#[derive(Debug, Clone)]
pub struct IntervalClock {
    estimator: Estimator,
    last_glt: u64,
}

impl IntervalClock {
    /// A clock over `estimator`, above `last_glt` (the largest GLT already durable, after a
    /// restart).
    pub fn new(estimator: Estimator, last_glt: u64) -> Self {
        IntervalClock { estimator, last_glt }
    }

    /// The estimator, to feed samples.
    pub fn estimator_mut(&mut self) -> &mut Estimator {
        &mut self.estimator
    }

    /// The estimator.
    pub fn estimator(&self) -> &Estimator {
        &self.estimator
    }

    /// The interval at `mono_ns`.
    pub fn now(&self, mono_ns: u64) -> Result<Interval, GltsError> {
        self.estimator.now(mono_ns)
    }

    /// The next GLT at `mono_ns`: above every GLT handed out or observed, inside the interval.
    pub fn stamp(&mut self, mono_ns: u64) -> Result<u64, StampError> {
        let interval = self.estimator.now(mono_ns)?;
        let latest_glt = interval.latest_glt();
        let at_latest = (latest_glt >> LOGICAL_BITS << LOGICAL_BITS).max(interval.earliest_glt());
        let next_glt = self.last_glt.saturating_add(1).max(at_latest);
        if next_glt > latest_glt {
            let retry_at_ns = self.estimator.latest_reaches_at(glt_physical_ns(next_glt), mono_ns)?;
            return Err(StampError::AheadOfInterval { next_glt, latest_glt, retry_at_ns });
        }
        self.last_glt = next_glt;
        Ok(next_glt)
    }

    /// Takes a GLT seen from elsewhere (a replicated write), so later stamps exceed it.
    pub fn observe(&mut self, glt: u64) {
        self.last_glt = self.last_glt.max(glt);
    }

    /// The last GLT handed out or observed.
    pub fn last_glt(&self) -> u64 {
        self.last_glt
    }

    /// When `commit_wait(glt)` may return (local monotonic ns): once the earliest bound has
    /// passed the whole microsecond of `glt`. `None`: it already has.
    pub fn commit_wait_until(&self, glt: u64, mono_ns: u64) -> Result<Option<u64>, GltsError> {
        self.estimator.earliest_passes_at(glt_physical_ns(glt) + 999, mono_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::glts::EstimatorConfig;

    fn clock_at(earliest_ns: u64, latest_ns: u64) -> IntervalClock {
        let config = EstimatorConfig { drift_ppm: 0, ..EstimatorConfig::for_sources(1) };
        let mut estimator = Estimator::new(config).unwrap();
        estimator.observe_local(0, Interval { earliest_ns, latest_ns }).unwrap();
        IntervalClock::new(estimator, 0)
    }

    #[test]
    fn stamps_increase_inside_the_interval() {
        let mut clock = clock_at(5_000_000, 5_004_000);
        let first = clock.stamp(0).unwrap();
        assert_eq!(first, 5004 << LOGICAL_BITS, "stamped at the latest bound");
        let second = clock.stamp(0).unwrap();
        assert_eq!(second, first + 1);
        // Later, the interval has moved on: the physical part jumps.
        let third = clock.stamp(10_000).unwrap();
        assert_eq!(third, 5014 << LOGICAL_BITS);
    }

    #[test]
    fn an_observed_timestamp_past_the_interval_makes_stamping_wait() {
        let mut clock = clock_at(5_000_000, 5_004_000);
        clock.observe(6000 << LOGICAL_BITS);
        let Err(StampError::AheadOfInterval { retry_at_ns, .. }) = clock.stamp(0) else { panic!("stamped") };
        assert_eq!(retry_at_ns, 996_000);
        let stamped = clock.stamp(retry_at_ns).unwrap();
        assert_eq!(stamped, (6000 << LOGICAL_BITS) + 1);
        assert!(clock.now(retry_at_ns).unwrap().contains(glt_physical_ns(stamped)));
    }

    #[test]
    fn commit_wait_covers_the_whole_microsecond() {
        let clock = clock_at(5_000_000, 5_004_000);
        let glt = (5003 << LOGICAL_BITS) | 7;
        let until = clock.commit_wait_until(glt, 0).unwrap().unwrap();
        assert_eq!(until, 4000);
        assert!(clock.now(until).unwrap().earliest_ns >= 5_004_000);
        assert_eq!(clock.commit_wait_until(glt, until).unwrap(), None);
    }
}
