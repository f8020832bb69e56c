//! Replication frames: what a region's shipper and another region's receiver say to each other
//! on one QUIC stream per (shard, peer region).
//!
//! Every frame is one record (see [`crate::record`]) of type [`RecordType::Repl`] with `glt`
//! and `seq` 0; its body starts with one byte naming the frame, then the fields, little
//! endian, lengths before bytes:
//!
//! | frame    | kind | fields                                                                  |
//! |----------|-----:|-------------------------------------------------------------------------|
//! | `Hello`  |    1 | shard (u32), shards (u32), region (u16 len, UTF-8)                       |
//! | `Resume` |    2 | next_lsn (u64)                                                           |
//! | `Batch`  |    3 | shard (u32), first_lsn (u64), count (u32), closed_ts (u64), codec (u8), raw_len (u32), body (rest) |
//! | `Ack`    |    4 | next_lsn (u64), closed_ts (u64)                                          |
//! | `Refuse` |    5 | reason (rest, UTF-8)                                                     |
//! | `Install`|    6 | shard (u32), resume_lsn (u64), horizon (u64), count (u32), last (u8: 0 or 1), codec (u8), raw_len (u32), body (rest) |
//!
//! A stream opens with the sender's `Hello` (which shard of which region, and how many shards
//! that region has); the receiver answers `Resume` with the first LSN it lacks, or `Refuse`.
//! Then the sender sends `Batch`es: `count` consecutive WAL records from `first_lsn`, their
//! encoded entries compressed with `codec` into `body` (`raw_len` bytes once decompressed), and
//! the shard's closed timestamp (no record at or below it will ever be written after the
//! batch's last one). A batch of 0 records only carries the closed timestamp. The receiver
//! answers `Ack`s: every record below `next_lsn` is durable in its region, and `closed_ts` is
//! the closed timestamp it has applied.
//!
//! When the sender's WAL no longer holds the first LSN the receiver lacks, it installs a
//! snapshot first (the InstallSnapshot pattern): `Install` parts carry the versions of the
//! shard's newest checkpoint (but those whose chunks were collected since) as entries (the
//! version's timestamp and a one-operation payload), each part compressed like a batch. The receiver applies them (a version it has is applied
//! again harmlessly). The `last` part carries the checkpoint's collection `horizon`: a key the
//! receiver holds and the snapshot lacks was deleted and collected at the source, and gets a
//! tombstone at the horizon. Once all of it is durable the receiver answers with an `Ack` of
//! `resume_lsn`, the checkpoint's LSN (or its own position, if that is further); `Batch`es
//! follow from there.
//!
//! The decompressed body is `count` entries, each glt (u64), length (u32), payload: the WAL
//! record as written by the source shard. An empty payload keeps the place of a record the
//! stream does not carry (with multi-master keyspaces a region ships only the records it
//! stamped itself; the others reach each region from their own origin). [`Entries`] walks them
//! without allocating.
//!
//! Decoding is total: any byte sequence gives a frame or a typed [`ReplError`] (fuzz target
//! `repl_decode`).

use thiserror::Error;

use crate::limits::PAYLOAD_BYTES_MAX;
use crate::proto::{ProtoError, Reader, put_bytes16};
use crate::record::{DecodeError, EncodeError, HEADER_BYTES, RecordType, decode};

/// Largest replication frame payload.
pub const FRAME_PAYLOAD_BYTES_MAX: u32 = PAYLOAD_BYTES_MAX;
/// Longest region name.
pub const REGION_BYTES_MAX: usize = 64;
/// Bytes an entry takes besides its payload.
pub const ENTRY_OVERHEAD_BYTES: usize = 12;

/// How a batch body is compressed. Numeric values are part of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Stored as is.
    None = 0,
    /// LZ4 block format (`lz4_flex`).
    Lz4 = 1,
    /// Snappy raw format (`snap`).
    Snappy = 2,
}

