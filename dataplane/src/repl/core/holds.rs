//! What WAL a home shard keeps for the peers it ships to, and where a replica resumes: values
//! the protocol computes from each stream's state, handed to the shard and to the position
//! file by the shells (not state shared between them).

use std::collections::BTreeMap;

use super::shipper::Hold;

/// What a shard's WAL must keep for its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHold {
    /// The lowest LSN a peer may still need (`u64::MAX`: none). The shard may release below
    /// it anyway past its bound of held bytes (the peer then catches up from a snapshot).
    pub hold_lsn: u64,
    /// The lowest LSN a peer installing a snapshot resumes at (`u64::MAX`: none): kept whatever
    /// the bound says.
    pub pin_lsn: u64,
}

impl Default for WalHold {
    fn default() -> Self {
        Self { hold_lsn: u64::MAX, pin_lsn: u64::MAX }
    }
}

/// The holds of one shard's streams, by peer region.
#[derive(Debug, Default, Clone)]
pub struct Holds {
    peers: BTreeMap<String, Hold>,
}

impl Holds {
    /// `peer`'s stream now holds `hold`; the shard's hold.
    pub fn update(&mut self, peer: &str, hold: Hold) -> WalHold {
        match self.peers.get_mut(peer) {
            Some(known) => *known = hold,
            None => {
                self.peers.insert(peer.to_owned(), hold);
            }
        }
        self.value()
    }

    /// `peer`'s stream ended: its pin goes (a new stream decides again), its hold stays where
    /// it was acknowledged.
    pub fn unpin(&mut self, peer: &str) -> WalHold {
        if let Some(known) = self.peers.get_mut(peer) {
            known.pinned = false;
        }
        self.value()
    }

    /// The lowest LSN any peer needs, and the lowest any pinned peer needs.
    pub fn value(&self) -> WalHold {
        let hold_lsn = self.peers.values().map(|hold| hold.lsn).min().unwrap_or(u64::MAX);
        let pin_lsn = self.peers.values().filter(|hold| hold.pinned).map(|hold| hold.lsn).min().unwrap_or(u64::MAX);
        WalHold { hold_lsn, pin_lsn }
    }
}

/// A replica's resume position from one source: where its stream resumes, and when to
/// persist it (every write syncs, so at most every `interval_ns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    lsn: u64,
    written_at_ns: u64,
    interval_ns: u64,
}

impl Position {
    /// A position loaded at `lsn` (as written) at time `now_ns`.
    pub fn new(lsn: u64, now_ns: u64, interval_ns: u64) -> Self {
        Self { lsn, written_at_ns: now_ns, interval_ns }
    }

    /// The first LSN the replica lacks.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// Every LSN below `next_lsn` is durable here; the position to write out now, when the
    /// last write is `interval_ns` old. Positions only move forward.
    pub fn advance(&mut self, next_lsn: u64, now_ns: u64) -> Option<u64> {
        self.lsn = self.lsn.max(next_lsn);
        (now_ns.saturating_sub(self.written_at_ns) >= self.interval_ns).then(|| {
            self.written_at_ns = now_ns;
            self.lsn
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_is_the_lowest_need_and_the_pin_the_lowest_pinned_one() {
        let mut holds = Holds::default();
        assert_eq!(holds.value(), WalHold::default());
        assert_eq!(holds.update("b", Hold { lsn: 40, pinned: false }), WalHold { hold_lsn: 40, pin_lsn: u64::MAX });
        assert_eq!(holds.update("c", Hold { lsn: 25, pinned: true }), WalHold { hold_lsn: 25, pin_lsn: 25 });
        assert_eq!(holds.update("c", Hold { lsn: 30, pinned: true }), WalHold { hold_lsn: 30, pin_lsn: 30 });
        assert_eq!(holds.unpin("c"), WalHold { hold_lsn: 30, pin_lsn: u64::MAX }, "the hold stays");
        assert_eq!(holds.update("b", Hold { lsn: 0, pinned: false }).hold_lsn, 0, "a new stream holds everything");
    }

    #[test]
    fn positions_move_forward_and_are_written_at_most_every_interval() {
        let mut position = Position::new(10, 0, 100);
        assert_eq!(position.advance(20, 50), None);
        assert_eq!(position.lsn(), 20);
        assert_eq!(position.advance(15, 120), Some(20), "never back");
        assert_eq!(position.advance(30, 150), None);
        assert_eq!(position.advance(31, 220), Some(31));
    }
}
