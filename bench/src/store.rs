//! `bench store`: one shard's store (WAL + on-disk engine + memory budget), in process, filled
//! with 1 KiB values to several times its memory budget in random key order by 256 concurrent
//! writers (every put durable: acknowledged after its WAL group commit's fdatasync), then
//! overwritten at random; then closed, the page cache dropped, reopened (the restart time) and
//! read at random. In the same run RocksDB's `db_bench` does the same with `--sync=1` (its WAL
//! synced on every write, group-committed across its writer threads), the same key count,
//! value size and a block cache of our budget; fio measures the device's random 4 KiB read.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use dataplane::store::{ShardStore, StoreConfig};
use hdrhistogram::Histogram;

use crate::device;
use crate::engine::{
    DbBenchFigures, KEY_BYTES, device_written_bytes, drop_page_cache, key, mix, new_histogram, parse_db_bench,
    reset_peak_rss, rss_bytes, value,
};
use crate::report::{Figures, percentile_us};

#[derive(Args, Debug)]
pub struct StoreArgs {
    /// Directory on the file system under test (created; emptied of bench files after).
    #[arg(long, default_value = "bench-data")]
    dir: PathBuf,
    /// The store's memory budget in MiB (`store.memory_bytes_max` of a one-shard node).
    #[arg(long, default_value_t = 512)]
    budget_mib: u64,
    /// Data set (keys times key and value bytes) as a multiple of the budget.
    #[arg(long, default_value_t = 4.0)]
    scale: f64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// Concurrent writers (and db_bench writer threads).
    #[arg(long, default_value_t = 256)]
    writers: usize,
    /// Random gets measured, one at a time, uniform over the keys, the page cache dropped.
    #[arg(long, default_value_t = 50_000)]
    reads: u64,
    /// Seconds old versions stay readable. 0 by default: db_bench keeps no old versions, so
    /// the comparison is of the same data set; the store's default is an hour.
    #[arg(long, default_value_t = 0)]
    retention_secs: u64,
    /// Skip RocksDB's db_bench (ratios against it are then absent).
    #[arg(long)]
    no_rocksdb: bool,
    /// Skip fio's random-read baseline.
    #[arg(long)]
    no_fio: bool,
    /// Print one JSON object with every figure instead of the summary.
    #[arg(long)]
    json: bool,
}

/// Put latencies and rate over one window of the writes.
struct Window {
    latency: Histogram<u64>,
    ops: u64,
    elapsed: Duration,
}

