//! The on-disk engine behaves like a map of versions (a `BTreeMap` per key), through seals,
//! flushes, compactions and reopens, with the WAL's contract modelled: after a reopen, what was
//! applied above the flushed LSN is applied again (the shard replays it from its WAL). Keys are
//! drawn from bytes that stress the key encoding (0x00, 0x01, 0xFF). Seed: `MERIDIAN_ENGINE_SEED`.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use dataplane::store::Version;
use dataplane::store::engine::DiskVersions;
use dataplane::store::op::{Body, ChunkList, ChunkRef};
use lsm_tree::Cache;
use rand::{Rng, SeedableRng};

type Model = BTreeMap<Vec<u8>, BTreeMap<u64, Body>>;

fn random_key(rng: &mut impl Rng) -> Vec<u8> {
    const ALPHABET: &[u8] = &[0x00, 0x01, 0xFF, b'a', b'b'];
    (0..rng.random_range(0..4)).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())]).collect()
}

fn random_body(rng: &mut impl Rng) -> Body {
    match rng.random_range(0..10) {
        0 => Body::Tombstone,
        1 => Body::Chunked(Arc::new(ChunkList {
            size: rng.random_range(0..1 << 20),
            chunks: (0..rng.random_range(1..4)).map(|_| ChunkRef { hash: rng.random(), len: rng.random() }).collect(),
        })),
        // Some values large enough for blob files.
        2 => Body::Inline(Bytes::from((0..rng.random_range(512..3000)).map(|_| rng.random()).collect::<Vec<u8>>())),
        _ => Body::Inline(Bytes::from((0..rng.random_range(0..40)).map(|_| rng.random()).collect::<Vec<u8>>())),
    }
}

fn model_at(model: &Model, key: &[u8], at: u64) -> Option<Version> {
    let (ts, body) = model.get(key)?.range(..=at).next_back()?;
    Some(Version { ts: *ts, body: body.clone() })
}

/// Reads at or above the retention horizon see exactly what the model holds.
fn check(engine: &DiskVersions, model: &Model, rng: &mut impl Rng, seed: u64, step: usize) {
    let horizon = engine.retention().horizon();
    for _ in 0..20 {
        let key = random_key(rng);
        let at = rng.random_range(horizon..120);
        assert_eq!(
            engine.get_at(&key, at).unwrap(),
            model_at(model, &key, at),
            "seed {seed} step {step}: {key:?} at {at}"
        );
        // What memory alone answers is what the tree answers.
        if let Some(version) = engine.get_in_memory(&key, at) {
            assert_eq!(Some(version), model_at(model, &key, at), "seed {seed} step {step}: in memory {key:?} at {at}");
        }
    }
    let prefix = random_key(rng);
    let prefix = &prefix[..prefix.len().min(1)];
    let start_after = rng.random_bool(0.5).then(|| random_key(rng));
    let at = rng.random_range(horizon..120);
    let limit = rng.random_range(1..8);
    let expected: Vec<(Vec<u8>, Version)> = model
        .keys()
        .filter(|key| key.starts_with(prefix) && start_after.as_ref().is_none_or(|after| *key > after))
        .filter_map(|key| model_at(model, key, at).map(|version| (key.clone(), version)))
        .filter(|(_, version)| version.body != Body::Tombstone)
        .collect();
    let (page, more) = engine.list_at(prefix, start_after.as_deref(), at, limit).unwrap();
    let want: Vec<_> = expected.iter().take(limit).cloned().collect();
    assert_eq!(page, want, "seed {seed} step {step}: list {prefix:?} after {start_after:?} at {at} limit {limit}");
    assert_eq!(more, expected.len() > limit, "seed {seed} step {step}: more");
}

