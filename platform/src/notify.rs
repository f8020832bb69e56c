//! systemd's notify protocol (`Type=notify`): READY, STATUS, WATCHDOG, STOPPING. Every call
//! is a no-op when the process was not started with `NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(false, states) {
        tracing::warn!(%error, "sd_notify failed");
    }
}

/// Recovery finished and every listener is bound.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A one-line state for `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The process showed progress since the last ping.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Shutdown began.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// How often to ping the watchdog: half of `WatchdogSec` when systemd asked for pings
/// (`WATCHDOG_USEC`), else `None`. As in libsystemd's `sd_watchdog_enabled`, a `WATCHDOG_PID`
/// naming another process means the request is not ours; an absent one means it is.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] from the variables' values.
pub fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|usec| *usec > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// The receiving end of the notify protocol, as systemd holds it: a datagram socket whose
/// path goes into a child's `NOTIFY_SOCKET`. For tests and tools that supervise a process.
#[derive(Debug, Clone)]
pub struct Collector {
    received: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Collector {
    /// Binds `path` and collects every datagram (with its arrival time) until every clone of
    /// the collector is dropped.
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let socket = UnixDatagram::bind(path)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let collector = Self { received: Arc::default() };
        let sink = Arc::downgrade(&collector.received);
        std::thread::Builder::new().name("notify-collector".into()).spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Some(received) = sink.upgrade() {
                if let Ok(len) = socket.recv(&mut buffer) {
                    let text = String::from_utf8_lossy(&buffer[..len]).into_owned();
                    received.lock().unwrap_or_else(PoisonError::into_inner).push((Instant::now(), text));
                }
            }
        })?;
        Ok(collector)
    }

    /// Every datagram so far, oldest first.
    pub fn all(&self) -> Vec<(Instant, String)> {
        self.received.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Arrival times of the datagrams holding the line `line` (e.g. `READY=1`).
    pub fn times_of(&self, line: &str) -> Vec<Instant> {
        self.all().into_iter().filter(|(_, text)| text.lines().any(|l| l == line)).map(|(at, _)| at).collect()
    }

    /// Waits for the first datagram holding `line`; returns its arrival time.
    ///
    /// # Errors
    /// None arrived within `timeout`; the message lists what did.
    pub fn wait_for(&self, line: &str, timeout: Duration) -> Result<Instant, String> {
        let started = Instant::now();
        loop {
            if let Some(at) = self.times_of(line).first() {
                return Ok(*at);
            }
            if started.elapsed() > timeout {
                return Err(format!("no {line} within {timeout:?}; received {:?}", self.all()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_interval_is_half_of_watchdog_usec_for_this_process() {
        assert_eq!(watchdog_interval_from(Some("10000000"), None, 7), Some(Duration::from_secs(5)));
        assert_eq!(watchdog_interval_from(Some("400000"), Some("7"), 7), Some(Duration::from_millis(200)));
        assert_eq!(watchdog_interval_from(Some("400000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, Some("7"), 7), None);
    }
}
