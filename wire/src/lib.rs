//! `wire` owns Meridian's byte formats that cross a boundary: the record header shared by the
//! write-ahead log on disk and by frames on the network, and the key router.
//!
//! Everything here is sans-IO: encoders write into caller buffers, decoders read caller
//! slices. A decoder returns a typed [`DecodeError`] for any byte sequence and never panics
//! (each has a fuzz target under `fuzz/`).
//!
//! **Architecture Invariant:** this crate does no I/O, reads no clock and allocates nothing on
//! the encode/decode paths. It must never depend on an async runtime ([`join_all`] is std
//! only).
#![cfg_attr(test, allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_lossless))]

pub mod glt;
pub mod join;
pub mod limits;
pub mod proto;
pub mod record;
pub mod repl;
pub mod routing;

pub use join::join_all;
pub use record::{
    DecodeError, EncodeError, FORMAT_VERSION, HEADER_BYTES, Header, MAGIC, Record, RecordType, decode, decode_header,
    encode_header, encode_into, encoded_len,
};
pub use routing::shard_for;
