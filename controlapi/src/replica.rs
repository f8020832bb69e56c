//! Replica sets inside a region, as the control plane decides them (pure: no clock, no I/O).
//!
//! Every shard a region keeps lives on a set of data nodes: one primary, which stamps, appends
//! and group-commits as a single node does and sends every WAL batch to the others, and the
//! backups, which append the same batches at the same LSNs. A write is acknowledged once its
//! batch is durable on every member of the current set. The set, its primary and its epoch
//! are metadata ([`SetConfig`]): the epoch grows at every change of either, and a member
//! refuses batches from an older epoch.
//!
//! A member's log is compared by its [`LogShape`]: where each epoch's records begin (a new
//! primary's first batch is an epoch marker, so the shape is read back from the WAL) and where
//! it ends. Within one epoch only its primary writes new LSNs, so an (epoch, LSN) pair names one
//! record everywhere, and two logs agree below the first LSN whose epochs differ
//! ([`LogShape::agreed_prefix`]).
//!
//! The decisions: promote, when the primary's lease lapses, the member of the set whose log is
//! the newest (highest last epoch, then highest end) among those that reported recently
//! ([`promote`]); remove a member on the primary's request, never below `min_replicas`
//! ([`SetConfig::remove`]); add a caught-up learner on the primary's request
//! ([`SetConfig::add`]). Every acknowledged write is on every member, and a new set's members
//! (and its primary) are taken from the old set or are learners the primary already counted
//! for acknowledgements, so no decision here can lose one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where each epoch's records begin in a log, and where it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogShape {
    /// `(epoch, first LSN)` in ascending order of both: the records from `first` up to the
    /// next entry's first were written in `epoch`.
    pub epochs: Vec<(u64, u64)>,
    /// The next LSN (the log holds LSNs `1..end`).
    pub end: u64,
}

/// A change of a log that does not fit it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("records appended at LSN {first}, but the log ends at {end}")]
    NotAtEnd { first: u64, end: u64 },
    #[error("records of epoch {epoch} appended after records of the later epoch {last}")]
    EpochBackwards { epoch: u64, last: u64 },
}

impl LogShape {
    /// An empty log (next LSN 1).
    pub fn new() -> Self {
        Self { epochs: Vec::new(), end: 1 }
    }

    /// The shape of a log read back from its batches: `runs` are `(epoch, first LSN)` where
    /// the epoch changed, `end` the next LSN. Records of epoch 0 (written without a set) and
    /// those below the first run (released once applied, so committed) are of no known epoch:
    /// comparisons find no difference there ([`LogShape::agreed_prefix`]).
    pub fn from_runs(runs: &[(u64, u64)], end: u64) -> Self {
        let mut shape = Self { epochs: Vec::new(), end: end.max(1) };
        for &(epoch, first) in runs {
            let last = shape.epochs.last().map_or(0, |(epoch, _)| *epoch);
            if epoch > last && first < shape.end {
                shape.epochs.push((epoch, first));
            }
        }
        shape
    }

    /// The epoch the record at `lsn` was written in (none past the end or before the first
    /// epoch).
    pub fn epoch_at(&self, lsn: u64) -> Option<u64> {
        if lsn >= self.end {
            return None;
        }
        let index = self.epochs.partition_point(|(_, first)| *first <= lsn);
        index.checked_sub(1).map(|index| self.epochs[index].0)
    }

    /// The epoch of the last record (0 for an empty log).
    pub fn last_epoch(&self) -> u64 {
        self.epoch_at(self.end.saturating_sub(1)).unwrap_or(0)
    }

    /// The end of `epoch`'s records in this log: where the next epoch begins, or the end.
    pub fn epoch_end(&self, lsn: u64) -> u64 {
        let index = self.epochs.partition_point(|(_, first)| *first <= lsn);
        self.epochs.get(index).map_or(self.end, |(_, first)| *first)
    }

