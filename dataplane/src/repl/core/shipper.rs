//! The sending side of one replication stream (one shard to one peer region), sans-IO.
//!
//! The shell opens the stream and sends [`Shipper::hello`]; the peer's `Resume` goes to
//! [`Shipper::on_resume`] with what the shard's files hold ([`WalExtent`]), which says whether
//! the stream starts with batches or with a snapshot of the newest checkpoint. From then on the
//! shell feeds the shard's durable point ([`Shipper::on_point`]), acknowledgements
//! ([`Shipper::on_ack`]) and the time, and asks what to do: [`Shipper::next_batch`] names the
//! records to read and send (the shell reads them, then [`Shipper::seal`] gives the closed
//! timestamp the batch carries), [`Shipper::heartbeat`] says when an empty batch must carry a
//! newer closed timestamp, [`Shipper::hold`] what WAL the shard must keep for this peer, and
//! [`Shipper::deadline_ns`] when to ask again if nothing else happens.

use thiserror::Error;

use super::stream::{Outbound, ProtocolError, Window};
use crate::store::ClosedPoint;

/// What a shipper is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShipConfig {
    /// Bounds of the unacknowledged window.
    pub window: Window,
    /// How long the stream may stay quiet before an empty batch carries a newer closed
    /// timestamp, in ns.
    pub closed_interval_ns: u64,
}

/// What the shard's files hold when the stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalExtent {
    /// The first LSN the WAL still holds (`None`: the WAL holds no record yet).
    pub first_lsn: Option<u64>,
    /// The LSN of the newest checkpoint (`None`: there is none).
    pub checkpoint_lsn: Option<u64>,
}

/// How the stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Batches from this LSN.
    Batches {
        /// The first LSN to send.
        from: u64,
    },
    /// The newest checkpoint first (`Install` parts), then batches from its LSN. The shell
    /// tells [`Shipper::on_snapshot_sent`] once the last part went out.
    Snapshot {
        /// The checkpoint's LSN, where the batches resume.
        resume_lsn: u64,
    },
}

/// How much WAL the shard must keep for this peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    /// The lowest LSN the peer may still need.
    pub lsn: u64,
    /// Whether the hold must stand whatever the WAL bound says: a snapshot was installed and
    /// the stream has not caught up since (a bounded hold could release what it resumes from,
    /// and the peer would install again, and again).
    pub pinned: bool,
}

/// Why a stream cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ShipError {
    /// The peer broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The peer lacks records the WAL no longer holds and no checkpoint can replace them.
    #[error("the peer lacks LSN {behind}, which the WAL no longer holds, and there is no checkpoint to install")]
    NothingToInstall {
        /// The peer's position.
        behind: u64,
    },
    /// An event that does not fit the stream's state (a shell bug, reported, never ignored).
    #[error("{event} while {state}")]
    OutOfOrder {
        /// What happened.
        event: &'static str,
        /// Where the stream was.
        state: &'static str,
    },
}

/// A batch the shell read: its records and the stamp of the last one that carries a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// Its first LSN.
    pub first_lsn: u64,
    /// The LSN after its last record.
    pub next_lsn: u64,
    /// The timestamp of its last record (`None` when it carries none: empty, or only other
    /// regions' records).
    pub last_glt: Option<u64>,
}

#[derive(Debug, Clone)]
enum State {
    /// Waiting for the peer's `Resume`.
    Opening,
    /// Sending the snapshot that resumes at this LSN.
    Installing { resume_lsn: u64 },
    /// Sending batches.
    Streaming { outbound: Outbound, pinned: bool },
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            Self::Opening => "waiting for Resume",
            Self::Installing { .. } => "installing a snapshot",
            Self::Streaming { .. } => "streaming batches",
        }
    }
}

/// The sending side of one stream.
#[derive(Debug, Clone)]
pub struct Shipper {
    config: ShipConfig,
    state: State,
    /// The shard's durable point as last told.
    point: ClosedPoint,
}

impl Shipper {
    /// A stream about to open, the shard's durable point being `point`.
    pub fn new(config: ShipConfig, point: ClosedPoint) -> Self {
        Self { config, state: State::Opening, point }
    }

    /// The peer asked to resume at `next_lsn`; `wal` is what the shard's files hold.
    pub fn on_resume(&mut self, next_lsn: u64, wal: WalExtent, now_ns: u64) -> Result<Start, ShipError> {
        if !matches!(self.state, State::Opening) {
            return Err(self.out_of_order("Resume"));
        }
        match wal.first_lsn {
            Some(first) if next_lsn < first => {
                // Checkpoints release the WAL only below their own LSN: from the newest one's
                // LSN on, the WAL holds every record.
                let resume_lsn = wal.checkpoint_lsn.ok_or(ShipError::NothingToInstall { behind: next_lsn })?;
                self.state = State::Installing { resume_lsn };
                Ok(Start::Snapshot { resume_lsn })
            }
            _ => {
                self.state =
                    State::Streaming { outbound: Outbound::new(self.config.window, next_lsn, now_ns), pinned: false };
                Ok(Start::Batches { from: next_lsn })
            }
        }
    }

