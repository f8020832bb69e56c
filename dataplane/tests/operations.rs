//! Operating a real `dataplane` process: systemd's notify protocol (READY only after recovery,
//! WATCHDOG pings, STOPPING), the Prometheus endpoint under a workload, SIGTERM during a write
//! load, and the unit files under `systemd-analyze verify`.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use platform::metrics::{sample, scrape};
use platform::notify::Collector;

mod common;

use common::process::{Node, connect, runtime};

#[test]
fn ready_comes_only_after_recovery_and_the_watchdog_keeps_pinging() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Enough WAL to replay (no checkpoint in between) that recovery takes real work.
    let config = "shards = 2\n[store]\ncheckpoint_wal_bytes = 1073741824\n";
    let runtime = runtime();
    let keys = 3000;
    {
        let node = Node::start(&data, config);
        runtime.block_on(async {
            let client = connect(&node).await;
            for chunk in (0..keys).collect::<Vec<u32>>().chunks(500) {
                let writes: Vec<_> = chunk
                    .iter()
                    .map(|&i| {
                        let client = client.clone();
                        tokio::spawn(async move { client.put(format!("k{i:05}").as_bytes(), &[7u8; 200]).await })
                    })
                    .collect();
                for write in writes {
                    write.await.unwrap().unwrap();
                }
            }
        });
        // SIGKILL (on drop): the restart must replay the WAL.
    }

    let socket = dir.path().join("notify.sock");
    let notifications = Collector::bind(&socket).unwrap();
    let socket_env = socket.to_str().unwrap().to_owned();
    // WatchdogSec = 2 s: pings every second, each needing a beat from every shard (10 per s).
    let env = [("NOTIFY_SOCKET", socket_env.as_str()), ("WATCHDOG_USEC", "2000000")];
    let mut node = Node::start_logged(&data, config, &env);
    let ready_at = notifications.wait_for("READY=1", Duration::from_secs(30)).unwrap();
    // Everything written before the crash is readable the moment READY=1 arrives: the shards
    // had recovered and bound their ports.
    runtime.block_on(async {
        let client = connect(&node).await;
        for i in 0..keys {
            let got = client.get(format!("k{i:05}").as_bytes(), None).await.unwrap();
            assert!(got.is_some(), "k{i:05} missing right after READY=1");
        }
    });
    let all = notifications.all();
    let recovering = all.iter().position(|(_, text)| text.contains("STATUS=recovering")).expect("STATUS=recovering");
    let ready = all.iter().position(|(_, text)| text.contains("READY=1")).unwrap();
    assert!(recovering < ready, "READY=1 came before recovery began: {all:?}");
    assert_eq!(notifications.times_of("READY=1").len(), 1, "READY=1 sent more than once");

    // Pings every second (half of WATCHDOG_USEC) while the shards take writes and while idle.
    runtime.block_on(async {
        let client = connect(&node).await;
        let until = Instant::now() + Duration::from_millis(2500);
        let mut i = 0u32;
        while Instant::now() < until {
            client.put(format!("w{i}").as_bytes(), b"v").await.unwrap();
            i += 1;
        }
    });
    std::thread::sleep(Duration::from_millis(2000));
    let pings: Vec<Instant> = notifications.times_of("WATCHDOG=1").into_iter().filter(|at| *at > ready_at).collect();
    assert!(pings.len() >= 3, "{} WATCHDOG=1 pings in 4.5 s after READY: {:?}", pings.len(), notifications.all());
    let longest_gap = pings.windows(2).map(|pair| pair[1] - pair[0]).max().unwrap();
    assert!(longest_gap < Duration::from_secs(2), "a watchdog gap of {longest_gap:?} (WatchdogSec 2 s)");

    node.stop();
    notifications.wait_for("STOPPING=1", Duration::from_secs(5)).unwrap();
}