    /// Appends the records `first..next` of `epoch`.
    pub fn append(&mut self, epoch: u64, first: u64, next: u64) -> Result<(), ShapeError> {
        if first != self.end {
            return Err(ShapeError::NotAtEnd { first, end: self.end });
        }
        let last = self.epochs.last().map_or(0, |(epoch, _)| *epoch);
        if epoch < last {
            return Err(ShapeError::EpochBackwards { epoch, last });
        }
        if next > first {
            if epoch > last {
                self.epochs.push((epoch, first));
            }
            self.end = next;
        }
        Ok(())
    }

    /// Drops the records from `lsn` on.
    pub fn truncate(&mut self, lsn: u64) {
        if lsn < self.end {
            self.end = lsn.max(1);
            self.epochs.retain(|(_, first)| *first < self.end);
        }
    }

    /// The LSN below which this log and `other` hold the same records: the first where their
    /// epochs differ, or the shorter end. Records of no known epoch in either log (see
    /// [`LogShape::from_runs`]) count as the same.
    pub fn agreed_prefix(&self, other: &Self) -> u64 {
        let end = self.end.min(other.end);
        let mut boundaries: Vec<u64> =
            self.epochs.iter().chain(&other.epochs).map(|(_, first)| *first).filter(|first| *first < end).collect();
        boundaries.sort_unstable();
        boundaries.dedup();
        // Epochs change only at boundaries: comparing there compares every LSN.
        boundaries
            .into_iter()
            .find(|lsn| matches!((self.epoch_at(*lsn), other.epoch_at(*lsn)), (Some(ours), Some(theirs)) if ours != theirs))
            .unwrap_or(end)
    }

    /// Which of two logs a promotion prefers: the later last epoch, then the longer.
    pub fn newer_than(&self, other: &Self) -> bool {
        (self.last_epoch(), self.end) > (other.last_epoch(), other.end)
    }
}

/// A shard's replica set in a region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetConfig {
    /// Grows by one at every change of the set or the primary.
    pub epoch: u64,
    pub primary: String,
    /// Every member whose durable copy an acknowledgement needs, the primary included.
    pub members: Vec<String>,
    /// Placed here but not (or no longer) counted: they catch up from the primary and are
    /// added once they hold its log.
    pub learners: Vec<String>,
    /// Fewer members than this and the primary refuses writes (`Unavailable`).
    pub min_replicas: usize,
    /// How many members the set should have.
    pub replicas: usize,
}

/// A change of a set the control plane refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetChangeError {
    #[error("the set is at epoch {current}, the request was made at epoch {asked}")]
    StaleEpoch { current: u64, asked: u64 },
    #[error("{requester} is not the primary (the primary is {primary})")]
    NotPrimary { requester: String, primary: String },
    #[error("{node} is not a member of the set")]
    NotMember { node: String },
    #[error("{node} is not a learner of the set")]
    NotLearner { node: String },
    #[error("removing {node} would leave {left} members, below min_replicas {min}")]
    BelowMinReplicas { node: String, left: usize, min: usize },
    #[error("the set already has {members} members")]
    Full { members: usize },
}

impl SetConfig {
    /// The first set of a shard: `nodes[0]` primary, every node a member.
    pub fn initial(nodes: &[String], min_replicas: usize) -> Self {
        Self {
            epoch: 1,
            primary: nodes.first().cloned().unwrap_or_default(),
            members: nodes.to_vec(),
            learners: Vec::new(),
            min_replicas,
            replicas: nodes.len(),
        }
    }

    /// Whether `node` is a member (the primary included).
    pub fn is_member(&self, node: &str) -> bool {
        self.members.iter().any(|member| member == node)
    }

    /// Members and learners: every node that keeps a copy.
    pub fn placed(&self) -> impl Iterator<Item = &String> {
        self.members.iter().chain(&self.learners)
    }

