//! Tests of a real `dataplane` process through real sockets: SIGKILL crash rounds checked
//! against a model of acknowledged writes, chunk corruption, malformed and oversized input,
//! and the `meridian` command line end to end.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_lossless)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client::{Client, ClientConfig, ClientError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wire::RecordType;
use wire::proto::{self, ErrorCode, Request, Response};

mod common;

use common::process::{Node, connect, runtime};

/// Small segments and checkpoints so that crash rounds cross checkpoints and segment release.
const SMALL: &str = "shards = 2\n[wal]\nsegment_bytes = 1048576\nbatch_bytes_max = 262144\nrecord_payload_bytes_max = 131072\n[store]\ncheckpoint_wal_bytes = 1048576\ninline_bytes_max = 8192\nchunk_bytes = 65536\n";

fn value(id: u64, len: usize) -> Vec<u8> {
    let mut out = id.to_le_bytes().to_vec();
    out.extend((0..len.saturating_sub(8)).map(|index| (index as u64 ^ id) as u8));
    out.truncate(len.max(8));
    out
}

/// A version as the ledger records it: timestamp and value (`None` for a tombstone).
type Versions = Vec<(u64, Option<Vec<u8>>)>;

#[derive(Default)]
struct Ledger {
    /// key -> acknowledged versions.
    acked: BTreeMap<Vec<u8>, Versions>,
    /// key -> every value sent, acknowledged or not.
    sent: BTreeMap<Vec<u8>, Vec<Option<Vec<u8>>>>,
    next_id: u64,
}

#[test]
fn sigkill_rounds_lose_no_acknowledged_write() {
    let rounds: usize = std::env::var("MERIDIAN_NODE_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    let seed: u64 = std::env::var("MERIDIAN_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(11);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let runtime = runtime();
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..rounds {
        let mut node = Node::start(&data, SMALL);
        let run_ms = rng.random_range(300..1200);
        let ledger_check = Arc::clone(&ledger);
        runtime.block_on(async {
            let client = connect(&node).await;
            // No writer runs now: check a copy taken out of the lock.
            let snapshot = std::mem::take(&mut *ledger_check.lock().unwrap());
            verify(&client, &snapshot).await;
            *ledger_check.lock().unwrap() = snapshot;
            let mut writers = Vec::new();
            for writer in 0..16u64 {
                let client = client.clone();
                let ledger = Arc::clone(&ledger);
                let mut rng = StdRng::seed_from_u64(seed ^ (round as u64 * 1000 + writer));
                writers.push(tokio::spawn(async move {
                    loop {
                        let key = format!("key-{:03}", rng.random_range(0..64)).into_bytes();
                        let (id, body) = {
                            let mut ledger = ledger.lock().unwrap();
                            ledger.next_id += 1;
                            let id = ledger.next_id;
                            let body = match rng.random_range(0..10) {
                                0 => None,
                                1 => Some(value(id, rng.random_range(9000..150_000))),
                                _ => Some(value(id, rng.random_range(8..2000))),
                            };
                            ledger.sent.entry(key.clone()).or_default().push(body.clone());
                            (id, body)
                        };
                        let _ = id;
                        let result = match &body {
                            Some(value) => client.put(&key, value).await,
                            None => client.delete(&key).await,
                        };
                        match result {
                            Ok(ts) => ledger.lock().unwrap().acked.entry(key).or_default().push((ts, body)),
                            Err(_) => return,
                        }
                    }
                }));
            }
            tokio::time::sleep(Duration::from_millis(run_ms)).await;
            node.kill();
            for writer in writers {
                writer.await.unwrap();
            }
        });
        let acked: usize = ledger.lock().unwrap().acked.values().map(Vec::len).sum();
        eprintln!("round {round}: killed after {run_ms} ms, {acked} writes acknowledged so far");
    }
    let node = Node::start(&data, SMALL);
    runtime.block_on(async {
        let client = connect(&node).await;
        let snapshot = std::mem::take(&mut *ledger.lock().unwrap());
        verify(&client, &snapshot).await;
    });
    // Checkpoints are engine flushes: table files under the shard's engine, no full copies.
    let engine = data.join("shard-000").join("engine");
    assert!(std::fs::read_dir(engine.join("tables")).unwrap().count() > 0, "the engine flushed tables");
    let full = std::fs::read_dir(data.join("shard-000"))
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().file_name().to_string_lossy().ends_with(".ckpt"));
    assert_eq!(full.count(), 0, "no full checkpoint files");
}

