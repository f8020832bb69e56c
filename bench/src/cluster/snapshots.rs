//! Global snapshots during a cluster run: taken through the control plane every
//! `--snapshot-every` while the load runs, then the catalog says when each region could read
//! each one (request to readable, as the leader recorded it from the region's data node), and
//! the last snapshots are read in every region and compared.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use client::Client;
use controlplane::client::ControlClient;
use controlplane::meta::SnapshotStatus;
use hdrhistogram::Histogram;

use super::scenario::REGIONS;

/// How long every snapshot may stay pending in a region after the load.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(40);
/// Snapshots read in full in every region and compared.
const COMPARED: usize = 3;
/// Entries per listing page.
const PAGE: u32 = 1000;

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
pub async fn collect(admin: &ControlClient, ids: &[u64], create_errors: u64, clients: &[Client]) -> Result<Figures> {
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
    let mut figures = Figures { taken: ids.len() as u64, create_errors, ..Figures::default() };
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
    for glt in everywhere.iter().rev().take(COMPARED) {
        let mut contents = Vec::new();
        for client in clients {
            client.wait_readable(*glt, Duration::from_secs(10)).await?;
            contents.push(read_all(client, *glt).await?);
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
    let mut entries = Vec::new();
    let mut after = Vec::new();
    loop {
        let page = client.list(b"", &after, PAGE, Some(glt)).await?;
        entries.extend(page.entries.iter().map(|entry| (entry.key.clone(), entry.ts, entry.size)));
        match page.next {
            Some(next) => after = next,
            None => return Ok(entries),
        }
    }
}
