//! The archive's bytes: packs of compressed chunks and snapshot indexes. Pure: encoders write
//! into buffers, decoders return a typed [`FormatError`] for any input and never panic (fuzz
//! target `archive_decode`).
//!
//! A pack is `PACK_MAGIC` then entries, each
//! `id (32, BLAKE3 of the raw chunk) | raw_len (u32) | stored_len (u32) | codec (u8) | crc32c
//! of the stored bytes (u32) | stored bytes`, little endian. An index locates each chunk by
//! pack and entry offset, so a restore reads only the entries it needs.
//!
//! A snapshot index is `INDEX_MAGIC | crc32c (u32) of the rest | body_len (u64) | zstd(JSON of
//! [`SnapshotIndex`])`. Every index is complete (all keys of its snapshot); `parent` names the
//! snapshot an incremental export started from.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// First bytes of a pack.
pub const PACK_MAGIC: &[u8; 8] = b"MRDPACK1";
/// First bytes of a snapshot index.
pub const INDEX_MAGIC: &[u8; 8] = b"MRDIDX01";
/// Bytes of an entry's head before the stored bytes.
pub const ENTRY_HEAD_BYTES: usize = 32 + 4 + 4 + 1 + 4;
/// The largest chunk (raw) an entry may hold.
pub const CHUNK_BYTES_MAX: u32 = 16 << 20;
/// The largest decompressed index accepted.
pub const INDEX_BYTES_MAX: usize = 1 << 30;

/// Stored bytes as they are.
pub const CODEC_NONE: u8 = 0;
/// Stored bytes are a zstd frame.
pub const CODEC_ZSTD: u8 = 1;

/// Why bytes are not a valid pack, entry or index.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// The magic bytes are wrong.
    #[error("not a {what}: bad magic")]
    BadMagic {
        /// Pack or index.
        what: &'static str,
    },
    /// The bytes end inside a field.
    #[error("truncated {what} at byte {at}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where.
        at: usize,
    },
    /// A checksum does not match.
    #[error("{what} checksum mismatch at byte {at}")]
    Checksum {
        /// What was checked.
        what: &'static str,
        /// Where.
        at: usize,
    },
    /// A length or codec out of range.
    #[error("bad {what} at byte {at}: {value}")]
    Bad {
        /// The field.
        what: &'static str,
        /// Where.
        at: usize,
        /// The value found.
        value: u64,
    },
    /// Decompression failed or the result has the wrong length.
    #[error("chunk {id} does not decompress: {reason}")]
    Decompress {
        /// The chunk.
        id: String,
        /// Why.
        reason: String,
    },
    /// The raw chunk does not hash to its id.
    #[error("chunk {id} is corrupt: its BLAKE3 is {found}")]
    WrongHash {
        /// The id it should have.
        id: String,
        /// What the bytes hash to.
        found: String,
    },
    /// The index body is not a snapshot index.
    #[error("bad index body: {0}")]
    Body(String),
}

/// A chunk id: BLAKE3 of the raw chunk.
pub type ChunkId = [u8; 32];

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}

/// Bytes from lower-case or upper-case hex; `None` if it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok()).collect()
}

/// One entry of a pack, borrowing its stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Chunk id.
    pub id: ChunkId,
    /// Raw (decompressed) length.
    pub raw_len: u32,
    /// Codec of `stored`.
    pub codec: u8,
    /// The stored bytes.
    pub stored: &'a [u8],
}

/// One chunk as a pack entry, compressed with zstd at `level` unless that does not make it
/// smaller.
pub fn encode_entry(id: &ChunkId, raw: &[u8], level: i32) -> Vec<u8> {
    let compressed = zstd::bulk::compress(raw, level).ok().filter(|c| c.len() < raw.len());
    let (codec, stored) = match &compressed {
        Some(bytes) => (CODEC_ZSTD, bytes.as_slice()),
        None => (CODEC_NONE, raw),
    };
    let mut entry = Vec::with_capacity(ENTRY_HEAD_BYTES + stored.len());
    entry.extend_from_slice(id);
    entry.extend_from_slice(&u32::try_from(raw.len()).unwrap_or(u32::MAX).to_le_bytes());
    entry.extend_from_slice(&u32::try_from(stored.len()).unwrap_or(u32::MAX).to_le_bytes());
    entry.push(codec);
    entry.extend_from_slice(&crc32c::crc32c(stored).to_le_bytes());
    entry.extend_from_slice(stored);
    entry
}

/// Appends one chunk to a pack buffer (the magic first, into an empty one). Returns the
/// entry's offset and total length in the pack.
pub fn append_entry(pack: &mut Vec<u8>, id: &ChunkId, raw: &[u8], level: i32) -> (u64, u32) {
    if pack.is_empty() {
        pack.extend_from_slice(PACK_MAGIC);
    }
    let offset = pack.len() as u64;
    let entry = encode_entry(id, raw, level);
    pack.extend_from_slice(&entry);
    (offset, u32::try_from(entry.len()).unwrap_or(u32::MAX))
}

