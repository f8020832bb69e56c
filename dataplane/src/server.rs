//! The client endpoint of a shard: a TCP listener speaking `wire::proto`, with requests
//! pipelined per connection and answered as they complete.
//!
//! Each shard listens on its own port and serves only the keys it owns (`shard_for`); a key
//! sent to another shard is answered with `WrongShard`. `Hello` tells a client every shard's
//! address. Limits: frame payload bytes, requests in flight per connection (over the limit a
//! request is answered `TooManyInFlight` at once) and connections per shard. A malformed
//! frame is answered with `BadRequest` and the connection closed, since the byte stream can
//! no longer be trusted; a well-framed request with an unknown op gets `UnknownRequest` and the
//! connection stays up.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_lite::io::BufReader;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use wire::RecordType;
use wire::proto::{self, ErrorCode, ListEntry, Request};

use crate::readiness::{Readiness, SocketReader};
use crate::store::{ShardStore, StoreError};
use crate::wal::WalError;

/// Limits of the client endpoint.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Largest frame payload accepted.
    pub frame_payload_bytes_max: u32,
    /// Requests in flight on one connection.
    pub inflight_per_connection: usize,
    /// Open connections per shard.
    pub connections_max: usize,
    /// Most entries one `List` returns.
    pub list_limit_max: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            frame_payload_bytes_max: wire::limits::PAYLOAD_BYTES_MAX,
            inflight_per_connection: crate::limits::INFLIGHT_PER_CONNECTION_DEFAULT,
            connections_max: crate::limits::CONNECTIONS_MAX_DEFAULT,
            list_limit_max: crate::limits::LIST_LIMIT_MAX,
        }
    }
}

/// What every shard's endpoint shares: the node's shard map (and its replication status).
#[derive(Debug, Clone, Default)]
pub struct ShardMap {
    addresses: Arc<RwLock<Vec<String>>>,
    replication: Option<Arc<crate::repl::Resolved>>,
    /// What `WaitReadable` waits on: the replication table, or the local shards' applied
    /// points on a node that does not replicate.
    readable: Option<Arc<crate::repl::Resolved>>,
}

impl ShardMap {
    /// A map of `shard_count` shards, addresses unknown yet.
    pub fn new(shard_count: usize) -> Self {
        Self { addresses: Arc::new(RwLock::new(vec![String::new(); shard_count])), replication: None, readable: None }
    }

    /// The table `WaitReadable` answers from (see [`ShardMap::with_readable`]).
    pub fn readable(&self) -> Option<Arc<crate::repl::Resolved>> {
        self.readable.clone()
    }

    /// Answers `WaitReadable` from `table` (a node that does not replicate: its own shards'
    /// applied points).
    pub fn with_readable(mut self, table: Arc<crate::repl::Resolved>) -> Self {
        self.readable = Some(table);
        self
    }

    /// Answers `Replication` requests from `resolved`.
    pub fn with_replication(mut self, resolved: Arc<crate::repl::Resolved>) -> Self {
        self.readable = Some(resolved.clone());
        self.replication = Some(resolved);
        self
    }

    /// Records a shard's address; returns whether every shard has one now.
    pub fn set(&self, shard_id: u32, address: SocketAddr) -> bool {
        let mut addresses = self.addresses.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(slot) = addresses.get_mut(shard_id as usize) {
            *slot = address.to_string();
        }
        addresses.iter().all(|address| !address.is_empty())
    }