    fn check_request(&self, requester: &str, epoch: u64) -> Result<(), SetChangeError> {
        if epoch != self.epoch {
            return Err(SetChangeError::StaleEpoch { current: self.epoch, asked: epoch });
        }
        if requester != self.primary {
            return Err(SetChangeError::NotPrimary { requester: requester.to_owned(), primary: self.primary.clone() });
        }
        Ok(())
    }

    /// The set without `node`, which becomes a learner, as its primary asked at `epoch`.
    pub fn remove(&self, requester: &str, epoch: u64, node: &str) -> Result<Self, SetChangeError> {
        self.check_request(requester, epoch)?;
        if node == self.primary || !self.is_member(node) {
            return Err(SetChangeError::NotMember { node: node.to_owned() });
        }
        let left = self.members.len() - 1;
        if left < self.min_replicas {
            return Err(SetChangeError::BelowMinReplicas { node: node.to_owned(), left, min: self.min_replicas });
        }
        let mut next = self.clone();
        next.epoch += 1;
        next.members.retain(|member| member != node);
        next.learners.push(node.to_owned());
        Ok(next)
    }

    /// The set with the learner `node` a member, as its primary asked at `epoch` (it already
    /// counts the learner for acknowledgements).
    pub fn add(&self, requester: &str, epoch: u64, node: &str) -> Result<Self, SetChangeError> {
        self.check_request(requester, epoch)?;
        if !self.learners.iter().any(|learner| learner == node) {
            return Err(SetChangeError::NotLearner { node: node.to_owned() });
        }
        if self.members.len() >= self.replicas {
            return Err(SetChangeError::Full { members: self.members.len() });
        }
        let mut next = self.clone();
        next.epoch += 1;
        next.learners.retain(|learner| learner != node);
        next.members.push(node.to_owned());
        Ok(next)
    }
}

/// The set after its primary's lease lapsed (or it said it restarted): the member with the
/// newest log among `reports` (members that reported recently; the caller leaves the old
/// primary out when its lease lapsed, and keeps it when it restarted and asks for a new epoch)
/// is the primary of the next epoch; the reporting members stay members, and silent ones too
/// while fewer than `min_replicas`; every other placed node is a learner. None when no member
/// reported.
pub fn promote(config: &SetConfig, reports: &[(String, LogShape)]) -> Option<SetConfig> {
    let candidates: Vec<&(String, LogShape)> = reports.iter().filter(|(node, _)| config.is_member(node)).collect();
    let mut best = *candidates.first()?;
    for candidate in &candidates[1..] {
        if candidate.1.newer_than(&best.1) {
            best = candidate;
        }
    }
    let mut members: Vec<String> =
        config.members.iter().filter(|member| candidates.iter().any(|(node, _)| node == *member)).cloned().collect();
    // Never fewer than min_replicas members: silent ones of the old set (the old primary last)
    // stay members; every old member holds every acknowledged write, so one can be promoted if
    // the new primary is lost too, and the new primary removes them (never below
    // min_replicas) if they stay silent.
    let silent: Vec<&String> = config.members.iter().filter(|member| !members.contains(member)).collect();
    let (others, old_primary): (Vec<&String>, Vec<&String>) =
        silent.into_iter().partition(|member| **member != config.primary);
    for member in others.into_iter().chain(old_primary) {
        if members.len() >= config.min_replicas {
            break;
        }
        members.push(member.clone());
    }
    let learners = config.placed().filter(|node| !members.contains(node)).cloned().collect();
    Some(SetConfig {
        epoch: config.epoch + 1,
        primary: best.0.clone(),
        members,
        learners,
        min_replicas: config.min_replicas,
        replicas: config.replicas,
    })
}

/// What a data node tells the control plane about one shard copy it keeps, in every
/// heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub shard: u32,
    /// The highest epoch it has seen.
    pub epoch: u64,
    /// Its durable log.
    pub log: LogShape,
    /// The epoch it leads, if it does (renews its lease when that is the set's epoch).
    pub leading: Option<u64>,
    /// It restarted as the primary of `epoch` and needs a new one (`Member::wants_new_epoch`);
    /// counts only while `epoch` is the set's.
    pub wants_new_epoch: bool,
}

