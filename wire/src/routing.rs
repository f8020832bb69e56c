//! Key to shard routing. Pure and stable across processes, versions and platforms: the
//! client, every node and the on-disk placement must agree on it forever.

/// FNV-1a, 64 bit: stable, dependency-free, good enough dispersion as the input of jump hash.
fn fnv1a_64(key: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    key.iter().fold(OFFSET_BASIS, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(PRIME))
}

/// Jump consistent hash (Lamping & Veach 2014): when the shard count grows from n to n+1,
/// only 1/(n+1) of the keys move.
fn jump_consistent_hash(mut key: u64, buckets: u32) -> u32 {
    let mut bucket: i64 = -1;
    let mut jump: i64 = 0;
    while jump < i64::from(buckets) {
        bucket = jump;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        // The shift keeps 31 bits, so the conversion to f64 is exact.
        let divisor = ((key >> 33) + 1) as f64;
        #[expect(clippy::cast_possible_truncation, reason = "value is < buckets <= u32::MAX")]
        {
            jump = (((bucket + 1) as f64) * ((1_u64 << 31) as f64 / divisor)) as i64;
        }
    }
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "0 <= bucket < buckets")]
    {
        bucket as u32
    }
}

/// The shard that owns `key` among `shard_count` shards. `shard_count` of 0 is a programmer
/// error (a node always has at least one shard) and is treated as 1.
pub fn shard_for(key: &[u8], shard_count: u32) -> u32 {
    jump_consistent_hash(fnv1a_64(key), shard_count.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_known_values() {
        // Pinned: changing these moves every key of every deployed cluster.
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(shard_for(b"anything", 1), 0);
    }

    #[test]
    fn in_range_and_spread() {
        let shards = 8;
        let mut counts = [0_u32; 8];
        for index in 0..80_000_u32 {
            let shard = shard_for(format!("key-{index}").as_bytes(), shards);
            assert!(shard < shards);
            counts[shard as usize] += 1;
        }
        for count in counts {
            assert!((8_000..12_000).contains(&count), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn growth_moves_few_keys() {
        let moved = (0..10_000_u32)
            .filter(|index| {
                let key = format!("k{index}");
                shard_for(key.as_bytes(), 4) != shard_for(key.as_bytes(), 5)
            })
            .count();
        // Ideal is 1/5 of the keys; allow slack.
        assert!(moved < 2_600, "moved {moved}");
        for index in 0..10_000_u32 {
            let key = format!("k{index}");
            let (before, after) = (shard_for(key.as_bytes(), 4), shard_for(key.as_bytes(), 5));
            assert!(before == after || after == 4, "keys only move to the new shard");
        }
    }
}
