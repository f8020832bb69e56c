//! Failed writes and barriers fence the WAL: no caller is told a record is durable when its
//! barrier did not complete, and nothing is retried as if it had succeeded.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_lossless)]

mod common;

use std::path::Path;
use std::sync::Arc;

use common::loopfs::LoopFs;
use common::{check_payload, payload, read_all, run, small_config};
use dataplane::wal::{FaultInjector, Wal, WalConfig, WalError, WriteFault};

/// Appends `count` records concurrently; returns each outcome.
async fn append_many(wal: &Wal, first_id: u64, count: u64, length: usize) -> Vec<Result<u64, WalError>> {
    let mut handles = Vec::new();
    for id in first_id..first_id + count {
        let wal = wal.clone();
        handles.push(glommio::spawn_local(async move { wal.append(id, &payload(id, length)).await }));
    }
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await);
    }
    results
}

/// A small WAL configuration with failpoints armed by the test.
fn faulty(dir: &Path) -> (Arc<FaultInjector>, WalConfig) {
    let faults = Arc::new(FaultInjector::default());
    let mut config = small_config(dir);
    config.faults = Some(Arc::clone(&faults));
    (faults, config)
}

fn assert_all_fenced(results: &[Result<u64, WalError>], op: &str, errno: i32) {
    for result in results {
        match result {
            Err(WalError::Fenced { op: failed, errno: Some(code), .. }) => {
                assert_eq!((*failed, *code), (op, errno));
            }
            other => panic!("expected fenced by {op}, got {other:?}"),
        }
    }
}

fn fault_test(arm: impl Fn(&FaultInjector) + 'static, op: &'static str, errno: i32) {
    let dir = tempfile::tempdir().unwrap();
    let (faults, config) = faulty(dir.path());
    run({
        let config = config.clone();
        let faults = Arc::clone(&faults);
        async move {
            let wal = Wal::open(config).await.unwrap();
            let good = append_many(&wal, 0, 20, 500).await;
            assert!(good.iter().all(Result::is_ok));
            arm(&faults);
            let failed = append_many(&wal, 100, 50, 500).await;
            assert_all_fenced(&failed, op, errno);
            // Fenced for good: later appends fail at once, close reports the cause.
            assert_all_fenced(&append_many(&wal, 200, 3, 10).await, op, errno);
            assert!(wal.fenced().unwrap().is_fenced());
            assert!(wal.close().await.unwrap_err().is_fenced());
        }
    });
    // Recovery from disk: the 20 acknowledged records are there and intact. The failed
    // batch may or may not have reached the disk; that is for recovery to decide, and
    // whatever it keeps must be intact.
    let ids: Vec<u64> = read_all(&config).iter().map(|record| check_payload(&record.payload).unwrap()).collect();
    assert_eq!(&ids[..20], &(0..20).collect::<Vec<_>>()[..]);
    assert!(ids[20..].iter().all(|id| (100..150).contains(id)));
}

#[test]
fn eio_on_fdatasync_fences() {
    fault_test(|faults| faults.fail_sync(1, libc::EIO), "fdatasync", libc::EIO);
}

#[test]
fn eio_on_write_fences() {
    fault_test(|faults| faults.fail_write(1, WriteFault::Errno(libc::EIO)), "write", libc::EIO);
}

#[test]
fn enospc_on_write_fences() {
    fault_test(|faults| faults.fail_write(1, WriteFault::Errno(libc::ENOSPC)), "write", libc::ENOSPC);
}

#[test]
fn unaligned_short_write_fences() {
    let dir = tempfile::tempdir().unwrap();
    let (faults, config) = faulty(dir.path());
    run(async move {
        let wal = Wal::open(config).await.unwrap();
        faults.fail_write(1, WriteFault::Short { aligned: false });
        let results = append_many(&wal, 0, 10, 100).await;
        for result in results {
            assert!(matches!(result, Err(WalError::Fenced { op: "write", .. })), "{result:?}");
        }
    });
}

#[test]
fn aligned_short_write_is_continued() {
    let dir = tempfile::tempdir().unwrap();
    let (faults, config) = faulty(dir.path());
    run({
        let config = config.clone();
        let faults = Arc::clone(&faults);
        async move {
            let wal = Wal::open(config).await.unwrap();
            faults.fail_write(1, WriteFault::Short { aligned: true });
            let writes_before = faults.write_ops();
            let results = append_many(&wal, 0, 6, 3000).await;
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            assert!(faults.write_ops() > writes_before + 1, "the rest was written by another write");
            wal.close().await.unwrap();
        }
    });
    let ids: Vec<u64> = read_all(&config).iter().map(|record| check_payload(&record.payload).unwrap()).collect();
    assert_eq!(ids.len(), 6);
}