#[test]
fn metrics_series_exist_and_move_under_a_workload() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = Node::start(&data, "shards = 2\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let metrics = node.metrics.unwrap();
    let before = scrape(metrics).unwrap();
    let runtime = runtime();
    runtime.block_on(async {
        let client = connect(&node).await;
        let mut writes = Vec::new();
        for i in 0..400u32 {
            let client = client.clone();
            writes.push(tokio::spawn(async move { client.put(format!("m{i}").as_bytes(), &[1u8; 1024]).await }));
        }
        for write in writes {
            write.await.unwrap().unwrap();
        }
        for i in 0..50u32 {
            assert!(client.get(format!("m{i}").as_bytes(), None).await.unwrap().is_some());
        }
    });
    let after = scrape(metrics).unwrap();
    let value = |scrape: &str, name: &str, labels: &str| sample(scrape, name, labels).unwrap_or(0.0);
    // Summed over both shards: every series an operator watches (README, "Metrics"), moving.
    let moved = |name: &str| {
        let sum = |scrape: &str| (0..2).map(|shard| value(scrape, name, &format!("shard=\"{shard}\""))).sum::<f64>();
        (sum(&before), sum(&after))
    };
    for name in [
        "meridian_wal_fdatasync_seconds_count",
        "meridian_wal_batch_records_count",
        "meridian_wal_batch_bytes_sum",
        "meridian_wal_written_bytes_total",
        "meridian_wal_records_total",
        "meridian_write_ack_seconds_count",
        "meridian_read_seconds_count",
        "meridian_requests_total",
    ] {
        let (was, now) = moved(name);
        assert!(now > was, "{name} did not move ({was} -> {now}):\n{after}");
    }
    let (_, records) = moved("meridian_wal_records_total");
    assert!(records >= 400.0, "{records} WAL records counted for 400 puts");
    // Histograms are real: bucketed, with the +Inf bucket equal to the count.
    assert!(after.contains("meridian_wal_fdatasync_seconds_bucket{shard=\"0\",le=\"0.001\"}"), "{after}");
    let count = value(&after, "meridian_write_ack_seconds_count", "shard=\"0\"");
    let inf = value(&after, "meridian_write_ack_seconds_bucket", "shard=\"0\",le=\"+Inf\"");
    assert!(count > 0.0 && (count - inf).abs() < f64::EPSILON, "count {count}, +Inf bucket {inf}");
    // Gauges of queue depths and connections exist.
    for gauge in ["meridian_requests_in_flight", "meridian_connections_open", "meridian_wal_appends_waiting"] {
        assert!(sample(&after, gauge, "shard=\"0\"").is_some(), "{gauge} missing:\n{after}");
    }
    assert_eq!(sample(&after, "meridian_wal_fenced", "shard=\"1\""), Some(0.0));
    // A new WAL zero-filled its first segment and its spare; both files count on disk.
    assert!(value(&after, "meridian_wal_segments_zero_filled_total", "shard=\"0\"") >= 2.0, "{after}");
    assert!(value(&after, "meridian_wal_disk_bytes", "shard=\"0\"") >= 2.0 * 4096.0, "{after}");
    assert!(sample(&after, "meridian_wal_segments_reused_total", "shard=\"0\"").is_some(), "{after}");
    // Anything but GET /metrics is answered, not served.
    let answer = raw_http(metrics, "POST /metrics HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    let answer = raw_http(metrics, "GET /nothing HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    node.stop();
}

fn raw_http(addr: SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn sigterm_during_a_write_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = "shards = 2";
    let runtime = runtime();
    let mut node = Node::start(&data, config);
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let answered_after_stop = runtime.block_on(async {
        let client = connect(&node).await;
        let mut writers = Vec::new();
        for writer in 0..16u32 {
            let client = client.clone();
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                let mut i = 0u64;
                loop {
                    let key = format!("t{writer:02}-{i:06}");
                    match client.put(key.as_bytes(), &i.to_le_bytes().repeat(64)).await {
                        Ok(_) => {
                            acked.lock().unwrap().insert(key, i);
                        }
                        // A draining node answers what it received and then closes: a writer
                        // sees the connection end, never a server-side failure of its write.
                        Err(error @ client::ClientError::Server { .. }) => {
                            panic!("{key} failed during SIGTERM: {error}")
                        }
                        Err(_) => return i,
                    }
                    i += 1;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        let written_before = acked.lock().unwrap().len();
        assert!(written_before > 100, "only {written_before} writes acknowledged before SIGTERM");
        node.terminate();
        for writer in writers {
            writer.await.unwrap();
        }
        acked.lock().unwrap().len() - written_before
    });
    let status = node.child.wait().unwrap();
    assert!(status.success(), "SIGTERM under load: dataplane exited with {status}");
    let acked = acked.lock().unwrap().clone();
    let node = Node::start(&data, config);
    runtime.block_on(async {
        let client = connect(&node).await;
        for (key, i) in &acked {
            let got = client.get(key.as_bytes(), None).await.unwrap();
            let got = got.unwrap_or_else(|| panic!("acknowledged {key} lost across SIGTERM"));
            assert_eq!(&got.value[..], &i.to_le_bytes().repeat(64)[..], "{key}");
        }
    });
    eprintln!("{} acknowledged writes survived SIGTERM ({answered_after_stop} answered after it)", acked.len());
}

#[test]
fn check_config_validates_without_starting_and_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("never-created");
    let good = format!("data_dir = {data:?}\nshards = 2\n[metrics]\nlisten = \"127.0.0.1:9100\"\n");
    let cases = [
        (good.clone(), None),
        (good.replace("shards = 2", "shards = 0"), Some("shards")),
        (good.replace("127.0.0.1:9100", "everywhere"), Some("metrics.listen")),
        (format!("{good}colour = \"blue\"\n"), Some("colour")),
        (format!("{good}[wal]\nrecovery_mode = \"maybe\"\n"), Some("wal.recovery_mode")),
    ];
    for (index, (text, field)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{index}.toml"));
        std::fs::write(&path, text).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_dataplane"))
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        match field {
            None => assert!(output.status.success() && stdout.contains("configuration is valid"), "{stdout}{stderr}"),
            Some(field) => {
                assert!(!output.status.success(), "{text} passed the check");
                assert!(stderr.contains(field), "{field} not named in: {stderr}");
            }
        }
    }
    assert!(!data.exists(), "--check-config created the data directory");
}

/// Every connection waits for the stop between requests. That wait must not pile up wakers:
/// glommio counts a task's references in 16 bits, and one long-lived connection answering
/// more than 32767 requests once overflowed it (a panic in the shard, seen in `bench kv`).
#[test]
fn one_connection_serves_more_requests_than_a_task_reference_count_holds() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), "shards = 1");
    let runtime = runtime();
    runtime.block_on(async {
        let client = connect(&node).await;
        client.put(b"hot", b"value").await.unwrap();
        let mut readers = Vec::new();
        for _ in 0..32 {
            let client = client.clone();
            readers.push(tokio::spawn(async move {
                for _ in 0..1250 {
                    assert_eq!(&client.get(b"hot", None).await.unwrap().unwrap().value[..], b"value");
                }
            }));
        }
        for reader in readers {
            reader.await.unwrap();
        }
        // 40 000 requests on the shard's one connection; it still answers.
        assert!(client.get(b"hot", None).await.unwrap().is_some());
    });
}

