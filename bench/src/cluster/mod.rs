//! `bench cluster`: the main job. On this machine, with embedded defaults: a 3-node control
//! plane (`controlplane` processes, Raft, GLTS), three regions `a`, `b`, `c` of one `dataplane`
//! each (joined to the control plane; by default `a` the home of every shard, `b` and `c`
//! replicas; `--homes a,b,c` spreads the shards' homes, each node then taking the writes of its
//! shards and replicating the others), the WAN proxy on every QUIC link between regions, the
//! device limit measured by fio first, then an open-loop workload (each write sent to its
//! shard's home) with live progress, scenario events (partitions, SIGKILLed
//! nodes), a convergence and loss check in every region, and a report folder: `report.json`,
//! `report.md`, SVG and PNG plots, CSV series, logs and data. Everything started is stopped,
//! also on Ctrl-C (children run in their own process groups, so the terminal's SIGINT reaches
//! only this process, which then stops them in order).

mod archive;
mod load;
mod plot;
mod report;
mod scenario;
mod snapshots;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, FromArgMatches};
use client::{Client, ClientConfig, ReplicationStatus};
use controlapi::meta::{Command, NodeState};
use hdrhistogram::Histogram;
use testkit::LocalCluster;
use wan::{LinkConfig, Proxy, ProxyHandle};

use crate::geo::{for_each_key, region_config, wait_resolved};
use crate::kv::{Dataplane, dataplane_binary};
use crate::lag::LagSampler;
use crate::process::WanThread;
use load::{LoadPlan, Record, SharedRecord, Write};
use scenario::{Class, Mix, REGIONS, Window};

/// Options of `bench cluster`. Times count from the start of the load (warm-up included).
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Measured time of the load, after the warm-up (e.g. 60s, 2m).
    #[arg(long, default_value = "60s", value_parser = scenario::parse_duration)]
    duration: Duration,
    /// Warm-up: load on, not measured.
    #[arg(long, default_value = "2s", value_parser = scenario::parse_duration)]
    warmup: Duration,
    /// Writes per second, each sent to its shard's home region, open loop (latency counts
    /// from each write's intended send time).
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// The mix of writes: `small` (128 B - 4 KiB keys), `files` (4 KiB - 1 MiB), `large`
    /// (--file-min..--file-max, chunked, in parts), `nas` (= files:99.5,large:0.5), or a list
    /// such as `small:90,large:10`.
    #[arg(long, default_value = "small", value_parser = Mix::parse)]
    workload: Mix,
    /// Smallest large file.
    #[arg(long, default_value = "1MiB", value_parser = scenario::parse_bytes)]
    file_min: u64,
    /// Largest large file (at most 1GiB).
    #[arg(long, default_value = "4MiB", value_parser = scenario::parse_bytes)]
    file_max: u64,
    /// Large files are stored as keys of at most this size (64KiB - 32MiB).
    #[arg(long, default_value = "16MiB", value_parser = scenario::parse_bytes)]
    part_size: u64,
    /// One-way delay between regions.
    #[arg(long, default_value = "20ms", value_parser = scenario::parse_duration)]
    delay: Duration,
    /// Jitter added to the delay (uniform, up to this much).
    #[arg(long, default_value = "0ms", value_parser = scenario::parse_duration)]
    jitter: Duration,
    /// Fraction of datagrams lost between regions, each way (0 to 0.5).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Cut a region off from the others for a while: REGION@START+LENGTH, e.g. c@30s+20s.
    /// Repeatable.
    #[arg(long = "partition", value_parser = scenario::parse_partition)]
    partitions: Vec<Window>,
    /// SIGKILL a region's data node and restart it on its data later: REGION@START[+DOWN],
    /// e.g. b@40s+5s (down 5 s by default). Repeatable.
    #[arg(long = "kill-node", value_parser = scenario::parse_kill)]
    kills: Vec<Window>,
    /// Shards per data node.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// The home regions of the shards in turn (shard k is homed at the k-th, modulo the
    /// list), written to the control plane's placement; e.g. `a,b,c` with `--shards 3` gives
    /// every region one shard to take writes for and two to replicate.
    #[arg(long, value_delimiter = ',', default_value = "a")]
    pub homes: Vec<String>,
    /// Take a global snapshot this often while the load runs (0s: none) and report how long
    /// each region took to read it (request to readable).
    #[arg(long, default_value = "500ms", value_parser = scenario::parse_duration)]
    pub snapshot_every: Duration,
    /// Chain writers next to the load (0: none): each writes `chain/<w>/<n>` one at a time,
    /// each value naming the previous key; every compared snapshot must be a causally closed
    /// cut of them (`snapshot_causal_violations`).
    #[arg(long, default_value_t = 6)]
    pub chains: usize,
    /// After an event ends, the region counts as recovered once its lag is back under this.
    #[arg(long, default_value = "100ms", value_parser = scenario::parse_duration)]
    recovered_lag: Duration,
    #[command(flatten)]
    paths: RunPaths,
    /// Skip the device-limit measurement (the write+fdatasync probe and fio beside it), e.g.
    /// where fio is not installed.
    #[arg(long)]
    skip_fio: bool,
    /// Seed of the workload's draws (classes, sizes).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print report.json's object on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

