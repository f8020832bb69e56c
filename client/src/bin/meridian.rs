//! `meridian`: the command line of a Meridian cluster. Talks to the data nodes through
//! [`client::Client`] and, for `meridian cluster ...`, to the control plane through
//! [`controlapi::client::ControlClient`]; see `meridian --help` for commands and exit codes.

#[path = "meridian/archive.rs"]
mod archive;
#[path = "meridian/cluster.rs"]
mod cluster;

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use client::{Client, ClientConfig, ClientError, Entry, exit_code};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Values above this size get a progress bar (when stderr is a terminal).
const PROGRESS_BYTES_MIN: u64 = 4 << 20;
/// Files are read and written in pieces of this size so the progress bar moves.
const COPY_CHUNK_BYTES: usize = 1 << 20;

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  any other error (unreadable file, protocol error, value too large for a frame)
  2  usage error (the command line could not be parsed)
  3  not found: the key has no visible version (get, stat, rm)
  4  refused by the server: an error response; its code name is printed on stderr
     (cluster: the control plane's error message)
  5  unavailable: cannot connect, connection lost, or timeout
     (cluster: no control-plane leader answered in time)";

/// Store, read and list values in a Meridian cluster.
///
/// Keys are UTF-8 strings; values are raw bytes. The shard map is asked from the node at
/// --addr, then every key is sent straight to the shard that owns it.
#[derive(Debug, Parser)]
#[command(name = "meridian", version, after_help = EXIT_CODES_HELP)]
struct Cli {
    /// Address of any node of the cluster; the shard map is learned from it.
    #[arg(long, global = true, env = "MERIDIAN_ADDR", default_value = "127.0.0.1:7700")]
    addr: String,

    /// Print one JSON object per command on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// Timeout of each connection attempt and of each request attempt, in milliseconds. For
    /// `cluster` commands: how long to look for the leader and wait for its answer.
    #[arg(long, global = true, value_name = "MS", default_value_t = 30_000)]
    timeout_ms: u64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a value; prints the version's timestamp once it is durable.
    ///
    /// The value is read from FILE, from stdin when FILE is `-` or absent, or given with --value.
    Put {
        /// The key.
        key: String,
        /// File holding the value; `-` for stdin.
        #[arg(conflicts_with = "value")]
        file: Option<PathBuf>,
        /// The value itself, as a string.
        #[arg(long)]
        value: Option<String>,
    },
    /// Read a value: its raw bytes go to stdout, or to FILE with -o.
    ///
    /// With --json, -o is required and a JSON object with key, ts, size and path is printed.
    Get {
        /// The key.
        key: String,
        /// Read the version visible at this timestamp instead of the latest.
        #[arg(long, value_name = "TS")]
        at: Option<u64>,
        /// Write the value to FILE instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// List keys in key order, one per line: key, size and timestamp separated by tabs.
    Ls {
        /// Only keys starting with PREFIX.
        #[arg(default_value = "")]
        prefix: String,
        /// Most keys to list (per page with --all).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// Only keys after this one (continue a previous listing).
        #[arg(long, value_name = "KEY")]
        start_after: Option<String>,
        /// List as of this timestamp instead of the latest.
        #[arg(long, value_name = "TS")]
        at: Option<u64>,
        /// Follow continuations until every key is listed.
        #[arg(long)]
        all: bool,
    },
    /// Delete a key (writes a tombstone); prints the tombstone's timestamp.
    Rm {
        /// The key.
        key: String,
    },
    /// Show a key's metadata: timestamp, size, chunks and retained versions.
    Stat {
        /// The key.
        key: String,
        /// Metadata of the version visible at this timestamp instead of the latest.
        #[arg(long, value_name = "TS")]
        at: Option<u64>,
    },
    /// Administer the control plane: status, add and remove voters.
    Cluster(cluster::ClusterArgs),
    /// Global snapshots: create, list, show (through the control plane).
    Snapshot(cluster::SnapshotArgs),
    /// Inter-region replication as seen by the node at --addr.
    Replication {
        #[command(subcommand)]
        command: ReplicationCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ReplicationCommand {
    /// Per region shipping to this node: the resolved timestamp (reads at or below it see
    /// every shard's writes from that region), the lag behind the node's clock (the RPO), and
    /// how many of the region's shards have reported.
    Status,
}

#[derive(Debug, Serialize)]
struct ReplicationOutput {
    region: String,
    now_ts: u64,
    sources: Vec<SourceOutput>,
}

#[derive(Debug, Serialize)]
struct SourceOutput {
    region: String,
    resolved_ts: u64,
    lag_us: Option<u64>,
    shards_closed: u32,
    shards: u32,
}

#[derive(Debug, Serialize)]
struct Written<'a> {
    key: &'a str,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<usize>,
}

#[derive(Debug, Serialize)]
struct Fetched<'a> {
    key: &'a str,
    ts: u64,
    size: usize,
    path: &'a Path,
}

#[derive(Debug, Serialize)]
struct StatOutput<'a> {
    key: &'a str,
    ts: u64,
    size: u64,
    chunks: u32,
    versions: u32,
}

#[derive(Debug, Serialize)]
struct ListedEntry {
    key: String,
    ts: u64,
    size: u64,
}

#[derive(Debug, Serialize)]
struct ListOutput {
    entries: Vec<ListedEntry>,
    next: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.json && matches!(cli.command, Command::Get { output: None, .. }) {
        Cli::command()
            .error(clap::error::ErrorKind::MissingRequiredArgument, "get --json needs -o FILE for the value")
            .exit();
    }
    let result = match &cli.command {
        Command::Cluster(args) => {
            let target = args.flags.target().unwrap_or_else(|missing| {
                Cli::command().error(clap::error::ErrorKind::MissingRequiredArgument, missing).exit()
            });
            cluster::run(&args.command, &target, cli.json, Duration::from_millis(cli.timeout_ms)).await
        }
        Command::Snapshot(args) => {
            let target = args.command.needs_control().then(|| {
                args.flags.target().unwrap_or_else(|missing| {
                    Cli::command().error(clap::error::ErrorKind::MissingRequiredArgument, missing).exit()
                })
            });
            let timeout = Duration::from_millis(cli.timeout_ms);
            cluster::run_snapshot(&args.command, target.as_ref(), &cli.addr, cli.json, timeout).await
        }
        _ => run(cli).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meridian: {}", describe(&error));
            ExitCode::from(exit_code_of(&error))
        }
    }
}

