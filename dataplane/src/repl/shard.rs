//! The shard's end of replication, on its glommio executor: it publishes the shard's closed
//! point (home), applies what streams hand it (replica), and takes the holds and floors the
//! replication thread tells it.

use std::time::Duration;

use super::{Apply, ShardNotice, ShardSide, Work};
use crate::store::ShardStore;

/// Runs `store`'s end of its link until the link closes: with `ships`, publishes its closed
/// point every `interval` (the shipper tails the WAL up to it); with `receives`, applies what
/// arrives; always, takes the notices.
pub fn spawn(
    store: &ShardStore,
    side: ShardSide,
    interval: Duration,
    ships: bool,
    receives: bool,
) -> glommio::task::JoinHandle<()> {
    let ShardSide { points, applies, notices, .. } = side;
    let publisher = store.clone();
    let publish = async move {
        if !ships {
            return;
        }
        loop {
            if let Ok(point) = publisher.closed_point() {
                points.send_if_modified(|current| {
                    let changed = *current != point;
                    *current = point;
                    changed
                });
            }
            glommio::timer::sleep(interval).await;
        }
    };
    let apply = apply(store.clone(), applies, receives);
    let notice = take_notices(store.clone(), notices);
    glommio::spawn_local(async move {
        futures_lite::future::zip(publish, futures_lite::future::zip(apply, notice)).await;
    })
    .detach()
}

/// Applies every [`Apply`] as it arrives; each answers once all of its records are durable.
async fn apply(store: ShardStore, mut applies: tokio::sync::mpsc::Receiver<Apply>, receives: bool) {
    if !receives {
        return;
    }
    while let Some(Apply { work, done }) = applies.recv().await {
        let store = store.clone();
        match work {
            Work::Records(records) => {
                // A task per record, spawned in log order, so every one is appended before any
                // awaits its barrier; one answer for them all.
                let applying: Vec<_> = records
                    .into_iter()
                    .map(|(glt, payload)| {
                        let store = store.clone();
                        glommio::spawn_local(async move { store.apply_replicated(glt, &payload).await })
                    })
                    .collect();
                glommio::spawn_local(async move {
                    // Every task is awaited; the first error is the answer.
                    let mut result = Ok(());
                    for task in applying {
                        result = result.and(task.await);
                    }
                    let _ = done.send(result);
                })
                .detach();
            }
            Work::SnapshotEnd { horizon, keys } => {
                glommio::spawn_local(async move {
                    let _ = done.send(store.tombstone_absent(horizon, &keys).await.map(|_| ()));
                })
                .detach();
            }
        }
    }
}

/// Takes the WAL holds and collection floors the replication thread computes.
async fn take_notices(store: ShardStore, mut notices: tokio::sync::mpsc::Receiver<ShardNotice>) {
    while let Some(notice) = notices.recv().await {
        match notice {
            ShardNotice::WalHold { hold, seen } => {
                store.set_wal_hold(hold.hold_lsn, hold.pin_lsn);
                if let Some(seen) = seen {
                    let _ = seen.send(());
                }
            }
            ShardNotice::CollectFloor(floor) => store.set_collect_floor(floor),
        }
    }
}