/// Every acknowledged version reads back at its timestamp; the latest version of each key is
/// the newest acknowledged one or a newer write that was sent (a lost ack), never anything else;
/// a listing agrees with the reads.
async fn verify(client: &Client, ledger: &Ledger) {
    let mut live = Vec::new();
    for (key, versions) in &ledger.acked {
        for (ts, body) in versions {
            let got = client.get(key, Some(*ts)).await.unwrap();
            match (body, got) {
                (Some(value), Some(got)) => {
                    assert_eq!(got.ts, *ts, "{key:?}: version at {ts}");
                    assert!(got.value[..] == value[..], "{key:?}: value at {ts} differs");
                }
                (None, None) => {}
                (body, got) => panic!("{key:?} at {ts}: expected {:?}, got {:?}", body.is_some(), got.map(|v| v.ts)),
            }
        }
        let newest = versions.iter().map(|(ts, _)| *ts).max().unwrap();
        let latest = client.stat(key, None).await.unwrap();
        let latest_value = client.get(key, None).await.unwrap();
        match &latest_value {
            Some(got) => {
                assert!(got.ts >= newest, "{key:?}: latest {} older than acknowledged {newest}", got.ts);
                if got.ts > newest {
                    let sent = &ledger.sent[key];
                    assert!(
                        sent.iter().any(|body| body.as_deref() == Some(&got.value[..])),
                        "{key:?}: latest value was never written"
                    );
                }
                live.push(key.clone());
            }
            None => {
                let last = versions.iter().max_by_key(|(ts, _)| *ts).unwrap();
                // Deleted, or a newer tombstone whose ack was lost.
                assert!(last.1.is_none() || ledger.sent[key].iter().any(Option::is_none), "{key:?} vanished");
            }
        }
        assert_eq!(latest.is_some(), latest_value.is_some());
    }
    let mut listed = Vec::new();
    let mut after: Vec<u8> = Vec::new();
    loop {
        let page = client.list(b"key-", &after, 10, None).await.unwrap();
        listed.extend(page.entries.iter().map(|entry| entry.key.clone()));
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    let acked_live: Vec<_> = listed.iter().filter(|key| ledger.acked.contains_key(*key)).cloned().collect();
    assert_eq!(acked_live, live, "listing disagrees with reads");
}

/// Sends one raw frame and reads one response frame.
fn roundtrip(stream: &mut TcpStream, frame: &[u8]) -> Option<(u64, Vec<u8>)> {
    stream.write_all(frame).ok()?;
    read_response(stream)
}

fn read_response(stream: &mut TcpStream) -> Option<(u64, Vec<u8>)> {
    let mut header = [0u8; wire::HEADER_BYTES];
    stream.read_exact(&mut header).ok()?;
    let parsed = wire::decode_header(&header, wire::limits::PAYLOAD_BYTES_MAX).unwrap();
    let mut frame = header.to_vec();
    frame.resize(wire::HEADER_BYTES + parsed.payload_len as usize, 0);
    stream.read_exact(&mut frame[wire::HEADER_BYTES..]).ok()?;
    let (record, _) = wire::decode(&frame, wire::limits::PAYLOAD_BYTES_MAX).unwrap();
    Some((record.seq, record.payload.to_vec()))
}

fn request_frame(seq: u64, request: Request<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    proto::frame(&mut out, RecordType::Request, seq, |out| request.encode(out)).unwrap();
    out
}

fn error_code(body: &[u8]) -> Option<ErrorCode> {
    match Response::decode(body).unwrap() {
        Response::Error { code, .. } => Some(code),
        _ => None,
    }
}

fn shard_stream(node: &Node, key: &[u8]) -> TcpStream {
    let shard = wire::shard_for(key, node.addresses.len() as u32) as usize;
    let stream = TcpStream::connect(&node.addresses[shard]).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

#[test]
fn bad_input_is_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = "shards = 2\n[limits]\nkey_bytes_max = 100\nvalue_bytes_max = 200000\nframe_bytes_max = 300000\ninflight_per_connection = 4\n";
    let node = Node::start(&data, config);

    // A steady writer on other connections: all its acknowledged writes must survive.
    let background_runtime = runtime();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let background = {
        let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
        let seed = node.addresses[0].clone();
        std::thread::spawn(move || {
            background_runtime.block_on(async {
                let client = Client::connect(&seed, ClientConfig::default()).await.unwrap();
                let mut index = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let key = format!("steady-{index}");
                    let ts = client.put(key.as_bytes(), &value(index, 100)).await.unwrap();
                    acked.lock().unwrap().push((key, index, ts));
                    index += 1;
                }
            });
        })
    };

    // Oversized key and value: named errors, the connection stays up.
    let mut stream = shard_stream(&node, b"x");
    let long_key = vec![b'k'; 101];
    let mut owned = shard_stream(&node, &long_key);
    let (_, body) = roundtrip(&mut owned, &request_frame(1, Request::Put { key: &long_key, value: b"v" })).unwrap();
    assert_eq!(error_code(&body), Some(ErrorCode::KeyTooLarge));
    let big = vec![7u8; 200_001];
    let (_, body) = roundtrip(&mut stream, &request_frame(2, Request::Put { key: b"x", value: &big })).unwrap();
    assert_eq!(error_code(&body), Some(ErrorCode::ValueTooLarge));
    // Unknown request op in a valid frame: refused, connection still serves.
    let mut frame = Vec::new();
    proto::frame(&mut frame, RecordType::Request, 3, |out| out.extend_from_slice(&[200, 1, 2])).unwrap();
    let (seq, body) = roundtrip(&mut stream, &frame).unwrap();
    assert_eq!((seq, error_code(&body)), (3, Some(ErrorCode::UnknownRequest)));
    // A body that does not decode.
    proto::frame(&mut frame, RecordType::Request, 4, |out| out.extend_from_slice(&[4, 9, 0])).unwrap();
    let (_, body) = roundtrip(&mut stream, &frame).unwrap();
    assert_eq!(error_code(&body), Some(ErrorCode::BadRequest));
    // A key sent to the wrong shard.
    let wrong =
        (0..).map(|i| format!("w{i}")).find(|k| wire::shard_for(k.as_bytes(), 2) != wire::shard_for(b"x", 2)).unwrap();
    let (_, body) =
        roundtrip(&mut stream, &request_frame(5, Request::Get { key: wrong.as_bytes(), at: None })).unwrap();
    assert_eq!(error_code(&body), Some(ErrorCode::WrongShard));
    let (_, body) = roundtrip(&mut stream, &request_frame(6, Request::Put { key: b"x", value: b"fine" })).unwrap();
    assert!(matches!(Response::decode(&body).unwrap(), Response::Written { .. }));

    // Too many requests in flight: pipeline 40 puts without reading; some are refused at once.
    let mut pipelined = Vec::new();
    for seq in 0..40 {
        pipelined.extend(request_frame(100 + seq, Request::Put { key: b"x", value: b"p" }));
    }
    stream.write_all(&pipelined).unwrap();
    let mut refused = 0;
    for _ in 0..40 {
        let (_, body) = read_response(&mut stream).unwrap();
        refused += usize::from(error_code(&body) == Some(ErrorCode::TooManyInFlight));
    }
    assert!(refused > 0, "no request was refused for the in-flight limit");

    // A frame announcing more than the frame limit: refused and closed.
    let mut oversized = shard_stream(&node, b"x");
    let mut header = wire::encode_header(RecordType::Request, 0, 9, b"").unwrap();
    header[8..12].copy_from_slice(&400_000u32.to_le_bytes());
    let (seq, body) = roundtrip(&mut oversized, &header).unwrap();
    assert_eq!((seq, error_code(&body)), (9, Some(ErrorCode::FrameTooLarge)));
    assert!(read_response(&mut oversized).is_none(), "connection should be closed");
    // Garbage: refused and closed.
    let mut garbage = shard_stream(&node, b"x");
    let (_, body) = roundtrip(&mut garbage, &[0xAB; 64]).unwrap();
    assert_eq!(error_code(&body), Some(ErrorCode::BadRequest));
    assert!(read_response(&mut garbage).is_none(), "connection should be closed");
    // A corrupted checksum: refused and closed.
    let mut flipped = request_frame(10, Request::Put { key: b"x", value: b"abc" });
    *flipped.last_mut().unwrap() ^= 1;
    let mut damaged = shard_stream(&node, b"x");
    let (_, body) = roundtrip(&mut damaged, &flipped).unwrap();
    assert_eq!(error_code(&body), Some(ErrorCode::BadRequest));
    // A client that goes away mid-request: nothing applied, nothing broken.
    let mut vanishing = shard_stream(&node, b"x");
    let partial = request_frame(11, Request::Put { key: b"x", value: &vec![1u8; 50_000] });
    vanishing.write_all(&partial[..20_000]).unwrap();
    drop(vanishing);

    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    background.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 10, "the steady writer made little progress: {}", acked.len());
    let runtime = runtime();
    runtime.block_on(async {
        let client = connect(&node).await;
        let got = client.get(b"x", None).await.unwrap().unwrap();
        assert_eq!(&got.value[..], b"p");
        for (key, index, ts) in &acked {
            let got = client.get(key.as_bytes(), None).await.unwrap().unwrap();
            assert_eq!((got.ts, &got.value[..]), (*ts, &value(*index, 100)[..]));
        }
    });
}

