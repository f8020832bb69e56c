//! The client protocol: bodies of [`RecordType::Request`] and [`RecordType::Response`] records.
//!
//! A frame is one record (see [`crate::record`]): the header's `seq` is the request id chosen
//! by the client and echoed by the server, so requests can be pipelined on one connection and
//! answered out of order; `glt` is 0. The body starts with one byte naming the request or
//! response, then the fields below, little endian, lengths before bytes:
//!
//! | request      | op | fields                                                             |
//! |--------------|---:|--------------------------------------------------------------------|
//! | `Hello`      |  1 | (none)                                                             |
//! | `Put`        |  2 | key (u16 len), value (rest of the body)                            |
//! | `Get`        |  3 | at (u64, `u64::MAX` = latest), key (u16 len)                       |
//! | `Delete`     |  4 | key (u16 len)                                                      |
//! | `List`       |  5 | at (u64), limit (u32), prefix (u16 len), start_after (u16 len)     |
//! | `Stat`       |  6 | at (u64), key (u16 len)                                            |
//! | `BatchPut`   |  7 | count (u32), then count × (key (u16 len), value (u32 len))         |
//! | `Replication`|  8 | (none)                                                             |
//! | `WaitReadable`| 9 | ts (u64), timeout_ms (u32)                                         |
//! | `ChunkRefs`  | 10 | at (u64), key (u16 len)                                            |
//! | `GetRange`   | 11 | at (u64), offset (u64), len (u32), key (u16 len)                   |
//!
//! | response     | kind | fields                                                           |
//! |--------------|-----:|------------------------------------------------------------------|
//! | `Hello`      |    1 | shard (u32), count (u32), count × address (u16 len, UTF-8)       |
//! | `Written`    |    2 | ts (u64)                                                         |
//! | `Value`      |    3 | ts (u64), value (rest of the body)                               |
//! | `NotFound`   |    4 | (none)                                                           |
//! | `Stat`       |    5 | ts (u64), size (u64), chunks (u32), versions (u32)               |
//! | `Listing`    |    6 | count (u32), count × (key (u16 len), ts (u64), size (u64)), next (u16 len, empty = end) |
//! | `Error`      |    7 | code (u16), message (rest of the body, UTF-8)                    |
//! | `Replication`|    8 | now_ts (u64), region (u16 len), count (u32), count × (source region (u16 len), resolved_ts (u64), shards_closed (u32), shards (u32)) |
//! | `Readable`   |    9 | readable_ts (u64), at_us (u64)                                   |
//! | `ChunkRefs`  |   10 | ts (u64), size (u64), count (u32), count × (BLAKE3 (32), len (u32)) |
//!
//! Decoding is total: any byte sequence gives a value or a typed [`ProtoError`], never a panic
//! (fuzz target `proto_decode`). List-valued fields are validated once at decode time and then
//! iterated without allocation.

use thiserror::Error;

use crate::record::{EncodeError, HEADER_BYTES, RecordType, encode_header};

/// `at` value meaning "the latest version".
pub const AT_LATEST: u64 = u64::MAX;

/// Why a request or response body could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ProtoError {
    /// The body ended inside a field.
    #[error("body truncated while reading {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// The request op byte is not one this build knows.
    #[error("unknown request op {op}")]
    UnknownRequest {
        /// The op byte found.
        op: u8,
    },
    /// The response kind byte is not one this build knows.
    #[error("unknown response kind {kind}")]
    UnknownResponse {
        /// The kind byte found.
        kind: u8,
    },
    /// Bytes were left after the last field.
    #[error("{count} unexpected bytes after the last field")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// A text field is not valid UTF-8.
    #[error("field {field} is not valid UTF-8")]
    BadUtf8 {
        /// The field.
        field: &'static str,
    },
    /// The body is empty.
    #[error("empty body")]
    Empty,
}

/// Why a server refused a request. Numeric values are part of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame or body is malformed.
    BadRequest,
    /// The request op is unknown to the server.
    UnknownRequest,
    /// The key is longer than the server's limit (or empty).
    KeyTooLarge,
    /// The value is larger than the server's limit.
    ValueTooLarge,
    /// The frame announced a payload above the server's frame limit.
    FrameTooLarge,
    /// The connection has too many requests in flight.
    TooManyInFlight,
    /// The key does not belong to the shard that received it.
    WrongShard,
    /// The shard cannot serve: its WAL is fenced or it is shutting down.
    Unavailable,
    /// A stored chunk failed its checksum; the message names chunk and block.
    ChunkCorrupt,
    /// The `at` timestamp is older than the retention window.
    SnapshotTooOld,
    /// An internal error; the message says which.
    Internal,
    /// A batch holds more than the server accepts in one record.
    BatchTooLarge,
    /// The shard takes writes in another region (this one holds a replica).
    NotHome,
    /// This node's copy of the shard is not its replica set's primary; the message names the
    /// primary (node id) when known.
    NotPrimary,
    /// A code this build does not know.
    Other(u16),
}

