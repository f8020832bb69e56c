//! The GLTS client a data node runs: exchanges with every control-plane node on a period,
//! keeps the estimator and the interval clock (strictly increasing GLTs inside the interval)
//! and answers `now`, `stamp` and `commit_wait`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::glts::{Estimator, EstimatorConfig, Exchange, GltsError, Interval, IntervalClock, StampError};
use crate::rpc::NodeId;
use crate::rpc::{Request, Response};
use crate::timesource::mono_ns;
use platform::quic::Connector;

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
            let timeout = period.max(Duration::from_millis(50));
            loop {
                for (id, exchange) in exchange_all(&connector, &servers, timeout).await {
                    let mut clock = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    let _ = clock.estimator_mut().observe_peer(id, exchange);
                }
                tokio::time::sleep(period).await;
            }
        });
        Ok(Self { clock, task })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IntervalClock> {
        self.clock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A handle through which other threads (a data node's shards) read the interval.
    pub fn source(&self) -> IntervalSource {
        IntervalSource(self.clock.clone())
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

/// Reads a running [`GltsClient`]'s interval from any thread.
#[derive(Debug, Clone)]
pub struct IntervalSource(Arc<Mutex<IntervalClock>>);

impl IntervalSource {
    /// The interval holding true time now.
    pub fn now(&self) -> Result<Interval, GltsError> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).now(mono_ns())
    }
}

/// One four-timestamp exchange with the control-plane node at `addr`.
pub async fn exchange(connector: &Connector, addr: &str, timeout: Duration) -> Option<Exchange> {
    let sent_ns = mono_ns();
    match crate::net::call(connector, addr, &Request::TimeSync, timeout).await {
        Ok(Response::Time { interval, hold_ns }) => {
            Some(Exchange { sent_ns, received_ns: mono_ns(), hold_ns, peer: interval })
        }
        _ => None,
    }
}

/// Exchanges with every server at once; the ones that answered in time.
pub async fn exchange_all(
    connector: &Connector,
    servers: &[(NodeId, String)],
    timeout: Duration,
) -> Vec<(NodeId, Exchange)> {
    let mut calls = tokio::task::JoinSet::new();
    for (id, addr) in servers {
        let (connector, id, addr) = (connector.clone(), *id, addr.clone());
        calls.spawn(async move { exchange(&connector, &addr, timeout).await.map(|exchange| (id, exchange)) });
    }
    calls.join_all().await.into_iter().flatten().collect()
}
