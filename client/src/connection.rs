//! One pipelined connection to one shard: a writer task drains a bounded queue of frames onto
//! the socket, a reader task matches each response frame to its waiting request by `seq`.
//!
//! The pending table and the connection's liveness are one value ([`State`]) behind one lock, so
//! a request either registers before the connection breaks (and is then failed by the close) or
//! sees it closed; no request can wait on a connection nobody reads any more.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use wire::proto::{ErrorCode, ProtoError, Response};
use wire::{EncodeError, HEADER_BYTES, RecordType};

use crate::client::{ClientConfig, Entry};
use crate::error::ClientError;

/// Socket read buffer: many small responses per `read` syscall; large values bypass it.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Socket write buffer: pipelined small requests leave in one `write`.
const WRITE_BUFFER_BYTES: usize = 64 << 10;

/// Writes a request body into the frame buffer. Must be callable again for a retry.
pub(crate) type Encode<'a> = dyn Fn(&mut Vec<u8>) -> Result<(), ClientError> + Sync + 'a;

/// A response, owned: decoded by the reader task and handed to the waiting request.
#[derive(Debug)]
pub(crate) enum Reply {
    /// The node's shard map.
    Hello { shard: u32, addresses: Vec<String> },
    /// A write is durable.
    Written { ts: u64 },
    /// A value; shares the frame's buffer.
    Value { ts: u64, value: Bytes },
    /// No visible version.
    NotFound,
    /// Metadata of a key.
    Stat { ts: u64, size: u64, chunks: u32, versions: u32 },
    /// A page of one shard's keys; `next` empty when the shard has no more.
    Listing { entries: Vec<Entry>, next: Vec<u8> },
    /// The server refused the request.
    Error { code: ErrorCode, message: String },
    /// The node's replication status.
    Replication(crate::client::ReplicationStatus),
    /// Reads at the asked timestamp are consistent on the node.
    Readable { readable_ts: u64, at_us: u64 },
    /// A version's stored chunks.
    ChunkRefs { ts: u64, size: u64, chunks: Vec<([u8; 32], u32)> },
}

impl Reply {
    /// Decodes a response body, keeping a value as a slice of `payload` rather than a copy.
    fn decode(payload: &Bytes) -> Result<Self, ProtoError> {
        Ok(match Response::decode(payload)? {
            Response::Hello { shard, addresses } => {
                Self::Hello { shard, addresses: addresses.iter().map(str::to_owned).collect() }
            }
            Response::Written { ts } => Self::Written { ts },
            Response::Value { ts, value } => Self::Value { ts, value: payload.slice_ref(value) },
            Response::NotFound => Self::NotFound,
            Response::Stat { ts, size, chunks, versions } => Self::Stat { ts, size, chunks, versions },
            Response::Listing { entries, next } => Self::Listing {
                entries: entries.iter().map(|e| Entry { key: e.key.to_vec(), ts: e.ts, size: e.size }).collect(),
                next: next.to_vec(),
            },
            Response::Error { code, message } => Self::Error { code, message: message.to_owned() },
            Response::Readable { readable_ts, at_us } => Self::Readable { readable_ts, at_us },
            Response::ChunkRefs { ts, size, chunks } => Self::ChunkRefs { ts, size, chunks: chunks.iter().collect() },
            Response::Replication { now_ts, region, sources } => Self::Replication(crate::client::ReplicationStatus {
                now_ts,
                region: region.to_owned(),
                sources: sources
                    .iter()
                    .map(|source| crate::client::SourceStatus {
                        region: source.region.to_owned(),
                        resolved_ts: source.resolved_ts,
                        shards_closed: source.shards_closed,
                        shards: source.shards,
                    })
                    .collect(),
            }),
        })
    }

    /// The response's name, for error messages.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "Hello",
            Self::Written { .. } => "Written",
            Self::Value { .. } => "Value",
            Self::NotFound => "NotFound",
            Self::Stat { .. } => "Stat",
            Self::Listing { .. } => "Listing",
            Self::Error { .. } => "Error",
            Self::Replication(_) => "Replication",
            Self::Readable { .. } => "Readable",
            Self::ChunkRefs { .. } => "ChunkRefs",
        }
    }
}

type Waiter = oneshot::Sender<Result<Reply, ClientError>>;

/// Requests awaiting their response, or why the connection is gone.
#[derive(Debug)]
enum State {
    Open(HashMap<u64, Waiter>),
    Closed(String),
}

