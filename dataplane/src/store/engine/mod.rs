//! A shard's versions on disk: one key-value-separated `lsm-tree` per shard (the decision and
//! its figures are in ARCHITECTURE.md), keyed by [`codec`]'s (user key, newest first) encoding,
//! under a byte-budgeted cache that the shards of a node share.
//!
//! The tree keeps no journal of its own: the shard's WAL is the durability point. A write is
//! inserted into the memtable after its WAL record is durable; [`DiskVersions::flush`] writes
//! sealed memtables to table and blob files (synced by lsm-tree) and returns the highest
//! applied LSN they hold, below which the WAL may be released. Recovery reopens the tree and
//! replays the WAL from [`DiskVersions::flushed_lsn`].
//!
//! Retention is compaction-time filtering ([`Retention`]): a compaction keeps, per key, every
//! version at or above the horizon and the newest below it (tombstones included, so an older
//! version written later by replication never resurfaces), and destroys the rest; the chunk
//! lists of destroyed versions come back from [`DiskVersions::compact_if_needed`] once the
//! compaction succeeded, for the chunk reference counts.
//!
//! Every call here is blocking file I/O: the shard runs them off its executor.

pub mod codec;

use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lsm_tree::{AbstractTree, AnyTree, Cache, Config, Guard as _, KvSeparationOptions, SequenceNumberCounter};
use thiserror::Error;

use crate::store::op::{Body, ChunkList};
use crate::store::versions::Version;
use codec::CodecError;

/// Engine keys of our own bookkeeping start with `0x00 0x00`, which no user key's engine key
/// does (a user key's `0x00` is followed by `0xFF` or the terminator `0x01`); they sort first.
const META_PREFIX: &[u8] = b"\x00\x00";
/// The engine key holding the applied LSN.
const APPLIED_LSN_KEY: &[u8] = b"\x00\x00applied-lsn";

/// Values of at least this many bytes go to blob files, so compaction rewrites keys and small
/// values only.
pub const SEPARATION_BYTES: u32 = 512;

/// A page of a listing: (key, visible version) pairs and whether more may follow.
pub type DiskPage = (Vec<(Vec<u8>, Version)>, bool);

/// Why the engine failed.
#[derive(Debug, Error)]
pub enum EngineError {
    /// lsm-tree returned an error (I/O, a damaged table or blob file).
    #[error("engine {op} in {path}: {message}")]
    Tree {
        /// What was being done.
        op: &'static str,
        /// The tree's directory.
        path: String,
        /// lsm-tree's error.
        message: String,
    },
    /// Bytes in the tree do not decode: a damaged or foreign file.
    #[error("engine data in {path} does not decode: {error}")]
    Codec {
        /// The tree's directory.
        path: String,
        /// What was wrong.
        error: CodecError,
    },
}

/// Sizes of the engine's memory, for the budget and the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineMemory {
    /// Bytes in the memtable taking writes.
    pub active_memtable_bytes: u64,
    /// Sealed memtables waiting for their flush.
    pub sealed_memtables: usize,
    /// Bytes in the (shared) block and blob cache.
    pub cache_bytes: u64,
    /// Index and filter blocks pinned outside the cache.
    pub pinned_bytes: u64,
}

/// One shard's versions in an lsm-tree.
pub struct DiskVersions {
    tree: AnyTree,
    seqno: SequenceNumberCounter,
    visible: SequenceNumberCounter,
    cache: Arc<Cache>,
    path: String,
    /// Highest LSN inserted so far (written with the memtable when it is sealed).
    applied_lsn: u64,
    retention: Arc<Retention>,
}

/// The retention horizon compactions apply, and the chunk lists of the versions a running
/// compaction destroyed (handed out only once it succeeded).
#[derive(Debug, Default)]
pub struct Retention {
    horizon: AtomicU64,
    destroyed: Mutex<Vec<Arc<ChunkList>>>,
}

impl Retention {
    /// Moves the horizon forward (never back).
    pub fn advance(&self, horizon: u64) {
        self.horizon.fetch_max(horizon, Ordering::AcqRel);
    }

    /// The horizon compactions apply.
    pub fn horizon(&self) -> u64 {
        self.horizon.load(Ordering::Acquire)
    }

