//! The store behaves like a `BTreeMap` of versions, across clean restarts, checkpoints and
//! WAL segment release: random puts (inline and chunked), deletes, batches, reads at
//! timestamps, range reads and listings are checked against a model.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_lossless)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use dataplane::store::{ManualClock, ShardStore, StoreConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::run;

/// Small limits so checkpoints, segment release, chunking and rotation all happen.
fn small_store(dir: &Path, clock: Arc<ManualClock>) -> StoreConfig {
    let mut config = StoreConfig::new(dir, 0);
    config.wal.segment_bytes = 256 << 10;
    config.wal.batch_bytes_max = 64 << 10;
    config.wal.record_payload_bytes_max = 32 << 10;
    config.inline_bytes_max = 4 << 10;
    config.key_bytes_max = 64;
    config.chunk_bytes = 64 << 10;
    config.checkpoint_wal_bytes = 256 << 10;
    config.clock = clock;
    config
}

/// [`small_store`] with failpoints armed by the test.
fn faulty_small_store(dir: &Path) -> (StoreConfig, Arc<dataplane::wal::FaultInjector>) {
    let mut config = small_store(dir, Arc::new(ManualClock::new(1_000_000)));
    let faults = Arc::new(dataplane::wal::FaultInjector::default());
    config.wal.faults = Some(Arc::clone(&faults));
    (config, faults)
}

/// [`small_store`] for a replica of shard 0, whose home is region `a`.
fn replica_store(dir: &Path, clock: Arc<ManualClock>) -> StoreConfig {
    let mut config = small_store(dir, clock);
    config.replica_of = Some("a".into());
    config
}

/// [`replica_store`] taking writes under `mm/` in region origin 1.
fn multi_master_replica(dir: &Path, clock: Arc<ManualClock>) -> StoreConfig {
    let mut config = replica_store(dir, clock);
    config.multi_master = vec![b"mm/".to_vec()];
    config.origin = Some(1);
    config
}

/// A WAL payload of one operation on `key`: a put of `value`, or a delete (`None`), as a
/// home ships it.
fn record(key: &str, value: Option<&str>) -> bytes::Bytes {
    use dataplane::store::op::{self, Value};
    let mut out = Vec::new();
    let body = value.map_or(Value::Tombstone, |value| Value::Inline(value.as_bytes()));
    op::encode(std::iter::once((key.as_bytes(), body)), &mut out).unwrap();
    bytes::Bytes::from(out)
}

/// key -> versions (ts, value or None for a tombstone), as the model sees them.
type Model = BTreeMap<Vec<u8>, Vec<(u64, Option<Vec<u8>>)>>;

fn model_get(model: &Model, key: &[u8], at: Option<u64>) -> Option<(u64, Vec<u8>)> {
    let at = at.unwrap_or(u64::MAX);
    let chain = model.get(key)?;
    let (ts, value) = chain.iter().rev().find(|(ts, _)| *ts <= at)?;
    value.clone().map(|value| (*ts, value))
}

fn model_list(model: &Model, prefix: &[u8], at: Option<u64>) -> Vec<(Vec<u8>, u64, u64)> {
    model
        .keys()
        .filter(|key| key.starts_with(prefix))
        .filter_map(|key| model_get(model, key, at).map(|(ts, value)| (key.clone(), ts, value.len() as u64)))
        .collect()
}

