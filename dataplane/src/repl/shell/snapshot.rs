//! Installing a snapshot: a peer whose position the WAL no longer holds is sent the shard's
//! engine (the InstallSnapshot pattern): every version as an entry (chunked values read and
//! put inline), in `Install` parts, read from one consistent view of the engine on a blocking
//! thread while the stream sends. The batches resume at the LSN the engine's last flush
//! recorded; the core pinned the WAL from there before the view was taken.

use tokio::sync::mpsc;
use wire::repl::{self, Frame};

use super::frames::{AbortOnDrop, write_frame};
use super::{Context, StreamError};
use crate::repl::{ThreadSide, codec};
use crate::store::ShardFiles;
use crate::store::op::{self, Body, Value};

/// One part of a snapshot: entries compressed, ready for an `Install` frame.
pub(super) struct Part {
    pub(super) count: u32,
    pub(super) raw_len: u32,
    pub(super) body: Vec<u8>,
}

/// What the snapshot reader hands the stream: parts, then the end with the horizon.
pub(super) enum Produced {
    Part(Part),
    Done { horizon: u64 },
}

/// Snapshot parts in flight between the thread reading the engine and the stream.
const INSTALL_PARTS_AHEAD: usize = 4;

/// Sends the engine's versions to `peer`, which lacks `behind`; batches resume at `resume_lsn`.
pub(super) async fn send(
    context: &Context,
    peer: &str,
    side: &ThreadSide,
    send: &mut quinn::SendStream,
    behind: u64,
    resume_lsn: u64,
) -> Result<(), StreamError> {
    tracing::info!(
        shard = side.shard,
        peer,
        behind,
        resume_lsn,
        "installing a snapshot: the WAL no longer holds the peer's position"
    );
    let (parts_tx, mut parts_rx) = mpsc::channel::<Result<Produced, StreamError>>(INSTALL_PARTS_AHEAD);
    let (files, codec, bytes_max) = (side.files.clone(), context.config.codec, context.config.batch_bytes_max);
    let producer = tokio::task::spawn_blocking(move || {
        if let Err(error) = snapshot_parts(&files, codec, bytes_max, &parts_tx) {
            let _ = parts_tx.blocking_send(Err(error));
        }
    });
    let _abort = AbortOnDrop(producer.abort_handle());
    let (mut versions, mut parts) = (0u64, 0u64);
    // One part is held back until the next arrives, so the last one goes out marked as such,
    // with the horizon that only the end of the snapshot gives.
    let mut pending: Option<Part> = None;
    let horizon = loop {
        match parts_rx.recv().await {
            Some(Ok(Produced::Part(part))) => {
                if let Some(ready) = pending.replace(part) {
                    write_part(send, side.shard, resume_lsn, codec, &ready, None).await?;
                    versions += u64::from(ready.count);
                    parts += 1;
                }
            }
            Some(Ok(Produced::Done { horizon })) => break horizon,
            Some(Err(error)) => return Err(error),
            // A panic on the reading thread: without `Done`, nothing is marked last.
            None => return Err(StreamError::Ended("the snapshot's end (its reader stopped)")),
        }
    };
    // A snapshot without versions still ends with a last part (an empty body, compressed).
    let last = pending.unwrap_or_else(|| Part { count: 0, raw_len: 0, body: codec::compress(codec, &[]) });
    write_part(send, side.shard, resume_lsn, codec, &last, Some(horizon)).await?;
    versions += u64::from(last.count);
    parts += 1;
    metrics::counter!("meridian_replication_snapshots_shipped_total", "peer" => peer.to_owned()).increment(1);
    tracing::info!(shard = side.shard, peer, resume_lsn, versions, parts, horizon, "snapshot shipped; batches resume");
    Ok(())
}

/// Sends one snapshot part; `horizon` marks the last one.
async fn write_part(
    send: &mut quinn::SendStream,
    shard: u32,
    resume_lsn: u64,
    codec: repl::Codec,
    part: &Part,
    horizon: Option<u64>,
) -> Result<(), StreamError> {
    let install = repl::Install {
        shard,
        resume_lsn,
        horizon: horizon.unwrap_or(0),
        count: part.count,
        last: horizon.is_some(),
        codec,
        raw_len: part.raw_len,
        body: &part.body,
    };
    write_frame(send, &Frame::Install(install)).await
}

