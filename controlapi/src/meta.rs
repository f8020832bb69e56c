//! The metadata state machine: regions and zones, data nodes, shard placement, shard-primary
//! leases, the snapshot catalog and cluster config.
//!
//! Pure and deterministic: [`MetaState::apply`] takes a command and the leader's proposal
//! time from the log entry, never a clock, so every replica computes the same state. Rejected
//! commands change nothing and return an [`Outcome::Rejected`] that says why.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
                | Self::SetConfig { .. }
        )
    }
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
            Command::RegisterDataNode { id, addr, region, zone, shards, capacity_bytes } => {
                let node = DataNode {
                    addr: addr.clone(),
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
            Command::SetConfig { key, value } => {
                if key.is_empty() {
                    return rejected("config key is empty");
                }
                self.config.insert(key.clone(), value.clone());
                Outcome::Done
            }
        }
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
            };
            assert_eq!(state.apply(0, &register), Outcome::Done);
        }
        state
    }

    fn acquire(state: &mut MetaState, at_ms: u64, holder: &str) -> Outcome {
        state.apply(at_ms, &Command::AcquireLease { shard: 7, holder: holder.into(), duration_ms: 1000 })
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
