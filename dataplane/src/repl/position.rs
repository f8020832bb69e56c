//! A replica shard's resume position per source region: the first LSN of the source shard's
//! WAL not yet durable here. One small text file per (shard, source region),
//! `<shard dir>/repl-from-<region>.pos`, replaced atomically and durably (temporary file,
//! fsync, rename, directory fsync). It is written only after the records below it are durable,
//! and lazily: a stale position only makes the source resend records, whose application is
//! idempotent.

use std::path::{Path, PathBuf};

use thiserror::Error;

const MAGIC: &str = "meridian-repl-position v1 ";

/// Why a position file's bytes are not a position.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PositionError {
    /// Not the expected text.
    #[error("not a replication position file")]
    BadFormat,
}

/// Decodes a position file.
pub fn decode(bytes: &[u8]) -> Result<u64, PositionError> {
    let text = std::str::from_utf8(bytes).map_err(|_| PositionError::BadFormat)?;
    let number = text.strip_prefix(MAGIC).and_then(|rest| rest.strip_suffix('\n')).ok_or(PositionError::BadFormat)?;
    if number.is_empty() || !number.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(PositionError::BadFormat);
    }
    number.parse().map_err(|_| PositionError::BadFormat)
}

/// Encodes a position file.
pub fn encode(next_lsn: u64) -> String {
    format!("{MAGIC}{next_lsn}\n")
}

/// The file of `region` in a shard directory.
pub fn path(shard_dir: &Path, region: &str) -> PathBuf {
    shard_dir.join(format!("repl-from-{region}.pos"))
}

/// The stored position (1, the first LSN, when there is none yet).
pub fn load(shard_dir: &Path, region: &str) -> Result<u64, String> {
    let path = path(shard_dir, region);
    match std::fs::read(&path) {
        Ok(bytes) => decode(&bytes).map_err(|error| format!("{}: {error}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(1),
        Err(error) => Err(format!("{}: {error}", path.display())),
    }
}

/// Replaces the stored position durably: the temporary file is synced before the rename, and
/// the directory after it, so a crash leaves the old position or the new one, never an empty
/// or partial file. Blocking (fsync): call it off the async threads.
pub fn store(shard_dir: &Path, region: &str, next_lsn: u64) -> std::io::Result<()> {
    crate::files::replace_durably(&path(shard_dir, region), encode(next_lsn).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_roundtrip_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), "eu"), Ok(1));
        store(dir.path(), "eu", 42).unwrap();
        assert_eq!(load(dir.path(), "eu"), Ok(42));
        assert_eq!(decode(encode(7).as_bytes()), Ok(7));
        for bad in [
            "",
            "meridian-repl-position v1 \n",
            "meridian-repl-position v1 -3\n",
            "x 5\n",
            "meridian-repl-position v1 5",
        ] {
            assert_eq!(decode(bad.as_bytes()), Err(PositionError::BadFormat), "{bad:?}");
        }
        std::fs::write(path(dir.path(), "us"), b"garbage").unwrap();
        assert!(load(dir.path(), "us").unwrap_err().contains("repl-from-us.pos"));
    }

    #[test]
    fn a_failed_write_keeps_the_previous_position() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path(), "eu", 10).unwrap();
        assert!(!path(dir.path(), "eu").with_extension("pos.tmp").exists(), "the temporary file was renamed");
        // The temporary file cannot be created: a directory is in its way.
        std::fs::create_dir(path(dir.path(), "eu").with_extension("pos.tmp")).unwrap();
        assert!(store(dir.path(), "eu", 20).is_err());
        assert_eq!(load(dir.path(), "eu"), Ok(10));
        assert!(store(&dir.path().join("gone"), "eu", 30).is_err(), "a missing shard directory is an error");
    }
}
