//! The WAL's glommio shell: O_DIRECT segment files, group commit, rotation and fencing.
//!
//! One writer task per WAL. Appenders reserve a slot in the open batch
//! ([`BatchBuilder`]) and copy their record straight into its DMA buffers, then wait on the
//! batch's latch. The writer seals the open batch as soon as the previous barrier has
//! completed (every append that arrived meanwhile joins it), writes it with as many DMA
//! writes as the device's `max_sectors_kb` requires, issues one io_uring `fdatasync`, and only
//! then sets the latch. Any write or sync error fences the WAL.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;
use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
use glommio::{GlommioError, Task};

use super::faults::{FaultInjector, WriteFault};
use super::format::{
    BatchBegin, BatchBuilder, BatchLimits, Reserve, SECTOR_BYTES, SegmentHeader, SegmentSeal, parse_segment_file_name,
    segment_file_name,
};
use super::recovery::{self, SegmentBytes};
use super::tail::TailBatch;
use super::{WalConfig, WalError};
use crate::files::{calibrate_iopoll, delete_gradually, device_io_bytes_max, sync_path, sync_path_off_executor};
use crate::limits;
use crate::sync::{Latch, Notify};

type BatchOutcome = Result<(), WalError>;
/// A reserved record: the latch of its batch and its LSN.
type Reserved = (Rc<Latch<BatchOutcome>>, u64);

/// Counters of one WAL since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Batches made durable.
    pub batches: u64,
    /// Records made durable.
    pub records: u64,
    /// Payload bytes made durable.
    pub payload_bytes: u64,
    /// Bytes written to segments by batches (headers and padding included).
    pub batch_bytes: u64,
    /// Segment rotations.
    pub rotations: u64,
    /// Rotations onto a released segment reused without zero-filling.
    pub reused_segments: u64,
}

/// The batch appenders are filling.
struct OpenBatch {
    builder: BatchBuilder,
    chunks: Vec<DmaBuffer>,
    chunk_bytes: usize,
    latch: Rc<Latch<BatchOutcome>>,
    payload_bytes: u64,
}

impl OpenBatch {
    fn new(first_lsn: u64, limits: BatchLimits, chunk_bytes: usize) -> Self {
        Self {
            builder: BatchBuilder::new(first_lsn, limits),
            chunks: Vec::new(),
            chunk_bytes,
            latch: Latch::new(),
            payload_bytes: 0,
        }
    }

    fn ensure_capacity(&mut self, end: usize) {
        while self.chunks.len() * self.chunk_bytes < end {
            self.chunks.push(glommio::allocate_dma_buffer(self.chunk_bytes));
        }
    }

    /// Calls `fill` with each piece of the batch range `offset..end` (across chunk
    /// boundaries) and the position of that piece within the range.
    fn for_each_span(&mut self, mut offset: usize, end: usize, mut fill: impl FnMut(&mut [u8], usize)) {
        self.ensure_capacity(end);
        let start = offset;
        while offset < end {
            let chunk = &mut self.chunks[offset / self.chunk_bytes];
            let within = offset % self.chunk_bytes;
            let take = (end - offset).min(self.chunk_bytes - within);
            fill(&mut chunk.as_bytes_mut()[within..within + take], offset - start);
            offset += take;
        }
    }

    /// Copies `bytes` to `offset` from the batch start.
    fn copy_in(&mut self, offset: usize, bytes: &[u8]) {
        self.for_each_span(offset, offset + bytes.len(), |span, at| span.copy_from_slice(&bytes[at..at + span.len()]));
    }

    /// Writes the record for `slot` into the buffers.
    fn put_record(&mut self, offset: usize, glt: u64, lsn: u64, payload: &[u8]) -> Result<(), wire::EncodeError> {
        let header = wire::encode_header(wire::RecordType::Data, glt, lsn, payload)?;
        self.copy_in(offset, &header);
        self.copy_in(offset + header.len(), payload);
        self.payload_bytes += payload.len() as u64;
        Ok(())
    }

    /// Fills in the `BatchBegin`, zeros the padding and trims the buffers to the extent.
    fn finish(mut self) -> SealedBatch {
        let (begin, extent) = self.builder.seal();
        self.copy_in(0, &begin.encode());
        let used = self.builder.used_bytes();
        self.for_each_span(used, extent, |span, _| span.fill(0));
        let next_lsn = self.builder.next_lsn();
        self.into_sealed(begin, next_lsn, extent)
    }

    /// Another WAL's batch `image` (checked: `begin` and whole records up to its extent) in
    /// buffers of this WAL, ready to be placed and written like one of its own.
    fn from_image(
        begin: BatchBegin,
        image: &[u8],
        payload_bytes: u64,
        limits: BatchLimits,
        chunk_bytes: usize,
    ) -> SealedBatch {
        let mut batch = Self::new(begin.first_lsn, limits, chunk_bytes);
        batch.copy_in(0, image);
        batch.payload_bytes = payload_bytes;
        let next_lsn = begin.first_lsn + u64::from(begin.record_count);
        batch.into_sealed(begin, next_lsn, image.len())
    }

    fn into_sealed(mut self, begin: BatchBegin, next_lsn: u64, extent: usize) -> SealedBatch {
        let full_chunks = extent / self.chunk_bytes;
        let remainder = extent % self.chunk_bytes;
        self.chunks.truncate(full_chunks + usize::from(remainder > 0));
        if remainder > 0
            && let Some(last) = self.chunks.last_mut()
        {
            last.trim_to_size(remainder);
        }
        SealedBatch {
            begin,
            first_lsn: begin.first_lsn,
            next_lsn,
            extent: extent as u64,
            chunks: self.chunks,
            chunk_bytes: self.chunk_bytes,
            latch: self.latch,
            payload_bytes: self.payload_bytes,
        }
    }
}

struct SealedBatch {
    begin: BatchBegin,
    first_lsn: u64,
    next_lsn: u64,
    extent: u64,
    chunks: Vec<DmaBuffer>,
    chunk_bytes: usize,
    latch: Rc<Latch<BatchOutcome>>,
    payload_bytes: u64,
}

impl SealedBatch {
    /// Names the segment the batch goes to in its `BatchBegin`.
    fn place(&mut self, segment_seq: u64) {
        self.begin.segment_seq = segment_seq;
        let begin = self.begin.encode();
        if let Some(first) = self.chunks.first_mut() {
            first.as_bytes_mut()[..begin.len()].copy_from_slice(&begin);
        }
    }

    /// A copy of the batch's bytes (its extent), for the tail cache.
    fn image(&self) -> Bytes {
        let mut image = Vec::with_capacity(usize::try_from(self.extent).unwrap_or(0));
        for chunk in &self.chunks {
            image.extend_from_slice(chunk.as_bytes());
        }
        Bytes::from(image)
    }
}

/// The segment being appended to and the one prepared next.
struct Segments {
    active: Rc<DmaFile>,
    active_seq: u64,
    active_first_lsn: u64,
    /// Full segments still on disk, oldest first: (sequence, first LSN).
    sealed: VecDeque<(u64, u64)>,
    /// Released segments kept on disk to become spares again, oldest first (sequence).
    reusable: VecDeque<u64>,
    /// Set while released files are being deleted or one is being renamed for reuse: both
    /// take files from the front, and one at a time keeps the sequence on disk contiguous
    /// whichever of them a crash or an error interrupts.
    front_busy: Rc<Cell<bool>>,
    active_bytes: u64,
    /// End of the active segment's data; shared with the task zero-filling the spare, which
    /// keeps ahead of it.
    frontier: Rc<Cell<u64>>,
    spare: Option<Task<Result<Spare, WalError>>>,
}

