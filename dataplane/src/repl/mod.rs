//! Inter-region replication: each home shard's WAL is shipped to every replica region over
//! QUIC (mutual TLS), compressed, with the shard's closed timestamp; replica shards make the
//! records durable in their own WAL, apply them and acknowledge.
//!
//! - `core`: the stream protocol, sans-IO (window, acks, gaps, closed timestamps).
//! - `codec`: LZ4 / Snappy / none for batch bodies.
//! - `status`: resolved timestamps per source region (minimum closed timestamp over shards).
//! - `position`: the replica's durable resume position per (source region, shard).
//! - `shell`: the tokio + quinn thread: shippers, the receiving endpoint, the hand-off to the
//!   glommio shards ([`ShardSide`] on the shard, [`ThreadSide`] on the replication thread).
//!
//! Frames are defined in `wire::repl`.

pub mod codec;
pub mod core;
pub mod position;
pub mod shell;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use wire::repl::Codec;

use crate::store::ClosedPoint;
pub use core::Window;
pub use shell::Replication;
pub use status::Resolved;

/// One peer region and where its node's replication endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The region.
    pub region: String,
    /// Its node's QUIC address.
    pub addr: SocketAddr,
}

/// `[replication]`, resolved.
#[derive(Debug, Clone)]
pub struct ReplConfig {
    /// This node's region.
    pub region: String,
    /// The home region of every shard (where writes are taken).
    pub home: String,
    /// UDP address of the replication endpoint.
    pub listen: SocketAddr,
    /// Directory with `ca.pem`, `<name>.pem`, `<name>.key`.
    pub tls_dir: PathBuf,
    /// The certificate name of this node.
    pub name: String,
    /// The other regions.
    pub peers: Vec<Peer>,
    /// Batch body compression.
    pub codec: Codec,
    /// Largest batch (raw entry bytes) before it is sent.
    pub batch_bytes_max: usize,
    /// Unacknowledged batches per stream.
    pub window: Window,
    /// How often a home shard publishes its closed timestamp, and how long a stream may stay
    /// quiet before an empty batch carries a newer one.
    pub closed_interval: Duration,
    /// QUIC flow-control window per stream and connection (the bandwidth-delay product).
    pub quic_window_bytes: u64,
}

impl ReplConfig {
    /// Whether this node takes the writes (ships) or holds replicas (receives).
    pub fn is_home(&self) -> bool {
        self.region == self.home
    }
}

/// A shipped record handed to the replica shard that owns it.
#[derive(Debug)]
pub struct Apply {
    /// The record's timestamp at its home.
    pub glt: u64,
    /// The WAL payload (store operations, values inline).
    pub payload: Bytes,
    /// Resolved once durable and applied here.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// What a shard keeps: where it publishes its closed point (home) and where shipped records
/// arrive (replica).
#[derive(Debug)]
pub struct ShardSide {
    /// The closed point, published every `closed_interval`.
    pub points: watch::Sender<ClosedPoint>,
    /// Records to apply.
    pub applies: mpsc::Receiver<Apply>,
    /// The WAL hold (lowest LSN a peer still needs).
    pub hold: Arc<AtomicU64>,
}

/// What the replication thread keeps of each shard.
#[derive(Debug, Clone)]
pub struct ThreadSide {
    /// The shard.
    pub shard: u32,
    /// Its closed point.
    pub points: watch::Receiver<ClosedPoint>,
    /// Where to hand records to apply.
    pub applies: mpsc::Sender<Apply>,
    /// Its WAL hold.
    pub hold: Arc<AtomicU64>,
    /// The shard's directory (`wal/`, `chunks/`, resume positions).
    pub dir: PathBuf,
    /// WAL record payload limit (for the reader).
    pub record_payload_bytes_max: u32,
}

/// The two sides of one shard's link.
pub fn shard_link(shard: u32, dir: PathBuf, record_payload_bytes_max: u32) -> (ShardSide, ThreadSide) {
    let (points_tx, points_rx) = watch::channel(ClosedPoint::default());
    let (applies_tx, applies_rx) = mpsc::channel(4096);
    let hold = Arc::new(AtomicU64::new(u64::MAX));
    (
        ShardSide { points: points_tx, applies: applies_rx, hold: hold.clone() },
        ThreadSide { shard, points: points_rx, applies: applies_tx, hold, dir, record_payload_bytes_max },
    )
}
