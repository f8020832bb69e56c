//! A control-plane node: openraft over the QUIC shell, the request handler, and the
//! background duties (election timer, GLTS exchanges, data-node liveness, bootstrap/join).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use rand::Rng;

use crate::config::NodeConfig;
use crate::network::NetworkFactory;
use crate::raftlog::{self, LogStore, LogWriter};
use controlapi::glts::{Estimator, EstimatorConfig};
use controlapi::glts_client::exchange_all;
use controlapi::meta::{Command, NodeState, Outcome, SnapshotStatus};
use controlapi::replica::{ReplicaReport, SetWatch};
use controlapi::rpc::{Member, Request, Response, Role, Status};
use platform::quic::Connector;

use crate::rpc::{Incoming, Outgoing, RaftRequest, RaftResponse};
use crate::sm::{Applied, StateMachine};
use crate::types::{ControlNode, NodeId, Proposal, Raft};
use controlapi::timesource::{self, LocalBound};
use platform::tls::Identity;

/// Heartbeat rounds a linearizable read may take to hear from a quorum before it fails.
const LINEARIZABLE_ATTEMPTS: u32 = 5;

/// How often a leader looks for snapshots still pending that nobody here follows (created
/// by an earlier leader).
const SNAPSHOT_RESUME_EVERY: Duration = Duration::from_millis(500);
/// A snapshot the leader meant to take by itself and could not is tried again this much later.
const SNAPSHOT_RETRY_AFTER: Duration = Duration::from_millis(100);

/// Why a batch was not applied; every writer in it gets the same answer.
#[derive(Debug, Clone)]
enum Refusal {
    NotLeader(Option<(NodeId, String)>),
    Failed(String),
}

impl Refusal {
    fn response(&self) -> Response {
        match self {
            Self::NotLeader(leader) => Response::NotLeader { leader: leader.clone() },
            Self::Failed(message) => Response::Error { message: message.clone() },
        }
    }
}

/// A write waiting for its batch.
struct Pending {
    command: Command,
    reply: tokio::sync::oneshot::Sender<Response>,
}

/// A running node.
pub struct Node {
    id: NodeId,
    raft: Raft,
    applied: Arc<RwLock<Applied>>,
    connector: Connector,
    config: NodeConfig,
    isolated: Arc<AtomicBool>,
    greater_log_seen: Arc<AtomicBool>,
    /// Data-node heartbeats this node received as leader: id -> unix ms.
    heartbeats: Mutex<BTreeMap<String, u64>>,
    /// When this node last became leader (unix ms), for liveness grace.
    leader_since_ms: Mutex<Option<u64>>,
    glts: Mutex<Option<Estimator>>,
    proposals: tokio::sync::mpsc::UnboundedSender<Pending>,
    /// The local bound as last read (refreshed every `glts.sync_interval_ms`).
    local: Mutex<LocalBound>,
    /// Snapshots this node follows as leader.
    tracking: Mutex<BTreeSet<u64>>,
    /// WAL volume reported in heartbeats, for snapshots on volume.
    wal_volume: Mutex<WalVolume>,
    /// Told when the WAL volume since the last snapshot reached `snapshots.every_wal_bytes`.
    snapshot_due: tokio::sync::Notify,
    /// Replica sets as this node watches them as leader: (region, shard) -> lease and reports.
    set_watches: Mutex<BTreeMap<(String, u32), SetWatch>>,
    /// Told when a set's primary restarted and needs a new epoch now.
    promotion_due: tokio::sync::Notify,
}

/// The data nodes' WAL bytes as the leader counts them.
#[derive(Debug, Default)]
struct WalVolume {
    /// The Raft term these counts belong to: a node leading again in a later term starts over
    /// (the leaders between took their own snapshots).
    term: u64,
    /// Each node's last reported total (bytes written since it started).
    reported: BTreeMap<String, u64>,
    /// Growth summed over the nodes since the last snapshot.
    since_snapshot: u64,
}

impl WalVolume {
    /// Counts a report; true when `every` bytes have been written since the last snapshot.
    /// A node's first report to this leader counts nothing (its bytes may predate the last
    /// snapshot); a total below the last one is a restart, counted from zero.
    fn report(&mut self, term: u64, node: &str, total: u64, every: u64) -> bool {
        if term != self.term {
            *self = Self { term, ..Self::default() };
        }
        let grew = match self.reported.insert(node.to_owned(), total) {
            Some(last) if total >= last => total - last,
            Some(_) => total,
            None => 0,
        };
        self.since_snapshot = self.since_snapshot.saturating_add(grew);
        every > 0 && self.since_snapshot >= every
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id).field("listen", &self.config.listen).finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What openraft's `enable_elect` would do, with the timeout drawn afresh each time: whether
/// a follower whose vote last changed (or was refreshed by a leader) `elapsed_ns` ago (None:
/// never) should start an election. A committed vote means a leader was seen; its lease must
/// also run out first.
pub fn election_due(elapsed_ns: Option<u64>, vote_committed: bool, timeout_ns: u64, lease_ns: u64) -> bool {
    let wait = if vote_committed { timeout_ns + lease_ns } else { timeout_ns };
    elapsed_ns.is_none_or(|elapsed| elapsed >= wait)
}

impl Node {
    /// Opens storage, binds the endpoint and starts the node and its duties.
    pub async fn start(config: NodeConfig) -> Result<Arc<Self>> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("data_dir: creating {}", config.data_dir.display()))?;
        let identity = Identity::in_dir(&config.tls_dir, &config.tls_name);
        let server_tls = identity.server_config().context("tls_dir/tls_name")?;
        let client_tls = identity.client_config().context("tls_dir/tls_name")?;
        let mut endpoint = quinn::Endpoint::server(server_tls, config.listen)
            .with_context(|| format!("listen: binding {}", config.listen))?;
        endpoint.set_default_client_config(client_tls);
        let connector = Connector::new(endpoint.clone());

