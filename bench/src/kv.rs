//! `bench kv`: durable puts and gets against a `dataplane` process through the `client` crate,
//! for several value sizes and numbers of concurrent clients, each cell followed in the same
//! run by `redis-server` (AOF fsynced before every reply) under `redis-benchmark` at the same
//! value size and concurrency.
//!
//! Every simulated client is its own [`client::Client`] (its own connections) with one request
//! outstanding, as redis-benchmark's `-c N`: send, await the reply, record, repeat.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use client::{Client, ClientConfig};
use hdrhistogram::Histogram;

use crate::process::RunDir;
use crate::redis::{self, PeerRun, Redis};
use crate::report::{Figures, percentile_us};
use testkit::process::{ChildGuard, cpu_time};

/// Values above this size are chunked by the dataplane (its default `inline_bytes_max`); each
/// client then cycles through [`LARGE_VALUE_KEYS_PER_CLIENT`] keys.
const LARGE_VALUE_BYTES: usize = 64 << 10;
/// Keys each client cycles through for large values.
const LARGE_VALUE_KEYS_PER_CLIENT: u64 = 64;
/// Every this many bytes of a value, a put writes its unique tag (see [`stamp`]).
const TAG_INTERVAL_BYTES: usize = 64 << 10;
/// Largest value size accepted (the dataplane's default `value_bytes_max`).
const VALUE_BYTES_MAX: usize = 60 << 20;
/// Most simulated clients in one cell.
const CLIENTS_MAX: usize = 4096;
/// Most value bytes in flight at once (clients × value size), to stay well inside RAM.
const IN_FLIGHT_BYTES_MAX: usize = 4 << 30;
/// Longest wait for the dataplane's READY line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the dataplane to checkpoint and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(300);
/// The clients of the headline figures and of the target.
const TARGET_CLIENTS: usize = 256;
/// The value size of the headline figures.
const HEADLINE_VALUE_BYTES: usize = 128;

#[derive(Args, Debug)]
pub struct KvArgs {
    /// Measured time of each phase (puts, then gets) per cell, after warm-up. Redis runs as
    /// many requests as its calibrated rate completes in the same time.
    #[arg(long, default_value_t = 3000)]
    duration_ms: u64,
    /// Warm-up time of each phase per cell (not measured).
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
    /// Value sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "128,1048576")]
    sizes: Vec<usize>,
    /// Numbers of concurrent clients, each with one request outstanding.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    clients: Vec<usize>,
    /// Dataplane shards (default: one per CPU but one, which the load generator uses: the
    /// Redis peer likewise serves from one thread while redis-benchmark takes another core).
    #[arg(long)]
    shards: Option<usize>,
    /// Parent of the run's fresh directory (dataplane data, Redis AOF, logs); must be on the
    /// file system under test. Removed after the run unless --keep-data.
    #[arg(long, default_value = "bench-data")]
    data_dir: PathBuf,
    /// The dataplane binary (default: `dataplane` next to this bench binary).
    #[arg(long)]
    dataplane: Option<PathBuf>,
    /// Worker threads of the bench's client runtime (redis-benchmark uses one thread).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Skip Redis (ratios are then absent).
    #[arg(long)]
    skip_redis: bool,
    /// Keep the run's directory (data and logs) instead of removing it.
    #[arg(long)]
    keep_data: bool,
    /// Print one JSON object with every figure instead of the table.
    #[arg(long)]
    json: bool,
}

/// A running dataplane, killed if dropped without [`Dataplane::stop`].
#[derive(Debug)]
pub(crate) struct Dataplane {
    pub(crate) process: ChildGuard,
    pub(crate) addresses: Vec<String>,
}

impl Dataplane {
    /// Starts `binary` on a fresh `data_dir` with `shards` shards on dynamic ports, its stderr
    /// to `log`, and waits for its `READY addr,addr,...` line.
    pub(crate) fn start(binary: &Path, data_dir: &Path, shards: usize, log: &Path) -> Result<Self> {
        Self::start_with(binary, data_dir, shards, log, None)
    }

    /// [`Dataplane::start`] with a configuration file (flags still set the data directory,
    /// listen address and shard count).
    pub(crate) fn start_with(
        binary: &Path,
        data_dir: &Path,
        shards: usize,
        log: &Path,
        config: Option<&Path>,
    ) -> Result<Self> {
        Self::start_at(binary, data_dir, shards, log, config, "127.0.0.1:0")
    }

