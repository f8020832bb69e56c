//! Helpers shared by the WAL integration tests. Every test runs on real files with O_DIRECT
//! and real fdatasync, on a glommio executor of its own.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::future::Future;
use std::path::Path;

use dataplane::wal::{RecoveryMode, WalConfig, WalReader, WalRecord};

pub mod process;

/// Appends `count` records of `length` bytes one after the other (ids `0..count`) to a new
/// or existing WAL and closes it.
pub fn fill(config: &WalConfig, count: u64, length: usize) {
    let config = config.clone();
    run(async move {
        let wal = dataplane::wal::Wal::open(config).await.unwrap();
        for id in 0..count {
            wal.append(id, &payload(id, length)).await.unwrap();
        }
        wal.close().await.unwrap();
    });
}

/// Runs `future` on a fresh glommio executor.
pub fn run<F: Future<Output = T> + 'static, T>(future: F) -> T {
    dataplane::runtime::run_local("test", future).unwrap()
}

/// Small limits so rotation, multi-chunk batches and full batches happen in tests.
pub fn small_config(dir: &Path) -> WalConfig {
    let mut config = WalConfig::new(dir, 0);
    config.segment_bytes = 256 << 10;
    config.batch_bytes_max = 32 << 10;
    config.record_payload_bytes_max = 16 << 10;
    config.io_bytes_max = Some(8 << 10);
    config
}

pub use dataplane::wal::torture::{check_payload, payload};

/// Every record recovery considers valid, read through the offline path (scan + reader).
pub fn read_all(config: &WalConfig) -> Vec<WalRecord> {
    let plan = dataplane::wal::writer::scan(config).unwrap();
    let first = plan.segments.first().map_or(1, |segment| segment.first_lsn);
    WalReader::new(&config.dir, config.shard_id, config.record_payload_bytes_max)
        .read_range(first, plan.next_lsn)
        .unwrap()
}

pub fn strict(mut config: WalConfig) -> WalConfig {
    config.recovery_mode = RecoveryMode::Strict;
    config
}

/// The only segment file of shard 0 with the highest sequence.
pub fn last_segment(dir: &Path) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    files.sort();
    files.pop().unwrap()
}
