//! The local time bound of a control-plane node, in the order of preference:
//! AWS ClockBound's shared memory when present, the kernel's adjtimex maxerror when the
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

/// Reads the local bound now: the interval and where it came from.
///
/// ClockBound: its presence is detected; its segment format is not parsed yet, so a host
/// with ClockBound falls through to adjtimex, which chrony keeps synchronised there.
pub fn read_local(asserted_error_us: u64) -> (Interval, LocalSource) {
    let _clockbound_present = Path::new(CLOCKBOUND_SHM).exists();
    let now = realtime_ns();
    let source = match adjtimex_maxerror_us() {
        Some(maxerror_us) => LocalSource::Adjtimex { maxerror_us },
        None => LocalSource::Asserted { error_us: asserted_error_us },
    };
    let error_ns = match source {
        LocalSource::Adjtimex { maxerror_us } => maxerror_us,
        LocalSource::Asserted { error_us } => error_us,
    }
    .saturating_mul(1000);
    (Interval { earliest_ns: now.saturating_sub(error_ns), latest_ns: now.saturating_add(error_ns) }, source)
}
