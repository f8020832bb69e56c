//! One direction of an emulated WAN link, as a pure state machine: datagrams go in with the
//! time they arrived, come out at the time the link would deliver them. No I/O, no clock
//! reads: the caller passes `now_ns` (any monotonic origin) and sleeps until
//! [`Link::next_release_ns`].
//!
//! The model, in order, for each datagram offered at `now`:
//! 1. dropped if the link is partitioned, or with probability `loss`;
//! 2. serialised at `bandwidth_bps` behind the datagrams already on the wire (no limit when
//!    0): it departs at `max(now, previous departure) + bits / bandwidth`;
//! 3. dropped (tail drop) if the bytes queued for departure would exceed `queue_bytes_max`, as a
//!    router buffer overflows;
//! 4. delivered at `departure + delay + uniform(-jitter, +jitter)`, but never before the
//!    datagram sent ahead of it: jitter varies latency without reordering, as netem does
//!    with a rate limit.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thiserror::Error;

/// The link's behaviour; change it at any time with [`Link::set_config`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Each datagram's delay varies uniformly within +/- this (at most `delay`).
    pub jitter: Duration,
    /// Probability of losing each datagram, 0..=1.
    pub loss: f64,
    /// Bits per second; 0 for no limit.
    pub bandwidth_bps: u64,
    /// Bytes that may wait for departure before new ones are dropped.
    pub queue_bytes_max: usize,
    /// Drop everything.
    pub partitioned: bool,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            bandwidth_bps: 0,
            queue_bytes_max: 16 << 20,
            partitioned: false,
        }
    }
}

/// An invalid [`LinkConfig`], naming the field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid WAN link `{field}`: {reason}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

impl LinkConfig {
    /// A link with `delay` one way and nothing else.
    pub fn with_delay(delay: Duration) -> Self {
        Self { delay, ..Self::default() }
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError { field, reason });
        if self.jitter > self.delay {
            return invalid("jitter", format!("{:?} exceeds the delay {:?}", self.jitter, self.delay));
        }
        if !(0.0..=1.0).contains(&self.loss) {
            return invalid("loss", format!("{} is outside 0..=1", self.loss));
        }
        if self.queue_bytes_max == 0 {
            return invalid("queue_bytes_max", "must be at least 1".into());
        }
        Ok(())
    }
}

/// What became of a datagram offered to the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Delivered at this time.
    Queued {
        /// Delivery time, ns.
        release_ns: u64,
    },
    /// Dropped: the link is partitioned.
    Partitioned,
    /// Dropped: random loss.
    Lost,
    /// Dropped: the departure queue is full.
    Overflow,
}

/// Counters of one link direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagrams delivered.
    pub delivered: u64,
    /// Bytes delivered.
    pub delivered_bytes: u64,
    /// Dropped while partitioned.
    pub partitioned: u64,
    /// Dropped by random loss.
    pub lost: u64,
    /// Dropped by a full queue.
    pub overflow: u64,
}

/// One direction of a link, carrying items of type `T` (a datagram, or a datagram and where
/// it goes).
#[derive(Debug)]
pub struct Link<T = Bytes> {
    config: LinkConfig,
    random: StdRng,
    /// Items in flight, in delivery order: (release time, departure time, bytes, item).
    in_flight: VecDeque<(u64, u64, usize, T)>,
    /// When the last datagram finished departing.
    wire_free_ns: u64,
    stats: LinkStats,
}

