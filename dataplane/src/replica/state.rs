//! What a member saves before it answers ([`crate::replica::Action::Save`]): the highest epoch
//! it has seen, that epoch's primary, and the newest set the control plane gave it. A member
//! that forgot a newer epoch after a restart could accept an older primary's batches and let
//! it acknowledge a write the new primary never sees, so the file is replaced durably and a
//! damaged one is an error, never a fresh start. Pure: the bytes only.
//!
//! ```text
//! "meridian-replica-state v1\n" | length u32 LE | JSON (length bytes) | CRC32C of the JSON u32 LE
//! ```

use controlapi::replica::SetConfig;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8] = b"meridian-replica-state v1\n";
/// A state file larger than this is damage, not state.
const JSON_BYTES_MAX: usize = 1 << 20;

/// A member's saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    pub epoch: u64,
    pub primary: Option<String>,
    pub config: Option<SetConfig>,
}

/// Why bytes are not a member state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("not a replica state file (bad magic)")]
    BadMagic,
    #[error("truncated: {have} bytes, {needed} needed")]
    Truncated { needed: usize, have: usize },
    #[error("a state of {0} bytes is larger than any real one")]
    TooLarge(usize),
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("{0} bytes after the checksum")]
    TrailingBytes(usize),
    #[error("undecodable state: {0}")]
    Json(String),
}

/// The file's bytes.
pub fn encode(state: &MemberState) -> Vec<u8> {
    // A struct of integers, strings and vectors always serializes.
    let json = serde_json::to_vec(state).unwrap_or_default();
    let mut bytes = Vec::with_capacity(MAGIC.len() + json.len() + 8);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_le_bytes());
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    bytes
}

/// The state in `bytes`, or why it is not one.
pub fn decode(bytes: &[u8]) -> Result<MemberState, StateError> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(StateError::BadMagic)?;
    let need = |needed: usize| {
        if rest.len() < needed { Err(StateError::Truncated { needed, have: rest.len() }) } else { Ok(()) }
    };
    need(4)?;
    let length = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    if length > JSON_BYTES_MAX {
        return Err(StateError::TooLarge(length));
    }
    need(4 + length + 4)?;
    let json = &rest[4..4 + length];
    let stored = u32::from_le_bytes([rest[4 + length], rest[5 + length], rest[6 + length], rest[7 + length]]);
    let computed = crc32c::crc32c(json);
    if stored != computed {
        return Err(StateError::Checksum { stored, computed });
    }
    if rest.len() > 8 + length {
        return Err(StateError::TrailingBytes(rest.len() - 8 - length));
    }
    serde_json::from_slice(json).map_err(|error| StateError::Json(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> MemberState {
        let nodes: Vec<String> = ["a", "b", "c"].map(str::to_owned).to_vec();
        MemberState { epoch: 7, primary: Some("b".into()), config: Some(SetConfig::initial(&nodes, 2)) }
    }

    #[test]
    fn a_state_round_trips_and_every_damage_is_named() {
        let bytes = encode(&state());
        assert_eq!(decode(&bytes), Ok(state()));
        assert_eq!(decode(&encode(&MemberState::default())), Ok(MemberState::default()));
        assert_eq!(decode(b"meridian-position"), Err(StateError::BadMagic));
        for cut in [MAGIC.len(), MAGIC.len() + 3, bytes.len() - 1] {
            assert!(matches!(decode(&bytes[..cut]), Err(StateError::Truncated { .. })), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[MAGIC.len() + 10] ^= 1;
        assert!(matches!(decode(&flipped), Err(StateError::Checksum { .. })));
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(StateError::TrailingBytes(1)));
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(StateError::TooLarge(_))));
        // A checksummed body that is not a state.
        let json = b"[1,2]";
        let mut wrong = MAGIC.to_vec();
        wrong.extend_from_slice(&5_u32.to_le_bytes());
        wrong.extend_from_slice(json);
        wrong.extend_from_slice(&crc32c::crc32c(json).to_le_bytes());
        assert!(matches!(decode(&wrong), Err(StateError::Json(_))));
    }
}
