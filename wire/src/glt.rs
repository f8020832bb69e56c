//! The GLT (global logical timestamp) layout every crate shares: `physical_us <<
//! LOGICAL_BITS | logical`, physical microseconds since the Unix epoch in the high 52 bits
//! (good until 2112) and a logical counter in the low bits. Pure.

/// Bits of the logical counter.
pub const LOGICAL_BITS: u32 = 12;

/// The timestamp whose physical part is `physical_us` and logical part 0.
pub fn timestamp_at(physical_us: u64) -> u64 {
    physical_us.saturating_mul(1 << LOGICAL_BITS)
}

/// The physical part of a timestamp, in microseconds since the Unix epoch.
pub fn physical_us(ts: u64) -> u64 {
    ts >> LOGICAL_BITS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_physical_part_round_trips() {
        assert_eq!(physical_us(timestamp_at(1_700_000_000_000_000) | 0xFFF), 1_700_000_000_000_000);
        assert_eq!(timestamp_at(u64::MAX), u64::MAX, "saturates");
    }
}