impl ErrorCode {
    /// The code's number on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::BadRequest => 1,
            Self::UnknownRequest => 2,
            Self::KeyTooLarge => 3,
            Self::ValueTooLarge => 4,
            Self::FrameTooLarge => 5,
            Self::TooManyInFlight => 6,
            Self::WrongShard => 7,
            Self::Unavailable => 8,
            Self::ChunkCorrupt => 9,
            Self::SnapshotTooOld => 10,
            Self::Internal => 11,
            Self::BatchTooLarge => 12,
            Self::NotHome => 13,
            Self::NotPrimary => 14,
            Self::Other(code) => code,
        }
    }

    /// The code for a number read from the wire.
    pub fn from_u16(code: u16) -> Self {
        match code {
            1 => Self::BadRequest,
            2 => Self::UnknownRequest,
            3 => Self::KeyTooLarge,
            4 => Self::ValueTooLarge,
            5 => Self::FrameTooLarge,
            6 => Self::TooManyInFlight,
            7 => Self::WrongShard,
            8 => Self::Unavailable,
            9 => Self::ChunkCorrupt,
            10 => Self::SnapshotTooOld,
            11 => Self::Internal,
            12 => Self::BatchTooLarge,
            13 => Self::NotHome,
            14 => Self::NotPrimary,
            other => Self::Other(other),
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::TooManyInFlight | Self::Unavailable)
    }
}

/// A decoded request, borrowing from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// Asks for the node's shard map.
    Hello,
    /// Writes `value` as the new version of `key`.
    Put {
        /// Key.
        key: &'a [u8],
        /// Value.
        value: &'a [u8],
    },
    /// Reads `key` at `at` (`None`: latest).
    Get {
        /// Key.
        key: &'a [u8],
        /// Read timestamp.
        at: Option<u64>,
    },
    /// Writes a tombstone for `key`.
    Delete {
        /// Key.
        key: &'a [u8],
    },
    /// Lists keys starting with `prefix`, strictly after `start_after`, at most `limit`.
    List {
        /// Key prefix.
        prefix: &'a [u8],
        /// Continuation: list keys strictly greater than this (empty: from the start).
        start_after: &'a [u8],
        /// Most entries to return.
        limit: u32,
        /// Read timestamp.
        at: Option<u64>,
    },
    /// Metadata of `key` at `at`.
    Stat {
        /// Key.
        key: &'a [u8],
        /// Read timestamp.
        at: Option<u64>,
    },
    /// Writes every (key, value) atomically with one timestamp.
    BatchPut {
        /// The items.
        items: Pairs<'a>,
    },
    /// The node's replication status: resolved timestamp per source region.
    Replication,
    /// Answers once reads at `ts` are consistent on this node (every shard, local or
    /// replicated, has applied everything at or below it), or with an error after
    /// `timeout_ms`.
    WaitReadable {
        /// The timestamp to wait for (a snapshot's GLT).
        ts: u64,
        /// How long to wait.
        timeout_ms: u32,
    },
    /// The stored chunks (hash, length) of `key`'s version at `at`.
    ChunkRefs {
        /// Key.
        key: &'a [u8],
        /// Read timestamp.
        at: Option<u64>,
    },
    /// `len` bytes of `key`'s value at `at` from `offset` (answered as a `Value`).
    GetRange {
        /// Key.
        key: &'a [u8],
        /// Read timestamp.
        at: Option<u64>,
        /// First byte.
        offset: u64,
        /// Bytes wanted.
        len: u32,
    },
}

const OP_HELLO: u8 = 1;
const OP_PUT: u8 = 2;
const OP_GET: u8 = 3;
const OP_DELETE: u8 = 4;
const OP_LIST: u8 = 5;
const OP_STAT: u8 = 6;
const OP_BATCH_PUT: u8 = 7;
const OP_REPLICATION: u8 = 8;
const OP_WAIT_READABLE: u8 = 9;
const OP_CHUNK_REFS: u8 = 10;
const OP_GET_RANGE: u8 = 11;

