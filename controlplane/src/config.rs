//! The control-plane node's configuration: a TOML file, overridden by flags. Unknown or bad
//! fields are rejected with a message that names them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::raftlog::LogIo;
use crate::types::NodeId;

/// Raft timing and compaction.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat period.
    pub heartbeat_ms: u64,
    /// Election timeouts are drawn afresh from `[election_min_ms, election_max_ms)` before
    /// every election.
    pub election_min_ms: u64,
    /// See `election_min_ms`.
    pub election_max_ms: u64,
    /// Build a snapshot (and purge the log) after this many entries.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot, for slow followers.
    pub keep_after_snapshot: u64,
    /// A write not committed within this is answered with an error (no quorum).
    pub write_timeout_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 50,
            election_min_ms: 200,
            election_max_ms: 400,
            snapshot_after_entries: 5000,
            keep_after_snapshot: 1000,
            write_timeout_ms: 3000,
        }
    }
}

/// Data-node liveness.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MembershipConfig {
    /// A data node silent this long is suspect.
    pub suspect_after_ms: u64,
    /// A data node silent this long is dead.
    pub dead_after_ms: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self { suspect_after_ms: 3000, dead_after_ms: 10_000 }
    }
}

/// Replica sets inside regions: the leases of their primaries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaSetsConfig {
    /// A set's primary holds its lease this long from each heartbeat it sends while leading
    /// the set's epoch; the leader promotes another member once it lapsed (plus
    /// `lease_ms / 20 + 20` ms for the clocks' drift). Data nodes heartbeat every
    /// `lease_ms / 16` (and at once when a copy starts or stops leading); the leader checks the
    /// leases every `lease_ms / 40`.
    pub lease_ms: u64,
}

impl Default for ReplicaSetsConfig {
    fn default() -> Self {
        Self { lease_ms: 1000 }
    }
}

impl ReplicaSetsConfig {
    /// What the leader waits past a lease before promoting.
    pub fn margin_ms(&self) -> u64 {
        self.lease_ms / 20 + 20
    }

    /// How recent a member's report must be for it to count as reachable.
    pub fn fresh_ms(&self) -> u64 {
        self.lease_ms * 2
    }
}

/// The GLTS server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GltsConfig {
    /// Drift bound of every clock, ppm.
    pub drift_ppm: u64,
    /// The error this node asserts for its own clock when neither ClockBound nor a
    /// synchronised kernel clock gives a bound, µs. Status reports the source as "asserted".
    pub asserted_error_us: u64,
    /// How often to exchange with peers.
    pub sync_interval_ms: u64,
}

impl Default for GltsConfig {
    fn default() -> Self {
        Self { drift_ppm: 200, asserted_error_us: 250, sync_interval_ms: 100 }
    }
}

/// Global snapshots: the leader's schedule and how long it follows each one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotsConfig {
    /// Take one this often, ms (0: only when asked).
    pub every_ms: u64,
    /// Take one once the data nodes' WALs have written this many bytes since the last
    /// snapshot (0: not on volume); every region's WAL counts, replicas' too. With `every_ms`
    /// too, whichever comes first: each snapshot the leader takes restarts the count, and each
    /// one it takes by itself restarts the schedule.
    pub every_wal_bytes: u64,
    /// Added to each scheduled snapshot's timestamp, µs (see `snapshot create --lead-ms`).
    pub lead_us: u64,
    /// A region that cannot read a snapshot this long after the leader started asking is
    /// marked failed for it, ms.
    pub track_timeout_ms: u64,
}

impl Default for SnapshotsConfig {
    fn default() -> Self {
        Self { every_ms: 0, every_wal_bytes: 0, lead_us: 0, track_timeout_ms: 30_000 }
    }
}

/// The Prometheus endpoint (`GET /metrics`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address to serve on (port 0: any free port, printed on stdout as `METRICS url`).
    pub listen: SocketAddr,
}

/// A control-plane node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id (> 0, unique, never reused).
    pub id: NodeId,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// The address other nodes reach this one at, when not `listen` (a wildcard listen
    /// address, NAT).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Where the log and snapshots live.
    pub data_dir: PathBuf,
    /// Directory with `ca.pem`, `<tls_name>.pem` and `<tls_name>.key`.
    pub tls_dir: PathBuf,
    /// Name of this node's certificate in `tls_dir`.
    pub tls_name: String,
    /// `id=addr` of the first members. The lowest id bootstraps the cluster when its log is
    /// empty; the others wait for it.
    #[serde(default)]
    pub initial_members: Vec<String>,
    /// Addresses of running members to join through (when not in `initial_members`).
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Honour `Isolate` requests (tests only).
    #[serde(default)]
    pub fault_injection: bool,
    /// Raft log I/O.
    #[serde(default)]
    pub log_io: LogIo,
    /// Raft timing.
    #[serde(default)]
    pub raft: RaftConfig,
    /// Data-node liveness.
    #[serde(default)]
    pub membership: MembershipConfig,
    /// Replica sets' leases.
    #[serde(default)]
    pub replica_sets: ReplicaSetsConfig,
    /// GLTS.
    #[serde(default)]
    pub glts: GltsConfig,
    /// Scheduled global snapshots.
    #[serde(default)]
    pub snapshots: SnapshotsConfig,
    /// The Prometheus endpoint; none when absent.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
}

