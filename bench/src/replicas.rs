//! `bench replicas`: one region of three data nodes in three zones, every shard in a replica set
//! of three (real `dataplane` and `controlplane` processes, QUIC with mutual TLS between the
//! copies), next to a region of one node whose sets have one copy, in the same run:
//!
//! - the write latency and throughput of three synchronous copies against one copy at the same
//!   offered (open-loop) load;
//! - failover: SIGKILL the primary of a busy shard, time to the first write acknowledged by the
//!   new primary, over `--kills` rounds (the killed node restarts and rejoins each time);
//! - the stall a backup's death causes: SIGKILL a backup of a busy shard, the longest write
//!   latency from then on, over `--backup-kills` rounds;
//! - lost writes: every acknowledged write is read back from every node of the region.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use client::{Client, ClientConfig, ClientError};
use controlapi::client::ControlClient;
use controlapi::meta::{Command, MetaState, NodeState};
use hdrhistogram::Histogram;
use testkit::LocalCluster;
use wire::proto::ErrorCode;

use crate::control::controlplane_binary;
use crate::kv::{Dataplane, dataplane_binary};
use crate::process::RunDir;
use crate::report::{Figures, percentile_us};

#[derive(Args, Debug, Clone)]
pub struct ReplicasArgs {
    /// Primary kills (failover rounds).
    #[arg(long, default_value_t = 100)]
    kills: usize,
    /// Backup kills (stall rounds).
    #[arg(long, default_value_t = 20)]
    backup_kills: usize,
    /// Offered load of the latency phase, writes per second (open loop), in each region.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Length of the latency phase in each region, ms.
    #[arg(long, default_value_t = 10_000)]
    load_ms: u64,
    /// Bytes of each value.
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// Shards (logical shards = each node's shards).
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// `[replica_sets] member_timeout_ms` of the nodes (the nodes' default).
    #[arg(long, default_value_t = dataplane::config::MEMBER_TIMEOUT_MS_DEFAULT)]
    member_timeout_ms: u64,
    /// Parent of the run's fresh directory. Removed after the run unless --keep-data.
    #[arg(long, default_value = "bench-data")]
    data_dir: PathBuf,
    /// Keep the run's directory (logs, data).
    #[arg(long)]
    keep_data: bool,
    /// The dataplane binary (default: next to this bench binary).
    #[arg(long)]
    dataplane: Option<PathBuf>,
    /// The controlplane binary (default: next to this bench binary).
    #[arg(long)]
    controlplane: Option<PathBuf>,
    /// Print one JSON object of all figures instead of the summary.
    #[arg(long)]
    json: bool,
}

const SECOND: Duration = Duration::from_secs(1);
/// The three-copy region and its nodes' zones; the one-copy region.
const REGION: &str = "eu";
const NODES: [(&str, &str); 3] = [("dn1", "a"), ("dn2", "b"), ("dn3", "c")];
const SOLO: (&str, &str, &str) = ("solo", "s1", "a");

pub fn run(args: &ReplicasArgs) -> Result<()> {
    let run_dir = RunDir::create(&args.data_dir, "replicas", args.keep_data)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let figures = runtime.block_on(run_async(args, run_dir.path()))?;
    if args.json {
        println!("{}", figures.to_json());
    } else {
        print_summary(&figures);
    }
    Ok(())
}

/// The data nodes of the run, restartable.
struct Nodes {
    binary: PathBuf,
    dir: PathBuf,
    shards: usize,
    running: BTreeMap<String, Dataplane>,
}

impl Nodes {
    fn config(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.toml"))
    }

    fn start(&mut self, id: &str) -> Result<Vec<String>> {
        let node = Dataplane::start_with(
            &self.binary,
            &self.dir.join(id),
            self.shards,
            &self.dir.join(format!("{id}.log")),
            Some(&self.config(id)),
        )?;
        let addresses = node.addresses.clone();
        self.running.insert(id.to_owned(), node);
        Ok(addresses)
    }

    fn kill(&mut self, id: &str) {
        if let Some(mut node) = self.running.remove(id) {
            node.process.kill();
        }
    }
}

/// Writes to whichever node holds the shard's primary copy: a refusal or a lost connection
/// moves to the next node of the region.
#[derive(Clone)]
struct Writer {
    nodes: Vec<String>,
    clients: Arc<Mutex<BTreeMap<String, Client>>>,
    primary: Arc<Mutex<BTreeMap<u32, String>>>,
    shards: u32,
}