/// The error and its causes on one line, skipping a cause its parent's message already ends
/// with (errors such as [`ClientError::Connect`] print their source themselves).
fn describe(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if line.ends_with(&message) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&message);
    }
    line
}

/// The exit code of a [`cluster::ControlError`] (root cause or context), else of the first
/// [`ClientError`] in the chain; [`exit_code::OTHER`] without either.
fn exit_code_of(error: &anyhow::Error) -> u8 {
    if let Some(control) = error.downcast_ref::<cluster::ControlError>() {
        return control.exit_code();
    }
    error.chain().find_map(|cause| cause.downcast_ref::<ClientError>()).map_or(exit_code::OTHER, ClientError::exit_code)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(cli.timeout_ms);
    let config = ClientConfig { connect_timeout: timeout, request_timeout: timeout, ..ClientConfig::default() };
    let value_bytes_max = u64::from(config.frame_payload_bytes_max);
    let client = Client::connect(&cli.addr, config).await?;
    let mut stdout = std::io::stdout().lock();
    let json = cli.json;
    match &cli.command {
        Command::Put { key, file, value } => put(&client, key, file.as_deref(), value, value_bytes_max, json).await?,
        Command::Get { key, at, output } => {
            let found = client.get(key.as_bytes(), *at).await.with_context(|| format!("get {key:?}"))?;
            let versioned = found.ok_or(ClientError::NotFound).with_context(|| format!("get {key:?}"))?;
            match output {
                Some(path) => {
                    write_file(path, &versioned.value)?;
                    if json {
                        let fetched = Fetched { key, ts: versioned.ts, size: versioned.value.len(), path };
                        print_json(&mut stdout, &fetched)?;
                    }
                }
                None => {
                    stdout.write_all(&versioned.value)?;
                    stdout.flush()?;
                }
            }
        }
        Command::Ls { prefix, limit, start_after, at, all } => {
            let start_after = start_after.clone().unwrap_or_default().into_bytes();
            list(&client, prefix, *limit, start_after, *at, *all, json).await?;
        }
        Command::Rm { key } => {
            let ts = client.delete(key.as_bytes()).await.with_context(|| format!("rm {key:?}"))?;
            if json {
                print_json(&mut stdout, &Written { key, ts, size: None })?;
            } else {
                writeln!(stdout, "{ts}")?;
            }
        }
        Command::Stat { key, at } => {
            let found = client.stat(key.as_bytes(), *at).await.with_context(|| format!("stat {key:?}"))?;
            let stat = found.ok_or(ClientError::NotFound).with_context(|| format!("stat {key:?}"))?;
            if json {
                let output =
                    StatOutput { key, ts: stat.ts, size: stat.size, chunks: stat.chunks, versions: stat.versions };
                print_json(&mut stdout, &output)?;
            } else {
                writeln!(stdout, "key\t{key}")?;
                writeln!(stdout, "ts\t{}", stat.ts)?;
                writeln!(stdout, "size\t{}", stat.size)?;
                writeln!(stdout, "chunks\t{}", stat.chunks)?;
                writeln!(stdout, "versions\t{}", stat.versions)?;
            }
        }
        Command::Replication { command: ReplicationCommand::Status } => replication_status(&client, json).await?,
        Command::Cluster(_) | Command::Snapshot(_) => {
            unreachable!("main runs control-plane commands with cluster::run and cluster::run_snapshot")
        }
    }
    Ok(())
}

