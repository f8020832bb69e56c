//! Full checkpoints, the format of data directories written before the engine: the whole
//! version map of a shard as of a WAL position. Nothing writes them any more; a shard that
//! finds one at open loads it into its engine and deletes it (`shard::migrate_checkpoint`).
//! The encoder stays for the tests of that upgrade.
//!
//! File `ckpt-s{shard:03}-{lsn:020}.ckpt` in the shard's store directory, a sequence of `wire`
//! records:
//!
//! * a `Checkpoint` record opening the file (`seq` = LSN, payload = shard u32, horizon u64);
//! * one `Data` record per version (`glt` = the version's timestamp, payload = one operation
//!   encoded as in [`super::op`]);
//! * a `Checkpoint` record closing it (`seq` = LSN, payload = shard u32, horizon u64,
//!   versions u64);
//! * zero padding.
//!
//! The checkpoint was fuzzy: `lsn` is the lowest LSN not yet applied when writing began, so
//! every record below it is in the file, and replaying the WAL from it re-applies some
//! versions the file already holds (applying is idempotent).
//!
//! [`decode`] is total over any bytes (fuzz target `checkpoint_decode`).

use bytes::Bytes;
use thiserror::Error;
use wire::RecordType;

use super::op::{self, Op, OpError};
use super::versions::Version;

/// The file name of a checkpoint.
pub fn file_name(shard_id: u32, lsn: u64) -> String {
    format!("ckpt-s{shard_id:03}-{lsn:020}.ckpt")
}

/// The (shard, LSN) of a checkpoint file name.
pub fn parse_file_name(name: &str) -> Option<(u32, u64)> {
    let rest = name.strip_prefix("ckpt-s")?.strip_suffix(".ckpt")?;
    let (shard, lsn) = rest.split_once('-')?;
    Some((shard.parse().ok()?, lsn.parse().ok()?))
}

/// Why a checkpoint file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CheckpointError {
    /// A record failed to decode.
    #[error("checkpoint record at offset {offset}: {error}")]
    Record {
        /// Byte offset of the record.
        offset: u64,
        /// The decode error.
        error: wire::DecodeError,
    },
    /// A version's operation failed to decode.
    #[error("checkpoint version at offset {offset}: {error}")]
    Op {
        /// Byte offset of the record.
        offset: u64,
        /// The decode error.
        error: OpError,
    },
    /// The records are not in the documented order or disagree with each other.
    #[error("checkpoint structure: {0}")]
    Structure(String),
}

/// What a checkpoint's header and footer say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The shard.
    pub shard_id: u32,
    /// Replay the WAL from here.
    pub lsn: u64,
    /// The retention horizon when it was written.
    pub horizon: u64,
    /// Versions it holds.
    pub versions: u64,
}

fn encode_marker(lsn: u64, shard_id: u32, horizon: u64, versions: Option<u64>, out: &mut Vec<u8>) {
    let mut payload = Vec::with_capacity(20);
    payload.extend_from_slice(&shard_id.to_le_bytes());
    payload.extend_from_slice(&horizon.to_le_bytes());
    if let Some(versions) = versions {
        payload.extend_from_slice(&versions.to_le_bytes());
    }
    push_record(RecordType::Checkpoint, 0, lsn, &payload, out);
}

fn push_record(kind: RecordType, glt: u64, seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + wire::encoded_len(payload.len()), 0);
    // Payloads here are bounded by the store's limits, far below the record limit.
    let _ = wire::encode_into(&mut out[start..], kind, glt, seq, payload);
}

/// Appends the opening record.
pub fn encode_header(shard_id: u32, lsn: u64, horizon: u64, out: &mut Vec<u8>) {
    encode_marker(lsn, shard_id, horizon, None, out);
}

/// Appends one version of `key`.
pub fn encode_version(key: &[u8], version: &Version, scratch: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), OpError> {
    scratch.clear();
    op::encode(std::iter::once((key, version.body.view())), scratch)?;
    push_record(RecordType::Data, version.ts, 0, scratch, out);
    Ok(())
}

/// Appends the closing record.
pub fn encode_footer(shard_id: u32, lsn: u64, horizon: u64, versions: u64, out: &mut Vec<u8>) {
    encode_marker(lsn, shard_id, horizon, Some(versions), out);
}