#[test]
fn the_engine_behaves_like_a_map_of_versions_through_flushes_compactions_and_reopens() {
    let seed: u64 = common::seed("MERIDIAN_ENGINE_SEED");
    eprintln!("engine model: seed {seed} (MERIDIAN_ENGINE_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::with_capacity_bytes(1 << 20));
    let mut engine = DiskVersions::open(dir.path(), Arc::clone(&cache)).unwrap();
    let mut model = Model::new();
    // The WAL: every applied (lsn, key, version), replayed above the flushed LSN on reopen.
    let mut wal: Vec<(u64, Vec<u8>, Version)> = Vec::new();
    let mut flushes = 0;
    let mut chunked: std::collections::HashMap<[u8; 32], (Vec<u8>, u64)> = std::collections::HashMap::new();
    let mut destroyed_chunk_lists = 0;
    let mut horizon = 0;
    for step in 0..3000 {
        match rng.random_range(0..100) {
            0..=84 => {
                let (key, ts, mut body) = (random_key(&mut rng), rng.random_range(1..100), random_body(&mut rng));
                // One body per key and timestamp (stamps are unique): a version written again
                // is a replay of the same one.
                if let Some(existing) = model.get(&key).and_then(|versions| versions.get(&ts)) {
                    body = existing.clone();
                }
                let lsn = wal.len() as u64 + 1;
                let version = Version { ts, body: body.clone() };
                engine.apply(&key, &version);
                if let Body::Chunked(list) = &body {
                    chunked.insert(list.chunks[0].hash, (key.clone(), ts));
                }
                model.entry(key.clone()).or_default().insert(ts, body);
                wal.push((lsn, key, version));
            }
            85..=91 => {
                // The bound of every timestamp applied so far, as the shard's clock gives it.
                let max_ts = wal.iter().map(|(_, _, version)| version.ts).max().unwrap_or(0);
                engine.seal(wal.len() as u64 + 1, max_ts);
                let flushed = engine.flush().unwrap();
                assert_eq!(flushed, wal.len() as u64 + 1, "seed {seed} step {step}: a flush records the replay LSN");
                flushes += 1;
            }
            92..=95 => {
                if rng.random_bool(0.5) {
                    horizon = (horizon + rng.random_range(0..6)).min(95);
                    engine.retention().advance(horizon);
                }
                let destroyed = if rng.random_bool(0.2) {
                    Some(engine.compact_all().unwrap())
                } else {
                    engine.compact_if_needed(2).unwrap()
                };
                for list in destroyed.unwrap_or_default() {
                    // Only a version shadowed at the horizon by a newer one below it goes.
                    let (key, ts) = chunked[&list.chunks[0].hash].clone();
                    let shadowed = model[&key].range(ts + 1..horizon).next().is_some();
                    assert!(shadowed, "seed {seed} step {step}: {key:?} at {ts} destroyed, horizon {horizon}");
                    destroyed_chunk_lists += 1;
                }
            }
            _ => {
                drop(engine);
                engine = DiskVersions::open(dir.path(), Arc::clone(&cache)).unwrap();
                // The shard sets its horizon again at open (from the clock and its retention).
                engine.retention().advance(horizon);
                let replay_from = engine.replay_from();
                for (_, key, version) in wal.iter().filter(|(lsn, _, _)| *lsn >= replay_from) {
                    engine.apply(key, version);
                }
            }
        }
        if step % 25 == 0 {
            check(&engine, &model, &mut rng, seed, step);
        }
    }
    check(&engine, &model, &mut rng, seed, 3000);
    assert!(flushes > 100, "flushes ran: {flushes}");
    eprintln!(
        "engine model: {flushes} flushes, horizon {horizon}, {destroyed_chunk_lists} chunk lists destroyed by retention"
    );
    assert!(destroyed_chunk_lists > 0, "retention destroyed shadowed versions");
    assert!(engine.disk_bytes() > 0);
    let memory = engine.memory();
    assert!(memory.cache_bytes <= 1 << 20, "the cache stays within its budget: {memory:?}");
}

#[test]
fn retention_keeps_the_newest_version_below_the_horizon_and_hands_back_what_it_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = DiskVersions::open(dir.path(), Arc::new(Cache::with_capacity_bytes(1 << 20))).unwrap();
    let list = |ts: u64| Arc::new(ChunkList { size: ts, chunks: vec![ChunkRef { hash: [ts as u8; 32], len: 1 }] });
    for ts in 1..=100_u64 {
        engine.apply(b"k", &Version { ts, body: Body::Chunked(list(ts)) });
        engine.apply(b"other", &Version { ts, body: Body::Inline(Bytes::from(vec![ts as u8; 10])) });
    }
    engine.seal(101, 100);
    engine.flush().unwrap();
    assert!(engine.compact_all().unwrap().is_empty(), "no horizon yet: nothing destroyed");
    engine.retention().advance(50);
    let mut destroyed: Vec<u64> = engine.compact_all().unwrap().iter().map(|list| list.size).collect();
    destroyed.sort_unstable();
    assert_eq!(destroyed, (1..=48).collect::<Vec<u64>>(), "versions 1..=48 are shadowed by 49 at the horizon");
    for at in [49, 50, 77, 100, 1000] {
        assert_eq!(engine.get_at(b"k", at).unwrap().map(|version| version.ts), Some(at.min(100)));
        assert_eq!(engine.get_at(b"other", at).unwrap().map(|version| version.ts), Some(at.min(100)));
    }
    assert_eq!(engine.get_at(b"k", 10).unwrap(), None, "below the horizon the old versions are gone");
    // A tombstone below the horizon stays: an older version written later cannot resurface.
    engine.apply(b"gone", &Version { ts: 60, body: Body::Tombstone });
    engine.seal(102, 100);
    engine.flush().unwrap();
    engine.retention().advance(90);
    engine.compact_all().unwrap();
    engine.apply(b"gone", &Version { ts: 55, body: Body::Inline(Bytes::from_static(b"late")) });
    assert_eq!(engine.get_at(b"gone", 95).unwrap().map(|version| version.body), Some(Body::Tombstone));
}

