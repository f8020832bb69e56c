//! A local control-plane cluster of real `controlplane` processes on 127.0.0.1, for tests,
//! the soak and `bench control`: certificates, free ports, start, SIGKILL, restart, and a
//! client with the `admin` identity.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use controlapi::NodeId;
use controlapi::client::ControlClient;
use controlapi::rpc::Status;
use platform::tls::Identity;

use crate::ports::free_udp_port;

/// One process slot.
#[derive(Debug)]
struct Slot {
    addr: String,
    child: Option<Child>,
}

/// A cluster of `controlplane` processes.
#[derive(Debug)]
pub struct LocalCluster {
    binary: PathBuf,
    dir: PathBuf,
    nodes: BTreeMap<NodeId, Slot>,
    /// `id=addr` of the nodes started with the cluster (later ones joined through seeds).
    initial_members: Vec<String>,
    extra_args: Vec<String>,
    client: ControlClient,
}

impl LocalCluster {
    /// The `controlplane` binary of the running test's build (`target/<profile>/`, next to the
    /// test executable's `deps` directory), built with `cargo build -p controlplane` when it is
    /// missing (tests of other crates do not build it).
    pub fn binary() -> Result<PathBuf> {
        let exe = std::env::current_exe().context("test executable path")?;
        let profile_dir = exe.parent().and_then(Path::parent).context("target/<profile> directory")?;
        let binary = profile_dir.join(format!("controlplane{}", std::env::consts::EXE_SUFFIX));
        if !binary.exists() {
            let mut cargo = std::process::Command::new(env!("CARGO"));
            cargo.args(["build", "-p", "controlplane", "--bin", "controlplane"]);
            if profile_dir.file_name().is_some_and(|name| name == "release") {
                cargo.arg("--release");
            }
            let status = cargo.current_dir(env!("CARGO_MANIFEST_DIR")).status().context("running cargo build")?;
            if !status.success() || !binary.exists() {
                bail!("cargo build -p controlplane did not produce {}", binary.display());
            }
        }
        Ok(binary)
    }

