//! A client of the control plane: finds the leader from seed addresses and follows
//! redirects. Used by the `meridian cluster` CLI, data nodes, the bench and the tests.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use platform::quic::Connector;
use platform::tls::Identity;
use thiserror::Error;

use crate::meta::{Command, MetaState, Outcome};
use crate::net::CallError;
use crate::rpc::{Request, Response, Role, Status};

/// Pause between rounds of looking for the leader.
const LEADER_RETRY: Duration = Duration::from_millis(100);

/// Why a control-plane request failed: callers match on it (the CLI's exit codes).
#[derive(Debug, Error)]
pub enum ControlError {
    /// No node answered as the leader in time: the control plane is unavailable from here.
    #[error("no leader answered within {deadline:?}: {last}")]
    NoLeader {
        /// How long it tried.
        deadline: Duration,
        /// The last thing that went wrong.
        last: String,
    },
    /// The request reached a node and its answer was lost: it may or may not have been
    /// applied (not retried, as it is not idempotent).
    #[error("the request may or may not have been applied: {0}")]
    MaybeApplied(CallError),
    /// The one node asked did not answer.
    #[error(transparent)]
    Call(#[from] CallError),
    /// The leader refused the request (a rejected command, an error answer).
    #[error("refused by the control plane: {0}")]
    Refused(String),
    /// An answer that does not fit the request.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    /// The client's TLS identity or endpoint could not be set up.
    #[error("control client: {0}")]
    Setup(String),
}

/// What [`ControlClient`] returns.
pub type Result<T, E = ControlError> = std::result::Result<T, E>;

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
        let config = identity.client_config().map_err(|error| ControlError::Setup(format!("{error:#}")))?;
        let connector = Connector::client(config).map_err(|error| ControlError::Setup(error.to_string()))?;
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
        let mut last_error = String::from("no seed addresses");
        let mut failed: Vec<String> = Vec::new();
        loop {
            let mut redirected = false;
            for addr in self.candidates(&failed) {
                match crate::net::call(&self.connector, &addr, request, self.attempt_timeout).await {
                    Ok(Response::NotLeader { leader }) => {
                        let hint = leader.map(|(_, addr)| addr);
                        last_error = format!("{addr} is not the leader (leader: {hint:?})");
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
                            return Err(ControlError::MaybeApplied(error));
                        }
                        last_error = error.to_string();
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
                return Err(ControlError::NoLeader { deadline, last: last_error });
            }
            if !redirected {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Proposes `command` and returns its outcome and log index; a rejection is an error.
    pub async fn write(&self, command: Command, deadline: Duration) -> Result<(Outcome, u64)> {
        match self.propose(command, deadline).await? {
            (Outcome::Rejected { reason }, _) => Err(ControlError::Refused(reason)),
            written => Ok(written),
        }
    }

    /// Proposes `command` and returns its outcome (a rejection too) and log index.
    pub async fn propose(&self, command: Command, deadline: Duration) -> Result<(Outcome, u64)> {
        match self.call(&Request::Write(command), deadline).await? {
            Response::Written { outcome, index } => Ok((outcome, index)),
            Response::Error { message } => Err(ControlError::Refused(message)),
            other => Err(ControlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Takes a global snapshot (see [`Request::CreateSnapshot`]): its id and timestamp.
    pub async fn create_snapshot(&self, lead_us: u64, deadline: Duration) -> Result<(u64, u64)> {
        match self.call(&Request::CreateSnapshot { lead_us }, deadline).await? {
            Response::Snapshot { id, glt, .. } => Ok((id, glt)),
            Response::Error { message } => Err(ControlError::Refused(message)),
            other => Err(ControlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Reads the metadata (linearizable: through the leader, confirmed with a quorum).
    pub async fn read(&self, linearizable: bool, deadline: Duration) -> Result<MetaState> {
        match self.call(&Request::Read { linearizable }, deadline).await? {
            Response::State { meta, .. } => Ok(meta),
            Response::Error { message } => Err(ControlError::Refused(message)),
            other => Err(ControlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The status of the node at `addr` (not redirected).
    pub async fn status_of(&self, addr: &str) -> Result<Status> {
        match crate::net::call(&self.connector, addr, &Request::Status, self.attempt_timeout).await? {
            Response::Status(status) => Ok(*status),
            other => Err(ControlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The status of the leader, the one way every tool finds it: asks the seeds (a node
    /// answers `Status` itself, whatever its role), follows the leader it names, and failing
    /// that asks every node it heard of and takes the newest leader; until `timeout`.
    pub async fn leader_status(&self, timeout: Duration) -> Result<Status> {
        let give_up = tokio::time::Instant::now() + timeout;
        let mut budget = timeout;
        loop {
            let first = match self.call(&Request::Status, budget).await? {
                Response::Status(status) => *status,
                Response::Error { message } => return Err(ControlError::Refused(message)),
                other => return Err(ControlError::Unexpected(format!("{other:?}"))),
            };
            if first.role == Role::Leader && !first.isolated {
                return Ok(first);
            }
            let hint = first.leader.and_then(|id| first.members.iter().find(|m| m.id == id && id != first.node_id));
            if let Some(leader) = hint
                && let Ok(status) = self.status_of(&leader.addr).await
                && status.role == Role::Leader
                && !status.isolated
            {
                return Ok(status);
            }
            // The node asked knows no (reachable) leader: ask everyone, take the newest leader.
            let mut addrs: Vec<String> = self.seeds.clone();
            for member in &first.members {
                if !addrs.contains(&member.addr) {
                    addrs.push(member.addr.clone());
                }
            }
            let newest = self
                .statuses(addrs)
                .await
                .into_values()
                .filter_map(Result::ok)
                .filter(|status| status.role == Role::Leader && !status.isolated)
                .max_by_key(|status| status.term);
            if let Some(leader) = newest {
                return Ok(leader);
            }
            if tokio::time::Instant::now() >= give_up {
                let known = first.leader.map_or_else(
                    || "no leader".to_owned(),
                    |id| format!("leader {id}, which did not answer as leader"),
                );
                let last = format!("node {} is {} in term {} and knows {known}", first.node_id, first.role, first.term);
                return Err(ControlError::NoLeader { deadline: timeout, last });
            }
            tokio::time::sleep(LEADER_RETRY).await;
            let remaining = give_up.saturating_duration_since(tokio::time::Instant::now());
            budget = Duration::from_millis(u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX));
        }
    }

    /// Every address's status, asked concurrently.
    pub async fn statuses(&self, addrs: Vec<String>) -> std::collections::BTreeMap<String, Result<Status>> {
        let mut tasks = tokio::task::JoinSet::new();
        for addr in addrs {
            let client = self.clone();
            tasks.spawn(async move {
                let answer = client.status_of(&addr).await;
                (addr, answer)
            });
        }
        let mut answers = std::collections::BTreeMap::new();
        while let Some(joined) = tasks.join_next().await {
            if let Ok((addr, answer)) = joined {
                answers.insert(addr, answer);
            }
        }
        answers
    }

    /// Sends `request` to the node at `addr` only, waiting up to `timeout`.
    pub async fn call_node(&self, addr: &str, request: &Request, timeout: Duration) -> Result<Response> {
        Ok(crate::net::call(&self.connector, addr, request, timeout).await?)
    }
}
