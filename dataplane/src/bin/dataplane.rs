//! `dataplane`: one Meridian data node. See `dataplane --help`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use dataplane::config::NodeConfig;
use dataplane::node::{self, StopFlag};

/// Runs a Meridian data node: one shard per core, each with its WAL, versioned store, chunk
/// server and client port.
///
/// On start every shard recovers (newest checkpoint plus the WAL after it), binds its port,
/// and the process prints one line `READY <addr of shard 0>,<addr of shard 1>,...` on stdout.
/// SIGTERM or SIGINT stops accepting, writes a checkpoint per shard and exits 0. A crash
/// (SIGKILL, power loss) loses no acknowledged write.
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
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => NodeConfig::from_file(path)?,
        None => NodeConfig::default(),
    };
    if args.data_dir.is_some() {
        config.data_dir = args.data_dir.clone();
    }
    if args.listen.is_some() {
        config.listen = args.listen.clone();
    }
    if args.shards.is_some() {
        config.shards = args.shards;
    }
    let resolved = config.resolve()?;
    if args.check_config {
        println!("configuration is valid: {} shards, data in {}", resolved.shards, resolved.data_dir.display());
        return Ok(());
    }
    std::fs::create_dir_all(&resolved.data_dir)
        .with_context(|| format!("cannot create data_dir {}", resolved.data_dir.display()))?;

    let stop = StopFlag::default();
    watch_signals(stop.clone())?;
    let result = node::run(&resolved, &stop, |addresses| {
        println!("READY {}", addresses.join(","));
        use std::io::Write;
        let _ = std::io::stdout().flush();
    });
    if let Err(error) = result {
        bail!("{error}");
    }
    Ok(())
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
                node::log(&format!("signal {signal}: stopping"));
                stop.stop();
            }
        }
    })?;
    Ok(())
}
