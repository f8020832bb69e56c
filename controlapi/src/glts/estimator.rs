//! The GLTS estimator: a pure state machine that turns time samples into an interval
//! [earliest, latest] holding true time, at any later instant of the local monotonic clock.
//!
//! Inputs, each with the local monotonic time (`mono_ns`) it was taken at:
//! - [`Estimator::observe_peer`]: one NTP-style four-timestamp exchange with a peer. The
//!   request left at `sent_ns` (t1) and the reply came back at `received_ns` (t4), both local;
//!   the peer held the request `hold_ns` (t3 - t2, on its clock) and replied with its own
//!   interval. The peer read that interval between t1 and t4, at least `hold_ns` after the
//!   request reached it, so at t4 true time lies in
//!   `[earliest, latest + (t4 - t1)(1 + rho) - hold (1 - rho)]`.
//! - [`Estimator::observe_local`]: a local bound (ClockBound, or adjtimex when synchronised)
//!   read at one instant.
//!
//! Each source keeps its anchor: (local instant, interval at that instant). Projected to a
//! later instant `m`, the interval widens by the drift bound rho on both sides:
//! `[lo + (m - at)(1 - rho), hi + (m - at)(1 + rho)]`. A new sample replaces a source's anchor
//! only if it projects narrower. [`Estimator::now`] projects every fresh anchor and returns
//! their fault-tolerant Marzullo intersection (see [`super::marzullo`]), so up to
//! `liars_max` sources may report anything.

use std::collections::BTreeMap;

use thiserror::Error;

use super::{Interval, marzullo};

/// Configuration of an [`Estimator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EstimatorConfig {
    /// Bound on the drift of every clock involved (local monotonic clock and peers'), in
    /// parts per million. Default 200.
    pub drift_ppm: u64,
    /// Sources (peers and local) expected; agreement needs `sources - liars_max` of them.
    pub sources: usize,
    /// Sources that may lie (report an interval without true time). At most
    /// `(sources - 1) / 2`; default that.
    pub liars_max: usize,
    /// Anchors older than this are dropped (their interval has grown useless, or the source
    /// is gone).
    pub anchor_age_ns_max: u64,
}

impl EstimatorConfig {
    /// Defaults for `sources` sources: 200 ppm, a minority of liars tolerated, anchors kept
    /// for 10 s.
    pub fn for_sources(sources: usize) -> Self {
        EstimatorConfig {
            drift_ppm: DRIFT_PPM_DEFAULT,
            sources,
            liars_max: sources.saturating_sub(1) / 2,
            anchor_age_ns_max: ANCHOR_AGE_NS_MAX_DEFAULT,
        }
    }

    /// Checks the configuration; the error names the field.
    pub fn validate(&self) -> Result<(), GltsError> {
        if self.sources == 0 {
            return Err(GltsError::Config { field: "sources", reason: "must be at least 1".into() });
        }
        if self.liars_max > self.sources.saturating_sub(1) / 2 {
            return Err(GltsError::Config {
                field: "liars_max",
                reason: format!("{} liars among {} sources cannot be outvoted", self.liars_max, self.sources),
            });
        }
        if self.drift_ppm >= PPM {
            return Err(GltsError::Config { field: "drift_ppm", reason: "must be below 1000000".into() });
        }
        if self.anchor_age_ns_max == 0 {
            return Err(GltsError::Config { field: "anchor_age_ns_max", reason: "must be positive".into() });
        }
        Ok(())
    }
}

/// Default drift bound of the clocks, in ppm.
pub const DRIFT_PPM_DEFAULT: u64 = 200;
/// Default age after which an anchor is dropped.
pub const ANCHOR_AGE_NS_MAX_DEFAULT: u64 = 10_000_000_000;
const PPM: u64 = 1_000_000;

/// Which source a sample came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// A control-plane peer, by node id.
    Peer(u64),
    /// A local bound: ClockBound or the kernel's adjtimex.
    Local,
}

/// One four-timestamp exchange with a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// t1: the request left, local monotonic ns.
    pub sent_ns: u64,
    /// t4: the reply arrived, local monotonic ns.
    pub received_ns: u64,
    /// t3 - t2: how long the peer held the request, on its monotonic clock.
    pub hold_ns: u64,
    /// The peer's interval when it replied.
    pub peer: Interval,
}

