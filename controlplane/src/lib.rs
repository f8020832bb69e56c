//! The control plane's server: Raft-replicated cluster metadata, the GLTS time-interval
//! service among members, membership, leases and the global-snapshot coordinator. What other
//! processes use of it (the metadata types, the API, the client, the agent, the pure GLTS) is
//! in `controlapi`, which links no openraft.
//!
//! - Pure cores: [`raftlog::replay`], [`node::election_due`], [`snapshots::snapshot_glt`].
//! - Shells: [`raftlog`] (the log file on tokio-uring, blocking fallback), [`sm`] (snapshots),
//!   [`network`] (openraft over QUIC), [`rpc`] (Raft messages beside the API's), [`node`] (the
//!   server), [`snapshots`] (asking data nodes when a snapshot is readable).

pub mod config;
pub mod network;
pub mod node;
pub mod raftlog;
pub mod rpc;
pub mod sm;
pub mod snapshots;
pub mod types;