/// One acknowledged write.
#[derive(Debug, Clone)]
struct Acked {
    key: String,
    ts: u64,
    node: String,
    at: Instant,
}

impl Writer {
    fn new(nodes: &[&str], shards: usize) -> Self {
        Self {
            nodes: nodes.iter().map(|id| (*id).to_owned()).collect(),
            clients: Arc::default(),
            primary: Arc::default(),
            shards: u32::try_from(shards).unwrap_or(1),
        }
    }

    async fn connect(&self, id: &str, address: &str) -> Result<()> {
        let config = ClientConfig { retries: 0, request_timeout: 5 * SECOND, ..ClientConfig::default() };
        let client = Client::connect(address, config).await.with_context(|| format!("connecting to {id}"))?;
        self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id.to_owned(), client);
        Ok(())
    }

    fn forget(&self, id: &str) {
        self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id);
    }

    fn client(&self, id: &str) -> Option<Client> {
        self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(id).cloned()
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<Acked> {
        let start = Instant::now();
        let shard = wire::routing::shard_for(key.as_bytes(), self.shards);
        let mut next = self
            .primary
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&shard)
            .cloned()
            .unwrap_or_else(|| self.nodes[0].clone());
        let mut last = String::new();
        while start.elapsed() < 30 * SECOND {
            if let Some(client) = self.client(&next) {
                match client.put(key.as_bytes(), value).await {
                    Ok(ts) => {
                        self.primary
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(shard, next.clone());
                        return Ok(Acked { key: key.to_owned(), ts, node: next, at: Instant::now() });
                    }
                    Err(ClientError::Server { code: ErrorCode::NotPrimary | ErrorCode::Unavailable, message }) => {
                        last = message;
                    }
                    Err(error) => last = error.to_string(),
                }
                if std::env::var_os("BENCH_TRACE").is_some() {
                    eprintln!("{:?} {next}: {last}", std::time::SystemTime::now());
                }
            }
            let at = self.nodes.iter().position(|id| *id == next).unwrap_or(0);
            next = self.nodes[(at + 1) % self.nodes.len()].clone();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bail!("{key}: no node took it within 30 s; last: {last}")
    }

    /// A key of `shard` with `prefix`.
    fn key_of(&self, shard: u32, prefix: &str, index: u64) -> String {
        (0..)
            .map(|salt| format!("{prefix}-{index}-{salt}"))
            .find(|key| wire::routing::shard_for(key.as_bytes(), self.shards) == shard)
            .unwrap_or_default()
    }
}

