//! The thread-per-core runtime: a pool of glommio executors, one shard each, joined by a full
//! mesh of bounded channels.
//!
//! Each shard owns its data; another shard's data is reached only by a message to its owner
//! ([`ShardContext::send_to`]), which waits when the peer's channel is full (backpressure).
//! The pure router is [`wire::shard_for`]; the receiving shard checks it owns what it is sent
//! ([`ShardContext::owns`]).

use std::future::Future;

use glommio::channels::channel_mesh::{MeshBuilder, Receivers, Senders};
use glommio::channels::shared_channel::ConnectedReceiver;
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};

use crate::limits;

/// How many shards and how they talk.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Number of shards (executors); defaults to the number of CPUs.
    pub shards: usize,
    /// Capacity of each directed channel between two shards.
    pub mesh_channel_capacity: usize,
    /// Pin each shard to its own CPU.
    pub pin_to_cpus: bool,
    /// Bytes of io_uring registered buffers per shard (needs RLIMIT_MEMLOCK); `None` keeps
    /// glommio's default.
    pub io_memory_bytes: Option<usize>,
    /// Thread name prefix.
    pub name: String,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            shards: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            mesh_channel_capacity: limits::MESH_CHANNEL_CAPACITY_DEFAULT,
            pin_to_cpus: false,
            io_memory_bytes: None,
            name: "shard".into(),
        }
    }
}

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A configuration field is invalid.
    #[error("invalid runtime configuration: {field}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Executors could not be started.
    #[error("cannot start shard executors: {0}")]
    Start(String),
    /// A shard's thread panicked or its executor failed.
    #[error("shard {shard} failed: {reason}")]
    ShardFailed {
        /// The shard.
        shard: usize,
        /// What happened.
        reason: String,
    },
    /// The mesh could not be joined.
    #[error("shard mesh could not be joined")]
    Mesh,
    /// The destination is out of range, is the sender itself, or its channel is closed.
    #[error("cannot send to shard {0}")]
    Send(u32),
}

/// What a shard gets when it starts: who it is and its channels to the others.
#[derive(Debug)]
pub struct ShardContext<M: Send + 'static> {
    /// This shard's index, `0..shard_count`.
    pub shard_id: u32,
    /// Number of shards.
    pub shard_count: u32,
    senders: Senders<M>,
    receivers: Option<Receivers<M>>,
}

impl<M: Send + 'static> ShardContext<M> {
    /// Whether this shard owns `key` under [`wire::shard_for`].
    pub fn owns(&self, key: &[u8]) -> bool {
        wire::shard_for(key, self.shard_count) == self.shard_id
    }

    /// Sends `message` to shard `to`, waiting while its channel is full. Sending to oneself
    /// is an error: a shard handles its own work directly.
    pub async fn send_to(&self, to: u32, message: M) -> Result<(), RuntimeError> {
        if to == self.shard_id {
            return Err(RuntimeError::Send(to));
        }
        self.senders.send_to(to as usize, message).await.map_err(|_| RuntimeError::Send(to))
    }

    /// The receiving ends, one per peer shard, as `(peer, receiver)`. Callable once.
    pub fn take_receivers(&mut self) -> Vec<(u32, ConnectedReceiver<M>)> {
        let Some(mut receivers) = self.receivers.take() else { return Vec::new() };
        receivers
            .streams()
            .into_iter()
            .filter_map(|(peer, receiver)| u32::try_from(peer).ok().map(|peer| (peer, receiver)))
            .collect()
    }

    /// Closes this shard's sending ends so peers' receivers end.
    pub fn close_senders(&self) {
        self.senders.close();
    }
}

