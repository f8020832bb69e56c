//! The Raft log and vote on disk: one append-only file of `wire` records (type
//! [`RecordType::RaftLog`], CRC32C each), written through a [`LogFile`] that appends and
//! fdatasyncs. The production file is [`UringFile`] (tokio-uring on a thread of its own);
//! [`StdFile`] is the fallback where io_uring is unavailable.
//!
//! Records: a batch of entries, a vote, a truncation (entries from an index on are void), a
//! purge (entries up to a log id are compacted into the snapshot). Replaying them in order
//! gives the log. When the purged records make up most of the file it is rewritten
//! atomically with only what is live.
//!
//! [`replay`] is pure: bytes in, the log image or a typed [`ReplayError`] out. A torn tail
//! (the last append cut by a crash) is cut off; damage before a valid record is refused.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogId, RaftLogReader};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use wire::RecordType;

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// One record of the log file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum LogRecord {
    /// Entries appended, in index order.
    Entries(Vec<Entry>),
    /// The vote saved.
    Vote(Vote),
    /// Entries from this index on are void.
    Truncate(u64),
    /// Entries up to this log id are purged.
    Purge(LogId),
}

/// Why a log file cannot be replayed.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// A record that does not decode is followed by one that does: not a torn tail.
    #[error("raft log damaged at byte {offset}: {reason} (a valid record follows at byte {next})")]
    Damaged {
        /// Where the bad record starts.
        offset: usize,
        /// Why it is bad.
        reason: String,
        /// Where the next valid record starts.
        next: usize,
    },
    /// A record that decodes but whose payload is not a log record.
    #[error("raft log record at byte {offset} is not a log record: {reason}")]
    BadRecord {
        /// Where it starts.
        offset: usize,
        /// Why.
        reason: String,
    },
}

/// The log as replayed from a file.
#[derive(Debug, Default)]
pub struct LogImage {
    /// Live entries by index.
    pub entries: BTreeMap<u64, Entry>,
    /// The saved vote.
    pub vote: Option<Vote>,
    /// Last purged log id.
    pub purged: Option<LogId>,
    /// Bytes of valid records; anything after is a torn tail to cut.
    pub valid_bytes: usize,
    /// Records replayed.
    pub records: usize,
}

/// The largest record: a batch of entries.
const RECORD_BYTES_MAX: u32 = 32 << 20;

/// Replays `bytes` (a whole log file).
pub fn replay(bytes: &[u8]) -> Result<LogImage, ReplayError> {
    let mut image = LogImage::default();
    let mut offset = 0;
    while offset < bytes.len() {
        let (record, used) = match wire::decode(&bytes[offset..], RECORD_BYTES_MAX) {
            Ok((record, used)) if record.record_type == RecordType::RaftLog => (record, used),
            Ok((record, _)) => {
                return Err(ReplayError::BadRecord { offset, reason: format!("record type {:?}", record.record_type) });
            }
            Err(error) => {
                if let Some(next) = next_valid_record(bytes, offset + 1) {
                    return Err(ReplayError::Damaged { offset, reason: error.to_string(), next });
                }
                break;
            }
        };
        let parsed: LogRecord = serde_json::from_slice(record.payload)
            .map_err(|error| ReplayError::BadRecord { offset, reason: error.to_string() })?;
        image.apply(parsed);
        offset += used;
        image.records += 1;
    }
    image.valid_bytes = offset;
    Ok(image)
}

fn next_valid_record(bytes: &[u8], from: usize) -> Option<usize> {
    let magic = wire::MAGIC.to_le_bytes();
    (from..bytes.len().saturating_sub(wire::HEADER_BYTES - 1))
        .filter(|at| bytes[*at..].starts_with(&magic))
        .find(|at| wire::decode(&bytes[*at..], RECORD_BYTES_MAX).is_ok())
}

impl LogImage {
    fn apply(&mut self, record: LogRecord) {
        match record {
            LogRecord::Entries(entries) => {
                for entry in entries {
                    self.entries.insert(entry.log_id.index, entry);
                }
            }
            LogRecord::Vote(vote) => self.vote = Some(vote),
            LogRecord::Truncate(index) => {
                self.entries.split_off(&index);
            }
            LogRecord::Purge(log_id) => {
                self.entries = self.entries.split_off(&(log_id.index + 1));
                self.purged = Some(log_id);
            }
        }
    }
}

