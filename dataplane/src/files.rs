//! The file-system operations every shell of the data node shares (the WAL, the store, the
//! chunk server, replication positions, the node's own files): durable syncs by path, on or
//! off the executor, gradual deletion, the device's largest DMA write, and glommio's polled
//! ring probe. One place, so that each rule about the disk is written once.

use std::path::{Path, PathBuf};

use glommio::io::DmaFile;

use crate::wal::format::SECTOR_BYTES;

/// The largest single DMA write the device under `dir` accepts (`max_sectors_kb`).
pub fn device_io_bytes_max(dir: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let from_sysfs = || -> Option<usize> {
        let dev = std::fs::metadata(dir).ok()?.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let base = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let text = std::fs::read_to_string(base.join("queue/max_sectors_kb"))
            .or_else(|_| std::fs::read_to_string(base.join("../queue/max_sectors_kb")))
            .ok()?;
        text.trim().parse::<usize>().ok().map(|kib| kib * 1024)
    };
    let bytes = from_sysfs().unwrap_or(crate::limits::IO_BYTES_MAX_FALLBACK);
    (bytes / SECTOR_BYTES * SECTOR_BYTES).max(SECTOR_BYTES)
}

/// glommio decides once per device and thread whether O_DIRECT I/O goes to its polled ring,
/// by reading the first sector of the first DMA file opened there. On an empty file that read
/// "succeeds" even on devices without poll queues (virtio here), and every later DMA file then
/// lands on the polled ring: shards busy-poll and O_DIRECT reads fail with EOPNOTSUPP. Opening
/// a one-sector file first makes the probe meaningful.
pub async fn calibrate_iopoll(dir: &Path) {
    let path = dir.join(".iopoll-probe");
    if let Err(error) = std::fs::write(&path, [0u8; SECTOR_BYTES]) {
        tracing::warn!(path = %path.display(), %error, "cannot write the iopoll probe file: O_DIRECT reads may fail");
        return;
    }
    match DmaFile::open(&path).await {
        Ok(file) => {
            let _ = file.close().await;
        }
        Err(error) => tracing::warn!(path = %path.display(), %error, "cannot open the iopoll probe file"),
    }
    let _ = std::fs::remove_file(&path);
}

/// `fsync` of a file or directory by path (directories: makes new or removed entries durable).
pub fn sync_path(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` durably: a temporary file beside it written and synced, renamed
/// over it, the directory synced; a crash leaves the old content or the new, never a partial
/// file. Blocking (fsync): call it off the executors.
pub fn replace_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    sync_path(path.parent().unwrap_or_else(|| Path::new(".")))
}

/// [`sync_path`] on glommio's blocking pool. A directory `fsync` commits the file system's
/// journal: 0.4 to 1.2 ms here with a shard writing beside it. On the shard's thread it held
/// every request of the shard that long, at each new segment and at each put that stored new
/// chunks.
pub async fn sync_path_off_executor(dir: PathBuf) -> std::io::Result<()> {
    glommio::executor().spawn_blocking(move || sync_path(&dir)).await
}

/// Deletes a large file a step at a time: a hole of [`crate::limits::DELETE_STEP_BYTES`] punched,
/// synced, a pause, the next, then the file unlinked. Freeing hundreds of MB at once on a file
/// system mounted with online discard (as these machines' ext4 is) made one journal commit
/// discard it all, and every `fdatasync` of every WAL on the disk waited for it: the home's
/// write p99 in `bench geo` went from 15 to 45 ms. Holes, not truncation: a reader that still
/// maps the file (a WAL cursor, a snapshot being shipped) reads zeros, which fail their
/// checksums, instead of taking SIGBUS past a shortened end. Nothing may keep bytes of such a
/// map beyond a read: recovery copies what it applies (`store::op::Op::detached`). Blocking:
/// call it off the executors.
pub fn delete_gradually(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let len = file.metadata()?.len();
    let step = crate::limits::DELETE_STEP_BYTES;
    let mut offset = 0;
    while offset + step < len {
        let (at, bytes) = (libc::off_t::try_from(offset), libc::off_t::try_from(step));
        let (Ok(at), Ok(bytes)) = (at, bytes) else { break };
        // SAFETY: fallocate on a descriptor this function owns; punching a hole changes no
        // memory of this process.
        let punched = unsafe {
            libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, at, bytes)
        };
        if punched != 0 {
            break; // not supported here: the unlink below frees it all at once
        }
        file.sync_data()?;
        offset += step;
        std::thread::sleep(crate::limits::DELETE_STEP_PAUSE);
    }
    drop(file);
    std::fs::remove_file(path)
}