/// `meridian put`: the value from the argument, a file (with progress) or stdin.
async fn put(
    client: &Client,
    key: &str,
    file: Option<&Path>,
    value: &Option<String>,
    value_bytes_max: u64,
    json: bool,
) -> anyhow::Result<()> {
    let (value, progress) = match (value, file) {
        (Some(value), _) => (value.clone().into_bytes(), None),
        (None, Some(path)) if path != Path::new("-") => read_file(path, value_bytes_max)?,
        (None, _) => (read_stdin(value_bytes_max)?, None),
    };
    if let Some(progress) = &progress {
        progress.set_message("writing");
    }
    let result = client.put(key.as_bytes(), &value).await;
    if let Some(progress) = progress {
        progress.finish_and_clear();
    }
    let ts = result.with_context(|| format!("put {key:?}"))?;
    let mut stdout = std::io::stdout().lock();
    if json {
        print_json(&mut stdout, &Written { key, ts, size: Some(value.len()) })?;
    } else {
        writeln!(stdout, "{ts}")?;
    }
    Ok(())
}

/// `meridian ls`: one page, or every page with `all`.
async fn list(
    client: &Client,
    prefix: &str,
    limit: u32,
    mut start_after: Vec<u8>,
    at: Option<u64>,
    all: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let mut listed = Vec::new();
    let next = loop {
        let page =
            client.list(prefix.as_bytes(), &start_after, limit, at).await.with_context(|| format!("ls {prefix:?}"))?;
        if json {
            listed.extend(page.entries.iter().map(listed_entry));
        } else {
            for entry in &page.entries {
                writeln!(stdout, "{}\t{}\t{}", String::from_utf8_lossy(&entry.key), entry.size, entry.ts)?;
            }
        }
        match page.next {
            Some(next) if all => start_after = next,
            next => break next.map(|next| String::from_utf8_lossy(&next).into_owned()),
        }
    };
    if json {
        print_json(&mut stdout, &ListOutput { entries: listed, next })?;
    } else if let Some(next) = next {
        eprintln!("meridian: more keys follow; continue with --start-after {next:?} or list them all with --all");
    }
    Ok(())
}

/// `meridian replication status`: the resolved timestamp and lag of every source region.
async fn replication_status(client: &Client, json: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let status = client.replication_status().await.context("replication status")?;
    let sources: Vec<SourceOutput> = status
        .sources
        .iter()
        .map(|source| SourceOutput {
            region: source.region.clone(),
            resolved_ts: source.resolved_ts,
            lag_us: source.lag_us(status.now_ts),
            shards_closed: source.shards_closed,
            shards: source.shards,
        })
        .collect();
    if json {
        return print_json(&mut stdout, &ReplicationOutput { region: status.region, now_ts: status.now_ts, sources });
    }
    writeln!(stdout, "region\t{}", status.region)?;
    if sources.is_empty() {
        writeln!(stdout, "no region ships to this node (every shard is homed here)")?;
    }
    for source in &sources {
        let lag = source.lag_us.map_or("unknown".to_string(), |lag| format!("{:.1} ms", lag as f64 / 1000.0));
        writeln!(
            stdout,
            "from {}\tresolved_ts {}\tlag {lag}\tshards {}/{}",
            source.region, source.resolved_ts, source.shards_closed, source.shards
        )?;
    }
    Ok(())
}

