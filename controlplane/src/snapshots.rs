//! Global snapshots: the coordinator's choice of a snapshot timestamp (pure) and its question
//! to a region's data node, "are reads at `ts` consistent on you yet?" (the data plane's
//! `WaitReadable` request over its client protocol, plain TCP framed with `wire`).
//!
//! The leader picks `t` at its GLTS interval's latest bound (plus a lead for far regions),
//! records the snapshot in Raft, then asks one data node per region to answer once its
//! readable timestamp (home shards applied, every source region resolved) passes `t`. The
//! node's answer carries when that happened on its clock; request to readable is the
//! snapshot's availability latency in that region, written back to the catalog.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wire::RecordType;
use wire::proto::{self, Request, Response};

/// The largest response frame the question can get (an error message at most).
const RESPONSE_PAYLOAD_MAX: u32 = 64 << 10;

/// The snapshot timestamp for a request seen when the GLTS interval's latest bound was
/// `latest_ns`: that bound plus `lead_us`, with the largest logical part, so every write
/// stamped at or before that microsecond is in it. Any write that starts after the request
/// was acknowledged later than `t` by commit wait, or is stamped above `t`.
pub fn snapshot_glt(latest_ns: u64, lead_us: u64) -> u64 {
    let physical_us = (latest_ns / 1000).saturating_add(lead_us);
    wire::glt::timestamp_at(physical_us) | ((1 << wire::glt::LOGICAL_BITS) - 1)
}

/// A data node's answer: its readable timestamp and when it saw it pass the asked one (unix
/// µs, its clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readable {
    /// Readable timestamp when it answered.
    pub readable_ts: u64,
    /// When it was seen readable.
    pub at_us: u64,
}

/// Asks the data node at `addr` (a shard's client address) to answer once reads at `ts` are
/// consistent there, waiting at most `timeout` (the node's limit too).
pub async fn wait_readable(addr: &str, ts: u64, timeout: Duration) -> Result<Readable> {
    let exchange = async {
        let mut stream =
            tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to data node {addr}"))?;
        stream.set_nodelay(true)?;
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let mut frame = Vec::new();
        proto::frame(&mut frame, RecordType::Request, 1, |out| Request::WaitReadable { ts, timeout_ms }.encode(out))?;
        stream.write_all(&frame).await?;
        let mut header = [0u8; wire::HEADER_BYTES];
        stream.read_exact(&mut header).await.context("reading the answer")?;
        let parsed = wire::decode_header(&header, RESPONSE_PAYLOAD_MAX)?;
        let mut frame = vec![0u8; wire::encoded_len(parsed.payload_len as usize)];
        frame[..wire::HEADER_BYTES].copy_from_slice(&header);
        stream.read_exact(&mut frame[wire::HEADER_BYTES..]).await.context("reading the answer")?;
        let (record, _) = wire::decode(&frame, RESPONSE_PAYLOAD_MAX)?;
        if record.record_type != RecordType::Response {
            bail!("data node {addr} answered with a {:?} record", record.record_type);
        }
        match Response::decode(record.payload)? {
            Response::Readable { readable_ts, at_us } => Ok(Readable { readable_ts, at_us }),
            Response::Error { code, message } => bail!("data node {addr}: {code:?}: {message}"),
            other => bail!("data node {addr} answered WaitReadable with {other:?}"),
        }
    };
    // The node's own limit answers first; this only covers a node that does not answer.
    tokio::time::timeout(timeout + Duration::from_secs(1), exchange)
        .await
        .with_context(|| format!("no answer from data node {addr} within {} ms", timeout.as_millis()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_covers_its_whole_microsecond_after_the_lead() {
        let t = snapshot_glt(1_700_000_000_123_456_789, 0);
        assert_eq!(wire::glt::physical_us(t), 1_700_000_000_123_456);
        assert_eq!(t & 0xFFF, 0xFFF);
        assert!(t < wire::glt::timestamp_at(1_700_000_000_123_457));
        assert_eq!(wire::glt::physical_us(snapshot_glt(1_700_000_000_123_456_789, 5_000)), 1_700_000_000_128_456);
    }

    #[tokio::test]
    async fn a_node_that_is_not_there_is_an_error_not_a_hang() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let error = wait_readable(&addr, 1, Duration::from_millis(200)).await.expect_err("nobody listens");
        assert!(format!("{error:#}").contains("connecting to data node"), "{error:#}");

        // A peer that accepts and says nothing: the timeout ends the wait.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let held = tokio::spawn(async move { listener.accept().await });
        let error = wait_readable(&addr, 1, Duration::from_millis(100)).await.expect_err("silent peer");
        assert!(format!("{error:#}").contains("no answer"), "{error:#}");
        held.abort();

        // A peer that answers garbage: a typed decode error.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(&[0xAB; 64]).await;
            }
        });
        let error = wait_readable(&addr, 1, Duration::from_millis(500)).await.expect_err("garbage");
        assert!(format!("{error:#}").to_lowercase().contains("magic"), "{error:#}");
    }
}