/// Starts `config.shards` executors, runs `shard_main` on each with its [`ShardContext`],
/// and returns their results in shard order once all have finished.
pub fn run_shards<M, G, F, T>(config: &RuntimeConfig, shard_main: G) -> Result<Vec<T>, RuntimeError>
where
    M: Send + 'static,
    G: FnOnce(ShardContext<M>) -> F + Clone + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    if config.shards == 0 || config.shards > limits::SHARDS_MAX {
        return Err(RuntimeError::Config {
            field: "shards",
            reason: format!("{} is outside 1..={}", config.shards, limits::SHARDS_MAX),
        });
    }
    if config.mesh_channel_capacity == 0 {
        return Err(RuntimeError::Config { field: "mesh_channel_capacity", reason: "must be at least 1".into() });
    }
    let shard_count = u32::try_from(config.shards)
        .map_err(|_| RuntimeError::Config { field: "shards", reason: "too many".into() })?;
    let placement = if config.pin_to_cpus {
        PoolPlacement::MaxSpread(config.shards, None)
    } else {
        PoolPlacement::Unbound(config.shards)
    };
    let mut builder = LocalExecutorPoolBuilder::new(placement).name(&config.name);
    if let Some(bytes) = config.io_memory_bytes {
        builder = builder.io_memory(bytes);
    }
    let mesh: MeshBuilder<M, _> = MeshBuilder::full(config.shards, config.mesh_channel_capacity);
    let handles = builder
        .on_all_shards(move || async move {
            let (senders, receivers) = mesh.join().await.map_err(|_| RuntimeError::Mesh)?;
            let shard_id = u32::try_from(senders.peer_id()).map_err(|_| RuntimeError::Mesh)?;
            let context = ShardContext { shard_id, shard_count, senders, receivers: Some(receivers) };
            Ok::<(u32, T), RuntimeError>((shard_id, shard_main(context).await))
        })
        .map_err(|error| RuntimeError::Start(error.to_string()))?;
    let mut results: Vec<(u32, T)> = Vec::with_capacity(config.shards);
    for (index, joined) in handles.join_all().into_iter().enumerate() {
        match joined {
            Ok(Ok(result)) => results.push(result),
            Ok(Err(error)) => return Err(RuntimeError::ShardFailed { shard: index, reason: error.to_string() }),
            Err(error) => return Err(RuntimeError::ShardFailed { shard: index, reason: error.to_string() }),
        }
    }
    results.sort_by_key(|(shard_id, _)| *shard_id);
    Ok(results.into_iter().map(|(_, result)| result).collect())
}

/// Runs one future on a fresh single glommio executor on this thread: for tools and tests
/// that need one shard without a mesh.
pub fn run_local<F, T>(name: &str, future: F) -> Result<T, RuntimeError>
where
    F: Future<Output = T> + 'static,
{
    let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name(name)
        .make()
        .map_err(|error| RuntimeError::Start(error.to_string()))?;
    Ok(executor.run(future))
}

/// Starts a thread named `name` running `body` on a current-thread tokio runtime (the shells
/// that speak QUIC: the control agent, replication) and waits for the value `body` reports on
/// its `ready` sender. On an error the thread is joined and the error returned.
///
/// # Errors
/// The thread or its runtime cannot start, `body` reported an error, or it ended without
/// reporting.
pub fn spawn_tokio_thread<T, F>(
    name: &str,
    body: impl FnOnce(std::sync::mpsc::Sender<Result<T, String>>) -> F + Send + 'static,
) -> Result<(std::thread::JoinHandle<()>, T), String>
where
    T: Send + 'static,
    F: Future<Output = ()>,
{
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread_name = name.to_owned();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(body(ready_tx)),
            Err(error) => {
                let _ = ready_tx.send(Err(format!("{thread_name} runtime: {error}")));
            }
        })
        .map_err(|error| format!("cannot start the {name} thread: {error}"))?;
    match ready_rx.recv() {
        Ok(Ok(value)) => Ok((thread, value)),
        Ok(Err(message)) => {
            let _ = thread.join();
            Err(message)
        }
        Err(_) => Err(format!("the {name} thread ended during start-up")),
    }
}

/// Kernel buffers a QUIC endpoint's socket asks for.
const UDP_SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A QUIC endpoint bound to `listen` (what the replication and replica-set threads use). Path MTU discovery keeps quinn's bounds (up to 1452
/// bytes): with discovery up to 64 KiB datagrams on loopback, quinn declared losses of large
/// packets under load (none were dropped), fell back to 1200 bytes, and a stream through the
/// WAN proxy started 400 ms behind in `bench geo`.
pub fn quic_endpoint(
    server: Option<quinn::ServerConfig>,
    listen: std::net::SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
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

/// glibc malloc's trim threshold set by [`tune_allocator`]: free memory a thread's arena keeps
/// at its top instead of handing it back to the kernel.
pub const MALLOC_TRIM_THRESHOLD_BYTES: i32 = 64 << 20;
/// glibc malloc's mmap threshold set by [`tune_allocator`]: smaller blocks come from the arenas.
pub const MALLOC_MMAP_THRESHOLD_BYTES: i32 = 4 << 20;

/// Fixes glibc malloc's trim and mmap thresholds (call first thing in `main`, before other
/// threads start). With the defaults, a thread that frees what it allocated moments before
/// (the replication thread's decompressed batches, the shard's per-request buffers) keeps
/// handing the top of its arena back and faulting fresh zeroed pages in again: in `perf` of a
/// replica catching up, page clearing was over half of the replication thread's CPU. Fixed
/// values also turn off glibc's threshold adjustment, so the behaviour does not drift with
/// the history of allocations. Returns whether glibc took both (other C libraries: `false`).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only sets allocator parameters; it is called before any other
        // thread of this process allocates.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES) };
        // SAFETY: as above.
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES) };
        trim == 1 && mmap == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_allocator_thresholds() {
        assert!(super::tune_allocator(), "mallopt refused a threshold");
    }
}
