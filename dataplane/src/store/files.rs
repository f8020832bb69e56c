//! A shard's files as replication reads them, read-only and from any thread: the WAL (through
//! a [`WalReader`] that reads the newest batches from memory first), chunked values put back
//! together, and the newest checkpoint. The store owns these files; nothing here writes them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use super::checkpoint::{self, CheckpointError, CheckpointInfo};
use super::chunks::{self, ChunkError};
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
    /// A checkpoint is damaged or is not the one named.
    #[error("{path}: {error}")]
    Checkpoint {
        /// Which.
        path: PathBuf,
        /// What is wrong.
        error: CheckpointError,
    },
}

/// The files of one shard.
#[derive(Debug, Clone)]
pub struct ShardFiles {
    dir: PathBuf,
    shard_id: u32,
    record_payload_bytes_max: u32,
    tail: Option<Arc<WalTail>>,
}

impl ShardFiles {
    /// Shard `shard_id`'s files under `dir`, its WAL records of up to `record_payload_bytes_max`
    /// bytes, its newest durable batches in `tail` when it keeps them in memory.
    pub fn new(
        dir: impl Into<PathBuf>,
        shard_id: u32,
        record_payload_bytes_max: u32,
        tail: Option<Arc<WalTail>>,
    ) -> Self {
        Self { dir: dir.into(), shard_id, record_payload_bytes_max, tail }
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

    /// The newest checkpoint: its LSN and path.
    pub fn newest_checkpoint(&self) -> Result<Option<(u64, PathBuf)>, FileError> {
        super::shard::newest_checkpoint(&self.dir, self.shard_id)
            .map_err(|error| FileError::Io { path: self.dir.clone(), error })
    }

    /// Reads the checkpoint at `path`, which must be this shard's at `lsn`, calling `each` with
    /// every version as it is decoded (zero-copy from a memory map; a newer checkpoint deleting
    /// this one turns what is left to zeros, which fail their checksums).
    pub fn read_checkpoint(
        &self,
        path: &Path,
        lsn: u64,
        each: impl FnMut(Op, u64),
    ) -> Result<CheckpointInfo, FileError> {
        let bytes: Bytes =
            super::shard::map_checkpoint(path).map_err(|error| FileError::Io { path: path.to_path_buf(), error })?;
        let info = checkpoint::decode(&bytes, self.record_payload_bytes_max, each)
            .map_err(|error| FileError::Checkpoint { path: path.to_path_buf(), error })?;
        if info.shard_id != self.shard_id || info.lsn != lsn {
            let error = CheckpointError::Structure(format!("holds shard {} at LSN {}", info.shard_id, info.lsn));
            return Err(FileError::Checkpoint { path: path.to_path_buf(), error });
        }
        Ok(info)
    }
}