    /// [`Dataplane::start_with`] listening at `listen` (shard k on its port + k), its log
    /// appended to, in a process group of its own (a terminal's Ctrl-C reaches only the bench,
    /// which then stops it).
    pub(crate) fn start_at(
        binary: &Path,
        data_dir: &Path,
        shards: usize,
        log: &Path,
        config: Option<&Path>,
        listen: &str,
    ) -> Result<Self> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut command = Command::new(binary);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen, "--shards", &shards.to_string()])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("dataplane stdout")?;
        let mut process = ChildGuard::new("dataplane", child, log.to_path_buf());
        // A thread drains stdout for the life of the process, handing each line over.
        let (lines, receiver) = mpsc::channel();
        std::thread::Builder::new().name("dataplane-stdout".into()).spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines.send(line);
            }
        })?;
        let started = Instant::now();
        loop {
            match receiver.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(list) = line.strip_prefix("READY ") {
                        let addresses: Vec<String> = list.split(',').map(str::to_string).collect();
                        ensure!(
                            addresses.len() == shards,
                            "dataplane READY with {} addresses: {line}",
                            addresses.len()
                        );
                        return Ok(Self { process, addresses });
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => process.check_running()?,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    process.check_running()?;
                    bail!("dataplane closed its stdout without READY {}", process.log_tail());
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!("dataplane not READY within {} s {}", READY_TIMEOUT.as_secs(), process.log_tail());
            }
        }
    }

    /// SIGTERM: the dataplane checkpoints every shard and must exit 0.
    pub(crate) fn stop(self) -> Result<()> {
        let tail = self.process.log_tail();
        let status = self.process.terminate(STOP_TIMEOUT)?;
        ensure!(status.success(), "dataplane exited with {status} after SIGTERM {tail}");
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Put,
    Get,
}

/// The closed-loop load of one phase.
#[derive(Debug, Clone, Copy)]
struct Load {
    operation: Operation,
    value_bytes: usize,
    warmup: Duration,
    duration: Duration,
    /// The dataplane's pid, to measure its CPU time.
    server_pid: u32,
}

/// What one phase measured, over the measured window only.
#[derive(Debug)]
struct PhaseResult {
    ops: u64,
    elapsed_s: f64,
    latency: Histogram<u64>,
    /// CPU time of the dataplane and of this bench (the clients) in the measured window.
    server_cpu: Duration,
    client_cpu: Duration,
    /// Operations each client completed, warm-up included (puts: how many keys it wrote).
    issued: Vec<u64>,
}

impl PhaseResult {
    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.elapsed_s
    }

    fn cpu_us_per_op(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.ops.max(1) as f64
    }
}

/// One shard per CPU but one (at least one): the load generator runs on the same machine.
fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get).saturating_sub(1).max(1)
}

/// How many distinct keys each of `clients` clients cycles through for `value_bytes`. Small
/// values share the Redis peer's keyspace ([`redis::keyspace`], 100 000 keys at 128 B), split
/// between the clients, so both stores index the same number of keys.
fn keys_per_client(value_bytes: usize, clients: usize) -> u64 {
    if value_bytes > LARGE_VALUE_BYTES {
        LARGE_VALUE_KEYS_PER_CLIENT
    } else {
        redis::keyspace(value_bytes).div_ceil(clients.max(1) as u64)
    }
}

fn key(cell: &str, client: usize, index: u64) -> Vec<u8> {
    format!("{cell}-{client}-{index}").into_bytes()
}

/// Makes `value` unlike any other value of the run: the dataplane stores large values as
/// content-addressed chunks written once, so repeating one value would measure deduplication
/// instead of durable writes. Writes `tag` (16 bytes: client and put number, run and cell) at
/// every [`TAG_INTERVAL_BYTES`], which covers every chunk whatever the chunk size.
fn stamp(value: &mut [u8], tag: [u8; 16]) {
    for piece in value.chunks_mut(TAG_INTERVAL_BYTES) {
        let length = piece.len().min(tag.len());
        piece[..length].copy_from_slice(&tag[..length]);
    }
}

