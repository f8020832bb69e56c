//! The Redis peer of `bench kv`: `redis-server` with an append-only file fsynced before every
//! reply (`appendonly yes`, `appendfsync always`), driven by `redis-benchmark`.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::process::children_cpu_time;
use testkit::ports::free_tcp_port as free_port;
use testkit::process::ChildGuard;

/// Longest wait for a fresh redis-server to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a running AOF rewrite to finish.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for redis-server to exit after SIGTERM (it fsyncs the AOF first).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of SET commands written before reading their replies while populating.
const POPULATE_PIPELINE_BYTES: usize = 8 << 20;
/// Bytes of values one calibration run of redis-benchmark writes or reads at most, unless the
/// number of clients asks for more.
const CALIBRATION_BYTES: usize = 64 << 20;
/// Requests of one calibration run at most, unless the number of clients asks for more.
const CALIBRATION_REQUESTS_MAX: u64 = 1000;
/// Requests per client of a calibration run at least.
const CALIBRATION_REQUESTS_PER_CLIENT: u64 = 4;
/// Requests of one measured run at most.
const REQUESTS_MAX: u64 = 50_000_000;

/// The durability options redis-server runs with (besides port, bind, dir and log file): every
/// write is appended to the AOF and fsynced before its reply; no RDB snapshots.
pub const SERVER_OPTIONS: [&str; 6] = ["--appendonly", "yes", "--appendfsync", "always", "--save", ""];

/// [`SERVER_OPTIONS`] as a shell would show them.
pub fn server_options_text() -> String {
    SERVER_OPTIONS.iter().map(|word| if word.is_empty() { "\"\"" } else { word }).collect::<Vec<_>>().join(" ")
}

/// A running redis-server on 127.0.0.1, killed if dropped without [`Redis::stop`].
#[derive(Debug)]
pub struct Redis {
    process: ChildGuard,
    port: u16,
    version: String,
}

/// What one redis-benchmark run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchmarkResult {
    pub requests: u64,
    pub requests_per_s: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Upper bound of p99.9: the lowest latency redis-benchmark reports at least 99.9 % of the
    /// requests at or below (its percentile and cumulative distributions, HDR buckets).
    pub p999_us: f64,
}

/// A measured redis-benchmark run with the CPU time both processes spent on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerRun {
    pub measured: BenchmarkResult,
    /// redis-server's CPU time (user + system) per request during the run.
    pub server_cpu_us_per_op: f64,
    /// redis-benchmark's CPU time per request.
    pub client_cpu_us_per_op: f64,
}

/// Whether redis-server, redis-cli and redis-benchmark are installed.
pub fn available() -> bool {
    ["redis-server", "redis-cli", "redis-benchmark"]
        .iter()
        .all(|tool| Command::new(tool).arg("--version").output().is_ok_and(|output| output.status.success()))
}

/// The key redis-benchmark's SET and GET tests use for random index `index` with `-r`.
fn benchmark_key(index: u64) -> String {
    format!("key:{index:012}")
}

/// Number of distinct keys of `value_bytes` each the Redis peer uses: its whole dataset lives
/// in memory, so large values get fewer keys (256 MiB of values at most, 64 to 100 000 keys).
pub fn keyspace(value_bytes: usize) -> u64 {
    ((256_u64 << 20) / value_bytes.max(1) as u64).clamp(64, 100_000)
}

