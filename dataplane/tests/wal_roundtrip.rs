//! Append and recover through the real path: O_DIRECT segments, group commit, rotation.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_lossless)]

mod common;

use std::rc::Rc;
use std::time::Duration;

use common::{check_payload, payload, read_all, run, small_config};
use dataplane::wal::{Wal, WalConfig, WalError, WalReader, WalTail};

#[test]
fn concurrent_appends_recover_in_order_across_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let tasks = 32_u64;
    let per_task = 60_u64;
    let (acked, stats) = run({
        let config = config.clone();
        async move {
            let wal = Wal::open(config).await.unwrap();
            let mut handles = Vec::new();
            for task in 0..tasks {
                let wal = wal.clone();
                handles.push(glommio::spawn_local(async move {
                    let mut acked = Vec::new();
                    for index in 0..per_task {
                        let id = task * 1_000 + index;
                        let length = 8 + ((id * 37) % 3000) as usize;
                        let lsn = wal.append(id, &payload(id, length)).await.unwrap();
                        acked.push((lsn, id));
                    }
                    acked
                }));
            }
            let mut acked = Vec::new();
            for handle in handles {
                acked.extend(handle.await);
            }
            let stats = wal.stats();
            assert_eq!(wal.durable_next_lsn(), tasks * per_task + 1);
            wal.close().await.unwrap();
            (acked, stats)
        }
    });
    assert_eq!(stats.records, tasks * per_task);
    assert!(stats.batches < stats.records, "group commit: {stats:?}");
    assert!(stats.rotations > 2, "small segments must rotate: {stats:?}");

    let records = read_all(&config);
    assert_eq!(records.len() as u64, tasks * per_task);
    for (index, record) in records.iter().enumerate() {
        assert_eq!(record.lsn, index as u64 + 1);
        let id = check_payload(&record.payload).expect("intact payload");
        assert_eq!(record.glt, id, "timestamp field round trips");
    }
    let mut acked = acked;
    acked.sort_unstable();
    for ((lsn, id), record) in acked.iter().zip(&records) {
        assert_eq!((*lsn, *id), (record.lsn, record.glt));
    }
    // Per task, ids appear in the order the task appended them.
    let mut last_per_task = std::collections::HashMap::new();
    for record in &records {
        let (task, index) = (record.glt / 1_000, record.glt % 1_000);
        if let Some(previous) = last_per_task.insert(task, index) {
            assert!(index > previous);
        }
    }
}

#[test]
fn reopen_continues_lsns_and_reader_starts_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    for round in 0..3_u64 {
        let config = config.clone();
        run(async move {
            let wal = Wal::open(config).await.unwrap();
            assert_eq!(wal.durable_next_lsn(), round * 100 + 1);
            for index in 0..100 {
                let id = round * 100 + index;
                assert_eq!(wal.append(id, &payload(id, 700)).await.unwrap(), id + 1);
            }
            wal.close().await.unwrap();
        });
    }
    let reader = WalReader::new(dir.path(), 0, config.record_payload_bytes_max);
    for from in [1_u64, 2, 57, 100, 101, 250, 300] {
        let records = reader.read_range(from, 301).unwrap();
        assert_eq!(records.len() as u64, 301 - from);
        assert_eq!(records.first().unwrap().lsn, from);
        for record in records {
            assert_eq!(check_payload(&record.payload), Some(record.lsn - 1));
        }
    }
    assert!(reader.read_range(301, 301).unwrap().is_empty());
}

#[test]
fn live_reader_follows_durable_position() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    run(async move {
        let wal = Wal::open(config.clone()).await.unwrap();
        let reader = WalReader::new(&config.dir, 0, config.record_payload_bytes_max);
        let mut cursor = reader.cursor(1, wal.durable_next_lsn());
        let mut seen = 0_u64;
        for index in 0..500_u64 {
            wal.append(index, &payload(index, 900)).await.unwrap();
            cursor.extend_until(wal.durable_next_lsn());
            while let Some(record) = cursor.next_record().unwrap() {
                assert_eq!(check_payload(&record.payload), Some(seen));
                seen += 1;
            }
        }
        assert_eq!(seen, 500);
        wal.close().await.unwrap();
    });
}

#[test]
fn limits_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    run(async move {
        let wal = Wal::open(config.clone()).await.unwrap();
        let too_big = vec![0_u8; config.record_payload_bytes_max as usize + 1];
        assert!(matches!(wal.append(0, &too_big).await, Err(WalError::RecordTooLarge { .. })));
        // The WAL is still healthy.
        assert_eq!(wal.append(0, b"fine").await.unwrap(), 1);
        wal.close().await.unwrap();
    });
}

