//! A shard's files as replication reads them, read-only and from any thread: the WAL (through
//! a [`WalReader`] that reads the newest batches from memory first), chunked values put back
//! together, and the engine's versions for a snapshot. The store owns these files; nothing
//! here writes them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use super::chunks::{self, ChunkError};
use super::engine::{DiskVersions, EngineError};
use super::op::{ChunkList, Op};
use crate::wal::{WalReader, WalTail};

/// Why a shard's file could not be read.
#[derive(Debug, Error)]
pub enum FileError {
    /// A file or directory failed.
    #[error("{path}: {error}")]
    Io {
        /// Which.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// A chunk file is damaged.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// The engine failed while its versions were read for a snapshot.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// This handle has no engine to read (built without one).
    #[error("shard {0}: no engine to read a snapshot from")]
    NoEngine(u32),
}

/// The files of one shard.
#[derive(Debug, Clone)]
pub struct ShardFiles {
    dir: PathBuf,
    shard_id: u32,
    record_payload_bytes_max: u32,
    tail: Option<Arc<WalTail>>,
    engine: EngineSlot,
}

/// Where the shard puts its engine once it opened it (the files are made before the shard
/// opens its store).
pub type EngineSlot = Arc<std::sync::OnceLock<Arc<DiskVersions>>>;

impl ShardFiles {
    /// Shard `shard_id`'s files under `dir`, its WAL records of up to `record_payload_bytes_max`
    /// bytes, its newest durable batches in `tail` when it keeps them in memory, its engine
    /// (the store's, [`super::ShardStore::engine`], once the shard opened it) for snapshots.
    pub fn new(
        dir: impl Into<PathBuf>,
        shard_id: u32,
        record_payload_bytes_max: u32,
        tail: Option<Arc<WalTail>>,
        engine: EngineSlot,
    ) -> Self {
        Self { dir: dir.into(), shard_id, record_payload_bytes_max, tail, engine }
    }

    /// The shard.
    pub fn shard_id(&self) -> u32 {
        self.shard_id
    }

    /// The shard's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A reader of the shard's WAL (the tail first, then the segments).
    pub fn wal(&self) -> WalReader {
        let reader = WalReader::new(self.dir.join("wal"), self.shard_id, self.record_payload_bytes_max);
        match &self.tail {
            Some(tail) => reader.with_tail(tail.clone()),
            None => reader,
        }
    }

    /// A chunked value read back from its chunk files, every block checked; `None` when a
    /// chunk is gone (its version expired and was collected).
    pub fn read_chunked(&self, list: &ChunkList) -> Result<Option<Vec<u8>>, FileError> {
        let mut value = Vec::with_capacity(usize::try_from(list.size).unwrap_or(0));
        for chunk in &list.chunks {
            let path = self.dir.join("chunks").join(chunks::file_name(&chunk.hash));
            match std::fs::read(&path) {
                Ok(file) => value.extend_from_slice(chunks::verified_data(chunk, &file)?),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(error) => return Err(FileError::Io { path, error }),
            }
        }
        Ok(Some(value))
    }

    /// Where a snapshot of the engine resumes the WAL: the LSN its last flush recorded (every
    /// record below it is in the engine). `None` before the first flush (the WAL then holds
    /// everything) or without an engine.
    pub fn snapshot_lsn(&self) -> Result<Option<u64>, FileError> {
        let Some(engine) = self.engine.get() else { return Ok(None) };
        let lsn = engine.replay_from();
        Ok((lsn > 1).then_some(lsn))
    }

    /// Reads every version the engine holds, in key order, calling `each` with it until it
    /// returns `false`; returns the retention horizon the view was compacted with (versions
    /// below it a read there would have seen may be gone). One consistent view of the engine,
    /// taken after the caller read [`Self::snapshot_lsn`]: it holds every record below that
    /// LSN, and maybe later ones (applying those again is harmless).
    pub fn read_snapshot(&self, mut each: impl FnMut(Op, u64) -> bool) -> Result<u64, FileError> {
        let engine = self.engine.get().ok_or(FileError::NoEngine(self.shard_id))?;
        let mut horizon = None;
        engine.scan(None, |key, version| {
            // Read once the view is taken: every compaction it saw applied at most this.
            horizon.get_or_insert_with(|| engine.retention().horizon());
            each(Op { key: Bytes::from(key), body: version.body }, version.ts)
        })?;
        Ok(horizon.unwrap_or_else(|| engine.retention().horizon()))
    }
}
