//! Inter-region replication: each shard has a home region (from `[replication] home`, or per
//! shard from the control plane's placement). A node ships the WAL of every shard homed in its
//! region to every peer region over QUIC (mutual TLS), compressed, with the shard's closed
//! timestamp; the other regions' nodes make the records durable in their own WAL, apply them
//! and acknowledge. One node can be the home of some shards and a replica of the others.
//! With multi-master keyspaces (`[replication] multi_master`) every region takes writes of
//! their keys on every shard and ships its own records of every shard to every peer; stamps
//! carry their origin region, so timestamp order is last-writer-wins everywhere.
//!
//! - `core`: the protocol, sans-IO: the shipping and receiving sides of a stream (window,
//!   acks, gaps, closed timestamps, snapshot installs, admission), WAL holds and positions.
//! - `codec`: LZ4 / Snappy / none for batch bodies.
//! - `status`: resolved timestamps per source region (minimum closed timestamp over shards).
//! - `position`: the replica's resume position file per (source region, shard).
//! - `shell`: the tokio + quinn thread: it moves the cores' frames and timers.
//! - `shard`: the shard's end on its glommio executor: closed points out, applies and holds in.
//!
//! A shard's link has two sides, [`ShardSide`] on the shard and [`ThreadSide`] on the
//! replication thread; what crosses it are messages (points, [`Apply`], [`ShardNotice`]).
//!
//! Frames are defined in `wire::repl`.

pub mod codec;
pub mod core;
mod position;
pub(crate) mod shard;
mod shell;
mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use wire::repl::Codec;

use crate::store::{ClosedPoint, EngineSlot, ShardFiles, StoreError};
use crate::wal::WalTail;
use core::{Hold, Holds, WalHold};
pub use core::{Window, Work};
/// The replica position file's decoder (for its fuzz target).
pub use position::{PositionError, decode as decode_position};
pub use shell::{ALPN, CORRUPT_EVERY_ENV, Replication, StreamError, loopback_ceiling};
pub use status::Resolved;

/// One peer region and where its node's replication endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The region.
    pub region: String,
    /// Its node's QUIC address.
    pub addr: SocketAddr,
    /// The origin it stamps into its timestamps (with multi-master keyspaces).
    pub origin: Option<u8>,
}

/// `[replication]`, resolved.
#[derive(Debug, Clone)]
pub struct ReplConfig {
    /// This node's region.
    pub region: String,
    /// The home region of each shard, by shard id (where its writes are taken). Empty until
    /// known: `[replication] home` fills it for every shard, otherwise the node takes it from
    /// the control plane's placement at start ([`ReplConfig::place`]).
    pub homes: Vec<String>,
    /// The regions holding a replica of each shard, by shard id, from the control plane's
    /// placement (a placement that names none: every region but the home); `None`
    /// (`[replication] home`): every region but the home.
    pub replicas: Option<Vec<Vec<String>>>,
    /// UDP address of the replication endpoint.
    pub listen: SocketAddr,
    /// Directory with `ca.pem`, `<name>.pem`, `<name>.key`.
    pub tls_dir: PathBuf,
    /// The certificate name of this node.
    pub name: String,
    /// The other regions.
    pub peers: Vec<Peer>,
    /// Batch body compression.
    pub codec: Codec,
    /// Largest batch (raw entry bytes) before it is sent.
    pub batch_bytes_max: usize,
    /// Unacknowledged batches per stream.
    pub window: Window,
    /// How often a home shard publishes its closed timestamp, and how long a stream may stay
    /// quiet before an empty batch carries a newer one.
    pub closed_interval: Duration,
    /// QUIC flow-control window per stream and connection (the bandwidth-delay product).
    pub quic_window_bytes: u64,
    /// Most WAL a home shard keeps for a peer that fell behind; past it, the peer catches up
    /// from a snapshot (the shard's newest checkpoint) before the batches resume.
    pub wal_hold_bytes_max: u64,
    /// Key prefixes of the multi-master keyspaces (the same on every node): written in any
    /// region, last writer wins by (timestamp, origin region). With any, every region ships
    /// its own writes of every shard to every peer and receives every shard from each.
    pub multi_master: Vec<String>,
    /// This region's origin (`[replication] origin`, with multi-master keyspaces): stamped into
    /// the low bits of every timestamp, unique among the regions and never changed.
    pub origin: Option<u8>,
}