impl Codec {
    /// The codec for a byte, if known.
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|codec| *codec as u8 == value)
    }

    /// Every codec.
    pub const ALL: [Self; 3] = [Self::None, Self::Lz4, Self::Snappy];

    /// The codec called `name` (see [`Codec::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|codec| codec.name() == name)
    }

    /// The name used in configuration files and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Lz4 => "lz4",
            Self::Snappy => "snap",
        }
    }
}

/// A decoded frame, borrowing from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Opens a stream: the sender ships `shard` of region `region`, which has `shards` shards.
    Hello {
        /// The shard.
        shard: u32,
        /// The source region's shard count.
        shards: u32,
        /// The source region.
        region: &'a str,
    },
    /// The receiver's answer to `Hello`: ship from this LSN.
    Resume {
        /// First LSN the receiver lacks.
        next_lsn: u64,
    },
    /// Consecutive WAL records and the closed timestamp.
    Batch(Batch<'a>),
    /// Records below `next_lsn` are durable at the receiver; `closed_ts` is applied.
    Ack {
        /// First LSN not yet durable at the receiver.
        next_lsn: u64,
        /// The closed timestamp applied.
        closed_ts: u64,
    },
    /// The receiver will not take this stream.
    Refuse {
        /// Why.
        reason: &'a str,
    },
    /// Part of a snapshot installed before the batches resume.
    Install(Install<'a>),
}

/// A part of an installed snapshot as framed (body still compressed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Install<'a> {
    /// The shard.
    pub shard: u32,
    /// The snapshot's LSN: batches resume there after the last part.
    pub resume_lsn: u64,
    /// On the last part, the checkpoint's collection horizon (0 on the others): versions below
    /// it may have been collected at the source.
    pub horizon: u64,
    /// Number of entries (versions).
    pub count: u32,
    /// Whether this is the snapshot's last part.
    pub last: bool,
    /// How `body` is compressed.
    pub codec: Codec,
    /// Length of `body` once decompressed.
    pub raw_len: u32,
    /// The compressed entries.
    pub body: &'a [u8],
}

/// A batch of records as framed (body still compressed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch<'a> {
    /// The shard.
    pub shard: u32,
    /// LSN of the first record.
    pub first_lsn: u64,
    /// Number of records (consecutive LSNs).
    pub count: u32,
    /// The shard's closed timestamp after the last record.
    pub closed_ts: u64,
    /// How `body` is compressed.
    pub codec: Codec,
    /// Length of `body` once decompressed.
    pub raw_len: u32,
    /// The compressed entries.
    pub body: &'a [u8],
}

impl Batch<'_> {
    /// The LSN after the last record.
    pub fn next_lsn(&self) -> u64 {
        self.first_lsn.saturating_add(u64::from(self.count))
    }
}

