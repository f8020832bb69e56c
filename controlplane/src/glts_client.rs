//! The GLTS client a data node runs: exchanges with every control-plane node on a period,
//! keeps the estimator and the interval clock (strictly increasing GLTs inside the interval)
//! and answers `now`, `stamp` and `commit_wait`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::glts::{Estimator, EstimatorConfig, Exchange, GltsError, Interval, IntervalClock, StampError};
use crate::net::Connector;
use crate::rpc::{Request, Response};
use crate::timesource::mono_ns;
use crate::types::NodeId;

/// A running GLTS client.
#[derive(Debug)]
pub struct GltsClient {
    clock: Arc<Mutex<IntervalClock>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GltsClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GltsClient {
    /// Starts exchanging with `servers` (control-plane node id and address) every `period`.
    pub fn start(
        connector: Connector,
        servers: Vec<(NodeId, String)>,
        config: EstimatorConfig,
        period: Duration,
    ) -> Result<Self, GltsError> {
        let estimator = Estimator::new(config)?;
        let clock = Arc::new(Mutex::new(IntervalClock::new(estimator, 0)));
        let shared = clock.clone();
        let task = tokio::spawn(async move {
            loop {
                let exchanges = servers.iter().map(|(id, addr)| {
                    let connector = connector.clone();
                    async move {
                        let sent_ns = mono_ns();
                        let reply =
                            connector.call(addr, &Request::TimeSync, period.max(Duration::from_millis(50))).await;
                        (*id, sent_ns, mono_ns(), reply)
                    }
                });
                for (id, sent_ns, received_ns, reply) in futures_join_all(exchanges).await {
                    if let Ok(Response::Time { interval, hold_ns }) = reply {
                        let exchange = Exchange { sent_ns, received_ns, hold_ns, peer: interval };
                        let _ = shared
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .estimator_mut()
                            .observe_peer(id, exchange);
                    }
                }
                tokio::time::sleep(period).await;
            }
        });
        Ok(Self { clock, task })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IntervalClock> {
        self.clock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The interval holding true time now.
    pub fn now(&self) -> Result<Interval, GltsError> {
        self.lock().now(mono_ns())
    }

    /// A GLT inside the interval, greater than every one returned or observed before.
    pub fn stamp(&self) -> Result<u64, StampError> {
        self.lock().stamp(mono_ns())
    }

    /// Waits until the interval's earliest bound is past `glt`.
    pub async fn commit_wait(&self, glt: u64) -> Result<(), GltsError> {
        loop {
            let until = self.lock().commit_wait_until(glt, mono_ns())?;
            let Some(until) = until else { return Ok(()) };
            tokio::time::sleep(Duration::from_nanos(until.saturating_sub(mono_ns()).max(1000))).await;
        }
    }
}

/// Runs futures concurrently on this task and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for future in futures {
        set.push(Box::pin(future));
    }
    let mut outputs: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, future) in outputs.iter_mut().zip(set.iter_mut()) {
            if slot.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(output) => *slot = Some(output),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
