//! The glommio shell of a shard's store: WAL + on-disk engine + chunk server.
//!
//! A write is durable in the WAL, then inserted into the engine's memtable (memory only, on
//! the executor). Reads, flushes and compactions run on the engine's lanes (threads of their
//! own, [`super::engine::lane`]), never on the executor. A checkpoint seals the memtable and
//! flushes it: it writes what changed since the last one, not the whole state, and releases
//! the WAL below the LSN it recorded.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::checkpoint;
use super::chunks::{ChunkStats, ChunkStore};
use super::clock::{Hlc, Interval, physical_us, timestamp_at};
use super::engine::lane::{Lane, LaneError};
use super::engine::{DiskVersions, EngineError, EngineMemory, SharedCache};
use super::op::{self, Body, ChunkList, Value};
use super::versions::{TooOld, Version};
use super::{StoreConfig, StoreError};
use crate::limits;
use crate::wal::{StoreFault, Wal, WalReader};

/// A value of a write being prepared: inline bytes stay borrowed from the request.
enum Staged<'a> {
    Inline(&'a [u8]),
    Chunked(Arc<ChunkList>),
    Tombstone,
}

impl Staged<'_> {
    fn view(&self) -> op::Value<'_> {
        match self {
            Self::Inline(value) => op::Value::Inline(value),
            Self::Chunked(list) => op::Value::Chunked(list),
            Self::Tombstone => op::Value::Tombstone,
        }
    }
}

/// Metadata of a key's visible version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyStat {
    /// Timestamp of the version.
    pub ts: u64,
    /// Value size.
    pub size: u64,
    /// Chunks holding it (0: inline).
    pub chunks: u32,
    /// Versions the key retains.
    pub versions: u32,
}

/// One listed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListItem {
    /// The key.
    pub key: Bytes,
    /// Timestamp of its visible version.
    pub ts: u64,
    /// Value size.
    pub size: u64,
}

/// Counters and gauges of a shard's store.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreStats {
    /// Versions held (an estimate: see [`DiskVersions::approximate_versions`]).
    pub versions: u64,
    /// Checkpoints (engine flushes) since open.
    pub checkpoints: u64,
    /// LSN the WAL is replayed from after the last checkpoint.
    pub checkpoint_lsn: u64,
    /// WAL segments released after checkpoints.
    pub segments_released: u64,
    /// Versions collected (destroyed by compactions past the retention horizon).
    pub versions_collected: u64,
    /// WAL records replayed at open.
    pub replayed_records: u64,
    /// Chunk server counters.
    pub chunks: ChunkStats,
    /// Chunks referenced.
    pub chunk_count: u64,
    /// What the engine holds in memory.
    pub memory: EngineMemory,
    /// Bytes of the engine's table and blob files.
    pub engine_disk_bytes: u64,
    /// WAL bytes written since the last checkpoint (what a restart would replay).
    pub flush_debt_bytes: u64,
    /// Runs of tables in the engine's level 0 (compaction debt: a read looks through each).
    pub engine_l0_runs: u64,
}

/// A shard's engine and the threads that run its blocking calls.
struct Engine {
    versions: Arc<DiskVersions>,
    reads: Lane,
    /// Flushes (and open).
    background: Lane,
    /// Compactions, beside flushes: a long compaction never holds a flush back.
    compactions: Lane,
}

struct Inner {
    config: StoreConfig,
    wal: Wal,
    engine: Engine,
    chunks: ChunkStore,
    hlc: Cell<Hlc>,
    /// LSNs reserved in the WAL and not yet applied, with their timestamps ([`REPLICATED`]
    /// for records shipped from another region): a checkpoint replays from the first; the
    /// closed timestamp stays below the first local write not yet durable.
    inflight: RefCell<BTreeMap<u64, u64>>,
    checkpointing: Cell<bool>,
    /// Compactions running on the engine's compaction lane.
    compacting: Cell<usize>,
    /// The memory budget sealed a memtable while a checkpoint ran: flush again after it.
    flush_wanted: Cell<bool>,
    wal_bytes_carried: u64,
    wal_bytes_at_checkpoint: Cell<u64>,
    /// WAL bytes after the last checkpoint that make the next one due (see
    /// [`checkpoint_threshold`]).
    checkpoint_after: Cell<u64>,
    /// Memtable bytes that seal it and make a checkpoint due (an eighth of the budget).
    memtable_seal_bytes: u64,
    /// The active memtable's bytes as the last insert reported them.
    memtable_bytes: Cell<u64>,
    stats: RefCell<StoreStats>,
    closed: Cell<bool>,
    /// What replication needs kept, as last told ([`ShardStore::set_wal_hold`]): the lowest
    /// LSN a peer still needs, and the lowest LSN a stream installing a snapshot resumes at
    /// (`u64::MAX`: none).
    wal_hold: Cell<(u64, u64)>,
    /// No version at or above it is collected ([`ShardStore::set_collect_floor`]).
    collect_floor: Cell<u64>,
    /// A replica-set copy's first LSN not yet applied ([`StoreConfig::set_log`]).
    applied_next: Cell<u64>,
}

/// Where a shard's WAL stands: how far it is durable, whether writes wait for it, and
/// whether it is fenced (an I/O error stopped it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// First LSN not yet durable.
    pub durable_next_lsn: u64,
    /// Records are reserved and wait for durability.
    pub waiting: bool,
    /// The WAL refuses further writes.
    pub fenced: bool,
}

/// A version's stored chunks (see [`ShardStore::chunk_refs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueChunks {
    /// Version timestamp.
    pub ts: u64,
    /// Value size.
    pub size: u64,
    /// (BLAKE3, length) of each chunk in order; empty for an inline value.
    pub chunks: Vec<([u8; 32], u32)>,
}

/// What a home shard can promise its replicas (see [`ShardStore::closed_point`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClosedPoint {
    /// Every record below this LSN is durable.
    pub durable_next_lsn: u64,
    /// No record at or below this timestamp will be written from `durable_next_lsn` on.
    pub closed_ts: u64,
}

/// The WAL bytes after a checkpoint that make the next one due: drawn anew each time between
/// three quarters of `interval` and all of it, so that shards, and nodes fed the same stream
/// (a home and its replicas), do not checkpoint in step. In `bench geo` all three regions'
/// nodes rewrote their state at once, and every write barrier on the disk waited behind them.
fn checkpoint_threshold(interval: u64) -> u64 {
    let random = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), interval);
    interval - random % (interval / 4 + 1)
}

/// The timestamp `inflight` keeps for a replicated record: the closed and applied points
/// promise nothing about other regions' writes (their own streams do), and local stamps
/// follow LSN order only among themselves.
const REPLICATED: u64 = u64::MAX;

/// One shard's store. Cheap to clone; lives on one glommio executor.
#[derive(Clone)]
pub struct ShardStore {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for ShardStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ShardStore").field("shard_id", &self.inner.config.shard_id).finish()
    }
}

