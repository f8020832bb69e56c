//! The local time bound of a control-plane node, in order of preference: AWS ClockBound's
//! shared memory when present and synchronized, the kernel's adjtimex maxerror when the
//! clock is synchronised, else an error the operator asserts (`glts.asserted_error_us`),
//! reported as such.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use crate::glts::Interval;

/// Where ClockBound's daemon publishes its shared segment.
pub const CLOCKBOUND_SHM: &str = "/var/run/clockbound/shm0";

/// Local monotonic ns since the process's first call (the `mono_ns` the GLTS core wants).
pub fn mono_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// CLOCK_REALTIME in ns since the Unix epoch.
pub fn realtime_ns() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_nanos()).unwrap_or(u64::MAX)
}

/// Unix milliseconds.
pub fn unix_ms() -> u64 {
    realtime_ns() / 1_000_000
}

/// What the local bound comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalSource {
    /// ClockBound's shared memory (chronyd's bound, grown by its drift since).
    ClockBound {
        /// The bound now, µs.
        bound_us: u64,
    },
    /// The kernel's clock is synchronised; its maxerror bounds it.
    Adjtimex {
        /// maxerror, µs.
        maxerror_us: u64,
    },
    /// Nothing bounds the clock; the configured error is asserted.
    Asserted {
        /// The asserted error, µs.
        error_us: u64,
    },
}

impl std::fmt::Display for LocalSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClockBound { bound_us } => write!(f, "clockbound ({CLOCKBOUND_SHM}, bound {bound_us} µs)"),
            Self::Adjtimex { maxerror_us } => write!(f, "adjtimex (synchronised, maxerror {maxerror_us} µs)"),
            Self::Asserted { error_us } => {
                write!(f, "asserted ±{error_us} µs (clock unsynchronised; no ClockBound at {CLOCKBOUND_SHM})")
            }
        }
    }
}

/// The kernel's verdict: `Some(maxerror µs)` when synchronised.
pub fn adjtimex_maxerror_us() -> Option<u64> {
    // SAFETY: adjtimex with modes = 0 only reads; `timex` is a plain C struct we own.
    let mut timex: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the pointer is valid for the call.
    let state = unsafe { libc::adjtimex(&mut timex) };
    if state < 0 || state == libc::TIME_ERROR {
        return None;
    }
    u64::try_from(timex.maxerror).ok()
}

fn monotonic_coarse_ns() -> u64 {
    // SAFETY: clock_gettime writes into the timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// ClockBound's bound now, ns, when its segment exists and gives a usable one. The segment
/// is read twice; a reading counts only if the generation did not move between them.
pub fn clockbound_bound_ns(path: &Path) -> Option<u64> {
    for _ in 0..3 {
        let first = crate::glts::clockbound::decode(&std::fs::read(path).ok()?);
        let second = crate::glts::clockbound::decode(&std::fs::read(path).ok()?);
        match (first, second) {
            (Ok(a), Ok(b)) if a.generation == b.generation => return b.bound_at(monotonic_coarse_ns()).ok(),
            (Err(crate::glts::clockbound::ClockBoundError::Updating), _)
            | (_, Err(crate::glts::clockbound::ClockBoundError::Updating)) => continue,
            (Ok(_), Ok(_)) => continue,
            _ => return None,
        }
    }
    None
}

/// A local bound as read: where from, its error then, and when (local monotonic ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalBound {
    /// Where it comes from.
    pub source: LocalSource,
    error_ns: u64,
    read_at_mono_ns: u64,
}

impl LocalBound {
    /// The interval at local instant `mono_ns`, when CLOCK_REALTIME reads `realtime_ns`. A
    /// measured bound (ClockBound, adjtimex) grows by `drift_ppm` since it was read; an
    /// asserted one is a standing claim and does not.
    pub fn interval(&self, mono_ns: u64, realtime_ns: u64, drift_ppm: u64) -> Interval {
        let age_ns = u128::from(mono_ns.saturating_sub(self.read_at_mono_ns));
        let growth = match self.source {
            LocalSource::Asserted { .. } => 0,
            LocalSource::ClockBound { .. } | LocalSource::Adjtimex { .. } => {
                u64::try_from((age_ns * u128::from(drift_ppm)).div_ceil(1_000_000)).unwrap_or(u64::MAX)
            }
        };
        let error_ns = self.error_ns.saturating_add(growth);
        Interval { earliest_ns: realtime_ns.saturating_sub(error_ns), latest_ns: realtime_ns.saturating_add(error_ns) }
    }
}

/// Reads the local bound now, from the first source that gives one.
pub fn read_local(asserted_error_us: u64) -> LocalBound {
    let read_at_mono_ns = mono_ns();
    let (source, error_ns) = match (clockbound_bound_ns(Path::new(CLOCKBOUND_SHM)), adjtimex_maxerror_us()) {
        (Some(bound_ns), _) => (LocalSource::ClockBound { bound_us: bound_ns.div_ceil(1000) }, bound_ns),
        (None, Some(maxerror_us)) => (LocalSource::Adjtimex { maxerror_us }, maxerror_us.saturating_mul(1000)),
        (None, None) => (LocalSource::Asserted { error_us: asserted_error_us }, asserted_error_us.saturating_mul(1000)),
    };
    LocalBound { source, error_ns, read_at_mono_ns }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(as_of_ns: u64, status: i32) -> Vec<u8> {
        let mut bytes = vec![0_u8; 80];
        bytes[0..4].copy_from_slice(&0x414D_5A4E_u32.to_ne_bytes());
        bytes[4..8].copy_from_slice(&0x4342_0200_u32.to_ne_bytes());
        bytes[12..14].copy_from_slice(&2_u16.to_ne_bytes());
        bytes[14..16].copy_from_slice(&8_u16.to_ne_bytes());
        let secs = |ns: u64| i64::try_from(ns / 1_000_000_000).unwrap_or(0);
        let nanos = |ns: u64| i64::try_from(ns % 1_000_000_000).unwrap_or(0);
        bytes[16..24].copy_from_slice(&secs(as_of_ns).to_ne_bytes());
        bytes[24..32].copy_from_slice(&nanos(as_of_ns).to_ne_bytes());
        let void_after = as_of_ns + 10_000_000_000;
        bytes[32..40].copy_from_slice(&secs(void_after).to_ne_bytes());
        bytes[40..48].copy_from_slice(&nanos(void_after).to_ne_bytes());
        bytes[48..56].copy_from_slice(&40_000_i64.to_ne_bytes());
        bytes[64..68].copy_from_slice(&10_000_u32.to_ne_bytes());
        bytes[68..72].copy_from_slice(&status.to_ne_bytes());
        bytes
    }

    #[test]
    fn a_clockbound_segment_file_gives_the_bound_and_a_free_running_one_none() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("shm0");
        std::fs::write(&path, segment(monotonic_coarse_ns(), 1))?;
        let bound = clockbound_bound_ns(&path);
        assert!(bound.is_some_and(|ns| (40_000..41_000).contains(&ns)), "{bound:?}");
        std::fs::write(&path, segment(monotonic_coarse_ns(), 2))?;
        assert_eq!(clockbound_bound_ns(&path), None);
        assert_eq!(clockbound_bound_ns(&dir.path().join("absent")), None);
        Ok(())
    }
}