/// The leader's view of one set between its Raft writes: when the primary's lease ends
/// (leader time, ms) and each node's latest report with when it came.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetWatch {
    /// The set's epoch this watch is for: a new one restarts it (see [`SetWatch::follow`]).
    pub epoch: u64,
    pub lease_expires_ms: u64,
    pub reports: BTreeMap<String, (LogShape, u64)>,
    /// The primary said it restarted.
    pub restarted: bool,
}

impl SetWatch {
    /// Takes a node's report at `now_ms`; a report of the primary leading the set's epoch
    /// renews its lease until `now_ms + lease_ms`.
    pub fn report(&mut self, config: &SetConfig, node: &str, report: &ReplicaReport, now_ms: u64, lease_ms: u64) {
        self.follow(config, now_ms, lease_ms);
        self.reports.insert(node.to_owned(), (report.log.clone(), now_ms));
        if node == config.primary {
            if report.wants_new_epoch && report.epoch == config.epoch {
                self.restarted = true;
            } else if report.leading == Some(config.epoch) {
                self.lease_expires_ms = self.lease_expires_ms.max(now_ms + lease_ms);
            }
        }
    }

    /// Starts over when the set moved to a new epoch (however the change was learned, a
    /// timed-out write that committed included): the restart flag was about the old primary,
    /// and the set's primary gets a whole lease from now to report in.
    pub fn follow(&mut self, config: &SetConfig, now_ms: u64, lease_ms: u64) {
        if self.epoch != config.epoch {
            self.epoch = config.epoch;
            self.restarted = false;
            self.lease_expires_ms = self.lease_expires_ms.max(now_ms + lease_ms);
        }
    }

    /// The reports to promote with when the set needs a new primary at `now_ms`: its
    /// primary's lease ended (the primary's own report then does not count) or it restarted
    /// (then it is a candidate too). Only reports younger than `fresh_ms` count.
    pub fn due(&self, config: &SetConfig, now_ms: u64, fresh_ms: u64) -> Option<Vec<(String, LogShape)>> {
        let lapsed = now_ms > self.lease_expires_ms;
        if !lapsed && !self.restarted {
            return None;
        }
        let reports: Vec<(String, LogShape)> = self
            .reports
            .iter()
            .filter(|(node, (_, at))| {
                now_ms.saturating_sub(*at) < fresh_ms && (self.restarted || **node != config.primary)
            })
            .map(|(node, (log, _))| (node.clone(), log.clone()))
            .collect();
        promote(config, &reports).map(|_| reports)
    }
}