/// Encodes one record.
pub fn encode_record(record: &LogRecord) -> io::Result<Vec<u8>> {
    let payload = serde_json::to_vec(record).map_err(io::Error::other)?;
    let header = wire::encode_header(RecordType::RaftLog, 0, 0, &payload).map_err(io::Error::other)?;
    let mut bytes = Vec::with_capacity(header.len() + payload.len());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

/// The file under the log: appends that are durable when they return, and atomic rewrites.
pub trait LogFile: Send + Sync + 'static {
    /// Appends `bytes` at the end and fdatasyncs.
    fn append(&mut self, bytes: Vec<u8>) -> impl Future<Output = io::Result<()>> + Send;
    /// Replaces the whole file with `bytes`, atomically (temp file, fsync, rename, dir fsync).
    fn replace(&mut self, bytes: Vec<u8>) -> impl Future<Output = io::Result<()>> + Send;
}

/// Reads the log file at `path` (empty when absent) and cuts a torn tail off it.
pub fn read_and_repair(path: &Path) -> io::Result<(LogImage, Vec<u8>)> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(error) => return Err(error),
    };
    let image = replay(&bytes).map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    if image.valid_bytes < bytes.len() {
        eprintln!(
            "controlplane: cutting a torn tail of {} bytes off {}",
            bytes.len() - image.valid_bytes,
            path.display()
        );
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(image.valid_bytes as u64)?;
        file.sync_all()?;
    }
    Ok((image, bytes))
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Blocking-I/O file for kernels without io_uring: each operation on the blocking pool.
#[derive(Debug)]
pub struct StdFile {
    path: PathBuf,
    file: Arc<std::fs::File>,
    len: u64,
}

impl StdFile {
    /// Opens (creating) the file for appending at its current end.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(Self { path: path.to_owned(), file: Arc::new(file), len })
    }
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(io::Error::other)?
}

impl LogFile for StdFile {
    fn append(&mut self, bytes: Vec<u8>) -> impl Future<Output = io::Result<()>> + Send {
        let file = self.file.clone();
        let at = self.len;
        self.len += bytes.len() as u64;
        async move {
            blocking(move || {
                use std::os::unix::fs::FileExt;
                file.write_all_at(&bytes, at)?;
                file.sync_data()
            })
            .await
        }
    }

    fn replace(&mut self, bytes: Vec<u8>) -> impl Future<Output = io::Result<()>> + Send {
        let path = self.path.clone();
        let len = bytes.len() as u64;
        let work = blocking(move || {
            let temp = temp_path(&path);
            std::fs::write(&temp, &bytes)?;
            std::fs::File::open(&temp)?.sync_all()?;
            std::fs::rename(&temp, &path)?;
            sync_dir(&path)?;
            std::fs::OpenOptions::new().read(true).write(true).open(&path)
        });
        async move {
            let file = work.await?;
            self.file = Arc::new(file);
            self.len = len;
            Ok(())
        }
    }
}

enum UringOp {
    Append(Vec<u8>, tokio::sync::oneshot::Sender<io::Result<()>>),
    Replace(Vec<u8>, tokio::sync::oneshot::Sender<io::Result<()>>),
}

/// The log file on io_uring: a thread runs a tokio-uring runtime that owns the file; appends
/// are `write_at` then `fdatasync`, both submitted to the ring.
#[derive(Debug)]
pub struct UringFile {
    ops: tokio::sync::mpsc::UnboundedSender<UringOp>,
}