/// The tag of put number `put` of `client` in the cell whose tags start with `cell_tag`.
fn tag(cell_tag: u64, client: usize, put: u64) -> [u8; 16] {
    let mut tag = [0; 16];
    // The put-specific half first: a piece shorter than the tag still differs.
    tag[..8].copy_from_slice(&(((client as u64) << 40) ^ put).to_le_bytes());
    tag[8..].copy_from_slice(&cell_tag.to_le_bytes());
    tag
}

/// A tag prefix unique to this run (clock, pid) and cell (FNV-1a of its name).
fn cell_tag(cell: &str) -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let nanos = since.as_secs().wrapping_mul(1_000_000_000) ^ u64::from(since.subsec_nanos());
    let mut hash = 0xcbf2_9ce4_8422_2325_u64 ^ nanos ^ (u64::from(std::process::id()) << 32);
    for byte in cell.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Runs `load` on every client until the measured window ends. For gets, `written[c]` is how
/// many keys client `c` wrote in the put phase; each get reads one of them at random.
async fn run_phase(clients: &[Client], cell: &str, load: Load, written: &[u64]) -> Result<PhaseResult> {
    // 0: warm-up, 1: measuring, 2: stop.
    let phase = Arc::new(AtomicU8::new(0));
    let value: Arc<[u8]> =
        (0..load.value_bytes).map(|index| u8::try_from(index % 251).unwrap_or(0)).collect::<Vec<_>>().into();
    let cell_tag = cell_tag(cell);
    let key_cycle = keys_per_client(load.value_bytes, clients.len());
    let mut tasks = tokio::task::JoinSet::new();
    for (index, client) in clients.iter().enumerate() {
        let (client, phase, value, cell) = (client.clone(), Arc::clone(&phase), Arc::clone(&value), cell.to_string());
        let available = written.get(index).copied().unwrap_or(0).min(key_cycle);
        if load.operation == Operation::Get && available == 0 {
            bail!("client {index} wrote no key in the put phase of {cell}");
        }
        tasks.spawn(async move {
            let mut value = value.to_vec();
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
            let (mut ops, mut issued) = (0_u64, 0_u64);
            // xorshift64: which written key each get reads; seeded per client, never zero.
            let mut random = 0x9E37_79B9_7F4A_7C15_u64 ^ (index as u64 + 1);
            while phase.load(Ordering::Relaxed) < 2 {
                let begin = Instant::now();
                match load.operation {
                    Operation::Put => {
                        stamp(&mut value, tag(cell_tag, index, issued));
                        client.put(&key(&cell, index, issued % key_cycle), &value).await?;
                    }
                    Operation::Get => {
                        random ^= random << 13;
                        random ^= random >> 7;
                        random ^= random << 17;
                        let key = key(&cell, index, random % available);
                        let found = client.get(&key, None).await?;
                        let found =
                            found.with_context(|| format!("get {}: not found", String::from_utf8_lossy(&key)))?;
                        ensure!(
                            found.value.len() == load.value_bytes,
                            "get {}: {} bytes, wrote {}",
                            String::from_utf8_lossy(&key),
                            found.value.len(),
                            load.value_bytes
                        );
                    }
                }
                if phase.load(Ordering::Relaxed) == 1 {
                    let nanos = u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    latency.record(nanos.max(1))?;
                    ops += 1;
                }
                issued += 1;
            }
            Ok::<_, anyhow::Error>((index, latency, ops, issued))
        });
    }
    tokio::time::sleep(load.warmup).await;
    let cpu = || Ok::<_, anyhow::Error>((cpu_time(load.server_pid)?, cpu_time(std::process::id())?));
    let cpu_before = cpu()?;
    phase.store(1, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(load.duration).await;
    phase.store(2, Ordering::Relaxed);
    let elapsed_s = started.elapsed().as_secs_f64();
    let cpu_after = cpu()?;
    let mut result = PhaseResult {
        ops: 0,
        elapsed_s,
        latency: Histogram::new_with_bounds(1, 60_000_000_000, 3)?,
        server_cpu: cpu_after.0.saturating_sub(cpu_before.0),
        client_cpu: cpu_after.1.saturating_sub(cpu_before.1),
        issued: vec![0; clients.len()],
    };
    while let Some(joined) = tasks.join_next().await {
        let (index, latency, ops, issued) = joined??;
        result.latency.add(&latency)?;
        result.ops += ops;
        result.issued[index] = issued;
    }
    Ok(result)
}

/// One cell of our side: `clients` fresh clients, a put phase, then a get phase.
async fn our_cell(
    dataplane: &Dataplane,
    cell: &str,
    value_bytes: usize,
    clients: usize,
    args: &KvArgs,
) -> Result<[PhaseResult; 2]> {
    let seed = &dataplane.addresses[0];
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let seed = seed.to_string();
        connecting.spawn(async move { Client::connect(&seed, ClientConfig::default()).await });
    }
    let mut connected = Vec::with_capacity(clients);
    while let Some(joined) = connecting.join_next().await {
        connected.push(joined?.with_context(|| format!("connecting to the dataplane at {seed}"))?);
    }
    let (warmup, duration) = (Duration::from_millis(args.warmup_ms), Duration::from_millis(args.duration_ms));
    let put = Load { operation: Operation::Put, value_bytes, warmup, duration, server_pid: dataplane.process.id() };
    let puts = run_phase(&connected, cell, put, &[]).await?;
    let get = Load { operation: Operation::Get, ..put };
    let gets = run_phase(&connected, cell, get, &puts.issued).await?;
    Ok([puts, gets])
}

