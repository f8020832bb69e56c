//! openraft's network over the QUIC [`Connector`]: each Raft RPC is one control call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

use controlapi::net::CallError;
use controlapi::rpc::Response;
use platform::quic::Connector;

use crate::rpc::{Outgoing, RaftRequest, RaftResponse};
use crate::types::{ControlNode, NodeId, TypeConfig};

/// Makes a [`PeerNetwork`] per target.
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    /// The shared connector.
    pub connector: Connector,
    /// Fault injection: while set, nothing is sent to peers.
    pub isolated: Arc<AtomicBool>,
    /// Set when a voter refused our vote because its log is ahead of ours: the election
    /// timer then waits longer, so that a node with the longer log wins (as openraft's own
    /// timer does with its `smaller_log_timeout`).
    pub greater_log_seen: Arc<AtomicBool>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &ControlNode) -> Self::Network {
        PeerNetwork {
            connector: self.connector.clone(),
            target,
            addr: node.addr.clone(),
            isolated: self.isolated.clone(),
            greater_log_seen: self.greater_log_seen.clone(),
        }
    }
}

/// Calls to one peer.
#[derive(Debug)]
pub struct PeerNetwork {
    connector: Connector,
    target: NodeId,
    addr: String,
    isolated: Arc<AtomicBool>,
    greater_log_seen: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unexpected(String);

impl PeerNetwork {
    async fn call<E>(
        &self,
        request: RaftRequest,
        option: &RPCOption,
    ) -> Result<RaftResponse, RPCError<NodeId, ControlNode, E>>
    where
        E: std::error::Error,
    {
        if self.isolated.load(Ordering::Relaxed) {
            return Err(RPCError::Unreachable(Unreachable::new(&Unexpected("isolated by fault injection".into()))));
        }
        match controlapi::net::call(&self.connector, &self.addr, &request, option.hard_ttl()).await {
            Ok(Outgoing::Raft(response)) => Ok(response),
            Ok(Outgoing::Api(Response::Error { message })) => {
                Err(RPCError::Network(NetworkError::new(&Unexpected(message))))
            }
            Ok(Outgoing::Api(other)) => Err(self.unexpected(&other)),
            Err(error @ CallError::Connect(_)) => Err(RPCError::Unreachable(Unreachable::new(&error))),
            Err(error) => Err(RPCError::Network(NetworkError::new(&error))),
        }
    }

    fn unexpected<E: std::error::Error>(&self, response: &dyn std::fmt::Debug) -> RPCError<NodeId, ControlNode, E> {
        RPCError::Network(NetworkError::new(&Unexpected(format!(
            "unexpected response from {}: {response:?}",
            self.addr
        ))))
    }

    fn remote<E: std::error::Error>(&self, error: E) -> RPCError<NodeId, ControlNode, E> {
        RPCError::RemoteError(RemoteError::new(self.target, error))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, ControlNode, RaftError<NodeId>>> {
        match self.call(RaftRequest::AppendEntries(rpc), &option).await? {
            RaftResponse::AppendEntries(result) => result.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, ControlNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        match self.call(RaftRequest::InstallSnapshot(rpc), &option).await? {
            RaftResponse::InstallSnapshot(result) => result.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, ControlNode, RaftError<NodeId>>> {
        let ours = rpc.last_log_id;
        match self.call(RaftRequest::Vote(rpc), &option).await? {
            RaftResponse::Vote(result) => {
                if let Ok(response) = &result
                    && !response.vote_granted
                    && response.last_log_id > ours
                {
                    self.greater_log_seen.store(true, Ordering::Relaxed);
                }
                result.map_err(|e| self.remote(e))
            }
            other => Err(self.unexpected(&other)),
        }
    }
}