impl<T> Link<T> {
    /// A link behaving as `config`, with loss and jitter drawn from `seed`.
    pub fn new(config: LinkConfig, seed: u64) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            random: StdRng::seed_from_u64(seed),
            in_flight: VecDeque::new(),
            wire_free_ns: 0,
            stats: LinkStats::default(),
        })
    }

    /// The current behaviour.
    pub fn config(&self) -> LinkConfig {
        self.config
    }

    /// Changes the behaviour for datagrams offered from now on (those in flight keep theirs;
    /// a partition also drops what is in flight, as a cut cable would).
    pub fn set_config(&mut self, config: LinkConfig) -> Result<(), ConfigError> {
        config.validate()?;
        if config.partitioned && !self.config.partitioned {
            self.stats.partitioned += self.in_flight.len() as u64;
            self.in_flight.clear();
        }
        self.config = config;
        Ok(())
    }

    /// Offers `item`, a datagram of `len` bytes, at `now_ns`.
    pub fn send(&mut self, now_ns: u64, len: usize, item: T) -> Fate {
        let config = self.config;
        if config.partitioned {
            self.stats.partitioned += 1;
            return Fate::Partitioned;
        }
        if config.loss > 0.0 && self.random.random_bool(config.loss) {
            self.stats.lost += 1;
            return Fate::Lost;
        }
        let start_ns = now_ns.max(self.wire_free_ns);
        // Departures are in order, so the datagrams still waiting to leave are a suffix.
        let queued_bytes: usize = self
            .in_flight
            .iter()
            .rev()
            .take_while(|(_, departs, _, _)| *departs > now_ns)
            .map(|(_, _, len, _)| len)
            .sum();
        if queued_bytes + len > config.queue_bytes_max && start_ns > now_ns {
            self.stats.overflow += 1;
            return Fate::Overflow;
        }
        let serialise_ns = match config.bandwidth_bps {
            0 => 0,
            bps => (len as u64 * 8).saturating_mul(1_000_000_000) / bps,
        };
        let departs_ns = start_ns + serialise_ns;
        self.wire_free_ns = departs_ns;
        let delay_ns = duration_ns(config.delay);
        let jitter_ns = duration_ns(config.jitter);
        let propagation_ns = if jitter_ns == 0 {
            delay_ns
        } else {
            self.random.random_range(delay_ns - jitter_ns..=delay_ns + jitter_ns)
        };
        let previous = self.in_flight.back().map_or(0, |(release, _, _, _)| *release);
        let release_ns = (departs_ns + propagation_ns).max(previous);
        self.in_flight.push_back((release_ns, departs_ns, len, item));
        Fate::Queued { release_ns }
    }

    /// The next item due at `now_ns`, if any.
    pub fn poll(&mut self, now_ns: u64) -> Option<T> {
        if self.in_flight.front().is_some_and(|(release, _, _, _)| *release <= now_ns) {
            let (_, _, len, item) = self.in_flight.pop_front()?;
            self.stats.delivered += 1;
            self.stats.delivered_bytes += len as u64;
            return Some(item);
        }
        None
    }

    /// When the next item is due.
    pub fn next_release_ns(&self) -> Option<u64> {
        self.in_flight.front().map(|(release, _, _, _)| *release)
    }

    /// Counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }
}

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn datagram(len: usize) -> Bytes {
        Bytes::from(vec![7; len])
    }

    fn offer(link: &mut Link, now_ns: u64, len: usize) -> Fate {
        link.send(now_ns, len, datagram(len))
    }

    #[test]
    fn delay_holds_each_datagram_back() {
        let mut link = Link::new(LinkConfig::with_delay(Duration::from_millis(20)), 1).unwrap();
        assert_eq!(offer(&mut link, 5 * MS, 100), Fate::Queued { release_ns: 25 * MS });
        assert_eq!(link.poll(24 * MS), None);
        assert_eq!(link.next_release_ns(), Some(25 * MS));
        assert_eq!(link.poll(25 * MS).map(|d| d.len()), Some(100));
        assert_eq!(link.poll(100 * MS), None);
        assert_eq!(link.stats().delivered, 1);
    }

    #[test]
    fn bandwidth_paces_departures() {
        // 8 Mbit/s: 1000 bytes take 1 ms on the wire.
        let config = LinkConfig { bandwidth_bps: 8_000_000, ..LinkConfig::with_delay(Duration::from_millis(10)) };
        let mut link = Link::new(config, 1).unwrap();
        let releases: Vec<Fate> = (0..3).map(|_| offer(&mut link, 0, 1000)).collect();
        assert_eq!(
            releases,
            [11, 12, 13].map(|ms| Fate::Queued { release_ns: ms * MS }),
            "each waits for the one ahead to leave"
        );
    }

    #[test]
    fn a_full_queue_drops_the_tail() {
        let config = LinkConfig { bandwidth_bps: 8_000_000, queue_bytes_max: 3500, ..LinkConfig::default() };
        let mut link = Link::new(config, 1).unwrap();
        let fates: Vec<Fate> = (0..4).map(|_| offer(&mut link, 0, 1000)).collect();
        assert!(matches!(fates[..3], [Fate::Queued { .. }, Fate::Queued { .. }, Fate::Queued { .. }]), "{fates:?}");
        assert_eq!(fates[3], Fate::Overflow);
        // Once the queue drained, datagrams are accepted again.
        assert!(matches!(offer(&mut link, 10 * MS, 1000), Fate::Queued { .. }));
    }

    #[test]
    fn loss_drops_about_its_share_and_is_reproducible_from_the_seed() {
        let config = LinkConfig { loss: 0.1, ..LinkConfig::default() };
        let run = |seed| {
            let mut link = Link::new(config, seed).unwrap();
            (0..10_000).map(|i| offer(&mut link, i, 10)).filter(|fate| *fate == Fate::Lost).count()
        };
        let lost = run(42);
        assert!((800..1200).contains(&lost), "{lost} of 10000 lost at 10%");
        assert_eq!(run(42), lost);
    }

    #[test]
    fn jitter_varies_delay_without_reordering() {
        let config =
            LinkConfig { jitter: Duration::from_millis(5), ..LinkConfig::with_delay(Duration::from_millis(20)) };
        let mut link = Link::new(config, 3).unwrap();
        let mut last = 0;
        let mut distinct = std::collections::BTreeSet::new();
        for i in 0..1000 {
            let now = i * MS / 10;
            let Fate::Queued { release_ns } = offer(&mut link, now, 10) else { panic!("dropped") };
            assert!(release_ns >= last, "reordered");
            assert!(release_ns >= now + 15 * MS && release_ns <= now.max(last) + 25 * MS);
            distinct.insert(release_ns - now);
            last = release_ns;
        }
        assert!(distinct.len() > 100, "no jitter");
    }

    #[test]
    fn a_partition_drops_everything_in_flight_and_offered_until_it_heals() {
        let mut link = Link::new(LinkConfig::with_delay(Duration::from_millis(20)), 1).unwrap();
        offer(&mut link, 0, 10);
        let cut = LinkConfig { partitioned: true, ..link.config() };
        link.set_config(cut).unwrap();
        assert_eq!(offer(&mut link, MS, 10), Fate::Partitioned);
        assert_eq!(link.poll(100 * MS), None);
        assert_eq!(link.stats().partitioned, 2);
        link.set_config(LinkConfig { partitioned: false, ..cut }).unwrap();
        assert_eq!(offer(&mut link, 100 * MS, 10), Fate::Queued { release_ns: 120 * MS });
    }

    #[test]
    fn bad_config_names_the_field() {
        let cases = [
            (LinkConfig { jitter: Duration::from_millis(2), ..LinkConfig::default() }, "jitter"),
            (LinkConfig { loss: 1.5, ..LinkConfig::default() }, "loss"),
            (LinkConfig { queue_bytes_max: 0, ..LinkConfig::default() }, "queue_bytes_max"),
        ];
        for (config, field) in cases {
            assert_eq!(Link::<Bytes>::new(config, 0).unwrap_err().field, field);
        }
    }
}
