//! Marzullo's intersection of source intervals, in the fault-tolerant form NTP uses: the
//! result spans every point that at least `agree_min` sources contain. When at most
//! `sources - agree_min` of them lie, true time lies in every honest interval, so at least
//! `agree_min` contain it and it lies in the result, however the liars place theirs. (The
//! textbook "region covered by the most sources" can exclude true time when a liar overlaps
//! part of the honest intersection.) Pure.

use super::Interval;

/// The smallest interval holding every point contained in at least `agree_min` of
/// `intervals`; `None` when no point is (or `agree_min` is 0). Runs in O(n log n).
pub fn intersect(intervals: &[Interval], agree_min: usize) -> Option<Interval> {
    if agree_min == 0 || intervals.len() < agree_min {
        return None;
    }
    // Endpoints, starts before ends at the same instant: closed intervals touching at one
    // point both contain it.
    let mut edges: Vec<(u64, i8)> = Vec::with_capacity(intervals.len() * 2);
    for interval in intervals {
        edges.push((interval.earliest_ns, -1));
        edges.push((interval.latest_ns, 1));
    }
    edges.sort_unstable();
    let mut covering = 0_usize;
    let mut earliest = None;
    let mut latest = None;
    for (at, kind) in edges {
        if kind < 0 {
            covering += 1;
            if covering >= agree_min && earliest.is_none() {
                earliest = Some(at);
            }
        } else {
            if covering >= agree_min {
                latest = Some(at);
            }
            covering -= 1;
        }
    }
    Some(Interval { earliest_ns: earliest?, latest_ns: latest? })
}

/// How many of `sources` must agree so that up to `(sources - 1) / 2` liars are outvoted: a
/// strict majority.
pub fn majority(sources: usize) -> usize {
    sources / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(earliest_ns: u64, latest_ns: u64) -> Interval {
        Interval { earliest_ns, latest_ns }
    }

    #[test]
    fn all_agree_gives_the_plain_intersection() {
        let result = intersect(&[iv(10, 20), iv(12, 25), iv(5, 18)], 3);
        assert_eq!(result, Some(iv(12, 18)));
    }

    #[test]
    fn a_disjoint_liar_is_outvoted() {
        let honest = [iv(100, 200), iv(120, 220), iv(90, 180), iv(110, 210)];
        let mut all = honest.to_vec();
        all.push(iv(10_000, 10_100));
        assert_eq!(intersect(&all, 4), Some(iv(120, 180)));
    }

    #[test]
    fn an_overlapping_liar_cannot_exclude_true_time() {
        // True time 150. The liar overlaps the honest sources only above 170, so the region
        // of greatest overlap ([170, 180], five sources) misses it; four-of-five keeps it.
        let all = [iv(100, 200), iv(120, 220), iv(90, 180), iv(110, 210), iv(170, 400)];
        let result = intersect(&all, 4).unwrap();
        assert!(result.contains(150), "{result:?}");
        assert_eq!(result, iv(120, 200));
    }

    #[test]
    fn too_few_in_agreement_is_none() {
        assert_eq!(intersect(&[iv(0, 10), iv(20, 30), iv(40, 50)], 2), None);
        assert_eq!(intersect(&[iv(0, 10)], 2), None);
        assert_eq!(intersect(&[iv(0, 10)], 0), None);
        assert_eq!(intersect(&[], 1), None);
    }

    #[test]
    fn touching_closed_intervals_share_their_point() {
        assert_eq!(intersect(&[iv(0, 10), iv(10, 20)], 2), Some(iv(10, 10)));
    }

    #[test]
    fn majorities() {
        assert_eq!(majority(1), 1);
        assert_eq!(majority(3), 2);
        assert_eq!(majority(4), 3);
        assert_eq!(majority(5), 3);
    }
}