const KIND_HELLO: u8 = 1;
const KIND_WRITTEN: u8 = 2;
const KIND_VALUE: u8 = 3;
const KIND_NOT_FOUND: u8 = 4;
const KIND_STAT: u8 = 5;
const KIND_LISTING: u8 = 6;
const KIND_ERROR: u8 = 7;
const KIND_REPLICATION: u8 = 8;
const KIND_READABLE: u8 = 9;
const KIND_CHUNK_REFS: u8 = 10;

fn at_to_wire(at: Option<u64>) -> u64 {
    at.unwrap_or(AT_LATEST)
}

fn at_from_wire(at: u64) -> Option<u64> {
    (at != AT_LATEST).then_some(at)
}

impl<'a> Request<'a> {
    /// Decodes a request body.
    pub fn decode(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(body);
        let op = r.u8("op").map_err(|_| ProtoError::Empty)?;
        let request = match op {
            OP_HELLO => Self::Hello,
            OP_PUT => {
                let key = r.bytes16("key")?;
                Self::Put { key, value: r.rest() }
            }
            OP_GET => {
                let at = at_from_wire(r.u64("at")?);
                Self::Get { key: r.bytes16("key")?, at }
            }
            OP_DELETE => Self::Delete { key: r.bytes16("key")? },
            OP_LIST => {
                let at = at_from_wire(r.u64("at")?);
                let limit = r.u32("limit")?;
                let prefix = r.bytes16("prefix")?;
                let start_after = r.bytes16("start_after")?;
                Self::List { prefix, start_after, limit, at }
            }
            OP_STAT => {
                let at = at_from_wire(r.u64("at")?);
                Self::Stat { key: r.bytes16("key")?, at }
            }
            OP_BATCH_PUT => Self::BatchPut { items: Pairs::decode(&mut r)? },
            OP_REPLICATION => Self::Replication,
            OP_WAIT_READABLE => Self::WaitReadable { ts: r.u64("ts")?, timeout_ms: r.u32("timeout_ms")? },
            OP_CHUNK_REFS => {
                let at = at_from_wire(r.u64("at")?);
                Self::ChunkRefs { key: r.bytes16("key")?, at }
            }
            OP_GET_RANGE => {
                let at = at_from_wire(r.u64("at")?);
                let offset = r.u64("offset")?;
                let len = r.u32("len")?;
                Self::GetRange { key: r.bytes16("key")?, at, offset, len }
            }
            op => return Err(ProtoError::UnknownRequest { op }),
        };
        r.finish()?;
        Ok(request)
    }

    /// Appends the encoded body to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Self::Hello => out.push(OP_HELLO),
            Self::Put { key, value } => {
                out.push(OP_PUT);
                put_bytes16(out, key);
                out.extend_from_slice(value);
            }
            Self::Get { key, at } => {
                out.push(OP_GET);
                out.extend_from_slice(&at_to_wire(at).to_le_bytes());
                put_bytes16(out, key);
            }
            Self::Delete { key } => {
                out.push(OP_DELETE);
                put_bytes16(out, key);
            }
            Self::List { prefix, start_after, limit, at } => {
                out.push(OP_LIST);
                out.extend_from_slice(&at_to_wire(at).to_le_bytes());
                out.extend_from_slice(&limit.to_le_bytes());
                put_bytes16(out, prefix);
                put_bytes16(out, start_after);
            }
            Self::Stat { key, at } => {
                out.push(OP_STAT);
                out.extend_from_slice(&at_to_wire(at).to_le_bytes());
                put_bytes16(out, key);
            }
            Self::BatchPut { items } => {
                out.push(OP_BATCH_PUT);
                out.extend_from_slice(&items.count.to_le_bytes());
                out.extend_from_slice(items.raw);
            }
            Self::Replication => out.push(OP_REPLICATION),
            Self::WaitReadable { ts, timeout_ms } => {
                out.push(OP_WAIT_READABLE);
                out.extend_from_slice(&ts.to_le_bytes());
                out.extend_from_slice(&timeout_ms.to_le_bytes());
            }
            Self::ChunkRefs { key, at } => {
                out.push(OP_CHUNK_REFS);
                out.extend_from_slice(&at_to_wire(at).to_le_bytes());
                put_bytes16(out, key);
            }
            Self::GetRange { key, at, offset, len } => {
                out.push(OP_GET_RANGE);
                out.extend_from_slice(&at_to_wire(at).to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                put_bytes16(out, key);
            }
        }
    }
}