fn value_for(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.random_range(0..10) {
        0 => 0,
        1..=6 => rng.random_range(1..300),
        7 | 8 => rng.random_range(4 << 10..9 << 10),
        _ => rng.random_range(64 << 10..200 << 10),
    };
    // Few distinct contents so identical chunks are deduplicated.
    let seed = rng.random_range(0..4u8);
    (0..len).map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Moves the horizon, flushes the memtable and compacts every table: what collection does
/// over time, at once.
async fn collect_now(store: &ShardStore) {
    store.collect_garbage().await.unwrap();
    store.checkpoint().await.unwrap();
    store.compact().await.unwrap();
}

async fn check_all(store: &ShardStore, model: &Model, timestamps: &[u64]) {
    for (key, _) in model.iter() {
        let got = store.get(key, None).await.unwrap().map(|(ts, value)| (ts, value.to_vec()));
        assert_eq!(got, model_get(model, key, None), "latest of {key:?}");
    }
    for &at in timestamps.iter().step_by(7) {
        let listed: Vec<_> = store
            .list(b"", b"", usize::MAX, Some(at))
            .await
            .unwrap()
            .0
            .into_iter()
            .map(|item| (item.key.to_vec(), item.ts, item.size))
            .collect();
        assert_eq!(listed, model_list(model, b"", Some(at)), "list at {at}");
    }
}

#[test]
fn model_across_restarts_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let config = small_store(dir.path(), Arc::clone(&clock));
    let mut rng = StdRng::seed_from_u64(7);
    let mut model = Model::new();
    let mut timestamps = Vec::new();
    let mut checkpoints = 0;
    let mut released = 0;
    for round in 0..6u64 {
        let config = config.clone();
        let clock = Arc::clone(&clock);
        let (next_model, next_timestamps, next_rng, stats) = run(async move {
            // Marks for the watchdog: round * 1000 + step; + 500 opening, + 600 closing.
            common::mark(round * 1000 + 500);
            let store = ShardStore::open(config).await.unwrap();
            check_all(&store, &model, &timestamps).await;
            for step in 0..400 {
                common::mark(round * 1000 + step);
                clock.advance(rng.random_range(0..50));
                let key = format!("k/{:02}", rng.random_range(0..40)).into_bytes();
                match rng.random_range(0..20) {
                    0..=8 => {
                        let value = value_for(&mut rng);
                        let ts = store.put(&key, &value).await.unwrap();
                        model.entry(key).or_default().push((ts, Some(value)));
                        timestamps.push(ts);
                    }
                    9 | 10 => {
                        let ts = store.delete(&key).await.unwrap();
                        model.entry(key).or_default().push((ts, None));
                        timestamps.push(ts);
                    }
                    11 => {
                        let other = format!("k/{:02}", rng.random_range(0..40)).into_bytes();
                        let (a, b) = (value_for(&mut rng), value_for(&mut rng));
                        let items = [(&key[..], Some(&a[..])), (&other[..], Some(&b[..]))];
                        match store.write(items.into_iter()).await {
                            Ok(ts) => {
                                // Within one batch the later item of a key wins: both share
                                // the timestamp, and a key holds one version per timestamp.
                                if other == key {
                                    model.entry(key.clone()).or_default().push((ts, Some(b)));
                                } else {
                                    model.entry(key.clone()).or_default().push((ts, Some(a)));
                                    model.entry(other).or_default().push((ts, Some(b)));
                                }
                                timestamps.push(ts);
                            }
                            Err(dataplane::store::StoreError::BatchTooLarge { .. }) => {}
                            Err(error) => panic!("{error}"),
                        }
                    }
                    12..=15 => {
                        let got = store.get(&key, None).await.unwrap().map(|(ts, value)| (ts, value.to_vec()));
                        let want = model_get(&model, &key, None);
                        assert_eq!(got, want);
                        // A range anywhere in (or past) the value: the chunks holding it only.
                        let size = want.as_ref().map_or(0, |(_, value)| value.len() as u64);
                        let offset = rng.random_range(0..=size + 10);
                        let len = rng.random_range(0..=size + 10);
                        let got = store
                            .get_range(&key, None, offset, len)
                            .await
                            .unwrap()
                            .map(|(ts, value)| (ts, value.to_vec()));
                        let want = want.map(|(ts, value)| {
                            let from = offset.min(size) as usize;
                            (ts, value[from..offset.saturating_add(len).min(size) as usize].to_vec())
                        });
                        assert_eq!(got, want, "{key:?} from {offset} for {len}");
                    }
                    16 | 17 if !timestamps.is_empty() => {
                        let at = timestamps[rng.random_range(0..timestamps.len())];
                        let got = store.get(&key, Some(at)).await.unwrap().map(|(ts, value)| (ts, value.to_vec()));
                        assert_eq!(got, model_get(&model, &key, Some(at)), "{key:?} at {at}");
                    }
                    _ => {
                        let prefix = format!("k/{}", rng.random_range(0..4)).into_bytes();
                        let mut after = Vec::new();
                        let mut all = Vec::new();
                        loop {
                            let (page, more) = store.list(&prefix, &after, 3, None).await.unwrap();
                            all.extend(page.iter().map(|item| (item.key.to_vec(), item.ts, item.size)));
                            if !more {
                                break;
                            }
                            after = page.last().unwrap().key.to_vec();
                        }
                        assert_eq!(all, model_list(&model, &prefix, None));
                    }
                }
                if store.checkpoint_due() {
                    store.checkpoint().await.unwrap();
                }
            }
            let stats = store.stats();
            common::mark(round * 1000 + 600);
            if round % 2 == 0 {
                store.close().await.unwrap();
            } else {
                // Drop without closing: the next open replays the WAL after the checkpoint.
                drop(store);
            }
            (model, timestamps, rng, stats)
        });
        model = next_model;
        timestamps = next_timestamps;
        rng = next_rng;
        checkpoints += stats.checkpoints;
        released += stats.segments_released;
    }
    assert!(checkpoints >= 3, "only {checkpoints} checkpoints");
    assert!(released >= 3, "only {released} segments released");
}

