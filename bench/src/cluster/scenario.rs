//! The scenario of a `bench cluster` run, parsed from its flags: durations (`30s`, `500ms`,
//! `2m`), byte sizes (`4KiB`, `1MiB`), partitions (`c@30s+20s`), node kills (`b@40s+5s`) and
//! the workload mix (`small`, `nas`, `small:90,large:10`). Pure: every parser returns a message
//! that names what is wrong.

use std::time::Duration;

/// The regions the orchestrator runs (`a` is the home of every shard unless `--homes` says
/// otherwise).
pub const REGIONS: [&str; 3] = ["a", "b", "c"];

/// Parses `250ms`, `30s`, `1.5s`, `2m` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number.trim().parse().map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    if !value.is_finite() || value < 0.0 || value * scale > 86_400.0 * 7.0 {
        return Err(format!("{text:?} is not a duration between 0 and a week"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// Parses `4096`, `4KiB`, `1MiB`, `1GiB` (binary units; `K`, `M`, `G` alone mean the same).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let lower = text.to_ascii_lowercase();
    let (number, shift) = [("gib", 30), ("mib", 20), ("kib", 10), ("g", 30), ("m", 20), ("k", 10), ("b", 0)]
        .iter()
        .find_map(|(suffix, shift)| lower.strip_suffix(suffix).map(|n| (n.to_owned(), *shift)))
        .unwrap_or((lower.clone(), 0));
    let value: u64 = number.trim().parse().map_err(|_| format!("{text:?} is not a size (e.g. 4096, 64KiB, 1GiB)"))?;
    value.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

/// `REGION@START+LENGTH`: a region's name, when it starts and for how long.
fn parse_window(text: &str, what: &str, default_length: Option<Duration>) -> Result<Window, String> {
    let usage = || format!("{what} {text:?}: expected REGION@START+LENGTH, e.g. c@30s+20s");
    let (region, rest) = text.split_once('@').ok_or_else(usage)?;
    if !REGIONS.contains(&region) {
        return Err(format!("{what} {text:?}: unknown region {region:?} (the regions are {})", REGIONS.join(", ")));
    }
    let (start, length) = match (rest.split_once('+'), default_length) {
        (Some((start, length)), _) => (parse_duration(start)?, parse_duration(length)?),
        (None, Some(length)) => (parse_duration(rest)?, length),
        (None, None) => return Err(usage()),
    };
    if length.is_zero() {
        return Err(format!("{what} {text:?}: the length must be positive"));
    }
    Ok(Window { region: region.to_owned(), start, length })
}

/// A region and a span of the run: a partition, or a node's time down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub region: String,
    /// From the start of the load.
    pub start: Duration,
    pub length: Duration,
}

impl Window {
    pub fn end(&self) -> Duration {
        self.start + self.length
    }
}

/// `--partition c@30s+20s`: region `c` cut off from the others at 30 s, healed at 50 s.
pub fn parse_partition(text: &str) -> Result<Window, String> {
    parse_window(text, "--partition", None)
}

/// How long a killed node stays down when `--kill-node` names no length.
pub const KILL_DOWN_DEFAULT: Duration = Duration::from_secs(5);

/// `--kill-node b@40s+5s`: region `b`'s node SIGKILLed at 40 s and restarted 5 s later on
/// the same data directory (`b@40s` stays down [`KILL_DOWN_DEFAULT`]).
pub fn parse_kill(text: &str) -> Result<Window, String> {
    parse_window(text, "--kill-node", Some(KILL_DOWN_DEFAULT))
}

/// A kind of write in the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Small keys: values of 128 B to 4 KiB.
    Small,
    /// The NAS seed's many small files: 4 KiB to 1 MiB.
    Files,
    /// Large files: `--file-min` to `--file-max` (1 MiB to 1 GiB), chunked, stored in parts.
    Large,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Small, Class::Files, Class::Large];

    pub fn name(self) -> &'static str {
        match self {
            Class::Small => "small",
            Class::Files => "files",
            Class::Large => "large",
        }
    }

    /// The key prefix of this class's writes.
    pub fn prefix(self) -> &'static [u8] {
        match self {
            Class::Small => b"small/",
            Class::Files => b"files/",
            Class::Large => b"large/",
        }
    }
}

/// The workload: classes with weights (shares of the writes).
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    pub weights: Vec<(Class, f64)>,
}

