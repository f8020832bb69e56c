//! What an operator watches of replication: per source region the lag (the RPO), and each
//! peer connection's QUIC statistics. With multi-master keyspaces it also hands each shard its
//! collection floor.

use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use super::Context;
use crate::store::clock;

/// How often the lag per source region is sampled into its gauge and histogram.
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// How often QUIC statistics are exported.
const QUIC_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Exports, per source region, the lag `now - resolved` (the RPO: writes newer than the
/// resolved timestamp would be lost if the source vanished now) as a gauge and a histogram
/// every 10 ms, and each peer connection's QUIC RTT, bytes and losses every second.
pub(super) async fn observe(context: Arc<Context>) {
    let mut last_quic = Instant::now();
    loop {
        tokio::time::sleep(LAG_SAMPLE_INTERVAL).await;
        if context.config.is_multi_master() {
            for side in &context.shards {
                if let Some(floor) = context.resolved.shard_floor(side.shard)
                    && side.holds.set_floor(floor).await.is_err()
                {
                    return; // the shard stopped
                }
            }
        }
        if let Ok(interval) = context.clock.interval() {
            for source in context.resolved.sources() {
                if source.resolved_ts == 0 {
                    continue;
                }
                let lag_us = interval.earliest_us().saturating_sub(clock::physical_us(source.resolved_ts));
                let lag = lag_us as f64 / 1e6;
                metrics::gauge!("meridian_replication_lag_seconds", "source" => source.region.clone()).set(lag);
                metrics::histogram!("meridian_replication_rpo_seconds", "source" => source.region).record(lag);
            }
        }
        if last_quic.elapsed() >= QUIC_SAMPLE_INTERVAL {
            last_quic = Instant::now();
            let connections = context.connections.lock().unwrap_or_else(PoisonError::into_inner).clone();
            for ((peer, direction), connection) in connections {
                let stats = connection.stats();
                let labels = [("peer", peer), ("direction", direction.to_owned())];
                metrics::gauge!("meridian_quic_rtt_seconds", &labels).set(stats.path.rtt.as_secs_f64());
                metrics::gauge!("meridian_quic_congestion_window_bytes", &labels).set(stats.path.cwnd as f64);
                metrics::gauge!("meridian_quic_path_mtu_bytes", &labels).set(f64::from(stats.path.current_mtu));
                // Totals of the current connection: a reconnect starts again from zero, which
                // Prometheus' rate() reads as a counter reset.
                metrics::counter!("meridian_quic_sent_bytes_total", &labels).absolute(stats.udp_tx.bytes);
                metrics::counter!("meridian_quic_received_bytes_total", &labels).absolute(stats.udp_rx.bytes);
                metrics::counter!("meridian_quic_lost_packets_total", &labels).absolute(stats.path.lost_packets);
            }
        }
    }
}