impl Redis {
    /// Starts redis-server in `dir` (its AOF goes there), logging to `log`, on a free port,
    /// and waits until it answers PING.
    pub fn start(dir: &Path, log: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let version_output = Command::new("redis-server").arg("--version").output().context("running redis-server")?;
        let version_line = String::from_utf8_lossy(&version_output.stdout).into_owned();
        let version =
            version_line.split_whitespace().find_map(|word| word.strip_prefix("v=")).unwrap_or("unknown").to_string();
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(SERVER_OPTIONS)
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(log)
            .args(["--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        let mut redis = Self { process: ChildGuard::new("redis-server", child, log.to_path_buf()), port, version };
        let started = Instant::now();
        loop {
            redis.process.check_running()?;
            if redis.cli(&["ping"]).is_ok_and(|reply| reply.trim() == "PONG") {
                break;
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "redis-server did not answer PING within {} s {}",
                    START_TIMEOUT.as_secs(),
                    redis.process.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let appendfsync = redis.cli(&["config", "get", "appendfsync"])?;
        ensure!(appendfsync.contains("always"), "redis-server runs with appendfsync {appendfsync:?}, not always");
        Ok(redis)
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Runs `redis-cli -p PORT args...` and returns its stdout.
    fn cli(&self, args: &[&str]) -> Result<String> {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running redis-cli")?;
        ensure!(output.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A counter of `INFO stats` (e.g. `keyspace_misses`).
    pub fn stat(&self, name: &str) -> Result<u64> {
        self.info("stats", name)
    }

    /// A numeric field of an `INFO` section.
    fn info(&self, section: &str, name: &str) -> Result<u64> {
        let info = self.cli(&["info", section])?;
        info.lines()
            .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':')?.parse().ok())
            .with_context(|| format!("redis INFO {section} lacks {name}"))
    }

    /// Waits until no AOF rewrite runs or is scheduled: Redis rewrites its AOF in a forked
    /// child once it doubled, which writes to the same disk as whatever is measured next.
    /// Returns how long it waited.
    /// Stops redis-server (SIGSTOP) until the guard is dropped, while the other side runs.
    pub fn pause(&self) -> Result<testkit::process::Paused> {
        self.process.pause()
    }

    pub fn wait_idle(&self) -> Result<Duration> {
        let started = Instant::now();
        while self.info("persistence", "aof_rewrite_in_progress")? != 0
            || self.info("persistence", "aof_rewrite_scheduled")? != 0
        {
            if started.elapsed() > IDLE_TIMEOUT {
                bail!("redis-server still rewrites its AOF after {} s", IDLE_TIMEOUT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(started.elapsed())
    }

    /// Empties the database, then writes every key redis-benchmark's GET test can ask for
    /// (`key:000000000000` ..) with a value of `value_bytes`, pipelined, so no GET misses.
    pub fn populate(&self, value_bytes: usize, keys: u64) -> Result<()> {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).context("connecting to redis-server")?;
        stream.set_nodelay(true)?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut writer = BufWriter::with_capacity(1 << 20, stream);
        writer.write_all(b"*1\r\n$8\r\nFLUSHALL\r\n")?;
        writer.flush()?;
        expect_ok(&mut reader)?;
        let value = vec![b'x'; value_bytes];
        let per_round = (POPULATE_PIPELINE_BYTES / (value_bytes + 64)).max(1) as u64;
        let mut next = 0;
        while next < keys {
            let end = (next + per_round).min(keys);
            for index in next..end {
                let key = benchmark_key(index);
                write!(writer, "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${value_bytes}\r\n", key.len())?;
                writer.write_all(&value)?;
                writer.write_all(b"\r\n")?;
            }
            writer.flush()?;
            for _ in next..end {
                expect_ok(&mut reader)?;
            }
            next = end;
        }
        Ok(())
    }

    /// Runs redis-benchmark's `test` (`set` or `get`) for about `duration`: first a short
    /// calibration run (which doubles as warm-up), then a run of as many requests as the
    /// calibrated rate completes in `duration`.
    pub fn benchmark(
        &self,
        test: &str,
        value_bytes: usize,
        clients: usize,
        keys: u64,
        duration: Duration,
    ) -> Result<PeerRun> {
        let clients_u64 = clients as u64;
        let calibration_requests =
            (CALIBRATION_BYTES as u64 / value_bytes.max(1) as u64).clamp(1, CALIBRATION_REQUESTS_MAX);
        let calibration_requests = calibration_requests.max(clients_u64 * CALIBRATION_REQUESTS_PER_CLIENT);
        self.wait_idle()?;
        let calibration = self.benchmark_run(test, value_bytes, clients, keys, calibration_requests)?;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a non-negative rate times seconds; `as` saturates and the clamp bounds it"
        )]
        let requests = (calibration.requests_per_s * duration.as_secs_f64()).round() as u64;
        let requests = requests.clamp(clients_u64 * CALIBRATION_REQUESTS_PER_CLIENT, REQUESTS_MAX);
        self.wait_idle()?;
        let (server_before, client_before) = (self.process.cpu_time()?, children_cpu_time());
        let measured = self.benchmark_run(test, value_bytes, clients, keys, requests)?;
        // redis-benchmark is the only child reaped in between.
        let (server, client) =
            (self.process.cpu_time()? - server_before, children_cpu_time().saturating_sub(client_before));
        let per_op = |cpu: Duration| cpu.as_secs_f64() * 1e6 / measured.requests as f64;
        Ok(PeerRun { measured, server_cpu_us_per_op: per_op(server), client_cpu_us_per_op: per_op(client) })
    }

    fn benchmark_run(
        &self,
        test: &str,
        value_bytes: usize,
        clients: usize,
        keys: u64,
        requests: u64,
    ) -> Result<BenchmarkResult> {
        let output = Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", test])
            .args(["-d", &value_bytes.to_string(), "-c", &clients.to_string(), "-n", &requests.to_string()])
            .args(["-r", &keys.to_string(), "--precision", "3"])
            .stdin(Stdio::null())
            .output()
            .context("running redis-benchmark")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "redis-benchmark -t {test} -d {value_bytes} -c {clients} -n {requests} failed ({}): {}\nredis-server {}",
                output.status,
                String::from_utf8_lossy(&output.stderr),
                self.process.log_tail()
            );
        }
        parse_benchmark(&stdout, test)
            .with_context(|| format!("redis-benchmark -t {test} output: {}", String::from_utf8_lossy(&output.stderr)))
    }

    /// Sends SIGTERM (redis-server fsyncs its AOF and exits 0).
    pub fn stop(self) -> Result<()> {
        let status = self.process.terminate(STOP_TIMEOUT)?;
        ensure!(status.success(), "redis-server exited with {status}");
        Ok(())
    }
}

fn expect_ok(reader: &mut impl BufRead) -> Result<()> {
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    if line != b"+OK\r\n" {
        // An error reply is one line: `-ERR ...`.
        bail!("redis-server replied {:?}, expected +OK", String::from_utf8_lossy(&line));
    }
    Ok(())
}

/// Parses redis-benchmark's default (non-CSV) output, run with `--precision 3`, for `test`.
/// Throughput, p50 and p99 come from its summary; p99.9 from its latency distributions.
pub fn parse_benchmark(output: &str, test: &str) -> Result<BenchmarkResult> {
    let title = format!("====== {} ======", test.to_uppercase());
    // Progress lines end in '\r'; the report starts at the title.
    let report = output.split(title.as_str()).nth(1).with_context(|| format!("no `{title}` section"))?;
    let lines: Vec<&str> = report.split(['\r', '\n']).map(str::trim).filter(|line| !line.is_empty()).collect();
    let requests: u64 = lines
        .iter()
        .find_map(|line| line.strip_suffix(" seconds")?.split_once(" requests completed in ")?.0.parse().ok())
        .context("no `N requests completed` line")?;
    ensure!(requests > 0, "no requests completed");
    let requests_per_s: f64 = lines
        .iter()
        .find_map(|line| line.strip_prefix("throughput summary: ")?.strip_suffix(" requests per second")?.parse().ok())
        .context("no throughput summary")?;
    let summary_at = lines.iter().position(|line| line.starts_with("latency summary")).context("no latency summary")?;
    let names: Vec<&str> = lines.get(summary_at + 1).context("no latency summary header")?.split_whitespace().collect();
    let values: Vec<f64> = lines
        .get(summary_at + 2)
        .context("no latency summary values")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("latency summary values")?;
    ensure!(names.len() == values.len(), "latency summary: {} names, {} values", names.len(), values.len());
    let summary_us = |name: &str| -> Result<f64> {
        let index = names.iter().position(|candidate| *candidate == name).with_context(|| format!("no {name}"))?;
        Ok(values[index] * 1000.0)
    };
    // Distribution lines: "99.902% <= 31.871 milliseconds (cumulative count 19982)": at least
    // that many requests took at most that long.
    // ceil(0.999 × requests)
    let needed = requests - requests / 1000;
    let p999_ms = lines
        .iter()
        .filter_map(|line| {
            let (_, rest) = line.split_once("% <= ")?;
            let (milliseconds, rest) = rest.split_once(" milliseconds (cumulative count ")?;
            let count: u64 = rest.strip_suffix(')')?.parse().ok()?;
            let milliseconds: f64 = milliseconds.parse().ok()?;
            (count >= needed).then_some(milliseconds)
        })
        .min_by(f64::total_cmp)
        .context("no latency distribution")?;
    Ok(BenchmarkResult {
        requests,
        requests_per_s,
        mean_us: summary_us("avg")?,
        p50_us: summary_us("p50")?,
        p99_us: summary_us("p99")?,
        p999_us: p999_ms * 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output of redis-benchmark 7.0.15 `-t get -d 128 -c 4 -n 2000 -r 1000 --precision 3`.
    const GET_OUTPUT: &str = "\rGET: rps=0.0 (overall: 20000.0) avg_msec=0.054 (overall: 0.054)\r    \r\
====== GET ======
  2000 requests completed in 0.02 seconds
  4 parallel clients
  128 bytes payload
  keep alive: 1
  host configuration \"save\": 
  host configuration \"appendonly\": yes
  multi-thread: no

Latency by percentile distribution:
0.000% <= 0.015 milliseconds (cumulative count 350)
50.000% <= 0.023 milliseconds (cumulative count 1127)
75.000% <= 0.031 milliseconds (cumulative count 1644)
87.500% <= 0.039 milliseconds (cumulative count 1845)
93.750% <= 0.047 milliseconds (cumulative count 1902)
96.875% <= 0.071 milliseconds (cumulative count 1949)
98.438% <= 0.103 milliseconds (cumulative count 1973)
99.219% <= 0.127 milliseconds (cumulative count 1986)
99.609% <= 0.271 milliseconds (cumulative count 1993)
99.805% <= 0.535 milliseconds (cumulative count 1997)
99.902% <= 0.543 milliseconds (cumulative count 1999)
99.951% <= 0.551 milliseconds (cumulative count 2000)
100.000% <= 0.551 milliseconds (cumulative count 2000)

Cumulative distribution of latencies:
98.650% <= 0.103 milliseconds (cumulative count 1973)
99.600% <= 0.207 milliseconds (cumulative count 1992)
99.800% <= 0.303 milliseconds (cumulative count 1996)
100.000% <= 0.607 milliseconds (cumulative count 2000)

Summary:
  throughput summary: 100000.00 requests per second
  latency summary (msec):
          avg       min       p50       p95       p99       max
        0.027     0.008     0.023     0.047     0.119     0.551
";

    #[test]
    fn parses_summary_and_bounds_p999_from_the_distributions() {
        let result = parse_benchmark(GET_OUTPUT, "get").unwrap();
        assert_eq!(result.requests, 2000);
        assert!((result.requests_per_s - 100_000.0).abs() < 1e-6);
        assert!((result.mean_us - 27.0).abs() < 1e-6);
        assert!((result.p50_us - 23.0).abs() < 1e-6);
        assert!((result.p99_us - 119.0).abs() < 1e-6);
        // 1998 of 2000 requests are needed; 1999 are at most 0.543 ms.
        assert!((result.p999_us - 543.0).abs() < 1e-6);
    }

    #[test]
    fn refuses_output_of_another_test_or_truncated_output() {
        assert!(parse_benchmark(GET_OUTPUT, "set").is_err());
        let truncated = &GET_OUTPUT[..GET_OUTPUT.find("Summary:").unwrap()];
        assert!(parse_benchmark(truncated, "get").is_err());
    }

    #[test]
    fn keys_match_redis_benchmark_and_keyspace_is_bounded() {
        assert_eq!(benchmark_key(42), "key:000000000042");
        assert_eq!(keyspace(128), 100_000);
        assert_eq!(keyspace(1 << 20), 256);
        assert_eq!(keyspace(64 << 20), 64);
    }
}
