//! The newest durable batches of a shard's WAL, kept in memory for the shipper.
//!
//! The writer appends with O_DIRECT, so what it wrote is not in the page cache: a shipper
//! that read the fresh tail through its `memmap2` map took a major fault, a synchronous read
//! of the device queued behind every region's writes and flushes, every few records (about
//! 700 a second at 10 000 writes/s of 1 KiB in `bench geo`). Those reads stalled the
//! replication thread, and every peer's stream with it. The writer now also hands each durable
//! batch's bytes (the same bytes it wrote: `BatchBegin`, records, padding) to this cache, and
//! a [`WalCursor`](super::WalCursor) given the cache reads a batch from memory when it holds
//! it, from the segment files otherwise (a peer far behind, a batch already evicted).
//!
//! Shared between the shard's executor (writer) and the replication thread (cursors): one
//! mutex, taken once per batch on either side.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;

/// One durable batch's bytes as written, from its `BatchBegin` to the end of its extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailBatch {
    /// LSN of its first record.
    pub first_lsn: u64,
    /// LSN after its last record.
    pub next_lsn: u64,
    /// The batch image.
    pub bytes: Bytes,
}

#[derive(Debug, Default)]
struct Batches {
    /// Contiguous in LSN, oldest first.
    queue: VecDeque<TailBatch>,
    bytes: usize,
}

/// The cache: at most `bytes_max` bytes of the newest contiguous batches.
#[derive(Debug)]
pub struct WalTail {
    bytes_max: usize,
    batches: Mutex<Batches>,
}

impl WalTail {
    /// An empty cache holding at most `bytes_max` bytes of batches.
    pub fn new(bytes_max: usize) -> Self {
        Self { bytes_max, batches: Mutex::new(Batches::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Batches> {
        self.batches.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds the batch that made `first_lsn..next_lsn` durable, evicting the oldest past the
    /// bound. A batch that does not follow the newest one (the WAL reopened) starts over.
    pub fn push(&self, batch: TailBatch) {
        if batch.bytes.len() > self.bytes_max || batch.next_lsn <= batch.first_lsn {
            self.clear();
            return;
        }
        let mut batches = self.lock();
        if batches.queue.back().is_some_and(|newest| newest.next_lsn != batch.first_lsn) {
            batches.queue.clear();
            batches.bytes = 0;
        }
        batches.bytes += batch.bytes.len();
        batches.queue.push_back(batch);
        while batches.bytes > self.bytes_max {
            let Some(oldest) = batches.queue.pop_front() else { break };
            batches.bytes -= oldest.bytes.len();
        }
    }

    /// The cached batch holding `lsn`, if any.
    pub fn batch_at(&self, lsn: u64) -> Option<TailBatch> {
        let batches = self.lock();
        let index = batches.queue.partition_point(|batch| batch.next_lsn <= lsn);
        batches.queue.get(index).filter(|batch| batch.first_lsn <= lsn).cloned()
    }

    /// Forgets every batch.
    pub fn clear(&self) {
        let mut batches = self.lock();
        batches.queue.clear();
        batches.bytes = 0;
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(first_lsn: u64, next_lsn: u64, bytes: usize) -> TailBatch {
        TailBatch { first_lsn, next_lsn, bytes: Bytes::from(vec![0u8; bytes]) }
    }

    #[test]
    fn finds_the_batch_holding_an_lsn_and_evicts_the_oldest_past_the_bound() {
        let tail = WalTail::new(3 * 512);
        for (first, next) in [(1, 4), (4, 9), (9, 10)] {
            tail.push(batch(first, next, 512));
        }
        assert_eq!(tail.batch_at(0), None);
        assert_eq!(tail.batch_at(1).map(|b| b.first_lsn), Some(1));
        assert_eq!(tail.batch_at(3).map(|b| b.first_lsn), Some(1));
        assert_eq!(tail.batch_at(4).map(|b| b.first_lsn), Some(4));
        assert_eq!(tail.batch_at(8).map(|b| b.first_lsn), Some(4));
        assert_eq!(tail.batch_at(9).map(|b| b.first_lsn), Some(9));
        assert_eq!(tail.batch_at(10), None);
        tail.push(batch(10, 12, 512));
        assert_eq!(tail.bytes(), 3 * 512);
        assert_eq!(tail.batch_at(1), None, "the oldest batch was evicted");
        assert_eq!(tail.batch_at(11).map(|b| b.first_lsn), Some(10));
    }

    #[test]
    fn a_batch_that_does_not_follow_starts_over_and_one_too_large_empties_it() {
        let tail = WalTail::new(4096);
        tail.push(batch(1, 5, 512));
        tail.push(batch(7, 9, 512));
        assert_eq!(tail.batch_at(1), None);
        assert_eq!(tail.batch_at(7).map(|b| b.next_lsn), Some(9));
        assert_eq!(tail.bytes(), 512);
        tail.push(batch(9, 10, 8192));
        assert_eq!(tail.batch_at(7), None);
        assert_eq!(tail.bytes(), 0);
    }
}
