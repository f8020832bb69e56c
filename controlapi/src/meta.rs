//! The metadata state machine: regions and zones, data nodes, shard placement, shard-primary
//! leases, the snapshot catalog and cluster config.
//!
//! Pure and deterministic: [`MetaState::apply`] takes a command and the leader's proposal
//! time from the log entry, never a clock, so every replica computes the same state. Rejected
//! commands change nothing and return an [`Outcome::Rejected`] that says why.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::replica::{LogShape, SetConfig, choose_nodes, promote};

/// Global snapshots the catalog keeps; older ones leave it as new ones come (an archive keeps
/// what was exported).
pub const SNAPSHOTS_KEPT: usize = 10_000;

/// A region and its zones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Zones of the region.
    pub zones: Vec<String>,
}

/// Liveness of a data node as the leader judges it from heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Heartbeats arrive.
    Up,
    /// No heartbeat for `membership.suspect_after_ms`.
    Suspect,
    /// No heartbeat for `membership.dead_after_ms`; its leases are not renewed.
    Dead,
}

/// A registered data node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataNode {
    /// Client address (`host:port` of shard 0).
    pub addr: String,
    /// Replica-set endpoint (QUIC `host:port`; empty: the node runs no replica sets).
    #[serde(default)]
    pub replica_addr: String,
    /// Region it is in.
    pub region: String,
    /// Zone it is in.
    pub zone: String,
    /// Shards (cores) it runs.
    pub shards: u32,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Liveness.
    pub state: NodeState,
    /// When it registered (leader time, unix ms).
    pub registered_ms: u64,
}

/// Where a shard lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The region that takes the shard's writes.
    pub home: String,
    /// Regions that receive its replication stream.
    pub replicas: Vec<String>,
}

/// The lease of a shard's primary. The epoch grows by one at every change of holder, so a
/// former holder's epoch fences its writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Data node holding it.
    pub holder: String,
    /// Fencing epoch.
    pub epoch: u64,
    /// Expiry, leader time in unix ms.
    pub expires_ms: u64,
}

/// Status of a global snapshot in one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotStatus {
    /// The region has not yet applied everything up to the snapshot's GLT.
    Pending,
    /// Readable in that region.
    Readable,
    /// Given up (retention passed before the region caught up, or cancelled).
    Failed,
}

/// A global snapshot: a GLT and where it is readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The timestamp the snapshot reads at.
    pub glt: u64,
    /// Per-region status.
    pub regions: BTreeMap<String, SnapshotStatus>,
    /// When it was created (leader time, unix ms).
    pub created_ms: u64,
    /// Per region, µs from the request to the region's data node seeing it readable.
    #[serde(default)]
    pub readable_after_us: BTreeMap<String, u64>,
}

