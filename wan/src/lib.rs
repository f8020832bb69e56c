//! WAN emulation for tests and the bench (these machines have no `tc netem`): [`link`] is the
//! pure model of one link direction (delay, jitter, loss, bandwidth, queue, partition; `now`
//! injected), [`proxy`] the tokio UDP proxy that puts two of them between a client and a
//! server, controllable while it runs. QUIC runs over it unchanged.

pub mod link;
pub mod proxy;

pub use link::{ConfigError, Fate, Link, LinkConfig, LinkStats};
pub use proxy::{Proxy, ProxyHandle};