impl ShardStore {
    /// Recovers the shard: opens its engine, replays the WAL from the LSN the engine's last
    /// flush recorded, and (when chunk files exist) takes the chunk references of every
    /// version and deletes chunk files nothing references. Restart work is bounded by the WAL
    /// written since the last checkpoint, plus a scan of the versions when values are chunked.
    pub async fn open(config: StoreConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let shard_id = config.shard_id;
        let recovery = |message: String| StoreError::Recovery { shard_id, message };
        std::fs::create_dir_all(&config.dir)
            .map_err(|error| recovery(format!("create {}: {error}", config.dir.display())))?;

        let engine = open_engine(&config).await?;
        migrate_checkpoint(&config, &engine).await?;
        let (replay_from, flushed_max_ts) = (engine.versions.replay_from(), engine.versions.flushed_max_ts());

        let wal = Wal::open(config.wal.clone()).await?;
        let durable = wal.durable_next_lsn();
        if wal.first_lsn() > replay_from || replay_from > durable {
            return Err(recovery(format!(
                "the WAL holds LSNs {}..{durable} but the engine needs replay from {replay_from}",
                wal.first_lsn()
            )));
        }
        let memtable_seal_bytes = config.memory_bytes_max / 8;
        // A replica-set copy applies its log only below the set's committed point, which it
        // learns from the primary again.
        let (replayed, replayed_bytes, replayed_max_ts) = if config.set_log {
            (0, 0, 0)
        } else {
            replay_wal(&config, &engine, replay_from, durable, memtable_seal_bytes).await?
        };

        let chunks = ChunkStore::open(config.dir.join("chunks"), config.chunk_bytes, config.wal.faults.clone())?;
        // Chunk files are O_DIRECT both ways: glommio's iopoll probe must see a real sector on
        // their device too (the WAL's directory may be elsewhere).
        crate::files::calibrate_iopoll(&config.dir.join("chunks")).await;
        if chunks.found_on_disk() > 0 {
            let versions = Arc::clone(&engine.versions);
            let lists = engine.reads.run(move || versions.chunk_lists()).await;
            for list in engine_result(shard_id, lists)? {
                chunks.add_refs(&list);
            }
        }
        chunks.remove_unreferenced()?;

        let mut hlc = Hlc::with_origin(config.origin);
        hlc.observe(flushed_max_ts.max(replayed_max_ts));
        let stats = StoreStats { checkpoint_lsn: replay_from, replayed_records: replayed, ..StoreStats::default() };
        let store = Self {
            inner: Rc::new(Inner {
                // WAL replayed at open counts toward the next checkpoint, so a shard that
                // restarts often still checkpoints.
                wal_bytes_carried: replayed_bytes,
                wal_bytes_at_checkpoint: Cell::new(0),
                checkpoint_after: Cell::new(checkpoint_threshold(config.checkpoint_wal_bytes)),
                memtable_seal_bytes,
                memtable_bytes: Cell::new(0),
                wal_hold: Cell::new((config.wal_hold_lsn, u64::MAX)),
                collect_floor: Cell::new(config.collect_floor),
                applied_next: Cell::new(replay_from),
                config,
                wal,
                engine,
                chunks,
                hlc: Cell::new(hlc),
                inflight: RefCell::default(),
                checkpointing: Cell::new(false),
                compacting: Cell::new(0),
                flush_wanted: Cell::new(false),
                stats: RefCell::new(stats),
                closed: Cell::new(false),
            }),
        };
        // The horizon only: compaction is maintenance's, so it never lengthens a restart.
        store.advance_horizon()?;
        Ok(store)
    }

    /// The shard's engine, shared with the threads that read it for replication.
    pub fn engine(&self) -> Arc<DiskVersions> {
        Arc::clone(&self.inner.engine.versions)
    }

