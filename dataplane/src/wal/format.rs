//! The WAL's on-disk layout. Pure: no I/O.
//!
//! A shard's WAL is a sequence of segment files `wal-s{shard:03}-{segment:010}.seg`, each
//! `segment_bytes` long and fully written before its first use (filled with zeros when new, or
//! a released segment renamed for reuse, still holding its old batches), so that `fdatasync` on
//! an append never has to write file-system metadata.
//!
//! ```text
//! segment file
//! +--------------------+------------------------------+----------------+---------- - -
//! | sector 0           | batch                        | batch          | zeros, or a
//! | SegmentHeader rec. | BatchBegin, Data x n, zeros  | ...            | reused file's
//! |                    |                              |                | stale batches
//! +--------------------+------------------------------+----------------+---------- - -
//! ```
//!
//! * Sector 0 holds one `SegmentHeader` record (shard, segment sequence, first LSN, segment
//!   size, WAL format, whether the file is reused) and zeros.
//! * Every batch starts on a sector boundary with a `BatchBegin` record whose `seq` is the
//!   LSN of its first entry and whose payload holds the record count, the batch extent and the
//!   segment's sequence; its GLT field holds the replica-set epoch of the primary that wrote
//!   the batch (0 without a set; a batch never spans two epochs, so the epochs of a member's
//!   log are read back from its batches). A reused file's old batches name an older sequence (and lower LSNs),
//!   so the log's end is where the next sector holds no batch of this segment.
//!   `Data` records follow back to back with consecutive LSNs in `seq`; zeros pad the batch
//!   to its extent, a whole number of sectors. The next batch starts at the extent's end.
//! * Because each batch is padded to the sector, a sector that holds acknowledged data is
//!   never written again.
//! * A batch is valid only if its `BatchBegin` and all `record_count` records decode with
//!   contiguous LSNs; so a batch torn by a crash is recognised as a whole.
//! * A `SegmentSeal` record of this segment where a batch would start ends the segment (a cut
//!   tail, [`SegmentSeal`]): what follows it is stale, the log goes on in the next segment.

use wire::{DecodeError, HEADER_BYTES, RecordType};
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The I/O unit the WAL aligns to and never rewrites once it holds acknowledged data.
pub const SECTOR_BYTES: usize = 4096;
/// The WAL layout version written in every segment header.
/// Format 2 added the segment sequence to every `BatchBegin` and the reused flag to the
/// segment header; format 1 segments are refused with [`SegmentHeaderError::UnsupportedFormat`].
pub const WAL_FORMAT: u32 = 2;

/// `SegmentHeader` flag: the file was a released segment, reused without zero-filling.
const FLAG_REUSED: u32 = 1;

/// Rounds `value` up to the next multiple of [`SECTOR_BYTES`].
pub const fn align_up(value: usize) -> usize {
    value.div_ceil(SECTOR_BYTES) * SECTOR_BYTES
}

#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct SegmentHeaderPayload {
    shard_id: U32,
    wal_format: U32,
    segment_seq: U64,
    first_lsn: U64,
    segment_bytes: U64,
    flags: U32,
    reserved: U32,
}

/// What sector 0 of a segment says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The shard that owns the segment.
    pub shard_id: u32,
    /// Position of the segment in the shard's WAL (also in the file name).
    pub segment_seq: u64,
    /// LSN of the first record in the segment.
    pub first_lsn: u64,
    /// Size of the segment file.
    pub segment_bytes: u64,
    /// The file was a released segment reused without zero-filling: bytes past the log's end
    /// are stale batches of an older segment, not a torn write.
    pub reused: bool,
}

/// Why sector 0 of a segment is not a valid segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentHeaderError {
    /// The record itself is invalid.
    #[error("{0}")]
    Record(#[from] DecodeError),
    /// A valid record of another type.
    #[error("expected a segment header record, found {0:?}")]
    WrongType(RecordType),
    /// Payload of the wrong size.
    #[error("segment header payload of {0} bytes")]
    BadPayload(usize),
    /// A WAL layout this build does not read.
    #[error("unsupported WAL format {0}")]
    UnsupportedFormat(u32),
}

