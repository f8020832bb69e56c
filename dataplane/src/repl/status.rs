//! What a node knows about the regions shipping to it: per source region and shard, the
//! closed timestamp applied (every record at or below it is durable and readable here). A
//! source region's resolved timestamp is the minimum over its shards: reads at or below it
//! are consistent across shards. A home node also records, per shard, the timestamp up to
//! which its own writes are applied; the node's readable timestamp (what snapshot reads wait
//! for) is the minimum of both. Shared by the replication thread and the home shards
//! (writers) and the shards' client endpoints (readers).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

/// One source region's state as seen here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceState {
    /// The region.
    pub region: String,
    /// Minimum closed timestamp over its shards (0 until every shard reported one).
    pub resolved_ts: u64,
    /// Shards that reported a closed timestamp.
    pub shards_closed: u32,
    /// Its shard count.
    pub shards: u32,
}

/// The resolved timestamps of one node.
#[derive(Debug)]
pub struct Resolved {
    region: String,
    sources: Mutex<BTreeMap<String, Vec<u64>>>,
    /// Home nodes: per shard, every local write at or below it is applied (0: not yet told).
    local: Mutex<Vec<u64>>,
}

impl Resolved {
    /// The table of a node in `region`, expecting `sources` regions of `shards` shards each.
    /// `home`: the node takes the writes of its shards (their applied points count too).
    pub fn new(region: &str, sources: &[String], shards: u32, home: bool) -> Self {
        let sources = sources.iter().map(|source| (source.clone(), vec![0; shards as usize])).collect();
        let local = if home { vec![0; shards as usize] } else { Vec::new() };
        Self { region: region.to_owned(), sources: Mutex::new(sources), local: Mutex::new(local) }
    }

    /// Home shard `shard` has applied every local write at or below `ts`.
    pub fn set_applied(&self, shard: u32, ts: u64) {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = local.get_mut(shard as usize) {
            *slot = (*slot).max(ts);
        }
    }

    /// The timestamp at or below which reads on this node are consistent across every shard
    /// and region: the minimum of the home shards' applied points and each source region's
    /// resolved timestamp (0 while one of them has not reported).
    pub fn readable_ts(&self) -> u64 {
        let local = self.local.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().min();
        let sources = self.sources().into_iter().map(|source| source.resolved_ts).min();
        match (local, sources) {
            (Some(local), Some(sources)) => local.min(sources),
            (Some(ts), None) | (None, Some(ts)) => ts,
            (None, None) => 0,
        }
    }

    /// This node's region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Shard `shard` of `source` has applied everything up to `closed_ts`.
    pub fn set_closed(&self, source: &str, shard: u32, closed_ts: u64) {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = sources.get_mut(source).and_then(|shards| shards.get_mut(shard as usize)) {
            *slot = (*slot).max(closed_ts);
        }
    }

    /// Every source region, by name.
    pub fn sources(&self) -> Vec<SourceState> {
        let sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        sources
            .iter()
            .map(|(region, shards)| {
                let closed = shards.iter().filter(|ts| **ts > 0).count();
                SourceState {
                    region: region.clone(),
                    resolved_ts: if closed == shards.len() { shards.iter().copied().min().unwrap_or(0) } else { 0 },
                    shards_closed: u32::try_from(closed).unwrap_or(u32::MAX),
                    shards: u32::try_from(shards.len()).unwrap_or(u32::MAX),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_is_the_minimum_once_every_shard_reported() {
        let table = Resolved::new("b", &["a".to_owned()], 2, false);
        table.set_closed("a", 0, 50);
        assert_eq!(table.sources()[0].resolved_ts, 0, "shard 1 has not reported");
        table.set_closed("a", 1, 40);
        assert_eq!(table.sources()[0].resolved_ts, 40);
        table.set_closed("a", 1, 30);
        assert_eq!(table.sources()[0].resolved_ts, 40, "never goes back");
        table.set_closed("zz", 0, 1);
        table.set_closed("a", 9, 1);
        assert_eq!(table.sources().len(), 1, "unknown regions and shards are ignored");
    }

    #[test]
    fn readable_is_the_minimum_of_local_and_every_source() {
        let home = Resolved::new("a", &[], 2, true);
        assert_eq!(home.readable_ts(), 0);
        home.set_applied(0, 90);
        assert_eq!(home.readable_ts(), 0, "shard 1 has not reported");
        home.set_applied(1, 70);
        assert_eq!(home.readable_ts(), 70);
        home.set_applied(1, 60);
        assert_eq!(home.readable_ts(), 70, "never goes back");

        let replica = Resolved::new("b", &["a".to_owned()], 1, false);
        replica.set_applied(0, 500);
        assert_eq!(replica.readable_ts(), 0, "a replica has no local shards to count");
        replica.set_closed("a", 0, 40);
        assert_eq!(replica.readable_ts(), 40);

        let both = Resolved::new("c", &["a".to_owned()], 1, true);
        both.set_applied(0, 30);
        both.set_closed("a", 0, 50);
        assert_eq!(both.readable_ts(), 30);
    }
}