/// Encodes a batch of pairs for [`Request::BatchPut`].
///
/// Keys longer than `u16::MAX` or values longer than `u32::MAX` are an error.
pub fn encode_batch_put<'k>(
    items: impl IntoIterator<Item = (&'k [u8], &'k [u8])>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    out.push(OP_BATCH_PUT);
    let count_at = out.len();
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut count = 0u32;
    for (key, value) in items {
        let key_len = u16::try_from(key.len()).map_err(|_| EncodeError::PayloadTooLarge { len: key.len(), max: 0 })?;
        let value_len =
            u32::try_from(value.len()).map_err(|_| EncodeError::PayloadTooLarge { len: value.len(), max: 0 })?;
        out.extend_from_slice(&key_len.to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&value_len.to_le_bytes());
        out.extend_from_slice(value);
        count += 1;
    }
    out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    Ok(())
}

/// Validated (key, value) pairs of a batch; iterate with [`Pairs::iter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pairs<'a> {
    count: u32,
    raw: &'a [u8],
}

impl<'a> Pairs<'a> {
    fn decode(r: &mut Reader<'a>) -> Result<Self, ProtoError> {
        let count = r.u32("count")?;
        let start = r.pos;
        for _ in 0..count {
            r.bytes16("key")?;
            r.bytes32("value")?;
        }
        Ok(Self { count, raw: &r.bytes[start..r.pos] })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let mut r = Reader::new(self.raw);
        (0..self.count).map_while(move |_| Some((r.bytes16("key").ok()?, r.bytes32("value").ok()?)))
    }
}

/// One entry of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListEntry<'a> {
    /// Key.
    pub key: &'a [u8],
    /// Timestamp of the visible version.
    pub ts: u64,
    /// Value size in bytes.
    pub size: u64,
}

/// Validated listing entries; iterate with [`Entries::iter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entries<'a> {
    count: u32,
    raw: &'a [u8],
}

impl<'a> Entries<'a> {
    fn decode(r: &mut Reader<'a>) -> Result<Self, ProtoError> {
        let count = r.u32("count")?;
        let start = r.pos;
        for _ in 0..count {
            r.bytes16("key")?;
            r.u64("ts")?;
            r.u64("size")?;
        }
        Ok(Self { count, raw: &r.bytes[start..r.pos] })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = ListEntry<'a>> + 'a {
        let mut r = Reader::new(self.raw);
        (0..self.count).map_while(move |_| {
            Some(ListEntry { key: r.bytes16("key").ok()?, ts: r.u64("ts").ok()?, size: r.u64("size").ok()? })
        })
    }
}

/// Validated shard addresses of a `Hello`; iterate with [`Addresses::iter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses<'a> {
    count: u32,
    raw: &'a [u8],
}

impl<'a> Addresses<'a> {
    fn decode(r: &mut Reader<'a>) -> Result<Self, ProtoError> {
        let count = r.u32("count")?;
        let start = r.pos;
        for _ in 0..count {
            std::str::from_utf8(r.bytes16("address")?).map_err(|_| ProtoError::BadUtf8 { field: "address" })?;
        }
        Ok(Self { count, raw: &r.bytes[start..r.pos] })
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The address of each shard, by shard id.
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        let mut r = Reader::new(self.raw);
        (0..self.count).map_while(move |_| std::str::from_utf8(r.bytes16("address").ok()?).ok())
    }
}

/// A decoded response, borrowing from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response<'a> {
    /// The node's shard map: which shard answered and every shard's client address.
    Hello {
        /// The shard that answered.
        shard: u32,
        /// Addresses by shard id.
        addresses: Addresses<'a>,
    },
    /// A write is durable with version timestamp `ts`.
    Written {
        /// The version's timestamp.
        ts: u64,
    },
    /// The value of a key.
    Value {
        /// The version's timestamp.
        ts: u64,
        /// The value.
        value: &'a [u8],
    },
    /// No visible version.
    NotFound,
    /// Metadata of a key.
    Stat {
        /// The version's timestamp.
        ts: u64,
        /// Value size in bytes.
        size: u64,
        /// Chunks holding the value (0: stored inline).
        chunks: u32,
        /// Versions retained for the key.
        versions: u32,
    },
    /// A page of keys.
    Listing {
        /// The entries.
        entries: Entries<'a>,
        /// Continuation token (the last key returned) when more may follow; empty at the end.
        next: &'a [u8],
    },
    /// The request failed.
    Error {
        /// Why.
        code: ErrorCode,
        /// A human explanation.
        message: &'a str,
    },
    /// Replication status of the node.
    Replication {
        /// The node's clock reading (a timestamp), to measure lag against.
        now_ts: u64,
        /// The node's region.
        region: &'a str,
        /// One entry per source region.
        sources: Sources<'a>,
    },
    /// Reads at the asked timestamp are consistent on the node.
    Readable {
        /// The node's readable timestamp when it answered (at or above the one asked).
        readable_ts: u64,
        /// When it became readable, the node's clock in unix µs.
        at_us: u64,
    },
    /// A version's stored chunks.
    ChunkRefs {
        /// Version timestamp.
        ts: u64,
        /// Value size.
        size: u64,
        /// The chunks.
        chunks: ChunkRefs<'a>,
    },
}

