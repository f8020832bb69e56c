//! Snapshot archive bytes: packs (every entry opened: CRC, zstd, BLAKE3) and snapshot indexes.
#![no_main]

use client::archive::format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = format::decode_index(data);
    // Behind a valid magic and checksum, the bytes reach the index's tables.
    let _ = format::decode_index(&format::seal_index(data));
    let _ = format::decode_entry(data, 0);
    let mut pack = format::PACK_MAGIC.to_vec();
    pack.extend_from_slice(data);
    if let Ok(entries) = format::decode_pack(&pack) {
        for (_, entry) in entries {
            let _ = format::open_entry(&entry);
        }
    }
});
