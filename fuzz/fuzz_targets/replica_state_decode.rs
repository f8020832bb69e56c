//! A replica member's state file decodes to a state or a typed error on any input, never
//! panics; a decoded state encodes to bytes that decode to it again.
#![no_main]

use dataplane::replica::{decode_state, encode_state};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = decode_state(data) {
        let again = encode_state(&state);
        // JSON may be written differently (spaces, field order): the state itself round-trips.
        assert_eq!(decode_state(&again).as_ref(), Ok(&state));
    }
});
