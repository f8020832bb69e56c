//! The per-shard write-ahead log.
//!
//! * [`format`] and [`recovery`] are the pure core: layout, batch building, and the decision
//!   of what the bytes on disk mean. They do no I/O.
//! * [`writer`] is the glommio shell: O_DIRECT `DmaFile`s, group commit, rotation, fencing.
//! * [`reader`] iterates durable records through `memmap2`, for the store and the shipper.
//!
//! **Architecture Invariant:** an append's future resolves `Ok` only after the write of its
//! batch and the `fdatasync` that followed both completed. After any write or sync error the
//! WAL is fenced: nothing is retried, no later append is acknowledged.

pub mod faults;
pub mod format;
mod reader;
pub mod recovery;
mod tail;
pub mod torture;
pub(crate) mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use faults::{FaultInjector, StoreFault, WriteFault};
pub use reader::{WalCursor, WalReader, WalRecord};
pub use recovery::{RecoveryError, RecoveryMode};
pub use tail::{TailBatch, WalTail};
pub use writer::{Wal, WalStats, scan, truncate_from};

use crate::limits;
use format::SECTOR_BYTES;

/// Configuration of one shard's WAL. Defaults come from [`crate::limits`].
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Directory holding the shard's segment files.
    pub dir: PathBuf,
    /// The shard this WAL belongs to (written in every segment header).
    pub shard_id: u32,
    /// Size of each preallocated segment file.
    pub segment_bytes: u64,
    /// Largest batch extent written with one barrier.
    pub batch_bytes_max: usize,
    /// Most records in one batch.
    pub batch_records_max: u32,
    /// How long the writer waits for more appends before sealing a batch; zero seals as soon
    /// as the previous barrier completed (the default: group commit needs no timer).
    pub batch_linger: Duration,
    /// Largest payload of one record.
    pub record_payload_bytes_max: u32,
    /// Largest single DMA write. `None` reads the device's `max_sectors_kb`.
    pub io_bytes_max: Option<usize>,
    /// How recovery treats damaged bytes.
    pub recovery_mode: RecoveryMode,
    /// Failpoints, for tests.
    pub faults: Option<Arc<FaultInjector>>,
    /// Every durable batch's bytes are added here too: the node's WAL volume, which the
    /// control plane's leader counts for snapshots taken on WAL volume.
    pub volume: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Every durable batch's bytes are handed here too, for a shipper to read the fresh tail
    /// from memory (see [`tail`]).
    pub tail: Option<Arc<WalTail>>,
    /// Released segments kept on disk to be reused as the next segments (renamed, not
    /// zero-filled); 0 deletes every released segment.
    pub reuse_segments_max: usize,
}

impl WalConfig {
    /// A configuration with default limits.
    pub fn new(dir: impl Into<PathBuf>, shard_id: u32) -> Self {
        Self {
            dir: dir.into(),
            shard_id,
            segment_bytes: limits::WAL_SEGMENT_BYTES_DEFAULT,
            batch_bytes_max: limits::WAL_BATCH_BYTES_MAX_DEFAULT,
            batch_records_max: limits::WAL_BATCH_RECORDS_MAX_DEFAULT,
            batch_linger: Duration::ZERO,
            record_payload_bytes_max: limits::WAL_RECORD_PAYLOAD_BYTES_MAX_DEFAULT,
            io_bytes_max: None,
            recovery_mode: RecoveryMode::default(),
            faults: None,
            volume: None,
            tail: None,
            reuse_segments_max: limits::WAL_REUSE_SEGMENTS_DEFAULT,
        }
    }

