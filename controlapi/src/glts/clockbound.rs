//! AWS ClockBound's shared-memory segment (protocol version 2, `/var/run/clockbound/shm0`):
//! the clock error bound chronyd maintains, read without the daemon's client library.
//!
//! Layout (native endian, x86_64 and Graviton little endian): magic (8 bytes), segment size
//! (u32), version (u16), generation (u16; odd while the daemon writes), as-of and void-after
//! (`CLOCK_MONOTONIC_COARSE` timespecs, 2 x i64 each), bound (i64 ns at as-of), disruption
//! marker (u64), max drift (u32 ppb), clock status (i32; 1 = synchronized), disruption
//! support (u8). Pure: the caller passes the bytes and the coarse monotonic time.

use thiserror::Error;

/// Bytes of the version-2 segment this decoder reads.
pub const SEGMENT_BYTES: usize = 73;

/// The magic as the daemon writes it: `[0x414D5A4E, 0x43420200]` as two native u32.
const MAGIC_WORDS: [u32; 2] = [0x414D_5A4E, 0x4342_0200];
/// The magic as the protocol document spells it, byte by byte.
const MAGIC_BYTES: [u8; 8] = [0x41, 0x4D, 0x5A, 0x4E, 0x43, 0x42, 0x02, 0x00];

/// One consistent reading of the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// Generation (even).
    pub generation: u16,
    /// When the bound was computed, coarse monotonic ns.
    pub as_of_ns: u64,
    /// After this (coarse monotonic ns) the bound must not be used.
    pub void_after_ns: u64,
    /// Error bound of CLOCK_REALTIME at `as_of`, ns.
    pub bound_ns: u64,
    /// Drift bound between updates, parts per billion.
    pub max_drift_ppb: u32,
    /// 0 unknown, 1 synchronized, 2 free running, 3 disrupted.
    pub clock_status: i32,
}

