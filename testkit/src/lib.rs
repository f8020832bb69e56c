//! What tests and benches share to run Meridian's processes, never linked into a product
//! binary: free ports ([`ports`]), child processes killed whatever way a test ends
//! ([`process`]) and a local control plane of real `controlplane` processes ([`cluster`]).

pub mod cluster;
pub mod ports;
pub mod process;

pub use cluster::LocalCluster;
