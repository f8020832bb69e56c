//! The report of a `bench cluster` run: every figure with its unit in its key (`report.json`),
//! the same as a page (`report.md`), CSV series and SVG/PNG plots, and the terminal summary.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use super::load::Record;
use super::plot::{Chart, Line, Span};
use super::scenario::{Class, REGIONS};
use super::{ClusterArgs, Event, Lag};
use crate::device::{FioResult, ProbeResult};
use crate::report::{Figures, percentile_us, set_rpo_figures};

/// The figures of one run and where they are written.
#[derive(Debug)]
pub struct Report {
    figures: Figures,
    dir: PathBuf,
}

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Report {
    /// Starts with the scenario.
    pub fn new(args: &ClusterArgs, dir: &Path) -> Self {
        let mut figures = Figures::default();
        figures.set("bench", "cluster");
        figures.set("report_dir", dir.display().to_string());
        figures.set("control_plane_nodes", 3);
        figures.set("regions", 3);
        figures.set("home_regions", args.homes.join(","));
        figures.set("shards_per_region", args.shards);
        figures.set("workload", args.workload.describe());
        figures.set("rate_per_s", args.rate);
        figures.set("warmup_ms", ms(args.warmup));
        figures.set("duration_ms", ms(args.duration));
        figures.set("one_way_delay_ms", ms(args.delay));
        figures.set("jitter_ms", ms(args.jitter));
        figures.set_f64("loss_fraction", args.loss);
        figures.set("file_min_bytes", args.file_min);
        figures.set("file_max_bytes", args.file_max);
        figures.set("seed", args.seed);
        Self { figures, dir: dir.to_owned() }
    }

    /// Names the bench that ran (`cluster` or `snapshot`); `bench snapshot`'s headline is the
    /// worst region's availability p99 under `availability_p99_ms`. Rewrites report.json.
    pub fn name(&mut self, bench: &str) -> Result<()> {
        self.figures.set("bench", bench);
        if bench == "snapshot"
            && let Some(p99) = self.figures.get_f64("snapshot_availability_p99_ms")
        {
            self.figures.set_f64("availability_p99_ms", p99);
        }
        write_file(&self.dir.join("report.json"), &self.to_json())
    }

    /// The regions with RPO figures (the replica regions of the run), in order.
    fn rpo_regions(&self) -> impl Iterator<Item = &'static str> + use<'_> {
        REGIONS.into_iter().filter(|region| self.figures.get(&format!("{region}_rpo_p99_ms")).is_some())
    }

    /// Every figure, to add to.
    pub fn figures_mut(&mut self) -> &mut Figures {
        &mut self.figures
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.figures.set(key, value);
    }

    pub fn to_json(&self) -> String {
        self.figures.to_json()
    }

    /// The device limit: the probe's durable 4 KiB write (each O_DIRECT write and its
    /// fdatasync timed together, as `bench wal` takes its baseline), and fio's figures beside
    /// it (write and fdatasync timed apart, so no p99 of the pair).
    pub fn device(&mut self, probe: &ProbeResult, fio: &FioResult) {
        let f = &mut self.figures;
        f.set_f64("device_writes_per_s", probe.cycle.len() as f64 / probe.elapsed_s);
        f.set_f64("device_write_p50_us", percentile_us(&probe.cycle, 50.0));
        f.set_f64("device_write_p99_us", percentile_us(&probe.cycle, 99.0));
        f.set_f64("fio_writes_per_s", fio.writes_per_s);
        f.set_f64("fio_write_p99_us", fio.write_p99_us);
        f.set_f64("fio_sync_p99_us", fio.sync_p99_us);
    }

    /// The writes (each at its shard's home).
    pub fn load(&mut self, record: &Record, args: &ClusterArgs, load_ended: Duration) {
        let f = &mut self.figures;
        let measured = record.latency.len();
        f.set("writes_acknowledged", record.acked.len());
        f.set("writes_failed", record.failed);
        if let Some(error) = &record.first_error {
            f.set("first_write_error", error.clone());
        }
        let measured_for = load_ended.saturating_sub(args.warmup).as_secs_f64().max(1e-3);
        f.set_f64("write_throughput_per_s", measured as f64 / measured_for);
        f.set_f64("write_p50_us", percentile_us(&record.latency, 50.0));
        f.set_f64("write_p99_us", percentile_us(&record.latency, 99.0));
        f.set_f64("write_p999_us", percentile_us(&record.latency, 99.9));
        f.set_f64("write_max_us", record.latency.max() as f64 / 1000.0);
        for (class, figures) in &record.by_class {
            let name = class.name();
            f.set(format!("{name}_writes_acknowledged"), figures.acked);
            f.set(format!("{name}_writes_failed"), figures.failed);
            f.set(format!("{name}_bytes_written"), figures.bytes);
            f.set_f64(format!("{name}_write_p50_us"), percentile_us(&figures.latency, 50.0));
            f.set_f64(format!("{name}_write_p99_us"), percentile_us(&figures.latency, 99.0));
        }
        if let Some(device) = f.get_f64("device_write_p99_us") {
            f.set_f64("write_p99_vs_device_ratio", percentile_us(&record.latency, 99.0) / device);
        }
    }

    /// RPO per replica region, losses per region, and the convergence time.
    pub fn replication(&mut self, lags: &[Lag], lost: &[(&str, u64, u64)], converged_after: Duration) {
        let f = &mut self.figures;
        set_rpo_figures(f, lags.iter().map(|lag| (lag.region, &lag.histogram)));
        let mut lost_total = 0;
        let mut corrupt_total = 0;
        for (region, missing, corrupt) in lost {
            f.set(format!("{region}_lost_writes"), *missing);
            lost_total += missing;
            corrupt_total += corrupt;
        }
        f.set("lost_writes", lost_total);
        f.set("values_verified_per_region", super::VERIFY_PER_REGION);
        f.set("values_corrupt", corrupt_total);
        f.set("converged_after_load_ms", ms(converged_after));
    }

    /// Global snapshots: per region, request-to-readable p50/p99/max; the worst region's p99
    /// as `snapshot_availability_p99_ms`; and the comparison of the last ones across regions.
    pub fn snapshots(&mut self, snapshots: &super::snapshots::Figures) {
        let f = &mut self.figures;
        f.set("snapshots_taken", snapshots.taken);
        f.set("snapshot_create_errors", snapshots.create_errors);
        let (mut worst_p99, mut worst_max) = (None::<f64>, 0.0f64);
        for (region, histogram) in &snapshots.available_us {
            let p99 = histogram.value_at_quantile(0.99) as f64 / 1000.0;
            let max = histogram.max() as f64 / 1000.0;
            f.set_f64(
                format!("{region}_snapshot_availability_p50_ms"),
                histogram.value_at_quantile(0.5) as f64 / 1000.0,
            );
            f.set_f64(format!("{region}_snapshot_availability_p99_ms"), p99);
            f.set_f64(format!("{region}_snapshot_availability_max_ms"), max);
            worst_p99 = Some(worst_p99.map_or(p99, |worst| worst.max(p99)));
            worst_max = worst_max.max(max);
        }
        if let Some(worst_p99) = worst_p99 {
            f.set_f64("snapshot_availability_p99_ms", worst_p99);
            f.set_f64("snapshot_availability_max_ms", worst_max);
        }
        f.set("snapshots_failed", snapshots.failed.values().sum::<u64>());
        f.set("snapshots_compared_across_regions", snapshots.compared);
        f.set("snapshot_compared_keys", snapshots.compared_keys);
        f.set("snapshots_differing_across_regions", snapshots.differing);
        f.set("chain_writes", snapshots.chain_writes);
        f.set("snapshot_causal_violations", snapshots.causal_violations);
    }

    pub fn events(&mut self, events: &[Event]) {
        let list = serde_json::to_value(events).unwrap_or(Value::Null);
        self.figures.set("events", list);
        let recovery = events.iter().filter_map(|event| event.recovery_ms).max();
        if let Some(recovery) = recovery {
            self.figures.set("event_recovery_max_ms", recovery);
        }
    }

    /// Writes the series, the plots, `report.json` and `report.md`.
    pub fn write(&mut self, record: &Record, lags: &[Lag], events: &[Event]) -> Result<()> {
        let spans: Vec<Span> = events
            .iter()
            .map(|event| Span {
                label: format!("{} {}", event.kind, event.region),
                from: event.start_ms as f64 / 1000.0,
                to: event.restored_ms.unwrap_or(event.end_ms) as f64 / 1000.0,
                kind: usize::from(event.kind != "partition"),
            })
            .collect();

        let mut csv = String::from("second,writes,failed,p50_ms,p99_ms,p999_ms\n");
        let mut latency_lines: Vec<Line> = ["p50", "p99", "p99.9"]
            .iter()
            .map(|label| Line { label: format!("write {label}"), points: Vec::new() })
            .collect();
        for (second, window) in record.seconds.iter().enumerate() {
            let quantiles = [0.5, 0.99, 0.999].map(|q| window.latency.value_at_quantile(q) as f64 / 1e6);
            let _ = writeln!(
                csv,
                "{second},{},{},{:.3},{:.3},{:.3}",
                window.latency.len(),
                window.failed,
                quantiles[0],
                quantiles[1],
                quantiles[2]
            );
            if !window.latency.is_empty() {
                for (line, value) in latency_lines.iter_mut().zip(quantiles) {
                    line.points.push((second as f64 + 0.5, value));
                }
            }
        }
        write_file(&self.dir.join("series/write_latency.csv"), &csv)?;

        let mut csv = String::from("region,elapsed_ms,lag_ms\n");
        let mut rpo_lines = Vec::new();
        for lag in lags {
            let mut line = Line { label: format!("RPO {}", lag.region), points: Vec::new() };
            for (at, lag_us) in &lag.series {
                let _ = writeln!(csv, "{},{at},{:.3}", lag.region, *lag_us as f64 / 1000.0);
                line.points.push((*at as f64 / 1000.0, *lag_us as f64 / 1000.0));
            }
            rpo_lines.push(line);
        }
        write_file(&self.dir.join("series/rpo.csv"), &csv)?;

        let delay = self.figures.get_f64("one_way_delay_ms").unwrap_or(0.0);
        let charts = [
            (
                "write_latency",
                Chart {
                    title: "Write latency at the shards' homes, per second (from intended send time)".into(),
                    x_label: "seconds since the load started".into(),
                    y_label: "ms".into(),
                    lines: latency_lines,
                    spans: spans.clone(),
                    gap: 1.5,
                },
            ),
            (
                "rpo",
                Chart {
                    title: format!("RPO per replica region (lag behind the shards' homes, {delay} ms one way)"),
                    x_label: "seconds since the load started".into(),
                    y_label: "ms".into(),
                    lines: rpo_lines,
                    spans,
                    gap: 0.25,
                },
            ),
        ];
        let mut plots = Vec::new();
        for (name, chart) in &charts {
            for path in super::plot::render(chart, &self.dir.join("plots").join(name))? {
                plots.push(Value::String(path.display().to_string()));
            }
        }
        self.figures.set("plots", plots);
        write_file(&self.dir.join("report.json"), &format!("{}\n", self.figures.to_json()))?;
        write_file(&self.dir.join("report.md"), &self.markdown())?;
        Ok(())
    }

    /// A table row: `first`, then the figure of each key.
    fn row(&self, md: &mut String, first: &str, keys: &[String]) {
        let cells: Vec<String> =
            keys.iter().map(|key| self.figures.get(key).map_or_else(|| "—".to_owned(), value_text)).collect();
        let _ = writeln!(md, "| {first} | {} |", cells.join(" | "));
    }

    fn markdown(&self) -> String {
        let f = |key: &str| self.figures.get(key).map_or_else(|| "—".to_owned(), value_text);
        let mut md = String::from("# Meridian cluster run\n\n");
        let _ = writeln!(
            md,
            "A 3-node control plane and regions `a`, `b` and `c` on one machine (shards homed at {} in turn), {} \
             ms one way between regions through the WAN proxy; {} writes/s open loop, each at its shard's home ({}), \
             for {} ms after {} ms of warm-up.\n",
            f("home_regions"),
            f("one_way_delay_ms"),
            f("rate_per_s"),
            f("workload"),
            f("duration_ms"),
            f("warmup_ms")
        );
        md.push_str("## Headline\n\n| figure | value |\n|---|---|\n");
        for (label, key) in [
            ("write p50 (µs)", "write_p50_us"),
            ("write p99 (µs)", "write_p99_us"),
            ("write p99.9 (µs)", "write_p999_us"),
            ("write throughput (/s)", "write_throughput_per_s"),
            ("device limit: 4 KiB O_DIRECT write + fdatasync p99, timed together (µs)", "device_write_p99_us"),
            ("write p99 / device p99", "write_p99_vs_device_ratio"),
            ("RPO p99, worst region (ms)", "rpo_p99_ms"),
            ("RPO max (ms)", "rpo_max_ms"),
            ("lost writes", "lost_writes"),
            ("writes failed (not acknowledged)", "writes_failed"),
            ("global snapshot readable everywhere, p99 of the worst region (ms)", "snapshot_availability_p99_ms"),
            ("snapshots whose contents differed between regions", "snapshots_differing_across_regions"),
            ("chain writes missing from a snapshot that holds a later-started write", "snapshot_causal_violations"),
        ] {
            let _ = writeln!(md, "| {label} | {} |", f(key));
        }
        md.push_str("\n## RPO per replica region\n\n| region | p50 (ms) | p99 (ms) | max (ms) | samples |\n|---|---|---|---|---|\n");
        for region in self.rpo_regions() {
            let keys = ["rpo_p50_ms", "rpo_p99_ms", "rpo_max_ms", "rpo_samples"].map(|key| format!("{region}_{key}"));
            self.row(&mut md, region, &keys);
        }
        md.push_str("\n## Writes by class\n\n| class | acknowledged | failed | bytes | p50 (µs) | p99 (µs) |\n|---|---|---|---|---|---|\n");
        for class in Class::ALL.map(Class::name) {
            if self.figures.get(&format!("{class}_writes_acknowledged")).is_some() {
                let keys = ["writes_acknowledged", "writes_failed", "bytes_written", "write_p50_us", "write_p99_us"]
                    .map(|key| format!("{class}_{key}"));
                self.row(&mut md, class, &keys);
            }
        }
        md.push_str("\n## Events\n\n");
        match self.figures.get("events").and_then(Value::as_array).filter(|events| !events.is_empty()) {
            None => md.push_str("None: no partition or node kill in this scenario.\n"),
            Some(events) => {
                md.push_str("| event | region | start (ms) | end (ms) | restored (ms) | lag back under threshold after (ms) |\n|---|---|---|---|---|---|\n");
                for event in events {
                    let g = |key: &str| value_text(&event[key]);
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} |",
                        g("kind"),
                        g("region"),
                        g("start_ms"),
                        g("end_ms"),
                        g("restored_ms"),
                        g("recovery_ms")
                    );
                }
            }
        }
        md.push_str("\n## Global snapshots\n\n");
        match self.figures.get("snapshots_taken").and_then(Value::as_u64) {
            Some(taken) if taken > 0 => {
                let _ = writeln!(
                    md,
                    "{taken} taken; {} compared across regions, {} differing; {} causal violations.\n\n\
                     | region | readable after, p50 (ms) | p99 (ms) | max (ms) |\n|---|---|---|---|",
                    f("snapshots_compared_across_regions"),
                    f("snapshots_differing_across_regions"),
                    f("snapshot_causal_violations")
                );
                for region in REGIONS {
                    let keys =
                        ["p50_ms", "p99_ms", "max_ms"].map(|key| format!("{region}_snapshot_availability_{key}"));
                    let _ = writeln!(md, "| {region} | {} | {} | {} |", f(&keys[0]), f(&keys[1]), f(&keys[2]));
                }
            }
            _ => md.push_str("None taken in this run.\n"),
        }
        md.push_str(
            "\n## Plots\n\n\
             ![write latency](plots/write_latency.svg)\n\n![RPO](plots/rpo.svg)\n\n\
             Series: `series/write_latency.csv`, `series/rpo.csv`. Logs: `logs/`, `control/cp*.log`. Every figure: \
             `report.json`.\n",
        );
        md
    }
}

