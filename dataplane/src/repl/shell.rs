//! The replication thread: a tokio runtime with one QUIC endpoint (quinn, mutual TLS against
//! the cluster CA) that both ships and receives.
//!
//! Shipping (shards homed here): per (replica region, shard) a task tails the shard's durable WAL
//! with a [`WalCursor`] (memory-mapped, any thread), forms batches up to `batch_bytes_max`,
//! compresses them and writes each frame as two `Bytes` (head, body) on the shard's own
//! bidirectional stream of the connection to that peer, so one shard's backlog never blocks
//! another's. The [`Outbound`] core bounds the unacknowledged window (backpressure) and says
//! what closed timestamp a batch may carry. Chunked values are read from their chunk files and
//! shipped inline. Any error closes the stream; the task reconnects and resumes from the
//! receiver's durable position. The shard's WAL is held from the lowest acknowledged LSN of
//! any peer, up to `wal_hold_bytes_max` below a checkpoint; a peer whose position the WAL no
//! longer holds is sent a snapshot first (the newest checkpoint, in `Install` parts), and a
//! pin keeps the WAL from the snapshot's LSN until that stream has caught up.
//!
//! With multi-master keyspaces every shard ships from every region, each stream carrying only
//! the records its region stamped (the others as empty entries), and every shard receives from
//! every peer.
//!
//! Receiving (shards homed elsewhere and replicated here): each stream's `Hello` is checked
//! (the region is the shard's home and not this one, and the placement keeps a replica here;
//! or any peer with multi-master keyspaces; same shard count), answered with the durable
//! position, then
//! every batch is checked by the [`Inbound`] core, decompressed, its entries validated and handed to the
//! owning shard (glommio) as [`Apply`] requests without waiting; a second task awaits them in
//! order and acknowledges (position, closed timestamp) once all are durable. Snapshot parts
//! are applied the same way; their last part also has the shard tombstone, at the snapshot's
//! horizon, the keys held here that the snapshot lacks, and is acknowledged with its LSN.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use controlplane::net::Connector;
use controlplane::tls::Identity;
use tokio::sync::{mpsc, oneshot, watch};
use wire::repl::{self, Batch, Entries, Frame};

use super::core::{Inbound, Outbound};
use super::status::Resolved;
use super::{Apply, Peer, ReplConfig, ThreadSide, Work, codec, position};
use crate::store::clock::{self, Clock};
use crate::store::op::{self, Body, Value};
use crate::wal::{WalCursor, WalReader};

/// ALPN of the replication protocol.
pub const ALPN: &[u8] = b"meridian-repl/1";

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
    /// Per shard, the acknowledged LSN of each peer (for the WAL hold), and whether the peer's
    /// stream installed a snapshot and has not caught up yet (for the WAL pin).
    acked: Mutex<HashMap<(u32, String), (u64, bool)>>,
    /// Per (source region, shard homed there), the replica's resume position.
    positions: HashMap<(String, u32), Arc<Position>>,
    /// Failpoint for tests: flip a byte in the body of every Nth batch sent
    /// ([`CORRUPT_EVERY_ENV`]).
    corrupt_every: Option<u64>,
    batches_sent: std::sync::atomic::AtomicU64,
    /// The clock lag is measured against (the store's: GLTS when the node has a control plane).
    clock: Arc<dyn Clock>,
    /// The latest QUIC connection to (`out`, shipping) and from (`in`, receiving) each peer
    /// region, for its statistics.
    connections: Mutex<HashMap<(String, &'static str), quinn::Connection>>,
}

/// Test failpoint: when set to N, every Nth non-empty batch leaves with one body byte flipped
/// (after its checksum was computed), as a damaged buffer would.
pub const CORRUPT_EVERY_ENV: &str = "MERIDIAN_FAILPOINT_REPL_CORRUPT_EVERY";

