//! Inter-region replication through real processes and real QUIC: three regions (one
//! `dataplane` each), the home region's streams to the other two through the WAN proxy
//! (20 ms one way), a 30 s partition of one region while writes go on, then heal: every
//! acknowledged write is in every region, the contents are identical, and the lag is back
//! under target within 2 s. Also: replicas refuse client writes, and a peer whose certificate
//! comes from another CA is refused.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use client::{Client, ClientError, ErrorCode};
use common::process::{Node, connect, runtime};
use controlplane::ops::metrics::{sample, scrape};
use wan::{LinkConfig, Proxy};

const ONE_WAY: Duration = Duration::from_millis(20);
/// The lag the test asks for after the heal (the bench measures the real distribution).
const LAG_TARGET_US: u64 = 200_000;

fn free_udp_port() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
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
    controlplane::tls::generate(&tls, &["a".into(), "b".into(), "c".into()]).unwrap();
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
    let mut c = Node::start(&dir.path().join("c"), &region_config("c", listen_c, &tls, &[("a", free_udp_port())]));
    let config_a = region_config("a", free_udp_port(), &tls, &[("b", to_b.addr()), ("c", to_c.addr())]) + metrics;
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
    controlplane::tls::generate(&rogue, &["b".into()]).unwrap();
    rt.block_on(async {
        let identity = controlplane::tls::Identity::in_dir(&rogue, "b");
        let config =
            identity.client_config_for(dataplane::repl::shell::ALPN, quinn::TransportConfig::default()).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        let connecting = endpoint.connect(listen_b, controlplane::tls::SERVER_NAME).unwrap();
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
    let rtt = sample(&scrape_b, "meridian_quic_rtt_seconds", "peer=\"a\"").expect("QUIC RTT at b");
    assert!((0.035..1.0).contains(&rtt), "QUIC RTT {rtt} s through a 40 ms round trip");
    let scrape_a = scrape(a.metrics.unwrap()).unwrap();
    for peer in ["b", "c"] {
        let labels = format!("peer=\"{peer}\"");
        let raw = sample(&scrape_a, "meridian_replication_raw_bytes_total", &labels).unwrap();
        let wire = sample(&scrape_a, "meridian_replication_wire_bytes_total", &labels).unwrap();
        assert!(raw > 100_000.0 && wire > 0.0, "shipped to {peer}: {raw} raw, {wire} on the wire");
        assert!(sample(&scrape_a, "meridian_quic_sent_bytes_total", &labels).unwrap() > 0.0);
    }
    b.stop();
}

/// Every 5th batch leaves the home with a byte flipped after its checksum: the replica rejects
/// the frame, the stream restarts from the last acknowledgement, and nothing is lost.
#[test]
fn corrupted_frames_are_rejected_and_the_stream_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    controlplane::tls::generate(&tls, &["a".into(), "b".into()]).unwrap();
    let listen_b = free_udp_port();
    let b = Node::start_logged(&dir.path().join("b"), &region_config("b", listen_b, &tls, &[]), &[]);
    let a = Node::start_logged(
        &dir.path().join("a"),
        &region_config("a", free_udp_port(), &tls, &[("b", listen_b)]),
        &[(dataplane::repl::shell::CORRUPT_EVERY_ENV, "5")],
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