/// A change to the metadata. Everything that is replicated goes through one of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Creates a region or replaces its zone list.
    PutRegion {
        /// Region name.
        name: String,
        /// Its zones.
        zones: Vec<String>,
    },
    /// Registers a data node, or updates its address and size when it registers again.
    RegisterDataNode {
        /// Node id chosen by the node (stable across restarts).
        id: String,
        /// Client address.
        addr: String,
        /// Region.
        region: String,
        /// Zone.
        zone: String,
        /// Shards.
        shards: u32,
        /// Capacity in bytes.
        capacity_bytes: u64,
        /// The node's replica-set endpoint (QUIC; empty: none).
        #[serde(default)]
        replica_addr: String,
    },
    /// Sets a data node's liveness (proposed by the leader's heartbeat monitor).
    SetDataNodeState {
        /// Node id.
        id: String,
        /// New state.
        state: NodeState,
    },
    /// Removes a data node; its leases are dropped.
    RemoveDataNode {
        /// Node id.
        id: String,
    },
    /// Places a shard.
    SetPlacement {
        /// Shard number.
        shard: u32,
        /// Home region.
        home: String,
        /// Replica regions.
        replicas: Vec<String>,
    },
    /// Acquires or renews the lease of a shard's primary.
    AcquireLease {
        /// Shard number.
        shard: u32,
        /// Data node asking.
        holder: String,
        /// Lease length.
        duration_ms: u64,
    },
    /// Gives a lease up before it expires (only with the current epoch).
    ReleaseLease {
        /// Shard number.
        shard: u32,
        /// Holder giving it up.
        holder: String,
        /// The epoch it holds.
        epoch: u64,
    },
    /// Adds a global snapshot at `glt`, pending in every known region.
    CreateSnapshot {
        /// Snapshot timestamp.
        glt: u64,
    },
    /// Records a region's progress on a snapshot.
    SetSnapshotStatus {
        /// Snapshot id.
        id: u64,
        /// Region.
        region: String,
        /// New status.
        status: SnapshotStatus,
        /// With `Readable`: µs from the request until the region could read it.
        #[serde(default)]
        after_us: Option<u64>,
    },
    /// Places a replica set for every shard `0..shards` of `region` that has none: `replicas`
    /// of the region's Up data nodes, in distinct zones while zones last, the least loaded
    /// first (`replica::choose_nodes`). Refused when fewer than `min_replicas` nodes are Up; a
    /// set with fewer members than `replicas` is shown under-replicated.
    PlaceReplicaSets {
        /// Region.
        region: String,
        /// Logical shards.
        shards: u32,
        /// Copies per shard.
        replicas: usize,
        /// Fewest members a set takes writes with.
        min_replicas: usize,
    },
    /// A change of a set its primary asks for at its epoch.
    ChangeReplicaSet {
        /// Region.
        region: String,
        /// Shard.
        shard: u32,
        /// The primary asking.
        requester: String,
        /// The epoch it asks at.
        epoch: u64,
        /// What to change.
        change: SetChange,
    },
    /// A new primary for a set at `epoch` whose primary's lease lapsed (or which restarted as
    /// primary): the newest of the logs its members reported (`replica::promote`). The
    /// leader puts the reports in the command, so every member applies the same decision.
    PromoteReplicaSet {
        /// Region.
        region: String,
        /// Shard.
        shard: u32,
        /// The set's epoch the decision was made at.
        epoch: u64,
        /// Members that reported recently, with their durable logs.
        reports: Vec<(String, LogShape)>,
    },
    /// Sets a cluster config key.
    SetConfig {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
}

impl Command {
    /// Whether applying it twice leaves the same state as once (a client may resend it when
    /// it cannot tell whether the first attempt was applied).
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self,
            Self::PutRegion { .. }
                | Self::RegisterDataNode { .. }
                | Self::SetDataNodeState { .. }
                | Self::SetPlacement { .. }
                | Self::PlaceReplicaSets { .. }
                | Self::SetConfig { .. }
        )
    }
}

/// A change of a replica set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum SetChange {
    /// A member that stopped answering becomes a learner.
    Remove {
        /// The member.
        node: String,
    },
    /// A learner holding every acknowledged write becomes a member.
    Add {
        /// The learner.
        node: String,
    },
}

/// What applying a command gave.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Applied (or a membership/blank entry).
    #[default]
    Done,
    /// A lease was granted or renewed.
    Lease {
        /// The fencing epoch to write with.
        epoch: u64,
        /// Expiry, unix ms of leader time.
        expires_ms: u64,
    },
    /// A replica set changed.
    ReplicaSet {
        /// The set now.
        config: SetConfig,
    },
    /// A snapshot was created.
    SnapshotCreated {
        /// Its id.
        id: u64,
    },
    /// Refused; nothing changed.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// The whole replicated metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// Regions by name.
    pub regions: BTreeMap<String, Region>,
    /// Data nodes by id.
    pub data_nodes: BTreeMap<String, DataNode>,
    /// Placement by shard.
    pub placement: BTreeMap<u32, Placement>,
    /// Leases by shard.
    pub leases: BTreeMap<u32, Lease>,
    /// Snapshot catalog by id.
    pub snapshots: BTreeMap<u64, Snapshot>,
    /// Next snapshot id.
    pub next_snapshot_id: u64,
    /// Cluster config.
    pub config: BTreeMap<String, String>,
    /// Replica sets by region, then shard.
    #[serde(default)]
    pub replica_sets: BTreeMap<String, BTreeMap<u32, SetConfig>>,
}

fn rejected(reason: impl Into<String>) -> Outcome {
    Outcome::Rejected { reason: reason.into() }
}

