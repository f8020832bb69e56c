//! `wal-torture`: appends to a WAL from many concurrent tasks forever and prints every
//! acknowledged record, so a test (or an operator qualifying a disk) can SIGKILL it at any
//! moment and check after recovery that every acknowledged record is present and intact.
//!
//! Output, one line each: `ready <next_lsn>` once recovery finished, then
//! `ack <round> <task> <index> <lsn>` after each append resolved.
//! Record ids are `round << 40 | task << 20 | index`; payloads come from `dataplane::wal::torture::payload`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use dataplane::wal::torture::{payload, record_id};
use dataplane::wal::{Wal, WalConfig};

const USAGE: &str = "usage: wal-torture --dir DIR --round N [--tasks N] [--segment-bytes N] [--max-payload N] [--release-before-start 0|1]

Appends records from --tasks concurrent tasks to the WAL of shard 0 in DIR until killed,
printing `ack <round> <task> <index> <lsn>` for each acknowledged record. With
--release-before-start 1 it first releases the segments below the LSN it started at (as a
flush would), so this round's segments reuse released files.";

struct Args {
    dir: PathBuf,
    round: u64,
    tasks: u64,
    segment_bytes: u64,
    max_payload: u64,
    release_before_start: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        dir: PathBuf::new(),
        round: u64::MAX,
        tasks: 64,
        segment_bytes: 1 << 20,
        max_payload: 1024,
        release_before_start: false,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = iter.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<u64>().map_err(|_| format!("{flag}: '{value}' is not a number"));
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(&value),
            "--round" => args.round = number()?,
            "--tasks" => args.tasks = number()?,
            "--segment-bytes" => args.segment_bytes = number()?,
            "--max-payload" => args.max_payload = number()?.max(16),
            "--release-before-start" => args.release_before_start = number()? != 0,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.dir.as_os_str().is_empty() || args.round == u64::MAX {
        return Err("--dir and --round are required".into());
    }
    if args.round >= 1 << 23 || args.tasks >= 1 << 20 {
        return Err("--round must be < 2^23 and --tasks < 2^20".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("wal-torture: {message}");
            }
            eprintln!("{USAGE}");
            return if message.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) };
        }
    };
    let mut config = WalConfig::new(&args.dir, 0);
    config.segment_bytes = args.segment_bytes;
    config.batch_bytes_max = 256 << 10;
    config.record_payload_bytes_max = 64 << 10;
    let outcome = dataplane::runtime::run_local("wal-torture", async move {
        let wal = Wal::open(config).await.map_err(|error| error.to_string())?;
        let start = wal.durable_next_lsn();
        if args.release_before_start {
            wal.release_before(start).await.map_err(|error| error.to_string())?;
        }
        println!("ready {start}");
        let mut handles = Vec::new();
        for task in 0..args.tasks {
            let wal = wal.clone();
            let (round, max_payload) = (args.round, args.max_payload);
            handles.push(glommio::spawn_local(async move {
                let mut out = std::io::stdout();
                for index in 0_u64.. {
                    let id = record_id(round, task, index);
                    let length = 8 + usize::try_from(id.wrapping_mul(7919) % max_payload).unwrap_or(8);
                    let lsn = wal.append(id, &payload(id, length)).await.map_err(|error| error.to_string())?;
                    writeln!(out, "ack {round} {task} {index} {lsn}").map_err(|error| error.to_string())?;
                }
                Ok::<(), String>(())
            }));
        }
        for handle in handles {
            handle.await?;
        }
        Ok::<(), String>(())
    });
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(message)) => {
            eprintln!("wal-torture: {message}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("wal-torture: {error}");
            ExitCode::FAILURE
        }
    }
}
