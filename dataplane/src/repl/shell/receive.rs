//! Receiving: every stream a peer opens is admitted or refused, then driven by a [`Receiver`]:
//! its work goes to the owning shard without waiting, and its acknowledgements go back in frame
//! order once the shard answered.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use wire::repl::{self, Frame};

use super::frames::{AbortOnDrop, next_frame, read_frame, write_frame};
use super::{Context, StreamError, remember_connection};
use crate::repl::core::{Receiver, Settled, Staged, admit, frame_name};
use crate::repl::{Apply, ThreadSide};

/// Frames read ahead of the receiver (the sender's window bounds them anyway).
const FRAMES_AHEAD: usize = 64;

pub(super) async fn accept(context: Arc<Context>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let context = context.clone();
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(error) => {
                    tracing::warn!(%error, "replication connection refused");
                    return;
                }
            };
            let remote = connection.remote_address();
            while let Ok((send, recv)) = connection.accept_bi().await {
                let context = context.clone();
                let connection = connection.clone();
                tokio::spawn(async move {
                    if let Err(error) = receive_stream(&context, &connection, send, recv).await {
                        tracing::warn!(%remote, "replication stream ended: {error}");
                    }
                });
            }
        });
    }
}

/// One incoming stream: `Hello`, admission, `Resume` at the durable position, then frames.
async fn receive_stream(
    context: &Context,
    connection: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), StreamError> {
    let hello = next_frame(&mut recv, "Hello").await?;
    let (shard, region) = match repl::decode_frame(&hello)?.0 {
        Frame::Hello { shard, shards, region } => {
            let local = u32::try_from(context.shards.len()).unwrap_or(u32::MAX);
            if let Err(reason) = admit(&context.config, local, shard, shards, region) {
                write_frame(&mut send, &Frame::Refuse { reason: &reason }).await?;
                let _ = send.finish();
                return Err(StreamError::Refused(reason));
            }
            (shard, region.to_owned())
        }
        other => return Err(StreamError::Unexpected { expected: "Hello", found: frame_name(&other) }),
    };
    let side = context.side(shard).ok_or(StreamError::ShardStopped(shard))?;
    remember_connection(context, &region, "in", connection);
    let position = context
        .positions
        .get(&(region.clone(), shard))
        .cloned()
        .ok_or_else(|| StreamError::NoPosition { shard, region: region.clone() })?;
    let mut receiver = Receiver::new(&context.config, shard, &region, position.lsn());
    write_frame(&mut send, &Frame::Resume { next_lsn: position.lsn() }).await?;
    let metrics = ReceiveMetrics {
        applied: metrics::counter!("meridian_replication_applied_records_total", "source" => region.clone()),
        installed: metrics::counter!("meridian_replication_snapshots_installed_total", "source" => region.clone()),
    };
    let (mut frames, _reading) = spawn_frame_reader(recv);
    // Each frame's answer from the shard: (frame number, the first error).
    let (answers_tx, mut answers_rx) = mpsc::unbounded_channel::<(u64, Result<(), StreamError>)>();
    loop {
        tokio::select! {
            frame = frames.recv() => {
                let Some(frame) = frame else { return Ok(()) }; // the source closed the stream
                let staged = receiver.on_frame(&frame?, context.ahead_limit())?;
                hand_off(side, staged, &answers_tx).await?;
            }
            Some((seq, answer)) = answers_rx.recv() => {
                answer?;
                receiver.on_applied(seq);
            }
        }
        while let Some(settled) = receiver.pop_settled() {
            settle(context, &region, shard, &position, &metrics, &mut send, settled).await?;
        }
    }
}

struct ReceiveMetrics {
    applied: metrics::Counter,
    installed: metrics::Counter,
}

/// Reads frames on a task of its own (a read cut short by `select!` would lose bytes).
fn spawn_frame_reader(mut recv: quinn::RecvStream) -> (mpsc::Receiver<Result<Bytes, StreamError>>, AbortOnDrop) {
    let (frames_tx, frames_rx) = mpsc::channel(FRAMES_AHEAD);
    let task = tokio::spawn(async move {
        loop {
            let frame = read_frame(&mut recv).await.transpose();
            let Some(frame) = frame else { return }; // the end: the channel closes
            let failed = frame.is_err();
            if frames_tx.send(frame).await.is_err() || failed {
                return;
            }
        }
    });
    (frames_rx, AbortOnDrop(task.abort_handle()))
}

/// Hands a frame's work to the shard (waiting when its queue is full) and reports the shard's
/// answer, the first error of its pieces, when every piece answered.
async fn hand_off(
    side: &ThreadSide,
    staged: Staged,
    answers: &mpsc::UnboundedSender<(u64, Result<(), StreamError>)>,
) -> Result<(), StreamError> {
    if staged.work.is_empty() {
        return Ok(()); // settled already
    }
    let mut dones = Vec::with_capacity(staged.work.len());
    for work in staged.work {
        let (done, wait) = oneshot::channel();
        side.applies.send(Apply { work, done }).await.map_err(|_| StreamError::ShardStopped(side.shard))?;
        dones.push(wait);
    }
    let (answers, seq, shard) = (answers.clone(), staged.seq, side.shard);
    tokio::spawn(async move {
        let mut answer = Ok(());
        for done in dones {
            let piece = match done.await {
                Ok(applied) => applied.map_err(|error| StreamError::Apply { shard, error }),
                Err(_) => Err(StreamError::ShardStopped(shard)),
            };
            answer = answer.and(piece);
        }
        let _ = answers.send((seq, answer));
    });
    Ok(())
}

/// A frame is durable here, with every frame before it: publish its closed timestamp, advance
/// (and now and then write out) the position, and acknowledge.
async fn settle(
    context: &Context,
    region: &str,
    shard: u32,
    position: &super::PositionFile,
    metrics: &ReceiveMetrics,
    send: &mut quinn::SendStream,
    settled: Settled,
) -> Result<(), StreamError> {
    metrics.applied.increment(settled.records);
    let Some(ack) = settled.ack else { return Ok(()) };
    if settled.installed {
        metrics.installed.increment(1);
        tracing::info!(shard, source = %region, resume_lsn = ack.next_lsn, "snapshot installed; batches resume");
    }
    context.resolved.set_closed(region, shard, ack.closed_ts);
    if let Some(next_lsn) = position.advance(ack.next_lsn, context.now_ns()) {
        // Off the runtime's thread (it syncs), and the ack does not wait for it: a stale
        // position only makes the source resend records.
        let (position, source) = (context.positions.get(&(region.to_owned(), shard)).cloned(), region.to_owned());
        tokio::task::spawn_blocking(move || {
            if let Some(Err(error)) = position.map(|position| position.store(&source, next_lsn)) {
                tracing::error!(shard, %error, "cannot write the replication position");
            }
        });
    }
    write_frame(send, &Frame::Ack { next_lsn: ack.next_lsn, closed_ts: ack.closed_ts }).await
}
