//! `meridian cluster ...` against a real control plane: three `controlplane` processes on
//! 127.0.0.1 (QUIC, mutual TLS), a fourth that joins by itself and is removed again.

mod output;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use client::exit_code;
use output::{code, json, stderr, stdout};
use serde_json::Value;
use testkit::LocalCluster;

struct Fixture {
    cluster: LocalCluster,
    /// Drives the cluster's admin client; dropped after the processes are killed.
    _runtime: tokio::runtime::Runtime,
    tls_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn start(size: u64) -> Self {
        let mut dir = tempfile::tempdir().expect("temp dir");
        if std::env::var_os("MERIDIAN_KEEP_TEST_DIRS").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping {}", dir.path().display());
        }
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("test runtime");
        let binary = LocalCluster::binary().expect("the controlplane binary");
        let cluster =
            runtime.block_on(LocalCluster::start(&binary, dir.path(), size, &[])).expect("start the control plane");
        runtime.block_on(cluster.wait_leader(Duration::from_secs(15))).expect("a leader is elected");
        Self { cluster, _runtime: runtime, tls_dir: dir.path().join("tls"), _dir: dir }
    }

    /// `--control` for every node started so far.
    fn control(&self) -> String {
        let addrs: Vec<&str> = self.cluster.ids().into_iter().filter_map(|id| self.cluster.addr(id)).collect();
        addrs.join(",")
    }

    /// Runs `meridian cluster <args>` against the cluster.
    fn meridian(&self, args: &[&str]) -> Output {
        meridian(&["--control", &self.control(), "--tls-dir", path_str(&self.tls_dir)], args)
    }

    fn status(&self) -> Value {
        json(&self.meridian(&["status", "--json"]))
    }

    /// Polls `status --json` until `done` holds; panics after `deadline` with the last status.
    fn wait_status(&self, deadline: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let output = self.meridian(&["status", "--json"]);
            if code(&output) == exit_code::OK {
                let status = json(&output);
                if done(&status) {
                    return status;
                }
                if start.elapsed() > deadline {
                    panic!("{what}: not within {deadline:?}; last status: {status}");
                }
            } else if start.elapsed() > deadline {
                panic!("{what}: not within {deadline:?}; last status failed: {}", stderr(&output));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// Runs `meridian cluster <options> <args>` with the environment cleared of its variables.
fn meridian(options: &[&str], args: &[&str]) -> Output {
    meridian_in("cluster", options, args)
}

/// Runs `meridian <group> <options> <args>` with the environment cleared of its variables.
fn meridian_in(group: &str, options: &[&str], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["--timeout-ms", "10000", group])
        .args(options)
        .args(args)
        .env_remove("MERIDIAN_CONTROL")
        .env_remove("MERIDIAN_TLS_DIR")
        .env_remove("MERIDIAN_TLS_NAME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run meridian")
}

/// Ids of the voters in the leader's membership, sorted.
fn voters(status: &Value) -> Vec<u64> {
    let mut ids: Vec<u64> = status["members"]
        .as_array()
        .expect("members array")
        .iter()
        .filter(|member| member["voter"] == Value::Bool(true))
        .map(|member| member["id"].as_u64().expect("member id"))
        .collect();
    ids.sort_unstable();
    ids
}

#[test]
fn status_add_and_remove_against_a_real_control_plane() {
    let mut fixture = Fixture::start(3);

    // The leader and three voters, each answering for itself.
    let status = fixture.status();
    assert_eq!(status["role"], "leader", "{status}");
    assert_eq!(status["leader"], status["node_id"], "{status}");
    assert_eq!(voters(&status), [1, 2, 3], "{status}");
    let members_status = status["members_status"].as_array().expect("members_status array");
    assert_eq!(members_status.len(), 3, "{status}");
    assert!(members_status.iter().all(|m| m["reachable"] == Value::Bool(true)), "{status}");
    assert_eq!(members_status.iter().filter(|m| m["role"] == "leader").count(), 1, "{status}");
    assert!(status["meta"]["data_nodes"].is_object() && status["glts_local_source"].is_string(), "{status}");

    // The human form names the leader and lists the members.
    let text = fixture.meridian(&["status"]);
    assert_eq!(code(&text), exit_code::OK, "{}", stderr(&text));
    let text = stdout(&text);
    assert!(text.starts_with(&format!("leader {} at ", status["node_id"])), "{text}");
    assert!(text.contains("members (3 voters, 0 learners):"), "{text}");
    assert!(text.contains("snapshot catalog (0): none"), "{text}");

    // Regions and placement: committed, shown by status; a placement naming an unknown
    // region is refused (exit 4) and changes nothing.
    let region = fixture.meridian(&["region", "eu", "--zones", "a,b"]);
    assert_eq!(code(&region), exit_code::OK, "{}", stderr(&region));
    assert!(stdout(&region).starts_with("region eu with zones a,b: committed at log index "), "{}", stdout(&region));
    let placed = fixture.meridian(&["place", "3", "--home", "eu", "--json"]);
    assert_eq!(json(&placed)["committed"]["op"], "set_placement", "{}", stdout(&placed));
    let refused = fixture.meridian(&["place", "4", "--home", "eu", "--replicas", "mars"]);
    assert_eq!(code(&refused), exit_code::REFUSED, "{}", stderr(&refused));
    assert!(stderr(&refused).contains("mars"), "{}", stderr(&refused));
    let meta = &fixture.status()["meta"];
    assert_eq!(meta["regions"]["eu"]["zones"], serde_json::json!(["a", "b"]), "{meta}");
    assert_eq!(meta["placement"]["3"]["home"], "eu", "{meta}");
    assert!(meta["placement"].get("4").is_none(), "{meta}");

    // A node that does not run is not added (it would count against the quorum).
    let port = testkit::ports::free_udp_port().expect("free port");
    let down = fixture.meridian(&["add-node", "--id", "9", "--addr", &format!("127.0.0.1:{port}")]);
    assert_eq!(code(&down), exit_code::UNAVAILABLE, "{}", stderr(&down));
    assert!(stderr(&down).contains("node 9 does not answer"), "{}", stderr(&down));
    assert_eq!(voters(&fixture.status()), [1, 2, 3]);

    // A fourth node started with --seed joins by itself, through joint consensus.
    let addr4 = fixture.cluster.spawn_joining(4).expect("start node 4");
    let status = fixture.wait_status(Duration::from_secs(15), "node 4 joins", |s| voters(s) == [1, 2, 3, 4]);
    let member4 = status["members"].as_array().and_then(|m| m.iter().find(|m| m["id"] == 4)).cloned();
    assert_eq!(member4.map(|m| m["addr"].clone()), Some(Value::from(addr4.as_str())), "{status}");

    // Removed again.
    let removed = fixture.meridian(&["remove-node", "--id", "4"]);
    assert_eq!(code(&removed), exit_code::OK, "{}", stderr(&removed));
    assert_eq!(stdout(&removed).trim(), "node 4 is no longer a member");
    let status = fixture.wait_status(Duration::from_secs(10), "node 4 removed", |s| voters(s) == [1, 2, 3]);
    assert!(status["members"].as_array().is_some_and(|m| m.iter().all(|m| m["id"] != 4)), "{status}");

    // And added back by hand (it still runs), as JSON.
    let added = fixture.meridian(&["add-node", "--id", "4", "--addr", &addr4, "--json"]);
    assert_eq!(json(&added), serde_json::json!({"action": "add_node", "id": 4, "addr": addr4}));
    fixture.wait_status(Duration::from_secs(10), "node 4 added back", |s| voters(s) == [1, 2, 3, 4]);
}

#[test]
fn snapshots_are_created_listed_and_shown_through_the_leader() {
    let fixture = Fixture::start(3);
    let snapshot = |args: &[&str]| {
        meridian_in("snapshot", &["--control", &fixture.control(), "--tls-dir", path_str(&fixture.tls_dir)], args)
    };
    assert_eq!(code(&fixture.meridian(&["region", "eu", "--zones", "a"])), exit_code::OK);

    // No data node serves eu, so the snapshot stays pending there (the leader keeps asking).
    let created = snapshot(&["create", "--json"]);
    assert_eq!(code(&created), exit_code::OK, "{}", stderr(&created));
    let created = json(&created);
    assert_eq!(created["id"], 0);
    assert_eq!(created["regions"]["eu"], "pending");
    let glt = created["glt"].as_u64().expect("glt");
    let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_micros();
    let physical_us = u128::from(glt >> 12);
    assert!(physical_us <= now_us + 1_000_000 && physical_us + 60_000_000 > now_us, "glt {glt} is about now");

    let text = snapshot(&["create", "--lead-ms", "50"]);
    assert_eq!(code(&text), exit_code::OK, "{}", stderr(&text));
    assert!(stdout(&text).starts_with("snapshot 1 at "), "{}", stdout(&text));

    let list = json(&snapshot(&["list", "--json"]));
    let ids: Vec<u64> = list["snapshots"].as_array().expect("list").iter().map(|s| s["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [0, 1]);
    let later = list["snapshots"][1]["glt"].as_u64().expect("glt");
    assert!(later > glt + (50_000 << 12) - (1 << 12), "--lead-ms 50 moves the timestamp: {glt} then {later}");

    let shown = snapshot(&["show", "0"]);
    assert_eq!(code(&shown), exit_code::OK, "{}", stderr(&shown));
    assert!(stdout(&shown).contains(&format!("glt      {glt}")) && stdout(&shown).contains("eu=pending"));
    let unknown = snapshot(&["show", "9"]);
    assert_eq!(code(&unknown), exit_code::REFUSED, "{}", stderr(&unknown));
    assert!(stderr(&unknown).contains("no snapshot 9 in the catalog"), "{}", stderr(&unknown));
}

/// A standalone `dataplane` (built next to the test, as `LocalCluster::binary` does); its
/// shard 0 address and the child, killed on drop.
struct DataNode {
    _child: testkit::process::ChildGuard,
    addr: String,
}

impl DataNode {
    fn start(dir: &Path) -> Self {
        let exe = std::env::current_exe().expect("test path");
        let profile = exe.parent().and_then(Path::parent).expect("target/<profile>");
        let binary = profile.join("dataplane");
        if !binary.exists() {
            let mut cargo = Command::new(env!("CARGO"));
            cargo.args(["build", "-p", "dataplane", "--bin", "dataplane"]);
            if profile.file_name().is_some_and(|name| name == "release") {
                cargo.arg("--release");
            }
            assert!(cargo.status().expect("cargo build").success());
        }
        let mut child = Command::new(binary)
            .args(["--data-dir", path_str(dir), "--listen", "127.0.0.1:0", "--shards", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dataplane");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("READY line");
        let addr = line.trim().strip_prefix("READY ").expect("READY").split(',').next().expect("shard 0").to_owned();
        Self { _child: testkit::process::ChildGuard::new("dataplane", child, dir.with_extension("log")), addr }
    }
}

#[test]
fn snapshot_reads_see_the_snapshot_not_later_writes() {
    let fixture = Fixture::start(3);
    let data = tempfile::tempdir().expect("temp dir");
    let node = DataNode::start(data.path());
    let data_cmd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["--addr", &node.addr, "--timeout-ms", "10000"])
            .args(args)
            .env_remove("MERIDIAN_ADDR")
            .output()
            .expect("run meridian")
    };
    let snapshot = |args: &[&str]| {
        let flags = ["--control", &fixture.control(), "--tls-dir", path_str(&fixture.tls_dir)];
        Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["--addr", &node.addr, "--timeout-ms", "10000", "snapshot"])
            .args(flags)
            .args(args)
            .env_remove("MERIDIAN_ADDR")
            .env_remove("MERIDIAN_CONTROL")
            .env_remove("MERIDIAN_TLS_DIR")
            .output()
            .expect("run meridian")
    };
    for (key, value) in [("k/a", "one"), ("k/b", "two"), ("k/c", "three")] {
        assert_eq!(code(&data_cmd(&["put", key, "--value", value])), exit_code::OK);
    }
    let created = json(&snapshot(&["create", "--json"]));
    let id = created["id"].as_u64().expect("id").to_string();
    assert_eq!(code(&data_cmd(&["put", "k/a", "--value", "changed"])), exit_code::OK);
    assert_eq!(code(&data_cmd(&["rm", "k/b"])), exit_code::OK);
    assert_eq!(code(&data_cmd(&["put", "k/d", "--value", "later"])), exit_code::OK);

    let got = snapshot(&["get", &id, "k/a"]);
    assert_eq!(code(&got), exit_code::OK, "{}", stderr(&got));
    assert_eq!(got.stdout, b"one");
    let listed = snapshot(&["ls", &id, "k/"]);
    assert_eq!(code(&listed), exit_code::OK, "{}", stderr(&listed));
    let text = stdout(&listed);
    let keys: Vec<&str> = text.lines().map(|line| line.split('\t').next().unwrap_or("")).collect();
    assert_eq!(keys, ["k/a", "k/b", "k/c"]);
    let latest = data_cmd(&["get", "k/a"]);
    assert_eq!(latest.stdout, b"changed");
    let missing = snapshot(&["get", &id, "k/d"]);
    assert_eq!(code(&missing), exit_code::NOT_FOUND, "{}", stderr(&missing));
}

#[test]
fn the_leader_takes_scheduled_snapshots() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let binary = LocalCluster::binary().expect("the controlplane binary");
    let cluster = runtime
        .block_on(LocalCluster::start(&binary, dir.path(), 3, &["--snapshot-every-ms", "100"]))
        .expect("start the control plane");
    runtime.block_on(cluster.wait_leader(Duration::from_secs(15))).expect("a leader is elected");
    let seen = runtime.block_on(async {
        let started = Instant::now();
        loop {
            let meta = cluster.client().read(true, Duration::from_secs(5)).await.expect("read");
            if meta.snapshots.len() >= 5 || started.elapsed() > Duration::from_secs(20) {
                return meta.snapshots;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert!(seen.len() >= 5, "{} scheduled snapshots in 20 s", seen.len());
    let glts: Vec<u64> = seen.values().map(|snapshot| snapshot.glt).collect();
    assert!(glts.windows(2).all(|pair| pair[0] < pair[1]), "timestamps grow: {glts:?}");
}

#[test]
fn bad_tls_dir_and_missing_options_are_clear_errors() {
    let missing = tempfile::tempdir().expect("temp dir");
    let tls_dir = missing.path().join("no-such-dir");
    let output = meridian(&["--control", "127.0.0.1:9", "--tls-dir", path_str(&tls_dir)], &["status"]);
    assert_eq!(code(&output), exit_code::OTHER, "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.starts_with("meridian: cluster status: cannot load the TLS identity \"admin\""), "{message}");
    assert!(message.contains(path_str(&tls_dir.join("ca.pem"))), "{message}");
    assert!(stdout(&output).is_empty());

    let output = meridian(&["--tls-dir", path_str(missing.path())], &["status"]);
    assert_eq!(code(&output), exit_code::USAGE, "{}", stderr(&output));
    assert!(stderr(&output).contains("--control"), "{}", stderr(&output));

    let output = meridian(&["--control", "127.0.0.1:9"], &["remove-node", "--id", "2"]);
    assert_eq!(code(&output), exit_code::USAGE, "{}", stderr(&output));
    assert!(stderr(&output).contains("--tls-dir"), "{}", stderr(&output));
}

#[test]
fn replica_sets_are_placed_over_zones_and_shown_per_shard() {
    let fixture = Fixture::start(1);
    let region = fixture.meridian(&["region", "eu", "--zones", "z1,z2,z3"]);
    assert_eq!(code(&region), exit_code::OK, "{}", stderr(&region));
    let none = fixture.meridian(&["shards"]);
    assert!(stdout(&none).starts_with("no replica sets placed"), "{}", stdout(&none));

    // Without data nodes: refused, naming what is missing.
    let refused = fixture.meridian(&["place-sets", "--region", "eu", "--shards", "8"]);
    assert_eq!(code(&refused), exit_code::REFUSED, "{}", stderr(&refused));
    assert!(stderr(&refused).contains("0 up data nodes, fewer than min_replicas 2"), "{}", stderr(&refused));

    for (id, zone) in [("n1", "z1"), ("n2", "z2"), ("n3", "z3"), ("n4", "z1")] {
        let register = controlapi::meta::Command::RegisterDataNode {
            id: id.into(),
            addr: "127.0.0.1:1".into(),
            region: "eu".into(),
            zone: zone.into(),
            shards: 1,
            capacity_bytes: 1 << 30,
            replica_addr: String::new(),
        };
        let (outcome, _) =
            fixture._runtime.block_on(fixture.cluster.client().propose(register, Duration::from_secs(10))).unwrap();
        assert_eq!(outcome, controlapi::meta::Outcome::Done);
    }
    let placed = fixture.meridian(&["place-sets", "--region", "eu", "--shards", "8"]);
    assert_eq!(code(&placed), exit_code::OK, "{}", stderr(&placed));
    let sets = json(&fixture.meridian(&["shards", "--json"]));
    let zone = |node: &Value| match node.as_str().unwrap() {
        "n1" | "n4" => "z1",
        "n2" => "z2",
        _ => "z3",
    };
    let shards = sets["eu"].as_object().expect("sets of eu");
    assert_eq!(shards.len(), 8, "{sets}");
    for config in shards.values() {
        let members = config["members"].as_array().unwrap();
        let zones: std::collections::BTreeSet<&str> = members.iter().map(zone).collect();
        assert_eq!((members.len(), zones.len(), &config["epoch"]), (3, 3, &Value::from(1)), "{config}");
    }

    // Five copies where four nodes are up: placed, shown under-replicated.
    let more = fixture.meridian(&["place-sets", "--region", "eu", "--shards", "10", "--replicas", "5"]);
    assert_eq!(code(&more), exit_code::OK, "{}", stderr(&more));
    let text = stdout(&fixture.meridian(&["shards", "--region", "eu"]));
    assert_eq!(text.lines().filter(|line| line.ends_with(" ok")).count(), 8, "{text}");
    assert_eq!(text.lines().filter(|line| line.ends_with("under-replicated: 4 of 5 copies")).count(), 2, "{text}");
    let unknown = fixture.meridian(&["shards", "--region", "mars"]);
    assert_eq!(code(&unknown), exit_code::REFUSED, "{}", stderr(&unknown));
}
