//! The archive's bytes: packs of compressed chunks and snapshot indexes. Pure: encoders write
//! into buffers, decoders return a typed [`FormatError`] for any input and never panic (fuzz
//! target `archive_decode`).
//!
//! A pack is `PACK_MAGIC` then entries, each
//! `id (32, BLAKE3 of the raw chunk) | raw_len (u32) | stored_len (u32) | codec (u8) | crc32c
//! of the stored bytes (u32) | stored bytes`, little endian. An index locates each chunk by
//! pack and entry offset, so a restore reads only the entries it needs.
//!
//! A snapshot index is `INDEX_MAGIC | crc32c (u32) of the body | body`, binary tables of its
//! packs, chunks and keys ([`encode_index`]). Every index is complete (all keys of its
//! snapshot); `parent` names the snapshot an incremental export started from.

use std::cell::RefCell;
use std::collections::HashMap;

use thiserror::Error;

/// First bytes of a pack.
pub const PACK_MAGIC: &[u8; 8] = b"MRDPACK1";
/// First bytes of a snapshot index.
pub const INDEX_MAGIC: &[u8; 8] = b"MRDIDX02";
/// Bytes of an entry's head before the stored bytes.
pub const ENTRY_HEAD_BYTES: usize = 32 + 4 + 4 + 1 + 4;
/// The largest chunk (raw) an entry may hold.
pub const CHUNK_BYTES_MAX: u32 = 16 << 20;

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

/// A map keyed by chunk id (tens of thousands per export), with the workspace's fast hasher.
pub type ChunkMap<V> = HashMap<ChunkId, V, ahash::RandomState>;

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
    if !text.len().is_multiple_of(2) {
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

thread_local! {
    /// Each thread's zstd context, kept between chunks (a new one per chunk costs more than
    /// compressing a small chunk), with its level.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

/// `raw` compressed at `level` with this thread's context; `None` if zstd fails.
fn compress(raw: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(kept, _)| *kept != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        slot.as_mut()?.1.compress(raw).ok()
    })
}

/// One chunk as a pack entry, compressed with zstd at `level` unless that does not make it
/// smaller.
pub fn encode_entry(id: &ChunkId, raw: &[u8], level: i32) -> Vec<u8> {
    let compressed = compress(raw, level).filter(|c| c.len() < raw.len());
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

/// Appends an encoded entry ([`encode_entry`]) to a pack buffer (the magic first, into an
/// empty one). Returns the entry's offset and total length in the pack.
pub fn append_entry(pack: &mut Vec<u8>, entry: &[u8]) -> (u64, u32) {
    if pack.is_empty() {
        pack.extend_from_slice(PACK_MAGIC);
    }
    let offset = pack.len() as u64;
    pack.extend_from_slice(entry);
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

/// A pack's id: the first 16 bytes of the BLAKE3 of its content. Its object is
/// `packs/<hex id>.pack` ([`pack_name`]).
pub type PackId = [u8; 16];

/// The object name (without directory) of pack `id`.
pub fn pack_name(id: &PackId) -> String {
    format!("{}.pack", hex(id))
}

/// The pack id an object name stands for; `None` for a name no pack has.
pub fn parse_pack_name(name: &str) -> Option<PackId> {
    unhex(name.strip_suffix(".pack")?)?.try_into().ok()
}

/// Where a chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The pack.
    pub pack: PackId,
    /// Entry offset in the pack.
    pub offset: u64,
    /// Entry length (head and stored bytes).
    pub len: u32,
    /// Raw chunk length.
    pub raw: u32,
}

/// One key of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// The key.
    pub key: Vec<u8>,
    /// Version timestamp.
    pub ts: u64,
    /// Value bytes.
    pub size: u64,
    /// Chunk ids in order.
    pub chunks: Vec<ChunkId>,
    /// The cluster's stored chunks of this version (BLAKE3, length): the next export compares
    /// them with the new version's to read only the ranges that changed.
    pub stored: Vec<([u8; 32], u32)>,
}

