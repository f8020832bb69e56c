//! `controlplane`: one Raft member of Meridian's control plane (metadata, leases, GLTS).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use controlplane::config::NodeConfig;
use controlplane::node::Node;
use controlplane::raftlog::LogIo;
use platform as ops;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Meridian control plane: Raft metadata (regions, data nodes, placement, leases, \
snapshot catalog), the GLTS interval clock, membership. Run 3 or 5 per deployment."
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run a node. Settings come from --config, then the flags given here.
    Run(Box<RunArgs>),
    /// Write a certificate + key per name (mutual TLS for every node and client):
    /// <out>/<name>.pem, <out>/<name>.key, signed by the cluster CA in <out> (ca.pem, ca.key),
    /// which is created first when <out> has none. Run again on the same directory to issue
    /// certificates for new nodes or data nodes.
    Certs {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Names to issue certificates for (nodes and clients), e.g. cp1 cp2 cp3 admin.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// TOML config file (see scripts/controlplane.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id (> 0, never reused).
    #[arg(long)]
    id: Option<u64>,
    /// QUIC listen address, e.g. 127.0.0.1:7100.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address other nodes reach this one at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Directory for the Raft log and snapshots.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory holding ca.pem and <tls-name>.pem/.key.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Name of this node's certificate (default: cp<id>).
    #[arg(long)]
    tls_name: Option<String>,
    /// A first member as id=addr (repeat). The lowest id bootstraps the cluster.
    #[arg(long = "initial-member")]
    initial_members: Vec<String>,
    /// A running member to join through (repeat), for nodes not in the initial members.
    #[arg(long = "seed")]
    seeds: Vec<String>,
    /// Honour fault-injection requests (tests only).
    #[arg(long)]
    fault_injection: bool,
    /// Snapshot (and purge the log) after this many entries (raft.snapshot_after_entries).
    #[arg(long)]
    snapshot_after_entries: Option<u64>,
    /// Entries kept behind a snapshot for slow followers (raft.keep_after_snapshot).
    #[arg(long)]
    keep_after_snapshot: Option<u64>,
    /// A data node silent this long is suspect (membership.suspect_after_ms).
    #[arg(long)]
    suspect_after_ms: Option<u64>,
    /// A data node silent this long is dead (membership.dead_after_ms).
    #[arg(long)]
    dead_after_ms: Option<u64>,
    /// Raft log I/O: auto (io_uring, else blocking), uring or std.
    #[arg(long, value_enum)]
    log_io: Option<LogIo>,
    /// Take a global snapshot this often while leader, ms; 0 for none (snapshots.every_ms).
    #[arg(long)]
    snapshot_every_ms: Option<u64>,
    /// Take a global snapshot once the data nodes' WALs have written this many bytes since the
    /// last one; 0 for none (snapshots.every_wal_bytes).
    #[arg(long)]
    snapshot_every_wal_bytes: Option<u64>,
    /// Mark a snapshot failed in a region that cannot read it this long, ms
    /// (snapshots.track_timeout_ms).
    #[arg(long)]
    snapshot_track_timeout_ms: Option<u64>,
    /// Serve Prometheus metrics on this TCP address (metrics.listen); port 0 picks one, printed
    /// on stdout as `METRICS http://addr/metrics`.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Validate the configuration (file and flags) and exit without starting.
    #[arg(long)]
    check_config: bool,
}

fn config_from(args: RunArgs) -> Result<NodeConfig> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::from_file(path)?,
        None => {
            let (Some(id), Some(listen), Some(data_dir), Some(tls_dir)) =
                (args.id, args.listen, args.data_dir.clone(), args.tls_dir.clone())
            else {
                bail!("without --config, give --id, --listen, --data-dir and --tls-dir");
            };
            NodeConfig {
                id,
                listen,
                advertise: None,
                data_dir,
                tls_dir,
                tls_name: format!("cp{id}"),
                initial_members: vec![],
                seeds: vec![],
                fault_injection: false,
                log_io: LogIo::default(),
                raft: Default::default(),
                membership: Default::default(),
                replica_sets: Default::default(),
                glts: Default::default(),
                snapshots: Default::default(),
                metrics: None,
            }
        }
    };
    if let Some(id) = args.id {
        config.id = id;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(advertise) = args.advertise {
        config.advertise = Some(advertise);
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(dir) = args.tls_dir {
        config.tls_dir = dir;
    }
    if let Some(name) = args.tls_name {
        config.tls_name = name;
    }
    if !args.initial_members.is_empty() {
        config.initial_members = args.initial_members;
    }
    if !args.seeds.is_empty() {
        config.seeds = args.seeds;
    }
    config.fault_injection |= args.fault_injection;
    if let Some(entries) = args.snapshot_after_entries {
        config.raft.snapshot_after_entries = entries;
    }
    if let Some(entries) = args.keep_after_snapshot {
        config.raft.keep_after_snapshot = entries;
    }
    if let Some(ms) = args.suspect_after_ms {
        config.membership.suspect_after_ms = ms;
    }
    if let Some(ms) = args.snapshot_every_ms {
        config.snapshots.every_ms = ms;
    }
    if let Some(bytes) = args.snapshot_every_wal_bytes {
        config.snapshots.every_wal_bytes = bytes;
    }
    if let Some(ms) = args.snapshot_track_timeout_ms {
        config.snapshots.track_timeout_ms = ms;
    }
    if let Some(ms) = args.dead_after_ms {
        config.membership.dead_after_ms = ms;
    }
    if let Some(io) = args.log_io {
        config.log_io = io;
    }
    if let Some(listen) = args.metrics_listen {
        config.metrics = Some(controlplane::config::MetricsConfig { listen });
    }
    config.validate()?;
    Ok(config)
}

async fn run(config: NodeConfig) -> Result<()> {
    let metrics = config
        .metrics
        .as_ref()
        .map(|metrics| ops::metrics::install(metrics.listen))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    // Handlers first: a SIGTERM during start-up still stops cleanly.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    ops::notify::status("recovering the raft log");
    let node = Node::start(config).await?;
    println!("ready");
    if let Some(metrics) = &metrics {
        println!("METRICS http://{}/metrics", metrics.addr());
    }
    ops::notify::ready(&format!("serving as node {}", node.id()));
    tokio::spawn(node.clone().watchdog());
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    ops::notify::stopping("shutting down");
    tracing::info!("shutting down");
    node.shutdown().await.context("raft shutdown")?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ops::logging::init();
    let result = match cli.command {
        Commands::Certs { out, names } => platform::tls::generate(&out, &names)
            .map(|()| println!("wrote {} certificates and ca.pem to {}", names.len(), out.display())),
        Commands::Run(args) => {
            let check_only = args.check_config;
            match config_from(*args) {
                Ok(config) if check_only => {
                    println!(
                        "configuration is valid: node {} on {}, data in {}",
                        config.id,
                        config.listen,
                        config.data_dir.display()
                    );
                    Ok(())
                }
                Ok(config) => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .context("starting the runtime")
                    .and_then(|runtime| runtime.block_on(run(config))),
                Err(error) => Err(error),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("controlplane: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
