//! Chunk file verification returns the data or a named error on any bytes, and never returns
//! data of the wrong length.
#![no_main]

use dataplane::store::chunks;
use dataplane::store::op::ChunkRef;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.first().map_or(0, |byte| u32::from(*byte) * 97);
    let mut hash = [0u8; 32];
    for (slot, byte) in hash.iter_mut().zip(data.iter().skip(1)) {
        *slot = *byte;
    }
    let expected = ChunkRef { hash, len };
    if let Ok(bytes) = chunks::verify(&expected, data) {
        assert_eq!(bytes.len(), len as usize);
    }
});
