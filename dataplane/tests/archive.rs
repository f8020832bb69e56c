//! The snapshot archive against real data nodes: export, mutate, export incremental, again,
//! prune, restore every kept snapshot (to a directory and into a new cluster) and compare
//! with the model; a damaged pack is found by verify and refused by restore.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use client::Client;
use client::archive::{Archive, ArchiveError, RestoreTarget};
use common::process::{Node, connect, runtime};

type Model = BTreeMap<String, Vec<u8>>;

/// Text-like bytes, different for each seed (compressible, not repetitive at chunk scale).
fn value(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let words = ["meridian ", "snapshot ", "archive ", "chunk ", "region ", "replica ", "pack ", "index "];
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(words[(state % 8) as usize].as_bytes());
        out.extend_from_slice(format!("{} ", state % 1000).as_bytes());
    }
    out.truncate(len);
    out
}

async fn apply(client: &Client, model: &mut Model, changes: &[(&str, Option<Vec<u8>>)]) -> u64 {
    let mut last = 0;
    for (key, change) in changes {
        last = match change {
            Some(bytes) => {
                model.insert((*key).to_owned(), bytes.clone());
                client.put(key.as_bytes(), bytes).await.unwrap()
            }
            None => {
                model.remove(*key);
                client.delete(key.as_bytes()).await.unwrap()
            }
        };
    }
    last
}

