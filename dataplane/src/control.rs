//! The node's link to the control plane: one thread running a small tokio runtime with the
//! control plane's [`Agent`] (GLTS client, registration, heartbeats, shard leases), and the
//! store [`Clock`] that reads the agent's interval from the shards' threads.
//!
//! The shards stay on glommio; they only take a mutex to read the interval.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use controlapi::agent::{Agent, AgentConfig};
use controlapi::glts_client::IntervalSource;
use controlapi::meta::Placement;
use platform::tls::Identity;

use crate::config::ControlResolved;
use crate::store::{Clock, ClockUnavailable, Interval};

/// The GLTS interval as a store clock.
#[derive(Debug, Clone)]
pub struct GltsClock(IntervalSource);

impl Clock for GltsClock {
    fn interval(&self) -> Result<Interval, ClockUnavailable> {
        self.0.now().map_err(|error| ClockUnavailable(error.to_string()))
    }
}

/// A running link. Dropping it without [`ControlLink::stop`] stops the agent without handing
/// the leases back.
#[derive(Debug)]
pub struct ControlLink {
    clock: Arc<GltsClock>,
    placement: Option<BTreeMap<u32, Placement>>,
    serving: Mutex<Option<tokio::sync::oneshot::Sender<String>>>,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlLink {
    /// Finds the control plane from the seeds and waits for a GLTS interval (up to the
    /// configured start timeout); with `read_placement`, also reads the shards' home and
    /// replica regions ([`ControlLink::placement`]). The node registers once
    /// [`ControlLink::serving`] gives its address (and `replicas`' endpoint). Heartbeats report
    /// `wal_bytes`, the node's WAL volume, and the copies of `replicas`.
    pub fn start(
        config: &ControlResolved,
        shards: u32,
        capacity_bytes: u64,
        wal_bytes: Arc<std::sync::atomic::AtomicU64>,
        read_placement: bool,
        replicas: Option<(String, Arc<dyn controlapi::agent::ReplicaHost>)>,
    ) -> Result<Self, String> {
        let identity = Identity::in_dir(&config.tls_dir, &config.node_id);
        identity.require_files("control.tls_dir", &config.tls_dir, &config.node_id)?;
        let agent_config = AgentConfig {
            node_id: config.node_id.clone(),
            region: config.region.clone(),
            zone: config.zone.clone(),
            seeds: config.seeds.clone(),
            shards,
            capacity_bytes,
            heartbeat: config.heartbeat,
            lease: config.lease,
            glts_sync: config.glts_sync,
            drift_ppm: config.drift_ppm,
            wal_bytes,
            replica_addr: replicas.as_ref().map(|(addr, _)| addr.clone()).unwrap_or_default(),
            replicas: replicas.map(|(_, host)| host),
        };
        let start_timeout = config.start_timeout;
        let (serving_tx, serving_rx) = tokio::sync::oneshot::channel::<String>();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (thread, (clock, placement)) =
            crate::runtime::spawn_tokio_thread("control-agent", move |ready| async move {
                let started = async {
                    let agent = Agent::start(&identity, agent_config, start_timeout).await?;
                    agent.wait_interval(start_timeout).await?;
                    let placement = if read_placement { Some(agent.placement(start_timeout).await?) } else { None };
                    anyhow::Ok((agent, placement))
                };
                let (agent, placement) = match started.await {
                    Ok(started) => started,
                    Err(error) => {
                        let _ = ready.send(Err(format!("{error:#}")));
                        return;
                    }
                };
                let _ = ready.send(Ok((agent.clock(), placement)));
                // The node failed before serving when the sender is dropped.
                if let Ok(addr) = serving_rx.await {
                    agent.run(addr, stop_rx).await;
                }
            })
            .map_err(|message| format!("control plane: {message}"))?;
        Ok(Self {
            clock: Arc::new(GltsClock(clock)),
            placement,
            serving: Mutex::new(Some(serving_tx)),
            stop: stop_tx,
            thread: Some(thread),
        })
    }

    /// The store clock.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// The home and replica regions of every placed shard, as the control plane said at start
    /// (when asked).
    pub fn placement(&self) -> Option<&BTreeMap<u32, Placement>> {
        self.placement.as_ref()
    }

    /// The node serves clients at `addr` (shard 0's address): register and heartbeat.
    pub fn serving(&self, addr: String) {
        if let Some(serving) = self.serving.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = serving.send(addr);
        }
    }

    /// Hands the leases back and stops the agent.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        self.serving.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ControlLink {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Total bytes of the file system holding `dir` (0 when it cannot be read).
pub fn capacity_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: statvfs writes into a zeroed struct this function owns; `path` is NUL-terminated.
    unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stat) != 0 {
            return 0;
        }
        stat.f_blocks.saturating_mul(stat.f_frsize)
    }
}
