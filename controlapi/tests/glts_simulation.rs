//! GLTS under simulated clocks: a data node whose monotonic clock drifts (up to 500 ppm) and
//! whose wall clock is skewed (up to 100 ms, so it is useless as a source) syncs with five
//! control-plane peers over a network with random, asymmetric delays; one peer lies. At many
//! random instants, true time must lie inside the interval, GLTs must strictly increase and
//! lie inside it, and a commit wait must end only after true time passed the GLT.
//!
//! Seeds: `MERIDIAN_GLTS_SEEDS` (default 40) scenarios from `MERIDIAN_GLTS_SEED` (default
//! fixed). A failure prints the seed to replay.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    clippy::cast_possible_wrap,
    reason = "simulated clock rates are floats applied to small positive spans"
)]

use controlapi::glts::{Estimator, EstimatorConfig, Exchange, Hlc, Interval, glt_physical_ns};

/// splitmix64: small, seedable, good enough for a simulation.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[low, high]`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }

    /// A rate of real time per local time in `[1 - ppm, 1 + ppm]`, as a float.
    fn rate(&mut self, ppm: u64) -> f64 {
        let offset = self.between(0, 2 * ppm) as f64 - ppm as f64;
        1.0 + offset / 1e6
    }
}

const DRIFT_PPM: u64 = 500;
const SKEW_NS_MAX: u64 = 100_000_000;

/// A peer's honest view: an interval around true time, of its own width.
#[derive(Clone, Copy)]
struct Peer {
    below_ns: u64,
    above_ns: u64,
    /// Real ns per ns of the peer's monotonic clock.
    rate: f64,
    liar: bool,
}

/// The data node's monotonic clock: `mono = (true - start) / rate + mono_start`.
struct LocalClock {
    start_true_ns: u64,
    mono_start_ns: u64,
    rate: f64,
}

impl LocalClock {
    fn mono(&self, true_ns: u64) -> u64 {
        self.mono_start_ns + ((true_ns - self.start_true_ns) as f64 / self.rate) as u64
    }
}

struct Outcome {
    checks: u64,
    widths_ns: Vec<u64>,
}

