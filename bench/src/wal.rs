//! `bench wal`: durable-append throughput and ack latency of one shard's WAL, for several
//! record sizes and numbers of concurrent appenders, each cell followed in the same run by
//! the raw probe (the headline baseline: each write + fdatasync timed together, into a laid-out
//! file) and fio (into a laid-out file too), both writing blocks of the WAL's own mean batch
//! size.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use dataplane::wal::{Wal, WalConfig};
use hdrhistogram::Histogram;

use crate::device;
use crate::report::{Figures, percentile_us};

#[derive(Args, Debug)]
pub struct WalArgs {
    /// Directory on the file system under test (created; emptied of bench files after).
    #[arg(long, default_value = "bench-data")]
    dir: PathBuf,
    /// Measured time per cell, after warm-up.
    #[arg(long, default_value_t = 3000)]
    duration_ms: u64,
    /// Warm-up time per cell (not measured).
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
    /// Record payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "128,4096,65536")]
    sizes: Vec<usize>,
    /// Numbers of concurrent appenders.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    appenders: Vec<usize>,
    /// WAL segment size in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    segment_bytes: u64,
    /// Every this many ms, release the segments below the durable LSN, as a store whose
    /// flushes keep up does; the WAL then reuses released segments instead of zero-filling new
    /// ones (its steady state). 0: never release (every segment a new zero-filled file).
    #[arg(long, default_value_t = 100)]
    release_every_ms: u64,
    /// Skip fio (ratios against fio are then absent).
    #[arg(long)]
    no_fio: bool,
    /// Print one JSON object with every figure instead of the table.
    #[arg(long)]
    json: bool,
}

struct CellResult {
    records: u64,
    payload_bytes: u64,
    elapsed_s: f64,
    latency: Histogram<u64>,
    batches: u64,
    batch_bytes: u64,
    io_bytes_max: usize,
    rotations: u64,
    reused_segments: u64,
}

fn run_cell(dir: &Path, args: &WalArgs, size: usize, appenders: usize) -> Result<CellResult> {
    let wal_dir = dir.join(format!("wal-{size}-{appenders}"));
    let _ = std::fs::remove_dir_all(&wal_dir);
    let mut config = WalConfig::new(&wal_dir, 0);
    config.segment_bytes = args.segment_bytes;
    config.record_payload_bytes_max = u32::try_from(size.max(1 << 20)).context("record size")?;
    let warmup = Duration::from_millis(args.warmup_ms);
    let duration = Duration::from_millis(args.duration_ms);
    let release_every = Duration::from_millis(args.release_every_ms);
    let result = dataplane::runtime::run_local("bench-wal", async move {
        let wal = Wal::open(config).await?;
        // 0: warm-up, 1: measuring, 2: stop.
        let phase = Rc::new(Cell::new(0_u8));
        let releaser = (!release_every.is_zero()).then(|| {
            let (wal, phase) = (wal.clone(), Rc::clone(&phase));
            glommio::spawn_local(async move {
                while phase.get() < 2 {
                    glommio::timer::sleep(release_every).await;
                    wal.release_before(wal.durable_next_lsn()).await?;
                }
                Ok::<(), anyhow::Error>(())
            })
        });
        let latency = Rc::new(RefCell::new(Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?));
        let counted = Rc::new(Cell::new((0_u64, 0_u64)));
        let payload: Rc<[u8]> =
            (0..size).map(|index| u8::try_from(index % 251).unwrap_or(0)).collect::<Vec<_>>().into();
        let mut tasks = Vec::new();
        for appender in 0..appenders {
            let (wal, phase, latency, counted, payload) =
                (wal.clone(), Rc::clone(&phase), Rc::clone(&latency), Rc::clone(&counted), Rc::clone(&payload));
            tasks.push(glommio::spawn_local(async move {
                let mut glt = appender as u64;
                while phase.get() < 2 {
                    let begin = Instant::now();
                    wal.append(glt, &payload).await?;
                    if phase.get() == 1 {
                        let nanos = u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        latency.borrow_mut().record(nanos.max(1))?;
                        let (records, bytes) = counted.get();
                        counted.set((records + 1, bytes + payload.len() as u64));
                    }
                    glt += appenders as u64;
                }
                Ok::<(), anyhow::Error>(())
            }));
        }
        glommio::timer::sleep(warmup).await;
        let before = wal.stats();
        phase.set(1);
        let started = Instant::now();
        glommio::timer::sleep(duration).await;
        phase.set(2);
        let elapsed_s = started.elapsed().as_secs_f64();
        let after = wal.stats();
        for task in tasks {
            task.await?;
        }
        if let Some(releaser) = releaser {
            releaser.await?;
        }
        let io_bytes_max = wal.io_bytes_max();
        wal.close().await?;
        let (records, payload_bytes) = counted.get();
        let latency = latency.borrow().clone();
        Ok::<CellResult, anyhow::Error>(CellResult {
            records,
            payload_bytes,
            elapsed_s,
            latency,
            batches: after.batches - before.batches,
            batch_bytes: after.batch_bytes - before.batch_bytes,
            io_bytes_max,
            rotations: after.rotations - before.rotations,
            reused_segments: after.reused_segments - before.reused_segments,
        })
    })??;
    let _ = std::fs::remove_dir_all(&wal_dir);
    Ok(result)
}