impl ReplConfig {
    /// The home region of `shard` (`None` before the homes are known or past the last shard).
    pub fn home_of(&self, shard: u32) -> Option<&str> {
        self.homes.get(shard as usize).map(String::as_str)
    }

    /// Whether `shard` takes its writes here rather than holding a replica.
    pub fn is_home_of(&self, shard: u32) -> bool {
        self.home_of(shard) == Some(self.region.as_str())
    }

    /// Whether this region holds a replica of `shard` (receives its stream from the home).
    pub fn replicates(&self, shard: u32) -> bool {
        !self.is_home_of(shard) && self.is_replica_region(shard, &self.region)
    }

    /// Whether `region` is one of `shard`'s replica regions (every region but the home when the
    /// placement does not say).
    fn is_replica_region(&self, shard: u32, region: &str) -> bool {
        self.replicas.as_ref().is_none_or(|replicas| {
            replicas.get(shard as usize).is_some_and(|regions| regions.iter().any(|known| known == region))
        })
    }

    /// Whether this region holds `shard` at all: its home, a replica, or any region with
    /// multi-master keyspaces (which hold every shard everywhere).
    pub fn holds(&self, shard: u32) -> bool {
        self.is_multi_master() || self.is_home_of(shard) || self.replicates(shard)
    }

    /// Whether `shard` is shipped from here to `peer`: from its home to its replica regions;
    /// with multi-master keyspaces from every region to every other.
    pub fn ships_to(&self, shard: u32, peer: &str) -> bool {
        self.is_multi_master() || (self.is_home_of(shard) && self.is_replica_region(shard, peer))
    }

    /// Whether the cluster has multi-master keyspaces.
    pub fn is_multi_master(&self) -> bool {
        !self.multi_master.is_empty()
    }

    /// Whether `shard` takes writes here and ships them: at its home, and everywhere with
    /// multi-master keyspaces.
    pub fn ships_shard(&self, shard: u32) -> bool {
        self.is_multi_master() || self.is_home_of(shard)
    }

    /// The regions that ship `shard` here: its home when that is elsewhere, and every peer
    /// with multi-master keyspaces.
    pub fn sources_of(&self, shard: u32) -> Vec<&str> {
        if self.is_multi_master() {
            return self.peers.iter().map(|peer| peer.region.as_str()).collect();
        }
        self.home_of(shard).filter(|_| self.replicates(shard)).into_iter().collect()
    }

    /// Whether some shard ships from here.
    pub fn ships(&self) -> bool {
        self.is_multi_master() || self.homes.contains(&self.region)
    }

    /// The origin `region` stamps into its timestamps with multi-master keyspaces (as
    /// configured: `[replication] origin` here, each peer's `origin`); `None` without them or
    /// for a region not known here.
    pub fn origin_of(&self, region: &str) -> Option<u8> {
        if region == self.region {
            return self.origin;
        }
        self.peers.iter().find(|peer| peer.region == region).and_then(|peer| peer.origin)
    }

