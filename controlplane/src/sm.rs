//! openraft's state machine over [`MetaState`], with snapshots in one file.
//!
//! The snapshot file is one `wire` record (type [`RecordType::Checkpoint`], CRC32C) holding
//! the snapshot's meta and the metadata in JSON, written atomically (temp file, fsync,
//! rename, directory fsync). At start the state machine is the last snapshot; openraft
//! re-applies the log after it.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use wire::RecordType;

use crate::types::{ControlNode, Entry, LogId, NodeId, Outcomes, StorageError, StoredMembership, TypeConfig};
use controlapi::meta::MetaState;

/// The state machine's data, shared with the read path.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Applied {
    /// Last applied log id.
    pub last_applied: Option<LogId>,
    /// Last applied membership.
    pub membership: StoredMembership,
    /// The metadata.
    pub meta: MetaState,
}

/// What the snapshot file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// openraft's meta of the snapshot.
    pub meta: SnapshotMeta<NodeId, ControlNode>,
    /// The serialized [`MetaState`].
    pub data: Vec<u8>,
}

/// Why a snapshot file cannot be read.
#[derive(Debug, Error)]
pub enum SnapshotFileError {
    /// Not a valid record.
    #[error("bad snapshot record: {0}")]
    Record(#[from] wire::DecodeError),
    /// A record of another type, or bytes after it.
    #[error("snapshot file has {0}")]
    Shape(String),
    /// The payload does not parse.
    #[error("bad snapshot contents: {0}")]
    Json(#[from] serde_json::Error),
}

const SNAPSHOT_BYTES_MAX: u32 = 64 << 20;

/// Decodes a snapshot file.
pub fn decode_snapshot_file(bytes: &[u8]) -> Result<(SnapshotFile, MetaState), SnapshotFileError> {
    let (record, used) = wire::decode(bytes, SNAPSHOT_BYTES_MAX)?;
    if record.record_type != RecordType::Checkpoint {
        return Err(SnapshotFileError::Shape(format!("a {:?} record", record.record_type)));
    }
    if used != bytes.len() {
        return Err(SnapshotFileError::Shape(format!("{} bytes after its record", bytes.len() - used)));
    }
    let file: SnapshotFile = serde_json::from_slice(record.payload)?;
    let meta: MetaState = serde_json::from_slice(&file.data)?;
    Ok((file, meta))
}

fn encode_snapshot_file(file: &SnapshotFile) -> io::Result<Vec<u8>> {
    controlapi::rpc::json_record(RecordType::Checkpoint, 0, file).map_err(io::Error::other)
}

fn io_error(verb: ErrorVerb, error: impl std::fmt::Display) -> StorageError {
    StorageError::from_io_error(ErrorSubject::StateMachine, verb, io::Error::other(error.to_string()))
}

/// openraft's state machine.
#[derive(Debug, Clone)]
pub struct StateMachine {
    applied: Arc<RwLock<Applied>>,
    current: Arc<RwLock<Option<SnapshotFile>>>,
    path: PathBuf,
    snapshots_built: u64,
}

impl StateMachine {
    /// Opens the state machine in `dir`: the last snapshot, or empty.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("snapshot.bin");
        let (applied, current) = match std::fs::read(&path) {
            Ok(bytes) => {
                let (file, meta) =
                    decode_snapshot_file(&bytes).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
                let applied = Applied {
                    last_applied: file.meta.last_log_id,
                    membership: file.meta.last_membership.clone(),
                    meta,
                };
                (applied, Some(file))
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => (Applied::default(), None),
            Err(error) => return Err(anyhow::anyhow!("reading {}: {error}", path.display())),
        };
        Ok(Self {
            applied: Arc::new(RwLock::new(applied)),
            current: Arc::new(RwLock::new(current)),
            path,
            snapshots_built: 0,
        })
    }

    /// The applied data, for reads.
    pub fn applied(&self) -> Arc<RwLock<Applied>> {
        self.applied.clone()
    }

    async fn persist(&self, file: SnapshotFile) -> Result<(), StorageError> {
        let bytes = encode_snapshot_file(&file).map_err(|e| io_error(ErrorVerb::Write, e))?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || crate::raftlog::write_atomically(&path, &bytes))
            .await
            .map_err(|e| io_error(ErrorVerb::Write, e))?
            .map_err(|e| io_error(ErrorVerb::Write, e))?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(file);
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_applied, membership) = {
            let applied = self.applied.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let data = serde_json::to_vec(&applied.meta).map_err(|e| io_error(ErrorVerb::Read, e))?;
            (data, applied.last_applied, applied.membership.clone())
        };
        self.snapshots_built += 1;
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, self.snapshots_built),
            None => format!("empty-{}", self.snapshots_built),
        };
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id };
        self.persist(SnapshotFile { meta: meta.clone(), data: data.clone() }).await?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied = self.applied.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcomes>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut applied = self.applied.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut outcomes = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => Outcomes::default(),
                EntryPayload::Normal(proposal) => Outcomes(
                    proposal.commands.iter().map(|command| applied.meta.apply(proposal.at_ms, command)).collect(),
                ),
                EntryPayload::Membership(membership) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Outcomes::default()
                }
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, ControlNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state: MetaState = serde_json::from_slice(&data).map_err(|e| io_error(ErrorVerb::Read, e))?;
        self.persist(SnapshotFile { meta: meta.clone(), data }).await?;
        let mut applied = self.applied.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *applied = Applied { last_applied: meta.last_log_id, membership: meta.last_membership.clone(), meta: state };
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(current
            .as_ref()
            .map(|file| Snapshot { meta: file.meta.clone(), snapshot: Box::new(Cursor::new(file.data.clone())) }))
    }
}
