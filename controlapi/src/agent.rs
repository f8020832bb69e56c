//! What a data node runs against the control plane, on a tokio runtime of its own: it finds
//! the members from seed addresses, keeps a GLTS interval (the [`GltsClient`]), registers,
//! heartbeats, and holds the leases of the shards placed home in its region.
//!
//! A lease is trusted locally until `asked + duration * (1 - drift) - margin` on the node's
//! monotonic clock, measured from when it *asked*: the leader's expiry is counted from a
//! later instant, so the node stops trusting a lease before the leader can grant it to
//! another holder. Losing contact with the control plane therefore ends the node's leases on
//! time without a message.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::ControlClient;
use crate::glts::{EstimatorConfig, Interval};
use crate::glts_client::{GltsClient, IntervalSource};
use crate::meta::{Command, Outcome};
use crate::rpc::NodeId;
use crate::rpc::Response;
use crate::timesource::mono_ns;
use platform::tls::Identity;

/// How a data node joins the control plane.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node's id (stable across restarts; also its certificate's name).
    pub node_id: String,
    /// Its region (must exist in the metadata).
    pub region: String,
    /// Its zone in that region.
    pub zone: String,
    /// Control-plane addresses to ask for the members.
    pub seeds: Vec<String>,
    /// Shards the node runs.
    pub shards: u32,
    /// Capacity of its data directory, bytes.
    pub capacity_bytes: u64,
    /// Time between heartbeats.
    pub heartbeat: Duration,
    /// Length of the shard leases it asks for.
    pub lease: Duration,
    /// Time between GLTS exchanges.
    pub glts_sync: Duration,
    /// Drift bound of the clocks involved, ppm.
    pub drift_ppm: u64,
    /// Bytes the node's WAL has written since it started (the data plane adds to it). Sent
    /// with every heartbeat, and a heartbeat goes early once it grew by [`WAL_REPORT_BYTES`].
    pub wal_bytes: Arc<AtomicU64>,
    /// The node's replica-set endpoint, registered for the other nodes (empty: none).
    pub replica_addr: String,
    /// The node's shard copies in replica sets, when it runs them.
    pub replicas: Option<Arc<dyn ReplicaHost>>,
}

/// A data node's shard copies in replica sets, as the agent serves them: their reports go out
/// with every heartbeat (every quarter lease), the sets and leases the control plane answers
/// come back, and the changes the primaries ask for are proposed. Heartbeats go every sixteenth
/// of the sets' lease (and at once when woken).
pub trait ReplicaHost: Send + Sync + std::fmt::Debug {
    /// Every copy's report, now.
    fn reports(&self) -> Vec<crate::replica::ReplicaReport>;
    /// The sets the node is placed in, from a heartbeat answer that left at `sent` with
    /// `reports`: a copy that reported leading a set's epoch holds its lease until `until`
    /// (`sent` plus the lease, less the drift allowance and a margin: the leader counts from
    /// when it received the report). A set the node learned otherwise comes with no lease.
    fn on_sets(
        &self,
        sets: Vec<(u32, crate::replica::SetConfig)>,
        reports: &[crate::replica::ReplicaReport],
        until: Option<Instant>,
    );
    /// The other data nodes' replica-set endpoints: `(node id, host:port)`.
    fn on_peers(&self, peers: Vec<(String, String)>);
    /// The changes the primaries asked for since the last call: `(shard, epoch, change)`.
    fn take_changes(&self) -> Vec<(u32, u64, crate::meta::SetChange)>;
    /// A change was refused (the answer may also have been lost: the primary asks again).
    fn on_refused(&self, shard: u32, epoch: u64, change: crate::meta::SetChange);
    /// Woken when a change waits, or when a copy's lead changed (the heartbeat goes at once).
    fn changes_waiting(&self) -> &tokio::sync::Notify;
}

/// WAL growth that sends a heartbeat before its time, so the leader sees the volume for
/// snapshots on WAL volume within about this much.
pub const WAL_REPORT_BYTES: u64 = 256 << 10;
/// How often the agent looks at the WAL's growth between heartbeats.
const WAL_REPORT_CHECK: Duration = Duration::from_millis(10);

/// A lease as its holder judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeldLease {
    /// Fencing epoch to write with.
    epoch: u64,
    /// Until when the node trusts it, local monotonic ns.
    valid_until_ns: u64,
}

