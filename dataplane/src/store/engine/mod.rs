//! A shard's versions on disk: one key-value-separated `lsm-tree` per shard (the decision and
//! its figures are in ARCHITECTURE.md), keyed by [`codec`]'s (user key, newest first) encoding,
//! under a byte-budgeted cache that the shards of a node share.
//!
//! The tree keeps no journal of its own: the shard's WAL is the durability point. A write is
//! inserted into the memtable after its WAL record is durable; [`DiskVersions::seal`] closes
//! the memtable with the LSN from which the WAL must be replayed to rebuild what it does not
//! hold (every record below it is applied), and [`DiskVersions::flush`] writes sealed
//! memtables to table and blob files (synced by lsm-tree) and returns that LSN: the WAL below
//! it may be released. Recovery reopens the tree and replays the WAL from
//! [`DiskVersions::replay_from`]; applying a version again is harmless.
//!
//! Retention is compaction-time filtering ([`Retention`]): a compaction keeps, per key, every
//! version at or above the horizon and the newest below it (tombstones included, so an older
//! version written later by replication never resurfaces), and destroys the rest; the chunk
//! lists of destroyed versions come back from [`DiskVersions::compact_if_needed`] once the
//! compaction succeeded, for the chunk reference counts.
//!
//! Every call here is blocking file I/O: the shard runs them off its executor.

pub mod codec;
pub mod lane;
mod writeback;

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher as _;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use lsm_tree::{AbstractTree, AnyTree, Cache, Config, Guard as _, KvSeparationOptions, SequenceNumberCounter};
use thiserror::Error;

use crate::store::op::{Body, ChunkList};
use crate::store::versions::Version;
use codec::CodecError;

/// Engine keys of our own bookkeeping start with `0x00 0x00`, which no user key's engine key
/// does (a user key's `0x00` is followed by `0xFF` or the terminator `0x01`); they sort first.
const META_PREFIX: &[u8] = b"\x00\x00";
/// The engine key holding the LSN the WAL is replayed from, and the newest timestamp applied.
const REPLAY_FROM_KEY: &[u8] = b"\x00\x00replay-from";
/// Present in trees whose chunk-list versions carry the chunked mark in their key (all trees
/// created since the mark exists); in older ones retention reads a destroyed version's value.
const MARKED_KEYS_KEY: &[u8] = b"\x00\x00chunked-mark";

/// Values of at least this many bytes go to blob files, so compaction rewrites keys and small
/// values only.
pub const SEPARATION_BYTES: u32 = 512;

/// The block and blob cache the shards of a node share (its bytes count against the node's
/// memory budget).
#[derive(Clone)]
pub struct SharedCache(pub Arc<Cache>);

impl SharedCache {
    /// A cache of at most `bytes`.
    pub fn with_capacity_bytes(bytes: u64) -> Self {
        Self(Arc::new(Cache::with_capacity_bytes(bytes)))
    }
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SharedCache")
            .field("capacity", &self.0.capacity())
            .field("size", &self.0.size())
            .finish()
    }
}

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineMemory {
    /// Bytes in the memtable taking writes, with the index of its newest versions.
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
    /// Where flushes and compactions write (table and blob files).
    written_dirs: Vec<PathBuf>,
    retention: Arc<Retention>,
    /// (replay LSN, newest timestamp) of each memtable sealed and not yet flushed, in order.
    sealed_points: Mutex<Vec<(u64, u64)>>,
    /// The point of the last memtable flushed.
    flushed: Mutex<(u64, u64)>,
    /// Sequence numbers of the reads in progress, with how many use each.
    reads: Mutex<BTreeMap<u64, usize>>,
    /// What lets a read be answered from the active memtable ([`DiskVersions::get_in_memory`]).
    recent: Mutex<Recent>,
    recent_hasher: ahash::RandomState,
}

/// The newest timestamp per key hash in the active memtable, and the newest timestamp of any
/// version sealed or flushed (a bound: the clock's last stamp at each seal). Keyed by a 64-bit
/// hash, not the key: nothing allocated per key (a map of the keys themselves halved
/// `bench store`'s fill rate), 16 bytes a slot, counted with the memtable against the budget.
#[derive(Default)]
struct Recent {
    newest: HashMap<u64, u64, ahash::RandomState>,
    others_max_ts: u64,
}

