//! The one stamper: a hybrid logical clock whose stamps track the interval clock's latest
//! bound. Writes are stamped at `latest` and acknowledged once `earliest` has passed their
//! stamp's microsecond ([`Interval::has_passed`], the commit wait), so a write that starts
//! after another's acknowledgement gets a larger timestamp, whatever node stamps it.
//!
//! The HLC never goes backwards: when the physical clock stalls or steps back, the logical
//! part counts on (and carries into the physical part after 4096 stamps in one microsecond).

use wire::glt::{physical_us, timestamp_at, with_origin};

use super::Interval;

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
    pub fn wait_us(&self, interval: Interval) -> u64 {
        physical_us(self.stamp_from(self.last.saturating_add(1))).saturating_sub(interval.latest_us())
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
    use wire::glt::{LOGICAL_BITS, origin_of};

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
        let interval = Interval::from_us(900, 1_000);
        assert_eq!(hlc.wait_us(interval), 0);
        hlc.observe(timestamp_at(1_250) + 3);
        assert_eq!(hlc.wait_us(interval), 250);
        assert_eq!(hlc.wait_us(Interval::from_us(1_100, 1_250)), 0);
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
        assert_eq!(full.wait_us(Interval::exact_us(77)), 1);
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
