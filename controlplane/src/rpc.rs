//! What members say to each other for Raft, beside the API (`controlapi::rpc`): both travel
//! in the same control frames on the same endpoint, told apart by their `kind`.

use controlapi::NodeId;
use controlapi::rpc::{Request, Response};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Deserializer, Serialize};

use crate::types::TypeConfig;

/// A Raft message from another member.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum RaftRequest {
    /// Replicate entries / heartbeat.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Ask for a vote.
    Vote(VoteRequest<NodeId>),
    /// One chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

/// The answer to a [`RaftRequest`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum RaftResponse {
    /// Append result.
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// Vote result.
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// Snapshot chunk result.
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
}

/// The `kind`s of the Raft messages (the API's are all others).
const RAFT_KINDS: [&str; 3] = ["append_entries", "vote", "install_snapshot"];

/// Reads a message's JSON text once to see its `kind`, then as Raft's or the API's (serde's
/// untagged enums cannot carry openraft's types through their buffering: its maps keyed by
/// node id need the JSON text itself).
fn by_kind<'de, D, R, A, T>(deserializer: D, raft: impl FnOnce(R) -> T, api: impl FnOnce(A) -> T) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    R: serde::de::DeserializeOwned,
    A: serde::de::DeserializeOwned,
{
    #[derive(Deserialize)]
    struct Kind {
        kind: String,
    }
    let text = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
    let kind: Kind = serde_json::from_str(text.get()).map_err(serde::de::Error::custom)?;
    let decoded = if RAFT_KINDS.contains(&kind.kind.as_str()) {
        serde_json::from_str(text.get()).map(raft)
    } else {
        serde_json::from_str(text.get()).map(api)
    };
    decoded.map_err(serde::de::Error::custom)
}

/// Whatever a member is asked: Raft by its peers, the API by anyone.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Incoming {
    /// From a peer, for Raft.
    Raft(RaftRequest),
    /// The API.
    Api(Request),
}

impl<'de> Deserialize<'de> for Incoming {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        by_kind(deserializer, Self::Raft, Self::Api)
    }
}

impl Incoming {
    /// Whether this is node-to-node traffic that a partition cuts.
    pub fn is_peer_traffic(&self) -> bool {
        matches!(self, Self::Raft(_) | Self::Api(Request::TimeSync))
    }
}

/// Whatever a member answers.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Outgoing {
    /// To a peer, for Raft.
    Raft(RaftResponse),
    /// The API's answer (an error to a Raft request too).
    Api(Response),
}

impl<'de> Deserialize<'de> for Outgoing {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        by_kind(deserializer, Self::Raft, Self::Api)
    }
}

impl Outgoing {
    /// An error answer.
    pub fn error(message: String) -> Self {
        Self::Api(Response::Error { message })
    }
}

#[cfg(test)]
mod tests {
    use controlapi::meta::Command;
    use controlapi::rpc::{decode, encode};

    use super::*;

    #[test]
    fn raft_and_api_messages_share_the_frames_and_are_told_apart() {
        let write = Request::Write(Command::SetConfig { key: "k".into(), value: "v".into() });
        let frame = encode(&write, 0).unwrap();
        assert!(matches!(decode::<Incoming>(&frame).unwrap(), Incoming::Api(Request::Write(_))));
        let vote = RaftRequest::Vote(VoteRequest::new(openraft::Vote::new(3, 1), None));
        let frame = encode(&Incoming::Raft(vote), 0).unwrap();
        assert!(matches!(decode::<Incoming>(&frame).unwrap(), Incoming::Raft(RaftRequest::Vote(_))));
        assert!(matches!(decode::<RaftRequest>(&frame).unwrap(), RaftRequest::Vote(_)), "the same bytes either way");
        let append = RaftRequest::AppendEntries(AppendEntriesRequest {
            vote: openraft::Vote::new_committed(3, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        });
        let frame = encode(&Incoming::Raft(append), 0).unwrap();
        assert!(matches!(decode::<Incoming>(&frame).unwrap(), Incoming::Raft(RaftRequest::AppendEntries(_))));
        let granted = RaftResponse::Vote(Ok(VoteResponse::new(openraft::Vote::new(3, 1), None, true)));
        let frame = encode(&Outgoing::Raft(granted), 1).unwrap();
        assert!(matches!(decode::<Outgoing>(&frame).unwrap(), Outgoing::Raft(RaftResponse::Vote(Ok(_)))));
        let frame = encode(&Outgoing::error("no".into()), 1).unwrap();
        assert!(matches!(decode::<Outgoing>(&frame).unwrap(), Outgoing::Api(Response::Error { .. })));
        assert!(decode::<Incoming>(&encode(&"nonsense", 0).unwrap()).is_err());
    }
}
