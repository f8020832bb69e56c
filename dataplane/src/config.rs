//! The `dataplane` process configuration: a TOML file, overridable by flags. Unknown fields
//! and invalid values are rejected with the field's name and the reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::limits;
use crate::server::ServerLimits;
use crate::store::{StoreConfig, SystemClock};
use crate::wal::{RecoveryMode, WalConfig};

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        message: String,
    },
    /// The file is not valid TOML for this schema (unknown field, wrong type).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, which names the field and line.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config `{field}`: {reason}")]
    Invalid {
        /// The field, as written in the file.
        field: String,
        /// Why.
        reason: String,
    },
}

/// The whole file. Every field is optional except `data_dir` (which a flag may give).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Directory holding every shard's WAL, chunks and checkpoints.
    pub data_dir: Option<PathBuf>,
    /// Client address of shard 0; shard `i` listens on port + i (port 0: each picks a free one).
    pub listen: Option<String>,
    /// Number of shards (default: one per CPU).
    pub shards: Option<usize>,
    /// Client-facing limits.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Versioned store and chunk server.
    #[serde(default)]
    pub store: StoreSection,
    /// Write-ahead log.
    #[serde(default)]
    pub wal: WalSection,
    /// The control plane to join; without it the node runs alone on the system clock.
    pub control: Option<ControlSection>,
    /// Inter-region replication; without it the node keeps its writes to itself.
    pub replication: Option<ReplicationSection>,
    /// The node's shards are copies in replica sets of its region (needs `[control]`).
    pub replica_sets: Option<ReplicaSetsSection>,
    /// The Prometheus endpoint; without it the node serves no metrics.
    pub metrics: Option<MetricsSection>,
}

/// `[replica_sets]`: every shard of the node is a copy in its region's replica set of that
/// shard (`meridian cluster place-sets`): writes go to the set's primary and are acknowledged
/// once durable on every member.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSetsSection {
    /// UDP `ip:port` of the node's endpoint for the other members (port 0 picks one).
    pub listen: Option<String>,
    /// Silence (ms) after which a primary has a member removed from its set (default 80).
    pub member_timeout_ms: Option<u64>,
}

/// `[replica_sets] member_timeout_ms` by default: a backup silent this long stalls its
/// primary's writes this long before it is removed (heartbeats go every quarter of it). Short,
/// as Azure's seal-and-continue: a member removed in a hiccup is added back once caught up.
pub const MEMBER_TIMEOUT_MS_DEFAULT: u64 = 80;

/// `[replica_sets]`, resolved.
#[derive(Debug, Clone)]
pub struct ReplicaSetsResolved {
    pub listen: std::net::SocketAddr,
    pub member_timeout: Duration,
}

/// `[metrics]`: where to serve `GET /metrics`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// TCP `ip:port` (port 0 picks one, printed on stdout after READY as `METRICS url`).
    pub listen: Option<String>,
}

/// `[replication]`: this node's region, where the shards take writes, and the other regions.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    /// This node's region.
    pub region: Option<String>,
    /// Home region of every shard: writes are taken there and shipped to the others. Left
    /// out, each shard's home comes from the control plane's placement (needs `[control]`).
    pub home: Option<String>,
    /// UDP address of the QUIC replication endpoint (`ip:port`; port 0 picks one).
    pub listen: Option<String>,
    /// Directory with `ca.pem`, `<name>.pem`, `<name>.key` (`controlplane certs`).
    pub tls_dir: Option<PathBuf>,
    /// This node's certificate name.
    pub name: Option<String>,
    /// `lz4` (default), `snap` or `none`.
    pub codec: Option<String>,
    /// Raw bytes per batch before it is sent.
    pub batch_bytes_max: Option<usize>,
    /// Unacknowledged batches per stream.
    pub window_batches: Option<usize>,
    /// Unacknowledged bytes per stream.
    pub window_bytes: Option<usize>,
    /// Milliseconds between closed-timestamp publications (and empty batches when idle).
    pub closed_interval_ms: Option<u64>,
    /// Bandwidth between regions, Mbit/s (sizes the QUIC windows with `rtt_ms`).
    pub bandwidth_mbit: Option<u64>,
    /// Round trip between regions, ms.
    pub rtt_ms: Option<u64>,
    /// Most WAL bytes a home shard keeps for a peer that fell behind (default 1 GiB); a peer
    /// further behind catches up from a snapshot.
    pub wal_hold_bytes_max: Option<u64>,
    /// Key prefixes of the multi-master keyspaces, the same on every node: their keys are
    /// written in any region and the last writer wins.
    #[serde(default)]
    pub multi_master: Vec<String>,
    /// This region's origin with multi-master keyspaces (0..=15, unique among the regions,
    /// never changed): stamped into every timestamp, it breaks ties between regions.
    pub origin: Option<u8>,
    /// The other regions.
    #[serde(default)]
    pub peers: Vec<PeerSection>,
}