/// The built binaries' directory (every workspace binary is built there by `make test`).
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_dataplane")).parent().unwrap().to_owned();
    for binary in ["controlplane", "meridian"] {
        assert!(
            dir.join(binary).exists(),
            "{} is missing: build the whole workspace first (make test does)",
            dir.join(binary).display()
        );
    }
    dir
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("systemd-analyze ({error}): scripts/install-deps.sh test installs it"))
}

#[test]
fn the_installed_unit_files_pass_systemd_analyze_verify() {
    let root = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let install = Command::new(repo.join("scripts/install.sh"))
        .arg("--destdir")
        .arg(root.path())
        .arg("--bin-dir")
        .arg(bin_dir())
        .output()
        .unwrap();
    assert!(install.status.success(), "install.sh: {}", String::from_utf8_lossy(&install.stderr));
    for installed in ["usr/local/bin/dataplane", "usr/local/bin/controlplane", "etc/meridian/dataplane.toml.example"] {
        assert!(root.path().join(installed).exists(), "{installed} not installed");
    }
    // verify resolves the units' dependencies (sysinit.target, ...) under --root.
    let system = Path::new("/usr/lib/systemd/system");
    let staged = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&staged).unwrap();
    for entry in std::fs::read_dir(system).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), staged.join(entry.file_name())).unwrap();
        }
    }
    let root_arg = format!("--root={}", root.path().display());
    let units = ["meridian-dataplane.service", "meridian-controlplane.service"];
    let verify = systemd_analyze(&["verify", "--man=no", &root_arg, units[0], units[1]]);
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && complaints.trim().is_empty(), "systemd-analyze verify:\n{complaints}");

    // The hardening holds: systemd's own exposure score stays in its "OK" band.
    for unit in units {
        let security = systemd_analyze(&["security", "--offline=yes", &root_arg, unit]);
        let text = String::from_utf8_lossy(&security.stdout).into_owned() + &String::from_utf8_lossy(&security.stderr);
        let score: f64 = text
            .lines()
            .find_map(|line| line.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|score| score.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        assert!(score <= 4.0, "{unit}: exposure {score}\n{text}");
        let text_unit = std::fs::read_to_string(root.path().join("etc/systemd/system").join(unit)).unwrap();
        for line in ["Type=notify", "WatchdogSec=", "LimitMEMLOCK=", "ProtectSystem=strict", "NoNewPrivileges=yes"] {
            assert!(text_unit.contains(line), "{unit} lacks {line}");
        }
    }

    // A broken unit is caught (the check can fail).
    let broken = root.path().join("etc/systemd/system/meridian-dataplane.service");
    let text = std::fs::read_to_string(&broken).unwrap().replace("Type=notify", "Type=notify\nWatchdogSecs=10");
    std::fs::write(&broken, text).unwrap();
    let verify = systemd_analyze(&["verify", "--man=no", &root_arg, units[0]]);
    assert!(!String::from_utf8_lossy(&verify.stderr).trim().is_empty(), "a misspelt key went unnoticed");
}