/// The next segment's file, ready for its header: new and zero-filled, or a released segment
/// renamed (its old batches still in it).
struct Spare {
    file: DmaFile,
    reused: bool,
}

struct State {
    open: OpenBatch,
    /// Other WALs' batches waiting for the writer, in LSN order (`Wal::append_replicated`).
    replicated: VecDeque<SealedBatch>,
    fenced: Option<WalError>,
    closing: bool,
    /// A tail cut is running (`Wal::truncate_tail`): appends wait.
    cutting: bool,
    durable_next_lsn: u64,
    /// Every record below this is in a batch whose bytes are final (being written or durable).
    sealed_next_lsn: u64,
    /// The replica-set epoch the next batch of this WAL's own appends names.
    epoch: u64,
    stats: WalStats,
}

impl State {
    /// Whether the WAL takes appends: not fenced, not closing.
    fn usable(&self) -> Result<(), WalError> {
        if let Some(fenced) = &self.fenced {
            return Err(fenced.clone());
        }
        if self.closing {
            return Err(WalError::Closed);
        }
        Ok(())
    }
}

struct Inner {
    config: WalConfig,
    limits: BatchLimits,
    io_bytes_max: usize,
    state: RefCell<State>,
    segments: RefCell<Option<Segments>>,
    /// Wakes the writer: a record was reserved, or the WAL is closing.
    work: Notify,
    /// Wakes appenders waiting for room: a new batch opened, or the WAL fenced.
    space: Notify,
    /// Wakes readers waiting for durability.
    durable: Notify,
    writer_done: Cell<bool>,
    writer_exit: Notify,
    /// `(epoch, first LSN)` where the epoch the batches name changed, as recovery found them.
    epochs_at_open: Vec<(u64, u64)>,
    /// The batch being written, with a tail cache: a replica-set primary sends it to the
    /// other members while its own write and barrier run.
    sealing: RefCell<Option<TailBatch>>,
    metrics: WalMetrics,
}

/// The WAL's series on the process's metrics recorder, labelled by shard.
struct WalMetrics {
    batch_records: metrics::Histogram,
    batch_bytes: metrics::Histogram,
    fdatasync: metrics::Histogram,
    bytes_written: metrics::Counter,
    records: metrics::Counter,
    /// Records reserved and not yet durable: the appenders waiting on the writer.
    waiting: metrics::Gauge,
    fenced: metrics::Gauge,
    /// Rotations onto a released segment (no zero-fill).
    reused_segments: metrics::Counter,
    /// New segment files filled with zeros.
    zero_filled_segments: metrics::Counter,
    /// Bytes of segment files on disk: in use, kept for reuse, and the spare.
    disk_bytes: metrics::Gauge,
}

impl WalMetrics {
    fn new(shard_id: u32) -> Self {
        let shard = shard_id.to_string();
        Self {
            batch_records: metrics::histogram!("meridian_wal_batch_records", "shard" => shard.clone()),
            batch_bytes: metrics::histogram!("meridian_wal_batch_bytes", "shard" => shard.clone()),
            fdatasync: metrics::histogram!("meridian_wal_fdatasync_seconds", "shard" => shard.clone()),
            bytes_written: metrics::counter!("meridian_wal_written_bytes_total", "shard" => shard.clone()),
            records: metrics::counter!("meridian_wal_records_total", "shard" => shard.clone()),
            waiting: metrics::gauge!("meridian_wal_appends_waiting", "shard" => shard.clone()),
            fenced: metrics::gauge!("meridian_wal_fenced", "shard" => shard.clone()),
            reused_segments: metrics::counter!("meridian_wal_segments_reused_total", "shard" => shard.clone()),
            zero_filled_segments: metrics::counter!("meridian_wal_segments_zero_filled_total", "shard" => shard.clone()),
            disk_bytes: metrics::gauge!("meridian_wal_disk_bytes", "shard" => shard),
        }
    }
}

/// A shard's write-ahead log. Cheap to clone; all clones share one writer. Lives on one
/// glommio executor and must be used only from it.
#[derive(Clone)]
pub struct Wal {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.inner.config.dir)
            .field("shard_id", &self.inner.config.shard_id)
            .field("durable_next_lsn", &self.durable_next_lsn())
            .finish()
    }
}

fn glommio_error<T>(error: &GlommioError<T>) -> (Option<i32>, String) {
    (error.raw_os_error(), error.to_string())
}

fn fenced_by<T>(op: &'static str, error: &GlommioError<T>) -> WalError {
    let (errno, message) = glommio_error(error);
    WalError::fenced(op, errno, message)
}

fn segment_path(config: &WalConfig, segment_seq: u64) -> PathBuf {
    config.dir.join(segment_file_name(config.shard_id, segment_seq))
}

/// Writes all of `buffer` at `position`, continuing after aligned short writes. Unaligned or
/// empty short writes cannot be continued with O_DIRECT and are errors.
async fn write_fully(
    file: &DmaFile,
    mut buffer: Rc<DmaBuffer>,
    mut position: u64,
    faults: Option<&FaultInjector>,
) -> Result<(), WalError> {
    loop {
        let length = buffer.len();
        let written = match faults.and_then(FaultInjector::on_write) {
            Some(WriteFault::Errno(errno)) => {
                let error = std::io::Error::from_raw_os_error(errno);
                return Err(WalError::fenced("write", Some(errno), format!("{error} (injected)")));
            }
            // The kernel reported fewer bytes than asked, not a sector multiple.
            Some(WriteFault::Short { aligned: false }) => SECTOR_BYTES / 2,
            Some(WriteFault::Short { aligned: true }) if length > SECTOR_BYTES => {
                let part = length / 2 / SECTOR_BYTES * SECTOR_BYTES;
                let mut head = glommio::allocate_dma_buffer(part);
                head.as_bytes_mut().copy_from_slice(&buffer.as_bytes()[..part]);
                file.write_at(head, position).await.map_err(|error| fenced_by("write", &error))?
            }
            _ => file.write_rc_at(Rc::clone(&buffer), position).await.map_err(|error| fenced_by("write", &error))?,
        };
        if written == length {
            return Ok(());
        }
        if written == 0 || written % SECTOR_BYTES != 0 || written > length {
            return Err(WalError::fenced(
                "write",
                None,
                format!("short write of {written} of {length} bytes at offset {position} cannot be continued"),
            ));
        }
        let mut rest = glommio::allocate_dma_buffer(length - written);
        rest.as_bytes_mut().copy_from_slice(&buffer.as_bytes()[written..]);
        buffer = Rc::new(rest);
        position += written as u64;
    }
}

fn zeroed_buffer(bytes: usize) -> DmaBuffer {
    let mut buffer = glommio::allocate_dma_buffer(bytes);
    buffer.as_bytes_mut().fill(0);
    buffer
}

/// Writes zeros over `start..end` (sector aligned) in writes of at most `step` bytes.
async fn write_zeros(
    file: &DmaFile,
    start: u64,
    end: u64,
    step: usize,
    faults: Option<&FaultInjector>,
) -> Result<(), WalError> {
    let zeros = Rc::new(zeroed_buffer(step));
    let mut offset = start;
    while offset < end {
        let buffer = match usize::try_from(end - offset) {
            Ok(remaining) if remaining < step => Rc::new(zeroed_buffer(remaining)),
            _ => Rc::clone(&zeros),
        };
        let length = buffer.len() as u64;
        write_fully(file, buffer, offset, faults).await?;
        offset += length;
    }
    Ok(())
}

