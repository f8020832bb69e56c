//! A region of three real `dataplane` processes in three zones, every shard in a replica set of
//! three (`[replica_sets]`, placed by the control plane: three real `controlplane` processes),
//! the copies linked by QUIC with mutual TLS. Writes go to each shard's primary and are
//! acknowledged once on every member; the primary of a busy shard is killed with SIGKILL in
//! 51 rounds (and a backup in 12 more): the control plane promotes another member
//! when its lease lapses (a dead backup is removed by its primary and writes go on with two
//! copies), the killed node comes back, cuts what it alone held and rejoins; at the end every
//! acknowledged write is on every node, with the timestamp it was acknowledged with. An EIO on
//! the primary's WAL fences it and another member takes over.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client::{Client, ClientConfig, ClientError};
use controlapi::meta::{Command, MetaState, NodeState};
use testkit::LocalCluster;
use wire::proto::ErrorCode;

mod common;

use common::process::{Node, runtime, wait_meta};

const SECOND: Duration = Duration::from_secs(1);
const NODES: [(&str, &str); 3] = [("dn1", "a"), ("dn2", "b"), ("dn3", "c")];

fn node_config(cluster: &LocalCluster, tls: &Path, id: &str, zone: &str) -> String {
    let seeds: Vec<String> =
        cluster.ids().into_iter().filter_map(|member| cluster.addr(member)).map(|addr| format!("{addr:?}")).collect();
    format!(
        "shards = 2\n[control]\nseeds = [{}]\ntls_dir = {tls:?}\nnode_id = \"{id}\"\nregion = \"eu\"\nzone = \"{zone}\"\n\
         heartbeat_ms = 100\nlease_ms = 1500\n[replica_sets]\nlisten = \"127.0.0.1:0\"\n",
        seeds.join(",")
    )
}

/// Writes to whichever node's copy is the shard's primary: a refusal (not the primary, no
/// lease, too few members) or a lost connection moves to the next node.
#[derive(Clone)]
struct Writer {
    clients: Arc<Mutex<BTreeMap<String, Client>>>,
    /// The node that last took each shard's writes.
    primary: Arc<Mutex<BTreeMap<u32, String>>>,
}

impl Writer {
    async fn connect(node: &Node) -> Client {
        let config = ClientConfig { retries: 0, request_timeout: 5 * SECOND, ..ClientConfig::default() };
        Client::connect(&node.addresses[0], config).await.unwrap()
    }

    fn client(&self, id: &str) -> Option<Client> {
        self.clients.lock().unwrap().get(id).cloned()
    }

    /// Puts `key`, trying the nodes in turn for up to 20 s; the acknowledged timestamp.
    async fn put(&self, key: &str, value: &str) -> Result<u64, String> {
        let start = Instant::now();
        let ids: Vec<String> = NODES.iter().map(|(id, _)| (*id).to_owned()).collect();
        let shard = wire::routing::shard_for(key.as_bytes(), 2);
        let mut next = self.primary.lock().unwrap().get(&shard).cloned().unwrap_or_else(|| ids[0].clone());
        let mut last = String::new();
        while start.elapsed() < 20 * SECOND {
            if let Some(client) = self.client(&next) {
                match client.put(key.as_bytes(), value.as_bytes()).await {
                    Ok(ts) => {
                        self.primary.lock().unwrap().insert(shard, next);
                        return Ok(ts);
                    }
                    Err(ClientError::Server { code: ErrorCode::NotPrimary | ErrorCode::Unavailable, message }) => {
                        last = message;
                    }
                    Err(error) => last = error.to_string(),
                }
            }
            let at = ids.iter().position(|id| *id == next).unwrap_or(0);
            next = ids[(at + 1) % ids.len()].clone();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("{key}: no node took it within 20 s; last: {last}"))
    }
}

