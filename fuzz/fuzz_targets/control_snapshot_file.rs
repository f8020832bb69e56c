//! The control plane's snapshot file: any bytes give a snapshot or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = controlplane::sm::decode_snapshot_file(data);
});
