//! The shard-routing client: shard map from `Hello`, one lazily opened connection per shard,
//! retries of idempotent requests, fan-out of listings and batches.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use wire::proto::{ErrorCode, Request};

use crate::connection::{Connection, Encode, Reply};
use crate::error::ClientError;

/// First pause before a retry; doubled for each further attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Longest pause between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest key, prefix or continuation the wire format can carry (u16 length prefix).
const KEY_BYTES_MAX: usize = u16::MAX as usize;

/// How a [`Client`] connects, waits and retries.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Longest wait for a TCP connection to a node.
    pub connect_timeout: Duration,
    /// Longest wait for the response to one attempt of a request, queueing included.
    pub request_timeout: Duration,
    /// Largest frame payload sent or accepted, capped at [`wire::limits::PAYLOAD_BYTES_MAX`].
    pub frame_payload_bytes_max: u32,
    /// Further attempts of a request after the first one fails in a retryable way.
    pub retries: u32,
    /// Most requests in flight on one connection; further callers wait for a slot.
    pub in_flight_max: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            frame_payload_bytes_max: wire::limits::PAYLOAD_BYTES_MAX,
            retries: 3,
            in_flight_max: 256,
        }
    }
}

/// A value and the timestamp of its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The version's timestamp.
    pub ts: u64,
    /// The value; shares the response frame's buffer.
    pub value: Bytes,
}

/// A version's stored chunks ([`Client::chunk_refs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueChunks {
    /// Version timestamp.
    pub ts: u64,
    /// Value size.
    pub size: u64,
    /// (BLAKE3, length) of each chunk in order; empty for an inline value.
    pub chunks: Vec<([u8; 32], u32)>,
}

/// A node readable at a timestamp ([`Client::wait_readable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readable {
    /// The node's readable timestamp when it answered (at or above the one asked).
    pub readable_ts: u64,
    /// When it was seen readable, unix µs on the node's clock.
    pub at_us: u64,
}

/// A node's replication status ([`Client::replication_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationStatus {
    /// The node's clock (a timestamp) when it answered.
    pub now_ts: u64,
    /// The node's region.
    pub region: String,
    /// One entry per region shipping to this node.
    pub sources: Vec<SourceStatus>,
}

impl ReplicationStatus {
    /// How far behind the node's clock the resolved timestamp of `source` is, in
    /// microseconds (`None` until every shard of the source has reported).
    pub fn lag_us(&self, source: &str) -> Option<u64> {
        self.source(source)?.lag_us(self.now_ts)
    }

    /// The entry of region `source`, if it ships to this node.
    pub fn source(&self, source: &str) -> Option<&SourceStatus> {
        self.sources.iter().find(|s| s.region == source)
    }

    /// The resolved timestamp of `source` (0 until every shard of it reported, or when it
    /// does not ship here).
    pub fn resolved_ts(&self, source: &str) -> u64 {
        self.source(source).map_or(0, |source| source.resolved_ts)
    }

    /// The largest lag over every source region (the node's RPO), in microseconds; `None`
    /// while a source has not reported, or when no region ships here.
    pub fn worst_lag_us(&self) -> Option<u64> {
        let lags: Option<Vec<u64>> = self.sources.iter().map(|source| source.lag_us(self.now_ts)).collect();
        lags?.into_iter().max()
    }

    /// Whether every source region has resolved past `ts` (reads at `ts` see every region's
    /// writes at or below it; true when no region ships here).
    pub fn resolved_past(&self, ts: u64) -> bool {
        self.sources.iter().all(|source| source.resolved_ts >= ts)
    }
}

impl SourceStatus {
    /// How far behind `now_ts` (the node's clock) the resolved timestamp is, in microseconds
    /// (`None` until every shard has reported).
    pub fn lag_us(&self, now_ts: u64) -> Option<u64> {
        (self.resolved_ts > 0)
            .then(|| wire::glt::physical_us(now_ts).saturating_sub(wire::glt::physical_us(self.resolved_ts)))
    }
}

/// One source region of a [`ReplicationStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatus {
    /// The region shipping to the node.
    pub region: String,
    /// Minimum closed timestamp applied over its shards (0 until all reported).
    pub resolved_ts: u64,
    /// Shards that have reported.
    pub shards_closed: u32,
    /// Its shard count.
    pub shards: u32,
}

