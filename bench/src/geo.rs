//! `bench geo`: three regions on this machine (one `dataplane` each, region `a` the home of
//! every shard), the home's QUIC streams to `b` and `c` through the WAN proxy with a one-way
//! delay, an open-loop write load at the home, and per replica region the lag (RPO) sampled
//! every few milliseconds: `now - resolved timestamp`, read from each node's own status with
//! its own clock. Also: write latency at the home (from each write's intended send time, so
//! stalls are not hidden), writes lost (acknowledged at the home, missing in a replica after
//! convergence), bytes on the wire against raw bytes, the codecs' ratios on the same values,
//! and catch-up throughput of the QUIC stream on loopback without delay against iperf3 over
//! TCP measured in the same run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use client::{Client, ClientConfig};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use wan::{LinkConfig, Proxy};
use wire::repl::Codec;

use crate::kv::{Dataplane, dataplane_binary};
use crate::lag::{self, LagSampler};
use crate::process::{RunDir, WanThread};
use crate::report::{Figures, percentile_us, set_rpo_figures};
use testkit::ports::free_udp;

/// Options of `bench geo`.
#[derive(Debug, Args)]
pub struct GeoArgs {
    /// Measured time of the write load, ms (after warm-up).
    #[arg(long, default_value_t = 60_000)]
    duration_ms: u64,
    /// Warm-up, ms (load on, not measured).
    #[arg(long, default_value_t = 2_000)]
    warmup_ms: u64,
    /// Writes per second, open loop.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Value size, bytes.
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// One-way delay between regions, ms.
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// Shards per region.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// MiB written while a replica is cut off, to measure its catch-up throughput (0: skip).
    #[arg(long, default_value_t = 256)]
    catch_up_mib: u64,
    /// Parent of the run's directory. Removed after the run unless --keep-data.
    #[arg(long, default_value = "bench-data")]
    data_dir: PathBuf,
    /// The dataplane binary (default: next to this bench binary).
    #[arg(long)]
    dataplane: Option<PathBuf>,
    /// Keep the run's directory.
    #[arg(long)]
    keep_data: bool,
    /// Skip iperf3 (the throughput ratio is then absent).
    #[arg(long)]
    skip_iperf: bool,
    /// Print one JSON object with every figure.
    #[arg(long)]
    json: bool,
}

/// The lag the headline is held to (p99, at 20 ms one way).
const RPO_TARGET_MS: f64 = 30.0;
/// How often each replica's status is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// A value of `len` bytes for write `n`: JSON-like text with a few varying fields, as
/// application records are; the same generator feeds the codec measurement.
fn value(n: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 8] = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"];
    let mut text = format!("{{\"id\":{n},\"user\":\"u{:06}\",\"items\":[", n.wrapping_mul(2_654_435_761) % 1_000_000);
    let mut i = n;
    while text.len() < len {
        i = i.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        text.push_str(&format!("{{\"w\":\"{}\",\"q\":{}}},", WORDS[(i >> 61) as usize], (i >> 40) % 1000));
    }
    let mut bytes = text.into_bytes();
    bytes.truncate(len);
    bytes
}

fn key(n: u64) -> Vec<u8> {
    format!("geo/{n:010}").into_bytes()
}

