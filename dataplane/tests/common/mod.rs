//! Helpers shared by the WAL integration tests. Every test runs on real files with O_DIRECT
//! and real fdatasync, on a glommio executor of its own.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::future::Future;
use std::path::Path;

use dataplane::wal::{RecoveryMode, WalConfig, WalReader, WalRecord};

pub mod loopfs;
pub mod process;

/// Appends `count` records of `length` bytes one after the other (ids `0..count`) to a new
/// or existing WAL and closes it.
pub fn fill(config: &WalConfig, count: u64, length: usize) {
    let config = config.clone();
    run(async move {
        let wal = dataplane::wal::Wal::open(config).await.unwrap();
        for id in 0..count {
            wal.append(id, &payload(id, length)).await.unwrap();
        }
        wal.close().await.unwrap();
    });
}

/// Runs `future` on a fresh glommio executor, under a [`Watchdog`].
pub fn run<F: Future<Output = T> + 'static, T>(future: F) -> T {
    let _watchdog = Watchdog::start(RUN_DEADLINE);
    dataplane::runtime::run_local("test", future).unwrap()
}

/// No single `run` of these tests takes a tenth of this, even on a loaded machine.
pub const RUN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(180);

/// The last progress mark a test set ([`mark`]), printed by a watchdog that fires.
static MARK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Records how far a long test got, for the watchdog's report.
pub fn mark(value: u64) {
    MARK.store(value, std::sync::atomic::Ordering::Relaxed);
}

/// Aborts the test process when it outlives `deadline`, after printing each thread's state,
/// kernel stack and (with gdb) user stack: a hung test reports where it hangs instead of
/// waiting silently for the runner's timeout.
pub struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(deadline: std::time::Duration) -> Self {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(deadline) {
                report_hang(deadline);
                std::process::abort();
            }
        });
        Self { done: Some(done), thread: Some(thread) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn report_hang(deadline: std::time::Duration) {
    let mark = MARK.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("WATCHDOG: still running after {deadline:?} (last mark {mark}); thread states follow");
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let path = task.path();
            let read = |name: &str| std::fs::read_to_string(path.join(name)).unwrap_or_default();
            let stat = read("stat");
            let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').next()).unwrap_or("?").to_owned();
            eprintln!(
                "--- task {} ({}), state {state}, wchan {}; kernel stack:\n{}",
                task.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan"),
                read("stack")
            );
        }
    }
    let pid = std::process::id().to_string();
    let gdb =
        std::process::Command::new("gdb").args(["-p", &pid, "-batch", "-nx", "-ex", "thread apply all bt 40"]).output();
    match gdb {
        Ok(output) => eprintln!("{}", String::from_utf8_lossy(&output.stdout)),
        Err(error) => eprintln!("(no gdb for user stacks: {error})"),
    }
}

/// Small limits so rotation, multi-chunk batches and full batches happen in tests.
pub fn small_config(dir: &Path) -> WalConfig {
    let mut config = WalConfig::new(dir, 0);
    config.segment_bytes = 256 << 10;
    config.batch_bytes_max = 32 << 10;
    config.record_payload_bytes_max = 16 << 10;
    config.io_bytes_max = Some(8 << 10);
    config
}

pub use dataplane::wal::torture::{check_payload, payload};

/// Every record recovery considers valid, read through the offline path (scan + reader).
pub fn read_all(config: &WalConfig) -> Vec<WalRecord> {
    let plan = dataplane::wal::scan(config).unwrap();
    let first = plan.segments.first().map_or(1, |segment| segment.first_lsn);
    WalReader::new(&config.dir, config.shard_id, config.record_payload_bytes_max)
        .read_range(first, plan.next_lsn)
        .unwrap()
}

pub fn strict(mut config: WalConfig) -> WalConfig {
    config.recovery_mode = RecoveryMode::Strict;
    config
}

/// The only segment file of shard 0 with the highest sequence.
pub fn last_segment(dir: &Path) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    files.sort();
    files.pop().unwrap()
}

/// The seed of a randomized test: `var` from the environment (to replay a printed seed), else
/// the clock's nanoseconds.
#[allow(dead_code, clippy::cast_possible_truncation)]
pub fn seed(var: &str) -> u64 {
    std::env::var(var).ok().and_then(|value| value.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_nanos() as u64)
    })
}
