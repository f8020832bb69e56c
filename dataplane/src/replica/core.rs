//! One node's copy of a shard in its region's replica set, sans-IO: no runtime, clock or I/O.
//! Inputs are the control plane's set ([`Member::on_config`]) and lease
//! ([`Member::on_lease`]), a client write ([`Member::write`]), a message from another member
//! ([`Member::on_message`]), the disk's progress ([`Member::persisted`]) and the time
//! ([`Member::tick`]), `now` always injected (monotonic ns). Outputs ([`Action`]) are taken
//! with [`Member::take_actions`] and carried out in order by the shell.
//!
//! The primary appends each write to its own log and sends it to every other placed node;
//! it acknowledges a write once the write is durable on itself and on every member of its set
//! (and on a learner it asked to add). A member accepts a batch only in the current epoch,
//! only after a record of the epoch the primary says precedes it (else it answers with its
//! log's shape and the primary resends from where they agree), and cuts its own records from
//! the first that conflicts (a divergent, never-acknowledged tail). A new primary's first
//! record is an epoch marker, so a tail from an older primary always conflicts there. A member
//! silent for `member_timeout_ns` is removed through the control plane (never below
//! `min_replicas`: writes are refused meanwhile); a learner holding every acknowledged write
//! is added.
//!
//! The shell's duties: write each `Persist` in order and report `persisted(seq)` after its
//! barrier; write `Save` durably before sending anything that follows it (a member must never
//! forget the highest epoch it has seen); move messages; read the records a `Send` of
//! `Append` names from the WAL (whole batches: ranges start and end at batch boundaries);
//! apply records to the store only below [`Member::committed`] (above it a backup's tail may
//! still be cut).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use controlapi::replica::{LogShape, SetConfig, ShapeError};

/// Timers of the protocol.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Silence after which the primary has a member removed.
    pub member_timeout_ns: u64,
    /// How often the primary reminds each peer where it is (an empty append).
    pub heartbeat_ns: u64,
    /// How soon an unanswered probe or proposal is sent again.
    pub retry_ns: u64,
}

/// A message between the members of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Primary to peer: tell me your log.
    Probe { epoch: u64 },
    /// Peer to primary: my durable log.
    Shape { epoch: u64, log: LogShape },
    /// Primary to peer: the records `first..next`, written in `batch_epoch`, follow a record
    /// of `prev_epoch` (0 when `first` is 1). Empty (`first == next`): where the primary
    /// thinks the peer is. Below `commit` every member holds the primary's records durably:
    /// no later primary's log differs there, so a peer that agrees may apply them.
    Append { epoch: u64, prev_epoch: u64, first: u64, next: u64, batch_epoch: u64, commit: u64 },
    /// Peer to primary: durable and the same as the primary's log below `end`.
    Appended { epoch: u64, end: u64 },
    /// To a node of an older epoch: that epoch is over.
    Refuse { epoch: u64 },
}

impl Message {
    /// The epoch the sender was in.
    pub fn epoch(&self) -> u64 {
        match self {
            Self::Probe { epoch }
            | Self::Shape { epoch, .. }
            | Self::Append { epoch, .. }
            | Self::Appended { epoch, .. }
            | Self::Refuse { epoch } => *epoch,
        }
    }
}

/// A change of the log on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    Append {
        epoch: u64,
        first: u64,
        next: u64,
    },
    /// Drop the records from `from` on.
    Truncate {
        from: u64,
    },
}

impl DiskOp {
    /// `log` after this change; an append that does not fit it (not at its end, or of an
    /// older epoch than its last records) changes nothing and is an error.
    pub fn apply(self, log: &mut LogShape) -> Result<(), ShapeError> {
        match self {
            Self::Append { epoch, first, next } => log.append(epoch, first, next),
            Self::Truncate { from } => {
                log.truncate(from);
                Ok(())
            }
        }
    }
}

/// A change of the set the primary asks the control plane for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proposal {
    Remove { epoch: u64, node: String },
    Add { epoch: u64, node: String },
}

