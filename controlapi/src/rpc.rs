//! The control plane's API: what data nodes, the CLI and members ask a control-plane node
//! ([`Request`], [`Response`]), and the frames every control message travels in.
//!
//! One request and one response per QUIC bidirectional stream. Each is one `wire` record of
//! type [`RecordType::Control`] (CRC32C over header and payload) whose payload is the message
//! in JSON. Metadata traffic is small and infrequent next to the data path, so JSON's cost
//! buys readable captures and serde support for every message type. The Raft messages members
//! exchange travel in the same frames but are the control plane's own (`controlplane::rpc`).
//!
//! [`decode`] returns a typed [`FrameError`] for any bytes (fuzz target `control_frame`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use wire::{DecodeError, RecordType};

use crate::glts::Interval;
use crate::meta::{Command, MetaState, Outcome};

/// A control-plane node id (a voter or learner of the Raft group).
pub type NodeId = u64;

/// The largest control frame: a snapshot chunk (openraft's default 3 MiB) plus headroom.
pub const FRAME_BYTES_MAX: u32 = 8 << 20;

/// What a client, a data node or another member asks a control-plane node (the Raft
/// messages aside).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum Request {
    /// GLTS: the four-timestamp exchange; the reply carries the node's interval.
    TimeSync,
    /// Propose a metadata change (leader only).
    Write(Command),
    /// Read the metadata; `linearizable` confirms leadership with a quorum first.
    Read {
        /// Confirm leadership and wait for the read index to apply before answering.
        linearizable: bool,
    },
    /// Cluster status as this node sees it.
    Status,
    /// A data node's heartbeat (leader only).
    Heartbeat {
        /// Data node id.
        id: String,
        /// Bytes its WAL has written since it started (the leader counts the growth for
        /// snapshots on WAL volume).
        #[serde(default)]
        wal_bytes: u64,
        /// The shard copies it keeps in replica sets (none: answered `Ok`; else `Sets`).
        #[serde(default)]
        replicas: Vec<crate::replica::ReplicaReport>,
    },
    /// Add a control-plane voter (leader only): learner first, then joint consensus.
    AddVoter {
        /// The new node's id.
        id: NodeId,
        /// Its QUIC address.
        addr: String,
    },
    /// Remove a control-plane voter through joint consensus (leader only).
    RemoveVoter {
        /// The node's id.
        id: NodeId,
    },
    /// Take a global snapshot (leader only): its timestamp is the leader's GLTS latest bound
    /// plus `lead_us`; the leader then tracks when each region can read it.
    CreateSnapshot {
        /// Added to the timestamp, for regions too far apart to resolve `latest` soon.
        #[serde(default)]
        lead_us: u64,
    },
    /// Fault injection (only with `fault_injection = true`): drop all Raft and GLTS traffic to
    /// and from peers while `isolated`, as a network partition would.
    Isolate {
        /// Whether to isolate.
        isolated: bool,
    },
}

/// A member of the Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Node id.
    pub id: NodeId,
    /// QUIC address.
    pub addr: String,
    /// Voter (true) or learner.
    pub voter: bool,
}

/// A member's Raft role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// It leads: writes go through it.
    Leader,
    /// It follows a leader.
    Follower,
    /// It stands for election.
    Candidate,
    /// It replicates the log without a vote.
    Learner,
    /// It is stopping.
    Shutdown,
}

impl Role {
    /// The role's name, as `meridian cluster status` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Leader => "leader",
            Self::Follower => "follower",
            Self::Candidate => "candidate",
            Self::Learner => "learner",
            Self::Shutdown => "shutdown",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The node's view of the cluster, for `meridian cluster status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The answering node.
    pub node_id: NodeId,
    /// Its Raft role.
    pub role: Role,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Last log index.
    pub last_log_index: Option<u64>,
    /// Last applied index.
    pub applied_index: Option<u64>,
    /// Members of the group.
    pub members: Vec<Member>,
    /// The metadata as applied here.
    pub meta: MetaState,
    /// This node's GLTS interval width, µs (None when its sources disagree).
    pub glts_width_us: Option<f64>,
    /// Where its local time bound comes from.
    pub glts_local_source: String,
    /// Whether fault injection has isolated it.
    pub isolated: bool,
}

