//! `bench control`: metadata commit latency and throughput of a 3-node control plane (real
//! `controlplane` processes, QUIC + mutual TLS, Raft log fdatasynced per append) next to a
//! 3-member etcd cluster doing the same writes in the same run, and the GLTS interval width
//! a data node's client sees on loopback.
//!
//! `bench elections`: the leader-kill soak: SIGKILLs the leader N times and reports the
//! longest time from the kill to the first commit through a new leader.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use controlapi::client::ControlClient;
use controlapi::meta::Command;
use hdrhistogram::Histogram;
use testkit::LocalCluster;

use crate::etcd;
use crate::process::RunDir;
use crate::report::{Figures, percentile_us};

#[derive(Args, Debug)]
pub struct ControlArgs {
    /// Measured time per cell, after warm-up.
    #[arg(long, default_value_t = 3000)]
    duration_ms: u64,
    /// Warm-up per cell (not measured).
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
    /// Numbers of concurrent writers, each with one write outstanding. The headline ratios are
    /// the worst cell's (highest p99 ratio, lowest throughput ratio).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    clients: Vec<usize>,
    /// Bytes of each written value.
    #[arg(long, default_value_t = 128)]
    value_bytes: usize,
    /// How long to sample the GLTS interval.
    #[arg(long, default_value_t = 3000)]
    glts_ms: u64,
    /// Parent of the run's fresh directory. Removed after the run unless --keep-data.
    #[arg(long, default_value = "bench-data")]
    data_dir: PathBuf,
    /// Keep the run's directory (logs, Raft logs, etcd data).
    #[arg(long)]
    keep_data: bool,
    /// The controlplane binary (default: `controlplane` next to this bench binary).
    #[arg(long)]
    controlplane: Option<PathBuf>,
    /// Skip etcd (ratios are then absent).
    #[arg(long)]
    skip_etcd: bool,
    /// Print one JSON object of all figures instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ElectionsArgs {
    /// Leader kills.
    #[arg(long, default_value_t = 200)]
    kills: usize,
    /// Parent of the run's fresh directory.
    #[arg(long, default_value = "bench-data")]
    data_dir: PathBuf,
    /// The controlplane binary (default: `controlplane` next to this bench binary).
    #[arg(long)]
    controlplane: Option<PathBuf>,
    /// Print one JSON object of all figures instead of the summary.
    #[arg(long)]
    json: bool,
}

pub(crate) fn controlplane_binary(given: Option<&Path>) -> Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()?.parent().context("bench has no directory")?.join("controlplane"),
    };
    if !path.exists() {
        bail!("{} not found: build it (cargo build --release -p controlplane) or pass --controlplane", path.display());
    }
    Ok(path)
}

fn histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1_000, 60_000_000_000, 3)?)
}

struct Cell {
    latency: Histogram<u64>,
    elapsed: Duration,
}