impl Replication {
    /// Binds the endpoint, ships the shards homed here and receives the others.
    pub fn start(config: ReplConfig, shards: Vec<ThreadSide>, clock: Arc<dyn Clock>) -> Result<Self, String> {
        let identity = Identity::in_dir(&config.tls_dir, &config.name);
        identity.require_files("replication.tls_dir", &config.tls_dir, &config.name)?;
        let server = identity
            .server_config_for(ALPN, transport(&config))
            .map_err(|error| format!("replication TLS: {error:#}"))?;
        let client = identity
            .client_config_for(ALPN, transport(&config))
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
                let lsn = position::load(&side.dir, source)?;
                let position = Position {
                    dir: side.dir.clone(),
                    current: Mutex::new((lsn, Instant::now())),
                    written: Mutex::new(lsn),
                };
                positions.insert(((*source).to_owned(), side.shard), Arc::new(position));
            }
        }
        drop(sources);
        let context = Arc::new(Context {
            config,
            shards,
            resolved: resolved.clone(),
            stop: stop_rx,
            acked: Mutex::default(),
            positions,
            corrupt_every: std::env::var(CORRUPT_EVERY_ENV).ok().and_then(|n| n.parse().ok()).filter(|n| *n > 0),
            batches_sent: std::sync::atomic::AtomicU64::new(0),
            clock,
            connections: Mutex::default(),
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

fn transport(config: &ReplConfig) -> quinn::TransportConfig {
    transport_with_window(config.quic_window_bytes)
}

fn transport_with_window(window_bytes: u64) -> quinn::TransportConfig {
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

/// The endpoint bound to `listen`. Path MTU discovery keeps quinn's bounds (up to 1452
/// bytes): with discovery up to 64 KiB datagrams on loopback, quinn declared losses of large
/// packets under load (none were dropped), fell back to 1200 bytes, and a stream through the
/// WAN proxy started 400 ms behind in `bench geo`.
fn endpoint(server: Option<quinn::ServerConfig>, listen: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let config = quinn::EndpointConfig::default();
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    let socket = std::net::UdpSocket::bind(listen)?;
    // Deep kernel buffers (capped by net.core.{r,w}mem_max): with the default of about 200 KiB
    // a burst overflows the receive buffer (the kernel counts "receive buffer errors"), which
    // quinn then has to detect and resend.
    let buffers = socket2::SockRef::from(&socket);
    let _ = buffers.set_recv_buffer_size(UDP_SOCKET_BUFFER_BYTES);
    let _ = buffers.set_send_buffer_size(UDP_SOCKET_BUFFER_BYTES);
    quinn::Endpoint::new(config, server, socket, runtime)
}

/// Kernel buffers the replication socket asks for.
const UDP_SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// The longest [`loopback_ceiling`] waits for its bytes.
const LOOPBACK_CEILING_TIMEOUT: Duration = Duration::from_secs(120);

/// What this transport itself carries on loopback: `bytes` sent over one stream from an
/// endpoint of identity `sender` to one of `receiver` (both in `tls_dir`), with the
/// replication's mutual TLS, transport settings (`window_bytes`) and sockets, each endpoint on
/// a thread and runtime of its own as two nodes' would be. Nothing is compressed, logged or
/// applied. Returns MB/s from the first byte received to the last. `bench geo` reports it
/// beside iperf3's TCP and the replication's own catch-up.
///
/// # Errors
/// The identities cannot be loaded, a socket cannot be bound, the connection fails, or not
/// every byte arrives within [`LOOPBACK_CEILING_TIMEOUT`].
pub fn loopback_ceiling(
    tls_dir: &std::path::Path,
    sender: &str,
    receiver: &str,
    window_bytes: u64,
    bytes: u64,
) -> Result<f64, String> {
    let tls = |error: anyhow::Error| format!("loopback ceiling TLS: {error:#}");
    let server = Identity::in_dir(tls_dir, receiver)
        .server_config_for(ALPN, transport_with_window(window_bytes))
        .map_err(tls)?;
    let client =
        Identity::in_dir(tls_dir, sender).client_config_for(ALPN, transport_with_window(window_bytes)).map_err(tls)?;
    let text = |error: &dyn std::fmt::Display| format!("loopback ceiling: {error}");
    let runtime =
        move || tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|error| text(&error));
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let receiving = std::thread::spawn(move || -> Result<f64, String> {
        runtime()?.block_on(async move {
            let bound = endpoint(Some(server), loopback).and_then(|listening| Ok((listening.local_addr()?, listening)));
            let _ = bound_tx.send(bound.as_ref().map(|(addr, _)| *addr).map_err(|error| text(error)));
            let (_, listening) = bound.map_err(|error| text(&error))?;
            // Bounded, so a sender that never connects cannot leave this thread waiting.
            let receive = async {
                let incoming = listening.accept().await.ok_or_else(|| text(&"endpoint closed"))?;
                let connection = incoming.await.map_err(|error| text(&error))?;
                let mut stream = connection.accept_uni().await.map_err(|error| text(&error))?;
                let (mut received, mut first) = (0u64, None);
                while let Some(chunk) = stream.read_chunk(usize::MAX, true).await.map_err(|error| text(&error))? {
                    first.get_or_insert_with(Instant::now);
                    received += chunk.bytes.len() as u64;
                }
                let seconds = first.map_or(0.0, |first: Instant| first.elapsed().as_secs_f64());
                connection.close(quinn::VarInt::from_u32(0), b"done");
                Ok::<_, String>((received, seconds))
            };
            let outcome = tokio::time::timeout(LOOPBACK_CEILING_TIMEOUT, receive).await;
            listening.close(quinn::VarInt::from_u32(0), b"done");
            listening.wait_idle().await;
            let (received, seconds) = outcome.map_err(|_| text(&"nothing received within the time limit"))??;
            if received != bytes {
                return Err(text(&format!("received {received} of {bytes} bytes")));
            }
            Ok(received as f64 / 1e6 / seconds.max(1e-9))
        })
    });
    let addr = bound_rx.recv().map_err(|_| text(&"the receiving thread ended early"))??;
    let sending = std::thread::spawn(move || -> Result<(), String> {
        runtime()?.block_on(async move {
            let mut dialing = endpoint(None, loopback).map_err(|error| text(&error))?;
            dialing.set_default_client_config(client);
            let connection = dialing
                .connect(addr, controlplane::tls::SERVER_NAME)
                .map_err(|error| text(&error))?
                .await
                .map_err(|error| text(&error))?;
            let mut stream = connection.open_uni().await.map_err(|error| text(&error))?;
            // One buffer handed to quinn again and again, as the shipper hands it batches.
            let piece = Bytes::from(vec![0x5Au8; 64 << 10]);
            let mut left = bytes;
            while left > 0 {
                let take = usize::try_from(left.min(piece.len() as u64)).unwrap_or(piece.len());
                stream.write_chunk(piece.slice(..take)).await.map_err(|error| text(&error))?;
                left -= take as u64;
            }
            stream.finish().map_err(|error| text(&error))?;
            connection.closed().await;
            Ok(())
        })
    });
    let sent = sending.join().map_err(|_| text(&"the sending thread panicked"))?;
    let received = receiving.join().map_err(|_| text(&"the receiving thread panicked"))?;
    sent?;
    received
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
    tasks.spawn(accept(context.clone(), endpoint.clone()));
    tasks.spawn(observe(context.clone()));
    if context.config.ships() {
        for peer in &context.config.peers {
            let mut connector = Connector::new(endpoint.clone());
            connector.connect_timeout = CONNECT_TIMEOUT;
            let link = Arc::new(PeerLink { peer: peer.clone(), connector });
            for side in context.shards.iter().filter(|side| context.config.ships_to(side.shard, &peer.region)) {
                tasks.spawn(ship(context.clone(), link.clone(), side.clone()));
            }
        }
    }
    stopped(&mut context.stop.clone()).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    flush_positions(&context);
    endpoint.close(quinn::VarInt::from_u32(0), b"stopping");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

// ---------------------------------------------------------------- frames on a stream

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("{0}")]
    Io(String),
    #[error("bad frame: {0}")]
    Frame(#[from] repl::ReplError),
    #[error("{0}")]
    Protocol(#[from] super::core::ProtocolError),
    #[error("refused by the peer: {0}")]
    Refused(String),
    #[error("{0}")]
    Other(String),
}

fn io(error: impl std::fmt::Display) -> StreamError {
    StreamError::Io(error.to_string())
}

/// Reads one whole frame; `None` at the end of the stream.
async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Bytes>, StreamError> {
    let mut header = [0u8; wire::HEADER_BYTES];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(error) => return Err(io(error)),
    }
    let len = repl::frame_len(&header)?.unwrap_or(wire::HEADER_BYTES);
    let mut frame = BytesMut::zeroed(len);
    frame[..wire::HEADER_BYTES].copy_from_slice(&header);
    recv.read_exact(&mut frame[wire::HEADER_BYTES..]).await.map_err(io)?;
    Ok(Some(frame.freeze()))
}

async fn write_frame(send: &mut quinn::SendStream, frame: &Frame<'_>) -> Result<(), StreamError> {
    let mut out = Vec::new();
    repl::encode_frame(frame, &mut out).map_err(|error| StreamError::Other(error.to_string()))?;
    send.write_all(&out).await.map_err(io)
}

// ---------------------------------------------------------------- shipping

/// A peer region and the connector that keeps one QUIC connection to it for all its shards'
/// streams.
struct PeerLink {
    peer: Peer,
    connector: Connector,
}

impl PeerLink {
    async fn connect(&self) -> Result<quinn::Connection, StreamError> {
        self.connector.connection(&self.peer.addr.to_string(), self.peer.addr).await.map_err(io)
    }
}

async fn ship(context: Arc<Context>, link: Arc<PeerLink>, side: ThreadSide) {
    let what = format!("shipping shard {} to {} ({})", side.shard, link.peer.region, link.peer.addr);
    // Until the peer says where it is, keep the whole WAL for it.
    set_acked(&context, &side, &link.peer.region, 0);
    let mut last_error = String::new();
    let mut backoff = RECONNECT_MIN;
    loop {
        let began = Instant::now();
        match ship_stream(&context, &link, &side).await {
            Ok(()) => return,
            Err(error) => {
                let message = error.to_string();
                if message != last_error {
                    tracing::warn!("{what}: {message}; retrying");
                    last_error = message;
                }
            }
        }
        // A stream that lived a while was a working link: redial quickly, as after a heal.
        if began.elapsed() > IDLE_TIMEOUT {
            backoff = RECONNECT_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

fn set_acked(context: &Context, side: &ThreadSide, region: &str, lsn: u64) {
    update_ack(context, side, region, |ack| ack.0 = lsn);
}

/// Changes `region`'s (acknowledged LSN, pinned) for the shard, then publishes the shard's
/// hold (the lowest LSN any peer needs) and pin (the lowest LSN a pinned peer needs).
fn update_ack(context: &Context, side: &ThreadSide, region: &str, change: impl FnOnce(&mut (u64, bool))) {
    let mut acked = context.acked.lock().unwrap_or_else(PoisonError::into_inner);
    change(acked.entry((side.shard, region.to_owned())).or_insert((0, false)));
    let peers = || acked.iter().filter(|((shard, _), _)| *shard == side.shard).map(|(_, ack)| *ack);
    side.hold.store(peers().map(|(lsn, _)| lsn).min().unwrap_or(u64::MAX), Ordering::Release);
    let pin = peers().filter(|(_, pinned)| *pinned).map(|(lsn, _)| lsn).min();
    side.pin.store(pin.unwrap_or(u64::MAX), Ordering::SeqCst);
}

async fn ship_stream(context: &Context, link: &PeerLink, side: &ThreadSide) -> Result<(), StreamError> {
    let config = &context.config;
    let connection = link.connect().await?;
    remember_connection(context, &link.peer.region, "out", &connection);
    let (mut send, mut recv) = connection.open_bi().await.map_err(io)?;
    let shards = u32::try_from(context.shards.len()).unwrap_or(u32::MAX);
    write_frame(&mut send, &Frame::Hello { shard: side.shard, shards, region: &config.region }).await?;
    let answer = read_frame(&mut recv).await?.ok_or_else(|| StreamError::Io("stream ended before Resume".into()))?;
    let next_lsn = match repl::decode_frame(&answer)?.0 {
        Frame::Resume { next_lsn } => next_lsn,
        Frame::Refuse { reason } => return Err(StreamError::Refused(reason.to_owned())),
        other => return Err(StreamError::Other(format!("expected Resume, got {other:?}"))),
    };
    let reader =
        WalReader::new(side.dir.join("wal"), side.shard, side.record_payload_bytes_max).with_tail(side.tail.clone());
    let first = reader.first_lsn().map_err(|error| StreamError::Other(error.to_string()))?;
    // After a snapshot, its pin keeps the WAL from where the batches resume, following the
    // acks, until the stream has caught up: a bounded hold alone could release it under a
    // stream that is still behind, which would then install again, and again.
    let (next_lsn, mut pin) = match first {
        Some(first) if next_lsn < first => {
            let (resume_lsn, pin) = install_snapshot(context, &link.peer.region, side, &mut send, next_lsn).await?;
            (resume_lsn, Some(pin))
        }
        _ => {
            set_acked(context, side, &link.peer.region, next_lsn);
            (next_lsn, None)
        }
    };
    let started = Instant::now();
    let now_ns = || u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut outbound = Outbound::new(config.window, next_lsn, now_ns());
    let peer = link.peer.region.clone();
    let window_depth = metrics::gauge!("meridian_replication_unacked_batches", "peer" => peer.clone(), "shard" => side.shard.to_string());
    let raw_bytes = metrics::counter!("meridian_replication_raw_bytes_total", "peer" => peer.clone());
    let wire_bytes = metrics::counter!("meridian_replication_wire_bytes_total", "peer" => peer.clone());
    let batches = metrics::counter!("meridian_replication_batches_total", "peer" => peer);
    let mut points = side.points.clone();
    let mut point = *points.borrow_and_update();
    let mut cursor = reader.cursor(next_lsn, point.durable_next_lsn.max(next_lsn));
    // With multi-master keyspaces the WAL also holds what other regions shipped here: the
    // stream carries this region's own writes only.
    let origin = config.origin;

    // Acks arrive on their own task so a full window never blocks reading them.
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    let acks = tokio::spawn(async move {
        loop {
            let frame = match read_frame(&mut recv).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return Err(StreamError::Io("peer closed the stream".into())),
                Err(error) => return Err(error),
            };
            match repl::decode_frame(&frame)?.0 {
                Frame::Ack { next_lsn, .. } => {
                    if acks_tx.send(next_lsn).is_err() {
                        return Ok(());
                    }
                }
                Frame::Refuse { reason } => return Err(StreamError::Refused(reason.to_owned())),
                other => return Err(StreamError::Other(format!("expected Ack, got {other:?}"))),
            }
        }
    });
    let _abort_acks = AbortOnDrop(acks.abort_handle());
    let mut acks = acks;
    let mut stop = context.stop.clone();
    let mut head = Vec::new();
    let closed_interval_ns = u64::try_from(config.closed_interval.as_nanos()).unwrap_or(u64::MAX);
    loop {
        // Ship what is durable while the window has room.
        while outbound.has_room() && outbound.next_lsn() < point.durable_next_lsn {
            let built = build_batch(&mut cursor, side, config.batch_bytes_max, point.durable_next_lsn, origin)?;
            let ends_at_durable = cursor.next_lsn() >= point.durable_next_lsn;
            let closed = outbound.closed_for(built.last_glt, ends_at_durable, point.closed_ts);
            let sent = send_batch(context, &mut send, &mut head, side.shard, &built, closed).await?;
            outbound.sent(built.first_lsn + u64::from(built.count), closed, sent, now_ns());
            raw_bytes.increment(built.raw.len() as u64);
            wire_bytes.increment(sent as u64);
            batches.increment(1);
            window_depth.set(outbound.unacked_batches() as f64);
        }
        let caught_up = outbound.next_lsn() >= point.durable_next_lsn;
        if caught_up && outbound.heartbeat_due(now_ns(), closed_interval_ns, point.closed_ts) {
            let empty = Built { first_lsn: outbound.next_lsn(), count: 0, raw: Vec::new(), last_glt: None };
            let closed = outbound.closed_for(None, true, point.closed_ts);
            let sent = send_batch(context, &mut send, &mut head, side.shard, &empty, closed).await?;
            outbound.sent(outbound.next_lsn(), closed, sent, now_ns());
        }
        tokio::select! {
            ack = acks_rx.recv() => match ack {
                Some(next) => {
                    outbound.on_ack(next)?;
                    while let Ok(next) = acks_rx.try_recv() {
                        outbound.on_ack(next)?;
                    }
                    set_acked(context, side, &link.peer.region, outbound.acked_lsn());
                    window_depth.set(outbound.unacked_batches() as f64);
                    // The pin follows the acknowledged LSN until the stream has caught up;
                    // the bounded hold will do from there.
                    if pin.is_some() && outbound.acked_lsn() >= point.durable_next_lsn {
                        pin = None;
                    }
                }
                None => {
                    return match (&mut acks).await {
                        Ok(Err(error)) => Err(error),
                        _ => Err(StreamError::Io("ack reader ended".into())),
                    };
                }
            },
            changed = points.changed() => {
                if changed.is_err() {
                    return Ok(()); // the shard stopped
                }
                point = *points.borrow_and_update();
                cursor.extend_until(point.durable_next_lsn);
            }
            () = tokio::time::sleep(config.closed_interval) => {}
            () = stopped(&mut stop) => {
                let _ = send.finish();
                return Ok(());
            }
        }
    }
}

/// Resolves once a stop is asked (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        let asked = *stop.borrow_and_update();
        if asked || stop.changed().await.is_err() {
            return;
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A batch ready to compress.
struct Built {
    first_lsn: u64,
    count: u32,
    raw: Vec<u8>,
    last_glt: Option<u64>,
}

/// The next batch of WAL records from `cursor`, up to `until`. With `origin`, a record
/// stamped by another region goes as an empty entry (it keeps its LSN's place; the receiver
/// has it from its own origin's stream).
fn build_batch(
    cursor: &mut WalCursor,
    side: &ThreadSide,
    bytes_max: usize,
    until: u64,
    origin: Option<u8>,
) -> Result<Built, StreamError> {
    let first_lsn = cursor.next_lsn();
    let mut built = Built { first_lsn, count: 0, raw: Vec::with_capacity(bytes_max.min(1 << 20)), last_glt: None };
    while built.raw.len() < bytes_max && cursor.next_lsn() < until {
        let Some(record) = cursor.next_record().map_err(|error| {
            StreamError::Other(format!(
                "WAL of shard {} cannot be read at LSN {}: {error} (if it was released meanwhile, the next \
                 stream installs a snapshot)",
                side.shard,
                cursor.next_lsn()
            ))
        })?
        else {
            break;
        };
        if origin.is_some_and(|origin| clock::origin_of(record.glt) != origin) {
            repl::encode_entry(0, &[], &mut built.raw);
            built.count += 1;
            continue;
        }
        let payload = inline_chunks(&record.payload, side)?;
        let payload = match &payload {
            Some(inlined) => &inlined[..],
            None => &record.payload[..],
        };
        repl::encode_entry(record.glt, payload, &mut built.raw);
        built.count += 1;
        built.last_glt = Some(record.glt);
    }
    Ok(built)
}

/// The payload with every chunked value read from its chunk file and put inline (`None` when
/// the record has none). A chunk collected since (its version expired) drops that operation:
/// the version it belonged to is gone at the home too.
fn inline_chunks(payload: &Bytes, side: &ThreadSide) -> Result<Option<Vec<u8>>, StreamError> {
    let ops =
        op::decode(payload).map_err(|error| StreamError::Other(format!("WAL record does not decode: {error}")))?;
    if !ops.iter().any(|op| matches!(op.body, Body::Chunked(_))) {
        return Ok(None);
    }
    let mut values = Vec::with_capacity(ops.len());
    for op in &ops {
        let value = match &op.body {
            Body::Chunked(list) => read_chunked(list, side)?,
            _ => Some(Vec::new()),
        };
        values.push(value);
    }
    let kept = ops.iter().zip(&values).filter_map(|(op, value)| {
        let view = match (&op.body, value) {
            (Body::Chunked(_), Some(value)) => Value::Inline(value),
            (Body::Chunked(_), None) => return None,
            (body, _) => body.view(),
        };
        Some((&op.key[..], view))
    });
    let kept: Vec<_> = kept.collect();
    let mut out = Vec::new();
    op::encode(kept.into_iter(), &mut out).map_err(|error| StreamError::Other(error.to_string()))?;
    Ok(Some(out))
}

/// A chunked value read from its chunk files (checked); `None` when a chunk is gone (its
/// version expired and was collected).
fn read_chunked(list: &op::ChunkList, side: &ThreadSide) -> Result<Option<Vec<u8>>, StreamError> {
    let mut value = Vec::with_capacity(usize::try_from(list.size).unwrap_or(0));
    for chunk in &list.chunks {
        let path = side.dir.join("chunks").join(crate::store::chunks::file_name(&chunk.hash));
        match std::fs::read(&path) {
            Ok(file) => {
                let data = crate::store::chunks::verified_data(chunk, &file)
                    .map_err(|error| StreamError::Other(error.to_string()))?;
                value.extend_from_slice(data);
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(StreamError::Other(format!("{}: {error}", path.display()))),
        }
    }
    Ok(Some(value))
}

/// One part of a snapshot: entries compressed, ready for an `Install` frame.
struct Part {
    count: u32,
    raw_len: u32,
    body: Vec<u8>,
}

/// Snapshot parts in flight between the thread reading the checkpoint and the stream.
const INSTALL_PARTS_AHEAD: usize = 4;

/// Ships the shard's newest checkpoint to `peer`, whose position `behind` the WAL no longer
/// holds (the InstallSnapshot pattern): every version as an entry (chunked values read and
/// put inline), in `Install` parts; returns the checkpoint's LSN, where the batches resume,
/// and the pin that keeps the WAL from there.
async fn install_snapshot<'a>(
    context: &'a Context,
    peer: &str,
    side: &'a ThreadSide,
    send: &mut quinn::SendStream,
    behind: u64,
) -> Result<(u64, Pin<'a>), StreamError> {
    let (resume_lsn, path) = newest_checkpoint(side)?.ok_or_else(|| {
        StreamError::Other(format!(
            "shard {}: region {peer} lacks LSN {behind}, which the WAL no longer holds, and there is no checkpoint \
             to install",
            side.shard
        ))
    })?;
    // Checkpoints release WAL only below their own LSN: from `resume_lsn` on it is there, and
    // the pin keeps it, whatever `wal_hold_bytes_max` says. A checkpoint completing between
    // the choice above and the pin deletes this checkpoint file before it reads the pin
    // (`write_checkpoint`), so either the pin holds or the file below fails to open and the
    // stream starts over with the newer one.
    let pin = Pin::new(context, side, peer, resume_lsn);
    tracing::info!(
        shard = side.shard,
        peer,
        behind,
        resume_lsn,
        "installing a snapshot: the WAL no longer holds the peer's position"
    );
    let (parts_tx, mut parts_rx) = mpsc::channel::<Result<Produced, StreamError>>(INSTALL_PARTS_AHEAD);
    let (reading, codec, bytes_max) = (side.clone(), context.config.codec, context.config.batch_bytes_max);
    let producer = tokio::task::spawn_blocking(move || {
        if let Err(error) = snapshot_parts(&path, resume_lsn, &reading, codec, bytes_max, &parts_tx) {
            let _ = parts_tx.blocking_send(Err(error));
        }
    });
    let _abort = AbortOnDrop(producer.abort_handle());
    let (mut versions, mut parts) = (0u64, 0u64);
    // One part is held back until the next arrives, so the last one goes out marked as such,
    // with the horizon that only the end of the checkpoint gives.
    let mut pending: Option<Part> = None;
    let horizon = loop {
        match parts_rx.recv().await {
            Some(Ok(Produced::Part(part))) => {
                if let Some(ready) = pending.replace(part) {
                    write_part(send, side.shard, resume_lsn, codec, &ready, None).await?;
                    versions += u64::from(ready.count);
                    parts += 1;
                }
            }
            Some(Ok(Produced::Done { horizon })) => break horizon,
            Some(Err(error)) => return Err(error),
            // A panic on the reading thread: without `Done`, nothing is marked last.
            None => return Err(StreamError::Other("the checkpoint reader stopped before the checkpoint's end".into())),
        }
    };
    // A snapshot without versions still ends with a last part (an empty body, compressed).
    let last = pending.unwrap_or_else(|| Part { count: 0, raw_len: 0, body: codec::compress(codec, &[]) });
    write_part(send, side.shard, resume_lsn, codec, &last, Some(horizon)).await?;
    versions += u64::from(last.count);
    parts += 1;
    metrics::counter!("meridian_replication_snapshots_shipped_total", "peer" => peer.to_owned()).increment(1);
    tracing::info!(shard = side.shard, peer, resume_lsn, versions, parts, horizon, "snapshot shipped; batches resume");
    Ok((resume_lsn, pin))
}

/// Sends one snapshot part; `horizon` marks the last one.
async fn write_part(
    send: &mut quinn::SendStream,
    shard: u32,
    resume_lsn: u64,
    codec: repl::Codec,
    part: &Part,
    horizon: Option<u64>,
) -> Result<(), StreamError> {
    let install = repl::Install {
        shard,
        resume_lsn,
        horizon: horizon.unwrap_or(0),
        count: part.count,
        last: horizon.is_some(),
        codec,
        raw_len: part.raw_len,
        body: &part.body,
    };
    write_frame(send, &Frame::Install(install)).await
}

/// What the checkpoint reader hands the stream: parts, then the end with the horizon.
enum Produced {
    Part(Part),
    Done { horizon: u64 },
}

/// Keeps a home shard's WAL from `peer`'s acknowledged LSN on, starting at a snapshot's LSN,
/// whatever `wal_hold_bytes_max` says (the hold can be raised by it; the pin cannot).
/// Released when dropped.
struct Pin<'a> {
    context: &'a Context,
    side: &'a ThreadSide,
    peer: String,
}

impl<'a> Pin<'a> {
    fn new(context: &'a Context, side: &'a ThreadSide, peer: &str, lsn: u64) -> Self {
        update_ack(context, side, peer, |ack| *ack = (lsn, true));
        Self { context, side, peer: peer.to_owned() }
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        update_ack(self.context, self.side, &self.peer, |ack| ack.1 = false);
    }
}

/// The newest checkpoint file of the shard: its LSN and path.
fn newest_checkpoint(side: &ThreadSide) -> Result<Option<(u64, std::path::PathBuf)>, StreamError> {
    crate::store::shard::newest_checkpoint(&side.dir, side.shard)
        .map_err(|error| StreamError::Other(format!("{}: {error}", side.dir.display())))
}

/// Reads the checkpoint at `path` and sends its versions, as they are decoded, in compressed
/// parts of up to `bytes_max` raw bytes (on a blocking thread). A damaged checkpoint fails
/// after the parts before the damage went out: without the last part the receiver keeps its
/// position, and what it applied are versions the shard has anyway.
fn snapshot_parts(
    path: &std::path::Path,
    resume_lsn: u64,
    side: &ThreadSide,
    codec: repl::Codec,
    bytes_max: usize,
    parts: &mpsc::Sender<Result<Produced, StreamError>>,
) -> Result<(), StreamError> {
    let fail = |error: &dyn std::fmt::Display| StreamError::Other(format!("{}: {error}", path.display()));
    let bytes = crate::store::shard::map_checkpoint(path).map_err(|error| fail(&error))?;
    let mut builder = PartBuilder { side, codec, bytes_max, parts, raw: Vec::new(), count: 0, payload: Vec::new() };
    let mut outcome: Result<bool, StreamError> = Ok(true);
    let info = crate::store::checkpoint::decode(&bytes, side.record_payload_bytes_max, |op, ts| {
        if matches!(outcome, Ok(true)) {
            outcome = builder.add(&op, ts);
        }
    })
    .map_err(|error| fail(&error))?;
    if !outcome? {
        return Ok(()); // the stream ended
    }
    if info.shard_id != side.shard || info.lsn != resume_lsn {
        return Err(fail(&format!("holds shard {} at LSN {}", info.shard_id, info.lsn)));
    }
    if builder.flush()? {
        let _ = parts.blocking_send(Ok(Produced::Done { horizon: info.horizon }));
    }
    Ok(())
}

/// Collects versions into snapshot parts.
struct PartBuilder<'a> {
    side: &'a ThreadSide,
    codec: repl::Codec,
    bytes_max: usize,
    parts: &'a mpsc::Sender<Result<Produced, StreamError>>,
    raw: Vec<u8>,
    count: u32,
    payload: Vec<u8>,
}

impl PartBuilder<'_> {
    /// Adds a version (a chunked value read and put inline; skipped when its chunks were
    /// collected since: the version is gone at the home too). `false` once the stream ended.
    fn add(&mut self, op: &op::Op, ts: u64) -> Result<bool, StreamError> {
        let inlined;
        let value = match &op.body {
            Body::Chunked(list) => match read_chunked(list, self.side)? {
                Some(value) => {
                    inlined = value;
                    Value::Inline(&inlined)
                }
                None => return Ok(true),
            },
            body => body.view(),
        };
        self.payload.clear();
        op::encode([(&op.key[..], value)].into_iter(), &mut self.payload)
            .map_err(|error| StreamError::Other(error.to_string()))?;
        if self.count > 0
            && self.raw.len() + self.payload.len() + repl::ENTRY_OVERHEAD_BYTES > self.bytes_max
            && !self.flush()?
        {
            return Ok(false);
        }
        repl::encode_entry(ts, &self.payload, &mut self.raw);
        self.count += 1;
        Ok(true)
    }

    /// Sends the part collected so far, if any; `false` once the stream ended.
    fn flush(&mut self) -> Result<bool, StreamError> {
        if self.count == 0 {
            return Ok(true);
        }
        let body = codec::compress(self.codec, &self.raw);
        let raw_len =
            u32::try_from(self.raw.len()).map_err(|_| StreamError::Other("snapshot part too large".into()))?;
        let part = Part { count: std::mem::take(&mut self.count), raw_len, body };
        self.raw.clear();
        Ok(self.parts.blocking_send(Ok(Produced::Part(part))).is_ok())
    }
}

async fn send_batch(
    context: &Context,
    send: &mut quinn::SendStream,
    head: &mut Vec<u8>,
    shard: u32,
    built: &Built,
    closed_ts: u64,
) -> Result<usize, StreamError> {
    let codec = context.config.codec;
    let mut body = Bytes::from(codec::compress(codec, &built.raw));
    let raw_len = u32::try_from(built.raw.len()).map_err(|_| StreamError::Other("batch too large".into()))?;
    let batch = Batch { shard, first_lsn: built.first_lsn, count: built.count, closed_ts, codec, raw_len, body: &body };
    repl::encode_batch_head(&batch, head).map_err(|error| StreamError::Other(error.to_string()))?;
    let sent = head.len() + body.len();
    if let Some(every) = context.corrupt_every.filter(|_| !body.is_empty()) {
        if (context.batches_sent.fetch_add(1, Ordering::Relaxed) + 1) % every == 0 {
            let mut damaged = body.to_vec();
            damaged[0] ^= 0x55;
            body = Bytes::from(damaged);
        }
    }
    send.write_all_chunks(&mut [Bytes::copy_from_slice(head), body]).await.map_err(io)?;
    Ok(sent)
}

// ---------------------------------------------------------------- metrics

/// Keeps `connection` for the statistics of `region` in `direction` (`out`: this node dialed
/// it to ship, `in`: the peer dialed it to ship here).
fn remember_connection(context: &Context, region: &str, direction: &'static str, connection: &quinn::Connection) {
    let mut connections = context.connections.lock().unwrap_or_else(PoisonError::into_inner);
    let key = (region.to_owned(), direction);
    if connections.get(&key).is_none_or(|known| known.stable_id() != connection.stable_id()) {
        connections.insert(key, connection.clone());
    }
}

/// How often the lag per source region is sampled into its gauge and histogram.
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// How often QUIC statistics are exported.
const QUIC_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Exports, per source region, the lag `now - resolved` (the RPO: writes newer than the
/// resolved timestamp would be lost if the source vanished now) as a gauge and a histogram
/// every 10 ms, and each peer connection's QUIC RTT, bytes and losses every second.
async fn observe(context: Arc<Context>) {
    let mut last_quic = Instant::now();
    loop {
        tokio::time::sleep(LAG_SAMPLE_INTERVAL).await;
        if context.config.is_multi_master() {
            for side in &context.shards {
                if let Some(floor) = context.resolved.shard_floor(side.shard) {
                    side.floor.store(floor, Ordering::Release);
                }
            }
        }
        if let Ok(interval) = context.clock.interval() {
            for source in context.resolved.sources() {
                if source.resolved_ts == 0 {
                    continue;
                }
                let lag_us = interval.earliest_us.saturating_sub(clock::physical_us(source.resolved_ts));
                let lag = lag_us as f64 / 1e6;
                metrics::gauge!("meridian_replication_lag_seconds", "source" => source.region.clone()).set(lag);
                metrics::histogram!("meridian_replication_rpo_seconds", "source" => source.region).record(lag);
            }
        }
        if last_quic.elapsed() >= QUIC_SAMPLE_INTERVAL {
            last_quic = Instant::now();
            let connections = context.connections.lock().unwrap_or_else(PoisonError::into_inner).clone();
            for ((peer, direction), connection) in connections {
                let stats = connection.stats();
                let labels = [("peer", peer), ("direction", direction.to_owned())];
                metrics::gauge!("meridian_quic_rtt_seconds", &labels).set(stats.path.rtt.as_secs_f64());
                metrics::gauge!("meridian_quic_congestion_window_bytes", &labels).set(stats.path.cwnd as f64);
                metrics::gauge!("meridian_quic_path_mtu_bytes", &labels).set(f64::from(stats.path.current_mtu));
                // Totals of the current connection: a reconnect starts again from zero, which
                // Prometheus' rate() reads as a counter reset.
                metrics::counter!("meridian_quic_sent_bytes_total", &labels).absolute(stats.udp_tx.bytes);
                metrics::counter!("meridian_quic_received_bytes_total", &labels).absolute(stats.udp_rx.bytes);
                metrics::counter!("meridian_quic_lost_packets_total", &labels).absolute(stats.path.lost_packets);
            }
        }
    }
}

// ---------------------------------------------------------------- receiving

async fn accept(context: Arc<Context>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let context = context.clone();
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(error) => {
                    tracing::warn!(%error, "replication connection refused");
                    return;
                }
            };
            let remote = connection.remote_address();
            while let Ok((send, recv)) = connection.accept_bi().await {
                let context = context.clone();
                let connection = connection.clone();
                tokio::spawn(async move {
                    if let Err(error) = receive_stream(&context, &connection, send, recv).await {
                        tracing::warn!(%remote, "replication stream ended: {error}");
                    }
                });
            }
        });
    }
}

