//! The QUIC shell: one endpoint per process, one bidirectional stream per call.
//!
//! [`Connector::call`] sends one request frame, finishes its side of the stream and reads the
//! response to the end. Connections are cached per address and dropped on any error, so the
//! next call reconnects (a restarted peer, a dropped connection).

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use crate::rpc::{self, FRAME_BYTES_MAX, FrameError, Request, Response};
use crate::tls::SERVER_NAME;

/// Why a call failed.
#[derive(Debug, Error)]
pub enum CallError {
    /// The address does not resolve.
    #[error("cannot resolve {addr}: {reason}")]
    Resolve {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Could not connect (peer down, TLS refused).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The connection or stream failed mid-call.
    #[error("call to {addr} failed: {reason}")]
    Io {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// No answer in time.
    #[error("call to {addr} timed out after {timeout:?}")]
    Timeout {
        /// The address.
        addr: String,
        /// The limit.
        timeout: Duration,
    },
    /// The peer answered with bytes that are not a response.
    #[error("bad response from {addr}: {source}")]
    Frame {
        /// The address.
        addr: String,
        /// What is wrong.
        source: FrameError,
    },
}

impl CallError {
    /// Whether the request certainly never reached the peer (safe to retry anything).
    pub fn not_sent(&self) -> bool {
        matches!(self, Self::Resolve { .. } | Self::Connect { .. })
    }
}

/// Makes calls from one endpoint.
#[derive(Debug, Clone)]
pub struct Connector {
    endpoint: quinn::Endpoint,
    connections: Arc<Mutex<HashMap<SocketAddr, quinn::Connection>>>,
    /// Limit on a QUIC handshake (a dead peer never answers it).
    pub connect_timeout: Duration,
}

fn resolve(addr: &str) -> Result<SocketAddr, CallError> {
    let resolve_error = |reason: String| CallError::Resolve { addr: addr.to_owned(), reason };
    addr.to_socket_addrs()
        .map_err(|error| resolve_error(error.to_string()))?
        .next()
        .ok_or_else(|| resolve_error("no address".to_owned()))
}

impl Connector {
    /// Calls through `endpoint` (whose default client config must be set).
    pub fn new(endpoint: quinn::Endpoint) -> Self {
        Self { endpoint, connections: Arc::default(), connect_timeout: Duration::from_millis(500) }
    }

    /// A client-only endpoint on an ephemeral loopback-or-any port.
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
    pub async fn connection(&self, addr: &str, target: SocketAddr) -> Result<quinn::Connection, CallError> {
        if let Some(connection) = self.lock().get(&target).filter(|c| c.close_reason().is_none()) {
            return Ok(connection.clone());
        }
        let connect_error = |reason: String| CallError::Connect { addr: addr.to_owned(), reason };
        let connecting =
            self.endpoint.connect(target, SERVER_NAME).map_err(|error| connect_error(error.to_string()))?;
        let connection = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| connect_error(format!("no handshake within {:?}", self.connect_timeout)))?
            .map_err(|error| connect_error(error.to_string()))?;
        self.lock().insert(target, connection.clone());
        Ok(connection)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, quinn::Connection>> {
        self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `request` to `addr` and waits up to `timeout` for the response.
    pub async fn call(&self, addr: &str, request: &Request, timeout: Duration) -> Result<Response, CallError> {
        let target = resolve(addr)?;
        let frame =
            rpc::encode_request(request).map_err(|source| CallError::Frame { addr: addr.to_owned(), source })?;
        let attempt = async {
            let connection = self.connection(addr, target).await?;
            let io_error = |reason: String| CallError::Io { addr: addr.to_owned(), reason };
            let (mut send, mut recv) = connection.open_bi().await.map_err(|e| io_error(e.to_string()))?;
            send.write_all(&frame).await.map_err(|e| io_error(e.to_string()))?;
            send.finish().map_err(|e| io_error(e.to_string()))?;
            let bytes = recv.read_to_end(FRAME_BYTES_MAX as usize).await.map_err(|e| io_error(e.to_string()))?;
            rpc::decode_response(&bytes).map_err(|source| CallError::Frame { addr: addr.to_owned(), source })
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout { addr: addr.to_owned(), timeout }),
        };
        if result.is_err() {
            if let Some(connection) = self.lock().remove(&target) {
                connection.close(quinn::VarInt::from_u32(1), b"call failed");
            }
        }
        result
    }
}

/// Serves `endpoint`: every stream's request goes to `handle`, its answer back on the stream.
/// Returns when the endpoint closes.
pub async fn serve<H, F>(endpoint: quinn::Endpoint, handle: H)
where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response> + Send + 'static,
{
    while let Some(incoming) = endpoint.accept().await {
        let handle = handle.clone();
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                let handle = handle.clone();
                tokio::spawn(async move {
                    let Ok(bytes) = recv.read_to_end(FRAME_BYTES_MAX as usize).await else { return };
                    let response = match rpc::decode_request(&bytes) {
                        Ok(request) => handle(request).await,
                        Err(error) => Response::Error { message: error.to_string() },
                    };
                    let frame = rpc::encode_response(&response).or_else(|error| {
                        rpc::encode_response(&Response::Error {
                            message: format!("cannot encode the response: {error}"),
                        })
                    });
                    if let Ok(frame) = frame {
                        let _ = send.write_all(&frame).await;
                        let _ = send.finish();
                        // Let the peer read the frame before the stream is dropped.
                        let _ = send.stopped().await;
                    }
                });
            }
        });
    }
}