#[test]
fn old_versions_and_their_chunks_are_collected_after_retention() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000_000));
    let mut config = small_store(dir.path(), Arc::clone(&clock));
    config.retention = std::time::Duration::from_secs(10);
    let chunk_dir = dir.path().join("chunks");
    // A chunk file nothing references (a crash after writing it, before its WAL record).
    std::fs::create_dir_all(&chunk_dir).unwrap();
    let orphan = chunk_dir.join(format!("{}.chunk", "ab".repeat(32)));
    std::fs::write(&orphan, b"leftover").unwrap();
    let count = |dir: &Path| std::fs::read_dir(dir).unwrap().count();
    run(async move {
        let store = ShardStore::open(config.clone()).await.unwrap();
        assert!(!orphan.exists(), "an unreferenced chunk file survived open");
        let old = vec![1u8; 100_000];
        let old_ts = store.put(b"file", &old).await.unwrap();
        let chunks_of_old = count(&chunk_dir);
        assert!(chunks_of_old >= 2);
        clock.advance(1_000_000);
        let new_ts = store.put(b"file", &vec![2u8; 100_000]).await.unwrap();
        assert_eq!(count(&chunk_dir), 2 * chunks_of_old);
        store.delete(b"gone").await.unwrap();
        // Inside the window both versions read.
        store.collect_garbage().await.unwrap();
        assert_eq!(&store.get(b"file", Some(old_ts)).await.unwrap().unwrap().1[..], &old[..]);
        // Past it, reads there fail at once; once a compaction passes over the versions (here
        // every table at once) the old version and its chunks go; the latest stays.
        clock.advance(20_000_000);
        collect_now(&store).await;
        assert_eq!(count(&chunk_dir), chunks_of_old);
        assert!(matches!(store.get(b"file", Some(old_ts)).await, Err(dataplane::store::StoreError::TooOld(_))));
        assert_eq!(store.get(b"file", None).await.unwrap().unwrap().0, new_ts);
        assert_eq!(store.stats().versions_collected, 1, "the old version of `file`");
        assert_eq!(store.get(b"gone", None).await.unwrap(), None, "the tombstone stays, so the key stays deleted");
        store.close().await.unwrap();
        // After a restart the same holds.
        let store = ShardStore::open(config).await.unwrap();
        assert_eq!(store.get(b"file", None).await.unwrap().unwrap().0, new_ts);
        assert_eq!(count(&chunk_dir), chunks_of_old);
        assert!(store.get(b"file", Some(old_ts)).await.is_err());
    });
}

#[test]
fn chunk_and_checkpoint_io_errors_fail_the_request_and_keep_the_store_consistent() {
    use dataplane::wal::StoreFault;
    let dir = tempfile::tempdir().unwrap();
    let (config, faults) = faulty_small_store(dir.path());
    let chunk_dir = dir.path().join("chunks");
    run(async move {
        let store = ShardStore::open(config.clone()).await.unwrap();
        let big = vec![3u8; 200_000];
        // A failed chunk write: the put fails, nothing is visible, no chunk is left behind.
        faults.fail_store(StoreFault::ChunkWrite, libc::EIO);
        let error = store.put(b"big", &big).await.unwrap_err();
        assert!(error.to_string().contains("Input/output error"), "{error}");
        assert_eq!(store.get(b"big", None).await.unwrap(), None);
        assert_eq!(std::fs::read_dir(&chunk_dir).unwrap().count(), 0);
        let ts = store.put(b"big", &big).await.unwrap();
        // A failed chunk read: an error, never bad bytes; the next read works.
        faults.fail_store(StoreFault::ChunkRead, libc::EIO);
        assert!(store.get(b"big", None).await.is_err());
        assert_eq!(store.get(b"big", None).await.unwrap().unwrap(), (ts, bytes::Bytes::from(big.clone())));
        // A failed checkpoint: an error, the WAL keeps everything, the next one works.
        faults.fail_store(StoreFault::Checkpoint, libc::ENOSPC);
        assert!(store.checkpoint().await.is_err());
        store.put(b"small", b"value").await.unwrap();
        assert!(store.checkpoint().await.unwrap().is_some());
        drop(store);
        let store = ShardStore::open(config).await.unwrap();
        assert_eq!(&store.get(b"small", None).await.unwrap().unwrap().1[..], b"value");
        assert_eq!(store.get(b"big", None).await.unwrap().unwrap().0, ts);
    });
}

