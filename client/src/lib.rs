//! `client` owns the client side of Meridian's protocol ([`wire::proto`]): a tokio [`Client`]
//! that learns the shard map from one seed node, routes every key with [`wire::shard_for`] to
//! the shard that owns it, and pipelines requests on one connection per shard. The `meridian`
//! command line is built on it.
//!
//! What it must never do: retry a write whose request may have reached the server (a `Put`,
//! `Delete` or `BatchPut` that lost its connection is reported, not repeated), hide a server's
//! error code, or silently cut a key that does not fit the wire format.
//!
//! ```text
//!  callers (any task) ──► Client ──route key──► Connection of shard i (opened lazily, shared)
//!    request(seq) ─► pending[seq] = oneshot ─► bounded queue ─► writer task ─► socket
//!    await oneshot ◄── reader task: header, payload, CRC, Response ◄───────────── socket
//! ```
//!
//! **Architecture Invariant:** a response completes the request whose `seq` it echoes, in any
//! order; a broken stream (EOF, I/O error, bad header or checksum) fails every request pending
//! on that connection with [`ClientError::ConnectionLost`] and the connection is replaced on
//! next use.

mod client;
mod connection;
mod error;

pub use client::{
    Client, ClientConfig, Entry, Listing, Readable, ReplicationStatus, SourceStatus, Stat, ValueChunks, Versioned,
};
pub use error::{ClientError, exit_code};

pub mod archive;
pub use wire::proto::ErrorCode;
