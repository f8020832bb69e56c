//! The Raft log and vote on disk: one append-only file of `wire` records (type
//! [`RecordType::RaftLog`], CRC32C each), written through a [`LogFile`] that appends and
//! fdatasyncs. The production file is [`LogWriter`]: a thread of its own that owns the file,
//! on tokio-uring, or on blocking I/O where io_uring is unavailable.
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
use std::sync::atomic::{AtomicBool, Ordering};
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
    controlapi::rpc::json_record(RecordType::RaftLog, 0, record).map_err(io::Error::other)
}

/// Runs once an append is durable (or has failed), in submission order.
pub type Completion = Box<dyn FnOnce(io::Result<()>) + Send>;

/// The file under the log. Appends are queued and return at once; their completions run in
/// order once they are durable, so the Raft core replicates while the disk syncs. Queued
/// appends are written together and synced once (group commit). After a failed append every
/// later one fails too: nothing is written past a hole.
pub trait LogFile: Send + Sync + 'static {
    /// Queues `bytes` for appending at the end; `done` runs after the fdatasync covering them.
    fn append(&mut self, bytes: Vec<u8>, done: Completion);
    /// Replaces the whole file with `bytes` after every queued append, atomically (temp file,
    /// fsync, rename, directory fsync).
    fn replace(&mut self, bytes: Vec<u8>) -> impl Future<Output = io::Result<()>> + Send;
}

/// Appends `bytes` through `file` and waits until they are durable.
pub async fn append_and_wait(file: &mut impl LogFile, bytes: Vec<u8>) -> io::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    file.append(
        bytes,
        Box::new(move |result| {
            let _ = tx.send(result);
        }),
    );
    rx.await.map_err(|_| io::Error::other("the raft log writer is gone"))?
}

enum Op {
    Append(Vec<u8>, Completion),
    Replace(Vec<u8>, tokio::sync::oneshot::Sender<io::Result<()>>),
}

type OpReceiver = tokio::sync::mpsc::UnboundedReceiver<Op>;
type OpSender = tokio::sync::mpsc::UnboundedSender<Op>;

/// One unit of the writer's work: the appends queued together (one write, one sync), or a
/// replace.
enum Batch {
    Appends(Vec<u8>, Vec<Completion>),
    Replace(Vec<u8>, tokio::sync::oneshot::Sender<io::Result<()>>),
}

/// Takes `first` and every append queued behind it, stopping before a replace (kept in
/// `held` for the next call).
fn next_batch(first: Op, rx: &mut OpReceiver, held: &mut Option<Op>) -> Batch {
    let (mut bytes, mut done) = match first {
        Op::Replace(bytes, reply) => return Batch::Replace(bytes, reply),
        Op::Append(bytes, completion) => (bytes, vec![completion]),
    };
    loop {
        match rx.try_recv() {
            Ok(Op::Append(more, completion)) => {
                bytes.extend_from_slice(&more);
                done.push(completion);
            }
            Ok(replace @ Op::Replace(..)) => {
                *held = Some(replace);
                return Batch::Appends(bytes, done);
            }
            Err(_) => return Batch::Appends(bytes, done),
        }
    }
}

fn finish(done: Vec<Completion>, result: &io::Result<()>) {
    for completion in done {
        completion(match result {
            Ok(()) => Ok(()),
            Err(error) => Err(io::Error::new(error.kind(), error.to_string())),
        });
    }
}

fn send_append(ops: &OpSender, bytes: Vec<u8>, done: Completion) {
    if let Err(tokio::sync::mpsc::error::SendError(Op::Append(_, done))) = ops.send(Op::Append(bytes, done)) {
        done(Err(io::Error::other("the raft log writer is gone")));
    }
}

async fn send_replace(ops: &OpSender, bytes: Vec<u8>) -> io::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    ops.send(Op::Replace(bytes, tx)).map_err(|_| io::Error::other("the raft log writer is gone"))?;
    rx.await.map_err(|_| io::Error::other("the raft log writer is gone"))?
}

const POISONED: &str = "an earlier raft log append failed";

/// A writer's view of its file: where the next batch goes, and whether one failed (then
/// every later one is refused, so nothing is written past a hole).
struct Tail {
    len: u64,
    poisoned: bool,
}