    /// Checks every field; the error names the field and the reason.
    pub fn validate(&self) -> Result<(), WalError> {
        let sector = SECTOR_BYTES as u64;
        let fail = |field: &'static str, reason: String| Err(WalError::Config { field, reason });
        if self.batch_bytes_max < SECTOR_BYTES || !self.batch_bytes_max.is_multiple_of(SECTOR_BYTES) {
            return fail(
                "batch_bytes_max",
                format!("{} is not a positive multiple of {SECTOR_BYTES}", self.batch_bytes_max),
            );
        }
        if self.batch_bytes_max > limits::WAL_BATCH_BYTES_MAX_LIMIT {
            return fail(
                "batch_bytes_max",
                format!("{} exceeds {}", self.batch_bytes_max, limits::WAL_BATCH_BYTES_MAX_LIMIT),
            );
        }
        if !self.segment_bytes.is_multiple_of(sector) || self.segment_bytes < sector + self.batch_bytes_max as u64 {
            return fail(
                "segment_bytes",
                format!(
                    "{} must be a multiple of {SECTOR_BYTES} and hold the header sector plus one batch ({} bytes)",
                    self.segment_bytes, self.batch_bytes_max
                ),
            );
        }
        if self.batch_records_max == 0 {
            return fail("batch_records_max", "must be at least 1".into());
        }
        if self.batch_linger > limits::WAL_BATCH_LINGER_MAX {
            return fail("batch_linger", format!("{:?} exceeds {:?}", self.batch_linger, limits::WAL_BATCH_LINGER_MAX));
        }
        let record_extent =
            format::align_up(format::BATCH_BEGIN_BYTES + wire::encoded_len(self.record_payload_bytes_max as usize));
        if self.record_payload_bytes_max == 0 || record_extent > self.batch_bytes_max {
            return fail(
                "record_payload_bytes_max",
                format!(
                    "{} must be positive and fit in one batch of {} bytes",
                    self.record_payload_bytes_max, self.batch_bytes_max
                ),
            );
        }
        if let Some(io) = self.io_bytes_max
            && (io < SECTOR_BYTES || io % SECTOR_BYTES != 0)
        {
            return fail("io_bytes_max", format!("{io} is not a positive multiple of {SECTOR_BYTES}"));
        }
        Ok(())
    }
}

/// Errors of the WAL. Cloneable: one batch's failure reaches every caller in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    /// A configuration field is invalid.
    #[error("invalid WAL configuration: {field}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The record is larger than the configured limit.
    #[error("WAL record payload of {len} bytes exceeds the limit of {max}")]
    RecordTooLarge {
        /// Payload length.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// An I/O operation failed outside the append path (open, recovery, reading).
    #[error("WAL I/O error: {op} {path}: {message}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// The OS error number, if any.
        errno: Option<i32>,
        /// The error text.
        message: String,
    },
    /// A write or barrier failed; the WAL acknowledges nothing more until it is reopened
    /// (recovery decides from the disk what is durable).
    #[error("WAL fenced: {op} failed: {message}; no further writes are acknowledged")]
    Fenced {
        /// The failed operation (`write`, `fdatasync`, `create segment`).
        op: &'static str,
        /// The OS error number, if any (`ENOSPC` for a full disk).
        errno: Option<i32>,
        /// The error text.
        message: String,
    },
    /// Recovery found damage it must not repair on its own.
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    /// The WAL was closed.
    #[error("WAL is closed")]
    Closed,
    /// A tail cut (`wal::truncate_from`) was refused; nothing was changed.
    #[error("cannot cut the WAL from LSN {lsn}: {reason}")]
    Truncate {
        /// Where the cut was asked.
        lsn: u64,
        /// Why not.
        reason: String,
    },
    /// The caller's admission check refused the record (`Wal::append_admitted`); nothing was
    /// reserved.
    #[error("record not admitted")]
    NotAdmitted,
    /// A batch of another WAL (`Wal::append_replicated`) was refused; nothing was written.
    #[error("replicated batch refused at LSN {expected_lsn}: {reason}")]
    ReplicatedBatch {
        /// The LSN this WAL appends at next.
        expected_lsn: u64,
        /// What is wrong with it.
        reason: String,
    },
}

impl WalError {
    pub(crate) fn io(op: &'static str, path: impl std::fmt::Display, error: &std::io::Error) -> Self {
        Self::Io { op, path: path.to_string(), errno: error.raw_os_error(), message: error.to_string() }
    }

    pub(crate) fn fenced(op: &'static str, errno: Option<i32>, message: impl Into<String>) -> Self {
        Self::Fenced { op, errno, message: message.into() }
    }

    /// Whether this error fenced the WAL.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Self::Fenced { .. })
    }
}
