//! The record: a fixed 32-byte header followed by a payload.
//!
//! Layout (little endian, no padding, the same on disk and on the wire):
//!
//! | offset | size | field          | meaning                                                |
//! |-------:|-----:|----------------|--------------------------------------------------------|
//! |      0 |    4 | `magic`        | [`MAGIC`], `b"MRDN"`                                   |
//! |      4 |    1 | `version`      | [`FORMAT_VERSION`]                                     |
//! |      5 |    1 | `record_type`  | a [`RecordType`]                                       |
//! |      6 |    2 | `flags`        | reserved, must be 0 in version 1                       |
//! |      8 |    4 | `payload_len`  | payload bytes after the header                         |
//! |     12 |    4 | `checksum`     | CRC32C of the header (this field as 0) and the payload |
//! |     16 |    8 | `glt`          | global logical timestamp (0 where none applies)        |
//! |     24 |    8 | `seq`          | sequence number: WAL LSN, stream sequence, segment id  |
//!
//! The checksum covers every header byte, so a flipped bit anywhere in a record is detected.

use thiserror::Error;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::limits::PAYLOAD_BYTES_MAX;

/// `b"MRDN"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"MRDN");
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 32;

const CHECKSUM_RANGE: std::ops::Range<usize> = 12..16;

/// The fixed header, as laid out in memory and on disk.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RawHeader {
    magic: U32,
    version: u8,
    record_type: u8,
    flags: U16,
    payload_len: U32,
    checksum: U32,
    glt: U64,
    seq: U64,
}

const _: () = assert!(size_of::<RawHeader>() == HEADER_BYTES);

/// What a record is. The numeric values are part of the format and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordType {
    /// First sector of a WAL segment: names the shard, the segment and the format.
    SegmentHeader = 1,
    /// Opens a WAL batch: record count and extent of the batch.
    BatchBegin = 2,
    /// An opaque WAL entry written by the layer above the WAL.
    Data = 3,
    /// A client request frame (`seq` is the request id; payload per [`crate::proto`]).
    Request = 4,
    /// A response frame (`seq` echoes the request id; payload per [`crate::proto`]).
    Response = 5,
    /// First record of a store checkpoint file (payload defined by the store).
    Checkpoint = 6,
    /// Header sector of a chunk file (payload defined by the chunk server).
    Chunk = 7,
    /// A control-plane message (Raft RPC, admin request or its response; payload defined by
    /// the control plane's `rpc` module; `seq` 0 for requests, 1 for responses).
    Control = 8,
    /// One record of the control plane's Raft log file (payload defined by its `log` module).
    RaftLog = 9,
    /// A replication frame between regions (payload per [`crate::repl`]).
    Repl = 10,
    /// Closes a WAL segment where a batch would start (`seq`: the LSN the log continues at, in
    /// the next segment; payload: the segment's sequence). Written when a tail is cut.
    SegmentSeal = 11,
}

impl RecordType {
    /// Every type this build knows, for tests and fuzzers.
    pub const ALL: [RecordType; 11] = [
        Self::SegmentHeader,
        Self::BatchBegin,
        Self::Data,
        Self::Request,
        Self::Response,
        Self::Checkpoint,
        Self::Chunk,
        Self::Control,
        Self::RaftLog,
        Self::Repl,
        Self::SegmentSeal,
    ];

    /// The type for a byte read from a header, if this build knows it.
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| *kind as u8 == value)
    }
}

/// A decoded header, checked except for the payload checksum (see [`decode_header`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the record is.
    pub record_type: RecordType,
    /// Flags, 0 in format version 1.
    pub flags: u16,
    /// Payload length in bytes.
    pub payload_len: u32,
    /// Stored CRC32C.
    pub checksum: u32,
    /// Global logical timestamp.
    pub glt: u64,
    /// Sequence number.
    pub seq: u64,
}

/// A record decoded and checksum-verified, borrowing its payload from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// What the record is.
    pub record_type: RecordType,
    /// Flags, 0 in format version 1.
    pub flags: u16,
    /// Global logical timestamp.
    pub glt: u64,
    /// Sequence number.
    pub seq: u64,
    /// The payload bytes.
    pub payload: &'a [u8],
}

/// Why bytes are not a valid record. Every decoder in Meridian ends in one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Fewer bytes than the header or the announced payload need.
    #[error("truncated record: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes needed to go on.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The first four bytes are not [`MAGIC`].
    #[error("bad magic {found:#010x}")]
    BadMagic {
        /// The value found.
        found: u32,
    },
    /// A format version this build does not read.
    #[error("unsupported format version {found}")]
    UnsupportedVersion {
        /// The version found.
        found: u8,
    },
    /// A record type this build does not know.
    #[error("unknown record type {found}")]
    UnknownRecordType {
        /// The type byte found.
        found: u8,
    },
    /// Flag bits that format version 1 reserves.
    #[error("unknown flags {found:#06x}")]
    UnknownFlags {
        /// The flags found.
        found: u16,
    },
    /// The header announces more payload than the boundary allows.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Announced length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// The CRC32C over header and payload does not match.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over the bytes read.
        computed: u32,
    },
}

