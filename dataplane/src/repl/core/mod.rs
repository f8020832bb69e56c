//! The replication protocol, sans-IO: no I/O, no clock, no runtime. Every input is a frame, an
//! acknowledgement, a durable or closed point, or the time (`now`, injected); every output is a
//! frame to send, a record range to read, work for the shard, an LSN to hold or pin, or a
//! position to persist. The shells (`shell.rs` on the replication thread, `shard.rs` on the
//! shards) move bytes and timers; the simulation test (`tests/repl_simulation.rs`) drives these
//! cores under faults by seed.
//!
//! - `stream`: the window of one stream ([`Outbound`]) and what its receiver accepts
//!   ([`Inbound`]).
//! - `shipper`: the sending side of one stream ([`Shipper`]).
//! - `receiver`: admission ([`admit`]) and the receiving side of one stream ([`Receiver`]).
//! - `holds`: what WAL a shard keeps for its peers ([`Holds`]), a replica's resume position
//!   ([`Position`]).

mod holds;
mod receiver;
mod shipper;
mod stream;

pub use holds::{Holds, Position, WalHold};
pub use receiver::{AHEAD_US_MAX, Ack, ReceiveError, Receiver, Settled, Staged, Work, admit, frame_name};
pub use shipper::{Hold, Sealed, ShipConfig, ShipError, Shipper, Start, WalExtent};
pub use stream::{Accepted, Inbound, Outbound, ProtocolError, Window};