    /// The snapshot's last part went out: batches follow from its LSN, pinned until the
    /// stream has caught up. Returns that LSN.
    pub fn on_snapshot_sent(&mut self, now_ns: u64) -> Result<u64, ShipError> {
        let State::Installing { resume_lsn } = self.state else { return Err(self.out_of_order("snapshot sent")) };
        self.state = State::Streaming { outbound: Outbound::new(self.config.window, resume_lsn, now_ns), pinned: true };
        Ok(resume_lsn)
    }

    /// The shard's durable point moved. Neither part goes back: a promise that nothing at or
    /// below a timestamp comes from an LSN on holds from any later LSN too.
    pub fn on_point(&mut self, point: ClosedPoint) {
        self.point = ClosedPoint {
            durable_next_lsn: self.point.durable_next_lsn.max(point.durable_next_lsn),
            closed_ts: self.point.closed_ts.max(point.closed_ts),
        };
    }

    /// The shard's durable point as last told.
    pub fn point(&self) -> ClosedPoint {
        self.point
    }

    /// The records to read and send next, `from..until` (up to the batch size limit, the
    /// shell's to apply): when the window has room and durable records wait.
    pub fn next_batch(&self) -> Option<std::ops::Range<u64>> {
        let State::Streaming { outbound, .. } = &self.state else { return None };
        (outbound.has_room() && outbound.next_lsn() < self.point.durable_next_lsn)
            .then(|| outbound.next_lsn()..self.point.durable_next_lsn)
    }

    /// The shell read the batch `sealed` (`bytes` on the wire) and sends it now: the closed
    /// timestamp it carries. Records are stamped in LSN order, so everything at or below the
    /// last record's stamp has been sent; a batch reaching the durable point carries the
    /// shard's promise there. Never below what the stream sent before.
    pub fn seal(&mut self, sealed: Sealed, bytes: usize, now_ns: u64) -> Result<u64, ShipError> {
        let point = self.point;
        let State::Streaming { outbound, .. } = &mut self.state else { return Err(self.out_of_order("a batch")) };
        if sealed.first_lsn != outbound.next_lsn() || sealed.next_lsn < sealed.first_lsn {
            return Err(ShipError::OutOfOrder { event: "a batch not starting at the next LSN", state: "streaming" });
        }
        let closed = outbound.closed_for(sealed.last_glt, sealed.next_lsn >= point.durable_next_lsn, point.closed_ts);
        outbound.sent(sealed.next_lsn, closed, bytes, now_ns);
        Ok(closed)
    }

    /// When the stream is caught up, has been quiet for the closed interval and the shard's
    /// promise moved: an empty batch is due. Returns its first LSN and closed timestamp, and
    /// counts it as sent (`bytes` on the wire).
    pub fn heartbeat(&mut self, bytes: usize, now_ns: u64) -> Option<(u64, u64)> {
        let point = self.point;
        let interval = self.config.closed_interval_ns;
        let State::Streaming { outbound, .. } = &mut self.state else { return None };
        let caught_up = outbound.next_lsn() >= point.durable_next_lsn;
        if !caught_up || !outbound.heartbeat_due(now_ns, interval, point.closed_ts) {
            return None;
        }
        let closed = outbound.closed_for(None, true, point.closed_ts);
        let first = outbound.next_lsn();
        outbound.sent(first, closed, bytes, now_ns);
        Some((first, closed))
    }

    /// The peer made every LSN below `next_lsn` durable. Once it has what was durable here,
    /// a snapshot's pin is let go: the bounded hold will do from there.
    pub fn on_ack(&mut self, next_lsn: u64) -> Result<(), ShipError> {
        let durable = self.point.durable_next_lsn;
        let State::Streaming { outbound, pinned } = &mut self.state else { return Err(self.out_of_order("an Ack")) };
        outbound.on_ack(next_lsn)?;
        if *pinned && outbound.acked_lsn() >= durable {
            *pinned = false;
        }
        Ok(())
    }

    /// What the shard must keep for this peer: everything until the peer said where it is; the
    /// snapshot's LSN, pinned, while one is sent; then the first LSN not acknowledged.
    pub fn hold(&self) -> Hold {
        match &self.state {
            State::Opening => Hold { lsn: 0, pinned: false },
            State::Installing { resume_lsn } => Hold { lsn: *resume_lsn, pinned: true },
            State::Streaming { outbound, pinned } => Hold { lsn: outbound.acked_lsn(), pinned: *pinned },
        }
    }

    /// Batches sent and not yet acknowledged.
    pub fn unacked_batches(&self) -> usize {
        match &self.state {
            State::Streaming { outbound, .. } => outbound.unacked_batches(),
            _ => 0,
        }
    }

