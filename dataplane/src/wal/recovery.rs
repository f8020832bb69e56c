//! Recovery: what the bytes of a shard's segments say, decided without I/O.
//!
//! [`plan`] reads every segment's bytes and returns either a [`RecoveryPlan`] (the valid
//! extent of each segment, the next LSN, and which torn tail to erase) or a
//! [`RecoveryError`] that names the segment, the offset and what was wrong.
//!
//! Torn tail versus corruption: the writer keeps at most one batch in flight and writes
//! batches in order, so after a crash only the last batch can be incomplete. A damaged batch
//! is therefore a torn tail only when nothing valid was written after it: no later
//! `BatchBegin` in its segment with a larger LSN and no later segment in use. Anything else is
//! corruption. (A bit flip in the very last, acknowledged batch looks the same as a torn
//! write; only a replica can tell, see ARCHITECTURE.md.)
//!
//! A reused segment (a released file renamed, not zero-filled) holds stale batches of its
//! earlier use after the log's end. Every `BatchBegin` names its segment, so the end is the
//! first place without a batch of this segment; what lies there (stale bytes, or the unwritten
//! start of a batch torn by a crash) was never acknowledged. A renamed file whose new header
//! was never written still carries its old header: as the last file it is unused.

use std::fmt;

use super::format::{
    BATCH_BEGIN_BYTES, BatchBegin, SECTOR_BYTES, SegmentHeader, SegmentHeaderError, SegmentSeal, align_up,
};
use wire::{DecodeError, HEADER_BYTES, RecordType};

/// How recovery treats damaged bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Erase a torn last batch (never acknowledged, as its barrier did not complete) and go
    /// on; damage anywhere before the tail is a [`RecoveryError::Corruption`].
    #[default]
    TolerateTornTail,
    /// Any damaged byte, the tail included, is an error. For audits and tests.
    Strict,
}

/// What was wrong at a place in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// A record failed to decode.
    Record(DecodeError),
    /// A valid record of an unexpected type.
    UnexpectedRecord(RecordType),
    /// The sequence of LSNs has a hole or goes backwards.
    LsnGap {
        /// LSN expected here.
        expected: u64,
        /// LSN found.
        found: u64,
    },
    /// A `BatchBegin` whose extent or count cannot be right.
    BadBatch {
        /// Records announced.
        record_count: u32,
        /// Extent announced.
        extent_bytes: u32,
    },
    /// The records of a batch do not fill its announced extent.
    ExtentMismatch {
        /// Extent announced.
        extent_bytes: u32,
        /// Extent the records take.
        actual_bytes: usize,
    },
    /// Zeros where a batch should start, with non-zero bytes after them.
    MissingBatchStart,
    /// A `BatchBegin` that names another segment where this segment's next batch starts.
    ForeignBatch {
        /// The segment being scanned.
        expected: u64,
        /// The segment the batch names.
        found: u64,
    },
    /// The segment header is not valid.
    SegmentHeader(String),
    /// The segment header names another shard, sequence or size than the file.
    SegmentMismatch(String),
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Record(error) => write!(f, "{error}"),
            Self::UnexpectedRecord(kind) => write!(f, "unexpected {kind:?} record"),
            Self::LsnGap { expected, found } => write!(f, "LSN gap: expected {expected}, found {found}"),
            Self::BadBatch { record_count, extent_bytes } => {
                write!(f, "invalid batch: {record_count} records in {extent_bytes} bytes")
            }
            Self::ExtentMismatch { extent_bytes, actual_bytes } => {
                write!(f, "batch extent {extent_bytes} bytes but its records take {actual_bytes}")
            }
            Self::MissingBatchStart => write!(f, "zeros where a batch starts, data after them"),
            Self::ForeignBatch { expected, found } => {
                write!(f, "a batch of segment {found} where segment {expected} continues")
            }
            Self::SegmentHeader(reason) => write!(f, "bad segment header: {reason}"),
            Self::SegmentMismatch(reason) => write!(f, "segment header mismatch: {reason}"),
        }
    }
}