/// Reads the shard's engine and sends its versions in compressed parts of up to `bytes_max`
/// raw bytes (on a blocking thread). An engine error fails after the parts before it went
/// out: without the last part the receiver keeps its position, and what it applied are
/// versions the shard has anyway.
pub(super) fn snapshot_parts(
    files: &ShardFiles,
    codec: repl::Codec,
    bytes_max: usize,
    parts: &mpsc::Sender<Result<Produced, StreamError>>,
) -> Result<(), StreamError> {
    let shard = files.shard_id();
    let mut builder = PartBuilder { files, codec, bytes_max, parts, raw: Vec::new(), count: 0, payload: Vec::new() };
    let mut outcome: Result<bool, StreamError> = Ok(true);
    let horizon = files
        .read_snapshot(|op, ts| {
            outcome = builder.add(&op, ts);
            matches!(outcome, Ok(true))
        })
        .map_err(|error| StreamError::File { shard, error })?;
    if !outcome? {
        return Ok(()); // the stream ended
    }
    if builder.flush()? {
        let _ = parts.blocking_send(Ok(Produced::Done { horizon }));
    }
    Ok(())
}

/// Collects versions into snapshot parts.
struct PartBuilder<'a> {
    files: &'a ShardFiles,
    codec: repl::Codec,
    bytes_max: usize,
    parts: &'a mpsc::Sender<Result<Produced, StreamError>>,
    raw: Vec<u8>,
    count: u32,
    payload: Vec<u8>,
}