/// Two puts of one chunked value run together: the second finds the first one's chunks in the
/// index (deduplicated) while the first has written the files but not yet synced their
/// directory. The directory sync failing stands for a crash at that point: the chunk's name may
/// not survive, so no put that references it may be acknowledged.
#[test]
fn a_deduplicated_chunk_is_durable_before_a_second_put_is_acknowledged() {
    use dataplane::wal::StoreFault;
    let dir = tempfile::tempdir().unwrap();
    let (config, faults) = faulty_small_store(dir.path());
    let chunk_dir = dir.path().join("chunks");
    run(async move {
        let store = ShardStore::open(config.clone()).await.unwrap();
        let shared: Vec<u8> = (0..150_000u32).map(|index| (index % 251) as u8).collect();
        // The first put's directory sync fails: neither put may succeed.
        faults.fail_store(StoreFault::ChunkDirSync, libc::EIO);
        let (first, second) =
            futures_lite::future::zip(store.put(b"first", &shared), store.put(b"second", &shared)).await;
        assert!(first.is_err(), "the put whose directory sync failed: {first:?}");
        assert!(
            second.is_err(),
            "a put was acknowledged referencing chunks whose directory entries were not durable: {second:?}"
        );
        assert_eq!(store.get(b"first", None).await.unwrap(), None);
        assert_eq!(store.get(b"second", None).await.unwrap(), None);
        assert_eq!(std::fs::read_dir(&chunk_dir).unwrap().count(), 0, "the unreferenced chunks are gone");
        // With the sync working, both succeed, and the chunks are stored once.
        let (first, second) =
            futures_lite::future::zip(store.put(b"first", &shared), store.put(b"second", &shared)).await;
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!(std::fs::read_dir(&chunk_dir).unwrap().count(), shared.len().div_ceil(64 << 10));
        drop(store);
        let store = ShardStore::open(config).await.unwrap();
        assert_eq!(store.get(b"first", None).await.unwrap().unwrap(), (first, bytes::Bytes::from(shared.clone())));
        assert_eq!(store.get(b"second", None).await.unwrap().unwrap(), (second, bytes::Bytes::from(shared)));
    });
}

/// A clock whose interval can be taken away.
#[derive(Debug)]
struct LosableClock {
    inner: ManualClock,
    lost: std::sync::atomic::AtomicBool,
}

impl dataplane::store::Clock for LosableClock {
    fn interval(&self) -> Result<dataplane::store::Interval, dataplane::store::ClockUnavailable> {
        if self.lost.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(dataplane::store::ClockUnavailable("sources disagree".into()));
        }
        self.inner.interval()
    }
}

#[test]
fn writes_are_stamped_at_latest_and_acknowledged_only_after_the_commit_wait() {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(LosableClock { inner: ManualClock::frozen(1_000_000), lost: false.into() });
    clock.inner.set_width(500);
    let mut config = small_store(dir.path(), Arc::new(ManualClock::new(0)));
    config.clock = clock.clone();
    run(async move {
        let store = ShardStore::open(config).await.unwrap();
        let acked = Rc::new(Cell::new(None));
        let put = {
            let (store, acked) = (store.clone(), acked.clone());
            glommio::spawn_local(async move { acked.set(Some(store.put(b"k", b"v").await.unwrap())) })
        };
        // Durable long before this, but earliest (1_000_000) has not passed the stamp.
        glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(acked.get(), None, "acknowledged before the commit wait ended");
        clock.inner.advance(500);
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        assert_eq!(acked.get(), None, "earliest equal to the stamp's microsecond is not past it");
        clock.inner.advance(1);
        put.await;
        let ts = acked.get().expect("acknowledged once earliest passed the stamp");
        assert_eq!(ts >> dataplane::store::clock::LOGICAL_BITS, 1_000_500, "stamped at the latest bound");
        // Without an interval nothing is stamped or applied.
        clock.lost.store(true, Ordering::Relaxed);
        let refused = store.put(b"other", b"v").await;
        assert!(matches!(refused, Err(dataplane::store::StoreError::Clock(_))), "{refused:?}");
        clock.lost.store(false, Ordering::Relaxed);
        assert!(store.get(b"other", None).await.unwrap().is_none());
        assert_eq!(store.get(b"k", None).await.unwrap().unwrap().0, ts);
        store.close().await.unwrap();
    });
}

