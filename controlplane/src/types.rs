//! The Raft type configuration: what a log entry carries and what applying it returns.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use controlapi::meta::{Command, Outcome};

pub use controlapi::NodeId;

/// What the Raft group knows of a control-plane node: where its QUIC endpoint listens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlNode {
    /// `host:port` of the node's QUIC endpoint.
    pub addr: String,
}

impl fmt::Display for ControlNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// A proposal as it sits in the log: the commands the leader batched into one entry, in
/// order, and its wall time when it proposed them (unix ms), so that applying them is
/// deterministic on every replica. One entry per batch means one log sync per batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Leader's wall-clock time at proposal, unix milliseconds.
    pub at_ms: u64,
    /// What to change, applied in order.
    pub commands: Vec<Command>,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} commands @{}", self.commands.len(), self.at_ms)
    }
}

/// What applying an entry gave: one outcome per command of its proposal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes(pub Vec<Outcome>);

openraft::declare_raft_types!(
    /// Meridian's Raft types.
    pub TypeConfig:
        D = Proposal,
        R = Outcomes,
        NodeId = NodeId,
        Node = ControlNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft handle of a control-plane node.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// Storage errors as openraft wants them.
pub type StorageError = openraft::StorageError<NodeId>;
/// The membership as stored.
pub type StoredMembership = openraft::StoredMembership<NodeId, ControlNode>;
