//! A fake Meridian cluster for the client's tests: one tokio listener per shard on 127.0.0.1,
//! speaking the wire protocol over an in-memory multi-version `BTreeMap`, with switches to
//! answer out of order, drop connections, refuse requests, stall or corrupt a frame.
#![allow(dead_code, reason = "each test binary uses a different part of the fake")]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wire::RecordType;
use wire::proto::{self, ErrorCode, ListEntry, Request};

/// How long a shard holding responses back waits for more requests before answering anyway.
const HOLD_FLUSH: Duration = Duration::from_millis(100);

/// Versions of one key: (ts, value), `None` for a tombstone, in ts order.
type Versions = Vec<(u64, Option<Vec<u8>>)>;

/// Switches of one fake shard, changed by tests while it runs.
#[derive(Debug, Default)]
pub struct Behavior {
    /// Hold responses until this many are ready, then send them in reverse order.
    pub reverse_groups: AtomicUsize,
    /// For each listed request name, the next such request is applied but not answered and
    /// its connection is closed.
    pub drop_on: Mutex<Vec<&'static str>>,
    /// The next requests are refused with these errors, in order: each entry refuses the next
    /// request of the named kind, or the next request other than `Hello` when unnamed.
    pub errors: Mutex<VecDeque<(Option<&'static str>, ErrorCode, String)>>,
    /// Read requests but never answer.
    pub stall: AtomicBool,
    /// Most entries in one listing page, whatever the client asked (0: no cap).
    pub list_page_max: AtomicU32,
    /// Flip a payload bit of the next response (its checksum no longer matches).
    pub corrupt_next: AtomicBool,
}

/// One fake shard.
#[derive(Debug)]
pub struct FakeShard {
    pub id: u32,
    shard_count: u32,
    addresses: Mutex<Vec<String>>,
    store: Mutex<BTreeMap<Vec<u8>, Versions>>,
    clock: Arc<AtomicU64>,
    pub behavior: Behavior,
    /// Connections accepted.
    pub accepted: AtomicU32,
    /// Requests received, by name.
    requests: Mutex<HashMap<&'static str, u32>>,
    /// Groups of responses sent in reverse order.
    pub reordered_groups: AtomicU32,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("a fake shard task panicked")
}

impl FakeShard {
    /// How many requests named `name` ("Put", "Get", ...) this shard received.
    pub fn requests(&self, name: &str) -> u32 {
        lock(&self.requests).get(name).copied().unwrap_or(0)
    }

    /// Keys with a live latest version.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        lock(&self.store)
            .iter()
            .filter(|(_, versions)| versions.last().is_some_and(|(_, value)| value.is_some()))
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Refuses the next request other than `Hello`.
    pub fn refuse_next(&self, code: ErrorCode, message: &str) {
        lock(&self.behavior.errors).push_back((None, code, message.to_owned()));
    }

    /// Refuses the next request named `request` ("Hello", "Put", ...).
    pub fn refuse_next_of(&self, request: &'static str, code: ErrorCode, message: &str) {
        lock(&self.behavior.errors).push_back((Some(request), code, message.to_owned()));
    }