impl MetaState {
    /// Applies `command` as proposed at `at_ms` (leader time, unix ms).
    pub fn apply(&mut self, at_ms: u64, command: &Command) -> Outcome {
        match command {
            Command::PutRegion { name, zones } => {
                if name.is_empty() {
                    return rejected("region name is empty");
                }
                self.regions.insert(name.clone(), Region { zones: zones.clone() });
                Outcome::Done
            }
            Command::RegisterDataNode { id, addr, region, zone, shards, capacity_bytes, replica_addr } => {
                let node = DataNode {
                    addr: addr.clone(),
                    replica_addr: replica_addr.clone(),
                    region: region.clone(),
                    zone: zone.clone(),
                    shards: *shards,
                    capacity_bytes: *capacity_bytes,
                    state: NodeState::Up,
                    registered_ms: self.data_nodes.get(id).map_or(at_ms, |node| node.registered_ms),
                };
                self.register_data_node(id, node)
            }
            Command::SetDataNodeState { id, state } => match self.data_nodes.get_mut(id) {
                Some(node) => {
                    node.state = *state;
                    Outcome::Done
                }
                None => rejected(format!("unknown data node {id:?}")),
            },
            Command::RemoveDataNode { id } => {
                if self.data_nodes.remove(id).is_none() {
                    return rejected(format!("unknown data node {id:?}"));
                }
                self.leases.retain(|_, lease| lease.holder != *id);
                Outcome::Done
            }
            Command::SetPlacement { shard, home, replicas } => {
                for region in std::iter::once(home).chain(replicas) {
                    if !self.regions.contains_key(region) {
                        return rejected(format!("unknown region {region:?}"));
                    }
                }
                if replicas.contains(home) {
                    return rejected("the home region cannot also be a replica region");
                }
                self.placement.insert(*shard, Placement { home: home.clone(), replicas: replicas.clone() });
                Outcome::Done
            }
            Command::AcquireLease { shard, holder, duration_ms } => {
                self.acquire_lease(at_ms, *shard, holder, *duration_ms)
            }
            Command::ReleaseLease { shard, holder, epoch } => match self.leases.get_mut(shard) {
                Some(lease) if lease.holder == *holder && lease.epoch == *epoch => {
                    lease.expires_ms = at_ms;
                    Outcome::Done
                }
                Some(lease) => rejected(format!(
                    "shard {shard} lease is held by {:?} at epoch {}, not {holder:?} at epoch {epoch}",
                    lease.holder, lease.epoch
                )),
                None => rejected(format!("shard {shard} has no lease")),
            },
            Command::CreateSnapshot { glt } => self.create_snapshot(at_ms, *glt),
            Command::SetSnapshotStatus { id, region, status, after_us } => {
                self.set_snapshot_status(*id, region, *status, *after_us)
            }
            Command::PlaceReplicaSets { region, shards, replicas, min_replicas } => {
                self.place_replica_sets(region, *shards, *replicas, *min_replicas)
            }
            Command::ChangeReplicaSet { region, shard, requester, epoch, change } => {
                let Some(config) = self.replica_sets.get_mut(region).and_then(|sets| sets.get_mut(shard)) else {
                    return rejected(format!("shard {shard} has no replica set in region {region:?}"));
                };
                let changed = match change {
                    SetChange::Remove { node } => config.remove(requester, *epoch, node),
                    SetChange::Add { node } => config.add(requester, *epoch, node),
                };
                match changed {
                    Ok(next) => {
                        *config = next.clone();
                        Outcome::ReplicaSet { config: next }
                    }
                    Err(error) => rejected(error.to_string()),
                }
            }
            Command::PromoteReplicaSet { region, shard, epoch, reports } => {
                let Some(config) = self.replica_sets.get_mut(region).and_then(|sets| sets.get_mut(shard)) else {
                    return rejected(format!("shard {shard} has no replica set in region {region:?}"));
                };
                if config.epoch != *epoch {
                    return rejected(format!(
                        "the set is at epoch {}, the promotion was decided at {epoch}",
                        config.epoch
                    ));
                }
                match promote(config, reports) {
                    Some(next) => {
                        *config = next.clone();
                        Outcome::ReplicaSet { config: next }
                    }
                    None => rejected(format!("no member of shard {shard}'s set in {region:?} reported")),
                }
            }
            Command::SetConfig { key, value } => {
                if key.is_empty() {
                    return rejected("config key is empty");
                }
                self.config.insert(key.clone(), value.clone());
                Outcome::Done
            }
        }
    }