impl Tail {
    /// The error to answer a batch with instead of writing it, once poisoned.
    fn refusal(&self) -> Option<io::Error> {
        self.poisoned.then(|| io::Error::other(POISONED))
    }

    /// Records how a batch of `size` bytes went and runs its completions.
    fn settle(&mut self, result: io::Result<()>, size: u64, done: Vec<Completion>) {
        match &result {
            Ok(()) => self.len += size,
            Err(_) => self.poisoned = true,
        }
        finish(done, &result);
    }
}

/// Opens (creating) the log file for appending at its end.
fn open_for_append(path: &Path) -> io::Result<(std::fs::File, Tail)> {
    let file = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    Ok((file, Tail { len, poisoned: false }))
}

/// Reads the log file at `path` (empty when absent) and cuts a torn tail off it.
pub fn read_and_repair(path: &Path) -> io::Result<LogImage> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(error) => return Err(error),
    };
    let image = replay(&bytes).map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    if image.valid_bytes < bytes.len() {
        tracing::warn!(bytes = bytes.len() - image.valid_bytes, path = %path.display(), "cutting a torn tail off the raft log");
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(image.valid_bytes as u64)?;
        file.sync_all()?;
    }
    Ok(image)
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

/// Replaces the file at `path` with `bytes` so that a crash leaves the old or the new file,
/// whole: `<path>.tmp` written and fsynced, renamed over `path`, directory fsynced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = temp_path(path);
    std::fs::write(&temp, bytes)?;
    std::fs::File::open(&temp)?.sync_all()?;
    std::fs::rename(&temp, path)?;
    sync_dir(path)
}

/// The log file behind a writer thread that owns it: tokio-uring's ring (`write_at`, then
/// `fdatasync`, per batch) where the kernel allows, else blocking pwrite + fdatasync.
#[derive(Debug)]
pub struct LogWriter {
    ops: OpSender,
    kind: &'static str,
}

impl LogWriter {
    /// Opens `path` with `io`: io_uring, blocking I/O, or io_uring falling back to blocking.
    pub fn open(path: &Path, io: LogIo) -> io::Result<Self> {
        match io {
            LogIo::Std => Self::open_std(path),
            LogIo::Uring => Self::open_uring(path),
            LogIo::Auto => Self::open_uring(path).or_else(|error| {
                tracing::warn!(%error, "io_uring unavailable; the raft log uses blocking I/O");
                Self::open_std(path)
            }),
        }
    }

    /// `"io_uring"` or `"blocking"`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Opens (creating) the file with a blocking writer thread, appending at its end. For
    /// kernels without io_uring.
    pub fn open_std(path: &Path) -> io::Result<Self> {
        let (mut file, mut tail) = open_for_append(path)?;
        let (ops, mut rx) = tokio::sync::mpsc::unbounded_channel::<Op>();
        let path = path.to_owned();
        std::thread::Builder::new().name("raftlog-std".into()).spawn(move || {
            use std::os::unix::fs::FileExt;
            let mut held = None;
            while let Some(op) = held.take().or_else(|| rx.blocking_recv()) {
                match next_batch(op, &mut rx, &mut held) {
                    Batch::Appends(bytes, done) => {
                        let result = match tail.refusal() {
                            Some(refused) => Err(refused),
                            None => file.write_all_at(&bytes, tail.len).and_then(|()| file.sync_data()),
                        };
                        tail.settle(result, bytes.len() as u64, done);
                    }
                    Batch::Replace(bytes, reply) => {
                        let result = replace_std(&path, &bytes).map(|new_file| {
                            file = new_file;
                            tail.len = bytes.len() as u64;
                        });
                        let _ = reply.send(result);
                    }
                }
            }
        })?;
        Ok(Self { ops, kind: "blocking" })
    }
}

fn replace_std(path: &Path, bytes: &[u8]) -> io::Result<std::fs::File> {
    write_atomically(path, bytes)?;
    std::fs::OpenOptions::new().read(true).write(true).open(path)
}