    /// Runs `job` against the engine on `lane`, the answer awaited off the executor.
    async fn run_on<T: Send + 'static>(
        &self,
        lane: &Lane,
        job: impl FnOnce(&DiskVersions) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let versions = Arc::clone(&self.inner.engine.versions);
        engine_result(self.inner.config.shard_id, lane.run(move || job(&versions)).await)
    }

    /// Runs `job` against the engine on the read lane.
    async fn read<T: Send + 'static>(
        &self,
        job: impl FnOnce(&DiskVersions) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.run_on(&self.inner.engine.reads, job).await
    }

    /// Runs `job` against the engine on the compaction lane (`None` once the store closes:
    /// close waits for the compactions that started).
    async fn compaction<T: Send + 'static>(
        &self,
        job: impl FnOnce(&DiskVersions) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<Option<T>, StoreError> {
        let inner = &self.inner;
        if inner.closed.get() {
            return Ok(None);
        }
        inner.compacting.set(inner.compacting.get() + 1);
        let outcome = self.run_on(&inner.engine.compactions, job).await;
        inner.compacting.set(inner.compacting.get() - 1);
        outcome.map(Some)
    }

    /// Reads below the retention horizon fail: compactions may have destroyed what they saw.
    fn check_horizon(&self, at: Option<u64>) -> Result<u64, StoreError> {
        let horizon = self.inner.engine.versions.retention().horizon();
        match at {
            Some(at) if at < horizon => Err(StoreError::TooOld(TooOld { at, horizon })),
            Some(at) => Ok(at),
            None => Ok(u64::MAX),
        }
    }

    /// The version of `key` visible at `at` (tombstones included).
    async fn version_at(&self, key: &[u8], at: Option<u64>) -> Result<Option<Version>, StoreError> {
        let at = self.check_horizon(at)?;
        // A version written since the last seal answers without leaving the executor.
        if let Some(version) = self.inner.engine.versions.get_in_memory(key, at) {
            return Ok(Some(version));
        }
        let key = key.to_vec();
        self.read(move |versions| versions.get_at(&key, at)).await
    }

    /// The live version of `key` at `at`: `None` when absent or deleted.
    async fn live_at(&self, key: &[u8], at: Option<u64>) -> Result<Option<Version>, StoreError> {
        Ok(self.version_at(key, at).await?.filter(|version| version.body != Body::Tombstone))
    }

    /// Replication needs the WAL from `hold_lsn` on (`u64::MAX`: nothing), within
    /// `wal_hold_bytes_max`, and from `pin_lsn` on whatever the bound says (`u64::MAX`: none).
    /// Checkpoints release no WAL they need.
    pub fn set_wal_hold(&self, hold_lsn: u64, pin_lsn: u64) {
        self.inner.wal_hold.set((hold_lsn, pin_lsn));
    }

    /// No version at or above `floor` is collected from now on (with multi-master keyspaces:
    /// what every source region has shipped).
    pub fn set_collect_floor(&self, floor: u64) {
        self.inner.collect_floor.set(floor);
    }

    /// The configuration in force.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The shard's WAL (the replication shipper tails it).
    pub fn wal(&self) -> &Wal {
        &self.inner.wal
    }

    /// The chunk server.
    pub fn chunks(&self) -> &ChunkStore {
        &self.inner.chunks
    }

    /// Writes `value` under `key`; resolves with the version's timestamp once durable.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<u64, StoreError> {
        self.write(std::iter::once((key, Some(value)))).await
    }

    /// Writes a tombstone for `key`.
    pub async fn delete(&self, key: &[u8]) -> Result<u64, StoreError> {
        self.write(std::iter::once((key, None))).await
    }

    /// Writes every item atomically (one WAL record, one timestamp); `None` deletes.
    pub async fn write<'a>(
        &self,
        items: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Result<u64, StoreError> {
        let config = &self.inner.config;
        if let Some(home) = config.replica_of.as_ref().filter(|_| config.multi_master.is_empty()) {
            return Err(StoreError::NotHome { shard_id: config.shard_id, home: home.clone() });
        }
        let items = self.admit_batch(items).await?;
        let mut staged: Vec<(&[u8], Staged<'_>)> = Vec::with_capacity(items.len());
        let result = self.stage(items.into_iter(), &mut staged).await;
        let result = match result {
            Ok(()) => self.commit(&staged).await,
            Err(error) => Err(error),
        };
        if result.is_err() {
            for (_, body) in &staged {
                if let Staged::Chunked(list) = body {
                    self.inner.chunks.release(list)?;
                }
            }
        }
        result
    }

    /// A write's operations once its size is allowed and the memtable has room, the later of
    /// two operations on one key kept.
    async fn admit_batch<'a>(
        &self,
        items: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Result<Vec<(&'a [u8], Option<&'a [u8]>)>, StoreError> {
        let max = self.inner.config.batch_ops_max;
        if items.len() == 0 || items.len() > max {
            return Err(StoreError::BatchTooLarge { reason: format!("{} operations, allowed 1..={max}", items.len()) });
        }
        self.wait_for_memtable_room().await;
        Ok(op::later_wins(items.collect(), |(key, _)| key))
    }

    /// Checks limits and stores chunked values; inline values stay borrowed until they are
    /// copied, once, into the WAL payload.
    async fn stage<'a>(
        &self,
        items: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        staged: &mut Vec<(&'a [u8], Staged<'a>)>,
    ) -> Result<(), StoreError> {
        let config = &self.inner.config;
        for (key, value) in items {
            if key.is_empty() || key.len() > config.key_bytes_max {
                return Err(StoreError::BadKey { len: key.len(), max: config.key_bytes_max });
            }
            // A replica takes writes of multi-master keys only.
            if let Some(home) = config.replica_of.as_ref().filter(|_| !config.is_multi_master(key)) {
                return Err(StoreError::NotHome { shard_id: config.shard_id, home: home.clone() });
            }
            let body = match value {
                None => Staged::Tombstone,
                Some(value) if value.len() > config.value_bytes_max => {
                    return Err(StoreError::ValueTooLarge { len: value.len(), max: config.value_bytes_max });
                }
                Some(value) if value.len() > config.inline_bytes_max => {
                    Staged::Chunked(self.inner.chunks.store(value).await?)
                }
                Some(value) => Staged::Inline(value),
            };
            staged.push((key, body));
        }
        Ok(())
    }

    async fn commit(&self, staged: &[(&[u8], Staged<'_>)]) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let (lsn, ts, payload) = self.append_staged(staged, &mut |_| Ok(())).await?;
        // Apply the payload's own slices: one copy of each inline value.
        let applied = op::decode(&payload)
            .map_err(|error| StoreError::Recovery { shard_id: inner.config.shard_id, message: error.to_string() })
            .map(|ops| {
                let mut memtable_bytes = 0;
                for op in ops {
                    memtable_bytes = inner.engine.versions.apply(&op.key, &Version { ts, body: op.body });
                }
                memtable_bytes
            });
        inner.inflight.borrow_mut().remove(&lsn);
        self.after_apply(applied?);
        self.commit_wait(ts).await?;
        Ok(ts)
    }

    /// Encodes, stamps and appends `staged` as one WAL record, durable on return: its LSN,
    /// timestamp and payload. The record stays in `inflight` until applied. `admit(lsn)` may
    /// refuse it ([`StoreError::NotAdmitted`]) at the moment it would take `lsn`.
    async fn append_staged(
        &self,
        staged: &[(&[u8], Staged<'_>)],
        admit: &mut dyn FnMut(u64) -> Result<(), String>,
    ) -> Result<(u64, u64, Bytes), StoreError> {
        let inner = &self.inner;
        let shard_id = inner.config.shard_id;
        let len = op::encoded_len(staged.iter().map(|(key, body)| (*key, body.view())));
        let record_max = inner.config.wal.record_payload_bytes_max as usize;
        if len > record_max {
            return Err(StoreError::BatchTooLarge {
                reason: format!("encoded batch of {len} bytes exceeds the WAL record limit of {record_max}"),
            });
        }
        let mut payload = Vec::with_capacity(len);
        op::encode(staged.iter().map(|(key, body)| (*key, body.view())), &mut payload)
            .map_err(|error| StoreError::BatchTooLarge { reason: error.to_string() })?;
        let payload = Bytes::from(payload);
        let interval = self.stamp_interval().await?;
        let reserved = Cell::new(None);
        let mut refused = None;
        let appended = inner
            .wal
            .append_admitted(&payload, |lsn| {
                if let Err(reason) = admit(lsn) {
                    refused = Some(reason);
                    return None;
                }
                // The clock again, at reservation: waiting for room in a full batch may have
                // let the closed and applied points (published meanwhile from the clock) pass
                // the interval read before it, and a stamp must stay above them.
                let latest_us = inner.config.clock.interval().map_or(interval.latest_us(), |now| now.latest_us());
                let mut hlc = inner.hlc.get();
                let ts = hlc.tick(latest_us.max(interval.latest_us()));
                inner.hlc.set(hlc);
                inner.inflight.borrow_mut().insert(lsn, ts);
                reserved.set(Some((lsn, ts)));
                Some(ts)
            })
            .await;
        match appended {
            Ok(_) => {
                // `reserved` is set whenever the record took an LSN.
                let (lsn, ts) = reserved.get().expect("an appended record was stamped");
                Ok((lsn, ts, payload))
            }
            Err(error) => {
                if let Some((lsn, _)) = reserved.get() {
                    inner.inflight.borrow_mut().remove(&lsn);
                }
                Err(match (error, refused) {
                    (crate::wal::WalError::NotAdmitted, Some(reason)) => StoreError::NotAdmitted { shard_id, reason },
                    (error, _) => error.into(),
                })
            }
        }
    }

    /// A write to a replica-set copy ([`StoreConfig::set_log`]): checked and staged as
    /// [`ShardStore::write`], appended to the set's log when `admit(lsn)` agrees (the primary's
    /// protocol core takes the record there), and durable here on return with its LSN and
    /// timestamp, but not applied: once the set holds it, [`ShardStore::apply_logged`] applies
    /// it, and [`ShardStore::commit_wait`] ends the write. Values above the inline limit are
    /// refused (their chunks are not sent to the other members yet).
    pub async fn write_logged<'a>(
        &self,
        items: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        admit: &mut dyn FnMut(u64) -> Result<(), String>,
    ) -> Result<(u64, u64), StoreError> {
        let config = &self.inner.config;
        let items = self.admit_batch(items).await?;
        let mut staged: Vec<(&[u8], Staged<'_>)> = Vec::with_capacity(items.len());
        for (key, value) in items {
            if key.is_empty() || key.len() > config.key_bytes_max {
                return Err(StoreError::BadKey { len: key.len(), max: config.key_bytes_max });
            }
            let body = match value {
                None => Staged::Tombstone,
                Some(value) if value.len() > config.inline_bytes_max => {
                    return Err(StoreError::ValueTooLarge { len: value.len(), max: config.inline_bytes_max });
                }
                Some(value) => Staged::Inline(value),
            };
            staged.push((key, body));
        }
        let (lsn, ts, _) = self.append_staged(&staged, admit).await?;
        Ok((lsn, ts))
    }

    /// Applies the record `lsn` of a replica-set copy's log (durable in this WAL, and held by
    /// every member of the set): its versions become readable. Records are applied in LSN
    /// order from [`ShardStore::applied_next`]; an earlier one is skipped (applied already).
    pub fn apply_logged(&self, lsn: u64, glt: u64, payload: &Bytes) -> Result<(), StoreError> {
        let inner = &self.inner;
        let shard_id = inner.config.shard_id;
        let next = inner.applied_next.get();
        if lsn < next {
            return Ok(());
        }
        if lsn > next {
            return Err(StoreError::BadReplica { shard_id, reason: format!("record {lsn} applied before {next}") });
        }
        let ops = if payload[..] == op::EPOCH_MARKER {
            Vec::new()
        } else {
            op::decode(payload).map_err(|error| StoreError::BadReplica { shard_id, reason: error.to_string() })?
        };
        let mut memtable_bytes = inner.memtable_bytes.get();
        for op in op::later_wins(ops, |op| &op.key) {
            if matches!(op.body, Body::Chunked(_)) {
                return Err(StoreError::BadReplica {
                    shard_id,
                    reason: format!("record {lsn} holds chunk references"),
                });
            }
            // A copy: the payload may be a slice of a cached WAL batch or of a segment map.
            let op = op.detached();
            memtable_bytes = inner.engine.versions.apply(&op.key, &Version { ts: glt, body: op.body });
        }
        let mut hlc = inner.hlc.get();
        hlc.observe(glt);
        inner.hlc.set(hlc);
        inner.inflight.borrow_mut().remove(&lsn);
        inner.applied_next.set(lsn + 1);
        self.after_apply(memtable_bytes);
        Ok(())
    }

    /// A replica-set copy's first LSN not yet applied ([`ShardStore::apply_logged`]).
    pub fn applied_next(&self) -> u64 {
        self.inner.applied_next.get()
    }

    /// Starts a checkpoint once the memtable has reached its share of the memory budget.
    fn after_apply(&self, memtable_bytes: u64) {
        let inner = &self.inner;
        inner.memtable_bytes.set(memtable_bytes);
        if memtable_bytes < inner.memtable_seal_bytes {
            return;
        }
        // Sealed at once, whether or not a flush is running (up to two wait for flushes).
        if inner.engine.versions.sealed_memtables() < 2 {
            self.seal_memtable();
        }
        self.request_flush();
    }

    /// Flushes the sealed memtables soon: after the running checkpoint, or in a task now.
    fn request_flush(&self) {
        let inner = &self.inner;
        if inner.checkpointing.get() {
            inner.flush_wanted.set(true);
            return;
        }
        let store = self.clone();
        glommio::spawn_local(async move {
            if let Err(error) = store.run_checkpoints(false).await {
                tracing::warn!(shard = store.inner.config.shard_id, %error, "checkpoint failed; retried later");
            }
        })
        .detach();
    }

    /// Seals the active memtable with the replay LSN: every record below the first LSN
    /// reserved and not yet applied is in it or before it.
    fn seal_memtable(&self) {
        let inner = &self.inner;
        let durable = inner.wal.durable_next_lsn();
        let replay_from = if inner.config.set_log {
            inner.applied_next.get()
        } else {
            inner.inflight.borrow().first_key_value().map_or(durable, |(first, _)| (*first).min(durable))
        };
        inner.engine.versions.seal(replay_from, inner.hlc.get().last());
        inner.memtable_bytes.set(0);
    }

    /// Waits while the memtable is full and two sealed ones wait for their flush: memtables
    /// stay within three eighths of the budget, and writes slow to what the disk takes.
    async fn wait_for_memtable_room(&self) {
        let inner = &self.inner;
        // Every write passes here: the size the last insert reported, no lock taken.
        while inner.memtable_bytes.get() >= inner.memtable_seal_bytes && !inner.closed.get() {
            if inner.engine.versions.sealed_memtables() < 2 {
                // Room for another sealed memtable: seal this one, as the insert that filled it
                // could not, and have it flushed.
                self.seal_memtable();
                self.request_flush();
                return;
            }
            // A flush that ended meanwhile may have left these two behind: ask again.
            self.request_flush();
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The clock's interval once the next stamp fits inside it (stamps are taken at its latest
    /// bound; see [`super::clock`]).
    async fn stamp_interval(&self) -> Result<Interval, StoreError> {
        loop {
            let interval = self.inner.config.clock.interval()?;
            match self.inner.hlc.get().wait_us(interval) {
                0 => return Ok(interval),
                wait_us => glommio::timer::sleep(Duration::from_micros(wait_us)).await,
            }
        }
    }

    /// Waits until the clock's earliest bound has passed `ts`: after that, true time is past
    /// it, so any write that starts later is stamped above it on any node. With the exact
    /// system clock this has always passed by the time the WAL barrier returns.
    pub async fn commit_wait(&self, ts: u64) -> Result<(), StoreError> {
        loop {
            let interval = self.inner.config.clock.interval()?;
            if interval.has_passed(ts) {
                return Ok(());
            }
            let left_us = physical_us(ts) + 1 - interval.earliest_us();
            glommio::timer::sleep(Duration::from_micros(left_us)).await;
        }
    }

    /// The value of `key` at `at` (`None`: latest) with its timestamp; `None` when absent or
    /// deleted. Chunked values are read from their chunk files, every block checked.
    pub async fn get(&self, key: &[u8], at: Option<u64>) -> Result<Option<(u64, Bytes)>, StoreError> {
        let Some(Version { ts, body }) = self.live_at(key, at).await? else { return Ok(None) };
        match body {
            Body::Inline(value) => Ok(Some((ts, value))),
            Body::Chunked(list) => Ok(Some((ts, self.read_chunked(&list).await?))),
            Body::Tombstone => Ok(None),
        }
    }

    async fn read_chunked(&self, list: &ChunkList) -> Result<Bytes, StoreError> {
        self.read_chunked_range(list, 0, list.size).await
    }

    /// Bytes `from..to` of a chunked value.
    async fn read_chunked_range(&self, list: &ChunkList, from: u64, to: u64) -> Result<Bytes, StoreError> {
        // Hold the chunks so a concurrent collection cannot delete them mid-read.
        self.inner.chunks.add_refs(list);
        let result = self.inner.chunks.read_range(list, from, to).await;
        self.inner.chunks.release(list)?;
        Ok(result?)
    }

    /// The version of `key` visible at `at`: its timestamp, size and stored chunks (hash and
    /// length each, in order; empty for a value stored inline). `None` when absent or deleted.
    /// Lets a reader that kept an earlier version's chunk list find what changed.
    pub async fn chunk_refs(&self, key: &[u8], at: Option<u64>) -> Result<Option<ValueChunks>, StoreError> {
        Ok(self.live_at(key, at).await?.and_then(|version| match &version.body {
            Body::Inline(value) => Some(ValueChunks { ts: version.ts, size: value.len() as u64, chunks: Vec::new() }),
            Body::Chunked(list) => Some(ValueChunks {
                ts: version.ts,
                size: list.size,
                chunks: list.chunks.iter().map(|chunk| (chunk.hash, chunk.len)).collect(),
            }),
            Body::Tombstone => None,
        }))
    }

    /// `len` bytes of `key`'s value at `at` from `offset` (fewer at the end of the value), read
    /// from only the chunks that hold them. `None` when absent or deleted.
    pub async fn get_range(
        &self,
        key: &[u8],
        at: Option<u64>,
        offset: u64,
        len: u64,
    ) -> Result<Option<(u64, Bytes)>, StoreError> {
        let Some(Version { ts, body }) = self.live_at(key, at).await? else { return Ok(None) };
        let end = offset.saturating_add(len);
        match body {
            Body::Inline(value) => {
                let size = value.len() as u64;
                let from = usize::try_from(offset.min(size)).unwrap_or(0);
                let to = usize::try_from(end.min(size)).unwrap_or(0);
                Ok(Some((ts, value.slice(from..to.max(from)))))
            }
            Body::Tombstone => Ok(None),
            Body::Chunked(list) => {
                // The chunks overlapping [offset, end), and the offset of the first.
                let mut at_byte = 0u64;
                let mut base = None;
                let mut wanted = Vec::new();
                for chunk in &list.chunks {
                    let next = at_byte + u64::from(chunk.len);
                    if next > offset && at_byte < end {
                        base.get_or_insert(at_byte);
                        wanted.push(*chunk);
                    }
                    at_byte = next;
                }
                let Some(base) = base else { return Ok(Some((ts, Bytes::new()))) };
                let part = ChunkList { size: wanted.iter().map(|c| u64::from(c.len)).sum(), chunks: wanted };
                let bytes = self.read_chunked_range(&part, offset.saturating_sub(base), end - base).await?;
                Ok(Some((ts, bytes)))
            }
        }
    }

    /// Metadata of `key` at `at`.
    pub async fn stat(&self, key: &[u8], at: Option<u64>) -> Result<Option<KeyStat>, StoreError> {
        let at = self.check_horizon(at)?;
        let key = key.to_vec();
        let (version, count) = self
            .read(move |versions| {
                let version = versions.get_at(&key, at)?.filter(|version| version.body != Body::Tombstone);
                let count = if version.is_some() { versions.version_count(&key)? } else { 0 };
                Ok((version, count))
            })
            .await?;
        Ok(version.map(|version| KeyStat {
            ts: version.ts,
            size: version.body.size(),
            chunks: match &version.body {
                Body::Chunked(list) => u32::try_from(list.chunks.len()).unwrap_or(u32::MAX),
                _ => 0,
            },
            versions: u32::try_from(count).unwrap_or(u32::MAX),
        }))
    }

    /// Up to `limit` live keys with `prefix` after `start_after`, and whether more may follow.
    pub async fn list(
        &self,
        prefix: &[u8],
        start_after: &[u8],
        limit: usize,
        at: Option<u64>,
    ) -> Result<(Vec<ListItem>, bool), StoreError> {
        let at = self.check_horizon(at)?;
        let (prefix, start_after) = (prefix.to_vec(), start_after.to_vec());
        let (items, more) = self.read(move |versions| versions.list_at(&prefix, Some(&start_after), at, limit)).await?;
        let items = items.into_iter().map(|(key, version)| ListItem {
            key: Bytes::from(key),
            ts: version.ts,
            size: version.body.size(),
        });
        Ok((items.collect(), more))
    }

    /// Moves the retention horizon to the clock's earliest time less the retention (and
    /// below the collection floor): reads below it fail from now on, and compactions destroy
    /// the versions no read at or above it sees. Runs a compaction when level 0 has piled up,
    /// and releases the chunks of the versions it destroyed.
    pub async fn collect_garbage(&self) -> Result<(), StoreError> {
        self.advance_horizon()?;
        let destroyed = self.compaction(|versions| versions.compact_if_needed(limits::ENGINE_L0_RUNS_COMPACT)).await?;
        self.release_destroyed(destroyed.flatten().unwrap_or_default())
    }

    /// Moves the retention horizon (see [`Self::collect_garbage`]).
    fn advance_horizon(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let retention_us = u64::try_from(inner.config.retention.as_micros()).unwrap_or(u64::MAX);
        let horizon = timestamp_at(inner.config.clock.interval()?.earliest_us().saturating_sub(retention_us))
            .min(inner.collect_floor.get());
        inner.engine.versions.retention().advance(horizon);
        Ok(())
    }

    /// Compacts every table of the engine into its last level, retention applied to all of
    /// them (what an operator runs to reclaim space at once; compactions otherwise run as
    /// level 0 fills).
    pub async fn compact(&self) -> Result<(), StoreError> {
        let destroyed = self.compaction(DiskVersions::compact_all).await?;
        self.release_destroyed(destroyed.unwrap_or_default())
    }

    fn release_destroyed(&self, destroyed: Vec<Arc<ChunkList>>) -> Result<(), StoreError> {
        for list in destroyed {
            self.inner.chunks.release(&list)?;
        }
        self.inner.stats.borrow_mut().versions_collected = self.inner.engine.versions.retention().destroyed_versions();
        Ok(())
    }

    /// WAL bytes this shard has written, across restarts.
    fn wal_bytes_written(&self) -> u64 {
        self.inner.wal.stats().batch_bytes + self.inner.wal_bytes_carried
    }

    /// Whether a checkpoint is due: enough WAL was written since the last one (between three
    /// quarters of `checkpoint_wal_bytes` and all of it), or the memtable reached its share of
    /// the memory budget.
    pub fn checkpoint_due(&self) -> bool {
        let since = self.wal_bytes_written().saturating_sub(self.inner.wal_bytes_at_checkpoint.get());
        since >= self.inner.checkpoint_after.get()
            || self.inner.engine.versions.memory().active_memtable_bytes >= self.inner.memtable_seal_bytes
    }

    /// Seals the memtable and flushes the engine: writes what changed since the last
    /// checkpoint, then releases the WAL below the LSN it recorded. Returns that LSN, or
    /// `None` when a checkpoint is already running.
    pub async fn checkpoint(&self) -> Result<Option<u64>, StoreError> {
        self.run_checkpoints(true).await
    }

    /// A checkpoint (`seal`: of the active memtable too; else of the sealed ones), and again
    /// while the memory budget asked for one meanwhile.
    async fn run_checkpoints(&self, seal: bool) -> Result<Option<u64>, StoreError> {
        let inner = &self.inner;
        if inner.checkpointing.replace(true) {
            return Ok(None);
        }
        let mut result = self.flush_engine(seal).await;
        while result.is_ok() && inner.flush_wanted.replace(false) {
            result = self.flush_engine(false).await;
        }
        inner.checkpointing.set(false);
        if result.is_ok() && inner.engine.versions.l0_runs() >= limits::ENGINE_L0_RUNS_COMPACT && !inner.closed.get() {
            // Level 0 piled up: compact now rather than at the next collection, so reads keep
            // few runs to look through.
            let store = self.clone();
            glommio::spawn_local(async move {
                if let Err(error) = store.collect_garbage().await {
                    tracing::warn!(shard = store.inner.config.shard_id, %error, "compaction failed; retried later");
                }
            })
            .detach();
        }
        result.map(Some)
    }

    async fn flush_engine(&self, seal: bool) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let config = &inner.config;
        if let Some(errno) = config.wal.faults.as_ref().and_then(|faults| faults.on_store(StoreFault::Checkpoint)) {
            let message = format!("flush: {}", std::io::Error::from_raw_os_error(errno));
            return Err(StoreError::Engine { shard_id: config.shard_id, message });
        }
        let wal_bytes = self.wal_bytes_written();
        let started = std::time::Instant::now();
        if seal {
            self.seal_memtable();
        }
        let flushed = self.run_on(&inner.engine.background, DiskVersions::flush).await?;
        let released = self.release_wal_after_checkpoint(flushed).await?;
        inner.wal_bytes_at_checkpoint.set(wal_bytes);
        inner.checkpoint_after.set(checkpoint_threshold(config.checkpoint_wal_bytes));
        tracing::debug!(
            shard = config.shard_id,
            lsn = flushed,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            segments_released = released,
            "checkpoint (engine flush) written"
        );
        let mut stats = inner.stats.borrow_mut();
        stats.checkpoints += 1;
        stats.checkpoint_lsn = flushed;
        stats.segments_released += released;
        metrics::counter!("meridian_store_checkpoints_total", "shard" => config.shard_id.to_string()).increment(1);
        Ok(flushed)
    }

    /// Releases the WAL a checkpoint at `lsn` made redundant, but what replication holds: the
    /// hold within `wal_hold_bytes_max`, the pin whatever the bound. Returns the segments
    /// released. A shipper installing a snapshot pins the LSN it resumes at before it reads the
    /// engine, and checks afterwards that the WAL still holds it.
    async fn release_wal_after_checkpoint(&self, lsn: u64) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let (hold, pin) = inner.wal_hold.get();
        let hold = hold.max(inner.wal.keep_floor(lsn, inner.config.wal_hold_bytes_max)).min(pin);
        Ok(inner.wal.release_before(lsn.min(hold)).await?)
    }

    /// Counters and gauges.
    pub fn stats(&self) -> StoreStats {
        let inner = &self.inner;
        let mut stats = *inner.stats.borrow();
        let versions = &inner.engine.versions;
        stats.versions = versions.approximate_versions();
        stats.memory = versions.memory();
        stats.engine_disk_bytes = versions.disk_bytes();
        stats.engine_l0_runs = versions.l0_runs() as u64;
        stats.flush_debt_bytes = self.wal_bytes_written().saturating_sub(inner.wal_bytes_at_checkpoint.get());
        stats.chunks = inner.chunks.stats();
        stats.chunk_count = inner.chunks.chunk_count() as u64;
        stats
    }

    /// The timestamp of the first local write reserved at or after `durable_next_lsn` (not yet
    /// durable), if any.
    fn first_pending(&self, durable_next_lsn: u64) -> Option<u64> {
        self.inner.inflight.borrow().range(durable_next_lsn..).map(|(_, ts)| *ts).find(|ts| *ts != REPLICATED)
    }

    /// Where the WAL stands, for the watchdog (see [`Progress`]).
    pub fn progress(&self) -> Progress {
        let inner = &self.inner;
        let durable_next_lsn = inner.wal.durable_next_lsn();
        Progress {
            durable_next_lsn,
            waiting: inner.inflight.borrow().range(durable_next_lsn..).next().is_some(),
            fenced: inner.wal.fenced().is_some(),
        }
    }

    /// What replication may ship and promise now: every record below `durable_next_lsn` is
    /// durable, and no record with a timestamp at or below `closed_ts` will be written at or
    /// after it, among this region's own writes (what its streams ship; a multi-master
    /// shard's WAL holds other regions' records too). Local writes are stamped in LSN order,
    /// so the first one reserved and not yet durable bounds the promise; with none, every
    /// later stamp is above both the last one issued and the clock's `earliest` now (stamps are
    /// taken at an interval's `latest`).
    pub fn closed_point(&self) -> Result<ClosedPoint, StoreError> {
        let inner = &self.inner;
        let durable_next_lsn = inner.wal.durable_next_lsn();
        let pending = self.first_pending(durable_next_lsn);
        let closed_ts = match pending {
            Some(ts) => ts.saturating_sub(1),
            None => {
                let earliest = timestamp_at(inner.config.clock.interval()?.earliest_us()).saturating_sub(1);
                inner.hlc.get().last().max(earliest)
            }
        };
        Ok(ClosedPoint { durable_next_lsn, closed_ts })
    }

    /// The timestamp at or below which every local write of this shard is applied (readable),
    /// and no later write will be stamped: the first reserved record not yet applied bounds it
    /// (records are stamped in LSN order); with none, every later stamp is above the last one
    /// issued and the clock's `earliest` now. What snapshot reads at a home wait for.
    pub fn applied_ts(&self) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let first_unapplied = inner.inflight.borrow().values().copied().find(|ts| *ts != REPLICATED);
        Ok(match first_unapplied {
            Some(ts) => ts.saturating_sub(1),
            None => {
                let earliest = timestamp_at(inner.config.clock.interval()?.earliest_us()).saturating_sub(1);
                inner.hlc.get().last().max(earliest)
            }
        })
    }

    /// The end of an installed snapshot: every live key held here that `keys` (the snapshot's)
    /// lacks, outside the multi-master keyspaces, was deleted at the home and its tombstone
    /// collected there; each gets a tombstone at `horizon` (the snapshot's collection horizon,
    /// above every version such a key has), durable in the WAL like a shipped record. Returns
    /// how many keys were deleted.
    pub async fn tombstone_absent(
        &self,
        horizon: u64,
        keys: &std::collections::HashSet<Bytes>,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0;
        let mut resume: Option<Vec<u8>> = None;
        loop {
            // A step of keys at a time, read on the engine's lane: each key's newest version.
            let after = resume.clone();
            let (newest, last) = self
                .read(move |versions| {
                    let mut newest: Vec<(Vec<u8>, Version)> = Vec::new();
                    let mut last: Option<Vec<u8>> = None;
                    versions.scan(after.as_deref(), |key, version| {
                        if last.as_deref() == Some(key.as_slice()) {
                            return true;
                        }
                        if newest.len() == limits::GC_KEYS_PER_STEP {
                            return false;
                        }
                        last = Some(key.clone());
                        newest.push((key, version));
                        true
                    })?;
                    Ok((newest, last))
                })
                .await?;
            let absent: Vec<Bytes> = newest
                .into_iter()
                // A multi-master key the home lacks may be another region's write the home
                // has not received yet: only its own stream can delete it.
                .filter(|(key, latest)| {
                    latest.body != Body::Tombstone
                        && latest.ts < horizon
                        && !keys.contains(key.as_slice())
                        && !self.inner.config.is_multi_master(key)
                })
                .map(|(key, _)| Bytes::from(key))
                .collect();
            deleted += self.tombstone(horizon, &absent).await?;
            let Some(last) = last else { return Ok(deleted) };
            resume = Some(last);
        }
    }

    /// Tombstones `keys` at `ts` through the WAL, as records of at most `batch_ops_max` deletes
    /// that fit a WAL record each. Returns how many.
    async fn tombstone(&self, ts: u64, keys: &[Bytes]) -> Result<u64, StoreError> {
        let config = &self.inner.config;
        let record_max = config.wal.record_payload_bytes_max as usize;
        let empty = op::encoded_len(std::iter::empty());
        let delete_len = |key: &Bytes| op::encoded_len([(&key[..], Value::Tombstone)]) - empty;
        let mut start = 0;
        while start < keys.len() {
            let (mut end, mut bytes) = (start + 1, empty + delete_len(&keys[start]));
            while end < keys.len() && end - start < config.batch_ops_max && bytes + delete_len(&keys[end]) <= record_max
            {
                bytes += delete_len(&keys[end]);
                end += 1;
            }
            let mut payload = Vec::with_capacity(bytes);
            op::encode(keys[start..end].iter().map(|key| (&key[..], Value::Tombstone)), &mut payload)
                .map_err(|error| StoreError::BadReplica { shard_id: config.shard_id, reason: error.to_string() })?;
            self.apply_replicated(ts, &Bytes::from(payload)).await?;
            start = end;
        }
        Ok(keys.len() as u64)
    }

    /// Applies a record shipped by the shard's home region: durable in this shard's WAL under
    /// the home's timestamp `glt`, then readable. Values above the inline limit are chunked
    /// here as for a client write. Applying the same record twice is harmless (one version per
    /// key and timestamp), which is what lets a stream resume from any earlier position.
    pub async fn apply_replicated(&self, glt: u64, payload: &Bytes) -> Result<(), StoreError> {
        let inner = &self.inner;
        let shard_id = inner.config.shard_id;
        let bad = |reason: String| StoreError::BadReplica { shard_id, reason };
        let ops = op::later_wins(op::decode(payload).map_err(|error| bad(error.to_string()))?, |op| &op.key);
        let mut bodies = Vec::with_capacity(ops.len());
        let mut staged = false;
        for op in &ops {
            let body = match &op.body {
                Body::Inline(value) if value.len() > inner.config.inline_bytes_max => {
                    staged = true;
                    Body::Chunked(inner.chunks.store(value).await?)
                }
                Body::Chunked(_) => return Err(bad("chunk references instead of values".into())),
                body => body.clone(),
            };
            bodies.push(body);
        }
        let encoded;
        let record = if staged {
            let mut out = Vec::with_capacity(payload.len());
            op::encode(ops.iter().zip(&bodies).map(|(op, body)| (&op.key[..], body.view())), &mut out)
                .map_err(|error| bad(error.to_string()))?;
            encoded = out;
            &encoded[..]
        } else {
            &payload[..]
        };
        let reserved = Cell::new(None);
        let appended = inner
            .wal
            .append_stamped(record, |lsn| {
                inner.inflight.borrow_mut().insert(lsn, REPLICATED);
                reserved.set(Some(lsn));
                glt
            })
            .await;
        if appended.is_ok() {
            let mut hlc = inner.hlc.get();
            hlc.observe(glt);
            inner.hlc.set(hlc);
            // A record applied before (a resumed stream) counted its chunks then: which of its
            // chunked versions the engine holds already is read first.
            let chunked: Vec<Vec<u8>> = ops
                .iter()
                .zip(&bodies)
                .filter(|(_, body)| matches!(body, Body::Chunked(_)))
                .map(|(op, _)| op.key.to_vec())
                .collect();
            let held = if chunked.is_empty() {
                Vec::new()
            } else {
                let found = self
                    .read(move |versions| {
                        let mut held = Vec::new();
                        for key in chunked {
                            if versions.contains(&key, glt)? {
                                held.push(key);
                            }
                        }
                        Ok(held)
                    })
                    .await;
                // The record is durable: it is applied whatever the read says. Not knowing
                // which versions are held costs at most a chunk kept too long, never data.
                found.unwrap_or_else(|error| {
                    tracing::warn!(shard = shard_id, %error, "could not check for versions applied before");
                    Vec::new()
                })
            };
            let mut memtable_bytes = 0;
            for (op, body) in ops.into_iter().zip(bodies) {
                if let Body::Chunked(list) = &body
                    && held.iter().any(|key| key.as_slice() == &op.key[..])
                {
                    inner.chunks.release(list)?;
                    continue;
                }
                memtable_bytes = inner.engine.versions.apply(&op.key, &Version { ts: glt, body });
            }
            self.after_apply(memtable_bytes);
        } else {
            for body in &bodies {
                if let Body::Chunked(list) = body {
                    inner.chunks.release(list)?;
                }
            }
        }
        if let Some(lsn) = reserved.get() {
            inner.inflight.borrow_mut().remove(&lsn);
        }
        appended?;
        Ok(())
    }

    /// The newest timestamp issued, and its physical part in microseconds.
    pub fn last_ts(&self) -> (u64, u64) {
        let last = self.inner.hlc.get().last();
        (last, physical_us(last))
    }

    /// Runs collection and checkpoints in the background until the store closes, and
    /// publishes the store's gauges. A failed checkpoint or collection is logged and tried
    /// again on a later tick (the WAL keeps everything meanwhile).
    pub fn spawn_maintenance(&self) {
        let store = self.clone();
        glommio::spawn_local(async move {
            let tick = std::time::Duration::from_millis(100).min(store.inner.config.gc_interval);
            let mut last_gc = std::time::Instant::now();
            while !store.inner.closed.get() {
                glommio::timer::sleep(tick).await;
                if last_gc.elapsed() >= store.inner.config.gc_interval {
                    last_gc = std::time::Instant::now();
                    match store.collect_garbage().await {
                        // No interval for now: the horizon is unknown, try next round.
                        Ok(()) | Err(StoreError::Clock(_)) => {}
                        Err(error) => tracing::warn!(shard = store.inner.config.shard_id, %error, "collection failed"),
                    }
                }
                if store.checkpoint_due()
                    && let Err(error) = store.checkpoint().await
                {
                    tracing::warn!(shard = store.inner.config.shard_id, %error, "checkpoint failed; retried later");
                }
                store.publish_gauges();
            }
        })
        .detach();
    }

    /// The store's gauges, per shard, for the operator: memory by component against the
    /// budget, engine files on disk, what a restart would replay.
    fn publish_gauges(&self) {
        let stats = self.stats();
        let shard = self.inner.config.shard_id.to_string();
        let memory = stats.memory;
        let gauge = |name: &'static str, value: u64| {
            #[expect(clippy::cast_precision_loss, reason = "gauges")]
            metrics::gauge!(name, "shard" => shard.clone()).set(value as f64);
        };
        gauge("meridian_store_memtable_bytes", memory.active_memtable_bytes);
        gauge("meridian_store_sealed_memtables", memory.sealed_memtables as u64);
        gauge("meridian_store_cache_bytes", memory.cache_bytes);
        gauge("meridian_store_pinned_index_filter_bytes", memory.pinned_bytes);
        gauge("meridian_store_memory_budget_bytes", self.inner.config.memory_bytes_max);
        gauge("meridian_store_engine_disk_bytes", stats.engine_disk_bytes);
        gauge("meridian_store_flush_debt_bytes", stats.flush_debt_bytes);
        gauge("meridian_store_versions", stats.versions);
        gauge("meridian_store_versions_collected", stats.versions_collected);
        gauge("meridian_store_engine_l0_runs", stats.engine_l0_runs);
    }

    /// Stops maintenance, writes a final checkpoint (so the next open replays nothing) and
    /// closes the WAL after every accepted write is durable.
    pub async fn close(self) -> Result<(), StoreError> {
        self.inner.closed.set(true);
        while self.inner.checkpointing.get() || self.inner.compacting.get() > 0 {
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        if self.inner.wal.fenced().is_none() {
            self.checkpoint().await?;
        }
        match Rc::try_unwrap(self.inner) {
            Ok(inner) => Ok(inner.wal.close().await?),
            // Another handle still lives (a connection task): its WAL closes when it drops.
            Err(_) => Ok(()),
        }
    }
}

/// Deletes checkpoint files of `shard_id` whose LSN matches `doomed`, and stale temporaries.
fn remove_checkpoints(dir: &Path, shard_id: u32, doomed: impl Fn(u64) -> bool) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale_temporary = name.ends_with(".ckpt.tmp");
        let old = checkpoint::parse_file_name(name).is_some_and(|(shard, lsn)| shard == shard_id && doomed(lsn));
        if stale_temporary || old {
            crate::files::delete_gradually(&entry.path())?;
        }
    }
    Ok(())
}

