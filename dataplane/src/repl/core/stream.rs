//! The window and the acceptance rules of one stream: what the sender may send and what an
//! acknowledgement means ([`Outbound`]), and what the receiver accepts ([`Inbound`]).

use std::collections::VecDeque;

use thiserror::Error;
use wire::repl::{Batch, Install};

/// A peer broke the protocol; the stream is closed and resumes from the last ack.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    /// A batch for another shard than the stream's.
    #[error("batch for shard {found} on the stream of shard {expected}")]
    WrongShard {
        /// The stream's shard.
        expected: u32,
        /// The batch's.
        found: u32,
    },
    /// A batch starts past the next expected LSN: records would be missing.
    #[error("batch starts at LSN {first} but {expected} is next: records missing")]
    Gap {
        /// The next LSN expected.
        expected: u64,
        /// The batch's first LSN.
        first: u64,
    },
    /// A closed timestamp went backwards.
    #[error("closed timestamp went back from {previous} to {found}")]
    ClosedRegressed {
        /// The one applied.
        previous: u64,
        /// The new one.
        found: u64,
    },
    /// A snapshot part where none may come: after a batch or after the last part, or naming
    /// another resume point than the parts before it.
    #[error("snapshot part out of place: {0}")]
    InstallOutOfPlace(&'static str),
    /// An ack for records never sent, or behind an earlier ack.
    #[error("ack of LSN {found} outside the sent window {acked}..={sent}")]
    BadAck {
        /// Acked before.
        acked: u64,
        /// Sent so far.
        sent: u64,
        /// The ack.
        found: u64,
    },
}

/// Bounds of the window of unacknowledged batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Most batches in flight.
    pub batches: usize,
    /// Most body bytes in flight.
    pub bytes: usize,
}

/// The sender's side of one stream.
#[derive(Debug, Clone)]
pub struct Outbound {
    window: Window,
    /// First LSN the receiver has not acknowledged.
    acked: u64,
    /// First LSN not sent.
    next: u64,
    /// Closed timestamp last sent.
    closed_sent: u64,
    /// When a batch was last sent (ns, the shell's monotonic clock).
    sent_at_ns: u64,
    /// (next LSN after the batch, bytes) of each batch in flight.
    inflight: VecDeque<(u64, usize)>,
    inflight_bytes: usize,
}

impl Outbound {
    /// A stream the receiver asked to resume at `next_lsn`.
    pub fn new(window: Window, next_lsn: u64, now_ns: u64) -> Self {
        Self {
            window,
            acked: next_lsn,
            next: next_lsn,
            closed_sent: 0,
            sent_at_ns: now_ns,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
        }
    }

    /// First LSN not sent.
    pub fn next_lsn(&self) -> u64 {
        self.next
    }

    /// First LSN not acknowledged: the WAL must keep it for this peer.
    pub fn acked_lsn(&self) -> u64 {
        self.acked
    }

    /// When a batch was last sent (ns).
    pub fn last_sent_ns(&self) -> u64 {
        self.sent_at_ns
    }

    /// Batches sent and not yet acknowledged (the window's depth).
    pub fn unacked_batches(&self) -> usize {
        self.inflight.len()
    }

    /// Whether another batch fits the window (backpressure when not).
    pub fn has_room(&self) -> bool {
        self.inflight.len() < self.window.batches && self.inflight_bytes < self.window.bytes
    }

    /// The closed timestamp a batch may carry. `last_glt` is the timestamp of its last record
    /// (none for an empty batch); `ends_at_durable` whether it reaches the shard's durable
    /// point, whose promise is `point_closed`. Records are stamped in LSN order, so everything
    /// at or below the last record's timestamp has been sent; past the durable point the
    /// shard's own promise holds. Never below what was sent before.
    pub fn closed_for(&self, last_glt: Option<u64>, ends_at_durable: bool, point_closed: u64) -> u64 {
        let mut closed = self.closed_sent;
        if let Some(glt) = last_glt {
            closed = closed.max(glt);
        }
        if ends_at_durable {
            closed = closed.max(point_closed);
        }
        closed
    }

    /// Whether an empty batch should go out to carry a newer closed timestamp: the stream
    /// has been quiet for `interval_ns` and the promise moved.
    pub fn heartbeat_due(&self, now_ns: u64, interval_ns: u64, point_closed: u64) -> bool {
        point_closed > self.closed_sent && now_ns.saturating_sub(self.sent_at_ns) >= interval_ns && self.has_room()
    }

    /// Records that a batch of LSNs `first..next` with `closed` went out (`bytes` on the wire).
    pub fn sent(&mut self, next: u64, closed: u64, bytes: usize, now_ns: u64) {
        self.next = self.next.max(next);
        self.closed_sent = self.closed_sent.max(closed);
        self.sent_at_ns = now_ns;
        self.inflight.push_back((next, bytes));
        self.inflight_bytes += bytes;
    }

