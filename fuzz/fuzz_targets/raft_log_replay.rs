//! The Raft log file: any bytes replay to a log image or a typed error, never a panic, and
//! the valid prefix is never longer than the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = controlplane::raftlog::replay(data) {
        assert!(image.valid_bytes <= data.len());
    }
});
