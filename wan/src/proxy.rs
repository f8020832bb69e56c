//! A user-space UDP proxy between a client side and one upstream address, with an emulated
//! link each way ([`Link`]). Datagrams to [`Proxy::addr`] go to the upstream through the
//! forward link; the upstream's replies come back through the backward link. Each client
//! address gets its own upstream socket, so replies find their way back.
//!
//! The links can be changed while traffic flows ([`ProxyHandle::set`], `partition`), which is
//! how tests and the bench cut a region off and heal it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::link::{ConfigError, Fate, Link, LinkConfig, LinkStats};

/// Largest datagram relayed (UDP's limit).
const DATAGRAM_BYTES_MAX: usize = 65_535;

/// Where a datagram goes once the link delivers it.
#[derive(Debug)]
enum Hop {
    /// To the upstream, from this client's upstream socket.
    Up(Arc<UdpSocket>),
    /// Back to this client, from the front socket.
    Down(SocketAddr),
}

#[derive(Debug)]
struct Links {
    forward: Link<(Hop, Bytes)>,
    backward: Link<(Hop, Bytes)>,
}

#[derive(Debug)]
struct Shared {
    links: Mutex<Links>,
    /// Wakes the delivery task when something was queued or the config changed.
    queued: Notify,
    origin: Instant,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn offer(&self, forward: bool, hop: Hop, datagram: Bytes) {
        let now = self.now_ns();
        let mut links = self.lock();
        let link = if forward { &mut links.forward } else { &mut links.backward };
        if let Fate::Queued { .. } = link.send(now, datagram.len(), (hop, datagram)) {
            self.queued.notify_one();
        }
    }
}

/// Changes a running proxy's links and reads their counters.
#[derive(Debug, Clone)]
pub struct ProxyHandle(Arc<Shared>);

impl ProxyHandle {
    /// Sets the forward (client to upstream) and backward links.
    pub fn set(&self, forward: LinkConfig, backward: LinkConfig) -> Result<(), ConfigError> {
        forward.validate()?;
        backward.validate()?;
        let mut links = self.0.lock();
        links.forward.set_config(forward)?;
        links.backward.set_config(backward)?;
        drop(links);
        self.0.queued.notify_one();
        Ok(())
    }

    /// Cuts both directions (`true`) or heals them.
    pub fn partition(&self, partitioned: bool) {
        let (forward, backward) = self.config();
        let _ = self.set(LinkConfig { partitioned, ..forward }, LinkConfig { partitioned, ..backward });
    }

    /// The forward and backward configs.
    pub fn config(&self) -> (LinkConfig, LinkConfig) {
        let links = self.0.lock();
        (links.forward.config(), links.backward.config())
    }

    /// Forward and backward counters.
    pub fn stats(&self) -> (LinkStats, LinkStats) {
        let links = self.0.lock();
        (links.forward.stats(), links.backward.stats())
    }
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    handle: ProxyHandle,
    tasks: JoinSet<()>,
}

impl Proxy {
    /// Listens on `listen` (port 0: any free one) and relays to `upstream` through links
    /// configured as `forward` and `backward`. Loss and jitter are drawn from `seed`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        forward: LinkConfig,
        backward: LinkConfig,
        seed: u64,
    ) -> std::io::Result<Self> {
        let invalid = |error: ConfigError| std::io::Error::new(std::io::ErrorKind::InvalidInput, error);
        let links = Links {
            forward: Link::new(forward, seed).map_err(invalid)?,
            backward: Link::new(backward, seed ^ 0x9E37_79B9_7F4A_7C15).map_err(invalid)?,
        };
        let shared = Arc::new(Shared { links: Mutex::new(links), queued: Notify::new(), origin: Instant::now() });
        let front = Arc::new(UdpSocket::bind(listen).await?);
        deep_buffers(&front);
        let addr = front.local_addr()?;
        let mut tasks = JoinSet::new();
        tasks.spawn(deliver(shared.clone(), front.clone()));
        tasks.spawn(accept(shared.clone(), front, upstream));
        Ok(Self { addr, handle: ProxyHandle(shared), tasks })
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The control handle.
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Socket buffers the proxy asks for (the kernel caps them at `net.core.{r,w}mem_max`).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Gives `socket` deep kernel buffers: with the default (about 200 KiB) a burst of large
/// datagrams overflows it, and a loss the emulated link did not decide on is not emulation.
fn deep_buffers(socket: &UdpSocket) {
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
}

/// Receives from clients; opens one upstream socket per client, whose replies go back.
async fn accept(shared: Arc<Shared>, front: Arc<UdpSocket>, upstream: SocketAddr) {
    let mut sessions: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut replies = JoinSet::new();
    let mut buffer = vec![0; DATAGRAM_BYTES_MAX];
    loop {
        // An ICMP error from an earlier send can surface here: it concerns one client only.
        let Ok((len, client)) = front.recv_from(&mut buffer).await else { continue };
        let socket = match sessions.get(&client) {
            Some(socket) => socket.clone(),
            None => {
                let any = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                let Ok(socket) = UdpSocket::bind(any).await else { continue };
                deep_buffers(&socket);
                if socket.connect(upstream).await.is_err() {
                    continue;
                }
                let socket = Arc::new(socket);
                replies.spawn(relay_replies(shared.clone(), socket.clone(), client));
                sessions.insert(client, socket.clone());
                socket
            }
        };
        shared.offer(true, Hop::Up(socket), Bytes::copy_from_slice(&buffer[..len]));
    }
}

/// Receives the upstream's replies to one client.
async fn relay_replies(shared: Arc<Shared>, socket: Arc<UdpSocket>, client: SocketAddr) {
    let mut buffer = vec![0; DATAGRAM_BYTES_MAX];
    loop {
        match socket.recv(&mut buffer).await {
            Ok(len) => shared.offer(false, Hop::Down(client), Bytes::copy_from_slice(&buffer[..len])),
            // The upstream is not listening (yet): ICMP port unreachable. Keep the session.
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Sends every datagram the links release, when they release it.
async fn deliver(shared: Arc<Shared>, front: Arc<UdpSocket>) {
    loop {
        let mut due = Vec::new();
        let next = {
            let now = shared.now_ns();
            let mut links = shared.lock();
            while let Some(item) = links.forward.poll(now) {
                due.push(item);
            }
            while let Some(item) = links.backward.poll(now) {
                due.push(item);
            }
            [links.forward.next_release_ns(), links.backward.next_release_ns()].into_iter().flatten().min()
        };
        for (hop, datagram) in due {
            // A datagram the OS refuses is lost, as on a real network.
            let _ = match hop {
                Hop::Up(socket) => socket.send(&datagram).await,
                Hop::Down(client) => front.send_to(&datagram, client).await,
            };
        }
        match next {
            Some(release_ns) => {
                let wait = Duration::from_nanos(release_ns.saturating_sub(shared.now_ns()));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shared.queued.notified() => {}
                }
            }
            None => shared.queued.notified().await,
        }
    }
}
