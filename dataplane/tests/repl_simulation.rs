//! The replication protocol in a seeded simulation: a home region's shard and its replica
//! regions, each stream driven by the real sans-IO cores (`Shipper`, `Receiver`, `Holds`,
//! `Position`, `admit`) with real frames (encoded, compressed, decoded), over links that delay,
//! drop, duplicate, reorder and partition, between nodes whose clocks drift and that crash and
//! restart (losing what was not durable). The test acts as the shells and checks after every
//! event:
//!
//! - no acknowledged record is lost: whatever a replica acknowledged is durable there;
//! - a resolved timestamp never covers a missing record;
//! - positions and acknowledgements only move forward, closed promises hold, a pin holds;
//! - at the end, healed and quiet, every replica converges to the home (snapshots included).
//!
//! `MERIDIAN_SIM_SEED=<seed>` replays one seed with a trace of its events;
//! `MERIDIAN_SIM_SEEDS=<n>` runs more.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]

mod sim;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use dataplane::repl::codec;
use dataplane::repl::core::{
    Hold, Holds, Position, Receiver, Sealed, ShipConfig, Shipper, Start, WalExtent, WalHold, Window, Work, admit,
};
use dataplane::repl::{Peer, ReplConfig};
use dataplane::store::ClosedPoint;
use dataplane::store::op::{self, Body, Value};
use rand::Rng;
use rand::rngs::StdRng;
use sim::{Lane, LinkFaults, NodeClock, Queue};
use wire::repl::{self, Codec, Frame};

const SHARD: u32 = 0;
const HOME: &str = "a";
const MS: u64 = 1_000_000;

/// What can happen.
#[derive(Debug)]
enum Event {
    /// A client write at the home.
    Write,
    /// The home's WAL barrier: everything appended is durable.
    HomeSync,
    /// The home publishes its closed point to the shippers.
    Publish,
    /// The home writes a checkpoint and releases WAL.
    Checkpoint,
    /// A frame arrives, on replica `replica`'s stream of `epoch`, at the replica (`inbound`)
    /// or at the home.
    Deliver {
        replica: usize,
        epoch: u64,
        inbound: bool,
        frame: Bytes,
    },
    /// A shipper's timer.
    Wake {
        replica: usize,
        epoch: u64,
    },
    /// A replica's WAL barrier.
    ReplicaSync {
        replica: usize,
    },
    /// The home dials replica `replica` again.
    Dial {
        replica: usize,
    },
    HomeCrash,
    HomeRestart,
    ReplicaCrash {
        replica: usize,
    },
    ReplicaRestart {
        replica: usize,
    },
    Partition {
        replica: usize,
        on: bool,
    },
}

/// A record of the home's log.
#[derive(Debug, Clone)]
struct Record {
    lsn: u64,
    glt: u64,
    payload: Bytes,
    key: Bytes,
    value: Option<Bytes>,
}

/// A version: key, timestamp, value (`None`: a tombstone).
type Version = (Bytes, u64, Option<Bytes>);

/// A checkpoint: every version below `lsn`.
#[derive(Debug, Clone)]
struct Checkpoint {
    lsn: u64,
    versions: Vec<(u64, Bytes, Option<Bytes>)>,
}

#[derive(Debug)]
struct Home {
    clock: NodeClock,
    up: bool,
    /// Every record ever made durable, in LSN order (the truth the invariants check against).
    history: Vec<Record>,
    /// Appended, not yet durable.
    pending: Vec<Record>,
    /// The WAL holds LSNs from here to the end of `history`.
    wal_first: u64,
    last_stamp: u64,
    checkpoint: Option<Checkpoint>,
    /// What the replication thread computed and told the shard.
    holds: Holds,
    hold: WalHold,
    /// Every closed timestamp published (a later stamp must be above it).
    published_closed: u64,
    /// A barrier is scheduled.
    syncing: bool,
    point: ClosedPoint,
}

impl Home {
    fn next_lsn(&self) -> u64 {
        1 + self.history.len() as u64 + self.pending.len() as u64
    }

    fn durable_next(&self) -> u64 {
        1 + self.history.len() as u64
    }

    fn record(&self, lsn: u64) -> Option<&Record> {
        self.history.get(usize::try_from(lsn.checked_sub(1)?).ok()?)
    }
}

/// The home's end of one stream.
#[derive(Debug)]
struct ShipSide {
    epoch: u64,
    shipper: Shipper,
    resumed: bool,
    lane: Lane,
    /// The timer set (virtual ns), if any: one at a time.
    wake_at: Option<u64>,
    /// When an acknowledgement last arrived (or the stream opened), virtual ns.
    acked_at: u64,
}

/// Silence after which a connection with frames unacknowledged is gone (QUIC's idle timeout
/// in the shell): what ends a stream whose transport lost a frame and then went quiet.
const IDLE_TIMEOUT_NS: u64 = 1_000 * MS;

