//! Three copies of a shard in a replica set (`replica::ShardCopy`), each a real store with its
//! O_DIRECT WAL, on one executor, linked in process (frames can be cut), with the control
//! plane's rules played by the test (`SetConfig`, `promote`, leases). A write is acknowledged
//! once every member holds it and is then readable on every copy; a partitioned primary's
//! write is never acknowledged, a new primary takes over, and the old one cuts its divergent
//! tail, catches up and is added back; a copy reopened from disk reads its log back.
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::run;
use controlapi::replica::{SetConfig, promote};
use dataplane::replica::{Frame, Links, Proposal, ShardCopy, Timing};
use dataplane::store::{ShardStore, StoreConfig};
use dataplane::wal::WalTail;

const LEASE: Duration = Duration::from_millis(600);

/// The in-process network and the control plane's state.
#[derive(Default)]
struct World {
    copies: RefCell<BTreeMap<String, ShardCopy>>,
    /// Nodes cut from every other node and from the control plane.
    isolated: RefCell<BTreeSet<String>>,
    config: RefCell<Option<SetConfig>>,
    proposals: RefCell<Vec<(String, Proposal)>>,
}

struct NodeLinks {
    me: String,
    world: Rc<World>,
}

impl Links for NodeLinks {
    fn send(&self, to: &str, frame: Frame) {
        let isolated = self.world.isolated.borrow();
        if isolated.contains(&self.me) || isolated.contains(to) {
            return;
        }
        let (world, from, to) = (Rc::clone(&self.world), self.me.clone(), to.to_owned());
        glommio::spawn_local(async move {
            let copy = world.copies.borrow().get(&to).cloned();
            if let Some(copy) = copy {
                copy.on_frame(&from, frame);
            }
        })
        .detach();
    }

    fn propose(&self, _shard: u32, proposal: Proposal) {
        if !self.world.isolated.borrow().contains(&self.me) {
            self.world.proposals.borrow_mut().push((self.me.clone(), proposal));
        }
    }
}

fn store_config(dir: &std::path::Path, tail: &Arc<WalTail>) -> StoreConfig {
    let mut config = StoreConfig::new(dir, 0);
    config.set_log = true;
    config.wal.tail = Some(Arc::clone(tail));
    config
}

async fn open_copy(world: &Rc<World>, name: &str, dir: &std::path::Path) -> ShardCopy {
    let tail = Arc::new(WalTail::new(8 << 20));
    let store = ShardStore::open(store_config(dir, &tail)).await.unwrap();
    let timing = Timing { member_timeout_ns: 300_000_000, heartbeat_ns: 20_000_000, retry_ns: 50_000_000 };
    let links = Rc::new(NodeLinks { me: name.to_owned(), world: Rc::clone(world) });
    let copy = ShardCopy::start(name, timing, store, Some(tail), links).unwrap();
    world.copies.borrow_mut().insert(name.to_owned(), copy.clone());
    copy
}

/// Publishes a set to every reachable copy.
fn publish(world: &World, config: &SetConfig) {
    *world.config.borrow_mut() = Some(config.clone());
    let isolated = world.isolated.borrow().clone();
    for (name, copy) in world.copies.borrow().iter() {
        if !isolated.contains(name) {
            copy.on_config(config.clone());
        }
    }
}

