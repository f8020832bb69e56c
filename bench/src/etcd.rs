//! The etcd peer of `bench control`: a 3-member etcd 3.4 cluster on 127.0.0.1 with etcd's
//! default durability (every Raft entry is appended to the member's WAL and fsynced before the
//! member acknowledges it; a put is acknowledged once a majority has done so and applied it),
//! driven through etcd's v3 JSON gateway (`POST /v3/kv/put`) by closed-loop clients, each with
//! one keep-alive HTTP/1.1 connection and one request outstanding.
//!
//! The gateway is the only way to reach etcd's v3 API without a gRPC client (the bench has no
//! gRPC dependency). It is served on the client port and hands each request to the member's
//! own gRPC server over a loopback connection, so every put costs a JSON decode, a gRPC round
//! trip on the member and a JSON encode more than it would from a native gRPC client: figures
//! measured here are a (slightly) pessimistic bound on etcd.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::redis::BenchmarkResult;
use crate::report::percentile_us;
use testkit::process::ChildGuard;

/// Member names, also the names of their data directories (`<base>/etcd-N`) and logs
/// (`<base>/etcd-N.log`).
const MEMBER_NAMES: [&str; 3] = ["etcd-0", "etcd-1", "etcd-2"];
/// Longest wait for every member of a fresh cluster to report itself healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a starting cluster is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Longest wait for one HTTP request (connect, or send and read the whole response).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response head (status line and headers) accepted.
const HEAD_BYTES_MAX: usize = 64 << 10;
/// Largest response body accepted.
const BODY_BYTES_MAX: usize = 64 << 20;
/// Most concurrent clients of one run.
const CLIENTS_MAX: usize = 4096;

/// A running 3-member etcd cluster on 127.0.0.1. Dropping it kills (SIGKILL) and reaps every
/// member (each is a [`ChildGuard`]); the data directories stay for the caller to remove.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    client_urls: Vec<String>,
    version: String,
}

#[derive(Debug)]
struct Member {
    process: ChildGuard,
}

/// What one [`run_puts`] measured, over the measured window only.
#[derive(Debug, Clone)]
pub struct PutRun {
    /// Puts completed in the measured window (`requests`), their rate, mean and percentiles.
    /// Unlike redis-benchmark's, `p999_us` is the histogram's own p99.9 (3 significant
    /// digits), not an upper bound.
    pub measured: BenchmarkResult,
    /// Length of the measured window.
    pub elapsed: Duration,
    /// Latency of every measured put, in nanoseconds (as in `bench kv`; see
    /// [`percentile_us`]).
    pub latency: Histogram<u64>,
    /// The client URL every put was sent to: the leader's when the run started.
    pub target_url: String,
}

/// Whether the `etcd` binary is installed (`scripts/install-deps.sh bench`).
pub fn available() -> bool {
    Command::new("etcd").arg("--version").output().is_ok_and(|output| output.status.success())
}