impl PartBuilder<'_> {
    /// Adds a version (a chunked value read and put inline; skipped when its chunks were
    /// collected since: the version is gone at the home too). `false` once the stream ended.
    fn add(&mut self, op: &op::Op, ts: u64) -> Result<bool, StreamError> {
        let shard = self.files.shard_id();
        let inlined;
        let value = match &op.body {
            Body::Chunked(list) => {
                match self.files.read_chunked(list).map_err(|error| StreamError::File { shard, error })? {
                    Some(value) => {
                        inlined = value;
                        Value::Inline(&inlined)
                    }
                    None => return Ok(true),
                }
            }
            body => body.view(),
        };
        self.payload.clear();
        op::encode([(&op.key[..], value)].into_iter(), &mut self.payload).map_err(|error| StreamError::Record {
            shard,
            lsn: 0,
            error,
        })?;
        if self.count > 0
            && self.raw.len() + self.payload.len() + repl::ENTRY_OVERHEAD_BYTES > self.bytes_max
            && !self.flush()?
        {
            return Ok(false);
        }
        repl::encode_entry(ts, &self.payload, &mut self.raw);
        self.count += 1;
        Ok(true)
    }

    /// Sends the part collected so far, if any; `false` once the stream ended.
    fn flush(&mut self) -> Result<bool, StreamError> {
        if self.count == 0 {
            return Ok(true);
        }
        let body = codec::compress(self.codec, &self.raw);
        let raw_len = u32::try_from(self.raw.len()).map_err(|_| StreamError::TooLarge {
            shard: self.files.shard_id(),
            what: "a snapshot part",
            bytes: self.raw.len(),
        })?;
        let part = Part { count: std::mem::take(&mut self.count), raw_len, body };
        self.raw.clear();
        Ok(self.parts.blocking_send(Ok(Produced::Part(part))).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use wire::repl::Entries;

    use super::*;
    use crate::store::engine::{DiskVersions, SharedCache};
    use crate::store::op::{ChunkList, ChunkRef};
    use crate::store::versions::Version;
    use crate::wal::format::SECTOR_BYTES;

    /// A chunk file for `data` under `dir/chunks`, as the chunk store writes it.
    fn chunk_file(dir: &std::path::Path, data: &[u8]) -> ChunkRef {
        let hash = *blake3::hash(data).as_bytes();
        let mut file = vec![0u8; SECTOR_BYTES + data.len().div_ceil(SECTOR_BYTES) * SECTOR_BYTES];
        crate::store::chunks::encode_header(&hash, data, &mut file[..SECTOR_BYTES]).unwrap();
        file[SECTOR_BYTES..SECTOR_BYTES + data.len()].copy_from_slice(data);
        std::fs::create_dir_all(dir.join("chunks")).unwrap();
        std::fs::write(dir.join("chunks").join(crate::store::chunks::file_name(&hash)), file).unwrap();
        ChunkRef { hash, len: u32::try_from(data.len()).unwrap() }
    }

    /// A shipped version: glt, key, value (`None`: a tombstone).
    type Shipped = (u64, Vec<u8>, Option<Vec<u8>>);

    /// Every version the parts carry, how many parts, and the horizon at the end.
    fn shipped(files: &ShardFiles) -> Result<(Vec<Shipped>, usize, u64), String> {
        let (tx, mut rx) = mpsc::channel(1024);
        snapshot_parts(files, repl::Codec::Lz4, 600, &tx).map_err(|error| error.to_string())?;
        drop(tx);
        let (mut out, mut parts) = (Vec::new(), 0);
        while let Some(produced) = rx.blocking_recv() {
            let part = match produced.map_err(|error| error.to_string())? {
                Produced::Part(part) => part,
                Produced::Done { horizon } => {
                    assert!(rx.blocking_recv().is_none(), "nothing after the end");
                    return Ok((out, parts, horizon));
                }
            };
            parts += 1;
            let raw = codec::decompress(repl::Codec::Lz4, &part.body, part.raw_len).unwrap();
            for (glt, payload) in Entries::new(&raw, part.count).unwrap().iter() {
                for op in op::decode(&Bytes::copy_from_slice(payload)).unwrap() {
                    let value = match op.body {
                        Body::Inline(value) => Some(value.to_vec()),
                        Body::Tombstone => None,
                        Body::Chunked(_) => panic!("a chunk reference was shipped"),
                    };
                    out.push((glt, op.key.to_vec(), value));
                }
            }
        }
        Err("the parts ended without the end".into())
    }

    #[test]
    fn a_snapshot_ships_every_version_of_the_engine_with_chunks_inline() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(
            DiskVersions::open(&dir.path().join("engine"), SharedCache::with_capacity_bytes(1 << 20).0).unwrap(),
        );
        let slot = crate::store::EngineSlot::default();
        let files = ShardFiles::new(dir.path(), 3, 1 << 20, None, Arc::clone(&slot));
        assert_eq!(files.snapshot_lsn().unwrap(), None, "no engine yet");
        slot.set(Arc::clone(&engine)).unwrap();
        assert_eq!(files.snapshot_lsn().unwrap(), None, "nothing flushed: the WAL holds everything");
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let (first, second) = big.split_at(40_000);
        let list = ChunkList {
            size: big.len() as u64,
            chunks: vec![chunk_file(dir.path(), first), chunk_file(dir.path(), second)],
        };
        let gone = ChunkList { size: 5, chunks: vec![ChunkRef { hash: [9; 32], len: 5 }] };
        let versions: Vec<(&[u8], Version)> = vec![
            (b"a", Version { ts: 10, body: Body::Inline(Bytes::from_static(b"one")) }),
            (b"a", Version { ts: 20, body: Body::Tombstone }),
            (b"b", Version { ts: 15, body: Body::Chunked(Arc::new(list)) }),
            (b"c", Version { ts: 16, body: Body::Chunked(Arc::new(gone)) }),
        ];
        for (key, version) in &versions {
            engine.apply(key, version);
        }
        engine.seal(77, 20);
        engine.flush().unwrap();
        engine.retention().advance(12);
        assert_eq!(files.snapshot_lsn().unwrap(), Some(77));
        // Applied after the flush: in the view too (the receiver applies it again from the WAL).
        engine.apply(b"d", &Version { ts: 30, body: Body::Inline(Bytes::from_static(b"late")) });

        let (got, parts, horizon) = shipped(&files).unwrap();
        assert_eq!(horizon, 12);
        // The version whose chunk was collected is gone at the home too: not shipped.
        let want = vec![
            (20, b"a".to_vec(), None),
            (10, b"a".to_vec(), Some(b"one".to_vec())),
            (15, b"b".to_vec(), Some(big.clone())),
            (30, b"d".to_vec(), Some(b"late".to_vec())),
        ];
        assert_eq!(got, want);
        assert!(parts >= 2, "600-byte parts: the 70 kB value goes in a part of its own");

        // Without an engine: a named error.
        let bare = ShardFiles::new(dir.path(), 3, 1 << 20, None, crate::store::EngineSlot::default());
        assert!(shipped(&bare).unwrap_err().contains("no engine"));
        for codec_ in [repl::Codec::None, repl::Codec::Lz4, repl::Codec::Snappy] {
            assert_eq!(codec::decompress(codec_, &codec::compress(codec_, &[]), 0).unwrap(), Vec::<u8>::new());
        }
    }
}
