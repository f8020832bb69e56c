//! `meridian cluster ...`: administration of the control plane (status, adding and removing
//! voters) through [`ControlClient`], over QUIC with mutual TLS.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use client::exit_code;
use controlapi::NodeId;
use controlapi::client::ControlClient;
use controlapi::meta::{Command, Outcome};
use controlapi::rpc::{Request, Response, Role, Status};
use platform::quic::Connector;
use platform::tls::Identity;
use serde::Serialize;

use crate::print_json;

/// Longest wait for a QUIC handshake with one control-plane node: a dead seed must not eat the
/// whole --timeout-ms before the next one is tried.
const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(2);
/// Longest wait for one node's status (it is answered at once by a live node).
const STATUS_ATTEMPT_MAX: Duration = Duration::from_secs(3);

const CLUSTER_HELP: &str = "\
The control plane is reached over QUIC with mutual TLS: --tls-dir holds the cluster CA
(ca.pem) and this client's certificate and key (<tls-name>.pem, <tls-name>.key), as written
by `controlplane certs --out DIR ... admin`. Any running member may be given with --control;
requests go to the leader. --timeout-ms bounds the whole command.";

/// Where the control plane is and which certificate to present (`cluster` and `snapshot`).
#[derive(Debug, clap::Args)]
pub struct ControlFlags {
    /// Address (host:port) of a control-plane node, used to find the leader; repeat or
    /// separate with commas.
    #[arg(long = "control", value_name = "ADDR", env = "MERIDIAN_CONTROL", value_delimiter = ',', global = true)]
    pub control: Vec<String>,

    /// Directory with ca.pem and this client's <tls-name>.pem and <tls-name>.key.
    #[arg(long, value_name = "DIR", env = "MERIDIAN_TLS_DIR", global = true)]
    pub tls_dir: Option<PathBuf>,

    /// Name of this client's certificate in --tls-dir.
    #[arg(long, value_name = "NAME", env = "MERIDIAN_TLS_NAME", default_value = "admin", global = true)]
    pub tls_name: String,
}

/// Control-plane administration: status and membership.
#[derive(Debug, clap::Args)]
#[command(after_help = CLUSTER_HELP)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub flags: ControlFlags,

    #[command(subcommand)]
    pub command: ClusterCommand,
}

/// Global snapshots: take one, list the catalog, show one.
#[derive(Debug, clap::Args)]
#[command(after_help = SNAPSHOT_HELP)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub flags: ControlFlags,

    #[command(subcommand)]
    pub command: SnapshotCommand,
}