/// A replica's end of one stream.
#[derive(Debug)]
struct RecvSide {
    epoch: u64,
    receiver: Option<Receiver>,
    lane: Lane,
}

#[derive(Debug)]
struct Replica {
    region: String,
    clock: NodeClock,
    up: bool,
    /// Durable versions: key -> ts -> value (None: tombstone).
    durable: BTreeMap<Bytes, BTreeMap<u64, Option<Bytes>>>,
    /// Applied, not yet durable: (stream epoch, frame seq, versions).
    pending: Vec<(u64, u64, Vec<Version>)>,
    /// Frames of the current stream waiting for their versions to be durable: seq -> count.
    waiting: HashMap<u64, usize>,
    position: Position,
    persisted: u64,
    /// A position was written behind an earlier one.
    regressed: bool,
    /// A barrier is scheduled.
    syncing: bool,
    resolved: u64,
    /// Acknowledgements ever sent (never lost: a checked promise).
    acked_max: u64,
    /// History checked durable here so far (every LSN below it).
    verified_lsn: u64,
}

/// The simulated world of one seed.
struct World {
    rng: StdRng,
    queue: Queue<Event>,
    config: ReplConfig,
    home: Home,
    replicas: Vec<Replica>,
    ships: Vec<Option<ShipSide>>,
    recvs: Vec<Option<RecvSide>>,
    epochs: Vec<u64>,
    partitioned: Vec<bool>,
    faults: LinkFaults,
    window: Window,
    batch_bytes_max: usize,
    closed_interval_ns: u64,
    hold_records_max: u64,
    codec: Codec,
    /// Chaos ends here: no crash, partition or fault after it, writes stop.
    calm_at_ns: u64,
    trace: bool,
    steps: u64,
}

/// Why a seed failed.
type Failure = String;

impl World {
    fn new(seed: u64, trace: bool) -> Self {
        let mut rng = sim::rng(seed);
        let replica_count = rng.random_range(1..=2usize);
        let regions: Vec<String> = (0..replica_count).map(|index| ["b", "c"][index].to_owned()).collect();
        let config = ReplConfig {
            region: HOME.into(),
            homes: vec![HOME.into()],
            replicas: Some(vec![regions.clone()]),
            listen: "127.0.0.1:0".parse().unwrap(),
            tls_dir: "/nonexistent".into(),
            name: HOME.into(),
            peers: regions
                .iter()
                .map(|region| Peer { region: region.clone(), addr: "127.0.0.1:1".parse().unwrap(), origin: None })
                .collect(),
            codec: Codec::Lz4,
            batch_bytes_max: 4096,
            window: Window { batches: 4, bytes: 1 << 20 },
            closed_interval: Duration::from_millis(5),
            quic_window_bytes: 1 << 20,
            wal_hold_bytes_max: 1 << 20,
            multi_master: Vec::new(),
            origin: None,
        };
        let home = Home {
            clock: NodeClock::draw(&mut rng, 200, 50 * MS as i64),
            up: true,
            history: Vec::new(),
            pending: Vec::new(),
            wal_first: 1,
            last_stamp: 0,
            checkpoint: None,
            holds: Holds::default(),
            hold: WalHold { hold_lsn: 0, pin_lsn: u64::MAX },
            published_closed: 0,
            syncing: false,
            point: ClosedPoint { durable_next_lsn: 1, closed_ts: 0 },
        };
        let replicas = regions
            .iter()
            .map(|region| Replica {
                region: region.clone(),
                clock: NodeClock::draw(&mut rng, 200, 50 * MS as i64),
                up: true,
                durable: BTreeMap::new(),
                pending: Vec::new(),
                waiting: HashMap::new(),
                position: Position::new(1, 0, 200 * MS),
                persisted: 1,
                regressed: false,
                syncing: false,
                resolved: 0,
                acked_max: 1,
                verified_lsn: 1,
            })
            .collect();
        let faults = LinkFaults {
            delay_ns: (rng.random_range(1..5) * MS, rng.random_range(5..30) * MS),
            loss: [0.0, 0.01, 0.05][rng.random_range(0..3)],
            retransmit_ns: rng.random_range(20..200) * MS,
            drop: [0.0, 0.001, 0.01][rng.random_range(0..3)],
            duplicate: [0.0, 0.005][rng.random_range(0..2)],
            reorder: [0.0, 0.005][rng.random_range(0..2)],
        };
        let codec = [Codec::None, Codec::Lz4, Codec::Snappy][rng.random_range(0..3)];
        let batch_bytes_max = rng.random_range(256..8192);
        let window = Window { batches: rng.random_range(1..8), bytes: rng.random_range(1024..65536) };
        let mut world = World {
            rng,
            queue: Queue::default(),
            config,
            home,
            replicas,
            ships: (0..replica_count).map(|_| None).collect(),
            recvs: (0..replica_count).map(|_| None).collect(),
            epochs: vec![0; replica_count],
            partitioned: vec![false; replica_count],
            faults,
            window,
            batch_bytes_max,
            closed_interval_ns: 5 * MS,
            hold_records_max: 40,
            codec,
            calm_at_ns: 2_500 * MS,
            trace,
            steps: 0,
        };
        world.config.codec = codec;
        world.queue.after(0, Event::Write);
        world.queue.after(MS, Event::Publish);
        world.queue.after(100 * MS, Event::Checkpoint);
        for replica in 0..replica_count {
            world.queue.after(0, Event::Dial { replica });
        }
        world.schedule_chaos();
        world
    }

