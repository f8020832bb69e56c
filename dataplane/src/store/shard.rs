//! The glommio shell of a shard's store: WAL + version map + chunk server + checkpoints.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_lite::AsyncWriteExt;
use glommio::io::{DmaStreamWriterBuilder, OpenOptions};

use super::checkpoint::{self, CheckpointInfo};
use super::chunks::{ChunkStats, ChunkStore};
use super::clock::{Hlc, Interval, physical_us, timestamp_at};
use super::op::{self, Body, ChunkList, Value};
use super::versions::{Collected, VersionMap};
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
    /// Keys (including deleted keys whose tombstone is retained).
    pub keys: u64,
    /// Versions retained.
    pub versions: u64,
    /// Checkpoints written since open.
    pub checkpoints: u64,
    /// LSN of the last checkpoint.
    pub checkpoint_lsn: u64,
    /// WAL segments deleted after checkpoints.
    pub segments_released: u64,
    /// Versions collected.
    pub versions_collected: u64,
    /// WAL records replayed at open.
    pub replayed_records: u64,
    /// Versions loaded from the checkpoint at open.
    pub checkpoint_versions_loaded: u64,
    /// Chunk server counters.
    pub chunks: ChunkStats,
    /// Chunks referenced.
    pub chunk_count: u64,
}