#[test]
fn segment_creation_failure_fences_at_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (faults, config) = faulty(dir.path());
    run({
        let config = config.clone();
        async move {
            let wal = Wal::open(config).await.unwrap();
            wal.append(0, b"first").await.unwrap();
            wal.close().await.unwrap();
        }
    });
    faults.fail_segment_create(libc::ENOSPC);
    let acked = run({
        let config = config.clone();
        async move {
            let wal = Wal::open(config).await.unwrap();
            let mut acked = vec![0_u64];
            for id in 1..1_000_u64 {
                match wal.append(id, &payload(id, 3000)).await {
                    Ok(_) => acked.push(id),
                    Err(error) => {
                        assert!(
                            matches!(error, WalError::Fenced { op: "create segment", errno: Some(libc::ENOSPC), .. }),
                            "{error:?}"
                        );
                        break;
                    }
                }
            }
            assert!(wal.fenced().is_some(), "a full disk must stop the WAL before 1000 records");
            acked
        }
    });
    faults.fail_segment_create(0);
    let ids: Vec<u64> = read_all(&config).iter().map(|record| check_payload(&record.payload).unwrap_or(0)).collect();
    assert_eq!(ids, acked, "exactly the acknowledged records survive");
}

#[test]
fn segment_reuse_failure_fences_at_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (faults, config) = faulty(dir.path());
    let acked = run({
        let config = config.clone();
        let faults = Arc::clone(&faults);
        async move {
            let wal = Wal::open(config).await.unwrap();
            let mut acked = Vec::new();
            for id in 0..300_u64 {
                wal.append(id, &payload(id, 3000)).await.unwrap();
                acked.push(id);
            }
            assert!(wal.release_before(wal.durable_next_lsn()).await.unwrap() > 0);
            faults.fail_segment_create(libc::EIO);
            for id in 300..2_000_u64 {
                match wal.append(id, &payload(id, 3000)).await {
                    Ok(_) => acked.push(id),
                    Err(error) => {
                        assert!(
                            matches!(error, WalError::Fenced { op: "reuse segment", errno: Some(libc::EIO), .. }),
                            "{error:?}"
                        );
                        break;
                    }
                }
            }
            assert!(wal.fenced().is_some(), "a failed rename must stop the WAL before 2000 records");
            acked
        }
    });
    faults.fail_segment_create(0);
    let ids: Vec<u64> = read_all(&config).iter().map(|record| check_payload(&record.payload).unwrap_or(0)).collect();
    assert_eq!(&ids[ids.len() - (acked.len() - 300)..], &acked[300..], "exactly the acknowledged records survive");
}

/// Needs root (it formats and loop-mounts an 8 MiB ext4): `make test` runs it when it runs as
/// root, as CI does, and then a missing loop device fails it; elsewhere the summary lists it
/// as ignored. The injected ENOSPC tests above cover the logic everywhere.
#[test]
#[ignore = "needs root to loop-mount a small ext4 (make test runs it as root)"]
fn full_disk_fences_and_loses_nothing_acknowledged() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "mounting a small ext4 needs root");
    let fs = LoopFs::new(8).unwrap_or_else(|error| panic!("cannot mount a loop-device ext4: {error}"));
    let mut config = WalConfig::new(fs.mount_point.join("wal"), 0);
    config.segment_bytes = 1 << 20;
    config.batch_bytes_max = 64 << 10;
    config.record_payload_bytes_max = 16 << 10;
    let acked = run({
        let config = config.clone();
        async move {
            let wal = Wal::open(config).await.unwrap();
            let mut acked = Vec::new();
            for id in 0..20_000_u64 {
                match wal.append(id, &payload(id, 8000)).await {
                    Ok(_) => acked.push(id),
                    Err(error) => {
                        assert!(matches!(error, WalError::Fenced { errno: Some(libc::ENOSPC), .. }), "{error:?}");
                        break;
                    }
                }
            }
            assert!(wal.fenced().is_some(), "an 8 MiB file system must fill up");
            assert!(wal.close().await.is_err());
            acked
        }
    });
    assert!(acked.len() > 100);
    let ids: Vec<u64> =
        read_all(&config).iter().map(|record| check_payload(&record.payload).unwrap_or(u64::MAX)).collect();
    assert_eq!(ids, acked);
    // Recovery on the full file system still opens the log.
    let reopened = run(async move {
        let wal = Wal::open(config).await.unwrap();
        let next = wal.durable_next_lsn();
        let _ = wal.close().await;
        next
    });
    assert_eq!(reopened, acked.len() as u64 + 1);
}