    /// Crashes, restarts and partitions at random moments before the calm.
    fn schedule_chaos(&mut self) {
        let events = self.rng.random_range(0..8);
        for _ in 0..events {
            let at = self.rng.random_range(0..self.calm_at_ns - 500 * MS);
            let length = self.rng.random_range(10..800) * MS;
            match self.rng.random_range(0..3) {
                0 => {
                    self.queue.at(at, Event::HomeCrash);
                    self.queue.at(at + length, Event::HomeRestart);
                }
                1 => {
                    let replica = self.rng.random_range(0..self.replicas.len());
                    self.queue.at(at, Event::ReplicaCrash { replica });
                    self.queue.at(at + length, Event::ReplicaRestart { replica });
                }
                _ => {
                    let replica = self.rng.random_range(0..self.replicas.len());
                    self.queue.at(at, Event::Partition { replica, on: true });
                    self.queue.at(at + length, Event::Partition { replica, on: false });
                }
            }
        }
    }

    fn now(&self) -> u64 {
        self.queue.now_ns()
    }

    fn calm(&self) -> bool {
        self.now() >= self.calm_at_ns
    }

    /// Runs until `end_ns`, checking the invariants after every event.
    fn run(&mut self, end_ns: u64) -> Result<(), Failure> {
        while self.queue.next_at_ns().is_some_and(|at| at <= end_ns) {
            let Some(event) = self.queue.pop() else { break };
            self.steps += 1;
            if self.trace {
                eprintln!("{:>10.3} ms {}", self.now() as f64 / 1e6, describe(&event));
            }
            self.step(event)?;
            self.check()?;
        }
        Ok(())
    }