impl Mix {
    /// `small`, `files`, `large`, `nas` (= `files:99.5,large:0.5`, many small files and a few
    /// big ones), or a list `CLASS[:WEIGHT],...` of those classes.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut weights: Vec<(Class, f64)> = Vec::new();
        for part in text.split(',').map(str::trim).filter(|part| !part.is_empty()) {
            let (name, weight) = match part.split_once(':') {
                Some((name, weight)) => {
                    let weight: f64 =
                        weight.parse().map_err(|_| format!("--workload {part:?}: {weight:?} is not a number"))?;
                    (name, weight)
                }
                None => (part, 1.0),
            };
            if !weight.is_finite() || weight <= 0.0 {
                return Err(format!("--workload {part:?}: the weight must be positive"));
            }
            let expanded: Vec<(Class, f64)> = match name {
                "nas" => vec![(Class::Files, 0.995 * weight), (Class::Large, 0.005 * weight)],
                _ => {
                    let class = Class::ALL.into_iter().find(|class| class.name() == name).ok_or_else(|| {
                        format!("--workload {part:?}: unknown class {name:?} (small, files, large or nas)")
                    })?;
                    vec![(class, weight)]
                }
            };
            for (class, weight) in expanded {
                match weights.iter_mut().find(|(known, _)| *known == class) {
                    Some((_, total)) => *total += weight,
                    None => weights.push((class, weight)),
                }
            }
        }
        if weights.is_empty() {
            return Err("--workload names no class (small, files, large or nas)".into());
        }
        weights.sort_by_key(|(class, _)| *class);
        Ok(Self { weights })
    }

    /// The class of a write, from a uniform draw in [0, 1).
    pub fn pick(&self, unit: f64) -> Class {
        let total: f64 = self.weights.iter().map(|(_, weight)| weight).sum();
        let mut point = unit * total;
        for (class, weight) in &self.weights {
            if point < *weight {
                return *class;
            }
            point -= weight;
        }
        self.weights.last().map_or(Class::Small, |(class, _)| *class)
    }

    /// Each class's share, for the report.
    pub fn describe(&self) -> String {
        let total: f64 = self.weights.iter().map(|(_, weight)| weight).sum();
        let parts: Vec<String> = self
            .weights
            .iter()
            .map(|(class, weight)| format!("{} {:.1}%", class.name(), 100.0 * weight / total))
            .collect();
        parts.join(", ")
    }
}

/// A small, fast, seeded generator (SplitMix64): the same run draws the same writes.
#[derive(Debug, Clone)]
pub struct Draw(u64);

impl Draw {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Log-uniform in [low, high]: small sizes as often as large ones, per octave.
    pub fn log_uniform(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        let (ln_low, ln_high) = ((low.max(1) as f64).ln(), (high as f64).ln());
        let value = (ln_low + self.unit() * (ln_high - ln_low)).exp();
        // In [low, high] up to rounding; the float-to-int cast saturates.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let value = value as u64;
        value.clamp(low, high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "-1s", "tens", "1e12s", "NaNs"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("4KiB"), Ok(4096));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("1g"), Ok(1 << 30));
        for bad in ["", "KiB", "1.5MiB", "-1", "99999999999999GiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn partitions_and_kills_name_a_region_and_a_window() {
        let partition = parse_partition("c@30s+20s").unwrap();
        assert_eq!(
            partition,
            Window { region: "c".into(), start: Duration::from_secs(30), length: Duration::from_secs(20) }
        );
        assert_eq!(partition.end(), Duration::from_secs(50));
        assert_eq!(parse_kill("b@4s").unwrap().length, KILL_DOWN_DEFAULT);
        assert_eq!(parse_kill("a@1s+500ms").unwrap().length, Duration::from_millis(500));
        for (bad, says) in [
            ("c", "expected REGION@START+LENGTH"),
            ("d@1s+1s", "unknown region \"d\""),
            ("c@1s", "expected REGION@START+LENGTH"),
            ("c@1s+0s", "must be positive"),
            ("c@x+1s", "not a duration"),
        ] {
            let error = parse_partition(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn workload_mixes_expand_presets_and_reject_unknown_classes() {
        assert_eq!(Mix::parse("small").unwrap().weights, vec![(Class::Small, 1.0)]);
        let nas = Mix::parse("nas").unwrap();
        assert_eq!(nas.weights.len(), 2);
        assert!((nas.weights[0].1 - 0.995).abs() < 1e-9 && nas.weights[1].0 == Class::Large);
        let mix = Mix::parse("large:10, small:90").unwrap();
        assert_eq!(mix.weights, vec![(Class::Small, 90.0), (Class::Large, 10.0)]);
        assert_eq!(mix.pick(0.0), Class::Small);
        assert_eq!(mix.pick(0.89), Class::Small);
        assert_eq!(mix.pick(0.95), Class::Large);
        assert_eq!(mix.describe(), "small 90.0%, large 10.0%");
        for (bad, says) in
            [("", "names no class"), ("tiny", "unknown class"), ("small:0", "positive"), ("small:x", "not a number")]
        {
            let error = Mix::parse(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn draws_are_seeded_and_stay_in_range() {
        let (mut one, mut two) = (Draw::new(7), Draw::new(7));
        for _ in 0..1000 {
            let size = one.log_uniform(128, 4096);
            assert_eq!(size, two.log_uniform(128, 4096));
            assert!((128..=4096).contains(&size));
            let unit = one.unit();
            assert!((0.0..1.0).contains(&unit));
            two.unit();
        }
        assert_eq!(one.log_uniform(9, 9), 9);
    }
}
