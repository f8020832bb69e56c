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
/// A released WAL segment or an old checkpoint is freed this much at a time before it is
/// unlinked (see `files::delete_gradually`).
pub const DELETE_STEP_BYTES: u64 = 8 << 20;
/// Pause between two such steps.
pub const DELETE_STEP_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);
/// Newest durable WAL bytes a shard that ships kept in memory for its shippers (see
/// `wal::tail`): a stream that keeps up reads from here, one far behind from the segments.
pub const WAL_TAIL_BYTES: usize = 32 << 20;
/// Released WAL segments a shard keeps for reuse: what one default flush interval
/// (`CHECKPOINT_WAL_BYTES_DEFAULT`) releases, so steady writing never zero-fills.
pub const WAL_REUSE_SEGMENTS_DEFAULT: usize = 4;
/// Largest single write when zero-filling a new segment.
pub const WAL_ZERO_FILL_IO_BYTES: usize = 256 << 10;
/// Pace of zero-filling the next WAL segment while the active one has room (faster when the
/// WAL fills faster, see `wal::writer::zero_fill_paced`). At full speed, 64 MiB of zeros in
/// about 70 ms sat in the device queue ahead of every `fdatasync` on the disk.
pub const WAL_ZERO_FILL_BYTES_PER_SEC: u64 = 64 << 20;
/// DMA write cap when the device's `max_sectors_kb` cannot be read.
pub const IO_BYTES_MAX_FALLBACK: usize = 128 << 10;
/// Default capacity of each cross-shard channel.
pub const MESH_CHANNEL_CAPACITY_DEFAULT: usize = 1024;
/// Most shards one node runs.
pub const SHARDS_MAX: usize = 256;

/// Default longest key.
pub const KEY_BYTES_MAX_DEFAULT: usize = 4096;
/// Upper bound on the key limit (keys are u16-length-prefixed in every format).
pub const KEY_BYTES_LIMIT: usize = 32 << 10;
/// Default largest value: a value travels in one client frame.
pub const VALUE_BYTES_MAX_DEFAULT: usize = 60 << 20;
/// Upper bound on the value limit: the frame limit minus room for the request head.
pub const VALUE_BYTES_LIMIT: usize = (64 << 20) - (64 << 10);
/// Default threshold above which values are chunked.
pub const INLINE_BYTES_MAX_DEFAULT: usize = 64 << 10;
/// Default chunk size of chunked values.
pub const CHUNK_BYTES_DEFAULT: usize = 1 << 20;
/// Default largest WAL record of the store (a batch of inline values, or chunk lists).
pub const STORE_RECORD_BYTES_MAX_DEFAULT: u32 = 2 << 20;
/// Default most operations in one batch put.
pub const BATCH_OPS_MAX_DEFAULT: usize = 1024;
/// Default retention of old versions.
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(3600);
/// Default interval between garbage-collection passes.
pub const GC_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
/// Keys visited per garbage-collection step before yielding.
pub const GC_KEYS_PER_STEP: usize = 1024;
/// Default WAL bytes between checkpoints.
pub const CHECKPOINT_WAL_BYTES_DEFAULT: u64 = 256 << 20;
/// Default memory budget of one shard's store when the node does not split one
/// (`StoreConfig::new`; the node's default is a share of the machine's RAM).
pub const STORE_SHARD_MEMORY_BYTES_DEFAULT: u64 = 256 << 20;
/// Smallest memory budget of one shard: memtables of 2 MiB, a 16 MiB cache.
pub const STORE_SHARD_MEMORY_BYTES_MIN: u64 = 32 << 20;
/// Share of the machine's RAM the node's store may use by default (`store.memory_bytes_max`).
pub const STORE_MEMORY_RAM_SHARE: f64 = 0.25;
/// Level-0 runs of a shard's engine that make a compaction due.
pub const ENGINE_L0_RUNS_COMPACT: usize = 4;
/// Threads per shard serving engine reads.
pub const ENGINE_READ_THREADS: usize = 2;
/// Default requests in flight per client connection.
pub const INFLIGHT_PER_CONNECTION_DEFAULT: usize = 1024;
/// Default open client connections per shard.
pub const CONNECTIONS_MAX_DEFAULT: usize = 4096;
/// Most entries one `List` request returns.
pub const LIST_LIMIT_MAX: u32 = 10_000;
/// Upper bound on requests in flight per connection.
pub const INFLIGHT_PER_CONNECTION_LIMIT: usize = 65_536;
/// Default client address of shard 0.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7700";

/// Default time between heartbeats to the control plane, ms.
pub const HEARTBEAT_MS_DEFAULT: u64 = 500;
/// Default length of a shard-primary lease, ms.
pub const LEASE_MS_DEFAULT: u64 = 6_000;
/// Default time between GLTS exchanges, ms.
pub const GLTS_SYNC_MS_DEFAULT: u64 = 100;
/// Default drift bound of the clocks involved, ppm (as the control plane's GLTS).
pub const DRIFT_PPM_DEFAULT: u64 = 200;
/// Default wait at start-up for the control plane's members and a GLTS interval, ms.
pub const CONTROL_START_TIMEOUT_MS_DEFAULT: u64 = 15_000;
