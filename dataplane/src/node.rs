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
use crate::repl::{Replication, ShardSide};
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
    let mut map = ShardMap::new(config.shards);
    let mut shard_sides = Vec::new();
    let replication = match &config.replication {
        Some(repl) => {
            let mut thread_sides = Vec::new();
            for shard in 0..shard_count {
                let store = config.store_for(shard);
                let (shard_side, thread_side) =
                    crate::repl::shard_link(shard, store.dir.clone(), store.wal.record_payload_bytes_max);
                shard_sides.push(Some(shard_side));
                thread_sides.push(thread_side);
            }
            let logger: crate::repl::shell::Logger = Arc::new(|line: &str| log(&format!("replication: {line}")));
            let replication = Replication::start(repl.clone(), thread_sides, logger)?;
            log(&format!(
                "replication: region {} ({}), endpoint {}",
                repl.region,
                if repl.is_home() {
                    "home: ships to its peers".to_string()
                } else {
                    format!("replica of {}", repl.home)
                },
                replication.addr()
            ));
            map = map.with_replication(replication.resolved());
            Some(replication)
        }
        None => None,
    };
    let shard_sides = Arc::new(std::sync::Mutex::new(shard_sides));
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
        let side = shard_sides
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(shard_id as usize)
            .and_then(Option::take);
        async move {
            let result = shard_main(&config, shard_id, shard_count, map, side, &*on_ready, &stop).await;
            if result.is_err() {
                // One shard failing stops the node rather than leaving a partial one serving.
                stop.stop();
            }
            result
        }
    })
    .map_err(|error| error.to_string());
    if let Some(replication) = replication {
        replication.stop();
    }
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
    side: Option<ShardSide>,
    on_ready: &(dyn Fn(&[String]) + Send + Sync),
    stop: &StopFlag,
) -> Result<(), String> {
    let mut store_config = config.store_for(shard_id);
    if let (Some(side), Some(repl)) = (&side, &config.replication) {
        store_config.wal_hold = side.hold.clone();
        if !repl.is_home() {
            store_config.replica_of = Some(repl.home.clone());
        }
    }
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
    let replication_tasks = match (side, &config.replication) {
        (Some(side), Some(repl)) => Some(spawn_replication(&store, side, repl.closed_interval)),
        _ => None,
    };
    let stats = Rc::new(ServerStats::default());
    server::serve(listener, store.clone(), shard_count, map, config.server, stats, stop.wait()).await;
    if let Some(tasks) = replication_tasks {
        for task in tasks {
            task.cancel();
        }
    }
    store.close().await.map_err(|error| format!("shard {shard_id}: close: {error}"))?;
    log(&format!("shard {shard_id} stopped"));
    Ok(())
}

/// The shard's half of replication: publishes its closed point every `interval` (the
/// shipper tails the WAL up to it), and applies the records shipped to it, each in its own
/// task so they share WAL barriers.
fn spawn_replication(store: &ShardStore, side: ShardSide, interval: Duration) -> Vec<glommio::task::JoinHandle<()>> {
    let ShardSide { points, mut applies, .. } = side;
    let publisher = {
        let store = store.clone();
        glommio::spawn_local(async move {
            loop {
                if let Ok(point) = store.closed_point() {
                    points.send_if_modified(|current| {
                        let changed = *current != point;
                        *current = point;
                        changed
                    });
                }
                glommio::timer::sleep(interval).await;
            }
        })
        .detach()
    };
    let applier = {
        let store = store.clone();
        glommio::spawn_local(async move {
            while let Some(apply) = applies.recv().await {
                let store = store.clone();
                glommio::spawn_local(async move {
                    let result = store.apply_replicated(apply.glt, &apply.payload).await;
                    let _ = apply.done.send(result.map_err(|error| error.to_string()));
                })
                .detach();
            }
        })
        .detach()
    };
    vec![publisher, applier]
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