        let log_path = config.data_dir.join("raft.log");
        let image = raftlog::read_and_repair(&log_path).with_context(|| format!("reading {}", log_path.display()))?;
        let file =
            LogWriter::open(&log_path, config.log_io).with_context(|| format!("opening {}", log_path.display()))?;
        let log_kind = file.kind();
        let log_store = LogStore::new(file, image);
        let state_machine = StateMachine::open(&config.data_dir)?;
        let applied = state_machine.applied();

        let raft_config = openraft::Config {
            cluster_name: "meridian".into(),
            heartbeat_interval: config.raft.heartbeat_ms,
            election_timeout_min: config.raft.election_min_ms,
            election_timeout_max: config.raft.election_max_ms,
            // Elections are started by `election_timer`, which re-draws the timeout every time
            // (openraft 0.9 draws it once per process: two nodes that drew close values split
            // every vote).
            enable_elect: false,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.raft.snapshot_after_entries),
            max_in_snapshot_log_to_keep: config.raft.keep_after_snapshot,
            install_snapshot_timeout: 2000,
            ..Default::default()
        };
        let raft_config = Arc::new(raft_config.validate().context("raft timing")?);
        let isolated = Arc::new(AtomicBool::new(false));
        let greater_log_seen = Arc::new(AtomicBool::new(false));
        let network = NetworkFactory {
            connector: connector.clone(),
            isolated: isolated.clone(),
            greater_log_seen: greater_log_seen.clone(),
        };
        let raft =
            Raft::new(config.id, raft_config, network, log_store, state_machine).await.context("starting raft")?;

        let local = timesource::read_local(config.glts.asserted_error_us);
        let local_source = local.source;
        let (proposals, pending) = tokio::sync::mpsc::unbounded_channel();
        let node = Arc::new(Self {
            id: config.id,
            raft,
            applied,
            connector,
            config,
            isolated,
            greater_log_seen,
            heartbeats: Mutex::default(),
            leader_since_ms: Mutex::default(),
            glts: Mutex::default(),
            proposals,
            local: Mutex::new(local),
            tracking: Mutex::default(),
            wal_volume: Mutex::default(),
            snapshot_due: tokio::sync::Notify::new(),
            set_watches: Mutex::default(),
            promotion_due: tokio::sync::Notify::new(),
        });
        let handler = node.clone();
        let serving = controlapi::net::serve(
            endpoint,
            move |request| {
                let node = handler.clone();
                async move { node.handle(request).await }
            },
            Outgoing::error,
        );
        tokio::spawn(serving);
        tokio::spawn(node.clone().batch_proposals(pending));
        tokio::spawn(node.clone().election_timer());
        tokio::spawn(node.clone().observe_raft());
        tokio::spawn(node.clone().glts_exchanges());
        tokio::spawn(node.clone().liveness_monitor());
        tokio::spawn(node.clone().replica_set_monitor());
        if node.config.snapshots.every_ms > 0 || node.config.snapshots.every_wal_bytes > 0 {
            tokio::spawn(node.clone().scheduled_snapshots());
        }
        tokio::spawn(node.clone().resume_snapshots());
        node.clone().bootstrap_or_join().await?;
        tracing::info!(
            node = node.id,
            listen = %node.config.listen,
            raft_log = %log_kind,
            glts_local_source = %local_source,
            "listening"
        );
        Ok(node)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Stops Raft (the log is durable at every acknowledgement, so this only ends the tasks)
    /// and closes the QUIC endpoint, telling peers the connections ended.
    pub async fn shutdown(&self) -> Result<()> {
        self.raft.shutdown().await.context("raft shutdown")?;
        self.connector.close().await;
        Ok(())
    }

    /// Pings systemd's watchdog (when `WatchdogSec` asked for it) each time the Raft core
    /// answers a state query, and keeps `STATUS=` current. A wedged core stops the pings, and
    /// systemd restarts the process.
    pub async fn watchdog(self: Arc<Self>) {
        let Some(period) = platform::notify::watchdog_interval() else { return };
        // Pings on a fixed cadence; a slow answer delays at most half a period.
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let query = self.raft.with_raft_state(|state| state.server_state);
            match tokio::time::timeout(period / 2, query).await {
                Ok(Ok(_)) => {
                    let metrics = self.raft.metrics().borrow().clone();
                    platform::notify::watchdog();
                    platform::notify::status(&format!(
                        "{:?} in term {}, leader {:?}, applied {}",
                        metrics.state,
                        metrics.current_term,
                        metrics.current_leader,
                        metrics.last_applied.map_or(0, |id| id.index)
                    ));
                }
                Ok(Err(_)) => return,
                Err(_) => {
                    tracing::warn!(
                        "the raft core did not answer within {:?}; withholding the watchdog ping",
                        period / 2
                    );
                    platform::notify::status("raft core not answering");
                }
            }
        }
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    async fn bootstrap_or_join(self: Arc<Self>) -> Result<()> {
        let members = self.config.members()?;
        let initialized = self.raft.is_initialized().await.context("raft")?;
        if initialized {
            return Ok(());
        }
        if members.first_key_value().is_some_and(|(lowest, _)| *lowest == self.id) {
            let nodes: BTreeMap<NodeId, ControlNode> =
                members.into_iter().map(|(id, addr)| (id, ControlNode { addr })).collect();
            match self.raft.initialize(nodes).await {
                Ok(()) => tracing::info!(node = self.id, "bootstrapped the cluster"),
                Err(RaftError::APIError(error)) => tracing::info!(%error, "not bootstrapping"),
                Err(error) => return Err(error).context("bootstrapping"),
            }
            return Ok(());
        }
        if members.is_empty() {
            // Join through the seeds: ask them who leads, then ask the leader to add us.
            let client =
                controlapi::client::ControlClient::with_connector(self.connector.clone(), self.config.seeds.clone());
            let request = Request::AddVoter { id: self.id, addr: self.config.advertised() };
            let node = self.clone();
            tokio::spawn(async move {
                loop {
                    match client.call(&request, Duration::from_secs(30)).await {
                        Ok(Response::Ok) => {
                            tracing::info!(node = node.id, "joined the cluster");
                            return;
                        }
                        Ok(other) => tracing::warn!(answer = ?other, "join refused; retrying"),
                        Err(error) => tracing::warn!("join failed: {error:#}; retrying"),
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
        Ok(())
    }

    async fn election_timer(self: Arc<Self>) {
        let raft_config = self.config.raft.clone();
        let tick = Duration::from_millis((raft_config.heartbeat_ms / 3).max(5));
        let draw = || rand::rng().random_range(raft_config.election_min_ms..raft_config.election_max_ms);
        let lease_ns = raft_config.election_max_ms * 1_000_000;
        let mut timeout_ns = draw() * 1_000_000;
        // Before any vote change is seen, count from the start (a restarted node gives the
        // leader a full timeout to reach it).
        let started = tokio::time::Instant::now();
        let mut leader_seen_at = None;
        loop {
            tokio::time::sleep(tick).await;
            let id = self.id;
            let Ok((state, last_modified, committed, voter)) = self
                .raft
                .with_raft_state(move |state| {
                    (
                        state.server_state,
                        state.vote_last_modified(),
                        state.vote_ref().is_committed(),
                        state.membership_state.effective().voter_ids().any(|voter| voter == id),
                    )
                })
                .await
            else {
                return;
            };
            if state == ServerState::Leader || !voter {
                continue;
            }
            let now = tokio::time::Instant::now();
            let since = last_modified.unwrap_or(started).max(started);
            let elapsed = u64::try_from(now.saturating_duration_since(since).as_nanos()).unwrap_or(u64::MAX);
            if committed && last_modified != leader_seen_at {
                // A leader refreshed our vote: the next election, if any, is a new cycle with
                // a fresh timeout (a penalty from an earlier lost election no longer applies).
                leader_seen_at = last_modified;
                timeout_ns = draw() * 1_000_000;
            }
            if self.greater_log_seen.swap(false, Ordering::Relaxed) {
                // A voter's log is ahead: give the nodes with longer logs time to win.
                timeout_ns = draw() * 1_000_000 + 2 * lease_ns;
            }
            let due = election_due(Some(elapsed), committed, timeout_ns, lease_ns);
            if due {
                tracing::info!(
                    node = self.id,
                    no_leader_ms = elapsed / 1_000_000,
                    timeout_ms = timeout_ns / 1_000_000,
                    after_lease = committed,
                    "starting an election"
                );
                let _ = self.raft.trigger().elect().await;
                timeout_ns = draw() * 1_000_000;
            }
        }
    }

    /// Logs role changes and exports Raft's state as metrics.
    async fn observe_raft(self: Arc<Self>) {
        let mut watch = self.raft.metrics();
        let mut last = (ServerState::Shutdown, None, 0);
        // Handles once: the watch fires on every append and apply.
        let term = metrics::gauge!("meridian_raft_term");
        let leader_id = metrics::gauge!("meridian_raft_leader_id");
        let is_leader = metrics::gauge!("meridian_raft_is_leader");
        let last_log_index = metrics::gauge!("meridian_raft_last_log_index");
        let applied_index = metrics::gauge!("meridian_raft_applied_index");
        let voters = metrics::gauge!("meridian_raft_voters");
        let role_changes = metrics::counter!("meridian_raft_role_changes_total");
        loop {
            let now = {
                let m = watch.borrow_and_update();
                term.set(m.current_term as f64);
                leader_id.set(m.current_leader.unwrap_or(0) as f64);
                is_leader.set(if m.state == ServerState::Leader { 1.0 } else { 0.0 });
                last_log_index.set(m.last_log_index.unwrap_or(0) as f64);
                // openraft 0.9 reports the applied index; it trails the commit index only by
                // the apply of the newest entries.
                applied_index.set(m.last_applied.map_or(0, |id| id.index) as f64);
                voters.set(m.membership_config.membership().voter_ids().count() as f64);
                (m.state, m.current_leader, m.current_term)
            };
            if now != last {
                role_changes.increment(1);
                tracing::info!(
                    node = self.id,
                    role = ?now.0,
                    term = now.2,
                    leader = ?now.1,
                    "raft role"
                );
                last = now;
            }
            if watch.changed().await.is_err() {
                return;
            }
        }
    }

    async fn glts_exchanges(self: Arc<Self>) {
        let period = Duration::from_millis(self.config.glts.sync_interval_ms);
        loop {
            tokio::time::sleep(period).await;
            let local = timesource::read_local(self.config.glts.asserted_error_us);
            *lock(&self.local) = local;
            let mono = timesource::mono_ns();
            let interval = local.interval(mono, timesource::realtime_ns(), self.config.glts.drift_ppm);
            let members = self.members();
            let voters = members.iter().filter(|m| m.voter).count().max(1);
            {
                let mut glts = lock(&self.glts);
                let wanted =
                    EstimatorConfig { drift_ppm: self.config.glts.drift_ppm, ..EstimatorConfig::for_sources(voters) };
                if glts.as_ref().is_none_or(|estimator| *estimator.config() != wanted) {
                    *glts = Estimator::new(wanted).ok();
                }
                if let Some(estimator) = glts.as_mut() {
                    let _ = estimator.observe_local(mono, interval);
                }
            }
            if self.isolated.load(Ordering::Relaxed) {
                continue;
            }
            let peers: Vec<(NodeId, String)> =
                members.into_iter().filter(|m| m.voter && m.id != self.id).map(|m| (m.id, m.addr)).collect();
            for (id, exchange) in exchange_all(&self.connector, &peers, period).await {
                if let Some(estimator) = lock(&self.glts).as_mut() {
                    let _ = estimator.observe_peer(id, exchange);
                }
            }
            if let Some(width) = self.glts_width_ns().map(|ns| ns as f64 / 1e9) {
                metrics::histogram!("meridian_glts_width_seconds").record(width);
                metrics::gauge!("meridian_glts_interval_width_current_seconds").set(width);
            }
        }
    }

    async fn liveness_monitor(self: Arc<Self>) {
        let membership = self.config.membership.clone();
        let period = Duration::from_millis((membership.suspect_after_ms / 4).max(50));
        loop {
            tokio::time::sleep(period).await;
            let leading = self.raft.metrics().borrow().state == ServerState::Leader;
            let now = timesource::unix_ms();
            let since = {
                let mut since = lock(&self.leader_since_ms);
                if !leading {
                    *since = None;
                    continue;
                }
                *since.get_or_insert(now)
            };
            let changes = {
                let heartbeats = lock(&self.heartbeats).clone();
                let applied = self.applied.read().unwrap_or_else(PoisonError::into_inner);
                applied.meta.liveness_changes(
                    &heartbeats,
                    since,
                    now,
                    membership.suspect_after_ms,
                    membership.dead_after_ms,
                )
            };
            for command in changes {
                let _ = self.write(command).await;
            }
        }
    }

    fn members(&self) -> Vec<Member> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| Member { id: *id, addr: node.addr.clone(), voter: voters.contains(id) })
            .collect()
    }

    fn leader_of(&self, leader: Option<NodeId>) -> Option<(NodeId, String)> {
        leader.and_then(|id| self.members().into_iter().find(|m| m.id == id)).map(|m| (m.id, m.addr))
    }

    fn leader_hint(&self, leader: Option<NodeId>) -> Response {
        Response::NotLeader { leader: self.leader_of(leader) }
    }

    /// Proposes `command` through the batcher and waits for its outcome.
    async fn write(&self, command: Command) -> Response {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        if self.proposals.send(Pending { command, reply }).is_err() {
            return Response::Error { message: "the node is shutting down".into() };
        }
        outcome.await.unwrap_or_else(|_| Response::Error { message: "the node is shutting down".into() })
    }

    /// Gathers the proposals waiting while earlier batches commit into one log entry each:
    /// one entry, one log sync on each node, however many writers (openraft 0.9 syncs every
    /// entry before taking the next). At most `BATCHES_IN_FLIGHT` batches are in flight.
    async fn batch_proposals(self: Arc<Self>, mut pending: tokio::sync::mpsc::UnboundedReceiver<Pending>) {
        const BATCHES_IN_FLIGHT: usize = 2;
        const BATCH_COMMANDS_MAX: usize = 1024;
        let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
        while let Some(first) = pending.recv().await {
            let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
            let mut batch = vec![first];
            while batch.len() < BATCH_COMMANDS_MAX {
                match pending.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let node = self.clone();
            tokio::spawn(async move {
                let (commands, replies): (Vec<Command>, Vec<_>) =
                    batch.into_iter().map(|p| (p.command, p.reply)).unzip();
                let result = node.propose(commands).await;
                drop(permit);
                match result {
                    Ok((outcomes, index)) => {
                        for (reply, outcome) in replies.into_iter().zip(outcomes) {
                            let _ = reply.send(Response::Written { outcome, index });
                        }
                    }
                    Err(refusal) => {
                        for reply in replies {
                            let _ = reply.send(refusal.response());
                        }
                    }
                }
            });
        }
    }

    /// Proposes one batch: each command's outcome and the entry's index, or why none applied.
    async fn propose(&self, commands: Vec<Command>) -> Result<(Vec<Outcome>, u64), Refusal> {
        let proposal = Proposal { at_ms: timesource::unix_ms(), commands };
        let timeout = Duration::from_millis(self.config.raft.write_timeout_ms);
        match tokio::time::timeout(timeout, self.raft.client_write(proposal)).await {
            Err(_) => {
                Err(Refusal::Failed(format!("not committed within {} ms (no quorum reachable?)", timeout.as_millis())))
            }
            Ok(Ok(written)) => Ok((written.data.0, written.log_id.index)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                Err(Refusal::NotLeader(self.leader_of(forward.leader_id)))
            }
            Ok(Err(error)) => Err(Refusal::Failed(error.to_string())),
        }
    }

    /// Records a global snapshot at this leader's GLTS `latest` (+ `lead_us`) and starts
    /// tracking when each region can read it.
    async fn create_snapshot(self: &Arc<Self>, lead_us: u64) -> Response {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return self.leader_hint(metrics.current_leader);
        }
        let requested_us = timesource::realtime_ns() / 1000;
        let mono = timesource::mono_ns();
        let interval = lock(&self.glts)
            .as_ref()
            .and_then(|estimator| estimator.now(mono).ok())
            .unwrap_or_else(|| lock(&self.local).interval(mono, timesource::realtime_ns(), self.config.glts.drift_ppm));
        let glt = crate::snapshots::snapshot_glt(interval.latest_ns, lead_us);
        // The WAL volume this snapshot covers; what is reported while it is written counts on.
        let volume = lock(&self.wal_volume).since_snapshot;
        match self.write(Command::CreateSnapshot { glt }).await {
            Response::Written { outcome: Outcome::SnapshotCreated { id }, index } => {
                let mut counted = lock(&self.wal_volume);
                counted.since_snapshot = counted.since_snapshot.saturating_sub(volume);
                drop(counted);
                lock(&self.tracking).insert(id);
                tokio::spawn(self.clone().track_snapshot(id, glt, requested_us));
                Response::Snapshot { id, glt, index }
            }
            Response::Written { outcome, .. } => {
                Response::Error { message: format!("snapshot not created: {outcome:?}") }
            }
            other => other,
        }
    }

    /// While leader, takes a global snapshot `snapshots.every_ms` after the last one, or
    /// sooner once the data nodes' WALs wrote `snapshots.every_wal_bytes` (heartbeats report
    /// the volume), whichever comes first.
    async fn scheduled_snapshots(self: Arc<Self>) {
        let every = (self.config.snapshots.every_ms > 0).then(|| Duration::from_millis(self.config.snapshots.every_ms));
        let mut next = every.map(|every| tokio::time::Instant::now() + every);
        loop {
            let trigger = tokio::select! {
                () = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => "schedule",
                () = self.snapshot_due.notified() => "wal_volume",
            };
            // A notice left from before a snapshot taken since (the count restarted) is stale.
            if trigger == "wal_volume" && lock(&self.wal_volume).since_snapshot < self.config.snapshots.every_wal_bytes
            {
                continue;
            }
            next = every.map(|every| tokio::time::Instant::now() + every);
            if self.raft.metrics().borrow().state != ServerState::Leader {
                continue;
            }
            match self.create_snapshot(self.config.snapshots.lead_us).await {
                Response::Snapshot { .. } => {
                    metrics::counter!("meridian_snapshots_taken_total", "trigger" => trigger).increment(1);
                }
                other => {
                    tracing::warn!(trigger, "snapshot not taken: {other:?}");
                    // The volume is still due: try again after a pause, not at every heartbeat.
                    tokio::time::sleep(SNAPSHOT_RETRY_AFTER).await;
                }
            }
        }
    }

    /// While leader, follows the snapshots still pending in some region that this node does
    /// not follow yet: those an earlier leader created and could not finish. Their time to
    /// readable counts from their creation (the proposing leader's clock).
    async fn resume_snapshots(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SNAPSHOT_RESUME_EVERY).await;
            if self.raft.metrics().borrow().state != ServerState::Leader {
                lock(&self.tracking).clear();
                continue;
            }
            let pending: Vec<(u64, u64, u64)> = {
                let applied = self.applied.read().unwrap_or_else(PoisonError::into_inner);
                applied
                    .meta
                    .snapshots
                    .iter()
                    .filter(|(_, s)| s.regions.values().any(|status| *status == SnapshotStatus::Pending))
                    .map(|(id, s)| (*id, s.glt, s.created_ms.saturating_mul(1000)))
                    .collect()
            };
            for (id, glt, created_us) in pending {
                if lock(&self.tracking).insert(id) {
                    tracing::info!(snapshot = id, "following a snapshot an earlier leader left pending");
                    tokio::spawn(self.clone().track_snapshot(id, glt, created_us));
                }
            }
        }
    }

    /// Asks one live data node per region (the others in turn if it fails) to answer once
    /// it can read snapshot `id` at `glt`, and records per region how long that took from
    /// `requested_us`, or `Failed` after `snapshots.track_timeout_ms`.
    async fn track_snapshot(self: Arc<Self>, id: u64, glt: u64, requested_us: u64) {
        // Only the regions still pending (a resumed snapshot may be readable in some already).
        let regions: Vec<String> = {
            let applied = self.applied.read().unwrap_or_else(PoisonError::into_inner);
            match applied.meta.snapshots.get(&id) {
                Some(snapshot) => snapshot
                    .regions
                    .iter()
                    .filter(|(_, status)| **status == SnapshotStatus::Pending)
                    .map(|(region, _)| region.clone())
                    .collect(),
                None => applied.meta.regions.keys().cloned().collect(),
            }
        };
        let track_max = Duration::from_millis(self.config.snapshots.track_timeout_ms);
        let mut tracking = tokio::task::JoinSet::new();
        for region in regions {
            let node = self.clone();
            tracking.spawn(async move {
                let deadline = tokio::time::Instant::now() + track_max;
                let readable = loop {
                    let addrs: Vec<String> = {
                        let applied = node.applied.read().unwrap_or_else(PoisonError::into_inner);
                        let nodes = applied.meta.data_nodes.values();
                        nodes.filter(|n| n.region == region && n.state == NodeState::Up).map(|n| n.addr.clone()).collect()
                    };
                    let mut answer = None;
                    for addr in &addrs {
                        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                        match crate::snapshots::wait_readable(addr, glt, left).await {
                            Ok(readable) => {
                                answer = Some(readable);
                                break;
                            }
                            Err(error) => tracing::debug!(snapshot = id, %region, %addr, "{error:#}"),
                        }
                    }
                    if answer.is_some() || tokio::time::Instant::now() >= deadline {
                        break answer;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                let (status, after_us) = match readable {
                    Some(readable) => (SnapshotStatus::Readable, Some(readable.at_us.saturating_sub(requested_us))),
                    None => {
                        tracing::warn!(snapshot = id, %region, "no data node of the region could read the snapshot in time");
                        (SnapshotStatus::Failed, None)
                    }
                };
                if let Some(after_us) = after_us {
                    metrics::histogram!("meridian_snapshot_available_seconds", "region" => region.clone())
                        .record(after_us as f64 / 1e6);
                }
                let _ = node.write(Command::SetSnapshotStatus { id, region, status, after_us }).await;
            });
        }
        while tracking.join_next().await.is_some() {}
        lock(&self.tracking).remove(&id);
    }

    /// The width of this node's GLTS interval now, when it has one.
    fn glts_width_ns(&self) -> Option<u64> {
        lock(&self.glts).as_ref().and_then(|estimator| estimator.now(timesource::mono_ns()).ok()).map(|i| i.width_ns())
    }

    fn status(&self) -> Status {
        let metrics = self.raft.metrics().borrow().clone();
        let role = match metrics.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        };
        let glts_width_us = self.glts_width_ns().map(|ns| ns as f64 / 1000.0);
        Status {
            node_id: self.id,
            role,
            leader: metrics.current_leader,
            term: metrics.current_term,
            last_log_index: metrics.last_log_index,
            applied_index: metrics.last_applied.map(|id| id.index),
            members: self.members(),
            meta: self.applied.read().unwrap_or_else(PoisonError::into_inner).meta.clone(),
            glts_width_us,
            glts_local_source: lock(&self.local).source.to_string(),
            isolated: self.isolated.load(Ordering::Relaxed),
        }
    }

    /// Answers one request: a peer's Raft message, or the API.
    pub async fn handle(self: Arc<Self>, request: Incoming) -> Outgoing {
        if request.is_peer_traffic() && self.isolated.load(Ordering::Relaxed) {
            return Outgoing::error("isolated by fault injection".into());
        }
        match request {
            Incoming::Raft(RaftRequest::AppendEntries(rpc)) => {
                Outgoing::Raft(RaftResponse::AppendEntries(self.raft.append_entries(rpc).await))
            }
            Incoming::Raft(RaftRequest::Vote(rpc)) => Outgoing::Raft(RaftResponse::Vote(self.raft.vote(rpc).await)),
            Incoming::Raft(RaftRequest::InstallSnapshot(rpc)) => {
                Outgoing::Raft(RaftResponse::InstallSnapshot(self.raft.install_snapshot(rpc).await))
            }
            Incoming::Api(request) => Outgoing::Api(self.handle_api(request).await),
        }
    }

    /// Answers one API request.
    async fn handle_api(self: Arc<Self>, request: Request) -> Response {
        match request {
            Request::TimeSync => {
                // The bound read by `glts_exchanges`, not a fresh read: no file or syscall work
                // per request beyond the clock itself.
                let received = timesource::mono_ns();
                let interval =
                    lock(&self.local).interval(received, timesource::realtime_ns(), self.config.glts.drift_ppm);
                Response::Time { interval, hold_ns: timesource::mono_ns().saturating_sub(received) }
            }
            Request::Write(command) => self.write(command).await,
            Request::Read { linearizable } => self.read(linearizable).await,
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Heartbeat { id, wal_bytes, replicas } => self.heartbeat(id, wal_bytes, &replicas),
            Request::AddVoter { id, addr } => self.add_voter(id, addr).await,
            Request::RemoveVoter { id } => {
                if !self.members().iter().any(|member| member.id == id && member.voter) {
                    return Response::Error { message: format!("node {id} is not a voter") };
                }
                self.change_membership(ChangeMembers::RemoveVoters([id].into())).await
            }
            Request::CreateSnapshot { lead_us } => self.create_snapshot(lead_us).await,
            Request::Isolate { isolated } => {
                if !self.config.fault_injection {
                    return Response::Error { message: "fault injection is disabled (fault_injection = false)".into() };
                }
                self.isolated.store(isolated, Ordering::Relaxed);
                tracing::warn!(node = self.id, isolated, "fault injection: isolation changed");
                Response::Ok
            }
        }
    }

    /// The metadata as applied here; `linearizable`: first confirmed current by a quorum.
    async fn read(&self, linearizable: bool) -> Response {
        if linearizable {
            // A heartbeat round that a quorum did not answer in time (a slow follower, a busy
            // machine) is asked again: the read is still safe, only later.
            let mut attempt = 1;
            loop {
                match self.raft.ensure_linearizable().await {
                    Ok(_) => break,
                    Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                        return self.leader_hint(forward.leader_id);
                    }
                    Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))
                        if attempt < LINEARIZABLE_ATTEMPTS =>
                    {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(error) => return Response::Error { message: error.to_string() },
                }
            }
        }
        let applied = self.applied.read().unwrap_or_else(PoisonError::into_inner);
        Response::State {
            meta: applied.meta.clone(),
            applied_index: applied.last_applied.map(|id| id.index),
            members: applied.membership.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect(),
        }
    }

    /// A data node's heartbeat (at the leader): its liveness, and its WAL volume for
    /// snapshots taken on volume.
    fn heartbeat(&self, id: String, wal_bytes: u64, replicas: &[ReplicaReport]) -> Response {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return self.leader_hint(metrics.current_leader);
        }
        if !self.applied.read().unwrap_or_else(PoisonError::into_inner).meta.data_nodes.contains_key(&id) {
            return Response::Error { message: format!("data node {id:?} is not registered") };
        }
        let every = self.config.snapshots.every_wal_bytes;
        if lock(&self.wal_volume).report(metrics.current_term, &id, wal_bytes, every) {
            self.snapshot_due.notify_one();
        }
        let now = timesource::unix_ms();
        lock(&self.heartbeats).insert(id.clone(), now);
        if replicas.is_empty() {
            return Response::Ok;
        }
        self.replica_reports(&id, replicas, now)
    }

    /// A data node's reports on the shard copies it keeps: renews the leases of the sets it
    /// leads, answers with the sets of its region it is placed in.
    fn replica_reports(&self, id: &str, replicas: &[ReplicaReport], now: u64) -> Response {
        let lease_ms = self.config.replica_sets.lease_ms;
        let applied = self.applied.read().unwrap_or_else(PoisonError::into_inner);
        let Some(region) = applied.meta.data_nodes.get(id).map(|node| node.region.clone()) else {
            return Response::Error { message: format!("data node {id:?} is not registered") };
        };
        let sets = applied.meta.replica_sets.get(&region);
        let mut restarted = false;
        {
            let mut watches = lock(&self.set_watches);
            for report in replicas {
                if let Some(config) = sets.and_then(|sets| sets.get(&report.shard)) {
                    let watch = watches.entry((region.clone(), report.shard)).or_default();
                    watch.report(config, id, report, now, lease_ms);
                    restarted |= watch.restarted;
                }
            }
        }
        if restarted {
            self.promotion_due.notify_one();
        }
        let placed = sets
            .into_iter()
            .flatten()
            .filter(|(_, config)| config.placed().any(|node| node == id))
            .map(|(shard, config)| (*shard, config.clone()))
            .collect();
        Response::Sets { sets: placed, lease_ms }
    }

    /// As leader: promotes a new primary for every set whose primary's lease lapsed (or which
    /// restarted as primary), through Raft, from the members' recent reports. A new leader
    /// first gives every primary a whole lease from its own start.
    async fn replica_set_monitor(self: Arc<Self>) {
        let sets_config = self.config.replica_sets.clone();
        let period = Duration::from_millis((sets_config.lease_ms / 40).max(5));
        // The Raft term this node leads in, and since when: a new term (even this node's own,
        // after a short loss of leadership) starts every watch over, with a whole lease.
        let (mut watch_term, mut since) = (0, 0);
        loop {
            let _ = tokio::time::timeout(period, self.promotion_due.notified()).await;
            let (leading, term) = {
                let metrics = self.raft.metrics().borrow().clone();
                (metrics.state == ServerState::Leader, metrics.current_term)
            };
            let now = timesource::unix_ms();
            if !leading {
                watch_term = 0;
                continue;
            }
            if term != watch_term {
                lock(&self.set_watches).clear();
                (watch_term, since) = (term, now);
                continue;
            }
            let due = {
                let applied = self.applied.read().unwrap_or_else(PoisonError::into_inner);
                let mut watches = lock(&self.set_watches);
                let mut due = Vec::new();
                for (region, sets) in &applied.meta.replica_sets {
                    let under = sets.values().filter(|config| config.members.len() < config.replicas).count();
                    metrics::gauge!("meridian_replica_sets_under_replicated", "region" => region.clone())
                        .set(under as f64);
                    metrics::gauge!("meridian_replica_sets", "region" => region.clone()).set(sets.len() as f64);
                    for (shard, config) in sets {
                        let watch = watches.entry((region.clone(), *shard)).or_default();
                        watch.follow(config, now, sets_config.lease_ms);
                        let grace = since + sets_config.lease_ms + sets_config.margin_ms();
                        let mut effective = watch.clone();
                        effective.lease_expires_ms = (watch.lease_expires_ms + sets_config.margin_ms()).max(grace);
                        if let Some(reports) = effective.due(config, now, sets_config.fresh_ms()) {
                            tracing::info!(
                                region = %region,
                                shard,
                                epoch = config.epoch,
                                primary = %config.primary,
                                lapsed_ms = now.saturating_sub(effective.lease_expires_ms),
                                "replica set primary's lease lapsed; promoting"
                            );
                            due.push(Command::PromoteReplicaSet {
                                region: region.clone(),
                                shard: *shard,
                                epoch: config.epoch,
                                reports,
                            });
                        }
                    }
                }
                due
            };
            for command in due {
                let Command::PromoteReplicaSet { region, shard, .. } = &command else { continue };
                let key = (region.clone(), *shard);
                let outcome = self.write(command.clone()).await;
                if let Response::Written { outcome: Outcome::ReplicaSet { config }, .. } = &outcome {
                    tracing::warn!(region = %key.0, shard = key.1, epoch = config.epoch, primary = %config.primary, "replica set promoted");
                    metrics::counter!("meridian_replica_set_promotions_total").increment(1);
                    let mut watches = lock(&self.set_watches);
                    let watch = watches.entry(key).or_default();
                    // The new primary gets a whole lease to take over.
                    watch.lease_expires_ms = timesource::unix_ms() + sets_config.lease_ms;
                    watch.restarted = false;
                }
            }
        }
    }

    /// Adds node `id` at `addr` as a learner, then a voter, once it answers there as `id`.
    async fn add_voter(&self, id: NodeId, addr: String) -> Response {
        // Only a running node with that id may become a voter: an unreachable voter would
        // weaken the quorum from the moment it is added.
        match controlapi::net::call(&self.connector, &addr, &Request::Status, Duration::from_secs(2)).await {
            Ok(Response::Status(status)) if status.node_id == id => {}
            Ok(Response::Status(status)) => {
                return Response::Error {
                    message: format!("the node at {addr} is node {}, not node {id}", status.node_id),
                };
            }
            Ok(other) => return Response::Error { message: format!("node {id} at {addr} answered {other:?}") },
            Err(error) => {
                return Response::Error { message: format!("node {id} does not answer at {addr}: {error}") };
            }
        }
        let node = ControlNode { addr };
        match self.raft.add_learner(id, node, true).await {
            Ok(_) => {}
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                return self.leader_hint(forward.leader_id);
            }
            Err(error) => return Response::Error { message: format!("adding learner {id}: {error}") },
        }
        self.change_membership(ChangeMembers::AddVoterIds([id].into())).await
    }

    async fn change_membership(&self, change: ChangeMembers<NodeId, ControlNode>) -> Response {
        match self.raft.change_membership(change, false).await {
            Ok(_) => Response::Ok,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => self.leader_hint(forward.leader_id),
            Err(error) => Response::Error { message: error.to_string() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elections_wait_for_the_timeout_and_a_seen_leaders_lease() {
        assert!(election_due(None, false, 10, 100));
        assert!(!election_due(Some(9), false, 10, 100));
        assert!(election_due(Some(10), false, 10, 100));
        assert!(!election_due(Some(109), true, 10, 100));
        assert!(election_due(Some(110), true, 10, 100));
    }

    #[test]
    fn wal_volume_counts_growth_since_the_last_snapshot() {
        let mut volume = WalVolume::default();
        assert!(!volume.report(1, "a", 10_000, 1000), "a first report counts nothing");
        assert!(!volume.report(1, "a", 10_600, 1000));
        assert!(!volume.report(1, "b", 50, 1000));
        assert!(!volume.report(1, "b", 300, 1000));
        assert!(volume.report(1, "a", 10_800, 1000), "600 + 250 + 200 bytes since");
        volume.since_snapshot = 0;
        assert!(!volume.report(1, "b", 100, 1000), "a restart counts from zero: 100");
        assert!(volume.report(1, "b", 1100, 1000));
        assert!(!volume.report(3, "b", 90_000, 1000), "leading again in a later term starts over");
        assert!(!volume.report(3, "b", 90_500, 1000));
        assert!(volume.report(3, "b", 91_000, 1000));
        assert!(!WalVolume::default().report(1, "a", 5, 0) && !volume.report(3, "a", u64::MAX, 0), "0: off");
    }
}
