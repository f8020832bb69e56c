//! A whole `dataplane` node: every shard recovers its store, binds its client port, serves,
//! and on a stop request stops accepting, checkpoints and closes.

use std::io::Write;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use glommio::net::TcpListener;

use crate::config::Resolved;
use crate::control::ControlLink;
use crate::runtime::{RuntimeConfig, run_shards};
use crate::server::{self, ServerStats, ShardMap};
use crate::store::ShardStore;

/// Set to stop the node (by a signal handler thread or a test).
#[derive(Debug, Default, Clone)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// Asks every shard to stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    async fn wait(&self) {
        while !self.is_stopped() {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs the node until `stop` is set or a shard fails. `on_ready` gets every shard's client
/// address once all listen (after recovery).
pub fn run(
    config: &Resolved,
    stop: &StopFlag,
    on_ready: impl Fn(&[String]) + Send + Sync + 'static,
) -> Result<(), String> {
    let _lock = lock_data_dir(&config.data_dir)?;
    let mut config = config.clone();
    let link = match &config.control {
        Some(control) => {
            let shards = u32::try_from(config.shards).map_err(|_| "too many shards".to_string())?;
            let capacity = crate::control::capacity_bytes(&config.data_dir);
            let logger: controlplane::agent::Logger = Arc::new(|line: &str| log(&format!("control: {line}")));
            let link = ControlLink::start(control, shards, capacity, logger)?;
            log(&format!("GLTS interval from the control plane at {}", control.seeds.join(",")));
            config.store.clock = link.clock();
            Some(Arc::new(link))
        }
        None => None,
    };
    let runtime = RuntimeConfig { shards: config.shards, name: "meridian-shard".into(), ..RuntimeConfig::default() };
    let shard_count = u32::try_from(config.shards).map_err(|_| "too many shards".to_string())?;
    let map = ShardMap::new(config.shards);
    let serving = link.clone();
    let on_ready = Arc::new(move |addresses: &[String]| {
        if let (Some(link), Some(first)) = (&serving, addresses.first()) {
            link.serving(first.clone());
        }
        on_ready(addresses);
    });
    let stop = stop.clone();
    let results = run_shards::<(), _, _, _>(&runtime, move |context| {
        let shard_id = context.shard_id;
        async move {
            let result = shard_main(&config, shard_id, shard_count, map, &*on_ready, &stop).await;
            if result.is_err() {
                // One shard failing stops the node rather than leaving a partial one serving.
                stop.stop();
            }
            result
        }
    })
    .map_err(|error| error.to_string());
    if let Some(link) = link.and_then(|link| Arc::try_unwrap(link).ok()) {
        link.stop();
    }
    let results = results?;
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
}

async fn shard_main(
    config: &Resolved,
    shard_id: u32,
    shard_count: u32,
    map: ShardMap,
    on_ready: &(dyn Fn(&[String]) + Send + Sync),
    stop: &StopFlag,
) -> Result<(), String> {
    let store_config = config.store_for(shard_id);
    let started = std::time::Instant::now();
    let store = ShardStore::open(store_config).await.map_err(|error| format!("shard {shard_id}: {error}"))?;
    let stats = store.stats();
    log(&format!(
        "shard {shard_id} recovered in {} ms: {} versions from checkpoint at LSN {}, {} WAL records replayed, {} keys",
        started.elapsed().as_millis(),
        stats.checkpoint_versions_loaded,
        stats.checkpoint_lsn,
        stats.replayed_records,
        stats.keys
    ));
    let port = if config.port == 0 { 0 } else { config.port + u16::try_from(shard_id).unwrap_or(0) };
    let listener = TcpListener::bind((config.host.as_str(), port))
        .map_err(|error| format!("shard {shard_id}: bind {}:{port}: {error}", config.host))?;
    let address = listener.local_addr().map_err(|error| format!("shard {shard_id}: {error}"))?;
    if map.set(shard_id, address) {
        on_ready(&map.addresses());
    }
    store.spawn_maintenance();
    let stats = Rc::new(ServerStats::default());
    server::serve(listener, store.clone(), shard_count, map, config.server, stats, stop.wait()).await;
    store.close().await.map_err(|error| format!("shard {shard_id}: close: {error}"))?;
    log(&format!("shard {shard_id} stopped"));
    Ok(())
}

/// Takes an exclusive `flock` on `<data_dir>/LOCK` for the life of the returned file, so two
/// processes never share a data directory.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let path = data_dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!("data_dir {} is in use by another dataplane process", data_dir.display()));
    }
    Ok(file)
}

/// One line on stderr (journald-friendly; structured logging arrives with the operations issue).
pub fn log(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "dataplane: {line}");
}
