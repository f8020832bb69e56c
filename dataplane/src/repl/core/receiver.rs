//! The receiving side of one replication stream, sans-IO: whether a stream is admitted
//! ([`admit`]), what each frame hands the shard ([`Receiver::on_frame`]), and what is
//! acknowledged once the shard made it durable ([`Receiver::on_applied`],
//! [`Receiver::pop_settled`]): in frame order, whatever order the shard answers in.
//!
//! The shell reads frames, passes the clock's bound for stamps from the future (`ahead_limit`,
//! this node's `latest` plus [`AHEAD_US_MAX`]), hands each [`Staged`] work to the shard and
//! reports it done; it writes the acknowledgements, publishes the closed timestamps and
//! persists the positions that the settled frames give.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;
use thiserror::Error;
use wire::glt;
use wire::repl::{self, Entries, Frame, ReplError};

use super::stream::{Accepted, Inbound, ProtocolError};
use crate::repl::ReplConfig;
use crate::repl::codec::{self, CodecError};
use crate::store::op::{self, OpError};

/// How far a shipped stamp may be ahead of this node's clock (`latest`), in µs: a sender
/// stamps at most at its own interval's `latest`, so by more than its interval's width only
/// when a clock is wrong.
pub const AHEAD_US_MAX: u64 = 500_000;

/// What the shard is asked to do with a frame's entries.
#[derive(Debug, PartialEq, Eq)]
pub enum Work {
    /// WAL payloads (store operations, values inline), each with its timestamp at its home, in
    /// log order. They are appended together, so they share WAL barriers.
    Records(Vec<(u64, Bytes)>),
    /// The end of an installed snapshot: its keys. Every key the shard holds outside them was
    /// deleted and collected at the home, and gets a tombstone at `horizon`, the snapshot's
    /// collection horizon.
    SnapshotEnd {
        /// The snapshot's collection horizon.
        horizon: u64,
        /// The snapshot's keys.
        keys: HashSet<Bytes>,
    },
}

/// Why a stream is closed by the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReceiveError {
    /// The bytes are not a frame.
    #[error("bad frame: {0}")]
    Frame(#[from] ReplError),
    /// The frame breaks the stream's protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A body does not decompress.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A frame of a kind that does not belong here.
    #[error("expected {expected}, got {found}")]
    Unexpected {
        /// What could come.
        expected: &'static str,
        /// What came.
        found: &'static str,
    },
    /// A snapshot entry is not a store operation.
    #[error("snapshot entry: {0}")]
    SnapshotEntry(OpError),
    /// A multi-master source shipped a record another region stamped.
    #[error(
        "region {region} shipped a record stamped by origin {found}, not its own {expected}: the nodes disagree on \
         [replication] origins or multi_master"
    )]
    ForeignOrigin {
        /// The source region.
        region: String,
        /// The record's origin.
        found: u8,
        /// The source's.
        expected: u8,
    },
    /// A stamp from the future: a snapshot's horizon from the future would have every key here
    /// tombstoned, a multi-master record's stamp would hold back every local write until the
    /// clock caught up.
    #[error(
        "{what} {stamp} is more than {AHEAD_US_MAX} µs ahead of this node's clock: refused (are the regions' clocks \
         synchronised?)"
    )]
    Ahead {
        /// What carried it.
        what: &'static str,
        /// The timestamp.
        stamp: u64,
    },
}

/// Whether this node takes the stream a `Hello` announces: shard `shard` of region `region`,
/// which has `shards` shards; this node has `local_shards`. The reason when not.
pub fn admit(config: &ReplConfig, local_shards: u32, shard: u32, shards: u32, region: &str) -> Result<(), String> {
    if shards != local_shards {
        return Err(format!("region {region} has {shards} shards, this node {local_shards}"));
    }
    if shard >= local_shards {
        return Err(format!("shard {shard} is not on this node"));
    }
    match config.home_of(shard) {
        Some(_) if config.is_multi_master() => {
            if config.sources_of(shard).contains(&region) {
                Ok(())
            } else {
                Err(format!("region {region} is not a peer of region {}", config.region))
            }
        }
        Some(home) if home == config.region => {
            Err(format!("shard {shard} is homed in region {home}, which takes its writes here and takes no replica"))
        }
        Some(home) if home != region => Err(format!("region {region} is not the home of shard {shard} ({home} is)")),
        Some(_) if !config.replicates(shard) => {
            Err(format!("the placement keeps no replica of shard {shard} in region {}", config.region))
        }
        Some(_) => Ok(()),
        None => Err(format!("shard {shard} has no home region here")),
    }
}