impl SegmentHeader {
    /// Encodes the header into the first bytes of `sector` (the rest must already be zero).
    pub fn encode_into(&self, sector: &mut [u8]) -> Result<(), wire::EncodeError> {
        let payload = SegmentHeaderPayload {
            shard_id: U32::new(self.shard_id),
            wal_format: U32::new(WAL_FORMAT),
            segment_seq: U64::new(self.segment_seq),
            first_lsn: U64::new(self.first_lsn),
            segment_bytes: U64::new(self.segment_bytes),
            flags: U32::new(if self.reused { FLAG_REUSED } else { 0 }),
            reserved: U32::new(0),
        };
        wire::encode_into(sector, RecordType::SegmentHeader, 0, self.segment_seq, payload.as_bytes()).map(|_| ())
    }

    /// Decodes a segment header from the start of a segment.
    pub fn decode(bytes: &[u8]) -> Result<Self, SegmentHeaderError> {
        let (record, _) = wire::decode(bytes, 64)?;
        if record.record_type != RecordType::SegmentHeader {
            return Err(SegmentHeaderError::WrongType(record.record_type));
        }
        // The format first (it sits at the same place in every format): an older layout is
        // named as such, never mistaken for a torn header.
        if let Some(format) = record.payload.get(4..8).and_then(|bytes| bytes.try_into().ok()).map(u32::from_le_bytes)
            && format != WAL_FORMAT
        {
            return Err(SegmentHeaderError::UnsupportedFormat(format));
        }
        let payload = SegmentHeaderPayload::read_from_bytes(record.payload)
            .map_err(|_| SegmentHeaderError::BadPayload(record.payload.len()))?;
        Ok(Self {
            shard_id: payload.shard_id.get(),
            segment_seq: payload.segment_seq.get(),
            first_lsn: payload.first_lsn.get(),
            segment_bytes: payload.segment_bytes.get(),
            reused: payload.flags.get() & FLAG_REUSED != 0,
        })
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct BatchBeginPayload {
    record_count: U32,
    extent_bytes: U32,
    segment_seq: U64,
}

/// Bytes the `BatchBegin` record takes at the start of every batch.
pub const BATCH_BEGIN_BYTES: usize = HEADER_BYTES + size_of::<BatchBeginPayload>();

/// The decoded `BatchBegin` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchBegin {
    /// LSN of the first record of the batch.
    pub first_lsn: u64,
    /// Records in the batch.
    pub record_count: u32,
    /// Bytes from the batch start to the next batch: a multiple of [`SECTOR_BYTES`].
    pub extent_bytes: u32,
    /// The segment the batch was written to (0 until the writer places it).
    pub segment_seq: u64,
    /// The replica-set epoch whose primary wrote the batch (0: a shard without a set), in the
    /// record header's GLT field: a member's log shape is read back from its batches.
    pub epoch: u64,
}

impl BatchBegin {
    /// Encodes the record (exactly [`BATCH_BEGIN_BYTES`]).
    pub fn encode(&self) -> [u8; BATCH_BEGIN_BYTES] {
        let payload = BatchBeginPayload {
            record_count: U32::new(self.record_count),
            extent_bytes: U32::new(self.extent_bytes),
            segment_seq: U64::new(self.segment_seq),
        };
        let mut out = [0_u8; BATCH_BEGIN_BYTES];
        // The payload is 16 bytes: encoding cannot fail.
        if let Ok(header) = wire::encode_header(RecordType::BatchBegin, self.epoch, self.first_lsn, payload.as_bytes())
        {
            out[..HEADER_BYTES].copy_from_slice(&header);
            out[HEADER_BYTES..].copy_from_slice(payload.as_bytes());
        }
        out
    }

