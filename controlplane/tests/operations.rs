//! Operating a real `controlplane` process: systemd's notify protocol (READY after the log is
//! recovered and the endpoint bound, WATCHDOG pings, STOPPING on SIGTERM), its Prometheus
//! series, and `--check-config`.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use platform::metrics::{sample, scrape};
use platform::notify::Collector;

const BIN: &str = env!("CARGO_BIN_EXE_controlplane");

/// A started member, killed when dropped: a failing assertion leaves no process behind.
type Member = testkit::process::ChildGuard;

/// Starts a one-member cluster under `dir` with notify and metrics; returns the process and
/// the metrics address once it printed both lines.
fn start(dir: &Path, notify: &Path) -> (Member, SocketAddr) {
    let tls = dir.join("tls");
    if !tls.exists() {
        platform::tls::generate(&tls, &["cp1".to_owned()]).unwrap();
    }
    let addr = format!("127.0.0.1:{}", testkit::ports::free_udp_port().unwrap());
    let mut child = Command::new(BIN)
        .arg("run")
        .args(["--id", "1", "--listen", &addr, "--initial-member", &format!("1={addr}")])
        .arg("--data-dir")
        .arg(dir.join("cp1"))
        .arg("--tls-dir")
        .arg(&tls)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Member::new("controlplane", child, dir.join("controlplane.log"));
    let mut lines = BufReader::new(stdout).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let metrics = lines.next().unwrap().unwrap();
    let addr = metrics.strip_prefix("METRICS http://").unwrap().strip_suffix("/metrics").unwrap().parse().unwrap();
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

fn wait_until(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < deadline, "{what} within {deadline:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn notify_watchdog_and_metrics_of_a_running_member() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("notify.sock");
    let notifications = Collector::bind(&socket).unwrap();
    let (mut child, metrics) = start(dir.path(), &socket);
    let ready_at = notifications.wait_for("READY=1", Duration::from_secs(10)).unwrap();
    let all = notifications.all();
    let recovering = all.iter().position(|(_, text)| text.contains("STATUS=recovering")).unwrap();
    let ready = all.iter().position(|(_, text)| text.contains("READY=1")).unwrap();
    assert!(recovering < ready, "{all:?}");

    // It elects itself and applies its first entry; the Raft series say so. (Leadership shows
    // a moment before the leader's first entry is applied.)
    wait_until("a leader that applied its first entry in the metrics", Duration::from_secs(10), || {
        scrape(metrics).is_ok_and(|text| {
            sample(&text, "meridian_raft_is_leader", "") == Some(1.0)
                && sample(&text, "meridian_raft_applied_index", "").is_some_and(|index| index >= 1.0)
        })
    });
    let first = scrape(metrics).unwrap();
    assert_eq!(sample(&first, "meridian_raft_leader_id", ""), Some(1.0));
    assert_eq!(sample(&first, "meridian_raft_voters", ""), Some(1.0));
    assert!(sample(&first, "meridian_raft_term", "").unwrap() >= 1.0, "{first}");
    assert!(sample(&first, "meridian_raft_applied_index", "").unwrap() >= 1.0, "{first}");
    assert!(sample(&first, "meridian_raft_last_log_index", "").unwrap() >= 1.0, "{first}");
    // GLTS widths are recorded every exchange round (100 ms): the histogram moves.
    std::thread::sleep(Duration::from_millis(1200));
    let second = scrape(metrics).unwrap();
    let count = |text: &str| sample(text, "meridian_glts_width_seconds_count", "").unwrap_or(0.0);
    assert!(count(&second) >= count(&first) + 5.0, "GLTS width samples {} -> {}", count(&first), count(&second));
    let width = sample(&second, "meridian_glts_interval_width_current_seconds", "").unwrap();
    assert!(width > 0.0 && width < 1.0, "GLTS width {width} s");

    // Pings every 500 ms (half of WATCHDOG_USEC) while the Raft core answers.
    let pings: Vec<Instant> = notifications.times_of("WATCHDOG=1").into_iter().filter(|at| *at > ready_at).collect();
    assert!(pings.len() >= 2, "{} pings: {:?}", pings.len(), notifications.all());
    assert!(
        notifications.all().iter().any(|(_, text)| text.contains("STATUS=Leader in term")),
        "{:?}",
        notifications.all()
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    child.send_sigterm().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "controlplane exited with {status}");
    notifications.wait_for("STOPPING=1", Duration::from_secs(2)).unwrap();
}

#[test]
fn check_config_validates_without_starting_and_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = "id = 1\nlisten = \"127.0.0.1:7100\"\ndata_dir = \"/nonexistent/cp\"\ntls_dir = \"/t\"\n\
                tls_name = \"cp1\"\ninitial_members = [\"1=127.0.0.1:7100\"]\n";
    let cases = [
        (good.to_owned(), None),
        (format!("{good}[raft]\nelection_min_ms = 10\n"), Some("raft.election_min_ms")),
        (format!("{good}[metrics]\nlisten = \"everywhere\"\n"), Some("listen")),
        (format!("{good}colour = \"blue\"\n"), Some("colour")),
        (good.replace("id = 1", "id = 0"), Some("id")),
    ];
    for (index, (text, field)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{index}.toml"));
        std::fs::write(&path, text).unwrap();
        let output = Command::new(BIN).arg("run").arg("--config").arg(&path).arg("--check-config").output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        match field {
            None => {
                assert!(output.status.success(), "{stderr}");
                assert!(stdout.contains("configuration is valid"), "{stdout}");
                assert!(!Path::new("/nonexistent/cp").exists(), "--check-config created the data dir");
            }
            Some(field) => {
                assert!(!output.status.success(), "{text} passed");
                assert!(stderr.contains(field), "{field} not named in: {stderr}");
            }
        }
    }
}