pub fn run(args: &WalArgs) -> Result<()> {
    if args.sizes.is_empty() || args.appenders.is_empty() {
        bail!("--sizes and --appenders need at least one value each");
    }
    if let Some(size) = args.sizes.iter().find(|size| **size == 0 || **size > 1 << 20) {
        bail!("--sizes: {size} is outside 1..=1048576");
    }
    if let Some(count) = args.appenders.iter().find(|count| **count == 0 || **count > 4096) {
        bail!("--appenders: {count} is outside 1..=4096");
    }
    let use_fio = !args.no_fio;
    if use_fio && !device::fio_available() {
        bail!("fio is not installed: `apt-get install fio` (or `make bench`, which installs it), or pass --no-fio");
    }
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let duration = Duration::from_millis(args.duration_ms);
    let mut figures = Figures::default();
    figures.set("bench", "wal");
    figures.set("dir", dir.display().to_string());
    figures.set("shards", 1);
    figures.set("cell_duration_ms", args.duration_ms);
    figures.set("release_every_ms", args.release_every_ms);
    let mut rows = Vec::new();
    for &size in &args.sizes {
        for &appenders in &args.appenders {
            eprintln!("bench wal: {size} B records, {appenders} appenders: WAL ...");
            let cell = run_cell(&dir, args, size, appenders)?;
            figures.set("io_bytes_max", cell.io_bytes_max);
            let key = format!("{size}b_{appenders}");
            let records_per_s = cell.records as f64 / cell.elapsed_s;
            let payload_bytes_per_s = cell.payload_bytes as f64 / cell.elapsed_s;
            let mean_batch_bytes = cell.batch_bytes as f64 / cell.batches.max(1) as f64;
            let (p50, p99, p999) = (
                percentile_us(&cell.latency, 50.0),
                percentile_us(&cell.latency, 99.0),
                percentile_us(&cell.latency, 99.9),
            );
            figures.set_f64(format!("wal_{key}_records_per_s"), records_per_s);
            figures.set_f64(format!("wal_{key}_payload_mb_per_s"), payload_bytes_per_s / 1e6);
            figures.set_f64(format!("wal_{key}_p50_us"), p50);
            figures.set_f64(format!("wal_{key}_p99_us"), p99);
            figures.set_f64(format!("wal_{key}_p999_us"), p999);
            figures.set_f64(format!("wal_{key}_mean_batch_bytes"), mean_batch_bytes);
            figures.set_f64(format!("wal_{key}_mean_batch_records"), cell.records as f64 / cell.batches.max(1) as f64);
            figures.set(format!("wal_{key}_rotations"), cell.rotations);
            figures.set(format!("wal_{key}_reused_segments"), cell.reused_segments);
            // The peers write blocks of the WAL's mean batch extent, rounded to the sector.
            let block_bytes = (cell.batch_bytes / cell.batches.max(1)).div_ceil(4096).max(1) * 4096;
            figures.set(format!("peer_{key}_block_bytes"), block_bytes);
            eprintln!("bench wal: {size} B records, {appenders} appenders: probe at {block_bytes} B ...");
            device::quiesce();
            let probe = device::probe(&dir, usize::try_from(block_bytes)?, duration)?;
            let probe_p99 = percentile_us(&probe.cycle, 99.0);
            figures.set_f64(format!("probe_{key}_mb_per_s"), probe.bytes_per_s / 1e6);
            figures.set_f64(format!("probe_{key}_write_sync_p99_us"), probe_p99);
            figures.set_f64(format!("wal_{key}_throughput_vs_probe_ratio"), payload_bytes_per_s / probe.bytes_per_s);
            figures.set_f64(format!("wal_{key}_p99_vs_probe_ratio"), p99 / probe_p99);
            let mut row = format!(
                "{size:>7} B {appenders:>5} | {records_per_s:>11.0} {:>9.1} {p50:>9.0} {p99:>9.0} {p999:>9.0} {:>10.0} | {:>9.1} {probe_p99:>9.0} | {:>6.2} {:>6.2}",
                payload_bytes_per_s / 1e6,
                mean_batch_bytes,
                probe.bytes_per_s / 1e6,
                payload_bytes_per_s / probe.bytes_per_s,
                p99 / probe_p99,
            );
            if use_fio {
                eprintln!("bench wal: {size} B records, {appenders} appenders: fio at {block_bytes} B ...");
                device::quiesce();
                let fio = device::fio(&dir, block_bytes, duration)?;
                // fio times the write and the fdatasync apart: no p99 of the pair exists, and
                // a sum of the two p99s would overstate it. The probe's is the baseline.
                figures.set_f64(format!("fio_{key}_mb_per_s"), fio.bytes_per_s / 1e6);
                figures.set_f64(format!("fio_{key}_writes_per_s"), fio.writes_per_s);
                figures.set_f64(format!("fio_{key}_write_p50_us"), fio.write_p50_us);
                figures.set_f64(format!("fio_{key}_write_p99_us"), fio.write_p99_us);
                figures.set_f64(format!("fio_{key}_sync_p50_us"), fio.sync_p50_us);
                figures.set_f64(format!("fio_{key}_sync_p99_us"), fio.sync_p99_us);
                figures.set_f64(format!("wal_{key}_throughput_vs_fio_ratio"), payload_bytes_per_s / fio.bytes_per_s);
                // Against the larger of fio's two p99s: a pair's p99 is at least that, so the
                // ratio is an upper bound of the one against fio's (unmeasured) pair p99.
                figures.set_f64(
                    format!("wal_{key}_p99_vs_fio_ratio"),
                    p99 / fio.write_p99_us.max(fio.sync_p99_us).max(1.0),
                );
                row.push_str(&format!(
                    " | {:>9.1} {:>9.0} {:>9.0} | {:>6.2}",
                    fio.bytes_per_s / 1e6,
                    fio.write_p99_us,
                    fio.sync_p99_us,
                    payload_bytes_per_s / fio.bytes_per_s,
                ));
            }
            row.push_str(&format!(" | {:>3}/{:<3}", cell.rotations, cell.reused_segments));
            rows.push(row);
        }
    }
    if let Some(value) = figures.get_f64("wal_128b_256_records_per_s") {
        figures.set_f64("records_per_s_128b_256", value);
    }
    for (cell, headline) in [
        ("wal_4096b_256_throughput_vs_probe_ratio", "throughput_vs_probe_ratio"),
        ("wal_4096b_256_p99_vs_probe_ratio", "p99_vs_probe_ratio"),
        ("wal_4096b_256_throughput_vs_fio_ratio", "throughput_vs_fio_ratio"),
        ("wal_4096b_256_p99_vs_fio_ratio", "p99_vs_fio_ratio"),
    ] {
        if let Some(value) = figures.get_f64(cell) {
            figures.set_f64(headline, value);
        }
    }
    if args.json {
        println!("{}", figures.to_json());
        return Ok(());
    }
    println!("bench wal: one shard, {} ms per cell, dir {}", args.duration_ms, dir.display());
    println!("latencies in us, throughput of payload in MB/s; peers write blocks of the WAL's mean batch size");
    println!("probe: each O_DIRECT write + fdatasync timed together; fio: write and fdatasync p99 timed apart");
    println!(
        "segments released every {} ms (0: never); rot/reused: rotations while measured, onto released segments",
        args.release_every_ms
    );
    let mut header = String::from(
        "   record  appd |   records/s      MB/s       p50       p99     p99.9  batch B   | probe MB/s probe p99 | thr/pr p99/pr",
    );
    if use_fio {
        header.push_str(" |  fio MB/s fio wr p99 fio sy p99 | thr/fio");
    }
    header.push_str(" | rot/reused");
    println!("{header}");
    for row in rows {
        println!("{row}");
    }
    for key in [
        "records_per_s_128b_256",
        "throughput_vs_probe_ratio",
        "p99_vs_probe_ratio",
        "throughput_vs_fio_ratio",
        "p99_vs_fio_ratio",
    ] {
        if let Some(value) = figures.get_f64(key) {
            println!("{key} = {value}");
        }
    }
    Ok(())
}
