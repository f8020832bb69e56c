//! A backup's WAL takes its primary's batches (`Wal::append_replicated`): same LSNs, same
//! boundaries, same records, on real O_DIRECT segment files across rotations and a reopen; a
//! batch that does not fit (a gap, damage, an image cut short or too long) is
//! refused by name and changes nothing; a failed write fences the backup as its own would.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;

use common::{check_payload, payload, read_all, run, small_config};
use dataplane::wal::{FaultInjector, TailBatch, Wal, WalConfig, WalError, WalTail, WriteFault, truncate_from};

/// The primary: concurrent appends in rounds (so batches of many sizes), every durable batch
/// kept in its tail.
async fn primary_batches(config: WalConfig, records: u64) -> Vec<TailBatch> {
    let wal = Wal::open(config.clone()).await.unwrap();
    let mut id = 0;
    while id < records {
        let round = (id % 7 + 1).min(records - id);
        let mut handles = Vec::new();
        for each in id..id + round {
            let wal = wal.clone();
            let length = 100 + (each as usize * 37) % 3000;
            handles.push(glommio::spawn_local(async move { wal.append(each, &payload(each, length)).await }));
        }
        for handle in handles {
            handle.await.unwrap();
        }
        id += round;
    }
    wal.close().await.unwrap();
    let batches = tail_batches(&config.tail.unwrap(), 1);
    assert_eq!(batches.last().unwrap().next_lsn, records + 1, "the tail holds every batch");
    batches
}

/// The batches a tail cache holds from `lsn` on.
fn tail_batches(tail: &WalTail, mut lsn: u64) -> Vec<TailBatch> {
    let mut batches = Vec::new();
    while let Some(batch) = tail.batch_at(lsn) {
        lsn = batch.next_lsn;
        batches.push(batch);
    }
    batches
}

/// The log `config` holds: the first writes (`id = lsn - 1`) below `cut`, then `after` records
/// of ids `base`, `base + 1`, ... from it.
fn assert_cut_log(config: &WalConfig, cut: u64, after: u64, base: u64) {
    let records = read_all(config);
    assert_eq!(records.len() as u64, cut - 1 + after);
    for record in &records {
        let id = check_payload(&record.payload).unwrap();
        let expected = if record.lsn < cut { record.lsn - 1 } else { base + record.lsn - cut };
        assert_eq!(id, expected, "LSN {}", record.lsn);
    }
}

fn with_tail(mut config: WalConfig) -> WalConfig {
    config.tail = Some(Arc::new(WalTail::new(64 << 20)));
    config
}