/// `128b`, `4kib`, `1mib`: the value size in figure keys.
fn size_key(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}mib", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{}kib", bytes >> 10)
    } else {
        format!("{bytes}b")
    }
}

/// `128 B`, `4 KiB`, `1 MiB`: the value size for people.
fn size_text(bytes: usize) -> String {
    let key = size_key(bytes);
    let split = key.find(|character: char| !character.is_ascii_digit()).unwrap_or(key.len());
    let unit = match &key[split..] {
        "mib" => "MiB",
        "kib" => "KiB",
        _ => "B",
    };
    format!("{} {unit}", &key[..split])
}

pub(crate) fn dataplane_binary(explicit: Option<&PathBuf>) -> Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("locating the bench binary")?
            .parent()
            .context("bench binary has no directory")?
            .join("dataplane"),
    };
    if !path.is_file() {
        bail!(
            "dataplane binary not found at {}: build it with `cargo build --release -p dataplane` (or pass --dataplane PATH)",
            path.display()
        );
    }
    Ok(path)
}

/// Bytes of the regular files under `path`.
fn disk_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => disk_bytes(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map_or(0, |metadata| metadata.len()),
            _ => 0,
        })
        .sum()
}

fn check_args(args: &KvArgs) -> Result<()> {
    ensure!(!args.sizes.is_empty() && !args.clients.is_empty(), "--sizes and --clients need at least one value each");
    if let Some(size) = args.sizes.iter().find(|size| **size == 0 || **size > VALUE_BYTES_MAX) {
        bail!("--sizes: {size} is outside 1..={VALUE_BYTES_MAX}");
    }
    if let Some(count) = args.clients.iter().find(|count| **count == 0 || **count > CLIENTS_MAX) {
        bail!("--clients: {count} is outside 1..={CLIENTS_MAX}");
    }
    let size_max = args.sizes.iter().max().copied().unwrap_or(0);
    let clients_max = args.clients.iter().max().copied().unwrap_or(0);
    ensure!(
        size_max.saturating_mul(clients_max) <= IN_FLIGHT_BYTES_MAX,
        "{clients_max} clients × {size_max} B values in flight exceed {IN_FLIGHT_BYTES_MAX} B"
    );
    ensure!(args.duration_ms > 0, "--duration-ms must be positive");
    ensure!((1..=64).contains(&args.client_threads), "--client-threads is outside 1..=64");
    if let Some(shards) = args.shards {
        ensure!(shards > 0, "--shards must be positive");
    }
    Ok(())
}

/// One side of a row of the human table.
#[derive(Debug, Clone, Copy)]
struct Side {
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// For Redis, an upper bound.
    p999_us: f64,
    server_cpu_us_per_op: f64,
}

/// One row of the human table.
#[derive(Debug)]
struct Row {
    operation: &'static str,
    value_bytes: usize,
    clients: usize,
    ours: Side,
    redis: Option<Side>,
}