/// One `[[replication.peers]]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    /// The peer's region.
    pub region: Option<String>,
    /// Its replication endpoint (`ip:port`).
    pub addr: Option<String>,
    /// Its origin (with multi-master keyspaces).
    pub origin: Option<u8>,
}

/// A required `ip:port` field.
fn socket_addr(
    field: &str,
    value: Option<&String>,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<std::net::SocketAddr, ConfigError> {
    let value = value.ok_or_else(|| invalid(field, "is required".into()))?;
    value.parse().map_err(|_| invalid(field, format!("`{value}` is not an ip:port address")))
}

fn name_field(
    field: &str,
    value: Option<&String>,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<String, ConfigError> {
    let value = value.cloned().ok_or_else(|| invalid(field, "is required".into()))?;
    if value.is_empty() || value.len() > 64 || !value.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)) {
        return Err(invalid(field, format!("`{value}` must be 1 to 64 letters, digits, `_` or `-`")));
    }
    Ok(value)
}

impl ReplicationSection {
    /// `shards`: the node's shard count; `control`: whether the node has a control plane to
    /// take the placement from when `home` is left out.
    fn resolve(&self, shards: usize, control: bool) -> Result<crate::repl::ReplConfig, ConfigError> {
        let invalid =
            |field: &str, reason: String| ConfigError::Invalid { field: format!("replication.{field}"), reason };
        let region = name_field("region", self.region.as_ref(), &invalid)?;
        let homes = match &self.home {
            Some(_) => vec![name_field("home", self.home.as_ref(), &invalid)?; shards],
            None if control => Vec::new(),
            None => {
                return Err(invalid(
                    "home",
                    "is required without a [control] section (with one, each shard's home comes from the \
                     control plane's placement)"
                        .into(),
                ));
            }
        };
        let name = name_field("name", self.name.as_ref(), &invalid)?;
        let addr = |field: &str, value: Option<&String>| socket_addr(field, value, &invalid);
        let listen = addr("listen", self.listen.as_ref())?;
        let tls_dir = self.tls_dir.clone().ok_or_else(|| invalid("tls_dir", "is required".into()))?;
        let codec = self.codec.as_deref().unwrap_or("lz4");
        let codec = wire::repl::Codec::from_name(codec)
            .ok_or_else(|| invalid("codec", format!("`{codec}` is not lz4, snap or none")))?;
        let mut peers = Vec::new();
        for (index, peer) in self.peers.iter().enumerate() {
            let peer_region = name_field(&format!("peers[{index}].region"), peer.region.as_ref(), &invalid)?;
            if peer_region == region || peers.iter().any(|known: &crate::repl::Peer| known.region == peer_region) {
                return Err(invalid(
                    &format!("peers[{index}].region"),
                    format!("`{peer_region}` is this region or listed twice"),
                ));
            }
            let peer_addr = addr(&format!("peers[{index}].addr"), peer.addr.as_ref())?;
            peers.push(crate::repl::Peer { region: peer_region, addr: peer_addr, origin: peer.origin });
        }
        let range = |field: &str, value: Option<u64>, default: u64, min: u64, max: u64| {
            let value = value.unwrap_or(default);
            if value < min || value > max {
                return Err(invalid(field, format!("{value} is outside {min}..={max}")));
            }
            Ok(value)
        };
        let batch_bytes_max =
            range("batch_bytes_max", self.batch_bytes_max.map(|v| v as u64), 64 << 10, 512, 16 << 20)?;
        let window_batches = range("window_batches", self.window_batches.map(|v| v as u64), 64, 1, 65_536)?;
        let window_bytes = range("window_bytes", self.window_bytes.map(|v| v as u64), 16 << 20, 4096, 1 << 32)?;
        let closed_interval_ms = range("closed_interval_ms", self.closed_interval_ms, 1, 1, 10_000)?;
        let bandwidth_mbit = range("bandwidth_mbit", self.bandwidth_mbit, DEFAULT_BANDWIDTH_MBIT, 1, 1_000_000)?;
        let rtt_ms = range("rtt_ms", self.rtt_ms, DEFAULT_RTT_MS, 1, 10_000)?;
        let wal_hold_bytes_max = range("wal_hold_bytes_max", self.wal_hold_bytes_max, 1 << 30, 0, 1 << 50)?;
        // Origins: with multi-master keyspaces one per region, distinct, in range; else none.
        let mut origins = vec![("origin".to_owned(), self.origin)];
        origins.extend(peers.iter().enumerate().map(|(index, peer)| (format!("peers[{index}].origin"), peer.origin)));
        let mut seen = std::collections::HashSet::new();
        for (field, origin) in &origins {
            match (origin, self.multi_master.is_empty()) {
                (None, false) => return Err(invalid(field, "is required with multi_master".into())),
                (Some(_), true) => return Err(invalid(field, "is only used with multi_master".into())),
                (Some(origin), false) if usize::from(*origin) >= wire::glt::ORIGINS_MAX => {
                    return Err(invalid(field, format!("{origin} is outside 0..={}", wire::glt::ORIGINS_MAX - 1)));
                }
                (Some(origin), false) if !seen.insert(*origin) => {
                    return Err(invalid(field, format!("{origin} is another region's origin")));
                }
                _ => {}
            }
        }
        for (index, prefix) in self.multi_master.iter().enumerate() {
            if prefix.is_empty() || prefix.len() > crate::limits::KEY_BYTES_LIMIT {
                return Err(invalid(
                    &format!("multi_master[{index}]"),
                    format!("a key prefix must be 1 to {} bytes", crate::limits::KEY_BYTES_LIMIT),
                ));
            }
        }
        let quic_window_bytes = quic_window_bytes(bandwidth_mbit, rtt_ms);
        let config = crate::repl::ReplConfig {
            region,
            homes,
            replicas: None,
            listen,
            tls_dir,
            name,
            peers,
            codec,
            batch_bytes_max: usize::try_from(batch_bytes_max).unwrap_or(usize::MAX),
            window: crate::repl::Window {
                batches: usize::try_from(window_batches).unwrap_or(usize::MAX),
                bytes: usize::try_from(window_bytes).unwrap_or(usize::MAX),
            },
            closed_interval: Duration::from_millis(closed_interval_ms),
            quic_window_bytes,
            wal_hold_bytes_max,
            multi_master: self.multi_master.clone(),
            origin: self.origin,
        };
        config.check_peers().map_err(|reason| invalid("peers", reason))?;
        Ok(config)
    }
}