/// A snapshot in the archive: every key visible at `glt`, and where each chunk is.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Chunk id -> location.
    pub chunks: ChunkMap<Location>,
}

/// Bytes of one chunk-table row: id, pack number, offset, entry length, raw length.
const CHUNK_ROW_BYTES: usize = 32 + 4 + 8 + 4 + 4;
/// Bytes of a key row without its variable parts.
const KEY_ROW_BYTES: usize = 4 + 8 + 8 + 4 + 4;

fn count(n: usize, what: &str) -> Result<[u8; 4], FormatError> {
    u32::try_from(n).map(u32::to_le_bytes).map_err(|_| FormatError::Body(format!("too many {what}: {n}")))
}

/// Encodes an index: `INDEX_MAGIC | crc32c (u32) of the body | body`, the body little
/// endian:
/// `id u64 | glt u64 | has_parent u8 | parent u64 | created_ms u64 |`
/// `packs u32 | pack id (16) ... |`
/// `chunks u32 | (chunk id (32) | pack number u32 | offset u64 | len u32 | raw u32) ... |`
/// `keys u32 | (key_len u32 | key | ts u64 | size u64 | n u32 | chunk number u32 ... |`
/// `stored u32 | (hash (32) | len u32) ...) ...`
/// Each chunk is listed once, in no particular order; keys name them by their number in that table.
pub fn encode_index(index: &SnapshotIndex) -> Result<Vec<u8>, FormatError> {
    let packs: Vec<PackId> = {
        let mut ids: Vec<PackId> = index.chunks.values().map(|at| at.pack).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let numbers: ChunkMap<u32> = index.chunks.keys().copied().zip(0u32..).collect();
    let refs: usize =
        index.keys.iter().map(|entry| entry.key.len() + entry.chunks.len() * 4 + entry.stored.len() * 36).sum();
    let mut body = Vec::with_capacity(
        64 + packs.len() * 16 + index.chunks.len() * CHUNK_ROW_BYTES + index.keys.len() * KEY_ROW_BYTES + refs,
    );
    body.extend_from_slice(&index.id.to_le_bytes());
    body.extend_from_slice(&index.glt.to_le_bytes());
    body.push(u8::from(index.parent.is_some()));
    body.extend_from_slice(&index.parent.unwrap_or(0).to_le_bytes());
    body.extend_from_slice(&index.created_ms.to_le_bytes());
    body.extend_from_slice(&count(packs.len(), "packs")?);
    for pack in &packs {
        body.extend_from_slice(pack);
    }
    body.extend_from_slice(&count(index.chunks.len(), "chunks")?);
    for (id, at) in &index.chunks {
        body.extend_from_slice(id);
        // `packs` is sorted and holds every chunk's pack: its index is the pack's number.
        let number = packs
            .binary_search(&at.pack)
            .map_err(|_| FormatError::Body(format!("chunk {}: its pack is not listed", hex(id))))?;
        body.extend_from_slice(&count(number, "packs")?);
        body.extend_from_slice(&at.offset.to_le_bytes());
        body.extend_from_slice(&at.len.to_le_bytes());
        body.extend_from_slice(&at.raw.to_le_bytes());
    }
    body.extend_from_slice(&count(index.keys.len(), "keys")?);
    for entry in &index.keys {
        body.extend_from_slice(&count(entry.key.len(), "key bytes")?);
        body.extend_from_slice(&entry.key);
        body.extend_from_slice(&entry.ts.to_le_bytes());
        body.extend_from_slice(&entry.size.to_le_bytes());
        body.extend_from_slice(&count(entry.chunks.len(), "chunks of a key")?);
        for chunk in &entry.chunks {
            let number = numbers.get(chunk).ok_or_else(|| {
                FormatError::Body(format!("key {}: chunk {} has no location", hex(&entry.key), hex(chunk)))
            })?;
            body.extend_from_slice(&number.to_le_bytes());
        }
        body.extend_from_slice(&count(entry.stored.len(), "stored chunks of a key")?);
        for (hash, len) in &entry.stored {
            body.extend_from_slice(hash);
            body.extend_from_slice(&len.to_le_bytes());
        }
    }
    Ok(seal_index(&body))
}

/// An index body behind its magic and checksum (what [`encode_index`] writes; fuzzing seals
/// arbitrary bodies with it to reach the tables).
pub fn seal_index(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Reads an index body front to back; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        let field =
            self.bytes.get(self.at..self.at.saturating_add(n)).ok_or(FormatError::Truncated { what, at: self.at })?;
        self.at += n;
        Ok(field)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FormatError> {
        let at = self.at;
        self.take(N, what)?.try_into().map_err(|_| FormatError::Truncated { what, at })
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count of rows of at least `row_bytes` each: refused when the rest cannot hold them,
    /// so allocations stay proportional to the input.
    fn count(&mut self, what: &'static str, row_bytes: usize) -> Result<usize, FormatError> {
        let at = self.at;
        let n = self.u32(what)?;
        let n_usize = usize::try_from(n).map_err(|_| FormatError::Bad { what, at, value: u64::from(n) })?;
        if n_usize.saturating_mul(row_bytes) > self.bytes.len() - self.at {
            return Err(FormatError::Bad { what, at, value: u64::from(n) });
        }
        Ok(n_usize)
    }

    /// A number below `limit` (a row of a table of `limit` rows).
    fn number(&mut self, what: &'static str, limit: usize) -> Result<usize, FormatError> {
        let at = self.at;
        let n = self.u32(what)?;
        usize::try_from(n).ok().filter(|n| *n < limit).ok_or(FormatError::Bad { what, at, value: u64::from(n) })
    }
}

/// Decodes an index (see [`encode_index`]).
pub fn decode_index(bytes: &[u8]) -> Result<SnapshotIndex, FormatError> {
    if bytes.get(..INDEX_MAGIC.len()) == Some(b"MRDIDX01".as_slice()) {
        return Err(FormatError::Body(
            "an index of the first archive format (zstd JSON), which this version no longer reads: export into a new \
             archive"
                .into(),
        ));
    }
    if bytes.get(..INDEX_MAGIC.len()) != Some(INDEX_MAGIC.as_slice()) {
        return Err(FormatError::BadMagic { what: "snapshot index" });
    }
    let crc = u32_at(bytes, 8, "index crc")?;
    if crc32c::crc32c(&bytes[12..]) != crc {
        return Err(FormatError::Checksum { what: "index", at: 12 });
    }
    // Offsets in errors count from the start of the index.
    let mut r = Reader { bytes, at: 12 };
    let id = r.u64("snapshot id")?;
    let glt = r.u64("snapshot timestamp")?;
    let at = r.at;
    let parent = match (r.array::<1>("parent flag")?[0], r.u64("parent")?) {
        (0, 0) => None,
        (1, parent) => Some(parent),
        (flag, _) => return Err(FormatError::Bad { what: "parent flag", at, value: u64::from(flag) }),
    };
    let created_ms = r.u64("creation time")?;
    let packs = (0..r.count("pack count", 16)?).map(|_| r.array::<16>("pack id")).collect::<Result<Vec<_>, _>>()?;
    let n_chunks = r.count("chunk count", CHUNK_ROW_BYTES)?;
    let mut ids = Vec::with_capacity(n_chunks);
    let mut chunks = ChunkMap::with_capacity_and_hasher(n_chunks, ahash::RandomState::new());
    for _ in 0..n_chunks {
        let at = r.at;
        let id: ChunkId = r.array("chunk id")?;
        let pack = packs[r.number("pack number", packs.len())?];
        let location =
            Location { pack, offset: r.u64("chunk offset")?, len: r.u32("entry length")?, raw: r.u32("raw length")? };
        if location.raw > CHUNK_BYTES_MAX {
            return Err(FormatError::Bad { what: "raw length", at, value: u64::from(location.raw) });
        }
        if chunks.insert(id, location).is_some() {
            return Err(FormatError::Body(format!("chunk {} is listed twice", hex(&id))));
        }
        ids.push(id);
    }
    let n_keys = r.count("key count", KEY_ROW_BYTES)?;
    let mut keys = Vec::with_capacity(n_keys);
    for _ in 0..n_keys {
        let key_len = r.count("key length", 1)?;
        let key = r.take(key_len, "key")?.to_vec();
        let (ts, size) = (r.u64("version timestamp")?, r.u64("value size")?);
        let key_chunks = (0..r.count("key chunk count", 4)?)
            .map(|_| Ok(ids[r.number("chunk number", ids.len())?]))
            .collect::<Result<Vec<_>, _>>()?;
        let stored = (0..r.count("stored chunk count", 36)?)
            .map(|_| Ok((r.array("stored chunk hash")?, r.u32("stored chunk length")?)))
            .collect::<Result<Vec<_>, FormatError>>()?;
        keys.push(KeyEntry { key, ts, size, chunks: key_chunks, stored });
    }
    if r.at != bytes.len() {
        return Err(FormatError::Bad { what: "index length", at: r.at, value: bytes.len() as u64 });
    }
    Ok(SnapshotIndex { id, glt, parent, created_ms, keys, chunks })
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
        let (at1, len1) = append_entry(&mut pack, &encode_entry(&id1, &raw1, 3));
        let (at2, _) = append_entry(&mut pack, &encode_entry(&id2, &raw2, 3));
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
        let mut chunks = ChunkMap::default();
        chunks.insert([0xab; 32], Location { pack: [1; 16], offset: 8, len: 90, raw: 1000 });
        chunks.insert([0x12; 32], Location { pack: [2; 16], offset: 8, len: 60, raw: 500 });
        chunks.insert([0x34; 32], Location { pack: [1; 16], offset: 98, len: 70, raw: 700 });
        let index = SnapshotIndex {
            id: 4,
            glt: 77 << 12,
            parent: Some(3),
            created_ms: 1,
            keys: vec![
                KeyEntry {
                    key: b"k/1".to_vec(),
                    ts: 70 << 12,
                    size: 2200,
                    chunks: vec![[0xab; 32], [0x34; 32], [0x12; 32], [0xab; 32]],
                    stored: vec![([0xcd; 32], 1000), ([0xce; 32], 1200)],
                },
                KeyEntry { key: Vec::new(), ts: 71 << 12, size: 0, chunks: Vec::new(), stored: Vec::new() },
            ],
            chunks,
        };
        let bytes = encode_index(&index).unwrap();
        assert_eq!(decode_index(&bytes).unwrap(), index);
        let orphan =
            SnapshotIndex { keys: vec![KeyEntry { chunks: vec![[9; 32]], ..index.keys[0].clone() }], ..index.clone() };
        assert!(matches!(encode_index(&orphan), Err(FormatError::Body(_))), "a chunk without a location is refused");
        let mut first_format = b"MRDIDX01".to_vec();
        first_format.extend_from_slice(&[0; 20]);
        let error = decode_index(&first_format).expect_err("a first-format index");
        assert!(error.to_string().contains("first archive format"), "{error}");
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
    fn hex_and_pack_names_round_trip() {
        assert_eq!(unhex(&hex(b"\x00\xffkey")).unwrap(), b"\x00\xffkey");
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        let pack = [0x5a; 16];
        assert_eq!(parse_pack_name(&pack_name(&pack)), Some(pack));
        assert_eq!(parse_pack_name("5a5a.pack"), None);
        assert_eq!(parse_pack_name(&hex(&pack)), None);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_pack(&bytes);
            let _ = decode_index(&bytes);
            let _ = decode_index(&seal_index(&bytes));
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