/// Why a write was refused or failed. A refused write was not appended; a failed one was
/// appended but never acknowledged, and may or may not survive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("not the primary (epoch {epoch}, primary {primary:?})")]
    NotPrimary { epoch: u64, primary: Option<String> },
    #[error("the primary's lease has lapsed")]
    LeaseLapsed,
    #[error("{live} live members, fewer than min_replicas {min}")]
    Unavailable { live: usize, min: usize },
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        to: String,
        message: Message,
    },
    /// Apply to the log on disk, after every earlier one; report `persisted(seq)` once durable.
    Persist {
        seq: u64,
        op: DiskOp,
    },
    /// Write durably before sending anything that follows: the highest epoch seen, its primary
    /// if known, and the newest set from the control plane.
    Save {
        epoch: u64,
        primary: Option<String>,
        config: Option<SetConfig>,
    },
    /// The writes `first..next` are durable on every member: acknowledge them.
    Acknowledge {
        first: u64,
        next: u64,
    },
    /// The writes `first..next` will not be acknowledged by this node.
    Fail {
        first: u64,
        next: u64,
        error: WriteError,
    },
    /// Ask the control plane.
    Propose(Proposal),
}

/// What the primary knows of another placed node.
#[derive(Debug, Clone)]
struct Peer {
    /// The next LSN to send; none until the peer's shape says where the logs agree.
    next: Option<u64>,
    /// Durable on the peer and the same as ours below this.
    matched: u64,
    heard_ns: u64,
    sent_ns: u64,
}

impl Peer {
    /// A peer not heard from yet: it has a whole timeout to answer.
    fn new(now: u64) -> Self {
        Self { next: None, matched: 0, heard_ns: now, sent_ns: now }
    }
}

/// The primary's state for one epoch.
#[derive(Debug)]
struct Lead {
    epoch: u64,
    members: Vec<String>,
    peers: BTreeMap<String, Peer>,
    /// Client writes appended and not yet acknowledged, in LSN order.
    pending: VecDeque<(u64, u64)>,
    lease_until_ns: u64,
    /// Learners whose addition was asked: counted for acknowledgements until a set without
    /// them arrives.
    adding: BTreeSet<String>,
    proposal: Option<(Proposal, u64)>,
    /// A member refused our epoch for the next one while we had asked for a change: most
    /// likely our change, applied and not yet heard of. Until then (ns) we wait for the set
    /// instead of stepping down (which would fail every pending write); then we step down.
    refused_until: Option<(u64, u64)>,
    /// Everything below this was acknowledged.
    acknowledged: u64,
    /// The log's end after this node's epoch marker: every write an earlier primary
    /// acknowledged is below it.
    start: u64,
}

/// One node's copy of one shard.
#[derive(Debug)]
pub struct Member {
    me: String,
    timing: Timing,
    /// The highest epoch seen, and its primary when known.
    epoch: u64,
    primary: Option<String>,
    config: Option<SetConfig>,
    /// The log as written (in order; durable below the disk's progress).
    log: LogShape,
    /// The log as durable.
    durable: LogShape,
    in_flight: VecDeque<(u64, DiskOp)>,
    next_seq: u64,
    /// As a backup in `epoch`: the log agrees with the primary's below this.
    accepted: u64,
    /// As a backup: the last `Appended` end sent in `epoch`.
    acked: u64,
    /// Below this the log holds records no primary will ever cut (see [`Member::committed`]).
    committed: u64,
    lead: Option<Lead>,
    /// Restarted and not yet given a set in a newer epoch: never leads the old one again.
    restarted: bool,
    /// A change of its own log did not fit it (a bug): the member stopped taking any input.
    failed: Option<ShapeError>,
    out: Vec<Action>,
}

impl Member {
    /// A member starting from what its disk holds: the durable log and the saved epoch,
    /// primary and set. After a restart it does not lead the saved epoch (its unsynced tail may
    /// be gone while others hold it): the control plane must give it a newer one.
    pub fn restart(
        me: &str,
        timing: Timing,
        durable: LogShape,
        epoch: u64,
        primary: Option<String>,
        config: Option<SetConfig>,
    ) -> Self {
        // A saved epoch lags the log when the crash came between an append of a newer epoch's
        // records and the save: the log's own epoch counts too.
        let epoch = epoch.max(durable.last_epoch());
        Self {
            me: me.to_owned(),
            timing,
            epoch,
            primary,
            config,
            log: durable.clone(),
            durable,
            in_flight: VecDeque::new(),
            next_seq: 1,
            accepted: 0,
            acked: 0,
            committed: 0,
            lead: None,
            restarted: true,
            failed: None,
            out: Vec::new(),
        }
    }

    /// The actions produced since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }

    /// The durable log (what heartbeats report to the control plane).
    pub fn durable_log(&self) -> &LogShape {
        &self.durable
    }

    /// The log as written.
    pub fn log(&self) -> &LogShape {
        &self.log
    }