fn read_dir(dir: &Path) -> Model {
    let mut out = Model::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let key = path.strip_prefix(dir).unwrap().to_str().unwrap().to_owned();
                out.insert(key, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

async fn cluster_contents(client: &Client) -> Model {
    let mut out = Model::new();
    let listing = client.list(b"", b"", 10_000, None).await.unwrap();
    for entry in listing.entries {
        let value = client.get(&entry.key, None).await.unwrap().unwrap();
        out.insert(String::from_utf8(entry.key).unwrap(), value.value.to_vec());
    }
    out
}

const CONFIG: &str = "shards = 2\n[limits]\nvalue_bytes_max = 8000000\nframe_bytes_max = 9000000\n";

#[test]
fn export_incremental_prune_restore_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), CONFIG);
    let archive_dir = dir.path().join("archive");
    let archive = Archive::open(archive_dir.to_str().unwrap()).unwrap();
    let rt = runtime();
    let no_progress = |_: u64, _: u64| {};

    let (model2, model3) = rt.block_on(async {
        let client = connect(&node).await;
        // Snapshot 1: small and large values (several chunks), and one value stored twice.
        let mut model = Model::new();
        let mut changes: Vec<(String, Option<Vec<u8>>)> = (0..30)
            .map(|i| (format!("docs/file-{i:02}.txt"), Some(value(i, 100 + (i as usize * 977) % 5000))))
            .collect();
        for i in 0..4u64 {
            changes.push((format!("media/big-{i}.bin"), Some(value(100 + i, 1_500_000 + i as usize * 300_000))));
        }
        changes.push(("media/copy-of-big-0.bin".into(), Some(value(100, 1_500_000))));
        let changes: Vec<(&str, Option<Vec<u8>>)> = changes.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let t1 = apply(&client, &mut model, &changes).await;
        let model1 = model.clone();
        let first = archive.export(&client, 1, t1, &no_progress).await.unwrap();
        assert_eq!(first.parent, None);
        assert_eq!(first.keys, model1.len() as u64);
        assert_eq!(first.keys_read, first.keys);
        assert!(first.chunks_reused >= 2, "the copy of big-0 shares its chunks: {first:?}");
        assert!(first.bytes_written < first.bytes_read, "text compresses: {first:?}");

        // Snapshot 2: one large file edited in its middle, two small ones rewritten, one
        // deleted, one added.
        let mut edited = model["media/big-1.bin"].clone();
        edited[900_000..900_100].copy_from_slice(&[b'#'; 100]);
        let t2 = apply(
            &client,
            &mut model,
            &[
                ("media/big-1.bin", Some(edited)),
                ("docs/file-03.txt", Some(value(1003, 2000))),
                ("docs/file-04.txt", Some(value(1004, 3000))),
                ("docs/file-05.txt", None),
                ("docs/new.txt", Some(value(2000, 4000))),
            ],
        )
        .await;
        let model2 = model.clone();
        let second = archive.export(&client, 2, t2, &no_progress).await.unwrap();
        assert_eq!(second.parent, Some(1));
        assert_eq!(second.keys, model2.len() as u64);
        assert_eq!(second.keys_read, 4, "only the changed keys are read: {second:?}");
        assert!(second.chunks_reused >= 2, "the edited file keeps its unchanged chunks: {second:?}");
        assert!(second.bytes_written < first.bytes_written / 3, "{second:?} after {first:?}");

        // Snapshot 3.
        let t3 = apply(&client, &mut model, &[("media/big-2.bin", None), ("docs/file-10.txt", Some(value(3010, 700)))])
            .await;
        let model3 = model.clone();
        let third = archive.export(&client, 3, t3, &no_progress).await.unwrap();
        assert_eq!(third.parent, Some(2));
        assert!(matches!(archive.export(&client, 3, t3, &no_progress).await, Err(ArchiveError::Exists(3))));

        // Restoring snapshot 1 before the prune gives its contents back.
        let out1 = dir.path().join("restore-1");
        archive.restore(1, b"", RestoreTarget::Directory(&out1), &no_progress).await.unwrap();
        assert_eq!(read_dir(&out1), model1);
        (model2, model3)
    });

    // Keep the last two: snapshot 1 goes, with the packs only it used.
    let before = rt.block_on(archive.stored_bytes()).unwrap();
    let pruned = rt.block_on(archive.prune(2)).unwrap();
    assert_eq!(pruned.snapshots_deleted, [1]);
    assert!(!pruned.deferred);
    let after = rt.block_on(archive.stored_bytes()).unwrap();
    assert!(after <= before);
    let report = rt.block_on(archive.verify(&|_, _| {})).unwrap();
    assert_eq!(report.snapshots, 2);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(matches!(
        rt.block_on(archive.restore(1, b"", RestoreTarget::Directory(dir.path()), &|_, _| {})),
        Err(ArchiveError::NotFound(1))
    ));

    // Every kept snapshot restores to what was written, to a directory and by prefix.
    rt.block_on(async {
        let out2 = dir.path().join("restore-2");
        archive.restore(2, b"", RestoreTarget::Directory(&out2), &|_, _| {}).await.unwrap();
        assert_eq!(read_dir(&out2), model2);
        let out3 = dir.path().join("restore-3-docs");
        archive.restore(3, b"docs/", RestoreTarget::Directory(&out3), &|_, _| {}).await.unwrap();
        let docs: Model =
            model3.iter().filter(|(k, _)| k.starts_with("docs/")).map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(read_dir(&out3), docs);
    });

    // Into a new, empty cluster.
    let fresh = Node::start(&dir.path().join("fresh"), CONFIG);
    rt.block_on(async {
        let client = connect(&fresh).await;
        let stats = archive.restore(3, b"", RestoreTarget::Cluster(&client), &|_, _| {}).await.unwrap();
        assert_eq!(stats.keys, model3.len() as u64);
        assert_eq!(cluster_contents(&client).await, model3);
    });

    // A flipped byte in a pack: verify names it, restore refuses the snapshot.
    let packs: Vec<_> = std::fs::read_dir(archive_dir.join("packs")).unwrap().map(|e| e.unwrap().path()).collect();
    let biggest = packs.iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let mut bytes = std::fs::read(biggest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(biggest, bytes).unwrap();
    let report = rt.block_on(archive.verify(&|_, _| {})).unwrap();
    assert!(!report.errors.is_empty(), "verify missed a damaged pack");
    let name = biggest.file_name().unwrap().to_str().unwrap();
    assert!(report.errors.iter().any(|e| e.contains(name)), "{:?}", report.errors);
    let restored = rt.block_on(async {
        let mut failures = 0;
        for id in [2, 3] {
            let out = dir.path().join(format!("damaged-{id}"));
            if let Err(error) = archive.restore(id, b"", RestoreTarget::Directory(&out), &|_, _| {}).await {
                assert!(matches!(error, ArchiveError::Format { .. }), "{error}");
                failures += 1;
            }
        }
        failures
    });
    assert!(restored >= 1, "a snapshot using the damaged pack restored without error");
}
