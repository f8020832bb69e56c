//! What both Meridian processes share to be operated: structured logs ([`logging`]), the
//! Prometheus scrape endpoint ([`metrics`], with its sans-IO request parser [`http`]) and
//! systemd's notify protocol ([`notify`]).

pub mod http;
pub mod logging;
pub mod metrics;
pub mod notify;