async fn wait_meta(admin: &ControlClient, what: &str, done: impl Fn(&MetaState) -> bool) -> Result<MetaState> {
    let start = Instant::now();
    loop {
        if let Ok(state) = admin.read(false, 2 * SECOND).await
            && done(&state)
        {
            return Ok(state);
        }
        if start.elapsed() > 60 * SECOND {
            bail!("{what}: not within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every set of the region has all three members.
fn whole(state: &MetaState, shards: usize) -> bool {
    state
        .replica_sets
        .get(REGION)
        .is_some_and(|sets| sets.len() == shards && sets.values().all(|set| set.members.len() == NODES.len()))
}

fn node_config(
    cluster: &LocalCluster,
    tls: &Path,
    (id, region, zone): (&str, &str, &str),
    member_timeout_ms: u64,
) -> String {
    let seeds: Vec<String> =
        cluster.ids().into_iter().filter_map(|member| cluster.addr(member)).map(|addr| format!("{addr:?}")).collect();
    format!(
        "[control]\nseeds = [{}]\ntls_dir = {tls:?}\nnode_id = \"{id}\"\nregion = \"{region}\"\nzone = \"{zone}\"\n\
         heartbeat_ms = 100\n[replica_sets]\nlisten = \"127.0.0.1:0\"\nmember_timeout_ms = {member_timeout_ms}\n",
        seeds.join(",")
    )
}

async fn run_async(args: &ReplicasArgs, dir: &Path) -> Result<Figures> {
    let controlplane = controlplane_binary(args.controlplane.as_deref())?;
    let cluster = LocalCluster::start(&controlplane, &dir.join("control"), 3, &[]).await?;
    cluster.wait_leader(15 * SECOND).await?;
    let admin = cluster.client().clone();
    // The control plane's CA issues the data nodes' certificates too.
    let tls = dir.join("control").join("tls");
    let mut names: Vec<String> = NODES.iter().map(|(id, _)| (*id).to_owned()).collect();
    names.push(SOLO.1.to_owned());
    platform::tls::generate(&tls, &names)?;
    let zones = NODES.iter().map(|(_, zone)| (*zone).to_owned()).collect();
    admin.write(Command::PutRegion { name: REGION.into(), zones }, 10 * SECOND).await?;
    admin.write(Command::PutRegion { name: SOLO.0.into(), zones: vec![SOLO.2.into()] }, 10 * SECOND).await?;
    let mut nodes = Nodes {
        binary: dataplane_binary(args.dataplane.as_ref())?,
        dir: dir.to_owned(),
        shards: args.shards,
        running: BTreeMap::new(),
    };
    let mut members: Vec<(&str, &str, &str)> = NODES.iter().map(|(id, zone)| (*id, REGION, *zone)).collect();
    members.push((SOLO.1, SOLO.0, SOLO.2));
    let writer = Writer::new(&NODES.map(|(id, _)| id), args.shards);
    let solo = Writer::new(&[SOLO.1], args.shards);
    for member in &members {
        std::fs::write(nodes.config(member.0), node_config(&cluster, &tls, *member, args.member_timeout_ms))?;
        let addresses = nodes.start(member.0)?;
        let target = if member.1 == REGION { &writer } else { &solo };
        target.connect(member.0, &addresses[0]).await?;
    }
    wait_meta(&admin, "every node up", |state| {
        members.iter().all(|(id, ..)| state.data_nodes.get(*id).is_some_and(|node| node.state == NodeState::Up))
    })
    .await?;
    let shards = u32::try_from(args.shards)?;
    for (region, replicas, min_replicas) in [(REGION, 3, 2), (SOLO.0, 1, 1)] {
        let place = Command::PlaceReplicaSets { region: region.into(), shards, replicas, min_replicas };
        admin.write(place, 10 * SECOND).await?;
    }
    // Every set takes writes.
    let value = vec![b'v'; args.value_bytes];
    for shard in 0..shards {
        writer.put(&writer.key_of(shard, "warm", 0), &value).await?;
        solo.put(&solo.key_of(shard, "warm", 0), &value).await?;
    }
    let mut figures = Figures::default();
    let mut acked: Vec<Acked> = Vec::new();
    // Latency at the same offered load, one copy and three in turn (two halves each, after a
    // second of warm-up each), so the machine's noise falls on both alike.
    let warmup = ReplicasArgs { load_ms: 1000, ..args.clone() };
    open_loop(&solo, "warm-single", &warmup, &value).await?;
    open_loop(&writer, "warm-load", &warmup, &value).await?;
    let half = ReplicasArgs { load_ms: args.load_ms / 2, ..args.clone() };
    let mut single = open_loop(&solo, "single-a", &half, &value).await?;
    let mut triple = open_loop(&writer, "load-a", &half, &value).await?;
    single.merge(open_loop(&solo, "single-b", &half, &value).await?)?;
    triple.merge(open_loop(&writer, "load-b", &half, &value).await?)?;
    acked.extend(triple.acked.iter().cloned());
    for (name, phase) in [("single_copy", &single), ("three_copies", &triple)] {
        figures.set_f64(format!("{name}_write_p50_us"), percentile_us(&phase.latency, 50.0));
        figures.set_f64(format!("{name}_write_p99_us"), percentile_us(&phase.latency, 99.0));
        figures.set_f64(format!("{name}_throughput_per_s"), phase.throughput);
    }
    figures.set("offered_writes_per_s", args.rate);
    figures.set_f64(
        "write_p99_vs_single_copy_ratio",
        percentile_us(&triple.latency, 99.0) / percentile_us(&single.latency, 99.0).max(1.0),
    );
    figures.set_f64("throughput_vs_single_copy_ratio", triple.throughput / single.throughput.max(1.0));
    // Failover rounds, then backup deaths.
    let failovers = kill_rounds(&mut nodes, &writer, &admin, args, Victim::Primary, &mut acked).await?;
    set_times(&mut figures, "failover", &failovers);
    figures.set("failover_rounds", failovers.len());
    let stalls = kill_rounds(&mut nodes, &writer, &admin, args, Victim::Backup, &mut acked).await?;
    set_times(&mut figures, "backup_loss_stall", &stalls);
    figures.set("backup_loss_rounds", stalls.len());
    wait_meta(&admin, "every set whole at the end", |state| whole(state, args.shards)).await?;
    let lost = lost_writes(&writer, &acked).await?;
    figures.set("acknowledged_writes", acked.len());
    figures.set("lost_writes", lost);
    figures.set("member_timeout_ms", args.member_timeout_ms);
    for (_, node) in std::mem::take(&mut nodes.running) {
        node.stop()?;
    }
    drop(cluster);
    Ok(figures)
}

/// What an open-loop phase measured.
struct Phase {
    latency: Histogram<u64>,
    throughput: f64,
    acked: Vec<Acked>,
}

impl Phase {
    /// Both phases' latencies and writes; the throughput of the two, weighted by their length.
    fn merge(&mut self, other: Phase) -> Result<()> {
        self.latency.add(&other.latency)?;
        let seconds = |phase: &Phase| phase.acked.len() as f64 / phase.throughput.max(1e-9);
        let total = seconds(self) + seconds(&other);
        self.acked.extend(other.acked);
        self.throughput = self.acked.len() as f64 / total.max(1e-9);
        Ok(())
    }
}

/// Writes at `args.rate` for `args.load_ms` (write n due at n / rate), latency from the due
/// time (so a stall counts for every write it delayed).
async fn open_loop(writer: &Writer, prefix: &str, args: &ReplicasArgs, value: &[u8]) -> Result<Phase> {
    let total = args.rate * args.load_ms / 1000;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..total {
        let due = start + Duration::from_secs_f64(index as f64 / args.rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let (writer, value) = (writer.clone(), value.to_vec());
        let key = format!("{prefix}-{index}");
        tasks.spawn(async move { writer.put(&key, &value).await.map(|acked| (acked, due)) });
    }
    let mut latency = Histogram::<u64>::new(3)?;
    let mut acked = Vec::new();
    let mut last = start;
    while let Some(done) = tasks.join_next().await {
        let (write, due) = done??;
        latency.record(u64::try_from(write.at.duration_since(due).as_nanos()).unwrap_or(u64::MAX))?;
        last = last.max(write.at);
        acked.push(write);
    }
    let throughput = acked.len() as f64 / last.duration_since(start).as_secs_f64().max(1e-3);
    Ok(Phase { latency, throughput, acked })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Primary,
    Backup,
}

/// Kills a primary (or a backup) of a busy shard per round, restarts it and waits for the set
/// to be whole again. A primary's round measures kill to the first write the new primary
/// acknowledged; a backup's, the longest write latency after the kill.
async fn kill_rounds(
    nodes: &mut Nodes,
    writer: &Writer,
    admin: &ControlClient,
    args: &ReplicasArgs,
    victim_kind: Victim,
    acked: &mut Vec<Acked>,
) -> Result<Vec<Duration>> {
    let rounds = if victim_kind == Victim::Primary { args.kills } else { args.backup_kills };
    let shards = u32::try_from(args.shards)?;
    let mut times = Vec::new();
    let value = vec![b'k'; args.value_bytes];
    for round in 0..rounds {
        let state = wait_meta(admin, "every set whole", |state| whole(state, args.shards)).await?;
        let shard = u32::try_from(round)? % shards;
        let set = &state.replica_sets[REGION][&shard];
        let victim = match victim_kind {
            Victim::Primary => set.primary.clone(),
            Victim::Backup => {
                set.members.iter().find(|member| **member != set.primary).cloned().context("no backup")?
            }
        };
        // A busy shard: a writer putting its keys one after the other.
        let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let prober = {
            let (writer, running, value) = (writer.clone(), running.clone(), value.clone());
            let prefix = format!("{victim_kind:?}-{round}");
            tokio::spawn(async move {
                let mut writes = Vec::new();
                let mut index = 0;
                while running.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = writer.key_of(shard, &prefix, index);
                    let started = Instant::now();
                    let write = writer.put(&key, &value).await?;
                    writes.push((started, write));
                    index += 1;
                }
                anyhow::Ok(writes)
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = Instant::now();
        if !args.json {
            let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            eprintln!("killing {victim} at unix {:.3} s", unix.as_secs_f64());
        }
        nodes.kill(&victim);
        writer.forget(&victim);
        match victim_kind {
            // Until a write is acknowledged by another node after the kill.
            Victim::Primary => {
                let deadline = killed + 30 * SECOND;
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let taken =
                        writer.primary.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&shard).cloned();
                    if taken.as_deref().is_some_and(|node| node != victim) {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("round {round}: no new primary of shard {shard} within 30 s of killing {victim}");
                    }
                }
            }
            // Long enough for the member's removal and more writes after it.
            Victim::Backup => tokio::time::sleep(3 * SECOND).await,
        }
        running.store(false, std::sync::atomic::Ordering::Relaxed);
        let writes = prober.await??;
        let time = match victim_kind {
            Victim::Primary => writes
                .iter()
                .filter(|(_, write)| write.node != victim && write.at > killed)
                .map(|(_, write)| write.at.duration_since(killed))
                .min()
                .context("no write after the kill")?,
            // The longest a write waited among those in flight at the kill or started after it.
            Victim::Backup => writes
                .iter()
                .filter(|(_, write)| write.at > killed)
                .map(|(started, write)| write.at.duration_since(*started))
                .max()
                .context("no write after the kill")?,
        };
        times.push(time);
        acked.extend(writes.into_iter().map(|(_, write)| write));
        let addresses = nodes.start(&victim)?;
        writer.connect(&victim, &addresses[0]).await?;
        if !args.json {
            eprintln!(
                "{victim_kind:?} round {}/{rounds}: killed {victim} (shard {shard}): {} ms",
                round + 1,
                time.as_millis()
            );
        }
    }
    Ok(times)
}

fn set_times(figures: &mut Figures, name: &str, times: &[Duration]) {
    let mut sorted: Vec<f64> = times.iter().map(|time| time.as_secs_f64() * 1000.0).collect();
    sorted.sort_by(f64::total_cmp);
    let at = |quantile: f64| {
        if sorted.is_empty() {
            return 0.0;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let index = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[index]
    };
    figures.set_f64(format!("{name}_p50_ms"), at(0.5));
    figures.set_f64(format!("{name}_p99_ms"), at(0.99));
    figures.set_f64(format!("{name}_max_ms"), sorted.last().copied().unwrap_or(0.0));
}

/// Acknowledged writes missing (or with another version) on any node of the region.
async fn lost_writes(writer: &Writer, acked: &[Acked]) -> Result<usize> {
    let mut lost = 0;
    for id in &writer.nodes {
        let client = writer.client(id).context("a node without a client")?;
        let start = Instant::now();
        for write in acked {
            loop {
                let found = client.get(write.key.as_bytes(), None).await?;
                if found.is_some_and(|version| version.ts == write.ts) {
                    break;
                }
                // A backup applies what its primary said is committed: give it a heartbeat.
                if start.elapsed() > 10 * SECOND {
                    lost += 1;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    Ok(lost)
}

fn print_summary(figures: &Figures) {
    let get = |key: &str| figures.get_f64(key).unwrap_or(f64::NAN);
    println!("bench replicas: one region of 3 nodes in 3 zones, sets of 3 copies (min 2), against sets of 1 copy");
    println!(
        "  writes at {} /s offered: p99 {:.0} us with 3 copies, {:.0} us with 1 ({:.2}x); throughput {:.0} /s vs {:.0} /s ({:.2}x)",
        get("offered_writes_per_s"),
        get("three_copies_write_p99_us"),
        get("single_copy_write_p99_us"),
        get("write_p99_vs_single_copy_ratio"),
        get("three_copies_throughput_per_s"),
        get("single_copy_throughput_per_s"),
        get("throughput_vs_single_copy_ratio"),
    );
    println!(
        "  failover (kill primary -> first write acknowledged by the new one) over {} kills: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        get("failover_rounds"),
        get("failover_p50_ms"),
        get("failover_p99_ms"),
        get("failover_max_ms"),
    );
    println!(
        "  a backup's death over {} kills: longest write p50 {:.0} ms, p99 {:.0} ms (member timeout {} ms)",
        get("backup_loss_rounds"),
        get("backup_loss_stall_p50_ms"),
        get("backup_loss_stall_p99_ms"),
        get("member_timeout_ms"),
    );
    println!("  lost writes: {} of {} acknowledged", get("lost_writes"), get("acknowledged_writes"));
}
