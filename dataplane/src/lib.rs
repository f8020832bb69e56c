//! The Meridian data plane: one process per data machine, one glommio executor ("shard") per
//! core. This crate owns, per shard, the durable write-ahead log ([`wal`]) and the
//! thread-per-core runtime that hosts shards and lets them message each other ([`runtime`]).
//!
//! **Architecture Invariant:** the pure cores (`wal::format`, `wal::recovery`) do no I/O and
//! never import glommio; glommio lives only in the shells (`wal::writer`, `runtime`).
//!
//! **Architecture Invariant:** no append is acknowledged before its bytes and an `fdatasync`
//! barrier completed; a failed write or barrier fences the WAL for good.
#![cfg_attr(test, allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_lossless))]

pub mod config;
pub mod control;
pub mod limits;
pub mod node;
pub mod readiness;
pub mod repl;
pub mod runtime;
pub mod server;
pub mod store;
pub(crate) mod sync;
pub mod wal;

pub use wire::shard_for;
