//! WAL recovery decides what arbitrary segment bytes mean without panicking, in both modes.
//! The input is cut into up to four segments; the first bytes pick their sizes.
#![no_main]

use dataplane::wal::recovery::{plan, RecoveryMode, SegmentBytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else { return };
    let count = usize::from(count % 4) + 1;
    let size = rest.len() / count;
    let segments: Vec<SegmentBytes<'_>> = (0..count)
        .map(|index| SegmentBytes { segment_seq: index as u64 + 1, bytes: &rest[index * size..(index + 1) * size] })
        .collect();
    for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTornTail] {
        if let Ok(recovered) = plan(0, &segments, mode, 1 << 16) {
            assert!(recovered.segments.iter().all(|segment| segment.frontier <= segment.segment_bytes));
        }
    }
});