    /// The receiver made every LSN below `next_lsn` durable.
    pub fn on_ack(&mut self, next_lsn: u64) -> Result<(), ProtocolError> {
        if next_lsn < self.acked || next_lsn > self.next {
            return Err(ProtocolError::BadAck { acked: self.acked, sent: self.next, found: next_lsn });
        }
        self.acked = next_lsn;
        // An ack covers every batch ending at or below it; empty batches end where they start.
        while let Some(&(end, bytes)) = self.inflight.front() {
            if end > next_lsn {
                break;
            }
            self.inflight.pop_front();
            self.inflight_bytes -= bytes;
        }
        Ok(())
    }
}

/// What the receiver does with an accepted batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Leading records already applied (a resent overlap): skip them.
    pub skip: u32,
    /// First LSN after the batch: ack it once every record is durable.
    pub next_lsn: u64,
    /// The closed timestamp to apply once every record is durable.
    pub closed_ts: u64,
    /// Whether to acknowledge it (every batch, and a snapshot's last part only).
    pub ack: bool,
}

/// Where a stream is with an installed snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Installing {
    /// Nothing received yet: a snapshot may start.
    Open,
    /// Parts received for a snapshot resuming at this LSN.
    Parts(u64),
    /// A batch or a snapshot's last part came: no more parts.
    Closed,
}

/// The receiver's side of one stream.
#[derive(Debug, Clone)]
pub struct Inbound {
    shard: u32,
    next: u64,
    closed: u64,
    installing: Installing,
}

impl Inbound {
    /// A stream of `shard` resumed at `next_lsn`.
    pub fn new(shard: u32, next_lsn: u64) -> Self {
        Self { shard, next: next_lsn, closed: 0, installing: Installing::Open }
    }

    /// Checks a snapshot part: right shard, before any batch, every part naming the same
    /// resume point. Its entries are applied like records; only the last part is acknowledged,
    /// with the resume point (never below the stream's position), once all parts are durable.
    pub fn install(&mut self, part: &Install<'_>) -> Result<Accepted, ProtocolError> {
        if part.shard != self.shard {
            return Err(ProtocolError::WrongShard { expected: self.shard, found: part.shard });
        }
        match self.installing {
            Installing::Closed => return Err(ProtocolError::InstallOutOfPlace("after the batches began")),
            Installing::Parts(resume) if resume != part.resume_lsn => {
                return Err(ProtocolError::InstallOutOfPlace("another resume point than the parts before"));
            }
            Installing::Open | Installing::Parts(_) => {}
        }
        self.installing = if part.last { Installing::Closed } else { Installing::Parts(part.resume_lsn) };
        if part.last {
            self.next = self.next.max(part.resume_lsn);
        }
        Ok(Accepted { skip: 0, next_lsn: self.next, closed_ts: self.closed, ack: part.last })
    }