    /// Starts `size` nodes (ids 1..=size) from `binary` under `dir`, with fault injection on
    /// and `extra_args` passed to every `controlplane run`. Returns once every process runs;
    /// call [`Self::wait_leader`] to wait for an election.
    pub async fn start(binary: &Path, dir: &Path, size: u64, extra_args: &[&str]) -> Result<Self> {
        let tls = dir.join("tls");
        let mut names: Vec<String> = (1..=size + 2).map(|id| format!("cp{id}")).collect();
        names.push("admin".into());
        platform::tls::generate(&tls, &names)?;
        let mut nodes = BTreeMap::new();
        for id in 1..=size {
            nodes.insert(id, Slot { addr: format!("127.0.0.1:{}", free_udp_port()?), child: None });
        }
        let seeds: Vec<String> = nodes.values().map(|slot| slot.addr.clone()).collect();
        let initial_members = nodes.iter().map(|(id, slot)| format!("{id}={}", slot.addr)).collect();
        // Short attempts: a SIGKILLed node never answers, and the tests time elections.
        let client = ControlClient::new(&Identity::in_dir(&tls, "admin"), seeds)?
            .with_attempt_timeout(Duration::from_millis(200));
        let mut cluster = Self {
            binary: binary.to_owned(),
            dir: dir.to_owned(),
            nodes,
            initial_members,
            extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
            client,
        };
        let ids: Vec<NodeId> = cluster.nodes.keys().copied().collect();
        for id in ids {
            cluster.spawn(id, &[])?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, id: NodeId, join_seeds: &[String]) -> Result<()> {
        let members = if join_seeds.is_empty() { self.initial_members.clone() } else { vec![] };
        let slot = self.nodes.get(&id).context("no such node")?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("cp{id}.log")))?;
        let mut command = Command::new(&self.binary);
        command
            .arg("run")
            .args(["--id", &id.to_string(), "--listen", &slot.addr])
            .arg("--data-dir")
            .arg(self.dir.join(format!("cp{id}")))
            .arg("--tls-dir")
            .arg(self.dir.join("tls"))
            .arg("--fault-injection")
            .args(&self.extra_args)
            // A group of its own: a terminal's Ctrl-C reaches only the parent, which stops it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for member in &members {
            command.args(["--initial-member", member]);
        }
        for seed in join_seeds {
            command.args(["--seed", seed]);
        }
        let child = command.spawn().with_context(|| format!("starting {}", self.binary.display()))?;
        if let Some(slot) = self.nodes.get_mut(&id) {
            slot.child = Some(child);
        }
        Ok(())
    }

    /// Adds node `id` as a new process that joins through the running members' addresses.
    pub fn spawn_joining(&mut self, id: NodeId) -> Result<String> {
        let seeds: Vec<String> = self.nodes.values().map(|slot| slot.addr.clone()).collect();
        let addr = format!("127.0.0.1:{}", free_udp_port()?);
        self.nodes.insert(id, Slot { addr: addr.clone(), child: None });
        self.spawn(id, &seeds)?;
        Ok(addr)
    }

    /// The admin client (seeds: every node).
    pub fn client(&self) -> &ControlClient {
        &self.client
    }

    /// Node ids.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// Every node's id and address (the GLTS servers of a data node).
    pub fn members(&self) -> Vec<(NodeId, String)> {
        self.nodes.iter().map(|(id, slot)| (*id, slot.addr.clone())).collect()
    }

    /// A GLTS client of this cluster, as a data node runs it, exchanging every `period`.
    pub fn glts_client(&self, period: Duration) -> Result<controlapi::glts_client::GltsClient> {
        let config = controlapi::glts::EstimatorConfig::for_sources(self.nodes.len());
        Ok(controlapi::glts_client::GltsClient::start(self.client.connector().clone(), self.members(), config, period)?)
    }

    /// Waits until node `id` has applied the same metadata as `expected`.
    pub async fn wait_caught_up(
        &self,
        id: NodeId,
        expected: &controlapi::meta::MetaState,
        deadline: Duration,
    ) -> Result<()> {
        let addr = self.addr(id).context("no such node")?;
        let start = Instant::now();
        loop {
            if self.client.status_of(addr).await.is_ok_and(|status| status.meta == *expected) {
                return Ok(());
            }
            if start.elapsed() > deadline {
                bail!("node {id} did not catch up within {deadline:?}\n{}", self.log_tail(id));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A node's address.
    pub fn addr(&self, id: NodeId) -> Option<&str> {
        self.nodes.get(&id).map(|slot| slot.addr.as_str())
    }

    /// Whether the node's process runs.
    pub fn is_running(&self, id: NodeId) -> bool {
        self.nodes.get(&id).is_some_and(|slot| slot.child.is_some())
    }

    /// SIGKILLs node `id` and reaps it.
    pub fn kill(&mut self, id: NodeId) -> Result<()> {
        let slot = self.nodes.get_mut(&id).context("no such node")?;
        if let Some(mut child) = slot.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts node `id` again on its data dir.
    pub fn restart(&mut self, id: NodeId) -> Result<()> {
        if self.is_running(id) {
            bail!("node {id} is running");
        }
        self.spawn(id, &[])
    }

    /// The statuses of the running nodes that answer.
    pub async fn statuses(&self) -> Vec<Status> {
        let mut statuses = Vec::new();
        for slot in self.nodes.values().filter(|slot| slot.child.is_some()) {
            if let Ok(status) = self.client.status_of(&slot.addr).await {
                statuses.push(status);
            }
        }
        statuses
    }

    /// Waits until a running node reports itself leader and a majority of the running nodes
    /// agree on it; returns its id.
    pub async fn wait_leader(&self, deadline: Duration) -> Result<NodeId> {
        let start = Instant::now();
        loop {
            let statuses = self.statuses().await;
            if let Some(leader) = statuses.iter().find(|s| s.role == controlapi::rpc::Role::Leader && !s.isolated) {
                let agreeing =
                    statuses.iter().filter(|s| s.leader == Some(leader.node_id) && s.term == leader.term).count();
                if agreeing * 2 > leader.members.iter().filter(|m| m.voter).count() {
                    return Ok(leader.node_id);
                }
            }
            if start.elapsed() > deadline {
                bail!("no leader within {deadline:?}; statuses: {statuses:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The tail of node `id`'s log, for failure messages.
    pub fn log_tail(&self, id: NodeId) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("cp{id}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for slot in self.nodes.values_mut() {
            if let Some(mut child) = slot.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