const SNAPSHOT_HELP: &str = "\
A global snapshot is a timestamp t in GLTS time, chosen by the control-plane leader at its
interval's latest bound: every write acknowledged before the request is in it, and reads at
t are consistent across all shards in a region once the region's data node has applied (home
shards) and resolved (replicated regions) everything up to t. The leader asks one data node
per region to say when that happened; `list` and `show` give, per region, `readable` and the
time from the request, `pending`, or `failed` (not readable within 30 s). Read a snapshot
with `meridian get KEY --at T` or `meridian ls --at T` once it is readable in your region.
The control plane is reached as for `meridian cluster` (--control, --tls-dir).";

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a global snapshot; prints its id and timestamp.
    Create {
        /// Add this many ms to the snapshot's timestamp (for regions so far apart that `now`
        /// resolves late everywhere anyway).
        #[arg(long, value_name = "MS", default_value_t = 0)]
        lead_ms: u64,
        /// Wait until every region has it readable (or failed), then print each region's time.
        #[arg(long)]
        wait: bool,
    },
    /// The snapshot catalog: id, timestamp, per-region status and time to readable.
    List,
    /// One snapshot.
    Show {
        /// Snapshot id.
        id: u64,
    },
    /// Read a key as of a snapshot from the node at --addr (any region), once the snapshot is
    /// readable there: the value on stdout, or into -o FILE.
    Get {
        /// Snapshot id.
        id: u64,
        /// The key.
        key: String,
        /// Write the value to this file instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// List every key under a prefix as of a snapshot from the node at --addr (any region),
    /// once the snapshot is readable there: `key<TAB>size<TAB>ts` lines, or --json.
    Ls {
        /// Snapshot id.
        id: u64,
        /// Key prefix.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Export a snapshot into an archive, read from the node at --addr once it is readable
    /// there: incremental from the newest archived snapshot below it (only keys whose version
    /// changed are read), content-defined chunks deduplicated across the archive, zstd packs.
    Export {
        /// Snapshot id (from `snapshot create` or `list`).
        id: u64,
        /// The archive: a directory (created if missing), file:///dir, or s3://bucket/path
        /// with a client built with the s3 feature.
        #[arg(long, value_name = "URL")]
        archive: String,
    },
    /// The snapshots in an archive (no control plane needed).
    Archived {
        /// The archive.
        #[arg(long, value_name = "URL")]
        archive: String,
    },
    /// Restore an archived snapshot, or the keys under --prefix, to a directory (each key a
    /// file) or into the cluster at --addr; every chunk is checked against its hash.
    Restore {
        /// Archived snapshot id.
        id: u64,
        /// The archive.
        #[arg(long, value_name = "URL")]
        archive: String,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Write each key as a file under this directory.
        #[arg(long, value_name = "DIR", conflicts_with = "to_cluster", required_unless_present = "to_cluster")]
        to_dir: Option<PathBuf>,
        /// Put each key into the cluster at --addr (a new or empty cluster).
        #[arg(long)]
        to_cluster: bool,
    },
    /// Read every pack of an archive and check every chunk's hash and every snapshot's chunks;
    /// exits 1 when anything is damaged or missing.
    Verify {
        /// The archive.
        #[arg(long, value_name = "URL")]
        archive: String,
    },
    /// Keep the newest --keep-last archived snapshots; delete the others and every pack no
    /// kept snapshot uses (packs are left while an export runs).
    Prune {
        /// The archive.
        #[arg(long, value_name = "URL")]
        archive: String,
        /// Snapshots to keep.
        #[arg(long, value_name = "N")]
        keep_last: usize,
    },
}

impl SnapshotCommand {
    /// Whether the command talks to the control plane.
    pub fn needs_control(&self) -> bool {
        matches!(
            self,
            Self::Create { .. }
                | Self::List
                | Self::Show { .. }
                | Self::Export { .. }
                | Self::Get { .. }
                | Self::Ls { .. }
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show the leader, members, data nodes, placement, leases, snapshots and GLTS width.
    ///
    /// The metadata is the leader's; each member is also asked for its own role, term and
    /// applied index (members that do not answer are marked unreachable). With --json, one
    /// object: the leader's status plus a `members_status` array.
    Status,
    /// Add a control-plane node as a voter.
    ///
    /// The leader adds the node as a learner, lets it catch up with the log, then makes it a
    /// voter through joint consensus: a configuration with both the old and the new voter sets
    /// commits first, then the new one, so a quorum is kept throughout.
    ///
    /// The node must already run, e.g. `controlplane run --id ID --listen ADDR --data-dir DIR
    /// --tls-dir DIR --seed <member address>`; this command first checks that it answers at
    /// ADDR as node ID. A node started with --seed asks the leader to add it by itself, so this
    /// command is mostly for adding back a node that was removed while it kept running.
    AddNode {
        /// The node's id (> 0, never reused).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: NodeId,
        /// The node's QUIC address, as the other members reach it.
        #[arg(long, value_name = "HOST:PORT")]
        addr: String,
    },
    /// Remove a control-plane voter.
    ///
    /// The leader removes the voter through joint consensus (old and new voter sets, then the
    /// new one). The node's process is not stopped: stop it once the command succeeds. Removing
    /// the leader makes it step down after the change commits. An id that is not a voter is
    /// refused (exit 4).
    RemoveNode {
        /// The voter's id.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: NodeId,
    },
    /// Define a region and its zones (or replace its zone list).
    ///
    /// Data nodes register into a region and zone that exist; placement names regions.
    Region {
        /// Region name.
        name: String,
        /// Its zones, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        zones: Vec<String>,
    },
    /// Place a shard: the region that takes its writes and the regions it replicates to.
    ///
    /// The data node of the home region holds the shard's primary lease. Every region named
    /// must exist.
    Place {
        /// Shard number.
        shard: u32,
        /// Home region.
        #[arg(long)]
        home: String,
        /// Replica regions, comma-separated.
        #[arg(long, value_delimiter = ',')]
        replicas: Vec<String>,
    },
    /// Place a replica set for every shard of a region that has none.
    ///
    /// Each shard `0..shards` gets `replicas` of the region's Up data nodes, in distinct zones
    /// while zones last, the least loaded first; its primary is the chosen node that leads the
    /// fewest sets. Refused (exit 4) when fewer than `min-replicas` data nodes are Up; a set
    /// that got fewer nodes than `replicas` is shown under-replicated by `cluster shards`.
    /// Existing sets are left as they are.
    PlaceSets {
        /// Region.
        #[arg(long)]
        region: String,
        /// Logical shards.
        #[arg(long, default_value_t = 64)]
        shards: u32,
        /// Copies per shard.
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Fewest members a set takes writes with.
        #[arg(long, default_value_t = 2)]
        min_replicas: usize,
    },
    /// Show every shard's replica set: epoch, primary, members, learners.
    ///
    /// A set with fewer members than its `replicas` is marked under-replicated with how many
    /// copies are missing. With --json, the sets by region and shard.
    Shards {
        /// Only this region.
        #[arg(long)]
        region: Option<String>,
    },
}

/// A control-plane failure, classified for the exit code.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The leader answered with an error.
    #[error("refused by the control plane: {0}")]
    Refused(String),
    /// No leader answered in time (added as context over the cause).
    #[error("control plane unavailable")]
    Unavailable,
    /// The node to add does not answer (added as context over the cause).
    #[error("node {id} does not answer at {addr}; start it first (controlplane run --id {id} --listen {addr} ...)")]
    NewNodeDown {
        /// Its id.
        id: NodeId,
        /// Its address.
        addr: String,
    },
}

impl ControlError {
    /// The exit code, in the convention of the data commands.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Refused(_) => exit_code::REFUSED,
            Self::Unavailable | Self::NewNodeDown { .. } => exit_code::UNAVAILABLE,
        }
    }
}