fn listed_entry(entry: &Entry) -> ListedEntry {
    ListedEntry { key: String::from_utf8_lossy(&entry.key).into_owned(), ts: entry.ts, size: entry.size }
}

fn print_json(out: &mut impl Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// A progress bar on stderr for `len` bytes, when stderr is a terminal and the value is large.
fn progress_bar(len: u64, message: &'static str) -> Option<ProgressBar> {
    if len <= PROGRESS_BYTES_MIN || !std::io::stderr().is_terminal() {
        return None;
    }
    let style = ProgressStyle::with_template("{msg:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = ProgressBar::new(len).with_style(style).with_message(message);
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

fn too_large(len: u64, max: u64) -> ClientError {
    let to_usize = |bytes: u64| usize::try_from(bytes).unwrap_or(usize::MAX);
    ClientError::TooLarge { what: "value", len: to_usize(len), max: to_usize(max) }
}

/// Reads a whole file into memory (values are bounded by the frame limit), with a progress bar
/// for large ones. The bar is returned still showing, to cover the upload that follows.
fn read_file(path: &Path, len_max: u64) -> anyhow::Result<(Vec<u8>, Option<ProgressBar>)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
    if len > len_max {
        return Err(anyhow::Error::new(too_large(len, len_max)).context(format!("{}", path.display())));
    }
    let progress = progress_bar(len, "reading");
    let mut value = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    let mut chunk = vec![0_u8; COPY_CHUNK_BYTES];
    // Reads at most len_max + 1 bytes, so a file that grows meanwhile is still bounded.
    let mut reader = file.take(len_max.saturating_add(1));
    loop {
        let read = reader.read(&mut chunk).with_context(|| format!("cannot read {}", path.display()))?;
        if read == 0 {
            break;
        }
        value.extend_from_slice(&chunk[..read]);
        if let Some(progress) = &progress {
            progress.inc(read as u64);
        }
    }
    let read_len = value.len() as u64;
    if read_len > len_max {
        return Err(anyhow::Error::new(too_large(read_len, len_max)).context(format!("{}", path.display())));
    }
    Ok((value, progress))
}

fn read_stdin(len_max: u64) -> anyhow::Result<Vec<u8>> {
    let mut value = Vec::new();
    std::io::stdin().lock().take(len_max.saturating_add(1)).read_to_end(&mut value).context("cannot read stdin")?;
    let len = value.len() as u64;
    if len > len_max {
        return Err(anyhow::Error::new(too_large(len, len_max)).context("stdin"));
    }
    Ok(value)
}

fn write_file(path: &Path, value: &[u8]) -> anyhow::Result<()> {
    let mut file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let progress = progress_bar(value.len() as u64, "saving");
    for piece in value.chunks(COPY_CHUNK_BYTES) {
        file.write_all(piece).with_context(|| format!("cannot write {}", path.display()))?;
        if let Some(progress) = &progress {
            progress.inc(piece.len() as u64);
        }
    }
    file.sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
    if let Some(progress) = progress {
        progress.finish_and_clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("meridian").chain(args.iter().copied()))
    }

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_every_command() {
        let cli = parse(&["--addr", "10.0.0.1:1", "put", "k", "--value", "v"]).unwrap();
        assert_eq!(cli.addr, "10.0.0.1:1");
        assert!(
            matches!(cli.command, Command::Put { ref key, file: None, value: Some(ref v) } if key == "k" && v == "v")
        );

        let cli = parse(&["put", "k", "-", "--json"]).unwrap();
        assert!(cli.json);
        assert!(matches!(cli.command, Command::Put { file: Some(ref f), value: None, .. } if f == Path::new("-")));

        let cli = parse(&["get", "k", "--at", "7", "-o", "out.bin", "--timeout-ms", "5"]).unwrap();
        assert_eq!(cli.timeout_ms, 5);
        assert!(matches!(cli.command, Command::Get { at: Some(7), output: Some(_), .. }));

        let cli = parse(&["ls", "a/", "--limit", "10", "--start-after", "a/b", "--all"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Ls { ref prefix, limit: 10, start_after: Some(ref s), at: None, all: true } if prefix == "a/" && s == "a/b"
        ));
        let cli = parse(&["ls"]).unwrap();
        assert!(matches!(cli.command, Command::Ls { ref prefix, limit: 1000, all: false, .. } if prefix.is_empty()));

        assert!(matches!(parse(&["rm", "k"]).unwrap().command, Command::Rm { .. }));
        assert!(matches!(parse(&["stat", "k", "--at", "3"]).unwrap().command, Command::Stat { at: Some(3), .. }));
        assert!(matches!(
            parse(&["replication", "status"]).unwrap().command,
            Command::Replication { command: ReplicationCommand::Status }
        ));
    }

    fn cluster(args: &[&str]) -> cluster::ClusterArgs {
        match parse(args).unwrap().command {
            Command::Cluster(cluster) => cluster,
            other => panic!("not a cluster command: {other:?}"),
        }
    }

    #[test]
    fn parses_cluster_commands() {
        let args = cluster(&["cluster", "--control", "a:1,b:2", "--control", "c:3", "--tls-dir", "/t", "status"]);
        assert_eq!(args.flags.control, ["a:1", "b:2", "c:3"]);
        assert_eq!(args.flags.tls_name, "admin");
        assert!(matches!(args.command, cluster::ClusterCommand::Status));
        let target = args.flags.target().unwrap();
        assert_eq!(target.seeds, ["a:1", "b:2", "c:3"]);
        assert_eq!(target.tls_dir, Path::new("/t"));

        // Group options may also follow the subcommand; the top-level --addr is not add-node's.
        let args = cluster(&[
            "--addr",
            "d:9",
            "cluster",
            "add-node",
            "--id",
            "4",
            "--addr",
            "h:7",
            "--control",
            "a:1",
            "--tls-name",
            "ops",
        ]);
        assert!(matches!(args.command, cluster::ClusterCommand::AddNode { id: 4, ref addr } if addr == "h:7"));
        assert_eq!(args.flags.tls_name, "ops");
        assert_eq!(args.flags.target(), Err("cluster commands need --tls-dir DIR (or MERIDIAN_TLS_DIR)"));

        let cli = parse(&["cluster", "remove-node", "--id", "2", "--json"]).unwrap();
        assert!(cli.json);
        let Command::Cluster(args) = cli.command else { panic!("not a cluster command") };
        assert!(matches!(args.command, cluster::ClusterCommand::RemoveNode { id: 2 }));
        assert_eq!(args.flags.target(), Err("cluster commands need --control ADDR (or MERIDIAN_CONTROL)"));
    }

    #[test]
    fn rejects_bad_cluster_usage() {
        for args in [
            &["cluster"][..],
            &["cluster", "add-node", "--id", "4"],
            &["cluster", "add-node", "--id", "0", "--addr", "h:1"],
            &["cluster", "remove-node"],
            &["cluster", "remove-node", "--id", "x"],
        ] {
            let error = parse(args).unwrap_err();
            assert_eq!(error.exit_code(), i32::from(exit_code::USAGE), "{args:?}");
        }
    }

    #[test]
    fn rejects_bad_usage() {
        for args in [
            &["put", "k", "file", "--value", "v"][..],
            &["ls", "--limit", "0"],
            &["get"],
            &["stat", "k", "--at", "-1"],
            &["frobnicate"],
        ] {
            let error = parse(args).unwrap_err();
            assert_eq!(error.exit_code(), i32::from(exit_code::USAGE), "{args:?}");
        }
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("3  not found"));
        assert!(help.contains("5  unavailable"));
    }

    #[test]
    fn describe_skips_repeated_causes() {
        let refused = ClientError::Connect { addr: "h:1".into(), source: std::io::Error::other("refused") };
        let error = anyhow::Error::new(refused).context("get \"k\"");
        assert_eq!(describe(&error), "get \"k\": cannot connect to h:1: refused");
    }

    #[test]
    fn exit_code_found_through_context() {
        let error = anyhow::Error::new(ClientError::Timeout).context("get \"k\"");
        assert_eq!(exit_code_of(&error), exit_code::UNAVAILABLE);
        assert_eq!(exit_code_of(&anyhow::anyhow!("plain")), exit_code::OTHER);

        let refused = anyhow::Error::new(cluster::ControlError::Refused("in progress".into())).context("cluster x");
        assert_eq!(exit_code_of(&refused), exit_code::REFUSED);
        assert_eq!(describe(&refused), "cluster x: refused by the control plane: in progress");
        let down = anyhow::anyhow!("timed out").context(cluster::ControlError::Unavailable).context("cluster status");
        assert_eq!(exit_code_of(&down), exit_code::UNAVAILABLE);
        assert_eq!(describe(&down), "cluster status: control plane unavailable: timed out");
    }
}
