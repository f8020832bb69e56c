//! `bench engine`: the measurement behind the store's choice of an on-disk engine. One
//! key-value-separated `lsm-tree` (the engine under fjall) under a memory budget is filled with
//! 1 KiB values to several times the budget in random key order, overwritten at random, then
//! read at random with the page cache dropped; in the same run RocksDB's `db_bench` (Debian's
//! `rocksdb-tools`) does the same with the same key count, value size, memtable and block
//! cache, and fio measures the device's random 4 KiB read. Both engines run without their own
//! write-ahead log: in the store our WAL is the durability point, so what is compared here is
//! the engine's flush and compaction work, its read path and its memory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use hdrhistogram::Histogram;
use lsm_tree::{AbstractTree, AnyTree, Cache, Config, KvSeparationOptions, SequenceNumberCounter};

use crate::device;
use crate::report::{Figures, percentile_us};

#[derive(Args, Debug)]
pub struct EngineArgs {
    /// Directory on the file system under test (created; emptied of bench files after).
    #[arg(long, default_value = "bench-data")]
    dir: PathBuf,
    /// Memory budget of the engine in MiB: block cache plus memtables.
    #[arg(long, default_value_t = 512)]
    budget_mib: u64,
    /// Data set (keys times key and value bytes) as a multiple of the budget.
    #[arg(long, default_value_t = 4.0)]
    scale: f64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// Values of at least this many bytes go to blob files (key-value separation).
    #[arg(long, default_value_t = 512)]
    separation_bytes: u32,
    /// Random reads measured (uniform over the keys, page cache dropped first).
    #[arg(long, default_value_t = 100_000)]
    reads: u64,
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

pub(crate) const KEY_BYTES: usize = 16;

/// The sizes both engines are given.
#[derive(Debug, Clone, Copy)]
struct Shape {
    keys: u64,
    value_bytes: usize,
    memtable_bytes: u64,
    cache_bytes: u64,
    reads: u64,
}

impl Shape {
    fn new(args: &EngineArgs) -> Result<Self> {
        let budget = args.budget_mib << 20;
        if budget < 16 << 20 || !(0.01..=1000.0).contains(&args.scale) || args.value_bytes == 0 {
            bail!("--budget-mib must be at least 16, --scale in 0.01..=1000, --value-bytes positive");
        }
        // Two memtables (one filling, one flushing) take a quarter of the budget at most.
        let memtable_bytes = (budget / 8).min(64 << 20);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let keys = (budget as f64 * args.scale / (KEY_BYTES + args.value_bytes) as f64) as u64;
        Ok(Self {
            keys,
            value_bytes: args.value_bytes,
            memtable_bytes,
            cache_bytes: budget - 2 * memtable_bytes,
            reads: args.reads.min(keys),
        })
    }
}

/// splitmix64: a bijection on u64, so `key(i)` for distinct `i` are distinct and spread.
pub(crate) fn mix(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

pub(crate) fn key(index: u64) -> [u8; KEY_BYTES] {
    let mut key = [0_u8; KEY_BYTES];
    key[..8].copy_from_slice(&mix(index).to_be_bytes());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

/// Incompressible value bytes for write `seq`.
pub(crate) fn value(seq: u64, bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + 8);
    let mut state = seq;
    while out.len() < bytes {
        state = mix(state);
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(bytes);
    out
}

/// (current RSS, peak RSS) of this process in bytes.
pub(crate) fn rss_bytes() -> Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib << 10)
            .with_context(|| format!("/proc/self/status lacks {name}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the peak RSS to the current one.
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Writes dirty pages and drops the page cache (root only), so reads go to the device.
pub(crate) fn drop_page_cache() -> bool {
    device::quiesce();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

struct Phase {
    ops_per_s: f64,
    latency: Histogram<u64>,
}

pub(crate) fn new_histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000_000, 3)?)
}

/// The lsm-tree under test and the thread that flushes and compacts it, as the store's
/// maintenance would: flush whenever a memtable is sealed, leveled compaction when L0 has runs.
struct LsmEngine {
    tree: AnyTree,
    seqno: SequenceNumberCounter,
    visible: SequenceNumberCounter,
    stop: Arc<AtomicBool>,
    maintenance: Option<std::thread::JoinHandle<Result<()>>>,
    memtable_bytes: u64,
}

impl LsmEngine {
    fn open(path: &Path, shape: &Shape, separation_bytes: u32) -> Result<Self> {
        let (seqno, visible) = (SequenceNumberCounter::default(), SequenceNumberCounter::default());
        let tree = Config::new(path, seqno.clone(), visible.clone())
            .use_cache(Arc::new(Cache::with_capacity_bytes(shape.cache_bytes)))
            .with_kv_separation(Some(KvSeparationOptions::default().separation_threshold(separation_bytes)))
            .open()
            .with_context(|| format!("opening lsm-tree in {}", path.display()))?;
        if let Some(highest) = tree.get_highest_seqno() {
            seqno.fetch_max(highest + 1);
            visible.fetch_max(highest + 1);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let maintenance = {
            let (tree, stop, visible) = (tree.clone(), Arc::clone(&stop), visible.clone());
            std::thread::Builder::new().name("lsm-maintenance".into()).spawn(move || {
                let leveled = Arc::new(lsm_tree::compaction::Leveled::default());
                loop {
                    let stopping = stop.load(Ordering::Acquire);
                    let mut worked = false;
                    if tree.sealed_memtable_count() > 0 {
                        let lock = tree.get_flush_lock();
                        worked |= tree.flush(&lock, visible.get())?.is_some();
                    }
                    if tree.l0_run_count() >= 4 {
                        tree.compact(leveled.clone(), visible.get())?;
                        worked = true;
                    }
                    if stopping && tree.sealed_memtable_count() == 0 {
                        return Ok(());
                    }
                    if !worked {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            })?
        };
        Ok(Self { tree, seqno, visible, stop, maintenance: Some(maintenance), memtable_bytes: shape.memtable_bytes })
    }

    /// Inserts one value; seals the memtable at its size and waits (a write stall) while an
    /// earlier sealed one is still being flushed, so memtables stay within two.
    fn put(&self, key: &[u8], value: Vec<u8>) {
        let seq = self.seqno.next();
        let (_, memtable) = self.tree.insert(key.to_vec(), value, seq);
        self.visible.fetch_max(seq + 1);
        if memtable >= self.memtable_bytes {
            while self.tree.sealed_memtable_count() > 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
            self.tree.rotate_memtable();
        }
    }

    /// Seals and flushes what is in memory, then stops the maintenance thread.
    fn close(mut self) -> Result<()> {
        self.tree.rotate_memtable();
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.maintenance.take() {
            thread.join().map_err(|_| anyhow::anyhow!("the maintenance thread panicked"))??;
        }
        Ok(())
    }
}

fn put_phase(engine: &LsmEngine, shape: &Shape, first_seq: u64, pick: impl Fn(u64) -> u64) -> Result<Phase> {
    let mut latency = new_histogram()?;
    let started = Instant::now();
    for op in 0..shape.keys {
        let value = value(first_seq + op, shape.value_bytes);
        let begin = Instant::now();
        engine.put(&key(pick(op)), value);
        latency.record(u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1))?;
    }
    #[allow(clippy::cast_precision_loss)]
    let ops_per_s = shape.keys as f64 / started.elapsed().as_secs_f64();
    Ok(Phase { ops_per_s, latency })
}

/// Deterministic uniform picks in `0..keys`.
fn uniform(keys: u64, salt: u64) -> impl Fn(u64) -> u64 {
    move |op| mix(op ^ salt.rotate_left(17)) % keys.max(1)
}

struct LsmResult {
    fill: Phase,
    overwrite: Phase,
    read: Phase,
    found: u64,
    write_amplification: f64,
    rss_peak_bytes: u64,
    rss_steady_bytes: u64,
    disk_bytes: u64,
    restart_ms: f64,
}

fn run_lsm(dir: &Path, shape: &Shape, separation_bytes: u32) -> Result<LsmResult> {
    let path = dir.join("lsm-tree");
    let _ = std::fs::remove_dir_all(&path);
    reset_peak_rss();
    device::quiesce();
    let written_before = device_written_bytes(dir)?;
    let engine = LsmEngine::open(&path, shape, separation_bytes)?;
    eprintln!("bench engine: lsm-tree: fill {} keys in random order ...", shape.keys);
    let fill = put_phase(&engine, shape, 0, |op| mix(op) % shape.keys)?;
    eprintln!("bench engine: lsm-tree: overwrite {} random keys ...", shape.keys);
    let overwrite = put_phase(&engine, shape, shape.keys, uniform(shape.keys, 1))?;
    let (rss_steady_bytes, _) = rss_bytes()?;
    engine.close()?;
    let (_, rss_peak_bytes) = rss_bytes()?;
    device::quiesce();
    #[allow(clippy::cast_precision_loss)]
    let user_bytes = (2 * shape.keys * (KEY_BYTES + shape.value_bytes) as u64) as f64;
    #[allow(clippy::cast_precision_loss)]
    let write_amplification = (device_written_bytes(dir)? - written_before) as f64 / user_bytes;

    eprintln!("bench engine: lsm-tree: reopen, then {} random reads with the page cache dropped ...", shape.reads);
    let dropped = drop_page_cache();
    if !dropped {
        eprintln!("bench engine: cannot drop the page cache (not root): reads may be served from it");
    }
    let started = Instant::now();
    let engine = LsmEngine::open(&path, shape, separation_bytes)?;
    let restart_ms = started.elapsed().as_secs_f64() * 1e3;
    let disk_bytes = engine.tree.disk_space();
    let mut latency = new_histogram()?;
    let pick = uniform(shape.keys, 2);
    let seqno = engine.visible.get();
    let mut found = 0;
    let started = Instant::now();
    for op in 0..shape.reads {
        let key = key(pick(op));
        let begin = Instant::now();
        found += u64::from(engine.tree.get(key, seqno)?.is_some());
        latency.record(u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1))?;
    }
    #[allow(clippy::cast_precision_loss)]
    let ops_per_s = shape.reads as f64 / started.elapsed().as_secs_f64();
    engine.close()?;
    let _ = std::fs::remove_dir_all(&path);
    Ok(LsmResult {
        fill,
        overwrite,
        read: Phase { ops_per_s, latency },
        found,
        write_amplification,
        rss_peak_bytes,
        rss_steady_bytes,
        disk_bytes,
        restart_ms,
    })
}

/// One db_bench benchmark's ops/s and p99 in µs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DbBenchFigures {
    pub(crate) ops_per_s: f64,
    pub(crate) p99_us: f64,
}

/// Reads `name : … N ops/sec …` and the `Percentiles: … P99: x` line after it.
pub(crate) fn parse_db_bench(output: &str, name: &str) -> Result<DbBenchFigures> {
    let mut lines = output.lines().skip_while(|line| !line.starts_with(&format!("{name} ")));
    let summary = lines.next().with_context(|| format!("db_bench printed no {name} line"))?;
    // "… 246724 ops/sec …": the number before its unit.
    let ops_per_s = number_beside(summary, |pair| (pair[1] == "ops/sec").then_some(pair[0]))?;
    let percentiles = lines
        .find(|line| line.starts_with("Percentiles:"))
        .with_context(|| format!("db_bench printed no percentiles for {name}"))?;
    // "… P99: 5.83 …": the number after its label.
    let p99_us = number_beside(percentiles, |pair| (pair[0] == "P99:").then_some(pair[1]))?;
    Ok(DbBenchFigures { ops_per_s, p99_us })
}

/// The number `pick` finds among the pairs of adjacent words of `line`.
fn number_beside<'a>(line: &'a str, pick: impl Fn(&[&'a str]) -> Option<&'a str>) -> Result<f64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words.windows(2).find_map(pick).and_then(|word| word.parse().ok()).with_context(|| format!("no figure in `{line}`"))
}

struct RocksResult {
    fill: DbBenchFigures,
    overwrite: DbBenchFigures,
    read: DbBenchFigures,
    write_amplification: f64,
}

fn db_bench(path: &Path, shape: &Shape, separation_bytes: u32, benchmarks: &str, existing: bool) -> Result<String> {
    let output = Command::new("db_bench")
        .arg(format!("--db={}", path.display()))
        .arg(format!("--benchmarks={benchmarks}"))
        .arg(format!("--use_existing_db={}", u8::from(existing)))
        .arg(format!("--num={}", shape.keys))
        .arg(format!("--reads={}", shape.reads))
        .arg(format!("--key_size={KEY_BYTES}"))
        .arg(format!("--value_size={}", shape.value_bytes))
        .arg(format!("--cache_size={}", shape.cache_bytes))
        .arg(format!("--write_buffer_size={}", shape.memtable_bytes))
        .arg(format!("--db_write_buffer_size={}", 2 * shape.memtable_bytes))
        .arg("--max_write_buffer_number=2")
        .arg("--enable_blob_files=1")
        .arg(format!("--min_blob_size={separation_bytes}"))
        .args(["--compression_type=none", "--blob_compression_type=none", "--disable_wal=1", "--sync=0"])
        .args(["--threads=1", "--histogram=1", "--seed=1"])
        .output()
        .context("running db_bench (apt-get install rocksdb-tools, or make bench)")?;
    if !output.status.success() {
        bail!("db_bench failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Bytes written to the block device holding `dir` (sectors written, from sysfs): both
/// engines' write amplification is what reached the device per byte of keys and values put.
pub(crate) fn device_written_bytes(dir: &Path) -> Result<u64> {
    device_sectors(dir, 6)
}

/// Bytes read from the block device holding `dir` since boot, by anyone.
pub(crate) fn device_read_bytes(dir: &Path) -> Result<u64> {
    device_sectors(dir, 2)
}

/// Field `field` (sectors) of the block stat of the device holding `dir`, in bytes.
fn device_sectors(dir: &Path, field: usize) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir)?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat"))
        .with_context(|| format!("reading the stats of block device {major}:{minor}"))?;
    let sectors: u64 = stat.split_whitespace().nth(field).and_then(|value| value.parse().ok()).context("block stat")?;
    Ok(sectors * 512)
}

fn run_rocksdb(dir: &Path, shape: &Shape, separation_bytes: u32) -> Result<RocksResult> {
    let path = dir.join("rocksdb");
    let _ = std::fs::remove_dir_all(&path);
    eprintln!("bench engine: db_bench: fillrandom, overwrite ({} keys) ...", shape.keys);
    device::quiesce();
    let written_before = device_written_bytes(dir)?;
    let output = db_bench(&path, shape, separation_bytes, "fillrandom,overwrite", false)?;
    device::quiesce();
    #[allow(clippy::cast_precision_loss)]
    let user_bytes = (2 * shape.keys * (KEY_BYTES + shape.value_bytes) as u64) as f64;
    #[allow(clippy::cast_precision_loss)]
    let write_amplification = (device_written_bytes(dir)? - written_before) as f64 / user_bytes;
    let (fill, overwrite) = (parse_db_bench(&output, "fillrandom")?, parse_db_bench(&output, "overwrite")?);
    eprintln!("bench engine: db_bench: readrandom ({} reads, page cache dropped) ...", shape.reads);
    drop_page_cache();
    let output = db_bench(&path, shape, separation_bytes, "readrandom", true)?;
    let read = parse_db_bench(&output, "readrandom")?;
    let _ = std::fs::remove_dir_all(&path);
    Ok(RocksResult { fill, overwrite, read, write_amplification })
}

pub fn run(args: &EngineArgs) -> Result<()> {
    let shape = Shape::new(args)?;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let mut figures = Figures::default();
    figures.set("bench", "engine");
    figures.set("budget_bytes", args.budget_mib << 20);
    figures.set("keys", shape.keys);
    figures.set("value_bytes", shape.value_bytes);
    figures.set("memtable_bytes", shape.memtable_bytes);
    figures.set("cache_bytes", shape.cache_bytes);
    figures.set("separation_bytes", args.separation_bytes);
    #[allow(clippy::cast_precision_loss)]
    let dataset = (shape.keys * (KEY_BYTES + shape.value_bytes) as u64) as f64;
    #[allow(clippy::cast_precision_loss)]
    figures.set_f64("dataset_vs_budget_ratio", dataset / (args.budget_mib << 20) as f64);

    let lsm = run_lsm(&dir, &shape, args.separation_bytes)?;
    for (name, phase) in [("fill", &lsm.fill), ("overwrite", &lsm.overwrite), ("get", &lsm.read)] {
        figures.set_f64(format!("lsm_{name}_ops_per_s"), phase.ops_per_s);
        figures.set_f64(format!("lsm_{name}_p50_us"), percentile_us(&phase.latency, 50.0));
        figures.set_f64(format!("lsm_{name}_p99_us"), percentile_us(&phase.latency, 99.0));
    }
    figures.set("lsm_get_found", lsm.found);
    figures.set_f64("lsm_write_amplification", lsm.write_amplification);
    figures.set("lsm_rss_peak_bytes", lsm.rss_peak_bytes);
    figures.set("lsm_rss_steady_bytes", lsm.rss_steady_bytes);
    #[allow(clippy::cast_precision_loss)]
    figures.set_f64("lsm_rss_peak_vs_budget_ratio", lsm.rss_peak_bytes as f64 / (args.budget_mib << 20) as f64);
    figures.set("lsm_disk_bytes", lsm.disk_bytes);
    figures.set_f64("lsm_restart_ms", lsm.restart_ms);

    let rocks = if args.no_rocksdb { None } else { Some(run_rocksdb(&dir, &shape, args.separation_bytes)?) };
    if let Some(rocks) = &rocks {
        for (name, phase) in [("fill", rocks.fill), ("overwrite", rocks.overwrite), ("get", rocks.read)] {
            figures.set_f64(format!("rocksdb_{name}_ops_per_s"), phase.ops_per_s);
            figures.set_f64(format!("rocksdb_{name}_p99_us"), phase.p99_us);
        }
        figures.set_f64("rocksdb_write_amplification", rocks.write_amplification);
        figures.set_f64("fill_throughput_vs_rocksdb_ratio", lsm.fill.ops_per_s / rocks.fill.ops_per_s);
        figures.set_f64("overwrite_throughput_vs_rocksdb_ratio", lsm.overwrite.ops_per_s / rocks.overwrite.ops_per_s);
        figures.set_f64("get_p99_vs_rocksdb_ratio", percentile_us(&lsm.read.latency, 99.0) / rocks.read.p99_us);
        figures.set_f64("get_throughput_vs_rocksdb_ratio", lsm.read.ops_per_s / rocks.read.ops_per_s);
    }
    finish(&dir, !args.no_fio, args.json, &lsm.read.latency, &mut figures, print_summary)
}

/// The end of a bench of gets: fio's random 4 KiB read p99 on `dir` beside the gets' `latency`
/// (unless `fio` is off), then one JSON object or the summary `print` makes.
pub(crate) fn finish(
    dir: &Path,
    fio: bool,
    json: bool,
    latency: &Histogram<u64>,
    figures: &mut Figures,
    print: fn(&Figures),
) -> Result<()> {
    if fio {
        let device_p99 = device::fio_random_read_p99_us(dir)?;
        figures.set_f64("fio_randread_4k_p99_us", device_p99);
        figures.set_f64("get_p99_vs_device_ratio", percentile_us(latency, 99.0) / device_p99);
    }
    if json {
        println!("{}", figures.to_json());
    } else {
        print(figures);
    }
    Ok(())
}

fn print_summary(figures: &Figures) {
    let mut lines = Vec::new();
    let get = |key: &str| figures.get_f64(key).unwrap_or(f64::NAN);
    lines.push(format!(
        "bench engine: {} keys of {} B ({:.1}x a budget of {:.0} MiB: cache {:.0} MiB, memtables 2 x {:.0} MiB), no engine WAL",
        get("keys"),
        get("value_bytes"),
        get("dataset_vs_budget_ratio"),
        get("budget_bytes") / f64::from(1 << 20),
        get("cache_bytes") / f64::from(1 << 20),
        get("memtable_bytes") / f64::from(1 << 20),
    ));
    lines.push("                      ops/s        p99 µs".to_string());
    for name in ["fill", "overwrite", "get"] {
        lines.push(format!(
            "  lsm-tree {name:<10} {:>10.0} {:>12.1}      db_bench {:>10.0} {:>12.1}",
            get(&format!("lsm_{name}_ops_per_s")),
            get(&format!("lsm_{name}_p99_us")),
            get(&format!("rocksdb_{name}_ops_per_s")),
            get(&format!("rocksdb_{name}_p99_us")),
        ));
    }
    lines.push(format!(
        "  write amplification: lsm-tree {:.2}, db_bench {:.2}; lsm-tree RSS peak {:.0} MiB ({:.2}x budget), steady {:.0} MiB; disk {:.0} MiB; reopen {:.0} ms",
        get("lsm_write_amplification"),
        get("rocksdb_write_amplification"),
        get("lsm_rss_peak_bytes") / f64::from(1 << 20),
        get("lsm_rss_peak_vs_budget_ratio"),
        get("lsm_rss_steady_bytes") / f64::from(1 << 20),
        get("lsm_disk_bytes") / f64::from(1 << 20),
        get("lsm_restart_ms"),
    ));
    lines.push(format!(
        "  get p99 vs device random 4 KiB read p99 ({:.0} µs): {:.2}x; vs db_bench readrandom: {:.2}x",
        get("fio_randread_4k_p99_us"),
        get("get_p99_vs_device_ratio"),
        get("get_p99_vs_rocksdb_ratio"),
    ));
    print_lines(&lines);
}

/// Prints a summary's lines; the figures of a peer that was skipped read as "-".
pub(crate) fn print_lines(lines: &[String]) {
    for line in lines {
        println!("{}", line.replace("NaN", "-"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "DB path: [/tmp/dbb]
fillrandom   :       4.053 micros/op 246724 ops/sec 0.523 seconds 129055 operations;  244.7 MB/s

Microseconds per write:
Count: 129055 Average: 4.0530  StdDev: 21.47
Min: 1  Median: 1.9702  Max: 6021
Percentiles: P50: 1.97 P75: 2.88 P99: 5.83 P99.9: 170.00 P99.99: 583.00
------------------------------------------------------
overwrite    :       4.270 micros/op 234187 ops/sec 0.551 seconds 129055 operations;  232.2 MB/s

Microseconds per write:
Count: 129055 Average: 4.2700  StdDev: 9.47
Percentiles: P50: 1.45 P75: 1.96 P99: 3.90 P99.9: 170.00 P99.99: 183.00
";

    #[test]
    fn db_bench_figures_are_read_per_benchmark() {
        let fill = parse_db_bench(SAMPLE, "fillrandom").unwrap();
        assert_eq!((fill.ops_per_s, fill.p99_us), (246_724.0, 5.83));
        let overwrite = parse_db_bench(SAMPLE, "overwrite").unwrap();
        assert_eq!((overwrite.ops_per_s, overwrite.p99_us), (234_187.0, 3.9));
        assert!(parse_db_bench(SAMPLE, "readrandom").is_err());
        assert!(parse_db_bench("fillrandom : garbage", "fillrandom").is_err());
    }

    #[test]
    fn keys_are_distinct_and_values_incompressible_and_deterministic() {
        let keys: std::collections::HashSet<[u8; KEY_BYTES]> = (0..10_000).map(key).collect();
        assert_eq!(keys.len(), 10_000);
        assert_eq!(value(7, 1024), value(7, 1024));
        assert_ne!(value(7, 1024), value(8, 1024));
        let distinct: std::collections::HashSet<u8> = value(1, 1024).into_iter().collect();
        assert!(distinct.len() > 200, "value bytes look random");
    }
}
