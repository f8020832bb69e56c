//! Named limits of the data plane. Every queue, batch and record has one.

use std::time::Duration;

/// Default size of a WAL segment file.
pub const WAL_SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Default largest batch extent written under one barrier.
pub const WAL_BATCH_BYTES_MAX_DEFAULT: usize = 4 << 20;
/// Upper bound on the batch extent setting (it must fit the u32 `extent_bytes` field and the
/// wire payload limit).
pub const WAL_BATCH_BYTES_MAX_LIMIT: usize = 64 << 20;
/// Default most records per batch.
pub const WAL_BATCH_RECORDS_MAX_DEFAULT: u32 = 16_384;
/// Upper bound on the linger setting: more only adds latency.
pub const WAL_BATCH_LINGER_MAX: Duration = Duration::from_millis(10);
/// Default largest record payload (values above the chunk threshold go to the chunk store).
pub const WAL_RECORD_PAYLOAD_BYTES_MAX_DEFAULT: u32 = 1 << 20;
/// Largest single write when zero-filling a new segment.
pub const WAL_ZERO_FILL_IO_BYTES: usize = 1 << 20;
/// DMA write cap when the device's `max_sectors_kb` cannot be read.
pub const IO_BYTES_MAX_FALLBACK: usize = 128 << 10;
/// Default capacity of each cross-shard channel.
pub const MESH_CHANNEL_CAPACITY_DEFAULT: usize = 1024;
/// Most shards one node runs.
pub const SHARDS_MAX: usize = 256;