    /// Decodes a `BatchBegin` from the start of `bytes`, `None` when the bytes hold a valid
    /// record of another type or a payload of the wrong size.
    pub fn decode(bytes: &[u8]) -> Result<Option<Self>, DecodeError> {
        let (record, _) = wire::decode(bytes, 64)?;
        if record.record_type != RecordType::BatchBegin {
            return Ok(None);
        }
        Ok(BatchBeginPayload::read_from_bytes(record.payload).ok().map(|payload| Self {
            first_lsn: record.seq,
            record_count: payload.record_count.get(),
            extent_bytes: payload.extent_bytes.get(),
            segment_seq: payload.segment_seq.get(),
            epoch: record.glt,
        }))
    }
}

/// A `SegmentSeal` record: the segment `segment_seq` ends here and the log goes on at
/// `next_lsn` in the next segment. Written (in a sector of its own, where a batch would start)
/// when a tail is cut ([`crate::wal::truncate_from`]); the stale batches after it are never read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSeal {
    pub segment_seq: u64,
    pub next_lsn: u64,
}

impl SegmentSeal {
    /// The seal's sector.
    pub fn encode_sector(&self) -> Vec<u8> {
        let mut sector = vec![0_u8; SECTOR_BYTES];
        let payload = self.segment_seq.to_le_bytes();
        // An 8-byte payload: encoding cannot fail.
        if let Ok(header) = wire::encode_header(RecordType::SegmentSeal, 0, self.next_lsn, &payload) {
            sector[..HEADER_BYTES].copy_from_slice(&header);
            sector[HEADER_BYTES..HEADER_BYTES + payload.len()].copy_from_slice(&payload);
        }
        sector
    }

    /// The seal at the start of `bytes`, if a valid one is there.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (record, _) = wire::decode(bytes, 64).ok()?;
        if record.record_type != RecordType::SegmentSeal {
            return None;
        }
        let segment_seq = u64::from_le_bytes(record.payload.try_into().ok()?);
        Some(Self { segment_seq, next_lsn: record.seq })
    }
}

/// Segment file name for `shard` and `segment_seq`.
pub fn segment_file_name(shard_id: u32, segment_seq: u64) -> String {
    format!("wal-s{shard_id:03}-{segment_seq:010}.seg")
}

/// Parses a name made by [`segment_file_name`].
pub fn parse_segment_file_name(name: &str) -> Option<(u32, u64)> {
    let rest = name.strip_prefix("wal-s")?.strip_suffix(".seg")?;
    let (shard, segment) = rest.split_once('-')?;
    Some((shard.parse().ok()?, segment.parse().ok()?))
}

/// Limits of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Largest batch extent, BatchBegin and padding included; a multiple of the sector.
    pub bytes_max: usize,
    /// Most records in one batch.
    pub records_max: u32,
}

/// Where a reserved record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The record's LSN.
    pub lsn: u64,
    /// Byte offset of the record from the batch start.
    pub offset: usize,
}

/// Why a record could not be reserved in the open batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// The batch is full: wait for the next one.
    BatchFull,
    /// The record cannot fit in any batch under the limits.
    TooLarge,
}

/// The batch being filled: assigns LSNs and offsets. The writer shell copies each record
/// into its buffers at the returned offset; `seal` gives the `BatchBegin` and the extent.
#[derive(Debug, Clone)]
pub struct BatchBuilder {
    first_lsn: u64,
    epoch: u64,
    record_count: u32,
    used_bytes: usize,
    limits: BatchLimits,
}

impl BatchBuilder {
    /// An empty batch whose first record will get `first_lsn`.
    pub fn new(first_lsn: u64, limits: BatchLimits) -> Self {
        Self { first_lsn, epoch: 0, record_count: 0, used_bytes: BATCH_BEGIN_BYTES, limits }
    }

    /// The epoch the batch's `BatchBegin` will name; only while it is empty.
    pub fn set_epoch(&mut self, epoch: u64) {
        debug_assert_eq!(self.record_count, 0);
        self.epoch = epoch;
    }

