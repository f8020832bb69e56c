//! The GLT (global logical timestamp) layout every crate shares: `physical_us <<
//! LOGICAL_BITS | logical`, physical microseconds since the Unix epoch in the high 52 bits
//! (good until 2112) and a logical counter in the low bits. Pure.
//!
//! In a cluster with multi-master keyspaces, the lowest [`ORIGIN_BITS`] of the logical
//! counter name the region that stamped the timestamp (its origin): stamps of different
//! regions then never collide, and ordering versions by timestamp is last-writer-wins by
//! (time, origin region).

/// Bits of the logical counter.
pub const LOGICAL_BITS: u32 = 12;

/// Low bits of the logical counter that hold the origin region (multi-master clusters).
pub const ORIGIN_BITS: u32 = 4;

/// Most regions a multi-master cluster can name in [`ORIGIN_BITS`].
pub const ORIGINS_MAX: usize = 1 << ORIGIN_BITS;

const ORIGIN_MASK: u64 = (1 << ORIGIN_BITS) - 1;

/// The timestamp whose physical part is `physical_us` and logical part 0.
pub fn timestamp_at(physical_us: u64) -> u64 {
    physical_us.saturating_mul(1 << LOGICAL_BITS)
}

/// The physical part of a timestamp, in microseconds since the Unix epoch.
pub fn physical_us(ts: u64) -> u64 {
    ts >> LOGICAL_BITS
}

/// The origin region of a timestamp stamped in a multi-master cluster.
pub fn origin_of(ts: u64) -> u8 {
    (ts & ORIGIN_MASK) as u8
}

/// The smallest timestamp at or above `ts` whose origin is `origin` (taken modulo
/// [`ORIGINS_MAX`]); saturates at the largest such timestamp.
pub fn with_origin(ts: u64, origin: u8) -> u64 {
    let origin = u64::from(origin) & ORIGIN_MASK;
    let candidate = (ts & !ORIGIN_MASK) | origin;
    if candidate >= ts { candidate } else { candidate.checked_add(ORIGIN_MASK + 1).unwrap_or(candidate) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_physical_part_round_trips() {
        assert_eq!(physical_us(timestamp_at(1_700_000_000_000_000) | 0xFFF), 1_700_000_000_000_000);
        assert_eq!(timestamp_at(u64::MAX), u64::MAX, "saturates");
    }

    #[test]
    fn a_timestamp_moves_up_to_its_origin() {
        let base = timestamp_at(1_000);
        assert_eq!(with_origin(base, 0), base);
        assert_eq!(with_origin(base, 3), base + 3);
        assert_eq!(with_origin(base + 3, 3), base + 3);
        assert_eq!(with_origin(base + 4, 3), base + 19);
        assert_eq!(origin_of(with_origin(base + 4, 3)), 3);
        assert_eq!(with_origin(u64::MAX - 1, 2), u64::MAX - 13, "saturates below the top");
        for ts in [0, 1, 15, 16, 17, base + 7] {
            for origin in 0..16 {
                let stamped = with_origin(ts, origin);
                assert!(stamped >= ts && stamped - ts < 16 && origin_of(stamped) == origin);
            }
        }
    }
}