/// Recovery stopped: the log cannot be trusted without help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    /// Damaged bytes before the tail of the log.
    #[error("WAL corruption in segment {segment_seq} at offset {offset}: {damage}")]
    Corruption {
        /// Sequence of the damaged segment.
        segment_seq: u64,
        /// Byte offset of the damaged batch or record in the segment file.
        offset: u64,
        /// What was wrong.
        damage: Damage,
    },
    /// Damaged last batch while recovering in [`RecoveryMode::Strict`].
    #[error("WAL torn tail in segment {segment_seq} at offset {offset} (strict recovery): {damage}")]
    TornTailStrict {
        /// Sequence of the segment.
        segment_seq: u64,
        /// Byte offset of the torn batch.
        offset: u64,
        /// What was wrong.
        damage: Damage,
    },
    /// The segment sequence numbers have a hole.
    #[error("WAL segment {missing} is missing between {before} and {after}")]
    MissingSegment {
        /// The first missing sequence.
        missing: u64,
        /// The segment before the hole.
        before: u64,
        /// The segment after the hole.
        after: u64,
    },
}

/// A segment found on disk, as the shell hands it to [`plan`].
#[derive(Debug, Clone, Copy)]
pub struct SegmentBytes<'a> {
    /// Sequence from the file name.
    pub segment_seq: u64,
    /// The whole file.
    pub bytes: &'a [u8],
}

/// The valid part of a segment in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidSegment {
    /// Its sequence.
    pub segment_seq: u64,
    /// LSN of its first record.
    pub first_lsn: u64,
    /// LSN after its last valid record.
    pub end_lsn: u64,
    /// Offset where the next batch goes (the end of the last valid batch).
    pub frontier: u64,
    /// File size.
    pub segment_bytes: u64,
    /// It ends with a `SegmentSeal` (its tail was cut): nothing more is appended to it.
    pub sealed: bool,
}

/// Bytes to overwrite with zeros before the WAL takes writes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// The segment holding the torn batch.
    pub segment_seq: u64,
    /// Start of the torn batch (sector aligned).
    pub offset: u64,
    /// Bytes to zero from `offset` (sector aligned, covers every non-zero byte after it).
    pub zero_bytes: u64,
}

/// The outcome of a successful recovery scan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecoveryPlan {
    /// Segments in use, in order.
    pub segments: Vec<ValidSegment>,
    /// Segments never used (all-zero header) or whose header write was torn: to delete.
    pub unused: Vec<u64>,
    /// The torn batch to erase, if any.
    pub torn_tail: Option<TornTail>,
    /// The LSN the next append gets.
    pub next_lsn: u64,
    /// Where the epoch its batches name changes: `(epoch, first LSN)`, from the first valid
    /// batch on (a replica-set member's log shape).
    pub epochs: Vec<(u64, u64)>,
}

impl RecoveryPlan {
    /// The highest segment sequence on disk (every scanned file is in use or unused).
    pub fn last_segment_seq(&self) -> Option<u64> {
        let in_use = self.segments.last().map(|segment| segment.segment_seq);
        in_use.max(self.unused.iter().copied().max())
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|byte| *byte == 0)
}

/// Checks one batch (of segment `segment_seq` when given): its `BatchBegin`, extent and the
/// payload bytes of its records. On damage returns the offset of the bad record and what was
/// wrong.
pub(crate) fn scan_batch(
    segment: &[u8],
    offset: usize,
    expected_lsn: u64,
    segment_seq: Option<u64>,
    payload_bytes_max: u32,
) -> Result<(BatchBegin, usize, u64), (usize, Damage)> {
    let begin = match BatchBegin::decode(&segment[offset..]) {
        Ok(Some(begin)) => begin,
        Ok(None) => {
            let kind = wire::decode_header(&segment[offset..], u32::MAX)
                .map(|header| header.record_type)
                .unwrap_or(RecordType::Data);
            return Err((offset, Damage::UnexpectedRecord(kind)));
        }
        Err(error) => return Err((offset, Damage::Record(error))),
    };
    if let Some(expected) = segment_seq
        && begin.segment_seq != expected
    {
        return Err((offset, Damage::ForeignBatch { expected, found: begin.segment_seq }));
    }
    if begin.first_lsn != expected_lsn {
        return Err((offset, Damage::LsnGap { expected: expected_lsn, found: begin.first_lsn }));
    }
    let extent = begin.extent_bytes as usize;
    if begin.record_count == 0
        || extent < SECTOR_BYTES
        || !extent.is_multiple_of(SECTOR_BYTES)
        || offset + extent > segment.len()
    {
        return Err((offset, Damage::BadBatch { record_count: begin.record_count, extent_bytes: begin.extent_bytes }));
    }
    let batch = &segment[offset..offset + extent];
    let (mut position, mut payload_bytes) = (BATCH_BEGIN_BYTES, 0);
    for index in 0..begin.record_count {
        let (record, used) = wire::decode(&batch[position..], payload_bytes_max)
            .map_err(|error| (offset + position, Damage::Record(error)))?;
        if record.record_type != RecordType::Data {
            return Err((offset + position, Damage::UnexpectedRecord(record.record_type)));
        }
        let lsn = begin.first_lsn + u64::from(index);
        if record.seq != lsn {
            return Err((offset + position, Damage::LsnGap { expected: lsn, found: record.seq }));
        }
        position += used;
        payload_bytes += record.payload.len() as u64;
    }
    if align_up(position) != extent {
        return Err((offset, Damage::ExtentMismatch { extent_bytes: begin.extent_bytes, actual_bytes: position }));
    }
    Ok((begin, extent, payload_bytes))
}