/// Bytes a slot of [`Recent::newest`] takes (key, value, control byte, load factor).
const RECENT_ENTRY_BYTES: usize = 20;

/// A read in progress (see [`DiskVersions::begin_read`]).
struct ReadGuard<'a> {
    versions: &'a DiskVersions,
    seqno: u64,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        let mut reads = self.versions.reads.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = reads.get_mut(&self.seqno) {
            *count -= 1;
            if *count == 0 {
                reads.remove(&self.seqno);
            }
        }
    }
}

/// The retention horizon compactions apply, and the chunk lists of the versions a running
/// compaction destroyed (handed out only once it succeeded).
#[derive(Debug, Default)]
pub struct Retention {
    horizon: AtomicU64,
    destroyed: Mutex<Vec<Arc<ChunkList>>>,
    destroyed_versions: AtomicU64,
    /// The tree predates the chunked mark: any value may be a chunk list.
    unmarked_chunk_lists: std::sync::atomic::AtomicBool,
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

    /// Versions compactions have destroyed since open.
    pub fn destroyed_versions(&self) -> u64 {
        self.destroyed_versions.load(Ordering::Acquire)
    }

    fn take_destroyed(&self) -> Vec<Arc<ChunkList>> {
        std::mem::take(&mut *self.destroyed.lock().unwrap_or_else(PoisonError::into_inner))
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
            unmarked_chunk_lists: self.0.unmarked_chunk_lists.load(Ordering::Acquire),
            retention: Arc::clone(&self.0),
            current: None,
            kept_below: false,
            destroyed: Vec::new(),
            destroyed_versions: 0,
        })
    }
}