impl NodeConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).map_err(|error| anyhow::anyhow!("{}: {}", path.display(), error.to_string().trim_end()))
    }

    /// The address peers use for this node.
    pub fn advertised(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    /// The initial members by id.
    pub fn members(&self) -> Result<BTreeMap<NodeId, String>> {
        parse_members(&self.initial_members)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.id == 0 {
            bail!("id: must be > 0");
        }
        if self.advertise.is_none() && self.listen.ip().is_unspecified() && !self.seeds.is_empty() {
            bail!("advertise: needed when listen ({}) is a wildcard address", self.listen);
        }
        if self.tls_name.is_empty() {
            bail!("tls_name: must not be empty");
        }
        let members = self.members()?;
        if !members.is_empty() && !members.contains_key(&self.id) {
            bail!("initial_members: does not list this node's id {}", self.id);
        }
        if members.is_empty() && self.seeds.is_empty() {
            bail!("initial_members/seeds: give initial_members to bootstrap or seeds to join");
        }
        let raft = &self.raft;
        if raft.heartbeat_ms == 0 {
            bail!("raft.heartbeat_ms: must be > 0");
        }
        if raft.election_min_ms <= raft.heartbeat_ms {
            bail!("raft.election_min_ms: must be > raft.heartbeat_ms ({})", raft.heartbeat_ms);
        }
        if raft.election_max_ms <= raft.election_min_ms {
            bail!("raft.election_max_ms: must be > raft.election_min_ms ({})", raft.election_min_ms);
        }
        if raft.snapshot_after_entries == 0 {
            bail!("raft.snapshot_after_entries: must be > 0");
        }
        if raft.write_timeout_ms == 0 {
            bail!("raft.write_timeout_ms: must be > 0");
        }
        if self.membership.suspect_after_ms == 0 || self.membership.dead_after_ms <= self.membership.suspect_after_ms {
            bail!("membership.dead_after_ms: must be > membership.suspect_after_ms > 0");
        }
        if self.replica_sets.lease_ms < 100 {
            bail!("replica_sets.lease_ms: must be >= 100 (data nodes renew it every lease_ms / 16)");
        }
        if self.glts.drift_ppm == 0 || self.glts.drift_ppm >= 1_000_000 {
            bail!("glts.drift_ppm: must be in 1..1000000");
        }
        if self.glts.sync_interval_ms == 0 {
            bail!("glts.sync_interval_ms: must be > 0");
        }
        if self.snapshots.every_ms != 0 && self.snapshots.every_ms < 10 {
            bail!("snapshots.every_ms: must be 0 (off) or at least 10");
        }
        if self.snapshots.every_wal_bytes != 0 && self.snapshots.every_wal_bytes < 4096 {
            bail!("snapshots.every_wal_bytes: must be 0 (off) or at least 4096");
        }
        if self.snapshots.track_timeout_ms == 0 {
            bail!("snapshots.track_timeout_ms: must be > 0");
        }
        Ok(())
    }
}

/// Parses `id=addr` items.
pub fn parse_members(items: &[String]) -> Result<BTreeMap<NodeId, String>> {
    let mut members = BTreeMap::new();
    for item in items {
        let Some((id, addr)) = item.split_once('=') else {
            bail!("initial_members: {item:?} is not id=addr");
        };
        let id: NodeId = id.trim().parse().with_context(|| format!("initial_members: bad id in {item:?}"))?;
        if id == 0 || addr.trim().is_empty() {
            bail!("initial_members: {item:?} needs an id > 0 and an address");
        }
        if members.insert(id, addr.trim().to_owned()).is_some() {
            bail!("initial_members: id {id} listed twice");
        }
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig> {
        let config: NodeConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.validate()?;
        Ok(config)
    }

    const BASE: &str = r#"
        id = 1
        listen = "127.0.0.1:7100"
        data_dir = "/tmp/x"
        tls_dir = "/tmp/tls"
        tls_name = "cp1"
        initial_members = ["1=127.0.0.1:7100", "2=127.0.0.1:7101"]
    "#;

    #[test]
    fn the_example_config_is_valid() -> Result<()> {
        let text = include_str!("../../scripts/controlplane.example.toml");
        let config = parse(text)?;
        assert_eq!(config.members()?.len(), 3);
        Ok(())
    }

    #[test]
    fn bad_config_names_the_field() {
        assert!(parse(BASE).is_ok());
        let cases = [
            (format!("{BASE}\n[raft]\nelection_min_ms = 10"), "raft.election_min_ms"),
            (format!("{BASE}\n[raft]\nelection_max_ms = 100"), "raft.election_max_ms"),
            (format!("{BASE}\n[glts]\ndrift_ppm = 0"), "glts.drift_ppm"),
            (format!("{BASE}\nbogus = 1"), "bogus"),
            (format!("{BASE}\n[metrics]\nlisten = \"localhost\""), "listen"),
            (format!("{BASE}\n[metrics]\nport = 9100"), "port"),
            (format!("{BASE}\n[raft]\nheartbeat_ms = -1"), "heartbeat_ms"),
            (BASE.replace("id = 1", "id = 0"), "id"),
            (BASE.replace("id = 1", "id = 3"), "initial_members"),
            (BASE.replace("2=127", "2127"), "initial_members"),
        ];
        for (text, field) in cases {
            let error = parse(&text).err().map(|e| format!("{e:#}")).unwrap_or_default();
            assert!(error.contains(field), "{field}: {error}");
        }
    }
}
