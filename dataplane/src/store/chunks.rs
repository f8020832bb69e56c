//! The chunk server of one shard: values above the chunk threshold are cut into chunks and
//! each chunk is stored once, in its own file named by its BLAKE3 hash.
//!
//! Chunk file layout (`{hash:64 hex}.chunk` in the shard's chunk directory), written with
//! O_DIRECT:
//!
//! * sector 0: a `wire` record of type `Chunk` whose payload is `hash: [u8; 32]`,
//!   `len: u32`, `block_bytes: u32`, then one CRC32C (u32) per block of the data;
//! * from byte 4096: the chunk's bytes, zero-padded to a sector.
//!
//! Every read checks the header and the CRC32C of every 64 KiB block it returns; a mismatch
//! is [`ChunkError::Corrupt`] naming the chunk and block, never bad bytes.
//!
//! A chunk is durable (data `fdatasync`ed, directory synced) before the WAL record that
//! references it is appended, so a recovered version never points at a missing chunk. A crash
//! between the two leaves an unreferenced file, deleted when the shard opens. A put that finds
//! its chunk already stored by a put still in flight waits for that put's directory sync
//! before it returns: a deduplicated chunk is durable before anyone references it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use glommio::io::{DmaFile, OpenOptions};
use thiserror::Error;

use super::op::{CHUNK_HASH_BYTES, ChunkList, ChunkRef};
use crate::sync::Latch;
use crate::wal::format::SECTOR_BYTES;
use crate::wal::{FaultInjector, StoreFault};

const SECTOR_U32: u32 = 4096;
const _: () = assert!(SECTOR_U32 as usize == SECTOR_BYTES);

/// Bytes covered by one CRC32C.
pub const BLOCK_BYTES: usize = 64 << 10;
/// Largest chunk: its CRCs must fit the header sector.
pub const CHUNK_BYTES_MAX: usize = 16 << 20;

/// Why a chunk could not be stored or read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChunkError {
    /// A block of a stored chunk does not match its checksum.
    #[error("chunk {chunk} is corrupt at block {block}: {reason}")]
    Corrupt {
        /// The chunk's hash (hex).
        chunk: String,
        /// The damaged block (`u32::MAX`: the header sector).
        block: u32,
        /// What did not match.
        reason: String,
    },
    /// A referenced chunk has no file.
    #[error("chunk {chunk} is missing")]
    Missing {
        /// The chunk's hash (hex).
        chunk: String,
    },
    /// An I/O error.
    #[error("{op} {path}: {message}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        message: String,
    },
}

