//! The replica-set protocol (`dataplane::replica::Member` and `controlapi::replica`) in a
//! seeded simulation: three or four data nodes of one region keeping one shard (three copies,
//! at least one or two), a control plane granting leases, promoting, removing and adding
//! members (and now and then answering "refused" to a change it applied, as a timed-out
//! write that committed would), and clients writing to whoever they think is the primary. Nodes crash (their disks keep what was durable) and restart,
//! links are cut (node from everyone, from the control plane only, from its peers only), the
//! network between members drops, duplicates and reorders messages, disks slow down, the
//! control plane answers late, and every clock drifts. After every event:
//! - every acknowledged write is on the durable log of every member of the control plane's
//!   current set, as the record its primary wrote: same epoch at each of its LSNs, and the same
//!   record (the simulation gives each written record an id and moves the ids with the
//!   batches, so a reused (epoch, LSN) pair, which the protocol's comparison by epoch cannot
//!   see, is caught);
//! - at most one node acknowledges writes in each epoch;
//! - each member's idea of its durable log is what its disk holds, and its epoch never goes
//!   back.
//!
//! Then the faults stop and every node comes back (but one lost for good in half the four-node
//! worlds): a new write must be acknowledged, and the members' logs must end up equal with
//! the set whole again.
//!
//! `MERIDIAN_SIM_SEED=<seed>` replays one seed with a trace of its events;
//! `MERIDIAN_SIM_SEEDS=<n>` runs more.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod sim;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use controlapi::replica::{LogShape, ReplicaReport, SetConfig, SetWatch, promote};
use dataplane::replica::{Action, DiskOp, Member, Message, Proposal, Timing, WriteError};
use rand::Rng;
use rand::rngs::StdRng;
use sim::{Lane, LinkFaults, NodeClock, Queue};

const MS: u64 = 1_000_000;
const TIMING: Timing = Timing { member_timeout_ns: 300 * MS, heartbeat_ns: 20 * MS, retry_ns: 50 * MS };
const LEASE_NS: u64 = 400 * MS;
/// What the control plane adds to a lease before it promotes: covers the clocks' drift.
const LEASE_MARGIN_NS: u64 = 20 * MS;
const HEARTBEAT_NS: u64 = 100 * MS;
/// Reports older than this do not count a member as reachable.
const REPORT_FRESH_NS: u64 = 300 * MS;
const TICK_NS: u64 = 10 * MS;
const CHAOS_NS: u64 = 3_000 * MS;
const QUIET_NS: u64 = 2_500 * MS;

/// What goes to the control plane.
#[derive(Debug, Clone)]
enum ToControl {
    Heartbeat { report: ReplicaReport, sent_ns: u64 },
    Propose(Proposal),
}

/// What comes from it.
#[derive(Debug, Clone)]
enum FromControl {
    Config(SetConfig),
    Lease { epoch: u64, until_ns: u64 },
    Refused { proposal: Proposal, current_epoch: u64 },
}

#[derive(Debug)]
enum Event {
    /// A message; an `Append` carries the records it names (their ids), as the shell sends
    /// the batches' bytes.
    Deliver {
        from: usize,
        to: usize,
        incarnation: u64,
        message: Message,
        records: Vec<u64>,
    },
    ToControl {
        from: usize,
        message: ToControl,
    },
    FromControl {
        to: usize,
        incarnation: u64,
        message: FromControl,
    },
    DiskDone {
        node: usize,
        incarnation: u64,
    },
    Tick {
        node: usize,
        incarnation: u64,
    },
    Heartbeat {
        node: usize,
        incarnation: u64,
    },
    ControlTick,
    ClientWrite,
    Fault,
    Restart {
        node: usize,
    },
    /// The node is lost for good: crashed, never back.
    Lose {
        node: usize,
    },
    Heal {
        node: usize,
    },
    DiskFast {
        node: usize,
    },
}

