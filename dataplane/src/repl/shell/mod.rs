//! The replication thread: a tokio runtime with one QUIC endpoint (quinn, mutual TLS against
//! the cluster CA) that both ships and receives. It moves bytes and timers; what to send, what
//! to accept, what to acknowledge and what WAL to keep are the cores' answers (`super::core`).
//!
//! - `ship`: per (peer region, shard homed here) a task keeps one bidirectional stream to the
//!   peer and drives a [`Shipper`](super::core::Shipper): it reads the WAL records the core
//!   names (from the shard's [`ShardFiles`](crate::store::ShardFiles): the tail in memory, then
//!   the segments; chunked values put inline), compresses them and sends each frame as two
//!   `Bytes` (head, body); acks arrive on a task of their own. Any error closes the stream;
//!   the task redials and resumes from the receiver's durable position.
//! - `snapshot`: a peer whose position the WAL no longer holds is sent the newest checkpoint
//!   first, in `Install` parts read on a blocking thread.
//! - `receive`: each incoming stream is admitted ([`admit`](super::core::admit)), answered with
//!   the durable position and driven by a [`Receiver`](super::core::Receiver): its work goes to
//!   the owning shard as [`Apply`](super::Apply) requests, its acknowledgements go back in frame
//!   order once the shard made them durable.
//! - `observe`: lag and QUIC metrics; with multi-master keyspaces, the collection floors.
//! - `loopback`: what quinn alone carries on loopback with these settings (`bench geo`).

mod frames;
mod loopback;
mod observe;
mod receive;
mod ship;
mod snapshot;

use std::collections::HashMap;
use std::net::SocketAddr;

pub(crate) use crate::runtime::quic_endpoint as endpoint;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use platform::tls::Identity;
use tokio::sync::watch;

use super::core::{self, Position, ReceiveError, ShipError};
use super::status::Resolved;
use super::{ReplConfig, ThreadSide, position};
use crate::store::clock::Clock;
use crate::store::{FileError, StoreError};
use crate::wal::WalError;
pub use loopback::loopback_ceiling;

/// ALPN of the replication protocol.
pub const ALPN: &[u8] = b"meridian-repl/1";

/// Test failpoint: when set to N, every Nth non-empty batch leaves with one body byte flipped
/// (after its checksum was computed), as a damaged buffer would.
pub const CORRUPT_EVERY_ENV: &str = "MERIDIAN_FAILPOINT_REPL_CORRUPT_EVERY";

