//! A checkpoint file decodes or gives a typed error on any bytes; the versions it hands out
//! match the count its footer states.
#![no_main]

use bytes::Bytes;
use dataplane::store::checkpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let mut seen = 0u64;
    if let Ok(info) = checkpoint::decode(&bytes, 1 << 20, |_, _| seen += 1) {
        assert_eq!(info.versions, seen);
    }
});