/// The newest checkpoint file of shard `shard_id` in `dir`: its LSN and path.
pub fn newest_checkpoint(dir: &Path, shard_id: u32) -> std::io::Result<Option<(u64, PathBuf)>> {
    let mut newest: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        if let Some((shard, lsn)) = name.to_str().and_then(checkpoint::parse_file_name)
            && shard == shard_id
            && newest.as_ref().is_none_or(|(best, _)| lsn > *best)
        {
            newest = Some((lsn, entry.path()));
        }
    }
    Ok(newest)
}

/// A checkpoint file's bytes, memory-mapped (checkpoints are read once, by the upgrade of a
/// data directory written before the engine).
fn map_checkpoint(path: &Path) -> std::io::Result<Bytes> {
    let file = std::fs::File::open(path)?;
    // SAFETY: checkpoint files were written once under a temporary name and never modified
    // after the rename; nothing writes them any more.
    let map = unsafe { memmap2::Mmap::map(&file) }?;
    Ok(Bytes::from_owner(map))
}

/// The engine's error, or its lane's, as the store's.
fn engine_result<T>(shard_id: u32, outcome: Result<Result<T, EngineError>, LaneError>) -> Result<T, StoreError> {
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(StoreError::Engine { shard_id, message: error.to_string() }),
        Err(error) => Err(StoreError::Engine { shard_id, message: error.to_string() }),
    }
}

