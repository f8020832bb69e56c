//! The store's WAL record payload: one or more operations written atomically under the
//! record's timestamp (the WAL header's GLT). The same encoding holds each version in a
//! checkpoint file.
//!
//! Layout (little endian): `count: u16`, then `count` operations, each
//! `kind: u8, key_len: u16, key`, then by kind:
//!
//! | kind | operation | fields                                                    |
//! |-----:|-----------|-----------------------------------------------------------|
//! |    1 | put       | `len: u32, value`                                         |
//! |    2 | put       | chunked: `size: u64, n: u32, n × (blake3: [u8; 32], len: u32)` |
//! |    3 | delete    | (none)                                                    |
//!
//! [`decode`] is total: any bytes give operations or a typed [`OpError`] (fuzz target
//! `store_op_decode`). Decoding from `Bytes` hands out zero-copy slices.

use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

/// Bytes of a chunk id (BLAKE3).
pub const CHUNK_HASH_BYTES: usize = 32;

/// Where a chunk is: its content hash and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk's bytes.
    pub hash: [u8; CHUNK_HASH_BYTES],
    /// Length in bytes.
    pub len: u32,
}

/// A value stored as chunks, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkList {
    /// Total value size.
    pub size: u64,
    /// The chunks, concatenated in order.
    pub chunks: Vec<ChunkRef>,
}

/// What a version holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The value itself.
    Inline(Bytes),
    /// References into the chunk store.
    Chunked(Arc<ChunkList>),
    /// The key was deleted.
    Tombstone,
}

impl Body {
    /// Value size in bytes (0 for a tombstone).
    pub fn size(&self) -> u64 {
        match self {
            Self::Inline(value) => value.len() as u64,
            Self::Chunked(list) => list.size,
            Self::Tombstone => 0,
        }
    }
}

/// A borrowed body, what [`encode`] reads: lets a writer encode caller bytes without first
/// copying them into a [`Body`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// The value itself.
    Inline(&'a [u8]),
    /// References into the chunk store.
    Chunked(&'a ChunkList),
    /// The key was deleted.
    Tombstone,
}

impl Body {
    /// The borrowed view of this body.
    pub fn view(&self) -> Value<'_> {
        match self {
            Self::Inline(value) => Value::Inline(value),
            Self::Chunked(list) => Value::Chunked(list),
            Self::Tombstone => Value::Tombstone,
        }
    }
}

/// One operation: `key` gets `body`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// The key.
    pub key: Bytes,
    /// Its new version's body.
    pub body: Body,
}

impl Op {
    /// The operation with its key and inline value copied into memory of their own. Recovery
    /// decodes from memory-mapped checkpoint and WAL files, and a later checkpoint frees those
    /// files by punching holes in them (`files::delete_gradually`): a version that kept
    /// pointing into such a map would read zeros from then on.
    #[must_use]
    pub fn detached(self) -> Self {
        let body = match self.body {
            Body::Inline(value) => Body::Inline(Bytes::copy_from_slice(&value)),
            other => other,
        };
        Self { key: Bytes::copy_from_slice(&self.key), body }
    }
}

const KIND_INLINE: u8 = 1;
const KIND_CHUNKED: u8 = 2;
const KIND_TOMBSTONE: u8 = 3;

/// Why a payload is not a valid list of operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OpError {
    /// The payload ended inside a field.
    #[error("operation payload truncated in {field}")]
    Truncated {
        /// The field.
        field: &'static str,
    },
    /// An operation kind this build does not know.
    #[error("unknown operation kind {kind}")]
    UnknownKind {
        /// The byte found.
        kind: u8,
    },
    /// A record with no operations.
    #[error("record holds no operations")]
    Empty,
    /// Bytes after the last operation.
    #[error("{count} bytes after the last operation")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// A chunk list whose lengths do not add up to its size.
    #[error("chunk list of size {size} has chunks summing to {sum}")]
    ChunkSizeMismatch {
        /// The declared size.
        size: u64,
        /// The sum of the chunk lengths.
        sum: u64,
    },
    /// More operations or chunks than can be encoded.
    #[error("too many {what} for one record")]
    TooMany {
        /// Operations or chunks.
        what: &'static str,
    },
}

