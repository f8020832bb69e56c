//! `dataplane`: one Meridian data node. See `dataplane --help`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use dataplane::config::NodeConfig;
use dataplane::node::{self, StopFlag};
use platform as ops;

/// Runs a Meridian data node: one shard per core, each with its WAL, versioned store, chunk
/// server and client port.
///
/// On start every shard recovers (newest checkpoint plus the WAL after it), binds its port,
/// and the process prints one line `READY <addr of shard 0>,<addr of shard 1>,...` on stdout
/// (then `METRICS <url>` when metrics are served) and tells systemd READY=1 (Type=notify).
/// SIGTERM or SIGINT stops accepting, answers the requests already received, syncs the WAL,
/// writes a checkpoint per shard, hands the leases back and exits 0. A crash (SIGKILL, power
/// loss) loses no acknowledged write. Logs go to stderr, one line per event; set MERIDIAN_LOG
/// (e.g. `debug` or `warn,dataplane=info`) to change the levels.
#[derive(Debug, Parser)]
#[command(name = "dataplane", version)]
struct Args {
    /// TOML configuration file; flags override its values. See scripts/dataplane.example.toml.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory (WAL, chunks, checkpoints of every shard).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client address of shard 0; shard i listens on port + i. Port 0 lets each shard pick.
    #[arg(long)]
    listen: Option<String>,
    /// Number of shards (default: one per CPU).
    #[arg(long)]
    shards: Option<usize>,
    /// Control-plane addresses (comma-separated `ip:port`) to join: the node then stamps
    /// writes with the GLTS interval, registers, heartbeats and holds its shards' leases.
    /// Overrides `[control] seeds`.
    #[arg(long, value_delimiter = ',')]
    control: Option<Vec<String>>,
    /// Directory with `ca.pem`, `<node-id>.pem`, `<node-id>.key` (`controlplane certs`).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// This node's id in the cluster (stable across restarts; its certificate's name).
    #[arg(long)]
    node_id: Option<String>,
    /// Region of this node.
    #[arg(long)]
    region: Option<String>,
    /// Zone of this node.
    #[arg(long)]
    zone: Option<String>,
    /// Serve Prometheus metrics on this TCP address (overrides `[metrics] listen`).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Validate the configuration (file and flags) and exit without starting.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let allocator_tuned = dataplane::runtime::tune_allocator();
    let args = Args::parse();
    ops::logging::init();
    if !allocator_tuned {
        tracing::warn!("could not set malloc's trim and mmap thresholds; running with the C library's defaults");
    }
    let mut config = match &args.config {
        Some(path) => NodeConfig::from_file(path)?,
        None => NodeConfig::default(),
    };
    override_with(&mut config.data_dir, &args.data_dir);
    override_with(&mut config.listen, &args.listen);
    override_with(&mut config.shards, &args.shards);
    let control_flags = [args.control.is_some(), args.tls_dir.is_some(), args.node_id.is_some()];
    if control_flags.contains(&true) || args.region.is_some() || args.zone.is_some() {
        let control = config.control.get_or_insert_with(Default::default);
        override_with(&mut control.seeds, &args.control);
        override_with(&mut control.tls_dir, &args.tls_dir);
        override_with(&mut control.node_id, &args.node_id);
        override_with(&mut control.region, &args.region);
        override_with(&mut control.zone, &args.zone);
    }
    if let Some(listen) = &args.metrics_listen {
        config.metrics.get_or_insert_with(Default::default).listen = Some(listen.clone());
    }
    let resolved = config.resolve()?;
    if args.check_config {
        let control = resolved.control.as_ref().map_or_else(
            || "no control plane".to_string(),
            |control| {
                format!(
                    "node {} in {}/{}, control plane {}",
                    control.node_id,
                    control.region,
                    control.zone,
                    control.seeds.join(",")
                )
            },
        );
        let shard_memory = resolved.store.memory_bytes_max;
        println!(
            "configuration is valid: {} shards, data in {}, {control}\nstore memory budget: {} MiB ({} MiB per shard: \
             cache {} MiB shared, memtables up to {} MiB each)",
            resolved.shards,
            resolved.data_dir.display(),
            (shard_memory * resolved.shards as u64) >> 20,
            shard_memory >> 20,
            (shard_memory * resolved.shards as u64 / 2) >> 20,
            (shard_memory * 3 / 8) >> 20,
        );
        return Ok(());
    }
    std::fs::create_dir_all(&resolved.data_dir)
        .with_context(|| format!("cannot create data_dir {}", resolved.data_dir.display()))?;

    // Signals are blocked before any thread starts (threads inherit the mask), so only the
    // signal thread ever takes SIGTERM.
    let stop = StopFlag::default();
    watch_signals(stop.clone())?;
    // Before any shard opens: the shards' series register with the recorder installed here.
    let metrics = resolved.metrics.map(ops::metrics::install).transpose().map_err(anyhow::Error::msg)?;
    let metrics_url = metrics.map(|exporter| format!("http://{}/metrics", exporter.addr()));
    if let Some(url) = &metrics_url {
        tracing::info!(%url, "serving metrics");
    }
    let result = node::run(&resolved, &stop, move |addresses| {
        println!("READY {}", addresses.join(","));
        if let Some(url) = &metrics_url {
            println!("METRICS {url}");
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    });
    if let Err(error) = result {
        bail!("{error}");
    }
    Ok(())
}

/// A flag given on the command line replaces the config file's value.
fn override_with<T: Clone>(target: &mut Option<T>, flag: &Option<T>) {
    if flag.is_some() {
        target.clone_from(flag);
    }
}

/// Blocks SIGTERM and SIGINT in every thread (threads inherit the mask) and waits for them on
/// a dedicated thread, which asks the node to stop.
fn watch_signals(stop: StopFlag) -> anyhow::Result<()> {
    // SAFETY: sigset operations on a local, zero-initialised set; pthread_sigmask affects this
    // thread only, before any other thread exists.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("cannot block signals");
        }
        set
    };
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        loop {
            let mut signal = 0;
            // SAFETY: `set` is a valid signal set and `signal` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                tracing::info!(
                    signal,
                    "stopping: no new requests; answering those received, then syncing and checkpointing"
                );
                ops::notify::stopping("draining requests, syncing the WAL, checkpointing");
                stop.stop();
            }
        }
    })?;
    Ok(())
}
