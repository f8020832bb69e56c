//! What a node knows about the regions shipping to it: per source region and each shard homed
//! there, the closed timestamp applied (every record at or below it is durable and readable
//! here). A source region's resolved timestamp is the minimum over its shards: reads at or
//! below it are consistent across shards. For each shard homed in its own region the node also
//! records the timestamp up to which its local writes are applied; the node's readable
//! timestamp (what snapshot reads wait for) is the minimum of both. Shared by the replication
//! thread and the home shards (writers) and the shards' client endpoints (readers).
//! With multi-master keyspaces every peer is a source of every shard and every shard takes
//! local writes.

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
    /// Per source region, the closed timestamp of each of its shards (by shard id; `None` for
    /// shards homed elsewhere, 0 until told).
    sources: Mutex<BTreeMap<String, Vec<Option<u64>>>>,
    /// Per shard homed here, every local write at or below it is applied (`None` for shards
    /// homed elsewhere, 0 until told).
    local: Mutex<Vec<Option<u64>>>,
}

impl Resolved {
    /// The table of a node in `region` whose shards have the home regions `homes` (by shard
    /// id): shards homed in `region` count with their applied points, the others with the
    /// closed timestamps their home region ships.
    pub fn new(region: &str, homes: &[String]) -> Self {
        let sources: Vec<Vec<&str>> =
            homes.iter().map(|home| if home == region { Vec::new() } else { vec![home.as_str()] }).collect();
        let local: Vec<bool> = homes.iter().map(|home| home == region).collect();
        Self::with_sources(region, &sources, &local)
    }

    /// The table of a node in `region` that receives each shard (by id) from the regions in
    /// `sources` and takes local writes on the shards marked in `local` (with multi-master
    /// keyspaces: every shard from every peer, and local writes on all).
    pub fn with_sources(region: &str, sources: &[Vec<&str>], local: &[bool]) -> Self {
        let mut table: BTreeMap<String, Vec<Option<u64>>> = BTreeMap::new();
        for (shard, regions) in sources.iter().enumerate() {
            for source in regions {
                table.entry((*source).to_owned()).or_insert_with(|| vec![None; sources.len()])[shard] = Some(0);
            }
        }
        let local = local.iter().map(|local| local.then_some(0)).collect();
        Self { region: region.to_owned(), sources: Mutex::new(table), local: Mutex::new(local) }
    }

    /// Shard `shard`, homed here, has applied every local write at or below `ts`.
    pub fn set_applied(&self, shard: u32, ts: u64) {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(Some(slot)) = local.get_mut(shard as usize) {
            *slot = (*slot).max(ts);
        }
    }

    /// The timestamp at or below which reads on this node are consistent across every shard
    /// and region: the minimum of the home shards' applied points and each source region's
    /// resolved timestamp (0 while one of them has not reported).
    pub fn readable_ts(&self) -> u64 {
        let local = self.local.lock().unwrap_or_else(PoisonError::into_inner).iter().flatten().copied().min();
        let sources =
            self.sources.lock().unwrap_or_else(PoisonError::into_inner).values().map(|shards| resolved(shards)).min();
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
        if let Some(Some(slot)) = sources.get_mut(source).and_then(|shards| shards.get_mut(shard as usize)) {
            *slot = (*slot).max(closed_ts);
        }
    }

    /// The lowest closed timestamp of `shard` over the regions that ship it here (`None` when
    /// none does; 0 until each has reported).
    pub fn shard_floor(&self, shard: u32) -> Option<u64> {
        let sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        sources.values().filter_map(|shards| shards.get(shard as usize).copied().flatten()).min()
    }

    /// Every source region, by name.
    pub fn sources(&self) -> Vec<SourceState> {
        let sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        sources
            .iter()
            .map(|(region, shards)| {
                let closed = shards.iter().flatten().filter(|ts| **ts > 0).count();
                SourceState {
                    region: region.clone(),
                    resolved_ts: resolved(shards),
                    shards_closed: u32::try_from(closed).unwrap_or(u32::MAX),
                    shards: u32::try_from(shards.iter().flatten().count()).unwrap_or(u32::MAX),
                }
            })
            .collect()
    }
}

/// A source region's resolved timestamp: the minimum closed timestamp over the shards homed
/// there (0, the value of a shard that has not reported, until all have).
fn resolved(shards: &[Option<u64>]) -> u64 {
    shards.iter().flatten().copied().min().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn homes(list: &[&str]) -> Vec<String> {
        list.iter().map(|home| (*home).to_owned()).collect()
    }

    #[test]
    fn resolved_is_the_minimum_once_every_shard_reported() {
        let table = Resolved::new("b", &homes(&["a", "a"]));
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
        let home = Resolved::new("a", &homes(&["a", "a"]));
        assert_eq!(home.readable_ts(), 0);
        home.set_applied(0, 90);
        assert_eq!(home.readable_ts(), 0, "shard 1 has not reported");
        home.set_applied(1, 70);
        assert_eq!(home.readable_ts(), 70);
        home.set_applied(1, 60);
        assert_eq!(home.readable_ts(), 70, "never goes back");

        let replica = Resolved::new("b", &homes(&["a"]));
        replica.set_applied(0, 500);
        assert_eq!(replica.readable_ts(), 0, "a replica has no local shards to count");
        replica.set_closed("a", 0, 40);
        assert_eq!(replica.readable_ts(), 40);
    }

    #[test]
    fn with_homes_in_several_regions_each_shard_counts_once_where_it_is_homed() {
        // Shards 0 and 3 at a, 1 at b, 2 at c; this node is in a.
        let table = Resolved::new("a", &homes(&["a", "b", "c", "a"]));
        let sources = table.sources();
        let shards: Vec<(String, u32)> = sources.iter().map(|source| (source.region.clone(), source.shards)).collect();
        assert_eq!(shards, [("b".to_owned(), 1), ("c".to_owned(), 1)]);
        table.set_applied(0, 100);
        table.set_applied(3, 90);
        table.set_applied(1, 5);
        table.set_closed("b", 1, 80);
        assert_eq!(table.readable_ts(), 0, "c has not reported");
        table.set_closed("b", 2, 10);
        table.set_closed("c", 1, 10);
        assert_eq!(table.readable_ts(), 0, "a region's report for a shard it is not the home of is ignored");
        table.set_closed("c", 2, 120);
        assert_eq!(table.readable_ts(), 80, "min(a's shards 90, b 80, c 120); shard 1's applied point is ignored");
        table.set_closed("b", 1, 200);
        assert_eq!(table.readable_ts(), 90);
    }

    #[test]
    fn with_multi_master_keyspaces_every_peer_ships_every_shard_and_every_shard_is_local() {
        let table = Resolved::with_sources("b", &[vec!["a", "c"], vec!["a", "c"]], &[true, true]);
        let shards: Vec<(String, u32)> =
            table.sources().iter().map(|source| (source.region.clone(), source.shards)).collect();
        assert_eq!(shards, [("a".to_owned(), 2), ("c".to_owned(), 2)]);
        for shard in 0..2 {
            table.set_closed("a", shard, 50);
            table.set_applied(shard, 70);
        }
        table.set_closed("c", 0, 60);
        assert_eq!(table.readable_ts(), 0, "c's shard 1 has not reported");
        table.set_closed("c", 1, 40);
        assert_eq!(table.readable_ts(), 40);
        table.set_applied(0, 30);
        assert_eq!(table.readable_ts(), 40, "applied points never go back");
        assert_eq!((table.shard_floor(0), table.shard_floor(1), table.shard_floor(7)), (Some(50), Some(40), None));
    }
}