    /// Every shard's address, by shard id.
    pub fn addresses(&self) -> Vec<String> {
        self.addresses.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// The endpoint's series on the process's metrics recorder, labelled by shard.
struct EndpointMetrics {
    write_ack: metrics::Histogram,
    read: metrics::Histogram,
    requests: metrics::Counter,
    refused: metrics::Counter,
    in_flight: metrics::Gauge,
    connections: metrics::Gauge,
    accepted: metrics::Counter,
}

impl EndpointMetrics {
    fn new(shard_id: u32) -> Self {
        let shard = shard_id.to_string();
        Self {
            write_ack: metrics::histogram!("meridian_write_ack_seconds", "shard" => shard.clone()),
            read: metrics::histogram!("meridian_read_seconds", "shard" => shard.clone()),
            requests: metrics::counter!("meridian_requests_total", "shard" => shard.clone()),
            refused: metrics::counter!("meridian_requests_refused_total", "shard" => shard.clone()),
            in_flight: metrics::gauge!("meridian_requests_in_flight", "shard" => shard.clone()),
            connections: metrics::gauge!("meridian_connections_open", "shard" => shard.clone()),
            accepted: metrics::counter!("meridian_connections_accepted_total", "shard" => shard),
        }
    }
}

struct Endpoint {
    shard_id: u32,
    shard_count: u32,
    /// The shard's copy in its replica set, when the node runs them: writes go through it.
    copy: Option<crate::replica::ShardCopy>,
    store: ShardStore,
    limits: ServerLimits,
    map: ShardMap,
    /// Connections counted against `connections_max`.
    open_connections: Cell<usize>,
    /// Every connection task still running (reading, answering or flushing).
    live_connections: Cell<usize>,
    /// Requests received and not yet answered, over all connections.
    requests_in_flight: Cell<usize>,
    /// Set once the shard stops: connections read no further requests.
    stopping: Cell<bool>,
    /// One waker per connection waiting between requests, replaced at each poll (a list that
    /// grew with every poll would overflow glommio's 16-bit task reference count).
    stop_wakers: RefCell<HashMap<u64, Waker>>,
    next_connection_id: Cell<u64>,
    /// The epoll set the connections are read through (`None`: glommio reads them).
    readiness: Option<Rc<Readiness>>,
    metrics: EndpointMetrics,
}

/// Waits for the endpoint's stop, keeping one waker in the connection's slot.
struct StopWait<'a> {
    endpoint: &'a Endpoint,
    connection: u64,
}

impl std::future::Future for StopWait<'_> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if self.endpoint.stopping.get() {
            return Poll::Ready(());
        }
        let mut wakers = self.endpoint.stop_wakers.borrow_mut();
        if !wakers.get(&self.connection).is_some_and(|known| known.will_wake(context.waker())) {
            wakers.insert(self.connection, context.waker().clone());
        }
        Poll::Pending
    }
}

/// Frees a connection's stop slot when its reader ends.
struct StopSlot<'a> {
    endpoint: &'a Endpoint,
    connection: u64,
}

impl Drop for StopSlot<'_> {
    fn drop(&mut self) {
        self.endpoint.stop_wakers.borrow_mut().remove(&self.connection);
    }
}

/// Response bytes of one connection waiting to be written, past which its reader stops
/// reading requests until the client takes them.
const PENDING_RESPONSE_BYTES_MAX: usize = 1 << 20;

/// Read buffer of one connection.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// The response side of one connection. A request's task appends its response frame and, when
/// no write is running, writes it itself together with whatever others append meanwhile: the
/// common case (one response ready, socket writable) costs one `send` and no other task. While
/// a write waits for the socket, responses gather and go out in one write after it.
struct Outbox<W> {
    /// Frames not yet handed to the socket.
    pending: RefCell<Vec<u8>>,
    /// The write half; `None` while a write runs (it holds it) or once closed.
    writer: RefCell<Option<W>>,
    /// A write failed: the connection is broken and later frames are dropped.
    failed: Cell<bool>,
    /// Request tasks running (counted against `inflight_per_connection`).
    handlers: Cell<usize>,
    /// The connection's own task, waiting for the backlog to shrink or for the end.
    waiter: RefCell<Option<Waker>>,
}

impl<W: futures_lite::AsyncWrite + Unpin> Outbox<W> {
    fn new(writer: W) -> Self {
        Self {
            pending: RefCell::default(),
            writer: RefCell::new(Some(writer)),
            failed: Cell::new(false),
            handlers: Cell::new(0),
            waiter: RefCell::default(),
        }
    }

    fn failed(&self) -> bool {
        self.failed.get()
    }

    /// Queues `frame` and writes the queue unless a write is already running (which then
    /// writes it too). Returns once the frame is written or handed to that write.
    async fn send(&self, frame: &[u8]) {
        if self.failed.get() {
            return;
        }
        self.pending.borrow_mut().extend_from_slice(frame);
        let Some(mut writer) = self.writer.borrow_mut().take() else { return };
        let mut batch = Vec::new();
        loop {
            std::mem::swap(&mut *self.pending.borrow_mut(), &mut batch);
            if batch.is_empty() {
                break;
            }
            let written = writer.write_all(&batch).await;
            batch.clear();
            if written.is_err() {
                // The writer goes back (its descriptor may still be read) and writes no more.
                self.failed.set(true);
                self.pending.borrow_mut().clear();
                *self.writer.borrow_mut() = Some(writer);
                self.wake_waiter();
                return;
            }
            self.wake_waiter();
        }
        // The spare buffer keeps its capacity for the next write.
        std::mem::swap(&mut *self.pending.borrow_mut(), &mut batch);
        *self.writer.borrow_mut() = Some(writer);
        self.wake_waiter();
    }

