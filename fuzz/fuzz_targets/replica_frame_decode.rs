//! A frame between the copies of a shard decodes to a frame or a typed error on any input,
//! never panics; a decoded frame encodes to the same bytes.
#![no_main]

use bytes::Bytes;
use dataplane::replica::{decode_frame, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(frame) = decode_frame(&bytes) {
        let mut again = Vec::new();
        encode_frame(&frame, &mut again);
        assert_eq!(&again[..], data);
    }
});
