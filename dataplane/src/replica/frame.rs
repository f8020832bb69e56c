//! The bytes of a [`Frame`] between the copies of a shard (pure). Little-endian:
//!
//! ```text
//! shard u32 | kind u8 | epoch u64 | body
//!   Probe     (1): -
//!   Shape     (2): end u64 | runs u32 | runs x (epoch u64, first u64)
//!   Append    (3): prev_epoch u64 | first u64 | next u64 | batch_epoch u64 | commit u64
//!                  | image_len u32 | image (a WAL batch; present exactly when first < next)
//!   Appended  (4): end u64
//!   Refuse    (5): -
//! ```
//!
//! On a stream each frame is preceded by its length (u32); [`FRAME_BYTES_MAX`] bounds it.

use bytes::Bytes;
use controlapi::replica::LogShape;

use super::core::Message;

/// A message between copies, with the batch image an `Append` of records carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub shard: u32,
    pub message: Message,
    /// The WAL batch holding exactly the records `first..next` of an `Append`.
    pub image: Option<Bytes>,
}

/// The largest frame accepted (a WAL batch is at most a few MiB).
pub const FRAME_BYTES_MAX: usize = 64 << 20;

/// Epoch runs a shape may carry (one per epoch change of a shard's log).
const RUNS_MAX: usize = 1 << 16;

const PROBE: u8 = 1;
const SHAPE: u8 = 2;
const APPEND: u8 = 3;
const APPENDED: u8 = 4;
const REFUSE: u8 = 5;

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame truncated in {what}")]
    Truncated { what: &'static str },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{0} bytes after the frame")]
    Trailing(usize),
    #[error("invalid frame: {0}")]
    Invalid(String),
}

/// Appends the bytes of `frame` to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    out.extend_from_slice(&frame.shard.to_le_bytes());
    let words = |out: &mut Vec<u8>, words: &[u64]| {
        for word in words {
            out.extend_from_slice(&word.to_le_bytes());
        }
    };
    match &frame.message {
        Message::Probe { epoch } => {
            out.push(PROBE);
            words(out, &[*epoch]);
        }
        Message::Shape { epoch, log } => {
            out.push(SHAPE);
            words(out, &[*epoch, log.end]);
            out.extend_from_slice(&u32::try_from(log.epochs.len()).unwrap_or(u32::MAX).to_le_bytes());
            for (run_epoch, first) in &log.epochs {
                words(out, &[*run_epoch, *first]);
            }
        }
        Message::Append { epoch, prev_epoch, first, next, batch_epoch, commit } => {
            out.push(APPEND);
            words(out, &[*epoch, *prev_epoch, *first, *next, *batch_epoch, *commit]);
            let image = frame.image.as_deref().unwrap_or_default();
            out.extend_from_slice(&u32::try_from(image.len()).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(image);
        }
        Message::Appended { epoch, end } => {
            out.push(APPENDED);
            words(out, &[*epoch, *end]);
        }
        Message::Refuse { epoch } => {
            out.push(REFUSE);
            words(out, &[*epoch]);
        }
    }
}

struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize, what: &'static str) -> Result<&[u8], FrameError> {
        let end = self.at.checked_add(len).filter(|end| *end <= self.bytes.len());
        let end = end.ok_or(FrameError::Truncated { what })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        let bytes = self.take(4, what)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        let bytes = self.take(8, what)?;
        let mut word = [0; 8];
        word.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(word))
    }
}

