//! Hard limits of the formats. Each boundary may set a tighter limit of its own.

/// The largest payload any record may carry, whatever the boundary: 64 MiB.
/// Decoders reject a header announcing more before touching the payload.
pub const PAYLOAD_BYTES_MAX: u32 = 64 << 20;
