//! The Prometheus endpoint: installs the `metrics` recorder (real histograms: buckets for
//! every `*_seconds`, `*_bytes` and `*_records` series) and serves `GET /metrics` from a
//! thread of its own, so neither glommio shards nor the tokio runtime carry it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::http::{self, HttpError, Route};

/// Bucket bounds of latency histograms: 25 µs to 20 s.
pub const SECONDS_BUCKETS: [f64; 18] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0,
    5.0, 20.0,
];
/// Bucket bounds of size histograms: 128 B to 64 MiB.
pub const BYTES_BUCKETS: [f64; 11] =
    [128.0, 512.0, 2048.0, 8192.0, 32768.0, 131_072.0, 524_288.0, 1_048_576.0, 4_194_304.0, 16_777_216.0, 67_108_864.0];
/// Bucket bounds of count histograms (records per batch).
pub const RECORDS_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// How long one scrape connection may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How often histogram samples are folded into buckets (they queue in memory until then).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The running endpoint.
#[derive(Debug)]
pub struct Exporter {
    addr: SocketAddr,
}

impl Exporter {
    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Installs the global recorder and serves it on `listen`. Call once per process.
///
/// # Errors
/// The address cannot be bound, or a recorder is already installed.
pub fn install(listen: SocketAddr) -> Result<Exporter, String> {
    let listener = TcpListener::bind(listen).map_err(|error| format!("metrics.listen {listen}: {error}"))?;
    let addr = listener.local_addr().map_err(|error| format!("metrics.listen {listen}: {error}"))?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .and_then(|builder| builder.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), &BYTES_BUCKETS))
        .and_then(|builder| builder.set_buckets_for_metric(Matcher::Suffix("_records".into()), &RECORDS_BUCKETS))
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|error| format!("metrics: {error}"))?;
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            // Drains histogram samples into their buckets whether or not anyone scrapes.
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        })
        .map_err(|error| format!("metrics: cannot start its upkeep thread: {error}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || serve(&listener, &handle))
        .map_err(|error| format!("metrics: cannot start its thread: {error}"))?;
    Ok(Exporter { addr })
}

fn serve(listener: &TcpListener, handle: &PrometheusHandle) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(error) = answer(stream, handle) {
                    tracing::debug!(%error, "metrics scrape failed");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "metrics: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request head and answers it; the connection is closed afterwards.
fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let started = std::time::Instant::now();
    let request = loop {
        if started.elapsed() > IO_TIMEOUT {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "request head too slow"));
        }
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..read]);
        match http::parse(&buffer) {
            Err(HttpError::Incomplete) => {}
            other => break other,
        }
    };
    let (status, content_type, body, head_only) = match request {
        Ok(request) => match request.route {
            Route::Metrics => {
                handle.run_upkeep();
                ("200 OK", "text/plain; version=0.0.4", handle.render(), request.head_only)
            }
            Route::Index => ("200 OK", "text/plain", "Meridian: metrics at /metrics\n".to_string(), request.head_only),
            Route::NotFound(path) => {
                ("404 Not Found", "text/plain", format!("no {path}; try /metrics\n"), request.head_only)
            }
        },
        Err(error @ HttpError::Method(_)) => ("405 Method Not Allowed", "text/plain", format!("{error}\n"), false),
        Err(error) => ("400 Bad Request", "text/plain", format!("{error}\n"), false),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

/// Fetches `http://addr/metrics` (for tests, benches and the CLI).
///
/// # Errors
/// The connection fails or the answer is not a 200.
pub fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT * 5))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: meridian\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        return Err(std::io::Error::other("no HTTP head in the answer"));
    };
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("scrape answered {}", head.lines().next().unwrap_or(""))));
    }
    Ok(body.to_string())
}

/// The value of one sample line `name{labels} value` in a scrape (`labels` as printed, e.g.
/// `shard="0"`; empty for none). For tests and benches.
pub fn sample(scrape: &str, name: &str, labels: &str) -> Option<f64> {
    let wanted = if labels.is_empty() { name.to_string() } else { format!("{name}{{{labels}}}") };
    scrape.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (series == wanted).then(|| value.parse().ok()).flatten()
    })
}