    /// A request task answered.
    fn handler_done(&self) {
        self.handlers.set(self.handlers.get() - 1);
        if self.handlers.get() == 0 {
            self.wake_waiter();
        }
    }

    fn wake_waiter(&self) {
        if let Some(waker) = self.waiter.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Waits until `ready` holds, woken by the writes and the request tasks.
    async fn wait_until(&self, ready: impl Fn(&Self) -> bool) {
        std::future::poll_fn(|context| {
            if ready(self) {
                return Poll::Ready(());
            }
            *self.waiter.borrow_mut() = Some(context.waker().clone());
            Poll::Pending
        })
        .await;
    }

    /// Waits while more than `max` bytes wait to be written.
    async fn drained(&self, max: usize) {
        self.wait_until(|outbox| outbox.failed.get() || outbox.pending.borrow().len() <= max).await;
    }

    /// Waits until every request task has answered and its response is written, then closes
    /// the write half.
    async fn close(&self) {
        let done =
            |outbox: &Self| outbox.failed.get() || (outbox.handlers.get() == 0 && outbox.writer.borrow().is_some());
        self.wait_until(done).await;
        let writer = self.writer.borrow_mut().take();
        if let Some(mut writer) = writer {
            let _ = writer.close().await;
        }
    }
}

/// How long a stopping shard waits for its connections to answer what they received.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How often a `WaitReadable` request checks the node's readable timestamp.
const READABLE_POLL: Duration = Duration::from_millis(1);

/// The longest a `WaitReadable` request waits, whatever it asks.
const READABLE_WAIT_MAX: Duration = Duration::from_secs(60);

/// Serves clients on `listener` until `stop` resolves. Then it stops accepting, stops
/// reading new requests, and waits (up to [`DRAIN_TIMEOUT`]) until every request already
/// received is answered and flushed, so the store can close after the last write.
pub async fn serve(
    listener: TcpListener,
    store: ShardStore,
    copy: Option<crate::replica::ShardCopy>,
    shard_count: u32,
    map: ShardMap,
    limits: ServerLimits,
    stop: impl std::future::Future<Output = ()>,
) {
    let shard_id = store.config().shard_id;
    let readiness = match Readiness::new() {
        Ok(readiness) => Some(Rc::new(readiness)),
        Err(error) => {
            tracing::warn!(shard = shard_id, %error, "no epoll set; connections are read through glommio");
            None
        }
    };
    let driver = readiness.clone().map(|readiness| {
        glommio::spawn_local(async move {
            if let Err(error) = readiness.drive().await {
                tracing::error!(shard = shard_id, %error, "waiting on the connections' epoll set failed");
            }
        })
    });
    let endpoint = Rc::new(Endpoint {
        shard_id,
        shard_count,
        copy,
        store,
        limits,
        map,
        open_connections: Cell::new(0),
        live_connections: Cell::new(0),
        requests_in_flight: Cell::new(0),
        stopping: Cell::new(false),
        stop_wakers: RefCell::default(),
        next_connection_id: Cell::new(0),
        readiness,
        metrics: EndpointMetrics::new(shard_id),
    });
    let accept = async {
        loop {
            let Ok(stream) = listener.accept().await else { continue };
            // Counted before the task runs, so a stop in the same poll still waits for it.
            endpoint.live_connections.set(endpoint.live_connections.get() + 1);
            endpoint.metrics.connections.set(endpoint.live_connections.get() as f64);
            let endpoint = Rc::clone(&endpoint);
            glommio::spawn_local(async move { endpoint.connection(stream).await }).detach();
        }
    };
    futures_lite::future::or(accept, stop).await;
    drop(listener);
    endpoint.stopping.set(true);
    let wakers: Vec<Waker> = endpoint.stop_wakers.borrow_mut().drain().map(|(_, waker)| waker).collect();
    for waker in wakers {
        waker.wake();
    }
    let started = std::time::Instant::now();
    while endpoint.live_connections.get() > 0 && started.elapsed() < DRAIN_TIMEOUT {
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
    }
    if endpoint.live_connections.get() > 0 {
        tracing::warn!(
            shard = shard_id,
            connections = endpoint.live_connections.get(),
            requests = endpoint.requests_in_flight.get(),
            "connections still busy after the drain timeout; closing anyway"
        );
    }
    drop(driver);
}

impl Endpoint {
    async fn connection(self: Rc<Self>, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        self.metrics.accepted.increment(1);
        let fd = stream.as_raw_fd();
        let registered = self.readiness.as_ref().and_then(|readiness| match readiness.register(fd) {
            Ok(token) => Some((Rc::clone(readiness), token)),
            Err(error) => {
                tracing::warn!(shard = self.shard_id, %error, "epoll refused a connection; it is read through glommio");
                None
            }
        });
        if let Some((readiness, token)) = registered {
            // The outbox holds the stream, so the descriptor stays open while it is read.
            let outbox = Rc::new(Outbox::new(stream));
            let mut reader =
                BufReader::with_capacity(READ_BUFFER_BYTES, SocketReader::new(Rc::clone(&readiness), token, fd));
            self.converse(&mut reader, &outbox).await;
            readiness.deregister(token, fd);
            outbox.close().await;
        } else {
            let (reader, writer) = futures_lite::io::split(stream);
            let outbox = Rc::new(Outbox::new(writer));
            self.converse(&mut BufReader::with_capacity(READ_BUFFER_BYTES, reader), &outbox).await;
            outbox.close().await;
        }
        self.live_connections.set(self.live_connections.get() - 1);
        self.metrics.connections.set(self.live_connections.get() as f64);
    }