/// Validated (BLAKE3, length) pairs of a `ChunkRefs` response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRefs<'a> {
    raw: &'a [u8],
}

impl<'a> ChunkRefs<'a> {
    const ENTRY: usize = 36;

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.raw.len() / Self::ENTRY
    }

    /// Whether there are none (an inline value).
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Each chunk's hash and length, in order.
    pub fn iter(&self) -> impl Iterator<Item = ([u8; 32], u32)> + 'a {
        self.raw.chunks_exact(Self::ENTRY).map(|entry| {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&entry[..32]);
            let mut len = [0u8; 4];
            len.copy_from_slice(&entry[32..]);
            (hash, u32::from_le_bytes(len))
        })
    }
}

/// Writes the body of a `ChunkRefs` response.
pub fn encode_chunk_refs(ts: u64, size: u64, chunks: &[([u8; 32], u32)], out: &mut Vec<u8>) {
    out.push(KIND_CHUNK_REFS);
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&u32::try_from(chunks.len()).unwrap_or(u32::MAX).to_le_bytes());
    for (hash, len) in chunks {
        out.extend_from_slice(hash);
        out.extend_from_slice(&len.to_le_bytes());
    }
}

impl<'a> Response<'a> {
    /// Decodes a response body.
    pub fn decode(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(body);
        let kind = r.u8("kind").map_err(|_| ProtoError::Empty)?;
        let response = match kind {
            KIND_HELLO => {
                let shard = r.u32("shard")?;
                Self::Hello { shard, addresses: Addresses::decode(&mut r)? }
            }
            KIND_WRITTEN => Self::Written { ts: r.u64("ts")? },
            KIND_VALUE => {
                let ts = r.u64("ts")?;
                Self::Value { ts, value: r.rest() }
            }
            KIND_NOT_FOUND => Self::NotFound,
            KIND_STAT => Self::Stat {
                ts: r.u64("ts")?,
                size: r.u64("size")?,
                chunks: r.u32("chunks")?,
                versions: r.u32("versions")?,
            },
            KIND_LISTING => {
                let entries = Entries::decode(&mut r)?;
                Self::Listing { entries, next: r.bytes16("next")? }
            }
            KIND_ERROR => {
                let code = ErrorCode::from_u16(r.u16("code")?);
                let message = std::str::from_utf8(r.rest()).map_err(|_| ProtoError::BadUtf8 { field: "message" })?;
                Self::Error { code, message }
            }
            KIND_REPLICATION => {
                let now_ts = r.u64("now_ts")?;
                let region =
                    std::str::from_utf8(r.bytes16("region")?).map_err(|_| ProtoError::BadUtf8 { field: "region" })?;
                Self::Replication { now_ts, region, sources: Sources::decode(&mut r)? }
            }
            KIND_READABLE => Self::Readable { readable_ts: r.u64("readable_ts")?, at_us: r.u64("at_us")? },
            KIND_CHUNK_REFS => {
                let ts = r.u64("ts")?;
                let size = r.u64("size")?;
                let count = r.u32("count")? as usize;
                let raw = r.take(
                    count.checked_mul(ChunkRefs::ENTRY).ok_or(ProtoError::Truncated { field: "chunks" })?,
                    "chunks",
                )?;
                Self::ChunkRefs { ts, size, chunks: ChunkRefs { raw } }
            }
            kind => return Err(ProtoError::UnknownResponse { kind }),
        };
        r.finish()?;
        Ok(response)
    }
}

/// Writes the body of a `Hello` response.
pub fn encode_hello<'s>(shard: u32, addresses: impl ExactSizeIterator<Item = &'s str>, out: &mut Vec<u8>) {
    out.push(KIND_HELLO);
    out.extend_from_slice(&shard.to_le_bytes());
    out.extend_from_slice(&u32::try_from(addresses.len()).unwrap_or(u32::MAX).to_le_bytes());
    for address in addresses {
        put_bytes16(out, address.as_bytes());
    }
}

