//! The snapshot archive: global snapshots exported from a cluster into an object store (the
//! `object_store` crate: a local directory by default, S3-compatible with the `s3` feature),
//! deduplicated by content-defined chunks (FastCDC, BLAKE3 ids) in zstd-compressed packs, one
//! complete index per snapshot with a parent link, and the operations on it: export (full, or
//! incremental from the newest archived snapshot below it: only keys whose version changed
//! are read and chunked), restore (to a directory or a cluster), verify and prune.
//!
//! Layout: `snapshots/<id>.idx`, `packs/<hash>.pack`, `locks/<kind>-<unix ns>-<pid>`.
//!
//! Prune and export run safely side by side: an export takes its lock before it reads the
//! indexes; prune deletes the indexes it drops first, then looks for export locks, and deletes
//! unreferenced packs only when it sees none, and only packs older than its own start. An
//! export that started before prune looked is seen (prune leaves the packs for next time);
//! one that started after cannot know the dropped chunks and writes only newer packs.

mod durable;
pub mod format;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_lite::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use thiserror::Error;

use crate::{Client, ClientError};
use durable::Durability;
use format::{
    ChunkId, ChunkMap, FormatError, KeyEntry, Location, PackId, SnapshotIndex, hex, pack_name, parse_pack_name,
};

/// Content-defined chunk sizes (FastCDC): minimum, average, maximum.
pub const CHUNK_MIN: u32 = 8 << 10;
/// Average chunk: small enough that an edit costs little to store and compress again.
pub const CHUNK_AVG: u32 = 32 << 10;
/// Largest chunk.
pub const CHUNK_MAX: u32 = 128 << 10;
/// A pack is written once it holds this much.
pub const PACK_BYTES: usize = 16 << 20;
/// zstd level of chunks.
pub const ZSTD_LEVEL: i32 = 3;
/// Values fetched at once during an export.
const FETCH_AHEAD: usize = 32;
/// Locks older than this are left over from a crash and ignored.
const LOCK_STALE: Duration = Duration::from_secs(3600);

/// What went wrong with the archive.
#[derive(Debug, Error)]
pub enum ArchiveError {
    /// The archive location is not usable.
    #[error("archive {location}: {reason}")]
    Location {
        /// What was given.
        location: String,
        /// Why not.
        reason: String,
    },
    /// The object store failed.
    #[error("archive storage: {0}")]
    Store(#[from] object_store::Error),
    /// An object's bytes are damaged.
    #[error("{object}: {error}")]
    Format {
        /// The object.
        object: String,
        /// What is wrong.
        error: FormatError,
    },
    /// The cluster failed.
    #[error("cluster: {0}")]
    Client(#[from] ClientError),
    /// A local file failed.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        error: std::io::Error,
    },
    /// The snapshot is already archived.
    #[error("snapshot {0} is already in the archive")]
    Exists(u64),
    /// No such snapshot in the archive.
    #[error("snapshot {0} is not in the archive")]
    NotFound(u64),
    /// Another operation holds the archive.
    #[error("the archive is busy: {0}")]
    Busy(String),
    /// A key cannot be a file name.
    #[error("key {key:?} cannot be restored as a file: {reason}")]
    BadKey {
        /// The key.
        key: String,
        /// Why.
        reason: &'static str,
    },
}

/// What an export did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportStats {
    /// The archived snapshot it was incremental from.
    pub parent: Option<u64>,
    /// Keys in the snapshot.
    pub keys: u64,
    /// Keys whose version was read from the cluster (changed since the parent, or all).
    pub keys_read: u64,
    /// Bytes of the values read.
    pub bytes_read: u64,
    /// Chunks written to new packs.
    pub chunks_new: u64,
    /// Chunks found already stored (earlier snapshots or this one).
    pub chunks_reused: u64,
    /// Bytes written to the archive (packs and index).
    pub bytes_written: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Keys restored.
    pub keys: u64,
    /// Value bytes restored.
    pub bytes: u64,
}

/// What verify found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Snapshots checked.
    pub snapshots: u64,
    /// Packs read.
    pub packs: u64,
    /// Chunks whose hash was checked.
    pub chunks: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Every problem, one line each.
    pub errors: Vec<String>,
}

/// What prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Snapshots dropped by the retention rule.
    pub snapshots_deleted: Vec<u64>,
    /// Packs deleted (no chunk referenced).
    pub packs_deleted: u64,
    /// Their bytes.
    pub bytes_freed: u64,
    /// An export was running: packs were left for the next prune.
    pub deferred: bool,
}

/// Where a restore writes.
#[derive(Debug)]
pub enum RestoreTarget<'a> {
    /// Each key as a file under this directory (`a/b` becomes `<dir>/a/b`).
    Directory(&'a std::path::Path),
    /// Each key put into this cluster.
    Cluster(&'a Client),
}

/// Progress of a long operation: `done` of `total` (units named by the operation).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// An opened archive.
#[derive(Debug, Clone)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    location: String,
    durability: Durability,
}

fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
}

fn pack_path(pack: &PackId) -> ObjectPath {
    ObjectPath::from(format!("packs/{}", pack_name(pack)))
}

fn index_path(id: u64) -> ObjectPath {
    ObjectPath::from(format!("snapshots/{id:020}.idx"))
}

/// The snapshot id of an index file's name (see [`index_path`]).
fn parse_index_name(name: &str) -> Option<u64> {
    name.strip_suffix(".idx")?.parse().ok()
}