    /// The highest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Below this LSN this node's log holds, durably, records that every member of a set held
    /// durably: no primary will ever cut them, so the store may apply them (a backup applies
    /// nothing above it; a primary's is what it acknowledged). Durable here too: a record
    /// committed elsewhere whose copy here is not yet on disk (a cut of a divergent tail
    /// still in flight) may come back divergent after a crash. Not saved: 0 after a restart.
    pub fn committed(&self) -> u64 {
        let durable = self.durable.agreed_prefix(&self.log);
        self.lead.as_ref().map_or(self.committed, |lead| lead.acknowledged.max(self.committed)).min(durable)
    }

    /// The epoch this node leads, if it does.
    pub fn leading(&self) -> Option<u64> {
        self.lead.as_ref().map(|lead| lead.epoch)
    }

    /// Whether this node restarted as the primary of its saved epoch and needs a new one.
    pub fn wants_new_epoch(&self) -> bool {
        self.restarted
            && self.config.as_ref().is_some_and(|config| config.primary == self.me && config.epoch == self.epoch)
    }

    fn send(&mut self, to: &str, message: Message) {
        self.out.push(Action::Send { to: to.to_owned(), message });
    }

    fn persist(&mut self, op: DiskOp) {
        if let Err(error) = op.apply(&mut self.log) {
            return self.fail(error);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push_back((seq, op));
        self.out.push(Action::Persist { seq, op });
    }

    /// Stops for good: steps down (its pending writes fail) and takes no more input. The shell
    /// reports [`Member::failed`] and the copy must be rebuilt.
    fn fail(&mut self, error: ShapeError) {
        self.failed.get_or_insert(error);
        self.step_down();
    }

    /// Why the member stopped, if it did.
    pub fn failed(&self) -> Option<&ShapeError> {
        self.failed.as_ref()
    }

    fn save(&mut self) {
        self.out.push(Action::Save { epoch: self.epoch, primary: self.primary.clone(), config: self.config.clone() });
    }

    /// Moves to a newer epoch (learned from a message or a set): no longer leads the old one.
    fn adopt(&mut self, epoch: u64, primary: Option<String>) {
        if epoch <= self.epoch {
            return;
        }
        self.epoch = epoch;
        self.primary = primary;
        self.accepted = 0;
        self.acked = 0;
        self.step_down();
        self.save();
    }

    fn step_down(&mut self) {
        if let Some(lead) = self.lead.take() {
            let primary = self.primary.clone();
            for (first, next) in lead.pending {
                let error = WriteError::NotPrimary { epoch: self.epoch, primary: primary.clone() };
                self.out.push(Action::Fail { first, next, error });
            }
        }
    }

    /// The control plane's set for this shard.
    pub fn on_config(&mut self, now: u64, config: SetConfig) {
        if self.failed.is_some() {
            return;
        }
        if self.config.as_ref().is_some_and(|known| known.epoch >= config.epoch) {
            return;
        }
        // The primary of the epoch before, with only the members changed: nothing can have
        // happened in between (a promotion never picks the primary whose lease lapsed).
        let continuing =
            config.primary == self.me && self.lead.as_ref().is_some_and(|lead| lead.epoch + 1 == config.epoch);
        if config.epoch > self.epoch {
            self.epoch = config.epoch;
            self.primary = Some(config.primary.clone());
            self.accepted = 0;
            self.acked = 0;
            if !continuing {
                self.step_down();
            }
        }
        self.config = Some(config.clone());
        self.save();
        if config.epoch < self.epoch || config.primary != self.me {
            self.step_down();
            return;
        }
        self.restarted = false;
        if continuing {
            self.continue_lead(now, &config);
        } else if self.lead.is_none() && config.epoch >= self.log.last_epoch() {
            // (A set older than the log's last records is stale: never lead it.)
            self.begin_lead(now, &config);
        }
    }

    /// Leads the set's epoch: an epoch marker at the end of the log, every placed node probed.
    fn begin_lead(&mut self, now: u64, config: &SetConfig) {
        let end = self.log.end;
        self.persist(DiskOp::Append { epoch: config.epoch, first: end, next: end + 1 });
        let peers =
            config.placed().filter(|node| **node != self.me).map(|node| (node.clone(), Peer::new(now))).collect();
        self.lead = Some(Lead {
            epoch: config.epoch,
            members: config.members.clone(),
            peers,
            pending: VecDeque::new(),
            lease_until_ns: 0,
            adding: BTreeSet::new(),
            proposal: None,
            refused_until: None,
            acknowledged: 0,
            start: end + 1,
        });
        self.probe_all(now);
    }

    /// The same primary in a new epoch (a member removed or added): peers and pending writes
    /// carry over; asked additions end (the new set says whether they happened).
    fn continue_lead(&mut self, now: u64, config: &SetConfig) {
        let Some(lead) = self.lead.as_mut() else { return };
        lead.epoch = config.epoch;
        lead.members = config.members.clone();
        lead.adding.clear();
        lead.proposal = None;
        lead.refused_until = None;
        lead.peers.retain(|node, _| config.placed().any(|placed| placed == node));
        for node in config.placed() {
            if *node != self.me {
                lead.peers.entry(node.clone()).or_insert_with(|| Peer::new(now));
            }
        }
        self.probe_all(now);
        self.advance(now);
    }

    fn probe_all(&mut self, now: u64) {
        let Some(lead) = self.lead.as_mut() else { return };
        let epoch = lead.epoch;
        let mut probes = Vec::new();
        for (node, peer) in &mut lead.peers {
            if peer.next.is_none() {
                peer.sent_ns = now;
                probes.push(node.clone());
            }
        }
        for node in probes {
            self.send(&node, Message::Probe { epoch });
        }
    }

    /// A lease the control plane granted for `epoch`, valid until `until_ns` by this node's
    /// clock.
    pub fn on_lease(&mut self, epoch: u64, until_ns: u64) {
        if let Some(lead) = self.lead.as_mut()
            && lead.epoch == epoch
        {
            lead.lease_until_ns = lead.lease_until_ns.max(until_ns);
        }
    }

    /// The control plane refused `proposal` (its set then at `_current_epoch`): it may be
    /// asked again. A learner whose addition was asked stays counted until a set without it
    /// arrives: a refusal can be a timeout whose write still commits, and dropping the learner
    /// then would let the primary acknowledge writes a new member lacks.
    pub fn on_refused(&mut self, proposal: &Proposal, _current_epoch: u64) {
        let Some(lead) = self.lead.as_mut() else { return };
        if lead.proposal.as_ref().is_some_and(|(asked, _)| asked == proposal) {
            lead.proposal = None;
        }
    }

    /// Members that answered within the timeout, this node included.
    fn live_members(&self, lead: &Lead, now: u64) -> usize {
        lead.members
            .iter()
            .filter(|member| {
                **member == self.me
                    || lead
                        .peers
                        .get(*member)
                        .is_some_and(|peer| now.saturating_sub(peer.heard_ns) < self.timing.member_timeout_ns)
            })
            .count()
    }

    /// A client write of `records` records: appended and sent; acknowledged later.
    pub fn write(&mut self, now: u64, records: u64) -> Result<(u64, u64), WriteError> {
        let Some(lead) = self.lead.as_ref() else {
            return Err(WriteError::NotPrimary { epoch: self.epoch, primary: self.primary.clone() });
        };
        if now >= lead.lease_until_ns {
            return Err(WriteError::LeaseLapsed);
        }
        let min = self.config.as_ref().map_or(1, |config| config.min_replicas);
        let live = self.live_members(lead, now);
        if live < min {
            return Err(WriteError::Unavailable { live, min });
        }
        let (epoch, first) = (lead.epoch, self.log.end);
        let next = first + records.max(1);
        self.persist(DiskOp::Append { epoch, first, next });
        let Some(lead) = self.lead.as_mut() else {
            return Err(WriteError::NotPrimary { epoch: self.epoch, primary: None });
        };
        lead.pending.push_back((first, next));
        self.pump_all(now);
        Ok((first, next))
    }

    /// Sends each peer whose place is known what it lacks.
    fn pump_all(&mut self, now: u64) {
        let Some(lead) = self.lead.as_mut() else { return };
        let (epoch, commit) = (lead.epoch, lead.acknowledged);
        let mut sends = Vec::new();
        for (node, peer) in &mut lead.peers {
            let Some(mut next) = peer.next else { continue };
            while next < self.log.end {
                let to = self.log.epoch_end(next).min(self.log.end);
                sends.push((node.clone(), Self::append_message(&self.log, (epoch, commit), next, to)));
                next = to;
                peer.sent_ns = now;
            }
            peer.next = Some(next);
        }
        for (node, message) in sends {
            self.send(&node, message);
        }
    }

    fn append_message(log: &LogShape, (epoch, commit): (u64, u64), first: u64, next: u64) -> Message {
        let prev_epoch = if first <= 1 { 0 } else { log.epoch_at(first - 1).unwrap_or(0) };
        let batch_epoch = log.epoch_at(first).unwrap_or(epoch);
        Message::Append { epoch, prev_epoch, first, next, batch_epoch, commit }
    }

    /// A message from `from`.
    pub fn on_message(&mut self, now: u64, from: &str, message: Message) {
        if self.failed.is_some() {
            return;
        }
        let epoch = message.epoch();
        if epoch < self.epoch {
            if !matches!(message, Message::Refuse { .. }) {
                let current = self.epoch;
                self.send(from, Message::Refuse { epoch: current });
            }
            return;
        }
        match message {
            Message::Refuse { epoch } => {
                let waiting = self.lead.as_mut().filter(|lead| lead.epoch + 1 == epoch && lead.proposal.is_some());
                match waiting {
                    Some(lead) => {
                        let until = lead.refused_until.map_or(now + self.timing.retry_ns, |(_, until)| until);
                        lead.refused_until = Some((epoch, until));
                    }
                    None => self.adopt(epoch, None),
                }
            }
            Message::Probe { epoch } => {
                self.follow(epoch, from);
                if self.lead.is_none() {
                    let log = self.durable.clone();
                    self.send(from, Message::Shape { epoch, log });
                }
            }
            Message::Append { epoch, prev_epoch, first, next, batch_epoch, commit } => {
                self.follow(epoch, from);
                if self.lead.is_none() {
                    self.accept(from, prev_epoch, (first, next, batch_epoch), commit);
                }
            }
            Message::Shape { epoch, log } => self.on_shape(now, epoch, from, &log),
            Message::Appended { epoch, end } => self.on_appended(now, epoch, from, end),
        }
    }

    /// A primary's message of `epoch` (not older than ours): it leads that epoch.
    fn follow(&mut self, epoch: u64, from: &str) {
        if epoch > self.epoch {
            self.adopt(epoch, Some(from.to_owned()));
        } else if self.primary.is_none() && self.lead.is_none() {
            self.primary = Some(from.to_owned());
            self.save();
        }
    }

    /// A backup's side of an append.
    fn accept(&mut self, from: &str, prev_epoch: u64, (first, next, batch_epoch): (u64, u64, u64), commit: u64) {
        let fits = first <= self.log.end && (first <= 1 || self.log.epoch_at(first - 1) == Some(prev_epoch));
        if !fits {
            let (epoch, log) = (self.epoch, self.durable.clone());
            self.send(from, Message::Shape { epoch, log });
            return;
        }
        // Skip what we hold already; cut from the first record that differs.
        let mut at = first;
        while at < next && at < self.log.end && self.log.epoch_at(at) == Some(batch_epoch) {
            at = self.log.epoch_end(at).min(self.log.end).min(next);
        }
        if at < next {
            if at < self.log.end {
                self.persist(DiskOp::Truncate { from: at });
            }
            self.persist(DiskOp::Append { epoch: batch_epoch, first: at, next });
        }
        self.accepted = self.accepted.max(next);
        // We agree with the primary below `next`: what it says is committed there is ours too.
        self.committed = self.committed.max(commit.min(next));
        let heartbeat = first == next;
        self.ack(from, heartbeat);
    }

    /// Tells the primary how far we are durable and agree, when that grew (or when asked).
    fn ack(&mut self, to: &str, always: bool) {
        let end = self.accepted.min(self.durable.agreed_prefix(&self.log));
        if end > self.acked || always {
            self.acked = self.acked.max(end);
            let epoch = self.epoch;
            self.send(to, Message::Appended { epoch, end });
        }
    }

    fn on_shape(&mut self, now: u64, epoch: u64, from: &str, log: &LogShape) {
        let Some(lead) = self.lead.as_mut() else { return };
        if epoch != lead.epoch {
            return;
        }
        let agreed = self.log.agreed_prefix(log);
        let Some(peer) = lead.peers.get_mut(from) else { return };
        peer.heard_ns = now;
        peer.matched = peer.matched.max(agreed);
        peer.next = Some(agreed);
        self.pump_all(now);
        self.advance(now);
    }

    fn on_appended(&mut self, now: u64, epoch: u64, from: &str, end: u64) {
        let Some(lead) = self.lead.as_mut() else { return };
        if epoch != lead.epoch {
            return;
        }
        let Some(peer) = lead.peers.get_mut(from) else { return };
        peer.heard_ns = now;
        peer.matched = peer.matched.max(end.min(self.log.end));
        self.advance(now);
    }

    /// Acknowledges the writes durable on this node and on every member (and every learner
    /// being added).
    fn advance(&mut self, _now: u64) {
        let own = self.durable.agreed_prefix(&self.log);
        let Some(lead) = self.lead.as_mut() else { return };
        let mut commit = own;
        for node in lead.members.iter().chain(&lead.adding) {
            if *node != self.me {
                commit = commit.min(lead.peers.get(node).map_or(0, |peer| peer.matched));
            }
        }
        lead.acknowledged = lead.acknowledged.max(commit);
        while let Some(&(first, next)) = lead.pending.front() {
            if next > commit {
                break;
            }
            lead.pending.pop_front();
            self.out.push(Action::Acknowledge { first, next });
        }
    }

    /// The disk made everything up to `seq` durable.
    pub fn persisted(&mut self, now: u64, seq: u64) {
        while let Some(&(done, op)) = self.in_flight.front() {
            if done > seq {
                break;
            }
            self.in_flight.pop_front();
            if let Err(error) = op.apply(&mut self.durable) {
                return self.fail(error);
            }
        }
        if self.lead.is_some() {
            self.advance(now);
        } else if let Some(primary) = self.primary.clone()
            && self.accepted > 0
        {
            self.ack(&primary, false);
        }
    }

    /// Timers: probes and heartbeats, removal of silent members, addition of caught-up
    /// learners.
    pub fn tick(&mut self, now: u64) {
        if self.failed.is_some() {
            return;
        }
        if let Some((epoch, until)) = self.lead.as_ref().and_then(|lead| lead.refused_until)
            && now >= until
        {
            // The set that explains the refusal did not come: the epoch is over for us.
            self.adopt(epoch, None);
        }
        let Some(lead) = self.lead.as_mut() else { return };
        let (epoch, commit) = (lead.epoch, lead.acknowledged);
        let mut sends = Vec::new();
        for (node, peer) in &mut lead.peers {
            match peer.next {
                None if now.saturating_sub(peer.sent_ns) >= self.timing.retry_ns => {
                    peer.sent_ns = now;
                    sends.push((node.clone(), Message::Probe { epoch }));
                }
                Some(next) if now.saturating_sub(peer.sent_ns) >= self.timing.heartbeat_ns => {
                    peer.sent_ns = now;
                    sends.push((node.clone(), Self::append_message(&self.log, (epoch, commit), next, next)));
                }
                _ => {}
            }
        }
        for (node, message) in sends {
            self.send(&node, message);
        }
        self.propose(now);
    }

    /// At most one proposal at a time, sent again until answered.
    fn propose(&mut self, now: u64) {
        let (member_timeout, retry) = (self.timing.member_timeout_ns, self.timing.retry_ns);
        let replicas = self.config.as_ref().map_or(0, |config| config.replicas);
        let Some(lead) = self.lead.as_mut() else { return };
        if let Some((proposal, sent)) = &mut lead.proposal {
            if now.saturating_sub(*sent) >= retry {
                *sent = now;
                let proposal = proposal.clone();
                self.out.push(Action::Propose(proposal));
            }
            return;
        }
        let silent = |peer: &Peer| now.saturating_sub(peer.heard_ns) >= member_timeout;
        // A removal that would leave fewer than min_replicas members is refused: then a ready
        // learner is added first (the silent member goes after).
        let min = self.config.as_ref().map_or(1, |config| config.min_replicas);
        let removable = lead.members.len() > min;
        let dead = lead
            .members
            .iter()
            .find(|member| **member != self.me && lead.peers.get(*member).is_none_or(silent))
            .filter(|_| removable);
        let proposal = if let Some(node) = dead {
            Some(Proposal::Remove { epoch: lead.epoch, node: node.clone() })
        } else if lead.members.len() + lead.adding.len() < replicas {
            // A learner that holds every acknowledged write (ours and our predecessors'), counted
            // from now on.
            let ready = lead.peers.iter().find(|(node, peer)| {
                !lead.members.contains(node)
                    && !lead.adding.contains(*node)
                    && !silent(peer)
                    && peer.matched >= lead.acknowledged.max(lead.start)
            });
            ready.map(|(node, _)| node.clone()).map(|node| {
                lead.adding.insert(node.clone());
                Proposal::Add { epoch: lead.epoch, node }
            })
        } else {
            None
        };
        if let Some(proposal) = proposal {
            lead.proposal = Some((proposal.clone(), now));
            self.out.push(Action::Propose(proposal));
        }
    }
}