/// The nodes of a new set: `replicas` of the `candidates` (node, zone), in distinct zones as
/// long as there are zones left, then the least loaded (`load`: sets a node already keeps),
/// then by name. The first is the primary. Fewer when there are fewer candidates.
pub fn choose_nodes(candidates: &[(String, String)], load: &BTreeMap<String, usize>, replicas: usize) -> Vec<String> {
    let mut chosen: Vec<&(String, String)> = Vec::new();
    while chosen.len() < replicas {
        let next = candidates.iter().filter(|candidate| !chosen.contains(candidate)).min_by_key(|(node, zone)| {
            let zone_used = chosen.iter().filter(|(_, used)| used == zone).count();
            (zone_used, load.get(node).copied().unwrap_or(0), node.clone())
        });
        match next {
            Some(candidate) => chosen.push(candidate),
            None => break,
        }
    }
    chosen.into_iter().map(|(node, _)| node.clone()).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn shape(epochs: &[(u64, u64)], end: u64) -> LogShape {
        LogShape { epochs: epochs.to_vec(), end }
    }

    #[test]
    fn logs_agree_below_the_first_lsn_whose_epochs_differ() {
        let a = shape(&[(1, 1), (3, 10)], 15);
        let b = shape(&[(1, 1), (2, 8)], 20);
        assert_eq!(a.agreed_prefix(&b), 8);
        assert_eq!(b.agreed_prefix(&a), 8);
        assert_eq!(a.agreed_prefix(&shape(&[(1, 1)], 5)), 5);
        assert_eq!(a.agreed_prefix(&a), 15);
        assert_eq!(LogShape::new().agreed_prefix(&a), 1);
        assert!(a.newer_than(&b), "a later last epoch wins over a longer log");
    }

    #[test]
    fn a_shape_read_back_from_batches_knows_no_epoch_below_its_first_run() {
        // Epoch 0 records (no set yet), then epochs 2 and 4; an older run repeated is dropped.
        let read = LogShape::from_runs(&[(0, 1), (2, 40), (4, 90), (3, 95)], 120);
        assert_eq!(read, shape(&[(2, 40), (4, 90)], 120));
        // Its records below 40 were released once applied: they agree with anything.
        let full = shape(&[(1, 1), (2, 30), (4, 90)], 150);
        assert_eq!(read.agreed_prefix(&full), 120);
        assert_eq!(full.agreed_prefix(&read), 120);
        // A known difference still counts.
        let other = shape(&[(1, 1), (2, 30), (3, 80)], 150);
        assert_eq!(read.agreed_prefix(&other), 80);
        assert_eq!(LogShape::from_runs(&[], 0), LogShape::new());
    }

    #[test]
    fn a_shape_appends_at_its_end_and_truncates() {
        let mut log = LogShape::new();
        log.append(1, 1, 4).unwrap();
        log.append(1, 4, 6).unwrap();
        log.append(2, 6, 7).unwrap();
        assert_eq!(log, shape(&[(1, 1), (2, 6)], 7));
        assert_eq!(log.append(2, 8, 9), Err(ShapeError::NotAtEnd { first: 8, end: 7 }));
        assert_eq!(log.append(1, 7, 8), Err(ShapeError::EpochBackwards { epoch: 1, last: 2 }));
        assert_eq!(log.epoch_at(5), Some(1));
        assert_eq!(log.epoch_end(2), 6);
        log.truncate(6);
        assert_eq!(log, shape(&[(1, 1)], 6));
        log.truncate(1);
        assert_eq!(log, LogShape::new());
    }

    #[test]
    fn removal_stops_at_min_replicas_and_requests_need_the_current_primary_and_epoch() {
        let nodes: Vec<String> = ["a", "b", "c"].map(str::to_owned).to_vec();
        let config = SetConfig::initial(&nodes, 2);
        let two = config.remove("a", 1, "c").unwrap();
        assert_eq!((two.epoch, two.members.len(), two.learners.clone()), (2, 2, vec!["c".to_owned()]));
        assert!(matches!(two.remove("a", 2, "b"), Err(SetChangeError::BelowMinReplicas { .. })));
        assert!(matches!(two.remove("a", 1, "b"), Err(SetChangeError::StaleEpoch { .. })));
        assert!(matches!(two.remove("b", 2, "a"), Err(SetChangeError::NotPrimary { .. })));
        let three = two.add("a", 2, "c").unwrap();
        assert_eq!((three.epoch, three.members.len()), (3, 3));
        assert!(matches!(three.add("a", 3, "c"), Err(SetChangeError::NotLearner { .. })));
    }

    #[test]
    fn new_sets_spread_over_zones_then_over_the_least_loaded_nodes() {
        let candidates: Vec<(String, String)> = [("n1", "z1"), ("n2", "z1"), ("n3", "z2"), ("n4", "z3")]
            .map(|(n, z)| (n.to_owned(), z.to_owned()))
            .to_vec();
        let mut load = BTreeMap::new();
        assert_eq!(choose_nodes(&candidates, &load, 3), ["n1", "n3", "n4"]);
        load.insert("n1".to_owned(), 5);
        assert_eq!(choose_nodes(&candidates, &load, 3), ["n2", "n3", "n4"]);
        // Two zones for three copies: the third shares a zone.
        assert_eq!(choose_nodes(&candidates[..3], &load, 3), ["n2", "n3", "n1"]);
        assert_eq!(choose_nodes(&candidates[..1], &load, 3), ["n1"]);
    }

    #[test]
    fn a_set_is_due_for_promotion_when_its_primary_lapses_or_restarts() {
        let nodes: Vec<String> = ["a", "b", "c"].map(str::to_owned).to_vec();
        let config = SetConfig::initial(&nodes, 2);
        let mut watch = SetWatch { epoch: 1, ..SetWatch::default() };
        let report = |log: LogShape, leading, wants_new_epoch| ReplicaReport {
            shard: 0,
            epoch: 1,
            log,
            leading,
            wants_new_epoch,
        };
        watch.report(&config, "a", &report(shape(&[(1, 1)], 10), Some(1), false), 100, 1000);
        watch.report(&config, "b", &report(shape(&[(1, 1)], 9), None, false), 100, 1000);
        watch.report(&config, "c", &report(shape(&[(1, 1)], 8), None, false), 100, 1000);
        assert_eq!(watch.due(&config, 1000, 2000), None, "the lease holds");
        let due = watch.due(&config, 1200, 2000).unwrap();
        assert_eq!(due.iter().map(|(node, _)| node.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(promote(&config, &due).unwrap().primary, "b");
        assert_eq!(watch.due(&config, 2200, 2000), None, "every report is stale");
        // A primary leading an old epoch does not renew.
        watch.report(&config, "a", &report(shape(&[(1, 1)], 10), Some(0), false), 2300, 1000);
        assert!(watch.lease_expires_ms < 2300);
        // A restarted primary is due at once and a candidate.
        let mut watch = SetWatch { epoch: 1, ..SetWatch::default() };
        watch.report(&config, "a", &report(shape(&[(1, 1)], 10), Some(1), false), 100, 1000);
        watch.report(&config, "a", &report(shape(&[(1, 1)], 10), None, true), 200, 1000);
        let due = watch.due(&config, 300, 2000).unwrap();
        let next = promote(&config, &due).unwrap();
        assert_eq!(next.primary, "a");
        // A late report that asked at the old epoch asks nothing of the new one, and the new
        // epoch starts the watch over: a whole lease, no restart pending.
        watch.report(&next, "a", &report(shape(&[(1, 1)], 10), None, true), 400, 1000);
        assert!(!watch.restarted);
        assert_eq!((watch.epoch, watch.lease_expires_ms), (2, 1400));
        assert_eq!(watch.due(&next, 1300, 2000), None);
    }

    #[test]
    fn promotion_takes_the_newest_log_among_the_members_that_reported() {
        let nodes: Vec<String> = ["a", "b", "c", "d"].map(str::to_owned).to_vec();
        let mut config = SetConfig::initial(&nodes[..3], 2);
        config.learners.push("d".to_owned());
        let reports = vec![
            ("b".to_owned(), shape(&[(1, 1)], 30)),
            ("c".to_owned(), shape(&[(1, 1)], 31)),
            ("d".to_owned(), shape(&[(1, 1)], 99)),
        ];
        let next = promote(&config, &reports).unwrap();
        assert_eq!((next.epoch, next.primary.as_str()), (2, "c"));
        assert_eq!(next.members, vec!["b".to_owned(), "c".to_owned()]);
        assert_eq!(next.learners, vec!["a".to_owned(), "d".to_owned()]);
        assert_eq!(promote(&config, &reports[2..]), None, "a learner is never promoted");
        // One reporter of three with min_replicas 2: a silent old member stays a member (not the
        // old primary while another is there), so a member is left to promote if this one goes.
        let alone = promote(&config, &reports[..1]).unwrap();
        assert_eq!((alone.primary.as_str(), alone.members.clone()), ("b", vec!["b".to_owned(), "c".to_owned()]));
        assert_eq!(alone.learners, vec!["a".to_owned(), "d".to_owned()]);
    }
}
