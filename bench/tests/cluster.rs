//! The orchestrator end to end: `bench cluster` starts real `controlplane` and `dataplane`
//! processes and the WAN proxy, runs a short scenario with a partition and a SIGKILLed node,
//! and leaves a report folder whose structure and figures are checked here; Ctrl-C stops the
//! whole cluster; bad scenarios are refused before anything starts.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A workspace binary of this test's build profile, built when missing (tests of this crate
/// do not build other packages' binaries).
fn binary(package: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir.join(package);
    if !path.exists() {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "-p", package, "--bin", package]);
        if profile_dir.file_name().is_some_and(|name| name == "release") {
            cargo.arg("--release");
        }
        assert!(cargo.current_dir(env!("CARGO_MANIFEST_DIR")).status().unwrap().success());
    }
    path
}

fn bench(out: &Path, scenario: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bench"));
    command
        .arg("cluster")
        .arg("--out")
        .arg(out)
        .arg("--dataplane")
        .arg(binary("dataplane"))
        .arg("--controlplane")
        .arg(binary("controlplane"))
        .arg("--skip-fio")
        .args(scenario);
    command
}

/// Processes whose command line mentions `dir` (the run's children all do).
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(&needle) {
                found.push(text);
            }
        }
    }
    found
}

#[test]
fn a_short_scenario_with_a_partition_and_a_kill_reports_zero_lost_writes() {
    let out = tempfile::tempdir().unwrap();
    // The run goes on 4 s after the partition heals: c's catch-up must show within it, and a
    // debug build beside the rest of the suite on two cores has taken close to 2 s.
    let output = bench(
        out.path(),
        &[
            "--duration",
            "7s",
            "--warmup",
            "1s",
            "--rate",
            "200",
            "--workload",
            "small:95,large:5",
            "--file-min",
            "64KiB",
            "--file-max",
            "300KiB",
            "--part-size",
            "128KiB",
            "--partition",
            "c@1s+2s",
            "--kill-node",
            "b@2s+1500ms",
            "--snapshot-every",
            "250ms",
            "--shards",
            "2",
            "--chains",
            "4",
            "--json",
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench cluster failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();

    // Every acknowledged write is in every region, and read back intact.
    assert!(report["writes_acknowledged"].as_u64().unwrap() > 500, "{report:#}");
    assert_eq!(report["lost_writes"], 0, "{report:#}");
    for region in ["a", "b", "c"] {
        assert_eq!(report[format!("{region}_lost_writes")], 0);
    }
    assert_eq!(report["values_corrupt"], 0);
    assert_eq!(report["clean_shutdown"], true, "{stderr}");
    assert_eq!(report["interrupted"], false);
    assert!(report["large_writes_acknowledged"].as_u64().unwrap() > 0, "large files were written: {report:#}");

    // The headline figures exist with their units.
    for key in ["write_p50_us", "write_p99_us", "write_p999_us", "write_throughput_per_s", "rpo_p99_ms", "rpo_max_ms"] {
        assert!(report[key].as_f64().is_some_and(|value| value > 0.0), "{key}: {report:#}");
    }
    for region in ["b", "c"] {
        assert!(report[format!("{region}_rpo_samples")].as_u64().unwrap() > 100);
    }

    // The events, as planned and as they happened; the partitioned region lagged by at least
    // the partition and came back.
    let events = report["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{report:#}");
    let partition = &events[0];
    assert_eq!((partition["kind"].as_str(), partition["region"].as_str()), (Some("partition"), Some("c")));
    assert_eq!((partition["start_ms"].as_u64(), partition["end_ms"].as_u64()), (Some(1000), Some(3000)));
    assert!(partition["restored_ms"].as_u64().unwrap() >= 3000);
    assert!(partition["recovery_ms"].as_u64().is_some(), "c's lag came back under the threshold: {report:#}");
    let kill = &events[1];
    assert_eq!((kill["kind"].as_str(), kill["region"].as_str()), (Some("kill"), Some("b")));
    assert!(kill["restored_ms"].as_u64().unwrap() >= 3500);
    assert!(report["c_rpo_max_ms"].as_f64().unwrap() >= 1500.0, "a 2 s partition shows in c's lag: {report:#}");

    // Global snapshots taken through the partition and the kill became readable in every
    // region (the partitioned and the killed region later), and the last ones read the same
    // everywhere.
    let taken = report["snapshots_taken"].as_u64().unwrap();
    assert!(taken >= 10, "{report:#}");
    assert_eq!(report["snapshot_create_errors"], 0, "{report:#}");
    assert_eq!(report["snapshots_failed"], 0, "{report:#}");
    for region in ["a", "b", "c"] {
        let p50 = report[format!("{region}_snapshot_availability_p50_ms")].as_f64().unwrap();
        let max = report[format!("{region}_snapshot_availability_max_ms")].as_f64().unwrap();
        assert!(p50 > 0.0 && max >= p50, "{region}: {report:#}");
    }
    assert!(
        report["c_snapshot_availability_max_ms"].as_f64().unwrap() >= 1000.0,
        "snapshots taken during c's partition wait for it: {report:#}"
    );
    assert!(report["snapshot_availability_p99_ms"].as_f64().is_some(), "{report:#}");
    assert!(report["snapshots_compared_across_regions"].as_u64().unwrap() >= 5, "{report:#}");
    assert!(report["snapshot_compared_keys"].as_u64().unwrap() > 500, "{report:#}");
    assert_eq!(report["snapshots_differing_across_regions"], 0, "{report:#}");
    // Chains of writes over both shards: every compared snapshot in every region is a
    // causally closed cut of them.
    assert!(report["chain_writes"].as_u64().unwrap() > 200, "{report:#}");
    assert_eq!(report["snapshot_causal_violations"], 0, "{report:#}");

    // The folder: the same JSON, the page, plots in both formats, series and logs.
    let dir = PathBuf::from(report["report_dir"].as_str().unwrap());
    assert!(dir.starts_with(out.path().canonicalize().unwrap()));
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(saved, report);
    let page = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(page.contains("| partition | c | 1000 | 3000 |") && page.contains("| kill | b |"), "{page}");
    let plots: Vec<&str> = report["plots"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(plots.len(), 4);
    for plot in plots {
        let bytes = std::fs::read(plot).unwrap();
        if plot.ends_with(".png") {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{plot}");
        } else {
            let text = String::from_utf8(bytes).unwrap();
            assert!(text.starts_with("<svg") && text.contains("partition c"), "{plot}");
        }
    }
    let rpo = std::fs::read_to_string(dir.join("series/rpo.csv")).unwrap();
    assert!(rpo.lines().count() > 200);
    for log in ["dataplane-a.log", "dataplane-b.log", "dataplane-c.log"] {
        assert!(dir.join("logs").join(log).is_file());
    }
    assert!(processes_under(&dir).is_empty(), "left running: {:?}", processes_under(&dir));
}

/// Shards homed in all three regions (`--homes a,b,c`, placed through the control plane): the
/// load and the chain writers send each write to its shard's home, so every region takes
/// writes and replicates the other two, and a chain's writes land in different regions. Through
/// a partition of one home region, every compared snapshot is read the same in every region
/// and is a causally closed cut of the chains; nothing acknowledged is lost anywhere.
#[test]
fn with_homes_in_every_region_snapshots_are_causal_cuts_of_writes_taken_everywhere() {
    let out = tempfile::tempdir().unwrap();
    let scenario = [
        "--duration",
        "5s",
        "--warmup",
        "1s",
        "--rate",
        "150",
        "--homes",
        "a,b,c",
        "--shards",
        "3",
        "--partition",
        "c@2s+1s",
        "--snapshot-every",
        "200ms",
        "--chains",
        "6",
        "--json",
    ];
    let output = bench(out.path(), &scenario).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench cluster failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["home_regions"], "a,b,c", "{report:#}");
    assert_eq!(report["lost_writes"], 0, "{report:#}");
    assert_eq!(report["values_corrupt"], 0, "{report:#}");
    assert_eq!(report["writes_failed"], 0, "{report:#}");
    // Every region replicates the shards homed elsewhere, so each has an RPO; c's covers the
    // partition.
    for region in ["a", "b", "c"] {
        assert!(report[format!("{region}_rpo_samples")].as_u64().unwrap() > 100, "{region}: {report:#}");
        assert!(report[format!("wire_bytes_to_{region}")].as_u64().unwrap() > 0, "{region}: {report:#}");
    }
    assert!(report["c_rpo_max_ms"].as_f64().unwrap() >= 800.0, "{report:#}");
    assert!(report["a_rpo_max_ms"].as_f64().unwrap() >= 800.0, "a lags on c's shard while c is cut off: {report:#}");
    // The consistency check: writers in every region, every snapshot a causal cut
    // read identically everywhere.
    assert_eq!(report["snapshot_create_errors"], 0, "{report:#}");
    assert_eq!(report["snapshots_failed"], 0, "{report:#}");
    assert!(report["snapshots_compared_across_regions"].as_u64().unwrap() >= 5, "{report:#}");
    assert_eq!(report["snapshots_differing_across_regions"], 0, "{report:#}");
    assert!(report["chain_writes"].as_u64().unwrap() > 200, "{report:#}");
    assert_eq!(report["chain_writes_failed"], 0, "{report:#}");
    assert_eq!(report["snapshot_causal_violations"], 0, "{report:#}");
    assert_eq!(report["clean_shutdown"], true, "{stderr}");
    let dir = PathBuf::from(report["report_dir"].as_str().unwrap());
    assert!(processes_under(&dir).is_empty(), "left running: {:?}", processes_under(&dir));
}

#[test]
fn ctrl_c_stops_the_load_and_every_process_and_still_reports() {
    let out = tempfile::tempdir().unwrap();
    let mut child = bench(out.path(), &["--duration", "10m", "--rate", "100"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the load to start (the stderr line that announces it).
    let stderr = child.stderr.take().unwrap();
    let (lines, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let line = receiver.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no load: {seen:#?}"));
        seen.push(line.clone());
        if line.contains("bench cluster: load:") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "{seen:#?}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(150), "bench cluster did not stop after Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(status.success(), "{status}: {stdout}");
    // The summary, then the folder as the last line.
    let folder = PathBuf::from(stdout.lines().last().unwrap());
    let report: Value = serde_json::from_str(&std::fs::read_to_string(folder.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["interrupted"], true);
    assert_eq!(report["lost_writes"], 0, "{report:#}");
    assert!(report["writes_acknowledged"].as_u64().unwrap() > 0);
    assert!(processes_under(&folder).is_empty(), "left running: {:?}", processes_under(&folder));
}

#[test]
fn bad_scenarios_are_refused_before_anything_starts() {
    let out = tempfile::tempdir().unwrap();
    for (args, says) in [
        (&["--partition", "d@1s+1s"][..], "unknown region \"d\""),
        (&["--duration", "10s", "--partition", "c@50s+20s"], "ends after the load"),
        (&["--kill-node", "b@1s+2s", "--kill-node", "b@2s+1s"], "overlap"),
        (&["--workload", "tiny"], "unknown class"),
        (&["--loss", "0.9"], "--loss"),
        (&["--file-max", "2GiB"], "--file-max"),
        (&["--homes", "a,x"], "`x` is not one of the regions"),
        (&["--homes", "a,b,c", "--shards", "2"], "each home needs a shard"),
    ] {
        let output = bench(out.path(), args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(says), "{args:?}: {stderr}");
    }
    for (args, says) in [
        (&["--rounds", "0"][..], "--rounds must be 1 to 100"),
        (&["--change", "0.9"], "--change must be a fraction"),
        (&["--dataset", "1KiB"], "--dataset must be at least 1MiB"),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_bench"));
        let output = command.arg("snapshot").arg("--out").arg(out.path()).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(says), "snapshot {args:?}: {stderr}");
    }
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0, "nothing was created");
}