    /// Reads and answers requests until the client or the shard ends the conversation (or
    /// refuses the connection over `connections_max`). Every request received is answered and
    /// written by the time `outbox.close()` returns.
    async fn converse<W: futures_lite::AsyncWrite + Unpin + 'static>(
        self: &Rc<Self>,
        reader: &mut (impl futures_lite::AsyncRead + Unpin),
        outbox: &Rc<Outbox<W>>,
    ) {
        if self.open_connections.get() >= self.limits.connections_max {
            let message = format!("shard {} serves at most {} connections", self.shard_id, self.limits.connections_max);
            self.refuse(outbox, 0, ErrorCode::Unavailable, &message).await;
        } else {
            self.open_connections.set(self.open_connections.get() + 1);
            self.read_requests(reader, outbox).await;
            self.open_connections.set(self.open_connections.get() - 1);
        }
    }

    /// Resolves once the shard stops; `connection` names the waiter's slot.
    fn stopped(&self, connection: u64) -> StopWait<'_> {
        StopWait { endpoint: self, connection }
    }

    /// Reads frames until EOF or a malformed frame; each request runs in its own task.
    async fn read_requests<W: futures_lite::AsyncWrite + Unpin + 'static>(
        self: &Rc<Self>,
        reader: &mut (impl futures_lite::AsyncRead + Unpin),
        outbox: &Rc<Outbox<W>>,
    ) {
        let mut header = [0u8; wire::HEADER_BYTES];
        let connection = self.next_connection_id.get();
        self.next_connection_id.set(connection + 1);
        let _slot = StopSlot { endpoint: self, connection };
        loop {
            // A client that does not read its responses is not read from either.
            outbox.drained(PENDING_RESPONSE_BYTES_MAX).await;
            // Between requests a stop ends the connection (also when more requests are already
            // buffered); a request being read is finished.
            if self.stopping.get() || outbox.failed() {
                return;
            }
            let stop = async {
                self.stopped(connection).await;
                None
            };
            let next = futures_lite::future::or(stop, async { Some(reader.read_exact(&mut header).await) });
            match next.await {
                Some(Ok(())) => {}
                Some(Err(_)) | None => return,
            }
            let seq = u64::from_le_bytes(header[24..32].try_into().unwrap_or_default());
            let parsed = match wire::decode_header(&header, self.limits.frame_payload_bytes_max) {
                Ok(parsed) => parsed,
                Err(wire::DecodeError::PayloadTooLarge { len, max }) => {
                    let message = format!("frame payload of {len} bytes exceeds the limit of {max}");
                    return self.refuse(outbox, seq, ErrorCode::FrameTooLarge, &message).await;
                }
                Err(error) => return self.refuse(outbox, seq, ErrorCode::BadRequest, &error.to_string()).await,
            };
            let mut frame = vec![0u8; wire::HEADER_BYTES + parsed.payload_len as usize];
            frame[..wire::HEADER_BYTES].copy_from_slice(&header);
            if reader.read_exact(&mut frame[wire::HEADER_BYTES..]).await.is_err() {
                // The client went away mid-request: nothing of it was applied.
                return;
            }
            if let Err(error) = wire::decode(&frame, self.limits.frame_payload_bytes_max) {
                return self.refuse(outbox, seq, ErrorCode::BadRequest, &error.to_string()).await;
            }
            if parsed.record_type != RecordType::Request {
                let message = format!("expected a request frame, got {:?}", parsed.record_type);
                return self.refuse(outbox, seq, ErrorCode::BadRequest, &message).await;
            }
            if outbox.handlers.get() >= self.limits.inflight_per_connection {
                let message = format!("more than {} requests in flight", self.limits.inflight_per_connection);
                self.refuse(outbox, seq, ErrorCode::TooManyInFlight, &message).await;
                continue;
            }
            outbox.handlers.set(outbox.handlers.get() + 1);
            self.requests_in_flight.set(self.requests_in_flight.get() + 1);
            self.metrics.in_flight.set(self.requests_in_flight.get() as f64);
            let endpoint = Rc::clone(self);
            let outbox = Rc::clone(outbox);
            glommio::spawn_local(async move {
                let mut out = Vec::new();
                endpoint.handle(seq, &frame[wire::HEADER_BYTES..], &mut out).await;
                endpoint.metrics.requests.increment(1);
                endpoint.requests_in_flight.set(endpoint.requests_in_flight.get() - 1);
                endpoint.metrics.in_flight.set(endpoint.requests_in_flight.get() as f64);
                outbox.send(&out).await;
                outbox.handler_done();
            })
            .detach();
        }
    }

    async fn refuse<W: futures_lite::AsyncWrite + Unpin>(
        &self,
        outbox: &Outbox<W>,
        seq: u64,
        code: ErrorCode,
        message: &str,
    ) {
        self.metrics.refused.increment(1);
        let mut out = Vec::new();
        respond_error(&mut out, seq, code, message);
        outbox.send(&out).await;
    }

    fn check_owner(&self, key: &[u8]) -> Result<(), (ErrorCode, String)> {
        let owner = wire::shard_for(key, self.shard_count);
        if owner == self.shard_id {
            Ok(())
        } else {
            Err((ErrorCode::WrongShard, format!("key belongs to shard {owner}, this is shard {}", self.shard_id)))
        }
    }

    /// Runs one request and writes its response frame into `out`.
    async fn handle(&self, seq: u64, body: &[u8], out: &mut Vec<u8>) {
        let request = match Request::decode(body) {
            Ok(request) => request,
            Err(proto::ProtoError::UnknownRequest { op }) => {
                self.metrics.refused.increment(1);
                return respond_error(out, seq, ErrorCode::UnknownRequest, &format!("unknown request op {op}"));
            }
            Err(error) => {
                self.metrics.refused.increment(1);
                return respond_error(out, seq, ErrorCode::BadRequest, &error.to_string());
            }
        };
        let started = std::time::Instant::now();
        let write = matches!(request, Request::Put { .. } | Request::Delete { .. } | Request::BatchPut { .. });
        let read = matches!(
            request,
            Request::Get { .. }
                | Request::GetRange { .. }
                | Request::ChunkRefs { .. }
                | Request::Stat { .. }
                | Request::List { .. }
        );
        if let Some(not_held) = self.store.config().not_held.as_ref().filter(|_| read || write) {
            self.metrics.refused.increment(1);
            return respond_error(out, seq, ErrorCode::NotHome, not_held);
        }
        if let Err((code, message)) = self.run(seq, request, out).await {
            respond_error(out, seq, code, &message);
        }
        if write {
            self.metrics.write_ack.record(started.elapsed().as_secs_f64());
        } else if read {
            self.metrics.read.record(started.elapsed().as_secs_f64());
        }
    }

    /// Waits until this node's readable timestamp reaches `ts` (every home shard applied and
    /// every source region resolved at or past it), checking every `READABLE_POLL`; answers the
    /// readable timestamp and the unix µs when it was seen, or `Unavailable` after `timeout_ms`
    /// (at most `READABLE_WAIT_MAX`) or when the shard stops.
    async fn wait_readable(&self, ts: u64, timeout_ms: u32) -> Result<(u64, u64), (ErrorCode, String)> {
        let Some(resolved) = &self.map.readable else {
            return Err((ErrorCode::Unavailable, "this node tracks no readable timestamp".into()));
        };
        let timeout = Duration::from_millis(u64::from(timeout_ms)).min(READABLE_WAIT_MAX);
        let started = std::time::Instant::now();
        loop {
            let readable_ts = resolved.readable_ts();
            if readable_ts >= ts {
                let at_us = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| u64::try_from(since.as_micros()).unwrap_or(u64::MAX));
                return Ok((readable_ts, at_us));
            }
            if started.elapsed() >= timeout || self.stopping.get() {
                return Err((
                    ErrorCode::Unavailable,
                    format!(
                        "not readable at {ts} within {} ms: this node is readable up to {readable_ts}",
                        timeout.as_millis()
                    ),
                ));
            }
            glommio::timer::sleep(READABLE_POLL).await;
        }
    }

    async fn run(&self, seq: u64, request: Request<'_>, out: &mut Vec<u8>) -> Result<(), (ErrorCode, String)> {
        match request {
            Request::Hello => {
                let addresses = self.map.addresses();
                respond(out, seq, &|out| proto::encode_hello(self.shard_id, addresses.iter().map(String::as_str), out));
            }
            Request::Replication => self.replication_status(seq, out)?,
            Request::WaitReadable { ts, timeout_ms } => {
                let (readable_ts, at_us) = self.wait_readable(ts, timeout_ms).await?;
                respond(out, seq, &|out| proto::encode_readable(readable_ts, at_us, out));
            }
            Request::Put { .. } | Request::Delete { .. } | Request::BatchPut { .. } => {
                self.run_write(seq, request, out).await?;
            }
            read => self.run_read(seq, read, out).await?,
        }
        Ok(())
    }

    /// The replication status: per source region, its resolved timestamp, against this node's
    /// clock.
    fn replication_status(&self, seq: u64, out: &mut Vec<u8>) -> Result<(), (ErrorCode, String)> {
        let Some(resolved) = &self.map.replication else {
            return Err((ErrorCode::Unavailable, "this node has no [replication] section".into()));
        };
        let interval = self.store.config().clock.interval().map_err(|error| map_error(error.into()))?;
        let now_ts = crate::store::clock::timestamp_at(interval.earliest_us());
        let sources = resolved.sources();
        let statuses: Vec<proto::SourceStatus<'_>> = sources
            .iter()
            .map(|source| proto::SourceStatus {
                region: &source.region,
                resolved_ts: source.resolved_ts,
                shards_closed: source.shards_closed,
                shards: source.shards,
            })
            .collect();
        respond(out, seq, &|out| proto::encode_replication(now_ts, resolved.region(), &statuses, out));
        Ok(())
    }

    /// A put, delete or batch put: answered with the version's timestamp once durable.
    async fn run_write(&self, seq: u64, request: Request<'_>, out: &mut Vec<u8>) -> Result<(), (ErrorCode, String)> {
        if let Some(copy) = &self.copy {
            return self.run_set_write(copy, seq, request, out).await;
        }
        let store = &self.store;
        let ts = match request {
            Request::Put { key, value } => {
                self.check_owner(key)?;
                store.put(key, value).await
            }
            Request::Delete { key } => {
                self.check_owner(key)?;
                store.delete(key).await
            }
            Request::BatchPut { items } => {
                for (key, _) in items.iter() {
                    self.check_owner(key)?;
                }
                store.write(BatchIter { inner: items.iter(), len: items.len() }).await
            }
            _ => return Err((ErrorCode::BadRequest, "not a write".into())),
        }
        .map_err(map_error)?;
        respond(out, seq, &|out| proto::encode_written(ts, out));
        Ok(())
    }

    /// A write to the shard's replica set: taken by its primary, acknowledged once every
    /// member holds it.
    async fn run_set_write(
        &self,
        copy: &crate::replica::ShardCopy,
        seq: u64,
        request: Request<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), (ErrorCode, String)> {
        let written = match request {
            Request::Put { key, value } => {
                self.check_owner(key)?;
                copy.write(std::iter::once((key, Some(value)))).await
            }
            Request::Delete { key } => {
                self.check_owner(key)?;
                copy.write(std::iter::once((key, None))).await
            }
            Request::BatchPut { items } => {
                for (key, _) in items.iter() {
                    self.check_owner(key)?;
                }
                copy.write(BatchIter { inner: items.iter(), len: items.len() }).await
            }
            _ => return Err((ErrorCode::BadRequest, "not a write".into())),
        };
        let ts = written.map_err(map_copy_error)?;
        respond(out, seq, &|out| proto::encode_written(ts, out));
        Ok(())
    }

    /// A read: get, range, chunk references, stat or listing.
    async fn run_read(&self, seq: u64, request: Request<'_>, out: &mut Vec<u8>) -> Result<(), (ErrorCode, String)> {
        let store = &self.store;
        let value = |out: &mut Vec<u8>, ts: u64, value: &[u8]| {
            respond(out, seq, &|out| {
                out.reserve(value.len() + 9);
                proto::encode_value_head(ts, out);
                out.extend_from_slice(value);
            });
        };
        let not_found = |out: &mut Vec<u8>| respond(out, seq, &proto::encode_not_found);
        match request {
            Request::Get { key, at } => {
                self.check_owner(key)?;
                match store.get(key, at).await.map_err(map_error)? {
                    Some((ts, found)) => value(out, ts, &found),
                    None => not_found(out),
                }
            }
            Request::ChunkRefs { key, at } => {
                self.check_owner(key)?;
                match store.chunk_refs(key, at).await.map_err(map_error)? {
                    Some(found) => {
                        respond(out, seq, &|out| proto::encode_chunk_refs(found.ts, found.size, &found.chunks, out));
                    }
                    None => not_found(out),
                }
            }
            Request::GetRange { key, at, offset, len } => {
                self.check_owner(key)?;
                match store.get_range(key, at, offset, u64::from(len)).await.map_err(map_error)? {
                    Some((ts, found)) => value(out, ts, &found),
                    None => not_found(out),
                }
            }
            Request::Stat { key, at } => {
                self.check_owner(key)?;
                match store.stat(key, at).await.map_err(map_error)? {
                    Some(stat) => respond(out, seq, &|out| {
                        proto::encode_stat(stat.ts, stat.size, stat.chunks, stat.versions, out);
                    }),
                    None => not_found(out),
                }
            }
            Request::List { prefix, start_after, limit, at } => {
                let limit = limit.min(self.limits.list_limit_max) as usize;
                let (items, more) = store.list(prefix, start_after, limit, at).await.map_err(map_error)?;
                let entries: Vec<ListEntry<'_>> =
                    items.iter().map(|item| ListEntry { key: &item.key, ts: item.ts, size: item.size }).collect();
                let next: &[u8] = match (more, items.last()) {
                    (true, Some(last)) => &last.key,
                    _ => &[],
                };
                respond(out, seq, &|out| proto::encode_listing(&entries, next, out));
            }
            _ => return Err((ErrorCode::BadRequest, "not a read".into())),
        }
        Ok(())
    }
}