struct Inner {
    config: StoreConfig,
    wal: Wal,
    versions: RefCell<VersionMap>,
    chunks: ChunkStore,
    hlc: Cell<Hlc>,
    /// LSNs reserved in the WAL and not yet applied, with their timestamps ([`REPLICATED`]
    /// for records shipped from another region): a checkpoint starts below the first; the
    /// closed timestamp stays below the first local write not yet durable.
    inflight: RefCell<BTreeMap<u64, u64>>,
    checkpointing: Cell<bool>,
    wal_bytes_carried: u64,
    wal_bytes_at_checkpoint: Cell<u64>,
    /// WAL bytes after the last checkpoint that make the next one due (see
    /// [`checkpoint_threshold`]).
    checkpoint_after: Cell<u64>,
    stats: RefCell<StoreStats>,
    closed: Cell<bool>,
    /// What replication needs kept, as last told ([`ShardStore::set_wal_hold`]): the lowest
    /// LSN a peer still needs, and the lowest LSN a stream installing a snapshot resumes at
    /// (`u64::MAX`: none).
    wal_hold: Cell<(u64, u64)>,
    /// No version at or above it is collected ([`ShardStore::set_collect_floor`]).
    collect_floor: Cell<u64>,
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
    /// Recovers the shard: loads the newest checkpoint, replays the WAL after it, deletes
    /// chunk files nothing references. Restart work is bounded by the live data plus the WAL
    /// written since the last checkpoint, not by the history.
    pub async fn open(config: StoreConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let shard_id = config.shard_id;
        let recovery = |message: String| StoreError::Recovery { shard_id, message };
        std::fs::create_dir_all(&config.dir)
            .map_err(|error| recovery(format!("create {}: {error}", config.dir.display())))?;

        let mut versions = VersionMap::default();
        let loaded = load_checkpoint(&config, &mut versions)?;
        let checkpoint_lsn = loaded.map_or(1, |info| info.lsn);

        let wal = Wal::open(config.wal.clone()).await?;
        let durable = wal.durable_next_lsn();
        if wal.first_lsn() > checkpoint_lsn || checkpoint_lsn > durable {
            return Err(recovery(format!(
                "the WAL holds LSNs {}..{durable} but the checkpoint needs replay from {checkpoint_lsn}",
                wal.first_lsn()
            )));
        }
        let reader = WalReader::new(&config.wal.dir, shard_id, config.wal.record_payload_bytes_max);
        let mut cursor = reader.cursor(checkpoint_lsn, durable);
        let mut replayed = 0u64;
        let mut replayed_bytes = 0u64;
        while let Some(record) = cursor.next_record()? {
            replayed_bytes += wire::encoded_len(record.payload.len()) as u64;
            let ops = op::decode(&record.payload)
                .map_err(|error| recovery(format!("WAL record {} does not decode: {error}", record.lsn)))?;
            for op in ops {
                let op = op.detached();
                versions.apply(op.key, record.glt, op.body);
            }
            replayed += 1;
        }

        let chunks = ChunkStore::open(config.dir.join("chunks"), config.chunk_bytes, config.wal.faults.clone())?;
        // Chunk files are O_DIRECT both ways: glommio's iopoll probe must see a real sector on
        // their device too (the WAL's directory may be elsewhere).
        crate::files::calibrate_iopoll(&config.dir.join("chunks")).await;
        for (_, chain) in versions.iter_from(None) {
            for version in chain {
                if let Body::Chunked(list) = &version.body {
                    chunks.add_refs(list);
                }
            }
        }
        chunks.remove_unreferenced()?;

        let mut hlc = Hlc::with_origin(config.origin);
        hlc.observe(versions.max_ts());
        let stats = StoreStats {
            checkpoint_lsn,
            replayed_records: replayed,
            checkpoint_versions_loaded: loaded.map_or(0, |info| info.versions),
            ..StoreStats::default()
        };
        let store = Self {
            inner: Rc::new(Inner {
                // WAL replayed at open counts toward the next checkpoint, so a shard that
                // restarts often still checkpoints.
                wal_bytes_carried: replayed_bytes,
                wal_bytes_at_checkpoint: Cell::new(0),
                checkpoint_after: Cell::new(checkpoint_threshold(config.checkpoint_wal_bytes)),
                wal_hold: Cell::new((config.wal_hold_lsn, u64::MAX)),
                collect_floor: Cell::new(config.collect_floor),
                config,
                wal,
                versions: RefCell::new(versions),
                chunks,
                hlc: Cell::new(hlc),
                inflight: RefCell::default(),
                checkpointing: Cell::new(false),
                stats: RefCell::new(stats),
                closed: Cell::new(false),
            }),
        };
        store.collect_garbage().await?;
        Ok(store)
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
        if items.len() == 0 || items.len() > config.batch_ops_max {
            return Err(StoreError::BatchTooLarge {
                reason: format!("{} operations, allowed 1..={}", items.len(), config.batch_ops_max),
            });
        }
        let mut staged: Vec<(&[u8], Staged<'_>)> = Vec::with_capacity(items.len());
        let result = self.stage(items, &mut staged).await;
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
        let appended = inner
            .wal
            .append_stamped(&payload, |lsn| {
                // The clock again, at reservation: waiting for room in a full batch may have
                // let the closed and applied points (published meanwhile from the clock) pass
                // the interval read before it, and a stamp must stay above them.
                let latest_us = inner.config.clock.interval().map_or(interval.latest_us(), |now| now.latest_us());
                let mut hlc = inner.hlc.get();
                let ts = hlc.tick(latest_us.max(interval.latest_us()));
                inner.hlc.set(hlc);
                inner.inflight.borrow_mut().insert(lsn, ts);
                reserved.set(Some((lsn, ts)));
                ts
            })
            .await;
        // `reserved` is set whenever the record took an LSN, even if the WAL failed after.
        let result = appended.map_err(StoreError::from).and_then(|_| {
            let (_, ts) = reserved.get().expect("an appended record was stamped");
            // Apply the payload's own slices: one copy of each inline value.
            let ops = op::decode(&payload).map_err(|error| StoreError::Recovery {
                shard_id: inner.config.shard_id,
                message: error.to_string(),
            })?;
            let mut versions = inner.versions.borrow_mut();
            for op in ops {
                versions.apply(op.key, ts, op.body);
            }
            Ok(ts)
        });
        if let Some((lsn, _)) = reserved.get() {
            inner.inflight.borrow_mut().remove(&lsn);
        }
        let ts = result?;
        self.commit_wait(ts).await?;
        Ok(ts)
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
    async fn commit_wait(&self, ts: u64) -> Result<(), StoreError> {
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
        let (ts, body) = match self.inner.versions.borrow().get(key, at)? {
            Some(version) => (version.ts, version.body.clone()),
            None => return Ok(None),
        };
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
    pub fn chunk_refs(&self, key: &[u8], at: Option<u64>) -> Result<Option<ValueChunks>, StoreError> {
        let versions = self.inner.versions.borrow();
        Ok(versions.get(key, at)?.and_then(|version| match &version.body {
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
        let (ts, body) = match self.inner.versions.borrow().get(key, at)? {
            Some(version) => (version.ts, version.body.clone()),
            None => return Ok(None),
        };
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
    pub fn stat(&self, key: &[u8], at: Option<u64>) -> Result<Option<KeyStat>, StoreError> {
        let versions = self.inner.versions.borrow();
        Ok(versions.get(key, at)?.map(|version| KeyStat {
            ts: version.ts,
            size: version.body.size(),
            chunks: match &version.body {
                Body::Chunked(list) => u32::try_from(list.chunks.len()).unwrap_or(u32::MAX),
                _ => 0,
            },
            versions: u32::try_from(versions.version_count(key)).unwrap_or(u32::MAX),
        }))
    }

    /// Up to `limit` live keys with `prefix` after `start_after`, and whether more may follow.
    pub fn list(
        &self,
        prefix: &[u8],
        start_after: &[u8],
        limit: usize,
        at: Option<u64>,
    ) -> Result<(Vec<ListItem>, bool), StoreError> {
        let versions = self.inner.versions.borrow();
        let (items, more) = versions.list(prefix, start_after, limit, at)?;
        let items = items.into_iter().map(|(key, version)| ListItem {
            key: key.clone(),
            ts: version.ts,
            size: version.body.size(),
        });
        Ok((items.collect(), more))
    }

    /// Removes versions older than the retention window (keeping what reads inside the window
    /// see) and deletes chunks no version references any more. Yields between steps.
    pub async fn collect_garbage(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let retention_us = u64::try_from(inner.config.retention.as_micros()).unwrap_or(u64::MAX);
        let horizon = timestamp_at(inner.config.clock.interval()?.earliest_us().saturating_sub(retention_us))
            .min(inner.collect_floor.get());
        let mut resume: Option<Bytes> = None;
        loop {
            let Collected { versions, released, resume_after, .. } =
                inner.versions.borrow_mut().collect(horizon, resume.as_deref(), limits::GC_KEYS_PER_STEP);
            inner.stats.borrow_mut().versions_collected += versions;
            for list in released {
                inner.chunks.release(&list)?;
            }
            match resume_after {
                Some(next) => resume = Some(next),
                None => return Ok(()),
            }
            // Let the requests queued meanwhile run: a pass over a large map takes
            // milliseconds, and yield_if_needed waits for the task queue's whole time slice.
            futures_lite::future::yield_now().await;
        }
    }

    /// WAL bytes this shard has written, across restarts.
    fn wal_bytes_written(&self) -> u64 {
        self.inner.wal.stats().batch_bytes + self.inner.wal_bytes_carried
    }

    /// Whether enough WAL was written since the last checkpoint to write another (between
    /// three quarters of `checkpoint_wal_bytes` and all of it).
    pub fn checkpoint_due(&self) -> bool {
        let since = self.wal_bytes_written().saturating_sub(self.inner.wal_bytes_at_checkpoint.get());
        since >= self.inner.checkpoint_after.get()
    }

    /// Writes a checkpoint, then deletes older checkpoints and the WAL segments it covers.
    /// Returns its LSN, or `None` when one is already being written.
    pub async fn checkpoint(&self) -> Result<Option<u64>, StoreError> {
        let inner = &self.inner;
        if inner.checkpointing.replace(true) {
            return Ok(None);
        }
        let result = self.write_checkpoint().await;
        inner.checkpointing.set(false);
        result.map(Some)
    }

    async fn write_checkpoint(&self) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let config = &inner.config;
        let wal_bytes = self.wal_bytes_written();
        let durable = inner.wal.durable_next_lsn();
        let lsn = inner.inflight.borrow().first_key_value().map_or(durable, |(first, _)| (*first).min(durable));
        let name = checkpoint::file_name(config.shard_id, lsn);
        let path = config.dir.join(&name);
        let temporary = config.dir.join(format!("{name}.tmp"));
        let fail = |message: String| StoreError::Checkpoint { path: path.display().to_string(), message };
        let started = std::time::Instant::now();
        let (count, written) = self.write_checkpoint_file(&temporary, lsn, wal_bytes).await.map_err(fail)?;
        // The syncs, the rename and the unlink of the previous checkpoint (hundreds of MB:
        // 90 ms) run on glommio's blocking pool, not on the executor that serves the writes.
        let (dir, shard_id, finished) = (config.dir.clone(), config.shard_id, path.clone());
        glommio::executor()
            .spawn_blocking(move || {
                crate::files::sync_path(&temporary).map_err(|error| format!("sync: {error}"))?;
                std::fs::rename(&temporary, &finished).map_err(|error| format!("rename: {error}"))?;
                crate::files::sync_path(&dir).map_err(|error| format!("sync directory: {error}"))?;
                remove_checkpoints(&dir, shard_id, |old| old < lsn).map_err(|error| error.to_string())
            })
            .await
            .map_err(fail)?;
        let released = self.release_wal_after_checkpoint(lsn).await?;
        inner.wal_bytes_at_checkpoint.set(wal_bytes);
        inner.checkpoint_after.set(checkpoint_threshold(config.checkpoint_wal_bytes));
        tracing::info!(
            shard = config.shard_id,
            lsn,
            versions = count,
            bytes = written,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            segments_released = released,
            "checkpoint written"
        );
        let mut stats = inner.stats.borrow_mut();
        stats.checkpoints += 1;
        stats.checkpoint_lsn = lsn;
        stats.segments_released += released;
        Ok(lsn)
    }

    /// Writes every version into `temporary`, a checkpoint replaying from `lsn`, in paced
    /// pieces (`wal_bytes`: the WAL's bytes when it began, to pace against); the file is
    /// flushed and synced. Returns the versions and bytes written.
    async fn write_checkpoint_file(&self, temporary: &Path, lsn: u64, wal_bytes: u64) -> Result<(u64, u64), String> {
        let inner = &self.inner;
        let config = &inner.config;
        if let Some(errno) = config.wal.faults.as_ref().and_then(|faults| faults.on_store(StoreFault::Checkpoint)) {
            return Err(format!("create: {}", std::io::Error::from_raw_os_error(errno)));
        }
        let (horizon, versions_total) = {
            let versions = inner.versions.borrow();
            (versions.horizon(), versions.version_total())
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .dma_open(temporary)
            .await
            .map_err(|error| format!("create: {error}"))?;
        // Paced: small writes, one at a time, so little sits on the disk ahead of a WAL
        // barrier. At close nothing waits on the disk but the close itself.
        let (piece_bytes, in_flight) = if inner.closed.get() {
            (limits::CHECKPOINT_CLOSING_PIECE_BYTES, limits::CHECKPOINT_CLOSING_WRITES_IN_FLIGHT)
        } else {
            (limits::CHECKPOINT_PIECE_BYTES, limits::CHECKPOINT_WRITES_IN_FLIGHT)
        };
        let mut writer =
            DmaStreamWriterBuilder::new(file).with_buffer_size(piece_bytes).with_write_behind(in_flight).build();
        let mut piece = Vec::with_capacity(piece_bytes + 4096);
        let mut scratch = Vec::new();
        checkpoint::encode_header(config.shard_id, lsn, horizon, &mut piece);
        let (mut count, mut written) = (0u64, 0u64);
        let mut resume: Option<Bytes> = None;
        let started = std::time::Instant::now();
        loop {
            let piece_started = std::time::Instant::now();
            let last = self.encode_piece(&mut resume, piece_bytes, &mut count, &mut scratch, &mut piece)?;
            let done = last.is_none() || piece.len() < piece_bytes;
            if done {
                checkpoint::encode_footer(config.shard_id, lsn, horizon, count, &mut piece);
            }
            writer.write_all(&piece).await.map_err(|error| format!("write: {error}"))?;
            written += piece.len() as u64;
            let piece_len = piece.len();
            piece.clear();
            if done {
                break;
            }
            resume = last;
            // Paced, so the writes beside it keep the CPU and the disk queue; a closing store
            // finishes at full speed.
            let half_interval = (config.checkpoint_wal_bytes / 2).max(1) as f64;
            let wal_share = self.wal_bytes_written().saturating_sub(wal_bytes) as f64 / half_interval;
            let done_share = count as f64 / versions_total.max(1) as f64;
            let elapsed = started.elapsed().as_secs_f64();
            let rate = checkpoint::pace_bytes_per_sec(
                config.checkpoint_bytes_per_sec,
                written,
                done_share,
                wal_share,
                elapsed,
            );
            if let Some(rate) = rate.filter(|_| !inner.closed.get()) {
                let due = std::time::Duration::from_secs_f64(piece_len as f64 / rate);
                if let Some(ahead) = due.checked_sub(piece_started.elapsed()) {
                    glommio::timer::sleep(ahead).await;
                }
            }
        }
        // Close flushes, fdatasyncs and trims the padding; the caller syncs again for the size.
        writer.close().await.map_err(|error| format!("close: {error}"))?;
        Ok((count, written))
    }

    /// Encodes the versions of the keys after `resume` into `piece` until it holds
    /// `piece_bytes`, holding the version map only meanwhile (the piece is written without).
    /// Returns the last key encoded (`None`: no key was left).
    fn encode_piece(
        &self,
        resume: &mut Option<Bytes>,
        piece_bytes: usize,
        count: &mut u64,
        scratch: &mut Vec<u8>,
        piece: &mut Vec<u8>,
    ) -> Result<Option<Bytes>, String> {
        let versions = self.inner.versions.borrow();
        let mut last = None;
        for (key, chain) in versions.iter_from(resume.as_deref()) {
            for version in chain {
                checkpoint::encode_version(key, version, scratch, piece).map_err(|error| error.to_string())?;
                *count += 1;
            }
            last = Some(key.clone());
            if piece.len() >= piece_bytes {
                break;
            }
        }
        Ok(last)
    }

    /// Releases the WAL a checkpoint at `lsn` made redundant, but what replication holds: the
    /// hold within `wal_hold_bytes_max`, the pin whatever the bound. Returns the segments
    /// released. Read after the old checkpoint files are gone: a shipper has the shard take its
    /// pin of a checkpoint's LSN before it opens that file, so either it finds the file deleted
    /// or the pin is seen here.
    async fn release_wal_after_checkpoint(&self, lsn: u64) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let (hold, pin) = inner.wal_hold.get();
        let hold = hold.max(inner.wal.keep_floor(lsn, inner.config.wal_hold_bytes_max)).min(pin);
        Ok(inner.wal.release_before(lsn.min(hold)).await?)
    }

    /// Counters and gauges.
    pub fn stats(&self) -> StoreStats {
        let mut stats = *self.inner.stats.borrow();
        let versions = self.inner.versions.borrow();
        stats.keys = versions.key_count() as u64;
        stats.versions = versions.version_total();
        stats.chunks = self.inner.chunks.stats();
        stats.chunk_count = self.inner.chunks.chunk_count() as u64;
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
        let mut resume: Option<Bytes> = None;
        loop {
            // A step of keys at a time (as collection does), yielding between steps.
            let (absent, last) = {
                let versions = self.inner.versions.borrow();
                let mut absent = Vec::new();
                let mut last = None;
                for (key, chain) in versions.iter_from(resume.as_deref()).take(limits::GC_KEYS_PER_STEP) {
                    let live_below =
                        chain.last().is_some_and(|latest| latest.body != Body::Tombstone && latest.ts < horizon);
                    // A multi-master key the home lacks may be another region's write the home
                    // has not received yet: only its own stream can delete it.
                    if live_below && !keys.contains(key) && !self.inner.config.is_multi_master(key) {
                        absent.push(key.clone());
                    }
                    last = Some(key.clone());
                }
                (absent, last)
            };
            deleted += self.tombstone(horizon, &absent).await?;
            let Some(last) = last else { return Ok(deleted) };
            resume = Some(last);
            futures_lite::future::yield_now().await;
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
        let ops = op::decode(payload).map_err(|error| bad(error.to_string()))?;
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
            let mut duplicates = Vec::new();
            let mut versions = inner.versions.borrow_mut();
            for (op, body) in ops.into_iter().zip(bodies) {
                let list = match &body {
                    Body::Chunked(list) => Some(list.clone()),
                    _ => None,
                };
                // A record applied before (a resumed stream): its chunks were counted then.
                if !versions.apply(op.key, glt, body) {
                    duplicates.extend(list);
                }
            }
            drop(versions);
            for list in &duplicates {
                inner.chunks.release(list)?;
            }
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

    /// Runs collection and checkpoints in the background until the store closes.
    pub fn spawn_maintenance(&self) {
        let store = self.clone();
        glommio::spawn_local(async move {
            let tick = std::time::Duration::from_millis(100).min(store.inner.config.gc_interval);
            // Wall time: a paced checkpoint can take many ticks.
            let mut last_gc = std::time::Instant::now();
            while !store.inner.closed.get() {
                glommio::timer::sleep(tick).await;
                if last_gc.elapsed() >= store.inner.config.gc_interval {
                    last_gc = std::time::Instant::now();
                    match store.collect_garbage().await {
                        // No interval for now: the horizon is unknown, try next round.
                        Ok(()) | Err(StoreError::Clock(_)) => {}
                        Err(_) => break,
                    }
                }
                if store.checkpoint_due() && store.checkpoint().await.is_err() {
                    break;
                }
            }
        })
        .detach();
    }

    /// Stops maintenance, writes a final checkpoint (so the next open replays nothing) and
    /// closes the WAL after every accepted write is durable.
    pub async fn close(self) -> Result<(), StoreError> {
        self.inner.closed.set(true);
        while self.inner.checkpointing.get() {
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

/// A checkpoint file's bytes, memory-mapped. What outlives the reading must be copied out
/// ([`op::Op::detached`]): a newer checkpoint frees this file by punching holes in it, and the
/// map then reads zeros there (which fail the records' checksums).
pub fn map_checkpoint(path: &Path) -> std::io::Result<Bytes> {
    let file = std::fs::File::open(path)?;
    // SAFETY: checkpoint files are written once under a temporary name and never modified
    // after the rename, and never truncated: a newer checkpoint deletes an older one by
    // punching holes (zeros, not SIGBUS) and unlinking it.
    let map = unsafe { memmap2::Mmap::map(&file) }?;
    Ok(Bytes::from_owner(map))
}

/// Loads the newest checkpoint of the shard into `versions`, zero-copy from a memory map.
fn load_checkpoint(config: &StoreConfig, versions: &mut VersionMap) -> Result<Option<CheckpointInfo>, StoreError> {
    let newest = newest_checkpoint(&config.dir, config.shard_id).map_err(|error| StoreError::Recovery {
        shard_id: config.shard_id,
        message: format!("list {}: {error}", config.dir.display()),
    })?;
    let Some((_, path)) = newest else { return Ok(None) };
    let fail = |message: String| StoreError::Checkpoint { path: path.display().to_string(), message };
    let bytes = map_checkpoint(&path).map_err(|error| fail(format!("open: {error}")))?;
    let info = checkpoint::decode(&bytes, config.wal.record_payload_bytes_max, |op, ts| {
        let op = op.detached();
        versions.apply(op.key, ts, op.body);
    })
    .map_err(|error| fail(error.to_string()))?;
    if info.shard_id != config.shard_id {
        return Err(fail(format!("belongs to shard {}", info.shard_id)));
    }
    versions.collect(info.horizon, None, 0);
    Ok(Some(info))
}

/// Opens every shard directory's store with `config_for(shard)`; a helper for binaries.
pub fn shard_dir(data_dir: &Path, shard_id: u32) -> PathBuf {
    data_dir.join(format!("shard-{shard_id:03}"))
}