/// `[control]`: how the node joins the control plane (GLTS clock, registration, heartbeats,
/// leases).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// Control-plane QUIC addresses (`host:port`) to ask for the members.
    pub seeds: Option<Vec<String>>,
    /// Directory with `ca.pem`, `<node_id>.pem` and `<node_id>.key` (`controlplane certs`).
    pub tls_dir: Option<PathBuf>,
    /// The node's id, stable across restarts; also the name of its certificate.
    pub node_id: Option<String>,
    /// Region the node is in (must exist in the cluster metadata).
    pub region: Option<String>,
    /// Zone of that region.
    pub zone: Option<String>,
    /// Milliseconds between heartbeats.
    pub heartbeat_ms: Option<u64>,
    /// Length of the shard-primary leases the node asks for, ms.
    pub lease_ms: Option<u64>,
    /// Milliseconds between GLTS exchanges with the control-plane nodes.
    pub glts_sync_ms: Option<u64>,
    /// Drift bound of the clocks involved, parts per million.
    pub drift_ppm: Option<u64>,
    /// How long start-up waits for the members and a GLTS interval, ms.
    pub start_timeout_ms: Option<u64>,
}

/// `[control]`, resolved.
#[derive(Debug, Clone)]
pub struct ControlResolved {
    /// Seed addresses.
    pub seeds: Vec<String>,
    /// TLS directory.
    pub tls_dir: PathBuf,
    /// Node id.
    pub node_id: String,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Between heartbeats.
    pub heartbeat: Duration,
    /// Lease length.
    pub lease: Duration,
    /// Between GLTS exchanges.
    pub glts_sync: Duration,
    /// Drift bound, ppm.
    pub drift_ppm: u64,
    /// Start-up wait.
    pub start_timeout: Duration,
}