/// etcd's version from `etcd --version` (`etcd Version: 3.4.23`).
pub fn version() -> Result<String> {
    let output = Command::new("etcd")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .context("running `etcd --version` (install it with `scripts/install-deps.sh bench`)")?;
    ensure!(output.status.success(), "etcd --version: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("etcd Version:"))
        .map(|version| version.trim().to_string())
        .with_context(|| format!("no `etcd Version:` in the output of etcd --version: {stdout}"))
}

/// A cluster token unique to this process and moment, so members of another cluster (another
/// run) can never join this one.
fn cluster_token() -> String {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("meridian-bench-{}-{}", std::process::id(), since.as_nanos())
}

impl EtcdCluster {
    /// Starts three members on free ports, each with its data directory `<base_dir>/etcd-N`
    /// (which must not hold an older member) and its log `<base_dir>/etcd-N.log`, and waits
    /// until each answers `GET /health` with `{"health":"true"}` (it has a leader and serves
    /// a linearizable read).
    pub async fn start(base_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(base_dir).with_context(|| format!("creating {}", base_dir.display()))?;
        let version = version()?;
        let token = cluster_token();
        let ports = testkit::ports::free_tcp_ports(2 * MEMBER_NAMES.len())?;
        let (client_ports, peer_ports) = ports.split_at(MEMBER_NAMES.len());
        let client_urls: Vec<String> = client_ports.iter().map(|port| format!("http://127.0.0.1:{port}")).collect();
        let peer_urls: Vec<String> = peer_ports.iter().map(|port| format!("http://127.0.0.1:{port}")).collect();
        let initial_cluster = MEMBER_NAMES
            .iter()
            .zip(&peer_urls)
            .map(|(name, url)| format!("{name}={url}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::with_capacity(MEMBER_NAMES.len());
        for (index, name) in MEMBER_NAMES.into_iter().enumerate() {
            let data_dir = base_dir.join(name);
            ensure!(!data_dir.exists(), "{} exists: etcd would rejoin its old cluster", data_dir.display());
            let log = base_dir.join(format!("{name}.log"));
            let log_file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            let mut command = Command::new("etcd");
            // An ETCD_* variable of the caller's environment would configure the member too.
            for (variable, _) in std::env::vars_os() {
                if variable.to_string_lossy().starts_with("ETCD_") {
                    command.env_remove(variable);
                }
            }
            let child = command
                .args(["--name", name])
                .arg("--data-dir")
                .arg(&data_dir)
                .args(["--listen-client-urls", &client_urls[index]])
                .args(["--advertise-client-urls", &client_urls[index]])
                .args(["--listen-peer-urls", &peer_urls[index]])
                .args(["--initial-advertise-peer-urls", &peer_urls[index]])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .spawn()
                .context("starting etcd (install it with `scripts/install-deps.sh bench`)")?;
            members.push(Member { process: ChildGuard::new(name, child, log) });
        }
        let mut cluster = Self { members, client_urls, version };
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    /// Polls every member's `GET /health` until all are healthy.
    async fn wait_healthy(&mut self) -> Result<()> {
        let started = Instant::now();
        let mut healthy = [false; MEMBER_NAMES.len()];
        let mut last_answer: Vec<String> = vec!["no answer yet".into(); MEMBER_NAMES.len()];
        loop {
            for (index, member) in self.members.iter_mut().enumerate() {
                member.process.check_running()?;
                if healthy[index] {
                    continue;
                }
                match health(&self.client_urls[index]).await {
                    Ok(true) => healthy[index] = true,
                    Ok(false) => last_answer[index] = "not healthy".into(),
                    Err(error) => last_answer[index] = format!("{error:#}"),
                }
            }
            if healthy.iter().all(|member| *member) {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                let index = healthy.iter().position(|member| !member).unwrap_or(0);
                bail!(
                    "etcd member {} ({}) not healthy within {} s ({}) {}",
                    MEMBER_NAMES[index],
                    self.client_urls[index],
                    START_TIMEOUT.as_secs(),
                    last_answer[index],
                    self.members[index].process.log_tail()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The members' client URLs (`http://127.0.0.1:PORT`), in member order.
    pub fn client_urls(&self) -> &[String] {
        &self.client_urls
    }

    /// etcd's version (`3.4.23`), from `etcd --version`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The members' process ids, in member order.
    #[cfg(test)]
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|member| member.process.id()).collect()
    }

    /// CPU time (user + system) all three members have used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        self.members.iter().map(|member| member.process.cpu_time()).sum()
    }

    /// Fails if a member has exited, quoting its log.
    pub fn check_running(&mut self) -> Result<()> {
        self.members.iter_mut().try_for_each(|member| member.process.check_running())
    }
}

/// Whether the member at `client_url` answers `GET /health` with `{"health":"true"}`.
async fn health(client_url: &str) -> Result<bool> {
    let mut connection = HttpConnection::connect(client_url).await?;
    let response = connection.request("GET", "/health", None).await?;
    if response.status != 200 {
        return Ok(false);
    }
    let body: Value = serde_json::from_slice(&response.body).context("GET /health: not JSON")?;
    Ok(body.get("health").and_then(Value::as_str) == Some("true"))
}

/// The client URL, among `client_urls`, of the member that is the leader: the one whose
/// `POST /v3/maintenance/status` names itself (`leader` equals `header.member_id`).
pub async fn leader_url(client_urls: &[String]) -> Result<String> {
    let mut answers = Vec::new();
    for url in client_urls {
        let status = match maintenance_status(url).await {
            Ok(status) => status,
            Err(error) => {
                answers.push(format!("{url}: {error:#}"));
                continue;
            }
        };
        let member = status.pointer("/header/member_id").and_then(Value::as_str).unwrap_or_default();
        let leader = status.get("leader").and_then(Value::as_str).unwrap_or_default();
        if !member.is_empty() && member == leader {
            return Ok(url.clone());
        }
        answers.push(format!("{url}: member {member:?}, leader {leader:?}"));
    }
    bail!("no etcd member is the leader: {}", answers.join("; "))
}

async fn maintenance_status(client_url: &str) -> Result<Value> {
    let mut connection = HttpConnection::connect(client_url).await?;
    let body = connection.post_json("/v3/maintenance/status", b"{}").await?;
    serde_json::from_slice(&body).context("POST /v3/maintenance/status: not JSON")
}

/// The body of `POST /v3/kv/put` for `key` and `value`, appended to `body`.
fn put_body(body: &mut Vec<u8>, key: &[u8], value_base64: &[u8]) {
    body.extend_from_slice(b"{\"key\":\"");
    base64_encode(key, body);
    body.extend_from_slice(b"\",\"value\":\"");
    body.extend_from_slice(value_base64);
    body.extend_from_slice(b"\"}");
}

/// Runs `clients` closed-loop clients for `warmup` (not measured) and then `duration`, each
/// with its own keep-alive connection and one put outstanding: sequential `POST /v3/kv/put`
/// of distinct keys `bench/<client>/<n>` with a value of `value_bytes` bytes.
///
/// Every client sends to the leader (found with [`leader_url`] when the run starts), as a
/// client that knows the leader would: a follower forwards each proposal to the leader, one
/// more network hop per put, which would measure the forwarding rather than etcd's commit
/// path. The leader staying the leader is not checked: a put sent to a former leader is still
/// committed, forwarded. etcd refuses a put larger than its `--max-request-bytes` (1.5 MiB by
/// default) with HTTP 400 `etcdserver: request is too large`, and the gateway one larger than
/// gRPC's 2 MiB message limit with HTTP 429: values of about 1.5 MiB or more fail the run.
pub async fn run_puts(
    client_urls: &[String],
    clients: usize,
    duration: Duration,
    warmup: Duration,
    value_bytes: usize,
) -> Result<PutRun> {
    ensure!((1..=CLIENTS_MAX).contains(&clients), "{clients} clients is outside 1..={CLIENTS_MAX}");
    ensure!(!duration.is_zero(), "the measured duration must be positive");
    let target_url = leader_url(client_urls).await?;
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let url = target_url.clone();
        connecting.spawn(async move { HttpConnection::connect(&url).await });
    }
    let mut connections = Vec::with_capacity(clients);
    while let Some(joined) = connecting.join_next().await {
        connections.push(joined??);
    }
    let value: Vec<u8> = (0..value_bytes).map(|index| u8::try_from(index % 251).unwrap_or(0)).collect();
    let mut value_base64 = Vec::new();
    base64_encode(&value, &mut value_base64);
    let value_base64: Arc<[u8]> = value_base64.into();
    // 0: warm-up, 1: measuring, 2: stop.
    let phase = Arc::new(AtomicU8::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (client, mut connection) in connections.into_iter().enumerate() {
        let (phase, value_base64) = (Arc::clone(&phase), Arc::clone(&value_base64));
        tasks.spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
            let (mut ops, mut issued) = (0_u64, 0_u64);
            let mut body = Vec::with_capacity(value_base64.len() + 128);
            while phase.load(Ordering::Relaxed) < 2 {
                body.clear();
                put_body(&mut body, format!("bench/{client}/{issued}").as_bytes(), &value_base64);
                let begin = Instant::now();
                connection
                    .post_json("/v3/kv/put", &body)
                    .await
                    .with_context(|| format!("client {client}: put bench/{client}/{issued}"))?;
                if phase.load(Ordering::Relaxed) == 1 {
                    let nanos = u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    latency.record(nanos.max(1))?;
                    ops += 1;
                }
                issued += 1;
            }
            Ok::<_, anyhow::Error>((latency, ops))
        });
    }
    tokio::time::sleep(warmup).await;
    phase.store(1, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    phase.store(2, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut requests = 0;
    while let Some(joined) = tasks.join_next().await {
        let (client_latency, ops) = joined??;
        latency.add(&client_latency)?;
        requests += ops;
    }
    ensure!(requests > 0, "no put completed in the measured {} ms", duration.as_millis());
    let measured = BenchmarkResult {
        requests,
        requests_per_s: requests as f64 / elapsed.as_secs_f64(),
        mean_us: latency.mean() / 1000.0,
        p50_us: percentile_us(&latency, 50.0),
        p99_us: percentile_us(&latency, 99.0),
        p999_us: percentile_us(&latency, 99.9),
    };
    Ok(PutRun { measured, elapsed, latency, target_url })
}

/// Standard base64 (RFC 4648, with padding) of `input`, appended to `output`.
fn base64_encode(input: &[u8], output: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextet = |group: u32, shift: u32| ALPHABET[((group >> shift) & 0x3f) as usize];
    output.reserve(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let byte = |index: usize| chunk.get(index).copied().map_or(0, u32::from);
        let group = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        output.push(sextet(group, 18));
        output.push(sextet(group, 12));
        output.push(if chunk.len() > 1 { sextet(group, 6) } else { b'=' });
        output.push(if chunk.len() > 2 { sextet(group, 0) } else { b'=' });
    }
}

/// One HTTP/1.1 response.
#[derive(Debug)]
struct Response {
    status: u16,
    body: Vec<u8>,
    /// The server will close the connection after this response (`Connection: close`).
    close: bool,
}

/// A keep-alive HTTP/1.1 connection to one etcd member (`http://host:port`), reopened if the
/// member closed it.
#[derive(Debug)]
struct HttpConnection {
    /// `host:port`.
    authority: String,
    stream: Option<BufReader<TcpStream>>,
    request: Vec<u8>,
}

impl HttpConnection {
    async fn connect(url: &str) -> Result<Self> {
        let authority = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: not an http:// URL"))?
            .trim_end_matches('/')
            .to_string();
        let mut connection = Self { authority, stream: None, request: Vec::new() };
        connection.open().await?;
        Ok(connection)
    }

    async fn open(&mut self) -> Result<()> {
        let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .with_context(|| format!("connecting to {}: timed out", self.authority))?
            .with_context(|| format!("connecting to {}", self.authority))?;
        stream.set_nodelay(true)?;
        self.stream = Some(BufReader::new(stream));
        Ok(())
    }

    /// `POST path` with a JSON `body`; the response body, or an error quoting it unless the
    /// status is 200.
    async fn post_json(&mut self, path: &str, body: &[u8]) -> Result<Vec<u8>> {
        let response = self.request("POST", path, Some(body)).await?;
        if response.status != 200 {
            bail!("POST {path} to {}: HTTP {}: {}", self.authority, response.status, body_text(&response.body));
        }
        Ok(response.body)
    }

    async fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response> {
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, path, body)).await;
        let response = match outcome {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                self.stream = None;
                return Err(error.context(format!("{method} {path} to {}", self.authority)));
            }
            Err(_) => {
                self.stream = None;
                bail!("{method} {path} to {}: no response within {} s", self.authority, REQUEST_TIMEOUT.as_secs());
            }
        };
        if response.close {
            self.stream = None;
        }
        Ok(response)
    }

    async fn exchange(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response> {
        self.request.clear();
        self.request.extend_from_slice(format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.authority).as_bytes());
        if let Some(body) = body {
            self.request.extend_from_slice(
                format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()).as_bytes(),
            );
        }
        self.request.extend_from_slice(b"\r\n");
        if let Some(body) = body {
            self.request.extend_from_slice(body);
        }
        if self.stream.is_none() {
            self.open().await?;
        }
        let stream = self.stream.as_mut().context("no connection")?;
        stream.get_mut().write_all(&self.request).await?;
        read_response(stream).await
    }
}

/// A response body for an error message: its text, shortened.
fn body_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(2000)]);
    text.trim().to_string()
}

