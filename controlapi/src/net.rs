//! Control calls over QUIC: one bidirectional stream per call, one request frame each way
//! ([`call`]); and the serving side ([`serve`]). Connections come from a
//! [`platform::quic::Connector`], cached per address and dropped on any error, so the next
//! call reconnects (a restarted peer, a dropped connection).

use std::time::Duration;

use platform::quic::{ConnectError, Connector};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::rpc::{self, FRAME_BYTES_MAX, FrameError};

/// Why a call failed.
#[derive(Debug, Error)]
pub enum CallError {
    /// No connection (the address does not resolve, the peer is down, TLS refused).
    #[error(transparent)]
    Connect(#[from] ConnectError),
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
    /// The peer answered with bytes that are not a response (or the request does not frame).
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
        matches!(self, Self::Connect(_))
    }
}

/// Sends `request` to `addr` through `connector` and waits up to `timeout` for the response.
pub async fn call<Q: Serialize, R: DeserializeOwned>(
    connector: &Connector,
    addr: &str,
    request: &Q,
    timeout: Duration,
) -> Result<R, CallError> {
    let target = platform::quic::resolve(addr)?;
    let frame = rpc::encode(request, 0).map_err(|source| CallError::Frame { addr: addr.to_owned(), source })?;
    let attempt = async {
        let connection = connector.connection(addr, target).await?;
        let io_error = |reason: String| CallError::Io { addr: addr.to_owned(), reason };
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| io_error(e.to_string()))?;
        send.write_all(&frame).await.map_err(|e| io_error(e.to_string()))?;
        send.finish().map_err(|e| io_error(e.to_string()))?;
        let bytes = recv.read_to_end(FRAME_BYTES_MAX as usize).await.map_err(|e| io_error(e.to_string()))?;
        rpc::decode(&bytes).map_err(|source| CallError::Frame { addr: addr.to_owned(), source })
    };
    let result = match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(CallError::Timeout { addr: addr.to_owned(), timeout }),
    };
    if result.is_err() {
        connector.drop_connection(target, b"call failed");
    }
    result
}

/// Serves `endpoint`: every stream's request goes to `handle`, its answer back on the stream;
/// a request that does not decode (or an answer that does not encode) is answered with
/// `failed(reason)`. Returns when the endpoint closes.
pub async fn serve<Q, R, H, F>(endpoint: quinn::Endpoint, handle: H, failed: fn(String) -> R)
where
    Q: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    H: Fn(Q) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = R> + Send + 'static,
{
    while let Some(incoming) = endpoint.accept().await {
        let handle = handle.clone();
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                let handle = handle.clone();
                tokio::spawn(async move {
                    let Ok(bytes) = recv.read_to_end(FRAME_BYTES_MAX as usize).await else { return };
                    let response = match rpc::decode(&bytes) {
                        Ok(request) => handle(request).await,
                        Err(error) => failed(error.to_string()),
                    };
                    let frame = rpc::encode(&response, 1)
                        .or_else(|error| rpc::encode(&failed(format!("cannot encode the response: {error}")), 1));
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