/// The largest file the workload writes.
const FILE_MAX: u64 = 1 << 30;
/// How long the cluster may take to become healthy.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the replicas may take to resolve past the last write after the load.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);
/// How often each replica's lag is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// Acknowledged writes read back and compared byte for byte, per region.
const VERIFY_PER_REGION: usize = 64;
/// The device-limit measurement: the block size and run time of the probe and of fio.
const DEVICE_BLOCK_BYTES: u64 = 4096;
const DEVICE_TIME: Duration = Duration::from_secs(3);

impl ClusterArgs {
    fn total(&self) -> Duration {
        self.warmup + self.duration
    }

    /// The home region of `shard`.
    fn home_of(&self, shard: usize) -> &str {
        &self.homes[shard % self.homes.len()]
    }

    /// The regions that replicate a shard homed elsewhere (whose lag is the RPO), in order.
    pub fn replica_regions(&self) -> Vec<&'static str> {
        REGIONS.into_iter().filter(|region| (0..self.shards).any(|shard| self.home_of(shard) != *region)).collect()
    }

    /// Whether `region` is the home of some shard.
    fn is_home(&self, region: &str) -> bool {
        self.homes.iter().any(|home| home == region)
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.rate > 0, "--rate must be positive");
        ensure!(!self.duration.is_zero(), "--duration must be positive");
        ensure!(self.shards > 0 && self.shards <= 64, "--shards must be 1..=64");
        for home in &self.homes {
            ensure!(REGIONS.contains(&home.as_str()), "--homes: `{home}` is not one of the regions a, b, c");
        }
        ensure!(
            !self.homes.is_empty() && self.homes.len() <= self.shards,
            "--homes names {} regions but there are {} shards: each home needs a shard",
            self.homes.len(),
            self.shards
        );
        ensure!(
            self.file_min > 0 && self.file_min <= self.file_max && self.file_max <= FILE_MAX,
            "--file-min and --file-max must satisfy 0 < min <= max <= 1GiB"
        );
        ensure!((64 << 10..=32 << 20).contains(&self.part_size), "--part-size must be 64KiB..=32MiB");
        ensure!((0.0..=0.5).contains(&self.loss), "--loss must be a fraction in 0..=0.5");
        ensure!(
            self.snapshot_every.is_zero() || self.snapshot_every >= Duration::from_millis(10),
            "--snapshot-every must be 0s (none) or at least 10ms"
        );
        for (what, windows) in [("--partition", &self.partitions), ("--kill-node", &self.kills)] {
            for window in windows {
                ensure!(
                    window.end() <= self.total(),
                    "{what} {}@{:?}+{:?} ends after the load ({:?} with the warm-up)",
                    window.region,
                    window.start,
                    window.length,
                    self.total()
                );
            }
        }
        for (index, kill) in self.kills.iter().enumerate() {
            let overlapping = self.kills[index + 1..]
                .iter()
                .any(|other| other.region == kill.region && other.start < kill.end() && kill.start < other.end());
            ensure!(!overlapping, "--kill-node: two kills of region {} overlap", kill.region);
        }
        Ok(())
    }
}

/// One region's data node: where it lives and, while it runs, its process.
#[derive(Debug)]
struct RegionNode {
    region: &'static str,
    config: PathBuf,
    data: PathBuf,
    log: PathBuf,
    listen: String,
    shards: usize,
    process: Option<Dataplane>,
    /// The replication port, held until the first start so nothing else (a proxy's socket)
    /// takes it meanwhile.
    reserved: Option<std::net::UdpSocket>,
}

impl RegionNode {
    fn start(&mut self, binary: &Path) -> Result<()> {
        drop(self.reserved.take());
        let process = Dataplane::start_at(binary, &self.data, self.shards, &self.log, Some(&self.config), &self.listen)
            .with_context(|| format!("starting region {}'s dataplane", self.region))?;
        self.process = Some(process);
        Ok(())
    }

    /// SIGKILL (dropping the process guard kills and reaps it).
    fn kill(&mut self) {
        drop(self.process.take());
    }

    /// SIGTERM, and the exit status must be 0.
    fn stop(&mut self) -> Result<()> {
        match self.process.take() {
            Some(process) => process.stop(),
            None => Ok(()),
        }
    }
}

type Nodes = Arc<Mutex<Vec<RegionNode>>>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What happened during the run, for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub kind: &'static str,
    pub region: String,
    /// Planned start and end, ms from the start of the load.
    pub start_ms: u64,
    pub end_ms: u64,
    /// When the end took effect (a restarted node is READY), ms from the start of the load.
    pub restored_ms: Option<u64>,
    /// From `restored_ms` until every affected replica's lag was under `--recovered-lag`.
    pub recovery_ms: Option<u64>,
}

/// The lag of one replica region: samples and the current value for the progress line.
#[derive(Debug)]
struct Lag {
    region: &'static str,
    /// Samples after the warm-up, in ns (as `bench geo` records them).
    histogram: Histogram<u64>,
    /// (ms from the start of the load, lag µs).
    series: Vec<(u64, u64)>,
}