/// What a frame asks of the shard; the shell reports it done with `seq`.
#[derive(Debug, PartialEq, Eq)]
pub struct Staged {
    /// The frame's number on this stream.
    pub seq: u64,
    /// For the shard, in order (none: nothing to apply, already settled).
    pub work: Vec<Work>,
}

/// A frame whose work is durable, in frame order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Records it applied.
    pub records: u64,
    /// The acknowledgement to send, after publishing its closed timestamp and advancing the
    /// position (none for a snapshot part before the last).
    pub ack: Option<Ack>,
    /// Whether it ended an installed snapshot.
    pub installed: bool,
}

/// An acknowledgement: every LSN below `next_lsn` is durable here and `closed_ts` applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// First LSN not durable here.
    pub next_lsn: u64,
    /// The closed timestamp applied.
    pub closed_ts: u64,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    accepted: Accepted,
    install: bool,
    records: u64,
    done: bool,
}

/// Frames staged and not yet settled, at most: the sender's window bounds them well below.
pub const PENDING_FRAMES_MAX: usize = 1 << 16;

/// The receiving side of one admitted stream.
#[derive(Debug)]
pub struct Receiver {
    region: String,
    inbound: Inbound,
    /// With multi-master keyspaces, the origin the source stamps: every record it ships must
    /// carry it, and entries of other origins come empty.
    source_origin: Option<u8>,
    /// Whether the source is the shard's home (only the home's snapshot tombstones the keys
    /// it lacks: another region's may lack keys it has not received yet).
    from_home: bool,
    /// The keys of a snapshot being installed.
    snapshot_keys: Option<HashSet<Bytes>>,
    pending: VecDeque<Pending>,
    next_seq: u64,
}

impl Receiver {
    /// The stream of `shard` from `region`, admitted, resuming at `next_lsn` (the position).
    pub fn new(config: &ReplConfig, shard: u32, region: &str, next_lsn: u64) -> Self {
        Self {
            region: region.to_owned(),
            inbound: Inbound::new(shard, next_lsn),
            source_origin: config.origin_of(region),
            from_home: config.home_of(shard) == Some(region),
            snapshot_keys: None,
            pending: VecDeque::new(),
            next_seq: 0,
        }
    }

    /// Checks one frame (a batch or a snapshot part) and stages what the shard must apply.
    /// `ahead_limit` is the latest physical time (µs) a stamp may have now (`None` while the
    /// clock cannot say).
    pub fn on_frame(&mut self, frame: &[u8], ahead_limit: Option<u64>) -> Result<Staged, ReceiveError> {
        let check_ahead = |stamp: u64, what: &'static str| match ahead_limit {
            Some(limit) if glt::physical_us(stamp) > limit => Err(ReceiveError::Ahead { what, stamp }),
            _ => Ok(()),
        };
        let (frame, _) = repl::decode_frame(frame)?;
        // A batch of WAL records, or a part of a snapshot installed before them: entries
        // either way, applied alike (a version applied twice is one version).
        let (accepted, install, snapshot_end, (codec, body, raw_len, count)) = match frame {
            Frame::Batch(batch) => {
                (self.inbound.accept(&batch)?, false, None, (batch.codec, batch.body, batch.raw_len, batch.count))
            }
            Frame::Install(part) => {
                if part.last {
                    check_ahead(part.horizon, "snapshot horizon")?;
                }
                let end = (part.last && self.from_home).then(|| self.snapshot_horizon(part.horizon));
                (self.inbound.install(&part)?, true, end, (part.codec, part.body, part.raw_len, part.count))
            }
            other => return Err(ReceiveError::Unexpected { expected: "Batch or Install", found: frame_name(&other) }),
        };
        if self.pending.len() >= PENDING_FRAMES_MAX {
            return Err(ReceiveError::Unexpected { expected: "an acknowledgement first", found: "one frame too many" });
        }
        let raw = Bytes::from(codec::decompress(codec, body, raw_len)?);
        let entries = Entries::new(&raw, count)?;
        let mut records = Vec::with_capacity(count as usize);
        for (glt, payload) in entries.iter().skip(accepted.skip as usize) {
            if let Some(expected) = self.source_origin.filter(|_| !install) {
                if payload.is_empty() && glt == 0 {
                    continue; // another region's record, in the source's WAL: not carried here
                }
                if glt::origin_of(glt) != expected {
                    let region = self.region.clone();
                    return Err(ReceiveError::ForeignOrigin { region, found: glt::origin_of(glt), expected });
                }
                check_ahead(glt, "record")?;
            }
            let payload = raw.slice_ref(payload);
            if install && self.from_home {
                let ops = op::decode(&payload).map_err(ReceiveError::SnapshotEntry)?;
                let keys = self.snapshot_keys.get_or_insert_with(HashSet::new);
                keys.extend(ops.into_iter().map(|op| Bytes::copy_from_slice(&op.key)));
            }
            records.push((glt, payload));
        }
        let mut work = Vec::new();
        let record_count = records.len() as u64;
        if !records.is_empty() {
            work.push(Work::Records(records));
        }
        if let Some(horizon) = snapshot_end {
            // The snapshot's end: keys held here and absent from it were deleted and
            // collected at the home; they get a tombstone at its horizon.
            work.push(Work::SnapshotEnd { horizon, keys: self.snapshot_keys.take().unwrap_or_default() });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let done = work.is_empty();
        self.pending.push_back(Pending { seq, accepted, install, records: record_count, done });
        Ok(Staged { seq, work })
    }

