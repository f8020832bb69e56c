//! The engine's key and value decoders return a value or a typed error on any input, and a
//! decoded key encodes back to the same bytes.
#![no_main]

use dataplane::store::engine::codec::{decode_body, decode_key, encode_body, encode_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((key, ts)) = decode_key(data) {
        assert_eq!(encode_key(&key, ts), data);
    }
    if let Ok(body) = decode_body(data) {
        assert_eq!(decode_body(&encode_body(&body)), Ok(body));
    }
});