async fn fdatasync(file: &DmaFile, faults: Option<&FaultInjector>) -> Result<(), WalError> {
    if let Some(errno) = faults.and_then(FaultInjector::on_sync) {
        let error = std::io::Error::from_raw_os_error(errno);
        return Err(WalError::fenced("fdatasync", Some(errno), format!("{error} (injected)")));
    }
    file.fdatasync().await.map_err(|error| fenced_by("fdatasync", &error))
}

/// Zero-fills `0..bytes` of a spare segment without crowding the device: at
/// [`limits::WAL_ZERO_FILL_BYTES_PER_SEC`], and at once whatever keeps it twice as far along as
/// the active segment (`active_frontier`), so it is ready before the writer needs it.
async fn zero_fill_paced(file: &DmaFile, bytes: u64, step: usize, active_frontier: &Cell<u64>) -> Result<(), WalError> {
    let rate = limits::WAL_ZERO_FILL_BYTES_PER_SEC as f64;
    let started = std::time::Instant::now();
    let mut offset = 0;
    while offset < bytes {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let by_pace = (started.elapsed().as_secs_f64() * rate) as u64;
        let by_use = active_frontier.get().saturating_mul(2);
        if offset >= by_pace.max(by_use) {
            glommio::timer::sleep(std::time::Duration::from_secs_f64(step as f64 / rate)).await;
            continue;
        }
        let end = (offset + step as u64).min(bytes);
        write_zeros(file, offset, end, step, None).await?;
        offset = end;
    }
    Ok(())
}

/// Creates a segment file: preallocated, filled with zeros through O_DIRECT, synced, and its
/// directory entry synced, so later appends' `fdatasync` never write metadata. A spare made
/// while a segment is active (`active_frontier`) is filled paced.
async fn create_segment(
    config: WalConfig,
    segment_seq: u64,
    io_bytes_max: usize,
    active_frontier: Option<Rc<Cell<u64>>>,
) -> Result<DmaFile, WalError> {
    let path = segment_path(&config, segment_seq);
    let fail = |errno: Option<i32>, message: &dyn std::fmt::Display| {
        WalError::fenced("create segment", errno, format!("{}: {message}", path.display()))
    };
    let fail_glommio = |error: GlommioError<()>| fail(error.raw_os_error(), &error);
    if let Some(errno) = config.faults.as_deref().and_then(FaultInjector::on_create) {
        return Err(fail(Some(errno), &format!("{} (injected)", std::io::Error::from_raw_os_error(errno))));
    }
    let stale = path.clone();
    match glommio::executor().spawn_blocking(move || std::fs::remove_file(stale)).await {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(fail(error.raw_os_error(), &error)),
    }
    let file =
        OpenOptions::new().read(true).write(true).create_new(true).dma_open(&path).await.map_err(fail_glommio)?;
    let result: Result<(), WalError> = async {
        file.pre_allocate(config.segment_bytes, false).await.map_err(fail_glommio)?;
        // Failpoints count data writes only: zero-filling runs in the background and must not
        // shift which write a test's fault hits.
        let step = io_bytes_max.min(limits::WAL_ZERO_FILL_IO_BYTES);
        let filled = match &active_frontier {
            Some(active) => zero_fill_paced(&file, config.segment_bytes, step, active).await,
            None => write_zeros(&file, 0, config.segment_bytes, step, None).await,
        };
        filled.map_err(|error| match error {
            WalError::Fenced { errno, message, .. } => fail(errno, &message),
            other => other,
        })?;
        file.fdatasync().await.map_err(fail_glommio)?;
        sync_path_off_executor(config.dir.clone()).await.map_err(|error| fail(error.raw_os_error(), &error))
    }
    .await;
    if let Err(error) = result {
        let _ = file.close().await;
        let _ = std::fs::remove_file(&path);
        return Err(error);
    }
    Ok(file)
}

/// Renames released segment `old_seq` to `segment_seq` and syncs the directory: a file whose
/// every byte was written before, so appends' `fdatasync` write no metadata, without the
/// zero-fill. A file of another size (the segment size changed) is deleted and a new one made.
async fn reuse_segment(
    config: WalConfig,
    old_seq: u64,
    segment_seq: u64,
    io_bytes_max: usize,
    active_frontier: Rc<Cell<u64>>,
    front_busy: Rc<Cell<bool>>,
) -> Result<Spare, WalError> {
    // `front_busy` was set when this file left the pool; the rename ends it.
    let renamed = rename_for_reuse(&config, old_seq, segment_seq).await;
    front_busy.set(false);
    if !renamed? {
        let file = create_segment(config, segment_seq, io_bytes_max, Some(active_frontier)).await?;
        return Ok(Spare { file, reused: false });
    }
    let to = segment_path(&config, segment_seq);
    let file = OpenOptions::new().read(true).write(true).dma_open(&to).await.map_err(|error| {
        WalError::fenced("reuse segment", error.raw_os_error(), format!("{}: {error}", to.display()))
    })?;
    Ok(Spare { file, reused: true })
}

/// Renames released segment `old_seq` to `segment_seq` and syncs the directory; `false` (the
/// file deleted instead) when it is not the configured size.
async fn rename_for_reuse(config: &WalConfig, old_seq: u64, segment_seq: u64) -> Result<bool, WalError> {
    let (from, to) = (segment_path(config, old_seq), segment_path(config, segment_seq));
    let fail = |errno: Option<i32>, message: &dyn std::fmt::Display| {
        WalError::fenced("reuse segment", errno, format!("{} as {}: {message}", from.display(), to.display()))
    };
    if let Some(errno) = config.faults.as_deref().and_then(FaultInjector::on_create) {
        return Err(fail(Some(errno), &format!("{} (injected)", std::io::Error::from_raw_os_error(errno))));
    }
    let (source, target, dir, segment_bytes) = (from.clone(), to.clone(), config.dir.clone(), config.segment_bytes);
    let renamed = glommio::executor()
        .spawn_blocking(move || -> std::io::Result<bool> {
            if std::fs::metadata(&source)?.len() != segment_bytes {
                std::fs::remove_file(&source)?;
                return Ok(false);
            }
            std::fs::rename(&source, &target)?;
            sync_path(&dir)?;
            Ok(true)
        })
        .await
        .map_err(|error| fail(error.raw_os_error(), &error))?;
    Ok(renamed)
}