/// How the scan of one segment ended.
enum SegmentEnd {
    /// Zeros (or the end of the file) where the next batch would start.
    Clean,
    /// This segment's seal where the next batch would start: the log goes on in the next
    /// segment, whatever follows the seal here is stale.
    Sealed,
    /// Damage at `offset`; `later_data` says whether a valid batch follows it.
    Damaged { offset: usize, record_offset: usize, damage: Damage, later_data: bool, nonzero_end: usize },
}

/// Whether a sector after `offset` starts a batch of segment `segment_seq` at or after `lsn`:
/// evidence that damage at `offset` is not the log's tail.
fn later_batch(segment: &[u8], offset: usize, segment_seq: u64, lsn: u64) -> bool {
    (offset + SECTOR_BYTES..segment.len()).step_by(SECTOR_BYTES).any(|later| {
        matches!(BatchBegin::decode(&segment[later..]),
            Ok(Some(begin)) if begin.first_lsn >= lsn && begin.segment_seq == segment_seq)
    })
}

fn scan_segment(
    segment: &[u8],
    header: &SegmentHeader,
    payload_bytes_max: u32,
    epochs: &mut Vec<(u64, u64)>,
) -> (u64, usize, SegmentEnd) {
    let mut lsn = header.first_lsn;
    let mut offset = SECTOR_BYTES;
    loop {
        if offset + BATCH_BEGIN_BYTES > segment.len() {
            return (lsn, offset, SegmentEnd::Clean);
        }
        if SegmentSeal::decode(&segment[offset..])
            .is_some_and(|seal| seal.segment_seq == header.segment_seq && seal.next_lsn == lsn)
        {
            return (lsn, offset, SegmentEnd::Sealed);
        }
        let begin = BatchBegin::decode(&segment[offset..]);
        let ours = matches!(begin, Ok(Some(begin)) if begin.segment_seq == header.segment_seq);
        if header.reused && !ours && !later_batch(segment, offset, header.segment_seq, lsn) {
            // Stale bytes of the file's earlier use, or the unwritten start of a torn batch.
            return (lsn, offset, SegmentEnd::Clean);
        }
        let damaged = if is_zero(&segment[offset..offset + HEADER_BYTES]) {
            if is_zero(&segment[offset..]) {
                return (lsn, offset, SegmentEnd::Clean);
            }
            (offset, Damage::MissingBatchStart)
        } else {
            match scan_batch(segment, offset, lsn, Some(header.segment_seq), payload_bytes_max) {
                Ok((begin, extent, _)) => {
                    if epochs.last().is_none_or(|(epoch, _)| *epoch != begin.epoch) {
                        epochs.push((begin.epoch, lsn));
                    }
                    lsn += u64::from(begin.record_count);
                    offset += extent;
                    continue;
                }
                Err(damaged) => damaged,
            }
        };
        let later_data = later_batch(segment, offset, header.segment_seq, lsn);
        // A fresh file is zeros past the tail: erase every non-zero byte. A reused one keeps
        // stale bytes there: erase the torn batch's announced extent.
        let nonzero_end = match begin {
            Ok(Some(begin)) if header.reused => {
                align_up((offset + begin.extent_bytes as usize).min(segment.len())).min(segment.len())
            }
            _ if header.reused => (offset + SECTOR_BYTES).min(segment.len()),
            _ => {
                segment[offset..].iter().rposition(|byte| *byte != 0).map_or(offset, |last| align_up(offset + last + 1))
            }
        };
        let (record_offset, damage) = damaged;
        return (lsn, offset, SegmentEnd::Damaged { offset, record_offset, damage, later_data, nonzero_end });
    }
}

