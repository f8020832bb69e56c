//! A whole `dataplane` node: every shard recovers its store, binds its client port, serves,
//! and on a stop request stops accepting, checkpoints and closes.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use glommio::net::TcpListener;

use crate::config::Resolved;
use crate::control::ControlLink;
use crate::repl::{Replication, ShardSide};
use crate::runtime::{RuntimeConfig, run_shards};
use crate::server::{self, ShardMap};
use crate::store::{Progress, ShardFiles, ShardStore};
use platform::notify;

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
    check_origin(&config.data_dir, config.replication.as_ref().and_then(|repl| repl.origin))?;
    let mut config = config.clone();
    let sets = start_replica_sets(&config)?;
    let link = start_control_link(&mut config, sets.as_ref())?;
    let runtime = RuntimeConfig { shards: config.shards, name: "meridian-shard".into(), ..RuntimeConfig::default() };
    let shard_count = u32::try_from(config.shards).map_err(|_| "too many shards".to_string())?;
    let Replicating { replication, shard_sides, map } = start_replication(&mut config, link.as_deref(), shard_count)?;
    let shard_sides = Arc::new(std::sync::Mutex::new(shard_sides));
    let copy_channels = Arc::new(std::sync::Mutex::new(
        sets.as_ref()
            .map(|sets| {
                sets.channels
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .drain(..)
                    .map(Some)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    ));
    let sets_shared = sets.as_ref().map(|sets| (Arc::clone(&sets.host), sets.sender.clone()));
    notify::status("recovering");
    let serving = link.clone();
    let watchdog = Watchdog::new(config.shards);
    let ready = watchdog.clone();
    let on_ready = Arc::new(move |addresses: &[String]| {
        if let (Some(link), Some(first)) = (&serving, addresses.first()) {
            link.serving(first.clone());
        }
        on_ready(addresses);
        ready.set_ready();
        notify::ready(&format!("serving {} shards on {}", addresses.len(), addresses.join(",")));
    });
    if let Some(period) = notify::watchdog_interval() {
        watchdog.clone().spawn(period, stop.clone())?;
    }
    let stop = stop.clone();
    let results = run_shards::<(), _, _, _>(&runtime, move |context| {
        let shard_id = context.shard_id;
        let side = shard_sides
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(shard_id as usize)
            .and_then(Option::take);
        let copy = copy_channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(shard_id as usize)
            .and_then(Option::take)
            .zip(sets_shared.clone())
            .map(|(channels, (host, sender))| CopySide { channels, host, sender });
        async move {
            let supervision = Supervision { on_ready: &*on_ready, stop: &stop, watchdog: &watchdog };
            let result = shard_main(&config, shard_id, shard_count, map, (side, copy), supervision).await;
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

/// The node's replica sets: the copies' host for the agent, the links thread, and each
/// shard's channels.
struct ReplicaSets {
    host: Arc<crate::replica::NodeReplicas>,
    sender: crate::replica::NetSender,
    addr: std::net::SocketAddr,
    channels: std::sync::Mutex<Vec<crate::replica::CopyChannels>>,
}

/// A shard's end of the replica sets.
struct CopySide {
    channels: crate::replica::CopyChannels,
    host: Arc<crate::replica::NodeReplicas>,
    sender: crate::replica::NetSender,
}

/// With `[replica_sets]`: the links thread and the copies' host.
fn start_replica_sets(config: &Resolved) -> Result<Option<ReplicaSets>, String> {
    let (Some(sets), Some(control)) = (&config.replica_sets, &config.control) else { return Ok(None) };
    let shards = u32::try_from(config.shards).map_err(|_| "too many shards".to_string())?;
    let (host, frames, channels) = crate::replica::NodeReplicas::new(&control.node_id, shards);
    let net_config = crate::replica::NetConfig {
        listen: sets.listen,
        tls_dir: control.tls_dir.clone(),
        name: control.node_id.clone(),
    };
    let net = crate::replica::ReplicaNet::start(net_config, frames)?;
    let (sender, addr) = (net.sender(), net.addr());
    host.set_net(Arc::new(net));
    Ok(Some(ReplicaSets { host, sender, addr, channels: std::sync::Mutex::new(channels) }))
}

/// With `[control]`: joins the control plane (agent thread, GLTS clock, WAL volume for the
/// heartbeats) and makes its clock the store's.
fn start_control_link(config: &mut Resolved, sets: Option<&ReplicaSets>) -> Result<Option<Arc<ControlLink>>, String> {
    let Some(control) = &config.control else { return Ok(None) };
    let shards = u32::try_from(config.shards).map_err(|_| "too many shards".to_string())?;
    let capacity = crate::control::capacity_bytes(&config.data_dir);
    // Every shard's WAL adds its bytes here; heartbeats report the sum.
    let wal_volume = Arc::new(std::sync::atomic::AtomicU64::new(0));
    config.store.wal.volume = Some(wal_volume.clone());
    let read_homes = config.replication.as_ref().is_some_and(|repl| repl.homes.is_empty());
    let replicas = sets.map(|sets| {
        let host: Arc<dyn controlapi::agent::ReplicaHost> = sets.host.clone();
        (sets.addr.to_string(), host)
    });
    let link = ControlLink::start(control, shards, capacity, wal_volume, read_homes, replicas)?;
    tracing::info!(seeds = %control.seeds.join(","), "GLTS interval from the control plane");
    config.store.clock = link.clock();
    Ok(Some(Arc::new(link)))
}

/// The replication thread, each shard's side of its link, and the shard map that knows what
/// is readable.
struct Replicating {
    replication: Option<Replication>,
    shard_sides: Vec<Option<ShardSide>>,
    map: ShardMap,
}

/// With `[replication]`: places the shards (from the control plane when the config names no
/// home) and starts the replication thread; without, snapshot reads wait for the node's own
/// shards only.
fn start_replication(
    config: &mut Resolved,
    link: Option<&ControlLink>,
    shard_count: u32,
) -> Result<Replicating, String> {
    if let Some(repl) = config.replication.as_mut().filter(|repl| repl.homes.is_empty()) {
        let placement = link.and_then(ControlLink::placement).ok_or("replication: no home regions")?;
        repl.place(shard_count, placement)?;
    }
    let map = ShardMap::new(config.shards);
    let Some(repl) = &config.replication else {
        let homes = vec!["local".to_owned(); config.shards];
        let map = map.with_readable(Arc::new(crate::repl::Resolved::new("local", &homes)));
        return Ok(Replicating { replication: None, shard_sides: Vec::new(), map });
    };
    let (mut shard_sides, mut thread_sides) = (Vec::new(), Vec::new());
    for shard in 0..shard_count {
        let store = config.store_for(shard);
        let (shard_side, thread_side) = crate::repl::shard_link(|tail, engine| {
            ShardFiles::new(store.dir.clone(), shard, store.wal.record_payload_bytes_max, Some(tail), engine)
        });
        shard_sides.push(Some(shard_side));
        thread_sides.push(thread_side);
    }
    let replication = Replication::start(repl.clone(), thread_sides, config.store.clock.clone())?;
    tracing::info!(region = %repl.region, roles = %repl.roles(), endpoint = %replication.addr(), "replication started");
    let map = map.with_replication(replication.resolved());
    Ok(Replicating { replication: Some(replication), shard_sides, map })
}

/// What a shard reports to and hears from the node: readiness, the stop request, progress.
#[derive(Clone, Copy)]
struct Supervision<'a> {
    on_ready: &'a (dyn Fn(&[String]) + Send + Sync),
    stop: &'a StopFlag,
    watchdog: &'a Watchdog,
}

async fn shard_main(
    config: &Resolved,
    shard_id: u32,
    shard_count: u32,
    map: ShardMap,
    (side, copy_side): (Option<ShardSide>, Option<CopySide>),
    supervision: Supervision<'_>,
) -> Result<(), String> {
    let Supervision { on_ready, stop, watchdog } = supervision;
    let mut store_config = config.store_for(shard_id);
    let copy_tail = prepare_copy_store(&mut store_config, copy_side.is_some());
    if let (Some(side), Some(repl)) = (&side, &config.replication) {
        // With multi-master keyspaces a snapshot cannot tell a key deleted at its source from
        // one the source has not received yet: the WAL is kept for every peer, however far
        // behind, so that no stream needs one.
        store_config.wal_hold_bytes_max = if repl.is_multi_master() { u64::MAX } else { repl.wal_hold_bytes_max };
        if repl.ships_shard(shard_id) {
            // Nothing is released before the shard's streams said what their peers need.
            store_config.wal_hold_lsn = 0;
            store_config.wal.tail = Some(side.tail.clone());
        }
        if !repl.is_home_of(shard_id) {
            store_config.replica_of = repl.home_of(shard_id).map(str::to_owned);
        }
        if !repl.holds(shard_id) {
            let home = repl.home_of(shard_id).unwrap_or_default();
            let replicas = repl.replicas.as_ref().and_then(|replicas| replicas.get(shard_id as usize));
            store_config.not_held = Some(format!(
                "shard {shard_id} is not kept in region {}: it takes writes in region {home} and is replicated to {}",
                repl.region,
                replicas.map_or_else(String::new, |regions| regions.join(", "))
            ));
        }
        store_config.multi_master = repl.multi_master.iter().map(|prefix| prefix.as_bytes().to_vec()).collect();
        store_config.origin = repl.origin;
        if repl.is_multi_master() {
            // Nothing is collected before every source said what it has shipped.
            store_config.collect_floor = 0;
        }
    }
    let started = std::time::Instant::now();
    let store = ShardStore::open(store_config).await.map_err(|error| format!("shard {shard_id}: {error}"))?;
    let stats = store.stats();
    tracing::info!(
        shard = shard_id,
        elapsed_ms = started.elapsed().as_millis(),
        replay_from_lsn = stats.checkpoint_lsn,
        replayed_records = stats.replayed_records,
        versions = stats.versions,
        engine_disk_bytes = stats.engine_disk_bytes,
        "shard recovered"
    );
    if let Some(side) = &side {
        // Snapshots for peers read the engine from now on.
        let _ = side.engine.set(store.engine());
    }
    let port = if config.port == 0 { 0 } else { config.port + u16::try_from(shard_id).unwrap_or(0) };
    let listener = TcpListener::bind((config.host.as_str(), port))
        .map_err(|error| format!("shard {shard_id}: bind {}:{port}: {error}", config.host))?;
    let address = listener.local_addr().map_err(|error| format!("shard {shard_id}: {error}"))?;
    if map.set(shard_id, address) {
        on_ready(&map.addresses());
    }
    let (copy, copy_tasks) = match copy_side {
        Some(copy_side) => start_copy(config, &store, copy_tail, copy_side)?,
        None => (None, Vec::new()),
    };
    store.spawn_maintenance();
    let heartbeat = spawn_heartbeat(&store, watchdog.clone(), shard_id);
    let replication_task = match (side, &config.replication) {
        (Some(side), Some(repl)) => {
            let receives = !repl.sources_of(shard_id).is_empty();
            Some(crate::repl::shard::spawn(&store, side, repl.closed_interval, repl.ships_shard(shard_id), receives))
        }
        _ => None,
    };
    // A shard that takes writes here publishes how far they are applied, for snapshot reads.
    let applied_task = match (&config.replication, map.readable()) {
        (Some(repl), Some(table)) if repl.ships_shard(shard_id) => {
            Some(spawn_applied(&store, shard_id, table, repl.closed_interval))
        }
        (None, Some(table)) => Some(spawn_applied(&store, shard_id, table, APPLIED_INTERVAL)),
        _ => None,
    };
    server::serve(listener, store.clone(), copy.clone(), shard_count, map, config.server, stop.wait()).await;
    heartbeat.cancel();
    if let Some(copy) = &copy {
        copy.shut_down();
    }
    for task in copy_tasks {
        task.cancel();
    }
    drop(copy);
    for task in [replication_task, applied_task].into_iter().flatten() {
        task.cancel();
    }
    store.close().await.map_err(|error| format!("shard {shard_id}: close: {error}"))?;
    tracing::info!(shard = shard_id, "shard stopped: requests answered, WAL synced, checkpoint written");
    Ok(())
}

/// Test failpoint: when set to N, every shard's WAL fails its N-th `fdatasync` with EIO.
pub const WAL_SYNC_EIO_ENV: &str = "MERIDIAN_FAILPOINT_WAL_SYNC_EIO_AFTER";

/// The tail cache of a shard copy's WAL: what its primary sends the other members from.
const COPY_TAIL_BYTES: usize = 32 << 20;

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// A replica-set copy's store: its WAL is the set's log (with the tail cache the primary sends
/// from). And the test failpoint [`WAL_SYNC_EIO_ENV`].
fn prepare_copy_store(store_config: &mut crate::store::StoreConfig, copy: bool) -> Option<Arc<crate::wal::WalTail>> {
    if let Some(after) = std::env::var(WAL_SYNC_EIO_ENV).ok().and_then(|n| n.parse::<u64>().ok()) {
        let faults = Arc::new(crate::wal::FaultInjector::default());
        faults.fail_sync(after, libc::EIO);
        store_config.wal.faults = Some(faults);
    }
    copy.then(|| {
        let tail = Arc::new(crate::wal::WalTail::new(COPY_TAIL_BYTES));
        store_config.set_log = true;
        store_config.wal.tail = Some(Arc::clone(&tail));
        tail
    })
}

/// The shard's copy in its replica set, and the tasks that feed it.
fn start_copy(
    config: &Resolved,
    store: &ShardStore,
    tail: Option<Arc<crate::wal::WalTail>>,
    side: CopySide,
) -> Result<(Option<crate::replica::ShardCopy>, Vec<glommio::task::JoinHandle<()>>), String> {
    let (Some(sets), Some(control)) = (&config.replica_sets, &config.control) else { return Ok((None, Vec::new())) };
    let shard_id = store.config().shard_id;
    let timing = crate::replica::Timing {
        member_timeout_ns: duration_ns(sets.member_timeout),
        // A silent member misses four heartbeats before it is removed.
        heartbeat_ns: duration_ns(sets.member_timeout / 4),
        retry_ns: duration_ns(sets.member_timeout / 2),
    };
    let links = Rc::new(crate::replica::NodeLinks { sender: side.sender, host: Arc::clone(&side.host) });
    let copy = crate::replica::ShardCopy::start(&control.node_id, timing, store.clone(), tail, links)
        .map_err(|error| format!("shard {shard_id}: {error}"))?;
    let tasks = crate::replica::serve_copy(&copy, side.channels, side.host);
    Ok((Some(copy), tasks))
}

/// How often a node that does not replicate publishes its shards' applied points.
const APPLIED_INTERVAL: Duration = Duration::from_millis(1);

/// Publishes the shard's applied point (every local write at or below it is readable) to
/// `table` every `interval`: what snapshot reads (`WaitReadable`) wait for.
fn spawn_applied(
    store: &ShardStore,
    shard_id: u32,
    table: Arc<crate::repl::Resolved>,
    interval: Duration,
) -> glommio::task::JoinHandle<()> {
    let store = store.clone();
    glommio::spawn_local(async move {
        loop {
            if let Ok(ts) = store.applied_ts() {
                table.set_applied(shard_id, ts);
            }
            glommio::timer::sleep(interval).await;
        }
    })
    .detach()
}

/// The file in the data directory that records the node's origin (multi-master keyspaces).
const ORIGIN_FILE: &str = "ORIGIN";

/// A region's origin is in every timestamp it stamped, so it never changes, and a data
/// directory is either multi-master from its first write or never: checks `origin` (`None`:
/// no multi-master keyspaces) against `<data_dir>/ORIGIN`, and records it on a new directory.
fn check_origin(data_dir: &std::path::Path, origin: Option<u8>) -> Result<(), String> {
    let path = data_dir.join(ORIGIN_FILE);
    let recorded = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text.trim().parse::<u8>().map_err(|_| format!("{} is damaged: {text:?}", path.display()))?),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
    };
    let holds_writes =
        crate::store::shard::shard_dir(data_dir, 0).join("wal").read_dir().is_ok_and(|mut dir| dir.next().is_some());
    match (recorded, origin) {
        (Some(recorded), Some(origin)) if recorded != origin => Err(format!(
            "replication.origin: data_dir {} holds writes stamped with origin {recorded}, not {origin}: a region's \
             origin never changes",
            data_dir.display()
        )),
        (Some(recorded), None) => Err(format!(
            "replication.multi_master: data_dir {} holds multi-master writes (origin {recorded}); the keyspaces and \
             the origin must stay configured",
            data_dir.display()
        )),
        (None, Some(_)) if holds_writes => Err(format!(
            "replication.multi_master: data_dir {} holds writes stamped without an origin; multi-master keyspaces \
             are set up with a new cluster",
            data_dir.display()
        )),
        (None, Some(origin)) => std::fs::write(&path, format!("{origin}\n"))
            .and_then(|()| crate::files::sync_path(&path))
            .and_then(|()| crate::files::sync_path(data_dir))
            .map_err(|error| format!("cannot record the origin in {}: {error}", path.display())),
        _ => Ok(()),
    }
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

/// How often each shard reports its progress to the [`Watchdog`].
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);

/// Whether a shard made progress between two samples: its WAL is not fenced, and writes that
/// were waiting for durability at the earlier sample have been made durable since (an idle
/// shard is progressing).
pub fn progressing(previous: Option<Progress>, now: Progress) -> bool {
    !now.fenced && previous.is_none_or(|previous| !previous.waiting || now.durable_next_lsn > previous.durable_next_lsn)
}

/// Beats the shard's heartbeat every [`HEARTBEAT_INTERVAL`] while [`progressing`]: proof that
/// its executor runs and its WAL makes writes durable.
fn spawn_heartbeat(store: &ShardStore, watchdog: Watchdog, shard_id: u32) -> glommio::task::JoinHandle<()> {
    let store = store.clone();
    glommio::spawn_local(async move {
        let mut previous = None;
        loop {
            let now = store.progress();
            if progressing(previous, now) {
                watchdog.beat(shard_id);
            }
            previous = Some(now);
            glommio::timer::sleep(HEARTBEAT_INTERVAL).await;
        }
    })
    .detach()
}

/// systemd's watchdog for the data node: each shard beats while it makes progress, and a
/// thread pings `WATCHDOG=1` only when every shard beat since the last ping (during recovery,
/// before READY, it pings unconditionally: start-up is bounded by `TimeoutStartSec`).
#[derive(Debug, Clone)]
pub struct Watchdog {
    beats: Arc<Vec<AtomicU64>>,
    ready: Arc<AtomicBool>,
}

impl Watchdog {
    fn new(shards: usize) -> Self {
        Self { beats: Arc::new((0..shards).map(|_| AtomicU64::new(0)).collect()), ready: Arc::default() }
    }

    fn beat(&self, shard_id: u32) {
        if let Some(beat) = self.beats.get(shard_id as usize) {
            beat.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    fn spawn(self, period: Duration, stop: StopFlag) -> Result<(), String> {
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut last: Vec<u64> = self.beats.iter().map(|beat| beat.load(Ordering::Relaxed)).collect();
                while !stop.is_stopped() {
                    std::thread::sleep(period);
                    if !self.ready.load(Ordering::SeqCst) {
                        notify::watchdog();
                        continue;
                    }
                    let now: Vec<u64> = self.beats.iter().map(|beat| beat.load(Ordering::Relaxed)).collect();
                    let stalled: Vec<usize> = (0..now.len()).filter(|&shard| now[shard] == last[shard]).collect();
                    if stalled.is_empty() {
                        notify::watchdog();
                    } else {
                        let message = format!("shards {stalled:?} made no progress for {period:?}");
                        tracing::error!("{message}; withholding the watchdog ping");
                        notify::status(&message);
                    }
                    last = now;
                }
            })
            .map(drop)
            .map_err(|error| format!("cannot start the watchdog thread: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(durable_next_lsn: u64, waiting: bool) -> Progress {
        Progress { durable_next_lsn, waiting, fenced: false }
    }

    #[test]
    fn a_shard_progresses_unless_waiting_writes_stay_undurable_or_its_wal_is_fenced() {
        assert!(progressing(None, at(1, true)), "the first sample has nothing to compare with");
        assert!(progressing(Some(at(5, false)), at(5, false)), "idle");
        assert!(progressing(Some(at(5, false)), at(5, true)), "writes just arrived");
        assert!(progressing(Some(at(5, true)), at(9, true)), "writes became durable");
        assert!(!progressing(Some(at(5, true)), at(5, true)), "writes waited a whole interval and none became durable");
        assert!(!progressing(Some(at(5, false)), Progress { fenced: true, ..at(6, false) }), "fenced");
    }
}