/// The control plane: answers proposals and renews the primary's lease, every 20 ms.
async fn control_plane(world: Rc<World>) {
    loop {
        glommio::timer::sleep(Duration::from_millis(20)).await;
        if Rc::strong_count(&world) == 1 {
            return;
        }
        let proposals = std::mem::take(&mut *world.proposals.borrow_mut());
        for (from, proposal) in proposals {
            let Some(config) = world.config.borrow().clone() else { continue };
            let changed = match &proposal {
                Proposal::Remove { epoch, node } => config.remove(&from, *epoch, node),
                Proposal::Add { epoch, node } => config.add(&from, *epoch, node),
            };
            match changed {
                Ok(next) => publish(&world, &next),
                Err(_) => {
                    let copy = world.copies.borrow().get(&from).cloned();
                    if let Some(copy) = copy {
                        copy.on_refused(&proposal, config.epoch);
                    }
                }
            }
        }
        let config = world.config.borrow().clone();
        if let Some(config) = config
            && !world.isolated.borrow().contains(&config.primary)
        {
            let copy = world.copies.borrow().get(&config.primary).cloned();
            if let Some(copy) = copy {
                copy.on_lease(config.epoch, Instant::now() + LEASE);
            }
        }
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

async fn write_many(copy: &ShardCopy, prefix: &str, count: usize) -> Vec<(String, u64)> {
    let mut tasks = Vec::new();
    for index in 0..count {
        let copy = copy.clone();
        let key = format!("{prefix}-{index:04}");
        tasks.push(glommio::spawn_local(async move {
            let value = format!("value of {key}");
            let ts = copy.write(std::iter::once((key.as_bytes(), Some(value.as_bytes())))).await;
            (key, ts)
        }));
    }
    let mut written = Vec::new();
    for task in tasks {
        let (key, ts) = task.await;
        written.push((key, ts.unwrap_or_else(|error| panic!("{error} ({:?} stopped: {:?})", copy, copy.stopped()))));
    }
    written
}

async fn assert_holds(copy: &ShardCopy, written: &[(String, u64)]) {
    for (key, ts) in written {
        let got = copy.store().get(key.as_bytes(), None).await.unwrap();
        let (at, value) = got.unwrap_or_else(|| panic!("{copy:?} lacks {key}"));
        assert_eq!((at, &value[..]), (*ts, format!("value of {key}").as_bytes()));
    }
}

#[test]
fn writes_reach_every_member_and_a_partitioned_primary_is_replaced_and_rejoins() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let paths: Vec<_> = dirs.iter().map(|dir| dir.path().to_owned()).collect();
    run(async move {
        let world = Rc::new(World::default());
        let names = ["a", "b", "c"].map(str::to_owned).to_vec();
        for (name, path) in names.iter().zip(&paths) {
            open_copy(&world, name, path).await;
        }
        glommio::spawn_local(control_plane(Rc::clone(&world))).detach();
        publish(&world, &SetConfig::initial(&names, 2));
        let copy = |name: &str| world.copies.borrow().get(name).cloned().unwrap();

        // Writes through the primary: acknowledged once on all three, readable on each.
        wait_for("the first lead", || copy("a").leading() == Some(1)).await;
        // The lease comes with the control plane's next round.
        glommio::timer::sleep(Duration::from_millis(60)).await;
        let mut written = write_many(&copy("a"), "one", 60).await;
        let end = copy("a").durable_log().end;
        for name in &names {
            let member = copy(name);
            wait_for("the commit point to reach every copy", || member.store().applied_next() >= end).await;
            assert_holds(&member, &written).await;
        }

        // The primary is cut from everyone: its write is never acknowledged.
        world.isolated.borrow_mut().insert("a".into());
        let lost = {
            let primary = copy("a");
            glommio::spawn_local(async move {
                primary.write(std::iter::once((&b"never"[..], Some(&b"acknowledged"[..])))).await
            })
        };
        // The write is durable on the cut primary alone: a divergent tail.
        let split = copy("b").durable_log().end;
        wait_for("the cut write on the old primary's disk", || copy("a").durable_log().end == split + 1).await;
        // Its lease lapses; the control plane promotes the newest of the members that report.
        glommio::timer::sleep(LEASE + Duration::from_millis(100)).await;
        let old = world.config.borrow().clone().unwrap();
        let reports: Vec<_> = ["b", "c"].iter().map(|name| (name.to_string(), copy(name).durable_log())).collect();
        let promoted = promote(&old, &reports).unwrap();
        assert_ne!(promoted.primary, "a");
        publish(&world, &promoted);
        let primary = promoted.primary.clone();
        wait_for("the new primary's lead", || copy(&primary).leading() == Some(promoted.epoch)).await;
        glommio::timer::sleep(Duration::from_millis(60)).await;
        written.extend(write_many(&copy(&primary), "two", 40).await);

        // The old primary comes back: it learns the new set, cuts its divergent tail, catches
        // up, and the primary has it added back.
        world.isolated.borrow_mut().clear();
        let current = world.config.borrow().clone().unwrap();
        copy("a").on_config(current);
        let outcome = lost.await;
        assert!(outcome.is_err(), "the cut primary's write was acknowledged: {outcome:?}");
        wait_for("the old primary to be a member again", || {
            world.config.borrow().as_ref().is_some_and(|config| config.members.len() == 3)
        })
        .await;
        written.extend(write_many(&copy(&primary), "three", 30).await);
        let end = copy(&primary).durable_log().end;
        for name in &names {
            let member = copy(name);
            wait_for("every copy to apply the log", || member.store().applied_next() >= end).await;
            assert_eq!(member.durable_log(), copy(&primary).durable_log(), "{name}'s log");
            // The new primary's epoch marker took the LSN of the cut write: it was cut.
            assert_eq!(member.durable_log().epoch_at(split), Some(promoted.epoch));
            assert_holds(&member, &written).await;
            assert_eq!(
                member.store().get(b"never", None).await.unwrap(),
                None,
                "{name} holds the unacknowledged write"
            );
        }

        // A copy reopened from disk reads the same log back from its WAL.
        let reopened = copy("a");
        reopened.shut_down();
        world.copies.borrow_mut().remove("a");
        let store = reopened.store().clone();
        drop(reopened);
        glommio::timer::sleep(Duration::from_millis(50)).await;
        store.close().await.unwrap();
        let again = open_copy(&world, "a", &paths[0]).await;
        assert_eq!(again.durable_log(), copy(&primary).durable_log());
        let config = world.config.borrow().clone().unwrap();
        again.on_config(config);
        written.extend(write_many(&copy(&primary), "four", 10).await);
        let end = copy(&primary).durable_log().end;
        wait_for("the reopened copy to apply the log", || again.store().applied_next() >= end).await;
        assert_holds(&again, &written).await;
        for name in &names {
            copy(name).shut_down();
        }
    });
}
