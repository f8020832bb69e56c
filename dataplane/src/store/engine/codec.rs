//! How a version is laid out in the on-disk engine. Pure: no I/O.
//!
//! Engine key: the user key with every `0x00` byte written as `0x00 0xFF`, then the terminator
//! `0x00 0x01`, then `u64::MAX - ts` big-endian. Byte order of engine keys is then the order of
//! user keys, and within one user key the newest version comes first, so "the version of `k`
//! at `ts`" is the first engine key at or after `(k, ts)`. Escaping keeps a prefix of user keys a
//! prefix of engine keys (listing by prefix is a range of the engine), and keeps the versions of
//! `a` apart from keys such as `a\x00…` or `ab`, which plain concatenation would interleave.
//! A version whose value is a chunk list has one more byte, `C`, after the timestamp: retention
//! learns from the key alone which destroyed versions hold chunks, without reading values that
//! lsm-tree keeps in blob files (one random read per destroyed version). Timestamps are unique
//! per key, so the byte never changes the order; [`key_end`] is past every version of a key.
//!
//! Engine value: a tag byte, then `Inline`: the bytes; `Chunked`: total size (u64 LE), chunk
//! count (u32 LE), each chunk's BLAKE3 hash and length (u32 LE); `Tombstone`: nothing.

use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use crate::store::op::{Body, CHUNK_HASH_BYTES, ChunkList, ChunkRef};

const ESCAPE: u8 = 0x00;
const ESCAPED_ZERO: u8 = 0xFF;
const TERMINATOR: u8 = 0x01;
const TS_BYTES: usize = 8;
/// After the timestamp of a version whose value is a chunk list.
const CHUNKED_MARK: u8 = b'C';

const TAG_INLINE: u8 = 1;
const TAG_CHUNKED: u8 = 2;
const TAG_TOMBSTONE: u8 = 3;
const CHUNK_BYTES: usize = CHUNK_HASH_BYTES + 4;

/// Why engine bytes do not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The key has no `0x00 0x01` terminator.
    #[error("engine key without a terminator")]
    Unterminated,
    /// `0x00` followed by something other than `0xFF` or the terminator.
    #[error("engine key has a bad escape 0x00 0x{0:02x} at byte {1}")]
    BadEscape(u8, usize),
    /// After the terminator, not the 8 timestamp bytes (and perhaps the chunked mark).
    #[error("engine key has {0} bytes after its terminator, not 8 or 8 and the chunked mark")]
    BadTimestamp(usize),
    /// An empty value.
    #[error("empty engine value")]
    Empty,
    /// A bookkeeping value (the replay LSN) of the wrong length.
    #[error("engine bookkeeping value of {0} bytes, not 16")]
    BadMeta(usize),
    /// An unknown tag byte.
    #[error("engine value has unknown tag {0}")]
    UnknownTag(u8),
    /// A chunked value whose length does not match its chunk count.
    #[error("chunked engine value of {len} bytes for {count} chunks")]
    BadChunkList {
        /// Bytes after the tag.
        len: usize,
        /// Chunks announced.
        count: u32,
    },
    /// A tombstone with bytes after the tag.
    #[error("tombstone with {0} bytes")]
    BadTombstone(usize),
}

/// Appends the escaped `user_key` (no terminator): the engine-key prefix of every user key
/// that starts with `user_key`.
pub fn escape_into(user_key: &[u8], out: &mut Vec<u8>) {
    for &byte in user_key {
        out.push(byte);
        if byte == ESCAPE {
            out.push(ESCAPED_ZERO);
        }
    }
}

/// The engine key of `user_key`'s version at `ts` whose value is not a chunk list (also the
/// bound "at or before `ts`" of reads).
pub fn encode_key(user_key: &[u8], ts: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(user_key.len() + 3 + TS_BYTES + user_key.len() / 16);
    escape_into(user_key, &mut out);
    out.extend_from_slice(&[ESCAPE, TERMINATOR]);
    out.extend_from_slice(&(u64::MAX - ts).to_be_bytes());
    out
}

/// The engine key of `user_key`'s version at `ts` holding `body`.
pub fn encode_version_key(user_key: &[u8], ts: u64, body: &Body) -> Vec<u8> {
    if matches!(body, Body::Chunked(_)) { encode_chunked_key(user_key, ts) } else { encode_key(user_key, ts) }
}

