//! A client of the control plane: finds the leader from seed addresses and follows
//! redirects. Used by the `meridian cluster` CLI, data nodes, the bench and the tests.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};

use crate::meta::{Command, MetaState, Outcome};
use crate::rpc::{Request, Response, Status};
use platform::quic::Connector;
use platform::tls::Identity;

/// Calls the cluster's leader (or a given node) with retries on redirects and unreachable
/// nodes, until a deadline.
#[derive(Debug, Clone)]
pub struct ControlClient {
    connector: Connector,
    seeds: Vec<String>,
    leader: Arc<Mutex<Option<String>>>,
    /// Per-attempt call timeout.
    pub attempt_timeout: Duration,
}

impl ControlClient {
    /// A client with its own endpoint and TLS identity.
    pub fn new(identity: &Identity, seeds: Vec<String>) -> Result<Self> {
        let connector = Connector::client(identity.client_config()?)?;
        Ok(Self::with_connector(connector, seeds))
    }

    /// With a per-attempt timeout (and QUIC handshake limit) of `timeout`.
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self.connector.connect_timeout = timeout;
        self
    }

    /// A client over an existing endpoint.
    pub fn with_connector(connector: Connector, seeds: Vec<String>) -> Self {
        Self { connector, seeds, leader: Arc::default(), attempt_timeout: Duration::from_secs(5) }
    }

    /// The connector (for direct calls to one node).
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// The known leader first, then the seeds; each address once, and those that just failed
    /// last.
    fn candidates(&self, failed: &[String]) -> Vec<String> {
        let leader = self.leader.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let mut all: Vec<String> = Vec::new();
        for addr in leader.into_iter().chain(self.seeds.iter().cloned()) {
            if !all.contains(&addr) {
                all.push(addr);
            }
        }
        all.sort_by_key(|addr| failed.contains(addr));
        all
    }

    /// Sends `request` to the leader, following redirects, for up to `deadline`. A request
    /// that may have reached a node is not resent after a transport error unless it is a
    /// read; a redirect (`NotLeader`) means it was not executed and is always followed.
    pub async fn call(&self, request: &Request, deadline: Duration) -> Result<Response> {
        let retry_anything = match request {
            Request::Read { .. } | Request::Status | Request::Heartbeat { .. } => true,
            Request::Write(command) => command.is_idempotent(),
            _ => false,
        };
        let give_up = tokio::time::Instant::now() + deadline;
        let mut last_error = anyhow!("no seed addresses");
        let mut failed: Vec<String> = Vec::new();
        loop {
            let mut redirected = false;
            for addr in self.candidates(&failed) {
                match crate::net::call(&self.connector, &addr, request, self.attempt_timeout).await {
                    Ok(Response::NotLeader { leader }) => {
                        let hint = leader.map(|(_, addr)| addr);
                        last_error = anyhow!("{addr} is not the leader (leader: {hint:?})");
                        if let Some(hint) = hint {
                            *self.leader.lock().unwrap_or_else(PoisonError::into_inner) = Some(hint);
                            redirected = true;
                            break;
                        }
                    }
                    Ok(response) => {
                        // Any node answers a status or a stale read; only other answers come
                        // from the leader.
                        let from_leader = !matches!(request, Request::Status | Request::Read { linearizable: false });
                        if from_leader {
                            *self.leader.lock().unwrap_or_else(PoisonError::into_inner) = Some(addr);
                        }
                        return Ok(response);
                    }
                    Err(error) => {
                        if !error.not_sent() && !retry_anything {
                            return Err(anyhow!(error).context("the request may or may not have been applied"));
                        }
                        last_error = anyhow!(error);
                        if !failed.contains(&addr) {
                            failed.push(addr.clone());
                        }
                        let mut leader = self.leader.lock().unwrap_or_else(PoisonError::into_inner);
                        if leader.as_deref() == Some(addr.as_str()) {
                            *leader = None;
                        }
                    }
                }
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(last_error.context(format!("no leader answered within {deadline:?}")));
            }
            if !redirected {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Proposes `command` and returns its outcome and log index; a rejection is an error.
    pub async fn write(&self, command: Command, deadline: Duration) -> Result<(Outcome, u64)> {
        match self.propose(command, deadline).await? {
            (Outcome::Rejected { reason }, _) => bail!("rejected: {reason}"),
            written => Ok(written),
        }
    }

    /// Proposes `command` and returns its outcome (a rejection too) and log index.
    pub async fn propose(&self, command: Command, deadline: Duration) -> Result<(Outcome, u64)> {
        match self.call(&Request::Write(command), deadline).await? {
            Response::Written { outcome, index } => Ok((outcome, index)),
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected response {other:?}"),
        }
    }

    /// Takes a global snapshot (see [`Request::CreateSnapshot`]): its id and timestamp.
    pub async fn create_snapshot(&self, lead_us: u64, deadline: Duration) -> Result<(u64, u64)> {
        match self.call(&Request::CreateSnapshot { lead_us }, deadline).await? {
            Response::Snapshot { id, glt, .. } => Ok((id, glt)),
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected response {other:?}"),
        }
    }

    /// Reads the metadata (linearizable: through the leader, confirmed with a quorum).
    pub async fn read(&self, linearizable: bool, deadline: Duration) -> Result<MetaState> {
        match self.call(&Request::Read { linearizable }, deadline).await? {
            Response::State { meta, .. } => Ok(meta),
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected response {other:?}"),
        }
    }

    /// The status of the node at `addr` (not redirected).
    pub async fn status_of(&self, addr: &str) -> Result<Status> {
        match crate::net::call(&self.connector, addr, &Request::Status, self.attempt_timeout).await? {
            Response::Status(status) => Ok(*status),
            other => bail!("unexpected response {other:?}"),
        }
    }

    /// Sends `request` to the node at `addr` only, waiting up to `timeout`.
    pub async fn call_node(&self, addr: &str, request: &Request, timeout: Duration) -> Result<Response> {
        Ok(crate::net::call(&self.connector, addr, request, timeout).await?)
    }
}
