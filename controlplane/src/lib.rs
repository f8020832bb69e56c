//! The control plane: Raft-replicated cluster metadata, the GLTS time-interval service,
//! membership and leases.
//!
//! - Pure cores (no I/O, no clock read): [`glts`] (interval estimator, Marzullo
//!   intersection, interval clock), [`meta`] (the metadata state machine), [`raftlog::replay`],
//!   [`rpc`] frames, [`node::election_due`].
//! - Shells: [`raftlog`] (the log file on tokio-uring, blocking fallback), [`sm`] (snapshots),
//!   [`net`] (QUIC with mutual TLS, [`tls`]), [`network`] (openraft over QUIC), [`node`] (the
//!   server), [`client`], [`glts_client`] and [`agent`] (what CLIs and data nodes use).

pub mod agent;
pub mod client;
pub mod config;
pub mod glts;
pub mod glts_client;
pub mod local;
pub mod meta;
pub mod net;
pub mod network;
pub mod node;
pub mod ops;
pub mod raftlog;
pub mod rpc;
pub mod sm;
pub mod snapshots;
pub mod timesource;
pub mod tls;
pub mod types;