/// Frames the response to request `seq`, its body written by `body`. Responses are bounded by
/// the value limit, far below the record limit.
fn respond(out: &mut Vec<u8>, seq: u64, body: &dyn Fn(&mut Vec<u8>)) {
    let _ = proto::frame(out, RecordType::Response, seq, |out| body(out));
}

/// The pairs of a batch put as (key, Some(value)).
struct BatchIter<I> {
    inner: I,
    len: usize,
}

impl<'a, I: Iterator<Item = (&'a [u8], &'a [u8])>> Iterator for BatchIter<I> {
    type Item = (&'a [u8], Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        let (key, value) = self.inner.next()?;
        self.len = self.len.saturating_sub(1);
        Some((key, Some(value)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.len, Some(self.len))
    }
}

impl<'a, I: Iterator<Item = (&'a [u8], &'a [u8])>> ExactSizeIterator for BatchIter<I> {}

fn respond_error(out: &mut Vec<u8>, seq: u64, code: ErrorCode, message: &str) {
    let _ = proto::frame(out, RecordType::Response, seq, |out| proto::encode_error(code, message, out));
}

/// A replica set's refusal as the client sees it.
fn map_copy_error(error: crate::replica::CopyError) -> (ErrorCode, String) {
    use crate::replica::{CopyError, WriteError};
    match error {
        CopyError::Refused(WriteError::NotPrimary { primary, epoch }) => (
            ErrorCode::NotPrimary,
            match primary {
                Some(primary) => format!("not the primary; the primary is {primary} (epoch {epoch})"),
                None => format!("not the primary; no primary known (epoch {epoch})"),
            },
        ),
        CopyError::Refused(refusal) => (ErrorCode::Unavailable, refusal.to_string()),
        CopyError::Store(store) => map_error(store),
        stopped @ CopyError::Stopped { .. } => (ErrorCode::Unavailable, stopped.to_string()),
    }
}