fn value_text(value: &Value) -> String {
    match value {
        Value::Null => "—".to_owned(),
        Value::String(text) => text.clone(),
        // Figures, not noise: one decimal unless a whole number.
        Value::Number(number) if number.is_f64() => format!("{:.1}", number.as_f64().unwrap_or(f64::NAN)),
        other => other.to_string(),
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The terminal summary (the report folder's path follows it as the last line).
pub fn print_summary(report: &Report) {
    let f = |key: &str| report.figures.get_f64(key).unwrap_or(f64::NAN);
    println!(
        "bench cluster: 3 control-plane nodes, 3 regions, {} ms one way, {} writes/s for {} ms",
        f("one_way_delay_ms"),
        f("rate_per_s"),
        f("duration_ms")
    );
    println!(
        "  writes (each at its shard's home): {:.0}/s acknowledged, p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, {} failed",
        f("write_throughput_per_s"),
        f("write_p50_us"),
        f("write_p99_us"),
        f("write_p999_us"),
        f("writes_failed")
    );
    if report.figures.get("device_write_p99_us").is_some() {
        println!(
            "  device limit (4 KiB O_DIRECT write + fdatasync, timed together): p99 {:.0} µs; our write p99 is {:.2}x it",
            f("device_write_p99_us"),
            f("write_p99_vs_device_ratio")
        );
    }
    for region in report.rpo_regions() {
        println!(
            "  RPO {region}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            f(&format!("{region}_rpo_p50_ms")),
            f(&format!("{region}_rpo_p99_ms")),
            f(&format!("{region}_rpo_max_ms"))
        );
    }
    if let Some(events) = report.figures.get("events").and_then(Value::as_array) {
        for event in events {
            println!(
                "  event: {} of region {} from {} ms to {} ms; lag back under threshold {} ms after",
                value_text(&event["kind"]),
                value_text(&event["region"]),
                value_text(&event["start_ms"]),
                value_text(&event["end_ms"]),
                value_text(&event["recovery_ms"])
            );
        }
    }
    if report.figures.get("snapshots_taken").is_some() {
        let regions: Vec<String> = ["a", "b", "c"]
            .iter()
            .map(|region| {
                format!(
                    "{region} p50 {:.1} / p99 {:.1} ms",
                    f(&format!("{region}_snapshot_availability_p50_ms")),
                    f(&format!("{region}_snapshot_availability_p99_ms"))
                )
            })
            .collect();
        println!(
            "  global snapshots: {} taken, {} failed; request to readable: {}; {} read in every region: {} differing, \
             {} causal violations over {} chain writes",
            f("snapshots_taken"),
            f("snapshots_failed"),
            regions.join(", "),
            f("snapshots_compared_across_regions"),
            f("snapshots_differing_across_regions"),
            f("snapshot_causal_violations"),
            f("chain_writes")
        );
    }
    println!(
        "  lost writes: {} (acknowledged at a home, missing in a region); values read back and differing: {}",
        f("lost_writes"),
        f("values_corrupt")
    );
    if let Some(Value::Array(plots)) = report.figures.get("plots")
        && let Some(first) = plots.first()
    {
        println!("  plots: {} (and .png, rpo.*)", value_text(first));
    }
    if report.figures.get("bench").and_then(Value::as_str) == Some("snapshot") {
        if report.figures.get("dataset_bytes").is_some() {
            println!(
                "  archive: {:.0} MiB data set; full export {:.0} MB/s vs restic backup {:.0} MB/s (ratio {:.2}); \
                 stored vs restic: {:.1} / {:.1} MiB after the full (ratio {:.3}), {:.1} / {:.1} MiB after the first \
                 change (ratio {:.3}), {:.1} / {:.1} MiB after every round (ratio {:.3})",
                f("dataset_bytes") / 1048576.0,
                f("export_full_mb_per_s"),
                f("restic_backup_full_mb_per_s"),
                f("ingest_throughput_vs_restic_ratio"),
                f("archive_stored_after_full_bytes") / 1048576.0,
                f("restic_stored_after_full_bytes") / 1048576.0,
                f("dedup_after_full_vs_restic_ratio"),
                f("archive_stored_after_first_round_bytes") / 1048576.0,
                f("restic_stored_after_first_round_bytes") / 1048576.0,
                f("dedup_vs_restic_ratio"),
                f("archive_stored_bytes") / 1048576.0,
                f("restic_stored_bytes") / 1048576.0,
                f("dedup_after_rounds_vs_restic_ratio")
            );
            println!(
                "  incremental, median of {} rounds each changing {:.1} MiB: export {:.0} ms vs rsync -a {:.0} ms \
                 (ratio {:.2}, worst round {:.2}); restic {:.0} ms",
                f("incremental_rounds"),
                f("changed_bytes") / 1048576.0,
                f("export_incremental_ms"),
                f("rsync_incremental_ms"),
                f("export_time_vs_rsync_ratio"),
                f("export_time_vs_rsync_worst_round_ratio"),
                f("restic_backup_incremental_ms")
            );
            println!(
                "  both archives sync what they write before reporting success; restic also encrypts and \
                 authenticates every blob (AES-256, Poly1305), ours does not"
            );
        }
        println!(
            "headline: global snapshot readable everywhere p99 {:.1} ms (worst region; target < 50 ms), {} of {} \
             compared snapshots differing across regions",
            f("availability_p99_ms"),
            f("snapshots_differing_across_regions"),
            f("snapshots_compared_across_regions")
        );
        return;
    }
    println!(
        "headline: write p99 {:.0} µs, RPO p99 {:.1} ms (worst region), lost writes {}",
        f("write_p99_us"),
        f("rpo_p99_ms"),
        f("lost_writes")
    );
}