/// Segment files of `shard_id` in `dir`, sorted by sequence.
pub(crate) fn list_segments(dir: &Path, shard_id: u32) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let entries = std::fs::read_dir(dir).map_err(|error| WalError::io("list", dir.display(), &error))?;
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| WalError::io("list", dir.display(), &error))?;
        let name = entry.file_name();
        if let Some((shard, segment_seq)) = name.to_str().and_then(parse_segment_file_name)
            && shard == shard_id
        {
            segments.push((segment_seq, entry.path()));
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

/// Maps a file read-only; an empty file maps to nothing.
pub(crate) fn map_file(path: &Path) -> Result<Option<memmap2::Mmap>, WalError> {
    let file = std::fs::File::open(path).map_err(|error| WalError::io("open", path.display(), &error))?;
    let length = file.metadata().map_err(|error| WalError::io("stat", path.display(), &error))?.len();
    if length == 0 {
        return Ok(None);
    }
    // SAFETY: WAL segments are only written by this process's writer and are never truncated:
    // a released segment is freed by punching holes (zeros, not SIGBUS) and unlinking it, or
    // renamed and overwritten for reuse. So bytes read from this map may change under a reader
    // that outlived the release: readers copy a record before checking it (`WalCursor`), and
    // recovery copies what it applies (`store::op::Op::detached`).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|error| WalError::io("mmap", path.display(), &error))?;
    Ok(Some(map))
}

/// Runs recovery over the segments on disk without changing them.
pub fn scan(config: &WalConfig) -> Result<recovery::RecoveryPlan, WalError> {
    let files = list_segments(&config.dir, config.shard_id)?;
    let maps = files
        .iter()
        .map(|(segment_seq, path)| Ok((*segment_seq, map_file(path)?)))
        .collect::<Result<Vec<_>, WalError>>()?;
    let segments: Vec<SegmentBytes<'_>> = maps
        .iter()
        .map(|(segment_seq, map)| SegmentBytes { segment_seq: *segment_seq, bytes: map.as_deref().unwrap_or(&[]) })
        .collect();
    Ok(recovery::plan(config.shard_id, &segments, config.recovery_mode, config.record_payload_bytes_max)?)
}

/// Overwrites a torn tail with zeros and syncs it, before the WAL takes writes.
async fn erase_torn_tail(config: &WalConfig, torn: recovery::TornTail, io_bytes_max: usize) -> Result<(), WalError> {
    let faults = config.faults.as_deref();
    let path = segment_path(config, torn.segment_seq);
    let file = OpenOptions::new().read(true).write(true).dma_open(&path).await.map_err(|error| {
        let (errno, message) = glommio_error(&error);
        WalError::Io { op: "open for tail repair", path: path.display().to_string(), errno, message }
    })?;
    write_zeros(&file, torn.offset, torn.offset + torn.zero_bytes, io_bytes_max, faults).await?;
    fdatasync(&file, faults).await?;
    let _ = file.close().await;
    Ok(())
}

/// Cuts the log of a closed WAL from `lsn` on (a replica-set backup dropping a divergent,
/// never-acknowledged tail before it follows a new primary), and returns the LSN the log now
/// ends at. `lsn` must start a batch (or be the end: nothing to do). Segment files after the
/// one holding `lsn` are deleted, newest first (the directory synced after each), then a
/// `SegmentSeal` is written where the batch at `lsn` starts and synced; the next `Wal::open`
/// starts a new segment after it. A crash at any point leaves a prefix of the old log that
/// still ends at or after `lsn` (cut again, as the caller's comparison with its primary will
/// ask); the stale batches after a seal are never read. Blocking; the WAL must not be open.
pub fn truncate_from(config: &WalConfig, lsn: u64) -> Result<u64, WalError> {
    use std::os::unix::fs::FileExt as _;
    let plan = scan(config)?;
    if lsn >= plan.next_lsn {
        return Ok(plan.next_lsn);
    }
    let refuse = |reason: String| WalError::Truncate { lsn, reason };
    let Some(index) = plan.segments.iter().rposition(|segment| segment.first_lsn <= lsn) else {
        let first = plan.segments.first().map_or(plan.next_lsn, |segment| segment.first_lsn);
        return Err(refuse(format!("the oldest LSN kept is {first}")));
    };
    let segment = plan.segments[index];
    let path = segment_path(config, segment.segment_seq);
    let offset = {
        let map = map_file(&path)?.ok_or_else(|| refuse(format!("{} is empty", path.display())))?;
        let (mut at, mut offset) = (segment.first_lsn, SECTOR_BYTES);
        while at < lsn {
            let (begin, extent, _) =
                recovery::scan_batch(&map, offset, at, Some(segment.segment_seq), config.record_payload_bytes_max)
                    .map_err(|(offset, damage)| refuse(format!("{} at {offset}: {damage}", path.display())))?;
            at += u64::from(begin.record_count);
            offset += extent;
        }
        if at != lsn {
            return Err(refuse(format!("not the first LSN of a batch (the batch holding it ends at {at})")));
        }
        offset
    };
    for (later, later_path) in list_segments(&config.dir, config.shard_id)?.into_iter().rev() {
        if later <= segment.segment_seq {
            break;
        }
        std::fs::remove_file(&later_path).map_err(|error| WalError::io("remove", later_path.display(), &error))?;
        sync_path(&config.dir).map_err(|error| WalError::io("sync", config.dir.display(), &error))?;
    }
    let seal = SegmentSeal { segment_seq: segment.segment_seq, next_lsn: lsn }.encode_sector();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|error| WalError::io("open for a seal", path.display(), &error))?;
    file.write_all_at(&seal, offset as u64).map_err(|error| WalError::io("write a seal", path.display(), &error))?;
    file.sync_data().map_err(|error| WalError::io("sync a seal", path.display(), &error))?;
    Ok(lsn)
}

/// The segments of a WAL as `plan` found them on disk: the last one active, or (none yet, or
/// the last sealed by a cut tail) a new one created after it.
async fn open_segments(
    config: &WalConfig,
    plan: &recovery::RecoveryPlan,
    io_bytes_max: usize,
) -> Result<Segments, WalError> {
    let faults = config.faults.clone();
    let next_seq = plan.last_segment_seq().map_or(1, |segment_seq| segment_seq + 1);
    let segments = match plan.segments.last() {
        Some(last) if !last.sealed => {
            let path = segment_path(config, last.segment_seq);
            let file = OpenOptions::new().read(true).write(true).dma_open(&path).await.map_err(|error| {
                let (errno, message) = glommio_error(&error);
                WalError::Io { op: "open active segment", path: path.display().to_string(), errno, message }
            })?;
            Segments {
                active: Rc::new(file),
                active_seq: last.segment_seq,
                active_first_lsn: last.first_lsn,
                sealed: plan.segments[..plan.segments.len() - 1]
                    .iter()
                    .map(|segment| (segment.segment_seq, segment.first_lsn))
                    .collect(),
                reusable: VecDeque::new(),
                front_busy: Rc::new(Cell::new(false)),
                active_bytes: last.segment_bytes,
                frontier: Rc::new(Cell::new(last.frontier)),
                spare: None,
            }
        }
        // No segment yet, or the last one was sealed by a cut tail: a new one.
        _ => {
            let file = create_segment(config.clone(), next_seq, io_bytes_max, None).await?;
            write_segment_header(&file, config, next_seq, plan.next_lsn, false).await?;
            fdatasync(&file, faults.as_deref()).await?;
            Segments {
                active: Rc::new(file),
                active_seq: next_seq,
                active_first_lsn: plan.next_lsn,
                sealed: plan.segments.iter().map(|segment| (segment.segment_seq, segment.first_lsn)).collect(),
                reusable: VecDeque::new(),
                front_busy: Rc::new(Cell::new(false)),
                active_bytes: config.segment_bytes,
                frontier: Rc::new(Cell::new(SECTOR_BYTES as u64)),
                spare: None,
            }
        }
    };
    Ok(segments)
}

