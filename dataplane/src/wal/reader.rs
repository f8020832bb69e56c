//! Iterates durable WAL records from a position, through read-only `memmap2` maps of the
//! segment files, or from the in-memory [`WalTail`] for the batches it still holds. Payloads
//! are `Bytes` slices of the map or of the cached batch: no copy.
//!
//! The caller bounds the iteration with the WAL's `durable_next_lsn` (a live WAL) or with a
//! recovery scan's `next_lsn` (offline): bytes below that bound are acknowledged and must be
//! valid, so damage there is an error, never an early end.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::WalError;
use super::format::{BATCH_BEGIN_BYTES, BatchBegin, SECTOR_BYTES, SegmentHeader, segment_file_name};
use super::recovery::{Damage, RecoveryError, scan_batch};
use super::tail::{TailBatch, WalTail};
use super::writer::{list_segments, map_file};

/// One durable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    /// Its log sequence number.
    pub lsn: u64,
    /// Its global logical timestamp.
    pub glt: u64,
    /// Its payload, a slice of the mapped segment.
    pub payload: Bytes,
}

/// Opens cursors over one shard's WAL directory.
#[derive(Debug, Clone)]
pub struct WalReader {
    dir: PathBuf,
    shard_id: u32,
    payload_bytes_max: u32,
    tail: Option<Arc<WalTail>>,
}

impl WalReader {
    /// A reader of `shard_id`'s segments in `dir`; `payload_bytes_max` as configured.
    pub fn new(dir: impl Into<PathBuf>, shard_id: u32, payload_bytes_max: u32) -> Self {
        Self { dir: dir.into(), shard_id, payload_bytes_max, tail: None }
    }

    /// Reads the batches `tail` holds from memory, the rest from the segment files.
    #[must_use]
    pub fn with_tail(mut self, tail: Arc<WalTail>) -> Self {
        self.tail = Some(tail);
        self
    }

    /// A cursor yielding records with `from <= lsn < until`.
    pub fn cursor(&self, from: u64, until: u64) -> WalCursor {
        WalCursor { reader: self.clone(), next_lsn: from, until, segment: None, tail_refused_below: 0 }
    }

    /// The first LSN of the oldest segment on disk (`None` when there is none, or no
    /// directory yet): records below it were released.
    pub fn first_lsn(&self) -> Result<Option<u64>, WalError> {
        if !self.dir.exists() {
            return Ok(None);
        }
        let probe = self.cursor(0, 0);
        for (segment_seq, _) in list_segments(&self.dir, self.shard_id)? {
            if let Ok(Some((header, _))) = probe.map_segment(segment_seq) {
                return Ok(Some(header.first_lsn));
            }
        }
        Ok(None)
    }

    /// The durable batch that starts at `lsn`, as written (its image, from its `BatchBegin` to
    /// its extent's end): from the tail cache, else read from its segment. `None` when no
    /// batch starts there. What a replica-set primary sends a member that is behind.
    pub fn batch_at(&self, lsn: u64) -> Result<Option<TailBatch>, WalError> {
        if let Some(batch) = self.tail.as_ref().and_then(|tail| tail.batch_at(lsn)) {
            return Ok((batch.first_lsn == lsn).then_some(batch));
        }
        let (segment_seq, header, bytes) = self.cursor(lsn, lsn + 1).find_segment()?;
        let (mut first, mut offset) = (header.first_lsn, SECTOR_BYTES);
        while first <= lsn && offset + BATCH_BEGIN_BYTES <= bytes.len() {
            let (begin, extent, _) = scan_batch(&bytes, offset, first, Some(segment_seq), self.payload_bytes_max)
                .map_err(|(offset, damage)| WalCursor::corruption(segment_seq, offset, damage))?;
            let next = first + u64::from(begin.record_count);
            if first == lsn {
                let image = Bytes::copy_from_slice(&bytes[offset..offset + extent]);
                return Ok(Some(TailBatch { first_lsn: first, next_lsn: next, bytes: image }));
            }
            (first, offset) = (next, offset + extent);
        }
        Ok(None)
    }

    /// All records with `from <= lsn < until`, collected.
    pub fn read_range(&self, from: u64, until: u64) -> Result<Vec<WalRecord>, WalError> {
        let mut cursor = self.cursor(from, until);
        let mut records = Vec::new();
        while let Some(record) = cursor.next_record()? {
            records.push(record);
        }
        Ok(records)
    }
}

struct OpenSegment {
    segment_seq: u64,
    /// A segment file's map, or (`cached`) one batch from the tail cache.
    bytes: Bytes,
    /// `Some(next LSN after the batch)` for a batch from the tail cache.
    cached: Option<u64>,
    /// Offset of the batch being read.
    batch_offset: usize,
    /// LSN of the first record of that batch.
    batch_first_lsn: u64,
    /// Records in that batch (0: not yet validated).
    batch_records: u32,
    /// Extent of that batch.
    batch_extent: usize,
    /// Index within the batch of the next record to yield, and its offset.
    record_index: u32,
    record_offset: usize,
}