/// Metadata of a key's visible version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// The version's timestamp.
    pub ts: u64,
    /// Value size in bytes.
    pub size: u64,
    /// Chunks holding the value (0: stored inline).
    pub chunks: u32,
    /// Versions retained for the key.
    pub versions: u32,
}

/// One key of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: Vec<u8>,
    /// Timestamp of the visible version.
    pub ts: u64,
    /// Value size in bytes.
    pub size: u64,
}

/// A page of keys in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The entries, in ascending key order.
    pub entries: Vec<Entry>,
    /// Pass as `start_after` to get the next page; `None` when the listing is complete.
    pub next: Option<Vec<u8>>,
}

/// Entries per request of [`Client::list_all`].
const LIST_ALL_PAGE: u32 = 1000;

/// A Meridian client. Cheap to clone; all clones share the shard map and the connections.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    shard_count: u32,
    addresses: Vec<String>,
    /// The connection of each shard, opened on first use and replaced once it breaks. The async
    /// lock makes concurrent first users share one connect instead of racing several.
    connections: Vec<tokio::sync::Mutex<Option<Arc<Connection>>>>,
}

impl Client {
    /// Connects to `seed`, asks it for the shard map and keeps that connection for the shard
    /// that answered. Connection failures are retried `config.retries` times.
    pub async fn connect(seed: &str, config: ClientConfig) -> Result<Self, ClientError> {
        let encode_hello: &Encode<'_> = &|out| {
            Request::Hello.encode(out);
            Ok(())
        };
        let mut attempt = 0;
        let (connection, reply) = loop {
            let result = match Connection::open(seed, &config).await {
                Ok(connection) => connection.request(1, encode_hello).await.map(|reply| (connection, reply)),
                Err(error) => Err(error),
            };
            if attempt >= config.retries || !should_retry(result.as_ref().map(|(_, reply)| reply), true) {
                break result?;
            }
            attempt += 1;
            tokio::time::sleep(backoff(attempt)).await;
        };
        let (shard, addresses) = match reply {
            Reply::Hello { shard, addresses } => (shard, addresses),
            Reply::Error { code, message } => return Err(ClientError::Server { code, message }),
            other => return Err(unexpected(other, "Hello")),
        };
        // The seed's connection serves the shard that answered, whatever address it was dialed by.
        Self::over(addresses, config, Some((shard, Arc::new(connection))))
    }

    /// A client whose shard `k` is at `addresses[k]`, without asking a node for its map. In a
    /// cluster whose shards are homed in different regions, give each shard its home region's
    /// address (from that region's [`Client::addresses`]) so every write goes where it is
    /// taken; reads of a shard are then answered by its home too.
    pub fn with_addresses(addresses: Vec<String>, config: ClientConfig) -> Result<Self, ClientError> {
        Self::over(addresses, config, None)
    }

    /// A client over the shard map `addresses`, with `seed`'s shard already connected.
    fn over(
        addresses: Vec<String>,
        config: ClientConfig,
        mut seed: Option<(u32, Arc<Connection>)>,
    ) -> Result<Self, ClientError> {
        let seed_shard = seed.as_ref().map(|(shard, _)| *shard);
        let Some(shard_count) = u32::try_from(addresses.len())
            .ok()
            .filter(|count| *count > 0 && seed_shard.is_none_or(|shard| shard < *count))
        else {
            let from = seed_shard.map(|shard| format!(" from shard {shard}")).unwrap_or_default();
            let count = addresses.len();
            return Err(ClientError::Protocol(format!("shard map of {count} shards{from}: no shard to route to")));
        };
        let connections = (0..shard_count)
            .map(|index| {
                tokio::sync::Mutex::new(seed.take_if(|(shard, _)| *shard == index).map(|(_, connection)| connection))
            })
            .collect();
        Ok(Self { inner: Arc::new(Inner { config, shard_count, addresses, connections }) })
    }

    /// Number of shards in the shard map.
    pub fn shard_count(&self) -> u32 {
        self.inner.shard_count
    }

    /// Every shard's client address, by shard id.
    pub fn addresses(&self) -> &[String] {
        &self.inner.addresses
    }

    /// The shard that owns `key`.
    pub fn shard_for(&self, key: &[u8]) -> u32 {
        wire::shard_for(key, self.inner.shard_count)
    }

    /// Writes `value` as the new version of `key`; returns the version's timestamp once durable.
    /// Not retried once sent: if the connection breaks, the write may or may not have happened.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<u64, ClientError> {
        check_len("key", key)?;
        let body_bytes = 1 + 2 + key.len() + value.len();
        self.check_request_len(body_bytes)?;
        match self.call_request(self.shard_for(key), false, body_bytes, &Request::Put { key, value }).await? {
            Reply::Written { ts } => Ok(ts),
            other => Err(unexpected(other, "Put")),
        }
    }

    /// The node's replication status: per source region, the resolved timestamp (reads at or
    /// below it see every shard's writes from that region) and the node's clock reading.
    pub async fn replication_status(&self) -> Result<ReplicationStatus, ClientError> {
        match self.call_request(0, true, 1, &Request::Replication).await? {
            Reply::Replication(status) => Ok(status),
            other => Err(unexpected(other, "Replication")),
        }
    }

    /// Waits until reads at `ts` are consistent on the node (its home shards have applied, and
    /// every region shipping to it has resolved, everything at or below `ts`), at most
    /// `timeout` (and the request timeout). Returns the node's readable timestamp and when it
    /// was seen there (unix µs, the node's clock). A global snapshot's reads wait for this.
    pub async fn wait_readable(&self, ts: u64, timeout: std::time::Duration) -> Result<Readable, ClientError> {
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        match self.call_request(0, true, 1 + 8 + 4, &Request::WaitReadable { ts, timeout_ms }).await? {
            Reply::Readable { readable_ts, at_us } => Ok(Readable { readable_ts, at_us }),
            other => Err(unexpected(other, "WaitReadable")),
        }
    }

    /// The stored chunks (BLAKE3 and length, in order) of `key`'s version at `at`, with its
    /// timestamp and size; empty chunks for a value stored inline. `Ok(None)` when no version
    /// is visible. Comparing two versions' lists tells which byte ranges changed.
    pub async fn chunk_refs(&self, key: &[u8], at: Option<u64>) -> Result<Option<ValueChunks>, ClientError> {
        check_len("key", key)?;
        match self
            .call_request(self.shard_for(key), true, 1 + 8 + 2 + key.len(), &Request::ChunkRefs { key, at })
            .await?
        {
            Reply::ChunkRefs { ts, size, chunks } => Ok(Some(ValueChunks { ts, size, chunks })),
            Reply::NotFound => Ok(None),
            other => Err(unexpected(other, "ChunkRefs")),
        }
    }

    /// `len` bytes of `key`'s value at `at` from `offset` (fewer at its end); the node reads
    /// only the chunks that hold them. `Ok(None)` when no version is visible.
    pub async fn get_range(
        &self,
        key: &[u8],
        at: Option<u64>,
        offset: u64,
        len: u32,
    ) -> Result<Option<Versioned>, ClientError> {
        check_len("key", key)?;
        match self
            .call_request(
                self.shard_for(key),
                true,
                1 + 8 + 8 + 4 + 2 + key.len(),
                &Request::GetRange { key, at, offset, len },
            )
            .await?
        {
            Reply::Value { ts, value } => Ok(Some(Versioned { ts, value })),
            Reply::NotFound => Ok(None),
            other => Err(unexpected(other, "GetRange")),
        }
    }

    /// Reads `key` as of timestamp `at` (`None`: latest). `Ok(None)` when no version is visible.
    pub async fn get(&self, key: &[u8], at: Option<u64>) -> Result<Option<Versioned>, ClientError> {
        check_len("key", key)?;
        match self.call_request(self.shard_for(key), true, 1 + 8 + 2 + key.len(), &Request::Get { key, at }).await? {
            Reply::Value { ts, value } => Ok(Some(Versioned { ts, value })),
            Reply::NotFound => Ok(None),
            other => Err(unexpected(other, "Get")),
        }
    }

    /// Writes a tombstone for `key`; returns its timestamp. Not retried once sent.
    /// [`ClientError::NotFound`] if the server reports there was nothing to delete.
    pub async fn delete(&self, key: &[u8]) -> Result<u64, ClientError> {
        check_len("key", key)?;
        match self.call_request(self.shard_for(key), false, 1 + 2 + key.len(), &Request::Delete { key }).await? {
            Reply::Written { ts } => Ok(ts),
            Reply::NotFound => Err(ClientError::NotFound),
            other => Err(unexpected(other, "Delete")),
        }
    }

    /// Metadata of `key` as of `at` (`None`: latest). `Ok(None)` when no version is visible.
    pub async fn stat(&self, key: &[u8], at: Option<u64>) -> Result<Option<Stat>, ClientError> {
        check_len("key", key)?;
        match self.call_request(self.shard_for(key), true, 1 + 8 + 2 + key.len(), &Request::Stat { key, at }).await? {
            Reply::Stat { ts, size, chunks, versions } => Ok(Some(Stat { ts, size, chunks, versions })),
            Reply::NotFound => Ok(None),
            other => Err(unexpected(other, "Stat")),
        }
    }

    /// Lists up to `limit` keys starting with `prefix` and strictly after `start_after` (empty:
    /// from the start), in key order, as of `at` (`None`: each shard's latest; the pages of
    /// different shards are then not one snapshot).
    ///
    /// Keys of a prefix are spread over all shards, so every shard is asked for `limit` keys
    /// and the pages are merged. The merged page stops at the smallest continuation point of
    /// a shard that has more, so no key is skipped even when a shard answers with fewer keys
    /// than asked. Pass [`Listing::next`] as `start_after` to continue. A `limit` of 0 asks
    /// nothing and returns an empty, complete listing.
    pub async fn list(
        &self,
        prefix: &[u8],
        start_after: &[u8],
        limit: u32,
        at: Option<u64>,
    ) -> Result<Listing, ClientError> {
        check_len("prefix", prefix)?;
        check_len("start_after", start_after)?;
        if limit == 0 {
            return Ok(Listing::default());
        }
        let pages = wire::join_all(
            (0..self.inner.shard_count).map(|shard| self.list_shard(shard, prefix, start_after, limit, at)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        Ok(merge_pages(pages, limit as usize))
    }

    /// Every key starting with `prefix` at `at`, page after page.
    pub async fn list_all(&self, prefix: &[u8], at: Option<u64>) -> Result<Vec<Entry>, ClientError> {
        let mut entries = Vec::new();
        let mut after = Vec::new();
        loop {
            let page = self.list(prefix, &after, LIST_ALL_PAGE, at).await?;
            entries.extend(page.entries);
            match page.next {
                Some(next) => after = next,
                None => return Ok(entries),
            }
        }
    }

    async fn list_shard(
        &self,
        shard: u32,
        prefix: &[u8],
        start_after: &[u8],
        limit: u32,
        at: Option<u64>,
    ) -> Result<Page, ClientError> {
        let body_bytes = 1 + 8 + 4 + 2 + prefix.len() + 2 + start_after.len();
        let (entries, next) = match self
            .call_request(shard, true, body_bytes, &Request::List { prefix, start_after, limit, at })
            .await?
        {
            Reply::Listing { entries, next } => (entries, next),
            other => return Err(unexpected(other, "List")),
        };
        let mut previous = start_after;
        for entry in &entries {
            if entry.key.as_slice() <= previous || !entry.key.starts_with(prefix) {
                return Err(ClientError::Protocol(format!(
                    "shard {shard} listed key {:?} out of order or outside the prefix",
                    String::from_utf8_lossy(&entry.key)
                )));
            }
            previous = &entry.key;
        }
        Ok(Page { entries, next })
    }

    /// Writes every (key, value) pair: one `BatchPut` per shard owning some of the keys, sent
    /// concurrently. Each shard's part is atomic (one timestamp, all or nothing); the batch as a
    /// whole is NOT: if one shard fails, the parts of other shards may be written. Returns the
    /// largest timestamp of the parts. Not retried once sent. An empty batch sends nothing and
    /// returns 0.
    pub async fn batch_put(&self, items: &[(&[u8], &[u8])]) -> Result<u64, ClientError> {
        let mut groups: Vec<Vec<(&[u8], &[u8])>> = vec![Vec::new(); self.inner.connections.len()];
        for &(key, value) in items {
            check_len("key", key)?;
            groups[self.shard_for(key) as usize].push((key, value));
        }
        let mut parts = Vec::new();
        for (shard, group) in (0_u32..).zip(&groups) {
            if group.is_empty() {
                continue;
            }
            let body_bytes = group.iter().map(|(key, value)| 2 + key.len() + 4 + value.len()).sum::<usize>() + 1 + 4;
            self.check_request_len(body_bytes)?;
            parts.push(self.batch_put_shard(shard, group, body_bytes));
        }
        let mut ts_max = 0;
        for result in wire::join_all(parts).await {
            ts_max = ts_max.max(result?);
        }
        Ok(ts_max)
    }

    async fn batch_put_shard(
        &self,
        shard: u32,
        group: &[(&[u8], &[u8])],
        body_bytes: usize,
    ) -> Result<u64, ClientError> {
        let encode: &Encode<'_> = &|out| {
            wire::proto::encode_batch_put(group.iter().copied(), out).map_err(|error| ClientError::TooLarge {
                what: "batch item",
                len: match error {
                    wire::EncodeError::PayloadTooLarge { len, .. } => len,
                    wire::EncodeError::BufferTooSmall { needed, .. } => needed,
                },
                max: u32::MAX as usize,
            })
        };
        match self.call(shard, false, body_bytes, encode).await? {
            Reply::Written { ts } => Ok(ts),
            other => Err(unexpected(other, "BatchPut")),
        }
    }

    /// [`Client::call`] with one request.
    async fn call_request(
        &self,
        shard: u32,
        idempotent: bool,
        body_bytes_hint: usize,
        request: &Request<'_>,
    ) -> Result<Reply, ClientError> {
        self.call(shard, idempotent, body_bytes_hint, &|out| {
            request.encode(out);
            Ok(())
        })
        .await
    }

    /// Sends a request to `shard`, retrying as the request kind allows, and turns an error
    /// response into [`ClientError::Server`].
    async fn call(
        &self,
        shard: u32,
        idempotent: bool,
        body_bytes_hint: usize,
        encode: &Encode<'_>,
    ) -> Result<Reply, ClientError> {
        let mut attempt = 0;
        let result = loop {
            let result = match self.connection(shard).await {
                Ok(connection) => connection.request(body_bytes_hint, encode).await,
                Err(error) => Err(error),
            };
            if attempt >= self.inner.config.retries || !should_retry(result.as_ref(), idempotent) {
                break result;
            }
            attempt += 1;
            tokio::time::sleep(backoff(attempt)).await;
        };
        match result? {
            Reply::Error { code, message } => Err(ClientError::Server { code, message }),
            reply => Ok(reply),
        }
    }

    /// The open connection of `shard`, opening one if there is none or the last one broke.
    async fn connection(&self, shard: u32) -> Result<Arc<Connection>, ClientError> {
        let index = shard as usize;
        let mut slot = self.inner.connections[index].lock().await;
        if let Some(connection) = slot.as_ref().filter(|connection| connection.is_open()) {
            return Ok(Arc::clone(connection));
        }
        *slot = None;
        let connection = Arc::new(Connection::open(&self.inner.addresses[index], &self.inner.config).await?);
        *slot = Some(Arc::clone(&connection));
        Ok(connection)
    }

    fn check_request_len(&self, body_bytes: usize) -> Result<(), ClientError> {
        let max = self.inner.config.frame_payload_bytes_max.min(wire::limits::PAYLOAD_BYTES_MAX) as usize;
        if body_bytes > max {
            return Err(ClientError::TooLarge { what: "request", len: body_bytes, max });
        }
        Ok(())
    }
}

