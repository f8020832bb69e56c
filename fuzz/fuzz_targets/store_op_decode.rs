//! The store's WAL payload decoder returns operations or a typed error on any input, and what
//! it returns re-encodes to the same bytes.
#![no_main]

use bytes::Bytes;
use dataplane::store::op;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);
    if let Ok(ops) = op::decode(&payload) {
        let mut again = Vec::new();
        op::encode(ops.iter().map(|op| (&op.key[..], op.body.view())), &mut again).expect("decoded ops re-encode");
        assert_eq!(again, data);
    }
});
