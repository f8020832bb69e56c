//! `meridian snapshot export|archived|restore|verify|prune`: the snapshot archive
//! ([`client::archive`]) from the command line, with progress bars on a terminal.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use client::archive::{Archive, RestoreTarget};
use client::{Client, ClientConfig};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::cluster::SnapshotCommand;
use crate::print_json;

/// A bar on stderr when it is a terminal; `bytes` picks byte or count units.
fn bar(message: &'static str, bytes: bool) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let template = if bytes {
        "{msg:>9} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}"
    } else {
        "{msg:>9} [{bar:40}] {pos}/{len} keys {elapsed}"
    };
    let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::new(0).with_style(style.progress_chars("=> ")).with_message(message);
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

fn report(bar: Option<&ProgressBar>) -> impl Fn(u64, u64) + Sync + '_ {
    move |done, total| {
        if let Some(bar) = bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    }
}

async fn connect(addr: &str, timeout: Duration) -> anyhow::Result<Client> {
    let config = ClientConfig {
        connect_timeout: timeout,
        request_timeout: timeout.max(Duration::from_secs(70)),
        ..ClientConfig::default()
    };
    Ok(Client::connect(addr, config).await?)
}

/// Exports snapshot `id` at `glt` from the node at `addr`.
pub async fn export(
    location: &str,
    id: u64,
    glt: u64,
    addr: &str,
    json: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let archive = Archive::open(location)?;
    let client = connect(addr, timeout).await?;
    let bar = bar("export", false);
    let stats = archive.export(&client, id, glt, &report(bar.as_ref())).await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let mut out = std::io::stdout().lock();
    if json {
        print_json(
            &mut out,
            &json!({
                "id": id, "glt": glt, "parent": stats.parent, "keys": stats.keys, "keys_read": stats.keys_read,
                "bytes_read": stats.bytes_read, "chunks_new": stats.chunks_new, "chunks_reused": stats.chunks_reused,
                "bytes_written": stats.bytes_written, "elapsed_ms": stats.elapsed.as_secs_f64() * 1000.0,
            }),
        )
    } else {
        let base = stats.parent.map_or_else(|| "full".to_owned(), |parent| format!("incremental from {parent}"));
        Ok(writeln!(
            out,
            "snapshot {id} exported ({base}): {} keys, {} read ({} bytes), {} new chunks, {} reused, {} bytes written in {:.2} s",
            stats.keys,
            stats.keys_read,
            stats.bytes_read,
            stats.chunks_new,
            stats.chunks_reused,
            stats.bytes_written,
            stats.elapsed.as_secs_f64()
        )?)
    }
}

/// `snapshot get` and `snapshot ls`: reads at the snapshot's timestamp `glt` once the node at
/// `addr` can read it consistently.
pub async fn read(
    command: &SnapshotCommand,
    glt: u64,
    addr: &str,
    json: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let client = connect(addr, timeout).await?;
    client.wait_readable(glt, timeout).await.context("waiting for the snapshot to be readable here")?;
    let mut out = std::io::stdout().lock();
    match command {
        SnapshotCommand::Get { key, output, .. } => {
            let found = client.get(key.as_bytes(), Some(glt)).await?.ok_or(client::ClientError::NotFound)?;
            match output {
                Some(path) => {
                    std::fs::write(path, &found.value).with_context(|| format!("writing {}", path.display()))?;
                    if json {
                        print_json(
                            &mut out,
                            &json!({ "key": key, "ts": found.ts, "size": found.value.len(), "path": path }),
                        )?;
                    }
                    Ok(())
                }
                None => {
                    out.write_all(&found.value)?;
                    Ok(out.flush()?)
                }
            }
        }
        SnapshotCommand::Ls { prefix, .. } => {
            let entries = client.list_all(prefix.as_bytes(), Some(glt)).await?;
            if json {
                let list: Vec<_> = entries
                    .iter()
                    .map(|e| json!({ "key": String::from_utf8_lossy(&e.key), "size": e.size, "ts": e.ts }))
                    .collect();
                print_json(&mut out, &json!({ "glt": glt, "entries": list }))
            } else {
                for entry in &entries {
                    writeln!(out, "{}\t{}\t{}", String::from_utf8_lossy(&entry.key), entry.size, entry.ts)?;
                }
                Ok(())
            }
        }
        other => bail!("{other:?} is not a snapshot read"),
    }
}

