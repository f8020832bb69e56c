//! Deterministic records for crash tests and disk qualification (`wal-torture`): a record's
//! payload is derived from its id, so a reader can tell an intact record from a damaged or
//! invented one without any other state.

/// The payload of record `id`, `length` bytes (at least 8): the id, then bytes derived from it.
pub fn payload(id: u64, length: usize) -> Vec<u8> {
    let mut bytes = id.to_le_bytes().to_vec();
    let mut state = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while bytes.len() < length.max(8) {
        // xorshift64: cheap and stable.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.push(state.to_le_bytes()[0]);
    }
    bytes
}

/// The id of a payload made by [`payload`], or `None` if the bytes are not exactly that.
pub fn check_payload(bytes: &[u8]) -> Option<u64> {
    let id = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    (payload(id, bytes.len()) == bytes).then_some(id)
}

/// Record id of `(round, task, index)`: 23, 20 and 20 bits.
pub fn record_id(round: u64, task: u64, index: u64) -> u64 {
    round << 40 | task << 20 | index
}

/// Inverse of [`record_id`].
pub fn split_record_id(id: u64) -> (u64, u64, u64) {
    (id >> 40, (id >> 20) & 0xf_ffff, id & 0xf_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_check_and_ids_split() {
        let bytes = payload(42, 100);
        assert_eq!(check_payload(&bytes), Some(42));
        let mut damaged = bytes.clone();
        damaged[50] ^= 1;
        assert_eq!(check_payload(&damaged), None);
        assert_eq!(split_record_id(record_id(3, 5, 7)), (3, 5, 7));
    }
}