impl Cell {
    fn per_s(&self) -> f64 {
        self.latency.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// `clients` writers of distinct keys through the leader, each one write at a time.
async fn meridian_writes(
    client: &ControlClient,
    clients: usize,
    warmup: Duration,
    duration: Duration,
    value_bytes: usize,
) -> Result<Cell> {
    let value = "v".repeat(value_bytes);
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop = measure_from + duration;
    let mut tasks = Vec::new();
    for writer in 0..clients {
        let client = client.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut latency = histogram()?;
            let mut n = 0_u64;
            loop {
                let begun = Instant::now();
                if begun >= stop {
                    return Ok::<_, anyhow::Error>(latency);
                }
                let command = Command::SetConfig { key: format!("bench/{writer}/{n}"), value: value.clone() };
                client.write(command, Duration::from_secs(10)).await?;
                n += 1;
                if begun >= measure_from {
                    latency.record(u64::try_from(begun.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
                }
            }
        }));
    }
    let mut latency = histogram()?;
    for task in tasks {
        latency.add(task.await??)?;
    }
    Ok(Cell { latency, elapsed: duration })
}

async fn glts_widths(cluster: &LocalCluster, sample_for: Duration) -> Result<(Vec<u64>, usize)> {
    let glts = cluster.glts_client(Duration::from_millis(20))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut widths = Vec::new();
    let mut outside = 0;
    let start = Instant::now();
    while start.elapsed() < sample_for {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let before = controlapi::timesource::realtime_ns();
        let Ok(interval) = glts.now() else { continue };
        let after = controlapi::timesource::realtime_ns();
        if interval.earliest_ns > after || before > interval.latest_ns {
            outside += 1;
        }
        widths.push(interval.width_ns());
    }
    widths.sort_unstable();
    Ok((widths, outside))
}

/// The `percent`-th percentile of sorted ns samples, in µs.
fn quantile_us(sorted_ns: &[u64], percent: usize) -> f64 {
    match sorted_ns.len() {
        0 => f64::NAN,
        len => sorted_ns[(len - 1) * percent / 100] as f64 / 1000.0,
    }
}

pub fn run(args: &ControlArgs) -> Result<()> {
    let binary = controlplane_binary(args.controlplane.as_deref())?;
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients: give one or more counts > 0");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    runtime.block_on(run_async(args, &binary))
}

async fn run_async(args: &ControlArgs, binary: &Path) -> Result<()> {
    let run_dir = RunDir::create(&args.data_dir, "control", args.keep_data)?;
    let warmup = Duration::from_millis(args.warmup_ms);
    let duration = Duration::from_millis(args.duration_ms);
    let mut figures = Figures::default();
    figures.set("value_bytes", args.value_bytes);
    figures.set("members", 3);

    let meridian_dir = run_dir.path().join("meridian");
    std::fs::create_dir_all(&meridian_dir)?;
    crate::device::quiesce();
    let cluster = LocalCluster::start(binary, &meridian_dir, 3, &[]).await?;
    cluster.wait_leader(Duration::from_secs(15)).await?;
    let client = cluster.client().clone().with_attempt_timeout(Duration::from_secs(5));
    let mut ours = Vec::new();
    for &clients in &args.clients {
        eprintln!("bench control: meridian, {clients} writers ...");
        let cell = meridian_writes(&client, clients, warmup, duration, args.value_bytes).await?;
        figures.set_f64(format!("c{clients}_commit_p50_us"), percentile_us(&cell.latency, 50.0));
        figures.set_f64(format!("c{clients}_commit_p99_us"), percentile_us(&cell.latency, 99.0));
        figures.set_f64(format!("c{clients}_commit_p999_us"), percentile_us(&cell.latency, 99.9));
        figures.set_f64(format!("c{clients}_commit_throughput_per_s"), cell.per_s());
        ours.push((clients, cell));
    }
    eprintln!("bench control: GLTS interval on loopback for {} ms ...", args.glts_ms);
    let (widths, outside) = glts_widths(&cluster, Duration::from_millis(args.glts_ms)).await?;
    figures.set("glts_samples", widths.len());
    figures.set("glts_true_time_outside_interval", outside);
    figures.set_f64("glts_width_p50_us", quantile_us(&widths, 50));
    figures.set_f64("glts_width_p99_us", quantile_us(&widths, 99));
    let status = cluster.client().status_of(cluster.addr(1).context("node 1")?).await?;
    figures.set("glts_local_source", status.glts_local_source.clone());
    drop(cluster);

    let mut theirs = Vec::new();
    if !args.skip_etcd {
        if !etcd::available() {
            bail!("etcd not found: run scripts/install-deps.sh bench (Debian etcd-server) or pass --skip-etcd");
        }
        let etcd_dir = run_dir.path().join("etcd");
        std::fs::create_dir_all(&etcd_dir)?;
        crate::device::quiesce();
        let mut cluster = etcd::EtcdCluster::start(&etcd_dir).await?;
        figures.set("etcd_version", cluster.version().to_owned());
        for &clients in &args.clients {
            eprintln!("bench control: etcd, {clients} writers ...");
            let cpu_before = cluster.cpu_time()?;
            let run = etcd::run_puts(cluster.client_urls(), clients, duration, warmup, args.value_bytes).await?;
            cluster.check_running()?;
            let cpu = cluster.cpu_time()?.saturating_sub(cpu_before);
            figures.set("etcd_leader_url", run.target_url.clone());
            figures.set_f64(
                format!("c{clients}_etcd_cpu_us_per_commit"),
                // Warm-up puts ran at about the measured rate: scale the count to the whole run.
                cpu.as_secs_f64() * 1e6
                    / (run.measured.requests.max(1) as f64 * (warmup + duration).as_secs_f64()
                        / duration.as_secs_f64()),
            );
            let cell = Cell { latency: run.latency.clone(), elapsed: run.elapsed };
            figures.set_f64(format!("c{clients}_etcd_commit_p50_us"), percentile_us(&cell.latency, 50.0));
            figures.set_f64(format!("c{clients}_etcd_commit_p99_us"), percentile_us(&cell.latency, 99.0));
            figures.set_f64(format!("c{clients}_etcd_commit_p999_us"), percentile_us(&cell.latency, 99.9));
            figures.set_f64(format!("c{clients}_etcd_commit_throughput_per_s"), cell.per_s());
            theirs.push((clients, cell));
        }
    }
    for ((clients, ours), (_, theirs)) in ours.iter().zip(&theirs) {
        let p99 = percentile_us(&ours.latency, 99.0) / percentile_us(&theirs.latency, 99.0);
        figures.set_f64(format!("c{clients}_commit_p99_vs_etcd_ratio"), p99);
        figures.set_f64(format!("c{clients}_commit_throughput_vs_etcd_ratio"), ours.per_s() / theirs.per_s());
    }
    // Headline: the worst cell, so a target met at one concurrency cannot hide a miss at
    // another.
    let p99_ratio =
        |(ours, theirs): (&Cell, &Cell)| percentile_us(&ours.latency, 99.0) / percentile_us(&theirs.latency, 99.0);
    let cells: Vec<(usize, &Cell, &Cell)> = ours.iter().zip(&theirs).map(|((c, o), (_, t))| (*c, o, t)).collect();
    if let Some((clients, worst_ours, worst_theirs)) =
        cells.iter().copied().max_by(|a, b| p99_ratio((a.1, a.2)).total_cmp(&p99_ratio((b.1, b.2))))
    {
        figures.set("headline_clients", clients);
        figures.set_f64("commit_p99_us", percentile_us(&worst_ours.latency, 99.0));
        figures.set_f64("etcd_commit_p99_us", percentile_us(&worst_theirs.latency, 99.0));
        figures.set_f64("commit_p99_vs_etcd_ratio", p99_ratio((worst_ours, worst_theirs)));
        let throughput = cells.iter().map(|(_, o, t)| o.per_s() / t.per_s()).fold(f64::INFINITY, f64::min);
        figures.set_f64("commit_throughput_vs_etcd_ratio", throughput);
    }

    if args.json {
        println!("{}", figures.to_json());
        return Ok(());
    }
    println!(
        "bench control: 3-node metadata commits, {} B values ({} ms per cell after {} ms warm-up)",
        args.value_bytes, args.duration_ms, args.warmup_ms
    );
    println!(
        "{:>8} {:>12} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}",
        "writers", "ours/s", "p50 µs", "p99 µs", "p99.9 µs", "etcd/s", "p50 µs", "p99 µs", "p99.9 µs"
    );
    for (index, (clients, cell)) in ours.iter().enumerate() {
        let ours_line = format!(
            "{:>8} {:>12.0} {:>10.0} {:>10.0} {:>10.0}",
            clients,
            cell.per_s(),
            percentile_us(&cell.latency, 50.0),
            percentile_us(&cell.latency, 99.0),
            percentile_us(&cell.latency, 99.9)
        );
        match theirs.get(index) {
            Some((_, etcd)) => println!(
                "{ours_line} {:>12.0} {:>10.0} {:>10.0} {:>10.0}",
                etcd.per_s(),
                percentile_us(&etcd.latency, 50.0),
                percentile_us(&etcd.latency, 99.0),
                percentile_us(&etcd.latency, 99.9)
            ),
            None => println!("{ours_line}"),
        }
    }
    if let (Some(p99), Some(throughput)) =
        (figures.get_f64("commit_p99_vs_etcd_ratio"), figures.get_f64("commit_throughput_vs_etcd_ratio"))
    {
        println!(
            "headline (worst cell): commit p99 {p99:.2}x etcd's at {} writers (target <= 1), throughput at least {throughput:.2}x etcd's",
            figures.get_f64("headline_clients").unwrap_or(0.0)
        );
    }
    println!(
        "GLTS interval on loopback: width p50 {:.0} µs, p99 {:.0} µs over {} samples (target p99 < 1000 µs); true time outside the interval: {outside}",
        quantile_us(&widths, 50),
        quantile_us(&widths, 99),
        widths.len()
    );
    println!("GLTS local source of the control plane: {}", status.glts_local_source);
    Ok(())
}

pub fn elections(args: &ElectionsArgs) -> Result<()> {
    let binary = controlplane_binary(args.controlplane.as_deref())?;
    if args.kills == 0 {
        bail!("--kills: must be > 0");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    runtime.block_on(async {
        let run_dir = RunDir::create(&args.data_dir, "elections", false)?;
        let mut cluster = LocalCluster::start(&binary, run_dir.path(), 3, &[]).await?;
        cluster.wait_leader(Duration::from_secs(15)).await?;
        let mut times = Vec::new();
        let mut written = 0_u64;
        for round in 0..args.kills {
            let client = cluster.client().clone();
            client.write(Command::SetConfig { key: format!("soak/{round}"), value: "1".into() }, Duration::from_secs(10)).await?;
            written += 1;
            let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
            cluster.kill(leader)?;
            let killed = Instant::now();
            client.write(Command::SetConfig { key: format!("soak/{round}/after"), value: "1".into() }, Duration::from_secs(30)).await?;
            written += 1;
            let took = killed.elapsed();
            times.push(took);
            cluster.restart(leader)?;
            if !args.json && (round + 1) % 10 == 0 {
                eprintln!("bench elections: {}/{} kills, this one {:?}", round + 1, args.kills, took);
            }
        }
        let state = cluster.client().read(true, Duration::from_secs(10)).await?;
        let lost = (0..args.kills)
            .flat_map(|round| [format!("soak/{round}"), format!("soak/{round}/after")])
            .filter(|key| !state.config.contains_key(key))
            .count();
        times.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut figures = Figures::default();
        figures.set("kills", args.kills);
        figures.set("writes_committed", written);
        figures.set("writes_lost", lost);
        figures.set_f64("election_p50_ms", times.get(times.len() / 2).map_or(f64::NAN, |d| ms(*d)));
        figures.set_f64("election_p99_ms", times.get((times.len() - 1) * 99 / 100).map_or(f64::NAN, |d| ms(*d)));
        figures.set_f64("election_max_ms", times.last().map_or(f64::NAN, |d| ms(*d)));
        figures.set("elections_over_2s", times.iter().filter(|d| **d >= Duration::from_secs(2)).count());
        if args.json {
            println!("{}", figures.to_json());
        } else {
            println!(
                "bench elections: {} leader kills (SIGKILL); kill to first commit through a new leader: p50 {:.0} ms, p99 {:.0} ms, longest {:.0} ms; over 2 s: {}; committed writes lost: {lost} of {written}",
                args.kills,
                figures.get_f64("election_p50_ms").unwrap_or(f64::NAN),
                figures.get_f64("election_p99_ms").unwrap_or(f64::NAN),
                figures.get_f64("election_max_ms").unwrap_or(f64::NAN),
                figures.get("elections_over_2s").map_or(String::new(), ToString::to_string),
            );
        }
        if lost > 0 {
            bail!("{lost} committed writes lost");
        }
        Ok(())
    })
}
