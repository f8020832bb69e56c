//! The client's error type and the process exit codes the command line derives from it.

use thiserror::Error;
use wire::proto::ErrorCode;

/// Why a client call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Opening a connection to `addr` failed (refused, unreachable, or the connect timeout hit).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address dialed.
        addr: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The connection to `addr` broke (EOF, I/O error, or an unreadable frame) before the answer came.
    #[error("connection to {addr} lost: {reason}")]
    ConnectionLost {
        /// The shard's address.
        addr: String,
        /// What broke the stream.
        reason: String,
    },
    /// No answer within the request timeout.
    #[error("request timed out")]
    Timeout,
    /// The server refused the request with an error response.
    #[error("server refused the request: {code:?} (code {}): {message}", code.to_u16())]
    Server {
        /// The protocol error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The key has no visible version (a `delete` the server answered with `NotFound`).
    #[error("not found")]
    NotFound,
    /// The server sent a well-framed but unexpected or undecodable answer.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A key or request is larger than the wire format or the configured frame limit allows.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// What is too large: "key", "prefix" or "request".
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A local I/O error outside a connection (socket setup, files of the command line).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Process exit codes of the `meridian` command line; scripts may rely on them.
pub mod exit_code {
    /// Success.
    pub const OK: u8 = 0;
    /// Any error not listed below.
    pub const OTHER: u8 = 1;
    /// The command line could not be parsed (clap's own code).
    pub const USAGE: u8 = 2;
    /// The key has no visible version.
    pub const NOT_FOUND: u8 = 3;
    /// The server refused the request with an error response.
    pub const REFUSED: u8 = 4;
    /// The server could not be reached: cannot connect, connection lost, or timeout.
    pub const UNAVAILABLE: u8 = 5;
}

impl ClientError {
    /// The [`exit_code`] a command line should end with for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Connect { .. } | Self::ConnectionLost { .. } | Self::Timeout => exit_code::UNAVAILABLE,
            Self::Server { .. } => exit_code::REFUSED,
            Self::NotFound => exit_code::NOT_FOUND,
            Self::Protocol(_) | Self::TooLarge { .. } | Self::Io(_) => exit_code::OTHER,
        }
    }

    /// Whether the request certainly never reached the server, so even a write may be resent.
    pub(crate) fn never_sent(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }

    /// Whether an idempotent request may be resent on a fresh connection.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::ConnectionLost { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let lost = ClientError::ConnectionLost { addr: "a".into(), reason: "eof".into() };
        assert_eq!(lost.exit_code(), exit_code::UNAVAILABLE);
        assert_eq!(ClientError::Timeout.exit_code(), exit_code::UNAVAILABLE);
        let refused = ClientError::Server { code: ErrorCode::KeyTooLarge, message: "big".into() };
        assert_eq!(refused.exit_code(), exit_code::REFUSED);
        assert_eq!(refused.to_string(), "server refused the request: KeyTooLarge (code 3): big");
        assert_eq!(ClientError::NotFound.exit_code(), exit_code::NOT_FOUND);
        assert_eq!(ClientError::Protocol("x".into()).exit_code(), exit_code::OTHER);
    }
}