/// Hex of a chunk hash.
pub fn hex(hash: &[u8; CHUNK_HASH_BYTES]) -> String {
    hash.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The file name of a chunk in its shard's `chunks/` directory.
pub fn file_name(hash: &[u8; CHUNK_HASH_BYTES]) -> String {
    format!("{}.chunk", hex(hash))
}

fn parse_file_name(name: &str) -> Option<[u8; CHUNK_HASH_BYTES]> {
    let stem = name.strip_suffix(".chunk")?;
    if stem.len() != CHUNK_HASH_BYTES * 2 {
        return None;
    }
    let mut hash = [0u8; CHUNK_HASH_BYTES];
    for (index, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(stem.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(hash)
}

fn round_up(len: usize) -> usize {
    len.div_ceil(SECTOR_BYTES) * SECTOR_BYTES
}

/// Encodes the header sector of a chunk into `sector` (4096 bytes, zeroed by the caller).
pub fn encode_header(hash: &[u8; CHUNK_HASH_BYTES], data: &[u8], sector: &mut [u8]) -> Result<(), ChunkError> {
    let mut payload = Vec::with_capacity(CHUNK_HASH_BYTES + 8 + 4 * data.len().div_ceil(BLOCK_BYTES));
    payload.extend_from_slice(hash);
    let too_large = || ChunkError::Io { op: "encode", path: hex(hash), message: "chunk too large".into() };
    payload.extend_from_slice(&u32::try_from(data.len()).map_err(|_| too_large())?.to_le_bytes());
    payload.extend_from_slice(&u32::try_from(BLOCK_BYTES).map_err(|_| too_large())?.to_le_bytes());
    for block in data.chunks(BLOCK_BYTES) {
        payload.extend_from_slice(&crc32c::crc32c(block).to_le_bytes());
    }
    wire::encode_into(sector, wire::RecordType::Chunk, 0, 0, &payload).map_err(|_| too_large())?;
    Ok(())
}

/// Checks a chunk file's bytes against the chunk it should hold and returns its data.
/// Pure; any input gives data or a typed error.
pub fn verify(expected: &ChunkRef, file: &[u8]) -> Result<Bytes, ChunkError> {
    verified_data(expected, file).map(Bytes::copy_from_slice)
}

/// [`verify`] without the copy: the chunk's data inside `file`.
pub fn verified_data<'a>(expected: &ChunkRef, file: &'a [u8]) -> Result<&'a [u8], ChunkError> {
    let corrupt = |block: u32, reason: String| ChunkError::Corrupt { chunk: hex(&expected.hash), block, reason };
    let (record, _) = wire::decode(file.get(..SECTOR_BYTES).unwrap_or(file), SECTOR_U32)
        .map_err(|error| corrupt(u32::MAX, format!("header: {error}")))?;
    let payload = record.payload;
    if record.record_type != wire::RecordType::Chunk || payload.len() < CHUNK_HASH_BYTES + 8 {
        return Err(corrupt(u32::MAX, "not a chunk header".into()));
    }
    let field = |at: usize| u32::from_le_bytes([payload[at], payload[at + 1], payload[at + 2], payload[at + 3]]);
    let len = field(CHUNK_HASH_BYTES) as usize;
    let block_bytes = field(CHUNK_HASH_BYTES + 4) as usize;
    if payload[..CHUNK_HASH_BYTES] != expected.hash || len != expected.len as usize || block_bytes != BLOCK_BYTES {
        return Err(corrupt(u32::MAX, "header names another chunk".into()));
    }
    let blocks = len.div_ceil(BLOCK_BYTES);
    if payload.len() != CHUNK_HASH_BYTES + 8 + 4 * blocks {
        return Err(corrupt(u32::MAX, "header block count".into()));
    }
    let data = file.get(SECTOR_BYTES..SECTOR_BYTES + len).ok_or_else(|| corrupt(0, "file too short".into()))?;
    for (index, block) in data.chunks(BLOCK_BYTES).enumerate() {
        let stored = field(CHUNK_HASH_BYTES + 8 + 4 * index);
        let computed = crc32c::crc32c(block);
        if stored != computed {
            return Err(corrupt(
                u32::try_from(index).unwrap_or(u32::MAX),
                format!("crc32c {computed:#010x}, stored {stored:#010x}"),
            ));
        }
    }
    Ok(data)
}

#[derive(Debug)]
struct Entry {
    /// Versions and in-flight writes holding the chunk.
    refs: u32,
    /// While the put that wrote the file has not synced its directory: set to whether that
    /// sync succeeded. `None` once the chunk is durable (and for chunks found at open).
    durable: Option<Rc<Latch<bool>>>,
}

/// How [`ChunkStore::store_one`] took its reference.
#[derive(Debug)]
enum Stored {
    /// This call wrote the file; its directory entry is not durable until the caller syncs.
    Written,
    /// The chunk was stored and durable.
    Durable,
    /// Another put wrote the file and has not synced its directory yet: the latch says when.
    Pending(Rc<Latch<bool>>),
}

/// Counters of a chunk store.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChunkStats {
    /// Chunk files written.
    pub written: u64,
    /// Chunks found already stored (dedup hits).
    pub deduplicated: u64,
    /// Chunk files deleted.
    pub deleted: u64,
}

/// The chunk files of one shard, with reference counts held in memory.
#[derive(Debug)]
pub struct ChunkStore {
    dir: PathBuf,
    chunk_bytes: usize,
    index: RefCell<HashMap<[u8; CHUNK_HASH_BYTES], Entry>>,
    writing: RefCell<HashMap<[u8; CHUNK_HASH_BYTES], Rc<Latch<bool>>>>,
    /// Files found on disk at open that nothing referenced yet.
    found: RefCell<Vec<[u8; CHUNK_HASH_BYTES]>>,
    stats: RefCell<ChunkStats>,
    faults: Option<Arc<FaultInjector>>,
}