impl Archive {
    /// Opens the archive at `location`: a directory (created if missing), `file:///dir`, or
    /// with the `s3` feature `s3://bucket/prefix` (credentials from the environment).
    pub fn open(location: &str) -> Result<Self, ArchiveError> {
        let bad = |reason: String| ArchiveError::Location { location: location.to_owned(), reason };
        let (store, durability): (Arc<dyn ObjectStore>, Durability) = if let Some(rest) = location.strip_prefix("s3://")
        {
            (open_s3(location, rest).map_err(bad)?, Durability::remote())
        } else if location.contains("://") && !location.starts_with("file://") {
            return Err(bad("only directories, file:// and s3:// (with the s3 feature) are supported".into()));
        } else {
            let dir = location.strip_prefix("file://").unwrap_or(location);
            if dir.is_empty() {
                return Err(bad("empty path".into()));
            }
            std::fs::create_dir_all(dir).map_err(|error| bad(error.to_string()))?;
            let root = std::fs::canonicalize(dir).map_err(|error| bad(error.to_string()))?;
            let store =
                object_store::local::LocalFileSystem::new_with_prefix(&root).map_err(|error| bad(error.to_string()))?;
            (Arc::new(store), Durability::local(&root))
        };
        Ok(Self { store, location: location.to_owned(), durability })
    }

    /// Where it is.
    pub fn location(&self) -> &str {
        &self.location
    }

    async fn objects(&self, prefix: &str) -> Result<Vec<object_store::ObjectMeta>, ArchiveError> {
        let prefix = ObjectPath::from(prefix);
        let mut list = self.store.list(Some(&prefix));
        let mut out = Vec::new();
        while let Some(meta) = list.next().await {
            out.push(meta?);
        }
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }

    /// One archived snapshot's index.
    pub async fn index(&self, id: u64) -> Result<SnapshotIndex, ArchiveError> {
        let path = index_path(id);
        let bytes = match self.store.get(&path).await {
            Ok(result) => result.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Err(ArchiveError::NotFound(id)),
            Err(error) => return Err(error.into()),
        };
        format::decode_index(&bytes).map_err(|error| ArchiveError::Format { object: path.to_string(), error })
    }