    /// Sets the home and replica regions of each of `shards` shards from the control plane's
    /// placement, checking that it is complete and that every region it ships to is a peer.
    pub fn place(
        &mut self,
        shards: u32,
        placement: &std::collections::BTreeMap<u32, controlapi::meta::Placement>,
    ) -> Result<(), String> {
        let (mut homes, mut replicas) = (Vec::new(), Vec::new());
        for shard in 0..shards {
            let place = placement.get(&shard).ok_or_else(|| {
                format!(
                    "replication: the control plane has no placement for shard {shard} (`meridian cluster \
                     place {shard} --home REGION --replicas ...`), and [replication] names no `home`"
                )
            })?;
            if place.home == self.region
                && !self.is_multi_master()
                && let Some(unknown) =
                    place.replicas.iter().find(|region| !self.peers.iter().any(|peer| peer.region == **region))
            {
                return Err(format!(
                    "replication.peers: the placement replicates shard {shard} to region {unknown}, which is not \
                         a peer of region {}",
                    self.region
                ));
            }
            // A placement without replica regions (`cluster place --home` alone) keeps the
            // shard in every region, as before replica lists were read.
            let regions = if place.replicas.is_empty() {
                let every = self.peers.iter().map(|peer| &peer.region).chain([&self.region]);
                every.filter(|region| **region != place.home).cloned().collect()
            } else {
                place.replicas.clone()
            };
            homes.push(place.home.clone());
            replicas.push(regions);
        }
        self.homes = homes;
        self.replicas = Some(replicas);
        self.check_peers().map_err(|reason| format!("replication.peers: {reason}"))
    }

    /// A node that is the home of a shard needs a region to ship it to (the reason, without
    /// the field, when it has none).
    pub fn check_peers(&self) -> Result<(), String> {
        if self.ships() && self.peers.is_empty() {
            return Err(format!(
                "region {} takes writes of a shard and needs at least one peer region to ship to",
                self.region
            ));
        }
        Ok(())
    }

    /// How the node's shards are placed, for the log: `every shard home` (or `replica of
    /// <region>`) when all have the same role, else the role of each shard.
    pub fn roles(&self) -> String {
        let role = |(shard, home): (usize, &String)| {
            let shard = u32::try_from(shard).unwrap_or(u32::MAX);
            if *home == self.region {
                "home".to_owned()
            } else if self.holds(shard) {
                format!("replica of {home}")
            } else {
                format!("not held (home {home})")
            }
        };
        let roles: Vec<String> = self.homes.iter().enumerate().map(role).collect();
        if roles.windows(2).all(|pair| pair[0] == pair[1]) {
            return roles.first().map_or_else(String::new, |role| format!("every shard {role}"));
        }
        roles.iter().enumerate().map(|(shard, role)| format!("shard {shard} {role}")).collect::<Vec<_>>().join(", ")
    }
}

/// Shipped records handed to the replica shard that owns them: one frame's worth of work, so a
/// frame costs one hand-off between threads and one answer, not one per record.
#[derive(Debug)]
pub struct Apply {
    /// What to apply.
    pub work: Work,
    /// Answered once all of it is durable and applied here (the first error otherwise).
    pub done: oneshot::Sender<Result<(), StoreError>>,
}

/// What the replication thread tells a shard besides the records to apply: values the cores
/// computed, which the shard takes as they come (nothing is shared between the two).
#[derive(Debug)]
pub enum ShardNotice {
    /// The WAL to keep for the peers; `seen` is answered once the shard holds it.
    WalHold {
        /// The hold and the pin.
        hold: WalHold,
        /// Answered after the shard took it.
        seen: Option<oneshot::Sender<()>>,
    },
    /// With multi-master keyspaces, the collection floor: every source has shipped all of the
    /// shard at or below it.
    CollectFloor(u64),
}

/// Frames queued for a replica shard before the receiver waits (backpressure); the sender's
/// window bounds them too.
const APPLIES_QUEUED: usize = 256;
/// Notices queued for a shard before a stream waits.
const NOTICES_QUEUED: usize = 64;

/// What a shard keeps of its link: where it publishes its closed point (home), where shipped
/// records arrive (replica), what the replication thread tells it.
#[derive(Debug)]
pub struct ShardSide {
    /// The closed point, published every `closed_interval`.
    pub points: watch::Sender<ClosedPoint>,
    /// Records to apply.
    pub applies: mpsc::Receiver<Apply>,
    /// Holds and floors.
    pub notices: mpsc::Receiver<ShardNotice>,
    /// The newest durable WAL batches, which the shard's WAL fills where it ships.
    pub tail: Arc<WalTail>,
    /// Where the shard puts its engine once open (snapshots read it).
    pub engine: EngineSlot,
}