/// What the caller side and both tasks of a connection share.
#[derive(Debug)]
struct Shared {
    addr: String,
    state: Mutex<State>,
    /// Flips to `true` once; both tasks stop when it does.
    closed: watch::Sender<bool>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // The lock guards plain map operations that cannot leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lost(&self, reason: &str) -> ClientError {
        ClientError::ConnectionLost { addr: self.addr.clone(), reason: reason.to_owned() }
    }

    fn register(&self, seq: u64) -> Result<oneshot::Receiver<Result<Reply, ClientError>>, ClientError> {
        match &mut *self.state() {
            State::Open(pending) => {
                let (sender, receiver) = oneshot::channel();
                pending.insert(seq, sender);
                Ok(receiver)
            }
            State::Closed(reason) => Err(self.lost(reason)),
        }
    }

    fn forget(&self, seq: u64) {
        if let State::Open(pending) = &mut *self.state() {
            pending.remove(&seq);
        }
    }

    /// Hands a response to its request. A response nobody waits for (the request timed out
    /// or was dropped) is discarded.
    fn complete(&self, seq: u64, result: Result<Reply, ClientError>) {
        let waiter = match &mut *self.state() {
            State::Open(pending) => pending.remove(&seq),
            State::Closed(_) => None,
        };
        if let Some(waiter) = waiter {
            // The receiver may be gone already; then nobody needs the answer.
            let _ = waiter.send(result);
        }
    }

    /// Closes the connection once: fails every pending request and stops both tasks.
    /// Only the first reason is kept: it is the cause, later ones are consequences.
    fn close(&self, reason: &str) {
        let pending = {
            let mut state = self.state();
            match &mut *state {
                State::Open(pending) => {
                    let pending = std::mem::take(pending);
                    *state = State::Closed(reason.to_owned());
                    pending
                }
                State::Closed(_) => HashMap::new(),
            }
        };
        for waiter in pending.into_values() {
            // A waiter whose request was dropped meanwhile needs no answer.
            let _ = waiter.send(Err(self.lost(reason)));
        }
        self.closed.send_replace(true);
    }

    fn is_open(&self) -> bool {
        matches!(*self.state(), State::Open(_))
    }
}

/// A registered request; forgets its table entry when dropped (answered, timed out or cancelled).
struct PendingGuard<'a> {
    shared: &'a Shared,
    seq: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.forget(self.seq);
    }
}

/// A pipelined connection to one shard. Dropping it closes the socket.
#[derive(Debug)]
pub(crate) struct Connection {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Vec<u8>>,
    in_flight: Semaphore,
    next_seq: AtomicU64,
    request_timeout: Duration,
    payload_bytes_max: u32,
}

impl Connection {
    /// Connects to `addr` within the connect timeout and starts the reader and writer tasks.
    pub(crate) async fn open(addr: &str, config: &ClientConfig) -> Result<Self, ClientError> {
        let connect = tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr));
        let stream = match connect.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(ClientError::Connect { addr: addr.to_owned(), source }),
            Err(_) => {
                let source = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {} ms", config.connect_timeout.as_millis()),
                );
                return Err(ClientError::Connect { addr: addr.to_owned(), source });
            }
        };
        // Requests are small and latency bound; they are batched by the writer, not by Nagle.
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let in_flight_max = config.in_flight_max.max(1);
        let (queue, queue_receiver) = mpsc::channel(in_flight_max);
        let shared = Arc::new(Shared {
            addr: addr.to_owned(),
            state: Mutex::new(State::Open(HashMap::new())),
            closed: watch::Sender::new(false),
        });
        tokio::spawn(write_loop(Arc::clone(&shared), write, queue_receiver, in_flight_max));
        tokio::spawn(read_loop(Arc::clone(&shared), read, config.frame_payload_bytes_max));
        Ok(Self {
            shared,
            queue,
            in_flight: Semaphore::new(in_flight_max),
            next_seq: AtomicU64::new(1),
            request_timeout: config.request_timeout,
            payload_bytes_max: config.frame_payload_bytes_max.min(wire::limits::PAYLOAD_BYTES_MAX),
        })
    }

    /// Whether the connection can still take requests.
    pub(crate) fn is_open(&self) -> bool {
        self.shared.is_open()
    }

    /// Sends one request and waits for its response, at most the request timeout.
    /// `body_bytes_hint` sizes the frame buffer.
    pub(crate) async fn request(&self, body_bytes_hint: usize, encode: &Encode<'_>) -> Result<Reply, ClientError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::with_capacity(HEADER_BYTES.saturating_add(body_bytes_hint));
        let mut body = Ok(());
        wire::proto::frame(&mut frame, RecordType::Request, seq, |out| body = encode(out)).map_err(
            |error| match error {
                EncodeError::PayloadTooLarge { len, max } => {
                    ClientError::TooLarge { what: "request", len, max: max as usize }
                }
                EncodeError::BufferTooSmall { .. } => ClientError::Protocol(error.to_string()),
            },
        )?;
        body?;
        let payload_len = frame.len() - HEADER_BYTES;
        if payload_len > self.payload_bytes_max as usize {
            return Err(ClientError::TooLarge {
                what: "request",
                len: payload_len,
                max: self.payload_bytes_max as usize,
            });
        }
        tokio::time::timeout(self.request_timeout, self.exchange(seq, frame)).await.map_err(|_| ClientError::Timeout)?
    }

    async fn exchange(&self, seq: u64, frame: Vec<u8>) -> Result<Reply, ClientError> {
        // The semaphore is never closed; the error arm exists only to avoid an unwrap.
        let _permit = self.in_flight.acquire().await.map_err(|_| self.shared.lost("connection dropped"))?;
        let receiver = self.shared.register(seq)?;
        let _guard = PendingGuard { shared: &self.shared, seq };
        if self.queue.send(frame).await.is_err() {
            return Err(self.shared.lost("writer stopped"));
        }
        match receiver.await {
            Ok(result) => result,
            Err(_) => Err(self.shared.lost("connection dropped")),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.close("connection dropped by the client");
    }
}

