//! QUIC connections from one endpoint, cached per peer address: what the control plane's calls
//! and the data node's replication streams share. A connection that closed (a restarted peer,
//! an idle timeout) is replaced by a new one on the next use.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use crate::tls::SERVER_NAME;

/// Why no connection could be had.
#[derive(Debug, Clone, Error)]
pub enum ConnectError {
    /// The address does not resolve.
    #[error("cannot resolve {addr}: {reason}")]
    Resolve {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Could not connect (peer down, TLS refused, no handshake in time).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// Resolves `addr` (`host:port`) to its first socket address.
pub fn resolve(addr: &str) -> Result<SocketAddr, ConnectError> {
    let resolve_error = |reason: String| ConnectError::Resolve { addr: addr.to_owned(), reason };
    addr.to_socket_addrs()
        .map_err(|error| resolve_error(error.to_string()))?
        .next()
        .ok_or_else(|| resolve_error("no address".to_owned()))
}

/// Connections from one endpoint, one per peer address.
#[derive(Debug, Clone)]
pub struct Connector {
    endpoint: quinn::Endpoint,
    connections: Arc<Mutex<HashMap<SocketAddr, quinn::Connection>>>,
    /// Limit on a QUIC handshake (a dead peer never answers it).
    pub connect_timeout: Duration,
}

impl Connector {
    /// Connects through `endpoint` (whose default client config must be set).
    pub fn new(endpoint: quinn::Endpoint) -> Self {
        Self { endpoint, connections: Arc::default(), connect_timeout: Duration::from_millis(500) }
    }

    /// A client-only endpoint on an ephemeral port.
    pub fn client(config: quinn::ClientConfig) -> std::io::Result<Self> {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))?;
        endpoint.set_default_client_config(config);
        Ok(Self::new(endpoint))
    }

    /// Closes every connection of the endpoint with code 0 ("shutting down"), so peers see
    /// a clean close rather than an idle timeout, and waits up to a second for the close to
    /// be sent.
    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The cached connection to `target` (`addr` as the caller wrote it, for errors), or a
    /// new one within `connect_timeout`.
    pub async fn connection(&self, addr: &str, target: SocketAddr) -> Result<quinn::Connection, ConnectError> {
        if let Some(connection) = self.lock().get(&target).filter(|c| c.close_reason().is_none()) {
            return Ok(connection.clone());
        }
        let connect_error = |reason: String| ConnectError::Connect { addr: addr.to_owned(), reason };
        let connecting =
            self.endpoint.connect(target, SERVER_NAME).map_err(|error| connect_error(error.to_string()))?;
        let connection = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| connect_error(format!("no handshake within {:?}", self.connect_timeout)))?
            .map_err(|error| connect_error(error.to_string()))?;
        self.lock().insert(target, connection.clone());
        Ok(connection)
    }

    /// Forgets and closes the connection to `target` (after a failed call on it), so the next
    /// use connects anew.
    pub fn drop_connection(&self, target: SocketAddr, reason: &[u8]) {
        if let Some(connection) = self.lock().remove(&target) {
            connection.close(quinn::VarInt::from_u32(1), reason);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, quinn::Connection>> {
        self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
