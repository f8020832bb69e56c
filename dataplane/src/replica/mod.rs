//! Replica sets inside a region: every shard on several data nodes, one primary sending its
//! WAL batches to the others and acknowledging a write once it is durable on every member.
//! The control plane's side (sets, epochs, promotion) is `controlapi::replica`.
//!
//! - `core`: one node's copy of a shard, sans-IO ([`Member`]); the simulation test
//!   (`tests/replica_simulation.rs`) drives it under crashes, partitions and a misbehaving
//!   network by seed.

mod core;

pub use self::core::{Action, DiskOp, Member, Message, Proposal, Timing, WriteError};