/// What the estimator refuses.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GltsError {
    /// A sample that cannot be (a reply before its request, a hold longer than the round
    /// trip, an inverted interval, a sample from the future).
    #[error("invalid sample from {from:?}: {reason}")]
    InvalidSample {
        /// Where it came from.
        from: Source,
        /// What is wrong.
        reason: &'static str,
    },
    /// Fewer sources agree than the configuration needs.
    #[error("no agreement: {agreeing} of {fresh} fresh sources agree, {needed} needed")]
    NoAgreement {
        /// Sources with a fresh anchor.
        fresh: usize,
        /// Largest number found agreeing (0 when too few are fresh to try).
        agreeing: usize,
        /// How many must.
        needed: usize,
    },
    /// A bad configuration value.
    #[error("glts.{field}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// A source's best sample: true time was in `interval` at local instant `at_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Anchor {
    at_ns: u64,
    interval: Interval,
}

/// The estimator. See the module documentation.
#[derive(Debug, Clone)]
pub struct Estimator {
    config: EstimatorConfig,
    anchors: BTreeMap<Source, Anchor>,
}

impl Estimator {
    /// A new estimator with no samples.
    pub fn new(config: EstimatorConfig) -> Result<Self, GltsError> {
        config.validate()?;
        Ok(Estimator { config, anchors: BTreeMap::new() })
    }

    /// Its configuration.
    pub fn config(&self) -> &EstimatorConfig {
        &self.config
    }

    /// Takes one exchange with `peer`, completed at `exchange.received_ns`.
    pub fn observe_peer(&mut self, peer: u64, exchange: Exchange) -> Result<(), GltsError> {
        let source = Source::Peer(peer);
        let invalid = |reason| GltsError::InvalidSample { from: source, reason };
        if exchange.received_ns < exchange.sent_ns {
            return Err(invalid("reply received before the request was sent"));
        }
        if exchange.peer.earliest_ns > exchange.peer.latest_ns {
            return Err(invalid("peer interval is inverted"));
        }
        let round_trip_ns = exchange.received_ns - exchange.sent_ns;
        if exchange.hold_ns > round_trip_ns {
            return Err(invalid("peer held the request longer than the round trip"));
        }
        // Real time from the peer's reading to our receipt, at most.
        let since_reading_ns = self.grow_up(round_trip_ns).saturating_sub(self.grow_down(exchange.hold_ns));
        let interval = Interval {
            earliest_ns: exchange.peer.earliest_ns,
            latest_ns: exchange.peer.latest_ns.saturating_add(since_reading_ns),
        };
        self.offer(source, Anchor { at_ns: exchange.received_ns, interval });
        Ok(())
    }

    /// Takes a local bound read at local instant `mono_ns`.
    pub fn observe_local(&mut self, mono_ns: u64, interval: Interval) -> Result<(), GltsError> {
        if interval.earliest_ns > interval.latest_ns {
            return Err(GltsError::InvalidSample { from: Source::Local, reason: "interval is inverted" });
        }
        self.offer(Source::Local, Anchor { at_ns: mono_ns, interval });
        Ok(())
    }

    /// Forgets `source` (a removed peer).
    pub fn forget(&mut self, source: Source) {
        self.anchors.remove(&source);
    }

    /// The interval holding true time at local instant `mono_ns`.
    pub fn now(&self, mono_ns: u64) -> Result<Interval, GltsError> {
        let projected = self.fresh(mono_ns).map(|(_, interval)| interval).collect::<Vec<_>>();
        let needed = self.config.sources - self.config.liars_max;
        match marzullo::intersect(&projected, needed) {
            Some(interval) => Ok(interval),
            None => Err(GltsError::NoAgreement { fresh: projected.len(), agreeing: most_agreeing(&projected), needed }),
        }
    }