/// Reads one line ending in CRLF (or LF), without it; fails at end of stream.
async fn read_line(reader: &mut (impl AsyncBufRead + Unpin), line: &mut Vec<u8>, read: &mut usize) -> Result<()> {
    line.clear();
    let length = reader.read_until(b'\n', line).await?;
    ensure!(length > 0, "connection closed before a complete response");
    ensure!(line.ends_with(b"\n"), "connection closed in the middle of a line");
    *read += length;
    ensure!(*read <= HEAD_BYTES_MAX, "response head longer than {HEAD_BYTES_MAX} bytes");
    line.pop();
    if line.ends_with(b"\r") {
        line.pop();
    }
    Ok(())
}

/// Reads one HTTP/1.1 response: status line, headers, and a body of `Content-Length` bytes or
/// in chunks (`Transfer-Encoding: chunked`).
async fn read_response(reader: &mut (impl AsyncBufRead + Unpin)) -> Result<Response> {
    let mut line = Vec::new();
    let mut head_bytes = 0;
    read_line(reader, &mut line, &mut head_bytes).await?;
    let status_line = String::from_utf8_lossy(&line).into_owned();
    let mut words = status_line.splitn(3, ' ');
    let version = words.next().unwrap_or_default();
    ensure!(version.starts_with("HTTP/1."), "not an HTTP/1 status line: {status_line:?}");
    let status: u16 =
        words.next().and_then(|code| code.parse().ok()).with_context(|| format!("status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    let mut close = version == "HTTP/1.0";
    loop {
        read_line(reader, &mut line, &mut head_bytes).await?;
        if line.is_empty() {
            break;
        }
        let header = String::from_utf8_lossy(&line);
        let (name, value) = header.split_once(':').with_context(|| format!("malformed header {header:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length: usize = value.parse().with_context(|| format!("Content-Length {value:?}"))?;
            ensure!(length <= BODY_BYTES_MAX, "response body of {length} bytes");
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
            ensure!(chunked, "unsupported Transfer-Encoding {value:?}");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            read_line(reader, &mut line, &mut head_bytes).await?;
            let size_text = String::from_utf8_lossy(&line);
            let size_hex = size_text.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16).with_context(|| format!("chunk size {size_text:?}"))?;
            if size == 0 {
                // Trailers, then an empty line.
                loop {
                    read_line(reader, &mut line, &mut head_bytes).await?;
                    if line.is_empty() {
                        break;
                    }
                }
                break;
            }
            ensure!(body.len() + size <= BODY_BYTES_MAX, "response body longer than {BODY_BYTES_MAX} bytes");
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..]).await.context("reading a chunk")?;
            read_line(reader, &mut line, &mut head_bytes).await?;
            ensure!(line.is_empty(), "chunk not followed by CRLF");
        }
    } else if let Some(length) = content_length {
        body.resize(length, 0);
        reader.read_exact(&mut body).await.context("reading the response body")?;
    } else if status >= 200 && status != 204 && status != 304 {
        // No length: the body runs to the end of the connection.
        (&mut *reader).take(u64::try_from(BODY_BYTES_MAX)?).read_to_end(&mut body).await?;
        close = true;
    }
    Ok(Response { status, body, close })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut output = Vec::new();
            base64_encode(input.as_bytes(), &mut output);
            assert_eq!(String::from_utf8(output).unwrap(), expected, "{input:?}");
        }
        let mut output = b"x".to_vec();
        base64_encode(&[0xff, 0xfe, 0xfd, 0x00], &mut output);
        assert_eq!(output, b"x//79AA==");
    }

    #[test]
    fn put_body_is_etcd_json() {
        let mut body = Vec::new();
        let mut value = Vec::new();
        base64_encode(b"bar", &mut value);
        put_body(&mut body, b"bench/0/1", &value);
        assert_eq!(body, br#"{"key":"YmVuY2gvMC8x","value":"YmFy"}"#);
    }

    #[tokio::test]
    async fn reads_responses_by_length_and_in_chunks() {
        let input: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n\
{\"health\":\"true\"}HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\nConnection: close\r\n\r\n\
4\r\n{\"er\r\n9;x=y\r\nror\":\"x\"}\r\n0\r\n\r\n";
        let mut reader = input;
        let first = read_response(&mut reader).await.unwrap();
        assert_eq!((first.status, first.close), (200, false));
        assert_eq!(first.body, br#"{"health":"true"}"#);
        let second = read_response(&mut reader).await.unwrap();
        assert_eq!((second.status, second.close), (400, true));
        assert_eq!(second.body, br#"{"error":"x"}"#);
        assert!(reader.is_empty());
        assert!(read_response(&mut reader).await.is_err());
    }

    #[tokio::test]
    async fn refuses_truncated_responses() {
        let mut reader: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort";
        assert!(read_response(&mut reader).await.is_err());
        let mut reader: &[u8] = b"SSH-2.0-OpenSSH\r\n\r\n";
        assert!(read_response(&mut reader).await.is_err());
    }

    /// Starts a cluster and runs 2 s of 128-byte puts with 1 and then 16 clients. Needs etcd
    /// (`scripts/install-deps.sh bench`): `cargo test -p bench --release etcd -- --ignored
    /// --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    #[ignore = "needs etcd 3.4 and takes ~10 s"]
    async fn cluster_takes_puts() {
        // Removed when dropped, after the cluster (declared later, dropped first), even on panic.
        let run_dir = crate::process::RunDir::create(&std::env::temp_dir(), "meridian-etcd-test", false).unwrap();
        let started = Instant::now();
        let cluster = EtcdCluster::start(run_dir.path()).await.unwrap();
        eprintln!(
            "etcd {} cluster healthy in {} ms at {:?}",
            cluster.version(),
            started.elapsed().as_millis(),
            cluster.client_urls()
        );
        assert!(cluster.version().starts_with("3.4."), "etcd {}", cluster.version());
        for clients in [1, 16] {
            let (cpu_before, run_started) = (cluster.cpu_time().unwrap(), Instant::now());
            let run = run_puts(cluster.client_urls(), clients, Duration::from_secs(2), Duration::from_millis(500), 128)
                .await
                .unwrap();
            let cores = (cluster.cpu_time().unwrap() - cpu_before).as_secs_f64() / run_started.elapsed().as_secs_f64();
            let measured = run.measured;
            eprintln!(
                "etcd puts, 128 B, {clients:>2} clients to {}: {} in {:.2} s = {:.0}/s; us: mean {:.0} p50 {:.0} p99 {:.0} p99.9 {:.0}; members' cpu {cores:.2} cores (warm-up and run)",
                run.target_url,
                measured.requests,
                run.elapsed.as_secs_f64(),
                measured.requests_per_s,
                measured.mean_us,
                measured.p50_us,
                measured.p99_us,
                measured.p999_us,
            );
            assert!(measured.requests > 0);
            assert!(measured.p50_us <= measured.p99_us && measured.p99_us <= measured.p999_us);
        }
        // 1.75 MiB is over etcd's --max-request-bytes (1.5 MiB): refused, the error quotes etcd.
        let refused =
            run_puts(cluster.client_urls(), 1, Duration::from_millis(100), Duration::ZERO, 7 << 18).await.unwrap_err();
        eprintln!("1.75 MiB put: {refused:#}");
        assert!(
            format!("{refused:#}").contains("HTTP 400: {\"error\":\"etcdserver: request is too large\""),
            "{refused:#}"
        );
        let pids = cluster.pids();
        drop(cluster);
        for pid in pids {
            // Killed and reaped: the pid is gone (or, rarely, already reused by another program).
            let command = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            assert_ne!(command.trim(), "etcd", "etcd {pid} survived the drop");
        }
    }
}