/// A peer that still needs LSN 1 holds every WAL segment through checkpoints, unless the hold
/// is bounded: then the checkpoint releases all but `wal_hold_bytes_max` of them (whole
/// segments), and the peer has to catch up from a snapshot. A pin (a snapshot being shipped)
/// keeps its LSN whatever the bound.
#[test]
fn the_replication_hold_keeps_at_most_its_bound_of_wal() {
    let dir = tempfile::tempdir().unwrap();
    // (first LSN on disk, segment files, checkpoint LSN) per bound.
    let mut kept = Vec::new();
    // The last run bounds the hold to nothing but pins LSN 1 (a snapshot being shipped).
    for (run_index, bytes_max) in [u64::MAX, 256 << 10, 0, 0].into_iter().enumerate() {
        let sub = dir.path().join(format!("run-{run_index}"));
        let clock = Arc::new(ManualClock::new(1_000_000));
        let mut config = small_store(&sub, Arc::clone(&clock));
        config.wal_hold_lsn = 1;
        config.wal_hold_bytes_max = bytes_max;
        let payload_max = config.wal.record_payload_bytes_max;
        let wal = sub.join("wal");
        let (first, lsn) = run(async move {
            let store = ShardStore::open(config).await.unwrap();
            if run_index == 3 {
                store.set_wal_hold(1, 1);
            }
            for i in 0..400 {
                clock.advance(1);
                store.put(format!("k/{i:03}").as_bytes(), &[7u8; 3000]).await.unwrap();
            }
            let lsn = store.checkpoint().await.unwrap().unwrap();
            let first = dataplane::wal::WalReader::new(&wal, 0, payload_max).first_lsn().unwrap().unwrap();
            store.close().await.unwrap();
            (first, lsn)
        });
        let files = std::fs::read_dir(sub.join("wal")).unwrap().count();
        kept.push((first, files, lsn));
    }
    let [
        (all_first, all_files, _),
        (one_first, one_files, one_lsn),
        (none_first, none_files, none_lsn),
        (pinned_first, _, _),
    ] = kept[..]
    else {
        unreachable!()
    };
    assert_eq!(pinned_first, 1, "a pinned LSN was released");
    assert_eq!(all_first, 1, "the unbounded hold released WAL a peer needs");
    assert!(all_files >= 5, "1.2 MB of writes in 256 KiB segments: {all_files} files");
    assert!(one_first > 1 && one_first <= one_lsn, "first LSN {one_first}, checkpoint at {one_lsn}");
    assert!(none_first >= one_first && none_first <= none_lsn, "first LSN {none_first}, checkpoint at {none_lsn}");
    assert!(
        none_files < one_files && one_files < all_files,
        "segment files: {all_files} unbounded, {one_files} with one segment held, {none_files} with none"
    );
}

/// The end of an installed snapshot: keys held here that the snapshot lacks get a tombstone at
/// its horizon, durably; keys it has, keys already deleted, and keys with a version at or above
/// the horizon are left alone; doing it again changes nothing.
#[test]
fn keys_a_snapshot_lacks_get_a_tombstone_at_its_horizon() {
    use dataplane::store::op::{self, Value};
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let config = replica_store(dir.path(), clock);
    let reopen = config.clone();
    run(async move {
        let store = ShardStore::open(config).await.unwrap();
        for (ts, key, value) in [
            (100, "kept", Some("1")),
            (110, "gone-1", Some("2")),
            (120, "gone-2", Some("3")),
            (130, "deleted", Some("4")),
            (140, "deleted", None),
            (900, "newer", Some("5")),
        ] {
            store.apply_replicated(ts, &record(key, value)).await.unwrap();
        }
        // Enough keys for several steps of the scan: the even ones are in the snapshot.
        let bulk: Vec<String> = (0..3000).map(|i| format!("bulk-{i:04}")).collect();
        for group in bulk.chunks(500) {
            let mut out = Vec::new();
            op::encode(group.iter().map(|key| (key.as_bytes(), Value::Inline(b"x"))), &mut out).unwrap();
            store.apply_replicated(200, &bytes::Bytes::from(out)).await.unwrap();
        }
        let mut snapshot: std::collections::HashSet<bytes::Bytes> = [bytes::Bytes::from_static(b"kept")].into();
        snapshot.extend(bulk.iter().step_by(2).map(|key| bytes::Bytes::from(key.clone())));
        assert_eq!(store.tombstone_absent(500, &snapshot).await.unwrap(), 2 + 1500);
        assert_eq!(store.tombstone_absent(500, &snapshot).await.unwrap(), 0, "again: nothing left to delete");
        store.close().await.unwrap();
    });
    run(async move {
        // Durable: after a restart (WAL replay) the same.
        let store = ShardStore::open(reopen).await.unwrap();
        let live: Vec<_> =
            store.list(b"", b"", 10_000, None).await.unwrap().0.into_iter().map(|item| item.key.to_vec()).collect();
        let mut want: Vec<Vec<u8>> = (0..3000).step_by(2).map(|i| format!("bulk-{i:04}").into_bytes()).collect();
        want.extend([b"kept".to_vec(), b"newer".to_vec()]);
        assert_eq!(live, want);
        // Below the horizon the old versions still read as they were.
        assert_eq!(store.get(b"gone-1", Some(499)).await.unwrap().map(|(ts, _)| ts), Some(110));
        assert_eq!(store.get(b"gone-1", Some(500)).await.unwrap(), None);
    });
}

