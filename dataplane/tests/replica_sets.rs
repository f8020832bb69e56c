//! A region of three real `dataplane` processes in three zones, every shard in a replica set of
//! three (`[replica_sets]`, placed by the control plane: three real `controlplane` processes),
//! the copies linked by QUIC with mutual TLS. Writes go to each shard's primary and are
//! acknowledged once on every member; the primary of a busy shard is killed with SIGKILL in
//! rounds: the control plane promotes another member when its lease lapses, writes resume,
//! the killed node comes back, cuts what it alone held and rejoins; at the end every
//! acknowledged write is on every node.
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

use common::process::{Node, runtime};

const SECOND: Duration = Duration::from_secs(1);
const NODES: [(&str, &str); 3] = [("dn1", "a"), ("dn2", "b"), ("dn3", "c")];

fn node_config(cluster: &LocalCluster, tls: &Path, id: &str, zone: &str) -> String {
    let seeds: Vec<String> =
        cluster.ids().into_iter().filter_map(|member| cluster.addr(member)).map(|addr| format!("{addr:?}")).collect();
    format!(
        "shards = 2\n[control]\nseeds = [{}]\ntls_dir = {tls:?}\nnode_id = \"{id}\"\nregion = \"eu\"\nzone = \"{zone}\"\n\
         heartbeat_ms = 100\nlease_ms = 1500\n[replica_sets]\nlisten = \"127.0.0.1:0\"\nmember_timeout_ms = 500\n",
        seeds.join(",")
    )
}

async fn wait_meta(cluster: &LocalCluster, what: &str, done: impl Fn(&MetaState) -> bool) -> MetaState {
    let start = Instant::now();
    loop {
        if let Ok(state) = cluster.client().read(false, 2 * SECOND).await {
            if done(&state) {
                return state;
            }
            assert!(start.elapsed() < 30 * SECOND, "{what}: not within 30 s; metadata {state:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

#[test]
fn every_acknowledged_write_survives_sigkills_of_the_primary_and_the_node_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let binary = LocalCluster::binary().unwrap();
    let cluster = runtime.block_on(LocalCluster::start(&binary, dir.path(), 3, &[])).unwrap();
    runtime.block_on(cluster.wait_leader(15 * SECOND)).unwrap();
    let tls = dir.path().join("tls");
    let ids: Vec<String> = NODES.iter().map(|(id, _)| (*id).to_owned()).collect();
    platform::tls::generate(&tls, &ids).unwrap();
    let admin = cluster.client();
    runtime.block_on(async {
        let zones = NODES.iter().map(|(_, zone)| (*zone).to_owned()).collect();
        admin.write(Command::PutRegion { name: "eu".into(), zones }, 10 * SECOND).await.unwrap();
    });
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for (id, zone) in NODES {
        nodes.insert(id.into(), Node::start(&dir.path().join(id), &node_config(&cluster, &tls, id, zone)));
    }
    runtime.block_on(wait_meta(&cluster, "three nodes up", |state| {
        ids.iter().all(|id| state.data_nodes.get(id).is_some_and(|node| node.state == NodeState::Up))
    }));
    runtime.block_on(async {
        let place = Command::PlaceReplicaSets { region: "eu".into(), shards: 2, replicas: 3, min_replicas: 2 };
        admin.write(place, 10 * SECOND).await.unwrap();
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
    // Four writers, each putting its own keys one after the other.
    let tasks: Vec<_> = (0..4)
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
    let rounds = 3;
    for round in 0..rounds {
        std::thread::sleep(SECOND);
        let state = runtime.block_on(wait_meta(&cluster, "every set whole", |state| {
            state
                .replica_sets
                .get("eu")
                .is_some_and(|sets| sets.len() == 2 && sets.values().all(|set| set.members.len() == 3))
        }));
        let victim = state.replica_sets["eu"][&(round % 2)].primary.clone();
        let before = acked.lock().unwrap().len();
        nodes.get_mut(&victim).unwrap().kill();
        writer.clients.lock().unwrap().remove(&victim);
        // Writes resume on the other two.
        let start = Instant::now();
        while acked.lock().unwrap().len() < before + 50 {
            assert!(start.elapsed() < 30 * SECOND, "round {round}: writes did not resume after killing {victim}");
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "round {round}: killed {victim} (primary of shard {}); 50 more writes in {:?}",
            round % 2,
            start.elapsed()
        );
        // The killed node comes back and rejoins.
        let zone = NODES.iter().find(|(id, _)| *id == victim).unwrap().1;
        let node = Node::start(&dir.path().join(&victim), &node_config(&cluster, &tls, &victim, zone));
        let client = runtime.block_on(Writer::connect(&node));
        writer.clients.lock().unwrap().insert(victim.clone(), client);
        nodes.insert(victim.clone(), node);
    }
    runtime.block_on(wait_meta(&cluster, "every set whole at the end", |state| {
        state.replica_sets.get("eu").is_some_and(|sets| sets.values().all(|set| set.members.len() == 3))
    }));
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        runtime.block_on(task).unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 200, "only {} writes acknowledged", acked.len());
    eprintln!("{} writes acknowledged; checking each on every node", acked.len());
    // Every acknowledged write, with its timestamp, on every node (a backup applies what the
    // primary said is committed: give it the next heartbeat).
    runtime.block_on(async {
        for id in &ids {
            let client = writer.client(id).unwrap();
            let start = Instant::now();
            for (key, ts) in &acked {
                loop {
                    let got = client.get(key.as_bytes(), None).await.unwrap();
                    match got {
                        Some(version) if version.ts == *ts && version.value == format!("v-{key}").as_bytes() => break,
                        other => {
                            assert!(start.elapsed() < 10 * SECOND, "{id} lacks acknowledged {key}@{ts}: {other:?}");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
        }
    });
    for node in nodes.values_mut() {
        node.stop();
    }
}
