//! The shell of one shard copy in a replica set, on its shard's glommio executor: it drives a
//! [`Member`] with the store's WAL as the set's log. Transport-neutral: frames go out through
//! [`Links`] and come in through [`ShardCopy::on_frame`]; the control plane's sets, leases and
//! refusals come in through [`ShardCopy::on_config`], [`ShardCopy::on_lease`] and
//! [`ShardCopy::on_refused`].
//!
//! - A client write on the primary is admitted by the core at the moment it takes its LSN
//!   (`ShardStore::write_logged`), so the core's log and the WAL hold the same LSNs. It is
//!   acknowledged once the core says every member holds it durably, then applied and its
//!   commit wait served.
//! - The core's actions run in order on one task: a `Save` is durable before anything after it
//!   is sent; `Persist` goes to the disk task (own records: wait until durable; the epoch
//!   marker: appended here; another primary's batch: `Wal::append_replicated`; a cut:
//!   `Wal::truncate_tail`), which reports `persisted` in order.
//! - Sends to each peer keep their order on a task per peer. An `Append` of records goes out
//!   as the WAL batches holding them (same LSNs, same boundaries) as soon as their bytes are
//!   final (while this node writes them too), else from the tail cache or the segments; a range
//!   already sent inside a batch is not sent again.
//! - The store applies records only below the core's `committed()` (a backup's tail above it
//!   may still be cut), read back from the WAL.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use controlapi::replica::{LogShape, ReplicaReport, SetConfig};

use super::core::{Action, DiskOp, Member, Message, Proposal, Timing, WriteError};
use super::frame::Frame;
use super::state::MemberState;
use crate::store::{ShardStore, StoreError};
use crate::sync::Notify;
use crate::wal::{WalError, WalReader, WalTail};

/// How a copy reaches the other copies of its shard and the control plane.
pub trait Links {
    /// Sends `frame` to `to`, or drops it (the protocol sends again what matters).
    fn send(&self, to: &str, frame: Frame);
    /// Asks the control plane for a change of the set; its answer comes back as a new set
    /// ([`ShardCopy::on_config`]) or a refusal ([`ShardCopy::on_refused`]).
    fn propose(&self, shard: u32, proposal: Proposal);
}

/// Why a copy could not take or finish a write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Refused(#[from] WriteError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The copy stopped (its WAL failed, or its log did not fit a change): its node must
    /// rebuild it.
    #[error("shard {shard} copy stopped: {reason}")]
    Stopped { shard: u32, reason: String },
}

/// Where the records of an input come from.
enum Origin {
    /// Reserved in the WAL by a client write.
    Written,
    /// Another primary's batch.
    Image(Bytes),
}

/// A `Persist` of the core, as the disk task carries it out.
enum Work {
    /// A client write's record, reserved in the WAL: wait until durable.
    Written { next: u64 },
    /// Another primary's batch, appended as is.
    Image { first: u64, next: u64, image: Bytes },
    /// The epoch marker of a new lead: appended here.
    Marker { first: u64 },
    /// The log cut from `from` on.
    Cut { from: u64 },
}

struct PeerQueue {
    messages: VecDeque<Message>,
    wake: Rc<Notify>,
    /// Records below this were sent in batches (since the last resend).
    cursor: u64,
}

struct Inner {
    shard: u32,
    dir: PathBuf,
    store: ShardStore,
    reader: WalReader,
    member: RefCell<Member>,
    links: Rc<dyn Links>,
    origin: Instant,
    actions: RefCell<VecDeque<Action>>,
    actions_wake: Notify,
    disk: RefCell<VecDeque<(u64, Work)>>,
    disk_wake: Notify,
    peers: RefCell<BTreeMap<String, PeerQueue>>,
    /// Writes below this LSN were acknowledged by the set.
    acknowledged: Cell<u64>,
    /// Writes the core failed: `(first, next, why)`, newest last (a few kept).
    failed: RefCell<VecDeque<(u64, u64, WriteError)>>,
    writes_wake: Notify,
    applied_wake: Notify,
    committed_wake: Notify,
    /// An epoch marker is not yet in the WAL: writes wait for it (they take the LSNs after).
    marker_pending: Cell<bool>,
    wal_epoch: Cell<u64>,
    /// The epoch of the last lease (logged when it changes).
    leased_epoch: Cell<u64>,
    stopped: RefCell<Option<String>>,
}