impl ControlSection {
    fn resolve(&self) -> Result<ControlResolved, ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid { field: format!("control.{field}"), reason };
        let required = |field: &str, value: &Option<String>| {
            let value = value.clone().ok_or_else(|| invalid(field, "is required".into()))?;
            if value.is_empty() || !value.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)) {
                return Err(invalid(field, format!("`{value}` must be non-empty letters, digits, `_` or `-`")));
            }
            Ok(value)
        };
        let seeds = self.seeds.clone().unwrap_or_default();
        if seeds.is_empty() {
            return Err(invalid("seeds", "needs at least one control-plane address".into()));
        }
        if let Some(bad) = seeds.iter().find(|seed| seed.parse::<std::net::SocketAddr>().is_err()) {
            return Err(invalid("seeds", format!("`{bad}` is not an ip:port address")));
        }
        let tls_dir = self.tls_dir.clone().ok_or_else(|| invalid("tls_dir", "is required".into()))?;
        let ms = |field: &str, value: Option<u64>, default: u64, min: u64| {
            let value = value.unwrap_or(default);
            if value < min || value > 3_600_000 {
                return Err(invalid(field, format!("{value} is outside {min}..=3600000")));
            }
            Ok(Duration::from_millis(value))
        };
        let heartbeat = ms("heartbeat_ms", self.heartbeat_ms, limits::HEARTBEAT_MS_DEFAULT, 10)?;
        let lease = ms("lease_ms", self.lease_ms, limits::LEASE_MS_DEFAULT, 100)?;
        if lease < heartbeat * 3 {
            return Err(invalid("lease_ms", "must be at least 3 heartbeats, to be renewed in time".into()));
        }
        let drift_ppm = self.drift_ppm.unwrap_or(limits::DRIFT_PPM_DEFAULT);
        if drift_ppm == 0 || drift_ppm > 100_000 {
            return Err(invalid("drift_ppm", format!("{drift_ppm} is outside 1..=100000")));
        }
        Ok(ControlResolved {
            seeds,
            tls_dir,
            node_id: required("node_id", &self.node_id)?,
            region: required("region", &self.region)?,
            zone: required("zone", &self.zone)?,
            heartbeat,
            lease,
            glts_sync: ms("glts_sync_ms", self.glts_sync_ms, limits::GLTS_SYNC_MS_DEFAULT, 1)?,
            drift_ppm,
            start_timeout: ms("start_timeout_ms", self.start_timeout_ms, limits::CONTROL_START_TIMEOUT_MS_DEFAULT, 1)?,
        })
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Longest key in bytes.
    pub key_bytes_max: Option<usize>,
    /// Largest value in bytes.
    pub value_bytes_max: Option<usize>,
    /// Largest request frame payload in bytes.
    pub frame_bytes_max: Option<u32>,
    /// Requests in flight per connection.
    pub inflight_per_connection: Option<usize>,
    /// Open connections per shard.
    pub connections_max: Option<usize>,
    /// Most operations in one batch put.
    pub batch_ops_max: Option<usize>,
}

/// `[store]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Values above this many bytes are chunked.
    pub inline_bytes_max: Option<usize>,
    /// Chunk size in bytes.
    pub chunk_bytes: Option<usize>,
    /// Seconds old versions stay readable.
    pub retention_secs: Option<u64>,
    /// Milliseconds between garbage-collection passes.
    pub gc_interval_ms: Option<u64>,
    /// WAL bytes between checkpoints (engine flushes; each comes due after a random 3/4 to
    /// all of it, or earlier when the memtables reach their share of the memory budget).
    pub checkpoint_wal_bytes: Option<u64>,
    /// Bytes of memory the node's store may use, split evenly over its shards: caches,
    /// memtables, indexes, filters. Default: a quarter of the machine's RAM.
    pub memory_bytes_max: Option<u64>,
}

/// `[wal]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalSection {
    /// Size of each segment file in bytes (multiple of 4096).
    pub segment_bytes: Option<u64>,
    /// Largest batch written under one barrier, in bytes.
    pub batch_bytes_max: Option<usize>,
    /// Microseconds the writer waits for more appends before sealing a batch.
    pub batch_linger_us: Option<u64>,
    /// Largest WAL record payload in bytes.
    pub record_payload_bytes_max: Option<u32>,
    /// `tolerate-torn-tail` (default) or `strict`.
    pub recovery_mode: Option<String>,
    /// Released segments each shard keeps to reuse instead of zero-filling new ones.
    pub reuse_segments: Option<usize>,
}

/// Everything a node needs, resolved and validated.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Host part of the listen address.
    pub host: String,
    /// Port of shard 0 (0: dynamic).
    pub port: u16,
    /// Shard count.
    pub shards: usize,
    /// Endpoint limits.
    pub server: ServerLimits,
    /// Store configuration template (directory and shard set per shard).
    pub store: StoreConfig,
    /// The control plane to join.
    pub control: Option<ControlResolved>,
    /// Inter-region replication.
    pub replication: Option<crate::repl::ReplConfig>,
    /// Replica sets inside the region.
    pub replica_sets: Option<ReplicaSetsResolved>,
    /// The Prometheus endpoint's address.
    pub metrics: Option<std::net::SocketAddr>,
}