/// Whether an attempt's outcome allows another attempt. A request that never left (connect
/// failed) may always be resent; one that may have reached the server only if idempotent.
fn should_retry(result: Result<&Reply, &ClientError>, idempotent: bool) -> bool {
    match result {
        Ok(Reply::Error { code, .. }) => idempotent && ErrorCode::is_transient(*code),
        Ok(_) => false,
        Err(error) => error.never_sent() || (idempotent && error.is_retryable()),
    }
}

/// Pause before attempt `attempt` (1 for the first retry).
fn backoff(attempt: u32) -> Duration {
    BACKOFF_BASE.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(BACKOFF_MAX)
}

fn check_len(what: &'static str, bytes: &[u8]) -> Result<(), ClientError> {
    // The wire format would cut a longer field silently; refuse it instead.
    if bytes.len() > KEY_BYTES_MAX {
        return Err(ClientError::TooLarge { what, len: bytes.len(), max: KEY_BYTES_MAX });
    }
    Ok(())
}

fn unexpected(reply: Reply, request: &str) -> ClientError {
    ClientError::Protocol(format!("unexpected {} response to {request}", reply.name()))
}

/// One shard's answer to a `List`.
#[derive(Debug)]
struct Page {
    entries: Vec<Entry>,
    /// Empty when the shard has no more keys.
    next: Vec<u8>,
}

