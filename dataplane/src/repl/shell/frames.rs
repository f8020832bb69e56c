//! Frames on a QUIC stream, and the small pieces every stream task shares.

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use wire::repl::{self, Frame};

use super::{StreamError, transport};

/// Reads one whole frame; `None` at the end of the stream.
pub(super) async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Bytes>, StreamError> {
    let mut header = [0u8; wire::HEADER_BYTES];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(error) => return Err(transport("reading a frame")(error)),
    }
    let len = repl::frame_len(&header)?.unwrap_or(wire::HEADER_BYTES);
    let mut frame = BytesMut::zeroed(len);
    frame[..wire::HEADER_BYTES].copy_from_slice(&header);
    recv.read_exact(&mut frame[wire::HEADER_BYTES..]).await.map_err(transport("reading a frame"))?;
    Ok(Some(frame.freeze()))
}

/// Reads the next frame, which must come: the end of the stream is an error naming `what`.
pub(super) async fn next_frame(recv: &mut quinn::RecvStream, what: &'static str) -> Result<Bytes, StreamError> {
    read_frame(recv).await?.ok_or(StreamError::Ended(what))
}

pub(super) async fn write_frame(send: &mut quinn::SendStream, frame: &Frame<'_>) -> Result<(), StreamError> {
    let mut out = Vec::new();
    repl::encode_frame(frame, &mut out)?;
    send.write_all(&out).await.map_err(transport("writing a frame"))
}

/// Resolves once a stop is asked (or its sender is gone).
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        let asked = *stop.borrow_and_update();
        if asked || stop.changed().await.is_err() {
            return;
        }
    }
}

/// Aborts a task when dropped: a stream's helper tasks end with it.
pub(super) struct AbortOnDrop(pub(super) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