    /// The shard made frame `seq`'s work durable (every piece of it).
    pub fn on_applied(&mut self, seq: u64) {
        if let Some(pending) = self.pending.iter_mut().find(|pending| pending.seq == seq) {
            pending.done = true;
        }
    }

    /// The oldest frame, once it and every frame before it are durable. A replica
    /// acknowledges a batch, advances its position and applies its closed timestamp only then,
    /// so a resolved timestamp never covers a write this node could lose in a crash.
    pub fn pop_settled(&mut self) -> Option<Settled> {
        if !self.pending.front().is_some_and(|pending| pending.done) {
            return None;
        }
        let pending = self.pending.pop_front()?;
        let accepted = pending.accepted;
        // A snapshot part before the last is acknowledged with the last.
        let ack = accepted.ack.then_some(Ack { next_lsn: accepted.next_lsn, closed_ts: accepted.closed_ts });
        Some(Settled { records: pending.records, ack, installed: pending.install && accepted.ack })
    }

    /// Frames staged and not settled.
    pub fn unsettled(&self) -> usize {
        self.pending.len()
    }

    /// A snapshot's horizon as this node orders it: with multi-master keyspaces, stamped with
    /// the source's origin (the tombstones are the home's, not shipped on as this region's).
    fn snapshot_horizon(&self, horizon: u64) -> u64 {
        self.source_origin.map_or(horizon, |origin| glt::with_origin(horizon, origin))
    }
}

