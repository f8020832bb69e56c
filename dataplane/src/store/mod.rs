//! The versioned key/chunk store of one shard.
//!
//! * [`clock`], [`op`], [`versions`], [`checkpoint`] (its format) and the chunk file format in
//!   [`chunks`] are pure: no I/O, no clock reads (time is passed in).
//! * [`engine`] keeps versions on disk in an lsm-tree under a memory budget ([`engine::codec`],
//!   its key and value layout, is pure); the shard does not use it yet.
//! * [`shard`] is the glommio shell: it stamps writes with the HLC, appends them to the WAL,
//!   applies them once durable, stores large values in the chunk server, writes checkpoints and
//!   collects old versions.
//!
//! **Architecture Invariant:** a write is applied (visible to reads) only after its WAL record
//! is durable, and every chunk it references was made durable before that record was appended.

pub mod checkpoint;
pub mod chunks;
pub mod clock;
pub mod engine;
mod files;
pub mod op;
pub(crate) mod shard;
pub(crate) mod versions;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

pub use chunks::ChunkError;
pub use clock::{Clock, ClockUnavailable, Hlc, Interval, ManualClock, SystemClock};
pub use files::{EngineSlot, FileError, ShardFiles};
pub use shard::{ClosedPoint, KeyStat, ListItem, Progress, ShardStore, StoreStats, ValueChunks, shard_dir};
pub use versions::{TooOld, Version};

use crate::limits;
use crate::wal::{WalConfig, WalError};

/// Configuration of one shard's store. Defaults come from [`crate::limits`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The shard's directory: `wal/`, `chunks/` and checkpoints live under it.
    pub dir: PathBuf,
    /// The shard.
    pub shard_id: u32,
    /// Its WAL (the `dir` of which is `<dir>/wal`).
    pub wal: WalConfig,
    /// Longest key.
    pub key_bytes_max: usize,
    /// Largest value.
    pub value_bytes_max: usize,
    /// Values up to this size are stored inline in the WAL and the version map; larger ones are
    /// chunked.
    pub inline_bytes_max: usize,
    /// Size of each chunk of a chunked value.
    pub chunk_bytes: usize,
    /// Most operations in one batch.
    pub batch_ops_max: usize,
    /// How long old versions stay readable.
    pub retention: Duration,
    /// How often old versions are collected.
    pub gc_interval: Duration,
    /// Checkpoint (flush the engine's memtables, then release the WAL they cover) after this
    /// many WAL bytes, if the memory budget did not make one due earlier.
    pub checkpoint_wal_bytes: u64,
    /// This shard's share of the node's memory budget (`store.memory_bytes_max`): the engine's
    /// memtables (an eighth each, at most three), its share of the cache, indexes and filters.
    pub memory_bytes_max: u64,
    /// The cache the node's shards share (`None`: a cache of this shard's own, half its
    /// budget).
    pub engine_cache: Option<engine::SharedCache>,
    /// Physical time for the HLC.
    pub clock: Arc<dyn Clock>,
    /// `Some(home)` when this shard is a replica of region `home`: client writes are refused
    /// (`NotHome`) and versions arrive only through [`ShardStore::apply_replicated`].
    pub replica_of: Option<String>,
    /// `Some(why)` when the placement keeps no copy of this shard in this region: the client
    /// endpoint refuses every read and write of it (`NotHome`, saying where it is).
    pub not_held: Option<String>,
    /// Key prefixes of the multi-master keyspaces: their keys are written in every region,
    /// a replica shard's included, and the newest timestamp wins (last-writer-wins).
    pub multi_master: Vec<Vec<u8>>,
    /// This region's origin, stamped into every timestamp (see [`wire::glt`]) when the cluster
    /// has multi-master keyspaces; `None` otherwise.
    pub origin: Option<u8>,
    /// Lowest LSN replication needs at open, until it says otherwise
    /// ([`ShardStore::set_wal_hold`]; `u64::MAX`: none; 0 where the shard ships, so nothing
    /// goes before its streams said where their peers are). Checkpoints release no WAL segment
    /// at or above the hold, within `wal_hold_bytes_max`.
    pub wal_hold_lsn: u64,
    /// Most WAL bytes (whole segments below a checkpoint) the hold may keep; a peer further
    /// behind catches up from a snapshot. `u64::MAX`: no bound.
    pub wal_hold_bytes_max: u64,
    /// The shard is a copy in a replica set (`crate::replica`): its WAL is the set's log, whose
    /// tail above the committed point may still be cut. Records reach the engine only through
    /// [`ShardStore::apply_logged`] (below that point), so open replays nothing past the last
    /// flush, and a flush records the first LSN not applied as where to apply from.
    pub set_log: bool,
    /// No version at or above this timestamp is collected at open, until replication says
    /// otherwise ([`ShardStore::set_collect_floor`]; `u64::MAX`: no floor besides the
    /// retention). With multi-master keyspaces, what every source region has shipped: a version
    /// collected below it can never be outdated by a write still on its way (a collected
    /// tombstone would let an older write from a region away longer than the retention revive
    /// the key here and not where it was deleted).
    pub collect_floor: u64,
}