    pub fn drop_next(&self, request: &'static str) {
        lock(&self.behavior.drop_on).push(request);
    }
}

/// A running fake cluster; its listeners stop when it is dropped.
#[derive(Debug)]
pub struct FakeCluster {
    pub addresses: Vec<String>,
    pub shards: Vec<Arc<FakeShard>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl FakeCluster {
    /// Binds `shard_count` listeners on 127.0.0.1 and serves them on the current runtime.
    pub async fn start(shard_count: u32) -> Self {
        let clock = Arc::new(AtomicU64::new(100));
        let mut listeners = Vec::new();
        let mut addresses = Vec::new();
        for _ in 0..shard_count {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
            addresses.push(listener.local_addr().expect("local address").to_string());
            listeners.push(listener);
        }
        let mut shards = Vec::new();
        let mut tasks = Vec::new();
        for (id, listener) in (0..shard_count).zip(listeners) {
            let shard = Arc::new(FakeShard {
                id,
                shard_count,
                addresses: Mutex::new(addresses.clone()),
                store: Mutex::new(BTreeMap::new()),
                clock: Arc::clone(&clock),
                behavior: Behavior::default(),
                accepted: AtomicU32::new(0),
                requests: Mutex::new(HashMap::new()),
                reordered_groups: AtomicU32::new(0),
            });
            tasks.push(tokio::spawn(accept_loop(Arc::clone(&shard), listener)));
            shards.push(shard);
        }
        Self { addresses, shards, tasks }
    }

    pub fn seed(&self) -> &str {
        &self.addresses[0]
    }

    /// The shard owning `key`.
    pub fn owner(&self, key: &[u8]) -> &FakeShard {
        &self.shards[wire::shard_for(key, u32::try_from(self.shards.len()).expect("few shards")) as usize]
    }
}

async fn accept_loop(shard: Arc<FakeShard>, listener: TcpListener) {
    let mut connections = Vec::new();
    while let Ok((stream, _)) = listener.accept().await {
        shard.accepted.fetch_add(1, Ordering::SeqCst);
        connections.push(AbortOnDrop(tokio::spawn(serve(Arc::clone(&shard), stream))));
    }
}

/// Stops a connection task when the listener task is aborted.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn read_request(stream: &mut OwnedReadHalf) -> Option<(u64, Vec<u8>)> {
    let mut header = [0_u8; wire::HEADER_BYTES];
    stream.read_exact(&mut header).await.ok()?;
    let decoded = wire::decode_header(&header, wire::limits::PAYLOAD_BYTES_MAX).expect("client sent a bad header");
    let mut frame = vec![0_u8; wire::encoded_len(decoded.payload_len as usize)];
    frame[..wire::HEADER_BYTES].copy_from_slice(&header);
    stream.read_exact(&mut frame[wire::HEADER_BYTES..]).await.ok()?;
    let (record, _) = wire::decode(&frame, wire::limits::PAYLOAD_BYTES_MAX).expect("client sent a bad frame");
    assert_eq!(record.record_type, RecordType::Request);
    Some((record.seq, record.payload.to_vec()))
}

/// Reads requests into a channel, so the serving loop can wait for them with a timeout
/// without cutting a frame in half.
async fn read_requests(mut stream: OwnedReadHalf, requests: mpsc::Sender<(u64, Vec<u8>)>) {
    while let Some(request) = read_request(&mut stream).await {
        if requests.send(request).await.is_err() {
            return;
        }
    }
}

async fn serve(shard: Arc<FakeShard>, stream: TcpStream) {
    let (read, mut write) = stream.into_split();
    let (sender, mut requests) = mpsc::channel(1024);
    let _reader = AbortOnDrop(tokio::spawn(read_requests(read, sender)));
    let mut held: Vec<Vec<u8>> = Vec::new();
    loop {
        let next = if held.is_empty() {
            Some(requests.recv().await)
        } else {
            tokio::time::timeout(HOLD_FLUSH, requests.recv()).await.ok()
        };
        let Some(request) = next else {
            // Nothing more came in time: answer what is held.
            if !send_held(&shard, &mut write, &mut held).await {
                return;
            }
            continue;
        };
        let Some((seq, body)) = request else { return };
        let request = Request::decode(&body).expect("client sent a bad body");
        let name = request_name(&request);
        *lock(&shard.requests).entry(name).or_default() += 1;
        let mut response = Vec::new();
        let refusal = {
            let mut errors = lock(&shard.behavior.errors);
            let applies = errors.front().is_some_and(|(only, _, _)| only.map_or(name != "Hello", |only| only == name));
            if applies { errors.pop_front() } else { None }
        };
        match refusal {
            Some((_, code, message)) => proto::encode_error(code, &message, &mut response),
            None => shard.handle(&request, &mut response),
        }
        let drop_now = {
            let mut drop_on = lock(&shard.behavior.drop_on);
            drop_on.iter().position(|entry| *entry == name).map(|index| drop_on.remove(index)).is_some()
        };
        if drop_now {
            return;
        }
        if shard.behavior.stall.load(Ordering::SeqCst) {
            continue;
        }
        let mut frame = Vec::new();
        proto::frame(&mut frame, RecordType::Response, seq, |out| out.extend_from_slice(&response))
            .expect("response fits a frame");
        if shard.behavior.corrupt_next.swap(false, Ordering::SeqCst) {
            let last = frame.len() - 1;
            frame[last] ^= 0x01;
        }
        held.push(frame);
        if held.len() >= shard.behavior.reverse_groups.load(Ordering::SeqCst)
            && !send_held(&shard, &mut write, &mut held).await
        {
            return;
        }
    }
}

/// Sends held responses, last first. False if the client is gone.
async fn send_held(shard: &FakeShard, stream: &mut OwnedWriteHalf, held: &mut Vec<Vec<u8>>) -> bool {
    if held.len() > 1 {
        shard.reordered_groups.fetch_add(1, Ordering::SeqCst);
    }
    while let Some(frame) = held.pop() {
        if stream.write_all(&frame).await.is_err() {
            return false;
        }
    }
    true
}

fn request_name(request: &Request<'_>) -> &'static str {
    match request {
        Request::Hello => "Hello",
        Request::Put { .. } => "Put",
        Request::Get { .. } => "Get",
        Request::Delete { .. } => "Delete",
        Request::List { .. } => "List",
        Request::Stat { .. } => "Stat",
        Request::BatchPut { .. } => "BatchPut",
        Request::Replication => "Replication",
        Request::WaitReadable { .. } => "WaitReadable",
        Request::ChunkRefs { .. } => "ChunkRefs",
        Request::GetRange { .. } => "GetRange",
    }
}

/// The version of `versions` visible at `at`.
fn visible(versions: &Versions, at: Option<u64>) -> Option<(u64, &Vec<u8>)> {
    let (ts, value) = versions.iter().rev().find(|(ts, _)| at.is_none_or(|at| *ts <= at))?;
    value.as_ref().map(|value| (*ts, value))
}

impl FakeShard {
    fn owns(&self, key: &[u8]) -> bool {
        wire::shard_for(key, self.shard_count) == self.id
    }

    fn handle(&self, request: &Request<'_>, out: &mut Vec<u8>) {
        let wrong_shard = match request {
            Request::Put { key, .. }
            | Request::Get { key, .. }
            | Request::Delete { key }
            | Request::Stat { key, .. }
            | Request::ChunkRefs { key, .. }
            | Request::GetRange { key, .. } => !self.owns(key),
            Request::BatchPut { items } => items.iter().any(|(key, _)| !self.owns(key)),
            Request::Hello | Request::List { .. } | Request::Replication | Request::WaitReadable { .. } => false,
        };
        if wrong_shard {
            return proto::encode_error(ErrorCode::WrongShard, &format!("shard {} does not own the key", self.id), out);
        }
        let mut store = lock(&self.store);
        match *request {
            Request::Replication | Request::WaitReadable { .. } => {
                proto::encode_error(ErrorCode::Unavailable, "no replication here", out);
            }
            Request::ChunkRefs { .. } | Request::GetRange { .. } => {
                proto::encode_error(ErrorCode::UnknownRequest, "the fake shard stores no chunks", out);
            }
            Request::Hello => {
                let addresses = lock(&self.addresses);
                proto::encode_hello(self.id, addresses.iter().map(String::as_str), out);
            }
            Request::Put { key, value } => {
                if key.is_empty() {
                    return proto::encode_error(ErrorCode::KeyTooLarge, "empty key", out);
                }
                let ts = self.clock.fetch_add(1, Ordering::SeqCst);
                store.entry(key.to_vec()).or_default().push((ts, Some(value.to_vec())));
                proto::encode_written(ts, out);
            }
            Request::Get { key, at } => match store.get(key).and_then(|versions| visible(versions, at)) {
                Some((ts, value)) => {
                    proto::encode_value_head(ts, out);
                    out.extend_from_slice(value);
                }
                None => proto::encode_not_found(out),
            },
            Request::Delete { key } => {
                if store.get(key).and_then(|versions| visible(versions, None)).is_none() {
                    return proto::encode_not_found(out);
                }
                let ts = self.clock.fetch_add(1, Ordering::SeqCst);
                store.entry(key.to_vec()).or_default().push((ts, None));
                proto::encode_written(ts, out);
            }
            Request::Stat { key, at } => match store.get(key) {
                Some(versions) => match visible(versions, at) {
                    Some((ts, value)) => {
                        let versions = u32::try_from(versions.len()).expect("few versions");
                        proto::encode_stat(ts, value.len() as u64, 0, versions, out);
                    }
                    None => proto::encode_not_found(out),
                },
                None => proto::encode_not_found(out),
            },
            Request::List { prefix, start_after, limit, at } => {
                let cap = match self.behavior.list_page_max.load(Ordering::SeqCst) {
                    0 => limit,
                    cap => cap.min(limit),
                };
                let mut matching = store
                    .range::<[u8], _>((std::ops::Bound::Excluded(start_after), std::ops::Bound::Unbounded))
                    .filter(|(key, _)| key.starts_with(prefix))
                    .filter_map(|(key, versions)| {
                        visible(versions, at).map(|(ts, value)| ListEntry { key, ts, size: value.len() as u64 })
                    });
                let entries = matching.by_ref().take(cap as usize).collect::<Vec<_>>();
                let more = matching.next().is_some();
                let next = if more { entries.last().map_or(&[][..], |entry| entry.key) } else { &[] };
                proto::encode_listing(&entries, next, out);
            }
            Request::BatchPut { items } => {
                let ts = self.clock.fetch_add(1, Ordering::SeqCst);
                for (key, value) in items.iter() {
                    store.entry(key.to_vec()).or_default().push((ts, Some(value.to_vec())));
                }
                proto::encode_written(ts, out);
            }
        }
    }
}
