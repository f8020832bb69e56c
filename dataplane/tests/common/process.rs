//! A real `dataplane` process for the process-level tests: started from a TOML config, killed
//! on drop.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use client::{Client, ClientConfig};

/// A running `dataplane` process; killed on drop.
pub struct Node {
    pub child: testkit::process::ChildGuard,
    pub addresses: Vec<String>,
    /// The Prometheus endpoint, when the config has a `[metrics]` section.
    pub metrics: Option<std::net::SocketAddr>,
}

impl Node {
    pub fn start(data_dir: &Path, config: &str) -> Self {
        Self::spawn(data_dir, config, &[], Stdio::inherit())
    }

    /// [`Node::start`] with extra environment variables (failpoints) and stderr appended to
    /// `<data_dir>.log`.
    pub fn start_logged(data_dir: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data_dir.with_extension("log")).unwrap();
        Self::spawn(data_dir, config, env, Stdio::from(log))
    }

    fn spawn(data_dir: &Path, config: &str, env: &[(&str, &str)], stderr: Stdio) -> Self {
        let config_path = data_dir.with_extension("toml");
        std::fs::write(&config_path, format!("data_dir = {:?}\nlisten = \"127.0.0.1:0\"\n{config}", data_dir)).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_dataplane"))
            .envs(env.iter().copied())
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        let line = receiver.recv_timeout(Duration::from_secs(60)).expect("dataplane did not print READY");
        let addresses = line.strip_prefix("READY ").expect("READY line").split(',').map(String::from).collect();
        let metrics = config.contains("[metrics]").then(|| {
            let line = receiver.recv_timeout(Duration::from_secs(5)).expect("dataplane did not print METRICS");
            let url = line.strip_prefix("METRICS http://").expect("METRICS line");
            url.strip_suffix("/metrics").expect("a /metrics url").parse().expect("an ip:port")
        });
        let child = testkit::process::ChildGuard::new("dataplane", child, data_dir.with_extension("log"));
        Self { child, addresses, metrics }
    }

    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Sends SIGTERM (a graceful stop) without waiting.
    pub fn terminate(&self) {
        self.child.send_sigterm().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        self.terminate();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "dataplane exited with {status}");
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

pub async fn connect(node: &Node) -> Client {
    let config = ClientConfig { retries: 0, request_timeout: Duration::from_secs(20), ..ClientConfig::default() };
    Client::connect(&node.addresses[0], config).await.unwrap()
}

/// Polls the control plane's metadata until `done` holds (within 30 s).
pub async fn wait_meta(
    cluster: &testkit::LocalCluster,
    what: &str,
    done: impl Fn(&controlapi::meta::MetaState) -> bool,
) -> controlapi::meta::MetaState {
    let start = std::time::Instant::now();
    loop {
        if let Ok(state) = cluster.client().read(false, Duration::from_secs(2)).await {
            if done(&state) {
                return state;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{what}: not within 30 s; metadata {state:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
