//! The record decoder returns a typed error or a record on any input, never panics, and a
//! decoded record re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limit = data.first().map_or(0, |byte| u32::from(*byte) << 8);
    let _ = wire::decode_header(data, limit);
    if let Ok((record, used)) = wire::decode(data, limit) {
        let mut again = vec![0_u8; used];
        let written = wire::encode_into(&mut again, record.record_type, record.glt, record.seq, record.payload)
            .expect("a decoded record re-encodes");
        assert_eq!(&again[..written], &data[..used]);
    }
});