    /// Every archived snapshot, by timestamp.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotIndex>, ArchiveError> {
        self.snapshots_besides(&HashSet::new()).await
    }

    /// The archived snapshots whose ids are not in `known` (an index, once written, never
    /// changes), by timestamp.
    async fn snapshots_besides(&self, known: &HashSet<u64>) -> Result<Vec<SnapshotIndex>, ArchiveError> {
        let mut out = Vec::new();
        for meta in self.objects("snapshots").await? {
            let id = meta.location.filename().and_then(parse_index_name);
            if id.is_some_and(|id| known.contains(&id)) {
                continue;
            }
            let bytes = self.store.get(&meta.location).await?.bytes().await?;
            let index = format::decode_index(&bytes)
                .map_err(|error| ArchiveError::Format { object: meta.location.to_string(), error })?;
            out.push(index);
        }
        out.sort_by_key(|index| (index.glt, index.id));
        Ok(out)
    }

    /// Takes a lock of `kind`; returns its path.
    async fn lock(&self, kind: &str) -> Result<ObjectPath, ArchiveError> {
        let path = ObjectPath::from(format!("locks/{kind}-{}-{}", unix_ns(), std::process::id()));
        let options = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        self.store.put_opts(&path, PutPayload::from(Vec::new()), options).await?;
        Ok(path)
    }

    /// Runs `work` holding a lock of `kind`, released whatever `work` returns.
    async fn locked<T>(
        &self,
        kind: &str,
        work: impl std::future::Future<Output = Result<T, ArchiveError>>,
    ) -> Result<T, ArchiveError> {
        let lock = self.lock(kind).await?;
        let result = work.await;
        let unlocked = self.store.delete(&lock).await;
        let value = result?;
        unlocked?;
        Ok(value)
    }

    /// Live locks of `kind` (stale ones, from a crash, are ignored).
    async fn locks(&self, kind: &str) -> Result<Vec<String>, ArchiveError> {
        let now_ms = i64::try_from(unix_ns() / 1_000_000).unwrap_or(i64::MAX);
        let stale_ms = i64::try_from(LOCK_STALE.as_millis()).unwrap_or(i64::MAX);
        Ok(self
            .objects("locks")
            .await?
            .into_iter()
            .filter(|meta| meta.location.filename().is_some_and(|name| name.starts_with(&format!("{kind}-"))))
            .filter(|meta| now_ms.saturating_sub(meta.last_modified.timestamp_millis()) < stale_ms)
            .map(|meta| meta.location.to_string())
            .collect())
    }

    /// Exports the cluster's snapshot `id` at `glt`, read through `client` (waiting until the
    /// snapshot is readable in its region). Incremental from the newest archived snapshot
    /// below `glt`: keys whose version did not change reuse their chunks unread.
    pub async fn export(
        &self,
        client: &Client,
        id: u64,
        glt: u64,
        progress: Progress<'_>,
    ) -> Result<ExportStats, ArchiveError> {
        self.locked("export", self.export_locked(client, id, glt, progress)).await
    }

    async fn export_locked(
        &self,
        client: &Client,
        id: u64,
        glt: u64,
        progress: Progress<'_>,
    ) -> Result<ExportStats, ArchiveError> {
        let started = Instant::now();
        if !self.locks("prune").await?.is_empty() {
            return Err(ArchiveError::Busy("a prune is running; export again when it is done".into()));
        }
        let (archived, listed) = self.archived_and_listed(client, id, glt).await?;
        // Every stored chunk, for dedup, and the parent's keys, for the increment.
        let mut known: ChunkMap<Location> = ChunkMap::default();
        for index in &archived {
            known.extend(index.chunks.iter().map(|(id, location)| (*id, *location)));
        }
        let known = Arc::new(known);
        let parent = archived.iter().rfind(|index| index.glt < glt);
        let parent_keys: HashMap<&[u8], &KeyEntry> =
            parent.map(|p| p.keys.iter().map(|entry| (entry.key.as_slice(), entry)).collect()).unwrap_or_default();
        let mut stats = ExportStats { parent: parent.map(|p| p.id), ..ExportStats::default() };

        let total = listed.len() as u64;
        let mut writer = PackWriter::new(self.store.clone(), self.durability.clone());
        let mut keys = Vec::with_capacity(listed.len());
        let mut chunks: ChunkMap<Location> = ChunkMap::default();
        let mut fetches = std::collections::VecDeque::new();
        let mut next = 0;
        for (done, entry) in listed.iter().enumerate() {
            if let Some(previous) = parent_keys.get(entry.key.as_slice()).filter(|previous| previous.ts == entry.ts) {
                for chunk in &previous.chunks {
                    if let Some(location) = known.get(chunk) {
                        chunks.insert(*chunk, *location);
                    }
                }
                stats.chunks_reused += previous.chunks.len() as u64;
                keys.push((*previous).clone());
                progress(done as u64 + 1, total);
                continue;
            }
            // Keep FETCH_AHEAD reads of the changed keys in flight.
            while fetches.len() < FETCH_AHEAD && next < listed.len() {
                let candidate = &listed[next];
                next += 1;
                let in_parent = parent_keys.get(candidate.key.as_slice());
                if in_parent.is_some_and(|previous| previous.ts == candidate.ts) || next - 1 < done {
                    continue;
                }
                let previous = in_parent.and_then(|entry| Previous::of(entry, &known));
                let (client, key, known) = (client.clone(), candidate.key.clone(), known.clone());
                fetches.push_back(tokio::spawn(read_key(client, key, glt, previous, known)));
            }
            let Some(fetch) = fetches.pop_front() else {
                return Err(ArchiveError::Busy("export lost track of its reads".into()));
            };
            let (size, pieces, stored) =
                fetch.await.map_err(|error| ArchiveError::Busy(format!("read task failed: {error}")))??;
            let covered: u64 = pieces.iter().map(|piece| u64::from(piece.raw_len)).sum();
            if covered != size {
                return Err(ArchiveError::Busy(format!(
                    "key {}: its chunks cover {covered} of its {size} bytes; nothing was written for this snapshot",
                    String::from_utf8_lossy(&entry.key)
                )));
            }
            stats.keys_read += 1;
            stats.bytes_read += size;
            let ids = writer.place(pieces, &known, &mut chunks, &mut stats).await?;
            keys.push(KeyEntry { key: entry.key.clone(), ts: entry.ts, size, chunks: ids, stored });
            progress(done as u64 + 1, total);
        }
        for (flushed_id, location) in writer.flush().await? {
            chunks.insert(flushed_id, location);
        }
        let index = SnapshotIndex { id, glt, parent: stats.parent, created_ms: unix_ns() / 1_000_000, keys, chunks };
        stats.bytes_written = self.finish_export(writer, &index).await?;
        stats.keys = total;
        stats.elapsed = started.elapsed();
        Ok(stats)
    }

    /// The archived snapshots (none of them `id`) and the cluster's keys at `glt` once readable
    /// there: the indexes are read while the cluster is asked.
    async fn archived_and_listed(
        &self,
        client: &Client,
        id: u64,
        glt: u64,
    ) -> Result<(Vec<SnapshotIndex>, Vec<crate::Entry>), ArchiveError> {
        let listing = async {
            client.wait_readable(glt, Duration::from_secs(60)).await?;
            client.list_all(b"", Some(glt)).await
        };
        let archived = async {
            let archived = self.snapshots().await?;
            if archived.iter().any(|index| index.id == id) {
                return Err(ArchiveError::Exists(id));
            }
            Ok(archived)
        };
        tokio::try_join!(archived, async { listing.await.map_err(ArchiveError::from) })
    }

    /// The end of an export: waits until every pack `writer` started is durable, then writes
    /// `index` (which names them) durably. Returns the bytes written, packs and index.
    async fn finish_export(&self, mut writer: PackWriter, index: &SnapshotIndex) -> Result<u64, ArchiveError> {
        // Encoded while the last packs are written.
        let bytes = format::encode_index(index)
            .map_err(|error| ArchiveError::Format { object: index_path(index.id).to_string(), error })?;
        let written = writer.bytes_written + bytes.len() as u64;
        // Each pack write returned only once the pack was durable.
        writer.wait_written().await?;
        let options = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        match self.durability.put(&*self.store, &index_path(index.id), PutPayload::from(bytes), options).await {
            Err(ArchiveError::Store(object_store::Error::AlreadyExists { .. })) => Err(ArchiveError::Exists(index.id)),
            other => other.map(|()| written),
        }
    }

    /// Reads one chunk, checking its CRC and hash.
    async fn chunk(&self, id: &ChunkId, location: &Location) -> Result<Vec<u8>, ArchiveError> {
        let path = pack_path(&location.pack);
        let end = location.offset.checked_add(u64::from(location.len)).ok_or_else(|| ArchiveError::Format {
            object: path.to_string(),
            error: FormatError::Bad { what: "chunk offset", at: 0, value: location.offset },
        })?;
        let bytes = self.store.get_range(&path, location.offset..end).await?;
        let damaged = |error| ArchiveError::Format { object: format!("{path} (chunk {})", hex(id)), error };
        let (entry, _) =
            format::decode_entry(&bytes, usize::try_from(location.offset).unwrap_or(usize::MAX)).map_err(damaged)?;
        if entry.id != *id {
            return Err(damaged(FormatError::WrongHash { id: hex(id), found: hex(&entry.id) }));
        }
        format::open_entry(&entry).map_err(damaged)
    }

    /// Restores the keys of archived snapshot `id` starting with `prefix` to `target`; every
    /// chunk is checked against its hash on the way.
    pub async fn restore(
        &self,
        id: u64,
        prefix: &[u8],
        target: RestoreTarget<'_>,
        progress: Progress<'_>,
    ) -> Result<RestoreStats, ArchiveError> {
        let index = self.index(id).await?;
        let selected: Vec<&KeyEntry> = index.keys.iter().filter(|entry| entry.key.starts_with(prefix)).collect();
        let total: u64 = selected.iter().map(|entry| entry.size).sum();
        let mut stats = RestoreStats::default();
        for entry in selected {
            let mut value = Vec::with_capacity(usize::try_from(entry.size.min(64 << 20)).unwrap_or(0));
            for chunk in &entry.chunks {
                let location = index.chunks.get(chunk).ok_or_else(|| ArchiveError::Format {
                    object: index_path(id).to_string(),
                    error: FormatError::Body(format!("chunk {} has no location", hex(chunk))),
                })?;
                value.extend_from_slice(&self.chunk(chunk, location).await?);
            }
            if value.len() as u64 != entry.size {
                return Err(ArchiveError::Format {
                    object: index_path(id).to_string(),
                    error: FormatError::Body(format!(
                        "key {}: its chunks hold {} bytes, the index says {}",
                        String::from_utf8_lossy(&entry.key),
                        value.len(),
                        entry.size
                    )),
                });
            }
            match target {
                RestoreTarget::Directory(dir) => write_key_file(dir, &entry.key, &value)?,
                RestoreTarget::Cluster(client) => {
                    client.put(&entry.key, &value).await?;
                }
            }
            stats.keys += 1;
            stats.bytes += value.len() as u64;
            progress(stats.bytes, total);
        }
        Ok(stats)
    }

    /// Reads every pack and checks every chunk's hash, and that every chunk each snapshot
    /// names is there intact.
    pub async fn verify(&self, progress: Progress<'_>) -> Result<VerifyReport, ArchiveError> {
        let mut report = VerifyReport::default();
        let packs = self.objects("packs").await?;
        let total: u64 = packs.iter().map(|meta| meta.size).sum();
        let mut intact: HashSet<(PackId, u64)> = HashSet::new();
        for meta in &packs {
            let Some(pack) = meta.location.filename().and_then(parse_pack_name) else {
                report.errors.push(format!("{}: not a pack's name", meta.location));
                continue;
            };
            let bytes = self.store.get(&meta.location).await?.bytes().await?;
            report.packs += 1;
            report.bytes += bytes.len() as u64;
            match format::decode_pack(&bytes) {
                Ok(entries) => {
                    for (offset, entry) in entries {
                        report.chunks += 1;
                        match format::open_entry(&entry) {
                            Ok(_) => {
                                intact.insert((pack, offset));
                            }
                            Err(error) => report.errors.push(format!("{}: {error}", meta.location)),
                        }
                    }
                }
                Err(error) => report.errors.push(format!("{}: {error}", meta.location)),
            }
            progress(report.bytes, total);
        }
        for meta in self.objects("snapshots").await? {
            let bytes = self.store.get(&meta.location).await?.bytes().await?;
            match format::decode_index(&bytes) {
                Ok(index) => {
                    report.snapshots += 1;
                    let missing = index.chunks.values().filter(|at| !intact.contains(&(at.pack, at.offset))).count();
                    if missing > 0 {
                        report.errors.push(format!(
                            "snapshot {}: {missing} of its {} chunks are missing or damaged",
                            index.id,
                            index.chunks.len()
                        ));
                    }
                }
                Err(error) => report.errors.push(format!("{}: {error}", meta.location)),
            }
        }
        Ok(report)
    }

    /// Keeps the newest `keep_last` snapshots, deletes the others' indexes, then the packs no
    /// kept snapshot references (unless an export is running; see the module docs).
    pub async fn prune(&self, keep_last: usize) -> Result<PruneReport, ArchiveError> {
        let started_ms = i64::try_from(unix_ns() / 1_000_000).unwrap_or(i64::MAX);
        self.locked("prune", self.prune_locked(keep_last, started_ms)).await
    }

    async fn prune_locked(&self, keep_last: usize, started_ms: i64) -> Result<PruneReport, ArchiveError> {
        let mut report = PruneReport::default();
        let snapshots = self.snapshots().await?;
        let drop_count = snapshots.len().saturating_sub(keep_last);
        for index in &snapshots[..drop_count] {
            // Durably gone before any pack only it named is deleted.
            self.durability.delete(&*self.store, &index_path(index.id)).await?;
            report.snapshots_deleted.push(index.id);
        }
        if !self.locks("export").await?.is_empty() {
            report.deferred = true;
            return Ok(report);
        }
        // Look again after the check: an export that finished since the first read has its
        // index in by now (only such new indexes are read), and one that starts later writes
        // only packs newer than this prune.
        let read: HashSet<u64> = snapshots.iter().map(|index| index.id).collect();
        let newer = self.snapshots_besides(&read).await?;
        let referenced: HashSet<PackId> = snapshots[drop_count..]
            .iter()
            .chain(&newer)
            .flat_map(|index| index.chunks.values().map(|at| at.pack))
            .collect();
        for meta in self.objects("packs").await? {
            // Objects not named like a pack are not the archive's: left alone.
            let Some(pack) = meta.location.filename().and_then(parse_pack_name) else { continue };
            if !referenced.contains(&pack) && meta.last_modified.timestamp_millis() < started_ms {
                self.store.delete(&meta.location).await?;
                report.packs_deleted += 1;
                report.bytes_freed += meta.size;
            }
        }
        Ok(report)
    }

    /// Bytes stored (packs and indexes).
    pub async fn stored_bytes(&self) -> Result<u64, ArchiveError> {
        let mut total = 0;
        for prefix in ["packs", "snapshots"] {
            total += self.objects(prefix).await?.iter().map(|meta| meta.size).sum::<u64>();
        }
        Ok(total)
    }
}

