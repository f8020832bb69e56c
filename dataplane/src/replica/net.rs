//! The links between the data nodes of a region that carry the shard copies' frames: one QUIC
//! endpoint per node (mutual TLS with the cluster CA, ALPN [`ALPN`]) on a tokio thread of its
//! own ("replica-net"). To each peer node one unidirectional stream, opened with the sender's
//! node id (u16 length, bytes), then frames, each preceded by its length (u32). Frames in are
//! decoded and handed to their shard's copy; frames out are queued per peer and dropped while
//! the peer cannot be reached (the protocol sends again what matters).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use platform::tls::Identity;
use tokio::sync::{mpsc, watch};

use super::frame::{FRAME_BYTES_MAX, Frame, decode};

/// ALPN of the replica-set links.
pub const ALPN: &[u8] = b"meridian-replica/1";

/// How long a connection attempt to a peer may take, and how long frames to an unreachable peer
/// are dropped before the next attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// `[replica_sets]` of a node, resolved.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// UDP address of the endpoint.
    pub listen: SocketAddr,
    /// Directory with `ca.pem`, `<name>.pem`, `<name>.key`.
    pub tls_dir: PathBuf,
    /// This node's id (and certificate name).
    pub name: String,
}

/// A frame from another node, for one shard's copy.
pub type Inbound = (String, Frame);

/// Where frames go out: cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct NetSender {
    out: mpsc::UnboundedSender<(String, Bytes)>,
}

impl NetSender {
    /// Queues the encoded `frame` for node `to`.
    pub fn send(&self, to: &str, frame: &Frame) {
        let mut bytes = Vec::new();
        super::frame::encode(frame, &mut bytes);
        let _ = self.out.send((to.to_owned(), Bytes::from(bytes)));
    }
}

/// The running links thread.
#[derive(Debug)]
pub struct ReplicaNet {
    addr: SocketAddr,
    sender: NetSender,
    peers: Arc<Mutex<BTreeMap<String, SocketAddr>>>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    name: String,
    peers: Arc<Mutex<BTreeMap<String, SocketAddr>>>,
    shards: Vec<mpsc::UnboundedSender<Inbound>>,
    metrics: NetMetrics,
}

struct NetMetrics {
    frames_in: metrics::Counter,
    frames_out: metrics::Counter,
    bytes_out: metrics::Counter,
    dropped: metrics::Counter,
    refused: metrics::Counter,
}

impl ReplicaNet {
    /// Binds the endpoint; frames for shard `k` go to `shards[k]`.
    pub fn start(config: NetConfig, shards: Vec<mpsc::UnboundedSender<Inbound>>) -> Result<Self, String> {
        let identity = Identity::in_dir(&config.tls_dir, &config.name);
        identity.require_files("replica_sets.tls_dir", &config.tls_dir, &config.name)?;
        let transport = || {
            let mut transport = quinn::TransportConfig::default();
            // A peer that died is noticed within a second even when nothing is sent to it.
            transport.keep_alive_interval(Some(Duration::from_millis(200)));
            let _ = transport.max_idle_timeout(Some(quinn::VarInt::from_u32(1_000).into()));
            transport
        };
        let server =
            identity.server_config_for(ALPN, transport()).map_err(|error| format!("replica_sets TLS: {error:#}"))?;
        let client =
            identity.client_config_for(ALPN, transport()).map_err(|error| format!("replica_sets TLS: {error:#}"))?;
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let peers = Arc::new(Mutex::new(BTreeMap::new()));
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            peers: Arc::clone(&peers),
            shards,
            metrics: NetMetrics {
                frames_in: metrics::counter!("meridian_replica_frames_received_total"),
                frames_out: metrics::counter!("meridian_replica_frames_sent_total"),
                bytes_out: metrics::counter!("meridian_replica_sent_bytes_total"),
                dropped: metrics::counter!("meridian_replica_frames_dropped_total"),
                refused: metrics::counter!("meridian_replica_frames_refused_total"),
            },
        });
        let listen = config.listen;
        let (thread, addr) = crate::runtime::spawn_tokio_thread("replica-net", move |ready| async move {
            let endpoint = match bind(server, client, listen) {
                Ok(endpoint) => endpoint,
                Err(error) => {
                    let _ = ready.send(Err(format!("replica_sets.listen: cannot bind {listen}: {error}")));
                    return;
                }
            };
            let _ = ready.send(Ok(endpoint.local_addr().unwrap_or(listen)));
            run(shared, endpoint, out_rx, stop_rx).await;
        })?;
        tracing::info!(%addr, "replica-set links listening");
        Ok(Self { addr, sender: NetSender { out: out_tx }, peers, stop: stop_tx, thread: Some(thread) })
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the shards' copies send their frames.
    pub fn sender(&self) -> NetSender {
        self.sender.clone()
    }

    /// The other nodes' endpoints (`host:port`, by node id); unresolvable ones are skipped.
    pub fn set_peers(&self, peers: &[(String, String)]) {
        let mut known = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        for (node, addr) in peers {
            match platform::quic::resolve(addr) {
                Ok(addr) => {
                    known.insert(node.clone(), addr);
                }
                Err(error) => tracing::warn!(node, %error, "replica endpoint of a peer"),
            }
        }
    }

    /// Stops the thread.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ReplicaNet {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn bind(
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
    listen: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let mut endpoint = crate::runtime::quic_endpoint(Some(server), listen)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