/// A replica shard with a multi-master keyspace: it takes client writes of keys in the
/// keyspace (stamped with its origin), refuses the others (`NotHome`), and versions shipped
/// from other regions land in timestamp order whatever order they arrive in, so the newest
/// stamp is the value, before and after a restart. The closed point promises only this
/// region's writes: a shipped record still waiting for its WAL barrier does not hold it back.
/// An installed snapshot's end never tombstones a multi-master key (it may be a write the
/// snapshot's source has not received yet).
#[test]
fn a_replica_takes_multi_master_writes_and_the_newest_stamp_wins() {
    use wire::glt::{origin_of, timestamp_at, with_origin};
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let config = multi_master_replica(dir.path(), clock);
    let reopen = config.clone();
    // `later` is a little ahead of this region's clock (1 s), `earlier` long before it.
    let (later, earlier) = (with_origin(timestamp_at(1_000_200), 0), with_origin(timestamp_at(1_000), 2));
    run(async move {
        let store = ShardStore::open(config).await.unwrap();
        let not_home = |result| matches!(result, Err(dataplane::store::StoreError::NotHome { .. }));
        assert!(not_home(store.put(b"plain", b"x").await));
        let mixed = [(&b"mm/k"[..], Some(&b"1"[..])), (&b"plain"[..], Some(&b"2"[..]))];
        assert!(not_home(store.write(mixed.into_iter()).await), "a batch with a key outside the keyspace");
        let local = store.put(b"mm/k", b"local").await.unwrap();
        assert_eq!(origin_of(local), 1);
        assert_eq!(store.get(b"mm/k", None).await.unwrap().unwrap().1, &b"local"[..]);
        // A newer write from region 0, then an older one from region 2: the newer stays.
        store.apply_replicated(later, &record("mm/k", Some("from a"))).await.unwrap();
        store.apply_replicated(earlier, &record("mm/k", Some("from c"))).await.unwrap();
        assert_eq!(store.get(b"mm/k", None).await.unwrap(), Some((later, bytes::Bytes::from_static(b"from a"))));
        assert_eq!(store.get(b"mm/k", Some(local)).await.unwrap().unwrap().1, &b"local"[..]);
        // Local stamps go on above what was observed.
        let next = store.put(b"mm/j", b"after").await.unwrap();
        assert!(next > later && origin_of(next) == 1);
        // The closed point is about this region's writes: an old record shipped from region 2,
        // still waiting for its WAL barrier, does not pull it back below them.
        let shipped = glommio::spawn_local({
            let (store, record) = (store.clone(), record("mm/old", Some("from c")));
            async move { store.apply_replicated(earlier + 16, &record).await }
        });
        futures_lite::future::yield_now().await;
        assert!(store.progress().waiting, "the shipped record is not waiting for its barrier");
        assert!(store.closed_point().unwrap().closed_ts >= next);
        assert!(store.applied_ts().unwrap() >= next);
        shipped.await.unwrap();
        // A snapshot's end leaves multi-master keys alone.
        assert_eq!(store.tombstone_absent(with_origin(later + 1, 0), &Default::default()).await.unwrap(), 0);
        store.close().await.unwrap();
    });
    run(async move {
        let store = ShardStore::open(reopen).await.unwrap();
        assert_eq!(store.get(b"mm/k", None).await.unwrap(), Some((later, bytes::Bytes::from_static(b"from a"))));
        let next = store.put(b"mm/k", b"newest").await.unwrap();
        assert!(next > later && origin_of(next) == 1, "recovery observed every stamp");
        assert_eq!(store.get(b"mm/k", None).await.unwrap().unwrap().1, &b"newest"[..]);
    });
}

