//! A crash can tear the last batch at any byte. Recovery must drop exactly that batch (it was
//! never acknowledged), erase its bytes, and keep everything before it; strict mode must
//! refuse instead. Real files, real O_DIRECT writes.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_lossless)]

mod common;

use std::path::Path;

use common::{check_payload, payload, read_all, run, small_config, strict};
use dataplane::wal::format::SECTOR_BYTES;
use dataplane::wal::scan;
use dataplane::wal::{RecoveryError, Wal, WalConfig, WalError};

const BASE_RECORDS: u64 = 20;

/// Writes BASE_RECORDS records in several batches, then one last batch holding
/// `last_lengths`. Returns (segment file, offset of the last batch, used bytes of it).
fn prepare(dir: &Path, last_lengths: &[usize]) -> (std::path::PathBuf, u64, u64) {
    let config = small_config(dir);
    run({
        let config = config.clone();
        async move {
            let wal = Wal::open(config).await.unwrap();
            for id in 0..BASE_RECORDS {
                wal.append(id, &payload(id, 300)).await.unwrap();
            }
            wal.close().await.unwrap();
        }
    });
    let before = scan(&config).unwrap();
    let last_lengths = last_lengths.to_vec();
    run({
        let config = config.clone();
        async move {
            let wal = Wal::open(config).await.unwrap();
            let mut handles = Vec::new();
            for (index, length) in last_lengths.into_iter().enumerate() {
                let wal = wal.clone();
                let id = BASE_RECORDS + index as u64;
                handles.push(glommio::spawn_local(async move { wal.append(id, &payload(id, length)).await.unwrap() }));
            }
            for handle in handles {
                handle.await;
            }
            assert_eq!(wal.stats().batches, 1, "the last records form one batch");
            wal.close().await.unwrap();
        }
    });
    let segment = before.segments.last().unwrap();
    let path = dir.join(dataplane::wal::format::segment_file_name(0, segment.segment_seq));
    let after = scan(&config).unwrap();
    assert_eq!(after.segments.last().unwrap().segment_seq, segment.segment_seq);
    (path, segment.frontier, after.segments.last().unwrap().frontier - segment.frontier)
}

fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect()
}

fn restore(dir: &Path, files: &[(std::path::PathBuf, Vec<u8>)]) {
    for entry in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    for (path, bytes) in files {
        std::fs::write(path, bytes).unwrap();
    }
}

/// Recovers, appends one more record, recovers again strictly, and returns the ids read.
fn recover_append_verify(config: &WalConfig) -> Vec<u64> {
    let next = run({
        let config = config.clone();
        async move {
            let wal = Wal::open(config).await.unwrap();
            let next = wal.durable_next_lsn();
            wal.append(999, &payload(999, 100)).await.unwrap();
            wal.close().await.unwrap();
            next
        }
    });
    // After the repair nothing torn may remain: strict recovery must accept the log.
    let plan = scan(&strict(config.clone())).unwrap();
    assert_eq!(plan.next_lsn, next + 1);
    read_all(config).iter().map(|record| check_payload(&record.payload).unwrap()).collect()
}

fn tear(dir: &Path, last_lengths: &[usize], offsets: impl Fn(u64, u64) -> Vec<u64>, garbage: bool) {
    let (segment, batch_offset, used_extent) = prepare(dir, last_lengths);
    let pristine = snapshot(dir);
    let original = std::fs::read(&segment).unwrap();
    let last_ids: Vec<u64> = (0..last_lengths.len() as u64).map(|index| BASE_RECORDS + index).collect();
    let records_end = {
        // Bytes of the last batch that hold records (the rest is padding).
        let mut end = dataplane::wal::format::BATCH_BEGIN_BYTES as u64;
        for length in last_lengths {
            end += wire::encoded_len(*length) as u64;
        }
        end
    };
    assert!(records_end <= used_extent);
    let config = small_config(dir);
    for tear_at in offsets(records_end, used_extent) {
        restore(dir, &pristine);
        let mut bytes = original.clone();
        let start = (batch_offset + tear_at) as usize;
        let end = (batch_offset + used_extent) as usize;
        for (index, byte) in bytes[start..end].iter_mut().enumerate() {
            *byte = if garbage { (index as u8).wrapping_mul(31) ^ 0x5a } else { 0 };
        }
        std::fs::write(&segment, &bytes).unwrap();

        let torn = tear_at < records_end;
        // A batch none of whose bytes landed is a clean end of the log, not a tear.
        let never_written = tear_at == 0 && !garbage;
        let strict_result = scan(&strict(config.clone()));
        if torn && !never_written {
            assert!(
                matches!(strict_result, Err(WalError::Recovery(RecoveryError::TornTailStrict { .. }))),
                "tear at {tear_at}: strict recovery must refuse, got {strict_result:?}"
            );
        } else {
            strict_result.unwrap();
        }
        let ids = recover_append_verify(&config);
        let mut expected: Vec<u64> = (0..BASE_RECORDS).collect();
        if !torn {
            expected.extend(&last_ids);
        }
        expected.push(999);
        assert_eq!(ids, expected, "tear at byte {tear_at} of the last batch");
    }
}

#[test]
fn torn_tail_at_every_byte_offset_of_the_last_batch() {
    let dir = tempfile::tempdir().unwrap();
    // Every byte that holds a record, then samples of the zero padding.
    tear(
        dir.path(),
        &[50, 70, 30],
        |records_end, extent| (0..=records_end).chain((records_end..extent).step_by(509)).collect(),
        false,
    );
}

#[test]
fn torn_tail_with_garbage_after_the_tear() {
    let dir = tempfile::tempdir().unwrap();
    tear(dir.path(), &[40, 40], |records_end, _| (0..records_end).step_by(3).collect(), true);
}

#[test]
fn torn_multi_sector_batch_whose_first_sector_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, batch_offset, used_extent) = prepare(dir.path(), &[9000, 5000]);
    assert!(used_extent >= 3 * SECTOR_BYTES as u64);
    let mut bytes = std::fs::read(&segment).unwrap();
    // The device wrote the later sectors of the batch but not the first.
    let start = batch_offset as usize;
    bytes[start..start + SECTOR_BYTES].fill(0);
    std::fs::write(&segment, &bytes).unwrap();
    let config = small_config(dir.path());
    assert!(matches!(scan(&strict(config.clone())), Err(WalError::Recovery(RecoveryError::TornTailStrict { .. }))));
    let ids = recover_append_verify(&config);
    let mut expected: Vec<u64> = (0..BASE_RECORDS).collect();
    expected.push(999);
    assert_eq!(ids, expected);
}