/// Why a replication stream ended (it is redialed, or the peer redials).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection or the stream failed.
    #[error("{what}: {source}")]
    Transport {
        /// What was being done.
        what: &'static str,
        /// quinn's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The peer closed the stream where a frame was due.
    #[error("the stream ended before {0}")]
    Ended(&'static str),
    /// Bytes that are not a frame, or a frame that does not fit.
    #[error("bad frame: {0}")]
    Frame(#[from] wire::repl::ReplError),
    /// A frame of a kind that does not belong here.
    #[error("expected {expected}, got {found}")]
    Unexpected {
        /// What could come.
        expected: &'static str,
        /// What came.
        found: &'static str,
    },
    /// The peer refused the stream.
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// The shipping core stopped the stream.
    #[error(transparent)]
    Ship(#[from] ShipError),
    /// The receiving core stopped the stream.
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    /// The shard's WAL could not be read where the stream needs it.
    #[error(
        "WAL of shard {shard} cannot be read at LSN {lsn}: {error} (if it was released meanwhile, the next stream \
         installs a snapshot)"
    )]
    Wal {
        /// The shard.
        shard: u32,
        /// Where.
        lsn: u64,
        /// Why.
        error: WalError,
    },
    /// A WAL record's payload is not store operations.
    #[error("shard {shard}: WAL record {lsn} does not decode: {error}")]
    Record {
        /// The shard.
        shard: u32,
        /// Its LSN.
        lsn: u64,
        /// Why.
        error: crate::store::op::OpError,
    },
    /// A shard's file (chunk, checkpoint) could not be read.
    #[error("shard {shard}: {error}")]
    File {
        /// The shard.
        shard: u32,
        /// The file and why.
        error: FileError,
    },
    /// A frame could not be encoded (too large).
    #[error("cannot encode a frame: {0}")]
    Encode(#[from] wire::EncodeError),
    /// What was read does not fit a frame.
    #[error("shard {shard}: {what} of {bytes} bytes exceeds a frame")]
    TooLarge {
        /// The shard.
        shard: u32,
        /// What.
        what: &'static str,
        /// Its size.
        bytes: usize,
    },
    /// The replica shard failed to apply shipped records.
    #[error("apply on shard {shard}: {error}")]
    Apply {
        /// The shard.
        shard: u32,
        /// Why.
        error: StoreError,
    },
    /// The shard's executor is gone (the node is stopping).
    #[error("shard {0} stopped")]
    ShardStopped(u32),
    /// A stream of a shard this node keeps no position for (a bug: admission let it in).
    #[error("no replication position for shard {shard} from {region}")]
    NoPosition {
        /// The shard.
        shard: u32,
        /// The source region.
        region: String,
    },
}

/// Maps a transport error of `what` into a [`StreamError`].
fn transport<E: std::error::Error + Send + Sync + 'static>(what: &'static str) -> impl FnOnce(E) -> StreamError {
    move |error| StreamError::Transport { what, source: Box::new(error) }
}

/// The running replication thread.
#[derive(Debug)]
pub struct Replication {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    resolved: Arc<Resolved>,
    addr: SocketAddr,
}

struct Context {
    config: ReplConfig,
    shards: Vec<ThreadSide>,
    resolved: Arc<Resolved>,
    stop: watch::Receiver<bool>,
    /// Per (source region, shard homed there), the replica's resume position.
    positions: HashMap<(String, u32), Arc<PositionFile>>,
    /// Failpoint for tests: flip a byte in the body of every Nth batch sent
    /// ([`CORRUPT_EVERY_ENV`]).
    corrupt_every: Option<u64>,
    batches_sent: std::sync::atomic::AtomicU64,
    /// The clock lag is measured against (the store's: GLTS when the node has a control plane).
    clock: Arc<dyn Clock>,
    /// The latest QUIC connection to (`out`, shipping) and from (`in`, receiving) each peer
    /// region, for its statistics.
    connections: Mutex<HashMap<(String, &'static str), quinn::Connection>>,
    /// The cores' `now`: ns since the thread started.
    epoch: Instant,
}

impl Context {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The shard `shard`'s side, when this node has it.
    fn side(&self, shard: u32) -> Option<&ThreadSide> {
        self.shards.iter().find(|side| side.shard == shard)
    }

    /// The latest physical time (µs) a shipped stamp may have now: [`core::AHEAD_US_MAX`] past
    /// this node's clock; `None` while the clock cannot say.
    fn ahead_limit(&self) -> Option<u64> {
        self.clock.interval().ok().map(|interval| interval.latest_us().saturating_add(core::AHEAD_US_MAX))
    }
}

impl Replication {
    /// Binds the endpoint, ships the shards homed here and receives the others.
    pub fn start(config: ReplConfig, shards: Vec<ThreadSide>, clock: Arc<dyn Clock>) -> Result<Self, String> {
        let identity = Identity::in_dir(&config.tls_dir, &config.name);
        identity.require_files("replication.tls_dir", &config.tls_dir, &config.name)?;
        let server = identity
            .server_config_for(ALPN, transport_config(config.quic_window_bytes))
            .map_err(|error| format!("replication TLS: {error:#}"))?;
        let client = identity
            .client_config_for(ALPN, transport_config(config.quic_window_bytes))
            .map_err(|error| format!("replication TLS: {error:#}"))?;
        if config.homes.len() != shards.len() {
            return Err(format!("replication: {} shards but {} home regions", shards.len(), config.homes.len()));
        }
        let sources: Vec<Vec<&str>> = shards.iter().map(|side| config.sources_of(side.shard)).collect();
        let local: Vec<bool> = shards.iter().map(|side| config.ships_shard(side.shard)).collect();
        let resolved = Arc::new(Resolved::with_sources(&config.region, &sources, &local));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut positions = HashMap::new();
        for (side, sources) in shards.iter().zip(&sources) {
            for source in sources {
                let lsn = position::load(side.files.dir(), source)?;
                let file = PositionFile::new(side.files.dir(), lsn);
                positions.insert(((*source).to_owned(), side.shard), Arc::new(file));
            }
        }
        drop(sources);
        let context = Arc::new(Context {
            config,
            shards,
            resolved: resolved.clone(),
            stop: stop_rx,
            positions,
            corrupt_every: std::env::var(CORRUPT_EVERY_ENV).ok().and_then(|n| n.parse().ok()).filter(|n| *n > 0),
            batches_sent: std::sync::atomic::AtomicU64::new(0),
            clock,
            connections: Mutex::default(),
            epoch: Instant::now(),
        });
        let (thread, addr) =
            crate::runtime::spawn_tokio_thread("replication", move |ready| run(context, server, client, ready))?;
        Ok(Self { stop: stop_tx, thread: Some(thread), resolved, addr })
    }

    /// The resolved timestamps per source region.
    pub fn resolved(&self) -> Arc<Resolved> {
        self.resolved.clone()
    }

    /// The endpoint's bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the streams, writes the positions out and joins the thread.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Silence after which a replication connection is closed (keep-alives every fifth of it).
const IDLE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long one dial of a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Wait before the first redial after a stream ends, doubling up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(20);
const RECONNECT_MAX: Duration = Duration::from_millis(200);

/// quinn's transport settings for a flow-control window of `window_bytes` per stream.
fn transport_config(window_bytes: u64) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    let window = quinn::VarInt::from_u64(window_bytes).unwrap_or(quinn::VarInt::MAX);
    transport.stream_receive_window(window);
    // Every shard's stream may have its window in flight at once.
    let shards = window_bytes.saturating_mul(16);
    transport.receive_window(quinn::VarInt::from_u64(shards).unwrap_or(quinn::VarInt::MAX));
    transport.send_window(shards);
    // A partition longer than the idle timeout ends the connection, and the shipper then dials
    // every RECONNECT_MAX at most, each attempt a fresh handshake: after the heal the stream
    // is back within about CONNECT_TIMEOUT + RECONNECT_MAX. (Kept alive instead, the connection
    // would wait out QUIC's doubling probe timeout, seconds after a partition of seconds.)
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    transport.keep_alive_interval(Some(IDLE_TIMEOUT / 5));
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4096));
    transport
}

