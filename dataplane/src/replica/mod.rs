//! Replica sets inside a region: every shard on several data nodes, one primary sending its
//! WAL batches to the others and acknowledging a write once it is durable on every member.
//! The control plane's side (sets, epochs, promotion) is `controlapi::replica`.
//!
//! - `core`: one node's copy of a shard, sans-IO ([`Member`]); the simulation test
//!   (`tests/replica_simulation.rs`) drives it under crashes, partitions and a misbehaving
//!   network by seed.
//! - `copy`: the shell of one shard copy on its executor ([`ShardCopy`]): the core driven
//!   with the store's WAL as the set's log, frames through [`Links`].
//! - `frame` (pure): the bytes of a [`Frame`] (fuzz target `replica_frame_decode`).
//! - `net`: the QUIC links between a region's nodes that carry the frames ([`ReplicaNet`]).
//! - `host`: the node's copies as the control agent sees them ([`NodeReplicas`]) and each
//!   copy's inputs on its executor ([`serve_copy`]).
//! - `state`: the bytes of what a member saves before it answers ([`MemberState`]); the file
//!   is `<shard dir>/replica.state`, replaced durably ([`store_state`], [`load_state`]).

mod copy;
mod core;
mod frame;
mod host;
mod net;
mod state;

use std::path::{Path, PathBuf};

pub use self::copy::{CopyError, Links, ShardCopy};
pub use self::core::{Action, DiskOp, Member, Message, Proposal, Timing, WriteError};
pub use self::frame::{FRAME_BYTES_MAX, Frame, FrameError, decode as decode_frame, encode as encode_frame};
pub use self::host::{ControlInput, CopyChannels, NodeLinks, NodeReplicas, serve_copy};
pub use self::net::{ALPN, Inbound, NetConfig, NetSender, ReplicaNet};
pub use self::state::{MemberState, StateError, decode as decode_state, encode as encode_state};

/// The state file of the shard copy in `shard_dir`.
pub fn state_path(shard_dir: &Path) -> PathBuf {
    shard_dir.join("replica.state")
}

/// The saved state (none: the copy never saved one).
pub fn load_state(shard_dir: &Path) -> Result<Option<MemberState>, String> {
    let path = state_path(shard_dir);
    match std::fs::read(&path) {
        Ok(bytes) => decode_state(&bytes).map(Some).map_err(|error| format!("{}: {error}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(format!("{}: {error}", path.display())),
    }
}

/// Replaces the saved state durably (a crash leaves the old or the new). Blocking (fsync):
/// call it off the executors, and before sending what followed the `Save`.
pub fn store_state(shard_dir: &Path, state: &MemberState) -> std::io::Result<()> {
    crate::files::replace_durably(&state_path(shard_dir), &encode_state(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_state_survives_and_a_failed_or_damaged_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_state(dir.path()), Ok(None));
        let first = MemberState { epoch: 3, primary: Some("n2".into()), config: None };
        store_state(dir.path(), &first).unwrap();
        assert_eq!(load_state(dir.path()), Ok(Some(first.clone())));
        // The temporary file cannot be created: a directory is in its way. The old state stays.
        std::fs::create_dir(dir.path().join("replica.state.tmp")).unwrap();
        let second = MemberState { epoch: 4, ..first.clone() };
        assert!(store_state(dir.path(), &second).is_err());
        assert_eq!(load_state(dir.path()), Ok(Some(first)));
        std::fs::remove_dir(dir.path().join("replica.state.tmp")).unwrap();
        store_state(dir.path(), &second).unwrap();
        assert_eq!(load_state(dir.path()), Ok(Some(second)));
        // A torn or damaged file is an error naming the file, never a fresh start.
        let bytes = std::fs::read(state_path(dir.path())).unwrap();
        std::fs::write(state_path(dir.path()), &bytes[..bytes.len() - 2]).unwrap();
        let error = load_state(dir.path()).unwrap_err();
        assert!(error.contains("replica.state") && error.contains("truncated"), "{error}");
        assert!(store_state(&dir.path().join("gone"), &MemberState::default()).is_err());
    }
}