/// The engine key of `user_key`'s version at `ts` whose value is a chunk list.
pub fn encode_chunked_key(user_key: &[u8], ts: u64) -> Vec<u8> {
    let mut out = encode_key(user_key, ts);
    out.push(CHUNKED_MARK);
    out
}

/// An engine key after every version of `user_key` and before any other user key's.
pub fn key_end(user_key: &[u8]) -> Vec<u8> {
    let mut out = encode_key(user_key, 0);
    out.push(u8::MAX);
    out
}

/// The user key and timestamp of an engine key.
pub fn decode_key(bytes: &[u8]) -> Result<(Vec<u8>, u64), CodecError> {
    decode_version_key(bytes).map(|(key, ts, _)| (key, ts))
}

/// The user key, timestamp and chunked mark of an engine key.
pub fn decode_version_key(bytes: &[u8]) -> Result<(Vec<u8>, u64, bool), CodecError> {
    let mut user_key = Vec::with_capacity(bytes.len().saturating_sub(2 + TS_BYTES));
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if byte != ESCAPE {
            user_key.push(byte);
            index += 1;
            continue;
        }
        match bytes.get(index + 1) {
            Some(&ESCAPED_ZERO) => {
                user_key.push(ESCAPE);
                index += 2;
            }
            Some(&TERMINATOR) => {
                let rest = &bytes[index + 2..];
                let (ts, chunked) = match rest.split_first_chunk::<TS_BYTES>() {
                    Some((ts, [])) => (ts, false),
                    Some((ts, [CHUNKED_MARK])) => (ts, true),
                    _ => return Err(CodecError::BadTimestamp(rest.len())),
                };
                return Ok((user_key, u64::MAX - u64::from_be_bytes(*ts), chunked));
            }
            Some(&other) => return Err(CodecError::BadEscape(other, index)),
            None => return Err(CodecError::Unterminated),
        }
    }
    Err(CodecError::Unterminated)
}

/// The engine value of `body`.
pub fn encode_body(body: &Body) -> Vec<u8> {
    match body {
        Body::Inline(value) => {
            let mut out = Vec::with_capacity(1 + value.len());
            out.push(TAG_INLINE);
            out.extend_from_slice(value);
            out
        }
        Body::Chunked(list) => {
            let mut out = Vec::with_capacity(1 + 8 + 4 + list.chunks.len() * CHUNK_BYTES);
            out.push(TAG_CHUNKED);
            out.extend_from_slice(&list.size.to_le_bytes());
            // A chunk list of a value under the record limit has far fewer than 2^32 chunks.
            out.extend_from_slice(&u32::try_from(list.chunks.len()).unwrap_or(u32::MAX).to_le_bytes());
            for chunk in &list.chunks {
                out.extend_from_slice(&chunk.hash);
                out.extend_from_slice(&chunk.len.to_le_bytes());
            }
            out
        }
        Body::Tombstone => vec![TAG_TOMBSTONE],
    }
}

