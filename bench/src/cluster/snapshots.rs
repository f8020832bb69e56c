//! Global snapshots during a cluster run: taken through the control plane every
//! `--snapshot-every` while the load runs, then the catalog says when each region could read
//! each one (request to readable, as the leader recorded it from the region's data node), and
//! snapshots spread over the run are read in full in every region and compared.
//!
//! With `--chains N`, N writers (labelled with the regions in turn) each write a chain of keys
//! `chain/<writer>/<n>`, one at a time, each value naming the previous key of its chain; keys
//! spread over all shards, and each write is taken by its shard's home region: with
//! `--homes a,b,c` a chain's writes land in all three regions, so causality is checked across
//! regions as well as shards. Every
//! snapshot read must be a causally closed cut: if it holds a write, it holds every write
//! acknowledged before that write started, whatever chain or shard. Start and acknowledgement
//! instants are taken on this process's monotonic clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use client::Client;
use controlapi::client::ControlClient;
use controlapi::meta::SnapshotStatus;
use hdrhistogram::Histogram;

use super::scenario::REGIONS;

/// How long every snapshot may stay pending in a region after the load.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(40);
/// Snapshots read in full in every region and compared, spread over the run.
const COMPARED: usize = 8;
/// A chain writer's pause between writes (the chains test causality, not throughput).
const CHAIN_PAUSE: Duration = Duration::from_millis(10);

/// What the run measured of its snapshots.
#[derive(Debug, Default)]
pub struct Figures {
    /// Snapshots taken (created in the catalog).
    pub taken: u64,
    /// Requests the control plane refused or did not answer.
    pub create_errors: u64,
    /// Per region: request-to-readable latencies, µs.
    pub available_us: BTreeMap<&'static str, Histogram<u64>>,
    /// Per region: snapshots that failed there.
    pub failed: BTreeMap<&'static str, u64>,
    /// Snapshots read in every region and compared.
    pub compared: u64,
    /// Keys the compared snapshots held (in region a).
    pub compared_keys: u64,
    /// Snapshots whose contents differed between regions.
    pub differing: u64,
    /// Chain writes acknowledged.
    pub chain_writes: u64,
    /// Over every compared snapshot and region: acknowledged chain writes missing from a
    /// snapshot that holds a write started after their acknowledgement.
    pub causal_violations: u64,
}

/// One acknowledged chain write as its writer saw it.
#[derive(Debug, Clone)]
pub struct ChainWrite {
    key: Vec<u8>,
    started: Instant,
    acked: Instant,
}

/// Every acknowledged chain write.
pub type ChainLog = Arc<std::sync::Mutex<Vec<ChainWrite>>>;

/// Runs `writers` chain writers against `client` until `stop` or `until` (from `started`);
/// returns how many writes failed (they are left out of the checks).
pub async fn write_chains(
    client: Client,
    writers: usize,
    started: Instant,
    until: Duration,
    stop: Arc<AtomicBool>,
    log: ChainLog,
) -> u64 {
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers {
        let (client, stop, log) = (client.clone(), stop.clone(), log.clone());
        tasks.spawn(async move {
            let region = REGIONS[writer % REGIONS.len()];
            let mut previous = String::from("(start)");
            let mut failed = 0u64;
            for n in 0u64.. {
                if stop.load(Ordering::Relaxed) || started.elapsed() >= until {
                    break;
                }
                let key = format!("chain/{writer:02}/{n:06}");
                let value = format!("writer {writer} of region {region}, write {n}, after {previous}");
                let began = Instant::now();
                match client.put(key.as_bytes(), value.as_bytes()).await {
                    Ok(_) => {
                        let acked = Instant::now();
                        log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(ChainWrite {
                            key: key.clone().into_bytes(),
                            started: began,
                            acked,
                        });
                        previous = key;
                    }
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(CHAIN_PAUSE).await;
            }
            failed
        });
    }
    let mut failed = 0;
    while let Some(joined) = tasks.join_next().await {
        failed += joined.unwrap_or(0);
    }
    failed
}

/// Acknowledged writes missing from `held` although a write in `held` started after they were
/// acknowledged.
fn causal_violations(log: &[ChainWrite], held: &std::collections::HashSet<&[u8]>) -> u64 {
    let Some(latest_start) = log.iter().filter(|w| held.contains(w.key.as_slice())).map(|w| w.started).max() else {
        return 0;
    };
    log.iter().filter(|w| w.acked < latest_start && !held.contains(w.key.as_slice())).count() as u64
}

/// Takes a snapshot every `every` from the end of the warm-up until `stop` or `until`; returns
/// the ids taken and how many requests failed.
pub async fn take(
    admin: ControlClient,
    every: Duration,
    started: Instant,
    warmup: Duration,
    until: Duration,
    stop: Arc<AtomicBool>,
) -> (Vec<u64>, u64) {
    let (mut ids, mut errors) = (Vec::new(), 0);
    tokio::time::sleep(warmup.saturating_sub(started.elapsed())).await;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) && started.elapsed() < until {
        tick.tick().await;
        match admin.create_snapshot(0, Duration::from_secs(5)).await {
            Ok((id, _)) => ids.push(id),
            Err(_) => errors += 1,
        }
    }
    (ids, errors)
}