/// Starts the shard's engine threads and opens its engine under `<dir>/engine`.
async fn open_engine(config: &StoreConfig) -> Result<Engine, StoreError> {
    let shard_id = config.shard_id;
    let start = |name: &str, threads: usize| {
        Lane::start(&format!("meridian-{name}{shard_id}"), threads).map_err(|error| StoreError::Engine {
            shard_id,
            message: format!("start the engine's {name} threads: {error}"),
        })
    };
    let reads = start("read", limits::ENGINE_READ_THREADS)?;
    let background = start("flush", 1)?;
    let compactions = start("compact", 1)?;
    let cache =
        config.engine_cache.clone().unwrap_or_else(|| SharedCache::with_capacity_bytes(config.memory_bytes_max / 2));
    let dir = config.dir.join("engine");
    let opened = background.run(move || DiskVersions::open(&dir, cache.0)).await;
    let versions = engine_result(shard_id, opened)?;
    Ok(Engine { versions: Arc::new(versions), reads, background, compactions })
}

/// Replays the WAL from `from` to `durable` into the engine's memtable, flushing whenever it
/// reaches `seal_bytes`. Returns the records and bytes replayed and the newest timestamp.
async fn replay_wal(
    config: &StoreConfig,
    engine: &Engine,
    from: u64,
    durable: u64,
    seal_bytes: u64,
) -> Result<(u64, u64, u64), StoreError> {
    let shard_id = config.shard_id;
    let reader = WalReader::new(&config.wal.dir, shard_id, config.wal.record_payload_bytes_max);
    let mut cursor = reader.cursor(from, durable);
    let (mut replayed, mut replayed_bytes, mut max_ts) = (0u64, 0u64, 0u64);
    while let Some(record) = cursor.next_record()? {
        replayed_bytes += wire::encoded_len(record.payload.len()) as u64;
        let ops = op::decode(&record.payload).map_err(|error| StoreError::Recovery {
            shard_id,
            message: format!("WAL record {} does not decode: {error}", record.lsn),
        })?;
        let mut memtable_bytes = 0;
        for op in op::later_wins(ops, |op| &op.key) {
            memtable_bytes = engine.versions.apply(&op.key, &Version { ts: record.glt, body: op.body });
        }
        max_ts = max_ts.max(record.glt);
        replayed += 1;
        if memtable_bytes >= seal_bytes {
            // Above every version the tables hold too (what reads from memory rely on).
            engine.versions.seal(record.lsn + 1, max_ts.max(engine.versions.flushed_max_ts()));
            let versions = Arc::clone(&engine.versions);
            engine_result(shard_id, engine.background.run(move || versions.flush()).await)?;
        }
    }
    Ok((replayed, replayed_bytes, max_ts))
}