    fn place_replica_sets(&mut self, region: &str, shards: u32, replicas: usize, min_replicas: usize) -> Outcome {
        if !self.regions.contains_key(region) {
            return rejected(format!("unknown region {region:?}"));
        }
        if shards == 0 || min_replicas == 0 || min_replicas > replicas {
            return rejected(format!(
                "need shards >= 1 and 1 <= min_replicas <= replicas (got shards {shards}, replicas {replicas}, \
                 min_replicas {min_replicas})"
            ));
        }
        let candidates: Vec<(String, String)> = self
            .data_nodes
            .iter()
            .filter(|(_, node)| node.region == region && node.state == NodeState::Up)
            .map(|(id, node)| (id.clone(), node.zone.clone()))
            .collect();
        if candidates.len() < min_replicas {
            return rejected(format!(
                "region {region:?} has {} up data nodes, fewer than min_replicas {min_replicas}",
                candidates.len()
            ));
        }
        let (mut load, mut leading) = (BTreeMap::<String, usize>::new(), BTreeMap::<String, usize>::new());
        for config in self.replica_sets.values().flat_map(BTreeMap::values) {
            for node in config.placed() {
                *load.entry(node.clone()).or_default() += 1;
            }
            *leading.entry(config.primary.clone()).or_default() += 1;
        }
        let sets = self.replica_sets.entry(region.to_owned()).or_default();
        for shard in 0..shards {
            if sets.contains_key(&shard) {
                continue;
            }
            let mut nodes = choose_nodes(&candidates, &load, replicas);
            // The primary: the chosen node leading the fewest sets.
            let lead =
                (0..nodes.len()).min_by_key(|index| leading.get(&nodes[*index]).copied().unwrap_or(0)).unwrap_or(0);
            nodes.swap(0, lead);
            for node in &nodes {
                *load.entry(node.clone()).or_default() += 1;
            }
            if let Some(primary) = nodes.first() {
                *leading.entry(primary.clone()).or_default() += 1;
            }
            let mut config = SetConfig::initial(&nodes, min_replicas);
            config.replicas = replicas;
            sets.insert(shard, config);
        }
        Outcome::Done
    }

    fn register_data_node(&mut self, id: &str, node: DataNode) -> Outcome {
        let Some(known) = self.regions.get(&node.region) else {
            return rejected(format!("unknown region {:?}", node.region));
        };
        if !known.zones.contains(&node.zone) {
            return rejected(format!("region {:?} has no zone {:?}", node.region, node.zone));
        }
        if node.shards == 0 {
            return rejected("a data node needs at least one shard");
        }
        self.data_nodes.insert(id.to_owned(), node);
        Outcome::Done
    }

    fn create_snapshot(&mut self, at_ms: u64, glt: u64) -> Outcome {
        let id = self.next_snapshot_id;
        self.next_snapshot_id += 1;
        let regions = self.regions.keys().map(|name| (name.clone(), SnapshotStatus::Pending)).collect();
        let snapshot = Snapshot { glt, regions, created_ms: at_ms, readable_after_us: BTreeMap::new() };
        self.snapshots.insert(id, snapshot);
        // The catalog keeps the newest SNAPSHOTS_KEPT (scheduled snapshots never end).
        while self.snapshots.len() > SNAPSHOTS_KEPT {
            self.snapshots.pop_first();
        }
        Outcome::SnapshotCreated { id }
    }

    fn set_snapshot_status(&mut self, id: u64, region: &str, status: SnapshotStatus, after_us: Option<u64>) -> Outcome {
        let Some(snapshot) = self.snapshots.get_mut(&id) else {
            return rejected(format!("unknown snapshot {id}"));
        };
        let Some(current) = snapshot.regions.get_mut(region) else {
            return rejected(format!("snapshot {id} does not cover region {region:?}"));
        };
        if *current != SnapshotStatus::Pending && *current != status {
            return rejected(format!("snapshot {id} is already {current:?} in {region:?}"));
        }
        *current = status;
        if let (SnapshotStatus::Readable, Some(after_us)) = (status, after_us) {
            snapshot.readable_after_us.entry(region.to_owned()).or_insert(after_us);
        }
        Outcome::Done
    }