    /// The epoch the batch will name.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Reserves room for a record with `payload_len` bytes.
    pub fn reserve(&mut self, payload_len: usize) -> Result<Slot, Reserve> {
        let record_bytes = wire::encoded_len(payload_len);
        if align_up(BATCH_BEGIN_BYTES + record_bytes) > self.limits.bytes_max {
            return Err(Reserve::TooLarge);
        }
        if self.record_count >= self.limits.records_max
            || align_up(self.used_bytes + record_bytes) > self.limits.bytes_max
        {
            return Err(Reserve::BatchFull);
        }
        let slot = Slot { lsn: self.first_lsn + u64::from(self.record_count), offset: self.used_bytes };
        self.record_count += 1;
        self.used_bytes += record_bytes;
        Ok(slot)
    }

    /// Records reserved so far.
    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    /// Bytes used so far (BatchBegin included, padding excluded).
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// LSN of the first record.
    pub fn first_lsn(&self) -> u64 {
        self.first_lsn
    }

    /// LSN the next batch starts at.
    pub fn next_lsn(&self) -> u64 {
        self.first_lsn + u64::from(self.record_count)
    }

    /// The `BatchBegin` record for the batch as it stands, and its extent.
    pub fn seal(&self) -> (BatchBegin, usize) {
        let extent = align_up(self.used_bytes);
        let begin = BatchBegin {
            first_lsn: self.first_lsn,
            record_count: self.record_count,
            // The extent is bounded by `limits.bytes_max`, itself checked to fit in u32.
            extent_bytes: u32::try_from(extent).unwrap_or(u32::MAX),
            segment_seq: 0,
            epoch: self.epoch,
        };
        (begin, extent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let name = segment_file_name(7, 42);
        assert_eq!(name, "wal-s007-0000000042.seg");
        assert_eq!(parse_segment_file_name(&name), Some((7, 42)));
        assert_eq!(parse_segment_file_name("wal-s007-x.seg"), None);
        assert_eq!(parse_segment_file_name("other"), None);
    }

    #[test]
    fn segment_header_round_trip() {
        let header =
            SegmentHeader { shard_id: 3, segment_seq: 9, first_lsn: 1234, segment_bytes: 1 << 20, reused: true };
        let mut sector = vec![0_u8; SECTOR_BYTES];
        header.encode_into(&mut sector).unwrap();
        assert_eq!(SegmentHeader::decode(&sector), Ok(header));
        sector[40] ^= 1;
        assert!(SegmentHeader::decode(&sector).is_err());
    }

    #[test]
    fn builder_respects_limits() {
        let limits = BatchLimits { bytes_max: 2 * SECTOR_BYTES, records_max: 3 };
        let mut batch = BatchBuilder::new(100, limits);
        assert_eq!(batch.reserve(10), Ok(Slot { lsn: 100, offset: BATCH_BEGIN_BYTES }));
        assert_eq!(batch.reserve(10).map(|slot| slot.lsn), Ok(101));
        assert_eq!(batch.reserve(10).map(|slot| slot.lsn), Ok(102));
        assert_eq!(batch.reserve(10), Err(Reserve::BatchFull));
        let (begin, extent) = batch.seal();
        assert_eq!((begin.first_lsn, begin.record_count, extent), (100, 3, SECTOR_BYTES));
        assert_eq!(batch.next_lsn(), 103);

        let mut batch = BatchBuilder::new(0, limits);
        assert_eq!(batch.reserve(2 * SECTOR_BYTES), Err(Reserve::TooLarge));
        assert!(batch.reserve(SECTOR_BYTES).is_ok());
        assert_eq!(batch.reserve(SECTOR_BYTES), Err(Reserve::BatchFull));
    }

    #[test]
    fn batch_begin_round_trip() {
        let begin = BatchBegin { first_lsn: 5, record_count: 2, extent_bytes: 8192, segment_seq: 7, epoch: 0 };
        assert_eq!(BatchBegin::decode(&begin.encode()), Ok(Some(begin)));
        let begin = BatchBegin { epoch: 12, ..begin };
        assert_eq!(BatchBegin::decode(&begin.encode()), Ok(Some(begin)));
    }
}
