//! What every Meridian process stands on to be run and to talk: structured logs
//! ([`logging`]), the Prometheus scrape endpoint ([`metrics`], with its sans-IO request parser
//! [`http`]), systemd's notify protocol ([`notify`]), the cluster's TLS identities ([`tls`])
//! and cached QUIC connections ([`quic`]).
//!
//! It knows nothing of storage, replication or Raft: the data node, the control plane and
//! the CLI all depend on it, and it on none of them.

pub mod http;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod quic;
pub mod tls;