#[cfg(feature = "s3")]
fn open_s3(location: &str, _rest: &str) -> Result<Arc<dyn ObjectStore>, String> {
    let store = object_store::aws::AmazonS3Builder::from_env().with_url(location).build().map_err(|e| e.to_string())?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "s3"))]
fn open_s3(_location: &str, _rest: &str) -> Result<Arc<dyn ObjectStore>, String> {
    Err("this build has no S3 support: build the client with `--features s3`".into())
}

/// Writes `value` to `dir/<key>`, refusing keys that would leave `dir`.
fn write_key_file(dir: &std::path::Path, key: &[u8], value: &[u8]) -> Result<(), ArchiveError> {
    let text = std::str::from_utf8(key)
        .map_err(|_| ArchiveError::BadKey { key: String::from_utf8_lossy(key).into_owned(), reason: "not UTF-8" })?;
    let bad = |reason| ArchiveError::BadKey { key: text.to_owned(), reason };
    let relative = std::path::Path::new(text);
    if text.is_empty() || text.ends_with('/') {
        return Err(bad("it names a directory"));
    }
    for component in relative.components() {
        if !matches!(component, std::path::Component::Normal(_)) {
            return Err(bad("it has a `..`, `.` or root component"));
        }
    }
    let path = dir.join(relative);
    let io = |error| ArchiveError::Io { path: path.display().to_string(), error };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(&path, value).map_err(io)
}