/// Three data nodes of region `eu` in zones a, b, c joined to a 3-process control plane, the
/// two shards placed as sets of three (min 2), four writers putting their own keys one after
/// the other through whichever node is the primary.
struct Region {
    dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    cluster: LocalCluster,
    tls: std::path::PathBuf,
    nodes: BTreeMap<String, Node>,
    writer: Writer,
    acked: Arc<Mutex<Vec<(String, u64)>>>,
    running: Arc<std::sync::atomic::AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl Region {
    /// `env` goes to the process of node `dn1` (failpoints).
    fn start(env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let runtime = runtime();
        let binary = LocalCluster::binary().unwrap();
        let cluster = runtime.block_on(LocalCluster::start(&binary, dir.path(), 3, &[])).unwrap();
        runtime.block_on(cluster.wait_leader(15 * SECOND)).unwrap();
        let tls = dir.path().join("tls");
        let ids: Vec<String> = NODES.iter().map(|(id, _)| (*id).to_owned()).collect();
        platform::tls::generate(&tls, &ids).unwrap();
        runtime.block_on(async {
            let zones = NODES.iter().map(|(_, zone)| (*zone).to_owned()).collect();
            cluster.client().write(Command::PutRegion { name: "eu".into(), zones }, 10 * SECOND).await.unwrap();
        });
        let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
        for (id, zone) in NODES {
            let config = node_config(&cluster, &tls, id, zone);
            let data = dir.path().join(id);
            let node = if id == "dn1" && !env.is_empty() {
                Node::start_logged(&data, &config, env)
            } else {
                Node::start(&data, &config)
            };
            nodes.insert(id.into(), node);
        }
        runtime.block_on(wait_meta(&cluster, "three nodes up", |state| {
            ids.iter().all(|id| state.data_nodes.get(id).is_some_and(|node| node.state == NodeState::Up))
        }));
        runtime.block_on(async {
            let place = Command::PlaceReplicaSets { region: "eu".into(), shards: 2, replicas: 3, min_replicas: 2 };
            cluster.client().write(place, 10 * SECOND).await.unwrap();
        });
        let writer = Writer { clients: Arc::default(), primary: Arc::default() };
        runtime.block_on(async {
            for (id, node) in &nodes {
                let client = Writer::connect(node).await;
                writer.clients.lock().unwrap().insert(id.clone(), client);
            }
        });
        let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
        let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let writers = (0..4)
            .map(|lane| {
                let (writer, acked, running) = (writer.clone(), acked.clone(), running.clone());
                runtime.spawn(async move {
                    let mut index = 0;
                    while running.load(std::sync::atomic::Ordering::Relaxed) {
                        let key = format!("k{lane}-{index:05}");
                        match writer.put(&key, &format!("v-{key}")).await {
                            Ok(ts) => acked.lock().unwrap().push((key, ts)),
                            Err(error) => panic!("{error}"),
                        }
                        index += 1;
                    }
                })
            })
            .collect();
        Self { dir, runtime, cluster, tls, nodes, writer, acked, running, writers }
    }

    fn sets_whole(&self) -> MetaState {
        self.runtime.block_on(wait_meta(&self.cluster, "every set whole", |state| {
            state
                .replica_sets
                .get("eu")
                .is_some_and(|sets| sets.len() == 2 && sets.values().all(|set| set.members.len() == 3))
        }))
    }

    /// Stops the writers and checks every acknowledged write, with its timestamp, on each node
    /// of `ids` (a backup applies what its primary said is committed: given a few heartbeats).
    fn check_acknowledged_on(&mut self, ids: &[&str]) -> usize {
        self.running.store(false, std::sync::atomic::Ordering::Relaxed);
        for task in std::mem::take(&mut self.writers) {
            self.runtime.block_on(task).unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        eprintln!("{} writes acknowledged; checking each on {ids:?}", acked.len());
        for id in ids {
            let client = self.writer.client(id).unwrap();
            self.runtime.block_on(held_everywhere(&client, id, &acked));
        }
        acked.len()
    }
}

async fn held_everywhere(client: &Client, id: &str, acked: &[(String, u64)]) {
    let start = Instant::now();
    let mut missing: Vec<&(String, u64)> = acked.iter().collect();
    while !missing.is_empty() {
        let mut still = std::collections::HashSet::new();
        for chunk in missing.chunks(256) {
            let reads = chunk.iter().map(|(key, _)| {
                let client = client.clone();
                async move { client.get(key.as_bytes(), None).await }
            });
            for ((key, ts), got) in chunk.iter().zip(wire::join::join_all(reads).await) {
                let held = got
                    .unwrap()
                    .is_some_and(|version| version.ts == *ts && version.value == format!("v-{key}").as_bytes());
                if !held {
                    still.insert(key.clone());
                }
            }
        }
        missing.retain(|(key, _)| still.contains(key));
        assert!(
            missing.is_empty() || start.elapsed() < 10 * SECOND,
            "{id} lacks {} acknowledged writes, e.g. {:?}",
            missing.len(),
            missing.first()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn every_acknowledged_write_survives_sigkills_of_the_primary_and_the_node_rejoins() {
    let mut region = Region::start(&[]);
    {
        let Region { dir, runtime, cluster, tls, nodes, writer, acked, .. } = &mut region;
        let (dir, runtime, cluster, tls) = (&*dir, &*runtime, &*cluster, &*tls);
        // SIGKILL the primary of a busy shard, round after round (MERIDIAN_REPLICA_ROUNDS, 63 by
        // default: 51 primaries and 12 backups): another node takes the shard's writes, the killed
        // one restarts and rejoins.
        let rounds: u32 = std::env::var("MERIDIAN_REPLICA_ROUNDS").ok().and_then(|n| n.parse().ok()).unwrap_or(63);
        for round in 0..rounds {
            let state = runtime.block_on(wait_meta(cluster, "every set whole", |state| {
                state
                    .replica_sets
                    .get("eu")
                    .is_some_and(|sets| sets.len() == 2 && sets.values().all(|set| set.members.len() == 3))
            }));
            let shard = round % 2;
            let set = &state.replica_sets["eu"][&shard];
            let primary = set.primary.clone();
            // Busy: writes of the shard acknowledged by its primary right before the kill.
            let before = acked.lock().unwrap().len();
            let start = Instant::now();
            while acked.lock().unwrap().len() < before + 20
                || writer.primary.lock().unwrap().get(&shard) != Some(&primary)
            {
                assert!(start.elapsed() < 30 * SECOND, "round {round}: no writes through {primary}");
                std::thread::sleep(Duration::from_millis(5));
            }
            if round % 5 == 4 {
                // Now and then a backup dies instead: a short stall, then writes with two copies.
                let victim = set.members.iter().find(|member| **member != primary).unwrap().clone();
                nodes.get_mut(&victim).unwrap().kill();
                writer.clients.lock().unwrap().remove(&victim);
                let killed = Instant::now();
                let (count, removed) = (acked.lock().unwrap().len(), set.epoch);
                let state = runtime.block_on(wait_meta(cluster, "the dead backup removed", |state| {
                    state.replica_sets["eu"][&shard].epoch > removed
                }));
                assert_eq!(state.replica_sets["eu"][&shard].primary, primary, "round {round}: the primary changed");
                while acked.lock().unwrap().len() < count + 50 {
                    assert!(
                        killed.elapsed() < 30 * SECOND,
                        "round {round}: writes did not go on after killing backup {victim}"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                eprintln!("round {round}: killed {victim}, a backup of shard {shard}; removed and writes went on");
                let zone = NODES.iter().find(|(id, _)| *id == victim).unwrap().1;
                let node = Node::start(&dir.path().join(&victim), &node_config(cluster, tls, &victim, zone));
                let client = runtime.block_on(Writer::connect(&node));
                writer.clients.lock().unwrap().insert(victim.clone(), client);
                nodes.insert(victim.clone(), node);
                continue;
            }
            let victim = primary;
            nodes.get_mut(&victim).unwrap().kill();
            writer.clients.lock().unwrap().remove(&victim);
            let killed = Instant::now();
            while writer.primary.lock().unwrap().get(&shard) == Some(&victim) {
                assert!(
                    killed.elapsed() < 30 * SECOND,
                    "round {round}: shard {shard}'s writes did not resume after killing {victim}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            eprintln!(
                "round {round}: killed {victim}, the primary of shard {shard}; writes resumed in {:?}",
                killed.elapsed()
            );
            // The killed node comes back and rejoins.
            let zone = NODES.iter().find(|(id, _)| *id == victim).unwrap().1;
            let node = Node::start(&dir.path().join(&victim), &node_config(cluster, tls, &victim, zone));
            let client = runtime.block_on(Writer::connect(&node));
            writer.clients.lock().unwrap().insert(victim.clone(), client);
            nodes.insert(victim.clone(), node);
        }
    }
    region.sets_whole();
    let checked = region.check_acknowledged_on(&["dn1", "dn2", "dn3"]);
    assert!(checked > 200, "only {checked} writes acknowledged");
    for node in region.nodes.values_mut() {
        node.stop();
    }
}

/// The primary's WAL fails an fdatasync with EIO: the WAL is fenced, its copy stops and no
/// longer reports, its lease lapses and another member takes the shard's writes; nothing that
/// was acknowledged is lost.
#[test]
fn an_eio_on_the_primarys_wal_fences_it_and_another_member_takes_over() {
    // dn1 is the first node of the first set (zone a, the least loaded, first by name): shard
    // 0's primary. Its shards' WALs fail their 300th fdatasync.
    let mut region = Region::start(&[(dataplane::node::WAL_SYNC_EIO_ENV, "300")]);
    let state = region.runtime.block_on(wait_meta(&region.cluster, "the sets", |state| {
        state.replica_sets.get("eu").is_some_and(|sets| sets.len() == 2)
    }));
    assert_eq!(state.replica_sets["eu"][&0].primary, "dn1");
    let moved = region.runtime.block_on(wait_meta(&region.cluster, "shard 0 promoted away from dn1", |state| {
        state.replica_sets["eu"][&0].primary != "dn1"
    }));
    let epoch = moved.replica_sets["eu"][&0].epoch;
    // Writes of shard 0 go on through the new primary.
    let start = Instant::now();
    while region.writer.primary.lock().unwrap().get(&0).is_none_or(|node| node == "dn1") {
        assert!(start.elapsed() < 30 * SECOND, "shard 0's writes did not resume after dn1's WAL failed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = region.acked.lock().unwrap().len();
    while region.acked.lock().unwrap().len() < before + 200 {
        assert!(start.elapsed() < 60 * SECOND, "writes did not go on");
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("shard 0 promoted at epoch {epoch} after dn1's WAL failed");
    // The fenced node's copies stopped: every acknowledged write is on the two others.
    let checked = region.check_acknowledged_on(&["dn2", "dn3"]);
    assert!(checked > 200, "only {checked} writes acknowledged");
    let log = std::fs::read_to_string(region.dir.path().join("dn1.log")).unwrap();
    assert!(log.contains("replica copy stopped") && log.contains("fenced"), "dn1's log: {log}");
}