impl NodeConfig {
    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Read { path: path.display().to_string(), message: error.to_string() })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse { path: path.display().to_string(), message })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|error| error.to_string())
    }

    /// Applies defaults and checks every value.
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid { field: field.to_string(), reason };
        let data_dir = self.data_dir.clone().ok_or_else(|| invalid("data_dir", "is required".into()))?;
        let listen = self.listen.clone().unwrap_or_else(|| limits::LISTEN_DEFAULT.to_string());
        let (host, port) = listen
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.trim_matches(['[', ']']).to_string(), port.parse::<u16>().ok()?)))
            .ok_or_else(|| invalid("listen", format!("`{listen}` is not host:port")))?;
        let shards =
            self.shards.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
        if shards == 0 || shards > limits::SHARDS_MAX {
            return Err(invalid("shards", format!("{shards} is outside 1..={}", limits::SHARDS_MAX)));
        }
        if port != 0 && usize::from(port) + shards > usize::from(u16::MAX) {
            return Err(invalid("listen", format!("ports {port}..{port}+{shards} exceed 65535")));
        }
        let store = self.resolve_store(shards)?;
        let server = self.resolve_server(&store)?;
        let control = self.control.as_ref().map(ControlSection::resolve).transpose()?;
        let replication =
            self.replication.as_ref().map(|section| section.resolve(shards, control.is_some())).transpose()?;
        if let (Some(repl), Some(control)) = (&replication, &control) {
            // The agent holds the leases of the shards homed in its region; the replication
            // takes their writes in its own: they must be the same region.
            if repl.homes.is_empty() && repl.region != control.region {
                return Err(invalid(
                    "replication.region",
                    format!(
                        "`{}` differs from control.region `{}`: with each shard's home from the placement \
                         they must name the same region",
                        repl.region, control.region
                    ),
                ));
            }
        }
        let metrics = self
            .metrics
            .as_ref()
            .map(|section| socket_addr("metrics.listen", section.listen.as_ref(), &invalid))
            .transpose()?;
        let replica_sets = match &self.replica_sets {
            None => None,
            Some(_) if control.is_none() => {
                return Err(invalid("replica_sets", "needs [control]: the control plane holds the sets".into()));
            }
            Some(_) if replication.is_some() => {
                return Err(invalid(
                    "replica_sets",
                    "replica sets and [replication] together are not supported yet: a region with replica sets \
                     is the only region"
                        .into(),
                ));
            }
            Some(section) => {
                let member_timeout =
                    Duration::from_millis(section.member_timeout_ms.unwrap_or(MEMBER_TIMEOUT_MS_DEFAULT));
                if member_timeout < Duration::from_millis(50) {
                    return Err(invalid("replica_sets.member_timeout_ms", "must be at least 50".into()));
                }
                let listen = socket_addr("replica_sets.listen", section.listen.as_ref(), &invalid)?;
                Some(ReplicaSetsResolved { listen, member_timeout })
            }
        };
        Ok(Resolved { data_dir, host, port, shards, server, store, control, replication, replica_sets, metrics })
    }

    /// `[wal]`, `[store]` and the store's `[limits]`, checked; the memory budget split over
    /// `shards`.
    fn resolve_store(&self, shards: usize) -> Result<StoreConfig, ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid { field: field.to_string(), reason };
        let mut wal = WalConfig::new(PathBuf::new(), 0);
        wal.record_payload_bytes_max = limits::STORE_RECORD_BYTES_MAX_DEFAULT;
        let w = &self.wal;
        set(&mut wal.segment_bytes, w.segment_bytes);
        set(&mut wal.batch_bytes_max, w.batch_bytes_max);
        set(&mut wal.record_payload_bytes_max, w.record_payload_bytes_max);
        set(&mut wal.reuse_segments_max, w.reuse_segments);
        if let Some(us) = w.batch_linger_us {
            wal.batch_linger = Duration::from_micros(us);
        }
        wal.recovery_mode = match w.recovery_mode.as_deref() {
            None | Some("tolerate-torn-tail") => RecoveryMode::TolerateTornTail,
            Some("strict") => RecoveryMode::Strict,
            Some(other) => {
                return Err(invalid("wal.recovery_mode", format!("`{other}` is not tolerate-torn-tail or strict")));
            }
        };
        wal.validate().map_err(|error| invalid("wal", error.to_string()))?;

        let mut store = StoreConfig::new(PathBuf::new(), 0);
        store.wal = wal;
        store.clock = Arc::new(SystemClock);
        let l = &self.limits;
        set(&mut store.key_bytes_max, l.key_bytes_max);
        set(&mut store.value_bytes_max, l.value_bytes_max);
        set(&mut store.batch_ops_max, l.batch_ops_max);
        let s = &self.store;
        set(&mut store.inline_bytes_max, s.inline_bytes_max);
        set(&mut store.chunk_bytes, s.chunk_bytes);
        set(&mut store.checkpoint_wal_bytes, s.checkpoint_wal_bytes);
        let node_memory = s.memory_bytes_max.unwrap_or_else(default_memory_bytes);
        store.memory_bytes_max = node_memory / shards.max(1) as u64;
        if store.memory_bytes_max < limits::STORE_SHARD_MEMORY_BYTES_MIN {
            return Err(invalid(
                "store.memory_bytes_max",
                format!(
                    "{node_memory} bytes over {shards} shards is {} per shard, below the minimum of {}",
                    store.memory_bytes_max,
                    limits::STORE_SHARD_MEMORY_BYTES_MIN
                ),
            ));
        }
        // Half the budget is the block and blob cache the shards share.
        store.engine_cache = Some(crate::store::engine::SharedCache::with_capacity_bytes(node_memory / 2));
        if let Some(secs) = s.retention_secs {
            store.retention = Duration::from_secs(secs);
        }
        if let Some(ms) = s.gc_interval_ms {
            store.gc_interval = Duration::from_millis(ms);
        }
        store.validate().map_err(|error| match error {
            crate::store::StoreError::Config { field, reason } => invalid(section_of(field), reason),
            other => invalid("store", other.to_string()),
        })?;
        Ok(store)
    }

    /// The endpoint's `[limits]`, checked against the store's.
    fn resolve_server(&self, store: &StoreConfig) -> Result<ServerLimits, ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid { field: field.to_string(), reason };
        let l = &self.limits;
        let mut server = ServerLimits::default();
        set(&mut server.frame_payload_bytes_max, l.frame_bytes_max);
        set(&mut server.inflight_per_connection, l.inflight_per_connection);
        set(&mut server.connections_max, l.connections_max);
        if server.frame_payload_bytes_max > wire::limits::PAYLOAD_BYTES_MAX {
            return Err(invalid(
                "limits.frame_bytes_max",
                format!("must be at most {}", wire::limits::PAYLOAD_BYTES_MAX),
            ));
        }
        if (server.frame_payload_bytes_max as usize) < store.value_bytes_max + store.key_bytes_max + 16 {
            return Err(invalid(
                "limits.frame_bytes_max",
                format!("{} cannot carry a value of value_bytes_max plus its key", server.frame_payload_bytes_max),
            ));
        }
        if server.inflight_per_connection == 0 || server.inflight_per_connection > limits::INFLIGHT_PER_CONNECTION_LIMIT
        {
            return Err(invalid(
                "limits.inflight_per_connection",
                format!("must be 1..={}", limits::INFLIGHT_PER_CONNECTION_LIMIT),
            ));
        }
        if server.connections_max == 0 {
            return Err(invalid("limits.connections_max", "must be at least 1".into()));
        }
        Ok(server)
    }
}