fn check_hello(context: &Context, shard: u32, shards: u32, region: &str) -> Result<ThreadSide, String> {
    let config = &context.config;
    if shards as usize != context.shards.len() {
        return Err(format!("region {region} has {shards} shards, this node {}", context.shards.len()));
    }
    context
        .shards
        .iter()
        .find(|side| side.shard == shard)
        .cloned()
        .ok_or_else(|| format!("shard {shard} is not on this node"))
        .and_then(|side| match config.home_of(shard) {
            Some(_) if config.is_multi_master() => {
                if config.sources_of(shard).contains(&region) {
                    Ok(side)
                } else {
                    Err(format!("region {region} is not a peer of region {}", config.region))
                }
            }
            Some(home) if home == config.region => Err(format!(
                "shard {shard} is homed in region {home}, which takes its writes here and takes no replica"
            )),
            Some(home) if home != region => {
                Err(format!("region {region} is not the home of shard {shard} ({home} is)"))
            }
            Some(_) if !config.replicates(shard) => {
                Err(format!("the placement keeps no replica of shard {shard} in region {}", config.region))
            }
            Some(_) => Ok(side),
            None => Err(format!("shard {shard} has no home region here")),
        })
}

async fn receive_stream(
    context: &Context,
    connection: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), StreamError> {
    let hello = read_frame(&mut recv).await?.ok_or_else(|| StreamError::Io("stream ended before Hello".into()))?;
    let (side, region) = match repl::decode_frame(&hello)?.0 {
        Frame::Hello { shard, shards, region } => match check_hello(context, shard, shards, region) {
            Ok(side) => (side, region.to_owned()),
            Err(reason) => {
                write_frame(&mut send, &Frame::Refuse { reason: &reason }).await?;
                let _ = send.finish();
                return Err(StreamError::Refused(reason));
            }
        },
        other => return Err(StreamError::Other(format!("expected Hello, got {other:?}"))),
    };
    let shard = side.shard;
    remember_connection(context, &region, "in", connection);
    let applied = metrics::counter!("meridian_replication_applied_records_total", "source" => region.clone());
    let installed = metrics::counter!("meridian_replication_snapshots_installed_total", "source" => region.clone());
    // check_hello let only a shard homed in `region`, not here, through: it has a position.
    let position = context
        .positions
        .get(&(region.clone(), shard))
        .cloned()
        .ok_or_else(|| StreamError::Other(format!("no replication position for shard {shard} from {region}")))?;
    let next_lsn = position.lsn();
    write_frame(&mut send, &Frame::Resume { next_lsn }).await?;
    // With multi-master keyspaces every record the source ships carries its origin, and only
    // the shard's home may have keys tombstoned at the end of a snapshot (another region's
    // snapshot may lack keys it has not received yet); the tombstones carry the home's origin,
    // so no region ships them as its own writes.
    let source_origin = context.config.origin_of(&region);
    let from_home = context.config.home_of(shard) == Some(region.as_str());
    let snapshot_horizon = |horizon: u64| source_origin.map_or(horizon, |origin| clock::with_origin(horizon, origin));
    let mut inbound = Inbound::new(shard, next_lsn);

    // Applies go to the shard at once; acks follow in order once each batch is durable.
    // A frame's acceptance, whether it installs a snapshot, its record count and the answers
    // to its hand-offs.
    type Pending = (super::core::Accepted, bool, u64, Vec<oneshot::Receiver<Result<(), String>>>);
    let (pending_tx, mut pending_rx) = mpsc::unbounded_channel::<Pending>();
    let acker = async {
        while let Some((accepted, install, records, dones)) = pending_rx.recv().await {
            for done in dones {
                match done.await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => return Err(StreamError::Other(format!("apply on shard {shard}: {error}"))),
                    Err(_) => return Err(StreamError::Other(format!("shard {shard} stopped"))),
                }
            }
            applied.increment(records);
            if !accepted.ack {
                continue; // a snapshot part before the last: acknowledged with the last
            }
            if install {
                installed.increment(1);
                tracing::info!(shard, source = %region, resume_lsn = accepted.next_lsn, "snapshot installed; batches resume");
            }
            context.resolved.set_closed(&region, shard, accepted.closed_ts);
            if let Some(next_lsn) = position.advance(accepted.next_lsn) {
                // Off the runtime's thread (it syncs), and the ack does not wait for it: a
                // stale position only makes the source resend records.
                let (position, source) = (position.clone(), region.clone());
                tokio::task::spawn_blocking(move || {
                    if let Err(error) = position.store(&source, next_lsn) {
                        tracing::error!(shard, %error, "cannot write the replication position");
                    }
                });
            }
            write_frame(&mut send, &Frame::Ack { next_lsn: accepted.next_lsn, closed_ts: accepted.closed_ts }).await?;
        }
        Ok(())
    };
    let reader = async {
        // The keys of a snapshot being installed, for the keys it lacks.
        let mut snapshot_keys: Option<HashSet<Bytes>> = None;
        while let Some(frame) = read_frame(&mut recv).await? {
            // A batch of WAL records, or a part of a snapshot installed before them: entries
            // either way, applied alike (a version applied twice is one version).
            // `snapshot_end`: the horizon, on a snapshot's last part.
            let (accepted, install, snapshot_end, (codec, body, raw_len, count)) = match repl::decode_frame(&frame)?.0 {
                Frame::Batch(batch) => {
                    (inbound.accept(&batch)?, false, None, (batch.codec, batch.body, batch.raw_len, batch.count))
                }
                Frame::Install(part) => {
                    if part.last {
                        check_ahead(part.horizon, ahead_limit(context), "snapshot horizon")?;
                    }
                    let end = (part.last && from_home).then(|| snapshot_horizon(part.horizon));
                    (inbound.install(&part)?, true, end, (part.codec, part.body, part.raw_len, part.count))
                }
                other => return Err(StreamError::Other(format!("expected Batch or Install, got {other:?}"))),
            };
            let raw = Bytes::from(
                codec::decompress(codec, body, raw_len).map_err(|error| StreamError::Other(error.to_string()))?,
            );
            let entries = Entries::new(&raw, count)?;
            let mut records = Vec::with_capacity(count as usize);
            let mut dones = Vec::new();
            // The clock once per frame, not per record.
            let limit = source_origin.and_then(|_| ahead_limit(context));
            for (glt, payload) in entries.iter().skip(accepted.skip as usize) {
                if let Some(expected) = source_origin.filter(|_| !install) {
                    if payload.is_empty() && glt == 0 {
                        continue; // another region's record, in the source's WAL: not carried here
                    }
                    if clock::origin_of(glt) != expected {
                        return Err(StreamError::Other(format!(
                            "region {region} shipped a record stamped by origin {}, not its own {expected}: the \
                             nodes disagree on [replication] origins or multi_master",
                            clock::origin_of(glt)
                        )));
                    }
                    // A stamp far ahead of this clock would hold every local write back until
                    // the clock reaches it (later stamps must exceed it).
                    check_ahead(glt, limit, "record")?;
                }
                let payload = raw.slice_ref(payload);
                if install && from_home {
                    let ops =
                        op::decode(&payload).map_err(|error| StreamError::Other(format!("snapshot entry: {error}")))?;
                    let keys = snapshot_keys.get_or_insert_with(HashSet::new);
                    keys.extend(ops.into_iter().map(|op| Bytes::copy_from_slice(&op.key)));
                }
                records.push((glt, payload));
            }
            let record_count = records.len() as u64;
            if !records.is_empty() {
                let (done, wait) = oneshot::channel();
                let apply = Apply { work: Work::Records(records), done };
                side.applies.send(apply).await.map_err(|_| StreamError::Other(format!("shard {shard} stopped")))?;
                dones.push(wait);
            }
            if let Some(horizon) = snapshot_end {
                // The snapshot's end: keys held here and absent from it were deleted and
                // collected at the home; they get a tombstone at its horizon.
                let keys = snapshot_keys.take().unwrap_or_default();
                let (done, wait) = oneshot::channel();
                let apply = Apply { work: Work::SnapshotEnd { horizon, keys }, done };
                side.applies.send(apply).await.map_err(|_| StreamError::Other(format!("shard {shard} stopped")))?;
                dones.push(wait);
            }
            if pending_tx.send((accepted, install, record_count, dones)).is_err() {
                break;
            }
        }
        Ok::<(), StreamError>(())
    };
    tokio::pin!(acker);
    tokio::pin!(reader);
    // Whichever ends first ends the stream: when the reader ends (the source closed it), the
    // acknowledgements still pending are dropped with the acker. The source resends from the
    // last position this node acknowledged, and applying a record twice is a no-op.
    tokio::select! {
        result = &mut acker => result,
        result = &mut reader => {
            result?;
            Ok(())
        }
    }
}