impl UringFile {
    /// Starts the ring thread and opens (creating) the file at `path`. Fails where io_uring
    /// is unavailable, so the caller can fall back to [`StdFile`].
    pub fn open(path: &Path) -> io::Result<Self> {
        let (ops, mut rx) = tokio::sync::mpsc::unbounded_channel::<UringOp>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let path = path.to_owned();
        let panic_tx = ready_tx.clone();
        std::thread::Builder::new().name("raftlog-uring".into()).spawn(move || {
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tokio_uring::start(async move {
                    let opened = async {
                        let std_file = std::fs::OpenOptions::new()
                            .create(true)
                            .truncate(false)
                            .read(true)
                            .write(true)
                            .open(&path)?;
                        let len = std_file.metadata()?.len();
                        Ok::<_, io::Error>((tokio_uring::fs::File::from_std(std_file), len))
                    }
                    .await;
                    let (mut file, mut len) = match opened {
                        Ok(opened) => {
                            let _ = ready_tx.send(Ok(()));
                            opened
                        }
                        Err(error) => {
                            let _ = ready_tx.send(Err(error));
                            return;
                        }
                    };
                    while let Some(op) = rx.recv().await {
                        match op {
                            UringOp::Append(bytes, reply) => {
                                let size = bytes.len() as u64;
                                let (written, _) = file.write_all_at(bytes, len).await;
                                let result = match written {
                                    Ok(()) => file.sync_data().await,
                                    Err(error) => Err(error),
                                };
                                if result.is_ok() {
                                    len += size;
                                }
                                let _ = reply.send(result);
                            }
                            UringOp::Replace(bytes, reply) => {
                                let size = bytes.len() as u64;
                                let result = replace_uring(&path, bytes).await;
                                match result {
                                    Ok(new_file) => {
                                        let old = std::mem::replace(&mut file, new_file);
                                        let _ = old.close().await;
                                        len = size;
                                        let _ = reply.send(Ok(()));
                                    }
                                    Err(error) => {
                                        let _ = reply.send(Err(error));
                                    }
                                }
                            }
                        }
                    }
                    let _ = file.close().await;
                });
            }));
            if started.is_err() {
                // tokio-uring panics when the kernel refuses io_uring_setup.
                let _ = panic_tx.send(Err(io::Error::other("io_uring unavailable")));
            }
        })?;
        ready_rx.recv().map_err(|_| io::Error::other("io_uring thread exited"))??;
        Ok(Self { ops })
    }

    async fn submit(&self, op: impl FnOnce(tokio::sync::oneshot::Sender<io::Result<()>>) -> UringOp) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ops.send(op(tx)).map_err(|_| io::Error::other("io_uring log thread is gone"))?;
        rx.await.map_err(|_| io::Error::other("io_uring log thread is gone"))?
    }
}

async fn replace_uring(path: &Path, bytes: Vec<u8>) -> io::Result<tokio_uring::fs::File> {
    let temp = temp_path(path);
    let file = tokio_uring::fs::File::create(&temp).await?;
    let (written, _) = file.write_all_at(bytes, 0).await;
    written?;
    file.sync_all().await?;
    file.close().await?;
    tokio_uring::fs::rename(&temp, path).await?;
    sync_dir(path)?;
    let std_file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    Ok(tokio_uring::fs::File::from_std(std_file))
}

impl LogFile for UringFile {
    fn append(&mut self, bytes: Vec<u8>) -> impl Future<Output = io::Result<()>> + Send {
        self.submit(|reply| UringOp::Append(bytes, reply))
    }

    fn replace(&mut self, bytes: Vec<u8>) -> impl Future<Output = io::Result<()>> + Send {
        self.submit(|reply| UringOp::Replace(bytes, reply))
    }
}

/// The file the server uses: io_uring when the kernel allows, else blocking I/O.
#[derive(Debug)]
pub enum AnyFile {
    /// tokio-uring.
    Uring(UringFile),
    /// std::fs on the blocking pool.
    Std(StdFile),
}

/// Which file implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogIo {
    /// io_uring, falling back to blocking I/O if the kernel refuses it.
    #[default]
    Auto,
    /// io_uring only.
    Uring,
    /// Blocking I/O only.
    Std,
}

impl AnyFile {
    /// Opens `path` with `io`.
    pub fn open(path: &Path, io: LogIo) -> io::Result<Self> {
        match io {
            LogIo::Std => Ok(Self::Std(StdFile::open(path)?)),
            LogIo::Uring => Ok(Self::Uring(UringFile::open(path)?)),
            LogIo::Auto => match UringFile::open(path) {
                Ok(file) => Ok(Self::Uring(file)),
                Err(error) => {
                    eprintln!("controlplane: io_uring unavailable ({error}); the raft log uses blocking I/O");
                    Ok(Self::Std(StdFile::open(path)?))
                }
            },
        }
    }

    /// `"io_uring"` or `"blocking"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Uring(_) => "io_uring",
            Self::Std(_) => "blocking",
        }
    }
}

impl LogFile for AnyFile {
    async fn append(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        match self {
            Self::Uring(file) => file.append(bytes).await,
            Self::Std(file) => file.append(bytes).await,
        }
    }

    async fn replace(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        match self {
            Self::Uring(file) => file.replace(bytes).await,
            Self::Std(file) => file.replace(bytes).await,
        }
    }
}

type Entries = Arc<Mutex<BTreeMap<u64, Entry>>>;