fn u32_at(bytes: &[u8], at: usize, what: &'static str) -> Result<u32, FormatError> {
    let field = bytes.get(at..at + 4).ok_or(FormatError::Truncated { what, at })?;
    Ok(u32::from_le_bytes(field.try_into().map_err(|_| FormatError::Truncated { what, at })?))
}

/// Decodes the entry at the start of `bytes` (an entry read on its own or inside a pack at
/// `at`); checks its CRC. Returns the entry and its total length.
pub fn decode_entry(bytes: &[u8], at: usize) -> Result<(Entry<'_>, usize), FormatError> {
    let head = bytes.get(..ENTRY_HEAD_BYTES).ok_or(FormatError::Truncated { what: "pack entry", at })?;
    let mut id = [0u8; 32];
    id.copy_from_slice(&head[..32]);
    let raw_len = u32_at(head, 32, "raw length")?;
    let stored_len = u32_at(head, 36, "stored length")?;
    let codec = head[40];
    let crc = u32_at(head, 41, "crc")?;
    if raw_len > CHUNK_BYTES_MAX {
        return Err(FormatError::Bad { what: "raw length", at: at + 32, value: u64::from(raw_len) });
    }
    if codec != CODEC_NONE && codec != CODEC_ZSTD {
        return Err(FormatError::Bad { what: "codec", at: at + 40, value: u64::from(codec) });
    }
    let end = ENTRY_HEAD_BYTES + stored_len as usize;
    let stored = bytes.get(ENTRY_HEAD_BYTES..end).ok_or(FormatError::Truncated { what: "stored bytes", at })?;
    if crc32c::crc32c(stored) != crc {
        return Err(FormatError::Checksum { what: "chunk", at });
    }
    Ok((Entry { id, raw_len, codec, stored }, end))
}

/// Every entry of a whole pack, in order, each with its offset.
pub fn decode_pack(bytes: &[u8]) -> Result<Vec<(u64, Entry<'_>)>, FormatError> {
    if bytes.get(..PACK_MAGIC.len()) != Some(PACK_MAGIC.as_slice()) {
        return Err(FormatError::BadMagic { what: "pack" });
    }
    let mut at = PACK_MAGIC.len();
    let mut entries = Vec::new();
    while at < bytes.len() {
        let (entry, used) = decode_entry(&bytes[at..], at)?;
        entries.push((at as u64, entry));
        at += used;
    }
    Ok(entries)
}

/// The raw chunk of an entry, checked against its id.
pub fn open_entry(entry: &Entry<'_>) -> Result<Vec<u8>, FormatError> {
    let raw = match entry.codec {
        CODEC_NONE => entry.stored.to_vec(),
        _ => zstd::bulk::decompress(entry.stored, entry.raw_len as usize)
            .map_err(|error| FormatError::Decompress { id: hex(&entry.id), reason: error.to_string() })?,
    };
    if raw.len() != entry.raw_len as usize {
        return Err(FormatError::Decompress {
            id: hex(&entry.id),
            reason: format!("{} bytes, expected {}", raw.len(), entry.raw_len),
        });
    }
    let found = blake3::hash(&raw);
    if found.as_bytes() != &entry.id {
        return Err(FormatError::WrongHash { id: hex(&entry.id), found: found.to_hex().to_string() });
    }
    Ok(raw)
}

/// Where a chunk is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// Pack object name (without directory).
    pub pack: String,
    /// Entry offset in the pack.
    pub offset: u64,
    /// Entry length (head and stored bytes).
    pub len: u32,
    /// Raw chunk length.
    pub raw: u32,
}

/// One key of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// The key, hex.
    pub key: String,
    /// Version timestamp.
    pub ts: u64,
    /// Value bytes.
    pub size: u64,
    /// Chunk ids (hex) in order.
    pub chunks: Vec<String>,
    /// The cluster's stored chunks of this version (BLAKE3 hex, length): the next export
    /// compares them with the new version's to read only the ranges that changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stored: Vec<(String, u32)>,
}

/// A snapshot in the archive: every key visible at `glt`, and where each chunk is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotIndex {
    /// The cluster's snapshot id.
    pub id: u64,
    /// Its timestamp.
    pub glt: u64,
    /// The archived snapshot this export was incremental from.
    pub parent: Option<u64>,
    /// When the export finished (unix ms).
    pub created_ms: u64,
    /// Keys in order.
    pub keys: Vec<KeyEntry>,
    /// Chunk id (hex) -> location.
    pub chunks: BTreeMap<String, Location>,
}

/// Encodes an index.
pub fn encode_index(index: &SnapshotIndex) -> Result<Vec<u8>, FormatError> {
    let json = serde_json::to_vec(index).map_err(|error| FormatError::Body(error.to_string()))?;
    let body = zstd::bulk::compress(&json, 3).map_err(|error| FormatError::Body(error.to_string()))?;
    let mut out = Vec::with_capacity(body.len() + 20);
    out.extend_from_slice(INDEX_MAGIC);
    let mut rest = (json.len() as u64).to_le_bytes().to_vec();
    rest.extend_from_slice(&body);
    out.extend_from_slice(&crc32c::crc32c(&rest).to_le_bytes());
    out.extend_from_slice(&rest);
    Ok(out)
}