async fn run(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    mut out: mpsc::UnboundedReceiver<(String, Bytes)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(accept(Arc::clone(&shared), endpoint.clone()));
    let mut connector = platform::quic::Connector::new(endpoint.clone());
    connector.connect_timeout = CONNECT_TIMEOUT;
    let mut queues: BTreeMap<String, mpsc::UnboundedSender<Bytes>> = BTreeMap::new();
    loop {
        tokio::select! {
            next = out.recv() => {
                let Some((to, bytes)) = next else { break };
                let queue = queues.entry(to.clone()).or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tasks.spawn(send_to(Arc::clone(&shared), connector.clone(), to.clone(), rx));
                    tx
                });
                let _ = queue.send(bytes);
            }
            _ = stop.changed() => break,
        }
    }
    tasks.abort_all();
    endpoint.close(0u32.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Sends the frames for node `to` in order over one stream, connecting when needed.
async fn send_to(
    shared: Arc<Shared>,
    connector: platform::quic::Connector,
    to: String,
    mut frames: mpsc::UnboundedReceiver<Bytes>,
) {
    let mut stream: Option<(quinn::SendStream, SocketAddr)> = None;
    let mut failed_at: Option<Instant> = None;
    while let Some(frame) = frames.recv().await {
        // The peer restarted elsewhere: its old connection is dead, whatever writes to it say.
        let current = shared.peers.lock().unwrap_or_else(PoisonError::into_inner).get(&to).copied();
        if let Some((_, target)) = &stream
            && current != Some(*target)
        {
            connector.drop_connection(*target, b"peer moved");
            stream = None;
            failed_at = None;
        }
        if stream.is_none() {
            if failed_at.is_some_and(|at| at.elapsed() < RETRY_AFTER) {
                shared.metrics.dropped.increment(1);
                continue;
            }
            stream = open(&shared, &connector, &to).await;
            if stream.is_none() {
                failed_at = Some(Instant::now());
                shared.metrics.dropped.increment(1);
                continue;
            }
        }
        let Some((send, target)) = stream.as_mut() else { continue };
        let length = u32::try_from(frame.len()).unwrap_or(u32::MAX).to_le_bytes();
        let written = async {
            send.write_all(&length).await?;
            send.write_all(&frame).await
        }
        .await;
        match written {
            Ok(()) => {
                shared.metrics.frames_out.increment(1);
                shared.metrics.bytes_out.increment(frame.len() as u64 + 4);
            }
            Err(error) => {
                // The frame is lost (the protocol sends again what matters); the next one
                // connects anew at once.
                tracing::debug!(to, %error, "replica link lost");
                connector.drop_connection(*target, b"stream failed");
                stream = None;
                shared.metrics.dropped.increment(1);
            }
        }
    }
}

async fn open(
    shared: &Shared,
    connector: &platform::quic::Connector,
    to: &str,
) -> Option<(quinn::SendStream, SocketAddr)> {
    let target = shared.peers.lock().unwrap_or_else(PoisonError::into_inner).get(to).copied()?;
    let connection = connector.connection(&target.to_string(), target).await.ok()?;
    let mut send = connection.open_uni().await.ok()?;
    let name = shared.name.as_bytes();
    let length = u16::try_from(name.len()).ok()?.to_le_bytes();
    send.write_all(&length).await.ok()?;
    send.write_all(name).await.ok()?;
    Some((send, target))
}

async fn accept(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else { return };
            while let Ok(stream) = connection.accept_uni().await {
                tokio::spawn(receive(Arc::clone(&shared), stream));
            }
        });
    }
}

/// Reads one peer's stream: its node id, then frames, each handed to its shard's copy.
async fn receive(shared: Arc<Shared>, mut stream: quinn::RecvStream) {
    let mut length = [0; 2];
    if stream.read_exact(&mut length).await.is_err() {
        return;
    }
    let mut name = vec![0; usize::from(u16::from_le_bytes(length))];
    if stream.read_exact(&mut name).await.is_err() {
        return;
    }
    let Ok(from) = String::from_utf8(name) else { return };
    loop {
        let mut length = [0; 4];
        if stream.read_exact(&mut length).await.is_err() {
            return;
        }
        let length = u32::from_le_bytes(length) as usize;
        if length > FRAME_BYTES_MAX {
            tracing::warn!(from, length, "replica frame too large; stream closed");
            shared.metrics.refused.increment(1);
            return;
        }
        let mut bytes = vec![0; length];
        if stream.read_exact(&mut bytes).await.is_err() {
            return;
        }
        match decode(&Bytes::from(bytes)) {
            Ok(frame) => {
                shared.metrics.frames_in.increment(1);
                if let Some(shard) = shared.shards.get(frame.shard as usize) {
                    let _ = shard.send((from.clone(), frame));
                }
            }
            Err(error) => {
                tracing::warn!(from, %error, "replica frame refused; stream closed");
                shared.metrics.refused.increment(1);
                return;
            }
        }
    }
}
