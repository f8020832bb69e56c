//! Shipping: per (peer region, shard homed here) one task keeps a stream to the peer and moves
//! what its [`Shipper`] decides.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use wire::repl::{self, Batch, Frame};

use super::frames::{AbortOnDrop, next_frame, read_frame, stopped, write_frame};
use super::{Context, IDLE_TIMEOUT, RECONNECT_MAX, RECONNECT_MIN, StreamError, remember_connection, transport};
use crate::repl::core::{Sealed, ShipConfig, Shipper, Start, WalExtent, frame_name};
use crate::repl::{Peer, ThreadSide, codec};
use crate::store::op::{self, Body, Value};
use crate::wal::WalCursor;

/// A peer region and the connector that keeps one QUIC connection to it for all its shards'
/// streams.
pub(super) struct PeerLink {
    pub(super) peer: Peer,
    pub(super) connector: platform::quic::Connector,
}

impl PeerLink {
    async fn connect(&self) -> Result<quinn::Connection, StreamError> {
        self.connector.connection(&self.peer.addr.to_string(), self.peer.addr).await.map_err(transport("dialing"))
    }
}

/// Keeps shipping `side`'s shard to `link`'s region: one stream after another, redialing with
/// a growing pause after failures.
pub(super) async fn ship(context: Arc<Context>, link: Arc<PeerLink>, side: ThreadSide) {
    let what = format!("shipping shard {} to {} ({})", side.shard, link.peer.region, link.peer.addr);
    let peer = link.peer.region.as_str();
    let mut last_error = String::new();
    let mut backoff = RECONNECT_MIN;
    loop {
        let began = Instant::now();
        let outcome = ship_stream(&context, &link, &side).await;
        // Whatever the stream pinned goes with it; what it held stays until the next one says.
        if side.holds.unpin(peer).await.is_err() {
            return; // the shard stopped
        }
        match outcome {
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

/// One stream: `Hello`, the peer's `Resume`, a snapshot when the WAL no longer holds the peer's
/// position, then batches and acknowledgements until the stream fails or the node stops.
async fn ship_stream(context: &Context, link: &PeerLink, side: &ThreadSide) -> Result<(), StreamError> {
    let config = &context.config;
    let peer = link.peer.region.as_str();
    let mut points = side.points.clone();
    let closed_interval_ns = u64::try_from(config.closed_interval.as_nanos()).unwrap_or(u64::MAX);
    let ship_config = ShipConfig { window: config.window, closed_interval_ns };
    let mut shipper = Shipper::new(ship_config, *points.borrow_and_update());
    // Until the peer says where it is, the shard keeps its whole WAL for it.
    side.holds.update(peer, shipper.hold(), false).await?;

    let connection = link.connect().await?;
    remember_connection(context, peer, "out", &connection);
    let (mut send, mut recv) = connection.open_bi().await.map_err(transport("opening a stream"))?;
    let shards = u32::try_from(context.shards.len()).unwrap_or(u32::MAX);
    write_frame(&mut send, &Frame::Hello { shard: side.shard, shards, region: &config.region }).await?;
    let answer = next_frame(&mut recv, "Resume").await?;
    let next_lsn = match repl::decode_frame(&answer)?.0 {
        Frame::Resume { next_lsn } => next_lsn,
        Frame::Refuse { reason } => return Err(StreamError::Refused(reason.to_owned())),
        other => return Err(StreamError::Unexpected { expected: "Resume", found: frame_name(&other) }),
    };
    let reader = side.files.wal();
    let file_error = |error| StreamError::File { shard: side.shard, error };
    let wal = WalExtent {
        first_lsn: reader.first_lsn().map_err(|error| StreamError::Wal { shard: side.shard, lsn: next_lsn, error })?,
        checkpoint_lsn: side.files.snapshot_lsn().map_err(file_error)?,
    };
    let from = match shipper.on_resume(next_lsn, wal, context.now_ns())? {
        Start::Batches { from } => {
            side.holds.update(peer, shipper.hold(), false).await?;
            from
        }
        Start::Snapshot { resume_lsn } => {
            // The pin is in the shard before the engine is read; a checkpoint that released
            // the WAL past `resume_lsn` before the pin arrived makes this stream start over
            // (with the newer flush's LSN).
            side.holds.update(peer, shipper.hold(), true).await?;
            let first =
                reader.first_lsn().map_err(|error| StreamError::Wal { shard: side.shard, lsn: resume_lsn, error })?;
            if first.is_none_or(|first| first > resume_lsn) {
                return Err(StreamError::Ended("the snapshot's resume LSN was released before its pin"));
            }
            super::snapshot::send(context, peer, side, &mut send, next_lsn, resume_lsn).await?;
            shipper.on_snapshot_sent(context.now_ns())?
        }
    };
    let point = shipper.point();
    let cursor = reader.cursor(from, point.durable_next_lsn.max(from));
    let acks = spawn_ack_reader(recv);
    Streaming::new(context, peer, side, send, cursor).run(&mut shipper, &mut points, acks).await
}

/// Reads the peer's acknowledgements on a task of its own, so a full window never keeps them
/// from being read; ends the channel with the error that ended the stream.
fn spawn_ack_reader(mut recv: quinn::RecvStream) -> (mpsc::UnboundedReceiver<u64>, AbortOnDrop, AckOutcome) {
    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let frame = read_frame(&mut recv).await?.ok_or(StreamError::Ended("the peer's next Ack"))?;
            match repl::decode_frame(&frame)?.0 {
                Frame::Ack { next_lsn, .. } => {
                    if acks_tx.send(next_lsn).is_err() {
                        return Ok(());
                    }
                }
                Frame::Refuse { reason } => return Err(StreamError::Refused(reason.to_owned())),
                other => return Err(StreamError::Unexpected { expected: "Ack", found: frame_name(&other) }),
            }
        }
    });
    let abort = AbortOnDrop(task.abort_handle());
    (acks_rx, abort, task)
}

