//! `bench snapshot`'s archive half: a data set written both into a fresh data node and into a
//! directory, exported into our archive (full, then incremental after changing a fraction of
//! it), next to `restic backup` of the directory (ingest throughput and stored bytes) and
//! `rsync -a` of the directory to another one (the incremental step), all in the same run.
//!
//! Each timed step starts on a quiet device (`sync`, then a pause), so no tool pays for the
//! writeback of the one before it, and the incremental rounds take turns going first. Both
//! archives make what they write durable before they report success (ours syncs every pack,
//! then the index); restic also encrypts and authenticates every blob (AES-256 with
//! Poly1305), which ours does not: its repository is private, ours relies on the file
//! system's or the object store's access control.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use client::archive::Archive;
use client::{Client, ClientConfig};

use super::load::payload;
use super::scenario::Draw;
use crate::kv::Dataplane;
use crate::report::Figures;

/// Smallest and largest file of the data set.
const FILE_MIN: u64 = 64 << 10;
const FILE_MAX: u64 = 4 << 20;
/// Each changed file has this much rewritten in place.
const CHANGE_BYTES: usize = 64 << 10;
/// The data node's chunk size for the data set.
const STORED_CHUNK_BYTES: usize = 64 << 10;
/// Values written to the data node at once.
const WRITES_IN_FLIGHT: usize = 8;

/// The plan of the comparison.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Data set size.
    pub bytes: u64,
    /// Fraction of its bytes changed before the incremental step.
    pub change: f64,
    /// Incremental rounds (change, then export, restic and rsync); the figures are their
    /// medians, so that one disturbed step on a small machine does not decide the ratio.
    pub rounds: usize,
    /// Seed of the file sizes and contents.
    pub seed: u64,
}

/// Whether restic and rsync are there.
pub fn tools_available() -> bool {
    [("restic", "version"), ("rsync", "--version")]
        .iter()
        .all(|(tool, flag)| Command::new(tool).arg(flag).output().is_ok_and(|output| output.status.success()))
}

fn run(command: &mut Command) -> Result<Duration> {
    let started = Instant::now();
    let output = command.output().with_context(|| format!("running {command:?}"))?;
    ensure!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(started.elapsed())
}

fn tree_bytes(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(next) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else { continue };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => stack.push(entry.path()),
                Ok(meta) => total += meta.len(),
                Err(_) => {}
            }
        }
    }
    total
}

struct Restic {
    repo: PathBuf,
    password: PathBuf,
}

impl Restic {
    fn init(dir: &Path) -> Result<Self> {
        let password = dir.join("restic-password");
        std::fs::write(&password, "meridian-bench")?;
        let restic = Self { repo: dir.join("restic-repo"), password };
        run(restic.command().arg("init"))?;
        Ok(restic)
    }

    fn command(&self) -> Command {
        let mut command = Command::new("restic");
        command.arg("--repo").arg(&self.repo).arg("--password-file").arg(&self.password).arg("--quiet");
        command.env_remove("RESTIC_REPOSITORY").env_remove("RESTIC_PASSWORD");
        command
    }

    fn backup(&self, source: &Path) -> Result<Duration> {
        run(self.command().arg("backup").arg(".").current_dir(source))
    }
}

/// One incremental round's measurements.
struct Round {
    changed: u64,
    export: client::archive::ExportStats,
    restic: Duration,
    rsync: Duration,
}

/// Rewrites 64 KiB in the middle of enough files (by `plan.change` of the data set; each round
/// starts picking them elsewhere) in the directory and on the data node. Returns the bytes changed and the
/// timestamp of the last write.
async fn change(
    client: &Client,
    source: &Path,
    files: &[(String, u64)],
    plan: &Plan,
    round: usize,
) -> Result<(u64, u64)> {
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    // The plan's fraction is checked to be in (0, 0.5]: the product fits and is positive.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let wanted = (total as f64 * plan.change) as u64;
    let (mut changed, mut last) = (0u64, 0u64);
    let mut index = 0usize;
    while changed < wanted && index < files.len() {
        let (name, len) = &files[(index * 7919 + round * 104_729) % files.len()];
        index += 1;
        if *len < CHANGE_BYTES as u64 {
            continue;
        }
        let path = source.join(name);
        let mut bytes = std::fs::read(&path)?;
        let at = bytes.len() / 2 - CHANGE_BYTES / 2;
        let seed = plan.seed + 1_000_000 * (round as u64 + 1) + index as u64;
        bytes[at..at + CHANGE_BYTES].copy_from_slice(&payload(seed, CHANGE_BYTES));
        std::fs::write(&path, &bytes)?;
        last = last.max(client.put(format!("data/{name}").as_bytes(), &bytes).await?);
        changed += CHANGE_BYTES as u64;
    }
    ensure!(changed > 0, "no file of the data set is large enough to change {CHANGE_BYTES} bytes of it");
    Ok((changed, last))
}

