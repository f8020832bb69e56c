//! A replica's lag (RPO) sampled on a fixed schedule, by `bench geo` and `bench cluster`.
//!
//! A sample is taken at every tick, whatever the replica does. The replica is asked for its
//! status; an answer within the tick gives the lag it reports (its clock minus the resolved
//! timestamp). When it does not answer in time (down, stalled, restarting), the sample is the
//! last lag it reported plus the time since that answer: now minus the last resolved timestamp
//! it reported, which is the least its lag can be. So a replica that is down or stalled adds
//! growing samples rather than none, and the worst moments are in the percentiles.

use std::time::{Duration, Instant};

use client::{Client, ClientError, ReplicationStatus};
use tokio::task::JoinHandle;

/// Which lag of a status is sampled (one source region's, or the worst over them).
pub type LagOf = fn(&ReplicationStatus) -> Option<u64>;

/// Samples one replica's lag; see the module docs.
#[derive(Debug)]
pub struct LagSampler {
    client: Client,
    lag_of: LagOf,
    /// The status call still running from an earlier tick.
    in_flight: Option<JoinHandle<Result<ReplicationStatus, ClientError>>>,
    /// The last lag the replica reported (µs) and when its answer arrived.
    last: Option<(u64, Instant)>,
}

impl LagSampler {
    pub fn new(client: Client, lag_of: LagOf) -> Self {
        Self { client, lag_of, in_flight: None, last: None }
    }

    /// The lag now, in µs, waiting at most `wait` for the replica's answer; `None` until it
    /// has answered with a lag once.
    pub async fn sample(&mut self, wait: Duration) -> Option<u64> {
        let mut call = match self.in_flight.take() {
            Some(call) => call,
            None => {
                let client = self.client.clone();
                tokio::spawn(async move { client.replication_status().await })
            }
        };
        match tokio::time::timeout(wait, &mut call).await {
            Ok(Ok(Ok(status))) => {
                if let Some(lag_us) = (self.lag_of)(&status) {
                    self.last = Some((lag_us, Instant::now()));
                    return Some(lag_us);
                }
            }
            // An error answer, or the task failed: the next tick asks again.
            Ok(_) => {}
            // No answer yet: keep waiting for it at the next tick.
            Err(_) => self.in_flight = Some(call),
        }
        self.last.map(|(lag_us, at)| lag_us.saturating_add(u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX)))
    }
}

impl Drop for LagSampler {
    fn drop(&mut self) {
        if let Some(call) = self.in_flight.take() {
            call.abort();
        }
    }
}

/// Ticks every `every` on a fixed schedule (a late tick is taken at once, and the ones it
/// missed are not made up: each sample is the lag at the moment it is taken).
pub fn schedule(every: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    ticks
}
