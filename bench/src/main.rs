//! `bench`: Meridian's benchmarks. Each compares Meridian with a peer or with the device's
//! physical limit measured in the same run, prints a human summary, and with `--json` one
//! JSON object of every figure (units in key names, ratios as `*_ratio`).

mod cluster;
mod control;
mod device;
mod engine;
mod etcd;
mod geo;
mod kv;
mod lag;
mod process;
mod redis;
mod replicas;
mod report;
mod store;
mod wal;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Meridian benchmarks, each measured against a peer or the device limit in the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The main job (`make demo`): a 3-node control plane and three regions of data nodes on
    /// this machine with the WAN proxy between them, an open-loop workload with live progress,
    /// scenario events (--partition, --kill-node), and a report folder (report.json, report.md,
    /// SVG/PNG plots, logs) whose path is the last line printed.
    Cluster(cluster::ClusterArgs),
    /// Global snapshots: `bench cluster` taking one every --every (100 ms) for --duration under
    /// a small write load; request-to-readable p50/p99 in every region (`availability_p99_ms`,
    /// worst region) and the last snapshots compared across regions.
    Snapshot(cluster::SnapshotArgs),
    /// The store engine's evaluation: lsm-tree (key-value separated) under a memory budget,
    /// filled to several times it, overwritten and read at random, against RocksDB's db_bench
    /// with the same shape and fio's random 4 KiB reads.
    Engine(engine::EngineArgs),
    /// One shard's store under a memory budget (WAL + engine), filled with 1 KiB values to
    /// several times the budget by 256 durable writers, overwritten and read at random, restart
    /// time at full size, against RocksDB's db_bench --sync=1 and fio's random 4 KiB reads.
    Store(store::StoreArgs),
    /// Durable WAL appends (O_DIRECT + group commit + fdatasync) against fio and a raw
    /// write+fdatasync probe at the WAL's own mean batch size.
    Wal(wal::WalArgs),
    /// Durable puts and gets through the client against a dataplane process, next to
    /// redis-server (appendonly yes, appendfsync always) under redis-benchmark.
    Kv(kv::KvArgs),
    /// Metadata commits on a 3-node control plane next to a 3-member etcd doing the same
    /// writes, and the GLTS interval width on loopback.
    Control(control::ControlArgs),
    /// Three regions with WAN emulation: RPO per replica region under an open-loop write load,
    /// write latency at the home, lost writes, compression, QUIC catch-up vs iperf3.
    Geo(geo::GeoArgs),
    /// Replica sets inside a region: three nodes in three zones, sets of three copies, against
    /// sets of one copy at the same offered load; failover time over --kills SIGKILLs of a busy
    /// shard's primary, the stall a backup's death causes, lost writes.
    Replicas(replicas::ReplicasArgs),
    /// Leader-kill soak: SIGKILL the control plane's leader N times; the longest time to the
    /// first commit through a new leader, and whether any committed write was lost.
    Elections(control::ElectionsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Cluster(args) => cluster::run(&args),
        Command::Snapshot(args) => cluster::run_snapshot(&args),
        Command::Engine(args) => engine::run(&args),
        Command::Store(args) => store::run(&args),
        Command::Wal(args) => wal::run(&args),
        Command::Kv(args) => kv::run(&args),
        Command::Control(args) => control::run(&args),
        Command::Geo(args) => geo::run(&args),
        Command::Elections(args) => control::elections(&args),
        Command::Replicas(args) => replicas::run(&args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}