#[test]
fn invalid_config_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    type Mutation = Box<dyn Fn(&mut WalConfig)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("segment_bytes", Box::new(|config| config.segment_bytes = 1000)),
        ("batch_bytes_max", Box::new(|config| config.batch_bytes_max = 100)),
        ("batch_records_max", Box::new(|config| config.batch_records_max = 0)),
        ("record_payload_bytes_max", Box::new(|config| config.record_payload_bytes_max = 1 << 30)),
        ("io_bytes_max", Box::new(|config| config.io_bytes_max = Some(5000))),
        ("batch_linger", Box::new(|config| config.batch_linger = Duration::from_secs(1))),
    ];
    for (field, mutate) in cases {
        let mut config = small_config(dir.path());
        mutate(&mut config);
        match config.validate() {
            Err(WalError::Config { field: named, .. }) => assert_eq!(named, field),
            other => panic!("{field}: {other:?}"),
        }
    }
}

#[test]
fn batches_larger_than_one_io_are_split_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.io_bytes_max = Some(4096);
    config.batch_bytes_max = 64 << 10;
    let stats = run({
        let config = config.clone();
        async move {
            let wal = Rc::new(Wal::open(config).await.unwrap());
            let mut handles = Vec::new();
            for id in 0..64_u64 {
                let wal = Rc::clone(&wal);
                handles.push(glommio::spawn_local(async move { wal.append(id, &payload(id, 5000)).await.unwrap() }));
            }
            for handle in handles {
                handle.await;
            }
            let stats = wal.stats();
            Rc::try_unwrap(wal).unwrap().close().await.unwrap();
            stats
        }
    });
    assert!(stats.batch_bytes / stats.batches > 4096, "batches span several I/Os: {stats:?}");
    let records = read_all(&config);
    assert_eq!(records.len(), 64);
    let mut ids: Vec<u64> = records.iter().map(|record| check_payload(&record.payload).unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..64).collect::<Vec<_>>());
}

/// Writes 400 records of 900 bytes, from 4 tasks, through a new WAL (small limits) that fills
/// a tail cache of `cache_bytes`: its directory, configuration, cache and durable end.
fn written_with_tail(cache_bytes: usize) -> (tempfile::TempDir, WalConfig, std::sync::Arc<WalTail>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let tail = std::sync::Arc::new(WalTail::new(cache_bytes));
    let mut cached = config.clone();
    cached.tail = Some(tail.clone());
    let end = run(async move {
        let wal = Wal::open(cached).await.unwrap();
        let mut handles = Vec::new();
        for task in 0..4_u64 {
            let wal = wal.clone();
            handles.push(glommio::spawn_local(async move {
                for index in 0..100 {
                    let id = task * 100 + index;
                    wal.append(id, &payload(id, 900)).await.unwrap();
                }
            }));
        }
        for handle in handles {
            handle.await;
        }
        let end = wal.durable_next_lsn();
        wal.close().await.unwrap();
        end
    });
    (dir, config, tail, end)
}

#[test]
fn a_reader_with_the_tail_cache_reads_what_the_segments_hold_and_the_cache_alone_serves_the_newest() {
    // Room for a few batches only: the older ones are evicted and read from the segments.
    let (dir, config, tail, end) = written_with_tail(64 << 10);
    assert_eq!(end, 401);
    let cached_from = (1..end).find(|lsn| tail.batch_at(*lsn).is_some()).expect("the cache holds the newest batches");
    assert!(cached_from > 1, "the bound evicted the oldest batches");
    let disk = WalReader::new(dir.path(), 0, config.record_payload_bytes_max);
    let cached = disk.clone().with_tail(tail.clone());
    for from in [1_u64, 2, cached_from - 1, cached_from, cached_from + 1, 400] {
        let expected = disk.read_range(from, end).unwrap();
        assert_eq!(cached.read_range(from, end).unwrap(), expected, "from {from}");
        assert_eq!(expected.len() as u64, end - from);
    }
    // With the segments gone, only the cache can answer: the newest records come from memory.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let records = cached.read_range(cached_from, end).unwrap();
    assert_eq!(records.len() as u64, end - cached_from);
    for record in &records {
        assert!(check_payload(&record.payload).is_some(), "record {} intact", record.lsn);
    }
    assert!(cached.read_range(cached_from - 1, end).is_err(), "an evicted batch needs its segment");
}