impl LogWriter {
    /// Starts a thread running a tokio-uring runtime that owns the file at `path` (created
    /// if absent). Fails where io_uring is unavailable.
    pub fn open_uring(path: &Path) -> io::Result<Self> {
        let (ops, rx) = tokio::sync::mpsc::unbounded_channel::<Op>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let path = path.to_owned();
        let panic_tx = ready_tx.clone();
        std::thread::Builder::new().name("raftlog-uring".into()).spawn(move || {
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tokio_uring::start(uring_writer(path, rx, ready_tx));
            }));
            if started.is_err() {
                // tokio-uring panics when the kernel refuses io_uring_setup.
                let _ = panic_tx.send(Err(io::Error::other("io_uring unavailable")));
            }
        })?;
        ready_rx.recv().map_err(|_| io::Error::other("io_uring thread exited"))??;
        Ok(Self { ops, kind: "io_uring" })
    }
}

async fn uring_writer(path: PathBuf, mut rx: OpReceiver, ready: std::sync::mpsc::Sender<io::Result<()>>) {
    let (mut file, mut tail) = match open_for_append(&path) {
        Ok((file, tail)) => {
            let _ = ready.send(Ok(()));
            (tokio_uring::fs::File::from_std(file), tail)
        }
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let mut held = None;
    loop {
        let op = match held.take() {
            Some(op) => op,
            None => match rx.recv().await {
                Some(op) => op,
                None => break,
            },
        };
        match next_batch(op, &mut rx, &mut held) {
            Batch::Appends(bytes, done) => {
                let size = bytes.len() as u64;
                let result = match tail.refusal() {
                    Some(refused) => Err(refused),
                    None => match file.write_all_at(bytes, tail.len).await.0 {
                        Ok(()) => file.sync_data().await,
                        Err(error) => Err(error),
                    },
                };
                tail.settle(result, size, done);
            }
            Batch::Replace(bytes, reply) => {
                let size = bytes.len() as u64;
                match replace_uring(&path, bytes).await {
                    Ok(new_file) => {
                        let old = std::mem::replace(&mut file, new_file);
                        let _ = old.close().await;
                        tail.len = size;
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

impl LogFile for LogWriter {
    fn append(&mut self, bytes: Vec<u8>, done: Completion) {
        send_append(&self.ops, bytes, done);
    }

    fn replace(&mut self, bytes: Vec<u8>) -> impl Future<Output = io::Result<()>> + Send {
        send_replace(&self.ops, bytes)
    }
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
    failed: Arc<AtomicBool>,
    rewrite_after: usize,
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
            failed: Arc::default(),
            rewrite_after: REWRITE_AFTER_DEAD_RECORDS,
        }
    }

    /// Rewrites the file once `records` of its records are dead (default 4096).
    pub fn with_rewrite_after(mut self, records: usize) -> Self {
        self.rewrite_after = records;
        self
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn write(&mut self, record: &LogRecord, subject: ErrorSubject<u64>) -> Result<(), StorageError> {
        let fail = |error: io::Error, subject| StorageError::from_io_error(subject, ErrorVerb::Write, error);
        if self.failed.load(Ordering::Relaxed) {
            return Err(fail(io::Error::other(POISONED), subject));
        }
        let bytes = encode_record(record).map_err(|e| fail(e, subject.clone()))?;
        if let Err(error) = append_and_wait(&mut self.file, bytes).await {
            self.failed.store(true, Ordering::Relaxed);
            return Err(fail(error, subject));
        }
        Ok(())
    }

    async fn maybe_rewrite(&mut self) -> Result<(), StorageError> {
        if self.dead_records < self.rewrite_after {
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
            self.failed.store(true, Ordering::Relaxed);
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
        if self.failed.load(Ordering::Relaxed) {
            let error = io::Error::other(POISONED);
            callback.log_io_completed(Err(io::Error::other(POISONED)));
            return Err(StorageError::from_io_error(ErrorSubject::Logs, ErrorVerb::Write, error));
        }
        let bytes = encode_record(&LogRecord::Entries(entries))
            .map_err(|e| StorageError::from_io_error(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        // Queued, not awaited: openraft replicates while the disk syncs, and learns of the
        // sync through the callback.
        let failed = self.failed.clone();
        self.file.append(
            bytes,
            Box::new(move |result| {
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                callback.log_io_completed(result);
            }),
        );
        Ok(())
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
