//! Global snapshots: the coordinator's choice of a snapshot timestamp (pure) and its question
//! to a region's data node, "are reads at `ts` consistent on you yet?" (the data plane's
//! `WaitReadable` request, through the `client` crate).
//!
//! The leader picks `t` at its GLTS interval's latest bound (plus a lead for far regions),
//! records the snapshot in Raft, then asks one data node per region to answer once its
//! readable timestamp (home shards applied, every source region resolved) passes `t`. The
//! node's answer carries when that happened on its clock; request to readable is the
//! snapshot's availability latency in that region, written back to the catalog.

use std::time::Duration;

use anyhow::{Context, Result};
pub use client::Readable;
use client::{Client, ClientConfig};

/// The snapshot timestamp for a request seen when the GLTS interval's latest bound was
/// `latest_ns`: that bound plus `lead_us`, with the largest logical part, so every write
/// stamped at or before that microsecond is in it. Any write that starts after the request
/// was acknowledged later than `t` by commit wait, or is stamped above `t`.
pub fn snapshot_glt(latest_ns: u64, lead_us: u64) -> u64 {
    let physical_us = (latest_ns / 1000).saturating_add(lead_us);
    wire::glt::timestamp_at(physical_us) | ((1 << wire::glt::LOGICAL_BITS) - 1)
}

/// Asks the data node at `addr` (a shard's client address) to answer once reads at `ts` are
/// consistent there, waiting at most `timeout` (the node's limit too).
pub async fn wait_readable(addr: &str, ts: u64, timeout: Duration) -> Result<Readable> {
    let exchange = async {
        // The node's own limit answers first; the one below covers a node that does not.
        let slack = timeout + Duration::from_secs(5);
        let config =
            ClientConfig { connect_timeout: slack, request_timeout: slack, retries: 0, ..ClientConfig::default() };
        let client = Client::connect(addr, config).await.with_context(|| format!("connecting to data node {addr}"))?;
        client.wait_readable(ts, timeout).await.with_context(|| format!("data node {addr}"))
    };
    tokio::time::timeout(timeout + Duration::from_secs(1), exchange)
        .await
        .with_context(|| format!("no answer from data node {addr} within {} ms", timeout.as_millis()))?
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

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
