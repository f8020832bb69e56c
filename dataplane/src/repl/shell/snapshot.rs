//! Installing a snapshot: a peer whose position the WAL no longer holds is sent the shard's
//! newest checkpoint (the InstallSnapshot pattern): every version as an entry (chunked values
//! read and put inline), in `Install` parts, read on a blocking thread while the stream sends.
//! The batches resume at the checkpoint's LSN; the core pinned the WAL from there.

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

/// What the checkpoint reader hands the stream: parts, then the end with the horizon.
pub(super) enum Produced {
    Part(Part),
    Done { horizon: u64 },
}

/// Snapshot parts in flight between the thread reading the checkpoint and the stream.
const INSTALL_PARTS_AHEAD: usize = 4;

/// Sends the checkpoint at `resume_lsn` to `peer`, which lacks `behind`.
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
    let path = files.dir().join(crate::store::checkpoint::file_name(side.shard, resume_lsn));
    let producer = tokio::task::spawn_blocking(move || {
        if let Err(error) = snapshot_parts(&files, &path, resume_lsn, codec, bytes_max, &parts_tx) {
            let _ = parts_tx.blocking_send(Err(error));
        }
    });
    let _abort = AbortOnDrop(producer.abort_handle());
    let (mut versions, mut parts) = (0u64, 0u64);
    // One part is held back until the next arrives, so the last one goes out marked as such,
    // with the horizon that only the end of the checkpoint gives.
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
            None => return Err(StreamError::Ended("the checkpoint's end (its reader stopped)")),
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

/// Reads the shard's checkpoint at `path` (at `resume_lsn`) and sends its versions, as decoded,
/// in compressed parts of up to `bytes_max` raw bytes (on a blocking thread). A damaged
/// checkpoint fails after the parts before the damage went out: without the last part the
/// receiver keeps its position, and what it applied are versions the shard has anyway.
pub(super) fn snapshot_parts(
    files: &ShardFiles,
    path: &std::path::Path,
    resume_lsn: u64,
    codec: repl::Codec,
    bytes_max: usize,
    parts: &mpsc::Sender<Result<Produced, StreamError>>,
) -> Result<(), StreamError> {
    let shard = files.shard_id();
    let mut builder = PartBuilder { files, codec, bytes_max, parts, raw: Vec::new(), count: 0, payload: Vec::new() };
    let mut outcome: Result<bool, StreamError> = Ok(true);
    let info = files
        .read_checkpoint(path, resume_lsn, |op, ts| {
            if matches!(outcome, Ok(true)) {
                outcome = builder.add(&op, ts);
            }
        })
        .map_err(|error| StreamError::File { shard, error })?;
    if !outcome? {
        return Ok(()); // the stream ended
    }
    if builder.flush()? {
        let _ = parts.blocking_send(Ok(Produced::Done { horizon: info.horizon }));
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
    use crate::store::checkpoint;
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
    fn shipped(path: &std::path::Path, lsn: u64, files: &ShardFiles) -> Result<(Vec<Shipped>, usize, u64), String> {
        let (tx, mut rx) = mpsc::channel(1024);
        snapshot_parts(files, path, lsn, repl::Codec::Lz4, 600, &tx).map_err(|error| error.to_string())?;
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

    /// A checkpoint file of `versions` at `lsn` with `horizon`.
    fn checkpoint_file(dir: &std::path::Path, lsn: u64, horizon: u64, versions: &[(&[u8], Version)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        checkpoint::encode_header(3, lsn, horizon, &mut bytes);
        let mut scratch = Vec::new();
        for (key, version) in versions {
            checkpoint::encode_version(key, version, &mut scratch, &mut bytes).unwrap();
        }
        checkpoint::encode_footer(3, lsn, horizon, versions.len() as u64, &mut bytes);
        std::fs::write(dir.join(checkpoint::file_name(3, lsn)), &bytes).unwrap();
        bytes
    }

    #[test]
    fn a_snapshot_ships_every_version_of_the_checkpoint_with_chunks_inline_and_names_damage() {
        let dir = tempfile::tempdir().unwrap();
        let files = ShardFiles::new(dir.path(), 3, 1 << 20, None);
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
        let lsn = 77;
        let bytes = checkpoint_file(dir.path(), lsn, 12, &versions);
        let path = dir.path().join(checkpoint::file_name(3, lsn));
        assert_eq!(files.newest_checkpoint().unwrap(), Some((lsn, path.clone())));

        let (got, parts, horizon) = shipped(&path, lsn, &files).unwrap();
        assert_eq!(horizon, 12);
        // The version whose chunk was collected is gone at the home too: not shipped.
        let want = vec![
            (10, b"a".to_vec(), Some(b"one".to_vec())),
            (20, b"a".to_vec(), None),
            (15, b"b".to_vec(), Some(big.clone())),
        ];
        assert_eq!(got, want);
        assert!(parts >= 2, "600-byte parts: the 70 kB value goes in a part of its own");

        // Another LSN than the file's name, a damaged byte, a missing file: named errors.
        assert!(shipped(&path, lsn + 1, &files).unwrap_err().contains("LSN 77"));
        let mut damaged = bytes.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        assert!(shipped(&path, lsn, &files).unwrap_err().contains(&path.display().to_string()));
        std::fs::remove_file(&path).unwrap();
        assert!(shipped(&path, lsn, &files).is_err());
        assert_eq!(files.newest_checkpoint().unwrap(), None);

        // A checkpoint whose every version is gone ends without a part; the stream's empty
        // last part still decompresses.
        let gone = ChunkList { size: 5, chunks: vec![ChunkRef { hash: [8; 32], len: 5 }] };
        checkpoint_file(dir.path(), 90, 30, &[(b"d", Version { ts: 16, body: Body::Chunked(Arc::new(gone)) })]);
        let path = dir.path().join(checkpoint::file_name(3, 90));
        assert_eq!(shipped(&path, 90, &files).unwrap(), (Vec::new(), 0, 30));
        for codec_ in [repl::Codec::None, repl::Codec::Lz4, repl::Codec::Snappy] {
            assert_eq!(codec::decompress(codec_, &codec::compress(codec_, &[]), 0).unwrap(), Vec::<u8>::new());
        }
    }
}
