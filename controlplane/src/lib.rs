//! The control plane: Raft-replicated cluster metadata, the GLTS time-interval service,
//! membership and leases.
//!
//! So far it holds the pure core of GLTS ([`glts`]): the interval estimator, the
//! fault-tolerant Marzullo intersection and the interval clock data nodes stamp writes
//! with. It does no I/O and reads no clock: every function takes the local monotonic time.

pub mod glts;