/// The body an engine value holds (an inline value is copied out).
pub fn decode_body(bytes: &[u8]) -> Result<Body, CodecError> {
    let (&tag, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    match tag {
        TAG_INLINE => Ok(Body::Inline(Bytes::copy_from_slice(rest))),
        TAG_TOMBSTONE if rest.is_empty() => Ok(Body::Tombstone),
        TAG_TOMBSTONE => Err(CodecError::BadTombstone(rest.len())),
        TAG_CHUNKED => {
            let bad = |count| CodecError::BadChunkList { len: rest.len(), count };
            let (size, rest) = rest.split_first_chunk::<8>().ok_or(bad(0))?;
            let (count, chunks) = rest.split_first_chunk::<4>().ok_or(bad(0))?;
            let count = u32::from_le_bytes(*count);
            if chunks.len() != count as usize * CHUNK_BYTES {
                return Err(CodecError::BadChunkList { len: bytes.len() - 1, count });
            }
            let chunks = chunks
                .chunks_exact(CHUNK_BYTES)
                .map(|chunk| {
                    let (hash, len) = chunk.split_at(CHUNK_HASH_BYTES);
                    let mut hash_bytes = [0_u8; CHUNK_HASH_BYTES];
                    hash_bytes.copy_from_slice(hash);
                    let mut len_bytes = [0_u8; 4];
                    len_bytes.copy_from_slice(len);
                    ChunkRef { hash: hash_bytes, len: u32::from_le_bytes(len_bytes) }
                })
                .collect();
            Ok(Body::Chunked(Arc::new(ChunkList { size: u64::from_le_bytes(*size), chunks })))
        }
        other => Err(CodecError::UnknownTag(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bodies_round_trip() {
        let chunked = Body::Chunked(Arc::new(ChunkList {
            size: 70_000,
            chunks: vec![ChunkRef { hash: [7; 32], len: 65_536 }, ChunkRef { hash: [9; 32], len: 4_464 }],
        }));
        for body in [Body::Inline(Bytes::from_static(b"v\x00al")), Body::Inline(Bytes::new()), chunked, Body::Tombstone]
        {
            assert_eq!(decode_body(&encode_body(&body)), Ok(body));
        }
        assert_eq!(decode_body(&[]), Err(CodecError::Empty));
        assert_eq!(decode_body(&[9]), Err(CodecError::UnknownTag(9)));
        assert_eq!(decode_body(&[TAG_TOMBSTONE, 0]), Err(CodecError::BadTombstone(1)));
        assert!(matches!(decode_body(&[TAG_CHUNKED, 1, 2]), Err(CodecError::BadChunkList { .. })));
    }

    #[test]
    fn bad_keys_are_named() {
        assert_eq!(decode_key(b"abc"), Err(CodecError::Unterminated));
        assert_eq!(decode_key(b"ab\x00"), Err(CodecError::Unterminated));
        assert_eq!(decode_key(b"a\x00\x05"), Err(CodecError::BadEscape(5, 1)));
        assert_eq!(decode_key(b"a\x00\x01\x00"), Err(CodecError::BadTimestamp(1)));
        assert_eq!(decode_key(b"a\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00X"), Err(CodecError::BadTimestamp(9)));
    }

    proptest! {
        #[test]
        fn keys_round_trip(key in proptest::collection::vec(any::<u8>(), 0..40), ts: u64) {
            prop_assert_eq!(decode_key(&encode_key(&key, ts)), Ok((key.clone(), ts)));
            let chunked = Body::Chunked(Arc::new(ChunkList { size: 0, chunks: Vec::new() }));
            let marked = encode_version_key(&key, ts, &chunked);
            prop_assert_eq!(&marked, &encode_chunked_key(&key, ts));
            prop_assert_eq!(decode_version_key(&marked), Ok((key.clone(), ts, true)));
            prop_assert_eq!(encode_version_key(&key, ts, &Body::Tombstone), encode_key(&key, ts));
            // The mark stays among the key's versions: after the bound at `ts`, before the end.
            prop_assert!(encode_key(&key, ts) < marked && marked < key_end(&key));
        }

        /// Engine-key order is (user key ascending, timestamp descending), whatever the bytes.
        #[test]
        fn engine_order_is_key_then_newest_first(
            a in proptest::collection::vec(prop_oneof![Just(0_u8), Just(1), Just(0xFF), any::<u8>()], 0..6),
            b in proptest::collection::vec(prop_oneof![Just(0_u8), Just(1), Just(0xFF), any::<u8>()], 0..6),
            ts_a: u64,
            ts_b: u64,
        ) {
            let expected = a.cmp(&b).then(ts_b.cmp(&ts_a));
            prop_assert_eq!(encode_key(&a, ts_a).cmp(&encode_key(&b, ts_b)), expected);
            let chunked = Body::Chunked(Arc::new(ChunkList { size: 0, chunks: Vec::new() }));
            if ts_a != ts_b || a != b {
                prop_assert_eq!(encode_version_key(&a, ts_a, &chunked).cmp(&encode_key(&b, ts_b)), expected);
            }
            if a < b {
                prop_assert!(key_end(&a) < encode_key(&b, ts_b));
            }
            // A user-key prefix is an engine-key prefix.
            let mut prefix = Vec::new();
            escape_into(&a, &mut prefix);
            prop_assert!(encode_key(&[a.clone(), b.clone()].concat(), ts_b).starts_with(&prefix));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode_key(&bytes);
            let _ = decode_body(&bytes);
        }
    }
}
