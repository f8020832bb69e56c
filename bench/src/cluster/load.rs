//! The open-loop workload of `bench cluster`: write `n` is due at `start + n / rate`, whatever
//! happened to the writes before it, and its latency counts from that intended time, so a stall
//! shows up in every write it delays (no coordinated omission). Each write's class and size
//! come from a seeded draw; large files go in parts of at most `part_bytes`, one after the
//! other, and count as one write that ends when the last part is durable.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use client::Client;
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;

use super::lock;
use super::scenario::{Class, Draw, Mix};

/// Writes in flight at most; past that the generator waits, and the wait counts against the
/// writes it delays.
const IN_FLIGHT_MAX: usize = 4096;
/// Values above this size are generated off the runtime's thread.
const GENERATE_INLINE_MAX: usize = 64 << 10;

/// What the workload does.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub rate: u64,
    pub warmup: Duration,
    pub duration: Duration,
    pub mix: Mix,
    pub file_min: u64,
    pub file_max: u64,
    pub part_bytes: u64,
    pub seed: u64,
}

/// One write: which key(s) and how many bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    pub class: Class,
    pub n: u64,
    pub bytes: u64,
}

impl Write {
    /// The parts of this write: (key, payload seed, length).
    pub fn parts(&self, part_bytes: u64) -> Vec<(Vec<u8>, u64, usize)> {
        let prefix = String::from_utf8_lossy(self.class.prefix()).into_owned();
        match self.class {
            Class::Small | Class::Files => {
                vec![(format!("{prefix}{:010}", self.n).into_bytes(), self.n, as_len(self.bytes))]
            }
            Class::Large => {
                let count = self.bytes.div_ceil(part_bytes).max(1);
                (0..count)
                    .map(|part| {
                        let len = part_bytes.min(self.bytes - part * part_bytes);
                        (format!("{prefix}{:010}/{part:05}", self.n).into_bytes(), self.n ^ (part << 40), as_len(len))
                    })
                    .collect()
            }
        }
    }

    /// The write a key belongs to (class and number), from its name.
    pub fn number_of(class: Class, key: &[u8]) -> Option<u64> {
        let rest = key.strip_prefix(class.prefix())?;
        std::str::from_utf8(rest.get(..10)?).ok()?.parse().ok()
    }
}

fn as_len(bytes: u64) -> usize {
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// `len` bytes of text-like content for payload seed `seed`: words and numbers (so the codecs
/// see application-like data), each 4 KiB block stamped with the seed and its offset (so no
/// two blocks of the run are identical and chunk dedup cannot hide writes).
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 16] = [
        b"alpha",
        b"bravo",
        b"charlie",
        b"delta",
        b"echo",
        b"foxtrot",
        b"golf",
        b"hotel",
        b"india",
        b"juliet",
        b"kilo",
        b"lima",
        b"mike",
        b"november",
        b"oscar",
        b"papa",
    ];
    let mut out = Vec::with_capacity(len + 32);
    let mut draw = Draw::new(seed);
    while out.len() < len {
        if out.len() % 4096 < 16 {
            out.extend_from_slice(format!("<{seed:x}:{}>", out.len()).as_bytes());
        }
        let bits = draw.next_u64();
        out.extend_from_slice(WORDS[usize::try_from(bits >> 60).unwrap_or(0)]);
        out.extend_from_slice(format!("={} ", (bits >> 20) % 1000).as_bytes());
    }
    out.truncate(len);
    out
}

/// What the writes did, shared by the writers, the progress line and the report.
#[derive(Debug)]
pub struct Record {
    started: Instant,
    warmup: Duration,
    /// Latency of measured writes (ns from the intended send time), all classes and per class.
    pub latency: Histogram<u64>,
    pub by_class: BTreeMap<Class, ClassRecord>,
    /// Per second of the load: latency of the writes due in that second, and failures.
    pub seconds: Vec<Second>,
    /// Every acknowledged write, for the loss check.
    pub acked: Vec<Write>,
    pub failed: u64,
    /// The highest acknowledged timestamp.
    pub last_ts: u64,
    pub first_error: Option<String>,
}

/// One class's figures.
#[derive(Debug)]
pub struct ClassRecord {
    pub latency: Histogram<u64>,
    pub acked: u64,
    pub failed: u64,
    pub bytes: u64,
}

/// One second of the load.
#[derive(Debug)]
pub struct Second {
    pub latency: Histogram<u64>,
    pub failed: u64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 10 min in ns, 3 significant digits: cannot fail for these bounds.
    Histogram::new_with_bounds(1_000, 600_000_000_000, 3).expect("constant, valid bounds")
}

impl Record {
    pub fn new(started: Instant, warmup: Duration) -> Self {
        Self {
            started,
            warmup,
            latency: histogram(),
            by_class: BTreeMap::new(),
            seconds: Vec::new(),
            acked: Vec::new(),
            failed: 0,
            last_ts: 0,
            first_error: None,
        }
    }

    fn second(&mut self, intended: Instant) -> &mut Second {
        let index = as_len(intended.duration_since(self.started).as_secs());
        while self.seconds.len() <= index {
            self.seconds.push(Second { latency: histogram(), failed: 0 });
        }
        &mut self.seconds[index]
    }

    fn class(&mut self, class: Class) -> &mut ClassRecord {
        self.by_class.entry(class).or_insert_with(|| ClassRecord {
            latency: histogram(),
            acked: 0,
            failed: 0,
            bytes: 0,
        })
    }