/// openraft's log storage over a [`LogFile`].
#[derive(Debug)]
pub struct LogStore<F> {
    file: F,
    entries: Entries,
    vote: Option<Vote>,
    purged: Option<LogId>,
    /// Records in the file that a rewrite would drop (superseded votes, purged entries).
    dead_records: usize,
    /// A failed write poisons the store: openraft stops the node rather than go on with a
    /// log it cannot trust.
    failed: bool,
}

/// Rewrite the file once this many of its records are dead.
const REWRITE_AFTER_DEAD_RECORDS: usize = 4096;

impl<F: LogFile> LogStore<F> {
    /// A store over `file` whose current contents replayed to `image`.
    pub fn new(file: F, image: LogImage) -> Self {
        Self {
            file,
            entries: Arc::new(Mutex::new(image.entries)),
            vote: image.vote,
            purged: image.purged,
            dead_records: image.records,
            failed: false,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn write(&mut self, record: &LogRecord, subject: ErrorSubject<u64>) -> Result<(), StorageError> {
        let fail = |error: io::Error, subject| StorageError::from_io_error(subject, ErrorVerb::Write, error);
        if self.failed {
            return Err(fail(io::Error::other("an earlier raft log write failed"), subject));
        }
        let bytes = encode_record(record).map_err(|e| fail(e, subject.clone()))?;
        if let Err(error) = self.file.append(bytes).await {
            self.failed = true;
            return Err(fail(error, subject));
        }
        Ok(())
    }

    async fn maybe_rewrite(&mut self) -> Result<(), StorageError> {
        if self.dead_records < REWRITE_AFTER_DEAD_RECORDS {
            return Ok(());
        }
        let live: Vec<Entry> = self.entries().values().cloned().collect();
        let mut bytes = Vec::new();
        let mut records = vec![];
        if let Some(vote) = self.vote {
            records.push(LogRecord::Vote(vote));
        }
        if let Some(purged) = self.purged {
            records.push(LogRecord::Purge(purged));
        }
        records.push(LogRecord::Entries(live));
        for record in &records {
            bytes.extend(
                encode_record(record)
                    .map_err(|e| StorageError::from_io_error(ErrorSubject::Logs, ErrorVerb::Write, e))?,
            );
        }
        if let Err(error) = self.file.replace(bytes).await {
            self.failed = true;
            return Err(StorageError::from_io_error(ErrorSubject::Logs, ErrorVerb::Write, error));
        }
        self.dead_records = 0;
        Ok(())
    }
}

/// Reads entries for replication while the store appends.
#[derive(Debug, Clone)]
pub struct LogReader {
    entries: Entries,
}

fn read_range<RB: RangeBounds<u64>>(entries: &Entries, range: RB) -> Vec<Entry> {
    entries.lock().unwrap_or_else(PoisonError::into_inner).range(range).map(|(_, entry)| entry.clone()).collect()
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(read_range(&self.entries, range))
    }
}

impl<F: LogFile> RaftLogReader<TypeConfig> for LogStore<F> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(read_range(&self.entries, range))
    }
}

impl<F: LogFile> RaftLogStorage<TypeConfig> for LogStore<F> {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last = self.entries().values().next_back().map(|entry| *entry.get_log_id()).or(self.purged);
        Ok(LogState { last_purged_log_id: self.purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader { entries: self.entries.clone() }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write(&LogRecord::Vote(*vote), ErrorSubject::Vote).await?;
        if self.vote.is_some() {
            self.dead_records += 1;
        }
        self.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.vote)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        {
            let mut map = self.entries();
            for entry in &entries {
                map.insert(entry.log_id.index, entry.clone());
            }
        }
        let result = self.write(&LogRecord::Entries(entries), ErrorSubject::Logs).await;
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(error) => callback.log_io_completed(Err(io::Error::other(error.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let removed = self.entries().split_off(&log_id.index).len();
        self.write(&LogRecord::Truncate(log_id.index), ErrorSubject::Logs).await?;
        self.dead_records += removed.min(1) + 1;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let removed = {
            let mut map = self.entries();
            let kept = map.split_off(&(log_id.index + 1));
            std::mem::replace(&mut *map, kept).len()
        };
        self.write(&LogRecord::Purge(log_id), ErrorSubject::Logs).await?;
        self.purged = Some(log_id);
        self.dead_records += removed + 1;
        self.maybe_rewrite().await
    }
}