type AckOutcome = tokio::task::JoinHandle<Result<(), StreamError>>;

/// The batches of one stream after its start.
struct Streaming<'a> {
    context: &'a Context,
    peer: &'a str,
    side: &'a ThreadSide,
    send: quinn::SendStream,
    cursor: WalCursor,
    /// A batch frame's head, reused.
    head: Vec<u8>,
    /// Bytes a batch's head takes on the wire (the window counts heads and bodies).
    head_bytes: usize,
    metrics: StreamMetrics,
}

struct StreamMetrics {
    window_depth: metrics::Gauge,
    raw_bytes: metrics::Counter,
    wire_bytes: metrics::Counter,
    batches: metrics::Counter,
}

impl<'a> Streaming<'a> {
    fn new(
        context: &'a Context,
        peer: &'a str,
        side: &'a ThreadSide,
        send: quinn::SendStream,
        cursor: WalCursor,
    ) -> Self {
        let labels = [("peer", peer.to_owned())];
        let metrics = StreamMetrics {
            window_depth: metrics::gauge!(
                "meridian_replication_unacked_batches", "peer" => peer.to_owned(), "shard" => side.shard.to_string()
            ),
            raw_bytes: metrics::counter!("meridian_replication_raw_bytes_total", &labels),
            wire_bytes: metrics::counter!("meridian_replication_wire_bytes_total", &labels),
            batches: metrics::counter!("meridian_replication_batches_total", &labels),
        };
        let mut head = Vec::new();
        let empty =
            Batch { shard: 0, first_lsn: 0, count: 0, closed_ts: 0, codec: repl::Codec::None, raw_len: 0, body: &[] };
        let head_bytes = repl::encode_batch_head(&empty, &mut head).map_or(0, |()| head.len());
        Self { context, peer, side, send, cursor, head, head_bytes, metrics }
    }

    async fn run(
        mut self,
        shipper: &mut Shipper,
        points: &mut tokio::sync::watch::Receiver<crate::store::ClosedPoint>,
        (mut acks, _abort, mut ack_outcome): (mpsc::UnboundedReceiver<u64>, AbortOnDrop, AckOutcome),
    ) -> Result<(), StreamError> {
        let mut stop = self.context.stop.clone();
        loop {
            self.send_ready(shipper).await?;
            let now_ns = self.context.now_ns();
            let deadline = shipper
                .deadline_ns(now_ns)
                .map_or(Duration::MAX, |deadline| Duration::from_nanos(deadline.saturating_sub(now_ns)));
            tokio::select! {
                ack = acks.recv() => match ack {
                    Some(next) => {
                        shipper.on_ack(next)?;
                        while let Ok(next) = acks.try_recv() {
                            shipper.on_ack(next)?;
                        }
                        self.side.holds.update(self.peer, shipper.hold(), false).await?;
                        self.metrics.window_depth.set(shipper.unacked_batches() as f64);
                    }
                    None => {
                        return match (&mut ack_outcome).await {
                            Ok(Err(error)) => Err(error),
                            _ => Err(StreamError::Ended("the peer's next Ack")),
                        };
                    }
                },
                changed = points.changed() => {
                    if changed.is_err() {
                        return Ok(()); // the shard stopped
                    }
                    shipper.on_point(*points.borrow_and_update());
                    self.cursor.extend_until(shipper.point().durable_next_lsn);
                }
                () = tokio::time::sleep(deadline) => {}
                () = stopped(&mut stop) => {
                    let _ = self.send.finish();
                    return Ok(());
                }
            }
        }
    }