async fn run(
    context: Arc<Context>,
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
    ready: std::sync::mpsc::Sender<Result<SocketAddr, String>>,
) {
    let mut endpoint = match endpoint(Some(server), context.config.listen) {
        Ok(endpoint) => endpoint,
        Err(error) => {
            let _ = ready.send(Err(format!("replication.listen: cannot bind {}: {error}", context.config.listen)));
            return;
        }
    };
    endpoint.set_default_client_config(client);
    let addr = endpoint.local_addr().unwrap_or(context.config.listen);
    let _ = ready.send(Ok(addr));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(receive::accept(context.clone(), endpoint.clone()));
    tasks.spawn(observe::observe(context.clone()));
    if context.config.ships() {
        for peer in &context.config.peers {
            let mut connector = platform::quic::Connector::new(endpoint.clone());
            connector.connect_timeout = CONNECT_TIMEOUT;
            let link = Arc::new(ship::PeerLink { peer: peer.clone(), connector });
            for side in context.shards.iter().filter(|side| context.config.ships_to(side.shard, &peer.region)) {
                tasks.spawn(ship::ship(context.clone(), link.clone(), side.clone()));
            }
        }
    }
    frames::stopped(&mut context.stop.clone()).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    flush_positions(&context);
    endpoint.close(quinn::VarInt::from_u32(0), b"stopping");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Keeps `connection` for the statistics of `region` in `direction` (`out`: this node dialed
/// it to ship, `in`: the peer dialed it to ship here).
fn remember_connection(context: &Context, region: &str, direction: &'static str, connection: &quinn::Connection) {
    let mut connections = context.connections.lock().unwrap_or_else(PoisonError::into_inner);
    let key = (region.to_owned(), direction);
    if connections.get(&key).is_none_or(|known| known.stable_id() != connection.stable_id()) {
        connections.insert(key, connection.clone());
    }
}

/// A replica shard's resume position from one source region: the core's [`Position`] (where,
/// and when to write it out) and its file.
struct PositionFile {
    /// The shard's directory, where the position file is.
    dir: std::path::PathBuf,
    position: Mutex<Position>,
    /// The position last written to the file, held while the file is written (streams write
    /// from blocking threads, the final flush from the runtime's), so no two writes share the
    /// temporary file and a stale write never follows a newer one.
    written: Mutex<u64>,
}

/// How often a stream writes its position out.
const POSITION_WRITE_INTERVAL: Duration = Duration::from_millis(200);

impl PositionFile {
    /// The position `lsn` loaded from `dir` when the thread starts (its `now` is 0).
    fn new(dir: &std::path::Path, lsn: u64) -> Self {
        let interval = u64::try_from(POSITION_WRITE_INTERVAL.as_nanos()).unwrap_or(u64::MAX);
        Self { dir: dir.to_path_buf(), position: Mutex::new(Position::new(lsn, 0, interval)), written: Mutex::new(lsn) }
    }

    fn lsn(&self) -> u64 {
        self.position.lock().unwrap_or_else(PoisonError::into_inner).lsn()
    }

    /// See [`Position::advance`].
    fn advance(&self, next_lsn: u64, now_ns: u64) -> Option<u64> {
        self.position.lock().unwrap_or_else(PoisonError::into_inner).advance(next_lsn, now_ns)
    }

    /// Writes `next_lsn` to the file unless a position at least as far was written already.
    fn store(&self, region: &str, next_lsn: u64) -> std::io::Result<()> {
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        if next_lsn > *written {
            position::store(&self.dir, region, next_lsn)?;
            *written = next_lsn;
        }
        Ok(())
    }
}

fn flush_positions(context: &Context) {
    for ((region, shard), position) in &context.positions {
        if let Err(error) = position.store(region, position.lsn()) {
            tracing::error!(shard, %error, "cannot write the replication position");
        }
    }
}