/// Bytes [`encode`] will write for these operations.
pub fn encoded_len<'a>(ops: impl IntoIterator<Item = (&'a [u8], Value<'a>)>) -> usize {
    2 + ops
        .into_iter()
        .map(|(key, body)| {
            3 + key.len()
                + match body {
                    Value::Inline(value) => 4 + value.len(),
                    Value::Chunked(list) => 12 + list.chunks.len() * (CHUNK_HASH_BYTES + 4),
                    Value::Tombstone => 0,
                }
        })
        .sum::<usize>()
}

/// Appends the encoding of `ops` to `out`. Keys must be at most `u16::MAX` bytes and inline
/// values at most `u32::MAX` (the store's limits are far below).
pub fn encode<'a>(ops: impl ExactSizeIterator<Item = (&'a [u8], Value<'a>)>, out: &mut Vec<u8>) -> Result<(), OpError> {
    let count = u16::try_from(ops.len()).map_err(|_| OpError::TooMany { what: "operations" })?;
    out.extend_from_slice(&count.to_le_bytes());
    for (key, body) in ops {
        let key_len = u16::try_from(key.len()).map_err(|_| OpError::TooMany { what: "key bytes" })?;
        let kind = match body {
            Value::Inline(_) => KIND_INLINE,
            Value::Chunked(_) => KIND_CHUNKED,
            Value::Tombstone => KIND_TOMBSTONE,
        };
        out.push(kind);
        out.extend_from_slice(&key_len.to_le_bytes());
        out.extend_from_slice(key);
        match body {
            Value::Inline(value) => {
                let len = u32::try_from(value.len()).map_err(|_| OpError::TooMany { what: "value bytes" })?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(value);
            }
            Value::Chunked(list) => {
                let n = u32::try_from(list.chunks.len()).map_err(|_| OpError::TooMany { what: "chunks" })?;
                out.extend_from_slice(&list.size.to_le_bytes());
                out.extend_from_slice(&n.to_le_bytes());
                for chunk in &list.chunks {
                    out.extend_from_slice(&chunk.hash);
                    out.extend_from_slice(&chunk.len.to_le_bytes());
                }
            }
            Value::Tombstone => {}
        }
    }
    Ok(())
}

/// The items of one record that take effect: within a record (one timestamp) the later item
/// of a key wins, so the earlier ones of the same key are dropped (the rest keep their order).
/// A key holds one version per timestamp, and the engine keys a chunk list apart from other
/// bodies, so both must never reach it.
pub fn later_wins<T>(items: Vec<T>, key: impl Fn(&T) -> &[u8]) -> Vec<T> {
    if items.len() < 2 {
        return items;
    }
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    let keep: Vec<bool> = items.iter().rev().map(|item| seen.insert(key(item))).collect();
    drop(seen);
    items.into_iter().zip(keep.into_iter().rev()).filter_map(|(item, keep)| keep.then_some(item)).collect()
}

/// Decodes the operations of one record; keys and inline values are slices of `payload`.
/// The payload of a record of no operations: a replica-set primary's epoch marker, the first
/// record of its lead (`crate::replica`). [`decode`] refuses it; readers of a set's log check
/// for it first.
pub const EPOCH_MARKER: [u8; 2] = [0, 0];

pub fn decode(payload: &Bytes) -> Result<Vec<Op>, OpError> {
    let mut r = Reader { payload, pos: 0 };
    let count = r.le(2, "count")?;
    if count == 0 {
        return Err(OpError::Empty);
    }
    let mut ops = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1024));
    for _ in 0..count {
        let kind = r.le(1, "kind")?;
        let key_len = r.le(2, "key length")?;
        let key = r.slice(key_len, "key")?;
        let body = match u8::try_from(kind).unwrap_or(u8::MAX) {
            KIND_INLINE => {
                let len = r.le(4, "value length")?;
                Body::Inline(r.slice(len, "value")?)
            }
            KIND_CHUNKED => {
                let size = r.le(8, "size")?;
                let n = r.le(4, "chunk count")?;
                // Bound the allocation by what the payload can hold.
                let room = (payload.len() - r.pos) / (CHUNK_HASH_BYTES + 4);
                let mut chunks = Vec::with_capacity(usize::try_from(n).unwrap_or(usize::MAX).min(room));
                let mut sum = 0u64;
                for _ in 0..n {
                    let mut hash = [0u8; CHUNK_HASH_BYTES];
                    hash.copy_from_slice(&r.slice(CHUNK_HASH_BYTES as u64, "chunk hash")?);
                    let len = u32::try_from(r.le(4, "chunk length")?).unwrap_or(u32::MAX);
                    sum = sum.saturating_add(u64::from(len));
                    chunks.push(ChunkRef { hash, len });
                }
                if sum != size {
                    return Err(OpError::ChunkSizeMismatch { size, sum });
                }
                Body::Chunked(Arc::new(ChunkList { size, chunks }))
            }
            KIND_TOMBSTONE => Body::Tombstone,
            kind => return Err(OpError::UnknownKind { kind }),
        };
        ops.push(Op { key, body });
    }
    match payload.len() - r.pos {
        0 => Ok(ops),
        count => Err(OpError::TrailingBytes { count }),
    }
}