    fn take_destroyed(&self) -> Vec<Arc<ChunkList>> {
        std::mem::take(&mut *self.destroyed.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// Makes one [`RetentionFilter`] per compaction.
struct RetentionFactory(Arc<Retention>);

impl lsm_tree::compaction::Factory for RetentionFactory {
    fn name(&self) -> &'static str {
        "meridian-retention"
    }

    fn make_filter(
        &self,
        _ctx: &lsm_tree::compaction::filter::Context,
    ) -> Box<dyn lsm_tree::compaction::CompactionFilter> {
        Box::new(RetentionFilter {
            horizon: self.0.horizon(),
            retention: Arc::clone(&self.0),
            current: None,
            kept_below: false,
            destroyed: Vec::new(),
        })
    }
}

/// One compaction's pass: engine keys arrive in order (user key, newest first).
struct RetentionFilter {
    horizon: u64,
    retention: Arc<Retention>,
    current: Option<Vec<u8>>,
    kept_below: bool,
    destroyed: Vec<Arc<ChunkList>>,
}

impl lsm_tree::compaction::CompactionFilter for RetentionFilter {
    fn filter_item(
        &mut self,
        item: lsm_tree::compaction::ItemAccessor<'_>,
        _ctx: &lsm_tree::compaction::filter::Context,
    ) -> lsm_tree::Result<lsm_tree::compaction::Verdict> {
        use lsm_tree::compaction::Verdict;
        let engine_key = item.key();
        if engine_key.starts_with(META_PREFIX) {
            return Ok(Verdict::Keep);
        }
        // A key or value that does not decode is kept: retention never destroys what it
        // cannot read (reads report it).
        let Ok((key, ts)) = codec::decode_key(engine_key) else { return Ok(Verdict::Keep) };
        if self.current.as_deref() != Some(key.as_slice()) {
            self.current = Some(key);
            self.kept_below = false;
        }
        if ts >= self.horizon {
            return Ok(Verdict::Keep);
        }
        if !self.kept_below {
            // The newest version below the horizon: what reads at the horizon see.
            self.kept_below = true;
            return Ok(Verdict::Keep);
        }
        match codec::decode_body(&item.value()?) {
            Ok(Body::Chunked(list)) => self.destroyed.push(list),
            Ok(_) => {}
            Err(_) => return Ok(Verdict::Keep),
        }
        Ok(Verdict::Destroy)
    }

    fn finish(self: Box<Self>) {
        let RetentionFilter { retention, destroyed, .. } = *self;
        retention.destroyed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(destroyed);
    }
}

impl std::fmt::Debug for DiskVersions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskVersions").field("path", &self.path).field("applied_lsn", &self.applied_lsn).finish()
    }
}

impl DiskVersions {
    /// Opens (or creates) the tree in `path`, sharing `cache` with the node's other shards.
    pub fn open(path: &Path, cache: Arc<Cache>) -> Result<Self, EngineError> {
        let display = path.display().to_string();
        let (seqno, visible) = (SequenceNumberCounter::default(), SequenceNumberCounter::default());
        let retention = Arc::new(Retention::default());
        let tree = Config::new(path, seqno.clone(), visible.clone())
            .use_cache(Arc::clone(&cache))
            .with_compaction_filter_factory(Some(Arc::new(RetentionFactory(Arc::clone(&retention)))))
            .with_kv_separation(Some(KvSeparationOptions::default().separation_threshold(SEPARATION_BYTES)))
            .open()
            .map_err(|error| EngineError::Tree { op: "open", path: display.clone(), message: error.to_string() })?;
        if let Some(highest) = tree.get_highest_seqno() {
            seqno.fetch_max(highest + 1);
            visible.fetch_max(highest + 1);
        }
        let mut versions = Self { tree, seqno, visible, cache, path: display, applied_lsn: 0, retention };
        versions.applied_lsn = versions.flushed_lsn()?;
        Ok(versions)
    }

    fn tree_error(&self, op: &'static str, error: &lsm_tree::Error) -> EngineError {
        EngineError::Tree { op, path: self.path.clone(), message: error.to_string() }
    }

    fn codec_error(&self, error: CodecError) -> EngineError {
        EngineError::Codec { path: self.path.clone(), error }
    }

    /// Inserts `key`'s version at `ts`, written by the WAL record `lsn`. Idempotent: the same
    /// version again replaces itself. Returns the active memtable's size in bytes.
    pub fn apply(&mut self, lsn: u64, key: &[u8], version: &Version) -> u64 {
        let seq = self.seqno.next();
        let (_, memtable_bytes) =
            self.tree.insert(codec::encode_key(key, version.ts), codec::encode_body(&version.body), seq);
        self.visible.fetch_max(seq + 1);
        self.applied_lsn = self.applied_lsn.max(lsn);
        memtable_bytes
    }

    /// The version of `key` visible at `at` (the newest with `ts <= at`), tombstones included.
    pub fn get_at(&self, key: &[u8], at: u64) -> Result<Option<Version>, EngineError> {
        let from = codec::encode_key(key, at);
        let to = codec::encode_key(key, 0);
        let Some(entry) = self.tree.range(from..=to, self.visible.get(), None).next() else { return Ok(None) };
        let (engine_key, value) = entry.into_inner().map_err(|error| self.tree_error("read", &error))?;
        let (_, ts) = codec::decode_key(&engine_key).map_err(|error| self.codec_error(error))?;
        let body = codec::decode_body(&value).map_err(|error| self.codec_error(error))?;
        Ok(Some(Version { ts, body }))
    }

