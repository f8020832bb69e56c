//! A real `dataplane` process joined to a real control plane (three `controlplane` processes,
//! QUIC with mutual TLS on 127.0.0.1): it registers, heartbeats and holds the lease of the
//! shard placed home in its region, and hands it back on SIGTERM; every write is stamped inside the GLTS interval and
//! acknowledged after its commit wait, so writes acknowledged one after the other carry
//! increasing timestamps across shards. A SIGKILLed node goes suspect, then dead. A node whose control plane cannot be reached refuses to start.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::Command as Process;
use std::time::{Duration, Instant};

use controlapi::meta::{Command, NodeState};
use testkit::LocalCluster;

mod common;

use common::process::{Node, connect, runtime, wait_meta};

const SECOND: Duration = Duration::from_secs(1);

fn control_config(cluster: &LocalCluster, tls: &Path, extra: &str) -> String {
    let seeds: Vec<String> =
        cluster.ids().into_iter().filter_map(|id| cluster.addr(id)).map(|addr| format!("{addr:?}")).collect();
    format!(
        "shards = 2\n[control]\nseeds = [{}]\ntls_dir = {:?}\nnode_id = \"dn1\"\nregion = \"eu\"\nzone = \"a\"\n\
         heartbeat_ms = 100\nlease_ms = 1500\n{extra}",
        seeds.join(","),
        tls
    )
}

#[test]
fn a_data_node_registers_holds_its_lease_and_stamps_writes_inside_the_glts_interval() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let binary = LocalCluster::binary().unwrap();
    let cluster = runtime
        .block_on(LocalCluster::start(
            &binary,
            dir.path(),
            3,
            &["--suspect-after-ms", "700", "--dead-after-ms", "1800"],
        ))
        .unwrap();
    runtime.block_on(cluster.wait_leader(15 * SECOND)).unwrap();
    // The data node's certificate, issued later by the same CA.
    let tls = dir.path().join("tls");
    platform::tls::generate(&tls, &["dn1".to_owned()]).unwrap();
    runtime.block_on(async {
        let admin = cluster.client();
        for command in [
            Command::PutRegion { name: "eu".into(), zones: vec!["a".into()] },
            Command::PutRegion { name: "us".into(), zones: vec!["b".into()] },
            Command::SetPlacement { shard: 0, home: "eu".into(), replicas: vec!["us".into()] },
            Command::SetPlacement { shard: 1, home: "us".into(), replicas: vec!["eu".into()] },
        ] {
            admin.write(command, 10 * SECOND).await.unwrap();
        }
    });

    let data = dir.path().join("dn1");
    let mut node = Node::start(&data, &control_config(&cluster, &tls, ""));
    let state = runtime.block_on(wait_meta(&cluster, "registration and lease", |state| {
        state.data_nodes.get("dn1").is_some_and(|n| n.state == NodeState::Up) && state.leases.contains_key(&0)
    }));
    let registered = &state.data_nodes["dn1"];
    assert_eq!(
        (registered.addr.as_str(), registered.region.as_str(), registered.shards),
        (node.addresses[0].as_str(), "eu", 2)
    );
    assert!(registered.capacity_bytes > 0);
    assert_eq!(state.leases[&0].holder, "dn1");
    assert!(!state.leases.contains_key(&1), "shard 1 is placed in us, yet leased: {:?}", state.leases);
    let first_epoch = state.leases[&0].epoch;

    // Writes acknowledged one after the other, spread over both shards: each stamp lies in the
    // interval of a GLTS client of our own (read before the put and after its ack), and stamps
    // increase across shards, because each ack waited until its stamp was in the past.
    runtime.block_on(async {
        let glts = cluster.glts_client(Duration::from_millis(20)).unwrap();
        let start = Instant::now();
        while glts.now().is_err() {
            assert!(start.elapsed() < 10 * SECOND, "no GLTS interval in the test");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let client = connect(&node).await;
        let mut last = 0;
        let mut per_shard = [0_u32; 2];
        for i in 0..300_u32 {
            let key = format!("k{i}");
            per_shard[wire::shard_for(key.as_bytes(), 2) as usize] += 1;
            let before = glts.now().unwrap();
            let ts = client.put(key.as_bytes(), b"v").await.unwrap();
            let after = glts.now().unwrap();
            let physical_ns = (ts >> controlapi::glts::LOGICAL_BITS) * 1000;
            assert!(before.earliest_ns < physical_ns + 1000, "put {i}: stamp {physical_ns} ns before {before:?}");
            assert!(physical_ns + 1000 <= after.latest_ns, "put {i}: stamp {physical_ns} ns after {after:?}");
            assert!(ts > last, "put {i}: stamp {ts} not above the previous acknowledged {last}");
            last = ts;
        }
        assert!(per_shard.iter().all(|n| *n > 50), "keys did not spread over the shards: {per_shard:?}");
        let stored = client.get(b"k7", None).await.unwrap().unwrap();
        assert_eq!(&stored.value[..], b"v");
    });

    // SIGTERM hands the lease back (its expiry moves to the release time); the restarted node
    // takes it again. No other node held it meanwhile, so the epoch stays.
    let held_until = runtime.block_on(cluster.client().read(true, 5 * SECOND)).unwrap().leases[&0].expires_ms;
    node.stop();
    let released =
        runtime.block_on(wait_meta(&cluster, "lease released", |state| state.leases[&0].expires_ms < held_until));
    let released_at = released.leases[&0].expires_ms;
    let mut node = Node::start(&data, &control_config(&cluster, &tls, ""));
    let state =
        runtime.block_on(wait_meta(&cluster, "lease taken again", |state| state.leases[&0].expires_ms > released_at));
    assert_eq!((state.leases[&0].holder.as_str(), state.leases[&0].epoch), ("dn1", first_epoch));

    // SIGKILL: no more heartbeats, so suspect, then dead.
    node.kill();
    runtime.block_on(wait_meta(&cluster, "suspect", |state| state.data_nodes["dn1"].state != NodeState::Up));
    runtime.block_on(wait_meta(&cluster, "dead", |state| state.data_nodes["dn1"].state == NodeState::Dead));
}

