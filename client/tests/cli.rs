//! The `meridian` binary against a fake cluster: output formats and exit codes.

mod common;
mod output;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use client::ErrorCode;
use client::exit_code;
use common::FakeCluster;
use output::{code, json, stderr, stdout};

/// A fake cluster served by its own runtime's worker thread while the test runs processes.
/// Fields drop in order: the cluster's tasks are aborted, then the runtime stops.
struct Fixture {
    cluster: FakeCluster,
    _runtime: tokio::runtime::Runtime,
}

impl Fixture {
    fn start(shard_count: u32) -> Self {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("test runtime");
        let cluster = runtime.block_on(FakeCluster::start(shard_count));
        Self { cluster, _runtime: runtime }
    }

    fn meridian(&self, args: &[&str]) -> Output {
        self.meridian_with_stdin(args, b"")
    }

    fn meridian_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        run(self.cluster.seed(), args, stdin)
    }
}

fn run(addr: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["--addr", addr, "--timeout-ms", "5000"])
        .args(args)
        .env_remove("MERIDIAN_ADDR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meridian");
    child.stdin.take().expect("stdin").write_all(stdin).expect("write stdin");
    child.wait_with_output().expect("wait for meridian")
}

#[test]
fn put_get_stat_ls_rm_round_trip() {
    let fixture = Fixture::start(3);
    let dir = tempfile::tempdir().unwrap();

    let put = fixture.meridian(&["put", "greeting", "--value", "hello"]);
    assert_eq!(code(&put), exit_code::OK, "{}", stderr(&put));
    let ts: u64 = stdout(&put).trim().parse().unwrap();

    let get = fixture.meridian(&["get", "greeting"]);
    assert_eq!(code(&get), exit_code::OK);
    assert_eq!(get.stdout, b"hello");

    let binary = (0..=255_u8).cycle().take(100_000).collect::<Vec<_>>();
    let input = dir.path().join("in.bin");
    std::fs::write(&input, &binary).unwrap();
    let put = json(&fixture.meridian(&["--json", "put", "blob", input.to_str().unwrap()]));
    assert_eq!(put["key"], "blob");
    assert_eq!(put["size"], 100_000);
    assert!(put["ts"].as_u64().unwrap() > ts);

    let output = dir.path().join("out.bin");
    let get = json(&fixture.meridian(&["get", "blob", "-o", output.to_str().unwrap(), "--json"]));
    assert_eq!(get["size"], 100_000);
    assert_eq!(get["path"], output.to_str().unwrap());
    assert_eq!(std::fs::read(&output).unwrap(), binary);

    let put = fixture.meridian_with_stdin(&["put", "piped", "-"], b"from stdin");
    assert_eq!(code(&put), exit_code::OK, "{}", stderr(&put));
    let put = fixture.meridian_with_stdin(&["put", "piped2"], b"also stdin");
    assert_eq!(code(&put), exit_code::OK, "{}", stderr(&put));
    assert_eq!(fixture.meridian(&["get", "piped2"]).stdout, b"also stdin");

    let stat = json(&fixture.meridian(&["stat", "greeting", "--json"]));
    assert_eq!(stat["ts"], ts);
    assert_eq!(stat["size"], 5);
    assert_eq!(stat["versions"], 1);
    let stat = fixture.meridian(&["stat", "greeting"]);
    assert!(stdout(&stat).contains("size\t5"), "{}", stdout(&stat));

    let ls = fixture.meridian(&["ls"]);
    let keys = stdout(&ls).lines().map(|line| line.split('\t').next().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(keys, ["blob", "greeting", "piped", "piped2"]);

    let ls = fixture.meridian(&["ls", "p", "--limit", "1"]);
    assert_eq!(stdout(&ls), format!("piped\t10\t{}\n", ts + 2));
    assert!(stderr(&ls).contains("--start-after \"piped\""), "{}", stderr(&ls));

    let ls = json(&fixture.meridian(&["ls", "--limit", "1", "--all", "--json"]));
    let listed = ls["entries"].as_array().unwrap().iter().map(|entry| entry["key"].clone()).collect::<Vec<_>>();
    assert_eq!(listed, ["blob", "greeting", "piped", "piped2"]);
    assert_eq!(ls["next"], serde_json::Value::Null);

    let ls = json(&fixture.meridian(&["ls", "--start-after", "greeting", "--json"]));
    assert_eq!(ls["entries"].as_array().unwrap().len(), 2);

    let rm = json(&fixture.meridian(&["rm", "greeting", "--json"]));
    assert!(rm["ts"].as_u64().unwrap() > ts);
    let at_old = fixture.meridian(&["get", "greeting", "--at", &ts.to_string()]);
    assert_eq!(at_old.stdout, b"hello");

    let gone = fixture.meridian(&["get", "greeting"]);
    assert_eq!(code(&gone), exit_code::NOT_FOUND);
    assert!(stderr(&gone).contains("not found"), "{}", stderr(&gone));
    assert!(gone.stdout.is_empty());
    assert_eq!(code(&fixture.meridian(&["stat", "greeting"])), exit_code::NOT_FOUND);
    assert_eq!(code(&fixture.meridian(&["rm", "greeting"])), exit_code::NOT_FOUND);
}

#[test]
fn exit_codes_for_scripts() {
    let fixture = Fixture::start(1);

    fixture.cluster.shards[0].refuse_next(ErrorCode::ValueTooLarge, "value of 9 bytes exceeds 8");
    let refused = fixture.meridian(&["put", "k", "--value", "123456789"]);
    assert_eq!(code(&refused), exit_code::REFUSED);
    assert!(stderr(&refused).contains("ValueTooLarge"), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("value of 9 bytes exceeds 8"), "{}", stderr(&refused));

    let usage = fixture.meridian(&["get", "k", "--json"]);
    assert_eq!(code(&usage), exit_code::USAGE);
    assert_eq!(code(&fixture.meridian(&["put"])), exit_code::USAGE);

    let missing = fixture.meridian(&["put", "k", "/nonexistent/meridian-input"]);
    assert_eq!(code(&missing), exit_code::OTHER);
    assert!(stderr(&missing).contains("cannot open"), "{}", stderr(&missing));

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap().to_string();
    drop(listener);
    let unreachable = run(&closed, &["get", "k"], b"");
    assert_eq!(code(&unreachable), exit_code::UNAVAILABLE);
    assert!(stderr(&unreachable).contains("cannot connect"), "{}", stderr(&unreachable));
}
