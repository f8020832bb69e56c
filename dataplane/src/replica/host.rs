//! A node's shard copies as the control agent and the links thread see them
//! ([`NodeReplicas`]), and each copy's end on its shard's executor ([`serve_copy`]): frames
//! from the links thread and the control plane's sets, leases and refusals come in through
//! channels; reports go out through a table the agent reads at every heartbeat.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use controlapi::agent::ReplicaHost;
use controlapi::meta::SetChange;
use controlapi::replica::{ReplicaReport, SetConfig};
use tokio::sync::mpsc;

use super::copy::{Links, ShardCopy};
use super::core::Proposal;
use super::frame::Frame;
use super::net::{Inbound, NetSender, ReplicaNet};

/// What a copy hears from the control plane through the agent.
#[derive(Debug, Clone)]
pub enum ControlInput {
    Config(SetConfig),
    Lease { epoch: u64, until: Instant },
    Refused { proposal: Proposal, epoch: u64 },
}

/// The node's copies, for the agent.
#[derive(Debug)]
pub struct NodeReplicas {
    me: String,
    control: Vec<mpsc::UnboundedSender<ControlInput>>,
    reports: Mutex<BTreeMap<u32, ReplicaReport>>,
    changes: Mutex<Vec<(u32, u64, SetChange)>>,
    waiting: tokio::sync::Notify,
    net: Mutex<Option<Arc<ReplicaNet>>>,
}

/// Each shard's two receiving ends.
#[derive(Debug)]
pub struct CopyChannels {
    pub frames: mpsc::UnboundedReceiver<Inbound>,
    pub control: mpsc::UnboundedReceiver<ControlInput>,
}

impl NodeReplicas {
    /// The copies of `shards` shards on node `me`, with the frame senders for the links thread
    /// and each shard's receiving ends.
    pub fn new(me: &str, shards: u32) -> (Arc<Self>, Vec<mpsc::UnboundedSender<Inbound>>, Vec<CopyChannels>) {
        let (mut control, mut frames, mut channels) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..shards {
            let (frame_tx, frame_rx) = mpsc::unbounded_channel();
            let (control_tx, control_rx) = mpsc::unbounded_channel();
            frames.push(frame_tx);
            control.push(control_tx);
            channels.push(CopyChannels { frames: frame_rx, control: control_rx });
        }
        let host = Arc::new(Self {
            me: me.to_owned(),
            control,
            reports: Mutex::default(),
            changes: Mutex::default(),
            waiting: tokio::sync::Notify::new(),
            net: Mutex::default(),
        });
        (host, frames, channels)
    }

    /// The links thread, whose peer table the agent fills.
    pub fn set_net(&self, net: Arc<ReplicaNet>) {
        *self.net.lock().unwrap_or_else(PoisonError::into_inner) = Some(net);
    }

    /// A copy's report, for the next heartbeat; a change of what it leads (or a need of a new
    /// epoch) sends the heartbeat at once: the control plane's lease follows a new lead sooner.
    pub fn publish(&self, report: ReplicaReport) {
        let shard = report.shard;
        let (leading, wants) = (report.leading, report.wants_new_epoch);
        let previous = self.reports.lock().unwrap_or_else(PoisonError::into_inner).insert(shard, report);
        if previous.is_none_or(|previous| previous.leading != leading || previous.wants_new_epoch != wants) {
            self.waiting.notify_one();
        }
    }

    /// A copy that stopped reports nothing more (a stale report would renew a dead lead).
    pub fn unpublish(&self, shard: u32) {
        self.reports.lock().unwrap_or_else(PoisonError::into_inner).remove(&shard);
        self.waiting.notify_one();
    }

    fn ask(&self, shard: u32, proposal: &Proposal) {
        let (epoch, change) = match proposal {
            Proposal::Remove { epoch, node } => (*epoch, SetChange::Remove { node: node.clone() }),
            Proposal::Add { epoch, node } => (*epoch, SetChange::Add { node: node.clone() }),
        };
        let mut changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        if !changes.iter().any(|asked| asked == &(shard, epoch, change.clone())) {
            changes.push((shard, epoch, change));
        }
        drop(changes);
        self.waiting.notify_one();
    }
}