    /// Each fresh source's interval projected to `mono_ns`.
    pub fn fresh(&self, mono_ns: u64) -> impl Iterator<Item = (Source, Interval)> + '_ {
        self.anchors.iter().filter_map(move |(source, anchor)| {
            let age_ns = mono_ns.checked_sub(anchor.at_ns)?;
            (age_ns <= self.config.anchor_age_ns_max).then(|| (*source, self.project(anchor, mono_ns)))
        })
    }

    /// When (local monotonic ns) the earliest bound will have passed `true_ns`, judging from
    /// the interval at `mono_ns`: `commit_wait` sleeps until then. `None` when it already has.
    pub fn earliest_passes_at(&self, true_ns: u64, mono_ns: u64) -> Result<Option<u64>, GltsError> {
        let interval = self.now(mono_ns)?;
        if interval.earliest_ns > true_ns {
            return Ok(None);
        }
        // The lower bound grows at least (1 - rho) per local ns; +1 for strictly after.
        let gap_ns = true_ns - interval.earliest_ns + 1;
        let wait_ns = (u128::from(gap_ns) * u128::from(PPM)).div_ceil(u128::from(PPM - self.config.drift_ppm));
        Ok(Some(mono_ns.saturating_add(u64::try_from(wait_ns).unwrap_or(u64::MAX))))
    }

    /// When (local monotonic ns) the latest bound will have reached `true_ns`, judging from
    /// the interval at `mono_ns` (`mono_ns` itself when it already has). The latest bound
    /// grows at least one ns per local ns.
    pub fn latest_reaches_at(&self, true_ns: u64, mono_ns: u64) -> Result<u64, GltsError> {
        let interval = self.now(mono_ns)?;
        Ok(mono_ns.saturating_add(true_ns.saturating_sub(interval.latest_ns)))
    }

    fn offer(&mut self, source: Source, anchor: Anchor) {
        let keep_old = self.anchors.get(&source).is_some_and(|old| {
            old.at_ns <= anchor.at_ns
                && anchor.at_ns - old.at_ns <= self.config.anchor_age_ns_max
                && self.project(old, anchor.at_ns).width_ns() < anchor.interval.width_ns()
        });
        if !keep_old {
            self.anchors.insert(source, anchor);
        }
    }

    fn project(&self, anchor: &Anchor, mono_ns: u64) -> Interval {
        let elapsed_ns = mono_ns.saturating_sub(anchor.at_ns);
        Interval {
            earliest_ns: anchor.interval.earliest_ns.saturating_add(self.grow_down(elapsed_ns)),
            latest_ns: anchor.interval.latest_ns.saturating_add(self.grow_up(elapsed_ns)),
        }
    }

    /// Most real time `local_ns` of a local (or peer) clock can be: rounded up.
    fn grow_up(&self, local_ns: u64) -> u64 {
        let scaled = (u128::from(local_ns) * u128::from(PPM + self.config.drift_ppm)).div_ceil(u128::from(PPM));
        u64::try_from(scaled).unwrap_or(u64::MAX)
    }

    /// Least real time `local_ns` can be: rounded down.
    fn grow_down(&self, local_ns: u64) -> u64 {
        let scaled = u128::from(local_ns) * u128::from(PPM - self.config.drift_ppm) / u128::from(PPM);
        u64::try_from(scaled).unwrap_or(u64::MAX)
    }
}