/// Decodes an index.
pub fn decode_index(bytes: &[u8]) -> Result<SnapshotIndex, FormatError> {
    if bytes.get(..INDEX_MAGIC.len()) != Some(INDEX_MAGIC.as_slice()) {
        return Err(FormatError::BadMagic { what: "snapshot index" });
    }
    let crc = u32_at(bytes, 8, "index crc")?;
    let rest = bytes.get(12..).ok_or(FormatError::Truncated { what: "index", at: 12 })?;
    if crc32c::crc32c(rest) != crc {
        return Err(FormatError::Checksum { what: "index", at: 12 });
    }
    let len_bytes = rest.get(..8).ok_or(FormatError::Truncated { what: "index length", at: 12 })?;
    let len = u64::from_le_bytes(len_bytes.try_into().map_err(|_| FormatError::Truncated { what: "index", at: 12 })?);
    if len > INDEX_BYTES_MAX as u64 {
        return Err(FormatError::Bad { what: "index length", at: 12, value: len });
    }
    // Streamed with a bound: the length field is checked, never trusted for an allocation.
    let mut json = Vec::new();
    let decoder = zstd::stream::read::Decoder::new(&rest[8..]).map_err(|error| FormatError::Body(error.to_string()))?;
    std::io::Read::read_to_end(&mut std::io::Read::take(decoder, len + 1), &mut json)
        .map_err(|error| FormatError::Body(error.to_string()))?;
    if json.len() as u64 != len {
        return Err(FormatError::Bad { what: "index length", at: 12, value: json.len() as u64 });
    }
    serde_json::from_slice(&json).map_err(|error| FormatError::Body(error.to_string()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn chunk(text: &str) -> (ChunkId, Vec<u8>) {
        let raw = text.repeat(50).into_bytes();
        (*blake3::hash(&raw).as_bytes(), raw)
    }

    #[test]
    fn packs_round_trip_and_every_damage_is_named() {
        let mut pack = Vec::new();
        let (id1, raw1) = chunk("compressible text ");
        let (id2, raw2) = (*blake3::hash(&[7u8; 3]).as_bytes(), vec![7u8; 3]);
        let (at1, len1) = append_entry(&mut pack, &id1, &raw1, 3);
        let (at2, _) = append_entry(&mut pack, &id2, &raw2, 3);
        assert_eq!(at1, 8);
        assert_eq!(at2, at1 + u64::from(len1));
        let entries = decode_pack(&pack).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].1.codec, CODEC_ZSTD);
        assert_eq!(entries[1].1.codec, CODEC_NONE, "3 bytes do not compress");
        assert_eq!(open_entry(&entries[0].1).unwrap(), raw1);
        assert_eq!(open_entry(&entries[1].1).unwrap(), raw2);
        let at2 = usize::try_from(at2).unwrap();
        let (alone, _) = decode_entry(&pack[at2..], at2).unwrap();
        assert_eq!(open_entry(&alone).unwrap(), raw2);

        for at in 0..pack.len() {
            let mut damaged = pack.clone();
            damaged[at] ^= 0x01;
            let opened = decode_pack(&damaged)
                .and_then(|entries| entries.iter().map(|(_, entry)| open_entry(entry)).collect::<Result<Vec<_>, _>>());
            assert!(opened.is_err(), "a flip at byte {at} went unnoticed");
        }
        assert!(matches!(decode_pack(&pack[..pack.len() - 1]), Err(FormatError::Truncated { .. })));
        assert_eq!(decode_pack(b"nope"), Err(FormatError::BadMagic { what: "pack" }));
    }

    #[test]
    fn indexes_round_trip_and_refuse_damage() {
        let mut chunks = BTreeMap::new();
        chunks.insert("ab".repeat(32), Location { pack: "p1.pack".into(), offset: 8, len: 90, raw: 1000 });
        let index = SnapshotIndex {
            id: 4,
            glt: 77 << 12,
            parent: Some(3),
            created_ms: 1,
            keys: vec![KeyEntry {
                key: hex(b"k/1"),
                ts: 70 << 12,
                size: 1000,
                chunks: vec!["ab".repeat(32)],
                stored: vec![("cd".repeat(32), 1000)],
            }],
            chunks,
        };
        let bytes = encode_index(&index).unwrap();
        assert_eq!(decode_index(&bytes).unwrap(), index);
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert!(decode_index(&damaged).is_err(), "a flip at byte {at} went unnoticed");
        }
        for cut in 0..bytes.len() {
            assert!(decode_index(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(unhex(&hex(b"\x00\xffkey")).unwrap(), b"\x00\xffkey");
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_pack(&bytes);
            let _ = decode_index(&bytes);
            let _ = decode_entry(&bytes, 0);
            let mut pack = PACK_MAGIC.to_vec();
            pack.extend_from_slice(&bytes);
            if let Ok(entries) = decode_pack(&pack) {
                for (_, entry) in entries {
                    let _ = open_entry(&entry);
                }
            }
        }
    }
}