/// A frame kind's name, for errors.
pub fn frame_name(frame: &Frame<'_>) -> &'static str {
    match frame {
        Frame::Hello { .. } => "Hello",
        Frame::Resume { .. } => "Resume",
        Frame::Batch(_) => "Batch",
        Frame::Ack { .. } => "Ack",
        Frame::Refuse { .. } => "Refuse",
        Frame::Install(_) => "Install",
    }
}

#[cfg(test)]
mod tests {
    use wire::repl::{Batch, Codec, Install};

    use super::*;
    use crate::repl::{Peer, Window};

    fn config(region: &str, homes: &[&str]) -> ReplConfig {
        ReplConfig {
            region: region.into(),
            homes: homes.iter().map(|home| (*home).to_owned()).collect(),
            replicas: None,
            listen: ([127, 0, 0, 1], 0).into(),
            tls_dir: "/nonexistent".into(),
            name: region.into(),
            peers: ["a", "b"]
                .iter()
                .filter(|peer| **peer != region)
                .map(|peer| Peer { region: (*peer).into(), addr: ([127, 0, 0, 1], 1).into(), origin: None })
                .collect(),
            codec: Codec::None,
            batch_bytes_max: 1 << 20,
            window: Window { batches: 8, bytes: 1 << 20 },
            closed_interval: std::time::Duration::from_millis(5),
            quic_window_bytes: 1 << 20,
            wal_hold_bytes_max: 1 << 30,
            multi_master: Vec::new(),
            origin: None,
        }
    }

    fn put(key: &str) -> Vec<u8> {
        let mut out = Vec::new();
        op::encode(std::iter::once((key.as_bytes(), op::Value::Inline(b"v"))), &mut out).unwrap();
        out
    }

    fn batch_frame(first_lsn: u64, records: &[(u64, Vec<u8>)], closed_ts: u64) -> Vec<u8> {
        let mut raw = Vec::new();
        for (glt, payload) in records {
            repl::encode_entry(*glt, payload, &mut raw);
        }
        let count = u32::try_from(records.len()).unwrap();
        let raw_len = u32::try_from(raw.len()).unwrap();
        let batch = Batch { shard: 0, first_lsn, count, closed_ts, codec: Codec::None, raw_len, body: &raw };
        let mut frame = Vec::new();
        repl::encode_frame(&Frame::Batch(batch), &mut frame).unwrap();
        frame
    }

    #[test]
    fn admission_names_why_a_stream_is_refused() {
        let replica = config("b", &["a"]);
        assert_eq!(admit(&replica, 1, 0, 1, "a"), Ok(()));
        assert!(admit(&replica, 1, 0, 2, "a").unwrap_err().contains("2 shards"));
        assert!(admit(&replica, 1, 3, 1, "a").unwrap_err().contains("not on this node"));
        assert!(admit(&replica, 1, 0, 1, "c").unwrap_err().contains("not the home"));
        let home = config("a", &["a"]);
        assert!(admit(&home, 1, 0, 1, "b").unwrap_err().contains("takes its writes here"));
    }

    #[test]
    fn acknowledgements_follow_frame_order_whatever_order_the_shard_answers_in() {
        let mut receiver = Receiver::new(&config("b", &["a"]), 0, "a", 1);
        let first = receiver.on_frame(&batch_frame(1, &[(10, put("x")), (11, put("y"))], 11), None).unwrap();
        let second = receiver.on_frame(&batch_frame(3, &[(12, put("z"))], 12), None).unwrap();
        let heartbeat = receiver.on_frame(&batch_frame(4, &[], 15), None).unwrap();
        assert!(heartbeat.work.is_empty(), "nothing to apply in a heartbeat");
        assert_eq!(first.work.len(), 1);
        receiver.on_applied(second.seq);
        assert_eq!(receiver.pop_settled(), None, "the first frame is not durable yet");
        receiver.on_applied(first.seq);
        let acks: Vec<Option<Ack>> = std::iter::from_fn(|| receiver.pop_settled()).map(|settled| settled.ack).collect();
        assert_eq!(
            acks,
            vec![
                Some(Ack { next_lsn: 3, closed_ts: 11 }),
                Some(Ack { next_lsn: 4, closed_ts: 12 }),
                Some(Ack { next_lsn: 4, closed_ts: 15 }),
            ]
        );
        // A resent overlap is skipped; a gap ends the stream.
        let overlap = receiver.on_frame(&batch_frame(3, &[(12, put("z")), (13, put("w"))], 16), None).unwrap();
        assert!(matches!(&overlap.work[..], [Work::Records(records)] if records.len() == 1 && records[0].0 == 13));
        assert!(matches!(receiver.on_frame(&batch_frame(9, &[], 20), None), Err(ReceiveError::Protocol(_))));
    }

    #[test]
    fn a_snapshot_stages_its_versions_and_its_end_and_refuses_a_horizon_from_the_future() {
        let mut receiver = Receiver::new(&config("b", &["a"]), 0, "a", 1);
        let part = |last: bool, horizon: u64| {
            let mut raw = Vec::new();
            repl::encode_entry(7, &put("k"), &mut raw);
            let raw_len = u32::try_from(raw.len()).unwrap();
            let install =
                Install { shard: 0, resume_lsn: 50, horizon, count: 1, last, codec: Codec::None, raw_len, body: &raw };
            let mut frame = Vec::new();
            repl::encode_frame(&Frame::Install(install), &mut frame).unwrap();
            frame
        };
        let limit = Some(1_000);
        let future = glt::timestamp_at(2_000);
        assert!(matches!(receiver.on_frame(&part(true, future), limit), Err(ReceiveError::Ahead { .. })));
        let mut receiver = Receiver::new(&config("b", &["a"]), 0, "a", 1);
        let staged = receiver.on_frame(&part(false, 0), limit).unwrap();
        assert!(matches!(&staged.work[..], [Work::Records(_)]));
        let last = receiver.on_frame(&part(true, 5), limit).unwrap();
        match &last.work[..] {
            [Work::Records(_), Work::SnapshotEnd { horizon: 5, keys }] => assert!(keys.contains(&b"k"[..])),
            other => panic!("{other:?}"),
        }
        receiver.on_applied(staged.seq);
        receiver.on_applied(last.seq);
        assert_eq!(receiver.pop_settled().and_then(|settled| settled.ack), None, "a part before the last");
        let end = receiver.pop_settled().unwrap();
        assert!(end.installed);
        assert_eq!(end.ack, Some(Ack { next_lsn: 50, closed_ts: 0 }));
    }
}