/// One compaction's pass: engine keys arrive in order (user key, newest first).
struct RetentionFilter {
    horizon: u64,
    unmarked_chunk_lists: bool,
    retention: Arc<Retention>,
    current: Option<Vec<u8>>,
    kept_below: bool,
    destroyed: Vec<Arc<ChunkList>>,
    destroyed_versions: u64,
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
        let Ok((key, ts, chunked)) = codec::decode_version_key(engine_key) else { return Ok(Verdict::Keep) };
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
        // A value in a blob file whose key has no chunked mark is no chunk list: destroyed
        // without reading it. Others are read (inline ones cost nothing).
        if chunked || self.unmarked_chunk_lists || !item.is_indirection() {
            match codec::decode_body(&item.value()?) {
                Ok(Body::Chunked(list)) => self.destroyed.push(list),
                Ok(_) => {}
                Err(_) => return Ok(Verdict::Keep),
            }
        }
        self.destroyed_versions += 1;
        Ok(Verdict::Destroy)
    }

    fn finish(self: Box<Self>) {
        let RetentionFilter { retention, destroyed, destroyed_versions, .. } = *self;
        retention.destroyed.lock().unwrap_or_else(PoisonError::into_inner).extend(destroyed);
        retention.destroyed_versions.fetch_add(destroyed_versions, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for DiskVersions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskVersions").field("path", &self.path).finish()
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
            // A read at a timestamp is a range over the key's versions, which bloom filters do
            // not serve: with every level's index blocks in memory it reads one data block per
            // level whose tables overlap the key (index blocks are small: keys and pointers).
            .index_block_pinning_policy(lsm_tree::config::PinningPolicy::all(true))
            .open()
            .map_err(|error| EngineError::Tree { op: "open", path: display.clone(), message: error.to_string() })?;
        if let Some(highest) = tree.get_highest_seqno() {
            seqno.fetch_max(highest + 1);
            visible.fetch_max(highest + 1);
        }
        let versions = Self {
            tree,
            seqno,
            visible,
            cache,
            path: display,
            written_dirs: vec![path.join("tables"), path.join("blobs")],
            retention,
            sealed_points: Mutex::default(),
            flushed: Mutex::new((1, 0)),
            reads: Mutex::default(),
            recent: Mutex::default(),
            recent_hasher: ahash::RandomState::new(),
        };
        versions.check_chunked_mark()?;
        let point = versions.read_flushed_point()?;
        *versions.flushed.lock().unwrap_or_else(PoisonError::into_inner) = point;
        versions.recent.lock().unwrap_or_else(PoisonError::into_inner).others_max_ts = point.1;
        Ok(versions)
    }

    fn tree_error(&self, op: &'static str, error: &lsm_tree::Error) -> EngineError {
        EngineError::Tree { op, path: self.path.clone(), message: error.to_string() }
    }

    fn codec_error(&self, error: CodecError) -> EngineError {
        EngineError::Codec { path: self.path.clone(), error }
    }

    /// Inserts `key`'s version at `ts` into the memtable (memory only, no I/O). Idempotent:
    /// the same version again replaces itself. A key has one body per timestamp (stamps are
    /// unique; a version written again is a replay): a chunk list and another body at the same
    /// timestamp would be two engine keys. Returns the active memtable's size in bytes.
    pub fn apply(&self, key: &[u8], version: &Version) -> u64 {
        let seq = self.seqno.next();
        let (_, memtable_bytes) = self.tree.insert(
            codec::encode_version_key(key, version.ts, &version.body),
            codec::encode_body(&version.body),
            seq,
        );
        self.visible.fetch_max(seq + 1);
        let hash = self.recent_hasher.hash_one(key);
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let newest = recent.newest.entry(hash).or_insert(0);
        *newest = (*newest).max(version.ts);
        let bytes = (recent.newest.capacity() * RECENT_ENTRY_BYTES) as u64;
        memtable_bytes + bytes
    }

    /// The version of `key` visible at `at` when memory alone can tell: the newest version of
    /// `key` in the active memtable, if it is visible at `at` and newer than everything
    /// sealed or flushed (so no version elsewhere can be newer). `None`: read the tree.
    pub fn get_in_memory(&self, key: &[u8], at: u64) -> Option<Version> {
        let hash = self.recent_hasher.hash_one(key);
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        // The newest timestamp of the keys sharing this hash: if `key` has a version there, it
        // is `key`'s newest in the memtable; if not, the memtable lookup finds nothing.
        let ts = *recent.newest.get(&hash)?;
        if ts > at || ts <= recent.others_max_ts {
            return None;
        }
        // Under the lock: no seal rotates the memtable meanwhile.
        let (memtable, seqno) = (self.tree.active_memtable(), self.visible.get());
        let item = memtable
            .get(&codec::encode_key(key, ts), seqno)
            .or_else(|| memtable.get(&codec::encode_chunked_key(key, ts), seqno))?;
        let body = codec::decode_body(&item.value).ok()?;
        Some(Version { ts, body })
    }

    /// Whether `key` has a version at exactly `ts`.
    pub fn contains(&self, key: &[u8], ts: u64) -> Result<bool, EngineError> {
        // Either engine key of that version (with or without the chunked mark): two point
        // reads, which bloom filters serve, where a range would read a block of every level.
        let read = self.begin_read();
        for engine_key in [codec::encode_key(key, ts), codec::encode_chunked_key(key, ts)] {
            if self.tree.contains_key(&engine_key, read.seqno).map_err(|error| self.tree_error("read", &error))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// How many versions `key` holds.
    pub fn version_count(&self, key: &[u8]) -> Result<usize, EngineError> {
        let (from, to) = (codec::encode_key(key, u64::MAX), codec::key_end(key));
        let mut count = 0;
        let read = self.begin_read();
        for entry in self.tree.range(from..=to, read.seqno, None) {
            entry.key().map_err(|error| self.tree_error("read", &error))?;
            count += 1;
        }
        Ok(count)
    }

    /// Every chunk list the engine holds (what the chunk reference counts are rebuilt from at
    /// open), read without resolving other values: a blob-held value is read only when its key
    /// carries the chunked mark (or the tree predates it).
    pub fn chunk_lists(&self) -> Result<Vec<Arc<ChunkList>>, EngineError> {
        let unmarked = self.retention.unmarked_chunk_lists.load(Ordering::Acquire);
        let might_be_chunked = |engine_key: &lsm_tree::UserKey| {
            !engine_key.starts_with(META_PREFIX)
                && (unmarked || codec::decode_version_key(engine_key).is_ok_and(|(_, _, chunked)| chunked))
        };
        let mut lists = Vec::new();
        let read = self.begin_read();
        for entry in self.tree.range::<Vec<u8>, _>(.., read.seqno, None) {
            let (_, value) = entry.into_inner_if(might_be_chunked).map_err(|error| self.tree_error("scan", &error))?;
            if let Some(value) = value
                && let Body::Chunked(list) = codec::decode_body(&value).map_err(|error| self.codec_error(error))?
            {
                lists.push(list);
            }
        }
        Ok(lists)
    }

    /// Calls `each` with every version of every key after `start_after`, in key order and
    /// newest first within a key, until it returns `false`. One consistent view: flushes and
    /// compactions meanwhile do not change what the scan sees.
    pub fn scan(
        &self,
        start_after: Option<&[u8]>,
        mut each: impl FnMut(Vec<u8>, Version) -> bool,
    ) -> Result<(), EngineError> {
        let lower = match start_after {
            Some(after) => Bound::Excluded(codec::key_end(after)),
            None => Bound::Unbounded,
        };
        let read = self.begin_read();
        for entry in self.tree.range::<Vec<u8>, _>((lower, Bound::Unbounded), read.seqno, None) {
            let (engine_key, value) = entry.into_inner().map_err(|error| self.tree_error("scan", &error))?;
            if engine_key.starts_with(META_PREFIX) {
                continue;
            }
            let (key, ts) = codec::decode_key(&engine_key).map_err(|error| self.codec_error(error))?;
            let body = codec::decode_body(&value).map_err(|error| self.codec_error(error))?;
            if !each(key, Version { ts, body }) {
                break;
            }
        }
        Ok(())
    }

    /// The version of `key` visible at `at` (the newest with `ts <= at`), tombstones included.
    pub fn get_at(&self, key: &[u8], at: u64) -> Result<Option<Version>, EngineError> {
        let from = codec::encode_key(key, at);
        let to = codec::key_end(key);
        let read = self.begin_read();
        let Some(entry) = self.tree.range(from..=to, read.seqno, None).next() else { return Ok(None) };
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
            // Past every version of `start_after`.
            Some(after) if after >= prefix => Bound::Excluded(codec::key_end(after)),
            _ => Bound::Included(start.clone()),
        };
        let mut out: Vec<(Vec<u8>, Version)> = Vec::new();
        let mut last_key: Option<Vec<u8>> = None;
        let read = self.begin_read();
        for entry in self.tree.range::<Vec<u8>, _>((lower, Bound::Unbounded), read.seqno, None) {
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

    /// Seals the active memtable, so [`Self::flush`] writes it, recording that every WAL
    /// record below `replay_from` is applied (in it or before it) and the newest timestamp
    /// applied, `max_ts`.
    pub fn seal(&self, replay_from: u64, max_ts: u64) {
        let seq = self.seqno.next();
        let mut value = replay_from.to_le_bytes().to_vec();
        value.extend_from_slice(&max_ts.to_le_bytes());
        self.tree.insert(REPLAY_FROM_KEY.to_vec(), value, seq);
        self.visible.fetch_max(seq + 1);
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let mut sealed = self.sealed_points.lock().unwrap_or_else(PoisonError::into_inner);
        if self.tree.rotate_memtable().is_some() {
            sealed.push((replay_from.max(1), max_ts));
        }
        *recent = Recent { newest: HashMap::default(), others_max_ts: recent.others_max_ts.max(max_ts) };
    }

    /// Writes every sealed memtable to synced table and blob files. Returns the LSN the WAL
    /// is now replayed from: the WAL below it may be released.
    pub fn flush(&self) -> Result<u64, EngineError> {
        // The memtables sealed by now are what this flush writes (one sealed meanwhile may be
        // written too; its point is then reported by the next flush).
        let points = {
            let sealed = self.sealed_points.lock().unwrap_or_else(PoisonError::into_inner);
            sealed.len()
        };
        let _writeback = writeback::WriteBehind::start(&self.written_dirs);
        let lock = self.tree.get_flush_lock();
        self.tree.flush(&lock, self.gc_watermark()).map_err(|error| self.tree_error("flush", &error))?;
        drop(lock);
        let mut sealed = self.sealed_points.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(point) = sealed.drain(..points).next_back() {
            *self.flushed.lock().unwrap_or_else(PoisonError::into_inner) = point;
        }
        drop(sealed);
        // The flushed memtables' memory goes back to the system: glibc keeps freed memory in
        // its arenas, and without this the steady RSS of `bench store` stayed ~110 MiB higher.
        // SAFETY: the argument is only the padding to keep; glibc's allocator state is its own.
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(self.flushed_point().0)
    }

    /// The LSN the WAL must be replayed from (1: every record), as the last flushed memtable
    /// recorded.
    pub fn replay_from(&self) -> u64 {
        self.flushed_point().0
    }

    /// The newest timestamp the flushed memtables hold (0 if none).
    pub fn flushed_max_ts(&self) -> u64 {
        self.flushed_point().1
    }

    fn flushed_point(&self) -> (u64, u64) {
        *self.flushed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether chunk lists carry the chunked mark: a tree with nothing on disk is marked from
    /// now on; one with tables and no record of the mark predates it.
    fn check_chunked_mark(&self) -> Result<(), EngineError> {
        let read = self.begin_read();
        let marked = self.tree.get(MARKED_KEYS_KEY, read.seqno).map_err(|error| self.tree_error("open", &error))?;
        drop(read);
        if marked.is_none() {
            if self.tree.disk_space() == 0 {
                let seq = self.seqno.next();
                self.tree.insert(MARKED_KEYS_KEY.to_vec(), vec![1], seq);
                self.visible.fetch_max(seq + 1);
            } else {
                self.retention.unmarked_chunk_lists.store(true, Ordering::Release);
            }
        }
        Ok(())
    }

    /// The point the tables on disk recorded (read at open, when every memtable is flushed).
    fn read_flushed_point(&self) -> Result<(u64, u64), EngineError> {
        let read = self.begin_read();
        let value = self
            .tree
            .get(REPLAY_FROM_KEY, read.seqno)
            .map_err(|error| self.tree_error("read the replay LSN", &error))?;
        let Some(value) = value else { return Ok((1, 0)) };
        match (value.get(..8), value.get(8..16)) {
            (Some(lsn), Some(ts)) if value.len() == 16 => Ok((
                u64::from_le_bytes(lsn.try_into().unwrap_or_default()).max(1),
                u64::from_le_bytes(ts.try_into().unwrap_or_default()),
            )),
            _ => Err(self.codec_error(CodecError::BadMeta(value.len()))),
        }
    }

    /// Registers a read at the newest visible sequence number until the guard drops: flushes
    /// and compactions keep the tree's versions that read needs (lsm-tree frees the versions
    /// older than the watermark they are given, and a read whose sequence number no version
    /// is older than panics).
    fn begin_read(&self) -> ReadGuard<'_> {
        let mut reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
        let seqno = self.visible.get();
        *reads.entry(seqno).or_default() += 1;
        ReadGuard { versions: self, seqno }
    }

    /// The oldest sequence number a read in progress uses, or the newest visible one.
    fn gc_watermark(&self) -> u64 {
        let reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
        let visible = self.visible.get();
        reads.keys().next().map_or(visible, |oldest| (*oldest).min(visible))
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
        let _writeback = writeback::WriteBehind::start(&self.written_dirs);
        self.finish_compaction(self.tree.compact(strategy, self.gc_watermark())).map(Some)
    }

    /// Compacts every table into the last level (retention applied to all of them).
    pub fn compact_all(&self) -> Result<Vec<Arc<ChunkList>>, EngineError> {
        let _writeback = writeback::WriteBehind::start(&self.written_dirs);
        self.finish_compaction(self.tree.major_compact(64 << 20, self.gc_watermark()))
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
            active_memtable_bytes: self.tree.active_memtable().size()
                + (self.recent.lock().unwrap_or_else(PoisonError::into_inner).newest.capacity() * RECENT_ENTRY_BYTES)
                    as u64,
            sealed_memtables: self.tree.sealed_memtable_count(),
            cache_bytes: self.cache.size(),
            pinned_bytes: (self.tree.pinned_filter_size() + self.tree.pinned_block_index_size()) as u64,
        }
    }

    /// Bytes of table and blob files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.tree.disk_space()
    }

    /// Versions held (an estimate: versions destroyed by retention or written twice are
    /// counted until compactions drop them).
    pub fn approximate_versions(&self) -> u64 {
        self.tree.approximate_len() as u64
    }

    /// Sealed memtables waiting for their flush (cheaper than [`Self::memory`]).
    pub fn sealed_memtables(&self) -> usize {
        self.tree.sealed_memtable_count()
    }

    /// Runs of tables in level 0 (what compaction works down).
    pub fn l0_runs(&self) -> usize {
        self.tree.l0_run_count()
    }
}