/// Where the control plane is and who we are, checked from [`ClusterArgs`].
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// Seed addresses.
    pub seeds: Vec<String>,
    /// TLS directory.
    pub tls_dir: PathBuf,
    /// Certificate name.
    pub tls_name: String,
}

impl ControlFlags {
    /// The target, or what is missing from the command line.
    pub fn target(&self) -> Result<Target, &'static str> {
        let seeds: Vec<String> =
            self.control.iter().map(|addr| addr.trim().to_owned()).filter(|addr| !addr.is_empty()).collect();
        if seeds.is_empty() {
            return Err("cluster commands need --control ADDR (or MERIDIAN_CONTROL)");
        }
        let Some(tls_dir) = self.tls_dir.clone() else {
            return Err("cluster commands need --tls-dir DIR (or MERIDIAN_TLS_DIR)");
        };
        Ok(Target { seeds, tls_dir, tls_name: self.tls_name.clone() })
    }
}

/// One member as it answers for itself.
#[derive(Debug, Serialize)]
struct MemberStatus {
    id: NodeId,
    addr: String,
    voter: bool,
    reachable: bool,
    role: Option<Role>,
    term: Option<u64>,
    leader: Option<NodeId>,
    last_log_index: Option<u64>,
    applied_index: Option<u64>,
    isolated: Option<bool>,
    /// Why it did not answer.
    error: Option<String>,
}

impl MemberStatus {
    fn new(member: &controlapi::rpc::Member, answer: anyhow::Result<&Status>) -> Self {
        let mut status = Self {
            id: member.id,
            addr: member.addr.clone(),
            voter: member.voter,
            reachable: false,
            role: None,
            term: None,
            leader: None,
            last_log_index: None,
            applied_index: None,
            isolated: None,
            error: None,
        };
        match answer {
            Ok(own) => {
                status.reachable = true;
                status.role = Some(own.role);
                status.term = Some(own.term);
                status.leader = own.leader;
                status.last_log_index = own.last_log_index;
                status.applied_index = own.applied_index;
                status.isolated = Some(own.isolated);
            }
            Err(error) => status.error = Some(format!("{error:#}")),
        }
        status
    }
}

#[derive(Debug, Serialize)]
struct StatusOutput<'a> {
    #[serde(flatten)]
    leader: &'a Status,
    members_status: Vec<MemberStatus>,
}

#[derive(Debug, Serialize)]
struct MembershipOutput<'a> {
    action: &'static str,
    id: NodeId,
    #[serde(skip_serializing_if = "Option::is_none")]
    addr: Option<&'a str>,
}

/// Runs one `meridian cluster` command; `timeout` bounds it.
pub async fn run(command: &ClusterCommand, target: &Target, json: bool, timeout: Duration) -> anyhow::Result<()> {
    let label = match command {
        ClusterCommand::Status => "cluster status".to_owned(),
        ClusterCommand::AddNode { id, addr } => format!("cluster add-node {id} at {addr}"),
        ClusterCommand::RemoveNode { id } => format!("cluster remove-node {id}"),
        ClusterCommand::Region { name, .. } => format!("cluster region {name}"),
        ClusterCommand::Place { shard, .. } => format!("cluster place {shard}"),
        ClusterCommand::PlaceSets { region, .. } => format!("cluster place-sets --region {region}"),
        ClusterCommand::Shards { .. } => "cluster shards".to_owned(),
    };
    execute(command, target, json, timeout).await.context(label)
}

/// A control-plane client for `target`, each connection attempt bounded by `timeout`.
fn connect(target: &Target, timeout: Duration) -> anyhow::Result<ControlClient> {
    let identity = Identity::in_dir(&target.tls_dir, &target.tls_name);
    let tls = identity.client_config().with_context(|| {
        format!(
            "cannot load the TLS identity {:?} from --tls-dir {} (needs ca.pem, {name}.pem and {name}.key)",
            target.tls_name,
            target.tls_dir.display(),
            name = target.tls_name
        )
    })?;
    let mut connector = Connector::client(tls).context("cannot open a QUIC endpoint")?;
    connector.connect_timeout = timeout.min(CONNECT_TIMEOUT_MAX);
    Ok(ControlClient::with_connector(connector, target.seeds.clone()))
}