#[test]
fn a_node_whose_control_plane_cannot_be_reached_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    platform::tls::generate(&tls, &["dn1".to_owned()]).unwrap();
    // A UDP port nobody answers on.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let seed = silent.local_addr().unwrap().to_string();
    let run = |node_id: &str| {
        let config = dir.path().join(format!("{node_id}.toml"));
        let text = format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nshards = 1\n[control]\nseeds = [{seed:?}]\ntls_dir = {tls:?}\n\
             node_id = {node_id:?}\nregion = \"eu\"\nzone = \"a\"\nstart_timeout_ms = 1500\n",
            dir.path().join(node_id)
        );
        std::fs::write(&config, text).unwrap();
        let output = Process::new(env!("CARGO_BIN_EXE_dataplane")).arg("--config").arg(&config).output().unwrap();
        assert!(!output.status.success(), "started without a control plane");
        assert!(!String::from_utf8_lossy(&output.stdout).contains("READY"));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let stderr = run("dn1");
    assert!(stderr.contains("control plane") && stderr.contains(&seed), "unclear error: {stderr}");
    // A missing certificate is named before anything is tried.
    let stderr = run("dn2");
    assert!(stderr.contains("dn2.pem"), "{stderr}");
}

#[test]
fn the_leader_takes_a_snapshot_each_time_the_wals_wrote_the_configured_volume() {
    const EVERY: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let binary = LocalCluster::binary().unwrap();
    let every = EVERY.to_string();
    let cluster =
        runtime.block_on(LocalCluster::start(&binary, dir.path(), 3, &["--snapshot-every-wal-bytes", &every])).unwrap();
    runtime.block_on(cluster.wait_leader(15 * SECOND)).unwrap();
    let tls = dir.path().join("tls");
    platform::tls::generate(&tls, &["dn1".to_owned()]).unwrap();
    runtime.block_on(async {
        let admin = cluster.client();
        admin.write(Command::PutRegion { name: "eu".into(), zones: vec!["a".into()] }, 10 * SECOND).await.unwrap();
        for shard in 0..2 {
            let placement = Command::SetPlacement { shard, home: "eu".into(), replicas: vec![] };
            admin.write(placement, 10 * SECOND).await.unwrap();
        }
    });
    let node = Node::start(&dir.path().join("dn1"), &control_config(&cluster, &tls, ""));
    runtime.block_on(wait_meta(&cluster, "registration", |state| {
        state.data_nodes.get("dn1").is_some_and(|n| n.state == NodeState::Up)
    }));

    let snapshots = || runtime.block_on(cluster.client().read(true, 5 * SECOND)).unwrap().snapshots.len();
    // Idle (heartbeats only): no volume, no snapshot.
    std::thread::sleep(SECOND);
    assert_eq!(snapshots(), 0, "a snapshot without WAL volume");

    // Rounds of 1.2 MB of inline values, each more than the 1 MiB asked for: one snapshot
    // after each round (a snapshot covers all the volume reported before it, so a round
    // cannot give two), and none once writing stops.
    let client = runtime.block_on(connect(&node));
    let value = vec![b'w'; 60 << 10];
    for round in 1..=3_usize {
        runtime.block_on(async {
            for i in 0..20 {
                client.put(format!("bulk/{round}/{i}").as_bytes(), &value).await.unwrap();
            }
        });
        let start = Instant::now();
        while snapshots() < round {
            assert!(start.elapsed() < 20 * SECOND, "round {round}: {} snapshots", snapshots());
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(SECOND);
        assert_eq!(snapshots(), round, "round {round}: one snapshot per round");
    }
    drop(node);
}