/// Where a run keeps its folder and finds the binaries (`bench cluster`, `bench snapshot`).
#[derive(Debug, Clone, Args)]
pub struct RunPaths {
    /// Parent of the run's folder (data, logs, report); the folder is kept.
    #[arg(long, default_value = "bench-data")]
    out: PathBuf,
    /// The dataplane binary (default: next to this bench binary).
    #[arg(long)]
    dataplane: Option<PathBuf>,
    /// The controlplane binary (default: next to this bench binary).
    #[arg(long)]
    controlplane: Option<PathBuf>,
}

/// Options of `bench snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// How long snapshots are taken, under the write load, after the warm-up.
    #[arg(long, default_value = "30s", value_parser = scenario::parse_duration)]
    duration: Duration,
    /// One snapshot this often.
    #[arg(long, default_value = "100ms", value_parser = scenario::parse_duration)]
    every: Duration,
    /// Writes per second at the home region while snapshots are taken (small keys).
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// One-way delay between regions.
    #[arg(long, default_value = "20ms", value_parser = scenario::parse_duration)]
    delay: Duration,
    #[command(flatten)]
    paths: RunPaths,
    /// Size of the data set exported into the archive (next to restic and rsync).
    #[arg(long, default_value = "1GiB", value_parser = scenario::parse_bytes)]
    dataset: u64,
    /// Fraction of the data set's bytes changed before each incremental round.
    #[arg(long, default_value_t = 0.01)]
    change: f64,
    /// Incremental rounds (change, export, restic, rsync), each picking the files it changes
    /// from another starting point; the incremental figures are their medians.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Skip the archive comparison (no restic or rsync needed).
    #[arg(long)]
    skip_archive: bool,
    /// Print report.json's object on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

/// Runs `bench snapshot`: `bench cluster` with a snapshot every `--every` and nothing else
/// going on, whose headline is `availability_p99_ms` (request to readable, worst region).
pub fn run_snapshot(args: &SnapshotArgs) -> Result<()> {
    ensure!(!args.every.is_zero(), "--every must be positive");
    ensure!(args.dataset >= 1 << 20, "--dataset must be at least 1MiB");
    ensure!(args.change > 0.0 && args.change <= 0.5, "--change must be a fraction in (0, 0.5]");
    ensure!((1..=100).contains(&args.rounds), "--rounds must be 1 to 100");
    if !args.skip_archive && !archive::tools_available() {
        bail!("restic or rsync not found: run scripts/install-deps.sh bench, or pass --skip-archive");
    }
    let plan = (!args.skip_archive).then_some(archive::Plan {
        bytes: args.dataset,
        change: args.change,
        rounds: args.rounds,
        seed: 1,
    });
    // `bench cluster`'s defaults, with this bench's load, delay and snapshots.
    let defaults = ClusterArgs::augment_args(clap::Command::new("cluster")).try_get_matches_from(["cluster"])?;
    let mut cluster = ClusterArgs::from_arg_matches(&defaults)?;
    cluster.duration = args.duration;
    cluster.rate = args.rate;
    cluster.delay = args.delay;
    cluster.snapshot_every = args.every;
    cluster.paths = args.paths.clone();
    cluster.skip_fio = true;
    cluster.json = args.json;
    execute(&cluster, "snapshot", plan.as_ref())
}

/// Runs `bench cluster`.
pub fn run(args: &ClusterArgs) -> Result<()> {
    execute(args, "cluster", None)
}

fn execute(args: &ClusterArgs, bench: &str, archive_plan: Option<&archive::Plan>) -> Result<()> {
    args.validate()?;
    let dataplane = dataplane_binary(args.paths.dataplane.as_ref())?;
    let controlplane = crate::control::controlplane_binary(args.paths.controlplane.as_deref())?;
    if !args.skip_fio && !crate::device::fio_available() {
        bail!("fio not found: run scripts/install-deps.sh bench (Debian fio), or pass --skip-fio");
    }
    let dir = create_run_dir(&args.paths.out)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let outcome = runtime.block_on(async {
        let mut report = run_async(args, &dataplane, &controlplane, &dir).await?;
        if let Some(plan) = archive_plan {
            archive::compare(&dir, &dataplane, plan, report.figures_mut()).await?;
        }
        anyhow::Ok(report)
    });
    match outcome {
        Ok(mut report) => {
            report.name(bench)?;
            if args.json {
                println!("{}", report.to_json());
            } else {
                report::print_summary(&report);
                println!("{}", dir.display());
            }
            Ok(())
        }
        Err(error) => Err(error.context(format!("data and logs are in {}", dir.display()))),
    }
}

