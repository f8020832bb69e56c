//! Inter-region replication through real processes and real QUIC: three regions (one
//! `dataplane` each), the home region's streams to the other two through the WAN proxy
//! (20 ms one way), a 30 s partition of one region while writes go on, then heal: every
//! acknowledged write is in every region, the contents are identical, and the lag is back
//! under target within 2 s. The home keeps little WAL for a lagging peer, so during the
//! partition its checkpoints release the WAL past the cut-off region's position, which then
//! catches up from a snapshot, deletes included whose tombstones the home collected meanwhile. Also: replicas refuse client writes, and a peer whose
//! certificate comes from another CA is refused.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use client::{Client, ClientError, ErrorCode};
use common::process::{Node, connect, runtime};
use platform::metrics::{sample, scrape};
use wan::{LinkConfig, Proxy};

const ONE_WAY: Duration = Duration::from_millis(20);
/// The lag the test asks for after the heal (the bench measures the real distribution).
const LAG_TARGET_US: u64 = 200_000;

fn free_udp_port() -> SocketAddr {
    testkit::ports::free_udp().unwrap()
}

fn region_config(region: &str, listen: SocketAddr, tls: &Path, peers: &[(&str, SocketAddr)]) -> String {
    let mut text = format!(
        "shards = 2\n[replication]\nregion = \"{region}\"\nhome = \"a\"\nlisten = \"{listen}\"\ntls_dir = {tls:?}\nname = \"{region}\"\nrtt_ms = 40\n"
    );
    for (peer, addr) in peers {
        text.push_str(&format!("[[replication.peers]]\nregion = \"{peer}\"\naddr = \"{addr}\"\n"));
    }
    text
}

async fn contents(client: &Client) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut after = Vec::new();
    loop {
        let page = client.list(b"", &after, 1000, None).await.unwrap();
        for entry in &page.entries {
            let value = client.get(&entry.key, None).await.unwrap().expect("listed key has a value");
            out.insert(entry.key.clone(), value.value.to_vec());
        }
        match page.next {
            Some(next) => after = next,
            None => return out,
        }
    }
}

/// A client of each node, in order.
async fn connect_all(nodes: &[Node]) -> Vec<Client> {
    let mut clients = Vec::new();
    for node in nodes {
        clients.push(connect(node).await);
    }
    clients
}

/// A client that sends shard k to the k-th client's node (shard k's home when region k homes
/// it).
fn routed_to_homes(clients: &[Client]) -> Client {
    let homes = clients.iter().enumerate().map(|(shard, client)| client.addresses()[shard].clone()).collect();
    Client::with_addresses(homes, client::ClientConfig::default()).unwrap()
}

async fn lag_us(client: &Client, source: &str) -> Option<u64> {
    client.replication_status().await.ok()?.lag_us(source)
}