/// Why the segment gives no bound.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClockBoundError {
    /// Shorter than the layout.
    #[error("clockbound segment truncated: {0} bytes")]
    Truncated(usize),
    /// Not a ClockBound segment.
    #[error("not a clockbound segment (bad magic)")]
    BadMagic,
    /// Another layout version.
    #[error("clockbound segment version {0} unsupported (want 2)")]
    Version(u16),
    /// The daemon was writing (odd generation): read again.
    #[error("clockbound segment is being updated")]
    Updating,
    /// A timestamp or bound that cannot be.
    #[error("clockbound segment holds an invalid {0}")]
    Invalid(&'static str),
    /// The clock is not synchronized.
    #[error("clockbound reports clock status {0} (not synchronized)")]
    NotSynchronized(i32),
    /// The bound is past its void-after time.
    #[error("clockbound bound is stale")]
    Stale,
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

fn timespec_ns(bytes: &[u8], at: usize) -> Option<u64> {
    let sec = i64::from_ne_bytes(field(bytes, at));
    let nsec = i64::from_ne_bytes(field(bytes, at + 8));
    if !(0..1_000_000_000).contains(&nsec) {
        return None;
    }
    u64::try_from(sec).ok()?.checked_mul(1_000_000_000)?.checked_add(u64::try_from(nsec).ok()?)
}

/// Decodes a segment.
pub fn decode(bytes: &[u8]) -> Result<Reading, ClockBoundError> {
    if bytes.len() < SEGMENT_BYTES {
        return Err(ClockBoundError::Truncated(bytes.len()));
    }
    let magic: [u8; 8] = field(bytes, 0);
    let words = [u32::from_ne_bytes(field(&magic, 0)), u32::from_ne_bytes(field(&magic, 4))];
    if words != MAGIC_WORDS && magic != MAGIC_BYTES {
        return Err(ClockBoundError::BadMagic);
    }
    let version = u16::from_ne_bytes(field(bytes, 12));
    if version != 2 {
        return Err(ClockBoundError::Version(version));
    }
    let generation = u16::from_ne_bytes(field(bytes, 14));
    if generation % 2 == 1 {
        return Err(ClockBoundError::Updating);
    }
    let as_of_ns = timespec_ns(bytes, 16).ok_or(ClockBoundError::Invalid("as-of timestamp"))?;
    let void_after_ns = timespec_ns(bytes, 32).ok_or(ClockBoundError::Invalid("void-after timestamp"))?;
    let bound_ns =
        u64::try_from(i64::from_ne_bytes(field(bytes, 48))).map_err(|_| ClockBoundError::Invalid("bound"))?;
    let max_drift_ppb = u32::from_ne_bytes(field(bytes, 64));
    let clock_status = i32::from_ne_bytes(field(bytes, 68));
    Ok(Reading { generation, as_of_ns, void_after_ns, bound_ns, max_drift_ppb, clock_status })
}

impl Reading {
    /// The error bound at coarse monotonic instant `now_ns`: the bound at as-of grown by the
    /// drift since.
    pub fn bound_at(&self, now_ns: u64) -> Result<u64, ClockBoundError> {
        if self.clock_status != 1 {
            return Err(ClockBoundError::NotSynchronized(self.clock_status));
        }
        if now_ns > self.void_after_ns {
            return Err(ClockBoundError::Stale);
        }
        let elapsed = u128::from(now_ns.saturating_sub(self.as_of_ns));
        let growth = (elapsed * u128::from(self.max_drift_ppb)).div_ceil(1_000_000_000);
        Ok(self.bound_ns.saturating_add(u64::try_from(growth).unwrap_or(u64::MAX)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(generation: u16, status: i32) -> Vec<u8> {
        let mut bytes = vec![0_u8; 80];
        bytes[0..4].copy_from_slice(&MAGIC_WORDS[0].to_ne_bytes());
        bytes[4..8].copy_from_slice(&MAGIC_WORDS[1].to_ne_bytes());
        bytes[8..12].copy_from_slice(&80_u32.to_ne_bytes());
        bytes[12..14].copy_from_slice(&2_u16.to_ne_bytes());
        bytes[14..16].copy_from_slice(&generation.to_ne_bytes());
        bytes[16..24].copy_from_slice(&100_i64.to_ne_bytes());
        bytes[32..40].copy_from_slice(&110_i64.to_ne_bytes());
        bytes[48..56].copy_from_slice(&50_000_i64.to_ne_bytes());
        bytes[64..68].copy_from_slice(&15_000_u32.to_ne_bytes());
        bytes[68..72].copy_from_slice(&status.to_ne_bytes());
        bytes
    }

    #[test]
    fn a_synchronized_segment_gives_a_bound_that_grows_with_drift() -> Result<(), ClockBoundError> {
        let reading = decode(&segment(4, 1))?;
        assert_eq!(reading.bound_at(100_000_000_000)?, 50_000);
        // One second later at 15 ppm: 15 µs more.
        assert_eq!(reading.bound_at(101_000_000_000)?, 65_000);
        assert_eq!(reading.bound_at(111_000_000_000), Err(ClockBoundError::Stale));
        Ok(())
    }

    #[test]
    fn unusable_segments_are_named() {
        assert_eq!(decode(&segment(5, 1)), Err(ClockBoundError::Updating));
        assert_eq!(decode(&segment(4, 1)[..40]), Err(ClockBoundError::Truncated(40)));
        let mut bad = segment(4, 1);
        bad[0] ^= 1;
        assert_eq!(decode(&bad), Err(ClockBoundError::BadMagic));
        let mut version = segment(4, 1);
        version[12] = 1;
        assert_eq!(decode(&version), Err(ClockBoundError::Version(1)));
        let free = decode(&segment(4, 2)).map(|r| r.bound_at(100_000_000_000));
        assert_eq!(free, Ok(Err(ClockBoundError::NotSynchronized(2))));
        let mut negative = segment(4, 1);
        negative[48..56].copy_from_slice(&(-1_i64).to_ne_bytes());
        assert_eq!(decode(&negative), Err(ClockBoundError::Invalid("bound")));
    }
}