/// A chunk list long enough for a blob file (20 chunks: 733 bytes), keyed by `id`.
fn long_list(id: u64) -> Arc<ChunkList> {
    Arc::new(ChunkList { size: id, chunks: (0..20).map(|n| ChunkRef { hash: [id as u8; 32], len: n }).collect() })
}

/// Retention learns from the key which destroyed versions are chunk lists (the chunked mark)
/// and reads no other blob-held value; a tree written before the mark existed is still
/// collected right, by reading each destroyed value.
#[test]
fn retention_hands_back_chunk_lists_held_in_blob_files_with_or_without_the_mark() {
    use dataplane::store::engine::codec;
    use lsm_tree::AbstractTree as _;
    let big = |ts: u64| Body::Inline(Bytes::from(vec![ts as u8; 2000]));
    // Written now: marked.
    let dir = tempfile::tempdir().unwrap();
    let engine = DiskVersions::open(dir.path(), Arc::new(Cache::with_capacity_bytes(1 << 20))).unwrap();
    for ts in 1..=20_u64 {
        engine.apply(b"k", &Version { ts, body: Body::Chunked(long_list(ts)) });
        engine.apply(b"v", &Version { ts, body: big(ts) });
    }
    engine.seal(21, 20);
    engine.flush().unwrap();
    engine.retention().advance(10);
    let mut destroyed: Vec<u64> = engine.compact_all().unwrap().iter().map(|list| list.size).collect();
    destroyed.sort_unstable();
    assert_eq!(destroyed, (1..=8).collect::<Vec<u64>>());
    assert_eq!(engine.retention().destroyed_versions(), 16, "8 chunk lists and 8 values destroyed");
    let mut held: Vec<u64> = engine.chunk_lists().unwrap().iter().map(|list| list.size).collect();
    held.sort_unstable();
    assert_eq!(held, (9..=20).collect::<Vec<u64>>(), "the chunk lists left, and no value as one");
    assert_eq!(engine.get_at(b"k", 20).unwrap().map(|version| version.body), Some(Body::Chunked(long_list(20))));
    assert!(engine.contains(b"k", 20).unwrap() && engine.contains(b"v", 20).unwrap());
    assert!(!engine.contains(b"k", 5).unwrap());
    drop(engine);

    // Written before the mark: the same versions under unmarked keys, by lsm-tree directly.
    let old = tempfile::tempdir().unwrap();
    {
        let (seqno, visible) = (lsm_tree::SequenceNumberCounter::default(), lsm_tree::SequenceNumberCounter::default());
        let tree = lsm_tree::Config::new(old.path(), seqno.clone(), visible.clone())
            .with_kv_separation(Some(lsm_tree::KvSeparationOptions::default().separation_threshold(512)))
            .open()
            .unwrap();
        for ts in 1..=20_u64 {
            tree.insert(codec::encode_key(b"k", ts), codec::encode_body(&Body::Chunked(long_list(ts))), seqno.next());
        }
        tree.rotate_memtable();
        let lock = tree.get_flush_lock();
        tree.flush(&lock, 0).unwrap();
    }
    let engine = DiskVersions::open(old.path(), Arc::new(Cache::with_capacity_bytes(1 << 20))).unwrap();
    assert_eq!(engine.get_at(b"k", 20).unwrap().map(|version| version.body), Some(Body::Chunked(long_list(20))));
    engine.retention().advance(10);
    let mut destroyed: Vec<u64> = engine.compact_all().unwrap().iter().map(|list| list.size).collect();
    destroyed.sort_unstable();
    assert_eq!(destroyed, (1..=8).collect::<Vec<u64>>(), "an unmarked tree's chunk lists are found by reading them");
    let mut held: Vec<u64> = engine.chunk_lists().unwrap().iter().map(|list| list.size).collect();
    held.sort_unstable();
    assert_eq!(held, (9..=20).collect::<Vec<u64>>());
}

