//! Replication frames, batch and snapshot-part bodies (each codec) and replica position files decode to a value
//! or a typed error on any input, never panic; a decoded frame re-encodes to the same bytes.
#![no_main]

use dataplane::repl::{codec, decode_position};
use libfuzzer_sys::fuzz_target;
use wire::repl::{self, Codec, Entries, Frame};

fuzz_target!(|data: &[u8]| {
    if let Ok((frame, used)) = repl::decode_frame(data) {
        let mut again = Vec::new();
        repl::encode_frame(&frame, &mut again).expect("a decoded frame encodes");
        assert_eq!(again, data[..used]);
        let body = match frame {
            Frame::Batch(batch) => Some((batch.codec, batch.body, batch.raw_len, batch.count)),
            Frame::Install(part) => Some((part.codec, part.body, part.raw_len, part.count)),
            _ => None,
        };
        if let Some((codec_, body, raw_len, count)) = body {
            if let Ok(raw) = codec::decompress(codec_, body, raw_len) {
                if let Ok(entries) = Entries::new(&raw, count) {
                    assert_eq!(entries.iter().count() as u32, entries.len());
                }
            }
        }
    }
    let _ = repl::frame_len(data);
    if let Some((&first, rest)) = data.split_first() {
        let raw_len = u32::from(first) << 8;
        for codec_ in [Codec::None, Codec::Lz4, Codec::Snappy] {
            let _ = codec::decompress(codec_, rest, raw_len);
        }
        if let Ok(entries) = Entries::new(rest, u32::from(first)) {
            assert_eq!(entries.iter().count(), usize::from(first));
        }
    }
    let _ = decode_position(data);
});