/// The largest number of `intervals` sharing one point.
fn most_agreeing(intervals: &[Interval]) -> usize {
    (1..=intervals.len()).rev().find(|&count| marzullo::intersect(intervals, count).is_some()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(earliest_ns: u64, latest_ns: u64) -> Interval {
        Interval { earliest_ns, latest_ns }
    }

    #[test]
    fn one_exchange_bounds_true_time_by_the_round_trip() {
        let mut estimator =
            Estimator::new(EstimatorConfig { drift_ppm: 0, ..EstimatorConfig::for_sources(1) }).unwrap();
        // Request at local 1000, reply at 1100, peer held it 20 and said exactly 5000.
        estimator
            .observe_peer(7, Exchange { sent_ns: 1000, received_ns: 1100, hold_ns: 20, peer: iv(5000, 5000) })
            .unwrap();
        assert_eq!(estimator.now(1100).unwrap(), iv(5000, 5080));
        assert_eq!(estimator.now(1200).unwrap(), iv(5100, 5180));
    }

    #[test]
    fn width_grows_with_the_drift_bound_between_samples() {
        let mut estimator = Estimator::new(EstimatorConfig::for_sources(1)).unwrap();
        estimator.observe_local(0, iv(1_000_000, 1_000_000)).unwrap();
        // 1 s later at 200 ppm: 200 us each way.
        let later = estimator.now(1_000_000_000).unwrap();
        assert_eq!(later, iv(1_000_000 + 999_800_000, 1_000_000 + 1_000_200_000));
        assert_eq!(later.width_ns(), 400_000);
    }

    #[test]
    fn a_narrower_old_anchor_is_kept_until_a_new_one_beats_it() {
        let mut estimator =
            Estimator::new(EstimatorConfig { drift_ppm: 0, ..EstimatorConfig::for_sources(1) }).unwrap();
        estimator.observe_peer(1, Exchange { sent_ns: 0, received_ns: 10, hold_ns: 0, peer: iv(100, 100) }).unwrap();
        // A slow exchange (round trip 1000) is wider: ignored.
        estimator
            .observe_peer(1, Exchange { sent_ns: 20, received_ns: 1020, hold_ns: 0, peer: iv(1110, 1110) })
            .unwrap();
        assert_eq!(estimator.now(1020).unwrap(), iv(1110, 1120));
        // Once drift has widened the old one, a fresh sample of the same quality wins.
        let mut drifting = Estimator::new(EstimatorConfig::for_sources(1)).unwrap();
        drifting.observe_local(0, iv(0, 0)).unwrap();
        drifting.observe_local(1_000_000_000, iv(1_000_000_000, 1_000_000_000)).unwrap();
        assert_eq!(drifting.now(1_000_000_000).unwrap().width_ns(), 0);
    }

    #[test]
    fn invalid_samples_are_refused() {
        let mut estimator = Estimator::new(EstimatorConfig::for_sources(3)).unwrap();
        let bad = [
            Exchange { sent_ns: 10, received_ns: 5, hold_ns: 0, peer: iv(0, 0) },
            Exchange { sent_ns: 0, received_ns: 10, hold_ns: 11, peer: iv(0, 0) },
            Exchange { sent_ns: 0, received_ns: 10, hold_ns: 0, peer: iv(5, 4) },
        ];
        for exchange in bad {
            assert!(matches!(estimator.observe_peer(1, exchange), Err(GltsError::InvalidSample { .. })));
        }
        assert!(estimator.observe_local(0, iv(3, 2)).is_err());
        assert_eq!(estimator.now(0), Err(GltsError::NoAgreement { fresh: 0, agreeing: 0, needed: 2 }));
    }

    #[test]
    fn stale_anchors_stop_counting() {
        let config = EstimatorConfig { anchor_age_ns_max: 1000, ..EstimatorConfig::for_sources(1) };
        let mut estimator = Estimator::new(config).unwrap();
        estimator.observe_local(0, iv(50, 60)).unwrap();
        assert!(estimator.now(1000).is_ok());
        assert!(matches!(estimator.now(1001), Err(GltsError::NoAgreement { fresh: 0, .. })));
    }

    #[test]
    fn configuration_errors_name_the_field() {
        let config = EstimatorConfig { liars_max: 2, ..EstimatorConfig::for_sources(3) };
        let error = Estimator::new(config).unwrap_err();
        assert!(error.to_string().starts_with("glts.liars_max:"), "{error}");
        let config = EstimatorConfig { drift_ppm: PPM, ..EstimatorConfig::for_sources(3) };
        assert!(Estimator::new(config).unwrap_err().to_string().starts_with("glts.drift_ppm:"));
        assert!(Estimator::new(EstimatorConfig::for_sources(0)).is_err());
    }

    #[test]
    fn commit_wait_ends_once_earliest_passes() {
        let mut estimator =
            Estimator::new(EstimatorConfig { drift_ppm: 0, ..EstimatorConfig::for_sources(1) }).unwrap();
        estimator.observe_local(1000, iv(10_000, 10_400)).unwrap();
        assert_eq!(estimator.earliest_passes_at(9_999, 1000).unwrap(), None);
        // earliest must exceed 10_400: 401 ns later.
        assert_eq!(estimator.earliest_passes_at(10_400, 1000).unwrap(), Some(1401));
        assert!(estimator.now(1401).unwrap().earliest_ns > 10_400);
    }
}