/// Why a record could not be encoded. These are caller errors reported as values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The output buffer is smaller than [`encoded_len`].
    #[error("output buffer of {available} bytes, record needs {needed}")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The payload is over [`PAYLOAD_BYTES_MAX`].
    #[error("payload of {len} bytes exceeds the format limit of {max}")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// The format limit.
        max: u32,
    },
}

/// Bytes a record with `payload_len` payload bytes takes.
pub const fn encoded_len(payload_len: usize) -> usize {
    HEADER_BYTES + payload_len
}

fn checksum(header: &[u8; HEADER_BYTES], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&header[..CHECKSUM_RANGE.start]);
    let crc = crc32c::crc32c_append(crc, &[0_u8; 4]);
    let crc = crc32c::crc32c_append(crc, &header[CHECKSUM_RANGE.end..]);
    crc32c::crc32c_append(crc, payload)
}

/// Encodes the header of a record with `payload`, checksum included. Use it when the payload
/// is copied separately (for example into a buffer made of several DMA chunks).
pub fn encode_header(
    record_type: RecordType,
    glt: u64,
    seq: u64,
    payload: &[u8],
) -> Result<[u8; HEADER_BYTES], EncodeError> {
    encode_header_pieces(record_type, glt, seq, &[payload])
}

/// [`encode_header`] for a payload made of `pieces` sent one after the other.
pub fn encode_header_pieces(
    record_type: RecordType,
    glt: u64,
    seq: u64,
    pieces: &[&[u8]],
) -> Result<[u8; HEADER_BYTES], EncodeError> {
    let len: usize = pieces.iter().map(|piece| piece.len()).sum();
    let payload_len = u32::try_from(len)
        .ok()
        .filter(|len| *len <= PAYLOAD_BYTES_MAX)
        .ok_or(EncodeError::PayloadTooLarge { len, max: PAYLOAD_BYTES_MAX })?;
    let raw = RawHeader {
        magic: U32::new(MAGIC),
        version: FORMAT_VERSION,
        record_type: record_type as u8,
        flags: U16::new(0),
        payload_len: U32::new(payload_len),
        checksum: U32::new(0),
        glt: U64::new(glt),
        seq: U64::new(seq),
    };
    let mut bytes = [0_u8; HEADER_BYTES];
    bytes.copy_from_slice(raw.as_bytes());
    let mut crc = checksum(&bytes, &[]);
    for piece in pieces {
        crc = crc32c::crc32c_append(crc, piece);
    }
    bytes[CHECKSUM_RANGE].copy_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

/// Encodes a record into the front of `out` and returns the bytes written.
pub fn encode_into(
    out: &mut [u8],
    record_type: RecordType,
    glt: u64,
    seq: u64,
    payload: &[u8],
) -> Result<usize, EncodeError> {
    let needed = encoded_len(payload.len());
    if out.len() < needed {
        return Err(EncodeError::BufferTooSmall { needed, available: out.len() });
    }
    let header = encode_header(record_type, glt, seq, payload)?;
    out[..HEADER_BYTES].copy_from_slice(&header);
    out[HEADER_BYTES..needed].copy_from_slice(payload);
    Ok(needed)
}

/// Decodes and checks a header without its payload: magic, version, type, flags and the
/// length limit `payload_bytes_max` (itself capped at [`PAYLOAD_BYTES_MAX`]). The checksum
/// is not verified here; [`decode`] does that.
pub fn decode_header(bytes: &[u8], payload_bytes_max: u32) -> Result<Header, DecodeError> {
    let (raw, _) = RawHeader::read_from_prefix(bytes)
        .map_err(|_| DecodeError::Truncated { needed: HEADER_BYTES, available: bytes.len() })?;
    if raw.magic.get() != MAGIC {
        return Err(DecodeError::BadMagic { found: raw.magic.get() });
    }
    if raw.version != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: raw.version });
    }
    let record_type =
        RecordType::from_u8(raw.record_type).ok_or(DecodeError::UnknownRecordType { found: raw.record_type })?;
    if raw.flags.get() != 0 {
        return Err(DecodeError::UnknownFlags { found: raw.flags.get() });
    }
    let max = payload_bytes_max.min(PAYLOAD_BYTES_MAX);
    if raw.payload_len.get() > max {
        return Err(DecodeError::PayloadTooLarge { len: raw.payload_len.get(), max });
    }
    Ok(Header {
        record_type,
        flags: raw.flags.get(),
        payload_len: raw.payload_len.get(),
        checksum: raw.checksum.get(),
        glt: raw.glt.get(),
        seq: raw.seq.get(),
    })
}