fn marker(payload: &[u8], with_count: bool) -> Option<(u32, u64, Option<u64>)> {
    let expected = if with_count { 20 } else { 12 };
    if payload.len() != expected {
        return None;
    }
    let shard = u32::from_le_bytes(payload[..4].try_into().ok()?);
    let horizon = u64::from_le_bytes(payload[4..12].try_into().ok()?);
    let count = if with_count { Some(u64::from_le_bytes(payload[12..20].try_into().ok()?)) } else { None };
    Some((shard, horizon, count))
}

/// Decodes a checkpoint, handing each version to `apply(op, ts)`. Keys and values are
/// zero-copy slices of `bytes` (which may be a memory map).
pub fn decode(
    bytes: &Bytes,
    payload_bytes_max: u32,
    mut apply: impl FnMut(Op, u64),
) -> Result<CheckpointInfo, CheckpointError> {
    let structure = |message: &str| CheckpointError::Structure(message.to_string());
    let mut offset = 0usize;
    let next = |offset: &mut usize| -> Result<(wire::Record<'_>, usize), CheckpointError> {
        let at = *offset;
        let (record, used) = wire::decode(&bytes[at..], payload_bytes_max)
            .map_err(|error| CheckpointError::Record { offset: at as u64, error })?;
        *offset += used;
        Ok((record, at))
    };
    let (header, _) = next(&mut offset)?;
    if header.record_type != RecordType::Checkpoint {
        return Err(structure("first record is not a checkpoint header"));
    }
    let (shard_id, horizon, _) = marker(header.payload, false).ok_or_else(|| structure("bad header payload"))?;
    let lsn = header.seq;
    let mut versions = 0u64;
    loop {
        let (record, at) = next(&mut offset)?;
        match record.record_type {
            RecordType::Data => {
                let payload = bytes.slice_ref(record.payload);
                let ops = op::decode(&payload).map_err(|error| CheckpointError::Op { offset: at as u64, error })?;
                let glt = record.glt;
                for op in ops {
                    apply(op, glt);
                    versions += 1;
                }
            }
            RecordType::Checkpoint => {
                let (footer_shard, footer_horizon, count) =
                    marker(record.payload, true).ok_or_else(|| structure("bad footer payload"))?;
                if footer_shard != shard_id || footer_horizon != horizon || record.seq != lsn {
                    return Err(structure("footer disagrees with header"));
                }
                if count != Some(versions) {
                    return Err(structure(&format!("footer counts {count:?} versions, file holds {versions}")));
                }
                break;
            }
            _ => return Err(structure("unexpected record type")),
        }
    }
    if bytes[offset..].iter().any(|byte| *byte != 0) {
        return Err(structure("bytes after the footer"));
    }
    Ok(CheckpointInfo { shard_id, lsn, horizon, versions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::op::Body;

    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        encode_header(3, 77, 5, &mut out);
        let v1 = Version { ts: 10, body: Body::Inline(Bytes::from_static(b"one")) };
        let v2 = Version { ts: 11, body: Body::Tombstone };
        encode_version(b"a", &v1, &mut scratch, &mut out).unwrap();
        encode_version(b"a", &v2, &mut scratch, &mut out).unwrap();
        encode_footer(3, 77, 5, 2, &mut out);
        out.extend_from_slice(&[0; 100]);
        out
    }

    #[test]
    fn roundtrip() {
        let bytes = Bytes::from(sample());
        let mut seen = Vec::new();
        let info = decode(&bytes, 1 << 20, |op, ts| seen.push((op, ts))).unwrap();
        assert_eq!(info, CheckpointInfo { shard_id: 3, lsn: 77, horizon: 5, versions: 2 });
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].1, 10);
        assert_eq!(seen[1].0.body, Body::Tombstone);
    }

    #[test]
    fn truncation_and_damage_are_errors() {
        let file = sample();
        let footer_end = file.len() - 100;
        for cut in 0..footer_end {
            assert!(decode(&Bytes::copy_from_slice(&file[..cut]), 1 << 20, |_, _| {}).is_err(), "cut {cut}");
        }
        let mut trailing = file.clone();
        trailing[footer_end + 3] = 1;
        assert!(matches!(decode(&Bytes::from(trailing), 1 << 20, |_, _| {}), Err(CheckpointError::Structure(_))));
    }

    #[test]
    fn names_roundtrip() {
        assert_eq!(parse_file_name(&file_name(7, 123)), Some((7, 123)));
        assert_eq!(parse_file_name("ckpt-s007-1.tmp"), None);
    }
}