/// Waits until `client`'s region has resolved past `ts` from region `a`.
async fn wait_resolved(client: &Client, ts: u64, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let status = client.replication_status().await.unwrap();
        let resolved = status.resolved_ts("a");
        if resolved >= ts {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "region {} did not resolve past {ts} within {limit:?}: {status:?}",
            status.region
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn three_regions_converge_after_a_partition_and_refuse_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    platform::tls::generate(&tls, &["a".into(), "b".into(), "c".into()]).unwrap();
    let rt = runtime();
    let (listen_b, listen_c) = (free_udp_port(), free_udp_port());
    let link = LinkConfig::with_delay(ONE_WAY);
    let (to_b, to_c) = rt.block_on(async {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        (
            Proxy::start(any, listen_b, link, link, 1).await.unwrap(),
            Proxy::start(any, listen_c, link, link, 2).await.unwrap(),
        )
    });
    let metrics = "[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let config_b = region_config("b", listen_b, &tls, &[("a", free_udp_port())]) + metrics;
    let mut b = Node::start(&dir.path().join("b"), &config_b);
    let config_c = region_config("c", listen_c, &tls, &[("a", free_udp_port())]) + metrics;
    let mut c = Node::start(&dir.path().join("c"), &config_c);
    // Small segments and frequent checkpoints, and at most 1 MiB of WAL held for a peer that
    // fell behind: the partition outlasts what the home keeps for c. Versions are kept 20 s,
    // so the deletes early in the partition are collected, tombstones and all, before it ends.
    let small_wal = "[wal]\nsegment_bytes = 266240\nbatch_bytes_max = 262144\nrecord_payload_bytes_max = 131072\n\
                     [store]\ncheckpoint_wal_bytes = 266240\nretention_secs = 20\ngc_interval_ms = 500\n";
    let config_a = region_config("a", free_udp_port(), &tls, &[("b", to_b.addr()), ("c", to_c.addr())])
        .replace("rtt_ms = 40\n", "rtt_ms = 40\nwal_hold_bytes_max = 1048576\n")
        + metrics
        + small_wal;
    let a = Node::start(&dir.path().join("a"), &config_a);

    rt.block_on(async {
        let (ca, cb, cc) = (connect(&a).await, connect(&b).await, connect(&c).await);
        // Replicas take no writes.
        match cb.put(b"k", b"v").await {
            Err(ClientError::Server { code: ErrorCode::NotHome, message }) => assert!(message.contains("region a")),
            other => panic!("a replica accepted a write: {other:?}"),
        }

        // Writes in the home region, including a large (chunked) value and deletes.
        let mut model = BTreeMap::new();
        let mut last_ts = 0;
        for i in 0..400u32 {
            let key = format!("key-{:04}", i % 300).into_bytes();
            if i % 7 == 3 {
                if model.remove(&key).is_some() {
                    last_ts = ca.delete(&key).await.unwrap();
                }
                continue;
            }
            let value = format!("value {i} ").repeat(1 + (i as usize % 40)).into_bytes();
            last_ts = ca.put(&key, &value).await.unwrap();
            model.insert(key, value);
        }
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        last_ts = last_ts.max(ca.put(b"big", &big).await.unwrap());
        model.insert(b"big".to_vec(), big);
        for replica in [&cb, &cc] {
            wait_resolved(replica, last_ts, Duration::from_secs(20)).await;
            assert_eq!(contents(replica).await, model, "a replica differs from the home's acknowledged writes");
        }
        assert_eq!(contents(&ca).await, model);

        // Partition region c for 30 s while writes go on.
        to_c.handle().partition(true);
        let partition_started = Instant::now();
        let mut i = 0u32;
        while partition_started.elapsed() < Duration::from_secs(30) {
            // Early on, deletes of keys c holds: by the heal the home has collected them.
            if partition_started.elapsed() < Duration::from_secs(3) {
                let old = format!("key-{:04}", i % 300).into_bytes();
                if model.remove(&old).is_some() {
                    ca.delete(&old).await.unwrap(); // the put below stamps later
                }
            }
            let key = format!("during-{i:05}").into_bytes();
            let value = format!("partitioned write {i}").into_bytes();
            last_ts = ca.put(&key, &value).await.unwrap();
            model.insert(key, value);
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lag_during = lag_us(&cc, "a").await.unwrap_or(u64::MAX);
        assert!(lag_during > 20_000_000, "c was cut off for 30 s, yet reports a lag of {lag_during} µs");
        assert!(lag_us(&cb, "a").await.unwrap() < 5_000_000, "b kept receiving");
        // A snapshot at the last write: readable at the home and at b, not at the cut-off c
        // (which says how far it can read instead).
        let snapshot = last_ts;
        let at_a = ca.wait_readable(snapshot, Duration::from_secs(5)).await.unwrap();
        assert!(at_a.readable_ts >= snapshot);
        cb.wait_readable(snapshot, Duration::from_secs(5)).await.unwrap();
        match cc.wait_readable(snapshot, Duration::from_millis(300)).await {
            Err(ClientError::Server { code: ErrorCode::Unavailable, message }) => {
                assert!(message.contains("readable up to"), "{message}");
            }
            other => panic!("c read a snapshot it has not received: {other:?}"),
        }
        to_c.handle().partition(false);
        let healed = Instant::now();
        // Back under target within 2 s of the heal.
        loop {
            if lag_us(&cc, "a").await.is_some_and(|lag| lag < LAG_TARGET_US) {
                break;
            }
            assert!(healed.elapsed() < Duration::from_secs(2), "c's lag still above target 2 s after the heal");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!(
            "{i} writes during the partition; c back under {LAG_TARGET_US} µs lag {:?} after the heal",
            healed.elapsed()
        );
        for replica in [&cb, &cc] {
            wait_resolved(replica, last_ts, Duration::from_secs(20)).await;
            assert_eq!(contents(replica).await, model, "acknowledged writes lost or replicas diverged");
        }
        // Once healed, c reads the snapshot too, and every region lists the same versions.
        let readable = cc.wait_readable(snapshot, Duration::from_secs(5)).await.unwrap();
        assert!(readable.readable_ts >= snapshot && readable.at_us > 0);
        let at_home = ca.list(b"", b"", 10_000, Some(snapshot)).await.unwrap();
        assert!(at_home.entries.len() > 300);
        for replica in [&cb, &cc] {
            assert_eq!(replica.list(b"", b"", 10_000, Some(snapshot)).await.unwrap(), at_home);
        }
    });

    let scrape_c = scrape(c.metrics.unwrap()).unwrap();
    let installed = sample(&scrape_c, "meridian_replication_snapshots_installed_total", "source=\"a\"");
    assert!(installed.unwrap_or(0.0) >= 1.0, "c did not install a snapshot");

    // A replica restarted resumes from its durable position and stays identical.
    c.stop();
    let c = Node::start(&dir.path().join("c"), &region_config("c", listen_c, &tls, &[("a", free_udp_port())]));
    rt.block_on(async {
        let (ca, cc) = (connect(&a).await, connect(&c).await);
        let ts = ca.put(b"after-restart", b"yes").await.unwrap();
        wait_resolved(&cc, ts, Duration::from_secs(20)).await;
        assert_eq!(contents(&cc).await, contents(&ca).await);
    });

    // A peer with a certificate from another CA does not get a connection.
    let rogue = dir.path().join("rogue");
    platform::tls::generate(&rogue, &["b".into()]).unwrap();
    rt.block_on(async {
        let identity = platform::tls::Identity::in_dir(&rogue, "b");
        let config = identity.client_config_for(dataplane::repl::ALPN, quinn::TransportConfig::default()).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        let connecting = endpoint.connect(listen_b, platform::tls::SERVER_NAME).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), async {
            let connection = connecting.await?;
            // The server may finish its side first; its refusal then ends the first stream.
            let (mut send, mut recv) = connection.open_bi().await?;
            send.write_all(b"hello").await?;
            let mut buf = [0u8; 1];
            recv.read_exact(&mut buf).await?;
            anyhow::Ok(())
        })
        .await
        .expect("the handshake neither failed nor finished");
        assert!(result.is_err(), "a peer from another CA was accepted");
    });

    // The operator's view: RPO per source region on the replica, QUIC and shipping per peer
    // at the home, all moving.
    let scrape_b = scrape(b.metrics.unwrap()).unwrap();
    let lag = sample(&scrape_b, "meridian_replication_lag_seconds", "source=\"a\"").expect("lag gauge");
    assert!(lag < 5.0, "b's lag gauge reads {lag} s");
    let rpo_samples = sample(&scrape_b, "meridian_replication_rpo_seconds_count", "source=\"a\"").unwrap();
    assert!(rpo_samples > 100.0, "{rpo_samples} RPO samples over the whole test");
    let applied = sample(&scrape_b, "meridian_replication_applied_records_total", "source=\"a\"").unwrap();
    assert!(applied >= 400.0, "{applied} records applied at b");
    // 20 ms each way through the proxy.
    let rtt = sample(&scrape_b, "meridian_quic_rtt_seconds", "peer=\"a\",direction=\"in\"").expect("QUIC RTT at b");
    assert!((0.035..1.0).contains(&rtt), "QUIC RTT {rtt} s through a 40 ms round trip");
    let scrape_a = scrape(a.metrics.unwrap()).unwrap();
    // c came back behind what the home's WAL still held, and caught up from a snapshot; b,
    // never cut off, did not need one.
    let shipped =
        |peer: &str| sample(&scrape_a, "meridian_replication_snapshots_shipped_total", &format!("peer=\"{peer}\""));
    assert!(shipped("c").unwrap_or(0.0) >= 1.0, "no snapshot was shipped to c after its partition");
    assert_eq!(shipped("b").unwrap_or(0.0), 0.0, "b was never behind the WAL");
    let installed = sample(&scrape_b, "meridian_replication_snapshots_installed_total", "source=\"a\"");
    assert_eq!(installed.unwrap_or(0.0), 0.0);
    for peer in ["b", "c"] {
        let labels = format!("peer=\"{peer}\"");
        let quic_labels = format!("peer=\"{peer}\",direction=\"out\"");
        let raw = sample(&scrape_a, "meridian_replication_raw_bytes_total", &labels).unwrap();
        let wire = sample(&scrape_a, "meridian_replication_wire_bytes_total", &labels).unwrap();
        assert!(raw > 100_000.0 && wire > 0.0, "shipped to {peer}: {raw} raw, {wire} on the wire");
        assert!(sample(&scrape_a, "meridian_quic_sent_bytes_total", &quic_labels).unwrap() > 0.0);
    }
    b.stop();
}

/// Every 5th batch leaves the home with a byte flipped after its checksum: the replica rejects
/// the frame, the stream restarts from the last acknowledgement, and nothing is lost.
#[test]
fn corrupted_frames_are_rejected_and_the_stream_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    platform::tls::generate(&tls, &["a".into(), "b".into()]).unwrap();
    let listen_b = free_udp_port();
    let b = Node::start_logged(&dir.path().join("b"), &region_config("b", listen_b, &tls, &[]), &[]);
    let a = Node::start_logged(
        &dir.path().join("a"),
        &region_config("a", free_udp_port(), &tls, &[("b", listen_b)]),
        &[(dataplane::repl::CORRUPT_EVERY_ENV, "5")],
    );
    let rt = runtime();
    rt.block_on(async {
        let (ca, cb) = (connect(&a).await, connect(&b).await);
        let mut model = BTreeMap::new();
        let mut last_ts = 0;
        for i in 0..300u32 {
            let (key, value) = (format!("k{i:04}").into_bytes(), format!("v{i}").repeat(20).into_bytes());
            last_ts = ca.put(&key, &value).await.unwrap();
            model.insert(key, value);
            if i % 10 == 0 {
                // Spread the writes over many batches.
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
        wait_resolved(&cb, last_ts, Duration::from_secs(30)).await;
        assert_eq!(contents(&cb).await, model);
    });
    let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap();
    assert!(log.contains("checksum"), "the replica never saw a damaged frame:\n{log}");
}

/// A control plane (3 members) holding a placement for three regions `a`, `b`, `c`, and the
/// data nodes' configs that join it and take their homes and replicas from it.
struct Placed {
    _cluster: testkit::LocalCluster,
    tls: std::path::PathBuf,
    seeds: Vec<String>,
    listens: Vec<SocketAddr>,
}

impl Placed {
    const REGIONS: [&'static str; 3] = ["a", "b", "c"];

    /// `placement[shard]` is (home, replica regions).
    fn start(rt: &tokio::runtime::Runtime, dir: &Path, placement: &[(&str, Vec<&str>)]) -> Self {
        use controlapi::meta::Command;
        use testkit::LocalCluster;
        let binary = LocalCluster::binary().unwrap();
        let cluster = rt.block_on(LocalCluster::start(&binary, dir, 3, &[])).unwrap();
        rt.block_on(cluster.wait_leader(Duration::from_secs(15))).unwrap();
        rt.block_on(async {
            let admin = cluster.client();
            for region in Self::REGIONS {
                let command = Command::PutRegion { name: region.into(), zones: vec!["z1".into()] };
                admin.write(command, Duration::from_secs(10)).await.unwrap();
            }
            for (shard, (home, replicas)) in placement.iter().enumerate() {
                let replicas = replicas.iter().map(|region| (*region).to_owned()).collect();
                let command = Command::SetPlacement { shard: shard as u32, home: (*home).to_owned(), replicas };
                admin.write(command, Duration::from_secs(10)).await.unwrap();
            }
        });
        let tls = dir.join("tls");
        platform::tls::generate(&tls, &Self::REGIONS.map(str::to_owned)).unwrap();
        let seeds =
            cluster.ids().into_iter().filter_map(|id| cluster.addr(id)).map(|addr| format!("{addr:?}")).collect();
        let listens = Self::REGIONS.iter().map(|_| free_udp_port()).collect();
        Self { _cluster: cluster, tls, seeds, listens }
    }

    /// The config of `region`'s node with `shards` shards.
    fn config(&self, region: &str, shards: usize) -> String {
        let tls = &self.tls;
        let mut text = format!(
            "shards = {shards}\n[control]\nseeds = [{}]\ntls_dir = {tls:?}\nnode_id = \"{region}\"\nregion = \
             \"{region}\"\nzone = \"z1\"\nheartbeat_ms = 100\n[replication]\nregion = \"{region}\"\nlisten = \"{}\"\n\
             tls_dir = {tls:?}\nname = \"{region}\"\nrtt_ms = 2\n",
            self.seeds.join(","),
            self.listens[Self::REGIONS.iter().position(|known| *known == region).unwrap()]
        );
        for (peer, addr) in Self::REGIONS.iter().zip(&self.listens).filter(|(peer, _)| **peer != region) {
            text.push_str(&format!("[[replication.peers]]\nregion = \"{peer}\"\naddr = \"{addr}\"\n"));
        }
        text
    }
}

/// Shards homed in three regions by the control plane's placement (shard k at region k): each
/// node takes the writes of the shard homed in its region, refuses the others (naming their
/// home), ships its shard to the other two and replicates theirs. A client that routes each
/// shard to its home writes over all three; every region then holds the same contents and
/// reads the same snapshot. A node that is the home of one shard and a replica of the others,
/// SIGKILLed while the others take writes and restarted, catches up both ways. A node whose
/// shard has no placement refuses to start.
#[test]
fn shards_homed_in_three_regions_take_writes_at_home_and_converge_everywhere() {
    const REGIONS: [&str; 3] = ["a", "b", "c"];
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    // Shard k homed at region k, replicated to the other two.
    let placement: Vec<(&str, Vec<&str>)> =
        REGIONS.iter().map(|home| (*home, REGIONS.iter().copied().filter(|region| region != home).collect())).collect();
    let placed = Placed::start(&rt, dir.path(), &placement);
    let config = |region: &str, shards: usize| placed.config(region, shards);

    // A fourth shard has no placement: the node says so and does not start.
    let unplaced = dir.path().join("unplaced");
    std::fs::write(
        unplaced.with_extension("toml"),
        format!("data_dir = {unplaced:?}\nlisten = \"127.0.0.1:0\"\n{}", config("a", 4)),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_dataplane"))
        .arg("--config")
        .arg(unplaced.with_extension("toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("no placement for shard 3"), "{stderr}");

    let nodes: Vec<Node> =
        REGIONS.iter().map(|region| Node::start(&dir.path().join(region), &config(region, 3))).collect();
    let model = rt.block_on(async {
        let clients = connect_all(&nodes).await;
        // Each region takes the writes of its own shard only.
        let key_of = |shard: u32| {
            (0u32..).map(|i| format!("probe-{i}").into_bytes()).find(|key| wire::shard_for(key, 3) == shard).unwrap()
        };
        for (index, client) in clients.iter().enumerate() {
            for (shard, home) in REGIONS.iter().enumerate() {
                let result = client.put(&key_of(shard as u32), b"probe").await;
                if shard == index {
                    result.unwrap();
                } else {
                    match result {
                        Err(ClientError::Server { code: ErrorCode::NotHome, message }) => {
                            assert!(message.contains(&format!("region {home}")), "{message}");
                        }
                        other => panic!(
                            "region {} took a write of shard {shard} (homed at {home}): {other:?}",
                            REGIONS[index]
                        ),
                    }
                }
            }
            let status = client.replication_status().await.unwrap();
            let sources: Vec<(String, u32)> =
                status.sources.iter().map(|source| (source.region.clone(), source.shards)).collect();
            let expected: Vec<(String, u32)> = REGIONS
                .iter()
                .filter(|region| **region != REGIONS[index])
                .map(|region| ((*region).to_owned(), 1))
                .collect();
            assert_eq!(sources, expected, "region {}: one shard from each other region", REGIONS[index]);
        }

        // Writes over all shards, each taken at its home.
        let routed = routed_to_homes(&clients);
        let mut model = BTreeMap::new();
        for (shard, _) in REGIONS.iter().enumerate() {
            model.insert(key_of(shard as u32), b"probe".to_vec());
        }
        let mut last_ts = 0;
        for i in 0..300u32 {
            let key = format!("key-{:04}", i % 200).into_bytes();
            if i % 9 == 4 {
                if model.remove(&key).is_some() {
                    last_ts = last_ts.max(routed.delete(&key).await.unwrap());
                }
                continue;
            }
            let value = format!("value {i} ").repeat(1 + (i as usize % 30)).into_bytes();
            last_ts = last_ts.max(routed.put(&key, &value).await.unwrap());
            model.insert(key, value);
        }
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        last_ts = last_ts.max(routed.put(b"big", &big).await.unwrap());
        model.insert(b"big".to_vec(), big);

        // Every region reads the same snapshot at the last write, and holds the same contents.
        let mut listings = Vec::new();
        for (client, region) in clients.iter().zip(REGIONS) {
            let readable = client.wait_readable(last_ts, Duration::from_secs(20)).await.unwrap();
            assert!(readable.readable_ts >= last_ts, "region {region}");
            assert_eq!(contents(client).await, model, "region {region} differs from the acknowledged writes");
            listings.push(client.list(b"", b"", 10_000, Some(last_ts)).await.unwrap());
        }
        assert_eq!(listings[0].entries.len(), model.len());
        assert!(listings.windows(2).all(|pair| pair[0] == pair[1]), "regions list the snapshot differently");
        model
    });

    // Region b's node (home of shard 1, replica of 0 and 2) is SIGKILLed while a and c take
    // writes, then restarts on its data: it resumes what it replicates and ships its shard
    // again, and every region converges.
    let mut nodes = nodes;
    nodes[1].kill();
    let mut model = rt.block_on(async {
        let mut model = model;
        let (ca, cc) = (connect(&nodes[0]).await, connect(&nodes[2]).await);
        for i in 0..100u32 {
            let key = format!("while-b-down-{i:03}").into_bytes();
            let shard = wire::shard_for(&key, 3);
            let client = match shard {
                0 => &ca,
                2 => &cc,
                _ => continue,
            };
            client.put(&key, b"written while b was down").await.unwrap();
            model.insert(key, b"written while b was down".to_vec());
        }
        model
    });
    nodes[1] = Node::start(&dir.path().join("b"), &config("b", 3));
    rt.block_on(async {
        let clients = connect_all(&nodes).await;
        let routed = routed_to_homes(&clients);
        let mut last_ts = 0;
        for i in 0..60u32 {
            let key = format!("after-restart-{i:03}").into_bytes();
            last_ts = last_ts.max(routed.put(&key, b"after the restart").await.unwrap());
            model.insert(key, b"after the restart".to_vec());
        }
        for (client, region) in clients.iter().zip(REGIONS) {
            client.wait_readable(last_ts, Duration::from_secs(20)).await.unwrap();
            assert_eq!(contents(client).await, model, "region {region} after b's restart");
        }
    });
    for mut node in nodes {
        node.stop();
    }
}

/// Multi-master keys (`[replication] multi_master = ["mm/"]`, every shard homed at a): all
/// three regions write the same keys at once, each through its own node, over a 20 ms WAN
/// (one proxy per direction of each pair of regions). Region c is then cut off entirely while
/// all three keep writing (conflicting writes on both sides of the partition), then healed.
/// Every region ends with the same contents, and each key holds the write with the greatest
/// (timestamp, origin region) among all acknowledged ones, deletes included. Keys outside the
/// keyspace are still written at their home only and replicated from there.
#[test]
fn multi_master_keys_converge_to_the_last_writer_in_every_region() {
    const REGIONS: [&str; 3] = ["a", "b", "c"];
    const KEYS: u32 = 12;
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    platform::tls::generate(&tls, &REGIONS.map(str::to_owned)).unwrap();
    let rt = runtime();
    let listens: Vec<SocketAddr> = REGIONS.iter().map(|_| free_udp_port()).collect();
    // proxies[from][to]: what region `from` dials to reach `to`.
    let link = LinkConfig::with_delay(ONE_WAY);
    let proxies: Vec<Vec<Option<Proxy>>> = rt.block_on(async {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut proxies = Vec::new();
        for from in 0..REGIONS.len() {
            let mut row = Vec::new();
            for (to, listen) in listens.iter().enumerate() {
                let seed = (from * 3 + to) as u64;
                row.push(if from == to {
                    None
                } else {
                    Some(Proxy::start(any, *listen, link, link, seed).await.unwrap())
                });
            }
            proxies.push(row);
        }
        proxies
    });
    let config = |index: usize| {
        let region = REGIONS[index];
        let mut text = format!(
            "shards = 2\n[replication]\nregion = \"{region}\"\nhome = \"a\"\nlisten = \"{}\"\ntls_dir = {tls:?}\n\
             name = \"{region}\"\nrtt_ms = 40\nmulti_master = [\"mm/\"]\norigin = {index}\n",
            listens[index]
        );
        for (to, peer) in REGIONS.iter().enumerate().filter(|(to, _)| *to != index) {
            let addr = proxies[index][to].as_ref().unwrap().addr();
            text.push_str(&format!("[[replication.peers]]\nregion = \"{peer}\"\naddr = \"{addr}\"\norigin = {to}\n"));
        }
        text
    };
    let nodes: Vec<Node> =
        (0..REGIONS.len()).map(|index| Node::start(&dir.path().join(REGIONS[index]), &config(index))).collect();
    let cut_c = |cut: bool| {
        for (from, row) in proxies.iter().enumerate() {
            for (to, proxy) in row.iter().enumerate() {
                if let Some(proxy) = proxy.as_ref().filter(|_| from == 2 || to == 2) {
                    proxy.handle().partition(cut);
                }
            }
        }
    };

    rt.block_on(async {
        let clients = connect_all(&nodes).await;
        // Outside the keyspace a replica still takes no writes; inside it, it does.
        match clients[1].put(b"plain", b"v").await {
            Err(ClientError::Server { code: ErrorCode::NotHome, message }) => assert!(message.contains("region a")),
            other => panic!("a replica took a write outside the multi-master keyspace: {other:?}"),
        }
        let plain_ts = clients[0].put(b"plain", b"written at the home").await.unwrap();

        // Every acknowledged write: (key, timestamp, value; None for a delete), by region.
        type Written = Vec<(Vec<u8>, u64, Option<Vec<u8>>)>;
        // From round 50 on (after every region finished round 49), key i is written only by
        // region i % 3: the last writes of the partition decide, c's included, so each region
        // wins a third of the keys.
        async fn write_rounds(client: &Client, index: usize, rounds: std::ops::Range<u32>) -> Written {
            let region = REGIONS[index];
            let mut written = Vec::new();
            for round in rounds {
                for i in 0..KEYS {
                    if round >= 50 && i as usize % 3 != index {
                        continue;
                    }
                    let key = format!("mm/key-{i:02}").into_bytes();
                    if (round + i) % 7 == 3 {
                        match client.delete(&key).await {
                            Ok(ts) => written.push((key, ts, None)),
                            Err(ClientError::NotFound) => {} // not here (yet): nothing written
                            Err(error) => panic!("delete at {region}: {error}"),
                        }
                        continue;
                    }
                    let value = format!("{region} round {round} key {i}").into_bytes();
                    let ts = client.put(&key, &value).await.unwrap();
                    written.push((key, ts, Some(value)));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            written
        }
        let clients = &clients;
        let all_write = |rounds: std::ops::Range<u32>| async move {
            let (a, b, c) = tokio::join!(
                write_rounds(&clients[0], 0, rounds.clone()),
                write_rounds(&clients[1], 1, rounds.clone()),
                write_rounds(&clients[2], 2, rounds),
            );
            vec![a, b, c]
        };
        // Connected: writes race on the same keys from three regions.
        let mut written: Vec<Written> = all_write(0..20).await;
        // c cut off from both others for 3 s (longer than the connections' idle timeout), all
        // three writing: both sides of the partition take conflicting writes.
        cut_c(true);
        let partitioned = Instant::now();
        // Rounds 50.. start once every region's earlier rounds are acknowledged, so (commit
        // wait) their stamps are above all of those.
        for rounds in [20..50, 50..60] {
            for (region, more) in written.iter_mut().zip(all_write(rounds).await) {
                region.extend(more);
            }
        }
        tokio::time::sleep(Duration::from_secs(3).saturating_sub(partitioned.elapsed())).await;
        assert!(lag_us(&clients[2], "a").await.unwrap_or(u64::MAX) > 1_000_000, "c was cut off from a");
        cut_c(false);

        // Stamps carry their region's origin (a 0, b 1, c 2), so no two regions ever issue the
        // same timestamp.
        let mut stamps = std::collections::HashSet::new();
        for (origin, writes) in written.iter().enumerate() {
            assert!(writes.len() > 400, "region {} wrote only {}", REGIONS[origin], writes.len());
            for (_, ts, _) in writes {
                assert_eq!(wire::glt::origin_of(*ts), origin as u8);
                assert!(stamps.insert(*ts));
            }
        }
        // The winner of each key: the greatest timestamp.
        let mut winners: BTreeMap<Vec<u8>, (u64, Option<Vec<u8>>)> = BTreeMap::new();
        for (key, ts, value) in written.into_iter().flatten() {
            if winners.get(&key).is_none_or(|(best, _)| ts > *best) {
                winners.insert(key, (ts, value));
            }
        }
        let last_ts = winners.values().map(|(ts, _)| *ts).max().unwrap();
        for (key, (ts, _)) in &winners {
            let i: usize = std::str::from_utf8(&key[7..]).unwrap().parse().unwrap();
            assert_eq!(
                wire::glt::origin_of(*ts) as usize,
                i % 3,
                "key {i} was last written by region {}",
                REGIONS[i % 3]
            );
        }

        let mut everywhere = Vec::new();
        for (client, region) in clients.iter().zip(REGIONS) {
            // Readable at the last write: every region's writes up to it are applied here.
            let readable = client.wait_readable(last_ts, Duration::from_secs(20)).await.unwrap();
            assert!(readable.readable_ts >= last_ts.max(plain_ts), "region {region}");
            for (key, (ts, value)) in &winners {
                let got = client.get(key, None).await.unwrap();
                match (value, got) {
                    (Some(value), Some(got)) => {
                        assert_eq!((got.ts, &got.value[..]), (*ts, &value[..]), "region {region}, key {key:?}");
                    }
                    (None, None) => {}
                    (value, got) => panic!("region {region}, key {key:?}: expected {value:?} at {ts}, got {got:?}"),
                }
            }
            let held = contents(client).await;
            assert_eq!(
                held.get(&b"plain"[..]).map(Vec::as_slice),
                Some(&b"written at the home"[..]),
                "region {region}"
            );
            everywhere.push(held);
        }
        assert!(everywhere.windows(2).all(|pair| pair[0] == pair[1]), "the regions diverged");
    });
    let mut nodes = nodes;
    nodes[2].stop();
    // A region's origin is in every stamp it issued: its data directory refuses another one.
    let renumbered = dir.path().join("c.renumbered.toml");
    let text = std::fs::read_to_string(dir.path().join("c.toml")).unwrap();
    std::fs::write(&renumbered, text.replace("origin = 2\n", "origin = 5\n")).unwrap();
    let output =
        std::process::Command::new(env!("CARGO_BIN_EXE_dataplane")).arg("--config").arg(&renumbered).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("stamped with origin 2, not 5"), "{stderr}");
    for mut node in nodes.into_iter().take(2) {
        node.stop();
    }
}

/// The placement's replica regions decide where a shard is kept: shard 0 (home a) is
/// replicated to b and c, shard 1 (home b) to a only, shard 2 (home c) to b only. Each home
/// ships only to its shard's replicas; a region that keeps no copy of a shard refuses its
/// reads and writes (`NotHome`, naming where it is) and counts no source for it; each region,
/// readable at the last write's timestamp, holds exactly its shards' acknowledged writes.
#[test]
fn shards_are_kept_only_in_their_placements_replica_regions() {
    const REGIONS: [&str; 3] = Placed::REGIONS;
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let placement = [("a", vec!["b", "c"]), ("b", vec!["a"]), ("c", vec!["b"])];
    let placed = Placed::start(&rt, dir.path(), &placement);
    let nodes: Vec<Node> =
        REGIONS.iter().map(|region| Node::start(&dir.path().join(region), &placed.config(region, 3))).collect();
    // Which shards each region keeps.
    let kept = |region: &str, shard: usize| {
        let (home, replicas) = &placement[shard];
        *home == region || replicas.contains(&region)
    };
    rt.block_on(async {
        let clients = connect_all(&nodes).await;
        let routed = routed_to_homes(&clients);
        let mut model = BTreeMap::new();
        let mut last_ts = 0;
        for i in 0..150u32 {
            let (key, value) = (format!("key-{i:03}").into_bytes(), format!("value {i}").into_bytes());
            last_ts = last_ts.max(routed.put(&key, &value).await.unwrap());
            model.insert(key, value);
        }
        for (client, region) in clients.iter().zip(REGIONS) {
            let status = client.replication_status().await.unwrap();
            let sources: Vec<(String, u32)> =
                status.sources.iter().map(|source| (source.region.clone(), source.shards)).collect();
            let expected: Vec<(String, u32)> = (0..3)
                .filter(|shard| placement[*shard].0 != region && kept(region, *shard))
                .map(|shard| (placement[shard].0.to_owned(), 1))
                .collect();
            assert_eq!(sources, expected, "region {region} receives only the shards it keeps");
            client.wait_readable(last_ts, Duration::from_secs(20)).await.unwrap();
            for (key, value) in &model {
                let shard = wire::shard_for(key, 3) as usize;
                let got = client.get(key, None).await;
                if kept(region, shard) {
                    assert_eq!(got.unwrap().map(|got| got.value.to_vec()).as_ref(), Some(value), "region {region}");
                } else {
                    match got {
                        Err(ClientError::Server { code: ErrorCode::NotHome, message }) => assert!(
                            message.contains(&format!("shard {shard} is not kept in region {region}")),
                            "{message}"
                        ),
                        other => panic!("region {region} answered a read of shard {shard}, kept elsewhere: {other:?}"),
                    }
                }
            }
        }
        // A region that keeps no copy takes no writes either.
        let key = (0u32..).map(|i| format!("k{i}").into_bytes()).find(|key| wire::shard_for(key, 3) == 2).unwrap();
        match clients[0].put(&key, b"v").await {
            Err(ClientError::Server { code: ErrorCode::NotHome, message }) => {
                assert!(message.contains("takes writes in region c and is replicated to b"), "{message}");
            }
            other => panic!("region a took a write of shard 2: {other:?}"),
        }
    });
    for mut node in nodes {
        node.stop();
    }
}