/// One shard copy. Cheap to clone; lives on its shard's executor.
#[derive(Clone)]
pub struct ShardCopy {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for ShardCopy {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let member = self.inner.member.borrow();
        formatter
            .debug_struct("ShardCopy")
            .field("shard", &self.inner.shard)
            .field("epoch", &member.epoch())
            .field("leading", &member.leading())
            .field("log", member.log())
            .finish()
    }
}

/// How often the core's timers run.
const TICK: Duration = Duration::from_millis(5);

impl ShardCopy {
    /// The copy of `store` (opened with `StoreConfig::set_log`) on node `me`, restarted from
    /// its WAL (the log's shape from the epochs its batches name) and its saved state. `tail`
    /// must be the WAL's tail cache (what the primary sends from).
    pub fn start(
        me: &str,
        timing: Timing,
        store: ShardStore,
        tail: Option<Arc<WalTail>>,
        links: Rc<dyn Links>,
    ) -> Result<Self, CopyError> {
        let config = store.config().clone();
        let shard = config.shard_id;
        if !config.set_log {
            return Err(CopyError::Stopped { shard, reason: "the store was not opened as a set's log".into() });
        }
        let state =
            super::load_state(&config.dir).map_err(|reason| CopyError::Stopped { shard, reason })?.unwrap_or_default();
        let wal = store.wal();
        let log = LogShape::from_runs(wal.epochs_at_open(), wal.durable_next_lsn());
        let member = Member::restart(me, timing, log, state.epoch, state.primary, state.config);
        let mut reader = WalReader::new(&config.wal.dir, shard, config.wal.record_payload_bytes_max);
        if let Some(tail) = tail {
            reader = reader.with_tail(tail);
        }
        let copy = Self {
            inner: Rc::new(Inner {
                shard,
                dir: config.dir.clone(),
                store,
                reader,
                member: RefCell::new(member),
                links,
                origin: Instant::now(),
                actions: RefCell::default(),
                actions_wake: Notify::default(),
                disk: RefCell::default(),
                disk_wake: Notify::default(),
                peers: RefCell::default(),
                acknowledged: Cell::new(0),
                failed: RefCell::default(),
                writes_wake: Notify::default(),
                applied_wake: Notify::default(),
                committed_wake: Notify::default(),
                marker_pending: Cell::new(false),
                wal_epoch: Cell::new(0),
                leased_epoch: Cell::new(0),
                stopped: RefCell::new(None),
            }),
        };
        glommio::spawn_local(copy.clone().run_actions()).detach();
        glommio::spawn_local(copy.clone().run_disk()).detach();
        glommio::spawn_local(copy.clone().run_apply()).detach();
        glommio::spawn_local(copy.clone().run_ticks()).detach();
        Ok(copy)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.inner.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The shard.
    pub fn shard(&self) -> u32 {
        self.inner.shard
    }

    /// The store (reads; writes go through [`ShardCopy::write`]).
    pub fn store(&self) -> &ShardStore {
        &self.inner.store
    }

    /// Why the copy stopped, if it did.
    pub fn stopped(&self) -> Option<String> {
        self.inner.stopped.borrow().clone()
    }

    /// What the node's heartbeat tells the control plane about this copy.
    pub fn report(&self) -> ReplicaReport {
        let member = self.inner.member.borrow();
        ReplicaReport {
            shard: self.inner.shard,
            epoch: member.epoch(),
            log: member.durable_log().clone(),
            leading: member.leading(),
            wants_new_epoch: member.wants_new_epoch(),
        }
    }

    /// The epoch this copy leads, if it does.
    pub fn leading(&self) -> Option<u64> {
        self.inner.member.borrow().leading()
    }

    /// The core's committed point (what the store may apply below).
    pub fn committed(&self) -> u64 {
        self.inner.member.borrow().committed()
    }

    /// The durable log's shape.
    pub fn durable_log(&self) -> LogShape {
        self.inner.member.borrow().durable_log().clone()
    }

    /// The control plane's set for this shard.
    pub fn on_config(&self, config: SetConfig) {
        let now = self.now();
        self.input(|member| member.on_config(now, config), None);
    }

    /// A lease for `epoch`, valid until `until` by this node's clock.
    pub fn on_lease(&self, epoch: u64, until: Instant) {
        let until_ns = u64::try_from(until.saturating_duration_since(self.inner.origin).as_nanos()).unwrap_or(0);
        if self.inner.leased_epoch.replace(epoch) != epoch {
            tracing::info!(shard = self.inner.shard, epoch, "replica set lease held");
        }
        self.input(|member| member.on_lease(epoch, until_ns), None);
    }

    /// The control plane refused `proposal` (its set is at `epoch`).
    pub fn on_refused(&self, proposal: &Proposal, epoch: u64) {
        self.input(|member| member.on_refused(proposal, epoch), None);
    }

    /// A frame from the copy on node `from`.
    pub fn on_frame(&self, from: &str, frame: Frame) {
        let now = self.now();
        let image = match (&frame.message, frame.image) {
            (Message::Append { first, next, .. }, Some(image)) if first < next => Some((*first, *next, image)),
            _ => None,
        };
        let message = frame.message;
        self.input(|member| member.on_message(now, from, message), image);
    }

    /// Runs one input through the core and queues what it asks, in order. `image` is the batch
    /// of another primary an incoming `Append` carried.
    fn input(&self, apply: impl FnOnce(&mut Member), image: Option<(u64, u64, Bytes)>) {
        if self.inner.stopped.borrow().is_some() {
            return;
        }
        let committed_before = self.committed();
        apply(&mut self.inner.member.borrow_mut());
        self.drain(image.map(|(first, next, image)| (first, next, Origin::Image(image))));
        if self.committed() > committed_before {
            self.inner.committed_wake.notify_all();
        }
    }

    /// Takes the core's actions: `Persist` goes to the disk queue now (in order), the rest to
    /// the action task. `origin` says where the records of an `Append` persist come from.
    fn drain(&self, mut origin: Option<(u64, u64, Origin)>) {
        let inner = &self.inner;
        let actions = inner.member.borrow_mut().take_actions();
        if let Some(failure) = inner.member.borrow().failed() {
            self.stop(format!("its log does not fit a change: {failure}"));
            return;
        }
        let leading = inner.member.borrow().leading();
        if let Some(epoch) = leading
            && epoch != inner.wal_epoch.get()
        {
            tracing::info!(shard = inner.shard, epoch, "leading the replica set");
            inner.wal_epoch.set(epoch);
            inner.store.wal().set_epoch(epoch);
        }
        let mut queued = false;
        for action in actions {
            match action {
                Action::Persist { seq, op } => {
                    let work = match op {
                        DiskOp::Append { first, next, .. } => match origin.take() {
                            Some((at, until, Origin::Written)) if at <= first && next <= until => {
                                Work::Written { next }
                            }
                            Some((at, until, Origin::Image(image))) if at <= first && next <= until => {
                                Work::Image { first, next, image }
                            }
                            other if leading.is_some() => {
                                origin = other;
                                // Not a write's nor an image's: the epoch marker of a new lead.
                                inner.marker_pending.set(true);
                                Work::Marker { first }
                            }
                            _ => {
                                self.stop(format!("records {first}..{next} to persist came without their batch"));
                                return;
                            }
                        },
                        DiskOp::Truncate { from } => Work::Cut { from },
                    };
                    inner.disk.borrow_mut().push_back((seq, work));
                    inner.disk_wake.notify_all();
                }
                other => {
                    inner.actions.borrow_mut().push_back(other);
                    queued = true;
                }
            }
        }
        if queued {
            inner.actions_wake.notify_all();
        }
    }

    fn stop(&self, reason: String) {
        let inner = &self.inner;
        if inner.stopped.borrow().is_none() {
            tracing::error!(shard = inner.shard, %reason, "replica copy stopped");
            *inner.stopped.borrow_mut() = Some(reason);
        }
        for wake in
            [&inner.actions_wake, &inner.disk_wake, &inner.writes_wake, &inner.applied_wake, &inner.committed_wake]
        {
            wake.notify_all();
        }
        for peer in inner.peers.borrow().values() {
            peer.wake.notify_all();
        }
    }

    /// What `take` gives once it gives something, waiting on `wake` meanwhile; `None` once the
    /// copy stopped. Every task of the copy and every write waits this way.
    async fn next<T>(&self, wake: &Notify, mut take: impl FnMut() -> Option<T>) -> Option<T> {
        loop {
            let wait = wake.wait();
            if self.inner.stopped.borrow().is_some() {
                return None;
            }
            if let Some(item) = take() {
                return Some(item);
            }
            wait.await;
        }
    }

    fn stopped_error(&self) -> CopyError {
        CopyError::Stopped { shard: self.inner.shard, reason: self.stopped().unwrap_or_default() }
    }

    /// A client write (as [`ShardStore::write`]): acknowledged once every member holds it,
    /// then readable here; returns its timestamp.
    pub async fn write<'a>(
        &self,
        items: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Result<u64, CopyError> {
        let inner = &self.inner;
        let marked = self.next(&inner.writes_wake, || (!inner.marker_pending.get()).then_some(()));
        marked.await.ok_or_else(|| self.stopped_error())?;
        let mut refusal = None;
        let written = inner
            .store
            .write_logged(items, &mut |lsn| {
                if inner.stopped.borrow().is_some() {
                    return Err("the copy stopped".into());
                }
                let now = self.now();
                let outcome = {
                    let mut member = inner.member.borrow_mut();
                    if member.log().end != lsn {
                        return Err(format!("the set's log ends at {}, the WAL at {lsn}", member.log().end));
                    }
                    member.write(now, 1)
                };
                match outcome {
                    Ok(_) => {
                        self.drain(Some((lsn, lsn + 1, Origin::Written)));
                        Ok(())
                    }
                    Err(error) => {
                        let reason = error.to_string();
                        refusal = Some(error);
                        Err(reason)
                    }
                }
            })
            .await;
        let (lsn, ts) = match written {
            Ok(written) => written,
            Err(StoreError::NotAdmitted { .. }) if refusal.is_some() => {
                return Err(CopyError::Refused(refusal.take().expect("checked")));
            }
            Err(error) => return Err(error.into()),
        };
        // Acknowledged by the set, or failed.
        let acknowledged = self.next(&inner.writes_wake, || {
            if inner.acknowledged.get() > lsn {
                return Some(Ok(()));
            }
            let failed = inner.failed.borrow();
            let failure = failed.iter().rev().find(|(first, next, _)| *first <= lsn && lsn < *next);
            failure.map(|(_, _, error)| Err(error.clone()))
        });
        acknowledged.await.ok_or_else(|| self.stopped_error())??;
        // Applied here (in LSN order), then the commit wait of the stamp.
        let applied = self.next(&inner.applied_wake, || (inner.store.applied_next() > lsn).then_some(()));
        applied.await.ok_or_else(|| self.stopped_error())?;
        inner.store.commit_wait(ts).await?;
        Ok(ts)
    }

    /// The action task: sends (through each peer's queue), saves (durable before what
    /// follows), acknowledgements, failures and proposals, in the order the core gave them.
    async fn run_actions(self) {
        let inner = &self.inner;
        while let Some(action) = self.next(&inner.actions_wake, || inner.actions.borrow_mut().pop_front()).await {
            match action {
                Action::Send { to, message } => self.queue_send(&to, message),
                Action::Save { epoch, primary, config } => {
                    let (dir, state) = (inner.dir.clone(), MemberState { epoch, primary, config });
                    let saved = glommio::executor().spawn_blocking(move || super::store_state(&dir, &state)).await;
                    if let Err(error) = saved {
                        self.stop(format!("saving its epoch failed: {error}"));
                        return;
                    }
                }
                Action::Acknowledge { next, .. } => {
                    inner.acknowledged.set(inner.acknowledged.get().max(next));
                    inner.writes_wake.notify_all();
                }
                Action::Fail { first, next, error } => {
                    let mut failed = inner.failed.borrow_mut();
                    failed.push_back((first, next, error));
                    while failed.len() > 4096 {
                        failed.pop_front();
                    }
                    inner.writes_wake.notify_all();
                }
                Action::Propose(proposal) => inner.links.propose(inner.shard, proposal),
                Action::Persist { .. } => unreachable!("persists go to the disk queue"),
            }
        }
    }

    fn queue_send(&self, to: &str, message: Message) {
        let (wake, new) = {
            let mut peers = self.inner.peers.borrow_mut();
            let new = !peers.contains_key(to);
            let peer = peers.entry(to.to_owned()).or_insert_with(|| PeerQueue {
                messages: VecDeque::new(),
                wake: Rc::new(Notify::default()),
                cursor: 0,
            });
            peer.messages.push_back(message);
            (Rc::clone(&peer.wake), new)
        };
        // (A task spawned here may run at once: no borrow is held.)
        if new {
            glommio::spawn_local(self.clone().run_peer(to.to_owned(), Rc::clone(&wake))).detach();
        }
        wake.notify_all();
    }

    /// Sends `to` its messages in order; an `Append` of records as the WAL batches holding
    /// them, once durable here.
    async fn run_peer(self, to: String, wake: Rc<Notify>) {
        let inner = &self.inner;
        let pop = || inner.peers.borrow_mut().get_mut(&to).and_then(|peer| peer.messages.pop_front());
        while let Some(message) = self.next(&wake, pop).await {
            match message {
                Message::Append { epoch, prev_epoch, first, next, batch_epoch, commit } if first < next => {
                    if let Err(error) =
                        self.send_batches(&to, (epoch, prev_epoch, batch_epoch, commit), first, next).await
                    {
                        tracing::warn!(shard = inner.shard, to, %error, "could not send WAL batches; the peer will ask again");
                    }
                }
                message => inner.links.send(&to, Frame { shard: inner.shard, message, image: None }),
            }
        }
    }

    async fn send_batches(
        &self,
        to: &str,
        (epoch, prev_epoch, batch_epoch, commit): (u64, u64, u64, u64),
        first: u64,
        next: u64,
    ) -> Result<(), WalError> {
        let inner = &self.inner;
        let cursor = inner.peers.borrow().get(to).map_or(0, |peer| peer.cursor);
        let wal = inner.store.wal();
        // Sent as soon as its bytes are final: the peers write it while this node does.
        wal.wait_sealed(next - 1).await?;
        // The batch starting at `lsn`: the one being written, or a durable one (from the tail
        // cache or the segments); none inside the batch being written.
        let batch_at = |lsn: u64| match wal.sealing_batch(lsn) {
            Some(batch) => Ok(Some(batch)),
            None if lsn >= wal.durable_next_lsn() => Ok(None),
            None => inner.reader.batch_at(lsn),
        };
        let mut at = first;
        if first < cursor {
            // Inside a batch already sent, or a resend from a batch start (after the peer's
            // shape said where the logs agree).
            match batch_at(first)? {
                Some(_) => {}
                None if next <= cursor => return Ok(()),
                None => at = cursor,
            }
        }
        let mut prev = prev_epoch;
        while at < next {
            let Some(batch) = batch_at(at)? else {
                return Err(WalError::Io {
                    op: "read a batch to send",
                    path: inner.dir.display().to_string(),
                    errno: None,
                    message: format!("no batch starts at LSN {at}"),
                });
            };
            let message =
                Message::Append { epoch, prev_epoch: prev, first: at, next: batch.next_lsn, batch_epoch, commit };
            inner.links.send(to, Frame { shard: inner.shard, message, image: Some(batch.bytes) });
            prev = batch_epoch;
            at = batch.next_lsn;
            if let Some(peer) = inner.peers.borrow_mut().get_mut(to) {
                peer.cursor = at;
            }
        }
        Ok(())
    }

    /// The disk task: every `Persist` in order, then `persisted(seq)`.
    async fn run_disk(self) {
        let inner = &self.inner;
        while let Some((seq, work)) = self.next(&inner.disk_wake, || inner.disk.borrow_mut().pop_front()).await {
            if let Err(error) = self.persist(work).await {
                self.stop(format!("its WAL failed: {error}"));
                return;
            }
            let now = self.now();
            self.input(|member| member.persisted(now, seq), None);
        }
    }

    async fn persist(&self, work: Work) -> Result<(), WalError> {
        let wal = self.inner.store.wal();
        match work {
            Work::Cut { from } => wal.truncate_tail(from).await.map(drop),
            Work::Written { next } => wal.wait_durable(next - 1).await,
            Work::Image { first, next, image } => {
                let mut retries = 0;
                loop {
                    match wal.append_replicated(&image).await {
                        Ok(end) if end == next => return Ok(()),
                        Ok(end) => {
                            return Err(WalError::ReplicatedBatch {
                                expected_lsn: first,
                                reason: format!("the batch ended at {end}, the core expected {next}"),
                            });
                        }
                        // Own records of a lead that just ended still in the open batch.
                        Err(WalError::ReplicatedBatch { .. }) if retries < 100 && wal.durable_next_lsn() < first => {
                            retries += 1;
                            glommio::timer::sleep(Duration::from_millis(1)).await;
                        }
                        Err(error) => return Err(error),
                    }
                }
            }
            Work::Marker { first } => {
                let marker = crate::store::op::EPOCH_MARKER;
                let appended = wal.append_admitted(&marker, |lsn| (lsn == first).then_some(0)).await;
                self.inner.marker_pending.set(false);
                self.inner.writes_wake.notify_all();
                appended.map(drop)
            }
        }
    }

    /// The apply task: records below the core's committed point, read back from the WAL, into
    /// the store.
    async fn run_apply(self) {
        let inner = &self.inner;
        let due = || {
            let (from, until) = (inner.store.applied_next(), self.committed());
            (from < until).then_some((from, until))
        };
        while let Some((from, until)) = self.next(&inner.committed_wake, due).await {
            let mut cursor = inner.reader.cursor(from, until);
            let applied = loop {
                match cursor.next_record() {
                    Ok(Some(record)) => {
                        if let Err(error) = inner.store.apply_logged(record.lsn, record.glt, &record.payload) {
                            break Err(error.to_string());
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(error) => break Err(error.to_string()),
                }
            };
            inner.applied_wake.notify_all();
            if let Err(error) = applied {
                self.stop(format!("applying its log failed: {error}"));
                return;
            }
            // Yield between rounds: a long catch-up must not hold the executor.
            glommio::yield_if_needed().await;
        }
    }

    async fn run_ticks(self) {
        while self.inner.stopped.borrow().is_none() {
            glommio::timer::sleep(TICK).await;
            let now = self.now();
            self.input(|member| member.tick(now), None);
        }
    }

    /// Stops the copy's tasks (the store is closed by its owner).
    pub fn shut_down(&self) {
        *self.inner.stopped.borrow_mut() = Some("shut down".into());
        self.stop("shut down".into());
    }
}
