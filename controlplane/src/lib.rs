//! The control plane: Raft-replicated cluster metadata, the GLTS time-interval service,
//! membership and leases. Not built yet (issue 4); the crate exists so the workspace has its
//! final shape.
