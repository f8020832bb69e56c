//! The control plane as the rest of Meridian sees it, without Raft: the metadata
//! ([`meta`]: the state machine and its types, pure), the API ([`rpc`]: requests, responses,
//! frames; [`net`]: calls over QUIC), the client that finds the leader and retries what is
//! safe ([`client`]), the GLTS interval clock ([`glts`], pure; [`glts_client`],
//! [`timesource`]) and the agent a data node runs ([`agent`]: registration, heartbeats,
//! leases, the GLTS client).
//!
//! The data node and the CLI depend on this crate, never on `controlplane` (which links
//! openraft): `dataplane/tests/architecture.rs` checks it.

pub mod agent;
pub mod client;
pub mod glts;
pub mod glts_client;
pub mod meta;
pub mod net;
pub mod replica;
pub mod rpc;
pub mod timesource;

pub use rpc::NodeId;