impl ReplicaHost for NodeReplicas {
    fn reports(&self) -> Vec<ReplicaReport> {
        self.reports.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    fn on_sets(&self, sets: Vec<(u32, SetConfig)>, reports: &[ReplicaReport], until: Option<Instant>) {
        for (shard, config) in sets {
            let Some(control) = self.control.get(shard as usize) else { continue };
            let epoch = config.epoch;
            let primary = config.primary == self.me;
            let _ = control.send(ControlInput::Config(config));
            // A lease only for what this node reported leading when the heartbeat left.
            let led = reports.iter().any(|report| report.shard == shard && report.leading == Some(epoch));
            if let (true, true, Some(until)) = (primary, led, until) {
                let _ = control.send(ControlInput::Lease { epoch, until });
            }
        }
    }

    fn on_peers(&self, peers: Vec<(String, String)>) {
        if let Some(net) = self.net.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            net.set_peers(&peers);
        }
    }

    fn take_changes(&self) -> Vec<(u32, u64, SetChange)> {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn on_refused(&self, shard: u32, epoch: u64, change: SetChange) {
        let proposal = match change {
            SetChange::Remove { node } => Proposal::Remove { epoch, node },
            SetChange::Add { node } => Proposal::Add { epoch, node },
        };
        if let Some(control) = self.control.get(shard as usize) {
            let _ = control.send(ControlInput::Refused { proposal, epoch });
        }
    }

    fn changes_waiting(&self) -> &tokio::sync::Notify {
        &self.waiting
    }
}

/// A copy's links: frames through the links thread, proposals through the agent.
#[derive(Debug)]
pub struct NodeLinks {
    pub sender: NetSender,
    pub host: Arc<NodeReplicas>,
}

impl Links for NodeLinks {
    fn send(&self, to: &str, frame: Frame) {
        self.sender.send(to, &frame);
    }

    fn propose(&self, shard: u32, proposal: Proposal) {
        self.host.ask(shard, &proposal);
    }
}

/// How often a copy's report is refreshed for the agent.
const REPORT_EVERY: Duration = Duration::from_millis(20);

/// Runs a copy's inputs on its executor until the copy stops: frames and control inputs in,
/// reports out.
pub fn serve_copy(
    copy: &ShardCopy,
    channels: CopyChannels,
    host: Arc<NodeReplicas>,
) -> Vec<glommio::task::JoinHandle<()>> {
    let CopyChannels { mut frames, mut control } = channels;
    let mut tasks = Vec::new();
    let receiving = copy.clone();
    tasks.push(
        glommio::spawn_local(async move {
            while let Some((from, frame)) = frames.recv().await {
                receiving.on_frame(&from, frame);
            }
        })
        .detach(),
    );
    let controlled = copy.clone();
    tasks.push(
        glommio::spawn_local(async move {
            while let Some(input) = control.recv().await {
                match input {
                    ControlInput::Config(config) => controlled.on_config(config),
                    ControlInput::Lease { epoch, until } => controlled.on_lease(epoch, until),
                    ControlInput::Refused { proposal, epoch } => controlled.on_refused(&proposal, epoch),
                }
            }
        })
        .detach(),
    );
    let reporting = copy.clone();
    tasks.push(
        glommio::spawn_local(async move {
            let shard = reporting.shard().to_string();
            let epoch = metrics::gauge!("meridian_replica_epoch", "shard" => shard.clone());
            let leading = metrics::gauge!("meridian_replica_leading", "shard" => shard.clone());
            let uncommitted = metrics::gauge!("meridian_replica_uncommitted_records", "shard" => shard.clone());
            let unapplied = metrics::gauge!("meridian_replica_unapplied_records", "shard" => shard);
            while reporting.stopped().is_none() {
                let report = reporting.report();
                #[allow(clippy::cast_precision_loss)]
                {
                    epoch.set(report.epoch as f64);
                    leading.set(if report.leading.is_some() { 1.0 } else { 0.0 });
                    let committed = reporting.committed();
                    uncommitted.set(report.log.end.saturating_sub(committed) as f64);
                    unapplied.set(committed.saturating_sub(reporting.store().applied_next()) as f64);
                }
                host.publish(report);
                glommio::timer::sleep(REPORT_EVERY).await;
            }
            host.unpublish(reporting.shard());
        })
        .detach(),
    );
    tasks
}