pub fn run(args: &KvArgs) -> Result<()> {
    check_args(args)?;
    let binary = dataplane_binary(args.dataplane.as_ref())?;
    let use_redis = !args.skip_redis;
    if use_redis && !redis::available() {
        bail!(
            "redis-server, redis-cli or redis-benchmark is missing: `scripts/install-deps.sh bench`, or pass --skip-redis"
        );
    }
    let shards = args.shards.unwrap_or_else(default_shards);
    // Dropped last: the processes below are stopped or killed before their files go.
    let run_dir = RunDir::create(&args.data_dir, "kv", args.keep_data)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .thread_name("bench-kv-client")
        .enable_all()
        .build()
        .context("building the client runtime")?;
    let dataplane_dir = run_dir.path().join("dataplane");
    let mut dataplane = Dataplane::start(&binary, &dataplane_dir, shards, &run_dir.path().join("dataplane.log"))?;
    let redis_dir = run_dir.path().join("redis");
    let redis = if use_redis { Some(Redis::start(&redis_dir, &run_dir.path().join("redis.log"))?) } else { None };

    let duration = Duration::from_millis(args.duration_ms);
    let mut figures = Figures::default();
    figures.set("bench", "kv");
    figures.set("data_dir", run_dir.path().display().to_string());
    figures.set("shards", shards);
    figures.set("client_threads", args.client_threads);
    figures.set("phase_duration_ms", args.duration_ms);
    figures.set("warmup_ms", args.warmup_ms);
    if let Some(redis) = &redis {
        figures.set("redis_version", redis.version());
        figures.set("redis_options", redis::server_options_text());
    }
    let mut rows = Vec::new();
    for &value_bytes in &args.sizes {
        let size = size_key(value_bytes);
        let redis_keys = redis::keyspace(value_bytes);
        if let Some(redis) = &redis {
            eprintln!("bench kv: {} values: writing Redis's {redis_keys} keys ...", size_text(value_bytes));
            redis.populate(value_bytes, redis_keys)?;
            figures.set(format!("redis_{size}_keys"), redis_keys);
        }
        for &clients in &args.clients {
            let cell = format!("{size}_c{clients}");
            eprintln!("bench kv: {} values, {clients} clients: dataplane puts, gets ...", size_text(value_bytes));
            // Redis's AOF rewrite would share the disk with our cell: wait for it, then stop
            // redis-server while our cell runs.
            let paused = match &redis {
                Some(redis) => {
                    redis.wait_idle()?;
                    crate::device::quiesce();
                    Some(redis.pause()?)
                }
                None => {
                    crate::device::quiesce();
                    None
                }
            };
            let [puts, gets] = match runtime.block_on(our_cell(&dataplane, &cell, value_bytes, clients, args)) {
                Ok(phases) => phases,
                Err(error) => {
                    // A lost connection is usually the dataplane's death: say so, with its log.
                    dataplane.process.check_running()?;
                    return Err(error);
                }
            };
            drop(paused);
            let mut ours = Vec::new();
            for (operation, result) in [("put", &puts), ("get", &gets)] {
                let side = Side {
                    ops_per_s: result.ops_per_s(),
                    p50_us: percentile_us(&result.latency, 50.0),
                    p99_us: percentile_us(&result.latency, 99.0),
                    p999_us: percentile_us(&result.latency, 99.9),
                    server_cpu_us_per_op: result.cpu_us_per_op(result.server_cpu),
                };
                let prefix = format!("{operation}_{cell}");
                figures.set_f64(format!("{prefix}_ops_per_s"), side.ops_per_s);
                figures.set_f64(format!("{prefix}_value_mb_per_s"), side.ops_per_s * value_bytes as f64 / 1e6);
                figures.set_f64(format!("{prefix}_mean_us"), result.latency.mean() / 1000.0);
                figures.set_f64(format!("{prefix}_p50_us"), side.p50_us);
                figures.set_f64(format!("{prefix}_p99_us"), side.p99_us);
                figures.set_f64(format!("{prefix}_p999_us"), side.p999_us);
                figures.set_f64(format!("{prefix}_server_cpu_us_per_op"), side.server_cpu_us_per_op);
                figures.set_f64(format!("{prefix}_client_cpu_us_per_op"), result.cpu_us_per_op(result.client_cpu));
                ours.push(side);
            }
            let mut peers: [Option<PeerRun>; 2] = [None, None];
            if let Some(redis) = &redis {
                // Our node's leftover work (a checkpoint, a segment being zero-filled, files
                // being deleted) would share the machine with the peer: wait for it to end,
                // then stop the node while the peer runs.
                let waited = dataplane.process.wait_idle()?;
                figures.set_f64(format!("dataplane_{cell}_idle_wait_ms"), waited.as_secs_f64() * 1000.0);
                crate::device::quiesce();
                let _paused = dataplane.process.pause()?;
                eprintln!(
                    "bench kv: {} values, {clients} clients: redis-benchmark set, get ...",
                    size_text(value_bytes)
                );
                let set = redis.benchmark("set", value_bytes, clients, redis_keys, duration)?;
                let misses = redis.stat("keyspace_misses")?;
                let get = redis.benchmark("get", value_bytes, clients, redis_keys, duration)?;
                let missed = redis.stat("keyspace_misses")? - misses;
                ensure!(missed == 0, "{missed} redis-benchmark GETs missed: its keys are not the ones populated");
                peers = [Some(set), Some(get)];
            }
            for (index, (operation, peer_operation)) in [("put", "set"), ("get", "get")].into_iter().enumerate() {
                let redis_figures = peers[index].map(|run| {
                    let peer = run.measured;
                    let prefix = format!("redis_{peer_operation}_{cell}");
                    figures.set(format!("{prefix}_requests"), peer.requests);
                    figures.set_f64(format!("{prefix}_ops_per_s"), peer.requests_per_s);
                    figures.set_f64(format!("{prefix}_value_mb_per_s"), peer.requests_per_s * value_bytes as f64 / 1e6);
                    figures.set_f64(format!("{prefix}_mean_us"), peer.mean_us);
                    figures.set_f64(format!("{prefix}_p50_us"), peer.p50_us);
                    figures.set_f64(format!("{prefix}_p99_us"), peer.p99_us);
                    figures.set_f64(format!("{prefix}_p999_us_max"), peer.p999_us);
                    figures.set_f64(format!("{prefix}_server_cpu_us_per_op"), run.server_cpu_us_per_op);
                    figures.set_f64(format!("{prefix}_client_cpu_us_per_op"), run.client_cpu_us_per_op);
                    let ours = ours[index];
                    figures.set_f64(
                        format!("{operation}_{cell}_throughput_vs_redis_ratio"),
                        ours.ops_per_s / peer.requests_per_s,
                    );
                    figures.set_f64(format!("{operation}_{cell}_p99_vs_redis_ratio"), ours.p99_us / peer.p99_us);
                    Side {
                        ops_per_s: peer.requests_per_s,
                        p50_us: peer.p50_us,
                        p99_us: peer.p99_us,
                        p999_us: peer.p999_us,
                        server_cpu_us_per_op: run.server_cpu_us_per_op,
                    }
                });
                rows.push(Row { operation, value_bytes, clients, ours: ours[index], redis: redis_figures });
            }
            if clients == TARGET_CLIENTS && redis.is_some() {
                let throughput = figures.get_f64(&format!("put_{cell}_throughput_vs_redis_ratio"));
                let p99 = figures.get_f64(&format!("put_{cell}_p99_vs_redis_ratio"));
                if let (Some(throughput), Some(p99)) = (throughput, p99) {
                    figures.set(format!("put_{cell}_target_met"), throughput > 1.0 && p99 < 1.0);
                }
            }
        }
    }
    let headline = format!("{}_c{TARGET_CLIENTS}", size_key(HEADLINE_VALUE_BYTES));
    for (from, to) in [
        (format!("put_{headline}_p99_vs_redis_ratio"), "put_p99_vs_redis_ratio"),
        (format!("put_{headline}_throughput_vs_redis_ratio"), "put_throughput_vs_redis_ratio"),
    ] {
        if let Some(value) = figures.get_f64(&from) {
            figures.set_f64(to, value);
        }
    }

    eprintln!("bench kv: stopping the dataplane (checkpoint) ...");
    figures.set("dataplane_disk_bytes", disk_bytes(&dataplane_dir));
    figures.set("redis_disk_bytes", disk_bytes(&redis_dir));
    dataplane.stop()?;
    if let Some(redis) = redis {
        redis.stop()?;
    }
    drop(runtime);

    if args.json {
        println!("{}", figures.to_json());
        return Ok(());
    }
    print_table(args, shards, &figures, &rows);
    Ok(())
}