/// The frame in `bytes` (all of them); an image is a slice of `bytes`, not a copy.
pub fn decode(bytes: &Bytes) -> Result<Frame, FrameError> {
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(FrameError::Invalid(format!("{} bytes, more than {FRAME_BYTES_MAX}", bytes.len())));
    }
    let mut r = Reader { bytes, at: 0 };
    let shard = r.u32("shard")?;
    let kind = r.u8("kind")?;
    let epoch = r.u64("epoch")?;
    let mut image = None;
    let message = match kind {
        PROBE => Message::Probe { epoch },
        SHAPE => {
            let end = r.u64("end")?;
            let runs = r.u32("run count")? as usize;
            if runs > RUNS_MAX || runs * 16 > bytes.len() - r.at {
                return Err(FrameError::Invalid(format!("{runs} epoch runs")));
            }
            let mut epochs = Vec::with_capacity(runs);
            for _ in 0..runs {
                epochs.push((r.u64("run epoch")?, r.u64("run start")?));
            }
            let ordered = epochs.windows(2).all(|pair| pair[0].0 < pair[1].0 && pair[0].1 < pair[1].1);
            if !ordered || epochs.last().is_some_and(|(_, first)| *first >= end) {
                return Err(FrameError::Invalid(format!("epoch runs {epochs:?} of a log ending at {end}")));
            }
            Message::Shape { epoch, log: LogShape { epochs, end } }
        }
        APPEND => {
            let (prev_epoch, first, next) = (r.u64("prev epoch")?, r.u64("first")?, r.u64("next")?);
            let (batch_epoch, commit) = (r.u64("batch epoch")?, r.u64("commit")?);
            let len = r.u32("image length")? as usize;
            let start = r.at;
            r.take(len, "image")?;
            if first > next || (len > 0) != (first < next) {
                return Err(FrameError::Invalid(format!("records {first}..{next} with an image of {len} bytes")));
            }
            if len > 0 {
                image = Some(bytes.slice(start..start + len));
            }
            Message::Append { epoch, prev_epoch, first, next, batch_epoch, commit }
        }
        APPENDED => Message::Appended { epoch, end: r.u64("end")? },
        REFUSE => Message::Refuse { epoch },
        other => return Err(FrameError::UnknownKind(other)),
    };
    if r.at != bytes.len() {
        return Err(FrameError::Trailing(bytes.len() - r.at));
    }
    Ok(Frame { shard, message, image })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: &Frame) {
        let mut bytes = Vec::new();
        encode(frame, &mut bytes);
        let bytes = Bytes::from(bytes);
        assert_eq!(&decode(&bytes).unwrap(), frame);
        // Every strict prefix is refused, and so is a longer buffer.
        for cut in 0..bytes.len() {
            assert!(decode(&bytes.slice(..cut)).is_err(), "a prefix of {cut} bytes decoded");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(decode(&Bytes::from(longer)), Err(FrameError::Trailing(1)));
    }

    #[test]
    fn every_message_round_trips_and_damage_is_named() {
        let frames = [
            Frame { shard: 3, message: Message::Probe { epoch: 7 }, image: None },
            Frame {
                shard: 0,
                message: Message::Shape { epoch: 2, log: LogShape { epochs: vec![(1, 1), (2, 40)], end: 90 } },
                image: None,
            },
            Frame {
                shard: 63,
                message: Message::Append { epoch: 4, prev_epoch: 3, first: 10, next: 12, batch_epoch: 4, commit: 9 },
                image: Some(Bytes::from_static(b"a batch image")),
            },
            Frame {
                shard: 1,
                message: Message::Append { epoch: 4, prev_epoch: 4, first: 12, next: 12, batch_epoch: 4, commit: 12 },
                image: None,
            },
            Frame { shard: 1, message: Message::Appended { epoch: 5, end: 100 }, image: None },
            Frame { shard: 1, message: Message::Refuse { epoch: 6 }, image: None },
        ];
        for frame in &frames {
            round_trip(frame);
        }
        let mut bytes = Vec::new();
        encode(&frames[0], &mut bytes);
        bytes[4] = 9;
        assert_eq!(decode(&Bytes::from(bytes)), Err(FrameError::UnknownKind(9)));
        // Records without their image, and runs out of order, are refused.
        let mut bytes = Vec::new();
        encode(&Frame { image: None, ..frames[2].clone() }, &mut bytes);
        assert!(matches!(decode(&Bytes::from(bytes)), Err(FrameError::Invalid(_))));
        let backwards = LogShape { epochs: vec![(2, 1), (1, 40)], end: 90 };
        let mut bytes = Vec::new();
        encode(&Frame { shard: 0, message: Message::Shape { epoch: 2, log: backwards }, image: None }, &mut bytes);
        assert!(matches!(decode(&Bytes::from(bytes)), Err(FrameError::Invalid(_))));
    }
}