/// Why bytes are not a replication frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ReplError {
    /// The record around the frame is damaged or incomplete.
    #[error("bad record: {0}")]
    Record(#[from] DecodeError),
    /// The record is not a replication frame.
    #[error("record of type {found:?} where a replication frame was expected")]
    NotRepl {
        /// The type found.
        found: RecordType,
    },
    /// The body is malformed.
    #[error("bad frame body: {0}")]
    Body(#[from] ProtoError),
    /// The kind byte is not one this build knows.
    #[error("unknown frame kind {kind}")]
    UnknownKind {
        /// The byte found.
        kind: u8,
    },
    /// The codec byte is not one this build knows.
    #[error("unknown codec {codec}")]
    UnknownCodec {
        /// The byte found.
        codec: u8,
    },
    /// The region name is empty, too long or not UTF-8.
    #[error("bad region name in Hello")]
    BadRegion,
    /// A batch's entries do not match its header.
    #[error("bad batch entries: {reason}")]
    BadEntries {
        /// What is wrong.
        reason: &'static str,
    },
}

const KIND_HELLO: u8 = 1;
const KIND_RESUME: u8 = 2;
const KIND_BATCH: u8 = 3;
const KIND_ACK: u8 = 4;
const KIND_REFUSE: u8 = 5;
const KIND_INSTALL: u8 = 6;

/// Reads a compressed body's codec and raw length, checking them against `count` entries.
fn body_fields(r: &mut Reader<'_>, count: u32) -> Result<(Codec, u32), ReplError> {
    let codec = r.u8("codec")?;
    let codec = Codec::from_u8(codec).ok_or(ReplError::UnknownCodec { codec })?;
    let raw_len = r.u32("raw_len")?;
    if raw_len > FRAME_PAYLOAD_BYTES_MAX {
        return Err(ReplError::BadEntries { reason: "raw length above the frame limit" });
    }
    if (count as usize).saturating_mul(ENTRY_OVERHEAD_BYTES) > raw_len as usize {
        return Err(ReplError::BadEntries { reason: "more records than the raw length can hold" });
    }
    Ok((codec, raw_len))
}

/// Decodes one frame from the front of `bytes`; returns it and the bytes it took.
pub fn decode_frame(bytes: &[u8]) -> Result<(Frame<'_>, usize), ReplError> {
    let (record, used) = decode(bytes, FRAME_PAYLOAD_BYTES_MAX)?;
    if record.record_type != RecordType::Repl {
        return Err(ReplError::NotRepl { found: record.record_type });
    }
    let mut r = Reader::new(record.payload);
    let kind = r.u8("kind").map_err(|_| ProtoError::Empty)?;
    let frame = match kind {
        KIND_HELLO => {
            let shard = r.u32("shard")?;
            let shards = r.u32("shards")?;
            let region = std::str::from_utf8(r.bytes16("region")?).map_err(|_| ReplError::BadRegion)?;
            if region.is_empty() || region.len() > REGION_BYTES_MAX {
                return Err(ReplError::BadRegion);
            }
            Frame::Hello { shard, shards, region }
        }
        KIND_RESUME => Frame::Resume { next_lsn: r.u64("next_lsn")? },
        KIND_BATCH => {
            let shard = r.u32("shard")?;
            let first_lsn = r.u64("first_lsn")?;
            let count = r.u32("count")?;
            let closed_ts = r.u64("closed_ts")?;
            let (codec, raw_len) = body_fields(&mut r, count)?;
            Frame::Batch(Batch { shard, first_lsn, count, closed_ts, codec, raw_len, body: r.rest() })
        }
        KIND_INSTALL => {
            let shard = r.u32("shard")?;
            let resume_lsn = r.u64("resume_lsn")?;
            let horizon = r.u64("horizon")?;
            let count = r.u32("count")?;
            let last = match r.u8("last")? {
                0 => false,
                1 => true,
                _ => return Err(ReplError::BadEntries { reason: "the last flag is neither 0 nor 1" }),
            };
            let (codec, raw_len) = body_fields(&mut r, count)?;
            Frame::Install(Install { shard, resume_lsn, horizon, count, last, codec, raw_len, body: r.rest() })
        }
        KIND_ACK => Frame::Ack { next_lsn: r.u64("next_lsn")?, closed_ts: r.u64("closed_ts")? },
        KIND_REFUSE => Frame::Refuse {
            reason: std::str::from_utf8(r.rest()).map_err(|_| ProtoError::BadUtf8 { field: "reason" })?,
        },
        kind => return Err(ReplError::UnknownKind { kind }),
    };
    r.finish()?;
    Ok((frame, used))
}

/// The length of the frame at the front of `bytes` once its header is there (for reading a
/// stream frame by frame); `None` while fewer than [`HEADER_BYTES`] bytes are available.
pub fn frame_len(bytes: &[u8]) -> Result<Option<usize>, ReplError> {
    if bytes.len() < HEADER_BYTES {
        return Ok(None);
    }
    let header = crate::record::decode_header(bytes, FRAME_PAYLOAD_BYTES_MAX)?;
    Ok(Some(crate::encoded_len(header.payload_len as usize)))
}

/// Encodes `frame` into `out` (cleared first). For a batch, `body` is copied in once; see
/// [`encode_batch_head`] to send a body without copying it.
pub fn encode_frame(frame: &Frame<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    crate::proto::frame(out, RecordType::Repl, 0, |out| match frame {
        Frame::Hello { shard, shards, region } => {
            out.push(KIND_HELLO);
            out.extend_from_slice(&shard.to_le_bytes());
            out.extend_from_slice(&shards.to_le_bytes());
            put_bytes16(out, region.as_bytes());
        }
        Frame::Resume { next_lsn } => {
            out.push(KIND_RESUME);
            out.extend_from_slice(&next_lsn.to_le_bytes());
        }
        Frame::Batch(batch) => {
            push_batch_fields(batch, out);
            out.extend_from_slice(batch.body);
        }
        Frame::Ack { next_lsn, closed_ts } => {
            out.push(KIND_ACK);
            out.extend_from_slice(&next_lsn.to_le_bytes());
            out.extend_from_slice(&closed_ts.to_le_bytes());
        }
        Frame::Refuse { reason } => {
            out.push(KIND_REFUSE);
            out.extend_from_slice(reason.as_bytes());
        }
        Frame::Install(install) => {
            out.push(KIND_INSTALL);
            out.extend_from_slice(&install.shard.to_le_bytes());
            out.extend_from_slice(&install.resume_lsn.to_le_bytes());
            out.extend_from_slice(&install.horizon.to_le_bytes());
            out.extend_from_slice(&install.count.to_le_bytes());
            out.push(u8::from(install.last));
            out.push(install.codec as u8);
            out.extend_from_slice(&install.raw_len.to_le_bytes());
            out.extend_from_slice(install.body);
        }
    })
}

fn push_batch_fields(batch: &Batch<'_>, out: &mut Vec<u8>) {
    out.push(KIND_BATCH);
    out.extend_from_slice(&batch.shard.to_le_bytes());
    out.extend_from_slice(&batch.first_lsn.to_le_bytes());
    out.extend_from_slice(&batch.count.to_le_bytes());
    out.extend_from_slice(&batch.closed_ts.to_le_bytes());
    out.push(batch.codec as u8);
    out.extend_from_slice(&batch.raw_len.to_le_bytes());
}

/// Encodes the record header and batch fields of `batch` into `out` (cleared first); the
/// frame is `out` followed by `batch.body`, which the caller sends as it is (a `Bytes`
/// handed to QUIC: no copy of the body).
pub fn encode_batch_head(batch: &Batch<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    out.clear();
    out.resize(HEADER_BYTES, 0);
    push_batch_fields(batch, out);
    // The header's length (checked against the record limit, which FRAME_PAYLOAD_BYTES_MAX
    // is) and checksum cover the fields and the body: computed over both pieces.
    let header = crate::record::encode_header_pieces(RecordType::Repl, 0, 0, &[&out[HEADER_BYTES..], batch.body])?;
    out[..HEADER_BYTES].copy_from_slice(&header);
    Ok(())
}

/// Appends one entry (a WAL record's glt and payload) to a raw batch body.
pub fn encode_entry(glt: u64, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&glt.to_le_bytes());
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The entries of a decompressed batch body.
#[derive(Debug, Clone, Copy)]
pub struct Entries<'a> {
    raw: &'a [u8],
    count: u32,
}