    /// When to look again if nothing else happens (ns): when the stream will have been quiet
    /// for the closed interval, if that is still ahead. Past it, a heartbeat that did not go
    /// out waits for a newer promise or for room in the window, and a new point or an ack is
    /// what wakes the shell then (no timer: it would spin).
    pub fn deadline_ns(&self, now_ns: u64) -> Option<u64> {
        match &self.state {
            State::Streaming { outbound, .. } => {
                Some(outbound.last_sent_ns().saturating_add(self.config.closed_interval_ns)).filter(|due| *due > now_ns)
            }
            _ => None,
        }
    }

    fn out_of_order(&self, event: &'static str) -> ShipError {
        ShipError::OutOfOrder { event, state: self.state.name() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: ShipConfig = ShipConfig { window: Window { batches: 2, bytes: 1 << 20 }, closed_interval_ns: 10 };

    fn point(durable_next_lsn: u64, closed_ts: u64) -> ClosedPoint {
        ClosedPoint { durable_next_lsn, closed_ts }
    }

    #[test]
    fn a_peer_the_wal_still_holds_gets_batches_and_the_hold_follows_its_acks() {
        let mut shipper = Shipper::new(CONFIG, point(10, 100));
        assert_eq!(shipper.hold(), Hold { lsn: 0, pinned: false }, "everything until the peer says");
        let wal = WalExtent { first_lsn: Some(1), checkpoint_lsn: Some(5) };
        assert_eq!(shipper.on_resume(3, wal, 0), Ok(Start::Batches { from: 3 }));
        assert_eq!(shipper.next_batch(), Some(3..10));
        let closed = shipper.seal(Sealed { first_lsn: 3, next_lsn: 6, last_glt: Some(50) }, 100, 1).unwrap();
        assert_eq!(closed, 50, "short of the durable point: the last record's stamp");
        assert_eq!(shipper.next_batch(), Some(6..10));
        let closed = shipper.seal(Sealed { first_lsn: 6, next_lsn: 10, last_glt: Some(60) }, 100, 2).unwrap();
        assert_eq!(closed, 100, "at the durable point: the shard's promise");
        assert_eq!(shipper.next_batch(), None, "caught up");
        shipper.on_ack(6).unwrap();
        assert_eq!(shipper.hold(), Hold { lsn: 6, pinned: false });
        assert!(shipper.on_ack(11).is_err(), "nothing past what was sent");
        assert!(shipper.seal(Sealed { first_lsn: 3, next_lsn: 4, last_glt: None }, 1, 3).is_err());
    }

    #[test]
    fn a_peer_behind_the_wal_gets_the_newest_checkpoint_and_a_pin_until_caught_up() {
        let mut shipper = Shipper::new(CONFIG, point(40, 400));
        let wal = WalExtent { first_lsn: Some(20), checkpoint_lsn: Some(25) };
        assert_eq!(shipper.on_resume(3, wal, 0), Ok(Start::Snapshot { resume_lsn: 25 }));
        assert_eq!(shipper.hold(), Hold { lsn: 25, pinned: true });
        assert_eq!(shipper.next_batch(), None, "no batch before the snapshot is sent");
        assert_eq!(shipper.on_snapshot_sent(1), Ok(25));
        assert_eq!(shipper.next_batch(), Some(25..40));
        shipper.seal(Sealed { first_lsn: 25, next_lsn: 40, last_glt: Some(390) }, 10, 2).unwrap();
        shipper.on_ack(30).unwrap();
        assert_eq!(shipper.hold(), Hold { lsn: 30, pinned: true });
        shipper.on_ack(40).unwrap();
        assert_eq!(shipper.hold(), Hold { lsn: 40, pinned: false }, "caught up: the pin goes");
        let mut lost = Shipper::new(CONFIG, point(40, 400));
        let none = WalExtent { first_lsn: Some(20), checkpoint_lsn: None };
        assert_eq!(lost.on_resume(3, none, 0), Err(ShipError::NothingToInstall { behind: 3 }));
    }

    #[test]
    fn heartbeats_carry_a_newer_promise_after_a_quiet_interval() {
        let mut shipper = Shipper::new(CONFIG, point(5, 100));
        shipper.on_resume(5, WalExtent { first_lsn: Some(1), checkpoint_lsn: None }, 0).unwrap();
        assert_eq!(shipper.heartbeat(1, 20), Some((5, 100)));
        assert_eq!(shipper.heartbeat(1, 25), None, "not again within the interval");
        shipper.on_point(point(5, 150));
        assert_eq!(shipper.deadline_ns(21), Some(30));
        assert_eq!(shipper.deadline_ns(30), None, "due: the next point or ack wakes the shell");
        assert_eq!(shipper.heartbeat(1, 30), Some((5, 150)));
        assert_eq!(shipper.heartbeat(1, 45), None, "the window of two is full");
        shipper.on_ack(5).unwrap();
        shipper.on_point(point(5, 160));
        assert_eq!(shipper.heartbeat(1, 45), Some((5, 160)));
        shipper.on_point(point(4, 90));
        assert_eq!(shipper.point(), point(5, 160), "a point never goes back");
        shipper.on_point(point(7, 155));
        assert_eq!(shipper.point(), point(7, 160), "nor does either part");
    }
}