/// How far a shipped stamp may be ahead of this node's clock (`latest`): a sender stamps at
/// most at its own interval's `latest`, so by more than its interval's width only when a
/// clock is wrong.
const AHEAD_US_MAX: u64 = 500_000;

/// The latest physical time (µs) a shipped stamp may have now: [`AHEAD_US_MAX`] past this
/// node's clock; `None` while the clock cannot say.
fn ahead_limit(context: &Context) -> Option<u64> {
    context.clock.interval().ok().map(|interval| interval.latest_us.saturating_add(AHEAD_US_MAX))
}

/// Refuses a timestamp past `limit` ([`ahead_limit`]): a snapshot's horizon from the future
/// would have every key here tombstoned, and a multi-master record's stamp would hold back
/// every local write until the clock caught up. The stream fails and retries.
fn check_ahead(ts: u64, limit: Option<u64>, what: &str) -> Result<(), StreamError> {
    match limit {
        Some(limit) if clock::physical_us(ts) > limit => Err(StreamError::Other(format!(
            "{what} {ts} is more than {AHEAD_US_MAX} µs ahead of this node's clock: refused (are the regions' \
             clocks synchronised?)"
        ))),
        _ => Ok(()),
    }
}

/// A replica shard's resume position from one source region.
struct Position {
    /// The shard's directory, where the position file is.
    dir: std::path::PathBuf,
    /// The position in memory, and when it was last written out.
    current: Mutex<(u64, Instant)>,
    /// The position last written to the file, held while the file is written (streams write
    /// from blocking threads, the final flush from the runtime's), so no two writes share the
    /// temporary file and a stale write never follows a newer one.
    written: Mutex<u64>,
}