fn create_run_dir(parent: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let parent = parent.canonicalize().with_context(|| format!("resolving {}", parent.display()))?;
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let dir = parent.join(format!("cluster-{seconds}-{}", std::process::id()));
    for sub in ["logs", "plots", "series"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    Ok(dir)
}

fn say(text: &str) {
    eprintln!("bench cluster: {text}");
}

async fn run_async(args: &ClusterArgs, dataplane: &Path, controlplane: &Path, dir: &Path) -> Result<report::Report> {
    let mut report = report::Report::new(args, dir);
    if !args.skip_fio {
        measure_device(dir, &mut report)?;
    }
    let (control, tls) = start_control_plane(args, controlplane, dir).await?;
    let (wan, links, reserved) = start_wan(args).await?;
    let nodes = start_regions(args, dir, dataplane, &control, &tls, &links, reserved)?;
    let fleet = connect_fleet(args, &nodes).await?;
    wait_healthy(&control, &fleet.replicas).await?;
    say(&format!("healthy; logs in {}", dir.join("logs").display()));
    let mut run = drive_load(args, dataplane, &control, &nodes, &links, &fleet).await?;
    converge(args, &fleet, &mut run).await?;
    say("checking every acknowledged write in every region ...");
    let mut lost = Vec::new();
    for (client, region) in fleet.clients.iter().zip(REGIONS) {
        let missing = count_missing(client, &run.acked, args.part_size).await?;
        let corrupt = verify_sample(client, &run.acked, args.part_size, args.seed).await?;
        lost.push((region, missing, corrupt));
    }
    let snapshot_figures = match &run.taken {
        Some((ids, errors)) => {
            say(&format!(
                "{} snapshots taken; reading the catalog and comparing the last ones in every region ...",
                ids.len()
            ));
            Some(snapshots::collect(control.client(), ids, *errors, &fleet.clients, &run.chain_writes).await?)
        }
        None => None,
    };
    let clean = stop_all(&nodes, control);
    write_report(args, &mut report, &run, &lost, snapshot_figures.as_ref(), clean, &links)?;
    drop(wan);
    Ok(report)
}

/// The device limit on the run's file system: the probe, then fio beside it.
fn measure_device(dir: &Path, report: &mut report::Report) -> Result<()> {
    say(&format!(
        "device limit: {DEVICE_BLOCK_BYTES} B O_DIRECT writes + fdatasync, {DEVICE_TIME:?} each by the probe and fio ..."
    ));
    crate::device::quiesce();
    let probe = crate::device::probe(dir, usize::try_from(DEVICE_BLOCK_BYTES)?, DEVICE_TIME)?;
    crate::device::quiesce();
    let fio = crate::device::fio(dir, DEVICE_BLOCK_BYTES, DEVICE_TIME)?;
    report.device(&probe, &fio);
    Ok(())
}

/// Three control-plane nodes with the regions and every shard's placement written, and the
/// regions' TLS identities (returned: where they are).
async fn start_control_plane(args: &ClusterArgs, controlplane: &Path, dir: &Path) -> Result<(LocalCluster, PathBuf)> {
    say("starting 3 control-plane nodes ...");
    let control_dir = dir.join("control");
    let control = LocalCluster::start(controlplane, &control_dir, 3, &[]).await?;
    control.wait_leader(Duration::from_secs(30)).await?;
    let admin = control.client();
    for region in REGIONS {
        admin
            .write(Command::PutRegion { name: region.into(), zones: vec!["z1".into()] }, Duration::from_secs(10))
            .await?;
    }
    for shard in 0..args.shards {
        let home = args.home_of(shard);
        let replicas = REGIONS.iter().filter(|region| **region != home).map(|region| (*region).to_owned()).collect();
        let command = Command::SetPlacement { shard: u32::try_from(shard)?, home: home.to_owned(), replicas };
        admin.write(command, Duration::from_secs(10)).await?;
    }
    let tls = control_dir.join("tls");
    platform::tls::generate(&tls, &REGIONS.map(str::to_owned))?;
    Ok((control, tls))
}

/// Each region's replication port (held until its node starts) and a proxy on every link a
/// home region's node dials, on the WAN thread.
async fn start_wan(args: &ClusterArgs) -> Result<(WanThread, Vec<WanLink>, Vec<(SocketAddr, std::net::UdpSocket)>)> {
    let link =
        LinkConfig { delay: args.delay, jitter: args.jitter, loss: args.loss, ..LinkConfig::with_delay(args.delay) };
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let mut reserved = Vec::new();
    for _ in REGIONS {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        reserved.push((socket.local_addr()?, socket));
    }
    let wan = WanThread::start()?;
    let mut links = Vec::new();
    for from in REGIONS.into_iter().filter(|region| args.is_home(region)) {
        for (to, (listen, _)) in REGIONS.into_iter().zip(&reserved).filter(|(to, _)| *to != from) {
            let proxy = wan.proxy(any, *listen, link, link, args.seed + links.len() as u64).await?;
            links.push(WanLink { from, to, proxy });
        }
    }
    Ok((wan, links, reserved))
}

/// One data node per region, joined to the control plane, its peers behind the proxies;
/// regions homing no shard first, so the shippers find them listening.
fn start_regions(
    args: &ClusterArgs,
    dir: &Path,
    dataplane: &Path,
    control: &LocalCluster,
    tls: &Path,
    links: &[WanLink],
    reserved: Vec<(SocketAddr, std::net::UdpSocket)>,
) -> Result<Nodes> {
    let seeds: Vec<String> = control.members().into_iter().map(|(_, addr)| format!("{addr:?}")).collect();
    let mut nodes = Vec::new();
    for (region, (listen, socket)) in REGIONS.into_iter().zip(reserved) {
        let peers: Vec<(&str, SocketAddr)> =
            links.iter().filter(|link| link.from == region).map(|link| (link.to, link.proxy.addr())).collect();
        let control_section = format!(
            "[control]\nseeds = [{}]\ntls_dir = {tls:?}\nnode_id = \"{region}\"\nregion = \"{region}\"\nzone = \"z1\"\n",
            seeds.join(", ")
        );
        // No `home`: each shard's home comes from the placement written above.
        let config = region_config(dir, tls, region, None, listen, &peers, &control_section)?;
        nodes.push(RegionNode {
            region,
            config,
            data: dir.join(format!("region-{region}")),
            log: dir.join("logs").join(format!("dataplane-{region}.log")),
            listen: format!("127.0.0.1:{}", testkit::ports::consecutive_free_tcp_ports(args.shards)?),
            shards: args.shards,
            process: None,
            reserved: Some(socket),
        });
    }
    say(&format!("starting the data nodes of regions a, b and c (shards homed at {}) ...", args.homes.join(",")));
    let mut order: Vec<usize> = (0..REGIONS.len()).collect();
    order.sort_by_key(|index| args.is_home(REGIONS[*index]));
    for index in order {
        nodes[index].start(dataplane)?;
    }
    Ok(Arc::new(Mutex::new(nodes)))
}

/// The clients of a run: one per region's node, the writer that sends each shard's writes to
/// its home, and the replica regions' (for their lag).
struct Fleet {
    clients: Vec<Client>,
    writer: Client,
    replicas: Vec<(&'static str, Client)>,
}

async fn connect_fleet(args: &ClusterArgs, nodes: &Nodes) -> Result<Fleet> {
    let config = ClientConfig { retries: 0, request_timeout: Duration::from_secs(30), ..ClientConfig::default() };
    let mut clients = Vec::new();
    let listens: Vec<String> = lock(nodes).iter().map(|node| node.listen.clone()).collect();
    for listen in listens {
        clients.push(Client::connect(&listen, config.clone()).await?);
    }
    let client_of = |region: &str| {
        REGIONS.iter().position(|known| *known == region).map(|index| &clients[index]).context("unknown region")
    };
    let homes = (0..args.shards)
        .map(|shard| {
            client_of(args.home_of(shard))?.addresses().get(shard).cloned().context("a region's node has fewer shards")
        })
        .collect::<Result<Vec<String>>>()?;
    let writer = Client::with_addresses(homes, config.clone())?;
    let replicas = args
        .replica_regions()
        .into_iter()
        .map(|region| Ok((region, client_of(region)?.clone())))
        .collect::<Result<Vec<(&'static str, Client)>>>()?;
    Ok(Fleet { clients, writer, replicas })
}

/// What the load phase left: the writes, the events, the snapshots, and the lag samplers
/// still running until the replicas converge.
struct Run {
    record: SharedRecord,
    acked: Vec<Write>,
    last_ts: u64,
    load_ended: Duration,
    interrupted: bool,
    events: Vec<Event>,
    taken: Option<(Vec<u64>, u64)>,
    chain_failures: u64,
    chain_writes: Vec<snapshots::ChainWrite>,
    sampling: Arc<AtomicBool>,
    samplers: Vec<tokio::task::JoinHandle<Lag>>,
    progress: Option<tokio::task::JoinHandle<()>>,
    lags: Vec<Lag>,
    converged_after: Duration,
}

/// The open-loop load until it ends or Ctrl-C, beside the lag samplers, the scenario's events,
/// the progress line, the chain writers and the snapshots.
async fn drive_load(
    args: &ClusterArgs,
    dataplane: &Path,
    control: &LocalCluster,
    nodes: &Nodes,
    links: &[WanLink],
    fleet: &Fleet,
) -> Result<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    let interrupt = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                say("Ctrl-C: stopping the load, then everything this run started");
                stop.store(true, Ordering::Relaxed);
            }
        })
    };
    let started = Instant::now();
    let record: SharedRecord = Arc::new(Mutex::new(Record::new(started, args.warmup)));
    let lags: Vec<(&'static str, Arc<AtomicU64>)> =
        fleet.replicas.iter().map(|(region, _)| (*region, Arc::new(AtomicU64::new(u64::MAX)))).collect();
    let sampling = Arc::new(AtomicBool::new(true));
    let mut samplers = Vec::new();
    for ((region, client), (_, current)) in fleet.replicas.iter().zip(&lags) {
        let (client, sampling, current) = (client.clone(), sampling.clone(), current.clone());
        samplers.push(tokio::spawn(sample_lag(region, client, started, args.warmup, sampling, current)));
    }
    let events = tokio::spawn(run_events(
        args.partitions.clone(),
        args.kills.clone(),
        nodes.clone(),
        links.iter().map(|link| (link.from, link.to, link.proxy.handle())).collect(),
        dataplane.to_owned(),
        started,
        stop.clone(),
    ));
    let progress = tokio::spawn(show_progress(
        record.clone(),
        lags.clone(),
        args.total(),
        started,
        args.partitions.iter().chain(&args.kills).cloned().collect(),
        sampling.clone(),
    ));
    let chain_log: snapshots::ChainLog = Arc::default();
    let chains = (args.chains > 0).then(|| {
        let (client, stop, log) = (fleet.writer.clone(), stop.clone(), chain_log.clone());
        tokio::spawn(snapshots::write_chains(client, args.chains, started, args.total(), stop, log))
    });
    let snapshots = (!args.snapshot_every.is_zero()).then(|| {
        let admin = control.client().clone();
        tokio::spawn(snapshots::take(admin, args.snapshot_every, started, args.warmup, args.total(), stop.clone()))
    });
    let plan = LoadPlan {
        rate: args.rate,
        warmup: args.warmup,
        duration: args.duration,
        mix: args.workload.clone(),
        file_min: args.file_min,
        file_max: args.file_max,
        part_bytes: args.part_size,
        seed: args.seed,
    };
    say(&format!(
        "load: {} writes/s ({}) for {:?} + {:?} warm-up, {:?} one way between regions",
        args.rate,
        args.workload.describe(),
        args.duration,
        args.warmup,
        args.delay
    ));
    load::run(&fleet.writer, &plan, record.clone(), stop.clone()).await?;
    let load_ended = started.elapsed();
    let events = events.await??;
    let interrupted = stop.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let taken = match snapshots {
        Some(task) => Some(task.await?),
        None => None,
    };
    let chain_failures = match chains {
        Some(task) => task.await?,
        None => 0,
    };
    let chain_writes = lock(&chain_log).clone();
    interrupt.abort();
    let (acked, last_ts) = {
        let record = lock(&record);
        (record.acked.clone(), record.last_ts)
    };
    Ok(Run {
        record,
        acked,
        last_ts,
        load_ended,
        interrupted,
        events,
        taken,
        chain_failures,
        chain_writes,
        sampling,
        samplers,
        progress: Some(progress),
        lags: Vec::new(),
        converged_after: Duration::ZERO,
    })
}

