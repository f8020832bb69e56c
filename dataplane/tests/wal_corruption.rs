//! Damage before the tail of the log is never silently dropped: recovery stops with an error
//! that names the segment, the offset and what was wrong, in both recovery modes.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_lossless)]

mod common;

use common::{fill, payload, run, small_config, strict};
use dataplane::wal::format::segment_file_name;
use dataplane::wal::recovery::Damage;
use dataplane::wal::scan;
use dataplane::wal::{RecoveryError, Wal, WalConfig, WalError};

/// Writes `batches` batches of 3 records each; returns the (offset, used bytes) of each batch
/// in segment 1 (all fit there).
fn write_batches(config: &WalConfig, batches: u64) -> Vec<u64> {
    let mut offsets = Vec::new();
    for batch in 0..batches {
        offsets.push(
            scan(config).map(|plan| plan.segments.last().map_or(4096, |segment| segment.frontier)).unwrap_or(4096),
        );
        run({
            let config = config.clone();
            async move {
                let wal = Wal::open(config).await.unwrap();
                let mut handles = Vec::new();
                for index in 0..3 {
                    let wal = wal.clone();
                    let id = batch * 3 + index;
                    handles.push(glommio::spawn_local(async move { wal.append(id, &payload(id, 200)).await.unwrap() }));
                }
                for handle in handles {
                    handle.await;
                }
                wal.close().await.unwrap();
            }
        });
    }
    offsets
}

#[test]
fn flipped_bit_in_the_middle_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let offsets = write_batches(&config, 5);
    let path = dir.path().join(segment_file_name(0, 1));
    let pristine = std::fs::read(&path).unwrap();
    // A bit in the second record of the third batch.
    let record_offset = offsets[2] as usize + dataplane::wal::format::BATCH_BEGIN_BYTES + wire::encoded_len(200);
    for bit_offset in [record_offset + 3, record_offset + 40, record_offset + 150] {
        let mut bytes = pristine.clone();
        bytes[bit_offset] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        for config in [strict(config.clone()), config.clone()] {
            match scan(&config) {
                Err(WalError::Recovery(RecoveryError::Corruption { segment_seq, offset, damage })) => {
                    assert_eq!(segment_seq, 1);
                    assert_eq!(offset, record_offset as u64);
                    assert!(matches!(damage, Damage::Record(_)), "{damage:?}");
                    let message = scan(&config).unwrap_err().to_string();
                    assert!(
                        message.contains("segment 1") && message.contains(&format!("offset {record_offset}")),
                        "{message}"
                    );
                }
                other => panic!("{:?}: expected corruption, got {other:?}", config.recovery_mode),
            }
            // Opening for writes refuses too.
            let open = run({
                let config = config.clone();
                async move { Wal::open(config).await.map(|_| ()) }
            });
            assert!(matches!(open, Err(WalError::Recovery(RecoveryError::Corruption { .. }))));
        }
    }
    std::fs::write(&path, &pristine).unwrap();
    scan(&strict(config)).unwrap();
}

#[test]
fn flipped_bit_in_a_sealed_segment_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    fill(&config, 400, 2000);
    let plan = scan(&config).unwrap();
    assert!(plan.segments.len() >= 3);
    let path = dir.path().join(segment_file_name(0, 1));
    let mut bytes = std::fs::read(&path).unwrap();
    // The last batch of a sealed segment: it looks like a tail on its own, but later
    // segments prove it is not.
    let frontier = plan.segments[0].frontier as usize;
    bytes[frontier - 4096 + 100] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(scan(&config), Err(WalError::Recovery(RecoveryError::Corruption { segment_seq: 1, .. }))));
}

#[test]
fn missing_segment_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    fill(&config, 400, 2000);
    std::fs::remove_file(dir.path().join(segment_file_name(0, 2))).unwrap();
    assert!(matches!(
        scan(&config),
        Err(WalError::Recovery(RecoveryError::MissingSegment { missing: 2, before: 1, after: 3 }))
    ));
}

#[test]
fn damaged_last_batch_is_a_tail_in_tolerant_mode_only() {
    // A bit flip in the last acknowledged batch cannot be told from a torn write: tolerant
    // recovery drops it (a replica repairs it), strict recovery refuses. Documented limit.
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let offsets = write_batches(&config, 3);
    let path = dir.path().join(segment_file_name(0, 1));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offsets[2] as usize + 60] ^= 4;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(scan(&strict(config.clone())), Err(WalError::Recovery(RecoveryError::TornTailStrict { .. }))));
    let plan = scan(&config).unwrap();
    assert_eq!(plan.next_lsn, 7);
    assert_eq!(plan.torn_tail.unwrap().offset, offsets[2]);
}