struct Reader<'a> {
    payload: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn range(&mut self, len: u64, field: &'static str) -> Result<std::ops::Range<usize>, OpError> {
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| self.pos.checked_add(len))
            .filter(|end| *end <= self.payload.len())
            .ok_or(OpError::Truncated { field })?;
        let range = self.pos..end;
        self.pos = end;
        Ok(range)
    }

    /// A little-endian unsigned integer of `width` bytes.
    fn le(&mut self, width: u64, field: &'static str) -> Result<u64, OpError> {
        let range = self.range(width, field)?;
        Ok(self.payload[range].iter().rev().fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte)))
    }

    fn slice(&mut self, len: u64, field: &'static str) -> Result<Bytes, OpError> {
        let range = self.range(len, field)?;
        Ok(self.payload.slice(range))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn within_a_record_the_later_item_of_a_key_wins() {
        let items = vec![(&b"a"[..], 1), (b"b", 2), (b"a", 3), (b"c", 4), (b"b", 5)];
        assert_eq!(later_wins(items, |(key, _)| key), vec![(&b"a"[..], 3), (b"c", 4), (b"b", 5)]);
        assert_eq!(later_wins(vec![(&b"a"[..], 1)], |(key, _)| key), vec![(&b"a"[..], 1)]);
    }

    fn sample() -> Vec<Op> {
        let list = ChunkList {
            size: 10,
            chunks: vec![ChunkRef { hash: [1; 32], len: 4 }, ChunkRef { hash: [2; 32], len: 6 }],
        };
        vec![
            Op { key: Bytes::from_static(b"a"), body: Body::Inline(Bytes::from_static(b"value")) },
            Op { key: Bytes::from_static(b"big"), body: Body::Chunked(Arc::new(list)) },
            Op { key: Bytes::from_static(b"gone"), body: Body::Tombstone },
            Op { key: Bytes::from_static(b""), body: Body::Inline(Bytes::new()) },
        ]
    }

    #[test]
    fn roundtrip_and_length() {
        let ops = sample();
        let mut out = Vec::new();
        encode(ops.iter().map(|op| (&op.key[..], op.body.view())), &mut out).unwrap();
        assert_eq!(out.len(), encoded_len(ops.iter().map(|op| (&op.key[..], op.body.view()))));
        assert_eq!(decode(&Bytes::from(out)).unwrap(), ops);
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let ops = sample();
        let mut out = Vec::new();
        encode(ops.iter().map(|op| (&op.key[..], op.body.view())), &mut out).unwrap();
        for cut in 0..out.len() {
            assert!(decode(&Bytes::copy_from_slice(&out[..cut])).is_err(), "cut {cut}");
        }
        let mut longer = out.clone();
        longer.push(0);
        assert_eq!(decode(&Bytes::from(longer)), Err(OpError::TrailingBytes { count: 1 }));
    }

    #[test]
    fn named_errors() {
        assert_eq!(decode(&Bytes::from_static(&[0, 0])), Err(OpError::Empty));
        assert_eq!(decode(&Bytes::from_static(&[1, 0, 9, 0, 0])), Err(OpError::UnknownKind { kind: 9 }));
        // A chunk list declaring 5 bytes over chunks of 0.
        let bad = [1, 0, KIND_CHUNKED, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode(&Bytes::copy_from_slice(&bad)), Err(OpError::ChunkSizeMismatch { size: 5, sum: 0 }));
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(ops) = decode(&Bytes::from(bytes)) {
                let mut again = Vec::new();
                encode(ops.iter().map(|op| (&op.key[..], op.body.view())), &mut again).unwrap();
                prop_assert_eq!(decode(&Bytes::from(again)).unwrap(), ops);
            }
        }
    }
}