/// Waits until every replica region resolved past the last acknowledged write, then ends the
/// samplers and times each event's recovery from their samples.
async fn converge(args: &ClusterArgs, fleet: &Fleet, run: &mut Run) -> Result<()> {
    say(&format!("load done ({} writes acknowledged); waiting for the replicas to converge ...", run.acked.len()));
    let converge_started = Instant::now();
    let limit = if run.interrupted { Duration::from_secs(10) } else { CONVERGE_TIMEOUT };
    for (_, client) in &fleet.replicas {
        wait_resolved(client, run.last_ts, limit).await?;
    }
    run.converged_after = converge_started.elapsed();
    run.sampling.store(false, Ordering::Relaxed);
    if let Some(progress) = run.progress.take() {
        progress.await?;
    }
    for sampler in std::mem::take(&mut run.samplers) {
        run.lags.push(sampler.await?);
    }
    for event in &mut run.events {
        event.recovery_ms = recovery(event, &run.lags, args.recovered_lag, args.is_home(&event.region));
    }
    Ok(())
}

/// SIGTERM to every data node, then the control plane; whether every node stopped cleanly.
fn stop_all(nodes: &Nodes, control: LocalCluster) -> bool {
    say("stopping the data nodes (SIGTERM) and the control plane ...");
    let mut clean = true;
    for node in lock(nodes).iter_mut() {
        if let Err(error) = node.stop() {
            say(&format!("region {}: {error:#}", node.region));
            clean = false;
        }
    }
    drop(control);
    clean
}