#[test]
fn a_damaged_table_is_a_named_error_not_silent_loss() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::with_capacity_bytes(1 << 20));
    {
        let engine = DiskVersions::open(dir.path(), Arc::clone(&cache)).unwrap();
        for index in 0..2000_u64 {
            let version = Version { ts: 5, body: Body::Inline(Bytes::from(vec![index as u8; 100])) };
            engine.apply(&index.to_be_bytes(), &version);
        }
        engine.seal(2001, 5);
        assert_eq!(engine.flush().unwrap(), 2001);
    }
    // Flip bytes in the middle of every table file.
    let mut damaged = 0;
    for entry in walk(dir.path()) {
        if entry.to_string_lossy().contains("tables") {
            let mut bytes = std::fs::read(&entry).unwrap();
            let middle = bytes.len() / 3;
            for byte in &mut bytes[middle..middle + 64] {
                *byte ^= 0x5A;
            }
            std::fs::write(&entry, bytes).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0, "the flush wrote table files");
    let outcome = DiskVersions::open(dir.path(), Arc::new(Cache::with_capacity_bytes(1 << 20))).and_then(|engine| {
        (0..2000_u64)
            .map(|index| engine.get_at(&index.to_be_bytes(), 10).map(|found| found.is_some()))
            .collect::<Result<Vec<bool>, _>>()
    });
    match outcome {
        Err(error) => eprintln!("named error, as required: {error}"),
        Ok(found) => {
            panic!("damaged tables read without an error ({} of 2000 keys found)", found.iter().filter(|f| **f).count())
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Needs root (it formats and loop-mounts a 16 MiB ext4); `make test` runs it as root, as CI
/// does. The engine fills the disk: the flush that cannot be written is a named error, the
/// flushed LSN stays where the last good flush left it, and after a reopen with room again the
/// WAL's replay from there restores every applied version.
#[test]
#[ignore = "needs root to loop-mount a small ext4 (make test runs it as root)"]
fn a_full_disk_fails_the_flush_by_name_and_loses_nothing_the_wal_replays() {
    let fs = common::loopfs::LoopFs::new(16).expect("a loop-mounted ext4 (root, a loop device)");
    let path = fs.mount_point.join("engine");
    let cache = Arc::new(Cache::with_capacity_bytes(1 << 20));
    let engine = DiskVersions::open(&path, Arc::clone(&cache)).unwrap();
    let mut wal: Vec<(u64, Vec<u8>, Version)> = Vec::new();
    let mut last_good = 1;
    let failure = loop {
        for _ in 0..200 {
            let lsn = wal.len() as u64 + 1;
            let key = lsn.to_be_bytes().to_vec();
            // Incompressible values beside the blob threshold, so the disk fills fast.
            let value: Vec<u8> =
                (0..2048).map(|index| (lsn.wrapping_mul(2_654_435_761) >> (index % 24)) as u8).collect();
            let version = Version { ts: lsn, body: Body::Inline(Bytes::from(value)) };
            engine.apply(&key, &version);
            wal.push((lsn, key, version));
        }
        engine.seal(wal.len() as u64 + 1, wal.len() as u64);
        match engine.flush() {
            Ok(flushed) => last_good = flushed,
            Err(error) => break error,
        }
        assert!(wal.len() < 100_000, "16 MiB filled up long before 200 MB were flushed");
    };
    let message = failure.to_string();
    eprintln!("full disk: {message}");
    assert!(message.contains("flush") && message.contains(&path.display().to_string()), "{message}");
    drop(engine);
    // Room again, as after an operator freed space: the tree is reopened from a copy of its
    // files on a file system with room.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&path, copy.path());
    let engine = DiskVersions::open(copy.path(), cache).unwrap();
    let replay_from = engine.replay_from();
    assert_eq!(replay_from, last_good, "the replay LSN is the last flush that succeeded");
    for (_, key, version) in wal.iter().filter(|(lsn, _, _)| *lsn >= replay_from) {
        engine.apply(key, version);
    }
    for (_, key, version) in &wal {
        assert_eq!(engine.get_at(key, version.ts).unwrap().as_ref(), Some(version));
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Reads on other threads while flushes and compactions replace the tree's versions: every
/// read finds its view (lsm-tree panicked when a read's sequence number outlived every
/// version a compaction kept, which `three_regions_converge_after_a_partition` hit once).
#[test]
fn reads_beside_flushes_and_compactions_keep_their_view() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(DiskVersions::open(dir.path(), Arc::new(Cache::with_capacity_bytes(1 << 20))).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|reader| {
            let (engine, stop) = (Arc::clone(&engine), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = (reads % 500).to_be_bytes();
                    if let Some(version) = engine.get_at(&key, u64::MAX).unwrap() {
                        assert_eq!(version.body, Body::Inline(Bytes::copy_from_slice(&key)), "reader {reader}");
                    }
                    if reads.is_multiple_of(50) {
                        engine.list_at(b"", None, u64::MAX, 20).unwrap();
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for round in 0..200_u64 {
        for index in 0..500_u64 {
            let key = index.to_be_bytes();
            engine.apply(&key, &Version { ts: round + 1, body: Body::Inline(Bytes::copy_from_slice(&key)) });
        }
        engine.seal(round + 2, round + 1);
        assert_eq!(engine.flush().unwrap(), round + 2);
        engine.retention().advance(round);
        engine.compact_if_needed(2).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|reader| reader.join().unwrap()).sum();
    assert!(reads > 1000, "the readers ran beside the flushes: {reads} reads");
}

/// A read is answered from the active memtable only when nothing sealed or flushed can hold a
/// newer visible version; otherwise it goes to the tree.
#[test]
fn memory_answers_only_what_no_flushed_version_can_outdate() {
    let dir = tempfile::tempdir().unwrap();
    let engine = DiskVersions::open(dir.path(), Arc::new(Cache::with_capacity_bytes(1 << 20))).unwrap();
    let inline = |text: &'static str| Body::Inline(Bytes::from_static(text.as_bytes()));
    engine.apply(b"k", &Version { ts: 10, body: inline("ten") });
    engine.apply(b"k", &Version { ts: 20, body: inline("twenty") });
    assert_eq!(engine.get_in_memory(b"k", u64::MAX), Some(Version { ts: 20, body: inline("twenty") }));
    assert_eq!(engine.get_in_memory(b"k", 15), None, "an older read than the newest in memory goes to the tree");
    engine.seal(3, 20);
    engine.flush().unwrap();
    assert_eq!(engine.get_in_memory(b"k", u64::MAX), None, "nothing of `k` in the active memtable");
    // A version older than what the tables may hold (another region's, a snapshot's): the tree.
    engine.apply(b"k", &Version { ts: 15, body: inline("fifteen") });
    assert_eq!(engine.get_in_memory(b"k", u64::MAX), None);
    assert_eq!(engine.get_at(b"k", u64::MAX).unwrap().unwrap().ts, 20);
    // Newer than everything sealed: memory answers, the same as the tree.
    engine.apply(b"k", &Version { ts: 30, body: Body::Tombstone });
    assert_eq!(engine.get_in_memory(b"k", u64::MAX), engine.get_at(b"k", u64::MAX).unwrap());
    // After a reopen the bound comes from the last flush.
    drop(engine);
    let engine = DiskVersions::open(dir.path(), Arc::new(Cache::with_capacity_bytes(1 << 20))).unwrap();
    engine.apply(b"k", &Version { ts: 18, body: inline("eighteen") });
    assert_eq!(engine.get_in_memory(b"k", u64::MAX), None, "18 is below the flushed bound 20");
}