async fn write_loop(shared: Arc<Shared>, write: OwnedWriteHalf, mut queue: mpsc::Receiver<Vec<u8>>, batch_max: usize) {
    let mut closed = shared.closed.subscribe();
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, write);
    let result = tokio::select! {
        result = write_frames(&mut writer, &mut queue, batch_max) => result,
        _ = closed.wait_for(|closed| *closed) => return,
    };
    match result {
        Ok(()) => shared.close("connection dropped by the client"),
        Err(error) => shared.close(&format!("write failed: {error}")),
    }
}

/// Writes queued frames, flushing once per burst of at most `batch_max` frames.
async fn write_frames(
    writer: &mut BufWriter<OwnedWriteHalf>,
    queue: &mut mpsc::Receiver<Vec<u8>>,
    batch_max: usize,
) -> std::io::Result<()> {
    while let Some(frame) = queue.recv().await {
        writer.write_all(&frame).await?;
        for _ in 1..batch_max {
            let Ok(frame) = queue.try_recv() else { break };
            writer.write_all(&frame).await?;
        }
        writer.flush().await?;
    }
    Ok(())
}

async fn read_loop(shared: Arc<Shared>, read: OwnedReadHalf, payload_bytes_max: u32) {
    let mut closed = shared.closed.subscribe();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut reader, payload_bytes_max) => frame,
            _ = closed.wait_for(|closed| *closed) => return,
        };
        match frame {
            Ok((seq, payload)) => {
                // The frame passed its checksum, so the stream is still in step: a body that
                // does not decode fails only its own request.
                let reply = Reply::decode(&payload)
                    .map_err(|error| ClientError::Protocol(format!("response to request {seq}: {error}")));
                shared.complete(seq, reply);
            }
            Err(reason) => {
                shared.close(&reason);
                return;
            }
        }
    }
}

/// Reads one response frame: header, payload, then the full check including the CRC.
/// Returns the request id and the payload, or why the stream cannot be read any further.
async fn read_frame(reader: &mut BufReader<OwnedReadHalf>, payload_bytes_max: u32) -> Result<(u64, Bytes), String> {
    let mut header = [0_u8; HEADER_BYTES];
    reader.read_exact(&mut header).await.map_err(|error| match error.kind() {
        std::io::ErrorKind::UnexpectedEof => "server closed the connection".to_owned(),
        _ => format!("read failed: {error}"),
    })?;
    let decoded =
        wire::decode_header(&header, payload_bytes_max).map_err(|error| format!("bad frame header: {error}"))?;
    if decoded.record_type != RecordType::Response {
        return Err(format!("server sent a {:?} record instead of a response", decoded.record_type));
    }
    // Read into spare capacity: a large value is not zeroed first only to be overwritten.
    let total = wire::encoded_len(decoded.payload_len as usize);
    let mut frame = BytesMut::with_capacity(total);
    frame.extend_from_slice(&header);
    while frame.len() < total {
        let wanted = total - frame.len();
        let mut rest = (&mut frame).limit(wanted);
        match reader.read_buf(&mut rest).await {
            Ok(0) => return Err("server closed the connection inside a frame".to_owned()),
            Ok(_) => {}
            Err(error) => return Err(format!("read failed: {error}")),
        }
    }
    let (record, _) = wire::decode(&frame, payload_bytes_max).map_err(|error| format!("bad frame: {error}"))?;
    let seq = record.seq;
    Ok((seq, frame.freeze().slice(HEADER_BYTES..)))
}
