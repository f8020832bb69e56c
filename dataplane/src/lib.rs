//! The Meridian data plane: one process per data machine, one glommio executor ("shard") per
//! core. Per shard it owns the durable write-ahead log ([`wal`]), the versioned store and its
//! chunk server ([`store`]), the client endpoint ([`server`]) and its end of replication
//! ([`repl`]); the node ([`node`]) starts them on the thread-per-core runtime ([`runtime`]),
//! joined to the control plane ([`control`]).
//!
//! Each subsystem shows a curated surface (`pub use` in its `mod.rs`); its shells and helpers
//! are private. It must never link openraft or the control plane's server (it talks to it
//! through `controlapi`).
//!
//! **Architecture Invariant:** the pure cores (`wal::format`, `wal::recovery`, `repl::core`)
//! do no I/O, read no clock and import no runtime (`tests/architecture.rs`).
//!
//! **Architecture Invariant:** no append is acknowledged before its bytes and an `fdatasync`
//! barrier completed; a failed write or barrier fences the WAL for good.
#![cfg_attr(test, allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_lossless))]

pub mod config;
pub mod control;
pub(crate) mod files;
pub mod limits;
pub mod node;
mod readiness;
pub mod repl;
pub mod replica;
pub mod runtime;
pub mod server;
pub mod store;
pub(crate) mod sync;
pub mod wal;

pub use wire::shard_for;