/// Writes `<dir>/<region>.toml`: `extra` (other sections), then a `[replication]` section in
/// which `home` is the home of every shard (`None`: the control plane's placement, which needs
/// a `[control]` section in `extra`), the node listens on `listen` and its peers are `peers`.
pub(crate) fn region_config(
    dir: &Path,
    tls: &Path,
    region: &str,
    home: Option<&str>,
    listen: SocketAddr,
    peers: &[(&str, SocketAddr)],
    extra: &str,
) -> Result<PathBuf> {
    let home = home.map(|home| format!("home = \"{home}\"\n")).unwrap_or_default();
    let mut text = format!(
        "{extra}[replication]\nregion = \"{region}\"\n{home}listen = \"{listen}\"\ntls_dir = {tls:?}\nname = \"{region}\"\n"
    );
    for (peer, addr) in peers {
        text.push_str(&format!("[[replication.peers]]\nregion = \"{peer}\"\naddr = \"{addr}\"\n"));
    }
    let path = dir.join(format!("{region}.toml"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

async fn connect(node: &Dataplane) -> Result<Client> {
    let config = ClientConfig { retries: 0, request_timeout: Duration::from_secs(30), ..ClientConfig::default() };
    Ok(Client::connect(&node.addresses[0], config).await?)
}

/// Waits until the node behind `client` has resolved every region shipping to it past `ts` (a
/// node that does not answer, e.g. while it restarts, is asked again); how long that took.
pub(crate) async fn wait_resolved(client: &Client, ts: u64, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    while !client.replication_status().await.is_ok_and(|status| status.resolved_past(ts)) {
        if started.elapsed() > limit {
            bail!("a replica did not resolve past the last write within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(started.elapsed())
}

/// Calls `each` with every key under `prefix` the node behind `client` holds, page by page.
pub(crate) async fn for_each_key(client: &Client, prefix: &[u8], mut each: impl FnMut(&[u8])) -> Result<()> {
    let mut after = Vec::new();
    loop {
        let page = client.list(prefix, &after, 10_000, None).await?;
        for entry in &page.entries {
            each(&entry.key);
        }
        match page.next {
            Some(next) => after = next,
            None => return Ok(()),
        }
    }
}

/// Runs `bench geo`.
pub fn run(args: &GeoArgs) -> Result<()> {
    ensure!(args.rate > 0 && args.value_bytes > 0 && args.shards > 0, "rate, value size and shards must be positive");
    let binary = dataplane_binary(args.dataplane.as_ref())?;
    let iperf = !args.skip_iperf;
    let iperf_available =
        || std::process::Command::new("iperf3").arg("--version").output().is_ok_and(|output| output.status.success());
    if iperf && !iperf_available() {
        bail!("iperf3 not found: run scripts/install-deps.sh bench (Debian iperf3) or pass --skip-iperf");
    }
    let run_dir = RunDir::create(&args.data_dir, "geo", args.keep_data)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    runtime.block_on(run_async(args, &binary, run_dir.path()))
}

async fn run_async(args: &GeoArgs, binary: &Path, dir: &Path) -> Result<()> {
    platform::tls::generate(&dir.join("tls"), &["a".into(), "b".into(), "c".into()])?;
    let (listen_b, listen_c) = (free_udp()?, free_udp()?);
    let link = LinkConfig::with_delay(Duration::from_millis(args.delay_ms));
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let wan = WanThread::start()?;
    let to_b = wan.proxy(any, listen_b, link, link, 1).await?;
    let to_c = wan.proxy(any, listen_c, link, link, 2).await?;
    let start = |region: &str, listen: SocketAddr, peers: &[(&str, SocketAddr)]| -> Result<Dataplane> {
        let config = region_config(dir, &dir.join("tls"), region, Some("a"), listen, peers, "")?;
        Dataplane::start_with(binary, &dir.join(region), args.shards, &dir.join(format!("{region}.log")), Some(&config))
    };
    let b = start("b", listen_b, &[("a", free_udp()?)])?;
    let c = start("c", listen_c, &[("a", free_udp()?)])?;
    let a = start("a", free_udp()?, &[("b", to_b.addr()), ("c", to_c.addr())])?;
    let (home, replicas) = (connect(&a).await?, [("b", connect(&b).await?), ("c", connect(&c).await?)]);

    let mut figures = Figures::default();
    figures.set("bench", "geo");
    figures.set("regions", 3);
    figures.set("shards_per_region", args.shards);
    figures.set("one_way_delay_ms", args.delay_ms);
    figures.set("rate_per_s", args.rate);
    figures.set("value_bytes", args.value_bytes);
    figures.set("duration_ms", args.duration_ms);
    figures.set("codec", Codec::Lz4.name());

    // The open-loop load and the lag samplers.
    let total = Duration::from_millis(args.warmup_ms + args.duration_ms);
    let writes = u64::try_from(total.as_millis())? * args.rate / 1000;
    let measured_from = Duration::from_millis(args.warmup_ms);
    eprintln!(
        "bench geo: {writes} writes of {} B at {}/s to region a, replicas b and c at {} ms one way ...",
        args.value_bytes, args.rate, args.delay_ms
    );
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut samplers = Vec::new();
    for (region, client) in &replicas {
        let (client, sampling, region) = (client.clone(), sampling.clone(), region.to_string());
        samplers.push(tokio::spawn(async move {
            let mut lag = Histogram::<u64>::new(3).expect("histogram");
            let started = Instant::now();
            let mut series = Vec::new();
            let mut sampler = LagSampler::new(client, |status| status.lag_us("a"));
            let mut ticks = lag::schedule(SAMPLE_EVERY);
            while sampling.load(Ordering::Relaxed) {
                ticks.tick().await;
                if started.elapsed() < measured_from {
                    continue;
                }
                if let Some(lag_us) = sampler.sample(SAMPLE_EVERY).await {
                    let _ = lag.record(lag_us * 1000);
                    series.push((u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), lag_us));
                }
            }
            (region, lag, series)
        }));
    }
    let load = open_loop(&home, writes, args.rate, args.value_bytes, measured_from).await?;
    sampling.store(false, Ordering::Relaxed);
    let mut rpo = Vec::new();
    for sampler in samplers {
        rpo.push(sampler.await?);
    }

    // Convergence: every acknowledged write is in each replica.
    let mut lost = 0u64;
    for (region, client) in &replicas {
        wait_resolved(client, load.last_ts, Duration::from_secs(120)).await?;
        let missing = count_missing(client, &load.acked).await?;
        figures.set(format!("{region}_lost_writes"), missing);
        lost += missing;
    }
    let (forward_b, _) = to_b.handle().stats();
    let raw_bytes = load.raw_bytes as f64;

    figures.set("writes_acknowledged", load.acked.iter().filter(|acked| **acked).count());
    figures.set("writes_failed", load.failed);
    figures.set_f64("write_throughput_per_s", load.measured_ok as f64 / (args.duration_ms as f64 / 1000.0));
    figures.set_f64("write_p50_us", percentile_us(&load.latency, 50.0));
    figures.set_f64("write_p99_us", percentile_us(&load.latency, 99.0));
    figures.set_f64("write_p999_us", percentile_us(&load.latency, 99.9));
    set_rpo_figures(&mut figures, rpo.iter().map(|(region, lag, _)| (region.as_str(), lag)));
    figures.set_f64("rpo_target_p99_ms", RPO_TARGET_MS);
    figures.set("lost_writes", lost);
    figures.set("wire_bytes_to_b", forward_b.delivered_bytes);
    figures
        .set_f64("wire_datagram_mean_bytes_to_b", forward_b.delivered_bytes as f64 / forward_b.delivered.max(1) as f64);
    figures.set_f64("raw_bytes_written", raw_bytes);
    figures.set_f64("wire_vs_raw_ratio", forward_b.delivered_bytes as f64 / raw_bytes);
    for (codec, name) in [(Codec::Lz4, "lz4"), (Codec::Snappy, "snap")] {
        figures.set_f64(format!("{name}_compression_ratio"), codec_ratio(codec, args.value_bytes));
    }

    if args.catch_up_mib > 0 {
        eprintln!("bench geo: catch-up of {} MiB on loopback without delay ...", args.catch_up_mib);
        let catch_up = catch_up(&home, &replicas[0].1, &to_b, args.catch_up_mib, args.value_bytes).await?;
        figures.set_f64("catch_up_app_mb_per_s", catch_up.app_bytes as f64 / 1e6 / catch_up.seconds);
        figures.set_f64("catch_up_wire_mb_per_s", catch_up.wire_bytes as f64 / 1e6 / catch_up.seconds);
        figures.set("catch_up_app_bytes", catch_up.app_bytes);
        figures.set("catch_up_wire_bytes", catch_up.wire_bytes);
        figures.set_f64("catch_up_wire_vs_app_ratio", catch_up.wire_bytes as f64 / catch_up.app_bytes.max(1) as f64);
        figures.set_f64("catch_up_datagram_mean_bytes", catch_up.wire_bytes as f64 / catch_up.datagrams.max(1) as f64);
    }
    let series_path = dir.join("rpo.csv");
    let mut csv = String::from("region,elapsed_ms,lag_us\n");
    for (region, _, series) in &rpo {
        for (at, lag) in series {
            csv.push_str(&format!("{region},{at},{lag}\n"));
        }
    }
    std::fs::write(&series_path, csv)?;

    for node in [a, b, c] {
        node.stop()?;
    }
    // With the nodes stopped, the same idle machine for both: iperf3's TCP and quinn alone
    // (the replication's TLS and transport settings, nothing compressed, logged or applied).
    // The transport ratios compare bytes on the wire (compressed, framed, QUIC headers) with
    // iperf3 and quinn moving incompressible bytes: application bytes/s would count the
    // compression as transport speed.
    if let Some(wire) = figures.get_f64("catch_up_wire_mb_per_s") {
        eprintln!("bench geo: quinn alone on loopback ({LOOPBACK_CEILING_MIB} MiB over one stream) ...");
        let window = dataplane::config::quic_window_bytes(
            dataplane::config::DEFAULT_BANDWIDTH_MBIT,
            dataplane::config::DEFAULT_RTT_MS,
        );
        let tls = dir.join("tls");
        let quinn = tokio::task::spawn_blocking(move || {
            dataplane::repl::loopback_ceiling(&tls, "a", "b", window, LOOPBACK_CEILING_MIB << 20)
        })
        .await?
        .map_err(anyhow::Error::msg)?;
        figures.set_f64("quinn_loopback_mb_per_s", quinn);
        figures.set_f64("catch_up_wire_vs_quinn_loopback_ratio", wire / quinn);
        if !args.skip_iperf {
            let tcp = iperf3()?;
            figures.set_f64("iperf3_tcp_mb_per_s", tcp);
            figures.set_f64("catch_up_wire_vs_tcp_ratio", wire / tcp);
            figures.set_f64("quinn_loopback_vs_tcp_ratio", quinn / tcp);
        }
    }
    if args.json {
        println!("{}", figures.to_json());
    } else {
        print_summary(&figures, &rpo);
    }
    Ok(())
}

fn print_summary(figures: &Figures, rpo: &[RegionLag]) {
    let f = |key: &str| figures.get_f64(key).unwrap_or(f64::NAN);
    println!(
        "bench geo: 3 regions, {} ms one way, {} writes/s of {} B for {} ms",
        f("one_way_delay_ms"),
        f("rate_per_s"),
        f("value_bytes"),
        f("duration_ms")
    );
    println!(
        "  writes at the home: {:.0}/s, p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs ({} failed)",
        f("write_throughput_per_s"),
        f("write_p50_us"),
        f("write_p99_us"),
        f("write_p999_us"),
        f("writes_failed")
    );
    for (region, _, _) in rpo {
        println!(
            "  RPO {region}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} samples",
            f(&format!("{region}_rpo_p50_ms")),
            f(&format!("{region}_rpo_p99_ms")),
            f(&format!("{region}_rpo_max_ms")),
            f(&format!("{region}_rpo_samples"))
        );
    }
    println!("  lost writes: {}", f("lost_writes"));
    println!(
        "  wire bytes / raw bytes (lz4, QUIC and acks included): {:.2}; codecs on these values: lz4 {:.2}, snap {:.2}",
        f("wire_vs_raw_ratio"),
        f("lz4_compression_ratio"),
        f("snap_compression_ratio")
    );
    if figures.get("catch_up_wire_mb_per_s").is_some() {
        println!(
            "  catch-up over QUIC (durable at the replica): {:.1} MB/s of application bytes, {:.1} MB/s on the wire",
            f("catch_up_app_mb_per_s"),
            f("catch_up_wire_mb_per_s"),
        );
        println!(
            "  on the wire against iperf3 TCP loopback ({:.1} MB/s): {:.3}; against quinn alone on loopback ({:.1} MB/s, \
             same TLS and transport settings, {:.3} of iperf3): {:.3}",
            f("iperf3_tcp_mb_per_s"),
            f("catch_up_wire_vs_tcp_ratio"),
            f("quinn_loopback_mb_per_s"),
            f("quinn_loopback_vs_tcp_ratio"),
            f("catch_up_wire_vs_quinn_loopback_ratio")
        );
    }
    let p99 = f("rpo_p99_ms");
    println!(
        "headline: RPO p99 {p99:.1} ms worst region (target <= {RPO_TARGET_MS} ms: {}), max {:.1} ms, lost writes {}",
        if p99 <= RPO_TARGET_MS { "met" } else { "NOT met" },
        f("rpo_max_ms"),
        f("lost_writes")
    );
}

/// A replica region's lag samples: name, histogram (ns), (elapsed ms, lag µs) series.
type RegionLag = (String, Histogram<u64>, Vec<(u64, u64)>);

struct Load {
    latency: Histogram<u64>,
    acked: Vec<bool>,
    failed: u64,
    measured_ok: u64,
    last_ts: u64,
    raw_bytes: u64,
}

/// Issues `writes` puts at `rate` per second from their intended send times; latency counts
/// from the intended time.
async fn open_loop(
    client: &Client,
    writes: u64,
    rate: u64,
    value_bytes: usize,
    measured_from: Duration,
) -> Result<Load> {
    let started = Instant::now();
    let in_flight = Arc::new(Semaphore::new(4096));
    let last_ts = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let interval_ns = 1_000_000_000 / rate;
    for n in 0..writes {
        let intended = started + Duration::from_nanos(n * interval_ns);
        let now = Instant::now();
        if intended > now {
            tokio::time::sleep(intended - now).await;
        }
        let permit = in_flight.clone().acquire_owned().await?;
        let (client, last_ts) = (client.clone(), last_ts.clone());
        tasks.spawn(async move {
            let result = client.put(&key(n), &value(n, value_bytes)).await;
            let took = intended.elapsed();
            drop(permit);
            if let Ok(ts) = &result {
                last_ts.fetch_max(*ts, Ordering::Relaxed);
            }
            (n, intended, took, result.is_ok())
        });
    }
    let mut load = Load {
        latency: Histogram::new(3)?,
        acked: vec![false; usize::try_from(writes)?],
        failed: 0,
        measured_ok: 0,
        last_ts: 0,
        raw_bytes: 0,
    };
    while let Some(done) = tasks.join_next().await {
        let (n, intended, took, ok) = done?;
        if !ok {
            load.failed += 1;
            continue;
        }
        load.acked[usize::try_from(n)?] = true;
        load.raw_bytes += (key(n).len() + value_bytes) as u64;
        if intended.duration_since(started) >= measured_from {
            load.measured_ok += 1;
            let _ = load.latency.record(u64::try_from(took.as_nanos())?);
        }
    }
    load.last_ts = last_ts.load(Ordering::Relaxed);
    Ok(load)
}

/// Acknowledged writes a replica does not hold, found by listing every key it has.
async fn count_missing(client: &Client, acked: &[bool]) -> Result<u64> {
    let mut seen = vec![false; acked.len()];
    for_each_key(client, b"geo/", |key| {
        let number = std::str::from_utf8(&key[4..]).ok().and_then(|text| text.parse::<usize>().ok());
        if let Some(slot) = number.and_then(|n| seen.get_mut(n)) {
            *slot = true;
        }
    })
    .await?;
    Ok(acked.iter().zip(&seen).filter(|(acked, seen)| **acked && !**seen).count() as u64)
}

/// Raw bytes over compressed bytes of the bench's values framed as the shipper frames them, in
/// 64 KiB batches.
fn codec_ratio(codec: Codec, value_bytes: usize) -> f64 {
    let (mut raw_total, mut compressed_total) = (0usize, 0usize);
    let mut raw = Vec::new();
    for n in 0..20_000u64 {
        wire::repl::encode_entry(n, &[key(n), value(n, value_bytes)].concat(), &mut raw);
        if raw.len() >= 64 << 10 {
            raw_total += raw.len();
            compressed_total += dataplane::repl::codec::compress(codec, &raw).len();
            raw.clear();
        }
    }
    raw_total as f64 / compressed_total.max(1) as f64
}

/// What a catch-up moved and how long it took.
struct CatchUp {
    /// Keys and values written at the home while the replica was cut off.
    app_bytes: u64,
    /// UDP payload bytes the proxy delivered toward the replica meanwhile.
    wire_bytes: u64,
    datagrams: u64,
    seconds: f64,
}

/// Writes `mib` MiB at the home while the replica behind `proxy` is cut off, then heals the
/// link without delay, until the replica has resolved the last write.
async fn catch_up(home: &Client, replica: &Client, proxy: &Proxy, mib: u64, value_bytes: usize) -> Result<CatchUp> {
    let handle = proxy.handle();
    handle.partition(true);
    let count = (mib << 20) / value_bytes as u64;
    let mut last_ts = 0;
    let base = 1u64 << 40;
    let mut app_bytes = 0u64;
    // Batches of up to 256 writes and about 1 MiB, well inside a WAL record.
    let per_batch = (CATCH_UP_BATCH_BYTES / value_bytes.max(1)).clamp(1, 256);
    for chunk in (0..count).collect::<Vec<_>>().chunks(per_batch) {
        let items: Vec<(Vec<u8>, Vec<u8>)> = chunk.iter().map(|n| (key(base + n), value(*n, value_bytes))).collect();
        app_bytes += items.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
        let refs: Vec<(&[u8], &[u8])> = items.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        last_ts = last_ts.max(home.batch_put(&refs).await?);
    }
    handle.set(LinkConfig::default(), LinkConfig::default())?;
    let (before, _) = handle.stats();
    handle.partition(false);
    let took = wait_resolved(replica, last_ts, Duration::from_secs(600)).await?;
    let (after, _) = handle.stats();
    Ok(CatchUp {
        app_bytes,
        wire_bytes: after.delivered_bytes.saturating_sub(before.delivered_bytes),
        datagrams: after.delivered.saturating_sub(before.delivered),
        seconds: took.as_secs_f64().max(1e-6),
    })
}

/// Value bytes per batch written for the catch-up.
const CATCH_UP_BATCH_BYTES: usize = 1 << 20;

/// Bytes quinn alone carries for its loopback ceiling (a few seconds at its rate here).
const LOOPBACK_CEILING_MIB: u64 = 1024;

/// iperf3 TCP on loopback, MB/s received (3 s, one stream).
fn iperf3() -> Result<f64> {
    let port = testkit::ports::free_tcp_port()?.to_string();
    let server = std::process::Command::new("iperf3")
        .args(["-s", "-1", "-p", &port])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let mut server = testkit::process::ChildGuard::new("iperf3", server, PathBuf::from("/dev/null"));
    std::thread::sleep(Duration::from_millis(300));
    let output = std::process::Command::new("iperf3")
        .args(["-c", "127.0.0.1", "-p", &port, "-t", "3", "-J"])
        .output()
        .context("running iperf3 -c")?;
    let _ = server.check_running();
    ensure!(output.status.success(), "iperf3 -c failed: {}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let bits =
        json["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 JSON without end.sum_received")?;
    Ok(bits / 8.0 / 1e6)
}