/// One content-defined chunk of a value, ready for a pack.
struct Piece {
    /// BLAKE3 id.
    id: ChunkId,
    raw_len: u32,
    /// The encoded pack entry; `None` when the archive already holds the chunk.
    entry: Option<Vec<u8>>,
}

/// Cuts `value` into content-defined chunks, hashes each, and encodes (compresses) those the
/// archive does not hold yet. Returns the value's size and its chunks in order.
fn prepare(value: &[u8], known: &ChunkMap<Location>) -> (u64, Vec<Piece>) {
    let pieces = fastcdc::v2020::FastCDC::new(value, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
        .map(|cut| piece(&value[cut.offset..cut.offset + cut.length], known))
        .collect();
    (value.len() as u64, pieces)
}

/// What the archive knows of a key's previous version: the cluster's stored chunks and the
/// archive's content-defined chunks (id, start, length).
#[derive(Debug, Clone)]
struct Previous {
    stored: Vec<([u8; 32], u32)>,
    chunks: Vec<(ChunkId, u64, u32)>,
}

impl Previous {
    /// `None` when the entry lacks what an incremental read needs.
    fn of(entry: &KeyEntry, known: &ChunkMap<Location>) -> Option<Self> {
        let mut start = 0u64;
        let mut chunks = Vec::with_capacity(entry.chunks.len());
        for id in &entry.chunks {
            let raw = known.get(id)?.raw;
            chunks.push((*id, start, raw));
            start += u64::from(raw);
        }
        (!entry.stored.is_empty() && start == entry.size).then(|| Self { stored: entry.stored.clone(), chunks })
    }
}

/// Byte ranges of the new version whose stored chunks the previous version does not have at
/// the same offset, merged and in order.
fn changed_ranges(old: &[([u8; 32], u32)], new: &[([u8; 32], u32)]) -> Vec<(u64, u64)> {
    let mut old_at = HashMap::new();
    let mut offset = 0u64;
    for (hash, len) in old {
        old_at.insert(offset, (*hash, *len));
        offset += u64::from(*len);
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0u64;
    for (hash, len) in new {
        let end = offset + u64::from(*len);
        if old_at.get(&offset) != Some(&(*hash, *len)) {
            match ranges.last_mut() {
                Some(last) if last.1 == offset => last.1 = end,
                _ => ranges.push((offset, end)),
            }
        }
        offset = end;
    }
    ranges
}

/// One chunk of new bytes, hashed and (when the archive lacks it) encoded.
fn piece(raw: &[u8], known: &ChunkMap<Location>) -> Piece {
    let id: ChunkId = *blake3::hash(raw).as_bytes();
    let entry = (!known.contains_key(&id)).then(|| format::encode_entry(&id, raw, ZSTD_LEVEL));
    Piece { id, raw_len: u32::try_from(raw.len()).unwrap_or(u32::MAX), entry }
}

/// A chunk of a new version: one the previous version has, or new bytes.
#[derive(Debug)]
enum Cut {
    Same { id: ChunkId, len: u32 },
    New(bytes::Bytes),
}

impl Cut {
    /// The chunk as a pack entry: an id already known, or new bytes hashed and encoded.
    fn into_piece(self, known: &ChunkMap<Location>) -> Piece {
        match self {
            Cut::Same { id, len } => Piece { id, raw_len: len, entry: None },
            Cut::New(raw) => piece(&raw, known),
        }
    }
}

/// The content-defined chunks of a new version of `size` bytes whose bytes differ from the
/// previous version's only in `changed`, reading through `read(offset, len)` only around the
/// changes: from the previous chunk boundary before a change, cutting until a cut lands on a
/// previous boundary past it (FastCDC's cuts depend only on the bytes since the chunk start,
/// so from there on the chunks are the previous ones). Gives exactly the chunks of cutting
/// the whole new value.
async fn rechunk<R, F>(
    previous: &[(ChunkId, u64, u32)],
    changed: &[(u64, u64)],
    size: u64,
    mut read: R,
) -> Result<Vec<Cut>, ArchiveError>
where
    R: FnMut(u64, u64) -> F,
    F: std::future::Future<Output = Result<bytes::Bytes, ArchiveError>>,
{
    let mut boundaries: HashSet<u64> = previous.iter().map(|(_, start, len)| start + u64::from(*len)).collect();
    // A value that grew or shrank: its old end was a cut only because the value ended there,
    // and the chunk around the new end must be cut again even where the node's stored chunks
    // match (a value cut short at a stored-chunk boundary).
    let old_size = previous.last().map_or(0, |(_, start, len)| start + u64::from(*len));
    let mut ranges = changed.to_vec();
    if size != old_size {
        boundaries.remove(&old_size);
        ranges.push((size.min(old_size).saturating_sub(1), size));
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let reuse = |pieces: &mut Vec<Cut>, (id, _, len): &(ChunkId, u64, u32)| {
        pieces.push(Cut::Same { id: *id, len: *len });
    };
    let mut pieces = Vec::new();
    let mut pos = 0u64; // every byte below is covered, and `pos` is a cut
    let mut old = 0usize; // the first previous chunk not yet passed
    for &(a, b) in &merged {
        if b <= pos {
            continue;
        }
        // Reused only when it ends before the change: a cut can depend on the byte at it.
        while old < previous.len() && previous[old].1 + u64::from(previous[old].2) < a {
            if previous[old].1 >= pos {
                reuse(&mut pieces, &previous[old]);
            }
            old += 1;
        }
        let mut start = if old < previous.len() { previous[old].1.max(pos) } else { pos };
        let mut reach = u64::from(2 * CHUNK_AVG);
        loop {
            let end = size.min(b.max(start + u64::from(CHUNK_MIN)) + reach);
            let data = read(start, end - start).await?;
            let mut next_start = start;
            let mut resynced = None;
            for cut in fastcdc::v2020::FastCDC::new(&data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
                let cut_end = start + (cut.offset + cut.length) as u64;
                if cut_end == end && end < size {
                    break; // cut by the window, not by the content
                }
                pieces.push(Cut::New(data.slice(cut.offset..cut.offset + cut.length)));
                next_start = cut_end;
                if cut_end == size || (cut_end >= b && boundaries.contains(&cut_end)) {
                    resynced = Some(cut_end);
                    break;
                }
            }
            if let Some(at) = resynced {
                pos = at;
                break;
            }
            start = next_start;
            reach = reach.saturating_mul(2);
        }
        while old < previous.len() && previous[old].1 < pos {
            old += 1;
        }
    }
    for chunk in &previous[old..] {
        if chunk.1 >= pos && chunk.1 + u64::from(chunk.2) <= size {
            reuse(&mut pieces, chunk);
        }
    }
    Ok(pieces)
}

/// Reads one changed key at `glt`: only the ranges that changed since `previous` when the
/// cluster's stored chunks allow it, else the whole value. Returns its size, its chunks and
/// the cluster's stored chunks (for the next export).
async fn read_key(
    client: Client,
    key: Vec<u8>,
    glt: u64,
    previous: Option<Previous>,
    known: Arc<ChunkMap<Location>>,
) -> Result<(u64, Vec<Piece>, Vec<([u8; 32], u32)>), ArchiveError> {
    let refs = client.chunk_refs(&key, Some(glt)).await?.ok_or(ClientError::NotFound)?;
    let stored = refs.chunks.clone();
    if let Some(previous) = previous.filter(|_| !refs.chunks.is_empty()) {
        let changed = changed_ranges(&previous.stored, &refs.chunks);
        let (client, key) = (&client, &key);
        let read = |offset: u64, len: u64| async move {
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            let part = client.get_range(key, Some(glt), offset, len).await?.ok_or(ClientError::NotFound)?;
            if part.ts != refs.ts {
                return Err(ArchiveError::Busy(format!(
                    "the version read changed under the export ({} then {})",
                    refs.ts, part.ts
                )));
            }
            Ok(part.value)
        };
        let cuts = rechunk(&previous.chunks, &changed, refs.size, read).await?;
        // Hashing and compressing the new chunks on a blocking thread, next to other reads.
        let pieces =
            tokio::task::spawn_blocking(move || cuts.into_iter().map(|cut| cut.into_piece(&known)).collect::<Vec<_>>())
                .await
                .map_err(|error| ArchiveError::Busy(format!("chunking task failed: {error}")))?;
        return Ok((refs.size, pieces, stored));
    }
    let value = client.get(&key, Some(glt)).await?.ok_or(ClientError::NotFound)?.value;
    let prepared = tokio::task::spawn_blocking(move || prepare(&value, &known)).await;
    let (size, pieces) = prepared.map_err(|error| ArchiveError::Busy(format!("chunking task failed: {error}")))?;
    Ok((size, pieces, stored))
}

/// Collects chunks into a pack and writes it once it is full, in the background (the chunks'
/// locations are known from the pack's bytes); [`PackWriter::wait_written`] waits for the
/// writes.
struct PackWriter {
    store: Arc<dyn ObjectStore>,
    durability: Durability,
    buffer: Vec<u8>,
    /// Chunks in the buffer: id, offset, entry length, raw length.
    pending: Vec<(ChunkId, u64, u32, u32)>,
    held: HashSet<ChunkId, ahash::RandomState>,
    /// Pack writes under way, oldest first.
    writes: std::collections::VecDeque<tokio::task::JoinHandle<Result<(), ArchiveError>>>,
    bytes_written: u64,
}

/// Pack writes a [`PackWriter`] keeps under way before it waits for the oldest.
const PACK_WRITES_IN_FLIGHT: usize = 2;

impl PackWriter {
    fn new(store: Arc<dyn ObjectStore>, durability: Durability) -> Self {
        Self {
            store,
            durability,
            buffer: Vec::new(),
            pending: Vec::new(),
            held: HashSet::default(),
            writes: std::collections::VecDeque::new(),
            bytes_written: 0,
        }
    }

    fn holds(&self, id: &ChunkId) -> bool {
        self.held.contains(id)
    }

    /// Adds an encoded entry (see [`format::encode_entry`]); returns the locations of the
    /// chunks of a pack it started writing, if it did.
    async fn add(
        &mut self,
        id: &ChunkId,
        entry: &[u8],
        raw_len: u32,
    ) -> Result<Vec<(ChunkId, Location)>, ArchiveError> {
        if self.buffer.is_empty() {
            self.buffer.reserve(PACK_BYTES + (1 << 20));
        }
        let (offset, len) = format::append_entry(&mut self.buffer, entry);
        self.held.insert(*id);
        self.pending.push((*id, offset, len, raw_len));
        if self.buffer.len() >= PACK_BYTES { self.flush().await } else { Ok(Vec::new()) }
    }

    /// Places a value's chunks: each is stored already (an earlier snapshot, or this one), or
    /// goes into a pack; returns their ids in order and counts them in `stats`.
    async fn place(
        &mut self,
        pieces: Vec<Piece>,
        known: &ChunkMap<Location>,
        chunks: &mut ChunkMap<Location>,
        stats: &mut ExportStats,
    ) -> Result<Vec<ChunkId>, ArchiveError> {
        let mut ids = Vec::with_capacity(pieces.len());
        for piece in pieces {
            if let Some(location) = known.get(&piece.id).or_else(|| chunks.get(&piece.id)).copied() {
                stats.chunks_reused += 1;
                chunks.insert(piece.id, location);
            } else if let (false, Some(entry)) = (self.holds(&piece.id), piece.entry) {
                stats.chunks_new += 1;
                for (flushed_id, location) in self.add(&piece.id, &entry, piece.raw_len).await? {
                    chunks.insert(flushed_id, location);
                }
            } else {
                stats.chunks_reused += 1;
            }
            ids.push(piece.id);
        }
        Ok(ids)
    }

    /// Starts writing the pack (named by its content's hash) and returns where its chunks are.
    async fn flush(&mut self) -> Result<Vec<(ChunkId, Location)>, ArchiveError> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        while self.writes.len() >= PACK_WRITES_IN_FLIGHT {
            self.wait_oldest().await?;
        }
        let bytes = std::mem::take(&mut self.buffer);
        let mut pack = PackId::default();
        pack.copy_from_slice(&blake3::hash(&bytes).as_bytes()[..16]);
        self.bytes_written += bytes.len() as u64;
        let (store, durability, path) = (self.store.clone(), self.durability.clone(), pack_path(&pack));
        self.writes.push_back(tokio::spawn(async move {
            durability.put(&*store, &path, PutPayload::from(bytes), PutOptions::default()).await
        }));
        self.held.clear();
        Ok(std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(id, offset, len, raw)| (id, Location { pack, offset, len, raw }))
            .collect())
    }

    async fn wait_oldest(&mut self) -> Result<(), ArchiveError> {
        let Some(write) = self.writes.pop_front() else { return Ok(()) };
        write.await.map_err(|error| ArchiveError::Busy(format!("pack write task failed: {error}")))??;
        Ok(())
    }

    /// Waits until every pack started is stored.
    async fn wait_written(&mut self) -> Result<(), ArchiveError> {
        while !self.writes.is_empty() {
            self.wait_oldest().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn text(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(format!("{} ", state % 100_000).as_bytes());
        }
        out.truncate(len);
        out
    }

    /// Stored chunks as the data node cuts them: fixed 64 KiB.
    fn stored(value: &[u8]) -> Vec<([u8; 32], u32)> {
        value.chunks(64 << 10).map(|c| (*blake3::hash(c).as_bytes(), c.len() as u32)).collect()
    }

    /// Re-cuts `new` from `base`'s chunks through `rechunk`; asserts it equals cutting the whole
    /// of `new` and covers it; returns the bytes it read.
    async fn check_rechunk(case: &str, base: &[u8], new: &[u8]) -> u64 {
        let known = ChunkMap::default();
        let mut start = 0u64;
        let previous: Vec<(ChunkId, u64, u32)> = prepare(base, &known)
            .1
            .into_iter()
            .map(|p| {
                let chunk = (p.id, start, p.raw_len);
                start += u64::from(p.raw_len);
                chunk
            })
            .collect();
        let changed = changed_ranges(&stored(base), &stored(new));
        let read_bytes = std::sync::atomic::AtomicU64::new(0);
        let read = |offset: u64, len: u64| {
            read_bytes.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            let part = bytes::Bytes::copy_from_slice(&new[offset as usize..((offset + len) as usize).min(new.len())]);
            async move { Ok(part) }
        };
        let cuts = rechunk(&previous, &changed, new.len() as u64, read).await.expect("rechunk");
        let pieces: Vec<Piece> = cuts.into_iter().map(|cut| cut.into_piece(&known)).collect();
        let got: Vec<ChunkId> = pieces.iter().map(|p| p.id).collect();
        let (_, whole) = prepare(new, &known);
        let want: Vec<ChunkId> = whole.iter().map(|p| p.id).collect();
        assert_eq!(got, want, "case {case}");
        let total: u64 = pieces.iter().map(|p| u64::from(p.raw_len)).sum();
        assert_eq!(total, new.len() as u64, "case {case}: the chunks cover the value");
        read_bytes.into_inner()
    }

    #[tokio::test]
    async fn reading_only_the_changes_gives_the_chunks_of_the_whole_value() {
        let base = text(1, 3_000_000);
        let mut one = base.clone();
        one[1_000_000..1_000_100].copy_from_slice(&[b'#'; 100]);
        let read = check_rechunk("one edit", &base, &one).await;
        assert!(read < 1_000_000, "case 0 read {read} bytes");
        let mut two = base.clone();
        two[10..20].copy_from_slice(&[b'!'; 10]);
        two[2_999_990..].copy_from_slice(&[b'?'; 10]);
        check_rechunk("both ends", &base, &two).await;
        let mut longer = base.clone();
        longer.extend_from_slice(&text(2, 200_000));
        check_rechunk("longer", &base, &longer).await;
        let mut shorter = base.clone();
        shorter.truncate(2_100_000);
        check_rechunk("shorter", &base, &shorter).await;
        let mut inserted = base.clone();
        inserted.splice(500_000..500_000, text(3, 5000));
        check_rechunk("inserted", &base, &inserted).await;
        check_rechunk("unchanged", &base, &base).await;
        // Cut short exactly at a stored-chunk boundary: every stored chunk still matches.
        let mut at_boundary = base.clone();
        at_boundary.truncate(32 << 16);
        check_rechunk("at a stored-chunk boundary", &base, &at_boundary).await;
        let mut at_start = base.clone();
        at_start[0] = b'X';
        check_rechunk("first byte", &base, &at_start).await;
        // A value of exactly 1 MiB (a stored-chunk multiple) that grows by 10 KiB.
        let whole = text(4, 1 << 20);
        let mut grown = whole.clone();
        grown.extend_from_slice(&text(5, 10 << 10));
        check_rechunk("growth past a stored-chunk multiple", &whole, &grown).await;
    }

    #[test]
    fn keys_that_would_leave_the_directory_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_key_file(dir.path(), b"a/b/c.txt", b"x").expect("a plain key");
        assert_eq!(std::fs::read(dir.path().join("a/b/c.txt")).expect("written"), b"x");
        for key in [&b"../x"[..], b"/etc/x", b"a/../../x", b"a/", b"", b"\xff"] {
            assert!(write_key_file(dir.path(), key, b"x").is_err(), "{key:?} accepted");
        }
    }

    #[tokio::test]
    async fn prune_spares_packs_while_an_export_holds_its_lock() {
        let dir = tempfile::tempdir().expect("temp dir");
        let archive = Archive::open(dir.path().to_str().expect("utf-8")).expect("open");
        let mut writer = PackWriter::new(archive.store.clone(), archive.durability.clone());
        let id = *blake3::hash(b"orphan").as_bytes();
        writer.add(&id, &format::encode_entry(&id, b"orphan", ZSTD_LEVEL), 6).await.expect("add");
        writer.flush().await.expect("flush");
        writer.wait_written().await.expect("written");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let export = archive.lock("export").await.expect("lock");
        let report = archive.prune(0).await.expect("prune");
        assert!(report.deferred);
        assert_eq!(report.packs_deleted, 0);
        archive.store.delete(&export).await.expect("unlock");
        let report = archive.prune(0).await.expect("prune");
        assert!(!report.deferred);
        assert_eq!(report.packs_deleted, 1, "an unreferenced pack older than the prune goes");
        assert!(archive.locks("prune").await.expect("locks").is_empty(), "prune let go of its lock");
    }

    /// The end of an export on a local archive: every pack the index names is synced (file,
    /// its directory, the archive's directory) before the index is written, and the index is
    /// synced before the export returns.
    #[tokio::test]
    async fn an_export_syncs_its_packs_before_the_index_that_names_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut archive = Archive::open(dir.path().to_str().expect("utf-8")).expect("open");
        archive.durability = archive.durability.clone().logged();
        let mut writer = PackWriter::new(archive.store.clone(), archive.durability.clone());
        let mut chunks = ChunkMap::default();
        // Two packs: each chunk (incompressible) fills one.
        for seed in 0..2u64 {
            let mut data = vec![0u8; PACK_BYTES + 1024];
            blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut data);
            let id = *blake3::hash(&data).as_bytes();
            let entry = format::encode_entry(&id, &data, ZSTD_LEVEL);
            chunks.extend(writer.add(&id, &entry, data.len() as u32).await.expect("add"));
        }
        chunks.extend(writer.flush().await.expect("flush"));
        let packs: HashSet<String> = chunks.values().map(|at| pack_path(&at.pack).to_string()).collect();
        assert_eq!(packs.len(), 2);
        let index = SnapshotIndex { id: 1, glt: 5, parent: None, created_ms: 0, keys: Vec::new(), chunks };
        archive.finish_export(writer, &index).await.expect("finish");
        let steps = archive.durability.steps();
        let at = |step: &str| steps.iter().position(|s| s == step);
        let index_put = at(&format!("put {}", index_path(1))).expect("the index was written");
        for pack in &packs {
            let synced = at(&format!("synced {pack}")).unwrap_or_else(|| panic!("{pack} never synced: {steps:?}"));
            let dir_synced = steps.iter().skip(synced).position(|s| s == "synced packs").map(|n| n + synced);
            assert!(
                dir_synced.is_some_and(|n| n < index_put),
                "packs/ synced after {pack}, before the index: {steps:?}"
            );
            assert!(synced < index_put, "{pack} synced before the index is written: {steps:?}");
        }
        let index_synced = at(&format!("synced {}", index_path(1))).expect("index synced");
        assert!(steps[index_synced..].iter().any(|s| s == "synced snapshots"), "{steps:?}");
        assert_eq!(steps.last().map(String::as_str), Some("synced ."), "{steps:?}");
    }

    #[test]
    fn unknown_schemes_and_missing_s3_support_are_named() {
        let error = Archive::open("ftp://host/x").expect_err("ftp");
        assert!(error.to_string().contains("only directories"), "{error}");
        if cfg!(not(feature = "s3")) {
            let error = Archive::open("s3://bucket/x").expect_err("s3 without the feature");
            assert!(error.to_string().contains("--features s3"), "{error}");
        }
    }
}
