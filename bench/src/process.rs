//! What a bench's processes run in: a fresh directory per run, the WAN proxies' own thread, the
//! CPU time of the peers it waited for. The processes themselves are `testkit::process`'s.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

/// A fresh directory for one run, removed when dropped unless kept.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl RunDir {
    /// Creates `<parent>/<prefix>-<pid>-<unix millis>`.
    pub fn create(parent: &Path, prefix: &str, keep: bool) -> Result<Self> {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let parent = parent.canonicalize().with_context(|| format!("resolving {}", parent.display()))?;
        let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
        let path = parent.join(format!("{prefix}-{}-{millis}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, keep })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("bench: data kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// CPU time (user + system) of every child this process has waited for.
pub fn children_cpu_time() -> Duration {
    // SAFETY: getrusage fills the zero-initialised struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let time = |value: libc::timeval| {
        Duration::from_secs(u64::try_from(value.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(value.tv_usec).unwrap_or(0))
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// The WAN proxies' own tokio runtime, on a thread of its own. On the bench's runtime the
/// emulated network waited whenever the load generator (thousands of tasks a second) held the
/// worker, and every replica's lag grew at once: a delay the network did not have.
#[derive(Debug)]
pub struct WanThread(Option<tokio::runtime::Runtime>);

impl WanThread {
    /// Starts the thread.
    pub fn start() -> Result<Self> {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("wan").enable_all().build()?;
        Ok(Self(Some(runtime)))
    }

    /// Starts a proxy (see [`wan::Proxy::start`]) whose tasks run on this thread.
    pub async fn proxy(
        &self,
        listen: std::net::SocketAddr,
        upstream: std::net::SocketAddr,
        forward: wan::LinkConfig,
        backward: wan::LinkConfig,
        seed: u64,
    ) -> Result<wan::Proxy> {
        let runtime = self.0.as_ref().context("the WAN thread has stopped")?;
        let started = runtime.spawn(wan::Proxy::start(listen, upstream, forward, backward, seed)).await?;
        started.with_context(|| format!("starting the WAN proxy to {upstream}"))
    }
}

impl Drop for WanThread {
    fn drop(&mut self) {
        // Without blocking: the owner may be inside another runtime.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
