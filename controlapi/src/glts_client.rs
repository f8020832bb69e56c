//! The GLTS client a data node runs: exchanges with every control-plane node on a period,
//! keeps the estimator and answers `now`, the interval holding true time. Stamps and commit
//! waits are the store's, over that interval ([`crate::glts::Hlc`],
//! [`crate::glts::Interval::has_passed`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::glts::{Estimator, EstimatorConfig, Exchange, GltsError, Interval};
use crate::rpc::NodeId;
use crate::rpc::{Request, Response};
use crate::timesource::mono_ns;
use platform::quic::Connector;

/// A running GLTS client.
#[derive(Debug)]
pub struct GltsClient {
    estimator: Arc<Mutex<Estimator>>,
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
        let estimator = Arc::new(Mutex::new(Estimator::new(config)?));
        let shared = estimator.clone();
        let task = tokio::spawn(async move {
            let timeout = period.max(Duration::from_millis(50));
            loop {
                for (id, exchange) in exchange_all(&connector, &servers, timeout).await {
                    let mut estimator = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    let _ = estimator.observe_peer(id, exchange);
                }
                tokio::time::sleep(period).await;
            }
        });
        Ok(Self { estimator, task })
    }

    /// A handle through which other threads (a data node's shards) read the interval.
    pub fn source(&self) -> IntervalSource {
        IntervalSource(self.estimator.clone())
    }

    /// The interval holding true time now.
    pub fn now(&self) -> Result<Interval, GltsError> {
        self.source().now()
    }
}

/// Reads a running [`GltsClient`]'s interval from any thread.
#[derive(Debug, Clone)]
pub struct IntervalSource(Arc<Mutex<Estimator>>);

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