#[test]
fn a_backup_holds_its_primarys_batches_at_the_same_lsns_across_rotations_and_a_reopen() {
    let (primary_dir, backup_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = with_tail(small_config(primary_dir.path()));
    let backup = with_tail(small_config(backup_dir.path()));
    let batches = run({
        let (primary, backup) = (primary.clone(), backup.clone());
        async move {
            let batches = primary_batches(primary, 400).await;
            assert!(batches.len() > 40, "{} batches", batches.len());
            let wal = Wal::open(backup.clone()).await.unwrap();
            for batch in &batches {
                assert_eq!(wal.append_replicated(&batch.bytes).await.unwrap(), batch.next_lsn);
            }
            assert_eq!(wal.durable_next_lsn(), 401);
            assert!(wal.stats().rotations > 0, "the small segments rotated");
            wal.close().await.unwrap();
            batches
        }
    });
    // Reopened from disk: the same records at the same LSNs.
    let (ours, theirs) = (read_all(&backup), read_all(&primary));
    assert_eq!(ours.len(), 400);
    for (mine, primarys) in ours.iter().zip(&theirs) {
        assert_eq!((mine.lsn, mine.glt, &mine.payload), (primarys.lsn, primarys.glt, &primarys.payload));
        assert_eq!(check_payload(&mine.payload).unwrap(), mine.lsn - 1);
    }
    // The same boundaries: the backup's own tail saw the same batches.
    let tail = backup.tail.clone().unwrap();
    for batch in &batches {
        let mine = tail.batch_at(batch.first_lsn).unwrap();
        assert_eq!(
            (mine.first_lsn, mine.next_lsn, mine.bytes.len()),
            (batch.first_lsn, batch.next_lsn, batch.bytes.len())
        );
    }
    // And it goes on as a primary would, from the LSN after the last batch.
    run({
        let backup = backup.clone();
        async move {
            let wal = Wal::open(backup).await.unwrap();
            assert_eq!(wal.append(7, &payload(400, 10)).await.unwrap(), 401);
            wal.close().await.unwrap();
        }
    });
}

#[test]
fn a_batch_that_does_not_fit_is_refused_by_name_and_changes_nothing() {
    let (primary_dir, backup_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = with_tail(small_config(primary_dir.path()));
    let backup = small_config(backup_dir.path());
    run(async move {
        let batches = primary_batches(primary, 30).await;
        let wal = Wal::open(backup).await.unwrap();
        let refused = |result: Result<u64, WalError>, what: &str| match result {
            Err(WalError::ReplicatedBatch { expected_lsn, reason }) => {
                assert!(reason.contains(what), "{reason}");
                expected_lsn
            }
            other => panic!("expected a refusal naming {what:?}, got {other:?}"),
        };
        // A gap: the second batch first.
        assert_eq!(refused(wal.append_replicated(&batches[1].bytes).await, "gap"), 1);
        // Damage in a record.
        let mut damaged = batches[0].bytes.to_vec();
        let last = damaged.iter().rposition(|byte| *byte != 0).unwrap();
        damaged[last] ^= 0x40;
        refused(wal.append_replicated(&damaged).await, "at byte");
        // Cut short, and with bytes beyond its extent.
        let bytes = &batches[0].bytes;
        assert!(wal.append_replicated(&bytes[..bytes.len() - 4096]).await.is_err());
        let mut longer = bytes.to_vec();
        longer.extend_from_slice(&[0; 4096]);
        refused(wal.append_replicated(&longer).await, "extent");
        assert_eq!(wal.durable_next_lsn(), 1, "nothing was written");
        // The right batch goes in; the WAL then goes on from the LSN after it.
        assert_eq!(wal.append_replicated(&batches[0].bytes).await.unwrap(), batches[0].next_lsn);
        assert_eq!(wal.append(1, &payload(1000, 10)).await.unwrap(), batches[0].next_lsn);
        refused(wal.append_replicated(&batches[1].bytes).await, "gap");
        wal.close().await.unwrap();
    });
}

#[test]
fn a_failed_write_of_a_replicated_batch_fences_the_backup() {
    let (primary_dir, backup_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = with_tail(small_config(primary_dir.path()));
    let faults = Arc::new(FaultInjector::default());
    let mut backup = small_config(backup_dir.path());
    backup.faults = Some(Arc::clone(&faults));
    run({
        let backup = backup.clone();
        async move {
            let batches = primary_batches(primary, 60).await;
            let wal = Wal::open(backup).await.unwrap();
            for batch in &batches[..3] {
                wal.append_replicated(&batch.bytes).await.unwrap();
            }
            faults.fail_write(1, WriteFault::Errno(libc::EIO));
            let failed = wal.append_replicated(&batches[3].bytes).await.unwrap_err();
            assert!(matches!(failed, WalError::Fenced { op: "write", errno: Some(libc::EIO), .. }), "{failed:?}");
            assert!(wal.append_replicated(&batches[4].bytes).await.unwrap_err().is_fenced());
            assert!(wal.close().await.unwrap_err().is_fenced());
            batches[2].next_lsn
        }
    });
    // What was acknowledged is on disk, whole.
    let records = read_all(&backup);
    assert!(records.len() as u64 >= 3, "{} records", records.len());
    for record in &records {
        assert_eq!(check_payload(&record.payload).unwrap(), record.lsn - 1);
    }
}

#[test]
fn a_cut_tail_is_gone_for_good_and_the_log_goes_on_from_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let config = with_tail(small_config(dir.path()));
    let batches = run({
        let config = config.clone();
        async move { primary_batches(config, 300).await }
    });
    let plan = dataplane::wal::scan(&config).unwrap();
    assert!(plan.segments.len() >= 3, "{} segments", plan.segments.len());
    // A batch of several records in an early segment: cut there.
    let cut_batch = batches.iter().skip(batches.len() / 4).find(|batch| batch.next_lsn - batch.first_lsn > 1).unwrap();
    let cut = cut_batch.first_lsn;
    match truncate_from(&config, cut + 1) {
        Err(WalError::Truncate { lsn, reason }) => {
            assert!(lsn == cut + 1 && reason.contains("not the first LSN"), "{reason}")
        }
        other => panic!("a cut inside a batch: {other:?}"),
    }
    assert!(matches!(truncate_from(&config, 0), Err(WalError::Truncate { .. })));
    assert_eq!(truncate_from(&config, 301).unwrap(), 301, "at the end: nothing to cut");
    assert_eq!(truncate_from(&config, cut).unwrap(), cut);
    let kept = read_all(&config);
    assert_eq!(kept.len() as u64, cut - 1);
    assert!(kept.iter().all(|record| check_payload(&record.payload).unwrap() == record.lsn - 1));
    assert_eq!(truncate_from(&config, cut).unwrap(), cut, "cutting again changes nothing");
    // The log goes on from the cut, in a new segment; the cut records never come back, across
    // reopens, whatever the new batches' sizes.
    run({
        let config = config.clone();
        async move {
            let wal = Wal::open(config.clone()).await.unwrap();
            assert_eq!(wal.durable_next_lsn(), cut);
            for id in 0..40 {
                let lsn = wal.append(id, &payload(10_000 + id, 50 + (id as usize * 911) % 5000)).await.unwrap();
                assert_eq!(lsn, cut + id);
            }
            wal.close().await.unwrap();
        }
    });
    for _ in 0..2 {
        assert_cut_log(&config, cut, 40, 10_000);
        run({
            let config = config.clone();
            async move { Wal::open(config).await.unwrap().close().await.unwrap() }
        });
    }
    // A second cut, in the segment the log went on in (one record per batch there).
    assert_eq!(truncate_from(&config, cut + 20).unwrap(), cut + 20);
    assert_eq!(read_all(&config).len() as u64, cut - 1 + 20);
    run({
        let config = config.clone();
        async move {
            let wal = Wal::open(config).await.unwrap();
            assert_eq!(wal.append(1, &payload(5, 10)).await.unwrap(), cut + 20);
            wal.close().await.unwrap();
        }
    });
}

/// A backup cuts its tail while the WAL stays open: appends of the new primary's batches go on
/// from the cut at once, the tail cache forgets the cut batches, and a reopen finds the same
/// log. The epochs the batches name are read back at open, where they change.
#[test]
fn an_open_wal_cuts_its_tail_and_takes_batches_from_the_cut_and_its_epochs_are_read_back() {
    let (primary_dir, backup_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = with_tail(small_config(primary_dir.path()));
    let backup = with_tail(small_config(backup_dir.path()));
    let (cut, new_batches) = run({
        let (primary, backup) = (primary.clone(), backup.clone());
        async move {
            let batches = primary_batches(primary.clone(), 200).await;
            let wal = Wal::open(backup.clone()).await.unwrap();
            for batch in &batches {
                wal.append_replicated(&batch.bytes).await.unwrap();
            }
            // Cut inside an earlier segment, at a batch start; a cut inside a batch is refused
            // and changes nothing.
            let at = batches[batches.len() / 3].first_lsn;
            let inside = batches.iter().find(|batch| batch.next_lsn - batch.first_lsn > 1).unwrap();
            assert!(matches!(wal.truncate_tail(inside.first_lsn + 1).await, Err(WalError::Truncate { .. })));
            assert_eq!(wal.durable_next_lsn(), 201);
            assert_eq!(wal.truncate_tail(201).await.unwrap(), 201, "at the end: nothing to cut");
            assert_eq!(wal.truncate_tail(at).await.unwrap(), at);
            assert_eq!(wal.durable_next_lsn(), at);
            assert!(backup.tail.as_ref().unwrap().batch_at(at - 1).is_none(), "the cache forgot the cut batches");
            // The new primary's log from the cut: epoch 2 batches of other records.
            let other = with_tail(small_config(&primary.dir.join("other")));
            let replay;
            {
                let source = Wal::open(other.clone()).await.unwrap();
                for batch in batches.iter().take_while(|batch| batch.first_lsn < at) {
                    source.append_replicated(&batch.bytes).await.unwrap();
                }
                source.set_epoch(2);
                for id in 0..30 {
                    source.append(id, &payload(50_000 + id, 80 + (id as usize * 313) % 4000)).await.unwrap();
                }
                source.close().await.unwrap();
                replay = tail_batches(&other.tail.unwrap(), at);
                assert_eq!(replay.last().unwrap().next_lsn, at + 30);
            }
            for batch in &replay {
                assert_eq!(wal.append_replicated(&batch.bytes).await.unwrap(), batch.next_lsn);
            }
            wal.close().await.unwrap();
            (at, replay)
        }
    });
    assert_cut_log(&backup, cut, 30, 50_000);
    assert!(!new_batches.is_empty());
    run({
        let backup = backup.clone();
        async move {
            let wal = Wal::open(backup).await.unwrap();
            assert_eq!(wal.epochs_at_open(), &[(0, 1), (2, cut)], "epoch 0 up to the cut, then 2");
            // Admission: a refusal reserves nothing; an admitted record takes the LSN it was
            // shown, in a batch naming the WAL's epoch.
            wal.set_epoch(3);
            assert!(matches!(wal.append_admitted(b"no", |_| None).await, Err(WalError::NotAdmitted)));
            let mut shown = 0;
            let lsn = wal
                .append_admitted(&payload(7, 10), |lsn| {
                    shown = lsn;
                    Some(9)
                })
                .await
                .unwrap();
            assert_eq!((lsn, shown), (cut + 30, cut + 30));
            wal.close().await.unwrap();
        }
    });
    run({
        let backup = backup.clone();
        async move {
            let wal = Wal::open(backup).await.unwrap();
            assert_eq!(wal.epochs_at_open(), &[(0, 1), (2, cut), (3, cut + 30)]);
            wal.close().await.unwrap();
        }
    });
}