    fn done(&mut self, write: Write, intended: Instant, outcome: Result<u64, String>) {
        let measured = intended.duration_since(self.started) >= self.warmup;
        match outcome {
            Ok(ts) => {
                let took = u64::try_from(intended.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1_000);
                self.last_ts = self.last_ts.max(ts);
                self.acked.push(write);
                let _ = self.second(intended).latency.record(took);
                let class = self.class(write.class);
                class.acked += 1;
                class.bytes += write.bytes;
                if measured {
                    let _ = class.latency.record(took);
                    let _ = self.latency.record(took);
                }
            }
            Err(error) => {
                self.failed += 1;
                self.second(intended).failed += 1;
                self.class(write.class).failed += 1;
                self.first_error.get_or_insert(error);
            }
        }
    }

    /// Writes acknowledged (all classes) and the p99 (ms) of the last full second, for the
    /// progress line.
    pub fn last_second(&self) -> Option<(u64, f64)> {
        let index = as_len(self.started.elapsed().as_secs()).checked_sub(1)?;
        let second = self.seconds.get(index)?;
        Some((second.latency.len(), second.latency.value_at_quantile(0.99) as f64 / 1e6))
    }
}

/// Shared handle on the record.
pub type SharedRecord = Arc<Mutex<Record>>;

/// Runs the open-loop load against `client` until the plan's time is up or `stop` is set;
/// returns when every write has finished.
pub async fn run(client: &Client, plan: &LoadPlan, record: SharedRecord, stop: Arc<AtomicBool>) -> Result<()> {
    let started = lock(&record).started;
    let total = plan.warmup + plan.duration;
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    let mut draw = Draw::new(plan.seed);
    let mut tasks = tokio::task::JoinSet::new();
    let mut n = 0u64;
    loop {
        let intended = started + Duration::from_nanos(n.saturating_mul(1_000_000_000) / plan.rate.max(1));
        if intended.duration_since(started) >= total || stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        if intended > now {
            tokio::time::sleep(intended - now).await;
        }
        let class = plan.mix.pick(draw.unit());
        let bytes = match class {
            Class::Small => draw.log_uniform(128, 4096),
            Class::Files => draw.log_uniform(4096, 1 << 20),
            Class::Large => draw.log_uniform(plan.file_min, plan.file_max),
        };
        let write = Write { class, n, bytes };
        let permit = in_flight.clone().acquire_owned().await?;
        let (client, record, part_bytes) = (client.clone(), record.clone(), plan.part_bytes);
        tasks.spawn(async move {
            let outcome = put(&client, write, part_bytes).await;
            drop(permit);
            lock(&record).done(write, intended, outcome);
        });
        n += 1;
        // Finished writes are reaped as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Writes every part of `write`; the timestamp of the last.
async fn put(client: &Client, write: Write, part_bytes: u64) -> Result<u64, String> {
    let mut ts = 0;
    for (key, seed, len) in write.parts(part_bytes) {
        let value = if len > GENERATE_INLINE_MAX {
            tokio::task::spawn_blocking(move || payload(seed, len)).await.map_err(|error| error.to_string())?
        } else {
            payload(seed, len)
        };
        ts = client.put(&key, &value).await.map_err(|error| error.to_string())?;
    }
    Ok(ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_deterministic_sized_and_differ_per_block() {
        assert_eq!(payload(5, 10_000), payload(5, 10_000));
        assert_ne!(payload(5, 100), payload(6, 100));
        for len in [0, 1, 127, 4096, 4097, 100_000] {
            assert_eq!(payload(9, len).len(), len);
        }
        let big = payload(3, 16 << 10);
        let blocks: Vec<&[u8]> = big.chunks(4096).collect();
        assert!(blocks.windows(2).all(|pair| pair[0] != pair[1]));
    }

    #[test]
    fn large_writes_split_into_parts_whose_keys_name_the_write() {
        let write = Write { class: Class::Large, n: 42, bytes: 10 << 20 };
        let parts = write.parts(4 << 20);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.iter().map(|(_, _, len)| *len as u64).sum::<u64>(), 10 << 20);
        assert_eq!(parts[2].2, 2 << 20);
        assert_eq!(parts[1].0, b"large/0000000042/00001".to_vec());
        assert!(parts.iter().all(|(key, _, _)| Write::number_of(Class::Large, key) == Some(42)));
        let small = Write { class: Class::Small, n: 7, bytes: 200 };
        assert_eq!(small.parts(4 << 20), vec![(b"small/0000000007".to_vec(), 7, 200)]);
        assert_eq!(Write::number_of(Class::Small, b"small/0000000007"), Some(7));
        assert_eq!(Write::number_of(Class::Small, b"files/0000000007"), None);
        assert_eq!(Write::number_of(Class::Small, b"small/12"), None);
    }

    #[test]
    fn the_record_counts_failures_and_measures_only_after_warm_up() {
        let started = Instant::now() - Duration::from_secs(3);
        let mut record = Record::new(started, Duration::from_secs(1));
        let write = |n| Write { class: Class::Small, n, bytes: 100 };
        record.done(write(0), started, Ok(5));
        record.done(write(1), started + Duration::from_millis(1500), Ok(9));
        record.done(write(2), started + Duration::from_millis(2500), Err("refused".into()));
        assert_eq!(record.acked.len(), 2);
        assert_eq!((record.failed, record.last_ts), (1, 9));
        assert_eq!(record.latency.len(), 1, "the warm-up write is not measured");
        assert_eq!(record.seconds.len(), 3);
        assert_eq!(record.seconds[2].failed, 1);
        assert_eq!(record.first_error.as_deref(), Some("refused"));
        assert_eq!(record.by_class[&Class::Small].acked, 2);
    }
}
