//! A deterministic simulation kit for the protocol cores: a seeded event queue in virtual time,
//! node clocks with skew and drift, and links that delay, drop, duplicate, reorder and
//! partition. Protocol worlds (`tests/repl_simulation.rs`) put the real sans-IO cores on top,
//! act as their shells, and check their invariants after every event.
#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The seeds a simulation test runs: `MERIDIAN_SIM_SEED` replays one; otherwise
/// `MERIDIAN_SIM_SEEDS` of them (default `default_count`) from a base drawn from the clock,
/// printed so a run can be repeated.
pub fn seeds(name: &str, default_count: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("MERIDIAN_SIM_SEED").ok().and_then(|value| value.parse().ok()) {
        eprintln!("{name}: replaying seed {seed}");
        return vec![seed];
    }
    let count = std::env::var("MERIDIAN_SIM_SEEDS").ok().and_then(|value| value.parse().ok()).unwrap_or(default_count);
    let base = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs())
        * 1_000_000;
    eprintln!("{name}: {count} seeds from {base} (MERIDIAN_SIM_SEED=<seed> replays one)");
    (base..base + count).collect()
}

/// Runs `simulate` for every seed of [`seeds`] (`name` and `default_count` as there), spread
/// over the cores, and panics with the first failure and how to replay it (`test`: the test
/// binary's name). `simulate` returns the events it took.
pub fn run_seeds<F: std::fmt::Display + Send>(
    name: &str,
    default_count: u64,
    test: &str,
    simulate: impl Fn(u64, bool) -> Result<u64, F> + Sync,
) {
    let seeds = seeds(name, default_count);
    let trace = seeds.len() == 1;
    let started = std::time::Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let simulate = &simulate;
    let outcomes: Vec<Result<u64, (u64, F)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = seeds
            .chunks(seeds.len().div_ceil(threads))
            .map(|chunk| {
                scope.spawn(move || {
                    let mut steps = 0;
                    for seed in chunk {
                        steps += simulate(*seed, trace).map_err(|failure| (*seed, failure))?;
                    }
                    Ok(steps)
                })
            })
            .collect();
        workers.into_iter().map(|worker| worker.join().unwrap()).collect()
    });
    let mut steps = 0;
    for outcome in outcomes {
        match outcome {
            Ok(taken) => steps += taken,
            Err((seed, failure)) => {
                panic!(
                    "seed {seed} failed: {failure}\nreplay: MERIDIAN_SIM_SEED={seed} cargo nextest run -p dataplane --test {test}"
                )
            }
        }
    }
    eprintln!("{name}: {} seeds, {steps} events, {:.1} s", seeds.len(), started.elapsed().as_secs_f64());
}

/// Events in virtual time (ns), in order of time, then of scheduling.
#[derive(Debug)]
pub struct Queue<E> {
    now_ns: u64,
    next: u64,
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    events: std::collections::HashMap<u64, E>,
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Self { now_ns: 0, next: 0, heap: BinaryHeap::new(), events: std::collections::HashMap::new() }
    }
}

impl<E> Queue<E> {
    /// Virtual time now.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// Schedules `event` `after_ns` from now.
    pub fn after(&mut self, after_ns: u64, event: E) {
        self.at(self.now_ns.saturating_add(after_ns), event);
    }

    /// Schedules `event` at `at_ns` (not before now).
    pub fn at(&mut self, at_ns: u64, event: E) {
        let id = self.next;
        self.next += 1;
        self.heap.push(Reverse((at_ns.max(self.now_ns), id)));
        self.events.insert(id, event);
    }

    /// When the next event is due.
    pub fn next_at_ns(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The next event, time moved to it.
    pub fn pop(&mut self) -> Option<E> {
        let Reverse((at, id)) = self.heap.pop()?;
        self.now_ns = at;
        self.events.remove(&id)
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
    }
}

/// A node's clocks: a monotonic one for the cores' `now` and a wall clock for stamps, both
/// drifting from virtual time by `drift_ppm`, the wall clock also off by `skew_ns`.
#[derive(Debug, Clone, Copy)]
pub struct NodeClock {
    pub drift_ppm: i64,
    pub skew_ns: i64,
}

impl NodeClock {
    /// A clock with a drift and skew drawn within the bounds.
    pub fn draw(rng: &mut StdRng, drift_ppm_max: i64, skew_ns_max: i64) -> Self {
        Self {
            drift_ppm: rng.random_range(-drift_ppm_max..=drift_ppm_max),
            skew_ns: rng.random_range(-skew_ns_max..=skew_ns_max),
        }
    }

    /// The monotonic reading at virtual time `now_ns`.
    pub fn monotonic_ns(&self, now_ns: u64) -> u64 {
        let drift = i128::from(now_ns) * i128::from(self.drift_ppm) / 1_000_000;
        u64::try_from(i128::from(now_ns) + drift).unwrap_or(0)
    }

    /// The wall clock in µs since the epoch at virtual time `now_ns` (virtual 0 is
    /// `EPOCH_US`).
    pub fn wall_us(&self, now_ns: u64) -> u64 {
        let ns = i128::from(self.monotonic_ns(now_ns)) + i128::from(self.skew_ns);
        EPOCH_US + u64::try_from(ns.max(0) / 1000).unwrap_or(0)
    }
}

/// The wall time virtual time starts at (2026-12-07, µs).
pub const EPOCH_US: u64 = 1_796_601_600_000_000;

/// How a link misbehaves.
#[derive(Debug, Clone, Copy)]
pub struct LinkFaults {
    /// One-way delay, ns.
    pub delay_ns: (u64, u64),
    /// Chance a frame's packet is lost and resent: it arrives a retransmission timeout later,
    /// still in order (what loss does to a QUIC stream).
    pub loss: f64,
    /// How long a retransmission takes, ns.
    pub retransmit_ns: u64,
    /// The transport misbehaving, for frames the cores can check (`checked`): chance a frame
    /// is lost, delivered twice, or overtakes the ones before it. QUIC streams never do this;
    /// the cores must notice and end the stream rather than lose or invent anything.
    pub drop: f64,
    pub duplicate: f64,
    pub reorder: f64,
}

impl LinkFaults {
    /// The same link with the transport behaving.
    pub fn reliable(self) -> Self {
        Self { drop: 0.0, duplicate: 0.0, reorder: 0.0, ..self }
    }
}

/// One direction of a stream: frames in order after a delay, but for the faults.
#[derive(Debug, Default, Clone)]
pub struct Lane {
    last_at_ns: u64,
}

impl Lane {
    /// When a frame sent now arrives (none: lost), given the faults; only `checked` frames
    /// meet the transport's misbehaviour.
    pub fn deliveries(&mut self, rng: &mut StdRng, now_ns: u64, faults: &LinkFaults, checked: bool) -> Vec<u64> {
        let faults = if checked { *faults } else { faults.reliable() };
        if rng.random_bool(faults.drop) {
            return Vec::new();
        }
        let mut at = now_ns + rng.random_range(faults.delay_ns.0..=faults.delay_ns.1);
        if rng.random_bool(faults.loss) {
            at += faults.retransmit_ns;
        }
        if rng.random_bool(faults.reorder) {
            // Arrives before what was sent earlier.
            at = now_ns + faults.delay_ns.0 / 2;
        } else {
            at = at.max(self.last_at_ns + 1);
            self.last_at_ns = at;
        }
        let mut out = vec![at];
        if rng.random_bool(faults.duplicate) {
            out.push(at + rng.random_range(0..=faults.delay_ns.1));
        }
        out
    }
}

/// A seeded generator.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}
