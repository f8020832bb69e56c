//! Segment headers and batch headers decode to a value or a typed error on any input.
#![no_main]

use dataplane::wal::format::{BatchBegin, SegmentHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = SegmentHeader::decode(data);
    let _ = BatchBegin::decode(data);
});
