//! Failpoints on every I/O call of the WAL shell ("every IO call has a failpoint", sled).
//! Tests arm them; production code carries a `None`.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

/// What an armed write failpoint does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    /// The write fails with this errno (e.g. `libc::EIO`, `libc::ENOSPC`).
    Errno(i32),
    /// The write transfers only part of the buffer. `aligned` short writes (a whole number of
    /// sectors) can be continued; unaligned ones cannot and must fence the WAL.
    Short {
        /// Whether the transferred length is a multiple of the sector.
        aligned: bool,
    },
}

/// Counters and armed faults for one WAL. Shared with the test through an `Arc`.
#[derive(Debug, Default)]
pub struct FaultInjector {
    write_ops: AtomicU64,
    sync_ops: AtomicU64,
    write_fault_at: AtomicU64,
    write_fault_errno: AtomicI32,
    write_fault_short: AtomicBool,
    write_fault_short_aligned: AtomicBool,
    sync_fault_at: AtomicU64,
    sync_fault_errno: AtomicI32,
    create_fault_errno: AtomicI32,
    store_fault_errno: [AtomicI32; 4],
}

/// Failpoints of the store shell above the WAL (one-shot: the next such call fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    /// Writing a chunk file.
    ChunkWrite = 0,
    /// Reading a chunk file.
    ChunkRead = 1,
    /// Writing a checkpoint.
    Checkpoint = 2,
    /// Syncing the chunk directory after new chunk files (the sync runs; its result is
    /// replaced by the error, as a failed fsync reports after the fact).
    ChunkDirSync = 3,
}

impl FaultInjector {
    /// The `n`-th data write from now (1 = the next one) fails as `fault` says.
    pub fn fail_write(&self, n: u64, fault: WriteFault) {
        match fault {
            WriteFault::Errno(errno) => {
                self.write_fault_errno.store(errno, Ordering::SeqCst);
                self.write_fault_short.store(false, Ordering::SeqCst);
            }
            WriteFault::Short { aligned } => {
                self.write_fault_short.store(true, Ordering::SeqCst);
                self.write_fault_short_aligned.store(aligned, Ordering::SeqCst);
            }
        }
        let target = self.write_ops.load(Ordering::SeqCst) + n.max(1);
        self.write_fault_at.store(target, Ordering::SeqCst);
    }

    /// The `n`-th fdatasync from now (1 = the next one) fails with `errno`.
    pub fn fail_sync(&self, n: u64, errno: i32) {
        self.sync_fault_errno.store(errno, Ordering::SeqCst);
        let target = self.sync_ops.load(Ordering::SeqCst) + n.max(1);
        self.sync_fault_at.store(target, Ordering::SeqCst);
    }

    /// Every segment creation from now fails with `errno` (0 disarms).
    pub fn fail_segment_create(&self, errno: i32) {
        self.create_fault_errno.store(errno, Ordering::SeqCst);
    }

    /// The next I/O at `point` fails with `errno`.
    pub fn fail_store(&self, point: StoreFault, errno: i32) {
        self.store_fault_errno[point as usize].store(errno, Ordering::SeqCst);
    }

    /// The armed errno of `point`, disarming it.
    pub fn on_store(&self, point: StoreFault) -> Option<i32> {
        Some(self.store_fault_errno[point as usize].swap(0, Ordering::SeqCst)).filter(|errno| *errno != 0)
    }

    /// Data writes issued so far.
    pub fn write_ops(&self) -> u64 {
        self.write_ops.load(Ordering::SeqCst)
    }

    /// fdatasyncs issued so far.
    pub fn sync_ops(&self) -> u64 {
        self.sync_ops.load(Ordering::SeqCst)
    }

    pub(crate) fn on_write(&self) -> Option<WriteFault> {
        let op = self.write_ops.fetch_add(1, Ordering::SeqCst) + 1;
        if op != self.write_fault_at.load(Ordering::SeqCst) {
            return None;
        }
        Some(if self.write_fault_short.load(Ordering::SeqCst) {
            WriteFault::Short { aligned: self.write_fault_short_aligned.load(Ordering::SeqCst) }
        } else {
            WriteFault::Errno(self.write_fault_errno.load(Ordering::SeqCst))
        })
    }

    pub(crate) fn on_sync(&self) -> Option<i32> {
        let op = self.sync_ops.fetch_add(1, Ordering::SeqCst) + 1;
        (op == self.sync_fault_at.load(Ordering::SeqCst)).then(|| self.sync_fault_errno.load(Ordering::SeqCst))
    }

    pub(crate) fn on_create(&self) -> Option<i32> {
        Some(self.create_fault_errno.load(Ordering::SeqCst)).filter(|errno| *errno != 0)
    }
}