/// Tells the nodes we are gone rather than leave them to the idle timeout.
async fn disconnect(client: &ControlClient) {
    let endpoint = client.connector().endpoint();
    endpoint.close(0_u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
}

async fn execute(command: &ClusterCommand, target: &Target, json: bool, timeout: Duration) -> anyhow::Result<()> {
    let mut client = connect(target, timeout)?;
    let mut stdout = std::io::stdout().lock();
    let result = match command {
        ClusterCommand::Status => {
            client.attempt_timeout = timeout.min(STATUS_ATTEMPT_MAX);
            status(&client, timeout, json, &mut stdout).await
        }
        ClusterCommand::AddNode { id, addr } => {
            // The leader answers once the node caught up and the change committed: no
            // shorter limit per attempt than the whole command's.
            client.attempt_timeout = timeout;
            let request = Request::AddVoter { id: *id, addr: addr.clone() };
            let added = match check_new_node(&client, *id, addr, timeout.min(STATUS_ATTEMPT_MAX)).await {
                Ok(()) => membership_change(&client, &request, timeout).await,
                Err(error) => Err(error),
            };
            added.and_then(|()| {
                if json {
                    print_json(&mut stdout, &MembershipOutput { action: "add_node", id: *id, addr: Some(addr) })
                } else {
                    Ok(writeln!(stdout, "node {id} at {addr} is a voter")?)
                }
            })
        }
        ClusterCommand::RemoveNode { id } => {
            client.attempt_timeout = timeout;
            let request = Request::RemoveVoter { id: *id };
            membership_change(&client, &request, timeout).await.and_then(|()| {
                if json {
                    print_json(&mut stdout, &MembershipOutput { action: "remove_node", id: *id, addr: None })
                } else {
                    Ok(writeln!(stdout, "node {id} is no longer a member")?)
                }
            })
        }
        ClusterCommand::Region { name, zones } => {
            client.attempt_timeout = timeout;
            let command = Command::PutRegion { name: name.clone(), zones: zones.clone() };
            let summary = format!("region {name} with zones {}", zones.join(","));
            metadata_write(&client, command, timeout, json, &summary, &mut stdout).await
        }
        ClusterCommand::Place { shard, home, replicas } => {
            client.attempt_timeout = timeout;
            let command = Command::SetPlacement { shard: *shard, home: home.clone(), replicas: replicas.clone() };
            let summary = format!("shard {shard} home {home}, replicas {}", replicas.join(","));
            metadata_write(&client, command, timeout, json, &summary, &mut stdout).await
        }
        ClusterCommand::PlaceSets { region, shards, replicas, min_replicas } => {
            client.attempt_timeout = timeout;
            let command = Command::PlaceReplicaSets {
                region: region.clone(),
                shards: *shards,
                replicas: *replicas,
                min_replicas: *min_replicas,
            };
            let summary =
                format!("replica sets of {shards} shards in {region} ({replicas} copies, at least {min_replicas})");
            metadata_write(&client, command, timeout, json, &summary, &mut stdout).await
        }
        ClusterCommand::Shards { region } => {
            client.attempt_timeout = timeout.min(STATUS_ATTEMPT_MAX);
            shards(&client, region.as_deref(), timeout, json, &mut stdout).await
        }
    };
    disconnect(&client).await;
    result
}

/// One snapshot as `meridian snapshot` prints it.
#[derive(Debug, Serialize)]
struct SnapshotOutput {
    id: u64,
    glt: u64,
    created_ms: u64,
    /// Per region: `pending`, `readable` or `failed`.
    regions: BTreeMap<String, controlapi::meta::SnapshotStatus>,
    /// Per readable region: ms from the request until it could be read there.
    readable_after_ms: BTreeMap<String, f64>,
}

impl SnapshotOutput {
    fn new(id: u64, snapshot: &controlapi::meta::Snapshot) -> Self {
        Self {
            id,
            glt: snapshot.glt,
            created_ms: snapshot.created_ms,
            regions: snapshot.regions.clone(),
            readable_after_ms: snapshot
                .readable_after_us
                .iter()
                .map(|(region, us)| (region.clone(), *us as f64 / 1000.0))
                .collect(),
        }
    }

    fn regions_text(&self) -> String {
        let regions: Vec<String> = self
            .regions
            .iter()
            .map(|(region, status)| match self.readable_after_ms.get(region) {
                Some(ms) => format!("{region}=readable ({ms:.1} ms)"),
                None => format!("{region}={}", format!("{status:?}").to_lowercase()),
            })
            .collect();
        regions.join(" ")
    }
}

/// Runs one `meridian snapshot` command; `timeout` bounds it.
pub async fn run_snapshot(
    command: &SnapshotCommand,
    target: Option<&Target>,
    addr: &str,
    json: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let label = match command {
        SnapshotCommand::Create { .. } => "snapshot create".to_owned(),
        SnapshotCommand::List => "snapshot list".to_owned(),
        SnapshotCommand::Show { id } => format!("snapshot show {id}"),
        SnapshotCommand::Export { id, .. } => format!("snapshot export {id}"),
        SnapshotCommand::Get { id, key, .. } => format!("snapshot get {id} {key:?}"),
        SnapshotCommand::Ls { id, prefix } => format!("snapshot ls {id} {prefix:?}"),
        SnapshotCommand::Archived { .. } => "snapshot archived".to_owned(),
        SnapshotCommand::Restore { id, .. } => format!("snapshot restore {id}"),
        SnapshotCommand::Verify { .. } => "snapshot verify".to_owned(),
        SnapshotCommand::Prune { .. } => "snapshot prune".to_owned(),
    };
    let Some(target) = target else {
        return crate::archive::run(command, addr, json, timeout).await.context(label);
    };
    let mut client = connect(target, timeout)?;
    client.attempt_timeout = timeout.min(STATUS_ATTEMPT_MAX);
    let result = match command {
        SnapshotCommand::Export { id, archive } => match snapshot_glt(&client, *id, timeout).await {
            Ok(glt) => crate::archive::export(archive, *id, glt, addr, json, timeout).await,
            Err(error) => Err(error),
        },
        SnapshotCommand::Get { id, .. } | SnapshotCommand::Ls { id, .. } => {
            match snapshot_glt(&client, *id, timeout).await {
                Ok(glt) => crate::archive::read(command, glt, addr, json, timeout).await,
                Err(error) => Err(error),
            }
        }
        _ => snapshot_command(&client, command, json, timeout).await,
    }
    .context(label);
    disconnect(&client).await;
    result
}

async fn snapshot_command(
    client: &ControlClient,
    command: &SnapshotCommand,
    json: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let give_up = tokio::time::Instant::now() + timeout;
    let catalog = |linearizable| async move {
        let left = give_up.saturating_duration_since(tokio::time::Instant::now());
        client.read(linearizable, left).await.context(ControlError::Unavailable).map(|meta| meta.snapshots)
    };
    match command {
        SnapshotCommand::Create { lead_ms, wait } => {
            let (id, glt) = client.create_snapshot(lead_ms.saturating_mul(1000), timeout).await.map_err(classify)?;
            let snapshot = loop {
                let snapshots = catalog(true).await?;
                let snapshot = snapshots.get(&id).with_context(|| format!("snapshot {id} is not in the catalog"))?;
                let pending = snapshot.regions.values().any(|s| *s == controlapi::meta::SnapshotStatus::Pending);
                if !*wait || !pending {
                    break SnapshotOutput::new(id, snapshot);
                }
                if tokio::time::Instant::now() >= give_up {
                    bail!(
                        "snapshot {id} at {glt} still pending when --timeout-ms ran out: {}",
                        SnapshotOutput::new(id, snapshot).regions_text()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if json {
                print_json(&mut stdout, &snapshot)
            } else {
                Ok(writeln!(stdout, "snapshot {id} at {glt}: {}", snapshot.regions_text())?)
            }
        }
        SnapshotCommand::List => {
            let snapshots: Vec<SnapshotOutput> =
                catalog(false).await?.iter().map(|(id, snapshot)| SnapshotOutput::new(*id, snapshot)).collect();
            if json {
                print_json(&mut stdout, &serde_json::json!({ "snapshots": snapshots }))
            } else {
                writeln!(stdout, "{:<6} {:<22} {:<15} REGIONS", "ID", "GLT", "CREATED (UNIX MS)")?;
                for snapshot in &snapshots {
                    writeln!(
                        stdout,
                        "{:<6} {:<22} {:<15} {}",
                        snapshot.id,
                        snapshot.glt,
                        snapshot.created_ms,
                        snapshot.regions_text()
                    )?;
                }
                Ok(())
            }
        }
        SnapshotCommand::Export { .. }
        | SnapshotCommand::Get { .. }
        | SnapshotCommand::Ls { .. }
        | SnapshotCommand::Archived { .. }
        | SnapshotCommand::Restore { .. }
        | SnapshotCommand::Verify { .. }
        | SnapshotCommand::Prune { .. } => unreachable!("run_snapshot runs archive commands"),
        SnapshotCommand::Show { id } => {
            let snapshots = catalog(false).await?;
            let Some(snapshot) = snapshots.get(id) else {
                return Err(ControlError::Refused(format!("no snapshot {id} in the catalog")).into());
            };
            let snapshot = SnapshotOutput::new(*id, snapshot);
            if json {
                print_json(&mut stdout, &snapshot)
            } else {
                Ok(writeln!(
                    stdout,
                    "snapshot {id}\n  glt      {}\n  created  {} (unix ms)\n  regions  {}",
                    snapshot.glt,
                    snapshot.created_ms,
                    snapshot.regions_text()
                )?)
            }
        }
    }
}

/// The timestamp of snapshot `id` in the catalog.
async fn snapshot_glt(client: &ControlClient, id: u64, timeout: Duration) -> anyhow::Result<u64> {
    let snapshots = client.read(true, timeout).await.context(ControlError::Unavailable)?.snapshots;
    let snapshot =
        snapshots.get(&id).ok_or_else(|| ControlError::Refused(format!("no snapshot {id} in the catalog")))?;
    Ok(snapshot.glt)
}

/// No leader answering is `Unavailable`; anything else (a refusal, an answer lost after the
/// request reached the leader) is `Refused`.
fn classify(error: controlapi::client::ControlError) -> anyhow::Error {
    match error {
        controlapi::client::ControlError::NoLeader { .. } => {
            anyhow::Error::new(error).context(ControlError::Unavailable)
        }
        other => ControlError::Refused(other.to_string()).into(),
    }
}

/// Checks that the node to add runs at `addr` and is node `id` (a node that does not run
/// would still be made a voter, and count against the quorum).
async fn check_new_node(client: &ControlClient, id: NodeId, addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let answer = client.call_node(addr, &Request::Status, timeout).await;
    match answer.context(ControlError::NewNodeDown { id, addr: addr.to_owned() })? {
        Response::Status(status) if status.node_id == id => Ok(()),
        Response::Status(status) => {
            bail!("the node at {addr} is node {}, not {id}; check --id and --addr", status.node_id)
        }
        other => bail!("unexpected response from {addr}: {other:?}"),
    }
}

/// Commits one metadata command and reports it (`--json`: the command as committed).
/// One row per region for `cluster status`: sets, how many are under-replicated, the highest
/// epoch (the sets in detail are `meridian cluster shards`).
fn replica_set_rows(meta: &controlapi::meta::MetaState) -> Vec<Vec<String>> {
    meta.replica_sets
        .iter()
        .map(|(region, sets)| {
            let under = sets.values().filter(|config| config.members.len() < config.replicas).count();
            let epochs = sets.values().map(|config| config.epoch).max().unwrap_or(0);
            vec![region.clone(), sets.len().to_string(), under.to_string(), epochs.to_string()]
        })
        .collect()
}

/// `meridian cluster shards`: the replica sets as the leader has them.
async fn shards(
    client: &ControlClient,
    region: Option<&str>,
    timeout: Duration,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let meta = client.read(true, timeout).await.context(ControlError::Unavailable)?;
    if let Some(region) = region
        && !meta.regions.contains_key(region)
    {
        return Err(ControlError::Refused(format!("unknown region {region:?}")).into());
    }
    let sets: BTreeMap<&String, &BTreeMap<u32, controlapi::replica::SetConfig>> =
        meta.replica_sets.iter().filter(|(name, _)| region.is_none_or(|region| region == name.as_str())).collect();
    if json {
        return print_json(out, &sets);
    }
    if sets.values().all(|shards| shards.is_empty()) {
        writeln!(out, "no replica sets placed (meridian cluster place-sets --region R)")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<10} {:>5} {:>6}  {:<12} {:<30} {:<20} state",
        "region", "shard", "epoch", "primary", "members", "learners"
    )?;
    for (region, shards) in sets {
        for (shard, config) in shards {
            let state = if config.members.len() < config.replicas {
                format!("under-replicated: {} of {} copies", config.members.len(), config.replicas)
            } else {
                "ok".to_owned()
            };
            writeln!(
                out,
                "{region:<10} {shard:>5} {:>6}  {:<12} {:<30} {:<20} {state}",
                config.epoch,
                config.primary,
                config.members.join(","),
                config.learners.join(","),
            )?;
        }
    }
    Ok(())
}

async fn metadata_write(
    client: &ControlClient,
    command: Command,
    timeout: Duration,
    json: bool,
    summary: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    match client.propose(command.clone(), timeout).await.context(ControlError::Unavailable)? {
        (Outcome::Rejected { reason }, _) => Err(ControlError::Refused(reason).into()),
        (_, index) => {
            if json {
                print_json(out, &serde_json::json!({ "committed": command, "log_index": index }))
            } else {
                Ok(writeln!(out, "{summary}: committed at log index {index}")?)
            }
        }
    }
}

/// Sends an `AddVoter` / `RemoveVoter` to the leader and checks the answer.
async fn membership_change(client: &ControlClient, request: &Request, timeout: Duration) -> anyhow::Result<()> {
    match client.call(request, timeout).await.context(ControlError::Unavailable)? {
        Response::Ok => Ok(()),
        Response::Error { message } => Err(ControlError::Refused(message).into()),
        Response::NotLeader { leader } => {
            Err(anyhow!("the leader is unknown (last hint: {leader:?})").context(ControlError::Unavailable))
        }
        other => bail!("unexpected response {other:?}"),
    }
}

async fn status(client: &ControlClient, timeout: Duration, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let leader = client.leader_status(timeout).await.map_err(classify)?;
    let others: Vec<String> =
        leader.members.iter().filter(|m| m.id != leader.node_id).map(|m| m.addr.clone()).collect();
    let mut answers = client.statuses(others).await;
    let members_status: Vec<MemberStatus> = leader
        .members
        .iter()
        .map(|member| {
            if member.id == leader.node_id {
                return MemberStatus::new(member, Ok(&leader));
            }
            let answer = answers.remove(&member.addr).map(|answer| answer.map_err(anyhow::Error::new));
            let answer = answer.unwrap_or_else(|| Err(anyhow!("status query failed")));
            MemberStatus::new(member, answer.as_ref().map_err(|error| anyhow!("{error:#}")))
        })
        .collect();
    if json {
        print_json(out, &StatusOutput { leader: &leader, members_status })
    } else {
        print_status(out, &leader, &members_status, unix_ms())?;
        Ok(())
    }
}

fn unix_ms() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

fn plural(count: usize, noun: &str) -> String {
    if count == 1 { format!("1 {noun}") } else { format!("{count} {noun}s") }
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| value.to_string())
}

/// `at_ms` relative to `now_ms`, e.g. `in 2.5 s` or `1.0 s ago`.
fn relative(at_ms: u64, now_ms: u64) -> String {
    let seconds = |ms: u64| Duration::from_millis(ms).as_secs_f64();
    if at_ms >= now_ms {
        format!("in {:.1} s", seconds(at_ms - now_ms))
    } else {
        format!("{:.1} s ago", seconds(now_ms - at_ms))
    }
}

/// Rows as aligned columns, indented by two spaces; the first row is the header.
fn table(out: &mut impl Write, rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (column, cell) in row.iter().enumerate() {
            let width = cell.chars().count();
            match widths.get_mut(column) {
                Some(known) => *known = (*known).max(width),
                None => widths.push(width),
            }
        }
    }
    for row in rows {
        let mut line = String::from(" ");
        for (column, cell) in row.iter().enumerate() {
            let width = widths.get(column).copied().unwrap_or(0);
            line.push(' ');
            line.push_str(cell);
            if column + 1 < row.len() {
                line.extend(std::iter::repeat_n(' ', width.saturating_sub(cell.chars().count()) + 1));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// Writes the sections of the human status: a table under its title, or a one-line
/// `title (0): none`; tables are set apart by blank lines.
struct Sections<'a, W: Write> {
    out: &'a mut W,
    after_table: bool,
}

impl<W: Write> Sections<'_, W> {
    fn section(&mut self, title: &str, count: &str, header: &[&str], rows: Vec<Vec<String>>) -> std::io::Result<()> {
        if rows.is_empty() {
            if std::mem::take(&mut self.after_table) {
                writeln!(self.out)?;
            }
            return writeln!(self.out, "{title} ({count}): none");
        }
        writeln!(self.out)?;
        writeln!(self.out, "{title} ({count}):")?;
        let mut all = vec![header.iter().map(|cell| (*cell).to_owned()).collect()];
        all.extend(rows);
        table(self.out, &all)?;
        self.after_table = true;
        Ok(())
    }

    fn counted(&mut self, title: &str, header: &[&str], rows: Vec<Vec<String>>) -> std::io::Result<()> {
        self.section(title, &rows.len().to_string(), header, rows)
    }
}

fn print_status(out: &mut impl Write, leader: &Status, members: &[MemberStatus], now_ms: u64) -> std::io::Result<()> {
    let leader_addr = leader.members.iter().find(|m| m.id == leader.node_id).map_or("?", |m| m.addr.as_str());
    writeln!(
        out,
        "leader {} at {leader_addr}, term {}, applied index {}",
        leader.node_id,
        leader.term,
        or_dash(leader.applied_index)
    )?;
    match leader.glts_width_us {
        Some(width) => writeln!(out, "glts width {width:.1} µs, local source {}", leader.glts_local_source)?,
        None => writeln!(
            out,
            "glts width unknown (no interval yet, or sources disagree), local source {}",
            leader.glts_local_source
        )?,
    }
    let voters = members.iter().filter(|m| m.voter).count();
    let member_rows = members
        .iter()
        .map(|m| {
            let kind = if m.voter { "voter" } else { "learner" };
            let note = match (&m.error, m.isolated) {
                (Some(error), _) => error.clone(),
                (None, Some(true)) => "isolated (fault injection)".to_owned(),
                _ => String::new(),
            };
            let role = if m.reachable { or_dash(m.role.map(Role::name)) } else { "unreachable".to_owned() };
            vec![
                m.id.to_string(),
                m.addr.clone(),
                kind.to_owned(),
                role,
                or_dash(m.term),
                or_dash(m.applied_index),
                note,
            ]
        })
        .collect();
    let count = format!("{}, {}", plural(voters, "voter"), plural(members.len() - voters, "learner"));
    let mut sections = Sections { out, after_table: false };
    sections.section("members", &count, &["ID", "ADDR", "KIND", "ROLE", "TERM", "APPLIED", "NOTE"], member_rows)?;

    let meta = &leader.meta;
    let region_rows = meta.regions.iter().map(|(name, region)| vec![name.clone(), region.zones.join(",")]).collect();
    sections.counted("regions", &["REGION", "ZONES"], region_rows)?;
    let node_rows = meta
        .data_nodes
        .iter()
        .map(|(id, node)| {
            vec![
                id.clone(),
                node.addr.clone(),
                format!("{}/{}", node.region, node.zone),
                node.shards.to_string(),
                format!("{:?}", node.state).to_lowercase(),
            ]
        })
        .collect();
    sections.counted("data nodes", &["ID", "ADDR", "REGION/ZONE", "SHARDS", "STATE"], node_rows)?;
    let placement_rows = meta
        .placement
        .iter()
        .map(|(shard, placement)| {
            let replicas = if placement.replicas.is_empty() { "-".to_owned() } else { placement.replicas.join(",") };
            vec![shard.to_string(), placement.home.clone(), replicas]
        })
        .collect();
    sections.counted("shard placement", &["SHARD", "HOME", "REPLICAS"], placement_rows)?;
    let lease_rows = meta
        .leases
        .iter()
        .map(|(shard, lease)| {
            vec![
                shard.to_string(),
                lease.holder.clone(),
                lease.epoch.to_string(),
                format!("{} ({})", lease.expires_ms, relative(lease.expires_ms, now_ms)),
            ]
        })
        .collect();
    sections.counted("leases", &["SHARD", "HOLDER", "EPOCH", "EXPIRES (UNIX MS)"], lease_rows)?;
    let set_rows = replica_set_rows(meta);
    sections.counted("replica sets by region", &["REGION", "SETS", "UNDER-REPLICATED", "HIGHEST EPOCH"], set_rows)?;
    let snapshot_rows = meta
        .snapshots
        .iter()
        .map(|(id, snapshot)| {
            vec![
                id.to_string(),
                snapshot.glt.to_string(),
                format!("{} ({})", snapshot.created_ms, relative(snapshot.created_ms, now_ms)),
                SnapshotOutput::new(*id, snapshot).regions_text(),
            ]
        })
        .collect();
    sections.counted("snapshot catalog", &["ID", "GLT", "CREATED (UNIX MS)", "REGIONS"], snapshot_rows)
}

#[cfg(test)]
mod tests {
    use controlapi::meta::{DataNode, Lease, MetaState, NodeState, Placement, Region, Snapshot, SnapshotStatus};
    use controlapi::rpc::Member;

    use super::*;

    fn leader() -> Status {
        let mut meta = MetaState::default();
        meta.regions.insert("eu".into(), Region { zones: vec!["a".into(), "b".into()] });
        let node = DataNode {
            replica_addr: String::new(),
            addr: "10.0.0.5:7700".into(),
            region: "eu".into(),
            zone: "b".into(),
            shards: 8,
            capacity_bytes: 1 << 40,
            state: NodeState::Suspect,
            registered_ms: 1,
        };
        meta.data_nodes.insert("dn-1".into(), node);
        meta.placement.insert(3, Placement { home: "eu".into(), replicas: vec![] });
        meta.leases.insert(3, Lease { holder: "dn-1".into(), epoch: 2, expires_ms: 12_500 });
        let regions = [("eu".to_owned(), SnapshotStatus::Readable)].into();
        let readable_after_us = [("eu".to_owned(), 23_500)].into();
        meta.snapshots.insert(0, Snapshot { glt: 77, regions, created_ms: 4_000, readable_after_us });
        let member = |id, voter| Member { id, addr: format!("127.0.0.1:710{id}"), voter };
        Status {
            node_id: 2,
            role: Role::Leader,
            leader: Some(2),
            term: 5,
            last_log_index: Some(40),
            applied_index: Some(40),
            members: vec![member(1, true), member(2, true), member(3, false)],
            meta,
            glts_width_us: Some(512.3),
            glts_local_source: "clockbound".into(),
            isolated: false,
        }
    }

    #[test]
    fn human_status_lists_every_section() {
        let mut leader = leader();
        let nodes: Vec<String> = ["dn-1", "dn-2"].map(str::to_owned).to_vec();
        let mut set = controlapi::replica::SetConfig::initial(&nodes, 2);
        (set.replicas, set.epoch) = (3, 4);
        leader.meta.replica_sets.entry("eu".into()).or_default().insert(3, set);
        let members: Vec<MemberStatus> = leader
            .members
            .iter()
            .map(|member| match member.id {
                3 => MemberStatus::new(member, Err(anyhow!("cannot connect to 127.0.0.1:7103"))),
                _ => MemberStatus::new(member, Ok(&leader)),
            })
            .collect();
        let mut out = Vec::new();
        print_status(&mut out, &leader, &members, 10_000).unwrap();
        let text = String::from_utf8(out).unwrap();
        let expected = "\
leader 2 at 127.0.0.1:7102, term 5, applied index 40
glts width 512.3 µs, local source clockbound

members (2 voters, 1 learner):
  ID  ADDR            KIND     ROLE         TERM  APPLIED  NOTE
  1   127.0.0.1:7101  voter    leader       5     40
  2   127.0.0.1:7102  voter    leader       5     40
  3   127.0.0.1:7103  learner  unreachable  -     -        cannot connect to 127.0.0.1:7103

regions (1):
  REGION  ZONES
  eu      a,b

data nodes (1):
  ID    ADDR           REGION/ZONE  SHARDS  STATE
  dn-1  10.0.0.5:7700  eu/b         8       suspect

shard placement (1):
  SHARD  HOME  REPLICAS
  3      eu    -

leases (1):
  SHARD  HOLDER  EPOCH  EXPIRES (UNIX MS)
  3      dn-1    2      12500 (in 2.5 s)

replica sets by region (1):
  REGION  SETS  UNDER-REPLICATED  HIGHEST EPOCH
  eu      1     1                 4

snapshot catalog (1):
  ID  GLT  CREATED (UNIX MS)  REGIONS
  0   77   4000 (6.0 s ago)   eu=readable (23.5 ms)
";
        assert_eq!(text, expected);
    }

    #[test]
    fn json_status_is_the_leaders_status_plus_members_status() {
        let leader = leader();
        let members_status = vec![MemberStatus::new(&leader.members[0], Ok(&leader))];
        let value = serde_json::to_value(StatusOutput { leader: &leader, members_status }).unwrap();
        assert_eq!(value["node_id"], 2);
        assert_eq!(value["meta"]["leases"]["3"]["epoch"], 2);
        assert_eq!(value["glts_width_us"], 512.3);
        assert_eq!(value["members_status"][0]["reachable"], true);
        assert_eq!(value["members_status"][0]["error"], serde_json::Value::Null);
    }
}