fn set<T>(target: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *target = value;
    }
}

/// Where a store field is written in the file.
fn section_of(field: &str) -> &'static str {
    match field {
        "key_bytes_max" => "limits.key_bytes_max",
        "value_bytes_max" => "limits.value_bytes_max",
        "batch_ops_max" => "limits.batch_ops_max",
        "inline_bytes_max" => "store.inline_bytes_max",
        "chunk_bytes" => "store.chunk_bytes",
        "gc_interval" => "store.gc_interval_ms",
        "checkpoint_wal_bytes" => "store.checkpoint_wal_bytes",
        "wal" => "wal",
        _ => "store",
    }
}

impl Resolved {
    /// The store configuration of one shard.
    pub fn store_for(&self, shard_id: u32) -> StoreConfig {
        let mut config = self.store.clone();
        config.dir = crate::store::shard::shard_dir(&self.data_dir, shard_id);
        config.shard_id = shard_id;
        config.wal.dir = config.dir.join("wal");
        config.wal.shard_id = shard_id;
        config
    }
}

/// The store's memory budget when the config names none: a share of the machine's RAM
/// (`MemTotal` in `/proc/meminfo`; 4 GiB when it cannot be read).
pub fn default_memory_bytes() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss, reason = "a share")]
    total.map_or(4 << 30, |bytes| (bytes as f64 * limits::STORE_MEMORY_RAM_SHARE) as u64)
}

/// `replication.bandwidth_mbit` and `replication.rtt_ms` when the config leaves them out.
pub const DEFAULT_BANDWIDTH_MBIT: u64 = 1000;
pub const DEFAULT_RTT_MS: u64 = 100;