impl Wal {
    /// Opens (recovering) or creates the WAL described by `config`, on the current glommio
    /// executor. Torn tails are erased (zeroed and synced) before the first append.
    pub async fn open(config: WalConfig) -> Result<Self, WalError> {
        config.validate()?;
        std::fs::create_dir_all(&config.dir)
            .map_err(|error| WalError::io("create directory", config.dir.display(), &error))?;
        let io_bytes_max = config.io_bytes_max.unwrap_or_else(|| device_io_bytes_max(&config.dir));
        calibrate_iopoll(&config.dir).await;
        let plan = scan(&config)?;
        if let Some(tail) = &config.tail {
            tail.clear();
        }

        for segment_seq in &plan.unused {
            let path = segment_path(&config, *segment_seq);
            std::fs::remove_file(&path)
                .map_err(|error| WalError::io("remove unused segment", path.display(), &error))?;
        }
        if let Some(torn) = plan.torn_tail {
            erase_torn_tail(&config, torn, io_bytes_max).await?;
        }

        let segments = open_segments(&config, &plan, io_bytes_max).await?;
        let limits = BatchLimits { bytes_max: config.batch_bytes_max, records_max: config.batch_records_max };
        let chunk_bytes = io_bytes_max.min(config.batch_bytes_max);
        let metrics = WalMetrics::new(config.shard_id);
        if plan.segments.is_empty() {
            metrics.zero_filled_segments.increment(1);
        }
        let inner = Rc::new(Inner {
            state: RefCell::new(State {
                open: OpenBatch::new(plan.next_lsn, limits, chunk_bytes),
                replicated: VecDeque::new(),
                fenced: None,
                closing: false,
                cutting: false,
                durable_next_lsn: plan.next_lsn,
                sealed_next_lsn: plan.next_lsn,
                epoch: plan.epochs.last().map_or(0, |(epoch, _)| *epoch),
                stats: WalStats::default(),
            }),
            segments: RefCell::new(Some(segments)),
            limits,
            io_bytes_max,
            config,
            work: Notify::default(),
            space: Notify::default(),
            durable: Notify::default(),
            writer_done: Cell::new(false),
            writer_exit: Notify::default(),
            epochs_at_open: plan.epochs.clone(),
            sealing: RefCell::new(None),
            metrics,
        });
        inner.metrics.fenced.set(0.0);
        inner.prepare_spare();
        inner.publish_disk_bytes();
        glommio::spawn_local(writer_loop(Rc::clone(&inner))).detach();
        Ok(Self { inner })
    }

    /// Appends a record and resolves once it is durable (its batch was written and the
    /// `fdatasync` after it completed). Returns the record's LSN.
    pub async fn append(&self, glt: u64, payload: &[u8]) -> Result<u64, WalError> {
        self.append_stamped(payload, |_| glt).await
    }

    /// Like [`Wal::append`], but the record's GLT comes from `stamp(lsn)`, called once, without
    /// awaiting, at the moment the record takes its place in the log. A caller that draws
    /// timestamps from a monotonic clock inside `stamp` gets LSN order equal to GLT order.
    pub async fn append_stamped(&self, payload: &[u8], mut stamp: impl FnMut(u64) -> u64) -> Result<u64, WalError> {
        self.append_admitted(payload, |lsn| Some(stamp(lsn))).await
    }

    /// Like [`Wal::append_stamped`], but `admit(lsn)` may refuse the record (`None`:
    /// [`WalError::NotAdmitted`], nothing reserved). It is called, without awaiting, when the
    /// open batch has room for the record, so what it checks still holds when the record takes
    /// `lsn` (a replica-set primary appends to its protocol core there).
    pub async fn append_admitted(
        &self,
        payload: &[u8],
        mut admit: impl FnMut(u64) -> Option<u64>,
    ) -> Result<u64, WalError> {
        let max = self.inner.config.record_payload_bytes_max as usize;
        if payload.len() > max {
            return Err(WalError::RecordTooLarge { len: payload.len(), max });
        }
        loop {
            match self.try_reserve(&mut admit, payload, max)? {
                Some((latch, lsn)) => {
                    self.inner.work.notify_all();
                    return latch.wait().await.map(|()| lsn);
                }
                // The open batch is full: wait until the writer opens the next one.
                None => self.inner.space.wait().await,
            }
        }
    }

    /// Reserves a slot in the open batch and copies the record into it; `None` when the batch
    /// is full. Never awaits, so the state borrow cannot outlive it.
    fn try_reserve(
        &self,
        admit: &mut impl FnMut(u64) -> Option<u64>,
        payload: &[u8],
        max: usize,
    ) -> Result<Option<Reserved>, WalError> {
        let mut state = self.inner.state.borrow_mut();
        state.usable()?;
        if state.cutting {
            return Ok(None);
        }
        // A batch names one epoch: records of a newer one wait for the next batch.
        if state.open.builder.epoch() != state.epoch {
            if state.open.builder.record_count() > 0 {
                return Ok(None);
            }
            let epoch = state.epoch;
            state.open.builder.set_epoch(epoch);
        }
        let mut probe = state.open.builder.clone();
        match probe.reserve(payload.len()) {
            Ok(slot) => {
                let Some(glt) = admit(slot.lsn) else { return Err(WalError::NotAdmitted) };
                state.open.builder = probe;
                match state.open.put_record(slot.offset, glt, slot.lsn, payload) {
                    Ok(()) => Ok(Some((Rc::clone(&state.open.latch), slot.lsn))),
                    Err(error) => {
                        // The slot is reserved but empty: the batch must never be written.
                        drop(state);
                        let error = WalError::fenced("encode", None, error.to_string());
                        self.inner.fence(&error);
                        Err(error)
                    }
                }
            }
            Err(Reserve::BatchFull) => Ok(None),
            Err(Reserve::TooLarge) => Err(WalError::RecordTooLarge { len: payload.len(), max }),
        }
    }

    /// Appends a batch another WAL wrote (its image as `TailBatch` holds it: `BatchBegin`,
    /// records, padding), as one batch at the same LSNs, and resolves once it is durable with
    /// the LSN after it. A replica-set backup keeps its primary's log this way, batch for
    /// batch. The image is checked whole (every record's checksum, contiguous LSNs, the
    /// extent) and must begin at this WAL's next LSN; a WAL takes either its own appends or
    /// another's batches, never both at once. A refused batch changes nothing; a failed write
    /// or barrier fences the WAL as for its own batches.
    pub async fn append_replicated(&self, image: &[u8]) -> Result<u64, WalError> {
        let (latch, next_lsn) = {
            let mut state = self.inner.state.borrow_mut();
            state.usable()?;
            if state.cutting {
                return Err(WalError::ReplicatedBatch {
                    expected_lsn: state.open.builder.next_lsn(),
                    reason: "a tail cut is running".into(),
                });
            }
            let expected = state.open.builder.next_lsn();
            let refuse = |reason: String| WalError::ReplicatedBatch { expected_lsn: expected, reason };
            if state.open.builder.record_count() > 0 {
                return Err(refuse("this WAL has its own appends waiting".into()));
            }
            let payload_max = self.inner.config.record_payload_bytes_max;
            let (begin, extent, payload_bytes) = recovery::scan_batch(image, 0, expected, None, payload_max)
                .map_err(|(offset, damage)| refuse(format!("at byte {offset}: {damage}")))?;
            if extent != image.len() || extent > self.inner.limits.bytes_max {
                return Err(refuse(format!(
                    "extent {extent} of an image of {} bytes (batches are at most {})",
                    image.len(),
                    self.inner.limits.bytes_max
                )));
            }
            let chunk_bytes = state.open.chunk_bytes;
            let batch = OpenBatch::from_image(begin, image, payload_bytes, self.inner.limits, chunk_bytes);
            let (latch, next_lsn) = (Rc::clone(&batch.latch), batch.next_lsn);
            state.replicated.push_back(batch);
            state.open = OpenBatch::new(next_lsn, self.inner.limits, chunk_bytes);
            (latch, next_lsn)
        };
        self.inner.work.notify_all();
        latch.wait().await.map(|()| next_lsn)
    }

    /// The replica-set epoch the batches of this WAL's own appends name from now on. Records
    /// already in the open batch keep theirs: later ones wait for the next batch.
    pub fn set_epoch(&self, epoch: u64) {
        self.inner.state.borrow_mut().epoch = epoch;
    }

