//! Multi-process tests: real `controlplane` processes on 127.0.0.1 over QUIC with mutual TLS,
//! SIGKILLed and restarted.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use controlapi::meta::{Command, SnapshotStatus};
use controlapi::rpc::{Request, Response};
use testkit::LocalCluster;

const SECOND: Duration = Duration::from_secs(1);
const BIN: &str = env!("CARGO_BIN_EXE_controlplane");

fn set(key: &str, value: &str) -> Command {
    Command::SetConfig { key: key.into(), value: value.into() }
}

async fn cluster(size: u64) -> Result<(tempfile::TempDir, LocalCluster)> {
    cluster_with(size, &[]).await
}

async fn cluster_with(size: u64, args: &[&str]) -> Result<(tempfile::TempDir, LocalCluster)> {
    let mut dir = tempfile::tempdir()?;
    if std::env::var_os("MERIDIAN_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    let cluster = LocalCluster::start(std::path::Path::new(BIN), dir.path(), size, args).await?;
    cluster.wait_leader(Duration::from_secs(10)).await?;
    Ok((dir, cluster))
}

/// Writes until one commits; returns how long it took.
async fn first_commit(cluster: &LocalCluster, key: &str) -> Result<Duration> {
    let start = Instant::now();
    cluster.client().write(set(key, "v"), Duration::from_secs(10)).await?;
    Ok(start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kills_elect_a_new_leader_within_2s_and_lose_nothing() -> Result<()> {
    let rounds: usize = std::env::var("MERIDIAN_LEADER_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let (_dir, mut cluster) = cluster(3).await?;
    let mut committed = Vec::new();
    let mut longest = Duration::ZERO;
    for round in 0..rounds {
        for i in 0..5 {
            let key = format!("r{round}/k{i}");
            cluster.client().write(set(&key, &round.to_string()), Duration::from_secs(10)).await?;
            committed.push(key);
        }
        let leader = cluster.wait_leader(Duration::from_secs(5)).await?;
        cluster.kill(leader)?;
        let killed_at = Instant::now();
        println!("[{}] killed {leader}", controlapi::timesource::unix_ms());
        let new_leader = cluster.wait_leader(Duration::from_secs(5)).await?;
        let elected = killed_at.elapsed();
        assert_ne!(new_leader, leader);
        // The first write after the kill commits only once a new leader serves.
        first_commit(&cluster, &format!("r{round}/after")).await?;
        let election = killed_at.elapsed();
        committed.push(format!("r{round}/after"));
        longest = longest.max(election);
        println!(
            "round {round}: killed leader {leader}; {new_leader} elected after {elected:?}, first commit after {election:?}"
        );
        assert!(
            election < Duration::from_secs(2),
            "round {round}: a new leader served {election:?} after the kill\n{}",
            cluster.log_tail(new_leader)
        );
        cluster.restart(leader)?;
    }
    let state = cluster.client().read(true, Duration::from_secs(10)).await?;
    for key in &committed {
        assert!(state.config.contains_key(key), "committed key {key} lost");
    }
    println!("{rounds} leader kills: longest kill-to-first-commit {longest:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_cannot_commit_and_the_majority_goes_on() -> Result<()> {
    let (_dir, cluster) = cluster(3).await?;
    cluster.client().write(set("before", "1"), Duration::from_secs(10)).await?;
    let old = cluster.wait_leader(Duration::from_secs(5)).await?;
    let old_addr = cluster.addr(old).context("addr")?.to_owned();
    let isolate = |isolated| Request::Isolate { isolated };
    assert!(matches!(cluster.client().call_node(&old_addr, &isolate(true), SECOND).await?, Response::Ok));
    // The old leader, cut off, cannot commit.
    let response = cluster.client().call_node(&old_addr, &Request::Write(set("minority", "1")), 10 * SECOND).await?;
    match response {
        Response::Error { message } => assert!(message.contains("not committed"), "{message}"),
        Response::NotLeader { .. } => {}
        other => bail!("the isolated leader answered {other:?}"),
    }
    // The majority elects another leader and commits.
    let start = Instant::now();
    let new = loop {
        let leader = cluster.wait_leader(Duration::from_secs(5)).await?;
        if leader != old {
            break leader;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let new_addr = cluster.addr(new).context("addr")?.to_owned();
    let response = cluster.client().call_node(&new_addr, &Request::Write(set("majority", "1")), 10 * SECOND).await?;
    assert!(matches!(response, Response::Written { .. }), "{response:?}");
    println!("majority leader {new} committed {:?} after the isolation", start.elapsed());
    // Heal: the old leader steps down, drops its uncommitted entry and catches up.
    assert!(matches!(cluster.client().call_node(&old_addr, &isolate(false), SECOND).await?, Response::Ok));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = cluster.client().status_of(&old_addr).await?;
        if status.role == controlapi::rpc::Role::Follower && status.meta.config.contains_key("majority") {
            assert!(!status.meta.config.contains_key("minority"), "an uncommitted write was applied");
            break;
        }
        if Instant::now() > deadline {
            bail!("the old leader did not catch up: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = cluster.client().read(true, Duration::from_secs(10)).await?;
    assert!(state.config.contains_key("before") && state.config.contains_key("majority"));
    assert!(!state.config.contains_key("minority"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_from_its_disk_and_the_leader() -> Result<()> {
    let (_dir, mut cluster) = cluster(3).await?;
    for i in 0..50 {
        cluster.client().write(set(&format!("a{i}"), "1"), Duration::from_secs(10)).await?;
    }
    let leader = cluster.wait_leader(Duration::from_secs(5)).await?;
    let follower = cluster.ids().into_iter().find(|id| *id != leader).context("follower")?;
    cluster.kill(follower)?;
    for i in 0..50 {
        cluster.client().write(set(&format!("b{i}"), "1"), Duration::from_secs(10)).await?;
    }
    cluster.restart(follower)?;
    let leader_state = cluster.client().read(true, Duration::from_secs(10)).await?;
    cluster.wait_caught_up(follower, &leader_state, Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glts_on_loopback_holds_true_time_and_reports_its_width() -> Result<()> {
    let (_dir, cluster) = cluster(3).await?;
    let glts = cluster.glts_client(Duration::from_millis(20))?;
    // All processes share this machine's clock, so CLOCK_REALTIME is the true time here.
    let mut widths_ns = Vec::new();
    let mut last_glt = 0;
    let mut hlc = controlapi::glts::Hlc::default();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let before = controlapi::timesource::realtime_ns();
        let Ok(interval) = glts.now() else { continue };
        let after = controlapi::timesource::realtime_ns();
        assert!(
            interval.earliest_ns <= after && before <= interval.latest_ns,
            "{interval:?} misses [{before}, {after}]"
        );
        widths_ns.push(interval.width_ns());
        if hlc.wait_us(interval) > 0 {
            continue;
        }
        let glt = hlc.tick(interval.latest_us());
        assert!(glt > last_glt, "GLTs must increase: {glt} after {last_glt}");
        last_glt = glt;
    }
    assert!(widths_ns.len() > 100, "too few intervals: {}", widths_ns.len());
    widths_ns.sort_unstable();
    let pct = |p: usize| widths_ns[(widths_ns.len() - 1) * p / 100] as f64 / 1000.0;
    println!("GLTS width on loopback over {} samples: p50 {:.0} µs, p99 {:.0} µs", widths_ns.len(), pct(50), pct(99));
    // The commit wait ends only once the earliest bound is past the timestamp.
    while !glts.now()?.has_passed(last_glt) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(glts.now()?.earliest_glt() > last_glt);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_nodes_register_heartbeat_hold_leases_and_go_suspect_then_dead() -> Result<()> {
    use controlapi::meta::{NodeState, Outcome};
    let (_dir, cluster) = cluster_with(3, &["--suspect-after-ms", "600", "--dead-after-ms", "1500"]).await?;
    let client = cluster.client();
    let deadline = 10 * SECOND;
    client.write(Command::PutRegion { name: "eu".into(), zones: vec!["a".into()] }, deadline).await?;
    for id in ["d1", "d2"] {
        let register = Command::RegisterDataNode {
            id: id.into(),
            addr: "127.0.0.1:7700".into(),
            region: "eu".into(),
            zone: "a".into(),
            shards: 2,
            capacity_bytes: 1 << 40,
            replica_addr: String::new(),
        };
        client.write(register, deadline).await?;
    }
    let lease = |holder: &str| Command::AcquireLease { shard: 0, holder: holder.into(), duration_ms: 60_000 };
    let (granted, _) = client.write(lease("d1"), deadline).await?;
    assert!(matches!(granted, Outcome::Lease { epoch: 1, .. }), "{granted:?}");
    assert!(client.write(lease("d2"), deadline).await.is_err(), "a held lease was granted to another node");
    // d1 heartbeats, d2 does not: d2 goes suspect, then dead; d1 stays up.
    let start = Instant::now();
    let mut seen_suspect = false;
    loop {
        let response =
            client.call(&Request::Heartbeat { id: "d1".into(), wal_bytes: 0, replicas: Vec::new() }, deadline).await?;
        assert!(matches!(response, Response::Ok), "{response:?}");
        let state = client.read(true, deadline).await?;
        assert_eq!(state.data_nodes["d1"].state, NodeState::Up);
        match state.data_nodes["d2"].state {
            NodeState::Suspect => seen_suspect = true,
            NodeState::Dead => break,
            NodeState::Up => {}
        }
        if start.elapsed() > 10 * SECOND {
            bail!("d2 never went dead: {:?}", state.data_nodes["d2"]);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen_suspect, "d2 went dead without being suspect first");
    // An unregistered node's heartbeat is refused.
    let response =
        client.call(&Request::Heartbeat { id: "nobody".into(), wal_bytes: 0, replicas: Vec::new() }, deadline).await?;
    assert!(matches!(response, Response::Error { .. }), "{response:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_compact_the_log_and_bring_a_far_behind_node_back() -> Result<()> {
    let (dir, mut cluster) = cluster_with(3, &["--snapshot-after-entries", "40", "--keep-after-snapshot", "5"]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(5)).await?;
    let behind = cluster.ids().into_iter().find(|id| *id != leader).context("follower")?;
    cluster.kill(behind)?;
    for i in 0..150 {
        cluster.client().write(set(&format!("s{i}"), "1"), 10 * SECOND).await?;
    }
    // The leader has snapshotted and purged what the stopped node lacks.
    let leader_dir = dir.path().join(format!("cp{leader}"));
    assert!(leader_dir.join("snapshot.bin").exists(), "no snapshot written");
    cluster.restart(behind)?;
    let leader_state = cluster.client().read(true, 10 * SECOND).await?;
    cluster.wait_caught_up(behind, &leader_state, 15 * SECOND).await?;
    assert!(dir.path().join(format!("cp{behind}")).join("snapshot.bin").exists(), "no snapshot installed");
    // A restart of the whole cluster comes back from snapshots plus logs.
    for id in cluster.ids() {
        cluster.kill(id)?;
    }
    for id in cluster.ids() {
        cluster.restart(id)?;
    }
    cluster.wait_leader(10 * SECOND).await?;
    let state = cluster.client().read(true, 10 * SECOND).await?;
    assert_eq!(state, leader_state);
    Ok(())
}

/// A snapshot still pending when its leader dies is followed by the next leader: here a region
/// with no data node, which the new leader marks failed after the (shortened) tracking limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_follows_the_snapshots_its_predecessor_left_pending() -> Result<()> {
    let (_dir, mut cluster) = cluster_with(3, &["--snapshot-track-timeout-ms", "3000"]).await?;
    let client = cluster.client().clone();
    client.write(Command::PutRegion { name: "mars".into(), zones: vec!["z".into()] }, Duration::from_secs(10)).await?;
    let leader = cluster.wait_leader(Duration::from_secs(5)).await?;
    let (id, _) = client.create_snapshot(0, Duration::from_secs(10)).await?;
    cluster.kill(leader)?;
    let new_leader = cluster.wait_leader(Duration::from_secs(5)).await?;
    assert_ne!(new_leader, leader);
    let started = Instant::now();
    loop {
        let meta = client.read(true, Duration::from_secs(5)).await?;
        let status = meta.snapshots.get(&id).map(|snapshot| snapshot.regions["mars"]);
        if status == Some(SnapshotStatus::Failed) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "snapshot {id} still {status:?} in mars 20 s after the leader died\n{}",
            cluster.log_tail(new_leader)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// One heartbeat of `id` reporting shard 0 of its region's sets.
async fn report(
    client: &controlapi::client::ControlClient,
    id: &str,
    (epoch, end): (u64, u64),
    leading: Option<u64>,
    wants_new_epoch: bool,
) -> Result<Response> {
    use controlapi::replica::{LogShape, ReplicaReport};
    let log = LogShape { epochs: vec![(1, 1)], end };
    let replicas = vec![ReplicaReport { shard: 0, epoch, log, leading, wants_new_epoch }];
    Ok(client.call(&Request::Heartbeat { id: id.into(), wal_bytes: 0, replicas }, 10 * SECOND).await?)
}

/// Rounds of heartbeats from every member, the primary leading epoch 1.
async fn heartbeat_rounds(
    client: &controlapi::client::ControlClient,
    primary: &str,
    backups: &[String],
    rounds: u32,
) -> Result<()> {
    for _ in 0..rounds {
        let answer = report(client, primary, (1, 10), Some(1), false).await?;
        let Response::Sets { sets, lease_ms } = answer else { bail!("the primary's heartbeat answered {answer:?}") };
        assert_eq!((sets.len(), lease_ms), (1, 1000), "{sets:?}");
        report(client, &backups[0], (1, 9), None, false).await?;
        report(client, &backups[1], (1, 8), None, false).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The backups report (at `epoch`, the first saying it restarted as primary when
/// `first_restarted`) until shard 0's set reaches `until_epoch`; the set then.
async fn backups_report_until_epoch(
    client: &controlapi::client::ControlClient,
    backups: &[String],
    (epoch, first_restarted): (u64, bool),
    until_epoch: u64,
) -> Result<controlapi::replica::SetConfig> {
    let started = Instant::now();
    loop {
        report(client, &backups[0], (epoch, 9), None, first_restarted).await?;
        report(client, &backups[1], (epoch, 8), None, false).await?;
        let now = client.read(true, 10 * SECOND).await?.replica_sets["eu"][&0].clone();
        if now.epoch >= until_epoch {
            return Ok(now);
        }
        if started.elapsed() > 10 * SECOND {
            bail!("shard 0's set did not reach epoch {until_epoch} within 10 s: {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_set_primary_holds_its_lease_by_heartbeat_and_a_lapse_promotes_the_newest_member() -> Result<()> {
    use controlapi::meta::Outcome;
    let (_dir, mut cluster) = cluster(3).await?;
    let deadline = 10 * SECOND;
    let zones = vec!["z1".into(), "z2".into(), "z3".into()];
    cluster.client().write(Command::PutRegion { name: "eu".into(), zones }, deadline).await?;
    for (id, zone) in [("d1", "z1"), ("d2", "z2"), ("d3", "z3")] {
        let register = Command::RegisterDataNode {
            id: id.into(),
            addr: "127.0.0.1:7700".into(),
            region: "eu".into(),
            zone: zone.into(),
            shards: 1,
            capacity_bytes: 1 << 40,
            replica_addr: String::new(),
        };
        cluster.client().write(register, deadline).await?;
    }
    let place = Command::PlaceReplicaSets { region: "eu".into(), shards: 1, replicas: 3, min_replicas: 2 };
    assert_eq!(cluster.client().write(place, deadline).await?.0, Outcome::Done);
    let set = |state: &controlapi::meta::MetaState| state.replica_sets["eu"][&0].clone();
    let first = set(&cluster.client().read(true, deadline).await?);
    let primary = first.primary.clone();
    let backups: Vec<String> = first.members.iter().filter(|node| **node != primary).cloned().collect();

    // Every member heartbeats; the primary leads epoch 1. Through a leader's death too: the
    // new leader gives the primary a whole lease before judging it.
    heartbeat_rounds(cluster.client(), &primary, &backups, 10).await?;
    let leader = cluster.wait_leader(Duration::from_secs(5)).await?;
    cluster.kill(leader)?;
    cluster.wait_leader(Duration::from_secs(5)).await?;
    heartbeat_rounds(cluster.client(), &primary, &backups, 12).await?;
    assert_eq!(set(&cluster.client().read(true, deadline).await?), first, "promoted while the primary heartbeated");

    // The primary falls silent: within its lease and the monitor's period, the backup with
    // the newest log leads epoch 2, and the silent primary is a learner.
    let lapsed = Instant::now();
    let promoted = backups_report_until_epoch(cluster.client(), &backups, (1, false), 2).await?;
    let took = lapsed.elapsed();
    eprintln!("promoted {took:?} after the primary's last heartbeat (lease 1000 ms)");
    assert_eq!((promoted.epoch, &promoted.primary), (2, &backups[0]), "{promoted:?}");
    assert_eq!(promoted.learners, vec![primary.clone()], "{promoted:?}");
    assert!(took >= Duration::from_millis(800), "promoted {took:?} after the last heartbeat, within the lease");

    // The new primary restarts and asks for a new epoch: promoted again at once, itself a
    // candidate.
    let again = backups_report_until_epoch(cluster.client(), &backups, (2, true), 3).await?;
    assert_eq!((again.epoch, &again.primary), (3, &backups[0]), "{again:?}");
    Ok(())
}