impl ChunkStore {
    /// Opens (creating) the chunk directory; files found are kept until
    /// [`ChunkStore::remove_unreferenced`] once recovery took its references.
    pub fn open(
        dir: impl Into<PathBuf>,
        chunk_bytes: usize,
        faults: Option<Arc<FaultInjector>>,
    ) -> Result<Self, ChunkError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|error| io_error("create directory", &dir, &error))?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|error| io_error("list", &dir, &error))? {
            let entry = entry.map_err(|error| io_error("list", &dir, &error))?;
            if let Some(hash) = entry.file_name().to_str().and_then(parse_file_name) {
                found.push(hash);
            }
        }
        Ok(Self {
            dir,
            chunk_bytes,
            index: RefCell::default(),
            writing: RefCell::default(),
            found: RefCell::new(found),
            stats: RefCell::default(),
            faults,
        })
    }

    /// Counters since open.
    pub fn stats(&self) -> ChunkStats {
        *self.stats.borrow()
    }

    /// Chunk files found at open that [`ChunkStore::remove_unreferenced`] has not judged yet.
    pub fn found_on_disk(&self) -> usize {
        self.found.borrow().len()
    }

    /// Chunks currently referenced.
    pub fn chunk_count(&self) -> usize {
        self.index.borrow().len()
    }

    /// Takes one reference on every chunk of `list` (recovery, readers).
    pub fn add_refs(&self, list: &ChunkList) {
        let mut index = self.index.borrow_mut();
        for chunk in &list.chunks {
            index.entry(chunk.hash).or_insert(Entry { refs: 0, durable: None }).refs += 1;
        }
    }

    /// Drops one reference on every chunk of `list`; files of chunks left without any are
    /// deleted.
    pub fn release(&self, list: &ChunkList) -> Result<(), ChunkError> {
        let mut dead = Vec::new();
        {
            let mut index = self.index.borrow_mut();
            for chunk in &list.chunks {
                if let Some(entry) = index.get_mut(&chunk.hash) {
                    entry.refs = entry.refs.saturating_sub(1);
                    if entry.refs == 0 {
                        index.remove(&chunk.hash);
                        dead.push(chunk.hash);
                    }
                }
            }
        }
        for hash in dead {
            let path = self.dir.join(file_name(&hash));
            match std::fs::remove_file(&path) {
                Ok(()) => self.stats.borrow_mut().deleted += 1,
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(error) => return Err(io_error("remove", &path, &error)),
            }
        }
        Ok(())
    }

    /// Deletes chunk files found at open that recovery did not reference.
    pub fn remove_unreferenced(&self) -> Result<u64, ChunkError> {
        let found = std::mem::take(&mut *self.found.borrow_mut());
        let mut removed = 0;
        for hash in found {
            if !self.index.borrow().contains_key(&hash) {
                let path = self.dir.join(file_name(&hash));
                std::fs::remove_file(&path).map_err(|error| io_error("remove", &path, &error))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Cuts `value` into chunks and makes every chunk durable, storing each new one once.
    /// The returned list holds one reference per chunk (the caller's); hand it to a version
    /// or [`ChunkStore::release`] it. It returns only once every chunk is durable, also the
    /// ones another put in flight wrote: a WAL record may name them from then on.
    pub async fn store(&self, value: &[u8]) -> Result<Arc<ChunkList>, ChunkError> {
        let mut list = ChunkList { size: value.len() as u64, chunks: Vec::new() };
        let result = async {
            let mut written = Vec::new();
            let mut pending = Vec::new();
            for data in value.chunks(self.chunk_bytes) {
                let hash = *blake3::hash(data).as_bytes();
                let chunk = ChunkRef { hash, len: u32::try_from(data.len()).unwrap_or(u32::MAX) };
                match self.store_one(&chunk, data).await? {
                    Stored::Written => written.push(hash),
                    Stored::Durable => {}
                    Stored::Pending(latch) => pending.push(latch),
                }
                list.chunks.push(chunk);
            }
            if !written.is_empty() {
                // New directory entries must be durable before a WAL record names them.
                let synced = self.sync_dir().await;
                self.settle(&written, synced.is_ok());
                synced?;
            }
            // Only after this put's own sync, so two puts waiting on each other's chunks
            // cannot wait forever.
            for latch in pending {
                if !latch.wait().await {
                    return Err(io_error(
                        "sync directory",
                        &self.dir,
                        &"the directory sync of the put that wrote a shared chunk failed",
                    ));
                }
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(Arc::new(list)),
            Err(error) => {
                self.release(&list)?;
                Err(error)
            }
        }
    }

    /// Syncs the chunk directory (new entries durable).
    async fn sync_dir(&self) -> Result<(), ChunkError> {
        let dir = &self.dir;
        let synced = crate::files::sync_path_off_executor(dir.clone()).await;
        let injected = self.faults.as_ref().and_then(|faults| faults.on_store(StoreFault::ChunkDirSync));
        synced
            .and_then(|()| injected.map_or(Ok(()), |errno| Err(std::io::Error::from_raw_os_error(errno))))
            .map_err(|error| io_error("sync directory", dir, &error))
    }

    /// Tells the puts that share chunks this put wrote whether their directory entries are
    /// durable; once they are, later puts need not wait.
    fn settle(&self, written: &[[u8; CHUNK_HASH_BYTES]], durable: bool) {
        let mut index = self.index.borrow_mut();
        for hash in written {
            if let Some(entry) = index.get_mut(hash) {
                if let Some(latch) = &entry.durable {
                    latch.set(durable);
                }
                if durable {
                    entry.durable = None;
                }
            }
        }
    }

    /// Takes a reference on `chunk`, writing its file if no one has.
    async fn store_one(&self, chunk: &ChunkRef, data: &[u8]) -> Result<Stored, ChunkError> {
        loop {
            if let Some(entry) = self.index.borrow_mut().get_mut(&chunk.hash) {
                entry.refs += 1;
                self.stats.borrow_mut().deduplicated += 1;
                return Ok(entry.durable.as_ref().map_or(Stored::Durable, |latch| Stored::Pending(Rc::clone(latch))));
            }
            let pending = self.writing.borrow().get(&chunk.hash).cloned();
            match pending {
                // Another task is writing the same chunk: wait and look again.
                Some(latch) => {
                    latch.wait().await;
                }
                None => break,
            }
        }
        let latch = Latch::new();
        self.writing.borrow_mut().insert(chunk.hash, Rc::clone(&latch));
        let result = self.write_file(chunk, data).await;
        if result.is_ok() {
            self.index.borrow_mut().insert(chunk.hash, Entry { refs: 1, durable: Some(Latch::new()) });
            self.stats.borrow_mut().written += 1;
        }
        self.writing.borrow_mut().remove(&chunk.hash);
        latch.set(result.is_ok());
        result.map(|()| Stored::Written)
    }

    async fn write_file(&self, chunk: &ChunkRef, data: &[u8]) -> Result<(), ChunkError> {
        let path = self.dir.join(file_name(&chunk.hash));
        let fail = |op: &'static str, error: &dyn std::fmt::Display| io_error(op, &path, error);
        if let Some(errno) = self.faults.as_ref().and_then(|faults| faults.on_store(StoreFault::ChunkWrite)) {
            return Err(fail("write", &std::io::Error::from_raw_os_error(errno)));
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .dma_open(&path)
            .await
            .map_err(|error| fail("create", &error))?;
        let total = SECTOR_BYTES + round_up(data.len());
        let mut buffer = file.alloc_dma_buffer(total);
        buffer.as_bytes_mut().fill(0);
        encode_header(&chunk.hash, data, &mut buffer.as_bytes_mut()[..SECTOR_BYTES])?;
        buffer.as_bytes_mut()[SECTOR_BYTES..SECTOR_BYTES + data.len()].copy_from_slice(data);
        let written = file.write_at(buffer, 0).await.map_err(|error| fail("write", &error))?;
        if written != total {
            return Err(fail("write", &format!("short write of {written} of {total} bytes")));
        }
        file.fdatasync().await.map_err(|error| fail("fdatasync", &error))?;
        file.close().await.map_err(|error| fail("close", &error))?;
        Ok(())
    }

    /// Reads one chunk's file whole (unchecked).
    async fn read_file(&self, chunk: &ChunkRef) -> Result<glommio::io::ReadResult, ChunkError> {
        let path = self.dir.join(file_name(&chunk.hash));
        let fail = |op: &'static str, error: &dyn std::fmt::Display| io_error(op, &path, error);
        if let Some(errno) = self.faults.as_ref().and_then(|faults| faults.on_store(StoreFault::ChunkRead)) {
            return Err(fail("read", &std::io::Error::from_raw_os_error(errno)));
        }
        // O_DIRECT, like the writes: the read is asynchronous in the kernel (a buffered read
        // of a file not in the page cache waits for one of io_uring's few worker threads).
        // The shard calibrated glommio's iopoll probe for this directory's device (see
        // `calibrate_iopoll`), so these reads go to the interrupt-driven ring.
        let file = match DmaFile::open(&path).await {
            Ok(file) => file,
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                return Err(ChunkError::Missing { chunk: hex(&chunk.hash) });
            }
            Err(error) => return Err(fail("open", &error)),
        };
        let total = SECTOR_BYTES + round_up(chunk.len as usize);
        let read = file.read_at_aligned(0, total).await.map_err(|error| fail("read", &error));
        // Closed in the background: the reader has its bytes.
        glommio::spawn_local(async move {
            let _ = file.close().await;
        })
        .detach();
        read
    }

    /// Bytes `from..to` of a chunked value (clamped to its size). Every chunk holding some of
    /// them is read and checked whole (a block's checksum covers the whole block), and only
    /// the wanted bytes are copied out.
    pub async fn read_range(&self, list: &ChunkList, from: u64, to: u64) -> Result<Bytes, ChunkError> {
        let to = to.min(list.size);
        let mut out = BytesMut::with_capacity(usize::try_from(to.saturating_sub(from)).unwrap_or(0));
        // Up to READS_IN_FLIGHT chunk reads at once: a value's chunks are independent files.
        let mut base = 0u64;
        for group in list.chunks.chunks(READS_IN_FLIGHT) {
            let files = wire::join_all(group.iter().map(|chunk| self.read_file(chunk))).await;
            for (chunk, file) in group.iter().zip(files) {
                let end = base + u64::from(chunk.len);
                let file = file?;
                let data = verified_data(chunk, &file)?;
                let start = usize::try_from(from.clamp(base, end) - base).unwrap_or(0);
                let stop = usize::try_from(to.clamp(base, end) - base).unwrap_or(0);
                out.extend_from_slice(&data[start..stop.max(start)]);
                base = end;
            }
        }
        Ok(out.freeze())
    }
}

/// Chunk files of one value read at once.
const READS_IN_FLIGHT: usize = 16;

fn io_error(op: &'static str, path: &Path, error: &dyn std::fmt::Display) -> ChunkError {
    ChunkError::Io { op, path: path.display().to_string(), message: error.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_for(data: &[u8]) -> (ChunkRef, Vec<u8>) {
        let hash = *blake3::hash(data).as_bytes();
        let mut file = vec![0u8; SECTOR_BYTES + round_up(data.len())];
        encode_header(&hash, data, &mut file[..SECTOR_BYTES]).unwrap();
        file[SECTOR_BYTES..SECTOR_BYTES + data.len()].copy_from_slice(data);
        (ChunkRef { hash, len: data.len() as u32 }, file)
    }

    #[test]
    fn verify_accepts_intact_and_names_the_damaged_block() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let (chunk, file) = file_for(&data);
        assert_eq!(&verify(&chunk, &file).unwrap()[..], &data[..]);
        let mut bad = file.clone();
        bad[SECTOR_BYTES + 2 * BLOCK_BYTES + 5] ^= 1;
        match verify(&chunk, &bad) {
            Err(ChunkError::Corrupt { block: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
        let mut bad_header = file.clone();
        bad_header[40] ^= 1;
        assert!(matches!(verify(&chunk, &bad_header), Err(ChunkError::Corrupt { block: u32::MAX, .. })));
        assert!(matches!(verify(&chunk, &file[..100]), Err(ChunkError::Corrupt { .. })));
        let other = ChunkRef { hash: [0; 32], len: chunk.len };
        assert!(matches!(verify(&other, &file), Err(ChunkError::Corrupt { block: u32::MAX, .. })));
    }

    #[test]
    fn file_names_roundtrip() {
        let hash = [0xab; 32];
        assert_eq!(parse_file_name(&file_name(&hash)), Some(hash));
        assert_eq!(parse_file_name("zz.chunk"), None);
        assert_eq!(parse_file_name(&"g".repeat(64)), None);
    }
}