fn print_table(args: &KvArgs, shards: usize, figures: &Figures, rows: &[Row]) {
    let peer = figures
        .get("redis_version")
        .and_then(|version| version.as_str())
        .map_or("no Redis (--skip-redis)".to_string(), |version| {
            format!("redis-server {version} ({})", redis::server_options_text())
        });
    println!(
        "bench kv: dataplane ({shards} shards, acks after fdatasync) vs {peer}; {} ms per phase after {} ms warm-up",
        args.duration_ms, args.warmup_ms
    );
    println!("ops/s; latencies in us (closed loop, one request outstanding per client; Redis p99.9 an upper bound);");
    println!("cpu: the server's CPU time per operation in us (user + system, all threads)");
    println!(
        "op  value    clients |     ours/s      p50      p99    p99.9    cpu |    redis/s      p50      p99  p99.9<=    cpu | thr/redis p99/redis"
    );
    let side = |side: &Side| {
        format!(
            "{:>10.0} {:>8.0} {:>8.0} {:>8.0} {:>6.1}",
            side.ops_per_s, side.p50_us, side.p99_us, side.p999_us, side.server_cpu_us_per_op
        )
    };
    for row in rows {
        let mut line =
            format!("{:<3} {:>8} {:>7} | {}", row.operation, size_text(row.value_bytes), row.clients, side(&row.ours));
        if let Some(redis) = &row.redis {
            line.push_str(&format!(
                " | {} | {:>9.2} {:>9.2}",
                side(redis),
                row.ours.ops_per_s / redis.ops_per_s,
                row.ours.p99_us / redis.p99_us
            ));
        }
        println!("{line}");
    }
    let mut verdicts = Vec::new();
    for &value_bytes in &args.sizes {
        let cell = format!("{}_c{TARGET_CLIENTS}", size_key(value_bytes));
        let met = figures.get(&format!("put_{cell}_target_met")).and_then(|value| value.as_bool());
        let throughput = figures.get_f64(&format!("put_{cell}_throughput_vs_redis_ratio"));
        let p99 = figures.get_f64(&format!("put_{cell}_p99_vs_redis_ratio"));
        if let (Some(met), Some(throughput), Some(p99)) = (met, throughput, p99) {
            verdicts.push(format!(
                "{}: {} (throughput {throughput:.2}x, p99 {p99:.2}x)",
                size_text(value_bytes),
                if met { "met" } else { "NOT met" }
            ));
        }
    }
    if verdicts.is_empty() {
        println!("target (durable puts at {TARGET_CLIENTS} clients ahead of Redis): not measured in this run");
    } else {
        println!(
            "target (durable puts at {TARGET_CLIENTS} clients: throughput > 1x Redis, p99 < 1x Redis): {}",
            verdicts.join("; ")
        );
    }
    for key in ["put_p99_vs_redis_ratio", "put_throughput_vs_redis_ratio"] {
        if let Some(value) = figures.get_f64(key) {
            println!("{key} = {value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_names() {
        assert_eq!(size_key(128), "128b");
        assert_eq!(size_key(4096), "4kib");
        assert_eq!(size_key(1 << 20), "1mib");
        assert_eq!(size_key(1000), "1000b");
        assert_eq!(size_text(128), "128 B");
        assert_eq!(size_text(65536), "64 KiB");
        assert_eq!(size_text(1 << 20), "1 MiB");
    }

    #[test]
    fn every_put_of_a_run_stamps_every_chunk_differently() {
        let mut first = vec![7_u8; 3 * TAG_INTERVAL_BYTES + 5];
        let mut second = first.clone();
        stamp(&mut first, tag(1, 0, 0));
        stamp(&mut second, tag(1, 0, 1));
        for (a, b) in first.chunks(TAG_INTERVAL_BYTES).zip(second.chunks(TAG_INTERVAL_BYTES)) {
            assert_ne!(a, b);
        }
        assert_ne!(tag(1, 1, 0), tag(1, 0, 1));
        let mut tiny = vec![0_u8; 3];
        stamp(&mut tiny, tag(u64::MAX, 0, 0x0201));
        assert_eq!(tiny, [1, 2, 0]);
    }

    #[test]
    fn large_values_cycle_through_a_bounded_keyspace() {
        assert_eq!(keys_per_client(128, 256), 391);
        assert_eq!(keys_per_client(128, 1), 100_000);
        assert_eq!(keys_per_client(64 << 10, 16), 256);
        assert_eq!(keys_per_client(1 << 20, 256), LARGE_VALUE_KEYS_PER_CLIENT);
    }
}