/// The QUIC stream window for a link: twice the bandwidth-delay product, so a window never
/// stalls a stream that keeps up (1 MiB at least).
#[must_use]
pub fn quic_window_bytes(bandwidth_mbit: u64, rtt_ms: u64) -> u64 {
    (bandwidth_mbit * 1_000_000 / 8 * rtt_ms / 1000 * 2).max(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        match NodeConfig::from_toml(text) {
            Err(message) => message,
            Ok(config) => config.resolve().err().map(|error| error.to_string()).unwrap_or_default(),
        }
    }

    #[test]
    fn defaults_resolve() {
        let resolved = NodeConfig::from_toml("data_dir = \"/tmp/x\"\nshards = 2").unwrap().resolve().unwrap();
        assert_eq!(resolved.shards, 2);
        assert_eq!(resolved.port, 7700);
        assert_eq!(resolved.store_for(1).wal.dir, PathBuf::from("/tmp/x/shard-001/wal"));
    }

    #[test]
    fn the_example_file_is_valid_and_documents_every_field() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dataplane.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config = NodeConfig::from_toml(&text).unwrap();
        config.resolve().unwrap();
        let l = &config.limits;
        let s = &config.store;
        let w = &config.wal;
        let set = [
            config.listen.is_some(),
            l.key_bytes_max.is_some(),
            l.value_bytes_max.is_some(),
            l.frame_bytes_max.is_some(),
            l.inflight_per_connection.is_some(),
            l.connections_max.is_some(),
            l.batch_ops_max.is_some(),
            s.inline_bytes_max.is_some(),
            s.chunk_bytes.is_some(),
            s.retention_secs.is_some(),
            s.gc_interval_ms.is_some(),
            s.checkpoint_wal_bytes.is_some(),
            s.memory_bytes_max.is_some(),
            w.segment_bytes.is_some(),
            w.batch_bytes_max.is_some(),
            w.batch_linger_us.is_some(),
            w.record_payload_bytes_max.is_some(),
            w.recovery_mode.is_some(),
            w.reuse_segments.is_some(),
        ];
        let c = config.control.clone().unwrap_or_default();
        let control = [
            c.seeds.is_some(),
            c.tls_dir.is_some(),
            c.node_id.is_some(),
            c.region.is_some(),
            c.zone.is_some(),
            c.heartbeat_ms.is_some(),
            c.lease_ms.is_some(),
            c.glts_sync_ms.is_some(),
            c.drift_ppm.is_some(),
            c.start_timeout_ms.is_some(),
        ];
        assert!(control.iter().all(|field| *field), "the example leaves a [control] field undocumented");
        let r = config.replication.clone().unwrap_or_default();
        let replication = [
            r.region.is_some(),
            r.home.is_some(),
            r.listen.is_some(),
            r.tls_dir.is_some(),
            r.name.is_some(),
            r.codec.is_some(),
            r.batch_bytes_max.is_some(),
            r.window_batches.is_some(),
            r.window_bytes.is_some(),
            r.closed_interval_ms.is_some(),
            r.bandwidth_mbit.is_some(),
            r.rtt_ms.is_some(),
            r.wal_hold_bytes_max.is_some(),
            r.peers.first().is_some_and(|peer| peer.region.is_some() && peer.addr.is_some()),
        ];
        assert!(replication.iter().all(|field| *field), "the example leaves a [replication] field undocumented");
        assert!(set.iter().all(|field| *field), "the example leaves a field undocumented");
        assert!(text.contains("# shards ="));
        for commented in ["\n# multi_master = [\"", "\n# origin = "] {
            assert!(text.contains(commented), "the example leaves [replication] {commented:?} undocumented");
        }
    }

    #[test]
    fn replication_mistakes_name_the_field() {
        let base = "data_dir = \"/x\"\n[replication]\n";
        let ok = "region = \"b\"\nhome = \"a\"\nlisten = \"127.0.0.1:1\"\ntls_dir = \"/t\"\nname = \"b\"\n";
        assert!(error_of(&format!("{base}{ok}")).is_empty(), "a replica needs no peers");
        for (text, field) in [
            ("home = \"a\"\nlisten = \"127.0.0.1:1\"\ntls_dir = \"/t\"\nname = \"b\"\n", "replication.region"),
            (&format!("{ok}codec = \"zstd\"\n"), "replication.codec"),
            (&format!("{ok}window_batches = 0\n"), "replication.window_batches"),
            (&format!("{ok}closed_interval_ms = 0\n"), "replication.closed_interval_ms"),
            (&ok.replace("127.0.0.1:1", "nowhere"), "replication.listen"),
            (&ok.replace("region = \"b\"", "region = \"a\""), "replication.peers"),
            (&ok.replace("home = \"a\"\n", ""), "replication.home"),
            (&format!("{ok}[[replication.peers]]\nregion = \"c\"\naddr = \"x\"\n"), "replication.peers[0].addr"),
            (
                &format!("{ok}[[replication.peers]]\nregion = \"b\"\naddr = \"127.0.0.1:2\"\n"),
                "replication.peers[0].region",
            ),
            (&format!("{ok}colour = 1\n"), "colour"),
            (&format!("{ok}multi_master = [\"mm/\", \"\"]\norigin = 1\n"), "replication.multi_master[1]"),
            // With multi-master keyspaces every region takes writes, so it needs peers.
            (&format!("{ok}multi_master = [\"mm/\"]\norigin = 1\n"), "replication.peers"),
            (&format!("{ok}multi_master = [\"mm/\"]\n"), "replication.origin"),
            (&format!("{ok}origin = 1\n"), "replication.origin"),
            (&format!("{ok}multi_master = [\"mm/\"]\norigin = 16\n"), "replication.origin"),
            (
                &format!(
                    "{ok}multi_master = [\"mm/\"]\norigin = 1\n[[replication.peers]]\nregion = \"a\"\naddr = \"127.0.0.1:2\"\n"
                ),
                "replication.peers[0].origin",
            ),
            (
                &format!(
                    "{ok}multi_master = [\"mm/\"]\norigin = 1\n[[replication.peers]]\nregion = \"a\"\naddr = \"127.0.0.1:2\"\norigin = 1\n"
                ),
                "replication.peers[0].origin",
            ),
        ] {
            let message = error_of(&format!("{base}{text}"));
            assert!(message.contains(field), "{field}: {message}");
        }
        // Without `home`, the placement names the homes: the two regions must agree.
        let placed = |region: &str| {
            format!(
                "{}\n[replication]\n{}",
                control(&format!("node_id = \"n1\"\nregion = \"{region}\"\nzone = \"z\"")),
                ok.replace("home = \"a\"\n", "")
            )
        };
        assert!(error_of(&placed("b")).is_empty(), "{}", error_of(&placed("b")));
        let message = error_of(&placed("eu"));
        assert!(message.contains("replication.region") && message.contains("control.region `eu`"), "{message}");
    }

    fn control(rest: &str) -> String {
        format!("data_dir = \"/x\"\n[control]\nseeds = [\"127.0.0.1:7400\"]\ntls_dir = \"/t\"\n{rest}")
    }

    #[test]
    fn every_class_of_mistake_names_the_field() {
        let cases = [
            ("data_dir = \"/x\"\nbogus = 1", "bogus"),
            ("data_dir = \"/x\"\n[limits]\nkey_bytes_maxx = 1", "key_bytes_maxx"),
            ("data_dir = \"/x\"\nshards = \"two\"", "shards"),
            ("shards = 1", "data_dir"),
            ("data_dir = \"/x\"\nshards = 0", "shards"),
            ("data_dir = \"/x\"\nlisten = \"nowhere\"", "listen"),
            ("data_dir = \"/x\"\n[limits]\nkey_bytes_max = 0", "limits.key_bytes_max"),
            ("data_dir = \"/x\"\n[limits]\nvalue_bytes_max = 999999999999", "limits.value_bytes_max"),
            ("data_dir = \"/x\"\n[limits]\nframe_bytes_max = 1000", "limits.frame_bytes_max"),
            ("data_dir = \"/x\"\n[limits]\ninflight_per_connection = 0", "limits.inflight_per_connection"),
            ("data_dir = \"/x\"\n[store]\nchunk_bytes = 10", "store.chunk_bytes"),
            ("data_dir = \"/x\"\n[store]\ngc_interval_ms = 0", "store.gc_interval_ms"),
            ("data_dir = \"/x\"\n[wal]\nsegment_bytes = 1000", "segment_bytes"),
            ("data_dir = \"/x\"\n[wal]\nrecovery_mode = \"maybe\"", "wal.recovery_mode"),
            ("data_dir = \"/x\"\n[control]\nseedz = []", "seedz"),
            ("data_dir = \"/x\"\n[metrics]\nlisten = \"localhost\"", "metrics.listen"),
            ("data_dir = \"/x\"\n[metrics]", "metrics.listen"),
            ("data_dir = \"/x\"\n[metrics]\nport = 1", "port"),
            ("data_dir = \"/x\"\n[control]\nseeds = []", "control.seeds"),
            ("data_dir = \"/x\"\n[control]\nseeds = [\"cp1\"]", "control.seeds"),
            (&control("region = \"eu\"\nzone = \"a\""), "control.node_id"),
            (&control("node_id = \"n/1\"\nregion = \"eu\"\nzone = \"a\""), "control.node_id"),
            (&control("node_id = \"n1\"\nzone = \"a\""), "control.region"),
            (&control("node_id = \"n1\"\nregion = \"eu\""), "control.zone"),
            (&control("node_id = \"n1\"\nregion = \"eu\"\nzone = \"a\"\nlease_ms = 100"), "control.lease_ms"),
            (&control("node_id = \"n1\"\nregion = \"eu\"\nzone = \"a\"\ndrift_ppm = 0"), "control.drift_ppm"),
        ];
        for (text, field) in cases {
            let message = error_of(text);
            assert!(message.contains(field), "{text:?} gave {message:?}, which does not name {field}");
        }
    }
}
