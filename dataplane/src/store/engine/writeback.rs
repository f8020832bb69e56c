//! Write-behind for the engine's flushes and compactions, as RocksDB's `bytes_per_sync`.
//!
//! lsm-tree writes table and blob files through the page cache and syncs each once it is
//! complete, so a flush of a full memtable left 100+ MiB dirty for one burst of writeback at
//! its end, and every WAL fdatasync on the disk meanwhile waited behind it: in `bench cluster`
//! writes' p99 rose from 3.5 to 40-50 ms in the seconds of a flush. While a job runs, a
//! thread starts the writeback of each file's new bytes every few milliseconds, so little is
//! left dirty at any time and the WAL's barriers queue behind a few MiB, not the whole table.
//! lsm-tree's own sync at the end still makes the files durable; this only moves when the
//! bytes go out.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often the thread looks for new bytes.
const TICK: Duration = Duration::from_millis(5);

/// Writeback starts once a file has this many new bytes (smaller writes are left to the end).
const STEP_BYTES: u64 = 1 << 20;

/// Starts writeback of the files written under `dirs` until dropped.
pub struct WriteBehind {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WriteBehind {
    /// Watches the files in `dirs` (those there now are complete and left alone). Without a
    /// thread (none could start) the job runs as before, its files written back at its end.
    pub fn start(dirs: &[PathBuf]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut files = Files { dirs: dirs.to_vec(), written_back: HashMap::new() };
        files.skip_existing();
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("meridian-writeback".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    std::thread::park_timeout(TICK);
                    files.write_back_new_bytes();
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

struct Files {
    dirs: Vec<PathBuf>,
    /// Per file: an open handle (none for a file that was complete at the start) and the
    /// bytes whose writeback has started.
    written_back: HashMap<PathBuf, (Option<File>, u64)>,
}

impl Files {
    fn skip_existing(&mut self) {
        for (path, len) in self.listing() {
            self.written_back.insert(path, (None, len));
        }
    }

    fn listing(&self) -> Vec<(PathBuf, u64)> {
        let mut found = Vec::new();
        for dir in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            for entry in entries.flatten() {
                if let Ok(metadata) = entry.metadata()
                    && metadata.is_file()
                {
                    found.push((entry.path(), metadata.len()));
                }
            }
        }
        found
    }

    fn write_back_new_bytes(&mut self) {
        for (path, len) in self.listing() {
            let (file, done) = self.written_back.entry(path.clone()).or_insert((None, 0));
            if len < *done + STEP_BYTES {
                continue;
            }
            if file.is_none() {
                *file = open(&path);
            }
            if let Some(file) = file {
                start_writeback(file, *done, len - *done);
            }
            *done = len;
        }
    }
}

fn open(path: &Path) -> Option<File> {
    File::open(path).ok()
}

/// Starts the writeback of `len` bytes at `offset` (not waiting for it). A failure is left to
/// lsm-tree's sync at the end, which reports it.
fn start_writeback(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: a valid open descriptor; the call reads no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_files_are_tracked_and_old_ones_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old"), vec![1u8; 3 << 20]).unwrap();
        let mut files = Files { dirs: vec![dir.path().to_owned()], written_back: HashMap::new() };
        files.skip_existing();
        std::fs::write(dir.path().join("new"), vec![2u8; 2 << 20]).unwrap();
        std::fs::write(dir.path().join("small"), vec![3u8; 1000]).unwrap();
        files.write_back_new_bytes();
        let state =
            |name: &str| files.written_back.get(&dir.path().join(name)).map(|(file, done)| (file.is_some(), *done));
        assert_eq!(state("old"), Some((false, 3 << 20)));
        assert_eq!(state("new"), Some((true, 2 << 20)));
        assert_eq!(state("small"), Some((false, 0)), "under a step: left to the final sync");
        let guard = WriteBehind::start(&[dir.path().to_owned()]);
        drop(guard);
    }
}