impl<'a> Entries<'a> {
    /// Checks that `raw` holds exactly `count` well-formed entries.
    pub fn new(raw: &'a [u8], count: u32) -> Result<Self, ReplError> {
        let entries = Self { raw, count };
        let mut r = Reader::new(raw);
        for _ in 0..count {
            r.u64("glt")?;
            r.bytes32("payload")?;
        }
        r.finish().map_err(|_| ReplError::BadEntries { reason: "bytes after the last entry" })?;
        Ok(entries)
    }

    /// Number of entries.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each entry's (glt, payload), in LSN order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &'a [u8])> + use<'a> {
        let mut r = Reader::new(self.raw);
        (0..self.count).map_while(move |_| Some((r.u64("glt").ok()?, r.bytes32("payload").ok()?)))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn roundtrip(frame: Frame<'_>) {
        let mut out = Vec::new();
        encode_frame(&frame, &mut out).unwrap();
        assert_eq!(decode_frame(&out), Ok((frame, out.len())));
        assert_eq!(frame_len(&out), Ok(Some(out.len())));
        for cut in 0..out.len() {
            assert!(decode_frame(&out[..cut]).is_err());
        }
    }

    #[test]
    fn frames_roundtrip() {
        roundtrip(Frame::Hello { shard: 3, shards: 8, region: "eu-west" });
        roundtrip(Frame::Resume { next_lsn: 77 });
        roundtrip(Frame::Ack { next_lsn: 9, closed_ts: 1 << 40 });
        roundtrip(Frame::Refuse { reason: "shard 9 is not placed here" });
        let mut raw = Vec::new();
        encode_entry(5, b"one", &mut raw);
        encode_entry(6, b"", &mut raw);
        let batch = Batch {
            shard: 1,
            first_lsn: 10,
            count: 2,
            closed_ts: 6,
            codec: Codec::None,
            raw_len: raw.len() as u32,
            body: &raw,
        };
        roundtrip(Frame::Batch(batch));
        for last in [false, true] {
            let install = Install {
                shard: 1,
                resume_lsn: 900,
                horizon: if last { 44 } else { 0 },
                count: 2,
                last,
                codec: Codec::None,
                raw_len: raw.len() as u32,
                body: &raw,
            };
            roundtrip(Frame::Install(install));
        }
        let entries = Entries::new(&raw, 2).unwrap();
        assert_eq!(entries.iter().collect::<Vec<_>>(), vec![(5, &b"one"[..]), (6, &b""[..])]);
        assert!(Entries::new(&raw, 3).is_err());
        assert!(Entries::new(&raw, 1).is_err());
    }

