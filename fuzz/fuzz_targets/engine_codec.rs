//! The engine's key and value decoders return a value or a typed error on any input, and a
//! decoded key (its chunked mark included) encodes back to the same bytes.
#![no_main]

use std::sync::Arc;

use dataplane::store::engine::codec::{decode_body, decode_version_key, encode_body, encode_version_key};
use dataplane::store::op::{Body, ChunkList};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((key, ts, chunked)) = decode_version_key(data) {
        let body =
            if chunked { Body::Chunked(Arc::new(ChunkList { size: 0, chunks: Vec::new() })) } else { Body::Tombstone };
        assert_eq!(encode_version_key(&key, ts, &body), data);
    }
    if let Ok(body) = decode_body(data) {
        assert_eq!(decode_body(&encode_body(&body)), Ok(body));
    }
});
