//! The device's limit, measured two ways on the same file system as the system under test:
//! an in-process probe that times each `pwrite` + `fdatasync` pair exactly, over a file laid
//! out and zero-filled first as the WAL's segments are (the headline baseline), and fio
//! (O_DIRECT, io_uring, fdatasync after every write, `--overwrite=1` so that it too writes into
//! a laid-out file), reported beside it. fio times the write and the fdatasync separately: its
//! percentiles of the two are reported as they are, never summed into a "cycle".

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;

/// What fio measured for one block size.
#[derive(Debug, Clone, Copy)]
pub struct FioResult {
    pub bytes_per_s: f64,
    pub writes_per_s: f64,
    pub write_p50_us: f64,
    pub write_p99_us: f64,
    pub sync_p50_us: f64,
    pub sync_p99_us: f64,
}

/// Whether fio is installed.
pub fn fio_available() -> bool {
    Command::new("fio").arg("--version").output().is_ok_and(|output| output.status.success())
}

fn percentile(job: &serde_json::Value, section: &str, field: &str, key: &str) -> Result<f64> {
    job[section][field]["percentile"][key]
        .as_f64()
        .map(|nanos| nanos / 1000.0)
        .with_context(|| format!("fio JSON lacks {section}.{field}.percentile.{key}"))
}

/// Runs fio: sequential O_DIRECT writes of `block_bytes` through io_uring, each followed by
/// fdatasync, at queue depth 1 (one barrier in flight, as the WAL), for `duration`, into a
/// file it lays out first (`--overwrite=1`): an fdatasync then commits no file-system metadata,
/// as the WAL's preallocated segments do not.
pub fn fio(dir: &Path, block_bytes: u64, duration: Duration) -> Result<FioResult> {
    let file = dir.join("fio.data");
    let size = (block_bytes * 4096).clamp(64 << 20, 1 << 30);
    let json = run_fio(
        &file,
        &[
            "--name=meridian-wal-peer",
            "--rw=write",
            "--direct=1",
            "--fdatasync=1",
            "--ioengine=io_uring",
            "--iodepth=1",
            "--overwrite=1",
            &format!("--bs={block_bytes}"),
            &format!("--size={size}"),
            &format!("--runtime={}ms", duration.as_millis()),
        ],
    )?;
    let job = &json["jobs"][0];
    Ok(FioResult {
        bytes_per_s: job["write"]["bw_bytes"].as_f64().context("fio JSON lacks write.bw_bytes")?,
        writes_per_s: job["write"]["iops"].as_f64().context("fio JSON lacks write.iops")?,
        write_p50_us: percentile(job, "write", "lat_ns", "50.000000")?,
        write_p99_us: percentile(job, "write", "lat_ns", "99.000000")?,
        sync_p50_us: percentile(job, "sync", "lat_ns", "50.000000")?,
        sync_p99_us: percentile(job, "sync", "lat_ns", "99.000000")?,
    })
}

/// Runs one fio job on `file` (removed after) with latency percentiles and JSON output.
fn run_fio(file: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let output = Command::new("fio")
        .arg(format!("--filename={}", file.display()))
        .args(args)
        .args(["--lat_percentiles=1", "--time_based", "--output-format=json"])
        .output()
        .context("running fio")?;
    let _ = std::fs::remove_file(file);
    if !output.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    serde_json::from_slice(&output.stdout).context("parsing fio JSON")
}

/// fio: random 4 KiB O_DIRECT reads at queue depth 1 over a 1 GiB file for 5 s: the device's
/// random read p99 in µs.
pub fn fio_random_read_p99_us(dir: &Path) -> Result<f64> {
    let json = run_fio(
        &dir.join("fio-randread.data"),
        &[
            "--name=meridian-read-peer",
            "--rw=randread",
            "--bs=4k",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=1",
            "--size=1g",
            "--runtime=5s",
        ],
    )?;
    percentile(&json["jobs"][0], "read", "lat_ns", "99.000000")
}

/// What the probe measured: each sample is one write and its fdatasync, timed together.
#[derive(Debug)]
pub struct ProbeResult {
    pub bytes_per_s: f64,
    pub elapsed_s: f64,
    pub cycle: Histogram<u64>,
}

struct AlignedBuffer {
    pointer: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuffer {
    fn zeroed(bytes: usize) -> Result<Self> {
        let layout = std::alloc::Layout::from_size_align(bytes, 4096)?;
        // SAFETY: the layout has a non-zero size (callers pass block sizes >= 4096).
        let pointer = unsafe { std::alloc::alloc_zeroed(layout) };
        if pointer.is_null() {
            bail!("cannot allocate {bytes} aligned bytes");
        }
        Ok(Self { pointer, layout })
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.pointer, self.layout) }
    }
}

/// Times `pwrite(O_DIRECT)` + `fdatasync` of `block_bytes` in a loop over a preallocated,
/// zero-filled file, for `duration`.
pub fn probe(dir: &Path, block_bytes: usize, duration: Duration) -> Result<ProbeResult> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let path = dir.join("probe.data");
    let size = (block_bytes as u64 * 2048).clamp(64 << 20, 1 << 30);
    {
        let mut file = std::fs::File::create(&path)?;
        let chunk = vec![0_u8; 1 << 20];
        let mut written = 0;
        while written < size {
            std::io::Write::write_all(&mut file, &chunk)?;
            written += chunk.len() as u64;
        }
        file.sync_all()?;
    }
    let file = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&path)?;
    let descriptor = file.as_raw_fd();
    let buffer = AlignedBuffer::zeroed(block_bytes)?;
    let mut cycle = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut offset = 0_u64;
    let mut bytes = 0_u64;
    let started = Instant::now();
    while started.elapsed() < duration {
        if offset + block_bytes as u64 > size {
            offset = 0;
        }
        let begin = Instant::now();
        // SAFETY: buffer holds block_bytes bytes, aligned for O_DIRECT; descriptor is open.
        let written = unsafe { libc::pwrite(descriptor, buffer.pointer.cast(), block_bytes, offset as libc::off_t) };
        if written != block_bytes as isize {
            bail!("probe pwrite returned {written}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: descriptor is open.
        if unsafe { libc::fdatasync(descriptor) } != 0 {
            bail!("probe fdatasync: {}", std::io::Error::last_os_error());
        }
        cycle.record(u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
        offset += block_bytes as u64;
        bytes += block_bytes as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(ProbeResult { bytes_per_s: bytes as f64 / elapsed, elapsed_s: elapsed, cycle })
}

/// Flushes every dirty page to the devices (`sync(2)`) and gives them a moment, so a measured
/// system does not pay for the writeback of whatever ran before it (another bench, the other
/// system of the comparison).
pub fn quiesce() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(500));
}