/// What a node's disk holds.
#[derive(Debug, Default)]
struct Disk {
    log: LogShape,
    /// What each durable LSN holds (`records[lsn - 1]`): the id of the write that made it. The
    /// protocol compares logs by epoch; the ids check that an (epoch, LSN) pair really names
    /// one record everywhere.
    records: Vec<u64>,
    epoch: u64,
    primary: Option<String>,
    config: Option<SetConfig>,
    /// Written, not yet durable: lost in a crash. With the ids an append writes.
    pending: VecDeque<(u64, DiskOp, Vec<u64>)>,
    slow: bool,
}

#[derive(Debug)]
struct Node {
    name: String,
    clock: NodeClock,
    member: Option<Member>,
    /// What each LSN of the member's written log holds (ids, as `Disk::records`).
    written: Vec<u64>,
    /// The highest committed point its member ever reported, across restarts: nothing below
    /// it may ever be cut.
    committed: u64,
    incarnation: u64,
    disk: Disk,
    /// Client writes this node appended and has not answered: first LSN to (next, epoch).
    writes: BTreeMap<u64, (u64, u64)>,
    /// Cut from the control plane, from its peers.
    cut_control: bool,
    cut_peers: bool,
}

#[derive(Debug)]
struct Control {
    clock: NodeClock,
    config: SetConfig,
    /// The production leader's rules for one set (in ns here where the leader counts ms).
    watch: SetWatch,
    delay_ns: (u64, u64),
}

struct World {
    rng: StdRng,
    queue: Queue<Event>,
    nodes: Vec<Node>,
    control: Control,
    faults: LinkFaults,
    lanes: BTreeMap<(usize, usize), Lane>,
    /// Acknowledged writes, as spans per epoch: every LSN of an epoch's span is that epoch's.
    acknowledged: BTreeMap<u64, (u64, u64)>,
    ackers: BTreeMap<u64, usize>,
    acknowledged_count: u64,
    chaos: bool,
    /// A node lost for good (four-node worlds only): the set must grow back without it.
    lost: Option<usize>,
    trace: bool,
    steps: u64,
    /// A disk, the set or the acknowledged writes changed since the last check.
    changed: bool,
    /// The record each acknowledged LSN holds.
    acknowledged_records: BTreeMap<u64, u64>,
    /// The records of the `Append` being delivered: (first LSN, ids).
    incoming: Option<(u64, Vec<u64>)>,
    next_record: u64,
    /// Every member's records were checked against the acknowledged ones since the set last
    /// changed.
    config_checked: bool,
}

