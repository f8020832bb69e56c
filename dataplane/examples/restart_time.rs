//! Measures how long a shard takes to reopen as its history grows: the same live data set is
//! overwritten again and again, and the reopen time (the engine's open + the WAL after its
//! last flush) is reported per history size. Restart work must follow the live data, not the history.
//!
//! `cargo run --release -p dataplane --example restart_time -- [keys] [value_bytes] [rounds...]`
#![allow(clippy::unwrap_used, clippy::cast_precision_loss, clippy::cast_lossless)]

use std::time::{Duration, Instant};

use dataplane::store::{ShardStore, StoreConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let keys: u64 = args.first().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let value_bytes: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(1024);
    let checkpoints: Vec<u64> =
        if args.len() > 2 { args[2..].iter().map(|v| v.parse().unwrap()).collect() } else { vec![1, 2, 4, 8, 16] };
    let dir = tempfile::tempdir_in(std::env::var("MERIDIAN_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let mut config = StoreConfig::new(dir.path(), 0);
    config.checkpoint_wal_bytes = 64 << 20;
    config.retention = Duration::ZERO;
    let live_bytes = keys * value_bytes as u64;
    println!(
        "live data: {keys} keys x {value_bytes} B = {:.1} MiB; retention 0 (old versions collected)",
        live_bytes as f64 / (1 << 20) as f64
    );
    println!("{:>10} {:>14} {:>12} {:>12} {:>12}", "rounds", "history_mib", "reopen_ms", "replayed", "versions");
    let mut written_rounds = 0;
    for target in checkpoints {
        let config = config.clone();
        let rounds = target - written_rounds;
        written_rounds = target;
        let (reopen, stats) = dataplane::runtime::run_local("restart-time", async move {
            let store = ShardStore::open(config.clone()).await.unwrap();
            let value = vec![0x5a_u8; value_bytes];
            for round in 0..rounds {
                let mut pending = Vec::new();
                for key in 0..keys {
                    let store = store.clone();
                    let value = value.clone();
                    pending.push(glommio::spawn_local(async move {
                        store.put(format!("key-{key:08}").as_bytes(), &value).await.unwrap();
                    }));
                    if pending.len() == 256 {
                        for task in pending.drain(..) {
                            task.await;
                        }
                    }
                }
                for task in pending {
                    task.await;
                }
                let _ = round;
                store.collect_garbage().await.unwrap();
                if store.checkpoint_due() {
                    store.checkpoint().await.unwrap();
                }
            }
            // Crash-like: no final checkpoint, the next open replays the WAL tail.
            drop(store);
            let started = Instant::now();
            let store = ShardStore::open(config).await.unwrap();
            let reopen = started.elapsed();
            let stats = store.stats();
            drop(store);
            (reopen, stats)
        })
        .unwrap();
        let history = target * live_bytes;
        println!(
            "{:>10} {:>14.1} {:>12.1} {:>12} {:>12}",
            target,
            history as f64 / (1 << 20) as f64,
            reopen.as_secs_f64() * 1e3,
            stats.replayed_records,
            stats.versions
        );
    }
}