    fn step(&mut self, event: Event) -> Result<(), Failure> {
        match event {
            Event::Write => self.write(),
            Event::HomeSync => self.home_sync(),
            Event::Publish => self.publish(),
            Event::Checkpoint => self.checkpoint(),
            Event::Deliver { replica, epoch, inbound, frame } => {
                if epoch == self.epochs[replica] {
                    if inbound { self.at_replica(replica, &frame) } else { self.at_home(replica, &frame) }
                }
            }
            Event::Wake { replica, epoch } => {
                if epoch == self.epochs[replica] {
                    let now = self.now();
                    if let Some(ship) = &mut self.ships[replica]
                        && ship.wake_at.is_some_and(|at| at <= now)
                    {
                        ship.wake_at = None;
                    }
                    self.ship_ready(replica);
                }
            }
            Event::ReplicaSync { replica } => self.replica_sync(replica),
            Event::Dial { replica } => self.dial(replica),
            Event::HomeCrash => self.home_crash(),
            Event::HomeRestart => {
                if !self.home.up {
                    self.home_restart();
                }
            }
            Event::ReplicaCrash { replica } => self.replica_crash(replica),
            Event::ReplicaRestart { replica } => {
                if !self.replicas[replica].up {
                    self.replica_restart(replica);
                }
            }
            Event::Partition { replica, on } => {
                self.partitioned[replica] = on;
                if on {
                    self.reset(replica, "partitioned");
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ the home

    fn stamp(&mut self) -> u64 {
        let wall = self.home.clock.wall_us(self.now());
        let stamp = (self.home.last_stamp + 1).max(wire::glt::timestamp_at(wall));
        self.home.last_stamp = stamp;
        stamp
    }

    fn write(&mut self) {
        if !self.calm() {
            let after = self.rng.random_range(0..3 * MS);
            self.queue.after(after, Event::Write);
        }
        if !self.home.up {
            return;
        }
        let lsn = self.home.next_lsn();
        let glt = self.stamp();
        let key = Bytes::from(format!("k{}", self.rng.random_range(0..50)));
        let value = (!self.rng.random_bool(0.1)).then(|| Bytes::from(vec![b'v'; self.rng.random_range(1..300)]));
        let body = value.as_deref().map_or(Value::Tombstone, Value::Inline);
        let mut payload = Vec::new();
        op::encode(std::iter::once((&key[..], body)), &mut payload).unwrap();
        self.home.pending.push(Record { lsn, glt, payload: Bytes::from(payload), key, value });
        // The next barrier takes it (one in flight at a time, as the WAL's).
        if !self.home.syncing {
            self.home.syncing = true;
            self.queue.after(self.rng.random_range(MS / 2..3 * MS), Event::HomeSync);
        }
    }

    fn home_sync(&mut self) {
        self.home.syncing = false;
        if self.home.up {
            let pending = std::mem::take(&mut self.home.pending);
            self.home.history.extend(pending);
        }
    }

    /// The shard's promise: every record below the durable point is durable, and no record at
    /// or below the closed timestamp will come from there on (one below the first record not
    /// durable, else below the clock: later stamps are at or above it).
    fn closed_point(&self) -> ClosedPoint {
        let closed_ts = match self.home.pending.first() {
            Some(first) => first.glt - 1,
            None => self.home.last_stamp.max(wire::glt::timestamp_at(self.home.clock.wall_us(self.now())) - 1),
        };
        ClosedPoint { durable_next_lsn: self.home.durable_next(), closed_ts }
    }

    fn publish(&mut self) {
        self.queue.after(self.closed_interval_ns, Event::Publish);
        if !self.home.up {
            return;
        }
        let point = self.closed_point();
        self.home.point = point;
        self.home.published_closed = self.home.published_closed.max(point.closed_ts);
        let now = self.now();
        for replica in 0..self.replicas.len() {
            let stalled = self.ships[replica].as_ref().is_some_and(|ship| {
                ship.shipper.unacked_batches() > 0 && now.saturating_sub(ship.acked_at) > IDLE_TIMEOUT_NS
            });
            if stalled {
                self.reset(replica, "no acknowledgement within the idle timeout");
            }
            if let Some(ship) = &mut self.ships[replica] {
                ship.shipper.on_point(point);
            }
            self.ship_ready(replica);
        }
    }

    fn checkpoint(&mut self) {
        self.queue.after(self.rng.random_range(50..300) * MS, Event::Checkpoint);
        if !self.home.up {
            return;
        }
        let lsn = self.home.durable_next();
        let versions = self.home.history.iter().map(|r| (r.glt, r.key.clone(), r.value.clone())).collect();
        self.home.checkpoint = Some(Checkpoint { lsn, versions });
        // As the store does: keep what peers hold, up to the bound; what a pin holds, always.
        let keep_floor = lsn.saturating_sub(self.hold_records_max);
        let hold = self.home.hold.hold_lsn.max(keep_floor).min(self.home.hold.pin_lsn);
        self.home.wal_first = self.home.wal_first.max(lsn.min(hold));
    }

    fn home_crash(&mut self) {
        self.home.up = false;
        self.home.pending.clear();
        for replica in 0..self.replicas.len() {
            self.reset(replica, "home crashed");
        }
    }

    fn home_restart(&mut self) {
        self.home.up = true;
        // The replication thread starts over: no stream has said anything; the WAL is kept
        // whole until they do.
        self.home.holds = Holds::default();
        self.home.hold = WalHold { hold_lsn: 0, pin_lsn: u64::MAX };
        self.home.last_stamp = self.home.history.last().map_or(0, |r| r.glt);
        self.home.point = self.closed_point();
    }

    fn tell_hold(&mut self, replica: usize, hold: Hold) {
        let region = self.replicas[replica].region.clone();
        self.home.hold = self.home.holds.update(&region, hold);
    }

    // ------------------------------------------------------------------ streams

    fn dial(&mut self, replica: usize) {
        if self.ships[replica].is_some() {
            return;
        }
        if !self.home.up || !self.replicas[replica].up || self.partitioned[replica] {
            let backoff = self.rng.random_range(20..200) * MS;
            self.queue.after(backoff, Event::Dial { replica });
            return;
        }
        self.epochs[replica] += 1;
        let epoch = self.epochs[replica];
        let config = ShipConfig { window: self.window, closed_interval_ns: self.closed_interval_ns };
        let shipper = Shipper::new(config, self.home.point);
        let hold = shipper.hold();
        self.ships[replica] = Some(ShipSide {
            epoch,
            shipper,
            resumed: false,
            lane: Lane::default(),
            wake_at: None,
            acked_at: self.now(),
        });
        self.recvs[replica] = Some(RecvSide { epoch, receiver: None, lane: Lane::default() });
        self.tell_hold(replica, hold);
        let region = self.config.region.clone();
        let mut hello = Vec::new();
        repl::encode_frame(&Frame::Hello { shard: SHARD, shards: 1, region: &region }, &mut hello).unwrap();
        self.send(replica, true, hello);
    }

    /// Ends replica `replica`'s stream (both ends); the home dials again after a pause.
    fn reset(&mut self, replica: usize, why: &str) {
        if self.ships[replica].is_none() && self.recvs[replica].is_none() {
            return;
        }
        if self.trace {
            eprintln!("             stream to {} ends: {why}", self.replicas[replica].region);
        }
        self.epochs[replica] += 1;
        self.ships[replica] = None;
        self.recvs[replica] = None;
        self.replicas[replica].waiting.clear();
        let region = self.replicas[replica].region.clone();
        self.home.hold = self.home.holds.unpin(&region);
        let backoff = self.rng.random_range(20..200) * MS;
        self.queue.after(backoff, Event::Dial { replica });
    }

    /// Sends `frame` on replica `replica`'s stream, toward the replica (`inbound`) or the home.
    fn send(&mut self, replica: usize, inbound: bool, frame: Vec<u8>) {
        if self.partitioned[replica] {
            return;
        }
        let epoch = self.epochs[replica];
        let mut faults = self.faults;
        if self.calm() {
            faults = LinkFaults { loss: 0.0, ..faults.reliable() };
        }
        // The transport misbehaves only where the cores can tell: batches and acks carry the
        // LSNs that show a gap, an overlap or a step back. Hellos, resumes and snapshot parts
        // rely on the stream being reliable and ordered, as QUIC's is.
        let checked =
            matches!(repl::decode_frame(&frame).map(|(frame, _)| frame), Ok(Frame::Batch(_) | Frame::Ack { .. }));
        let now = self.now();
        let lane = if inbound {
            self.recvs[replica].as_mut().map(|side| &mut side.lane)
        } else {
            self.ships[replica].as_mut().map(|side| &mut side.lane)
        };
        let Some(lane) = lane else { return };
        let frame = Bytes::from(frame);
        for at in lane.deliveries(&mut self.rng, now, &faults, checked) {
            self.queue.at(at, Event::Deliver { replica, epoch, inbound, frame: frame.clone() });
        }
    }

    /// A frame reaches the home's end of the stream.
    fn at_home(&mut self, replica: usize, frame: &[u8]) {
        let now = self.home.clock.monotonic_ns(self.now());
        let Some(ship) = &mut self.ships[replica] else { return };
        let decoded = repl::decode_frame(frame).map(|(frame, _)| frame);
        let outcome: Result<Option<Start>, String> = match decoded {
            Ok(Frame::Resume { next_lsn }) if !ship.resumed => {
                ship.resumed = true;
                let wal = WalExtent {
                    first_lsn: Some(self.home.wal_first),
                    checkpoint_lsn: self.home.checkpoint.as_ref().map(|checkpoint| checkpoint.lsn),
                };
                ship.shipper.on_resume(next_lsn, wal, now).map(Some).map_err(|error| error.to_string())
            }
            Ok(Frame::Ack { next_lsn, .. }) => {
                ship.acked_at = self.queue.now_ns();
                ship.shipper.on_ack(next_lsn).map(|()| None).map_err(|e| e.to_string())
            }
            Ok(Frame::Refuse { reason }) => Err(format!("refused: {reason}")),
            Ok(other) => Err(format!("unexpected {}", dataplane::repl::core::frame_name(&other))),
            Err(error) => Err(error.to_string()),
        };
        match outcome {
            Err(error) => self.reset(replica, &error),
            Ok(start) => {
                let hold = ship.shipper.hold();
                self.tell_hold(replica, hold);
                if let Some(Start::Snapshot { resume_lsn }) = start
                    && let Err(error) = self.send_snapshot(replica, resume_lsn)
                {
                    self.reset(replica, &error);
                    return;
                }
                self.ship_ready(replica);
            }
        }
    }

    /// The checkpoint at `resume_lsn` in parts, then batches from there.
    fn send_snapshot(&mut self, replica: usize, resume_lsn: u64) -> Result<(), String> {
        // The pin is in place (told synchronously); the checkpoint must still be the one named.
        let checkpoint = self.home.checkpoint.clone().filter(|checkpoint| checkpoint.lsn == resume_lsn);
        let checkpoint = checkpoint.ok_or("the checkpoint was replaced")?;
        let per_part = self.rng.random_range(1..20);
        let parts: Vec<_> = checkpoint.versions.chunks(per_part).collect();
        let count = parts.len().max(1);
        for index in 0..count {
            let mut raw = Vec::new();
            let versions = parts.get(index).copied().unwrap_or(&[]);
            for (glt, key, value) in versions {
                let mut payload = Vec::new();
                let body = value.as_deref().map_or(Value::Tombstone, Value::Inline);
                op::encode(std::iter::once((&key[..], body)), &mut payload).unwrap();
                repl::encode_entry(*glt, &payload, &mut raw);
            }
            let body = codec::compress(self.codec, &raw);
            let last = index + 1 == count;
            let install = repl::Install {
                shard: SHARD,
                resume_lsn,
                horizon: 0,
                count: versions.len() as u32,
                last,
                codec: self.codec,
                raw_len: raw.len() as u32,
                body: &body,
            };
            let mut frame = Vec::new();
            repl::encode_frame(&Frame::Install(install), &mut frame).unwrap();
            self.send(replica, true, frame);
        }
        let now = self.home.clock.monotonic_ns(self.now());
        let ship = self.ships[replica].as_mut().ok_or("stream gone")?;
        ship.shipper.on_snapshot_sent(now).map_err(|error| error.to_string())?;
        Ok(())
    }

    /// Sends what the shipper says is ready, then sets its timer.
    fn ship_ready(&mut self, replica: usize) {
        if !self.home.up {
            return;
        }
        loop {
            let now = self.home.clock.monotonic_ns(self.now());
            let Some(ship) = &mut self.ships[replica] else { return };
            let Some(range) = ship.shipper.next_batch() else { break };
            if range.start < self.home.wal_first {
                self.reset(replica, "the WAL was released under the stream");
                return;
            }
            let mut raw = Vec::new();
            let (mut next, mut last_glt) = (range.start, None);
            while next < range.end && raw.len() < self.batch_bytes_max {
                let record = self.home.record(next).unwrap();
                repl::encode_entry(record.glt, &record.payload, &mut raw);
                last_glt = Some(record.glt);
                next += 1;
            }
            let body = codec::compress(self.codec, &raw);
            let sealed = Sealed { first_lsn: range.start, next_lsn: next, last_glt };
            let ship = self.ships[replica].as_mut().unwrap();
            let closed_ts = match ship.shipper.seal(sealed, body.len() + 64, now) {
                Ok(closed) => closed,
                Err(error) => {
                    self.reset(replica, &error.to_string());
                    return;
                }
            };
            let count = (next - range.start) as u32;
            self.send_batch(replica, range.start, count, closed_ts, raw.len() as u32, &body);
        }
        let now = self.home.clock.monotonic_ns(self.now());
        let empty = codec::compress(self.codec, &[]);
        let ship = self.ships[replica].as_mut().unwrap();
        if let Some((first, closed)) = ship.shipper.heartbeat(empty.len() + 64, now) {
            self.send_batch(replica, first, 0, closed, 0, &empty);
        }
        let virtual_now = self.now();
        let ship = self.ships[replica].as_mut().unwrap();
        if let Some(deadline) = ship.shipper.deadline_ns(now) {
            // The node's clock runs at its own rate: close enough for a timer.
            let at = virtual_now + (deadline - now);
            if ship.wake_at.is_none_or(|pending| at < pending) {
                ship.wake_at = Some(at);
                let epoch = ship.epoch;
                self.queue.at(at, Event::Wake { replica, epoch });
            }
        }
    }

    fn send_batch(&mut self, replica: usize, first_lsn: u64, count: u32, closed_ts: u64, raw_len: u32, body: &[u8]) {
        let batch = repl::Batch { shard: SHARD, first_lsn, count, closed_ts, codec: self.codec, raw_len, body };
        let mut frame = Vec::new();
        repl::encode_frame(&Frame::Batch(batch), &mut frame).unwrap();
        self.send(replica, true, frame);
    }

    /// A frame reaches the replica's end of the stream.
    fn at_replica(&mut self, replica: usize, frame: &[u8]) {
        if !self.replicas[replica].up {
            return;
        }
        let Some(side) = &self.recvs[replica] else { return };
        let (epoch, admitted) = (side.epoch, side.receiver.is_some());
        if !admitted {
            let Ok((Frame::Hello { shard, shards, region }, _)) = repl::decode_frame(frame) else {
                self.reset(replica, "expected Hello");
                return;
            };
            let here = self.replica_config(replica);
            if let Err(reason) = admit(&here, 1, shard, shards, region) {
                panic!("a home's stream was refused: {reason}");
            }
            let next_lsn = self.replicas[replica].position.lsn();
            let receiver = Receiver::new(&here, shard, region, next_lsn);
            if let Some(side) = &mut self.recvs[replica] {
                side.receiver = Some(receiver);
            }
            let mut resume = Vec::new();
            repl::encode_frame(&Frame::Resume { next_lsn }, &mut resume).unwrap();
            self.send(replica, false, resume);
            return;
        }
        let limit = self.replicas[replica].clock.wall_us(self.now()) + dataplane::repl::core::AHEAD_US_MAX;
        let Some(Some(receiver)) = self.recvs[replica].as_mut().map(|side| side.receiver.as_mut()) else { return };
        let staged = match receiver.on_frame(frame, Some(limit)) {
            Ok(staged) => staged,
            Err(error) => {
                self.reset(replica, &error.to_string());
                return;
            }
        };
        let mut versions = Vec::new();
        for work in staged.work {
            match work {
                Work::Records(records) => {
                    for (glt, payload) in records {
                        for op in op::decode(&payload).unwrap() {
                            let value = match op.body {
                                Body::Inline(value) => Some(value),
                                Body::Tombstone => None,
                                Body::Chunked(_) => panic!("a chunk reference was shipped"),
                            };
                            versions.push((op.key, glt, value));
                        }
                    }
                }
                Work::SnapshotEnd { horizon, keys } => {
                    // As `ShardStore::tombstone_absent`: a live key the snapshot lacks whose
                    // newest version is below the horizon was deleted and collected at the
                    // home. (The home here collects nothing: its checkpoints' horizon is 0.)
                    let here = &self.replicas[replica];
                    for (key, chain) in &here.durable {
                        let live_below =
                            chain.iter().next_back().is_some_and(|(ts, value)| value.is_some() && *ts < horizon);
                        if live_below && !keys.contains(key) {
                            versions.push((key.clone(), horizon, None));
                        }
                    }
                }
            }
        }
        let here = &mut self.replicas[replica];
        if versions.is_empty() {
            if let Some(Some(receiver)) = self.recvs[replica].as_mut().map(|side| side.receiver.as_mut()) {
                receiver.on_applied(staged.seq);
            }
            self.settle(replica);
            return;
        }
        here.waiting.insert(staged.seq, 1);
        here.pending.push((epoch, staged.seq, versions));
        if !here.syncing {
            here.syncing = true;
            let after = self.rng.random_range(MS / 2..4 * MS);
            self.queue.after(after, Event::ReplicaSync { replica });
        }
    }

    fn replica_config(&self, replica: usize) -> ReplConfig {
        let mut config = self.config.clone();
        config.region = self.replicas[replica].region.clone();
        config.peers = vec![Peer { region: HOME.into(), addr: "127.0.0.1:1".parse().unwrap(), origin: None }];
        config
    }

    /// The replica's WAL barrier: what it applied is durable; frames whose work is durable are
    /// answered.
    fn replica_sync(&mut self, replica: usize) {
        self.replicas[replica].syncing = false;
        if !self.replicas[replica].up {
            return;
        }
        let pending = std::mem::take(&mut self.replicas[replica].pending);
        let epoch = self.epochs[replica];
        for (frame_epoch, seq, versions) in pending {
            let here = &mut self.replicas[replica];
            for (key, glt, value) in versions {
                here.durable.entry(key).or_default().insert(glt, value);
            }
            if frame_epoch == epoch
                && here.waiting.remove(&seq).is_some()
                && let Some(Some(receiver)) = self.recvs[replica].as_mut().map(|side| side.receiver.as_mut())
            {
                receiver.on_applied(seq);
            }
        }
        self.settle(replica);
    }

    /// Acknowledges what settled, in frame order.
    fn settle(&mut self, replica: usize) {
        let now = self.replicas[replica].clock.monotonic_ns(self.now());
        loop {
            let Some(Some(receiver)) = self.recvs[replica].as_mut().map(|side| side.receiver.as_mut()) else { return };
            let Some(settled) = receiver.pop_settled() else { return };
            let Some(ack) = settled.ack else { continue };
            let here = &mut self.replicas[replica];
            here.resolved = here.resolved.max(ack.closed_ts);
            if let Some(lsn) = here.position.advance(ack.next_lsn, now) {
                // Positions only move forward: a write behind the last is a broken core.
                here.regressed |= lsn < here.persisted;
                here.persisted = here.persisted.max(lsn);
            }
            here.acked_max = here.acked_max.max(ack.next_lsn);
            let mut frame = Vec::new();
            repl::encode_frame(&Frame::Ack { next_lsn: ack.next_lsn, closed_ts: ack.closed_ts }, &mut frame).unwrap();
            self.send(replica, false, frame);
        }
    }

    fn replica_crash(&mut self, replica: usize) {
        let here = &mut self.replicas[replica];
        here.up = false;
        here.pending.clear();
        self.reset(replica, "replica crashed");
    }

    fn replica_restart(&mut self, replica: usize) {
        let here = &mut self.replicas[replica];
        here.up = true;
        here.resolved = 0;
        let now = here.clock.monotonic_ns(self.queue.now_ns());
        here.position = Position::new(here.persisted, now, 200 * MS);
    }

    // ------------------------------------------------------------------ invariants

    fn check(&mut self) -> Result<(), Failure> {
        for replica in 0..self.replicas.len() {
            let here = &self.replicas[replica];
            // Whatever was acknowledged, and whatever the resolved timestamp covers, is durable.
            let covered = self.home.history.partition_point(|record| record.glt <= here.resolved) as u64 + 1;
            let need = here.acked_max.max(covered).min(self.home.durable_next());
            let mut lsn = here.verified_lsn;
            while lsn < need {
                let record = self.home.record(lsn).unwrap();
                assert_eq!(record.lsn, lsn, "the home's history is in LSN order");
                let held = here.durable.get(&record.key).and_then(|versions| versions.get(&record.glt));
                if held != Some(&record.value) {
                    return Err(format!(
                        "region {}: record {lsn} (ts {}) is acknowledged or resolved (ack {}, resolved {}) but not durable \
                         there",
                        here.region, record.glt, here.acked_max, here.resolved
                    ));
                }
                lsn += 1;
            }
            self.replicas[replica].verified_lsn = need;
            let here = &self.replicas[replica];
            if here.regressed {
                return Err(format!("region {}: a position was written behind {}", here.region, here.persisted));
            }
            if here.persisted > here.acked_max {
                return Err(format!(
                    "region {}: position {} written past what was acknowledged",
                    here.region, here.persisted
                ));
            }
        }
        if let Some(pending) = self.home.pending.first()
            && pending.glt <= self.home.published_closed
        {
            return Err(format!("a write stamped {} at or below a published closed timestamp", pending.glt));
        }
        if self.home.hold.pin_lsn != u64::MAX && self.home.wal_first > self.home.hold.pin_lsn {
            return Err(format!(
                "the WAL was released to {} under a pin at {}",
                self.home.wal_first, self.home.hold.pin_lsn
            ));
        }
        Ok(())
    }

    /// After the calm: every replica holds exactly the home's versions, has acknowledged its
    /// whole log and resolved past its last write.
    fn check_converged(&self) -> Result<(), Failure> {
        let mut want: BTreeMap<Bytes, BTreeMap<u64, Option<Bytes>>> = BTreeMap::new();
        for record in &self.home.history {
            want.entry(record.key.clone()).or_default().insert(record.glt, record.value.clone());
        }
        let last = self.home.history.last().map_or(0, |record| record.glt);
        for here in &self.replicas {
            if here.durable != want {
                let theirs: BTreeSet<_> =
                    here.durable.iter().flat_map(|(k, v)| v.keys().map(move |t| (k.clone(), *t))).collect();
                let ours: BTreeSet<_> = want.iter().flat_map(|(k, v)| v.keys().map(move |t| (k.clone(), *t))).collect();
                let missing: Vec<_> = ours.difference(&theirs).take(3).collect();
                let lsns: Vec<u64> = missing
                    .iter()
                    .filter_map(|(key, ts)| {
                        self.home.history.iter().find(|r| r.key == *key && r.glt == *ts).map(|r| r.lsn)
                    })
                    .collect();
                return Err(format!(
                    "region {} did not converge: {} versions missing (at LSNs {lsns:?}...), {} extra; acknowledged {}, \
                     verified {}",
                    here.region,
                    ours.difference(&theirs).count(),
                    theirs.difference(&ours).count(),
                    here.acked_max,
                    here.verified_lsn,
                ));
            }
            if here.acked_max < self.home.durable_next() || here.resolved < last {
                return Err(format!(
                    "region {} is behind after the calm: acknowledged {} of {}, resolved {} of {last}",
                    here.region,
                    here.acked_max,
                    self.home.durable_next(),
                    here.resolved
                ));
            }
        }
        Ok(())
    }
}

/// An event for the trace (frames by kind, not bytes).
fn describe(event: &Event) -> String {
    match event {
        Event::Deliver { replica, epoch, inbound, frame } => {
            let what = match repl::decode_frame(frame) {
                Ok((Frame::Batch(batch), _)) => {
                    format!("Batch {}..{} closed {}", batch.first_lsn, batch.next_lsn(), batch.closed_ts)
                }
                Ok((Frame::Install(part), _)) => format!("Install at {} last {}", part.resume_lsn, part.last),
                Ok((Frame::Ack { next_lsn, closed_ts }, _)) => format!("Ack {next_lsn} closed {closed_ts}"),
                Ok((frame, _)) => dataplane::repl::core::frame_name(&frame).to_owned(),
                Err(error) => format!("damaged ({error})"),
            };
            let direction = if *inbound { "to replica" } else { "to home" };
            format!("deliver {what} {direction} {replica} (stream {epoch})")
        }
        other => format!("{other:?}"),
    }
}

/// One seed: chaos, then calm until converged.
fn simulate(seed: u64, trace: bool) -> Result<u64, Failure> {
    let mut world = World::new(seed, trace);
    let calm = world.calm_at_ns;
    world.run(calm)?;
    // Heal: every node up, no partition.
    world.home_restart_if_down();
    for replica in 0..world.replicas.len() {
        world.partitioned[replica] = false;
        if !world.replicas[replica].up {
            world.replica_restart(replica);
        }
    }
    // Quiet: run until every replica caught up (slow links with a window of one batch of a
    // few hundred bytes take a while), or the limit.
    let mut until = calm;
    while !world.caught_up() && until < calm + CALM_LIMIT_NS {
        until += 100 * MS;
        world.run(until)?;
    }
    world.check_converged()?;
    Ok(world.steps)
}

/// How long the quiet phase may take to converge.
const CALM_LIMIT_NS: u64 = 120_000 * MS;

impl World {
    /// Whether every replica acknowledged the home's whole log and resolved past its last write.
    fn caught_up(&self) -> bool {
        let last = self.home.history.last().map_or(0, |record| record.glt);
        self.replicas.iter().all(|here| here.acked_max >= self.home.durable_next() && here.resolved >= last)
    }

    fn home_restart_if_down(&mut self) {
        if !self.home.up {
            self.home_restart();
        }
    }
}

#[test]
fn the_replication_protocol_keeps_its_invariants_under_faults_by_seed() {
    sim::run_seeds("replication simulation", 2000, "repl_simulation", simulate);
}