/// Every figure of the run into the report, and its files.
fn write_report(
    args: &ClusterArgs,
    report: &mut report::Report,
    run: &Run,
    lost: &[(&'static str, u64, u64)],
    snapshot_figures: Option<&snapshots::Figures>,
    clean: bool,
    links: &[WanLink],
) -> Result<()> {
    let record = lock(&run.record);
    report.load(&record, args, run.load_ended);
    report.replication(&run.lags, lost, run.converged_after);
    report.events(&run.events);
    if let Some(figures) = snapshot_figures {
        report.snapshots(figures);
    }
    report.set("chain_writers", args.chains);
    report.set("chain_writes_failed", run.chain_failures);
    report.set("interrupted", run.interrupted);
    report.set("clean_shutdown", clean);
    for region in REGIONS {
        let into: Vec<&WanLink> = links.iter().filter(|link| link.to == region).collect();
        if !into.is_empty() {
            let bytes: u64 = into.iter().map(|link| link.proxy.handle().stats().0.delivered_bytes).sum();
            report.set(&format!("wire_bytes_to_{region}"), bytes);
        }
    }
    report.write(&record, &run.lags, &run.events)
}

/// One emulated WAN link: the proxy that `from`'s node dials to reach `to`'s.
struct WanLink {
    from: &'static str,
    to: &'static str,
    proxy: Proxy,
}

/// Waits until the control plane sees every data node up and every replica region's lag behind
/// each region shipping to it is under a second.
async fn wait_healthy(control: &LocalCluster, replicas: &[(&'static str, Client)]) -> Result<()> {
    let started = Instant::now();
    loop {
        let registered = match control.client().read(false, Duration::from_secs(2)).await {
            Ok(state) => REGIONS
                .iter()
                .all(|region| state.data_nodes.get(*region).is_some_and(|node| node.state == NodeState::Up)),
            Err(_) => false,
        };
        let mut caught_up = true;
        for (_, client) in replicas {
            let lag = client.replication_status().await.ok().and_then(|status| status.worst_lag_us());
            caught_up &= lag.is_some_and(|lag| lag < 1_000_000);
        }
        if registered && caught_up {
            return Ok(());
        }
        ensure!(
            started.elapsed() < HEALTH_TIMEOUT,
            "the cluster was not healthy within {HEALTH_TIMEOUT:?} (data nodes registered: {registered}, replicas \
             caught up: {caught_up})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples `region`'s lag (behind the region shipping to it that it lags most) every
/// [`SAMPLE_EVERY`] until `sampling` clears.
async fn sample_lag(
    region: &'static str,
    client: Client,
    started: Instant,
    warmup: Duration,
    sampling: Arc<AtomicBool>,
    current: Arc<AtomicU64>,
) -> Lag {
    let mut lag =
        Lag { region, histogram: Histogram::new(3).expect("3 significant digits are valid"), series: Vec::new() };
    let mut sampler = LagSampler::new(client, ReplicationStatus::worst_lag_us);
    let mut ticks = crate::lag::schedule(SAMPLE_EVERY);
    while sampling.load(Ordering::Relaxed) {
        ticks.tick().await;
        let sample = sampler.sample(SAMPLE_EVERY).await;
        let at = started.elapsed();
        current.store(sample.unwrap_or(u64::MAX), Ordering::Relaxed);
        if let Some(lag_us) = sample {
            lag.series.push((u64::try_from(at.as_millis()).unwrap_or(u64::MAX), lag_us));
            if at >= warmup {
                let _ = lag.histogram.record(lag_us.saturating_mul(1000));
            }
        }
    }
    lag
}

/// Applies the scenario's partitions and kills at their times; returns what happened.
async fn run_events(
    partitions: Vec<Window>,
    kills: Vec<Window>,
    nodes: Nodes,
    proxies: Vec<(&'static str, &'static str, ProxyHandle)>,
    dataplane: PathBuf,
    started: Instant,
    stop: Arc<AtomicBool>,
) -> Result<Vec<Event>> {
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Action {
        Heal,
        Restart,
        Cut,
        Kill,
    }
    let mut plan: Vec<(Duration, Action, usize)> = Vec::new();
    for (index, window) in partitions.iter().enumerate() {
        plan.push((window.start, Action::Cut, index));
        plan.push((window.end(), Action::Heal, index));
    }
    for (index, window) in kills.iter().enumerate() {
        plan.push((window.start, Action::Kill, index));
        plan.push((window.end(), Action::Restart, index));
    }
    plan.sort();
    let ms = |at: Duration| u64::try_from(at.as_millis()).unwrap_or(u64::MAX);
    let mut events: Vec<Event> = partitions
        .iter()
        .map(|w| ("partition", w))
        .chain(kills.iter().map(|w| ("kill", w)))
        .map(|(kind, w)| Event {
            kind,
            region: w.region.clone(),
            start_ms: ms(w.start),
            end_ms: ms(w.end()),
            restored_ms: None,
            recovery_ms: None,
        })
        .collect();
    // Each link stays cut while any partition of a region at either end is on.
    let mut cuts = vec![0usize; proxies.len()];
    // Which cuts and kills took place (after Ctrl-C the rest are skipped, and so are their ends).
    let mut begun = vec![false; events.len()];
    let links_of = |region: &str| -> Vec<usize> {
        (0..proxies.len()).filter(|index| proxies[*index].0 == region || proxies[*index].1 == region).collect()
    };
    for (at, action, index) in plan {
        // On Ctrl-C, heal and restart at once so the convergence check can run.
        let due = started + at;
        while Instant::now() < due && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep((due - Instant::now()).min(Duration::from_millis(50))).await;
        }
        let slot = if matches!(action, Action::Cut | Action::Heal) { index } else { partitions.len() + index };
        if matches!(action, Action::Cut | Action::Kill) {
            if stop.load(Ordering::Relaxed) {
                continue;
            }
            begun[slot] = true;
        } else if !begun[slot] {
            continue;
        }
        match action {
            Action::Cut | Action::Heal => {
                let window = &partitions[index];
                for link in links_of(&window.region) {
                    if action == Action::Cut {
                        cuts[link] += 1;
                    } else {
                        cuts[link] = cuts[link].saturating_sub(1);
                    }
                    proxies[link].2.partition(cuts[link] > 0);
                }
                if action == Action::Heal {
                    events[slot].restored_ms = Some(ms(started.elapsed()));
                }
                say(&format!(
                    "{} region {} at {:.1} s",
                    if action == Action::Cut { "partition: cut off" } else { "partition healed:" },
                    window.region,
                    started.elapsed().as_secs_f64()
                ));
            }
            Action::Kill | Action::Restart => {
                let window = &kills[index];
                let position = REGIONS.iter().position(|region| *region == window.region).context("region")?;
                let (nodes, dataplane) = (nodes.clone(), dataplane.clone());
                let kill = action == Action::Kill;
                tokio::task::spawn_blocking(move || {
                    let mut nodes = lock(&nodes);
                    if kill {
                        nodes[position].kill();
                        Ok(())
                    } else {
                        nodes[position].start(&dataplane)
                    }
                })
                .await??;
                if !kill {
                    events[slot].restored_ms = Some(ms(started.elapsed()));
                }
                say(&format!(
                    "{} region {}'s data node at {:.1} s",
                    if kill { "SIGKILL:" } else { "restarted:" },
                    window.region,
                    started.elapsed().as_secs_f64()
                ));
            }
        }
    }
    Ok(events)
}

/// Time from an event's end until every replica it affects is back under `threshold` (every
/// region's when the event's region is the home of a shard, else its own).
fn recovery(event: &Event, lags: &[Lag], threshold: Duration, home: bool) -> Option<u64> {
    let restored = event.restored_ms?;
    let limit = u64::try_from(threshold.as_micros()).unwrap_or(u64::MAX);
    let mut worst = 0;
    for lag in lags.iter().filter(|lag| home || lag.region == event.region) {
        let back = lag.series.iter().find(|(at, lag_us)| *at >= restored && *lag_us <= limit)?;
        worst = worst.max(back.0 - restored);
    }
    Some(worst)
}

/// The status line: elapsed, writes/s, p99 of the last second, each replica's lag, events on.
async fn show_progress(
    record: SharedRecord,
    lags: Vec<(&'static str, Arc<AtomicU64>)>,
    total: Duration,
    started: Instant,
    windows: Vec<Window>,
    running: Arc<AtomicBool>,
) {
    let terminal = std::io::stderr().is_terminal();
    let mut tick = 0u64;
    while running.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick += 1;
        let elapsed = started.elapsed();
        let (writes, p99_ms) = lock(&record).last_second().unwrap_or((0, 0.0));
        let rpo: Vec<String> = lags
            .iter()
            .map(|(region, lag)| match lag.load(Ordering::Relaxed) {
                u64::MAX => format!("{region} {:>8}", "down"),
                lag_us => format!("{region} {:>8}", format!("{:.0} ms", lag_us as f64 / 1000.0)),
            })
            .collect();
        let active: Vec<String> = windows
            .iter()
            .filter(|window| window.start <= elapsed && elapsed < window.end())
            .map(|window| format!("event on region {}", window.region))
            .collect();
        let phase = if elapsed < total {
            format!("{:>4.0}s/{:.0}s", elapsed.as_secs_f64(), total.as_secs_f64())
        } else {
            "converging".to_owned()
        };
        let line = format!(
            "[{phase}] {writes:>6} writes/s  p99 {p99_ms:>7.1} ms  RPO {}  {}",
            rpo.join("  "),
            active.join(", ")
        );
        if terminal {
            eprint!("\r\x1b[2K{line}");
        } else if tick.is_multiple_of(5) {
            eprintln!("{line}");
        }
    }
    if terminal {
        eprintln!();
    }
}

/// Acknowledged writes a region does not hold in full (a large file is missing if any of its
/// parts is).
async fn count_missing(client: &Client, acked: &[Write], part_bytes: u64) -> Result<u64> {
    let mut found: HashMap<(Class, u64), usize> = HashMap::new();
    for class in Class::ALL {
        for_each_key(client, class.prefix(), |key| {
            if let Some(n) = Write::number_of(class, key) {
                *found.entry((class, n)).or_default() += 1;
            }
        })
        .await?;
    }
    let missing = acked
        .iter()
        .filter(|write| found.get(&(write.class, write.n)).copied().unwrap_or(0) < write.parts(part_bytes).len())
        .count();
    Ok(missing as u64)
}

/// Reads back a spread of acknowledged writes and compares them byte for byte; the number that
/// differ.
async fn verify_sample(client: &Client, acked: &[Write], part_bytes: u64, seed: u64) -> Result<u64> {
    let mut corrupt = 0;
    let mut draw = scenario::Draw::new(seed ^ 0x5EED);
    for _ in 0..VERIFY_PER_REGION.min(acked.len()) {
        let index = usize::try_from(draw.next_u64() % acked.len() as u64).unwrap_or(0);
        for (key, payload_seed, len) in acked[index].parts(part_bytes) {
            let value = client.get(&key, None).await?;
            let expected = load::payload(payload_seed, len);
            if value.as_ref().map(|versioned| &versioned.value[..]) != Some(&expected[..]) {
                corrupt += 1;
            }
        }
    }
    Ok(corrupt)
}