/// Decodes one record from the front of `bytes`, verifying everything including the
/// checksum. Returns the record and the number of bytes it took.
pub fn decode(bytes: &[u8], payload_bytes_max: u32) -> Result<(Record<'_>, usize), DecodeError> {
    let header = decode_header(bytes, payload_bytes_max)?;
    let total = encoded_len(header.payload_len as usize);
    let (Some(header_bytes), Some(payload)) = (bytes.first_chunk::<HEADER_BYTES>(), bytes.get(HEADER_BYTES..total))
    else {
        return Err(DecodeError::Truncated { needed: total, available: bytes.len() });
    };
    let computed = checksum(header_bytes, payload);
    if computed != header.checksum {
        return Err(DecodeError::ChecksumMismatch { stored: header.checksum, computed });
    }
    Ok((
        Record { record_type: header.record_type, flags: header.flags, glt: header.glt, seq: header.seq, payload },
        total,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_type() -> impl Strategy<Value = RecordType> {
        proptest::sample::select(RecordType::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn round_trip(kind in arb_type(), glt: u64, seq: u64,
                      payload in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = vec![0_u8; encoded_len(payload.len()) + 7];
            let written = encode_into(&mut buf, kind, glt, seq, &payload).unwrap();
            prop_assert_eq!(written, encoded_len(payload.len()));
            let (record, used) = decode(&buf, PAYLOAD_BYTES_MAX).unwrap();
            prop_assert_eq!(used, written);
            prop_assert_eq!(record, Record { record_type: kind, flags: 0, glt, seq, payload: &payload });
        }

        #[test]
        fn every_single_bit_flip_is_detected(kind in arb_type(), glt: u64, seq: u64,
                      payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = vec![0_u8; encoded_len(payload.len())];
            encode_into(&mut buf, kind, glt, seq, &payload).unwrap();
            for bit in 0..buf.len() * 8 {
                let mut flipped = buf.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                prop_assert!(decode(&flipped, PAYLOAD_BYTES_MAX).is_err(), "bit {} not detected", bit);
            }
        }

        #[test]
        fn every_truncation_is_an_error(payload in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut buf = vec![0_u8; encoded_len(payload.len())];
            encode_into(&mut buf, RecordType::Data, 1, 2, &payload).unwrap();
            for cut in 0..buf.len() {
                let is_truncated = matches!(
                    decode(&buf[..cut], PAYLOAD_BYTES_MAX),
                    Err(DecodeError::Truncated { .. })
                );
                prop_assert!(is_truncated);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, 64);
        }
    }

    #[test]
    fn named_errors() {
        let mut buf = vec![0_u8; encoded_len(4)];
        encode_into(&mut buf, RecordType::Data, 9, 10, b"abcd").unwrap();

        let mut bad = buf.clone();
        bad[0] ^= 0xff;
        assert!(matches!(decode(&bad, 100), Err(DecodeError::BadMagic { .. })));

        let mut bad = buf.clone();
        bad[4] = 2;
        assert_eq!(decode(&bad, 100), Err(DecodeError::UnsupportedVersion { found: 2 }));

        let mut bad = buf.clone();
        bad[5] = 200;
        assert_eq!(decode(&bad, 100), Err(DecodeError::UnknownRecordType { found: 200 }));

        let mut bad = buf.clone();
        bad[6] = 1;
        assert_eq!(decode(&bad, 100), Err(DecodeError::UnknownFlags { found: 1 }));

        assert_eq!(decode(&buf, 3), Err(DecodeError::PayloadTooLarge { len: 4, max: 3 }));

        let mut bad = buf.clone();
        bad[HEADER_BYTES] ^= 1;
        assert!(matches!(decode(&bad, 100), Err(DecodeError::ChecksumMismatch { .. })));

        assert_eq!(decode(&buf[..10], 100), Err(DecodeError::Truncated { needed: HEADER_BYTES, available: 10 }));
    }

    #[test]
    fn encode_rejects_small_buffer() {
        let mut buf = [0_u8; HEADER_BYTES + 1];
        assert_eq!(
            encode_into(&mut buf, RecordType::Data, 0, 0, b"xy"),
            Err(EncodeError::BufferTooSmall { needed: HEADER_BYTES + 2, available: HEADER_BYTES + 1 })
        );
    }

    #[test]
    fn header_layout_is_pinned() {
        let header = encode_header(RecordType::BatchBegin, 0x0102, 0x0304, b"").unwrap();
        assert_eq!(&header[0..4], b"MRDN");
        assert_eq!(header[4], FORMAT_VERSION);
        assert_eq!(header[5], 2);
        assert_eq!(&header[16..18], &[0x02, 0x01]);
        assert_eq!(&header[24..26], &[0x04, 0x03]);
    }
}