    /// Checks a batch against the stream: right shard, no gap, closed timestamp not going back.
    pub fn accept(&mut self, batch: &Batch<'_>) -> Result<Accepted, ProtocolError> {
        if batch.shard != self.shard {
            return Err(ProtocolError::WrongShard { expected: self.shard, found: batch.shard });
        }
        if matches!(self.installing, Installing::Parts(_)) {
            return Err(ProtocolError::InstallOutOfPlace("a batch before the snapshot's last part"));
        }
        self.installing = Installing::Closed;
        if batch.first_lsn > self.next {
            return Err(ProtocolError::Gap { expected: self.next, first: batch.first_lsn });
        }
        if batch.closed_ts < self.closed {
            return Err(ProtocolError::ClosedRegressed { previous: self.closed, found: batch.closed_ts });
        }
        let skip = self.next.min(batch.next_lsn()) - batch.first_lsn;
        self.next = self.next.max(batch.next_lsn());
        self.closed = batch.closed_ts;
        Ok(Accepted {
            skip: u32::try_from(skip).unwrap_or(u32::MAX),
            next_lsn: self.next,
            closed_ts: self.closed,
            ack: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use wire::repl::Codec;

    use super::*;

    fn batch(shard: u32, first_lsn: u64, count: u32, closed_ts: u64) -> Batch<'static> {
        Batch { shard, first_lsn, count, closed_ts, codec: Codec::None, raw_len: 0, body: &[] }
    }

    #[test]
    fn the_window_fills_and_acks_free_it() {
        let mut out = Outbound::new(Window { batches: 2, bytes: 1000 }, 10, 0);
        assert!(out.has_room());
        out.sent(15, 100, 10, 1);
        out.sent(20, 200, 10, 2);
        assert!(!out.has_room(), "two batches fill a window of two");
        assert_eq!(out.on_ack(15), Ok(()));
        assert!(out.has_room());
        assert_eq!(out.acked_lsn(), 15);
        assert!(matches!(out.on_ack(14), Err(ProtocolError::BadAck { .. })), "acks never go back");
        assert!(matches!(out.on_ack(21), Err(ProtocolError::BadAck { .. })), "nothing past what was sent");
        let mut bytes = Outbound::new(Window { batches: 10, bytes: 100 }, 0, 0);
        bytes.sent(1, 1, 150, 0);
        assert!(!bytes.has_room(), "the byte bound holds too");
    }

    #[test]
    fn closed_timestamps_never_go_back_and_only_cover_what_was_sent() {
        let mut out = Outbound::new(Window { batches: 8, bytes: 1 << 20 }, 1, 0);
        // A batch stopping before the durable point promises only its last record's stamp.
        assert_eq!(out.closed_for(Some(50), false, 90), 50);
        assert_eq!(out.closed_for(Some(50), true, 90), 90);
        out.sent(5, 90, 1, 0);
        assert_eq!(out.closed_for(None, true, 80), 90, "never below what was sent");
        assert!(!out.heartbeat_due(10, 5, 90), "nothing new to promise");
        assert!(out.heartbeat_due(10, 5, 95));
        assert!(!out.heartbeat_due(3, 5, 95), "not before the interval");
    }

    /// What a batch accepted by the receiver gives.
    fn batch_taken(skip: u32, next_lsn: u64, closed_ts: u64) -> Result<Accepted, ProtocolError> {
        Ok(Accepted { skip, next_lsn, closed_ts, ack: true })
    }

    #[test]
    fn the_receiver_skips_overlap_and_refuses_gaps() {
        let mut inbound = Inbound::new(3, 10);
        assert_eq!(inbound.accept(&batch(3, 10, 5, 7)), batch_taken(0, 15, 7));
        assert_eq!(inbound.accept(&batch(3, 12, 5, 9)), batch_taken(3, 17, 9));
        assert_eq!(inbound.accept(&batch(3, 11, 2, 9)), batch_taken(2, 17, 9));
        assert_eq!(inbound.accept(&batch(3, 17, 0, 12)), batch_taken(0, 17, 12));
        assert_eq!(inbound.accept(&batch(3, 19, 1, 13)), Err(ProtocolError::Gap { expected: 17, first: 19 }));
        assert_eq!(inbound.accept(&batch(2, 17, 1, 13)), Err(ProtocolError::WrongShard { expected: 3, found: 2 }));
        assert_eq!(
            inbound.accept(&batch(3, 17, 1, 11)),
            Err(ProtocolError::ClosedRegressed { previous: 12, found: 11 })
        );
    }

    fn part(shard: u32, resume_lsn: u64, last: bool) -> Install<'static> {
        Install { shard, resume_lsn, horizon: 0, count: 0, last, codec: Codec::None, raw_len: 0, body: &[] }
    }

    #[test]
    fn a_snapshot_moves_the_stream_to_its_resume_point_at_its_last_part_only() {
        let mut inbound = Inbound::new(3, 10);
        let quiet = Accepted { skip: 0, next_lsn: 10, closed_ts: 0, ack: false };
        assert_eq!(inbound.install(&part(3, 500, false)), Ok(quiet));
        assert_eq!(inbound.install(&part(3, 500, false)), Ok(quiet));
        assert!(matches!(inbound.install(&part(3, 400, false)), Err(ProtocolError::InstallOutOfPlace(_))));
        assert!(matches!(inbound.accept(&batch(3, 500, 1, 1)), Err(ProtocolError::InstallOutOfPlace(_))));
        assert_eq!(inbound.install(&part(3, 500, true)), batch_taken(0, 500, 0));
        assert!(matches!(inbound.install(&part(3, 500, true)), Err(ProtocolError::InstallOutOfPlace(_))));
        assert_eq!(inbound.accept(&batch(3, 500, 2, 9)), batch_taken(0, 502, 9));
        // A snapshot behind the stream's position does not move it back; none after a batch;
        // none for another shard.
        let mut ahead = Inbound::new(3, 800);
        assert_eq!(ahead.install(&part(3, 500, true)).map(|a| a.next_lsn), Ok(800));
        let mut started = Inbound::new(3, 10);
        started.accept(&batch(3, 10, 1, 1)).unwrap();
        assert!(matches!(started.install(&part(3, 500, true)), Err(ProtocolError::InstallOutOfPlace(_))));
        assert!(matches!(Inbound::new(3, 1).install(&part(4, 5, true)), Err(ProtocolError::WrongShard { .. })));
    }
}