/// With multi-master keyspaces nothing at or above the collection floor (what every source
/// region has shipped) is collected, whatever the retention says: a deleted key's tombstone
/// stays until no region can still send an older write, which it then outdates. Past the
/// floor it goes like any.
#[test]
fn collection_stays_below_the_floor_every_region_has_shipped() {
    use wire::glt::{timestamp_at, with_origin};
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000_000));
    let mut config = multi_master_replica(dir.path(), clock.clone());
    config.retention = std::time::Duration::from_secs(1);
    config.collect_floor = 0;
    run(async move {
        let store = ShardStore::open(config).await.unwrap();
        let (written, deleted) = (with_origin(timestamp_at(1_000_000), 0), with_origin(timestamp_at(2_000_000), 0));
        store.apply_replicated(written, &record("mm/k", Some("v"))).await.unwrap();
        store.apply_replicated(deleted, &record("mm/k", None)).await.unwrap();
        // Both are 8 s older than the retention allows, but region 2 has not shipped past them.
        collect_now(&store).await;
        assert_eq!(store.stats().versions_collected, 0);
        // Region 2's write from before the delete arrives: the kept tombstone outdates it.
        store.apply_replicated(with_origin(timestamp_at(1_500_000), 2), &record("mm/k", Some("late"))).await.unwrap();
        assert_eq!(store.get(b"mm/k", None).await.unwrap(), None);
        // Once every region has shipped past them, the versions the tombstone outdates go; the
        // tombstone stays (a write older still, arriving later, stays outdated).
        store.set_collect_floor(u64::MAX);
        collect_now(&store).await;
        assert_eq!(store.stats().versions_collected, 2);
        assert_eq!(store.get(b"mm/k", None).await.unwrap(), None);
    });
}

/// Recovery must not leave versions pointing into the files it read: a later checkpoint frees
/// the released WAL segments and the old checkpoint by punching holes, 8 MiB at a time, and a
/// key or value still mapped from there would read zeros. Files here are larger than one such
/// step so that holes are punched (smaller ones are only unlinked).
#[test]
fn versions_recovered_from_the_wal_and_a_checkpoint_survive_those_files_being_freed() {
    fn value(key: usize) -> Vec<u8> {
        (0..4096).map(|index| (index * 7 + key) as u8).collect()
    }
    async fn check(store: &ShardStore, keys: &[Vec<u8>], when: &str) {
        for (index, key) in keys.iter().enumerate() {
            let got = store.get(key, None).await.unwrap().map(|(_, value)| value.to_vec());
            assert!(got == Some(value(index)), "{} {when}: {:?}", String::from_utf8_lossy(key), got.map(|v| v.len()));
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(dir.path(), 0);
    config.wal.segment_bytes = 16 << 20;
    config.checkpoint_wal_bytes = 1 << 30;
    config.clock = Arc::new(ManualClock::new(1_000_000));
    let keys: Vec<Vec<u8>> = (0..5120).map(|key| format!("key/{key:05}").into_bytes()).collect();

    // 20 MiB of values: the first 16 MiB segment fills and the WAL moves to a second one. No
    // checkpoint yet, and the store is dropped without one: the next open replays the WAL.
    let (setup, keys_setup) = (config.clone(), keys.clone());
    run(async move {
        let store = ShardStore::open(setup).await.unwrap();
        for (batch, chunk) in keys_setup.chunks(16).enumerate() {
            let values: Vec<Vec<u8>> = (0..chunk.len()).map(|offset| value(batch * 16 + offset)).collect();
            let items: Vec<(&[u8], Option<&[u8]>)> =
                chunk.iter().zip(&values).map(|(key, value)| (&key[..], Some(&value[..]))).collect();
            store.write(items.into_iter()).await.unwrap();
        }
        drop(store);
    });

    let (replayed, keys_replayed) = (config.clone(), keys.clone());
    run(async move {
        let store = ShardStore::open(replayed).await.unwrap();
        assert!(store.stats().replayed_records > 0, "the open must replay the WAL");
        check(&store, &keys_replayed, "after the replay").await;
        store.put(b"other", b"x").await.unwrap();
        store.checkpoint().await.unwrap();
        assert!(store.stats().segments_released >= 1, "the first segment must be freed");
        check(&store, &keys_replayed, "after the replayed segment was freed").await;
        store.close().await.unwrap();
    });

    run(async move {
        let store = ShardStore::open(config).await.unwrap();
        assert_eq!(store.stats().replayed_records, 0, "the open must load the checkpoint only");
        check(&store, &keys, "after loading the checkpoint").await;
        store.put(b"other", b"y").await.unwrap();
        store.checkpoint().await.unwrap();
        check(&store, &keys, "after the loaded checkpoint was freed").await;
        store.close().await.unwrap();
    });
}

/// A data directory written before the engine holds a full checkpoint: the shard loads it into
/// its engine at open, deletes it, and reads every version from the engine from then on.
#[test]
fn a_full_checkpoint_from_before_the_engine_is_upgraded_at_open() {
    use dataplane::store::Version;
    use dataplane::store::checkpoint;
    use dataplane::store::op::Body;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000_000));
    let config = small_store(dir.path(), Arc::clone(&clock));
    let versions: Vec<(&[u8], Version)> = vec![
        (b"a", Version { ts: 100, body: Body::Inline(bytes::Bytes::from_static(b"one")) }),
        (b"a", Version { ts: 200, body: Body::Inline(bytes::Bytes::from_static(b"two")) }),
        (b"b", Version { ts: 150, body: Body::Tombstone }),
        (b"c", Version { ts: 120, body: Body::Inline(bytes::Bytes::from_static(b"three")) }),
    ];
    let mut file = Vec::new();
    let mut scratch = Vec::new();
    checkpoint::encode_header(0, 1, 0, &mut file);
    for (key, version) in &versions {
        checkpoint::encode_version(key, version, &mut scratch, &mut file).unwrap();
    }
    checkpoint::encode_footer(0, 1, 0, versions.len() as u64, &mut file);
    std::fs::create_dir_all(dir.path()).unwrap();
    let path = dir.path().join(checkpoint::file_name(0, 1));
    std::fs::write(&path, &file).unwrap();
    let expect = |store: ShardStore| async move {
        assert_eq!(&store.get(b"a", None).await.unwrap().unwrap().1[..], b"two");
        assert_eq!(&store.get(b"a", Some(150)).await.unwrap().unwrap().1[..], b"one");
        assert_eq!(store.get(b"b", None).await.unwrap(), None);
        assert_eq!(&store.get(b"c", None).await.unwrap().unwrap().1[..], b"three");
        // The clock continues above the newest version loaded.
        assert!(store.put(b"d", b"new").await.unwrap() > 200);
        store.close().await.unwrap();
    };
    run(async move {
        expect(ShardStore::open(config.clone()).await.unwrap()).await;
        assert!(!path.exists(), "the full checkpoint is deleted once the engine holds it");
        expect(ShardStore::open(config).await.unwrap()).await;
    });
}