/// A running agent.
pub struct Agent {
    config: AgentConfig,
    client: ControlClient,
    glts: GltsClient,
    /// Leases held, by shard.
    leases: Mutex<BTreeMap<u32, HeldLease>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Safety margin taken off every lease on top of the drift allowance.
const LEASE_MARGIN: Duration = Duration::from_millis(100);

impl Agent {
    /// Asks the seeds for the members (within `deadline`) and starts the GLTS client.
    pub async fn start(identity: &Identity, config: AgentConfig, deadline: Duration) -> Result<Self> {
        if config.seeds.is_empty() {
            bail!("no control-plane seed addresses");
        }
        let client = ControlClient::new(identity, config.seeds.clone())?.with_attempt_timeout(Duration::from_secs(1));
        let members = discover(&client, &config.seeds, deadline).await?;
        let estimator = EstimatorConfig { drift_ppm: config.drift_ppm, ..EstimatorConfig::for_sources(members.len()) };
        let glts = GltsClient::start(client.connector().clone(), members, estimator, config.glts_sync)?;
        Ok(Self { config, client, glts, leases: Mutex::default() })
    }

    /// The interval, for the shards' clocks.
    pub fn clock(&self) -> IntervalSource {
        self.glts.source()
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, HeldLease>> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the GLTS client has an interval.
    pub async fn wait_interval(&self, deadline: Duration) -> Result<Interval> {
        let start = Instant::now();
        loop {
            match self.glts.now() {
                Ok(interval) => return Ok(interval),
                Err(error) if start.elapsed() > deadline => {
                    bail!("no GLTS interval from the control plane within {deadline:?}: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// The placement (home and replica regions) of every placed shard (a linearizable read,
    /// within `deadline`).
    pub async fn placement(&self, deadline: Duration) -> Result<BTreeMap<u32, crate::meta::Placement>> {
        let state = self.client.read(true, deadline).await.context("cannot read the placement")?;
        Ok(state.placement)
    }

    /// Registers with client address `addr`, then heartbeats and keeps the leases until
    /// `stop` turns true; then hands the leases back.
    pub async fn run(&self, addr: String, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut registered = false;
        let mut problem = Problem::default();
        let mut next_lease_round = Instant::now();
        let mut wal_reported = 0;
        // The replica sets' lease (from the control plane's answers): heartbeats go every
        // quarter of it.
        let mut set_lease = Duration::from_secs(1);
        let mut peers_known = PeersKnown::default();
        while !*stop.borrow() {
            let mut heartbeat_ok = false;
            if registered {
                wal_reported = self.config.wal_bytes.load(Ordering::Relaxed);
                let reports = self.config.replicas.as_ref().map(|host| host.reports()).unwrap_or_default();
                let heartbeat = crate::rpc::Request::Heartbeat {
                    id: self.config.node_id.clone(),
                    wal_bytes: wal_reported,
                    replicas: reports.clone(),
                };
                let sent = Instant::now();
                match self.client.call(&heartbeat, self.config.heartbeat).await {
                    Ok(Response::Ok) => {
                        heartbeat_ok = true;
                        problem.clear();
                    }
                    Ok(Response::Sets { sets, lease_ms }) => {
                        heartbeat_ok = true;
                        problem.clear();
                        set_lease = Duration::from_millis(lease_ms);
                        self.serve_sets(sets, &reports, (sent, set_lease), &mut peers_known).await;
                    }
                    Ok(Response::Error { message }) => {
                        // Removed from the metadata (or a new leader that has not applied the
                        // registration yet): register again.
                        problem.report(&format!("heartbeat refused: {message}"));
                        registered = false;
                    }
                    Ok(other) => problem.report(&format!("heartbeat answered {other:?}")),
                    Err(error) => problem.report(&format!("control plane unreachable: {error:#}")),
                }
            } else {
                registered = self.register(&addr, &mut problem).await;
            }
            if registered && Instant::now() >= next_lease_round {
                self.renew_leases(&mut problem).await;
                next_lease_round = Instant::now() + self.config.lease / 3;
            }
            // Early only after a heartbeat that went through, and at most four times a period.
            // (A heartbeat goes through only once registered.)
            let early = heartbeat_ok;
            let wal_grew = async {
                if !early {
                    return std::future::pending().await;
                }
                tokio::time::sleep(self.config.heartbeat / 4).await;
                while self.config.wal_bytes.load(Ordering::Relaxed) < wal_reported.saturating_add(WAL_REPORT_BYTES) {
                    tokio::time::sleep(WAL_REPORT_CHECK).await;
                }
            };
            let period = match &self.config.replicas {
                Some(_) => self.config.heartbeat.min(set_lease / 16),
                None => self.config.heartbeat,
            };
            let changes = async {
                match &self.config.replicas {
                    Some(host) if registered => host.changes_waiting().notified().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = wal_grew => {}
                () = changes => {}
                _ = stop.changed() => {}
            }
            if registered {
                self.propose_set_changes().await;
            }
        }
        self.release_leases().await;
    }

    async fn register(&self, addr: &str, problem: &mut Problem) -> bool {
        let c = &self.config;
        let command = Command::RegisterDataNode {
            id: c.node_id.clone(),
            addr: addr.to_owned(),
            region: c.region.clone(),
            zone: c.zone.clone(),
            shards: c.shards,
            capacity_bytes: c.capacity_bytes,
            replica_addr: c.replica_addr.clone(),
        };
        match self.client.propose(command, c.heartbeat.max(Duration::from_secs(1))).await {
            Ok((Outcome::Rejected { reason }, _)) => {
                problem.report(&format!("registration refused: {reason}"));
                false
            }
            Ok(_) => {
                problem.clear();
                tracing::info!("registered as {} in {}/{} at {addr}", c.node_id, c.region, c.zone);
                true
            }
            Err(error) => {
                problem.report(&format!("cannot register: {error:#}"));
                false
            }
        }
    }

    /// Acquires or renews the lease of every shard placed home in this region; drops the
    /// others.
    async fn renew_leases(&self, problem: &mut Problem) {
        let c = &self.config;
        // Leases whose local trust ran out (renewals failed meanwhile) are no longer held.
        let now_ns = mono_ns();
        self.leases().retain(|shard, lease| {
            let trusted = lease.valid_until_ns > now_ns;
            if !trusted {
                tracing::warn!("shard {shard}: lease epoch {} expired without renewal", lease.epoch);
            }
            trusted
        });
        let placement = match self.client.read(false, c.heartbeat).await {
            Ok(state) => state.placement,
            Err(error) => return problem.report(&format!("cannot read placement: {error:#}")),
        };
        for shard in 0..c.shards {
            let home_here = placement.get(&shard).is_some_and(|place| place.home == c.region);
            if !home_here {
                if self.leases().remove(&shard).is_some() {
                    tracing::info!("shard {shard} is no longer placed in {}: lease dropped", c.region);
                }
                continue;
            }
            let asked_ns = mono_ns();
            let duration_ms = u64::try_from(c.lease.as_millis()).unwrap_or(u64::MAX);
            let command = Command::AcquireLease { shard, holder: c.node_id.clone(), duration_ms };
            match self.client.propose(command, c.heartbeat).await {
                Ok((Outcome::Lease { epoch, .. }, _)) => {
                    let trusted = c.lease.mul_f64(1.0 - c.drift_ppm as f64 / 1e6).saturating_sub(LEASE_MARGIN);
                    let lease = HeldLease { epoch, valid_until_ns: asked_ns + duration_ns(trusted) };
                    if self.leases().insert(shard, lease).is_none_or(|old| old.epoch != epoch) {
                        tracing::info!("shard {shard}: primary lease held, epoch {epoch}");
                    }
                }
                Ok((Outcome::Rejected { reason }, _)) => {
                    if self.leases().remove(&shard).is_some() {
                        tracing::warn!("shard {shard}: lease lost: {reason}");
                    }
                }
                Ok((other, _)) => problem.report(&format!("lease of shard {shard}: {other:?}")),
                Err(error) => problem.report(&format!("lease of shard {shard}: {error:#}")),
            }
        }
    }

    /// Gives the host the sets of a heartbeat's answer (with the lease of those it reported
    /// leading), and the replica endpoints of nodes it has not heard of yet.
    async fn serve_sets(
        &self,
        sets: Vec<(u32, crate::replica::SetConfig)>,
        reports: &[crate::replica::ReplicaReport],
        (sent, lease): (Instant, Duration),
        peers_known: &mut PeersKnown,
    ) {
        let Some(host) = &self.config.replicas else { return };
        let trusted = lease.mul_f64(1.0 - self.config.drift_ppm as f64 / 1e6).saturating_sub(lease / 20);
        let unknown = sets.iter().flat_map(|(_, config)| config.placed()).any(|node| !peers_known.nodes.contains(node));
        host.on_sets(sets, reports, Some(sent + trusted));
        // Asked again now and then: a node that restarted may listen elsewhere.
        let due = peers_known.asked.is_none_or(|asked| asked.elapsed() >= PEERS_REFRESH);
        if due || (unknown && peers_known.asked.is_none_or(|asked| asked.elapsed() >= PEERS_REFRESH / 5)) {
            peers_known.asked = Some(Instant::now());
            if let Ok(state) = self.client.read(false, self.config.heartbeat).await {
                let peers: Vec<(String, String)> = state
                    .data_nodes
                    .iter()
                    .filter(|(_, node)| !node.replica_addr.is_empty())
                    .map(|(id, node)| (id.clone(), node.replica_addr.clone()))
                    .collect();
                peers_known.nodes = peers.iter().map(|(id, _)| id.clone()).collect();
                host.on_peers(peers);
            }
        }
    }

    /// Proposes the set changes the primaries asked for; the new set goes back to the host.
    async fn propose_set_changes(&self) {
        let Some(host) = &self.config.replicas else { return };
        let region = &self.config.region;
        for (shard, epoch, change) in host.take_changes() {
            let command = Command::ChangeReplicaSet {
                region: region.clone(),
                shard,
                requester: self.config.node_id.clone(),
                epoch,
                change: change.clone(),
            };
            match self.client.propose(command, self.config.heartbeat.max(Duration::from_secs(1))).await {
                Ok((Outcome::ReplicaSet { config }, _)) => {
                    tracing::info!(shard, epoch = config.epoch, members = ?config.members, "replica set changed");
                    host.on_sets(vec![(shard, config)], &[], None);
                }
                Ok((outcome, _)) => {
                    tracing::info!(shard, ?change, ?outcome, "replica set change refused");
                    host.on_refused(shard, epoch, change);
                }
                Err(error) => {
                    tracing::warn!(shard, ?change, "replica set change not made: {error:#}");
                    host.on_refused(shard, epoch, change);
                }
            }
        }
    }

    /// Hands every held lease back, so a successor need not wait for expiry.
    async fn release_leases(&self) {
        let held = std::mem::take(&mut *self.leases());
        for (shard, lease) in held {
            let command = Command::ReleaseLease { shard, holder: self.config.node_id.clone(), epoch: lease.epoch };
            match self.client.propose(command, Duration::from_secs(2)).await {
                Ok((Outcome::Rejected { reason }, _)) => {
                    tracing::warn!("shard {shard}: release refused: {reason}")
                }
                Ok(_) => tracing::info!("shard {shard}: lease released"),
                Err(error) => tracing::warn!("shard {shard}: lease not released ({error:#}); it expires"),
            }
        }
    }
}

/// How often the agent reads the other nodes' replica endpoints again.
const PEERS_REFRESH: Duration = Duration::from_secs(2);

/// The other nodes whose replica endpoints the agent passed on, and when it last asked.
#[derive(Debug, Default)]
struct PeersKnown {
    nodes: std::collections::BTreeSet<String>,
    asked: Option<Instant>,
}

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The current trouble, logged once when it starts or changes and once when it ends.
#[derive(Debug, Default)]
struct Problem(Option<String>);

impl Problem {
    fn report(&mut self, message: &str) {
        if self.0.as_deref() != Some(message) {
            tracing::warn!("{message}");
            self.0 = Some(message.to_owned());
        }
    }

    fn clear(&mut self) {
        if self.0.take().is_some() {
            tracing::info!("control plane reachable again");
        }
    }
}

/// The members (id, address) as the first seed that answers reports them.
async fn discover(client: &ControlClient, seeds: &[String], deadline: Duration) -> Result<Vec<(NodeId, String)>> {
    let start = Instant::now();
    let mut last_error = None;
    while start.elapsed() < deadline {
        for seed in seeds {
            match client.status_of(seed).await {
                Ok(status) if !status.members.is_empty() => {
                    return Ok(status.members.into_iter().map(|member| (member.id, member.addr)).collect());
                }
                Ok(_) => last_error = Some(anyhow::anyhow!("{seed} knows no members yet")),
                Err(error) => last_error = Some(anyhow::Error::new(error).context(format!("seed {seed}"))),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no seed answered")))
        .context(format!("cannot find the control-plane members from seeds {} within {deadline:?}", seeds.join(",")))
}
