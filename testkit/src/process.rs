//! Child processes a test or a bench starts: each is stopped, or killed, whatever way the
//! test ends, and can be watched (CPU, disk writes, idleness) and paused.

use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How often a stopping child is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Bytes of a child's log quoted in an error.
const LOG_TAIL_BYTES: usize = 2000;

/// A running child process. Dropping it while the child runs kills it (SIGKILL) and reaps it,
/// so an error or a panic in the bench never leaves a server behind.
#[derive(Debug)]
pub struct ChildGuard {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Takes charge of `child`, whose stderr (or whole output) goes to `log`.
    pub fn new(name: &'static str, child: Child, log: PathBuf) -> Self {
        Self { name, child, log }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the child has used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        cpu_time(self.child.id())
    }

    /// Waits until the child is idle ([`wait_idle`]); how long that took.
    pub fn wait_idle(&self) -> Result<Duration> {
        wait_idle(self.child.id(), self.name)
    }

    /// Stops the child (SIGSTOP) until the returned guard is dropped (SIGCONT): a peer then
    /// runs without even the child's idle timers beside it.
    pub fn pause(&self) -> Result<Paused> {
        let pid = libc::pid_t::try_from(self.child.id()).context("child pid")?;
        // SAFETY: plain kill(2) on the pid of a child this guard has not reaped.
        if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
            bail!("cannot stop {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(Paused(pid))
    }

    /// Fails if the child has exited, quoting its log.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}) {}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// The end of the child's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let tail = &text[text.len().saturating_sub(LOG_TAIL_BYTES)..];
        format!("(log {}):\n{}", self.log.display(), String::from_utf8_lossy(tail).trim_end())
    }

    /// Sends SIGTERM and waits up to `timeout` for the child to exit; kills it after that.
    pub fn terminate(mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = libc::pid_t::try_from(self.child.id()).context("child pid")?;
        if self.child.try_wait()?.is_none() {
            // SAFETY: plain kill(2) on the pid of a child this guard has not reaped yet.
            if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
                bail!("cannot send SIGTERM to {}: {}", self.name, std::io::Error::last_os_error());
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                // Drop kills it.
                bail!("{} did not exit within {} s of SIGTERM {}", self.name, timeout.as_secs(), self.log_tail());
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl ChildGuard {
    /// Sends SIGTERM (a graceful stop) without waiting.
    pub fn send_sigterm(&self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("child pid")?;
        // SAFETY: plain kill(2) on the pid of a child this guard has not reaped yet.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!("cannot send SIGTERM to {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Kills the child (SIGKILL) and reaps it, if it still runs.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Waits for the child to exit.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        self.child.wait().with_context(|| format!("waiting for {}", self.name))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU time (user + system, every thread) process `pid` has used, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')').context("malformed /proc stat")?.1.split_whitespace().collect();
    let ticks = |index: usize| -> Result<u64> {
        fields.get(index).and_then(|field| field.parse().ok()).with_context(|| format!("{path}: field {index}"))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    Ok(Duration::from_micros(total * 1_000_000 / per_second))
}

/// Bytes process `pid` has caused to be written to storage (`write_bytes` of `/proc/<pid>/io`).
pub fn written_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/io");
    let io = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("{path} has no write_bytes"))
}

/// One window of [`wait_idle`].
const IDLE_WINDOW: Duration = Duration::from_millis(250);
/// CPU a process may use in an idle window: 10% of a core. An idle data node spends 5-8% of
/// one on its timers (the 1 ms applied-point publisher, metrics, maintenance checks).
const IDLE_CPU_MAX: Duration = Duration::from_millis(25);
/// Idle windows in a row that count as idle.
const IDLE_WINDOWS: u32 = 2;
/// How long a process may stay busy before the bench gives up on it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Waits until process `pid` is idle: [`IDLE_WINDOWS`] windows in a row of [`IDLE_WINDOW`] in
/// which it used at most [`IDLE_CPU_MAX`] of CPU and wrote nothing to storage (no checkpoint,
/// segment fill or deletion under way), so the peer measured next does not share the machine
/// with work left over from the system under test (then [`ChildGuard::pause`] it). Returns how
/// long that took.
pub fn wait_idle(pid: u32, name: &str) -> Result<Duration> {
    let started = Instant::now();
    let mut quiet = 0;
    let (mut cpu, mut written) = (cpu_time(pid)?, written_bytes(pid)?);
    while quiet < IDLE_WINDOWS {
        if started.elapsed() > IDLE_TIMEOUT {
            bail!("{name} was still busy (CPU or disk writes) after {} s", IDLE_TIMEOUT.as_secs());
        }
        std::thread::sleep(IDLE_WINDOW);
        let (cpu_now, written_now) = (cpu_time(pid)?, written_bytes(pid)?);
        let idle = cpu_now.saturating_sub(cpu) <= IDLE_CPU_MAX && written_now == written;
        quiet = if idle { quiet + 1 } else { 0 };
        (cpu, written) = (cpu_now, written_now);
    }
    Ok(started.elapsed())
}

/// A child stopped by [`ChildGuard::pause`]; continued when dropped.
#[derive(Debug)]
pub struct Paused(libc::pid_t);

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on the pid the guard stopped.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}