/// Iterator state over a range of LSNs. Not `Send` across shards by design of its users, but
/// nothing here ties it to a thread.
pub struct WalCursor {
    reader: WalReader,
    next_lsn: u64,
    until: u64,
    segment: Option<OpenSegment>,
    /// A cached batch that did not scan is read from its segment instead: the cache is not
    /// asked again below the LSN after it.
    tail_refused_below: u64,
}

impl std::fmt::Debug for WalCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalCursor").field("next_lsn", &self.next_lsn).field("until", &self.until).finish()
    }
}

impl WalCursor {
    /// The LSN of the next record this cursor yields.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Raises the bound, e.g. after more records became durable.
    pub fn extend_until(&mut self, until: u64) {
        self.until = self.until.max(until);
    }

    fn corruption(segment_seq: u64, offset: usize, damage: Damage) -> WalError {
        WalError::Recovery(RecoveryError::Corruption { segment_seq, offset: offset as u64, damage })
    }

    fn no_segment(&self) -> WalError {
        WalError::Io {
            op: "read",
            path: self.reader.dir.display().to_string(),
            errno: None,
            message: format!("no segment holds LSN {}", self.next_lsn),
        }
    }

    /// Maps a segment whose header decodes; `None` if the file is missing or empty, or is a
    /// released file renamed for reuse whose own header is not written yet (it holds no
    /// records of its new place).
    fn map_segment(&self, segment_seq: u64) -> Result<Option<(SegmentHeader, Bytes)>, WalError> {
        let path = self.reader.dir.join(segment_file_name(self.reader.shard_id, segment_seq));
        if !path.exists() {
            return Ok(None);
        }
        let Some(map) = map_file(&path)? else { return Ok(None) };
        let header = SegmentHeader::decode(&map[..map.len().min(SECTOR_BYTES)])
            .map_err(|error| Self::corruption(segment_seq, 0, Damage::SegmentHeader(error.to_string())))?;
        if header.segment_seq != segment_seq {
            return Ok(None);
        }
        Ok(Some((header, Bytes::from_owner(map))))
    }

    /// Finds and maps the segment holding `self.next_lsn`: the last one starting at or before
    /// it. Only the first positioning searches; later segments follow by sequence number.
    fn find_segment(&self) -> Result<(u64, SegmentHeader, Bytes), WalError> {
        let mut chosen = None;
        for (segment_seq, _) in list_segments(&self.reader.dir, self.reader.shard_id)? {
            match self.map_segment(segment_seq) {
                Ok(Some((header, bytes))) if header.first_lsn <= self.next_lsn => {
                    chosen = Some((segment_seq, header, bytes));
                }
                Ok(Some(_)) => break,
                // Unused or torn-header segments hold no records.
                Ok(None) | Err(_) => {}
            }
        }
        chosen.ok_or_else(|| self.no_segment())
    }

    /// Maps the segment after `segment_seq`, which must start at `self.next_lsn`.
    fn next_segment(&self, segment_seq: u64, segment_bytes: usize) -> Result<(u64, SegmentHeader, Bytes), WalError> {
        let next = segment_seq + 1;
        let Some((header, bytes)) = self.map_segment(next)? else {
            return Err(self.no_segment());
        };
        if header.first_lsn != self.next_lsn {
            return Err(Self::corruption(
                segment_seq,
                segment_bytes,
                Damage::LsnGap { expected: self.next_lsn, found: header.first_lsn },
            ));
        }
        Ok((next, header, bytes))
    }

    /// The tail cache's batch holding `self.next_lsn`, if the reader has a cache, it holds that
    /// batch and it was not refused.
    fn cached_batch(&self) -> Option<TailBatch> {
        let tail = self.reader.tail.as_ref()?;
        if self.next_lsn < self.tail_refused_below {
            return None;
        }
        tail.batch_at(self.next_lsn)
    }

    fn open_cached(&mut self, batch: TailBatch) {
        self.segment = Some(OpenSegment {
            segment_seq: 0,
            bytes: batch.bytes,
            cached: Some(batch.next_lsn),
            batch_offset: 0,
            batch_first_lsn: batch.first_lsn,
            batch_records: 0,
            batch_extent: 0,
            record_index: 0,
            record_offset: 0,
        });
    }

    fn open_segment(&mut self, (segment_seq, header, bytes): (u64, SegmentHeader, Bytes)) {
        self.segment = Some(OpenSegment {
            segment_seq,
            bytes,
            cached: None,
            batch_offset: SECTOR_BYTES,
            batch_first_lsn: header.first_lsn,
            batch_records: 0,
            batch_extent: 0,
            record_index: 0,
            record_offset: 0,
        });
    }