/// Segment files must follow each other by sequence: a hole is a lost file.
fn check_contiguous(segments: &[SegmentBytes<'_>]) -> Result<(), RecoveryError> {
    for pair in segments.windows(2) {
        if pair[1].segment_seq != pair[0].segment_seq + 1 {
            return Err(RecoveryError::MissingSegment {
                missing: pair[0].segment_seq + 1,
                before: pair[0].segment_seq,
                after: pair[1].segment_seq,
            });
        }
    }
    Ok(())
}

/// What a decoded header says that does not match its file, if anything.
fn header_mismatch(header: &SegmentHeader, segment: &SegmentBytes<'_>, shard_id: u32) -> Option<String> {
    if header.shard_id != shard_id {
        Some(format!("shard {} in a file of shard {shard_id}", header.shard_id))
    } else if header.segment_seq != segment.segment_seq {
        Some(format!("sequence {} in file {}", header.segment_seq, segment.segment_seq))
    } else if !header.segment_bytes.is_multiple_of(SECTOR_BYTES as u64) {
        Some(format!("size {} is not a multiple of {SECTOR_BYTES}", header.segment_bytes))
    } else if header.segment_bytes != segment.bytes.len() as u64 {
        Some(format!("size {} in a file of {} bytes", header.segment_bytes, segment.bytes.len()))
    } else {
        None
    }
}

/// Decides what the segments of `shard_id` hold. `segments` must be sorted by sequence.
pub fn plan(
    shard_id: u32,
    segments: &[SegmentBytes<'_>],
    mode: RecoveryMode,
    payload_bytes_max: u32,
) -> Result<RecoveryPlan, RecoveryError> {
    check_contiguous(segments)?;
    let header_in_use =
        |segment: &SegmentBytes<'_>| segment.bytes.len() >= SECTOR_BYTES && !is_zero(&segment.bytes[..SECTOR_BYTES]);
    // A released file renamed for reuse whose own header never reached the disk still names
    // its older sequence. Nothing in it was acknowledged (an acknowledged batch's fdatasync
    // covers the header written before it), so it does not count as in use.
    let renamed_unused = |segment: &SegmentBytes<'_>| {
        SegmentHeader::decode(segment.bytes)
            .is_ok_and(|header| header.shard_id == shard_id && header.segment_seq < segment.segment_seq)
    };
    let last_in_use = segments.iter().rposition(|segment| header_in_use(segment) && !renamed_unused(segment));
    let mut plan = RecoveryPlan { next_lsn: 1, ..RecoveryPlan::default() };
    let mut expected_lsn: Option<u64> = None;
    for (index, segment) in segments.iter().enumerate() {
        let later_in_use = last_in_use.is_some_and(|last| last > index);
        let corruption = |offset: usize, damage: Damage| RecoveryError::Corruption {
            segment_seq: segment.segment_seq,
            offset: offset as u64,
            damage,
        };
        if !header_in_use(segment) {
            if later_in_use {
                return Err(corruption(0, Damage::SegmentHeader("unused segment before used ones".into())));
            }
            plan.unused.push(segment.segment_seq);
            continue;
        }
        let header = match SegmentHeader::decode(segment.bytes) {
            Ok(header) => header,
            // Another layout is never taken for a torn header (and deleted).
            Err(error @ SegmentHeaderError::UnsupportedFormat(_)) => {
                return Err(corruption(0, Damage::SegmentHeader(error.to_string())));
            }
            Err(error) => {
                // A header is written together with the first batch of a new segment: torn
                // only if that batch was never acknowledged, i.e. nothing follows.
                let damage = Damage::SegmentHeader(error.to_string());
                if later_in_use {
                    return Err(corruption(0, damage));
                }
                if mode == RecoveryMode::Strict {
                    return Err(RecoveryError::TornTailStrict { segment_seq: segment.segment_seq, offset: 0, damage });
                }
                plan.unused.push(segment.segment_seq);
                continue;
            }
        };
        if header.shard_id == shard_id && header.segment_seq < segment.segment_seq && !later_in_use {
            // Renamed for reuse; its own header never reached the disk, so neither did an
            // acknowledged batch (batches of its own sequence may have: unacknowledged).
            plan.unused.push(segment.segment_seq);
            continue;
        }
        if let Some(reason) = header_mismatch(&header, segment, shard_id) {
            return Err(corruption(0, Damage::SegmentMismatch(reason)));
        }
        if let Some(expected) = expected_lsn
            && header.first_lsn != expected
        {
            return Err(corruption(0, Damage::LsnGap { expected, found: header.first_lsn }));
        }
        let (end_lsn, frontier, end) = scan_segment(segment.bytes, &header, payload_bytes_max, &mut plan.epochs);
        let sealed = matches!(end, SegmentEnd::Sealed);
        if let SegmentEnd::Damaged { offset, record_offset, damage, later_data, nonzero_end } = end {
            if later_data || later_in_use {
                return Err(corruption(record_offset, damage));
            }
            if mode == RecoveryMode::Strict {
                return Err(RecoveryError::TornTailStrict {
                    segment_seq: segment.segment_seq,
                    offset: record_offset as u64,
                    damage,
                });
            }
            plan.torn_tail = Some(TornTail {
                segment_seq: segment.segment_seq,
                offset: offset as u64,
                zero_bytes: (nonzero_end - offset) as u64,
            });
        }
        plan.segments.push(ValidSegment {
            segment_seq: segment.segment_seq,
            first_lsn: header.first_lsn,
            end_lsn,
            frontier: frontier as u64,
            segment_bytes: header.segment_bytes,
            sealed,
        });
        expected_lsn = Some(end_lsn);
        plan.next_lsn = end_lsn;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::format::{BatchBuilder, BatchLimits};
    use proptest::prelude::*;

    const SEGMENT_BYTES: usize = 16 * SECTOR_BYTES;

    /// A segment image holding `batches` (payload lengths per batch), starting at `first_lsn`.
    fn image(segment_seq: u64, first_lsn: u64, batches: &[Vec<usize>]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = vec![0_u8; SEGMENT_BYTES];
        let starts = write_image(&mut bytes, segment_seq, first_lsn, false, batches);
        (bytes, starts)
    }

    /// Writes a header and `batches` over `bytes` (a fresh or a reused file's image).
    fn write_image(
        bytes: &mut [u8],
        segment_seq: u64,
        first_lsn: u64,
        reused: bool,
        batches: &[Vec<usize>],
    ) -> Vec<usize> {
        bytes[..SECTOR_BYTES].fill(0);
        SegmentHeader { shard_id: 0, segment_seq, first_lsn, segment_bytes: SEGMENT_BYTES as u64, reused }
            .encode_into(&mut bytes[..SECTOR_BYTES])
            .unwrap();
        let mut offset = SECTOR_BYTES;
        let mut lsn = first_lsn;
        let mut starts = Vec::new();
        for lengths in batches {
            let mut builder = BatchBuilder::new(lsn, BatchLimits { bytes_max: 4 * SECTOR_BYTES, records_max: 100 });
            let mut records = Vec::new();
            for length in lengths {
                let slot = builder.reserve(*length).unwrap();
                let payload = vec![(slot.lsn % 251) as u8; *length];
                records.push((slot, payload));
            }
            let (mut begin, extent) = builder.seal();
            begin.segment_seq = segment_seq;
            bytes[offset..offset + extent].fill(0);
            bytes[offset..offset + BATCH_BEGIN_BYTES].copy_from_slice(&begin.encode());
            for (slot, payload) in records {
                wire::encode_into(&mut bytes[offset + slot.offset..], RecordType::Data, 7, slot.lsn, &payload).unwrap();
            }
            starts.push(offset);
            offset += extent;
            lsn = builder.next_lsn();
        }
        starts
    }

    /// A file used as segment 1 to its end, then reused as segment 5 for `batches` from LSN 500.
    fn reused_image(batches: &[Vec<usize>]) -> (Vec<u8>, Vec<usize>) {
        let old: Vec<Vec<usize>> = (0..7).map(|_| vec![3000, 3000]).collect();
        let (mut bytes, _) = image(1, 1, &old);
        let starts = write_image(&mut bytes, 5, 500, true, batches);
        (bytes, starts)
    }

    fn at(segment_seq: u64, bytes: &[u8], mode: RecoveryMode) -> Result<RecoveryPlan, RecoveryError> {
        plan(0, &[SegmentBytes { segment_seq, bytes }], mode, 1 << 16)
    }

    #[test]
    fn a_seal_ends_its_segment_and_hides_the_batches_after_it() {
        use crate::wal::format::SegmentSeal;
        let (mut bytes, starts) = image(3, 100, &[vec![500], vec![500, 500], vec![500], vec![500]]);
        let full = at(3, &bytes, RecoveryMode::Strict).unwrap();
        assert_eq!((full.next_lsn, full.segments[0].sealed), (105, false));
        // The tail from the third batch (LSN 103) cut: a seal where it started.
        let seal = SegmentSeal { segment_seq: 3, next_lsn: 103 }.encode_sector();
        bytes[starts[2]..starts[2] + SECTOR_BYTES].copy_from_slice(&seal);
        let cut = at(3, &bytes, RecoveryMode::Strict).unwrap();
        assert_eq!((cut.next_lsn, cut.segments[0].sealed, cut.torn_tail), (103, true, None));
        assert_eq!(cut.segments[0].frontier as usize, starts[2]);
        // The next segment goes on from the seal; one that does not is a gap.
        let (next, _) = image(4, 103, &[vec![500]]);
        let both = plan(
            0,
            &[SegmentBytes { segment_seq: 3, bytes: &bytes }, SegmentBytes { segment_seq: 4, bytes: &next }],
            RecoveryMode::Strict,
            1 << 16,
        )
        .unwrap();
        assert_eq!(both.next_lsn, 104);
        let (wrong, _) = image(4, 105, &[vec![500]]);
        assert!(
            plan(
                0,
                &[SegmentBytes { segment_seq: 3, bytes: &bytes }, SegmentBytes { segment_seq: 4, bytes: &wrong }],
                RecoveryMode::Strict,
                1 << 16
            )
            .is_err()
        );
        // A seal of another segment (a reused file's past) or at another LSN is not ours.
        let stale = SegmentSeal { segment_seq: 2, next_lsn: 103 }.encode_sector();
        bytes[starts[2]..starts[2] + SECTOR_BYTES].copy_from_slice(&stale);
        assert!(!at(3, &bytes, RecoveryMode::TolerateTornTail).is_ok_and(|plan| plan.segments[0].sealed));
    }

    #[test]
    fn a_reused_segment_ends_where_its_own_batches_end() {
        // Same shapes as the old batches, so new batches end where stale ones begin.
        let (bytes, starts) = reused_image(&[vec![3000, 3000], vec![3000, 3000]]);
        let recovered = at(5, &bytes, RecoveryMode::Strict).unwrap();
        assert_eq!(recovered.next_lsn, 504);
        assert_eq!(recovered.torn_tail, None);
        assert_eq!(recovered.segments[0].frontier as usize, starts[1] + 2 * SECTOR_BYTES);
        // Other shapes: the end falls inside a stale batch.
        let (bytes, starts) = reused_image(&[vec![1000, 1000], vec![1000, 1000]]);
        let recovered = at(5, &bytes, RecoveryMode::Strict).unwrap();
        assert_eq!((recovered.next_lsn, recovered.segments[0].frontier as usize), (504, starts[1] + SECTOR_BYTES));
    }

    #[test]
    fn a_torn_batch_in_a_reused_segment_is_erased_to_its_extent() {
        let (clean, starts) = reused_image(&[vec![100], vec![3000, 3000, 3000]]);
        let (stale, _) = reused_image(&[]);
        for tear in [starts[1] + 100, starts[1] + SECTOR_BYTES, starts[1] + 2 * SECTOR_BYTES + 7] {
            let mut torn = clean.clone();
            // The write stopped at `tear`: the old bytes are still there after it.
            torn[tear..].copy_from_slice(&stale[tear..]);
            let recovered = at(5, &torn, RecoveryMode::TolerateTornTail).unwrap();
            assert_eq!(recovered.next_lsn, 501, "tear at {tear}");
            assert_eq!(
                recovered.torn_tail,
                Some(TornTail { segment_seq: 5, offset: starts[1] as u64, zero_bytes: 3 * SECTOR_BYTES as u64 }),
                "tear at {tear}"
            );
            assert!(matches!(at(5, &torn, RecoveryMode::Strict), Err(RecoveryError::TornTailStrict { .. })));
        }
        // The batch's first sector never written: stale bytes where it starts, nothing to erase.
        let mut torn = clean.clone();
        torn[starts[1]..starts[1] + SECTOR_BYTES].copy_from_slice(&stale[starts[1]..starts[1] + SECTOR_BYTES]);
        let recovered = at(5, &torn, RecoveryMode::Strict).unwrap();
        assert_eq!((recovered.next_lsn, recovered.torn_tail), (501, None));
    }

    #[test]
    fn damage_before_later_batches_of_a_reused_segment_is_corruption() {
        let (bytes, starts) = reused_image(&[vec![100], vec![100], vec![100]]);
        let mut damaged = bytes.clone();
        damaged[starts[1] + 3] ^= 1;
        for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTornTail] {
            let error = at(5, &damaged, mode).unwrap_err();
            assert!(
                matches!(error, RecoveryError::Corruption { segment_seq: 5, offset, .. } if offset as usize == starts[1]),
                "{error:?}"
            );
        }
    }

    #[test]
    fn an_older_wal_format_is_a_named_error_never_an_unused_file() {
        // A format-1 header: a 32-byte payload (shard, format 1, sequence, first LSN, size).
        let mut bytes = vec![0_u8; SEGMENT_BYTES];
        let mut payload = Vec::new();
        payload.extend_from_slice(&0_u32.to_le_bytes());
        payload.extend_from_slice(&1_u32.to_le_bytes());
        payload.extend_from_slice(&1_u64.to_le_bytes());
        payload.extend_from_slice(&1_u64.to_le_bytes());
        payload.extend_from_slice(&(SEGMENT_BYTES as u64).to_le_bytes());
        wire::encode_into(&mut bytes, RecordType::SegmentHeader, 0, 1, &payload).unwrap();
        for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTornTail] {
            let error = one(&bytes, mode).unwrap_err();
            assert!(error.to_string().contains("unsupported WAL format 1"), "{error}");
        }
    }

    #[test]
    fn a_renamed_spare_after_the_active_segment_leaves_its_torn_tail_a_torn_tail() {
        let (mut active, starts) = image(5, 1, &[vec![100], vec![3000, 3000]]);
        active[starts[1] + 100..].fill(0);
        let (spare, _) = image(1, 1, &[vec![100]]);
        let segments =
            [SegmentBytes { segment_seq: 5, bytes: &active }, SegmentBytes { segment_seq: 6, bytes: &spare }];
        let recovered = plan(0, &segments, RecoveryMode::TolerateTornTail, 1 << 16).unwrap();
        assert_eq!((recovered.next_lsn, recovered.unused.clone()), (2, vec![6]));
        assert_eq!(recovered.torn_tail.map(|tail| (tail.segment_seq, tail.offset as usize)), Some((5, starts[1])));
    }

    #[test]
    fn a_renamed_file_whose_batches_reached_the_disk_before_its_header_is_unused_when_last() {
        // The first batch's sectors persisted, the header's did not (no fdatasync completed).
        let (mut bytes, _) = reused_image(&[vec![100], vec![200]]);
        let (old, _) = image(1, 1, &[]);
        bytes[..SECTOR_BYTES].copy_from_slice(&old[..SECTOR_BYTES]);
        let recovered = at(5, &bytes, RecoveryMode::Strict).unwrap();
        assert_eq!((recovered.unused.clone(), recovered.segments.len()), (vec![5], 0));
    }

    #[test]
    fn a_renamed_file_whose_new_header_was_never_written_is_unused() {
        let (stale, _) = image(1, 1, &[vec![100], vec![200]]);
        let recovered = at(5, &stale, RecoveryMode::Strict).unwrap();
        assert_eq!((recovered.unused.clone(), recovered.segments.len()), (vec![5], 0));
        // Before a segment in use, the same file is corruption.
        let (used, _) = image(6, 1, &[vec![100]]);
        let segments = [SegmentBytes { segment_seq: 5, bytes: &stale }, SegmentBytes { segment_seq: 6, bytes: &used }];
        assert!(matches!(
            plan(0, &segments, RecoveryMode::TolerateTornTail, 1 << 16),
            Err(RecoveryError::Corruption { segment_seq: 5, .. })
        ));
    }

    fn one(bytes: &[u8], mode: RecoveryMode) -> Result<RecoveryPlan, RecoveryError> {
        plan(0, &[SegmentBytes { segment_seq: 1, bytes }], mode, 1 << 16)
    }

    #[test]
    fn clean_log_recovers_fully() {
        let (bytes, starts) = image(1, 10, &[vec![10, 20], vec![5000], vec![1]]);
        let recovered = one(&bytes, RecoveryMode::Strict).unwrap();
        assert_eq!(recovered.next_lsn, 14);
        assert_eq!(recovered.torn_tail, None);
        assert_eq!(recovered.segments[0].frontier as usize, starts[2] + SECTOR_BYTES);
    }

    #[test]
    fn tear_at_every_byte_of_the_last_batch() {
        let (bytes, starts) = image(1, 1, &[vec![100, 100], vec![300, 40, 2000]]);
        let last = starts[1];
        let records_end =
            last + BATCH_BEGIN_BYTES + wire::encoded_len(300) + wire::encoded_len(40) + wire::encoded_len(2000);
        for tear in last + 1..records_end {
            let mut torn = bytes.clone();
            torn[tear..].fill(0);
            let recovered = one(&torn, RecoveryMode::TolerateTornTail).unwrap();
            assert_eq!(recovered.next_lsn, 3, "tear at {tear}");
            let tail = recovered.torn_tail.unwrap();
            assert_eq!(tail.offset as usize, last);
            assert!(matches!(one(&torn, RecoveryMode::Strict), Err(RecoveryError::TornTailStrict { .. })));
        }
    }

    #[test]
    fn flip_before_the_tail_is_corruption_in_both_modes() {
        let (bytes, starts) = image(1, 1, &[vec![100], vec![100], vec![100]]);
        let mut damaged = bytes.clone();
        damaged[starts[1] + BATCH_BEGIN_BYTES + 5] ^= 1;
        for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTornTail] {
            let error = one(&damaged, mode).unwrap_err();
            assert!(
                matches!(error, RecoveryError::Corruption { segment_seq: 1, offset, .. } if offset as usize == starts[1] + BATCH_BEGIN_BYTES),
                "{error:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3 * SECTOR_BYTES)) {
            let _ = one(&bytes, RecoveryMode::Strict);
            let _ = one(&bytes, RecoveryMode::TolerateTornTail);
        }

        #[test]
        fn damaged_images_never_panic_and_keep_a_valid_prefix(
            batches in proptest::collection::vec(proptest::collection::vec(1_usize..3000, 1..4), 1..4),
            damage_at in 0_usize..SEGMENT_BYTES,
            damage_len in 1_usize..64,
            value: u8,
        ) {
            let (mut bytes, _) = image(1, 1, &batches);
            let end = (damage_at + damage_len).min(bytes.len());
            bytes[damage_at..end].fill(value);
            for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTornTail] {
                if let Ok(recovered) = one(&bytes, mode) {
                    let total: u64 = batches.iter().map(|batch| batch.len() as u64).sum();
                    prop_assert!(recovered.next_lsn <= total + 1);
                }
            }
        }

        /// In a reused file, damage anywhere never makes stale batches count as records.
        #[test]
        fn damaged_reused_images_never_read_stale_batches(
            batches in proptest::collection::vec(proptest::collection::vec(1_usize..3000, 1..4), 0..4),
            damage_at in 0_usize..SEGMENT_BYTES,
            damage_len in 1_usize..64,
            value: u8,
        ) {
            let (mut bytes, _) = reused_image(&batches);
            let end = (damage_at + damage_len).min(bytes.len());
            bytes[damage_at..end].fill(value);
            let total: u64 = batches.iter().map(|batch| batch.len() as u64).sum();
            for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTornTail] {
                if let Ok(recovered) = at(5, &bytes, mode) {
                    prop_assert!(recovered.next_lsn <= 500 + total || recovered.segments.is_empty());
                    prop_assert!(recovered.segments.iter().all(|segment| segment.frontier <= segment.segment_bytes));
                }
            }
        }
    }
}