    /// `(epoch, first LSN)` wherever the epoch the batches name changed, from the first batch
    /// kept at open (a replica-set member's log shape, read back at restart).
    pub fn epochs_at_open(&self) -> &[(u64, u64)] {
        &self.inner.epochs_at_open
    }

    /// Cuts this open WAL's log from `from` on (a replica-set backup dropping a divergent,
    /// never-acknowledged tail) and returns the LSN it now ends at: once every queued batch is
    /// durable, the segments are closed, cut as [`truncate_from`] does, and a new segment starts
    /// at `from`. Appends wait meanwhile (replicated batches are refused). `from` must start a
    /// batch. The tail cache forgets every batch. A failure fences the WAL.
    pub async fn truncate_tail(&self, from: u64) -> Result<u64, WalError> {
        {
            let mut state = self.inner.state.borrow_mut();
            if let Some(fenced) = &state.fenced {
                return Err(fenced.clone());
            }
            if state.closing || state.cutting {
                return Err(WalError::Truncate { lsn: from, reason: "the WAL is closing or being cut".into() });
            }
            state.cutting = true;
        }
        let result = self.cut(from).await;
        self.inner.state.borrow_mut().cutting = false;
        self.inner.space.notify_all();
        result
    }

    async fn cut(&self, from: u64) -> Result<u64, WalError> {
        // Every queued batch durable, the writer idle.
        let durable = loop {
            let wait = {
                let state = self.inner.state.borrow();
                if let Some(fenced) = &state.fenced {
                    return Err(fenced.clone());
                }
                let next = state.open.builder.next_lsn();
                if state.open.builder.record_count() == 0
                    && state.replicated.is_empty()
                    && state.durable_next_lsn == next
                {
                    break next;
                }
                self.inner.durable.wait()
            };
            wait.await;
        };
        if from >= durable {
            return Ok(durable);
        }
        // Released files being deleted or renamed must not change under the cut's scan.
        while self.inner.segments.borrow().as_ref().is_some_and(|segments| segments.front_busy.get()) {
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        let old = self.inner.segments.borrow_mut().take().ok_or(WalError::Closed)?;
        if let Some(spare) = old.spare
            && let Ok(spare) = spare.await
        {
            let _ = spare.file.close().await;
        }
        if let Ok(file) = Rc::try_unwrap(old.active) {
            let _ = file.close().await;
        }
        let result = async {
            let config = self.inner.config.clone();
            // A refused cut (not at a batch start, below the oldest record) changed nothing:
            // the segments open again as they were.
            let (cut, plan) = glommio::executor()
                .spawn_blocking(move || {
                    let cut = truncate_from(&config, from);
                    scan(&config).map(|plan| (cut, plan))
                })
                .await?;
            let mut segments = open_segments(&self.inner.config, &plan, self.inner.io_bytes_max).await?;
            segments.sealed.retain(|(segment_seq, _)| !old.reusable.contains(segment_seq));
            segments.reusable = old.reusable;
            segments.front_busy = old.front_busy;
            Ok::<_, WalError>((segments, plan.next_lsn, cut))
        }
        .await;
        let (segments, next, cut) = match result {
            Ok(done) => done,
            Err(error) => {
                let error = match error {
                    WalError::Fenced { .. } => error,
                    other => WalError::fenced("cut", None, other.to_string()),
                };
                self.inner.fence(&error);
                return Err(error);
            }
        };
        *self.inner.segments.borrow_mut() = Some(segments);
        {
            let mut state = self.inner.state.borrow_mut();
            let chunk_bytes = state.open.chunk_bytes;
            state.open = OpenBatch::new(next, self.inner.limits, chunk_bytes);
            state.durable_next_lsn = next;
            state.sealed_next_lsn = next;
        }
        if let Some(tail) = &self.inner.config.tail {
            tail.clear();
        }
        self.inner.prepare_spare();
        self.inner.publish_disk_bytes();
        cut.map(|_| next)
    }

    /// Waits until the record `lsn` is in a batch whose bytes are final: being written (see
    /// [`Wal::sealing_batch`]) or durable. Without a tail cache, until it is durable.
    pub async fn wait_sealed(&self, lsn: u64) -> Result<(), WalError> {
        if self.inner.config.tail.is_none() {
            return self.wait_durable(lsn).await;
        }
        loop {
            let wait = {
                let state = self.inner.state.borrow();
                if state.sealed_next_lsn > lsn || state.durable_next_lsn > lsn {
                    return Ok(());
                }
                if let Some(fenced) = &state.fenced {
                    return Err(fenced.clone());
                }
                if self.inner.writer_done.get() {
                    return Err(WalError::Closed);
                }
                self.inner.durable.wait()
            };
            wait.await;
        }
    }

    /// The batch starting at `lsn` while it is being written (with a tail cache).
    pub fn sealing_batch(&self, lsn: u64) -> Option<TailBatch> {
        self.inner.sealing.borrow().as_ref().filter(|batch| batch.first_lsn == lsn).cloned()
    }

    /// Every record with an LSN below this is durable.
    pub fn durable_next_lsn(&self) -> u64 {
        self.inner.state.borrow().durable_next_lsn
    }

    /// Waits until the record `lsn` is durable (or the WAL is fenced or closed).
    pub async fn wait_durable(&self, lsn: u64) -> Result<(), WalError> {
        loop {
            let wait = {
                let state = self.inner.state.borrow();
                if state.durable_next_lsn > lsn {
                    return Ok(());
                }
                if let Some(fenced) = &state.fenced {
                    return Err(fenced.clone());
                }
                if state.closing && self.inner.writer_done.get() {
                    return Err(WalError::Closed);
                }
                self.inner.durable.wait()
            };
            wait.await;
        }
    }

    /// Releases full segments whose records all have LSNs below `lsn` (a flush covers them),
    /// oldest first. Up to `reuse_segments_max` of the newest released stay on disk to become
    /// spares again (renamed, not zero-filled); older ones are deleted and the directory
    /// synced. Returns how many were released. The unlinks and the sync run on glommio's
    /// blocking pool: unlinking four 64 MiB segments took 80 ms, which on the executor stalled
    /// every write of the shard.
    pub async fn release_before(&self, lsn: u64) -> Result<u64, WalError> {
        let (released, doomed, front_busy) = {
            let mut segments = self.inner.segments.borrow_mut();
            let Some(segments) = segments.as_mut() else { return Ok(0) };
            let mut released = 0;
            loop {
                let next_first_lsn = segments.sealed.get(1).map_or(segments.active_first_lsn, |next| next.1);
                match segments.sealed.front() {
                    Some(&(segment_seq, _)) if next_first_lsn <= lsn => {
                        segments.sealed.pop_front();
                        segments.reusable.push_back(segment_seq);
                        released += 1;
                    }
                    _ => break,
                }
            }
            // Files leave the front only (the oldest first), one operation at a time, so those
            // on disk stay contiguous; a rename in flight defers the deletions to the next call.
            let excess = segments.reusable.len().saturating_sub(self.inner.config.reuse_segments_max);
            let doomed: Vec<u64> =
                if segments.front_busy.get() { Vec::new() } else { segments.reusable.drain(..excess).collect() };
            if !doomed.is_empty() {
                segments.front_busy.set(true);
            }
            (released, doomed, Rc::clone(&segments.front_busy))
        };
        if doomed.is_empty() {
            self.inner.publish_disk_bytes();
            return Ok(released);
        }
        let paths: Vec<PathBuf> =
            doomed.iter().map(|segment_seq| segment_path(&self.inner.config, *segment_seq)).collect();
        let dir = self.inner.config.dir.clone();
        let (removed, result) = glommio::executor()
            .spawn_blocking(move || {
                for (removed, path) in paths.iter().enumerate() {
                    if let Err(error) = delete_gradually(path) {
                        return (removed, Err(WalError::io("remove released segment", path.display(), &error)));
                    }
                }
                (paths.len(), sync_path(&dir).map_err(|error| WalError::io("sync directory", dir.display(), &error)))
            })
            .await;
        front_busy.set(false);
        if removed < doomed.len()
            && let Some(segments) = self.inner.segments.borrow_mut().as_mut()
        {
            // The segments not removed are still on disk, older than every other: first in line.
            for segment_seq in doomed[removed..].iter().rev() {
                segments.reusable.push_front(*segment_seq);
            }
        }
        self.inner.publish_disk_bytes();
        result.map(|()| released)
    }

    /// The lowest LSN to keep so that the full segments below `lsn` take at most `bytes_max`
    /// bytes: the first LSN of the oldest of the newest such segments that fit, `lsn` when none
    /// fits, 0 when they all fit (no bound). A checkpoint at `lsn` releases below
    /// `min(lsn, max(hold, this))`: replication's hold keeps at most `bytes_max` of WAL for a
    /// peer that fell behind, which then catches up from a snapshot.
    pub fn keep_floor(&self, lsn: u64, bytes_max: u64) -> u64 {
        let segments = self.inner.segments.borrow();
        let Some(segments) = segments.as_ref() else { return 0 };
        let next_firsts = segments.sealed.iter().skip(1).map(|(_, first)| *first).chain([segments.active_first_lsn]);
        let below: Vec<u64> = segments
            .sealed
            .iter()
            .zip(next_firsts)
            .filter(|(_, next_first)| *next_first <= lsn)
            .map(|((_, first), _)| *first)
            .collect();
        let fit = usize::try_from(bytes_max / self.inner.config.segment_bytes.max(1)).unwrap_or(usize::MAX);
        if below.len() <= fit {
            0
        } else if fit == 0 {
            lsn
        } else {
            below[below.len() - fit]
        }
    }

    /// LSN of the oldest record still on disk.
    pub fn first_lsn(&self) -> u64 {
        self.inner
            .segments
            .borrow()
            .as_ref()
            .map_or(0, |segments| segments.sealed.front().map_or(segments.active_first_lsn, |oldest| oldest.1))
    }

    /// The error that fenced the WAL, if any.
    pub fn fenced(&self) -> Option<WalError> {
        self.inner.state.borrow().fenced.clone()
    }

    /// Counters since open.
    pub fn stats(&self) -> WalStats {
        self.inner.state.borrow().stats
    }

    /// The configuration in force.
    pub fn config(&self) -> &WalConfig {
        &self.inner.config
    }

    /// Largest single DMA write in use.
    pub fn io_bytes_max(&self) -> usize {
        self.inner.io_bytes_max
    }

    /// Stops taking appends, makes every accepted record durable, and closes the files.
    pub async fn close(self) -> Result<(), WalError> {
        self.inner.state.borrow_mut().closing = true;
        self.inner.work.notify_all();
        self.inner.space.notify_all();
        while !self.inner.writer_done.get() {
            let exit = self.inner.writer_exit.wait();
            if self.inner.writer_done.get() {
                break;
            }
            exit.await;
        }
        let segments = self.inner.segments.borrow_mut().take();
        if let Some(segments) = segments {
            if let Some(spare) = segments.spare {
                // The spare stays on disk as an unused segment; recovery removes it.
                if let Ok(spare) = spare.await {
                    let _ = spare.file.close().await;
                }
            }
            if let Ok(file) = Rc::try_unwrap(segments.active) {
                let _ = file.close().await;
            }
        }
        match self.fenced() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

async fn write_segment_header(
    file: &DmaFile,
    config: &WalConfig,
    segment_seq: u64,
    first_lsn: u64,
    reused: bool,
) -> Result<(), WalError> {
    let mut sector = zeroed_buffer(SECTOR_BYTES);
    let header = SegmentHeader {
        shard_id: config.shard_id,
        segment_seq,
        first_lsn,
        segment_bytes: config.segment_bytes,
        reused,
    };
    header.encode_into(sector.as_bytes_mut()).map_err(|error| WalError::fenced("write", None, error.to_string()))?;
    write_fully(file, Rc::new(sector), 0, config.faults.as_deref()).await
}

impl Inner {
    fn faults(&self) -> Option<&FaultInjector> {
        self.config.faults.as_deref()
    }

    /// Publishes the bytes of segment files on disk (sealed, active, kept for reuse, spare).
    fn publish_disk_bytes(&self) {
        if let Some(segments) = self.segments.borrow().as_ref() {
            let files = segments.sealed.len() + 1 + segments.reusable.len() + usize::from(segments.spare.is_some());
            #[allow(clippy::cast_precision_loss)]
            self.metrics.disk_bytes.set((files as u64 * self.config.segment_bytes) as f64);
        }
    }

    /// Starts preparing the next segment in the background: a released one renamed when one is
    /// kept, else a new one zero-filled.
    fn prepare_spare(&self) {
        let mut segments = self.segments.borrow_mut();
        if let Some(segments) = segments.as_mut()
            && segments.spare.is_none()
        {
            let config = self.config.clone();
            let next = segments.active_seq + 1;
            let io_bytes_max = self.io_bytes_max;
            let active = Rc::clone(&segments.frontier);
            let reuse = if segments.front_busy.get() { None } else { segments.reusable.pop_front() };
            let spare = match reuse {
                Some(old) => {
                    let busy = Rc::clone(&segments.front_busy);
                    busy.set(true);
                    glommio::spawn_local(reuse_segment(config, old, next, io_bytes_max, active, busy))
                }
                None => {
                    self.metrics.zero_filled_segments.increment(1);
                    glommio::spawn_local(async move {
                        let file = create_segment(config, next, io_bytes_max, Some(active)).await?;
                        Ok(Spare { file, reused: false })
                    })
                }
            };
            segments.spare = Some(spare);
        }
    }

    /// Makes the spare the active segment, starting at `first_lsn`.
    async fn rotate(&self, first_lsn: u64) -> Result<(), WalError> {
        let (spare, next_seq) = {
            let mut segments = self.segments.borrow_mut();
            let segments = segments.as_mut().ok_or(WalError::Closed)?;
            (segments.spare.take(), segments.active_seq + 1)
        };
        let Spare { file, reused } = match spare {
            Some(task) => task.await?,
            None => {
                self.metrics.zero_filled_segments.increment(1);
                Spare {
                    file: create_segment(self.config.clone(), next_seq, self.io_bytes_max, None).await?,
                    reused: false,
                }
            }
        };
        write_segment_header(&file, &self.config, next_seq, first_lsn, reused).await?;
        let old = {
            let mut segments = self.segments.borrow_mut();
            let segments = segments.as_mut().ok_or(WalError::Closed)?;
            let sealed = (segments.active_seq, segments.active_first_lsn);
            segments.sealed.push_back(sealed);
            segments.active_seq = next_seq;
            segments.active_first_lsn = first_lsn;
            segments.active_bytes = self.config.segment_bytes;
            segments.frontier.set(SECTOR_BYTES as u64);
            std::mem::replace(&mut segments.active, Rc::new(file))
        };
        {
            let stats = &mut self.state.borrow_mut().stats;
            stats.rotations += 1;
            stats.reused_segments += u64::from(reused);
        }
        if reused {
            self.metrics.reused_segments.increment(1);
        }
        // Every batch of the old segment is already durable; closing it needs no barrier.
        if let Ok(old) = Rc::try_unwrap(old) {
            glommio::spawn_local(async move {
                let _ = old.close().await;
            })
            .detach();
        }
        self.prepare_spare();
        self.publish_disk_bytes();
        Ok(())
    }

    /// Writes the batch to the active segment (rotating first when it does not fit) and syncs
    /// it. Returns a copy of its bytes when the WAL has a tail cache.
    async fn write_batch(&self, batch: &mut SealedBatch) -> Result<Option<Bytes>, WalError> {
        let needs_rotation = {
            let segments = self.segments.borrow();
            let segments = segments.as_ref().ok_or(WalError::Closed)?;
            segments.frontier.get() + batch.extent > segments.active_bytes
        };
        if needs_rotation {
            self.rotate(batch.first_lsn).await?;
        }
        let (file, position, segment_seq) = {
            let segments = self.segments.borrow();
            let segments = segments.as_ref().ok_or(WalError::Closed)?;
            (Rc::clone(&segments.active), segments.frontier.get(), segments.active_seq)
        };
        batch.place(segment_seq);
        // Copied before the write takes the buffers; cached only once durable, offered as the
        // batch being written meanwhile.
        let image = self.config.tail.as_ref().map(|_| batch.image());
        if let Some(bytes) = &image {
            let sealing = TailBatch { first_lsn: batch.first_lsn, next_lsn: batch.next_lsn, bytes: bytes.clone() };
            *self.sealing.borrow_mut() = Some(sealing);
            self.state.borrow_mut().sealed_next_lsn = batch.next_lsn;
            self.durable.notify_all();
        }
        let mut chunks = std::mem::take(&mut batch.chunks);
        if chunks.len() == 1
            && let Some(chunk) = chunks.pop()
        {
            write_fully(&file, Rc::new(chunk), position, self.faults()).await?;
        } else {
            // Each chunk is at most `max_sectors_kb`; issue them together, then wait for all.
            let tasks: Vec<Task<Result<(), WalError>>> = chunks
                .into_iter()
                .enumerate()
                .map(|(index, chunk)| {
                    let file = Rc::clone(&file);
                    let faults = self.config.faults.clone();
                    let at = position + (index * batch.chunk_bytes) as u64;
                    glommio::spawn_local(async move { write_fully(&file, Rc::new(chunk), at, faults.as_deref()).await })
                })
                .collect();
            let mut first_error = None;
            for task in tasks {
                if let Err(error) = task.await {
                    first_error.get_or_insert(error);
                }
            }
            if let Some(error) = first_error {
                return Err(error);
            }
        }
        let sync_started = std::time::Instant::now();
        fdatasync(&file, self.faults()).await?;
        self.metrics.fdatasync.record(sync_started.elapsed().as_secs_f64());
        if let Some(segments) = self.segments.borrow_mut().as_mut() {
            segments.frontier.set(position + batch.extent);
        }
        Ok(image)
    }

    fn fence(&self, error: &WalError) {
        self.metrics.fenced.set(1.0);
        let open_latch = {
            let mut state = self.state.borrow_mut();
            if state.fenced.is_none() {
                state.fenced = Some(error.clone());
            }
            Rc::clone(&state.open.latch)
        };
        open_latch.set(Err(error.clone()));
        // Queued batches of another WAL fail when the writer finishes (`finish_writer`).
        self.space.notify_all();
        self.durable.notify_all();
    }
}

async fn writer_loop(inner: Rc<Inner>) {
    loop {
        // Wait for work.
        loop {
            let wait = {
                let state = inner.state.borrow();
                if state.fenced.is_some() {
                    drop(state);
                    return finish_writer(&inner);
                }
                if state.open.builder.record_count() > 0 || !state.replicated.is_empty() {
                    break;
                }
                if state.closing {
                    drop(state);
                    return finish_writer(&inner);
                }
                inner.work.wait()
            };
            wait.await;
        }
        let replicated = inner.state.borrow_mut().replicated.pop_front();
        let mut batch = match replicated {
            Some(batch) => batch,
            None => {
                if !inner.config.batch_linger.is_zero() && !inner.state.borrow().closing {
                    glommio::timer::sleep(inner.config.batch_linger).await;
                }
                let open = {
                    let mut state = inner.state.borrow_mut();
                    let mut next = OpenBatch::new(state.open.builder.next_lsn(), inner.limits, state.open.chunk_bytes);
                    next.builder.set_epoch(state.epoch);
                    std::mem::replace(&mut state.open, next)
                };
                inner.space.notify_all();
                open.finish()
            }
        };
        inner.metrics.waiting.set((batch.next_lsn - batch.first_lsn) as f64);
        match inner.write_batch(&mut batch).await {
            Ok(image) => {
                let records = batch.next_lsn - batch.first_lsn;
                let queued = {
                    let mut state = inner.state.borrow_mut();
                    state.durable_next_lsn = batch.next_lsn;
                    let stats = &mut state.stats;
                    stats.batches += 1;
                    stats.records += records;
                    stats.payload_bytes += batch.payload_bytes;
                    stats.batch_bytes += batch.extent;
                    state.open.builder.record_count()
                };
                inner.metrics.waiting.set(f64::from(queued));
                inner.metrics.batch_records.record(records as f64);
                inner.metrics.batch_bytes.record(batch.extent as f64);
                inner.metrics.bytes_written.increment(batch.extent);
                if let Some(volume) = &inner.config.volume {
                    volume.fetch_add(batch.extent, std::sync::atomic::Ordering::Relaxed);
                }
                inner.metrics.records.increment(records);
                if let (Some(tail), Some(bytes)) = (&inner.config.tail, image) {
                    tail.push(TailBatch { first_lsn: batch.first_lsn, next_lsn: batch.next_lsn, bytes });
                }
                inner.sealing.borrow_mut().take();
                batch.latch.set(Ok(()));
                inner.durable.notify_all();
            }
            Err(error) => {
                inner.sealing.borrow_mut().take();
                inner.fence(&error);
                batch.latch.set(Err(error));
                return finish_writer(&inner);
            }
        }
    }
}

fn finish_writer(inner: &Inner) {
    inner.writer_done.set(true);
    let fenced = inner.state.borrow().fenced.clone();
    let error = fenced.unwrap_or(WalError::Closed);
    // Nobody will write the open batch now: its appenders must hear so.
    let (open_latch, replicated) = {
        let mut state = inner.state.borrow_mut();
        (Rc::clone(&state.open.latch), std::mem::take(&mut state.replicated))
    };
    for batch in replicated {
        batch.latch.set(Err(error.clone()));
    }
    open_latch.set(Err(error));
    inner.space.notify_all();
    inner.durable.notify_all();
    inner.writer_exit.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file deleted a step at a time is gone at the end, and a reader that still maps it
    /// reads zeros where it was freed, never past an end (no SIGBUS).
    #[test]
    fn a_gradually_deleted_file_is_gone_and_a_mapping_of_it_reads_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let len = usize::try_from(limits::DELETE_STEP_BYTES * 3 + 4096).unwrap();
        std::fs::write(&path, vec![0xA5u8; len]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the test owns the file; the mapping is read while the file is punched,
        // which is the case under test.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        delete_gradually(&path).unwrap();
        assert!(!path.exists());
        assert_eq!(map.len(), len, "the mapping keeps its length");
        assert!(map[..limits::DELETE_STEP_BYTES as usize].iter().all(|byte| *byte == 0), "freed steps read zeros");
        assert_eq!(map[len - 1], 0xA5, "the last partial step is freed by the unlink only");
    }
}