    /// Sends every batch the window has room for, then a heartbeat if one is due.
    async fn send_ready(&mut self, shipper: &mut Shipper) -> Result<(), StreamError> {
        let codec = self.context.config.codec;
        while let Some(range) = shipper.next_batch() {
            let bytes_max = self.context.config.batch_bytes_max;
            let built = build_batch(&mut self.cursor, self.side, bytes_max, range.end, self.context.config.origin)?;
            let body = Bytes::from(codec::compress(codec, &built.raw));
            let sealed = Sealed {
                first_lsn: built.first_lsn,
                next_lsn: built.first_lsn + u64::from(built.count),
                last_glt: built.last_glt,
            };
            let closed_ts = shipper.seal(sealed, self.head_bytes + body.len(), self.context.now_ns())?;
            let raw_len = raw_len(self.side.shard, built.raw.len())?;
            self.send_batch(built.first_lsn, built.count, closed_ts, raw_len, body).await?;
            self.metrics.raw_bytes.increment(built.raw.len() as u64);
            self.metrics.batches.increment(1);
            self.metrics.window_depth.set(shipper.unacked_batches() as f64);
        }
        let body = Bytes::from(codec::compress(codec, &[]));
        if let Some((first_lsn, closed_ts)) = shipper.heartbeat(self.head_bytes + body.len(), self.context.now_ns()) {
            self.send_batch(first_lsn, 0, closed_ts, 0, body).await?;
        }
        Ok(())
    }

    async fn send_batch(
        &mut self,
        first_lsn: u64,
        count: u32,
        closed_ts: u64,
        raw_len: u32,
        mut body: Bytes,
    ) -> Result<(), StreamError> {
        let codec = self.context.config.codec;
        let batch = Batch { shard: self.side.shard, first_lsn, count, closed_ts, codec, raw_len, body: &body };
        repl::encode_batch_head(&batch, &mut self.head)?;
        self.metrics.wire_bytes.increment((self.head.len() + body.len()) as u64);
        if let Some(every) = self.context.corrupt_every.filter(|_| !body.is_empty())
            && (self.context.batches_sent.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(every)
        {
            let mut damaged = body.to_vec();
            damaged[0] ^= 0x55;
            body = Bytes::from(damaged);
        }
        self.send
            .write_all_chunks(&mut [Bytes::copy_from_slice(&self.head), body])
            .await
            .map_err(transport("sending a batch"))
    }
}

fn raw_len(shard: u32, bytes: usize) -> Result<u32, StreamError> {
    u32::try_from(bytes).map_err(|_| StreamError::TooLarge { shard, what: "a batch", bytes })
}

/// A batch ready to compress.
struct Built {
    first_lsn: u64,
    count: u32,
    raw: Vec<u8>,
    last_glt: Option<u64>,
}

/// The next batch of WAL records from `cursor`, up to `until` and about `bytes_max` raw bytes.
/// With multi-master keyspaces the WAL also holds what other regions shipped here: a record
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
        let lsn = cursor.next_lsn();
        let Some(record) = cursor.next_record().map_err(|error| StreamError::Wal { shard: side.shard, lsn, error })?
        else {
            break;
        };
        if origin.is_some_and(|origin| wire::glt::origin_of(record.glt) != origin) {
            repl::encode_entry(0, &[], &mut built.raw);
            built.count += 1;
            continue;
        }
        let inlined = inline_chunks(&record.payload, side, lsn)?;
        repl::encode_entry(record.glt, inlined.as_deref().unwrap_or(&record.payload), &mut built.raw);
        built.count += 1;
        built.last_glt = Some(record.glt);
    }
    Ok(built)
}

/// The payload with every chunked value read from its chunk files and put inline (`None` when
/// the record has none). A chunk collected since (its version expired) drops that operation:
/// the version it belonged to is gone at the home too.
fn inline_chunks(payload: &Bytes, side: &ThreadSide, lsn: u64) -> Result<Option<Vec<u8>>, StreamError> {
    let ops = op::decode(payload).map_err(|error| StreamError::Record { shard: side.shard, lsn, error })?;
    if !ops.iter().any(|op| matches!(op.body, Body::Chunked(_))) {
        return Ok(None);
    }
    let mut values = Vec::with_capacity(ops.len());
    for op in &ops {
        let value = match &op.body {
            Body::Chunked(list) => {
                side.files.read_chunked(list).map_err(|error| StreamError::File { shard: side.shard, error })?
            }
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
    op::encode(kept.into_iter(), &mut out).map_err(|error| StreamError::Record { shard: side.shard, lsn, error })?;
    Ok(Some(out))
}