impl Position {
    fn lsn(&self) -> u64 {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).0
    }

    /// Records the stream's new position; the position to write out when the last write is
    /// [`POSITION_WRITE_INTERVAL`] old.
    fn advance(&self, next_lsn: u64) -> Option<u64> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.0 = current.0.max(next_lsn);
        (current.1.elapsed() >= POSITION_WRITE_INTERVAL).then(|| {
            current.1 = Instant::now();
            current.0
        })
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

/// How often a stream writes its position out.
const POSITION_WRITE_INTERVAL: Duration = Duration::from_millis(200);

fn flush_positions(context: &Context) {
    for ((region, shard), position) in &context.positions {
        if let Err(error) = position.store(region, position.lsn()) {
            tracing::error!(shard, %error, "cannot write the replication position");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::checkpoint;
    use crate::store::op::{ChunkList, ChunkRef};
    use crate::store::versions::Version;
    use crate::wal::format::SECTOR_BYTES;

    /// A chunk file for `data` under `dir/chunks`, as the chunk store writes it.
    fn chunk_file(dir: &std::path::Path, data: &[u8]) -> ChunkRef {
        let hash = *blake3::hash(data).as_bytes();
        let mut file = vec![0u8; SECTOR_BYTES + data.len().div_ceil(SECTOR_BYTES) * SECTOR_BYTES];
        crate::store::chunks::encode_header(&hash, data, &mut file[..SECTOR_BYTES]).unwrap();
        file[SECTOR_BYTES..SECTOR_BYTES + data.len()].copy_from_slice(data);
        std::fs::create_dir_all(dir.join("chunks")).unwrap();
        std::fs::write(dir.join("chunks").join(crate::store::chunks::file_name(&hash)), file).unwrap();
        ChunkRef { hash, len: u32::try_from(data.len()).unwrap() }
    }

    /// A shipped version: glt, key, value (`None`: a tombstone).
    type Shipped = (u64, Vec<u8>, Option<Vec<u8>>);

    /// Every version the parts carry, how many parts, and the horizon at the end.
    fn shipped(path: &std::path::Path, lsn: u64, side: &ThreadSide) -> Result<(Vec<Shipped>, usize, u64), String> {
        let (tx, mut rx) = mpsc::channel(1024);
        snapshot_parts(path, lsn, side, repl::Codec::Lz4, 600, &tx).map_err(|error| error.to_string())?;
        drop(tx);
        let (mut out, mut parts) = (Vec::new(), 0);
        while let Some(produced) = rx.blocking_recv() {
            let part = match produced.map_err(|error| error.to_string())? {
                Produced::Part(part) => part,
                Produced::Done { horizon } => {
                    assert!(rx.blocking_recv().is_none(), "nothing after the end");
                    return Ok((out, parts, horizon));
                }
            };
            parts += 1;
            let raw = codec::decompress(repl::Codec::Lz4, &part.body, part.raw_len).unwrap();
            for (glt, payload) in Entries::new(&raw, part.count).unwrap().iter() {
                for op in op::decode(&Bytes::copy_from_slice(payload)).unwrap() {
                    let value = match op.body {
                        Body::Inline(value) => Some(value.to_vec()),
                        Body::Tombstone => None,
                        Body::Chunked(_) => panic!("a chunk reference was shipped"),
                    };
                    out.push((glt, op.key.to_vec(), value));
                }
            }
        }
        Err("the parts ended without the end".into())
    }

    /// A checkpoint file of `versions` at `lsn` with `horizon`.
    fn checkpoint_file(dir: &std::path::Path, lsn: u64, horizon: u64, versions: &[(&[u8], Version)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        checkpoint::encode_header(3, lsn, horizon, &mut bytes);
        let mut scratch = Vec::new();
        for (key, version) in versions {
            checkpoint::encode_version(key, version, &mut scratch, &mut bytes).unwrap();
        }
        checkpoint::encode_footer(3, lsn, horizon, versions.len() as u64, &mut bytes);
        std::fs::write(dir.join(checkpoint::file_name(3, lsn)), &bytes).unwrap();
        bytes
    }

    #[test]
    fn a_snapshot_ships_every_version_of_the_checkpoint_with_chunks_inline_and_names_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (_, side) = super::super::shard_link(3, dir.path().to_path_buf(), 1 << 20);
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let (first, second) = big.split_at(40_000);
        let list = ChunkList {
            size: big.len() as u64,
            chunks: vec![chunk_file(dir.path(), first), chunk_file(dir.path(), second)],
        };
        let gone = ChunkList { size: 5, chunks: vec![ChunkRef { hash: [9; 32], len: 5 }] };
        let versions: Vec<(&[u8], Version)> = vec![
            (b"a", Version { ts: 10, body: Body::Inline(Bytes::from_static(b"one")) }),
            (b"a", Version { ts: 20, body: Body::Tombstone }),
            (b"b", Version { ts: 15, body: Body::Chunked(Arc::new(list)) }),
            (b"c", Version { ts: 16, body: Body::Chunked(Arc::new(gone)) }),
        ];
        let lsn = 77;
        let bytes = checkpoint_file(dir.path(), lsn, 12, &versions);
        let path = dir.path().join(checkpoint::file_name(3, lsn));
        assert_eq!(newest_checkpoint(&side).unwrap(), Some((lsn, path.clone())));

        let (got, parts, horizon) = shipped(&path, lsn, &side).unwrap();
        assert_eq!(horizon, 12);
        // The version whose chunk was collected is gone at the home too: not shipped.
        let want = vec![
            (10, b"a".to_vec(), Some(b"one".to_vec())),
            (20, b"a".to_vec(), None),
            (15, b"b".to_vec(), Some(big.clone())),
        ];
        assert_eq!(got, want);
        assert!(parts >= 2, "600-byte parts: the 70 kB value goes in a part of its own");

        // Another LSN than the file's name, a damaged byte, a missing file: named errors.
        assert!(shipped(&path, lsn + 1, &side).unwrap_err().contains("LSN 77"));
        let mut damaged = bytes.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        assert!(shipped(&path, lsn, &side).unwrap_err().contains(&path.display().to_string()));
        std::fs::remove_file(&path).unwrap();
        assert!(shipped(&path, lsn, &side).is_err());
        assert_eq!(newest_checkpoint(&side).unwrap(), None);

        // A checkpoint whose every version is gone ends without a part; the stream's empty
        // last part still decompresses.
        let gone = ChunkList { size: 5, chunks: vec![ChunkRef { hash: [8; 32], len: 5 }] };
        checkpoint_file(dir.path(), 90, 30, &[(b"d", Version { ts: 16, body: Body::Chunked(Arc::new(gone)) })]);
        let path = dir.path().join(checkpoint::file_name(3, 90));
        assert_eq!(shipped(&path, 90, &side).unwrap(), (Vec::new(), 0, 30));
        for codec_ in [repl::Codec::None, repl::Codec::Lz4, repl::Codec::Snappy] {
            assert_eq!(codec::decompress(codec_, &codec::compress(codec_, &[]), 0).unwrap(), Vec::<u8>::new());
        }
    }

    #[test]
    fn the_loopback_ceiling_delivers_every_byte_and_names_a_missing_identity() {
        let dir = tempfile::tempdir().unwrap();
        controlplane::tls::generate(dir.path(), &["a".into(), "b".into()]).unwrap();
        let rate = loopback_ceiling(dir.path(), "a", "b", 1 << 20, 3 << 20).unwrap();
        assert!(rate > 0.0 && rate.is_finite(), "{rate}");
        let error = loopback_ceiling(dir.path(), "a", "nobody", 1 << 20, 1 << 20).unwrap_err();
        assert!(error.contains("nobody"), "{error}");
    }
}
