//! The engine's key and value decoders return a value or a typed error on any input, and a
//! decoded key (its chunked mark included) encodes back to the same bytes.
#![no_main]

use dataplane::store::engine::codec::{decode_body, decode_version_key, encode_body, encode_chunked_key, encode_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((key, ts, chunked)) = decode_version_key(data) {
        let encoded = if chunked { encode_chunked_key(&key, ts) } else { encode_key(&key, ts) };
        assert_eq!(encoded, data);
    }
    if let Ok(body) = decode_body(data) {
        assert_eq!(decode_body(&encode_body(&body)), Ok(body));
    }
});