/// The client error code for a store error.
pub fn map_error(error: StoreError) -> (ErrorCode, String) {
    let code = match &error {
        StoreError::BadKey { .. } => ErrorCode::KeyTooLarge,
        StoreError::ValueTooLarge { .. } | StoreError::Wal(WalError::RecordTooLarge { .. }) => ErrorCode::ValueTooLarge,
        StoreError::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
        StoreError::TooOld(_) => ErrorCode::SnapshotTooOld,
        StoreError::Chunk(crate::store::ChunkError::Corrupt { .. } | crate::store::ChunkError::Missing { .. }) => {
            ErrorCode::ChunkCorrupt
        }
        StoreError::Wal(_) | StoreError::Clock(_) | StoreError::NotAdmitted { .. } => ErrorCode::Unavailable,
        StoreError::NotHome { .. } => ErrorCode::NotHome,
        StoreError::BadReplica { .. } => ErrorCode::BadRequest,
        StoreError::Chunk(_)
        | StoreError::Config { .. }
        | StoreError::Checkpoint { .. }
        | StoreError::Engine { .. }
        | StoreError::Recovery { .. } => ErrorCode::Internal,
    };
    (code, error.to_string())
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::future::Future;
    use std::pin::{Pin, pin};
    use std::rc::Rc;
    use std::task::{Context, Poll, Waker};

    use super::Outbox;

    /// A socket's write half that records each write, can be made to wait (a full socket) or
    /// to fail (a peer gone).
    #[derive(Default, Clone)]
    struct Socket {
        writes: Rc<RefCell<Vec<Vec<u8>>>>,
        full: Rc<Cell<bool>>,
        broken: Rc<Cell<bool>>,
        closed: Rc<Cell<bool>>,
    }

    impl futures_lite::AsyncWrite for Socket {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            if self.broken.get() {
                return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            if self.full.get() {
                return Poll::Pending;
            }
            self.writes.borrow_mut().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.closed.set(true);
            Poll::Ready(Ok(()))
        }
    }

    fn poll_once<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(Waker::noop()))
    }

    /// A socket and the outbox writing to it.
    fn socket_and_outbox() -> (Socket, Outbox<Socket>) {
        let socket = Socket::default();
        let outbox = Outbox::new(socket.clone());
        (socket, outbox)
    }

    /// Fills `socket` and starts writing "first" through `outbox`: that write waits for it.
    fn stalled_first<'a>(socket: &Socket, outbox: &'a Outbox<Socket>) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        socket.full.set(true);
        let mut first = Box::pin(outbox.send(b"first"));
        assert!(poll_once(first.as_mut()).is_pending(), "the socket is full");
        first
    }

    #[test]
    fn a_ready_response_is_written_by_its_own_task_at_once() {
        let (socket, outbox) = socket_and_outbox();
        assert!(poll_once(pin!(outbox.send(b"one"))).is_ready());
        assert!(poll_once(pin!(outbox.send(b"two"))).is_ready());
        assert_eq!(*socket.writes.borrow(), [b"one".to_vec(), b"two".to_vec()]);
    }

    #[test]
    fn responses_finished_during_a_write_go_out_together_after_it() {
        let (socket, outbox) = socket_and_outbox();
        let mut first = stalled_first(&socket, &outbox);
        // Others hand their responses to the running write and are done.
        assert!(poll_once(pin!(outbox.send(b"second"))).is_ready());
        assert!(poll_once(pin!(outbox.send(b"third"))).is_ready());
        assert!(poll_once(pin!(outbox.drained(16))).is_ready(), "11 bytes wait");
        assert!(poll_once(pin!(outbox.drained(10))).is_pending(), "11 bytes wait");
        socket.full.set(false);
        assert!(poll_once(first.as_mut()).is_ready());
        assert_eq!(*socket.writes.borrow(), [b"first".to_vec(), b"secondthird".to_vec()]);
        assert!(poll_once(pin!(outbox.drained(0))).is_ready());
    }

    #[test]
    fn close_waits_for_every_request_task_and_its_response() {
        let (socket, outbox) = socket_and_outbox();
        outbox.handlers.set(1);
        let mut close = pin!(outbox.close());
        assert!(poll_once(close.as_mut()).is_pending(), "a request task still runs");
        socket.full.set(true);
        let mut answer = pin!(outbox.send(b"answer"));
        assert!(poll_once(answer.as_mut()).is_pending());
        outbox.handler_done();
        assert!(poll_once(close.as_mut()).is_pending(), "its response is not written yet");
        socket.full.set(false);
        assert!(poll_once(answer.as_mut()).is_ready());
        assert!(poll_once(close.as_mut()).is_ready());
        assert_eq!(*socket.writes.borrow(), [b"answer".to_vec()]);
        assert!(socket.closed.get());
    }

    #[test]
    fn a_failed_write_drops_the_backlog_and_marks_the_connection_broken() {
        let (socket, outbox) = socket_and_outbox();
        let mut first = stalled_first(&socket, &outbox);
        assert!(poll_once(pin!(outbox.send(b"second"))).is_ready());
        socket.full.set(false);
        socket.broken.set(true);
        assert!(poll_once(first.as_mut()).is_ready());
        assert!(outbox.failed());
        assert!(outbox.pending.borrow().is_empty(), "nothing is kept for a broken connection");
        assert!(poll_once(pin!(outbox.send(b"later"))).is_ready());
        assert!(outbox.pending.borrow().is_empty());
        assert!(poll_once(pin!(outbox.drained(0))).is_ready(), "the reader is not held up");
        assert!(poll_once(pin!(outbox.close())).is_ready());
        assert!(socket.writes.borrow().is_empty());
    }
}