/// The archive-only commands (and restore into a cluster through `addr`).
pub async fn run(command: &SnapshotCommand, addr: &str, json: bool, timeout: Duration) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        SnapshotCommand::Archived { archive } => {
            let archive = Archive::open(archive)?;
            let snapshots = archive.snapshots().await?;
            let stored = archive.stored_bytes().await?;
            if json {
                let list: Vec<_> = snapshots
                    .iter()
                    .map(|s| json!({ "id": s.id, "glt": s.glt, "parent": s.parent, "keys": s.keys.len(), "created_ms": s.created_ms }))
                    .collect();
                print_json(&mut out, &json!({ "snapshots": list, "stored_bytes": stored }))
            } else {
                writeln!(out, "{:<6} {:<22} {:<7} {:<9} CREATED (UNIX MS)", "ID", "GLT", "PARENT", "KEYS")?;
                for s in &snapshots {
                    let parent = s.parent.map_or_else(|| "-".to_owned(), |p| p.to_string());
                    writeln!(out, "{:<6} {:<22} {:<7} {:<9} {}", s.id, s.glt, parent, s.keys.len(), s.created_ms)?;
                }
                Ok(writeln!(out, "{} snapshots, {stored} bytes stored", snapshots.len())?)
            }
        }
        SnapshotCommand::Restore { id, archive, prefix, to_dir, to_cluster } => {
            let archive = Archive::open(archive)?;
            let client = if *to_cluster { Some(connect(addr, timeout).await?) } else { None };
            let target = match (&client, to_dir) {
                (Some(client), _) => RestoreTarget::Cluster(client),
                (None, Some(dir)) => RestoreTarget::Directory(dir),
                (None, None) => bail!("restore needs --to-dir DIR or --to-cluster"),
            };
            let bar = bar("restore", true);
            let stats = archive.restore(*id, prefix.as_bytes(), target, &report(bar.as_ref())).await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            if json {
                print_json(&mut out, &json!({ "id": id, "keys": stats.keys, "bytes": stats.bytes }))
            } else {
                Ok(writeln!(out, "snapshot {id}: {} keys, {} bytes restored", stats.keys, stats.bytes)?)
            }
        }
        SnapshotCommand::Verify { archive } => {
            let archive = Archive::open(archive)?;
            let bar = bar("verify", true);
            let verified = archive.verify(&report(bar.as_ref())).await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            if json {
                print_json(
                    &mut out,
                    &json!({ "snapshots": verified.snapshots, "packs": verified.packs, "chunks": verified.chunks,
                             "bytes": verified.bytes, "errors": verified.errors }),
                )?;
            } else {
                for error in &verified.errors {
                    writeln!(out, "damaged: {error}")?;
                }
                writeln!(
                    out,
                    "{} snapshots, {} packs, {} chunks, {} bytes checked: {} problems",
                    verified.snapshots,
                    verified.packs,
                    verified.chunks,
                    verified.bytes,
                    verified.errors.len()
                )?;
            }
            if verified.errors.is_empty() {
                Ok(())
            } else {
                bail!("{} problems found in the archive", verified.errors.len())
            }
        }
        SnapshotCommand::Prune { archive, keep_last } => {
            let archive = Archive::open(archive)?;
            let pruned = archive.prune(*keep_last).await.context("prune")?;
            if json {
                print_json(
                    &mut out,
                    &json!({ "snapshots_deleted": pruned.snapshots_deleted, "packs_deleted": pruned.packs_deleted,
                             "bytes_freed": pruned.bytes_freed, "deferred": pruned.deferred }),
                )
            } else {
                let deferred =
                    if pruned.deferred { "; an export is running, packs are left for the next prune" } else { "" };
                Ok(writeln!(
                    out,
                    "deleted snapshots {:?}, {} packs, {} bytes{deferred}",
                    pruned.snapshots_deleted, pruned.packs_deleted, pruned.bytes_freed
                )?)
            }
        }
        other => bail!("{other:?} needs the control plane"),
    }
}