/// Upgrades a data directory written before the engine: its newest full checkpoint is loaded
/// into the engine and flushed (recording the checkpoint's LSN as where the WAL replays
/// from), then the checkpoint files are deleted. A crash on the way repeats it (applying is
/// idempotent).
async fn migrate_checkpoint(config: &StoreConfig, engine: &Engine) -> Result<(), StoreError> {
    let shard_id = config.shard_id;
    let newest = newest_checkpoint(&config.dir, shard_id).map_err(|error| StoreError::Recovery {
        shard_id,
        message: format!("list {}: {error}", config.dir.display()),
    })?;
    let Some((_, path)) = newest else { return Ok(()) };
    let fail = |message: String| StoreError::Checkpoint { path: path.display().to_string(), message };
    let (versions, dir, payload_max) =
        (Arc::clone(&engine.versions), config.dir.clone(), config.wal.record_payload_bytes_max);
    let seal_bytes = config.memory_bytes_max / 8;
    let file = path.clone();
    let migrated = engine
        .background
        .run(move || -> Result<u64, String> {
            let bytes = map_checkpoint(&file).map_err(|error| format!("open: {error}"))?;
            let mut max_ts = 0;
            let mut failed = None;
            let info = checkpoint::decode(&bytes, payload_max, |op, ts| {
                max_ts = max_ts.max(ts);
                if versions.apply(&op.key, &Version { ts, body: op.body }) >= seal_bytes && failed.is_none() {
                    // Replay from the start until the checkpoint is in: 1.
                    versions.seal(1, max_ts);
                    failed = versions.flush().err();
                }
            })
            .map_err(|error| error.to_string())?;
            if let Some(error) = failed {
                return Err(error.to_string());
            }
            if info.shard_id != shard_id {
                return Err(format!("belongs to shard {}", info.shard_id));
            }
            versions.seal(info.lsn, max_ts);
            versions.flush().map_err(|error| error.to_string())?;
            remove_checkpoints(&dir, shard_id, |_| true).map_err(|error| error.to_string())?;
            Ok(info.versions)
        })
        .await
        .map_err(|error| fail(error.to_string()))?
        .map_err(fail)?;
    tracing::info!(shard = shard_id, versions = migrated, "upgraded: the full checkpoint is now in the engine");
    Ok(())
}

/// Opens every shard directory's store with `config_for(shard)`; a helper for binaries.
pub fn shard_dir(data_dir: &Path, shard_id: u32) -> PathBuf {
    data_dir.join(format!("shard-{shard_id:03}"))
}