/// Writes the data set, exports it, changes it, exports again; restic and rsync do the same
/// on the directory. Sets the figures (`*_ratio` headline keys among them).
pub async fn compare(dir: &Path, dataplane: &Path, plan: &Plan, figures: &mut Figures) -> Result<()> {
    let say = |text: &str| eprintln!("bench snapshot: {text}");
    let source = dir.join("dataset");
    std::fs::create_dir_all(&source)?;
    // The node stores values in 64 KiB chunks (the default is 1 MiB): an incremental export
    // then reads about 64 KiB around each change instead of a whole MiB.
    let node_config = dir.join("archive-node.toml");
    std::fs::write(&node_config, format!("[store]\nchunk_bytes = {STORED_CHUNK_BYTES}\n"))?;
    let log = dir.join("logs").join("dataplane-archive.log");
    let node = Dataplane::start_with(dataplane, &dir.join("archive-node"), 1, &log, Some(&node_config))?;
    let config = ClientConfig { request_timeout: Duration::from_secs(120), ..ClientConfig::default() };
    let client = Client::connect(&node.addresses[0], config).await?;

    // The data set: text-like files of 64 KiB - 4 MiB, the same bytes in both places.
    say(&format!("writing a {} MiB data set to a data node and to {} ...", plan.bytes >> 20, source.display()));
    let mut draw = Draw::new(plan.seed);
    let mut files = Vec::new();
    let mut total = 0u64;
    while total < plan.bytes {
        let len = draw.log_uniform(FILE_MIN, FILE_MAX).min(plan.bytes - total).max(1);
        files.push((format!("file-{:05}.txt", files.len()), len));
        total += len;
    }
    let mut t1 = 0;
    for (batch_index, batch) in files.chunks(WRITES_IN_FLIGHT).enumerate() {
        let mut tasks = tokio::task::JoinSet::new();
        for (index, (name, len)) in batch.iter().enumerate() {
            let file = (batch_index * WRITES_IN_FLIGHT + index) as u64;
            let bytes = payload(plan.seed.wrapping_mul(1_000_003).wrapping_add(file), usize::try_from(*len)?);
            std::fs::write(source.join(name), &bytes)?;
            let (client, key) = (client.clone(), format!("data/{name}"));
            tasks.spawn(async move { client.put(key.as_bytes(), &bytes).await });
        }
        while let Some(done) = tasks.join_next().await {
            t1 = t1.max(done??);
        }
    }
    figures.set("dataset_bytes", total);
    figures.set("dataset_stored_chunk_bytes", STORED_CHUNK_BYTES);
    figures.set("dataset_files", files.len());

    let archive_dir = dir.join("archive");
    let archive = Archive::open(archive_dir.to_str().context("archive path")?)?;
    let restic = Restic::init(dir)?;
    // The full step once each, in turns with the run's seed; the rounds below alternate.
    let (mut full, mut restic_full) = (None, None);
    for step in 0..2 {
        crate::device::quiesce();
        if (step + plan.seed).is_multiple_of(2) {
            say("full export into the archive ...");
            full = Some(archive.export(&client, 1, t1, &|_, _| {}).await?);
        } else {
            say("restic backup (first) ...");
            restic_full = Some(restic.backup(&source)?);
        }
    }
    let (Some(full), Some(restic_full)) = (full, restic_full) else { bail!("a full step did not run") };
    figures.set("full_export_went_first", plan.seed.is_multiple_of(2));
    let stored_after_full = (archive.stored_bytes().await?, tree_bytes(&restic.repo));
    let mirror = dir.join("rsync-copy");
    run(Command::new("rsync").arg("-a").arg(format!("{}/", source.display())).arg(&mirror))?;

    // Each round changes a fraction of the bytes (64 KiB rewritten in place in enough files,
    // picked from another starting point each round), then times the three tools on the change.
    let mut rounds = Vec::with_capacity(plan.rounds);
    let mut stored_after_first = (0, 0);
    for round in 0..plan.rounds {
        let (changed, t2) = change(&client, &source, &files, plan, round).await?;
        say(&format!(
            "round {}/{}: changed {changed} bytes; incremental export, restic, rsync ...",
            round + 1,
            plan.rounds
        ));
        let id = 2 + u64::try_from(round)?;
        // The three take turns going first: whichever runs first meets the writeback of the
        // change (and the next ones that of the tools before them).
        let (mut export, mut restic_time, mut rsync) = (None, None, None);
        for step in 0..3 {
            crate::device::quiesce();
            match (step + round) % 3 {
                0 => export = Some(archive.export(&client, id, t2, &|_, _| {}).await?),
                1 => restic_time = Some(restic.backup(&source)?),
                _ => {
                    let mut command = Command::new("rsync");
                    rsync = Some(run(command.arg("-a").arg(format!("{}/", source.display())).arg(&mirror))?);
                }
            }
        }
        let (Some(export), Some(restic_time), Some(rsync)) = (export, restic_time, rsync) else {
            bail!("round {}: a step did not run", round + 1);
        };
        ensure!(export.parent == Some(id - 1), "round {}: the export was not incremental", round + 1);
        if round == 0 {
            stored_after_first = (archive.stored_bytes().await?, tree_bytes(&restic.repo));
        }
        say(&format!(
            "round {}/{}: export {:.0} ms, restic {:.0} ms, rsync {:.0} ms",
            round + 1,
            plan.rounds,
            export.elapsed.as_secs_f64() * 1000.0,
            restic_time.as_secs_f64() * 1000.0,
            rsync.as_secs_f64() * 1000.0
        ));
        rounds.push(Round { changed, export, restic: restic_time, rsync });
    }
    let ours_stored = archive.stored_bytes().await?;
    let restic_stored = tree_bytes(&restic.repo);
    drop(client);
    node.stop()?;

    // The copies are scratch: the figures stay, the gigabytes go.
    for scratch in [&source, &mirror, &restic.repo, &archive_dir, &dir.join("archive-node")] {
        let _ = std::fs::remove_dir_all(scratch);
    }

    let secs = |d: Duration| d.as_secs_f64().max(1e-6);
    let mb_s = |bytes: u64, d: Duration| bytes as f64 / 1e6 / secs(d);
    figures.set_f64("export_full_ms", full.elapsed.as_secs_f64() * 1000.0);
    figures.set_f64("export_full_mb_per_s", mb_s(total, full.elapsed));
    figures.set_f64("restic_backup_full_ms", restic_full.as_secs_f64() * 1000.0);
    figures.set_f64("restic_backup_full_mb_per_s", mb_s(total, restic_full));
    figures.set_f64("ingest_throughput_vs_restic_ratio", secs(restic_full) / secs(full.elapsed));
    let median = |pick: &dyn Fn(&Round) -> Duration| {
        let mut all: Vec<Duration> = rounds.iter().map(pick).collect();
        all.sort_unstable();
        all.get(all.len() / 2).copied().unwrap_or_default()
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (export, rsync) = (median(&|r| r.export.elapsed), median(&|r| r.rsync));
    let n = rounds.len().max(1) as u64;
    figures.set("incremental_rounds", rounds.len());
    figures.set("changed_bytes", rounds.iter().map(|r| r.changed).sum::<u64>() / n);
    figures.set_f64("export_incremental_ms", ms(export));
    figures.set_f64("export_incremental_max_ms", ms(rounds.iter().map(|r| r.export.elapsed).max().unwrap_or_default()));
    figures.set("export_incremental_keys_read", rounds.iter().map(|r| r.export.keys_read).sum::<u64>() / n);
    figures.set("export_incremental_bytes_written", rounds.iter().map(|r| r.export.bytes_written).sum::<u64>() / n);
    figures.set_f64("rsync_incremental_ms", ms(rsync));
    figures.set_f64("rsync_incremental_min_ms", ms(rounds.iter().map(|r| r.rsync).min().unwrap_or_default()));
    figures.set_f64("restic_backup_incremental_ms", ms(median(&|r| r.restic)));
    figures.set_f64("export_time_vs_rsync_ratio", secs(export) / secs(rsync));
    // The worst single round, each export against the rsync of the same change.
    let worst = rounds.iter().map(|r| secs(r.export.elapsed) / secs(r.rsync)).fold(0.0, f64::max);
    figures.set_f64("export_time_vs_rsync_worst_round_ratio", worst);
    figures.set("archive_stored_bytes", ours_stored);
    // What restic does that ours does not, beside the figures it is compared on.
    figures.set("restic_encrypts", true);
    figures.set("archive_encrypts", false);
    figures.set("restic_stored_bytes", restic_stored);
    // Stored bytes compared at three points: after the full backup, after the first
    // incremental round (the headline: a data set and its 1% change), after every round.
    let ratio = |(ours, theirs): (u64, u64)| ours as f64 / theirs.max(1) as f64;
    figures.set("archive_stored_after_full_bytes", stored_after_full.0);
    figures.set("restic_stored_after_full_bytes", stored_after_full.1);
    figures.set("archive_stored_after_first_round_bytes", stored_after_first.0);
    figures.set("restic_stored_after_first_round_bytes", stored_after_first.1);
    figures.set_f64("dedup_after_full_vs_restic_ratio", ratio(stored_after_full));
    figures.set_f64("dedup_vs_restic_ratio", ratio(stored_after_first));
    figures.set_f64("dedup_after_rounds_vs_restic_ratio", ratio((ours_stored, restic_stored)));
    Ok(())
}