fn scenario(seed: u64) -> Outcome {
    let mut random = Random(seed);
    let start_true_ns = 1_790_000_000_000_000_000 + random.between(0, 1 << 40);
    let local = LocalClock { start_true_ns, mono_start_ns: random.between(0, 1 << 50), rate: random.rate(DRIFT_PPM) };
    // The node's wall clock is off by up to 100 ms: it is never used as a source.
    let skew_ns = random.between(0, 2 * SKEW_NS_MAX) as i64 - SKEW_NS_MAX as i64;
    assert!(skew_ns.unsigned_abs() <= SKEW_NS_MAX);
    let liar = random.between(0, 4) as usize;
    let peers: Vec<Peer> = (0..5)
        .map(|index| Peer {
            below_ns: random.between(5_000, 500_000),
            above_ns: random.between(5_000, 500_000),
            rate: random.rate(DRIFT_PPM),
            liar: index == liar,
        })
        .collect();
    let config = EstimatorConfig { drift_ppm: DRIFT_PPM, ..EstimatorConfig::for_sources(peers.len()) };
    let mut estimator = Estimator::new(config).expect("config");
    let mut hlc = Hlc::default();
    let mut now_true_ns = start_true_ns;
    let mut last_glt = 0;
    let mut outcome = Outcome { checks: 0, widths_ns: Vec::new() };
    for _round in 0..60 {
        // One sync round: an exchange with every peer, one after another.
        for (index, peer) in peers.iter().enumerate() {
            let sent_true_ns = now_true_ns;
            let there_ns = random.between(10_000, 3_000_000);
            let hold_real_ns = random.between(0, 200_000);
            let back_ns = random.between(10_000, 3_000_000);
            let reply_true_ns = sent_true_ns + there_ns + hold_real_ns;
            let peer_interval = if peer.liar {
                // Anything: far off, or overlapping the truth partly, or absurdly wide.
                match random.between(0, 2) {
                    0 => Interval { earliest_ns: reply_true_ns + 50_000_000, latest_ns: reply_true_ns + 50_100_000 },
                    1 => Interval {
                        earliest_ns: reply_true_ns + random.between(1, 400_000),
                        latest_ns: reply_true_ns + 2_000_000,
                    },
                    _ => Interval { earliest_ns: reply_true_ns - 1_000_000_000, latest_ns: reply_true_ns - 1 },
                }
            } else {
                Interval { earliest_ns: reply_true_ns - peer.below_ns, latest_ns: reply_true_ns + peer.above_ns }
            };
            now_true_ns = reply_true_ns + back_ns;
            let exchange = Exchange {
                sent_ns: local.mono(sent_true_ns),
                received_ns: local.mono(now_true_ns),
                hold_ns: (hold_real_ns as f64 / peer.rate) as u64,
                peer: peer_interval,
            };
            estimator.observe_peer(index as u64, exchange).expect("valid exchange");
        }
        // Until the next round (10 ms to 2 s later), check at random instants.
        let next_round_true_ns = now_true_ns + random.between(10_000_000, 2_000_000_000);
        while now_true_ns < next_round_true_ns {
            now_true_ns += random.between(1_000, 300_000_000);
            let mono_ns = local.mono(now_true_ns);
            let interval = estimator.now(mono_ns).unwrap_or_else(|error| panic!("seed {seed}: {error}"));
            assert!(interval.contains(now_true_ns), "seed {seed}: true {now_true_ns} outside {interval:?}");
            outcome.widths_ns.push(interval.width_ns());
            outcome.checks += 1;
            // The store's stamp: at the interval's latest bound, once the next one fits.
            if hlc.wait_us(interval) > 0 {
                continue;
            }
            let glt = hlc.tick(interval.latest_us());
            assert!(glt > last_glt, "seed {seed}: GLT {glt} after {last_glt}");
            last_glt = glt;
            assert!(interval.contains(glt_physical_ns(glt)), "seed {seed}: GLT {glt} outside {interval:?}");
            // Commit wait: once it ends, true time is past the GLT's microsecond.
            if random.between(0, 3) == 0 {
                let passed_ns = glt_physical_ns(glt) + 999;
                if let Some(until_mono_ns) = estimator.earliest_passes_at(passed_ns, mono_ns).expect("interval") {
                    // Advance true time until the local clock reaches `until_mono_ns`.
                    let waited_true_ns = ((until_mono_ns - mono_ns) as f64 * local.rate).ceil() as u64;
                    now_true_ns += waited_true_ns + 1;
                    assert!(local.mono(now_true_ns) >= until_mono_ns);
                }
                assert!(now_true_ns > glt_physical_ns(glt) + 999, "seed {seed}: commit wait ended early");
                let after = estimator.now(local.mono(now_true_ns)).expect("interval");
                assert!(after.has_passed(glt), "seed {seed}: the store's commit wait would not have ended");
            }
        }
    }
    outcome
}

#[test]
fn true_time_is_inside_every_interval_with_drift_skew_and_a_liar() {
    let seeds: u64 = std::env::var("MERIDIAN_GLTS_SEEDS").ok().and_then(|text| text.parse().ok()).unwrap_or(40);
    let first: u64 = std::env::var("MERIDIAN_GLTS_SEED").ok().and_then(|text| text.parse().ok()).unwrap_or(0x5EED_6175);
    let mut widths = Vec::new();
    let mut checks = 0;
    for seed in first..first + seeds {
        let outcome = scenario(seed);
        checks += outcome.checks;
        widths.extend(outcome.widths_ns);
    }
    widths.sort_unstable();
    let percentile = |p: f64| widths[((widths.len() - 1) as f64 * p) as usize];
    println!(
        "glts simulation: {seeds} scenarios, {checks} checks; width p50 {} us, p99 {} us, max {} us",
        percentile(0.5) / 1000,
        percentile(0.99) / 1000,
        widths.last().copied().unwrap_or(0) / 1000
    );
    assert!(checks > seeds * 100);
}