/// Writes the body of a `Written` response.
pub fn encode_written(ts: u64, out: &mut Vec<u8>) {
    out.push(KIND_WRITTEN);
    out.extend_from_slice(&ts.to_le_bytes());
}

/// Writes the head of a `Value` response; the caller appends the value bytes.
pub fn encode_value_head(ts: u64, out: &mut Vec<u8>) {
    out.push(KIND_VALUE);
    out.extend_from_slice(&ts.to_le_bytes());
}

/// Writes the body of a `NotFound` response.
pub fn encode_not_found(out: &mut Vec<u8>) {
    out.push(KIND_NOT_FOUND);
}

/// Writes the body of a `Stat` response.
pub fn encode_stat(ts: u64, size: u64, chunks: u32, versions: u32, out: &mut Vec<u8>) {
    out.push(KIND_STAT);
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&chunks.to_le_bytes());
    out.extend_from_slice(&versions.to_le_bytes());
}

/// Writes the body of a `Listing` response. Keys longer than `u16::MAX` are truncated to
/// that length, which the store's key limit rules out.
pub fn encode_listing<'k>(entries: &[ListEntry<'k>], next: &[u8], out: &mut Vec<u8>) {
    out.push(KIND_LISTING);
    out.extend_from_slice(&u32::try_from(entries.len()).unwrap_or(u32::MAX).to_le_bytes());
    for entry in entries {
        put_bytes16(out, entry.key);
        out.extend_from_slice(&entry.ts.to_le_bytes());
        out.extend_from_slice(&entry.size.to_le_bytes());
    }
    put_bytes16(out, next);
}

/// Writes the body of a `Readable` response.
pub fn encode_readable(readable_ts: u64, at_us: u64, out: &mut Vec<u8>) {
    out.push(KIND_READABLE);
    out.extend_from_slice(&readable_ts.to_le_bytes());
    out.extend_from_slice(&at_us.to_le_bytes());
}

/// Writes the body of an `Error` response.
pub fn encode_error(code: ErrorCode, message: &str, out: &mut Vec<u8>) {
    out.push(KIND_ERROR);
    out.extend_from_slice(&code.to_u16().to_le_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// One source region of a `Replication` response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceStatus<'a> {
    /// The region shipping to this node.
    pub region: &'a str,
    /// Minimum closed timestamp applied over its shards (0 until every shard reported one).
    pub resolved_ts: u64,
    /// Shards that have reported a closed timestamp.
    pub shards_closed: u32,
    /// Shards of the source.
    pub shards: u32,
}

/// Validated entries of a `Replication` response; iterate with [`Sources::iter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sources<'a> {
    count: u32,
    raw: &'a [u8],
}

impl<'a> Sources<'a> {
    fn decode(r: &mut Reader<'a>) -> Result<Self, ProtoError> {
        let count = r.u32("count")?;
        let start = r.pos;
        for _ in 0..count {
            std::str::from_utf8(r.bytes16("source")?).map_err(|_| ProtoError::BadUtf8 { field: "source" })?;
            r.take(16, "source status")?;
        }
        Ok(Self { count, raw: &r.bytes[start..r.pos] })
    }

    /// Number of source regions.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each source region's status.
    pub fn iter(&self) -> impl Iterator<Item = SourceStatus<'a>> + 'a {
        let mut r = Reader::new(self.raw);
        (0..self.count).map_while(move |_| {
            Some(SourceStatus {
                region: std::str::from_utf8(r.bytes16("source").ok()?).ok()?,
                resolved_ts: r.u64("resolved_ts").ok()?,
                shards_closed: r.u32("shards_closed").ok()?,
                shards: r.u32("shards").ok()?,
            })
        })
    }
}