/// A reply to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum Response {
    /// GLTS reply: the node's local interval when it replied, and how long it held the
    /// request on its monotonic clock.
    Time {
        /// Interval at reply time.
        interval: Interval,
        /// Receipt to reply, ns.
        hold_ns: u64,
    },
    /// A write committed and applied.
    Written {
        /// What applying it gave.
        outcome: Outcome,
        /// Its log index.
        index: u64,
    },
    /// The metadata.
    State {
        /// Metadata as applied.
        meta: MetaState,
        /// Applied index it reflects.
        applied_index: Option<u64>,
        /// Control-plane members.
        members: BTreeMap<NodeId, String>,
    },
    /// A global snapshot was recorded.
    Snapshot {
        /// Its id in the catalog.
        id: u64,
        /// The timestamp it reads at.
        glt: u64,
        /// Log index of the entry that created it.
        index: u64,
    },
    /// Status.
    Status(Box<Status>),
    /// Done, nothing to report.
    Ok,
    /// To a heartbeat that reported replica-set copies: the sets of the node's region it is
    /// placed in, and the lease a primary leading its set's epoch now holds (from the moment
    /// it sent the heartbeat).
    Sets {
        /// `(shard, set)`.
        sets: Vec<(u32, crate::replica::SetConfig)>,
        /// Lease length, ms.
        lease_ms: u64,
    },
    /// This node does not lead; ask the leader (when known).
    NotLeader {
        /// Leader id and address, when known.
        leader: Option<(NodeId, String)>,
    },
    /// Failed; the message says why.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Why bytes are not a control frame.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The record is not valid.
    #[error("bad control frame: {0}")]
    Record(#[from] DecodeError),
    /// A valid record of another type.
    #[error("expected a control record, found {0:?}")]
    WrongType(RecordType),
    /// Bytes after the record.
    #[error("{0} bytes after the control record")]
    Trailing(usize),
    /// The payload is not a message.
    #[error("bad control message: {0}")]
    Json(#[from] serde_json::Error),
    /// Too large to send.
    #[error("control message too large: {0}")]
    Encode(#[from] wire::EncodeError),
}

/// A `wire` record of `record_type` whose payload is `value` in JSON: the shape of every
/// control-plane frame and file (Raft log records, snapshot files).
pub fn json_record<T: Serialize>(record_type: RecordType, seq: u64, value: &T) -> Result<Vec<u8>, FrameError> {
    let payload = serde_json::to_vec(value)?;
    let mut bytes = vec![0; wire::encoded_len(payload.len())];
    wire::encode_into(&mut bytes, record_type, 0, seq, &payload)?;
    Ok(bytes)
}

/// Frames a message (`seq` 0 for a request, 1 for a response).
pub fn encode<T: Serialize>(message: &T, seq: u64) -> Result<Vec<u8>, FrameError> {
    json_record(RecordType::Control, seq, message)
}

/// Reads a message's frame.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, FrameError> {
    let (record, used) = wire::decode(bytes, FRAME_BYTES_MAX)?;
    if record.record_type != RecordType::Control {
        return Err(FrameError::WrongType(record.record_type));
    }
    if used != bytes.len() {
        return Err(FrameError::Trailing(bytes.len() - used));
    }
    Ok(serde_json::from_slice(record.payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_damage() -> Result<(), FrameError> {
        let request = Request::Write(Command::SetConfig { key: "k".into(), value: "v".into() });
        let frame = encode(&request, 0)?;
        assert!(matches!(decode::<Request>(&frame)?, Request::Write(Command::SetConfig { .. })));
        for at in 0..frame.len() {
            let mut damaged = frame.clone();
            damaged[at] ^= 0x40;
            assert!(decode::<Request>(&damaged).is_err(), "flip at {at} accepted");
        }
        assert!(matches!(decode::<Request>(&frame[..frame.len() - 1]), Err(FrameError::Record(_))));
        let mut long = frame.clone();
        long.push(0);
        assert!(matches!(decode::<Request>(&long), Err(FrameError::Trailing(1))));
        let response = encode(&Response::NotLeader { leader: Some((3, "127.0.0.1:9".into())) }, 1)?;
        assert!(matches!(decode::<Response>(&response)?, Response::NotLeader { leader: Some((3, _)) }));
        Ok(())
    }
}