/// Waits until none of `ids` is pending in any region, then gathers the figures and reads the
/// last [`COMPARED`] snapshots readable everywhere in every region.
pub async fn collect(
    admin: &ControlClient,
    ids: &[u64],
    create_errors: u64,
    clients: &[Client],
    chains: &[ChainWrite],
) -> Result<Figures> {
    let give_up = Instant::now() + SETTLE_TIMEOUT;
    let catalog = loop {
        let catalog = admin.read(true, Duration::from_secs(5)).await?.snapshots;
        let pending = ids
            .iter()
            .filter_map(|id| catalog.get(id))
            .any(|snapshot| snapshot.regions.values().any(|status| *status == SnapshotStatus::Pending));
        if !pending {
            break catalog;
        }
        if Instant::now() >= give_up {
            bail!("snapshots still pending {SETTLE_TIMEOUT:?} after the load");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut figures =
        Figures { taken: ids.len() as u64, create_errors, chain_writes: chains.len() as u64, ..Figures::default() };
    let mut everywhere = Vec::new();
    for id in ids {
        let snapshot = catalog.get(id).with_context(|| format!("snapshot {id} missing from the catalog"))?;
        for region in REGIONS {
            match snapshot.readable_after_us.get(region) {
                Some(us) => {
                    let histogram = figures.available_us.entry(region).or_insert_with(new_histogram);
                    histogram.saturating_record((*us).max(1));
                }
                None => *figures.failed.entry(region).or_default() += 1,
            }
        }
        if REGIONS.iter().all(|region| snapshot.readable_after_us.contains_key(*region)) {
            everywhere.push(snapshot.glt);
        }
    }
    let step = everywhere.len().div_ceil(COMPARED).max(1);
    let picked: Vec<u64> = everywhere.iter().rev().step_by(step).take(COMPARED).copied().collect();
    for glt in picked {
        let mut contents = Vec::new();
        for client in clients {
            client.wait_readable(glt, Duration::from_secs(10)).await?;
            let entries = read_all(client, glt).await?;
            let held: std::collections::HashSet<&[u8]> = entries.iter().map(|(key, _, _)| key.as_slice()).collect();
            figures.causal_violations += causal_violations(chains, &held);
            contents.push(entries);
        }
        figures.compared += 1;
        figures.compared_keys += contents[0].len() as u64;
        if contents.iter().any(|other| *other != contents[0]) {
            figures.differing += 1;
        }
    }
    Ok(figures)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Every key with its version timestamp and size, as of `glt`.
async fn read_all(client: &Client, glt: u64) -> Result<Vec<(Vec<u8>, u64, u64)>> {
    let entries = client.list_all(b"", Some(glt)).await?;
    Ok(entries.into_iter().map(|entry| (entry.key, entry.ts, entry.size)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_missing_an_earlier_acknowledged_write_is_a_violation() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let write = |key: &str, started, acked| ChainWrite {
            key: key.as_bytes().to_vec(),
            started: at(started),
            acked: at(acked),
        };
        // x acked at 10; y started at 20 (after x); z ran concurrently with y.
        let log = vec![write("x", 0, 10), write("y", 20, 30), write("z", 15, 40)];
        let cut =
            |keys: &[&'static str]| keys.iter().map(|k| k.as_bytes()).collect::<std::collections::HashSet<&[u8]>>();
        assert_eq!(causal_violations(&log, &cut(&[])), 0);
        assert_eq!(causal_violations(&log, &cut(&["x"])), 0);
        assert_eq!(causal_violations(&log, &cut(&["x", "y"])), 0, "z was not acknowledged before y started");
        assert_eq!(causal_violations(&log, &cut(&["y"])), 1, "y started after x was acknowledged");
        assert_eq!(causal_violations(&log, &cut(&["z"])), 1);
        assert_eq!(causal_violations(&log, &cut(&["x", "y", "z"])), 0);
    }
}
