//! Compression of batch bodies: LZ4 (block format, `lz4_flex`), Snappy (raw format, `snap`)
//! or none. Decompression checks the announced length first and returns a typed error on any
//! input (fuzz target `repl_decode`).

use thiserror::Error;
use wire::repl::{Codec, FRAME_PAYLOAD_BYTES_MAX};

/// Why a body does not decompress.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum CodecError {
    /// The announced length is above the frame limit.
    #[error("announced raw length {len} exceeds {max}")]
    TooLarge {
        /// The length announced.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The compressed bytes are damaged.
    #[error("{codec} body does not decompress: {reason}")]
    Damaged {
        /// The codec's name.
        codec: &'static str,
        /// What the decompressor said.
        reason: String,
    },
    /// The body decompressed to another length than announced.
    #[error("body decompressed to {found} bytes, {announced} announced")]
    Length {
        /// Bytes found.
        found: usize,
        /// Bytes announced.
        announced: u32,
    },
}

/// Compresses `raw` with `codec`.
pub fn compress(codec: Codec, raw: &[u8]) -> Vec<u8> {
    match codec {
        Codec::None => raw.to_vec(),
        Codec::Lz4 => lz4_flex::block::compress(raw),
        // The raw encoder fails only past its 4 GiB input limit, far above a frame's.
        Codec::Snappy => snap::raw::Encoder::new().compress_vec(raw).unwrap_or_else(|_| raw.to_vec()),
    }
}

/// Decompresses `body` to exactly `raw_len` bytes.
pub fn decompress(codec: Codec, body: &[u8], raw_len: u32) -> Result<Vec<u8>, CodecError> {
    if raw_len > FRAME_PAYLOAD_BYTES_MAX {
        return Err(CodecError::TooLarge { len: raw_len, max: FRAME_PAYLOAD_BYTES_MAX });
    }
    let damaged = |reason: String| CodecError::Damaged { codec: codec.name(), reason };
    let raw = match codec {
        Codec::None => body.to_vec(),
        Codec::Lz4 => lz4_flex::block::decompress(body, raw_len as usize).map_err(|e| damaged(e.to_string()))?,
        Codec::Snappy => {
            let len = snap::raw::decompress_len(body).map_err(|e| damaged(e.to_string()))?;
            if len != raw_len as usize {
                return Err(CodecError::Length { found: len, announced: raw_len });
            }
            snap::raw::Decoder::new().decompress_vec(body).map_err(|e| damaged(e.to_string()))?
        }
    };
    if raw.len() != raw_len as usize {
        return Err(CodecError::Length { found: raw.len(), announced: raw_len });
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_roundtrips_and_refuses_damage() {
        let raw: Vec<u8> = (0..10_000u32).flat_map(|i| (i % 97).to_le_bytes()).collect();
        for codec in [Codec::None, Codec::Lz4, Codec::Snappy] {
            let body = compress(codec, &raw);
            assert_eq!(decompress(codec, &body, raw.len() as u32).unwrap(), raw);
            assert!(decompress(codec, &body, raw.len() as u32 + 1).is_err());
            assert!(decompress(codec, &body[..body.len() / 2], raw.len() as u32).is_err());
            if codec != Codec::None {
                assert!(body.len() < raw.len() / 2, "{codec:?} compresses a repetitive body");
            }
        }
        assert!(matches!(decompress(Codec::Lz4, &[], u32::MAX), Err(CodecError::TooLarge { .. })));
    }
}