#[derive(Debug)]
struct Failure(String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl World {
    fn new(seed: u64, trace: bool) -> Self {
        let mut rng = sim::rng(seed);
        let count = if rng.random_bool(0.3) { 4 } else { 3 };
        let names: Vec<String> = ["a", "b", "c", "d"][..count].iter().map(|name| (*name).to_owned()).collect();
        let min_replicas = if rng.random_bool(0.25) { 1 } else { 2 };
        let mut config = SetConfig::initial(&names[..3], min_replicas);
        config.learners = names[3..].to_vec();
        let nodes = names
            .iter()
            .map(|name| Node {
                name: name.clone(),
                clock: NodeClock::draw(&mut rng, 200, 0),
                member: None,
                written: Vec::new(),
                committed: 0,
                incarnation: 0,
                disk: Disk { log: LogShape::new(), ..Disk::default() },
                writes: BTreeMap::new(),
                cut_control: false,
                cut_peers: false,
            })
            .collect();
        let misbehaving = rng.random_bool(0.5);
        let faults = LinkFaults {
            delay_ns: (50_000, 2 * MS),
            loss: 0.01,
            retransmit_ns: 20 * MS,
            drop: if misbehaving { 0.02 } else { 0.0 },
            duplicate: if misbehaving { 0.02 } else { 0.0 },
            reorder: if misbehaving { 0.02 } else { 0.0 },
        };
        let control = Control {
            clock: NodeClock::draw(&mut rng, 200, 0),
            config,
            watch: SetWatch { epoch: 1, lease_expires_ms: LEASE_NS, ..SetWatch::default() },
            delay_ns: (100_000, if rng.random_bool(0.3) { 80 * MS } else { 5 * MS }),
        };
        let mut world = Self {
            rng,
            queue: Queue::default(),
            nodes,
            control,
            faults,
            lanes: BTreeMap::new(),
            acknowledged: BTreeMap::new(),
            ackers: BTreeMap::new(),
            acknowledged_count: 0,
            chaos: true,
            lost: None,
            trace,
            steps: 0,
            changed: true,
            acknowledged_records: BTreeMap::new(),
            incoming: None,
            next_record: 1,
            config_checked: true,
        };
        for node in 0..world.nodes.len() {
            world.start(node).unwrap();
        }
        let config = world.control.config.clone();
        world.broadcast_config(&config);
        world.queue.after(TICK_NS, Event::ControlTick);
        world.queue.after(MS, Event::ClientWrite);
        world.queue.after(100 * MS, Event::Fault);
        if world.nodes.len() == 4 && world.rng.random_bool(0.5) {
            let (node, at) = (world.rng.random_range(0..4), world.rng.random_range(200 * MS..CHAOS_NS));
            world.queue.at(at, Event::Lose { node });
        }
        world
    }

    fn node_now(&self, node: usize) -> u64 {
        self.nodes[node].clock.monotonic_ns(self.queue.now_ns())
    }

    fn control_now(&self) -> u64 {
        self.control.clock.monotonic_ns(self.queue.now_ns())
    }

    /// Brings a node up from its disk.
    fn start(&mut self, node: usize) -> Result<(), Failure> {
        let state = &mut self.nodes[node];
        state.incarnation += 1;
        state.written.clone_from(&state.disk.records);
        let disk = &state.disk;
        state.member = Some(Member::restart(
            &state.name,
            TIMING,
            disk.log.clone(),
            disk.epoch,
            disk.primary.clone(),
            disk.config.clone(),
        ));
        let incarnation = state.incarnation;
        let jitter = self.rng.random_range(0..TICK_NS);
        self.queue.after(jitter, Event::Tick { node, incarnation });
        self.queue.after(jitter, Event::Heartbeat { node, incarnation });
        self.act(node)
    }

    fn crash(&mut self, node: usize) {
        let state = &mut self.nodes[node];
        state.member = None;
        state.incarnation += 1;
        state.disk.pending.clear();
        state.writes.clear();
    }

    fn index(&self, name: &str) -> usize {
        self.nodes.iter().position(|node| node.name == name).unwrap()
    }

    fn broadcast_config(&mut self, config: &SetConfig) {
        let placed: Vec<usize> = config.placed().map(|name| self.index(name)).collect();
        for node in placed {
            self.tell_node(node, FromControl::Config(config.clone()));
        }
    }

    fn tell_node(&mut self, node: usize, message: FromControl) {
        if self.nodes[node].cut_control {
            return;
        }
        let delay = self.rng.random_range(self.control.delay_ns.0..=self.control.delay_ns.1);
        let incarnation = self.nodes[node].incarnation;
        self.queue.after(delay, Event::FromControl { to: node, incarnation, message });
    }

    fn tell_control(&mut self, node: usize, message: ToControl) {
        if self.nodes[node].cut_control {
            return;
        }
        let delay = self.rng.random_range(self.control.delay_ns.0..=self.control.delay_ns.1);
        self.queue.after(delay, Event::ToControl { from: node, message });
    }

    /// Carries out a member's actions.
    fn act(&mut self, node: usize) -> Result<(), Failure> {
        let Some(member) = self.nodes[node].member.as_mut() else { return Ok(()) };
        let actions = member.take_actions();
        let committed = member.committed();
        for action in actions {
            if self.trace {
                eprintln!("  {} {action:?}", self.nodes[node].name);
            }
            match action {
                Action::Send { to, message } => {
                    let to = self.index(&to);
                    self.send(node, to, message);
                }
                Action::Persist { seq, op } => {
                    let records = self.records_for(node, op)?;
                    let disk = &mut self.nodes[node].disk;
                    disk.pending.push_back((seq, op, records));
                    if disk.pending.len() == 1 {
                        self.schedule_disk(node);
                    }
                }
                Action::Save { epoch, primary, config } => {
                    let state = &mut self.nodes[node];
                    let disk = &mut state.disk;
                    if epoch < disk.epoch {
                        return Err(Failure(format!("{} saved epoch {epoch} after {}", state.name, disk.epoch)));
                    }
                    (disk.epoch, disk.primary, disk.config) = (epoch, primary, config);
                }
                Action::Acknowledge { first, next } => self.acknowledged(node, first, next)?,
                Action::Fail { first, .. } => {
                    self.nodes[node].writes.remove(&first);
                }
                Action::Propose(proposal) => self.tell_control(node, ToControl::Propose(proposal)),
            }
        }
        // The committed point reported with these actions holds from now on (a cut among them
        // was checked against the one before).
        let state = &mut self.nodes[node];
        state.committed = state.committed.max(committed);
        Ok(())
    }

    fn acknowledged(&mut self, node: usize, first: u64, next: u64) -> Result<(), Failure> {
        let name = self.nodes[node].name.clone();
        let Some((expected_next, epoch)) = self.nodes[node].writes.remove(&first) else {
            return Err(Failure(format!("{name} acknowledged {first}..{next}, a write it was not asked for")));
        };
        if expected_next != next {
            return Err(Failure(format!(
                "{name} acknowledged {first}..{next}, the write was {first}..{expected_next}"
            )));
        }
        if let Some(other) = self.ackers.insert(epoch, node)
            && other != node
        {
            return Err(Failure(format!(
                "{name} and {} both acknowledged writes in epoch {epoch}",
                self.nodes[other].name
            )));
        }
        self.changed = true;
        for lsn in first..next {
            let record = self.nodes[node].written[usize::try_from(lsn - 1).unwrap()];
            self.acknowledged_records.insert(lsn, record);
        }
        let members = self.control.config.members.clone();
        for member in members {
            self.check_records(self.index(&member), first, next)?;
        }
        let span = self.acknowledged.entry(epoch).or_insert((first, next));
        *span = (span.0.min(first), span.1.max(next));
        self.acknowledged_count += 1;
        Ok(())
    }

    /// The ids a `Persist` writes: an append of the delivered `Append`'s records, or new ones
    /// (a client write, an epoch marker); the node's written log follows.
    fn records_for(&mut self, node: usize, op: DiskOp) -> Result<Vec<u64>, Failure> {
        let records = match op {
            DiskOp::Append { first, next, .. } => match &self.incoming {
                Some((from, records)) => {
                    let (start, end) = (usize::try_from(first - from).unwrap(), usize::try_from(next - from).unwrap());
                    records.get(start..end).map(<[u64]>::to_vec).ok_or_else(|| {
                        Failure(format!(
                            "{} appended {first}..{next} from a message of {from}..",
                            self.nodes[node].name
                        ))
                    })?
                }
                None => {
                    let ids = (self.next_record..self.next_record + (next - first)).collect();
                    self.next_record += next - first;
                    ids
                }
            },
            DiskOp::Truncate { from } => {
                let committed = self.nodes[node].committed;
                if from < committed {
                    return Err(Failure(format!(
                        "{} cut its log from {from}, below the committed point {committed} it had reported",
                        self.nodes[node].name
                    )));
                }
                Vec::new()
            }
        };
        apply_records(&mut self.nodes[node].written, op, &records);
        Ok(records)
    }

    /// `node`'s durable records in `first..next` are the acknowledged ones where there are.
    fn check_records(&self, node: usize, first: u64, next: u64) -> Result<(), Failure> {
        let records = &self.nodes[node].disk.records;
        for (lsn, expected) in self.acknowledged_records.range(first..next) {
            let held = records.get(usize::try_from(lsn - 1).unwrap());
            if held != Some(expected) {
                return Err(Failure(format!(
                    "{} holds record {held:?} at the acknowledged LSN {lsn}, which holds record {expected}",
                    self.nodes[node].name
                )));
            }
        }
        Ok(())
    }

    fn schedule_disk(&mut self, node: usize) {
        let slow = self.nodes[node].disk.slow;
        let delay = if slow { self.rng.random_range(5 * MS..=40 * MS) } else { self.rng.random_range(50_000..=2 * MS) };
        let incarnation = self.nodes[node].incarnation;
        self.queue.after(delay, Event::DiskDone { node, incarnation });
    }

    fn send(&mut self, from: usize, to: usize, message: Message) {
        if self.nodes[from].cut_peers || self.nodes[to].cut_peers {
            return;
        }
        let now = self.queue.now_ns();
        let faults = if self.chaos { self.faults } else { self.faults.reliable() };
        let deliveries = self.lanes.entry((from, to)).or_default().deliveries(&mut self.rng, now, &faults, true);
        let incarnation = self.nodes[to].incarnation;
        let records = match &message {
            Message::Append { first, next, .. } => self.nodes[from].written
                [usize::try_from(*first - 1).unwrap()..usize::try_from(*next - 1).unwrap()]
                .to_vec(),
            _ => Vec::new(),
        };
        for at in deliveries {
            let records = records.clone();
            self.queue.at(at, Event::Deliver { from, to, incarnation, message: message.clone(), records });
        }
    }

    fn step(&mut self, event: Event) -> Result<(), Failure> {
        self.steps += 1;
        if self.trace {
            eprintln!("{:>12} {event:?}", self.queue.now_ns());
        }
        match event {
            Event::Deliver { from, to, incarnation, message, records } => {
                let cut = self.nodes[from].cut_peers || self.nodes[to].cut_peers;
                if incarnation == self.nodes[to].incarnation && !cut {
                    let now = self.node_now(to);
                    let from = self.nodes[from].name.clone();
                    if let Message::Append { first, .. } = &message {
                        self.incoming = Some((*first, records));
                    }
                    if let Some(member) = self.nodes[to].member.as_mut() {
                        member.on_message(now, &from, message);
                    }
                    let acted = self.act(to);
                    self.incoming = None;
                    acted?;
                }
            }
            Event::DiskDone { node, incarnation } => {
                if incarnation == self.nodes[node].incarnation {
                    let disk = &mut self.nodes[node].disk;
                    let (seq, op, records) = disk.pending.pop_front().unwrap();
                    op.apply(&mut disk.log).map_err(|error| Failure(format!("a disk took {op:?}: {error}")))?;
                    apply_records(&mut disk.records, op, &records);
                    let more = !disk.pending.is_empty();
                    self.changed = true;
                    if let DiskOp::Append { first, next, .. } = op
                        && self.control.config.is_member(&self.nodes[node].name)
                    {
                        self.check_records(node, first, next)?;
                    }
                    let now = self.node_now(node);
                    if let Some(member) = self.nodes[node].member.as_mut() {
                        member.persisted(now, seq);
                    }
                    if more {
                        self.schedule_disk(node);
                    }
                    self.act(node)?;
                }
            }
            Event::Tick { node, incarnation } => {
                if incarnation == self.nodes[node].incarnation {
                    let now = self.node_now(node);
                    if let Some(member) = self.nodes[node].member.as_mut() {
                        member.tick(now);
                    }
                    self.act(node)?;
                    self.queue.after(TICK_NS, Event::Tick { node, incarnation });
                }
            }
            Event::Heartbeat { node, incarnation } => {
                if incarnation == self.nodes[node].incarnation {
                    let sent_ns = self.node_now(node);
                    if let Some(member) = self.nodes[node].member.as_ref() {
                        let report = ReplicaReport {
                            shard: 0,
                            epoch: member.epoch(),
                            log: member.durable_log().clone(),
                            leading: member.leading(),
                            wants_new_epoch: member.wants_new_epoch(),
                        };
                        let message = ToControl::Heartbeat { report, sent_ns };
                        self.tell_control(node, message);
                    }
                    self.queue.after(HEARTBEAT_NS, Event::Heartbeat { node, incarnation });
                }
            }
            Event::ToControl { from, message } => {
                if !self.nodes[from].cut_control {
                    self.control_receives(from, message);
                }
            }
            Event::FromControl { to, incarnation, message } => {
                if incarnation == self.nodes[to].incarnation && !self.nodes[to].cut_control {
                    let now = self.node_now(to);
                    if let Some(member) = self.nodes[to].member.as_mut() {
                        match message {
                            FromControl::Config(config) => member.on_config(now, config),
                            FromControl::Lease { epoch, until_ns } => member.on_lease(epoch, until_ns),
                            FromControl::Refused { proposal, current_epoch } => {
                                member.on_refused(&proposal, current_epoch)
                            }
                        }
                    }
                    self.act(to)?;
                }
            }
            Event::ControlTick => {
                self.control_tick();
                self.queue.after(TICK_NS, Event::ControlTick);
            }
            Event::ClientWrite => {
                self.client_write()?;
                let gap = self.rng.random_range(2 * MS..=14 * MS);
                self.queue.after(gap, Event::ClientWrite);
            }
            Event::Fault => {
                if self.chaos {
                    self.fault();
                    let gap = self.rng.random_range(100 * MS..=600 * MS);
                    self.queue.after(gap, Event::Fault);
                }
            }
            Event::Lose { node } => {
                self.lost = Some(node);
                if self.nodes[node].member.is_some() {
                    self.crash(node);
                }
            }
            Event::Restart { node } => {
                if self.nodes[node].member.is_none() && self.lost != Some(node) {
                    self.start(node)?;
                }
            }
            Event::Heal { node } => {
                self.nodes[node].cut_control = false;
                self.nodes[node].cut_peers = false;
            }
            Event::DiskFast { node } => self.nodes[node].disk.slow = false,
        }
        self.check()
    }

    /// A client writes to the node the shard map names (now and then to another).
    fn client_write(&mut self) -> Result<(), Failure> {
        let node = if self.rng.random_bool(0.9) {
            self.index(&self.control.config.primary.clone())
        } else {
            self.rng.random_range(0..self.nodes.len())
        };
        let now = self.node_now(node);
        let records = self.rng.random_range(1..=3);
        let Some(member) = self.nodes[node].member.as_mut() else { return Ok(()) };
        match member.write(now, records) {
            Ok((first, next)) => {
                let epoch = member.leading().unwrap();
                self.nodes[node].writes.insert(first, (next, epoch));
            }
            Err(WriteError::NotPrimary { .. } | WriteError::LeaseLapsed | WriteError::Unavailable { .. }) => {}
        }
        self.act(node)
    }

    fn fault(&mut self) {
        let node = self.rng.random_range(0..self.nodes.len());
        let how_long = self.rng.random_range(50 * MS..=1_500 * MS);
        match self.rng.random_range(0..6) {
            0 | 1 => {
                if self.nodes[node].member.is_some() {
                    self.crash(node);
                    self.queue.after(how_long, Event::Restart { node });
                }
            }
            2 => {
                self.nodes[node].cut_control = true;
                self.nodes[node].cut_peers = true;
                self.queue.after(how_long, Event::Heal { node });
            }
            3 => {
                self.nodes[node].cut_control = true;
                self.queue.after(how_long, Event::Heal { node });
            }
            4 => {
                self.nodes[node].cut_peers = true;
                self.queue.after(how_long, Event::Heal { node });
            }
            _ => {
                self.nodes[node].disk.slow = true;
                self.queue.after(how_long, Event::DiskFast { node });
            }
        }
    }

    fn control_receives(&mut self, from: usize, message: ToControl) {
        let now = self.control_now();
        let name = self.nodes[from].name.clone();
        match message {
            ToControl::Heartbeat { report, sent_ns } => {
                let config = self.control.config.clone();
                self.control.watch.report(&config, &name, &report, now, LEASE_NS + LEASE_MARGIN_NS);
                if self.control.watch.restarted {
                    // Restarted as primary: a new epoch at once, itself a candidate.
                    self.promote();
                } else if name == config.primary && report.leading == Some(config.epoch) {
                    self.tell_node(from, FromControl::Lease { epoch: config.epoch, until_ns: sent_ns + LEASE_NS });
                }
                let config = self.control.config.clone();
                self.tell_node(from, FromControl::Config(config));
            }
            ToControl::Propose(proposal) => {
                let config = &self.control.config;
                let changed = match &proposal {
                    Proposal::Remove { epoch, node } => config.remove(&name, *epoch, node),
                    Proposal::Add { epoch, node } => config.add(&name, *epoch, node),
                };
                match changed {
                    Ok(next) => {
                        // Now and then the primary hears "refused" although the change was
                        // applied: a control-plane write that timed out and still committed.
                        if self.chaos && self.rng.random_bool(0.1) {
                            let current_epoch = self.control.config.epoch;
                            self.tell_node(from, FromControl::Refused { proposal, current_epoch });
                        }
                        self.change(next);
                    }
                    Err(_) => {
                        let current_epoch = config.epoch;
                        self.tell_node(from, FromControl::Refused { proposal, current_epoch });
                    }
                }
            }
        }
    }

    fn control_tick(&mut self) {
        self.promote();
    }

    /// Promotes the newest member among those that reported recently, when the set is due.
    fn promote(&mut self) {
        let now = self.control_now();
        let config = self.control.config.clone();
        self.control.watch.follow(&config, now, LEASE_NS + LEASE_MARGIN_NS);
        if let Some(reports) = self.control.watch.due(&self.control.config, now, REPORT_FRESH_NS)
            && let Some(next) = promote(&self.control.config, &reports)
        {
            self.control.watch.lease_expires_ms = now + LEASE_NS + LEASE_MARGIN_NS;
            self.control.watch.restarted = false;
            self.change(next);
        }
    }

    fn change(&mut self, next: SetConfig) {
        if self.trace {
            eprintln!("  control: {next:?}");
        }
        self.control.config = next.clone();
        self.changed = true;
        self.broadcast_config(&next);
        self.config_checked = false;
    }

    fn check(&mut self) -> Result<(), Failure> {
        if !std::mem::replace(&mut self.config_checked, true) {
            for member in self.control.config.members.clone() {
                self.check_records(self.index(&member), 1, u64::MAX)?;
            }
        }
        for node in &self.nodes {
            let expected = usize::try_from(node.disk.log.end - 1).unwrap();
            if node.disk.records.len() != expected {
                return Err(Failure(format!(
                    "{}: {} durable records, its log ends at {}",
                    node.name,
                    node.disk.records.len(),
                    node.disk.log.end
                )));
            }
            if let Some(member) = &node.member
                && node.written.len() != usize::try_from(member.log().end - 1).unwrap()
            {
                return Err(Failure(format!(
                    "{}: {} written records, its log ends at {}",
                    node.name,
                    node.written.len(),
                    member.log().end
                )));
            }
        }
        let config = &self.control.config;
        // The acknowledged writes on every member: only a disk, the set or an acknowledgement
        // can change that.
        let members = if std::mem::take(&mut self.changed) { config.members.as_slice() } else { &[] };
        for member in members {
            let node = &self.nodes[self.index(member)];
            for (epoch, (first, next)) in &self.acknowledged {
                let log = &node.disk.log;
                if log.epoch_at(*first) != Some(*epoch) || log.epoch_end(*first) < *next || log.end < *next {
                    return Err(Failure(format!(
                        "member {member} of epoch {} lacks the writes acknowledged in epoch {epoch} ({first}..{next}): \
                         its durable log is {log:?}",
                        config.epoch
                    )));
                }
            }
        }
        for node in &self.nodes {
            if let Some(member) = &node.member {
                if let Some(error) = member.failed() {
                    return Err(Failure(format!("{} stopped: {error}", node.name)));
                }
                if *member.durable_log() != node.disk.log {
                    return Err(Failure(format!(
                        "{} thinks its durable log is {:?}, the disk holds {:?}",
                        node.name,
                        member.durable_log(),
                        node.disk.log
                    )));
                }
                if member.epoch() < node.disk.epoch {
                    return Err(Failure(format!(
                        "{} is at epoch {}, saved {}",
                        node.name,
                        member.epoch(),
                        node.disk.epoch
                    )));
                }
            }
        }
        Ok(())
    }

    fn run_until(&mut self, until_ns: u64) -> Result<(), Failure> {
        while self.queue.next_at_ns().is_some_and(|at| at <= until_ns) {
            let event = self.queue.pop().unwrap();
            self.step(event)?;
        }
        Ok(())
    }

    /// Faults off, every node back.
    fn heal(&mut self) -> Result<(), Failure> {
        self.chaos = false;
        for node in 0..self.nodes.len() {
            self.nodes[node].cut_control = false;
            self.nodes[node].cut_peers = false;
            self.nodes[node].disk.slow = false;
            if self.nodes[node].member.is_none() && self.lost != Some(node) {
                self.start(node)?;
            }
        }
        Ok(())
    }
}

/// `records` (ids by LSN) after `op`, which appended `appended`.
fn apply_records(records: &mut Vec<u64>, op: DiskOp, appended: &[u64]) {
    match op {
        DiskOp::Append { .. } => records.extend_from_slice(appended),
        DiskOp::Truncate { from } => records.truncate(usize::try_from(from.saturating_sub(1)).unwrap()),
    }
}

fn simulate(seed: u64, trace: bool) -> Result<u64, Failure> {
    let mut world = World::new(seed, trace);
    world.run_until(CHAOS_NS)?;
    world.heal()?;
    let before = world.acknowledged_count;
    world.run_until(CHAOS_NS + QUIET_NS)?;
    // Every member of the set lost for good (a set of one, min_replicas 1; possibly promoted
    // after the faults stopped, from a report the node sent before it was lost): nothing may be
    // promoted (a learner may lack acknowledged writes), so the set stays down. Safety was
    // checked all along; liveness is not to be had.
    let lost = world.lost.map(|lost| world.nodes[lost].name.clone());
    if world.control.config.members.iter().all(|member| lost.as_ref() == Some(member)) {
        return Ok(world.steps);
    }
    if world.acknowledged_count == before {
        return Err(Failure(format!(
            "no write was acknowledged in the {} ms after the faults stopped; the set: {:?}",
            QUIET_NS / MS,
            world.control.config
        )));
    }
    // Writes stop; the members converge.
    let config = world.control.config.clone();
    world.run_until_without_writes(CHAOS_NS + QUIET_NS + 1_000 * MS)?;
    let config_now = &world.control.config;
    if config_now.members.len() != config_now.replicas {
        return Err(Failure(format!("the set did not grow back whole: {config_now:?} (was {config:?})")));
    }
    let primary = &world.nodes[world.index(&config_now.primary)].disk.log;
    let learners: BTreeSet<&String> = config_now.learners.iter().collect();
    for node in world.nodes.iter().filter(|node| world.lost.is_none_or(|lost| world.nodes[lost].name != node.name)) {
        let primary_records = &world.nodes[world.index(&config_now.primary)].disk.records;
        if !learners.contains(&node.name) && (node.disk.log != *primary || node.disk.records != *primary_records) {
            return Err(Failure(format!(
                "{}'s log {:?} differs from the primary {}'s {primary:?}",
                node.name, node.disk.log, config_now.primary
            )));
        }
    }
    Ok(world.steps)
}

impl World {
    /// Runs on with client writes dropped.
    fn run_until_without_writes(&mut self, until_ns: u64) -> Result<(), Failure> {
        while self.queue.next_at_ns().is_some_and(|at| at <= until_ns) {
            let event = self.queue.pop().unwrap();
            if !matches!(event, Event::ClientWrite) {
                self.step(event)?;
            }
        }
        Ok(())
    }
}

#[test]
fn the_replica_set_protocol_keeps_acknowledged_writes_under_faults_by_seed() {
    sim::run_seeds("replica-set simulation", 2000, "replica_simulation", simulate);
}