    #[test]
    fn batch_head_and_body_make_the_same_frame() {
        let body = b"compressed bytes".to_vec();
        let batch =
            Batch { shard: 0, first_lsn: 1, count: 1, closed_ts: 2, codec: Codec::Lz4, raw_len: 40, body: &body };
        let (mut whole, mut head) = (Vec::new(), Vec::new());
        encode_frame(&Frame::Batch(batch), &mut whole).unwrap();
        encode_batch_head(&batch, &mut head).unwrap();
        head.extend_from_slice(&body);
        assert_eq!(whole, head);
    }

    #[test]
    fn damaged_frames_are_named() {
        let mut out = Vec::new();
        encode_frame(&Frame::Resume { next_lsn: 1 }, &mut out).unwrap();
        out[HEADER_BYTES + 3] ^= 1;
        assert!(matches!(decode_frame(&out), Err(ReplError::Record(DecodeError::ChecksumMismatch { .. }))));
        let mut other = vec![0u8; HEADER_BYTES + 1];
        crate::encode_into(&mut other, RecordType::Data, 0, 0, &[1]).unwrap();
        assert_eq!(decode_frame(&other), Err(ReplError::NotRepl { found: RecordType::Data }));
        // An install part's flag is 0 or 1; its count must fit its raw length.
        let install = |last: u8, count: u32| {
            let mut out = Vec::new();
            crate::proto::frame(&mut out, RecordType::Repl, 0, |out| {
                out.push(KIND_INSTALL);
                out.extend_from_slice(&0u32.to_le_bytes());
                out.extend_from_slice(&5u64.to_le_bytes());
                out.extend_from_slice(&3u64.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
                out.push(last);
                out.push(Codec::None as u8);
                out.extend_from_slice(&24u32.to_le_bytes());
            })
            .unwrap();
            decode_frame(&out).map(|(frame, _)| matches!(frame, Frame::Install(Install { last: true, .. })))
        };
        assert_eq!(install(1, 2), Ok(true));
        assert!(matches!(install(2, 2), Err(ReplError::BadEntries { .. })));
        assert!(matches!(install(0, 3), Err(ReplError::BadEntries { .. })));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_frame(&bytes);
            let _ = frame_len(&bytes);
            if let Ok(entries) = Entries::new(&bytes, 2) {
                prop_assert_eq!(entries.iter().count(), 2);
            }
        }
    }
}
