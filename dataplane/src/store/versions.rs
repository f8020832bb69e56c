//! A key's version, and the error of a read below the retention horizon. The versions
//! themselves live in the shard's engine ([`super::engine`]).

use thiserror::Error;

use super::op::Body;

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Its timestamp (GLT).
    pub ts: u64,
    /// What it holds.
    pub body: Body,
}

/// A read below the retention horizon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("read at {at} is older than the retention horizon {horizon}")]
pub struct TooOld {
    /// The requested timestamp.
    pub at: u64,
    /// Versions older than this may have been collected.
    pub horizon: u64,
}
