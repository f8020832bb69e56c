//! Threads that run a shard's blocking engine calls, so its glommio executor never waits on
//! a read from disk, a flush or a compaction. A shard has two lanes: reads (a few threads,
//! answering requests) and background (one thread: flushes and compactions in turn), so a
//! long compaction never holds up a read.
//!
//! glommio's own blocking pool has one thread per executor by default and is shared with
//! nothing we could prioritise; these are plain threads fed by a channel, and each answer
//! comes back on a oneshot channel the executor awaits.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;

type Job = Box<dyn FnOnce() + Send>;

/// A lane's job did not finish.
#[derive(Debug, Clone, Error)]
#[error("engine thread of lane {lane}: {reason}")]
pub struct LaneError {
    /// The lane.
    pub lane: String,
    /// What happened (the panic's message, or the lane stopped).
    pub reason: String,
}

/// Threads taking jobs from one queue. Dropping the lane waits for the jobs queued before
/// (a store dropped without closing must not leave a compaction writing into a tree the next
/// open reads).
pub struct Lane {
    name: String,
    sender: Option<mpsc::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        drop(self.sender.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Lane").field("name", &self.name).finish()
    }
}

impl Lane {
    /// Starts `threads` threads named `name-N`. They end once the lane is dropped and the
    /// jobs queued before are done.
    pub fn start(name: &str, threads: usize) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut handles = Vec::with_capacity(threads.max(1));
        for index in 0..threads.max(1) {
            let receiver = Arc::clone(&receiver);
            handles.push(std::thread::Builder::new().name(format!("{name}-{index}")).spawn(move || {
                loop {
                    let job = receiver.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            })?);
        }
        Ok(Self { name: name.to_owned(), sender: Some(sender), threads: handles })
    }

    /// Runs `job` on one of the lane's threads and waits for its result without blocking
    /// the caller's executor. A panic in `job` is an error, not a lost thread.
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, LaneError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let wrapped: Job = Box::new(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(job)).map_err(|panic| {
                panic
                    .downcast_ref::<&str>()
                    .map(|text| (*text).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panicked".to_owned())
            });
            let _ = answer.send(outcome);
        });
        let stopped = || LaneError { lane: self.name.clone(), reason: "stopped".into() };
        self.sender.as_ref().ok_or_else(stopped)?.send(wrapped).map_err(|_| stopped())?;
        match answered.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(reason)) => Err(LaneError { lane: self.name.clone(), reason: format!("panicked: {reason}") }),
            Err(_) => Err(stopped()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_the_lane_and_a_panic_is_an_error() {
        let lane = Lane::start("test-lane", 2).unwrap();
        let value = futures_lite::future::block_on(lane.run(|| std::thread::current().name().map(str::to_owned)));
        assert!(value.unwrap().unwrap().starts_with("test-lane-"));
        let panicked = futures_lite::future::block_on(lane.run(|| -> u32 { panic!("boom") }));
        assert!(panicked.unwrap_err().reason.contains("boom"));
        // The lane still works after a panic.
        assert_eq!(futures_lite::future::block_on(lane.run(|| 7)).unwrap(), 7);
    }

    #[test]
    fn dropping_the_lane_waits_for_the_jobs_queued_before() {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lane = Lane::start("test-drop", 1).unwrap();
        let flag = Arc::clone(&done);
        // Queued (polled once), then no longer awaited: as a compaction a dropped store had
        // started.
        let job = lane.run(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        assert!(futures_lite::future::block_on(futures_lite::future::poll_once(job)).is_none());
        drop(lane);
        assert!(done.load(std::sync::atomic::Ordering::SeqCst), "the drop returned before the queued job ran");
    }
}