/// Writes the body of a `Replication` response.
pub fn encode_replication(now_ts: u64, region: &str, sources: &[SourceStatus<'_>], out: &mut Vec<u8>) {
    out.push(KIND_REPLICATION);
    out.extend_from_slice(&now_ts.to_le_bytes());
    put_bytes16(out, region.as_bytes());
    out.extend_from_slice(&u32::try_from(sources.len()).unwrap_or(u32::MAX).to_le_bytes());
    for source in sources {
        put_bytes16(out, source.region.as_bytes());
        out.extend_from_slice(&source.resolved_ts.to_le_bytes());
        out.extend_from_slice(&source.shards_closed.to_le_bytes());
        out.extend_from_slice(&source.shards.to_le_bytes());
    }
}

/// Frames a body: reserves the header in `out` before calling `body`, then fills it in.
/// `out` is cleared first.
pub fn frame(
    out: &mut Vec<u8>,
    record_type: RecordType,
    seq: u64,
    body: impl FnOnce(&mut Vec<u8>),
) -> Result<(), EncodeError> {
    out.clear();
    out.resize(HEADER_BYTES, 0);
    body(out);
    let header = encode_header(record_type, 0, seq, &out[HEADER_BYTES..])?;
    out[..HEADER_BYTES].copy_from_slice(&header);
    Ok(())
}

/// Appends a u16-length-prefixed field; longer input is cut at `u16::MAX` bytes (callers
/// check key limits before encoding).
pub(crate) fn put_bytes16(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(&bytes[..len]);
}

/// A bounds-checked little-endian reader over a body.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(crate) fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], ProtoError> {
        let end =
            self.pos.checked_add(len).filter(|end| *end <= self.bytes.len()).ok_or(ProtoError::Truncated { field })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, ProtoError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn bytes16(&mut self, field: &'static str) -> Result<&'a [u8], ProtoError> {
        let len = self.u16(field)?;
        self.take(usize::from(len), field)
    }

    pub(crate) fn bytes32(&mut self, field: &'static str) -> Result<&'a [u8], ProtoError> {
        let len = self.u32(field)?;
        self.take(len as usize, field)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let out = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        out
    }

    pub(crate) fn finish(&self) -> Result<(), ProtoError> {
        match self.bytes.len() - self.pos {
            0 => Ok(()),
            count => Err(ProtoError::TrailingBytes { count }),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn roundtrip(request: Request<'_>) {
        let mut body = Vec::new();
        request.encode(&mut body);
        assert_eq!(Request::decode(&body), Ok(request));
        for cut in 0..body.len() {
            let _ = Request::decode(&body[..cut]);
        }
    }

    #[test]
    fn requests_roundtrip() {
        roundtrip(Request::Hello);
        roundtrip(Request::Put { key: b"k", value: b"value" });
        roundtrip(Request::Put { key: b"k", value: b"" });
        roundtrip(Request::Get { key: b"key", at: None });
        roundtrip(Request::Get { key: b"key", at: Some(42) });
        roundtrip(Request::Delete { key: b"gone" });
        roundtrip(Request::List { prefix: b"a/", start_after: b"a/b", limit: 10, at: Some(7) });
        roundtrip(Request::Stat { key: b"s", at: None });
        roundtrip(Request::Replication);
        roundtrip(Request::WaitReadable { ts: 1 << 40, timeout_ms: 5000 });
        roundtrip(Request::ChunkRefs { key: b"f", at: Some(9) });
        roundtrip(Request::GetRange { key: b"f", at: None, offset: 1 << 33, len: 65536 });
    }

    #[test]
    fn batch_put_roundtrips() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"a", b"1"), (b"bb", b""), (b"c", b"333")];
        let mut body = Vec::new();
        encode_batch_put(pairs.iter().copied(), &mut body).unwrap();
        let Ok(Request::BatchPut { items }) = Request::decode(&body) else { panic!("not a batch") };
        assert_eq!(items.len(), 3);
        assert_eq!(items.iter().collect::<Vec<_>>(), pairs);
        let mut again = Vec::new();
        Request::BatchPut { items }.encode(&mut again);
        assert_eq!(again, body);
    }

    #[test]
    fn responses_roundtrip() {
        let mut body = Vec::new();
        encode_hello(1, ["127.0.0.1:1", "127.0.0.1:2"].into_iter(), &mut body);
        let Ok(Response::Hello { shard: 1, addresses }) = Response::decode(&body) else { panic!() };
        assert_eq!(addresses.iter().collect::<Vec<_>>(), ["127.0.0.1:1", "127.0.0.1:2"]);

        body.clear();
        encode_written(9, &mut body);
        assert_eq!(Response::decode(&body), Ok(Response::Written { ts: 9 }));

        body.clear();
        encode_value_head(5, &mut body);
        body.extend_from_slice(b"abc");
        assert_eq!(Response::decode(&body), Ok(Response::Value { ts: 5, value: b"abc" }));

        body.clear();
        encode_not_found(&mut body);
        assert_eq!(Response::decode(&body), Ok(Response::NotFound));

        body.clear();
        encode_stat(1, 2, 3, 4, &mut body);
        assert_eq!(Response::decode(&body), Ok(Response::Stat { ts: 1, size: 2, chunks: 3, versions: 4 }));

        body.clear();
        let entries = [ListEntry { key: b"a", ts: 1, size: 2 }, ListEntry { key: b"b", ts: 3, size: 4 }];
        encode_listing(&entries, b"b", &mut body);
        let Ok(Response::Listing { entries: got, next }) = Response::decode(&body) else { panic!() };
        assert_eq!(got.iter().collect::<Vec<_>>(), entries);
        assert_eq!(next, b"b");

        body.clear();
        encode_error(ErrorCode::KeyTooLarge, "key of 5000 bytes exceeds 4096", &mut body);
        assert_eq!(
            Response::decode(&body),
            Ok(Response::Error { code: ErrorCode::KeyTooLarge, message: "key of 5000 bytes exceeds 4096" })
        );

        body.clear();
        let sources = [
            SourceStatus { region: "eu", resolved_ts: 77, shards_closed: 2, shards: 2 },
            SourceStatus { region: "us", resolved_ts: 0, shards_closed: 1, shards: 2 },
        ];
        encode_replication(99, "ap", &sources, &mut body);
        let Ok(Response::Replication { now_ts: 99, region: "ap", sources: got }) = Response::decode(&body) else {
            panic!()
        };
        assert_eq!(got.iter().collect::<Vec<_>>(), sources);
        for cut in 0..body.len() {
            assert!(Response::decode(&body[..cut]).is_err());
        }

        body.clear();
        encode_readable(1 << 40, 1_700_000_000_000_000, &mut body);
        assert_eq!(
            Response::decode(&body),
            Ok(Response::Readable { readable_ts: 1 << 40, at_us: 1_700_000_000_000_000 })
        );
        assert_eq!(Response::decode(&body[..body.len() - 1]), Err(ProtoError::Truncated { field: "at_us" }));

        body.clear();
        let chunks = [([1u8; 32], 65536), ([2u8; 32], 100)];
        encode_chunk_refs(7, 65636, &chunks, &mut body);
        let Ok(Response::ChunkRefs { ts: 7, size: 65636, chunks: got }) = Response::decode(&body) else { panic!() };
        assert_eq!(got.iter().collect::<Vec<_>>(), chunks);
        for cut in 0..body.len() {
            assert!(Response::decode(&body[..cut]).is_err());
        }
    }

    #[test]
    fn typed_errors() {
        assert_eq!(Request::decode(&[]), Err(ProtoError::Empty));
        assert_eq!(Request::decode(&[99]), Err(ProtoError::UnknownRequest { op: 99 }));
        assert_eq!(Response::decode(&[99]), Err(ProtoError::UnknownResponse { kind: 99 }));
        assert_eq!(Request::decode(&[OP_DELETE, 5, 0, b'a']), Err(ProtoError::Truncated { field: "key" }));
        assert_eq!(Request::decode(&[OP_HELLO, 0]), Err(ProtoError::TrailingBytes { count: 1 }));
        assert_eq!(Response::decode(&[KIND_ERROR, 1, 0, 0xff]), Err(ProtoError::BadUtf8 { field: "message" }));
        // A batch announcing more pairs than it holds.
        assert_eq!(Request::decode(&[OP_BATCH_PUT, 9, 0, 0, 0]), Err(ProtoError::Truncated { field: "key" }));
    }

    #[test]
    fn error_codes_roundtrip() {
        for code in 0..=20u16 {
            assert_eq!(ErrorCode::from_u16(code).to_u16(), code);
        }
    }

    #[test]
    fn frame_fills_a_valid_header() {
        let mut out = Vec::new();
        frame(&mut out, RecordType::Request, 77, |out| Request::Delete { key: b"x" }.encode(out)).unwrap();
        let (record, used) = crate::decode(&out, 1024).unwrap();
        assert_eq!(used, out.len());
        assert_eq!(record.seq, 77);
        assert_eq!(Request::decode(record.payload), Ok(Request::Delete { key: b"x" }));
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(request) = Request::decode(&bytes) {
                let mut again = Vec::new();
                request.encode(&mut again);
                prop_assert_eq!(Request::decode(&again), Ok(request));
            }
            if let Ok(Response::Listing { entries, .. }) = Response::decode(&bytes) {
                prop_assert_eq!(entries.iter().count(), entries.len());
            }
        }
    }
}