/// What the replication thread keeps of each shard.
#[derive(Debug, Clone)]
pub struct ThreadSide {
    /// The shard.
    pub shard: u32,
    /// Its closed point.
    pub points: watch::Receiver<ClosedPoint>,
    /// Where to hand records to apply.
    pub applies: mpsc::Sender<Apply>,
    /// Its streams' holds, told to the shard.
    pub holds: Arc<HoldLink>,
    /// Its files (WAL, chunks, checkpoints), read-only.
    pub files: ShardFiles,
}

/// One shard's WAL holds on the replication thread: every stream's [`Hold`] goes in, and the
/// shard is told the resulting [`WalHold`] whenever it changes.
#[derive(Debug)]
pub struct HoldLink {
    holds: Mutex<(Holds, WalHold)>,
    notices: mpsc::Sender<ShardNotice>,
    shard: u32,
}

impl HoldLink {
    /// `peer`'s stream holds `hold`; tells the shard when the shard's hold changed. With
    /// `wait`, returns once the shard holds it (a pin must be in place before the checkpoint
    /// it protects is opened).
    pub async fn update(&self, peer: &str, hold: Hold, wait: bool) -> Result<(), shell::StreamError> {
        let changed = {
            let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
            let value = holds.0.update(peer, hold);
            std::mem::replace(&mut holds.1, value) != value
        };
        self.tell(changed, wait).await
    }

    /// `peer`'s stream ended: its pin goes.
    pub async fn unpin(&self, peer: &str) -> Result<(), shell::StreamError> {
        let changed = {
            let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
            let value = holds.0.unpin(peer);
            std::mem::replace(&mut holds.1, value) != value
        };
        self.tell(changed, false).await
    }

    /// Tells the shard its collection floor.
    pub async fn set_floor(&self, floor: u64) -> Result<(), shell::StreamError> {
        self.notices
            .send(ShardNotice::CollectFloor(floor))
            .await
            .map_err(|_| shell::StreamError::ShardStopped(self.shard))
    }

    async fn tell(&self, changed: bool, wait: bool) -> Result<(), shell::StreamError> {
        if !changed && !wait {
            return Ok(());
        }
        let hold = self.holds.lock().unwrap_or_else(PoisonError::into_inner).1;
        let stopped = || shell::StreamError::ShardStopped(self.shard);
        let (seen, taken) = if wait {
            let (seen, taken) = oneshot::channel();
            (Some(seen), Some(taken))
        } else {
            (None, None)
        };
        self.notices.send(ShardNotice::WalHold { hold, seen }).await.map_err(|_| stopped())?;
        if let Some(taken) = taken {
            taken.await.map_err(|_| stopped())?;
        }
        Ok(())
    }
}

/// The two sides of one shard's link; `files` are the shard's files, `tail` its WAL tail.
pub fn shard_link(files: impl FnOnce(Arc<WalTail>, EngineSlot) -> ShardFiles) -> (ShardSide, ThreadSide) {
    let (points_tx, points_rx) = watch::channel(ClosedPoint::default());
    let (applies_tx, applies_rx) = mpsc::channel(APPLIES_QUEUED);
    let (notices_tx, notices_rx) = mpsc::channel(NOTICES_QUEUED);
    let tail = Arc::new(WalTail::new(crate::limits::WAL_TAIL_BYTES));
    let engine = EngineSlot::default();
    let files = files(tail.clone(), Arc::clone(&engine));
    let shard = files.shard_id();
    let holds = HoldLink { holds: Mutex::default(), notices: notices_tx, shard };
    (
        ShardSide { points: points_tx, applies: applies_rx, notices: notices_rx, tail, engine },
        ThreadSide { shard, points: points_rx, applies: applies_tx, holds: Arc::new(holds), files },
    )
}
