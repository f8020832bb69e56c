//! Crash test: a child process appends from many tasks and prints every acknowledged record;
//! the test SIGKILLs it at random moments, round after round, and checks after recovery that
//! every acknowledged record is present, intact and in order, and that nothing appears that
//! was never appended. Rounds: `MERIDIAN_CRASH_ROUNDS` (default 50).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_lossless)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::check_payload;
use dataplane::wal::scan;
use dataplane::wal::torture::split_record_id;
use dataplane::wal::{WalConfig, WalReader};
use rand::{Rng, SeedableRng};

const TASKS: u64 = 48;

fn config(dir: &std::path::Path) -> WalConfig {
    let mut config = WalConfig::new(dir, 0);
    config.record_payload_bytes_max = 64 << 10;
    config
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    crash_rounds(false);
}

/// Each round first releases the segments of the rounds before (as a flush would), so its
/// segments are released files reused with their stale batches in them.
#[test]
fn sigkill_while_reusing_released_segments_loses_nothing_acknowledged() {
    crash_rounds(true);
}

fn crash_rounds(reuse: bool) {
    let rounds: u64 = std::env::var("MERIDIAN_CRASH_ROUNDS").ok().and_then(|value| value.parse().ok()).unwrap_or(50);
    let seed: u64 = common::seed("MERIDIAN_CRASH_SEED");
    eprintln!("crash test: {rounds} rounds, seed {seed} (MERIDIAN_CRASH_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    // acked[(round, task)] = number of acknowledged records (indexes 0..n).
    let mut acked: HashMap<(u64, u64), u64> = HashMap::new();
    let mut total_acked = 0_u64;
    let mut verified_until = 1_u64;
    let mut round_starts = Vec::new();
    let mut rounds_on_reused_files = 0;
    for round in 0..rounds {
        round_starts.push(verified_until);
        let mut child = Command::new(env!("CARGO_BIN_EXE_wal-torture"))
            .args(["--dir", dir.path().to_str().unwrap(), "--round", &round.to_string()])
            .args(["--tasks", &TASKS.to_string(), "--segment-bytes", &(1_u64 << 20).to_string()])
            .args(["--release-before-start", if reuse { "1" } else { "0" }])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let fields: Vec<&str> = line.split(' ').collect();
                match fields.as_slice() {
                    ["ready", _] => {
                        let _ = ready_tx.send(());
                    }
                    ["ack", round, task, index, lsn] => acks.push((
                        round.parse::<u64>().unwrap(),
                        task.parse::<u64>().unwrap(),
                        index.parse::<u64>().unwrap(),
                        lsn.parse::<u64>().unwrap(),
                    )),
                    // The kill can cut the last line short.
                    _ => {}
                }
            }
            acks
        });
        ready_rx.recv_timeout(Duration::from_secs(30)).expect("child recovered and started");
        std::thread::sleep(Duration::from_millis(rng.random_range(1..120)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acks = reader.join().unwrap();
        for (ack_round, task, index, _) in &acks {
            assert_eq!(*ack_round, round);
            let count = acked.entry((round, *task)).or_default();
            assert_eq!(*index, *count, "a task's acks come in order");
            *count += 1;
        }
        total_acked += acks.len() as u64;

        // Recovery's view, read-only (the next child's open does the repair).
        let started = Instant::now();
        let plan = scan(&config).unwrap();
        let records = WalReader::new(dir.path(), 0, config.record_payload_bytes_max)
            .read_range(verified_until, plan.next_lsn)
            .unwrap();
        let mut present: HashMap<u64, u64> = HashMap::new();
        for (position, record) in records.iter().enumerate() {
            assert_eq!(record.lsn, verified_until + position as u64, "LSNs are contiguous");
            let id = check_payload(&record.payload)
                .unwrap_or_else(|| panic!("round {round}: record {} damaged", record.lsn));
            assert_eq!(record.glt, id);
            let (record_round, task, index) = split_record_id(id);
            assert_eq!(record_round, round, "only this round's records are new");
            assert!(task < TASKS);
            let next = present.entry(task).or_default();
            assert_eq!(index, *next, "per task, records appear in order with no gap or duplicate");
            *next += 1;
        }
        for task in 0..TASKS {
            let acked_count = acked.get(&(round, task)).copied().unwrap_or(0);
            let present_count = present.get(&task).copied().unwrap_or(0);
            // Acknowledged records must be there; at most the one in flight may be too.
            assert!(
                present_count == acked_count || present_count == acked_count + 1,
                "round {round} task {task}: {acked_count} acknowledged, {present_count} present"
            );
        }
        for (_, _, index, lsn) in acks.iter().rev().take(1) {
            assert!(*lsn < plan.next_lsn, "ack {index} at LSN {lsn} beyond recovered end {}", plan.next_lsn);
        }
        verified_until = plan.next_lsn;
        let _ = started;
        rounds_on_reused_files += u64::from(plan.segments.iter().any(|segment| {
            let path = dir.path().join(dataplane::wal::format::segment_file_name(0, segment.segment_seq));
            let sector = std::fs::read(path).unwrap();
            dataplane::wal::format::SegmentHeader::decode(&sector).is_ok_and(|header| header.reused)
        }));
    }
    if reuse {
        eprintln!("crash test: {rounds_on_reused_files} of {rounds} rounds ended with a reused segment in use");
        assert!(rounds_on_reused_files > 0, "released segments were reused");
    }
    // Finally the whole log still on disk (released rounds are gone when reusing).
    let plan = scan(&config).unwrap();
    let first = plan.segments.first().map_or(1, |segment| segment.first_lsn);
    let whole =
        WalReader::new(dir.path(), 0, config.record_payload_bytes_max).read_range(first, verified_until).unwrap();
    let mut present: HashMap<(u64, u64), u64> = HashMap::new();
    for record in &whole {
        let (round, task, _) = split_record_id(check_payload(&record.payload).unwrap());
        *present.entry((round, task)).or_default() += 1;
    }
    for (key, count) in acked.iter().filter(|((round, _), _)| round_starts[*round as usize] >= first) {
        assert!(present.get(key).copied().unwrap_or(0) >= *count, "{key:?} lost records");
    }
    eprintln!("crash test: {total_acked} acknowledged records over {rounds} SIGKILLs, all present");
    assert!(total_acked > rounds, "the child made progress");
}