    fn acquire_lease(&mut self, at_ms: u64, shard: u32, holder: &str, duration_ms: u64) -> Outcome {
        match self.data_nodes.get(holder) {
            None => return rejected(format!("unknown data node {holder:?}")),
            Some(node) if node.state == NodeState::Dead => {
                return rejected(format!("data node {holder:?} is dead; it must register again"));
            }
            Some(_) => {}
        }
        if duration_ms == 0 {
            return rejected("lease duration must be > 0");
        }
        let expires_ms = at_ms.saturating_add(duration_ms);
        match self.leases.get_mut(&shard) {
            Some(lease) if lease.holder == holder => {
                lease.expires_ms = expires_ms;
                Outcome::Lease { epoch: lease.epoch, expires_ms }
            }
            Some(lease) if lease.expires_ms > at_ms => rejected(format!(
                "shard {shard} lease is held by {:?} (epoch {}) until {}",
                lease.holder, lease.epoch, lease.expires_ms
            )),
            previous => {
                let epoch = previous.map_or(1, |lease| lease.epoch + 1);
                self.leases.insert(shard, Lease { holder: holder.to_owned(), epoch, expires_ms });
                Outcome::Lease { epoch, expires_ms }
            }
        }
    }

    /// The state changes the leader should propose for data nodes whose last heartbeat (unix
    /// ms, leader time; absent: none since this leader took over at `since_ms`) is older than
    /// the named timeouts.
    pub fn liveness_changes(
        &self,
        last_heartbeat_ms: &BTreeMap<String, u64>,
        since_ms: u64,
        now_ms: u64,
        suspect_after_ms: u64,
        dead_after_ms: u64,
    ) -> Vec<Command> {
        self.data_nodes
            .iter()
            .filter_map(|(id, node)| {
                let heard = last_heartbeat_ms.get(id).copied().unwrap_or(since_ms);
                let silent = now_ms.saturating_sub(heard);
                let wanted = if silent >= dead_after_ms {
                    NodeState::Dead
                } else if silent >= suspect_after_ms {
                    NodeState::Suspect
                } else {
                    NodeState::Up
                };
                (wanted != node.state && !(node.state == NodeState::Dead && wanted != NodeState::Up))
                    .then(|| Command::SetDataNodeState { id: id.clone(), state: wanted })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> MetaState {
        let mut state = MetaState::default();
        let put = |name: &str| Command::PutRegion { name: name.into(), zones: vec!["a".into(), "b".into()] };
        assert_eq!(state.apply(0, &put("eu")), Outcome::Done);
        assert_eq!(state.apply(0, &put("us")), Outcome::Done);
        for id in ["n1", "n2"] {
            let register = Command::RegisterDataNode {
                id: id.into(),
                addr: "127.0.0.1:1".into(),
                region: "eu".into(),
                zone: "a".into(),
                shards: 2,
                capacity_bytes: 1 << 30,
                replica_addr: String::new(),
            };
            assert_eq!(state.apply(0, &register), Outcome::Done);
        }
        state
    }

    fn acquire(state: &mut MetaState, at_ms: u64, holder: &str) -> Outcome {
        state.apply(at_ms, &Command::AcquireLease { shard: 7, holder: holder.into(), duration_ms: 1000 })
    }

    #[test]
    fn replica_sets_are_placed_over_zones_changed_by_their_primary_and_promoted() {
        let mut state = cluster();
        let register = Command::RegisterDataNode {
            id: "n3".into(),
            addr: "127.0.0.1:1".into(),
            region: "eu".into(),
            zone: "b".into(),
            shards: 2,
            capacity_bytes: 1 << 30,
            replica_addr: String::new(),
        };
        assert_eq!(state.apply(0, &register), Outcome::Done);
        let place = |shards, replicas, min_replicas| Command::PlaceReplicaSets {
            region: "eu".into(),
            shards,
            replicas,
            min_replicas,
        };
        assert!(matches!(state.apply(0, &place(4, 3, 4)), Outcome::Rejected { .. }));
        assert!(matches!(state.apply(0, &place(0, 3, 2)), Outcome::Rejected { .. }));
        assert_eq!(state.apply(0, &place(4, 3, 2)), Outcome::Done);
        let sets = &state.replica_sets["eu"];
        assert_eq!(sets.len(), 4);
        for config in sets.values() {
            assert_eq!((config.epoch, config.members.len()), (1, 3));
            // n3 is the only node in zone b: every set has it.
            assert!(config.is_member("n3"), "{config:?}");
        }
        // Primaries spread: not every set led by the same node.
        let primaries: std::collections::BTreeSet<&String> = sets.values().map(|config| &config.primary).collect();
        assert!(primaries.len() > 1, "{primaries:?}");
        // Placing again leaves existing sets alone.
        let before = state.replica_sets.clone();
        assert_eq!(state.apply(0, &place(4, 3, 2)), Outcome::Done);
        assert_eq!(state.replica_sets, before);

        let config = state.replica_sets["eu"][&0].clone();
        let other = config.members.iter().find(|node| **node != config.primary).unwrap().clone();
        let remove = |epoch| Command::ChangeReplicaSet {
            region: "eu".into(),
            shard: 0,
            requester: config.primary.clone(),
            epoch,
            change: SetChange::Remove { node: other.clone() },
        };
        let Outcome::ReplicaSet { config: removed } = state.apply(0, &remove(1)) else { panic!("not removed") };
        assert_eq!((removed.epoch, removed.members.len(), removed.learners.clone()), (2, 2, vec![other.clone()]));
        assert!(matches!(state.apply(0, &remove(1)), Outcome::Rejected { .. }), "a stale epoch is refused");

        let reports = vec![(other.clone(), LogShape { epochs: vec![(1, 1)], end: 9 })];
        let promote = |epoch, reports: &Vec<(String, LogShape)>| Command::PromoteReplicaSet {
            region: "eu".into(),
            shard: 0,
            epoch,
            reports: reports.clone(),
        };
        assert!(
            matches!(state.apply(0, &promote(2, &reports)), Outcome::Rejected { .. }),
            "learners are never promoted"
        );
        let survivor = removed.members.iter().find(|node| **node != removed.primary).unwrap().clone();
        let reports = vec![(survivor.clone(), LogShape { epochs: vec![(1, 1)], end: 5 })];
        assert!(matches!(state.apply(0, &promote(1, &reports)), Outcome::Rejected { .. }), "decided at a stale epoch");
        let Outcome::ReplicaSet { config: promoted } = state.apply(0, &promote(2, &reports)) else {
            panic!("not promoted")
        };
        // The silent old primary stays a member: min_replicas is 2.
        assert_eq!(
            (promoted.epoch, promoted.primary.clone(), promoted.members.clone()),
            (3, survivor.clone(), vec![survivor, removed.primary.clone()])
        );
        // The metadata's JSON round-trips (Raft snapshots carry it).
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<MetaState>(&json).unwrap(), state);
    }

    #[test]
    fn a_new_holder_gets_a_higher_epoch_only_after_expiry() {
        let mut state = cluster();
        assert_eq!(acquire(&mut state, 100, "n1"), Outcome::Lease { epoch: 1, expires_ms: 1100 });
        assert!(matches!(acquire(&mut state, 500, "n2"), Outcome::Rejected { .. }));
        assert_eq!(acquire(&mut state, 900, "n1"), Outcome::Lease { epoch: 1, expires_ms: 1900 });
        assert_eq!(acquire(&mut state, 1900, "n2"), Outcome::Lease { epoch: 2, expires_ms: 2900 });
        // The old holder is fenced: it cannot release with its stale epoch.
        let stale = Command::ReleaseLease { shard: 7, holder: "n1".into(), epoch: 1 };
        assert!(matches!(state.apply(2000, &stale), Outcome::Rejected { .. }));
        let release = Command::ReleaseLease { shard: 7, holder: "n2".into(), epoch: 2 };
        assert_eq!(state.apply(2000, &release), Outcome::Done);
        assert_eq!(acquire(&mut state, 2000, "n1"), Outcome::Lease { epoch: 3, expires_ms: 3000 });
    }

    #[test]
    fn rejected_commands_change_nothing() {
        let mut state = cluster();
        let before = state.clone();
        let bad = [
            Command::RegisterDataNode {
                id: "x".into(),
                addr: "a".into(),
                region: "mars".into(),
                zone: "a".into(),
                shards: 1,
                capacity_bytes: 1,
                replica_addr: String::new(),
            },
            Command::SetPlacement { shard: 1, home: "eu".into(), replicas: vec!["eu".into()] },
            Command::SetPlacement { shard: 1, home: "eu".into(), replicas: vec!["mars".into()] },
            Command::AcquireLease { shard: 1, holder: "nobody".into(), duration_ms: 5 },
            Command::SetSnapshotStatus { id: 9, region: "eu".into(), status: SnapshotStatus::Readable, after_us: None },
            Command::SetConfig { key: String::new(), value: "v".into() },
        ];
        for command in &bad {
            assert!(matches!(state.apply(5, command), Outcome::Rejected { .. }), "{command:?}");
        }
        assert_eq!(state, before);
    }

    #[test]
    fn the_catalog_keeps_the_newest_snapshots() {
        let mut state = cluster();
        for glt in 0..(SNAPSHOTS_KEPT as u64 + 5) {
            state.apply(1, &Command::CreateSnapshot { glt });
        }
        assert_eq!(state.snapshots.len(), SNAPSHOTS_KEPT);
        assert_eq!(state.snapshots.keys().next(), Some(&5));
        assert_eq!(state.next_snapshot_id, SNAPSHOTS_KEPT as u64 + 5, "ids are never reused");
    }

    #[test]
    fn snapshots_track_each_region() {
        let mut state = cluster();
        assert_eq!(state.apply(1, &Command::CreateSnapshot { glt: 42 }), Outcome::SnapshotCreated { id: 0 });
        let readable = |region: &str, after_us| Command::SetSnapshotStatus {
            id: 0,
            region: region.into(),
            status: SnapshotStatus::Readable,
            after_us: Some(after_us),
        };
        assert_eq!(state.apply(2, &readable("eu", 31_000)), Outcome::Done);
        assert_eq!(state.apply(2, &readable("eu", 99_000)), Outcome::Done, "readable twice is harmless");
        assert_eq!(state.snapshots[&0].readable_after_us["eu"], 31_000, "the first report stands");
        let failed =
            Command::SetSnapshotStatus { id: 0, region: "eu".into(), status: SnapshotStatus::Failed, after_us: None };
        assert!(matches!(state.apply(3, &failed), Outcome::Rejected { .. }));
        assert_eq!(state.snapshots[&0].regions["us"], SnapshotStatus::Pending);
        assert!(!state.snapshots[&0].readable_after_us.contains_key("us"));
    }

    #[test]
    fn liveness_follows_the_named_timeouts() {
        let mut state = cluster();
        let mut heard = BTreeMap::new();
        heard.insert("n1".to_owned(), 1000);
        // n2 never heard since the leader took over at 0.
        let changes = state.liveness_changes(&heard, 0, 2500, 2000, 5000);
        assert_eq!(changes, vec![Command::SetDataNodeState { id: "n2".into(), state: NodeState::Suspect }]);
        let changes = state.liveness_changes(&heard, 0, 6000, 2000, 5000);
        assert_eq!(
            changes,
            vec![
                Command::SetDataNodeState { id: "n1".into(), state: NodeState::Dead },
                Command::SetDataNodeState { id: "n2".into(), state: NodeState::Dead },
            ]
        );
        for change in &changes {
            state.apply(6000, change);
        }
        // A dead node stays dead until it heartbeats again.
        assert!(state.liveness_changes(&heard, 0, 9000, 2000, 5000).is_empty());
        heard.insert("n1".to_owned(), 9000);
        assert_eq!(
            state.liveness_changes(&heard, 0, 9001, 2000, 5000),
            vec![Command::SetDataNodeState { id: "n1".into(), state: NodeState::Up }]
        );
    }
}