#[test]
fn corrupt_chunk_gives_a_named_error_not_bad_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = Node::start(&data, "shards = 1\n");
    let runtime = runtime();
    let original = value(5, 300_000);
    runtime.block_on(async {
        let client = connect(&node).await;
        client.put(b"file", &original).await.unwrap();
        let got = client.get(b"file", None).await.unwrap().unwrap();
        assert!(got.value[..] == original[..]);
    });
    let chunk_dir = data.join("shard-000/chunks");
    let chunk: PathBuf = std::fs::read_dir(&chunk_dir).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[4096 + 70_000] ^= 0x10; // inside block 1
    std::fs::write(&chunk, &bytes).unwrap();
    runtime.block_on(async {
        let client = connect(&node).await;
        match client.get(b"file", None).await {
            Err(ClientError::Server { code: ErrorCode::ChunkCorrupt, message }) => {
                let name = chunk.file_stem().unwrap().to_string_lossy().to_string();
                assert!(message.contains(&name), "{message} does not name chunk {name}");
                assert!(message.contains("block 1"), "{message} does not name the block");
            }
            other => panic!("expected ChunkCorrupt, got {other:?}"),
        }
    });
}

#[test]
fn clean_stop_checkpoints_and_restart_replays_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = Node::start(&data, "shards = 2\n");
    let runtime = runtime();
    runtime.block_on(async {
        let client = connect(&node).await;
        for index in 0..200u64 {
            client.put(format!("k{index}").as_bytes(), &value(index, 500)).await.unwrap();
        }
    });
    node.stop();
    let node = Node::start(&data, "shards = 2\n");
    runtime.block_on(async {
        let client = connect(&node).await;
        for index in 0..200u64 {
            let got = client.get(format!("k{index}").as_bytes(), None).await.unwrap().unwrap();
            assert!(got.value[..] == value(index, 500)[..]);
        }
    });
    // A second process on the same data directory is refused.
    let output = Command::new(env!("CARGO_BIN_EXE_dataplane"))
        .args(["--data-dir", data.to_str().unwrap(), "--listen", "127.0.0.1:0", "--shards", "2"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("in use by another dataplane process"));
}