    /// Up to `limit` keys starting with `prefix` and after `start_after`, in order, each with
    /// its version visible at `at` (tombstones skipped); and whether more may follow.
    pub fn list_at(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        at: u64,
        limit: usize,
    ) -> Result<DiskPage, EngineError> {
        let mut start = Vec::new();
        codec::escape_into(prefix, &mut start);
        let lower = match start_after {
            // Past every version of `start_after`: its terminator with the oldest timestamp.
            Some(after) if after >= prefix => Bound::Excluded(codec::encode_key(after, 0)),
            _ => Bound::Included(start.clone()),
        };
        let mut out: Vec<(Vec<u8>, Version)> = Vec::new();
        let mut last_key: Option<Vec<u8>> = None;
        for entry in self.tree.range::<Vec<u8>, _>((lower, Bound::Unbounded), self.visible.get(), None) {
            let (engine_key, value) = entry.into_inner().map_err(|error| self.tree_error("list", &error))?;
            if !engine_key.starts_with(&start) {
                break;
            }
            if engine_key.starts_with(META_PREFIX) {
                continue;
            }
            let (key, ts) = codec::decode_key(&engine_key).map_err(|error| self.codec_error(error))?;
            if ts > at || last_key.as_deref() == Some(key.as_slice()) {
                continue;
            }
            last_key = Some(key.clone());
            let body = codec::decode_body(&value).map_err(|error| self.codec_error(error))?;
            if body == Body::Tombstone {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push((key, Version { ts, body }));
        }
        Ok((out, false))
    }

    /// Seals the active memtable (with the applied LSN in it), so [`Self::flush`] writes it.
    pub fn seal(&mut self) {
        let seq = self.seqno.next();
        self.tree.insert(APPLIED_LSN_KEY.to_vec(), self.applied_lsn.to_le_bytes().to_vec(), seq);
        self.visible.fetch_max(seq + 1);
        self.tree.rotate_memtable();
    }

    /// Writes every sealed memtable to synced table and blob files. Returns the applied LSN
    /// now on disk: the WAL below it may be released.
    pub fn flush(&self) -> Result<u64, EngineError> {
        let lock = self.tree.get_flush_lock();
        self.tree.flush(&lock, self.visible.get()).map_err(|error| self.tree_error("flush", &error))?;
        drop(lock);
        self.flushed_lsn()
    }

    /// The applied LSN the last flushed memtable recorded (0 if none).
    pub fn flushed_lsn(&self) -> Result<u64, EngineError> {
        let Some(persisted) = self.tree.get_highest_persisted_seqno() else { return Ok(0) };
        let value = self
            .tree
            .get(APPLIED_LSN_KEY, persisted + 1)
            .map_err(|error| self.tree_error("read the applied LSN", &error))?;
        Ok(value.and_then(|bytes| bytes.as_ref().try_into().ok()).map_or(0, u64::from_le_bytes))
    }

    /// The retention horizon: compactions destroy versions older than the newest below it.
    pub fn retention(&self) -> &Retention {
        &self.retention
    }

    /// Runs leveled compaction once if level 0 has piled up (`l0_runs` or more runs). Returns
    /// the chunk lists of the versions it destroyed (`None` if it did not run): their chunks'
    /// references may go.
    pub fn compact_if_needed(&self, l0_runs: usize) -> Result<Option<Vec<Arc<ChunkList>>>, EngineError> {
        if self.tree.l0_run_count() < l0_runs {
            return Ok(None);
        }
        let strategy = Arc::new(lsm_tree::compaction::Leveled::default());
        self.finish_compaction(self.tree.compact(strategy, self.visible.get())).map(Some)
    }

    /// Compacts every table into the last level (retention applied to all of them).
    pub fn compact_all(&self) -> Result<Vec<Arc<ChunkList>>, EngineError> {
        self.finish_compaction(self.tree.major_compact(64 << 20, self.visible.get()))
    }

    /// What a compaction destroyed, once it succeeded; a failed one destroyed nothing durable.
    fn finish_compaction(&self, outcome: lsm_tree::Result<()>) -> Result<Vec<Arc<ChunkList>>, EngineError> {
        let destroyed = self.retention.take_destroyed();
        outcome.map_err(|error| self.tree_error("compact", &error))?;
        Ok(destroyed)
    }

    /// What the engine holds in memory.
    pub fn memory(&self) -> EngineMemory {
        EngineMemory {
            active_memtable_bytes: self.tree.active_memtable().size(),
            sealed_memtables: self.tree.sealed_memtable_count(),
            cache_bytes: self.cache.size(),
            pinned_bytes: (self.tree.pinned_filter_size() + self.tree.pinned_block_index_size()) as u64,
        }
    }

    /// Bytes of table and blob files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.tree.disk_space()
    }
}