/// An engine table or blob file gone or torn after a clean close (the WAL below the flush is
/// released, so only the engine holds the data): opening or reading the store is a named engine
/// error, never a key silently missing or a wrong value.
#[test]
fn a_missing_or_torn_engine_file_is_a_named_error_never_silent_loss() {
    fn files(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut out: Vec<_> = std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().path()).collect();
        out.sort();
        out
    }
    let value = |index: u32| -> Vec<u8> {
        // Half of them large enough for blob files.
        let len = if index.is_multiple_of(2) { 700 } else { 90 };
        (0..len).map(|byte| (index as usize * 31 + byte) as u8).collect()
    };
    for damage in ["missing table", "torn table", "missing blob", "torn blob"] {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(10_000_000));
        let mut config = small_store(dir.path(), Arc::clone(&clock));
        config.retention = std::time::Duration::from_secs(3600);
        let written = config.clone();
        run(async move {
            let store = ShardStore::open(written).await.unwrap();
            for index in 0..3000_u32 {
                store.put(format!("key-{index:05}").as_bytes(), &value(index)).await.unwrap();
            }
            store.close().await.unwrap();
        });
        let engine = dir.path().join("engine");
        let (folder, torn) = match damage {
            "missing table" => ("tables", false),
            "torn table" => ("tables", true),
            "missing blob" => ("blobs", false),
            _ => ("blobs", true),
        };
        let victims = files(&engine.join(folder));
        assert!(!victims.is_empty(), "{damage}: the engine wrote {folder}");
        let victim = &victims[victims.len() / 2];
        if torn {
            let length = std::fs::metadata(victim).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(victim).unwrap().set_len(length / 2).unwrap();
        } else {
            std::fs::remove_file(victim).unwrap();
        }
        run(async move {
            let store = match ShardStore::open(config).await {
                Err(error) => {
                    let message = error.to_string();
                    assert!(message.contains("engine"), "{damage}: {message}");
                    return;
                }
                Ok(store) => store,
            };
            let mut errors = 0;
            for index in 0..3000_u32 {
                match store.get(format!("key-{index:05}").as_bytes(), None).await {
                    Ok(Some((_, got))) => assert_eq!(&got[..], &value(index)[..], "{damage}: key {index}"),
                    Ok(None) => panic!("{damage}: key {index} silently missing"),
                    Err(error) => {
                        assert!(error.to_string().contains("engine"), "{damage}: {error}");
                        errors += 1;
                    }
                }
            }
            assert!(errors > 0, "{damage}: the damaged file was read without an error");
        });
    }
}