    /// The next record, `None` once `until` is reached.
    pub fn next_record(&mut self) -> Result<Option<WalRecord>, WalError> {
        let payload_max = self.reader.payload_bytes_max;
        while self.next_lsn < self.until {
            // Between two batches (or with none open) the next one comes from memory when the
            // tail cache holds it; after the last cached one, the segment files hold the rest.
            let between = self.segment.as_ref().is_none_or(|segment| {
                segment.batch_records == 0 && !(segment.cached.is_some() && segment.batch_offset == 0)
            });
            if between {
                if let Some(batch) = self.cached_batch() {
                    self.open_cached(batch);
                } else if self.segment.as_ref().is_some_and(|segment| segment.cached.is_some()) {
                    self.segment = None;
                }
            }
            if self.segment.is_none() {
                let found = self.find_segment()?;
                self.open_segment(found);
            }
            let Some(segment) = self.segment.as_mut() else { continue };
            if segment.batch_records == 0 {
                // Validate the batch at `batch_offset` as a whole before yielding from it.
                let bytes = &segment.bytes[..];
                if segment.cached.is_none()
                    && (segment.batch_offset + BATCH_BEGIN_BYTES > bytes.len()
                        || !matches!(BatchBegin::decode(&bytes[segment.batch_offset..]),
                            Ok(Some(begin)) if begin.segment_seq == segment.segment_seq))
                {
                    // End of this segment's data (zeros, or a reused file's stale batches): the
                    // next segment continues the log. Damage here shows there as an LSN gap.
                    let (segment_seq, segment_bytes) = (segment.segment_seq, bytes.len());
                    let next = self.next_segment(segment_seq, segment_bytes)?;
                    self.open_segment(next);
                    continue;
                }
                let segment_seq = segment.cached.is_none().then_some(segment.segment_seq);
                let (begin, extent, _) = match scan_batch(
                    bytes,
                    segment.batch_offset,
                    segment.batch_first_lsn,
                    segment_seq,
                    payload_max,
                ) {
                    Ok(scanned) => scanned,
                    Err((offset, damage)) => {
                        if let Some(cached_until) = segment.cached {
                            // Not what the writer made durable: read it from its segment.
                            tracing::warn!(lsn = segment.batch_first_lsn, offset, %damage, "a cached WAL batch does not scan; reading it from disk");
                            self.tail_refused_below = cached_until;
                            self.segment = None;
                            continue;
                        }
                        return Err(Self::corruption(segment.segment_seq, offset, damage));
                    }
                };
                segment.batch_records = begin.record_count;
                segment.batch_extent = extent;
                segment.record_index = 0;
                segment.record_offset = segment.batch_offset + BATCH_BEGIN_BYTES;
                if begin.first_lsn + u64::from(begin.record_count) <= self.next_lsn {
                    // The whole batch is before the start: skip it.
                    segment.batch_first_lsn += u64::from(begin.record_count);
                    segment.batch_offset += extent;
                    segment.batch_records = 0;
                    continue;
                }
            }
            let record = segment.take_record(payload_max)?;
            if record.lsn < self.next_lsn {
                continue;
            }
            self.next_lsn = record.lsn + 1;
            return Ok(Some(record));
        }
        Ok(None)
    }
}

impl OpenSegment {
    /// Reads the record at `record_offset` of the open (validated) batch and moves past it.
    fn take_record(&mut self, payload_max: u32) -> Result<WalRecord, WalError> {
        let (segment_seq, offset) = (self.segment_seq, self.record_offset);
        let corrupt = |error| WalCursor::corruption(segment_seq, offset, Damage::Record(error));
        // From a segment file the record is copied first and the copy checked: a released
        // file reused under this reader changes its bytes, a checked copy cannot.
        let source = if self.cached.is_none() {
            let header = wire::decode_header(&self.bytes[offset..], payload_max).map_err(corrupt)?;
            let end = (offset + wire::encoded_len(header.payload_len as usize)).min(self.bytes.len());
            Bytes::copy_from_slice(&self.bytes[offset..end])
        } else {
            self.bytes.slice(offset..)
        };
        let (record, used) = wire::decode(&source, payload_max).map_err(corrupt)?;
        let lsn = record.seq;
        let expected = self.batch_first_lsn + u64::from(self.record_index);
        if lsn != expected {
            // The batch validated as a whole; its bytes changed since (a released segment
            // freed or reused under this reader).
            return Err(WalCursor::corruption(
                self.segment_seq,
                self.record_offset,
                Damage::LsnGap { expected, found: lsn },
            ));
        }
        let glt = record.glt;
        let payload = source.slice(wire::HEADER_BYTES..wire::HEADER_BYTES + record.payload.len());
        self.record_offset += used;
        self.record_index += 1;
        if self.record_index == self.batch_records {
            self.batch_first_lsn += u64::from(self.batch_records);
            self.batch_offset += self.batch_extent;
            self.batch_records = 0;
        }
        Ok(WalRecord { lsn, glt, payload })
    }
}

impl Iterator for WalCursor {
    type Item = Result<WalRecord, WalError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}