impl Window {
    fn ops_per_s(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let ops = self.ops as f64;
        ops / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A window being measured: the ops it takes (`from..to`), its figures, when it opened.
type WindowSlot = RefCell<Option<(u64, u64, Window, Option<Instant>)>>;

/// What one run of the store gave.
struct StoreResult {
    /// Fill windows at 5-10 % and 45-50 % of the keys, and the random overwrite (at 100 %).
    at_10: Window,
    at_50: Window,
    full: Window,
    fill_ops_per_s: f64,
    read: Window,
    found: u64,
    write_amplification: f64,
    rss_peak_bytes: u64,
    rss_steady_bytes: u64,
    engine_disk_bytes: u64,
    restart_ms: f64,
    /// Bytes read from the device during the gets.
    get_read_bytes: u64,
}

fn config(dir: &Path, args: &StoreArgs) -> StoreConfig {
    let mut config = StoreConfig::new(dir, 0);
    config.memory_bytes_max = args.budget_mib << 20;
    config.retention = Duration::from_secs(args.retention_secs);
    config
}

/// Runs `ops` puts with `writers` tasks; the put numbered `op` writes key `pick(op)`. Each put's
/// latency goes to the window `window_of(op)` names (if any).
async fn put_phase(
    store: &ShardStore,
    args: &StoreArgs,
    ops: u64,
    first_seq: u64,
    pick: Rc<dyn Fn(u64) -> u64>,
    windows: Rc<Vec<WindowSlot>>,
) -> Result<f64> {
    let next = Rc::new(Cell::new(0_u64));
    let failed: Rc<RefCell<Option<String>>> = Rc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.writers {
        let (store, next, pick, windows, failed) =
            (store.clone(), Rc::clone(&next), Rc::clone(&pick), Rc::clone(&windows), Rc::clone(&failed));
        let value_bytes = args.value_bytes;
        tasks.push(glommio::spawn_local(async move {
            loop {
                let op = next.get();
                if op >= ops || failed.borrow().is_some() {
                    return;
                }
                next.set(op + 1);
                let value = value(first_seq + op, value_bytes);
                let begin = Instant::now();
                if let Err(error) = store.put(&key(pick(op)), &value).await {
                    *failed.borrow_mut() = Some(error.to_string());
                    return;
                }
                let took = u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1);
                for window in windows.iter() {
                    if let Some((from, to, window, opened)) = window.borrow_mut().as_mut()
                        && (*from..*to).contains(&op)
                    {
                        let _ = window.latency.record(took);
                        window.ops += 1;
                        let opened = *opened.get_or_insert(begin);
                        window.elapsed = window.elapsed.max(opened.elapsed());
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await;
    }
    if let Some(error) = failed.borrow().as_ref() {
        bail!("a put failed: {error}");
    }
    #[allow(clippy::cast_precision_loss)]
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

fn window(from: u64, to: u64) -> Result<WindowSlot> {
    Ok(RefCell::new(Some((from, to, Window { latency: new_histogram()?, ops: 0, elapsed: Duration::ZERO }, None))))
}

fn take(window: &WindowSlot) -> Result<Window> {
    window.borrow_mut().take().map(|(_, _, window, _)| window).context("a window was taken twice")
}

fn run_store(dir: &Path, args: &StoreArgs, keys: u64) -> Result<StoreResult> {
    let path = dir.join("store");
    let _ = std::fs::remove_dir_all(&path);
    device::quiesce();
    let written_before = device_written_bytes(dir)?;
    reset_peak_rss();
    let config = config(&path, args);
    let (at_10, at_50, full, fill_ops_per_s, rss_steady_bytes) = dataplane::runtime::run_local("bench-store", {
        let config = config.clone();
        let writers_args = StoreArgs { dir: PathBuf::new(), json: false, ..*args };
        async move {
            let store = ShardStore::open(config).await.context("opening the store")?;
            store.spawn_maintenance();
            eprintln!("bench store: fill {keys} keys in random order with {} writers ...", writers_args.writers);
            let windows = Rc::new(vec![window(keys / 20, keys / 10)?, window(keys * 9 / 20, keys / 2)?]);
            let fill =
                put_phase(&store, &writers_args, keys, 0, Rc::new(move |op| permute(op, keys)), Rc::clone(&windows))
                    .await?;
            let (at_10, at_50) = (take(&windows[0])?, take(&windows[1])?);
            eprintln!("bench store: overwrite {keys} random keys (100% full) ...");
            let windows = Rc::new(vec![window(0, keys)?]);
            put_phase(
                &store,
                &writers_args,
                keys,
                keys,
                Rc::new(move |op| mix(op ^ 0x5eed) % keys),
                Rc::clone(&windows),
            )
            .await?;
            let full = take(&windows[0])?;
            let (rss_steady, _) = rss_bytes()?;
            let memory = store.stats().memory;
            eprintln!(
                "bench store: engine memory at the end: memtable {} MiB, {} sealed, cache {} MiB, pinned indexes and filters {} MiB; RSS {} MiB",
                memory.active_memtable_bytes >> 20,
                memory.sealed_memtables,
                memory.cache_bytes >> 20,
                memory.pinned_bytes >> 20,
                rss_steady >> 20
            );
            store.close().await.context("closing the store")?;
            Ok::<_, anyhow::Error>((at_10, at_50, fill, full, rss_steady))
        }
    })
    .map_err(|error| anyhow::anyhow!("{error}"))?
    .map(|(at_10, at_50, fill, full, rss)| (at_10, at_50, full, fill, rss))?;
    device::quiesce();
    #[allow(clippy::cast_precision_loss)]
    let user_bytes = (2 * keys * (KEY_BYTES + args.value_bytes) as u64) as f64;
    #[allow(clippy::cast_precision_loss)]
    let write_amplification = (device_written_bytes(dir)? - written_before) as f64 / user_bytes;

    eprintln!("bench store: restart with the page cache dropped, then {} random gets ...", args.reads);
    if !drop_page_cache() {
        eprintln!("bench store: cannot drop the page cache (not root): reads may be served from it");
    }
    let reads = args.reads.min(keys);
    let device_dir = dir.to_owned();
    let (restart_ms, read, found, engine_disk_bytes, get_read_bytes) =
        dataplane::runtime::run_local("bench-store", async move {
            let started = Instant::now();
            let store = ShardStore::open(config).await.context("reopening the store")?;
            let restart_ms = started.elapsed().as_secs_f64() * 1e3;
            // The compactions the close left due run first (as db_bench's own would), then the
            // page cache is dropped again: the reads measure the settled store, mostly uncached.
            store.spawn_maintenance();
            let settling = Instant::now();
            while store.stats().engine_l0_runs >= dataplane::limits::ENGINE_L0_RUNS_COMPACT as u64
                && settling.elapsed() < Duration::from_secs(120)
            {
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
            drop_page_cache();
            let mut latency = new_histogram()?;
            let mut found = 0;
            let read_before = crate::engine::device_read_bytes(&device_dir)?;
            let started = Instant::now();
            for op in 0..reads {
                let key = key(mix(op ^ 0xbeef) % keys);
                let begin = Instant::now();
                found += u64::from(store.get(&key, None).await.context("a get failed")?.is_some());
                latency.record(u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1))?;
            }
            let read = Window { latency, ops: reads, elapsed: started.elapsed() };
            let read_bytes = crate::engine::device_read_bytes(&device_dir)? - read_before;
            let disk = store.stats().engine_disk_bytes;
            store.close().await.context("closing the store")?;
            Ok::<_, anyhow::Error>((restart_ms, read, found, disk, read_bytes))
        })
        .map_err(|error| anyhow::anyhow!("{error}"))??;
    // The peak over every phase: fill, overwrite, restart and the gets (which fill the cache).
    let (_, rss_peak_bytes) = rss_bytes()?;
    let _ = std::fs::remove_dir_all(&path);
    Ok(StoreResult {
        at_10,
        at_50,
        full,
        fill_ops_per_s,
        read,
        found,
        write_amplification,
        rss_peak_bytes,
        rss_steady_bytes,
        engine_disk_bytes,
        restart_ms,
        get_read_bytes,
    })
}

/// A bijection on `0..keys` (a random order that writes every key once): a Feistel-free
/// cycle walk over splitmix64 would be costlier; an affine map with an odd multiplier
/// coprime to `keys` does.
fn permute(op: u64, keys: u64) -> u64 {
    let mut multiplier = (0x9e37_79b9_7f4a_7c15_u64 % keys.max(1)) | 1;
    while gcd(multiplier, keys) != 1 {
        multiplier += 2;
    }
    let index = (u128::from(op) * u128::from(multiplier) + 12345) % u128::from(keys.max(1));
    u64::try_from(index).unwrap_or(0)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

struct RocksResult {
    fill: DbBenchFigures,
    overwrite: DbBenchFigures,
    read: DbBenchFigures,
    write_amplification: f64,
}

fn db_bench(path: &Path, args: &StoreArgs, keys: u64, benchmarks: &str, threads: usize) -> Result<String> {
    let budget = args.budget_mib << 20;
    let writes_per_thread = keys / threads as u64;
    let output = std::process::Command::new("db_bench")
        .arg(format!("--db={}", path.display()))
        .arg(format!("--benchmarks={benchmarks}"))
        .arg(format!("--use_existing_db={}", u8::from(benchmarks == "readrandom")))
        .arg(format!("--num={keys}"))
        .arg(format!("--writes={writes_per_thread}"))
        .arg(format!("--reads={}", args.reads.min(keys)))
        .arg(format!("--key_size={KEY_BYTES}"))
        .arg(format!("--value_size={}", args.value_bytes))
        .arg(format!("--cache_size={budget}"))
        .arg(format!("--write_buffer_size={}", budget / 8))
        .arg("--max_write_buffer_number=2")
        .arg("--enable_blob_files=1")
        .arg(format!("--min_blob_size={}", dataplane::store::engine::SEPARATION_BYTES))
        .args(["--compression_type=none", "--blob_compression_type=none", "--disable_wal=0", "--sync=1"])
        .arg(format!("--threads={threads}"))
        .args(["--histogram=1", "--seed=1"])
        .output()
        .context("running db_bench (apt-get install rocksdb-tools, or make bench)")?;
    if !output.status.success() {
        bail!("db_bench failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn run_rocksdb(dir: &Path, args: &StoreArgs, keys: u64) -> Result<RocksResult> {
    let path = dir.join("rocksdb");
    let _ = std::fs::remove_dir_all(&path);
    eprintln!("bench store: db_bench --sync=1: fillrandom, overwrite ({keys} keys, {} threads) ...", args.writers);
    device::quiesce();
    let written_before = device_written_bytes(dir)?;
    let output = db_bench(&path, args, keys, "fillrandom,overwrite", args.writers)?;
    device::quiesce();
    #[allow(clippy::cast_precision_loss)]
    let user_bytes = (2 * keys * (KEY_BYTES + args.value_bytes) as u64) as f64;
    #[allow(clippy::cast_precision_loss)]
    let write_amplification = (device_written_bytes(dir)? - written_before) as f64 / user_bytes;
    let (fill, overwrite) = (parse_db_bench(&output, "fillrandom")?, parse_db_bench(&output, "overwrite")?);
    eprintln!("bench store: db_bench: readrandom ({} reads, one thread, page cache dropped) ...", args.reads);
    drop_page_cache();
    let output = db_bench(&path, args, keys, "readrandom", 1)?;
    let read = parse_db_bench(&output, "readrandom")?;
    let _ = std::fs::remove_dir_all(&path);
    Ok(RocksResult { fill, overwrite, read, write_amplification })
}

pub fn run(args: &StoreArgs) -> Result<()> {
    let budget = args.budget_mib << 20;
    if args.budget_mib < 32 || !(0.01..=1000.0).contains(&args.scale) || args.value_bytes == 0 || args.writers == 0 {
        bail!("--budget-mib must be at least 32, --scale in 0.01..=1000, --value-bytes and --writers positive");
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let keys = (budget as f64 * args.scale / (KEY_BYTES + args.value_bytes) as f64) as u64;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let mut figures = Figures::default();
    figures.set("bench", "store");
    figures.set("budget_bytes", budget);
    figures.set("keys", keys);
    figures.set("value_bytes", args.value_bytes);
    figures.set("writers", args.writers);
    figures.set("retention_secs", args.retention_secs);
    #[allow(clippy::cast_precision_loss)]
    figures.set_f64("dataset_vs_budget_ratio", (keys * (KEY_BYTES + args.value_bytes) as u64) as f64 / budget as f64);

    let ours = run_store(&dir, args, keys)?;
    for (name, window) in
        [("fill_10", &ours.at_10), ("fill_50", &ours.at_50), ("full", &ours.full), ("get", &ours.read)]
    {
        figures.set_f64(format!("{name}_ops_per_s"), window.ops_per_s());
        figures.set_f64(format!("{name}_p50_us"), percentile_us(&window.latency, 50.0));
        figures.set_f64(format!("{name}_p99_us"), percentile_us(&window.latency, 99.0));
    }
    figures.set_f64("fill_ops_per_s", ours.fill_ops_per_s);
    figures.set_f64(
        "put_p99_full_vs_empty_ratio",
        percentile_us(&ours.full.latency, 99.0) / percentile_us(&ours.at_10.latency, 99.0),
    );
    figures.set("get_found", ours.found);
    #[allow(clippy::cast_precision_loss)]
    figures.set_f64("get_device_read_bytes_per_op", ours.get_read_bytes as f64 / ours.read.ops.max(1) as f64);
    figures.set_f64("write_amplification", ours.write_amplification);
    figures.set("rss_peak_bytes", ours.rss_peak_bytes);
    figures.set("rss_steady_bytes", ours.rss_steady_bytes);
    #[allow(clippy::cast_precision_loss)]
    figures.set_f64("rss_peak_vs_budget_ratio", ours.rss_peak_bytes as f64 / budget as f64);
    #[allow(clippy::cast_precision_loss)]
    figures.set_f64("rss_steady_vs_budget_ratio", ours.rss_steady_bytes as f64 / budget as f64);
    figures.set("engine_disk_bytes", ours.engine_disk_bytes);
    figures.set_f64("restart_ms", ours.restart_ms);

    if !args.no_rocksdb {
        let rocks = run_rocksdb(&dir, args, keys)?;
        for (name, phase) in [("fill", rocks.fill), ("overwrite", rocks.overwrite), ("get", rocks.read)] {
            figures.set_f64(format!("rocksdb_{name}_ops_per_s"), phase.ops_per_s);
            figures.set_f64(format!("rocksdb_{name}_p99_us"), phase.p99_us);
        }
        figures.set_f64("rocksdb_write_amplification", rocks.write_amplification);
        figures.set_f64("fill_throughput_vs_rocksdb_ratio", ours.fill_ops_per_s / rocks.fill.ops_per_s);
        figures.set_f64("put_throughput_vs_rocksdb_ratio", ours.full.ops_per_s() / rocks.overwrite.ops_per_s);
        figures.set_f64("put_p99_vs_rocksdb_ratio", percentile_us(&ours.full.latency, 99.0) / rocks.overwrite.p99_us);
        figures.set_f64("get_p99_vs_rocksdb_ratio", percentile_us(&ours.read.latency, 99.0) / rocks.read.p99_us);
    }
    crate::engine::finish(&dir, !args.no_fio, args.json, &ours.read.latency, &mut figures, print_summary)
}

fn print_summary(figures: &Figures) {
    let get = |key: &str| figures.get_f64(key).unwrap_or(f64::NAN);
    let mib = |key: &str| get(key) / f64::from(1 << 20);
    let mut lines = vec![
        format!(
            "bench store: one shard, {} keys of {} B = {:.1}x a memory budget of {:.0} MiB, {} writers, every put durable",
            get("keys"),
            get("value_bytes"),
            get("dataset_vs_budget_ratio"),
            mib("budget_bytes"),
            get("writers"),
        ),
        "                         puts/s      p50 µs      p99 µs".to_string(),
    ];
    for (label, name) in [("fill at 10%", "fill_10"), ("fill at 50%", "fill_50"), ("overwrite (full)", "full")] {
        lines.push(format!(
            "  {label:<18} {:>10.0} {:>11.0} {:>11.0}",
            get(&format!("{name}_ops_per_s")),
            get(&format!("{name}_p50_us")),
            get(&format!("{name}_p99_us")),
        ));
    }
    lines.push(format!(
        "  db_bench --sync=1: fillrandom {:.0}/s p99 {:.0} µs, overwrite {:.0}/s p99 {:.0} µs; ours/theirs: fill {:.2}x, overwrite {:.2}x, p99 {:.2}x",
        get("rocksdb_fill_ops_per_s"),
        get("rocksdb_fill_p99_us"),
        get("rocksdb_overwrite_ops_per_s"),
        get("rocksdb_overwrite_p99_us"),
        get("fill_throughput_vs_rocksdb_ratio"),
        get("put_throughput_vs_rocksdb_ratio"),
        get("put_p99_vs_rocksdb_ratio"),
    ));
    lines.push(format!("  put p99 full vs at 10%: {:.2}x", get("put_p99_full_vs_empty_ratio")));
    lines.push(format!(
        "  get p99 {:.0} µs (page cache dropped): {:.2}x the device's random 4 KiB read ({:.0} µs), {:.2}x db_bench readrandom ({:.0} µs)",
        get("get_p99_us"),
        get("get_p99_vs_device_ratio"),
        get("fio_randread_4k_p99_us"),
        get("get_p99_vs_rocksdb_ratio"),
        get("rocksdb_get_p99_us"),
    ));
    lines.push(format!(
        "  RSS peak {:.0} MiB ({:.2}x budget), steady {:.0} MiB; write amplification {:.2} (db_bench {:.2}); engine on disk {:.0} MiB; restart {:.0} ms",
        mib("rss_peak_bytes"),
        get("rss_peak_vs_budget_ratio"),
        mib("rss_steady_bytes"),
        get("write_amplification"),
        get("rocksdb_write_amplification"),
        mib("engine_disk_bytes"),
        get("restart_ms"),
    ));
    crate::engine::print_lines(&lines);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::cast_possible_truncation)]
    fn the_fill_order_writes_every_key_once() {
        for keys in [1_u64, 2, 7, 1000, 4096, 99_991] {
            let mut seen = vec![false; keys as usize];
            for op in 0..keys {
                let key = permute(op, keys) as usize;
                assert!(!seen[key], "{keys}: key {key} twice");
                seen[key] = true;
            }
        }
    }
}