#[test]
fn a_damaged_cached_batch_is_read_from_its_segment_instead() {
    let (dir, config, tail, end) = written_with_tail(16 << 20);
    // A copy of the cache whose middle batch has a flipped byte in a record.
    let damaged = std::sync::Arc::new(WalTail::new(16 << 20));
    let mut lsn = 1;
    let mut flipped = None;
    while lsn < end {
        let mut batch = tail.batch_at(lsn).unwrap();
        if flipped.is_none() && batch.first_lsn > 100 {
            let mut bytes = batch.bytes.to_vec();
            bytes[600] ^= 0x40;
            batch.bytes = bytes.into();
            flipped = Some(batch.first_lsn);
        }
        lsn = batch.next_lsn;
        damaged.push(batch);
    }
    assert!(flipped.is_some());
    let disk = WalReader::new(dir.path(), 0, config.record_payload_bytes_max);
    let expected = disk.read_range(1, end).unwrap();
    assert_eq!(disk.with_tail(damaged).read_range(1, end).unwrap(), expected);
}

/// Appends `count` records from 16 tasks, ids from `first_id`; returns (lsn, id) of each.
async fn append_from_tasks(wal: &Wal, first_id: u64, count: u64) -> Vec<(u64, u64)> {
    let tasks = 16;
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let wal = wal.clone();
            glommio::spawn_local(async move {
                let mut acked = Vec::new();
                for id in (first_id + task..first_id + count).step_by(tasks as usize) {
                    let length = 8 + ((id * 37) % 3000) as usize;
                    acked.push((wal.append(id, &payload(id, length)).await.unwrap(), id));
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for handle in handles {
        acked.extend(handle.await);
    }
    acked
}

#[test]
fn released_segments_are_reused_and_their_stale_bytes_never_read_as_records() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let (floor, acked, stats) = run({
        let config = config.clone();
        async move {
            let wal = Wal::open(config).await.unwrap();
            let mut acked = append_from_tasks(&wal, 0, 600).await;
            let mut floor = 1;
            for phase in 1..4_u64 {
                // A flush covered everything durable: its segments are released.
                floor = wal.durable_next_lsn();
                assert!(wal.release_before(floor).await.unwrap() > 0, "phase {phase} released segments");
                acked.extend(append_from_tasks(&wal, phase * 10_000, 600).await);
            }
            let stats = wal.stats();
            wal.close().await.unwrap();
            (floor, acked, stats)
        }
    });
    assert!(stats.reused_segments > 0, "released segments are reused: {stats:?}");
    assert!(stats.reused_segments < stats.rotations, "the first rotations had nothing released yet: {stats:?}");
    let on_disk = std::fs::read_dir(dir.path()).unwrap().count() as u64;
    assert!(
        on_disk <= 4 + 2 + 600 * 3100 / (256 << 10) + 2,
        "released segments beyond the kept four are deleted: {on_disk} files"
    );

    // A clean close in a reused segment is no torn tail, even to strict recovery.
    let plan = dataplane::wal::scan(&common::strict(config.clone())).unwrap();
    assert_eq!(plan.torn_tail, None);
    let check = |records: &[dataplane::wal::WalRecord], acked: &[(u64, u64)]| {
        let by_lsn: std::collections::HashMap<u64, u64> = acked.iter().copied().collect();
        for pair in records.windows(2) {
            assert_eq!(pair[1].lsn, pair[0].lsn + 1, "contiguous LSNs");
        }
        for record in records {
            let id = check_payload(&record.payload).expect("intact payload");
            assert_eq!(by_lsn.get(&record.lsn), Some(&id), "record {} is the one appended there", record.lsn);
        }
        let kept = records.iter().filter(|record| record.lsn >= floor).count();
        assert_eq!(kept, acked.iter().filter(|(lsn, _)| *lsn >= floor).count(), "every record above the floor");
    };
    check(&read_all(&config), &acked);

    // Reopened: recovery reads through reused segments and appends continue after them.
    let more = run({
        let config = config.clone();
        async move {
            let wal = Wal::open(config).await.unwrap();
            let more = append_from_tasks(&wal, 90_000, 300).await;
            wal.close().await.unwrap();
            more
        }
    });
    let mut all = acked;
    all.extend(more);
    check(&read_all(&config), &all);
}