/// The `meridian` binary, built with the workspace.
fn meridian() -> Command {
    let dataplane = PathBuf::from(env!("CARGO_BIN_EXE_dataplane"));
    let path = dataplane.with_file_name("meridian");
    assert!(path.exists(), "build the workspace first: {} is missing", path.display());
    Command::new(path)
}

#[test]
fn cli_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = Node::start(&data, "shards = 2\n[limits]\nvalue_bytes_max = 8000000\nframe_bytes_max = 9000000\n");
    let addr = node.addresses[1].clone();
    let cli = |args: &[&str]| {
        let output = meridian().arg("--addr").arg(&addr).args(args).output().unwrap();
        (output.status.code().unwrap(), output.stdout, String::from_utf8_lossy(&output.stderr).to_string())
    };

    let file = dir.path().join("input.bin");
    let original = value(9, 3_000_000);
    std::fs::write(&file, &original).unwrap();
    let (code, _, err) = cli(&["put", "files/big.bin", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let out_path = dir.path().join("out.bin");
    let (code, _, err) = cli(&["get", "files/big.bin", "-o", out_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(&out_path).unwrap() == original);

    // From stdin to stdout.
    let mut child = meridian()
        .args(["--addr", &addr, "put", "files/small.txt"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello from stdin").unwrap();
    assert!(child.wait().unwrap().success());
    let (code, stdout, _) = cli(&["get", "files/small.txt"]);
    assert_eq!((code, &stdout[..]), (0, &b"hello from stdin"[..]));

    let (code, stdout, _) = cli(&["--json", "stat", "files/big.bin"]);
    assert_eq!(code, 0);
    let stat: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(stat["size"], 3_000_000);
    assert!(stat["chunks"].as_u64().unwrap() >= 3);

    let (code, stdout, _) = cli(&["ls", "files/"]);
    assert_eq!(code, 0);
    let listing = String::from_utf8(stdout).unwrap();
    assert!(listing.contains("files/big.bin") && listing.contains("files/small.txt"), "{listing}");

    let (code, _, _) = cli(&["rm", "files/small.txt"]);
    assert_eq!(code, 0);
    let (code, _, _) = cli(&["get", "files/small.txt"]);
    assert_eq!(code, 3, "a deleted key exits 3");
    let long_key = "k".repeat(5000);
    let (code, _, err) = cli(&["put", &long_key, "--value", "v"]);
    assert_eq!(code, 4, "refused by the server exits 4: {err}");
    assert!(err.contains("KeyTooLarge") || err.contains("key"), "{err}");
    let code = meridian().args(["--addr", "127.0.0.1:1", "get", "x"]).output().unwrap().status.code().unwrap();
    assert_eq!(code, 5, "no server exits 5");
    let started = Instant::now();
    let (code, _, _) = meridian().args(["put"]).output().map(|o| (o.status.code().unwrap(), (), ())).unwrap();
    assert_eq!(code, 2, "usage errors exit 2");
    assert!(started.elapsed() < Duration::from_secs(10));
}