impl StoreConfig {
    /// Defaults for shard `shard_id` under `dir`.
    pub fn new(dir: impl Into<PathBuf>, shard_id: u32) -> Self {
        let dir = dir.into();
        let mut wal = WalConfig::new(dir.join("wal"), shard_id);
        wal.record_payload_bytes_max = limits::STORE_RECORD_BYTES_MAX_DEFAULT;
        Self {
            wal,
            dir,
            shard_id,
            key_bytes_max: limits::KEY_BYTES_MAX_DEFAULT,
            value_bytes_max: limits::VALUE_BYTES_MAX_DEFAULT,
            inline_bytes_max: limits::INLINE_BYTES_MAX_DEFAULT,
            chunk_bytes: limits::CHUNK_BYTES_DEFAULT,
            batch_ops_max: limits::BATCH_OPS_MAX_DEFAULT,
            retention: limits::RETENTION_DEFAULT,
            gc_interval: limits::GC_INTERVAL_DEFAULT,
            checkpoint_wal_bytes: limits::CHECKPOINT_WAL_BYTES_DEFAULT,
            memory_bytes_max: limits::STORE_SHARD_MEMORY_BYTES_DEFAULT,
            engine_cache: None,
            clock: Arc::new(SystemClock),
            replica_of: None,
            not_held: None,
            multi_master: Vec::new(),
            origin: None,
            wal_hold_lsn: u64::MAX,
            wal_hold_bytes_max: u64::MAX,
            collect_floor: u64::MAX,
            set_log: false,
        }
    }

    /// Whether `key` is in a multi-master keyspace.
    pub fn is_multi_master(&self, key: &[u8]) -> bool {
        self.multi_master.iter().any(|prefix| key.starts_with(prefix))
    }

    /// Checks every limit against the others; the error names the field.
    pub fn validate(&self) -> Result<(), StoreError> {
        let bad = |field: &'static str, reason: String| Err(StoreError::Config { field, reason });
        self.wal.validate().map_err(|error| StoreError::Config { field: "wal", reason: error.to_string() })?;
        if self.key_bytes_max == 0 || self.key_bytes_max > limits::KEY_BYTES_LIMIT {
            return bad("key_bytes_max", format!("must be 1..={}", limits::KEY_BYTES_LIMIT));
        }
        if self.value_bytes_max == 0 || self.value_bytes_max > limits::VALUE_BYTES_LIMIT {
            return bad("value_bytes_max", format!("must be 1..={}", limits::VALUE_BYTES_LIMIT));
        }
        if self.chunk_bytes < chunks::BLOCK_BYTES || self.chunk_bytes > chunks::CHUNK_BYTES_MAX {
            return bad("chunk_bytes", format!("must be {}..={}", chunks::BLOCK_BYTES, chunks::CHUNK_BYTES_MAX));
        }
        // An inline value and its key must fit one WAL record.
        let record_max = self.wal.record_payload_bytes_max as usize;
        if self.inline_bytes_max + self.key_bytes_max + 16 > record_max {
            return bad(
                "inline_bytes_max",
                format!("{} plus key_bytes_max must fit a WAL record of {record_max} bytes", self.inline_bytes_max),
            );
        }
        if self.batch_ops_max == 0 || self.batch_ops_max > usize::from(u16::MAX) {
            return bad("batch_ops_max", format!("must be 1..={}", u16::MAX));
        }
        if self.gc_interval.is_zero() {
            return bad("gc_interval", "must be positive".into());
        }
        if self.memory_bytes_max < limits::STORE_SHARD_MEMORY_BYTES_MIN {
            return bad(
                "memory_bytes_max",
                format!(
                    "this shard's share, {} bytes, is below the minimum of {} (raise store.memory_bytes_max or run fewer shards)",
                    self.memory_bytes_max,
                    limits::STORE_SHARD_MEMORY_BYTES_MIN
                ),
            );
        }
        if self.checkpoint_wal_bytes < self.wal.segment_bytes {
            return bad(
                "checkpoint_wal_bytes",
                format!("must be at least the WAL segment size {}", self.wal.segment_bytes),
            );
        }
        Ok(())
    }
}

/// What went wrong in the store. Each variant maps to one client error code.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    /// A configuration value is invalid.
    #[error("invalid store config `{field}`: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The key is empty or longer than the limit.
    #[error("key of {len} bytes is not allowed (1..={max})")]
    BadKey {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value is larger than the limit.
    #[error("value of {len} bytes exceeds the limit of {max}")]
    ValueTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A batch is empty, has too many operations or does not fit one WAL record.
    #[error("batch not accepted: {reason}")]
    BatchTooLarge {
        /// Why.
        reason: String,
    },
    /// A read below the retention horizon.
    #[error(transparent)]
    TooOld(#[from] TooOld),
    /// The chunk server failed (corruption is named by chunk and block).
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// The WAL failed or is fenced.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The clock has no interval, so no write can be stamped (or a durable write's commit
    /// wait could not finish: its outcome is then unknown to the client).
    #[error(transparent)]
    Clock(#[from] ClockUnavailable),
    /// The shard takes writes in another region; this one holds a replica.
    #[error("shard {shard_id} takes writes in region {home}; this region holds a replica")]
    NotHome {
        /// The shard.
        shard_id: u32,
        /// Its home region.
        home: String,
    },
    /// A replicated record cannot be applied (the shipper sent something a home shard never
    /// writes).
    #[error("shard {shard_id}: bad replicated record: {reason}")]
    BadReplica {
        /// The shard.
        shard_id: u32,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint could not be written or read.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The on-disk engine failed (I/O, a damaged table or blob file).
    #[error("engine of shard {shard_id}: {message}")]
    Engine {
        /// The shard.
        shard_id: u32,
        /// What went wrong.
        message: String,
    },
    /// A replica-set copy refused the write before it took an LSN (`crate::replica`: not the
    /// primary, lease lapsed, too few live members, ...).
    #[error("shard {shard_id}: {reason}")]
    NotAdmitted {
        /// The shard.
        shard_id: u32,
        /// Why (the replica set's refusal).
        reason: String,
    },
    /// Recovery found data it cannot use.
    #[error("recovery of shard {shard_id}: {message}")]
    Recovery {
        /// The shard.
        shard_id: u32,
        /// What is wrong.
        message: String,
    },
}
