//! Figures collected by a bench: kept in insertion order, printed as JSON or a table.

use serde_json::{Map, Value};

/// An ordered set of named figures. Names carry their unit (`_us`, `_per_s`, `_ratio`).
#[derive(Debug, Default)]
pub struct Figures {
    values: Map<String, Value>,
}

impl Figures {
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.values.insert(key.into(), value.into());
    }

    /// A float rounded to 3 decimals (figures, not noise).
    pub fn set_f64(&mut self, key: impl Into<String>, value: f64) {
        let rounded = (value * 1000.0).round() / 1000.0;
        self.values.insert(key.into(), serde_json::Number::from_f64(rounded).map_or(Value::Null, Value::Number));
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.values.get(key).and_then(Value::as_f64)
    }

    pub fn to_json(&self) -> String {
        Value::Object(self.values.clone()).to_string()
    }
}

/// Percentile of an HDR histogram in microseconds (recorded in nanoseconds).
pub fn percentile_us(histogram: &hdrhistogram::Histogram<u64>, percentile: f64) -> f64 {
    histogram.value_at_quantile(percentile / 100.0) as f64 / 1000.0
}

/// Sets `<region>_rpo_{samples,p50_ms,p99_ms,max_ms}` for each replica region's lag histogram
/// (recorded in nanoseconds), and `rpo_p99_ms` and `rpo_max_ms` of the worst region.
pub fn set_rpo_figures<'a>(
    figures: &mut Figures,
    regions: impl IntoIterator<Item = (&'a str, &'a hdrhistogram::Histogram<u64>)>,
) {
    let (mut worst_p99, mut worst_max) = (0.0f64, 0.0f64);
    for (region, lag) in regions {
        let p99 = percentile_us(lag, 99.0) / 1000.0;
        let max = lag.max() as f64 / 1e6;
        figures.set(format!("{region}_rpo_samples"), lag.len());
        figures.set_f64(format!("{region}_rpo_p50_ms"), percentile_us(lag, 50.0) / 1000.0);
        figures.set_f64(format!("{region}_rpo_p99_ms"), p99);
        figures.set_f64(format!("{region}_rpo_max_ms"), max);
        worst_p99 = worst_p99.max(p99);
        worst_max = worst_max.max(max);
    }
    figures.set_f64("rpo_p99_ms", worst_p99);
    figures.set_f64("rpo_max_ms", worst_max);
}
