//! The Raft log file through its real paths (tokio-uring and blocking files on disk) and
//! under injected faults: EIO, a short write, a torn tail, damage in the middle.

use std::io;
use std::path::Path;

use anyhow::Result;
use controlapi::meta::Command;
use controlplane::raftlog::{
    self, Completion, LogFile, LogIo, LogRecord, LogStore, LogWriter, ReplayError, encode_record, read_and_repair,
    replay,
};
use controlplane::types::{Entry, LogId, Proposal, Vote};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader};

fn entry(index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Proposal {
            at_ms: index,
            commands: vec![Command::SetConfig { key: format!("k{index}"), value: "v".into() }],
        }),
    }
}

async fn open(path: &Path, io: LogIo) -> Result<LogStore<LogWriter>> {
    let image = read_and_repair(path)?;
    Ok(LogStore::new(LogWriter::open(path, io)?, image))
}

async fn indexes(store: &mut LogStore<impl LogFile>) -> Result<Vec<u64>> {
    Ok(store.try_get_log_entries(0..).await?.iter().map(|e| e.log_id.index).collect())
}

#[tokio::test]
async fn appends_votes_truncations_and_purges_survive_reopening_on_both_files() -> Result<()> {
    for io in [LogIo::Uring, LogIo::Std] {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("raft.log");
        {
            let mut store = open(&path, io).await?.with_rewrite_after(8);
            for index in 1..=20 {
                store.blocking_append([entry(index)]).await?;
            }
            store.save_vote(&Vote::new(3, 2)).await?;
            store.truncate(LogId::new(CommittedLeaderId::new(1, 1), 18)).await?;
            // Enough dead records to trigger an atomic rewrite.
            store.purge(LogId::new(CommittedLeaderId::new(1, 1), 10)).await?;
            store.blocking_append([entry(18)]).await?;
        }
        let mut store = open(&path, io).await?;
        assert_eq!(indexes(&mut store).await?, (11..=18).collect::<Vec<_>>(), "{io:?}");
        assert_eq!(store.read_vote().await?, Some(Vote::new(3, 2)));
        let state = store.get_log_state().await?;
        assert_eq!(state.last_purged_log_id.map(|id| id.index), Some(10));
        assert_eq!(state.last_log_id.map(|id| id.index), Some(18));
    }
    Ok(())
}

#[test]
fn a_torn_tail_is_cut_at_every_offset() -> Result<()> {
    let mut bytes = Vec::new();
    for index in 1..=3 {
        bytes.extend(encode_record(&LogRecord::Entries(vec![entry(index)]))?);
    }
    let whole = bytes.len();
    let last = encode_record(&LogRecord::Entries(vec![entry(4)]))?;
    bytes.extend(&last);
    for cut in whole..bytes.len() {
        let image = replay(&bytes[..cut])?;
        assert_eq!(image.valid_bytes, whole, "cut at {cut}");
        assert_eq!(image.entries.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    }
    assert_eq!(replay(&bytes)?.entries.len(), 4);
    Ok(())
}

#[test]
fn damage_before_a_valid_record_is_refused() -> Result<()> {
    let mut bytes = Vec::new();
    for index in 1..=3 {
        bytes.extend(encode_record(&LogRecord::Entries(vec![entry(index)]))?);
    }
    let second = encode_record(&LogRecord::Entries(vec![entry(1)]))?.len() + 40;
    bytes[second] ^= 0xFF;
    assert!(matches!(replay(&bytes), Err(ReplayError::Damaged { .. })));
    Ok(())
}

#[tokio::test]
async fn a_torn_tail_on_disk_is_repaired_at_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raft.log");
    {
        let mut store = open(&path, LogIo::Uring).await?;
        for index in 1..=5 {
            store.blocking_append([entry(index)]).await?;
        }
    }
    let len = std::fs::metadata(&path)?.len();
    std::fs::OpenOptions::new().write(true).open(&path)?.set_len(len - 7)?;
    let mut store = open(&path, LogIo::Uring).await?;
    assert_eq!(indexes(&mut store).await?, vec![1, 2, 3, 4]);
    // Appends after the repair land after the cut.
    store.blocking_append([entry(5)]).await?;
    drop(store);
    let mut store = open(&path, LogIo::Std).await?;
    assert_eq!(indexes(&mut store).await?, vec![1, 2, 3, 4, 5]);
    Ok(())
}

/// A file that fails on command: EIO, or a short write (half the bytes reach the disk).
struct FaultyFile {
    inner: LogWriter,
    path: std::path::PathBuf,
    fault: Option<Fault>,
}

#[derive(Clone, Copy)]
enum Fault {
    Eio,
    Short,
}

impl LogFile for FaultyFile {
    fn append(&mut self, bytes: Vec<u8>, done: Completion) {
        match self.fault {
            None => self.inner.append(bytes, done),
            Some(Fault::Eio) => done(Err(io::Error::from_raw_os_error(libc::EIO))),
            Some(Fault::Short) => {
                let short = || -> io::Result<()> {
                    use std::io::Write;
                    let mut file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
                    file.write_all(&bytes[..bytes.len() / 2])?;
                    file.sync_data()
                };
                done(short().and(Err(io::Error::new(io::ErrorKind::WriteZero, "short write"))));
            }
        }
    }

    async fn replace(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        self.inner.replace(bytes).await
    }
}

#[tokio::test]
async fn a_failed_append_is_reported_poisons_the_store_and_loses_nothing_acknowledged() -> Result<()> {
    for fault in [Fault::Eio, Fault::Short] {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("raft.log");
        let image = read_and_repair(&path)?;
        let file = FaultyFile { inner: LogWriter::open_std(&path)?, path: path.clone(), fault: None };
        let mut store = LogStore::new(file, image);
        store.blocking_append([entry(1), entry(2)]).await?;
        // Reach the file through a new store to flip the fault on.
        let image = read_and_repair(&path)?;
        let file = FaultyFile { inner: LogWriter::open_std(&path)?, path: path.clone(), fault: Some(fault) };
        let mut store = LogStore::new(file, image);
        assert!(store.blocking_append([entry(3)]).await.is_err(), "the fault was not reported");
        // After a failure every write is refused, even a vote.
        assert!(store.save_vote(&Vote::new(9, 9)).await.is_err());
        drop(store);
        let image = raftlog::read_and_repair(&path)?;
        assert_eq!(image.entries.keys().copied().collect::<Vec<_>>(), vec![1, 2], "acknowledged entries lost");
        assert_eq!(image.vote, None);
    }
    Ok(())
}