/// Merges per-shard pages (each sorted, key sets disjoint) into one page of at most `limit`.
///
/// A shard that has more keys vouches only for keys up to its `next`: beyond it, keys of that
/// shard were not returned and may sort before keys returned by other shards. So entries are
/// cut at the smallest such `next` before taking the first `limit`.
fn merge_pages(pages: Vec<Page>, limit: usize) -> Listing {
    let cutoff = pages.iter().filter(|page| !page.next.is_empty()).map(|page| page.next.clone()).min();
    let mut entries = pages
        .into_iter()
        .flat_map(|page| page.entries)
        .filter(|entry| cutoff.as_ref().is_none_or(|cutoff| entry.key <= *cutoff))
        .collect::<Vec<_>>();
    entries.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    let more = cutoff.is_some() || entries.len() > limit;
    entries.truncate(limit);
    let next = if more { entries.last().map(|entry| entry.key.clone()).or(cutoff) } else { None };
    Listing { entries, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str) -> Entry {
        Entry { key: key.as_bytes().to_vec(), ts: 1, size: 1 }
    }

    fn page(keys: &[&str], next: &str) -> Page {
        Page { entries: keys.iter().map(|key| entry(key)).collect(), next: next.as_bytes().to_vec() }
    }

    fn keys(listing: &Listing) -> Vec<&str> {
        listing.entries.iter().map(|entry| std::str::from_utf8(&entry.key).unwrap()).collect()
    }

    #[test]
    fn merge_interleaves_and_keeps_limit() {
        let listing = merge_pages(vec![page(&["a", "d"], ""), page(&["b", "c", "e"], "")], 3);
        assert_eq!(keys(&listing), ["a", "b", "c"]);
        assert_eq!(listing.next.as_deref(), Some(&b"c"[..]));
    }

    #[test]
    fn merge_complete_when_everything_fits() {
        let listing = merge_pages(vec![page(&["a"], ""), page(&["b"], ""), page(&[], "")], 3);
        assert_eq!(keys(&listing), ["a", "b"]);
        assert_eq!(listing.next, None);
    }

    #[test]
    fn merge_cuts_at_a_short_shard_page() {
        // Shard 1 answered with fewer keys than asked but has more: "c" may exist there, so
        // "d" and "e" must wait for the next page.
        let listing = merge_pages(vec![page(&["a", "d", "e"], ""), page(&["b"], "b")], 10);
        assert_eq!(keys(&listing), ["a", "b"]);
        assert_eq!(listing.next.as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn merge_empty_page_with_more_continues_from_cutoff() {
        let listing = merge_pages(vec![page(&[], "m"), page(&["x"], "")], 10);
        assert!(listing.entries.is_empty());
        assert_eq!(listing.next.as_deref(), Some(&b"m"[..]));
    }

    #[test]
    fn retry_policy() {
        let lost = ClientError::ConnectionLost { addr: "a".into(), reason: "eof".into() };
        let refused = ClientError::Connect { addr: "a".into(), source: std::io::ErrorKind::ConnectionRefused.into() };
        assert!(should_retry(Err(&lost), true));
        assert!(!should_retry(Err(&lost), false));
        assert!(should_retry(Err(&refused), false));
        assert!(!should_retry(Err(&ClientError::Timeout), true));
        let busy = Reply::Error { code: ErrorCode::TooManyInFlight, message: String::new() };
        assert!(should_retry(Ok(&busy), true));
        assert!(!should_retry(Ok(&busy), false));
        let bad = Reply::Error { code: ErrorCode::KeyTooLarge, message: String::new() };
        assert!(!should_retry(Ok(&bad), true));
        assert_eq!(backoff(1), BACKOFF_BASE);
        assert_eq!(backoff(2), BACKOFF_BASE * 2);
        assert_eq!(backoff(40), BACKOFF_MAX);
    }
}
